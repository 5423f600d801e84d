//! One node of presence-service, started either way ([`Launch`]):
//!
//! - in this process, through `presence_service::node::Node::builder`, on a tokio runtime of its
//!   own (so the node's timers run whatever the test does, and a test may block); stopped (its
//!   shutdown token cancelled, its runtime ended) when dropped;
//! - as a child process of the real binary, for the tests that kill it, stop it, send it a
//!   signal, restart it or read its exit code and stderr; killed when dropped.
//!
//! [`start`] is THE "start a node and wait until it answers `/livez`".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use presence_service::config::{Config, Role};
use presence_service::membership::Discovery;
use presence_service::store::MemoryStore;
use tokio_util::sync::CancellationToken;

use super::http;

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_presence-service");

/// How long a node may take to answer `/livez` once started.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// In the test process, through `Node::builder`.
    InProcess,
    /// A child process of the real binary.
    Process,
}

/// `PRESENCE_*` (and `RUST_LOG`) settings of a node, in order; a later one wins.
pub type Vars = Vec<(String, String)>;

/// `vars` as owned pairs.
pub fn vars(v: &[(&str, &str)]) -> Vars {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether `vars` set `name`.
pub fn names(vars: &[(String, String)], name: &str) -> bool {
    vars.iter().any(|(k, _)| k == name)
}

/// A path in the temporary directory unique to this call, for a node's log.
pub fn log_path(prefix: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}.log", std::process::id()))
}

/// Free loopback ports, distinct from each other (free when asked: a child binds them later).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}

/// A running (or exited) node.
pub struct Node {
    /// Its HTTP port on 127.0.0.1.
    port: u16,
    run: Run,
}

enum Run {
    InProcess(InProcess),
    Child { child: Child, log: PathBuf },
    Exited(ExitStatus, PathBuf),
}

