//! THE test tokens: HS256 JWTs for a user or a backend (service), signed with [`SECRET`], and
//! WebSocket requests that carry one.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

use super::ws::ws_url;

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
pub const AUD: &str = "presence";
pub const ISS: &str = "https://idp.test";

/// The settings of a node that takes these tokens.
pub const JWT_VARS: &[(&str, &str)] = &[
    ("PRESENCE_AUTH", "jwt"),
    ("PRESENCE_JWT_ISSUER", ISS),
    ("PRESENCE_JWT_SECRET", SECRET),
];

/// Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims of a user token for `user` (`iss` included), valid for a minute.
pub fn claims(user: u64) -> Value {
    json!({"sub": user.to_string(), "aud": AUD, "iss": ISS, "exp": now() + 60})
}

/// Claims of a backend's token: it may act for any user.
pub fn service_claims() -> Value {
    json!({"sub": "im-server", "aud": AUD, "iss": ISS, "exp": now() + 60,
        "scope": "presence:read presence:service"})
}

pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).expect("signing a test token")
}

/// `claims` signed HS256 with [`SECRET`].
pub fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

pub fn user_token(user: u64) -> String {
    hs(&claims(user))
}

pub fn service_token() -> String {
    hs(&service_claims())
}

/// The WebSocket request of `user` on `device` at `base` (no token).
pub fn ws_request(base: &str, user: u64, device: &str) -> Request {
    let query = format!("userId={user}&deviceId={device}&platform=WEB");
    ws_url(base, &query)
        .into_client_request()
        .expect("a WebSocket request")
}

/// `req` with `Authorization: Bearer <token>`.
pub fn with_bearer(mut req: Request, token: &str) -> Request {
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    req
}
