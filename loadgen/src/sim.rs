//! `presence-loadgen sim`: a population of users for the push path.
//!
//! N users with M devices each. Every device heartbeats on its interval, over WebSocket (one
//! socket per device, spread over the targets) or REST. Each user subscribes to the K users
//! after it (a ring), so every user has exactly K subscribers. A driver changes the status of
//! random users at a fixed rate through REST; each change is expected on every socket of each
//! of its K subscribers. It reports heartbeat and frame throughput, delivery delay percentiles
//! from the change request to the frame's arrival, delivered/expected, and false offlines (an
//! OFFLINE frame, or an OFFLINE status at the end, for a user who never stopped heartbeating).
//! With `--privacy rules` every user gets privacy rules first (`rules.rs`); with
//! `--settings-changes` a last phase measures how fast a change of settings reaches the watcher
//! it concerns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{emit, parse_duration, read_mem, round, rules, Conn, Format, Histogram, Target, BASE};

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Comma-separated gateway URLs (loopback only); sockets and requests are spread over them.
    #[arg(long, default_value = "http://127.0.0.1:8004")]
    pub target: String,
    /// Users.
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// Devices per user.
    #[arg(long, default_value_t = 1)]
    pub devices: u64,
    /// Targets each user subscribes to (the next K users; 0: none, and a socket then sends
    /// nothing but its heartbeats: an idle socket).
    #[arg(long, default_value_t = 10)]
    pub subscriptions: u64,
    /// How devices heartbeat: ws (one socket each) or rest.
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: Transport,
    /// Heartbeat interval of each device.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub interval: Duration,
    /// How long to measure, after everyone is connected and subscribed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Status changes per second (through REST), spread over random users.
    #[arg(long, default_value_t = 50)]
    pub changes: u64,
    /// First user id (ids are first..first+users).
    #[arg(long, default_value_t = 7_000_000_000)]
    pub first_user: u64,
    /// Concurrent connections for set-up and REST traffic.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// PIDs of gateway processes, for memory per socket (comma-separated).
    #[arg(long)]
    pub gateway_pids: Option<String>,
    /// Privacy rules on every user once set up (see `rules.rs`: watchers stay allowed, so the
    /// expected deliveries do not change).
    #[arg(long, value_enum, default_value = "off")]
    pub privacy: rules::Privacy,
    /// Settings changes per second, after the status changes: a random user denies one of its
    /// watchers (who must get its OFFLINE view), then, once that arrived, lifts the denial (the
    /// watcher must get its real view again). 0 skips this phase.
    #[arg(long, default_value_t = 0)]
    pub settings_changes: u64,
    /// How long the settings changes run.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub settings_duration: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Rest,
}

/// Shared counters.
#[derive(Default)]
struct Stats {
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    frames: AtomicU64,
    presence_frames: AtomicU64,
    delivered: AtomicU64,
    false_offline: AtomicU64,
    closed: AtomicU64,
    settings_delivered: AtomicU64,
}

/// Change records: the change's unique custom text → when it was requested (recorded before
/// the request, since its event may arrive before the answer).
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// Settings changes awaiting their frame: (user, watcher) → when the change was requested and
/// whether the watcher must see the user OFFLINE (denied) or not (the denial lifted).
type Pending = Arc<Mutex<HashMap<(u64, u64), (Instant, bool)>>>;

