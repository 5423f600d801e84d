//! Per-key rate limits (GCRA, one timestamp per key), bounded in memory: a client cannot make
//! the server hold more than `max_keys` of them; and [`WindowCap`], a cap on how many of
//! something were made within a window.

use std::str::FromStr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A rate with a burst: `count` per `period`, up to `burst` at once. Written `N/PERIOD` with an
/// optional burst after a comma, for example `10/1m,5` or `20/min`; `off` disables the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
    /// None: the default burst of the setting.
    pub burst: Option<u32>,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        count: 0,
        period: Duration::ZERO,
        burst: None,
    };

    pub fn is_off(&self) -> bool {
        self.count == 0
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s == "0" {
            return Ok(Rate::OFF);
        }
        let bad = || format!("{s:?}: expected N/PERIOD[,BURST], for example 10/1m,5, or off");
        let (rate, burst) = match s.split_once(',') {
            Some((r, b)) => {
                let b = b.trim().trim_start_matches("burst=");
                (r, Some(b.parse::<u32>().map_err(|_| bad())?))
            }
            None => (s, None),
        };
        let (count, period) = rate.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            p => humantime::parse_duration(p).map_err(|_| bad())?,
        };
        if count == 0 || period.is_zero() || burst == Some(0) {
            return Err(bad());
        }
        Ok(Rate {
            count,
            period,
            burst,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_off() {
            return f.write_str("off");
        }
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        )?;
        if let Some(b) = self.burst {
            write!(f, ",{b}")?;
        }
        Ok(())
    }
}

/// Why a key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over its rate: retry after this long.
    Rate(Duration),
    /// The table of keys is full of keys still over their rate (a flood of distinct keys).
    Full,
}

const STRIPES: usize = 16;

/// Token buckets per key, kept as GCRA's "theoretical arrival time". A key whose bucket is full
/// again is forgotten, so memory holds only the keys that are busy now.
pub struct RateLimiter {
    /// Time between tokens, in nanoseconds; 0 when off.
    emission: u64,
    /// How far ahead of now a key's arrival time may run: (burst - 1) tokens.
    tolerance: u64,
    per_stripe: usize,
    base: Instant,
    stripes: Vec<Mutex<hashbrown::HashMap<u64, u64>>>,
}

