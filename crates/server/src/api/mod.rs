//! The HTTP API (axum): routes, the shared state, bearer auth and the one error table of the
//! native API. Handlers live by concern: [`jobs`] (submission, records, events, images),
//! [`info`] (health, readiness, worker information, metrics) and [`openapi`] (the document
//! generated from the types they read and write).

pub mod a1111;
mod info;
mod jobs;
pub mod openai;
pub mod openapi;
mod wait;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use sd_engine::jobs::SubmitError;
use sd_engine::{Engine, Limits};
use serde::Serialize;
use utoipa::ToSchema;

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    /// Bearer token required on every route but `/health` and `/ready`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Time a client has to send a request body (hyper bounds the head).
    pub read_timeout: Duration,
    pub keep_alive: Duration,
    /// Renders `GET /metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The A1111 API's running request.
    pub a1111: a1111::A1111State,
}

pub type Shared = Arc<AppState>;

/// Every error of the native API, and the HTTP status each one answers with: the one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON.
    MalformedJson,
    /// The body could not be read.
    BadRequest,
    /// A field is invalid, unknown or missing.
    InvalidRequest,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    /// The job is in a state where that cannot be done.
    Conflict,
    PayloadTooLarge,
    /// The body did not arrive within `--read-timeout`.
    RequestTimeout,
    QueueFull,
    /// The model is loading, or failed to load.
    NotReady,
    Draining,
    /// A bug while reading a request.
    Internal,
}

impl ErrorKind {
    #[cfg(test)]
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::MalformedJson,
        ErrorKind::BadRequest,
        ErrorKind::InvalidRequest,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::Conflict,
        ErrorKind::PayloadTooLarge,
        ErrorKind::RequestTimeout,
        ErrorKind::QueueFull,
        ErrorKind::NotReady,
        ErrorKind::Draining,
        ErrorKind::Internal,
    ];

    /// The `type` of the error body (also a metrics label where one is wanted).
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    pub fn status(self) -> StatusCode {
        self.entry().0
    }

    fn entry(self) -> (StatusCode, &'static str) {
        match self {
            ErrorKind::MalformedJson => (StatusCode::BAD_REQUEST, "malformed_json"),
            ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorKind::InvalidRequest => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ErrorKind::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorKind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ErrorKind::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ErrorKind::QueueFull => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            ErrorKind::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ErrorKind::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// An error answer of the native API.
#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub retry_after: Option<u64>,
}

/// The one error shape: `{"error": {"type", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// malformed_json, bad_request, invalid_request, unauthorized, not_found,
    /// method_not_allowed, conflict, payload_too_large, request_timeout, queue_full, not_ready,
    /// draining or internal.
    #[serde(rename = "type")]
    kind: &'static str,
    /// For invalid_request: names the field, the limit and the value.
    message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    fn not_found(id: &str) -> Self {
        ApiError::new(
            ErrorKind::NotFound,
            format!("no job {id:?} (unknown, or finished and expired)"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.kind.name(),
                message: self.message,
            },
        };
        let mut response = (self.kind.status(), Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.kind == ErrorKind::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A refused submission (or a route that needs the model while the worker is not ready).
fn unavailable(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Draining => ApiError::new(ErrorKind::Draining, e.message()),
        SubmitError::NotReady(m) => {
            ApiError::new(ErrorKind::NotReady, format!("{m}; see GET /ready"))
        }
        SubmitError::QueueFull { retry_after_s, .. } => ApiError {
            retry_after: Some(retry_after_s),
            ..ApiError::new(ErrorKind::QueueFull, e.message())
        },
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

/// Checks A1111 clients' credentials: HTTP Basic (as `--api-auth` and Open WebUI send them)
/// whose password, or whose `user:password`, is the key; or the bearer token.
fn a1111_auth(header: Option<&str>, key: &str) -> Option<&'static str> {
    use base64::Engine as _;
    let Some(value) = header else {
        return Some("Not authenticated");
    };
    let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
    let credential = credential.trim();
    let ok = if scheme.eq_ignore_ascii_case("bearer") {
        constant_time_eq(credential.as_bytes(), key.as_bytes())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credential)
            .unwrap_or_default();
        let password = decoded
            .iter()
            .position(|b| *b == b':')
            .map_or(&decoded[..0], |i| &decoded[i + 1..]);
        // Both compared in full, so the time does not tell which one matched.
        let whole = constant_time_eq(&decoded, key.as_bytes());
        let pass = constant_time_eq(password, key.as_bytes());
        whole | pass
    } else {
        false
    };
    (!ok).then_some("Incorrect username or password")
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let (Some(key), true) = (&st.api_key, a1111::owns(req.uri().path())) {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(m) = a1111_auth(header, key) {
            return a1111::unauthorized(m);
        }
        return next.run(req).await;
    }
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
            if openai::owns(req.uri().path()) {
                let kind = openai::error::Kind::InvalidApiKey;
                return openai::error::OpenAiError::new(kind, m).into_response();
            }
            return ApiError::new(ErrorKind::Unauthorized, m).into_response();
        }
    }
    next.run(req).await
}

