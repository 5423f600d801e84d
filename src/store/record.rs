//! The bytes a store keeps for one user's state: a compact binary record, or JSON (the record
//! of earlier versions, still read, and still written when the format is set to JSON).
//!
//! Why binary: a one- or two-device record is 30–60 bytes instead of ~200 of JSON, which keeps
//! the Redis hash under `hash-max-listpack-value` (64): Redis stores it as a listpack, not a
//! hash table, and every save script, replica and reload does less.
//!
//! Layout (version 1; integers are LEB128 varints, signed ones zigzag-encoded first; "base" is
//! the state's `last_active`, and device times are stored as their difference from it; a
//! device's session is not stored):
//!
//! ```text
//! 0x01                      format (a JSON record starts with `{`)
//! varint  version
//! zigzag  last_active
//! u8      status (index in Status::ALL)
//! u8      flags: 1 settings, 2 privacy, 4 invisible, 8 privacy_version
//! varint  devices, then per device:
//!   varint len, id bytes (UTF-8)
//!   u8      platform (index in Platform::ALL) | 4 when timed out
//!   zigzag  online_at - base, last_seen - base, last_active - base
//!   zigzag  timed_out_at - base            (only when timed out)
//! settings:  u8 manual (0 none, else 1 + index) | 8 text | 16 expiry;
//!            then varint len + text bytes, zigzag expires_at (each only when flagged)
//! privacy:   u8 visibility | last_seen << 2; varint n + n varints (allow); the same (deny)
//! invisible: zigzag at, varint version
//! privacy_version: varint
//! ```
//!
//! Decoding never panics and never allocates more than the input could describe: a corrupt
//! record is an error.

use compact_str::CompactString;
use smallvec::SmallVec;

use crate::presence::{
    Device, Frozen, LastSeen, Millis, Platform, Privacy, Settings, Status, UserState, Visibility,
};

/// How a store writes records (it reads both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordFormat {
    /// The compact binary record.
    #[default]
    Binary,
    /// JSON, as versions before the binary record wrote: for a rolling upgrade from them,
    /// until no such version runs (they cannot read binary records).
    Json,
}

/// The first byte of a version-1 binary record.
const BINARY_V1: u8 = 1;

const HAS_SETTINGS: u8 = 1;
const HAS_PRIVACY: u8 = 2;
const HAS_INVISIBLE: u8 = 4;
const HAS_PRIVACY_VERSION: u8 = 8;

const TIMED_OUT: u8 = 4;
const HAS_TEXT: u8 = 8;
const HAS_EXPIRY: u8 = 16;

/// Why a record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt stored state: {0}")]
pub struct Corrupt(String);

/// Appends `state`'s record in `format` to `out`.
pub fn encode(state: &UserState, format: RecordFormat, out: &mut Vec<u8>) {
    match format {
        RecordFormat::Json => {
            // A `UserState` always serializes: no maps with non-string keys, no fallible parts.
            serde_json::to_writer(&mut *out, state).expect("a UserState serializes");
        }
        RecordFormat::Binary => encode_binary(state, out),
    }
}

