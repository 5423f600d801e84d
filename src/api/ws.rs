//! The WebSocket endpoint: `GET /api/v1/presence/ws?userId=..&deviceId=..&platform=..`.
//!
//! Opening it brings the device online; every client message counts as a heartbeat and as
//! activity; closing it takes the device offline after `PRESENCE_WS_CLOSE_GRACE` unless the
//! device reconnects meanwhile. Client messages are JSON with a `type` (`heartbeat`,
//! `setStatus`, `clearStatus`, `subscribe`, `unsubscribe`, `query`, `resume`) and an optional
//! `id` echoed in the `reply` or `error` (also when the rest of the message is malformed).
//! Server messages: `welcome`, `presence`, `reply`, `error`, and `subscriptions` (the list, once
//! loaded, after a welcome that could not include it). When the node shuts down every socket is
//! closed with 1001 and its device taken offline at once.
//!
//! With `PRESENCE_AUTH=jwt` the upgrade needs a token (`Authorization: Bearer`, or a
//! `bearer.<jwt>` subprotocol next to `presence.v1`, which the server then answers) whose `sub`
//! is the `userId` (or a service token). The socket closes with 4001 once the token is past its
//! `exp` plus `PRESENCE_WS_TOKEN_GRACE`, unless a `refresh` `{token}` brought a newer one; an
//! invalid refresh closes it with 4401.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{settings_of, targets_of, AppState, SetStatusRequest};
use crate::auth::{socket_deadline, Principal, WS_PROTOCOL};
use crate::error::Error;
use crate::metrics::{DrainOffline, WsMessage, WsRefusal};
use crate::presence::{parse_user_id, validate_device_id, Platform, UserId, Viewer};
use crate::push::hub::{Frame, Hub};
use crate::store::SubscriptionMode;

/// A client message larger than this gets an `error` reply (the socket stays up); frames and
/// messages over `PRESENCE_WS_MAX_FRAME` close it (1009) before they are buffered.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most bytes buffered for writing to one socket (a welcome with thousands of subscriptions).
const MAX_WRITE: usize = 1024 * 1024;
/// Close code for a socket past the per-user cap (`PRESENCE_WS_MAX_PER_USER`).
const CLOSE_TOO_MANY_SOCKETS: u16 = 4409;
/// Close code for a socket from which nothing arrived within `PRESENCE_WS_IDLE_TIMEOUT`.
const CLOSE_IDLE: u16 = 4408;
/// Close code for a frame over `PRESENCE_WS_MAX_FRAME`.
const CLOSE_TOO_BIG: u16 = 1009;
/// A text message that is not UTF-8 (RFC 6455 7.4.1).
const CLOSE_INVALID_DATA: u16 = 1007;
/// Any other violation of RFC 6455 by the client.
const CLOSE_PROTOCOL: u16 = 1002;
/// Replies queued for a client that does not read.
const REPLY_QUEUE: usize = 64;
/// Close code for a client that floods or does not read (policy violation).
const CLOSE_POLICY: u16 = 1008;
/// Close code when the node shuts down (Going Away).
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code when the socket's token expired (past `exp` plus the grace) without a refresh.
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code after a `refresh` with a token that is invalid or for another user.
const CLOSE_REFRESH_REFUSED: u16 = 4401;
/// Longest the close frame may take to write.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A draining node's `offline` ignores heartbeats of the device seen up to this long after its
/// socket stopped (they are the socket's own, still in flight); later ones are a reconnect.
const RECONNECT_MARGIN: Duration = Duration::from_millis(250);
/// First retry of a subscription list that could not be read for a welcome; then doubling.
const RELOAD_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between retries of the subscription list.
const RELOAD_MAX: Duration = Duration::from_secs(10);

