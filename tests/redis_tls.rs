//! The Redis store over TLS (`rediss://`, `PRESENCE_REDIS_TLS_*`) and with an ACL user
//! (`user:password@` in the URL, or `PRESENCE_REDIS_USERNAME` / `_PASSWORD`), against a
//! TLS-only Redis Cluster of the test's own ([`OwnRedis::start_tls`]: loopback ports 7950-7955
//! and their cluster bus ports, certificates of `tests/fixtures/tls`, client certificates
//! required). A node with the wrong CA, without a client certificate or with a wrong password
//! does not start, and its error names neither a Redis address nor Redis's own text.
//!
//! Ignored by plain `cargo test`; `bash scripts/test.sh` runs them (`--include-ignored`), and
//! without redis-server (installed by `scripts/redis-cluster.sh` when missing) they fail.

mod common;

use common::node::{self, Node};
use common::redis_cluster::{slot_of, OwnRedis};
use common::{blocking, tls_fixture, uid, Server, Topology};
use presence_service::store::redis::user_key;
use serde_json::json;

/// The first port of the TLS cluster (6 nodes: 7950-7955, bus ports 17950-17955).
const PORT: u16 = 7950;

/// One TLS cluster at a time on those ports.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start_cluster() -> OwnRedis {
    let dir = std::env::temp_dir().join(format!("presence-redis-tls-{}", std::process::id()));
    blocking(|| OwnRedis::start_tls(PORT, &dir.display().to_string()))
}

/// `PRESENCE_REDIS_TLS_*` with the fixtures: the CA `ca`, and `node.pem` as client certificate
/// when `client_cert`.
fn tls_vars(ca: &str, client_cert: bool) -> Vec<(String, String)> {
    let mut files = vec![("PRESENCE_REDIS_TLS_CA", ca)];
    if client_cert {
        files.push(("PRESENCE_REDIS_TLS_CERT", "node.pem"));
        files.push(("PRESENCE_REDIS_TLS_KEY", "node.key"));
    }
    files
        .into_iter()
        .map(|(k, f)| (k.to_owned(), tls_fixture(f).display().to_string()))
        .collect()
}

/// Starts an all-in-one node on the cluster with `vars` and `url`: its start-up error if it
/// does not start.
fn refused(vars: &[(String, String)], url: &str) -> String {
    let mut vars = vars.to_vec();
    vars.push(("PRESENCE_REDIS_URL".into(), url.into()));
    vars.push(("PRESENCE_REDIS_TIMEOUT".into(), "1s".into()));
    match blocking(|| Node::in_process(&vars, 0, None)) {
        Ok(_) => panic!("a node started with {url} and {vars:?}"),
        Err(e) => e,
    }
}

/// The start-up error says the store is unreachable and nothing of Redis or its addresses.
fn assert_no_leak(e: &str) {
    assert!(e.contains("cannot read the redis cluster topology"), "{e}");
    for leak in [
        "127.0.0.1",
        "795",
        "certificate",
        "Unknown",
        "WRONGPASS",
        "AUTH",
        "tls",
    ] {
        assert!(!e.contains(leak), "{leak:?} leaks: {e}");
    }
}

/// A node that writes `users` online and reads them back through the API; the records are in
/// the TLS cluster, on their masters.
async fn writes_and_reads(redis: &OwnRedis, vars: &[(String, String)], url: &str) {
    let mut envs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    envs.push(("PRESENCE_REDIS_URL", url));
    envs.push(("PRESENCE_REDIS_MIN_REPLICAS", "1"));
    let s = blocking(|| Server::start(Topology::Redis, &envs));
    // Enough users for every master (learnt from CLUSTER SLOTS, dialled over TLS) to hold some.
    let users: Vec<u64> = (0..24).map(|_| uid()).collect();
    for &user in &users {
        let (code, v) = s
            .post(
                "/api/v1/presence/online",
                json!({"userId": user, "deviceId": "d", "platform": "WEB"}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
    }
    for &user in &users {
        assert_eq!(s.status_of(user).await["status"], "ONLINE");
    }
    let masters = blocking(|| redis.masters());
    assert_eq!(masters.len(), 3, "{masters:?}");
    for m in &masters {
        assert!(
            users.iter().any(|&u| m.serves(slot_of(u))),
            "no user on {m:?}"
        );
    }
    for &user in &users {
        let m = masters.iter().find(|m| m.serves(slot_of(user))).unwrap();
        let exists = blocking(|| redis.cli(m.port, &["EXISTS", &user_key(user)]));
        assert_eq!(exists.trim(), "1", "user {user} not on port {}", m.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server with TLS: bash scripts/test.sh"]
async fn a_node_uses_a_tls_only_cluster_with_its_ca_and_client_certificate() {
    let _turn = CLUSTER.lock().await;
    let redis = start_cluster();
    writes_and_reads(&redis, &tls_vars("ca.pem", true), &redis.urls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server with TLS: bash scripts/test.sh"]
async fn a_wrong_ca_or_no_client_certificate_keeps_a_node_from_starting() {
    let _turn = CLUSTER.lock().await;
    let redis = start_cluster();
    // The nodes' certificates are not from this CA.
    assert_no_leak(&refused(&tls_vars("rogue-ca.pem", true), &redis.urls));
    // The system's roots do not know the test CA either.
    assert_no_leak(&refused(&[], &redis.urls));
    // The nodes require a client certificate.
    assert_no_leak(&refused(&tls_vars("ca.pem", false), &redis.urls));
    // Plaintext to a TLS port.
    let plain = redis.urls.replace("rediss://", "redis://");
    assert_no_leak(&refused(&[], &plain));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server with TLS: bash scripts/test.sh"]
async fn an_acl_user_reaches_the_cluster_with_its_password_only() {
    let _turn = CLUSTER.lock().await;
    let redis = start_cluster();
    for port in redis.ports() {
        let ok = blocking(|| {
            redis.cli(
                port,
                &[
                    "ACL", "SETUSER", "presence", "on", ">s3cret", "~*", "&*", "+@all",
                ],
            )
        });
        assert_eq!(ok.trim(), "OK", "ACL SETUSER on {port}");
    }
    let tls = tls_vars("ca.pem", true);
    let with = |auth: &str| {
        redis
            .urls
            .replace("rediss://", &format!("rediss://{auth}@"))
    };
    // In the URL.
    writes_and_reads(&redis, &tls, &with("presence:s3cret")).await;
    // From the environment (a Secret), the URL without credentials.
    let mut env = tls.clone();
    env.extend(node::vars(&[
        ("PRESENCE_REDIS_USERNAME", "presence"),
        ("PRESENCE_REDIS_PASSWORD", "s3cret"),
    ]));
    writes_and_reads(&redis, &env, &redis.urls).await;
    // A wrong password, either way.
    assert_no_leak(&refused(&tls, &with("presence:wrong")));
    let mut env = tls.clone();
    env.extend(node::vars(&[
        ("PRESENCE_REDIS_USERNAME", "presence"),
        ("PRESENCE_REDIS_PASSWORD", "wrong"),
    ]));
    assert_no_leak(&refused(&env, &redis.urls));
}
