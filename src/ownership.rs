//! Which partitions a shard owns: the pure state machine of ownership and handoff, and the
//! lock-free table the request path reads it from.
//!
//! [`Ownership`] takes what happens (the ring changed, a grace or a backoff elapsed, a load
//! finished or failed, the process is draining) and answers what to do ([`Action`]: release
//! partitions, load partitions). It does no I/O and reads no clock: the caller passes `now`, so
//! it is unit-tested on paused time, and the shard's gRPC side only drives it.
//!
//! A partition is [`State::Released`], [`State::Pending`] (gained, waiting for its previous owner
//! to let go or for a retry), [`State::Loading`] (its users are being read from the store) or
//! [`State::Owned`]. Only an owned partition is served.
//!
//! The rules:
//! - A shard that just started takes nothing for a grace: its view of the members is young, and
//!   a partition taken on a partial view would have two owners.
//! - A lost partition is released at once, whatever its state, and a load still running for it
//!   no longer counts: its result is ignored for that partition.
//! - A gained partition whose previous owner is still a member waits until that owner says it
//!   has let go (a handover: [`Ownership::awaiting_handover`], [`Ownership::handed_over`]), or a
//!   grace at most, so that the previous owner has seen the same ring and stopped serving it; one
//!   whose previous owner is gone loads at once. A handover counts only from a shard that held
//!   the partition under the store's fence ([`Ownership::takes_handover`]): the previous owner is
//!   a guess, and one that never loaded the partition has none of its devices' times; then every
//!   member is asked.
//! - A failed load goes back to pending with a backoff (100 ms doubling to 5 s); ring changes are
//!   taken meanwhile, so a failing store never makes the shard deaf to the ring.
//! - A partition the store shows fenced by another shard (checked after a stall) is released and
//!   gained again from its interim owner: this shard missed a ring change.
//! - Draining releases everything and takes nothing more.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::presence::UserId;
use crate::ring::{partition_of, Ring, PARTITIONS};

/// The first backoff after a failed load.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest backoff between loads.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where one partition stands on this shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not this shard's.
    Released,
    /// Gained, not loading yet: waiting for the previous owner, or for a retry.
    Pending,
    /// Its users are being loaded.
    Loading,
    /// Served.
    Owned,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop serving these partitions (already refused) and let go of their users.
    Release(Vec<u32>),
    /// Load these partitions from the store, then report [`Ownership::load_done`] or
    /// [`Ownership::load_failed`] with `id`.
    Load { id: u64, partitions: Vec<u32> },
}

#[derive(Clone, Debug)]
struct Part {
    state: State,
    /// For `Pending`: when it may load.
    ready_at: Option<Instant>,
    /// For `Loading`: the load that is reading it.
    load: u64,
    /// For `Pending` within its grace: the previous owner, still a member, to ask for a handover.
    from: Option<Arc<str>>,
    /// For `Pending` within its grace: the fence a handover must show, the store's as last read
    /// (when it was taken back after another shard fenced it, [`Ownership::fenced`], or when a
    /// previous owner said it let go, [`Ownership::fence_found`]). Only a handover from a shard
    /// that held it under that fence (or a later one) counts; 0: any.
    fence: u64,
    /// For `Pending` within its grace: a shard asked let go of it without having held the
    /// store's fence (it never loaded it, or was a wrong guess), so the one that did is another:
    /// every member is asked.
    anyone: bool,
    /// For `Pending` with `anyone`: the members that let it go without the store's fence. Once
    /// every other member did, its holder is gone and it loads at once, unless `stalled`.
    declined: Vec<Arc<str>>,
    /// Taken back after a stall ([`Ownership::fenced`]): this shard's ring may be the stale one
    /// (its holder may be a shard it does not know yet), so it waits for the holder or the grace.
    stalled: bool,
}

impl Part {
    /// Waits for nobody: loads at the next tick.
    fn ready_now(&mut self, now: Instant) {
        self.ready_at = Some(now);
        self.from = None;
        self.fence = 0;
        self.anyone = false;
        self.declined.clear();
        self.stalled = false;
    }

    const RELEASED: Part = Part {
        state: State::Released,
        ready_at: None,
        load: 0,
        from: None,
        fence: 0,
        anyone: false,
        declined: Vec::new(),
        stalled: false,
    };

    /// Gained at `now`: from `from`, which it waits for (a grace at most), or from nobody (it
    /// loads at once).
    fn pending(from: Option<&str>, now: Instant, grace: Duration) -> Part {
        Part {
            state: State::Pending,
            ready_at: Some(if from.is_some() { now + grace } else { now }),
            load: 0,
            from: from.map(Arc::from),
            fence: 0,
            anyone: false,
            declined: Vec::new(),
            stalled: false,
        }
    }
}

/// The ownership of one shard: a pure state machine.
pub struct Ownership {
    me: String,
    grace: Duration,
    ring: Arc<Ring>,
    /// The ring to apply once the start grace is over.
    held: Option<Arc<Ring>>,
    hold_until: Option<Instant>,
    parts: Vec<Part>,
    next_load: u64,
    backoff: Duration,
    serving: bool,
}

