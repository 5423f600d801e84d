//! The gateway side: a [`Presence`] that routes every call to the shard owning the user, and the
//! gRPC health probe that static discovery uses.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::coalesce::{Answer, Coalescer, ItemAnswer};
use super::{inject_trace, Timed};
use crate::error::Error;
use crate::membership::{Probe, Probed};
use crate::metrics::Metrics;
use crate::presence::{BatchEntry, Platform, Privacy, Settings, StatusView, UserId, Viewer};
use crate::proto::{self, v1};
use crate::ring::Ring;
use crate::service::{Closed, Presence, Session};
use crate::store::SubscriptionMode;

pub type ShardClient = v1::presence_shard_client::PresenceShardClient<Channel>;

/// One lazily connected HTTP/2 channel per shard address.
pub struct Clients {
    map: Mutex<HashMap<String, ShardClient>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// mTLS to the shards (`PRESENCE_GRPC_TLS_*`), or plaintext.
    tls: Option<super::tls::GrpcTls>,
}

impl Clients {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> Arc<Clients> {
        Clients::with_tls(connect_timeout, request_timeout, None)
    }

    pub fn with_tls(
        connect_timeout: Duration,
        request_timeout: Duration,
        tls: Option<super::tls::GrpcTls>,
    ) -> Arc<Clients> {
        Arc::new(Clients {
            map: Mutex::new(HashMap::new()),
            connect_timeout,
            request_timeout,
            tls,
        })
    }

