//! Errors of the AUTOMATIC1111 API in its own shapes, so that its clients read them as they read
//! A1111's: a bad field is FastAPI's validation answer, 422 `{"detail": [{"loc": ["body",
//! field], "msg", "type"}]}`; the rest is A1111's `{"error", "detail", "body", "errors"}` with the
//! status of the table in [`Kind`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

/// Every error of this API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A field is invalid, or asks for what this worker does not do (FastAPI's 422).
    Validation,
    /// The body is not JSON (FastAPI's 422 `value_error.jsondecode`).
    Json,
    Unauthorized,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    QueueFull,
    Unavailable,
    /// The job failed while it ran, or a bug.
    Server,
}

impl Kind {
    /// (status, the `error` name A1111 would give).
    fn entry(self) -> (StatusCode, &'static str) {
        match self {
            Kind::Validation | Kind::Json => {
                (StatusCode::UNPROCESSABLE_ENTITY, "RequestValidationError")
            }
            Kind::Unauthorized => (StatusCode::UNAUTHORIZED, "HTTPException"),
            Kind::NotFound => (StatusCode::NOT_FOUND, "HTTPException"),
            Kind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "HTTPException"),
            Kind::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "HTTPException"),
            Kind::QueueFull => (StatusCode::TOO_MANY_REQUESTS, "HTTPException"),
            Kind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "HTTPException"),
            Kind::Server => (StatusCode::INTERNAL_SERVER_ERROR, "RuntimeError"),
        }
    }
}

#[derive(Debug)]
pub struct A1111Error {
    pub kind: Kind,
    /// The request field at fault (validation errors).
    pub field: Option<String>,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl A1111Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        A1111Error {
            kind,
            field: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        A1111Error {
            field: Some(field.to_string()),
            ..A1111Error::new(Kind::Validation, message)
        }
    }
}

#[derive(Serialize)]
struct ValidationItem {
    loc: Vec<String>,
    msg: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let (status, name) = self.kind.entry();
        let body = match self.kind {
            Kind::Validation | Kind::Json => {
                let mut loc = vec!["body".to_string()];
                loc.extend(self.field);
                let item = ValidationItem {
                    loc,
                    msg: self.message,
                    kind: if self.kind == Kind::Json {
                        "value_error.jsondecode"
                    } else {
                        "value_error"
                    },
                };
                json!({ "detail": [item] })
            }
            Kind::Server => {
                json!({"error": name, "detail": "", "body": "", "errors": self.message})
            }
            _ => json!({"error": name, "detail": self.message, "body": "", "errors": ""}),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.kind == Kind::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
        }
        response
    }
}
