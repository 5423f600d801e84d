//! WebSocket faults of issue 10, each proved in-process (nodes started with `Node::builder` on
//! the memory store, clients with tokio-tungstenite and reqwest; no Redis, no child process):
//!
//! - defect 9: a `resume` larger than the socket queue catches every target up as the queue
//!   drains; a `resume` carrying too many versions is refused and counted;
//! - defect 11: a `welcome` after a failed subscription read says so, and the list follows in a
//!   `subscriptions` frame once it loads;
//! - defect 12: a malformed message gets its `id` back in the `error`;
//! - defect 10 (gateway half): on shutdown every socket gets a close frame with 1001 and its
//!   device is OFFLINE at once, on an all-in-one node and on a gateway in front of a shard.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use presence_service::config::Config;
use presence_service::membership::ManualDiscovery;
use presence_service::node::Node;
use presence_service::presence::{UserId, UserState};
use presence_service::store::faulty::FaultyStore;
use presence_service::store::{MemoryStore, Store};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

const API: &str = "/api/v1/presence";

// ---------------------------------------------------------------------------------------------
// Harness

/// A node running in this process.
struct Running {
    base: String,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Cancels the node's token (as SIGTERM does) and waits for `run` to return.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the node stops within its drain timeout")
            .expect("the node task")
            .expect("run returns Ok");
    }
}

