//! Slow clients must not starve the others (issue 10): request bodies that never finish hold no
//! in-flight slot and get 408, headers that never finish and idle keep-alive connections are
//! closed. Self-contained: one in-process node on the embedded store, raw TCP clients.

use std::time::{Duration, Instant};

use presence_service::config::Config;
use presence_service::node::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Running {
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<presence_service::metrics::Metrics>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(vars: &[(&str, &str)]) -> Running {
    let mut all = vec![("PRESENCE_LISTEN", "127.0.0.1:0")];
    all.extend_from_slice(vars);
    let node = Node::builder(Config::from_vars(&all).expect("valid config"))
        .bind()
        .await
        .expect("node binds");
    let addr = node.local_addr();
    let metrics = node.metrics().clone();
    let stop = CancellationToken::new();
    tokio::spawn(node.run(stop.clone()));
    // Ready once /livez answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = request(addr, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await {
            break;
        }
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Running {
        addr,
        metrics,
        stop,
    }
}

/// One request on a fresh connection (closed after the answer): status code and body.
async fn request(addr: std::net::SocketAddr, raw: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let raw = raw.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
    s.write_all(raw.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

/// Reads whatever the server sends until it closes the connection (or `limit` passes): what it
/// sent, and how long it took.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            s.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(started.elapsed()),
                )
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

fn metric(m: &presence_service::metrics::Metrics, line_prefix: &str) -> f64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_bodies_hold_no_inflight_slot_and_get_408() {
    let body_timeout = Duration::from_millis(1500);
    let node = start(&[
        ("PRESENCE_MAX_INFLIGHT", "50"),
        ("PRESENCE_HTTP_BODY_TIMEOUT", "1500ms"),
    ])
    .await;

    // 60 clients (more than the 50 in-flight slots) send headers and half a body, then stall.
    let body = r#"{"userId":10001,"deviceId":"d1","platform":"WEB"}"#;
    let mut stalled = Vec::new();
    for _ in 0..60 {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        let head = format!(
            "POST /api/v1/presence/online HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body.as_bytes()[..body.len() / 2])
            .await
            .unwrap();
        stalled.push(s);
    }
    let stalled_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Everyone else is still served, at once.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let (code, text) = request(
            node.addr,
            "GET /api/v1/presence/statuses HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(code, 200, "GET /statuses beside 60 stalled bodies: {text}");
    }
    println!("GET /statuses beside 60 stalled bodies: 20/20 answered 200, slowest {worst:?}");
    assert!(worst < Duration::from_millis(500), "slowest {worst:?}");

    // Each stalled client gets a 408 envelope, then the connection is closed, once the body
    // timeout has passed.
    let mut last = Duration::ZERO;
    for s in &mut stalled {
        let left = (body_timeout + Duration::from_secs(2)).saturating_sub(stalled_at.elapsed());
        let (text, closed) = until_closed(s, left).await;
        assert!(
            closed.is_some(),
            "a stalled connection stayed open: {text:?}"
        );
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(r#""code":408"#), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        last = last.max(stalled_at.elapsed());
    }
    println!("60 stalled bodies: 60 answered 408 and closed, the last after {last:?}");
    assert!(
        last >= body_timeout - Duration::from_millis(100),
        "{last:?}"
    );
    assert_eq!(
        metric(
            &node.metrics,
            r#"presence_http_refusals_total{reason="body_timeout"}"#
        ),
        60.0
    );
    assert_eq!(
        metric(
            &node.metrics,
            r#"presence_http_refusals_total{reason="overloaded"}"#
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_idle_keep_alive_connections_closed() {
    let node = start(&[
        ("PRESENCE_HTTP_HEADER_TIMEOUT", "500ms"),
        ("PRESENCE_HTTP_IDLE_TIMEOUT", "2s"),
    ])
    .await;

    // Half a request line and nothing more; and a connection that sends nothing at all.
    let mut slow = TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(b"GET /api/v1/presence/statuses HTTP/1.1\r\nHost")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let ((_, slow_closed), (_, silent_closed)) = tokio::join!(
        until_closed(&mut slow, Duration::from_secs(3)),
        until_closed(&mut silent, Duration::from_secs(3))
    );
    println!("slow header closed after {slow_closed:?}, silent connection after {silent_closed:?}");
    for closed in [slow_closed, silent_closed] {
        let closed = closed.expect("closed within 3 s");
        assert!(
            closed >= Duration::from_millis(400) && closed < Duration::from_millis(1500),
            "{closed:?}"
        );
    }

    // A keep-alive connection that answered a request stays open past the header timeout (that
    // one counts from a request's first byte), serves another request, and is closed once idle
    // for the idle timeout.
    let mut ka = TcpStream::connect(node.addr).await.unwrap();
    let get = b"GET /api/v1/presence/statuses HTTP/1.1\r\nHost: x\r\n\r\n";
    for round in 0..2 {
        ka.write_all(get).await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(2), ka.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}: {text}");
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }
    let (_, idle_closed) = until_closed(&mut ka, Duration::from_secs(5)).await;
    println!("idle keep-alive connection closed after {idle_closed:?} (idle timeout 2s)");
    let idle_closed = idle_closed.expect("closed within 5 s");
    assert!(
        idle_closed >= Duration::from_millis(1800) && idle_closed < Duration::from_millis(3000),
        "{idle_closed:?}"
    );
    assert_eq!(
        metric(
            &node.metrics,
            r#"presence_http_refusals_total{reason="header_timeout"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &node.metrics,
            r#"presence_http_refusals_total{reason="idle_timeout"}"#
        ),
        1.0
    );
}
