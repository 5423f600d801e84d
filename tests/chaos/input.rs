//! Chaos scenarios: input faults and changes of the Redis Cluster under load.
//!
//! - [`slow_http_bodies`]: connections that send headers and part of a body, then stall;
//! - [`slow_websocket_readers`]: sockets subscribed to busy targets that never read;
//! - [`floods`]: one client floods REST writes, then WebSocket messages;
//! - [`online_redis_resharding`]: `redis-cli --cluster reshard` of a private cluster;
//! - [`iptables_partition_of_a_redis_master`]: a master cut off with iptables DROP rules.
//!
//! Each runs the harness's [`Scenario`] (3 shards, 2 gateways, every user heartbeating every
//! second, batch polls watching for false OFFLINE) plus what it injects, and prints one summary
//! line of figures per step (`[input::NAME] STEP: ...`). See `docs/chaos.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Cluster, Proc};
use crate::common::history::{Failed, History, Observer, Writer};
use crate::common::redis_cluster::{slot_of, Master, OwnRedis};
use crate::common::scenario::{ms, Outcome, Scenario, Step, HEARTBEAT};
use crate::common::ws::{ws_url, Ws};
use crate::common::{blocking, redis_url, uid};

const STATUSES: &str = "/api/v1/presence/statuses";

/// Whether the HTTP timeouts of issue 10 exist in this build (they are refused as unknown
/// settings before): then the slow-body scenario sets them short and checks they close.
fn http_timeouts() -> bool {
    include_str!("../../src/config.rs").contains("PRESENCE_HTTP_BODY_TIMEOUT")
}

fn users(n: usize) -> Vec<u64> {
    (0..n).map(|_| uid()).collect()
}

fn line(scenario: &str, step: &str, figures: impl std::fmt::Display) {
    println!("[input::{scenario}] {step}: {figures}");
}

// ---------------------------------------------------------------------------------------------
// Latencies

/// Answers of a probe: latencies of the 200s, and every other outcome counted.
#[derive(Default)]
struct Lat {
    ms: Vec<f64>,
    codes: BTreeMap<u16, u64>,
    transport: u64,
    first_errors: Vec<String>,
}

impl Lat {
    fn add(&mut self, started: Instant, r: Result<u16, String>) {
        match r {
            Ok(200) => self.ms.push(started.elapsed().as_secs_f64() * 1000.0),
            Ok(code) => {
                *self.codes.entry(code).or_default() += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(format!("{code}"));
                }
            }
            Err(e) => {
                self.transport += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(e);
                }
            }
        }
    }

    fn merge(&mut self, o: Lat) {
        self.ms.extend(o.ms);
        for (c, n) in o.codes {
            *self.codes.entry(c).or_default() += n;
        }
        self.transport += o.transport;
        self.first_errors.extend(o.first_errors);
        self.first_errors.truncate(5);
    }

    fn errors(&self) -> u64 {
        self.codes.values().sum::<u64>() + self.transport
    }

    fn q(&self, q: f64) -> f64 {
        quantile(&self.ms, q)
    }
}

impl std::fmt::Display for Lat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, errors {:?} + {} transport, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.ms.len(),
            self.codes,
            self.transport,
            self.q(0.5),
            self.q(0.99),
            self.q(1.0)
        )?;
        if !self.first_errors.is_empty() {
            write!(f, " (first errors {:?})", self.first_errors)?;
        }
        Ok(())
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

async fn code_of(r: reqwest::Result<reqwest::Response>) -> Result<u16, String> {
    match r {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let _ = resp.bytes().await;
            Ok(code)
        }
        Err(e) => Err(format!("{e}")),
    }
}

