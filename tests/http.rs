//! The HTTP suite: every test is written once, as a function of the [`Topology`] it runs on,
//! and runs once per topology (`per_topology!` at the end): `memory::*` on one in-process node
//! with the embedded store (plain `cargo test`), `redis::*` on one in-process node on the
//! shared Redis Cluster and `cluster::*` through 3 shards and 2 gateways in this process (both
//! need the Redis Cluster: `bash scripts/test.sh`). Every answer is checked to be the envelope
//! by the helpers in `common`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::http::sample_sum;
use common::{uid, Server, Topology};
use serde_json::{json, Value};

const P: &str = "/api/v1/presence";

/// Short durations for the timing tests (interval < timeout, as the configuration requires).
/// Tests that assert exact metrics (the timing tests prove that the timer, not a request, did
/// the work by reading counters) use `Server::start_private`: a store of their own even in the
/// Redis and cluster topologies.
const SHORT: &[(&str, &str)] = &[
    ("PRESENCE_HEARTBEAT_INTERVAL", "500ms"),
    ("PRESENCE_HEARTBEAT_TIMEOUT", "2s"),
    ("PRESENCE_IDLE_TIMEOUT", "3s"),
    ("PRESENCE_RESUME_WINDOW", "4s"),
];

fn p(path: &str) -> String {
    format!("{P}{path}")
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// Parses an API time: RFC 3339, UTC, ending in `Z`.
fn time(v: &Value) -> DateTime<Utc> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {v}"));
    assert!(s.ends_with('Z'), "time not in UTC with Z: {s}");
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("time {s} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// Asserts `v` is a time within a couple of seconds of `[from, now]` (the API answers to the
/// second).
fn assert_recent(v: &Value, from: DateTime<Utc>) {
    let t = time(v);
    let now = Utc::now();
    assert!(
        t >= from - chrono::Duration::seconds(2) && t <= now + chrono::Duration::seconds(2),
        "time {t} not between {from} and {now}"
    );
}

async fn online(s: &Server, user: u64, device: &str, platform: &str) -> Value {
    let (code, v) = s
        .post(
            &p("/online"),
            json!({"userId": user, "deviceId": device, "platform": platform}),
        )
        .await;
    assert_eq!(code, 200, "online {user}/{device}: {v}");
    assert_eq!(v["message"], "上线成功");
    v["data"].clone()
}

async fn offline(s: &Server, user: u64, device: &str) {
    let (code, v) = s
        .post(&p("/offline"), json!({"userId": user, "deviceId": device}))
        .await;
    assert_eq!(code, 200, "offline {user}/{device}: {v}");
    assert_eq!(v["message"], "下线成功");
    assert!(v["data"].is_null());
}

async fn heartbeat(s: &Server, user: u64, device: &str, active: Option<bool>) -> (u16, Value) {
    let mut body = json!({"userId": user, "deviceId": device});
    if let Some(a) = active {
        body["active"] = json!(a);
    }
    s.post(&p("/heartbeat"), body).await
}

async fn heartbeat_ok(s: &Server, user: u64, device: &str, active: Option<bool>) -> Value {
    let (code, v) = heartbeat(s, user, device, active).await;
    assert_eq!(code, 200, "heartbeat {user}/{device}: {v}");
    assert_eq!(v["message"], "心跳成功");
    v["data"].clone()
}

fn device_ids(view: &Value) -> BTreeSet<String> {
    view["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("devices is not an array: {view}"))
        .iter()
        .map(|d| d["deviceId"].as_str().expect("deviceId").to_owned())
        .collect()
}

/// What an invalid request must leave unchanged.
async fn snapshot(s: &Server, user: u64) -> (Value, Value, Value, Value, Value) {
    let v = s.status_of(user).await;
    (
        v["version"].clone(),
        v["status"].clone(),
        v["devices"].clone(),
        v["manualStatus"].clone(),
        v["customText"].clone(),
    )
}

/// The HTTP requests `presence_http_requests_total` counted with all of `labels`.
fn requests(metrics: &str, labels: &[&str]) -> f64 {
    sample_sum(metrics, "presence_http_requests_total{", labels)
}

async fn sleep_until(t0: Instant, after: Duration) {
    if let Some(d) = (t0 + after).checked_duration_since(Instant::now()) {
        tokio::time::sleep(d).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The seed flows

async fn seed_flows_answer_the_contract(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    let before = Utc::now();

    let data = online(&s, u, "device_123", "WEB").await;
    assert_eq!(
        keys(&data),
        [
            "customText",
            "devices",
            "lastActiveTime",
            "manualStatus",
            "status",
            "userId",
            "version"
        ]
    );
    assert_eq!(data["userId"], json!(u));
    assert_eq!(data["status"], "ONLINE");
    assert_recent(&data["lastActiveTime"], before);
    let devices = data["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{data}");
    assert_eq!(keys(&devices[0]), ["deviceId", "onlineTime", "platform"]);
    assert_eq!(devices[0]["deviceId"], "device_123");
    assert_eq!(devices[0]["platform"], "WEB");
    assert_recent(&devices[0]["onlineTime"], before);
    assert!(data["customText"].is_null());
    assert!(data["manualStatus"].is_null());
    let version = data["version"].as_u64().expect("version is an integer");
    assert!(version >= 1);

    let hb = heartbeat_ok(&s, u, "device_123", None).await;
    assert_eq!(hb, json!({"nextHeartbeatInterval": 30000}));

    let view = s.status_of(u).await;
    assert_eq!(view["userId"], json!(u));
    assert_eq!(view["status"], "ONLINE");
    assert_eq!(view["devices"], data["devices"]);
    assert_eq!(
        view["version"],
        json!(version),
        "a heartbeat is not a visible change"
    );

    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": [u]})).await;
    assert_eq!(code, 200);
    assert_eq!(v["message"], "success");
    let entries = v["data"].as_array().expect("batch data is an array");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["userId"], json!(u));
    assert_eq!(entries[0]["status"], "ONLINE");
    assert_recent(&entries[0]["lastActiveTime"], before);

    offline(&s, u, "device_123").await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["devices"], json!([]));
    assert!(view["version"].as_u64().unwrap() > version);

    // nextHeartbeatInterval is the configured interval.
    let s2 = Server::start(t, &[("PRESENCE_HEARTBEAT_INTERVAL", "2s")]);
    let u2 = uid();
    online(&s2, u2, "d", "PC").await;
    assert_eq!(
        heartbeat_ok(&s2, u2, "d", Some(true)).await,
        json!({"nextHeartbeatInterval": 2000})
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Never-seen users and lastActiveTime

async fn never_seen_user_is_offline_and_last_active_survives_offline(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    let view = s.status_of(u).await;
    assert_eq!(view["userId"], json!(u));
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["devices"], json!([]));
    assert!(view["lastActiveTime"].is_null(), "never active: {view}");
    assert!(view["customText"].is_null());
    assert!(view["manualStatus"].is_null());
    assert_eq!(view["version"], json!(0));

    // Offline of a device never seen is harmless and changes nothing.
    offline(&s, u, "ghost").await;
    assert_eq!(s.status_of(u).await, view);

    let before = Utc::now();
    let on = online(&s, u, "phone", "ANDROID").await;
    let active = time(&on["lastActiveTime"]);
    offline(&s, u, "phone").await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["devices"], json!([]));
    assert_recent(&view["lastActiveTime"], before);
    assert!(
        time(&view["lastActiveTime"]) >= active,
        "lastActiveTime went back: {view}"
    );

    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": [u]})).await;
    assert_eq!(code, 200);
    assert_eq!(v["data"][0]["status"], "OFFLINE");
    assert_eq!(v["data"][0]["lastActiveTime"], view["lastActiveTime"]);
}

// ---------------------------------------------------------------------------------------------
// 3. Batch

async fn batch_keeps_order_drops_duplicates_and_enforces_the_limit(t: Topology) {
    let s = Server::start(t, &[]);
    let (a, b, c) = (uid(), uid(), uid());
    online(&s, a, "d", "WEB").await;
    let (code, v) = s
        .put(&p(&format!("/status/{b}")), json!({"customText": "外出"}))
        .await;
    assert_eq!(code, 200, "{v}");

    let (code, v) = s
        .post(&p("/status/batch"), json!({"userIds": [b, a, c, a, b]}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["message"], "success");
    let entries = v["data"].as_array().expect("array");
    let ids: Vec<u64> = entries
        .iter()
        .map(|e| e["userId"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [b, a, c], "request order, duplicates dropped");
    for e in entries {
        assert_eq!(
            keys(e),
            ["customText", "lastActiveTime", "status", "userId"],
            "{e}"
        );
    }
    assert_eq!(entries[0]["status"], "OFFLINE");
    assert_eq!(entries[0]["customText"], "外出");
    assert_eq!(entries[1]["status"], "ONLINE");
    assert!(entries[1]["lastActiveTime"].is_string());
    assert!(entries[1]["customText"].is_null());
    assert_eq!(entries[2]["status"], "OFFLINE");
    assert!(entries[2]["lastActiveTime"].is_null());
    assert!(entries[2]["customText"].is_null());

    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": []})).await;
    assert_eq!(code, 200);
    assert_eq!(v["data"], json!([]));

    let base = uid();
    let ids: Vec<u64> = (0..1000).map(|i| base * 2000 + i).collect();
    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": ids})).await;
    assert_eq!(code, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 1000);
    let ids: Vec<u64> = (0..1001).map(|i| base * 2000 + i).collect();
    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": ids})).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("1000"), "{v}");

    for bad in [
        json!({"userIds": [a, 0]}),
        json!({"userIds": [-1]}),
        json!({"userIds": [1.5]}),
        json!({"userIds": ["1"]}),
        json!({"userIds": 5}),
        json!({"userIds": null}),
        json!({}),
    ] {
        let (code, v) = s.post(&p("/status/batch"), bad.clone()).await;
        assert_eq!(code, 400, "{bad} -> {v}");
        assert!(
            v["message"].as_str().unwrap().contains("userId"),
            "{bad} -> {v}"
        );
    }

    let s5 = Server::start(t, &[("PRESENCE_BATCH_LIMIT", "5")]);
    let ids: Vec<u64> = (0..5).map(|_| uid()).collect();
    let (code, v) = s5.post(&p("/status/batch"), json!({"userIds": ids})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    let ids: Vec<u64> = (0..6).map(|_| uid()).collect();
    let (code, v) = s5.post(&p("/status/batch"), json!({"userIds": ids})).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains('5'), "{v}");
}

// ---------------------------------------------------------------------------------------------
// 4. Multiple devices

async fn multi_device_aggregation_and_idempotent_online(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    let first = online(&s, u, "web-1", "WEB").await;
    let v1 = first["version"].as_u64().unwrap();
    let second = online(&s, u, "ios-1", "IOS").await;
    let v2 = second["version"].as_u64().unwrap();
    assert!(v2 > v1, "a new device is a visible change");
    assert_eq!(second["status"], "ONLINE");
    assert_eq!(
        device_ids(&second),
        BTreeSet::from(["ios-1".into(), "web-1".into()])
    );
    let view = s.status_of(u).await;
    let platforms: BTreeSet<(String, String)> = view["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["deviceId"].as_str().unwrap().into(),
                d["platform"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        BTreeSet::from([
            ("ios-1".into(), "IOS".into()),
            ("web-1".into(), "WEB".into())
        ])
    );

    // The same device again: one entry, nothing visible changes.
    let again = online(&s, u, "web-1", "WEB").await;
    assert_eq!(
        again["version"],
        json!(v2),
        "repeat online bumped the version: {again}"
    );
    assert_eq!(again["devices"].as_array().unwrap().len(), 2);
    assert_eq!(again["status"], "ONLINE");
    let view_again = s.status_of(u).await;
    assert_eq!(view_again["version"], json!(v2));
    assert_eq!(
        view_again["devices"], view["devices"],
        "onlineTime must not reset on a repeat"
    );

    offline(&s, u, "ios-1").await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "ONLINE");
    assert_eq!(device_ids(&view), BTreeSet::from(["web-1".into()]));
    let v3 = view["version"].as_u64().unwrap();
    assert!(v3 > v2);

    offline(&s, u, "web-1").await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["devices"], json!([]));
    let v4 = view["version"].as_u64().unwrap();
    assert!(v4 > v3);
    // Offline is idempotent.
    offline(&s, u, "web-1").await;
    assert_eq!(s.status_of(u).await["version"], json!(v4));
}

// ---------------------------------------------------------------------------------------------
// 5. Timeouts, idle and resume, with short durations

async fn device_times_out_never_early_and_at_most_one_second_late(t: Topology) {
    let s = Server::start_private(t, SHORT);
    let (quiet, busy) = (uid(), uid());
    let t0 = Instant::now();
    online(&s, quiet, "q", "WEB").await;
    let online_done = Instant::now();
    online(&s, busy, "b", "PC").await;
    assert_eq!(
        heartbeat_ok(&s, busy, "b", None).await,
        json!({"nextHeartbeatInterval": 500})
    );
    let mut last_hb = Instant::now();

    let mut seen_offline: Option<Instant> = None;
    let mut timer_fired: Option<Instant> = None;
    let mut checked_mid = false;
    while seen_offline.is_none() || timer_fired.is_none() {
        assert!(
            online_done.elapsed() < Duration::from_millis(3000),
            "device not timed out 1 s after the 2 s timeout (seen offline: {seen_offline:?}, \
             timer fired: {timer_fired:?})"
        );
        if last_hb.elapsed() >= Duration::from_millis(400) {
            heartbeat_ok(&s, busy, "b", Some(true)).await;
            last_hb = Instant::now();
        }
        let view = s.status_of(quiet).await;
        let fired = s.metric("presence_device_timeouts_total").await;
        let at = Instant::now();
        // Answers computed before t0 + 2 s must still show the device (the server's deadline
        // is at least that late); the check from 1.5 s on is the one that matters.
        if at - t0 < Duration::from_secs(2) {
            assert_eq!(
                view["status"],
                "ONLINE",
                "offline {:?} into a 2 s timeout: {view}",
                at - t0
            );
            assert_eq!(fired, 0.0, "timer fired {:?} into a 2 s timeout", at - t0);
            checked_mid |= at - t0 >= Duration::from_millis(1500);
        }
        if view["status"] == "OFFLINE" && seen_offline.is_none() {
            assert!(
                at - t0 >= Duration::from_secs(2),
                "timed out early: {:?}",
                at - t0
            );
            assert_eq!(view["devices"], json!([]));
            seen_offline = Some(at);
        }
        if fired >= 1.0 && timer_fired.is_none() {
            assert!(
                at - t0 >= Duration::from_secs(2),
                "timer fired early: {:?}",
                at - t0
            );
            assert_eq!(fired, 1.0, "only the quiet device may time out");
            timer_fired = Some(at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checked_mid, "no sample between 1.5 s and 2 s");
    // The timer (not a request: nobody wrote for `quiet`) took the device offline.
    assert_eq!(s.metric("presence_online_devices").await, 1.0);
    assert_eq!(s.metric("presence_online_users").await, 1.0);

    // Heartbeats kept the other device online well past the timeout.
    assert!(t0.elapsed() > Duration::from_secs(2));
    let view = s.status_of(busy).await;
    assert_eq!(view["status"], "ONLINE", "{view}");
    assert_eq!(device_ids(&view), BTreeSet::from(["b".into()]));
}

async fn inactive_heartbeats_go_away_on_the_timer_and_an_active_one_comes_back(t: Topology) {
    let s = Server::start_private(t, SHORT);
    let u = uid();
    let t0 = Instant::now();
    online(&s, u, "d", "IOS").await;
    let online_done = Instant::now();
    let away = "presence_status_transitions_total{from=\"ONLINE\",to=\"AWAY\"}";
    let back = "presence_status_transitions_total{from=\"AWAY\",to=\"ONLINE\"}";

    // Inactive heartbeats up to 2.5 s: the device stays online, the user ONLINE (idle is 3 s).
    for i in 1..=5u64 {
        sleep_until(t0, Duration::from_millis(500 * i)).await;
        heartbeat_ok(&s, u, "d", Some(false)).await;
    }
    let view = s.status_of(u).await;
    let went_away = s.metric(away).await;
    // Only meaningful if the answers came before the 3 s idle deadline (they do, unless the
    // machine is badly overloaded).
    if t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            view["status"], "ONLINE",
            "AWAY before the idle timeout: {view}"
        );
        assert_eq!(went_away, 0.0);
    }

    // No request for the user now: the timer alone must make it AWAY by idle + 1 s.
    loop {
        let n = s.metric(away).await;
        let at = Instant::now();
        if n >= 1.0 {
            assert_eq!(n, 1.0);
            assert!(
                at - t0 >= Duration::from_secs(3),
                "AWAY early: {:?}",
                at - t0
            );
            break;
        }
        assert!(
            online_done.elapsed() < Duration::from_millis(4000),
            "not AWAY 1 s after the idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "AWAY", "{view}");
    assert_eq!(device_ids(&view), BTreeSet::from(["d".into()]));
    assert!(view["manualStatus"].is_null());

    // Inactive heartbeats keep the device online and the user AWAY.
    heartbeat_ok(&s, u, "d", Some(false)).await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "AWAY");
    assert_eq!(view["devices"].as_array().unwrap().len(), 1);

    // An active heartbeat brings ONLINE back at once.
    heartbeat_ok(&s, u, "d", Some(true)).await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "ONLINE", "{view}");
    assert_eq!(s.metric(back).await, 1.0);
    assert_eq!(s.metric("presence_device_timeouts_total").await, 0.0);
}

async fn timed_out_device_resumes_within_the_window_and_not_after(t: Topology) {
    let s = Server::start_private(t, SHORT);
    let (ua, ub) = (uid(), uid());
    let first = online(&s, ua, "tablet", "IOS").await;
    let first_online = time(&first["devices"][0]["onlineTime"]);
    online(&s, ub, "laptop", "PC").await;
    let b_done = Instant::now();

    // Both time out 2 s after their online.
    sleep_until(b_done, Duration::from_millis(3100)).await;
    let view = s.status_of(ua).await;
    assert_eq!(view["status"], "OFFLINE", "{view}");
    assert_eq!(view["devices"], json!([]));
    assert_eq!(s.metric("presence_device_timeouts_total").await, 2.0);

    // A heartbeat within the 4 s resume window revives the device with its platform.
    let hb = heartbeat_ok(&s, ua, "tablet", None).await;
    assert_eq!(hb, json!({"nextHeartbeatInterval": 500}));
    let view = s.status_of(ua).await;
    assert_eq!(view["status"], "ONLINE", "{view}");
    let devices = view["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["deviceId"], "tablet");
    assert_eq!(devices[0]["platform"], "IOS");
    assert!(
        time(&devices[0]["onlineTime"]) > first_online,
        "onlineTime not reset: {view}"
    );

    // After the window (timeout 2 s + window 4 s), a heartbeat is refused.
    sleep_until(b_done, Duration::from_millis(6600)).await;
    let (code, v) = heartbeat(&s, ub, "laptop", Some(true)).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["message"], "device not online");
    let view = s.status_of(ub).await;
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["devices"], json!([]));
}

async fn explicit_offline_is_final_and_unknown_devices_get_404(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    online(&s, u, "d1", "WEB").await;
    online(&s, u, "d2", "ANDROID").await;
    offline(&s, u, "d1").await;
    let before = snapshot(&s, u).await;
    let (code, v) = heartbeat(&s, u, "d1", None).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["message"], "device not online");
    let (code, v) = heartbeat(&s, u, "never", Some(true)).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["message"], "device not online");
    assert_eq!(snapshot(&s, u).await, before);

    let stranger = uid();
    let (code, v) = heartbeat(&s, stranger, "d", None).await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["message"], "device not online");
    assert_eq!(s.status_of(stranger).await["status"], "OFFLINE");
}

