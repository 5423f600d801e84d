//! The one error type, and the only place that turns errors into the HTTP envelope and into
//! `tonic::Status` (and back, on the calling side).

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
    /// No valid bearer token: missing, malformed, badly signed, expired, or for another audience
    /// or issuer. The message never says which.
    #[error("invalid or missing token")]
    Unauthorized,
    /// A valid token that may not act for (or read the subscriptions of) this user.
    #[error("not allowed to act for this user")]
    Forbidden,
    /// A user already has the maximum number of online devices.
    #[error("too many devices online for this user (limit {0})")]
    TooManyDevices(usize),
    /// The client did not send the request body in time.
    #[error("request body not received in time")]
    RequestTimeout,
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    #[error("unsupported media type: expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// A per-user rate limit (`PRESENCE_STATUS_RATE`): retry after the given whole seconds.
    #[error("too many status changes, retry in {0} s")]
    RateLimited(u64),
    /// Too many requests in flight.
    #[error("server overloaded, retry later")]
    Overloaded,
    /// The store could not be reached or answered with an error.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The node is starting or draining.
    #[error("service not ready")]
    NotReady,
    /// A shard was asked about a user it does not own; `epoch` is the shard's ring.
    #[error("ownership is moving, retry (shard ring epoch {epoch})")]
    WrongOwner { epoch: u64 },
    /// No shard could answer: none in the ring, unreachable, or still loading the partition.
    #[error("shard unavailable: {0}")]
    ShardUnavailable(String),
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
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden => StatusCode::FORBIDDEN,
            Error::TooManyDevices(_) => StatusCode::CONFLICT,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Overloaded
            | Error::StoreUnavailable(_)
            | Error::NotReady
            | Error::WrongOwner { .. }
            | Error::ShardUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client sees: the error's text, except for failures of the service's own
    /// parts (store, shards, internal), whose details (addresses, Redis or transport errors)
    /// go to the logs only.
    pub fn public_message(&self) -> String {
        match self {
            Error::StoreUnavailable(_) => "store unavailable, retry later".into(),
            Error::ShardUnavailable(_) => "shard unavailable, retry later".into(),
            Error::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    /// A stable machine-readable reason, for logs, metrics and WebSocket errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::DeviceNotOnline => "device_not_online",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Unauthorized => "unauthorized",
            Error::Forbidden => "forbidden",
            Error::TooManyDevices(_) => "too_many_devices",
            Error::RequestTimeout => "request_timeout",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::RateLimited(_) => "rate_limited",
            Error::Overloaded => "overloaded",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::NotReady => "not_ready",
            Error::WrongOwner { .. } => "wrong_owner",
            Error::ShardUnavailable(_) => "shard_unavailable",
            Error::Internal(_) => "internal",
        }
    }
}

const REASON: &str = "x-presence-error";
const EPOCH: &str = "x-presence-epoch";
const LIMIT: &str = "x-presence-limit";

impl From<Error> for tonic::Status {
    /// The gRPC form of an error: a code, the message, and the stable reason (plus the epoch or
    /// limit it carries) in metadata, so the other side rebuilds the same `Error`.
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            Error::BadRequest(_) => Code::InvalidArgument,
            Error::DeviceNotOnline | Error::NotFound(_) => Code::NotFound,
            Error::MethodNotAllowed => Code::Unimplemented,
            Error::Unauthorized => Code::Unauthenticated,
            Error::Forbidden => Code::PermissionDenied,
            Error::TooManyDevices(_) | Error::RateLimited(_) => Code::ResourceExhausted,
            Error::RequestTimeout => Code::DeadlineExceeded,
            Error::PayloadTooLarge(_) => Code::OutOfRange,
            Error::UnsupportedMediaType => Code::InvalidArgument,
            Error::WrongOwner { .. } => Code::FailedPrecondition,
            Error::Overloaded
            | Error::StoreUnavailable(_)
            | Error::NotReady
            | Error::ShardUnavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        };
        let mut status = tonic::Status::new(code, e.to_string());
        let md = status.metadata_mut();
        md.insert(
            REASON,
            tonic::metadata::MetadataValue::from_static(e.reason()),
        );
        match &e {
            Error::WrongOwner { epoch } => {
                md.insert(EPOCH, epoch.to_string().parse().expect("digits are ascii"));
            }
            Error::TooManyDevices(n) | Error::PayloadTooLarge(n) => {
                md.insert(LIMIT, n.to_string().parse().expect("digits are ascii"));
            }
            Error::RateLimited(secs) => {
                md.insert(LIMIT, secs.to_string().parse().expect("digits are ascii"));
            }
            _ => {}
        }
        status
    }
}

