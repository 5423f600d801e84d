//! Cluster scenarios under load, as lists of [`Step`]s run by a [`Scenario`] (in the style of
//! chitchat's cluster tests): a cluster of child processes (3 shards, 2 gateways, with static
//! discovery, on the shared Redis Cluster) where every user heartbeats every second through
//! both gateways, while steps kill shards with `kill -9`, restart them, add them, or stop them
//! with SIGTERM; batch polls watch that nobody who heartbeats ever reads OFFLINE, and that those
//! who stop do go OFFLINE in time.
//!
//! Scenarios run one at a time: every cluster reloads the live users of the partitions it owns
//! from the one shared Redis, so two clusters running at once would each time out the other's
//! users (which nobody heartbeats to it) and write them OFFLINE into the store.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::blocking;
use super::cluster::{Cluster, Proc};

pub const ONLINE: &str = "/api/v1/presence/online";
pub const OFFLINE: &str = "/api/v1/presence/offline";
pub const HEARTBEAT: &str = "/api/v1/presence/heartbeat";
pub const BATCH: &str = "/api/v1/presence/status/batch";

/// Transitions that a heartbeating user must never make.
pub const WENT_OFFLINE: &str = "presence_status_transitions_total{from=\"ONLINE\",to=\"OFFLINE\"}";

/// Heartbeat every second, OFFLINE 4 s after the last one.
pub const INTERVAL: Duration = Duration::from_secs(1);
pub const TIMEOUT: Duration = Duration::from_secs(4);

/// What every process of these clusters runs with.
pub const ENVS: &[(&str, &str)] = &[
    ("PRESENCE_HEARTBEAT_INTERVAL", "1s"),
    ("PRESENCE_HEARTBEAT_TIMEOUT", "4s"),
    ("PRESENCE_IDLE_TIMEOUT", "10m"),
    ("PRESENCE_HEALTH_INTERVAL", "500ms"),
    // Writers change a user's status up to 10 times a second; a flooder far more often.
    ("PRESENCE_STATUS_RATE", "20/1s,20"),
    ("RUST_LOG", "info"),
];

/// Heartbeats in flight at most: well above what a stalled third of the users can hold (a
/// heartbeat may wait out a handoff for seconds), so the load never holds back its own senders
/// (which would time out everybody for real; a fleet of clients does not wait for each other).
const CONCURRENCY: usize = 4096;

/// How long a cluster may take to settle after a change (generous: 2 cores, many processes).
pub const SETTLE: Duration = Duration::from_secs(20);

/// One scenario at a time (see the module documentation).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Steps

/// One thing that happens in a scenario.
pub enum Step {
    /// Time passes.
    Sleep(Duration),
    /// Time passes until this long after the last [`Step::KillShard`].
    SleepPastKill(Duration),
    /// From now on, batch polls check every `every` that `users` read ONLINE (the watch before
    /// ends; its report, under `what`, is kept for [`Scenario::end`]).
    Watch {
        what: &'static str,
        users: Vec<u64>,
        every: Duration,
    },
    /// These users stop heartbeating (heartbeats in flight still land).
    StopUsers(Vec<u64>),
    /// `kill -9` of shard `i` (what its counters counted is kept, see [`Scenario::delta`]).
    KillShard(usize),
    /// Shard `i` starts again, on its ports, counting from 0; up when it answers `/livez`.
    RestartShard(usize),
    /// The first spare shard starts; up when it answers `/livez`.
    AddShard,
    /// SIGTERM to shard `i`, then its exit, within 15 s (see [`Scenario::exit`]).
    Sigterm(usize),
    /// Every running process has the ring of the running shards, and they own every partition.
    WaitSettled,
    /// Polls `users` (who stopped heartbeating) until each reads OFFLINE: none before
    /// [`TIMEOUT`] after its last heartbeat answered 200, each by its deadline (a poll sent
    /// after it must read the user OFFLINE). When each was first seen OFFLINE is kept.
    ExpectOffline(Vec<u64>, Deadline),
    /// These steps at once: only `Sleep`, `WaitSettled` and `ExpectOffline`.
    Together(Vec<Step>),
}

