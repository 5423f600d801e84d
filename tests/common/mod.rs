//! Harness for the HTTP integration tests: starts the real `presence-service` binary as a child
//! process on a free loopback port and talks to it over HTTP. Every JSON answer is checked to be
//! the `{code, message, data}` envelope with `code` equal to the HTTP status.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("PRESENCE_") || k.starts_with("OTEL_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("RUST_LOG", "warn");
    if let (true, Some(url)) = (redis, test_redis_url()) {
        cmd.env("PRESENCE_REDIS_URL", url);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let log = std::fs::File::create(stderr_file).expect("creating the stderr file");
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

/// A running server process. Dropping it kills the process (by its own handle) and reaps it.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    client: reqwest::Client,
    /// For `raw`: one connection per request, so a connection the server closes after an
    /// early rejection (see `two_on_one_connection`) never poisons the pool of `client`.
    client_once: reqwest::Client,
    log: PathBuf,
    /// The server uses the shared test store, so process-wide gauges and counters also count
    /// what other servers (other tests) do through that store.
    pub shared_store: bool,
}

impl Server {
    /// Starts the binary on a free loopback port with `envs` added to its environment, and waits
    /// until `/livez` answers 200. It uses the shared test store when `PRESENCE_TEST_REDIS_URL`
    /// is set (unless `envs` names a store), else the embedded in-memory store.
    pub fn start(envs: &[(&str, &str)]) -> Server {
        Server::start_with(envs, true)
    }

    /// Like `start`, but always with a store of its own (the embedded in-memory one), for tests
    /// that assert exact process-wide metrics.
    pub fn start_private(envs: &[(&str, &str)]) -> Server {
        Server::start_with(envs, false)
    }

    fn start_with(envs: &[(&str, &str)], redis: bool) -> Server {
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
            let mut server = Server {
                child,
                base: format!("http://{listen}"),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .expect("http client"),
                client_once: reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("http client"),
                log,
                shared_store,
            };
            let until = Instant::now() + START_TIMEOUT;
            loop {
                if livez(port) {
                    return server;
                }
                if let Some(status) = server.child.try_wait().expect("polling the child") {
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

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the server process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, timeout)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
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

    /// `GET path` without the envelope check (for `/metrics`): status, Content-Type, body.
    pub async fn text(&self, path: &str) -> (u16, Option<String>, String) {
        self.send("GET", path, None, None).await
    }

    /// Writes `request` (a whole HTTP/1.1 request, which should say `Connection: close`) to a
    /// plain socket and checks that the answer is the envelope: for what `reqwest` cannot send,
    /// such as a chunked body. Returns the status and the body text.
    pub fn raw_socket(&self, request: &[u8]) -> (u16, String) {
        let addr = self.base.trim_start_matches("http://");
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
        let addr = self.base.trim_start_matches("http://");
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
    /// (e.g. `presence_heartbeats_total{result="ok"}`).
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
