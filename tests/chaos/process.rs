//! Chaos scenarios: process faults. `kill -9` (and a quick restart) and SIGSTOP/SIGCONT (4 s) of a shard, a gateway, a
//! Redis master and a Redis replica, and a shard stopped for longer than the route timeout (alone, and while a fourth shard joins), each
//! under load (see [`crate::Chaos`]), each checked by the history checker. Scenarios that stop Redis nodes run on a Redis Cluster of their own
//! ([`OwnRedis`]), so a stopped master disturbs no other test.

use std::time::Duration;

use crate::common::cluster::{Cluster, Proc};
use crate::common::history::Figures;
use crate::common::redis_cluster::{slot_of, OwnRedis};
use crate::common::redis_url;
use crate::common::scenario::{Deadline, Step, TIMEOUT};
use crate::common::ws::Ws;
use crate::common::{blocking, uid};
use crate::{signal, Chaos, Paused, RingWatch, USERS};

/// How long a stopped process stays stopped, and how long the load runs on after a kill.
const STALL: Duration = Duration::from_secs(4);

/// The nodes' `PRESENCE_ROUTE_TIMEOUT` (the default): a gateway answers every request by then.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// What happens to a process: `kill -9`, or SIGSTOP for a while then SIGCONT.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hit {
    Kill,
    Stop(Duration),
}

const STOP: Hit = Hit::Stop(STALL);

crate::scenarios! {
    shard_kill_9 => node_fault(Proc::Shard(1), Hit::Kill, USERS),
    shard_kill_9_quick_restart => shard_quick_restart(),
    shard_sigstop_4s => node_fault(Proc::Shard(1), STOP, USERS),
    shard_sigstop_8s => shard_stall_past_the_route_timeout(),
    shard_sigstop_8s_while_one_joins => shard_stall_while_a_shard_joins(),
    gateway_kill_9 => node_fault(Proc::Gateway(1), Hit::Kill, USERS),
    // Fewer users: the load's heartbeats to the stopped gateway wait (256 in flight at most).
    gateway_sigstop_4s => node_fault(Proc::Gateway(1), STOP, 100),
    redis_master_sigstop_4s => redis_fault(7800, true, STOP),
    redis_master_kill_9 => redis_fault(7810, true, Hit::Kill),
    redis_replica_sigstop_4s => redis_fault(7820, false, STOP),
    redis_replica_kill_9 => redis_fault(7830, false, Hit::Kill),
    sockets_shard_kill_9 => sockets_through_a_shard_kill(),
}

/// `hit` on process `pid` under the load; after a kill, [`STALL`] passes too.
async fn hit_process(c: &mut Chaos, pid: u32, hit: Hit) {
    let (paused, stall) = match hit {
        Hit::Kill => {
            signal(pid, "KILL");
            (None, STALL)
        }
        Hit::Stop(stall) => (Some(Paused::stop(pid)), stall),
    };
    c.run(vec![Step::Sleep(stall)]).await;
    if let Some(p) = paused {
        p.resume();
    }
}

/// Scenario `name`: `hit` on node `p` of the cluster. A killed shard restarts; a killed gateway
/// stays down (its writes are the touched ones).
async fn node_fault(name: &'static str, p: Proc, hit: Hit, users: usize) -> Figures {
    let mut c = Chaos::start(name, Cluster::processes(3, 2), &redis_url(), users).await;
    // A shard stopped longer than the failure detection (two health checks, 2 s apart): the
    // ring moves off it and back.
    let moved = match (p, hit) {
        (Proc::Shard(i), Hit::Stop(stall)) if stall > STALL => Some((i, stall)),
        _ => None,
    };
    if let Some((i, stall)) = moved {
        // The interim owners reload the stopped shard's users with a fresh timeout (it cannot
        // hand over when it last saw them), up to the stall after their last heartbeat.
        let late = c.on_shard(&c.silent, i);
        let deadline = Deadline::AfterLastHeartbeat(TIMEOUT + stall + Duration::from_secs(5));
        c.late_ghosts = Some((late, deadline));
    }
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
    if moved.is_some() {
        took_back(&c, p).await;
    }
    let touched = match p {
        Proc::Shard(i) => c.writers_on_shard(i),
        Proc::Gateway(_) => Vec::new(),
    };
    c.finish(move |u, gateway| touched.contains(&u) || Proc::Gateway(gateway) == p)
        .await
}

