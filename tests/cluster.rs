//! The sharded cluster for real, as scenarios of steps (`common::scenario`): shards and
//! gateways as child processes of the binary on loopback, with static discovery, on the shared
//! Redis Cluster (`bash scripts/test.sh`). 1,000 users heartbeat through both gateways while a
//! shard is killed with `kill -9`, restarted, added or stopped with SIGTERM; batch polls watch
//! that nobody who heartbeats ever reads OFFLINE, and that those who stop do go OFFLINE in time.
//!
//! The whole REST suite through the gateways is `tests/http.rs` (its `cluster::*` tests).
//! The one test here that needs no Redis (heartbeat batches) runs its shards in-process, each on
//! its own memory store.

mod common;

use std::time::Duration;

use common::scenario::Deadline::{AfterKill, AfterLastHeartbeat};
use common::scenario::Step::*;
use common::scenario::{ms, Scenario, Step, TIMEOUT};
use common::{uid, Cluster, Proc};
use serde_json::json;

/// Handoffs a shard gained.
const GAINED: &str = "presence_handoffs_total{direction=\"gained\"}";

/// How many of `users` the ring `members` gives to shard `i`.
fn owned_by(c: &Cluster, members: &[usize], users: &[u64], i: usize) -> usize {
    let ring = c.ring_of(members);
    let me = c.shard_addr(i);
    users
        .iter()
        .filter(|&&u| ring.owner_of(u) == Some(me.as_str()))
        .count()
}

fn users(n: usize) -> Vec<u64> {
    (0..n).map(|_| uid()).collect()
}

/// (a) `kill -9` of one shard while 1,000 users heartbeat through both gateways leaves every
/// one of them ONLINE; (b) the dead shard's users that stopped heartbeating just before go
/// OFFLINE no later than the heartbeat timeout + 5 s after the kill, and none before the timeout
/// after its last heartbeat. Every ONLINE -> OFFLINE transition counted is one of a user who
/// stopped, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn kill_9_of_a_shard_under_load_makes_no_false_offline_and_times_out_the_silent() {
    let (beating, quiet) = (users(1000), users(300));
    let all: Vec<u64> = beating.iter().chain(&quiet).copied().collect();
    let mut s = Scenario::start(&common::redis_url(), 0, &all, &[]).await;
    let victim = 1;
    let (victim_addr, ring3) = (s.cluster.shard_addr(victim), s.cluster.ring_of(&[0, 1, 2]));
    let dead: Vec<u64> = quiet
        .iter()
        .copied()
        .filter(|&u| ring3.owner_of(u) == Some(victim_addr.as_str()))
        .collect();

    s.run(vec![
        Step::watch("kill -9", &beating, Duration::from_millis(500)),
        Sleep(Duration::from_secs(2)),
        // The quiet users stop; a moment later shard 1 dies.
        StopUsers(quiet.clone()),
        Sleep(Duration::from_millis(300)),
        KillShard(victim),
        Together(vec![
            ExpectOffline(quiet.clone(), AfterKill(TIMEOUT + Duration::from_secs(5))),
            WaitSettled,
        ]),
        // Keep going a while past the deadline: a heartbeating user that a new owner failed
        // to load, or loaded without its device, would have timed out by then.
        SleepPastKill(TIMEOUT + Duration::from_secs(7)),
    ])
    .await;
    let kill_at = s.killed_at.expect("killed");
    let seen = &s.offline_seen;
    let latest_dead = dead.iter().map(|u| seen[u] - kill_at).max().unwrap_or(0);
    let latest_other = quiet
        .iter()
        .filter(|u| !dead.contains(u))
        .map(|&u| seen[&u].saturating_sub(s.load().last_ok_answered(u)))
        .max()
        .unwrap_or(0);
    let o = s.end().await;
    println!(
        "kill -9: cluster up in {:?}; {} heartbeating + {} quiet users ({} quiet on the dead \
         shard); settled without it {:?} after the kill; the dead shard's quiet users OFFLINE at \
         most {latest_dead} ms after the kill (allowed {} ms), the others at most {latest_other} \
         ms after their last heartbeat; {}",
        s.started,
        beating.len(),
        quiet.len(),
        dead.len(),
        s.settled[0],
        ms(TIMEOUT) + 5_000,
        o.summary(),
    );
    s.clean_up().await;
    o.assert_no_false_offline_and_every_heartbeat_landed("kill -9");
    assert!(!dead.is_empty(), "no quiet user on the dead shard");
    // The quiet users', once each, and no other.
    o.assert_went_offline(quiet.len(), &beating, "kill -9");
    assert_eq!(o.online, beating.len() as f64, "users online on the shards");
}

