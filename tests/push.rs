//! Real-time push end to end: WebSocket clients (`common::ws`) against nodes in this process
//! (one node, or 3 shards + 2 gateways) and, where a shard is killed, child processes.
//!
//! - presence events cross gateways in order and within a second (online, manual status,
//!   heartbeat timeout), and a `kill -9` of the owning shard still delivers the timeout;
//! - resume after a reconnect sends exactly what the client missed;
//! - subscriptions over REST (add, remove, replace, the limit, persistence across a restart,
//!   every device of the user);
//! - malformed, oversized and unknown messages, floods, slow consumers, bad upgrade queries;
//! - the close grace and REST `/offline`;
//! - across the gateways of a cluster: a user's devices on both, a reconnect on the other
//!   gateway (resume, close grace), more subscriptions than the socket queue.
//!
//! The tests that use the shared Redis (ignored by plain `cargo test`: `bash scripts/test.sh`)
//! run one at a time (`common::shared_redis`): every node on it fences the partitions it owns
//! and reloads their live users from the store at start, and would time out another test's
//! users. The others use a node (or a cluster) of
//! their own on the in-memory store and run in parallel.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::http::{assert_envelope, metric, rest};
use common::ws::{ids, sorted, ws_url, Ws, WS};
use common::{blocking, uid, Cluster, Server, Topology};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ONLINE: &str = "/api/v1/presence/online";
const OFFLINE: &str = "/api/v1/presence/offline";

/// Heartbeat every second, OFFLINE 3 s after the last one.
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(3);
/// The timer wheel's resolution (`PRESENCE_TIMER_TICK`, default).
const TICK: Duration = Duration::from_millis(10);
/// The bound on the delay from a change to its delivery.
const PUSH_BOUND: Duration = Duration::from_secs(1);

/// What the clusters run with.
const CLUSTER_ENVS: &[(&str, &str)] = &[
    ("PRESENCE_HEARTBEAT_INTERVAL", "1s"),
    ("PRESENCE_HEARTBEAT_TIMEOUT", "3s"),
    ("PRESENCE_IDLE_TIMEOUT", "10m"),
    ("PRESENCE_HEALTH_INTERVAL", "500ms"),
];

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------------------------------------
// REST

/// `POST /online` of `user` on `device`: the view it answers.
async fn online(base: &str, user: u64, device: &str) -> Value {
    let body = json!({"userId": user, "deviceId": device, "platform": "IOS"});
    let (code, v) = rest(base, "POST", ONLINE, Some(body)).await;
    assert_eq!(code, 200, "online {user}/{device}: {v}");
    v["data"].clone()
}

async fn offline(base: &str, user: u64, device: &str) {
    let body = json!({"userId": user, "deviceId": device});
    let (code, v) = rest(base, "POST", OFFLINE, Some(body)).await;
    assert_eq!(code, 200, "offline {user}/{device}: {v}");
}

/// `PUT /status/{user}`: the view it answers.
async fn set_status(base: &str, user: u64, body: Value) -> Value {
    let path = format!("/api/v1/presence/status/{user}");
    let (code, v) = rest(base, "PUT", &path, Some(body)).await;
    assert_eq!(code, 200, "PUT {path}: {v}");
    v["data"].clone()
}

async fn status(base: &str, user: u64) -> Value {
    let path = format!("/api/v1/presence/status/{user}");
    let (code, v) = rest(base, "GET", &path, None).await;
    assert_eq!(code, 200, "GET {path}: {v}");
    v["data"].clone()
}

fn subs_path(user: u64) -> String {
    format!("/api/v1/presence/subscriptions/{user}")
}

/// `PUT /subscriptions/{user}`: status and envelope.
async fn put_subs(base: &str, user: u64, body: Value) -> (u16, Value) {
    rest(base, "PUT", &subs_path(user), Some(body)).await
}

/// `GET /subscriptions/{user}`: the targets (sorted) and the whole `data`.
async fn get_subs(base: &str, user: u64) -> (Vec<u64>, Value) {
    let (code, v) = rest(base, "GET", &subs_path(user), None).await;
    assert_eq!(code, 200, "GET subscriptions of {user}: {v}");
    (ids(&v["data"]["targets"]), v["data"].clone())
}

/// The statuses and versions of `frames`.
fn history(frames: &[(Instant, Value)]) -> Vec<(String, u64)> {
    frames
        .iter()
        .map(|(_, d)| {
            (
                d["status"].as_str().unwrap_or("?").to_owned(),
                d["version"].as_u64().expect("a version"),
            )
        })
        .collect()
}

