//! The domain rules of presence: device liveness, idle detection, manual status and aggregation.
//!
//! Everything here is pure: no I/O, no clock, no locks. Every operation takes `now` (Unix
//! milliseconds) and the [`Rules`], mutates one [`UserState`] and reports an [`Effect`] that the
//! caller (the shard) turns into persistence, metrics and timers.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::error::Error;
pub use crate::privacy::{LastSeen, Privacy, Recency, Sight, Viewer, Visibility};

/// Unix time in milliseconds.
pub type Millis = i64;

/// A user id: a positive 64-bit integer.
pub type UserId = u64;

/// Maximum length of a device id.
pub const DEVICE_ID_MAX: usize = 128;
/// Maximum length of a custom status text, in characters.
pub const CUSTOM_TEXT_MAX: usize = 100;

/// The four presence states of the contract, and INVISIBLE: a manual status that only the user
/// itself (and a service token) sees; everyone else sees the user OFFLINE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Online,
    #[default]
    Offline,
    Busy,
    Away,
    Invisible,
}

impl Status {
    /// All states, in the order `GET /statuses` lists them.
    pub const ALL: [Status; 5] = [
        Status::Online,
        Status::Offline,
        Status::Busy,
        Status::Away,
        Status::Invisible,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "ONLINE",
            Status::Offline => "OFFLINE",
            Status::Busy => "BUSY",
            Status::Away => "AWAY",
            Status::Invisible => "INVISIBLE",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The client platforms of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Platform {
    Web,
    Ios,
    Android,
    Pc,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::Web,
        Platform::Ios,
        Platform::Android,
        Platform::Pc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "WEB",
            Platform::Ios => "IOS",
            Platform::Android => "ANDROID",
            Platform::Pc => "PC",
        }
    }

    pub fn parse(s: &str) -> Option<Platform> {
        Platform::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Checks a userId: a positive signed 64-bit integer (1 to 2^63-1, a Java `long`).
pub fn validate_user_id(id: u64) -> Result<UserId, Error> {
    if id == 0 || id > i64::MAX as u64 {
        return Err(Error::BadRequest(
            "userId must be a positive 64-bit integer".into(),
        ));
    }
    Ok(id)
}

/// Parses a userId from text (a path segment).
pub fn parse_user_id(s: &str) -> Result<UserId, Error> {
    let ok = !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    match ok.then(|| s.parse::<u64>().ok()).flatten() {
        Some(id) => validate_user_id(id),
        None => Err(Error::BadRequest(
            "userId must be a positive 64-bit integer".into(),
        )),
    }
}

/// Checks a deviceId: 1 to 128 characters from `[A-Za-z0-9_.:-]`.
pub fn validate_device_id(id: &str) -> Result<CompactString, Error> {
    if id.is_empty() {
        return Err(Error::BadRequest("deviceId must not be empty".into()));
    }
    if id.len() > DEVICE_ID_MAX {
        return Err(Error::BadRequest(format!(
            "deviceId must be at most {DEVICE_ID_MAX} characters"
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err(Error::BadRequest(
            "deviceId may only contain A-Z, a-z, 0-9, '_', '.', ':' and '-'".into(),
        ));
    }
    Ok(CompactString::from(id))
}

/// Checks a privacy list (`allow` or `deny`): at most `max` positive 64-bit user ids.
pub fn validate_privacy_list(list: &[u64], max: usize) -> Result<(), Error> {
    if list.len() > max {
        return Err(Error::BadRequest(format!(
            "allow and deny may hold at most {max} userIds each"
        )));
    }
    if list.iter().any(|&u| validate_user_id(u).is_err()) {
        return Err(Error::BadRequest(
            "allow and deny must hold positive 64-bit user ids".into(),
        ));
    }
    Ok(())
}

/// Checks a custom status text: 1 to 100 characters, no control characters.
pub fn validate_custom_text(text: &str) -> Result<CompactString, Error> {
    let chars = text.chars().count();
    if chars == 0 || chars > CUSTOM_TEXT_MAX {
        return Err(Error::BadRequest(format!(
            "customText must be 1 to {CUSTOM_TEXT_MAX} characters"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::BadRequest(
            "customText must not contain control characters".into(),
        ));
    }
    Ok(CompactString::from(text))
}

/// The timing rules, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// A device goes offline this long after its last heartbeat (or online).
    pub heartbeat_timeout: Millis,
    /// A user with no activity on any online device for this long is AWAY.
    pub idle_timeout: Millis,
    /// A timed-out device that heartbeats again within this window is revived.
    pub resume_window: Millis,
    /// At most this many devices per user.
    pub max_devices: usize,
    /// At most this many subscription targets per user.
    pub max_subscriptions: usize,
    /// Whether INVISIBLE is honoured (`PRESENCE_ALLOW_INVISIBLE`). When it is not, a user
    /// stored as INVISIBLE shows its real status.
    pub allow_invisible: bool,
    /// At most this many user ids in each privacy list (`allow`, `deny`).
    pub max_privacy_list: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            heartbeat_timeout: 60_000,
            idle_timeout: 300_000,
            resume_window: 300_000,
            max_devices: 16,
            max_subscriptions: 5_000,
            allow_invisible: true,
            max_privacy_list: 1_000,
        }
    }
}

/// One device of a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: CompactString,
    pub platform: Platform,
    /// When this device (last) came online.
    pub online_at: Millis,
    /// The last heartbeat or online: the device times out `heartbeat_timeout` after this.
    pub last_seen: Millis,
    /// The last moment the user interacted on this device.
    pub last_active: Millis,
    /// 0 while online; when the device timed out otherwise (it may then resume).
    #[serde(default)]
    pub timed_out_at: Millis,
    /// Which registration (`online`) of the device this is ([`crate::service::Session`]); 0 if
    /// unknown. Kept in memory only: a new owner learns it at the device's next `online`.
    #[serde(skip)]
    pub session: u64,
}

/// How long ago a shard that let a user go last saw one of its devices: handed to the next owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub user: UserId,
    pub device: CompactString,
    /// Since the last heartbeat or online, in ms (at least 0).
    pub seen_ago: Millis,
    /// Since the last activity, in ms (at least 0).
    pub active_ago: Millis,
}

impl Device {
    pub fn is_online(&self) -> bool {
        self.timed_out_at == 0
    }
}

/// A user's own settings: manual status and custom text. They persist while offline.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Settings {
    pub manual: Option<Status>,
    pub text: Option<CompactString>,
    /// When the settings clear themselves.
    pub expires_at: Option<Millis>,
}

impl Settings {
    fn live(&self, now: Millis) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// Everything known about one user. This is also the record that a store persists.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserState {
    /// Increases on every visible change.
    pub version: u64,
    /// The last time the user was active (online, an active heartbeat, offline); 0 if never.
    pub last_active: Millis,
    /// The effective status as last settled.
    pub status: Status,
    pub settings: Option<Box<Settings>>,
    pub devices: SmallVec<[Device; 1]>,
    /// Who may see the user, and how precisely its last-seen time shows; `None`: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Box<Privacy>>,
    /// The version at which the privacy settings (or, under `CONTACTS`, the contacts) last
    /// changed: the version of the OFFLINE view of those hidden from.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub privacy_version: u64,
    /// While INVISIBLE: the OFFLINE view others see, frozen when the user went invisible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invisible: Option<Frozen>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What others see of an INVISIBLE user: the OFFLINE view of the moment it went invisible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Frozen {
    /// The last-active time others see.
    pub at: Millis,
    /// The version others see.
    pub version: u64,
}

/// A change of effective status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Status,
    pub to: Status,
}

