//! A TCP fault proxy for chaos scenarios: sits between two nodes (a gateway and a shard, say) on
//! loopback and injects, on command, added latency, a blackhole, resets, or a one-way stall.
//!
//! Every accepted connection is piped through two forwarding tasks (client→server and
//! server→client) that read the proxy's current [`Fault`] before every chunk, so a fault takes
//! effect on open connections at once, and healing resumes them.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything.
    None,
    /// Delays every chunk, both ways.
    Latency(Duration),
    /// Accepts connections and reads, but forwards nothing either way (a blackholed host).
    Blackhole,
    /// Closes every connection at once, and every new one as it arrives.
    Reset,
    /// Forwards client→server, holds server→client: the answers never come.
    StallReplies,
    /// Forwards server→client, holds client→server: requests never arrive.
    StallRequests,
}

/// A running proxy. Dropping it stops it and closes its connections.
pub struct Proxy {
    pub addr: String,
    fault: watch::Sender<Fault>,
    /// Where connections go; until set, they wait.
    upstream: watch::Sender<Option<String>>,
    stop: CancellationToken,
    accepted: Arc<Mutex<u64>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Proxy {
        let proxy = Proxy::bind().await;
        proxy.forward_to(upstream);
        proxy
    }

    /// Listens on a free loopback port; connections wait until [`Proxy::forward_to`] says where
    /// they go (so the proxy's address can be handed out before its upstream exists).
    pub async fn bind() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        Proxy::on(listener)
    }

    /// From now on, connections go to `upstream` (`host:port`).
    pub fn forward_to(&self, upstream: String) {
        self.upstream.send_replace(Some(upstream));
    }

    /// Forwards what `listener` accepts (see [`Proxy::forward_to`]).
    pub fn on(listener: TcpListener) -> Proxy {
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (upstream, _) = watch::channel(None);
        let (fault, _) = watch::channel(Fault::None);
        let stop = CancellationToken::new();
        let accepted = Arc::new(Mutex::new(0));
        let (f, s, a, u) = (
            fault.clone(),
            stop.clone(),
            accepted.clone(),
            upstream.clone(),
        );
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((client, _)) = conn else { continue };
                *a.lock() += 1;
                let _ = client.set_nodelay(true);
                tokio::spawn(pipe(client, u.subscribe(), f.subscribe(), s.child_token()));
            }
        });
        Proxy {
            addr,
            fault,
            upstream,
            stop,
            accepted,
        }
    }

    /// Injects `fault` from now on (on open connections too).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Back to forwarding everything.
    pub fn heal(&self) {
        self.set(Fault::None);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        *self.accepted.lock()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Closes `s` with a TCP reset (RST), not a FIN: what a reset connection sees. (`set_linger`
/// is deprecated for blocking on drop elsewhere; here the linger is 0: no block.)
#[allow(deprecated)]
fn reset(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn pipe(
    client: TcpStream,
    mut upstream: watch::Receiver<Option<String>>,
    fault: watch::Receiver<Fault>,
    stop: CancellationToken,
) {
    if *fault.borrow() == Fault::Reset {
        reset(&client);
        return;
    }
    let upstream = tokio::select! {
        _ = stop.cancelled() => return,
        u = upstream.wait_for(Option::is_some) => match u {
            Ok(u) => u.clone().expect("set"),
            Err(_) => return,
        },
    };
    let Ok(server) = TcpStream::connect(&upstream).await else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let conn = stop.child_token();
    let up = forward(cr, sw, fault.clone(), Direction::Requests, conn.clone());
    let down = forward(sr, cw, fault, Direction::Replies, conn.clone());
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
    conn.cancel();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Requests,
    Replies,
}

/// Whether `fault` holds traffic going in `dir`.
fn holds(fault: Fault, dir: Direction) -> bool {
    match fault {
        Fault::Blackhole => true,
        Fault::StallReplies => dir == Direction::Replies,
        Fault::StallRequests => dir == Direction::Requests,
        _ => false,
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    dir: Direction,
    conn: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = conn.cancelled() => return,
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => { conn.cancel(); return }
                Ok(n) => n,
            },
            // A reset closes open connections at once, whichever side is quiet.
            _ = fault.wait_for(|f| *f == Fault::Reset) => {
                reset(to.as_ref());
                conn.cancel();
                return;
            }
        };
        // Held traffic waits (unread bytes pile up in the socket buffers) until healed.
        loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::Reset => {
                    reset(to.as_ref());
                    conn.cancel();
                    return;
                }
                Fault::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                f if holds(f, dir) => {
                    tokio::select! {
                        _ = conn.cancelled() => return,
                        r = fault.changed() => if r.is_err() { return },
                    }
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            conn.cancel();
            return;
        }
    }
}