fn assert_increasing(h: &[(String, u64)], what: &str) {
    for w in h.windows(2) {
        assert!(w[1].1 > w[0].1, "{what}: versions not increasing: {h:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1, 2: across the cluster

/// A is on gateway 1 and subscribes to B; B comes online on gateway 2, sets BUSY, and times out.
/// A gets ONLINE, BUSY, OFFLINE of B, in that order and increasing version, each within 1 s of
/// the change (the timeout: of the moment it is due, plus the timer tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn cluster_push_online_busy_timeout_in_order_within_a_second() {
    let redis = common::shared_redis();
    let spec = Cluster::in_process(3, 2)
        .vars(CLUSTER_ENVS)
        .redis(Some(&redis.url));
    let c = blocking(|| spec.start());
    let (g1, g2) = (c.base(0), c.base(1));
    let (a, b) = (uid(), uid());

    let mut ws = Ws::connect(&g1, a, "a1").await;
    ws.keepalive(INTERVAL);
    let r = ws.subscribe(&[b]).await;
    assert_eq!(ids(&r["data"]["targets"]), vec![b], "{r}");
    assert_eq!(r["data"]["statuses"][0]["status"], "OFFLINE", "{r}");

    // ONLINE, on the other gateway.
    let sent = Instant::now();
    let view = online(&g2, b, "b1").await;
    let answered = Instant::now();
    let (t_online, d) = ws.wait_status(b, "ONLINE", Duration::from_secs(5)).await;
    assert_eq!(
        d["version"], view["version"],
        "the event is the change: {d} vs {view}"
    );
    let d_online = t_online.saturating_duration_since(answered);

    // BUSY.
    let view = set_status(&g2, b, json!({"status": "BUSY"})).await;
    let busy_answered = Instant::now();
    let (t_busy, d) = ws.wait_status(b, "BUSY", Duration::from_secs(5)).await;
    assert_eq!(d["version"], view["version"], "{d} vs {view}");
    assert_eq!(d["manualStatus"], "BUSY", "{d}");
    let d_busy = t_busy.saturating_duration_since(busy_answered);

    // No heartbeat from B: OFFLINE once the timeout after its online has passed.
    let (t_off, d) = ws
        .wait_status(b, "OFFLINE", TIMEOUT + Duration::from_secs(5))
        .await;
    assert!(
        t_off >= sent + TIMEOUT,
        "OFFLINE {} ms after the online was sent, before the {TIMEOUT:?} timeout",
        ms(t_off - sent)
    );
    let d_off = t_off.saturating_duration_since(answered + TIMEOUT);
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(0), "{d}");

    ws.quiet(Duration::from_millis(300)).await;
    let h = history(&ws.presence(b));
    let statuses: Vec<&str> = h.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        ["ONLINE", "BUSY", "OFFLINE"],
        "events of B: {h:?}"
    );
    assert_increasing(&h, "events of B");
    println!(
        "cluster push delays: ONLINE {} ms, BUSY {} ms, OFFLINE {} ms after due (timeout {} ms, \
         tick {} ms)",
        ms(d_online),
        ms(d_busy),
        ms(d_off),
        ms(TIMEOUT),
        ms(TICK)
    );
    assert!(
        d_online <= PUSH_BOUND,
        "ONLINE delivered {} ms after the change",
        ms(d_online)
    );
    assert!(
        d_busy <= PUSH_BOUND,
        "BUSY delivered {} ms after the change",
        ms(d_busy)
    );
    assert!(
        d_off <= PUSH_BOUND + TICK,
        "OFFLINE delivered {} ms after the timeout was due",
        ms(d_off)
    );

    // A heartbeated over its socket all along: still connected and ONLINE.
    assert!(ws.closed.is_none(), "A's socket closed: {:?}", ws.closed);
    ws.heartbeat().await;
    assert_eq!(status(&g2, a).await["status"], "ONLINE");
}

/// `kill -9` of the shard that owns B, after B came online and A subscribed: the new owner
/// times B out and A gets the OFFLINE, within the heartbeat timeout + 6 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn cluster_kill_9_of_the_owner_still_delivers_the_timeout() {
    let redis = common::shared_redis();
    let spec = Cluster::processes(3, 2)
        .vars(CLUSTER_ENVS)
        .redis(Some(&redis.url));
    let mut c = blocking(|| spec.start());
    let (g1, g2) = (c.base(0), c.base(1));
    let ring = c.ring_of(&[0, 1, 2]);
    let a = uid();
    let owner_a = ring.owner_of(a).expect("an owner").to_owned();
    // B on another shard than A, so A's own heartbeats are not what the kill disturbs.
    let b = std::iter::repeat_with(uid)
        .find(|&u| ring.owner_of(u) != Some(owner_a.as_str()))
        .expect("a user on another shard");
    let owner_b = ring.owner_of(b).expect("an owner").to_owned();
    let victim = (0..c.shards())
        .find(|&i| c.shard_addr(i) == owner_b)
        .expect("B's owner is a shard");

    let mut ws = Ws::connect(&g1, a, "a1").await;
    ws.keepalive(INTERVAL);
    ws.subscribe(&[b]).await;
    let sent = Instant::now();
    online(&g2, b, "b1").await;
    ws.wait_status(b, "ONLINE", Duration::from_secs(5)).await;

    let killed = Instant::now();
    blocking(|| c.kill_shard(victim));
    let bound = TIMEOUT + Duration::from_secs(6);
    let (t_off, d) = ws
        .wait_status(b, "OFFLINE", bound + Duration::from_secs(4))
        .await;
    let after_kill = t_off - killed;
    println!(
        "kill -9 of B's owner (shard {victim}) {} ms after B's online: OFFLINE delivered {} ms \
         after the kill ({} ms after the online was sent; allowed {} ms after the kill)",
        ms(killed - sent),
        ms(after_kill),
        ms(t_off - sent),
        ms(bound)
    );
    assert!(t_off >= sent + TIMEOUT, "OFFLINE before the timeout: {d}");
    assert!(
        after_kill <= bound,
        "OFFLINE {} ms after the kill",
        ms(after_kill)
    );
    let h = history(&ws.presence(b));
    assert_eq!(h.first().map(|x| x.0.as_str()), Some("ONLINE"), "{h:?}");
    assert_eq!(h.last().map(|x| x.0.as_str()), Some("OFFLINE"), "{h:?}");
    assert_increasing(&h, "events of B");
    assert!(ws.closed.is_none(), "A's socket closed: {:?}", ws.closed);
    ws.heartbeat().await;
    assert_eq!(status(&g2, b).await["status"], "OFFLINE");
}