/// What an operation did, for persistence, metrics and timers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The status, device list or settings changed: the version was bumped.
    pub visible: bool,
    pub transition: Option<Transition>,
    /// Change in the number of online devices.
    pub devices_delta: i32,
    /// Devices that timed out in this step.
    pub timeouts: u32,
    /// Settings that expired in this step.
    pub expired: bool,
}

impl Effect {
    /// The combined effect of `self` followed by `next`.
    pub fn then(self, next: Effect) -> Effect {
        let transition = match (self.transition, next.transition) {
            (Some(a), Some(b)) => (a.from != b.to).then_some(Transition {
                from: a.from,
                to: b.to,
            }),
            (a, b) => a.or(b),
        };
        Effect {
            visible: self.visible || next.visible,
            transition,
            devices_delta: self.devices_delta + next.devices_delta,
            timeouts: self.timeouts + next.timeouts,
            expired: self.expired || next.expired,
        }
    }

    /// Change in the number of online users (0, 1 or -1).
    pub fn users_delta(&self) -> i32 {
        match self.transition {
            Some(Transition {
                from: Status::Offline,
                ..
            }) => 1,
            Some(Transition {
                to: Status::Offline,
                ..
            }) => -1,
            _ => 0,
        }
    }
}

/// The answer to a heartbeat from a device that is not online.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotOnline;

