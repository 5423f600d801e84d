//! The gateway's sockets and the fan-out of events to them.
//!
//! Each socket has a bounded queue (its [`Outbox`]); an event is serialized once and its bytes
//! shared by every socket it goes to. A socket whose queue is full is a slow consumer: it is
//! closed, never buffered for. An idle socket's queue holds no buffer: it allocates while
//! frames wait and frees once they are written. Each socket remembers the last version it was sent of each target, so it never
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
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
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
    /// The socket's queue: events from the hub, the socket's own replies, and why the server
    /// ends the socket.
    pub out: Arc<Outbox>,
    /// Fires when the node shuts down: the socket is closed with 1001 (Going Away).
    pub closing: CancellationToken,
}

/// Why a push into an [`Outbox`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: the socket does not read (a slow consumer).
    Full,
    /// The socket's writer is gone.
    Closed,
}

/// One socket's outgoing frames: the hub's events (at most `PRESENCE_WS_QUEUE`) and the
/// socket's replies (at most `replies`), written by the socket's writer, events first. It
/// also carries why the server ends the socket (slow consumer, flood, or a reason the socket
/// chose), and wakes the socket's reader and writer when that happens.
///
/// One allocation per socket, and no buffer while nothing waits: a queue is freed as soon as
/// it is empty, so an idle socket does not keep the capacity of its largest burst.
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the writer: a frame was queued, or the socket ends.
    to_writer: Notify,
    /// Wakes the reader: the socket ends.
    to_reader: Notify,
    events_cap: u32,
    replies_cap: u32,
}

#[derive(Default)]
struct OutboxState {
    events: VecDeque<Frame>,
    replies: VecDeque<Frame>,
    /// Cut off as a slow consumer (by the hub, or by the reader when replies pile up).
    killed: bool,
    /// The client sent more than `PRESENCE_WS_RATE` messages a second.
    flooded: bool,
    /// Another reason the socket chose to end (token expired or refused, idle, a frame too
    /// large, a protocol error): the close code and reason.
    end: Option<(u16, &'static str)>,
    /// True while a resume's backlog waits for room in the queue: the writer then calls
    /// [`Hub::top_up`] after each event it takes.
    catching_up: bool,
    /// The writer is gone: frames are refused.
    closed: bool,
    /// The reader is done: the writer stops once the queues are empty.
    finished: bool,
}

/// What the writer takes from an [`Outbox`].
#[derive(Debug)]
pub enum Next {
    /// A frame, and whether it was an event taken while a catch-up waits for room (the writer
    /// then calls [`Hub::top_up`]).
    Frame(Frame, bool),
    /// Nothing queued for now.
    Empty,
    /// Nothing queued, and the reader is done.
    Done,
}

/// Close code when the server ends a socket for a policy violation (slow consumer, flood).
const CLOSE_POLICY: u16 = 1008;

impl Outbox {
    /// An outbox for `events` queued events and `replies` queued replies at most.
    pub fn new(events: usize, replies: usize) -> Outbox {
        Outbox {
            state: Mutex::default(),
            to_writer: Notify::new(),
            to_reader: Notify::new(),
            events_cap: events.clamp(1, u32::MAX as usize) as u32,
            replies_cap: replies.clamp(1, u32::MAX as usize) as u32,
        }
    }

    /// Queues an event frame.
    pub fn push_event(&self, f: Frame) -> Result<(), Refused> {
        self.push_bounded(f, self.events_cap, |q| &mut q.events)
    }

    /// Queues a reply; `Err` when the client does not read its replies (or the writer is gone).
    pub fn push_reply(&self, f: Frame) -> Result<(), Refused> {
        self.push_bounded(f, self.replies_cap, |q| &mut q.replies)
    }