/// The gateways of a cluster (its own shards, on their in-memory stores, `PRESENCE_WS_QUEUE=8`):
/// - D subscribes on gateway 1; D's other device, on gateway 2, gets the events too;
/// - A leaves gateway 1 and comes back on gateway 2 within the close grace, as behind a load
///   balancer: a resume there sends only what A missed (B's current state, nothing of C), and S,
///   subscribed to A, sees no OFFLINE of A;
/// - U, subscribed (over REST) to more targets than the socket queue holds, all of them known,
///   connects and is not cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_gateways_share_devices_resume_across_gateways_and_take_many_subscriptions() {
    const GRACE: Duration = Duration::from_secs(1);
    let envs = [
        ("PRESENCE_HEALTH_INTERVAL", "500ms"),
        ("PRESENCE_WS_CLOSE_GRACE", "1s"),
        ("PRESENCE_WS_QUEUE", "8"),
    ];
    let c = blocking(|| Cluster::in_process(3, 2).vars(&envs).start());
    let (g1, g2) = (c.base(0), c.base(1));
    let (s, a, b, cc) = (uid(), uid(), uid(), uid());
    let mut problems = Vec::new();

    // Subscriptions belong to the user: D subscribes on gateway 1, and D's other device, on
    // gateway 2, gets the events too.
    let (d, e) = (uid(), uid());
    let mut ws_d2 = Ws::connect(&g2, d, "d2").await;
    let mut ws_d1 = Ws::connect(&g1, d, "d1").await;
    ws_d1.subscribe(&[e]).await;
    let view = online(&g1, e, "e1").await;
    ws_d1.wait_status(e, "ONLINE", Duration::from_secs(3)).await;
    ws_d2.quiet(Duration::from_millis(500)).await;
    let on_d2 = history(&ws_d2.presence(e));
    if on_d2.len() != 1 || Some(on_d2[0].1) != view["version"].as_u64() {
        problems.push(format!(
            "D's device on the other gateway got {on_d2:?} of E (want its ONLINE, {view})"
        ));
    }

    let mut ws_s = Ws::connect(&g1, s, "s1").await;
    ws_s.subscribe(&[a]).await;
    let mut ws_a = Ws::connect(&g1, a, "a1").await;
    ws_a.subscribe(&[b, cc]).await;
    ws_s.wait_status(a, "ONLINE", Duration::from_secs(3)).await;
    online(&g2, b, "b1").await;
    online(&g2, cc, "c1").await;
    let (_, db) = ws_a.wait_status(b, "ONLINE", Duration::from_secs(3)).await;
    let (_, dc) = ws_a.wait_status(cc, "ONLINE", Duration::from_secs(3)).await;
    let (vb, vc) = (
        db["version"].as_u64().unwrap(),
        dc["version"].as_u64().unwrap(),
    );

    let closing = Instant::now();
    ws_a.close().await;
    set_status(&g2, b, json!({"status": "BUSY"})).await;
    let away = set_status(&g2, b, json!({"status": "AWAY"})).await;
    let mut ws_a = Ws::connect(&g2, a, "a1").await;
    let back = closing.elapsed();
    assert!(back < GRACE, "reconnected {} ms after the close", ms(back));

    ws_a.quiet(Duration::from_millis(300)).await;
    let early: Vec<Value> = [b, cc]
        .iter()
        .flat_map(|&u| ws_a.presence(u))
        .map(|(_, d)| d)
        .collect();
    if !early.is_empty() {
        problems.push(format!("frames before the resume: {early:?}"));
    }
    let n_early = (ws_a.presence(b).len(), ws_a.presence(cc).len());
    let versions = json!({ b.to_string(): vb, cc.to_string(): vc });
    let r = ws_a
        .request(json!({"type": "resume", "versions": versions}))
        .await;
    ws_a.quiet(Duration::from_millis(300)).await;
    let got_b: Vec<Value> = ws_a.presence(b).into_iter().map(|(_, d)| d).collect();
    let got_c: Vec<Value> = ws_a.presence(cc).into_iter().map(|(_, d)| d).collect();
    if got_b.len() != 1 || got_b[0]["version"] != away["version"] || got_b[0]["status"] != "AWAY" {
        problems.push(format!(
            "B after the resume: {got_b:?} (want one, version {})",
            away["version"]
        ));
    }
    if !got_c.is_empty() {
        problems.push(format!("C, unchanged, was sent: {got_c:?}"));
    }
    if r["data"]["sent"] != 1 {
        problems.push(format!(
            "resume reply: {r} (frames before it: B {}, C {})",
            n_early.0, n_early.1
        ));
    }

    // S: no OFFLINE of A, during the grace and after it.
    ws_s.quiet(
        (closing + GRACE + Duration::from_millis(1500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let h = history(&ws_s.presence(a));
    if h.iter().any(|(st, _)| st != "ONLINE") || h.len() != 1 {
        problems.push(format!(
            "S saw A flap after a reconnect on the other gateway: {h:?}"
        ));
    }
    let st = status(&g2, a).await;
    if st["status"] != "ONLINE" {
        problems.push(format!(
            "A reads {} after reconnecting within the grace",
            st["status"]
        ));
    }

    // U: 30 subscriptions, every target online once (so each has a state to show), then U
    // connects. Nothing changes meanwhile: the socket has nothing it must be sent.
    let u = uid();
    let targets: Vec<u64> = (0..30).map(|_| uid()).collect();
    for &t in &targets {
        online(&g2, t, "t").await;
    }
    let (code, v) = put_subs(&g2, u, json!({"targets": targets})).await;
    assert_eq!(code, 200, "{v}");
    let mut ws_u = Ws::connect(&g1, u, "u1").await;
    assert_eq!(ids(&ws_u.welcome["subscriptions"]), sorted(&targets));
    ws_u.quiet(Duration::from_millis(500)).await;
    let pushed = ws_u
        .log
        .iter()
        .filter(|(_, v)| v["type"] == "presence")
        .count();
    ws_u.send_json(&json!({"type": "heartbeat", "id": "hb"}));
    let closed = ws_u.wait_closed(Duration::from_millis(700)).await;
    if let Some((_, code)) = closed {
        problems.push(format!(
            "U (30 subscriptions, queue 8) was cut off right after connecting, close code \
             {code:?}, after {pushed} unsolicited presence frames"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 3: resume

/// A saw B and C; while A is away (within the close grace) B changes twice and C not at all. A
/// reconnects and resumes with the versions it saw: one frame, B's current state; none for C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_sends_only_what_was_missed() {
    let s = Server::start_private(Topology::Memory, &[("PRESENCE_WS_CLOSE_GRACE", "5s")]);
    let base = s.base.clone();
    let (a, b, c) = (uid(), uid(), uid());
    let mut ws = Ws::connect(&base, a, "a1").await;
    ws.subscribe(&[b, c]).await;
    online(&base, b, "b1").await;
    online(&base, c, "c1").await;
    let (_, db) = ws.wait_status(b, "ONLINE", Duration::from_secs(2)).await;
    let (_, dc) = ws.wait_status(c, "ONLINE", Duration::from_secs(2)).await;
    let (vb, vc) = (
        db["version"].as_u64().unwrap(),
        dc["version"].as_u64().unwrap(),
    );
    ws.close().await;

    set_status(&base, b, json!({"status": "BUSY"})).await;
    let away = set_status(&base, b, json!({"status": "AWAY"})).await;
    let v_away = away["version"].as_u64().unwrap();
    assert_eq!(v_away, vb + 2, "two changes of B: {away}");

    let mut ws = Ws::connect(&base, a, "a1").await;
    assert_eq!(
        ids(&ws.welcome["subscriptions"]),
        sorted(&[b, c]),
        "{}",
        ws.welcome
    );
    ws.quiet(Duration::from_millis(300)).await;
    assert!(
        ws.presence(b).is_empty() && ws.presence(c).is_empty(),
        "frames before the resume: {:?}",
        ws.frames()
    );
    let versions = json!({ b.to_string(): vb, c.to_string(): vc });
    let r = ws
        .request(json!({"type": "resume", "versions": versions}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["code"], 200, "{r}");
    assert_eq!(r["data"]["sent"], 1, "resume: {r}");
    ws.quiet(Duration::from_millis(300)).await;
    let got_b = ws.presence(b);
    assert_eq!(got_b.len(), 1, "frames of B after the resume: {got_b:?}");
    assert_eq!(got_b[0].1["status"], "AWAY", "{:?}", got_b[0].1);
    assert_eq!(got_b[0].1["manualStatus"], "AWAY", "{:?}", got_b[0].1);
    assert_eq!(got_b[0].1["version"], v_away, "{:?}", got_b[0].1);
    assert!(
        ws.presence(c).is_empty(),
        "C did not change: {:?}",
        ws.presence(c)
    );

    // Nothing more was missed: a second resume sends nothing, and one that claims a newer
    // version than the current never gets an older state.
    let r = ws
        .request(json!({"type": "resume", "versions": versions}))
        .await;
    assert_eq!(r["data"]["sent"], 0, "second resume: {r}");
    let mut ws2 = Ws::connect(&base, a, "a2").await;
    let ahead = json!({ b.to_string(): v_away + 5, c.to_string(): vc });
    let r = ws2
        .request(json!({"type": "resume", "versions": ahead}))
        .await;
    assert_eq!(r["data"]["sent"], 0, "resume from ahead: {r}");
    ws2.quiet(Duration::from_millis(200)).await;
    assert!(
        ws2.presence(b).is_empty() && ws2.presence(c).is_empty(),
        "{:?}",
        ws2.frames()
    );
    ws.quiet(Duration::from_millis(100)).await;
    assert_eq!(ws.presence(b).len(), 1, "{:?}", ws.frames());
}

// ---------------------------------------------------------------------------------------------
// 4: subscriptions over REST

/// Add, remove, replace; GET with statuses; the limit answers 400 and changes nothing;
/// subscriptions survive a restart on Redis and reach every device of the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn subscriptions_rest_limits_persistence_and_every_device() {
    let _redis = common::shared_redis();
    const ENVS: &[(&str, &str)] = &[("PRESENCE_MAX_SUBSCRIPTIONS", "5")];
    let s = Server::start(Topology::Redis, ENVS);
    let base = s.base.clone();
    let a = uid();
    let t: Vec<u64> = (0..7).map(|_| uid()).collect();
    online(&base, t[0], "d").await;

    let (code, v) = put_subs(&base, a, json!({"targets": [t[0], t[1], t[2]]})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["userId"], a, "{v}");
    assert_eq!(
        ids(&v["data"]["targets"]),
        sorted(&t[0..3]),
        "add (default mode): {v}"
    );
    let st = v["data"]["statuses"].as_array().expect("statuses").clone();
    assert_eq!(st.len(), 3, "{v}");
    for x in &st {
        let want = if x["userId"] == t[0] {
            "ONLINE"
        } else {
            "OFFLINE"
        };
        assert_eq!(x["status"], want, "{x}");
    }
    let (code, v) = put_subs(&base, a, json!({"targets": [t[2], t[3]], "mode": "add"})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v["data"]["targets"]), sorted(&t[0..4]), "add: {v}");
    let (code, v) = put_subs(&base, a, json!({"targets": [t[0], t[6]], "mode": "remove"})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v["data"]["targets"]), sorted(&t[1..4]), "remove: {v}");

    // Past the limit: 400, nothing changes.
    let (code, v) = put_subs(
        &base,
        a,
        json!({"targets": [t[4], t[5], t[6]], "mode": "add"}),
    )
    .await;
    assert_eq!(code, 400, "6 subscriptions with a limit of 5: {v}");
    let (code, v) = put_subs(&base, a, json!({"targets": &t[0..6], "mode": "replace"})).await;
    assert_eq!(code, 400, "replace with 6: {v}");
    let (code, v) = put_subs(&base, a, json!({"targets": [t[0]], "mode": "bogus"})).await;
    assert_eq!(code, 400, "bad mode: {v}");
    let (code, v) = put_subs(&base, a, json!({"targets": [0]})).await;
    assert_eq!(code, 400, "userId 0: {v}");
    let (list, _) = get_subs(&base, a).await;
    assert_eq!(list, sorted(&t[1..4]), "unchanged after the refusals");

    let (code, v) = put_subs(
        &base,
        a,
        json!({"targets": [t[5], t[6]], "mode": "replace"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v["data"]["targets"]), sorted(&t[5..7]), "replace: {v}");
    let (code, v) = put_subs(&base, a, json!({"targets": &t[0..5], "mode": "replace"})).await;
    assert_eq!(code, 200, "replace with exactly the limit: {v}");
    let (list, data) = get_subs(&base, a).await;
    assert_eq!(list, sorted(&t[0..5]));
    assert_eq!(data["userId"], a);
    let mut seen: Vec<u64> = data["statuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .map(|x| {
            let want = if x["userId"] == t[0] {
                "ONLINE"
            } else {
                "OFFLINE"
            };
            assert_eq!(x["status"], want, "GET: {x}");
            x["userId"].as_u64().unwrap()
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, sorted(&t[0..5]), "GET statuses: {data}");

    // A restart keeps them, when on Redis.
    let s = if s.shared_store {
        drop(s);
        let s = Server::start(Topology::Redis, ENVS);
        let (list, _) = get_subs(&s.base, a).await;
        assert_eq!(list, sorted(&t[0..5]), "after a restart");
        s
    } else {
        eprintln!("subscriptions across a restart: not checked, no shared store");
        s
    };
    let base = s.base.clone();

    // They belong to the user: both devices of A get the events.
    let mut d1 = Ws::connect(&base, a, "phone").await;
    let mut d2 = Ws::connect(&base, a, "laptop").await;
    for w in [&d1, &d2] {
        assert_eq!(
            ids(&w.welcome["subscriptions"]),
            sorted(&t[0..5]),
            "{}",
            w.welcome
        );
    }
    let view = online(&base, t[1], "d").await;
    for w in [&mut d1, &mut d2] {
        let (_, d) = w.wait_status(t[1], "ONLINE", Duration::from_secs(2)).await;
        assert_eq!(d["version"], view["version"], "{d}");
    }
    // A REST change applies to the open sockets at once; over the socket the limit holds too.
    let (code, v) = put_subs(&base, a, json!({"targets": [t[2]], "mode": "replace"})).await;
    assert_eq!(code, 200, "{v}");
    online(&base, t[1], "d2").await;
    let view = online(&base, t[2], "d").await;
    for w in [&mut d1, &mut d2] {
        let (_, d) = w.wait_status(t[2], "ONLINE", Duration::from_secs(2)).await;
        assert_eq!(d["version"], view["version"], "{d}");
        assert_eq!(
            w.presence(t[1]).len(),
            1,
            "no more events of an unsubscribed target"
        );
    }
    let five: Vec<u64> = (0..5).map(|_| uid()).collect();
    let r = d1
        .request(json!({"type": "subscribe", "targets": five}))
        .await;
    assert_eq!(r["type"], "error", "over the limit on the socket: {r}");
    assert_eq!(r["code"], 400, "{r}");
    assert!(r["data"].is_null(), "{r}");
    let (list, _) = get_subs(&base, a).await;
    assert_eq!(list, vec![t[2]], "unchanged after the socket's refusal");

    // Unsubscribing on one socket stops the events on both.
    let r = d2
        .request(json!({"type": "unsubscribe", "targets": [t[2]]}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_u64()),
        (Some("reply"), Some(200)),
        "{r}"
    );
    assert_eq!(ids(&r["data"]["targets"]), Vec::<u64>::new(), "{r}");
    set_status(&base, t[2], json!({"status": "BUSY"})).await;
    for w in [&mut d1, &mut d2] {
        w.quiet(Duration::from_millis(300)).await;
        let h = history(&w.presence(t[2]));
        assert_eq!(h.len(), 1, "events after the unsubscribe: {h:?}");
    }
    assert_eq!(get_subs(&base, a).await.0, Vec::<u64>::new());
}

// ---------------------------------------------------------------------------------------------
// 5: limits and bad input

/// Malformed, unknown and binary messages each get an `error` with the REST code; the socket
/// stays up and answers a heartbeat after each. An oversized frame closes it (1009).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_socket_stays_up() {
    let s = Server::start_private(Topology::Memory, &[("PRESENCE_WS_RATE", "5")]);
    let u = uid();
    let mut ws = Ws::connect(&s.base, u, "d").await;

    let n = ws.log.len();
    ws.send(Message::Text("{\"type\": \"heartbeat\", oops".into()));
    let e = ws.next_error(n, "an error for malformed JSON").await;
    assert_eq!(e["code"], 400, "{e}");
    assert!(
        e["data"].is_null() && e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{e}"
    );
    ws.heartbeat().await;

    let e = ws.request(json!({"type": "dance"})).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], 400, "unknown type: {e}");
    assert!(e["data"].is_null(), "{e}");
    ws.heartbeat().await;

    let e = ws
        .request(json!({"type": "setStatus", "status": "SLEEPING"}))
        .await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(400)),
        "{e}"
    );
    let n = ws.log.len();
    ws.send(Message::Binary(vec![1u8, 2, 3].into()));
    let e = ws.next_error(n, "an error for a binary message").await;
    assert_eq!(e["code"], 400, "{e}");
    ws.heartbeat().await;
    assert!(ws.closed.is_none(), "closed: {:?}", ws.closed);
    assert_eq!(status(&s.base, u).await["status"], "ONLINE");

    // A frame over PRESENCE_WS_MAX_FRAME (64 KiB) is refused before it is buffered: the socket
    // is closed with 1009 (Message Too Big).
    let pad = "x".repeat(70 * 1024);
    ws.send_json(&json!({"type": "heartbeat", "id": "big", "pad": pad}));
    let closed = ws.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(
        closed.map(|(_, c)| c),
        Some(Some(1009)),
        "a 70 KiB frame: {closed:?}"
    );
}

