//! Owns users: their live state in memory, their deadlines on the timer wheel, and the
//! write-through of every visible change to the store.
//!
//! State is split into lock stripes by user id, so writes for one user are serialized and writes
//! for different users run in parallel. A heartbeat that changes nothing visible takes one stripe
//! lock, updates two integers and returns: no allocation, no store round trip, no timer work.
//!
//! Faults:
//! - Ownership is checked under the user's stripe lock, so a user is never put back into memory
//!   after its partition was released, and every write carries its partition's fencing token: a
//!   store refuses the writes of an owner that a newer one replaced.
//! - A request's change is acknowledged and published only once it is written; a failed or
//!   refused write takes the user out of memory (the store holds the truth, and a retry applies
//!   the change again), and a cancelled request's write is finished by the writer.
//! - Timer changes and write-behind refreshes go to a writer task through a backlog coalesced per
//!   user: bounded by the users in memory, retried with backoff, never dropped, counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::limits::{Rate, RateLimiter, Refused, WindowCap};
use crate::metrics::{
    HeartbeatResult, Metrics, RateLimit, StoreOp, StoreResult, SubscriptionChange, Transition,
};
use crate::ownership::Table;
use crate::presence::{
    BatchEntry, Effect, Millis, Platform, Privacy, Rules, Seen, Settings, Sight, Status,
    StatusView, UserId, UserState, Viewer, Visibility,
};
use crate::privacy::{self, Audience};
use crate::push::{Event, EventSink};
use crate::ring::{partition_of, stripe_of, PARTITIONS};
use crate::service::{Closed, Presence, Session};
use crate::store::{Saved, Store, SubscriptionMode, Write};
use crate::timer::{Clock, Tick, TimerWheel};

const STRIPES: usize = 256;
const WHEEL_SLOTS: usize = 8192;
/// A user with nothing left to time leaves memory this long after its last change.
const EVICT_DELAY: Millis = 5_000;

/// Longest the timer task sleeps when nothing is due (ms): the refresh sweep's cadence then.
const IDLE_WAKE: Millis = 1_000;
/// Furthest ahead a settings expiry may be.
const MAX_EXPIRY: Millis = 366 * 86_400_000;
/// The first and the longest wait of the writer after a failed store call.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most users in one call of the writer.
const WRITER_BATCH: usize = 10_000;

struct Entry {
    state: UserState,
    /// The tick this user is armed for on the wheel; 0 when not armed.
    armed: Tick,
    /// Seconds (since the clock's base) of the last refresh of this user's record's TTL (or its
    /// load). A change of a user who stays live does not extend the TTL (the store's save
    /// sets it only when the user goes live or offline, or the record is new): the refresh does.
    synced: u32,
}

type Stripe = hashbrown::HashMap<UserId, Box<Entry>>;

/// Work for the writer: timer changes to write through, live records to refresh, users to reload
/// after a failed write. Coalesced per user (a newer state replaces an older one), so it is
/// bounded by the users this shard owns and nothing is dropped.
#[derive(Default)]
struct Backlog {
    saves: hashbrown::HashMap<UserId, UserState>,
    refreshes: hashbrown::HashSet<UserId>,
    repairs: hashbrown::HashSet<UserId>,
    /// Users out of memory after a failed write, until they are back: a heartbeat or a read of
    /// one of them reloads it (with a fresh deadline) instead of answering "not online".
    evicted: hashbrown::HashSet<UserId>,
}

impl Backlog {
    fn len(&self) -> usize {
        self.saves.len() + self.refreshes.len() + self.repairs.len()
    }

    /// Keeps `state` for writing unless a newer one is waiting.
    fn save(&mut self, user: UserId, state: UserState) {
        match self.saves.get(&user) {
            Some(s) if s.version >= state.version => {}
            _ => {
                self.saves.insert(user, state);
            }
        }
    }
}

/// The in-process owner of users.
pub struct Shard {
    stripes: Box<[Mutex<Stripe>]>,
    wheel: Mutex<TimerWheel>,
    store: Arc<dyn Store>,
    rules: Rules,
    clock: Clock,
    tick_ms: Millis,
    metrics: Arc<Metrics>,
    /// Seconds between refreshes of a live user's record, when the store needs them.
    refresh_secs: Option<u32>,
    /// Stripes the refresh sweep looks at per tick, and where it is: the next stripe, and the
    /// tick it last ran at (it catches up on the ticks the timer slept through).
    sweep_per_tick: usize,
    sweep_cursor: Mutex<(usize, u64)>,
    /// The tick the timer task sleeps until (0 while it runs): arming an earlier one wakes it.
    sleeping_until: AtomicU64,
    timer_wake: tokio::sync::Notify,
    /// Times the timer task woke (for tests: an idle shard must not tick).
    timer_wakeups: AtomicU64,
    /// Where visible changes go (push), once set.
    sink: std::sync::OnceLock<Arc<dyn EventSink>>,
    /// Which partitions this shard serves.
    table: Arc<Table>,
    /// Per partition: the fencing token this shard writes with (0 before it took it over).
    fences: Box<[AtomicU64]>,
    /// Partitions another shard fenced since this one did ([`Shard::check_fences`]), until the
    /// ownership driver takes them ([`Shard::take_fenced`]); `fence_lost` wakes it.
    /// With the fence this shard held then (an entry whose partition was loaded again since,
    /// under a newer fence of its own, is dropped) and the fence found in the store.
    fenced: Mutex<hashbrown::HashMap<u32, (u64, u64)>>,
    fence_lost: tokio::sync::Notify,
    backlog: Mutex<Backlog>,
    wake: tokio::sync::Notify,
    /// Status changes per user (`PRESENCE_STATUS_RATE`).
    status_rate: RateLimiter,
    /// The devices of users let go lately, for their next owner.
    parting: parting::Parting,
    /// Records of users never online created within their retention (`PRESENCE_MAX_OFFLINE_RECORDS`).
    offline_records: WindowCap,
    /// Contacts of users whose visibility is `CONTACTS`, for deciding who sees them.
    contacts: Arc<ContactCache>,
}

/// Most user ids (over all lists) of contacts a shard keeps at once: 32 MB.
const CONTACTS_CACHED: usize = 4_000_000;

/// The contacts (subscription lists) of users whose visibility is `CONTACTS`, as last read from
/// the store or written through this shard: bounded (arbitrary entries go when full), and
/// dropped for users whose partition goes.
struct ContactCache {
    store: Arc<dyn Store>,
    map: Mutex<Contacts>,
}

#[derive(Default)]
struct Contacts {
    lists: hashbrown::HashMap<UserId, Arc<[UserId]>>,
    /// User ids over all lists.
    ids: usize,
}

impl ContactCache {
    fn cached(&self, user: UserId) -> Option<Arc<[UserId]>> {
        self.map.lock().lists.get(&user).cloned()
    }

    /// Whether `user` subscribes to `viewer`, if its contacts are cached.
    fn holds(&self, user: UserId, viewer: UserId) -> Option<bool> {
        let c = self.map.lock();
        c.lists
            .get(&user)
            .map(|list| list.binary_search(&viewer).is_ok())
    }

    fn put(&self, user: UserId, list: &[UserId]) {
        let mut c = self.map.lock();
        self.drop_locked(&mut c, user);
        while c.ids + list.len() > CONTACTS_CACHED && !c.lists.is_empty() {
            for (_, gone) in take_some(&mut c.lists, 64) {
                c.ids -= gone.len();
            }
        }
        c.ids += list.len();
        c.lists.insert(user, list.into());
    }

    fn remove(&self, user: UserId) {
        self.drop_locked(&mut self.map.lock(), user);
    }

    fn drop_locked(&self, c: &mut Contacts, user: UserId) {
        if let Some(old) = c.lists.remove(&user) {
            c.ids -= old.len();
        }
    }

