//! Coalescing on a gateway: heartbeats, onlines and status reads that queue while earlier
//! batches are in flight go to each shard as one batch, and each answer goes back to its request.
//! Heartbeats go on a `HeartbeatStream` kept open per shard; onlines (bursts of them: a reconnect
//! storm) as `OnlineBatch` calls and status reads (`GET /status/{userId}`, each with its own
//! viewer) as `StatusBatch` calls, whose results come back one by one as the shard finishes each.
//!
//! The batching adapts to load: each shard has a lane per kind, whose task takes whatever has
//! queued and sends it as one batch, with a few batches out at once at most. A batch goes once a
//! few scheduler passes added nothing to it (or it holds `FILL`, or the window is out): under load
//! it holds the requests that arrived together and what arrived while the previous call was
//! out; a lone request waits only for those passes.
//! Coalescing never changes an answer: a heartbeat the shard accepted is done, one of a device
//! that is not online gets that answer, an online or a read the shard did answers with the
//! user's status, and any other (refused by the shard, or whose batch failed or timed out) is
//! handed back to the caller, who sends it alone on the routed path with its retries, deadline
//! and exact error.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::client::{retriable, Clients, ShardClient};
use super::{inject_trace, item_trace, Timed};
use crate::error::Error;
use crate::metrics::{GrpcMetrics, Metrics};
use crate::presence::{Platform, UserId};
use crate::proto::v1;
use crate::ring::Ring;

/// Most items in one call.
const MAX_BATCH: usize = 512;
/// Items waiting for one shard, per kind; beyond this, callers take the routed path.
const QUEUE: usize = 8192;
/// A batch this full goes without waiting out the window.
const FILL: usize = 64;
/// Scheduler passes in a row that add nothing to a batch before it goes.
const QUIET_PASSES: u32 = 2;
/// The most an online or read batch counts as out (one of its lane's `IN_FLIGHT`) while its
/// results come in.
const ITEM_HOLD: Duration = Duration::from_millis(50);

struct Beat {
    user: UserId,
    device: String,
    active: bool,
    /// The trace context of the request it came from ([`item_trace`]).
    trace: HashMap<String, String>,
    done: oneshot::Sender<Answer>,
}

/// How a heartbeat sent in a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its owner took it.
    Accepted,
    /// Its owner answered that the device is not online: final, as on the routed path.
    NotOnline,
    /// Anything else (no owner, another refusal, a failed call, a full lane): the caller sends
    /// it alone on the routed path.
    Alone,
}

impl Answer {
    /// The answer of a batch's per-heartbeat code (0, or the HTTP status of the error).
    fn of_code(code: u32) -> Answer {
        match code {
            0 => Answer::Accepted,
            404 => Answer::NotOnline,
            _ => Answer::Alone,
        }
    }
}

/// How an online or a status read sent in a batch ended.
#[derive(Debug)]
pub enum ItemAnswer {
    /// Its owner did it: the user's status (as the read's viewer sees it).
    Done(v1::StatusReply),
    /// Its owner refused it for good (bad input, a limit, its store failing): the error the
    /// routed path would have answered.
    Failed(Error),
    /// Anything else (no owner, a refusal the routed path retries, such as a wrong owner during
    /// a handoff; a failed or timed-out call; a full lane): the caller sends it alone.
    Alone,
}

/// An online or a status read waiting for its lane's next batch.
struct Queued<M> {
    msg: M,
    /// When it queued: one that waited longer than its lane's timeout is not sent (its caller
    /// takes the routed path with the rest of its deadline).
    queued: Instant,
    /// Dropped unanswered: the caller sends it alone.
    done: oneshot::Sender<ItemAnswer>,
}

/// The gateway's end: one lane (a queue and its sender task) per shard address and kind.
pub struct Coalescer {
    ring: watch::Receiver<Arc<Ring>>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    /// The route deadline (`PRESENCE_ROUTE_TIMEOUT`).
    deadline: Duration,
    /// How long a batch waits to fill (`PRESENCE_COALESCE_WINDOW`).
    window: Duration,
    beats: Mutex<HashMap<String, mpsc::Sender<Beat>>>,
    onlines: Mutex<HashMap<String, mpsc::Sender<Queued<v1::OnlineRequest>>>>,
    reads: Mutex<HashMap<String, mpsc::Sender<Queued<v1::UserRequest>>>>,
}

impl Coalescer {
    pub fn new(
        ring: watch::Receiver<Arc<Ring>>,
        clients: Arc<Clients>,
        metrics: Arc<Metrics>,
        deadline: Duration,
        window: Duration,
    ) -> Coalescer {
        Coalescer {
            ring,
            clients,
            metrics,
            deadline,
            window,
            beats: Mutex::new(HashMap::new()),
            onlines: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
        }
    }

    /// Sends the heartbeat in a batch to its owner.
    pub async fn heartbeat(&self, user: UserId, device: &str, active: bool) -> Answer {
        let (done, answer) = oneshot::channel();
        let beat = Beat {
            user,
            device: device.to_owned(),
            active,
            trace: item_trace(),
            done,
        };
        let answer = match self.enqueue::<Beats>(&self.beats, user, beat) {
            true => answer.await.unwrap_or(Answer::Alone),
            false => Answer::Alone,
        };
        if answer == Answer::Alone {
            self.metrics.grpc.heartbeats_alone.inc();
        }
        answer
    }