    pub fn get(&self, addr: &str) -> Result<ShardClient, Error> {
        if let Some(c) = self.map.lock().get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Error::ShardUnavailable(format!("bad shard address {addr}: {e}")))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client())
                .map_err(|e| Error::ShardUnavailable(format!("TLS to {addr}: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = ShardClient::new(endpoint.connect_lazy());
        self.map.lock().insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}

/// Health-checks a shard over gRPC: alive and serving; and, by the incarnation each address
/// last answered with, whether a starting shard restarted.
pub struct GrpcProbe {
    clients: Arc<Clients>,
    incarnations: parking_lot::Mutex<HashMap<String, u64>>,
}

impl GrpcProbe {
    pub fn new(clients: Arc<Clients>) -> GrpcProbe {
        GrpcProbe {
            clients,
            incarnations: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

/// What a health reply says, given the incarnation remembered for the shard (if any): a
/// starting reply with another one comes from a restarted process (0 before: from a shard that
/// did not say; 0 now: unknown). Pure, for the tests.
pub fn probed(h: &v1::HealthReply, before: Option<u64>) -> Probed {
    let restarted = || before.is_some_and(|b| h.incarnation != 0 && b != h.incarnation);
    match h {
        h if !h.serving => Probed::Down,
        h if h.starting && restarted() => Probed::Restarted,
        h if h.starting => Probed::Starting,
        _ => Probed::Serving,
    }
}

/// [`probed`] with the incarnation `known` for `addr`, which the reply updates: from a starting
/// reply, or the first. A restarted process may answer serving once before its first ring
/// (with no other member, it is not starting yet); its next, starting reply must still read as
/// a restart.
fn remembered(known: &mut HashMap<String, u64>, addr: &str, h: &v1::HealthReply) -> Probed {
    let before = known.get(addr).copied();
    if h.starting || before.is_none_or(|b| b == 0) {
        known.insert(addr.to_owned(), h.incarnation);
    }
    probed(h, before)
}

#[async_trait]
impl Probe for GrpcProbe {
    async fn probe(&self, addr: &str) -> Probed {
        let Ok(mut c) = self.clients.get(addr) else {
            return Probed::Down;
        };
        match c.health(v1::HealthRequest {}).await {
            Ok(r) => remembered(&mut self.incarnations.lock(), addr, &r.into_inner()),
            Err(_) => Probed::Down,
        }
    }
}

/// A request with the current trace context in its metadata.
fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    inject_trace(&mut r);
    r
}

/// Routes each call to the user's owner on the ring; on "wrong owner" or an unavailable shard
/// it waits for the ring to change (or a short backoff) and retries, until its deadline.
pub struct Router {
    ring: watch::Receiver<Arc<Ring>>,
    clients: Arc<Clients>,
    deadline: Duration,
    metrics: Arc<Metrics>,
    /// Heartbeats (`PRESENCE_COALESCE_HEARTBEATS`), onlines (`PRESENCE_COALESCE_ONLINE`) and
    /// status reads (`PRESENCE_COALESCE_STATUS`) go in batches first, when on.
    coalescer: Option<Coalescer>,
    coalesce: Coalesce,
}

/// Which calls a gateway sends to the shards in batches first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Coalesce {
    pub heartbeats: bool,
    pub onlines: bool,
    pub reads: bool,
}

/// `call`, ended at `until`: a call still out then fails as a peer's deadline does (unavailable,
/// and not tried again: the deadline is out).
async fn by_deadline<T>(
    until: Instant,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout_at(until.into(), call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("route deadline")))
}

/// Whether the routed path tries a call again (on the owner of a fresh ring) after `e`.
pub(super) fn retriable(e: &Error) -> bool {
    matches!(e, Error::WrongOwner { .. } | Error::ShardUnavailable(_))
}

impl Router {
    pub fn new(
        ring: watch::Receiver<Arc<Ring>>,
        clients: Arc<Clients>,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Router {
        Router {
            ring,
            clients,
            deadline,
            metrics,
            coalescer: None,
            coalesce: Coalesce::default(),
        }
    }

    /// Sends the calls `which` names in per-shard batches (see `coalesce`), each lane letting a
    /// batch fill for at most `window`.
    pub fn coalescing(mut self, window: std::time::Duration, which: Coalesce) -> Router {
        self.coalesce = which;
        self.coalescer = (which.heartbeats || which.onlines || which.reads).then(|| {
            Coalescer::new(
                self.ring.clone(),
                self.clients.clone(),
                self.metrics.clone(),
                self.deadline,
                window,
            )
        });
        self
    }

    /// Waits after a retriable failure: for the ring to change, at most `backoff`.
    async fn pause(
        &self,
        rx: &mut watch::Receiver<Arc<Ring>>,
        e: &Error,
        attempt: u32,
        until: Instant,
    ) -> bool {
        let now = Instant::now();
        if now >= until {
            return false;
        }
        if matches!(e, Error::WrongOwner { .. }) {
            self.metrics.grpc.wrong_owner_retries.inc();
        }
        let backoff = Duration::from_millis(25 << attempt.min(4)).min(until - now);
        let _ = tokio::time::timeout(backoff, rx.changed()).await;
        true
    }

    async fn route<T, F, Fut>(
        &self,
        user: UserId,
        method: &'static str,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(ShardClient, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.route_until(user, method, Instant::now() + self.deadline, call)
            .await
    }

    /// [`Self::route`] by `until`: a request that first tried a batch goes alone with what is
    /// left of its deadline, and every attempt ends by then (as unavailable: 503).
    async fn route_until<T, F, Fut>(
        &self,
        user: UserId,
        method: &'static str,
        until: Instant,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(ShardClient, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut rx = self.ring.clone();
        let mut attempt = 0;
        loop {
            let ring = rx.borrow_and_update().clone();
            let result = match ring.owner_of(user) {
                None => Err(Error::ShardUnavailable("no shard in the ring".into())),
                Some(owner) => match self.clients.get(owner) {
                    Ok(client) => {
                        let t = Timed::new(self.metrics.clone(), "client", method);
                        let answer = by_deadline(until, call(client, ring.epoch())).await;
                        t.finish(answer)
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Err(e) if retriable(&e) => {
                    if !self.pause(&mut rx, &e, attempt, until).await {
                        return Err(e);
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Splits the distinct users by owner and calls every owner at once, one call per shard;
    /// users whose shard failed with a retriable error are regrouped on the fresh ring and asked
    /// again. Answers one item per distinct user, in request order.
    async fn scatter<T, F, Fut>(
        &self,
        users: &[UserId],
        viewer: Viewer,
        method: &'static str,
        until: Instant,
        call: F,
    ) -> Result<Vec<T>, Error>
    where
        F: Fn(ShardClient, v1::BatchRequest) -> Fut + Clone,
        Fut: Future<Output = Result<tonic::Response<Vec<T>>, tonic::Status>>,
    {
        let mut seen = hashbrown::HashSet::with_capacity(users.len());
        let users: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let mut out: Vec<Option<T>> = (0..users.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..users.len()).collect();
        let mut rx = self.ring.clone();
        let mut attempt = 0;
        while !pending.is_empty() {
            let ring = rx.borrow_and_update().clone();
            let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
            for &i in &pending {
                let owner = ring.owner_of(users[i]).unwrap_or_default().to_owned();
                groups.entry(owner).or_default().push(i);
            }
            let calls = groups.into_iter().map(|(owner, idxs)| {
                let call = call.clone();
                let ids: Vec<UserId> = idxs.iter().map(|&i| users[i]).collect();
                let epoch = ring.epoch();
                async move {
                    if owner.is_empty() {
                        return (
                            idxs,
                            Err(Error::ShardUnavailable("no shard in the ring".into())),
                        );
                    }
                    let c = match self.clients.get(&owner) {
                        Ok(c) => c,
                        Err(e) => return (idxs, Err(e)),
                    };
                    let t = Timed::new(self.metrics.clone(), "client", method);
                    let msg = v1::BatchRequest {
                        epoch,
                        user_ids: ids,
                        viewer: viewer.to_wire(),
                    };
                    let answer = by_deadline(until, call(c, msg)).await;
                    let r = t.finish(answer);
                    (idxs, r)
                }
            });
            let mut failed = Vec::new();
            let mut last_err = None;
            for (idxs, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(items) => {
                        if items.len() != idxs.len() {
                            return Err(Error::Internal(
                                "shard answered a batch of the wrong size".into(),
                            ));
                        }
                        for (i, e) in idxs.into_iter().zip(items) {
                            out[i] = Some(e);
                        }
                    }
                    Err(e) if retriable(&e) => {
                        failed.extend(idxs);
                        last_err = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            pending = failed;
            if let Some(e) = last_err {
                if !self.pause(&mut rx, &e, attempt, until).await {
                    return Err(e);
                }
                attempt += 1;
            }
        }
        Ok(out
            .into_iter()
            .map(|e| e.expect("every user answered"))
            .collect())
    }
}

#[async_trait]
impl Presence for Router {
    async fn online_session(
        &self,
        user: UserId,
        device: &str,
        platform: Platform,
        session: Session,
    ) -> Result<StatusView, Error> {
        let until = Instant::now() + self.deadline;
        if let Some(c) = self.coalescer.as_ref().filter(|_| self.coalesce.onlines) {
            match c.online(user, device, platform, session).await {
                ItemAnswer::Done(reply) => return StatusView::try_from(reply),
                ItemAnswer::Failed(e) => return Err(e),
                ItemAnswer::Alone => {}
            }
        }
        let device = device.to_owned();
        let reply = self
            .route_until(user, "Online", until, |mut c, epoch| {
                let msg = v1::OnlineRequest {
                    epoch,
                    user_id: user,
                    device_id: device.clone(),
                    platform: v1::Platform::from(platform) as i32,
                    session,
                    // A lone call's trace context goes in its metadata (`req`).
                    trace: Default::default(),
                };
                async move { c.online(req(msg)).await }
            })
            .await?;
        StatusView::try_from(reply)
    }

    async fn offline(
        &self,
        user: UserId,
        device: &str,
        closed: Option<Closed>,
    ) -> Result<(), Error> {
        let device = device.to_owned();
        let closed = closed.unwrap_or_default();
        let within = closed.seen_within.map_or(0, |d| d.as_millis() as u64);
        self.route(user, "Offline", |mut c, epoch| {
            let msg = v1::DeviceRequest {
                epoch,
                user_id: user,
                device_id: device.clone(),
                unless_seen_within_ms: within,
                session: closed.session,
            };
            async move { c.offline(req(msg)).await }
        })
        .await
        .map(|_| ())
    }

    async fn heartbeat(&self, user: UserId, device: &str, active: bool) -> Result<(), Error> {
        let until = Instant::now() + self.deadline;
        if let Some(c) = self.coalescer.as_ref().filter(|_| self.coalesce.heartbeats) {
            match c.heartbeat(user, device, active).await {
                Answer::Accepted => return Ok(()),
                Answer::NotOnline => return Err(Error::DeviceNotOnline),
                Answer::Alone => {}
            }
        }
        let device = device.to_owned();
        self.route_until(user, "Heartbeat", until, |mut c, epoch| {
            let msg = v1::HeartbeatRequest {
                epoch,
                user_id: user,
                device_id: device.clone(),
                active,
                trace: Default::default(),
            };
            async move { c.heartbeat(req(msg)).await }
        })
        .await
        .map(|_| ())
    }

    async fn status(&self, user: UserId, viewer: Viewer) -> Result<StatusView, Error> {
        let until = Instant::now() + self.deadline;
        if let Some(c) = self.coalescer.as_ref().filter(|_| self.coalesce.reads) {
            match c.status(user, viewer.to_wire()).await {
                ItemAnswer::Done(reply) => return StatusView::try_from(reply),
                ItemAnswer::Failed(e) => return Err(e),
                ItemAnswer::Alone => {}
            }
        }
        let reply = self
            .route_until(user, "Status", until, |mut c, epoch| {
                let msg = v1::UserRequest {
                    epoch,
                    user_id: user,
                    viewer: viewer.to_wire(),
                    trace: Default::default(),
                };
                async move { c.status(req(msg)).await }
            })
            .await?;
        StatusView::try_from(reply)
    }

    async fn views(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<StatusView>, Error> {
        // The view of one user (a socket's `query` or `subscribe` of one target) is its status
        // as the viewer sees it: a read in a batch, like `GET /status/{userId}`.
        let until = Instant::now() + self.deadline;
        if let ([user], Some(c)) = (users, self.coalescer.as_ref()) {
            if self.coalesce.reads {
                match c.status(*user, viewer.to_wire()).await {
                    ItemAnswer::Done(reply) => return Ok(vec![StatusView::try_from(reply)?]),
                    ItemAnswer::Failed(e) => return Err(e),
                    ItemAnswer::Alone => {}
                }
            }
        }
        self.scatter(users, viewer, "Views", until, |mut c, msg| async move {
            c.views(req(msg)).await.map(|r| r.map(|v| v.views))
        })
        .await?
        .into_iter()
        .map(StatusView::try_from)
        .collect()
    }

    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error> {
        self.route(user, "Subscriptions", |mut c, epoch| {
            let msg = v1::UserRequest {
                epoch,
                user_id: user,
                viewer: 0,
                trace: Default::default(),
            };
            async move { c.subscriptions(req(msg)).await }
        })
        .await
        .map(|r| r.targets)
    }

    async fn subscribe(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
    ) -> Result<Vec<UserId>, Error> {
        let targets = targets.to_vec();
        self.route(user, "Subscribe", |mut c, epoch| {
            let msg = v1::SubscribeRequest {
                epoch,
                user_id: user,
                mode: mode.as_str().to_owned(),
                targets: targets.clone(),
            };
            async move { c.subscribe(req(msg)).await }
        })
        .await
        .map(|r| r.targets)
    }

    async fn batch(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<BatchEntry>, Error> {
        let until = Instant::now() + self.deadline;
        self.scatter(users, viewer, "Batch", until, |mut c, msg| async move {
            c.batch(req(msg)).await.map(|r| r.map(|b| b.entries))
        })
        .await?
        .into_iter()
        .map(BatchEntry::try_from)
        .collect()
    }
    async fn set_status(&self, user: UserId, settings: Settings) -> Result<StatusView, Error> {
        let reply = self
            .route(user, "SetStatus", |mut c, epoch| {
                let msg = proto::settings_to(epoch, user, &settings);
                async move { c.set_status(req(msg)).await }
            })
            .await?;
        StatusView::try_from(reply)
    }

    async fn clear_status(&self, user: UserId) -> Result<StatusView, Error> {
        let reply = self
            .route(user, "ClearStatus", |mut c, epoch| {
                let msg = v1::UserRequest {
                    epoch,
                    user_id: user,
                    viewer: 0,
                    trace: Default::default(),
                };
                async move { c.clear_status(req(msg)).await }
            })
            .await?;
        StatusView::try_from(reply)
    }

    async fn privacy(&self, user: UserId) -> Result<Privacy, Error> {
        let reply = self
            .route(user, "Privacy", |mut c, epoch| {
                let msg = v1::UserRequest {
                    epoch,
                    user_id: user,
                    viewer: 0,
                    trace: Default::default(),
                };
                async move { c.privacy(req(msg)).await }
            })
            .await?;
        proto::privacy_from(&reply.privacy.unwrap_or_default())
    }

    async fn set_privacy(&self, user: UserId, privacy: Privacy) -> Result<Privacy, Error> {
        let wire = v1::PrivacySettings::from(&privacy);
        let reply = self
            .route(user, "SetPrivacy", |mut c, epoch| {
                let msg = v1::SetPrivacyRequest {
                    epoch,
                    user_id: user,
                    privacy: Some(wire.clone()),
                };
                async move { c.set_privacy(req(msg)).await }
            })
            .await?;
        proto::privacy_from(&reply.privacy.unwrap_or_default())
    }

    async fn healthy(&self) -> bool {
        !self.ring.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A health reply read with the incarnation remembered for the shard: a starting shard that
    /// answers with another one restarted, also after a 0 (an older shard); unknown now (0) or
    /// never asked is no restart; a serving or draining one is what it says. A probe remembers
    /// an incarnation from a starting reply, or the first.
    #[test]
    fn a_starting_shard_with_another_incarnation_restarted() {
        let reply = |serving, starting, incarnation| v1::HealthReply {
            serving,
            starting,
            incarnation,
            ..v1::HealthReply::default()
        };
        assert_eq!(probed(&reply(true, true, 7), Some(5)), Probed::Restarted);
        assert_eq!(probed(&reply(true, true, 7), Some(7)), Probed::Starting);
        assert_eq!(probed(&reply(true, true, 7), None), Probed::Starting);
        assert_eq!(probed(&reply(true, true, 7), Some(0)), Probed::Restarted);
        assert_eq!(probed(&reply(true, true, 0), Some(5)), Probed::Starting);
        assert_eq!(probed(&reply(true, false, 7), Some(5)), Probed::Serving);
        assert_eq!(probed(&reply(false, true, 7), Some(5)), Probed::Down);

        // A restarted process that answers serving once, before its first ring, then starting.
        let mut known = HashMap::new();
        let seq = [
            (reply(true, false, 5), Probed::Serving),
            (reply(true, false, 7), Probed::Serving),
            (reply(true, true, 7), Probed::Restarted),
            (reply(true, true, 7), Probed::Starting),
            (reply(true, false, 7), Probed::Serving),
        ];
        for (i, (h, want)) in seq.iter().enumerate() {
            assert_eq!(remembered(&mut known, "a:1", h), *want, "reply {i}");
        }
    }
}