    /// Queues `f` on the queue `pick` chooses, unless the outbox is closed or that queue holds
    /// `cap` frames already; wakes the writer.
    fn push_bounded(
        &self,
        f: Frame,
        cap: u32,
        pick: impl FnOnce(&mut OutboxState) -> &mut VecDeque<Frame>,
    ) -> Result<(), Refused> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(Refused::Closed);
        }
        let q = pick(&mut st);
        if q.len() >= cap as usize {
            return Err(Refused::Full);
        }
        q.push_back(f);
        drop(st);
        self.to_writer.notify_one();
        Ok(())
    }

    /// Queues a frame past the reply bound (one a socket sends once, e.g. `subscriptions`).
    pub fn push_reply_unbounded(&self, f: Frame) {
        let mut st = self.state.lock();
        if !st.closed {
            st.replies.push_back(f);
            drop(st);
            self.to_writer.notify_one();
        }
    }

    /// Room left for events.
    pub fn free(&self) -> usize {
        (self.events_cap as usize).saturating_sub(self.state.lock().events.len())
    }

    /// The next frame to write (events first). Frees a queue's buffer once it is empty.
    pub fn next(&self) -> Next {
        let mut st = self.state.lock();
        let st = &mut *st;
        let (f, event) = match st.events.pop_front() {
            Some(f) => (f, true),
            None => match st.replies.pop_front() {
                Some(f) => (f, false),
                None if st.finished => return Next::Done,
                None => return Next::Empty,
            },
        };
        for q in [&mut st.replies, &mut st.events] {
            if q.is_empty() && q.capacity() > 0 {
                *q = VecDeque::new();
            }
        }
        Next::Frame(f, event && st.catching_up)
    }

    /// The next frame, if any (see [`Outbox::next`]).
    pub fn pop(&self) -> Option<(Frame, bool)> {
        match self.next() {
            Next::Frame(f, catching_up) => Some((f, catching_up)),
            Next::Empty | Next::Done => None,
        }
    }

    /// The reader is done: the writer sends what is queued, then stops.
    pub fn finish(&self) {
        self.state.lock().finished = true;
        self.to_writer.notify_one();
    }

    /// Cuts the socket off as a slow consumer.
    pub fn kill(&self) {
        self.state.lock().killed = true;
        self.wake_both();
    }

    /// Whether the socket was cut off as a slow consumer.
    pub fn is_killed(&self) -> bool {
        self.state.lock().killed
    }

    /// Ends the socket: its client floods.
    pub fn flooded(&self) {
        self.state.lock().flooded = true;
        self.wake_both();
    }

    /// Ends the socket with `code` and `reason` (a slow consumer or a flood still wins; of the
    /// socket's own reasons, the last one set is sent).
    pub fn end_with(&self, code: u16, reason: &'static str) {
        self.state.lock().end = Some((code, reason));
        self.wake_both();
    }

    /// Why the server ends the socket, if it does: the close frame to send. A slow consumer
    /// first, then a flood, then the socket's own reason.
    pub fn ending(&self) -> Option<(u16, &'static str)> {
        let st = self.state.lock();
        if st.killed {
            Some((CLOSE_POLICY, "slow consumer"))
        } else if st.flooded {
            Some((CLOSE_POLICY, "rate limit exceeded"))
        } else {
            st.end
        }
    }

    /// The writer is gone: drops what is queued and refuses anything more.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.events = VecDeque::new();
        st.replies = VecDeque::new();
    }

    /// Resolves once something is queued or the socket ends (may resolve spuriously; the
    /// writer is its only caller).
    pub async fn writable(&self) {
        self.to_writer.notified().await;
    }

    /// Resolves once the server ends the socket (the reader is its only caller).
    pub async fn ended(&self) {
        while self.ending().is_none() {
            self.to_reader.notified().await;
        }
    }

    /// Resolves once the server ends the socket (for the writer, while it writes).
    pub async fn ended_for_writer(&self) {
        while self.ending().is_none() {
            self.to_writer.notified().await;
        }
    }

    fn wake_both(&self) {
        self.to_writer.notify_one();
        self.to_reader.notify_one();
    }

    fn set_catching_up(&self, on: bool) {
        self.state.lock().catching_up = on;
    }

    #[cfg(test)]
    fn catching_up(&self) -> bool {
        self.state.lock().catching_up
    }
}

/// The users a target's watchers are; most targets have one (a user with a socket watches
/// itself), so one needs no allocation of its own.
#[derive(Debug)]
enum Watchers {
    One(UserId),
    Many(HashSet<UserId>),
}

impl Watchers {
    fn contains(&self, u: UserId) -> bool {
        match self {
            Watchers::One(x) => *x == u,
            Watchers::Many(s) => s.contains(&u),
        }
    }

    fn len(&self) -> usize {
        match self {
            Watchers::One(_) => 1,
            Watchers::Many(s) => s.len(),
        }
    }

    fn insert(&mut self, u: UserId) {
        match self {
            Watchers::One(x) if *x == u => {}
            Watchers::One(x) => *self = Watchers::Many(HashSet::from([*x, u])),
            Watchers::Many(s) => {
                s.insert(u);
            }
        }
    }

