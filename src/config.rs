//! The one `Config`: every option is a flag and a `PRESENCE_*` environment variable.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::presence::{Rules, Status};

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// What a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Gateway and shard in one process, owning every user: `cargo run` as a whole service.
    All,
    /// Stateless: serves REST and routes each user to its shard over gRPC.
    Gateway,
    /// Owns the users of its partitions and their timers; serves gRPC.
    Shard,
}

/// Where the member list of shards comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// `PRESENCE_SHARDS`, health-checked over gRPC.
    Static,
    /// Ready endpoints of the shards' headless Service (EndpointSlices).
    Kubernetes,
    /// Instances registered in Nacos.
    Nacos,
}

/// How clients prove who they are (`PRESENCE_AUTH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No authentication: any client may act for any user (development only).
    None,
    /// `Authorization: Bearer <jwt>` on the presence API and the WebSocket.
    Jwt,
}

/// A secret setting: parsed like a string, never printed (`Debug` shows `<redacted>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_owned()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// presence-service: who is online, on which devices, busy or away, since when.
#[derive(Clone, Debug, Parser)]
#[command(name = "presence-service", version, about)]
pub struct Config {
    /// Address of the HTTP API, health and metrics.
    #[arg(long, env = "PRESENCE_LISTEN", default_value = "0.0.0.0:8004")]
    pub listen: SocketAddr,

    /// Address of a separate listener for `/metrics` (and `/livez`, `/readyz`). When set,
    /// `/metrics` is not served on PRESENCE_LISTEN, so an ingress to that port never exposes it.
    #[arg(long, env = "PRESENCE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// What this process does: all (one-process service), gateway or shard.
    #[arg(long, env = "PRESENCE_ROLE", value_enum, default_value = "all")]
    pub role: Role,

    /// Runtime worker threads; 0: one per CPU the process may use (a container's CPU limit
    /// counts). Processes that share a machine (a gateway and shards on one box) each take
    /// their share.
    #[arg(long, env = "PRESENCE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Address of a shard's gRPC service.
    #[arg(long, env = "PRESENCE_GRPC_LISTEN", default_value = "0.0.0.0:9004")]
    pub grpc_listen: SocketAddr,

    /// host:port under which this shard is known in the ring. Default: `POD_IP` (or the
    /// hostname) with the gRPC port.
    #[arg(long, env = "PRESENCE_ADVERTISE")]
    pub advertise: Option<String>,

    /// Where the shard list comes from: static, kubernetes or nacos.
    #[arg(long, env = "PRESENCE_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryKind,

    /// Static discovery: the shards' gRPC addresses, comma-separated.
    #[arg(long, env = "PRESENCE_SHARDS")]
    pub shards: Option<String>,

    /// Static discovery: how often each shard is health-checked (2 misses remove it).
    #[arg(long, env = "PRESENCE_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Whether a gateway sends heartbeats to shards in batches (one batch per shard, on a
    /// `HeartbeatStream` kept open to it, for whatever queued while earlier batches were out)
    /// rather than one call each.
    #[arg(long, env = "PRESENCE_COALESCE_HEARTBEATS", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub coalesce_heartbeats: bool,

    /// Whether a gateway sends onlines to shards in batches (an `OnlineBatch` call per shard
    /// for whatever queued while earlier batches were out, each online answered as the shard
    /// finishes it) rather than one call each: a burst of them, like a reconnect storm, costs
    /// the gateway and the shards a fraction of the calls.
    #[arg(long, env = "PRESENCE_COALESCE_ONLINE", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub coalesce_online: bool,

    /// Whether a gateway sends status reads (`GET /status/{userId}`, and the view of one user
    /// for a WebSocket `query` or a subscribe of one target; each with its own viewer) to shards
    /// in batches (a `StatusBatch` call per shard for whatever queued while earlier
    /// batches were out, each read answered as the shard finishes it) rather than one call each.
    #[arg(long, env = "PRESENCE_COALESCE_STATUS", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub coalesce_status: bool,

    /// The most a gateway's batch for one shard (of any kind) waits to fill: it goes once the
    /// runtime has read the requests that arrived with it (a few scheduler passes that add
    /// nothing), or holds 64, or this is out; 0 sends whatever queued while the previous batch
    /// was out.
    #[arg(long, env = "PRESENCE_COALESCE_WINDOW", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub coalesce_window: Duration,

    /// How long a gateway keeps retrying a call while ownership moves; then 503.
    #[arg(long, env = "PRESENCE_ROUTE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub route_timeout: Duration,

    /// How long a shard waits before loading a partition whose previous owner is still alive.
    /// Default: 3 x the health interval.
    #[arg(long, env = "PRESENCE_HANDOFF_GRACE", value_parser = humantime::parse_duration)]
    pub handoff_grace: Option<Duration>,

    /// Kubernetes discovery: namespace of the shards' Service (default: this pod's).
    #[arg(long, env = "PRESENCE_K8S_NAMESPACE")]
    pub k8s_namespace: Option<String>,

    /// Kubernetes discovery: name of the shards' headless Service.
    #[arg(long, env = "PRESENCE_K8S_SERVICE", default_value = "presence-shard")]
    pub k8s_service: String,

