//! The Prometheus registry and every metric the service exports, grouped by subsystem, with
//! typed label sets.
//!
//! A labelled metric is a [`Family`] of one [`Labels`] type: its values are named fields or enum
//! variants, so a label in the wrong place does not compile. Names keep the `presence_` prefix
//! and the `_total` / `_seconds` suffixes.

use std::marker::PhantomData;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A set of label values, given to a metric in the order of its label names.
pub trait Labels {
    /// The label set's type with every borrowed value `'static`: what a [`Family`] is declared
    /// with, so that one family takes values of any lifetime but of no other type.
    type Of;
    /// The label names, in order.
    const NAMES: &'static [&'static str];
    /// Calls `f` with the values, in the order of [`Labels::NAMES`].
    fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R;
}

/// A metric vector that hands out one metric per label set.
pub trait LabelledVec: Collector + Clone + 'static {
    type Metric;
    fn with_values(&self, values: &[&str]) -> Self::Metric;
}

impl LabelledVec for IntCounterVec {
    type Metric = IntCounter;
    fn with_values(&self, values: &[&str]) -> IntCounter {
        self.with_label_values(values)
    }
}

impl LabelledVec for IntGaugeVec {
    type Metric = IntGauge;
    fn with_values(&self, values: &[&str]) -> IntGauge {
        self.with_label_values(values)
    }
}

impl LabelledVec for HistogramVec {
    type Metric = Histogram;
    fn with_values(&self, values: &[&str]) -> Histogram {
        self.with_label_values(values)
    }
}

/// A labelled metric whose label values are always an `L`.
pub struct Family<L, V> {
    vec: V,
    _labels: PhantomData<fn(&L)>,
}

impl<L, V: LabelledVec> Family<L, V> {
    /// The metric of one label set.
    pub fn get<X: Labels<Of = L>>(&self, labels: X) -> V::Metric {
        labels.with(|values| self.vec.with_values(values))
    }
}

/// A labelled counter.
pub type Counters<L> = Family<L, IntCounterVec>;
/// A labelled gauge.
pub type Gauges<L> = Family<L, IntGaugeVec>;
/// A labelled histogram.
pub type Histograms<L> = Family<L, HistogramVec>;

/// Declares a label set: a struct of `&str` fields, named as its labels, in order.
macro_rules! label_struct {
    ($(#[$doc:meta])* $name:ident { $($field:ident),+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name<'a> {
            $(pub $field: &'a str,)+
        }
        impl Labels for $name<'_> {
            type Of = $name<'static>;
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),+];
            fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
                f(&[$(self.$field),+])
            }
        }
    };
}

/// Declares a one-label set as an enum: each variant is one value.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident ($label:literal) { $($variant:ident = $value:literal),+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),+ }
        impl $name {
            /// Every value, to pre-create the series dashboards expect.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $value),+ }
            }
        }
        impl Labels for $name {
            type Of = $name;
            const NAMES: &'static [&'static str] = &[$label];
            fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
                f(&[self.as_str()])
            }
        }
    };
}

label_struct!(
    /// An HTTP answer: route template, method, status code.
    HttpAnswer { route, method, code }
);
label_struct!(
    /// An HTTP route template and method.
    HttpRoute { route, method }
);
label_struct!(
    /// A change of a user's effective status.
    Transition { from, to }
);
label_struct!(
    /// A store operation and its result (`ok`, `error`).
    StoreResult { op, result }
);
label_struct!(
    /// A store operation.
    StoreOp { op }
);
label_struct!(
    /// A gRPC call's side (`client`, `server`), method and code.
    GrpcAnswer { side, method, code }
);
label_struct!(
    /// A gRPC call's side and method.
    GrpcCall { side, method }
);
/// A WebSocket client message's type and result.
#[derive(Clone, Copy, Debug)]
pub struct WsMessage<'a> {
    pub kind: &'a str,
    pub result: &'a str,
}

