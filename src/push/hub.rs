//! The gateway's sockets and the fan-out of events to them.
//!
//! Each socket has a bounded queue; an event is serialized once and its bytes shared by every
//! socket it goes to. A socket whose queue is full is a slow consumer: it is closed, never
//! buffered for. Each socket remembers the last version it was sent of each target, so it never
//! receives an older state after a newer one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Event, EventSink};
use crate::metrics::Metrics;
use crate::presence::{StatusView, UserId};

/// A text frame ready to write.
pub type Frame = Utf8Bytes;

/// Targets the gateway starts or stops being interested in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InterestDelta {
    pub add: Vec<UserId>,
    pub remove: Vec<UserId>,
}

/// What a socket gets when it registers.
pub struct Registration {
    pub id: u64,
    pub rx: mpsc::Receiver<Frame>,
    /// Fires when the hub drops the socket (slow consumer).
    pub kill: CancellationToken,
}

struct Sock {
    user: UserId,
    tx: mpsc::Sender<Frame>,
    seen: HashMap<UserId, u64>,
    kill: CancellationToken,
}

#[derive(Default)]
struct State {
    next_id: u64,
    socks: HashMap<u64, Sock>,
    by_user: HashMap<UserId, SmallVec<[u64; 2]>>,
    /// Subscriptions of users with a socket here.
    subs: HashMap<UserId, HashSet<UserId>>,
    /// target → local subscribers: the keys are this gateway's interest.
    watchers: HashMap<UserId, HashSet<UserId>>,
    /// (user, device) → (open sockets, generation), for the close grace.
    devices: HashMap<(UserId, String), (u32, u64)>,
}

/// The sockets of one gateway.
pub struct Hub {
    state: Mutex<State>,
    interest: Mutex<Option<mpsc::UnboundedSender<InterestDelta>>>,
    metrics: Arc<Metrics>,
    queue: usize,
}

