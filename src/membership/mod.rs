//! Who the shards are. A `Discovery` publishes the set of ready shards (their gRPC addresses)
//! into a watch channel; every node builds the same [`crate::ring::Ring`] from it.
//!
//! - [`StaticDiscovery`]: a fixed list (`PRESENCE_SHARDS`) with health checks, so a dead shard
//!   leaves the ring within a few seconds and rejoins when it answers again.
//! - [`kubernetes::KubernetesDiscovery`]: ready endpoints of the shards' headless Service, from a
//!   reflector on its EndpointSlices.
//! - [`nacos::NacosDiscovery`]: shards register in Nacos; everyone subscribes.
//! - [`ManualDiscovery`]: in-memory, driven by tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

pub mod kubernetes;
pub mod nacos;

/// The gRPC addresses (`host:port`) of the ready shards, sorted, without duplicates.
pub type Members = Arc<Vec<String>>;

/// Normalizes a member list: sorted, deduplicated.
pub fn members<I: IntoIterator<Item = String>>(it: I) -> Members {
    let mut v: Vec<String> = it.into_iter().filter(|m| !m.is_empty()).collect();
    v.sort();
    v.dedup();
    Arc::new(v)
}

/// A source of membership.
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Publishes the member set into `tx` whenever it changes, until `cancel` fires. Publishes
    /// only changes (`send_if_modified`), so receivers wake on real changes.
    async fn run(self: Arc<Self>, tx: watch::Sender<Members>, cancel: CancellationToken);

    /// Makes this shard known at `advertise`. Only Nacos needs it; for the others the source
    /// of truth is outside the process (the list, Kubernetes).
    async fn register(&self, _advertise: &str) -> Result<(), Error> {
        Ok(())
    }

    /// Withdraws this shard before it stops.
    async fn deregister(&self, _advertise: &str) -> Result<(), Error> {
        Ok(())
    }

    /// A short name for logs.
    fn kind(&self) -> &'static str;
}

/// Publishes `next` if it differs from what `tx` holds. Returns whether it did.
pub fn publish(tx: &watch::Sender<Members>, next: Members) -> bool {
    tx.send_if_modified(|cur| {
        if **cur == *next {
            false
        } else {
            *cur = next;
            true
        }
    })
}

/// What a health check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// Up and serving.
    Serving,
    /// Up, within its start grace (taking no partition yet): changes nothing.
    Starting,
    /// No answer, or draining.
    Down,
}

/// Answers whether a shard at an address is alive and serving.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    async fn probe(&self, addr: &str) -> Probed;
}

/// A fixed list of shards, each health-checked every `interval`. Every shard starts as a member;
/// it leaves after `fall` failed checks in a row and rejoins after `rise` good ones. A shard
/// within its start grace counts as neither: a member stays one (a cluster that starts together
/// forms as before), and one that is not (restarted after its peers dropped it, or added) joins
/// once its grace is over, so that the shards holding its partitions keep serving them until it
/// can take them, rather than release them to a shard that takes nothing yet.
pub struct StaticDiscovery {
    shards: Vec<String>,
    probe: Arc<dyn Probe>,
    interval: Duration,
    fall: u32,
    rise: u32,
}

impl StaticDiscovery {
    pub fn new(shards: Vec<String>, probe: Arc<dyn Probe>, interval: Duration) -> StaticDiscovery {
        StaticDiscovery {
            shards,
            probe,
            interval,
            fall: 2,
            rise: 1,
        }
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    async fn run(self: Arc<Self>, tx: watch::Sender<Members>, cancel: CancellationToken) {
        // (healthy, consecutive results against the current state)
        let mut state: BTreeMap<String, (bool, u32)> = self
            .shards
            .iter()
            // Every listed shard counts as up until `fall` checks in a row fail: a node that
            // just started must not see a partial member set (it would take partitions that
            // live peers own).
            .map(|s| (s.clone(), (true, 0)))
            .collect();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let checks = self.shards.iter().map(|s| {
                let probe = self.probe.clone();
                let timeout = self.interval;
                async move {
                    let probed = tokio::time::timeout(timeout, probe.probe(s))
                        .await
                        .unwrap_or(Probed::Down);
                    (s.clone(), probed)
                }
            });
            for (shard, probed) in futures::future::join_all(checks).await {
                let (healthy, streak) = state.get_mut(&shard).expect("known shard");
                let ok = match probed {
                    Probed::Serving => true,
                    Probed::Down => false,
                    Probed::Starting => *healthy,
                };
                if ok == *healthy {
                    *streak = 0;
                    continue;
                }
                *streak += 1;
                let needed = if ok { self.rise } else { self.fall };
                if *streak >= needed {
                    *healthy = ok;
                    *streak = 0;
                    tracing::info!(shard = %shard, healthy = ok, "shard health changed");
                }
            }
            let up = members(
                state
                    .iter()
                    .filter(|(_, (h, _))| *h)
                    .map(|(s, _)| s.clone()),
            );
            publish(&tx, up);
        }
    }

