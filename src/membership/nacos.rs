//! Membership from Nacos: every shard registers an ephemeral instance of one service
//! (`presence-shard` by default); every node subscribes to that service.
//!
//! - Registration goes over the SDK's gRPC connection. The instance is ephemeral: it lives as
//!   long as that connection, so a shard that dies (even with `kill -9`) leaves as soon as the
//!   server sees the connection close. The SDK re-registers on reconnect.
//! - [`NacosDiscovery::run`] subscribes to the service. A push only wakes the loop: the loop then
//!   lists the service from the server and publishes that. The SDK delivers pushes on spawned
//!   tasks, so two quick pushes may arrive out of order; a fresh list cannot be stale that way.
//!   The loop also lists every `resync` interval (5 s by default), in case a push is lost.
//! - Members are healthy and enabled instances, as `ip:port` (`[ip]:port` for IPv6), the same
//!   form shards advertise.
//! - The SDK's "push empty protection" is off: when Nacos says there is no shard, that is what
//!   the ring gets (a warning is logged).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{members, publish, Discovery, Members};
use crate::error::Error;

/// How often [`NacosDiscovery::run`] lists the service even without a push.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(5);

/// Bound for building the client (the first connection to the server).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound for one request (register, deregister, list).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Shards register in Nacos; every node subscribes to the shards' service.
pub struct NacosDiscovery {
    naming: NamingService,
    server_addr: String,
    namespace: String,
    group: Option<String>,
    service: String,
    resync: Duration,
    /// Set once `run` published its first list of members.
    listed: watch::Sender<bool>,
}

impl NacosDiscovery {
    /// Connects to the Nacos server(s) at `server_addr` (`host:port[,host:port...]`, the HTTP
    /// port; gRPC is on HTTP + 1000). `namespace` "" is the public namespace; `group` ""
    /// is `DEFAULT_GROUP`. Fails when no server answers.
    pub async fn new(
        server_addr: String,
        namespace: String,
        group: String,
        service: String,
    ) -> Result<NacosDiscovery, Error> {
        if server_addr.trim().is_empty() {
            return Err(Error::Internal("nacos: server address is empty".into()));
        }
        if service.trim().is_empty() {
            return Err(Error::Internal("nacos: service name is empty".into()));
        }
        let props = ClientProps::new()
            .server_addr(server_addr.clone())
            .namespace(namespace.clone())
            .app_name("presence-service")
            // Our configuration is the one that counts, not NACOS_CLIENT_* variables.
            .env_first(false)
            // An empty push is the truth (every shard is gone); do not keep stale members.
            .naming_push_empty_protection(false)
            .naming_load_cache_at_start(false)
            .cache_dir(std::env::temp_dir().join("presence-service-nacos-cache"));
        let naming =
            tokio::time::timeout(CONNECT_TIMEOUT, NamingServiceBuilder::new(props).build())
                .await
                .map_err(|_| {
                    Error::Internal(format!(
                        "nacos: connecting to {server_addr} timed out after {CONNECT_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| {
                    Error::Internal(format!("nacos: cannot connect to {server_addr}: {e}"))
                })?;
        tracing::info!(
            server = %server_addr,
            namespace = %namespace,
            group = %group,
            service = %service,
            "nacos client connected"
        );
        Ok(NacosDiscovery {
            naming,
            server_addr,
            namespace,
            group: (!group.trim().is_empty()).then_some(group),
            service,
            resync: DEFAULT_RESYNC,
            listed: watch::channel(false).0,
        })
    }

    /// Sets how often `run` lists the service even without a push (default 5 s).
    pub fn with_resync(mut self, every: Duration) -> NacosDiscovery {
        self.resync = every.max(Duration::from_millis(100));
        self
    }

    /// The instance Nacos stores for `advertise`.
    fn instance(&self, advertise: &str) -> Result<ServiceInstance, Error> {
        let (ip, port) = split_advertise(advertise)?;
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("app".to_owned(), "presence-service".to_owned());
        metadata.insert("advertise".to_owned(), advertise.to_owned());
        Ok(ServiceInstance {
            ip,
            port: i32::from(port),
            weight: 1.0,
            healthy: true,
            enabled: true,
            ephemeral: true,
            service_name: Some(self.service.clone()),
            metadata,
            ..ServiceInstance::default()
        })
    }

    /// The healthy, enabled instances of the service, straight from the server.
    async fn list(&self) -> Result<Members, Error> {
        let all = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.naming.get_all_instances(
                self.service.clone(),
                self.group.clone(),
                Vec::new(),
                false,
            ),
        )
        .await
        .map_err(|_| Error::Internal(format!("nacos: listing {} timed out", self.service)))?
        .map_err(|e| Error::Internal(format!("nacos: listing {} failed: {e}", self.service)))?;
        Ok(members_of(&all))
    }
}

/// Splits `host:port` (IPv6 as `[addr]:port`) into the host (without brackets) and the port.
pub fn split_advertise(advertise: &str) -> Result<(String, u16), Error> {
    let bad =
        |why: &str| Error::Internal(format!("nacos: bad advertise address {advertise:?}: {why}"));
    let (host, port) = advertise
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .ok_or_else(|| bad("unbalanced brackets"))?
    } else {
        if host.contains(':') {
            return Err(bad("an IPv6 address must be in brackets, as [addr]:port"));
        }
        host
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number in 1..65535"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok((host.to_owned(), port))
}

/// `ip:port`, with brackets around an IPv6 address: the form shards advertise.
pub fn join_host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The members among `instances`: healthy and enabled ones, as `ip:port`.
pub fn members_of(instances: &[ServiceInstance]) -> Members {
    members(
        instances
            .iter()
            .filter(|i| i.healthy && i.enabled && !i.ip.is_empty() && i.port > 0)
            .map(|i| join_host_port(&i.ip, i.port)),
    )
}

/// Wakes the run loop on every push for the service.
struct Wake(Arc<Notify>);

impl NamingEventListener for Wake {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        tracing::debug!(
            service = %event.service_name,
            group = %event.group_name,
            instances = event.instances.as_ref().map_or(0, Vec::len),
            "nacos push"
        );
        self.0.notify_one();
    }
}

