//! The one test harness: starts nodes of presence-service, in this process (`Node::builder`)
//! or as child processes of the real binary, and talks HTTP and WebSocket to them.
//!
//! - [`node`]: one node, either way ([`node::Launch`]), and THE "start and wait until ready".
//! - [`cluster`]: shards and gateways on loopback, either way, started settled.
//! - [`server`]: what the HTTP suite talks to: a [`server::Topology`] behind one base URL.
//! - [`http`]: THE request-and-envelope helper, Prometheus text, plain-socket requests.
//! - [`ws`]: the WebSocket client.
//! - [`token`]: the test JWTs (user and service) and WebSocket requests carrying one.
//! - [`scenario`]: cluster scenarios under load, as lists of [`scenario::Step`]s.
//!
//! Tests that need an outside service are `#[ignore = "needs Redis Cluster: bash
//! scripts/test.sh"]` (or `"needs rnacos: ..."`): plain `cargo test` lists them as ignored, and
//! `scripts/test.sh` starts the services and runs them too (`--include-ignored`). Run without
//! their service, they fail, saying so ([`redis_url`]).

#![allow(dead_code, unused_imports, unused_macros)]

pub mod cluster;
pub mod history;
pub mod http;
pub mod node;
pub mod proxy;
pub mod redis_cluster;
pub mod scenario;
pub mod server;
pub mod token;
pub mod ws;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub use cluster::{Cluster, Proc};
pub use server::{Server, Topology};
pub use ws::Ws;

/// A user id unique to this call (and, with high probability, to this test run), so tests can
/// run in parallel and even share a store.
pub fn uid() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64;
        // Below 2^53 so every id is exact in any JSON reader; never 0.
        (nanos % 1_000_000_000_000) * 1000 + 1
    });
    base + COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs blocking harness work (starting a cluster, killing, waiting for processes) without
/// stalling the other tasks of a multi-threaded test runtime.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// The seed URLs of the shared Redis Cluster (`PRESENCE_TEST_REDIS_URL`, set by
/// `scripts/test.sh`). Without it the test fails, saying how to run it.
pub fn redis_url() -> String {
    presence_service::store::test_redis_urls().expect("test_redis_urls panics when unset")
}

/// A file of `tests/fixtures/tls` (the directory itself for `""`): the test certificates of
/// mTLS between nodes and of the TLS-only Redis Cluster.
pub fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A turn on the shared Redis Cluster, for one test of this binary at a time: every node fences,
/// in the store, the partitions it owns when it starts, so two nodes that own the same
/// partitions (two all-in-one nodes, or two clusters) must never run on it at once: the older
/// one's writes would be refused. A [`Server`] on it holds one while it runs; a
/// test that stops nodes on it and starts others holds one across ([`shared_redis`]). Turns are
/// counted per thread: the thread that holds one may take more.
pub struct Turn(());

impl Turn {
    /// Waits until no other thread holds a turn.
    pub fn take() -> Turn {
        let me = std::thread::current().id();
        let mut held = TURNS.lock().unwrap_or_else(|e| e.into_inner());
        while held.0.is_some_and(|holder| holder != me) {
            held = TURN_FREE.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.0 = Some(me);
        held.1 += 1;
        Turn(())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut held = TURNS.lock().unwrap_or_else(|e| e.into_inner());
        held.1 -= 1;
        if held.1 == 0 {
            held.0 = None;
            TURN_FREE.notify_all();
        }
    }
}

/// Who holds turns on the shared Redis Cluster, and how many.
static TURNS: std::sync::Mutex<(Option<std::thread::ThreadId>, usize)> =
    std::sync::Mutex::new((None, 0));
static TURN_FREE: std::sync::Condvar = std::sync::Condvar::new();

/// The shared Redis Cluster and a [`Turn`] on it.
pub struct SharedRedis {
    pub url: String,
    _turn: Turn,
}

/// Waits for a turn on the shared Redis Cluster (see [`Turn`]).
pub fn shared_redis() -> SharedRedis {
    let url = redis_url();
    SharedRedis {
        url,
        _turn: Turn::take(),
    }
}

/// Why a test is ignored by plain `cargo test`: it needs the Redis Cluster.
pub const NEEDS_REDIS: &str = "needs Redis Cluster: bash scripts/test.sh";

/// One test per topology for each HTTP test written once as `async fn name(t: Topology)` (or
/// `fn`, for `sync`): `memory::name`, `redis::name` and `cluster::name`. The memory topology
/// needs no outside service; the other two are ignored by plain `cargo test`.
#[macro_export]
macro_rules! per_topology {
    ($($kind:ident $name:ident),* $(,)?) => {
        mod memory {
            $( $crate::per_topology!(@test [] $kind $name Memory); )*
        }
        mod redis {
            $( $crate::per_topology!(
                @test [#[ignore = "needs Redis Cluster: bash scripts/test.sh"]] $kind $name Redis
            ); )*
        }
        mod cluster {
            $( $crate::per_topology!(
                @test [#[ignore = "needs Redis Cluster: bash scripts/test.sh"]] $kind $name Cluster
            ); )*
        }
    };
    (@test [$($attr:tt)*] async $name:ident $t:ident) => {
        #[tokio::test]
        $($attr)*
        async fn $name() {
            super::$name($crate::common::Topology::$t).await
        }
    };
    (@test [$($attr:tt)*] sync $name:ident $t:ident) => {
        #[test]
        $($attr)*
        fn $name() {
            super::$name($crate::common::Topology::$t)
        }
    };
}
