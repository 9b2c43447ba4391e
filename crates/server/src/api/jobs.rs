//! The job routes of the native API: submission, records, cancellation, events and images.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use sd_engine::events::EventRef;
use sd_engine::jobs::{CancelOutcome, JobView};
use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::{unavailable, ApiError, ErrorBody, ErrorKind, Shared};
use crate::native::{parse_job, parse_json, JobBody, RequestError};

/// The answer to a submission.
#[derive(Serialize, ToSchema)]
pub(super) struct Submitted {
    job_id: String,
    status_url: String,
    events_url: String,
    /// The same as `events_url` (older clients read this one).
    sse_url: String,
}

/// A job's record with the URLs of the native API.
#[derive(Serialize, ToSchema)]
pub(super) struct JobStatus {
    #[serde(flatten)]
    view: JobView,
    /// URLs of the result images.
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

/// Queue a job.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body(content = JobBody, description = "One of ImageGeneration, ImageTransform, ImageInpaint, by `operation`."),
    responses(
        (status = 202, description = "Queued.", body = Submitted, headers(("Location" = String, description = "The job's status URL."))),
        (status = 400, description = "The body is not JSON, or a key is given twice in one object.", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (when --api-key is set).", body = ErrorBody),
        (status = 408, description = "The body did not arrive within --read-timeout.", body = ErrorBody),
        (status = 413, description = "The body is over --max-body-bytes.", body = ErrorBody),
        (status = 422, description = "A field is invalid, unknown or missing; the message names it, the limit and the value.", body = ErrorBody),
        (status = 429, description = "The queue is full (--max-queue).", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds: the mean job time so far."))),
        (status = 503, description = "The model is loading, or the worker is draining.", body = ErrorBody),
    )
)]
pub(super) async fn submit(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = st.engine.ready_spec().map_err(unavailable)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the body is over this worker's limit of {} bytes (--max-body-bytes)",
                    st.max_body_bytes
                ),
            )
        } else {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("cannot read the body: {rejection}"),
            )
        }
    })?;
    let to_error = |e: RequestError| {
        let kind = if e.malformed {
            ErrorKind::MalformedJson
        } else {
            ErrorKind::InvalidRequest
        };
        ApiError::new(kind, e.message)
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
            ErrorKind::Internal,
            format!("internal error while reading the job: {e}"),
        )
    })?;
    let request = parsed.map_err(to_error)?;
    let id = st.engine.submit(request).map_err(unavailable)?;
    let status_url = format!("/v1/jobs/{id}");
    let events_url = format!("/v1/jobs/{id}/events");
    let submitted = Submitted {
        job_id: id,
        status_url: status_url.clone(),
        sse_url: events_url.clone(),
        events_url,
    };
    let mut response = (StatusCode::ACCEPTED, Json(submitted)).into_response();
    if let Ok(v) = HeaderValue::from_str(&status_url) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Every job the worker knows.
#[derive(Serialize, ToSchema)]
pub(super) struct JobList {
    jobs: Vec<JobStatus>,
}

/// Queued jobs (in order), running, then finished jobs (newest first).
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    responses(
        (status = 200, description = "Jobs.", body = JobList),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
    )
)]
pub(super) async fn list_jobs(State(st): State<Shared>) -> Json<JobList> {
    let jobs = st.engine.list().into_iter().map(JobStatus::from).collect();
    Json(JobList { jobs })
}

/// A job's state, position, progress, timings, seed, error and result URLs.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The job.", body = JobStatus),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Unknown job, or finished and expired (--result-ttl, --max-results).", body = ErrorBody),
    )
)]
pub(super) async fn job_status(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    st.engine
        .status(&id)
        .map(|v| Json(JobStatus::from(v)))
        .ok_or_else(|| ApiError::not_found(&id))
}

/// Cancel a job.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The job was queued and is now cancelled.", body = JobStatus),
        (status = 202, description = "The job is running and stops after its current step (state becomes cancelled).", body = JobStatus),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Unknown job, or finished and expired.", body = ErrorBody),
        (status = 409, description = "The job already finished, or its last step is done (only decoding and encoding remain).", body = ErrorBody),
    )
)]
pub(super) async fn cancel_job(
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
            ErrorKind::Conflict,
            format!("job {id} is already {}", state.name()),
        )),
        CancelOutcome::Finishing => Err(ApiError::new(
            ErrorKind::Conflict,
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

/// Server-Sent Events of a job.
///
/// Each event's name equals the `type` field of its JSON data, one JobEvent: queued, started,
/// progress, preview, complete, error, cancelled. A subscriber first receives the job's current
/// state (or its final event); the stream ends after the final event; comment lines keep the
/// connection alive.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The event stream; each `data` is a JobEvent.", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Unknown job, or finished and expired.", body = ErrorBody),
    )
)]
pub(super) async fn job_events(
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

/// The same as `/v1/jobs/{id}/events`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/stream",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Unknown job, or finished and expired.", body = ErrorBody),
    )
)]
pub(super) async fn job_stream(
    st: State<Shared>,
    id: Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    job_events(st, id).await
}

/// Result image n (0-based) as PNG, with the A1111 `parameters` text chunk.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{n}",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id."),
        ("n" = usize, Path, description = "0-based image index."),
    ),
    responses(
        (status = 200, description = "The image.", content_type = "image/png", body = Vec<u8>),
        (status = 401, description = "Missing or wrong bearer token.", body = ErrorBody),
        (status = 404, description = "Unknown job or image.", body = ErrorBody),
        (status = 409, description = "The job has not completed.", body = ErrorBody),
    )
)]
pub(super) async fn job_image(
    State(st): State<Shared>,
    Path((id, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let index: usize = n.parse().map_err(|_| {
        ApiError::new(
            ErrorKind::NotFound,
            format!("image index must be a number, got {n:?}"),
        )
    })?;
    match st.engine.image(&id, index) {
        None => Err(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "no image {index} for job {id:?} (unknown job, expired, or index out of range)"
            ),
        )),
        Some(Err(state)) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!("job {id} has no images: it is {}", state.name()),
        )),
        Some(Ok(png)) => Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            Bytes::from(png.as_ref().clone()),
        )
            .into_response()),
    }
}