/// (c) A shard killed and restarted gets its users back without a flap: they heartbeat all
/// along and none ever reads OFFLINE; afterwards the restarted shard owns partitions and holds
/// exactly the users the ring gives it, and nobody is counted twice. The gateways' heartbeat
/// streams to it are opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn a_restarted_shard_gets_its_users_back_without_a_flap() {
    let users = users(1000);
    let mut s = Scenario::start(&common::redis_url(), 0, &users, &[]).await;
    let victim = 2;
    let took = s
        .run(vec![
            Step::watch("restart", &users, Duration::from_millis(300)),
            Sleep(Duration::from_secs(1)),
            KillShard(victim),
            WaitSettled,
            Sleep(Duration::from_secs(2)),
            RestartShard(victim),
            WaitSettled,
            // Past a whole timeout with the restarted shard in charge.
            Sleep(TIMEOUT + Duration::from_secs(2)),
        ])
        .await;
    let (left, back) = (took[3], took[5] + took[6]);
    let o = s.end().await;
    let c = &s.cluster;
    // Each gateway's stream to the killed shard broke; a batch after the restart opened another.
    let streams = c
        .gateway_sum("presence_heartbeat_streams_opened_total")
        .await;
    let owned = c
        .metric(Proc::Shard(victim), "presence_owned_partitions")
        .await;
    let cached = c.metric(Proc::Shard(victim), "presence_cached_users").await;
    let mine = c.metric(Proc::Shard(victim), "presence_online_users").await;
    let want = owned_by(c, &[0, 1, 2], &users, victim);
    println!(
        "restart: cluster up in {:?}; {} users; settled without the shard {left:?} after the \
         kill, with it again {back:?} after the restart; restarted shard owns {owned} \
         partitions, holds {cached} users, {mine} online (ring: {want}); {}",
        s.started,
        users.len(),
        o.summary(),
    );
    s.clean_up().await;
    o.assert_no_false_offline_and_every_heartbeat_landed("restart");
    let first = (c.running_gateways().len() * c.running_shards().len()) as f64;
    assert!(
        streams > first,
        "{streams} heartbeat streams opened: none again after the restart (first {first})"
    );
    assert!(owned > 0.0, "the restarted shard owns no partition");
    assert!(cached > 0.0, "the restarted shard holds no user");
    assert_eq!(
        mine, want as f64,
        "users online on the restarted shard: those the ring gives it"
    );
    assert_eq!(o.online, users.len() as f64, "users online on the shards");
    o.assert_went_offline(0, &users, "restart");
}

