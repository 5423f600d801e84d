//! Logs through `tracing`, and OpenTelemetry trace export over OTLP when an endpoint is set.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, ConfigError, LogFormat};

/// Whether this process exports traces: only then does a batched request carry its trace
/// context to the shard (`peer::item_trace`), so that it costs nothing otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces (OTLP is configured).
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Marks this process as exporting traces (`init` does, when OTLP is configured; tests that
/// install their own exporter do too).
pub(crate) fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Keeps the trace pipeline alive; flushes it on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber. Must run inside a tokio runtime when OTLP is configured.
pub fn init(config: &Config) -> Result<Telemetry, ConfigError> {
    let filter = EnvFilter::try_new(&config.log_filter).map_err(|e| ConfigError {
        variable: "RUST_LOG".into(),
        message: e.to_string(),
    })?;
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed(),
    };
    let mut provider = None;
    let otel = match config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| ConfigError {
                    variable: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                    message: e.to_string(),
                })?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("presence-service")
                .build();
            let p = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = p.tracer("presence-service");
            opentelemetry::global::set_tracer_provider(p.clone());
            provider = Some(p);
            set_exporting(true);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    // W3C trace context on every gRPC call, whether or not traces are exported.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}
