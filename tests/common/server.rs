//! What the HTTP suite talks to: a [`Server`] of a [`Topology`], one base URL (or several, in
//! turn) behind the same request helpers. Every JSON answer is checked to be the envelope.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::cluster::{Cluster, Proc};
use super::http::{self, Answer};
use super::node::{self, Launch, Node, Vars};

/// Where the HTTP suite runs; each HTTP test runs once per topology (see `per_topology!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One all-in-one node on the embedded in-memory store: needs no outside service.
    Memory,
    /// One all-in-one node on the shared Redis Cluster.
    Redis,
    /// 3 shards (on the shared Redis Cluster) and 2 gateways; requests alternate gateways.
    Cluster,
}

/// What every cluster of the cluster topology runs with, before the test's own settings: health
/// checks twice a second and a short start grace (every shard is listed from the start, and the
/// ring does not move), so a fresh cluster settles quickly.
const CLUSTER_DEFAULTS: &[(&str, &str)] = &[
    ("PRESENCE_HEALTH_INTERVAL", "500ms"),
    ("PRESENCE_HANDOFF_GRACE", "200ms"),
];

enum Nodes {
    One(Node, std::path::PathBuf),
    Cluster(Cluster),
}

/// A running topology. Dropping it stops every node.
pub struct Server {
    nodes: Nodes,
    /// On the shared Redis Cluster: this test's turn on it (see [`super::Turn`]).
    _turn: Option<super::Turn>,
    /// `http://127.0.0.1:PORT`: the node, or the cluster's first gateway.
    pub base: String,
    /// Where requests go, in turn: the node, or every gateway of the cluster.
    bases: Vec<String>,
    next: AtomicUsize,
    client: reqwest::Client,
    /// For `raw`: one connection per request, so a connection the server closes after an
    /// early rejection (see `two_on_one_connection`) never poisons the pool of `client`.
    client_once: reqwest::Client,
    /// The server uses a store other nodes (other tests) use too, so its gauges and counters
    /// also count what it reloaded of theirs.
    pub shared_store: bool,
}

impl Server {
    /// Starts `t` in this process with `envs`: on the shared Redis Cluster for the Redis and
    /// cluster topologies (unless `envs` name a `PRESENCE_REDIS_URL`), else the in-memory
    /// store. Waits until it answers (a cluster: until its ring settled).
    pub fn start(t: Topology, envs: &[(&str, &str)]) -> Server {
        Server::start_with(t, envs, Launch::InProcess, true)
    }

    /// Like `start`, but always on a store of its own (the in-memory one), for tests that
    /// assert exact metrics. In the cluster topology, every shard has its own in-memory store:
    /// the ring does not move once settled, so no user changes owner.
    pub fn start_private(t: Topology, envs: &[(&str, &str)]) -> Server {
        Server::start_with(t, envs, Launch::InProcess, false)
    }

    /// Like `start`, as child processes of the binary: for tests that signal the process.
    pub fn start_process(t: Topology, envs: &[(&str, &str)]) -> Server {
        Server::start_with(t, envs, Launch::Process, true)
    }

    fn start_with(t: Topology, envs: &[(&str, &str)], launch: Launch, shared: bool) -> Server {
        let mut vars: Vars = node::vars(envs);
        let named = node::names(&vars, "PRESENCE_REDIS_URL");
        let redis = (shared && !named && t != Topology::Memory).then(super::redis_url);
        let shared_store = named || redis.is_some();
        let turn = redis.is_some().then(super::Turn::take);
        let nodes = if t == Topology::Cluster {
            let mut spec = Cluster::spec(launch, 3, 2).vars(CLUSTER_DEFAULTS);
            spec = spec.vars(envs).redis(redis.as_deref());
            Nodes::Cluster(spec.start())
        } else {
            if let Some(url) = redis {
                vars.insert(0, ("PRESENCE_REDIS_URL".into(), url));
            }
            let log = node::log_path("presence-test");
            Nodes::One(node::start(launch, &vars, &log), log)
        };
        let bases = match &nodes {
            Nodes::One(n, _) => vec![n.base()],
            Nodes::Cluster(c) => c.bases(),
        };
        Server {
            nodes,
            _turn: turn,
            base: bases[0].clone(),
            bases,
            next: AtomicUsize::new(0),
            client: http::client(true),
            client_once: http::client(false),
            shared_store,
        }
    }

