//! The Redis Cluster store: one hash per user and one live index per partition, routed by the
//! store itself so that a batch costs one pipelined round trip per node.
//!
//! Keys (the `{p}` hash tag is the user's partition, so a user's record and its partition's live
//! index share a slot and change together in one script):
//! - `presence:{p}:u:<userId>`: hash `v` (version), `l` (the version of the last write that
//!   left the user live, else 0: with `l` = `v` the user is in the live index), `s` (the state
//!   as JSON). Expires `live_ttl` after its last write or refresh while the user has devices,
//!   `retention` after the last change otherwise.
//! - `presence:{p}:live`: sorted set of the partition's users that have devices, scored by the
//!   time of the write that added them (`ZADD NX`, skipped when the record says the user is in
//!   it already). A restarted or new owner reloads its timers from it; nothing reads the scores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};

use super::record::{self, RecordFormat};
use super::{Saved, Store, Write};
use crate::error::Error;
use crate::metrics::{Metrics, RedisError, StoreOp};
use crate::presence::{UserId, UserState};
use crate::ring::{partition_of, PARTITIONS};

const SLOTS: usize = 16384;

/// Writes a group of users' states (all on this node), each unless its partition was fenced by
/// a newer owner (-1) or a newer version is stored (0), keeping the live index in step (1).
/// The TTL is set when the record is new, the user goes live, or the user is not live: a
/// change of a user who stays live leaves it to the shard's refresh (one command less).
/// The record's `l` is its version when that write left the user live (so in the live index):
/// a write that finds `l` equal to `v` skips the `ZADD NX`, which could change nothing (one
/// command less for a user who stays live). A record whose last write did not set `l` (written
/// by an older version of this script during a rolling upgrade) gets the `ZADD NX` as before.
/// One call per group: one script run and one `MULTI`/`EXEC` to the replicas, not one each.
/// ARGV: the group's score (the time), the TTL ms of a live user's record and of another's
/// (0 = none); then, per write: user key, fence key, version, state, live (1/0), fencing token
/// (0 = none). The live index key and the userId (its member) are needed only when a user goes
/// live or offline, so the script derives them from the keys then (`presence:{p}:fence` →
/// `presence:{p}:live`; `presence:{p}:u:<userId>` → `<userId>`) instead of every write carrying
/// them. KEYS: the first write's user key: it routes the call (Redis Cluster wants declared keys
/// in one slot; the flag lets the script reach the other writes' slots on this node). A write
/// that fails answers its own error; one whose slot is not on this node (moved, migrating), or
/// that finds the cluster down, answers `TRYAGAIN` (retried after a topology refresh).
const SAVE: &str = r#"#!lua flags=allow-cross-slot-keys
local score, live_ttl, other_ttl = ARGV[1], ARGV[2], ARGV[3]
local function index_and_member(user, fence)
  return string.sub(fence, 1, -6) .. 'live', string.sub(user, #fence - 2)
end
local function save(i)
  local user, fence, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if ARGV[i + 5] ~= '0' then
    local f = tonumber(redis.call('GET', fence) or '0')
    if f > tonumber(ARGV[i + 5]) then return -1 end
  end
  local got = redis.call('HMGET', user, 'v', 'l')
  local cur = tonumber(got[1] or '0')
  if cur >= tonumber(v) then return 0 end
  local ttl, l, went = other_ttl, '0', 1
  if ARGV[i + 4] == '1' then
    ttl, l = live_ttl, v
    if cur ~= 0 and got[2] == got[1] then
      went = 0
    else
      local index, member = index_and_member(user, fence)
      went = redis.call('ZADD', index, 'NX', score, member)
    end
  else
    local index, member = index_and_member(user, fence)
    redis.call('ZREM', index, member)
  end
  redis.call('HSET', user, 'v', v, 's', ARGV[i + 3], 'l', l)
  if went == 1 or cur == 0 then
    if ttl ~= '0' then redis.call('PEXPIRE', user, ttl) else redis.call('PERSIST', user) end
  end
  return 1
end
local out = {}
for i = 4, #ARGV, 6 do
  local ok, r = pcall(save, i)
  if not ok then
    local msg = type(r) == 'table' and r.err or tostring(r)
    if string.find(msg, 'non local key', 1, true) or string.find(msg, 'cluster is down', 1, true) then
      msg = 'TRYAGAIN ' .. msg
    end
    r = {err = msg}
  end
  out[#out + 1] = r
end
return out
"#;

/// Changes a subscription set. KEYS: the set. ARGV: mode, max, targets (distinct).
/// Returns -1 (changing nothing) past the limit, else the members.
const SUBSCRIBE: &str = r#"
local mode, max = ARGV[1], tonumber(ARGV[2])
local n = #ARGV - 2
if mode == 'replace' then
  if n > max then return -1 end
  redis.call('DEL', KEYS[1])
  for i = 3, #ARGV, 1000 do redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
elseif mode == 'add' then
  local new = 0
  for i = 3, #ARGV do if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then new = new + 1 end end
  if redis.call('SCARD', KEYS[1]) + new > max then return -1 end
  for i = 3, #ARGV, 1000 do redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
else
  for i = 3, #ARGV, 1000 do redis.call('SREM', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
end
return redis.call('SMEMBERS', KEYS[1])
"#;

/// Settings of the Redis store (`Debug` leaves the password out).
#[derive(Clone)]
pub struct RedisOptions {
    /// Seed nodes, `host:port`, `redis://[user:password@]host:port` or `rediss://...` (TLS, to
    /// every node: all seeds alike).
    pub seeds: Vec<String>,
    /// How long one operation may take, retries through a failover included.
    pub timeout: Duration,
    /// How often live users' records are refreshed (write-behind).
    pub refresh: Duration,
    /// TTL of a live user's record: a little above heartbeat timeout + refresh.
    pub live_ttl: Duration,
    /// TTL of a record without devices; zero keeps it forever.
    pub retention: Duration,
    /// Replicas a state change must reach before it is acknowledged (0 to not wait).
    pub min_replicas: u32,
    /// How records are written (both formats are read).
    pub record_format: RecordFormat,
    /// PEM files of `rediss://`.
    pub tls: RedisTlsFiles,
    /// ACL user and password, when not in the seeds' URLs.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("seeds", &self.seeds.len())
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The PEM files of a TLS connection to the nodes (`rediss://`).
#[derive(Clone, Debug, Default)]
pub struct RedisTlsFiles {
    /// The CA(s) the nodes' certificates must come from; `None`: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate and its key, for `tls-auth-clients yes`.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl RedisTlsFiles {
    /// Reads the files (once, at start-up: every dial reuses them).
    fn load(&self) -> Result<redis::TlsCertificates, Error> {
        let read = |var: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                Error::BadRequest(format!("{var}: cannot read {}: {e}", path.display()))
            })
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("PRESENCE_REDIS_TLS_CERT", cert)?,
                client_key: read("PRESENCE_REDIS_TLS_KEY", key)?,
            }),
            _ => None,
        };
        let root_cert = match &self.ca {
            Some(ca) => Some(read("PRESENCE_REDIS_TLS_CA", ca)?),
            None => None,
        };
        if root_cert
            .as_ref()
            .is_some_and(|pem| !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----"))
        {
            return Err(Error::BadRequest(
                "PRESENCE_REDIS_TLS_CA: no PEM certificate in the file".into(),
            ));
        }
        // Parses the PEM now, so that a bad file stops the start instead of every dial.
        let parse = |var: &str, certs: redis::TlsCertificates| {
            redis::Client::build_with_tls("rediss://localhost:1/", certs)
                .map(drop)
                .map_err(|e| Error::BadRequest(format!("{var}: {e}")))
        };
        let certs = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        parse(
            "PRESENCE_REDIS_TLS_CA",
            redis::TlsCertificates {
                client_tls: None,
                ..certs.clone()
            },
        )?;
        parse(
            "PRESENCE_REDIS_TLS_CERT or PRESENCE_REDIS_TLS_KEY",
            redis::TlsCertificates {
                root_cert: None,
                ..certs.clone()
            },
        )?;
        Ok(certs)
    }
}

/// Whether a seed is `rediss://` (TLS), and the seed without its scheme.
pub fn split_scheme(seed: &str) -> (bool, &str) {
    let seed = seed.trim();
    match seed.strip_prefix("rediss://") {
        Some(rest) => (true, rest),
        None => (false, seed.strip_prefix("redis://").unwrap_or(seed)),
    }
}

struct Topology {
    /// Node index of every slot's master.
    slots: Vec<u16>,
    /// Master addresses, by node index. Connections live in `RedisStore::conns`, so that a
    /// topology can be installed while one of its nodes is unreachable.
    nodes: Vec<String>,
}

/// After a failed dial, a node is not dialled again for this long: callers fail at once
/// meanwhile (and retry after a topology refresh, within their deadline).
const DIAL_BACKOFF: Duration = Duration::from_millis(200);
/// A topology read this recently is fresh enough: callers use it instead of reading another.
const REFRESH_GAP: Duration = Duration::from_millis(50);
/// A topology refresh asks one more node every this long until one answers, so a stalled
/// node costs it at most this.
const REFRESH_HEDGE: Duration = Duration::from_millis(100);