impl From<tonic::Status> for Error {
    /// Rebuilds the error a peer sent; transport failures become `ShardUnavailable`.
    fn from(s: tonic::Status) -> Error {
        let md = s.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let number = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Messages of our own errors carry their Display text; strip known prefixes back off.
        let msg = s.message().to_owned();
        let after = |prefix: &str| msg.strip_prefix(prefix).unwrap_or(&msg).to_owned();
        match get(REASON).as_deref() {
            Some("bad_request") => Error::BadRequest(msg),
            Some("device_not_online") => Error::DeviceNotOnline,
            Some("not_found") => Error::NotFound(after("not found: ")),
            Some("unauthorized") => Error::Unauthorized,
            Some("forbidden") => Error::Forbidden,
            Some("too_many_devices") => Error::TooManyDevices(number(LIMIT) as usize),
            Some("request_timeout") => Error::RequestTimeout,
            Some("payload_too_large") => Error::PayloadTooLarge(number(LIMIT) as usize),
            Some("overloaded") => Error::Overloaded,
            Some("rate_limited") => Error::RateLimited(number(LIMIT)),
            Some("store_unavailable") => Error::StoreUnavailable(after("store unavailable: ")),
            Some("not_ready") => Error::ShardUnavailable("shard not ready".into()),
            Some("wrong_owner") => Error::WrongOwner {
                epoch: number(EPOCH),
            },
            Some("shard_unavailable") => Error::ShardUnavailable(after("shard unavailable: ")),
            Some("internal") => Error::Internal(after("internal error: ")),
            // No reason of ours: the transport failed (a shard killed or shutting down mid-call
            // shows as Unknown or Internal). Every peer call is safe to retry.
            _ => match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal => Error::ShardUnavailable(msg),
                _ => Error::Internal(format!("peer: {:?}: {msg}", s.code())),
            },
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
            message: self.public_message(),
            data: None,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Error::RateLimited(secs) = self {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        if matches!(self, Error::Unauthorized) {
            // RFC 6750: what a bearer-token client needs to know, and nothing more.
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_a_grpc_round_trip() {
        for e in [
            Error::BadRequest("userId must be a positive 64-bit integer".into()),
            Error::DeviceNotOnline,
            Error::TooManyDevices(16),
            Error::StoreUnavailable("redis cluster did not answer in time".into()),
            Error::WrongOwner { epoch: 42 },
            Error::ShardUnavailable("partition loading".into()),
            Error::Internal("boom".into()),
            Error::Overloaded,
            Error::Unauthorized,
            Error::Forbidden,
            Error::RateLimited(6),
        ] {
            let back = Error::from(tonic::Status::from(e.clone()));
            assert_eq!(back, e);
            assert_eq!(back.status(), e.status());
        }
        let transport = tonic::Status::unavailable("connection refused");
        let leak = Error::StoreUnavailable("10.0.0.7:6379: READONLY You can't write".into());
        assert_eq!(leak.public_message(), "store unavailable, retry later");
        assert_eq!(
            Error::from(tonic::Status::unavailable("tcp connect 10.0.0.9:9004")).public_message(),
            "shard unavailable, retry later"
        );
        assert_eq!(
            Error::from(transport).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn a_rate_limit_is_429_with_retry_after() {
        let r = Error::RateLimited(6).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "6");
    }

    #[test]
    fn auth_errors_are_401_with_a_challenge_and_403() {
        let r = Error::Unauthorized.into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[axum::http::header::WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );
        let r = Error::Forbidden.into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!r
            .headers()
            .contains_key(axum::http::header::WWW_AUTHENTICATE));
        assert_eq!(
            tonic::Status::from(Error::Unauthorized).code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tonic::Status::from(Error::Forbidden).code(),
            tonic::Code::PermissionDenied
        );
    }
}