impl UserState {
    /// Online devices.
    pub fn online_devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.is_online())
    }

    /// The settings, unless they have expired by `now`.
    pub fn live_settings(&self, now: Millis) -> Option<&Settings> {
        self.settings.as_deref().filter(|s| s.live(now))
    }

    /// The effective status: OFFLINE without an online device; else the manual status; else AWAY
    /// when no online device was active within the idle timeout; else ONLINE.
    pub fn effective_status(&self, now: Millis, rules: &Rules) -> Status {
        let Some(active) = self.online_devices().map(|d| d.last_active).max() else {
            return Status::Offline;
        };
        if let Some(manual) = self.live_settings(now).and_then(|s| s.manual) {
            if manual != Status::Invisible || rules.allow_invisible {
                return manual;
            }
        }
        if active.saturating_add(rules.idle_timeout) <= now {
            Status::Away
        } else {
            Status::Online
        }
    }

    /// Recomputes the effective status and bumps the version when something visible changed.
    fn settle(&mut self, now: Millis, rules: &Rules, mut effect: Effect) -> Effect {
        let status = self.effective_status(now, rules);
        if status != self.status {
            effect.transition = Some(Transition {
                from: self.status,
                to: status,
            });
            self.status = status;
            effect.visible = true;
        }
        if effect.visible {
            self.version += 1;
        }
        effect
    }

    /// A device comes online. Idempotent for a device that is already online.
    pub fn online(
        &mut self,
        id: &str,
        platform: Platform,
        now: Millis,
        rules: &Rules,
    ) -> Result<Effect, Error> {
        let mut effect = Effect::default();
        self.last_active = self.last_active.max(now);
        match self.devices.iter_mut().find(|d| d.id == id) {
            Some(d) if d.is_online() => {
                d.last_seen = d.last_seen.max(now);
                d.last_active = d.last_active.max(now);
                if d.platform != platform {
                    d.platform = platform;
                    effect.visible = true;
                }
            }
            Some(d) => {
                *d = Device::new(id, platform, now);
                effect.visible = true;
                effect.devices_delta += 1;
            }
            None => {
                if self.devices.len() >= rules.max_devices {
                    // Make room by forgetting the oldest timed-out device, if any.
                    let oldest = self
                        .devices
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| !d.is_online())
                        .min_by_key(|(_, d)| d.timed_out_at)
                        .map(|(i, _)| i);
                    match oldest {
                        Some(i) => {
                            self.devices.remove(i);
                        }
                        None => return Err(Error::TooManyDevices(rules.max_devices)),
                    }
                }
                self.devices.push(Device::new(id, platform, now));
                effect.visible = true;
                effect.devices_delta += 1;
            }
        }
        Ok(self.settle(now, rules, effect))
    }

    /// A device goes offline explicitly. Final: the device cannot resume. Idempotent.
    pub fn offline(&mut self, id: &str, now: Millis, rules: &Rules) -> Effect {
        let mut effect = Effect::default();
        if let Some(i) = self.devices.iter().position(|d| d.id == id) {
            let d = self.devices.remove(i);
            if d.is_online() {
                effect.visible = true;
                effect.devices_delta -= 1;
                self.last_active = self.last_active.max(now);
            }
        }
        self.settle(now, rules, effect)
    }

    /// Records which registration of device `id` the latest `online` was (it changes nothing
    /// visible).
    pub fn set_session(&mut self, id: &str, session: u64) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.id == id) {
            d.session = session;
        }
    }

    /// Whether device `id` registered again (another `online`) since the registration
    /// `session`; never when either is unknown (0).
    pub fn registered_since(&self, id: &str, session: u64) -> bool {
        session != 0
            && self
                .devices
                .iter()
                .any(|d| d.id == id && d.session != 0 && d.session != session)
    }

    /// Whether the device was online and seen (online or heartbeat) within `window` of `now`.
    pub fn seen_within(&self, id: &str, window: Millis, now: Millis) -> bool {
        self.devices
            .iter()
            .any(|d| d.id == id && d.is_online() && d.last_seen.saturating_add(window) > now)
    }

    /// A heartbeat. `active` says the user interacted since the previous one. A device that timed
    /// out less than the resume window ago is revived; any other unknown device is [`NotOnline`].
    pub fn heartbeat(
        &mut self,
        id: &str,
        active: bool,
        now: Millis,
        rules: &Rules,
    ) -> Result<Effect, NotOnline> {
        let mut effect = Effect::default();
        let d = self
            .devices
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or(NotOnline)?;
        if !d.is_online() {
            if d.timed_out_at.saturating_add(rules.resume_window) <= now {
                return Err(NotOnline);
            }
            *d = Device::new(id, d.platform, now);
            effect.visible = true;
            effect.devices_delta += 1;
        }
        d.last_seen = d.last_seen.max(now);
        if active {
            d.last_active = d.last_active.max(now);
            self.last_active = self.last_active.max(now);
        }
        Ok(self.settle(now, rules, effect))
    }

    /// Replaces the settings (manual status and/or custom text).
    pub fn set_settings(&mut self, settings: Settings, now: Millis, rules: &Rules) -> Effect {
        let mut effect = Effect::default();
        let new = (settings != Settings::default()).then(|| Box::new(settings));
        if new != self.settings {
            self.settings = new;
            effect.visible = true;
        }
        let was_invisible = self.invisible.is_some();
        let effect = self.settle(now, rules, effect);
        self.freeze(now, was_invisible);
        effect
    }

    /// Whether the manual status INVISIBLE is set (whether or not it is honoured).
    fn wants_invisible(&self) -> bool {
        self.settings
            .as_deref()
            .is_some_and(|s| s.manual == Some(Status::Invisible))
    }

    /// Freezes the view others see when the user has just gone INVISIBLE (at the version of that
    /// change, with the last-active time a real disconnect at `now` would leave), and thaws it
    /// when the user no longer is.
    fn freeze(&mut self, now: Millis, was_invisible: bool) {
        match (self.wants_invisible(), was_invisible) {
            (true, false) => {
                let at = if self.online_devices().next().is_some() {
                    self.last_active.max(now)
                } else {
                    self.last_active
                };
                self.invisible = Some(Frozen {
                    at,
                    version: self.version,
                });
            }
            (false, _) => self.invisible = None,
            (true, true) => {}
        }
    }

    /// Replaces the privacy settings. Always a visible change (at a new version): those who
    /// lose sight are sent the OFFLINE view at that version, those who gain it the real one.
    pub fn set_privacy(&mut self, privacy: Privacy, now: Millis, rules: &Rules) -> Effect {
        self.privacy = (!privacy.is_default()).then(|| Box::new(privacy));
        self.contacts_changed(now, rules)
    }

    /// The user's contacts changed under `CONTACTS` (callers check): that changes who sees it, so
    /// it is a visible change as a settings change is.
    pub fn contacts_changed(&mut self, now: Millis, rules: &Rules) -> Effect {
        let effect = Effect {
            visible: true,
            ..Effect::default()
        };
        let effect = self.settle(now, rules, effect);
        self.privacy_version = self.version;
        effect
    }

    /// Clears the settings.
    pub fn clear_settings(&mut self, now: Millis, rules: &Rules) -> Effect {
        self.set_settings(Settings::default(), now, rules)
    }

    /// Applies everything due by `now`. Callers run this before any operation whose state may
    /// have a deadline at or before `now` (the operations themselves assume it has run): device timeouts, forgetting devices past the resume
    /// window, settings expiry and going idle.
    pub fn advance(&mut self, now: Millis, rules: &Rules) -> Effect {
        let effect = self.expire(now, rules);
        self.settle(now, rules, effect)
    }

    fn expire(&mut self, now: Millis, rules: &Rules) -> Effect {
        let mut effect = Effect::default();
        for d in self.devices.iter_mut().filter(|d| d.is_online()) {
            let deadline = d.last_seen.saturating_add(rules.heartbeat_timeout);
            if deadline <= now {
                d.timed_out_at = deadline;
                effect.visible = true;
                effect.devices_delta -= 1;
                effect.timeouts += 1;
            }
        }
        self.devices
            .retain(|d| d.is_online() || d.timed_out_at.saturating_add(rules.resume_window) > now);
        if self.settings.as_ref().is_some_and(|s| !s.live(now)) {
            self.settings = None;
            self.invisible = None;
            effect.visible = true;
            effect.expired = true;
        }
        effect
    }

    /// When [`UserState::advance`] next has something to do, if ever.
    pub fn next_deadline(&self, rules: &Rules) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut at = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        let mut max_active = None::<Millis>;
        for d in &self.devices {
            if d.is_online() {
                at(d.last_seen.saturating_add(rules.heartbeat_timeout));
                max_active = Some(max_active.map_or(d.last_active, |m| m.max(d.last_active)));
            } else {
                at(d.timed_out_at.saturating_add(rules.resume_window));
            }
        }
        let settings = self.settings.as_deref();
        if let Some(t) = settings.and_then(|s| s.expires_at) {
            at(t);
        }
        let manual = settings.is_some_and(|s| s.manual.is_some());
        if let (Some(active), false, Status::Online) = (max_active, manual, self.status) {
            at(active.saturating_add(rules.idle_timeout));
        }
        next
    }

    /// Prepares a state read back from the store by a new owner (after a restart or takeover).
    /// Heartbeats are not written through, so a stored `last_seen` may be old: every online
    /// device's deadline is moved to at least `now` + the heartbeat timeout, so that no device
    /// goes falsely OFFLINE after a takeover. A user stored as ONLINE (active) keeps being
    /// active from `now`, so that no one goes falsely AWAY either; one stored as AWAY stays idle.
    pub fn reloaded(&mut self, now: Millis) {
        self.handed_over(now, &[]);
    }

    /// As [`UserState::reloaded`], except for the devices the previous owner handed over with
    /// the partition ([`Seen`]): they keep the times it saw, so that they time out (or go AWAY)
    /// when they would have there, not a whole timeout after the handover.
    pub fn handed_over(&mut self, now: Millis, seen: &[Seen]) {
        let active = self.status == Status::Online;
        for d in self.devices.iter_mut().filter(|d| d.is_online()) {
            match seen.iter().find(|s| s.device == d.id) {
                Some(s) => {
                    d.last_seen = d.last_seen.max(now - s.seen_ago);
                    d.last_active = d.last_active.max(now - s.active_ago);
                }
                None => {
                    d.last_seen = d.last_seen.max(now);
                    if active {
                        d.last_active = d.last_active.max(now);
                    }
                }
            }
        }
    }

    /// Nothing left to time: the state can leave memory (it stays in the store).
    pub fn is_dormant(&self) -> bool {
        self.devices.is_empty()
            && self
                .settings
                .as_ref()
                .is_none_or(|s| s.expires_at.is_none())
    }
}

