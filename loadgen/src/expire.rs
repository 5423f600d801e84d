//! `presence-loadgen expire`: many devices whose heartbeat timeouts fall within about one second,
//! and how late each one's OFFLINE reaches a watcher (issue 13's offline lateness).
//!
//! 1. `--targets` devices go online over REST, split over the gateways.
//! 2. Watcher sockets (`--per-watcher` subscriptions each, alternating between the gateways)
//!    subscribe to every target, and wait for their replies.
//! 3. Every target gets one heartbeat in a burst sent straight to its owner shard as
//!    `HeartbeatBatch` calls of 512 (what a gateway's coalescer sends; REST through the gateways
//!    cannot reach 100k heartbeats in a second on 2 cores). Each target's deadline is taken as
//!    the moment its batch was *sent* plus `--timeout`: the shard's real deadline is at or after
//!    it, so lateness is never understated.
//! 4. Each watcher notes when the first OFFLINE frame of each of its targets arrives.
//!
//! Lateness = arrival − deadline. It reports its percentiles, how wide the deadlines spread, how
//! many never arrived within `--grace` after the last deadline (`missed`), and how many arrived
//! before their deadline (`early`, which includes any OFFLINE seen before the burst: a device
//! declared gone before its timeout is a bug).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use presence_service::proto::v1;
use presence_service::proto::v1::presence_shard_client::PresenceShardClient;
use presence_service::ring::Ring;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{device_id, emit, parse_duration, put_online, round, Format, Histogram, Target, BASE};

/// At most this many heartbeats per `HeartbeatBatch` call (the shard's limit).
const BATCH: usize = 512;

#[derive(clap::Args, Debug)]
pub struct ExpireArgs {
    /// Gateways' base URLs, comma-separated (loopback only).
    #[arg(long)]
    gateways: String,
    /// The shards' gRPC addresses, comma-separated, exactly as in `PRESENCE_SHARDS`.
    #[arg(long)]
    shards: String,
    /// Devices that expire together (one per user).
    #[arg(long, default_value_t = 100_000)]
    targets: u64,
    /// The first target user id; the watchers' user ids follow the targets'.
    #[arg(long, default_value_t = 8_000_000_000)]
    first_user: u64,
    /// Subscriptions per watcher socket.
    #[arg(long, default_value_t = 50)]
    per_watcher: u64,
    /// The servers' heartbeat timeout (`PRESENCE_HEARTBEAT_TIMEOUT`).
    #[arg(long, value_parser = parse_duration)]
    timeout: Duration,
    /// How long to wait for OFFLINE frames after the last deadline.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    grace: Duration,
    /// Concurrent REST connections for putting targets online, per gateway.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// `HeartbeatBatch` calls in flight per shard during the burst.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
}

/// Microseconds since `base`, plus one, so that 0 means "not yet".
fn stamp(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64 + 1
}

