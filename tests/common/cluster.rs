//! Shards and gateways on loopback, started either way ([`Launch`]):
//!
//! - in this process ([`Cluster::in_process`]): every node follows one `ManualDiscovery` that
//!   lists the shards, so the ring is whole from the start;
//! - as child processes of the real binary ([`Cluster::processes`]), with static discovery:
//!   `PRESENCE_SHARDS` lists every shard, spares included, from the start (a shard not running
//!   fails its health checks and is not a member until it starts). Shards can be killed,
//!   restarted, added and sent SIGTERM.
//!
//! A cluster is started settled (see [`Cluster::wait_settled`]); dropping it stops every node.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_service::membership::{Discovery, ManualDiscovery};
use serde_json::Value;

use super::http;
use super::node::{self, free_ports, log_path, Launch, Node, Vars};

/// How long a cluster may take to start and settle.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// One node of a [`Cluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proc {
    Shard(usize),
    Gateway(usize),
}

struct Member {
    /// HTTP port: `/livez`, `/readyz`, `/metrics` (and the API on a gateway).
    http: u16,
    /// gRPC port of a shard.
    grpc: Option<u16>,
    node: Option<Node>,
    /// How a child that stopped exited.
    exited: Option<ExitStatus>,
    /// Times started.
    starts: u32,
    log: PathBuf,
}

/// Told, for each shard behind a front, the shard's real gRPC address.
type Connect = Arc<dyn Fn(usize, &str) + Send + Sync>;

/// What a cluster is to be: see [`Cluster::in_process`] and [`Cluster::processes`].
pub struct ClusterSpec {
    launch: Launch,
    shards: usize,
    gateways: usize,
    spare: usize,
    vars: Vars,
    redis: Option<String>,
    /// Where shard `i` is reached (see [`ClusterSpec::fronted`]); empty: its gRPC port.
    fronts: Vec<String>,
    /// Told where each shard listens, before it starts (see [`ClusterSpec::fronted`]).
    connect: Option<Connect>,
}

impl ClusterSpec {
    /// Shard `i` is reached at `fronts[i]` (a proxy in front of its gRPC port, say): it
    /// advertises that address, and `PRESENCE_SHARDS` lists these. Before the nodes start,
    /// `connect(i, addr)` is told where shard `i` listens (also [`Cluster::shard_grpc`]).
    pub fn fronted(
        mut self,
        fronts: Vec<String>,
        connect: impl Fn(usize, &str) + Send + Sync + 'static,
    ) -> ClusterSpec {
        self.fronts = fronts;
        self.connect = Some(Arc::new(connect));
        self
    }

    /// `n` more shards declared in `PRESENCE_SHARDS` but not started (child processes only):
    /// [`Cluster::add_shard`] starts them.
    pub fn spare(mut self, n: usize) -> ClusterSpec {
        assert!(
            n == 0 || self.launch == Launch::Process,
            "spare shards are child processes"
        );
        self.spare = n;
        self
    }

    /// Settings of every node.
    pub fn vars(mut self, vars: &[(&str, &str)]) -> ClusterSpec {
        self.vars.extend(node::vars(vars));
        self
    }

    /// Settings of every node, under those given so far (which win).
    pub fn envs_first(mut self, vars: &[(&str, &str)]) -> ClusterSpec {
        let mut all = node::vars(vars);
        all.append(&mut self.vars);
        self.vars = all;
        self
    }

    /// The shards' store: this Redis Cluster, or (`None`) each its own in-memory store.
    pub fn redis(mut self, url: Option<&str>) -> ClusterSpec {
        self.redis = url.map(str::to_owned);
        self
    }

