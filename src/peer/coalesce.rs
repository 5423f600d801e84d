//! Heartbeat coalescing on a gateway: heartbeats that queue while earlier batches are in
//! flight go to each shard as one batch, on a `HeartbeatStream` kept open per shard, and each
//! answer goes back to its request.
//!
//! The batching adapts to load: each shard has a lane, whose task takes whatever has queued and
//! sends it as one batch, with at most `IN_FLIGHT` batches out at once. A batch goes once a few
//! scheduler passes added nothing to it (or it holds `FILL`, or the window is out): under load
//! it holds the requests that arrived together and what arrived while the previous call was
//! out; a lone heartbeat waits only for those passes.
//! Coalescing never changes an answer: a heartbeat the shard accepted is done, one of a device
//! that is not online gets that answer, and any other (refused by the shard, or whose batch
//! failed) is handed back to the caller, who sends it alone on the routed path with its
//! retries, deadline and exact error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::client::Clients;
use super::{inject_trace, Timed};
use crate::metrics::Metrics;
use crate::presence::UserId;
use crate::proto::v1;
use crate::ring::Ring;

/// Most heartbeats in one call.
const MAX_BATCH: usize = 512;
/// Calls out at once to one shard.
const IN_FLIGHT: usize = 1;
/// Heartbeats waiting for one shard; beyond this, callers take the routed path.
const QUEUE: usize = 8192;
/// A batch this full goes without waiting out the window.
const FILL: usize = 64;
/// Scheduler passes in a row that add nothing to a batch before it goes.
const QUIET_PASSES: u32 = 2;

struct Beat {
    user: UserId,
    device: String,
    active: bool,
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

/// The gateway's end: one lane (a queue and its sender task) per shard address.
pub struct Coalescer {
    ring: watch::Receiver<Arc<Ring>>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    /// The route deadline (`PRESENCE_ROUTE_TIMEOUT`).
    deadline: Duration,
    /// How long a batch waits to fill (`PRESENCE_COALESCE_WINDOW`).
    window: Duration,
    lanes: Mutex<HashMap<String, mpsc::Sender<Beat>>>,
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
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Sends the heartbeat in a batch to its owner.
    pub async fn heartbeat(&self, user: UserId, device: &str, active: bool) -> Answer {
        let (done, answer) = oneshot::channel();
        let beat = Beat {
            user,
            device: device.to_owned(),
            active,
            done,
        };
        let sent = {
            let ring = self.ring.borrow();
            match ring.owner_of(user) {
                Some(owner) => self.enqueue(&ring, owner, beat),
                None => false,
            }
        };
        let answer = match sent {
            true => answer.await.unwrap_or(Answer::Alone),
            false => Answer::Alone,
        };
        if answer == Answer::Alone {
            self.metrics.grpc.heartbeats_alone.inc();
        }
        answer
    }

