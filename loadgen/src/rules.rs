//! Privacy rules on every user of a population (`--privacy rules`), for the cost benchmark of
//! issue 12.
//!
//! Users are `first .. first + users`, and user `x` subscribes to the `k` users after it (a
//! ring), so `u`'s watchers are the `k` users before it. Every user gets:
//! - `visibility`: `EVERYONE` for even ids, `CONTACTS` for odd ones;
//! - `allow`: its `k` watchers, so every watcher still sees it (and every pushed change still
//!   reaches them);
//! - `deny`: the `k` users before its watchers, who do not watch it;
//! - `lastSeen`: `COARSE`.
//!
//! So every view and every event goes through the whole rule set (deny, then allow, then the
//! visibility, with the contacts of `CONTACTS` users read by their shard), without changing
//! who receives what.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::{describe, Conn, Target, BASE};

/// Whether the population gets privacy rules.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privacy {
    /// The defaults: everyone sees everything exactly.
    Off,
    /// The rules of this module on every user.
    Rules,
}

/// The `n`-th user before `u` on the ring of `users` users starting at `first`.
pub fn before(u: u64, n: u64, first: u64, users: u64) -> u64 {
    first + (u - first + users - n % users) % users
}

/// The settings of user `u`; `also_deny` is added to its deny list.
pub fn settings(u: u64, first: u64, users: u64, k: u64, also_deny: Option<u64>) -> Value {
    let k = k.min(users.saturating_sub(1) / 2);
    let allow: Vec<u64> = (1..=k).map(|n| before(u, n, first, users)).collect();
    let mut deny: Vec<u64> = (k + 1..=2 * k)
        .map(|n| before(u, n, first, users))
        .collect();
    deny.extend(also_deny);
    json!({
        "visibility": if u % 2 == 0 { "EVERYONE" } else { "CONTACTS" },
        "allow": allow,
        "deny": deny,
        "lastSeen": "COARSE",
    })
}

/// `PUT /privacy/{userId}` of `body` through `conn`; an error unless the answer is 200.
pub async fn put(conn: &mut Conn, user: u64, body: &Value) -> anyhow::Result<()> {
    let path = format!("{BASE}/privacy/{user}");
    let body = Bytes::from(body.to_string());
    match conn.call(Method::PUT, &path, Some(body)).await {
        Ok((StatusCode::OK, _)) => Ok(()),
        other => bail!("PUT {path}: {}", describe(&other)),
    }
}

/// Gives every user its rules over `connections` connections spread over `targets`; returns
/// how long it took.
pub async fn apply(
    targets: &[Target],
    first: u64,
    users: u64,
    k: u64,
    connections: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections.max(1) {
        let (next, target) = (next.clone(), targets[c % targets.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    return anyhow::Ok(());
                }
                let u = first + i;
                put(&mut conn, u, &settings(u, first, users, k, None)).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    eprintln!("privacy rules on {users} users in {:?}", started.elapsed());
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_are_allowed_and_the_users_before_them_denied() {
        // 10 users from 100, k = 3: user 101 is watched by 100, 109 and 108.
        let s = settings(101, 100, 10, 3, Some(555));
        assert_eq!(s["visibility"], "CONTACTS");
        assert_eq!(s["allow"], json!([100, 109, 108]));
        assert_eq!(s["deny"], json!([107, 106, 105, 555]));
        assert_eq!(s["lastSeen"], "COARSE");
        assert_eq!(settings(102, 100, 10, 3, None)["visibility"], "EVERYONE");
    }

    #[test]
    fn a_small_ring_never_denies_a_watcher() {
        let s = settings(100, 100, 4, 3, None);
        let allow = s["allow"].as_array().unwrap();
        let deny = s["deny"].as_array().unwrap();
        assert_eq!(allow.len(), 1);
        assert!(deny.iter().all(|d| !allow.contains(d)));
    }
}
