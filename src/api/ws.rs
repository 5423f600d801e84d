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
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WireFrame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{lease, settings_of, targets_of, AppState, SetStatusRequest};
use crate::auth::{socket_deadline, Principal, WS_PROTOCOL};
use crate::error::Error;
use crate::metrics::{DrainOffline, WsMessage, WsRefusal};
use crate::presence::{parse_user_id, validate_device_id, Platform, UserId, Viewer};
use crate::push::hub::{Frame, Hub, Next, Outbox};
use crate::service::{new_session, Closed, Session};
use crate::store::SubscriptionMode;

/// A WebSocket over an upgraded HTTP/1.1 connection.
type Ws = WebSocketStream<TokioIo<Upgraded>>;
type WsSink = SplitSink<Ws, Message>;

/// A client message larger than this gets an `error` reply (the socket stays up); frames and
/// messages over `PRESENCE_WS_MAX_FRAME` close it (1009) before they are buffered.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most bytes buffered for writing to one socket (a welcome with thousands of subscriptions).
const MAX_WRITE: usize = 1024 * 1024;
/// tungstenite's read buffer: allocated with the socket and kept for its lifetime, and the most
/// read from the connection at once. Client messages are small (a heartbeat is ~40 bytes); a
/// larger one grows the buffer as it arrives, up to `PRESENCE_WS_MAX_FRAME`.
const READ_BUFFER: usize = 512;
/// Longest frame payload written: a longer message goes out in fragments of this size. The
/// write buffer keeps the capacity of the largest frame it ever held, for the socket's
/// lifetime, so this bounds it (a subscribe reply with 50 status views is ~9 KB).
const MAX_OUT_FRAME: usize = 1024;
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
/// Close code when the node shuts down (Going Away).
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code when the socket's token expired (past `exp` plus the grace) without a refresh.
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code after a `refresh` with a token that is invalid or for another user.
const CLOSE_REFRESH_REFUSED: u16 = 4401;
/// Longest a closing socket waits for a lease round that took its beat.
const LEASE_RELEASE_BOUND: Duration = Duration::from_secs(5);
/// Longest the close frame may take to write.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A draining node's `offline` ignores heartbeats of the device seen up to this long after its
/// socket stopped (they are the socket's own, still in flight); later ones are a reconnect.
const RECONNECT_MARGIN: Duration = Duration::from_millis(250);
/// What the close grace's `offline` adds to the time since its socket stopped: the shard
/// compares milliseconds (the device's last seen, its now, the window, each floored), which can
/// make a reconnect 2 ms after the stop look older than it.
const WINDOW_ROUNDING: Duration = Duration::from_millis(2);
/// Kept between the window and the socket's own last call. Flooring alone needs none (the
/// shard's floored last seen plus the floored window never passes its floored now); this is a
/// margin for the gateway and the shard measuring on monotonic clocks of their own.
const OWN_MARGIN: Duration = Duration::from_millis(1);

/// The close grace's `offline` leaves the device online if it was seen within this window: a
/// reconnect through another socket or gateway. That is any call the owner saw since the socket
/// stopped (`since_stop` ago; every call of its own had been answered by then), plus what the
/// shard's flooring can take off ([`WINDOW_ROUNDING`]), but never as far back as the socket's
/// own last call the owner answered (`since_own` ago, less [`OWN_MARGIN`]): a beat of its own
/// a millisecond before the close is not a reconnect. When the two are that close, a reconnect
/// within 2 ms after the stop may be missed: its device goes OFFLINE, and its next heartbeat is
/// told so (the safe side; the other would leave a closed device ONLINE until its timeout).
fn reconnect_window(since_stop: Duration, since_own: Duration) -> Duration {
    (since_stop + WINDOW_ROUNDING).min(since_own.saturating_sub(OWN_MARGIN))
}

/// The last time the owner may have seen the device through a socket, at the latest: its own
/// calls (`answered`) or its lease's last beat (`beat_ended`, from the release).
fn last_own_call(
    answered: tokio::time::Instant,
    beat_ended: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    beat_ended.map_or(answered, |t| t.max(answered))
}
/// First retry of a subscription list that could not be read for a welcome; then doubling.
const RELOAD_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between retries of the subscription list.
const RELOAD_MAX: Duration = Duration::from_secs(10);