    /// Queues `beat` on the lane of `owner`, which starts on first use; false when it is full.
    /// Starting a lane drops those of shards no longer in `ring` (their tasks end once their
    /// queues are drained), so the lanes never outnumber the shards by more than those that
    /// left since the last start.
    fn enqueue(&self, ring: &Ring, owner: &str, beat: Beat) -> bool {
        let mut lanes = self.lanes.lock();
        if let Some(tx) = lanes.get(owner).filter(|tx| !tx.is_closed()) {
            return tx.try_send(beat).is_ok();
        }
        lanes.retain(|addr, _| ring.members().iter().any(|m| m == addr));
        let (tx, rx) = mpsc::channel(QUEUE);
        let lane = Lane {
            owner: owner.to_owned(),
            timeout: self.deadline / 4,
            window: self.window,
            ring: self.ring.clone(),
            clients: self.clients.clone(),
            metrics: self.metrics.clone(),
            pipe: tokio::sync::Mutex::new(None),
            unary: AtomicBool::new(false),
        };
        tokio::spawn(lane.run(rx));
        let queued = tx.try_send(beat).is_ok();
        lanes.insert(owner.to_owned(), tx);
        queued
    }
}

/// The sender task of one shard: takes whatever queued, sends it as one batch.
struct Lane {
    owner: String,
    timeout: Duration,
    window: Duration,
    ring: watch::Receiver<Arc<Ring>>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    /// The lane's open `HeartbeatStream`, if any. One batch is out at a time ([`IN_FLIGHT`]),
    /// so the lock is never contended; it also keeps a batch's request and answer together.
    pipe: tokio::sync::Mutex<Option<Pipe>>,
    /// The shard does not serve `HeartbeatStream`: unary `HeartbeatBatch` calls instead.
    unary: AtomicBool,
}

/// A `HeartbeatStream`: batches go in on `tx`, and each one's answer comes back on `replies`.
struct Pipe {
    tx: mpsc::Sender<v1::HeartbeatBatchRequest>,
    replies: tonic::Streaming<v1::HeartbeatBatchReply>,
}

/// Moves what has queued into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<Beat>, batch: &mut Vec<Beat>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(b) => batch.push(b),
            Err(_) => break,
        }
    }
}

