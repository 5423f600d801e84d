//! Privacy end to end (`PRESENCE_AUTH=jwt`): INVISIBLE, who may see whom (`visibility`, `allow`,
//! `deny`), last-seen precision. Three observers of one user (a contact, a stranger, a denied
//! user) and a service token read it over REST, batch, subscription views and WebSocket
//! (`query` and pushed events). Every test runs once per topology: `memory::*` with plain
//! `cargo test`; `redis::*` and `cluster::*` (3 shards, 2 gateways) need the Redis Cluster:
//! `bash scripts/test.sh`.

mod common;

use std::time::{Duration, Instant};

use common::token::{service_token, user_token, with_bearer, ws_request, JWT_VARS};
use common::{uid, Server, Topology, Ws};
use serde_json::{json, Value};

const P: &str = "/api/v1/presence";
const WAIT: Duration = Duration::from_secs(5);

fn p(path: &str) -> String {
    format!("{P}{path}")
}

/// A topology that takes the test tokens, and the calls these tests make.
struct World {
    s: Server,
    svc: String,
}

impl World {
    fn start(t: Topology, extra: &[(&str, &str)]) -> World {
        let mut vars = JWT_VARS.to_vec();
        vars.extend_from_slice(extra);
        World {
            s: Server::start(t, &vars),
            svc: service_token(),
        }
    }

    /// A call as `token` (and, for a service token, `viewer`): status and envelope.
    async fn call_as(
        &self,
        token: &str,
        viewer: Option<u64>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let named = viewer.map(|v| v.to_string());
        let headers: Vec<(&str, &str)> = named
            .iter()
            .map(|v| ("X-Presence-Viewer", v.as_str()))
            .collect();
        self.s
            .request_with(Some(token), &headers, method, &p(path), body.as_ref())
            .await
    }

    /// A call that must answer 200: its `data`.
    async fn ok(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.call_as(token, None, method, path, body).await;
        assert_eq!(code, 200, "{method} {path}: {v}");
        v["data"].clone()
    }

    /// `GET /status/{user}` as the holder of `token` (naming `viewer`, for a service token).
    async fn status(&self, token: &str, viewer: Option<u64>, user: u64) -> Value {
        let (code, v) = self
            .call_as(token, viewer, "GET", &format!("/status/{user}"), None)
            .await;
        assert_eq!(code, 200, "GET /status/{user}: {v}");
        v["data"].clone()
    }

    /// The batch entry of `user` in `POST /status/batch` as the holder of `token`.
    async fn batch(&self, token: &str, viewer: Option<u64>, user: u64) -> Value {
        let body = json!({"userIds": [user, uid()]});
        let (code, v) = self
            .call_as(token, viewer, "POST", "/status/batch", Some(body))
            .await;
        assert_eq!(code, 200, "batch: {v}");
        assert_eq!(v["data"][0]["userId"], user, "{v}");
        v["data"][0].clone()
    }

    async fn online(&self, user: u64, device: &str) -> Value {
        let body = json!({"userId": user, "deviceId": device, "platform": "IOS"});
        self.ok(&user_token(user), "POST", "/online", Some(body))
            .await
    }

    async fn set_privacy(&self, user: u64, body: Value) -> Value {
        self.ok(
            &user_token(user),
            "PUT",
            &format!("/privacy/{user}"),
            Some(body),
        )
        .await
    }

    /// A socket of `user` (its own token), subscribed to `targets`.
    async fn socket(&self, user: u64, targets: &[u64]) -> Ws {
        let req = with_bearer(ws_request(&self.s.base, user, "sock"), &user_token(user));
        let mut ws = Ws::open_request(req, &format!("socket of {user}")).await;
        if !targets.is_empty() {
            ws.subscribe(targets).await;
        }
        ws.keepalive(Duration::from_millis(500));
        ws
    }
}