    /// The cluster behind this server, in the cluster topology.
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.nodes {
            Nodes::Cluster(c) => Some(c),
            Nodes::One(..) => None,
        }
    }

    /// Everything the child processes wrote so far.
    pub fn stderr(&self) -> String {
        match &self.nodes {
            Nodes::One(n, _) => n.stderr(),
            Nodes::Cluster(c) => c.stderr(),
        }
    }

    /// SIGTERM to the child process (in the cluster topology: the first gateway).
    pub fn sigterm(&self) {
        match &self.nodes {
            Nodes::One(n, _) => n.signal("TERM"),
            Nodes::Cluster(c) => c.sigterm(Proc::Gateway(0)),
        }
    }

    /// Waits for the child process (in the cluster topology: the first gateway) to exit, up
    /// to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        match &mut self.nodes {
            Nodes::One(n, _) => n.wait_exit(timeout),
            Nodes::Cluster(c) => c.wait_exit(Proc::Gateway(0), timeout),
        }
    }

    /// The base URL for the next request: the node, or the next gateway in turn.
    fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    /// A JSON request; returns the status and the whole envelope.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        http::request(&self.client, self.pick(), method, path, body).await
    }

    /// A JSON request with `Authorization: Bearer <token>` (none when `token` is `None`):
    /// the status, the whole envelope and the answer's `WWW-Authenticate`.
    pub async fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value, Option<String>) {
        http::request_as(&self.client, self.pick(), method, path, body, token).await
    }

    /// [`Server::request_as`] with extra request headers; returns the status and the envelope.
    pub async fn request_with(
        &self,
        token: Option<&str>,
        headers: &[(&str, &str)],
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (code, v, _) = http::request_with(
            &self.client,
            self.pick(),
            method,
            path,
            body,
            token,
            headers,
        )
        .await;
        (code, v)
    }

    /// `GET path`; returns the status and the whole envelope.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body; returns the status and the whole envelope.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(&body)).await
    }

    /// `PUT path` with a JSON body; returns the status and the whole envelope.
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("PUT", path, Some(&body)).await
    }

    /// `DELETE path`; returns the status and the whole envelope.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request("DELETE", path, None).await
    }

    /// Any method, any Content-Type (or none), any body bytes. The answer must still be the
    /// envelope; returns the status and the body text.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let a = http::send_bytes(
            &self.client_once,
            method,
            self.pick(),
            path,
            content_type,
            Some(body),
        )
        .await;
        http::assert_envelope(method, path, a.status, a.content_type.as_deref(), &a.body);
        (a.status, a.body)
    }

    /// `GET path` without the envelope check (for `/metrics`): status, Content-Type, body. In
    /// the cluster topology, `/metrics` is the exposition of every node of the cluster, with
    /// the samples of each series summed.
    pub async fn text(&self, path: &str) -> (u16, Option<String>, String) {
        if let (Some(c), "/metrics") = (self.cluster(), path) {
            let (mut texts, mut content_type) = (Vec::new(), None);
            for p in c.procs() {
                let a = c.metrics_answer(p).await;
                content_type = content_type.or(a.content_type);
                texts.push(a.body);
            }
            return (200, content_type, http::merge_expositions(&texts));
        }
        let Answer {
            status,
            content_type,
            body,
            ..
        } = http::send_bytes(&self.client, "GET", self.pick(), path, None, None).await;
        (status, content_type, body)
    }

    /// See [`http::raw_socket`]; to the next node in turn.
    pub fn raw_socket(&self, request: &[u8]) -> (u16, String) {
        http::raw_socket(self.pick().trim_start_matches("http://"), request)
    }

    /// See [`http::two_on_one_connection`]; to the next node in turn.
    pub fn two_on_one_connection(
        &self,
        first: &[u8],
        second: &[u8],
    ) -> ((u16, String), Result<u16, String>) {
        http::two_on_one_connection(self.pick().trim_start_matches("http://"), first, second)
    }

    /// `data` of `GET /api/v1/presence/status/{user}`, which must answer 200 "success".
    pub async fn status_of(&self, user: u64) -> Value {
        let (code, v) = self.get(&format!("/api/v1/presence/status/{user}")).await;
        assert_eq!(code, 200, "GET /status/{user}: {v}");
        assert_eq!(v["message"], "success");
        v["data"].clone()
    }

    /// [`Server::status_of`] with `Authorization: Bearer <token>`.
    pub async fn status_of_as(&self, token: &str, user: u64) -> Value {
        let path = format!("/api/v1/presence/status/{user}");
        let (code, v, _) = self.request_as(Some(token), "GET", &path, None).await;
        assert_eq!(code, 200, "GET /status/{user}: {v}");
        assert_eq!(v["message"], "success");
        v["data"].clone()
    }

    /// The value of an unlabelled metric, or of the sample whose line starts with `series`
    /// (e.g. `presence_heartbeats_total{result="ok"}`). In the cluster topology: its sum over
    /// every node of the cluster.
    pub async fn metric(&self, series: &str) -> f64 {
        let (code, _, text) = self.text("/metrics").await;
        assert_eq!(code, 200);
        http::metric_value(&text, series)
            .unwrap_or_else(|| panic!("metric {series} not found in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Nodes::One(node, log) = &mut self.nodes {
            node.stop();
            if std::thread::panicking() {
                let err = node.stderr();
                if !err.is_empty() {
                    eprintln!("--- server {} stderr ---\n{err}", self.base);
                }
            }
            let _ = std::fs::remove_file(log);
        }
    }
}