/// Other users at work through `base` for `d`: each of `users` in its own loop sends
/// `GET /statuses`, then a heartbeat of its own (it must be online), every 20 ms.
async fn probe(base: &str, users: &[u64], d: Duration) -> Lat {
    let client = crate::common::http::client(true);
    let until = Instant::now() + d;
    let loops = users.iter().map(|&u| {
        let (client, base) = (client.clone(), base.to_owned());
        async move {
            let mut lat = Lat::default();
            while Instant::now() < until {
                let t = Instant::now();
                let r = client.get(format!("{base}{STATUSES}")).send().await;
                lat.add(t, code_of(r).await);
                let t = Instant::now();
                let r = client
                    .post(format!("{base}{HEARTBEAT}"))
                    .json(&json!({"userId": u, "deviceId": "d"}))
                    .send()
                    .await;
                lat.add(t, code_of(r).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lat
        }
    });
    let mut all = Lat::default();
    for l in futures::future::join_all(loops).await {
        all.merge(l);
    }
    all
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn addr_of(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Ends the scenario: the watch and the load, what is left in the store taken offline.
async fn finish(s: &mut Scenario) -> Outcome {
    let out = s.end().await;
    s.clean_up().await;
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Slow HTTP bodies

/// `n` connections to `addr` that each send the head of a heartbeat POST announcing a 400-byte
/// body, and 12 bytes of it, then stall.
async fn stall_bodies(addr: &str, n: usize) -> Vec<TcpStream> {
    let head = format!(
        "POST {HEARTBEAT} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 400\r\n\r\n{{\"userId\": 1"
    );
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connecting");
        s.write_all(head.as_bytes()).await.expect("writing a head");
        out.push(s);
    }
    out
}

/// How many of `conns` the server closed (or answered): a read that ends or returns bytes.
async fn closed_by_server(conns: &mut [TcpStream]) -> usize {
    let mut n = 0;
    for s in conns.iter_mut() {
        let mut buf = [0u8; 512];
        if tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf))
            .await
            .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// 70 connections stall inside a request body on gateway 0 (with at most 64 requests in flight,
/// the limit the permits are counted against); meanwhile other users' `GET /statuses` and
/// heartbeats through that gateway must all answer 200.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn slow_http_bodies() {
    const NAME: &str = "slow_http_bodies";
    const STALLED: usize = 70;
    let url = redis_url();
    let hb = users(40);
    let probes = users(4);
    let all: Vec<u64> = hb.iter().chain(&probes).copied().collect();
    let mut vars = vec![("PRESENCE_MAX_INFLIGHT", "64")];
    if http_timeouts() {
        vars.extend([
            ("PRESENCE_HTTP_HEADER_TIMEOUT", "2s"),
            ("PRESENCE_HTTP_BODY_TIMEOUT", "2s"),
        ]);
    }
    let mut s = Scenario::start_with(&url, 0, &all, &[], &vars).await;
    let base = s.cluster.base(0);
    s.run(vec![Step::watch(NAME, &hb, Duration::from_millis(500))])
        .await;

    let quiet = probe(&base, &probes, Duration::from_secs(4)).await;
    line(NAME, "quiet", &quiet);

    let t = Instant::now();
    let mut stalled = stall_bodies(&addr_of(&base), STALLED).await;
    let under = probe(&base, &probes, Duration::from_secs(5)).await;
    let closed = closed_by_server(&mut stalled).await;
    line(
        NAME,
        &format!("{STALLED} stalled bodies"),
        format!(
            "{under}; stalled connections closed by the server after {:?}: {closed}",
            t.elapsed()
        ),
    );
    drop(stalled);

    let after = probe(&base, &probes, Duration::from_secs(2)).await;
    line(NAME, "after", &after);
    let out = finish(&mut s).await;
    line(NAME, "outcome", out.summary());

    assert_eq!(
        under.errors(),
        0,
        "while {STALLED} bodies stall, other users' requests failed: {under} (HTTP timeouts in \
         this build: {}; before the fix of issue 10 the permit is taken before the \
         body is read, so this fails)",
        http_timeouts()
    );
    if http_timeouts() {
        assert_eq!(
            closed, STALLED,
            "stalled bodies not closed by the 2 s body timeout"
        );
    }
    assert_eq!(after.errors(), 0, "after the stall: {after}");
    out.assert_no_false_offline_and_every_heartbeat_landed(NAME);
}

// ---------------------------------------------------------------------------------------------
// 2. Slow WebSocket readers

type RawWs = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A socket of `user` on `base` with a 4 KiB receive buffer that subscribes to `targets` and
/// is then never read.
async fn slow_reader(base: &str, user: u64, targets: &[u64]) -> RawWs {
    let url = ws_url(base, &format!("userId={user}&deviceId=slow&platform=WEB"));
    let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = sock
        .connect(addr_of(base).parse().expect("an address"))
        .await
        .expect("connecting");
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("upgrading");
    assert_eq!(resp.status().as_u16(), 101);
    let sub = json!({"type": "subscribe", "id": "s", "targets": targets});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .expect("subscribing");
    ws
}

/// Reads `ws` until it closes (within `d`): `Some(code)` of a close frame, `Some(0)` for a close
/// without a frame, `None` when still open.
async fn read_to_close(ws: &mut RawWs, d: Duration) -> Option<u16> {
    tokio::time::timeout(d, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)).unwrap_or(0),
                Ok(_) => continue,
                Err(_) => return 0,
            }
        }
        0
    })
    .await
    .ok()
}

