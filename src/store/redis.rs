//! The Redis Cluster store: one hash per user and one live index per partition, routed by the
//! store itself so that a batch costs one pipelined round trip per node.
//!
//! Keys (the `{p}` hash tag is the user's partition, so a user's record and its partition's live
//! index share a slot and change together in one script):
//! - `presence:{p}:u:<userId>`: hash `v` (version), `s` (the state as JSON). Expires
//!   `live_ttl` after its last write or refresh while the user has devices, `retention` after
//!   the last change otherwise.
//! - `presence:{p}:live`: sorted set of the partition's users that have devices, scored by the
//!   time of their last write. A restarted or new owner reloads its timers from it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};

use super::{Saved, Store, Write};
use crate::error::Error;
use crate::metrics::{Metrics, RedisError, StoreOp};
use crate::presence::{UserId, UserState};
use crate::ring::{partition_of, PARTITIONS};

const SLOTS: usize = 16384;

/// Writes a user's state unless its partition was fenced by a newer owner (-1) or a newer
/// version is stored (0), and keeps the live index in step (1).
/// KEYS: user, live, fence. ARGV: version, state, ttl ms (0 = none), live (1/0), userId, score,
/// fencing token (0 = none).
const SAVE: &str = r#"
if ARGV[7] ~= '0' then
  local f = tonumber(redis.call('GET', KEYS[3]) or '0')
  if f > tonumber(ARGV[7]) then return -1 end
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 's', ARGV[2])
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) else redis.call('PERSIST', KEYS[1]) end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5]) else redis.call('ZREM', KEYS[2], ARGV[5]) end
return 1
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

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Seed nodes, `host:port` or `redis://host:port`.
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
}

struct Topology {
    /// Node index of every slot's master.
    slots: Vec<u16>,
    nodes: Vec<(String, MultiplexedConnection)>,
}

