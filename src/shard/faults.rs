//! The shard under store faults: each test breaks the store (or ownership) in one way and checks
//! the guarantee that holds anyway. Paused time, an in-memory store behind a fault switchboard.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Shard;
use crate::error::Error;
use crate::metrics::{Metrics, StoreOp};
use crate::ownership::Table;
use crate::presence::{Platform, Rules, Status, UserId, UserState, Viewer};
use crate::push::{Event, EventSink};
use crate::ring::partition_of;
use crate::service::Presence;
use crate::store::faulty::FaultyStore;
use crate::store::{MemoryStore, Store};

/// Records every published event.
#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl EventSink for Recorder {
    fn wants(&self, _user: UserId) -> bool {
        true
    }
    fn publish(&self, event: Event) {
        self.0.lock().push(event);
    }
}

impl Recorder {
    fn statuses_of(&self, user: UserId) -> Vec<Status> {
        self.0
            .lock()
            .iter()
            .filter(|e| e.view.user_id == user)
            .map(|e| e.view.status)
            .collect()
    }
}

const TIMEOUT_MS: i64 = 60_000;

fn rules() -> Rules {
    Rules {
        heartbeat_timeout: TIMEOUT_MS,
        idle_timeout: 300_000,
        resume_window: 300_000,
        max_devices: 4,
        max_subscriptions: 10,
        ..Rules::default()
    }
}

/// A shard on `store` that owns every partition, with its timers and writer running.
async fn start(store: Arc<dyn Store>, table: Arc<Table>) -> (Arc<Shard>, Arc<Recorder>) {
    let shard = Arc::new(Shard::new(
        store,
        rules(),
        Duration::from_millis(100),
        Arc::new(Metrics::new()),
        table,
    ));
    let events = Arc::new(Recorder::default());
    shard.set_sink(events.clone());
    let all: Vec<u32> = (0..crate::ring::PARTITIONS).collect();
    shard.recover(&all).await.unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(shard.clone().run_timers(cancel.clone()));
    // The timers stop with the test's runtime.
    std::mem::forget(cancel);
    (shard, events)
}

/// Lets background tasks run for `ms` of paused time.
async fn run_for(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn stored(store: &FaultyStore, user: UserId) -> Option<UserState> {
    store.data().load(&[user]).await.unwrap().pop().flatten()
}

fn in_memory(shard: &Shard, user: UserId) -> bool {
    shard.version_in_memory(user).is_some()
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_changes_nothing_and_its_retry_applies_it() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, events) = start(store.clone(), Table::owning_all()).await;
    f.fail_save.store(true, Ordering::Relaxed);
    let r = shard.online(7, "d", Platform::Web).await;
    assert!(matches!(r, Err(Error::StoreUnavailable(_))), "{r:?}");
    // Nothing acknowledged, nothing pushed, nothing in memory to make the retry a no-op.
    assert!(events.statuses_of(7).is_empty());
    assert!(!in_memory(&shard, 7));
    assert!(stored(&store, 7).await.is_none());
    f.fail_save.store(false, Ordering::Relaxed);
    let v = shard.online(7, "d", Platform::Web).await.unwrap();
    assert_eq!(v.status, Status::Online);
    assert_eq!(events.statuses_of(7), vec![Status::Online]);
    assert_eq!(stored(&store, 7).await.unwrap().devices.len(), 1);
}

/// Puts `user`'s device "d" online and heartbeats it; then a status change fails, so the user
/// leaves memory, and the store can neither save nor load for a whole timeout (saves and loads
/// are left failing).
async fn evict_for_a_timeout(shard: &Shard, store: &FaultyStore, user: UserId) {
    let f = store.faults();
    shard.online(user, "d", Platform::Web).await.unwrap();
    run_for(TIMEOUT_MS as u64 / 2).await;
    shard.heartbeat(user, "d", true).await.unwrap();
    f.fail_save.store(true, Ordering::Relaxed);
    f.fail_load.store(true, Ordering::Relaxed);
    let settings = crate::presence::Settings {
        manual: Some(Status::Busy),
        ..Default::default()
    };
    assert!(shard.set_status(user, settings).await.is_err());
    assert!(!in_memory(shard, user));
    run_for(TIMEOUT_MS as u64).await;
}

#[tokio::test(start_paused = true)]
async fn a_user_evicted_by_a_failed_write_keeps_heartbeating_and_reads_online() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, _events) = start(store.clone(), Table::owning_all()).await;
    evict_for_a_timeout(&shard, &store, 9).await;
    // Its heartbeats are not "device not online" (the client would go offline and back): they
    // fail like the store does, and the client retries.
    let r = shard.heartbeat(9, "d", true).await;
    assert!(matches!(r, Err(Error::StoreUnavailable(_))), "{r:?}");
    // Once the store answers, a read shows the device online (its heartbeats kept coming, and a
    // whole timeout passed since the last durable change), and the heartbeats are accepted.
    f.fail_save.store(false, Ordering::Relaxed);
    f.fail_load.store(false, Ordering::Relaxed);
    assert_eq!(
        shard.status(9, Viewer::Truth).await.unwrap().status,
        Status::Online
    );
    shard.heartbeat(9, "d", true).await.unwrap();
    assert!(in_memory(&shard, 9));
}