    /// The user's contacts, sorted: cached, or read from the store.
    async fn get(&self, user: UserId) -> Result<Arc<[UserId]>, Error> {
        if let Some(c) = self.cached(user) {
            return Ok(c);
        }
        let list = self.store.subscriptions(user).await?;
        self.put(user, &list);
        Ok(list.into())
    }

    fn forget(&self, partitions: &[bool]) {
        let mut c = self.map.lock();
        let Contacts { lists, ids } = &mut *c;
        lists.retain(|u, l| {
            let keep = !partitions[partition_of(*u) as usize];
            if !keep {
                *ids -= l.len();
            }
            keep
        });
    }
}

/// The event with its audience's contacts filled in.
fn with_contacts(mut ev: Event, contacts: &[UserId]) -> Event {
    if let Some(a) = ev.audience.as_mut() {
        Arc::make_mut(a).contacts = contacts.to_vec();
    }
    ev
}

/// Whether `contacts` (sorted) holds `viewer`.
fn holds(contacts: Option<&[UserId]>, viewer: UserId) -> bool {
    contacts.is_some_and(|c| c.binary_search(&viewer).is_ok())
}

impl Shard {
    pub fn new(
        store: Arc<dyn Store>,
        rules: Rules,
        tick: Duration,
        metrics: Arc<Metrics>,
        table: Arc<Table>,
    ) -> Shard {
        for from in Status::ALL {
            for to in Status::ALL {
                if from != to {
                    metrics.presence.transitions.get(Transition {
                        from: from.as_str(),
                        to: to.as_str(),
                    });
                }
            }
        }
        let tick_ms = (tick.as_millis() as Millis).max(1);
        let refresh = store.refresh_interval();
        let refresh_secs = refresh.map(|r| r.as_secs().clamp(1, u32::MAX as u64) as u32);
        // A full sweep of every stripe takes at most half the refresh interval.
        let sweep_per_tick = refresh.map_or(0, |r| {
            let ticks_per_pass = ((r.as_millis() as i64 / 2) / tick_ms).max(1) as usize;
            STRIPES.div_ceil(ticks_per_pass).max(1)
        });
        Shard {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            wheel: Mutex::new(TimerWheel::new(WHEEL_SLOTS)),
            contacts: Arc::new(ContactCache {
                store: store.clone(),
                map: Mutex::default(),
            }),
            store,
            rules,
            clock: Clock::new(),
            tick_ms,
            metrics,
            refresh_secs,
            sweep_per_tick,
            sweep_cursor: Mutex::new((0, 0)),
            sleeping_until: AtomicU64::new(0),
            timer_wake: tokio::sync::Notify::new(),
            timer_wakeups: AtomicU64::new(0),
            sink: std::sync::OnceLock::new(),
            table,
            fences: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
            fenced: Mutex::new(hashbrown::HashMap::new()),
            fence_lost: tokio::sync::Notify::new(),
            backlog: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            status_rate: RateLimiter::new(Rate::OFF, 1, 1),
            parting: parting::Parting::default(),
            offline_records: WindowCap::new(0, Duration::from_secs(1)),
        }
    }

    /// Limits the status changes of each user to `rate` (`PRESENCE_STATUS_RATE`), tracking at
    /// most `max_users` at once.
    pub fn with_status_rate(mut self, rate: Rate, max_users: usize) -> Shard {
        self.status_rate = RateLimiter::new(rate, 1, max_users);
        self
    }

    /// Caps the records of users never online this shard creates within `retention` at `max`.
    pub fn with_offline_records(mut self, max: u64, retention: Duration) -> Shard {
        self.offline_records = WindowCap::new(max, retention);
        self
    }

    /// A change would create the record of a user never online (nothing stored, no device):
    /// admitted under the cap, or refused with 503 (counted).
    fn new_offline_record(&self, st: &UserState, now: Millis) -> Result<(), Error> {
        if st.version != 0 || !st.devices.is_empty() || self.offline_records.admit(now) {
            return Ok(());
        }
        self.metrics
            .presence
            .rate_limited
            .get(RateLimit::OfflineRecords)
            .inc();
        Err(Error::Overloaded)
    }

    /// Takes a token of `user`'s status-change rate, or refuses with 429 (counted).
    fn status_change(&self, user: UserId) -> Result<(), Error> {
        let refused = match self.status_rate.check(user, std::time::Instant::now()) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        let (limit, wait) = match refused {
            Refused::Rate(wait) => (RateLimit::Status, wait),
            Refused::Full => (RateLimit::StatusTableFull, Duration::from_secs(1)),
        };
        self.metrics.presence.rate_limited.get(limit).inc();
        Err(Error::RateLimited(wait.as_secs_f64().ceil().max(1.0) as u64))
    }

    /// Which partitions this shard serves.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Sends every visible change to `sink` from now on.
    pub fn set_sink(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    /// Publishes a visible change, if anyone listens. A user whose visibility is `CONTACTS` and
    /// whose contacts are not cached is published once they are read (the gateways order events
    /// by version, so a late one never undoes a newer one).
    fn publish(&self, user: UserId, state: &UserState, now: Millis) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        if !sink.wants(user) {
            return;
        }
        let ev = self.event_of(user, state, now);
        let needs_contacts = ev
            .audience
            .as_ref()
            .is_some_and(|a| a.privacy.visibility == Visibility::Contacts);
        if !needs_contacts {
            sink.publish(ev);
            return;
        }
        if let Some(c) = self.contacts.cached(user) {
            sink.publish(with_contacts(ev, &c));
            return;
        }
        let (sink, contacts, metrics) = (sink.clone(), self.contacts.clone(), self.metrics.clone());
        tokio::spawn(async move {
            match contacts.get(user).await {
                Ok(c) => sink.publish(with_contacts(ev, &c)),
                Err(e) => {
                    // Not sent rather than sent to the wrong people; the next change (or a
                    // read) shows the state.
                    metrics.push.unpublished.inc();
                    tracing::warn!(user, error = %e, "event not sent: contacts unreadable");
                }
            }
        });
    }

    /// The event of `user`'s state at `now` (its contacts not filled in).
    fn event_of(&self, user: UserId, state: &UserState, now: Millis) -> Event {
        let audience = state.privacy.as_deref().map(|p| {
            Arc::new(Audience {
                privacy: p.clone(),
                contacts: Vec::new(),
                version: state.privacy_version,
            })
        });
        Event {
            public: state.public_view(user, now, &self.rules),
            audience,
            ..Event::new(state.view(user, now, &self.rules), now)
        }
    }

    /// The current state of each of `users` as snapshot events (the catch-up of a gateway that
    /// declares interest), each with its audience.
    pub async fn snapshots(&self, users: &[UserId]) -> Result<Vec<Event>, Error> {
        let states = self.gather(users, |st, _, _, _| st.clone()).await?;
        let now = self.clock.now();
        let mut out = Vec::with_capacity(states.len());
        for (&user, st) in users.iter().zip(&states) {
            let mut ev = self.event_of(user, st, now);
            ev.snapshot = true;
            if st
                .privacy
                .as_deref()
                .is_some_and(|p| p.visibility == Visibility::Contacts)
            {
                let c = self.contacts.get(user).await?;
                ev = with_contacts(ev, &c);
            }
            out.push(ev);
        }
        Ok(out)
    }

    /// What `viewer` sees of `user`, whose state is `st`, reading its contacts if the rules
    /// need them.
    async fn sight_of(&self, user: UserId, st: &UserState, viewer: Viewer) -> Result<Sight, Error> {
        let needs = match (viewer, st.privacy.as_deref()) {
            (Viewer::User(v), Some(p)) => v != user && p.needs_contacts(v),
            _ => false,
        };
        let contacts = if needs {
            Some(self.contacts.get(user).await?)
        } else {
            None
        };
        Ok(privacy::sight(st.privacy.as_deref(), user, viewer, |v| {
            holds(contacts.as_deref(), v)
        }))
    }