/// Status changes of `targets`, each in its own loop, every `every`, for `d`, through both
/// gateways; the custom text names each change (`e<seq>`). Returns when each change was sent,
/// by (target, text), and the last text of each target that was answered 200.
async fn busy_targets(
    c: &Cluster,
    targets: &[u64],
    every: Duration,
    d: Duration,
) -> (HashMap<(u64, String), Instant>, HashMap<u64, String>, Lat) {
    let client = c.client().clone();
    let bases = c.bases();
    let until = Instant::now() + d;
    let loops = targets.iter().enumerate().map(|(j, &t)| {
        let (client, bases) = (client.clone(), bases.clone());
        async move {
            let mut sent = Vec::new();
            let mut last = None;
            let mut lat = Lat::default();
            let mut seq = 0u64;
            while Instant::now() < until {
                seq += 1;
                // Long texts: the frames fill a socket that does not read sooner.
                let text = format!("e{seq}-{}", "x".repeat(90));
                let status = if seq % 2 == 0 { "BUSY" } else { "AWAY" };
                let at = Instant::now();
                let r = client
                    .put(format!(
                        "{}/api/v1/presence/status/{t}",
                        bases[(j + seq as usize) % bases.len()]
                    ))
                    .json(&json!({"status": status, "customText": text}))
                    .send()
                    .await;
                let code = code_of(r).await;
                if code == Ok(200) {
                    last = Some(text.clone());
                }
                lat.add(at, code);
                sent.push(((t, text), at));
                tokio::time::sleep(every).await;
            }
            (sent, last.map(|l| (t, l)), lat)
        }
    });
    let mut sent = HashMap::new();
    let mut last = HashMap::new();
    let mut lat = Lat::default();
    for (s, l, x) in futures::future::join_all(loops).await {
        sent.extend(s);
        last.extend(l);
        lat.merge(x);
    }
    (sent, last, lat)
}

