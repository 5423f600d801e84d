//! The peer transport between nodes, over gRPC: the shard's service ([`server`]) and the
//! gateway's router that implements [`crate::service::Presence`] by calling the owning shard
//! ([`client`]). Trace context crosses every call in W3C `traceparent` metadata, and every item
//! of a batch in its own `trace` field ([`item_trace`], [`item_span`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::Error;
use crate::metrics::{GrpcAnswer, GrpcCall, Metrics};

pub mod client;
pub mod coalesce;
pub mod server;
pub mod tls;
pub mod upstream;

pub use client::{Coalesce, GrpcProbe, Router};
pub use server::{Handoff, ShardService};

/// Serves `shard`, whose requests read `own` and whose calls count in `metrics`, on a loopback
/// port, answering `Unimplemented` to the methods in `older`, as a shard without them (an older
/// version) does. Answers its address. For tests.
#[cfg(test)]
pub(crate) async fn serve_on_loopback(
    shard: Arc<crate::shard::Shard>,
    own: Arc<crate::ownership::Table>,
    metrics: Arc<Metrics>,
    older: &[&str],
) -> String {
    use crate::proto::v1::presence_shard_server::PresenceShardServer;
    use tonic::server::NamedService;

    let service = ShardService {
        shard,
        own,
        fanout: crate::push::fanout::Fanout::new(metrics.clone(), 64),
        metrics,
        stop: tokio_util::sync::CancellationToken::new(),
    };

    let mut router =
        tonic::service::Routes::new(PresenceShardServer::new(service)).into_axum_router();
    for method in older {
        let path = format!(
            "/{}/{method}",
            <PresenceShardServer<ShardService> as NamedService>::NAME
        );
        router = router.route(
            &path,
            axum::routing::post(|| async {
                tonic::Status::unimplemented("an older shard").into_http::<axum::body::Body>()
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(router.into())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

/// Counts and times one gRPC call on either side.
pub(crate) struct Timed {
    metrics: Arc<Metrics>,
    side: &'static str,
    method: &'static str,
    started: Instant,
}

impl Timed {
    pub(crate) fn new(metrics: Arc<Metrics>, side: &'static str, method: &'static str) -> Timed {
        Timed {
            metrics,
            side,
            method,
            started: Instant::now(),
        }
    }

    fn record(&self, code: &str) {
        self.metrics
            .grpc
            .requests
            .get(GrpcAnswer {
                side: self.side,
                method: self.method,
                code,
            })
            .inc();
        self.metrics
            .grpc
            .duration
            .get(GrpcCall {
                side: self.side,
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Server side: records the outcome and turns it into the gRPC answer.
    pub(crate) fn done<T>(self, r: Result<T, Error>) -> Result<tonic::Response<T>, tonic::Status> {
        match r {
            Ok(v) => {
                self.record("ok");
                Ok(tonic::Response::new(v))
            }
            Err(e) => {
                self.record(e.reason());
                Err(e.into())
            }
        }
    }

    /// Client side: records the outcome of a call and converts its error.
    pub(crate) fn finish<T>(
        self,
        r: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, Error> {
        match r {
            Ok(v) => {
                self.record("ok");
                Ok(v.into_inner())
            }
            Err(s) => {
                let e = Error::from(s);
                self.record(e.reason());
                Err(e)
            }
        }
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the current span's trace context into an outgoing request.
pub(crate) fn inject_trace<T>(req: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
    });
}

/// A span for an incoming call, child of the caller's trace when it sent one.
pub(crate) fn extract_trace<T>(req: &tonic::Request<T>, method: &'static str) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&MetadataExtractor(req.metadata()))
    });
    let span = tracing::info_span!("grpc", rpc.method = method);
    let _ = span.set_parent(parent);
    span
}

/// The trace context a batch item carries to the shard: the current span's, when this process
/// exports traces and the span is sampled; else empty (and nothing is looked up).
pub(crate) fn item_trace() -> HashMap<String, String> {
    if !crate::telemetry::exporting() {
        return HashMap::new();
    }
    trace_map(&tracing::Span::current().context())
}

/// `cx` as W3C trace context fields, if it is sampled.
fn trace_map(cx: &opentelemetry::Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    if cx.span().span_context().is_sampled() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut map));
    }
    map
}

/// The most fields, and the longest value, of a batch item's trace context that a shard reads
/// (the gateway sends `traceparent` and `tracestate`): a larger one is ignored, not parsed.
const MAX_TRACE_FIELDS: usize = 2;
const MAX_TRACE_VALUE: usize = 1024;

/// The span one batch item runs in: a child of the trace its request came with
/// ([`item_parent`]), when this process exports traces; else `batch`.
pub(crate) fn item_span(
    trace: &HashMap<String, String>,
    method: &'static str,
    batch: &tracing::Span,
) -> tracing::Span {
    if trace.is_empty() || !crate::telemetry::exporting() {
        return batch.clone();
    }
    let Some(parent) = item_parent(trace) else {
        return batch.clone();
    };
    let span = tracing::info_span!("grpc.item", rpc.method = method);
    let _ = span.set_parent(parent);
    span
}

/// The trace context a batch item carries, if it is valid and within the limits (a larger one
/// is not parsed).
fn item_parent(trace: &HashMap<String, String>) -> Option<opentelemetry::Context> {
    if trace.len() > MAX_TRACE_FIELDS || trace.values().any(|v| v.len() > MAX_TRACE_VALUE) {
        return None;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(trace));
    parent.span().span_context().is_valid().then_some(parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    #[test]
    fn trace_context_crosses_grpc_metadata() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let prop = TraceContextPropagator::new();
        let mut md = tonic::metadata::MetadataMap::new();
        prop.inject_context(&cx, &mut MetadataInjector(&mut md));
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = prop.extract(&MetadataExtractor(&md));
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
    }

    /// A batch item carries a sampled context as W3C fields, and nothing for an unsampled one.
    #[test]
    fn only_a_sampled_context_goes_with_a_batch_item() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let context = |flags| {
            let sc = SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                TraceState::default(),
            );
            opentelemetry::Context::new().with_remote_span_context(sc)
        };
        let sampled = trace_map(&context(TraceFlags::SAMPLED));
        assert_eq!(
            sampled.get("traceparent").map(String::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(trace_map(&context(TraceFlags::default())).is_empty());
        assert!(trace_map(&opentelemetry::Context::new()).is_empty());
    }

    /// A shard makes an item its own span only for a valid context within the limits: a
    /// malformed, oversized or empty one leaves the item in the batch's span.
    #[test]
    fn a_malformed_or_oversized_item_context_is_ignored() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
        let map = |pairs: &[(&str, String)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let asked = |m: &HashMap<String, String>| item_parent(m).is_some();
        assert!(asked(&map(&[("traceparent", valid.clone())])));
        assert!(!asked(&map(&[("traceparent", "garbage".into())])));
        assert!(!asked(&map(&[])));
        assert!(!asked(&map(&[
            ("traceparent", valid.clone()),
            ("tracestate", "x".repeat(2000))
        ])));
        assert!(!asked(&map(&[
            ("traceparent", valid.clone()),
            ("tracestate", "a=1".into()),
            ("baggage", "b=2".into()),
        ])));
    }
}
