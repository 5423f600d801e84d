//! The shard side: which partitions this shard owns (and the handoff when the ring changes),
//! and the gRPC service that serves gateways for the users it owns.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response};
use tracing::Instrument;

use super::{extract_trace, Timed};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::presence::{validate_device_id, validate_user_id, UserId};
use crate::proto::{self, v1};
use crate::push::fanout::{Fanout, StreamItem};
use crate::ring::{partition_of, Ring, PARTITIONS};
use crate::shard::{Presence, Shard};
use crate::store::SubscriptionMode;

const NONE: u8 = 0;
const LOADING: u8 = 1;
const OWNED: u8 = 2;

/// Most users in one gRPC batch call.
const MAX_BATCH: usize = 100_000;

/// What this shard owns, partition by partition.
pub struct Ownership {
    me: String,
    states: Box<[AtomicU8]>,
    ring: RwLock<Arc<Ring>>,
    serving: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Ownership {
    pub fn new(me: String, metrics: Arc<Metrics>) -> Arc<Ownership> {
        Arc::new(Ownership {
            me,
            states: (0..PARTITIONS).map(|_| AtomicU8::new(NONE)).collect(),
            ring: RwLock::new(Arc::new(Ring::new(Vec::new()))),
            serving: AtomicBool::new(true),
            metrics,
        })
    }

    /// This shard's address in the ring.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn epoch(&self) -> u64 {
        self.ring.read().epoch()
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    fn owned_count(&self) -> usize {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == OWNED)
            .count()
    }

    /// Whether this shard serves `user` now.
    pub fn check(&self, user: UserId) -> Result<(), Error> {
        match self.states[partition_of(user) as usize].load(Ordering::Acquire) {
            OWNED => Ok(()),
            LOADING => Err(Error::ShardUnavailable("partition loading, retry".into())),
            _ => Err(Error::WrongOwner {
                epoch: self.epoch(),
            }),
        }
    }