pub async fn run(format: Format, a: SimArgs) -> anyhow::Result<()> {
    if a.subscriptions >= a.users {
        bail!("--subscriptions must be below --users");
    }
    let targets: Vec<Target> = a
        .target
        .split(',')
        .map(|t| Target::parse(t.trim()))
        .collect::<anyhow::Result<_>>()?;
    let stats = Arc::new(Stats::default());
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let hist = Arc::new(Mutex::new(Histogram::new()));
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let settings_hist = Arc::new(Mutex::new(Histogram::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let mem_before = pids(&a.gateway_pids)
        .iter()
        .map(|p| read_mem(*p).map(|m| m.rss_kb).unwrap_or(0))
        .sum::<u64>();

    // 1. Devices come online: sockets (which bring them online) or REST /online.
    let setup = Instant::now();
    let total = a.users * a.devices;
    let mut tasks = Vec::new();
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(a.connections.max(1)));
    for i in 0..total {
        let (u, d) = (a.first_user + i / a.devices, i % a.devices);
        let target = targets[(i as usize) % targets.len()].clone();
        let ctx = Device {
            user: u,
            device: format!("sim-{d}"),
            target,
            stats: stats.clone(),
            sent: sent.clone(),
            hist: hist.clone(),
            pending: pending.clone(),
            settings_hist: settings_hist.clone(),
            measuring: measuring.clone(),
            stop: stop.clone(),
            interval: a.interval,
            subscribe: (d == 0).then(|| {
                (1..=a.subscriptions)
                    .map(|k| a.first_user + (u - a.first_user + k) % a.users)
                    .collect()
            }),
        };
        let permit = sem.clone().acquire_owned().await?;
        let done = opened.clone();
        let fail = failed.clone();
        let transport = a.transport;
        tasks.push(tokio::spawn(async move {
            let r = match transport {
                Transport::Ws => ctx.socket(permit, done).await,
                Transport::Rest => ctx.rest(permit, done).await,
            };
            if let Err(e) = &r {
                if fail.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("device failed: {e:#}");
                }
            }
        }));
        if i % 1000 == 999 {
            eprint!(
                "\rsetting up: {}/{total} devices",
                opened.load(Ordering::Relaxed)
            );
        }
    }
    // Wait until every device is set up (bounded).
    let until = Instant::now() + Duration::from_secs(600);
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total {
        if Instant::now() > until {
            bail!(
                "only {} of {total} devices set up",
                opened.load(Ordering::Relaxed)
            );
        }
        eprint!(
            "\rsetting up: {}/{total} devices",
            opened.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let setup_took = setup.elapsed();
    eprintln!("\rset up {total} devices in {setup_took:?}");
    let mem_after = pids(&a.gateway_pids)
        .iter()
        .map(|p| read_mem(*p).map(|m| m.rss_kb).unwrap_or(0))
        .sum::<u64>();
    let privacy_took = match a.privacy {
        rules::Privacy::Rules => Some(
            rules::apply(
                &targets,
                a.first_user,
                a.users,
                a.subscriptions,
                a.connections,
            )
            .await?,
        ),
        rules::Privacy::Off => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. Measure: the driver changes statuses; devices heartbeat; sockets count deliveries.
    measuring.store(true, Ordering::Relaxed);
    let frames0 = stats.frames.load(Ordering::Relaxed);
    let hb0 = stats.heartbeats.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut changes = 0u64;
    let mut attempts = 0u64;
    let mut conns: Vec<Conn> = targets
        .iter()
        .cycle()
        .take(8)
        .cloned()
        .map(Conn::new)
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.changes.max(1) as f64));
    let mut last_progress = Instant::now();
    let mut rng = started.elapsed().as_nanos() as u64 | 1;
    while started.elapsed() < a.duration {
        tick.tick().await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let user = a.first_user + rng % a.users;
        let status = if changes % 2 == 0 { "BUSY" } else { "AWAY" };
        let text = format!("c{attempts}");
        attempts += 1;
        let body = Bytes::from(json!({ "status": status, "customText": text }).to_string());
        let conn = &mut conns[(attempts % 8) as usize];
        sent.lock().insert(text, Instant::now());
        let path = format!("{BASE}/status/{user}");
        if let Ok((StatusCode::OK, _)) = conn.call(Method::PUT, &path, Some(body)).await {
            changes += 1;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let h = hist.lock();
            eprint!(
                "\r[{:>4.0}s] changes {changes} delivered {} p99 {:.1} ms heartbeats {} false-offline {}   ",
                started.elapsed().as_secs_f64(),
                stats.delivered.load(Ordering::Relaxed),
                h.quantile(0.99) as f64 / 1000.0,
                stats.heartbeats.load(Ordering::Relaxed) - hb0,
                stats.false_offline.load(Ordering::Relaxed),
            );
        }
    }
    // Let the last deliveries land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!();

    // 2b. Settings changes: deny a watcher, wait for its OFFLINE view, lift the denial, wait
    // for its real view; each wait bounded by 2 s (a miss counts as undelivered).
    let mut settings_sent = 0u64;
    if a.settings_changes > 0 {
        let began = Instant::now();
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / a.settings_changes as f64));
        let k = a.subscriptions.max(1);
        while began.elapsed() < a.settings_duration {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let user = a.first_user + rng % a.users;
            let watcher = rules::before(user, 1 + (rng >> 32) % k, a.first_user, a.users);
            for deny in [true, false] {
                tick.tick().await;
                let body = match a.privacy {
                    rules::Privacy::Rules => rules::settings(
                        user,
                        a.first_user,
                        a.users,
                        a.subscriptions,
                        deny.then_some(watcher),
                    ),
                    rules::Privacy::Off => {
                        json!({ "deny": if deny { vec![watcher] } else { vec![] } })
                    }
                };
                pending
                    .lock()
                    .insert((user, watcher), (Instant::now(), deny));
                if rules::put(&mut conns[0], user, &body).await.is_err() {
                    pending.lock().remove(&(user, watcher));
                    break;
                }
                settings_sent += 1;
                let until = Instant::now() + Duration::from_secs(2);
                while pending.lock().contains_key(&(user, watcher)) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                pending.lock().remove(&(user, watcher));
            }
            eprint!(
                "\r[{:>4.0}s] settings changes {settings_sent} delivered {}   ",
                began.elapsed().as_secs_f64(),
                stats.settings_delivered.load(Ordering::Relaxed)
            );
        }
        eprintln!();
    }

    // 3. Final check: nobody who kept heartbeating is OFFLINE.
    let mut offline_at_end = 0u64;
    let ids: Vec<u64> = (a.first_user..a.first_user + a.users).collect();
    for chunk in ids.chunks(1000) {
        let body = Bytes::from(json!({ "userIds": chunk }).to_string());
        let (code, bytes) = conns[0]
            .call(Method::POST, &format!("{BASE}/status/batch"), Some(body))
            .await?;
        if code != StatusCode::OK {
            bail!("batch query answered {code}");
        }
        let v: Value = serde_json::from_slice(&bytes)?;
        offline_at_end += v["data"].as_array().map_or(0, |es| {
            es.iter().filter(|e| e["status"] == "OFFLINE").count() as u64
        });
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    let expected = changes * a.subscriptions * a.devices;
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let h = hist.lock().clone();
    let sh = settings_hist.lock().clone();
    let sockets = if a.transport == Transport::Ws {
        total
    } else {
        0
    };
    let frames = stats.frames.load(Ordering::Relaxed) - frames0;
    let out = json!({
        "transport": format!("{:?}", a.transport).to_lowercase(),
        "users": a.users,
        "devices": total,
        "subscriptions_per_user": a.subscriptions,
        "setup_seconds": round(setup_took.as_secs_f64(), 2),
        "measured_seconds": round(elapsed, 2),
        "heartbeats_per_second": round((stats.heartbeats.load(Ordering::Relaxed) - hb0) as f64 / elapsed, 1),
        "heartbeat_errors": stats.heartbeat_errors.load(Ordering::Relaxed),
        "changes": changes,
        "changes_per_second": round(changes as f64 / elapsed, 1),
        "frames_per_second": round(frames as f64 / elapsed, 1),
        "presence_frames_per_second": round(stats.presence_frames.load(Ordering::Relaxed) as f64 / elapsed, 1),
        "delivered": delivered,
        "expected": expected,
        "delivered_over_expected": if expected == 0 { 0.0 } else { round(delivered as f64 / expected as f64, 4) },
        "delay_ms_p50": round(h.quantile(0.50) as f64 / 1000.0, 2),
        "delay_ms_p90": round(h.quantile(0.90) as f64 / 1000.0, 2),
        "delay_ms_p99": round(h.quantile(0.99) as f64 / 1000.0, 2),
        "delay_ms_max": round(h.max as f64 / 1000.0, 2),
        "false_offlines": stats.false_offline.load(Ordering::Relaxed) + offline_at_end,
        "sockets_closed_by_server": stats.closed.load(Ordering::Relaxed),
        "devices_failed_to_connect": failed.load(Ordering::Relaxed),
        "privacy": format!("{:?}", a.privacy).to_lowercase(),
        "privacy_setup_seconds": privacy_took.map(|t| round(t.as_secs_f64(), 2)),
        "settings_changes": settings_sent,
        "settings_delivered": stats.settings_delivered.load(Ordering::Relaxed),
        "settings_delay_ms_p50": round(sh.quantile(0.50) as f64 / 1000.0, 2),
        "settings_delay_ms_p99": round(sh.quantile(0.99) as f64 / 1000.0, 2),
        "settings_delay_ms_max": round(sh.max as f64 / 1000.0, 2),
        "gateway_rss_bytes_per_socket": if sockets == 0 || mem_after == 0 { 0.0 } else { round((mem_after.saturating_sub(mem_before)) as f64 * 1024.0 / sockets as f64, 1) },
    });
    emit(format, &out);
    Ok(())
}