    /// Kubernetes discovery: the gRPC port, by name or number.
    #[arg(long, env = "PRESENCE_K8S_PORT", default_value = "grpc")]
    pub k8s_port: String,

    /// Nacos discovery: server address host:port.
    #[arg(long, env = "PRESENCE_NACOS_ADDR")]
    pub nacos_addr: Option<String>,

    /// Nacos discovery: namespace.
    #[arg(long, env = "PRESENCE_NACOS_NAMESPACE", default_value = "")]
    pub nacos_namespace: String,

    /// Nacos discovery: group.
    #[arg(long, env = "PRESENCE_NACOS_GROUP", default_value = "DEFAULT_GROUP")]
    pub nacos_group: String,

    /// Nacos discovery: service name of the shards.
    #[arg(long, env = "PRESENCE_NACOS_SERVICE", default_value = "presence-shard")]
    pub nacos_service: String,

    /// Interval clients are told to heartbeat at (`nextHeartbeatInterval`).
    #[arg(long, env = "PRESENCE_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// A device goes OFFLINE this long after its last heartbeat.
    #[arg(long, env = "PRESENCE_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// A user with no activity on any device for this long is AWAY.
    #[arg(long, env = "PRESENCE_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// A timed-out device that heartbeats within this window is revived.
    #[arg(long, env = "PRESENCE_RESUME_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resume_window: Duration,

    /// Most user ids in one batch query.
    #[arg(long, env = "PRESENCE_BATCH_LIMIT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_limit: u32,

    /// Most devices one user may have online at once.
    #[arg(long, env = "PRESENCE_MAX_DEVICES", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_devices: u32,

    /// Most targets one user may subscribe to.
    #[arg(long, env = "PRESENCE_MAX_SUBSCRIPTIONS", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_subscriptions: u32,

    /// Whether users may set the manual status INVISIBLE (`false`: setting it is refused with
    /// 400, and a user stored as INVISIBLE shows its real status).
    #[arg(long, env = "PRESENCE_ALLOW_INVISIBLE", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_invisible: bool,

    /// Most user ids in each privacy list of a user (`allow`, `deny`).
    #[arg(long, env = "PRESENCE_MAX_PRIVACY_LIST", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_privacy_list: u32,

    /// Frames queued per WebSocket before it counts as a slow consumer and is closed.
    #[arg(long, env = "PRESENCE_WS_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub ws_queue: u32,

    /// Messages per second a WebSocket client may send (bursts of twice that); a client that
    /// floods is closed with code 1008.
    #[arg(long, env = "PRESENCE_WS_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ws_rate: u32,

    /// Status, custom-text and privacy changes per user (REST `PUT`/`DELETE /status`,
    /// `PUT /privacy` and the socket's `setStatus`/`clearStatus`), as `N/PERIOD[,BURST]`; past
    /// it, 429 with `Retry-After`.
    /// `off` disables it. Counted per gateway.
    #[arg(long, env = "PRESENCE_STATUS_RATE", default_value = "20/1m,10", value_parser = crate::limits::Rate::from_str)]
    pub status_rate: crate::limits::Rate,

    /// How long a request refused by a rate limit (429) is held back before it is answered, at
    /// most its `Retry-After`; it holds no in-flight slot meanwhile. A client looping without
    /// waiting then costs one request per delay and connection. 0s answers at once.
    #[arg(long, env = "PRESENCE_RATE_LIMIT_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub rate_limit_delay: Duration,

    /// Most users whose status-change rate a gateway tracks at once (users within their burst
    /// are forgotten); past it, changes of further users are refused with 429.
    #[arg(long, env = "PRESENCE_STATUS_RATE_USERS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(16..=100_000_000))]
    pub status_rate_users: u32,

