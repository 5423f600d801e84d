//! HTTP handlers: parsing, validation and the `{code, message, data}` envelope. No business
//! logic: every operation is one call on [`Presence`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::auth::{Auth, Principal};
use crate::config::{Config, StatusStyle};
use crate::error::{ok, Error};
use crate::metrics::{HttpAnswer, HttpRefusal, HttpRoute, Metrics};
use crate::presence::{
    parse_time, parse_user_id, validate_custom_text, validate_device_id, validate_privacy_list,
    validate_user_id, LastSeen, Platform, Privacy, Settings, Status, UserId, Viewer, Visibility,
};
use crate::service::Presence;
use crate::store::SubscriptionMode;

pub mod lease;
pub mod server;
mod ws;

/// The base path of the presence API.
pub const BASE: &str = "/api/v1/presence";

/// Every route and its methods, as served. `docs/openapi.yaml` is checked against this list.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/api/v1/presence/online", &["POST"]),
    ("/api/v1/presence/offline", &["POST"]),
    ("/api/v1/presence/heartbeat", &["POST"]),
    ("/api/v1/presence/status/batch", &["POST"]),
    (
        "/api/v1/presence/status/{userId}",
        &["GET", "PUT", "DELETE"],
    ),
    ("/api/v1/presence/statuses", &["GET"]),
    ("/api/v1/presence/subscriptions/{userId}", &["GET", "PUT"]),
    ("/api/v1/presence/privacy/{userId}", &["GET", "PUT"]),
    ("/api/v1/presence/ws", &["GET"]),
    ("/livez", &["GET"]),
    ("/readyz", &["GET"]),
    ("/metrics", &["GET"]),
];

/// What the handlers need: one `Arc`, because axum clones the state for every middleware and
/// handler of every request (an `Arc` per field made that a dozen atomic operations).
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

