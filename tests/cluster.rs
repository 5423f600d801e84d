//! The sharded cluster for real: shards and gateways as separate processes of the binary on
//! loopback, with static discovery, on the shared Redis Cluster (`PRESENCE_TEST_REDIS_URL`, set
//! by `scripts/test.sh`). Users heartbeat through both gateways while shards are killed with
//! `kill -9`, restarted, added and stopped with SIGTERM; batch status polls watch that nobody
//! who heartbeats ever reads OFFLINE, and that those who stop do go OFFLINE in time.
//!
//! The whole REST suite through the gateways is `tests/http.rs` with
//! `PRESENCE_TEST_TOPOLOGY=cluster` (the third pass of `scripts/test.sh`).
//!
//! The tests here run one at a time: every cluster reloads the live users of the partitions it
//! owns from the one shared Redis, so two clusters running at once would each time out the
//! other's users (which nobody heartbeats to it) and write them OFFLINE into the store.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{uid, Cluster, Proc};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const ONLINE: &str = "/api/v1/presence/online";
const OFFLINE: &str = "/api/v1/presence/offline";
const HEARTBEAT: &str = "/api/v1/presence/heartbeat";
const BATCH: &str = "/api/v1/presence/status/batch";

/// Transitions that a heartbeating user must never make.
const WENT_OFFLINE: &str = "presence_status_transitions_total{from=\"ONLINE\",to=\"OFFLINE\"}";

/// Heartbeat every second, OFFLINE 4 s after the last one.
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(4);

/// What every process of these clusters runs with.
const ENVS: &[(&str, &str)] = &[
    ("PRESENCE_HEARTBEAT_INTERVAL", "1s"),
    ("PRESENCE_HEARTBEAT_TIMEOUT", "4s"),
    ("PRESENCE_IDLE_TIMEOUT", "10m"),
    ("PRESENCE_HEALTH_INTERVAL", "500ms"),
    ("RUST_LOG", "info"),
];

/// Heartbeats in flight at most.
const CONCURRENCY: usize = 256;

/// How long a cluster may take to settle after a change (generous: 2 cores, many processes).
const SETTLE: Duration = Duration::from_secs(20);

/// One cluster test at a time (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn redis() -> Option<String> {
    presence_service::store::test_redis_urls()
}