impl Ownership {
    /// A shard named `me` (its address in the ring) that started at `now`.
    pub fn new(me: String, grace: Duration, now: Instant) -> Ownership {
        Ownership {
            me,
            grace,
            ring: Arc::new(Ring::new(Vec::new())),
            held: None,
            hold_until: Some(now + grace),
            parts: vec![Part::RELEASED; PARTITIONS as usize],
            next_load: 1,
            backoff: FIRST_BACKOFF,
            serving: true,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The ring this shard follows (the newest it has applied).
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Whether the shard is within its start grace, taking nothing yet, while its ring has other
    /// members: those serve its partitions meanwhile, so it should not be a member yet. A shard
    /// whose ring has no other member (a cluster starting, whose members are the ready or
    /// registered shards) is not held back: otherwise the first shard to join would take every
    /// partition.
    pub fn starting(&self) -> bool {
        self.hold_until.is_some() && {
            let ring = self.held.as_ref().unwrap_or(&self.ring);
            ring.members().iter().any(|m| *m != self.me)
        }
    }

    pub fn state(&self, partition: u32) -> State {
        self.parts[partition as usize].state
    }

    /// How many partitions are in `state`.
    pub fn count(&self, state: State) -> usize {
        self.parts.iter().filter(|p| p.state == state).count()
    }

    /// When [`Ownership::tick`] has something to do next, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        if let Some(t) = self.hold_until {
            return self.held.is_some().then_some(t);
        }
        self.parts
            .iter()
            .filter(|p| p.state == State::Pending)
            .filter_map(|p| p.ready_at)
            .min()
    }

    /// The ring changed.
    pub fn ring_changed(&mut self, next: Arc<Ring>, now: Instant) -> Vec<Action> {
        if !self.serving {
            return Vec::new();
        }
        if self.hold_until.is_some() {
            self.held = Some(next);
            return self.tick(now);
        }
        let prev = std::mem::replace(&mut self.ring, next.clone());
        let mut mine = vec![false; PARTITIONS as usize];
        for p in next.partitions_of(&self.me) {
            mine[p as usize] = true;
        }
        let mut actions = Vec::new();
        let lost: Vec<u32> = (0..PARTITIONS)
            .filter(|&p| !mine[p as usize] && self.parts[p as usize].state != State::Released)
            .collect();
        for &p in &lost {
            self.parts[p as usize] = Part::RELEASED;
        }
        if !lost.is_empty() {
            actions.push(Action::Release(lost));
        }
        // The previous owners: from our previous ring, or, for a shard new to the ring, from the
        // ring of the other members (what everyone else was using).
        let others;
        let before: &Ring = if prev.members().contains(&self.me) {
            &prev
        } else {
            others = next.without(&self.me);
            &others
        };
        for p in 0..PARTITIONS {
            let part = &mut self.parts[p as usize];
            if !mine[p as usize] || part.state != State::Released {
                continue;
            }
            let from = before
                .owner(p)
                .filter(|owner| *owner != self.me && next.members().iter().any(|m| m == owner));
            *part = Part::pending(from, now, self.grace);
        }
        // A partition taken back after another shard fenced it, still waiting: its interim owner
        // is guessed again on the new ring (the shard that joined may be its holder).
        let mut without_me = None;
        for p in 0..PARTITIONS {
            let part = &mut self.parts[p as usize];
            if part.state == State::Pending && part.stalled && part.from.is_some() {
                let ring = without_me.get_or_insert_with(|| next.without(&self.me));
                part.from = ring.owner(p).map(Arc::from);
                if part.from.is_none() {
                    // No other member: nobody to wait for.
                    part.ready_now(now);
                }
            }
        }
        actions.extend(self.tick(now));
        actions
    }

