//! Talking HTTP to a node: the one request-and-envelope helper ([`request`]), what it is built
//! on ([`send`]), the envelope check, Prometheus text, and plain-socket requests for what
//! `reqwest` cannot send (chunked bodies, two requests on one connection) or for blocking code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// An HTTP client for tests: 20 s timeout, no proxy. `pooled: false` opens a connection per
/// request, so a connection the server closed (after an early rejection) never poisons a pool.
pub fn client(pooled: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy();
    let b = if pooled {
        b.pool_max_idle_per_host(512)
    } else {
        b.pool_max_idle_per_host(0)
    };
    b.build().expect("http client")
}

/// A method by name (`"GET"`, `"PATCH"`, ...).
pub fn method(name: &str) -> reqwest::Method {
    reqwest::Method::from_bytes(name.as_bytes()).expect("valid method")
}

/// One answer: status, Content-Type, `WWW-Authenticate`, body text.
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub www_authenticate: Option<String>,
    pub body: String,
}

/// Sends `req` and reads the whole answer; panics (naming the request) when it fails.
pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let (client, req) = req.build_split();
    let req = req.expect("a valid request");
    let what = format!("{} {}", req.method(), req.url());
    let resp = client
        .execute(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {e:?}"));
    let status = resp.status().as_u16();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let www_authenticate = header(reqwest::header::WWW_AUTHENTICATE);
    let body = resp
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e}"));
    Answer {
        status,
        content_type,
        www_authenticate,
        body,
    }
}

/// `method base+path` with an optional Content-Type and body bytes; the answer, unchecked.
pub async fn send_bytes(
    client: &reqwest::Client,
    method_name: &str,
    base: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Answer {
    let mut req = client.request(method(method_name), format!("{base}{path}"));
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    send(req).await
}

/// THE request helper: `method base+path` with an optional JSON body. The answer must be the
/// envelope (see [`assert_envelope`]); returns the status and the whole envelope.
pub async fn request(
    client: &reqwest::Client,
    base: &str,
    method_name: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let (status, v, _) = request_as(client, base, method_name, path, body, None).await;
    (status, v)
}

/// [`request`] with `Authorization: Bearer <token>` when `token` is given; also returns the
/// answer's `WWW-Authenticate`.
pub async fn request_as(
    client: &reqwest::Client,
    base: &str,
    method_name: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, Value, Option<String>) {
    request_with(client, base, method_name, path, body, token, &[]).await
}

/// [`request_as`] with extra request headers.
pub async fn request_with(
    client: &reqwest::Client,
    base: &str,
    method_name: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value, Option<String>) {
    let mut req = client.request(method(method_name), format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(b).expect("serializable"));
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let a = send(req).await;
    let v = assert_envelope(
        method_name,
        path,
        a.status,
        a.content_type.as_deref(),
        &a.body,
    );
    (a.status, v, a.www_authenticate)
}

/// [`request`] with a client of its own, for tests that hold only a base URL.
pub async fn rest(base: &str, method_name: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    request(&client(false), base, method_name, path, body.as_ref()).await
}

/// The value of `series` in the `/metrics` of the node at `base`; 0 when it has none.
pub async fn metric(base: &str, series: &str) -> f64 {
    let a = send_bytes(&client(false), "GET", base, "/metrics", None, None).await;
    assert_eq!(a.status, 200, "GET {base}/metrics");
    metric_value(&a.body, series).unwrap_or(0.0)
}

/// Checks that `text` is the envelope: a JSON object with exactly `code` (equal to the HTTP
/// status), `message` (a string) and `data`, served as JSON; `data` is null on every error.
pub fn assert_envelope(
    method: &str,
    path: &str,
    status: u16,
    content_type: Option<&str>,
    text: &str,
) -> Value {
    let what = format!("{method} {path} -> {status}");
    let v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text:?}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: body is not an object: {text}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["code", "data", "message"],
        "{what}: envelope keys: {text}"
    );
    assert_eq!(
        obj["code"].as_u64(),
        Some(status as u64),
        "{what}: code != status: {text}"
    );
    let message = obj["message"].as_str();
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{what}: message: {text}"
    );
    if status != 200 {
        assert!(obj["data"].is_null(), "{what}: error with data: {text}");
    }
    let ct = content_type.unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?}: {text}"
    );
    v
}