/// Back on the same ring, the stopped shard `p` noticed its stall and found the partitions the
/// interim owners fenced: it gained them again rather than serve stale state and time its users
/// out under a fence that every write of theirs fails.
async fn took_back(c: &Chaos, p: Proc) {
    let (name, cl) = (c.name, &c.s.cluster);
    let stalls = cl.metric(p, "presence_stalls_total").await;
    let fenced = cl.metric(p, "presence_partitions_fenced_total").await;
    println!(
        "{name}: the stopped shard saw {stalls} stalls, gained {fenced} fenced partitions again"
    );
    assert!(stalls >= 1.0, "{name}: no stall seen");
    assert!(fenced >= 1.0, "{name}: no fenced partition gained again");
}

/// Shard 1 stopped (SIGSTOP) for 8 s, and a fourth shard started 5 s into the stop, once the
/// ring had moved off shard 1: the newcomer takes partitions over from the interim owners
/// (some of them shard 1's), and shard 1, running again, may find them fenced before it sees
/// the newcomer in its ring, so its guess of their interim owner is wrong (the shard that
/// handed them on to the newcomer). It must not fence them over the newcomer on that shard's
/// word. And the newcomer, which asks shard 1 (their owner in the ring of the others) for the
/// devices' times of partitions shard 1 let go before loading them again, must get them from
/// the shard that held them instead. Checked like every scenario, with the ghost bound of
/// `shard_sigstop_8s` for the silent users of shard 1 (in the ring of three or of four), and
/// the cluster settles on four shards. Writers of shard 1 or of the newcomer may see errors.
async fn shard_stall_while_a_shard_joins(name: &'static str) {
    let stall = STALL * 2;
    let spec = Cluster::processes(3, 2).spare(1);
    let mut c = Chaos::start(name, spec, &redis_url(), USERS).await;
    let (three, four) = (
        c.s.cluster.ring_of(&[0, 1, 2]),
        c.s.cluster.ring_of(&[0, 1, 2, 3]),
    );
    let (one, joined) = (c.s.cluster.shard_addr(1), c.s.cluster.shard_addr(3));
    let of = |users: &[u64], addrs: &[&str]| -> Vec<u64> {
        users
            .iter()
            .copied()
            .filter(|&u| {
                [&three, &four]
                    .iter()
                    .any(|r| r.owner_of(u).is_some_and(|o| addrs.contains(&o)))
            })
            .collect()
    };
    let late = of(&c.silent, &[&one]);
    let deadline = Deadline::AfterLastHeartbeat(TIMEOUT + stall + Duration::from_secs(5));
    c.late_ghosts = Some((late, deadline));
    let touched = of(&c.writers, &[&one, &joined]);
    c.until_fault().await;
    let pid = c.s.cluster.pid(Proc::Shard(1)).expect("a running child");
    let paused = Paused::stop(pid);
    let join_at = Duration::from_secs(5);
    c.run(vec![Step::Sleep(join_at), Step::AddShard]).await;
    c.run(vec![Step::Sleep(stall.saturating_sub(join_at))])
        .await;
    paused.resume();
    c.after_heal(true).await;
    took_back(&c, Proc::Shard(1)).await;
    // Some shard let partitions go without having held their fence (shard 1, which had not
    // loaded them again), and the newcomer asked every member for them.
    let declined = (c.s.cluster)
        .shard_sum(r#"presence_handover_polls_total{result="declined"}"#)
        .await;
    println!("{name}: {declined} handover answers declined (let go without the fence)");
    assert!(declined >= 1.0, "{name}: no handover declined");
    c.finish(move |u, _| touched.contains(&u)).await;
}

/// Shard 1 killed (`kill -9`) and started again at once, before its peers' health checks
/// dropped it (two checks, 2 s apart). Its partitions stay its own on every ring, and the new
/// process takes none during its start grace (6 s): unless its peers see that it restarted,
/// its users' calls fail until then. Besides the history's guarantees, no heartbeat waits out
/// the route timeout (which answers 503).
async fn shard_quick_restart(name: &'static str) {
    let mut c = Chaos::start(name, Cluster::processes(3, 2), &redis_url(), USERS).await;
    c.until_fault().await;
    let rings = RingWatch::start(&c, 3.0);
    c.run(vec![Step::KillShard(1), Step::RestartShard(1)]).await;
    c.after_heal(true).await;
    // It left the ring (and came back): the gateways' rings had 2 members for a while.
    let (reads, other) = rings.finish().await;
    println!("{name}: presence_ring_members read {reads} times, not 3: {other:?}");
    assert!(
        other
            .iter()
            .any(|r| r.contains("Gateway") && r.ends_with("Some(2.0)")),
        "{name}: no gateway's ring left the restarted shard out: {other:?}"
    );
    let touched = c.writers_on_shard(1);
    let f = c.finish(move |u, _| touched.contains(&u)).await;
    assert!(
        f.slowest_ms < ROUTE_TIMEOUT.as_millis() as u64,
        "{name}: the slowest answer took {} ms: calls waited out the route timeout",
        f.slowest_ms
    );
}

/// A shard stopped (SIGSTOP) for 8 s, longer than the route timeout: besides the history's
/// guarantees, every request to it is answered by the route timeout (503 at worst), however it
/// went: a batch that timed out, then the routed path with what was left of the deadline. The
/// margin is for a loaded machine; a request that started the route timeout afresh after its
/// batch took 1.25 times it (heartbeats), 1.5 times (reads and onlines).
async fn shard_stall_past_the_route_timeout(name: &'static str) {
    const MARGIN: Duration = Duration::from_millis(1000);
    let f = node_fault(name, Proc::Shard(1), Hit::Stop(STALL * 2), USERS).await;
    let most = ROUTE_TIMEOUT + MARGIN;
    assert!(
        f.slowest_ms <= most.as_millis() as u64,
        "{name}: the slowest answer took {} ms, not within the route timeout ({ROUTE_TIMEOUT:?}) \
         and {MARGIN:?}",
        f.slowest_ms
    );
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
        *r.replicas().first().expect("a replica")
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
    if master && hit == STOP {
        assert!(
            wrong.is_empty(),
            "{name}: presence_ring_members changed during the stall"
        );
    }
    drop(r);
}

/// Sockets whose devices are kept alive by the WebSocket liveness lease alone (their clients
/// send nothing but pongs to the server's pings, every 500 ms), through a gateway, while the
/// shard that owns a third of them is killed (`kill -9`) and restarted. Guarantees: no batch
/// poll reads any socket's user OFFLINE (the dead shard's users are unreadable until the ring
/// moves them: errors, never OFFLINE), since their owners reload them from Redis and the
/// lease's beats, failed while the ring still names the dead shard, go again next round; and
/// once the sockets close, every device goes OFFLINE after the close grace (no lease beat in
/// flight at a close brings its device back: no ghost).
async fn sockets_through_a_shard_kill(name: &'static str) {
    const SOCKETS: usize = 60;
    const GRACE: Duration = Duration::from_secs(1);
    let mut c = blocking(|| {
        Cluster::processes(3, 1)
            .redis(Some(&redis_url()))
            .vars(&[
                ("PRESENCE_HEALTH_INTERVAL", "2s"),
                ("PRESENCE_HEARTBEAT_INTERVAL", "1s"),
                // The suite's 4 s. This scenario keeps no record of which beats landed, so
                // no beat may go unserved for long: until 2026-12-04 it ran 8 s, because a
                // restarted shard rejoined every ring at once, its interim owners released its
                // partitions, and it took nothing until its start grace was over (~4-5 s
                // unserved on a loaded machine); a starting shard now joins once its grace is
                // over (`membership::Probed::Starting`).
                ("PRESENCE_HEARTBEAT_TIMEOUT", "4s"),
                ("PRESENCE_WS_PING_INTERVAL", "500ms"),
                ("PRESENCE_WS_IDLE_TIMEOUT", "3s"),
                ("PRESENCE_WS_CLOSE_GRACE", "1s"),
            ])
            .start()
    });
    let users: Vec<u64> = (0..SOCKETS).map(|_| uid()).collect();
    let mut sockets = Vec::new();
    for &u in &users {
        sockets.push(Ws::connect(&c.base(0), u, "d").await);
    }
    let ring = c.ring_of(&[0, 1, 2]);
    let dead = c.shard_addr(1);
    let on_dead = users
        .iter()
        .filter(|&&u| ring.owner_of(u) == Some(dead.as_str()))
        .count();

    // Batch polls every 300 ms until told to stop: OFFLINE reads, and polls that failed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = std::time::Instant::now();
    let poll = {
        let (base, users, stop) = (c.base(0), users.clone(), stop.clone());
        let client = c.client().clone();
        tokio::spawn(async move {
            let (mut offline, mut failed, mut polls) = (Vec::new(), 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                polls += 1;
                let r = client
                    .post(format!("{base}/api/v1/presence/status/batch"))
                    .json(&serde_json::json!({ "userIds": users }))
                    .send()
                    .await;
                let body: Option<serde_json::Value> = match r {
                    Ok(r) if r.status() == 200 => r.json().await.ok(),
                    _ => None,
                };
                match body {
                    Some(v) => {
                        for e in v["data"].as_array().into_iter().flatten() {
                            if e["status"] == "OFFLINE" {
                                offline.push((t0.elapsed().as_millis(), e["userId"].clone()));
                            }
                        }
                    }
                    None => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (offline, failed, polls)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill_shard(1);
    let killed = std::time::Instant::now();
    let kill_ms = t0.elapsed().as_millis();
    let settled = c.wait_settled(Duration::from_secs(30)).await;
    // Past a heartbeat timeout on the new owners.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let restart_ms = t0.elapsed().as_millis();
    blocking(|| c.restart_shard(1));
    c.wait_settled(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (offline, failed, polls) = poll.await.expect("the poll task");
    let g = Proc::Gateway(0);
    let beats = |r: &'static str| {
        let c = &c;
        async move {
            c.metric(
                g,
                &format!("presence_ws_lease_beats_total{{result=\"{r}\"}}"),
            )
            .await
        }
    };
    let (ok, revived, failed_beats) = (
        beats("ok").await,
        beats("revived").await,
        beats("failed").await,
    );
    let mut timeouts = Vec::new();
    for i in 0..3 {
        timeouts.push(
            c.metric(Proc::Shard(i), "presence_device_timeouts_total")
                .await,
        );
    }
    assert!(
        offline.is_empty(),
        "{name}: {} OFFLINE reads of sockets' users (ms since the start, user; the kill at {kill_ms} \
         ms, the restart at {restart_ms} ms): {:?}; {failed} of {polls} polls failed; device \
         timeouts by shard {timeouts:?}; lease beats revived {revived}, failed {failed_beats}",
        offline.len(),
        &offline[..offline.len().min(12)]
    );
    assert!(ok > 0.0, "{name}: no lease beats");

    // Every socket closes: every device OFFLINE after the grace, within a few seconds.
    let closed = std::time::Instant::now();
    for ws in sockets {
        ws.close().await;
    }
    let mut still = users.clone();
    while !still.is_empty() {
        assert!(
            closed.elapsed() < GRACE + Duration::from_secs(8),
            "{name}: {} devices still online {:?} after their sockets closed: {still:?}",
            still.len(),
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (code, v) = c
            .post(
                0,
                "/api/v1/presence/status/batch",
                serde_json::json!({ "userIds": still }),
            )
            .await;
        if code != 200 {
            continue;
        }
        let online: Vec<u64> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["status"] != "OFFLINE")
            .filter_map(|e| e["userId"].as_u64())
            .collect();
        still = online;
    }
    println!(
        "{name}: {SOCKETS} sockets ({on_dead} on the killed shard), settled {} ms after the kill \
         ({} ms in all); {polls} polls, {failed} failed, 0 OFFLINE reads; lease beats ok {ok}, \
         revived {revived}, failed {failed_beats}; all OFFLINE {} ms after the close",
        settled.as_millis(),
        killed.elapsed().as_millis(),
        closed.elapsed().as_millis()
    );
}
