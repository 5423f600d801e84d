//! A Redis Cluster of a test's own (3 masters, 3 replicas, through `scripts/redis-cluster.sh`
//! on other ports and another directory than the shared one), for scenarios that change the
//! cluster itself (resharding, partitions, killed masters), or TLS-only ([`OwnRedis::start_tls`],
//! with the certificates of `tests/fixtures/tls`): stopped on drop, even on failure.

use std::path::PathBuf;
use std::process::Command;

/// A private Redis Cluster on `port..port+5`; `down` on drop.
pub struct OwnRedis {
    dir: PathBuf,
    /// The first node's port.
    pub port: u16,
    /// Comma-separated seed URLs of every node.
    pub urls: String,
    /// TLS only, with `ca.pem`, `node.pem` and `node.key` of this directory.
    tls: Option<PathBuf>,
}

/// One master of [`OwnRedis::masters`].
#[derive(Clone, Debug)]
pub struct Master {
    pub id: String,
    pub port: u16,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl Master {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

impl OwnRedis {
    fn run(&self, action: &str) -> Result<String, String> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .arg(action)
            .env("PRESENCE_REDIS_DIR", &self.dir)
            .env("PRESENCE_REDIS_BASE_PORT", self.port.to_string());
        if let Some(tls) = &self.tls {
            cmd.env("PRESENCE_REDIS_TLS_DIR", tls);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("running scripts/redis-cluster.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cluster.sh {action} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_owned())
    }

    /// Starts a fresh cluster on `port..port+5` with its data in `dir` (a stale one there is
    /// stopped first). Panics when it cannot.
    pub fn start(port: u16, dir: &str) -> OwnRedis {
        Self::start_with(port, dir, None)
    }

    /// [`Self::start`], TLS only: no plaintext port, cluster bus and replication over TLS, and
    /// clients must show a certificate; all with the certificates of `tests/fixtures/tls`
    /// (`node.pem` from `ca.pem`, for 127.0.0.1). Seed URLs are `rediss://`.
    pub fn start_tls(port: u16, dir: &str) -> OwnRedis {
        Self::start_with(port, dir, Some(super::tls_fixture("")))
    }

    fn start_with(port: u16, dir: &str, tls: Option<PathBuf>) -> OwnRedis {
        let mut r = OwnRedis {
            dir: PathBuf::from(dir),
            port,
            urls: String::new(),
            tls,
        };
        let _ = r.run("down");
        r.urls = r.run("up").unwrap_or_else(|e| panic!("{e}"));
        let scheme = if r.tls.is_some() {
            "rediss://"
        } else {
            "redis://"
        };
        assert!(r.urls.starts_with(scheme), "no urls: {}", r.urls);
        // Each node is healthy by its own account; the first node's view of the others (what
        // the scenarios read) may still show a replica as a master with no slots until gossip
        // catches up.
        let settled = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (masters, replicas) = (r.masters(), r.replicas());
            if masters.len() == 3 && replicas.len() == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < settled,
                "the cluster's view did not settle: masters {masters:?}, replicas {replicas:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        r
    }

    /// The ports of every node (masters and replicas).
    pub fn ports(&self) -> Vec<u16> {
        self.urls
            .split(',')
            .filter_map(|u| u.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// `redis-cli -p port args...` (5 s bound): its stdout.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut cmd = Command::new("timeout");
        cmd.arg("5").arg("redis-cli");
        if let Some(tls) = &self.tls {
            cmd.arg("--tls");
            for (flag, file) in [
                ("--cacert", "ca.pem"),
                ("--cert", "node.pem"),
                ("--key", "node.key"),
            ] {
                cmd.arg(flag).arg(tls.join(file));
            }
        }
        let out = cmd
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Each node that `CLUSTER NODES` of node `port` lists: its id, port, flags, and the fields
    /// after the link state (its slots, for a master).
    fn nodes(&self) -> Vec<(String, u16, String, Vec<String>)> {
        let text = self.cli(self.port, &["CLUSTER", "NODES"]);
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let rest = f[8..].iter().map(|s| s.to_string()).collect();
                Some((f[0].to_owned(), port, f[2].to_owned(), rest))
            })
            .collect()
    }

    /// The ports of the replicas that `CLUSTER NODES` of node `port` lists, sorted.
    pub fn replicas(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self
            .nodes()
            .into_iter()
            .filter(|(_, _, flags, _)| flags.contains("slave"))
            .map(|(_, port, _, _)| port)
            .collect();
        out.sort_unstable();
        out
    }

    /// The masters that `CLUSTER NODES` of node `port` lists as healthy, by port.
    pub fn masters(&self) -> Vec<Master> {
        let mut out: Vec<Master> = self
            .nodes()
            .into_iter()
            .filter(|(_, _, flags, _)| flags.contains("master") && !flags.contains("fail"))
            .map(|(id, port, _, rest)| {
                let slots = rest
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                Master { id, port, slots }
            })
            .collect();
        out.sort_by_key(|m| m.port);
        out
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from master `from` to master `to`
    /// (ids), blocking; `Err` with its output when it fails.
    pub fn reshard(&self, from: &str, to: &str, slots: u32) -> Result<(), String> {
        let out = Command::new("timeout")
            .arg("120")
            .arg("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", self.port)])
            .args(["--cluster-from", from, "--cluster-to", to])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .map_err(|e| format!("running redis-cli --cluster reshard: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&out.stdout);
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            Err(format!(
                "reshard exited {}: {:?} {}",
                out.status,
                tail,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Err(e) = self.run("down") {
            eprintln!(
                "stopping the private Redis Cluster in {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// The Redis Cluster slot that holds `user`'s record (its partition's hash tag).
pub fn slot_of(user: u64) -> u16 {
    let p = presence_service::ring::partition_of(user);
    presence_service::store::redis::crc16(p.to_string().as_bytes()) % 16384
}