    /// Time passed: starts the loads that are due.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        if !self.serving {
            return Vec::new();
        }
        if let Some(until) = self.hold_until {
            if now < until {
                return Vec::new();
            }
            self.hold_until = None;
            return match self.held.take() {
                Some(ring) => self.ring_changed(ring, now),
                None => Vec::new(),
            };
        }
        let id = self.next_load;
        let due: Vec<u32> = (0..PARTITIONS)
            .filter(|&p| {
                let part = &self.parts[p as usize];
                part.state == State::Pending && part.ready_at.is_some_and(|t| t <= now)
            })
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        self.next_load += 1;
        for &p in &due {
            self.parts[p as usize] = Part {
                state: State::Loading,
                ready_at: None,
                load: id,
                from: None,
                fence: 0,
                anyone: false,
                declined: Vec::new(),
                stalled: false,
            };
        }
        vec![Action::Load {
            id,
            partitions: due,
        }]
    }

    /// Load `id` finished: what it loaded and is still ours is owned. Answers the partitions
    /// that became owned.
    pub fn load_done(&mut self, id: u64) -> Vec<u32> {
        self.backoff = FIRST_BACKOFF;
        let mut owned = Vec::new();
        for (p, part) in self.parts.iter_mut().enumerate() {
            if part.state == State::Loading && part.load == id {
                part.state = State::Owned;
                part.load = 0;
                owned.push(p as u32);
            }
        }
        owned
    }

    /// Load `id` failed: what it was loading and is still ours waits for a retry.
    pub fn load_failed(&mut self, id: u64, now: Instant) {
        let retry = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        for part in &mut self.parts {
            if part.state == State::Loading && part.load == id {
                *part = Part {
                    state: State::Pending,
                    ready_at: Some(retry),
                    load: 0,
                    from: None,
                    fence: 0,
                    anyone: false,
                    declined: Vec::new(),
                    stalled: false,
                };
            }
        }
    }

    /// The gained partitions still waiting for their previous owner, by that owner (or by every
    /// other member, for those whose holder is another): ask each whether it has let go, and
    /// report what it has with [`Ownership::handed_over`].
    pub fn awaiting_handover(&self) -> Vec<(Arc<str>, Vec<u32>)> {
        let mut by: Vec<(Arc<str>, Vec<u32>)> = Vec::new();
        let mut add = |owner: &str, p: u32| match by.iter_mut().find(|(o, _)| &**o == owner) {
            Some((_, ps)) => ps.push(p),
            None => by.push((Arc::from(owner), vec![p])),
        };
        for (p, part) in self.parts.iter().enumerate() {
            let (State::Pending, Some(from)) = (part.state, &part.from) else {
                continue;
            };
            if part.anyone {
                for m in self.ring.members().iter().filter(|m| **m != self.me) {
                    add(m, p as u32);
                }
            } else {
                add(from, p as u32);
            }
        }
        by
    }

    /// Whether `partition` waits for a handover (within its grace).
    pub fn awaits_handover(&self, partition: u32) -> bool {
        self.parts
            .get(partition as usize)
            .is_some_and(|part| part.state == State::Pending && part.from.is_some())
    }

    /// Whether a shard's answer that it let go of `partition`, which it last held under fence
    /// `held` (`None`: an older shard that does not say), hands it over: the partition waits
    /// for a handover, and the answer comes from the shard that held the store's fence
    /// ([`Ownership::fence_found`]), or from an older shard (as before fences were sent), unless
    /// the partition was taken back after a stall. The previous
    /// owner asked is a guess (its owner in the previous ring, or, for a partition taken back
    /// after another shard fenced it, in the ring without this shard); a guessed shard that
    /// never loaded it would answer at once, without the devices' times of its holder, and a
    /// fenced partition would be fenced over its real holder.
    pub fn takes_handover(&self, partition: u32, held: Option<u64>) -> bool {
        self.awaits_handover(partition) && {
            let part = &self.parts[partition as usize];
            held.map_or(!part.stalled, |held| held >= part.fence)
        }
    }

    /// The store shows `found` on a partition waiting for a handover: a handover must show that
    /// fence (or a later one) from now on.
    pub fn fence_found(&mut self, partition: u32, found: u64) {
        if self.awaits_handover(partition) {
            let part = &mut self.parts[partition as usize];
            part.fence = part.fence.max(found);
        }
    }

    /// Shard `owner` let go of `partitions`, each having last held it under the fence given
    /// (`None`: an older shard that does not say): those it hands over
    /// ([`Ownership::takes_handover`]) load now, without the rest of the grace. One it let go
    /// of without having held the store's fence waits on, and every member is asked for it from
    /// now on: its holder is another. Once every other member has let it go so, its holder is
    /// gone (killed, or restarted with nothing loaded) and it loads at once; not after a stall,
    /// when this shard's ring may lack the holder. What is ready loads at the next
    /// [`Ownership::tick`], with what other shards handed over in the same poll.
    pub fn handed_over(&mut self, owner: &str, partitions: &[(u32, Option<u64>)], now: Instant) {
        if !self.serving {
            return;
        }
        for &(p, held) in partitions {
            if self.takes_handover(p, held) {
                self.parts[p as usize].ready_now(now);
            } else if held.is_some() && self.awaits_handover(p) {
                let part = &mut self.parts[p as usize];
                part.anyone = true;
                if !part.declined.iter().any(|o| &**o == owner) {
                    part.declined.push(Arc::from(owner));
                }
                let mut others = self.ring.members().iter().filter(|m| **m != self.me);
                if !part.stalled && others.all(|m| part.declined.iter().any(|o| **o == **m)) {
                    part.ready_now(now);
                }
            }
        }
    }

    /// Another shard fenced `partitions` (each with the fence found in the store) after this
    /// one loaded them, on a ring this one never applied (this one was stopped while its peers
    /// dropped it from the ring and took them over, and the ring came back before it ran
    /// again). What it holds of them is stale: those it owns are released, and gained again as
    /// after a ring change, from the shard that owns each in the ring without this one (the
    /// interim owner): loaded once that shard hands them over having held the fence found, or
    /// after the grace. Others are left as they are.
    pub fn fenced(&mut self, partitions: &[(u32, u64)], now: Instant) -> Vec<Action> {
        if !self.serving || self.hold_until.is_some() {
            return Vec::new();
        }
        let without_me = self.ring.without(&self.me);
        let mut lost = Vec::new();
        for &(p, found) in partitions {
            let Some(part) = self.parts.get_mut(p as usize) else {
                continue;
            };
            if part.state == State::Owned {
                *part = Part::pending(without_me.owner(p), now, self.grace);
                if part.from.is_some() {
                    part.fence = found;
                    part.stalled = true;
                }
                lost.push(p);
            }
        }
        if lost.is_empty() {
            return Vec::new();
        }
        let mut actions = vec![Action::Release(lost)];
        actions.extend(self.tick(now));
        actions
    }

    /// Graceful shutdown: release everything, take nothing more.
    pub fn drain(&mut self) -> Vec<Action> {
        self.serving = false;
        self.hold_until = None;
        self.held = None;
        let all: Vec<u32> = (0..PARTITIONS)
            .filter(|&p| self.parts[p as usize].state != State::Released)
            .collect();
        for &p in &all {
            self.parts[p as usize] = Part::RELEASED;
        }
        if all.is_empty() {
            Vec::new()
        } else {
            vec![Action::Release(all)]
        }
    }
}

const RELEASED: u8 = 0;
const WAITING: u8 = 1;
const OWNED: u8 = 2;
/// Refused like `RELEASED`, while its users are still being let go (see [`Table::let_go`]).
const RELEASING: u8 = 3;

/// What the request path reads: per partition, whether it is served, without a lock.
pub struct Table {
    states: Box<[AtomicU8]>,
    epoch: AtomicU64,
    serving: AtomicBool,
    /// [`Ownership::starting`], for the health check.
    starting: AtomicBool,
    owned: AtomicU64,
    /// Drawn at random for this table (one per shard process): the health check's
    /// `incarnation`.
    incarnation: u64,
}

impl Table {
    pub fn new() -> Arc<Table> {
        Arc::new(Table {
            states: (0..PARTITIONS).map(|_| AtomicU8::new(RELEASED)).collect(),
            epoch: AtomicU64::new(0),
            serving: AtomicBool::new(true),
            starting: AtomicBool::new(false),
            owned: AtomicU64::new(0),
            incarnation: crate::service::new_session(),
        })
    }

