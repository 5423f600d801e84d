//! Where presence state persists: the `Store` trait and its embedded in-memory implementation.
//!
//! The shard that owns a user keeps the live state in memory and writes every visible change
//! through a `Store` before acknowledging it. Writes are versioned: a store keeps the highest
//! version it has seen for a user, so writes that race each other can land in any order.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::Error;
use crate::presence::{UserId, UserState};
use crate::ring::partition_of;

pub mod faulty;
pub mod record;
pub mod redis;
pub use self::redis::{RedisOptions, RedisStore, RedisTlsFiles};

/// The persistence boundary.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The stored state of each user, in order; `None` for a user never stored.
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error>;

    /// Stores each state unless the store already holds a higher version for that user
    /// ([`Saved::Stale`]) or a newer owner has fenced its partition ([`Saved::Fenced`]). One
    /// answer per write, in order.
    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error>;

    /// Takes over `partitions`: a new fencing token for each, higher than any before, so that
    /// writes under an older token (a previous owner's) are refused from now on.
    async fn fence(&self, partitions: &[u32]) -> Result<Vec<u64>, Error>;

    /// The current fencing token of each of `partitions` (0 for one never fenced), changing
    /// nothing: whether another shard has taken one over since this one fenced it.
    async fn fences(&self, partitions: &[u32]) -> Result<Vec<u64>, Error>;

    /// Forgets what the store holds for `partitions`: a store private to this process, once
    /// another shard owns them, holds nothing true about them.
    async fn forget(&self, _partitions: &[u32]) {}

    /// Users that had devices (online or resumable) when last stored, in these partitions.
    /// May include users that have since gone dormant; never misses a live one.
    async fn live_users(&self, partitions: &[u32]) -> Result<Vec<UserId>, Error>;

    /// Write-behind: keeps the records of these live users from expiring.
    async fn refresh(&self, _users: &[UserId]) -> Result<(), Error> {
        Ok(())
    }

    /// How often a live user must be refreshed; `None` when records never expire.
    fn refresh_interval(&self) -> Option<Duration> {
        None
    }

    /// The targets `user` subscribes to, sorted.
    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error>;

    /// Changes `user`'s subscriptions atomically and returns the new list, sorted. If the result
    /// would hold more than `max` targets it changes nothing and fails with a bad request.
    async fn update_subscriptions(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
        max: usize,
    ) -> Result<Vec<UserId>, Error>;

    /// Whether the owner writes every visible change through before acknowledging it (a store
    /// that outlives the process). A store living in the owner's own memory is written only
    /// when a user leaves the owner's memory: a copy per change would buy no durability.
    fn write_through(&self) -> bool {
        true
    }

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), Error>;

    /// A short name for logs and metrics.
    fn kind(&self) -> &'static str;
}

/// One write: a user's new state, under the fencing token of its partition's owner (0: not
/// fenced, for a store private to the process).
#[derive(Clone, Debug)]
pub struct Write {
    pub user: UserId,
    pub state: UserState,
    pub fence: u64,
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    /// Stored.
    Written,
    /// Refused: the store holds this version or a newer one.
    Stale,
    /// Refused: a newer owner took the partition over.
    Fenced,
}

/// How a subscription change applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionMode {
    Add,
    Remove,
    Replace,
}

impl SubscriptionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionMode::Add => "add",
            SubscriptionMode::Remove => "remove",
            SubscriptionMode::Replace => "replace",
        }
    }
}

/// The error of a subscription change past the limit.
pub fn too_many_subscriptions(max: usize) -> Error {
    Error::BadRequest(format!("a user may subscribe to at most {max} targets"))
}

const STRIPES: usize = 64;