    /// Follows the ring until `cancel`: releases partitions it lost, loads those it gained.
    /// A gained partition whose previous owner is still a member is loaded only after `grace`,
    /// so that the previous owner has seen the same ring and stopped its timers first.
    pub async fn run(
        self: Arc<Self>,
        shard: Arc<Shard>,
        mut ring: watch::Receiver<Arc<Ring>>,
        grace: Duration,
        cancel: CancellationToken,
    ) {
        // A shard that just started takes nothing for a grace: its view of the members is young
        // (health checks of its peers may not all have answered), and a partition taken on a
        // partial view would have two owners until the view is complete.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(grace) => {}
        }
        loop {
            let next = ring.borrow_and_update().clone();
            if self.serving() {
                self.apply(&shard, next, grace, &cancel).await;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = ring.changed() => if r.is_err() { return },
            }
        }
    }

    async fn apply(
        &self,
        shard: &Shard,
        next: Arc<Ring>,
        grace: Duration,
        cancel: &CancellationToken,
    ) {
        let prev = std::mem::replace(&mut *self.ring.write(), next.clone());
        let mut mine = vec![false; PARTITIONS as usize];
        for p in next.partitions_of(&self.me) {
            mine[p as usize] = true;
        }
        // Lost: refuse at once, then let go of the users.
        let mut lost = vec![false; PARTITIONS as usize];
        let mut any_lost = false;
        for p in 0..PARTITIONS as usize {
            if !mine[p] && self.states[p].swap(NONE, Ordering::AcqRel) != NONE {
                lost[p] = true;
                any_lost = true;
            }
        }
        if any_lost {
            let started = Instant::now();
            let users = shard.release(&lost).await;
            let n = lost.iter().filter(|l| **l).count();
            self.observe("released", started, n);
            tracing::info!(partitions = n, users, took = ?started.elapsed(), "released partitions");
        }
        // Gained: mark loading, wait for the previous owners if they are alive, then load. A
        // shard that just started (its previous ring does not hold it) takes the previous owners
        // from the ring of the other members, which is what everyone else was using.
        let others;
        let before: &Ring = if prev.members().contains(&self.me) {
            &prev
        } else {
            others = Ring::new(next.members().iter().filter(|m| **m != self.me).cloned());
            &others
        };
        let mut gained = Vec::new();
        let mut wait = false;
        for p in 0..PARTITIONS {
            if mine[p as usize] && self.states[p as usize].load(Ordering::Acquire) == NONE {
                self.states[p as usize].store(LOADING, Ordering::Release);
                gained.push(p);
                if let Some(owner) = before.owner(p) {
                    wait |= owner != self.me && next.members().iter().any(|m| m == owner);
                }
            }
        }
        self.metrics.owned_partitions.set(self.owned_count() as i64);
        if gained.is_empty() {
            return;
        }
        if wait {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(grace) => {}
            }
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let users = loop {
            match shard.recover(&gained).await {
                Ok(n) => break n,
                Err(e) => {
                    tracing::warn!(error = %e, partitions = gained.len(), "loading partitions failed, retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        // Serve only what is still ours (the ring may have moved on meanwhile; the next
        // apply releases the rest).
        for p in &gained {
            let _ = self.states[*p as usize].compare_exchange(
                LOADING,
                OWNED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.observe("gained", started, gained.len());
        self.metrics.owned_partitions.set(self.owned_count() as i64);
        tracing::info!(partitions = gained.len(), users, took = ?started.elapsed(), epoch = next.epoch(), "took over partitions");
    }

    fn observe(&self, direction: &str, started: Instant, partitions: usize) {
        self.metrics
            .handoffs
            .with_label_values(&[direction])
            .inc_by(partitions as u64);
        self.metrics
            .handoff_duration
            .with_label_values(&[direction])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Graceful shutdown: report not serving, refuse everything, let go of every user.
    pub async fn drain(&self, shard: &Shard) {
        self.serving.store(false, Ordering::Relaxed);
        let mut all = vec![false; PARTITIONS as usize];
        for (p, s) in self.states.iter().enumerate() {
            all[p] = s.swap(NONE, Ordering::AcqRel) != NONE;
        }
        let started = Instant::now();
        let users = shard.release(&all).await;
        self.observe("released", started, all.iter().filter(|o| **o).count());
        self.metrics.owned_partitions.set(0);
        tracing::info!(users, took = ?started.elapsed(), "handed off every partition");
    }
}

/// The gRPC service of a shard.
pub struct ShardService {
    pub shard: Arc<Shard>,
    pub own: Arc<Ownership>,
    pub metrics: Arc<Metrics>,
    pub fanout: Arc<Fanout>,
}

type Reply<T> = Result<Response<T>, tonic::Status>;

impl ShardService {
    fn timed(&self, method: &'static str) -> Timed {
        Timed::new(self.metrics.clone(), "server", method)
    }

    fn user(&self, user: u64) -> Result<UserId, Error> {
        let user = validate_user_id(user)?;
        self.own.check(user)?;
        Ok(user)
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
        if ids.len() > MAX_BATCH {
            return Err(Error::BadRequest(format!(
                "at most {MAX_BATCH} users per call"
            )));
        }
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
            Ok(self.shard.online(user, &device, platform).await?.into())
        })
        .await
    }

    async fn offline(&self, req: Request<v1::DeviceRequest>) -> Reply<v1::Empty> {
        self.serve("Offline", req, |r| async move {
            let user = self.user(r.user_id)?;
            let device = validate_device_id(&r.device_id)?;
            let within = (r.unless_seen_within_ms > 0)
                .then(|| std::time::Duration::from_millis(r.unless_seen_within_ms));
            self.shard.offline(user, &device, within).await?;
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
        self.serve("HeartbeatBatch", req, |r| async move {
            if r.heartbeats.len() > MAX_BATCH {
                return Err(Error::BadRequest(format!(
                    "at most {MAX_BATCH} heartbeats per call"
                )));
            }
            let mut codes = Vec::with_capacity(r.heartbeats.len());
            for h in r.heartbeats {
                let res = async {
                    let user = self.user(h.user_id)?;
                    let device = validate_device_id(&h.device_id)?;
                    self.shard.heartbeat(user, &device, h.active).await
                }
                .await;
                codes.push(match res {
                    Ok(()) => 0,
                    Err(e) => e.status().as_u16() as u32,
                });
            }
            Ok(v1::HeartbeatBatchReply { codes })
        })
        .await
    }

    async fn status(&self, req: Request<v1::UserRequest>) -> Reply<v1::StatusReply> {
        self.serve("Status", req, |r| async move {
            let user = self.user(r.user_id)?;
            Ok(self.shard.status(user).await?.into())
        })
        .await
    }

    async fn batch(&self, req: Request<v1::BatchRequest>) -> Reply<v1::BatchReply> {
        self.serve("Batch", req, |r| async move {
            self.users(&r.user_ids)?;
            let entries = self.shard.batch(&r.user_ids).await?;
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
                serving: self.own.serving() && self.shard.healthy().await,
                epoch: self.own.epoch(),
                owned_partitions: self.own.owned_count() as u32,
            })
        })
        .await
    }

    async fn views(&self, req: Request<v1::BatchRequest>) -> Reply<v1::ViewsReply> {
        self.serve("Views", req, |r| async move {
            self.users(&r.user_ids)?;
            let views = self.shard.views(&r.user_ids).await?;
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

    type EventsStream = Pin<Box<dyn futures::Stream<Item = StreamItem> + Send + 'static>>;

    /// A gateway's event stream: interest in, events out. Each user declared interesting gets
    /// its current state at once (if this shard owns it), then every change.
    async fn events(
        &self,
        req: Request<tonic::Streaming<v1::Interest>>,
    ) -> Reply<Self::EventsStream> {
        let mut inbound = req.into_inner();
        let (id, rx, tx) = self.fanout.open("gateway");
        let fanout = self.fanout.clone();
        let shard = self.shard.clone();
        let own = self.own.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
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
                let Ok(views) = shard.views(&owned).await else {
                    continue;
                };
                let now = shard.now();
                for view in views {
                    let ev = crate::push::fanout::to_wire(&crate::push::Event {
                        view,
                        changed_at: now,
                        subscriptions: None,
                        snapshot: true,
                    });
                    if tx.send(Ok(ev)).await.is_err() {
                        break;
                    }
                }
            }
            fanout.close(id);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