impl Lane {
    async fn run(self, mut rx: mpsc::Receiver<Beat>) {
        let calls = Arc::new(Semaphore::new(IN_FLIGHT));
        let this = Arc::new(self);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            this.fill(&mut rx, &mut batch).await;
            let Ok(permit) = calls.clone().acquire_owned().await else {
                return;
            };
            drain(&mut rx, &mut batch);
            let beats = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            let this = this.clone();
            tokio::spawn(async move {
                this.send(beats).await;
                drop(permit);
            });
        }
    }

    /// Lets the batch fill before it goes: the lane yields to the runtime, which reads the
    /// requests that have arrived (each queues its heartbeat), and takes what they queued; it
    /// goes once [`QUIET_PASSES`] passes in a row added nothing, once it holds [`FILL`], or when
    /// the window is out. No timer: under load a batch gathers the requests that arrived
    /// together, and a lone heartbeat waits only for a few scheduler passes.
    async fn fill(&self, rx: &mut mpsc::Receiver<Beat>, batch: &mut Vec<Beat>) {
        if self.window.is_zero() {
            return;
        }
        let until = tokio::time::Instant::now() + self.window;
        let mut quiet = 0;
        while quiet < QUIET_PASSES && batch.len() < FILL && tokio::time::Instant::now() < until {
            tokio::task::yield_now().await;
            let before = batch.len();
            drain(rx, batch);
            quiet = if batch.len() == before { quiet + 1 } else { 0 };
        }
    }

    /// Sends one batch; answers every beat.
    async fn send(&self, beats: Vec<Beat>) {
        self.metrics.grpc.heartbeat_batches.inc();
        self.metrics
            .grpc
            .heartbeats_batched
            .inc_by(beats.len() as u64);
        let epoch = self.ring.borrow().epoch();
        let (dones, heartbeats): (Vec<_>, Vec<_>) = beats
            .into_iter()
            .map(|b| {
                let h = v1::HeartbeatRequest {
                    epoch,
                    user_id: b.user,
                    device_id: b.device,
                    active: b.active,
                };
                (b.done, h)
            })
            .unzip();
        let t = Timed::new(self.metrics.clone(), "client", "HeartbeatBatch");
        let req = v1::HeartbeatBatchRequest { epoch, heartbeats };
        let answer = match self.unary.load(Ordering::Relaxed) {
            false => self.streamed(req).await,
            true => {
                self.unary(req, tokio::time::Instant::now() + self.timeout)
                    .await
            }
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

    /// The batch on the lane's stream, which it opens first if there is none. A stalled shard
    /// holds its lane for a quarter of the route deadline at most: its heartbeats then take the
    /// routed path, which has the whole deadline. The stream goes back to the lane only after an
    /// answer: any failure drops it (the next batch opens another), so that a late answer is
    /// never taken for the next batch's. A shard that does not serve the stream (an older
    /// version, during a rolling upgrade) gets unary calls from then on.
    async fn streamed(
        &self,
        req: v1::HeartbeatBatchRequest,
    ) -> Result<v1::HeartbeatBatchReply, tonic::Status> {
        let until = tokio::time::Instant::now() + self.timeout;
        let mut pipe = self.pipe.lock().await;
        let mut p = match pipe.take() {
            Some(p) => p,
            None => match tokio::time::timeout_at(until, self.open()).await {
                Ok(Ok(p)) => p,
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    self.unary.store(true, Ordering::Relaxed);
                    return self.unary(req, until).await;
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
    async fn open(&self) -> Result<Pipe, tonic::Status> {
        let mut c = self.clients.get(&self.owner)?;
        self.metrics.grpc.heartbeat_streams_opened.inc();
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
        req: v1::HeartbeatBatchRequest,
        until: tokio::time::Instant,
    ) -> Result<v1::HeartbeatBatchReply, tonic::Status> {
        let mut c = self.clients.get(&self.owner)?;
        let mut req = tonic::Request::new(req);
        inject_trace(&mut req);
        tokio::time::timeout_at(until, c.heartbeat_batch(req))
            .await
            .unwrap_or_else(|_| Err(timed_out()))
            .map(tonic::Response::into_inner)
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
            let mut l: Vec<String> = c.lanes.lock().keys().cloned().collect();
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

    /// A shard that does not serve `HeartbeatStream` (an older version, during a rolling
    /// upgrade) answers `Unimplemented` to it: its lane then sends unary `HeartbeatBatch` calls,
    /// whose answers are the shard's, and does not try the stream again.
    #[tokio::test]
    async fn a_shard_without_the_stream_gets_unary_batches() {
        use crate::ownership::Table;
        use crate::peer::ShardService;
        use crate::presence::{Platform, Rules};
        use crate::proto::v1::presence_shard_server::PresenceShardServer;
        use crate::push::fanout::Fanout;
        use crate::service::Presence;
        use crate::shard::Shard;
        use crate::store::faulty::FaultyStore;
        use tonic::server::NamedService;

        let metrics = Arc::new(Metrics::new());
        let shard = Arc::new(Shard::new(
            FaultyStore::new(true),
            Rules::default(),
            Duration::from_secs(30),
            metrics.clone(),
            Table::owning_all(),
        ));
        shard.online(7, "d", Platform::Web).await.unwrap();
        let service = ShardService {
            shard,
            own: Table::owning_all(),
            metrics: metrics.clone(),
            fanout: Fanout::new(metrics.clone(), 64),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        // The shard's service, but the stream refused as a server without it refuses it.
        let stream = format!(
            "/{}/HeartbeatStream",
            <PresenceShardServer<ShardService> as NamedService>::NAME
        );
        let older = tonic::service::Routes::new(PresenceShardServer::new(service))
            .into_axum_router()
            .route(
                &stream,
                axum::routing::post(|| async {
                    tonic::Status::unimplemented("an older shard").into_http::<axum::body::Body>()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(older.into())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let (_tx, ring) = watch::channel(Arc::new(Ring::new([addr])));
        let gateway = Arc::new(Metrics::new());
        let c = Coalescer::new(
            ring,
            Clients::new(Duration::from_secs(1), Duration::from_secs(1)),
            gateway.clone(),
            Duration::from_secs(4),
            Duration::from_millis(1),
        );
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
        let unary = metrics
            .grpc
            .requests
            .get(crate::metrics::GrpcAnswer {
                side: "server",
                method: "HeartbeatBatch",
                code: "ok",
            })
            .get();
        assert_eq!(unary, 3, "the shard served each batch as a unary call");
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