impl Device {
    fn new(id: &str, platform: Platform, now: Millis) -> Device {
        Device {
            id: CompactString::from(id),
            platform,
            online_at: now,
            last_seen: now,
            last_active: now,
            timed_out_at: 0,
            session: 0,
        }
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC with a `Z`, to the second as in the contract.
pub fn format_time(ms: Millis) -> Option<String> {
    if ms <= 0 {
        return None;
    }
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Parses an RFC 3339 time (any offset) to Unix milliseconds.
pub fn parse_time(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Serializes Unix milliseconds as an RFC 3339 string, and 0 as `null`.
mod rfc3339 {
    use super::{format_time, parse_time, Millis};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
        match format_time(*ms) {
            Some(t) => s.serialize_str(&t),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        let t: Option<String> = Option::deserialize(d)?;
        Ok(t.as_deref().and_then(parse_time).unwrap_or(0))
    }
}

/// A device as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub device_id: String,
    pub platform: Platform,
    #[serde(with = "rfc3339")]
    pub online_time: Millis,
}

/// A user's presence as `GET /status/{userId}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub user_id: UserId,
    pub status: Status,
    #[serde(with = "rfc3339")]
    pub last_active_time: Millis,
    pub devices: Vec<DeviceView>,
    pub custom_text: Option<String>,
    pub manual_status: Option<Status>,
    pub version: u64,
    /// `lastSeen`: absent when the last-active time shows exactly (as the contract has it);
    /// the coarse time when the user shows it only coarsely, null when it hides it (then
    /// `last_active_time` is null).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub last_seen: Option<Option<Recency>>,
}

/// A field that may be absent (`None`), null (`Some(None)`) or a value.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// One entry of a batch query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchEntry {
    pub user_id: UserId,
    pub status: Status,
    #[serde(with = "rfc3339")]
    pub last_active_time: Millis,
    pub custom_text: Option<String>,
    /// As in [`StatusView::last_seen`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub last_seen: Option<Option<Recency>>,
}

impl StatusView {
    /// The OFFLINE view of `user`: no devices, no custom text, no manual status.
    pub fn offline(user_id: UserId, last_active: Millis, version: u64) -> StatusView {
        StatusView {
            user_id,
            status: Status::Offline,
            last_active_time: last_active,
            devices: Vec::new(),
            custom_text: None,
            manual_status: None,
            version,
            last_seen: None,
        }
    }