/// The view of a user seen as OFFLINE by someone it hides from: no devices, no custom text,
/// no manual status, no last-seen time.
fn assert_hidden(v: &Value, what: &str) {
    assert_eq!(v["status"], "OFFLINE", "{what}: {v}");
    assert_eq!(v["customText"], Value::Null, "{what}: {v}");
    assert_eq!(v["lastActiveTime"], Value::Null, "{what}: {v}");
    assert_eq!(v.get("lastSeen"), Some(&Value::Null), "{what}: {v}");
    if v.get("devices").is_some() {
        assert_eq!(v["devices"], json!([]), "{what}: {v}");
        assert_eq!(v["manualStatus"], Value::Null, "{what}: {v}");
    }
}

/// The real view of the user of these tests: BUSY with its text (and its device, in a full
/// view).
fn assert_real(v: &Value, what: &str) {
    assert_eq!(v["status"], "BUSY", "{what}: {v}");
    assert_eq!(v["customText"], "会议中", "{what}: {v}");
    assert!(v["lastActiveTime"].is_string(), "{what}: {v}");
    assert_eq!(
        v.get("lastSeen"),
        None,
        "{what}: EXACT shows no lastSeen: {v}"
    );
    if v.get("devices").is_some() {
        assert_eq!(v["devices"][0]["deviceId"], "d1", "{what}: {v}");
        assert_eq!(v["manualStatus"], "BUSY", "{what}: {v}");
    }
}

fn assert_sees(v: &Value, sees: bool, what: &str) {
    if sees {
        assert_real(v, what)
    } else {
        assert_hidden(v, what)
    }
}

/// Waits for the socket's newest presence frame of `user` after the first `before` to satisfy
/// `sees`.
async fn assert_pushed(ws: &mut Ws, user: u64, before: usize, sees: bool, what: &str) -> Instant {
    let (at, v) = ws
        .wait(WAIT, what, |log| {
            let frames: Vec<&(Instant, Value)> = log
                .iter()
                .filter(|(_, v)| v["type"] == "presence" && v["data"]["userId"] == user)
                .collect();
            let last = frames.get(before..)?.last()?;
            let ok = if sees {
                last.1["data"]["status"] == "BUSY"
            } else {
                last.1["data"]["status"] == "OFFLINE"
            };
            ok.then(|| (last.0, last.1["data"].clone()))
        })
        .await;
    assert_sees(&v, sees, what);
    at
}

