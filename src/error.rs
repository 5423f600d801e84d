//! The one error type, and the only place that turns errors into the HTTP envelope.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every failure the service reports. Each variant has a stable HTTP code and reason.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Any invalid request: bad JSON, wrong shape or type, a value out of range.
    #[error("{0}")]
    BadRequest(String),
    /// A heartbeat from a device that is not online and cannot resume.
    #[error("device not online")]
    DeviceNotOnline,
    /// No such route.
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A user already has the maximum number of online devices.
    #[error("too many devices online for this user (limit {0})")]
    TooManyDevices(usize),
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    #[error("unsupported media type: expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// Too many requests in flight.
    #[error("server overloaded, retry later")]
    Overloaded,
    /// The store could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The node is starting or draining.
    #[error("service not ready")]
    NotReady,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status, which is also the envelope's `code`.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::DeviceNotOnline | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooManyDevices(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Overloaded | Error::StoreUnavailable(_) | Error::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable reason, for logs, metrics and WebSocket errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::DeviceNotOnline => "device_not_online",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::TooManyDevices(_) => "too_many_devices",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::Overloaded => "overloaded",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::NotReady => "not_ready",
            Error::Internal(_) => "internal",
        }
    }
}

/// The response envelope of every endpoint: `{code, message, data}`.
#[derive(Debug, Serialize)]
pub struct Envelope<T: Serialize> {
    pub code: u16,
    pub message: String,
    pub data: Option<T>,
}

/// A successful answer: HTTP 200 with the given message and data.
pub fn ok<T: Serialize>(message: &str, data: T) -> Response {
    let body = Envelope {
        code: 200,
        message: message.to_owned(),
        data: Some(data),
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(reason = self.reason(), error = %self, "request failed");
        }
        let body: Envelope<()> = Envelope {
            code: status.as_u16(),
            message: self.to_string(),
            data: None,
        };
        (status, axum::Json(body)).into_response()
    }
}