impl Node {
    /// Builds a node from `vars` in this process and runs it on a runtime of its own (HTTP on
    /// `127.0.0.1:port`, 0: any). An `all` or `shard` node without `PRESENCE_REDIS_URL` gets a
    /// fresh `MemoryStore`; with it, the node connects to that Redis Cluster itself (so its
    /// Redis metrics are its own). `discovery` replaces the config's for a gateway or shard.
    /// `Err` when it cannot start (a port taken meanwhile, a bad config).
    pub fn in_process(
        vars: &[(String, String)],
        port: u16,
        discovery: Option<Arc<dyn Discovery>>,
    ) -> Result<Node, String> {
        // Short drain: a test's node stops when dropped, and nobody waits for stragglers.
        let mut all = self::vars(&[("PRESENCE_DRAIN_TIMEOUT", "2s")]);
        all.extend(vars.iter().cloned());
        all.push(("PRESENCE_LISTEN".into(), format!("127.0.0.1:{port}")));
        let mut last: Vec<(&str, &str)> = Vec::new();
        for (k, v) in &all {
            last.retain(|(n, _)| n != k);
            last.push((k, v));
        }
        let config = Config::from_vars(&last).map_err(|e| format!("config: {e}"))?;
        let memory = config.redis().is_none() && config.role != Role::Gateway;
        let (ready_tx, ready_rx) = mpsc::channel();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("node-{:?}", config.role))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the node");
                rt.block_on(async move {
                    let mut b = presence_service::node::Node::builder(config);
                    if memory {
                        b = b.store(MemoryStore::new());
                    }
                    if let Some(d) = discovery {
                        b = b.discovery(d);
                    }
                    let node = match b.bind().await {
                        Ok(node) => node,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            return;
                        }
                    };
                    let port = node.local_addr().port();
                    let _ = ready_tx.send(Ok(port));
                    if let Err(e) = node.run(stop).await {
                        eprintln!("in-process node on port {port}: {e:#}");
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawning the node's thread");
        let port = ready_rx
            .recv()
            .map_err(|_| "the node's thread died".to_owned())??;
        Ok(Node {
            port,
            run: Run::InProcess(InProcess {
                shutdown,
                thread: Some(thread),
            }),
        })
    }

    /// Spawns the binary with `vars` on HTTP `127.0.0.1:port` (see [`command`]); its stdout and
    /// stderr are appended to `log`. Does not wait.
    pub fn spawn(vars: &[(String, String)], port: u16, log: &Path) -> Node {
        let mut cmd = command(vars, log);
        cmd.env("PRESENCE_LISTEN", format!("127.0.0.1:{port}"));
        let child = cmd.spawn().expect("spawning the server binary");
        Node {
            port,
            run: Run::Child {
                child,
                log: log.to_owned(),
            },
        }
    }

    /// Waits until the node answers `/livez` 200. `Err` (with its stderr) when the child exited
    /// first, which mostly means it lost its port to someone else; panics after `timeout`.
    pub fn wait_live(&mut self, timeout: Duration) -> Result<(), String> {
        let until = Instant::now() + timeout;
        loop {
            if http::get_blocking(self.port, "/livez").is_some_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if let Some(status) = self.try_exit() {
                return Err(format!("exited with {status}; stderr:\n{}", self.stderr()));
            }
            if let Run::InProcess(InProcess {
                thread: Some(t), ..
            }) = &self.run
            {
                if t.is_finished() {
                    return Err("the in-process node stopped (see the test's stderr)".into());
                }
            }
            if Instant::now() >= until {
                panic!(
                    "node on port {} did not answer /livez within {timeout:?}; stderr:\n{}",
                    self.port,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The HTTP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id of a child that runs.
    pub fn pid(&self) -> Option<u32> {
        match &self.run {
            Run::Child { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// Whether the node runs (a child that exited is reaped here).
    pub fn running(&mut self) -> bool {
        self.try_exit().is_none() && !matches!(self.run, Run::Exited(..))
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        match &mut self.run {
            Run::Child { child, log } => {
                let status = child.try_wait().expect("polling the child")?;
                self.run = Run::Exited(status, std::mem::take(log));
                Some(status)
            }
            Run::Exited(status, _) => Some(*status),
            Run::InProcess(_) => None,
        }
    }

    /// Everything a child wrote so far (logs and stderr, over all its starts); empty for an
    /// in-process node, which logs nowhere.
    pub fn stderr(&self) -> String {
        match &self.run {
            Run::Child { log, .. } | Run::Exited(_, log) => {
                std::fs::read_to_string(log).unwrap_or_default()
            }
            Run::InProcess(_) => String::new(),
        }
    }

    /// SIGKILL (`Child::kill`) of a child, reaped: how it ended.
    pub fn kill(&mut self) -> ExitStatus {
        match &mut self.run {
            Run::Child { child, .. } => {
                let _ = child.kill();
                let status = child.wait().expect("reaping the child");
                self.try_exit_with(status)
            }
            Run::Exited(status, _) => *status,
            Run::InProcess(_) => panic!("an in-process node cannot be killed: use Launch::Process"),
        }
    }

    fn try_exit_with(&mut self, status: ExitStatus) -> ExitStatus {
        if let Run::Child { log, .. } = &mut self.run {
            self.run = Run::Exited(status, std::mem::take(log));
        }
        status
    }

    /// `kill -<signal> <pid>` of a child (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("a child process that runs");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Waits up to `timeout` for a child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts stopping: cancels an in-process node's shutdown token (it drains and ends), kills a
    /// child. [`Node::stop`] waits for the end.
    pub fn begin_stop(&mut self) {
        match &mut self.run {
            Run::InProcess(n) => n.shutdown.cancel(),
            Run::Child { .. } => {
                self.kill();
            }
            Run::Exited(..) => {}
        }
    }

    /// Stops the node and waits until it has (an in-process node: up to 10 s, then it is left
    /// to finish on its own).
    pub fn stop(&mut self) {
        self.begin_stop();
        if let Run::InProcess(n) = &mut self.run {
            n.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread of an in-process node: it runs the node on its runtime until `shutdown`.
struct InProcess {
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Waits up to 10 s for the node to stop; then leaves it to finish alone.
    fn join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            eprintln!("an in-process node did not stop within 10 s; left to finish alone");
        }
    }
}

/// A command for the binary with a clean environment: no `PRESENCE_*` or `OTEL_*` variable of
/// the caller leaks in (tests are hermetic), `RUST_LOG=warn` and `NO_COLOR=1` unless `vars` say
/// otherwise, then `vars`. Stdin is closed; stdout and stderr are appended to `log`.
pub fn command(vars: &[(String, String)], log: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("PRESENCE_") || k.starts_with("OTEL_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening the log file");
    let err = out.try_clone().expect("cloning the log file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    cmd
}

/// THE "start a node and wait until it answers `/livez`": in this process or as a child, with
/// `vars`. A child that exits before it answers (it lost its free port to someone else) is
/// tried again on another port, up to 3 times. A child's output goes to `log`.
pub fn start(launch: Launch, vars: &[(String, String)], log: &Path) -> Node {
    let mut last_err = String::new();
    for _ in 0..3 {
        let started = match launch {
            Launch::InProcess => Node::in_process(vars, 0, None),
            Launch::Process => Ok(Node::spawn(vars, free_ports(1)[0], log)),
        };
        let mut node = match started {
            Ok(node) => node,
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        match node.wait_live(START_TIMEOUT) {
            Ok(()) => return node,
            Err(e) => last_err = e,
        }
    }
    panic!("the node failed to start: {last_err}");
}

/// Runs the binary with `vars` (expected to be refused at start), returning its exit code and
/// stderr.
pub fn run_to_exit(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let log = log_path("presence-test-exit");
    let mut all = self::vars(&[("PRESENCE_LISTEN", "127.0.0.1:0")]);
    all.extend(self::vars(vars));
    let child = command(&all, &log)
        .spawn()
        .expect("spawning the server binary");
    let mut node = Node {
        port: 0,
        run: Run::Child {
            child,
            log: log.clone(),
        },
    };
    let status = node.wait_exit(Duration::from_secs(10));
    let stderr = node.stderr();
    drop(node);
    let _ = std::fs::remove_file(&log);
    let status = status.unwrap_or_else(|| panic!("binary did not exit; stderr:\n{stderr}"));
    (status.code(), stderr)
}