/// A client that sends faster than `PRESENCE_WS_RATE` (bursts of twice that) is closed with
/// 1008. Several clients, each must get the close code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_closed_with_1008() {
    let s = Server::start_private(Topology::Memory, &[("PRESENCE_WS_RATE", "5")]);
    let slow = "presence_slow_consumers_total";
    let before = metric(&s.base, slow).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let mut ws = Ws::connect(&s.base, uid(), "d").await;
        for i in 0..40 {
            ws.send_json(&json!({"type": "heartbeat", "id": i}));
        }
        let closed = ws.wait_closed(Duration::from_secs(5)).await;
        let replies = ws.log.iter().filter(|(_, v)| v["type"] == "reply").count();
        assert!(
            replies <= 12,
            "{replies} replies answered in a flood at 5/s, bursts of 10"
        );
        codes.push(closed.map(|(_, c)| c));
    }
    println!("flood close codes: {codes:?}");
    assert!(
        codes.iter().all(|c| *c == Some(Some(1008))),
        "every flood closed with 1008: {codes:?}"
    );
    // The README: sockets closed for the rate limit count as slow consumers too.
    assert_eq!(metric(&s.base, slow).await - before, 6.0, "{slow}");
    // A client within the rate is not closed.
    let mut ws = Ws::connect(&s.base, uid(), "d").await;
    for _ in 0..8 {
        ws.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ws.closed.is_none(), "{:?}", ws.closed);
}