/// 20 sockets on gateway 0 subscribe to 40 busy targets and never read; 4 other subscribers
/// (both gateways) must get every target's last change, on time, and stay open; the slow ones
/// are cut off (1008), and the gateway's memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn slow_websocket_readers() {
    const NAME: &str = "slow_websocket_readers";
    const SLOW: usize = 20;
    let url = redis_url();
    let hb = users(30);
    let targets = users(40);
    let all: Vec<u64> = hb.iter().chain(&targets).copied().collect();
    // A socket queue of 64 messages: at 32, a reading subscriber that the test process
    // schedules ~50 ms late under ~700 changes/s is cut as slow too; at the default 256, the
    // kernel's socket buffers and the queue hold more than the 10 s of changes.
    // Each target changes up to 100 times a second: no status rate limit here.
    let envs = [("PRESENCE_WS_QUEUE", "64"), ("PRESENCE_STATUS_RATE", "off")];
    let mut s = Scenario::start_with(&url, 0, &all, &[], &envs).await;
    s.run(vec![Step::watch(NAME, &hb, Duration::from_millis(500))])
        .await;
    let gw0 = s.cluster.pid(Proc::Gateway(0)).expect("a child");
    let slow_metric = "presence_slow_consumers_total";
    let cut0 = s.cluster.metric(Proc::Gateway(0), slow_metric).await;
    let rss0 = rss_mib(gw0);

    let mut good = Vec::new();
    for k in 0..4 {
        let mut ws = Ws::connect(&s.cluster.base(k % 2), uid(), "good").await;
        ws.keepalive(Duration::from_millis(500));
        ws.subscribe(&targets).await;
        good.push(ws);
    }
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        slow.push(slow_reader(&s.cluster.base(0), uid(), &targets).await);
    }
    let t = Instant::now();
    let (sent, last, writes) = busy_targets(
        &s.cluster,
        &targets,
        Duration::from_millis(10),
        Duration::from_secs(10),
    )
    .await;
    let rss1 = rss_mib(gw0);
    let cut = s.cluster.metric(Proc::Gateway(0), slow_metric).await - cut0;
    line(
        NAME,
        "busy targets",
        format!(
            "{} changes in {:?} ({writes}); slow consumers cut on gateway 0: {cut}; gateway 0 \
             RSS {rss0:.1} -> {rss1:.1} MiB",
            sent.len(),
            t.elapsed()
        ),
    );

    // Every good subscriber gets every target's last change.
    let mut delays = Vec::new();
    let mut missing_final = Vec::new();
    let mut closed_good = 0;
    for ws in good.iter_mut() {
        for (&target, text) in &last {
            let text = text.clone();
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    ws.pump();
                    if ws
                        .presence(target)
                        .iter()
                        .any(|(_, d)| d["customText"] == text.as_str())
                    {
                        return true;
                    }
                    if ws.closed.is_some() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if got != Ok(true) {
                missing_final.push((target, text));
            }
        }
        ws.pump();
        closed_good += ws.closed.is_some() as usize;
        for (at, v) in &ws.log {
            if v["type"] != "presence" {
                continue;
            }
            let key = (
                v["data"]["userId"].as_u64().unwrap_or(0),
                v["data"]["customText"].as_str().unwrap_or("").to_owned(),
            );
            if let Some(sent_at) = sent.get(&key) {
                delays.push(at.saturating_duration_since(*sent_at).as_secs_f64() * 1000.0);
            }
        }
    }
    let expected = sent.len() * good.len();
    let p99 = quantile(&delays, 0.99);
    line(
        NAME,
        "good subscribers",
        format!(
            "{} pushes of {expected} changes x subscribers, delay p50 {:.1} ms p99 {p99:.1} ms \
             max {:.1} ms; last change missing {}; closed {closed_good}",
            delays.len(),
            quantile(&delays, 0.5),
            quantile(&delays, 1.0),
            missing_final.len()
        ),
    );

    // The slow ones now read: each must find its socket closed, by 1008 when a code came.
    let read = slow
        .iter_mut()
        .map(|ws| read_to_close(ws, Duration::from_secs(12)));
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for code in futures::future::join_all(read).await {
        let k = match code {
            Some(0) => "closed without a close frame".to_owned(),
            Some(c) => format!("close {c}"),
            None => "still open".to_owned(),
        };
        *codes.entry(k).or_default() += 1;
    }
    line(NAME, "slow readers", format!("{codes:?}"));
    for ws in good {
        ws.close().await;
    }
    let out = finish(&mut s).await;
    line(NAME, "outcome", out.summary());

    assert!(
        missing_final.is_empty(),
        "last changes not pushed to good subscribers: {missing_final:?}"
    );
    assert_eq!(closed_good, 0, "a good subscriber was closed");
    assert!(p99 <= 1000.0, "push delay p99 {p99:.1} ms > 1 s");
    assert!(cut >= SLOW as f64, "{cut} slow consumers cut, want {SLOW}");
    assert!(
        codes
            .keys()
            .all(|k| k == "close 1008" || k == "closed without a close frame"),
        "slow readers: {codes:?}"
    );
    assert!(
        rss1 - rss0 < 64.0,
        "gateway RSS grew {rss0:.1} -> {rss1:.1} MiB"
    );
    out.assert_no_false_offline_and_every_heartbeat_landed(NAME);
}

// ---------------------------------------------------------------------------------------------
// 3. Floods

/// One client floods gateway 0 with status writes of its own user (32 in flight) for `d`.
async fn rest_flood(base: &str, user: u64, d: Duration) -> Lat {
    let client = crate::common::http::client(true);
    let until = Instant::now() + d;
    let loops = (0..32).map(|i| {
        let (client, base) = (client.clone(), base.to_owned());
        async move {
            let mut lat = Lat::default();
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let t = Instant::now();
                let r = client
                    .put(format!("{base}/api/v1/presence/status/{user}"))
                    .json(&json!({"status": "BUSY", "customText": format!("f{i}-{n}")}))
                    .send()
                    .await;
                lat.add(t, code_of(r).await);
            }
            lat
        }
    });
    let mut all = Lat::default();
    for l in futures::future::join_all(loops).await {
        all.merge(l);
    }
    all
}