    /// Sends the online in a batch to its owner.
    pub async fn online(
        &self,
        user: UserId,
        device: &str,
        platform: Platform,
        session: u64,
    ) -> ItemAnswer {
        let msg = v1::OnlineRequest {
            epoch: 0,
            user_id: user,
            device_id: device.to_owned(),
            platform: v1::Platform::from(platform) as i32,
            session,
            trace: item_trace(),
        };
        let answer = self.by_item::<OnlineCall>(&self.onlines, user, msg).await;
        if matches!(answer, ItemAnswer::Alone) {
            self.metrics.grpc.onlines_alone.inc();
        }
        answer
    }

    /// Sends the status read (of `user`, as `viewer` on the wire sees it) in a batch to its
    /// owner.
    pub async fn status(&self, user: UserId, viewer: u64) -> ItemAnswer {
        let msg = v1::UserRequest {
            epoch: 0,
            user_id: user,
            viewer,
            trace: item_trace(),
        };
        let answer = self.by_item::<ReadCall>(&self.reads, user, msg).await;
        if matches!(answer, ItemAnswer::Alone) {
            self.metrics.grpc.reads_alone.inc();
        }
        answer
    }

    /// Queues `msg` on its `C` lane and waits for its answer.
    async fn by_item<C: ItemCall>(
        &self,
        lanes: &Mutex<HashMap<String, mpsc::Sender<Queued<C::Msg>>>>,
        user: UserId,
        msg: C::Msg,
    ) -> ItemAnswer {
        let (done, answer) = oneshot::channel();
        let item = Queued {
            msg,
            queued: Instant::now(),
            done,
        };
        match self.enqueue::<ByItem<C>>(lanes, user, item) {
            true => answer.await.unwrap_or(ItemAnswer::Alone),
            false => ItemAnswer::Alone,
        }
    }

    /// Queues `item` on the `K` lane of `user`'s owner, which starts on first use; false when
    /// there is no owner or the lane is full. Starting a lane drops those of shards no longer in
    /// the ring (their tasks end once their queues are drained), so the lanes never outnumber
    /// the shards by more than those that left since the last start.
    fn enqueue<K: Kind>(
        &self,
        lanes: &Mutex<HashMap<String, mpsc::Sender<K::Item>>>,
        user: UserId,
        item: K::Item,
    ) -> bool {
        let ring = self.ring.borrow();
        let Some(owner) = ring.owner_of(user) else {
            return false;
        };
        let mut lanes = lanes.lock();
        if let Some(tx) = lanes.get(owner).filter(|tx| !tx.is_closed()) {
            return tx.try_send(item).is_ok();
        }
        lanes.retain(|addr, _| ring.members().iter().any(|m| m == addr));
        let (tx, rx) = mpsc::channel(QUEUE);
        let lane = Lane {
            owner: owner.to_owned(),
            timeout: self.deadline / K::TIMEOUT_SHARE,
            window: self.window,
            ring: self.ring.clone(),
            clients: self.clients.clone(),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(lane.run(K::default(), rx));
        let queued = tx.try_send(item).is_ok();
        lanes.insert(owner.to_owned(), tx);
        queued
    }
}

/// What a lane batches, and how it sends one batch (answering every item).
trait Kind: Default + Send + Sync + 'static {
    type Item: Send + 'static;
    /// Batches out at once to one shard.
    const IN_FLIGHT: usize;
    /// A batch's timeout is the route deadline divided by this.
    const TIMEOUT_SHARE: u32;
    /// Sends the batch; `permit` is one of the lane's [`Kind::IN_FLIGHT`], held while the
    /// batch counts as out.
    fn send(
        &self,
        lane: &Lane,
        items: Vec<Self::Item>,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send;
}

/// The sender task of one shard and kind: takes whatever queued, sends it as one batch.
struct Lane {
    owner: String,
    timeout: Duration,
    window: Duration,
    ring: watch::Receiver<Arc<Ring>>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
}

/// Moves what has queued into `batch`, up to [`MAX_BATCH`].
fn drain<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(b) => batch.push(b),
            Err(_) => break,
        }
    }
}

impl Lane {
    async fn run<K: Kind>(self, kind: K, mut rx: mpsc::Receiver<K::Item>) {
        let calls = Arc::new(Semaphore::new(K::IN_FLIGHT));
        let this = Arc::new((self, kind));
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            this.0.fill(&mut rx, &mut batch).await;
            let Ok(permit) = calls.clone().acquire_owned().await else {
                return;
            };
            drain(&mut rx, &mut batch);
            let items = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            let this = this.clone();
            tokio::spawn(async move {
                let (lane, kind) = &*this;
                kind.send(lane, items, permit).await;
            });
        }
    }

    /// Counts a batch of `n` going out, and answers the ring's epoch it goes with.
    fn begin(
        &self,
        batches: &prometheus::IntCounter,
        items: &prometheus::IntCounter,
        n: usize,
    ) -> u64 {
        batches.inc();
        items.inc_by(n as u64);
        self.ring.borrow().epoch()
    }

    /// Lets the batch fill before it goes: the lane yields to the runtime, which reads the
    /// requests that have arrived (each queues its item), and takes what they queued; it goes
    /// once [`QUIET_PASSES`] passes in a row added nothing, once it holds [`FILL`], or when the
    /// window is out. No timer: under load a batch gathers the requests that arrived together,
    /// and a lone request waits only for a few scheduler passes.
    async fn fill<T>(&self, rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>) {
        if self.window.is_zero() {
            return;
        }
        let until = Instant::now() + self.window;
        let mut quiet = 0;
        while quiet < QUIET_PASSES && batch.len() < FILL && Instant::now() < until {
            tokio::task::yield_now().await;
            let before = batch.len();
            drain(rx, batch);
            quiet = if batch.len() == before { quiet + 1 } else { 0 };
        }
    }
}

