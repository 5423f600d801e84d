//! `KubernetesDiscovery` against a fake API server on loopback.
//!
//! The fake serves what kube's watcher asks for with its default `ListWatch` strategy:
//! `GET .../endpointslices?labelSelector=...&limit=500&resourceVersion=0...` (a list with a
//! `resourceVersion`), then `GET .../endpointslices?watch=true&resourceVersion=N&...` (newline
//! delimited watch events, kept open). It keeps a history of events so a watch from version N
//! replays what came after N, answers `410 Expired` for compacted versions, filters by label
//! selector, and can drop watch connections or fail lists on demand.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use presence_service::membership::kubernetes::{KubernetesDiscovery, PortSpec};
use presence_service::membership::{members, Discovery, Members};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NS: &str = "presence";
const SERVICE: &str = "presence-shard";
const WAIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The fake API server.

#[derive(Default)]
struct FakeState {
    /// The last resource version handed out.
    rv: u64,
    /// Watches from a version below this get `410 Expired`.
    min_rv: u64,
    /// Current slices by name (without kind/apiVersion, like list items).
    slices: BTreeMap<String, Value>,
    /// Every event ever sent, with the version it was sent at, as a watch line.
    log: Vec<(u64, Value)>,
    /// Bumped to end every open watch stream.
    generation: u64,
    /// How many of the next lists fail with 500.
    fail_lists: usize,
    /// Requests seen: (watch?, query).
    requests: Vec<(bool, HashMap<String, String>)>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// Wakes the watch streams after every change of `state`.
    changed: Arc<watch::Sender<()>>,
    addr: SocketAddr,
}

impl Fake {
    async fn start(initial: Vec<Value>) -> Fake {
        let mut st = FakeState {
            rv: 100,
            min_rv: 0,
            ..Default::default()
        };
        for mut s in initial {
            st.rv += 1;
            s["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.slices.insert(name_of(&s), s);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Fake {
            state: Arc::new(Mutex::new(st)),
            changed: Arc::new(watch::Sender::new(())),
            addr,
        };
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(endpointslices),
            )
            .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such path") })
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// A kube client pointed at the fake.
    fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.default_namespace = NS.to_owned();
        kube::Client::try_from(config).unwrap()
    }

    /// Applies a watch event (`ADDED`, `MODIFIED`, `DELETED`) to the state and streams it.
    fn send(&self, kind: &str, slice: Value) {
        {
            let mut st = self.state.lock();
            Self::apply(&mut st, kind, slice);
        }
        self.changed.send_replace(());
    }

    fn apply(st: &mut FakeState, kind: &str, mut slice: Value) {
        st.rv += 1;
        slice["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let name = name_of(&slice);
        if kind == "DELETED" {
            st.slices.remove(&name);
        } else {
            st.slices.insert(name, slice.clone());
        }
        slice["kind"] = json!("EndpointSlice");
        slice["apiVersion"] = json!("discovery.k8s.io/v1");
        let rv = st.rv;
        st.log.push((rv, json!({"type": kind, "object": slice})));
    }

    /// Drops every watch connection, applies `event` while nobody watches, and compacts the
    /// history past it: the watcher's resumed watch gets `410 Expired` and must list again.
    fn expire_with(&self, kind: &str, slice: Value) {
        {
            let mut st = self.state.lock();
            st.generation += 1;
            Self::apply(&mut st, kind, slice);
            st.min_rv = st.rv;
        }
        self.changed.send_replace(());
    }

    /// Ends every open watch stream (the client resumes from its last version).
    fn drop_watches(&self) {
        self.state.lock().generation += 1;
        self.changed.send_replace(());
    }

    /// The query strings of the lists (`watch == false`) or watches seen so far.
    fn requests(&self, watch: bool) -> Vec<HashMap<String, String>> {
        let st = self.state.lock();
        st.requests
            .iter()
            .filter(|(w, _)| *w == watch)
            .map(|(_, q)| q.clone())
            .collect()
    }

    fn lists(&self) -> usize {
        self.state
            .lock()
            .requests
            .iter()
            .filter(|(w, _)| !w)
            .count()
    }

    fn watches(&self) -> usize {
        self.state
            .lock()
            .requests
            .iter()
            .filter(|(w, _)| *w)
            .count()
    }
}

fn name_of(slice: &Value) -> String {
    slice["metadata"]["name"]
        .as_str()
        .expect("slice has a name")
        .to_owned()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Equality-based label selectors (`a=b,c=d`), which is all the watcher sends here.
fn selects(selector: Option<&String>, slice: &Value) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').expect("equality selector");
        slice["metadata"]["labels"][k].as_str() == Some(v)
    })
}