/// Every visibility for the three observers and the service token, over REST, batch,
/// subscription views, a socket's `query` and pushed events; then `allow` over `visibility`
/// and `deny` over `allow`. Nobody ever gets a 403 for reading a status.
async fn observers_see_what_each_visibility_and_list_lets_them(t: Topology) {
    let w = World::start(t, &[]);
    let (u, contact, stranger, denied) = (uid(), uid(), uid(), uid());
    let ut = user_token(u);
    w.online(u, "d1").await;
    let settings = json!({"status": "BUSY", "customText": "会议中"});
    w.ok(&ut, "PUT", &format!("/status/{u}"), Some(settings))
        .await;
    // u subscribes to `contact`: `contact` is u's contact.
    w.ok(
        &ut,
        "PUT",
        &format!("/subscriptions/{u}"),
        Some(json!({"targets": [contact]})),
    )
    .await;
    let observers = [
        ("contact", contact),
        ("stranger", stranger),
        ("denied", denied),
    ];
    let mut sockets = Vec::new();
    for (_, o) in observers {
        sockets.push(w.socket(o, &[u]).await);
    }
    for (visibility, sees) in [
        ("EVERYONE", [true, true, false]),
        ("CONTACTS", [true, false, false]),
        ("NOBODY", [false, false, false]),
    ] {
        let before: Vec<usize> = sockets.iter().map(|s| s.presence(u).len()).collect();
        let answer = w
            .set_privacy(u, json!({"visibility": visibility, "deny": [denied]}))
            .await;
        assert_eq!(answer["visibility"], visibility, "{answer}");
        assert_eq!(answer["deny"], json!([denied]), "{answer}");
        for (i, (name, o)) in observers.iter().enumerate() {
            let what = format!("{visibility}, the {name}");
            let tok = user_token(*o);
            let rest = w.status(&tok, None, u).await;
            assert_sees(&rest, sees[i], &format!("{what}: GET"));
            assert_sees(
                &w.batch(&tok, None, u).await,
                sees[i],
                &format!("{what}: batch"),
            );
            // A service token naming the observer sees what the observer sees.
            assert_eq!(
                w.status(&w.svc, Some(*o), u).await,
                rest,
                "{what}: as a viewer"
            );
            assert_sees(
                &w.batch(&w.svc, Some(*o), u).await,
                sees[i],
                &format!("{what}: service batch"),
            );
            let subs = w
                .ok(&tok, "GET", &format!("/subscriptions/{o}"), None)
                .await;
            assert_sees(
                &subs["statuses"][0],
                sees[i],
                &format!("{what}: subscriptions"),
            );
            let q = sockets[i]
                .request(json!({"type": "query", "userIds": [u]}))
                .await;
            assert_sees(&q["data"][0], sees[i], &format!("{what}: query"));
            assert_pushed(
                &mut sockets[i],
                u,
                before[i],
                sees[i],
                &format!("{what}: push"),
            )
            .await;
        }
        // The service token and the user itself read the truth.
        assert_real(&w.status(&w.svc, None, u).await, "service");
        assert_real(&w.batch(&w.svc, None, u).await, "service batch");
        assert_real(&w.status(&ut, None, u).await, "self");
    }

    // `allow` beats `visibility`, `deny` beats `allow`.
    let answer = w
        .set_privacy(
            u,
            json!({"visibility": "NOBODY", "allow": [stranger, denied, stranger], "deny": [denied]}),
        )
        .await;
    let mut allow = vec![stranger, denied];
    allow.sort_unstable();
    assert_eq!(
        answer["allow"],
        json!(allow),
        "sorted, no duplicates: {answer}"
    );
    for (o, sees) in [(stranger, true), (denied, false), (contact, false)] {
        let v = w.status(&user_token(o), None, u).await;
        assert_sees(&v, sees, &format!("allow/deny precedence, viewer {o}"));
    }
    // A user token cannot look through someone else's eyes, and reads no one's settings.
    let refused = [
        (Some(contact), "GET", format!("/status/{u}"), None),
        (None, "GET", format!("/privacy/{u}"), None),
        (
            None,
            "PUT",
            format!("/privacy/{u}"),
            Some(json!({"visibility": "EVERYONE"})),
        ),
    ];
    for (viewer, method, path, body) in refused {
        let (code, v) = w
            .call_as(&user_token(stranger), viewer, method, &path, body)
            .await;
        assert_eq!(code, 403, "{method} {path} as {viewer:?}: {v}");
    }
    let read = w.ok(&w.svc, "GET", &format!("/privacy/{u}"), None).await;
    assert_eq!(
        read, answer,
        "the service token reads the settings as stored"
    );
}