impl Labels for WsMessage<'_> {
    type Of = WsMessage<'static>;
    const NAMES: &'static [&'static str] = &["type", "result"];
    fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
        f(&[self.kind, self.result])
    }
}
label_struct!(
    /// A subscription change's mode (`add`, `remove`, `replace`).
    SubscriptionChange { mode }
);
label_enum!(
    /// What became of a heartbeat.
    HeartbeatResult("result") { Ok = "ok", NotOnline = "not_online", Error = "error" }
);
label_enum!(
    /// The kind of a Redis error.
    RedisError("kind") { Retriable = "retriable", Fatal = "fatal", ReplicaLag = "replica_lag" }
);
label_enum!(
    /// Why the HTTP server refused a request or closed a connection.
    HttpRefusal("reason") {
        HeaderTimeout = "header_timeout",
        BodyTimeout = "body_timeout",
        IdleTimeout = "idle_timeout",
        Overloaded = "overloaded"
    }
);
label_enum!(
    /// Which per-user rate limit refused a request or a socket message (`status`: the user is
    /// over `PRESENCE_STATUS_RATE`; `status_table_full`: too many users over their burst at once).
    RateLimit("limit") { Status = "status", StatusTableFull = "status_table_full", OfflineRecords = "offline_records" }
);
label_enum!(
    /// Why a WebSocket message or upgrade was refused by a limit.
    WsRefusal("reason") {
        ResumeTooLarge = "resume_too_large",
        Draining = "draining",
        TooManySockets = "too_many_sockets",
        IdleTimeout = "idle_timeout",
        FrameTooLarge = "frame_too_large"
    }
);
label_enum!(
    /// What became of the `offline` a draining gateway sends for a socket's device.
    DrainOffline("result") { Ok = "ok", Error = "error", Timeout = "timeout" }
);
label_enum!(
    /// What became of one beat of a WebSocket lease round.
    LeaseBeat("result") { Ok = "ok", Revived = "revived", Failed = "failed" }
);
label_enum!(
    /// How clients authenticate (`PRESENCE_AUTH`).
    AuthScheme("mode") { None = "none", Jwt = "jwt" }
);
label_enum!(
    /// Why a request, an upgrade or a socket's token refresh was refused.
    AuthRefusal("reason") {
        Missing = "missing",
        Invalid = "invalid",
        Expired = "expired",
        WrongAudience = "wrong_audience",
        WrongIssuer = "wrong_issuer",
        UnknownKey = "unknown_key",
        Forbidden = "forbidden"
    }
);
label_enum!(
    /// What became of a fetch of the JWKS.
    JwksFetch("result") { Ok = "ok", Error = "error" }
);
label_enum!(
    /// What a handover poll learnt from a previous owner.
    HandoverPoll("result") { Released = "released", Waiting = "waiting", Declined = "declined", Failed = "failed" }
);
label_enum!(
    /// The direction of a partition handoff.
    Direction("direction") { Gained = "gained", Released = "released" }
);

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Creates metrics and registers each in one registry.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn counters<L: Labels>(&self, name: &str, help: &str) -> Counters<L> {
        let vec = IntCounterVec::new(Opts::new(name, help), L::NAMES).expect("valid metric");
        Family {
            vec: self.add(vec),
            _labels: PhantomData,
        }
    }

    fn gauges<L: Labels>(&self, name: &str, help: &str) -> Gauges<L> {
        let vec = IntGaugeVec::new(Opts::new(name, help), L::NAMES).expect("valid metric");
        Family {
            vec: self.add(vec),
            _labels: PhantomData,
        }
    }

    fn histograms<L: Labels>(&self, name: &str, help: &str, buckets: &[f64]) -> Histograms<L> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let vec = HistogramVec::new(opts, L::NAMES).expect("valid metric");
        Family {
            vec: self.add(vec),
            _labels: PhantomData,
        }
    }
}

/// Users, devices and their timers (the shard's domain).
pub struct PresenceMetrics {
    pub online_users: IntGauge,
    pub online_devices: IntGauge,
    pub cached_users: IntGauge,
    pub heartbeats: Counters<HeartbeatResult>,
    pub timeouts: IntCounter,
    pub transitions: Counters<Transition<'static>>,
    pub timer_fired: IntCounter,
    pub timer_lag: Histogram,
    pub recovered_users: IntCounter,
    /// Changes refused by a per-user rate limit (counted by the user's owner).
    pub rate_limited: Counters<RateLimit>,
}

