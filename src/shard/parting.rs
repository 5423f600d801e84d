//! What a shard last saw of the devices of users it let go, kept briefly for the next owner.
//!
//! A shard lets a partition go when the ring gives it to another shard. Heartbeats are not
//! written through, so the store's `last_seen` of a device may be a whole timeout old; without
//! help the next owner must treat every stored device as seen at reload time, and a device that
//! went silent before the handoff would read ONLINE for up to a timeout more. The previous owner
//! keeps, per released partition and for [`KEEP`], how long ago it saw each online device; the
//! next owner asks for it (`Handover`) and loads with those times ([`UserState::handed_over`]).
//!
//! [`UserState::handed_over`]: crate::presence::UserState::handed_over

use std::collections::HashMap;

use compact_str::CompactString;
use parking_lot::Mutex;

use crate::presence::{Millis, Seen, UserId, UserState};
use crate::ring::partition_of;

/// How long the times of a released partition are kept: longer than any handoff grace.
pub const KEEP: Millis = 60_000;

/// One online device as this shard saw it when it let its user go (absolute times).
struct Parted {
    user: UserId,
    device: CompactString,
    last_seen: Millis,
    last_active: Millis,
}

/// Per released partition: when it was let go, and its online devices.
#[derive(Default)]
pub struct Parting {
    parts: Mutex<HashMap<u32, (Millis, Vec<Parted>)>>,
}

impl Parting {
    /// Notes the online devices of `user`, whose partition is being let go at `now`.
    pub fn note(&self, user: UserId, state: &UserState, now: Millis) {
        let mut parts = self.parts.lock();
        let (at, devices) = parts
            .entry(partition_of(user))
            .or_insert_with(|| (now, Vec::new()));
        if *at != now && now - *at > KEEP {
            // An old release of the same partition: start over.
            *at = now;
            devices.clear();
        }
        devices.extend(
            state
                .devices
                .iter()
                .filter(|d| d.is_online())
                .map(|d| Parted {
                    user,
                    device: d.id.clone(),
                    last_seen: d.last_seen,
                    last_active: d.last_active,
                }),
        );
    }

    /// Forgets what is older than [`KEEP`], and these `partitions` (this shard takes them back:
    /// what it saw before is no longer the latest).
    pub fn forget(&self, partitions: &[u32], now: Millis) {
        let mut parts = self.parts.lock();
        parts.retain(|_, (at, _)| now - *at <= KEEP);
        for p in partitions {
            parts.remove(p);
        }
    }

    /// The devices of `partitions`, with how long before `now` they were last seen and active.
    pub fn seen(&self, partitions: &[u32], now: Millis) -> Vec<Seen> {
        let parts = self.parts.lock();
        partitions
            .iter()
            .filter_map(|p| parts.get(p))
            .filter(|(at, _)| now - *at <= KEEP)
            .flat_map(|(_, devices)| devices)
            .map(|d| Seen {
                user: d.user,
                device: d.device.clone(),
                seen_ago: (now - d.last_seen).max(0),
                active_ago: (now - d.last_active).max(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Platform, Rules};

    #[test]
    fn keeps_online_devices_of_released_users_for_a_while() {
        let rules = Rules::default();
        let mut st = UserState::default();
        st.online("d1", Platform::Web, 1_000, &rules).unwrap();
        st.online("d2", Platform::Ios, 1_000, &rules).unwrap();
        st.heartbeat("d1", true, 4_000, &rules).unwrap();
        st.offline("d2", 5_000, &rules);
        let user: UserId = 42;
        let p = partition_of(user);
        let parting = Parting::default();
        parting.note(user, &st, 6_000);
        let seen = parting.seen(&[p], 10_000);
        // d2 went offline: only d1 is handed over, seen 6 s before the ask.
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].device, "d1");
        assert_eq!(seen[0].seen_ago, 6_000);
        assert!(parting.seen(&[p + 1], 10_000).is_empty());
        // Past KEEP it is gone, and so it is when the shard takes the partition back.
        assert!(parting.seen(&[p], 6_000 + KEEP + 1).is_empty());
        parting.forget(&[p], 10_000);
        assert!(parting.seen(&[p], 10_000).is_empty());
        assert!(parting.parts.lock().is_empty());
    }
}