/// How long a lane takes a shard's `Unimplemented` for an answer before it tries the call again:
/// the shard may be upgraded meanwhile (a rolling upgrade keeps its address).
const RETRY_UNSUPPORTED: Duration = Duration::from_secs(30);

/// Whether a lane's shard lacks a call (an older version): since when it said so, if it did
/// within [`RETRY_UNSUPPORTED`].
#[derive(Default)]
struct Unsupported(Mutex<Option<Instant>>);

impl Unsupported {
    /// The shard answered `Unimplemented` now.
    fn mark(&self) {
        *self.0.lock() = Some(Instant::now());
    }

    /// Whether the shard said so less than [`RETRY_UNSUPPORTED`] ago.
    fn now(&self) -> bool {
        self.0
            .lock()
            .is_some_and(|t| t.elapsed() < RETRY_UNSUPPORTED)
    }
}

/// Heartbeats, on a `HeartbeatStream` per shard.
#[derive(Default)]
struct Beats {
    /// The lane's open `HeartbeatStream`, if any. One batch is out at a time
    /// ([`Kind::IN_FLIGHT`]), so the lock is never contended; it also keeps a batch's request
    /// and answer together.
    pipe: tokio::sync::Mutex<Option<Pipe>>,
    /// The shard does not serve `HeartbeatStream`: unary `HeartbeatBatch` calls instead (the
    /// stream is tried again after [`RETRY_UNSUPPORTED`]).
    unary: Unsupported,
}

/// A `HeartbeatStream`: batches go in on `tx`, and each one's answer comes back on `replies`.
struct Pipe {
    tx: mpsc::Sender<v1::HeartbeatBatchRequest>,
    replies: tonic::Streaming<v1::HeartbeatBatchReply>,
}

impl Kind for Beats {
    type Item = Beat;
    const IN_FLIGHT: usize = 1;
    /// A quarter of the route deadline: a stalled shard's heartbeats then take the routed path.
    const TIMEOUT_SHARE: u32 = 4;

    async fn send(&self, lane: &Lane, beats: Vec<Beat>, _out: OwnedSemaphorePermit) {
        let g = &lane.metrics.grpc;
        let epoch = lane.begin(&g.heartbeat_batches, &g.heartbeats_batched, beats.len());
        let (dones, heartbeats): (Vec<_>, Vec<_>) = beats
            .into_iter()
            .map(|b| {
                let h = v1::HeartbeatRequest {
                    epoch,
                    user_id: b.user,
                    device_id: b.device,
                    active: b.active,
                    trace: b.trace,
                };
                (b.done, h)
            })
            .unzip();
        let t = Timed::new(lane.metrics.clone(), "client", "HeartbeatBatch");
        let req = v1::HeartbeatBatchRequest { epoch, heartbeats };
        let answer = match self.unary.now() {
            false => self.streamed(lane, req).await,
            true => self.unary(lane, req, Instant::now() + lane.timeout).await,
        };
        let codes = t
            .finish(answer.map(tonic::Response::new))
            .ok()
            .map(|r| r.codes)
            .filter(|codes| codes.len() == dones.len());
        match codes {
            Some(codes) => {
                for (done, code) in dones.into_iter().zip(codes) {
                    let _ = done.send(Answer::of_code(code));
                }
            }
            None => {
                for done in dones {
                    let _ = done.send(Answer::Alone);
                }
            }
        }
    }
}

impl Beats {
    /// The batch on the lane's stream, which it opens first if there is none. A stalled shard
    /// holds its lane for a quarter of the route deadline at most: its heartbeats then take the
    /// routed path, which has the whole deadline. The stream goes back to the lane only after an
    /// answer: any failure drops it (the next batch opens another), so that a late answer is
    /// never taken for the next batch's. A shard that does not serve the stream (an older
    /// version, during a rolling upgrade) gets unary calls from then on.
    async fn streamed(
        &self,
        lane: &Lane,
        req: v1::HeartbeatBatchRequest,
    ) -> Result<v1::HeartbeatBatchReply, tonic::Status> {
        let until = Instant::now() + lane.timeout;
        let mut pipe = self.pipe.lock().await;
        let mut p = match pipe.take() {
            Some(p) => p,
            None => match tokio::time::timeout_at(until, self.open(lane)).await {
                Ok(Ok(p)) => p,
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    self.unary.mark();
                    return self.unary(lane, req, until).await;
                }
                Ok(Err(s)) => return Err(s),
                Err(_) => return Err(timed_out()),
            },
        };
        let answer = tokio::time::timeout_at(until, async {
            p.tx.send(req)
                .await
                .map_err(|_| tonic::Status::unavailable("heartbeat stream closed"))?;
            p.replies
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("heartbeat stream ended"))
        })
        .await
        .unwrap_or_else(|_| Err(timed_out()))?;
        *pipe = Some(p);
        Ok(answer)
    }

    /// Opens a `HeartbeatStream` to the lane's shard.
    async fn open(&self, lane: &Lane) -> Result<Pipe, tonic::Status> {
        let mut c = lane.clients.get(&lane.owner)?;
        lane.metrics.grpc.heartbeat_streams_opened.inc();
        let (tx, rx) = mpsc::channel(1);
        let replies = c
            .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Pipe { tx, replies })
    }

    /// The batch as one `HeartbeatBatch` call, answered by `until`.
    async fn unary(
        &self,
        lane: &Lane,
        req: v1::HeartbeatBatchRequest,
        until: Instant,
    ) -> Result<v1::HeartbeatBatchReply, tonic::Status> {
        let mut c = lane.clients.get(&lane.owner)?;
        let mut req = tonic::Request::new(req);
        inject_trace(&mut req);
        tokio::time::timeout_at(until, c.heartbeat_batch(req))
            .await
            .unwrap_or_else(|_| Err(timed_out()))
            .map(tonic::Response::into_inner)
    }
}

