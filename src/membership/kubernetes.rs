//! Membership from Kubernetes: the ready endpoints of the shards' headless Service.
//!
//! A `kube` reflector keeps a cache of the Service's `discovery.k8s.io/v1` EndpointSlices (label
//! `kubernetes.io/service-name=<service>`). After every change the member set is recomputed from
//! the whole cache, so several slices per Service, slices replaced during a relist and endpoints
//! moving between slices all come out right.
//!
//! An endpoint is a member when, following the API's documented defaults for missing values:
//! - `conditions.ready` is true or absent ("a nil value should be interpreted as true");
//! - `conditions.serving` is true or absent (also nil-as-true). This matters only when the
//!   Service sets `publishNotReadyAddresses`, where `ready` is forced to true and `serving` is
//!   the only field that still reflects the pod's readiness;
//! - `conditions.terminating` is not true (nil means false). A terminating shard is handing its
//!   users off: it must leave the ring even if it still answers.
//!
//! Its address is the endpoint's first address (the Kubernetes API guarantees they are
//! fungible), with IPv6 addresses in brackets (`[fd00::1]:9004`). The port is given by
//! [`PortSpec`]: a number as is, or a name looked up in each slice's ports.
//!
//! Watch errors (API server restarts, expired resource versions, RBAC not yet applied) are
//! retried with the watcher's default backoff, and the last known members stay published
//! meanwhile: an unreachable API server does not empty the ring.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{members, publish, Discovery, Members};
use crate::error::Error;

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long to wait before watching again if the watch stream ever ends (it should not: the
/// watcher retries internally).
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Which port of the endpoints is the shards' gRPC port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// The EndpointSlice port with this name (the Service port's name, e.g. `grpc`).
    Name(String),
    /// This port number, whatever the slice lists.
    Number(u16),
}

impl FromStr for PortSpec {
    type Err = Error;

    /// `"9004"` is a number, anything else a port name. Empty strings and port 0 are refused.
    fn from_str(s: &str) -> Result<PortSpec, Error> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::BadRequest("kubernetes port: empty port name".into()));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u16>() {
                Ok(0) | Err(_) => Err(Error::BadRequest(format!(
                    "kubernetes port: {s} is not a port number"
                ))),
                Ok(n) => Ok(PortSpec::Number(n)),
            };
        }
        Ok(PortSpec::Name(s.to_owned()))
    }
}

impl From<u16> for PortSpec {
    fn from(n: u16) -> PortSpec {
        PortSpec::Number(n)
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Name(n) => f.write_str(n),
            PortSpec::Number(n) => write!(f, "{n}"),
        }
    }
}

/// Members are the ready, non-terminating endpoints of one Service's EndpointSlices.
pub struct KubernetesDiscovery {
    client: Client,
    namespace: String,
    service: String,
    port: PortSpec,
}

impl KubernetesDiscovery {
    /// Connects with the ambient configuration: in-cluster (service account) or `KUBECONFIG` /
    /// `~/.kube/config`. An empty `namespace` means the client's default namespace (in a pod,
    /// the pod's own namespace).
    pub async fn new(
        namespace: String,
        service: String,
        port: PortSpec,
    ) -> Result<KubernetesDiscovery, Error> {
        if service.trim().is_empty() {
            return Err(Error::BadRequest(
                "kubernetes discovery: empty service name".into(),
            ));
        }
        let client = Client::try_default().await.map_err(|e| {
            Error::Internal(format!(
                "kubernetes discovery: cannot build a client from the in-cluster config or \
                 kubeconfig: {e}"
            ))
        })?;
        Ok(KubernetesDiscovery::with_client(
            client, namespace, service, port,
        ))
    }