/// The JSON text of a `presence` frame.
pub fn presence_frame(view: &StatusView) -> Frame {
    let v = serde_json::json!({ "type": "presence", "data": view });
    Frame::from(v.to_string())
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, queue: usize) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::default(),
            interest: Mutex::new(None),
            metrics,
            queue: queue.max(1),
        })
    }

    /// Sends interest changes to `tx` from now on (a gateway's upstream manager).
    pub fn set_interest_sink(&self, tx: mpsc::UnboundedSender<InterestDelta>) {
        *self.interest.lock() = Some(tx);
    }

    fn count_subscriptions(&self, st: &State) {
        self.metrics
            .push
            .ws_subscriptions
            .set(st.watchers.values().map(|w| w.len() as i64).sum());
    }

    fn notify(&self, delta: InterestDelta) {
        if delta.add.is_empty() && delta.remove.is_empty() {
            return;
        }
        if let Some(tx) = self.interest.lock().as_ref() {
            let _ = tx.send(delta);
        }
    }

    /// Every target this gateway is interested in.
    pub fn interest(&self) -> Vec<UserId> {
        self.state.lock().watchers.keys().copied().collect()
    }

    pub fn sockets(&self) -> usize {
        self.state.lock().socks.len()
    }

    /// A new socket of `user` on `device`.
    pub fn register(&self, user: UserId, device: &str) -> Registration {
        let (tx, rx) = mpsc::channel(self.queue);
        let kill = CancellationToken::new();
        let mut st = self.state.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.socks.insert(
            id,
            Sock {
                user,
                tx,
                seen: HashMap::new(),
                kill: kill.clone(),
            },
        );
        st.by_user.entry(user).or_default().push(id);
        let mut delta = InterestDelta::default();
        let w = st.watchers.entry(user).or_default();
        if w.is_empty() {
            delta.add.push(user);
        }
        w.insert(user);
        let d = st
            .devices
            .entry((user, device.to_owned()))
            .or_insert((0, 0));
        d.0 += 1;
        d.1 += 1;
        self.metrics.push.ws_connections.set(st.socks.len() as i64);
        drop(st);
        self.notify(delta);
        Registration { id, rx, kill }
    }

    /// The socket is gone. Returns the device's generation, for the close grace.
    pub fn unregister(&self, id: u64, device: &str) -> u64 {
        let mut st = self.state.lock();
        let Some(sock) = st.socks.remove(&id) else {
            return 0;
        };
        let user = sock.user;
        let mut last = false;
        if let Some(ids) = st.by_user.get_mut(&user) {
            ids.retain(|i| *i != id);
            last = ids.is_empty();
        }
        let key = (user, device.to_owned());
        let generation = match st.devices.get_mut(&key) {
            Some(d) => {
                d.0 = d.0.saturating_sub(1);
                d.1
            }
            None => 0,
        };
        let mut delta = InterestDelta::default();
        if last {
            st.by_user.remove(&user);
            let old = st.subs.remove(&user).unwrap_or_default();
            for t in old {
                unwatch(&mut st, t, user, &mut delta);
            }
            unwatch(&mut st, user, user, &mut delta);
        }
        self.metrics.push.ws_connections.set(st.socks.len() as i64);
        self.count_subscriptions(&st);
        drop(st);
        self.notify(delta);
        generation
    }

    /// Whether `device` of `user` has had no socket since `generation` (the close grace ran out
    /// without a reconnect). Forgets the device when so.
    pub fn gone_since(&self, user: UserId, device: &str, generation: u64) -> bool {
        let mut st = self.state.lock();
        let key = (user, device.to_owned());
        match st.devices.get(&key) {
            Some((0, g)) if *g == generation => {
                st.devices.remove(&key);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Installs the full subscription list of `user` (when the user has a socket here). With
    /// `catch_up` (a change, not the list loaded when a socket connects), the user's sockets
    /// want the current state of each added target, so an interest snapshot reaches them: a
    /// device learns the state of a target another device just subscribed to.
    pub fn set_subscriptions(&self, user: UserId, targets: &[UserId], catch_up: bool) {
        let mut st = self.state.lock();
        let Some(ids) = st.by_user.get(&user).cloned() else {
            return;
        };
        let next: HashSet<UserId> = targets.iter().copied().collect();
        let old = st.subs.insert(user, next.clone()).unwrap_or_default();
        let mut delta = InterestDelta::default();
        for &t in next.difference(&old) {
            let w = st.watchers.entry(t).or_default();
            if w.is_empty() {
                delta.add.push(t);
            }
            w.insert(user);
            if catch_up {
                for id in &ids {
                    if let Some(sock) = st.socks.get_mut(id) {
                        sock.seen.entry(t).or_insert(0);
                    }
                }
            }
        }
        for &t in old.difference(&next) {
            if t != user {
                unwatch(&mut st, t, user, &mut delta);
            }
        }
        self.count_subscriptions(&st);
        drop(st);
        self.notify(delta);
    }

    /// Keeps the views the socket has not seen at that version yet, and marks them seen.
    pub fn fresh(&self, id: u64, views: Vec<StatusView>) -> Vec<StatusView> {
        let mut st = self.state.lock();
        let Some(sock) = st.socks.get_mut(&id) else {
            return Vec::new();
        };
        views
            .into_iter()
            .filter(|v| {
                let seen = sock.seen.entry(v.user_id).or_insert(0);
                let newer = v.version > *seen || (v.version == 0 && *seen == 0);
                *seen = (*seen).max(v.version);
                newer
            })
            .collect()
    }

    /// Queues a `presence` frame for every view the socket has not seen at that version, in
    /// the socket's event order, and marks them seen. Returns how many were queued.
    pub fn send_fresh(&self, id: u64, views: &[StatusView]) -> usize {
        let mut st = self.state.lock();
        let Some(sock) = st.socks.get_mut(&id) else {
            return 0;
        };
        let mut sent = 0;
        for v in views {
            let seen = sock.seen.entry(v.user_id).or_insert(0);
            if v.version > *seen && sock.tx.try_send(presence_frame(v)).is_ok() {
                *seen = v.version;
                sent += 1;
            }
        }
        sent
    }

    /// Marks versions as seen by a socket (what a client says it has, on resume).
    pub fn seen(&self, id: u64, versions: &[(UserId, u64)]) {
        let mut st = self.state.lock();
        if let Some(sock) = st.socks.get_mut(&id) {
            for &(t, v) in versions {
                let s = sock.seen.entry(t).or_insert(0);
                *s = (*s).max(v);
            }
        }
    }

    /// Sends an event to every local socket whose user subscribes to it and has not seen it.
    /// A subscription change updates what this gateway listens to for that user.
    pub fn deliver(&self, ev: &Event) {
        if let Some(list) = &ev.subscriptions {
            self.set_subscriptions(ev.view.user_id, list, true);
            return;
        }
        let target = ev.view.user_id;
        let version = ev.view.version;
        let mut frame: Option<Frame> = None;
        let mut st = self.state.lock();
        let Some(watchers) = st.watchers.get(&target) else {
            return;
        };
        let ids: SmallVec<[u64; 8]> = watchers
            .iter()
            .filter_map(|u| st.by_user.get(u))
            .flat_map(|ids| ids.iter().copied())
            .collect();
        let mut delivered = 0u64;
        for id in ids {
            let Some(sock) = st.socks.get_mut(&id) else {
                continue;
            };
            if sock.kill.is_cancelled() {
                continue; // already cut off as a slow consumer
            }
            if ev.snapshot && !sock.seen.contains_key(&target) {
                continue; // a snapshot only catches up sockets that were sent this user before
            }
            let seen = sock.seen.entry(target).or_insert(0);
            if version <= *seen {
                continue;
            }
            let f = frame
                .get_or_insert_with(|| presence_frame(&ev.view))
                .clone();
            match sock.tx.try_send(f) {
                Ok(()) => {
                    *seen = version;
                    delivered += 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sock.kill.cancel();
                    self.metrics.push.slow_consumers.inc();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(st);
        if delivered > 0 {
            self.metrics.push.events_delivered.inc_by(delivered);
            let now = crate::timer::Clock::new().now();
            let delay = Duration::from_millis((now - ev.changed_at).max(0) as u64);
            self.metrics.push.delay.observe(delay.as_secs_f64());
        }
    }
}

fn unwatch(st: &mut State, target: UserId, user: UserId, delta: &mut InterestDelta) {
    if let Some(w) = st.watchers.get_mut(&target) {
        w.remove(&user);
        if w.is_empty() {
            st.watchers.remove(&target);
            delta.remove.push(target);
        }
    }
}

/// In the one-process role the shard publishes straight into the hub.
impl EventSink for Hub {
    fn wants(&self, user: UserId) -> bool {
        self.state.lock().watchers.contains_key(&user)
    }

    fn publish(&self, event: Event) {
        self.metrics.push.events_published.inc();
        self.deliver(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Status;

    fn view(user: UserId, version: u64, status: Status) -> StatusView {
        StatusView {
            user_id: user,
            status,
            last_active_time: 0,
            devices: Vec::new(),
            custom_text: None,
            manual_status: None,
            version,
        }
    }

    fn ev(user: UserId, version: u64) -> Event {
        Event {
            view: view(user, version, Status::Online),
            changed_at: 0,
            subscriptions: None,
            snapshot: false,
        }
    }

    #[tokio::test]
    async fn delivers_in_version_order_and_tracks_interest() {
        let hub = Hub::new(Arc::new(Metrics::new()), 8);
        let (tx, mut interest) = mpsc::unbounded_channel();
        hub.set_interest_sink(tx);
        let mut a1 = hub.register(1, "phone");
        let mut a2 = hub.register(1, "laptop");
        assert_eq!(
            interest.recv().await.unwrap().add,
            vec![1],
            "a user listens to itself"
        );
        hub.set_subscriptions(1, &[10, 11], false);
        let mut d = interest.recv().await.unwrap();
        d.add.sort();
        assert_eq!(d.add, vec![10, 11]);
        hub.deliver(&ev(10, 2));
        hub.deliver(&ev(10, 1)); // older: dropped
        hub.deliver(&ev(12, 5)); // nobody subscribes
        for r in [&mut a1.rx, &mut a2.rx] {
            let f = r.try_recv().unwrap();
            assert!(f.as_str().contains("\"version\":2"), "{}", f.as_str());
            assert!(r.try_recv().is_err());
        }
        // Resume marks, then replies only carry what is newer.
        hub.seen(a1.id, &[(11, 4)]);
        let fresh = hub.fresh(
            a1.id,
            vec![view(11, 4, Status::Busy), view(10, 3, Status::Away)],
        );
        assert_eq!(
            fresh.iter().map(|v| v.user_id).collect::<Vec<_>>(),
            vec![10]
        );
        // The last socket of the user leaves: interest goes.
        hub.unregister(a1.id, "phone");
        hub.unregister(a2.id, "laptop");
        let mut d = interest.recv().await.unwrap();
        d.remove.sort();
        assert_eq!(d.remove, vec![1, 10, 11]);
        assert!(hub.interest().is_empty());
    }

    #[tokio::test]
    async fn a_slow_consumer_is_cut_off_not_buffered() {
        let hub = Hub::new(Arc::new(Metrics::new()), 2);
        let a = hub.register(1, "d");
        hub.set_subscriptions(1, &[10], false);
        for v in 1..=5 {
            hub.deliver(&ev(10, v));
        }
        assert!(a.kill.is_cancelled());
        assert_eq!(hub.metrics.push.slow_consumers.get(), 1);
    }

    #[tokio::test]
    async fn snapshots_only_catch_up_sockets_that_want_them() {
        let hub = Hub::new(Arc::new(Metrics::new()), 8);
        let mut a = hub.register(1, "d");
        hub.set_subscriptions(1, &[10], false); // loaded at connect
        let snap = |u, v| Event {
            snapshot: true,
            ..ev(u, v)
        };
        hub.deliver(&snap(10, 3)); // a fresh socket waits for its own resume
        assert!(a.rx.try_recv().is_err());
        // Another device subscribes to 11: this socket wants 11's current state.
        hub.set_subscriptions(1, &[10, 11], true);
        hub.deliver(&snap(11, 2));
        assert!(a.rx.try_recv().unwrap().as_str().contains("\"version\":2"));
        hub.deliver(&ev(10, 4)); // changes always go through
        assert!(a.rx.try_recv().unwrap().as_str().contains("\"version\":4"));
    }

    #[test]
    fn close_grace_sees_reconnects() {
        let hub = Hub::new(Arc::new(Metrics::new()), 2);
        let a = hub.register(1, "d");
        let g = hub.unregister(a.id, "d");
        let b = hub.register(1, "d"); // reconnect within the grace
        assert!(!hub.gone_since(1, "d", g));
        let g2 = hub.unregister(b.id, "d");
        assert!(hub.gone_since(1, "d", g2));
    }
}
