//! The WebSocket liveness lease: a node keeps its sockets' devices alive with one round of
//! heartbeats per `PRESENCE_WS_LEASE_INTERVAL`, not a call per client message.
//!
//! A socket holds a lease from its welcome to its close. Whatever it hears from its client (a
//! `heartbeat`, any other message, a pong to the server's ping) only marks the lease as heard
//! (and active, if it was); each round sends one heartbeat for every lease heard since the
//! previous round, all at once, so that a gateway's coalescer sends each shard one batch per
//! round ([`crate::peer::coalesce`]). A beat that failed goes again with the next round, while
//! its socket is open (counted in `presence_ws_lease_beats_total{result="failed"}`). A lease
//! not heard from sends nothing: a client that
//! vanished without a close goes OFFLINE by the heartbeat timeout as before, at most one
//! interval later.
//!
//! A device its owner no longer holds online (a timeout while the gateway could not reach it, a
//! lost shard) is brought back as the socket's session, as a socket's own heartbeat would.
//! A socket's release waits for a round that took its beat, so that no beat of a closed socket
//! reaches the owner after the close (the close grace's `offline` would take it for a
//! reconnect), and says when its last beat was answered, so that the close does not take a
//! beat just before it for a reconnect either.
//!
//! Activity that may change what others see goes at once instead ([`report_now`]): a user idle
//! on the owner, or close to it, turns ONLINE without waiting for a round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics::{LeaseBeat, Metrics};
use crate::presence::{Platform, UserId};
use crate::service::{Presence, Session};

/// Beats of one round in flight at once (a gateway's coalescer batches them per shard). Large,
/// so that the beats of a shard that does not answer (each held up to the beat deadline) do not
/// queue the others behind them; a round's beats are small futures (~0.5 KB each).
const CONCURRENCY: usize = 16_384;
/// Shortest deadline of a beat.
const MIN_BEAT_DEADLINE: Duration = Duration::from_millis(250);

/// Whether activity heard at `now` goes to the owner at once rather than with the next round:
/// when the activity last reported (`reported`) is so old that the user may be idle on the
/// owner before the round's beat arrives. Rounds come every `interval`; two of them are the
/// margin (the round in flight and the next). Pure, for the tests.
pub fn report_now(
    now: tokio::time::Instant,
    reported: tokio::time::Instant,
    idle_timeout: Duration,
    interval: Duration,
) -> bool {
    now.saturating_duration_since(reported) >= idle_timeout.saturating_sub(interval * 2)
}

/// The leases of one node's sockets, by socket id.
pub struct Leases {
    held: Mutex<HashMap<u64, Held>>,
    /// The round being sent; each beat it takes remembers it.
    round: AtomicU64,
    /// The last round whose beats all ended: a release waits for its socket's round.
    done: watch::Sender<u64>,
    interval: Duration,
}

struct Held {
    user: UserId,
    device: CompactString,
    platform: Platform,
    session: Session,
    /// Heard from its client since its last beat.
    heard: bool,
    /// Its user interacted since its last beat.
    active: bool,
    /// The round that last took its beat (0: none).
    taken: u64,
    /// When its last beat ended (answered, failed or timed out): the owner may have seen the
    /// device up to then (a beat that timed out over gRPC may still land later).
    ended: Option<tokio::time::Instant>,
}

/// One beat of a round.
struct Beat {
    id: u64,
    user: UserId,
    device: CompactString,
    platform: Platform,
    session: Session,
    active: bool,
}

impl Leases {
    pub fn new(interval: Duration) -> Arc<Leases> {
        Arc::new(Leases {
            held: Mutex::new(HashMap::new()),
            round: AtomicU64::new(0),
            done: watch::channel(0).0,
            interval,
        })
    }

    /// Socket `id` keeps `device` alive from now on, as registration `session`.
    pub fn hold(&self, id: u64, user: UserId, device: &str, platform: Platform, session: Session) {
        self.held.lock().insert(
            id,
            Held {
                user,
                device: CompactString::from(device),
                platform,
                session,
                heard: false,
                active: false,
                taken: 0,
                ended: None,
            },
        );
    }

    /// Socket `id` heard from its client; `active`: its user interacted.
    pub fn heard(&self, id: u64, active: bool) {
        if let Some(h) = self.held.lock().get_mut(&id) {
            h.heard = true;
            h.active |= active;
        }
    }

