//! Authentication (`PRESENCE_AUTH=jwt`) end to end, on in-process nodes with the memory store:
//! every bad token is a 401 that changes nothing; the JWKS going down keeps its known keys; the
//! self-only rule (403 and no change) on every write endpoint and on the socket, and a service
//! token that may do it all; the socket's token: refresh, expiry (4001), refused refresh
//! (4401), the `bearer.<jwt>` subprotocol. Keys are fixed test keys in `tests/fixtures/auth/`.

mod common;

use std::time::{Duration, Instant};

use common::http::metric_value;
use common::token::{
    claims, hs, now, service_claims, service_token, sign, user_token, with_bearer, ws_request, AUD,
    ISS, SECRET,
};
use common::ws::ws_url;
use common::{uid, Server, Topology, Ws};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const P: &str = "/api/v1/presence";
const CHALLENGE: &str = r#"Bearer error="invalid_token""#;

const RSA1: &[u8] = include_bytes!("fixtures/auth/rsa1.der");
const RSA1_PUBLIC_PEM: &[u8] = include_bytes!("fixtures/auth/rsa1.pub.pem");
const RSA2: &[u8] = include_bytes!("fixtures/auth/rsa2.der");
const EC: &[u8] = include_bytes!("fixtures/auth/ec.der");
const ED: &[u8] = include_bytes!("fixtures/auth/ed.der");
const ED_PUBLIC_SPKI: &[u8] = include_bytes!("fixtures/auth/ed.pub.der");

fn p(path: &str) -> String {
    format!("{P}{path}")
}

/// Unpadded base64url.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn rs(kid: &str, claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        Some(kid),
        claims,
        &EncodingKey::from_rsa_der(RSA1),
    )
}

/// The JWKS of the test keys: `rsa1` (RS256), `ec` (ES256), `ed` (EdDSA).
fn jwks() -> Value {
    let with_kid = |jwk: Jwk, kid: &str| {
        let mut v = serde_json::to_value(jwk).expect("a JWK");
        v["kid"] = json!(kid);
        v["use"] = json!("sig");
        v
    };
    let rsa = Jwk::from_encoding_key(&EncodingKey::from_rsa_der(RSA1), Algorithm::RS256)
        .expect("the RSA JWK");
    let ec = Jwk::from_encoding_key(&EncodingKey::from_ec_der(EC), Algorithm::ES256)
        .expect("the EC JWK");
    // The last 32 bytes of an Ed25519 SubjectPublicKeyInfo are the key.
    let ed = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
        "x": b64url(&ED_PUBLIC_SPKI[ED_PUBLIC_SPKI.len() - 32..])});
    json!({"keys": [with_kid(rsa, "rsa1"), with_kid(ec, "ec"), ed]})
}

