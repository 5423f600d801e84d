//! Wires one process together (store, shard, timers, HTTP) and runs it until shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState, Limits};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::ring::PARTITIONS;
use crate::shard::Shard;
use crate::store::{MemoryStore, RedisStore, Store};

/// A node bound to its listener, ready to run.
pub struct Node {
    config: Config,
    listener: TcpListener,
    state: AppState,
    shard: Arc<Shard>,
}

impl Node {
    /// Builds the node and binds its listener.
    pub async fn bind(config: Config) -> anyhow::Result<Node> {
        let limits = Limits::from_config(&config).map_err(config_error)?;
        let metrics = Arc::new(Metrics::new());
        let store: Arc<dyn Store> = match config.redis() {
            Some(opts) => RedisStore::connect(opts, metrics.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to Redis Cluster: {e}"))?,
            None => MemoryStore::new(),
        };
        let shard = Arc::new(Shard::new(
            store.clone(),
            config.rules(),
            config.timer_tick,
            metrics.clone(),
        ));
        let state = AppState {
            presence: shard.clone(),
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            limits: Arc::new(limits),
        };
        let all: Vec<u32> = (0..PARTITIONS).collect();
        let started = std::time::Instant::now();
        let recovered = shard
            .recover(&all)
            .await
            .map_err(|e| anyhow::anyhow!("recovery failed: {e}"))?;
        if recovered > 0 {
            tracing::info!(users = recovered, took = ?started.elapsed(), "recovered live users");
        }
        let listener = TcpListener::bind(config.listen).await?;
        tracing::info!(addr = %listener.local_addr()?, store = store.kind(), "listening");
        Ok(Node {
            config,
            listener,
            state,
            shard,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` fires, then reports not ready, drains requests in flight (up to
    /// the drain timeout), stops the timers and flushes their writes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Node {
            config,
            listener,
            state,
            shard,
        } = self;
        let tracker = TaskTracker::new();
        let timers = CancellationToken::new();
        tracker.spawn(shard.clone().run_timers(timers.clone()));
        let ready = state.ready.clone();
        let app = api::router(state);
        ready.store(true, Ordering::Relaxed);
        tracing::info!("ready");

        let drain = shutdown.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            drain.cancelled().await;
            ready.store(false, Ordering::Relaxed);
            tracing::info!("draining");
        });
        let server = tokio::spawn(async move { server.await });
        shutdown.cancelled().await;
        match tokio::time::timeout(config.drain_timeout, server).await {
            Ok(r) => r??,
            Err(_) => tracing::warn!(timeout = ?config.drain_timeout, "drain timed out"),
        }
        timers.cancel();
        tracker.close();
        tracker.wait().await;
        tracing::info!("stopped");
        Ok(())
    }
}

fn config_error(e: ConfigError) -> anyhow::Error {
    anyhow::anyhow!(e.to_string())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
