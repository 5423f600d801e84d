//! `presence-loadgen`: a small closed-loop HTTP/1.1 load generator for presence-service, and the
//! memory probe behind `docs/benchmarks.md`.
//!
//! Subcommands:
//! - `http`: puts users online (and, with `--privacy rules`, gives each privacy rules), then
//!   drives one endpoint (heartbeat, livez, status, online or batch) for a fixed time over
//!   keep-alive connections and reports requests/s, errors and latency percentiles.
//! - `fill`: puts `users x devices-per-user` devices online as fast as it can; with
//!   `--server-pid` it reports the server's resident memory before and after, per device.
//! - `compare`: livez, heartbeat, livez again in one process (optionally several rounds); reports
//!   `heartbeat_rps / mean(livez_rps before and after)`, the figure of issue 2, and the server's
//!   CPU time per request of each (with `--server-pid`), which does not depend on the client.
//! - `sim`: a population of WebSocket or REST devices with subscriptions; push delay.
//! - `expire`: ~100k devices whose timeouts fall within a second; lateness of each OFFLINE.
//! - `rss`: the resident memory of a process.
//!
//! Traffic only ever goes to a loopback address: any other target is refused.
//! Results go to stdout as one `key=value` line per result (or JSON with `--format json`);
//! progress goes to stderr once a second.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

mod expire;
mod rules;
mod sim;

const BASE: &str = "/api/v1/presence";
const PLATFORMS: [&str; 4] = ["WEB", "IOS", "ANDROID", "PC"];

#[derive(Parser, Debug)]
#[command(
    name = "presence-loadgen",
    about = "Load generator and memory probe for presence-service"
)]
struct Cli {
    /// Output format of the results (stdout).
    #[arg(long, global = true, value_enum, default_value = "text")]
    format: Format,
    /// Tokio worker threads of the load generator itself.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive one endpoint for a fixed time and report throughput and latency.
    Http(HttpArgs),
    /// Put users x devices-per-user devices online as fast as possible.
    Fill(FillArgs),
    /// livez, heartbeat, livez (x rounds): the heartbeat/livez throughput ratio.
    Compare(CompareArgs),
    /// A population for the push path: N users x M devices heartbeating over WebSocket or
    /// REST, K subscriptions each, status changes at a fixed rate; delivery delay,
    /// delivered/expected and false offlines.
    Sim(sim::SimArgs),
    /// Devices whose heartbeat timeouts fall within about a second: how late each OFFLINE reaches a watcher.
    Expire(expire::ExpireArgs),
    /// Print the resident memory of a process (from /proc/<pid>/status).
    Rss {
        #[arg(long)]
        pid: u32,
    },
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Base URL of the server; only loopback hosts are accepted.
    #[arg(long, env = "LOADGEN_TARGET", default_value = "http://127.0.0.1:8004")]
    target: String,
    /// Users to put online (user ids user-base .. user-base+users-1).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// The first user id.
    #[arg(long, default_value_t = 1)]
    user_base: u64,
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// PID of the server, to report its CPU time per request and its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Users per `POST /status/batch` (`--mode batch`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch_size: u64,
}

#[derive(Args, Debug)]
struct HttpArgs {
    #[command(flatten)]
    common: Common,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before measuring, not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    #[arg(long, value_enum, default_value = "heartbeat")]
    mode: Mode,
    /// Skip putting the users online (they already are).
    #[arg(long)]
    no_online: bool,
    /// Privacy rules on every user before measuring (see `rules.rs`).
    #[arg(long, value_enum, default_value = "off")]
    privacy: rules::Privacy,
    /// Length of each user's allow and deny lists under `--privacy rules`.
    #[arg(long, default_value_t = 20)]
    privacy_width: u64,
}

#[derive(Args, Debug)]
struct FillArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1)]
    devices_per_user: u64,
    /// Seconds to wait after filling before the last memory reading (lets the timer settle).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
}

