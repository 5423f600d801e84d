//! The presence operations as the API calls them: one trait, served in-process by a shard and
//! remotely by the gateway's router.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::presence::{BatchEntry, Platform, Privacy, Settings, StatusView, UserId, Viewer};
use crate::store::SubscriptionMode;

/// Which registration of a device an `online` is: random for each WebSocket and each REST
/// `online`, so that a closed socket's late `offline` can tell that the device registered again
/// since (through any gateway). 0: unknown (a peer that sends none).
pub type Session = u64;

/// A new session: random, never 0.
pub fn new_session() -> Session {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Each `RandomState` is randomly keyed; hashing a counter keeps two calls apart even if
    // their keys were not.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.finish().max(1)
}

/// Why a closed socket's `offline` may not apply: the device registered again since the
/// socket's session, or was seen within `seen_within` (through any gateway).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    pub session: Session,
    pub seen_within: Option<Duration>,
}

/// The presence operations, as the API calls them. The in-process [`crate::shard::Shard`]
/// implements it, and so does the gateway's [`crate::peer::Router`], which calls the owning shard.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// A device comes online, as a new registration of it.
    async fn online(
        &self,
        user: UserId,
        device: &str,
        platform: Platform,
    ) -> Result<StatusView, Error> {
        self.online_session(user, device, platform, new_session())
            .await
    }
    /// A device comes online as registration `session` (a WebSocket's).
    async fn online_session(
        &self,
        user: UserId,
        device: &str,
        platform: Platform,
        session: Session,
    ) -> Result<StatusView, Error>;
    /// A device goes offline; for a closed WebSocket (`closed`), not if the device registered
    /// again or was seen since (its close grace, or a drain).
    async fn offline(
        &self,
        user: UserId,
        device: &str,
        closed: Option<Closed>,
    ) -> Result<(), Error>;
    async fn heartbeat(&self, user: UserId, device: &str, active: bool) -> Result<(), Error>;
    /// `user`'s presence as `viewer` may see it (see [`crate::privacy`]).
    async fn status(&self, user: UserId, viewer: Viewer) -> Result<StatusView, Error>;
    /// One entry per distinct user, in request order, as `viewer` may see them.
    async fn batch(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<BatchEntry>, Error>;
    async fn set_status(&self, user: UserId, settings: Settings) -> Result<StatusView, Error>;
    async fn clear_status(&self, user: UserId) -> Result<StatusView, Error>;
    /// Full views of many users, one per distinct user, in request order, as `viewer` may see
    /// them.
    async fn views(&self, users: &[UserId], viewer: Viewer) -> Result<Vec<StatusView>, Error>;
    /// `user`'s privacy settings.
    async fn privacy(&self, user: UserId) -> Result<Privacy, Error>;
    /// Replaces `user`'s privacy settings; answers them as stored. Those who gain or lose sight
    /// of the user are pushed its new view.
    async fn set_privacy(&self, user: UserId, privacy: Privacy) -> Result<Privacy, Error>;
    /// The targets `user` subscribes to.
    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error>;
    /// Changes `user`'s subscriptions; answers the new list.
    async fn subscribe(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
    ) -> Result<Vec<UserId>, Error>;
    /// Whether this node can serve at all (a gateway: some shard is in its ring; a shard: its
    /// start grace is over, so that Kubernetes, which makes ready shards the members, adds it to
    /// the ring only once it can take partitions). Never the store's health: one stalled Redis
    /// master must fail only its own users' requests, not make a node unready or take a shard
    /// out of the ring.
    async fn healthy(&self) -> bool;
}