/// The embedded default: state in process memory, lost on restart.
pub struct MemoryStore {
    stripes: Box<[Mutex<hashbrown::HashMap<UserId, UserState>>]>,
    subs: Mutex<hashbrown::HashMap<UserId, std::collections::BTreeSet<UserId>>>,
    fences: Mutex<hashbrown::HashMap<u32, u64>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            subs: Mutex::default(),
            fences: Mutex::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::default())
    }

    fn stripe(&self, user: UserId) -> &Mutex<hashbrown::HashMap<UserId, UserState>> {
        &self.stripes[crate::ring::stripe_of(user, STRIPES)]
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        Ok(users
            .iter()
            .map(|u| self.stripe(*u).lock().get(u).cloned())
            .collect())
    }

    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error> {
        let mut out = Vec::with_capacity(batch.len());
        for w in batch {
            if w.fence != 0 {
                let fences = self.fences.lock();
                if fences
                    .get(&partition_of(w.user))
                    .is_some_and(|f| *f > w.fence)
                {
                    out.push(Saved::Fenced);
                    continue;
                }
            }
            let mut map = self.stripe(w.user).lock();
            out.push(match map.get_mut(&w.user) {
                Some(old) if old.version >= w.state.version => Saved::Stale,
                Some(old) => {
                    old.clone_from(&w.state);
                    Saved::Written
                }
                None => {
                    map.insert(w.user, w.state.clone());
                    Saved::Written
                }
            });
        }
        Ok(out)
    }

    async fn fence(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        let mut fences = self.fences.lock();
        Ok(partitions
            .iter()
            .map(|p| {
                let f = fences.entry(*p).or_insert(0);
                *f += 1;
                *f
            })
            .collect())
    }

    async fn fences(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        let fences = self.fences.lock();
        Ok(partitions
            .iter()
            .map(|p| fences.get(p).copied().unwrap_or(0))
            .collect())
    }

    async fn forget(&self, partitions: &[u32]) {
        let gone: hashbrown::HashSet<u32> = partitions.iter().copied().collect();
        for stripe in self.stripes.iter() {
            stripe
                .lock()
                .retain(|u, _| !gone.contains(&partition_of(*u)));
        }
    }

    async fn live_users(&self, partitions: &[u32]) -> Result<Vec<UserId>, Error> {
        let wanted: hashbrown::HashSet<u32> = partitions.iter().copied().collect();
        let mut out = Vec::new();
        for stripe in self.stripes.iter() {
            let map = stripe.lock();
            out.extend(
                map.iter()
                    .filter(|(u, st)| !st.devices.is_empty() && wanted.contains(&partition_of(**u)))
                    .map(|(u, _)| *u),
            );
        }
        Ok(out)
    }

    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error> {
        let subs = self.subs.lock();
        Ok(subs
            .get(&user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn update_subscriptions(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
        max: usize,
    ) -> Result<Vec<UserId>, Error> {
        let mut subs = self.subs.lock();
        let mut next = subs.get(&user).cloned().unwrap_or_default();
        match mode {
            SubscriptionMode::Add => next.extend(targets.iter().copied()),
            SubscriptionMode::Remove => targets.iter().for_each(|t| {
                next.remove(t);
            }),
            SubscriptionMode::Replace => next = targets.iter().copied().collect(),
        }
        if next.len() > max {
            return Err(too_many_subscriptions(max));
        }
        let out = next.iter().copied().collect();
        if next.is_empty() {
            subs.remove(&user);
        } else {
            subs.insert(user, next);
        }
        Ok(out)
    }

    fn write_through(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// The Redis Cluster seed URLs for tests, from `PRESENCE_TEST_REDIS_URL` (set by
/// `scripts/test.sh`). Only tests marked `#[ignore = "needs Redis Cluster: bash
/// scripts/test.sh"]` call it; run without it (`--include-ignored` outside `scripts/test.sh`),
/// it fails the test and says how to run it: a missing dependency never skips. Never `None`.
#[doc(hidden)]
pub fn test_redis_urls() -> Option<String> {
    match std::env::var("PRESENCE_TEST_REDIS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => panic!(
            "this test needs a Redis Cluster and PRESENCE_TEST_REDIS_URL is not set: run it with \
             `bash scripts/test.sh`, which starts one (or set PRESENCE_TEST_REDIS_URL to the seed \
             URLs of yours)"
        ),
    }
}

/// A user id base unique to this call, so tests sharing one Redis Cluster never collide.
#[doc(hidden)]
pub fn test_user_base() -> UserId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = crate::ring::mix64(nanos ^ ((std::process::id() as u64) << 32));
    ((seed % (1 << 40)) + NEXT.fetch_add(1, Ordering::Relaxed) * (1 << 40)) * 1_000 + 1_000
}

/// The behavioural suite every `Store` must pass. Later stores run it too.
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use crate::presence::{LastSeen, Platform, Privacy, Rules, Settings, Status, Visibility};

    /// A state with devices, settings and privacy settings; an odd `version` is INVISIBLE (its
    /// frozen view too), so that every part of the record must round-trip.
    fn state(version: u64, devices: usize) -> UserState {
        let mut st = UserState::default();
        let r = Rules::default();
        for i in 0..devices {
            st.online(&format!("d{i}"), Platform::Android, 1_000 + i as i64, &r)
                .unwrap();
        }
        let manual = if version % 2 == 1 {
            Status::Invisible
        } else {
            Status::Busy
        };
        st.set_settings(
            Settings {
                manual: Some(manual),
                text: Some("会议中".into()),
                expires_at: Some(9_000),
            },
            2_000,
            &r,
        );
        let privacy = Privacy::new(Visibility::Contacts, LastSeen::Coarse, &[7, 5], &[9]);
        st.set_privacy(privacy, 2_500, &r);
        assert!(st.privacy.is_some() && st.privacy_version > 0);
        assert_eq!(st.invisible.is_some(), version % 2 == 1);
        st.version = version;
        st
    }

    fn w(user: UserId, state: UserState) -> Write {
        Write {
            user,
            state,
            fence: 0,
        }
    }

    pub async fn run(store: &dyn Store, base: UserId) {
        assert!(base > 0);
        let (a, b, c) = (base, base + 1, base + 2);
        assert_eq!(store.load(&[a, b]).await.unwrap(), vec![None, None]);
        assert_eq!(
            store
                .save(&[w(a, state(3, 2)), w(b, state(1, 1))])
                .await
                .unwrap(),
            vec![Saved::Written, Saved::Written]
        );
        let got = store.load(&[b, c, a]).await.unwrap();
        assert_eq!(got, vec![Some(state(1, 1)), None, Some(state(3, 2))]);
        // An older version never overwrites a newer one, and says so.
        assert_eq!(
            store.save(&[w(a, state(2, 0))]).await.unwrap(),
            vec![Saved::Stale]
        );
        assert_eq!(store.load(&[a]).await.unwrap()[0], Some(state(3, 2)));
        // b has a device: it is live in its partition; a (no devices now) is not.
        let (pa, pb) = (partition_of(a), partition_of(b));
        store.save(&[w(a, state(4, 0))]).await.unwrap();
        assert_eq!(store.load(&[a]).await.unwrap()[0], Some(state(4, 0)));
        let live = store.live_users(&[pa, pb]).await.unwrap();
        assert!(live.contains(&b), "{live:?}");
        assert!(!live.contains(&a), "{live:?}");
        let elsewhere: Vec<u32> = (0..crate::ring::PARTITIONS)
            .filter(|p| *p != pb)
            .take(3)
            .collect();
        assert!(!store.live_users(&elsewhere).await.unwrap().contains(&b));
        store.refresh(&[b]).await.unwrap();
        assert_eq!(store.load(&[b]).await.unwrap()[0], Some(state(1, 1)));

        // Fencing: once a newer owner fenced the partition, the older owner's writes are
        // refused; the newer owner's go through.
        let old = store.fence(&[pb]).await.unwrap()[0];
        let new = store.fence(&[pb]).await.unwrap()[0];
        assert!(new > old && old > 0, "{old} {new}");
        let stale_owner = Write {
            user: b,
            state: state(5, 1),
            fence: old,
        };
        assert_eq!(
            store.save(&[stale_owner]).await.unwrap(),
            vec![Saved::Fenced]
        );
        assert_eq!(store.load(&[b]).await.unwrap()[0], Some(state(1, 1)));
        let owner = Write {
            user: b,
            state: state(6, 1),
            fence: new,
        };
        assert_eq!(store.save(&[owner]).await.unwrap(), vec![Saved::Written]);
        assert_eq!(store.load(&[b]).await.unwrap()[0], Some(state(6, 1)));

        // Subscriptions: add, remove, replace, and a limit that changes nothing.
        use SubscriptionMode::*;
        assert!(store.subscriptions(a).await.unwrap().is_empty());
        assert_eq!(
            store
                .update_subscriptions(a, Add, &[c, b, c], 3)
                .await
                .unwrap(),
            vec![b, c]
        );
        assert_eq!(
            store
                .update_subscriptions(a, Add, &[b, base + 9], 3)
                .await
                .unwrap(),
            vec![b, c, base + 9]
        );
        let over = store.update_subscriptions(a, Add, &[base + 10], 3).await;
        assert!(matches!(over, Err(Error::BadRequest(_))), "{over:?}");
        assert_eq!(store.subscriptions(a).await.unwrap(), vec![b, c, base + 9]);
        assert_eq!(
            store
                .update_subscriptions(a, Remove, &[c, base + 50], 3)
                .await
                .unwrap(),
            vec![b, base + 9]
        );
        assert!(store
            .update_subscriptions(a, Replace, &[1, 2, 3, 4], 3)
            .await
            .is_err());
        assert_eq!(
            store
                .update_subscriptions(a, Replace, &[c], 3)
                .await
                .unwrap(),
            vec![c]
        );
        assert_eq!(store.subscriptions(a).await.unwrap(), vec![c]);
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn memory_store_passes_the_suite() {
        run(&MemoryStore::default(), 1).await;
    }
}