/// The connection to one node: dialled by one caller at a time, under a deadline; dropped when
/// it fails (an I/O error or no answer in time) and dialled again on next use.
#[derive(Default)]
struct NodeConn {
    dialling: tokio::sync::Mutex<()>,
    /// The connection and its generation (so that a failure on an old connection never drops
    /// a newer one).
    conn: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// The write connection: state changes' scripts and their `WAIT` only (see [`Lane`]).
    writer: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// The generation of the write connection the save script was loaded on (0: none).
    script_on: std::sync::atomic::AtomicU64,
    /// Saves waiting for the node's next group, and whether a group is in flight.
    queue: Mutex<WriteQueue>,
    generation: std::sync::atomic::AtomicU64,
    failed_at: Mutex<Option<Instant>>,
}

/// Which connection of a node a call goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Reads, fences, subscriptions, pings, topology: one multiplexed connection.
    Shared,
    /// State changes: one group at a time (scripts, then `WAIT`), so that a `WAIT` delays no
    /// other traffic and waits for exactly the group's writes (`WAIT` counts the writes of its
    /// own connection).
    Write,
}

impl NodeConn {
    fn slot(&self, lane: Lane) -> &Mutex<Option<(u64, MultiplexedConnection)>> {
        match lane {
            Lane::Shared => &self.conn,
            Lane::Write => &self.writer,
        }
    }
}

/// Most turns a node's group task yields before it takes the queue, while saves keep coming.
const GATHER_TURNS: usize = 4;

/// Most writes one group carries (a single larger save goes alone).
const MAX_GROUP: usize = 256;

/// The saves waiting for a node's write connection. A save that arrives while a group is in
/// flight joins the next one.
#[derive(Default)]
struct WriteQueue {
    jobs: std::collections::VecDeque<SaveJob>,
    /// A task is sending groups; it takes the queued jobs until there are none.
    running: bool,
}

/// The writes of one save call that go to one node.
struct SaveJob {
    writes: Vec<Arc<SaveArgs>>,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Vec<Result<Value, WriteFailure>>>,
}

/// One write of the save script: its user and partition (the keys are written into the
/// command, not kept per write), version, state and fencing token.
#[derive(Clone, Debug)]
struct SaveArgs {
    slot: u16,
    partition: u32,
    version: u64,
    /// The state's record ([`record`]).
    record: Vec<u8>,
    live: bool,
    user: UserId,
    fence: u64,
}

impl SaveArgs {
    /// Its six arguments of the save script, in the script's order (`key` is scratch space for
    /// the keys).
    fn push(&self, c: &mut Cmd, key: &mut String) {
        put_user_key(key, self.partition, self.user);
        c.arg(key.as_str());
        put_fence_key(key, self.partition);
        c.arg(key.as_str())
            .arg(self.version)
            .arg(&self.record[..])
            .arg(if self.live { "1" } else { "0" })
            .arg(self.fence);
    }
}

/// The arguments a save script's writes share: the score of users it adds to a live index (the
/// time, ms since the epoch) and the TTLs of live and other users' records (ms, 0 = none).
#[derive(Clone, Copy, Debug)]
struct GroupArgs {
    score: i64,
    live_ttl_ms: u64,
    other_ttl_ms: u64,
}

/// One call of the save script for `writes` (at least one): `EVALSHA` (`script` is the hash)
/// or `EVAL` (`script` is the source).
fn save_cmd(name: &str, script: &str, group: GroupArgs, writes: &[&SaveArgs]) -> Cmd {
    // The name, the script, one key and three shared arguments; six a write, ~40 bytes of keys
    // and numbers besides its state.
    let data: usize = writes.iter().map(|w| w.record.len() + 64).sum();
    let mut c = Cmd::with_capacity(7 + 6 * writes.len(), 96 + data);
    let mut key = String::with_capacity(48);
    put_user_key(&mut key, writes[0].partition, writes[0].user);
    c.arg(name)
        .arg(script)
        .arg(1)
        .arg(key.as_str())
        .arg(group.score)
        .arg(group.live_ttl_ms)
        .arg(group.other_ttl_ms);
    for w in writes {
        w.push(&mut c, &mut key);
    }
    c
}

/// Why one write of a group got no answer (the error itself is counted and logged where it
/// happens).
#[derive(Clone, Copy, Debug)]
enum WriteFailure {
    /// Worth another try after a topology refresh (no connection, no answer in time, moved).
    Retriable,
    Fatal,
}

/// The SHA1 of [`SAVE`], for `EVALSHA`.
static SAVE_SHA: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| redis::Script::new(SAVE).get_hash().to_owned());

type SharedRefresh =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<(), Error>>>;

/// The Redis Cluster implementation of [`Store`].
pub struct RedisStore {
    opts: RedisOptions,
    /// The ACL user and password for every node; never logged.
    auth: redis::RedisConnectionInfo,
    /// The certificates of `rediss://`; `None`: plaintext.
    tls: Option<redis::TlsCertificates>,
    topology: RwLock<Option<Arc<Topology>>>,
    /// Connections by address, reused across topology refreshes.
    conns: Mutex<HashMap<String, Arc<NodeConn>>>,
    /// The topology refresh in flight, which every caller that needs one joins.
    refreshing: Mutex<Option<SharedRefresh>>,
    /// When the last topology refresh succeeded.
    refreshed_at: Mutex<Option<Instant>>,
    /// This store, for the refresh task (which outlives the caller that started it).
    me: std::sync::Weak<RedisStore>,
    partition_slots: Vec<u16>,
    metrics: Arc<Metrics>,
}

/// The CRC16 (XMODEM) Redis Cluster uses for key slots.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash tag of partition `p` (what goes between the braces); written into keys without an
/// allocation of its own.
fn tag(p: u32) -> impl std::fmt::Display {
    p
}

pub fn user_key(user: UserId) -> String {
    let mut key = String::with_capacity(32);
    put_user_key(&mut key, partition_of(user), user);
    key
}

/// [`user_key`] into `buf` (cleared first), given the user's partition.
fn put_user_key(buf: &mut String, partition: u32, user: UserId) {
    use std::fmt::Write as _;
    buf.clear();
    let _ = write!(buf, "presence:{{{}}}:u:{user}", tag(partition));
}

pub fn subscriptions_key(user: UserId) -> String {
    format!("presence:{{{}}}:sub:{user}", tag(partition_of(user)))
}

pub fn live_key(partition: u32) -> String {
    format!("presence:{{{}}}:live", tag(partition))
}

/// The fencing token of a partition's owner: incremented by every new owner.
pub fn fence_key(partition: u32) -> String {
    let mut key = String::with_capacity(24);
    put_fence_key(&mut key, partition);
    key
}

/// [`fence_key`] into `buf` (cleared first).
fn put_fence_key(buf: &mut String, partition: u32) {
    use std::fmt::Write as _;
    buf.clear();
    let _ = write!(buf, "presence:{{{}}}:fence", tag(partition));
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::StoreUnavailable(e.to_string())
}

fn retriable(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            K::Moved
                | K::Ask
                | K::TryAgain
                | K::ClusterDown
                | K::MasterDown
                | K::BusyLoadingError
                | K::ReadOnly
        )
}

/// How a node failed a call.
#[derive(Debug)]
enum NodeError {
    /// No connection: the dial failed or timed out, or failed moments ago.
    Unreachable,
    /// No answer before the deadline.
    Timeout,
    Redis(redis::RedisError),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Unreachable => f.write_str("unreachable"),
            NodeError::Timeout => f.write_str("no answer in time"),
            NodeError::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl NodeError {
    /// Whether the node's connection is suspect and must be dialled again.
    fn drops_connection(&self) -> bool {
        match self {
            NodeError::Unreachable => false,
            NodeError::Timeout => true,
            NodeError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
            }
        }
    }

    fn retriable(&self) -> bool {
        match self {
            NodeError::Unreachable | NodeError::Timeout => true,
            NodeError::Redis(e) => retriable(e),
        }
    }
}

/// The answer when the cluster does not answer in time (no address, no Redis text: those go to
/// the logs).
fn timed_out() -> Error {
    store_err("redis cluster did not answer in time")
}