impl AppState {
    pub fn new(inner: AppInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct AppInner {
    pub presence: Arc<dyn Presence>,
    /// The sockets of this node (gateway and all-in-one roles).
    pub hub: Option<Arc<crate::push::hub::Hub>>,
    pub metrics: Arc<Metrics>,
    /// False while starting or draining.
    pub ready: Arc<AtomicBool>,
    /// Whether `/readyz` fails while the store as a whole does not answer
    /// (`presence_store_up` 0): on an all-in-one node. Never on a shard, whose readiness is its
    /// ring membership under Kubernetes discovery; and never for one stalled Redis master.
    pub ready_needs_store: bool,
    pub limits: Arc<Limits>,
    /// Who callers are (`PRESENCE_AUTH`), and the self-only rule.
    pub auth: Arc<Auth>,
    /// The liveness lease of this node's WebSockets (its rounds run where there is a hub).
    pub leases: Arc<lease::Leases>,
}

/// Limits and fixed answers from the configuration.
pub struct Limits {
    pub batch_limit: usize,
    pub max_subscriptions: usize,
    /// Most user ids in each privacy list.
    pub max_privacy_list: usize,
    /// Whether the manual status INVISIBLE may be set.
    pub allow_invisible: bool,
    pub ws_rate: u32,
    pub ws_close_grace: std::time::Duration,
    pub ws_max_per_user: usize,
    pub ws_ping_interval: Duration,
    pub ws_idle_timeout: Duration,
    /// `PRESENCE_WS_LEASE_INTERVAL`, at most a quarter of the heartbeat timeout.
    pub ws_lease_interval: Duration,
    /// `PRESENCE_IDLE_TIMEOUT`: when a socket's activity goes to the owner at once.
    pub idle_timeout: Duration,
    pub ws_max_frame: usize,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (then 408).
    pub body_timeout: std::time::Duration,
    pub heartbeat_interval_ms: u64,
    pub styles: Vec<StatusStyle>,
    inflight: Arc<Semaphore>,
    /// How long a 429 is held back at most (`PRESENCE_RATE_LIMIT_DELAY`).
    pub rate_limit_delay: Duration,
}

impl Limits {
    pub fn from_config(c: &Config) -> Result<Limits, crate::config::ConfigError> {
        Ok(Limits {
            batch_limit: c.batch_limit as usize,
            max_subscriptions: c.max_subscriptions as usize,
            max_privacy_list: c.max_privacy_list as usize,
            allow_invisible: c.allow_invisible,
            ws_rate: c.ws_rate,
            ws_close_grace: c.ws_close_grace,
            ws_max_per_user: c.ws_max_per_user as usize,
            ws_ping_interval: c.ws_ping_interval,
            ws_idle_timeout: c.ws_idle_timeout,
            ws_lease_interval: c.ws_lease_interval.min(c.heartbeat_timeout / 4),
            idle_timeout: c.idle_timeout,
            ws_max_frame: c.ws_max_frame as usize,
            max_body_bytes: c.max_body_bytes as usize,
            body_timeout: c.http_body_timeout,
            heartbeat_interval_ms: c.heartbeat_interval.as_millis() as u64,
            styles: c.status_styles()?,
            inflight: Arc::new(Semaphore::new(c.max_inflight as usize)),
            rate_limit_delay: c.rate_limit_delay,
        })
    }
}

/// What a node serves over HTTP: the [`router`] behind the outermost layers (the request's
/// trace span, then [`CloseUnread`]), applied once around the whole router rather than to each
/// route, so a request clones and boxes no layer of them.
pub type App = tower_http::trace::Trace<
    CloseUnread<Router>,
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    tower_http::trace::DefaultMakeSpan,
>;

/// The HTTP surface of a node: the presence API (unless `with_api` is false, as on a shard,
/// which serves gRPC instead), health, and metrics unless `with_metrics` is false (they are
/// served on `PRESENCE_METRICS_LISTEN` by [`metrics_router`] instead).
///
/// Each API route has one middleware, [`api_request`], and the routes are registered at their
/// full paths (no `nest`): axum wraps every route in a boxed service per layer and clones the
/// whole chain at each level per request, so each layer more cost several allocations a request
/// (about fifty with the eight levels this router had).
pub fn router(state: AppState, with_api: bool, with_metrics: bool) -> App {
    let mut root = Router::new();
    if with_api {
        let at = |path: &str| format!("{BASE}{path}");
        root = root
            .route(&at("/online"), post(online))
            .route(&at("/offline"), post(offline))
            .route(&at("/heartbeat"), post(heartbeat))
            .route(&at("/status/batch"), post(batch))
            .route(
                &at("/status/{userId}"),
                get(status).put(set_status).delete(clear_status),
            )
            .route(&at("/statuses"), get(statuses))
            .route(
                &at("/subscriptions/{userId}"),
                get(get_subscriptions).put(put_subscriptions),
            )
            .route(&at("/privacy/{userId}"), get(get_privacy).put(put_privacy))
            .route(&at("/ws"), get(ws::upgrade))
            .route_layer(middleware::from_fn_with_state(state.clone(), api_request));
    }
    let mut ops = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz));
    if with_metrics {
        ops = ops.route("/metrics", get(metrics));
    }
    let ops = ops.route_layer(middleware::from_fn_with_state(state.clone(), track));
    let router = root
        .merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    tower::ServiceBuilder::new()
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
            ),
        )
        .layer(tower::layer::layer_fn(CloseUnread))
        .service(router)
}

/// The listener of `PRESENCE_METRICS_LISTEN`: `/metrics`, `/livez` and `/readyz` only.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON body: checks Content-Type and size, and names the field at fault on a bad shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        if !is_json(req.headers()) {
            return Err(Error::UnsupportedMediaType);
        }
        // Already read in full by `api_request` (this takes it back at once), within the limit.
        let bytes = read_body(req.into_body(), state.limits.max_body_bytes).await?;
        if bytes.trim_ascii_start().first() == Some(&b'[') {
            return Err(Error::BadRequest(
                "invalid request body: expected a JSON object".into(),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Error::BadRequest(format!("malformed JSON: {inner}"))
            } else if path == "." {
                Error::BadRequest(format!("invalid request body: {inner}"))
            } else {
                Error::BadRequest(format!("invalid field {path}: {inner}"))
            }
        })?;
        Ok(ApiJson(value))
    }
}

