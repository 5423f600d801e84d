//! A Jepsen-style history checker for chaos scenarios.
//!
//! While a [`Scenario`] runs its load (every user heartbeats through the gateways, and batch
//! polls watch for false OFFLINE: see [`super::scenario`]), a [`History`] records:
//!
//! - every acknowledged write of its [`Writer`]: manual statuses set, one at a time, for a few
//!   "writer" users (who also heartbeat with the load), with the version of each answer, when it
//!   was sent and when it was acknowledged, and every failed write (status or transport error),
//!   with the gateway it went through;
//! - every `presence` event that its WebSocket [`Observer`]s (one per gateway, subscribed to the
//!   writer users) were pushed, with its version and when it arrived.
//!
//! [`History::check`] then checks, after the fault healed, and returns the figures
//! ([`Figures`]), failing with a clear message:
//!
//! 1. per-user versions only increase: in each observer's stream, and across acknowledged
//!    writes (a write acknowledged before another was sent has the lower version);
//! 2. no acknowledged write is lost: the final REST view (through every gateway) and the Redis
//!    record show the last acknowledged manual status of each writer user (or a later write
//!    that failed for the client but landed), at its version or later, and the heartbeating
//!    device of every user that never stopped;
//! 3. no false OFFLINE: every watch of the scenario (see [`Step::Watch`]) and no observer ever
//!    saw a heartbeating user OFFLINE;
//! 4. ghosts: every user the scenario silenced (a [`Step::ExpectOffline`] with
//!    [`ghost_deadline`]) read OFFLINE within timeout + 5 s of its last heartbeat; the largest
//!    delay is reported;
//! 5. convergence: every view (REST through every gateway, the Redis record, each live
//!    observer's last pushed state) agrees on each writer user's status and version within
//!    10 s;
//! 6. untouched users: 0 errors for writes of users the fault does not touch (the scenario says
//!    which, see [`History::check`]).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use presence_service::presence::UserState;
use presence_service::store::record;
use serde_json::{json, Value};

use super::cluster::Cluster;
use super::scenario::{ms, Deadline, OfflineRead, Outcome, Scenario, TIMEOUT};
use super::ws::Ws;

/// How long after the heal every view must agree.
pub const CONVERGE: Duration = Duration::from_secs(10);

/// A silent device must read OFFLINE this long after its last heartbeat at the latest.
pub fn ghost_deadline() -> Deadline {
    Deadline::AfterLastHeartbeat(TIMEOUT + Duration::from_secs(5))
}

/// The manual statuses a writer cycles through.
const STATUSES: [&str; 3] = ["BUSY", "AWAY", "ONLINE"];

/// One acknowledged write.
#[derive(Clone, Debug)]
pub struct Ack {
    pub user: u64,
    pub device: String,
    /// The manual status set.
    pub status: String,
    pub version: u64,
    pub gateway: usize,
    /// Ms since the epoch: sent, acknowledged.
    pub sent: u64,
    pub acked: u64,
}

/// One write that failed for the client (it may still have landed).
#[derive(Clone, Debug)]
pub struct Failed {
    pub user: u64,
    pub status: String,
    pub gateway: usize,
    pub sent: u64,
    /// When the failure was answered (or the request gave up), ms since the epoch.
    pub answered: u64,
    pub what: String,
}

/// The history of one scenario.
pub struct History {
    pub epoch: Instant,
    acks: Mutex<Vec<Ack>>,
    failed: Mutex<Vec<Failed>>,
    /// Gateways that the scenario killed: no view through them.
    down: Mutex<Vec<usize>>,
}

/// What the checker found: the figures of the scenario's summary line.
#[derive(Debug, Default)]
pub struct Figures {
    pub acked: usize,
    pub lost: usize,
    pub false_offline: usize,
    pub max_ghost_ms: u64,
    pub untouched_errors: usize,
    pub touched_errors: usize,
    pub events: usize,
    pub converged_ms: u64,
    /// OFFLINE pushed to an observer for a load user, judged by [`History::finish`] against the
    /// load's heartbeats (see `LoadReport::is_false_offline`).
    pub pushed_offline: Vec<(String, OfflineRead)>,
    /// OFFLINE reads and pushes after a heartbeat that itself came later than the timeout.
    pub excused: usize,
    /// The slowest answer of the scenario, ms: to a heartbeat of the load or to a write, whatever
    /// the answer.
    pub slowest_ms: u64,
}