impl PresenceMetrics {
    fn new(r: &Reg) -> PresenceMetrics {
        let m = PresenceMetrics {
            online_users: r.gauge(
                "presence_online_users",
                "Users with at least one online device.",
            ),
            online_devices: r.gauge("presence_online_devices", "Devices online."),
            cached_users: r.gauge(
                "presence_cached_users",
                "Users whose live state this node holds in memory.",
            ),
            heartbeats: r.counters(
                "presence_heartbeats_total",
                "Heartbeats received, by result.",
            ),
            timeouts: r.counter(
                "presence_device_timeouts_total",
                "Devices marked offline because their heartbeats stopped.",
            ),
            transitions: r.counters(
                "presence_status_transitions_total",
                "Changes of a user's effective status.",
            ),
            timer_fired: r.counter(
                "presence_timer_fired_total",
                "Timer wheel entries that were due and processed.",
            ),
            timer_lag: r.histogram(
                "presence_timer_lag_seconds",
                "How late a timer tick ran compared with its scheduled time.",
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            ),
            recovered_users: r.counter(
                "presence_recovered_users_total",
                "Live users reloaded from the store's live index at start-up.",
            ),
            rate_limited: r.counters(
                "presence_rate_limited_total",
                "Changes refused by a per-user rate limit, counted by the user's shard, by limit \
                 (status: over PRESENCE_STATUS_RATE; status_table_full: too many users tracked).",
            ),
        };
        // Pre-create the label sets dashboards expect, so they read 0 rather than nothing.
        for &h in &HeartbeatResult::ALL[..2] {
            m.heartbeats.get(h);
        }
        for &k in RateLimit::ALL {
            m.rate_limited.get(k);
        }
        m
    }
}

/// The REST API.
pub struct HttpMetrics {
    pub requests: Counters<HttpAnswer<'static>>,
    pub duration: Histograms<HttpRoute<'static>>,
    pub refusals: Counters<HttpRefusal>,
}

impl HttpMetrics {
    fn new(r: &Reg) -> HttpMetrics {
        let m = HttpMetrics {
            requests: r.counters(
                "presence_http_requests_total",
                "HTTP requests, by route, method and code.",
            ),
            duration: r.histograms(
                "presence_http_request_duration_seconds",
                "HTTP request latency.",
                LATENCY_BUCKETS,
            ),
            refusals: r.counters(
                "presence_http_refusals_total",
                "Requests refused or connections closed by the HTTP server's limits, by reason \
                 (header_timeout, body_timeout, idle_timeout, overloaded).",
            ),
        };
        for &k in HttpRefusal::ALL {
            m.refusals.get(k);
        }
        m
    }
}

/// The store, and Redis under it.
pub struct StoreMetrics {
    pub ops: Counters<StoreResult<'static>>,
    pub duration: Histograms<StoreOp<'static>>,
    pub redis_round_trips: Counters<StoreOp<'static>>,
    pub redis_commands: Counters<StoreOp<'static>>,
    /// Writes sent in save script calls (one call per write group): divided by
    /// `redis_commands{op="save"}`, the writes per group.
    pub redis_group_writes: IntCounter,
    pub redis_errors: Counters<RedisError>,
    pub redis_topology_refreshes: IntCounter,
    /// Writes the store refused, by reason (`stale`: a newer version is stored; `fenced`: a
    /// newer owner took the partition).
    pub refused_writes: Counters<StoreOp<'static>>,
    /// Background writes (timer changes, refreshes, repairs) retried after a failure.
    pub retries: Counters<StoreOp<'static>>,
    /// Background writes waiting for the writer.
    pub backlog: IntGauge,
    /// Records skipped on reload because they could not be read.
    pub unreadable_records: IntCounter,
    /// Timer writes a shard could not make before letting their partition go.
    pub abandoned_writes: IntCounter,
    /// 1 when the store answers (some Redis master answered the last health check).
    pub up: IntGauge,
    /// Redis masters that did not answer the last health check.
    pub redis_unreachable_masters: IntGauge,
}