/// The router with every route of the API.
pub fn router(state: Shared) -> Router {
    let max_body = state.max_body_bytes;
    let protected = Router::new()
        .route("/v1/jobs", get(jobs::list_jobs).post(jobs::submit))
        .route(
            "/v1/jobs/{id}",
            get(jobs::job_status).delete(jobs::cancel_job),
        )
        .route("/v1/jobs/{id}/events", get(jobs::job_events))
        .route("/v1/jobs/{id}/stream", get(jobs::job_stream))
        .route("/v1/jobs/{id}/images/{n}", get(jobs::job_image))
        .route("/v1/info", get(info::info))
        .route("/v1/samplers", get(info::samplers))
        .route("/v1/schedules", get(info::schedules))
        .route("/metrics", get(info::metrics))
        .route("/openapi.json", get(openapi::openapi))
        .merge(openai::routes())
        .merge(a1111::routes())
        // Route layers run last-added first: auth, then the body is read.
        .route_layer(middleware::from_fn_with_state(state.clone(), body_in_time))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .merge(openai::file_routes())
        .merge(protected)
        .fallback(not_found_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Reads the request body (up to one byte past `--max-body-bytes`) within `--read-timeout`,
/// so that a client trickling its body cannot hold a connection and a handler for ever; the
/// handlers then read it from memory. It runs after auth, on the protected routes only. A body
/// declared or found over the limit is passed on as it comes, for each API's own 413.
async fn body_in_time(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_body_bytes) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let deadline = tokio::time::Instant::now() + st.read_timeout;
    let mut stream = body.into_data_stream();
    let mut read = Vec::with_capacity(declared.unwrap_or(0));
    let rest = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return body_timeout(parts.uri.path(), st.read_timeout),
            Ok(None) => break None,
            Ok(Some(Ok(chunk))) => {
                read.extend_from_slice(&chunk);
                if read.len() > st.max_body_bytes {
                    break Some(Ok(stream));
                }
            }
            Ok(Some(Err(e))) => break Some(Err(e)),
        }
    };
    let head = futures_util::stream::once(async move { Ok(Bytes::from(read)) });
    let body = match rest {
        None => Body::from_stream(head),
        Some(Ok(rest)) => Body::from_stream(head.chain(rest)),
        Some(Err(e)) => Body::from_stream(head.chain(futures_util::stream::once(async { Err(e) }))),
    };
    next.run(Request::from_parts(parts, body)).await
}

/// 408 in the shape of the API that owns `path`.
fn body_timeout(path: &str, limit: Duration) -> Response {
    let message = format!(
        "the request body did not arrive within this worker's {}s (--read-timeout)",
        limit.as_secs()
    );
    if a1111::owns(path) {
        let kind = a1111::error::Kind::RequestTimeout;
        return a1111::error::A1111Error::new(kind, message).into_response();
    }
    if openai::owns(path) {
        let kind = openai::error::Kind::RequestTimeout;
        return openai::error::OpenAiError::new(kind, message).into_response();
    }
    ApiError::new(ErrorKind::RequestTimeout, message).into_response()
}

async fn not_found_route(uri: Uri) -> Response {
    let message = "no such route; see /openapi.json";
    if a1111::owns(uri.path()) {
        return a1111::no_route(StatusCode::NOT_FOUND);
    }
    if openai::owns(uri.path()) {
        let kind = openai::error::Kind::NotFound;
        return openai::error::OpenAiError::new(kind, message).into_response();
    }
    ApiError::new(ErrorKind::NotFound, message).into_response()
}

async fn method_not_allowed(uri: Uri) -> Response {
    let message = "this route does not take that method; see /openapi.json";
    if a1111::owns(uri.path()) {
        return a1111::no_route(StatusCode::METHOD_NOT_ALLOWED);
    }
    if openai::owns(uri.path()) {
        let kind = openai::error::Kind::NotFound;
        return openai::error::OpenAiError::new(kind, message).into_response();
    }
    ApiError::new(ErrorKind::MethodNotAllowed, message).into_response()
}

#[cfg(test)]
pub(crate) mod tests {
    /// Limits as a served worker applies them (from flags, no LoRAs, no empty prompt), with
    /// the pipeline's own bounds for the sizes.
    pub fn served_limits() -> sd_engine::Limits {
        sd_engine::Limits {
            loras: sd_engine::validate::LoraFiles::Refused,
            from_flags: true,
            empty_prompt: false,
            ..sd_engine::Limits::pipeline()
        }
    }
}