/// Upgrades after validating the query; errors are the usual envelope.
pub async fn upgrade(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    let Query(q) = query.map_err(|_| Error::BadRequest("malformed query string".into()))?;
    let field = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let user = parse_user_id(field("userId"))?;
    let device = validate_device_id(field("deviceId"))?.to_string();
    let platform = Platform::parse(field("platform"))
        .ok_or_else(|| Error::BadRequest("platform must be one of WEB, IOS, ANDROID, PC".into()))?;
    // The token's user only (or a service token): 403 before anything happens.
    s.auth.authorize(&who, user)?;
    let ws = ws.map_err(|e| Error::BadRequest(format!("expected a WebSocket upgrade: {e}")))?;
    let hub = s
        .hub
        .clone()
        .ok_or_else(|| Error::NotFound("/api/v1/presence/ws".into()))?;
    if hub.is_closing() {
        // Draining: no new sockets.
        s.metrics.push.ws_refusals.get(WsRefusal::Draining).inc();
        return Err(Error::NotReady);
    }
    let max_frame = s.limits.ws_max_frame;
    if hub.sockets_of(user) >= s.limits.ws_max_per_user {
        // Past the cap: the socket opens and closes at once with 4409; the device is not
        // touched.
        s.metrics
            .push
            .ws_refusals
            .get(WsRefusal::TooManySockets)
            .inc();
        return Ok(ws
            .protocols([WS_PROTOCOL])
            .max_message_size(max_frame)
            .max_frame_size(max_frame)
            .on_upgrade(|mut socket| async move {
                let close = Message::Close(Some(CloseFrame {
                    code: CLOSE_TOO_MANY_SOCKETS,
                    reason: Utf8Bytes::from_static("too many sockets for this user"),
                }));
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(close)).await;
            }));
    }
    // The device is online before the socket opens: a refusal (e.g. too many devices) is an
    // ordinary HTTP error.
    s.presence.online(user, &device, platform).await?;
    Ok(ws
        // A browser sends its token as a subprotocol next to `presence.v1`: answer that one.
        .protocols([WS_PROTOCOL])
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        // Small buffers: presence frames are a few hundred bytes, and a gateway holds tens of
        // thousands of sockets (the defaults are 128 KiB each way).
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE)
        .on_upgrade(move |socket| {
            // Tracked, so that a shutdown waits for the socket's close and offline.
            let sessions = hub.sessions().clone();
            sessions.track_future(run(s, hub, who, user, device, platform, socket))
        }))
}

/// A token bucket: `rate` per second, bursts of twice that.
struct Bucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            tokens: 2.0 * rate as f64,
            rate: rate as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(2.0 * self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    custom_text: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    targets: Option<Vec<u64>>,
    #[serde(default)]
    user_ids: Option<Vec<u64>>,
    #[serde(default)]
    versions: Option<HashMap<String, u64>>,
    #[serde(default)]
    token: Option<String>,
}

fn reply(id: &Option<Value>, message: &str, data: Value) -> Frame {
    let v = json!({ "type": "reply", "id": id, "code": 200, "message": message, "data": data });
    Utf8Bytes::from(v.to_string())
}

fn error_frame(id: &Option<Value>, e: &Error) -> Frame {
    let v = json!({
        "type": "error",
        "id": id,
        "code": e.status().as_u16(),
        "message": e.public_message(),
        "data": Value::Null,
    });
    Utf8Bytes::from(v.to_string())
}

