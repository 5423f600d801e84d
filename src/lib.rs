//! presence-service: a Kubernetes-native, horizontally sharded presence service for instant
//! messaging. It answers who is online, on which devices, busy or away, and since when.
//!
//! # Layout
//! - [`config`]: the one `Config`, from flags and `PRESENCE_*` variables.
//! - [`error`]: the one error type and its HTTP envelope.
//! - [`peer`]: the gRPC transport between nodes: the shard service and the gateway's router.
//! - [`presence`]: the domain rules (aggregation, idle, manual status, timeouts), pure.
//! - [`timer`]: the timer wheel behind every deadline.
//! - [`membership`]: who the shards are (static list with health checks, Kubernetes, Nacos).
//! - [`proto`]: the gRPC schema between nodes and its conversions.
//! - [`push`]: real-time push: the gateway's socket hub, shard fan-out and event streams.
//! - [`ring`]: the fixed partitions of the userId space (and, later, their placement).
//! - [`store`]: the persistence boundary (`Store`), the in-memory store and Redis Cluster.
//! - [`shard`]: owns users: live state, their timers, write-through to the store.
//! - [`api`]: HTTP handlers: parsing, validation and the envelope, no business logic.
//! - [`metrics`]: the Prometheus registry and every metric.
//! - [`telemetry`]: logs (`tracing`) and OpenTelemetry trace export.
//! - [`node`]: wires one process together and runs it until shutdown.

pub mod api;
pub mod config;
pub mod error;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod presence;
pub mod proto;
pub mod push;
pub mod ring;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod timer;

pub use error::Error;
