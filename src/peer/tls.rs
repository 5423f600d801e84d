//! mTLS between nodes: the PEM files of `PRESENCE_GRPC_TLS_*` as tonic's server and client
//! configurations. Only peers with a certificate from the cluster's CA can talk to each other.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{Config, ConfigError};

/// The node's identity and the CA its peers must have certificates from.
#[derive(Clone)]
pub struct GrpcTls {
    identity: Identity,
    ca: Certificate,
    /// The name a peer's certificate must carry (a DNS subject alternative name).
    server_name: String,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(variable: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        variable: variable.into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError {
            variable: variable.into(),
            message: format!("{} is not PEM", path.display()),
        });
    }
    Ok(bytes)
}

impl GrpcTls {
    /// The configured mTLS, or `None` when `PRESENCE_GRPC_TLS_CERT`, `_KEY` and `_CA` are all
    /// unset. Some but not all of them set, or a file that cannot be read, is an error naming
    /// the variable.
    pub fn from_config(c: &Config) -> Result<Option<GrpcTls>, ConfigError> {
        let (cert, key, ca) = match (&c.grpc_tls_cert, &c.grpc_tls_key, &c.grpc_tls_ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => (cert, key, ca),
            (cert, key, _) => {
                let missing = if cert.is_none() {
                    "PRESENCE_GRPC_TLS_CERT"
                } else if key.is_none() {
                    "PRESENCE_GRPC_TLS_KEY"
                } else {
                    "PRESENCE_GRPC_TLS_CA"
                };
                return Err(ConfigError {
                    variable: missing.into(),
                    message: "PRESENCE_GRPC_TLS_CERT, PRESENCE_GRPC_TLS_KEY and PRESENCE_GRPC_TLS_CA go together".into(),
                });
            }
        };
        let cert = read("PRESENCE_GRPC_TLS_CERT", cert)?;
        let key = read("PRESENCE_GRPC_TLS_KEY", key)?;
        let ca = read("PRESENCE_GRPC_TLS_CA", ca)?;
        let tls = GrpcTls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            server_name: c.grpc_tls_server_name.clone(),
        };
        // Build both sides once now, so that a bad key or CA stops the start, naming it.
        tonic::transport::Server::builder()
            .tls_config(tls.server())
            .map_err(|e| ConfigError {
                variable: "PRESENCE_GRPC_TLS_KEY".into(),
                message: format!("the certificate and key do not make a TLS identity: {e}"),
            })?;
        tonic::transport::Endpoint::from_static("https://presence.invalid")
            .tls_config(tls.client())
            .map_err(|e| ConfigError {
                variable: "PRESENCE_GRPC_TLS_CA".into(),
                message: format!("not a usable CA: {e}"),
            })?;
        Ok(Some(tls))
    }

    /// The server side: our certificate, and a client certificate from the CA required.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(false)
    }

    /// The client side: our certificate, and the peer's checked against the CA and the name.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .identity(self.identity.clone())
            .ca_certificate(self.ca.clone())
            .domain_name(self.server_name.clone())
    }
}