    /// Starts every node and waits until the cluster settled. A child that loses its free port
    /// to someone else makes it try again on other ports, up to 3 times.
    pub fn start(self) -> Cluster {
        assert!(self.shards > 0 && self.gateways > 0);
        let mut last_err = String::new();
        for _ in 0..3 {
            match self.try_start() {
                Ok(cluster) => {
                    cluster.wait_settled_blocking(SETTLE_TIMEOUT);
                    return cluster;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("cluster failed to start: {last_err}");
    }

    fn try_start(&self) -> Result<Cluster, String> {
        let total = self.shards + self.spare;
        let ports = free_ports(2 * total + self.gateways);
        let member = |http: u16, grpc: Option<u16>, name: String| Member {
            http,
            grpc,
            node: None,
            exited: None,
            starts: 0,
            log: log_path(&format!("presence-cluster-{name}")),
        };
        let shards: Vec<Member> = (0..total)
            .map(|i| member(ports[2 * i], Some(ports[2 * i + 1]), format!("shard{i}")))
            .collect();
        let gateways: Vec<Member> = (0..self.gateways)
            .map(|k| member(ports[2 * total + k], None, format!("gateway{k}")))
            .collect();
        let addrs: Vec<String> = match self.fronts.len() {
            0 => shards
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.grpc.expect("a shard")))
                .collect(),
            n => {
                assert_eq!(n, total, "one front per declared shard");
                if let Some(connect) = &self.connect {
                    for (i, m) in shards.iter().enumerate() {
                        connect(i, &format!("127.0.0.1:{}", m.grpc.expect("a shard")));
                    }
                }
                self.fronts.clone()
            }
        };
        let manual =
            (self.launch == Launch::InProcess).then(|| ManualDiscovery::new(addrs.clone()));
        let mut cluster = Cluster {
            launch: self.launch,
            shards,
            gateways,
            vars: self.vars.clone(),
            redis: self.redis.clone(),
            manual,
            shard_list: addrs.join(","),
            fronts: self.fronts.clone(),
            client: http::client(true),
        };
        let mut procs: Vec<Proc> = (0..self.shards).map(Proc::Shard).collect();
        procs.extend((0..self.gateways).map(Proc::Gateway));
        for &p in &procs {
            cluster.start_node(p)?;
        }
        for &p in &procs {
            cluster.wait_live(p)?;
        }
        Ok(cluster)
    }
}

/// Shards and gateways on loopback. Dropping it stops every node.
pub struct Cluster {
    launch: Launch,
    shards: Vec<Member>,
    gateways: Vec<Member>,
    vars: Vars,
    redis: Option<String>,
    /// In-process: the members every node follows.
    manual: Option<ManualDiscovery>,
    /// `PRESENCE_SHARDS`.
    shard_list: String,
    /// See [`ClusterSpec::fronted`].
    fronts: Vec<String>,
    client: reqwest::Client,
}

impl Cluster {
    /// `shards` shards and `gateways` gateways in this process.
    pub fn in_process(shards: usize, gateways: usize) -> ClusterSpec {
        Cluster::spec(Launch::InProcess, shards, gateways)
    }

    /// `shards` shards and `gateways` gateways as child processes of the binary.
    pub fn processes(shards: usize, gateways: usize) -> ClusterSpec {
        Cluster::spec(Launch::Process, shards, gateways)
    }

    /// `shards` shards and `gateways` gateways, either way.
    pub fn spec(launch: Launch, shards: usize, gateways: usize) -> ClusterSpec {
        ClusterSpec {
            launch,
            shards,
            gateways,
            spare: 0,
            vars: Vec::new(),
            redis: None,
            fronts: Vec::new(),
            connect: None,
        }
    }

    fn member(&self, p: Proc) -> &Member {
        match p {
            Proc::Shard(i) => &self.shards[i],
            Proc::Gateway(k) => &self.gateways[k],
        }
    }

    fn member_mut(&mut self, p: Proc) -> &mut Member {
        match p {
            Proc::Shard(i) => &mut self.shards[i],
            Proc::Gateway(k) => &mut self.gateways[k],
        }
    }

    /// What node `p` runs with.
    fn vars_of(&self, p: Proc) -> Vars {
        let mut v = node::vars(&[
            ("PRESENCE_DISCOVERY", "static"),
            ("PRESENCE_SHARDS", &self.shard_list),
        ]);
        v.extend(self.vars.iter().cloned());
        match (p, self.member(p).grpc) {
            (Proc::Shard(i), Some(grpc)) => {
                let addr = format!("127.0.0.1:{grpc}");
                let advertise = self.shard_addr(i);
                if let Some(url) = &self.redis {
                    v.push(("PRESENCE_REDIS_URL".into(), url.clone()));
                }
                v.extend(node::vars(&[
                    ("PRESENCE_ROLE", "shard"),
                    ("PRESENCE_GRPC_LISTEN", &addr),
                    ("PRESENCE_ADVERTISE", &advertise),
                ]));
            }
            _ => v.push(("PRESENCE_ROLE".into(), "gateway".into())),
        }
        v
    }

