//! The fixed partitions of the userId space and their placement on shards: a consistent-hash
//! ring (`hashring`, virtual nodes) with bounded loads.
//!
//! A user belongs to one of [`PARTITIONS`] partitions forever; partitions move between shards.
//! Every node computes the same [`Ring`] from the same member set, so gateways and shards agree
//! on owners without talking; the ring's epoch identifies that member set.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use hashring::HashRing;

use crate::presence::UserId;

/// Number of partitions. Fixed for the life of a deployment: it is part of the store's keys.
pub const PARTITIONS: u32 = 16384;

/// Virtual nodes per member.
const VNODES: u32 = 1024;

/// No member holds more than this factor of the mean number of partitions.
const LOAD_BOUND: f64 = 1.08;

/// The partition of a user.
pub fn partition_of(user: UserId) -> u32 {
    ((mix64(user) >> 32) % PARTITIONS as u64) as u32
}

#[derive(Hash, Clone, Debug, PartialEq)]
struct VNode<'a> {
    member: &'a str,
    replica: u32,
}

/// Which member owns each partition, for one member set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    epoch: u64,
    members: Vec<String>,
    /// Index into `members` of each partition's owner.
    owners: Vec<u16>,
}

impl Ring {
    /// The ring of a member set (addresses like `10.0.0.7:9004`). Order and duplicates do not
    /// matter.
    pub fn new<I: IntoIterator<Item = String>>(members: I) -> Ring {
        let mut members: Vec<String> = members.into_iter().collect();
        members.sort();
        members.dedup();
        members.truncate(u16::MAX as usize);
        let epoch = epoch_of(&members);
        if members.is_empty() {
            return Ring {
                epoch,
                members,
                owners: Vec::new(),
            };
        }
        let mut ring = HashRing::new();
        ring.batch_add(
            members
                .iter()
                .flat_map(|m| (0..VNODES).map(move |replica| VNode { member: m, replica }))
                .collect(),
        );
        let index: HashMap<&str, u16> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_str(), i as u16))
            .collect();
        let cap = ((PARTITIONS as f64 / members.len() as f64) * LOAD_BOUND).ceil() as u32;
        let mut load = vec![0u32; members.len()];
        let mut owners = Vec::with_capacity(PARTITIONS as usize);
        for p in 0..PARTITIONS {
            // Bounded loads: the first choice unless full, then a deterministic probe sequence.
            let mut attempt = 0u32;
            let owner = loop {
                let v = ring.get(&(p, attempt)).expect("ring is not empty");
                let i = index[v.member];
                if load[i as usize] < cap || attempt > 64 * members.len() as u32 {
                    break i;
                }
                attempt += 1;
            };
            load[owner as usize] += 1;
            owners.push(owner);
        }
        Ring {
            epoch,
            members,
            owners,
        }
    }

    /// Identifies the member set; equal rings have equal epochs. Never 0.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The ring of the other members: where `member`'s partitions go while it is away.
    pub fn without(&self, member: &str) -> Ring {
        Ring::new(self.members.iter().filter(|m| *m != member).cloned())
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The owner of a partition, if the ring has members.
    pub fn owner(&self, partition: u32) -> Option<&str> {
        let i = *self.owners.get(partition as usize)?;
        Some(self.members[i as usize].as_str())
    }

    /// The owner of a user.
    pub fn owner_of(&self, user: UserId) -> Option<&str> {
        self.owner(partition_of(user))
    }

    /// The partitions `member` owns, in order.
    pub fn partitions_of(&self, member: &str) -> Vec<u32> {
        let Some(i) = self.members.iter().position(|m| m == member) else {
            return Vec::new();
        };
        (0..PARTITIONS)
            .filter(|p| self.owners[*p as usize] == i as u16)
            .collect()
    }
}

/// FNV-1a over the sorted member list: the same on every node and every run.
fn epoch_of(members: &[String]) -> u64 {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= *b as u64;
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    members.hash(&mut h);
    // Keep it exact in a float64 gauge, and never 0 (0 means "no epoch" on the wire).
    (h.finish() & ((1 << 52) - 1)).max(1)
}