/// `lastSeen`: EXACT shows the time (no `lastSeen`), COARSE a bucket instead, HIDDEN neither;
/// to those who may see the user, over REST, batch and pushed events. The user itself always
/// sees the exact time.
async fn last_seen_shows_as_precisely_as_the_user_allows(t: Topology) {
    let w = World::start(t, &[]);
    let (u, viewer) = (uid(), uid());
    w.online(u, "d1").await;
    let mut ws = w.socket(viewer, &[u]).await;
    let tok = user_token(viewer);
    for (mode, expect_time, expect_seen) in [
        ("EXACT", true, None),
        ("COARSE", false, Some(json!("RECENTLY"))),
        ("HIDDEN", false, Some(Value::Null)),
    ] {
        let before = ws.presence(u).len();
        w.set_privacy(u, json!({"lastSeen": mode})).await;
        let (_, pushed) = ws
            .wait(WAIT, &format!("the push after lastSeen {mode}"), |log| {
                let frames: Vec<&(Instant, Value)> = log
                    .iter()
                    .filter(|(_, v)| v["type"] == "presence" && v["data"]["userId"] == u)
                    .collect();
                frames
                    .get(before..)?
                    .last()
                    .map(|(t, v)| (*t, v["data"].clone()))
            })
            .await;
        let rest = w.status(&tok, None, u).await;
        let batch = w.batch(&tok, None, u).await;
        for (what, v) in [("GET", &rest), ("batch", &batch), ("push", &pushed)] {
            let what = format!("lastSeen {mode}, {what}");
            assert_eq!(v["status"], "ONLINE", "{what}: {v}");
            assert_eq!(v["lastActiveTime"].is_string(), expect_time, "{what}: {v}");
            assert_eq!(v.get("lastSeen").cloned(), expect_seen, "{what}: {v}");
        }
        let own = w.status(&user_token(u), None, u).await;
        assert!(own["lastActiveTime"].is_string(), "self, {mode}: {own}");
        assert_eq!(own.get("lastSeen"), None, "self, {mode}: {own}");
    }
}

/// INVISIBLE: the view others get equals, byte for byte but the userId, that of a user who
/// really went offline at the same moment, over REST, batch and the pushed event; the user's
/// own reads show INVISIBLE with its devices; heartbeats and another device coming online push
/// nothing to others; clearing the status pushes the real one.
async fn invisible_looks_exactly_like_a_real_disconnect(t: Topology) {
    let w = World::start(t, &[]);
    let (ghost, leaver, watcher) = (uid(), uid(), uid());
    let styles = w.ok(&w.svc, "GET", "/statuses", None).await;
    let invisible = styles
        .as_array()
        .expect("a list")
        .iter()
        .find(|s| s["status"] == "INVISIBLE")
        .unwrap_or_else(|| panic!("INVISIBLE is listed: {styles}"));
    for k in ["label", "icon", "color"] {
        assert!(invisible[k].is_string(), "{invisible}");
    }
    let mut ws = w.socket(watcher, &[ghost, leaver]).await;
    let tok = user_token(watcher);
    // The same history for both, then at the same moment one goes INVISIBLE and the other
    // really goes offline.
    let mut attempts = 0;
    let (a, b) = loop {
        attempts += 1;
        let (ghost, leaver) = if attempts == 1 {
            (ghost, leaver)
        } else {
            (uid(), uid())
        };
        if attempts > 1 {
            ws.subscribe(&[ghost, leaver]).await;
        }
        w.online(ghost, "d1").await;
        w.online(leaver, "d1").await;
        let second = chrono::Utc::now().timestamp();
        let gt = user_token(ghost);
        let lt = user_token(leaver);
        let path = format!("/status/{ghost}");
        let (own, _) = tokio::join!(
            w.ok(&gt, "PUT", &path, Some(json!({"status": "INVISIBLE"}))),
            w.ok(
                &lt,
                "POST",
                "/offline",
                Some(json!({"userId": leaver, "deviceId": "d1"}))
            ),
        );
        // Both changes within one second, or the times differ for a reason that is not a leak.
        if chrono::Utc::now().timestamp() != second && attempts < 5 {
            continue;
        }
        assert_eq!(own["status"], "INVISIBLE", "the user's own answer: {own}");
        assert_eq!(own["devices"][0]["deviceId"], "d1", "{own}");
        break (ghost, leaver);
    };
    let same = |mut x: Value, y: &Value, what: &str| {
        x["userId"] = y["userId"].clone();
        assert_eq!(
            serde_json::to_string(&x).unwrap(),
            serde_json::to_string(y).unwrap(),
            "{what}: INVISIBLE differs from a real disconnect"
        );
    };
    same(
        w.status(&tok, None, a).await,
        &w.status(&tok, None, b).await,
        "GET",
    );
    same(
        w.batch(&tok, None, a).await,
        &w.batch(&tok, None, b).await,
        "batch",
    );
    let pa = ws.wait_status(a, "OFFLINE", WAIT).await.1;
    let pb = ws.wait_status(b, "OFFLINE", WAIT).await.1;
    same(pa, &pb, "push");
    let own = w.status(&user_token(a), None, a).await;
    assert_eq!(own["status"], "INVISIBLE", "{own}");
    assert_eq!(own["manualStatus"], "INVISIBLE", "{own}");
    assert_eq!(own["devices"].as_array().map(Vec::len), Some(1), "{own}");

    // While invisible: heartbeats and another device push nothing, and nothing shows.
    let frames = ws.presence(a).len();
    let seen_before = w.status(&tok, None, a).await;
    let at = user_token(a);
    for _ in 0..3 {
        let hb = json!({"userId": a, "deviceId": "d1", "active": true});
        w.ok(&at, "POST", "/heartbeat", Some(hb)).await;
    }
    w.online(a, "d2").await;
    ws.quiet(Duration::from_millis(800)).await;
    assert_eq!(
        ws.presence(a).len(),
        frames,
        "nothing pushed while invisible"
    );
    assert_eq!(w.status(&tok, None, a).await, seen_before, "nothing shows");
    let own = w.status(&at, None, a).await;
    assert_eq!(own["devices"].as_array().map(Vec::len), Some(2), "{own}");

    // Clearing the status pushes the real one.
    w.ok(&at, "DELETE", &format!("/status/{a}"), None).await;
    let (_, real) = ws
        .wait_presence(a, "ONLINE on two devices", WAIT, |d| {
            d["status"] == "ONLINE" && d["devices"].as_array().map(Vec::len) == Some(2)
        })
        .await;
    assert_eq!(real["customText"], Value::Null, "{real}");
    assert_eq!(w.status(&tok, None, a).await["status"], "ONLINE");
}

