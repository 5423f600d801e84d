//! Nacos discovery against a real Nacos-compatible server: `rnacos`, started on loopback by each
//! test through `scripts/nacos.sh` and stopped when the test ends, pass or fail.
//!
//! - Two shards, each with its own client (as two processes would have), register; a third
//!   client's `run` sees both; deregistering one removes it; a late watcher gets the list at once.
//! - A shard whose process is killed with `kill -9` leaves the members within seconds, because
//!   its gRPC connection closes.
//! - A shard process registers once it can take partitions: beside another member, after its
//!   start grace (`PRESENCE_HANDOFF_GRACE`); alone, at once.
//!
//! The watchers list the service only every 10 minutes here, so every change they see in time
//! came from a Nacos push.
//!
//! The tests that need rnacos are ignored by plain `cargo test`; `bash scripts/test.sh` installs
//! it (`scripts/nacos.sh install`, ~10 min the first time) and runs them. Run without it, they
//! fail, saying so: they never install it themselves.
//!
//! Environment: `PRESENCE_TEST_NACOS_PORT` (default 18848) is the HTTP port of the first test's
//! server; the others use that port + 10 and + 20 (each server also uses HTTP + 1000 and + 2000).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{self, Node};
use presence_service::membership::nacos::NacosDiscovery;
use presence_service::membership::{members, Discovery, Members};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nacos.sh");
const GROUP: &str = "presence-test";
/// So long that any change seen during a test came from a push, not from a periodic list.
const NO_RESYNC: Duration = Duration::from_secs(600);

fn init_logs() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// One rnacos server, stopped (`scripts/nacos.sh down`) on drop.
struct Nacos {
    addr: String,
    port: u16,
    dir: PathBuf,
}

impl Nacos {
    /// Starts a fresh server on the base port + `offset`; fails the test when it cannot.
    fn start(offset: u16) -> Nacos {
        init_logs();
        let base: u16 = std::env::var("PRESENCE_TEST_NACOS_PORT")
            .ok()
            .map(|p| {
                p.parse()
                    .expect("PRESENCE_TEST_NACOS_PORT is a port number")
            })
            .unwrap_or(18848);
        let port = base + offset;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".tmp")
            .join(format!("nacos-test-{port}"));
        let run = |cmd: &str| {
            let mut c = Command::new("bash");
            c.arg(SCRIPT)
                .arg(cmd)
                .env("PRESENCE_NACOS_PORT", port.to_string())
                .env("PRESENCE_NACOS_DIR", &dir)
                // Never a 10-minute build inside a test: `scripts/test.sh` installs it first.
                .env("PRESENCE_NACOS_INSTALL", "0")
                .stdin(Stdio::null())
                .stderr(Stdio::inherit());
            c.output()
        };
        // Start from nothing: no instance of an earlier run survives.
        let _ = run("down");
        let started = Instant::now();
        let why = match run("up") {
            Ok(out) if out.status.success() => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                match stdout.lines().last().map(str::trim) {
                    Some(addr) if addr == format!("127.0.0.1:{port}") => {
                        eprintln!(
                            "nacos: rnacos up at {addr} in {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                        return Nacos {
                            addr: addr.to_owned(),
                            port,
                            dir,
                        };
                    }
                    other => format!("unexpected last stdout line {other:?}"),
                }
            }
            Ok(out) => format!("`scripts/nacos.sh up` exited with {}", out.status),
            Err(e) => format!("cannot run bash {SCRIPT}: {e}"),
        };
        panic!(
            "this test needs rnacos (run it with `bash scripts/test.sh`, which installs it), and \
             it could not be started on port {port}: {why}. Run `bash scripts/nacos.sh up` to \
             see why (it installs rnacos with `cargo install rnacos --locked` when missing, ~10 \
             min)"
        );
    }

    /// A watcher of `service` that lists it only on a push.
    async fn watch(&self, service: &str) -> Watch {
        Watch::start(self.client(service).await.with_resync(NO_RESYNC))
    }

    async fn client(&self, service: &str) -> NacosDiscovery {
        NacosDiscovery::new(
            self.addr.clone(),
            String::new(),
            GROUP.into(),
            service.into(),
        )
        .await
        .unwrap_or_else(|e| panic!("nacos client for {}: {e}", self.addr))
    }
}