/// (d) A 4th shard takes about a quarter of the partitions and of the users, and loses no
/// timer: users that stop heartbeating afterwards (those it took over among them) go OFFLINE
/// within the timeout + 2 s, and those that keep heartbeating never read OFFLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn a_fourth_shard_takes_a_quarter_and_loses_no_timer() {
    let users = users(1000);
    let mut s = Scenario::start(&common::redis_url(), 1, &users, &[]).await;
    let (ring3, ring4) = (
        s.cluster.ring_of(&[0, 1, 2]),
        s.cluster.ring_of(&[0, 1, 2, 3]),
    );
    let new_addr = s.cluster.shard_addr(3);
    let moved: Vec<u64> = users
        .iter()
        .copied()
        .filter(|&u| ring3.owner_of(u) != ring4.owner_of(u))
        .collect();
    let to_new = owned_by(&s.cluster, &[0, 1, 2, 3], &users, 3);
    // Those that will stop: every user that moves, and 100 that do not.
    let stay: Vec<u64> = users
        .iter()
        .copied()
        .filter(|u| !moved.contains(u))
        .collect();
    let stoppers: Vec<u64> = moved.iter().chain(stay.iter().take(100)).copied().collect();
    let keepers: Vec<u64> = stay[100..].to_vec();

    let took = s
        .run(vec![
            Step::watch("adding a shard", &users, Duration::from_millis(300)),
            Sleep(Duration::from_secs(1)),
            AddShard,
            WaitSettled,
        ])
        .await;
    let took = took[2] + took[3];
    let c = &s.cluster;
    let owned = c.metric(Proc::Shard(3), "presence_owned_partitions").await;
    let mine = c.metric(Proc::Shard(3), "presence_online_users").await;
    let online = c.shard_sum("presence_online_users").await;

    // Now some stop: every one must be timed out by its (possibly new) owner.
    let after_hb = TIMEOUT + Duration::from_secs(2);
    s.run(vec![
        Step::watch("after adding a shard", &keepers, Duration::from_millis(500)),
        Sleep(Duration::from_secs(1)),
        StopUsers(stoppers.clone()),
        ExpectOffline(stoppers.clone(), AfterLastHeartbeat(after_hb)),
        Sleep(Duration::from_secs(2)),
    ])
    .await;
    let latest = stoppers
        .iter()
        .map(|&u| s.offline_seen[&u].saturating_sub(s.load().last_ok_answered(u)))
        .max()
        .unwrap_or(0);
    let o = s.end().await;
    let partitions = presence_service::ring::PARTITIONS as f64;
    let quarter = partitions / 4.0;
    println!(
        "add: cluster up in {:?}; {} users; the 4th shard ({new_addr}) settled in {took:?}, \
         owns {owned} partitions ({:.1}%), holds {mine} online users; the ring moved {} users \
         ({:.1}%), {to_new} of them to it; {} stopped, OFFLINE at most {latest} ms after their \
         last heartbeat; {}",
        s.started,
        users.len(),
        100.0 * owned / partitions,
        moved.len(),
        100.0 * moved.len() as f64 / users.len() as f64,
        stoppers.len(),
        o.summary(),
    );
    s.clean_up().await;
    o.assert_no_false_offline_and_every_heartbeat_landed("add");
    assert!(
        (owned - quarter).abs() <= 0.05 * partitions,
        "the 4th shard owns {owned} partitions, not 25% ± 5% of them"
    );
    let share = moved.len() as f64 / users.len() as f64;
    assert!(
        (0.20..=0.30).contains(&share),
        "{} of {} users moved",
        moved.len(),
        users.len()
    );
    assert_eq!(
        mine, to_new as f64,
        "users online on the 4th shard: those the ring gives it"
    );
    assert_eq!(online, users.len() as f64, "users online on the shards");
    // Those who stopped, once each, and no other.
    o.assert_went_offline(stoppers.len(), &users, "add");
}

/// (f) SIGTERM makes a shard hand its partitions off before it exits: it exits 0 within a few
/// seconds, and its users, heartbeating all along, never read OFFLINE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn sigterm_hands_off_before_exit_without_a_false_offline() {
    let users = users(1000);
    let mut s = Scenario::start(&common::redis_url(), 0, &users, &[GAINED]).await;
    let victim = 0;
    let took = s
        .run(vec![
            Step::watch("SIGTERM", &users, Duration::from_millis(300)),
            Sleep(Duration::from_secs(1)),
            Sigterm(victim),
            WaitSettled,
            Sleep(TIMEOUT + Duration::from_secs(2)),
        ])
        .await;
    let settled = took[2] + took[3];
    let (exit, exited) = s.exit.expect("the shard exited");
    let o = s.end().await;
    let gained = s.delta(GAINED).await;
    let log = s.cluster.stderr_of(Proc::Shard(victim));
    println!(
        "sigterm: cluster up in {:?}; {} users; the shard exited with {exit} after {exited:?}, \
         the others settled {settled:?} after the signal and gained {gained} partitions; {}",
        s.started,
        users.len(),
        o.summary(),
    );
    s.clean_up().await;
    assert_eq!(exit.code(), Some(0), "exit status {exit}; stderr:\n{log}");
    assert!(
        exited <= Duration::from_secs(5),
        "the shard took {exited:?} to exit after SIGTERM"
    );
    assert!(
        log.contains("handed off every partition"),
        "no handoff logged before exit:\n{log}"
    );
    o.assert_no_false_offline_and_every_heartbeat_landed("SIGTERM");
    assert!(gained > 0.0, "nobody took over the partitions");
    assert_eq!(o.online, users.len() as f64, "users online on the shards");
    o.assert_went_offline(0, &users, "SIGTERM");
}