pub async fn run(format: Format, a: ExpireArgs) -> anyhow::Result<()> {
    let gateways: Vec<Target> = a
        .gateways
        .split(',')
        .map(|g| Target::parse(g.trim()))
        .collect::<anyhow::Result<_>>()?;
    let shards: Vec<String> = a.shards.split(',').map(|s| s.trim().to_owned()).collect();
    if gateways.is_empty() || shards.is_empty() || a.targets == 0 || a.per_watcher == 0 {
        bail!("need gateways, shards, targets and per-watcher");
    }
    let n = a.targets;
    let base = Instant::now();

    // 1. Targets online, split over the gateways; device ids as `put_online` makes them.
    let share = n.div_ceil(gateways.len() as u64);
    let parts: Vec<(u64, u64)> = (0..gateways.len() as u64)
        .map(|g| (g * share, ((g + 1) * share).min(n)))
        .filter(|(lo, hi)| lo < hi)
        .collect();
    let t = Instant::now();
    let fills = futures::future::join_all(parts.iter().zip(&gateways).map(|(&(lo, hi), gw)| {
        put_online(
            gw,
            a.first_user + lo,
            hi - lo,
            1,
            a.connections,
            "expire: online",
        )
    }))
    .await;
    let online: u64 = fills.iter().map(|f| f.devices).sum();
    let errors: u64 = fills.iter().map(|f| f.errors).sum();
    eprintln!(
        "expire: {online} targets online in {:.1}s ({errors} errors)",
        t.elapsed().as_secs_f64()
    );
    if online != n {
        bail!(
            "only {online} of {n} targets went online: {:?}",
            fills.iter().find_map(|f| f.first_error.clone())
        );
    }
    let device_of = |k: u64| {
        let (lo, _) = parts[(k / share) as usize];
        device_id(k - lo, 0, 1)
    };

    // 2. Watchers.
    let arrivals: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let watchers = n.div_ceil(a.per_watcher);
    let stop = tokio_util::sync::CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let open = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for w in 0..watchers {
        let lo = w * a.per_watcher;
        let hi = (lo + a.per_watcher).min(n);
        let watcher = Watcher {
            user: a.first_user + n + w,
            target: gateways[(w % gateways.len() as u64) as usize].clone(),
            first: a.first_user,
            lo,
            hi,
            arrivals: arrivals.clone(),
            beat: (a.timeout / 3).max(Duration::from_secs(1)),
            stop: stop.clone(),
            base,
        };
        let (ready, open) = (ready_tx.clone(), open.clone());
        tasks.push(tokio::spawn(async move {
            let permit = open.acquire_owned().await.expect("not closed");
            watcher.run(permit, ready).await
        }));
    }
    drop(ready_tx);
    for _ in 0..watchers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => bail!("a watcher failed to subscribe: {e:#}"),
            None => bail!("watchers ended before subscribing"),
        }
    }
    eprintln!("expire: {watchers} watchers subscribed to all {n} targets");

    // 3. The burst: one heartbeat per target, to its owner.
    let ring = Ring::new(shards.iter().cloned());
    let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); shards.len()];
    for k in 0..n {
        let owner = ring.owner_of(a.first_user + k).context("empty ring")?;
        let i = shards.iter().position(|s| s == owner).expect("a member");
        by_shard[i].push(k);
    }
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let burst_start = stamp(base);
    let results = futures::future::join_all(shards.iter().zip(by_shard).map(|(addr, ks)| {
        let (sent, epoch) = (sent.clone(), ring.epoch());
        let device_of = &device_of;
        let first = a.first_user;
        let in_flight = a.in_flight.max(1);
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .with_context(|| format!("connect {addr}"))?;
            let client = PresenceShardClient::new(channel);
            let chunks: Vec<Vec<u64>> = ks.chunks(BATCH).map(<[u64]>::to_vec).collect();
            let calls = futures::stream::iter(chunks.into_iter().map(|chunk| {
                let mut client = client.clone();
                let sent = sent.clone();
                let heartbeats = chunk
                    .iter()
                    .map(|&k| v1::HeartbeatRequest {
                        epoch,
                        user_id: first + k,
                        device_id: device_of(k),
                        active: true,
                        trace: Default::default(),
                    })
                    .collect();
                async move {
                    let at = stamp(base);
                    for &k in &chunk {
                        sent[k as usize].store(at, Ordering::Relaxed);
                    }
                    let reply = client
                        .heartbeat_batch(v1::HeartbeatBatchRequest { epoch, heartbeats })
                        .await?
                        .into_inner();
                    let ok = reply.codes.iter().filter(|&&c| c == 0).count() as u64;
                    anyhow::Ok((ok, chunk.len() as u64 - ok))
                }
            }))
            .buffer_unordered(in_flight)
            .collect::<Vec<_>>()
            .await;
            let (mut ok, mut failed) = (0u64, 0u64);
            for c in calls {
                let (o, f) = c.with_context(|| format!("HeartbeatBatch to {addr}"))?;
                ok += o;
                failed += f;
            }
            anyhow::Ok((ok, failed))
        }
    }))
    .await;
    let burst_end = stamp(base);
    let (mut beats_ok, mut beats_failed) = (0u64, 0u64);
    for r in results {
        let (o, f) = r?;
        beats_ok += o;
        beats_failed += f;
    }
    let burst_ms = (burst_end - burst_start) as f64 / 1000.0;
    eprintln!(
        "expire: burst of {beats_ok} heartbeats ({beats_failed} refused) in {burst_ms:.0} ms; deadlines in {:.0}s",
        a.timeout.as_secs_f64()
    );
    if beats_failed > 0 {
        bail!("{beats_failed} heartbeats of the burst were refused");
    }

    // 4. Wait for every OFFLINE, or the last deadline plus the grace.
    let timeout_us = a.timeout.as_micros() as u64;
    let give_up = base + Duration::from_micros(burst_end + timeout_us) + a.grace;
    loop {
        let got = arrivals
            .iter()
            .filter(|x| x.load(Ordering::Relaxed) != 0)
            .count() as u64;
        if got == n || Instant::now() >= give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }

    let mut late = Histogram::new();
    let (mut missed, mut early) = (0u64, 0u64);
    let mut first_deadline = u64::MAX;
    let mut last_deadline = 0u64;
    let mut first_arrival = u64::MAX;
    let mut last_arrival = 0u64;
    for k in 0..n as usize {
        let deadline = sent[k].load(Ordering::Relaxed) + timeout_us;
        first_deadline = first_deadline.min(deadline);
        last_deadline = last_deadline.max(deadline);
        match arrivals[k].load(Ordering::Relaxed) {
            0 => missed += 1,
            at if at < deadline => early += 1,
            at => {
                first_arrival = first_arrival.min(at);
                last_arrival = last_arrival.max(at);
                late.record(Duration::from_micros(at - deadline));
            }
        }
    }
    let ms = |us: u64| round(us as f64 / 1000.0, 2);
    emit(
        format,
        &json!({
            "result": "expire",
            "targets": n,
            "watchers": watchers,
            "online_seconds": round(fills.iter().map(|f| f.elapsed.as_secs_f64()).fold(0.0, f64::max), 2),
            "heartbeat_burst_ms": round(burst_ms, 1),
            "deadlines_spread_ms": ms(last_deadline.saturating_sub(first_deadline)),
            "offlines_spread_ms": ms(last_arrival.saturating_sub(first_arrival.min(last_arrival))),
            "offline_frames": n - missed,
            "missed": missed,
            "early": early,
            "lateness_ms_p50": ms(late.quantile(0.5)),
            "lateness_ms_p90": ms(late.quantile(0.9)),
            "lateness_ms_p99": ms(late.quantile(0.99)),
            "lateness_ms_max": ms(late.quantile(1.0)),
        }),
    );
    if missed > 0 || early > 0 {
        bail!("{missed} targets never showed OFFLINE and {early} showed it before their deadline");
    }
    Ok(())
}

