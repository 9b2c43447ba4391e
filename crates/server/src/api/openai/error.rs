//! Errors of the OpenAI Images API in OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the statuses OpenAI uses, so that the official clients raise their usual
//! exceptions (`BadRequestError` for 400, `AuthenticationError` for 401, `NotFoundError` for
//! 404, `RateLimitError` for 429). One table from kind to status, type and code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Every error of this API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A parameter is invalid, missing, or asks for what this worker does not do.
    InvalidValue,
    /// A parameter this API does not know.
    UnknownParameter,
    /// The body is not JSON or not a readable form.
    BadBody,
    PayloadTooLarge,
    /// The body did not arrive within `--read-timeout`.
    RequestTimeout,
    InvalidApiKey,
    ModelNotFound,
    NotFound,
    RateLimited,
    /// The model is loading, or the worker is draining.
    Unavailable,
    /// The job failed while it ran, or a bug.
    Server,
}

impl Kind {
    /// (status, type, code).
    fn entry(self) -> (StatusCode, &'static str, Option<&'static str>) {
        const REQ: &str = "invalid_request_error";
        match self {
            Kind::InvalidValue => (StatusCode::BAD_REQUEST, REQ, Some("invalid_value")),
            Kind::UnknownParameter => (StatusCode::BAD_REQUEST, REQ, Some("unknown_parameter")),
            Kind::BadBody => (StatusCode::BAD_REQUEST, REQ, None),
            Kind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, REQ, None),
            Kind::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, REQ, None),
            Kind::InvalidApiKey => (StatusCode::UNAUTHORIZED, REQ, Some("invalid_api_key")),
            Kind::ModelNotFound => (StatusCode::NOT_FOUND, REQ, Some("model_not_found")),
            Kind::NotFound => (StatusCode::NOT_FOUND, REQ, None),
            Kind::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
            ),
            Kind::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("service_unavailable"),
            ),
            Kind::Server => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }
}

/// An error answer of the OpenAI API.
#[derive(Debug)]
pub struct OpenAiError {
    pub kind: Kind,
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    error: OpenAiErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    message: String,
    /// `invalid_request_error`, `requests` (429) or `server_error`.
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<String>,
    /// `invalid_value`, `unknown_parameter`, `invalid_api_key`, `model_not_found`,
    /// `rate_limit_exceeded`, `service_unavailable`, or null.
    code: Option<&'static str>,
}

impl OpenAiError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        OpenAiError {
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn param(kind: Kind, param: &str, message: impl Into<String>) -> Self {
        OpenAiError {
            param: Some(param.to_string()),
            ..OpenAiError::new(kind, message)
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.kind.entry();
        let body = OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.message,
                kind,
                param: self.param,
                code,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
