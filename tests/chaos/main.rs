//! The chaos suite: real processes and a real Redis Cluster on loopback, one fault class per
//! scenario, each checked against the history of acknowledged writes and pushed events
//! ([`common::history`]). See `docs/chaos.md` for every scenario, what it injects, the guarantee
//! it checks and the figures of the last run.
//!
//! Every scenario needs the Redis Cluster that `scripts/test.sh` starts: plain `cargo test` lists
//! them as ignored.

#[path = "../common/mod.rs"]
mod common;

mod input;
mod network;
mod process;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{ClusterSpec, Proc};
use common::history::{ghost_deadline, Figures, History, Observer, Writer};
use common::scenario::{Scenario, Step};
use common::uid;

/// Users of a scenario, all heartbeating every second (timeout 4 s)...
pub const USERS: usize = 200;
/// ...of which these write manual statuses (the history's acknowledged writes)...
pub const WRITERS: usize = 24;
/// ...and these stop heartbeating when the fault starts (they must go OFFLINE in time).
pub const SILENT: usize = 20;

/// A scenario of the chaos suite: a [`Scenario`] (cluster under load) with a [`History`]
/// (writers and one observer socket per gateway).
pub struct Chaos {
    pub name: &'static str,
    pub s: Scenario,
    pub h: Arc<History>,
    /// Users that write manual statuses.
    pub writers: Vec<u64>,
    /// Users that stop heartbeating when the fault starts.
    pub silent: Vec<u64>,
    /// Every other user: heartbeating all along.
    pub beating: Vec<u64>,
    /// The Redis Cluster of the shards.
    pub redis: String,
    /// Silent users that may read OFFLINE later than [`ghost_deadline`], and by when.
    pub late_ghosts: Option<(Vec<u64>, common::scenario::Deadline)>,
    writer: Option<Writer>,
    observers: Vec<Observer>,
}

impl Chaos {
    /// `users` users on the cluster `spec`, whose shards use the Redis Cluster `redis`.
    pub async fn start(name: &'static str, spec: ClusterSpec, redis: &str, users: usize) -> Chaos {
        let all: Vec<u64> = (0..users).map(|_| uid()).collect();
        // Health checks every 2 s: at 500 ms and 1 s, every shard flaps on a loaded 2-core machine
        // (load average ~18) before any fault.
        let spec = spec
            .redis(Some(redis))
            .vars(&[("PRESENCE_HEALTH_INTERVAL", "2s")]);
        let s = Scenario::start_spec(spec, &all, &[]).await;
        let h = History::new(s.load().epoch);
        let writers = all[..WRITERS].to_vec();
        let silent = all[WRITERS..WRITERS + SILENT].to_vec();
        let beating: Vec<u64> = all
            .iter()
            .copied()
            .filter(|u| !silent.contains(u))
            .collect();
        let mut observers = Vec::new();
        for k in 0..s.cluster.gateways() {
            observers.push(Observer::start(&s.cluster, k, uid(), &writers, h.epoch).await);
        }
        let writer = Writer::start(&s.cluster, &h, &writers, Duration::from_millis(500));
        Chaos {
            name,
            s,
            h,
            writers,
            silent,
            beating,
            redis: redis.to_owned(),
            late_ghosts: None,
            writer: Some(writer),
            observers,
        }
    }

    /// The steps before a fault: batch polls watch every heartbeating user, the silent ones
    /// stop.
    pub fn before_fault(&self) -> Vec<Step> {
        vec![
            Step::watch("under the fault", &self.beating, Duration::from_millis(500)),
            Step::StopUsers(self.silent.clone()),
        ]
    }

    /// The silent users read OFFLINE by their last heartbeat + timeout + 5 s (ghosts), those of
    /// [`Chaos::late_ghosts`] by their own deadline.
    pub fn expect_silent_offline(&self) -> Vec<Step> {
        let Some((late, deadline)) = &self.late_ghosts else {
            return vec![Step::ExpectOffline(self.silent.clone(), ghost_deadline())];
        };
        let (late, others): (Vec<u64>, Vec<u64>) =
            self.silent.iter().partition(|u| late.contains(u));
        vec![
            Step::ExpectOffline(others, ghost_deadline()),
            Step::ExpectOffline(late, *deadline),
        ]
    }