/// A kind whose batch is one call answered item by item, each result as the shard finishes
/// it: onlines (`OnlineBatch`) and status reads (`StatusBatch`).
trait ItemCall: Send + Sync + 'static {
    type Msg: Send + 'static;
    /// The batch call's gRPC method.
    const METHOD: &'static str;
    /// The gateway's counters of this kind's batches and of the items they carried.
    fn counters(g: &GrpcMetrics) -> (&prometheus::IntCounter, &prometheus::IntCounter);
    /// The item, stamped with the ring epoch its batch goes with.
    fn with_epoch(msg: Self::Msg, epoch: u64) -> Self::Msg;
    /// The batch call (its trace context in its metadata).
    fn call(
        c: ShardClient,
        epoch: u64,
        msgs: Vec<Self::Msg>,
    ) -> impl Future<Output = Result<tonic::Streaming<v1::ItemResult>, tonic::Status>> + Send;
}

/// Onlines, as `OnlineBatch` calls.
struct OnlineCall;

impl ItemCall for OnlineCall {
    type Msg = v1::OnlineRequest;
    const METHOD: &'static str = "OnlineBatch";
    fn counters(g: &GrpcMetrics) -> (&prometheus::IntCounter, &prometheus::IntCounter) {
        (&g.online_batches, &g.onlines_batched)
    }
    fn with_epoch(msg: Self::Msg, epoch: u64) -> Self::Msg {
        v1::OnlineRequest { epoch, ..msg }
    }
    async fn call(
        mut c: ShardClient,
        epoch: u64,
        onlines: Vec<Self::Msg>,
    ) -> Result<tonic::Streaming<v1::ItemResult>, tonic::Status> {
        let mut req = tonic::Request::new(v1::OnlineBatchRequest { epoch, onlines });
        inject_trace(&mut req);
        Ok(c.online_batch(req).await?.into_inner())
    }
}

/// Status reads, as `StatusBatch` calls.
struct ReadCall;

impl ItemCall for ReadCall {
    type Msg = v1::UserRequest;
    const METHOD: &'static str = "StatusBatch";
    fn counters(g: &GrpcMetrics) -> (&prometheus::IntCounter, &prometheus::IntCounter) {
        (&g.read_batches, &g.reads_batched)
    }
    fn with_epoch(msg: Self::Msg, epoch: u64) -> Self::Msg {
        v1::UserRequest { epoch, ..msg }
    }
    async fn call(
        mut c: ShardClient,
        epoch: u64,
        reads: Vec<Self::Msg>,
    ) -> Result<tonic::Streaming<v1::ItemResult>, tonic::Status> {
        let mut req = tonic::Request::new(v1::StatusBatchRequest { epoch, reads });
        inject_trace(&mut req);
        Ok(c.status_batch(req).await?.into_inner())
    }
}

/// The lane kind of an [`ItemCall`].
struct ByItem<C> {
    /// The shard does not serve the batch call (an older version, during a rolling upgrade):
    /// every item goes alone, with no batch tried first (until [`RETRY_UNSUPPORTED`] is out).
    unsupported: Unsupported,
    call: PhantomData<fn() -> C>,
}

impl<C> Default for ByItem<C> {
    fn default() -> Self {
        ByItem {
            unsupported: Unsupported::default(),
            call: PhantomData,
        }
    }
}

impl<C: ItemCall> Kind for ByItem<C> {
    type Item = Queued<C::Msg>;
    /// An online waits for its store (a durable change), and a read of a user not in memory
    /// reads it, so a batch is out longer than a heartbeat's: a few at once, each counted out
    /// for [`ITEM_HOLD`] at most.
    const IN_FLIGHT: usize = 4;
    /// Half the route deadline: long enough for the shard's own answer when its store is slow
    /// (the store's timeout), with half left for the routed path.
    const TIMEOUT_SHARE: u32 = 2;