/// Heartbeats through a gateway reach the shards in batches (far fewer calls than heartbeats
/// when they come at once), on one stream per shard that stays open, and keep their answers:
/// 200 for a device online, the routed path's 404 and message for one that is not, and none of
/// them is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_heartbeats_go_in_batches_and_keep_their_answers() {
    let c = common::blocking(|| Cluster::in_process(3, 1).start());
    let online = users(300);
    for &u in &online {
        let body = json!({ "userId": u, "deviceId": "d", "platform": "WEB" });
        let (code, v) = c.post(0, "/api/v1/presence/online", body).await;
        assert_eq!(code, 200, "{v}");
    }
    let stranger = uid();
    let rounds = 5;
    c.open_connections(0, online.len()).await;
    for _ in 0..rounds {
        let beats = online.iter().map(|&u| {
            let body = json!({ "userId": u, "deviceId": "d", "active": true });
            c.post(0, "/api/v1/presence/heartbeat", body)
        });
        for (code, v) in futures::future::join_all(beats).await {
            assert_eq!(code, 200, "{v}");
        }
        let body = json!({ "userId": stranger, "deviceId": "x", "active": true });
        let (code, v) = c.post(0, "/api/v1/presence/heartbeat", body).await;
        assert_eq!(code, 404, "{v}");
        assert_eq!(v["code"], 404, "{v}");
        assert_eq!(v["message"], "device not online", "{v}");
    }
    let g = Proc::Gateway(0);
    let sent = c.metric(g, "presence_heartbeats_batched_total").await;
    let calls = c.metric(g, "presence_heartbeat_batches_total").await;
    let alone = c.metric(g, "presence_heartbeats_sent_alone_total").await;
    let expected = (rounds * (online.len() + 1)) as f64;
    assert_eq!(sent, expected, "every heartbeat went in a batch, once");
    assert_eq!(alone, 0.0, "none was sent again alone");
    assert!(
        calls <= expected / 2.0,
        "{calls} batch calls for {expected} heartbeats: not coalesced"
    );
    let streams = c.metric(g, "presence_heartbeat_streams_opened_total").await;
    assert_eq!(
        streams, 3.0,
        "one heartbeat stream per shard, kept open across the {calls} batches"
    );
    let ok = c
        .shard_sum("presence_heartbeats_total{result=\"ok\"}")
        .await;
    let not_online = c
        .shard_sum("presence_heartbeats_total{result=\"not_online\"}")
        .await;
    assert_eq!(ok, (rounds * online.len()) as f64, "shards took each once");
    assert_eq!(not_online, rounds as f64, "the stranger's, once each");
    println!("{expected} heartbeats in {calls} batch calls");
}