impl StoreMetrics {
    fn new(r: &Reg) -> StoreMetrics {
        let m = StoreMetrics {
            ops: r.counters(
                "presence_store_operations_total",
                "Store operations, by operation and result.",
            ),
            duration: r.histograms(
                "presence_store_operation_duration_seconds",
                "Store operation latency.",
                LATENCY_BUCKETS,
            ),
            redis_round_trips: r.counters(
                "presence_redis_round_trips_total",
                "Pipelines sent to Redis nodes (one per node per operation), by operation.",
            ),
            redis_commands: r.counters(
                "presence_redis_commands_total",
                "Redis commands sent, by operation.",
            ),
            redis_group_writes: r.counter(
                "presence_redis_group_writes_total",
                "Writes sent in save script calls (one per write group); over presence_redis_commands_total{op=\"save\"}, the writes per group.",
            ),
            redis_errors: r.counters(
                "presence_redis_errors_total",
                "Redis errors, by kind (retriable, fatal, replica_lag).",
            ),
            redis_topology_refreshes: r.counter(
                "presence_redis_topology_refreshes_total",
                "Reads of the Redis Cluster slot map.",
            ),
            refused_writes: r.counters(
                "presence_store_refused_writes_total",
                "Writes the store refused, by reason (stale: a newer version is stored; fenced: a newer owner took the partition).",
            ),
            retries: r.counters(
                "presence_store_retries_total",
                "Background store work (timer changes, refreshes, repairs, the fence check after a stall) retried after a failure, by operation.",
            ),
            backlog: r.gauge(
                "presence_store_backlog",
                "Background store work waiting: timer changes, refreshes and reloads, coalesced per user.",
            ),
            abandoned_writes: r.counter(
                "presence_store_abandoned_writes_total",
                "Timer writes a shard could not make before letting their partition go; the new owner re-derives them from the stored state.",
            ),
            unreadable_records: r.counter(
                "presence_store_unreadable_records_total",
                "Stored records skipped on reload because they could not be read.",
            ),
            up: r.gauge(
                "presence_store_up",
                "1 when the store answers (at least one Redis master answered the last health \
                 check), 0 when none does.",
            ),
            redis_unreachable_masters: r.gauge(
                "presence_redis_unreachable_masters",
                "Redis masters that did not answer the last health check.",
            ),
        };
        for op in ["stale", "fenced"] {
            m.refused_writes.get(StoreOp { op });
        }
        for op in ["save", "refresh", "repair", "fences"] {
            m.retries.get(StoreOp { op });
        }
        for &k in RedisError::ALL {
            m.redis_errors.get(k);
        }
        m
    }
}

/// The ring, and the partitions a shard owns.
pub struct RingMetrics {
    pub members: IntGauge,
    pub epoch: IntGauge,
    pub changes: IntCounter,
    pub owned_partitions: IntGauge,
    pub handoffs: Counters<Direction>,
    pub handoff_duration: Histograms<Direction>,
    pub handover_polls: Counters<HandoverPoll>,
    pub fenced: IntCounter,
    pub stalls: IntCounter,
}