/// Chaos `redis_master_sigstop_4s` found this: a read and a heartbeat of an evicted user both
/// wait for the stalled store; the heartbeat's reload puts the user back (and clears its
/// eviction mark) first, then the read's load returns the stored record, whose devices were
/// last seen at the last durable change, a whole timeout ago. The read must not show that
/// record as OFFLINE: memory is the truth once the user is back in it.
#[tokio::test(start_paused = true)]
async fn a_read_that_loads_while_a_heartbeat_reloads_does_not_show_a_stale_offline() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, _events) = start(store.clone(), Table::owning_all()).await;
    evict_for_a_timeout(&shard, &store, 13).await;
    f.fail_save.store(false, Ordering::Relaxed);
    f.fail_load.store(false, Ordering::Relaxed);
    // The store stalls; a heartbeat (a reload) and then reads wait for it.
    f.load_gate.send_replace(false);
    let beat = tokio::spawn({
        let shard = shard.clone();
        async move { shard.heartbeat(13, "d", true).await }
    });
    run_for(10).await;
    let read = tokio::spawn({
        let shard = shard.clone();
        async move { shard.status(13, Viewer::Truth).await }
    });
    let batch = tokio::spawn({
        let shard = shard.clone();
        async move { shard.batch(&[13], Viewer::Truth).await }
    });
    run_for(10).await;
    f.load_gate.send_replace(true);
    beat.await.unwrap().unwrap();
    assert!(in_memory(&shard, 13));
    let view = read.await.unwrap().unwrap();
    assert_eq!(view.status, Status::Online, "{view:?}");
    let entries = batch.await.unwrap().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].status, Status::Online, "{:?}", entries[0]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_is_finished_by_the_writer() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, events) = start(store.clone(), Table::owning_all()).await;
    f.save_gate.send_replace(false);
    let request = tokio::spawn({
        let shard = shard.clone();
        async move { shard.online(8, "d", Platform::Web).await }
    });
    run_for(10).await;
    request.abort();
    let _ = request.await;
    f.save_gate.send_replace(true);
    run_for(2_000).await;
    assert_eq!(stored(&store, 8).await.unwrap().devices.len(), 1);
    assert_eq!(events.statuses_of(8), vec![Status::Online]);
}