struct Socket {
    s: AppState,
    hub: Arc<Hub>,
    id: u64,
    user: UserId,
    device: String,
    platform: Platform,
    last_heartbeat: Instant,
    /// When the socket's token (plus the grace) runs out; `None`: never (no authentication).
    deadline: Option<tokio::time::Instant>,
    /// Set when a message ends the socket: the close code and reason.
    end: Option<(u16, &'static str)>,
}

async fn run(
    s: AppState,
    hub: Arc<Hub>,
    who: Principal,
    user: UserId,
    device: String,
    platform: Platform,
    socket: WebSocket,
) {
    let reg = hub.register(user, &device);
    let mut sock = Socket {
        s: s.clone(),
        hub: hub.clone(),
        id: reg.id,
        user,
        device,
        platform,
        last_heartbeat: Instant::now(),
        deadline: socket_deadline(&who, s.auth.ws_grace),
        end: None,
    };
    let m = s.metrics.clone();
    // The subscription list: from the store; failing that, the list this hub keeps for another
    // socket of the user; failing that, the welcome says it is missing and it is retried.
    let subscriptions = match s.presence.subscriptions(user).await {
        Ok(list) => {
            hub.set_subscriptions(user, &list, false);
            Some(list)
        }
        Err(e) => {
            tracing::warn!(user, reason = e.reason(), error = %e, "reading subscriptions for a socket failed");
            hub.subscriptions_of(user)
        }
    };
    let (reply_tx, mut reply_rx) = mpsc::channel::<Frame>(REPLY_QUEUE);
    // Ends the socket's helper tasks (the subscription reload).
    let done = CancellationToken::new();
    let mut welcome = json!({
        "type": "welcome",
        "data": {
            "userId": user,
            "deviceId": sock.device,
            "subscriptions": subscriptions,
            "nextHeartbeatInterval": s.limits.heartbeat_interval_ms,
        }
    });
    if subscriptions.is_none() {
        welcome["data"]["degraded"] = json!(["subscriptions"]);
        m.push.ws_degraded.inc();
        tokio::spawn(reload_subscriptions(
            s.clone(),
            hub.clone(),
            user,
            sock.id,
            reply_tx.clone(),
            done.clone(),
        ));
    }

    let (mut sink, mut stream) = socket.split();
    // The welcome goes first, before any event.
    let _ = sink
        .send(Message::Text(Utf8Bytes::from(welcome.to_string())))
        .await;

    // Writer: events and replies, until the socket closes, the hub cuts it off or the node
    // shuts down.
    let kill = reg.kill.clone();
    let closing = reg.closing.clone();
    let stop = CancellationToken::new();
    let stop_writer = stop.clone();
    // Ended by its token: expired, or refused on refresh. The code is set before the cancel.
    let auth_end = CancellationToken::new();
    let auth_end_writer = auth_end.clone();
    let auth_close = Arc::new(parking_lot::Mutex::new((
        CLOSE_TOKEN_EXPIRED,
        "token expired",
    )));
    let auth_close_writer = auth_close.clone();
    let mut events = reg.rx;
    let ping_every = s.limits.ws_ping_interval;
    let mut ping = (!ping_every.is_zero()).then(|| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let catching_up = reg.catching_up.clone();
    let (writer_hub, id) = (hub.clone(), sock.id);
    let writer = tokio::spawn(async move {
        // Why the server ends the socket, if it does: the close frame to send.
        let ending = || {
            if kill.is_cancelled() {
                Some((CLOSE_POLICY, "slow consumer"))
            } else if stop_writer.is_cancelled() {
                Some((CLOSE_POLICY, "rate limit exceeded"))
            } else if auth_end_writer.is_cancelled() {
                Some(*auth_close_writer.lock())
            } else if closing.is_cancelled() {
                Some((CLOSE_GOING_AWAY, "server shutting down"))
            } else {
                None
            }
        };
        loop {
            // Biased: an ending wins over anything still queued, so its close frame is sent.
            let msg = tokio::select! {
                biased;
                _ = kill.cancelled() => break,
                _ = stop_writer.cancelled() => break,
                _ = auth_end_writer.cancelled() => break,
                _ = closing.cancelled() => break,
                f = events.recv() => match f {
                    Some(f) => {
                        if catching_up.load(Ordering::Acquire) {
                            // Room in the queue: the next chunk of a resume's catch-up.
                            writer_hub.top_up(id);
                        }
                        Message::Text(f)
                    }
                    None => break,
                },
                f = reply_rx.recv() => match f { Some(f) => Message::Text(f), None => break },
                _ = tick(&mut ping) => Message::Ping(Default::default()),
            };
            let sent = tokio::select! {
                biased;
                _ = kill.cancelled() => false,
                _ = stop_writer.cancelled() => false,
                _ = auth_end_writer.cancelled() => false,
                _ = closing.cancelled() => false,
                r = sink.send(msg) => r.is_ok(),
            };
            if !sent {
                break;
            }
        }
        if let Some((code, reason)) = ending() {
            // A write never outlives an ending: a client that does not read would otherwise
            // hold the socket open forever once its TCP buffers are full.
            let close = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }));
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close)).await;
        }
    });

    let mut bucket = Bucket::new(s.limits.ws_rate);
    let idle = s.limits.ws_idle_timeout;
    let idle_at = || (!idle.is_zero()).then(|| tokio::time::Instant::now() + idle);
    let mut idle_deadline = idle_at();
    // Ends the socket with a close frame of the server's choosing.
    let end_with = |code: u16, reason: &'static str| {
        *auth_close.lock() = (code, reason);
        auth_end.cancel();
    };
    while let Some(msg) = tokio::select! {
        next = stream.next() => match next {
            Some(Ok(msg)) => Some(msg),
            Some(Err(e)) => {
                if is_too_big(&e) {
                    m.push.ws_refusals.get(WsRefusal::FrameTooLarge).inc();
                    end_with(CLOSE_TOO_BIG, "frame too large");
                } else if let Some((code, reason)) = protocol_close(&e) {
                    // RFC 6455 7.1.7: fail the connection with a Close frame, not a bare drop.
                    end_with(code, reason);
                }
                None
            }
            None => None,
        },
        _ = reg.kill.cancelled() => None,
        _ = reg.closing.cancelled() => None,
        _ = until(sock.deadline) => {
            end_with(CLOSE_TOKEN_EXPIRED, "token expired");
            None
        }
        _ = until(idle_deadline) => {
            m.push.ws_refusals.get(WsRefusal::IdleTimeout).inc();
            end_with(CLOSE_IDLE, "idle timeout");
            None
        }
    } {
        idle_deadline = idle_at();
        if !bucket.take() {
            m.push.slow_consumers.inc();
            m.push
                .ws_messages
                .get(WsMessage {
                    kind: "any",
                    result: "rate_limited",
                })
                .inc();
            stop.cancel();
            break;
        }
        let frame = match msg {
            Message::Text(t) => Some(sock.handle(t.as_str()).await),
            Message::Binary(_) => Some(error_frame(
                &None,
                &Error::BadRequest("binary messages are not supported".into()),
            )),
            Message::Ping(_) | Message::Pong(_) => {
                sock.touch(false).await;
                None
            }
            Message::Close(_) => break,
        };
        if let Some(end) = sock.end {
            *auth_close.lock() = end;
            auth_end.cancel();
            break;
        }
        if let Some(f) = frame {
            if reply_tx.try_send(f).is_err() {
                // The client sends but does not read its replies.
                m.push.slow_consumers.inc();
                reg.kill.cancel();
                break;
            }
        }
    }
    // From here on the socket hears nothing from its client: a heartbeat seen later for this
    // device came through another socket.
    let stopped = tokio::time::Instant::now();
    done.cancel();
    drop(reply_tx);
    // The socket leaves the hub at once; the writer may still be getting a close frame out to
    // a client that reads slowly.
    let generation = hub.unregister(sock.id, &sock.device);
    let _ = writer.await;
    // Read on briefly, so the client gets our close frame before the connection goes (closing
    // with unread input would reset it and lose the frame).
    let read_on = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    });
    let device = sock.device.clone();
    if hub.is_closing() {
        // The node is going away: the device goes offline now, not after the close grace.
        let offline = offline_on_drain(&s, &hub, user, &device, generation, stopped);
        let _ = tokio::join!(read_on, offline);
        return;
    }
    let _ = read_on.await;
    // Offline after the grace, unless the device came back meanwhile; at once if the node starts
    // shutting down meanwhile.
    let grace = s.limits.ws_close_grace;
    let drain_hub = hub.clone();
    hub.sessions().spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = drain_hub.closing().cancelled() => {
                offline_on_drain(&s, &drain_hub, user, &device, generation, stopped).await;
                return;
            }
        }
        if drain_hub.gone_since(user, &device, generation) {
            // Not if the device reconnected meanwhile, here or through another gateway: seen
            // since the socket stopped (whose own requests had all been answered by then), not
            // merely within the last `grace` (a reconnect right after the close is older).
            let since_stop = stopped.elapsed();
            if let Err(e) = s.presence.offline(user, &device, Some(since_stop)).await {
                tracing::warn!(user, error = %e, "offline after socket close failed");
            }
        }
    });
}

