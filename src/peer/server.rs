//! The shard's side of the transport: the gRPC service that serves gateways for the users this
//! shard owns, and the driver of its ownership state machine ([`crate::ownership`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response};
use tracing::Instrument;

use super::client::Clients;
use super::{extract_trace, item_span, Timed};
use crate::error::Error;
use crate::metrics::{Direction, HandoverPoll, Metrics};
use crate::ownership::{Action, Ownership, Table};
use crate::presence::{validate_device_id, validate_user_id, Seen, UserId, Viewer};
use crate::proto::{self, v1};
use crate::push::fanout::{to_wire, Fanout, Opened, StreamItem};
use crate::push::EventSink;
use crate::ring::{partition_of, Ring, PARTITIONS};
use crate::service::{Closed, Presence};
use crate::shard::Shard;
use crate::store::SubscriptionMode;

/// Most users in one gRPC batch call.
const MAX_BATCH: usize = 100_000;
/// Most onlines in one `OnlineBatch` call (each a write in flight at once; a gateway sends
/// 512 at most).
const MAX_ONLINES: usize = 4096;
/// Most reads in one `StatusBatch` call (each may read the store; a gateway sends 512 at most).
const MAX_READS: usize = 1024;

/// Refuses a batch of more than `max` items (`noun` names them in the error).
fn at_most<T>(items: &[T], max: usize, noun: &str) -> Result<(), Error> {
    if items.len() > max {
        return Err(Error::BadRequest(format!("at most {max} {noun} per call")));
    }
    Ok(())
}

/// The results of a batch answered item by item (`OnlineBatch`, `StatusBatch`).
type ItemResults =
    Pin<Box<dyn futures::Stream<Item = Result<v1::ItemResult, tonic::Status>> + Send>>;

/// Runs every item of a batch at once (one that waits for the store holds up none of the
/// others), each inside the call's span, or in its own when it came with a trace; each result
/// goes out as soon as it is done: the user's status, or the error (its HTTP code and what its
/// own call's status would carry).
fn item_results<T, Fut>(
    items: Vec<T>,
    method: &'static str,
    trace: impl Fn(&T) -> &std::collections::HashMap<String, String>,
    run: impl Fn(T) -> Fut,
) -> ItemResults
where
    Fut: std::future::Future<Output = Result<crate::presence::StatusView, Error>> + Send + 'static,
{
    let span = tracing::Span::current();
    let results: futures::stream::FuturesUnordered<_> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let span = item_span(trace(&item), method, &span);
            let res = run(item);
            async move {
                let (code, status, error) = match res.await {
                    Ok(view) => (0, Some(view.into()), None),
                    Err(e) => (e.status().as_u16() as u32, None, Some(proto::item_error(e))),
                };
                Ok(v1::ItemResult {
                    index: i as u32,
                    code,
                    status,
                    error,
                })
            }
            .instrument(span)
        })
        .collect();
    Box::pin(results)
}

/// How late a wake-up of the stall watch must be to count as a stall, at most: the process was
/// stopped or starved that long. Peers drop a shard after two failed health checks (two
/// intervals at least), so a third of the handoff grace (3 intervals by default), when shorter,
/// is the threshold instead. The watch wakes twice as often.
const STALL: Duration = Duration::from_secs(1);
/// Longest wait between two tries at checking the fences after a stall, when they fail.
const STALL_CHECK_BACKOFF: Duration = Duration::from_secs(5);

/// What woke the ownership driver.
#[derive(PartialEq, Eq)]
enum Wake {
    Ring,
    Fenced,
    Time,
}

/// How often a shard pings each gateway's event stream.
pub const PING: Duration = Duration::from_secs(2);

/// How often a shard asks the previous owners of partitions it gained whether they let go.
const HANDOVER_POLL: Duration = Duration::from_millis(200);
/// Longest a handover poll may take (then the next poll, and the grace, bound the wait).
const HANDOVER_TIMEOUT: Duration = Duration::from_millis(500);

/// Drives this shard's [`Ownership`]: feeds it ring changes and the passing of time, carries out
/// its actions on the [`Shard`] (release users, load partitions from the store) and mirrors its
/// view into the [`Table`] that requests read.
pub struct Handoff {
    me: String,
    /// `PRESENCE_HANDOFF_GRACE`: the stall watch's threshold follows it.
    grace: Duration,
    /// When the machine started: its start grace ends a grace later.
    started: tokio::time::Instant,
    machine: tokio::sync::Mutex<Ownership>,
    table: Arc<Table>,
    /// The gateways' interest: partitions that become owned catch them up.
    fanout: Arc<Fanout>,
    /// Stops the ring-following loop (a drain takes over).
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    /// To ask previous owners for a handover.
    clients: Arc<Clients>,
    /// What previous owners handed over, by partition, until the partition loads (or goes).
    handed: parking_lot::Mutex<HashMap<u32, Vec<Seen>>>,
}