/// Upgrades after validating the query; errors are the usual envelope.
pub async fn upgrade(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    // Before `ws`, which takes it out of the request: axum's extractor checks the request, and
    // the socket is built here (see `accept`).
    on_upgrade: Option<Extension<OnUpgrade>>,
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
    // Checked; the socket is ours to build.
    drop(ws);
    let Some(Extension(on_upgrade)) = on_upgrade else {
        return Err(Error::BadRequest(
            "expected a WebSocket upgrade: the connection cannot be upgraded".into(),
        ));
    };
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
        tokio::spawn(async move {
            if let Some(mut socket) = open(on_upgrade, max_frame).await {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::from(CLOSE_TOO_MANY_SOCKETS),
                    reason: Utf8Bytes::from_static("too many sockets for this user"),
                }));
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(close)).await;
            }
        });
        return Ok(switching(&headers));
    }
    // The device is online before the socket opens: a refusal (e.g. too many devices) is an
    // ordinary HTTP error.
    let session = new_session();
    s.presence
        .online_session(user, &device, platform, session)
        .await?;
    let deadline = socket_deadline(&who, s.auth.ws_grace);
    let sock = Socket {
        s,
        hub: hub.clone(),
        id: 0,
        user,
        device,
        platform,
        session,
        // The online above was activity.
        reported: tokio::time::Instant::now(),
        answered: tokio::time::Instant::now(),
        deadline,
        end: None,
    };
    // Tracked, so that a shutdown waits for the socket's close and offline.
    hub.sessions().spawn(run(sock, on_upgrade, max_frame));
    Ok(switching(&headers))
}

/// The `101 Switching Protocols` answer to an upgrade request that axum's extractor checked. A
/// browser sends its token as a subprotocol next to `presence.v1`: the answer names that one.
fn switching(headers: &HeaderMap) -> Response {
    let accept = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|p| p.trim_ascii() == WS_PROTOCOL.as_bytes());
    if offered {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_PROTOCOL),
        );
    }
    resp
}

/// The socket, once the connection is handed over (`None` if it never is).
///
/// Small buffers: presence frames are a few hundred bytes, and a gateway holds tens of
/// thousands of sockets (tungstenite's defaults are 128 KiB each way).
async fn open(on_upgrade: OnUpgrade, max_frame: usize) -> Option<Ws> {
    let upgraded = on_upgrade.await.ok()?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE);
    Some(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await)
}

/// Writes one text message: one frame, or fragments of [`MAX_OUT_FRAME`] when longer (so that
/// the socket's write buffer never grows past one fragment).
async fn send_text(sink: &mut WsSink, text: Utf8Bytes) -> Result<(), WsError> {
    if text.len() <= MAX_OUT_FRAME {
        return sink.send(Message::Text(text)).await;
    }
    let bytes = Bytes::from(text);
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + MAX_OUT_FRAME).min(bytes.len());
        let opcode = if at == 0 { Data::Text } else { Data::Continue };
        let frame = WireFrame::message(
            bytes.slice(at..end),
            OpCode::Data(opcode),
            end == bytes.len(),
        );
        sink.feed(Message::Frame(frame)).await?;
        at = end;
    }
    sink.flush().await
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
    /// This socket's registration of the device: its `offline` after the close does not apply
    /// once the device registered again (another socket, through any gateway).
    session: Session,
    /// When this socket's user's activity was last reported to the owner: at once, or marked
    /// for the lease's next round.
    reported: tokio::time::Instant,
    /// When the owner last answered a call of this socket's own that marks the device seen
    /// (its `online`, an activity reported at once); the lease's beats are the lease's.
    answered: tokio::time::Instant,
    /// When the socket's token (plus the grace) runs out; `None`: never (no authentication).
    deadline: Option<tokio::time::Instant>,
    /// Set when a message ends the socket: the close code and reason.
    end: Option<(u16, &'static str)>,
}