/// Whether a read failed on a frame or message over the size limit.
fn is_too_big(e: &axum::Error) -> bool {
    // tungstenite's capacity error ("Space limit exceeded: Message too long: ..."), by its text:
    // axum does not expose the type.
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long")
}

/// The Close frame for a client that broke the protocol (tungstenite's errors, by their text as
/// in [`is_too_big`]): 1007 for a text message that is not UTF-8, 1002 for any other protocol
/// violation (unmasked or reserved-bit frames, unknown opcodes, bad fragments or control
/// frames). `None` for I/O errors and a TCP reset: the connection is gone, no one to tell.
fn protocol_close(e: &axum::Error) -> Option<(u16, &'static str)> {
    let text = e.to_string();
    if text.contains("UTF-8 encoding error") {
        Some((CLOSE_INVALID_DATA, "invalid UTF-8"))
    } else if text.contains("WebSocket protocol error")
        && !text.contains("reset without closing handshake")
    {
        Some((CLOSE_PROTOCOL, "protocol error"))
    } else {
        None
    }
}

/// The next tick of `ping`; never without one.
async fn tick(ping: &mut Option<tokio::time::Interval>) {
    match ping {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A draining node takes the device of a closed socket offline at once (unless another socket
/// of the device is still open here), bounded in concurrency and by the drain deadline. A
/// heartbeat of the device seen since the socket stopped (a reconnect through another gateway)
/// keeps it online; the margin keeps this socket's own last heartbeats out of that window.
async fn offline_on_drain(
    s: &AppState,
    hub: &Hub,
    user: UserId,
    device: &str,
    generation: u64,
    stopped: tokio::time::Instant,
) {
    if !hub.gone_since(user, device, generation) {
        return;
    }
    let results = &s.metrics.push.ws_drain_offlines;
    let (Some(deadline), Some(_permit)) = (hub.drain_deadline(), hub.drain_permit().await) else {
        results.get(DrainOffline::Timeout).inc();
        tracing::warn!(user, "no time left to take a device offline while draining");
        return;
    };
    let unless_seen_within = stopped
        .elapsed()
        .checked_sub(RECONNECT_MARGIN)
        .filter(|d| !d.is_zero());
    match tokio::time::timeout_at(
        deadline,
        s.presence.offline(user, device, unless_seen_within),
    )
    .await
    {
        Ok(Ok(())) => results.get(DrainOffline::Ok).inc(),
        Ok(Err(e)) => {
            results.get(DrainOffline::Error).inc();
            tracing::warn!(user, reason = e.reason(), error = %e, "offline while draining failed");
        }
        Err(_) => {
            results.get(DrainOffline::Timeout).inc();
            tracing::warn!(user, "offline while draining timed out");
        }
    }
}

/// After a welcome without the subscription list: reloads it with a bounded backoff until it
/// loads or the socket ends, installs it in the hub (unless the hub got the list meanwhile, from
/// a subscription change or another socket of the user), and tells the client with a
/// `subscriptions` frame.
async fn reload_subscriptions(
    s: AppState,
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
    tx: mpsc::Sender<Frame>,
    done: CancellationToken,
) {
    let mut delay = RELOAD_FIRST;
    for attempt in 0u64.. {
        // Jitter (up to half the delay, from the socket id): sockets that failed together do
        // not retry together.
        let spread = delay.as_millis() as u64 / 2 + 1;
        let jitter =
            Duration::from_millis(id.wrapping_mul(7919).wrapping_add(attempt * 104_729) % spread);
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(delay + jitter) => {}
        }
        let list = match hub.subscriptions_of(user) {
            Some(list) => list,
            None => {
                let read = tokio::select! {
                    _ = done.cancelled() => return,
                    r = s.presence.subscriptions(user) => r,
                };
                match read {
                    Ok(list) => hub.install_loaded(user, &list),
                    Err(e) => {
                        tracing::debug!(
                            user,
                            reason = e.reason(),
                            attempt,
                            "reloading subscriptions failed"
                        );
                        delay = (delay * 2).min(RELOAD_MAX);
                        continue;
                    }
                }
            }
        };
        let frame = json!({ "type": "subscriptions", "data": { "subscriptions": list } });
        tokio::select! {
            _ = done.cancelled() => {}
            _ = tx.send(Utf8Bytes::from(frame.to_string())) => {}
        }
        return;
    }
}

impl Socket {
    /// Counts a message as a heartbeat (at most one a second unless it is a heartbeat).
    async fn touch(&mut self, active: bool) {
        if self.last_heartbeat.elapsed() < Duration::from_secs(1) {
            return;
        }
        let _ = self.heartbeat(active).await;
    }

    async fn heartbeat(&mut self, active: bool) -> Result<(), Error> {
        self.last_heartbeat = Instant::now();
        match self
            .s
            .presence
            .heartbeat(self.user, &self.device, active)
            .await
        {
            // The socket is open, so the device is online: bring it back.
            Err(Error::DeviceNotOnline) => self
                .s
                .presence
                .online(self.user, &self.device, self.platform)
                .await
                .map(|_| ()),
            r => r,
        }
    }

    async fn handle(&mut self, text: &str) -> Frame {
        let m = self.s.metrics.clone();
        if text.len() > MAX_MESSAGE {
            m.push
                .ws_messages
                .get(WsMessage {
                    kind: "oversized",
                    result: "error",
                })
                .inc();
            return error_frame(&None, &Error::PayloadTooLarge(MAX_MESSAGE));
        }
        // Leniently first: a message of the wrong shape still has its `id` echoed.
        let malformed = |id: &Option<Value>, e: Error| {
            m.push
                .ws_messages
                .get(WsMessage {
                    kind: "malformed",
                    result: "error",
                })
                .inc();
            error_frame(id, &e)
        };
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return malformed(&None, Error::BadRequest(format!("malformed message: {e}")));
            }
        };
        let id = value.get("id").filter(|v| !v.is_null()).cloned();
        let msg: ClientMessage = match serde_path_to_error::deserialize(&value) {
            Ok(m) => m,
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let message = if path == "." {
                    format!("malformed message: {inner}")
                } else {
                    format!("malformed message: invalid field {path}: {inner}")
                };
                return malformed(&id, Error::BadRequest(message));
            }
        };
        let kind = match msg.kind.as_str() {
            k @ ("heartbeat" | "setStatus" | "clearStatus" | "subscribe" | "unsubscribe"
            | "query" | "resume" | "refresh") => k,
            _ => "unknown",
        };
        let result = self.dispatch(kind, &msg).await;
        m.push
            .ws_messages
            .get(WsMessage {
                kind,
                result: if result.is_ok() { "ok" } else { "error" },
            })
            .inc();
        match result {
            Ok(f) => f,
            Err(e) => error_frame(&msg.id, &e),
        }
    }

    async fn dispatch(&mut self, kind: &str, msg: &ClientMessage) -> Result<Frame, Error> {
        let p = self.s.presence.clone();
        let max = self.s.limits.max_subscriptions;
        if kind != "heartbeat" {
            self.touch(true).await;
        }
        match kind {
            "heartbeat" => {
                self.heartbeat(msg.active.unwrap_or(true)).await?;
                let data = json!({ "nextHeartbeatInterval": self.s.limits.heartbeat_interval_ms });
                Ok(reply(&msg.id, "心跳成功", data))
            }
            "setStatus" => {
                let req = SetStatusRequest {
                    status: msg.status.clone(),
                    custom_text: msg.custom_text.clone(),
                    expires_at: msg.expires_at.clone(),
                };
                let settings = settings_of(&req, self.s.limits.allow_invisible)?;
                let view = p.set_status(self.user, settings).await?;
                Ok(reply(&msg.id, "success", json!(view)))
            }
            "clearStatus" => {
                let view = p.clear_status(self.user).await?;
                Ok(reply(&msg.id, "success", json!(view)))
            }
            "subscribe" | "unsubscribe" => {
                let targets = targets_of(msg.targets.as_deref().unwrap_or(&[]), max)?;
                let mode = if kind == "subscribe" { SubscriptionMode::Add } else { SubscriptionMode::Remove };
                let list = p.subscribe(self.user, mode, &targets).await?;
                self.hub.set_subscriptions(self.user, &list, true);
                let statuses = if kind == "subscribe" {
                    let views = p.views(&targets, Viewer::User(self.user)).await?;
                    self.hub.fresh(self.id, views.clone());
                    views
                } else {
                    Vec::new()
                };
                Ok(reply(&msg.id, "success", json!({ "targets": list, "statuses": statuses })))
            }
            "query" => {
                let ids = msg.user_ids.as_deref().unwrap_or(&[]);
                if ids.len() > self.s.limits.batch_limit {
                    return Err(Error::BadRequest(format!(
                        "userIds may hold at most {} ids",
                        self.s.limits.batch_limit
                    )));
                }
                let ids: Vec<UserId> = ids.iter().map(|&u| crate::presence::validate_user_id(u)).collect::<Result<_, _>>()?;
                Ok(reply(&msg.id, "success", json!(p.views(&ids, Viewer::User(self.user)).await?)))
            }
            "refresh" => {
                // A newer token for this socket: it must be valid and for this user (or a
                // service token); anything else ends the socket.
                let token = msg.token.as_deref().unwrap_or("");
                if !self.s.auth.enabled() {
                    return Err(Error::BadRequest("refresh needs PRESENCE_AUTH=jwt".into()));
                }
                let who = match self.s.auth.verify(token).await {
                    Ok(who) if who.may_act_for(self.user) => who,
                    Ok(_) => {
                        self.s.auth.count_forbidden();
                        self.end = Some((CLOSE_REFRESH_REFUSED, "token refused"));
                        return Err(Error::Forbidden);
                    }
                    Err(e) => {
                        self.end = Some((CLOSE_REFRESH_REFUSED, "token refused"));
                        return Err(e);
                    }
                };
                self.deadline = socket_deadline(&who, self.s.auth.ws_grace);
                Ok(reply(&msg.id, "success", json!({ "exp": who.exp })))
            }
            "resume" => {
                // What the client has seen; it then gets the current state of every target that
                // changed since (and of those it never saw), never an older one.
                // At most one entry per subscribed target, and the user itself.
                let limit = max + 1;
                if msg.versions.as_ref().is_some_and(|m| m.len() > limit) {
                    self.s.metrics.push.ws_refusals.get(WsRefusal::ResumeTooLarge).inc();
                    return Err(Error::BadRequest(format!(
                        "versions may hold at most {limit} entries"
                    )));
                }
                let versions: Vec<(UserId, u64)> = msg
                    .versions
                    .as_ref()
                    .map(|m| m.iter().filter_map(|(k, v)| Some((parse_user_id(k).ok()?, *v))).collect())
                    .unwrap_or_default();
                // The list as stored is the truth (this also loads it for a socket welcomed
                // without it).
                let targets = p.subscriptions(self.user).await?;
                self.hub.set_subscriptions(self.user, &targets, false);
                let views = p.views(&targets, Viewer::User(self.user)).await?;
                // Every view newer than the client has: the first chunk is queued now, the rest
                // as the client reads.
                let n = self.hub.resume(self.id, &versions, views);
                Ok(reply(&msg.id, "success", json!({ "sent": n })))
            }
            _ => Err(Error::BadRequest(
                "type must be one of heartbeat, setStatus, clearStatus, subscribe, unsubscribe, query, resume, refresh".into(),
            )),
        }
    }
}
