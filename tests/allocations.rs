//! How many heap allocations a request costs the server: a regression test for the per-request
//! allocation cuts of issue 13 (docs/benchmarks.md, "One middleware per route"). This binary
//! counts every allocation of the process with a counting global allocator; the client is a
//! blocking TCP socket with its requests and buffer built beforehand, so what is counted while
//! it runs is the server's (plus a few of its background tasks: noise, not per request).
//!
//! Self-contained: one in-process node on the embedded store. `cargo test --test allocations`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Server, Topology};

/// The system allocator, counting allocations (and reallocations: each may move the block).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Most allocations a durable `POST /online` (a device changing platform: a visible change,
/// written to the store and published) may cost the server on the memory store: 47 when this
/// test was written, the same in every run (45 counted with mimalloc's probes in
/// docs/benchmarks.md, a release build); 112 before the one-middleware-per-route change.
const MAX_PER_ONLINE: f64 = 55.0;

/// Most allocations a `GET /status/{userId}` may cost: 40 when this test was written, 38 since
/// the viewer header is read alone (`api::ViewerHeader`) instead of through a copied `HeaderMap`.
const MAX_PER_STATUS: f64 = 48.0;

/// `POST /online` of `user`'s device on `platform`, keep-alive.
fn online_request(user: u64, platform: &str) -> Vec<u8> {
    let body = format!(r#"{{"userId":{user},"deviceId":"d1","platform":"{platform}"}}"#);
    format!(
        "POST /api/v1/presence/online HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn status_request(user: u64) -> Vec<u8> {
    format!("GET /api/v1/presence/status/{user} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

/// Sends `req` and reads one answer into `buf` without allocating; its status code.
fn exchange(conn: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> u16 {
    conn.write_all(req).expect("write");
    let mut have = 0;
    loop {
        let n = conn.read(&mut buf[have..]).expect("read");
        assert!(n > 0, "the server closed the connection");
        have += n;
        let Some(head_end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).expect("ASCII head");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("a Content-Length");
        if have >= head_end + 4 + length {
            assert_eq!(have, head_end + 4 + length, "one answer at a time");
            return head[9..12].parse().expect("a status code");
        }
    }
}

/// Allocations per request while `reqs` are sent `rounds` times in turn on one connection,
/// after one warm-up round.
fn allocations_per_request(base: &str, reqs: &[Vec<u8>], rounds: usize) -> f64 {
    let addr = base.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    let mut buf = vec![0u8; 64 * 1024];
    for r in reqs {
        assert_eq!(exchange(&mut conn, r, &mut buf), 200, "warm-up");
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..rounds {
        for r in reqs {
            let code = exchange(&mut conn, r, &mut buf);
            assert_eq!(code, 200);
        }
    }
    let n = (rounds * reqs.len()) as f64;
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n
}

#[test]
fn a_durable_change_and_a_status_read_allocate_within_their_budget() {
    let s = Server::start_private(Topology::Memory, &[]);
    // 50 users, each switching platform on every request: every request is a visible change.
    let users: Vec<u64> = (0..50).map(|_| common::uid()).collect();
    let onlines: Vec<Vec<u8>> = ["WEB", "IOS"]
        .iter()
        .flat_map(|p| users.iter().map(move |&u| online_request(u, p)))
        .collect();
    let per_online = allocations_per_request(&s.base, &onlines, 20);
    let statuses: Vec<Vec<u8>> = users.iter().map(|&u| status_request(u)).collect();
    let per_status = allocations_per_request(&s.base, &statuses, 20);
    println!("allocations per request: POST /online {per_online:.1}, GET /status {per_status:.1}");
    assert!(
        per_online <= MAX_PER_ONLINE,
        "POST /online: {per_online:.1} allocations a request (budget {MAX_PER_ONLINE})"
    );
    assert!(
        per_status <= MAX_PER_STATUS,
        "GET /status: {per_status:.1} allocations a request (budget {MAX_PER_STATUS})"
    );
    // The counter counts: a request cannot be served with none.
    assert!(per_online >= 1.0 && per_status >= 1.0);
}