#[derive(Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    common: Common,
    /// Measured time of each run. Keep warmup + duration well under the server's heartbeat
    /// timeout (60s by default): users get no heartbeat during a livez run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before each run, not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Heartbeat runs, each between two livez runs (livez, heartbeat, livez, heartbeat, ...).
    /// The reported ratio is the median over rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Heartbeat,
    Livez,
    Status,
    /// `POST /online` of a device already online, on another platform than its last one: a
    /// visible change each time, which the owner writes through to its store (a durable change).
    Online,
    /// `POST /status/batch` of `--batch-size` consecutive users, read as a viewer
    /// (`X-Presence-Viewer`) `batch-size / 2` users after the first of them.
    Batch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Heartbeat => "heartbeat",
            Mode::Livez => "livez",
            Mode::Status => "status",
            Mode::Online => "online",
            Mode::Batch => "batch",
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))?;
    if d > Duration::from_secs(3600) {
        return Err(format!("duration {s:?} out of range (at most 1h)"));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Target

/// A loopback server address and the Host header to send.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    host: String,
}

impl Target {
    fn parse(raw: &str) -> anyhow::Result<Target> {
        let uri: hyper::Uri = raw
            .parse()
            .with_context(|| format!("bad target URL {raw:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("target must be an http:// URL, got {raw:?}");
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            bail!("target must not have a path, got {raw:?}");
        }
        let auth = uri
            .authority()
            .ok_or_else(|| anyhow!("target has no host: {raw:?}"))?;
        let host = auth.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = auth.port_u16().unwrap_or(80);
        let loopback_name = bare.eq_ignore_ascii_case("localhost");
        let loopback_ip = bare
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
        if !loopback_name && !loopback_ip {
            bail!("refusing target {raw:?}: only loopback hosts (127.0.0.1, localhost, ::1) are allowed");
        }
        let addr = if loopback_ip {
            SocketAddr::new(bare.parse().expect("checked above"), port)
        } else {
            // localhost: resolve, and keep only a loopback answer.
            (bare, port)
                .to_socket_addrs()?
                .find(|a| a.ip().is_loopback())
                .ok_or_else(|| anyhow!("localhost does not resolve to a loopback address"))?
        };
        Ok(Target {
            addr,
            host: auth.as_str().to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Latency histogram: log-linear buckets in microseconds, ~0.4% precision, fixed size.

const SUB_BITS: u32 = 8; // 256 sub-buckets per power of two
const SUB: u64 = 1 << SUB_BITS;
const LINEAR: u64 = 2 * SUB; // values below this are exact
const MAX_EXP: u32 = 40; // ~12 days in µs; anything above is clamped

#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Histogram {
    fn new() -> Histogram {
        let n = LINEAR as usize + (MAX_EXP - SUB_BITS) as usize * SUB as usize;
        Histogram {
            counts: vec![0; n],
            total: 0,
            max: 0,
            sum: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < LINEAR {
            return us as usize;
        }
        let e = (63 - us.leading_zeros()).min(MAX_EXP);
        let us = us.min((1u64 << (e + 1)) - 1);
        let shift = e - SUB_BITS;
        (LINEAR + (e - SUB_BITS - 1) as u64 * SUB + ((us >> shift) - SUB)) as usize
    }

    /// The upper bound of bucket `i`, in µs.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < LINEAR {
            return i;
        }
        let k = i - LINEAR;
        let e = k / SUB + SUB_BITS as u64 + 1;
        let shift = e - SUB_BITS as u64;
        (((k % SUB) + SUB) << shift) + (1 << shift) - 1
    }

    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.counts[Self::index(us)] += 1;
        self.total += 1;
        self.max = self.max.max(us);
        self.sum += us as u128;
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }

    /// The `q` quantile (0..=1), in µs.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(target: Target) -> Conn {
        Conn {
            target,
            sender: None,
        }
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.target.addr)
                .await
                .with_context(|| format!("connecting to {}", self.target.addr))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just connected"))
    }

