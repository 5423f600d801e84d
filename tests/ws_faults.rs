//! WebSocket faults of issue 10, each proved in-process (nodes started with `Node::builder` on
//! the memory store, clients with tokio-tungstenite and reqwest; no Redis, no child process):
//!
//! - defect 12: a malformed message gets its `id` back in the `error`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use presence_service::config::Config;
use presence_service::membership::ManualDiscovery;
use presence_service::node::Node;
use presence_service::presence::UserId;
use presence_service::store::Store;
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
