//! presence-service: a Kubernetes-native, horizontally sharded presence service for instant
//! messaging. It answers who is online, on which devices, busy or away, and since when.
//!
//! # Layout
//! From the bottom up (no module imports one that imports it back; `tests/layout.rs` checks):
//! - [`error`]: the one error type, its stable codes, the HTTP envelope and `tonic::Status`.
//! - [`privacy`]: who may see whom (visibility, allow and deny lists, last-seen precision), pure.
//! - [`presence`]: the domain rules (aggregation, idle, manual status, timeouts), pure.
//! - [`config`]: the one `Config`, from flags and `PRESENCE_*` variables.
//! - [`timer`]: the timer wheel behind every deadline, and the clock.
//! - [`ring`]: the fixed partitions of the userId space and their placement on shards.
//! - [`metrics`]: the Prometheus registry and every metric, by subsystem.
//! - [`limits`]: per-key rate limits (GCRA), bounded in memory.
//! - [`auth`]: who calls: bearer JWTs (secret or JWKS), the `Principal`, the self-only rule.
//! - [`membership`]: who the shards are (static list with health checks, Kubernetes, Nacos).
//! - [`store`]: the persistence boundary (`Store`), the in-memory store and Redis Cluster.
//! - [`proto`]: the gRPC schema between nodes and its conversions.
//! - [`service`]: the `Presence` trait, the operations the API calls.
//! - [`push`]: real-time push: the gateway's socket hub and the shard's fan-out.
//! - [`shard`]: owns users: live state, their timers, write-through to the store.
//! - [`ownership`]: which partitions a shard owns: the pure handoff state machine.
//! - [`peer`]: the gRPC transport between nodes: the shard's service and handoff driver, the
//!   gateway's router and event streams.
//! - [`api`]: HTTP handlers: parsing, validation and the envelope, no business logic.
//! - [`telemetry`]: logs (`tracing`) and OpenTelemetry trace export.
//! - [`node`]: wires one process together and runs it until shutdown.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod ownership;
pub mod peer;
pub mod presence;
pub mod privacy;
pub mod proto;
pub mod push;
pub mod ring;
pub mod service;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod timer;

pub use error::Error;