    /// The view of a user that hides from the viewer: OFFLINE, as a user that hides its
    /// last-seen time shows it.
    pub fn hidden(user_id: UserId, version: u64) -> StatusView {
        StatusView {
            last_seen: Some(None),
            ..StatusView::offline(user_id, 0, version)
        }
    }

    /// Shows the last-active time as precisely as `mode` allows.
    fn with_last_seen(mut self, mode: LastSeen, now: Millis) -> StatusView {
        match mode {
            LastSeen::Exact => self.last_seen = None,
            LastSeen::Coarse => {
                self.last_seen = Some(Some(Recency::of(self.last_active_time, now)));
                self.last_active_time = 0;
            }
            LastSeen::Hidden => {
                self.last_seen = Some(None);
                self.last_active_time = 0;
            }
        }
        self
    }

    /// The short form of a batch query.
    pub fn to_entry(&self) -> BatchEntry {
        BatchEntry {
            user_id: self.user_id,
            status: self.status,
            last_active_time: self.last_active_time,
            custom_text: self.custom_text.clone(),
            last_seen: self.last_seen,
        }
    }
}

impl UserState {
    /// The state with whatever is due by `now` applied (a copy, when something is).
    fn settled(&self, now: Millis, rules: &Rules) -> std::borrow::Cow<'_, UserState> {
        let stale_invisible = self.status == Status::Invisible && !rules.allow_invisible;
        if stale_invisible || self.next_deadline(rules).is_some_and(|t| t <= now) {
            let mut copy = self.clone();
            copy.advance(now, rules);
            std::borrow::Cow::Owned(copy)
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }

    /// The full view at `now`, the truth (as the user itself sees it). Works on a state read
    /// from a store too: whatever is due by `now` (timeouts, expiry, idle) is applied to a copy
    /// first.
    pub fn view(&self, user_id: UserId, now: Millis, rules: &Rules) -> StatusView {
        let st = self.settled(now, rules);
        let settings = st.live_settings(now);
        StatusView {
            user_id,
            status: st.status,
            last_active_time: st.last_active,
            devices: st
                .online_devices()
                .map(|d| DeviceView {
                    device_id: d.id.to_string(),
                    platform: d.platform,
                    online_time: d.online_at,
                })
                .collect(),
            custom_text: settings
                .and_then(|s| s.text.as_ref())
                .map(|t| t.to_string()),
            manual_status: settings.and_then(|s| s.manual),
            version: st.version,
            last_seen: None,
        }
    }

    /// Whether anyone but the user sees something else than the truth: the user is INVISIBLE
    /// or has privacy settings.
    pub fn is_private(&self) -> bool {
        self.privacy.is_some() || self.invisible.is_some() || self.status == Status::Invisible
    }

    /// The view of those who may see the user (`Sight::Public`), when it differs from the
    /// truth: an INVISIBLE user's frozen OFFLINE view, the last-seen time as precise as the user
    /// allows.
    pub fn public_view(&self, user_id: UserId, now: Millis, rules: &Rules) -> Option<StatusView> {
        if !self.is_private() {
            return None;
        }
        let st = self.settled(now, rules);
        let mode = st
            .privacy
            .as_deref()
            .map_or(LastSeen::Exact, |p| p.last_seen);
        // A status stored as INVISIBLE without its frozen view (never written so) still hides.
        let frozen = st.invisible.or_else(|| {
            (st.status == Status::Invisible).then_some(Frozen {
                at: st.last_active,
                version: st.version,
            })
        });
        let view = match frozen.filter(|_| rules.allow_invisible) {
            Some(f) => StatusView::offline(user_id, f.at, f.version.max(st.privacy_version)),
            None => st.view(user_id, now, rules),
        };
        Some(view.with_last_seen(mode, now))
    }

    /// The view of those the user hides from (`Sight::Hidden`).
    pub fn hidden_view(&self, user_id: UserId) -> StatusView {
        StatusView::hidden(user_id, self.privacy_version)
    }

