//! The gRPC schema (`proto/presence.proto`, package `presence.v1`) and the conversions between
//! its messages and the domain types.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("presence.v1");
}

use crate::error::Error;
use crate::presence::{self, BatchEntry, DeviceView, Platform, Seen, Settings, Status, StatusView};
use crate::privacy::{Audience, LastSeen, Privacy, Recency, Visibility};

impl From<Status> for v1::Status {
    fn from(s: Status) -> v1::Status {
        match s {
            Status::Online => v1::Status::Online,
            Status::Offline => v1::Status::Offline,
            Status::Busy => v1::Status::Busy,
            Status::Away => v1::Status::Away,
            Status::Invisible => v1::Status::Invisible,
        }
    }
}

impl From<v1::Status> for Status {
    fn from(s: v1::Status) -> Status {
        match s {
            v1::Status::Online => Status::Online,
            v1::Status::Offline => Status::Offline,
            v1::Status::Busy => Status::Busy,
            v1::Status::Away => Status::Away,
            v1::Status::Invisible => Status::Invisible,
        }
    }
}

/// A wire status number; unknown numbers are a bad request.
pub fn status_from_i32(n: i32) -> Result<Status, Error> {
    v1::Status::try_from(n)
        .map(Status::from)
        .map_err(|_| Error::BadRequest(format!("unknown status {n}")))
}

impl From<Platform> for v1::Platform {
    fn from(p: Platform) -> v1::Platform {
        match p {
            Platform::Web => v1::Platform::Web,
            Platform::Ios => v1::Platform::Ios,
            Platform::Android => v1::Platform::Android,
            Platform::Pc => v1::Platform::Pc,
        }
    }
}

/// A wire platform number; unspecified or unknown is a bad request.
pub fn platform_from_i32(n: i32) -> Result<Platform, Error> {
    match v1::Platform::try_from(n) {
        Ok(v1::Platform::Web) => Ok(Platform::Web),
        Ok(v1::Platform::Ios) => Ok(Platform::Ios),
        Ok(v1::Platform::Android) => Ok(Platform::Android),
        Ok(v1::Platform::Pc) => Ok(Platform::Pc),
        _ => Err(Error::BadRequest(
            "platform must be one of WEB, IOS, ANDROID, PC".into(),
        )),
    }
}

impl From<StatusView> for v1::StatusReply {
    fn from(v: StatusView) -> v1::StatusReply {
        v1::StatusReply {
            user_id: v.user_id,
            status: v1::Status::from(v.status) as i32,
            last_active_time: v.last_active_time,
            devices: v
                .devices
                .into_iter()
                .map(|d| v1::Device {
                    device_id: d.device_id,
                    platform: v1::Platform::from(d.platform) as i32,
                    online_time: d.online_time,
                })
                .collect(),
            custom_text: v.custom_text,
            manual_status: v.manual_status.map(|s| v1::Status::from(s) as i32),
            version: v.version,
            last_seen: recency_to(v.last_seen) as i32,
        }
    }
}

fn recency_to(r: Option<Option<Recency>>) -> v1::Recency {
    match r {
        None => v1::Recency::Absent,
        Some(None) => v1::Recency::Hidden,
        Some(Some(Recency::Recently)) => v1::Recency::Recently,
        Some(Some(Recency::WithinWeek)) => v1::Recency::WithinWeek,
        Some(Some(Recency::WithinMonth)) => v1::Recency::WithinMonth,
        Some(Some(Recency::LongAgo)) => v1::Recency::LongAgo,
    }
}

/// A wire recency; unknown numbers are a bad request.
fn recency_from(n: i32) -> Result<Option<Option<Recency>>, Error> {
    match v1::Recency::try_from(n) {
        Ok(v1::Recency::Absent) => Ok(None),
        Ok(v1::Recency::Hidden) => Ok(Some(None)),
        Ok(v1::Recency::Recently) => Ok(Some(Some(Recency::Recently))),
        Ok(v1::Recency::WithinWeek) => Ok(Some(Some(Recency::WithinWeek))),
        Ok(v1::Recency::WithinMonth) => Ok(Some(Some(Recency::WithinMonth))),
        Ok(v1::Recency::LongAgo) => Ok(Some(Some(Recency::LongAgo))),
        Err(_) => Err(Error::BadRequest(format!("unknown recency {n}"))),
    }
}