    /// Starts node `p` (does not wait for it).
    fn start_node(&mut self, p: Proc) -> Result<(), String> {
        let vars = self.vars_of(p);
        let m = self.member(p);
        assert!(m.node.is_none(), "{p:?} is running already");
        let node = match self.launch {
            Launch::InProcess => {
                let d: Arc<dyn Discovery> = Arc::new(self.manual.clone().expect("in-process"));
                Node::in_process(&vars, 0, Some(d)).map_err(|e| format!("{p:?}: {e}"))?
            }
            Launch::Process => {
                if m.starts > 0 {
                    let log = std::fs::OpenOptions::new().append(true).open(&m.log);
                    if let Ok(mut log) = log {
                        let _ = writeln!(log, "===== {p:?} restarted =====");
                    }
                }
                Node::spawn(&vars, m.http, &m.log)
            }
        };
        let m = self.member_mut(p);
        m.http = node.port();
        m.node = Some(node);
        m.exited = None;
        m.starts += 1;
        Ok(())
    }

    /// Waits until node `p` answers `/livez`; `Err` (every node stopped) when it exited first.
    fn wait_live(&mut self, p: Proc) -> Result<(), String> {
        let node = self.member_mut(p).node.as_mut().expect("started");
        if let Err(e) = node.wait_live(SETTLE_TIMEOUT) {
            self.stop_all();
            return Err(format!("{p:?} {e}"));
        }
        Ok(())
    }

    /// How this cluster runs.
    pub fn launch(&self) -> Launch {
        self.launch
    }

    /// Declared shards (running or not).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    pub fn gateways(&self) -> usize {
        self.gateways.len()
    }

