//! Harness for the HTTP integration tests: starts the real `presence-service` binary as a child
//! process on a free loopback port and talks to it over HTTP. Every JSON answer is checked to be
//! the `{code, message, data}` envelope with `code` equal to the HTTP status.
//!
//! With `PRESENCE_TEST_TOPOLOGY=cluster`, a [`Server`] is a whole [`Cluster`] instead: 3 shards
//! and 2 gateways as separate processes with static discovery. Requests alternate between the
//! gateways, and metrics are summed over every process.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_presence-service");

/// How long a server may take to answer `/livez` after being spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A user id unique to this call (and, with high probability, to this test run), so tests can
/// run in parallel and even share a store.
pub fn uid() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64;
        // Below 2^53 so every id is exact in any JSON reader; never 0.
        (nanos % 1_000_000_000_000) * 1000 + 1
    });
    base + COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name unique to this process, for temporary files.
fn unique_name(prefix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}.log", std::process::id()))
}

/// The shared test store, if any: `PRESENCE_TEST_REDIS_URL` (set by `scripts/test.sh`), unless
/// `PRESENCE_TEST_HTTP_STORE=memory` asks for the HTTP suite on the embedded store.
pub fn test_redis_url() -> Option<String> {
    if std::env::var("PRESENCE_TEST_HTTP_STORE").is_ok_and(|v| v == "memory") {
        return None;
    }
    std::env::var("PRESENCE_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A command for the binary with a clean environment: no `PRESENCE_*` or OTLP variable of the
/// caller leaks in, so tests are hermetic; the shared test store is passed on when `redis` is set
/// and `PRESENCE_TEST_REDIS_URL` names one. Stdout is discarded, stderr goes to `stderr_file`.
pub fn command(envs: &[(&str, &str)], stderr_file: &std::path::Path, redis: bool) -> Command {
    let log = std::fs::File::create(stderr_file).expect("creating the stderr file");
    let mut cmd = clean_command(log);
    if let (true, Some(url)) = (redis, test_redis_url()) {
        cmd.env("PRESENCE_REDIS_URL", url);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// The binary with no `PRESENCE_*` or OTLP variable of the caller, `RUST_LOG=warn`, stdout
/// discarded and stderr into `log`.
fn clean_command(log: std::fs::File) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("PRESENCE_") || k.starts_with("OTEL_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    cmd
}

/// Waits for `child` to exit, up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("polling the child") {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary with `envs` (expected to be refused), returning its exit code and stderr.
pub fn run_to_exit(envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let log = unique_name("presence-test-exit");
    let mut cmd = command(envs, &log, false);
    if !envs.iter().any(|(k, _)| *k == "PRESENCE_LISTEN") {
        cmd.env("PRESENCE_LISTEN", "127.0.0.1:0");
    }
    let mut child = cmd.spawn().expect("spawning the server binary");
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let status = status.unwrap_or_else(|| panic!("binary did not exit; stderr:\n{stderr}"));
    (status.code(), stderr)
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("bound").port()
}

/// `GET /livez` over a plain socket; true on a 200.
fn livez(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = "GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// A running server process (or, with `PRESENCE_TEST_TOPOLOGY=cluster`, a running cluster).
/// Dropping it kills the process (by its own handle) and reaps it.
pub struct Server {
    /// The process, in the single-process topology.
    child: Option<Child>,
    /// The cluster, in the cluster topology.
    cluster: Option<Cluster>,
    /// `http://127.0.0.1:PORT`: the process, or the cluster's first gateway.
    pub base: String,
    /// Where requests go, in turn: the process, or every gateway of the cluster.
    bases: Vec<String>,
    next: AtomicUsize,
    client: reqwest::Client,
    /// For `raw`: one connection per request, so a connection the server closes after an
    /// early rejection (see `two_on_one_connection`) never poisons the pool of `client`.
    client_once: reqwest::Client,
    log: PathBuf,
    /// The server uses the shared test store, so process-wide gauges and counters also count
    /// what other servers (other tests) do through that store.
    pub shared_store: bool,
}

fn http_client(pooled: bool) -> reqwest::Client {
    let b = reqwest::Client::builder().timeout(Duration::from_secs(20));
    let b = if pooled {
        b
    } else {
        b.pool_max_idle_per_host(0)
    };
    b.build().expect("http client")
}

impl Server {
    /// Starts the binary on a free loopback port with `envs` added to its environment, and waits
    /// until `/livez` answers 200. It uses the shared test store when `PRESENCE_TEST_REDIS_URL`
    /// is set (unless `envs` names a store), else the embedded in-memory store.
    ///
    /// With `PRESENCE_TEST_TOPOLOGY=cluster`: starts 3 shards and 2 gateways with `envs`, on the
    /// shared Redis Cluster (required, see [`cluster_store`]), and waits until the ring settled.
    pub fn start(envs: &[(&str, &str)]) -> Server {
        Server::start_with(envs, true)
    }

    /// Like `start`, but always with a store of its own (the embedded in-memory one), for tests
    /// that assert exact process-wide metrics. In the cluster topology, every shard has its own
    /// in-memory store: the ring does not move once settled, so no user changes owner.
    pub fn start_private(envs: &[(&str, &str)]) -> Server {
        Server::start_with(envs, false)
    }

    fn start_with(envs: &[(&str, &str)], redis: bool) -> Server {
        if cluster_topology() {
            return Server::start_cluster(envs, redis);
        }
        let shared_store = envs.iter().any(|(k, _)| *k == "PRESENCE_REDIS_URL")
            || (redis && test_redis_url().is_some());
        let mut last_err = String::new();
        // A port picked free may be taken by someone else before the child binds it: retry.
        for _ in 0..3 {
            let port = free_port();
            let log = unique_name("presence-test");
            let listen = format!("127.0.0.1:{port}");
            let mut cmd = command(envs, &log, redis);
            cmd.env("PRESENCE_LISTEN", &listen);
            let child = cmd.spawn().expect("spawning the server binary");
            let base = format!("http://{listen}");
            let mut server = Server {
                child: Some(child),
                cluster: None,
                base: base.clone(),
                bases: vec![base],
                next: AtomicUsize::new(0),
                client: http_client(true),
                client_once: http_client(false),
                log,
                shared_store,
            };
            let until = Instant::now() + START_TIMEOUT;
            loop {
                if livez(port) {
                    return server;
                }
                let child = server.child.as_mut().expect("single process");
                if let Some(status) = child.try_wait().expect("polling the child") {
                    last_err = format!("exited with {status}; stderr:\n{}", server.stderr());
                    break; // probably lost the port: try another one
                }
                if Instant::now() >= until {
                    panic!(
                        "server did not answer /livez within {START_TIMEOUT:?}; stderr:\n{}",
                        server.stderr()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("server failed to start: {last_err}");
    }

    /// The cluster topology: 3 shards and 2 gateways with `envs`.
    fn start_cluster(envs: &[(&str, &str)], redis: bool) -> Server {
        let named = envs.iter().any(|(k, _)| *k == "PRESENCE_REDIS_URL");
        let store = if redis && !named {
            cluster_store()
        } else {
            None
        };
        let shared_store = named || store.is_some();
        let mut all: Vec<(&str, &str)> = CLUSTER_HTTP_DEFAULTS.to_vec();
        all.extend_from_slice(envs);
        let cluster = Cluster::start_opts(3, 2, 0, &all, store.as_deref());
        let bases: Vec<String> = (0..cluster.gateways()).map(|k| cluster.base(k)).collect();
        Server {
            child: None,
            base: bases[0].clone(),
            bases,
            next: AtomicUsize::new(0),
            client: http_client(true),
            client_once: http_client(false),
            log: unique_name("presence-test-unused"),
            shared_store,
            cluster: Some(cluster),
        }
    }

    /// The cluster behind this server, in the cluster topology.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The process id of the server (in the cluster topology: of the first gateway).
    pub fn pid(&self) -> u32 {
        match &self.cluster {
            Some(c) => c.pid(Proc::Gateway(0)).expect("the first gateway runs"),
            None => self.child.as_ref().expect("single process").id(),
        }
    }

    /// Everything the server wrote to stderr so far (in the cluster topology: every process).
    pub fn stderr(&self) -> String {
        match &self.cluster {
            Some(c) => c.stderr(),
            None => std::fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }

    /// Waits for the server process (in the cluster topology: the first gateway) to exit, up
    /// to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match &mut self.cluster {
            Some(c) => c.wait_exit(Proc::Gateway(0), timeout),
            None => wait_timeout(self.child.as_mut().expect("single process"), timeout),
        }
    }

    /// The base URL for the next request: the process, or the next gateway in turn.
    fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.pick(), path)
    }

    /// Sends a request and returns the status, the Content-Type and the body text.
    async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Option<String>, String) {
        self.send_with(&self.client, method, path, content_type, body)
            .await
    }

    async fn send_with(
        &self,
        client: &reqwest::Client,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Option<String>, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = client.request(method.clone(), self.url(path));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e:?}"));
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: reading the body failed: {e}"));
        (status, ct, text)
    }

    async fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| serde_json::to_vec(b).expect("serializable"));
        let ct = body.as_ref().map(|_| "application/json");
        let (status, ct_got, text) = self.send(method, path, ct, body).await;
        let v = assert_envelope(method, path, status, ct_got.as_deref(), &text);
        (status, v)
    }

    /// `GET path`; returns the status and the whole envelope.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.json("GET", path, None).await
    }

    /// `POST path` with a JSON body; returns the status and the whole envelope.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.json("POST", path, Some(&body)).await
    }

    /// `PUT path` with a JSON body; returns the status and the whole envelope.
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.json("PUT", path, Some(&body)).await
    }

    /// `DELETE path`; returns the status and the whole envelope.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.json("DELETE", path, None).await
    }

    /// Any method, any Content-Type (or none), any body bytes. The answer must still be the
    /// envelope; returns the status and the body text.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let (status, ct, text) = self
            .send_with(&self.client_once, method, path, content_type, Some(body))
            .await;
        assert_envelope(method, path, status, ct.as_deref(), &text);
        (status, text)
    }

    /// `GET path` without the envelope check (for `/metrics`): status, Content-Type, body. In
    /// the cluster topology, `/metrics` is the exposition of every process of the cluster, with
    /// the samples of each series summed.
    pub async fn text(&self, path: &str) -> (u16, Option<String>, String) {
        if let (Some(c), "/metrics") = (&self.cluster, path) {
            let mut texts = Vec::new();
            let mut content_type = None;
            for p in c.procs() {
                let (code, ct, text) = c.get_text(p, "/metrics").await;
                assert_eq!(code, 200, "{p:?} /metrics");
                content_type = content_type.or(ct);
                texts.push(text);
            }
            return (200, content_type, merge_expositions(&texts));
        }
        self.send("GET", path, None, None).await
    }

    /// Writes `request` (a whole HTTP/1.1 request, which should say `Connection: close`) to a
    /// plain socket and checks that the answer is the envelope: for what `reqwest` cannot send,
    /// such as a chunked body. Returns the status and the body text.
    pub fn raw_socket(&self, request: &[u8]) -> (u16, String) {
        let addr = self.pick().trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).expect("connecting to the server");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("socket timeout");
        // The server may answer (and close) before reading everything: ignore write errors.
        let _ = s.write_all(request);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no answer: {text:?}"));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(body)
        } else {
            body.to_owned()
        };
        let ct = header("content-type");
        assert_envelope("RAW", "(socket)", status, ct.as_deref(), &body);
        (status, body)
    }

    /// Sends `first` on a fresh connection and reads its answer (which must be the envelope);
    /// waits a moment, then sends `second` on the same connection. Returns the first answer's
    /// status and head, and the second's status or what went wrong.
    pub fn two_on_one_connection(
        &self,
        first: &[u8],
        second: &[u8],
    ) -> ((u16, String), Result<u16, String>) {
        let addr = self.pick().trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).expect("connecting to the server");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("socket timeout");
        let _ = s.write_all(first);
        let (status, head, body) = read_response(&mut s).expect("an answer to the first request");
        let ct = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        });
        assert_envelope("RAW", "(socket)", status, ct.as_deref(), &body);
        std::thread::sleep(Duration::from_millis(200));
        let second = match s.write_all(second) {
            Err(e) => Err(format!("writing the second request: {e}")),
            Ok(()) => read_response(&mut s).map(|(code, _, _)| code),
        };
        ((status, head), second)
    }

    /// `data` of `GET /api/v1/presence/status/{user}`, which must answer 200 "success".
    pub async fn status_of(&self, user: u64) -> Value {
        let (code, v) = self.get(&format!("/api/v1/presence/status/{user}")).await;
        assert_eq!(code, 200, "GET /status/{user}: {v}");
        assert_eq!(v["message"], "success");
        v["data"].clone()
    }

    /// The value of an unlabelled metric, or of the sample whose line starts with `series`
    /// (e.g. `presence_heartbeats_total{result="ok"}`). In the cluster topology: its sum over
    /// every process of the cluster.
    pub async fn metric(&self, series: &str) -> f64 {
        let (code, _, text) = self.text("/metrics").await;
        assert_eq!(code, 200);
        metric_value(&text, series)
            .unwrap_or_else(|| panic!("metric {series} not found in:\n{text}"))
    }
}