    /// What a viewer with `sight` sees at `now`.
    pub fn view_as(&self, user_id: UserId, now: Millis, rules: &Rules, sight: Sight) -> StatusView {
        match sight {
            Sight::Truth => self.view(user_id, now, rules),
            Sight::Public => self
                .public_view(user_id, now, rules)
                .unwrap_or_else(|| self.view(user_id, now, rules)),
            Sight::Hidden => self.hidden_view(user_id),
        }
    }

    /// The short view of a batch query, as a viewer with `sight` sees it.
    pub fn batch_entry_as(
        &self,
        user_id: UserId,
        now: Millis,
        rules: &Rules,
        sight: Sight,
    ) -> BatchEntry {
        match sight {
            Sight::Public if self.is_private() => {
                self.view_as(user_id, now, rules, sight).to_entry()
            }
            Sight::Hidden => self.hidden_view(user_id).to_entry(),
            _ => self.batch_entry(user_id, now, rules),
        }
    }

    /// The short view of a batch query (the truth).
    pub fn batch_entry(&self, user_id: UserId, now: Millis, rules: &Rules) -> BatchEntry {
        let settings = self.live_settings(now);
        let status = self.settled(now, rules).status;
        BatchEntry {
            user_id,
            status,
            last_active_time: self.last_active,
            custom_text: settings
                .and_then(|s| s.text.as_ref())
                .map(|t| t.to_string()),
            last_seen: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: Rules = Rules {
        heartbeat_timeout: 60_000,
        idle_timeout: 300_000,
        resume_window: 300_000,
        max_devices: 4,
        max_subscriptions: 10,
        allow_invisible: true,
        max_privacy_list: 10,
    };
    const T0: Millis = 1_700_000_000_000;

    fn online(st: &mut UserState, id: &str, now: Millis) -> Effect {
        st.online(id, Platform::Web, now, &R).unwrap()
    }

    #[test]
    fn never_seen_user_is_offline() {
        let st = UserState::default();
        let v = st.view(7, T0, &R);
        assert_eq!(v.status, Status::Offline);
        assert!(v.devices.is_empty());
        assert_eq!(v.last_active_time, 0);
        assert_eq!(v.version, 0);
    }

    #[test]
    fn online_then_offline_keeps_last_active() {
        let mut st = UserState::default();
        let e = online(&mut st, "d1", T0);
        assert_eq!(
            e.transition,
            Some(Transition {
                from: Status::Offline,
                to: Status::Online
            })
        );
        assert_eq!(e.users_delta(), 1);
        assert_eq!(st.version, 1);
        let e = st.offline("d1", T0 + 5_000, &R);
        assert_eq!(e.transition.unwrap().to, Status::Offline);
        assert_eq!(e.users_delta(), -1);
        assert_eq!(st.version, 2);
        assert_eq!(st.last_active, T0 + 5_000);
        assert_eq!(st.view(1, T0 + 10_000, &R).last_active_time, T0 + 5_000);
    }

    #[test]
    fn online_is_idempotent() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        let e = online(&mut st, "d1", T0 + 1_000);
        assert!(!e.visible);
        assert_eq!(e.transition, None);
        assert_eq!(st.devices.len(), 1);
        assert_eq!(st.devices[0].online_at, T0);
        assert_eq!(st.version, 1);
    }

    #[test]
    fn device_times_out_exactly_at_deadline() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        st.heartbeat("d1", false, T0 + 30_000, &R).unwrap();
        assert_eq!(st.next_deadline(&R), Some(T0 + 90_000));
        assert_eq!(st.advance(T0 + 89_999, &R), Effect::default());
        let e = st.advance(T0 + 90_000, &R);
        assert_eq!(e.timeouts, 1);
        assert_eq!(e.transition.unwrap().to, Status::Offline);
        assert_eq!(st.devices[0].timed_out_at, T0 + 90_000);
    }

    #[test]
    fn idle_goes_away_and_active_heartbeat_comes_back() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        let mut t = T0;
        while t < T0 + 300_000 {
            t += 30_000;
            st.heartbeat("d1", false, t, &R).unwrap();
            if t < T0 + 300_000 {
                assert_eq!(st.status, Status::Online, "at {t}");
            }
        }
        assert_eq!(st.status, Status::Away);
        // The timer would have fired at exactly T0 + idle.
        let mut st2 = UserState::default();
        online(&mut st2, "d1", T0);
        st2.heartbeat("d1", false, T0 + 290_000, &R).unwrap();
        assert_eq!(st2.next_deadline(&R), Some(T0 + 300_000));
        let e = st2.advance(T0 + 300_000, &R);
        assert_eq!(
            e.transition,
            Some(Transition {
                from: Status::Online,
                to: Status::Away
            })
        );
        // While away there is no idle deadline, only the device timeout.
        assert_eq!(st2.next_deadline(&R), Some(T0 + 350_000));
        let e = st2.heartbeat("d1", true, T0 + 310_000, &R).unwrap();
        assert_eq!(
            e.transition,
            Some(Transition {
                from: Status::Away,
                to: Status::Online
            })
        );
    }