/// One socket, from the upgrade to the offline after its close. This future lives as long as
/// the socket, so it keeps little: every step but the wait for the next message (the upgrade,
/// the welcome, handling a message, the close) is boxed, and its memory freed once done.
async fn run(mut sock: Socket, on_upgrade: OnUpgrade, max_frame: usize) {
    // Each boxed step is boxed in a statement of its own: a future awaited where it is built
    // keeps its slot in this one even once moved to the heap.
    let opening = Box::pin(open(on_upgrade, max_frame));
    let Some(socket) = opening.await else {
        return;
    };
    let reg = sock.hub.register(sock.user, &sock.device);
    sock.id = reg.id;
    sock.s.leases.hold(
        sock.id,
        sock.user,
        &sock.device,
        sock.platform,
        sock.session,
    );
    let out = reg.out;
    let closing = reg.closing;
    let (mut sink, mut stream) = socket.split();
    // The welcome goes first, before any event.
    let welcoming = Box::pin(welcome(&sock, &out, &mut sink));
    let done = welcoming.await;

    // Writer: events and replies, until the socket closes, the hub cuts it off or the node
    // shuts down.
    let writer = tokio::spawn(write(
        sink,
        out.clone(),
        closing.clone(),
        sock.hub.clone(),
        sock.id,
        sock.s.limits.ws_ping_interval,
    ));

    let m = sock.s.metrics.clone();
    let mut bucket = Bucket::new(sock.s.limits.ws_rate);
    let idle = sock.s.limits.ws_idle_timeout;
    let idle_at = || (!idle.is_zero()).then(|| tokio::time::Instant::now() + idle);
    let mut idle_deadline = idle_at();
    while let Some(msg) = tokio::select! {
        next = stream.next() => match next {
            Some(Ok(msg)) => Some(msg),
            Some(Err(e)) => {
                if let Some((code, reason)) = close_for(&e) {
                    if code == CLOSE_TOO_BIG {
                        m.push.ws_refusals.get(WsRefusal::FrameTooLarge).inc();
                    }
                    // RFC 6455 7.1.7: fail the connection with a Close frame, not a bare drop.
                    out.end_with(code, reason);
                }
                None
            }
            None => None,
        },
        _ = out.ended() => None,
        _ = closing.cancelled() => None,
        // One timer for both deadlines: the token's and the idle timeout's.
        _ = until(earliest(sock.deadline, idle_deadline)) => {
            if sock.deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                out.end_with(CLOSE_TOKEN_EXPIRED, "token expired");
            } else {
                m.push.ws_refusals.get(WsRefusal::IdleTimeout).inc();
                out.end_with(CLOSE_IDLE, "idle timeout");
            }
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
            out.flooded();
            break;
        }
        let frame = match msg {
            Message::Text(t) => {
                let handling = Box::pin(sock.handle(t.as_str()));
                Some(handling.await)
            }
            Message::Binary(_) => Some(error_frame(
                &None,
                &Error::BadRequest("binary messages are not supported".into()),
            )),
            Message::Ping(_) | Message::Pong(_) => {
                let hearing = Box::pin(sock.heard(false));
                let _ = hearing.await;
                None
            }
            Message::Close(_) => break,
            // Never read: tungstenite assembles frames into messages.
            Message::Frame(_) => None,
        };
        if let Some((code, reason)) = sock.end {
            out.end_with(code, reason);
            break;
        }
        if let Some(f) = frame {
            if out.push_reply(f).is_err() {
                // The client sends but does not read its replies.
                m.push.slow_consumers.inc();
                out.kill();
                break;
            }
        }
    }
    let finishing = Box::pin(finish(sock, out, writer, stream, done));
    finishing.await;
}

