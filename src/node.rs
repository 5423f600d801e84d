//! Wires one process together for its role (all, gateway or shard) and runs it until shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::lease::Leases;
use crate::api::{self, AppInner, AppState, Limits};
use crate::auth::Auth;
use crate::config::{Config, ConfigError, DiscoveryKind, Role};
use crate::membership::{self, Discovery, Members, StaticDiscovery};
use crate::metrics::Metrics;
use crate::ownership::Table;
use crate::peer::client::Clients;
use crate::peer::tls::GrpcTls;
use crate::peer::upstream::Upstreams;
use crate::peer::{GrpcProbe, Handoff, Router, ShardService};
use crate::proto::v1::presence_shard_server::PresenceShardServer;
use crate::push::fanout::Fanout;
use crate::push::hub::Hub;
use crate::ring::{self, PARTITIONS};
use crate::service::Presence;
use crate::shard::Shard;
use crate::store::{MemoryStore, RedisStore, Store};

/// What a shard process runs besides the HTTP side.
struct ShardParts {
    own: Arc<Handoff>,
    fanout: Arc<Fanout>,
    grpc: TcpListener,
    discovery: Arc<dyn Discovery>,
}

/// A node bound to its listeners, ready to run.
pub struct Node {
    config: Config,
    listener: TcpListener,
    state: AppState,
    shard: Option<Arc<Shard>>,
    shard_parts: Option<ShardParts>,
    /// The store of an `all` or `shard` node, watched for `presence_store_up`.
    store: Option<Arc<dyn Store>>,
    /// Stops the membership and ring tasks.
    background: CancellationToken,
    /// mTLS of the shard's gRPC server (`PRESENCE_GRPC_TLS_*`).
    grpc_tls: Option<GrpcTls>,
    /// `PRESENCE_METRICS_LISTEN`: metrics on a listener of their own.
    metrics_listener: Option<TcpListener>,
}

fn anyhow_config(e: ConfigError) -> anyhow::Error {
    anyhow::anyhow!(e.to_string())
}

async fn build_store(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.redis() {
        Some(opts) => RedisStore::connect(opts, metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis Cluster: {e}"))?,
        None => MemoryStore::new(),
    })
}

/// The shard of an `all` or `shard` node, with its settings from `config`.
fn new_shard(
    config: &Config,
    store: Arc<dyn Store>,
    metrics: &Arc<Metrics>,
    table: Arc<Table>,
) -> Arc<Shard> {
    Arc::new(
        Shard::new(
            store,
            config.rules(),
            config.timer_tick,
            metrics.clone(),
            table,
        )
        .with_status_rate(config.status_rate, config.status_rate_users as usize)
        .with_offline_records(config.max_offline_records, config.retention),
    )
}

async fn build_discovery(
    config: &Config,
    clients: &Arc<Clients>,
) -> anyhow::Result<Arc<dyn Discovery>> {
    Ok(match config.discovery {
        DiscoveryKind::Static => Arc::new(StaticDiscovery::new(
            config.static_shards(),
            Arc::new(GrpcProbe::new(clients.clone())),
            config.health_interval,
        )),
        DiscoveryKind::Kubernetes => {
            let namespace = config.k8s_namespace.clone().unwrap_or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "default".into())
            });
            let port = config
                .k8s_port
                .parse()
                .map_err(|e| anyhow::anyhow!("PRESENCE_K8S_PORT: {e}"))?;
            Arc::new(
                membership::kubernetes::KubernetesDiscovery::new(
                    namespace,
                    config.k8s_service.clone(),
                    port,
                )
                .await
                .map_err(|e| anyhow::anyhow!("kubernetes discovery: {e}"))?,
            )
        }
        DiscoveryKind::Nacos => Arc::new(
            membership::nacos::NacosDiscovery::new(
                config.nacos_addr.clone().unwrap_or_default(),
                config.nacos_namespace.clone(),
                config.nacos_group.clone(),
                config.nacos_service.clone(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("nacos discovery: {e}"))?,
        ),
    })
}

/// Starts a discovery and returns the member set it keeps up to date.
fn watch_members(
    discovery: &Arc<dyn Discovery>,
    cancel: &CancellationToken,
) -> watch::Receiver<Members> {
    let (tx, rx) = watch::channel(membership::members(Vec::new()));
    tokio::spawn(discovery.clone().run(tx, cancel.clone()));
    rx
}