impl RateLimiter {
    pub fn new(rate: Rate, default_burst: u32, max_keys: usize) -> RateLimiter {
        let (emission, tolerance) = if rate.is_off() {
            (0, 0)
        } else {
            let e = (rate.period.as_nanos() / rate.count as u128).max(1) as u64;
            let burst = rate.burst.unwrap_or(default_burst).max(1) as u64;
            (e, e.saturating_mul(burst - 1))
        };
        RateLimiter {
            emission,
            tolerance,
            per_stripe: max_keys.div_ceil(STRIPES).max(1),
            base: Instant::now(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    /// Takes one token for `key` at `now`, or says why not.
    pub fn check(&self, key: u64, now: Instant) -> Result<(), Refused> {
        if self.emission == 0 {
            return Ok(());
        }
        let now = now.saturating_duration_since(self.base).as_nanos() as u64;
        let mut stripe = self.stripes[(crate::ring::mix64(key) as usize) % STRIPES].lock();
        let tat = stripe.get(&key).copied().unwrap_or(0).max(now);
        if tat - now > self.tolerance {
            return Err(Refused::Rate(Duration::from_nanos(
                tat - now - self.tolerance,
            )));
        }
        if !stripe.contains_key(&key) && stripe.len() >= self.per_stripe {
            // Forget the keys whose bucket is full again; they are as good as new.
            stripe.retain(|_, t| *t > now);
            if stripe.len() >= self.per_stripe {
                return Err(Refused::Full);
            }
        }
        stripe.insert(key, tat + self.emission);
        Ok(())
    }

    /// Keys held now (including ones whose bucket has refilled but were not swept yet).
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Buckets of a [`WindowCap`]'s window.
const WINDOW_BUCKETS: i64 = 32;

/// At most `max` admissions within any `window` (counted in 32 buckets, so an admission leaves
/// the count between 31/32 and the whole of a window later). For things a client makes the
/// server keep for a window, such as records of users never online, kept `PRESENCE_RETENTION`.
pub struct WindowCap {
    max: u64,
    bucket_ms: i64,
    /// (bucket index, admissions in it), oldest first.
    buckets: Mutex<std::collections::VecDeque<(i64, u64)>>,
}

impl WindowCap {
    /// `max` 0 admits everything.
    pub fn new(max: u64, window: Duration) -> WindowCap {
        WindowCap {
            max,
            bucket_ms: (window.as_millis() as i64 / WINDOW_BUCKETS).max(1),
            buckets: Mutex::default(),
        }
    }

    /// Admits one more at `now_ms` (Unix ms), unless `max` were admitted within the window.
    pub fn admit(&self, now_ms: i64) -> bool {
        if self.max == 0 {
            return true;
        }
        let b = now_ms.div_euclid(self.bucket_ms);
        let mut buckets = self.buckets.lock();
        while buckets
            .front()
            .is_some_and(|(i, _)| *i <= b - WINDOW_BUCKETS)
        {
            buckets.pop_front();
        }
        if buckets.iter().map(|(_, n)| n).sum::<u64>() >= self.max {
            return false;
        }
        match buckets.back_mut() {
            Some((i, n)) if *i == b => *n += 1,
            _ => buckets.push_back((b, 1)),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_cap_admits_max_per_window_and_frees_up_as_it_slides() {
        let cap = WindowCap::new(3, Duration::from_millis(3200)); // buckets of 100 ms
        assert!(cap.admit(0));
        assert!(cap.admit(50));
        assert!(cap.admit(150));
        assert!(!cap.admit(160), "a 4th within the window");
        assert!(!cap.admit(3199));
        // The first bucket (0-99 ms) has left the window: two admissions free up.
        assert!(cap.admit(3200));
        assert!(cap.admit(3250));
        assert!(!cap.admit(3260));
        assert!(
            WindowCap::new(0, Duration::from_secs(1)).admit(0),
            "0 is off"
        );
    }

    #[test]
    fn rates_parse_and_print() {
        let r: Rate = "10/1m,5".parse().unwrap();
        assert_eq!(
            r,
            Rate {
                count: 10,
                period: Duration::from_secs(60),
                burst: Some(5)
            }
        );
        assert_eq!(r.to_string(), "10/1m,5");
        assert_eq!(
            "20/min".parse::<Rate>().unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!("3/s, burst=6".parse::<Rate>().unwrap().burst, Some(6));
        assert_eq!(
            "100/30s".parse::<Rate>().unwrap().period,
            Duration::from_secs(30)
        );
        assert!("off".parse::<Rate>().unwrap().is_off());
        for bad in [
            "",
            "10",
            "x/1m",
            "10/forever",
            "0/1m",
            "10/1m,0",
            "10/1m,x",
            "-1/1m",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_burst_then_the_rate_then_refusals_with_the_wait() {
        let l = RateLimiter::new("10/1m,5".parse().unwrap(), 1, 100);
        let t = Instant::now();
        for i in 0..5 {
            assert_eq!(l.check(1, t), Ok(()), "burst token {i}");
        }
        // The 6th is refused until one token (6 s) has come back.
        let Err(Refused::Rate(wait)) = l.check(1, t) else {
            panic!("not refused")
        };
        assert!(
            wait > Duration::from_millis(5_990) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        // Another key is not affected.
        assert_eq!(l.check(2, t), Ok(()));
        assert!(l.check(1, t + Duration::from_millis(5_900)).is_err());
        assert_eq!(l.check(1, t + Duration::from_secs(6)), Ok(()));
        assert!(l.check(1, t + Duration::from_secs(6)).is_err());
        // A minute later the whole burst is back.
        let later = t + Duration::from_secs(70);
        for _ in 0..5 {
            assert_eq!(l.check(1, later), Ok(()));
        }
        assert!(l.check(1, later).is_err());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_keys() {
        // 16 keys at most (one per stripe), one token a second.
        let l = RateLimiter::new("1/s".parse().unwrap(), 1, STRIPES);
        let t = Instant::now();
        let mut full = 0;
        for k in 0..1000u64 {
            if l.check(k, t) == Err(Refused::Full) {
                full += 1;
            }
        }
        assert!(l.len() <= STRIPES, "{} keys held", l.len());
        assert!(full >= 1000 - STRIPES, "{full} refused as full");
        // A second later every bucket is full again: new keys fit, in place of the old ones.
        let later = t + Duration::from_secs(1);
        for k in 1000..1100u64 {
            assert_eq!(l.check(k, later + Duration::from_secs(k - 1000)), Ok(()));
        }
        assert!(l.len() <= STRIPES);
    }

    #[test]
    fn off_allows_everything_and_holds_nothing() {
        let l = RateLimiter::new(Rate::OFF, 5, 10);
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.check(7, t), Ok(()));
        }
        assert!(l.is_empty());
    }
}
