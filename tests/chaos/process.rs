//! Chaos scenarios: process faults. `kill -9` and SIGSTOP/SIGCONT (4 s) of a shard, a gateway, a
//! Redis master and a Redis replica, each under load (see [`crate::Chaos`]), each checked by the
//! history checker. Scenarios that stop Redis nodes run on a Redis Cluster of their own
//! ([`OwnRedis`]), so a stopped master disturbs no other test.

use std::time::Duration;

use crate::common::cluster::{Cluster, Proc};
use crate::common::redis_cluster::{slot_of, OwnRedis};
use crate::common::redis_url;
use crate::common::scenario::Step;
use crate::{signal, Chaos, Paused, RingWatch, USERS};

/// How long a stopped process stays stopped.
const STALL: Duration = Duration::from_secs(4);

/// What happens to a process: `kill -9`, or SIGSTOP for [`STALL`] then SIGCONT.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hit {
    Kill,
    Stop,
}

crate::scenarios! {
    shard_kill_9 => node_fault(Proc::Shard(1), Hit::Kill, USERS),
    shard_sigstop_4s => node_fault(Proc::Shard(1), Hit::Stop, USERS),
    gateway_kill_9 => node_fault(Proc::Gateway(1), Hit::Kill, USERS),
    // Fewer users: the load's heartbeats to the stopped gateway wait (256 in flight at most).
    gateway_sigstop_4s => node_fault(Proc::Gateway(1), Hit::Stop, 100),
    redis_master_sigstop_4s => redis_fault(7800, true, Hit::Stop),
    redis_master_kill_9 => redis_fault(7810, true, Hit::Kill),
    redis_replica_sigstop_4s => redis_fault(7820, false, Hit::Stop),
    redis_replica_kill_9 => redis_fault(7830, false, Hit::Kill),
}

/// `hit` on process `pid` under the load; after a kill, [`STALL`] passes too.
async fn hit_process(c: &mut Chaos, pid: u32, hit: Hit) {
    let paused = match hit {
        Hit::Kill => {
            signal(pid, "KILL");
            None
        }
        Hit::Stop => Some(Paused::stop(pid)),
    };
    c.run(vec![Step::Sleep(STALL)]).await;
    if let Some(p) = paused {
        p.resume();
    }
}

/// Scenario `name`: `hit` on node `p` of the cluster. A killed shard restarts; a killed gateway
/// stays down (its writes are the touched ones).
async fn node_fault(name: &'static str, p: Proc, hit: Hit, users: usize) {
    let mut c = Chaos::start(name, Cluster::processes(3, 2), &redis_url(), users).await;
    c.until_fault().await;
    match (p, hit) {
        (Proc::Shard(i), Hit::Kill) => {
            c.run(vec![Step::KillShard(i)]).await;
            c.after_heal(true).await;
            let back = Duration::from_secs(1);
            c.run(vec![
                Step::RestartShard(i),
                Step::WaitSettled,
                Step::Sleep(back),
            ])
            .await;
        }
        (Proc::Gateway(k), Hit::Kill) => {
            // Through the cluster, so that it stops reading the dead gateway's metrics.
            c.s.cluster.kill_gateway(k);
            c.h.gateway_down(k);
            c.run(vec![Step::Sleep(STALL)]).await;
            c.after_heal(false).await;
        }
        _ => {
            let pid = c.s.cluster.pid(p).expect("a running child");
            hit_process(&mut c, pid, hit).await;
            c.after_heal(matches!(p, Proc::Shard(_))).await;
        }
    }
    let touched = match p {
        Proc::Shard(i) => c.writers_on_shard(i),
        Proc::Gateway(_) => Vec::new(),
    };
    c.finish(move |u, gateway| touched.contains(&u) || Proc::Gateway(gateway) == p)
        .await;
}

/// The pid of Redis node `port` of the cluster in `dir`.
fn redis_pid(dir: &str, port: u16) -> u32 {
    let f = format!("{dir}/{port}/redis.pid");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{f}: {e}"))
        .trim()
        .parse()
        .expect("a pid")
}

/// A replica's port (from `CLUSTER NODES`).
fn a_replica(r: &OwnRedis) -> u16 {
    let text = r.cli(r.port, &["CLUSTER", "NODES"]);
    text.lines()
        .find(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|f| f.contains("slave"))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split('@').next()?.rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no replica in {text}"))
}

/// Scenario `name`: `hit` on the second master (`master`) or a replica of a Redis Cluster of
/// its own on `base..base+5`. `presence_ring_members` is read on every node all along: a
/// stalled master must not change it.
async fn redis_fault(name: &'static str, base: u16, master: bool, hit: Hit) {
    redis_url(); // like every Redis test: only with `bash scripts/test.sh`
    let dir = format!("{}/.tmp/chaos-{name}", env!("CARGO_MANIFEST_DIR"));
    let r = OwnRedis::start(base, &dir);
    let masters = r.masters();
    assert_eq!(masters.len(), 3, "3 masters: {masters:?}");
    let port = if master {
        masters[1].port
    } else {
        a_replica(&r)
    };
    let on_master = masters[1].clone();
    let mut c = Chaos::start(name, Cluster::processes(3, 2), &r.urls, USERS).await;
    c.until_fault().await;
    let ring = RingWatch::start(&c, 3.0);
    hit_process(&mut c, redis_pid(&dir, port), hit).await;
    c.after_heal(false).await;
    let (reads, wrong) = ring.finish().await;
    println!(
        "{name}: presence_ring_members read {reads} times, {} not 3: {wrong:?}",
        wrong.len()
    );
    // Users on the master hit may see errors (503) until it returns or fails over.
    c.finish(move |u, _| master && on_master.serves(slot_of(u)))
        .await;
    if master && hit == Hit::Stop {
        assert!(
            wrong.is_empty(),
            "{name}: presence_ring_members changed during the stall"
        );
    }
    drop(r);
}