/// A JWKS endpoint on a thread and runtime of its own (the nodes fetch from it while the test
/// blocks), serving `doc` at `/jwks.json` until stopped.
struct JwksServer {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(doc: Value) -> JwksServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().route(
                    "/jwks.json",
                    axum::routing::get(move || {
                        let doc = doc.clone();
                        async move { axum::Json(doc) }
                    }),
                );
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serving the JWKS");
            });
        });
        JwksServer {
            url,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving: the port refuses connections from now on.
    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node with `PRESENCE_AUTH=jwt` and the issuer set, plus `extra`.
fn node(extra: &[(&str, &str)]) -> Server {
    let mut vars = vec![("PRESENCE_AUTH", "jwt"), ("PRESENCE_JWT_ISSUER", ISS)];
    vars.extend_from_slice(extra);
    Server::start_private(Topology::Memory, &vars)
}

async fn as_(
    s: &Server,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (code, v, _) = s.request_as(Some(token), method, path, body.as_ref()).await;
    (code, v)
}

/// Asserts a 401 in the envelope, with the bearer challenge and no internals.
fn assert_401(what: &str, code: u16, v: &Value, challenge: Option<String>) {
    assert_eq!(code, 401, "{what}: {v}");
    assert_eq!(v["message"], "invalid or missing token", "{what}: {v}");
    assert_eq!(
        challenge.as_deref(),
        Some(CHALLENGE),
        "{what}: WWW-Authenticate"
    );
}

/// The status of `user`, read with the service token `svc`: offline, no devices, no settings,
/// no subscriptions, when nothing happened to it.
async fn assert_untouched(s: &Server, svc: &str, user: u64, what: &str) {
    let (code, v) = as_(s, svc, "GET", &p(&format!("/status/{user}")), None).await;
    assert_eq!(code, 200, "{what}: {v}");
    let d = &v["data"];
    assert_eq!(d["status"], "OFFLINE", "{what}: {d}");
    assert_eq!(d["devices"], json!([]), "{what}: {d}");
    assert_eq!(d["customText"], Value::Null, "{what}: {d}");
    let (code, v) = as_(s, svc, "GET", &p(&format!("/subscriptions/{user}")), None).await;
    assert_eq!(code, 200, "{what}: {v}");
    assert_eq!(v["data"]["targets"], json!([]), "{what}: {v}");
}

/// Every bad token: 401 on a write, a read and the socket, and nothing changes. Against a node
/// with the JWKS only (the HS/RS confusion case) and one with the JWKS and a secret.
#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_401_and_change_nothing() {
    let jwks = JwksServer::start(jwks());
    for with_secret in [false, true] {
        let mut vars = vec![("PRESENCE_JWT_JWKS_URL", jwks.url.as_str())];
        if with_secret {
            vars.push(("PRESENCE_JWT_SECRET", SECRET));
        }
        let s = node(&vars);
        let user = uid();
        let c = claims(user);
        let good = rs("rsa1", &c);
        let svc = rs("rsa1", &service_claims());
        // The forgery: a valid token whose payload now names another user, signature kept.
        let forged = {
            let parts: Vec<&str> = good.split('.').collect();
            let other =
                json!({"sub": uid().to_string(), "aud": AUD, "iss": ISS, "exp": now() + 60});
            format!(
                "{}.{}.{}",
                parts[0],
                b64url(other.to_string().as_bytes()),
                parts[2]
            )
        };
        let alg_none = format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(c.to_string().as_bytes())
        );
        let mut exp = c.clone();
        exp["exp"] = json!(now() - 120);
        let mut aud = c.clone();
        aud["aud"] = json!("another-service");
        let mut iss = c.clone();
        iss["iss"] = json!("https://evil.test");
        let bad: Vec<(&str, String)> = vec![
            ("forged", forged),
            (
                "wrong key",
                sign(
                    Algorithm::RS256,
                    Some("rsa1"),
                    &c,
                    &EncodingKey::from_rsa_der(RSA2),
                ),
            ),
            ("alg none", alg_none),
            (
                "HS/RS confusion",
                sign(
                    Algorithm::HS256,
                    Some("rsa1"),
                    &c,
                    &EncodingKey::from_secret(RSA1_PUBLIC_PEM),
                ),
            ),
            ("expired", rs("rsa1", &exp)),
            ("wrong audience", rs("rsa1", &aud)),
            ("wrong issuer", rs("rsa1", &iss)),
            (
                "unknown kid",
                sign(
                    Algorithm::RS256,
                    Some("nope"),
                    &c,
                    &EncodingKey::from_rsa_der(RSA2),
                ),
            ),
            ("garbage", "not.a.token".into()),
        ];
        for (what, token) in &bad {
            let what = format!("{what} (secret: {with_secret})");
            let online = json!({"userId": user, "deviceId": "d1", "platform": "WEB"});
            let (code, v, ch) = s
                .request_as(Some(token.as_str()), "POST", &p("/online"), Some(&online))
                .await;
            assert_401(&what, code, &v, ch);
            let set = json!({"status": "BUSY", "customText": "x"});
            let path = p(&format!("/status/{user}"));
            let (code, v, ch) = s
                .request_as(Some(token.as_str()), "PUT", &path, Some(&set))
                .await;
            assert_401(&what, code, &v, ch);
            let subs = json!({"targets": [uid()]});
            let path = p(&format!("/subscriptions/{user}"));
            let (code, v, ch) = s
                .request_as(Some(token.as_str()), "PUT", &path, Some(&subs))
                .await;
            assert_401(&what, code, &v, ch);
            let (code, v, ch) = s
                .request_as(Some(token.as_str()), "GET", &p("/statuses"), None)
                .await;
            assert_401(&what, code, &v, ch);
            let (code, v, ch) =
                Ws::refused(with_bearer(ws_request(&s.base, user, "d1"), token)).await;
            assert_401(&what, code, &v, ch);
            assert_untouched(&s, &svc, user, &what).await;
        }
        // No token, another scheme, a token in the query string: 401 too.
        let token = rs("rsa1", &c);
        let (code, v, ch) = s.request_as(None, "GET", &p("/statuses"), None).await;
        assert_401("no token", code, &v, ch);
        let (code, v, ch) = s
            .request_as(
                None,
                "GET",
                &p(&format!("/status/{user}?access_token={token}")),
                None,
            )
            .await;
        assert_401("token in the query", code, &v, ch);
        let query =
            format!("userId={user}&deviceId=d1&platform=WEB&access_token={token}&token={token}");
        let req = ws_url(&s.base, &query).into_client_request().unwrap();
        let (code, v, ch) = Ws::refused(req).await;
        assert_401("socket with the token in the query", code, &v, ch);
        assert_untouched(&s, &svc, user, "after the query-string tokens").await;

        // The same requests with good tokens of every pinned algorithm succeed.
        let ec = sign(
            Algorithm::ES256,
            Some("ec"),
            &c,
            &EncodingKey::from_ec_der(EC),
        );
        let ed = sign(
            Algorithm::EdDSA,
            Some("ed"),
            &c,
            &EncodingKey::from_ed_der(ED),
        );
        for (what, token) in [("RS256", &good), ("ES256", &ec), ("EdDSA", &ed)] {
            let (code, v) = as_(&s, token, "GET", &p("/statuses"), None).await;
            assert_eq!(code, 200, "{what}: {v}");
        }
        let online = json!({"userId": user, "deviceId": "d1", "platform": "WEB"});
        let (code, v) = as_(&s, &ed, "POST", &p("/online"), Some(online)).await;
        assert_eq!(code, 200, "online with a good token: {v}");
        let (code, _) = as_(&s, &user_token(user), "GET", &p("/statuses"), None).await;
        assert_eq!(
            code,
            if with_secret { 200 } else { 401 },
            "HS256 needs the secret"
        );

        // Refusals are counted by reason.
        let (_, _, text) = s.text("/metrics").await;
        for (reason, least) in [
            ("expired", 5.0),
            ("wrong_audience", 5.0),
            ("wrong_issuer", 5.0),
            ("unknown_key", 5.0),
            ("missing", 2.0),
            ("invalid", 20.0),
        ] {
            let series = format!(r#"presence_auth_refusals_total{{reason="{reason}"}}"#);
            let n = metric_value(&text, &series).unwrap_or(0.0);
            assert!(n >= least, "{series} = {n}, expected at least {least}");
        }
        assert_eq!(
            metric_value(&text, r#"presence_auth_mode{mode="jwt"}"#),
            Some(1.0)
        );
        assert_eq!(metric_value(&text, "presence_auth_jwks_keys"), Some(3.0));
    }
}

/// Health and metrics need no token.
#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_need_no_token() {
    let s = node(&[("PRESENCE_JWT_SECRET", SECRET)]);
    for path in ["/livez", "/readyz"] {
        let (code, v, _) = s.request_as(None, "GET", path, None).await;
        assert_eq!(code, 200, "{path}: {v}");
    }
    let (code, _, text) = s.text("/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains("presence_auth_refusals_total"));
}

/// The JWKS endpoint goes down: tokens of the keys already fetched keep working, an unknown
/// `kid` is refused after a failed fetch, and the failed fetch does not drop the known keys.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_down_keeps_the_known_keys() {
    let mut jwks = JwksServer::start(jwks());
    let s = node(&[
        ("PRESENCE_JWT_JWKS_URL", jwks.url.as_str()),
        ("PRESENCE_JWT_JWKS_COOLDOWN", "200ms"),
    ]);
    let user = uid();
    let token = rs("rsa1", &claims(user));
    let (code, v) = as_(&s, &token, "GET", &p("/statuses"), None).await;
    assert_eq!(code, 200, "with the endpoint up: {v}");
    jwks.stop();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let unknown = sign(
        Algorithm::RS256,
        Some("rotated-in"),
        &claims(user),
        &EncodingKey::from_rsa_der(RSA2),
    );
    let (code, v, ch) = s
        .request_as(Some(&unknown), "GET", &p("/statuses"), None)
        .await;
    assert_401("unknown kid while the JWKS is down", code, &v, ch);
    assert!(
        s.metric(r#"presence_auth_jwks_fetches_total{result="error"}"#)
            .await
            >= 1.0,
        "the refetch for the unknown kid failed"
    );
    let online = json!({"userId": user, "deviceId": "d1", "platform": "IOS"});
    let (code, v) = as_(&s, &token, "POST", &p("/online"), Some(online)).await;
    assert_eq!(code, 200, "a known key after the failed fetch: {v}");
    let (code, v) = as_(&s, &token, "GET", &p(&format!("/status/{user}")), None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["status"], "ONLINE", "{v}");
    assert_eq!(s.metric("presence_auth_jwks_keys").await, 3.0);
}

/// A user writing another user: 403 and no change, on every write endpoint and on the socket;
/// reading anyone's status is allowed; a service token may do everything.
#[tokio::test(flavor = "multi_thread")]
async fn self_only_writes_and_service_tokens() {
    let s = node(&[("PRESENCE_JWT_SECRET", SECRET)]);
    let (me, victim, friend) = (uid(), uid(), uid());
    let mine = user_token(me);
    let theirs = user_token(victim);
    // The victim's state, set by the victim.
    let online = json!({"userId": victim, "deviceId": "v1", "platform": "IOS"});
    assert_eq!(
        as_(&s, &theirs, "POST", &p("/online"), Some(online))
            .await
            .0,
        200
    );
    let busy = json!({"status": "BUSY", "customText": "meeting"});
    let path = p(&format!("/status/{victim}"));
    assert_eq!(as_(&s, &theirs, "PUT", &path, Some(busy)).await.0, 200);
    let subs = json!({"targets": [friend]});
    let path = p(&format!("/subscriptions/{victim}"));
    assert_eq!(as_(&s, &theirs, "PUT", &path, Some(subs)).await.0, 200);
    let before = s.status_of_as(&theirs, victim).await;

    let writes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            p("/online"),
            Some(json!({"userId": victim, "deviceId": "evil", "platform": "WEB"})),
        ),
        (
            "POST",
            p("/heartbeat"),
            Some(json!({"userId": victim, "deviceId": "v1", "active": true})),
        ),
        (
            "POST",
            p("/offline"),
            Some(json!({"userId": victim, "deviceId": "v1"})),
        ),
        (
            "PUT",
            p(&format!("/status/{victim}")),
            Some(json!({"status": "AWAY", "customText": "gone"})),
        ),
        ("DELETE", p(&format!("/status/{victim}")), None),
        (
            "PUT",
            p(&format!("/subscriptions/{victim}")),
            Some(json!({"targets": [me], "mode": "replace"})),
        ),
        ("GET", p(&format!("/subscriptions/{victim}")), None),
    ];
    for (method, path, body) in &writes {
        let (code, v) = as_(&s, &mine, method, path, body.clone()).await;
        assert_eq!(code, 403, "{method} {path}: {v}");
        assert_eq!(v["message"], "not allowed to act for this user", "{v}");
    }
    // The socket of another user.
    let (code, v, _) = Ws::refused(with_bearer(ws_request(&s.base, victim, "evil"), &mine)).await;
    assert_eq!(code, 403, "socket of another user: {v}");
    // Bad input is still a 400, before the rule.
    let (code, v) = as_(
        &s,
        &mine,
        "POST",
        &p("/online"),
        Some(json!({"userId": victim})),
    )
    .await;
    assert_eq!(code, 400, "{v}");

    // Nothing changed.
    let after = s.status_of_as(&theirs, victim).await;
    assert_eq!(after, before, "the victim's status view");
    let (code, v) = as_(
        &s,
        &theirs,
        "GET",
        &p(&format!("/subscriptions/{victim}")),
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["targets"], json!([friend]), "{v}");
    assert_eq!(
        s.metric(r#"presence_auth_refusals_total{reason="forbidden"}"#)
            .await,
        (writes.len() + 1) as f64
    );

    // Reading anyone's status is allowed.
    let (code, v) = as_(&s, &mine, "GET", &p(&format!("/status/{victim}")), None).await;
    assert_eq!((code, &v["data"]["status"]), (200, &json!("BUSY")), "{v}");
    let batch = json!({"userIds": [victim, friend]});
    let (code, v) = as_(&s, &mine, "POST", &p("/status/batch"), Some(batch)).await;
    assert_eq!(code, 200, "{v}");
    // The caller's own writes work.
    let own = json!({"userId": me, "deviceId": "m1", "platform": "WEB"});
    assert_eq!(
        as_(&s, &mine, "POST", &p("/online"), Some(own)).await.0,
        200
    );

    // A service token may act for the victim, everywhere.
    let svc = service_token();
    for (method, path, body) in &writes {
        let (code, v) = as_(&s, &svc, method, path, body.clone()).await;
        assert_eq!(code, 200, "service: {method} {path}: {v}");
    }
    let after = s.status_of_as(&svc, victim).await;
    assert_eq!(
        after["customText"],
        Value::Null,
        "the service cleared the status: {after}"
    );
    let mut ws = Ws::open_request(
        with_bearer(ws_request(&s.base, victim, "svc"), &svc),
        "service socket",
    )
    .await;
    assert_eq!(ws.welcome["userId"], victim);
    ws.heartbeat().await;
    ws.close().await;
}