fn pids(raw: &Option<String>) -> Vec<u32> {
    raw.as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

struct Device {
    user: u64,
    device: String,
    target: Target,
    stats: Arc<Stats>,
    sent: Sent,
    hist: Arc<Mutex<Histogram>>,
    pending: Pending,
    settings_hist: Arc<Mutex<Histogram>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
    interval: Duration,
    /// Set on one device per user: the targets that user subscribes to.
    subscribe: Option<Vec<u64>>,
}

impl Device {
    /// One WebSocket: subscribe (first device of a user), heartbeat on the interval, count frames.
    async fn socket(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
        opened: Arc<AtomicU64>,
    ) -> anyhow::Result<()> {
        let url = format!(
            "ws://{}{BASE}/ws?userId={}&deviceId={}&platform=WEB",
            self.target.addr, self.user, self.device
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("websocket connect")?;
        let (mut tx, mut rx) = ws.split();
        // With `--subscriptions 0` a socket sends nothing until its first heartbeat (an idle
        // socket); it counts as set up once its welcome arrived.
        let (wait_for, what) = match self.subscribe.as_ref().filter(|t| !t.is_empty()) {
            Some(targets) => {
                let m = json!({ "type": "subscribe", "id": "s", "targets": targets }).to_string();
                tx.send(Message::Text(m.into())).await?;
                // Wait for the reply so that measuring starts with everyone subscribed.
                ("\"type\":\"reply\"", "the subscribe reply")
            }
            None => ("\"type\":\"welcome\"", "the welcome"),
        };
        loop {
            let Some(msg) = rx.next().await else {
                bail!("closed before {what}")
            };
            if let Message::Text(t) = msg? {
                if t.as_str().contains(wait_for) {
                    break;
                }
            }
        }
        drop(permit);
        opened.fetch_add(1, Ordering::Relaxed);
        // Spread heartbeats over the interval.
        let phase = Duration::from_millis(
            self.user.wrapping_mul(7919) % self.interval.as_millis().max(1) as u64,
        );
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, self.interval);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = beat.tick() => {
                    let m = json!({ "type": "heartbeat", "active": true }).to_string();
                    if tx.send(Message::Text(m.into())).await.is_err() {
                        self.stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                msg = rx.next() => match msg {
                    Some(Ok(Message::Text(t))) => self.frame(t.as_str()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        self.stats.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
        let _ = tx.send(Message::Close(None)).await;
        Ok(())
    }

    fn frame(&self, text: &str) {
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        if !text.starts_with("{\"data\"") && !text.contains("\"type\":\"presence\"") {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if v["type"] != "presence" {
            return;
        }
        if self.measuring.load(Ordering::Relaxed) {
            self.stats.presence_frames.fetch_add(1, Ordering::Relaxed);
        }
        let Some(user) = v["data"]["userId"].as_u64() else {
            return;
        };
        let offline = v["data"]["status"] == "OFFLINE";
        let settled = {
            let mut p = self.pending.lock();
            match p.get(&(user, self.user)) {
                Some(&(at, deny)) if deny == offline => {
                    p.remove(&(user, self.user));
                    Some(at)
                }
                _ => None,
            }
        };
        if let Some(at) = settled {
            self.settings_hist.lock().record(at.elapsed());
            self.stats
                .settings_delivered
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if offline {
            self.stats.false_offline.fetch_add(1, Ordering::Relaxed);
        }
        if !self.measuring.load(Ordering::Relaxed) || user == self.user {
            return;
        }
        let Some(text) = v["data"]["customText"].as_str() else {
            return;
        };
        let at = self.sent.lock().get(text).copied();
        if let Some(at) = at {
            self.hist.lock().record(at.elapsed());
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One device over REST: online, subscribe (first device of a user), heartbeat on the
    /// interval. Deliveries are not observable over REST.
    async fn rest(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
        opened: Arc<AtomicU64>,
    ) -> anyhow::Result<()> {
        let mut conn = Conn::new(self.target.clone());
        let body = Bytes::from(
            json!({ "userId": self.user, "deviceId": self.device, "platform": "WEB" }).to_string(),
        );
        let (code, _) = conn
            .call(Method::POST, &format!("{BASE}/online"), Some(body))
            .await?;
        if code != StatusCode::OK {
            bail!("online answered {code}");
        }
        if let Some(targets) = &self.subscribe {
            let body = Bytes::from(json!({ "targets": targets, "mode": "replace" }).to_string());
            conn.call(
                Method::PUT,
                &format!("{BASE}/subscriptions/{}", self.user),
                Some(body),
            )
            .await?;
        }
        drop(conn);
        drop(permit);
        opened.fetch_add(1, Ordering::Relaxed);
        let phase = Duration::from_millis(
            self.user.wrapping_mul(7919) % self.interval.as_millis().max(1) as u64,
        );
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, self.interval);
        let mut conn = Conn::new(self.target.clone());
        let hb = Bytes::from(
            json!({ "userId": self.user, "deviceId": self.device, "active": true }).to_string(),
        );
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = beat.tick() => {
                    match conn.call(Method::POST, &format!("{BASE}/heartbeat"), Some(hb.clone())).await {
                        Ok((StatusCode::OK, _)) => { self.stats.heartbeats.fetch_add(1, Ordering::Relaxed); }
                        _ => { self.stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed); }
                    }
                    // Do not hold an idle connection per device.
                    conn = Conn::new(self.target.clone());
                }
            }
        }
        Ok(())
    }
}