impl Handoff {
    /// Drives the ownership of the shard whose table is `table`.
    pub fn new(
        me: String,
        grace: Duration,
        metrics: Arc<Metrics>,
        table: Arc<Table>,
        fanout: Arc<Fanout>,
        clients: Arc<Clients>,
    ) -> Arc<Handoff> {
        let started = tokio::time::Instant::now();
        let machine = Ownership::new(me.clone(), grace, started);
        // Starting, from now: the health check and readiness say so before the driver runs.
        table.sync(&machine);
        Arc::new(Handoff {
            me,
            grace,
            started,
            machine: tokio::sync::Mutex::new(machine),
            table,
            fanout,
            stop: CancellationToken::new(),
            metrics,
            clients,
            handed: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// This shard's address in the ring.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// When the start grace ends (the shard takes partitions from then on).
    pub fn start_grace_over(&self) -> tokio::time::Instant {
        self.started + self.grace
    }

    /// What requests read: which partitions are served.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Follows the ring until `cancel` (or a drain): releases partitions it lost, loads those it
    /// gained, retries failed loads.
    pub async fn run(
        self: Arc<Self>,
        shard: Arc<Shard>,
        mut ring: watch::Receiver<Arc<Ring>>,
        cancel: CancellationToken,
    ) {
        tokio::spawn(self.clone().watch_stalls(shard.clone(), cancel.clone()));
        let mut machine = self.machine.lock().await;
        let mut actions = machine.ring_changed(ring.borrow_and_update().clone(), Instant::now());
        loop {
            if !self.act(&mut machine, &shard, actions).await {
                return;
            }
            let mut next = machine.next_deadline();
            let poll = !machine.awaiting_handover().is_empty();
            if poll {
                let at = Instant::now() + HANDOVER_POLL;
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            drop(machine);
            let wake = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.stop.cancelled() => return,
                r = ring.changed() => if r.is_err() { return } else { Wake::Ring },
                _ = shard.fence_lost() => Wake::Fenced,
                _ = wake => Wake::Time,
            };
            machine = self.machine.lock().await;
            actions = if event == Wake::Ring {
                machine.ring_changed(ring.borrow_and_update().clone(), Instant::now())
            } else if event == Wake::Fenced {
                let fenced = shard.take_fenced();
                let actions = machine.fenced(&fenced, Instant::now());
                if let Some(Action::Release(lost)) = actions.first() {
                    self.metrics.ring.fenced.inc_by(lost.len() as u64);
                    tracing::warn!(
                        partitions = lost.len(),
                        "another shard fenced partitions this one held (it missed a ring change); taking them back from it"
                    );
                }
                actions
            } else {
                self.poll_handovers(&mut machine, &shard).await;
                machine.tick(Instant::now())
            };
        }
    }

    /// Watches for stalls of this process (SIGSTOP, a paused VM, starvation): a peer may have
    /// dropped this shard from its ring and taken its partitions over meanwhile, and the ring
    /// may have come back to what this shard still follows, so it never saw the move. After a
    /// stall, and for twice the grace after it (a peer's failure detection and its grace may end
    /// after this shard runs again), the fences of the partitions it serves are compared with
    /// the store's on every tick: those another shard fenced are taken back from it
    /// ([`Ownership::fenced`]). The overdue timers of the stall fire first; their writes are
    /// refused, which changes nothing. A check that fails is counted and tried again with a
    /// backoff (a tick doubling to 5 s) until one succeeds after the window; a check that itself
    /// took longer than a stall opens the window again (its answer may predate the stall).
    async fn watch_stalls(self: Arc<Self>, shard: Arc<Shard>, cancel: CancellationToken) {
        let stall = STALL.min(self.grace / 3).max(Duration::from_millis(20));
        let tick = stall / 2;
        let window = self.grace * 2;
        let mut last = Instant::now();
        // While checking: until when, and when to try next (after a failure).
        let mut until: Option<Instant> = None;
        let (mut next_try, mut backoff) = (last, tick);
        let mut found = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let now = Instant::now();
            let late = now.duration_since(last).saturating_sub(tick);
            last = now;
            if late > stall {
                self.metrics.ring.stalls.inc();
                tracing::warn!(late = ?late, "this process stalled; checking the fences of its partitions");
                until = Some(now + window);
                next_try = now;
            }
            let Some(end) = until else { continue };
            if now < next_try {
                continue;
            }
            let owned = self.table.owned_partitions();
            match shard.check_fences(&owned).await {
                Ok(n) => {
                    found += n;
                    backoff = tick;
                    let done = Instant::now();
                    if done.duration_since(now) > stall {
                        until = Some(done + window);
                    } else if done >= end {
                        tracing::info!(
                            partitions = owned.len(),
                            fenced = found,
                            "fences checked after a stall"
                        );
                        until = None;
                        found = 0;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "checking fences after a stall failed");
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(STALL_CHECK_BACKOFF);
                }
            }
            last = Instant::now();
        }
    }

    /// Carries out `actions` and whatever they lead to. False when stopped.
    async fn act(&self, machine: &mut Ownership, shard: &Shard, actions: Vec<Action>) -> bool {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        self.table.sync(machine);
        self.metrics
            .ring
            .owned_partitions
            .set(self.table.owned_count() as i64);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Release(partitions) => self.release(shard, &partitions).await,
                Action::Load { id, partitions } => {
                    let started = std::time::Instant::now();
                    let seen: Vec<Seen> = {
                        let mut handed = self.handed.lock();
                        partitions
                            .iter()
                            .filter_map(|p| handed.remove(p))
                            .flatten()
                            .collect()
                    };
                    let result = tokio::select! {
                        _ = self.stop.cancelled() => return false,
                        r = shard.recover_handed(&partitions, &seen) => r,
                    };
                    match result {
                        Ok(users) => {
                            let owned = machine.load_done(id);
                            self.observe(Direction::Gained, started, owned.len());
                            tracing::info!(partitions = owned.len(), users, took = ?started.elapsed(), epoch = machine.ring().epoch(), "took over partitions");
                            self.table.sync(machine);
                            self.catch_up(shard, &owned).await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, partitions = partitions.len(), "loading partitions failed, retrying");
                            machine.load_failed(id, Instant::now());
                        }
                    }
                    queue.extend(machine.tick(Instant::now()));
                }
            }
            self.table.sync(machine);
            self.metrics
                .ring
                .owned_partitions
                .set(self.table.owned_count() as i64);
        }
        true
    }

    /// Partitions just became owned: every gateway interested in one of their users gets its
    /// current state, whatever events it missed while the partition moved.
    async fn catch_up(&self, shard: &Shard, partitions: &[u32]) {
        let partitions: std::collections::HashSet<u32> = partitions.iter().copied().collect();
        let users = self.fanout.interested_in(&partitions);
        for chunk in users.chunks(1000) {
            let Ok(snapshots) = shard.snapshots(chunk).await else {
                tracing::warn!(users = chunk.len(), "catch-up after a handoff failed");
                continue;
            };
            for ev in snapshots {
                self.fanout.publish(ev);
            }
        }
    }

    /// Asks each previous owner still awaited whether it has let go of the partitions this
    /// shard gained from it; what it has let go loads now, with the devices' times it hands
    /// over. A previous owner that does not answer is asked again; the grace bounds the wait.
    /// A shard that says which fence it held each partition under hands over only those it
    /// held under the store's fence, read here ([`Ownership::takes_handover`]): one that let a
    /// partition go without having held it (it never loaded it, or it was a wrong guess, as
    /// after a stall) has none of its devices' times, and every member is asked for it next.
    async fn poll_handovers(&self, machine: &mut Ownership, shard: &Shard) {
        let awaited = machine.awaiting_handover();
        if awaited.is_empty() {
            return;
        }
        let asks = awaited.into_iter().map(|(owner, partitions)| async move {
            let reply = async {
                let mut client = self.clients.get(&owner)?;
                let req = v1::HandoverRequest {
                    partitions: partitions.clone(),
                };
                match tokio::time::timeout(HANDOVER_TIMEOUT, client.handover(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(status)) => Err(Error::ShardUnavailable(status.message().to_owned())),
                    Err(_) => Err(Error::ShardUnavailable("handover timed out".into())),
                }
            }
            .await;
            (owner, partitions, reply)
        });
        let replies = futures::future::join_all(asks).await;
        let mut let_go: Vec<u32> = replies
            .iter()
            .filter_map(|(_, _, r)| r.as_ref().ok())
            .filter(|r| r.fences_sent)
            .flat_map(|r| r.released.iter().copied())
            .filter(|&p| machine.awaits_handover(p))
            .collect();
        let_go.sort_unstable();
        let_go.dedup();
        let mut unread = std::collections::HashSet::new();
        if !let_go.is_empty() {
            // Under the ownership lock, as the polls: bounded like one.
            match tokio::time::timeout(HANDOVER_TIMEOUT, shard.stored_fences(&let_go)).await {
                Ok(Ok(stored)) => {
                    for (&p, f) in let_go.iter().zip(stored) {
                        machine.fence_found(p, f);
                    }
                }
                // Not taken this time (the poll counts as failed): asked again at the next poll,
                // the grace at most.
                Ok(Err(_)) | Err(_) => unread.extend(let_go),
            }
        }
        let now = Instant::now();
        for (owner, asked, reply) in replies {
            let result = match reply {
                Err(e) => {
                    tracing::debug!(owner = %owner, error = %e, "handover poll failed");
                    HandoverPoll::Failed
                }
                Ok(r) => {
                    let asked: std::collections::HashSet<u32> = asked.into_iter().collect();
                    let failed = r.released.iter().any(|p| unread.contains(p));
                    // What it let go of, with the fence it held each under (an older shard
                    // does not say).
                    let said: Vec<(u32, Option<u64>)> = r
                        .released
                        .into_iter()
                        .filter(|p| asked.contains(p) && !unread.contains(p))
                        .map(|p| {
                            let held = r.fences.get(&p).copied().unwrap_or(0);
                            (p, r.fences_sent.then_some(held))
                        })
                        .collect();
                    let taken: std::collections::HashSet<u32> = said
                        .iter()
                        .filter(|&&(p, held)| machine.takes_handover(p, held))
                        .map(|&(p, _)| p)
                        .collect();
                    if taken.len() < said.len() {
                        tracing::debug!(
                            owner = %owner,
                            partitions = said.len() - taken.len(),
                            fences_sent = r.fences_sent,
                            "a shard let go of partitions without having held the store's fence (or without saying: an older shard); asking every member, the grace at most"
                        );
                    }
                    let mut handed = self.handed.lock();
                    for d in r.devices {
                        let seen = Seen::from(d);
                        let p = partition_of(seen.user);
                        if taken.contains(&p) {
                            handed.entry(p).or_default().push(seen);
                        }
                    }
                    drop(handed);
                    machine.handed_over(&owner, &said, now);
                    if !taken.is_empty() {
                        tracing::info!(owner = %owner, partitions = taken.len(), "previous owner handed over");
                        HandoverPoll::Released
                    } else if failed {
                        HandoverPoll::Failed
                    } else if !said.is_empty() {
                        HandoverPoll::Declined
                    } else {
                        HandoverPoll::Waiting
                    }
                }
            };
            self.metrics.ring.handover_polls.get(result).inc();
        }
    }

    async fn release(&self, shard: &Shard, partitions: &[u32]) {
        let mut lost = vec![false; PARTITIONS as usize];
        for &p in partitions {
            lost[p as usize] = true;
            self.handed.lock().remove(&p);
        }
        let started = std::time::Instant::now();
        let users = shard.release(&lost).await;
        self.table.let_go(partitions);
        self.observe(Direction::Released, started, partitions.len());
        tracing::info!(partitions = partitions.len(), users, took = ?started.elapsed(), "released partitions");
    }

    fn observe(&self, direction: Direction, started: std::time::Instant, partitions: usize) {
        self.metrics
            .ring
            .handoffs
            .get(direction)
            .inc_by(partitions as u64);
        self.metrics
            .ring
            .handoff_duration
            .get(direction)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Graceful shutdown: report not serving, refuse everything, let go of every user.
    pub async fn drain(&self, shard: &Shard) {
        self.table.stop_serving();
        self.stop.cancel();
        let mut machine = self.machine.lock().await;
        let actions = machine.drain();
        self.act(&mut machine, shard, actions).await;
        self.fanout.close_all();
        self.metrics.ring.owned_partitions.set(0);
        tracing::info!("handed off every partition");
    }
}