/// Runs blocking harness work (spawning, killing, waiting for processes) off the async workers.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Puts every user online (one device, "d"), through both gateways, a few at a time.
async fn online_all(c: &Cluster, users: &[u64]) {
    let results: Vec<(u64, u16, Value)> = futures::stream::iter(users.iter().enumerate())
        .map(|(j, &u)| async move {
            let body = json!({"userId": u, "deviceId": "d", "platform": "IOS"});
            let (code, v) = c.post(j % c.gateways(), ONLINE, body).await;
            (u, code, v)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (u, code, v) in results {
        assert_eq!(code, 200, "online {u}: {v}");
        assert_eq!(v["data"]["status"], "ONLINE", "online {u}: {v}");
    }
}

/// Takes every user's device offline: what a test leaves in the shared Redis is then no live
/// user for the next cluster to reload and time out.
async fn offline_all(c: &Cluster, users: &[u64]) {
    let _: Vec<(u16, Value)> = futures::stream::iter(users.iter().enumerate())
        .map(|(j, &u)| {
            let body = json!({"userId": u, "deviceId": "d"});
            c.post(j % c.gateways(), OFFLINE, body)
        })
        .buffer_unordered(32)
        .collect()
        .await;
}

/// The statuses of `users` (at most the batch limit) through the gateway at `base`.
async fn batch(
    client: &reqwest::Client,
    base: &str,
    users: &[u64],
) -> Result<Vec<(u64, String)>, String> {
    let resp = client
        .post(format!("{base}{BATCH}"))
        .json(&json!({ "userIds": users }))
        .send()
        .await
        .map_err(|e| format!("batch: {e}"))?;
    let code = resp.status().as_u16();
    let v: Value = resp.json().await.map_err(|e| format!("batch body: {e}"))?;
    if code != 200 {
        return Err(format!("batch answered {code}: {v}"));
    }
    let entries = v["data"].as_array().ok_or("batch data is not an array")?;
    if entries.len() != users.len() {
        return Err(format!(
            "{} entries for {} users",
            entries.len(),
            users.len()
        ));
    }
    Ok(entries
        .iter()
        .map(|e| {
            (
                e["userId"].as_u64().unwrap_or(0),
                e["status"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect())
}

/// The statuses of any number of users, in chunks of 1000, alternating gateways.
async fn statuses(
    client: &reqwest::Client,
    bases: &[String],
    users: &[u64],
    turn: &mut usize,
) -> Result<Vec<(u64, String)>, String> {
    let mut out = Vec::with_capacity(users.len());
    for chunk in users.chunks(1000) {
        *turn += 1;
        out.extend(batch(client, &bases[*turn % bases.len()], chunk).await?);
    }
    Ok(out)
}

fn bases(c: &Cluster) -> Vec<String> {
    (0..c.gateways()).map(|k| c.base(k)).collect()
}

// ---------------------------------------------------------------------------------------------
// Load: every user heartbeats every second through the gateways

#[derive(Default)]
struct LoadStats {
    sent: AtomicU64,
    ok: AtomicU64,
    unavailable: AtomicU64,
    not_online: AtomicU64,
    other: AtomicU64,
    transport: AtomicU64,
    max_latency_ms: AtomicU64,
    /// The longest time between two heartbeats of one user: above `INTERVAL` when the load
    /// itself falls behind (a busy machine), which could time a user out for real.
    max_gap_ms: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// What a load run did.
struct LoadReport {
    sent: u64,
    ok: u64,
    /// 503: no owner answered within the route timeout while the ring moved.
    unavailable: u64,
    /// 404 "device not online": the owner did not know the device.
    not_online: u64,
    other: u64,
    transport: u64,
    max_latency_ms: u64,
    max_gap_ms: u64,
    failures: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sent, {} ok, {} 503, {} 404, {} other, {} transport errors, slowest {} ms, \
             longest gap between a user's heartbeats {} ms",
            self.sent,
            self.ok,
            self.unavailable,
            self.not_online,
            self.other,
            self.transport,
            self.max_latency_ms,
            self.max_gap_ms
        )?;
        if !self.failures.is_empty() {
            write!(f, " (first failures: {:?})", self.failures)?;
        }
        Ok(())
    }
}

struct Load {
    epoch: Instant,
    index: HashMap<u64, usize>,
    active: Arc<Vec<AtomicBool>>,
    /// Per user: when (ms since `epoch`) the latest heartbeat that was answered 200 was sent
    /// (the server cannot have seen it earlier)...
    last_ok: Arc<Vec<AtomicU64>>,
    /// ...and when that answer came (the server had seen it by then).
    last_ok_answered: Arc<Vec<AtomicU64>>,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
    inflight: Arc<Semaphore>,
    driver: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Every user heartbeats every `INTERVAL`, spread evenly over it, alternating gateways,
    /// with at most `CONCURRENCY` heartbeats in flight.
    fn start(c: &Cluster, users: &[u64], epoch: Instant) -> Load {
        let users = Arc::new(users.to_vec());
        let active: Arc<Vec<AtomicBool>> =
            Arc::new(users.iter().map(|_| AtomicBool::new(true)).collect());
        let now = ms(epoch.elapsed());
        let last_ok: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(now)).collect());
        let last_ok_answered: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(now)).collect());
        let last_sent: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(now)).collect());
        let stats = Arc::new(LoadStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let inflight = Arc::new(Semaphore::new(CONCURRENCY));
        let index = users.iter().enumerate().map(|(j, &u)| (u, j)).collect();
        let driver = tokio::spawn({
            let (active, last_ok, answered, sent, stats, stop, inflight) = (
                active.clone(),
                last_ok.clone(),
                last_ok_answered.clone(),
                last_sent.clone(),
                stats.clone(),
                stop.clone(),
                inflight.clone(),
            );
            let client = c.client().clone();
            let bases = bases(c);
            async move {
                let start = tokio::time::Instant::now();
                let n = users.len() as u32;
                for round in 0u32.. {
                    let round_start = start + INTERVAL * round;
                    for (j, &user) in users.iter().enumerate() {
                        tokio::time::sleep_until(round_start + INTERVAL * j as u32 / n).await;
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if !active[j].load(Ordering::Relaxed) {
                            continue;
                        }
                        let permit = inflight.clone().acquire_owned().await.expect("open");
                        let url =
                            format!("{}{HEARTBEAT}", bases[(j + round as usize) % bases.len()]);
                        let (client, stats, last_ok, answered, sent) = (
                            client.clone(),
                            stats.clone(),
                            last_ok.clone(),
                            answered.clone(),
                            sent.clone(),
                        );
                        tokio::spawn(async move {
                            let last = (&last_ok[j], &answered[j], &sent[j]);
                            beat(&client, &url, user, epoch, &stats, last).await;
                            drop(permit);
                        });
                    }
                }
            }
        });
        Load {
            epoch,
            index,
            active,
            last_ok,
            last_ok_answered,
            stats,
            stop,
            inflight,
            driver,
        }
    }

    /// Stops the heartbeats of `users` (those in flight still land).
    fn stop_users(&self, users: &[u64]) {
        for u in users {
            self.active[self.index[u]].store(false, Ordering::Relaxed);
        }
    }

    /// When the last heartbeat of `user` answered 200 was sent (ms since the epoch).
    fn last_ok(&self, user: u64) -> u64 {
        self.last_ok[self.index[&user]].load(Ordering::Relaxed)
    }

    /// When the answer to that heartbeat came (ms since the epoch).
    fn last_ok_answered(&self, user: u64) -> u64 {
        self.last_ok_answered[self.index[&user]].load(Ordering::Relaxed)
    }

    /// Stops every heartbeat and waits for those in flight.
    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.driver.await;
        let _all = self
            .inflight
            .acquire_many(CONCURRENCY as u32)
            .await
            .expect("open");
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadReport {
            sent: get(&s.sent),
            ok: get(&s.ok),
            unavailable: get(&s.unavailable),
            not_online: get(&s.not_online),
            other: get(&s.other),
            transport: get(&s.transport),
            max_latency_ms: get(&s.max_latency_ms),
            max_gap_ms: get(&s.max_gap_ms),
            failures: s.failures.lock().clone(),
        }
    }
}

