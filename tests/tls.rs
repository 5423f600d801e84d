//! mTLS between nodes (`PRESENCE_GRPC_TLS_*`), on in-process nodes with the memory store: a
//! gateway reaches its shard over mTLS; a client without a certificate from the cluster's CA
//! (plaintext, TLS without a certificate, a certificate from another CA) cannot call the shard.
//! Certificates are fixed test files in `tests/fixtures/tls/` (`gen.sh` makes them).

mod common;

use std::time::Duration;

use common::{uid, Cluster};
use presence_service::config::Config;
use presence_service::proto::v1::presence_shard_client::PresenceShardClient;
use presence_service::proto::v1::HealthRequest;
use serde_json::json;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use common::tls_fixture as fixture;

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("a fixture")
}

fn tls_vars() -> Vec<(String, String)> {
    [
        ("PRESENCE_GRPC_TLS_CERT", "node.pem"),
        ("PRESENCE_GRPC_TLS_KEY", "node.key"),
        ("PRESENCE_GRPC_TLS_CA", "ca.pem"),
    ]
    .iter()
    .map(|(k, f)| (k.to_string(), fixture(f).display().to_string()))
    .collect()
}

/// Calls `Health` on the shard at `addr` with `tls` (or plaintext): whether it answered.
async fn health(addr: &str, tls: Option<ClientTlsConfig>) -> Result<bool, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = PresenceShardClient::new(channel);
    client
        .health(HealthRequest {})
        .await
        .map(|r| r.into_inner().serving)
        .map_err(|s| format!("call: {s:?}"))
}

fn client_tls(cert: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem("ca.pem")))
        .domain_name("presence");
    if let Some((cert, key)) = cert {
        c = c.identity(Identity::from_pem(pem(cert), pem(key)));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_with_a_certificate_from_the_ca_can_call_a_shard() {
    let vars = tls_vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let c = common::blocking(|| Cluster::in_process(1, 1).vars(&vars).start());
    // The gateway reaches the shard over mTLS: the API works end to end.
    let user = uid();
    let (code, v) = c
        .post(
            0,
            "/api/v1/presence/online",
            json!({"userId": user, "deviceId": "d", "platform": "WEB"}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = c.get(0, &format!("/api/v1/presence/status/{user}")).await;
    assert_eq!(
        (code, v["data"]["status"].as_str()),
        (200, Some("ONLINE")),
        "{v}"
    );

    let shard = c.shard_grpc(0);
    // A node's certificate from the CA: served.
    assert_eq!(
        health(&shard, Some(client_tls(Some(("node.pem", "node.key"))))).await,
        Ok(true)
    );
    // Plaintext: refused.
    let plain = health(&shard, None).await;
    assert!(plain.is_err(), "plaintext answered: {plain:?}");
    // TLS without a client certificate: refused.
    let anonymous = health(&shard, Some(client_tls(None))).await;
    assert!(
        anonymous.is_err(),
        "no client certificate answered: {anonymous:?}"
    );
    // A certificate from another CA: refused.
    let rogue = health(&shard, Some(client_tls(Some(("rogue.pem", "rogue.key"))))).await;
    assert!(rogue.is_err(), "a rogue certificate answered: {rogue:?}");
    // A client that trusts only the rogue CA does not accept the shard either.
    let wrong_ca = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem("rogue-ca.pem")))
        .identity(Identity::from_pem(pem("node.pem"), pem("node.key")))
        .domain_name("presence");
    let r = health(&shard, Some(wrong_ca)).await;
    assert!(
        r.is_err(),
        "a shard with a certificate of another CA was trusted: {r:?}"
    );
}

#[test]
fn tls_settings_go_together_and_name_the_missing_one() {
    let cert = fixture("node.pem").display().to_string();
    let key = fixture("node.key").display().to_string();
    let e = Config::from_vars(&[("PRESENCE_GRPC_TLS_CERT", cert.as_str())]).unwrap_err();
    assert_eq!(e.variable, "PRESENCE_GRPC_TLS_KEY", "{e}");
    let e = Config::from_vars(&[
        ("PRESENCE_GRPC_TLS_CERT", cert.as_str()),
        ("PRESENCE_GRPC_TLS_KEY", key.as_str()),
        ("PRESENCE_GRPC_TLS_CA", "/nonexistent/ca.pem"),
    ])
    .unwrap_err();
    assert_eq!(e.variable, "PRESENCE_GRPC_TLS_CA", "{e}");
    let ok = Config::from_vars(&[
        ("PRESENCE_GRPC_TLS_CERT", cert.as_str()),
        ("PRESENCE_GRPC_TLS_KEY", key.as_str()),
        (
            "PRESENCE_GRPC_TLS_CA",
            &fixture("ca.pem").display().to_string(),
        ),
    ]);
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));
}