/// Builds a [`Node`]: its config, and optionally the store and the discovery it runs on instead
/// of the ones the config names. Tests start nodes in-process this way, on the memory store or a
/// real Redis Cluster, with a static or in-memory member list.
pub struct NodeBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    discovery: Option<Arc<dyn Discovery>>,
}

impl NodeBuilder {
    /// The store of an `all` or `shard` node (default: the config's Redis Cluster, else memory).
    pub fn store(mut self, store: Arc<dyn Store>) -> NodeBuilder {
        self.store = Some(store);
        self
    }

    /// Where a `gateway` or `shard` node learns the members (default: the config's discovery).
    pub fn discovery(mut self, discovery: Arc<dyn Discovery>) -> NodeBuilder {
        self.discovery = Some(discovery);
        self
    }

    /// Builds the node for its role and binds its listeners.
    pub async fn bind(self) -> anyhow::Result<Node> {
        Node::build(self).await
    }
}

impl Node {
    /// A builder for a node with `config`.
    pub fn builder(config: Config) -> NodeBuilder {
        NodeBuilder {
            config,
            store: None,
            discovery: None,
        }
    }

    /// Builds the node for its role, on the store and discovery its config names, and binds its
    /// listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Node> {
        Node::builder(config).bind().await
    }

    async fn build(builder: NodeBuilder) -> anyhow::Result<Node> {
        let NodeBuilder {
            config,
            store,
            discovery,
        } = builder;
        let limits = Limits::from_config(&config).map_err(anyhow_config)?;
        let metrics = Arc::new(Metrics::new());
        let background = CancellationToken::new();
        let auth = Auth::new(&config, metrics.clone())?;
        if config.role != Role::Shard {
            if auth.enabled() {
                auth.start(background.clone());
            } else {
                tracing::warn!("PRESENCE_AUTH=none: any client may act for any user; set PRESENCE_AUTH=jwt outside development");
            }
        }
        let grpc_tls = GrpcTls::from_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        if grpc_tls.is_none() && config.role != Role::All {
            tracing::warn!("gRPC between nodes is plaintext and unauthenticated; set PRESENCE_GRPC_TLS_CERT, _KEY and _CA");
        }
        let clients = Clients::with_tls(
            Duration::from_millis(500),
            config.route_timeout,
            grpc_tls.clone(),
        );
        let mut hub = None;
        let mut watched_store = None;
        let (presence, shard, shard_parts): (Arc<dyn Presence>, _, _) = match config.role {
            Role::All => {
                let store = match store.clone() {
                    Some(s) => s,
                    None => build_store(&config, &metrics).await?,
                };
                watched_store = Some(store.clone());
                // It answered when it was built; the watch keeps this up to date.
                metrics.store.up.set(1);
                let shard = new_shard(&config, store, &metrics, Table::owning_all());
                let h = Hub::with_drain_concurrency(
                    metrics.clone(),
                    config.ws_queue as usize,
                    config.ws_drain_concurrency as usize,
                );
                shard.set_sink(h.clone());
                hub = Some(h);
                let all: Vec<u32> = (0..PARTITIONS).collect();
                let started = std::time::Instant::now();
                let n = shard
                    .recover(&all)
                    .await
                    .map_err(|e| anyhow::anyhow!("recovery failed: {e}"))?;
                if n > 0 {
                    tracing::info!(users = n, took = ?started.elapsed(), "recovered live users");
                }
                (shard.clone(), Some(shard), None)
            }
            Role::Shard => {
                let store = match store.clone() {
                    Some(s) => s,
                    None => build_store(&config, &metrics).await?,
                };
                watched_store = Some(store.clone());
                // It answered when it was built; the watch keeps this up to date.
                metrics.store.up.set(1);
                if store.kind() == "memory" {
                    tracing::warn!("a shard on the in-memory store loses its users on handoff; set PRESENCE_REDIS_URL");
                }
                let shard = new_shard(&config, store, &metrics, Table::new());
                let fanout = Fanout::new(metrics.clone(), config.event_queue as usize);
                let own = Handoff::new(
                    config.advertise_addr(),
                    config.grace(),
                    metrics.clone(),
                    shard.table().clone(),
                    fanout.clone(),
                    clients.clone(),
                );
                shard.set_sink(fanout.clone());
                let discovery = match discovery.clone() {
                    Some(d) => d,
                    None => build_discovery(&config, &clients).await?,
                };
                let grpc = TcpListener::bind(config.grpc_listen).await?;
                tracing::info!(addr = %grpc.local_addr()?, advertise = own.me(), discovery = discovery.kind(), "grpc listening");
                let parts = ShardParts {
                    own,
                    fanout,
                    grpc,
                    discovery,
                };
                (shard.clone(), Some(shard), Some(parts))
            }
            Role::Gateway => {
                let discovery = match discovery.clone() {
                    Some(d) => d,
                    None => build_discovery(&config, &clients).await?,
                };
                let members = watch_members(&discovery, &background);
                let ring = ring::follow(members, metrics.clone(), background.clone());
                let h = Hub::with_drain_concurrency(
                    metrics.clone(),
                    config.ws_queue as usize,
                    config.ws_drain_concurrency as usize,
                );
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                h.set_interest_sink(tx);
                let host = std::env::var("HOSTNAME").unwrap_or_default();
                let name = format!("{host}@{}", config.listen);
                let upstreams = Upstreams::new(name, h.clone(), clients.clone(), metrics.clone());
                tokio::spawn(upstreams.run(ring.clone(), rx, background.clone()));
                hub = Some(h);
                let router =
                    Router::new(ring, clients.clone(), config.route_timeout, metrics.clone())
                        .coalescing(
                            config.coalesce_window,
                            crate::peer::Coalesce {
                                heartbeats: config.coalesce_heartbeats,
                                onlines: config.coalesce_online,
                                reads: config.coalesce_status,
                            },
                        );
                (Arc::new(router), None, None)
            }
        };
        let leases = Leases::new(limits.ws_lease_interval);
        if let Some(h) = &hub {
            // Until the hub closes its sockets (a shutdown: each takes its device offline), or
            // the node stops.
            let rounds = leases.clone().run(
                presence.clone(),
                metrics.clone(),
                config.route_timeout,
                h.closing().clone(),
            );
            let stopped = background.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = rounds => {}
                    _ = stopped.cancelled() => {}
                }
            });
        }
        let state = AppState::new(AppInner {
            presence,
            hub,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            ready_needs_store: config.role == Role::All,
            limits: Arc::new(limits),
            auth,
            leases,
        });
        let listener = TcpListener::bind(config.listen).await?;
        tracing::info!(
            addr = %listener.local_addr()?,
            role = ?config.role,
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            "listening"
        );
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr).await?;
                tracing::info!(addr = %l.local_addr()?, "metrics listening");
                Some(l)
            }
            None => None,
        };
        Ok(Node {
            config,
            listener,
            state,
            shard,
            shard_parts,
            store: watched_store,
            background,
            grpc_tls,
            metrics_listener,
        })
    }

    /// The address of the HTTP listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The address of the gRPC listener of a shard.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.shard_parts
            .as_ref()
            .and_then(|p| p.grpc.local_addr().ok())
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.state.metrics
    }

    /// Serves until `shutdown` fires. Then: report not ready; stop accepting connections; every
    /// WebSocket is closed with 1001 (Going Away) and its device taken offline at once; a shard
    /// hands off every partition (and leaves Nacos); HTTP, gRPC and the sockets' offlines drain
    /// (up to the drain timeout); the timers stop and flush their writes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Node {
            config,
            listener,
            state,
            shard,
            shard_parts,
            store,
            background,
            grpc_tls,
            metrics_listener,
        } = self;
        let tracker = TaskTracker::new();
        let timers = CancellationToken::new();
        if let Some(shard) = &shard {
            tracker.spawn(shard.clone().run_timers(timers.clone()));
        }
        if let Some(store) = store {
            tracker.spawn(watch_store(
                store,
                state.metrics.clone(),
                config.health_interval,
                background.clone(),
            ));
        }
        let ready = state.ready.clone();
        let metrics = state.metrics.clone();
        let hub = state.hub.clone();
        let app = api::router(
            state.clone(),
            config.role != Role::Shard,
            metrics_listener.is_none(),
        );

        // Shard: the gRPC service, ownership following the ring, registration.
        let grpc_stop = CancellationToken::new();
        let mut grpc_task = None;
        // The shard's ownership, its discovery and the members it lists: for registering once
        // joinable, and for the drain.
        let mut own_for_drain = None;
        if let (Some(parts), Some(shard)) = (shard_parts, shard.clone()) {
            let ShardParts {
                own,
                fanout,
                grpc,
                discovery,
            } = parts;
            let service = ShardService {
                shard: shard.clone(),
                own: own.table().clone(),
                metrics: metrics.clone(),
                fanout,
                stop: grpc_stop.clone(),
            };
            let stop = grpc_stop.clone();
            // No Nagle: events and replies are small and must not wait for more bytes.
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
            let mut server = tonic::transport::Server::builder();
            if let Some(tls) = &grpc_tls {
                server = server
                    .tls_config(tls.server())
                    .map_err(|e| anyhow::anyhow!("gRPC TLS: {e}"))?;
            }
            grpc_task = Some(tokio::spawn(
                server
                    .add_service(PresenceShardServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
            ));
            let members = watch_members(&discovery, &background);
            let listed = members.clone();
            let ring = ring::follow(members, metrics.clone(), background.clone());
            tracker.spawn(own.clone().run(shard.clone(), ring, background.clone()));
            own_for_drain = Some((own, discovery, listed));
        }

        let timeouts = api::server::Timeouts {
            header: config.http_header_timeout,
            idle: config.http_idle_timeout,
            send_buffer: (config.send_buffer > 0).then_some(config.send_buffer as usize),
        };
        let server = tokio::spawn(api::server::serve(
            listener,
            app,
            timeouts,
            metrics.clone(),
            shutdown.clone(),
        ));
        if let Some(l) = metrics_listener {
            tokio::spawn(api::server::serve(
                l,
                api::metrics_router(state),
                timeouts,
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        // A shard that registers (Nacos) does so once it can take partitions (a grace at most);
        // its HTTP port serves meanwhile (`/livez`; `/readyz` 503), and a shutdown stops the wait.
        let mut registered = false;
        if let Some((own, discovery, listed)) = &own_for_drain {
            let joinable = async {
                if discovery.registers() {
                    let over = own.start_grace_over();
                    membership::until_joinable(&**discovery, listed, own.me(), over).await;
                }
            };
            let join = tokio::select! {
                _ = joinable => true,
                _ = shutdown.cancelled() => false,
            };
            if join {
                discovery
                    .register(own.me())
                    .await
                    .map_err(|e| anyhow::anyhow!("registering with {}: {e}", discovery.kind()))?;
                registered = true;
            }
        }
        if !shutdown.is_cancelled() {
            ready.store(true, Ordering::Relaxed);
            tracing::info!("ready");
        }
        shutdown.cancelled().await;
        tracing::info!("draining");
        ready.store(false, Ordering::Relaxed);
        if let Some(hub) = &hub {
            // Every socket gets its close frame now, and its device goes offline within the
            // drain (a little before its end, so the offlines are not cut off by it).
            let margin = (config.drain_timeout / 10).min(Duration::from_secs(1));
            hub.shutdown(tokio::time::Instant::now() + config.drain_timeout - margin);
            tracing::info!(sockets = hub.sockets(), "closing websockets");
        }

        if let (Some((own, discovery, _)), Some(shard)) = (own_for_drain, shard.as_ref()) {
            if registered {
                if let Err(e) = discovery.deregister(own.me()).await {
                    tracing::warn!(error = %e, "deregistering failed");
                }
            }
            own.drain(shard).await;
        }
        let drained = async {
            let sockets = async {
                if let Some(hub) = &hub {
                    hub.wait().await;
                }
            };
            let (_, _) = tokio::join!(server, sockets);
            grpc_stop.cancel();
            if let Some(t) = grpc_task {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(config.drain_timeout, drained)
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timed out");
        }
        background.cancel();
        timers.cancel();
        tracker.close();
        tracker.wait().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Checks the store every `every` (each check bounded by the store's own deadline) and publishes
/// whether it answers as `presence_store_up` (the Redis store also counts the masters that did
/// not). A shard's `Health` reports it; ring membership never depends on it, and readiness only
/// on an all-in-one node while the store as a whole does not answer: one stalled Redis master
/// fails its own users' requests (503) and nothing else.
async fn watch_store(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let up = tokio::select! {
            _ = cancel.cancelled() => return,
            r = store.ping() => r.is_ok(),
        };
        metrics.store.up.set(up as i64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
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
