//! Who may see a user's presence: visibility, allow and deny lists, and how precisely the
//! last-seen time shows. Pure: no I/O and no clock.
//!
//! The rules, for a viewer V looking at a user U:
//! - U itself, and a service token that names no viewer, see the truth ([`Sight::Truth`]).
//! - V in U's `deny` list sees the OFFLINE view ([`Sight::Hidden`]); `deny` beats `allow`.
//! - V in U's `allow` list sees what may be seen of U ([`Sight::Public`]); `allow` beats
//!   `visibility`.
//! - Otherwise `visibility` decides: `EVERYONE`, `CONTACTS` (the users U subscribes to), or
//!   `NOBODY`.
//!
//! Someone hidden from gets the OFFLINE view, never a refusal: a refusal would tell the
//! relationship. The user ids here are plain `u64` (this module sits below `presence`).

use serde::{Deserialize, Serialize};

/// Unix time in milliseconds.
type Millis = i64;

/// Who sees the real status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Visibility {
    #[default]
    Everyone,
    Contacts,
    Nobody,
}

impl Visibility {
    pub const ALL: [Visibility; 3] = [
        Visibility::Everyone,
        Visibility::Contacts,
        Visibility::Nobody,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Everyone => "EVERYONE",
            Visibility::Contacts => "CONTACTS",
            Visibility::Nobody => "NOBODY",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        Visibility::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// How precisely `lastActiveTime` shows to those who may see the user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LastSeen {
    #[default]
    Exact,
    Coarse,
    Hidden,
}

impl LastSeen {
    pub const ALL: [LastSeen; 3] = [LastSeen::Exact, LastSeen::Coarse, LastSeen::Hidden];

    pub fn as_str(self) -> &'static str {
        match self {
            LastSeen::Exact => "EXACT",
            LastSeen::Coarse => "COARSE",
            LastSeen::Hidden => "HIDDEN",
        }
    }