impl Drop for Nacos {
    fn drop(&mut self) {
        let status = Command::new("bash")
            .arg(SCRIPT)
            .arg("down")
            .env("PRESENCE_NACOS_PORT", self.port.to_string())
            .env("PRESENCE_NACOS_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "nacos: WARNING: `scripts/nacos.sh down` failed for port {}: {status:?}",
                self.port
            );
        }
    }
}

/// A service name unique to this test run.
fn unique_service(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "presence-shard-{test}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

/// A watcher's `run` on its own task, publishing into `rx`.
struct Watch {
    rx: watch::Receiver<Members>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(d: NacosDiscovery) -> Watch {
        let d = Arc::new(d);
        assert_eq!(d.kind(), "nacos");
        let (tx, rx) = watch::channel(members(Vec::new()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(d.run(tx, cancel.clone()));
        Watch { rx, cancel, task }
    }

    /// Waits until the members are exactly `want`; returns how long that took.
    async fn until(&mut self, want: &[&str], within: Duration, what: &str) -> Duration {
        let start = Instant::now();
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        loop {
            if *self.rx.borrow_and_update().as_slice() == *want {
                return start.elapsed();
            }
            let left = within.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!(
                    "{what}: the discovery task stopped; members {:?}",
                    *self.rx.borrow()
                ),
                Err(_) => panic!(
                    "{what}: members are {:?}, not {want:?}, after {within:?}",
                    *self.rx.borrow()
                ),
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("run returns soon after cancel")
            .expect("run does not panic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rnacos: bash scripts/test.sh"]
async fn registered_shards_are_members_and_deregistration_removes_them() {
    let nacos = Nacos::start(0);
    let service = unique_service("reg");
    let mut w = nacos.watch(&service).await;

    // Two shards, two clients (two connections), as two processes.
    let (a, b) = ("127.0.0.1:19001", "[::1]:19002");
    let shard_a = nacos.client(&service).await;
    let shard_b = nacos.client(&service).await;
    shard_a.register(a).await.expect("register a");
    shard_b.register(b).await.expect("register b");
    let took = w
        .until(&[a, b], Duration::from_secs(10), "both registered")
        .await;
    eprintln!("nacos: both shards seen after {took:?}");

    // Another service's instance (another deployment) never shows up.
    let other = nacos.client(&format!("{service}-other")).await;
    other
        .register("127.0.0.1:19009")
        .await
        .expect("register in the other service");

    // A watcher that starts now gets the current list from its first listing.
    let mut late = nacos.watch(&service).await;
    late.until(
        &[a, b],
        Duration::from_secs(5),
        "late watcher's initial list",
    )
    .await;

    shard_b.deregister(b).await.expect("deregister b");
    let took = w
        .until(&[a], Duration::from_secs(5), "b deregistered")
        .await;
    eprintln!("nacos: deregistration seen after {took:?}");
    late.until(
        &[a],
        Duration::from_secs(5),
        "b deregistered (late watcher)",
    )
    .await;

    // It comes back when it registers again.
    shard_b.register(b).await.expect("register b again");
    w.until(&[a, b], Duration::from_secs(5), "b back").await;

    // Bad addresses are refused before reaching the server.
    assert!(shard_a.register("::1:9004").await.is_err());
    assert!(shard_a.register("no-port").await.is_err());

    w.stop().await;
    late.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rnacos: bash scripts/test.sh"]
async fn a_shard_killed_with_sigkill_leaves_the_members() {
    let nacos = Nacos::start(10);
    let service = unique_service("kill");
    let mut w = nacos.watch(&service).await;

    let (survivor, victim) = ("127.0.0.1:19101", "127.0.0.1:19102");
    let stays = nacos.client(&service).await;
    stays
        .register(survivor)
        .await
        .expect("register the survivor");

    // The real binary as a shard with Nacos discovery: it registers `victim` once it serves
    // and, beside a member, once its start grace is over.
    w.until(
        &[survivor],
        Duration::from_secs(10),
        "the survivor registered",
    )
    .await;
    let (mut child, log, http) = spawn_shard(&nacos, &service, victim, "5s");
    let spawned = Instant::now();
    // Its HTTP port serves while it waits: alive, not ready, not a member.
    let get = |path: &'static str| {
        tokio::task::spawn_blocking(move || common::http::get_blocking(http, path))
    };
    while get("/livez").await.unwrap().map(|(s, _)| s) != Some(200) {
        assert!(
            spawned.elapsed() < Duration::from_secs(4),
            "/livez never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive = spawned.elapsed();
    let ready = get("/readyz").await.unwrap().map(|(s, _)| s);
    assert_eq!(
        ready,
        Some(503),
        "ready {alive:?} after its spawn, within its grace"
    );
    assert_eq!(
        *w.rx.borrow().as_slice(),
        [survivor.to_owned()],
        "registered within its grace"
    );
    w.until(
        &[survivor, victim],
        Duration::from_secs(60),
        "the shard process registered",
    )
    .await;
    let took = spawned.elapsed();
    eprintln!("nacos: a shard beside a member registered {took:?} after its spawn (grace 5 s)");
    assert!(
        took >= Duration::from_secs(5),
        "registered {took:?} after its spawn, within its start grace"
    );

    let status = child.kill();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child died of SIGKILL: {status:?}"
    );
    let took = w
        .until(&[survivor], Duration::from_secs(15), "child killed with -9")
        .await;
    eprintln!("nacos: killed shard gone from the members {took:?} after kill -9");

    w.stop().await;
    let _ = std::fs::remove_file(&log);
}

/// A cluster forms without waiting: the first shard, alone in its first list, registers at once,
/// not after its start grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rnacos: bash scripts/test.sh"]
async fn a_shard_alone_registers_without_waiting_for_its_start_grace() {
    let nacos = Nacos::start(20);
    let service = unique_service("alone");
    let mut w = nacos.watch(&service).await;
    let me = "127.0.0.1:19201";
    let (_child, log, _) = spawn_shard(&nacos, &service, me, "30s");
    let spawned = Instant::now();
    w.until(&[me], Duration::from_secs(60), "the lone shard registered")
        .await;
    let took = spawned.elapsed();
    eprintln!("nacos: a lone shard registered {took:?} after its spawn (grace 30 s)");
    assert!(
        took < Duration::from_secs(20),
        "registered {took:?} after its spawn: it waited for its grace"
    );
    w.stop().await;
    let _ = std::fs::remove_file(&log);
}

/// The real binary as a shard at `advertise` (also its gRPC address), with Nacos discovery of
/// `service` and start grace `grace`; its log and its HTTP port.
fn spawn_shard(nacos: &Nacos, service: &str, advertise: &str, grace: &str) -> (Node, PathBuf, u16) {
    let vars = node::vars(&[
        ("PRESENCE_ROLE", "shard"),
        ("PRESENCE_DISCOVERY", "nacos"),
        ("PRESENCE_NACOS_ADDR", &nacos.addr),
        ("PRESENCE_NACOS_GROUP", GROUP),
        ("PRESENCE_NACOS_SERVICE", service),
        ("PRESENCE_ADVERTISE", advertise),
        ("PRESENCE_GRPC_LISTEN", advertise),
        ("PRESENCE_HANDOFF_GRACE", grace),
    ]);
    let log = node::log_path("presence-nacos-shard");
    let http = node::free_ports(1)[0];
    (Node::spawn(&vars, http, &log), log, http)
}

#[tokio::test]
async fn connecting_to_no_server_fails_with_a_clear_error() {
    // A loopback port nobody listens on (nor on port + 1000, the gRPC port, with high odds).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let r = NacosDiscovery::new(
        addr.clone(),
        String::new(),
        GROUP.into(),
        "presence-shard".into(),
    )
    .await;
    let err = r.err().expect("no server: new fails");
    let msg = err.to_string();
    assert!(msg.contains("nacos") && msg.contains(&addr), "{msg}");
    eprintln!("nacos: no server: {msg} (after {:?})", start.elapsed());
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "took {:?}",
        start.elapsed()
    );
}