    /// Sends the batch, and answers each item as its result comes back: the status, or the
    /// shard's error when the routed path would not try again. Those with no result within the
    /// lane's timeout, or a retriable error, or whose call failed, go alone; so do those that
    /// queued longer than that (not sent at all), and a shard that does not serve the call (an
    /// older version) gets every item alone. The batch stops counting as out once it is
    /// answered or after [`ITEM_HOLD`], so that items waiting for a slow Redis master do not
    /// hold up the lane.
    async fn send(&self, lane: &Lane, items: Vec<Queued<C::Msg>>, out: OwnedSemaphorePermit) {
        let now = Instant::now();
        // A caller gone (a cancelled request) or queued too long: not sent (dropped: alone).
        let items: Vec<_> = items
            .into_iter()
            .filter(|o| !o.done.is_closed() && now.duration_since(o.queued) < lane.timeout)
            .collect();
        if items.is_empty() || self.unsupported.now() {
            return;
        }
        let (batches, batched) = C::counters(&lane.metrics.grpc);
        let epoch = lane.begin(batches, batched, items.len());
        let (mut dones, msgs): (Vec<_>, Vec<_>) = items
            .into_iter()
            .map(|o| (Some(o.done), C::with_epoch(o.msg, epoch)))
            .unzip();
        let t = Timed::new(lane.metrics.clone(), "client", C::METHOD);
        let until = now + lane.timeout;
        let call = tokio::time::timeout_at(until, async {
            let c = lane.clients.get(&lane.owner)?;
            let mut results = C::call(c, epoch, msgs).await?;
            while let Some(r) = results.message().await? {
                let done = dones.get_mut(r.index as usize).and_then(Option::take);
                if let Some(done) = done {
                    let _ = done.send(ItemAnswer::of(r));
                }
            }
            Ok(())
        });
        tokio::pin!(call);
        let answered = tokio::select! {
            r = &mut call => r,
            _ = tokio::time::sleep(ITEM_HOLD) => {
                drop(out);
                call.await
            }
        }
        .unwrap_or_else(|_| Err(timed_out()));
        if matches!(&answered, Err(s) if s.code() == tonic::Code::Unimplemented) {
            self.unsupported.mark();
        }
        let _ = t.finish(answered.map(tonic::Response::new));
        // Items left unanswered drop their senders: they go alone.
    }
}

impl ItemAnswer {
    /// The answer of one result of a batch.
    fn of(r: v1::ItemResult) -> ItemAnswer {
        match (r.code, r.status, r.error) {
            (0, Some(status), _) => ItemAnswer::Done(status),
            (_, _, Some(e)) => match crate::proto::error_of_item(e) {
                e if retriable(&e) => ItemAnswer::Alone,
                e => ItemAnswer::Failed(e),
            },
            _ => ItemAnswer::Alone,
        }
    }
}