/// The gRPC service of a shard.
pub struct ShardService {
    pub shard: Arc<Shard>,
    pub own: Arc<Table>,
    pub metrics: Arc<Metrics>,
    pub fanout: Arc<Fanout>,
    /// Cancelled when the gRPC server shuts down: open heartbeat streams end, so that the
    /// server's graceful shutdown does not wait on them.
    pub stop: CancellationToken,
}

type Reply<T> = Result<Response<T>, tonic::Status>;

/// The viewer of a read, from the wire (0: the truth).
fn viewer_of(n: u64) -> Result<Viewer, Error> {
    match Viewer::from_wire(n) {
        Viewer::User(u) => Ok(Viewer::User(validate_user_id(u)?)),
        truth => Ok(truth),
    }
}

/// A valid user id that this shard owns.
fn owned(own: &Table, user: u64) -> Result<UserId, Error> {
    let user = validate_user_id(user)?;
    own.check(user)?;
    Ok(user)
}

/// Heartbeats of users this shard owns, all at once (one that waits for the store holds up
/// none of the others): a code per heartbeat, 0 or the HTTP status of its error.
async fn beat_batch(
    shard: &Shard,
    own: &Table,
    r: v1::HeartbeatBatchRequest,
) -> Result<v1::HeartbeatBatchReply, Error> {
    at_most(&r.heartbeats, MAX_BATCH, "heartbeats")?;
    // Items run inside the call's span (if any); one that came with a trace gets its own.
    let inside = tracing::Span::none();
    let beats = r.heartbeats.into_iter().map(|h| {
        let span = item_span(&h.trace, "HeartbeatBatch", &inside);
        async move {
            let res = async {
                let user = owned(own, h.user_id)?;
                let device = validate_device_id(&h.device_id)?;
                shard.heartbeat(user, &device, h.active).await
            }
            .await;
            match res {
                Ok(()) => 0,
                Err(e) => e.status().as_u16() as u32,
            }
        }
        .instrument(span)
    });
    let codes = futures::future::join_all(beats).await;
    Ok(v1::HeartbeatBatchReply { codes })
}