// ---------------------------------------------------------------------------------------------
// 6. Manual status and custom text

async fn manual_status_persists_offline_applies_on_online_and_clears(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    let on = online(&s, u, "d1", "WEB").await;
    let path = p(&format!("/status/{u}"));

    let (code, v) = s
        .put(&path, json!({"status": "BUSY", "customText": "会议中"}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["message"], "success");
    let data = &v["data"];
    assert_eq!(data["status"], "BUSY");
    assert_eq!(data["manualStatus"], "BUSY");
    assert_eq!(data["customText"], "会议中");
    assert!(data["version"].as_u64().unwrap() > on["version"].as_u64().unwrap());
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "BUSY");
    assert_eq!(view["customText"], "会议中");
    let (_, b) = s.post(&p("/status/batch"), json!({"userIds": [u]})).await;
    assert_eq!(b["data"][0]["status"], "BUSY");
    assert_eq!(b["data"][0]["customText"], "会议中");

    // A user setting: it persists while offline...
    offline(&s, u, "d1").await;
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "OFFLINE");
    assert_eq!(view["manualStatus"], "BUSY");
    assert_eq!(view["customText"], "会议中");
    // ...and applies again when a device comes online.
    let on = online(&s, u, "d2", "IOS").await;
    assert_eq!(on["status"], "BUSY");
    assert_eq!(on["manualStatus"], "BUSY");
    assert_eq!(on["customText"], "会议中");

    let (code, v) = s.delete(&path).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["message"], "success");
    assert_eq!(v["data"]["status"], "ONLINE");
    assert!(v["data"]["manualStatus"].is_null());
    assert!(v["data"]["customText"].is_null());
    let view = s.status_of(u).await;
    assert_eq!(view["status"], "ONLINE");
    assert!(
        view["manualStatus"].is_null() && view["customText"].is_null(),
        "{view}"
    );

    // Set for a user who is offline (never seen): visible at once, status stays OFFLINE.
    let w = uid();
    let (code, v) = s
        .put(&p(&format!("/status/{w}")), json!({"status": "AWAY"}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["status"], "OFFLINE");
    assert_eq!(v["data"]["manualStatus"], "AWAY");
    assert_eq!(online(&s, w, "d", "PC").await["status"], "AWAY");
    // Manual ONLINE is allowed too.
    let (code, v) = s
        .put(&p(&format!("/status/{w}")), json!({"status": "ONLINE"}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["status"], "ONLINE");
    assert_eq!(v["data"]["manualStatus"], "ONLINE");
}

async fn manual_status_expires_on_its_own(t: Topology) {
    let s = Server::start(t, &[]);
    let (on_user, off_user) = (uid(), uid());
    online(&s, on_user, "d", "WEB").await;
    let expires = Utc::now() + chrono::Duration::milliseconds(2000);
    let at = expires.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for u in [on_user, off_user] {
        let body = json!({"status": "BUSY", "customText": "外出", "expiresAt": at});
        let (code, v) = s.put(&p(&format!("/status/{u}")), body).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["data"]["manualStatus"], "BUSY");
        assert_eq!(v["data"]["customText"], "外出");
    }
    assert_eq!(s.status_of(on_user).await["status"], "BUSY");
    assert_eq!(s.status_of(off_user).await["customText"], "外出");

    let mut cleared = BTreeSet::new();
    while cleared.len() < 2 {
        assert!(
            Utc::now() < expires + chrono::Duration::milliseconds(1500),
            "settings not cleared 1.5 s after expiresAt"
        );
        for u in [on_user, off_user] {
            let view = s.status_of(u).await;
            if view["manualStatus"].is_null() {
                assert!(Utc::now() >= expires, "cleared before expiresAt: {view}");
                assert!(view["customText"].is_null(), "{view}");
                let want = if u == on_user { "ONLINE" } else { "OFFLINE" };
                assert_eq!(view["status"], want, "{view}");
                cleared.insert(u);
            } else {
                assert_eq!(view["customText"], "外出");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, b) = s
        .post(&p("/status/batch"), json!({"userIds": [on_user, off_user]}))
        .await;
    assert_eq!(b["data"][0]["status"], "ONLINE");
    assert!(b["data"][0]["customText"].is_null() && b["data"][1]["customText"].is_null());
}

async fn manual_status_rejects_bad_input_and_changes_nothing(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    online(&s, u, "d", "WEB").await;
    let path = p(&format!("/status/{u}"));
    let past = (Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
    let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let cases = [
        (json!({"status": "OFFLINE"}), "status"),
        (json!({"status": "DND"}), "status"),
        (json!({"status": "busy"}), "status"),
        (json!({"status": 1}), "status"),
        (json!({"customText": "字".repeat(101)}), "customText"),
        (json!({"customText": 5}), "customText"),
        (json!({"status": "BUSY", "expiresAt": past}), "expiresAt"),
        (
            json!({"status": "BUSY", "expiresAt": "tomorrow"}),
            "expiresAt",
        ),
        (
            json!({"status": "BUSY", "expiresAt": 1_900_000_000}),
            "expiresAt",
        ),
        (json!({}), "status"),
        (json!({"expiresAt": future}), "status"),
        (json!({"status": null, "customText": null}), "status"),
    ];
    let before = snapshot(&s, u).await;
    for (body, names) in cases {
        let (code, v) = s.put(&path, body.clone()).await;
        assert_eq!(code, 400, "{body} -> {v}");
        assert!(
            v["message"].as_str().unwrap().contains(names),
            "{body} -> {v}"
        );
        assert_eq!(snapshot(&s, u).await, before, "{body} changed state");
    }

    let hundred = "字".repeat(100);
    let (code, v) = s.put(&path, json!({"customText": hundred})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["customText"], json!(hundred));
    assert_eq!(v["data"]["status"], "ONLINE");

    for bad in ["abc", "0", "-1", "99999999999999999999"] {
        let (code, v) = s
            .put(&p(&format!("/status/{bad}")), json!({"status": "BUSY"}))
            .await;
        assert_eq!(code, 400, "PUT {bad} -> {v}");
        assert!(v["message"].as_str().unwrap().contains("userId"), "{v}");
        let (code, v) = s.delete(&p(&format!("/status/{bad}"))).await;
        assert_eq!(code, 400, "DELETE {bad} -> {v}");
        assert!(v["message"].as_str().unwrap().contains("userId"), "{v}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Status styles and configuration errors

async fn statuses_list_the_states_and_styles_are_configurable(t: Topology) {
    let s = Server::start(t, &[]);
    let (code, v) = s.get(&p("/statuses")).await;
    assert_eq!(code, 200);
    assert_eq!(v["message"], "success");
    let list = v["data"].as_array().expect("array").clone();
    assert_eq!(
        list.len(),
        5,
        "the four states of the contract and INVISIBLE"
    );
    let mut names = BTreeSet::new();
    for e in &list {
        assert_eq!(keys(e), ["color", "icon", "label", "status"], "{e}");
        names.insert(e["status"].as_str().unwrap().to_owned());
        assert!(!e["label"].as_str().unwrap().is_empty());
        assert!(!e["icon"].as_str().unwrap().is_empty());
        let color = e["color"].as_str().unwrap();
        assert!(
            color.len() == 7
                && color.starts_with('#')
                && color[1..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{color}"
        );
    }
    let want: BTreeSet<String> = ["ONLINE", "OFFLINE", "BUSY", "AWAY", "INVISIBLE"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want);
    let busy = list.iter().find(|e| e["status"] == "BUSY").unwrap().clone();
    assert_ne!(
        busy["color"], "#FF0000",
        "pick another override colour for this test"
    );

    let styled = Server::start(
        t,
        &[(
            "PRESENCE_STATUS_STYLES",
            r##"{"BUSY":{"color":"#FF0000"}}"##,
        )],
    );
    let (code, v) = styled.get(&p("/statuses")).await;
    assert_eq!(code, 200);
    let list2 = v["data"].as_array().unwrap();
    assert_eq!(list2.len(), 5);
    for (old, new) in list.iter().zip(list2) {
        if old["status"] == "BUSY" {
            assert_eq!(new["color"], "#FF0000");
            assert_eq!(new["label"], old["label"]);
            assert_eq!(new["icon"], old["icon"]);
        } else {
            assert_eq!(new, old);
        }
    }
}

#[test]
fn bad_configuration_exits_64_naming_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("PRESENCE_STATUS_STYLES", r#"{"BUSY":{"color":"red"}}"#),
        ("PRESENCE_STATUS_STYLES", "not json"),
        ("PRESENCE_STATUS_STYLES", r##"{"DND":{"color":"#FF0000"}}"##),
        ("PRESENCE_HEARTBEAT_TIMEOUT", "abc"),
        ("PRESENCE_HEARTBEAT_TIMEOUT", "10s"), // not longer than the 30 s interval
        ("PRESENCE_HEARTBEAT_INTERVAL", "-1s"),
        ("PRESENCE_IDLE_TIMEOUT", "5 lightyears"),
        ("PRESENCE_RESUME_WINDOW", "forever"),
        ("PRESENCE_BATCH_LIMIT", "0"),
        ("PRESENCE_BATCH_LIMIT", "many"),
        ("PRESENCE_LISTEN", "not-an-address"),
        ("PRESENCE_STATUS_RATE", "10 a minute"),
        ("PRESENCE_STATUS_RATE", "0/1m"),
        ("PRESENCE_WS_IDLE_TIMEOUT", "10s"), // not longer than the 30 s ping interval
        ("PRESENCE_WS_MAX_FRAME", "12"),
        ("PRESENCE_GRPC_TLS_CA", "/nonexistent/ca.pem"), // without its cert and key
        ("PRESENCE_METRICS_LISTEN", "everywhere"),
    ];
    for (var, value) in cases {
        let (code, stderr) = common::node::run_to_exit(&[(var, value)]);
        assert_eq!(code, Some(64), "{var}={value}: stderr:\n{stderr}");
        assert!(
            stderr.contains(var),
            "{var}={value}: stderr does not name it:\n{stderr}"
        );
    }
}

/// `PRESENCE_METRICS_LISTEN`: the metrics move to their own listener; the API port answers 404
/// for them (an ingress to it can never expose them) and keeps its health endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_move_to_a_listener_of_their_own() {
    let port = common::node::free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let s = Server::start_private(Topology::Memory, &[("PRESENCE_METRICS_LISTEN", &addr)]);
    let (code, _, _) = s.text("/metrics").await;
    assert_eq!(code, 404, "/metrics still served on the API port");
    let (code, _, _) = s.text("/livez").await;
    assert_eq!(code, 200);
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the metrics listener answers")
        .text()
        .await
        .unwrap();
    assert!(body.contains("presence_http_requests_total"), "{body}");
    let api = reqwest::get(format!("http://{addr}/api/v1/presence/statuses"))
        .await
        .unwrap();
    assert_eq!(
        api.status().as_u16(),
        404,
        "the metrics listener serves the API"
    );
}

/// `PRESENCE_MAX_OFFLINE_RECORDS`: a status set for a user never online creates a record; past the
/// cap such a change answers 503 and stores nothing, while users with a record (or a device) are
/// served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_users_never_online_are_capped() {
    let s = Server::start_private(
        Topology::Memory,
        &[
            ("PRESENCE_MAX_OFFLINE_RECORDS", "3"),
            ("PRESENCE_STATUS_RATE", "off"),
        ],
    );
    let busy = json!({"status": "BUSY"});
    let first: Vec<u64> = (0..3).map(|_| uid()).collect();
    for &u in &first {
        let (code, v) = s.put(&p(&format!("/status/{u}")), busy.clone()).await;
        assert_eq!(code, 200, "{v}");
    }
    let refused = uid();
    let (code, v) = s.put(&p(&format!("/status/{refused}")), busy.clone()).await;
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["code"], 503, "{v}");
    assert_eq!(v["message"], "server overloaded, retry later", "{v}");
    let (_, v) = s.get(&p(&format!("/status/{refused}"))).await;
    assert!(v["data"]["manualStatus"].is_null(), "stored anyway: {v}");
    assert_eq!(
        s.metric("presence_rate_limited_total{limit=\"offline_records\"}")
            .await,
        1.0
    );
    // A user with a record changes it again; a user with a device is not counted.
    let (code, v) = s
        .put(
            &p(&format!("/status/{}", first[0])),
            json!({"customText": "x"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let online_user = uid();
    online(&s, online_user, "d", "WEB").await;
    let (code, v) = s
        .put(&p(&format!("/status/{online_user}")), busy.clone())
        .await;
    assert_eq!(code, 200, "{v}");
}

// ---------------------------------------------------------------------------------------------
// 8. Every error class

async fn bad_bodies_are_400_or_415_with_the_envelope_and_change_nothing(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    online(&s, u, "d1", "WEB").await;
    let before = snapshot(&s, u).await;
    let json_ct = Some("application/json");
    let good_online = json!({"userId": u, "deviceId": "d2", "platform": "IOS"}).to_string();
    let good_offline = json!({"userId": u, "deviceId": "d1"}).to_string();

    // (path, Content-Type, body, status, a word the message must contain)
    let mut cases: Vec<(String, Option<&str>, String, u16, &str)> = Vec::new();
    let status_path = format!("/status/{u}");
    // Malformed JSON.
    for (path, body) in [
        ("/online", "{\"userId\": 1,"),
        ("/online", "{not json}"),
        ("/online", ""),
        ("/offline", "{\"userId\": 1, \"deviceId\": \"d"),
        ("/heartbeat", "nul"),
        ("/status/batch", "{\"userIds\": [1,]}"),
        (&status_path, "{'status': 'BUSY'}"),
    ] {
        cases.push((p(path), json_ct, body.into(), 400, "JSON"));
    }
    // Well-formed JSON of the wrong shape.
    for (path, body) in [("/online", "[]"), ("/online", "null"), ("/offline", "42")] {
        cases.push((p(path), json_ct, body.into(), 400, "body"));
    }
    // Missing and wrong Content-Type.
    let (text, form) = (
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    );
    for (path, ct, body) in [
        ("/online", None, good_online.clone()),
        ("/online", text, good_online.clone()),
        ("/online", form, good_online),
        ("/offline", None, good_offline.clone()),
        ("/offline", text, good_offline),
        ("/heartbeat", text, "{}".into()),
        ("/status/batch", None, "{\"userIds\":[]}".into()),
        (&status_path, text, "{\"status\":\"BUSY\"}".into()),
    ] {
        cases.push((p(path), ct, body, 415, "Content-Type"));
    }
    // Missing fields name the field.
    let mut field_cases: Vec<(&str, Value, &str)> = vec![
        (
            "/online",
            json!({"userId": u, "platform": "WEB"}),
            "deviceId",
        ),
        (
            "/online",
            json!({"deviceId": "d1", "platform": "WEB"}),
            "userId",
        ),
        (
            "/online",
            json!({"userId": u, "deviceId": "d1"}),
            "platform",
        ),
        ("/offline", json!({"userId": u}), "deviceId"),
        ("/offline", json!({"deviceId": "d1"}), "userId"),
        ("/heartbeat", json!({"userId": u}), "deviceId"),
    ];
    // A good body with one bad field (wrong type; userId not a positive 64-bit integer; unknown
    // platform; bad device id; `active` not a bool), which the message names.
    let long = "x".repeat(129);
    for (path, field, bad) in [
        (
            "/online",
            "userId",
            vec![json!(u.to_string()), json!(0), json!(-5)],
        ),
        (
            "/online",
            "userId",
            vec![json!(1.5), json!("1"), json!(i64::MAX as u64 + 1)],
        ),
        (
            "/online",
            "deviceId",
            vec![json!(7), json!(null), json!(""), json!(long)],
        ),
        (
            "/online",
            "deviceId",
            vec![json!("a b"), json!("设备"), json!("d/1")],
        ),
        (
            "/online",
            "platform",
            vec![json!(1), json!("web"), json!("XBOX"), json!("")],
        ),
        (
            "/offline",
            "userId",
            vec![json!(true), json!(0), json!(u64::MAX)],
        ),
        (
            "/offline",
            "deviceId",
            vec![json!(["d1"]), json!(""), json!("d 1")],
        ),
        ("/heartbeat", "userId", vec![json!(-1)]),
        ("/heartbeat", "deviceId", vec![json!(long)]),
        ("/heartbeat", "active", vec![json!("yes"), json!(1)]),
    ] {
        for v in bad {
            let mut body = match path {
                "/online" => json!({"userId": u, "deviceId": "d2", "platform": "WEB"}),
                _ => json!({"userId": u, "deviceId": "d1"}),
            };
            body[field] = v;
            field_cases.push((path, body, field));
        }
    }
    for (path, body, names) in field_cases {
        cases.push((p(path), json_ct, body.to_string(), 400, names));
    }
    // 2^64 does not fit: spelt out, as serde_json would not produce it.
    let big = r#"{"userId": 18446744073709551616, "deviceId": "d1"}"#.to_string();
    cases.push((p("/offline"), json_ct, big, 400, "userId"));
    let big = format!("{{\"userIds\": [{u}, 18446744073709551616]}}");
    cases.push((p("/status/batch"), json_ct, big, 400, "userId"));

    for (path, ct, body, want, names) in cases {
        let method = if path.contains("/status/") && !path.ends_with("batch") {
            "PUT"
        } else {
            "POST"
        };
        let (code, text) = s.raw(method, &path, ct, body.clone().into_bytes()).await;
        assert_eq!(code, want, "{method} {path} {ct:?} {body} -> {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(names),
            "{path} {body}: message {message:?} does not name {names}"
        );
        assert_eq!(
            snapshot(&s, u).await,
            before,
            "{method} {path} {body} changed state"
        );
    }

    // The boundaries are accepted: a 128-character id, a charset suffix, the full id alphabet.
    let w = uid();
    let long = "a".repeat(128);
    online(&s, w, &long, "ANDROID").await;
    let body = json!({"userId": w, "deviceId": "Az09_.:-", "platform": "PC"}).to_string();
    let (code, text) = s
        .raw(
            "POST",
            &p("/online"),
            Some("application/json; charset=utf-8"),
            body.into_bytes(),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(s.status_of(w).await["devices"].as_array().unwrap().len(), 2);
}

async fn bad_path_user_ids_are_400(t: Topology) {
    let s = Server::start(t, &[]);
    for bad in [
        "abc",
        "0",
        "-1",
        "99999999999999999999",
        "18446744073709551616",
        "18446744073709551615",
        "9223372036854775808",
        "1.5",
        "1e3",
        "+5",
        "%20",
    ] {
        let (code, v) = s.get(&p(&format!("/status/{bad}"))).await;
        assert_eq!(code, 400, "GET /status/{bad} -> {v}");
        assert!(v["message"].as_str().unwrap().contains("userId"), "{v}");
    }
    // userId is a positive int64 (a Java long): its largest value is fine, read-only here.
    let max = i64::MAX as u64;
    let view = s.status_of(max).await;
    assert_eq!(view["userId"], json!(max));
    assert_eq!(view["status"], "OFFLINE");
    let (code, v) = s.post(&p("/status/batch"), json!({"userIds": [max]})).await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s
        .post(&p("/status/batch"), json!({"userIds": [max + 1]}))
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("userId"), "{v}");
}

/// Requests are JSON objects: a well-formed array of the right values is the wrong shape and
/// must not be read positionally as the fields in declaration order.
async fn array_bodies_are_the_wrong_shape(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    online(&s, u, "d1", "WEB").await;
    let before = snapshot(&s, u).await;
    let w = uid();
    for (path, body) in [
        ("/online", json!([w, "d1", "WEB"])),
        ("/offline", json!([u, "d1"])),
        ("/heartbeat", json!([u, "d1", true])),
        ("/status/batch", json!([[u]])),
    ] {
        let (code, v) = s.post(&p(path), body.clone()).await;
        assert_eq!(code, 400, "POST {path} {body} -> {v}");
        assert_eq!(
            snapshot(&s, u).await,
            before,
            "POST {path} {body} changed state"
        );
    }
    let (code, v) = s
        .put(&p(&format!("/status/{u}")), json!(["BUSY", "会议中"]))
        .await;
    assert_eq!(code, 400, "PUT [..] -> {v}");
    assert_eq!(snapshot(&s, u).await, before);
    assert_eq!(s.status_of(w).await["version"], json!(0));
}

/// A path userId that is not even UTF-8 once decoded is still a 400 in the envelope, not
/// axum's plain-text rejection.
async fn non_utf8_path_user_id_is_an_envelope_400(t: Topology) {
    let s = Server::start(t, &[]);
    for (method, ct, body) in [
        ("GET", None, Vec::new()),
        (
            "PUT",
            Some("application/json"),
            br#"{"status":"BUSY"}"#.to_vec(),
        ),
        ("DELETE", None, Vec::new()),
    ] {
        let (code, text) = s.raw(method, &p("/status/%FF"), ct, body).await;
        assert_eq!(code, 400, "{method} -> {text}");
        assert!(text.contains("userId"), "{method} -> {text}");
    }
}

async fn bodies_over_64_kib_are_413(t: Topology) {
    let s = Server::start(t, &[]);
    let u = uid();
    online(&s, u, "d1", "WEB").await;
    let before = snapshot(&s, u).await;

    let padded = |size: usize, device: &str| {
        let head =
            format!("{{\"userId\":{u},\"deviceId\":\"{device}\",\"platform\":\"PC\",\"pad\":\"");
        let pad = "x".repeat(size - head.len() - 2);
        format!("{head}{pad}\"}}").into_bytes()
    };
    let big = padded(64 * 1024 + 1, "d2");
    assert_eq!(big.len(), 64 * 1024 + 1);
    let (code, text) = s
        .raw("POST", &p("/online"), Some("application/json"), big)
        .await;
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("too large"), "{text}");
    assert_eq!(snapshot(&s, u).await, before);

    let (code, text) = s
        .raw(
            "POST",
            &p("/offline"),
            Some("application/json"),
            padded(200_000, "d1"),
        )
        .await;
    assert_eq!(code, 413, "{text}");
    assert_eq!(snapshot(&s, u).await, before);

    let ids = format!("{{\"userIds\":[{}]}}", vec![u.to_string(); 5000].join(","));
    assert!(ids.len() > 64 * 1024);
    let (code, text) = s
        .raw(
            "POST",
            &p("/status/batch"),
            Some("application/json"),
            ids.into(),
        )
        .await;
    assert_eq!(code, 413, "{text}");

    // A chunked body, with no Content-Length to refuse it up front, is cut off at the limit too.
    let mut req = format!(
        "POST {P}/online HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in padded(80 * 1024, "d4").chunks(8192) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (code, text) = s.raw_socket(&req);
    assert_eq!(code, 413, "{text}");
    assert_eq!(snapshot(&s, u).await, before);

    // Just under the limit is fine (unknown fields are ignored).
    let ok = padded(64 * 1024 - 16, "d3");
    let (code, text) = s
        .raw("POST", &p("/online"), Some("application/json"), ok)
        .await;
    assert_eq!(code, 200, "{text}");
}

/// A request refused before its body was read (413, 415) must not leave a keep-alive client
/// with a dead connection: either the answer says `Connection: close`, or the connection still
/// serves the next request.
fn early_rejections_keep_keep_alive_clients_working(t: Topology) {
    let s = Server::start(t, &[]);
    let body = format!("{{\"userIds\":[{}]}}", vec!["1"; 100_000].join(","));
    for (path, ct, want) in [
        (p("/status/batch"), "application/json", 413),
        (p("/status/batch"), "text/plain", 415),
        ("/nope".to_string(), "application/json", 404),
        ("/livez".to_string(), "application/json", 405),
    ] {
        let first = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let ((code, head), second) =
            s.two_on_one_connection(first.as_bytes(), b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(code, want, "{head}");
        if !head.to_ascii_lowercase().contains("connection: close") {
            assert_eq!(
                second,
                Ok(200),
                "{code} answered without `Connection: close`, then the connection was closed: \
                 a keep-alive client's next request on it fails"
            );
        }
    }
}

async fn unknown_routes_are_404_and_wrong_methods_405(t: Topology) {
    let s = Server::start(t, &[]);
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/api/v1/presence"),
        ("GET", "/api/v1/presence/"),
        ("POST", "/api/v1/presence/nope"),
        ("GET", "/api/v1/presence/status"),
        ("GET", "/api/v1/presence/status/1/extra"),
        ("POST", "/api/v2/presence/online"),
        ("DELETE", "/metricz"),
    ] {
        let (code, text) = s.raw(method, path, None, Vec::new()).await;
        assert_eq!(code, 404, "{method} {path} -> {text}");
        assert!(text.contains("not found"), "{method} {path} -> {text}");
    }
    for (method, path) in [
        ("GET", "/api/v1/presence/online"),
        ("PUT", "/api/v1/presence/offline"),
        ("DELETE", "/api/v1/presence/heartbeat"),
        ("PATCH", "/api/v1/presence/status/1"),
        ("POST", "/api/v1/presence/status/1"),
        ("POST", "/api/v1/presence/statuses"),
        ("POST", "/livez"),
        ("DELETE", "/readyz"),
        ("POST", "/metrics"),
    ] {
        let (code, text) = s
            .raw(method, path, Some("application/json"), b"{}".to_vec())
            .await;
        assert_eq!(code, 405, "{method} {path} -> {text}");
        assert!(
            text.contains("method not allowed"),
            "{method} {path} -> {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Health and metrics

async fn health_and_metrics(t: Topology) {
    let s = Server::start_private(t, &[]);
    let (code, v) = s.get("/livez").await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s.get("/readyz").await;
    assert_eq!(code, 200, "{v}");

    let (code, ct, text) = s.text("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        ct.unwrap_or_default().starts_with("text/plain"),
        "metrics Content-Type"
    );
    for name in [
        "presence_online_users",
        "presence_online_devices",
        "presence_heartbeats_total",
        "presence_device_timeouts_total",
        "presence_status_transitions_total",
        "presence_http_requests_total",
        "presence_http_request_duration_seconds_bucket",
    ] {
        assert!(
            text.contains(&format!("\n{name}")),
            "{name} missing from:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {}", name.trim_end_matches("_bucket"))),
            "{name}"
        );
    }
    assert_eq!(
        common::http::metric_value(&text, "presence_online_users"),
        Some(0.0)
    );
    assert_eq!(
        common::http::metric_value(&text, "presence_online_devices"),
        Some(0.0)
    );

    let u = uid();
    online(&s, u, "d1", "WEB").await;
    assert_eq!(s.metric("presence_online_users").await, 1.0);
    assert_eq!(s.metric("presence_online_devices").await, 1.0);
    online(&s, u, "d2", "IOS").await;
    online(&s, u, "d2", "IOS").await;
    assert_eq!(s.metric("presence_online_users").await, 1.0);
    assert_eq!(s.metric("presence_online_devices").await, 2.0);
    heartbeat_ok(&s, u, "d1", None).await;
    heartbeat(&s, u, "nope", None).await;
    assert_eq!(
        s.metric("presence_heartbeats_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        s.metric("presence_heartbeats_total{result=\"not_online\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.metric("presence_status_transitions_total{from=\"OFFLINE\",to=\"ONLINE\"}")
            .await,
        1.0
    );

    offline(&s, u, "d1").await;
    offline(&s, u, "d2").await;
    assert_eq!(s.metric("presence_online_users").await, 0.0);
    assert_eq!(s.metric("presence_online_devices").await, 0.0);
    assert_eq!(
        s.metric("presence_status_transitions_total{from=\"ONLINE\",to=\"OFFLINE\"}")
            .await,
        1.0
    );

    let (_, _, text) = s.text("/metrics").await;
    let online_ok = requests(
        &text,
        &["route=\"/api/v1/presence/online\"", "code=\"200\""],
    );
    assert_eq!(online_ok, 3.0, "{text}");
    let hb_404 = requests(
        &text,
        &["route=\"/api/v1/presence/heartbeat\"", "code=\"404\""],
    );
    assert_eq!(hb_404, 1.0, "{text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("presence_http_request_duration_seconds_bucket{")
                && l.contains("route=\"/api/v1/presence/online\"")
        ),
        "{text}"
    );
}

/// Every answer is counted by code, including the router's own 404 and 405.
async fn unmatched_routes_and_wrong_methods_are_counted(t: Topology) {
    let s = Server::start(t, &[]);
    s.raw("GET", "/nope", None, Vec::new()).await;
    s.raw("GET", &p("/online"), None, Vec::new()).await;
    s.raw("POST", "/livez", None, Vec::new()).await;
    let (_, _, text) = s.text("/metrics").await;
    assert_eq!(requests(&text, &["code=\"404\""]), 1.0, "{text}");
    let wrong_method = requests(&text, &["code=\"405\""]);
    assert_eq!(wrong_method, 2.0, "405 answers are not counted:\n{text}");
}

// ---------------------------------------------------------------------------------------------
// 10. SIGTERM

async fn sigterm_exits_cleanly(t: Topology) {
    let mut s = Server::start_process(t, &[]);
    let u = uid();
    online(&s, u, "d", "WEB").await;
    s.sigterm();
    let exit = s.wait_exit(Duration::from_secs(5));
    let exit = exit.unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", s.stderr()));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status {exit}; stderr:\n{}",
        s.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Concurrency and the device limit

async fn concurrent_onlines_all_land_and_the_device_limit_is_409(t: Topology) {
    let s = Server::start(t, &[("PRESENCE_MAX_DEVICES", "64")]);
    let u = uid();
    let path = p("/online");
    let results = futures::future::join_all((0..50).map(|i| {
        let body = json!({"userId": u, "deviceId": format!("dev-{i}"), "platform": "ANDROID"});
        s.post(&path, body)
    }))
    .await;
    for (i, (code, v)) in results.iter().enumerate() {
        assert_eq!(*code, 200, "device {i}: {v}");
        assert_eq!(v["data"]["status"], "ONLINE");
    }
    let view = s.status_of(u).await;
    let want: BTreeSet<String> = (0..50).map(|i| format!("dev-{i}")).collect();
    assert_eq!(device_ids(&view), want);
    assert!(view["version"].as_u64().unwrap() >= 50, "{view}");
    // Gauges are process-wide; with the shared test store they also count other tests' users.
    if !s.shared_store {
        assert_eq!(s.metric("presence_online_devices").await, 50.0);
        assert_eq!(s.metric("presence_online_users").await, 1.0);
    }

    // 20 more at once: 14 fit under the limit of 64, 6 are refused.
    let results = futures::future::join_all((50..70).map(|i| {
        let body = json!({"userId": u, "deviceId": format!("dev-{i}"), "platform": "WEB"});
        s.post(&path, body)
    }))
    .await;
    let ok = results.iter().filter(|(c, _)| *c == 200).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(c, _)| *c == 409)
        .map(|(_, v)| v)
        .collect();
    assert_eq!((ok, refused.len()), (14, 6), "{results:?}");
    for v in refused {
        assert!(
            v["message"].as_str().unwrap().contains("too many devices"),
            "{v}"
        );
    }
    let before = snapshot(&s, u).await;
    assert_eq!(before.2.as_array().unwrap().len(), 64);
    let (code, v) = s
        .post(
            &p("/online"),
            json!({"userId": u, "deviceId": "one-more", "platform": "PC"}),
        )
        .await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(
        snapshot(&s, u).await,
        before,
        "a refused online changed state"
    );
    // A device already online is still welcome at the limit.
    let again = online(&s, u, "dev-0", "ANDROID").await;
    assert_eq!(again["version"], before.0);

    // Many users at once.
    let users: Vec<u64> = (0..50).map(|_| uid()).collect();
    let results = futures::future::join_all(users.iter().map(|&w| {
        s.post(
            &path,
            json!({"userId": w, "deviceId": "d", "platform": "IOS"}),
        )
    }))
    .await;
    assert!(results.iter().all(|(c, _)| *c == 200));
    let (_, v) = s.post(&p("/status/batch"), json!({"userIds": users})).await;
    let entries = v["data"].as_array().unwrap();
    assert_eq!(entries.len(), 50);
    assert!(entries.iter().all(|e| e["status"] == "ONLINE"), "{v}");
    if !s.shared_store {
        assert_eq!(s.metric("presence_online_users").await, 51.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Every test above, once per topology: `memory::…`, `redis::…`, `cluster::…`.

per_topology! {
    async seed_flows_answer_the_contract,
    async never_seen_user_is_offline_and_last_active_survives_offline,
    async batch_keeps_order_drops_duplicates_and_enforces_the_limit,
    async multi_device_aggregation_and_idempotent_online,
    async device_times_out_never_early_and_at_most_one_second_late,
    async inactive_heartbeats_go_away_on_the_timer_and_an_active_one_comes_back,
    async timed_out_device_resumes_within_the_window_and_not_after,
    async explicit_offline_is_final_and_unknown_devices_get_404,
    async manual_status_persists_offline_applies_on_online_and_clears,
    async manual_status_expires_on_its_own,
    async manual_status_rejects_bad_input_and_changes_nothing,
    async statuses_list_the_states_and_styles_are_configurable,
    async bad_bodies_are_400_or_415_with_the_envelope_and_change_nothing,
    async bad_path_user_ids_are_400,
    async array_bodies_are_the_wrong_shape,
    async non_utf8_path_user_id_is_an_envelope_400,
    async bodies_over_64_kib_are_413,
    async unknown_routes_are_404_and_wrong_methods_405,
    async health_and_metrics,
    async unmatched_routes_and_wrong_methods_are_counted,
    async sigterm_exits_cleanly,
    async concurrent_onlines_all_land_and_the_device_limit_is_409,
    sync early_rejections_keep_keep_alive_clients_working,
}