/// The socket limits of issue 11: a user's sockets past `PRESENCE_WS_MAX_PER_USER` are closed at
/// once with 4409 (the device untouched); a socket silent past `PRESENCE_WS_IDLE_TIMEOUT` is
/// closed with 4408 while one that answers pings stays; a frame over `PRESENCE_WS_MAX_FRAME`
/// closes with 1009; `setStatus` past `PRESENCE_STATUS_RATE` gets an error with code 429. Each
/// refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_limits_close_with_their_codes_and_count() {
    const REFUSED: &str = "presence_ws_refusals_total";
    let s = Server::start_private(
        Topology::Memory,
        &[
            ("PRESENCE_WS_MAX_PER_USER", "2"),
            ("PRESENCE_WS_PING_INTERVAL", "300ms"),
            ("PRESENCE_WS_IDLE_TIMEOUT", "1s"),
            ("PRESENCE_WS_MAX_FRAME", "4096"),
            ("PRESENCE_STATUS_RATE", "2/1m,2"),
            ("PRESENCE_RATE_LIMIT_DELAY", "0s"),
        ],
    );
    let base = s.base.clone();
    let reason = |r: &str| format!("{REFUSED}{{reason=\"{r}\"}}");
    let user = uid();
    // Two sockets are fine; the third is closed with 4409 and changes nothing.
    let mut a = Ws::connect(&base, user, "a").await;
    let mut b = Ws::connect(&base, user, "b").await;
    let url = ws_url(&base, &format!("userId={user}&deviceId=c&platform=WEB"));
    let (mut third, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("the upgrade itself succeeds");
    let first = tokio::time::timeout(Duration::from_secs(5), third.next())
        .await
        .expect("a frame")
        .expect("open")
        .expect("no error");
    match first {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4409, "{f:?}"),
        other => panic!("expected a close with 4409, got {other:?}"),
    }
    let view = status(&base, user).await;
    let devices: Vec<&str> = view["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(devices.len(), 2, "{view}");
    assert!(
        !devices.contains(&"c"),
        "the refused socket's device came online: {view}"
    );
    assert_eq!(metric(&base, &reason("too_many_sockets")).await, 1.0);

    // setStatus: two pass, the third is a 429 error and the socket stays open.
    for i in 0..2 {
        let r = a
            .request(json!({"type": "setStatus", "status": "BUSY", "customText": format!("t{i}")}))
            .await;
        assert_eq!(r["type"], "reply", "{r}");
    }
    let r = a
        .request(json!({"type": "setStatus", "status": "AWAY", "customText": "t2"}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], 429, "{r}");
    let view = status(&base, user).await;
    assert_eq!(
        view["customText"], "t1",
        "a refused change changed something"
    );
    assert_eq!(
        metric(&base, "presence_rate_limited_total{limit=\"status\"}").await,
        1.0
    );

    // A frame over the limit closes the socket with 1009.
    b.send_json(&json!({"type": "heartbeat", "id": "x".repeat(5000)}));
    let closed = b.wait_closed(Duration::from_secs(5)).await;
    assert_eq!(closed.map(|(_, c)| c), Some(Some(1009)), "{closed:?}");
    assert_eq!(metric(&base, &reason("frame_too_large")).await, 1.0);

    // A client that answers pings (ours does, while it reads) outlives the idle timeout...
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        a.pump();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.closed.is_none(),
        "a socket that answers pings was closed: {:?}",
        a.closed
    );
    // ...and one that reads nothing and answers nothing is closed with 4408.
    let url = ws_url(&base, &format!("userId={}&deviceId=d&platform=WEB", uid()));
    let (mut silent, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), silent.next()).await {
        if let Message::Close(f) = m {
            code = f.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(4408));
    assert_eq!(metric(&base, &reason("idle_timeout")).await, 1.0);
}

