//! The Redis Cluster store for real: restarts with `kill -9`, a master killed under load, keys
//! expiring when every process is gone, and what a heartbeat and a batch cost in Redis.
//!
//! Every test needs the shared Redis Cluster (`bash scripts/test.sh` starts it and sets
//! `PRESENCE_TEST_REDIS_URL`). The failover test starts a cluster of its own, on other ports,
//! because it kills a master. Processes are killed in the first two tests: there the node is a
//! child process; elsewhere it runs in this process.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::sample_sum;
use common::{redis_url, shared_redis, uid, Server, Topology};
use presence_service::store::redis::user_key;
use serde_json::{json, Value};

const ONLINE: &str = "/api/v1/presence/online";
const OFFLINE: &str = "/api/v1/presence/offline";
const HEARTBEAT: &str = "/api/v1/presence/heartbeat";
const BATCH: &str = "/api/v1/presence/status/batch";

fn first_port(urls: &str) -> u16 {
    let first = urls.split(',').next().expect("a node");
    first
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a port")
}

/// `redis-cli -c` against the cluster.
fn redis_cli(urls: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-c", "-h", "127.0.0.1", "-p", &first_port(urls).to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (installed by scripts/redis-cluster.sh)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn online(s: &Server, user: u64, device: &str) -> Value {
    let (code, v) = s
        .post(
            ONLINE,
            json!({"userId": user, "deviceId": device, "platform": "IOS"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    v["data"].clone()
}

async fn heartbeat(s: &Server, user: u64, device: &str) -> u16 {
    s.post(HEARTBEAT, json!({"userId": user, "deviceId": device}))
        .await
        .0
}

async fn metric_sum(s: &Server, prefix: &str) -> f64 {
    let (_, _, text) = s.text("/metrics").await;
    sample_sum(&text, prefix, &[])
}

#[tokio::test]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn kill_9_and_restart_loses_nothing_and_times_out_the_silent() {
    let _redis = shared_redis();
    let envs = [
        ("PRESENCE_HEARTBEAT_INTERVAL", "500ms"),
        ("PRESENCE_HEARTBEAT_TIMEOUT", "3s"),
    ];
    let (a, b, c) = (uid(), uid(), uid());
    let server = Server::start_process(Topology::Redis, &envs);
    online(&server, a, "phone").await;
    online(&server, a, "laptop").await;
    let (code, _) = server
        .put(
            &format!("/api/v1/presence/status/{a}"),
            json!({"status": "BUSY", "customText": "会议中"}),
        )
        .await;
    assert_eq!(code, 200);
    online(&server, b, "silent").await;
    online(&server, c, "gone").await;
    assert_eq!(
        server
            .post(OFFLINE, json!({"userId": c, "deviceId": "gone"}))
            .await
            .0,
        200
    );
    let before_a = server.status_of(a).await;
    let before_c = server.status_of(c).await;

    drop(server); // SIGKILL: no drain, no flush
    let server = Server::start_process(Topology::Redis, &envs);
    let restarted = Instant::now();

    let after_a = server.status_of(a).await;
    assert_eq!(
        after_a, before_a,
        "a's status, devices, text and version survive kill -9"
    );
    assert_eq!(
        server.status_of(c).await,
        before_c,
        "lastActiveTime survives"
    );
    assert_eq!(server.status_of(b).await["status"], "ONLINE", "b reloaded");
    assert!(server.metric("presence_recovered_users_total").await >= 2.0);

    // a keeps heartbeating, b does not: b goes OFFLINE no earlier than reload + timeout and
    // no later than timeout + 2 s after the restart; a stays BUSY throughout.
    let mut b_offline_at = None;
    while restarted.elapsed() < Duration::from_secs(6) {
        assert_eq!(heartbeat(&server, a, "phone").await, 200);
        assert_eq!(heartbeat(&server, a, "laptop").await, 200);
        let st = server.status_of(b).await;
        if st["status"] == "OFFLINE" && b_offline_at.is_none() {
            b_offline_at = Some(restarted.elapsed());
        }
        assert_eq!(server.status_of(a).await["status"], "BUSY");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let at = b_offline_at.expect("b went offline");
    assert!(
        at >= Duration::from_millis(2_500),
        "b went offline too early: {at:?}"
    );
    assert!(
        at <= Duration::from_secs(5),
        "b went offline too late: {at:?}"
    );
}

#[tokio::test]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn live_keys_are_refreshed_and_expire_when_every_process_is_gone() {
    let redis = shared_redis();
    let url = &redis.url;
    // live TTL = timeout 2 s + 1.5 x refresh 2 s + 5 s = 10 s
    let envs = [
        ("PRESENCE_HEARTBEAT_INTERVAL", "500ms"),
        ("PRESENCE_HEARTBEAT_TIMEOUT", "2s"),
        ("PRESENCE_REDIS_REFRESH", "2s"),
        ("PRESENCE_STATUS_RATE", "off"),
    ];
    let user = uid();
    let key = user_key(user);
    let server = Server::start_process(Topology::Redis, &envs);
    online(&server, user, "d").await;
    let ttl: i64 = redis_cli(url, &["PTTL", &key])
        .parse()
        .expect("PTTL answers a number");
    assert!(ttl > 8_500 && ttl <= 10_000, "live ttl {ttl}");
    // Heartbeat and change status (more often than the refresh) past the first TTL: the
    // write-behind refresh keeps the key. A change of a user who stays live does not extend
    // the TTL, so the refresh must come for users who change often too.
    let start = Instant::now();
    let statuses = ["AWAY", "BUSY"];
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(12) {
        // Checked before this round's writes: an expired record would be written again by
        // them, hiding the gap.
        let ttl: i64 = redis_cli(url, &["PTTL", &key]).parse().unwrap_or(-2);
        assert!(
            ttl > 0,
            "the live user's record expired after {:?}",
            start.elapsed()
        );
        assert_eq!(heartbeat(&server, user, "d").await, 200);
        let (code, _) = server
            .put(
                &format!("/api/v1/presence/status/{user}"),
                json!({"status": statuses[i % 2]}),
            )
            .await;
        assert_eq!(code, 200);
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        redis_cli(url, &["EXISTS", &key]),
        "1",
        "refreshed while live"
    );
    drop(server); // SIGKILL: every process is gone
    let gone = Instant::now();
    assert_eq!(redis_cli(url, &["EXISTS", &key]), "1");
    loop {
        if redis_cli(url, &["EXISTS", &key]) == "0" {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(12),
            "key outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn a_heartbeat_that_changes_nothing_costs_no_redis_command() {
    let _redis = shared_redis();
    let server = Server::start(Topology::Redis, &[]);
    let users: Vec<u64> = (0..100).map(|_| uid()).collect();
    for &u in &users {
        online(&server, u, "d").await;
    }
    let before = metric_sum(&server, "presence_redis_commands_total").await;
    for _ in 0..5 {
        for &u in &users {
            assert_eq!(heartbeat(&server, u, "d").await, 200);
        }
    }
    let after = metric_sum(&server, "presence_redis_commands_total").await;
    assert_eq!(after - before, 0.0, "500 heartbeats sent Redis commands");
    // A visible change does: one script per change.
    let (code, _) = server
        .put(
            &format!("/api/v1/presence/status/{}", users[0]),
            json!({"status": "AWAY"}),
        )
        .await;
    assert_eq!(code, 200);
    let changed = metric_sum(&server, "presence_redis_commands_total").await;
    assert_eq!(changed - after, 1.0);
}

#[tokio::test]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn a_batch_of_1000_costs_one_round_trip_per_node() {
    let redis = shared_redis();
    let url = &redis.url;
    let stored: Vec<u64> = (0..300).map(|_| uid()).collect();
    let server = Server::start(Topology::Redis, &[]);
    for &u in &stored {
        online(&server, u, "d").await;
        assert_eq!(
            server
                .post(OFFLINE, json!({"userId": u, "deviceId": "d"}))
                .await
                .0,
            200
        );
    }
    drop(server);
    // A fresh node holds none of them in memory: every id is a store read.
    let server = Server::start(Topology::Redis, &[]);
    let mut ids = stored.clone();
    ids.extend((0..700).map(|_| uid()));
    let trips = "presence_redis_round_trips_total{op=\"load\"}";
    let cmds = "presence_redis_commands_total{op=\"load\"}";
    let (t0, c0) = (
        metric_sum(&server, trips).await,
        metric_sum(&server, cmds).await,
    );
    let (code, v) = server.post(BATCH, json!({ "userIds": ids })).await;
    assert_eq!(code, 200, "{v}");
    let (t1, c1) = (
        metric_sum(&server, trips).await,
        metric_sum(&server, cmds).await,
    );
    let data = v["data"].as_array().expect("a list");
    assert_eq!(data.len(), 1000);
    for (entry, id) in data.iter().zip(&ids) {
        assert_eq!(entry["userId"], *id);
        assert_eq!(entry["status"], "OFFLINE");
    }
    assert!(
        data[..300].iter().all(|e| e["lastActiveTime"].is_string()),
        "stored users keep lastActiveTime"
    );
    assert!(data[300..].iter().all(|e| e["lastActiveTime"].is_null()));
    let masters = redis_cli(url, &["CLUSTER", "INFO"])
        .lines()
        .find_map(|l| l.strip_prefix("cluster_size:")?.trim().parse::<f64>().ok())
        .expect("cluster_size");
    assert_eq!(t1 - t0, masters, "one pipeline per master node");
    assert_eq!(c1 - c0, 1000.0);
}

/// A first port from 7400 up with it and the next five, and their cluster bus ports (+ 10000),
/// free now (other clusters may run on this machine).
/// `PRESENCE_TEST_OWN_REDIS_BASE_PORT` names the one first port to use instead (for a machine
/// where ports from 7400 up belong to others).
fn free_base_port() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    if let Ok(b) = std::env::var("PRESENCE_TEST_OWN_REDIS_BASE_PORT") {
        let b: u16 = b
            .parse()
            .expect("PRESENCE_TEST_OWN_REDIS_BASE_PORT: a port");
        assert!(
            (b..b + 6).all(|p| free(p) && free(p + 10_000)),
            "PRESENCE_TEST_OWN_REDIS_BASE_PORT={b}: ports {b}..{} or their bus ports are taken",
            b + 5
        );
        return b;
    }
    (7400..7900)
        .step_by(10)
        .find(|&b| (b..b + 6).all(|p| free(p) && free(p + 10_000)))
        .expect("six free ports for a Redis Cluster")
}

/// A cluster of this test's own, stopped on drop.
struct OwnCluster {
    dir: PathBuf,
    port: u16,
    urls: String,
}

impl OwnCluster {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster.sh")
    }

    fn run(&self, action: &str) -> String {
        let out = Command::new("bash")
            .arg(Self::script())
            .arg(action)
            .env("PRESENCE_REDIS_DIR", &self.dir)
            .env("PRESENCE_REDIS_BASE_PORT", self.port.to_string())
            .output()
            .expect("running scripts/redis-cluster.sh");
        assert!(
            out.status.success() || action != "up",
            "redis-cluster.sh {action} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_owned()
    }

    fn start(port: u16, name: &str) -> OwnCluster {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".tmp")
            .join(name);
        let mut c = OwnCluster {
            dir,
            port,
            urls: String::new(),
        };
        c.urls = c.run("up");
        assert!(c.urls.starts_with("redis://"), "no urls: {}", c.urls);
        c
    }

    fn pid_of(&self, port: u16) -> u32 {
        let f = self.dir.join(port.to_string()).join("redis.pid");
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .expect("a pid")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.run("down");
    }
}

#[tokio::test]
#[ignore = "needs Redis Cluster: bash scripts/test.sh"]
async fn a_master_killed_under_load_loses_no_acknowledged_write() {
    redis_url(); // the same rule as the other Redis tests: only with `bash scripts/test.sh`
    let port = free_base_port();
    let cluster = OwnCluster::start(port, "rc-failover");
    let role = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ROLE"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&role.stdout).starts_with("master"));
    let envs = [
        ("PRESENCE_REDIS_URL", cluster.urls.as_str()),
        ("PRESENCE_REDIS_TIMEOUT", "6s"),
        // Each writer changes its user's status as fast as it can: no rate limit here.
        ("PRESENCE_STATUS_RATE", "off"),
    ];
    let server = std::sync::Arc::new(Server::start(Topology::Redis, &envs));

    let run_for = Duration::from_secs(8);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..12 {
        let server = server.clone();
        let user = uid();
        workers.push(tokio::spawn(async move {
            // (text, version) of every acknowledged write, in order.
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut unavailable = 0;
            let mut n = 0;
            while started.elapsed() < run_for {
                n += 1;
                let text = format!("w{n}");
                let (code, v) = server
                    .put(
                        &format!("/api/v1/presence/status/{user}"),
                        json!({"status": "BUSY", "customText": text}),
                    )
                    .await;
                match code {
                    200 => {
                        assert_eq!(
                            v["data"]["customText"],
                            text.as_str(),
                            "a wrong answer: {v}"
                        );
                        acked.push((text, v["data"]["version"].as_u64().unwrap()));
                    }
                    503 => unavailable += 1,
                    other => panic!("unexpected {other}: {v}"),
                }
            }
            (user, acked, unavailable)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let master = cluster.pid_of(port);
    assert!(Command::new("kill")
        .args(["-9", &master.to_string()])
        .status()
        .unwrap()
        .success());
    let mut results = Vec::new();
    for w in workers {
        results.push(w.await.expect("worker"));
    }
    let total: usize = results.iter().map(|r| r.1.len()).sum();
    let failed: usize = results.iter().map(|r| r.2).sum();
    assert!(total > 100, "too few writes acknowledged: {total}");
    eprintln!("failover: {total} writes acknowledged, {failed} answered 503");

    // What Redis holds, read by a fresh node (nothing in memory).
    drop(server);
    let server = Server::start(Topology::Redis, &envs);
    for (user, acked, _) in &results {
        let Some((text, version)) = acked.last() else {
            continue;
        };
        let st = server.status_of(*user).await;
        let stored = st["version"].as_u64().unwrap();
        assert!(
            stored >= *version,
            "user {user}: acknowledged v{version} but Redis has v{stored}"
        );
        if stored == *version {
            assert_eq!(st["customText"], text.as_str());
        }
    }

    // The store unreachable: not ready.
    cluster.run("down");
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _) = server.get("/readyz").await;
        if code == 503 {
            break;
        }
        assert!(
            Instant::now() < until,
            "/readyz still 200 with the cluster down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