    /// A random number, nonzero, drawn when the table was made: this shard's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// A table that serves every partition, for good: a one-process node.
    pub fn owning_all() -> Arc<Table> {
        let t = Table::new();
        for s in t.states.iter() {
            s.store(OWNED, Ordering::Relaxed);
        }
        t.owned.store(PARTITIONS as u64, Ordering::Relaxed);
        t
    }

    /// Marks one partition served or not, outside the machine: for tests of what reads the
    /// table.
    #[cfg(test)]
    pub fn set_owned(&self, partition: u32, owned: bool) {
        let v = if owned { OWNED } else { WAITING };
        self.states[partition as usize].store(v, Ordering::Release);
    }

    /// Copies the machine's view. Refusals take effect before the caller releases anything.
    pub fn sync(&self, own: &Ownership) {
        let mut owned = 0;
        for (p, part) in own.parts.iter().enumerate() {
            let cur = self.states[p].load(Ordering::Acquire);
            let v = match part.state {
                State::Released if cur == RELEASED => RELEASED,
                State::Released => RELEASING,
                State::Pending | State::Loading => WAITING,
                State::Owned => {
                    owned += 1;
                    OWNED
                }
            };
            self.states[p].store(v, Ordering::Release);
        }
        self.owned.store(owned, Ordering::Relaxed);
        self.epoch.store(own.ring.epoch(), Ordering::Relaxed);
        self.serving.store(own.serving, Ordering::Relaxed);
        self.starting.store(own.starting(), Ordering::Relaxed);
    }

    /// The partitions served now.
    pub fn owned_partitions(&self) -> Vec<u32> {
        (0..PARTITIONS)
            .filter(|&p| self.states[p as usize].load(Ordering::Acquire) == OWNED)
            .collect()
    }