/// A client that subscribes and then never reads while its targets change many times is cut
/// off (`PRESENCE_WS_QUEUE=4`): counted in `presence_slow_consumers_total`, disconnected by the
/// server without the client's help, with close code 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_counted_and_closed_with_1008() {
    const SLOW: &str = "presence_slow_consumers_total";
    const SOCKETS: &str = "presence_ws_connections";
    let s = Server::start_private(
        Topology::Memory,
        &[("PRESENCE_WS_QUEUE", "4"), ("PRESENCE_MAX_DEVICES", "64")],
    );
    let base = s.base.clone();
    let user = uid();
    let targets: Vec<u64> = (0..4).map(|_| uid()).collect();
    let before = metric(&base, SLOW).await;
    // Big frames (60 devices with long ids each), so the socket's buffers fill up soon.
    let devices: Vec<String> = (0..60)
        .map(|i| format!("{i:03}-{}", "d".repeat(120)))
        .collect();
    for &t in &targets {
        let ons = devices.iter().map(|d| online(&base, t, d));
        futures::future::join_all(ons).await;
    }

    // A small receive buffer, so a client that does not read soon stops the server's writes.
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let url = ws_url(&base, &format!("userId={user}&deviceId=d&platform=WEB"));
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .expect("upgrade");
    let sub = json!({"type": "subscribe", "id": "s", "targets": targets}).to_string();
    ws.send(Message::Text(sub.into())).await.unwrap();
    // Read up to the reply, then never again.
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the subscribe reply")
            .expect("open")
            .expect("a frame");
        if let Message::Text(t) = m {
            if t.as_str().contains("\"id\":\"s\"") {
                break;
            }
        }
    }
    assert_eq!(metric(&base, SOCKETS).await, 1.0);

    // Change after change of the targets (one at a time, with long texts) until the socket's
    // buffers are full and its queue overflows; then a few more changes.
    let text = "状态".repeat(50);
    let started = Instant::now();
    let mut changes = 0;
    let mut cut_after = None;
    while changes < 4000 {
        let t = targets[changes % targets.len()];
        let st = if (changes / targets.len()) % 2 == 0 {
            "BUSY"
        } else {
            "AWAY"
        };
        set_status(&base, t, json!({"status": st, "customText": text})).await;
        changes += 1;
        if changes % 20 == 0 && metric(&base, SLOW).await > before {
            cut_after = Some((changes, started.elapsed()));
            break;
        }
    }
    let (cut_at, cut_after) =
        cut_after.unwrap_or_else(|| panic!("no slow consumer after {changes} changes"));
    for i in 0..10 {
        let t = targets[i % targets.len()];
        set_status(
            &base,
            t,
            json!({"status": "BUSY", "customText": format!("after {i}")}),
        )
        .await;
    }
    let slow = metric(&base, SLOW).await - before;

    // The server drops the socket by itself: the client still reads nothing.
    let until = Instant::now() + Duration::from_secs(3);
    let mut sockets = metric(&base, SOCKETS).await;
    while sockets > 0.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sockets = metric(&base, SOCKETS).await;
    }
    let slow_later = metric(&base, SLOW).await - before;

    // What the client gets when it reads at last: frames, then the close.
    let mut code = None;
    let mut frames = 0;
    let read_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < read_until {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => frames += 1,
            Ok(Some(Ok(Message::Close(f)))) => {
                code = Some(f.map(|f| u16::from(f.code)));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                code = Some(None);
                eprintln!("slow consumer: read error {e}");
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    println!(
        "slow consumer: cut after {cut_at} changes ({} ms); {SLOW} +{slow} then +{slow_later}; \
         {SOCKETS} {sockets} 3 s later without reading; then read {frames} frames and close \
         {code:?}",
        ms(cut_after)
    );
    let mut problems = Vec::new();
    if slow != 1.0 || slow_later != 1.0 {
        problems.push(format!(
            "{SLOW} went up by {slow}, then {slow_later}, for one socket"
        ));
    }
    if sockets != 0.0 {
        problems.push(format!(
            "the server still holds the slow consumer's socket 3 s after cutting it off \
             ({SOCKETS} = {sockets}) while the client reads nothing"
        ));
    }
    if code != Some(Some(1008)) {
        problems.push(format!(
            "the slow consumer's socket ended with {code:?}, not a close frame with 1008 (after \
             {frames} frames)"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A bad upgrade query answers the HTTP 400 envelope, and so does a plain GET (not an upgrade),
/// which brings nobody online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrade_queries_answer_400() {
    let s = Server::start_private(Topology::Memory, &[]);
    let u = uid();
    for q in [
        "userId=0&deviceId=d&platform=WEB".to_owned(),
        format!("userId={u}&deviceId=d&platform=XBOX"),
        "userId=abc&deviceId=d&platform=WEB".to_owned(),
        format!("userId={u}&deviceId=&platform=WEB"),
        "deviceId=d&platform=WEB".to_owned(),
    ] {
        let url = ws_url(&s.base, &q);
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 400, "{q}");
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
                let ct = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok());
                assert_envelope("GET (upgrade)", &q, 400, ct, &body);
            }
            Err(e) => panic!("{q}: {e}"),
            Ok(_) => panic!("{q}: upgraded"),
        }
    }
    for q in [
        "userId=0&deviceId=d&platform=WEB".to_owned(),
        format!("userId={u}&deviceId=d&platform=XBOX"),
        format!("userId={u}&deviceId=d&platform=WEB"),
    ] {
        let (code, v) = rest(&s.base, "GET", &format!("{WS}?{q}"), None).await;
        assert_eq!(code, 400, "plain GET {q}: {v}");
    }
    assert_eq!(
        status(&s.base, u).await["status"],
        "OFFLINE",
        "nobody came online"
    );
}

