//! Time for a node: one hashed timer wheel for every deadline (O(1) insert, no task or sleep per
//! device), and the [`Clock`] that every deadline is measured on.
//!
//! Entries are lazy: the wheel only remembers *that* a key must be looked at in a given tick.
//! Callers keep the tick a key is armed for next to the key's state, re-arm only when a deadline
//! moves earlier, and on firing check the real deadline (a heartbeat that moves a deadline later
//! touches nothing here). Deadlines beyond the wheel's horizon are parked at the horizon and
//! re-armed when they fire.

use crate::presence::Millis;

/// A tick number, counted from the wheel's creation.
pub type Tick = u64;

pub struct TimerWheel {
    slots: Box<[Vec<u64>]>,
    mask: u64,
    /// The last tick whose slot was drained.
    current: u64,
    /// Entries held (including stale ones).
    len: usize,
}

impl TimerWheel {
    /// A wheel of `slots` slots (rounded up to a power of two, at least 2).
    pub fn new(slots: usize) -> TimerWheel {
        let n = slots.max(2).next_power_of_two();
        TimerWheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            mask: (n - 1) as u64,
            current: 0,
            len: 0,
        }
    }

    /// The last tick processed.
    pub fn current(&self) -> Tick {
        self.current
    }

    /// The furthest tick an entry can be placed at now.
    pub fn horizon(&self) -> Tick {
        self.current + self.mask + 1
    }

    /// Arms `key` for `tick`, clamped to the next tick and to the horizon. Returns the tick used.
    pub fn insert(&mut self, key: u64, tick: u64) -> Tick {
        let t = tick.clamp(self.current + 1, self.current + self.mask + 1);
        self.slots[(t & self.mask) as usize].push(key);
        self.len += 1;
        t
    }

    /// The first tick after the current one whose slot holds an entry; `None` when the wheel is
    /// empty. Within the horizon every slot holds the entries of exactly one tick, so this is
    /// the earliest tick at which [`TimerWheel::advance`] would yield anything.
    pub fn next_occupied(&self) -> Option<Tick> {
        if self.len == 0 {
            return None;
        }
        (self.current + 1..=self.horizon())
            .find(|t| !self.slots[(t & self.mask) as usize].is_empty())
    }

    /// Drains every slot up to and including `to`, appending `(key, tick)` pairs to `out`.
    pub fn advance(&mut self, to: u64, out: &mut Vec<(u64, Tick)>) {
        while self.current < to {
            self.current += 1;
            let tick = self.current;
            let slot = &mut self.slots[(self.current & self.mask) as usize];
            self.len -= slot.len();
            out.extend(slot.drain(..).map(|k| (k, tick)));
        }
    }

    /// Entries currently held (including stale ones).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wall-clock milliseconds that follow tokio's clock, so tests can pause and advance time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_unix: Millis,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0);
        Clock {
            base_unix: unix,
            base: tokio::time::Instant::now(),
        }
    }

    /// The wall-clock time (Unix milliseconds) at which this clock started.
    pub fn base(&self) -> Millis {
        self.base_unix
    }

    pub fn now(&self) -> Millis {
        self.base_unix + self.base.elapsed().as_millis() as Millis
    }

    /// The instant of wall-clock time `at` (Unix milliseconds; not before the clock started).
    pub fn instant_at(&self, at: Millis) -> tokio::time::Instant {
        self.base + std::time::Duration::from_millis((at - self.base_unix).max(0) as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_and_clamps() {
        let mut w = TimerWheel::new(8);
        assert_eq!(w.insert(1, 3), 3);
        assert_eq!(w.insert(2, 0), 1); // the past becomes the next tick
        assert_eq!(w.insert(3, 100), 8); // beyond the horizon: parked at it
        let mut out = Vec::new();
        w.advance(2, &mut out);
        assert_eq!(out, vec![(2, 1)]);
        out.clear();
        w.advance(8, &mut out);
        assert_eq!(out, vec![(1, 3), (3, 8)]);
        assert!(w.is_empty());
        assert_eq!(w.horizon(), 16);
    }

    #[test]
    fn a_full_turn_does_not_fire_early() {
        let mut w = TimerWheel::new(4);
        let mut out = Vec::new();
        w.advance(10, &mut out);
        let t = w.insert(7, 14);
        assert_eq!(t, 14);
        w.advance(13, &mut out);
        assert!(out.is_empty());
        w.advance(14, &mut out);
        assert_eq!(out, vec![(7, 14)]);
    }

    #[test]
    fn next_occupied_is_the_first_tick_that_would_fire() {
        let mut w = TimerWheel::new(8);
        assert_eq!(w.next_occupied(), None);
        let mut out = Vec::new();
        w.advance(5, &mut out);
        w.insert(1, 11);
        w.insert(2, 100); // parked at the horizon, 13: its slot is the current tick's
        assert_eq!(w.next_occupied(), Some(11));
        w.insert(3, 7);
        assert_eq!(w.next_occupied(), Some(7));
        w.advance(7, &mut out);
        assert_eq!(out, vec![(3, 7)]);
        assert_eq!(w.next_occupied(), Some(11));
        w.advance(11, &mut out);
        assert_eq!(w.next_occupied(), Some(13));
        assert_eq!(w.len(), 1);
        w.advance(13, &mut out);
        assert_eq!(w.next_occupied(), None);
        assert!(w.is_empty());
    }
}