impl RedisStore {
    /// Connects to the cluster and reads its topology.
    pub async fn connect(
        opts: RedisOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisStore>, Error> {
        // `redis[s]://[user:password@]host:port`: the credentials of the first seed that has
        // some (else PRESENCE_REDIS_USERNAME and _PASSWORD) and the scheme are used for every
        // node, including those learnt from CLUSTER SLOTS.
        let mut userinfo = None;
        let mut schemes = Vec::new();
        let seeds = opts
            .seeds
            .iter()
            .map(|s| {
                let (tls, s) = split_scheme(s);
                schemes.push(tls);
                let s = s.trim_end_matches('/');
                match s.rsplit_once('@') {
                    Some((auth, addr)) => {
                        userinfo.get_or_insert_with(|| auth.to_owned());
                        addr.to_owned()
                    }
                    None => s.to_owned(),
                }
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        if seeds.is_empty() {
            return Err(Error::BadRequest("PRESENCE_REDIS_URL names no node".into()));
        }
        let tls = if schemes.iter().all(|&t| t) {
            Some(opts.tls.load()?)
        } else if schemes.iter().any(|&t| t) {
            return Err(Error::BadRequest(
                "PRESENCE_REDIS_URL mixes redis:// and rediss:// nodes".into(),
            ));
        } else {
            None
        };
        let auth = match userinfo {
            // Percent-decoded by the crate's own URL parser.
            Some(userinfo) => {
                redis::IntoConnectionInfo::into_connection_info(format!(
                    "redis://{userinfo}@localhost/"
                ))
                .map_err(|_| Error::BadRequest("PRESENCE_REDIS_URL: bad credentials".into()))?
                .redis
            }
            None => redis::RedisConnectionInfo {
                username: opts.username.clone(),
                password: opts.password.clone(),
                ..Default::default()
            },
        };
        let store = Arc::new_cyclic(|me| RedisStore {
            opts: RedisOptions { seeds, ..opts },
            auth,
            tls,
            topology: RwLock::new(None),
            conns: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(None),
            refreshed_at: Mutex::new(None),
            me: me.clone(),
            partition_slots: (0..PARTITIONS)
                .map(|p| crc16(tag(p).to_string().as_bytes()) % SLOTS as u16)
                .collect(),
            metrics,
        });
        store
            .refresh_topology(Instant::now() + store.opts.timeout)
            .await?;
        Ok(store)
    }

    fn node(&self, addr: &str) -> Arc<NodeConn> {
        let mut conns = self.conns.lock();
        match conns.get(addr) {
            Some(n) => n.clone(),
            None => conns.entry(addr.to_owned()).or_default().clone(),
        }
    }

    /// The connection to `addr`, dialled if there is none, by `deadline` and within the store's
    /// timeout. A node whose dial failed moments ago fails at once.
    async fn connection(
        &self,
        addr: &str,
        deadline: Instant,
        lane: Lane,
    ) -> Result<(u64, MultiplexedConnection), NodeError> {
        let node = self.node(addr);
        if let Some(c) = node.slot(lane).lock().clone() {
            return Ok(c);
        }
        let _dialling = tokio::time::timeout_at(deadline.into(), node.dialling.lock())
            .await
            .map_err(|_| NodeError::Timeout)?;
        // Dialled by someone else while we waited?
        if let Some(c) = node.slot(lane).lock().clone() {
            return Ok(c);
        }
        if node
            .failed_at
            .lock()
            .is_some_and(|t| t.elapsed() < DIAL_BACKOFF)
        {
            return Err(NodeError::Unreachable);
        }
        let by = deadline.min(Instant::now() + self.opts.timeout);
        match tokio::time::timeout_at(by.into(), self.dial(addr)).await {
            Ok(Ok(conn)) => {
                let generation = node
                    .generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                *node.slot(lane).lock() = Some((generation, conn.clone()));
                *node.failed_at.lock() = None;
                Ok((generation, conn))
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %addr, error = %e, "cannot connect to a redis node");
                *node.failed_at.lock() = Some(Instant::now());
                Err(NodeError::Unreachable)
            }
            Err(_) => {
                tracing::warn!(node = %addr, "connecting to a redis node timed out");
                *node.failed_at.lock() = Some(Instant::now());
                Err(NodeError::Unreachable)
            }
        }
    }

    async fn dial(&self, addr: &str) -> Result<MultiplexedConnection, redis::RedisError> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
            .ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "not host:port"))
            })?;
        let info = |addr| redis::ConnectionInfo {
            addr,
            redis: self.auth.clone(),
        };
        let client = match &self.tls {
            Some(certs) => {
                let addr = redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                };
                redis::Client::build_with_tls(info(addr), certs.clone())?
            }
            None => redis::Client::open(info(redis::ConnectionAddr::Tcp(host, port)))?,
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.opts.timeout)
            .set_response_timeout(self.opts.timeout);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Drops the connection `generation` to `addr` (not a newer one): the next call dials.
    fn forget(&self, addr: &str, generation: u64) {
        if let Some(node) = self.conns.lock().get(addr) {
            for lane in [Lane::Shared, Lane::Write] {
                let mut conn = node.slot(lane).lock();
                if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
                    *conn = None;
                }
            }
        }
    }

    /// One command (or pipeline) on `addr`, by `deadline`. A connection that fails or does not
    /// answer in time is dropped.
    async fn call<T: redis::FromRedisValue>(
        &self,
        addr: &str,
        deadline: Instant,
        run: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, NodeError> {
        self.call_with(addr, deadline, true, run).await
    }

    /// [`Self::call`]; a connection that answers late is kept unless `late_drops` (for a
    /// command whose deadline is short by design, like `WAIT`).
    async fn call_with<T: redis::FromRedisValue>(
        &self,
        addr: &str,
        deadline: Instant,
        late_drops: bool,
        run: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, NodeError> {
        let (generation, mut conn) = self.connection(addr, deadline, Lane::Shared).await?;
        let r = match tokio::time::timeout_at(deadline.into(), run(&mut conn)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => NodeError::Redis(e),
            Err(_) => NodeError::Timeout,
        };
        let late = matches!(r, NodeError::Timeout);
        if r.drops_connection() && (late_drops || !late) {
            self.forget(addr, generation);
        }
        Err(r)
    }

    /// Makes sure the topology is fresh: joins the refresh in flight, or starts one (unless one
    /// just finished). Waits for it until `deadline` at most; the refresh itself goes on, within
    /// the store's timeout, for those who come next.
    async fn refresh_topology(&self, deadline: Instant) -> Result<(), Error> {
        let refresh = {
            let mut slot = self.refreshing.lock();
            match slot.as_ref() {
                Some(r) if r.peek().is_none() => r.clone(),
                _ => {
                    if self
                        .refreshed_at
                        .lock()
                        .is_some_and(|t| t.elapsed() < REFRESH_GAP)
                    {
                        return Ok(());
                    }
                    let Some(me) = self.me.upgrade() else {
                        return Err(store_err("store closed"));
                    };
                    let task = tokio::spawn(async move { me.read_topology().await });
                    let r = futures::FutureExt::shared(futures::FutureExt::boxed(async move {
                        task.await
                            .unwrap_or_else(|_| Err(store_err("topology refresh failed")))
                    }));
                    *slot = Some(r.clone());
                    r
                }
            }
        };
        tokio::time::timeout_at(deadline.into(), refresh)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    /// Reads `CLUSTER SLOTS` and installs the new topology, within the store's timeout. Asks the
    /// known nodes and the seeds one after another, a new one every `REFRESH_HEDGE` while none
    /// has answered, and takes the first complete answer: a stalled node delays it by no more
    /// than that.
    async fn read_topology(&self) -> Result<(), Error> {
        use futures::stream::{FuturesUnordered, StreamExt};
        self.metrics.store.redis_topology_refreshes.inc();
        let deadline = Instant::now() + self.opts.timeout;
        let mut candidates: Vec<String> = self
            .topology
            .read()
            .as_ref()
            .map(|t| t.nodes.clone())
            .unwrap_or_default();
        for s in &self.opts.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut asks: FuturesUnordered<_> = candidates
            .into_iter()
            .enumerate()
            .map(|(i, addr)| async move {
                tokio::time::sleep(REFRESH_HEDGE * i as u32).await;
                let r = self
                    .call(&addr, deadline, async |c: &mut MultiplexedConnection| {
                        redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await
                    })
                    .await;
                (addr, r)
            })
            .collect();
        let outcome = tokio::time::timeout_at(deadline.into(), async {
            while let Some((addr, r)) = asks.next().await {
                match r
                    .map_err(|e| e.to_string())
                    .and_then(|v| parse_slots(v, &addr))
                {
                    Ok(t) => return Some(t),
                    Err(e) => {
                        tracing::debug!(node = %addr, error = %e, "no topology from this node")
                    }
                }
            }
            None
        })
        .await;
        match outcome {
            Ok(Some(t)) => {
                *self.topology.write() = Some(Arc::new(t));
                *self.refreshed_at.lock() = Some(Instant::now());
                Ok(())
            }
            _ => {
                tracing::warn!("cannot read the redis cluster topology from any node");
                Err(store_err("cannot read the redis cluster topology"))
            }
        }
    }

    fn topology(&self) -> Option<Arc<Topology>> {
        self.topology.read().clone()
    }

    /// `verb` (`INCR`, `GET`) of each partition's fence key, each routed to its partition's slot.
    fn fence_cmds(&self, verb: &str, partitions: &[u32]) -> Vec<(u16, Cmd)> {
        partitions
            .iter()
            .map(|&p| {
                let mut c = redis::cmd(verb);
                c.arg(fence_key(p));
                (self.partition_slots[p as usize], c)
            })
            .collect()
    }

    /// Runs commands, each with the slot it must go to: one pipeline per node, all nodes at
    /// once. Failed node groups are retried after a topology refresh; the whole operation,
    /// retries, refreshes and dials included, ends by the store's timeout.
    async fn exec(&self, op: &'static str, cmds: Vec<(u16, Cmd)>) -> Result<Vec<Value>, Error> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut results: Vec<Option<Value>> = vec![None; cmds.len()];
        let run = self.exec_until(op, &cmds, &mut results, deadline);
        let outcome = tokio::time::timeout_at(deadline.into(), run)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        self.metrics
            .store
            .redis_commands
            .get(StoreOp { op })
            .inc_by(cmds.len() as u64);
        outcome.map(|()| {
            results
                .into_iter()
                .map(|v| v.unwrap_or(Value::Nil))
                .collect()
        })
    }

    async fn exec_until(
        &self,
        op: &'static str,
        cmds: &[(u16, Cmd)],
        results: &mut [Option<Value>],
        deadline: Instant,
    ) -> Result<(), Error> {
        self.metrics
            .store
            .redis_round_trips
            .get(StoreOp { op })
            .inc_by(0);
        let slots: Vec<u16> = cmds.iter().map(|c| c.0).collect();
        self.by_node_until(&slots, results, deadline, |addr, idxs| {
            let mut pipe = redis::pipe();
            for &i in idxs {
                pipe.add_command(cmds[i].1.clone());
            }
            let n = idxs.len();
            async move {
                let r = self
                    .call(&addr, deadline, async |c: &mut MultiplexedConnection| {
                        pipe.query_async::<Vec<Value>>(c).await
                    })
                    .await;
                self.metrics
                    .store
                    .redis_round_trips
                    .get(StoreOp { op })
                    .inc();
                match r {
                    Ok(values) => values.into_iter().map(Ok).collect(),
                    Err(e) => {
                        let mut out = Vec::with_capacity(n);
                        self.node_failed(&addr, op, &e, &mut |f| {
                            out.extend((0..n).map(|_| Err(f)))
                        });
                        out
                    }
                }
            }
        })
        .await
    }

    /// Runs items by the node that serves each one's slot: `run` gets a node's address and the
    /// indices of its items, and answers one outcome per index. Items that failed retriably
    /// go again after a topology refresh, with backoff, until `deadline`; a fatal failure ends
    /// the whole run.
    async fn by_node_until<F, Fut>(
        &self,
        slots: &[u16],
        results: &mut [Option<Value>],
        deadline: Instant,
        run: F,
    ) -> Result<(), Error>
    where
        F: Fn(String, &[usize]) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<Value, WriteFailure>>>,
    {
        let mut pending: Vec<usize> = (0..slots.len()).collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            let topo = match self.topology() {
                Some(t) => t,
                None => {
                    self.refresh_topology(deadline).await?;
                    continue;
                }
            };
            let mut failed = Vec::new();
            let mut fatal = None;
            let mut absorb = |idxs: &[usize], answers: Vec<Result<Value, WriteFailure>>| {
                if answers.len() != idxs.len() {
                    // A node's answer of the wrong length (or none at all): try again.
                    failed.extend_from_slice(idxs);
                    return;
                }
                for (&i, a) in idxs.iter().zip(answers) {
                    match a {
                        Ok(v) => results[i] = Some(v),
                        Err(WriteFailure::Retriable) => failed.push(i),
                        Err(WriteFailure::Fatal) => {
                            fatal = Some(store_err("redis cluster refused the operation"))
                        }
                    }
                }
            };
            if let [i] = pending[..] {
                // One item (most saves): no grouping, no join.
                let node = topo.slots[slots[i] as usize];
                let answers = run(topo.nodes[node as usize].clone(), &[i]).await;
                absorb(&[i], answers);
            } else {
                // By node; a cluster has few masters, so a list beats a map.
                let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
                for &i in &pending {
                    let node = topo.slots[slots[i] as usize];
                    match groups.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, idxs)) => idxs.push(i),
                        None => groups.push((node, vec![i])),
                    }
                }
                let runs = groups.into_iter().map(|(node, idxs)| {
                    let fut = run(topo.nodes[node as usize].clone(), &idxs);
                    async move { (idxs, fut.await) }
                });
                for (idxs, answers) in join_all(runs).await {
                    absorb(&idxs, answers);
                }
            }
            if let Some(e) = fatal {
                return Err(e);
            }
            if failed.is_empty() {
                return Ok(());
            }
            pending = failed;
            if Instant::now() + backoff >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
            if let Err(e) = self.refresh_topology(deadline).await {
                tracing::debug!(error = %e, "topology refresh failed");
            }
        }
    }

    /// Waits until the writes on each node's connection reached `min_replicas` replicas: a
    /// quarter of the store's timeout at most (and no more than 250 ms), plus 50 ms for the
    /// answer, whatever the node does.
    async fn wait_replicas(&self, slots: &[u16]) {
        if self.opts.min_replicas == 0 {
            return;
        }
        let Some(topo) = self.topology() else { return };
        let mut nodes: Vec<u16> = slots.iter().map(|s| topo.slots[*s as usize]).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let Some(ms) = self.wait_ms() else { return };
        let deadline = Instant::now() + Duration::from_millis(ms + 50);
        let waits = nodes.into_iter().map(|n| {
            let addr = topo.nodes[n as usize].clone();
            async move {
                let r = self
                    .call_with(
                        &addr,
                        deadline,
                        false,
                        async |c: &mut MultiplexedConnection| {
                            redis::cmd("WAIT")
                                .arg(self.opts.min_replicas)
                                .arg(ms)
                                .query_async::<i64>(c)
                                .await
                        },
                    )
                    .await;
                (addr, r)
            }
        });
        for (addr, r) in join_all(waits).await {
            self.waited(&addr, r.map_err(|e| e.to_string()));
        }
    }

    /// How long a `WAIT` may block on the node (a quarter of the store's timeout, at most
    /// 250 ms; its caller allows 50 ms more for the answer); `None` when writes wait for no
    /// replica.
    fn wait_ms(&self) -> Option<u64> {
        (self.opts.min_replicas > 0).then(|| self.opts.timeout.as_millis().min(1000) as u64 / 4)
    }

    /// What a `WAIT` answered: fewer replicas than asked is counted (`replica_lag`) and logged,
    /// like a failed `WAIT`; neither fails the writes (they are stored on the master).
    fn waited(&self, addr: &str, r: Result<i64, String>) {
        match r {
            Ok(n) if n >= self.opts.min_replicas as i64 => {}
            Ok(n) => {
                self.metrics
                    .store
                    .redis_errors
                    .get(RedisError::ReplicaLag)
                    .inc();
                tracing::warn!(node = %addr, replicas = n, "write not yet on a replica");
            }
            Err(e) => tracing::warn!(node = %addr, error = %e, "WAIT failed"),
        }
    }

    /// Queues the writes of one save call for `addr`'s next group, and starts the node's group
    /// task unless one runs. The answer is one result per write, in order.
    fn submit(
        &self,
        addr: &str,
        writes: Vec<Arc<SaveArgs>>,
        deadline: Instant,
    ) -> tokio::sync::oneshot::Receiver<Vec<Result<Value, WriteFailure>>> {
        let node = self.node(addr);
        let (reply, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = node.queue.lock();
            q.jobs.push_back(SaveJob {
                writes,
                deadline,
                reply,
            });
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            match self.me.upgrade() {
                Some(me) => {
                    tokio::spawn(me.send_groups(addr.to_owned(), node));
                }
                None => node.queue.lock().running = false,
            }
        }
        rx
    }

    /// The node's group task: sends the queued saves, up to [`MAX_GROUP`] writes at a time, one
    /// group in flight, until none is left. A task of its own, so that a caller that gives up
    /// never strands the others' writes.
    async fn send_groups(self: Arc<Self>, addr: String, node: Arc<NodeConn>) {
        /// Lets the next save start a task again should this one panic.
        struct Running<'a>(&'a NodeConn);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.queue.lock().running = false;
                }
            }
        }
        let _running = Running(&node);
        loop {
            // Requests ready to run on this worker may have saves for this node: let them queue
            // first, so that the group carries them (a few turns, while the queue grows).
            let mut queued = node.queue.lock().jobs.len();
            for _ in 0..GATHER_TURNS {
                tokio::task::yield_now().await;
                let now = node.queue.lock().jobs.len();
                if now == queued {
                    break;
                }
                queued = now;
            }
            let jobs = {
                let mut q = node.queue.lock();
                let mut jobs = Vec::new();
                let mut n = 0;
                while let Some(j) = q.jobs.front() {
                    if !jobs.is_empty() && n + j.writes.len() > MAX_GROUP {
                        break;
                    }
                    n += j.writes.len();
                    jobs.extend(q.jobs.pop_front());
                }
                if jobs.is_empty() {
                    q.running = false;
                    return;
                }
                jobs
            };
            self.write_group(&addr, &node, jobs).await;
        }
    }

    /// Sends one group on the node's write connection: one pipeline of `EVALSHA` per write
    /// (with `SCRIPT LOAD` first on a new connection) and one `WAIT`, by the latest deadline of
    /// its saves plus the `WAIT`'s time. Writes refused with `NOSCRIPT` (a script flush) did not
    /// run: they go again once, as `EVAL`, with their own `WAIT`. Each save gets its own
    /// answers.
    async fn write_group(&self, addr: &str, node: &NodeConn, jobs: Vec<SaveJob>) {
        use std::sync::atomic::Ordering;
        let now = Instant::now();
        // Saves past their deadline are not sent (their callers answered 503). A caller that
        // went away before (a cancelled request) still has its writes sent: they were started.
        let (jobs, gone): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.deadline > now);
        for j in gone {
            let n = j.writes.len();
            let _ = j.reply.send(vec![Err(WriteFailure::Retriable); n]);
        }
        let Some(deadline) = jobs.iter().map(|j| j.deadline).max() else {
            return;
        };
        let wait = self.wait_ms();
        let by = deadline + Duration::from_millis(wait.map_or(0, |ms| ms + 50));
        let writes: Vec<&SaveArgs> = jobs
            .iter()
            .flat_map(|j| j.writes.iter().map(|w| &**w))
            .collect();
        let mut results: Vec<Option<Result<Value, WriteFailure>>> = vec![None; writes.len()];
        let shared = self.group_args();
        for eval in [false, true] {
            let todo: Vec<usize> = (0..writes.len())
                .filter(|&i| results[i].is_none())
                .collect();
            if todo.is_empty() {
                break;
            }
            let fail = |results: &mut [Option<_>], f: WriteFailure| {
                for &i in &todo {
                    results[i] = Some(Err(f));
                }
            };
            let (generation, mut conn) = match self.connection(addr, by, Lane::Write).await {
                Ok(c) => c,
                Err(e) => {
                    self.metrics
                        .store
                        .redis_errors
                        .get(RedisError::Retriable)
                        .inc();
                    tracing::debug!(node = %addr, error = %e, "no write connection to a redis node");
                    fail(&mut results, WriteFailure::Retriable);
                    break;
                }
            };
            let load = !eval && node.script_on.load(Ordering::Relaxed) != generation;
            let mut pipe = redis::pipe();
            if load {
                pipe.add_command(redis::cmd("SCRIPT").arg("LOAD").arg(SAVE).clone());
            }
            let group: Vec<&SaveArgs> = todo.iter().map(|&i| writes[i]).collect();
            pipe.add_command(if eval {
                save_cmd("EVAL", SAVE, shared, &group)
            } else {
                save_cmd("EVALSHA", &SAVE_SHA, shared, &group)
            });
            if let Some(ms) = wait {
                pipe.add_command(
                    redis::cmd("WAIT")
                        .arg(self.opts.min_replicas)
                        .arg(ms)
                        .clone(),
                );
            }
            let op = StoreOp { op: "save" };
            self.metrics.store.redis_round_trips.get(op).inc();
            self.metrics.store.redis_commands.get(op).inc();
            self.metrics
                .store
                .redis_group_writes
                .inc_by(group.len() as u64);
            let sent = conn.send_packed_commands(&pipe, 0, pipe.len());
            let values = match tokio::time::timeout_at(by.into(), sent).await {
                Ok(Ok(values)) => values,
                Ok(Err(e)) => {
                    let e = NodeError::Redis(e);
                    if e.drops_connection() {
                        self.forget(addr, generation);
                    }
                    self.node_failed(addr, "save", &e, &mut |f| fail(&mut results, f));
                    break;
                }
                Err(_) => {
                    self.forget(addr, generation);
                    self.node_failed(addr, "save", &NodeError::Timeout, &mut |f| {
                        fail(&mut results, f)
                    });
                    break;
                }
            };
            let mut values = values.into_iter();
            if load {
                if let Some(Value::BulkString(_) | Value::SimpleString(_)) = values.next() {
                    node.script_on.store(generation, Ordering::Relaxed);
                }
            }
            let mut noscript = false;
            match values.next() {
                Some(Value::Array(answers)) => {
                    let mut answers = answers.into_iter();
                    for &i in &todo {
                        results[i] = match answers.next() {
                            Some(Value::ServerError(e)) => {
                                let mut failure = None;
                                let e = NodeError::Redis(redis::RedisError::from(e));
                                self.node_failed(addr, "save", &e, &mut |f| failure = Some(f));
                                failure.map(Err)
                            }
                            Some(v) => Some(Ok(v)),
                            None => Some(Err(WriteFailure::Retriable)),
                        };
                    }
                }
                Some(Value::ServerError(e)) => {
                    let e = redis::RedisError::from(e);
                    if e.kind() == redis::ErrorKind::NoScriptError {
                        noscript = true;
                        node.script_on.store(0, Ordering::Relaxed);
                    } else {
                        self.node_failed(addr, "save", &NodeError::Redis(e), &mut |f| {
                            fail(&mut results, f)
                        });
                    }
                }
                other => {
                    let e = format!("unexpected reply {other:?}");
                    tracing::warn!(node = %addr, error = %e, "redis save script answered oddly");
                    self.metrics.store.redis_errors.get(RedisError::Fatal).inc();
                    fail(&mut results, WriteFailure::Fatal);
                }
            }
            if wait.is_some() {
                let r = match values.next() {
                    Some(Value::Int(n)) => Ok(n),
                    Some(Value::ServerError(e)) => Err(redis::RedisError::from(e).to_string()),
                    other => Err(format!("unexpected reply {other:?}")),
                };
                self.waited(addr, r);
            }
            if !noscript {
                break;
            }
            tracing::debug!(node = %addr, "save script not loaded on the node, sending it");
        }
        let mut results = results.into_iter();
        for j in jobs {
            let answers = results
                .by_ref()
                .take(j.writes.len())
                .map(|r| r.unwrap_or(Err(WriteFailure::Retriable)))
                .collect();
            let _ = j.reply.send(answers);
        }
    }

    /// Counts and logs a failure of a node's call (or of one of its writes) and says what it
    /// means for the items.
    fn node_failed(
        &self,
        addr: &str,
        op: &'static str,
        e: &NodeError,
        out: &mut dyn FnMut(WriteFailure),
    ) {
        if e.retriable() {
            tracing::debug!(node = %addr, error = %e, op, "redis node failed, will retry");
            self.metrics
                .store
                .redis_errors
                .get(RedisError::Retriable)
                .inc();
            out(WriteFailure::Retriable);
        } else {
            tracing::warn!(node = %addr, error = %e, op, "redis refused an operation");
            self.metrics.store.redis_errors.get(RedisError::Fatal).inc();
            out(WriteFailure::Fatal);
        }
    }

    /// Saves each write through its node's group (see [`Self::write_group`]); writes that
    /// failed retriably go again after a topology refresh, with backoff, until `deadline`.
    async fn save_until(
        &self,
        writes: &[Arc<SaveArgs>],
        results: &mut [Option<Value>],
        deadline: Instant,
    ) -> Result<(), Error> {
        let slots: Vec<u16> = writes.iter().map(|w| w.slot).collect();
        self.by_node_until(&slots, results, deadline, |addr, idxs| {
            let rx = self.submit(
                &addr,
                idxs.iter().map(|&i| writes[i].clone()).collect(),
                deadline,
            );
            // A group task that ended without an answer (it panicked) answers nothing: the
            // driver tries those writes again.
            async move { rx.await.unwrap_or_default() }
        })
        .await
    }

    fn user_slot(&self, user: UserId) -> u16 {
        self.partition_slots[partition_of(user) as usize]
    }

    /// The save script's arguments a group's writes share (the score is now).
    fn group_args(&self) -> GroupArgs {
        let score = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        GroupArgs {
            score,
            live_ttl_ms: self.opts.live_ttl.as_millis() as u64,
            other_ttl_ms: self.opts.retention.as_millis() as u64,
        }
    }

    /// The save script's arguments for one write.
    fn save_args(&self, w: &Write) -> SaveArgs {
        let live = !w.state.devices.is_empty();
        let mut buf = Vec::with_capacity(64);
        record::encode(&w.state, self.opts.record_format, &mut buf);
        let p = partition_of(w.user);
        SaveArgs {
            slot: self.partition_slots[p as usize],
            partition: p,
            version: w.state.version,
            record: buf,
            live,
            user: w.user,
            fence: w.fence,
        }
    }
}