/// The Redis Cluster implementation of [`Store`].
pub struct RedisStore {
    opts: RedisOptions,
    /// `user:password` (or `:password`) for every node; never logged.
    userinfo: Option<String>,
    topology: RwLock<Option<Arc<Topology>>>,
    /// Connections by address, reused across topology refreshes.
    conns: Mutex<HashMap<String, MultiplexedConnection>>,
    refreshing: tokio::sync::Mutex<()>,
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

/// The hash tag of partition `p` (what goes between the braces).
fn tag(p: u32) -> String {
    p.to_string()
}

pub fn user_key(user: UserId) -> String {
    format!("presence:{{{}}}:u:{user}", tag(partition_of(user)))
}

pub fn subscriptions_key(user: UserId) -> String {
    format!("presence:{{{}}}:sub:{user}", tag(partition_of(user)))
}

pub fn live_key(partition: u32) -> String {
    format!("presence:{{{}}}:live", tag(partition))
}

/// The fencing token of a partition's owner: incremented by every new owner.
pub fn fence_key(partition: u32) -> String {
    format!("presence:{{{}}}:fence", tag(partition))
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

impl RedisStore {
    /// Connects to the cluster and reads its topology.
    pub async fn connect(
        opts: RedisOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisStore>, Error> {
        // `redis://[user:password@]host:port`: the credentials of the first seed that has some
        // are used for every node, including those learnt from CLUSTER SLOTS.
        let mut userinfo = None;
        let seeds = opts
            .seeds
            .iter()
            .map(|s| {
                let s = s
                    .trim()
                    .trim_start_matches("redis://")
                    .trim_end_matches('/');
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
        let store = Arc::new(RedisStore {
            opts: RedisOptions { seeds, ..opts },
            userinfo,
            topology: RwLock::new(None),
            conns: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            partition_slots: (0..PARTITIONS)
                .map(|p| crc16(tag(p).as_bytes()) % SLOTS as u16)
                .collect(),
            metrics,
        });
        store.refresh_topology().await?;
        Ok(store)
    }

    async fn connection(&self, addr: &str) -> Result<MultiplexedConnection, redis::RedisError> {
        if let Some(c) = self.conns.lock().get(addr) {
            return Ok(c.clone());
        }
        let auth = self
            .userinfo
            .as_deref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let client = redis::Client::open(format!("redis://{auth}{addr}/"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.opts.timeout)
            .set_response_timeout(self.opts.timeout);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.conns.lock().insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    fn forget(&self, addr: &str) {
        self.conns.lock().remove(addr);
    }

    /// Reads `CLUSTER SLOTS` from any reachable node and installs the new topology.
    async fn refresh_topology(&self) -> Result<(), Error> {
        let _guard = self.refreshing.lock().await;
        self.metrics.store.redis_topology_refreshes.inc();
        let mut candidates: Vec<String> = self
            .topology
            .read()
            .as_ref()
            .map(|t| t.nodes.iter().map(|(a, _)| a.clone()).collect())
            .unwrap_or_default();
        for s in &self.opts.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut last = String::from("no node answered");
        for addr in candidates {
            let mut conn = match self.connection(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let slots: Value = match redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut conn)
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    self.forget(&addr);
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match self.parse_slots(slots, &addr).await {
                Ok(t) => {
                    *self.topology.write() = Some(Arc::new(t));
                    return Ok(());
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(store_err(format!("cannot read cluster topology: {last}")))
    }

    /// `queried` is the node that answered: a node that does not know its own address (a
    /// one-node cluster) reports an empty host, which means that node's host.
    async fn parse_slots(&self, v: Value, queried: &str) -> Result<Topology, String> {
        let Value::Array(ranges) = v else {
            return Err("unexpected CLUSTER SLOTS reply".into());
        };
        let mut slots = vec![u16::MAX; SLOTS];
        let mut nodes: Vec<(String, MultiplexedConnection)> = Vec::new();
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
            let idx = match nodes.iter().position(|(a, _)| *a == addr) {
                Some(i) => i,
                None => {
                    let conn = self
                        .connection(&addr)
                        .await
                        .map_err(|e| format!("{addr}: {e}"))?;
                    nodes.push((addr, conn));
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

    fn topology(&self) -> Option<Arc<Topology>> {
        self.topology.read().clone()
    }

    /// Runs commands, each with the slot it must go to: one pipeline per node, all nodes at
    /// once. Failed node groups are retried after a topology refresh until the timeout.
    async fn exec(&self, op: &'static str, cmds: Vec<(u16, Cmd)>) -> Result<Vec<Value>, Error> {
        let started = Instant::now();
        let deadline = started + self.opts.timeout;
        let mut results: Vec<Option<Value>> = vec![None; cmds.len()];
        let mut pending: Vec<usize> = (0..cmds.len()).collect();
        let mut backoff = Duration::from_millis(50);
        let outcome = loop {
            let topo = match self.topology() {
                Some(t) => t,
                None => {
                    if let Err(e) = self.refresh_topology().await {
                        break Err(e);
                    }
                    continue;
                }
            };
            let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
            for &i in &pending {
                groups
                    .entry(topo.slots[cmds[i].0 as usize])
                    .or_default()
                    .push(i);
            }
            let runs = groups.into_iter().map(|(node, idxs)| {
                let (addr, mut conn) = topo.nodes[node as usize].clone();
                let mut pipe = redis::pipe();
                for &i in &idxs {
                    pipe.add_command(cmds[i].1.clone());
                }
                async move {
                    let r = pipe.query_async::<Vec<Value>>(&mut conn).await;
                    (addr, idxs, r)
                }
            });
            self.metrics
                .store
                .redis_round_trips
                .get(StoreOp { op })
                .inc_by(0);
            let mut failed = Vec::new();
            let mut fatal = None;
            for (addr, idxs, r) in join_all(runs).await {
                self.metrics
                    .store
                    .redis_round_trips
                    .get(StoreOp { op })
                    .inc();
                match r {
                    Ok(values) => {
                        for (i, v) in idxs.into_iter().zip(values) {
                            results[i] = Some(v);
                        }
                    }
                    Err(e) if retriable(&e) => {
                        tracing::debug!(node = %addr, error = %e, "redis node failed, will retry");
                        self.metrics
                            .store
                            .redis_errors
                            .get(RedisError::Retriable)
                            .inc();
                        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
                        {
                            self.forget(&addr);
                        }
                        failed.extend(idxs);
                    }
                    Err(e) => {
                        self.metrics.store.redis_errors.get(RedisError::Fatal).inc();
                        fatal = Some(store_err(format!("{addr}: {e}")));
                    }
                }
            }
            if let Some(e) = fatal {
                break Err(e);
            }
            if failed.is_empty() {
                break Ok(());
            }
            pending = failed;
            if Instant::now() + backoff >= deadline {
                break Err(store_err("redis cluster did not answer in time"));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
            if let Err(e) = self.refresh_topology().await {
                tracing::debug!(error = %e, "topology refresh failed");
            }
        };
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

    /// Waits until the writes on each node's connection reached `min_replicas` replicas.
    async fn wait_replicas(&self, slots: &[u16]) {
        if self.opts.min_replicas == 0 {
            return;
        }
        let Some(topo) = self.topology() else { return };
        let mut nodes: Vec<u16> = slots.iter().map(|s| topo.slots[*s as usize]).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let waits = nodes.into_iter().map(|n| {
            let (addr, mut conn) = topo.nodes[n as usize].clone();
            let ms = self.opts.timeout.as_millis().min(1000) as u64 / 4;
            async move {
                let r: redis::RedisResult<i64> = redis::cmd("WAIT")
                    .arg(self.opts.min_replicas)
                    .arg(ms)
                    .query_async(&mut conn)
                    .await;
                (addr, r)
            }
        });
        for (addr, r) in join_all(waits).await {
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
    }

    fn user_slot(&self, user: UserId) -> u16 {
        self.partition_slots[partition_of(user) as usize]
    }
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
                Value::BulkString(b) => serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| Error::Internal(format!("corrupt stored state: {e}"))),
                other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
            })
            .collect()
    }

    async fn save(&self, batch: &[Write]) -> Result<Vec<Saved>, Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut slots = Vec::with_capacity(batch.len());
        let mut cmds = Vec::with_capacity(batch.len());
        for Write { user, state, fence } in batch {
            let live = !state.devices.is_empty();
            let ttl = if live {
                self.opts.live_ttl
            } else {
                self.opts.retention
            };
            let json = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
            let p = partition_of(*user);
            let mut c = redis::cmd("EVAL");
            c.arg(SAVE)
                .arg(3)
                .arg(user_key(*user))
                .arg(live_key(p))
                .arg(fence_key(p))
                .arg(state.version)
                .arg(json)
                .arg(ttl.as_millis() as u64)
                .arg(if live { "1" } else { "0" })
                .arg(*user)
                .arg(now)
                .arg(*fence);
            let slot = self.partition_slots[p as usize];
            slots.push(slot);
            cmds.push((slot, c));
        }
        let replies = self.exec("save", cmds).await?;
        self.wait_replicas(&slots).await;
        Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::Int(1) => Saved::Written,
                Value::Int(-1) => Saved::Fenced,
                _ => Saved::Stale,
            })
            .collect())
    }

    async fn fence(&self, partitions: &[u32]) -> Result<Vec<u64>, Error> {
        let cmds = partitions
            .iter()
            .map(|&p| {
                let mut c = redis::cmd("INCR");
                c.arg(fence_key(p));
                (self.partition_slots[p as usize], c)
            })
            .collect();
        let replies = self.exec("fence", cmds).await?;
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

    async fn ping(&self) -> Result<(), Error> {
        let topo = match self.topology() {
            Some(t) => t,
            None => {
                self.refresh_topology().await?;
                self.topology().ok_or_else(|| store_err("no topology"))?
            }
        };
        let pings = topo.nodes.iter().map(|(addr, conn)| {
            let mut conn = conn.clone();
            async move {
                let r = tokio::time::timeout(
                    self.opts.timeout,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                (addr.clone(), r)
            }
        });
        for (addr, r) in join_all(pings).await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let _ = self.refresh_topology().await;
                    return Err(store_err(format!("{addr}: {e}")));
                }
                Err(_) => return Err(store_err(format!("{addr}: ping timed out"))),
            }
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

    pub(crate) fn test_options(urls: String) -> RedisOptions {
        RedisOptions {
            seeds: urls.split(',').map(str::to_owned).collect(),
            timeout: Duration::from_secs(3),
            refresh: Duration::from_secs(60),
            live_ttl: Duration::from_secs(120),
            retention: Duration::from_secs(600),
            min_replicas: 1,
        }
    }
}
