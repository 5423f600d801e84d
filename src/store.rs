//! Where presence state persists: the `Store` trait and its embedded in-memory implementation.
//!
//! The shard that owns a user keeps the live state in memory and writes every visible change
//! through a `Store` before acknowledging it. Writes are versioned: a store keeps the highest
//! version it has seen for a user, so writes that race each other can land in any order.

use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::Error;
use crate::presence::{UserId, UserState};

/// The persistence boundary.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The stored state of each user, in order; `None` for a user never stored.
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error>;

    /// Stores each state unless the store already holds a higher version for that user.
    async fn save(&self, batch: &[(UserId, UserState)]) -> Result<(), Error>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), Error>;

    /// A short name for logs and metrics.
    fn kind(&self) -> &'static str;
}

const STRIPES: usize = 64;

/// The embedded default: state in process memory, lost on restart.
pub struct MemoryStore {
    stripes: Box<[Mutex<hashbrown::HashMap<UserId, UserState>>]>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore { stripes: (0..STRIPES).map(|_| Mutex::default()).collect() }
    }
}

impl MemoryStore {
    pub fn new() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::default())
    }

    fn stripe(&self, user: UserId) -> &Mutex<hashbrown::HashMap<UserId, UserState>> {
        &self.stripes[crate::shard::stripe_of(user, STRIPES)]
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        Ok(users.iter().map(|u| self.stripe(*u).lock().get(u).cloned()).collect())
    }

    async fn save(&self, batch: &[(UserId, UserState)]) -> Result<(), Error> {
        for (user, state) in batch {
            let mut map = self.stripe(*user).lock();
            match map.get_mut(user) {
                Some(old) if old.version >= state.version => {}
                Some(old) => old.clone_from(state),
                None => {
                    map.insert(*user, state.clone());
                }
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// The behavioural suite every `Store` must pass. Later stores run it too.
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use crate::presence::{Platform, Rules, Settings, Status};

    fn state(version: u64, devices: usize) -> UserState {
        let mut st = UserState::default();
        let r = Rules::default();
        for i in 0..devices {
            st.online(&format!("d{i}"), Platform::Android, 1_000 + i as i64, &r).unwrap();
        }
        st.set_settings(
            Settings { manual: Some(Status::Busy), text: Some("会议中".into()), expires_at: Some(9_000) },
            2_000,
            &r,
        );
        st.version = version;
        st
    }

    pub async fn run(store: &dyn Store, base: UserId) {
        let (a, b, c) = (base, base + 1, base + 2);
        assert_eq!(store.load(&[a, b]).await.unwrap(), vec![None, None]);
        store.save(&[(a, state(3, 2)), (b, state(1, 1))]).await.unwrap();
        let got = store.load(&[b, c, a]).await.unwrap();
        assert_eq!(got, vec![Some(state(1, 1)), None, Some(state(3, 2))]);
        // An older version never overwrites a newer one.
        store.save(&[(a, state(2, 0))]).await.unwrap();
        assert_eq!(store.load(&[a]).await.unwrap()[0], Some(state(3, 2)));
        store.save(&[(a, state(4, 0))]).await.unwrap();
        assert_eq!(store.load(&[a]).await.unwrap()[0], Some(state(4, 0)));
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn memory_store_passes_the_suite() {
        run(&MemoryStore::default(), 1).await;
    }
}