fn encode_binary(s: &UserState, out: &mut Vec<u8>) {
    let base = s.last_active;
    out.push(BINARY_V1);
    put_varint(out, s.version);
    put_signed(out, s.last_active);
    out.push(index_of(&Status::ALL, s.status));
    let flags = if s.settings.is_some() {
        HAS_SETTINGS
    } else {
        0
    } | if s.privacy.is_some() { HAS_PRIVACY } else { 0 }
        | if s.invisible.is_some() {
            HAS_INVISIBLE
        } else {
            0
        }
        | if s.privacy_version != 0 {
            HAS_PRIVACY_VERSION
        } else {
            0
        };
    out.push(flags);
    put_varint(out, s.devices.len() as u64);
    for d in &s.devices {
        put_bytes(out, d.id.as_bytes());
        let timed_out = d.timed_out_at != 0;
        out.push(index_of(&Platform::ALL, d.platform) | if timed_out { TIMED_OUT } else { 0 });
        put_signed(out, d.online_at.wrapping_sub(base));
        put_signed(out, d.last_seen.wrapping_sub(base));
        put_signed(out, d.last_active.wrapping_sub(base));
        if timed_out {
            put_signed(out, d.timed_out_at.wrapping_sub(base));
        }
    }
    if let Some(st) = &s.settings {
        let manual = st.manual.map_or(0, |m| 1 + index_of(&Status::ALL, m));
        out.push(
            manual
                | if st.text.is_some() { HAS_TEXT } else { 0 }
                | if st.expires_at.is_some() {
                    HAS_EXPIRY
                } else {
                    0
                },
        );
        if let Some(t) = &st.text {
            put_bytes(out, t.as_bytes());
        }
        if let Some(at) = st.expires_at {
            put_signed(out, at);
        }
    }
    if let Some(p) = &s.privacy {
        out.push(
            index_of(&Visibility::ALL, p.visibility) | index_of(&LastSeen::ALL, p.last_seen) << 2,
        );
        for list in [&p.allow, &p.deny] {
            put_varint(out, list.len() as u64);
            for &u in list {
                put_varint(out, u);
            }
        }
    }
    if let Some(f) = &s.invisible {
        put_signed(out, f.at);
        put_varint(out, f.version);
    }
    if s.privacy_version != 0 {
        put_varint(out, s.privacy_version);
    }
}

/// Reads a record of either format.
pub fn decode(bytes: &[u8]) -> Result<UserState, Corrupt> {
    match bytes.first() {
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| Corrupt(e.to_string())),
        Some(&BINARY_V1) => {
            let mut r = Reader(&bytes[1..]);
            let s = decode_binary(&mut r)?;
            if !r.0.is_empty() {
                return Err(Corrupt(format!("{} bytes after the record", r.0.len())));
            }
            Ok(s)
        }
        Some(b) => Err(Corrupt(format!("unknown record format {b:#04x}"))),
        None => Err(Corrupt("empty record".into())),
    }
}

fn decode_binary(r: &mut Reader) -> Result<UserState, Corrupt> {
    let version = r.varint()?;
    let last_active = r.signed()?;
    let base = last_active;
    let status = r.pick(&Status::ALL, "status")?;
    let flags = r.byte()?;
    if flags & !(HAS_SETTINGS | HAS_PRIVACY | HAS_INVISIBLE | HAS_PRIVACY_VERSION) != 0 {
        return Err(Corrupt(format!("unknown flags {flags:#04x}")));
    }
    // Each device takes at least 5 bytes, so a count beyond what is left is corrupt, not a
    // reason to allocate.
    let n = r.count(5)?;
    let mut devices = SmallVec::with_capacity(n);
    for _ in 0..n {
        let id = r.text("device id")?;
        let b = r.byte()?;
        if b & !(3 | TIMED_OUT) != 0 {
            return Err(Corrupt(format!("unknown device byte {b:#04x}")));
        }
        let platform = *Platform::ALL
            .get(usize::from(b & 3))
            .ok_or_else(|| Corrupt("platform".into()))?;
        let online_at = base.wrapping_add(r.signed()?);
        let last_seen = base.wrapping_add(r.signed()?);
        let device_active = base.wrapping_add(r.signed()?);
        let timed_out_at = if b & TIMED_OUT != 0 {
            let t = base.wrapping_add(r.signed()?);
            if t == 0 {
                return Err(Corrupt("a timed-out device at time 0".into()));
            }
            t
        } else {
            0
        };
        devices.push(Device {
            id,
            platform,
            online_at,
            last_seen,
            last_active: device_active,
            timed_out_at,
            session: 0,
        });
    }
    let settings = if flags & HAS_SETTINGS != 0 {
        let b = r.byte()?;
        if b & !(7 | HAS_TEXT | HAS_EXPIRY) != 0 {
            return Err(Corrupt(format!("unknown settings byte {b:#04x}")));
        }
        let manual = match b & 7 {
            0 => None,
            m => Some(
                *Status::ALL
                    .get(usize::from(m - 1))
                    .ok_or_else(|| Corrupt("manual status".into()))?,
            ),
        };
        let text = if b & HAS_TEXT != 0 {
            Some(r.text("custom text")?)
        } else {
            None
        };
        let expires_at = if b & HAS_EXPIRY != 0 {
            Some(r.signed()?)
        } else {
            None
        };
        Some(Box::new(Settings {
            manual,
            text,
            expires_at,
        }))
    } else {
        None
    };
    let privacy = if flags & HAS_PRIVACY != 0 {
        let b = r.byte()?;
        if b >> 4 != 0 {
            return Err(Corrupt(format!("unknown privacy byte {b:#04x}")));
        }
        let visibility = r.pick_in(&Visibility::ALL, b & 3, "visibility")?;
        let last_seen = r.pick_in(&LastSeen::ALL, b >> 2, "last seen")?;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = r.count(1)?;
            list.reserve_exact(n);
            for _ in 0..n {
                list.push(r.varint()?);
            }
        }
        let [allow, deny] = lists;
        Some(Box::new(Privacy {
            visibility,
            last_seen,
            allow,
            deny,
        }))
    } else {
        None
    };
    let invisible = if flags & HAS_INVISIBLE != 0 {
        Some(Frozen {
            at: r.signed()?,
            version: r.varint()?,
        })
    } else {
        None
    };
    let privacy_version = if flags & HAS_PRIVACY_VERSION != 0 {
        match r.varint()? {
            0 => return Err(Corrupt("privacy version flagged but 0".into())),
            v => v,
        }
    } else {
        0
    };
    Ok(UserState {
        version,
        last_active,
        status,
        settings,
        devices,
        privacy,
        privacy_version,
        invisible,
    })
}