    pub async fn run(&mut self, steps: Vec<Step>) {
        self.s.run(steps).await;
    }

    /// Before the fault: batch polls watch every heartbeating user, the silent ones stop, a
    /// second passes.
    pub async fn until_fault(&mut self) {
        let mut steps = self.before_fault();
        steps.push(Step::Sleep(Duration::from_secs(1)));
        self.s.run(steps).await;
    }

    /// After the heal: the silent users read OFFLINE in time (ghosts) while the cluster settles
    /// (`settle`), then a second passes.
    pub async fn after_heal(&mut self, settle: bool) {
        let mut together = self.expect_silent_offline();
        if settle {
            together.push(Step::WaitSettled);
        }
        let steps = vec![
            Step::Together(together),
            Step::Sleep(Duration::from_secs(1)),
        ];
        self.s.run(steps).await;
    }

    /// The writers that shard `i` owns (with every declared shard up).
    pub fn writers_on_shard(&self, i: usize) -> Vec<u64> {
        self.on_shard(&self.writers, i)
    }

    /// Those of `users` that shard `i` owns (with every declared shard up).
    pub fn on_shard(&self, users: &[u64], i: usize) -> Vec<u64> {
        let c = &self.s.cluster;
        let all: Vec<usize> = (0..c.shards()).collect();
        let ring = c.ring_of(&all);
        let addr = c.shard_addr(i);
        users
            .iter()
            .copied()
            .filter(|&u| ring.owner_of(u) == Some(addr.as_str()))
            .collect()
    }

    /// Stops writing, checks the history while the load still runs, ends the load, prints the
    /// summary line, fails on any problem; takes every user offline again.
    pub async fn finish(mut self, touched: impl Fn(u64, usize) -> bool) -> Figures {
        self.writer.take().expect("once").finish().await;
        let found = self
            .h
            .check(&self.s, &mut self.observers, &self.redis, touched)
            .await;
        let outcome = self.s.end().await;
        self.s.clean_up().await;
        self.h.finish(self.name, found, &outcome)
    }
}

/// `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// A process stopped with SIGSTOP until [`Paused::resume`], or until dropped (even when the
/// test fails).
pub struct Paused(Option<u32>);

impl Paused {
    pub fn stop(pid: u32) -> Paused {
        signal(pid, "STOP");
        Paused(Some(pid))
    }

    pub fn resume(mut self) {
        if let Some(pid) = self.0.take() {
            signal(pid, "CONT");
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// Polls `presence_ring_members` of every node every 250 ms until [`RingWatch::finish`]: every
/// reading that is not `want`.
pub struct RingWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl RingWatch {
    pub fn start(c: &Chaos, want: f64) -> RingWatch {
        let cl = &c.s.cluster;
        let nodes: Vec<(Proc, String)> = cl
            .procs()
            .into_iter()
            .map(|p| (p, cl.http_base(p)))
            .collect();
        let (client, stop, epoch) = (
            cl.client().clone(),
            Arc::new(AtomicBool::new(false)),
            c.h.epoch,
        );
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut reads, mut wrong) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for (p, base) in &nodes {
                    let r = client
                        .get(format!("{base}/metrics"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    let text = match r {
                        Ok(resp) => resp.text().await.unwrap_or_default(),
                        Err(e) => format!("error {e}"),
                    };
                    let v = common::http::metric_value(&text, "presence_ring_members");
                    reads += 1;
                    if v != Some(want) && wrong.len() < 20 {
                        let at = epoch.elapsed().as_millis();
                        wrong.push(format!("+{at} ms {p:?}: {v:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (reads, wrong)
        });
        RingWatch { stop, task }
    }

    /// How many readings were taken, and the wrong ones.
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the ring watch")
    }
}

/// Declares chaos scenarios, each `name => runner(args)`: a multi-threaded tokio test that
/// needs the Redis Cluster, calling `runner("name", args)`.
#[macro_export]
macro_rules! scenarios {
    ($($name:ident => $runner:ident($($arg:expr),* $(,)?)),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
            async fn $name() {
                $runner(stringify!($name), $($arg),*).await;
            }
        )*
    };
}