    fn kind(&self) -> &'static str {
        "static"
    }
}

/// Membership set by hand: for tests and single-process setups.
#[derive(Clone)]
pub struct ManualDiscovery {
    set: watch::Sender<Members>,
}

impl ManualDiscovery {
    pub fn new(initial: Vec<String>) -> ManualDiscovery {
        ManualDiscovery {
            set: watch::Sender::new(members(initial)),
        }
    }

    /// Replaces the member set.
    pub fn set(&self, m: Vec<String>) {
        self.set.send_replace(members(m));
    }
}

#[async_trait]
impl Discovery for ManualDiscovery {
    async fn run(self: Arc<Self>, tx: watch::Sender<Members>, cancel: CancellationToken) {
        let mut rx = self.set.subscribe();
        loop {
            let m = rx.borrow_and_update().clone();
            publish(&tx, m);
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    fn kind(&self) -> &'static str {
        "manual"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::collections::HashMap;

    /// What each shard answers (`Down` for those it does not name).
    struct FakeProbe(Mutex<HashMap<String, Probed>>);

    impl FakeProbe {
        fn serving(all: &[String]) -> Arc<FakeProbe> {
            let answers = all.iter().map(|a| (a.clone(), Probed::Serving)).collect();
            Arc::new(FakeProbe(Mutex::new(answers)))
        }

        fn set(&self, addr: &str, p: Probed) {
            self.0.lock().insert(addr.to_owned(), p);
        }
    }

    #[async_trait]
    impl Probe for FakeProbe {
        async fn probe(&self, addr: &str) -> Probed {
            self.0.lock().get(addr).copied().unwrap_or(Probed::Down)
        }
    }

    /// Runs a static discovery of `all` on `probe`, checking every second: its published sets.
    fn run_static(
        all: &[String],
        probe: Arc<FakeProbe>,
    ) -> (watch::Receiver<Members>, CancellationToken) {
        let d = Arc::new(StaticDiscovery::new(
            all.to_vec(),
            probe,
            Duration::from_secs(1),
        ));
        let (tx, rx) = watch::channel(members(Vec::new()));
        let cancel = CancellationToken::new();
        tokio::spawn(d.run(tx, cancel.clone()));
        (rx, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn static_members_follow_health_with_hysteresis() {
        let all = vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()];
        let probe = FakeProbe::serving(&all);
        let (mut rx, cancel) = run_static(&all, probe.clone());
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update().clone(), all);
        // b dies: gone after two failed checks (about 2 s), not after one.
        probe.set("b:1", Probed::Down);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(rx.borrow().len(), 3);
        rx.changed().await.unwrap();
        assert_eq!(
            *rx.borrow_and_update().clone(),
            vec!["a:1".to_owned(), "c:1".to_owned()]
        );
        // b is back: rejoins on the next good check.
        probe.set("b:1", Probed::Serving);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().len(), 3);
        cancel.cancel();
    }

    /// A shard within its start grace changes nothing: members that start together stay
    /// members; one restarted after it was dropped joins only once it serves, so that the
    /// shards holding its partitions keep them until it can take them.
    #[tokio::test(start_paused = true)]
    async fn a_starting_shard_keeps_its_membership_as_it_was() {
        let all = vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()];
        let probe = FakeProbe::serving(&all);
        for a in &all {
            probe.set(a, Probed::Starting);
        }
        let (mut rx, cancel) = run_static(&all, probe.clone());
        rx.changed().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(*rx.borrow_and_update().clone(), all, "all start together");
        for a in &all {
            probe.set(a, Probed::Serving);
        }
        // b is killed: dropped; restarted: starting for 5 s, still out; then serving: back.
        probe.set("b:1", Probed::Down);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().len(), 2);
        probe.set("b:1", Probed::Starting);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(rx.borrow().len(), 2, "not back while starting");
        assert!(!rx.has_changed().unwrap());
        probe.set("b:1", Probed::Serving);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update().clone(), all);
        cancel.cancel();
    }

    #[tokio::test]
    async fn manual_discovery_publishes_changes_only() {
        let d = ManualDiscovery::new(vec!["x:1".into()]);
        let (tx, mut rx) = watch::channel(members(Vec::new()));
        let cancel = CancellationToken::new();
        tokio::spawn(Arc::new(d.clone()).run(tx, cancel.clone()));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_slice(), ["x:1".to_owned()]);
        d.set(vec!["y:1".into(), "x:1".into(), "x:1".into()]);
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update().as_slice(),
            ["x:1".to_owned(), "y:1".to_owned()]
        );
        cancel.cancel();
    }
}