impl RingMetrics {
    fn new(r: &Reg) -> RingMetrics {
        let m = RingMetrics {
            members: r.gauge("presence_ring_members", "Shards in this node's ring."),
            epoch: r.gauge(
                "presence_ring_epoch",
                "Epoch of this node's ring (identifies the member set; equal on nodes that agree).",
            ),
            changes: r.counter(
                "presence_ring_changes_total",
                "Times this node's ring changed.",
            ),
            owned_partitions: r.gauge(
                "presence_owned_partitions",
                "Partitions this shard owns and serves.",
            ),
            handoffs: r.counters(
                "presence_handoffs_total",
                "Partition handoffs, by direction (gained, released).",
            ),
            handoff_duration: r.histograms(
                "presence_handoff_duration_seconds",
                "How long taking over (loading) or releasing partitions took.",
                &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            handover_polls: r.counters(
                "presence_handover_polls_total",
                "Polls of a previous owner for partitions this shard gained, by result (released: it let some go; waiting: it still serves them; declined: it let some go without having held the store's fence, so every member is asked for them next; failed: no answer, the grace bounds the wait).",
            ),
            fenced: r.counter(
                "presence_partitions_fenced_total",
                "Partitions this shard held that another shard had fenced meanwhile, found by the fence check after a stall (it missed a ring change): released, and taken back from that shard.",
            ),
            stalls: r.counter(
                "presence_stalls_total",
                "Times this shard's process stalled (a 500 ms timer came more than 1 s late: stopped, paused or starved); each is followed by a check of its partitions' fences.",
            ),
        };
        for &d in Direction::ALL {
            m.handoffs.get(d);
        }
        for &r in HandoverPoll::ALL {
            m.handover_polls.get(r);
        }
        m
    }
}

/// gRPC between nodes.
pub struct GrpcMetrics {
    pub requests: Counters<GrpcAnswer<'static>>,
    pub duration: Histograms<GrpcCall<'static>>,
    pub wrong_owner_retries: IntCounter,
    /// Heartbeat batches a gateway sent, and the heartbeats they carried.
    pub heartbeat_batches: IntCounter,
    pub heartbeats_batched: IntCounter,
    /// `HeartbeatStream`s a gateway opened.
    pub heartbeat_streams_opened: IntCounter,
    /// Heartbeats a gateway sent alone after coalescing did not settle them.
    pub heartbeats_alone: IntCounter,
    /// Online batches a gateway sent, the onlines they carried, and those sent alone after.
    pub online_batches: IntCounter,
    pub onlines_batched: IntCounter,
    pub onlines_alone: IntCounter,
    /// Status-read batches a gateway sent, the reads they carried, and those sent alone after.
    pub read_batches: IntCounter,
    pub reads_batched: IntCounter,
    pub reads_alone: IntCounter,
}

impl GrpcMetrics {
    fn new(r: &Reg) -> GrpcMetrics {
        GrpcMetrics {
            requests: r.counters(
                "presence_grpc_requests_total",
                "gRPC calls between nodes, by side (client, server), method and code.",
            ),
            duration: r.histograms(
                "presence_grpc_request_duration_seconds",
                "gRPC call latency.",
                LATENCY_BUCKETS,
            ),
            wrong_owner_retries: r.counter(
                "presence_wrong_owner_retries_total",
                "Gateway retries after a shard answered that it does not own the user.",
            ),
            heartbeat_batches: r.counter(
                "presence_heartbeat_batches_total",
                "Heartbeat batches from a gateway to the shards (each one message on a HeartbeatStream, or a HeartbeatBatch call).",
            ),
            heartbeat_streams_opened: r.counter(
                "presence_heartbeat_streams_opened_total",
                "HeartbeatStreams a gateway opened to the shards: one per shard, and another after each failed or timed-out batch.",
            ),
            heartbeats_batched: r.counter(
                "presence_heartbeats_batched_total",
                "Heartbeats a gateway sent to the shards in batches (divided by presence_heartbeat_batches_total: the mean batch).",
            ),
            heartbeats_alone: r.counter(
                "presence_heartbeats_sent_alone_total",
                "Heartbeats a gateway sent alone on the routed path after coalescing did not settle them (refused by the shard, batch failed, queue full).",
            ),
            online_batches: r.counter(
                "presence_online_batches_total",
                "Online batches from a gateway to the shards (each an OnlineBatch call).",
            ),
            onlines_batched: r.counter(
                "presence_onlines_batched_total",
                "Onlines a gateway sent to the shards in batches (divided by presence_online_batches_total: the mean batch).",
            ),
            onlines_alone: r.counter(
                "presence_onlines_sent_alone_total",
                "Onlines a gateway sent alone on the routed path after coalescing did not settle them (a refusal the routed path retries, batch failed or timed out, queue full, a shard without OnlineBatch).",
            ),
            read_batches: r.counter(
                "presence_status_batches_total",
                "Status-read batches from a gateway to the shards (each a StatusBatch call).",
            ),
            reads_batched: r.counter(
                "presence_status_reads_batched_total",
                "Status reads a gateway sent to the shards in batches (divided by presence_status_batches_total: the mean batch).",
            ),
            reads_alone: r.counter(
                "presence_status_reads_sent_alone_total",
                "Status reads a gateway sent alone on the routed path after coalescing did not settle them (a refusal the routed path retries, batch failed or timed out, queue full, a shard without StatusBatch).",
            ),
        }
    }
}

/// Real-time push: sockets, subscriptions, event streams.
pub struct PushMetrics {
    pub ws_connections: IntGauge,
    pub ws_subscriptions: IntGauge,
    pub slow_consumers: IntCounter,
    pub ws_messages: Counters<WsMessage<'static>>,
    pub events_published: IntCounter,
    pub events_delivered: IntCounter,
    pub event_streams: IntGauge,
    /// Gateway event streams reopened after they failed, were cut off or went silent.
    pub stream_restarts: IntCounter,
    pub delay: Histogram,
    pub subscription_changes: Counters<SubscriptionChange<'static>>,
    pub ws_refusals: Counters<WsRefusal>,
    pub ws_degraded: IntCounter,
    pub ws_catch_up_frames: IntCounter,
    pub ws_drain_offlines: Counters<DrainOffline>,
    /// Beats of the WebSocket liveness lease, by result.
    pub ws_lease_beats: Counters<LeaseBeat>,
    /// Rounds of the WebSocket liveness lease.
    pub ws_lease_rounds: IntCounter,
    /// Events of users who show themselves to their contacts only, not sent because their
    /// contacts could not be read.
    pub unpublished: IntCounter,
    /// Presence frames (pushed events) that showed a viewer the OFFLINE view of a user hiding
    /// from it, or an INVISIBLE user's.
    pub filtered: IntCounter,
}

impl PushMetrics {
    fn new(r: &Reg) -> PushMetrics {
        let m = PushMetrics {
            ws_connections: r.gauge(
                "presence_ws_connections",
                "WebSockets connected to this gateway.",
            ),
            ws_subscriptions: r.gauge(
                "presence_ws_subscriptions",
                "Subscriptions (subscriber, target) of the users connected to this gateway.",
            ),
            slow_consumers: r.counter(
                "presence_slow_consumers_total",
                "Sockets (or gateway streams) cut off: they did not read their messages, or sent too fast.",
            ),
            ws_messages: r.counters(
                "presence_ws_messages_total",
                "WebSocket client messages, by type and result.",
            ),
            events_published: r.counter(
                "presence_events_published_total",
                "Presence events a shard sent (once per interested gateway).",
            ),
            events_delivered: r.counter(
                "presence_events_delivered_total",
                "Presence frames queued to sockets.",
            ),
            event_streams: r.gauge(
                "presence_event_streams",
                "Open shard-to-gateway event streams.",
            ),
            stream_restarts: r.counter(
                "presence_event_stream_restarts_total",
                "Gateway event streams reopened after they failed, were cut off by the shard, or carried nothing (not even a ping) for 3 ping intervals.",
            ),
            delay: r.histogram(
                "presence_push_delay_seconds",
                "Delay from a presence change to its frame being queued to sockets.",
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            subscription_changes: r.counters(
                "presence_subscription_changes_total",
                "Subscription changes, by mode.",
            ),
            ws_refusals: r.counters(
                "presence_ws_refusals_total",
                "WebSocket messages or upgrades refused by a limit, by reason (resume_too_large, draining, \
                 too_many_sockets, idle_timeout, frame_too_large).",
            ),
            ws_degraded: r.counter(
                "presence_ws_degraded_welcomes_total",
                "WebSockets welcomed without their subscription list (the read failed; it is retried).",
            ),
            ws_catch_up_frames: r.counter(
                "presence_ws_catch_up_frames_total",
                "Presence frames a resume queued as the socket's queue drained (after the first chunk).",
            ),
            ws_drain_offlines: r.counters(
                "presence_ws_drain_offlines_total",
                "Devices a draining gateway took offline for its closed sockets, by result (ok, error, timeout).",
            ),
            ws_lease_beats: r.counters(
                "presence_ws_lease_beats_total",
                "Heartbeats the WebSocket liveness lease sent for sockets heard from since their last one, by result (ok; revived: the owner no longer held the device online and it came back as the socket's session; failed: sent again by the next round while the socket is open).",
            ),
            ws_lease_rounds: r.counter(
                "presence_ws_lease_rounds_total",
                "Rounds of the WebSocket liveness lease (one per PRESENCE_WS_LEASE_INTERVAL).",
            ),
            unpublished: r.counter(
                "presence_events_unpublished_total",
                "Presence events a shard did not send because the user shows itself to its contacts only and its contacts could not be read.",
            ),
            filtered: r.counter(
                "presence_push_privacy_filtered_total",
                "Presence frames queued to a socket with another view than the truth (privacy settings or INVISIBLE).",
            ),
        };
        for &k in WsRefusal::ALL {
            m.ws_refusals.get(k);
        }
        for &k in DrainOffline::ALL {
            m.ws_drain_offlines.get(k);
        }
        for &k in LeaseBeat::ALL {
            m.ws_lease_beats.get(k);
        }
        m
    }
}

/// Authentication of clients.
pub struct AuthMetrics {
    /// 1 for the mode in force, 0 for the others.
    pub mode: Gauges<AuthScheme>,
    pub refusals: Counters<AuthRefusal>,
    pub jwks_fetches: Counters<JwksFetch>,
    /// Keys of the JWKS in use.
    pub jwks_keys: IntGauge,
}

impl AuthMetrics {
    fn new(r: &Reg) -> AuthMetrics {
        let m = AuthMetrics {
            mode: r.gauges(
                "presence_auth_mode",
                "How clients authenticate (PRESENCE_AUTH): 1 for the mode in force.",
            ),
            refusals: r.counters(
                "presence_auth_refusals_total",
                "Requests, upgrades and socket token refreshes refused, by reason (missing, \
                 invalid, expired, wrong_audience, wrong_issuer, unknown_key, forbidden).",
            ),
            jwks_fetches: r.counters(
                "presence_auth_jwks_fetches_total",
                "Fetches of the JWKS, by result (ok, error); after an error the last good keys stay in use.",
            ),
            jwks_keys: r.gauge(
                "presence_auth_jwks_keys",
                "Usable keys (RS256, ES256, EdDSA) of the JWKS in use.",
            ),
        };
        for &k in AuthScheme::ALL {
            m.mode.get(k);
        }
        for &k in AuthRefusal::ALL {
            m.refusals.get(k);
        }
        for &k in JwksFetch::ALL {
            m.jwks_fetches.get(k);
        }
        m
    }
}

/// Every metric of a node, registered in one registry per node.
pub struct Metrics {
    pub registry: Registry,
    /// 1 when the node is ready to serve.
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
    pub presence: PresenceMetrics,
    pub http: HttpMetrics,
    pub store: StoreMetrics,
    pub ring: RingMetrics,
    pub grpc: GrpcMetrics,
    pub push: PushMetrics,
    pub auth: AuthMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = Reg(&registry);
        let ready = r.gauge(
            "presence_ready",
            "1 when the node is ready to serve, 0 otherwise.",
        );
        let build_info = r.add(
            IntGaugeVec::new(
                Opts::new("presence_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let presence = PresenceMetrics::new(&r);
        let http = HttpMetrics::new(&r);
        let store = StoreMetrics::new(&r);
        let ring = RingMetrics::new(&r);
        let grpc = GrpcMetrics::new(&r);
        let push = PushMetrics::new(&r);
        let auth = AuthMetrics::new(&r);
        Metrics {
            registry,
            ready,
            build_info,
            presence,
            http,
            store,
            ring,
            grpc,
            push,
            auth,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        String::from_utf8(buf).expect("text format is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_land_under_their_names() {
        let m = Metrics::new();
        m.http
            .requests
            .get(HttpAnswer {
                route: "/x",
                method: "GET",
                code: "200",
            })
            .inc();
        m.ring.handoffs.get(Direction::Gained).inc_by(3);
        let text = m.render();
        assert!(
            text.contains(r#"presence_http_requests_total{code="200",method="GET",route="/x"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"presence_handoffs_total{direction="gained"} 3"#));
        assert!(text.contains(r#"presence_handoffs_total{direction="released"} 0"#));
        assert!(text.contains(r#"presence_redis_errors_total{kind="replica_lag"} 0"#));
        assert!(text.contains(r#"presence_heartbeats_total{result="not_online"} 0"#));
    }

    #[test]
    fn every_name_has_the_prefix_and_a_unit_suffix_where_it_counts() {
        let m = Metrics::new();
        for family in m.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("presence_"), "{name}");
            match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => {
                    assert!(name.ends_with("_total"), "{name}")
                }
                prometheus::proto::MetricType::HISTOGRAM => {
                    assert!(name.ends_with("_seconds"), "{name}")
                }
                _ => {}
            }
        }
    }
}