/// Whether the request says its body is JSON (`application/json` or `application/*+json`).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Whether the request announces a body (a non-zero length, or chunked).
fn has_body(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// The `{userId}` path segment; axum's own rejection (e.g. bad UTF-8) never leaks.
fn user_id_path(raw: Result<Path<String>, PathRejection>) -> Result<UserId, Error> {
    match raw {
        Ok(Path(raw)) => parse_user_id(&raw),
        Err(_) => Err(Error::BadRequest(
            "userId must be a positive 64-bit integer".into(),
        )),
    }
}

fn platform(raw: &str) -> Result<Platform, Error> {
    Platform::parse(raw)
        .ok_or_else(|| Error::BadRequest("platform must be one of WEB, IOS, ANDROID, PC".into()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OnlineRequest {
    user_id: u64,
    device_id: String,
    platform: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OfflineRequest {
    user_id: u64,
    device_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatRequest {
    user_id: u64,
    device_id: String,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchRequest {
    user_ids: Vec<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SetStatusRequest {
    pub status: Option<String>,
    pub custom_text: Option<String>,
    pub expires_at: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatAnswer {
    next_heartbeat_interval: u64,
}

async fn online(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<OnlineRequest>,
) -> Result<Response, Error> {
    let user = validate_user_id(req.user_id)?;
    let device = validate_device_id(&req.device_id)?;
    let platform = platform(&req.platform)?;
    s.auth.authorize(&who, user)?;
    let view = s.presence.online(user, &device, platform).await?;
    Ok(ok("上线成功", view))
}

async fn offline(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<OfflineRequest>,
) -> Result<Response, Error> {
    let user = validate_user_id(req.user_id)?;
    let device = validate_device_id(&req.device_id)?;
    s.auth.authorize(&who, user)?;
    s.presence.offline(user, &device, None).await?;
    Ok(ok("下线成功", ()))
}

async fn heartbeat(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Response, Error> {
    let user = validate_user_id(req.user_id)?;
    let device = validate_device_id(&req.device_id)?;
    s.auth.authorize(&who, user)?;
    s.presence.heartbeat(user, &device, req.active).await?;
    let answer = HeartbeatAnswer {
        next_heartbeat_interval: s.limits.heartbeat_interval_ms,
    };
    Ok(ok("心跳成功", answer))
}

/// The header with which a service token names the viewer a read is made for.
pub const VIEWER_HEADER: &str = "x-presence-viewer";

/// The `X-Presence-Viewer` header, if sent: taken alone, without copying the request's header
/// map (what the `HeaderMap` extractor does, at a few allocations a request).
pub struct ViewerHeader(Option<axum::http::HeaderValue>);

impl FromRequestParts<AppState> for ViewerHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ViewerHeader(parts.headers.get(VIEWER_HEADER).cloned()))
    }
}

/// Who looks, for a read: a user token's user; a service token's named viewer
/// (`X-Presence-Viewer`), or else the truth. A user token naming another viewer is refused: it
/// may not look through someone else's eyes.
fn viewer(s: &AppState, who: &Principal, header: &ViewerHeader) -> Result<Viewer, Error> {
    let named = match &header.0 {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| parse_user_id(v.trim()).ok())
                .ok_or_else(|| {
                    Error::BadRequest("X-Presence-Viewer must be a positive 64-bit integer".into())
                })?,
        ),
    };
    match (who.service, named, who.user) {
        (true, Some(v), _) => Ok(Viewer::User(v)),
        (true, None, _) => Ok(Viewer::Truth),
        (false, Some(v), Some(u)) if v != u => Err(s.auth.forbid()),
        (false, _, Some(u)) => Ok(Viewer::User(u)),
        (false, _, None) => Err(s.auth.forbid()),
    }
}

/// Any authenticated caller may read anyone's status, as the owner's privacy settings let it
/// see it (the OFFLINE view when hidden from it: never a refusal).
async fn status(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: ViewerHeader,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    let viewer = viewer(&s, &who, &headers)?;
    Ok(ok("success", s.presence.status(user, viewer).await?))
}

/// Any authenticated caller may read anyone's status, as in [`status`].
async fn batch(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: ViewerHeader,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, Error> {
    let viewer = viewer(&s, &who, &headers)?;
    let limit = s.limits.batch_limit;
    if req.user_ids.len() > limit {
        return Err(Error::BadRequest(format!(
            "userIds may hold at most {limit} ids"
        )));
    }
    for &id in &req.user_ids {
        validate_user_id(id)?;
    }
    Ok(ok(
        "success",
        s.presence.batch(&req.user_ids, viewer).await?,
    ))
}

/// The settings of a set-status request (REST or WebSocket), validated. INVISIBLE only when
/// `allow_invisible` (`PRESENCE_ALLOW_INVISIBLE`).
pub(crate) fn settings_of(
    req: &SetStatusRequest,
    allow_invisible: bool,
) -> Result<Settings, Error> {
    let manual = match req.status.as_deref() {
        None => None,
        Some(text) => match Status::parse(text) {
            Some(st @ (Status::Online | Status::Busy | Status::Away)) => Some(st),
            Some(Status::Invisible) if allow_invisible => Some(Status::Invisible),
            Some(Status::Invisible) => {
                return Err(Error::BadRequest(
                    "status INVISIBLE is turned off on this server".into(),
                ))
            }
            _ if allow_invisible => {
                return Err(Error::BadRequest(
                    "status must be one of ONLINE, BUSY, AWAY, INVISIBLE".into(),
                ))
            }
            _ => {
                return Err(Error::BadRequest(
                    "status must be one of ONLINE, BUSY, AWAY".into(),
                ))
            }
        },
    };
    let text = req
        .custom_text
        .as_deref()
        .map(validate_custom_text)
        .transpose()?;
    if manual.is_none() && text.is_none() {
        return Err(Error::BadRequest("status or customText is required".into()));
    }
    let expires_at = match req.expires_at.as_deref() {
        None => None,
        Some(t) => Some(
            parse_time(t)
                .ok_or_else(|| Error::BadRequest("expiresAt must be an RFC 3339 time".into()))?,
        ),
    };
    Ok(Settings {
        manual,
        text,
        expires_at,
    })
}

async fn set_status(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<SetStatusRequest>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    let settings = settings_of(&req, s.limits.allow_invisible)?;
    s.auth.authorize(&who, user)?;
    Ok(ok("success", s.presence.set_status(user, settings).await?))
}

/// Validates subscription targets against the limit.
pub(crate) fn targets_of(targets: &[u64], max: usize) -> Result<Vec<UserId>, Error> {
    if targets.len() > max {
        return Err(crate::store::too_many_subscriptions(max));
    }
    targets
        .iter()
        .map(|&t| {
            validate_user_id(t)
                .map_err(|_| Error::BadRequest("targets must hold positive 64-bit user ids".into()))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscribeRequest {
    targets: Vec<u64>,
    #[serde(default = "add_mode")]
    mode: SubscriptionMode,
}

fn add_mode() -> SubscriptionMode {
    SubscriptionMode::Add
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionsAnswer {
    user_id: UserId,
    targets: Vec<UserId>,
    /// The current status of every target (after add or replace; empty after remove).
    statuses: Vec<crate::presence::StatusView>,
}

async fn put_subscriptions(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: ViewerHeader,
    raw: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<SubscribeRequest>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    let targets = targets_of(&req.targets, s.limits.max_subscriptions)?;
    s.auth.authorize(&who, user)?;
    let viewer = viewer(&s, &who, &headers)?;
    let list = s.presence.subscribe(user, req.mode, &targets).await?;
    subscriptions_answer(&s, user, list, req.mode != SubscriptionMode::Remove, viewer).await
}

/// The subscription list of `user`, with the status view of every target (as `viewer` may see
/// it) when `views` is set.
async fn subscriptions_answer(
    s: &AppState,
    user: UserId,
    targets: Vec<UserId>,
    views: bool,
    viewer: Viewer,
) -> Result<Response, Error> {
    let statuses = if views {
        s.presence.views(&targets, viewer).await?
    } else {
        Vec::new()
    };
    Ok(ok(
        "success",
        SubscriptionsAnswer {
            user_id: user,
            targets,
            statuses,
        },
    ))
}

/// A user's subscriptions are theirs (and a service token's) to read.
async fn get_subscriptions(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: ViewerHeader,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    s.auth.authorize(&who, user)?;
    let viewer = viewer(&s, &who, &headers)?;
    let list = s.presence.subscriptions(user).await?;
    subscriptions_answer(&s, user, list, true, viewer).await
}

/// Unknown fields are refused: a misspelt field would otherwise reset a setting silently.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PrivacyRequest {
    visibility: Option<String>,
    allow: Option<Vec<u64>>,
    deny: Option<Vec<u64>>,
    last_seen: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PrivacyAnswer {
    user_id: UserId,
    visibility: Visibility,
    allow: Vec<UserId>,
    deny: Vec<UserId>,
    last_seen: LastSeen,
}

fn privacy_answer(user: UserId, p: Privacy) -> Response {
    ok(
        "success",
        PrivacyAnswer {
            user_id: user,
            visibility: p.visibility,
            allow: p.allow,
            deny: p.deny,
            last_seen: p.last_seen,
        },
    )
}

/// The settings of a privacy request, validated. A field left out takes its default: a `PUT`
/// replaces the settings whole.
fn privacy_of(req: &PrivacyRequest, max: usize) -> Result<Privacy, Error> {
    let visibility = match req.visibility.as_deref() {
        None => Visibility::default(),
        Some(v) => Visibility::parse(v).ok_or_else(|| {
            Error::BadRequest("visibility must be one of EVERYONE, CONTACTS, NOBODY".into())
        })?,
    };
    let last_seen = match req.last_seen.as_deref() {
        None => LastSeen::default(),
        Some(v) => LastSeen::parse(v).ok_or_else(|| {
            Error::BadRequest("lastSeen must be one of EXACT, COARSE, HIDDEN".into())
        })?,
    };
    let allow = req.allow.as_deref().unwrap_or_default();
    let deny = req.deny.as_deref().unwrap_or_default();
    for list in [allow, deny] {
        validate_privacy_list(list, max)?;
    }
    Ok(Privacy::new(visibility, last_seen, allow, deny))
}

/// A user's privacy settings are theirs (and a service token's) to read.
async fn get_privacy(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    s.auth.authorize(&who, user)?;
    Ok(privacy_answer(user, s.presence.privacy(user).await?))
}

/// A user's privacy settings are theirs (and a service token's) to change.
async fn put_privacy(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<PrivacyRequest>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    let privacy = privacy_of(&req, s.limits.max_privacy_list)?;
    s.auth.authorize(&who, user)?;
    Ok(privacy_answer(
        user,
        s.presence.set_privacy(user, privacy).await?,
    ))
}

async fn clear_status(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let user = user_id_path(raw)?;
    s.auth.authorize(&who, user)?;
    Ok(ok("success", s.presence.clear_status(user).await?))
}

async fn statuses(State(s): State<AppState>) -> Response {
    ok("success", &s.limits.styles)
}

async fn livez() -> Response {
    ok("success", serde_json::json!({ "live": true }))
}

async fn readyz(State(s): State<AppState>) -> Result<Response, Error> {
    let store_down = s.ready_needs_store && s.metrics.store.up.get() == 0;
    if !s.ready.load(Ordering::Relaxed) || store_down || !s.presence.healthy().await {
        s.metrics.ready.set(0);
        return Err(Error::NotReady);
    }
    s.metrics.ready.set(1);
    Ok(ok("success", serde_json::json!({ "ready": true })))
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(s): State<AppState>, method: Method, uri: axum::http::Uri) -> Error {
    record(&s.metrics, "unmatched", &method, "404", None);
    Error::NotFound(uri.path().chars().take(200).collect())
}

async fn method_not_allowed(State(s): State<AppState>, method: Method) -> Error {
    record(&s.metrics, "unmatched", &method, "405", None);
    Error::MethodNotAllowed
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

fn record(m: &Metrics, route: &str, method: &Method, code: &str, started: Option<Instant>) {
    let method = method_label(method);
    m.http
        .requests
        .get(HttpAnswer {
            route,
            method,
            code,
        })
        .inc();
    if let Some(t) = started {
        m.http
            .duration
            .get(HttpRoute { route, method })
            .observe(t.elapsed().as_secs_f64());
    }
}

/// The one middleware of every presence API route, in this order:
/// 1. [`read_json_body`]: a JSON body is read in full (408 and 413 refuse it);
/// 2. an in-flight slot is taken, or 503 at once when too many requests are in flight, instead
///    of queueing: a client that sends its body slowly holds no slot, so cannot starve others;
/// 3. [`Tracked`]: from here on the request is counted and timed by its route;
/// 4. [`authenticate`], then the handler, which decides what the caller may do;
/// 5. a 429 is held back, without the slot, for up to its Retry-After: a client that loops
///    without waiting sends one request per delay on each connection, not thousands.
///
/// One middleware rather than one layer each: axum boxes and clones each route layer per
/// request (see [`router`]).
async fn api_request(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let req = match read_json_body(&s, req).await {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let Ok(permit) = s.limits.inflight.try_acquire() else {
        s.metrics.http.refusals.get(HttpRefusal::Overloaded).inc();
        return Error::Overloaded.into_response();
    };
    let tracked = Tracked::begin(&req);
    let resp = match authenticate(&s, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    tracked.end(&s.metrics, &resp);
    drop(permit);
    if resp.status() == axum::http::StatusCode::TOO_MANY_REQUESTS {
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        tokio::time::sleep(retry.min(s.limits.rate_limit_delay)).await;
    }
    resp
}

/// Authenticates a request of the presence API (401 without a valid token when
/// `PRESENCE_AUTH=jwt`) and hands the handlers its [`Principal`]; each handler then decides
/// what that caller may do (the self-only rule, [`Auth::authorize`]). The WebSocket route also
/// takes the token from `Sec-WebSocket-Protocol`; no route takes it from the query string.
async fn authenticate(s: &AppState, mut req: Request) -> Result<Request, Error> {
    let websocket = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| p.as_str().ends_with("/ws"));
    let who = s.auth.authenticate(req.headers(), websocket).await?;
    req.extensions_mut().insert(who);
    Ok(req)
}

/// A request being counted and timed by its matched route.
struct Tracked {
    started: Instant,
    route: Option<MatchedPath>,
    method: Method,
}

impl Tracked {
    fn begin(req: &Request) -> Tracked {
        Tracked {
            started: Instant::now(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
        }
    }

    fn end(self, m: &Metrics, resp: &Response) {
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let code = resp.status();
        record(m, route, &self.method, code.as_str(), Some(self.started));
    }
}

/// Counts and times every matched request of the operations routes.
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let tracked = Tracked::begin(&req);
    let resp = next.run(req).await;
    tracked.end(&s.metrics, &resp);
    resp
}

/// The request with its JSON body read in full, within the body timeout (then 408) and the
/// size limit (then 413). A body that is not JSON is left unread: the handler refuses it (415)
/// without reading it.
async fn read_json_body(s: &AppState, req: Request) -> Result<Request, Error> {
    if !(has_body(req.headers()) && is_json(req.headers())) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let limit = s.limits.max_body_bytes;
    match tokio::time::timeout(s.limits.body_timeout, read_body(body, limit)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            s.metrics.http.refusals.get(HttpRefusal::BodyTimeout).inc();
            Err(Error::RequestTimeout)
        }
    }
}

/// The whole body, at most `limit` bytes.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, Error> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Error::BadRequest("could not read request body".into()))?;
        let len = first.as_ref().map_or(0, Bytes::len) + rest.len() + chunk.len();
        if len > limit {
            return Err(Error::PayloadTooLarge(limit));
        }
        match first.take() {
            None if rest.is_empty() => first = Some(chunk),
            None => rest.extend_from_slice(&chunk),
            Some(f) => {
                rest.extend_from_slice(&f);
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
}

/// The outermost layer but the trace span: an answer given without reading the request body
/// (404, 405, 408, 413, 415) closes the connection and says so, so keep-alive clients do not
/// reuse a connection the server is about to drop. A plain service (no boxed future): it wraps
/// every request.
#[derive(Clone)]
pub struct CloseUnread<S>(S);

/// What [`CloseUnread`] does to an answer (a function pointer: nothing to box).
type CloseIfUnread<E> = fn(Result<Response, E>) -> Result<Response, E>;

type CloseUnreadFuture<F, E> =
    futures::future::Either<futures::future::Map<F, CloseIfUnread<E>>, F>;

impl<S: tower::Service<Request, Response = Response>> tower::Service<Request> for CloseUnread<S> {
    type Response = Response;
    type Error = S::Error;
    type Future = CloseUnreadFuture<S::Future, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures::FutureExt;
        if has_body(req.headers()) {
            let close: CloseIfUnread<S::Error> = |r| r.map(close_if_unread);
            futures::future::Either::Left(self.0.call(req).map(close))
        } else {
            futures::future::Either::Right(self.0.call(req))
        }
    }
}

/// `resp`, saying `Connection: close` if it answers without having read the body.
fn close_if_unread(mut resp: Response) -> Response {
    if matches!(resp.status().as_u16(), 404 | 405 | 408 | 413 | 415) {
        resp.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}