    /// Removes `u`; true when no watcher is left.
    fn remove(&mut self, u: UserId) -> bool {
        match self {
            Watchers::One(x) => *x == u,
            Watchers::Many(s) => {
                s.remove(&u);
                match s.len() {
                    0 => true,
                    1 => {
                        let last = *s.iter().next().expect("one left");
                        *self = Watchers::One(last);
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = UserId> + '_ {
        let (one, many) = match self {
            Watchers::One(x) => (Some(*x), None),
            Watchers::Many(s) => (None, Some(s.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

struct Sock {
    user: UserId,
    out: Arc<Outbox>,
    /// target → last version sent. Only the user itself and targets it subscribes to: an entry
    /// is dropped when its target is unsubscribed.
    seen: HashMap<UserId, u64>,
    /// A resume's catch-up not queued yet (at most one view per subscribed target).
    backlog: VecDeque<StatusView>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    socks: HashMap<u64, Sock>,
    by_user: HashMap<UserId, SmallVec<[u64; 2]>>,
    /// Subscriptions of users with a socket here.
    subs: HashMap<UserId, HashSet<UserId>>,
    /// target → local subscribers: the keys are this gateway's interest.
    watchers: HashMap<UserId, Watchers>,
    /// (user, device) → (open sockets, generation), for the close grace. Device ids up to 24
    /// bytes are stored inline.
    devices: HashMap<(UserId, CompactString), (u32, u64)>,
}

/// The sockets of one gateway.
pub struct Hub {
    state: Mutex<State>,
    interest: Mutex<Option<mpsc::UnboundedSender<InterestDelta>>>,
    metrics: Arc<Metrics>,
    queue: usize,
    /// Replies a socket may have queued (a client that sends but does not read).
    replies: usize,
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
        if sock.out.is_killed() {
            sock.backlog.clear();
            break;
        }
        if sock.out.free() <= reserve {
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
        match sock.out.push_event(presence_frame(&v)) {
            Ok(()) => {
                *seen = v.version;
                queued += 1;
            }
            Err(Refused::Full) => {
                sock.backlog.push_front(v);
                break;
            }
            Err(Refused::Closed) => {
                sock.backlog.clear();
                break;
            }
        }
    }
    if sock.backlog.is_empty() && sock.backlog.capacity() > 0 {
        sock.backlog = VecDeque::new();
    }
    sock.out.set_catching_up(!sock.backlog.is_empty());
    queued
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>, queue: usize) -> Arc<Hub> {
        Hub::with_drain_concurrency(metrics, queue, DEFAULT_DRAIN_CONCURRENCY)
    }

    /// Replies a socket may have queued before its client counts as not reading them.
    pub const REPLY_QUEUE: usize = 64;

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
            replies: Hub::REPLY_QUEUE,
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
        let out = Arc::new(Outbox::new(self.queue, self.replies));
        let mut st = self.state.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.socks.insert(
            id,
            Sock {
                user,
                out: out.clone(),
                seen: HashMap::new(),
                backlog: VecDeque::new(),
            },
        );
        st.by_user.entry(user).or_default().push(id);
        let mut delta = InterestDelta::default();
        match st.watchers.entry(user) {
            std::collections::hash_map::Entry::Occupied(mut w) => w.get_mut().insert(user),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Watchers::One(user));
                delta.add.push(user);
            }
        }
        let d = st
            .devices
            .entry((user, CompactString::from(device)))
            .or_insert((0, 0));
        d.0 += 1;
        d.1 += 1;
        self.metrics.push.ws_connections.set(st.socks.len() as i64);
        drop(st);
        self.notify(delta);
        Registration {
            id,
            out,
            closing: self.closing.clone(),
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
        let key = (user, CompactString::from(device));
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
        let key = (user, CompactString::from(device));
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
    /// this after taking an event while a catch-up waits: [`Outbox::pop`] says so). Half the queue
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
        for viewer in watchers.iter() {
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
                if sock.out.is_killed() {
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
                match sock.out.push_event(f) {
                    Ok(()) => {
                        *seen = version;
                        delivered += 1;
                        if slot == 2 || (slot == 1 && ev.public.is_some()) {
                            filtered += 1;
                        }
                    }
                    Err(Refused::Full) => {
                        sock.out.kill();
                        self.metrics.push.slow_consumers.inc();
                    }
                    Err(Refused::Closed) => {}
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
        match st.watchers.entry(t) {
            std::collections::hash_map::Entry::Occupied(mut w) => w.get_mut().insert(user),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Watchers::One(user));
                delta.add.push(t);
            }
        }
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
        if w.contains(user) && w.remove(user) {
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
        let a1 = hub.register(1, "phone");
        let a2 = hub.register(1, "laptop");
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
        for r in [&a1, &a2] {
            let f = next(r).unwrap();
            assert!(f.as_str().contains("\"version\":2"), "{}", f.as_str());
            assert!(next(r).is_none());
        }
        // A resume records what the client has, then sends only what is newer.
        let n = hub.resume(
            a1.id,
            &[(11, 4)],
            vec![view(11, 4, Status::Busy), view(10, 3, Status::Away)],
        );
        assert_eq!(n, 1);
        let f = next(&a1).unwrap();
        assert!(f.as_str().contains("\"version\":3"), "{}", f.as_str());
        assert!(next(&a1).is_none());
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
        assert!(a.out.is_killed());
        assert_eq!(a.out.ending(), Some((1008, "slow consumer")));
        assert_eq!(hub.metrics.push.slow_consumers.get(), 1);
    }

    #[tokio::test]
    async fn snapshots_only_catch_up_sockets_that_want_them() {
        let hub = Hub::new(Arc::new(Metrics::new()), 8);
        let a = hub.register(1, "d");
        hub.set_subscriptions(1, &[10], false); // loaded at connect
        let snap = |u, v| Event {
            snapshot: true,
            ..ev(u, v)
        };
        hub.deliver(&snap(10, 3)); // a fresh socket waits for its own resume
        assert!(next(&a).is_none());
        // Another device subscribes to 11: this socket wants 11's current state.
        hub.set_subscriptions(1, &[10, 11], true);
        hub.deliver(&snap(11, 2));
        assert!(next(&a).unwrap().as_str().contains("\"version\":2"));
        hub.deliver(&ev(10, 4)); // changes always go through
        assert!(next(&a).unwrap().as_str().contains("\"version\":4"));
    }

    /// What the writer of a socket does: takes a frame, and tops the catch-up up after it.
    fn drain(hub: &Hub, reg: &mut Registration) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((f, catching_up)) = reg.out.pop() {
            if catching_up {
                hub.top_up(reg.id);
            }
            out.push(f.as_str().to_owned());
        }
        out
    }

    /// The next frame queued for the socket.
    fn next(reg: &Registration) -> Option<Frame> {
        reg.out.pop().map(|(f, _)| f)
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
        assert!(a.out.catching_up());
        // A live event while catching up: room for it, and the catch-up skips the older state.
        hub.deliver(&ev(110, 3));
        assert!(!a.out.is_killed(), "cut off by its own resume");
        let frames = drain(&hub, &mut a);
        assert!(!a.out.catching_up());
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

    /// Issue 13: an outbox bounds both queues, writes events first, holds no buffer once
    /// empty, and ends the socket with the strongest reason.
    #[test]
    fn an_outbox_bounds_its_queues_frees_them_and_ranks_its_endings() {
        let f = |s: &'static str| Frame::from_static(s);
        let out = Outbox::new(2, 1);
        assert!(matches!(out.next(), Next::Empty));
        out.push_event(f("e1")).unwrap();
        out.push_reply(f("r1")).unwrap();
        out.push_event(f("e2")).unwrap();
        assert_eq!(out.push_event(f("e3")), Err(Refused::Full));
        assert_eq!(out.push_reply(f("r2")), Err(Refused::Full));
        assert_eq!(out.free(), 0);
        let mut order = Vec::new();
        while let Some((frame, _)) = out.pop() {
            order.push(frame.as_str().to_owned());
        }
        assert_eq!(order, ["e1", "e2", "r1"]);
        {
            let st = out.state.lock();
            assert_eq!((st.events.capacity(), st.replies.capacity()), (0, 0));
        }
        assert_eq!(out.free(), 2);
        out.push_reply(f("r3")).unwrap();
        out.finish();
        assert!(
            matches!(out.next(), Next::Frame(..)),
            "what is queued still goes"
        );
        assert!(matches!(out.next(), Next::Done));
        assert_eq!(out.ending(), None);
        out.end_with(4408, "idle timeout");
        assert_eq!(out.ending(), Some((4408, "idle timeout")));
        out.flooded();
        assert_eq!(out.ending(), Some((1008, "rate limit exceeded")));
        out.kill();
        assert_eq!(out.ending(), Some((1008, "slow consumer")));
        out.close();
        assert_eq!(out.push_event(f("late")), Err(Refused::Closed));
        assert_eq!(out.push_reply(f("late")), Err(Refused::Closed));
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