/// One client floods REST writes, then WebSocket messages: the WebSocket is closed (1008);
/// other users' p99 stays within 2x the quiet p99 measured first (floor 5 ms), with 0 errors.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn floods() {
    const NAME: &str = "floods";
    let url = redis_url();
    let hb = users(40);
    let probes = users(4);
    let flooder = uid();
    let all: Vec<u64> = hb.iter().chain(&probes).copied().collect();
    let mut s = Scenario::start(&url, 0, &all, &[]).await;
    let base = s.cluster.base(0);
    s.run(vec![Step::watch(NAME, &hb, Duration::from_millis(500))])
        .await;
    let (code, v) = s
        .cluster
        .post(
            0,
            "/api/v1/presence/online",
            json!({"userId": flooder, "deviceId": "f", "platform": "WEB"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");

    let quiet = probe(&base, &probes, Duration::from_secs(5)).await;
    line(NAME, "quiet", &quiet);

    let (flood, under_rest) = tokio::join!(
        rest_flood(&base, flooder, Duration::from_secs(5)),
        probe(&base, &probes, Duration::from_secs(5))
    );
    line(
        NAME,
        "REST flood",
        format!("flooder: {flood}; others: {under_rest}"),
    );

    let mut ws = Ws::connect(&base, flooder, "f").await;
    let t = Instant::now();
    // Cheap messages (an unknown type: answered at once, no store work), so the socket's rate
    // limit, not the handling time, is what bounds them.
    let msg = json!({"type": "flood", "id": "flood"});
    for _ in 0..2000 {
        ws.send_json(&msg);
    }
    let (closed, under_ws) = tokio::join!(
        ws.wait_closed(Duration::from_secs(5)),
        probe(&base, &probes, Duration::from_secs(5))
    );
    let code = closed.map(|(at, c)| (at.duration_since(t), c));
    line(
        NAME,
        "WebSocket flood",
        format!("2000 messages at once: closed {code:?}; others: {under_ws}"),
    );
    let _ = s
        .cluster
        .post(
            0,
            "/api/v1/presence/offline",
            json!({"userId": flooder, "deviceId": "f"}),
        )
        .await;
    let out = finish(&mut s).await;
    line(NAME, "outcome", out.summary());

    let bound = 2.0 * quiet.q(0.99).max(5.0);
    assert_eq!(
        code.and_then(|c| c.1),
        Some(1008),
        "the WebSocket flooder: {code:?}"
    );
    for (what, l) in [("REST flood", &under_rest), ("WebSocket flood", &under_ws)] {
        assert_eq!(l.errors(), 0, "{what}: other users failed: {l}");
        assert!(
            l.q(0.99) <= bound,
            "{what}: other users' p99 {:.1} ms > 2x quiet p99 ({:.1} ms, floor 5 ms)",
            l.q(0.99),
            quiet.q(0.99)
        );
    }
    out.assert_no_false_offline_and_every_heartbeat_landed(NAME);
}

// ---------------------------------------------------------------------------------------------
// 4. Online Redis resharding

/// `redis-cli --cluster reshard` of 1000 slots, twice (master 1 -> 2, then 2 -> 3), on a private
/// Redis Cluster while users heartbeat and change status: 0 acknowledged writes lost, versions
/// only increase, 0 false OFFLINE, every view converges within 10 s.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn online_redis_resharding() {
    const NAME: &str = "online_redis_resharding";
    redis_url(); // run with scripts/test.sh, like every Redis test
    let redis = blocking(|| OwnRedis::start(7620, "/tmp/h7-chaos-reshard"));
    let (mut s, h, mut observers, writer, writers) = with_history(NAME, &redis, 60, 20).await;

    let before = blocking(|| redis.masters());
    assert_eq!(before.len(), 3, "masters: {before:?}");
    for (from, to) in [(0, 1), (1, 2)] {
        let (a, b) = (before[from].clone(), before[to].clone());
        let ours = s.users.iter().filter(|&&u| a.serves(slot_of(u))).count();
        let t0 = ms(h.epoch.elapsed());
        let t = Instant::now();
        blocking(|| redis.reshard(&a.id, &b.id, 1000)).unwrap_or_else(|e| panic!("{e}"));
        let took = t.elapsed();
        let failed = failed_between(&h, t0, ms(h.epoch.elapsed()));
        line(
            NAME,
            &format!("reshard 1000 slots :{} -> :{}", a.port, b.port),
            format!(
                "took {took:?}; our users on the source master {ours}; writes failed meanwhile \
                 {} {:?}",
                failed.len(),
                failed.iter().take(3).collect::<Vec<_>>()
            ),
        );
        s.run(vec![Step::Sleep(Duration::from_secs(2))]).await;
    }
    writer.finish().await;
    // Users whose slot moved are touched by the fault; every other write must succeed.
    let after = blocking(|| redis.masters());
    let owner = |ms: &[Master], slot: u16| ms.iter().position(|m| m.serves(slot));
    let moved = |u: u64, _gateway: usize| owner(&before, slot_of(u)) != owner(&after, slot_of(u));
    let moved_writers = writers.iter().filter(|&&u| moved(u, 0)).count();
    line(
        NAME,
        "moved",
        format!(
            "{moved_writers} of {} writer users had their slot moved",
            writers.len()
        ),
    );
    let found = h.check(&s, &mut observers, &redis.urls, moved).await;
    drop(observers);
    let out = finish(&mut s).await;
    h.finish(NAME, found, &out);
    out.assert_no_false_offline_and_every_heartbeat_landed(NAME);
}

/// A [`Scenario`] on `redis` with `heartbeating` watched users and `writers` (who heartbeat
/// too) writing every 100 ms into a [`History`], observed on every gateway, 2 s in.
async fn with_history(
    name: &'static str,
    redis: &OwnRedis,
    heartbeating: usize,
    writers: usize,
) -> (Scenario, Arc<History>, Vec<Observer>, Writer, Vec<u64>) {
    let hb = users(heartbeating);
    let writers = users(writers);
    let all: Vec<u64> = hb.iter().chain(&writers).copied().collect();
    let mut s = Scenario::start(&redis.urls, 0, &all, &[]).await;
    s.run(vec![Step::watch(name, &hb, Duration::from_millis(500))])
        .await;
    let h = History::new(s.load().epoch);
    let observers = observers(&s, &writers).await;
    let writer = Writer::start(&s.cluster, &h, &writers, Duration::from_millis(100));
    s.run(vec![Step::Sleep(Duration::from_secs(2))]).await;
    (s, h, observers, writer, writers)
}

/// Failed writes sent between `from` and `to` (ms since the history's epoch).
fn failed_between(h: &History, from: u64, to: u64) -> Vec<Failed> {
    h.failed()
        .into_iter()
        .filter(|f| (from..=to).contains(&f.sent))
        .collect()
}

/// One observer per gateway subscribed to `writers`.
async fn observers(s: &Scenario, writers: &[u64]) -> Vec<Observer> {
    let mut out = Vec::new();
    for k in 0..s.cluster.gateways() {
        out.push(Observer::start(&s.cluster, k, uid(), writers, s.load().epoch).await);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 5. iptables partition of a Redis master

/// DROP rules on loopback, deleted on drop (even when the test fails).
struct Partition {
    rules: Vec<Vec<String>>,
}

fn iptables(action: &str, rule: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("iptables")
        .arg(action)
        .arg("INPUT")
        .args(rule)
        .output()
        .map_err(|e| format!("running iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Partition {
    /// Cuts every TCP packet to or from `ports` on loopback.
    fn cut(ports: &[u16]) -> Partition {
        let mut p = Partition { rules: Vec::new() };
        for port in ports {
            for dir in ["--dport", "--sport"] {
                let rule: Vec<String> = [
                    "-i",
                    "lo",
                    "-p",
                    "tcp",
                    dir,
                    &port.to_string(),
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                iptables("-I", &rule).unwrap_or_else(|e| panic!("iptables -I {rule:?}: {e}"));
                p.rules.push(rule);
            }
        }
        p
    }

    fn heal(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(e) = iptables("-D", &rule) {
                eprintln!("iptables -D INPUT {rule:?} FAILED: {e}");
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

/// Why iptables partitions cannot run here, if they cannot.
fn iptables_unavailable() -> Option<String> {
    let uid = std::process::Command::new("id").arg("-u").output();
    match uid {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        _ => return Some("not root".into()),
    }
    match std::process::Command::new("iptables")
        .args(["-L", "INPUT", "-n"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "iptables -L fails: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Some(format!("no iptables ({e}); apt-get install -y iptables")),
    }
}

/// One master of a private Redis Cluster (clients and cluster bus) is cut off with iptables
/// DROP rules for 5 s, then healed; its replica takes over meanwhile. Users whose records live
/// on the other masters see 0 errors; nobody reads a false OFFLINE; nothing acknowledged is
/// lost; every view converges within 10 s of the heal.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn iptables_partition_of_a_redis_master() {
    const NAME: &str = "iptables_partition_of_a_redis_master";
    redis_url();
    if let Some(why) = iptables_unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{NAME} cannot run under CI=true: {why}");
        }
        println!("\n!!!!!!!! [input::{NAME}] SKIPPED: {why} (fails under CI=true) !!!!!!!!\n");
        return;
    }
    let redis = blocking(|| OwnRedis::start(7640, "/tmp/h7-chaos-partition"));
    let (mut s, h, mut observers, writer, writers) = with_history(NAME, &redis, 60, 30).await;

    // The victim: a master other than the seed node, so redis-cli keeps a way in.
    let masters = blocking(|| redis.masters());
    let victim = masters
        .iter()
        .find(|m| m.port != redis.port)
        .expect("a master besides the seed")
        .clone();
    let (touched, untouched): (Vec<u64>, Vec<u64>) =
        writers.iter().partition(|&&u| victim.serves(slot_of(u)));
    let ring0 = ring_members(&s.cluster).await;

    let cut_at = ms(h.epoch.elapsed());
    let mut part = Partition::cut(&[victim.port, victim.port + 10000]);
    let mut ring_min = ring0.clone();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        for (p, n) in ring_members(&s.cluster).await {
            let e = ring_min.entry(p).or_insert(n);
            *e = e.min(n);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    part.heal();
    let healed_at = ms(h.epoch.elapsed());
    let after = blocking(|| redis.masters());
    let failed = failed_between(&h, cut_at, healed_at);
    let on_victim = |u: u64| touched.contains(&u);
    let (bad_touched, bad_untouched): (Vec<&Failed>, Vec<&Failed>) =
        failed.iter().partition(|f| on_victim(f.user));
    line(
        NAME,
        &format!("cut :{} (+ bus) for 5 s", victim.port),
        format!(
            "writer users on it {} / elsewhere {}: failed writes {} / {} {:?}; ring members \
             before {:?}, lowest during {:?}; masters after {:?}",
            touched.len(),
            untouched.len(),
            bad_touched.len(),
            bad_untouched.len(),
            bad_untouched.iter().take(3).collect::<Vec<_>>(),
            ring0.values().collect::<Vec<_>>(),
            ring_min.values().collect::<Vec<_>>(),
            after.iter().map(|m| m.port).collect::<Vec<_>>()
        ),
    );
    s.run(vec![Step::Sleep(Duration::from_secs(3))]).await;
    writer.finish().await;
    let found = h
        .check(&s, &mut observers, &redis.urls, |u, _| on_victim(u))
        .await;
    drop(observers);
    let out = finish(&mut s).await;
    drop(part);
    h.finish(NAME, found, &out);
    for (p, n) in &ring_min {
        assert_eq!(
            Some(n),
            ring0.get(p),
            "{p:?}: presence_ring_members fell to {n} while one Redis master was cut off"
        );
    }
    out.assert_no_false_offline_and_every_heartbeat_landed(NAME);
}

/// `presence_ring_members` of every running node.
async fn ring_members(c: &Cluster) -> BTreeMap<Proc, f64> {
    let mut out = BTreeMap::new();
    for p in c.procs() {
        out.insert(p, c.metric(p, "presence_ring_members").await);
    }
    out
}