/// The topology in a `CLUSTER SLOTS` reply. `queried` is the node that answered: a node that
/// does not know its own address (a one-node cluster) reports an empty host, which means that
/// node's host.
fn parse_slots(v: Value, queried: &str) -> Result<Topology, String> {
    let Value::Array(ranges) = v else {
        return Err("unexpected CLUSTER SLOTS reply".into());
    };
    let mut slots = vec![u16::MAX; SLOTS];
    let mut nodes: Vec<String> = Vec::new();
    for r in ranges {
        let Value::Array(items) = r else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let host = if host.is_empty() {
            queried
                .rsplit_once(':')
                .map_or(String::new(), |(h, _)| h.to_owned())
        } else {
            host
        };
        let addr = format!("{host}:{port}");
        let idx = match nodes.iter().position(|a| *a == addr) {
            Some(i) => i,
            None => {
                nodes.push(addr);
                nodes.len() - 1
            }
        };
        let range = (*start as usize).min(SLOTS)..=(*end as usize).min(SLOTS - 1);
        slots[range].fill(idx as u16);
    }
    if slots.contains(&u16::MAX) {
        return Err("not every slot is covered".into());
    }
    Ok(Topology { slots, nodes })
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, users: &[UserId]) -> Result<Vec<Option<UserState>>, Error> {
        let cmds = users
            .iter()
            .map(|&u| {
                let mut c = redis::cmd("HGET");
                c.arg(user_key(u)).arg("s");
                (self.user_slot(u), c)
            })
            .collect();
        let values = self.exec("load", cmds).await?;
        values
            .into_iter()
            .map(|v| match v {
                Value::Nil => Ok(None),
                Value::BulkString(b) => record::decode(&b)
                    .map(Some)
                    .map_err(|e| Error::Internal(e.to_string())),
                other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
            })
            .collect()
    }

    /// Concurrent saves share their node's next group: one pipeline of scripts and one `WAIT`
    /// on the node's write connection (see [`RedisStore::write_group`]). Each write gets its
    /// own answer; the save answers once its groups' `WAIT`s did.
    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let writes = batch
            .iter()
            .map(|w| Arc::new(self.save_args(w)))
            .collect::<Vec<_>>();
        let deadline = Instant::now() + self.opts.timeout;
        // A group answers by its deadline plus its WAIT's time; so does the save.
        let by = deadline + Duration::from_millis(self.wait_ms().map_or(0, |ms| ms + 50));
        let mut results: Vec<Option<Value>> = vec![None; writes.len()];
        tokio::time::timeout_at(by.into(), self.save_until(&writes, &mut results, deadline))
            .await
            .unwrap_or_else(|_| Err(timed_out()))?;
        Ok(results
            .into_iter()
            .map(|v| match v {
                Some(Value::Int(1)) => Saved::Written,
                Some(Value::Int(-1)) => Saved::Fenced,
                _ => Saved::Stale,
            })
            .collect())
    }

    async fn fence(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        let replies = self
            .exec("fence", self.fence_cmds("INCR", partitions))
            .await?;
        let slots: Vec<u16> = partitions
            .iter()
            .map(|&p| self.partition_slots[p as usize])
            .collect();
        self.wait_replicas(&slots).await;
        replies
            .into_iter()
            .map(|v| match v {
                Value::Int(n) if n > 0 => Ok(n as u64),
                _ => Err(store_err("unexpected reply to INCR")),
            })
            .collect()
    }

    async fn fences(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        self.exec("fences", self.fence_cmds("GET", partitions))
            .await?
            .into_iter()
            .map(|v| match v {
                Value::Nil => Ok(0),
                other => redis::from_redis_value::<u64>(&other)
                    .map_err(|_| store_err("unexpected reply to GET of a fence")),
            })
            .collect()
    }

    async fn live_users(&self, partitions: &[u32]) -> Result<Vec<UserId>, Error> {
        let cmds = partitions
            .iter()
            .map(|&p| {
                let mut c = redis::cmd("ZRANGE");
                c.arg(live_key(p)).arg(0).arg(-1);
                (self.partition_slots[p as usize], c)
            })
            .collect();
        let mut out = Vec::new();
        for v in self.exec("live_users", cmds).await? {
            let Value::Array(items) = v else { continue };
            for item in items {
                if let Value::BulkString(b) = item {
                    if let Some(u) = std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()) {
                        out.push(u);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn refresh(&self, users: &[UserId]) -> Result<(), Error> {
        if users.is_empty() {
            return Ok(());
        }
        let ttl = self.opts.live_ttl.as_millis() as u64;
        let cmds = users
            .iter()
            .map(|&u| {
                let mut c = redis::cmd("PEXPIRE");
                c.arg(user_key(u)).arg(ttl);
                (self.user_slot(u), c)
            })
            .collect();
        self.exec("refresh", cmds).await.map(|_| ())
    }

    fn refresh_interval(&self) -> Option<Duration> {
        Some(self.opts.refresh)
    }

    async fn subscriptions(&self, user: UserId) -> Result<Vec<UserId>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(subscriptions_key(user));
        let v = self
            .exec("subscriptions", vec![(self.user_slot(user), c)])
            .await?;
        Ok(members_of(v.into_iter().next().unwrap_or(Value::Nil)))
    }

    async fn update_subscriptions(
        &self,
        user: UserId,
        mode: super::SubscriptionMode,
        targets: &[UserId],
        max: usize,
    ) -> Result<Vec<UserId>, Error> {
        let mut distinct = targets.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut c = redis::cmd("EVAL");
        c.arg(SUBSCRIBE)
            .arg(1)
            .arg(subscriptions_key(user))
            .arg(mode.as_str())
            .arg(max);
        for t in &distinct {
            c.arg(*t);
        }
        let v = self
            .exec("subscribe", vec![(self.user_slot(user), c)])
            .await?;
        match v.into_iter().next() {
            Some(Value::Int(-1)) => Err(super::too_many_subscriptions(max)),
            Some(v) => Ok(members_of(v)),
            None => Err(Error::Internal("no reply to a subscription change".into())),
        }
    }

    /// Pings every master, each by the store's timeout, and publishes how many did not answer
    /// (`presence_redis_unreachable_masters`; the nodes are logged). Fails only when none
    /// answers: the store as a whole is then unreachable.
    async fn ping(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.opts.timeout;
        let topo = match self.topology() {
            Some(t) => t,
            None => {
                self.refresh_topology(deadline).await?;
                self.topology().ok_or_else(timed_out)?
            }
        };
        let pings = topo.nodes.iter().map(|addr| async move {
            let r = self
                .call(addr, deadline, async |c: &mut MultiplexedConnection| {
                    redis::cmd("PING").query_async::<String>(c).await
                })
                .await;
            (addr, r)
        });
        let mut down = 0;
        for (addr, r) in join_all(pings).await {
            if let Err(e) = r {
                tracing::warn!(node = %addr, error = %e, "a redis master did not answer a ping");
                down += 1;
            }
        }
        self.metrics
            .store
            .redis_unreachable_masters
            .set(down as i64);
        if down > 0 {
            // A master that does not answer may have been failed over: look again.
            let _ = self.refresh_topology(deadline).await;
        }
        if down == topo.nodes.len() {
            return Err(store_err("no redis master answered"));
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }
}

/// The user ids of a set reply, sorted.
fn members_of(v: Value) -> Vec<UserId> {
    let items = match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => return Vec::new(),
    };
    let mut out: Vec<UserId> = items
        .into_iter()
        .filter_map(|i| match i {
            Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
            Value::Int(n) => u64::try_from(n).ok(),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % 16384, 12182);
        assert_eq!(crc16(b"bar") % 16384, 5061);
    }

    #[test]
    fn a_user_and_its_partition_index_share_a_slot() {
        let u = 10001;
        let k = user_key(u);
        let l = live_key(partition_of(u));
        let tag = |s: &str| s[s.find('{').unwrap() + 1..s.find('}').unwrap()].to_owned();
        assert_eq!(tag(&k), tag(&l));
    }

    #[test]
    fn a_topology_needs_no_connection_and_covers_every_slot() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
            ])
        };
        let range = |a: i64, b: i64, m: Value| Value::Array(vec![Value::Int(a), Value::Int(b), m]);
        let reply = Value::Array(vec![
            range(0, 8000, node("10.0.0.1", 6379)),
            range(8001, 16383, node("", 6380)),
        ]);
        let t = parse_slots(reply, "10.0.0.2:6380").unwrap();
        assert_eq!(t.nodes, vec!["10.0.0.1:6379", "10.0.0.2:6380"]);
        assert_eq!((t.slots[0], t.slots[8000], t.slots[8001]), (0, 0, 1));
        let partial = Value::Array(vec![range(0, 100, node("h", 1))]);
        assert!(parse_slots(partial, "h:1").is_err());
    }

    /// A Redis node on loopback that knows a few commands (`CLUSTER SLOTS`: every slot on the
    /// node `owner` names; `PING`; `HGET`: nil; anything else: OK). Stalled, it reads every
    /// command and answers none (a SIGSTOPped or blackholed master); refusing, it answers every
    /// command with CLUSTERDOWN.
    /// Also: `EVALSHA` and `EVAL` answer 1 (written) for each write, `WAIT` 1 (one replica),
    /// `SCRIPT LOAD` a hash; without scripts, `EVALSHA` answers NOSCRIPT. It counts the
    /// commands it gets, and the writes its scripts carried (as `WRITES`).
    struct FakeNode {
        addr: String,
        port: u16,
        /// 0: answers, 1: stalled, 2: refusing, 3: answers, without scripts.
        mode: Arc<std::sync::atomic::AtomicU8>,
        owner: Arc<std::sync::atomic::AtomicU16>,
        seen: Arc<Mutex<HashMap<String, u64>>>,
    }

    const ANSWERS: u8 = 0;
    const STALLED: u8 = 1;
    const REFUSING: u8 = 2;
    const NO_SCRIPTS: u8 = 3;

    impl FakeNode {
        async fn start() -> FakeNode {
            use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
            use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let mode = Arc::new(AtomicU8::new(ANSWERS));
            let owner = Arc::new(AtomicU16::new(port));
            let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
            let (m, o, sn) = (mode.clone(), owner.clone(), seen.clone());
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (mode, owner, seen) = (m.clone(), o.clone(), sn.clone());
                    tokio::spawn(async move {
                        let (r, mut w) = tcp.into_split();
                        let mut r = BufReader::new(r);
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let n: usize = line.trim()[1..].parse().unwrap_or(0);
                            let mut args = Vec::new();
                            for _ in 0..n {
                                line.clear();
                                r.read_line(&mut line).await.unwrap();
                                let len: usize = line.trim()[1..].parse().unwrap();
                                let mut arg = vec![0u8; len + 2];
                                r.read_exact(&mut arg).await.unwrap();
                                arg.truncate(len);
                                args.push(String::from_utf8_lossy(&arg).to_uppercase());
                            }
                            if let Some(c) = args.first() {
                                *seen.lock().entry(c.clone()).or_default() += 1;
                            }
                            let reply = match (mode.load(Ordering::Relaxed), args.first()) {
                                (STALLED, _) => continue,
                                (REFUSING, _) => "-CLUSTERDOWN The cluster is down\r\n".into(),
                                (_, Some(c)) if c == "CLUSTER" => format!(
                                    "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{}\r\n",
                                    owner.load(Ordering::Relaxed)
                                ),
                                (_, Some(c)) if c == "PING" => "+PONG\r\n".into(),
                                (_, Some(c)) if c == "HGET" => "$-1\r\n".into(),
                                (NO_SCRIPTS, Some(c)) if c == "EVALSHA" => {
                                    "-NOSCRIPT No matching script. Please use EVAL.\r\n".into()
                                }
                                (_, Some(c)) if c == "EVALSHA" || c == "EVAL" => {
                                    // One answer per write: three shared arguments after the keys, then six each.
                                    let keys: usize = args[2].parse().unwrap_or(0);
                                    let n = args.len().saturating_sub(6 + keys) / 6;
                                    *seen.lock().entry("WRITES".into()).or_default() += n as u64;
                                    format!("*{n}\r\n{}", ":1\r\n".repeat(n))
                                }
                                (_, Some(c)) if c == "WAIT" => ":1\r\n".into(),
                                (_, Some(c)) if c == "SCRIPT" => {
                                    format!("${}\r\n{}\r\n", SAVE_SHA.len(), *SAVE_SHA)
                                }
                                _ => "+OK\r\n".into(),
                            };
                            if w.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            FakeNode {
                addr: format!("127.0.0.1:{port}"),
                port,
                mode,
                owner,
                seen,
            }
        }

        fn set(&self, mode: u8) {
            self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
        }

        /// How many `command`s it got.
        fn seen(&self, command: &str) -> u64 {
            self.seen.lock().get(command).copied().unwrap_or(0)
        }
    }

    fn version(v: u64) -> UserState {
        UserState {
            version: v,
            ..UserState::default()
        }
    }

    fn write(user: UserId, v: u64, fence: u64) -> Write {
        Write {
            user,
            state: version(v),
            fence,
        }
    }

    fn save_trips(m: &Metrics) -> u64 {
        m.store.redis_round_trips.get(StoreOp { op: "save" }).get()
    }

    /// A fake node, a store on it and the store's metrics.
    async fn on_fake_node() -> (FakeNode, Arc<RedisStore>, Arc<Metrics>) {
        let node = FakeNode::start().await;
        let metrics = Arc::new(Metrics::new());
        let store = RedisStore::connect(test_options(node.addr.clone()), metrics.clone())
            .await
            .unwrap();
        (node, store, metrics)
    }

    /// Issue 13: saves that arrive together go to their node as one group: one script call and
    /// one `WAIT`, not a round trip, a script and a `WAIT` each. The group is capped (`MAX_GROUP`); the script
    /// is loaded once per connection; each save gets its own answer. Before: 600 saves, 600
    /// round trips and 600 `WAIT`s.
    #[tokio::test]
    async fn concurrent_saves_to_one_node_share_a_group_and_its_wait() {
        let (node, store, metrics) = on_fake_node().await;
        let n = 600u64;
        let saves = (1..=n).map(|u| {
            let store = store.clone();
            async move { store.save(&[write(u, 1, 0)]).await }
        });
        for r in join_all(saves).await {
            assert_eq!(r.unwrap(), vec![Saved::Written]);
        }
        let (trips, waits) = (save_trips(&metrics), node.seen("WAIT"));
        println!("{n} concurrent saves: {trips} round trips, {waits} WAITs");
        assert_eq!(node.seen("WRITES"), n);
        assert_eq!(node.seen("EVALSHA"), trips, "one script call per group");
        assert_eq!(node.seen("EVAL"), 0);
        assert_eq!(node.seen("SCRIPT"), 1, "loaded once");
        assert_eq!(trips, waits, "one WAIT per group");
        let least = n.div_ceil(MAX_GROUP as u64);
        assert!(trips >= least && trips < n / 10, "{trips} groups");
        assert_eq!(
            metrics
                .store
                .redis_commands
                .get(StoreOp { op: "save" })
                .get(),
            trips
        );
        // What the node got is what the metric says the groups carried.
        assert_eq!(metrics.store.redis_group_writes.get(), node.seen("WRITES"));

        // One save of several writes is one job: its answers come back in its order.
        let batch: Vec<Write> = (1..=5).map(|u| write(1000 + u, 1, 0)).collect();
        assert_eq!(store.save(&batch).await.unwrap(), vec![Saved::Written; 5]);
        assert_eq!(node.seen("SCRIPT"), 1, "still loaded");
    }

    /// Saves of requests that are ready together on a worker share one group even when the
    /// first of them starts the node's group task: the task lets them queue before it takes
    /// the queue. Without that, tokio runs a task spawned by a worker next (its LIFO slot), and
    /// the first group carried the first save alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn saves_ready_together_share_the_first_group() {
        let (node, store, metrics) = on_fake_node().await;
        let spawner = {
            let store = store.clone();
            tokio::spawn(async move {
                let saves: Vec<_> = (1..=50u64)
                    .map(|u| {
                        let store = store.clone();
                        tokio::spawn(async move { store.save(&[write(u, 1, 0)]).await })
                    })
                    .collect();
                join_all(saves).await
            })
        };
        for r in spawner.await.unwrap() {
            assert_eq!(r.unwrap().unwrap(), vec![Saved::Written]);
        }
        assert_eq!(node.seen("WRITES"), 50);
        assert_eq!(
            save_trips(&metrics),
            1,
            "one group for 50 saves ready together"
        );
    }

    /// A node that lost its scripts (restart, `SCRIPT FLUSH`) answers NOSCRIPT: those writes
    /// did not run, so they go again as `EVAL` in the same group's time, and are answered.
    #[tokio::test]
    async fn a_node_without_the_script_gets_eval() {
        let (node, store, metrics) = on_fake_node().await;
        node.set(NO_SCRIPTS);
        let saves = (1..=20u64).map(|u| {
            let store = store.clone();
            async move { store.save(&[write(u, 1, 0)]).await }
        });
        for r in join_all(saves).await {
            assert_eq!(r.unwrap(), vec![Saved::Written]);
        }
        assert_eq!(
            node.seen("WRITES"),
            20,
            "each write sent again once, as EVAL"
        );
        assert_eq!(node.seen("EVAL"), node.seen("EVALSHA"));
        assert_eq!(node.seen("WAIT"), save_trips(&metrics));
        // Scripts back: the next group loads it again first.
        node.set(ANSWERS);
        assert_eq!(
            store.save(&[write(99, 1, 0)]).await.unwrap(),
            vec![Saved::Written]
        );
        assert_eq!(node.seen("SCRIPT"), 2);
    }

    /// A store on the test cluster, its metrics, and `n` fresh users whose records all live on
    /// one master.
    async fn on_one_node(n: usize) -> (Arc<RedisStore>, Arc<Metrics>, Vec<UserId>) {
        let urls = crate::store::test_redis_urls().expect("test_redis_urls panics when unset");
        let metrics = Arc::new(Metrics::new());
        let store = RedisStore::connect(test_options(urls), metrics.clone())
            .await
            .unwrap();
        let topo = store.topology().unwrap();
        let node_of = |u: UserId| topo.slots[store.user_slot(u) as usize];
        let base = crate::store::test_user_base();
        let users = (base..)
            .filter(|&u| node_of(u) == node_of(base))
            .take(n)
            .collect();
        (store, metrics, users)
    }

    /// The fences of partitions on every master, read without changing them: what the last
    /// `fence` answered.
    #[tokio::test]
    #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
    async fn fences_reads_what_fence_set_on_every_master() {
        let urls = crate::store::test_redis_urls().expect("test_redis_urls panics when unset");
        let store = RedisStore::connect(test_options(urls), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let topo = store.topology().unwrap();
        // One partition per master (distinct nodes), among partitions no other test fences.
        let mut picked: Vec<u32> = Vec::new();
        let mut nodes = std::collections::HashSet::new();
        for p in (crate::ring::PARTITIONS - 2000)..crate::ring::PARTITIONS {
            if nodes.insert(topo.slots[store.partition_slots[p as usize] as usize]) {
                picked.push(p);
            }
        }
        assert!(picked.len() >= 3, "a partition on each master: {picked:?}");
        let before = store.fences(&picked).await.unwrap();
        let set = store.fence(&picked).await.unwrap();
        assert_eq!(store.fences(&picked).await.unwrap(), set);
        assert_eq!(
            store.fences(&picked).await.unwrap(),
            set,
            "reading changes nothing"
        );
        for (b, s) in before.iter().zip(&set) {
            assert_eq!(s, &(b + 1), "fence is an increment of what fences read");
        }
        assert!(store.fences(&[]).await.unwrap().is_empty());
    }

    /// Issue 13, on a real cluster: one group of writes to one node that mixes written, stale
    /// and fenced writes (and a save of two writes) answers each right, in one round trip.
    #[tokio::test]
    #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
    async fn one_group_answers_written_stale_and_fenced_each() {
        let (store, metrics, users) = on_one_node(40).await;
        let (stale, fenced, owned) = (users[0], users[1], users[2]);
        assert_eq!(
            store.save(&[write(stale, 5, 0)]).await.unwrap(),
            vec![Saved::Written]
        );
        let old = store.fence(&[partition_of(fenced)]).await.unwrap()[0];
        store.fence(&[partition_of(fenced)]).await.unwrap();
        let mine = store.fence(&[partition_of(owned)]).await.unwrap()[0];

        let mut calls: Vec<(Vec<Write>, Vec<Saved>)> = vec![
            (vec![write(stale, 3, 0)], vec![Saved::Stale]),
            (vec![write(fenced, 1, old)], vec![Saved::Fenced]),
            (vec![write(owned, 1, mine)], vec![Saved::Written]),
            (
                vec![write(users[3], 1, 0), write(stale, 4, 0)],
                vec![Saved::Written, Saved::Stale],
            ),
        ];
        for &u in &users[4..] {
            calls.push((vec![write(u, 1, 0)], vec![Saved::Written]));
        }
        let trips = save_trips(&metrics);
        let saves = calls.iter().map(|(ws, _)| store.save(ws));
        let got = join_all(saves).await;
        for ((_, want), got) in calls.iter().zip(got) {
            assert_eq!(&got.unwrap(), want);
        }
        let trips = save_trips(&metrics) - trips;
        println!("{} saves to one node: {trips} round trips", calls.len());
        assert!(trips < calls.len() as u64 / 4, "{trips} round trips");
        let stored = store.load(&[stale, fenced, owned, users[3]]).await.unwrap();
        let versions: Vec<Option<u64>> = stored
            .iter()
            .map(|s| s.as_ref().map(|s| s.version))
            .collect();
        assert_eq!(versions, vec![Some(5), None, Some(1), Some(1)]);
    }

    /// The save script gets a user's record key and fence key only; its `index_and_member`
    /// derives the live index key (`string.sub(fence, 1, -6) .. 'live'`) and the member
    /// (`string.sub(user, #fence - 2)`, 1-based) from them, so the key layout and the script
    /// must agree.
    #[test]
    fn the_live_key_and_member_the_save_script_derives_are_the_stores() {
        for user in [0, 1, 42, 1 << 40, u64::MAX] {
            let p = partition_of(user);
            let fence = fence_key(p);
            assert!(fence.ends_with("fence"), "{fence}");
            assert_eq!(format!("{}live", &fence[..fence.len() - 5]), live_key(p));
            assert_eq!(&user_key(user)[fence.len() - 3..], user.to_string());
            let mut buf = String::from("old");
            put_user_key(&mut buf, p, user);
            assert_eq!(buf, user_key(user));
        }
    }

    /// Issue 13: the live index follows a user who comes, stays, leaves and comes back, and a
    /// user who stays live costs no `ZADD` (the record's `l` says it is in the index already).
    /// A record last written by an older script (no `l` for its version) gets the `ZADD`.
    #[tokio::test]
    #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
    async fn the_live_index_follows_each_change_with_no_zadd_for_a_user_who_stays_live() {
        let (store, _, users) = on_one_node(1).await;
        let u = users[0];
        let p = partition_of(u);
        let rules = crate::presence::Rules::default();
        let save = |v: u64, live: bool| {
            let mut state = version(v);
            if live {
                state
                    .online("d", crate::presence::Platform::Ios, 1_000, &rules)
                    .unwrap();
                state.version = v;
            }
            let store = store.clone();
            async move {
                store
                    .save(&[Write {
                        user: u,
                        state,
                        fence: 0,
                    }])
                    .await
                    .unwrap()
            }
        };
        let run = |cmd: Cmd| {
            let store = store.clone();
            async move {
                store
                    .exec("test", vec![(store.user_slot(u), cmd)])
                    .await
                    .unwrap()
            }
        };
        let indexed = || async { store.live_users(&[p]).await.unwrap().contains(&u) };
        let mut steps = Vec::new();
        for (v, live) in [(1, true), (2, true), (3, false), (4, true)] {
            assert_eq!(save(v, live).await, vec![Saved::Written]);
            steps.push((v, live, indexed().await));
        }
        assert_eq!(
            steps,
            [
                (1, true, true),
                (2, true, true),
                (3, false, false),
                (4, true, true)
            ]
        );
        // Stays live with `l` = `v`: no ZADD (a member taken out behind the store's back stays
        // out, which shows the command was not sent; nothing but the script changes the index).
        run(redis::cmd("ZREM").arg(live_key(p)).arg(u).clone()).await;
        save(5, true).await;
        assert!(!indexed().await, "a user who stays live got a ZADD");
        // An older script's write (version, state, no `l`) that took the user out: the next
        // live write puts it back.
        run(redis::cmd("HSET").arg(user_key(u)).arg("v").arg(6).clone()).await;
        save(7, true).await;
        assert!(
            indexed().await,
            "after an older writer, the user is not in the live index"
        );
        assert_eq!(
            store.load(&[u]).await.unwrap()[0]
                .as_ref()
                .map(|s| s.version),
            Some(7)
        );
    }

    /// A group's script runs on one node: a write in it whose slot is elsewhere (the topology
    /// moved under the group) fails alone and may be retried; the others are written.
    #[tokio::test]
    #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
    async fn a_write_sent_to_the_wrong_node_fails_alone_in_its_group() {
        let (store, _, here) = on_one_node(2).await;
        let topo = store.topology().unwrap();
        let node_of = |u: UserId| topo.slots[store.user_slot(u) as usize];
        let elsewhere = (here[0]..)
            .find(|&u| node_of(u) != node_of(here[0]))
            .unwrap();
        let addr = topo.nodes[node_of(here[0]) as usize].clone();
        let args = [here[0], elsewhere, here[1]]
            .map(|u| Arc::new(store.save_args(&write(u, 1, 0))))
            .to_vec();
        let deadline = Instant::now() + Duration::from_secs(2);
        let answers = store.submit(&addr, args, deadline).await.unwrap();
        let got: Vec<String> = answers
            .iter()
            .map(|a| match a {
                Ok(Value::Int(n)) => n.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(got, ["1", "Err(Retriable)", "1"]);
        let stored = store.load(&[here[0], elsewhere, here[1]]).await.unwrap();
        let versions: Vec<Option<u64>> = stored
            .iter()
            .map(|s| s.as_ref().map(|s| s.version))
            .collect();
        assert_eq!(versions, vec![Some(1), None, Some(1)]);
    }

    /// Issue 10, #4: a node that refuses and a seed that stalls cost each caller the store's
    /// timeout at most, however many wait at once (one topology refresh in flight, which the
    /// others join; no refresh waits for the stalled seed beyond its deadline), and the answer
    /// names no node. Before: refreshes ran one after another, each waiting out the stalled
    /// seed, so the 20th caller waited for 20 of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_node_costs_each_caller_at_most_the_timeout() {
        let master = FakeNode::start().await;
        let seed = FakeNode::start().await;
        seed.owner
            .store(master.port, std::sync::atomic::Ordering::Relaxed);
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_millis(300);
        let opts = RedisOptions {
            timeout,
            min_replicas: 0,
            ..test_options(seed.addr.clone())
        };
        let store = RedisStore::connect(opts, metrics.clone()).await.unwrap();
        assert_eq!(store.load(&[1]).await.unwrap(), vec![None]);

        master.set(REFUSING);
        seed.set(STALLED);
        let refreshes = metrics.store.redis_topology_refreshes.get();
        let calls = (1..=20u64).map(|u| {
            let store = store.clone();
            async move {
                let t = Instant::now();
                let r = store.load(&[u]).await;
                (r, t.elapsed())
            }
        });
        let results = join_all(calls).await;
        let worst = results.iter().map(|(_, t)| *t).max().unwrap();
        let refreshed = metrics.store.redis_topology_refreshes.get() - refreshes;
        println!(
            "20 callers, master refusing and seed stalled: slowest answer {worst:?} \
             (timeout {timeout:?}), {refreshed} topology refreshes"
        );
        for (r, _) in &results {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
            assert!(!e.to_string().contains("127.0.0.1"), "{e}");
        }
        assert!(worst < timeout + Duration::from_millis(150), "{worst:?}");
        assert!(refreshed <= 6, "{refreshed} refreshes for 20 callers");

        // Both stalled: a ping answers by the timeout too.
        master.set(STALLED);
        let t = Instant::now();
        assert!(store.ping().await.is_err());
        assert!(t.elapsed() < timeout + Duration::from_millis(150));

        // Back: the next calls dial again where needed and succeed.
        master.set(ANSWERS);
        seed.set(ANSWERS);
        let back = Instant::now() + Duration::from_secs(3);
        while store.load(&[1]).await.is_err() {
            assert!(Instant::now() < back, "the store did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(store.ping().await.is_ok());
    }

    /// The shared store suite against a real Redis Cluster (started by scripts/test.sh).
    #[tokio::test]
    #[ignore = "needs Redis Cluster: bash scripts/test.sh"]
    async fn redis_store_passes_the_suite() {
        let Some(urls) = crate::store::test_redis_urls() else {
            return;
        };
        let store = RedisStore::connect(test_options(urls), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let base = crate::store::test_user_base();
        crate::store::suite::run(store.as_ref(), base).await;
    }

    #[tokio::test]
    async fn tls_files_are_read_and_parsed_at_start() {
        let fixture = |f: &str| {
            Some(
                std::path::PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/tls"
                ))
                .join(f),
            )
        };
        let good = RedisTlsFiles {
            ca: fixture("ca.pem"),
            cert: fixture("node.pem"),
            key: fixture("node.key"),
        };
        assert!(good.load().is_ok());
        for (files, var) in [
            (
                RedisTlsFiles {
                    ca: fixture("node.key"),
                    ..good.clone()
                },
                "PRESENCE_REDIS_TLS_CA",
            ),
            (
                RedisTlsFiles {
                    ca: fixture("nope.pem"),
                    ..good.clone()
                },
                "PRESENCE_REDIS_TLS_CA",
            ),
            (
                RedisTlsFiles {
                    key: fixture("ca.pem"),
                    ..good.clone()
                },
                "PRESENCE_REDIS_TLS_KEY",
            ),
        ] {
            let e = files.load().err().unwrap().to_string();
            assert!(e.contains(var), "{e}");
        }
        // Mixed schemes are refused before any dial.
        let opts = test_options("rediss://127.0.0.1:1,redis://127.0.0.1:2".into());
        let e = RedisStore::connect(opts, Arc::new(Metrics::new()))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::BadRequest(_)), "{e}");
    }

    pub(crate) fn test_options(urls: String) -> RedisOptions {
        RedisOptions {
            seeds: urls.split(',').map(str::to_owned).collect(),
            timeout: Duration::from_secs(3),
            refresh: Duration::from_secs(60),
            live_ttl: Duration::from_secs(120),
            retention: Duration::from_secs(600),
            min_replicas: 1,
            record_format: RecordFormat::default(),
            tls: RedisTlsFiles::default(),
            username: None,
            password: None,
        }
    }
}
