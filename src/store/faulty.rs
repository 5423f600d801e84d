//! A store that fails on command: the memory store behind fault switches, for fault tests.
//!
//! Unit tests (the shard under store faults) and integration tests (a node whose subscription
//! reads fail) share it, so a new fault is a new switch here rather than another wrapper.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{MemoryStore, Saved, Store, SubscriptionMode, Write};
use crate::error::Error;
use crate::presence::{UserId, UserState};

/// What the store does wrong, switchable while a test runs. Every switch starts off.
pub struct Faults {
    pub fail_save: AtomicBool,
    pub fail_refresh: AtomicBool,
    pub fail_load: AtomicBool,
    pub fail_subscriptions: AtomicBool,
    /// Saves wait while this gate is closed (`send(false)`).
    pub save_gate: watch::Sender<bool>,
    /// Loads wait while this gate is closed.
    pub load_gate: watch::Sender<bool>,
    /// Loading any of these users fails as an unreadable record does.
    pub corrupt: Mutex<HashSet<UserId>>,
    /// How many saves were tried.
    pub saves: AtomicUsize,
    /// Every user a refresh was asked for, in order (a refresh writes nothing else).
    pub refreshed: Mutex<Vec<UserId>>,
}

/// The memory store with [`Faults`]. Writing through, it behaves as Redis does: every change is
/// saved before it is acknowledged, and live users are refreshed every 10 s.
pub struct FaultyStore {
    inner: Arc<MemoryStore>,
    faults: Arc<Faults>,
    write_through: bool,
}

impl FaultyStore {
    /// A store on fresh data; `write_through` as [`Store::write_through`].
    pub fn new(write_through: bool) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner: MemoryStore::new(),
            faults: Arc::new(Faults {
                fail_save: AtomicBool::new(false),
                fail_refresh: AtomicBool::new(false),
                fail_load: AtomicBool::new(false),
                fail_subscriptions: AtomicBool::new(false),
                save_gate: watch::channel(true).0,
                load_gate: watch::channel(true).0,
                corrupt: Mutex::default(),
                saves: AtomicUsize::new(0),
                refreshed: Mutex::default(),
            }),
            write_through,
        })
    }

    /// The switches.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// The data underneath, read and written without faults.
    pub fn data(&self) -> &Arc<MemoryStore> {
        &self.inner
    }

    /// Another store on the same data and faults: a second shard's view of one Redis Cluster.
    pub fn twin(&self) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner: self.inner.clone(),
            faults: self.faults.clone(),
            write_through: self.write_through,
        })
    }
}

async fn pass(gate: &watch::Sender<bool>) {
    let mut rx = gate.subscribe();
    let _ = rx.wait_for(|open| *open).await;
}

fn injected(on: &AtomicBool) -> Result<(), Error> {
    if on.load(Ordering::Relaxed) {
        return Err(Error::StoreUnavailable("injected fault".into()));
    }
    Ok(())
}

#[async_trait]
impl Store for FaultyStore {
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        let f = &self.faults;
        pass(&f.load_gate).await;
        injected(&f.fail_load)?;
        if users.iter().any(|u| f.corrupt.lock().contains(u)) {
            return Err(Error::Internal("corrupt stored state".into()));
        }
        self.inner.load(users).await
    }

    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error> {
        let f = &self.faults;
        f.saves.fetch_add(1, Ordering::Relaxed);
        pass(&f.save_gate).await;
        injected(&f.fail_save)?;
        self.inner.save(batch).await
    }

    async fn fence(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        self.inner.fence(partitions).await
    }

    async fn fences(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        let f = &self.faults;
        pass(&f.load_gate).await;
        injected(&f.fail_load)?;
        self.inner.fences(partitions).await
    }

    async fn live_users(&self, partitions: &[u32]) -> Result<Vec<UserId>, Error> {
        self.inner.live_users(partitions).await
    }

    async fn refresh(&self, users: &[UserId]) -> Result<(), Error> {
        injected(&self.faults.fail_refresh)?;
        self.faults.refreshed.lock().extend_from_slice(users);
        Ok(())
    }

    fn refresh_interval(&self) -> Option<Duration> {
        self.write_through.then(|| Duration::from_secs(10))
    }

    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error> {
        injected(&self.faults.fail_subscriptions)?;
        self.inner.subscriptions(user).await
    }

    async fn update_subscriptions(
        &self,
        user: UserId,
        mode: SubscriptionMode,
        targets: &[UserId],
        max: usize,
    ) -> Result<Vec<UserId>, Error> {
        self.inner
            .update_subscriptions(user, mode, targets, max)
            .await
    }

    fn write_through(&self) -> bool {
        self.write_through
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "faulty"
    }
}
