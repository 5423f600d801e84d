//! The HTTP server: HTTP/1.1 connections (and WebSocket upgrades) over the API router, with a
//! header timeout, an idle timeout between keep-alive requests, and graceful shutdown.
//!
//! Each connection runs in one task that also watches it: a request's headers must arrive
//! within the header timeout of its first byte (of the connection's start, for the first
//! request), and a connection with no request in progress and no bytes moving for the idle
//! timeout is closed. A request in progress is the handlers' business: they read the body
//! within the body timeout (see `api_request`) and every call they make has a deadline of its own.

use std::convert::Infallible;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::HttpBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{HttpRefusal, Metrics};

/// What [`serve`] serves: the API ([`crate::api::App`]) or a plain router (the metrics
/// listener's), answering every request (no error) with a body of type `B` ([`AppBody`]).
pub trait App<B>:
    tower::Service<
        axum::extract::Request,
        Response = axum::http::Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<A, B> App<B> for A where
    A: tower::Service<
            axum::extract::Request,
            Response = axum::http::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The body of an [`App`]'s answers, as hyper writes it from a connection's task.
pub trait AppBody:
    HttpBody<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

impl<B> AppBody for B where
    B: HttpBody<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

/// The connection-level limits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From a request's first byte to the end of its headers.
    pub header: Duration,
    /// Between requests on a keep-alive connection, with no bytes moving.
    pub idle: Duration,
    /// The kernel send buffer of every connection (`SO_SNDBUF`), in bytes; `None` leaves the
    /// kernel's autotuning (up to `net.ipv4.tcp_wmem`, often 4 MiB). A small buffer makes a
    /// socket that does not read back up into its queue, where it is cut as a slow consumer.
    pub send_buffer: Option<usize>,
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting, lets every connection
/// finish its request in progress (idle ones close at once), and returns when all are closed.
pub async fn serve<A, B>(
    listener: TcpListener,
    app: A,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    A: App<B>,
    B: AppBody,
{
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors, most likely: let connections close before retrying.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // No Nagle: answers are small and must not wait for more bytes.
        let _ = tcp.set_nodelay(true);
        if let Some(bytes) = timeouts.send_buffer {
            let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(bytes);
        }
        connections.spawn(connection(
            tcp,
            app.clone(),
            timeouts,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, is closed by a limit, or shuts down.
async fn connection<A, B>(
    tcp: TcpStream,
    app: A,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    A: App<B>,
    B: AppBody,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        io: tcp,
        activity: activity.clone(),
    });
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = Busy::begin(busy.clone());
        let app = app.clone();
        async move {
            let resp: Result<axum::http::Response<B>, Infallible> =
                tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await;
            drop(guard);
            resp
        }
    });
    let mut conn = pin!(hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades());
    let mut watchdog = pin!(tokio::time::sleep_until(activity.next_check(&timeouts)));
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut watchdog => match activity.check(&timeouts) {
                Ok(next) => watchdog.as_mut().reset(next),
                Err(reason) => {
                    metrics.http.refusals.get(reason).inc();
                    tracing::debug!(reason = reason.as_str(), "closing a connection");
                    // Dropping the connection closes the socket.
                    return;
                }
            },
        }
    }
}

/// No request is being read since: the connection's start for the first request, so that a
/// client that connects and sends nothing is cut off by the header timeout too.
const NONE: u64 = u64::MAX;

/// What a connection is doing, as its watchdog sees it. Every update happens on the connection's
/// own task (reads, writes and the service are all polled there), so relaxed atomics suffice.
struct Activity {
    start: Instant,
    /// Requests handed to the router and not yet answered.
    busy: AtomicU32,
    /// Milliseconds since `start` of the last byte read or written, or of the last answer.
    last_io: AtomicU64,
    /// Milliseconds since `start` of the first byte of a request whose headers are not complete
    /// yet; `NONE` between requests.
    head_from: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            busy: AtomicU32::new(0),
            last_io: AtomicU64::new(0),
            head_from: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.busy.load(Ordering::Relaxed) == 0 && self.head_from.load(Ordering::Relaxed) == NONE
        {
            self.head_from.store(now, Ordering::Relaxed);
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.last_io.store(self.now(), Ordering::Relaxed);
        }
    }

    /// When the watchdog should look next.
    fn next_check(&self, t: &Timeouts) -> Instant {
        self.check(t).unwrap_or_else(|_| Instant::now())
    }

    /// `Err` with the reason when a limit is exceeded, else when to check again.
    fn check(&self, t: &Timeouts) -> Result<Instant, HttpRefusal> {
        let now = self.now();
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Ok(self.at(now + t.header.min(t.idle).as_millis() as u64));
        }
        let head = self.head_from.load(Ordering::Relaxed);
        let (deadline, reason) = if head != NONE {
            (
                head + t.header.as_millis() as u64,
                HttpRefusal::HeaderTimeout,
            )
        } else {
            (
                self.last_io.load(Ordering::Relaxed) + t.idle.as_millis() as u64,
                HttpRefusal::IdleTimeout,
            )
        };
        if now >= deadline {
            Err(reason)
        } else {
            Ok(self.at(deadline))
        }
    }
}

/// A request in the router: the connection is neither reading headers nor idle meanwhile.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(a: Arc<Activity>) -> Busy {
        a.busy.fetch_add(1, Ordering::Relaxed);
        a.head_from.store(NONE, Ordering::Relaxed);
        Busy(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.busy.fetch_sub(1, Ordering::Relaxed);
        a.head_from.store(NONE, Ordering::Relaxed);
        a.last_io.store(a.now(), Ordering::Relaxed);
    }
}

/// A socket that reports its reads and writes to the connection's [`Activity`].
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timeouts {
        Timeouts {
            header: Duration::from_millis(100),
            idle: Duration::from_millis(1000),
            send_buffer: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_gets_the_header_timeout_then_idle_applies_between_requests() {
        let a = Arc::new(Activity::new());
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(a.check(&t()).is_ok());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(a.check(&t()), Err(HttpRefusal::HeaderTimeout));

        let a = Arc::new(Activity::new());
        a.read(10);
        let busy = Busy::begin(a.clone());
        // A request in progress is the handler's business: no limit here.
        tokio::time::advance(Duration::from_millis(5000)).await;
        assert!(a.check(&t()).is_ok());
        drop(busy);
        // Between requests: the idle timeout, not the header timeout.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(a.check(&t()).is_ok());
        a.wrote(1);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(a.check(&t()).is_ok());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(a.check(&t()), Err(HttpRefusal::IdleTimeout));

        // The first byte of the next request starts its header timeout.
        let a = Arc::new(Activity::new());
        drop(Busy::begin(a.clone()));
        tokio::time::advance(Duration::from_millis(300)).await;
        a.read(3);
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(a.check(&t()).is_ok());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(a.check(&t()), Err(HttpRefusal::HeaderTimeout));
    }
}