    /// The shards that run now.
    pub fn running_shards(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&i| self.shards[i].node.is_some())
            .collect()
    }

    /// The gateways that run now.
    pub fn running_gateways(&self) -> Vec<usize> {
        (0..self.gateways.len())
            .filter(|&k| self.gateways[k].node.is_some())
            .collect()
    }

    /// Every node that runs now.
    pub fn procs(&self) -> Vec<Proc> {
        let mut v: Vec<Proc> = self.running_shards().into_iter().map(Proc::Shard).collect();
        v.extend(
            (0..self.gateways.len())
                .filter(|&k| self.gateways[k].node.is_some())
                .map(Proc::Gateway),
        );
        v
    }

    /// The address of shard `i` in the ring (`127.0.0.1:port`, its gRPC address).
    pub fn shard_addr(&self, i: usize) -> String {
        match self.fronts.get(i) {
            Some(front) => front.clone(),
            None => self.shard_grpc(i),
        }
    }

    /// Where shard `i` listens for gRPC (its address in the ring too, unless
    /// [`ClusterSpec::fronted`]).
    pub fn shard_grpc(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.shards[i].grpc.expect("a shard"))
    }

    /// The ring that the shards `members` make.
    pub fn ring_of(&self, members: &[usize]) -> presence_service::ring::Ring {
        presence_service::ring::Ring::new(members.iter().map(|&i| self.shard_addr(i)))
    }

    /// `http://127.0.0.1:PORT` of gateway `k`.
    pub fn base(&self, k: usize) -> String {
        self.http_base(Proc::Gateway(k))
    }

    /// The bases of every gateway.
    pub fn bases(&self) -> Vec<String> {
        (0..self.gateways()).map(|k| self.base(k)).collect()
    }

    /// `http://127.0.0.1:PORT` of any node.
    pub fn http_base(&self, p: Proc) -> String {
        format!("http://127.0.0.1:{}", self.member(p).http)
    }

    /// An HTTP client with a large pool.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The process id of child `p`, while it runs.
    pub fn pid(&self, p: Proc) -> Option<u32> {
        self.member(p).node.as_ref().and_then(Node::pid)
    }

    /// Everything child `p` wrote (logs and stderr), over all its starts.
    pub fn stderr_of(&self, p: Proc) -> String {
        std::fs::read_to_string(&self.member(p).log).unwrap_or_default()
    }

    /// Every child's output, each under a heading.
    pub fn stderr(&self) -> String {
        let mut out = String::new();
        let mut all: Vec<Proc> = (0..self.shards.len()).map(Proc::Shard).collect();
        all.extend((0..self.gateways.len()).map(Proc::Gateway));
        for p in all {
            let m = self.member(p);
            if m.starts == 0 || self.launch == Launch::InProcess {
                continue;
            }
            out.push_str(&format!(
                "--- {p:?} (http {}, grpc {:?}, running {}) ---\n{}\n",
                m.http,
                m.grpc,
                m.node.is_some(),
                self.stderr_of(p)
            ));
        }
        out
    }

    /// SIGKILL of shard `i` (`Child::kill`), reaped.
    pub fn kill_shard(&mut self, i: usize) {
        let m = &mut self.shards[i];
        let mut node = m.node.take().expect("the shard runs");
        m.exited = Some(node.kill());
    }

    /// SIGKILL of gateway `k` (`Child::kill`), reaped: it is no longer among the running nodes.
    pub fn kill_gateway(&mut self, k: usize) {
        let m = &mut self.gateways[k];
        let mut node = m.node.take().expect("the gateway runs");
        m.exited = Some(node.kill());
    }

    /// Starts shard `i` again, on the same ports and with the same settings, and waits for its
    /// `/livez` (not for the ring: see `wait_settled`).
    pub fn restart_shard(&mut self, i: usize) {
        let started = self.start_node(Proc::Shard(i));
        if let Err(e) = started.and_then(|()| self.wait_live(Proc::Shard(i))) {
            panic!("restarting shard {i}: {e}");
        }
    }

    /// Starts the first declared shard that never ran (see [`ClusterSpec::spare`]), and waits
    /// for its `/livez`. Returns its index.
    pub fn add_shard(&mut self) -> usize {
        let i = (0..self.shards.len())
            .find(|&i| self.shards[i].starts == 0)
            .expect("a spare shard declared with ClusterSpec::spare");
        self.restart_shard(i);
        i
    }

    /// SIGTERM to child `p`; see [`Cluster::wait_exit`].
    pub fn sigterm(&self, p: Proc) {
        self.member(p)
            .node
            .as_ref()
            .expect("the process runs")
            .signal("TERM");
    }

    /// Waits up to `timeout` for child `p` to exit; then it no longer counts as running.
    pub fn wait_exit(&mut self, p: Proc, timeout: Duration) -> Option<ExitStatus> {
        let m = self.member_mut(p);
        let Some(node) = m.node.as_mut() else {
            return m.exited;
        };
        let status = node.wait_exit(timeout)?;
        m.node = None;
        m.exited = Some(status);
        Some(status)
    }

    fn stop_all(&mut self) {
        // Gateways first (they hold streams from the shards), every node at once, then wait.
        for m in self.gateways.iter_mut().chain(self.shards.iter_mut()) {
            if let Some(node) = m.node.as_mut() {
                node.begin_stop();
            }
        }
        for m in self.gateways.iter_mut().chain(self.shards.iter_mut()) {
            if let Some(mut node) = m.node.take() {
                node.stop();
            }
        }
    }

    /// The `/metrics` answer of node `p`, which must be a 200.
    pub async fn metrics_answer(&self, p: Proc) -> http::Answer {
        let base = self.http_base(p);
        let a = http::send_bytes(&self.client, "GET", &base, "/metrics", None, None).await;
        assert_eq!(a.status, 200, "{p:?} /metrics");
        a
    }

    /// The `/metrics` text of node `p`.
    pub async fn metrics(&self, p: Proc) -> String {
        self.metrics_answer(p).await.body
    }

    /// The value of `series` on node `p`; 0 when it has none.
    pub async fn metric(&self, p: Proc, series: &str) -> f64 {
        http::metric_value(&self.metrics(p).await, series).unwrap_or(0.0)
    }

    /// The sum of `series` over the running shards.
    pub async fn shard_sum(&self, series: &str) -> f64 {
        let shards = self.running_shards().into_iter().map(Proc::Shard);
        self.sum(shards, series).await
    }

    /// The sum of `series` over the running gateways.
    pub async fn gateway_sum(&self, series: &str) -> f64 {
        let gateways = self.running_gateways().into_iter().map(Proc::Gateway);
        self.sum(gateways, series).await
    }

    /// The sum of `series` over `procs`.
    async fn sum(&self, procs: impl Iterator<Item = Proc>, series: &str) -> f64 {
        let mut sum = 0.0;
        for p in procs {
            sum += self.metric(p, series).await;
        }
        sum
    }

    /// A JSON request through gateway `k`: the status and the whole envelope.
    pub async fn request(
        &self,
        k: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        http::request(&self.client, &self.base(k), method, path, body).await
    }

    /// Opens `n` connections of the test client to gateway `k` (`n` requests at once; the
    /// client's pool keeps them), so that a burst that follows comes together instead of one
    /// accept apart: for tests that count how a burst was coalesced.
    pub async fn open_connections(&self, k: usize, n: usize) {
        let base = self.base(k);
        let answers = futures::future::join_all(
            (0..n).map(|_| http::send_bytes(&self.client, "GET", &base, "/livez", None, None)),
        )
        .await;
        for a in answers {
            assert_eq!(a.status, 200, "/livez: {}", a.body);
        }
    }

    /// `GET path` through gateway `k`.
    pub async fn get(&self, k: usize, path: &str) -> (u16, Value) {
        self.request(k, "GET", path, None).await
    }

    /// `POST path` with a JSON body through gateway `k`.
    pub async fn post(&self, k: usize, path: &str, body: Value) -> (u16, Value) {
        self.request(k, "POST", path, Some(&body)).await
    }

    /// What a settled cluster looks like now: see [`Settle`].
    fn settle(&self) -> Settle {
        let running = self.running_shards();
        let ring = self.ring_of(&running);
        Settle {
            procs: self
                .procs()
                .into_iter()
                .map(|p| (p, self.member(p).http))
                .collect(),
            members: running.len() as f64,
            epoch: ring.epoch() as f64,
        }
    }

    /// Waits (blocking the thread) until the cluster settled (see [`Settle`]); panics after
    /// `timeout` with what is not. Returns how long it took.
    pub fn wait_settled_blocking(&self, timeout: Duration) -> Duration {
        self.settle()
            .wait(timeout)
            .unwrap_or_else(|why| panic!("cluster not settled: {why}\n{}", self.stderr()))
    }

    /// Like [`Cluster::wait_settled_blocking`], without blocking the async workers.
    pub async fn wait_settled(&self, timeout: Duration) -> Duration {
        let settle = self.settle();
        tokio::task::spawn_blocking(move || settle.wait(timeout))
            .await
            .expect("the settle task")
            .unwrap_or_else(|why| panic!("cluster not settled: {why}\n{}", self.stderr()))
    }
}