impl ShardService {
    fn timed(&self, method: &'static str) -> Timed {
        Timed::new(self.metrics.clone(), "server", method)
    }

    fn user(&self, user: u64) -> Result<UserId, Error> {
        owned(&self.own, user)
    }

    /// One call: counted and timed, run in a span that continues the caller's trace.
    async fn serve<Q, T, Fut>(
        &self,
        method: &'static str,
        req: Request<Q>,
        f: impl FnOnce(Q) -> Fut,
    ) -> Reply<T>
    where
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let t = self.timed(method);
        let span = extract_trace(&req, method);
        t.done(f(req.into_inner()).instrument(span).await)
    }

    /// Checks a batch of users: size, ids, ownership.
    fn users(&self, ids: &[u64]) -> Result<(), Error> {
        at_most(ids, MAX_BATCH, "users")?;
        ids.iter().try_for_each(|&u| self.user(u).map(|_| ()))
    }
}

#[tonic::async_trait]
impl v1::presence_shard_server::PresenceShard for ShardService {
    async fn online(&self, req: Request<v1::OnlineRequest>) -> Reply<v1::StatusReply> {
        self.serve("Online", req, |r| async move {
            let user = self.user(r.user_id)?;
            let device = validate_device_id(&r.device_id)?;
            let platform = proto::platform_from_i32(r.platform)?;
            let view = self
                .shard
                .online_session(user, &device, platform, r.session)
                .await?;
            Ok(view.into())
        })
        .await
    }

    type OnlineBatchStream = ItemResults;

    /// Onlines of users this shard owns, each checked and done as a lone `Online` is, all at
    /// once; each result goes out as soon as it is done.
    async fn online_batch(
        &self,
        req: Request<v1::OnlineBatchRequest>,
    ) -> Reply<Self::OnlineBatchStream> {
        self.serve("OnlineBatch", req, |r| async move {
            at_most(&r.onlines, MAX_ONLINES, "onlines")?;
            let run = |o: v1::OnlineRequest| {
                let (shard, own) = (self.shard.clone(), self.own.clone());
                async move {
                    let user = owned(&own, o.user_id)?;
                    let device = validate_device_id(&o.device_id)?;
                    let platform = proto::platform_from_i32(o.platform)?;
                    shard
                        .online_session(user, &device, platform, o.session)
                        .await
                }
            };
            Ok(item_results(r.onlines, "OnlineBatch", |o| &o.trace, run))
        })
        .await
    }