/// The answer of a batch that took longer than its lane's timeout.
fn timed_out() -> tonic::Status {
    tonic::Status::deadline_exceeded("batch timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lane per shard that heartbeats went to; a shard that left the ring loses its lane when
    /// the next one starts. (No shard listens: every batch fails and its heartbeats come back
    /// `Alone`, which the routed path would then send.)
    #[tokio::test]
    async fn lanes_of_shards_that_left_the_ring_are_dropped() {
        let ring = |members: &[&str]| Arc::new(Ring::new(members.iter().map(|m| m.to_string())));
        let (tx, rx) = watch::channel(ring(&["127.0.0.1:1", "127.0.0.1:2"]));
        let c = Coalescer::new(
            rx,
            Clients::new(Duration::from_millis(50), Duration::from_millis(50)),
            Arc::new(Metrics::new()),
            Duration::from_millis(200),
            Duration::from_millis(1),
        );
        let lanes = |c: &Coalescer| {
            let mut l: Vec<String> = c.beats.lock().keys().cloned().collect();
            l.sort();
            l
        };
        // One heartbeat to each shard: two lanes.
        let owner_of = |u: UserId| tx.borrow().owner_of(u).unwrap().to_owned();
        let u1 = (1..).find(|&u| owner_of(u) == "127.0.0.1:1").unwrap();
        let u2 = (1..).find(|&u| owner_of(u) == "127.0.0.1:2").unwrap();
        assert_eq!(c.heartbeat(u1, "d", true).await, Answer::Alone);
        assert_eq!(c.heartbeat(u2, "d", true).await, Answer::Alone);
        assert_eq!(lanes(&c), ["127.0.0.1:1", "127.0.0.1:2"]);
        // Shard 1 leaves and shard 3 joins: the first heartbeat to shard 3 drops shard 1's lane.
        tx.send(ring(&["127.0.0.1:2", "127.0.0.1:3"])).unwrap();
        let u3 = (1..).find(|&u| owner_of(u) == "127.0.0.1:3").unwrap();
        assert_eq!(c.heartbeat(u3, "d", true).await, Answer::Alone);
        assert_eq!(lanes(&c), ["127.0.0.1:2", "127.0.0.1:3"]);
    }

    /// A shard on loopback, user 7's device "d" online, and user 11's, who shows itself to
    /// nobody (privacy), whose service answers `Unimplemented`
    /// to the methods in `older` as a server without them does; and a coalescer of a gateway
    /// whose ring has that shard alone. Answers the shard's and the gateway's metrics too.
    async fn older_shard(older: &[&str]) -> (Coalescer, Arc<Metrics>, Arc<Metrics>) {
        let (addr, metrics) = shard_at(older).await;
        let (ring, gateway) = gateway_of(addr);
        let c = Coalescer::new(
            ring,
            Clients::new(Duration::from_secs(1), Duration::from_secs(1)),
            gateway.clone(),
            Duration::from_secs(4),
            Duration::from_millis(1),
        );
        (c, metrics, gateway)
    }

    /// The shard of [`older_shard`]: its address and metrics.
    async fn shard_at(older: &[&str]) -> (String, Arc<Metrics>) {
        use crate::ownership::Table;
        use crate::presence::Rules;
        use crate::service::Presence;
        use crate::shard::Shard;
        use crate::store::faulty::FaultyStore;

        let metrics = Arc::new(Metrics::new());
        let shard = Arc::new(Shard::new(
            FaultyStore::new(true),
            Rules::default(),
            Duration::from_secs(30),
            metrics.clone(),
            Table::owning_all(),
        ));
        shard.online(7, "d", Platform::Web).await.unwrap();
        shard.online(11, "d", Platform::Web).await.unwrap();
        let nobody = crate::privacy::Privacy::new(
            crate::privacy::Visibility::Nobody,
            Default::default(),
            &[],
            &[],
        );
        shard.set_privacy(11, nobody).await.unwrap();
        let own = Table::owning_all();
        let addr = crate::peer::serve_on_loopback(shard, own, metrics.clone(), older).await;
        (addr, metrics)
    }

    /// A gateway's ring of the shard at `addr` alone, and its metrics.
    fn gateway_of(addr: String) -> (watch::Receiver<Arc<Ring>>, Arc<Metrics>) {
        let (tx, ring) = watch::channel(Arc::new(Ring::new([addr])));
        // The ring's sender lives as long as the test: a closed ring would read as no owner.
        std::mem::forget(tx);
        (ring, Arc::new(Metrics::new()))
    }

    /// Calls of `method` the shard answered ok.
    fn served_ok(metrics: &Metrics, method: &'static str) -> u64 {
        let answer = crate::metrics::GrpcAnswer {
            side: "server",
            method,
            code: "ok",
        };
        metrics.grpc.requests.get(answer).get()
    }

    /// A traced request keeps its trace through a batch: the shard's work on its heartbeat, its
    /// online and its status read is a span of that trace, the child of the request's span,
    /// though each went in a batch; an untraced request's item carries no context and makes no
    /// span of its own.
    #[tokio::test]
    async fn a_batched_request_keeps_its_trace_on_the_shard() {
        use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
        use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        use tracing_subscriber::layer::SubscriberExt;

        // This test's thread only (a current-thread runtime: the shard's tasks run here too).
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _default = tracing::subscriber::set_default(subscriber);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        /// Turns exporting off again, also when an assertion fails.
        struct Exporting;
        impl Drop for Exporting {
            fn drop(&mut self) {
                crate::telemetry::set_exporting(false);
            }
        }
        crate::telemetry::set_exporting(true);
        let _exporting = Exporting;

        let (c, _, gateway) = older_shard(&[]).await;
        let request = tracing::info_span!("request");
        let parent = request.context().span().span_context().clone();
        assert!(parent.is_sampled());
        let beat = c.heartbeat(7, "d", true).instrument(request.clone()).await;
        assert_eq!(beat, Answer::Accepted);
        let online = c.online(7, "d2", Platform::Ios, 1);
        let online = online.instrument(request.clone()).await;
        assert!(matches!(online, ItemAnswer::Done(_)), "{online:?}");
        let read = c.status(7, 0).instrument(request.clone()).await;
        assert!(matches!(read, ItemAnswer::Done(_)), "{read:?}");
        assert_eq!(c.heartbeat(7, "d", false).await, Answer::Accepted);
        assert!(matches!(c.status(7, 0).await, ItemAnswer::Done(_)));
        assert_eq!(gateway.grpc.heartbeats_batched.get(), 2);
        assert_eq!(gateway.grpc.onlines_batched.get(), 1);
        assert_eq!(gateway.grpc.reads_batched.get(), 2);

        let items: Vec<_> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == "grpc.item")
            .collect();
        let mut methods: Vec<String> = items
            .iter()
            .map(|s| {
                let m = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "rpc.method");
                m.map(|kv| kv.value.to_string()).unwrap_or_default()
            })
            .collect();
        methods.sort();
        assert_eq!(
            methods,
            ["HeartbeatBatch", "OnlineBatch", "StatusBatch"],
            "one span per traced item"
        );
        for s in &items {
            assert_eq!(s.span_context.trace_id(), parent.trace_id());
            assert_eq!(s.parent_span_id, parent.span_id());
        }
    }

    /// A shard that does not serve `HeartbeatStream` (an older version, during a rolling
    /// upgrade) answers `Unimplemented` to it: its lane then sends unary `HeartbeatBatch` calls,
    /// whose answers are the shard's, and does not try the stream again.
    #[tokio::test]
    async fn a_shard_without_the_stream_gets_unary_batches() {
        let (c, metrics, gateway) = older_shard(&["HeartbeatStream"]).await;
        assert_eq!(c.heartbeat(7, "d", true).await, Answer::Accepted);
        assert_eq!(c.heartbeat(8, "d", true).await, Answer::NotOnline);
        assert_eq!(c.heartbeat(7, "d", false).await, Answer::Accepted);
        assert_eq!(gateway.grpc.heartbeats_alone.get(), 0, "none sent alone");
        assert_eq!(gateway.grpc.heartbeat_batches.get(), 3);
        assert_eq!(
            gateway.grpc.heartbeat_streams_opened.get(),
            1,
            "the stream was tried once"
        );
        let unary = served_ok(&metrics, "HeartbeatBatch");
        assert_eq!(unary, 3, "the shard served each batch as a unary call");
    }

    /// Onlines in a batch come back with the user's status as the shard has it; one the shard
    /// refuses for good (a bad device id) with the error the routed path would answer, not sent
    /// again. Concurrent onlines share calls.
    #[tokio::test]
    async fn onlines_in_a_batch_get_their_status_or_their_error() {
        let (c, _, gateway) = older_shard(&[]).await;
        let ItemAnswer::Done(status) = c.online(7, "e", Platform::Ios, 1).await else {
            panic!("not done in a batch");
        };
        assert_eq!(status.status, v1::Status::Online as i32);
        let mut devices: Vec<_> = status
            .devices
            .iter()
            .map(|d| d.device_id.as_str())
            .collect();
        devices.sort();
        assert_eq!(devices, ["d", "e"]);
        let refused = c.online(9, "", Platform::Ios, 1).await;
        let routed = crate::presence::validate_device_id("").unwrap_err();
        assert!(
            matches!(&refused, ItemAnswer::Failed(e) if *e == routed),
            "{refused:?}, not {routed:?}"
        );
        let many =
            futures::future::join_all((100..164).map(|u| c.online(u, "d", Platform::Web, 1)));
        for a in many.await {
            assert!(matches!(a, ItemAnswer::Done(_)), "{a:?}");
        }
        let g = &gateway.grpc;
        assert_eq!(g.onlines_batched.get(), 66);
        assert_eq!(g.onlines_alone.get(), 0);
        assert!(
            g.online_batches.get() <= 2 + 32,
            "{} calls",
            g.online_batches.get()
        );
    }

    /// A result's answer (an online's or a read's): the status; a final error as it is; a
    /// refusal the routed path tries again (a wrong owner during a handoff, a shard not ready),
    /// or no error at all, alone.
    #[test]
    fn an_item_result_is_done_failed_or_alone() {
        let result = |code: u32, status, error: Option<Error>| v1::ItemResult {
            index: 0,
            code,
            status,
            error: error.map(crate::proto::item_error),
        };
        let done = result(0, Some(v1::StatusReply::default()), None);
        assert!(matches!(ItemAnswer::of(done), ItemAnswer::Done(_)));
        let full = result(409, None, Some(Error::TooManyDevices(4)));
        assert!(matches!(
            ItemAnswer::of(full),
            ItemAnswer::Failed(Error::TooManyDevices(4))
        ));
        for e in [
            Error::WrongOwner { epoch: 3 },
            Error::ShardUnavailable("partition loading".into()),
        ] {
            let r = result(e.status().as_u16() as u32, None, Some(e));
            assert!(matches!(ItemAnswer::of(r), ItemAnswer::Alone));
        }
        assert!(matches!(
            ItemAnswer::of(result(500, None, None)),
            ItemAnswer::Alone
        ));
    }

    /// A shard that does not serve `OnlineBatch` (an older version) gets every online alone:
    /// the batch is tried once, and not again.
    #[tokio::test]
    async fn a_shard_without_online_batches_gets_every_online_alone() {
        let (c, metrics, gateway) = older_shard(&["OnlineBatch"]).await;
        for device in ["e", "f"] {
            let a = c.online(7, device, Platform::Ios, 1).await;
            assert!(matches!(a, ItemAnswer::Alone), "{a:?}");
        }
        assert_eq!(gateway.grpc.onlines_alone.get(), 2);
        assert_eq!(gateway.grpc.online_batches.get(), 1, "tried once");
        let served = served_ok(&metrics, "OnlineBatch");
        assert_eq!(served, 0);
    }

    /// Status reads in a batch come back as each read's viewer sees the user: the truth for a
    /// service read and hidden (OFFLINE, no devices) for a viewer the user hides from, though
    /// both went in one batch; a read the shard refuses for good (an invalid viewer) with the
    /// error the routed path would answer. Concurrent reads share calls.
    #[tokio::test]
    async fn status_reads_in_a_batch_get_each_viewers_view() {
        let (c, metrics, gateway) = older_shard(&[]).await;
        let (truth, hidden) = tokio::join!(c.status(11, 0), c.status(11, 12));
        let ItemAnswer::Done(truth) = truth else {
            panic!("not done in a batch: {truth:?}");
        };
        assert_eq!(truth.status, v1::Status::Online as i32);
        assert_eq!(truth.devices.len(), 1);
        let ItemAnswer::Done(hidden) = hidden else {
            panic!("not done in a batch: {hidden:?}");
        };
        assert_eq!(hidden.status, v1::Status::Offline as i32);
        assert!(hidden.devices.is_empty(), "{hidden:?}");
        assert_eq!(hidden.last_active_time, 0, "{hidden:?}");
        assert_eq!(gateway.grpc.read_batches.get(), 1, "both in one batch");

        let refused = c.status(7, u64::MAX).await;
        let routed = crate::presence::validate_user_id(u64::MAX).unwrap_err();
        assert!(
            matches!(&refused, ItemAnswer::Failed(e) if *e == routed),
            "{refused:?}, not {routed:?}"
        );
        let many = futures::future::join_all((100..164).map(|u| c.status(u, 0)));
        for a in many.await {
            let ItemAnswer::Done(view) = a else {
                panic!("not done in a batch: {a:?}");
            };
            assert_eq!(view.status, v1::Status::Offline as i32);
        }
        let g = &gateway.grpc;
        assert_eq!(g.reads_batched.get(), 67);
        assert_eq!(g.reads_alone.get(), 0);
        // Each `join_all` queues all its reads before the lane runs (one thread): a batch each.
        assert!(g.read_batches.get() <= 2 + 2, "{}", g.read_batches.get());
        assert_eq!(
            served_ok(&metrics, "StatusBatch"),
            g.read_batches.get(),
            "the shard served every batch"
        );
        assert_eq!(served_ok(&metrics, "Status"), 0, "and no lone read");
    }

    /// A shard refuses a batch of more items than it takes at once, as a bad request naming the
    /// limit, and runs none of them; a batch at the limit is served.
    #[tokio::test]
    async fn a_shard_refuses_a_batch_over_its_limit() {
        let (addr, metrics) = shard_at(&[]).await;
        let mut c = Clients::new(Duration::from_secs(1), Duration::from_secs(5))
            .get(&addr)
            .unwrap();
        let read = |user_id| v1::UserRequest {
            user_id,
            ..Default::default()
        };
        let reads = |n: u64| v1::StatusBatchRequest {
            epoch: 0,
            reads: (1..=n).map(read).collect(),
        };
        let e = c.status_batch(reads(1025)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), "at most 1024 reads per call");
        let mut ok = c.status_batch(reads(1024)).await.unwrap().into_inner();
        let mut answered = 0;
        while let Some(r) = ok.message().await.unwrap() {
            assert_eq!(r.code, 0, "{r:?}");
            answered += 1;
        }
        assert_eq!(answered, 1024);

        let online = |user_id| v1::OnlineRequest {
            user_id,
            device_id: "d".into(),
            platform: v1::Platform::Web as i32,
            ..Default::default()
        };
        let onlines = v1::OnlineBatchRequest {
            epoch: 0,
            onlines: (1000..1000 + 4097).map(online).collect(),
        };
        let e = c.online_batch(onlines).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), "at most 4096 onlines per call");
        let now = c.status(read(1000)).await.unwrap().into_inner();
        assert_eq!(now.status, v1::Status::Offline as i32, "none was run");

        let beat = |user_id| v1::HeartbeatRequest {
            user_id,
            device_id: "d".into(),
            ..Default::default()
        };
        let beats = v1::HeartbeatBatchRequest {
            epoch: 0,
            heartbeats: (1..=100_001).map(beat).collect(),
        };
        let e = c.heartbeat_batch(beats).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), "at most 100000 heartbeats per call");
        assert_eq!(served_ok(&metrics, "StatusBatch"), 1);
        assert_eq!(served_ok(&metrics, "OnlineBatch"), 0);
    }

    /// A shard that does not serve `StatusBatch` (an older version) gets every read alone: the
    /// batch is tried once, and not again.
    #[tokio::test]
    async fn a_shard_without_status_batches_gets_every_read_alone() {
        let (c, metrics, gateway) = older_shard(&["StatusBatch"]).await;
        for _ in 0..2 {
            let a = c.status(7, 0).await;
            assert!(matches!(a, ItemAnswer::Alone), "{a:?}");
        }
        assert_eq!(gateway.grpc.reads_alone.get(), 2);
        assert_eq!(gateway.grpc.read_batches.get(), 1, "tried once");
        assert_eq!(served_ok(&metrics, "StatusBatch"), 0);
    }

    /// Through a gateway's router, a read of an older shard (no `StatusBatch`) still gets the
    /// view its viewer may see: alone, on the routed path, as a `Status` call.
    #[tokio::test]
    async fn a_router_reads_an_older_shard_alone_with_the_same_view() {
        use crate::peer::{Coalesce, Router};
        use crate::privacy::Viewer;
        use crate::service::Presence;

        let (addr, metrics) = shard_at(&["StatusBatch"]).await;
        let (ring, gateway) = gateway_of(addr);
        let clients = Clients::new(Duration::from_secs(1), Duration::from_secs(1));
        let all = Coalesce {
            heartbeats: true,
            onlines: true,
            reads: true,
        };
        let router = Router::new(ring, clients, Duration::from_secs(4), gateway.clone())
            .coalescing(Duration::from_millis(1), all);
        let truth = router.status(11, Viewer::Truth).await.unwrap();
        assert_eq!(truth.status, crate::presence::Status::Online);
        assert_eq!(truth.devices.len(), 1);
        let hidden = router.status(11, Viewer::User(12)).await.unwrap();
        assert_eq!(hidden.status, crate::presence::Status::Offline);
        assert!(hidden.devices.is_empty());
        assert_eq!(served_ok(&metrics, "Status"), 2, "each read went alone");
        assert_eq!(gateway.grpc.reads_alone.get(), 2);
        assert_eq!(
            gateway.grpc.read_batches.get(),
            1,
            "the batch was tried once"
        );
    }

    /// A shard's `Unimplemented` holds for [`RETRY_UNSUPPORTED`]; then the call is tried again
    /// (the shard may have been upgraded at the same address).
    #[tokio::test(start_paused = true)]
    async fn an_older_shard_is_tried_again_after_a_while() {
        let u = Unsupported::default();
        assert!(!u.now(), "supported until it says otherwise");
        u.mark();
        assert!(u.now());
        tokio::time::advance(RETRY_UNSUPPORTED - Duration::from_millis(1)).await;
        assert!(u.now());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!u.now(), "tried again");
    }

    #[test]
    fn only_acceptance_and_not_online_are_final() {
        assert_eq!(Answer::of_code(0), Answer::Accepted);
        assert_eq!(Answer::of_code(404), Answer::NotOnline);
        for code in [400, 429, 500, 503] {
            assert_eq!(Answer::of_code(code), Answer::Alone, "{code}");
        }
    }
}