fn index_of<T: PartialEq + Copy>(all: &[T], v: T) -> u8 {
    all.iter().position(|x| *x == v).unwrap_or(0) as u8
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_signed(out: &mut Vec<u8>, v: Millis) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The unread rest of a record.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Corrupt> {
        let (&b, rest) = self.0.split_first().ok_or_else(truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, Corrupt> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Corrupt("varint overflows 64 bits".into()));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Corrupt("varint longer than 10 bytes".into()))
    }

    fn signed(&mut self) -> Result<Millis, Corrupt> {
        let z = self.varint()?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    /// A count of items of at least `min_bytes` each, no more than the rest could hold.
    fn count(&mut self, min_bytes: usize) -> Result<usize, Corrupt> {
        let n = self.varint()?;
        if n > (self.0.len() / min_bytes) as u64 {
            return Err(Corrupt(format!("{n} items in {} bytes", self.0.len())));
        }
        Ok(n as usize)
    }

    fn text(&mut self, what: &str) -> Result<CompactString, Corrupt> {
        let n = self.count(1)?;
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        CompactString::from_utf8(b).map_err(|_| Corrupt(format!("{what} is not UTF-8")))
    }

    fn pick<T: Copy>(&mut self, all: &[T], what: &str) -> Result<T, Corrupt> {
        let b = self.byte()?;
        self.pick_in(all, b, what)
    }

    fn pick_in<T: Copy>(&self, all: &[T], b: u8, what: &str) -> Result<T, Corrupt> {
        all.get(usize::from(b))
            .copied()
            .ok_or_else(|| Corrupt(format!("unknown {what} {b}")))
    }
}