async fn start(
    vars: &[(&str, &str)],
    store: Option<Arc<dyn Store>>,
    discovery: Option<Arc<ManualDiscovery>>,
) -> Running {
    let mut all = vec![("PRESENCE_LISTEN", "127.0.0.1:0"), ("RUST_LOG", "warn")];
    all.extend_from_slice(vars);
    let config = Config::from_vars(&all).expect("a valid config");
    let mut b = Node::builder(config);
    if let Some(s) = store {
        b = b.store(s);
    }
    if let Some(d) = discovery {
        b = b.discovery(d);
    }
    let node = b.bind().await.expect("the node binds");
    let base = format!("http://{}", node.local_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node.run(shutdown.clone()));
    Running {
        base,
        shutdown,
        task,
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = http().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("an HTTP answer");
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

async fn online(base: &str, user: UserId, device: &str) {
    let body = json!({"userId": user, "deviceId": device, "platform": "WEB"});
    let (code, v) = call(
        reqwest::Method::POST,
        format!("{base}{API}/online"),
        Some(body),
    )
    .await;
    assert_eq!(code, 200, "online: {v}");
}

async fn status(base: &str, user: UserId) -> (u16, Value) {
    let (code, v) = call(
        reqwest::Method::GET,
        format!("{base}{API}/status/{user}"),
        None,
    )
    .await;
    (code, v["data"].clone())
}

async fn subscribe_rest(base: &str, user: UserId, targets: &[UserId]) {
    let (code, v) = call(
        reqwest::Method::PUT,
        format!("{base}{API}/subscriptions/{user}"),
        Some(json!({"targets": targets})),
    )
    .await;
    assert_eq!(code, 200, "subscriptions: {v}");
}

async fn metrics(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A client socket and what it has received.
struct Ws {
    socket: Socket,
    welcome: Value,
    /// Every JSON frame after the welcome, in order.
    log: Vec<Value>,
    /// The close frame's code, once one came.
    closed: Option<Option<CloseCode>>,
}

impl Ws {
    async fn connect(base: &str, user: UserId, device: &str) -> Ws {
        let url = format!(
            "{}{API}/ws?userId={user}&deviceId={device}&platform=WEB",
            base.replacen("http", "ws", 1)
        );
        let (socket, resp) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("the upgrade");
        assert_eq!(resp.status().as_u16(), 101);
        let mut ws = Ws {
            socket,
            welcome: Value::Null,
            log: Vec::new(),
            closed: None,
        };
        let first = ws
            .next(Duration::from_secs(5))
            .await
            .expect("a welcome first");
        assert_eq!(first["type"], "welcome", "{first}");
        ws.welcome = first["data"].clone();
        ws.log.clear();
        ws
    }

    /// The next JSON frame (also logged), or `None` on timeout or close.
    async fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.closed.is_some() {
                return None;
            }
            let m = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("frames are JSON");
                    self.log.push(v.clone());
                    return Some(v);
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(frame.map(|f| f.code));
                    return None;
                }
                Some(Ok(_)) => continue,
                // A reset or an end without a close frame.
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return None;
                }
            }
        }
    }

    async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("sending");
    }

    /// Sends `msg` and returns the `reply` or `error` that echoes its `id`.
    async fn request(&mut self, msg: Value) -> Value {
        let id = msg["id"].clone();
        assert!(!id.is_null(), "requests carry an id");
        self.send_text(&msg.to_string()).await;
        self.answer_to(&id).await
    }

    async fn answer_to(&mut self, id: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(v) = self.next(Duration::from_millis(200)).await {
                if (v["type"] == "reply" || v["type"] == "error") && &v["id"] == id {
                    return v;
                }
            }
            assert!(self.closed.is_none(), "closed: {:?}", self.closed);
        }
        panic!("no answer with id {id}; got {:?}", self.log);
    }

    /// Reads until a close frame comes (or `within` runs out); returns its code.
    async fn wait_closed(&mut self, within: Duration) -> Option<Option<CloseCode>> {
        let deadline = Instant::now() + within;
        while self.closed.is_none() && Instant::now() < deadline {
            self.next(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
        self.closed
    }

    /// The `presence` frames received so far of `user`.
    fn presence(&self, user: UserId) -> Vec<Value> {
        self.log
            .iter()
            .filter(|v| v["type"] == "presence" && v["data"]["userId"] == user)
            .map(|v| v["data"].clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Defect 9: resume

/// A resume with more to send than the socket queue holds (30 targets, `PRESENCE_WS_QUEUE=4`)
/// sends every one of them as the client reads, says so in its reply, does not cut the socket
/// off, and live events keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_larger_than_the_socket_queue_catches_up_every_target() {
    let node = start(&[("PRESENCE_WS_QUEUE", "4")], None, None).await;
    let base = node.base.clone();
    let me: UserId = 1;
    let targets: Vec<UserId> = (100..130).collect();
    for &t in &targets {
        online(&base, t, "t").await;
    }
    subscribe_rest(&base, me, &targets).await;
    let mut ws = Ws::connect(&base, me, "d").await;
    assert_eq!(ws.welcome["subscriptions"], json!(targets));

    let r = ws
        .request(json!({"type": "resume", "id": "r", "versions": {}}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["data"]["sent"], 30, "{r}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while targets.iter().any(|&t| ws.presence(t).is_empty()) && Instant::now() < deadline {
        ws.next(Duration::from_millis(200)).await;
        assert!(ws.closed.is_none(), "cut off: {:?}", ws.closed);
    }
    let missing: Vec<UserId> = targets
        .iter()
        .copied()
        .filter(|&t| ws.presence(t).is_empty())
        .collect();
    assert!(missing.is_empty(), "never caught up: {missing:?}");
    for &t in &targets {
        assert_eq!(ws.presence(t).len(), 1, "target {t} sent twice");
    }

    // Live events still arrive, and the socket answers.
    let (code, v) = call(
        reqwest::Method::PUT,
        format!("{base}{API}/status/100"),
        Some(json!({"status": "BUSY"})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while ws.presence(100).len() < 2 && Instant::now() < deadline {
        ws.next(Duration::from_millis(200)).await;
    }
    assert_eq!(ws.presence(100).last().unwrap()["status"], "BUSY");
    let r = ws.request(json!({"type": "heartbeat", "id": 2})).await;
    assert_eq!(r["type"], "reply", "{r}");
    assert!(
        metrics(&base)
            .await
            .contains("presence_slow_consumers_total 0"),
        "a slow consumer was counted"
    );
    node.stop().await;
}

/// A resume may carry at most one version per subscription and one for the user itself
/// (`PRESENCE_MAX_SUBSCRIPTIONS` + 1); a larger one gets an `error` with its id and is counted
/// in `presence_ws_refusals_total{reason="resume_too_large"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_too_many_versions_is_refused_and_counted() {
    let node = start(&[("PRESENCE_MAX_SUBSCRIPTIONS", "10")], None, None).await;
    let mut ws = Ws::connect(&node.base, 1, "d").await;
    let versions = |n: u64| {
        let m: serde_json::Map<String, Value> =
            (0..n).map(|i| ((1000 + i).to_string(), json!(1))).collect();
        Value::Object(m)
    };
    let r = ws
        .request(json!({"type": "resume", "id": "ok", "versions": versions(11)}))
        .await;
    assert_eq!(r["type"], "reply", "at the limit: {r}");
    let r = ws
        .request(json!({"type": "resume", "id": "big", "versions": versions(12)}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_u64()),
        (Some("error"), Some(400)),
        "{r}"
    );
    let text = metrics(&node.base).await;
    assert!(
        text.contains(r#"presence_ws_refusals_total{reason="resume_too_large"} 1"#),
        "{}",
        text.lines()
            .filter(|l| l.contains("refusals"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 11: welcome after a failed subscription read

/// The subscription read fails when the socket opens: the welcome says `subscriptions: null`
/// and `degraded: ["subscriptions"]`; once the store answers again the server sends the list in
/// a `subscriptions` frame, and the subscribed targets' changes reach the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_says_when_the_subscription_list_could_not_be_read() {
    let store = FaultyStore::new(false);
    let node = start(&[], Some(store.clone()), None).await;
    let base = node.base.clone();
    let (me, target): (UserId, UserId) = (1, 2);
    subscribe_rest(&base, me, &[target]).await;

    store
        .faults()
        .fail_subscriptions
        .store(true, Ordering::SeqCst);
    let mut ws = Ws::connect(&base, me, "d").await;
    assert_eq!(ws.welcome["subscriptions"], Value::Null, "{}", ws.welcome);
    assert_eq!(
        ws.welcome["degraded"],
        json!(["subscriptions"]),
        "{}",
        ws.welcome
    );
    assert!(metrics(&base)
        .await
        .contains("presence_ws_degraded_welcomes_total 1"));

    // Still failing: nothing claims the list is there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    store
        .faults()
        .fail_subscriptions
        .store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut list = None;
    while list.is_none() && Instant::now() < deadline {
        if let Some(v) = ws.next(Duration::from_millis(200)).await {
            if v["type"] == "subscriptions" {
                list = Some(v["data"]["subscriptions"].clone());
            }
        }
    }
    assert_eq!(list, Some(json!([target])), "frames: {:?}", ws.log);

    // The hub has the list now: the target's change is pushed.
    online(&base, target, "t").await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while ws.presence(target).is_empty() && Instant::now() < deadline {
        ws.next(Duration::from_millis(200)).await;
    }
    assert_eq!(ws.presence(target)[0]["status"], "ONLINE", "{:?}", ws.log);
    node.stop().await;
}

/// A healthy welcome lists the subscriptions and says nothing about degradation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_welcome_is_not_degraded() {
    let node = start(&[], None, None).await;
    subscribe_rest(&node.base, 1, &[3, 2]).await;
    let ws = Ws::connect(&node.base, 1, "d").await;
    assert_eq!(ws.welcome["subscriptions"], json!([2, 3]));
    assert!(ws.welcome.get("degraded").is_none(), "{}", ws.welcome);
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 12: a malformed message keeps its id

/// A message of the right JSON but the wrong shape gets an `error` that echoes its `id` (a
/// number or a string), naming the field; a message that is not JSON gets `id: null`. The socket
/// stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_gets_its_id_back() {
    let node = start(&[], None, None).await;
    let mut ws = Ws::connect(&node.base, 1, "d").await;

    let e = ws
        .request(json!({"type": "setStatus", "id": 7, "status": 42}))
        .await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64(), e["id"].as_u64()),
        (Some("error"), Some(400), Some(7)),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("status"), "{e}");
    assert!(e["data"].is_null(), "{e}");

    let e = ws
        .request(json!({"type": "subscribe", "id": "s-1", "targets": "everyone"}))
        .await;
    assert_eq!(
        (e["code"].as_u64(), e["id"].as_str()),
        (Some(400), Some("s-1")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("targets"), "{e}");

    let e = ws.request(json!({"id": 9, "type": 5})).await;
    assert_eq!(
        (e["code"].as_u64(), e["id"].as_u64()),
        (Some(400), Some(9)),
        "{e}"
    );

    // Not JSON at all: nothing to echo.
    let n = ws.log.len();
    ws.send_text("{\"type\": \"heartbeat\", \"id\": 3, oops")
        .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while ws.log.len() == n && Instant::now() < deadline {
        ws.next(Duration::from_millis(200)).await;
    }
    let e = &ws.log[n];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(400)),
        "{e}"
    );
    assert!(e["id"].is_null(), "{e}");

    let r = ws.request(json!({"type": "heartbeat", "id": 10})).await;
    assert_eq!(r["type"], "reply", "{r}");
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 10, gateway half: SIGTERM

/// An all-in-one node shutting down sends each socket a close frame with 1001 and takes the
/// device offline before it exits (the store, written through, holds the device no more),
/// although the close grace (60 s) and the heartbeat timeout are far away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_an_all_in_one_node_closes_with_1001_and_takes_devices_offline() {
    let store = FaultyStore::new(true);
    let node = start(
        &[
            ("PRESENCE_WS_CLOSE_GRACE", "60s"),
            ("PRESENCE_DRAIN_TIMEOUT", "5s"),
        ],
        Some(store.clone()),
        None,
    )
    .await;
    let mut a = Ws::connect(&node.base, 1, "phone").await;
    let mut b = Ws::connect(&node.base, 2, "laptop").await;
    let online_devices = |s: Option<UserState>| s.map(|s| s.devices.len()).unwrap_or(0);
    let before = store.load(&[1, 2]).await.unwrap();
    assert_eq!(
        before.into_iter().map(online_devices).collect::<Vec<_>>(),
        vec![1, 1]
    );

    let stopping = tokio::spawn(node.stop());
    for ws in [&mut a, &mut b] {
        let code = ws.wait_closed(Duration::from_secs(5)).await;
        assert_eq!(code, Some(Some(CloseCode::Away)), "the close frame");
    }
    stopping.await.unwrap();
    let after = store.load(&[1, 2]).await.unwrap();
    for (user, s) in [1, 2].into_iter().zip(after) {
        let s = s.expect("a stored state");
        assert!(
            s.devices.is_empty(),
            "user {user} still has {:?}",
            s.devices
        );
        assert_eq!(s.status, presence_service::presence::Status::Offline);
    }
}

/// A gateway shutting down (a shard and a second gateway stay up, on one memory store) closes
/// its sockets with 1001, and the device reads OFFLINE through the other gateway right after,
/// not after the heartbeat timeout or the close grace. A subscriber on the other gateway is
/// told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_a_gateway_closes_with_1001_and_the_device_is_offline_at_once() {
    let grpc = format!("127.0.0.1:{}", common::node::free_ports(1)[0]);
    let members = || Arc::new(ManualDiscovery::new(vec![grpc.clone()]));
    let common = [
        ("PRESENCE_SHARDS", grpc.as_str()),
        ("PRESENCE_WS_CLOSE_GRACE", "60s"),
        ("PRESENCE_DRAIN_TIMEOUT", "5s"),
        ("PRESENCE_HEALTH_INTERVAL", "100ms"),
    ];
    let shard_vars: Vec<(&str, &str)> = common
        .iter()
        .copied()
        .chain([
            ("PRESENCE_ROLE", "shard"),
            ("PRESENCE_GRPC_LISTEN", grpc.as_str()),
            ("PRESENCE_ADVERTISE", grpc.as_str()),
        ])
        .collect();
    let gateway_vars: Vec<(&str, &str)> = common
        .iter()
        .copied()
        .chain([("PRESENCE_ROLE", "gateway")])
        .collect();
    let shard = start(&shard_vars, Some(MemoryStore::new()), Some(members())).await;
    let g1 = start(&gateway_vars, None, Some(members())).await;
    let g2 = start(&gateway_vars, None, Some(members())).await;
    // The shard owns its partitions and both gateways route to it.
    let deadline = Instant::now() + Duration::from_secs(15);
    for g in [&g1, &g2] {
        while status(&g.base, 99).await.0 != 200 {
            assert!(Instant::now() < deadline, "the cluster never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (me, watcher): (UserId, UserId) = (7, 8);
    let mut w = Ws::connect(&g2.base, watcher, "w").await;
    let r = w
        .request(json!({"type": "subscribe", "id": 1, "targets": [me]}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let mut ws = Ws::connect(&g1.base, me, "phone").await;
    assert_eq!(status(&g2.base, me).await.1["status"], "ONLINE");

    let stopping = tokio::spawn(g1.stop());
    let code = ws.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(code, Some(Some(CloseCode::Away)), "the close frame");
    stopping.await.unwrap();
    let (code, view) = status(&g2.base, me).await;
    assert_eq!(code, 200);
    assert_eq!(
        view["status"], "OFFLINE",
        "right after the gateway stopped: {view}"
    );
    assert_eq!(view["devices"], json!([]), "{view}");
    // The subscriber on the other gateway was told.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !w.presence(me).iter().any(|v| v["status"] == "OFFLINE") && Instant::now() < deadline {
        w.next(Duration::from_millis(200)).await;
    }
    assert!(
        w.presence(me).iter().any(|v| v["status"] == "OFFLINE"),
        "{:?}",
        w.log
    );
    g2.stop().await;
    shard.stop().await;
}