    /// Sends one request and reads the whole answer. Drops the connection on any I/O error.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.call_as(method, path, body, None).await
    }

    /// `call`, naming `viewer` in `X-Presence-Viewer` when there is one.
    async fn call_as(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        viewer: Option<u64>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let host = self.target.host.clone();
        let r = async {
            let sender = self.connect().await?;
            sender.ready().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host);
            if body.is_some() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            if let Some(v) = viewer {
                req = req.header("x-presence-viewer", v);
            }
            let req = req.body(Full::new(body.unwrap_or_default()))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        }
        .await;
        if r.is_err() {
            self.sender = None;
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Process probes (/proc)

#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kb: u64,
    anon_kb: u64,
    hwm_kb: u64,
}

fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Mem {
        rss_kb: field("VmRSS:"),
        anon_kb: field("RssAnon:"),
        hwm_kb: field("VmHWM:"),
    })
}

/// User + system CPU time of a process, in seconds.
fn read_cpu(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture we run on.
    100.0
}

fn self_pid() -> u32 {
    std::process::id()
}

// ---------------------------------------------------------------------------------------------
// Progress

struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

impl Progress {
    fn new() -> Arc<Progress> {
        Arc::new(Progress {
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Prints a line to stderr each second until stopped.
    fn spawn_printer(self: &Arc<Self>, label: String) -> tokio::task::JoinHandle<()> {
        let p = self.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut last = (0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if p.stop.load(Ordering::Relaxed) {
                    break;
                }
                let ok = p.ok.load(Ordering::Relaxed);
                let err = p.errors.load(Ordering::Relaxed);
                eprintln!(
                    "[{label}] t={:>4.0}s  {:>8} req/s  errors/s={}  total={} errors={}",
                    start.elapsed().as_secs_f64(),
                    ok + err - last.0 - last.1,
                    err - last.1,
                    ok + err,
                    err
                );
                last = (ok, err);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Putting devices online

fn device_id(user_index: u64, device: u64, per_user: u64) -> String {
    if per_user == 1 {
        format!("lg-{user_index}")
    } else {
        format!("lg-{user_index}-{device}")
    }
}

struct FillResult {
    devices: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram,
    first_error: Option<String>,
}

/// Puts `users x per_user` devices online over `connections` connections, as fast as possible.
async fn put_online(
    target: &Target,
    user_base: u64,
    users: u64,
    per_user: u64,
    connections: usize,
    label: &str,
) -> FillResult {
    let total = users * per_user;
    let next = Arc::new(AtomicU64::new(0));
    let progress = Progress::new();
    let printer = progress.spawn_printer(label.to_owned());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let (target, next, progress) = (target.clone(), next.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            let mut hist = Histogram::new();
            let mut first_error = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let (ui, d) = (k / per_user, k % per_user);
                let body = json!({
                    "userId": user_base + ui,
                    "deviceId": device_id(ui, d, per_user),
                    "platform": PLATFORMS[(d % 4) as usize],
                });
                let body = Bytes::from(serde_json::to_vec(&body).expect("json"));
                let t = Instant::now();
                let r = conn
                    .call(Method::POST, &format!("{BASE}/online"), Some(body))
                    .await;
                hist.record(t.elapsed());
                match r {
                    Ok((StatusCode::OK, _)) => {
                        progress.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        if first_error.is_none() {
                            first_error = Some(describe(&other));
                        }
                        if other.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            (hist, first_error)
        }));
    }
    let mut hist = Histogram::new();
    let mut first_error = None;
    for t in tasks {
        if let Ok((h, e)) = t.await {
            hist.merge(&h);
            first_error = first_error.or(e);
        }
    }
    let elapsed = started.elapsed();
    progress.stop.store(true, Ordering::Relaxed);
    printer.abort();
    FillResult {
        devices: progress.ok.load(Ordering::Relaxed),
        errors: progress.errors.load(Ordering::Relaxed),
        elapsed,
        hist,
        first_error,
    }
}

fn describe(r: &anyhow::Result<(StatusCode, Bytes)>) -> String {
    match r {
        Ok((s, b)) => format!(
            "HTTP {s}: {}",
            String::from_utf8_lossy(&b[..b.len().min(200)])
        ),
        Err(e) => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Closed-loop runs

struct RunResult {
    mode: Mode,
    connections: usize,
    elapsed: Duration,
    requests: u64,
    errors: u64,
    hist: Histogram,
    first_error: Option<String>,
    server_cpu_s: Option<f64>,
    client_cpu_s: Option<f64>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn to_json(&self) -> Value {
        let ms = |us: u64| us as f64 / 1000.0;
        json!({
            "mode": self.mode.name(),
            "connections": self.connections,
            "duration_s": self.elapsed.as_secs_f64(),
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps(), 1),
            "latency_ms": {
                "mean": round(self.hist.mean() / 1000.0, 3),
                "p50": ms(self.hist.quantile(0.50)),
                "p90": ms(self.hist.quantile(0.90)),
                "p99": ms(self.hist.quantile(0.99)),
                "max": ms(self.hist.max),
            },
            "server_cpu_us_per_req": self.server_cpu_s.map(|c| round(c * 1e6 / self.requests.max(1) as f64, 2)),
            "server_cpu_cores": self.server_cpu_s.map(|c| round(c / self.elapsed.as_secs_f64(), 2)),
            "client_cpu_cores": self.client_cpu_s.map(|c| round(c / self.elapsed.as_secs_f64(), 2)),
            "first_error": self.first_error,
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Runs `connections` closed loops of one request each against `mode` for `warmup + duration`;
/// only requests that complete within the measured window count.
async fn run_closed_loop(
    target: &Target,
    common: &Common,
    mode: Mode,
    warmup: Duration,
    duration: Duration,
) -> RunResult {
    let progress = Progress::new();
    let printer = progress.spawn_printer(mode.name().to_owned());
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let users = common.users.max(1);
    // Online mode: each user's visits so far, so that every visit brings another platform.
    let visits: Arc<Vec<std::sync::atomic::AtomicU8>> = Arc::new(if mode == Mode::Online {
        (0..users).map(|_| Default::default()).collect()
    } else {
        Vec::new()
    });
    let mut tasks = Vec::new();
    for w in 0..common.connections.max(1) {
        let (target, progress, visits) = (target.clone(), progress.clone(), visits.clone());
        let conns = common.connections.max(1) as u64;
        let base = common.user_base;
        let batch = common.batch_size.min(users);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            let mut hist = Histogram::new();
            let mut first_error = None;
            let (mut ok, mut errors) = (0u64, 0u64);
            // Round-robin over users: worker w takes users w, w+C, w+2C, ...
            let mut ui = w as u64 % users;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let mut viewer = None;
                let (method, path, body) = match mode {
                    Mode::Livez => (Method::GET, "/livez".to_owned(), None),
                    Mode::Batch => {
                        let ids: Vec<u64> = (0..batch).map(|j| base + (ui + j) % users).collect();
                        viewer = Some(base + (ui + batch / 2) % users);
                        let body = json!({ "userIds": ids }).to_string();
                        (
                            Method::POST,
                            format!("{BASE}/status/batch"),
                            Some(Bytes::from(body)),
                        )
                    }
                    Mode::Heartbeat => {
                        let body = format!(
                            r#"{{"userId":{},"deviceId":"lg-{}","active":true}}"#,
                            base + ui,
                            ui
                        );
                        (
                            Method::POST,
                            format!("{BASE}/heartbeat"),
                            Some(Bytes::from(body)),
                        )
                    }
                    Mode::Status => (Method::GET, format!("{BASE}/status/{}", base + ui), None),
                    Mode::Online => {
                        // Put online on PLATFORMS[0]; visit n moves it to PLATFORMS[n % 4].
                        let n = visits[ui as usize].fetch_add(1, Ordering::Relaxed) as usize + 1;
                        let body = format!(
                            r#"{{"userId":{},"deviceId":"lg-{}","platform":"{}"}}"#,
                            base + ui,
                            ui,
                            PLATFORMS[n % 4]
                        );
                        (
                            Method::POST,
                            format!("{BASE}/online"),
                            Some(Bytes::from(body)),
                        )
                    }
                };
                ui = (ui + conns) % users;
                let t = Instant::now();
                let r = conn.call_as(method, &path, body, viewer).await;
                let done = Instant::now();
                let counted = done >= measure_from && done < end;
                let good = matches!(r, Ok((StatusCode::OK, _)));
                if counted {
                    hist.record(done - t);
                    if good {
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                }
                if good {
                    progress.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    if first_error.is_none() {
                        first_error = Some(describe(&r));
                    }
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (hist, ok, errors, first_error)
        }));
    }
    // CPU readings bracket the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = (common.server_pid.and_then(read_cpu), read_cpu(self_pid()));
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = (common.server_pid.and_then(read_cpu), read_cpu(self_pid()));
    let mut hist = Histogram::new();
    let (mut requests, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        if let Ok((h, ok, e, fe)) = t.await {
            hist.merge(&h);
            requests += ok;
            errors += e;
            first_error = first_error.or(fe);
        }
    }
    progress.stop.store(true, Ordering::Relaxed);
    printer.abort();
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    RunResult {
        mode,
        connections: common.connections,
        elapsed: duration,
        requests,
        errors,
        hist,
        first_error,
        server_cpu_s: diff(cpu0.0, cpu1.0),
        client_cpu_s: diff(cpu0.1, cpu1.1),
    }
}

// ---------------------------------------------------------------------------------------------
// Output

fn emit(format: Format, v: &Value) {
    match format {
        Format::Json => println!("{v}"),
        Format::Text => {
            let mut line = String::new();
            flatten("", v, &mut line);
            println!("{}", line.trim_end());
        }
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            // The kind of result first, then the rest in key order.
            let first = ["result", "mode"];
            let keys = first.iter().copied().filter(|k| m.contains_key(*k));
            let rest = m.keys().map(String::as_str).filter(|k| !first.contains(k));
            for k in keys.chain(rest) {
                let v = &m[k];
                let key = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Null => {}
        Value::String(s) if s.contains(' ') || s.contains('"') => {
            out.push_str(&format!(
                "{prefix}={} ",
                serde_json::to_string(s).expect("json")
            ));
        }
        Value::String(s) => out.push_str(&format!("{prefix}={s} ")),
        other => out.push_str(&format!("{prefix}={other} ")),
    }
}

fn fill_json(what: &str, r: &FillResult) -> Value {
    json!({
        "result": what,
        "devices": r.devices,
        "errors": r.errors,
        "seconds": round(r.elapsed.as_secs_f64(), 2),
        "devices_per_s": round(r.devices as f64 / r.elapsed.as_secs_f64(), 1),
        "latency_ms": {
            "p50": r.hist.quantile(0.5) as f64 / 1000.0,
            "p99": r.hist.quantile(0.99) as f64 / 1000.0,
            "max": r.hist.max as f64 / 1000.0,
        },
        "first_error": r.first_error,
    })
}

/// The online-devices gauge, read from the server's /metrics.
async fn online_devices(target: &Target) -> Option<i64> {
    let mut conn = Conn::new(target.clone());
    let (status, body) = conn.call(Method::GET, "/metrics", None).await.ok()?;
    if status != StatusCode::OK {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix("presence_online_devices "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Puts `common.users` users online with one device each (the setup of `http` and `compare`),
/// reports it, and fails when any of them could not be put online.
async fn put_users_online(format: Format, target: &Target, common: &Common) -> anyhow::Result<()> {
    let r = put_online(
        target,
        common.user_base,
        common.users,
        1,
        common.connections,
        "online",
    )
    .await;
    emit(format, &fill_json("online", &r));
    if r.errors > 0 {
        bail!(
            "{} of {} users could not be put online",
            r.errors,
            common.users
        );
    }
    Ok(())
}

async fn cmd_http(format: Format, a: HttpArgs) -> anyhow::Result<()> {
    let target = Target::parse(&a.common.target)?;
    if a.mode != Mode::Livez && !a.no_online {
        put_users_online(format, &target, &a.common).await?;
    }
    if a.privacy == rules::Privacy::Rules {
        let c = &a.common;
        let took = rules::apply(
            std::slice::from_ref(&target),
            c.user_base,
            c.users,
            a.privacy_width,
            c.connections,
        )
        .await?;
        emit(
            format,
            &json!({ "result": "privacy", "users": c.users, "seconds": round(took.as_secs_f64(), 2) }),
        );
    }
    let r = run_closed_loop(&target, &a.common, a.mode, a.warmup, a.duration).await;
    emit(format, &r.to_json());
    Ok(())
}

async fn cmd_fill(format: Format, a: FillArgs) -> anyhow::Result<()> {
    let target = Target::parse(&a.common.target)?;
    let pid = a.common.server_pid;
    let before = pid.map(read_mem).transpose()?;
    let devices_before = online_devices(&target).await;
    let r = put_online(
        &target,
        a.common.user_base,
        a.common.users,
        a.devices_per_user,
        a.common.connections,
        "fill",
    )
    .await;
    emit(format, &fill_json("fill", &r));
    let Some(pid) = pid else { return Ok(()) };
    let right_after = read_mem(pid)?;
    tokio::time::sleep(a.settle).await;
    let after = read_mem(pid)?;
    let before = before.expect("read above");
    let devices_after = online_devices(&target).await;
    // Every device put online stays in memory, online or (after the heartbeat timeout) resumable,
    // so the denominator is what was put online; the gauge is a check that none timed out.
    let added = r.devices;
    if let (Some(b), Some(a)) = (devices_before, devices_after) {
        if ((a - b).max(0) as u64) < added {
            eprintln!(
                "warning: only {} of {added} devices still online (the fill outlasted the heartbeat timeout?)",
                a - b
            );
        }
    }
    let per = |kb_after: u64, kb_before: u64| {
        round(
            (kb_after as f64 - kb_before as f64) * 1024.0 / added.max(1) as f64,
            1,
        )
    };
    emit(
        format,
        &json!({
            "result": "memory",
            "server_pid": pid,
            "users": a.common.users,
            "devices_per_user": a.devices_per_user,
            "online_devices_before": devices_before,
            "online_devices_after": devices_after,
            "rss_before_kb": before.rss_kb,
            "rss_after_kb": after.rss_kb,
            "rss_right_after_fill_kb": right_after.rss_kb,
            "rss_anon_before_kb": before.anon_kb,
            "rss_anon_after_kb": after.anon_kb,
            "rss_peak_kb": after.hwm_kb,
            "rss_bytes_per_device": per(after.rss_kb, before.rss_kb),
            "rss_bytes_per_user": round((after.rss_kb as f64 - before.rss_kb as f64) * 1024.0 / a.common.users.max(1) as f64, 1),
        }),
    );
    Ok(())
}

async fn cmd_compare(format: Format, a: CompareArgs) -> anyhow::Result<()> {
    let target = Target::parse(&a.common.target)?;
    put_users_online(format, &target, &a.common).await?;
    // livez, then (heartbeat, livez) x rounds: every heartbeat run sits between two livez runs.
    let mut livez = Vec::new();
    let mut heartbeat = Vec::new();
    for round in 0..=a.rounds {
        if round > 0 {
            let r =
                run_closed_loop(&target, &a.common, Mode::Heartbeat, a.warmup, a.duration).await;
            emit(format, &r.to_json());
            heartbeat.push(r);
        }
        let r = run_closed_loop(&target, &a.common, Mode::Livez, a.warmup, a.duration).await;
        emit(format, &r.to_json());
        livez.push(r);
    }
    let ratios: Vec<f64> = heartbeat
        .iter()
        .enumerate()
        .map(|(i, h)| h.rps() / ((livez[i].rps() + livez[i + 1].rps()) / 2.0))
        .collect();
    let cpu = |r: &RunResult| r.server_cpu_s.map(|c| c * 1e6 / r.requests.max(1) as f64);
    let cpu_hb: Option<Vec<f64>> = heartbeat.iter().map(cpu).collect();
    let cpu_lz: Option<Vec<f64>> = livez.iter().map(cpu).collect();
    let p99 = |rs: &[RunResult]| {
        rs.iter()
            .map(|r| r.hist.quantile(0.99) as f64 / 1000.0)
            .collect::<Vec<_>>()
    };
    let rps = |rs: &[RunResult]| rs.iter().map(|r| round(r.rps(), 1)).collect::<Vec<_>>();
    let rounded = |v: &[f64], d| v.iter().map(|x| round(*x, d)).collect::<Vec<_>>();
    let errors: u64 = livez.iter().chain(&heartbeat).map(|r| r.errors).sum();
    emit(
        format,
        &json!({
            "result": "compare",
            "connections": a.common.connections,
            "users": a.common.users,
            "duration_s": a.duration.as_secs_f64(),
            "rounds": a.rounds,
            "livez_rps": rps(&livez),
            "heartbeat_rps": rps(&heartbeat),
            "ratios": rounded(&ratios, 3),
            "ratio_heartbeat_over_livez": round(median(&ratios), 3),
            "livez_p99_ms": p99(&livez),
            "heartbeat_p99_ms": p99(&heartbeat),
            "errors": errors,
            "server_cpu_us_per_req": {
                "livez": cpu_lz.as_deref().map(|v| rounded(v, 2)),
                "heartbeat": cpu_hb.as_deref().map(|v| rounded(v, 2)),
            },
            // Client-independent: livez server CPU per request over heartbeat server CPU per request.
            "server_cpu_ratio_livez_over_heartbeat": cpu_lz.as_deref().zip(cpu_hb.as_deref())
                .map(|(l, h)| round(median(l) / median(h), 3)),
        }),
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let format = cli.format;
    if let Cmd::Rss { pid } = cli.cmd {
        let m = read_mem(pid)?;
        emit(
            format,
            &json!({"result": "rss", "pid": pid, "rss_kb": m.rss_kb, "rss_anon_kb": m.anon_kb, "rss_peak_kb": m.hwm_kb}),
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Http(a) => cmd_http(format, a).await,
            Cmd::Fill(a) => cmd_fill(format, a).await,
            Cmd::Compare(a) => cmd_compare(format, a).await,
            Cmd::Sim(a) => sim::run(format, a).await,
            Cmd::Expire(a) => expire::run(format, a).await,
            Cmd::Rss { .. } => unreachable!("handled above"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_round_trip() {
        for us in [
            0u64,
            1,
            511,
            512,
            513,
            1000,
            4095,
            4096,
            123_456,
            10_000_000,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(us);
            let v = Histogram::value(i);
            assert!(
                v >= us.min((1u64 << (MAX_EXP + 1)) - 1),
                "{us} -> {i} -> {v}"
            );
            assert!(
                i == 0 || Histogram::value(i - 1) < us.min((1u64 << (MAX_EXP + 1)) - 1),
                "{us}"
            );
            assert!(i < Histogram::new().counts.len());
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.quantile(0.5), 500);
        // Above 512 µs a bucket spans 0.4%: the answer is the bucket's upper bound.
        assert!(
            (990..=994).contains(&h.quantile(0.99)),
            "{}",
            h.quantile(0.99)
        );
        assert_eq!(h.quantile(1.0), 1000);
    }

    #[test]
    fn only_loopback_targets() {
        assert!(Target::parse("http://127.0.0.1:8004").is_ok());
        assert!(Target::parse("http://localhost:8004").is_ok());
        assert!(Target::parse("http://[::1]:8004").is_ok());
        assert!(Target::parse("http://10.0.0.1:8004").is_err());
        assert!(Target::parse("http://example.com").is_err());
        assert!(Target::parse("https://127.0.0.1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2h").is_err());
    }
}