#[tokio::test(start_paused = true)]
async fn a_fenced_owner_refuses_the_write_and_lets_go_of_the_user() {
    let store = FaultyStore::new(true);
    let (old, old_events) = start(store.clone(), Table::owning_all()).await;
    old.online(9, "d", Platform::Web).await.unwrap();
    // A new owner takes the partition over (the old one has not seen the ring yet).
    let (new, _) = start(store.twin(), Table::owning_all()).await;
    assert_eq!(
        new.status(9, Viewer::Truth).await.unwrap().status,
        Status::Online
    );
    let r = old.offline(9, "d", None).await;
    assert!(matches!(r, Err(Error::WrongOwner { .. })), "{r:?}");
    assert!(!in_memory(&old, 9));
    // The stale owner's change reached neither the store nor subscribers.
    assert_eq!(stored(&store, 9).await.unwrap().devices.len(), 1);
    assert_eq!(old_events.statuses_of(9), vec![Status::Online]);
    assert_eq!(
        old.metrics
            .store
            .refused_writes
            .get(StoreOp { op: "fenced" })
            .get(),
        1
    );
    // The new owner's timer writes go through.
    run_for(TIMEOUT_MS as u64 + 1_000).await;
    assert!(stored(&store, 9)
        .await
        .unwrap()
        .online_devices()
        .next()
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn a_user_is_never_put_back_after_its_partition_was_released() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let table = Table::owning_all();
    let (shard, _) = start(store.clone(), table.clone()).await;
    f.load_gate.send_replace(false);
    let request = tokio::spawn({
        let shard = shard.clone();
        async move { shard.online(10, "d", Platform::Web).await }
    });
    run_for(10).await;
    // The partition is let go while the request waits for its load.
    let p = partition_of(10);
    table.set_owned(p, false);
    let mut lost = vec![false; crate::ring::PARTITIONS as usize];
    lost[p as usize] = true;
    shard.release(&lost).await;
    f.load_gate.send_replace(true);
    let r = request.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(!in_memory(&shard, 10));
    assert!(stored(&store, 10).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn timers_of_partitions_not_served_change_nothing() {
    let store = FaultyStore::new(true);
    let table = Table::owning_all();
    let (shard, events) = start(store.clone(), table.clone()).await;
    shard.online(11, "d", Platform::Web).await.unwrap();
    table.set_owned(partition_of(11), false);
    run_for(TIMEOUT_MS as u64 + 2_000).await;
    assert_eq!(events.statuses_of(11), vec![Status::Online]);
    assert_eq!(
        stored(&store, 11).await.unwrap().online_devices().count(),
        1
    );
    // Served again: the timer, kept armed, does its job.
    table.set_owned(partition_of(11), true);
    run_for(2_000).await;
    assert_eq!(
        events.statuses_of(11),
        vec![Status::Online, Status::Offline]
    );
}

#[tokio::test(start_paused = true)]
async fn timer_changes_wait_out_a_store_outage_with_backoff_and_none_is_dropped() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, events) = start(store.clone(), Table::owning_all()).await;
    let users: Vec<UserId> = (100..1100).collect();
    for &u in &users {
        shard.online(u, "d", Platform::Web).await.unwrap();
    }
    f.fail_save.store(true, Ordering::Relaxed);
    let before = f.saves.load(Ordering::Relaxed);
    // Every device times out during a 30 s outage.
    run_for(TIMEOUT_MS as u64 + 30_000).await;
    let attempts = f.saves.load(Ordering::Relaxed) - before;
    // Backoff, not a retry per 100 ms tick (that would be about 300).
    assert!(attempts <= 20, "{attempts} save attempts during the outage");
    assert!(
        shard
            .metrics
            .store
            .retries
            .get(StoreOp { op: "save" })
            .get()
            > 0
    );
    assert!(
        events.statuses_of(100).len() == 1,
        "nothing pushed before it is written"
    );
    // The timer kept running meanwhile.
    assert_eq!(shard.metrics.presence.timeouts.get(), users.len() as u64);
    f.fail_save.store(false, Ordering::Relaxed);
    run_for(10_000).await;
    for &u in &users {
        assert_eq!(
            stored(&store, u).await.unwrap().online_devices().count(),
            0,
            "user {u}"
        );
        assert_eq!(events.statuses_of(u), vec![Status::Online, Status::Offline]);
    }
    assert_eq!(shard.metrics.store.backlog.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hung_store_does_not_stop_the_timers() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, _) = start(store.clone(), Table::owning_all()).await;
    shard.online(12, "d", Platform::Web).await.unwrap();
    run_for(1_000).await;
    shard.online(13, "d", Platform::Web).await.unwrap();
    f.save_gate.send_replace(false);
    // 12 times out, and its write hangs; 13 times out a second later all the same.
    run_for(TIMEOUT_MS as u64 + 1_000).await;
    assert_eq!(shard.metrics.presence.timeouts.get(), 2);
    f.save_gate.send_replace(true);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_is_retried_and_not_counted_as_done() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (shard, _) = start(store.clone(), Table::owning_all()).await;
    f.fail_refresh.store(true, Ordering::Relaxed);
    shard.online(14, "d", Platform::Web).await.unwrap();
    for _ in 0..6 {
        run_for(5_000).await;
        shard.heartbeat(14, "d", true).await.unwrap();
    }
    assert!(f.refreshed.lock().is_empty());
    assert!(
        shard
            .metrics
            .store
            .retries
            .get(StoreOp { op: "refresh" })
            .get()
            > 0
    );
    // The store answers again: the refresh goes through within a backoff, not a whole
    // refresh interval later.
    f.fail_refresh.store(false, Ordering::Relaxed);
    run_for(5_500).await;
    assert!(f.refreshed.lock().contains(&14));
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_record_is_skipped_and_the_partition_still_loads() {
    let store = FaultyStore::new(true);
    let f = store.faults();
    let (first, _) = start(store.clone(), Table::owning_all()).await;
    first.online(15, "d", Platform::Web).await.unwrap();
    // 16 shares no partition requirement; its record is unreadable (say, a newer version's).
    first.online(16, "d", Platform::Web).await.unwrap();
    f.corrupt.lock().insert(16);
    let (next, _) = start(store.twin(), Table::owning_all()).await;
    assert!(in_memory(&next, 15));
    assert!(!in_memory(&next, 16));
    assert_eq!(next.metrics.store.unreadable_records.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_partition_returning_to_a_memory_shard_brings_back_nothing_old() {
    let store = MemoryStore::new();
    let table = Table::owning_all();
    let (shard, _) = start(store.clone(), table.clone()).await;
    shard.online(17, "d", Platform::Web).await.unwrap();
    let p = partition_of(17);
    let mut lost = vec![false; crate::ring::PARTITIONS as usize];
    lost[p as usize] = true;
    table.set_owned(p, false);
    shard.release(&lost).await;
    // Hours later the partition comes back to this shard.
    run_for(3 * 3_600_000).await;
    shard.recover(&[p]).await.unwrap();
    table.set_owned(p, true);
    let v = shard.status(17, Viewer::Truth).await.unwrap();
    assert_eq!(v.status, Status::Offline);
    assert!(v.devices.is_empty(), "{v:?}");
}