    async fn offline(&self, req: Request<v1::DeviceRequest>) -> Reply<v1::Empty> {
        self.serve("Offline", req, |r| async move {
            let user = self.user(r.user_id)?;
            let device = validate_device_id(&r.device_id)?;
            let within = (r.unless_seen_within_ms > 0)
                .then(|| std::time::Duration::from_millis(r.unless_seen_within_ms));
            // Zero fields (a plain offline) make a `Closed` that spares nothing, as `None` does.
            let closed = Closed {
                session: r.session,
                seen_within: within,
            };
            self.shard.offline(user, &device, Some(closed)).await?;
            Ok(v1::Empty {})
        })
        .await
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Reply<v1::Empty> {
        self.serve("Heartbeat", req, |r| async move {
            let user = self.user(r.user_id)?;
            let device = validate_device_id(&r.device_id)?;
            self.shard.heartbeat(user, &device, r.active).await?;
            Ok(v1::Empty {})
        })
        .await
    }

    async fn heartbeat_batch(
        &self,
        req: Request<v1::HeartbeatBatchRequest>,
    ) -> Reply<v1::HeartbeatBatchReply> {
        self.serve("HeartbeatBatch", req, |r| {
            beat_batch(&self.shard, &self.own, r)
        })
        .await
    }

    type HeartbeatStreamStream =
        Pin<Box<dyn futures::Stream<Item = Result<v1::HeartbeatBatchReply, tonic::Status>> + Send>>;

    /// Batches on one stream, answered one at a time and in order. It ends when the gateway
    /// closes it, on the first bad batch (with that error), or when this shard shuts down.
    async fn heartbeat_stream(
        &self,
        req: Request<tonic::Streaming<v1::HeartbeatBatchRequest>>,
    ) -> Reply<Self::HeartbeatStreamStream> {
        struct Open {
            inbound: tonic::Streaming<v1::HeartbeatBatchRequest>,
            shard: Arc<Shard>,
            own: Arc<Table>,
            metrics: Arc<Metrics>,
            stop: CancellationToken,
            failed: bool,
        }
        let open = Open {
            inbound: req.into_inner(),
            shard: self.shard.clone(),
            own: self.own.clone(),
            metrics: self.metrics.clone(),
            stop: self.stop.clone(),
            failed: false,
        };
        let replies = futures::stream::unfold(open, |mut o| async move {
            if o.failed {
                return None;
            }
            let msg = tokio::select! {
                _ = o.stop.cancelled() => return None,
                m = o.inbound.message() => m,
            };
            let r = match msg {
                Ok(Some(r)) => r,
                _ => return None,
            };
            let t = Timed::new(o.metrics.clone(), "server", "HeartbeatBatch");
            let reply = t
                .done(beat_batch(&o.shard, &o.own, r).await)
                .map(Response::into_inner);
            o.failed = reply.is_err();
            Some((reply, o))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    /// A shard that gained partitions from this one asks which it has let go.
    async fn handover(&self, req: Request<v1::HandoverRequest>) -> Reply<v1::HandoverReply> {
        self.serve("Handover", req, |r| async move {
            if r.partitions.len() > PARTITIONS as usize
                || r.partitions.iter().any(|&p| p >= PARTITIONS)
            {
                return Err(Error::BadRequest("partitions out of range".into()));
            }
            // The fences first: one read after a partition is seen released could be a load's
            // that started since.
            let held: HashMap<u32, u64> = r
                .partitions
                .iter()
                .map(|&p| (p, self.shard.fence_held(p)))
                .collect();
            let released: Vec<u32> = r
                .partitions
                .into_iter()
                .filter(|&p| self.own.is_released(p))
                .collect();
            let devices = self
                .shard
                .parted(&released)
                .into_iter()
                .map(v1::SeenDevice::from)
                .collect();
            let fences = released
                .iter()
                .filter_map(|p| held.get(p).filter(|&&f| f != 0).map(|&f| (*p, f)))
                .collect();
            Ok(v1::HandoverReply {
                released,
                devices,
                fences,
                fences_sent: true,
            })
        })
        .await
    }

    async fn status(&self, req: Request<v1::UserRequest>) -> Reply<v1::StatusReply> {
        self.serve("Status", req, |r| async move {
            let user = self.user(r.user_id)?;
            let viewer = viewer_of(r.viewer)?;
            Ok(self.shard.status(user, viewer).await?.into())
        })
        .await
    }

    type StatusBatchStream = ItemResults;

    /// Status reads of users this shard owns, each checked and done as a lone `Status` is (as
    /// its own viewer sees the user), all at once; each result goes out as soon as it is done.
    async fn status_batch(
        &self,
        req: Request<v1::StatusBatchRequest>,
    ) -> Reply<Self::StatusBatchStream> {
        self.serve("StatusBatch", req, |r| async move {
            at_most(&r.reads, MAX_READS, "reads")?;
            let run = |q: v1::UserRequest| {
                let (shard, own) = (self.shard.clone(), self.own.clone());
                async move {
                    let user = owned(&own, q.user_id)?;
                    let viewer = viewer_of(q.viewer)?;
                    shard.status(user, viewer).await
                }
            };
            Ok(item_results(r.reads, "StatusBatch", |q| &q.trace, run))
        })
        .await
    }

    async fn batch(&self, req: Request<v1::BatchRequest>) -> Reply<v1::BatchReply> {
        self.serve("Batch", req, |r| async move {
            self.users(&r.user_ids)?;
            let viewer = viewer_of(r.viewer)?;
            let entries = self.shard.batch(&r.user_ids, viewer).await?;
            Ok(v1::BatchReply {
                entries: entries.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn set_status(&self, req: Request<v1::SetStatusRequest>) -> Reply<v1::StatusReply> {
        self.serve("SetStatus", req, |r| async move {
            let user = self.user(r.user_id)?;
            let settings = proto::settings_from(&r)?;
            Ok(self.shard.set_status(user, settings).await?.into())
        })
        .await
    }

    async fn clear_status(&self, req: Request<v1::UserRequest>) -> Reply<v1::StatusReply> {
        self.serve("ClearStatus", req, |r| async move {
            let user = self.user(r.user_id)?;
            Ok(self.shard.clear_status(user).await?.into())
        })
        .await
    }

    async fn health(&self, req: Request<v1::HealthRequest>) -> Reply<v1::HealthReply> {
        self.serve("Health", req, |_| async move {
            Ok(v1::HealthReply {
                // Serving means "up and not draining": never the store's health, or one
                // stalled Redis master would take every shard out of every ring.
                serving: self.own.serving(),
                starting: self.own.starting(),
                incarnation: self.own.incarnation(),
                epoch: self.own.epoch(),
                owned_partitions: self.own.owned_count() as u32,
                store_ok: self.metrics.store.up.get() == 1
                    && self.metrics.store.redis_unreachable_masters.get() == 0,
            })
        })
        .await
    }

    async fn views(&self, req: Request<v1::BatchRequest>) -> Reply<v1::ViewsReply> {
        self.serve("Views", req, |r| async move {
            self.users(&r.user_ids)?;
            let viewer = viewer_of(r.viewer)?;
            let views = self.shard.views(&r.user_ids, viewer).await?;
            Ok(v1::ViewsReply {
                views: views.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn subscriptions(&self, req: Request<v1::UserRequest>) -> Reply<v1::SubscriptionsReply> {
        self.serve("Subscriptions", req, |r| async move {
            let user = self.user(r.user_id)?;
            Ok(v1::SubscriptionsReply {
                targets: self.shard.subscriptions(user).await?,
            })
        })
        .await
    }

    async fn subscribe(&self, req: Request<v1::SubscribeRequest>) -> Reply<v1::SubscriptionsReply> {
        self.serve("Subscribe", req, |r| async move {
            let user = self.user(r.user_id)?;
            let mode = match r.mode.as_str() {
                "add" => SubscriptionMode::Add,
                "remove" => SubscriptionMode::Remove,
                "replace" => SubscriptionMode::Replace,
                _ => {
                    return Err(Error::BadRequest(
                        "mode must be add, remove or replace".into(),
                    ))
                }
            };
            for &u in &r.targets {
                validate_user_id(u)?;
            }
            let targets = self.shard.subscribe(user, mode, &r.targets).await?;
            Ok(v1::SubscriptionsReply { targets })
        })
        .await
    }

    async fn privacy(&self, req: Request<v1::UserRequest>) -> Reply<v1::PrivacyReply> {
        self.serve("Privacy", req, |r| async move {
            let user = self.user(r.user_id)?;
            let p = self.shard.privacy(user).await?;
            Ok(v1::PrivacyReply {
                privacy: Some((&p).into()),
            })
        })
        .await
    }

    async fn set_privacy(&self, req: Request<v1::SetPrivacyRequest>) -> Reply<v1::PrivacyReply> {
        self.serve("SetPrivacy", req, |r| async move {
            let user = self.user(r.user_id)?;
            let privacy = proto::privacy_from(&r.privacy.unwrap_or_default())?;
            let p = self.shard.set_privacy(user, privacy).await?;
            Ok(v1::PrivacyReply {
                privacy: Some((&p).into()),
            })
        })
        .await
    }

    type EventsStream = Pin<Box<dyn futures::Stream<Item = StreamItem> + Send + 'static>>;

    /// A gateway's event stream: interest in, events out. Each user declared interesting gets
    /// its current state at once (if this shard owns it), then every change. A ping (an event
    /// without presence) goes down every [`PING`], so the gateway can tell a live but quiet
    /// stream from a dead one; a stream the shard cuts off (too slow, or shutting down) ends
    /// with `UNAVAILABLE`, so the gateway reconnects.
    async fn events(
        &self,
        req: Request<tonic::Streaming<v1::Interest>>,
    ) -> Reply<Self::EventsStream> {
        let mut inbound = req.into_inner();
        let Opened { id, rx, tx, cut } = self.fanout.open("gateway");
        let fanout = self.fanout.clone();
        let shard = self.shard.clone();
        let own = self.own.clone();
        let stop = cut.clone();
        tokio::spawn(async move {
            let mut ping = tokio::time::interval(PING);
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ping.tick() => {
                        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Ok(v1::Event::default())) {
                            fanout.close(id);
                        }
                        continue;
                    }
                    m = inbound.message() => match m {
                        Ok(Some(msg)) => msg,
                        _ => break,
                    },
                };
                fanout.interest(id, &msg.add, &msg.remove);
                let owned: Vec<UserId> = msg
                    .add
                    .iter()
                    .copied()
                    .filter(|u| own.check(*u).is_ok())
                    .collect();
                if owned.is_empty() {
                    continue;
                }
                let Ok(snapshots) = shard.snapshots(&owned).await else {
                    continue;
                };
                for ev in snapshots {
                    if tx.send(Ok(to_wire(&ev))).await.is_err() {
                        break;
                    }
                }
            }
            fanout.close(id);
        });
        let tail = cut.clone();
        let end = futures::stream::once(async move {
            tail.is_cancelled().then(|| {
                Err(tonic::Status::unavailable(
                    "event stream cut off: too slow, or the shard is shutting down",
                ))
            })
        })
        .filter_map(|item: Option<StreamItem>| async move { item });
        let events = ReceiverStream::new(rx)
            .take_until(cut.cancelled_owned())
            .chain(end);
        Ok(Response::new(Box::pin(events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Platform, Rules};
    use crate::store::faulty::FaultyStore;
    use crate::store::Store;

    /// A shard on `store` whose requests read `table` (heartbeat timeout 30 s).
    fn shard_on(store: Arc<dyn Store>, metrics: Arc<Metrics>, table: Arc<Table>) -> Arc<Shard> {
        let timeout = Duration::from_secs(30);
        Arc::new(Shard::new(store, Rules::default(), timeout, metrics, table))
    }

    /// Runs the ownership driver of `shard` (named `me`, its table `table`) on `ring`, with the
    /// handoff grace `grace`, catching gateways up through `fanout`, until the token is
    /// cancelled (the ring's sender lives as long).
    fn drive(
        me: &str,
        ring: Ring,
        grace: Duration,
        shard: &Arc<Shard>,
        table: &Arc<Table>,
        metrics: &Arc<Metrics>,
        fanout: Arc<Fanout>,
    ) -> CancellationToken {
        let clients = Clients::new(Duration::from_secs(1), Duration::from_secs(1));
        let handoff = Handoff::new(
            me.to_owned(),
            grace,
            metrics.clone(),
            table.clone(),
            fanout,
            clients,
        );
        let (tx, ring) = watch::channel(Arc::new(ring));
        let cancel = CancellationToken::new();
        let (shard, stop) = (shard.clone(), cancel.clone());
        tokio::spawn(async move {
            handoff.run(shard, ring, stop).await;
            drop(tx);
        });
        cancel
    }

    /// Issue 10, defect 8: when a partition becomes owned, every gateway interested in one of
    /// its users gets the user's current state, whatever it missed while the partition moved.
    #[tokio::test(start_paused = true)]
    async fn a_partition_that_becomes_owned_catches_interested_gateways_up() {
        let store = FaultyStore::new(true);
        let metrics = Arc::new(Metrics::new());
        let user: UserId = 77;
        // The previous owner put the user online (written through), then went away.
        let before = Shard::new(
            store.clone(),
            Rules::default(),
            Duration::from_millis(100),
            metrics.clone(),
            Table::owning_all(),
        );
        before.online(user, "d1", Platform::Web).await.unwrap();
        drop(before);
        // The new owner: a gateway already streams from it and is interested in the user.
        let table = Table::new();
        let shard = Arc::new(Shard::new(
            store.twin() as Arc<dyn Store>,
            Rules::default(),
            Duration::from_millis(100),
            metrics.clone(),
            table.clone(),
        ));
        let fanout = Fanout::new(metrics.clone(), 64);
        shard.set_sink(fanout.clone());
        let mut gateway = fanout.open("gw");
        fanout.interest(gateway.id, &[user], &[]);
        assert!(gateway.rx.try_recv().is_err(), "nothing before the handoff");
        let grace = Duration::from_millis(100);
        let me = "10.0.0.1:50051".to_owned();
        let ring = Ring::new([me.clone()]);
        let cancel = drive(&me, ring, grace, &shard, &table, &metrics, fanout.clone());
        let item = tokio::time::timeout(Duration::from_secs(5), gateway.rx.recv())
            .await
            .expect("a catch-up within the start grace and a load")
            .expect("the stream is open")
            .expect("an event, not an error");
        assert!(item.snapshot, "a catch-up is a snapshot: {item:?}");
        let view = item.presence.expect("the user's state");
        assert_eq!(view.user_id, user);
        assert_eq!(view.status, v1::Status::Online as i32);
        assert_eq!(view.devices.len(), 1);
        assert!(table.check(user).is_ok(), "the partition is owned");
        cancel.cancel();
    }

    /// A shard that missed a ring change (stopped while the ring moved away and back) still
    /// holds a partition that another shard fenced and wrote meanwhile. A refused write alone
    /// changes nothing (its ring may be the stale one); once it notices the stall, it checks its
    /// fences, releases the partition and loads it again under a new fence: it serves what the
    /// other shard wrote, and its writes land again (the other's are now the refused ones).
    #[tokio::test(start_paused = true)]
    async fn a_shard_back_from_a_stall_loads_what_another_fenced_meanwhile() {
        use crate::presence::{Settings, Status};
        use crate::privacy::Viewer;

        let store = FaultyStore::new(true);
        let metrics = Arc::new(Metrics::new());
        let user: UserId = 4242;
        let table = Table::new();
        let shard = shard_on(store.clone(), metrics.clone(), table.clone());
        let me = "10.0.0.1:50051";
        let grace = Duration::from_millis(100);
        let fanout = Fanout::new(metrics.clone(), 64);
        let ring = Ring::new([me.to_owned()]);
        let cancel = drive(me, ring, grace, &shard, &table, &metrics, fanout);
        let owned = async {
            while table.check(user).is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), owned)
            .await
            .expect("owned after the start grace");
        shard.online(user, "d", Platform::Web).await.unwrap();

        // Meanwhile, on a ring this shard never saw: another shard took the partition over
        // (fencing it) and wrote a change.
        let other = shard_on(store.twin(), Arc::new(Metrics::new()), Table::owning_all());
        other.recover(&[partition_of(user)]).await.unwrap();
        let busy = Settings {
            manual: Some(Status::Busy),
            ..Default::default()
        };
        let written = other.set_status(user, busy).await.unwrap();
        assert_eq!(
            shard.status(user, Viewer::Truth).await.unwrap().status,
            Status::Online,
            "stale until it notices its stall"
        );

        let away = Settings {
            manual: Some(Status::Away),
            ..Default::default()
        };
        let refused = shard.set_status(user, away.clone()).await.unwrap_err();
        assert!(matches!(refused, Error::WrongOwner { .. }), "{refused:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let refused = shard.set_status(user, away.clone()).await.unwrap_err();
        assert!(matches!(refused, Error::WrongOwner { .. }), "{refused:?}");
        assert_eq!(metrics.ring.stalls.get(), 0);
        assert_eq!(metrics.ring.fenced.get(), 0);

        // The process stalls (paused time jumps, as a SIGSTOP's does on resume).
        tokio::time::advance(Duration::from_secs(8)).await;
        let again = async {
            loop {
                match shard.set_status(user, away.clone()).await {
                    Ok(view) => return view,
                    Err(Error::WrongOwner { .. }) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        };
        let view = tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .expect("loaded again");
        assert_eq!(view.status, Status::Away);
        assert!(
            view.version > written.version,
            "{} after the other's {}",
            view.version,
            written.version
        );
        assert_eq!(metrics.ring.stalls.get(), 1);
        assert_eq!(metrics.ring.fenced.get(), 1, "one partition loaded again");
        let late = other
            .set_status(user, Settings::default())
            .await
            .unwrap_err();
        assert!(matches!(late, Error::WrongOwner { .. }), "{late:?}");

        // A peer whose failure detection ended after this shard ran again fences late: within
        // twice the grace of the stall, the checks go on and see it too.
        other.recover(&[partition_of(user)]).await.unwrap();
        let seen = async {
            while metrics.ring.fenced.get() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_millis(200), seen)
            .await
            .expect("a late fence within the window is seen");
        // Then the checks stop: a fence long after the stall is not looked for.
        tokio::time::sleep(Duration::from_secs(1)).await;
        other.recover(&[partition_of(user)]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(metrics.ring.fenced.get(), 2);
        assert_eq!(metrics.ring.stalls.get(), 1);
        cancel.cancel();
    }

    /// A shard that finds a partition fenced by another takes it back from its guessed interim
    /// owner (its owner in the ring without this shard) only if that shard held the fence
    /// found. Here the guess is right once (it fenced the partition, then let go: handed back at
    /// once, without the grace), then wrong (a shard this one's ring does not have fenced it:
    /// the guessed shard answers that it let go, having never held that fence, and the
    /// partition waits for the whole grace rather than being fenced over its real holder).
    #[tokio::test]
    async fn a_fenced_partition_is_handed_back_only_by_the_shard_that_held_its_fence() {
        let grace = Duration::from_secs(2);
        let store = FaultyStore::new(true);
        let metrics = Arc::new(Metrics::new());
        // The guessed interim owner: a shard on loopback that serves nothing now.
        let guessed = shard_on(store.twin(), Arc::new(Metrics::new()), Table::new());
        let guessed_metrics = Arc::new(Metrics::new());
        let guessed_addr =
            crate::peer::serve_on_loopback(guessed.clone(), Table::new(), guessed_metrics, &[])
                .await;
        let me = "10.0.0.1:50051".to_owned();
        let ring = Ring::new([me.clone(), guessed_addr]);
        let user: UserId = (1..)
            .find(|&u| ring.owner(partition_of(u)) == Some(me.as_str()))
            .unwrap();
        let p = partition_of(user);
        let table = Table::new();
        let shard = shard_on(store.clone(), metrics.clone(), table.clone());
        let fanout = Fanout::new(metrics.clone(), 64);
        let cancel = drive(&me, ring, grace, &shard, &table, &metrics, fanout);
        let owned_again = |fenced: u64| {
            let (table, metrics) = (table.clone(), metrics.clone());
            async move {
                while metrics.ring.fenced.get() < fenced || table.check(user).is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), owned_again(0))
            .await
            .expect("owned after the start grace");
        shard.online(user, "d", Platform::Web).await.unwrap();

        // The guess is right: the guessed shard fenced the partition, then let go of it.
        let polls = |r| metrics.ring.handover_polls.get(r).get();
        let released = polls(HandoverPoll::Released);
        guessed.recover(&[p]).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(shard.check_fences(&[p]).await.unwrap(), 1);
        tokio::time::timeout(grace * 5, owned_again(1))
            .await
            .expect("taken back");
        let took = started.elapsed();
        assert!(
            took < grace,
            "handed back by its holder at once, took {took:?}"
        );
        assert!(polls(HandoverPoll::Released) > released, "handed over");

        // The guess is wrong: a shard this one's ring lacks fenced it; the guessed one never
        // held that fence and answers that it let go (it serves nothing).
        let joined = shard_on(store.twin(), Arc::new(Metrics::new()), Table::owning_all());
        joined.recover(&[p]).await.unwrap();
        let declined = polls(HandoverPoll::Declined);
        let started = std::time::Instant::now();
        assert_eq!(shard.check_fences(&[p]).await.unwrap(), 1);
        tokio::time::timeout(grace * 5, owned_again(2))
            .await
            .expect("taken back after the grace");
        let took = started.elapsed();
        assert!(took >= grace, "waited for the grace, took {took:?}");
        assert!(
            polls(HandoverPoll::Declined) > declined,
            "the guessed shard was asked, and its answer did not count"
        );
        assert_eq!(
            shard.status(user, Viewer::Truth).await.unwrap().status,
            crate::presence::Status::Online
        );

        // The guessed shard held the fence found, but another took the partition over after
        // it was found: the fence is read again before a handover counts.
        guessed.recover(&[p]).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(shard.check_fences(&[p]).await.unwrap(), 1);
        joined.recover(&[p]).await.unwrap();
        tokio::time::timeout(grace * 5, owned_again(3))
            .await
            .expect("taken back after the grace");
        let took = started.elapsed();
        assert!(
            took >= grace,
            "the stale holder's answer did not count, took {took:?}"
        );
        cancel.cancel();
    }

    /// A shard whose ring has another member reports itself starting on `Health`, and unready,
    /// for its start grace, and serving after it, so that static discovery and Kubernetes let it
    /// join a ring only once it can take partitions.
    #[tokio::test]
    async fn a_shard_answers_health_checks_as_starting_for_its_start_grace() {
        use crate::membership::{Probe, Probed};
        use crate::service::Presence;

        let grace = Duration::from_secs(2);
        let metrics = Arc::new(Metrics::new());
        let table = Table::new();
        let shard = shard_on(FaultyStore::new(true), metrics.clone(), table.clone());
        let addr =
            crate::peer::serve_on_loopback(shard.clone(), table.clone(), metrics.clone(), &[])
                .await;
        let started = std::time::Instant::now();
        let fanout = Fanout::new(metrics.clone(), 64);
        // The other member serves nothing (a closed port): its share is loaded after the grace.
        let ring = Ring::new([addr.clone(), "127.0.0.1:1".to_owned()]);
        let mine = ring.partitions_of(&addr).len();
        let cancel = drive(&addr, ring, grace, &shard, &table, &metrics, fanout);
        let probe = crate::peer::GrpcProbe::new(Clients::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let first = probe.probe(&addr).await;
        let ready = shard.healthy().await;
        assert!(started.elapsed() < grace, "probed too late to tell");
        assert_eq!(first, Probed::Starting);
        assert!(!ready, "unready while starting");
        while started.elapsed() < grace * 5 && probe.probe(&addr).await != Probed::Serving {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(probe.probe(&addr).await, Probed::Serving);
        assert!(shard.healthy().await);
        assert!(
            started.elapsed() >= grace,
            "serving before its grace was over"
        );
        while started.elapsed() < grace * 5 && table.owned_count() < mine {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(table.owned_count(), mine, "it took its partitions");
        cancel.cancel();
    }
}