fn truncated() -> Corrupt {
    Corrupt("truncated".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Millis = 1_796_314_239_713;

    fn device(id: &str, platform: Platform, at: Millis) -> Device {
        Device {
            id: id.into(),
            platform,
            online_at: at - 11_364,
            last_seen: at,
            last_active: at,
            timed_out_at: 0,
            session: 0,
        }
    }

    fn one_device() -> UserState {
        UserState {
            version: 49,
            last_active: T,
            status: Status::Online,
            devices: [device("lg-277", Platform::Web, T)].into_iter().collect(),
            ..UserState::default()
        }
    }

    fn binary(s: &UserState) -> Vec<u8> {
        let mut out = Vec::new();
        encode(s, RecordFormat::Binary, &mut out);
        out
    }

    #[test]
    fn a_record_of_one_or_two_devices_fits_a_redis_listpack_value() {
        let one = one_device();
        let mut two = one.clone();
        two.devices.push(Device {
            timed_out_at: T - 5,
            ..device("ios-8c1f2b7e-5d3a-4b7e", Platform::Ios, T - 20_000)
        });
        let json = serde_json::to_vec(&one).unwrap();
        for s in [&one, &two] {
            let b = binary(s);
            assert!(b.len() <= 64, "{} bytes: {b:?}", b.len());
            assert_eq!(decode(&b).unwrap(), *s);
        }
        assert!(
            binary(&one).len() * 4 < json.len(),
            "json {} bytes",
            json.len()
        );
    }

    #[test]
    fn json_records_of_earlier_versions_are_read_and_json_is_still_written_on_request() {
        let s = one_device();
        let old = serde_json::to_vec(&s).unwrap();
        assert_eq!(decode(&old).unwrap(), s);
        let mut out = Vec::new();
        encode(&s, RecordFormat::Json, &mut out);
        assert_eq!(out, old);
    }

    #[test]
    fn corrupt_records_are_errors() {
        let b = binary(&one_device());
        // Every truncation fails (none is a shorter valid record).
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "{n} bytes read as a record");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        assert!(decode(&[9, 1, 2]).is_err());
        assert!(decode(b"{\"version\":").is_err());
        // A device count of 2^40 is refused without allocating for it.
        let mut huge = vec![BINARY_V1, 1, 2, 0, 0];
        put_varint(&mut huge, 1 << 40);
        assert!(decode(&huge).unwrap_err().0.contains("items"));
        // An unknown status.
        assert!(decode(&[BINARY_V1, 1, 2, 9, 0, 0]).is_err());
        // A varint of 11 bytes.
        assert!(decode(&[
            BINARY_V1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1
        ])
        .is_err());
    }

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL.to_vec())
    }

    fn arb_state() -> impl Strategy<Value = UserState> {
        let dev = (
            "[a-zA-Z0-9_.:-]{1,20}",
            proptest::sample::select(Platform::ALL.to_vec()),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(id, platform, online_at, last_seen, last_active, timed_out_at)| Device {
                    id: id.into(),
                    platform,
                    online_at,
                    last_seen,
                    last_active,
                    timed_out_at,
                    session: 0,
                },
            );
        let settings = (
            proptest::option::of(status()),
            proptest::option::of("\\PC{1,30}"),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(manual, text, expires_at)| {
                Box::new(Settings {
                    manual,
                    text: text.map(Into::into),
                    expires_at,
                })
            });
        let privacy = (
            proptest::sample::select(Visibility::ALL.to_vec()),
            proptest::sample::select(LastSeen::ALL.to_vec()),
            proptest::collection::vec(any::<u64>(), 0..5),
            proptest::collection::vec(any::<u64>(), 0..5),
        )
            .prop_map(|(visibility, last_seen, allow, deny)| {
                Box::new(Privacy {
                    visibility,
                    last_seen,
                    allow,
                    deny,
                })
            });
        (
            any::<u64>(),
            any::<i64>(),
            status(),
            proptest::option::of(settings),
            proptest::collection::vec(dev, 0..4),
            proptest::option::of(privacy),
            any::<u64>(),
            proptest::option::of((any::<i64>(), any::<u64>())),
        )
            .prop_map(
                |(version, last_active, status, settings, devices, privacy, pv, inv)| UserState {
                    version,
                    last_active,
                    status,
                    settings,
                    devices: devices.into_iter().collect(),
                    privacy,
                    privacy_version: pv,
                    invisible: inv.map(|(at, version)| Frozen { at, version }),
                },
            )
    }

    proptest! {
        /// Any state reads back as it was written, in both formats.
        #[test]
        fn every_state_round_trips(s in arb_state()) {
            prop_assert_eq!(decode(&binary(&s)).unwrap(), s.clone());
            let mut json = Vec::new();
            encode(&s, RecordFormat::Json, &mut json);
            prop_assert_eq!(decode(&json).unwrap(), s);
        }

        /// Arbitrary bytes after the format byte never panic (an error or some state).
        #[test]
        fn arbitrary_bytes_never_panic(rest in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut b = vec![BINARY_V1];
            b.extend(rest);
            let _ = decode(&b);
        }
    }
}