// ---------------------------------------------------------------------------------------------
// 6, 7: close grace, REST offline

/// A reconnect within `PRESENCE_WS_CLOSE_GRACE` (after a clean close, or after the connection
/// just dropped) makes no OFFLINE and no second ONLINE for a subscriber; a close without a
/// reconnect makes OFFLINE once the grace has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_grace_hides_a_reconnect_and_then_goes_offline() {
    const GRACE: Duration = Duration::from_secs(2);
    let s = Server::start_private(Topology::Memory, &[("PRESENCE_WS_CLOSE_GRACE", "2s")]);
    let base = s.base.clone();
    let (sub, a) = (uid(), uid());
    let mut w = Ws::connect(&base, sub, "s").await;
    w.subscribe(&[a]).await;
    let wa = Ws::connect(&base, a, "a1").await;
    w.wait_status(a, "ONLINE", Duration::from_secs(2)).await;

    // A clean close, back 300 ms later.
    wa.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wa = Ws::connect(&base, a, "a1").await;
    // The connection drops (no close frame), back 300 ms later.
    drop(wa);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wa = Ws::connect(&base, a, "a1").await;
    w.quiet(GRACE + Duration::from_millis(1000)).await;
    let h = history(&w.presence(a));
    assert_eq!(h.len(), 1, "only the first ONLINE, no flap: {h:?}");
    let st = status(&base, a).await;
    assert_eq!(st["status"], "ONLINE", "{st}");
    assert_eq!(st["devices"].as_array().map(Vec::len), Some(1), "{st}");

    // Closed for good: OFFLINE after the grace.
    let closing = Instant::now();
    wa.close().await;
    let closed = Instant::now();
    let (t_off, d) = w
        .wait_status(a, "OFFLINE", GRACE + Duration::from_secs(3))
        .await;
    println!(
        "close grace {} ms: OFFLINE {} ms after the close",
        ms(GRACE),
        ms(t_off - closing)
    );
    assert!(
        t_off >= closing + GRACE,
        "OFFLINE {} ms after the close",
        ms(t_off - closing)
    );
    assert!(
        t_off <= closed + GRACE + PUSH_BOUND,
        "OFFLINE {} ms after the close",
        ms(t_off - closed)
    );
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(0), "{d}");
    let h = history(&w.presence(a));
    assert_eq!(h.len(), 2, "{h:?}");
    assert_increasing(&h, "events of A");
}