/// A settled cluster: every running node has the ring of exactly the running shards
/// (`presence_ring_members` and `presence_ring_epoch`), and the shards'
/// `presence_owned_partitions` are all above 0 and sum to every partition.
struct Settle {
    procs: Vec<(Proc, u16)>,
    members: f64,
    epoch: f64,
}

impl Settle {
    /// Why the cluster is not settled, from the `/metrics` text of each node (`None`: it did
    /// not answer); `None` when it is.
    fn unsettled(&self, texts: &[(Proc, Option<String>)]) -> Option<String> {
        let (n, epoch) = (self.members, self.epoch);
        let mut owned_sum = 0.0;
        let mut why = Vec::new();
        for (p, text) in texts {
            let Some(text) = text else {
                why.push(format!("{p:?}: no /metrics"));
                continue;
            };
            let get = |s: &str| http::metric_value(text, s).unwrap_or(f64::NAN);
            let (members, e) = (get("presence_ring_members"), get("presence_ring_epoch"));
            if members != n || e != epoch {
                why.push(format!(
                    "{p:?}: {members} members, epoch {e} (want {n}, {epoch})"
                ));
            }
            if let Proc::Shard(_) = p {
                let owned = get("presence_owned_partitions");
                if owned.is_nan() || owned <= 0.0 {
                    why.push(format!("{p:?}: owns {owned} partitions"));
                }
                owned_sum += owned;
            }
        }
        let all = presence_service::ring::PARTITIONS as f64;
        if owned_sum != all {
            why.push(format!("the shards own {owned_sum} of {all} partitions"));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Polls every node's `/metrics` until settled: how long it took, or why not by `timeout`.
    fn wait(&self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let texts: Vec<(Proc, Option<String>)> = self
                .procs
                .iter()
                .map(|&(p, port)| {
                    let text = http::get_blocking(port, "/metrics")
                        .filter(|(code, _)| *code == 200)
                        .map(|(_, t)| t);
                    (p, text)
                })
                .collect();
            let Some(why) = self.unsettled(&texts) else {
                return Ok(started.elapsed());
            };
            if started.elapsed() >= timeout {
                return Err(format!("after {timeout:?}: {why}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if std::thread::panicking() {
            eprintln!("--- cluster stderr ---\n{}", self.stderr());
        }
        for m in self.shards.iter().chain(self.gateways.iter()) {
            let _ = std::fs::remove_file(&m.log);
        }
    }
}