/// The earlier of two optional deadlines.
fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Reads the subscription list, sends the welcome, and starts the retries of the list when it
/// could not be read (their stop is returned).
async fn welcome(sock: &Socket, out: &Arc<Outbox>, sink: &mut WsSink) -> Option<CancellationToken> {
    let (s, hub, user) = (&sock.s, &sock.hub, sock.user);
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
    // Ends the socket's helper task (the subscription reload).
    let mut done = None;
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
        s.metrics.push.ws_degraded.inc();
        let token = CancellationToken::new();
        tokio::spawn(reload_subscriptions(
            s.clone(),
            hub.clone(),
            user,
            sock.id,
            out.clone(),
            token.clone(),
        ));
        done = Some(token);
    }
    let _ = send_text(sink, Utf8Bytes::from(welcome.to_string())).await;
    done
}

/// The socket's writer: events and replies, a ping every `ping_every`, until the reader is
/// done, the server ends the socket (then with its close frame) or a write fails.
async fn write(
    mut sink: WsSink,
    out: Arc<Outbox>,
    closing: CancellationToken,
    hub: Arc<Hub>,
    id: u64,
    ping_every: Duration,
) {
    let next_ping = || (!ping_every.is_zero()).then(|| tokio::time::Instant::now() + ping_every);
    let mut ping_at = next_ping();
    loop {
        // An ending wins over anything still queued, so its close frame is sent.
        let msg = loop {
            if out.ending().is_some() || closing.is_cancelled() {
                break None;
            }
            match out.next() {
                Next::Frame(f, catching_up) => {
                    if catching_up {
                        // Room in the queue: the next chunk of a resume's catch-up.
                        hub.top_up(id);
                    }
                    break Some(Message::Text(f));
                }
                // The reader is done and nothing is left.
                Next::Done => break None,
                Next::Empty => {}
            }
            tokio::select! {
                biased;
                _ = closing.cancelled() => {}
                _ = out.writable() => {}
                _ = until(ping_at) => {
                    ping_at = next_ping();
                    break Some(Message::Ping(Bytes::new()));
                }
            }
        };
        let Some(msg) = msg else { break };
        // A write never outlives an ending: a client that does not read would otherwise hold
        // the socket open forever once its TCP buffers are full.
        let sent = tokio::select! {
            biased;
            _ = out.ended_for_writer() => false,
            _ = closing.cancelled() => false,
            r = async {
                match msg {
                    Message::Text(t) => send_text(&mut sink, t).await,
                    other => sink.send(other).await,
                }
            } => r.is_ok(),
        };
        if !sent {
            break;
        }
    }
    let ending = out.ending().or_else(|| {
        closing
            .is_cancelled()
            .then_some((CLOSE_GOING_AWAY, "server shutting down"))
    });
    out.close();
    if let Some((code, reason)) = ending {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close)).await;
    }
}

/// After the reader's loop: leaves the hub, waits for the writer's close frame, reads on
/// briefly, and takes the device offline after the close grace (at once when draining).
async fn finish(
    sock: Socket,
    out: Arc<Outbox>,
    writer: tokio::task::JoinHandle<()>,
    mut stream: SplitStream<Ws>,
    done: Option<CancellationToken>,
) {
    let user = sock.user;
    // The lease ends, once a beat of it in flight has arrived.
    let beat_ended = sock.s.leases.release(sock.id, LEASE_RELEASE_BOUND).await;
    // From here on the socket hears nothing from its client: a heartbeat seen later for this
    // device came through another socket.
    let stopped = tokio::time::Instant::now();
    let own = last_own_call(sock.answered, beat_ended);
    if let Some(done) = done {
        done.cancel();
    }
    // The writer sends what is queued, then stops.
    out.finish();
    // The socket leaves the hub at once; the writer may still be getting a close frame out to
    // a client that reads slowly.
    let generation = sock.hub.unregister(sock.id, &sock.device);
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
    let Socket {
        s,
        hub,
        device,
        session,
        ..
    } = sock;
    if hub.is_closing() {
        // The node is going away: the device goes offline now, not after the close grace.
        let offline = offline_on_drain(&s, &hub, user, &device, generation, session, stopped);
        let _ = tokio::join!(read_on, offline);
        return;
    }
    let _ = read_on.await;
    drop(stream);
    // Offline after the grace, unless the device came back meanwhile; at once if the node starts
    // shutting down meanwhile.
    let grace = s.limits.ws_close_grace;
    let drain_hub = hub.clone();
    hub.sessions().spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = drain_hub.closing().cancelled() => {
                offline_on_drain(&s, &drain_hub, user, &device, generation, session, stopped).await;
                return;
            }
        }
        if drain_hub.gone_since(user, &device, generation) {
            // Not if the device reconnected meanwhile, here or through another gateway:
            // - registered again under another session (an `online` that reached the owner
            //   first, however soon after the stop it came);
            // - or seen since the socket stopped, not merely within the last `grace`
            //   ([`reconnect_window`]).
            let closed = Closed {
                session,
                seen_within: Some(reconnect_window(stopped.elapsed(), own.elapsed())),
            };
            if let Err(e) = s.presence.offline(user, &device, Some(closed)).await {
                tracing::warn!(user, error = %e, "offline after socket close failed");
            }
        }
    });
}