async fn endpointslices(
    State(fake): State<Fake>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let mut st = fake.state.lock();
    st.requests.push((is_watch, q.clone()));
    if ns != NS {
        return status(StatusCode::NOT_FOUND, "NotFound", "wrong namespace");
    }
    let selector = q.get("labelSelector").cloned();
    if !is_watch {
        if st.fail_lists > 0 {
            st.fail_lists -= 1;
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcd is down",
            );
        }
        let items: Vec<Value> = st
            .slices
            .values()
            .filter(|s| selects(selector.as_ref(), s))
            .cloned()
            .collect();
        let list = json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            list.to_string(),
        )
            .into_response();
    }

    // A watch: from `resourceVersion`, or from now.
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    let mut first = Vec::new();
    if from < st.min_rv {
        let expired = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.min_rv),
            "reason": "Expired", "code": 410,
        }});
        first.push(expired);
        let stream = futures::stream::iter(first.into_iter().map(line));
        return watch_response(Body::from_stream(stream));
    }
    // A bookmark at the version asked for, as a real server may send at any time.
    first.push(json!({"type": "BOOKMARK", "object": {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": from.to_string()},
    }}));
    let next = st
        .log
        .iter()
        .position(|(rv, _)| *rv > from)
        .unwrap_or(st.log.len());
    let generation = st.generation;
    drop(st);

    let rx = fake.changed.subscribe();
    let init = (fake, next, rx, first.into_iter(), selector);
    let stream = futures::stream::unfold(
        init,
        move |(fake, mut next, mut rx, mut first, sel)| async move {
            if let Some(v) = first.next() {
                return Some((line(v), (fake, next, rx, first, sel)));
            }
            loop {
                rx.borrow_and_update();
                {
                    let st = fake.state.lock();
                    if st.generation != generation {
                        return None;
                    }
                    while next < st.log.len() {
                        let ev = st.log[next].1.clone();
                        next += 1;
                        if selects(sel.as_ref(), &ev["object"]) {
                            drop(st);
                            return Some((line(ev), (fake, next, rx, first, sel)));
                        }
                    }
                }
                rx.changed().await.ok()?;
            }
        },
    );
    watch_response(Body::from_stream(stream))
}

fn line(v: Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("{v}\n")))
}

fn watch_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// One endpoint with these conditions, as the EndpointSlice controller writes them.
fn ep(addr: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [addr],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": NS, "name": format!("shard-{addr}")},
    })
}

fn ready(addr: &str) -> Value {
    ep(addr, true, true, false)
}

fn not_ready(addr: &str) -> Value {
    ep(addr, false, false, false)
}

/// A terminating pod of a headless Service with `publishNotReadyAddresses` (usual for a
/// StatefulSet's governing Service): `ready` stays true, so only `terminating` keeps it out.
fn terminating(addr: &str) -> Value {
    ep(addr, true, true, true)
}

/// A slice of `service` with a `metrics` port first and the `grpc` port second, so picking the
/// wrong port shows.
fn slice(name: &str, service: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
            {"name": "grpc", "port": 9004, "protocol": "TCP"},
        ],
    })
}