impl From<&Privacy> for v1::PrivacySettings {
    fn from(p: &Privacy) -> v1::PrivacySettings {
        v1::PrivacySettings {
            visibility: match p.visibility {
                Visibility::Everyone => v1::Visibility::Everyone,
                Visibility::Contacts => v1::Visibility::Contacts,
                Visibility::Nobody => v1::Visibility::Nobody,
            } as i32,
            last_seen: match p.last_seen {
                LastSeen::Exact => v1::LastSeenMode::Exact,
                LastSeen::Coarse => v1::LastSeenMode::Coarse,
                LastSeen::Hidden => v1::LastSeenMode::Hidden,
            } as i32,
            allow: p.allow.clone(),
            deny: p.deny.clone(),
        }
    }
}

/// Privacy settings from the wire: known values only (never trust the wire). The lists' limits
/// are checked where a change lands, by the owning shard.
pub fn privacy_from(p: &v1::PrivacySettings) -> Result<Privacy, Error> {
    let visibility = match v1::Visibility::try_from(p.visibility) {
        Ok(v1::Visibility::Everyone) => Visibility::Everyone,
        Ok(v1::Visibility::Contacts) => Visibility::Contacts,
        Ok(v1::Visibility::Nobody) => Visibility::Nobody,
        Err(_) => return Err(Error::BadRequest("unknown visibility".into())),
    };
    let last_seen = match v1::LastSeenMode::try_from(p.last_seen) {
        Ok(v1::LastSeenMode::Exact) => LastSeen::Exact,
        Ok(v1::LastSeenMode::Coarse) => LastSeen::Coarse,
        Ok(v1::LastSeenMode::Hidden) => LastSeen::Hidden,
        Err(_) => return Err(Error::BadRequest("unknown lastSeen".into())),
    };
    // The lists' limits are the owning shard's to check (`Shard::set_privacy`), once.
    Ok(Privacy::new(visibility, last_seen, &p.allow, &p.deny))
}

impl From<&Audience> for v1::Audience {
    fn from(a: &Audience) -> v1::Audience {
        v1::Audience {
            privacy: Some((&a.privacy).into()),
            contacts: a.contacts.clone(),
            version: a.version,
        }
    }
}

impl TryFrom<v1::Audience> for Audience {
    type Error = Error;

    /// From a shard: its lists are trusted to be within the limits it enforces, but not to be
    /// sorted (they are sorted again).
    fn try_from(a: v1::Audience) -> Result<Audience, Error> {
        let privacy = privacy_from(&a.privacy.unwrap_or_default())?;
        let mut contacts = a.contacts;
        contacts.sort_unstable();
        contacts.dedup();
        Ok(Audience {
            privacy,
            contacts,
            version: a.version,
        })
    }
}

impl TryFrom<v1::StatusReply> for StatusView {
    type Error = Error;

    fn try_from(r: v1::StatusReply) -> Result<StatusView, Error> {
        Ok(StatusView {
            user_id: r.user_id,
            status: status_from_i32(r.status)?,
            last_active_time: r.last_active_time,
            devices: r
                .devices
                .into_iter()
                .map(|d| {
                    Ok(DeviceView {
                        device_id: d.device_id,
                        platform: platform_from_i32(d.platform)?,
                        online_time: d.online_time,
                    })
                })
                .collect::<Result<_, Error>>()?,
            custom_text: r.custom_text,
            manual_status: r.manual_status.map(status_from_i32).transpose()?,
            version: r.version,
            last_seen: recency_from(r.last_seen)?,
        })
    }
}

impl From<BatchEntry> for v1::BatchEntry {
    fn from(e: BatchEntry) -> v1::BatchEntry {
        v1::BatchEntry {
            user_id: e.user_id,
            status: v1::Status::from(e.status) as i32,
            last_active_time: e.last_active_time,
            custom_text: e.custom_text,
            last_seen: recency_to(e.last_seen) as i32,
        }
    }
}

impl TryFrom<v1::BatchEntry> for BatchEntry {
    type Error = Error;

    fn try_from(e: v1::BatchEntry) -> Result<BatchEntry, Error> {
        Ok(BatchEntry {
            user_id: e.user_id,
            status: status_from_i32(e.status)?,
            last_active_time: e.last_active_time,
            custom_text: e.custom_text,
            last_seen: recency_from(e.last_seen)?,
        })
    }
}