    /// `show` of each distinct user as `viewer` sees it, in request order.
    async fn gather_as<T>(
        &self,
        users: &[UserId],
        viewer: Viewer,
        show: impl Fn(&UserState, UserId, Millis, &Rules, Sight) -> T,
    ) -> Result<Vec<T>, Error> {
        if viewer == Viewer::Truth {
            return self
                .gather(users, |st, u, now, r| show(st, u, now, r, Sight::Truth))
                .await;
        }
        // Decided at once for all but users under `CONTACTS` whose contacts are not cached:
        // those are decided once their contacts are read.
        enum Shown<T> {
            Done(T),
            Later(UserId, UserState),
        }
        let shown = self
            .gather(users, |st, u, now, r| {
                let mut uncached = false;
                let sight = privacy::sight(st.privacy.as_deref(), u, viewer, |v| {
                    self.contacts.holds(u, v).unwrap_or_else(|| {
                        uncached = true;
                        false
                    })
                });
                if uncached {
                    Shown::Later(u, st.clone())
                } else {
                    Shown::Done(show(st, u, now, r, sight))
                }
            })
            .await?;
        let now = self.clock.now();
        let mut out = Vec::with_capacity(shown.len());
        for s in shown {
            out.push(match s {
                Shown::Done(t) => t,
                Shown::Later(user, st) => {
                    let sight = self.sight_of(user, &st, viewer).await?;
                    show(&st, user, now, &self.rules, sight)
                }
            });
        }
        Ok(out)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    fn secs(&self, now: Millis) -> u32 {
        ((now - self.clock.base()).max(0) / 1000) as u32
    }

    fn stripe(&self, user: UserId) -> &Mutex<Stripe> {
        &self.stripes[stripe_of(user, STRIPES)]
    }

    /// The first tick at or after `at`.
    fn tick_at(&self, at: Millis) -> u64 {
        let rel = (at - self.clock.base()).max(0);
        ((rel + self.tick_ms - 1) / self.tick_ms) as u64
    }

    /// Arms the user's next deadline if it is earlier than the one already armed.
    fn arm(&self, user: UserId, entry: &mut Entry, now: Millis) {
        let deadline = entry
            .state
            .next_deadline(&self.rules)
            .unwrap_or(now + EVICT_DELAY);
        let tick = self.tick_at(deadline);
        if entry.armed == 0 || tick < entry.armed {
            entry.armed = self.wheel_insert(user, tick);
        }
    }

    /// Arms `user` for `tick` on the wheel, and wakes the timer task if it sleeps past it. (The
    /// task sets `sleeping_until` under the wheel's lock, so an entry is either seen by its scan
    /// or compared here against the tick it then sleeps until.)
    fn wheel_insert(&self, user: UserId, tick: u64) -> Tick {
        let mut wheel = self.wheel.lock();
        let t = wheel.insert(user, tick);
        if t < self.sleeping_until.load(Ordering::Relaxed) {
            self.timer_wake.notify_one();
        }
        t
    }

    fn account(&self, e: &Effect) {
        let m = &self.metrics;
        if e.devices_delta != 0 {
            m.presence.online_devices.add(e.devices_delta as i64);
        }
        let users = e.users_delta();
        if users != 0 {
            m.presence.online_users.add(users as i64);
        }
        if e.timeouts > 0 {
            m.presence.timeouts.inc_by(e.timeouts as u64);
        }
        if let Some(t) = e.transition {
            m.presence
                .transitions
                .get(Transition {
                    from: t.from.as_str(),
                    to: t.to.as_str(),
                })
                .inc();
        }
    }

    /// Runs `op` on the user's live state: applies what is due first, then the operation,
    /// accounts the effect, re-arms the timer, and writes a visible change through to the store
    /// before it returns and publishes it. A user not in memory is loaded from the store when
    /// `load` is set; otherwise `op` runs on `None`. Ownership is checked under the stripe lock
    /// every time round, so after every await.
    async fn mutate<R>(
        &self,
        user: UserId,
        load: bool,
        op: impl Fn(Option<&mut UserState>, Millis) -> Result<(R, Effect), Error>,
    ) -> Result<R, Error> {
        let mut loaded = None;
        loop {
            let now = self.clock.now();
            let done = {
                let mut stripe = self.stripe(user).lock();
                self.table.check(user)?;
                if let Some(state) = loaded.take() {
                    if !stripe.contains_key(&user) {
                        let synced = self.secs(now);
                        stripe.insert(
                            user,
                            Box::new(Entry {
                                state,
                                armed: 0,
                                synced,
                            }),
                        );
                        self.metrics.presence.cached_users.inc();
                    }
                    self.backlog.lock().evicted.remove(&user);
                }
                match stripe.get_mut(&user) {
                    Some(entry) => Some(self.apply(user, entry, now, &op)),
                    None if !load => Some((op(None, now).map(|(r, _)| r), None)),
                    None => None,
                }
            };
            let Some((result, snapshot)) = done else {
                let mut got = self.load(&[user]).await?;
                // Heartbeats are not written through, so a stored device's `last_seen` is that
                // of the last durable change: a user back from the store (after a failed write
                // took it out of memory) gets a fresh deadline, as in a recovery, rather than
                // being timed out at once while its heartbeats keep coming.
                let mut state = got.pop().flatten().unwrap_or_default();
                state.reloaded(self.clock.now());
                loaded = Some(state);
                continue;
            };
            if let Some(state) = snapshot {
                if self.store.write_through() {
                    self.persist(user, state, now).await?;
                } else {
                    self.publish(user, &state, now);
                }
            }
            return result;
        }
    }

    /// Writes a request's change through, then publishes it. If the request is cancelled
    /// meanwhile, the writer finishes the job. A write that fails or that the store refuses takes
    /// the user out of memory: the store holds the truth, and the next request (or the writer's
    /// repair) reloads it, so a retried request applies its change again.
    async fn persist(&self, user: UserId, state: UserState, now: Millis) -> Result<(), Error> {
        let version = state.version;
        let unfinished = Unfinished {
            shard: self,
            write: Write {
                user,
                state,
                fence: self.fence_of(user),
            },
            done: false,
        };
        let outcome = self.save(std::slice::from_ref(&unfinished.write)).await;
        let write = unfinished.finish();
        match outcome.map(|v| v.first().copied().unwrap_or(Saved::Stale)) {
            Ok(Saved::Written) => {
                self.publish(user, &write.state, now);
                Ok(())
            }
            // Memory moved past this version meanwhile: a later write carries this change.
            Ok(Saved::Stale) if self.version_in_memory(user).is_some_and(|v| v > version) => Ok(()),
            Ok(refused) => {
                self.evict(user);
                Err(self.refusal(refused))
            }
            Err(e) => {
                self.evict(user);
                Err(e)
            }
        }
    }

    fn refusal(&self, refused: Saved) -> Error {
        let reason = if refused == Saved::Fenced {
            "fenced"
        } else {
            "stale"
        };
        self.metrics
            .store
            .refused_writes
            .get(StoreOp { op: reason })
            .inc();
        match refused {
            Saved::Fenced => Error::WrongOwner {
                epoch: self.table.epoch(),
            },
            _ => Error::ShardUnavailable("concurrent change, retry".into()),
        }
    }

    fn fence_of(&self, user: UserId) -> u64 {
        self.fence_held(partition_of(user))
    }

    fn version_in_memory(&self, user: UserId) -> Option<u64> {
        self.stripe(user).lock().get(&user).map(|e| e.state.version)
    }

    /// Takes a user out of memory after a failed or refused write, and asks the writer to reload
    /// it (so its timers run again) once the store answers.
    fn evict(&self, user: UserId) {
        if let Some(entry) = self.stripe(user).lock().remove(&user) {
            self.forget_entry(&entry);
            self.metrics.presence.cached_users.dec();
        }
        {
            let mut backlog = self.backlog.lock();
            backlog.repairs.insert(user);
            backlog.evicted.insert(user);
        }
        self.wake.notify_one();
    }

    /// Takes a user's devices out of the gauges as it leaves memory.
    fn forget_entry(&self, entry: &Entry) {
        let online = entry.state.online_devices().count() as i64;
        self.metrics.presence.online_devices.sub(online);
        if entry.state.status != Status::Offline {
            self.metrics.presence.online_users.dec();
        }
    }

    fn apply<R>(
        &self,
        user: UserId,
        entry: &mut Entry,
        now: Millis,
        op: &impl Fn(Option<&mut UserState>, Millis) -> Result<(R, Effect), Error>,
    ) -> (Result<R, Error>, Option<UserState>) {
        let due = entry
            .state
            .next_deadline(&self.rules)
            .is_some_and(|t| t <= now);
        let pre = if due {
            entry.state.advance(now, &self.rules)
        } else {
            Effect::default()
        };
        let (result, effect) = match op(Some(&mut entry.state), now) {
            Ok((r, e)) => (Ok(r), pre.then(e)),
            Err(e) => (Err(e), pre),
        };
        self.account(&effect);
        self.arm(user, entry, now);
        (result, effect.visible.then(|| entry.state.clone()))
    }

    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        let t = std::time::Instant::now();
        let r = self.store.load(users).await;
        self.observe("load", t, r.is_ok());
        r
    }