/// One heartbeat of `user` to `url`, counted in `stats`.
async fn beat(
    client: &reqwest::Client,
    url: &str,
    user: u64,
    epoch: Instant,
    stats: &LoadStats,
    (last_ok, answered, last_sent): (&AtomicU64, &AtomicU64, &AtomicU64),
) {
    let sent_at = ms(epoch.elapsed());
    let gap = sent_at.saturating_sub(last_sent.swap(sent_at, Ordering::Relaxed));
    stats.max_gap_ms.fetch_max(gap, Ordering::Relaxed);
    stats.sent.fetch_add(1, Ordering::Relaxed);
    let r = client
        .post(url)
        .json(&json!({"userId": user, "deviceId": "d"}))
        .send()
        .await;
    let latency = ms(epoch.elapsed()) - sent_at;
    stats.max_latency_ms.fetch_max(latency, Ordering::Relaxed);
    let failure = match r {
        Ok(resp) if resp.status() == 200 => {
            stats.ok.fetch_add(1, Ordering::Relaxed);
            // The later of two answers may be to the earlier heartbeat: keep the pair of the
            // latest one sent.
            if last_ok.fetch_max(sent_at, Ordering::Relaxed) <= sent_at {
                answered.store(sent_at + latency, Ordering::Relaxed);
            }
            None
        }
        Ok(resp) => {
            let code = resp.status().as_u16();
            let counter = match code {
                503 => &stats.unavailable,
                404 => &stats.not_online,
                _ => &stats.other,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let body = resp.text().await.unwrap_or_default();
            Some(format!("+{sent_at} ms user {user}: {code} {body}"))
        }
        Err(e) => {
            stats.transport.fetch_add(1, Ordering::Relaxed);
            Some(format!("+{sent_at} ms user {user}: {e}"))
        }
    };
    if let Some(f) = failure {
        let mut fs = stats.failures.lock();
        if fs.len() < 20 {
            fs.push(f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watch: users that must read ONLINE in every batch poll

#[derive(Debug, Default)]
struct WatchReport {
    polls: u64,
    failed_polls: u64,
    poll_errors: Vec<String>,
    /// Every read of a watched user that was not ONLINE: (ms since the epoch, user, status).
    violations: Vec<(u64, u64, String)>,
}

struct Watch {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<WatchReport>,
}

impl Watch {
    /// Polls the statuses of `users` every `every` through alternating gateways.
    fn start(c: &Cluster, users: &[u64], epoch: Instant, every: Duration) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, bases, users, flag) =
            (c.client().clone(), bases(c), users.to_vec(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut report = WatchReport::default();
            let mut turn = 0;
            while !flag.load(Ordering::Relaxed) {
                let next = tokio::time::Instant::now() + every;
                match statuses(&client, &bases, &users, &mut turn).await {
                    Ok(entries) => {
                        report.polls += 1;
                        let at = ms(epoch.elapsed());
                        for (u, status) in entries {
                            if status != "ONLINE" {
                                report.violations.push((at, u, status));
                            }
                        }
                    }
                    Err(e) => {
                        report.failed_polls += 1;
                        if report.poll_errors.len() < 10 {
                            report
                                .poll_errors
                                .push(format!("+{} ms {e}", ms(epoch.elapsed())));
                        }
                    }
                }
                tokio::time::sleep_until(next).await;
            }
            report
        });
        Watch { stop, handle }
    }

    async fn finish(self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the watch task")
    }
}

/// Asserts that nobody watched ever read anything but ONLINE (false offline).
fn assert_no_false_offline(w: &WatchReport, l: &LoadReport, what: &str) {
    assert!(
        w.polls > 0,
        "{what}: no successful poll: {:?}",
        w.poll_errors
    );
    let first: Vec<_> = w.violations.iter().take(10).collect();
    assert!(
        w.violations.is_empty(),
        "{what}: {} reads of a heartbeating user were not ONLINE (first, as (ms, user, \
         status): {first:?}); heartbeats: {l}",
        w.violations.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics over the shards

/// `series` on every running shard.
async fn per_shard(c: &Cluster, series: &str) -> BTreeMap<usize, f64> {
    let mut out = BTreeMap::new();
    for i in c.running_shards() {
        out.insert(i, c.metric(Proc::Shard(i), series).await);
    }
    out
}

/// Waits until the shards count exactly `n` users online: the live users of earlier tests that
/// they reloaded from the shared Redis have timed out, so from now on every status transition
/// counted is one of ours.
async fn wait_only_ours_online(c: &Cluster, n: usize) {
    let until = Instant::now() + TIMEOUT + SETTLE;
    loop {
        let online = c.shard_sum("presence_online_users").await;
        if online == n as f64 {
            return;
        }
        assert!(
            Instant::now() < until,
            "the shards count {online} users online, want {n}\n{}",
            c.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many of `users` the ring `members` gives to shard `i`.
fn owned_by(c: &Cluster, members: &[usize], users: &[u64], i: usize) -> usize {
    let ring = c.ring_of(members);
    let me = c.shard_addr(i);
    users
        .iter()
        .filter(|&&u| ring.owner_of(u) == Some(me.as_str()))
        .count()
}

/// Polls `quiet` (users that stopped heartbeating) every 200 ms until every one reads OFFLINE,
/// checking that none reads OFFLINE before `TIMEOUT` after its last heartbeat answered 200, and
/// that each does by its `deadline` (ms since the epoch): a poll sent after it must read the
/// user OFFLINE. Returns, per user, when it was first seen OFFLINE (the poll's send time).
async fn expect_offline_in_time(
    c: &Cluster,
    load: &Load,
    quiet: &[u64],
    deadline: impl Fn(u64) -> u64,
) -> HashMap<u64, u64> {
    let (client, bases) = (c.client().clone(), bases(c));
    let mut turn = 0;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let timeout = ms(TIMEOUT);
    loop {
        let sent = ms(load.epoch.elapsed());
        let entries = match statuses(&client, &bases, quiet, &mut turn).await {
            Ok(e) => e,
            Err(e) => {
                let late = quiet
                    .iter()
                    .any(|&u| !seen.contains_key(&u) && sent >= deadline(u));
                assert!(!late, "a poll after a deadline failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let answered = ms(load.epoch.elapsed());
        for (u, status) in entries {
            let last = load.last_ok(u);
            if status == "OFFLINE" {
                assert!(
                    answered >= last + timeout,
                    "user {u} read OFFLINE at +{answered} ms, before the {timeout} ms timeout \
                     after its last heartbeat (+{last} ms)"
                );
                seen.entry(u).or_insert(sent);
            } else {
                assert!(
                    !seen.contains_key(&u),
                    "user {u} read {status} after OFFLINE"
                );
                assert!(
                    sent < deadline(u),
                    "user {u} still reads {status} in a poll sent at +{sent} ms, after its \
                     deadline +{} ms (last heartbeat +{last} ms)",
                    deadline(u)
                );
            }
        }
        if seen.len() == quiet.len() {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// A settled cluster (3 shards, 2 gateways, `spare` more shards declared) whose shards count
/// exactly `users` online, every one heartbeating.
async fn cluster_under_load(url: &str, spare: usize, users: &[u64]) -> (Cluster, Load, Duration) {
    let t0 = Instant::now();
    let c = blocking(|| Cluster::start_opts(3, 2, spare, ENVS, Some(url)));
    let started = t0.elapsed();
    online_all(&c, users).await;
    let load = Load::start(&c, users, Instant::now());
    wait_only_ours_online(&c, users.len()).await;
    (c, load, started)
}

/// The wrong-owner retries of every gateway.
async fn wrong_owner_retries(c: &Cluster) -> f64 {
    let mut n = 0.0;
    for k in 0..c.gateways() {
        n += c
            .metric(Proc::Gateway(k), "presence_wrong_owner_retries_total")
            .await;
    }
    n
}

fn assert_heartbeats_landed(l: &LoadReport, what: &str) {
    assert!(l.ok > 0, "{what}: no heartbeat landed: {l}");
    assert_eq!(
        l.not_online, 0,
        "{what}: heartbeats refused as not online (an owner without the device): {l}"
    );
    assert_eq!(l.other + l.transport, 0, "{what}: heartbeats failed: {l}");
}

/// (a) `kill -9` of one shard while 1,000 users heartbeat through both gateways leaves every
/// one of them ONLINE; (b) the dead shard's users that stopped heartbeating just before go
/// OFFLINE no later than the heartbeat timeout + 5 s after the kill, and none before the timeout
/// after its last heartbeat. Every ONLINE -> OFFLINE transition counted is one of a user who
/// stopped, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_shard_under_load_makes_no_false_offline_and_times_out_the_silent() {
    let Some(url) = redis() else { return };
    let _serial = SERIAL.lock().await;
    let beating: Vec<u64> = (0..1000).map(|_| uid()).collect();
    let quiet: Vec<u64> = (0..300).map(|_| uid()).collect();
    let all: Vec<u64> = beating.iter().chain(&quiet).copied().collect();
    let (mut c, load, started) = cluster_under_load(&url, 0, &all).await;
    let epoch = load.epoch;
    let watch = Watch::start(&c, &beating, epoch, Duration::from_millis(500));
    let before = per_shard(&c, WENT_OFFLINE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The quiet users stop; a moment later shard 1 dies.
    let victim = 1;
    let (victim_addr, ring3) = (c.shard_addr(victim), c.ring_of(&[0, 1, 2]));
    let dead: Vec<u64> = quiet
        .iter()
        .copied()
        .filter(|&u| ring3.owner_of(u) == Some(victim_addr.as_str()))
        .collect();
    load.stop_users(&quiet);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim_went_offline = c.metric(Proc::Shard(victim), WENT_OFFLINE).await;
    let kill_at = ms(epoch.elapsed());
    blocking(|| c.kill_shard(victim));
    let deadline = kill_at + ms(TIMEOUT) + 5_000;
    let (seen, settled) = tokio::join!(
        expect_offline_in_time(&c, &load, &quiet, |_| deadline),
        c.wait_settled(SETTLE)
    );

    // Keep going a while past the deadline: a heartbeating user that a new owner failed to
    // load, or loaded without its device, would have timed out by then.
    let hold = kill_at + ms(TIMEOUT) + 7_000;
    tokio::time::sleep(Duration::from_millis(
        hold.saturating_sub(ms(epoch.elapsed())),
    ))
    .await;
    let latest_dead = dead.iter().map(|u| seen[u] - kill_at).max().unwrap_or(0);
    let latest_other = quiet
        .iter()
        .filter(|u| !dead.contains(u))
        .map(|&u| seen[&u].saturating_sub(load.last_ok_answered(u)))
        .max()
        .unwrap_or(0);
    let w = watch.finish().await;
    let l = load.finish().await;
    let after = per_shard(&c, WENT_OFFLINE).await;
    let went_offline: f64 = after.iter().map(|(i, v)| v - before[i]).sum::<f64>()
        + (victim_went_offline - before[&victim]);
    let online = c.shard_sum("presence_online_users").await;
    let retries = wrong_owner_retries(&c).await;
    println!(
        "kill -9: cluster up in {started:?}; {} heartbeating + {} quiet users ({} quiet on the \
         dead shard); settled without it {settled:?} after the kill; heartbeats: {l}; batch \
         polls {} ok, {} failed {:?}, false offline {}; the dead shard's quiet users OFFLINE at \
         most {latest_dead} ms after the kill (allowed {} ms), the others at most {latest_other} \
         ms after their last heartbeat; ONLINE->OFFLINE transitions {went_offline}; wrong-owner \
         retries {retries}",
        beating.len(),
        quiet.len(),
        dead.len(),
        w.polls,
        w.failed_polls,
        w.poll_errors,
        w.violations.len(),
        ms(TIMEOUT) + 5_000,
    );
    offline_all(&c, &all).await;
    assert_no_false_offline(&w, &l, "kill -9");
    assert_heartbeats_landed(&l, "kill -9");
    assert!(!dead.is_empty(), "no quiet user on the dead shard");
    assert_eq!(
        went_offline,
        quiet.len() as f64,
        "ONLINE -> OFFLINE transitions: the quiet users', once each, and no other"
    );
    assert_eq!(online, beating.len() as f64, "users online on the shards");
}

/// (c) A shard killed and restarted gets its users back without a flap: they heartbeat all
/// along and none ever reads OFFLINE; afterwards the restarted shard owns partitions and holds
/// exactly the users the ring gives it, and nobody is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_shard_gets_its_users_back_without_a_flap() {
    let Some(url) = redis() else { return };
    let _serial = SERIAL.lock().await;
    let users: Vec<u64> = (0..1000).map(|_| uid()).collect();
    let (mut c, load, started) = cluster_under_load(&url, 0, &users).await;
    let epoch = load.epoch;
    let watch = Watch::start(&c, &users, epoch, Duration::from_millis(300));
    let before = per_shard(&c, WENT_OFFLINE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let victim = 2;
    let victim_went_offline = c.metric(Proc::Shard(victim), WENT_OFFLINE).await;
    blocking(|| c.kill_shard(victim));
    let t_kill = Instant::now();
    c.wait_settled(SETTLE).await;
    let left = t_kill.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t_restart = Instant::now();
    blocking(|| c.restart_shard(victim));
    c.wait_settled(SETTLE).await;
    let back = t_restart.elapsed();
    // Past a whole timeout with the restarted shard in charge.
    tokio::time::sleep(TIMEOUT + Duration::from_secs(2)).await;

    let w = watch.finish().await;
    let l = load.finish().await;
    let owned = c
        .metric(Proc::Shard(victim), "presence_owned_partitions")
        .await;
    let cached = c.metric(Proc::Shard(victim), "presence_cached_users").await;
    let mine = c.metric(Proc::Shard(victim), "presence_online_users").await;
    let want = owned_by(&c, &[0, 1, 2], &users, victim);
    let online = c.shard_sum("presence_online_users").await;
    let after = per_shard(&c, WENT_OFFLINE).await;
    // The restarted shard counts from 0; before its restart it had counted
    // `victim_went_offline`.
    let went_offline: f64 = after
        .iter()
        .map(|(i, v)| if *i == victim { *v } else { v - before[i] })
        .sum::<f64>()
        + (victim_went_offline - before[&victim]);
    let retries = wrong_owner_retries(&c).await;
    println!(
        "restart: cluster up in {started:?}; {} users; settled without the shard {left:?} \
         after the kill, with it again {back:?} after the restart; heartbeats: {l}; batch polls \
         {} ok, {} failed {:?}, false offline {}; restarted shard owns {owned} partitions, holds \
         {cached} users, {mine} online (ring: {want}); ONLINE->OFFLINE transitions \
         {went_offline}; wrong-owner retries {retries}",
        users.len(),
        w.polls,
        w.failed_polls,
        w.poll_errors,
        w.violations.len(),
    );
    offline_all(&c, &users).await;
    assert_no_false_offline(&w, &l, "restart");
    assert_heartbeats_landed(&l, "restart");
    assert!(owned > 0.0, "the restarted shard owns no partition");
    assert!(cached > 0.0, "the restarted shard holds no user");
    assert_eq!(
        mine, want as f64,
        "users online on the restarted shard: those the ring gives it"
    );
    assert_eq!(online, users.len() as f64, "users online on the shards");
    assert_eq!(went_offline, 0.0, "ONLINE -> OFFLINE transitions");
}

/// (d) A 4th shard takes about a quarter of the partitions and of the users, and loses no
/// timer: users that stop heartbeating afterwards (those it took over among them) go OFFLINE
/// within the timeout + 2 s, and those that keep heartbeating never read OFFLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_shard_takes_a_quarter_and_loses_no_timer() {
    let Some(url) = redis() else { return };
    let _serial = SERIAL.lock().await;
    let users: Vec<u64> = (0..1000).map(|_| uid()).collect();
    let (mut c, load, started) = cluster_under_load(&url, 1, &users).await;
    let epoch = load.epoch;
    let (ring3, ring4) = (c.ring_of(&[0, 1, 2]), c.ring_of(&[0, 1, 2, 3]));
    let new_addr = c.shard_addr(3);
    let moved: Vec<u64> = users
        .iter()
        .copied()
        .filter(|&u| ring3.owner_of(u) != ring4.owner_of(u))
        .collect();
    let to_new = owned_by(&c, &[0, 1, 2, 3], &users, 3);
    // Those that will stop: every user that moves, and 100 that do not.
    let stay: Vec<u64> = users
        .iter()
        .copied()
        .filter(|u| !moved.contains(u))
        .collect();
    let stoppers: Vec<u64> = moved.iter().chain(stay.iter().take(100)).copied().collect();
    let keepers: Vec<u64> = stay[100..].to_vec();
    let watch = Watch::start(&c, &users, epoch, Duration::from_millis(300));
    let before = per_shard(&c, WENT_OFFLINE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t_add = Instant::now();
    let added = blocking(|| c.add_shard());
    assert_eq!(added, 3);
    c.wait_settled(SETTLE).await;
    let took = t_add.elapsed();
    let owned = c.metric(Proc::Shard(3), "presence_owned_partitions").await;
    let mine = c.metric(Proc::Shard(3), "presence_online_users").await;
    let online = c.shard_sum("presence_online_users").await;
    let w_add = watch.finish().await;

    // Now some stop: every one must be timed out by its (possibly new) owner.
    let watch = Watch::start(&c, &keepers, epoch, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop_users(&stoppers);
    let seen = expect_offline_in_time(&c, &load, &stoppers, |u| {
        load.last_ok_answered(u) + ms(TIMEOUT) + 2_000
    })
    .await;
    let latest = stoppers
        .iter()
        .map(|&u| seen[&u].saturating_sub(load.last_ok_answered(u)))
        .max()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w_stop = watch.finish().await;
    let l = load.finish().await;
    let after = per_shard(&c, WENT_OFFLINE).await;
    let went_offline: f64 = after
        .iter()
        .map(|(i, v)| v - before.get(i).copied().unwrap_or(0.0))
        .sum();
    let quarter = presence_service::ring::PARTITIONS as f64 / 4.0;
    let retries = wrong_owner_retries(&c).await;
    println!(
        "add: cluster up in {started:?}; {} users; the 4th shard ({new_addr}) settled in \
         {took:?}, owns {owned} partitions ({:.1}%), holds {mine} online users; the ring moved \
         {} users ({:.1}%), {to_new} of them to it; heartbeats: {l}; batch polls during the \
         add {} ok, {} failed, false offline {}; after: {} ok, {} failed, false offline {}; {} \
         stopped, OFFLINE at most {latest} ms after their last heartbeat; ONLINE->OFFLINE \
         transitions {went_offline}; wrong-owner retries {retries}",
        users.len(),
        100.0 * owned / presence_service::ring::PARTITIONS as f64,
        moved.len(),
        100.0 * moved.len() as f64 / users.len() as f64,
        w_add.polls,
        w_add.failed_polls,
        w_add.violations.len(),
        w_stop.polls,
        w_stop.failed_polls,
        w_stop.violations.len(),
        stoppers.len(),
    );
    offline_all(&c, &users).await;
    assert_no_false_offline(&w_add, &l, "adding a shard");
    assert_no_false_offline(&w_stop, &l, "after adding a shard");
    assert_heartbeats_landed(&l, "add");
    assert!(
        (owned - quarter).abs() <= 0.05 * presence_service::ring::PARTITIONS as f64,
        "the 4th shard owns {owned} partitions, not 25% ± 5% of them"
    );
    let share = moved.len() as f64 / users.len() as f64;
    assert!(
        (0.20..=0.30).contains(&share),
        "{} of {} users moved",
        moved.len(),
        users.len()
    );
    assert_eq!(
        mine, to_new as f64,
        "users online on the 4th shard: those the ring gives it"
    );
    assert_eq!(online, users.len() as f64, "users online on the shards");
    assert_eq!(
        went_offline,
        stoppers.len() as f64,
        "ONLINE -> OFFLINE transitions: those who stopped, once each, and no other"
    );
}

/// (f) SIGTERM makes a shard hand its partitions off before it exits: it exits 0 within a few
/// seconds, and its users, heartbeating all along, never read OFFLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_off_before_exit_without_a_false_offline() {
    let Some(url) = redis() else { return };
    let _serial = SERIAL.lock().await;
    let users: Vec<u64> = (0..1000).map(|_| uid()).collect();
    let (mut c, load, started) = cluster_under_load(&url, 0, &users).await;
    let epoch = load.epoch;
    let watch = Watch::start(&c, &users, epoch, Duration::from_millis(300));
    let before = per_shard(&c, WENT_OFFLINE).await;
    let gained_before = c
        .shard_sum("presence_handoffs_total{direction=\"gained\"}")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let victim = 0;
    let victim_went_offline = c.metric(Proc::Shard(victim), WENT_OFFLINE).await;
    let gained_victim = c
        .metric(
            Proc::Shard(victim),
            "presence_handoffs_total{direction=\"gained\"}",
        )
        .await;
    let t_term = Instant::now();
    c.sigterm_shard(victim);
    let exit = blocking(|| c.wait_exit(Proc::Shard(victim), Duration::from_secs(15)));
    let exited = t_term.elapsed();
    let exit = exit.unwrap_or_else(|| panic!("shard still running 15 s after SIGTERM"));
    c.wait_settled(SETTLE).await;
    let settled = t_term.elapsed();
    tokio::time::sleep(TIMEOUT + Duration::from_secs(2)).await;

    let w = watch.finish().await;
    let l = load.finish().await;
    let after = per_shard(&c, WENT_OFFLINE).await;
    let went_offline: f64 = after.iter().map(|(i, v)| v - before[i]).sum::<f64>()
        + (victim_went_offline - before[&victim]);
    let online = c.shard_sum("presence_online_users").await;
    let gained = c
        .shard_sum("presence_handoffs_total{direction=\"gained\"}")
        .await
        - (gained_before - gained_victim);
    let log = c.stderr_of(Proc::Shard(victim));
    let retries = wrong_owner_retries(&c).await;
    println!(
        "sigterm: cluster up in {started:?}; {} users; the shard exited with {exit} after \
         {exited:?}, the others settled {settled:?} after the signal and gained {gained} \
         partitions; heartbeats: {l}; batch polls {} ok, {} failed {:?}, false offline {}; \
         ONLINE->OFFLINE transitions {went_offline}; wrong-owner retries {retries}",
        users.len(),
        w.polls,
        w.failed_polls,
        w.poll_errors,
        w.violations.len(),
    );
    offline_all(&c, &users).await;
    assert_eq!(exit.code(), Some(0), "exit status {exit}; stderr:\n{log}");
    assert!(
        exited <= Duration::from_secs(5),
        "the shard took {exited:?} to exit after SIGTERM"
    );
    assert!(
        log.contains("handed off every partition"),
        "no handoff logged before exit:\n{log}"
    );
    assert_no_false_offline(&w, &l, "SIGTERM");
    assert_heartbeats_landed(&l, "SIGTERM");
    assert!(gained > 0.0, "nobody took over the partitions");
    assert_eq!(online, users.len() as f64, "users online on the shards");
    assert_eq!(went_offline, 0.0, "ONLINE -> OFFLINE transitions");
}