/// Issue 13: a burst of onlines through a gateway (a reconnect storm) reaches the shards in
/// `OnlineBatch` calls, far fewer than onlines, and each keeps its answer: the user's status for
/// those the shard did, and for one it refused (a user already at its device limit) the routed
/// path's exact error; none is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_onlines_goes_in_batches_and_keeps_its_answers() {
    let c = common::blocking(|| {
        Cluster::in_process(3, 1)
            .vars(&[("PRESENCE_MAX_DEVICES", "2")])
            .start()
    });
    let online = |u: u64, device: &str, platform: &str| {
        let body = json!({ "userId": u, "deviceId": device, "platform": platform });
        c.post(0, "/api/v1/presence/online", body)
    };
    let full = uid();
    for device in ["a", "b"] {
        let (code, v) = online(full, device, "WEB").await;
        assert_eq!(code, 200, "{v}");
    }
    let g = Proc::Gateway(0);
    let counters = || async {
        (
            c.metric(g, "presence_onlines_batched_total").await,
            c.metric(g, "presence_online_batches_total").await,
            c.metric(g, "presence_onlines_sent_alone_total").await,
        )
    };
    let burst = users(300);
    c.open_connections(0, burst.len() + 1).await;
    let (sent0, calls0, alone0) = counters().await;
    let answers = futures::future::join_all(
        burst
            .iter()
            .map(|&u| online(u, "d", "IOS"))
            .chain([online(full, "c", "IOS")]),
    )
    .await;
    let (refused, done) = answers.split_last().unwrap();
    for (code, v) in done {
        assert_eq!(*code, 200, "{v}");
        assert_eq!(v["data"]["status"], "ONLINE", "{v}");
        assert_eq!(v["data"]["devices"][0]["deviceId"], "d", "{v}");
    }
    let (code, v) = refused;
    assert_eq!(*code, 409, "{v}");
    assert_eq!(v["code"], 409, "{v}");
    assert_eq!(
        v["message"], "too many devices online for this user (limit 2)",
        "{v}"
    );
    let (sent, calls, alone) = counters().await;
    let (sent, calls, alone) = (sent - sent0, calls - calls0, alone - alone0);
    assert_eq!(sent, 301.0, "every online went in a batch, once");
    assert_eq!(alone, 0.0, "none went again alone");
    assert!(
        calls <= 150.0,
        "{calls} batch calls for 301 onlines: not coalesced"
    );
    for &u in burst.iter().step_by(30) {
        let (code, v) = c.get(0, &format!("/api/v1/presence/status/{u}")).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["data"]["status"], "ONLINE", "{v}");
    }
    let (code, v) = c.get(0, &format!("/api/v1/presence/status/{full}")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["data"]["devices"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    println!("301 onlines in {calls} batch calls, {alone} sent alone");
}

/// Issue 13: concurrent status reads through a gateway reach the shards in `StatusBatch`
/// calls, far fewer than reads, and each keeps its answer: ONLINE with its device for a user
/// online, OFFLINE for one never seen; none is sent twice, and no shard serves a lone read. A
/// socket's `query` of one user goes the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_status_reads_go_in_batches_and_keep_their_answers() {
    let c = common::blocking(|| Cluster::in_process(3, 1).start());
    let online = users(150);
    for &u in &online {
        let body = json!({ "userId": u, "deviceId": format!("d{u}"), "platform": "PC" });
        let (code, v) = c.post(0, "/api/v1/presence/online", body).await;
        assert_eq!(code, 200, "{v}");
    }
    let never = users(150);
    let g = Proc::Gateway(0);
    let counters = || async {
        (
            c.metric(g, "presence_status_reads_batched_total").await,
            c.metric(g, "presence_status_batches_total").await,
            c.metric(g, "presence_status_reads_sent_alone_total").await,
        )
    };
    let served = |method: &str| {
        format!("presence_grpc_requests_total{{code=\"ok\",method=\"{method}\",side=\"server\"}}")
    };
    let (batches0, lone0) = (
        c.shard_sum(&served("StatusBatch")).await,
        c.shard_sum(&served("Status")).await,
    );
    let paths: Vec<String> = online
        .iter()
        .chain(&never)
        .map(|u| format!("/api/v1/presence/status/{u}"))
        .collect();
    c.open_connections(0, paths.len()).await;
    let (sent0, calls0, alone0) = counters().await;
    let reads = futures::future::join_all(paths.iter().map(|p| c.get(0, p))).await;
    for (u, (code, v)) in online.iter().zip(&reads) {
        assert_eq!(*code, 200, "{v}");
        assert_eq!(v["data"]["userId"], *u, "{v}");
        assert_eq!(v["data"]["status"], "ONLINE", "{v}");
        assert_eq!(v["data"]["devices"][0]["deviceId"], format!("d{u}"), "{v}");
    }
    for (u, (code, v)) in never.iter().zip(&reads[online.len()..]) {
        assert_eq!(*code, 200, "{v}");
        assert_eq!(v["data"]["userId"], *u, "{v}");
        assert_eq!(v["data"]["status"], "OFFLINE", "{v}");
    }
    let (sent, calls, alone) = counters().await;
    let (sent, calls, alone) = (sent - sent0, calls - calls0, alone - alone0);
    assert_eq!(sent, 300.0, "every read went in a batch, once");
    assert_eq!(alone, 0.0, "none went again alone");
    assert!(
        calls < 250.0,
        "{calls} batch calls for 300 reads: not coalesced"
    );
    let batches = c.shard_sum(&served("StatusBatch")).await - batches0;
    assert_eq!(batches, calls, "the shards served each batch");
    let lone = c.shard_sum(&served("Status")).await - lone0;
    assert_eq!(lone, 0.0, "and no lone read");
    // A socket's query of one user is such a read too.
    let mut ws = common::ws::Ws::connect(&c.base(0), never[0], "q").await;
    let before = c.metric(g, "presence_status_reads_batched_total").await;
    let v = ws
        .request(json!({ "type": "query", "userIds": [online[0]] }))
        .await;
    assert_eq!(v["type"], "reply", "{v}");
    assert_eq!(v["data"][0]["userId"], online[0], "{v}");
    assert_eq!(v["data"][0]["status"], "ONLINE", "{v}");
    let after = c.metric(g, "presence_status_reads_batched_total").await;
    assert_eq!(after - before, 1.0, "the query went in a batch");
    println!("300 status reads in {calls} batch calls");
}

