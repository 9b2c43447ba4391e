//! The HTTP API (axum): job submission, status, events, images, health and metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use sd_engine::events::EventRef;
use sd_engine::jobs::{CancelOutcome, JobView, Phase, SubmitError};
use sd_engine::validate::{self, default_strength, MAX_GUIDANCE, MAX_LORAS, MAX_SIDE};
use sd_engine::{Engine, Limits, Operation};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::native::{parse_job, parse_json, RequestError};

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    /// Bearer token required on every route but `/health` and `/ready`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub keep_alive: Duration,
    /// Renders `GET /metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// A job's record with the URLs of the native API.
#[derive(Serialize)]
struct JobStatus {
    #[serde(flatten)]
    view: JobView,
    images: Vec<String>,
    status_url: String,
    events_url: String,
}

impl From<JobView> for JobStatus {
    fn from(view: JobView) -> Self {
        let id = &view.job_id;
        JobStatus {
            images: (0..view.image_count)
                .map(|n| format!("/v1/jobs/{id}/images/{n}"))
                .collect(),
            status_url: format!("/v1/jobs/{id}"),
            events_url: format!("/v1/jobs/{id}/events"),
            view,
        }
    }
}

pub type Shared = Arc<AppState>;

/// The one error shape: `{"error": {"type", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    fn not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {id:?} (unknown, or finished and expired)"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"type": self.kind, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = header.and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let message = match token {
            None if header.is_none() => Some("missing `Authorization: Bearer <token>` header"),
            None => Some("the Authorization header must be `Bearer <token>`"),
            Some(t) if !constant_time_eq(t.as_bytes(), key.as_bytes()) => {
                Some("wrong bearer token")
            }
            Some(_) => None,
        };
        if let Some(m) = message {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m).into_response();
        }
    }
    next.run(req).await
}

/// The router with every route of the API.
pub fn router(state: Shared) -> Router {
    let max_body = state.max_body_bytes;
    let protected = Router::new()
        .route("/v1/jobs", get(list_jobs).post(submit))
        .route("/v1/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/stream", get(job_events))
        .route("/v1/jobs/{id}/images/{n}", get(job_image))
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(protected)
        .fallback(not_found_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn not_found_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(st): State<Shared>) -> Response {
    match st.engine.phase() {
        Phase::Ready => Json(json!({"ready": true})).into_response(),
        Phase::Loading => not_ready("loading"),
        Phase::Draining => not_ready("draining"),
        Phase::Failed(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "failed", "message": m})),
        )
            .into_response(),
    }
}

fn not_ready(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "reason": reason})),
    )
        .into_response()
}

fn unavailable(phase: &Phase) -> ApiError {
    match phase {
        Phase::Draining => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the worker is shutting down and takes no new jobs",
        ),
        Phase::Failed(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the model failed to load: {m}"),
        ),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the model is still loading; watch GET /ready",
        ),
    }
}

async fn submit(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let phase = st.engine.phase();
    let spec = match (&phase, st.engine.spec()) {
        (Phase::Ready, Some(spec)) => spec,
        _ => return Err(unavailable(&phase)),
    };
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the body is over this worker's limit of {} bytes (--max-body-bytes)",
                    st.max_body_bytes
                ),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {rejection}"),
            )
        }
    })?;
    let to_error = |e: RequestError| {
        if e.malformed {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.message)
        } else {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.message,
            )
        }
    };
    // Parsing decodes input images: keep it off the async workers.
    let limits = st.limits.clone();
    let seed = rand::random::<u32>() as u64;
    let parsed = tokio::task::spawn_blocking(move || {
        parse_json(&body).and_then(|value| parse_job(&value, &spec, &limits, seed))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error while reading the job: {e}"),
        )
    })?;
    let request = parsed.map_err(to_error)?;
    let id = st.engine.submit(request).map_err(|e| match e {
        SubmitError::NotReady(_) => unavailable(&st.engine.phase()),
        SubmitError::Draining => unavailable(&Phase::Draining),
        SubmitError::QueueFull { max, retry_after_s } => ApiError {
            retry_after: Some(retry_after_s),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("the queue is full ({max} waiting jobs, --max-queue); retry later"),
            )
        },
    })?;
    let status_url = format!("/v1/jobs/{id}");
    let events_url = format!("/v1/jobs/{id}/events");
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({
            "job_id": id,
            "status_url": status_url,
            "events_url": events_url,
            "sse_url": events_url,
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&status_url) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

#[derive(Serialize)]
struct JobList {
    jobs: Vec<JobStatus>,
}

async fn list_jobs(State(st): State<Shared>) -> Json<JobList> {
    let jobs = st.engine.list().into_iter().map(JobStatus::from).collect();
    Json(JobList { jobs })
}

async fn job_status(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    st.engine
        .status(&id)
        .map(|v| Json(JobStatus::from(v)))
        .ok_or_else(|| ApiError::not_found(&id))
}

async fn cancel_job(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match st.engine.cancel(&id) {
        CancelOutcome::Cancelled(view) => {
            Ok((StatusCode::OK, Json(JobStatus::from(view))).into_response())
        }
        CancelOutcome::Stopping(view) => {
            Ok((StatusCode::ACCEPTED, Json(JobStatus::from(view))).into_response())
        }
        CancelOutcome::AlreadyFinished(state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("job {id} is already {}", state.name()),
        )),
        CancelOutcome::Finishing => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "job {id} is finishing: its last step is done and its images are being decoded"
            ),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found(&id)),
    }
}

