//! The gateway's sockets and the fan-out of events to them.
//!
//! Each socket has a bounded queue; an event is serialized once and its bytes shared by every
//! socket it goes to. A socket whose queue is full is a slow consumer: it is closed, never
//! buffered for. Each socket remembers the last version it was sent of each target, so it never
//! receives an older state after a newer one; it remembers only targets its user subscribes to
//! (and the user itself), so that memory is bounded by `PRESENCE_MAX_SUBSCRIPTIONS`.
//!
//! A `resume` catches a socket up through a backlog that is queued in chunks as the socket's
//! queue drains, never filling more than half of it (the rest stays for live events), so a
//! catch-up larger than the queue is neither dropped nor a reason to cut the socket off.
//!
//! On shutdown the hub closes every socket (1001, Going Away) and bounds the `offline` calls
//! the sockets then make ([`Hub::shutdown`], [`Hub::drain_permit`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Event, EventSink};
use crate::metrics::Metrics;
use crate::presence::{Sight, StatusView, UserId};

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
    /// Fires when the node shuts down: the socket is closed with 1001 (Going Away).
    pub closing: CancellationToken,
    /// True while a resume's backlog waits for room in the queue: the writer then calls
    /// [`Hub::top_up`] after each frame it takes.
    pub catching_up: Arc<AtomicBool>,
}

struct Sock {
    user: UserId,
    tx: mpsc::Sender<Frame>,
    /// target → last version sent. Only the user itself and targets it subscribes to: an entry
    /// is dropped when its target is unsubscribed.
    seen: HashMap<UserId, u64>,
    kill: CancellationToken,
    /// A resume's catch-up not queued yet (at most one view per subscribed target).
    backlog: VecDeque<StatusView>,
    catching_up: Arc<AtomicBool>,
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
    /// Cancelled when the node shuts down.
    closing: CancellationToken,
    /// The sockets' tasks (and their close-grace offlines), which a shutdown waits for.
    sessions: TaskTracker,
    /// When a shutdown's offlines must be done by.
    drain_deadline: Mutex<Option<Instant>>,
    /// Bounds the `offline` calls made at once while draining.
    drain_permits: Arc<Semaphore>,
}

/// `offline` calls a draining hub makes at once by default (`PRESENCE_WS_DRAIN_CONCURRENCY`).
pub const DEFAULT_DRAIN_CONCURRENCY: usize = 64;

/// The JSON text of a `presence` frame.
pub fn presence_frame(view: &StatusView) -> Frame {
    let v = serde_json::json!({ "type": "presence", "data": view });
    Frame::from(v.to_string())
}

/// Whether a socket of `user` keeps state about `target`: the user itself, or a target it
/// subscribes to.
fn wanted(subs: &HashMap<UserId, HashSet<UserId>>, user: UserId, target: UserId) -> bool {
    target == user || subs.get(&user).is_some_and(|s| s.contains(&target))
}