    pub fn parse(s: &str) -> Option<LastSeen> {
        LastSeen::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A coarse last-seen time, as `lastSeen` shows it under [`LastSeen::Coarse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Recency {
    /// Within the last 3 days.
    Recently,
    /// Within the last 7 days.
    WithinWeek,
    /// Within the last 30 days.
    WithinMonth,
    /// Longer ago, or never.
    LongAgo,
}

const DAY: Millis = 86_400_000;

impl Recency {
    pub const ALL: [Recency; 4] = [
        Recency::Recently,
        Recency::WithinWeek,
        Recency::WithinMonth,
        Recency::LongAgo,
    ];

    /// The bucket of a last-active time (0: never) at `now`.
    pub fn of(last_active: Millis, now: Millis) -> Recency {
        if last_active <= 0 {
            return Recency::LongAgo;
        }
        match now.saturating_sub(last_active) {
            ago if ago <= 3 * DAY => Recency::Recently,
            ago if ago <= 7 * DAY => Recency::WithinWeek,
            ago if ago <= 30 * DAY => Recency::WithinMonth,
            _ => Recency::LongAgo,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Recency::Recently => "RECENTLY",
            Recency::WithinWeek => "WITHIN_WEEK",
            Recency::WithinMonth => "WITHIN_MONTH",
            Recency::LongAgo => "LONG_AGO",
        }
    }

    pub fn parse(s: &str) -> Option<Recency> {
        Recency::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A user's privacy settings, as `GET /privacy/{userId}` shows them and as the user record keeps
/// them. `allow` and `deny` are sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Privacy {
    #[serde(default)]
    pub visibility: Visibility,
    #[serde(default)]
    pub last_seen: LastSeen,
    #[serde(default)]
    pub allow: Vec<u64>,
    #[serde(default)]
    pub deny: Vec<u64>,
}

impl Privacy {
    /// Settings with the lists sorted and deduplicated.
    pub fn new(visibility: Visibility, last_seen: LastSeen, allow: &[u64], deny: &[u64]) -> Self {
        let tidy = |l: &[u64]| {
            let mut l = l.to_vec();
            l.sort_unstable();
            l.dedup();
            l
        };
        Privacy {
            visibility,
            last_seen,
            allow: tidy(allow),
            deny: tidy(deny),
        }
    }

    /// Everyone sees everything exactly: the same as no settings.
    pub fn is_default(&self) -> bool {
        *self == Privacy::default()
    }

    /// Whether the visibility rule needs the user's contacts to decide about `viewer` (not
    /// decided by the lists).
    pub fn needs_contacts(&self, viewer: u64) -> bool {
        self.visibility == Visibility::Contacts
            && self.deny.binary_search(&viewer).is_err()
            && self.allow.binary_search(&viewer).is_err()
    }
}

/// Who looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// A service token naming no viewer (or the user itself): sees the truth.
    Truth,
    /// This user.
    User(u64),
}

impl Viewer {
    /// The wire form: 0 for the truth (user ids start at 1).
    pub fn to_wire(self) -> u64 {
        match self {
            Viewer::Truth => 0,
            Viewer::User(u) => u,
        }
    }

    pub fn from_wire(n: u64) -> Viewer {
        match n {
            0 => Viewer::Truth,
            u => Viewer::User(u),
        }
    }
}

/// What a viewer gets to see of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sight {
    /// Everything, INVISIBLE included: the user itself, or a service token.
    Truth,
    /// What may be seen: the OFFLINE view of an INVISIBLE user, the last-seen time as precise as
    /// the user allows.
    Public,
    /// The OFFLINE view, as of a user who hides its presence from this viewer.
    Hidden,
}

/// Everything a gateway needs to decide, for any viewer, what it sees of one user: the user's
/// settings, and its contacts when its visibility is `CONTACTS` (sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audience {
    pub privacy: Privacy,
    pub contacts: Vec<u64>,
    /// The user's version when these settings (or its contacts, under `CONTACTS`) last changed:
    /// the version of the OFFLINE view those hidden from see.
    pub version: u64,
}

impl Audience {
    /// What `viewer` sees of `user`.
    pub fn sight(&self, user: u64, viewer: Viewer) -> Sight {
        sight(Some(&self.privacy), user, viewer, |v| {
            self.contacts.binary_search(&v).is_ok()
        })
    }
}

/// What `viewer` sees of `user`, whose settings are `privacy` (`None`: the defaults);
/// `is_contact` answers whether `user` subscribes to a viewer (asked only under `CONTACTS`, for
/// a viewer in neither list).
pub fn sight(
    privacy: Option<&Privacy>,
    user: u64,
    viewer: Viewer,
    is_contact: impl FnOnce(u64) -> bool,
) -> Sight {
    let v = match viewer {
        Viewer::Truth => return Sight::Truth,
        Viewer::User(v) if v == user => return Sight::Truth,
        Viewer::User(v) => v,
    };
    let Some(p) = privacy else {
        return Sight::Public;
    };
    if p.deny.binary_search(&v).is_ok() {
        return Sight::Hidden;
    }
    if p.allow.binary_search(&v).is_ok() {
        return Sight::Public;
    }
    let sees = match p.visibility {
        Visibility::Everyone => true,
        Visibility::Contacts => is_contact(v),
        Visibility::Nobody => false,
    };
    if sees {
        Sight::Public
    } else {
        Sight::Hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: u64 = 1;
    const CONTACT: u64 = 2;
    const STRANGER: u64 = 3;
    const DENIED: u64 = 4;

    fn see(p: &Privacy, viewer: Viewer) -> Sight {
        sight(Some(p), U, viewer, |v| v == CONTACT || v == DENIED)
    }

    #[test]
    fn each_visibility_decides_for_those_in_no_list() {
        for (vis, contact, stranger) in [
            (Visibility::Everyone, Sight::Public, Sight::Public),
            (Visibility::Contacts, Sight::Public, Sight::Hidden),
            (Visibility::Nobody, Sight::Hidden, Sight::Hidden),
        ] {
            let p = Privacy::new(vis, LastSeen::Exact, &[], &[DENIED]);
            assert_eq!(see(&p, Viewer::User(CONTACT)), contact, "{vis:?}");
            assert_eq!(see(&p, Viewer::User(STRANGER)), stranger, "{vis:?}");
            assert_eq!(see(&p, Viewer::User(DENIED)), Sight::Hidden, "{vis:?}");
            assert_eq!(see(&p, Viewer::Truth), Sight::Truth);
            assert_eq!(see(&p, Viewer::User(U)), Sight::Truth);
        }
    }

    #[test]
    fn deny_beats_allow_and_allow_beats_visibility() {
        let p = Privacy::new(
            Visibility::Nobody,
            LastSeen::Exact,
            &[STRANGER, DENIED],
            &[DENIED],
        );
        assert_eq!(see(&p, Viewer::User(STRANGER)), Sight::Public);
        assert_eq!(see(&p, Viewer::User(DENIED)), Sight::Hidden);
        assert_eq!(see(&p, Viewer::User(CONTACT)), Sight::Hidden);
        assert!(!p.needs_contacts(DENIED));
    }

    #[test]
    fn contacts_are_asked_only_when_the_lists_do_not_decide() {
        let p = Privacy::new(Visibility::Contacts, LastSeen::Exact, &[7], &[8]);
        let asked = std::cell::Cell::new(0);
        let ask = |_| {
            asked.set(asked.get() + 1);
            false
        };
        sight(Some(&p), U, Viewer::User(7), ask);
        sight(Some(&p), U, Viewer::User(8), ask);
        assert_eq!(asked.get(), 0);
        assert_eq!(sight(Some(&p), U, Viewer::User(9), ask), Sight::Hidden);
        assert_eq!(asked.get(), 1);
        assert!(p.needs_contacts(9) && !p.needs_contacts(7) && !p.needs_contacts(8));
        assert_eq!(sight(None, U, Viewer::User(9), ask), Sight::Public);
    }

    #[test]
    fn an_audience_decides_from_its_contact_list() {
        let a = Audience {
            privacy: Privacy::new(Visibility::Contacts, LastSeen::Coarse, &[], &[]),
            contacts: vec![2, 5, 9],
            version: 3,
        };
        assert_eq!(a.sight(U, Viewer::User(5)), Sight::Public);
        assert_eq!(a.sight(U, Viewer::User(6)), Sight::Hidden);
        assert_eq!(a.sight(U, Viewer::User(U)), Sight::Truth);
    }

    #[test]
    fn recency_buckets() {
        let now = 100 * DAY;
        assert_eq!(Recency::of(now, now), Recency::Recently);
        assert_eq!(Recency::of(now - 3 * DAY, now), Recency::Recently);
        assert_eq!(Recency::of(now - 3 * DAY - 1, now), Recency::WithinWeek);
        assert_eq!(Recency::of(now - 7 * DAY, now), Recency::WithinWeek);
        assert_eq!(Recency::of(now - 8 * DAY, now), Recency::WithinMonth);
        assert_eq!(Recency::of(now - 31 * DAY, now), Recency::LongAgo);
        assert_eq!(Recency::of(0, now), Recency::LongAgo);
    }

    #[test]
    fn settings_lists_are_sorted_and_deduplicated() {
        let p = Privacy::new(Visibility::Everyone, LastSeen::Exact, &[5, 1, 5], &[]);
        assert_eq!(p.allow, vec![1, 5]);
        assert!(Privacy::new(Visibility::Everyone, LastSeen::Exact, &[], &[]).is_default());
    }
}