struct Feed {
    first: VecDeque<EventRef>,
    live: Option<broadcast::Receiver<EventRef>>,
    done: bool,
}

async fn job_events(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (first, live) = st
        .engine
        .subscribe(&id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    let feed = Feed {
        first: first.into(),
        live,
        done: false,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        if feed.done {
            return None;
        }
        let ev = match feed.first.pop_front() {
            Some(ev) => ev,
            None => {
                let rx = feed.live.as_mut()?;
                loop {
                    match rx.recv().await {
                        Ok(ev) => break ev,
                        // A slow reader missed some progress events; the final event is
                        // always the newest, so it still arrives.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        };
        feed.done = ev.event.is_final();
        let sse = Event::default().event(ev.name()).data(ev.json());
        Some((Ok(sse), feed))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(st.keep_alive)))
}

async fn job_image(
    State(st): State<Shared>,
    Path((id, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let index: usize = n.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("image index must be a number, got {n:?}"),
        )
    })?;
    match st.engine.image(&id, index) {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no image {index} for job {id:?} (unknown job, expired, or index out of range)"
            ),
        )),
        Some(Err(state)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("job {id} has no images: it is {}", state.name()),
        )),
        Some(Ok(png)) => Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            Bytes::from(png.as_ref().clone()),
        )
            .into_response()),
    }
}

async fn info(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let phase = st.engine.phase();
    let spec = st.engine.spec().ok_or_else(|| unavailable(&phase))?;
    let config = st.engine.config();
    let default_scheduler = spec.default_sampler.as_ref().ok().map(|s| s.name());
    let operations = validate::operations(&spec);
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "name": spec.name,
            "path": spec.path.display().to_string(),
            "repo_id": spec.repo_id,
            "family": spec.family,
            "variant": spec.prediction_type,
            "pipeline_class": spec.pipeline_class,
            "latent_factor": spec.latent_factor,
        },
        "device": spec.device,
        "dtype": spec.dtype,
        "defaults": {
            "width": spec.default_width,
            "height": spec.default_height,
            "steps": validate::default_steps(&spec, &st.limits),
            "guidance_scale": spec.default_guidance,
            "max_sequence_length": spec.default_max_sequence_length,
            "scheduler": default_scheduler,
            "batch": 1,
            "preview_every": validate::DEFAULT_PREVIEW_EVERY,
            "preview": "approx",
            "strength": operations
                .iter()
                .filter(|o| **o != Operation::Generation)
                .map(|o| (o.name().to_string(), json!(default_strength(&spec, *o))))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "limits": {
            "max_pixels": st.limits.max_pixels,
            "max_input_pixels": st.limits.max_input_pixels,
            "max_side": MAX_SIDE,
            "max_steps": st.limits.max_steps.min(spec.num_train_timesteps),
            "max_batch": st.limits.max_batch,
            "max_guidance_scale": MAX_GUIDANCE,
            "max_queue": config.max_queue,
            "max_body_bytes": st.max_body_bytes,
            "job_timeout_s": config.job_timeout.as_secs_f64(),
            "result_ttl_s": config.result_ttl.as_secs_f64(),
            "max_results": config.max_results,
        },
        "schedulers": if spec.flux {
            vec!["flow-match-euler"]
        } else {
            sd_models::samplers::SamplerKind::ALL.iter().map(|s| s.name()).collect::<Vec<_>>()
        },
        "capabilities": {
            "operations": operations.iter().map(|o| o.name()).collect::<Vec<_>>(),
            "inpaint_method": spec.inpaint_method,
            "negative_prompt": !spec.flux,
            "max_prompt_tokens": spec.max_prompt_tokens,
            "guidance": if spec.flux {
                if spec.guidance_embedded { "embedded" } else { "none" }
            } else {
                "classifier-free"
            },
            "input_formats": ["png", "jpeg", "webp"],
            "previews": ["approx", "full"],
            "image_formats": ["png"],
            "auth": st.api_key.is_some(),
            "loras": {
                "enabled": st.limits.loras != validate::LoraFiles::Refused,
                "max_per_job": MAX_LORAS,
                "max_strength": sd_models::lora::MAX_STRENGTH,
                "formats": ["kohya", "diffusers-peft", "locon", "flux-original"],
            },
        },
    })))
}

async fn metrics(State(st): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        {
            st.engine.update_gauges();
            st.metrics.run_upkeep();
            st.metrics.render()
        },
    )
        .into_response()
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}