    /// Most records of users never online (a status set before any device came online) one
    /// shard creates within `PRESENCE_RETENTION`, which is how long they are kept; past it, such
    /// a change answers 503 (`presence_rate_limited_total{limit="offline_records"}`). 0 = no cap.
    #[arg(
        long,
        env = "PRESENCE_MAX_OFFLINE_RECORDS",
        default_value_t = 1_000_000
    )]
    pub max_offline_records: u64,

    /// The kernel send buffer of each client connection (`SO_SNDBUF`), in bytes; 0 leaves the
    /// kernel's autotuning. Bounds what a WebSocket that does not read holds in the kernel, so
    /// that it backs up into its queue (`PRESENCE_WS_QUEUE`) and is cut as a slow consumer.
    #[arg(long, env = "PRESENCE_SEND_BUFFER", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(0..=16_777_216))]
    pub send_buffer: u32,

    /// Open WebSockets per user on one gateway; a socket past it is closed at once with 4409.
    #[arg(long, env = "PRESENCE_WS_MAX_PER_USER", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub ws_max_per_user: u32,

    /// How often the server pings each WebSocket (0s: never).
    #[arg(long, env = "PRESENCE_WS_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ws_ping_interval: Duration,

    /// A WebSocket from which nothing (no message, no pong) arrived for this long is closed with
    /// 4408: a half-open connection does not hold its device online forever (0s: never).
    #[arg(long, env = "PRESENCE_WS_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub ws_idle_timeout: Duration,

    /// How often a node sends the liveness lease of its WebSockets: one heartbeat per socket
    /// heard from since the last round (any message or pong), in one batch per shard, instead
    /// of a call per message. Capped at a quarter of `PRESENCE_HEARTBEAT_TIMEOUT`.
    #[arg(long, env = "PRESENCE_WS_LEASE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub ws_lease_interval: Duration,

    /// Largest WebSocket frame or message a client may send, in bytes; a larger one closes the
    /// socket with 1009 before it is buffered.
    #[arg(long, env = "PRESENCE_WS_MAX_FRAME", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub ws_max_frame: u32,

    /// PEM certificate of this node for mTLS between nodes (server and client use), from the CA
    /// of `PRESENCE_GRPC_TLS_CA`. Set with `_KEY` and `_CA`, or none of them (plaintext gRPC).
    #[arg(long, env = "PRESENCE_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `PRESENCE_GRPC_TLS_CERT`.
    #[arg(long, env = "PRESENCE_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate: only peers with a certificate from it may call a shard, and shards
    /// must present one.
    #[arg(long, env = "PRESENCE_GRPC_TLS_CA")]
    pub grpc_tls_ca: Option<std::path::PathBuf>,

    /// The name every node's certificate carries (a DNS subject alternative name), checked by
    /// the calling side; addresses are pod IPs, so one shared name is checked instead.
    #[arg(
        long,
        env = "PRESENCE_GRPC_TLS_SERVER_NAME",
        default_value = "presence"
    )]
    pub grpc_tls_server_name: String,

    /// A WebSocket that closes takes its device offline after this grace, unless it reconnects.
    #[arg(long, env = "PRESENCE_WS_CLOSE_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ws_close_grace: Duration,

    /// On shutdown, how many `offline` calls a gateway makes at once for the devices of the
    /// sockets it closes (all within PRESENCE_DRAIN_TIMEOUT).
    #[arg(long, env = "PRESENCE_WS_DRAIN_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub ws_drain_concurrency: u32,

    /// Events queued per gateway stream on a shard before the gateway counts as slow.
    #[arg(long, env = "PRESENCE_EVENT_QUEUE", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    pub event_queue: u32,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "PRESENCE_MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_body_bytes: u32,

    /// Most HTTP requests in flight; more are answered 503 at once.
    #[arg(long, env = "PRESENCE_MAX_INFLIGHT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight: u32,

    /// How long a client may take to send a request's headers (from its first byte); then the
    /// connection is closed.
    #[arg(long, env = "PRESENCE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// How long a client may take to send a request's body once its headers arrived; then 408
    /// and the connection is closed. No in-flight slot is held meanwhile.
    #[arg(long, env = "PRESENCE_HTTP_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Duration,

    /// How long a keep-alive connection may sit idle between requests before it is closed.
    #[arg(long, env = "PRESENCE_HTTP_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// Resolution of the timer wheel; a timeout fires at most one tick late.
    #[arg(long, env = "PRESENCE_TIMER_TICK", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub timer_tick: Duration,

    /// How long SIGTERM waits for requests in flight before exiting.
    #[arg(long, env = "PRESENCE_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Redis Cluster seed nodes, comma-separated (`redis://127.0.0.1:7000,...`; `rediss://`
    /// for TLS to every node, all seeds alike). Unset: the embedded in-memory store (state is
    /// lost on restart).
    #[arg(long, env = "PRESENCE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// PEM CA certificate(s) the Redis nodes' certificates must come from (`rediss://` only).
    /// Unset: the system's roots.
    #[arg(long, env = "PRESENCE_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate presented to Redis (`tls-auth-clients yes`); set with `_KEY`
    /// (`rediss://` only).
    #[arg(long, env = "PRESENCE_REDIS_TLS_CERT")]
    pub redis_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `PRESENCE_REDIS_TLS_CERT`.
    #[arg(long, env = "PRESENCE_REDIS_TLS_KEY")]
    pub redis_tls_key: Option<std::path::PathBuf>,

    /// Redis ACL user (with `PRESENCE_REDIS_PASSWORD`); unset: the default user. Not with
    /// credentials in `PRESENCE_REDIS_URL`.
    #[arg(long, env = "PRESENCE_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Redis password, of `PRESENCE_REDIS_USERNAME` or of the default user (from a Secret,
    /// rather than in the URL). Not with credentials in `PRESENCE_REDIS_URL`.
    #[arg(long, env = "PRESENCE_REDIS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub redis_password: Option<Secret>,

    /// Longest a Redis operation may take, retries through a failover included; then 503.
    #[arg(long, env = "PRESENCE_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// How often a live user's record has its expiry pushed back (write-behind). Records of
    /// users no process looks after expire heartbeat timeout + 1.5 x this + 5s after.
    #[arg(long, env = "PRESENCE_REDIS_REFRESH", default_value = "10m", value_parser = humantime::parse_duration)]
    pub redis_refresh: Duration,

    /// Replicas a state change must reach before it is acknowledged (Redis WAIT); 0 = none.
    #[arg(long, env = "PRESENCE_REDIS_MIN_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=5))]
    pub redis_min_replicas: u32,

    /// How user records are written to Redis: binary (compact: a one- or two-device record is
    /// 30-60 bytes, which Redis keeps as a listpack) or json (all that builds before the binary
    /// record write and read: set it while a rolling upgrade from one runs). Both are read.
    #[arg(
        long,
        env = "PRESENCE_REDIS_RECORD_FORMAT",
        value_enum,
        default_value = "binary"
    )]
    pub redis_record_format: crate::store::record::RecordFormat,

    /// How long the record of a user without devices (last active time, settings) is kept;
    /// 0s keeps it forever.
    #[arg(long, env = "PRESENCE_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// How clients authenticate: none (anyone may act for any user; a warning at start-up) or
    /// jwt (a bearer token on the presence API and the WebSocket).
    #[arg(long, env = "PRESENCE_AUTH", value_enum, default_value = "none")]
    pub auth: AuthMode,

    /// URL of the JWKS whose RS256, ES256 and EdDSA keys verify tokens, picked by `kid`.
    #[arg(long, env = "PRESENCE_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Shared secret of HS256 tokens (development and tests; at least 32 bytes).
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<Secret>,

    /// The `iss` every token must carry; unchecked when unset.
    #[arg(long, env = "PRESENCE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` every token must carry.
    #[arg(long, env = "PRESENCE_JWT_AUDIENCE", default_value = "presence")]
    pub jwt_audience: String,

    /// A token names an unknown `kid`: the JWKS is fetched again at most this often.
    #[arg(long, env = "PRESENCE_JWT_JWKS_COOLDOWN", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_jwks_cooldown: Duration,

    /// How long a WebSocket stays open past its token's `exp` without a `refresh`; then it is
    /// closed with 4001.
    #[arg(long, env = "PRESENCE_WS_TOKEN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ws_token_grace: Duration,

    /// JSON overriding the label, icon and colour of statuses, e.g. `{"BUSY":{"color":"#FF0000"}}`.
    #[arg(long, env = "PRESENCE_STATUS_STYLES")]
    pub status_styles: Option<String>,

    /// Log format.
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info,nacos_sdk=warn")]
    pub log_filter: String,

    /// OTLP/gRPC endpoint for traces; no traces are exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// A configuration error, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}",
            self.variable, self.message
        )
    }
}