    /// The users of these partitions are gone from memory (after their release): a handover
    /// may now tell the next owner they are free.
    pub fn let_go(&self, partitions: &[u32]) {
        for &p in partitions {
            let _ = self.states[p as usize].compare_exchange(
                RELEASING,
                RELEASED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Whether this shard neither serves `partition` nor is still letting it go.
    pub fn is_released(&self, partition: u32) -> bool {
        self.states
            .get(partition as usize)
            .is_some_and(|s| s.load(Ordering::Acquire) == RELEASED)
    }

    /// Reports not serving at once (a drain begins), before the machine has caught up.
    pub fn stop_serving(&self) {
        self.serving.store(false, Ordering::Relaxed);
    }

    /// The epoch of the ring the shard follows.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Whether the shard is within its start grace ([`Ownership::starting`]).
    pub fn starting(&self) -> bool {
        self.starting.load(Ordering::Relaxed)
    }

    pub fn owned_count(&self) -> usize {
        self.owned.load(Ordering::Relaxed) as usize
    }

    /// Whether this shard serves `user` now.
    pub fn check(&self, user: UserId) -> Result<(), Error> {
        match self.states[partition_of(user) as usize].load(Ordering::Acquire) {
            OWNED => Ok(()),
            WAITING => Err(Error::ShardUnavailable("partition loading, retry".into())),
            _ => Err(Error::WrongOwner {
                epoch: self.epoch(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Scenarios in the style of chitchat's cluster tests: a list of steps run against one
    //! shard's machine on paused time, with a tiny in-test cluster that answers loads.
    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    fn addr(i: usize) -> String {
        format!("10.0.0.{i}:50051")
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The members are now these shards (by index); the machine is shard `ME`.
        Members(Vec<usize>),
        /// Paused time moves on.
        Wait(Duration),
        /// The store answers the oldest outstanding load.
        LoadDone,
        /// The store fails the oldest outstanding load.
        LoadFailed,
        /// SIGTERM.
        Drain,
        /// Shard `n` answers a handover poll: it has let go of what this shard awaits from it,
        /// which it last held under this fence (0: never; `None`: an older shard, which does
        /// not say).
        HandedOverBy(usize, Option<u64>),
        /// The partitions waiting for a handover, by previous owner (indexes, sorted).
        ExpectAwaiting(Vec<usize>),
        /// The oldest load finishes, and leaves every partition of `ME` owned, none loading.
        LoadDoneAndOwned,
        /// Every partition the ring gives `ME` is in this state; all others are released.
        ExpectMine(State),
        /// No partition is in this state.
        ExpectNone(State),
        /// This many loads are outstanding.
        ExpectLoads(usize),
        /// The store shows another shard's fence ([`FOUND`]) on `ME`'s first `n` partitions, and
        /// on one partition it does not own.
        Fenced(usize),
        /// The store shows this fence on every partition waiting for a fence's holder.
        StoreShows(u64),
        /// Exactly this many partitions were released since the last check (which resets the
        /// count).
        ExpectReleased(usize),
        /// The partitions released so far, counted since the last check, equal the ones
        /// the ring took away (or all, after a drain): at least this many.
        ExpectReleasedAtLeast(usize),
    }

    const ME: usize = 0;
    /// The fence another shard took, as a [`Step::Fenced`] finds it.
    const FOUND: u64 = 9;

    /// The shards (indexes) that own `partitions` in `interim`, sorted, once each.
    fn interim_owners(interim: &Ring, partitions: &[u32]) -> Vec<usize> {
        let mut from: Vec<usize> = partitions
            .iter()
            .map(|&p| {
                (0..8)
                    .find(|&n| interim.owner(p) == Some(addr(n).as_str()))
                    .unwrap()
            })
            .collect();
        from.sort();
        from.dedup();
        from
    }

    /// The first user of partition `p`.
    fn a_user_of(p: u32) -> UserId {
        (1..).find(|u| partition_of(*u) == p).unwrap()
    }

    struct Harness {
        own: Ownership,
        loads: Vec<(u64, Vec<u32>)>,
        released: usize,
        ring: Arc<Ring>,
        table: Arc<Table>,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                own: Ownership::new(addr(ME), GRACE, Instant::now()),
                loads: Vec::new(),
                released: 0,
                ring: Arc::new(Ring::new(Vec::new())),
                table: Table::new(),
            }
        }

        /// A shard past its start grace that joins the ring of shards 1 and 2: its share awaits
        /// their handover.
        async fn joining() -> Harness {
            let mut h = Harness::new();
            h.run(&[Members(vec![1, 2]), Wait(GRACE * 2), Members(vec![0, 1, 2])])
                .await;
            h
        }

        /// How many partitions are awaited from shard `n`.
        fn asked_of(&self, n: usize) -> usize {
            self.own
                .awaiting_handover()
                .iter()
                .filter(|(o, _)| **o == addr(n))
                .map(|(_, ps)| ps.len())
                .sum()
        }

        fn take(&mut self, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Release(ps) => {
                        // A released partition is refused before its users go (one fenced by
                        // another shard is loading again already).
                        self.table.sync(&self.own);
                        for p in &ps {
                            assert_ne!(self.own.state(*p), State::Owned);
                            let user = a_user_of(*p);
                            assert!(self.table.check(user).is_err(), "partition {p} refused");
                        }
                        self.released += ps.len();
                    }
                    Action::Load { id, partitions } => self.loads.push((id, partitions)),
                }
            }
            self.table.sync(&self.own);
        }

        /// A shard that has owned its share of `members` for a while.
        async fn settled(members: Vec<usize>) -> Harness {
            let mut h = Harness::new();
            h.run(&[
                Members(members),
                Wait(GRACE * 2),
                LoadDone,
                ExpectMine(State::Owned),
            ])
            .await;
            h
        }

        async fn run(&mut self, steps: &[Step]) {
            for (i, step) in steps.iter().enumerate() {
                let now = Instant::now();
                match step.clone() {
                    Step::Members(ms) => {
                        self.ring = Arc::new(Ring::new(ms.iter().map(|&m| addr(m))));
                        let a = self.own.ring_changed(self.ring.clone(), now);
                        self.take(a);
                    }
                    Step::Wait(d) => {
                        // Tick at every deadline on the way, as the driver does.
                        let end = now + d;
                        while let Some(t) = self.own.next_deadline().filter(|t| *t <= end) {
                            tokio::time::sleep_until(t).await;
                            let a = self.own.tick(Instant::now());
                            self.take(a);
                        }
                        tokio::time::sleep_until(end).await;
                        let a = self.own.tick(Instant::now());
                        self.take(a);
                    }
                    Step::LoadDone => {
                        let (id, _) = self.loads.remove(0);
                        self.own.load_done(id);
                        self.table.sync(&self.own);
                    }
                    Step::LoadFailed => {
                        let (id, _) = self.loads.remove(0);
                        self.own.load_failed(id, now);
                        self.table.sync(&self.own);
                    }
                    Step::LoadDoneAndOwned => {
                        Box::pin(self.run(&[
                            LoadDone,
                            ExpectMine(State::Owned),
                            ExpectNone(State::Loading),
                        ]))
                        .await
                    }
                    Step::Fenced(n) => {
                        let mut ps: Vec<u32> = self.ring.partitions_of(&addr(ME));
                        ps.truncate(n);
                        let other = (0..PARTITIONS)
                            .find(|p| !ps.contains(p) && self.own.state(*p) == State::Released);
                        ps.extend(other);
                        let found: Vec<(u32, u64)> = ps.iter().map(|&p| (p, FOUND)).collect();
                        let a = self.own.fenced(&found, now);
                        self.take(a);
                    }
                    Step::StoreShows(f) => {
                        for p in 0..PARTITIONS {
                            if self.own.awaits_handover(p) {
                                self.own.fence_found(p, f);
                            }
                        }
                    }
                    Step::Drain => {
                        let a = self.own.drain();
                        self.take(a);
                    }
                    Step::HandedOverBy(n, held) => {
                        let asked: Vec<(u32, Option<u64>)> = self
                            .own
                            .awaiting_handover()
                            .into_iter()
                            .filter(|(o, _)| **o == addr(n))
                            .flat_map(|(_, ps)| ps)
                            .map(|p| (p, held))
                            .collect();
                        assert!(!asked.is_empty(), "step {i}: nothing awaits shard {n}");
                        self.own.handed_over(&addr(n), &asked, now);
                        let a = self.own.tick(now);
                        self.take(a);
                    }
                    Step::ExpectAwaiting(owners) => {
                        let mut got: Vec<usize> = self
                            .own
                            .awaiting_handover()
                            .iter()
                            .map(|(o, _)| (0..8).find(|&n| **o == addr(n)).unwrap())
                            .collect();
                        got.sort();
                        assert_eq!(got, owners, "step {i}: awaiting handover from");
                    }
                    Step::ExpectMine(state) => {
                        let mine: Vec<u32> = self.ring.partitions_of(&addr(ME));
                        assert!(
                            !mine.is_empty() || state == State::Released,
                            "step {i}: the ring gives me nothing"
                        );
                        for &p in &mine {
                            assert_eq!(self.own.state(p), state, "step {i}: partition {p}");
                        }
                        let mine_count = mine.len();
                        let others = PARTITIONS as usize - mine_count;
                        let released = self.own.count(State::Released);
                        let expect = if state == State::Released {
                            PARTITIONS as usize
                        } else {
                            others
                        };
                        assert_eq!(released, expect, "step {i}: released partitions");
                        // The table serves exactly the owned partitions.
                        for &p in mine.iter().take(64) {
                            let user = a_user_of(p);
                            assert_eq!(
                                self.table.check(user).is_ok(),
                                state == State::Owned,
                                "step {i}: table for partition {p}"
                            );
                        }
                    }
                    Step::ExpectNone(state) => {
                        assert_eq!(self.own.count(state), 0, "step {i}: {state:?}");
                    }
                    Step::ExpectLoads(n) => {
                        assert_eq!(self.loads.len(), n, "step {i}: outstanding loads")
                    }
                    Step::ExpectReleased(n) => {
                        assert_eq!(self.released, n, "step {i}: released");
                        self.released = 0;
                    }
                    Step::ExpectReleasedAtLeast(n) => {
                        assert!(
                            self.released >= n,
                            "step {i}: released {} < {n}",
                            self.released
                        );
                        self.released = 0;
                    }
                }
            }
        }
    }

    use Step::*;

    #[tokio::test(start_paused = true)]
    async fn a_fresh_shard_takes_nothing_during_its_start_grace() {
        Harness::new()
            .run(&[
                Members(vec![0, 1, 2]),
                ExpectMine(State::Released),
                ExpectLoads(0),
                Wait(GRACE - Duration::from_millis(10)),
                ExpectLoads(0),
                // Previous owners (1 and 2) are alive: one more grace before loading.
                Wait(Duration::from_millis(10)),
                ExpectMine(State::Pending),
                Wait(GRACE),
                ExpectLoads(1),
                ExpectMine(State::Loading),
                LoadDoneAndOwned,
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn join_a_single_shard_owns_everything_at_once() {
        Harness::new()
            .run(&[
                Members(vec![0]),
                Wait(GRACE),
                // No previous owner: load without waiting.
                ExpectLoads(1),
                ExpectMine(State::Loading),
                LoadDone,
                ExpectMine(State::Owned),
            ])
            .await;
        let h = Harness::new();
        assert_eq!(h.own.count(State::Released), PARTITIONS as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn another_shard_joins_and_we_release_its_share() {
        Harness::settled(vec![0, 1])
            .await
            .run(&[
                Members(vec![0, 1, 2]),
                // About a third of ours went to the newcomer, released at once.
                ExpectReleasedAtLeast(PARTITIONS as usize / 3 / 2),
                ExpectMine(State::Owned),
                ExpectLoads(0),
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_returning_shard_loads_as_soon_as_the_interim_owners_hand_over() {
        Harness::settled(vec![0, 1, 2])
            .await
            .run(&[
                // Our own health checks fail (our gRPC port is cut): we leave our ring...
                Members(vec![1, 2]),
                ExpectMine(State::Released),
                // ...and come back while 1 and 2 still serve our share.
                Members(vec![0, 1, 2]),
                ExpectMine(State::Pending),
                ExpectAwaiting(vec![1, 2]),
                ExpectLoads(0),
                // 1 has let go: its part loads at once, 2's still waits.
                // An answer without fences (an older shard) hands over a partition gained on a
                // ring change.
                HandedOverBy(1, None),
                ExpectLoads(1),
                ExpectAwaiting(vec![2]),
                HandedOverBy(2, None),
                ExpectLoads(2),
                ExpectAwaiting(vec![]),
                LoadDone,
                LoadDoneAndOwned,
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_counts_as_let_go_only_once_its_release_finished() {
        let mut h = Harness::settled(vec![0]).await;
        let p = 0;
        assert!(!h.table.is_released(p));
        // 1 joins and takes partition p from us: refused at once, but not let go yet...
        let ring = Arc::new(Ring::new([addr(0), addr(1)]));
        let p = (0..PARTITIONS)
            .find(|&q| ring.owner(q) == Some(addr(1).as_str()))
            .unwrap();
        let actions = h.own.ring_changed(ring, Instant::now());
        h.table.sync(&h.own);
        assert!(matches!(&actions[0], Action::Release(ps) if ps.contains(&p)));
        let user = a_user_of(p);
        assert!(h.table.check(user).is_err());
        assert!(
            !h.table.is_released(p),
            "a handover must wait for the release"
        );
        // ...until the driver has let its users go.
        h.table.let_go(&[p]);
        assert!(h.table.is_released(p));
        // Another sync keeps it released.
        h.table.sync(&h.own);
        assert!(h.table.is_released(p));
    }

    #[tokio::test(start_paused = true)]
    async fn a_previous_owner_that_never_answers_costs_one_grace() {
        Harness::settled(vec![0, 1])
            .await
            .run(&[
                Members(vec![1]),
                Members(vec![0, 1]),
                ExpectAwaiting(vec![1]),
                Wait(GRACE - Duration::from_millis(1)),
                ExpectLoads(0),
                Wait(Duration::from_millis(1)),
                ExpectAwaiting(vec![]),
                ExpectMine(State::Loading),
                LoadDoneAndOwned,
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_leaves_and_we_load_its_share_without_waiting() {
        Harness::settled(vec![0, 1, 2])
            .await
            .run(&[
                // Shard 2 was killed: its partitions have no live previous owner.
                Members(vec![0, 1]),
                ExpectLoads(1),
                LoadDone,
                ExpectMine(State::Owned),
                ExpectNone(State::Pending),
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_leave_and_rejoin_ignores_the_stale_load() {
        Harness::new()
            .run(&[
                Members(vec![0, 1, 2]),
                Wait(GRACE * 2),
                LoadDone,
                // 2 leaves: we start loading its share (load A)...
                Members(vec![0, 1]),
                ExpectLoads(1),
                // ...and it comes back before A finishes: its share is released...
                Members(vec![0, 1, 2]),
                ExpectReleasedAtLeast(1),
                ExpectMine(State::Owned),
                // ...and A's late result makes none of it ours again.
                LoadDoneAndOwned,
                ExpectLoads(0),
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn two_ring_changes_during_one_load() {
        Harness::new()
            .run(&[
                Members(vec![0]),
                Wait(GRACE),
                ExpectLoads(1),
                // While loading everything, two more shards join, one after the other.
                Members(vec![0, 1]),
                Members(vec![0, 1, 2]),
                ExpectReleasedAtLeast(PARTITIONS as usize / 2),
                ExpectMine(State::Loading),
                // Only what is still ours is owned.
                LoadDoneAndOwned,
            ])
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_load_retries_with_backoff_and_still_follows_the_ring() {
        Harness::new()
            .run(&[
                Members(vec![0]),
                Wait(GRACE),
                LoadFailed,
                ExpectMine(State::Pending),
                ExpectLoads(0),
                Wait(Duration::from_millis(99)),
                ExpectLoads(0),
                Wait(Duration::from_millis(1)),
                ExpectLoads(1),
                LoadFailed,
                // The backoff doubled.
                Wait(Duration::from_millis(199)),
                ExpectLoads(0),
                // A ring change is taken while the store fails.
                Members(vec![0, 1]),
                ExpectReleasedAtLeast(PARTITIONS as usize / 3),
                Wait(Duration::from_millis(1)),
                ExpectLoads(1),
                LoadDone,
                ExpectMine(State::Owned),
            ])
            .await;
    }

    /// A shard that comes back from a stall on the same ring (it never saw the ring move away
    /// and back, while interim owners fenced its partitions) and finds them fenced releases what
    /// it holds of them and gains them again from their interim owners (the owners in the ring
    /// without it): loaded once handed over, or after the grace; the rest stays owned, and a
    /// fence on what it does not own changes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_partition_fenced_by_another_shard_is_released_and_gained_again() {
        let mut h = Harness::settled(vec![0, 1, 2]).await;
        let mine = h.ring.partitions_of(&addr(ME));
        let interim = Ring::new([addr(1), addr(2)]);
        let from = interim_owners(&interim, &mine[..40]);
        h.run(&[
            ExpectReleasedAtLeast(0),
            Fenced(40),
            ExpectReleased(40),
            ExpectLoads(0),
            ExpectAwaiting(from.clone()),
        ])
        .await;
        assert_eq!(h.own.count(State::Pending), 40);
        assert_eq!(h.own.count(State::Owned), mine.len() - 40);
        let first = from[0];
        let other = 3 - first;
        let asked = (h.asked_of(first), h.asked_of(other));
        // An older shard's answer (no fences) hands nothing taken back after a stall over, and
        // sends nobody else a poll.
        h.run(&[HandedOverBy(first, None), ExpectLoads(0)]).await;
        assert_eq!((h.asked_of(first), h.asked_of(other)), asked);
        h.run(&[
            // The guessed interim owner never held the fence found (another shard joined
            // meanwhile and took them): its answer hands nothing over; all still wait.
            HandedOverBy(first, Some(0)),
            HandedOverBy(first, Some(FOUND - 1)),
            ExpectLoads(0),
            ExpectAwaiting(from.clone()),
        ])
        .await;
        assert_eq!(h.own.count(State::Pending), 40);
        // It held them under that fence: they load now.
        h.run(&[HandedOverBy(first, Some(FOUND)), ExpectLoads(1)])
            .await;
        assert!(
            h.loads[0]
                .1
                .iter()
                .all(|p| interim.owner(*p) == Some(addr(first).as_str())),
            "loads what shard {first} handed over"
        );
        h.run(&[
            // A fence found on what is loading or waiting changes nothing.
            Fenced(40),
            ExpectReleased(0),
            ExpectLoads(1),
            LoadDone,
            // The other interim owner never answers: the grace bounds the wait.
            Wait(GRACE),
            ExpectLoads(if from.len() > 1 { 1 } else { 0 }),
            ExpectReleased(0),
        ])
        .await;
        if from.len() > 1 {
            h.run(&[LoadDone]).await;
        }
        h.run(&[
            ExpectMine(State::Owned),
            Drain,
            ExpectReleasedAtLeast(1),
            // Draining: a fence found changes nothing.
            Fenced(3),
            ExpectReleased(0),
            ExpectLoads(0),
            ExpectMine(State::Released),
        ])
        .await;
    }

    /// The guessed interim owner of a fenced partition answers that it let go of it, but never
    /// held it: the partition waits for the whole grace, as for a previous owner that never
    /// answers, and is not fenced over its real holder at once.
    #[tokio::test(start_paused = true)]
    async fn a_handover_from_a_shard_that_never_held_the_fence_found_waits_for_the_grace() {
        let mut h = Harness::settled(vec![0, 1]).await;
        h.run(&[
            ExpectReleasedAtLeast(0),
            Fenced(10),
            ExpectReleased(10),
            ExpectAwaiting(vec![1]),
            Wait(GRACE / 2),
            HandedOverBy(1, Some(0)),
            ExpectLoads(0),
            ExpectAwaiting(vec![1]),
            Wait(GRACE / 2 - Duration::from_millis(1)),
            ExpectLoads(0),
            Wait(Duration::from_millis(1)),
            ExpectLoads(1),
            ExpectAwaiting(vec![]),
            LoadDoneAndOwned,
        ])
        .await;
    }

    /// A fenced partition still waiting when the ring changes waits for its owner in the new
    /// ring without this shard (the shard that joined may be its holder), and for the newest
    /// fence the store shows: an answer from a shard that held an earlier one does not count.
    #[tokio::test(start_paused = true)]
    async fn a_fenced_partition_waits_for_the_holder_in_the_newest_ring() {
        let mut h = Harness::settled(vec![0, 1]).await;
        let fenced: Vec<u32> = h.ring.partitions_of(&addr(ME))[..40].to_vec();
        h.run(&[
            ExpectReleasedAtLeast(0),
            Fenced(40),
            ExpectReleased(40),
            ExpectAwaiting(vec![1]),
            Members(vec![0, 1, 2]),
        ])
        .await;
        // Still mine: waiting for their owner in the ring of 1 and 2.
        let mine = h.ring.partitions_of(&addr(ME));
        let still: Vec<u32> = fenced.into_iter().filter(|p| mine.contains(p)).collect();
        let from = interim_owners(&Ring::new([addr(1), addr(2)]), &still);
        assert_eq!(from, vec![1, 2], "the 40 spread over both");
        h.run(&[
            ExpectAwaiting(from),
            // Shard 2 fenced them once more since.
            StoreShows(FOUND + 1),
            HandedOverBy(2, Some(FOUND)),
            ExpectLoads(0),
            HandedOverBy(2, Some(FOUND + 1)),
            ExpectLoads(1),
            ExpectAwaiting(vec![1]),
        ])
        .await;
    }

    /// A gained partition's previous owner let it go without having held the store's fence (it
    /// never loaded it: the ring moved on while it waited, or a stall hid the move): it has none
    /// of the devices' times, so every member is asked from then on, and the one that held the
    /// fence hands it over. An older shard's answer (no fences) hands over as before.
    #[tokio::test(start_paused = true)]
    async fn a_previous_owner_that_never_held_the_fence_sends_the_poll_to_every_member() {
        let mut h = Harness::joining().await;
        let mine = h.ring.partitions_of(&addr(ME));
        let from_1 = h.asked_of(1);
        assert!(
            from_1 > 0 && from_1 < mine.len(),
            "{from_1} of {}",
            mine.len()
        );
        h.run(&[
            ExpectAwaiting(vec![1, 2]),
            StoreShows(FOUND),
            // Shard 1 let its share go under an older fence: shard 2 is asked for it too.
            HandedOverBy(1, Some(FOUND - 1)),
            ExpectLoads(0),
        ])
        .await;
        assert_eq!(h.asked_of(1), from_1, "still asked of shard 1");
        assert_eq!(
            h.asked_of(2),
            mine.len(),
            "and of shard 2, with its own share"
        );
        // Shard 2 held the fence: everything loads.
        h.run(&[
            HandedOverBy(2, Some(FOUND)),
            ExpectLoads(1),
            ExpectAwaiting(vec![]),
            LoadDoneAndOwned,
        ])
        .await;
    }

    /// A shard is starting (no member yet) during its start grace only while its ring has
    /// other members, who serve its partitions meanwhile: alone (a cluster forming from ready or
    /// registered shards), it is not held back, or the first to join would take everything.
    #[tokio::test(start_paused = true)]
    async fn a_shard_is_starting_for_its_grace_only_beside_other_members() {
        let mut h = Harness::new();
        assert!(!h.own.starting(), "no ring yet");
        h.run(&[Members(vec![ME])]).await;
        assert!(!h.own.starting(), "alone");
        h.run(&[Members(vec![ME, 1])]).await;
        assert!(h.own.starting());
        h.table.sync(&h.own);
        assert!(h.table.starting());
        h.run(&[Wait(GRACE)]).await;
        assert!(!h.own.starting(), "the grace is over");
        h.table.sync(&h.own);
        assert!(!h.table.starting());
    }

    /// No member holds a gained partition's fence (its holder was killed, or restarted with
    /// nothing loaded, before the ring moved): once every other member has let it go without
    /// the fence, it loads at once, without the rest of the grace.
    #[tokio::test(start_paused = true)]
    async fn a_partition_every_member_let_go_without_its_fence_loads_at_once() {
        let mut h = Harness::joining().await;
        h.run(&[
            StoreShows(FOUND),
            // Shard 1's share: declined by 1, now asked of 2 as well.
            HandedOverBy(1, Some(0)),
            ExpectLoads(0),
            ExpectAwaiting(vec![1, 2]),
            // Shard 2 declines its share and shard 1's: shard 1's loads.
            HandedOverBy(2, Some(FOUND - 1)),
            ExpectLoads(1),
            // Shard 1 declines shard 2's share: it loads too.
            HandedOverBy(1, Some(0)),
            ExpectLoads(2),
            ExpectAwaiting(vec![]),
            LoadDone,
            LoadDoneAndOwned,
        ])
        .await;
    }

    /// During a rolling upgrade an older shard answers without fences: it hands a partition
    /// gained on a ring change over as before, whatever fence the store shows.
    #[tokio::test(start_paused = true)]
    async fn an_older_shard_hands_over_as_before() {
        let mut h = Harness::joining().await;
        h.run(&[
            StoreShows(FOUND),
            HandedOverBy(1, None),
            ExpectLoads(1),
            ExpectAwaiting(vec![2]),
        ])
        .await;
    }

    /// A lone shard (nobody held its partitions meanwhile, as far as its ring knows) loads a
    /// partition found fenced again at once.
    #[tokio::test(start_paused = true)]
    async fn a_lone_shard_loads_a_fenced_partition_again_at_once() {
        let mut h = Harness::settled(vec![0]).await;
        h.run(&[
            Fenced(2),
            ExpectReleasedAtLeast(2),
            ExpectLoads(1),
            LoadDoneAndOwned,
        ])
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_releases_everything_and_takes_nothing_more() {
        Harness::settled(vec![0, 1])
            .await
            .run(&[
                Drain,
                ExpectReleasedAtLeast(PARTITIONS as usize / 3),
                ExpectNone(State::Owned),
                Members(vec![0]),
                Wait(GRACE * 3),
                ExpectLoads(0),
                ExpectNone(State::Owned),
                ExpectNone(State::Loading),
            ])
            .await;
        let mut h = Harness::new();
        let actions = h.own.drain();
        h.take(actions);
        assert!(!h.table.serving());
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_during_a_load_drops_its_result() {
        Harness::new()
            .run(&[
                Members(vec![0]),
                Wait(GRACE),
                ExpectLoads(1),
                Drain,
                LoadDone,
                ExpectNone(State::Owned),
            ])
            .await;
    }
}