/// The value of the sample `series` in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Reads one HTTP/1.1 response with a Content-Length body: status, head, body.
fn read_response(s: &mut TcpStream) -> Result<(u16, String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("connection closed after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut body = buf[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while body.len() < len {
        match s.read(&mut chunk) {
            Ok(0) => return Err("connection closed inside the body".into()),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return; // a cluster cleans up after itself
        };
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            let err = self.stderr();
            if !err.is_empty() {
                eprintln!("--- server {} stderr ---\n{err}", self.base);
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Checks that `text` is the envelope: a JSON object with exactly `code` (equal to the HTTP
/// status), `message` (a string) and `data`, served as JSON; `data` is null on every error.
pub fn assert_envelope(
    method: &str,
    path: &str,
    status: u16,
    content_type: Option<&str>,
    text: &str,
) -> Value {
    let what = format!("{method} {path} -> {status}");
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text:?}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: body is not an object: {text}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "data", "message"],
        "{what}: envelope keys: {text}"
    );
    assert_eq!(
        obj["code"].as_u64(),
        Some(status as u64),
        "{what}: code != status: {text}"
    );
    let message = obj["message"].as_str();
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{what}: message: {text}"
    );
    if status != 200 {
        assert!(obj["data"].is_null(), "{what}: error with data: {text}");
    }
    let ct = content_type.unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?}: {text}"
    );
    v
}