/// How one status looks to clients (状态图标).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusStyle {
    pub status: Status,
    pub label: String,
    pub icon: String,
    pub color: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleOverride {
    label: Option<String>,
    icon: Option<String>,
    color: Option<String>,
}

impl Config {
    /// Parses flags and environment, or prints the error and exits: 64 for a bad value.
    pub fn load() -> Config {
        match Config::try_load(std::env::args_os()) {
            Ok(c) => c,
            Err(Ok(e)) => {
                eprintln!("error: {e}");
                std::process::exit(EXIT_USAGE);
            }
            Err(Err(e)) => e.exit(),
        }
    }

    /// Parses and validates. `Err(Err(_))` is clap's own exit (help, version).
    pub fn try_load<I, T>(args: I) -> Result<Config, Result<ConfigError, clap::Error>>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config = Config::try_parse_from(args).map_err(|e| match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Err(e),
            _ => Ok(clap_error(&e)),
        })?;
        config.validate().map_err(Ok)?;
        Ok(config)
    }

    /// A config from `PRESENCE_*` variable names and values, as if they were set, ignoring the
    /// process environment for the variables named: what an in-process node of a test runs
    /// with. Every other setting takes its default (or the process environment).
    pub fn from_vars(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let command = Config::command();
        let mut args = vec!["presence-service".to_owned()];
        for (name, value) in vars {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == *name))
                .and_then(|a| a.get_long())
                .ok_or_else(|| ConfigError {
                    variable: (*name).into(),
                    message: "no such setting".into(),
                })?;
            args.push(format!("--{arg}={value}"));
        }
        match Config::try_load(args) {
            Ok(c) => Ok(c),
            Err(Ok(e)) => Err(e),
            Err(Err(e)) => Err(ConfigError {
                variable: String::new(),
                message: e.to_string(),
            }),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |variable: &str, message: &str| {
            Err(ConfigError {
                variable: variable.into(),
                message: message.into(),
            })
        };
        let ms = |d: Duration| d.as_millis();
        if self.worker_threads > 1024 {
            return bad(
                "PRESENCE_WORKER_THREADS",
                "must be at most 1024 (0: one per CPU)",
            );
        }
        if ms(self.heartbeat_interval) == 0 {
            return bad("PRESENCE_HEARTBEAT_INTERVAL", "must be at least 1ms");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(
                "PRESENCE_HEARTBEAT_TIMEOUT",
                "must be longer than PRESENCE_HEARTBEAT_INTERVAL",
            );
        }
        if ms(self.idle_timeout) == 0 {
            return bad("PRESENCE_IDLE_TIMEOUT", "must be at least 1ms");
        }
        let day = Duration::from_secs(86_400);
        for (var, d) in [
            ("PRESENCE_HEARTBEAT_INTERVAL", self.heartbeat_interval),
            ("PRESENCE_HEARTBEAT_TIMEOUT", self.heartbeat_timeout),
            ("PRESENCE_IDLE_TIMEOUT", self.idle_timeout),
            ("PRESENCE_RESUME_WINDOW", self.resume_window),
        ] {
            if d > day {
                return bad(var, "must be at most 24h");
            }
        }
        let tls = [
            ("PRESENCE_GRPC_TLS_CERT", &self.grpc_tls_cert),
            ("PRESENCE_GRPC_TLS_KEY", &self.grpc_tls_key),
            ("PRESENCE_GRPC_TLS_CA", &self.grpc_tls_ca),
        ];
        if tls.iter().any(|(_, p)| p.is_some()) {
            for (var, path) in tls {
                let Some(path) = path else {
                    return bad(var, "PRESENCE_GRPC_TLS_CERT, PRESENCE_GRPC_TLS_KEY and PRESENCE_GRPC_TLS_CA go together");
                };
                readable(var, path)?;
            }
        }
        if !self.ws_idle_timeout.is_zero() && self.ws_idle_timeout <= self.ws_ping_interval {
            return bad(
                "PRESENCE_WS_IDLE_TIMEOUT",
                "must be 0s or longer than PRESENCE_WS_PING_INTERVAL",
            );
        }
        if self.timer_tick < Duration::from_millis(1) || self.timer_tick > Duration::from_secs(1) {
            return bad("PRESENCE_TIMER_TICK", "must be between 1ms and 1s");
        }
        if let Some(url) = &self.redis_url {
            let nodes: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if nodes.is_empty() || nodes.len() > 64 {
                return bad("PRESENCE_REDIS_URL", "must list 1 to 64 nodes");
            }
            let mut credentials = false;
            for n in &nodes {
                let (_, rest) = crate::store::redis::split_scheme(n);
                let rest = rest.trim_end_matches('/');
                let hostport = match rest.rsplit_once('@') {
                    Some((_, addr)) => {
                        credentials = true;
                        addr
                    }
                    None => rest,
                };
                if !valid_hostport(hostport) {
                    return bad(
                        "PRESENCE_REDIS_URL",
                        "each node must be redis://[user:password@]host:port or rediss://...",
                    );
                }
            }
            let tls = nodes
                .iter()
                .filter(|n| crate::store::redis::split_scheme(n).0)
                .count();
            if tls != 0 && tls != nodes.len() {
                return bad(
                    "PRESENCE_REDIS_URL",
                    "all nodes must be rediss:// (TLS) or none of them",
                );
            }
            if tls == 0 {
                for (var, path) in [
                    ("PRESENCE_REDIS_TLS_CA", &self.redis_tls_ca),
                    ("PRESENCE_REDIS_TLS_CERT", &self.redis_tls_cert),
                    ("PRESENCE_REDIS_TLS_KEY", &self.redis_tls_key),
                ] {
                    if path.is_some() {
                        return bad(var, "needs rediss:// nodes in PRESENCE_REDIS_URL");
                    }
                }
            }
            if credentials && (self.redis_username.is_some() || self.redis_password.is_some()) {
                return bad(
                    "PRESENCE_REDIS_PASSWORD",
                    "credentials go in PRESENCE_REDIS_URL or in PRESENCE_REDIS_USERNAME and \
                     PRESENCE_REDIS_PASSWORD, not both",
                );
            }
        }
        if self.redis_username.is_some() && self.redis_password.is_none() {
            return bad(
                "PRESENCE_REDIS_PASSWORD",
                "PRESENCE_REDIS_USERNAME needs a password",
            );
        }
        if self.redis_tls_cert.is_some() != self.redis_tls_key.is_some() {
            let var = if self.redis_tls_cert.is_some() {
                "PRESENCE_REDIS_TLS_KEY"
            } else {
                "PRESENCE_REDIS_TLS_CERT"
            };
            return bad(
                var,
                "PRESENCE_REDIS_TLS_CERT and PRESENCE_REDIS_TLS_KEY go together",
            );
        }
        for (var, path) in [
            ("PRESENCE_REDIS_TLS_CA", &self.redis_tls_ca),
            ("PRESENCE_REDIS_TLS_CERT", &self.redis_tls_cert),
            ("PRESENCE_REDIS_TLS_KEY", &self.redis_tls_key),
        ] {
            if let Some(path) = path {
                readable(var, path)?;
            }
        }
        if self.redis_timeout < Duration::from_millis(10)
            || self.redis_timeout > Duration::from_secs(60)
        {
            return bad("PRESENCE_REDIS_TIMEOUT", "must be between 10ms and 60s");
        }
        if self.redis_refresh < Duration::from_secs(1) || self.redis_refresh > day {
            return bad("PRESENCE_REDIS_REFRESH", "must be between 1s and 24h");
        }
        if self.health_interval < Duration::from_millis(50)
            || self.health_interval > Duration::from_secs(60)
        {
            return bad("PRESENCE_HEALTH_INTERVAL", "must be between 50ms and 60s");
        }
        if self.route_timeout < Duration::from_millis(10)
            || self.route_timeout > Duration::from_secs(120)
        {
            return bad("PRESENCE_ROUTE_TIMEOUT", "must be between 10ms and 120s");
        }
        if self.role != Role::All {
            match self.discovery {
                DiscoveryKind::Static => {
                    let shards = self.static_shards();
                    if shards.is_empty() {
                        return bad(
                            "PRESENCE_SHARDS",
                            "static discovery needs the shards' host:port list",
                        );
                    }
                    if shards.iter().any(|s| !valid_hostport(s)) || shards.len() > 1024 {
                        return bad("PRESENCE_SHARDS", "must be 1 to 1024 host:port entries");
                    }
                    if self.role == Role::Shard && !shards.contains(&self.advertise_addr()) {
                        return bad(
                            "PRESENCE_ADVERTISE",
                            "must be one of PRESENCE_SHARDS with static discovery",
                        );
                    }
                }
                DiscoveryKind::Nacos => {
                    if !self.nacos_addr.as_deref().is_some_and(valid_hostport) {
                        return bad("PRESENCE_NACOS_ADDR", "nacos discovery needs host:port");
                    }
                }
                DiscoveryKind::Kubernetes => {
                    if self.k8s_service.is_empty() {
                        return bad("PRESENCE_K8S_SERVICE", "must not be empty");
                    }
                }
            }
            if self.role == Role::Shard && !valid_hostport(&self.advertise_addr()) {
                return bad("PRESENCE_ADVERTISE", "must be host:port");
            }
        }
        for (var, d) in [
            ("PRESENCE_HTTP_HEADER_TIMEOUT", self.http_header_timeout),
            ("PRESENCE_HTTP_BODY_TIMEOUT", self.http_body_timeout),
            ("PRESENCE_HTTP_IDLE_TIMEOUT", self.http_idle_timeout),
        ] {
            if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                return bad(var, "must be between 10ms and 1h");
            }
        }
        if self.ws_lease_interval < Duration::from_millis(10)
            || self.ws_lease_interval > Duration::from_secs(60)
        {
            return bad("PRESENCE_WS_LEASE_INTERVAL", "must be between 10ms and 1m");
        }
        if self.ws_close_grace > Duration::from_secs(300) {
            return bad("PRESENCE_WS_CLOSE_GRACE", "must be at most 5m");
        }
        if self.drain_timeout > Duration::from_secs(600) {
            return bad("PRESENCE_DRAIN_TIMEOUT", "must be at most 10m");
        }
        if self.auth == AuthMode::Jwt && self.jwt_jwks_url.is_none() && self.jwt_secret.is_none() {
            return bad(
                "PRESENCE_JWT_JWKS_URL",
                "PRESENCE_AUTH=jwt needs PRESENCE_JWT_JWKS_URL or PRESENCE_JWT_SECRET",
            );
        }
        if let Some(url) = &self.jwt_jwks_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
                return bad(
                    "PRESENCE_JWT_JWKS_URL",
                    "must be an http:// or https:// URL",
                );
            }
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.0.len() < 32) {
            return bad("PRESENCE_JWT_SECRET", "must be at least 32 bytes");
        }
        if self.jwt_audience.is_empty() {
            return bad("PRESENCE_JWT_AUDIENCE", "must not be empty");
        }
        if self.jwt_issuer.as_deref() == Some("") {
            return bad("PRESENCE_JWT_ISSUER", "must not be empty when set");
        }
        if self.jwt_jwks_cooldown < Duration::from_millis(100)
            || self.jwt_jwks_cooldown > Duration::from_secs(3600)
        {
            return bad("PRESENCE_JWT_JWKS_COOLDOWN", "must be between 100ms and 1h");
        }
        if self.ws_token_grace > Duration::from_secs(3600) {
            return bad("PRESENCE_WS_TOKEN_GRACE", "must be at most 1h");
        }
        self.status_styles().map(|_| ())
    }

    /// The static shard list.
    pub fn static_shards(&self) -> Vec<String> {
        self.shards
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// This shard's address in the ring.
    pub fn advertise_addr(&self) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        let port = self.grpc_listen.port();
        let host = std::env::var("POD_IP")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "127.0.0.1".into());
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// How long a new owner waits for a live previous owner to let go.
    pub fn grace(&self) -> Duration {
        self.handoff_grace.unwrap_or(self.health_interval * 3)
    }

    /// The timing rules for the domain.
    pub fn rules(&self) -> Rules {
        Rules {
            heartbeat_timeout: self.heartbeat_timeout.as_millis() as i64,
            idle_timeout: self.idle_timeout.as_millis() as i64,
            resume_window: self.resume_window.as_millis() as i64,
            max_devices: self.max_devices as usize,
            max_subscriptions: self.max_subscriptions as usize,
            allow_invisible: self.allow_invisible,
            max_privacy_list: self.max_privacy_list as usize,
        }
    }

    /// The Redis store settings, when `PRESENCE_REDIS_URL` is set.
    pub fn redis(&self) -> Option<crate::store::RedisOptions> {
        let url = self.redis_url.as_ref()?;
        Some(crate::store::RedisOptions {
            seeds: url
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            timeout: self.redis_timeout,
            refresh: self.redis_refresh,
            live_ttl: self.heartbeat_timeout + self.redis_refresh * 3 / 2 + Duration::from_secs(5),
            retention: self.retention,
            min_replicas: self.redis_min_replicas,
            record_format: self.redis_record_format,
            tls: crate::store::RedisTlsFiles {
                ca: self.redis_tls_ca.clone(),
                cert: self.redis_tls_cert.clone(),
                key: self.redis_tls_key.clone(),
            },
            username: self.redis_username.clone(),
            password: self.redis_password.as_ref().map(|p| p.0.clone()),
        })
    }

    /// The status styles: defaults, overridden by `PRESENCE_STATUS_STYLES`.
    pub fn status_styles(&self) -> Result<Vec<StatusStyle>, ConfigError> {
        let err = |message: String| ConfigError {
            variable: "PRESENCE_STATUS_STYLES".into(),
            message,
        };
        let mut styles: Vec<StatusStyle> = [
            (Status::Online, "在线", "circle-check", "#22C55E"),
            (Status::Offline, "离线", "circle-outline", "#9CA3AF"),
            (Status::Busy, "忙碌", "minus-circle", "#EF4444"),
            (Status::Away, "离开", "clock", "#F59E0B"),
            (Status::Invisible, "隐身", "eye-off", "#6B7280"),
        ]
        .into_iter()
        .map(|(status, label, icon, color)| StatusStyle {
            status,
            label: label.into(),
            icon: icon.into(),
            color: color.into(),
        })
        .collect();
        if !self.allow_invisible {
            // Turned off for the organisation: not offered.
            styles.retain(|s| s.status != Status::Invisible);
        }
        let Some(json) = &self.status_styles else {
            return Ok(styles);
        };
        let overrides: std::collections::BTreeMap<String, StyleOverride> =
            serde_json::from_str(json).map_err(|e| err(format!("not valid JSON: {e}")))?;
        for (name, o) in overrides {
            let status =
                Status::parse(&name).ok_or_else(|| err(format!("unknown status {name:?}")))?;
            let Some(style) = styles.iter_mut().find(|s| s.status == status) else {
                continue; // INVISIBLE while it is turned off
            };
            if let Some(label) = o.label {
                if label.is_empty() || label.chars().count() > 32 {
                    return Err(err(format!("{name}.label must be 1 to 32 characters")));
                }
                style.label = label;
            }
            if let Some(icon) = o.icon {
                if icon.is_empty() || icon.len() > 256 {
                    return Err(err(format!("{name}.icon must be 1 to 256 bytes")));
                }
                style.icon = icon;
            }
            if let Some(color) = o.color {
                let hex = color.strip_prefix('#').unwrap_or("");
                if !(hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())) {
                    return Err(err(format!("{name}.color must be #RRGGBB")));
                }
                style.color = color;
            }
        }
        Ok(styles)
    }
}