/// The socket's token: `refresh` before `exp` keeps it open past the first token's deadline;
/// a socket left to expire is closed with 4001; the upgrade needs the token's own user.
#[tokio::test(flavor = "multi_thread")]
async fn socket_refresh_and_expiry() {
    let s = node(&[
        ("PRESENCE_JWT_SECRET", SECRET),
        ("PRESENCE_WS_TOKEN_GRACE", "1s"),
    ]);
    let user = uid();
    let short = |secs: u64| {
        let mut c = claims(user);
        c["exp"] = json!(now() + secs);
        hs(&c)
    };
    // Expires at exp (2-3 s from now) plus 1 s of grace, and nothing refreshes it.
    let started = Instant::now();
    let mut lapsing = Ws::open_request(
        with_bearer(ws_request(&s.base, user, "lapsing"), &short(3)),
        "lapsing socket",
    )
    .await;
    // Refreshed 1 s in, with a token valid for a minute.
    let mut refreshed = Ws::open_request(
        with_bearer(ws_request(&s.base, user, "refreshed"), &short(3)),
        "refreshed socket",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = refreshed
        .request(json!({"type": "refresh", "token": short(60)}))
        .await;
    assert_eq!(r["type"], "reply", "refresh: {r}");
    assert_eq!(r["code"], 200, "refresh: {r}");

    let (at, code) = lapsing
        .wait_closed(Duration::from_secs(10))
        .await
        .expect("the lapsing socket closes");
    assert_eq!(code, Some(4001), "close code of an expired token");
    let after = at.duration_since(started);
    assert!(
        after >= Duration::from_millis(2500),
        "closed after {after:?}, before exp + grace"
    );
    // Well past the first token's deadline, the refreshed socket still answers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    refreshed.heartbeat().await;
    assert!(refreshed.closed.is_none());
    assert!(
        s.metric("presence_ws_connections").await >= 1.0,
        "the refreshed socket is still connected"
    );
    refreshed.close().await;
}

/// A refresh with an invalid token, or with another user's, closes the socket with 4401.
#[tokio::test(flavor = "multi_thread")]
async fn refused_refresh_closes_with_4401() {
    let s = node(&[("PRESENCE_JWT_SECRET", SECRET)]);
    let user = uid();
    for (what, token) in [
        ("garbage", "garbage".to_owned()),
        ("another user's token", user_token(uid())),
        (
            "expired",
            hs(&json!({"sub": user.to_string(), "aud": AUD, "iss": ISS, "exp": now() - 120})),
        ),
    ] {
        let mut ws = Ws::open_request(
            with_bearer(ws_request(&s.base, user, "d"), &user_token(user)),
            what,
        )
        .await;
        ws.send_json(&json!({"type": "refresh", "token": token}));
        let (_, code) = ws
            .wait_closed(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: the socket stays open"));
        assert_eq!(code, Some(4401), "{what}");
    }
}

/// Browsers send the token as the subprotocol `bearer.<jwt>` next to `presence.v1`; the server
/// answers `presence.v1`. The token's `sub` must be the socket's user.
#[tokio::test(flavor = "multi_thread")]
async fn subprotocol_token_and_the_socket_user() {
    let s = node(&[("PRESENCE_JWT_SECRET", SECRET)]);
    let user = uid();
    let mut req = ws_request(&s.base, user, "browser");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("presence.v1, bearer.{}", user_token(user))
            .parse()
            .unwrap(),
    );
    let mut ws = Ws::open_request(req, "browser socket").await;
    assert_eq!(ws.protocol.as_deref(), Some("presence.v1"));
    assert_eq!(ws.welcome["userId"], user);
    ws.heartbeat().await;
    ws.close().await;

    // Another user's token in the subprotocol: 403; no token at all: 401.
    let mut req = ws_request(&s.base, user, "browser");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("presence.v1, bearer.{}", user_token(uid()))
            .parse()
            .unwrap(),
    );
    let (code, v, _) = Ws::refused(req).await;
    assert_eq!(code, 403, "{v}");
    let (code, v, ch) = Ws::refused(ws_request(&s.base, user, "browser")).await;
    assert_401("socket without a token", code, &v, ch);
}

/// Without authentication nothing changes, and the mode is in the metrics; `jwt` without a key
/// source exits 64 naming the variable.
#[tokio::test(flavor = "multi_thread")]
async fn auth_none_and_bad_settings() {
    let s = Server::start_private(Topology::Memory, &[]);
    assert_eq!(s.metric(r#"presence_auth_mode{mode="none"}"#).await, 1.0);
    assert_eq!(s.metric(r#"presence_auth_mode{mode="jwt"}"#).await, 0.0);
    let user = uid();
    let (code, v) = s
        .post(
            &p("/online"),
            json!({"userId": user, "deviceId": "d", "platform": "WEB"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, stderr) =
        common::blocking(|| common::node::run_to_exit(&[("PRESENCE_AUTH", "jwt")]));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("PRESENCE_JWT_JWKS_URL"), "{stderr}");
}
