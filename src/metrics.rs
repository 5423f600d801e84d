//! The Prometheus registry and every metric the service exports.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric, registered in one registry per node.
pub struct Metrics {
    pub registry: Registry,
    pub online_users: IntGauge,
    pub online_devices: IntGauge,
    pub cached_users: IntGauge,
    pub heartbeats: IntCounterVec,
    pub timeouts: IntCounter,
    pub transitions: IntCounterVec,
    pub timer_fired: IntCounter,
    pub timer_lag: Histogram,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub store_ops: IntCounterVec,
    pub store_duration: HistogramVec,
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
    pub redis_round_trips: IntCounterVec,
    pub store_redis_commands: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub redis_topology_refreshes: IntCounter,
    pub recovered_users: IntCounter,
    pub ring_members: IntGauge,
    pub ring_epoch: IntGauge,
    pub ring_changes: IntCounter,
    pub owned_partitions: IntGauge,
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    pub wrong_owner_retries: IntCounter,
    pub handoffs: IntCounterVec,
    pub handoff_duration: HistogramVec,
    pub ws_connections: IntGauge,
    pub ws_subscriptions: IntGauge,
    pub ws_slow_consumers: IntCounter,
    pub ws_messages: IntCounterVec,
    pub events_published: IntCounter,
    pub events_delivered: IntCounter,
    pub event_streams: IntGauge,
    pub push_delay: Histogram,
    pub subscription_changes: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let online_users = gauge(
            "presence_online_users",
            "Users with at least one online device.",
        );
        let online_devices = gauge("presence_online_devices", "Devices online.");
        let cached_users = gauge(
            "presence_cached_users",
            "Users whose live state this node holds in memory.",
        );
        let ready = gauge(
            "presence_ready",
            "1 when the node is ready to serve, 0 otherwise.",
        );
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "presence_heartbeats_total",
                "Heartbeats received, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let timeouts = IntCounter::new(
            "presence_device_timeouts_total",
            "Devices marked offline because their heartbeats stopped.",
        )
        .expect("valid metric");
        let transitions = IntCounterVec::new(
            Opts::new(
                "presence_status_transitions_total",
                "Changes of a user's effective status.",
            ),
            &["from", "to"],
        )
        .expect("valid metric");
        let timer_fired = IntCounter::new(
            "presence_timer_fired_total",
            "Timer wheel entries that were due and processed.",
        )
        .expect("valid metric");
        let timer_lag = Histogram::with_opts(
            HistogramOpts::new(
                "presence_timer_lag_seconds",
                "How late a timer tick ran compared with its scheduled time.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )
        .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "presence_http_requests_total",
                "HTTP requests, by route, method and code.",
            ),
            &["route", "method", "code"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "presence_http_request_duration_seconds",
                "HTTP request latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method"],
        )
        .expect("valid metric");
        let store_ops = IntCounterVec::new(
            Opts::new(
                "presence_store_operations_total",
                "Store operations, by operation and result.",
            ),
            &["op", "result"],
        )
        .expect("valid metric");
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "presence_store_operation_duration_seconds",
                "Store operation latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("presence_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let redis_round_trips = IntCounterVec::new(
            Opts::new(
                "presence_redis_round_trips_total",
                "Pipelines sent to Redis nodes (one per node per operation), by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let store_redis_commands = IntCounterVec::new(
            Opts::new(
                "presence_redis_commands_total",
                "Redis commands sent, by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "presence_redis_errors_total",
                "Redis errors, by kind (retriable, fatal, replica_lag).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let redis_topology_refreshes = IntCounter::new(
            "presence_redis_topology_refreshes_total",
            "Reads of the Redis Cluster slot map.",
        )
        .expect("valid metric");
        let recovered_users = IntCounter::new(
            "presence_recovered_users_total",
            "Live users reloaded from the store's live index at start-up.",
        )
        .expect("valid metric");
        let ring_members = gauge("presence_ring_members", "Shards in this node's ring.");
        let ring_epoch = gauge(
            "presence_ring_epoch",
            "Epoch of this node's ring (identifies the member set; equal on nodes that agree).",
        );
        let ring_changes = IntCounter::new(
            "presence_ring_changes_total",
            "Times this node's ring changed.",
        )
        .expect("valid metric");
        let owned_partitions = gauge(
            "presence_owned_partitions",
            "Partitions this shard owns and serves.",
        );
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "presence_grpc_requests_total",
                "gRPC calls between nodes, by side (client, server), method and code.",
            ),
            &["side", "method", "code"],
        )
        .expect("valid metric");
        let grpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "presence_grpc_request_duration_seconds",
                "gRPC call latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["side", "method"],
        )
        .expect("valid metric");
        let wrong_owner_retries = IntCounter::new(
            "presence_wrong_owner_retries_total",
            "Gateway retries after a shard answered that it does not own the user.",
        )
        .expect("valid metric");
        let handoffs = IntCounterVec::new(
            Opts::new(
                "presence_handoffs_total",
                "Partition handoffs, by direction (gained, released).",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let handoff_duration = HistogramVec::new(
            HistogramOpts::new(
                "presence_handoff_duration_seconds",
                "How long taking over (loading) or releasing partitions took.",
            )
            .buckets(vec![
                0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["direction"],
        )
        .expect("valid metric");
        let ws_connections = gauge(
            "presence_ws_connections",
            "WebSockets connected to this gateway.",
        );
        let ws_subscriptions = gauge(
            "presence_ws_subscriptions",
            "Subscriptions (subscriber, target) of the users connected to this gateway.",
        );
        let ws_slow_consumers = IntCounter::new(
            "presence_slow_consumers_total",
            "Sockets (or gateway streams) cut off: they did not read their messages, or sent too fast.",
        )
        .expect("valid metric");
        let ws_messages = IntCounterVec::new(
            Opts::new(
                "presence_ws_messages_total",
                "WebSocket client messages, by type and result.",
            ),
            &["type", "result"],
        )
        .expect("valid metric");
        let events_published = IntCounter::new(
            "presence_events_published_total",
            "Presence events a shard sent (once per interested gateway).",
        )
        .expect("valid metric");
        let events_delivered = IntCounter::new(
            "presence_events_delivered_total",
            "Presence frames queued to sockets.",
        )
        .expect("valid metric");
        let event_streams = gauge(
            "presence_event_streams",
            "Open shard-to-gateway event streams.",
        );
        let push_delay = Histogram::with_opts(
            HistogramOpts::new(
                "presence_push_delay_seconds",
                "Delay from a presence change to its frame being queued to sockets.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let subscription_changes = IntCounterVec::new(
            Opts::new(
                "presence_subscription_changes_total",
                "Subscription changes, by mode.",
            ),
            &["mode"],
        )
        .expect("valid metric");
        for d in ["gained", "released"] {
            handoffs.with_label_values(&[d]);
        }
        for c in [
            Box::new(online_users.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(online_devices.clone()),
            Box::new(cached_users.clone()),
            Box::new(ready.clone()),
            Box::new(heartbeats.clone()),
            Box::new(timeouts.clone()),
            Box::new(transitions.clone()),
            Box::new(timer_fired.clone()),
            Box::new(timer_lag.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(store_ops.clone()),
            Box::new(store_duration.clone()),
            Box::new(build_info.clone()),
            Box::new(redis_round_trips.clone()),
            Box::new(store_redis_commands.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_topology_refreshes.clone()),
            Box::new(recovered_users.clone()),
            Box::new(ring_members.clone()),
            Box::new(ring_epoch.clone()),
            Box::new(ring_changes.clone()),
            Box::new(owned_partitions.clone()),
            Box::new(grpc_requests.clone()),
            Box::new(grpc_duration.clone()),
            Box::new(wrong_owner_retries.clone()),
            Box::new(handoffs.clone()),
            Box::new(handoff_duration.clone()),
            Box::new(ws_connections.clone()),
            Box::new(ws_subscriptions.clone()),
            Box::new(ws_slow_consumers.clone()),
            Box::new(ws_messages.clone()),
            Box::new(events_published.clone()),
            Box::new(events_delivered.clone()),
            Box::new(event_streams.clone()),
            Box::new(push_delay.clone()),
            Box::new(subscription_changes.clone()),
        ] {
            reg(c);
        }
        // Pre-create the label sets dashboards expect, so they read 0 rather than nothing.
        for r in ["ok", "not_online"] {
            heartbeats.with_label_values(&[r]);
        }
        for k in ["retriable", "fatal", "replica_lag"] {
            redis_errors.with_label_values(&[k]);
        }
        Metrics {
            registry,
            online_users,
            online_devices,
            cached_users,
            heartbeats,
            timeouts,
            transitions,
            timer_fired,
            timer_lag,
            http_requests,
            http_duration,
            store_ops,
            store_duration,
            ready,
            build_info,
            redis_round_trips,
            store_redis_commands,
            redis_errors,
            redis_topology_refreshes,
            recovered_users,
            ring_members,
            ring_epoch,
            ring_changes,
            owned_partitions,
            grpc_requests,
            grpc_duration,
            wrong_owner_retries,
            handoffs,
            handoff_duration,
            ws_connections,
            ws_subscriptions,
            ws_slow_consumers,
            ws_messages,
            events_published,
            events_delivered,
            event_streams,
            push_delay,
            subscription_changes,
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