/// A socket whose device was taken offline (REST `/offline`) brings it back with the liveness
/// lease's round after its next message (`PRESENCE_WS_LEASE_INTERVAL`, 1 s), as its own
/// session: its close still takes the device offline after the grace (another session would
/// read the close as superseded by a newer registration and leave the device ONLINE until its
/// heartbeat timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_brought_its_device_back_still_goes_offline_after_its_close() {
    const GRACE: Duration = Duration::from_millis(500);
    let s = Server::start_private(
        Topology::Memory,
        &[
            ("PRESENCE_WS_CLOSE_GRACE", "500ms"),
            ("PRESENCE_HEARTBEAT_TIMEOUT", "60s"),
        ],
    );
    let base = s.base.clone();
    let a = uid();
    let mut wa = Ws::connect(&base, a, "a1").await;
    offline(&base, a, "a1").await;
    assert_eq!(status(&base, a).await["status"], "OFFLINE");
    wa.heartbeat().await;
    let back = Instant::now();
    while status(&base, a).await["status"] != "ONLINE" {
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "not back within a lease round of its next message"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wa.close().await;
    tokio::time::sleep(GRACE + Duration::from_millis(1500)).await;
    let st = status(&base, a).await;
    assert_eq!(
        st["status"], "OFFLINE",
        "the grace after the close has passed: {st}"
    );
}

/// The liveness lease carries a socket's activity with its next round, but activity of a user
/// who may be idle on the owner goes at once: with rounds 10 s apart, an AWAY user whose socket
/// sends a message reads ONLINE within half a second, while its pongs alone (liveness, not
/// activity) never brought it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_users_activity_goes_at_once_not_with_the_next_lease_round() {
    let s = Server::start_private(
        Topology::Memory,
        &[
            ("PRESENCE_IDLE_TIMEOUT", "2s"),
            ("PRESENCE_WS_LEASE_INTERVAL", "10s"),
            ("PRESENCE_WS_PING_INTERVAL", "300ms"),
            ("PRESENCE_WS_IDLE_TIMEOUT", "5s"),
        ],
    );
    let base = s.base.clone();
    let a = uid();
    let mut wa = Ws::connect(&base, a, "a1").await;
    let idle = Instant::now();
    while status(&base, a).await["status"] != "AWAY" {
        assert!(idle.elapsed() < Duration::from_secs(5), "never AWAY");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Pongs every 300 ms meanwhile: liveness only.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        status(&base, a).await["status"],
        "AWAY",
        "pongs are not activity"
    );
    let sent = Instant::now();
    let r = wa
        .request(json!({"type": "heartbeat", "active": true}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    while status(&base, a).await["status"] != "ONLINE" {
        assert!(
            sent.elapsed() < Duration::from_millis(500),
            "activity waited for the lease's round"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("ONLINE {} ms after the message", sent.elapsed().as_millis());
}

/// REST `/offline`: a device going offline is an event (the user stays ONLINE on its other
/// device); the last one makes OFFLINE; offline again changes nothing and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_offline_notifies_subscribers() {
    let s = Server::start_private(Topology::Memory, &[]);
    let base = s.base.clone();
    let (a, b) = (uid(), uid());
    let mut w = Ws::connect(&base, a, "a").await;
    w.subscribe(&[b]).await;
    online(&base, b, "b1").await;
    let v2 = online(&base, b, "b2").await["version"].as_u64().unwrap();
    let (_, d) = w
        .wait_presence(b, "two devices", Duration::from_secs(2), |d| {
            d["version"] == v2
        })
        .await;
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(2), "{d}");

    offline(&base, b, "b1").await;
    let (_, d) = w
        .wait_presence(b, "one device left", Duration::from_secs(2), |d| {
            d["version"].as_u64() > Some(v2)
        })
        .await;
    assert_eq!(d["status"], "ONLINE", "{d}");
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(1), "{d}");

    offline(&base, b, "b2").await;
    let answered = Instant::now();
    let (t, d) = w.wait_status(b, "OFFLINE", Duration::from_secs(2)).await;
    let delay = t.saturating_duration_since(answered);
    println!(
        "REST /offline: OFFLINE delivered {} ms after the answer",
        ms(delay)
    );
    assert!(
        delay <= PUSH_BOUND,
        "OFFLINE {} ms after /offline",
        ms(delay)
    );
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(0), "{d}");

    offline(&base, b, "b2").await;
    w.quiet(Duration::from_millis(300)).await;
    let h = history(&w.presence(b));
    let statuses: Vec<&str> = h.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["ONLINE", "ONLINE", "ONLINE", "OFFLINE"], "{h:?}");
    assert_increasing(&h, "events of B");
    let unique: BTreeSet<u64> = h.iter().map(|x| x.1).collect();
    assert_eq!(unique.len(), h.len());
}