impl Figures {
    /// The scenario's one summary line.
    pub fn line(&self, name: &str) -> String {
        format!(
            "CHAOS {name}: acknowledged writes {}, lost {}, false OFFLINE {}, max ghost {:.1} s, \
             errors for untouched users {} (touched {}), events {}, converged in {} ms; \
             OFFLINE after a late heartbeat {}, slowest answer {} ms",
            self.acked,
            self.lost,
            self.false_offline,
            self.max_ghost_ms as f64 / 1000.0,
            self.untouched_errors,
            self.touched_errors,
            self.events,
            self.converged_ms,
            self.excused,
            self.slowest_ms
        )
    }
}

impl History {
    pub fn new(epoch: Instant) -> Arc<History> {
        Arc::new(History {
            epoch,
            acks: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
            down: Mutex::new(Vec::new()),
        })
    }

    fn now(&self) -> u64 {
        ms(self.epoch.elapsed())
    }

    /// Gateway `k` is gone for good: the views leave it out.
    pub fn gateway_down(&self, k: usize) {
        self.down.lock().push(k);
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().clone()
    }

    pub fn failed(&self) -> Vec<Failed> {
        self.failed.lock().clone()
    }

    /// Checks the history (see the module documentation) after the scenario's fault healed,
    /// while its load still runs (so heartbeating users are online): everything but the batch
    /// polls' false OFFLINE, which [`History::finish`] adds from the `Outcome`.
    /// `touched(user, gateway)` says whether the fault touches a write of `user` through
    /// `gateway` (those may fail). Returns the figures and what is wrong.
    pub async fn check(
        &self,
        s: &Scenario,
        observers: &mut [Observer],
        redis: &str,
        touched: impl Fn(u64, usize) -> bool,
    ) -> (Figures, Vec<String>) {
        let c = &s.cluster;
        let acks = self.acks();
        let failed = self.failed();
        let mut f = Figures {
            acked: acks.len(),
            ..Figures::default()
        };
        let mut problems: Vec<String> = Vec::new();

        // 1. Versions only increase: across acknowledged writes...
        let mut by_user: BTreeMap<u64, Vec<&Ack>> = BTreeMap::new();
        for a in &acks {
            by_user.entry(a.user).or_default().push(a);
        }
        for (u, list) in &by_user {
            for a in list {
                for b in list.iter().filter(|b| b.sent > a.acked) {
                    // Equal only when the later write changed nothing (the same status
                    // again, after writes of others in between failed).
                    if b.version < a.version || (b.version == a.version && b.status != a.status) {
                        problems.push(format!(
                            "user {u}: write acknowledged at +{} ms has version {}, a later one \
                             (sent +{} ms) has {}",
                            a.acked, a.version, b.sent, b.version
                        ));
                    }
                }
            }
        }
        // ...and in each observer's stream; an observer never sees a heartbeating user OFFLINE
        // (its own user is not one: its socket's gateway may be what the fault stops).
        for o in observers.iter_mut() {
            o.ws.pump();
            let mut last: HashMap<u64, u64> = HashMap::new();
            for (at, e) in o.events() {
                f.events += 1;
                let (u, v) = (e["userId"].as_u64().unwrap_or(0), version_of(&e));
                if let Some(&prev) = last.get(&u) {
                    if v < prev {
                        problems.push(format!(
                            "observer {}: user {u} version {v} after {prev} (+{at} ms)",
                            o.name
                        ));
                    }
                }
                last.insert(u, v);
                if e["status"] == "OFFLINE" && u != o.user {
                    let read = OfflineRead {
                        sent: at,
                        answered: at,
                        user: u,
                        status: format!("pushed {e}"),
                    };
                    f.pushed_offline.push((o.name.clone(), read));
                }
            }
        }

        // 4. Ghosts: how long after its last heartbeat each silenced user read OFFLINE (the
        // ExpectOffline step already failed the scenario past the deadline).
        let load = s.load();
        for (&u, &seen) in &s.offline_seen {
            f.max_ghost_ms = f
                .max_ghost_ms
                .max(seen.saturating_sub(load.last_ok_answered(u)));
        }

        // 6. Errors for users the fault does not touch.
        for e in &failed {
            if touched(e.user, e.gateway) {
                f.touched_errors += 1;
            } else {
                f.untouched_errors += 1;
                if f.untouched_errors <= 5 {
                    problems.push(format!(
                        "untouched user {} through gateway {}: write of {} at +{} ms failed: {}",
                        e.user, e.gateway, e.status, e.sent, e.what
                    ));
                }
            }
        }

        // 5. Convergence, then 2. nothing acknowledged lost, on the converged views.
        let writers: Vec<u64> = by_user.keys().copied().collect();
        let t = Instant::now();
        let views = loop {
            let down = self.down.lock().clone();
            let views = Views::read(c, &down, redis, &writers, observers).await;
            let disagree = views.disagreements();
            if disagree.is_empty() {
                f.converged_ms = ms(t.elapsed());
                break views;
            }
            if t.elapsed() > CONVERGE {
                f.converged_ms = ms(t.elapsed());
                let first: Vec<_> = disagree.iter().take(5).collect();
                problems.push(format!(
                    "{} writer users' views did not converge within {CONVERGE:?}, first: \
                     {first:?}",
                    disagree.len()
                ));
                break views;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        for (u, list) in &by_user {
            let last = list.iter().max_by_key(|a| a.acked).expect("one at least");
            // A write that failed for the client after the last acknowledged one may have landed.
            let later: Vec<&str> = failed
                .iter()
                .filter(|e| e.user == *u && e.sent > last.sent)
                .map(|e| e.status.as_str())
                .collect();
            for (view, (status, version)) in views.of(*u) {
                let ok = version >= last.version
                    && (status == last.status || later.contains(&status.as_str()));
                if !ok {
                    f.lost += 1;
                    problems.push(format!(
                        "user {u}: last acknowledged write {} v{} (+{} ms), {view} shows {status} \
                         v{version}",
                        last.status, last.version, last.acked
                    ));
                }
            }
        }
        // The heartbeating device of every user still heartbeating is in the Redis record.
        let beating: Vec<u64> = s
            .users
            .iter()
            .copied()
            .filter(|u| !s.offline_seen.contains_key(u))
            .collect();
        for (u, state) in redis_records(redis, &beating) {
            let has = state
                .as_ref()
                .is_some_and(|st| st.devices.iter().any(|d| d.id == "d" && d.is_online()));
            if !has {
                f.lost += 1;
                if f.lost <= 5 {
                    problems.push(format!(
                        "user {u}: heartbeating device d is not online in the Redis record: \
                         {state:?}"
                    ));
                }
            }
        }

        (f, problems)
    }

    /// Adds the false OFFLINE that the scenario's batch polls saw (its `outcome`, after its
    /// load ended) to what [`History::check`] found, prints the summary line of scenario `name`,
    /// and fails with every problem. Returns the figures.
    pub fn finish(
        &self,
        name: &str,
        (mut f, mut problems): (Figures, Vec<String>),
        outcome: &Outcome,
    ) -> Figures {
        // When a pushed OFFLINE was decided is not known, only when it arrived: as early as
        // the slowest answer of the scenario (a fault that holds heartbeats or writes holds
        // the shard's events as well) plus a second before that.
        let slowest = |answers: &mut dyn Iterator<Item = (u64, u64)>| {
            answers
                .map(|(sent, answered)| answered.saturating_sub(sent))
                .max()
                .unwrap_or(0)
        };
        let slowest_ack = slowest(&mut self.acks().iter().map(|a| (a.sent, a.acked)));
        let slowest_failure = slowest(&mut self.failed().iter().map(|w| (w.sent, w.answered)));
        f.slowest_ms = outcome.load.max_latency_ms.max(slowest_ack);
        // The push delay stays that of what succeeded; the slowest answer counts failures too.
        let push_delay = 1000 + f.slowest_ms;
        f.slowest_ms = f.slowest_ms.max(slowest_failure);
        for (observer, mut read) in std::mem::take(&mut f.pushed_offline) {
            read.sent = read.answered.saturating_sub(push_delay);
            if outcome.load.is_false_offline(&read) {
                f.false_offline += 1;
                problems.push(format!(
                    "observer {observer}: heartbeating user {} pushed OFFLINE at +{} ms: {}",
                    read.user, read.sent, read.status
                ));
            } else {
                f.excused += 1;
            }
        }
        for (what, w) in &outcome.watches {
            f.excused += w.excused;
            f.false_offline += w.violations.len();
            if !w.violations.is_empty() {
                let first: Vec<_> = w.violations.iter().take(5).collect();
                problems.push(format!(
                    "watch {what}: {} reads of heartbeating users were not ONLINE, first \
                     (ms, user, status): {first:?}",
                    w.violations.len()
                ));
            }
        }
        println!("{}", f.line(name));
        println!("{name}: load: {}", outcome.summary());
        assert!(
            problems.is_empty(),
            "{name}: history check failed ({}):\n  {}",
            f.line(name),
            problems.join("\n  ")
        );
        f
    }
}

fn version_of(v: &Value) -> u64 {
    v["version"].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Writer: acknowledged writes of manual statuses

/// Sets manual statuses of its users, one write at a time per user, through alternating
/// gateways, recording each answer in the [`History`].
pub struct Writer {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writer {
    /// Each of `users` writes every `every`.
    pub fn start(c: &Cluster, h: &Arc<History>, users: &[u64], every: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = users
            .iter()
            .enumerate()
            .map(|(j, &u)| {
                let (client, bases, h, stop) =
                    (c.client().clone(), c.bases(), h.clone(), stop.clone());
                tokio::spawn(async move {
                    let offset = every * j as u32 / 16;
                    tokio::time::sleep(offset).await;
                    for n in j.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let gateway = n % bases.len();
                        let status = STATUSES[n % STATUSES.len()];
                        write(&client, &bases[gateway], &h, u, status, gateway).await;
                        tokio::time::sleep(every).await;
                    }
                })
            })
            .collect();
        Writer { stop, tasks }
    }

    /// Stops writing; the writes in flight land first.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn write(
    client: &reqwest::Client,
    base: &str,
    h: &History,
    user: u64,
    status: &str,
    gateway: usize,
) {
    let sent = h.now();
    let r = client
        .put(format!("{base}/api/v1/presence/status/{user}"))
        .json(&json!({ "status": status }))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let what = match r {
        Ok(resp) if resp.status() == 200 => match resp.json::<Value>().await {
            Ok(v) if v["data"]["version"].is_u64() => {
                h.acks.lock().push(Ack {
                    user,
                    device: "d".into(),
                    status: status.into(),
                    version: version_of(&v["data"]),
                    gateway,
                    sent,
                    acked: h.now(),
                });
                return;
            }
            Ok(v) => format!("200 without a version: {v}"),
            Err(e) => format!("200, body: {e}"),
        },
        Ok(resp) => {
            let code = resp.status().as_u16();
            format!("{code} {}", resp.text().await.unwrap_or_default())
        }
        Err(e) => format!("transport: {e}"),
    };
    h.failed.lock().push(Failed {
        user,
        status: status.into(),
        gateway,
        sent,
        answered: h.now(),
        what,
    });
}

// ---------------------------------------------------------------------------------------------
// Observers: sockets subscribed to the writer users

/// A WebSocket of its own user on one gateway, subscribed to the writer users, kept alive.
pub struct Observer {
    pub name: String,
    /// The observer's own user (not one of the load's).
    pub user: u64,
    pub ws: Ws,
    epoch: Instant,
}

impl Observer {
    /// Connects `user` (not one of the load's) on gateway `k` and subscribes to `targets`.
    pub async fn start(c: &Cluster, k: usize, user: u64, targets: &[u64], epoch: Instant) -> Self {
        let mut ws = Ws::connect(&c.base(k), user, "observer").await;
        ws.keepalive(Duration::from_millis(500));
        ws.subscribe(targets).await;
        Observer {
            name: format!("gateway{k}/{user}"),
            user,
            ws,
            epoch,
        }
    }

    /// Every `presence` event pushed, in order: (ms since the epoch, data).
    pub fn events(&self) -> Vec<(u64, Value)> {
        self.ws
            .log
            .iter()
            .filter(|(_, v)| v["type"] == "presence")
            .map(|(t, v)| {
                (
                    ms(t.saturating_duration_since(self.epoch)),
                    v["data"].clone(),
                )
            })
            .collect()
    }

    /// The last state pushed of `user`: (status, version).
    fn last(&self, user: u64) -> Option<(String, u64)> {
        self.ws.presence(user).last().map(|(_, d)| {
            let status = d["status"].as_str().unwrap_or("?").to_owned();
            (status, version_of(d))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Views

/// What each view shows of each writer user: user -> (view name, (status, version)). Every view
/// shows the effective status: for a user online, the manual status set.
/// Per user: (where it was seen, (status, version)).
type Sightings = BTreeMap<u64, Vec<(String, (String, u64))>>;

struct Views(Sightings);

impl Views {
    async fn read(
        c: &Cluster,
        down: &[usize],
        redis: &str,
        users: &[u64],
        observers: &mut [Observer],
    ) -> Views {
        let mut m: Sightings = BTreeMap::new();
        for k in (0..c.gateways()).filter(|k| !down.contains(k)) {
            let views = futures::future::join_all(users.iter().map(|&u| async move {
                let (code, v) = c.get(k, &format!("/api/v1/presence/status/{u}")).await;
                let d = &v["data"];
                let view = if code == 200 {
                    let st = d["status"].as_str().unwrap_or("?").to_owned();
                    (st, version_of(d))
                } else {
                    (format!("answer {code}"), 0)
                };
                (u, view)
            }))
            .await;
            for (u, view) in views {
                m.entry(u)
                    .or_default()
                    .push((format!("REST gateway{k}"), view));
            }
        }
        for (u, state) in redis_records(redis, users) {
            let view = match state {
                Some(st) => (st.status.as_str().to_owned(), st.version),
                None => ("no record".to_owned(), 0),
            };
            m.entry(u).or_default().push(("Redis".into(), view));
        }
        for o in observers.iter_mut() {
            o.ws.pump();
            if o.ws.closed.is_some() {
                continue;
            }
            for &u in users {
                let view = o.last(u).unwrap_or(("no event".into(), 0));
                m.entry(u)
                    .or_default()
                    .push((format!("socket {}", o.name), view));
            }
        }
        Views(m)
    }

    /// The users whose views disagree, with every view.
    #[allow(clippy::type_complexity)]
    fn disagreements(&self) -> Vec<(u64, &Vec<(String, (String, u64))>)> {
        self.0
            .iter()
            .filter(|(_, views)| views.windows(2).any(|w| w[0].1 != w[1].1))
            .map(|(u, v)| (*u, v))
            .collect()
    }

    fn of(&self, user: u64) -> Vec<(String, (String, u64))> {
        self.0.get(&user).cloned().unwrap_or_default()
    }
}

/// The Redis record of each of `users` (`None`: no record), through `redis-cli -c` on the
/// first seed of `redis` (comma-separated URLs).
pub fn redis_records(redis: &str, users: &[u64]) -> Vec<(u64, Option<UserState>)> {
    let port = redis_port(redis.split(',').next().unwrap_or(redis));
    // The record is binary: the script answers it in hex, one line a user (empty: none).
    let script: String = users
        .iter()
        .map(|&u| {
            let key = presence_service::store::redis::user_key(u);
            format!("EVAL \"{HEX_RECORD}\" 1 {key}\n")
        })
        .collect();
    let out = pipe_redis_cli(port, &script);
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("-> Redirected"))
        .collect();
    assert_eq!(lines.len(), users.len(), "redis-cli answered: {out}");
    users
        .iter()
        .zip(lines)
        .map(|(&u, l)| (u, unhex(l).and_then(|b| record::decode(&b).ok())))
        .collect()
}

/// A Lua script answering the hash field `s` of KEYS[1] in hex, or nil.
const HEX_RECORD: &str = "local s = redis.call('HGET', KEYS[1], 's') if not s then return nil end \
     return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))";

fn unhex(l: &str) -> Option<Vec<u8>> {
    let l = l.trim();
    let hex = l.len() % 2 == 0 && !l.is_empty() && l.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then_some(())?;
    (0..l.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&l[i..i + 2], 16).ok())
        .collect()
}

/// The port of `redis://host:port`.
pub fn redis_port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a port: {url}"))
}

/// Feeds `script` (one command a line) to `redis-cli -c -p port`; its output.
fn pipe_redis_cli(port: u16, script: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write to redis-cli");
    let out = child.wait_with_output().expect("redis-cli output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