/// Queues the socket's backlog while more than `reserve` slots of its queue stay free. Returns
/// how many frames were queued.
fn top_up(sock: &mut Sock, subs: &HashMap<UserId, HashSet<UserId>>, reserve: usize) -> usize {
    let mut queued = 0;
    while !sock.backlog.is_empty() {
        if sock.kill.is_cancelled() {
            sock.backlog.clear();
            break;
        }
        if sock.tx.capacity() <= reserve {
            break;
        }
        let Some(v) = sock.backlog.pop_front() else {
            break;
        };
        if !wanted(subs, sock.user, v.user_id) {
            continue; // unsubscribed meanwhile
        }
        let seen = sock.seen.entry(v.user_id).or_insert(0);
        if v.version <= *seen {
            continue; // a newer state went out meanwhile
        }
        match sock.tx.try_send(presence_frame(&v)) {
            Ok(()) => {
                *seen = v.version;
                queued += 1;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                sock.backlog.push_front(v);
                break;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                sock.backlog.clear();
                break;
            }
        }
    }
    sock.catching_up
        .store(!sock.backlog.is_empty(), Ordering::Release);
    queued
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, queue: usize) -> Arc<Hub> {
        Hub::with_drain_concurrency(metrics, queue, DEFAULT_DRAIN_CONCURRENCY)
    }

    /// A hub whose shutdown makes at most `drain_concurrency` `offline` calls at once.
    pub fn with_drain_concurrency(
        metrics: Arc<Metrics>,
        queue: usize,
        drain_concurrency: usize,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::default(),
            interest: Mutex::new(None),
            metrics,
            queue: queue.max(1),
            closing: CancellationToken::new(),
            sessions: TaskTracker::new(),
            drain_deadline: Mutex::new(None),
            drain_permits: Arc::new(Semaphore::new(drain_concurrency.max(1))),
        })
    }

    /// Whether the node is shutting down (no new sockets).
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Fires when the node shuts down.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// The tasks of sockets (and of their close graces), which [`Hub::wait`] waits for.
    pub fn sessions(&self) -> &TaskTracker {
        &self.sessions
    }

    /// Starts the drain: every socket gets its close frame (1001) and takes its device offline
    /// by `deadline`.
    pub fn shutdown(&self, deadline: Instant) {
        *self.drain_deadline.lock() = Some(deadline);
        self.closing.cancel();
        self.sessions.close();
    }

    /// When the drain's offlines must be done by (`None` unless shutting down).
    pub fn drain_deadline(&self) -> Option<Instant> {
        *self.drain_deadline.lock()
    }

    /// A permit for one `offline` call while draining (bounded concurrency); `None` once the
    /// drain deadline has passed.
    pub async fn drain_permit(&self) -> Option<OwnedSemaphorePermit> {
        let deadline = self.drain_deadline()?;
        tokio::time::timeout_at(deadline, self.drain_permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Resolves once every socket task has ended (after [`Hub::shutdown`]).
    pub async fn wait(&self) {
        self.sessions.close();
        self.sessions.wait().await;
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

    /// Open sockets of `user` here.
    pub fn sockets_of(&self, user: UserId) -> usize {
        self.state.lock().by_user.get(&user).map_or(0, |s| s.len())
    }

    /// A new socket of `user` on `device`.
    pub fn register(&self, user: UserId, device: &str) -> Registration {
        let (tx, rx) = mpsc::channel(self.queue);
        let kill = CancellationToken::new();
        let catching_up = Arc::new(AtomicBool::new(false));
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
                backlog: VecDeque::new(),
                catching_up: catching_up.clone(),
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
        Registration {
            id,
            rx,
            kill,
            closing: self.closing.clone(),
            catching_up,
        }
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
    /// device learns the state of a target another device just subscribed to. The sockets
    /// forget what they were sent of removed targets.
    pub fn set_subscriptions(&self, user: UserId, targets: &[UserId], catch_up: bool) {
        let mut st = self.state.lock();
        let delta = set_subscriptions_locked(&mut st, user, targets, catch_up);
        self.count_subscriptions(&st);
        drop(st);
        self.notify(delta);
    }

    /// The subscription list of `user` as this hub holds it, sorted; `None` when not loaded (no
    /// socket of the user here, or its read failed).
    pub fn subscriptions_of(&self, user: UserId) -> Option<Vec<UserId>> {
        let st = self.state.lock();
        let mut list: Vec<UserId> = st.subs.get(&user)?.iter().copied().collect();
        list.sort_unstable();
        Some(list)
    }

    /// Installs `targets`, a list read from the store, unless the hub already holds the user's
    /// list (loaded by another socket, or changed since the read): returns the list in effect,
    /// sorted.
    pub fn install_loaded(&self, user: UserId, targets: &[UserId]) -> Vec<UserId> {
        let mut st = self.state.lock();
        let delta = if st.subs.contains_key(&user) {
            InterestDelta::default()
        } else {
            set_subscriptions_locked(&mut st, user, targets, false)
        };
        self.count_subscriptions(&st);
        let mut list: Vec<UserId> = match st.subs.get(&user) {
            Some(s) => s.iter().copied().collect(),
            None => targets.to_vec(), // no socket of the user any more
        };
        drop(st);
        self.notify(delta);
        list.sort_unstable();
        list
    }

    /// Keeps the views the socket has not seen at that version yet, and marks them seen (for
    /// targets the user subscribes to: the socket keeps no state about others).
    pub fn fresh(&self, id: u64, views: Vec<StatusView>) -> Vec<StatusView> {
        let mut st = self.state.lock();
        let State { socks, subs, .. } = &mut *st;
        let Some(sock) = socks.get_mut(&id) else {
            return Vec::new();
        };
        views
            .into_iter()
            .filter(|v| {
                if !wanted(subs, sock.user, v.user_id) {
                    return true;
                }
                let seen = sock.seen.entry(v.user_id).or_insert(0);
                let newer = v.version > *seen || (v.version == 0 && *seen == 0);
                *seen = (*seen).max(v.version);
                newer
            })
            .collect()
    }

    /// A resume: the client has seen `versions`; `views` are the current states of the user's
    /// targets. Records what the client has seen (of targets the user subscribes to, and the
    /// user itself; anything else is ignored), then catches the socket up on every view newer
    /// than that: the first chunk now, the rest as the socket's queue drains (see
    /// [`Hub::top_up`]). A new resume replaces a catch-up still under way. Returns how many
    /// targets are being caught up.
    pub fn resume(&self, id: u64, versions: &[(UserId, u64)], views: Vec<StatusView>) -> usize {
        let mut st = self.state.lock();
        let State { socks, subs, .. } = &mut *st;
        let Some(sock) = socks.get_mut(&id) else {
            return 0;
        };
        let user = sock.user;
        for &(t, v) in versions {
            if wanted(subs, user, t) {
                let s = sock.seen.entry(t).or_insert(0);
                *s = (*s).max(v);
            }
        }
        let mut backlog = VecDeque::with_capacity(views.len());
        let mut targets = HashSet::with_capacity(views.len());
        for v in views {
            let newer = v.version > sock.seen.get(&v.user_id).copied().unwrap_or(0);
            if newer && wanted(subs, user, v.user_id) && targets.insert(v.user_id) {
                backlog.push_back(v);
            }
        }
        let n = backlog.len();
        sock.backlog = backlog;
        top_up(sock, subs, self.queue / 2);
        n
    }

    /// Queues more of the socket's resume backlog, now that its queue has room (the writer calls
    /// this after taking a frame while [`Registration::catching_up`] is set). Half the queue
    /// stays free for live events.
    pub fn top_up(&self, id: u64) -> usize {
        let mut st = self.state.lock();
        let State { socks, subs, .. } = &mut *st;
        let Some(sock) = socks.get_mut(&id) else {
            return 0;
        };
        let n = top_up(sock, subs, self.queue / 2);
        drop(st);
        self.metrics.push.ws_catch_up_frames.inc_by(n as u64);
        n
    }

    /// Sends an event to every local socket whose user subscribes to it and has not seen it.
    /// A subscription change updates what this gateway listens to for that user.
    pub fn deliver(&self, ev: &Event) {
        if let Some(list) = &ev.subscriptions {
            self.set_subscriptions(ev.view.user_id, list, true);
            return;
        }
        let target = ev.view.user_id;
        // One frame per kind of sight (the user's own sockets, those who may see it, those it
        // hides from), serialized once; the sight is decided once per watching user.
        let mut frames: [Option<(Frame, u64)>; 3] = Default::default();
        let mut st = self.state.lock();
        let State {
            watchers,
            by_user,
            socks,
            ..
        } = &mut *st;
        let Some(watchers) = watchers.get(&target) else {
            return;
        };
        let mut delivered = 0u64;
        let mut filtered = 0u64;
        for &viewer in watchers {
            let Some(ids) = by_user.get(&viewer) else {
                continue;
            };
            let sight = ev.sight(viewer);
            let slot = match sight {
                Sight::Truth => 0,
                Sight::Public => 1,
                Sight::Hidden => 2,
            };
            for id in ids {
                let Some(sock) = socks.get_mut(id) else {
                    continue;
                };
                if sock.kill.is_cancelled() {
                    continue; // already cut off as a slow consumer
                }
                if ev.snapshot && !sock.seen.contains_key(&target) {
                    continue; // a snapshot only catches up sockets that were sent this user before
                }
                let (f, version) = frames[slot]
                    .get_or_insert_with(|| {
                        let v = ev.view_as(sight);
                        (presence_frame(&v), v.version)
                    })
                    .clone();
                let seen = sock.seen.entry(target).or_insert(0);
                if version <= *seen {
                    continue;
                }
                match sock.tx.try_send(f) {
                    Ok(()) => {
                        *seen = version;
                        delivered += 1;
                        if slot == 2 || (slot == 1 && ev.public.is_some()) {
                            filtered += 1;
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        sock.kill.cancel();
                        self.metrics.push.slow_consumers.inc();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        drop(st);
        if filtered > 0 {
            self.metrics.push.filtered.inc_by(filtered);
        }
        if delivered > 0 {
            self.metrics.push.events_delivered.inc_by(delivered);
            let now = crate::timer::Clock::new().now();
            let delay = Duration::from_millis((now - ev.changed_at).max(0) as u64);
            self.metrics.push.delay.observe(delay.as_secs_f64());
        }
    }
}

/// Installs the full subscription list of `user` (see [`Hub::set_subscriptions`]); returns the
/// interest change.
fn set_subscriptions_locked(
    st: &mut State,
    user: UserId,
    targets: &[UserId],
    catch_up: bool,
) -> InterestDelta {
    let mut delta = InterestDelta::default();
    let Some(ids) = st.by_user.get(&user).cloned() else {
        return delta;
    };
    let next: HashSet<UserId> = targets.iter().copied().collect();
    let old = st.subs.insert(user, next.clone()).unwrap_or_default();
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
    let removed: HashSet<UserId> = old
        .difference(&next)
        .copied()
        .filter(|&t| t != user)
        .collect();
    for &t in &removed {
        unwatch(st, t, user, &mut delta);
    }
    if !removed.is_empty() {
        // The sockets keep no state about targets the user no longer subscribes to.
        for id in &ids {
            if let Some(sock) = st.socks.get_mut(id) {
                for t in &removed {
                    sock.seen.remove(t);
                }
                sock.backlog.retain(|v| !removed.contains(&v.user_id));
            }
        }
    }
    delta
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
            last_seen: None,
        }
    }

    fn ev(user: UserId, version: u64) -> Event {
        Event::new(view(user, version, Status::Online), 0)
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
        // A resume records what the client has, then sends only what is newer.
        let n = hub.resume(
            a1.id,
            &[(11, 4)],
            vec![view(11, 4, Status::Busy), view(10, 3, Status::Away)],
        );
        assert_eq!(n, 1);
        let f = a1.rx.try_recv().unwrap();
        assert!(f.as_str().contains("\"version\":3"), "{}", f.as_str());
        assert!(a1.rx.try_recv().is_err());
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

    /// What the writer of a socket does: takes a frame, and tops the catch-up up after it.
    fn drain(hub: &Hub, reg: &mut Registration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(f) = reg.rx.try_recv() {
            if reg.catching_up.load(Ordering::Acquire) {
                hub.top_up(reg.id);
            }
            out.push(f.as_str().to_owned());
        }
        out
    }

    fn seen_len(hub: &Hub, id: u64) -> usize {
        hub.state.lock().socks[&id].seen.len()
    }

    /// Issue 10, defect 9: a resume that does not fit in the socket's queue is neither dropped
    /// nor a slow consumer: the rest goes out as the queue drains, at most half the queue at a
    /// time, so live events still find room.
    #[test]
    fn a_resume_larger_than_the_queue_goes_out_as_the_queue_drains() {
        let hub = Hub::new(Arc::new(Metrics::new()), 4);
        let mut a = hub.register(1, "d");
        let targets: Vec<UserId> = (100..120).collect();
        hub.set_subscriptions(1, &targets, false);
        let views: Vec<StatusView> = targets
            .iter()
            .map(|&t| view(t, 2, Status::Online))
            .collect();
        // The client has 100..105 at version 2 already.
        let have: Vec<(UserId, u64)> = (100..105).map(|t| (t, 2)).collect();
        assert_eq!(hub.resume(a.id, &have, views), 15);
        assert!(a.catching_up.load(Ordering::Acquire));
        // A live event while catching up: room for it, and the catch-up skips the older state.
        hub.deliver(&ev(110, 3));
        assert!(!a.kill.is_cancelled(), "cut off by its own resume");
        let frames = drain(&hub, &mut a);
        assert!(!a.catching_up.load(Ordering::Acquire));
        let mut got: Vec<(u64, u64)> = frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f).unwrap();
                (
                    v["data"]["userId"].as_u64().unwrap(),
                    v["data"]["version"].as_u64().unwrap(),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(u64, u64)> = (105..120).map(|t| (t, 2)).collect();
        want.retain(|&(t, _)| t != 110);
        want.push((110, 3));
        want.sort();
        assert_eq!(got, want);
        assert_eq!(hub.metrics.push.slow_consumers.get(), 0);
    }

    /// Issue 10, defect 9: a socket remembers versions only of its user's targets: a resume
    /// naming others records nothing, and an unsubscribe forgets the target (and drops it from
    /// a catch-up under way).
    #[test]
    fn seen_is_bounded_by_the_subscriptions() {
        let hub = Hub::new(Arc::new(Metrics::new()), 2);
        let mut a = hub.register(1, "d");
        hub.set_subscriptions(1, &[10, 11, 12, 13], false);
        let strangers: Vec<(UserId, u64)> = (1000..6000).map(|t| (t, 1)).collect();
        let views = vec![
            view(10, 1, Status::Online),
            view(11, 1, Status::Online),
            view(12, 1, Status::Online),
            view(13, 1, Status::Online),
            view(5000, 9, Status::Online), // not subscribed: not sent
        ];
        assert_eq!(hub.resume(a.id, &strangers, views), 4);
        assert!(seen_len(&hub, a.id) <= 5, "seen: {}", seen_len(&hub, a.id));
        hub.fresh(a.id, vec![view(7777, 1, Status::Online)]);
        assert!(seen_len(&hub, a.id) <= 5);
        // Unsubscribing 12 and 13 forgets them, and the catch-up does not send them.
        hub.set_subscriptions(1, &[10, 11], true);
        let frames = drain(&hub, &mut a);
        assert!(
            frames
                .iter()
                .all(|f| !f.contains("\"userId\":12") && !f.contains("\"userId\":13")),
            "{frames:?}"
        );
        let st = hub.state.lock();
        let mut keys: Vec<UserId> = st.socks[&a.id].seen.keys().copied().collect();
        keys.sort();
        assert!(keys.iter().all(|k| [1, 10, 11].contains(k)), "{keys:?}");
    }

    #[test]
    fn install_loaded_keeps_a_list_the_hub_already_has() {
        let hub = Hub::new(Arc::new(Metrics::new()), 2);
        let _a = hub.register(1, "d");
        assert_eq!(hub.subscriptions_of(1), None);
        assert_eq!(hub.install_loaded(1, &[3, 2]), vec![2, 3]);
        assert_eq!(hub.install_loaded(1, &[9]), vec![2, 3], "older read");
        hub.set_subscriptions(1, &[4], true);
        assert_eq!(hub.subscriptions_of(1), Some(vec![4]));
    }

    #[tokio::test]
    async fn shutdown_closes_sockets_and_bounds_the_offlines() {
        let hub = Hub::with_drain_concurrency(Arc::new(Metrics::new()), 2, 1);
        let a = hub.register(1, "d");
        assert!(hub.drain_permit().await.is_none(), "not draining");
        hub.shutdown(Instant::now() + Duration::from_millis(50));
        assert!(a.closing.is_cancelled() && hub.is_closing());
        let p = hub.drain_permit().await.expect("a permit");
        assert!(
            hub.drain_permit().await.is_none(),
            "one at a time, then the deadline"
        );
        drop(p);
        hub.wait().await;
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