    /// With a given client (tests point one at a fake API server). An empty `namespace` means
    /// the client's default namespace.
    pub fn with_client(
        client: Client,
        namespace: String,
        service: String,
        port: PortSpec,
    ) -> KubernetesDiscovery {
        let namespace = if namespace.is_empty() {
            client.default_namespace().to_owned()
        } else {
            namespace
        };
        KubernetesDiscovery {
            client,
            namespace,
            service,
            port,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn port(&self) -> &PortSpec {
        &self.port
    }

    /// The label selector of the Service's slices.
    pub fn label_selector(&self) -> String {
        format!("{SERVICE_NAME_LABEL}={}", self.service)
    }

    /// The member set of everything in the cache.
    fn current(&self, store: &Store<EndpointSlice>) -> Members {
        members(
            store
                .state()
                .iter()
                .flat_map(|s| slice_members(s, &self.port)),
        )
    }

    /// Watches until the stream ends (never, in practice) or `cancel` fires. Returns whether
    /// it was cancelled.
    async fn watch_once(&self, tx: &watch::Sender<Members>, cancel: &CancellationToken) -> bool {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default().labels(&self.label_selector());
        let (store, writer) = reflector::store();
        let stream = kube::runtime::reflector(writer, watcher(api, config).default_backoff());
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return true,
                event = stream.next() => event,
            };
            match event {
                None => return false,
                Some(Err(e)) => {
                    tracing::warn!(
                        namespace = %self.namespace,
                        service = %self.service,
                        error = %e,
                        "endpointslice watch failed, retrying with backoff; keeping the last members"
                    );
                }
                Some(Ok(event)) => {
                    match &event {
                        // The store swaps in a full list at once on `InitDone`; `Init` and
                        // `InitApply` only fill its buffer and change nothing visible.
                        watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                        watcher::Event::InitDone => {
                            tracing::debug!(
                                namespace = %self.namespace,
                                service = %self.service,
                                slices = store.state().len(),
                                "endpointslices listed"
                            );
                        }
                        watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                            tracing::debug!(
                                slice = s.metadata.name.as_deref().unwrap_or_default(),
                                deleted = matches!(event, watcher::Event::Delete(_)),
                                "endpointslice changed"
                            );
                        }
                    }
                    let next = self.current(&store);
                    if publish(tx, next.clone()) {
                        tracing::info!(
                            namespace = %self.namespace,
                            service = %self.service,
                            count = next.len(),
                            members = ?next,
                            "kubernetes members changed"
                        );
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Discovery for KubernetesDiscovery {
    async fn run(self: Arc<Self>, tx: watch::Sender<Members>, cancel: CancellationToken) {
        tracing::info!(
            namespace = %self.namespace,
            service = %self.service,
            port = %self.port,
            selector = %self.label_selector(),
            "kubernetes discovery started"
        );
        loop {
            if self.watch_once(&tx, &cancel).await {
                break;
            }
            tracing::warn!(
                namespace = %self.namespace,
                service = %self.service,
                "endpointslice watch ended, starting again"
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(RESTART_DELAY) => {}
            }
        }
        tracing::info!(service = %self.service, "kubernetes discovery stopped");
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }
}

/// Whether an endpoint with these conditions is a member: ready (nil = true), serving
/// (nil = true) and not terminating (nil = false).
pub fn is_member(conditions: Option<&EndpointConditions>) -> bool {
    let Some(c) = conditions else { return true };
    c.ready.unwrap_or(true) && c.serving.unwrap_or(true) && !c.terminating.unwrap_or(false)
}

/// The port of `slice`'s endpoints for `spec`, if the slice has it.
pub fn resolve_port(slice: &EndpointSlice, spec: &PortSpec) -> Option<u16> {
    match spec {
        PortSpec::Number(n) => Some(*n),
        PortSpec::Name(name) => slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// The members of one slice: `address:port` of its ready, non-terminating endpoints.
pub fn slice_members(slice: &EndpointSlice, spec: &PortSpec) -> Vec<String> {
    let Some(port) = resolve_port(slice, spec) else {
        if !slice.endpoints.is_empty() {
            tracing::warn!(
                slice = slice.metadata.name.as_deref().unwrap_or_default(),
                port = %spec,
                "endpointslice has no port with this name; skipping its endpoints"
            );
        }
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| is_member(e.conditions.as_ref()))
        .filter_map(|e| e.addresses.first())
        .filter(|a| !a.is_empty())
        .map(|a| host_port(a, port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};

    fn endpoint(
        addr: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        term: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating: term,
            }),
            ..Default::default()
        }
    }

    fn slice(endpoints: Vec<Endpoint>, ports: &[(&str, i32)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some((*n).to_owned()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn port_spec_parses_numbers_and_names() {
        assert_eq!("9004".parse::<PortSpec>().unwrap(), PortSpec::Number(9004));
        assert_eq!(
            "grpc".parse::<PortSpec>().unwrap(),
            PortSpec::Name("grpc".into())
        );
        assert!("".parse::<PortSpec>().is_err());
        assert!("0".parse::<PortSpec>().is_err());
        assert!("70000".parse::<PortSpec>().is_err());
        assert_eq!(PortSpec::Number(9004).to_string(), "9004");
    }

    #[test]
    fn conditions_follow_the_api_defaults() {
        assert!(is_member(None));
        assert!(is_member(Some(&EndpointConditions::default())));
        assert!(is_member(Some(&EndpointConditions {
            ready: Some(true),
            ..Default::default()
        })));
        assert!(!is_member(Some(&EndpointConditions {
            ready: Some(false),
            ..Default::default()
        })));
        // publishNotReadyAddresses: ready is forced true, serving tells the truth.
        let not_serving = EndpointConditions {
            ready: Some(true),
            serving: Some(false),
            terminating: None,
        };
        assert!(!is_member(Some(&not_serving)));
        let terminating = EndpointConditions {
            ready: Some(true),
            serving: Some(true),
            terminating: Some(true),
        };
        assert!(!is_member(Some(&terminating)));
    }

    #[test]
    fn slice_members_use_the_named_port_and_bracket_ipv6() {
        let s = slice(
            vec![
                endpoint("10.0.0.1", Some(true), Some(true), Some(false)),
                endpoint("10.0.0.2", Some(false), Some(true), None),
                endpoint("10.0.0.3", Some(false), Some(true), Some(true)),
                endpoint("fd00::1", None, None, None),
            ],
            &[("metrics", 9090), ("grpc", 9004)],
        );
        let got = slice_members(&s, &PortSpec::Name("grpc".into()));
        assert_eq!(got, ["10.0.0.1:9004", "[fd00::1]:9004"]);
        assert_eq!(
            slice_members(&s, &PortSpec::Number(7000))[0],
            "10.0.0.1:7000"
        );
        assert!(slice_members(&s, &PortSpec::Name("http".into())).is_empty());
    }

    #[test]
    fn first_address_only() {
        let mut e = endpoint("10.0.0.1", None, None, None);
        e.addresses.push("10.0.0.9".into());
        let s = slice(vec![e, Endpoint::default()], &[("grpc", 9004)]);
        assert_eq!(
            slice_members(&s, &PortSpec::Name("grpc".into())),
            ["10.0.0.1:9004"]
        );
    }
}
