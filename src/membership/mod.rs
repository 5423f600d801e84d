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

    /// Whether [`Discovery::register`] is what makes this shard a member (Nacos).
    fn registers(&self) -> bool {
        false
    }

    /// Resolves once [`Discovery::run`] has published its first list of members (at once for
    /// sources that need no registration).
    async fn first_list(&self) {}

    /// A short name for logs.
    fn kind(&self) -> &'static str;
}

/// When a shard that registers itself ([`Discovery::registers`]: Nacos) may do so, as it
/// starts: once it can take partitions. Registering makes it a member of every ring, so its
/// partitions' interim owners let go of them; within its start grace (`grace_over`) it would
/// not load them yet. So, beside other members, it waits for its grace to be over: the rule
/// that `starting` on the health check gives static discovery, and readiness Kubernetes.
/// Alone (a cluster forming), it registers at once. It tells the two apart by the discovery's
/// first list of `members` (`me` listed there is an instance of its own not yet expired),
/// waited for up to the grace. Returns whether other members were listed.
pub async fn until_joinable(
    discovery: &dyn Discovery,
    members: &watch::Receiver<Members>,
    me: &str,
    grace_over: tokio::time::Instant,
) -> bool {
    let _ = tokio::time::timeout_at(grace_over, discovery.first_list()).await;
    let others = members.borrow().iter().any(|m| m != me);
    if others {
        tracing::info!(
            discovery = discovery.kind(),
            "other shards are members: registering once the start grace is over"
        );
        tokio::time::sleep_until(grace_over).await;
    }
    others
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
    /// Up and starting, as another process than the one that answered before: it restarted, its
    /// partitions are unserved and it takes none yet, so it leaves at once (its interim owners
    /// serve them until it joins again, once its grace is over).
    Restarted,
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
/// can take them, rather than release them to a shard that takes nothing yet. A member that
/// restarted ([`Probed::Restarted`]) leaves at once.
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
                    Probed::Restarted => {
                        if *healthy {
                            *healthy = false;
                            *streak = 0;
                            tracing::info!(shard = %shard, "shard restarted: left until it serves");
                        }
                        continue;
                    }
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

    /// A member that restarted (it answers starting, as another process) leaves at the first
    /// check that sees it, not after two failed ones: its partitions went with its old process.
    /// It stays out while starting, and joins again once it serves.
    #[tokio::test(start_paused = true)]
    async fn a_restarted_member_leaves_at_once_and_joins_once_it_serves() {
        let all = vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()];
        let probe = FakeProbe::serving(&all);
        let (mut rx, cancel) = run_static(&all, probe.clone());
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update().clone(), all);
        let t = tokio::time::Instant::now();
        probe.set("b:1", Probed::Restarted);
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("b left")
            .unwrap();
        assert_eq!(rx.borrow_and_update().len(), 2, "b left");
        assert!(
            t.elapsed() <= Duration::from_secs(1),
            "one check: {:?}",
            t.elapsed()
        );
        probe.set("b:1", Probed::Starting);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!rx.has_changed().unwrap(), "out while starting");
        probe.set("b:1", Probed::Serving);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update().clone(), all);
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

    /// A discovery that registers, whose first list comes when the test says.
    struct Registering(watch::Sender<bool>);

    #[async_trait]
    impl Discovery for Registering {
        async fn run(self: Arc<Self>, _tx: watch::Sender<Members>, _cancel: CancellationToken) {}

        fn registers(&self) -> bool {
            true
        }

        async fn first_list(&self) {
            let _ = self.0.subscribe().wait_for(|&l| l).await;
        }

        fn kind(&self) -> &'static str {
            "registering"
        }
    }

    /// How long `until_joinable` holds a shard `me` whose discovery lists `listed` after
    /// `list_after` (never: `None`), with its start grace over in 3 s; and whether it waited
    /// for the grace.
    async fn joinable_after(listed: &[&str], list_after: Option<Duration>) -> (Duration, bool) {
        const GRACE: Duration = Duration::from_secs(3);
        let d = Arc::new(Registering(watch::channel(false).0));
        let (tx, rx) = watch::channel(members(Vec::new()));
        let start = tokio::time::Instant::now();
        if let Some(after) = list_after {
            let (d, listed) = (
                d.clone(),
                listed.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                tx.send_replace(members(listed));
                d.0.send_replace(true);
            });
        }
        let waited = until_joinable(&*d, &rx, "me:1", start + GRACE).await;
        (start.elapsed(), waited)
    }

    /// A shard that registers itself does so at once when its first list shows it alone (or
    /// only an instance of its own not yet expired): a cluster forms without waiting. Beside
    /// other members it registers once its start grace is over, however early the list came;
    /// with no list within the grace, it registers then.
    #[tokio::test(start_paused = true)]
    async fn a_registering_shard_joins_at_once_alone_and_after_its_grace_beside_others() {
        let ms = Duration::from_millis;
        assert_eq!(joinable_after(&[], Some(ms(200))).await, (ms(200), false));
        assert_eq!(
            joinable_after(&["me:1"], Some(ms(200))).await,
            (ms(200), false)
        );
        assert_eq!(
            joinable_after(&["me:1", "other:1"], Some(ms(200))).await,
            (ms(3000), true)
        );
        assert_eq!(
            joinable_after(&["other:1"], Some(ms(5000))).await,
            (ms(3000), false)
        );
        assert_eq!(joinable_after(&[], None).await, (ms(3000), false));
    }
}