/// The Close frame for a read that failed (`None` for I/O errors and a TCP reset: the
/// connection is gone, no one to tell): 1009 for a frame or message over the size limit, 1007
/// for a text message that is not UTF-8, 1002 for any other protocol violation (unmasked or
/// reserved-bit frames, unknown opcodes, bad fragments or control frames).
fn close_for(e: &WsError) -> Option<(u16, &'static str)> {
    match e {
        WsError::Capacity(_) => Some((CLOSE_TOO_BIG, "frame too large")),
        WsError::Utf8(_) => Some((CLOSE_INVALID_DATA, "invalid UTF-8")),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((CLOSE_PROTOCOL, "protocol error")),
        _ => None,
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
    session: Session,
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
        s.presence.offline(
            user,
            device,
            Some(Closed {
                session,
                seen_within: unless_seen_within,
            }),
        ),
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
    out: Arc<Outbox>,
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
        if !done.is_cancelled() {
            out.push_reply_unbounded(Utf8Bytes::from(frame.to_string()));
        }
        return;
    }
}

impl Socket {
    /// The client was heard from (any message, a pong); `active`: its user interacted. Liveness
    /// goes with the lease's next round ([`lease`]), and so does activity, unless the user may
    /// be idle on the owner by then ([`lease::report_now`]): that goes at once (at most once a
    /// second), so that an AWAY user turns ONLINE without waiting for a round.
    async fn heard(&mut self, active: bool) -> Result<(), Error> {
        let now = tokio::time::Instant::now();
        let limits = &self.s.limits;
        let due = active
            && lease::report_now(
                now,
                self.reported,
                limits.idle_timeout,
                limits.ws_lease_interval,
            );
        let at_once = due && now.saturating_duration_since(self.reported) >= Duration::from_secs(1);
        // Activity held back by the once-a-second limit goes with the round, and does not count
        // as reported: the next after the second goes at once.
        if active && (at_once || !due) {
            self.reported = now;
        }
        if !at_once {
            self.s.leases.heard(self.id, active);
            return Ok(());
        }
        let r = self.heartbeat().await;
        if r.is_err() {
            // The lease's next round tries again.
            self.s.leases.heard(self.id, true);
        }
        r
    }

    /// An active heartbeat, now; a device its owner no longer holds online comes back.
    async fn heartbeat(&mut self) -> Result<(), Error> {
        let r = self.beat_now().await;
        // Answered or failed, the owner may have seen the device until now (a call that timed
        // out over gRPC may still land later: a limit of the close grace's window).
        self.answered = tokio::time::Instant::now();
        r
    }