    #[test]
    fn manual_status_overrides_idle_and_persists_offline() {
        let mut st = UserState::default();
        let s = Settings {
            manual: Some(Status::Busy),
            text: Some("会议中".into()),
            expires_at: None,
        };
        let e = st.set_settings(s, T0, &R);
        assert!(e.visible);
        assert_eq!(st.status, Status::Offline);
        assert_eq!(st.view(1, T0, &R).custom_text.as_deref(), Some("会议中"));
        online(&mut st, "d1", T0 + 1);
        assert_eq!(st.status, Status::Busy);
        for t in (T0 + 50_000..=T0 + 400_000).step_by(50_000) {
            st.heartbeat("d1", false, t, &R).unwrap();
        }
        assert_eq!(st.status, Status::Busy);
        st.offline("d1", T0 + 400_001, &R);
        assert_eq!(st.status, Status::Offline);
        assert!(st.is_dormant());
        online(&mut st, "d2", T0 + 500_000);
        assert_eq!(st.status, Status::Busy);
        let e = st.clear_settings(T0 + 500_001, &R);
        assert_eq!(
            e.transition,
            Some(Transition {
                from: Status::Busy,
                to: Status::Online
            })
        );
        assert_eq!(st.view(1, T0 + 500_001, &R).custom_text, None);
    }