impl Step {
    /// A [`Step::Watch`] of `users`, polled every `every`.
    pub fn watch(what: &'static str, users: &[u64], every: Duration) -> Step {
        Step::Watch {
            what,
            users: users.to_vec(),
            every,
        }
    }
}

/// When a user that stopped heartbeating must read OFFLINE.
#[derive(Clone, Copy)]
pub enum Deadline {
    /// This long after the last [`Step::KillShard`].
    AfterKill(Duration),
    /// This long after the answer to its last heartbeat that landed.
    AfterLastHeartbeat(Duration),
}

/// What an observing step saw.
enum Observed {
    Nothing,
    Settled(Duration),
    Offline(HashMap<u64, u64>),
}

/// What a scenario saw, from [`Scenario::end`].
pub struct Outcome {
    /// Every watch's report, in order, with its name.
    pub watches: Vec<(&'static str, WatchReport)>,
    pub load: LoadReport,
    /// ONLINE -> OFFLINE transitions the shards counted during the scenario.
    pub went_offline: f64,
    /// Users online on the running shards.
    pub online: f64,
    /// Wrong-owner retries of the gateways.
    pub retries: f64,
}

impl Outcome {
    /// No watched user ever read anything but ONLINE, every heartbeat landed.
    pub fn assert_no_false_offline_and_every_heartbeat_landed(&self, what: &str) {
        for (watch, w) in &self.watches {
            assert_no_false_offline(w, &self.load, watch);
        }
        assert_heartbeats_landed(&self.load, what);
    }

    /// The shards counted `expected` ONLINE -> OFFLINE transitions, give or take those of
    /// `heartbeating` users whose heartbeats came too late to keep them online (see
    /// [`LoadReport::at_risk`]).
    pub fn assert_went_offline(&self, expected: usize, heartbeating: &[u64], what: &str) {
        let risk = self.load.at_risk(heartbeating);
        let n = self.went_offline as usize;
        assert!(
            (expected..=expected + risk).contains(&n),
            "{what}: {n} ONLINE -> OFFLINE transitions; want {expected}, plus at most the {risk} \
             heartbeating users whose heartbeats came a timeout apart"
        );
    }

    /// The heartbeats, every watch's polls, the transitions and retries, for a test's report.
    pub fn summary(&self) -> String {
        let mut out = format!("heartbeats: {}", self.load);
        for (what, w) in &self.watches {
            out.push_str(&format!(
                "; batch polls ({what}) {} ok, {} failed {:?}, false offline {}, OFFLINE after a \
                 heartbeat that came later than the timeout {}",
                w.polls,
                w.failed_polls,
                w.poll_errors,
                w.violations.len(),
                w.excused
            ));
        }
        out.push_str(&format!(
            "; ONLINE->OFFLINE transitions {}; users whose heartbeats came a timeout apart {}; \
             wrong-owner retries {}",
            self.went_offline,
            self.load.at_risk(self.load.beats.keys()),
            self.retries
        ));
        out
    }

