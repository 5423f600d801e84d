//! The presence-service binary: parse the configuration, start telemetry, run the node.

use presence_service::config::{Config, EXIT_USAGE};
use presence_service::node::{self, Node};
use tokio_util::sync::CancellationToken;

/// mimalloc: per-thread heaps. Under glibc's malloc the gateway spent a quarter of its time in
/// the allocator and in waits on its arena locks (see docs/benchmarks.md, issue 13).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::load();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build()?.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let _telemetry = presence_service::telemetry::init(&config).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE);
    });
    let node = Node::bind(config).await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        node::signal().await;
        trigger.cancel();
    });
    node.run(shutdown).await
}