    #[test]
    fn settings_expire() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        let s = Settings {
            manual: Some(Status::Away),
            text: None,
            expires_at: Some(T0 + 10_000),
        };
        st.set_settings(s, T0, &R);
        assert_eq!(st.status, Status::Away);
        assert_eq!(st.next_deadline(&R), Some(T0 + 10_000));
        assert!(!st.is_dormant());
        // A view before the timer runs already hides expired settings.
        assert_eq!(st.view(1, T0 + 10_000, &R).status, Status::Online);
        let e = st.advance(T0 + 10_000, &R);
        assert!(e.expired);
        assert_eq!(
            e.transition,
            Some(Transition {
                from: Status::Away,
                to: Status::Online
            })
        );
        assert!(st.settings.is_none());
    }

    #[test]
    fn resume_within_window_and_not_after() {
        let mut st = UserState::default();
        st.online("d1", Platform::Ios, T0, &R).unwrap();
        st.advance(T0 + 60_000, &R);
        assert_eq!(st.status, Status::Offline);
        let e = st.heartbeat("d1", true, T0 + 60_000 + 299_999, &R).unwrap();
        assert_eq!(e.transition.unwrap().to, Status::Online);
        assert_eq!(st.devices[0].platform, Platform::Ios);
        assert_eq!(st.devices[0].online_at, T0 + 359_999);
        // Time out again and wait past the window: forgotten.
        st.advance(T0 + 359_999 + 60_000, &R);
        assert!(!st.is_dormant());
        let later = T0 + 359_999 + 60_000 + 300_000;
        assert_eq!(st.next_deadline(&R), Some(later));
        st.advance(later, &R);
        assert_eq!(st.heartbeat("d1", true, later, &R), Err(NotOnline));
        assert!(st.devices.is_empty());
        assert!(st.is_dormant());
    }

    #[test]
    fn reload_never_times_out_early_nor_goes_falsely_away() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        let later = T0 + 500_000; // long after the stored deadline
        st.reloaded(later);
        assert_eq!(st.next_deadline(&R), Some(later + 60_000));
        assert_eq!(st.effective_status(later, &R), Status::Online);
        // A user stored as AWAY stays AWAY.
        let mut idle = UserState::default();
        online(&mut idle, "d1", T0);
        idle.heartbeat("d1", false, T0 + 300_000, &R).unwrap();
        assert_eq!(idle.status, Status::Away);
        idle.reloaded(later);
        assert_eq!(idle.effective_status(later, &R), Status::Away);
        assert_eq!(idle.next_deadline(&R), Some(later + 60_000));
    }

    #[test]
    fn a_handed_over_device_keeps_the_previous_owners_deadline() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        online(&mut st, "d2", T0);
        let later = T0 + 500_000;
        // The previous owner saw d1 50 s ago (its last activity 70 s ago), and says nothing of d2.
        let seen = [Seen {
            user: 1,
            device: "d1".into(),
            seen_ago: 50_000,
            active_ago: 70_000,
        }];
        st.handed_over(later, &seen);
        assert_eq!(st.devices[0].last_seen, later - 50_000);
        assert_eq!(st.devices[0].last_active, later - 70_000);
        // d2, not handed over, is treated as a plain reload: seen now.
        assert_eq!(st.devices[1].last_seen, later);
        // So the user's next deadline is d1's timeout, 10 s from now, not a whole timeout.
        assert_eq!(st.next_deadline(&R), Some(later + 10_000));
        // A handed time older than the stored one changes nothing.
        let mut fresh = UserState::default();
        online(&mut fresh, "d1", later);
        fresh.handed_over(later + 1_000, &seen);
        assert_eq!(fresh.devices[0].last_seen, later);
    }

    #[test]
    fn explicit_offline_is_final() {
        let mut st = UserState::default();
        online(&mut st, "d1", T0);
        st.offline("d1", T0 + 1, &R);
        assert_eq!(st.heartbeat("d1", true, T0 + 2, &R), Err(NotOnline));
    }

    #[test]
    fn device_limit_recycles_timed_out_then_refuses() {
        let mut st = UserState::default();
        for i in 0..4 {
            online(&mut st, &format!("d{i}"), T0);
        }
        assert!(matches!(
            st.online("d9", Platform::Pc, T0, &R),
            Err(Error::TooManyDevices(4))
        ));
        assert_eq!(st.devices.len(), 4);
        st.heartbeat("d0", false, T0 + 30_000, &R).unwrap();
        st.heartbeat("d1", false, T0 + 30_000, &R).unwrap();
        st.heartbeat("d2", false, T0 + 30_000, &R).unwrap();
        st.advance(T0 + 60_000, &R); // d3 times out
        assert!(st.online("d9", Platform::Pc, T0 + 60_001, &R).is_ok());
        assert!(st.devices.iter().all(|d| d.id != "d3"));
    }

    #[test]
    fn validation() {
        assert!(parse_user_id("0").is_err());
        assert!(parse_user_id("-1").is_err());
        assert!(parse_user_id("18446744073709551616").is_err());
        assert!(parse_user_id("9223372036854775808").is_err());
        assert_eq!(
            parse_user_id("9223372036854775807").unwrap(),
            i64::MAX as u64
        );
        assert!(parse_user_id("+5").is_err());
        assert!(validate_device_id("").is_err());
        assert!(validate_device_id(&"a".repeat(129)).is_err());
        assert!(validate_device_id(&"a".repeat(128)).is_ok());
        assert!(validate_device_id("dev ice").is_err());
        assert!(validate_device_id("web:tab-1_a.b").is_ok());
        assert!(validate_custom_text(&"会".repeat(100)).is_ok());
        assert!(validate_custom_text(&"会".repeat(101)).is_err());
        assert!(validate_custom_text("a\nb").is_err());
        assert_eq!(format_time(T0).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(parse_time("2023-11-14T23:13:20+01:00"), Some(T0));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Online(u8),
        Offline(u8),
        Heartbeat(u8, bool),
        SetManual(Option<Status>),
        Clear,
        Wait(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Online),
            (0u8..6).prop_map(Op::Offline),
            ((0u8..6), any::<bool>()).prop_map(|(d, a)| Op::Heartbeat(d, a)),
            prop_oneof![
                Just(None),
                Just(Some(Status::Online)),
                Just(Some(Status::Busy)),
                Just(Some(Status::Away))
            ]
            .prop_map(Op::SetManual),
            Just(Op::Clear),
            (0u32..400_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Aggregation invariants hold after any sequence of operations, with the timer firing
        /// at every deadline as the shard does.
        #[test]
        fn aggregation_invariants(ops in proptest::collection::vec(op(), 1..60)) {
            let mut st = UserState::default();
            let mut now = T0;
            let mut online_devices: i64 = 0;
            let mut last_version = 0;
            for op in ops {
                let pre = if st.next_deadline(&R).is_some_and(|t| t <= now) { st.advance(now, &R) } else { Effect::default() };
                let effect = pre.then(match op {
                    Op::Online(d) => st.online(&format!("d{d}"), Platform::Web, now, &R).unwrap_or_default(),
                    Op::Offline(d) => st.offline(&format!("d{d}"), now, &R),
                    Op::Heartbeat(d, a) => st.heartbeat(&format!("d{d}"), a, now, &R).unwrap_or_default(),
                    Op::SetManual(m) => st.set_settings(Settings { manual: m, text: None, expires_at: None }, now, &R),
                    Op::Clear => st.clear_settings(now, &R),
                    Op::Wait(ms) => {
                        let until = now + ms as i64;
                        let mut e = Effect::default();
                        // Fire every deadline on the way, as the timer wheel does.
                        while let Some(t) = st.next_deadline(&R).filter(|t| *t <= until) {
                            prop_assert!(t >= now, "deadline {t} in the past of {now}");
                            now = t;
                            let step = st.advance(now, &R);
                            e.devices_delta += step.devices_delta;
                            e.visible |= step.visible;
                            prop_assert!(step != Effect::default() || st.next_deadline(&R) != Some(t), "deadline without progress");
                        }
                        now = until;
                        e
                    }
                });
                online_devices += effect.devices_delta as i64;
                // The counter the shard keeps matches the state.
                prop_assert_eq!(online_devices, st.online_devices().count() as i64);
                // The cached status is always the rule's status at this moment.
                prop_assert_eq!(st.status, st.effective_status(now, &R));
                // OFFLINE exactly when no device is online.
                prop_assert_eq!(st.status == Status::Offline, st.online_devices().count() == 0);
                // A manual status wins whenever a device is online.
                if let (Some(m), true) = (st.live_settings(now).and_then(|s| s.manual), st.online_devices().count() > 0) {
                    prop_assert_eq!(st.status, m);
                }
                // Versions never go back, and move on every visible change.
                prop_assert!(st.version >= last_version);
                prop_assert_eq!(st.version > last_version, effect.visible);
                last_version = st.version;
                // Device ids stay unique and bounded.
                let mut ids: Vec<_> = st.devices.iter().map(|d| d.id.clone()).collect();
                ids.sort();
                ids.dedup();
                prop_assert_eq!(ids.len(), st.devices.len());
                prop_assert!(st.devices.len() <= R.max_devices);
                // No deadline is ever in the past after settling.
                if let Some(t) = st.next_deadline(&R) {
                    prop_assert!(t > now, "deadline {t} not after {now}");
                }
            }
        }
    }
}
