//! The fixed partitions of the userId space: the unit of ownership, of the deadline index in
//! the store, and (with the sharded cluster) of placement on the consistent-hash ring.

use crate::presence::UserId;
use crate::shard::mix64;

/// Number of partitions. Fixed for the life of a deployment: it is part of the store's keys.
pub const PARTITIONS: u32 = 1024;

/// The partition of a user.
pub fn partition_of(user: UserId) -> u32 {
    ((mix64(user) >> 32) % PARTITIONS as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_balanced() {
        assert_eq!(partition_of(10001), partition_of(10001));
        let mut counts = vec![0u32; PARTITIONS as usize];
        for u in 1..=1_024_000u64 {
            counts[partition_of(u) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }
}