/// The settings of a `SetStatus` call, validated again on the shard (never trust the wire).
pub fn settings_from(r: &v1::SetStatusRequest) -> Result<Settings, Error> {
    let manual = r.manual.map(status_from_i32).transpose()?;
    if manual == Some(Status::Offline) {
        return Err(Error::BadRequest(
            "status must be one of ONLINE, BUSY, AWAY, INVISIBLE".into(),
        ));
    }
    let text = r
        .custom_text
        .as_deref()
        .map(presence::validate_custom_text)
        .transpose()?;
    if manual.is_none() && text.is_none() {
        return Err(Error::BadRequest("status or customText is required".into()));
    }
    Ok(Settings {
        manual,
        text,
        expires_at: r.expires_at,
    })
}

/// The wire form of settings.
pub fn settings_to(epoch: u64, user_id: u64, s: &Settings) -> v1::SetStatusRequest {
    v1::SetStatusRequest {
        epoch,
        user_id,
        manual: s.manual.map(|m| v1::Status::from(m) as i32),
        custom_text: s.text.as_ref().map(|t| t.to_string()),
        expires_at: s.expires_at,
    }
}

impl From<Seen> for v1::SeenDevice {
    fn from(s: Seen) -> v1::SeenDevice {
        v1::SeenDevice {
            user_id: s.user,
            device_id: s.device.to_string(),
            seen_ms_ago: s.seen_ago.max(0) as u64,
            active_ms_ago: s.active_ago.max(0) as u64,
        }
    }
}

/// Longest "ago" taken from a peer: a day (anything older has timed out anyway).
const MAX_AGO_MS: u64 = 86_400_000;

impl From<v1::SeenDevice> for Seen {
    fn from(d: v1::SeenDevice) -> Seen {
        Seen {
            user: d.user_id,
            device: d.device_id.into(),
            seen_ago: d.seen_ms_ago.min(MAX_AGO_MS) as i64,
            active_ago: d.active_ms_ago.min(MAX_AGO_MS) as i64,
        }
    }
}

/// An error as one item of a batch reply carries it: the parts of the gRPC status its own call
/// would answer (`error.rs` maps the error to and from that status).
pub fn item_error(e: Error) -> v1::ItemError {
    let status = tonic::Status::from(e);
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    v1::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        metadata,
    }
}

/// The error of one item of a batch reply, rebuilt as from its own call's status.
pub fn error_of_item(item: v1::ItemError) -> Error {
    let mut status = tonic::Status::new(tonic::Code::from(item.code), item.message);
    for (k, v) in item.metadata {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            status.metadata_mut().insert(k, v);
        }
    }
    Error::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_error_rebuilds_the_same_error() {
        for e in [
            Error::BadRequest("deviceId must not be empty".into()),
            Error::TooManyDevices(16),
            Error::StoreUnavailable("redis cluster did not answer in time".into()),
            Error::WrongOwner { epoch: 42 },
            Error::RateLimited(6),
        ] {
            assert_eq!(error_of_item(item_error(e.clone())), e);
        }
    }

    #[test]
    fn views_round_trip() {
        let v = StatusView {
            user_id: 7,
            status: Status::Busy,
            last_active_time: 1_700_000_000_000,
            devices: vec![DeviceView {
                device_id: "d".into(),
                platform: Platform::Android,
                online_time: 1_700_000_000_000,
            }],
            custom_text: Some("会议中".into()),
            manual_status: Some(Status::Busy),
            version: 3,
            last_seen: Some(Some(crate::privacy::Recency::WithinWeek)),
        };
        assert_eq!(
            StatusView::try_from(v1::StatusReply::from(v.clone())).unwrap(),
            v
        );
        let bad = v1::StatusReply {
            status: 99,
            ..Default::default()
        };
        assert!(StatusView::try_from(bad).is_err());
        assert!(platform_from_i32(0).is_err());
        let s = Settings {
            manual: Some(Status::Away),
            text: Some("x".into()),
            expires_at: Some(5),
        };
        assert_eq!(settings_from(&settings_to(1, 2, &s)).unwrap(), s);
        let offline = v1::SetStatusRequest {
            manual: Some(0),
            ..Default::default()
        };
        assert!(settings_from(&offline).is_err());
    }
}
