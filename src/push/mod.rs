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

use std::borrow::Cow;
use std::sync::Arc;

use crate::presence::{Millis, Sight, StatusView, UserId, Viewer};
use crate::privacy::Audience;

pub mod fanout;
pub mod hub;

/// A visible change of one user's presence, or of the user's subscription list (then `view`
/// only names the user and is not shown to anyone: gateways holding the user's sockets update
/// what they listen to).
///
/// `view` is the truth, which only the user's own sockets get. Others get `public` (when set:
/// the user is INVISIBLE or shows its last-seen time coarsely), or the OFFLINE view when the
/// `audience` hides the user from them ([`Event::view_for`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub view: StatusView,
    /// What those who may see the user see, when it is not `view`.
    pub public: Option<StatusView>,
    /// Who may see the user; `None`: everyone.
    pub audience: Option<Arc<Audience>>,
    /// When the change happened (Unix ms).
    pub changed_at: Millis,
    pub subscriptions: Option<Vec<UserId>>,
    /// The current state sent when a gateway declares interest, not a change: it only catches
    /// up sockets that were already sent an older state of the user.
    pub snapshot: bool,
}

impl Event {
    /// A change everyone may see as it is.
    pub fn new(view: StatusView, changed_at: Millis) -> Event {
        Event {
            view,
            public: None,
            audience: None,
            changed_at,
            subscriptions: None,
            snapshot: false,
        }
    }

    /// A change of `user`'s subscription list.
    pub fn subscriptions(user: UserId, list: Vec<UserId>, changed_at: Millis) -> Event {
        Event {
            subscriptions: Some(list),
            ..Event::new(StatusView::offline(user, 0, 0), changed_at)
        }
    }

    /// What `viewer` (a user with a socket) gets to see of this change.
    pub fn sight(&self, viewer: UserId) -> Sight {
        let user = self.view.user_id;
        match &self.audience {
            _ if viewer == user => Sight::Truth,
            Some(a) => a.sight(user, Viewer::User(viewer)),
            None => Sight::Public,
        }
    }

    /// The view a viewer with `sight` gets.
    pub fn view_as(&self, sight: Sight) -> Cow<'_, StatusView> {
        match sight {
            Sight::Truth => Cow::Borrowed(&self.view),
            Sight::Public => Cow::Borrowed(self.public.as_ref().unwrap_or(&self.view)),
            Sight::Hidden => Cow::Owned(StatusView::hidden(
                self.view.user_id,
                self.audience.as_ref().map_or(0, |a| a.version),
            )),
        }
    }
}

/// Where a shard sends events.
pub trait EventSink: Send + Sync + 'static {
    /// Whether anyone listens to `user` (checked before building an event).
    fn wants(&self, user: UserId) -> bool;
    fn publish(&self, event: Event);
}