/// Settings changes apply at once to open sockets: denying pushes OFFLINE, un-denying the real
/// view; narrowing `visibility` pushes OFFLINE to those who lost sight, `allow` brings one back;
/// under CONTACTS, subscribing to someone shows the user to it. A viewer hidden from gets no
/// event while the user changes status.
async fn settings_changes_push_at_once(t: Topology) {
    let w = World::start(t, &[]);
    let (u, a, b) = (uid(), uid(), uid());
    let ut = user_token(u);
    w.online(u, "d1").await;
    let settings = json!({"status": "BUSY", "customText": "会议中"});
    w.ok(&ut, "PUT", &format!("/status/{u}"), Some(settings))
        .await;
    let mut sa = w.socket(a, &[u]).await;
    let mut sb = w.socket(b, &[u]).await;

    let n = sa.presence(u).len();
    w.set_privacy(u, json!({"deny": [a]})).await;
    assert_pushed(&mut sa, u, n, false, "denied").await;
    // Hidden from: no event about status changes.
    let (n, nb) = (sa.presence(u).len(), sb.presence(u).len());
    w.ok(
        &ut,
        "PUT",
        &format!("/status/{u}"),
        Some(json!({"status": "AWAY", "customText": "x"})),
    )
    .await;
    sb.wait_status(u, "AWAY", WAIT).await;
    let nb2 = sb.presence(u).len();
    assert!(nb2 > nb);
    w.ok(
        &ut,
        "PUT",
        &format!("/status/{u}"),
        Some(json!({"status": "BUSY", "customText": "会议中"})),
    )
    .await;
    assert_pushed(&mut sb, u, nb2, true, "back to BUSY").await;
    sa.quiet(Duration::from_millis(300)).await;
    assert_eq!(sa.presence(u).len(), n, "a denied viewer gets no event");

    let n = sa.presence(u).len();
    w.set_privacy(u, json!({})).await;
    assert_pushed(&mut sa, u, n, true, "un-denied").await;

    let (n, nb) = (sa.presence(u).len(), sb.presence(u).len());
    w.set_privacy(u, json!({"visibility": "NOBODY", "allow": [b]}))
        .await;
    assert_pushed(&mut sa, u, n, false, "narrowed to nobody").await;
    assert_pushed(&mut sb, u, nb, true, "allowed").await;

    let n = sa.presence(u).len();
    w.set_privacy(u, json!({"visibility": "CONTACTS"})).await;
    w.ok(
        &ut,
        "PUT",
        &format!("/subscriptions/{u}"),
        Some(json!({"targets": [a]})),
    )
    .await;
    assert_pushed(&mut sa, u, n, true, "became a contact").await;
    assert_eq!(
        w.status(&user_token(b), None, u).await["status"],
        "OFFLINE",
        "not a contact"
    );
}

