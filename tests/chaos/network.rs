//! Chaos scenarios: network faults between gateway and shard. Every shard's gRPC is reached
//! through a TCP fault proxy of its own ([`Proxy`]): it advertises the proxy's address, and
//! `PRESENCE_SHARDS` lists the proxies, so gateways (and the other shards) talk to it only
//! through the proxy. Each scenario injects one fault on shard 1's proxy for a few seconds under
//! load, heals it, and runs the history checker.

use std::sync::Arc;
use std::time::Duration;

use crate::common::cluster::Cluster;
use crate::common::proxy::{Fault, Proxy};
use crate::common::redis_url;
use crate::common::scenario::Step;
use crate::{Chaos, USERS};

/// How long each fault lasts.
const FAULT: Duration = Duration::from_secs(4);

crate::scenarios! {
    proxy_latency_300ms => proxy_fault(Fault::Latency(Duration::from_millis(300))),
    proxy_blackhole_4s => proxy_fault(Fault::Blackhole),
    proxy_reset_4s => proxy_fault(Fault::Reset),
    proxy_stall_replies_4s => proxy_fault(Fault::StallReplies),
    proxy_stall_requests_4s => proxy_fault(Fault::StallRequests),
}

/// Scenario `name`: `fault` on shard 1's proxy for [`FAULT`], then healed.
async fn proxy_fault(name: &'static str, fault: Fault) {
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Proxy::bind().await);
    }
    let proxies = Arc::new(proxies);
    let fronts = proxies.iter().map(|p| p.addr.clone()).collect();
    let to = proxies.clone();
    let spec = Cluster::processes(3, 2).fronted(fronts, move |i, addr| {
        to[i].forward_to(addr.to_owned());
    });
    let mut c = Chaos::start(name, spec, &redis_url(), USERS).await;
    c.until_fault().await;
    proxies[1].set(fault);
    c.run(vec![Step::Sleep(FAULT)]).await;
    proxies[1].heal();
    c.after_heal(true).await;
    let accepted = proxies[1].accepted();
    println!("{name}: shard 1's proxy accepted {accepted} connections");
    let touched = c.writers_on_shard(1);
    c.finish(move |u, _| touched.contains(&u)).await;
}
