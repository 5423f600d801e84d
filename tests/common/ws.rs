//! The WebSocket client of the tests (tokio-tungstenite): a reader task logs every frame with
//! its arrival time; writes go through a writer task, so a keep-alive can share the socket.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

/// A JSON array of ids, sorted.
pub fn ids(v: &Value) -> Vec<u64> {
    let mut out: Vec<u64> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an id: {x}")))
        .collect();
    out.sort_unstable();
    out
}

/// `v`, sorted.
pub fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// The WebSocket path.
pub const WS: &str = "/api/v1/presence/ws";

/// `ws://HOST:PORT/api/v1/presence/ws?query` of the node at `base` (`http://HOST:PORT`).
pub fn ws_url(base: &str, query: &str) -> String {
    format!("{}{WS}?{query}", base.replacen("http://", "ws://", 1))
}

/// What the reader task saw.
pub enum Got {
    Frame(Value),
    /// The socket closed: the close code, if the server sent a close frame.
    Closed(Option<u16>),
}

/// A WebSocket client: a reader task logs every frame with its arrival time; writes go through
/// a writer task, so a keep-alive can share the socket.
pub struct Ws {
    what: String,
    out: mpsc::UnboundedSender<Message>,
    rx: mpsc::UnboundedReceiver<(Instant, Got)>,
    /// Every frame received, in order, with when it arrived.
    pub log: Vec<(Instant, Value)>,
    pub closed: Option<(Instant, Option<u16>)>,
    pub welcome: Value,
    /// The subprotocol the server selected (`Sec-WebSocket-Protocol` of its 101).
    pub protocol: Option<String>,
    next_id: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Ws {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Ws {
    /// Opens the socket of `user` on `device` at `base` and reads the welcome (which must come
    /// first, naming them).
    pub async fn connect(base: &str, user: u64, device: &str) -> Ws {
        let query = format!("userId={user}&deviceId={device}&platform=WEB");
        let ws = Ws::open(&ws_url(base, &query), &format!("socket of {user}/{device}")).await;
        let welcome = &ws.welcome;
        assert_eq!(welcome["userId"], user, "welcome: {welcome}");
        assert_eq!(welcome["deviceId"], device, "welcome: {welcome}");
        assert!(
            welcome["nextHeartbeatInterval"].as_u64().is_some(),
            "welcome: {welcome}"
        );
        ws
    }

    /// Opens the socket at `url` (it must upgrade: 101) and reads the first frame, which must be
    /// the `welcome`. `what` names the socket in messages.
    pub async fn open(url: &str, what: &str) -> Ws {
        let req = url.into_client_request().expect("a WebSocket URL");
        Ws::open_request(req, what).await
    }

    /// [`Ws::open`] with a request of the caller's (headers: `Authorization`,
    /// `Sec-WebSocket-Protocol`).
    pub async fn open_request(req: Request, what: &str) -> Ws {
        let url = req.uri().to_string();
        let (stream, resp) = tokio_tungstenite::connect_async(req)
            .await
            .unwrap_or_else(|e| panic!("connecting {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 101, "{url}");
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (mut sink, mut stream) = stream.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let reader = tokio::spawn(async move {
            loop {
                let got = match stream.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("a frame is not JSON ({e}): {t}"));
                        Got::Frame(v)
                    }
                    Some(Ok(Message::Close(f))) => Got::Closed(f.map(|f| u16::from(f.code))),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => Got::Closed(None),
                };
                let done = matches!(got, Got::Closed(_));
                if tx.send((Instant::now(), got)).is_err() || done {
                    break;
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let mut ws = Ws {
            what: what.to_owned(),
            out,
            rx,
            log: Vec::new(),
            closed: None,
            welcome: Value::Null,
            protocol,
            next_id: 0,
            tasks: vec![reader, writer],
        };
        let (_, first) = ws
            .wait(Duration::from_secs(5), "the welcome", |log| {
                log.first().cloned()
            })
            .await;
        assert_eq!(first["type"], "welcome", "the first frame: {first}");
        ws.welcome = first["data"].clone();
        ws
    }

    /// Sends the upgrade `req`, which the server must refuse with the envelope: the status,
    /// the envelope and the answer's `WWW-Authenticate`.
    pub async fn refused(req: Request) -> (u16, Value, Option<String>) {
        use tokio_tungstenite::tungstenite::Error;
        let url = req.uri().to_string();
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => panic!("{url}: upgraded, expected a refusal"),
            Err(Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned();
                let ct = header("content-type");
                let v = super::http::assert_envelope("GET", &url, status, ct.as_deref(), &body);
                (status, v, header("www-authenticate"))
            }
            Err(e) => panic!("{url}: {e}"),
        }
    }

    /// Takes in whatever arrived.
    pub fn pump(&mut self) {
        while let Ok(got) = self.rx.try_recv() {
            self.take(got);
        }
    }

    fn take(&mut self, (at, got): (Instant, Got)) {
        match got {
            Got::Frame(v) => self.log.push((at, v)),
            Got::Closed(code) => {
                self.closed.get_or_insert((at, code));
            }
        }
    }

    /// Waits until `found` finds something in the log; panics after `timeout` or on a close.
    pub async fn wait<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut found: impl FnMut(&[(Instant, Value)]) -> Option<T>,
    ) -> T {
        let until = Instant::now() + timeout;
        loop {
            self.pump();
            if let Some(t) = found(&self.log) {
                return t;
            }
            if let Some((_, code)) = self.closed {
                panic!(
                    "{}: closed (code {code:?}) while waiting for {what}; frames: {:?}",
                    self.what,
                    self.frames()
                );
            }
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(got)) => self.take(got),
                Ok(None) => {
                    self.closed.get_or_insert((Instant::now(), None));
                }
                Err(_) => panic!(
                    "{}: no {what} within {timeout:?}; frames: {:?}",
                    self.what,
                    self.frames()
                ),
            }
        }
    }

    /// Every frame so far, for messages.
    pub fn frames(&self) -> Vec<&Value> {
        self.log.iter().map(|(_, v)| v).collect()
    }

    /// Reads for `d` without expecting anything.
    pub async fn quiet(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
        self.pump();
    }

    pub fn send(&self, m: Message) {
        let _ = self.out.send(m);
    }

    pub fn send_json(&self, v: &Value) {
        self.send(Message::Text(v.to_string().into()));
    }

    /// Sends `msg` with a fresh `id` and returns the `reply` or `error` that echoes it.
    pub async fn request(&mut self, mut msg: Value) -> Value {
        self.next_id += 1;
        let id = format!("req-{}", self.next_id);
        msg["id"] = json!(id);
        self.send_json(&msg);
        let what = format!("the answer to {msg}");
        let (_, v) = self
            .wait(Duration::from_secs(5), &what, |log| {
                log.iter()
                    .find(|(_, v)| {
                        (v["type"] == "reply" || v["type"] == "error") && v["id"] == id.as_str()
                    })
                    .cloned()
            })
            .await;
        v
    }

    /// The next `error` frame after the first `skip` frames.
    pub async fn next_error(&mut self, skip: usize, what: &str) -> Value {
        let (_, v) = self
            .wait(Duration::from_secs(5), what, |log| {
                log.iter()
                    .skip(skip)
                    .find(|(_, v)| v["type"] == "error")
                    .cloned()
            })
            .await;
        v
    }

    /// A heartbeat that must succeed: the socket is still up and answers.
    pub async fn heartbeat(&mut self) {
        let r = self
            .request(json!({"type": "heartbeat", "active": true}))
            .await;
        assert_eq!(r["type"], "reply", "heartbeat: {r}");
        assert_eq!(r["code"], 200, "heartbeat: {r}");
        assert!(r["data"]["nextHeartbeatInterval"].as_u64().is_some(), "{r}");
    }

    /// Sends a heartbeat every `every` from now on (the replies are logged and ignored).
    pub fn keepalive(&mut self, every: Duration) {
        let out = self.out.clone();
        self.tasks.push(tokio::spawn(async move {
            let msg = json!({"type": "heartbeat", "id": "keepalive", "active": true}).to_string();
            loop {
                tokio::time::sleep(every).await;
                if out.send(Message::Text(msg.clone().into())).is_err() {
                    break;
                }
            }
        }));
    }

    /// `subscribe` to `targets`: checks the reply and returns it.
    pub async fn subscribe(&mut self, targets: &[u64]) -> Value {
        let r = self
            .request(json!({"type": "subscribe", "targets": targets}))
            .await;
        assert_eq!(r["type"], "reply", "subscribe: {r}");
        assert_eq!(r["code"], 200, "subscribe: {r}");
        assert_eq!(r["message"], "success", "subscribe: {r}");
        let listed = ids(&r["data"]["targets"]);
        for t in targets {
            assert!(listed.contains(t), "subscribe: {t} not in the list: {r}");
        }
        let statuses: Vec<u64> = r["data"]["statuses"]
            .as_array()
            .expect("statuses")
            .iter()
            .map(|s| s["userId"].as_u64().expect("userId"))
            .collect();
        assert_eq!(
            sorted(&statuses),
            sorted(targets),
            "statuses of the targets: {r}"
        );
        r
    }

    /// The `presence` frames about `user`, in arrival order.
    pub fn presence(&self, user: u64) -> Vec<(Instant, Value)> {
        self.log
            .iter()
            .filter(|(_, v)| v["type"] == "presence" && v["data"]["userId"] == user)
            .map(|(t, v)| (*t, v["data"].clone()))
            .collect()
    }

    /// The first `presence` frame of `user` matching `pred`: when it arrived and its `data`.
    pub async fn wait_presence(
        &mut self,
        user: u64,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let what = format!("a presence event of {user} ({what})");
        self.wait(timeout, &what, |log| {
            log.iter()
                .find(|(_, v)| {
                    v["type"] == "presence" && v["data"]["userId"] == user && pred(&v["data"])
                })
                .map(|(t, v)| (*t, v["data"].clone()))
        })
        .await
    }

    pub async fn wait_status(
        &mut self,
        user: u64,
        status: &str,
        timeout: Duration,
    ) -> (Instant, Value) {
        self.wait_presence(user, status, timeout, |d| d["status"] == status)
            .await
    }

    /// Waits for the socket to close; returns the close code the server sent, if any.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<(Instant, Option<u16>)> {
        let until = Instant::now() + timeout;
        loop {
            self.pump();
            if self.closed.is_some() {
                return self.closed;
            }
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(got)) => self.take(got),
                Ok(None) => {
                    self.closed.get_or_insert((Instant::now(), None));
                }
                Err(_) => return None,
            }
        }
    }

    /// A clean close from the client side (close frame, then the server's answer).
    pub async fn close(mut self) {
        self.send(Message::Close(None));
        let _ = self.wait_closed(Duration::from_secs(3)).await;
    }
}