    /// The report of the watch named `what`.
    pub fn watch(&self, what: &str) -> &WatchReport {
        &self
            .watches
            .iter()
            .find(|(w, _)| *w == what)
            .expect("a watch of that name")
            .1
    }
}

/// A cluster under load that steps change: see the module documentation.
pub struct Scenario {
    pub cluster: Cluster,
    /// How long the cluster took to start.
    pub started: Duration,
    pub users: Vec<u64>,
    load: Option<Load>,
    watch: Option<(&'static str, Watch)>,
    watches: Vec<(&'static str, WatchReport)>,
    /// Counters summed over the shards from the start, whatever stops or starts.
    tracked: Vec<&'static str>,
    /// Per running shard and tracked series: the value the scenario counts from.
    baseline: BTreeMap<(usize, &'static str), f64>,
    /// Per tracked series: what stopped shards counted.
    banked: HashMap<&'static str, f64>,
    /// When the last shard was killed (ms since the load's epoch).
    pub killed_at: Option<u64>,
    /// When each user of an `ExpectOffline` was first seen OFFLINE (the poll's send time, ms
    /// since the load's epoch).
    pub offline_seen: HashMap<u64, u64>,
    /// How the last shard sent SIGTERM exited, and how long after the signal.
    pub exit: Option<(ExitStatus, Duration)>,
    /// How long each `WaitSettled` took to see the cluster settled.
    pub settled: Vec<Duration>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Scenario {
    /// A settled cluster (3 shards, 2 gateways, `spare` more shards declared) on the Redis
    /// Cluster `url` whose shards count exactly `users` online, every one heartbeating.
    /// `tracked` counters (and [`WENT_OFFLINE`]) are counted from now (see [`Scenario::delta`]).
    pub async fn start(
        url: &str,
        spare: usize,
        users: &[u64],
        tracked: &[&'static str],
    ) -> Scenario {
        Scenario::start_with(url, spare, users, tracked, &[]).await
    }

    /// [`Scenario::start`] with settings of every node on top of [`ENVS`].
    pub async fn start_with(
        url: &str,
        spare: usize,
        users: &[u64],
        tracked: &[&'static str],
        vars: &[(&str, &str)],
    ) -> Scenario {
        let spec = Cluster::processes(3, 2)
            .spare(spare)
            .redis(Some(url))
            .vars(vars);
        Scenario::start_spec(spec, users, tracked).await
    }

    /// [`Scenario::start`] with this cluster `spec` (3 shards and 2 gateways, say; [`ENVS`]
    /// come first, the spec's own settings on top).
    pub async fn start_spec(
        spec: super::cluster::ClusterSpec,
        users: &[u64],
        tracked: &[&'static str],
    ) -> Scenario {
        let serial = SERIAL.lock().await;
        let t0 = Instant::now();
        let spec = spec.envs_first(ENVS);
        let cluster = blocking(|| spec.start());
        let started = t0.elapsed();
        // The epoch comes before the onlines: a user's online is its first contact, and one
        // that never heartbeats after it times out a timeout after the online, not after the
        // load started.
        let epoch = Instant::now();
        online_all(&cluster, users).await;
        let load = Load::start(&cluster, users, epoch);
        wait_only_ours_online(&cluster, users.len()).await;
        let mut s = Scenario {
            cluster,
            started,
            users: users.to_vec(),
            load: Some(load),
            watch: None,
            watches: Vec::new(),
            tracked: [WENT_OFFLINE]
                .into_iter()
                .chain(tracked.iter().copied())
                .collect(),
            baseline: BTreeMap::new(),
            banked: HashMap::new(),
            killed_at: None,
            offline_seen: HashMap::new(),
            exit: None,
            settled: Vec::new(),
            _serial: serial,
        };
        for i in s.cluster.running_shards() {
            for series in s.tracked.clone() {
                let v = s.cluster.metric(Proc::Shard(i), series).await;
                s.baseline.insert((i, series), v);
            }
        }
        s
    }

    /// The load (until [`Scenario::end`]).
    pub fn load(&self) -> &Load {
        self.load
            .as_ref()
            .expect("the load runs until the scenario ends")
    }

    /// Runs `steps` in order; returns how long each took.
    pub async fn run(&mut self, steps: Vec<Step>) -> Vec<Duration> {
        let mut took = Vec::with_capacity(steps.len());
        for step in steps {
            let t = Instant::now();
            self.step(step).await;
            took.push(t.elapsed());
        }
        took
    }

    async fn step(&mut self, step: Step) {
        match step {
            Step::Watch { what, users, every } => {
                self.end_watch().await;
                let w = Watch::start(&self.cluster, &users, self.load().epoch, every);
                self.watch = Some((what, w));
            }
            Step::StopUsers(users) => self.load().stop_users(&users),
            Step::KillShard(i) => {
                self.bank(i).await;
                self.killed_at = Some(ms(self.load().epoch.elapsed()));
                let c = &mut self.cluster;
                blocking(|| c.kill_shard(i));
            }
            Step::RestartShard(i) => {
                let c = &mut self.cluster;
                blocking(|| c.restart_shard(i));
            }
            Step::AddShard => {
                let c = &mut self.cluster;
                blocking(|| c.add_shard());
            }
            Step::Sigterm(i) => {
                self.bank(i).await;
                let t = Instant::now();
                self.cluster.sigterm(Proc::Shard(i));
                let c = &mut self.cluster;
                let exit = blocking(|| c.wait_exit(Proc::Shard(i), Duration::from_secs(15)));
                let exit = exit.unwrap_or_else(|| panic!("shard still running 15 s after SIGTERM"));
                self.exit = Some((exit, t.elapsed()));
            }
            Step::Together(steps) => {
                let seen = futures::future::join_all(steps.iter().map(|s| self.observe(s))).await;
                for s in seen {
                    self.observed(s);
                }
            }
            step => {
                let seen = self.observe(&step).await;
                self.observed(seen);
            }
        }
    }

    /// A step that only looks (or waits).
    async fn observe(&self, step: &Step) -> Observed {
        match step {
            Step::Sleep(d) => tokio::time::sleep(*d).await,
            Step::SleepPastKill(d) => {
                let at = self.killed_at.expect("a shard was killed") + ms(*d);
                let now = ms(self.load().epoch.elapsed());
                tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
            }
            Step::WaitSettled => {
                return Observed::Settled(self.cluster.wait_settled(SETTLE).await);
            }
            Step::ExpectOffline(users, deadline) => {
                let load = self.load();
                let at = |u: u64| match *deadline {
                    Deadline::AfterKill(d) => self.killed_at.expect("a shard was killed") + ms(d),
                    Deadline::AfterLastHeartbeat(d) => load.last_ok_answered(u) + ms(d),
                };
                let seen = expect_offline_in_time(&self.cluster, load, users, at).await;
                return Observed::Offline(seen);
            }
            _ => panic!("only Sleep, SleepPastKill, WaitSettled and ExpectOffline observe"),
        }
        Observed::Nothing
    }

    fn observed(&mut self, o: Observed) {
        match o {
            Observed::Nothing => {}
            Observed::Settled(d) => self.settled.push(d),
            Observed::Offline(seen) => self.offline_seen.extend(seen),
        }
    }

    /// Before shard `i` stops: keeps what it counted of the tracked counters.
    async fn bank(&mut self, i: usize) {
        for series in self.tracked.clone() {
            let v = self.cluster.metric(Proc::Shard(i), series).await;
            let from = self.baseline.remove(&(i, series)).unwrap_or(0.0);
            *self.banked.entry(series).or_default() += v - from;
        }
    }

    /// What the shards counted of `series` (a tracked counter) since the scenario started,
    /// including what shards that stopped counted, and what restarted ones counted from 0.
    pub async fn delta(&self, series: &'static str) -> f64 {
        assert!(self.tracked.contains(&series), "{series} is not tracked");
        let mut sum = self.banked.get(series).copied().unwrap_or(0.0);
        for i in self.cluster.running_shards() {
            let v = self.cluster.metric(Proc::Shard(i), series).await;
            sum += v - self.baseline.get(&(i, series)).copied().unwrap_or(0.0);
        }
        sum
    }

    async fn end_watch(&mut self) {
        if let Some((what, w)) = self.watch.take() {
            self.watches.push((what, w.finish().await));
        }
    }

    /// Ends the watch and the load (heartbeats in flight land), and reads what the shards
    /// counted.
    pub async fn end(&mut self) -> Outcome {
        self.end_watch().await;
        let load = self.load.take().expect("ends once").finish().await;
        let mut watches = std::mem::take(&mut self.watches);
        for (_, w) in &mut watches {
            w.judge(&load);
        }
        Outcome {
            watches,
            load,
            went_offline: self.delta(WENT_OFFLINE).await,
            online: self.cluster.shard_sum("presence_online_users").await,
            retries: wrong_owner_retries(&self.cluster).await,
        }
    }

    /// Takes every user's device offline: what a scenario leaves in the shared Redis is then no
    /// live user for the next cluster to reload and time out.
    pub async fn clean_up(&self) {
        offline_all(&self.cluster, &self.users).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Through the gateways

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
    let gateways = c.running_gateways();
    let _: Vec<(u16, Value)> = futures::stream::iter(users.iter().enumerate())
        .map(|(j, &u)| {
            let body = json!({"userId": u, "deviceId": "d"});
            c.post(gateways[j % gateways.len()], OFFLINE, body)
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
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    /// 503: no owner answered within the route timeout while the ring moved.
    pub unavailable: u64,
    /// 404 "device not online": the owner did not know the device.
    pub not_online: u64,
    pub other: u64,
    pub transport: u64,
    pub max_latency_ms: u64,
    pub max_gap_ms: u64,
    pub failures: Vec<String>,
    /// Per user: (sent, answered) of every heartbeat answered 200, in ms since the epoch.
    pub beats: HashMap<u64, Vec<(u64, u64)>>,
}

impl LoadReport {
    /// Whether an OFFLINE `read` of a heartbeating user is false: a heartbeat answered 200
    /// before the read was sent (so the server had it) was sent less than [`TIMEOUT`] before
    /// the read was answered, so no deadline the server may keep had passed. Otherwise the
    /// read is excused: the user's heartbeats themselves came too late (a starved load or a
    /// slow answer), and those are counted on their own.
    pub fn is_false_offline(&self, read: &OfflineRead) -> bool {
        let Some(beats) = self.beats.get(&read.user) else {
            return true;
        };
        let latest_known = beats
            .iter()
            .filter(|(_, answered)| *answered <= read.sent)
            .map(|(sent, _)| *sent)
            .max();
        latest_known.is_some_and(|sent| sent + ms(TIMEOUT) > read.answered)
    }

    /// How many of `users` may have gone a whole [`TIMEOUT`] without a heartbeat reaching the
    /// server: two heartbeats in a row, the later answered `TIMEOUT` or more after the earlier
    /// was sent. Only those can time out for real while heartbeating.
    pub fn at_risk<'a>(&self, users: impl IntoIterator<Item = &'a u64>) -> usize {
        users
            .into_iter()
            .filter(|u| {
                let mut beats = self.beats.get(u).cloned().unwrap_or_default();
                beats.sort_unstable();
                beats
                    .windows(2)
                    .any(|w| w[1].1.saturating_sub(w[0].0) >= ms(TIMEOUT))
            })
            .count()
    }
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

/// One user's heartbeats answered 200: (sent, answered), in ms since the epoch.
type Beats = Mutex<Vec<(u64, u64)>>;

pub struct Load {
    pub epoch: Instant,
    index: HashMap<u64, usize>,
    active: Arc<Vec<AtomicBool>>,
    /// Per user: when (ms since `epoch`) the latest heartbeat that was answered 200 was sent
    /// (the server cannot have seen it earlier; the epoch for the online, sent after it)...
    last_ok: Arc<Vec<AtomicU64>>,
    /// ...and when that answer came (the server had seen it by then; for the online, when the
    /// load started).
    last_ok_answered: Arc<Vec<AtomicU64>>,
    /// Per user: (sent, answered) of every heartbeat answered 200, to judge OFFLINE reads by.
    beats: Arc<Vec<Beats>>,
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
        // Every user was put online since the epoch (before the load started): as good as a
        // heartbeat sent at the epoch and answered now.
        let last_ok: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(0)).collect());
        let last_ok_answered: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(now)).collect());
        let last_sent: Arc<Vec<AtomicU64>> =
            Arc::new(users.iter().map(|_| AtomicU64::new(now)).collect());
        let beats: Arc<Vec<Beats>> =
            Arc::new(users.iter().map(|_| Mutex::new(vec![(0, now)])).collect());
        let stats = Arc::new(LoadStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let inflight = Arc::new(Semaphore::new(CONCURRENCY));
        let index = users.iter().enumerate().map(|(j, &u)| (u, j)).collect();
        let driver = tokio::spawn({
            let (active, last_ok, answered, sent, beats, stats, stop, inflight) = (
                active.clone(),
                last_ok.clone(),
                last_ok_answered.clone(),
                last_sent.clone(),
                beats.clone(),
                stats.clone(),
                stop.clone(),
                inflight.clone(),
            );
            let client = c.client().clone();
            let bases = c.bases();
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
                        let (client, stats, last_ok, answered, sent, beats) = (
                            client.clone(),
                            stats.clone(),
                            last_ok.clone(),
                            answered.clone(),
                            sent.clone(),
                            beats.clone(),
                        );
                        tokio::spawn(async move {
                            let last = (&last_ok[j], &answered[j], &sent[j], &beats[j]);
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
            beats,
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
    pub fn last_ok(&self, user: u64) -> u64 {
        self.last_ok[self.index[&user]].load(Ordering::Relaxed)
    }

    /// When the answer to that heartbeat came (ms since the epoch).
    pub fn last_ok_answered(&self, user: u64) -> u64 {
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
            beats: self
                .index
                .iter()
                .map(|(&u, &j)| (u, std::mem::take(&mut *self.beats[j].lock())))
                .collect(),
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
    (last_ok, answered, last_sent, beats): (&AtomicU64, &AtomicU64, &AtomicU64, &Beats),
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
            beats.lock().push((sent_at, sent_at + latency));
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
// Watch: users that must never read OFFLINE in a batch poll

#[derive(Debug, Default)]
pub struct WatchReport {
    pub polls: u64,
    pub failed_polls: u64,
    pub poll_errors: Vec<String>,
    /// Every read of a watched user that was OFFLINE.
    pub reads: Vec<OfflineRead>,
    /// Those of `reads` that were false (see [`LoadReport::is_false_offline`]): (ms since the
    /// epoch, user, status). Filled in by [`Scenario::end`].
    pub violations: Vec<(u64, u64, String)>,
    /// Those of `reads` after a heartbeat that itself came later than the timeout.
    pub excused: usize,
}

/// A read (or a push) of a watched user that was OFFLINE.
#[derive(Debug, Clone)]
pub struct OfflineRead {
    /// When the poll was sent and answered, in ms since the epoch.
    pub sent: u64,
    pub answered: u64,
    pub user: u64,
    pub status: String,
}

impl WatchReport {
    /// Sorts `reads` into `violations` and `excused` by the heartbeats of `load`.
    fn judge(&mut self, load: &LoadReport) {
        for r in &self.reads {
            if load.is_false_offline(r) {
                self.violations.push((r.answered, r.user, r.status.clone()));
            } else {
                self.excused += 1;
            }
        }
    }
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
            (c.client().clone(), c.bases(), users.to_vec(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut report = WatchReport::default();
            let mut turn = 0;
            while !flag.load(Ordering::Relaxed) {
                let next = tokio::time::Instant::now() + every;
                let sent = ms(epoch.elapsed());
                match statuses(&client, &bases, &users, &mut turn).await {
                    Ok(entries) => {
                        report.polls += 1;
                        let answered = ms(epoch.elapsed());
                        // Writers set BUSY and AWAY: only OFFLINE is a false offline.
                        for (user, status) in entries {
                            if status == "OFFLINE" {
                                report.reads.push(OfflineRead {
                                    sent,
                                    answered,
                                    user,
                                    status,
                                });
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

/// Asserts that nobody watched read OFFLINE while its heartbeats kept it online (false offline).
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
    let (client, bases) = (c.client().clone(), c.bases());
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

/// The wrong-owner retries of every running gateway.
async fn wrong_owner_retries(c: &Cluster) -> f64 {
    let mut n = 0.0;
    for p in c.procs() {
        if matches!(p, Proc::Gateway(_)) {
            n += c.metric(p, "presence_wrong_owner_retries_total").await;
        }
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