/// Bad settings are a 400 in the envelope and change nothing; the lists are capped
/// (`PRESENCE_MAX_PRIVACY_LIST`); with `PRESENCE_ALLOW_INVISIBLE=false` INVISIBLE is refused
/// and not listed.
async fn bad_settings_are_400_and_invisible_can_be_turned_off(t: Topology) {
    let w = World::start(
        t,
        &[
            ("PRESENCE_MAX_PRIVACY_LIST", "3"),
            ("PRESENCE_ALLOW_INVISIBLE", "false"),
        ],
    );
    let u = uid();
    let ut = user_token(u);
    let good = w
        .set_privacy(u, json!({"visibility": "CONTACTS", "deny": [5]}))
        .await;
    for (body, message) in [
        (
            json!({"visibility": "FRIENDS"}),
            "visibility must be one of EVERYONE, CONTACTS, NOBODY",
        ),
        (
            json!({"lastSeen": "SOMETIMES"}),
            "lastSeen must be one of EXACT, COARSE, HIDDEN",
        ),
        (
            json!({"allow": [1, 2, 3, 4]}),
            "allow and deny may hold at most 3 userIds each",
        ),
        (
            json!({"deny": [0]}),
            "allow and deny must hold positive 64-bit user ids",
        ),
    ] {
        let (code, v) = w
            .call_as(
                &ut,
                None,
                "PUT",
                &format!("/privacy/{u}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["message"], message, "{body}");
        assert_eq!(v["data"], Value::Null);
    }
    let (code, _) = w
        .call_as(
            &ut,
            None,
            "PUT",
            &format!("/privacy/{u}"),
            Some(json!({"deny": [-1]})),
        )
        .await;
    assert_eq!(code, 400);
    let read = w.ok(&ut, "GET", &format!("/privacy/{u}"), None).await;
    assert_eq!(read, good, "bad settings changed nothing");
    let (code, v) = w
        .call_as(&w.svc, Some(0), "GET", &format!("/status/{u}"), None)
        .await;
    assert_eq!(code, 400, "viewer 0: {v}");

    let (code, v) = w
        .call_as(
            &ut,
            None,
            "PUT",
            &format!("/status/{u}"),
            Some(json!({"status": "INVISIBLE"})),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        v["message"],
        "status INVISIBLE is turned off on this server"
    );
    let styles = w.ok(&w.svc, "GET", "/statuses", None).await;
    assert!(
        !styles.to_string().contains("INVISIBLE"),
        "not listed: {styles}"
    );
}

per_topology! {
    async observers_see_what_each_visibility_and_list_lets_them,
    async last_seen_shows_as_precisely_as_the_user_allows,
    async invisible_looks_exactly_like_a_real_disconnect,
    async settings_changes_push_at_once,
    async bad_settings_are_400_and_invisible_can_be_turned_off,
}