/// `Err` naming `variable` when the file at `path` cannot be read.
fn readable(variable: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| ConfigError {
            variable: variable.into(),
            message: format!("cannot read {}: {e}", path.display()),
        })
}

fn valid_hostport(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Turns a clap error into one that names the environment variable of the argument at fault.
fn clap_error(e: &clap::Error) -> ConfigError {
    let message = e.kind().as_str().unwrap_or("invalid value").to_owned();
    let detail = e.to_string();
    let detail = detail
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_owned();
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let long = arg
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("--")
        .to_owned();
    let variable = Config::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
        .and_then(|a| a.get_env().map(|v| v.to_string_lossy().into_owned()))
        .unwrap_or_else(|| {
            if long.is_empty() {
                "arguments".into()
            } else {
                format!("--{long}")
            }
        });
    ConfigError {
        variable,
        message: if detail.is_empty() { message } else { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vars_sets_what_it_names_and_refuses_unknown_names() {
        let c = Config::from_vars(&[
            ("PRESENCE_HEARTBEAT_TIMEOUT", "40s"),
            ("PRESENCE_ROLE", "shard"),
            ("PRESENCE_SHARDS", "127.0.0.1:1,127.0.0.1:2"),
            ("PRESENCE_ADVERTISE", "127.0.0.1:1"),
        ])
        .unwrap();
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(40));
        assert_eq!(c.role, Role::Shard);
        assert_eq!(c.static_shards().len(), 2);
        let e = Config::from_vars(&[("PRESENCE_NO_SUCH_THING", "1")]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_NO_SUCH_THING");
        let e = Config::from_vars(&[("PRESENCE_HEARTBEAT_TIMEOUT", "soon")]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_HEARTBEAT_TIMEOUT");
    }

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["presence-service"];
        all.extend_from_slice(args);
        Config::try_load(all).map_err(|e| e.expect("not a help request"))
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load(&[]).unwrap();
        assert_eq!(c.listen.port(), 8004);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(60));
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.batch_limit, 1000);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = load(&["--heartbeat-timeout", "soon"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_HEARTBEAT_TIMEOUT");
        let e = load(&["--batch-limit", "0"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_BATCH_LIMIT");
        let e = load(&["--heartbeat-timeout", "10s"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_HEARTBEAT_TIMEOUT");
        let e = load(&["--timer-tick", "2s"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_TIMER_TICK");
        let e = load(&["--ws-drain-concurrency", "0"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_WS_DRAIN_CONCURRENCY");
        assert_eq!(load(&[]).unwrap().ws_drain_concurrency, 64);
        let e = load(&["--role", "gateway"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_SHARDS");
        let e = load(&[
            "--role",
            "shard",
            "--shards",
            "a:1,b:2",
            "--advertise",
            "c:3",
        ])
        .unwrap_err();
        assert_eq!(e.variable, "PRESENCE_ADVERTISE");
        let e = load(&["--role", "shard", "--discovery", "nacos"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_NACOS_ADDR");
        assert!(load(&[
            "--role",
            "shard",
            "--shards",
            "a:1,b:2",
            "--advertise",
            "b:2"
        ])
        .is_ok());
        let e = load(&["--redis-url", "redis://nohost"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_REDIS_URL");
        for (flag, var) in [
            ("--http-header-timeout", "PRESENCE_HTTP_HEADER_TIMEOUT"),
            ("--http-body-timeout", "PRESENCE_HTTP_BODY_TIMEOUT"),
            ("--http-idle-timeout", "PRESENCE_HTTP_IDLE_TIMEOUT"),
        ] {
            assert_eq!(load(&[flag, "soon"]).unwrap_err().variable, var);
            assert_eq!(load(&[flag, "0s"]).unwrap_err().variable, var);
            assert!(load(&[flag, "250ms"]).is_ok());
        }
        let e = load(&["--status-styles", r#"{"BUSY":{"color":"red"}}"#]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_STATUS_STYLES");
    }

    #[test]
    fn auth_settings_are_checked() {
        let c = load(&[]).unwrap();
        assert_eq!(c.auth, AuthMode::None);
        assert_eq!(c.jwt_audience, "presence");
        assert_eq!(c.ws_token_grace, Duration::from_secs(30));
        let e = load(&["--auth", "jwt"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_JWT_JWKS_URL");
        let e = load(&["--auth", "oauth"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_AUTH");
        let e = load(&["--auth", "jwt", "--jwt-secret", "short"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_JWT_SECRET");
        let e = load(&["--auth", "jwt", "--jwt-jwks-url", "ftp://x/keys"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_JWT_JWKS_URL");
        let e = load(&["--ws-token-grace", "soon"]).unwrap_err();
        assert_eq!(e.variable, "PRESENCE_WS_TOKEN_GRACE");
        let secret = "0123456789abcdef0123456789abcdef";
        let c = load(&["--auth", "jwt", "--jwt-secret", secret]).unwrap();
        assert!(
            !format!("{c:?}").contains(secret),
            "the secret is never printed"
        );
        assert!(load(&[
            "--auth",
            "jwt",
            "--jwt-jwks-url",
            "http://idp:8080/jwks.json"
        ])
        .is_ok());
    }

    #[test]
    fn redis_tls_and_credentials_are_checked() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem");
        let cert = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/node.pem");
        let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/node.key");
        let tls = "rediss://a:1,rediss://b:2";
        assert!(
            load(&["--redis-url", tls]).is_ok(),
            "system roots by default"
        );
        let c = load(&[
            "--redis-url",
            tls,
            "--redis-tls-ca",
            ca,
            "--redis-tls-cert",
            cert,
            "--redis-tls-key",
            key,
        ])
        .unwrap();
        assert_eq!(c.redis().unwrap().tls.ca.as_deref(), Some(ca.as_ref()));
        for (args, var) in [
            (
                &["--redis-url", "rediss://a:1,redis://b:2"][..],
                "PRESENCE_REDIS_URL",
            ),
            (&["--redis-url", "rediss://a:1,b:2"], "PRESENCE_REDIS_URL"),
            (&["--redis-url", "rediss://a"], "PRESENCE_REDIS_URL"),
            (
                &["--redis-url", "redis://a:1", "--redis-tls-ca", ca],
                "PRESENCE_REDIS_TLS_CA",
            ),
            (
                &["--redis-url", tls, "--redis-tls-cert", cert],
                "PRESENCE_REDIS_TLS_KEY",
            ),
            (
                &["--redis-url", tls, "--redis-tls-key", key],
                "PRESENCE_REDIS_TLS_CERT",
            ),
            (
                &["--redis-url", tls, "--redis-tls-ca", "/nonexistent/ca.pem"],
                "PRESENCE_REDIS_TLS_CA",
            ),
            (&["--redis-username", "presence"], "PRESENCE_REDIS_PASSWORD"),
            (
                &["--redis-url", "rediss://u:p@a:1", "--redis-password", "p"],
                "PRESENCE_REDIS_PASSWORD",
            ),
        ] {
            assert_eq!(load(args).unwrap_err().variable, var, "{args:?}");
        }
        let c = load(&["--redis-url", "rediss://presence:s3cret@a:1"]).unwrap();
        assert!(c.redis().unwrap().password.is_none());
        let c = load(&[
            "--redis-url",
            "redis://a:1",
            "--redis-username",
            "presence",
            "--redis-password",
            "s3cret-from-a-secret",
        ])
        .unwrap();
        let opts = c.redis().unwrap();
        assert_eq!(opts.username.as_deref(), Some("presence"));
        assert!(
            !format!("{c:?}{opts:?}").contains("s3cret-from-a-secret"),
            "the password is never printed"
        );
    }

    #[test]
    fn styles_override() {
        let c = load(&[
            "--status-styles",
            r##"{"BUSY":{"label":"勿扰","color":"#FF0000"}}"##,
        ])
        .unwrap();
        let s = c.status_styles().unwrap();
        let busy = s.iter().find(|s| s.status == Status::Busy).unwrap();
        assert_eq!(
            (busy.label.as_str(), busy.color.as_str()),
            ("勿扰", "#FF0000")
        );
        assert_eq!(busy.icon, "minus-circle");
    }
}