/// One watcher socket: subscribes to targets `lo..hi`, notes each one's first OFFLINE frame.
struct Watcher {
    user: u64,
    target: Target,
    first: u64,
    lo: u64,
    hi: u64,
    arrivals: Arc<Vec<AtomicU64>>,
    beat: Duration,
    stop: tokio_util::sync::CancellationToken,
    base: Instant,
}

impl Watcher {
    async fn run(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
        ready: tokio::sync::mpsc::UnboundedSender<anyhow::Result<()>>,
    ) {
        let r = self.subscribe().await;
        drop(permit);
        match r {
            Ok(socket) => {
                let _ = ready.send(Ok(()));
                self.watch(socket).await;
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    }

    async fn subscribe(
        &self,
    ) -> anyhow::Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    > {
        let url = format!(
            "ws://{}{BASE}/ws?userId={}&deviceId=watch&platform=WEB",
            self.target.addr, self.user
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("websocket connect")?;
        let targets: Vec<u64> = (self.lo..self.hi).map(|k| self.first + k).collect();
        let m = json!({ "type": "subscribe", "id": "s", "targets": targets }).to_string();
        ws.send(Message::Text(m.into())).await?;
        loop {
            let Some(msg) = ws.next().await else {
                bail!("closed before the subscribe reply")
            };
            if let Message::Text(t) = msg? {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] == "reply" {
                    if v["code"].as_u64().is_some_and(|c| c != 200) {
                        bail!("subscribe refused: {t}");
                    }
                    return Ok(ws);
                }
                self.note(&v);
            }
        }
    }

    async fn watch(
        &self,
        ws: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) {
        let (mut tx, mut rx) = ws.split();
        let mut beat = tokio::time::interval(self.beat);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = beat.tick() => {
                    let m = json!({ "type": "heartbeat", "active": true }).to_string();
                    if tx.send(Message::Text(m.into())).await.is_err() { break; }
                }
                msg = rx.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if t.as_str().contains("\"OFFLINE\"") {
                            if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                                self.note(&v);
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    }

    /// Notes the first OFFLINE presence frame of one of this watcher's targets.
    fn note(&self, v: &Value) {
        if v["type"] != "presence" || v["data"]["status"] != "OFFLINE" {
            return;
        }
        let Some(user) = v["data"]["userId"].as_u64() else {
            return;
        };
        let k = user.wrapping_sub(self.first);
        if (self.lo..self.hi).contains(&k) {
            let _ = self.arrivals[k as usize].compare_exchange(
                0,
                stamp(self.base),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}