/// Keeps a ring in step with a member set: every change of `members` becomes a new [`Ring`] in
/// the returned channel, with the ring metrics updated. Runs until `cancel` fires.
pub fn follow(
    mut members: tokio::sync::watch::Receiver<crate::membership::Members>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::sync::watch::Receiver<std::sync::Arc<Ring>> {
    let first = std::sync::Arc::new(Ring::new(members.borrow_and_update().iter().cloned()));
    let (tx, rx) = tokio::sync::watch::channel(first.clone());
    metrics.ring.members.set(first.members().len() as i64);
    metrics.ring.epoch.set(first.epoch() as i64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = members.changed() => if r.is_err() { return },
            }
            let ring = Ring::new(members.borrow_and_update().iter().cloned());
            if ring.epoch() == tx.borrow().epoch() {
                continue;
            }
            tracing::info!(epoch = ring.epoch(), members = ?ring.members(), "ring changed");
            metrics.ring.members.set(ring.members().len() as i64);
            metrics.ring.epoch.set(ring.epoch() as i64);
            metrics.ring.changes.inc();
            tx.send_replace(std::sync::Arc::new(ring));
        }
    });
    rx
}

/// Mixes a user id so that consecutive ids spread evenly.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The stripe of `user` among `n` (a power of two).
pub fn stripe_of(user: UserId, n: usize) -> usize {
    (mix64(user) as usize) & (n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize, seed: u32) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:9004", seed % 250, i / 250, i % 250))
            .collect()
    }

    fn counts(r: &Ring) -> Vec<usize> {
        r.members()
            .iter()
            .map(|m| r.partitions_of(m).len())
            .collect()
    }

    #[test]
    fn partitions_are_stable_and_balanced() {
        assert_eq!(partition_of(10001), partition_of(10001));
        let mut counts = vec![0u32; PARTITIONS as usize];
        for u in 1..=(PARTITIONS as u64 * 100) {
            counts[partition_of(u) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 50 && *max < 150, "min {min} max {max}");
    }

    #[test]
    fn same_members_same_ring_in_any_order() {
        let a = Ring::new(vec!["b:1".to_owned(), "a:1".to_owned(), "c:1".to_owned()]);
        let b = Ring::new(vec![
            "c:1".to_owned(),
            "a:1".to_owned(),
            "b:1".to_owned(),
            "a:1".to_owned(),
        ]);
        assert_eq!(a, b);
        assert_ne!(a.epoch(), Ring::new(vec!["a:1".to_owned()]).epoch());
        assert!(Ring::new(Vec::new()).owner(0).is_none());
        assert_eq!(
            Ring::new(vec!["x:1".to_owned()]).partitions_of("x:1").len(),
            PARTITIONS as usize
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)))]

        /// Every shard holds within ±15% of the mean, for 3 to 10 shards.
        #[test]
        fn balanced_within_15_percent(n in 3usize..=10, seed in 0u32..1000) {
            let r = Ring::new(members(n, seed));
            let mean = PARTITIONS as f64 / n as f64;
            for (m, c) in r.members().iter().zip(counts(&r)) {
                let dev = (c as f64 - mean) / mean;
                prop_assert!(dev.abs() <= 0.15, "{m} holds {c} of {PARTITIONS} (mean {mean:.1})");
            }
        }

        /// A join moves about 1/(n+1) of the partitions, all to the new member's benefit or
        /// nearly; a leave moves only the leaver's partitions (and few others).
        #[test]
        fn minimal_movement_on_join_and_leave(n in 3usize..=9, seed in 0u32..1000) {
            let before = Ring::new(members(n, seed));
            let mut grown = members(n, seed);
            grown.push(format!("10.250.9.9:{}", 9000 + seed));
            let after = Ring::new(grown.clone());
            let new = grown.last().unwrap().as_str();
            let moved: Vec<u32> = (0..PARTITIONS).filter(|p| before.owner(*p) != after.owner(*p)).collect();
            let to_new = moved.iter().filter(|p| after.owner(**p) == Some(new)).count();
            let ideal = PARTITIONS as f64 / (n + 1) as f64;
            prop_assert!((moved.len() as f64) <= ideal * 1.5, "join moved {} (ideal {ideal:.0})", moved.len());
            prop_assert!(to_new as f64 >= ideal * 0.85, "only {to_new} went to the new member");

            // Leave: remove one old member.
            let mut shrunk = members(n, seed);
            let gone = shrunk.remove(0);
            let left = Ring::new(shrunk);
            let orphaned = before.partitions_of(&gone).len();
            let moved = (0..PARTITIONS).filter(|p| before.owner(*p) != left.owner(*p)).count();
            prop_assert!(moved >= orphaned);
            prop_assert!((moved as f64) <= orphaned as f64 * 1.5, "leave moved {moved} for {orphaned} orphaned");
        }
    }
}