    async fn beat_now(&self) -> Result<(), Error> {
        let active = true;
        match self
            .s
            .presence
            .heartbeat(self.user, &self.device, active)
            .await
        {
            // The socket is open, so the device is online: bring it back, as this socket's
            // session (another would make the owner read this socket's close as superseded).
            Err(Error::DeviceNotOnline) => self
                .s
                .presence
                .online_session(self.user, &self.device, self.platform, self.session)
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
            let _ = self.heard(true).await;
        }
        match kind {
            "heartbeat" => {
                self.heard(msg.active.unwrap_or(true)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::presence::{Status, Viewer};
    use crate::service::Presence;
    use crate::shard::test_shard;

    /// Half a millisecond over, so that the shard's flooring of its now takes something off.
    const GRACE: Duration = Duration::from_micros(500_500);
    const SESSION: Session = 7;

    /// Which of a socket's own calls brought its device online last.
    #[derive(Clone, Copy)]
    enum Own {
        /// Its own call (the connect's `online`, an at-once heartbeat); its lease beat earlier.
        Call,
        /// Its lease's beat (a revive); its own calls earlier.
        Beat,
    }

    /// A device online as `SESSION` at 100.3 ms of the shard's clock, through its socket (`by`,
    /// the other of its call and its lease's beat 100 ms before), `own_before` the stop;
    /// another path's heartbeat `reconnect` after the stop, if any; and the close grace's
    /// `offline` a grace after the stop: the status it leaves, on paused time (sub-millisecond
    /// steps, which the shard floors).
    async fn after_close(by: Own, own_before: Duration, reconnect: Option<Duration>) -> Status {
        let shard = test_shard(
            Duration::from_secs(60),
            Duration::from_millis(100),
            Arc::new(Metrics::new()),
        );
        let earlier = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_micros(100_300)).await;
        shard
            .online_session(1, "d", Platform::Web, SESSION)
            .await
            .unwrap();
        let last = tokio::time::Instant::now();
        let own = match by {
            Own::Call => last_own_call(last, Some(earlier)),
            Own::Beat => last_own_call(earlier, Some(last)),
        };
        tokio::time::advance(own_before).await;
        let stopped = tokio::time::Instant::now();
        if let Some(r) = reconnect {
            tokio::time::advance(r).await;
            shard.heartbeat(1, "d", false).await.unwrap();
        }
        tokio::time::sleep_until(stopped + GRACE).await;
        let closed = Closed {
            session: SESSION,
            seen_within: Some(reconnect_window(stopped.elapsed(), own.elapsed())),
        };
        shard.offline(1, "d", Some(closed)).await.unwrap();
        shard.status(1, Viewer::Truth).await.unwrap().status
    }

    /// The socket's own last call or lease beat, even 0.7 ms before its close, is not a
    /// reconnect: the device goes OFFLINE after the grace (within the 2 ms that flooring adds
    /// to the window, it was read as one, and the device stayed ONLINE until its heartbeat
    /// timeout). A heartbeat through another path after the stop keeps it ONLINE: even 0.99 ms
    /// after (the stop on a whole millisecond, which flooring would take off) when the socket's
    /// own call was long before, 2 ms after when it came just before.
    #[tokio::test(start_paused = true)]
    async fn the_close_grace_tells_a_sockets_own_last_call_from_a_reconnect() {
        let us = Duration::from_micros;
        let (just_before, long_before) = (us(700), us(299_700));
        let reconnect = |after| Some(us(after));
        for by in [Own::Call, Own::Beat] {
            assert_eq!(after_close(by, just_before, None).await, Status::Offline);
            assert_eq!(after_close(by, us(3_000), None).await, Status::Offline);
            assert_eq!(after_close(by, long_before, None).await, Status::Offline);
            let cases = [
                (long_before, 990),
                (long_before, 100_000),
                (just_before, 2_000),
                (just_before, 100_000),
            ];
            for (own_before, after) in cases {
                assert_eq!(
                    after_close(by, own_before, reconnect(after)).await,
                    Status::Online,
                    "a reconnect {after} us after the stop"
                );
            }
        }
    }

    /// The window: since the stop plus 2 ms, never reaching back to the socket's own call.
    #[test]
    fn the_reconnect_window_stops_short_of_the_sockets_own_call() {
        let ms = Duration::from_millis;
        assert_eq!(reconnect_window(ms(500), ms(800)), ms(502));
        assert_eq!(reconnect_window(ms(500), ms(502)), ms(501));
        assert_eq!(
            reconnect_window(ms(500), ms(500) + Duration::from_micros(700)),
            Duration::from_micros(499_700)
        );
        assert_eq!(
            reconnect_window(Duration::ZERO, Duration::ZERO),
            Duration::ZERO
        );
    }
}