struct Running {
    rx: watch::Receiver<Members>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn start(fake: &Fake, port: PortSpec) -> Running {
    let d = Arc::new(KubernetesDiscovery::with_client(
        fake.client(),
        NS.into(),
        SERVICE.into(),
        port,
    ));
    assert_eq!(d.kind(), "kubernetes");
    let (tx, rx) = watch::channel(members(vec![]));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(d.run(tx, cancel.clone()));
    Running { rx, cancel, task }
}

/// The next published member set (within `WAIT`).
async fn next(r: &mut Running) -> Vec<String> {
    next_within(r, WAIT, "a membership change").await
}

/// The next published member set, within `timeout`; panics naming `what` it waited for.
async fn next_within(r: &mut Running, timeout: Duration, what: &str) -> Vec<String> {
    match tokio::time::timeout(timeout, r.rx.changed()).await {
        Ok(Ok(())) => r.rx.borrow_and_update().to_vec(),
        Ok(Err(_)) => panic!("{what}: discovery stopped"),
        Err(_) => panic!("no {what} within {timeout:?}; still {:?}", *r.rx.borrow()),
    }
}

/// The next published member set is `want`.
async fn expect_next(r: &mut Running, want: &[&str]) {
    assert_eq!(next(r).await, strs(want));
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// The shards' first slice (`presence-shard-abcde`): endpoint `10.0.0.<i + 1>` as `states[i]`
/// makes it.
fn first_slice(states: &[fn(&str) -> Value]) -> Value {
    let endpoints = (1..)
        .zip(states)
        .map(|(i, state)| state(&format!("10.0.0.{i}")))
        .collect();
    slice("presence-shard-abcde", SERVICE, endpoints)
}

/// Three ready shards, one not ready, one terminating, in one slice; plus a ready endpoint of
/// another Service that the label selector must keep out.
fn three_ready() -> Vec<Value> {
    vec![
        first_slice(&[ready, ready, ready, not_ready, terminating]),
        slice("other-xyz", "other", vec![ready("10.9.9.9")]),
    ]
}

/// A fake with [`three_ready`], watched on the `grpc` port, after the first member set: the
/// three ready shards.
async fn watching_three_ready() -> (Fake, Running) {
    let fake = Fake::start(three_ready()).await;
    let mut r = start(&fake, PortSpec::Name("grpc".into()));
    assert_eq!(next(&mut r).await.len(), 3);
    (fake, r)
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn initial_list_gives_exactly_the_ready_endpoints_on_the_named_port() {
    let fake = Fake::start(three_ready()).await;
    let mut r = start(&fake, PortSpec::Name("grpc".into()));
    expect_next(&mut r, &["10.0.0.1:9004", "10.0.0.2:9004", "10.0.0.3:9004"]).await;
    // The watcher listed with the Service's selector, then watched from the list's version.
    let selector = format!("kubernetes.io/service-name={SERVICE}");
    assert_eq!(fake.requests(false)[0]["labelSelector"], selector);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let watch = &fake.requests(true)[0];
    assert_eq!(watch["labelSelector"], selector);
    assert_eq!(watch["resourceVersion"], "102");
}

#[tokio::test]
async fn an_endpoint_marked_terminating_leaves() {
    let (fake, mut r) = watching_three_ready().await;
    // 10.0.0.2 is being deleted: the controller marks it terminating.
    let states: [fn(&str) -> Value; 5] = [ready, terminating, ready, not_ready, terminating];
    fake.send("MODIFIED", first_slice(&states));
    expect_next(&mut r, &["10.0.0.1:9004", "10.0.0.3:9004"]).await;
}

#[tokio::test]
async fn a_deleted_slice_takes_its_endpoints_away() {
    let mut initial = three_ready();
    let second = slice(
        "presence-shard-fghij",
        SERVICE,
        vec![ready("10.0.1.1"), ready("10.0.1.2")],
    );
    initial.push(second.clone());
    let fake = Fake::start(initial).await;
    let mut r = start(&fake, PortSpec::Name("grpc".into()));
    expect_next(
        &mut r,
        &[
            "10.0.0.1:9004",
            "10.0.0.2:9004",
            "10.0.0.3:9004",
            "10.0.1.1:9004",
            "10.0.1.2:9004",
        ],
    )
    .await;
    fake.send("DELETED", second);
    expect_next(&mut r, &["10.0.0.1:9004", "10.0.0.2:9004", "10.0.0.3:9004"]).await;
}

#[tokio::test]
async fn added_endpoints_join() {
    let (fake, mut r) = watching_three_ready().await;
    // The not-ready shard becomes ready.
    let states: [fn(&str) -> Value; 5] = [ready, ready, ready, ready, terminating];
    fake.send("MODIFIED", first_slice(&states));
    expect_next(
        &mut r,
        &[
            "10.0.0.1:9004",
            "10.0.0.2:9004",
            "10.0.0.3:9004",
            "10.0.0.4:9004",
        ],
    )
    .await;
    // A new slice with a new shard.
    fake.send(
        "ADDED",
        slice("presence-shard-klmno", SERVICE, vec![ready("10.0.2.1")]),
    );
    assert_eq!(
        next(&mut r).await.last().map(String::as_str),
        Some("10.0.2.1:9004")
    );
    assert_eq!(r.rx.borrow().len(), 5);
    // A slice of another Service changes nothing.
    fake.send("ADDED", slice("other-2", "other", vec![ready("10.9.9.8")]));
    fake.send(
        "DELETED",
        slice("presence-shard-klmno", SERVICE, vec![ready("10.0.2.1")]),
    );
    assert_eq!(next(&mut r).await.len(), 4);
}

#[tokio::test]
async fn survives_dropped_watches_and_expired_versions() {
    let (fake, mut r) = watching_three_ready().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((fake.lists(), fake.watches()), (1, 1));

    // The connection drops: the watcher watches again from where it was, without a list.
    fake.drop_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.watches(), 2);
    fake.send(
        "ADDED",
        slice("presence-shard-fghij", SERVICE, vec![ready("10.0.1.1")]),
    );
    assert_eq!(next(&mut r).await.len(), 4);
    assert_eq!(fake.lists(), 1);

    // The connection drops, a change happens, and history is compacted past it: the resumed
    // watch gets 410 Expired, and after a backoff the watcher lists again and sees the change.
    fake.expire_with("DELETED", slice("presence-shard-fghij", SERVICE, vec![]));
    let got = next_within(
        &mut r,
        Duration::from_secs(5),
        "change after an expired watch",
    )
    .await;
    assert_eq!(
        got,
        strs(&["10.0.0.1:9004", "10.0.0.2:9004", "10.0.0.3:9004"])
    );
    assert_eq!(fake.lists(), 2, "an expired version forces a new list");
    // And it keeps watching after the relist.
    fake.send(
        "ADDED",
        slice("presence-shard-pqrst", SERVICE, vec![ready("10.0.3.1")]),
    );
    assert_eq!(next(&mut r).await.len(), 4);
}

#[tokio::test]
async fn a_failing_list_is_retried_and_members_are_kept_meanwhile() {
    let fake = Fake::start(three_ready()).await;
    fake.state.lock().fail_lists = 2;
    let mut r = start(&fake, PortSpec::Name("grpc".into()));
    let got = next_within(
        &mut r,
        Duration::from_secs(10),
        "members after failed lists",
    )
    .await;
    assert_eq!(got.len(), 3);
    assert_eq!(fake.lists(), 3);

    // Lists fail again during a relist: the last members stay published.
    fake.state.lock().fail_lists = 1;
    fake.expire_with("MODIFIED", first_slice(&[ready]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        r.rx.borrow().len(),
        3,
        "an API error must not empty the ring"
    );
    let got = next_within(&mut r, Duration::from_secs(10), "change after the relist").await;
    assert_eq!(got, strs(&["10.0.0.1:9004"]));
}

#[tokio::test]
async fn numeric_port_ipv6_and_missing_conditions() {
    let v6 = json!({
        "metadata": {"name": "presence-shard-v6", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv6",
        "endpoints": [
            // No conditions at all: ready and serving are nil, which means true.
            {"addresses": ["fd00::1", "fd00::99"]},
            {"addresses": ["fd00::2"], "conditions": {}},
            // publishNotReadyAddresses: ready forced true, but not serving.
            {"addresses": ["fd00::3"], "conditions": {"ready": true, "serving": false}},
            {"addresses": ["fd00::4"], "conditions": {"ready": true, "terminating": true}},
        ],
        "ports": [{"name": "grpc", "port": 9004}],
    });
    let fake = Fake::start(vec![v6]).await;
    let mut r = start(&fake, PortSpec::Number(7000));
    assert_eq!(
        next(&mut r).await,
        strs(&["[fd00::1]:7000", "[fd00::2]:7000"])
    );
}

#[tokio::test]
async fn a_port_name_missing_from_the_slice_gives_no_members() {
    let mut initial = three_ready();
    initial.push(json!({
        "metadata": {"name": "presence-shard-noports", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.5.1"]}],
        "ports": [{"name": "http", "port": 8080}],
    }));
    let fake = Fake::start(initial).await;
    let mut r = start(&fake, PortSpec::Name("grpc".into()));
    expect_next(&mut r, &["10.0.0.1:9004", "10.0.0.2:9004", "10.0.0.3:9004"]).await;
}

#[tokio::test]
async fn run_stops_when_cancelled() {
    let (_fake, mut r) = watching_three_ready().await;
    r.cancel.cancel();
    tokio::time::timeout(WAIT, &mut r.task)
        .await
        .expect("run returns after cancel")
        .unwrap();
}

#[tokio::test]
async fn empty_namespace_means_the_clients_default() {
    let fake = Fake::start(three_ready()).await;
    let d =
        KubernetesDiscovery::with_client(fake.client(), String::new(), SERVICE.into(), 9004.into());
    assert_eq!(d.namespace(), NS);
    assert_eq!(
        d.label_selector(),
        "kubernetes.io/service-name=presence-shard"
    );
}