// ---------------------------------------------------------------------------------------------
// Prometheus text

/// The value of an unlabelled metric, or of the sample whose line starts with `series` (e.g.
/// `presence_heartbeats_total{result="ok"}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The sum of every sample whose line starts with `prefix` and contains each of `labels`
/// (e.g. `route="/livez"`).
pub fn sample_sum(text: &str, prefix: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The exposition of several processes as one: every sample of a series summed, in the order
/// series were first seen, under the `# HELP` and `# TYPE` lines of their family.
pub fn merge_expositions(texts: &[String]) -> String {
    struct Family {
        header: Vec<String>,
        order: Vec<String>,
        sums: std::collections::HashMap<String, f64>,
    }
    let mut families: Vec<Family> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split_whitespace().next().unwrap_or("").to_owned();
                let i = *index.entry(name).or_insert_with(|| {
                    families.push(Family {
                        header: Vec::new(),
                        order: Vec::new(),
                        sums: Default::default(),
                    });
                    families.len() - 1
                });
                let f = &mut families[i];
                if !f.header.iter().any(|h| h == line) {
                    f.header.push(line.to_owned());
                }
                current = Some(i);
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (Some(i), Ok(value)) = (current, value.parse::<f64>()) else {
                continue;
            };
            let f = &mut families[i];
            match f.sums.get_mut(series) {
                Some(sum) => *sum += value,
                None => {
                    f.order.push(series.to_owned());
                    f.sums.insert(series.to_owned(), value);
                }
            }
        }
    }
    let mut out = String::new();
    for f in families {
        for h in &f.header {
            out.push_str(h);
            out.push('\n');
        }
        for series in &f.order {
            let v = f.sums[series];
            if v.fract() == 0.0 && v.abs() < 1e15 {
                out.push_str(&format!("{series} {}\n", v as i64));
            } else {
                out.push_str(&format!("{series} {v}\n"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Plain sockets

/// A header's value in an HTTP/1.1 head (status line first).
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Splits a whole HTTP/1.1 answer (read to the end) into status, head and decoded body.
fn parse_answer(text: &str) -> Option<(u16, String, String)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, head.to_owned(), body))
}

/// Writes `request` (a whole HTTP/1.1 request, which should say `Connection: close`) to a
/// plain socket at `addr` (`host:port`) and checks that the answer is the envelope: for what
/// `reqwest` cannot send, such as a chunked body. Returns the status and the body text.
pub fn raw_socket(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("socket timeout");
    // The server may answer (and close) before reading everything: ignore write errors.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (status, head, body) =
        parse_answer(&text).unwrap_or_else(|| panic!("no answer or a bad one: {text:?}"));
    let ct = header(&head, "content-type");
    assert_envelope("RAW", "(socket)", status, ct.as_deref(), &body);
    (status, body)
}

/// Sends `first` on a fresh connection to `addr` and reads its answer (which must be the
/// envelope); waits a moment, then sends `second` on the same connection. Returns the first
/// answer's status and head, and the second's status or what went wrong.
pub fn two_on_one_connection(
    addr: &str,
    first: &[u8],
    second: &[u8],
) -> ((u16, String), Result<u16, String>) {
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("socket timeout");
    let _ = s.write_all(first);
    let (status, head, body) = read_response(&mut s).expect("an answer to the first request");
    let ct = header(&head, "content-type");
    assert_envelope("RAW", "(socket)", status, ct.as_deref(), &body);
    std::thread::sleep(Duration::from_millis(200));
    let second = match s.write_all(second) {
        Err(e) => Err(format!("writing the second request: {e}")),
        Ok(()) => read_response(&mut s).map(|(code, _, _)| code),
    };
    ((status, head), second)
}

/// Reads one HTTP/1.1 response with a Content-Length body: status, head, body.
fn read_response(s: &mut TcpStream) -> Result<(u16, String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let split = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("connection closed after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut body = buf[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        match s.read(&mut chunk) {
            Ok(0) => return Err("connection closed inside the body".into()),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET path` on loopback `port` over a plain socket (no pool, `Connection: close`), blocking:
/// status and body; `None` when nothing answered.
pub fn get_blocking(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let (status, _, body) = parse_answer(&String::from_utf8_lossy(&buf))?;
    Some((status, body))
}
