//! Real-time push: presence events from the shard that owns a user to the WebSocket of every
//! subscriber, whichever gateway it is on.
//!
//! - [`hub::Hub`] (gateway): connected sockets, their users' subscriptions, the set of targets
//!   this gateway is interested in, and the fan-out of each event to local sockets.
//! - [`fanout::Fanout`] (shard): one stream per gateway; sends each event once per interested
//!   gateway.
//!
//! The gateway's `Events` streams to the shards are transport, in
//! [`crate::peer::upstream`].
//!
//! In the one-process role (`all`) the shard's sink is the hub itself.

use crate::presence::{Millis, StatusView, UserId};

pub mod fanout;
pub mod hub;

/// A visible change of one user's presence, or of the user's subscription list (then `view`
/// only names the user and is not shown to anyone: gateways holding the user's sockets update
/// what they listen to).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub view: StatusView,
    /// When the change happened (Unix ms).
    pub changed_at: Millis,
    pub subscriptions: Option<Vec<UserId>>,
    /// The current state sent when a gateway declares interest, not a change: it only catches
    /// up sockets that were already sent an older state of the user.
    pub snapshot: bool,
}

/// Where a shard sends events.
pub trait EventSink: Send + Sync + 'static {
    /// Whether anyone listens to `user` (checked before building an event).
    fn wants(&self, user: UserId) -> bool;
    fn publish(&self, event: Event);
}