    /// How many sockets hold a lease.
    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Socket `id` closed: its lease ends, once a round that took its beat has ended (at most
    /// `bound`), so that its last beat reaches the owner before whatever the close sends.
    /// Returns when its last beat ended, at the latest (`None`: it never beat).
    pub async fn release(&self, id: u64, bound: Duration) -> Option<tokio::time::Instant> {
        // Read before the removal: a round ended by then had marked its beat's end here.
        let done = *self.done.borrow();
        let held = self.held.lock().remove(&id)?;
        if held.taken <= done {
            // The round that took its last beat had ended, and that beat marked its end here
            // (the lease was still held).
            return held.ended;
        }
        let mut done = self.done.subscribe();
        let _ = tokio::time::timeout(bound, done.wait_for(|&d| d >= held.taken)).await;
        // Its beat ended meanwhile, no later than now (or the bound passed: then it may land
        // later still, a limit of the close grace's window).
        Some(tokio::time::Instant::now())
    }

    /// The beat of socket `id` ended.
    fn ended(&self, id: u64) {
        if let Some(h) = self.held.lock().get_mut(&id) {
            h.ended = Some(tokio::time::Instant::now());
        }
    }

    /// Takes the beats of round `round`: one per lease heard since its last beat.
    fn take(&self, round: u64) -> Vec<Beat> {
        let mut held = self.held.lock();
        let mut beats = Vec::new();
        for (&id, h) in held.iter_mut().filter(|(_, h)| h.heard) {
            beats.push(Beat {
                id,
                user: h.user,
                device: h.device.clone(),
                platform: h.platform,
                session: h.session,
                active: h.active,
            });
            h.heard = false;
            h.active = false;
            h.taken = round;
        }
        beats
    }

    fn holds(&self, id: u64) -> bool {
        self.held.lock().contains_key(&id)
    }

    /// One round every interval until `stop`. Each beat has the interval (at least 250 ms, at
    /// most `deadline`, the route deadline): one that takes longer (its shard does not answer,
    /// ownership moves) goes again with the next round rather than hold this one, so that a
    /// round takes about an interval at most, whichever shard fails.
    pub async fn run(
        self: Arc<Self>,
        presence: Arc<dyn Presence>,
        metrics: Arc<Metrics>,
        deadline: Duration,
        stop: CancellationToken,
    ) {
        let deadline = self.interval.max(MIN_BEAT_DEADLINE).min(deadline);
        let mut every = tokio::time::interval(self.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            self.round(&presence, &metrics, deadline).await;
        }
    }

    /// Sends one round and waits for every beat of it.
    async fn round(&self, presence: &Arc<dyn Presence>, metrics: &Metrics, deadline: Duration) {
        let round = self.round.fetch_add(1, Ordering::Relaxed) + 1;
        let beats = self.take(round);
        metrics.push.ws_lease_rounds.inc();
        futures::stream::iter(beats)
            .for_each_concurrent(CONCURRENCY, |b| async move {
                let result = tokio::time::timeout(deadline, self.beat(presence, &b)).await;
                let label = match result {
                    Ok(Ok(label)) => label,
                    Ok(Err(e)) => {
                        tracing::debug!(user = b.user, reason = e.reason(), "lease beat failed");
                        LeaseBeat::Failed
                    }
                    Err(_) => {
                        tracing::debug!(user = b.user, "lease beat timed out");
                        LeaseBeat::Failed
                    }
                };
                self.ended(b.id);
                if label == LeaseBeat::Failed {
                    // The next round tries again, while the socket is open.
                    self.heard(b.id, b.active);
                }
                metrics.push.ws_lease_beats.get(label).inc();
            })
            .await;
        self.done.send_replace(round);
    }

    /// One beat; a device its owner does not hold online is brought back while its socket is
    /// open.
    async fn beat(&self, presence: &Arc<dyn Presence>, b: &Beat) -> Result<LeaseBeat, Error> {
        match presence.heartbeat(b.user, &b.device, b.active).await {
            Ok(()) => Ok(LeaseBeat::Ok),
            Err(Error::DeviceNotOnline) if self.holds(b.id) => {
                presence
                    .online_session(b.user, &b.device, b.platform, b.session)
                    .await?;
                Ok(LeaseBeat::Revived)
            }
            // The socket closed meanwhile: its close takes care of the device.
            Err(Error::DeviceNotOnline) => Ok(LeaseBeat::Ok),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Status, Viewer};
    use crate::shard::{test_shard, Shard};

    const TIMEOUT: Duration = Duration::from_secs(10);
    const INTERVAL: Duration = Duration::from_secs(1);

    fn beats(m: &Metrics, l: LeaseBeat) -> u64 {
        m.push.ws_lease_beats.get(l).get()
    }

    struct Rig {
        shard: Arc<Shard>,
        leases: Arc<Leases>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    }

    async fn rig() -> Rig {
        let metrics = Arc::new(Metrics::new());
        let shard = test_shard(TIMEOUT, Duration::from_millis(100), metrics.clone());
        let stop = CancellationToken::new();
        tokio::spawn(shard.clone().run_timers(stop.clone()));
        let leases = Leases::new(INTERVAL);
        let presence: Arc<dyn Presence> = shard.clone();
        tokio::spawn(
            leases
                .clone()
                .run(presence, metrics.clone(), TIMEOUT, stop.clone()),
        );
        Rig {
            shard,
            leases,
            metrics,
            stop,
        }
    }

    async fn status(s: &Shard, user: UserId) -> Status {
        s.status(user, Viewer::Truth).await.unwrap().status
    }

    /// A socket heard from within every timeout stays ONLINE on beats of its lease alone, one
    /// beat per round it was heard in (not one per message); once silent, its device goes
    /// OFFLINE by the timeout, at most one interval later.
    #[tokio::test(start_paused = true)]
    async fn a_heard_lease_keeps_its_device_online_and_a_silent_one_lets_it_time_out() {
        let r = rig().await;
        r.shard
            .online_session(1, "d", Platform::Ios, 7)
            .await
            .unwrap();
        r.leases.hold(11, 1, "d", Platform::Ios, 7);
        // Between rounds (they go every second from the start).
        tokio::time::sleep(INTERVAL / 2).await;
        for _ in 0..4 {
            // Five messages within a round: one beat.
            tokio::time::sleep(Duration::from_secs(6)).await;
            for _ in 0..5 {
                r.leases.heard(11, false);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            status(&r.shard, 1).await,
            Status::Online,
            "24 s, timeout 10 s"
        );
        assert_eq!(
            beats(&r.metrics, LeaseBeat::Ok),
            4,
            "one beat a round heard in"
        );
        let rounds = r.metrics.push.ws_lease_rounds.get();
        assert!((25..=27).contains(&rounds), "{rounds} rounds in 26.5 s");
        // Silent from here (last heard at 24.5 s, its beat at 25 s): OFFLINE by the timeout
        // after that beat.
        tokio::time::sleep(TIMEOUT - Duration::from_secs(3)).await;
        assert_eq!(status(&r.shard, 1).await, Status::Online);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(status(&r.shard, 1).await, Status::Offline);
        assert_eq!(beats(&r.metrics, LeaseBeat::Ok), 4);
        r.stop.cancel();
    }

    /// A device the owner no longer holds online comes back as the socket's session with the
    /// next beat, and its release says when that beat ended; once the socket released its
    /// lease, nothing brings it back.
    #[tokio::test(start_paused = true)]
    async fn a_beat_revives_a_device_the_owner_dropped_but_not_after_the_release() {
        let r = rig().await;
        r.shard
            .online_session(2, "d", Platform::Web, 9)
            .await
            .unwrap();
        r.leases.hold(21, 2, "d", Platform::Web, 9);
        r.shard.offline(2, "d", None).await.unwrap();
        assert_eq!(status(&r.shard, 2).await, Status::Offline);
        r.leases.heard(21, true);
        tokio::time::sleep(INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(status(&r.shard, 2).await, Status::Online, "revived");
        assert_eq!(beats(&r.metrics, LeaseBeat::Revived), 1);

        // The beat ended with its round, 10 ms ago: the close's offline must not take it for a
        // reconnect.
        let ended = r.leases.release(21, TIMEOUT).await.expect("it beat");
        assert_eq!(ended.elapsed(), Duration::from_millis(10));
        assert!(r.leases.is_empty());
        r.shard.offline(2, "d", None).await.unwrap();
        r.leases.heard(21, true);
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(status(&r.shard, 2).await, Status::Offline, "released");
        assert_eq!(beats(&r.metrics, LeaseBeat::Revived), 1);
        r.stop.cancel();
    }

    /// A release waits for the round that took its socket's beat, and no longer than its
    /// bound; a lease no round took releases at once.
    #[tokio::test(start_paused = true)]
    async fn a_release_waits_for_the_round_that_took_its_beat() {
        let leases = Leases::new(INTERVAL);
        leases.hold(1, 1, "d", Platform::Pc, 1);
        leases.hold(2, 2, "d", Platform::Pc, 2);
        leases.heard(1, false);
        let round = leases.round.fetch_add(1, Ordering::Relaxed) + 1;
        let taken = leases.take(round);
        assert_eq!(taken.len(), 1, "only the heard lease beats");
        assert!(leases.take(round + 1).is_empty(), "heard once, one beat");

        // Socket 2's lease was not taken: released at once.
        let t = tokio::time::Instant::now();
        let ended = leases.release(2, Duration::from_secs(5)).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert_eq!(ended, None, "it never beat");

        // Socket 1's round ends 300 ms from now.
        let l = leases.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            l.done.send_replace(round);
        });
        let ended = leases.release(1, Duration::from_secs(5)).await;
        assert_eq!(t.elapsed(), Duration::from_millis(300));
        assert_eq!(
            ended,
            Some(t + Duration::from_millis(300)),
            "no earlier than its round"
        );

        // A round that never ends holds a release for its bound only.
        leases.hold(3, 3, "d", Platform::Pc, 3);
        leases.heard(3, false);
        assert_eq!(leases.take(round + 2).len(), 1);
        let t = tokio::time::Instant::now();
        leases.release(3, Duration::from_secs(2)).await;
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }

    /// Activity goes at once only when the user may be idle on the owner before a round could
    /// bring it: never within the idle timeout less two intervals of the last report.
    #[test]
    fn activity_goes_at_once_only_near_the_idle_timeout() {
        let t0 = tokio::time::Instant::now();
        let idle = Duration::from_secs(300);
        let i = Duration::from_secs(1);
        assert!(!report_now(t0, t0, idle, i));
        assert!(!report_now(t0 + Duration::from_secs(297), t0, idle, i));
        assert!(report_now(t0 + Duration::from_secs(298), t0, idle, i));
        // An idle timeout within two intervals: always at once.
        assert!(report_now(t0, t0, Duration::from_secs(2), i));
    }
}