#[async_trait]
impl Discovery for NacosDiscovery {
    async fn run(self: Arc<Self>, tx: watch::Sender<Members>, cancel: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener: Arc<dyn NamingEventListener> = Arc::new(Wake(wake.clone()));
        // The SDK keeps retrying the subscription in the background if this attempt fails.
        if let Err(e) = self
            .naming
            .subscribe(
                self.service.clone(),
                self.group.clone(),
                Vec::new(),
                listener.clone(),
            )
            .await
        {
            tracing::warn!(
                service = %self.service,
                error = %e,
                "nacos subscribe failed; relying on periodic lists"
            );
        }
        tracing::info!(
            server = %self.server_addr,
            namespace = %self.namespace,
            group = self.group.as_deref().unwrap_or("DEFAULT_GROUP"),
            service = %self.service,
            resync_ms = self.resync.as_millis() as u64,
            "nacos discovery running"
        );

        let mut synced = false;
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.list().await {
                Ok(next) => {
                    backoff = Duration::from_millis(250);
                    let before = tx.borrow().clone();
                    let changed = publish(&tx, next.clone());
                    if changed || !synced {
                        if next.is_empty() && !before.is_empty() {
                            tracing::warn!(
                                service = %self.service,
                                "nacos reports no shard at all"
                            );
                        }
                        tracing::info!(
                            service = %self.service,
                            members = next.len(),
                            list = ?next,
                            "nacos members changed"
                        );
                    }
                    synced = true;
                    self.listed.send_replace(true);
                }
                Err(e) => {
                    tracing::warn!(
                        service = %self.service,
                        error = %e,
                        "nacos list failed; keeping the current members"
                    );
                }
            }
            // Until the first good list, retry quickly (bounded); then every `resync`.
            let wait = if synced {
                self.resync
            } else {
                let w = backoff;
                backoff = (backoff * 2).min(self.resync);
                w
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }

        let unsubscribe = self.naming.unsubscribe(
            self.service.clone(),
            self.group.clone(),
            Vec::new(),
            listener,
        );
        match tokio::time::timeout(REQUEST_TIMEOUT, unsubscribe).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(service = %self.service, error = %e, "nacos unsubscribe failed")
            }
            Err(_) => tracing::debug!(service = %self.service, "nacos unsubscribe timed out"),
        }
        tracing::info!(service = %self.service, "nacos discovery stopped");
    }

    async fn register(&self, advertise: &str) -> Result<(), Error> {
        let instance = self.instance(advertise)?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.naming
                .register_instance(self.service.clone(), self.group.clone(), instance),
        )
        .await
        .map_err(|_| Error::Internal(format!("nacos: registering {advertise} timed out")))?
        .map_err(|e| {
            Error::Internal(format!(
                "nacos: registering {advertise} in {} failed: {e}",
                self.service
            ))
        })?;
        tracing::info!(
            service = %self.service,
            advertise = %advertise,
            "nacos instance registered"
        );
        Ok(())
    }

    async fn deregister(&self, advertise: &str) -> Result<(), Error> {
        let instance = self.instance(advertise)?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.naming
                .deregister_instance(self.service.clone(), self.group.clone(), instance),
        )
        .await
        .map_err(|_| Error::Internal(format!("nacos: deregistering {advertise} timed out")))?
        .map_err(|e| {
            Error::Internal(format!(
                "nacos: deregistering {advertise} from {} failed: {e}",
                self.service
            ))
        })?;
        tracing::info!(
            service = %self.service,
            advertise = %advertise,
            "nacos instance deregistered"
        );
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "nacos"
    }

    fn registers(&self) -> bool {
        true
    }

    async fn first_list(&self) {
        let _ = self.listed.subscribe().wait_for(|&listed| listed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_addresses_split_and_join_back() {
        for a in [
            "10.0.0.7:9004",
            "shard-0.presence:9004",
            "[::1]:9004",
            "[fd00::5]:1",
        ] {
            let (host, port) = split_advertise(a).unwrap();
            assert_eq!(join_host_port(&host, i32::from(port)), a);
        }
        assert_eq!(
            split_advertise("[::1]:9004").unwrap(),
            ("::1".to_owned(), 9004)
        );
        for bad in [
            "",
            "host",
            "host:",
            ":9004",
            "host:0",
            "host:70000",
            "::1:9004",
            "[::1:9004",
            "[]:1",
        ] {
            assert!(split_advertise(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn members_are_healthy_enabled_instances_sorted() {
        let i = |ip: &str, port: i32, healthy: bool, enabled: bool| ServiceInstance {
            ip: ip.into(),
            port,
            healthy,
            enabled,
            ..ServiceInstance::default()
        };
        let m = members_of(&[
            i("10.0.0.2", 9004, true, true),
            i("10.0.0.1", 9004, true, true),
            i("10.0.0.1", 9004, true, true),
            i("fd00::1", 9004, true, true),
            i("10.0.0.3", 9004, false, true),
            i("10.0.0.4", 9004, true, false),
            i("", 9004, true, true),
        ]);
        assert_eq!(
            m.as_slice(),
            ["10.0.0.1:9004", "10.0.0.2:9004", "[fd00::1]:9004"]
        );
    }
}