/// The exposition of several processes as one: every sample of a series summed, in the order
/// series were first seen, under the `# HELP` and `# TYPE` lines of their family.
pub fn merge_expositions(texts: &[String]) -> String {
    struct Family {
        header: Vec<String>,
        order: Vec<String>,
        sums: std::collections::HashMap<String, f64>,
    }
    let mut families: Vec<Family> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split_whitespace().next().unwrap_or("").to_owned();
                let i = *index.entry(name).or_insert_with(|| {
                    families.push(Family {
                        header: Vec::new(),
                        order: Vec::new(),
                        sums: Default::default(),
                    });
                    families.len() - 1
                });
                let f = &mut families[i];
                if !f.header.iter().any(|h| h == line) {
                    f.header.push(line.to_owned());
                }
                current = Some(i);
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (Some(i), Ok(value)) = (current, value.parse::<f64>()) else {
                continue;
            };
            let f = &mut families[i];
            match f.sums.get_mut(series) {
                Some(sum) => *sum += value,
                None => {
                    f.order.push(series.to_owned());
                    f.sums.insert(series.to_owned(), value);
                }
            }
        }
    }
    let mut out = String::new();
    for f in families {
        for h in &f.header {
            out.push_str(h);
            out.push('\n');
        }
        for series in &f.order {
            let v = f.sums[series];
            if v.fract() == 0.0 && v.abs() < 1e15 {
                out.push_str(&format!("{series} {}\n", v as i64));
            } else {
                out.push_str(&format!("{series} {v}\n"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Clusters: shards and gateways as separate processes

/// Whether the HTTP suite runs through a cluster (`PRESENCE_TEST_TOPOLOGY=cluster`).
pub fn cluster_topology() -> bool {
    std::env::var("PRESENCE_TEST_TOPOLOGY").is_ok_and(|v| v == "cluster")
}

/// What every cluster of the HTTP suite's cluster topology runs with, before the test's own
/// variables: health checks twice a second, so a fresh cluster settles quickly.
const CLUSTER_HTTP_DEFAULTS: &[(&str, &str)] = &[("PRESENCE_HEALTH_INTERVAL", "500ms")];

/// The store of a cluster that needs Redis: the shared Redis Cluster. Missing,
/// `presence_service::store::test_redis_urls` fails the test (outside CI,
/// `PRESENCE_TEST_SKIP_REDIS=1` makes it `None`: the in-memory store).
/// `PRESENCE_TEST_HTTP_STORE=memory` asks for the in-memory store.
pub fn cluster_store() -> Option<String> {
    if std::env::var("PRESENCE_TEST_HTTP_STORE").is_ok_and(|v| v == "memory") {
        return None;
    }
    test_redis_url().or_else(presence_service::store::test_redis_urls)
}

/// How long a cluster may take to start and settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// One process of a [`Cluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proc {
    Shard(usize),
    Gateway(usize),
}

struct Member {
    /// HTTP port: `/livez`, `/readyz`, `/metrics` (and the API on a gateway).
    http: u16,
    /// gRPC port of a shard.
    grpc: Option<u16>,
    child: Option<Child>,
    /// How a process that stopped exited (after `wait_exit`).
    exited: Option<ExitStatus>,
    /// Times started.
    starts: u32,
    log: PathBuf,
}

impl Member {
    fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// Shards and gateways of the real binary as separate processes on loopback, with static
/// discovery (`PRESENCE_SHARDS` lists every shard, spares included, from the start: a shard
/// not running fails its health checks and is not a member until it starts). Dropping it kills
/// every process.
pub struct Cluster {
    shards: Vec<Member>,
    gateways: Vec<Member>,
    envs: Vec<(String, String)>,
    redis: Option<String>,
    /// `PRESENCE_SHARDS`.
    shard_list: String,
    client: reqwest::Client,
}

/// Free loopback ports, distinct from each other.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}

/// `GET path` over a plain socket (no pool, `Connection: close`): status and body.
pub fn http_get_blocking(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

impl Cluster {
    /// Starts `shards` shards and `gateways` gateways with `envs` (applied to every process),
    /// shards on the Redis Cluster `redis` (else each on its own in-memory store), and waits
    /// until the ring settled (see [`Cluster::wait_settled_blocking`]).
    pub fn start(
        shards: usize,
        gateways: usize,
        envs: &[(&str, &str)],
        redis: Option<&str>,
    ) -> Cluster {
        Cluster::start_opts(shards, gateways, 0, envs, redis)
    }

    /// Like `start`, with `spare` more shards declared in `PRESENCE_SHARDS` but not started:
    /// [`Cluster::add_shard`] starts them.
    pub fn start_opts(
        shards: usize,
        gateways: usize,
        spare: usize,
        envs: &[(&str, &str)],
        redis: Option<&str>,
    ) -> Cluster {
        assert!(shards > 0 && gateways > 0);
        let mut last_err = String::new();
        // A port picked free may be taken by someone else before a child binds it: retry.
        for _ in 0..3 {
            let total = shards + spare;
            let ports = free_ports(2 * total + gateways);
            let member = |http: u16, grpc: Option<u16>, name: String| Member {
                http,
                grpc,
                child: None,
                exited: None,
                starts: 0,
                log: unique_name(&format!("presence-cluster-{name}")),
            };
            let shard_members: Vec<Member> = (0..total)
                .map(|i| member(ports[2 * i], Some(ports[2 * i + 1]), format!("shard{i}")))
                .collect();
            let gateway_members: Vec<Member> = (0..gateways)
                .map(|k| member(ports[2 * total + k], None, format!("gateway{k}")))
                .collect();
            let shard_list = shard_members
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.grpc.expect("a shard")))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = Cluster {
                shards: shard_members,
                gateways: gateway_members,
                envs: envs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                redis: redis.map(str::to_owned),
                shard_list,
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .pool_max_idle_per_host(512)
                    .build()
                    .expect("http client"),
            };
            let mut procs: Vec<Proc> = (0..shards).map(Proc::Shard).collect();
            procs.extend((0..gateways).map(Proc::Gateway));
            for &p in &procs {
                cluster.spawn(p);
            }
            match cluster.wait_live(&procs, SETTLE_TIMEOUT) {
                Ok(()) => {
                    cluster.wait_settled_blocking(SETTLE_TIMEOUT);
                    return cluster;
                }
                Err(e) => last_err = e, // probably lost a port: try others
            }
        }
        panic!("cluster failed to start: {last_err}");
    }

    fn member(&self, p: Proc) -> &Member {
        match p {
            Proc::Shard(i) => &self.shards[i],
            Proc::Gateway(k) => &self.gateways[k],
        }
    }

    fn member_mut(&mut self, p: Proc) -> &mut Member {
        match p {
            Proc::Shard(i) => &mut self.shards[i],
            Proc::Gateway(k) => &mut self.gateways[k],
        }
    }

    fn spawn(&mut self, p: Proc) {
        let m = self.member(p);
        assert!(!m.running(), "{p:?} is running already");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("opening the stderr file");
        if m.starts > 0 {
            let _ = writeln!(log, "===== {p:?} restarted =====");
        }
        let out = log.try_clone().expect("cloning the log file");
        let mut cmd = clean_command(log);
        // Logs go to stdout: keep them, with anything on stderr, in the one file.
        cmd.stdout(Stdio::from(out)).env("NO_COLOR", "1");
        cmd.env("PRESENCE_DISCOVERY", "static")
            .env("PRESENCE_SHARDS", &self.shard_list);
        if let (Proc::Shard(_), Some(url)) = (p, &self.redis) {
            cmd.env("PRESENCE_REDIS_URL", url);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.env("PRESENCE_LISTEN", format!("127.0.0.1:{}", m.http));
        match (p, m.grpc) {
            (Proc::Shard(_), Some(grpc)) => {
                let addr = format!("127.0.0.1:{grpc}");
                cmd.env("PRESENCE_ROLE", "shard")
                    .env("PRESENCE_GRPC_LISTEN", &addr)
                    .env("PRESENCE_ADVERTISE", &addr);
            }
            _ => {
                cmd.env("PRESENCE_ROLE", "gateway");
            }
        }
        let child = cmd.spawn().expect("spawning the server binary");
        let m = self.member_mut(p);
        m.child = Some(child);
        m.exited = None;
        m.starts += 1;
    }

    /// Waits until every process of `procs` answers `/livez`.
    fn wait_live(&mut self, procs: &[Proc], timeout: Duration) -> Result<(), String> {
        let until = Instant::now() + timeout;
        let mut pending: Vec<Proc> = procs.to_vec();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for p in pending {
                if livez(self.member(p).http) {
                    continue;
                }
                let child = self.member_mut(p).child.as_mut().expect("started");
                if let Some(status) = child.try_wait().expect("polling the child") {
                    self.member_mut(p).child = None;
                    let err = format!("{p:?} exited with {status}; stderr:\n{}", self.stderr_of(p));
                    self.kill_all();
                    return Err(err);
                }
                still.push(p);
            }
            pending = still;
            if !pending.is_empty() {
                if Instant::now() >= until {
                    panic!(
                        "{pending:?} did not answer /livez within {timeout:?}\n{}",
                        self.stderr()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Declared shards (running or not).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    pub fn gateways(&self) -> usize {
        self.gateways.len()
    }

    /// The shards that run now.
    pub fn running_shards(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&i| self.shards[i].running())
            .collect()
    }

    /// Every process that runs now.
    pub fn procs(&self) -> Vec<Proc> {
        let mut v: Vec<Proc> = self.running_shards().into_iter().map(Proc::Shard).collect();
        v.extend(
            (0..self.gateways.len())
                .filter(|&k| self.gateways[k].running())
                .map(Proc::Gateway),
        );
        v
    }

    /// The address of shard `i` in the ring (`127.0.0.1:port`, its gRPC address).
    pub fn shard_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.shards[i].grpc.expect("a shard"))
    }

    /// The ring that the shards `members` make.
    pub fn ring_of(&self, members: &[usize]) -> presence_service::ring::Ring {
        presence_service::ring::Ring::new(members.iter().map(|&i| self.shard_addr(i)))
    }

    /// `http://127.0.0.1:PORT` of gateway `k`.
    pub fn base(&self, k: usize) -> String {
        format!("http://127.0.0.1:{}", self.gateways[k].http)
    }

    /// `http://127.0.0.1:PORT` of any process.
    pub fn http_base(&self, p: Proc) -> String {
        format!("http://127.0.0.1:{}", self.member(p).http)
    }

    /// An HTTP client with a large pool.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn pid(&self, p: Proc) -> Option<u32> {
        self.member(p).child.as_ref().map(Child::id)
    }

    /// Everything process `p` wrote (logs and stderr), over all its starts.
    pub fn stderr_of(&self, p: Proc) -> String {
        std::fs::read_to_string(&self.member(p).log).unwrap_or_default()
    }

    /// Every process's stderr, each under a heading.
    pub fn stderr(&self) -> String {
        let mut out = String::new();
        let mut all: Vec<Proc> = (0..self.shards.len()).map(Proc::Shard).collect();
        all.extend((0..self.gateways.len()).map(Proc::Gateway));
        for p in all {
            let m = self.member(p);
            if m.starts == 0 {
                continue;
            }
            out.push_str(&format!(
                "--- {p:?} (http {}, grpc {:?}, running {}) ---\n{}\n",
                m.http,
                m.grpc,
                m.running(),
                self.stderr_of(p)
            ));
        }
        out
    }

    /// SIGKILL of shard `i` (`Child::kill`), reaped.
    pub fn kill_shard(&mut self, i: usize) {
        let m = &mut self.shards[i];
        let mut child = m.child.take().expect("the shard runs");
        let _ = child.kill();
        m.exited = child.wait().ok();
    }

    /// Starts shard `i` again, on the same ports and with the same variables, and waits for its
    /// `/livez` (not for the ring: see `wait_settled`).
    pub fn restart_shard(&mut self, i: usize) {
        self.spawn(Proc::Shard(i));
        if let Err(e) = self.wait_live(&[Proc::Shard(i)], SETTLE_TIMEOUT) {
            panic!("restarting shard {i}: {e}");
        }
    }

    /// Starts the first declared shard that never ran (see `start_opts`), and waits for its
    /// `/livez`. Returns its index.
    pub fn add_shard(&mut self) -> usize {
        let i = (0..self.shards.len())
            .find(|&i| self.shards[i].starts == 0)
            .expect("a spare shard declared with start_opts");
        self.restart_shard(i);
        i
    }

    /// SIGTERM to shard `i`; see `wait_exit`.
    pub fn sigterm_shard(&self, i: usize) {
        let pid = self.pid(Proc::Shard(i)).expect("the shard runs");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Waits up to `timeout` for process `p` to exit; then it no longer counts as running.
    pub fn wait_exit(&mut self, p: Proc, timeout: Duration) -> Option<ExitStatus> {
        let m = self.member_mut(p);
        if m.child.is_none() {
            return m.exited;
        }
        let status = wait_timeout(m.child.as_mut().expect("running"), timeout)?;
        m.child = None;
        m.exited = Some(status);
        Some(status)
    }

    fn kill_all(&mut self) {
        for m in self.shards.iter_mut().chain(self.gateways.iter_mut()) {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                m.exited = child.wait().ok();
            }
        }
    }

    /// `GET path` of process `p`, without any check: status, Content-Type, body.
    pub async fn get_text(&self, p: Proc, path: &str) -> (u16, Option<String>, String) {
        let url = format!("{}{path}", self.http_base(p));
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url} ({p:?}): {e:?}"));
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url} ({p:?}): reading the body failed: {e}"));
        (status, ct, text)
    }

    /// The `/metrics` text of process `p`.
    pub async fn metrics(&self, p: Proc) -> String {
        let (code, _, text) = self.get_text(p, "/metrics").await;
        assert_eq!(code, 200, "{p:?} /metrics");
        text
    }

    /// The value of `series` on process `p` (see [`Server::metric`]); 0 when it has none.
    pub async fn metric(&self, p: Proc, series: &str) -> f64 {
        metric_value(&self.metrics(p).await, series).unwrap_or(0.0)
    }

    /// The sum of `series` over the running shards.
    pub async fn shard_sum(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for i in self.running_shards() {
            sum += self.metric(Proc::Shard(i), series).await;
        }
        sum
    }

    /// A JSON request through gateway `k`: the status and the whole envelope.
    pub async fn request(
        &self,
        k: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base(k));
        let mut req = self.client.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: request failed: {e:?}"));
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: reading the body failed: {e}"));
        let v = assert_envelope(method.as_str(), path, status, ct.as_deref(), &text);
        (status, v)
    }

    /// `GET path` through gateway `k`.
    pub async fn get(&self, k: usize, path: &str) -> (u16, Value) {
        self.request(k, reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body through gateway `k`.
    pub async fn post(&self, k: usize, path: &str, body: Value) -> (u16, Value) {
        self.request(k, reqwest::Method::POST, path, Some(&body))
            .await
    }

    /// Why the cluster is not settled, from the `/metrics` texts of the running processes
    /// (`None`: it did not answer): every running process has the ring of exactly the running
    /// shards (`presence_ring_members` and `presence_ring_epoch`), and the shards'
    /// `presence_owned_partitions` are all above 0 and sum to every partition.
    fn unsettled(&self, texts: &[(Proc, Option<String>)]) -> Option<String> {
        let running = self.running_shards();
        let ring = self.ring_of(&running);
        let (n, epoch) = (running.len() as f64, ring.epoch() as f64);
        let mut owned_sum = 0.0;
        let mut why = Vec::new();
        for (p, text) in texts {
            let Some(text) = text else {
                why.push(format!("{p:?}: no /metrics"));
                continue;
            };
            let get = |s: &str| metric_value(text, s).unwrap_or(f64::NAN);
            let (members, e) = (get("presence_ring_members"), get("presence_ring_epoch"));
            if members != n || e != epoch {
                why.push(format!(
                    "{p:?}: {members} members, epoch {e} (want {n}, {epoch})"
                ));
            }
            if let Proc::Shard(_) = p {
                let owned = get("presence_owned_partitions");
                if owned.is_nan() || owned <= 0.0 {
                    why.push(format!("{p:?}: owns {owned} partitions"));
                }
                owned_sum += owned;
            }
        }
        let all = presence_service::ring::PARTITIONS as f64;
        if owned_sum != all {
            why.push(format!("the shards own {owned_sum} of {all} partitions"));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Waits (blocking the thread) until the cluster settled (see `unsettled`); panics after
    /// `timeout` with what is not.
    pub fn wait_settled_blocking(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let texts: Vec<(Proc, Option<String>)> = self
                .procs()
                .into_iter()
                .map(|p| {
                    let text = http_get_blocking(self.member(p).http, "/metrics")
                        .filter(|(code, _)| *code == 200)
                        .map(|(_, t)| t);
                    (p, text)
                })
                .collect();
            let Some(why) = self.unsettled(&texts) else {
                return;
            };
            if Instant::now() >= until {
                panic!(
                    "cluster not settled after {timeout:?}: {why}\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like `wait_settled_blocking`, without blocking the thread. Returns how long it took.
    pub async fn wait_settled(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        let until = started + timeout;
        loop {
            let mut texts = Vec::new();
            for p in self.procs() {
                let url = format!("{}/metrics", self.http_base(p));
                let text = match self.client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.ok(),
                    _ => None,
                };
                texts.push((p, text));
            }
            let Some(why) = self.unsettled(&texts) else {
                return started.elapsed();
            };
            if Instant::now() >= until {
                panic!(
                    "cluster not settled after {timeout:?}: {why}\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("--- cluster stderr ---\n{}", self.stderr());
        }
        for m in self.shards.iter().chain(self.gateways.iter()) {
            let _ = std::fs::remove_file(&m.log);
        }
    }
}