/// Issue 13: a batch goes once the gateway has read the requests that came with it, not when
/// its window is out: with a 30 s window, a lone heartbeat is answered at once, and heartbeats
/// that come together still share calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_goes_when_nothing_more_is_ready_not_when_the_window_is_out() {
    let c = common::blocking(|| {
        Cluster::in_process(3, 1)
            .vars(&[("PRESENCE_COALESCE_WINDOW", "30s")])
            .start()
    });
    let online = users(200);
    for &u in &online {
        let body = json!({ "userId": u, "deviceId": "d", "platform": "WEB" });
        let (code, v) = c.post(0, "/api/v1/presence/online", body).await;
        assert_eq!(code, 200, "{v}");
    }
    for &u in online.iter().take(5) {
        let started = std::time::Instant::now();
        let body = json!({ "userId": u, "deviceId": "d", "active": true });
        let (code, v) = c.post(0, "/api/v1/presence/heartbeat", body).await;
        assert_eq!(code, 200, "{v}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "a lone heartbeat took {took:?}: its batch waited for the window"
        );
    }
    let g = Proc::Gateway(0);
    c.open_connections(0, online.len()).await;
    let calls_before = c.metric(g, "presence_heartbeat_batches_total").await;
    let beats = online.iter().map(|&u| {
        let body = json!({ "userId": u, "deviceId": "d", "active": true });
        c.post(0, "/api/v1/presence/heartbeat", body)
    });
    for (code, v) in futures::future::join_all(beats).await {
        assert_eq!(code, 200, "{v}");
    }
    let calls = c.metric(g, "presence_heartbeat_batches_total").await - calls_before;
    assert_eq!(
        c.metric(g, "presence_heartbeats_sent_alone_total").await,
        0.0
    );
    assert!(
        calls <= online.len() as f64 / 2.0,
        "{calls} batch calls for {} heartbeats that came together",
        online.len()
    );
    println!(
        "{} concurrent heartbeats in {calls} batch calls",
        online.len()
    );
}

/// Issue 13: a WebSocket's liveness goes to its shard as a lease: the gateway sends one beat a
/// round for each socket heard from since the previous round, batched per shard, not a call per
/// message. 30 sockets sending 5 heartbeats each within a round reach the shards as 30-60
/// beats, not 150; sockets that keep talking stay ONLINE past the heartbeat timeout on those
/// beats alone; silent ones time out as a silent REST client would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_heartbeats_reach_the_shards_as_a_lease_not_a_call_per_message() {
    let c = common::blocking(|| {
        Cluster::in_process(3, 1)
            .vars(&[
                ("PRESENCE_HEARTBEAT_INTERVAL", "1s"),
                ("PRESENCE_HEARTBEAT_TIMEOUT", "3s"),
                ("PRESENCE_WS_LEASE_INTERVAL", "500ms"),
            ])
            .start()
    });
    let all = users(30);
    let mut sockets = Vec::new();
    for &u in &all {
        sockets.push(common::ws::Ws::connect(&c.base(0), u, "d").await);
    }
    let g = Proc::Gateway(0);
    let beats = || c.shard_sum("presence_heartbeats_total{result=\"ok\"}");
    let before = beats().await;
    for ws in &mut sockets {
        for _ in 0..5 {
            let r = ws
                .request(json!({"type": "heartbeat", "active": false}))
                .await;
            assert_eq!(r["type"], "reply", "{r}");
        }
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let took = beats().await - before;
    assert!(
        (30.0..=60.0).contains(&took),
        "150 heartbeat messages of 30 sockets reached the shards as {took} heartbeats"
    );
    assert!(c.metric(g, "presence_ws_lease_rounds_total").await >= 2.0);
    let leased = c
        .metric(g, "presence_ws_lease_beats_total{result=\"ok\"}")
        .await;
    assert!(leased >= 30.0, "{leased} lease beats");

    // Half keep talking (a message every 700 ms) for 4.5 s, past the 3 s timeout; the others
    // are silent from here.
    let talking = &mut sockets[..15];
    let until = std::time::Instant::now() + Duration::from_millis(4500);
    while std::time::Instant::now() < until {
        for ws in talking.iter_mut() {
            ws.send_json(&json!({"type": "heartbeat", "active": false}));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    for (i, &u) in all.iter().enumerate() {
        let (code, v) = c.get(0, &format!("/api/v1/presence/status/{u}")).await;
        assert_eq!(code, 200, "{v}");
        let want = if i < 15 { "ONLINE" } else { "OFFLINE" };
        assert_eq!(v["data"]["status"], want, "user {i}: {v}");
    }
    println!("150 socket heartbeats -> {took} shard heartbeats; {leased} lease beats");
}