    /// Loads users for a recovery: a record that cannot be read (corrupt, or written by a newer
    /// version) is skipped and counted, never a reason to fail the whole partition.
    async fn load_readable(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        match self.load(users).await {
            Err(Error::Internal(_)) => {}
            other => return other,
        }
        let mut out = Vec::with_capacity(users.len());
        for &user in users {
            match self.load(&[user]).await {
                Ok(mut v) => out.push(v.pop().flatten()),
                Err(Error::Internal(e)) => {
                    self.metrics.store.unreadable_records.inc();
                    tracing::warn!(user, error = %e, "skipping an unreadable record");
                    out.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error> {
        let t = std::time::Instant::now();
        let r = self.store.save(batch).await;
        self.observe("save", t, r.is_ok());
        r
    }

    fn observe(&self, op: &str, started: std::time::Instant, ok: bool) {
        let m = &self.metrics;
        m.store
            .duration
            .get(StoreOp { op })
            .observe(started.elapsed().as_secs_f64());
        m.store
            .ops
            .get(StoreResult {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// The last tick that has begun at `at` (the first tick at or after it is [`Shard::tick_at`]).
    fn tick_of(&self, at: Millis) -> u64 {
        ((at - self.clock.base()).max(0) / self.tick_ms) as u64
    }

    /// When `tick` begins: the inverse of [`Shard::tick_of`].
    fn tick_start(&self, tick: u64) -> Millis {
        self.clock.base() + tick as Millis * self.tick_ms
    }

    /// The last tick that has begun.
    fn tick_now(&self) -> u64 {
        self.tick_of(self.clock.now())
    }

    /// Processes every timer due by now. Changes to write go to the backlog.
    fn fire(&self, fired: &mut Vec<(u64, Tick)>) {
        let now = self.clock.now();
        let to = self.tick_of(now);
        self.wheel.lock().advance(to, fired);
        if let Some(&(_, first)) = fired.first() {
            let scheduled = self.tick_start(first);
            self.metrics
                .presence
                .timer_lag
                .observe((now - scheduled).max(0) as f64 / 1000.0);
        }
        let mut saves = Vec::new();
        for (user, tick) in fired.drain(..) {
            let mut stripe = self.stripe(user).lock();
            let Some(entry) = stripe.get_mut(&user) else {
                continue;
            };
            if entry.armed != tick {
                continue; // stale: re-armed since
            }
            entry.armed = 0;
            if self.table.check(user).is_err() {
                // Not served now (its partition is loading or being let go): look again in a
                // second, change nothing.
                entry.armed = self.wheel_insert(user, self.tick_at(now + 1000));
                continue;
            }
            self.metrics.presence.timer_fired.inc();
            if entry.state.is_dormant() {
                if let Some(e) = stripe.remove(&user) {
                    if !self.store.write_through() {
                        saves.push((user, e.state));
                    }
                }
                self.metrics.presence.cached_users.dec();
                continue;
            }
            let due = entry
                .state
                .next_deadline(&self.rules)
                .is_some_and(|t| t <= now);
            if due {
                let effect = entry.state.advance(now, &self.rules);
                self.account(&effect);
                if effect.visible {
                    if self.store.write_through() {
                        saves.push((user, entry.state.clone()));
                    } else {
                        self.publish(user, &entry.state, now);
                    }
                }
            }
            self.arm(user, entry, now);
        }
        if !saves.is_empty() {
            let mut backlog = self.backlog.lock();
            for (user, state) in saves {
                backlog.save(user, state);
            }
            drop(backlog);
            self.wake.notify_one();
        }
    }

    /// Write-behind: collects live users whose record is due for a refresh, a few stripes per
    /// tick, so that a full pass takes at most half the refresh interval. A user counts as
    /// refreshed only once the writer's refresh succeeded.
    fn sweep(&self) {
        let Some(every) = self.refresh_secs else {
            return;
        };
        let now = self.secs(self.clock.now());
        let tick = self.tick_now();
        let (start, stripes) = {
            let mut cursor = self.sweep_cursor.lock();
            let (start, last) = *cursor;
            // The stripes of every tick since the last sweep (the timer sleeps through idle ticks).
            let ticks = tick.saturating_sub(last) as usize;
            let stripes = self.sweep_per_tick.saturating_mul(ticks).min(STRIPES);
            *cursor = ((start + stripes) % STRIPES, tick);
            (start, stripes)
        };
        let mut due = Vec::new();
        for i in 0..stripes {
            let stripe = self.stripes[(start + i) % STRIPES].lock();
            for (user, entry) in stripe.iter() {
                if !entry.state.devices.is_empty() && now.saturating_sub(entry.synced) >= every {
                    due.push(*user);
                }
            }
        }
        if !due.is_empty() {
            self.backlog.lock().refreshes.extend(due);
            self.wake.notify_one();
        }
    }

    /// Lets go of every user in the marked partitions (`owned[p]` true): their state leaves
    /// memory (it is in the store already), their timers stop, and their records' expiry is
    /// pushed back so the next owner finds them. A store private to this process forgets the
    /// partitions: once another shard owns them, what it holds is no longer true. Returns how
    /// many users were released.
    pub async fn release(&self, partitions: &[bool]) -> usize {
        let mut live = Vec::new();
        let mut released = 0usize;
        let now = self.clock.now();
        self.parting.forget(&[], now);
        self.contacts.forget(partitions);
        for stripe in self.stripes.iter() {
            let mut stripe = stripe.lock();
            stripe.retain(|user, entry| {
                if !partitions[partition_of(*user) as usize] {
                    return true;
                }
                self.forget_entry(entry);
                if !entry.state.devices.is_empty() {
                    self.parting.note(*user, &entry.state, now);
                    live.push(*user);
                }
                released += 1;
                false
            });
        }
        self.metrics.presence.cached_users.sub(released as i64);
        let leaving: Vec<Write> = {
            let mut backlog = self.backlog.lock();
            let mine = |u: &UserId| !partitions[partition_of(*u) as usize];
            backlog.refreshes.retain(mine);
            backlog.repairs.retain(mine);
            backlog.evicted.retain(mine);
            let (stay, go) = std::mem::take(&mut backlog.saves)
                .into_iter()
                .partition(|(u, _)| mine(u));
            backlog.saves = stay;
            go.into_iter()
                .map(|(user, state)| Write {
                    user,
                    fence: self.fence_of(user),
                    state,
                })
                .collect()
        };
        self.flush_leaving(leaving).await;
        // The fencing tokens stay: a write still in flight for a released user carries the old
        // token, which the store refuses once the new owner fenced the partition.
        if !self.store.write_through() {
            let gone: Vec<u32> = (0..PARTITIONS)
                .filter(|p| partitions[*p as usize])
                .collect();
            self.store.forget(&gone).await;
        }
        for chunk in live.chunks(10_000) {
            if let Err(e) = self.store.refresh(chunk).await {
                tracing::warn!(error = %e, users = chunk.len(), "refresh on release failed");
            }
        }
        released
    }

    /// Waits until [`Shard::check_fences`] found partitions another shard fenced.
    pub async fn fence_lost(&self) {
        self.fence_lost.notified().await
    }

    /// Compares the store's fences of `partitions` with this shard's: each one another shard has
    /// fenced since goes to the ownership driver ([`Shard::fence_lost`]). Answers how many; a
    /// failed read is counted (`presence_store_retries_total{op="fences"}`) for the caller to
    /// try again.
    pub async fn check_fences(&self, partitions: &[u32]) -> Result<usize, Error> {
        let stored = self.stored_fences(partitions).await?;
        let mut fenced = self.fenced.lock();
        let mut found = 0;
        for (&p, theirs) in partitions.iter().zip(stored) {
            let mine = self.fence_held(p);
            // Another shard's fence is a later increment: higher. A lower one is this shard's own
            // newer fence, taken while the read was in flight.
            if mine != 0 && theirs > mine {
                fenced.insert(p, (mine, theirs));
                found += 1;
            }
        }
        drop(fenced);
        if found > 0 {
            self.fence_lost.notify_one();
        }
        Ok(found)
    }

    /// The partitions found fenced by another shard since the last call, each with the fence
    /// found: it took them over while this one still held them (this one missed a ring
    /// change), so what this one holds of them is stale.
    pub fn take_fenced(&self) -> Vec<(u32, u64)> {
        self.fenced
            .lock()
            .drain()
            .filter(|&(p, (mine, _))| self.fence_held(p) == mine)
            .map(|(p, (_, found))| (p, found))
            .collect()
    }

    /// The store's fences of `partitions` now; a failed read is counted
    /// (`presence_store_retries_total{op="fences"}`) for the caller to try again.
    pub async fn stored_fences(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        self.store.fences(partitions).await.inspect_err(|e| {
            self.retry("fences", 1, e);
        })
    }

    /// The fence this shard last held `partition` under (0: never), whether it still does or
    /// let it go since: a handover answer carries it.
    pub fn fence_held(&self, partition: u32) -> u64 {
        self.fences
            .get(partition as usize)
            .map_or(0, |f| f.load(Ordering::Acquire))
    }

    /// What this shard last saw of the online devices of `partitions`, which it let go lately:
    /// the answer to the next owner's handover.
    pub fn parted(&self, partitions: &[u32]) -> Vec<Seen> {
        self.parting.seen(partitions, self.clock.now())
    }

    /// One last try at the timer writes of users whose partition goes: made under this shard's
    /// token (refused if the new owner fenced the partition already). What cannot be written is
    /// counted: the new owner re-derives it from the stored state (its timers time the users
    /// out again).
    async fn flush_leaving(&self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        let written = match self.save(&writes).await {
            Ok(outcomes) => {
                let now = self.clock.now();
                let mut n = 0;
                for (w, o) in writes.iter().zip(outcomes) {
                    if o == Saved::Written {
                        self.publish(w.user, &w.state, now);
                        n += 1;
                    }
                }
                n
            }
            Err(_) => 0,
        };
        let lost = writes.len() - written;
        if lost > 0 {
            self.metrics.store.abandoned_writes.inc_by(lost as u64);
            tracing::warn!(
                users = lost,
                "timer writes not made before a handoff; the new owner re-derives them"
            );
        }
    }

    /// Takes `partitions` over and reloads their live users from the store, arming their
    /// timers: what a restarted node (or a new owner) does before it serves. The partitions are
    /// fenced first, so a previous owner's late writes are refused from then on. Returns how
    /// many users were reloaded.
    pub async fn recover(&self, partitions: &[u32]) -> Result<usize, Error> {
        self.recover_handed(partitions, &[]).await
    }

    /// As [`Shard::recover`], with what the previous owner last saw of the partitions' devices
    /// (from a handover): those devices keep its times rather than being seen at reload.
    pub async fn recover_handed(&self, partitions: &[u32], seen: &[Seen]) -> Result<usize, Error> {
        self.parting.forget(partitions, self.clock.now());
        let mut handed: hashbrown::HashMap<UserId, Vec<Seen>> = hashbrown::HashMap::new();
        for s in seen {
            handed.entry(s.user).or_default().push(s.clone());
        }
        let fences = self.store.fence(partitions).await?;
        for (&p, f) in partitions.iter().zip(fences) {
            self.fences[p as usize].store(f, Ordering::Release);
        }
        let users = self.store.live_users(partitions).await?;
        let mut recovered = 0;
        for chunk in users.chunks(1000) {
            let states = self.load_readable(chunk).await?;
            recovered += self.install(chunk, states, &handed);
        }
        self.metrics
            .presence
            .recovered_users
            .inc_by(recovered as u64);
        Ok(recovered)
    }

    /// Puts reloaded users with devices into memory (unless there already) and arms their
    /// timers. Returns how many it put.
    fn install(
        &self,
        users: &[UserId],
        states: Vec<Option<UserState>>,
        handed: &hashbrown::HashMap<UserId, Vec<Seen>>,
    ) -> usize {
        let now = self.clock.now();
        let mut installed = 0;
        for (&user, state) in users.iter().zip(states) {
            let Some(mut state) = state.filter(|s| !s.devices.is_empty()) else {
                continue;
            };
            state.handed_over(now, handed.get(&user).map_or(&[], |v| v.as_slice()));
            let mut stripe = self.stripe(user).lock();
            self.backlog.lock().evicted.remove(&user);
            if stripe.contains_key(&user) {
                continue;
            }
            let online = state.online_devices().count() as i64;
            self.metrics.presence.online_devices.add(online);
            if state.status != Status::Offline {
                self.metrics.presence.online_users.inc();
            }
            let synced = self.secs(now);
            let entry = stripe.entry(user).or_insert(Box::new(Entry {
                state,
                armed: 0,
                synced,
            }));
            self.arm(user, entry, now);
            self.metrics.presence.cached_users.inc();
            installed += 1;
        }
        installed
    }

    /// Drives the timer wheel and the writer until `cancel` fires. One task for every deadline
    /// of the node; the timer never waits for the store.
    pub async fn run_timers(self: Arc<Self>, cancel: CancellationToken) {
        let timers = async {
            let mut fired = Vec::new();
            // At least once a second, for the refresh sweep; otherwise only at a tick that has
            // something to fire (an idle shard does not wake every tick).
            let most_ticks = (IDLE_WAKE / self.tick_ms).max(1) as u64;
            loop {
                self.timer_wakeups.fetch_add(1, Ordering::Relaxed);
                self.fire(&mut fired);
                self.sweep();
                let until = {
                    let wheel = self.wheel.lock();
                    let cap = self.tick_now() + most_ticks;
                    let t = wheel.next_occupied().map_or(cap, |t| t.min(cap));
                    self.sleeping_until.store(t, Ordering::Relaxed);
                    t
                };
                let at = self.clock.instant_at(self.tick_start(until));
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep_until(at) => {}
                    _ = self.timer_wake.notified() => {}
                }
                self.sleeping_until.store(0, Ordering::Relaxed);
            }
        };
        tokio::join!(timers, self.run_writer(&cancel));
    }

    /// Writes the backlog until `cancel`, then once more.
    async fn run_writer(&self, cancel: &CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(self.tick_ms as u64 * 10)) => {}
            }
            if self.write_backlog().await {
                backoff = FIRST_BACKOFF;
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if !self.write_backlog().await {
            let left = self.backlog.lock().len();
            tracing::error!(
                left,
                "the store failed the last writes before shutdown; the next owner reloads"
            );
        }
    }

    /// One round of the writer: timer changes, refreshes, repairs, at most a batch of each.
    /// Failed work goes back to the backlog (unless superseded). False when something failed.
    async fn write_backlog(&self) -> bool {
        let (saves, refreshes, repairs) = {
            let mut b = self.backlog.lock();
            let saves: Vec<(UserId, UserState)> = take_some(&mut b.saves, WRITER_BATCH);
            let refreshes: Vec<UserId> = take_some_set(&mut b.refreshes, WRITER_BATCH);
            let repairs: Vec<UserId> = take_some_set(&mut b.repairs, WRITER_BATCH);
            (saves, refreshes, repairs)
        };
        let mut ok = true;
        if !saves.is_empty() {
            ok &= self.write_saves(saves).await;
        }
        if !refreshes.is_empty() {
            match self.store.refresh(&refreshes).await {
                Ok(()) => {
                    let now = self.secs(self.clock.now());
                    for u in refreshes {
                        if let Some(e) = self.stripe(u).lock().get_mut(&u) {
                            e.synced = now;
                        }
                    }
                }
                Err(e) => {
                    ok = false;
                    self.retry("refresh", refreshes.len(), &e);
                    self.backlog.lock().refreshes.extend(refreshes);
                }
            }
        }
        if !repairs.is_empty() {
            let owned: Vec<UserId> = repairs
                .into_iter()
                .filter(|u| self.table.check(*u).is_ok())
                .collect();
            match self.load_readable(&owned).await {
                Ok(states) => {
                    self.install(&owned, states, &hashbrown::HashMap::new());
                }
                Err(e) => {
                    ok = false;
                    self.retry("repair", owned.len(), &e);
                    self.backlog.lock().repairs.extend(owned);
                }
            }
        }
        let left = self.backlog.lock().len();
        self.metrics.store.backlog.set(left as i64);
        if left > 0 {
            self.wake.notify_one();
        }
        ok
    }

    async fn write_saves(&self, saves: Vec<(UserId, UserState)>) -> bool {
        let writes: Vec<Write> = saves
            .into_iter()
            .filter(|(u, _)| self.table.check(*u).is_ok())
            .map(|(user, state)| Write {
                user,
                fence: self.fence_of(user),
                state,
            })
            .collect();
        if writes.is_empty() {
            return true;
        }
        match self.save(&writes).await {
            Ok(outcomes) => {
                let now = self.clock.now();
                for (w, outcome) in writes.iter().zip(outcomes) {
                    match outcome {
                        Saved::Written => self.publish(w.user, &w.state, now),
                        Saved::Stale
                            if self
                                .version_in_memory(w.user)
                                .is_some_and(|v| v > w.state.version) => {}
                        refused => {
                            self.refusal(refused);
                            self.evict(w.user);
                        }
                    }
                }
                true
            }
            Err(e) => {
                self.retry("save", writes.len(), &e);
                let mut b = self.backlog.lock();
                for w in writes {
                    b.save(w.user, w.state);
                }
                false
            }
        }
    }

    fn retry(&self, op: &'static str, n: usize, e: &Error) {
        self.metrics
            .store
            .retries
            .get(StoreOp { op })
            .inc_by(n as u64);
        tracing::warn!(op, users = n, error = %e, "background store work failed, retrying with backoff");
    }

    /// `show` of each distinct user, in request order: from memory, else from the store (one
    /// load for all the misses).
    async fn gather<T>(
        &self,
        users: &[UserId],
        show: impl Fn(&UserState, UserId, Millis, &Rules) -> T,
    ) -> Result<Vec<T>, Error> {
        let mut seen = hashbrown::HashSet::with_capacity(users.len());
        let users: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let now = self.clock.now();
        let mut out: Vec<Option<T>> = Vec::with_capacity(users.len());
        let mut misses = Vec::new();
        for (i, &user) in users.iter().enumerate() {
            let hit = self
                .stripe(user)
                .lock()
                .get(&user)
                .map(|e| show(&e.state, user, now, &self.rules));
            if hit.is_none() {
                misses.push(i);
            }
            out.push(hit);
        }
        if !misses.is_empty() {
            let ids: Vec<UserId> = misses.iter().map(|&i| users[i]).collect();
            let evicted = self.evicted_of(&ids);
            for ((&i, st), was_evicted) in misses.iter().zip(self.load(&ids).await?).zip(evicted) {
                let st = self.as_read(users[i], st, was_evicted, now);
                out[i] = Some(show(&st, users[i], now, &self.rules));
            }
        }
        Ok(out
            .into_iter()
            .map(|e| e.expect("every slot filled"))
            .collect())
    }

    /// The state of one user, from memory or else from the store.
    async fn state_of(&self, user: UserId) -> Result<UserState, Error> {
        if let Some(e) = self.stripe(user).lock().get(&user) {
            return Ok(e.state.clone());
        }
        let was_evicted = self.is_evicted(user);
        let st = self.load(&[user]).await?.pop().flatten();
        Ok(self.as_read(user, st, was_evicted, self.clock.now()))
    }

    fn is_evicted(&self, user: UserId) -> bool {
        self.backlog.lock().evicted.contains(&user)
    }

    /// Which of `users` are evicted (out of memory after a failed write), in order.
    fn evicted_of(&self, users: &[UserId]) -> Vec<bool> {
        let backlog = self.backlog.lock();
        users.iter().map(|u| backlog.evicted.contains(u)).collect()
    }

    /// A state a read just loaded from the store, as the read shows it. If a request put the
    /// user back in memory meanwhile (a heartbeat's reload), memory is the truth. Otherwise an
    /// evicted user's devices count as seen now (their heartbeats were not written through), as
    /// they will once the writer reinstalls it. `was_evicted`: whether it was evicted when the
    /// load began (a reload that finished meanwhile clears the mark).
    fn as_read(
        &self,
        user: UserId,
        loaded: Option<UserState>,
        was_evicted: bool,
        now: Millis,
    ) -> UserState {
        if let Some(e) = self.stripe(user).lock().get(&user) {
            return e.state.clone();
        }
        let mut st = loaded.unwrap_or_default();
        if was_evicted || self.is_evicted(user) {
            st.reloaded(now);
        }
        st
    }
}

/// A request's write while it is being saved: if the request is cancelled before the save
/// answered, the writer takes it (no copy of the state is made for that).
struct Unfinished<'a> {
    shard: &'a Shard,
    write: Write,
    done: bool,
}

impl Unfinished<'_> {
    /// The save answered: the write, which the writer will not take.
    fn finish(mut self) -> Write {
        self.done = true;
        Write {
            user: self.write.user,
            state: std::mem::take(&mut self.write.state),
            fence: self.write.fence,
        }
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.done {
            let state = std::mem::take(&mut self.write.state);
            self.shard.backlog.lock().save(self.write.user, state);
            self.shard.wake.notify_one();
        }
    }
}

fn take_some<K: Copy + Eq + std::hash::Hash, V>(
    map: &mut hashbrown::HashMap<K, V>,
    n: usize,
) -> Vec<(K, V)> {
    let keys: Vec<K> = map.keys().take(n).copied().collect();
    keys.into_iter()
        .filter_map(|k| map.remove(&k).map(|v| (k, v)))
        .collect()
}

fn take_some_set<K: Copy + Eq + std::hash::Hash>(
    set: &mut hashbrown::HashSet<K>,
    n: usize,
) -> Vec<K> {
    let keys: Vec<K> = set.iter().take(n).copied().collect();
    for k in &keys {
        set.remove(k);
    }
    keys
}

#[async_trait]
impl Presence for Shard {
    async fn online_session(
        &self,
        user: UserId,
        device: &str,
        platform: Platform,
        session: Session,
    ) -> Result<StatusView, Error> {
        let rules = self.rules;
        self.mutate(user, true, |st, now| {
            let st = st.expect("loaded");
            let effect = st.online(device, platform, now, &rules)?;
            st.set_session(device, session);
            Ok((st.view(user, now, &rules), effect))
        })
        .await
    }

    async fn offline(
        &self,
        user: UserId,
        device: &str,
        closed: Option<Closed>,
    ) -> Result<(), Error> {
        let rules = self.rules;
        let kept = |st: &UserState, now| {
            closed.is_some_and(|c| {
                st.registered_since(device, c.session)
                    || c.seen_within
                        .is_some_and(|w| st.seen_within(device, w.as_millis() as Millis, now))
            })
        };
        self.mutate(user, false, |st, now| match st {
            Some(st) if kept(st, now) => Ok(((), Effect::default())),
            Some(st) => Ok(((), st.offline(device, now, &rules))),
            None => Ok(((), Effect::default())),
        })
        .await
    }

    async fn heartbeat(&self, user: UserId, device: &str, active: bool) -> Result<(), Error> {
        let rules = self.rules;
        let beat = |st: Option<&mut UserState>, now| {
            let st = st.ok_or(Error::DeviceNotOnline)?;
            let effect = st
                .heartbeat(device, active, now, &rules)
                .map_err(|_| Error::DeviceNotOnline)?;
            Ok(((), effect))
        };
        let mut r = self.mutate(user, false, beat).await;
        // Not in memory because a failed write evicted it: reload it rather than answer "not
        // online" (looked up only on a miss, so a live user's heartbeat takes no shared lock).
        if r == Err(Error::DeviceNotOnline) && self.is_evicted(user) {
            r = self.mutate(user, true, beat).await;
        }
        let label = match &r {
            Ok(()) => HeartbeatResult::Ok,
            Err(Error::DeviceNotOnline) => HeartbeatResult::NotOnline,
            Err(_) => HeartbeatResult::Error,
        };
        self.metrics.presence.heartbeats.get(label).inc();
        r
    }

    async fn status(&self, user: UserId, viewer: Viewer) -> Result<StatusView, Error> {
        let st = self.state_of(user).await?;
        let sight = self.sight_of(user, &st, viewer).await?;
        Ok(st.view_as(user, self.clock.now(), &self.rules, sight))
    }

    async fn batch(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<BatchEntry>, Error> {
        self.gather_as(users, viewer, UserState::batch_entry_as)
            .await
    }

    async fn set_status(&self, user: UserId, settings: Settings) -> Result<StatusView, Error> {
        let now = self.clock.now();
        if let Some(t) = settings.expires_at {
            if t <= now {
                return Err(Error::BadRequest("expiresAt must be in the future".into()));
            }
            if t > now + MAX_EXPIRY {
                return Err(Error::BadRequest(
                    "expiresAt must be within 366 days".into(),
                ));
            }
        }
        self.table.check(user)?;
        self.status_change(user)?;
        let rules = self.rules;
        self.mutate(user, true, |st, now| {
            let st = st.expect("loaded");
            self.new_offline_record(st, now)?;
            let effect = st.set_settings(settings.clone(), now, &rules);
            Ok((st.view(user, now, &rules), effect))
        })
        .await
    }

    async fn clear_status(&self, user: UserId) -> Result<StatusView, Error> {
        self.table.check(user)?;
        self.status_change(user)?;
        let rules = self.rules;
        self.mutate(user, true, |st, now| {
            let st = st.expect("loaded");
            let effect = st.clear_settings(now, &rules);
            Ok((st.view(user, now, &rules), effect))
        })
        .await
    }

    async fn views(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<StatusView>, Error> {
        self.gather_as(users, viewer, UserState::view_as).await
    }

    async fn privacy(&self, user: UserId) -> Result<Privacy, Error> {
        let st = self.state_of(user).await?;
        Ok(st.privacy.map(|p| *p).unwrap_or_default())
    }

    async fn set_privacy(&self, user: UserId, privacy: Privacy) -> Result<Privacy, Error> {
        let max = self.rules.max_privacy_list;
        for list in [&privacy.allow, &privacy.deny] {
            crate::presence::validate_privacy_list(list, max)?;
        }
        self.table.check(user)?;
        self.status_change(user)?;
        if privacy.visibility == Visibility::Contacts {
            // Read before the change, so that its event goes out with them at once.
            self.contacts.get(user).await?;
        }
        let rules = self.rules;
        self.mutate(user, true, |st, now| {
            let st = st.expect("loaded");
            self.new_offline_record(st, now)?;
            let effect = st.set_privacy(privacy.clone(), now, &rules);
            Ok((st.privacy.as_deref().cloned().unwrap_or_default(), effect))
        })
        .await
    }

    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error> {
        self.store.subscriptions(user).await
    }

    async fn subscribe(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
    ) -> Result<Vec<UserId>, Error> {
        let max = self.rules.max_subscriptions;
        if targets.len() > max {
            return Err(crate::store::too_many_subscriptions(max));
        }
        self.table.check(user)?;
        let before = self.contacts.cached(user);
        self.contacts.remove(user);
        let list = self
            .store
            .update_subscriptions(user, mode, targets, max)
            .await?;
        let shows_to_contacts = |st: &UserState| {
            st.privacy
                .as_deref()
                .is_some_and(|p| p.visibility == Visibility::Contacts)
        };
        let contacts_rule = shows_to_contacts(&self.state_of(user).await?);
        if contacts_rule {
            self.contacts.put(user, &list);
        }
        if contacts_rule && before.as_deref() != Some(list.as_slice()) {
            // The user's contacts changed: under `CONTACTS` so did who sees it.
            let rules = self.rules;
            self.mutate(user, true, |st, now| {
                let st = st.expect("loaded");
                let contacts = st
                    .privacy
                    .as_deref()
                    .is_some_and(|p| p.visibility == Visibility::Contacts);
                let effect = if contacts {
                    st.contacts_changed(now, &rules)
                } else {
                    Effect::default()
                };
                Ok(((), effect))
            })
            .await?;
        }
        self.metrics
            .push
            .subscription_changes
            .get(SubscriptionChange {
                mode: mode.as_str(),
            })
            .inc();
        // Gateways holding the user's sockets listen to the new list.
        if let Some(sink) = self.sink.get() {
            if sink.wants(user) {
                sink.publish(Event::subscriptions(user, list.clone(), self.clock.now()));
            }
        }
        Ok(list)
    }

    async fn healthy(&self) -> bool {
        // The store is watched on its own (`presence_store_up`), never here: see the trait.
        !self.table.starting()
    }
}

/// A shard for unit tests: the memory store, every partition, `heartbeat_timeout`, timers
/// every `tick`, at most 4 devices and 10 subscriptions a user, 5 min idle and resume windows.
#[cfg(test)]
pub(crate) fn test_shard(
    heartbeat_timeout: Duration,
    tick: Duration,
    metrics: Arc<Metrics>,
) -> Arc<Shard> {
    let rules = Rules {
        heartbeat_timeout: heartbeat_timeout.as_millis() as Millis,
        idle_timeout: 300_000,
        resume_window: 300_000,
        max_devices: 4,
        max_subscriptions: 10,
        ..Rules::default()
    };
    Arc::new(Shard::new(
        crate::store::MemoryStore::new(),
        rules,
        tick,
        metrics,
        Table::owning_all(),
    ))
}

#[cfg(test)]
mod faults;
mod parting;

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(tick_ms: u64) -> Arc<Shard> {
        test_shard(
            Duration::from_secs(60),
            Duration::from_millis(tick_ms),
            Arc::new(Metrics::new()),
        )
    }

    async fn settle() {
        // Let the timer task run the ticks that are due.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn status_changes_past_the_rate_are_refused_and_change_nothing() {
        let s = shard(100);
        let s = Arc::new(
            Arc::try_unwrap(s)
                .ok()
                .unwrap()
                .with_status_rate("3/1m,3".parse().unwrap(), 100),
        );
        let busy = |text: &str| Settings {
            manual: Some(Status::Busy),
            text: Some(text.into()),
            expires_at: None,
        };
        for i in 0..3 {
            s.set_status(1, busy(&format!("t{i}"))).await.unwrap();
        }
        let r = s.set_status(1, busy("t3")).await;
        // One token comes back every 20 s.
        assert!(
            matches!(r, Err(Error::RateLimited(n)) if (19..=20).contains(&n)),
            "{r:?}"
        );
        assert_eq!(
            s.clear_status(1).await.map(|_| ()),
            Err(Error::RateLimited(20))
        );
        let view = s.status(1, Viewer::Truth).await.unwrap();
        assert_eq!(
            view.custom_text.as_deref(),
            Some("t2"),
            "a refused change changed something"
        );
        let limited = s.metrics.presence.rate_limited.get(RateLimit::Status).get();
        assert_eq!(limited, 2);
        // Other users have their own budget.
        s.set_status(2, busy("x")).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fires_never_early_and_within_one_tick() {
        let s = shard(100);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_timers(cancel.clone()));
        s.online(1, "d", Platform::Web).await.unwrap();
        tokio::time::sleep(Duration::from_millis(59_900)).await;
        settle().await;
        assert_eq!(
            s.status(1, Viewer::Truth).await.unwrap().status,
            Status::Online
        );
        assert_eq!(s.metrics.presence.timeouts.get(), 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
        settle().await;
        assert_eq!(s.metrics.presence.timeouts.get(), 1);
        assert_eq!(s.metrics.presence.online_devices.get(), 0);
        assert_eq!(s.metrics.presence.online_users.get(), 0);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_online_then_idle_goes_away() {
        let s = shard(100);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_timers(cancel.clone()));
        s.online(2, "d", Platform::Ios).await.unwrap();
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            s.heartbeat(2, "d", false).await.unwrap();
        }
        // 270 s: still ONLINE; the idle timer fires at 300 s without any request.
        assert_eq!(
            s.status(2, Viewer::Truth).await.unwrap().status,
            Status::Online
        );
        tokio::time::sleep(Duration::from_millis(30_200)).await;
        settle().await;
        let v = s.status(2, Viewer::Truth).await.unwrap();
        assert_eq!(v.status, Status::Away);
        assert_eq!(
            s.metrics
                .presence
                .transitions
                .get(Transition {
                    from: "ONLINE",
                    to: "AWAY",
                })
                .get(),
            1
        );
        s.heartbeat(2, "d", true).await.unwrap();
        assert_eq!(
            s.status(2, Viewer::Truth).await.unwrap().status,
            Status::Online
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn dormant_users_leave_memory_but_not_the_store() {
        let s = shard(100);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_timers(cancel.clone()));
        s.online(3, "d", Platform::Pc).await.unwrap();
        s.offline(3, "d", None).await.unwrap();
        assert_eq!(s.metrics.presence.cached_users.get(), 1);
        tokio::time::sleep(Duration::from_millis(EVICT_DELAY as u64 + 200)).await;
        settle().await;
        assert_eq!(s.metrics.presence.cached_users.get(), 0);
        let v = s.status(3, Viewer::Truth).await.unwrap();
        assert_eq!(v.status, Status::Offline);
        assert!(v.last_active_time > 0);
        assert_eq!(v.version, 2);
        assert_eq!(s.heartbeat(3, "d", true).await, Err(Error::DeviceNotOnline));
        cancel.cancel();
    }

    /// The timer task wakes for what is due, not every tick: idle, once a second (the refresh
    /// sweep's cadence); a deadline armed while it sleeps wakes it in time, and the device
    /// times out at its tick.
    #[tokio::test(start_paused = true)]
    async fn the_timer_sleeps_until_something_is_due() {
        let s = shard(10);
        let cancel = CancellationToken::new();
        tokio::spawn(s.clone().run_timers(cancel.clone()));
        settle().await;
        let wakeups = || s.timer_wakeups.load(Ordering::Relaxed);
        let idle_from = wakeups();
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        let idle = wakeups() - idle_from;
        // 1,000 ticks of 10 ms: about ten wakes, not a thousand.
        assert!((9..=12).contains(&idle), "{idle} wakes in 10 idle seconds");
        // Armed while the task sleeps up to a second: the heartbeat timeout (60 s) fires within
        // a tick of its deadline.
        tokio::time::sleep(Duration::from_millis(345)).await;
        s.online(5, "d", Platform::Web).await.unwrap();
        let online_at = tokio::time::Instant::now();
        let from = wakeups();
        while s.status(5, Viewer::Truth).await.unwrap().status == Status::Online {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let late = online_at.elapsed();
        assert!(
            late >= Duration::from_millis(60_000) && late <= Duration::from_millis(60_020),
            "offline {late:?} after online"
        );
        let waiting = wakeups() - from;
        assert!(waiting <= 70, "{waiting} wakes over the 60 s wait");
        cancel.cancel();
    }

    /// A socket's late `offline` (its close grace) does not undo a reconnect that registered
    /// the device again, however soon after the close the reconnect came (no window needed);
    /// with its own session still current, the offline applies.
    #[tokio::test(start_paused = true)]
    async fn a_closed_sockets_offline_spares_a_newer_registration() {
        let s = shard(100);
        let closed = |session| {
            Some(Closed {
                session,
                seen_within: Some(Duration::ZERO),
            })
        };
        s.online_session(4, "d", Platform::Ios, 11).await.unwrap();
        // The device reconnects (another socket, maybe through another gateway) at once.
        s.online_session(4, "d", Platform::Ios, 12).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.offline(4, "d", closed(11)).await.unwrap();
        assert_eq!(
            s.status(4, Viewer::Truth).await.unwrap().status,
            Status::Online
        );
        // The newer socket's own offline applies.
        s.offline(4, "d", closed(12)).await.unwrap();
        assert_eq!(
            s.status(4, Viewer::Truth).await.unwrap().status,
            Status::Offline
        );
        // Unknown sessions (0: from a peer that sends none) fall back to the window alone.
        s.online_session(4, "d", Platform::Ios, 0).await.unwrap();
        s.offline(4, "d", closed(13)).await.unwrap();
        assert_eq!(
            s.status(4, Viewer::Truth).await.unwrap().status,
            Status::Offline
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_million_devices_need_one_timer_task() {
        // Not a benchmark: checks that arming is per user, not per task.
        let s = shard(100);
        for u in 1..=10_000u64 {
            s.online(u, "d", Platform::Web).await.unwrap();
        }
        assert_eq!(s.wheel.lock().len(), 10_000);
        for u in 1..=10_000u64 {
            s.heartbeat(u, "d", true).await.unwrap();
        }
        // Heartbeats that move deadlines later add nothing to the wheel.
        assert_eq!(s.wheel.lock().len(), 10_000);
    }
}
