//! The shard's side of push: one outgoing stream per gateway, and an index of which gateways are
//! interested in which users, so an event goes once to each interested gateway and no Redis
//! round trip is needed to find subscribers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Event, EventSink};
use crate::metrics::Metrics;
use crate::presence::UserId;
use crate::proto::v1;

/// What goes down a gateway stream.
pub type StreamItem = Result<v1::Event, tonic::Status>;

struct Stream {
    gateway: String,
    tx: mpsc::Sender<StreamItem>,
    interest: HashSet<UserId>,
    /// Cancelled when the stream is cut off: its gateway sees the stream end and reconnects.
    cut: CancellationToken,
}

/// One gateway stream, as [`Fanout::open`] hands it out.
pub struct Opened {
    pub id: u64,
    pub rx: mpsc::Receiver<StreamItem>,
    pub tx: mpsc::Sender<StreamItem>,
    /// Fires when the shard cuts the stream off (too slow, or shutting down).
    pub cut: CancellationToken,
}

#[derive(Default)]
struct State {
    next_id: u64,
    streams: HashMap<u64, Stream>,
    index: HashMap<UserId, SmallVec<[u64; 2]>>,
}

/// The gateway streams of one shard.
pub struct Fanout {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    queue: usize,
}

/// The wire form of an event.
pub fn to_wire(e: &Event) -> v1::Event {
    v1::Event {
        presence: Some(e.view.clone().into()),
        changed_at: e.changed_at,
        subscriptions_changed: e.subscriptions.is_some(),
        subscriptions: e.subscriptions.clone().unwrap_or_default(),
        snapshot: e.snapshot,
        public: e.public.clone().map(Into::into),
        audience: e.audience.as_deref().map(Into::into),
    }
}

impl Fanout {
    pub fn new(metrics: Arc<Metrics>, queue: usize) -> Arc<Fanout> {
        Arc::new(Fanout {
            state: Mutex::default(),
            metrics,
            queue: queue.max(16),
        })
    }

    /// A new gateway stream.
    pub fn open(&self, gateway: &str) -> Opened {
        let (tx, rx) = mpsc::channel(self.queue);
        let cut = CancellationToken::new();
        let mut st = self.state.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.streams.insert(
            id,
            Stream {
                gateway: gateway.to_owned(),
                tx: tx.clone(),
                interest: HashSet::new(),
                cut: cut.clone(),
            },
        );
        self.metrics.push.event_streams.set(st.streams.len() as i64);
        tracing::info!(gateway, stream = id, "gateway stream opened");
        Opened { id, rx, tx, cut }
    }

    /// The users some gateway is interested in, among `partitions`.
    pub fn interested_in(&self, partitions: &HashSet<u32>) -> Vec<UserId> {
        self.state
            .lock()
            .index
            .keys()
            .copied()
            .filter(|u| partitions.contains(&crate::ring::partition_of(*u)))
            .collect()
    }

    /// Cuts every stream off (the shard is shutting down): gateways reconnect elsewhere.
    pub fn close_all(&self) {
        let ids: Vec<u64> = self.state.lock().streams.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    /// Adds and removes interest of a stream.
    pub fn interest(&self, id: u64, add: &[UserId], remove: &[UserId]) {
        let mut st = self.state.lock();
        let State { streams, index, .. } = &mut *st;
        let Some(s) = streams.get_mut(&id) else {
            return;
        };
        for &u in add {
            if s.interest.insert(u) {
                index.entry(u).or_default().push(id);
            }
        }
        for &u in remove {
            if s.interest.remove(&u) {
                drop_from_index(index, u, id);
            }
        }
    }

    /// The stream is gone (the gateway left, or was too slow).
    pub fn close(&self, id: u64) {
        let mut st = self.state.lock();
        let State { streams, index, .. } = &mut *st;
        if let Some(s) = streams.remove(&id) {
            s.cut.cancel();
            for u in s.interest {
                drop_from_index(index, u, id);
            }
            tracing::info!(gateway = %s.gateway, stream = id, "gateway stream closed");
        }
        self.metrics.push.event_streams.set(streams.len() as i64);
    }
}

fn drop_from_index(index: &mut HashMap<UserId, SmallVec<[u64; 2]>>, u: UserId, id: u64) {
    if let Some(ids) = index.get_mut(&u) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            index.remove(&u);
        }
    }
}

impl EventSink for Fanout {
    fn wants(&self, user: UserId) -> bool {
        self.state.lock().index.contains_key(&user)
    }

    fn publish(&self, event: Event) {
        let user = event.view.user_id;
        let wire = to_wire(&event);
        let mut slow = Vec::new();
        {
            let st = self.state.lock();
            let Some(ids) = st.index.get(&user) else {
                return;
            };
            for id in ids {
                let Some(s) = st.streams.get(id) else {
                    continue;
                };
                match s.tx.try_send(Ok(wire.clone())) {
                    Ok(()) => self.metrics.push.events_published.inc(),
                    Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        // A gateway that cannot keep up is cut off; it reconnects and declares its interest
        // again, which sends it the current state of every user it cares about.
        for id in slow {
            self.metrics.push.slow_consumers.inc();
            tracing::warn!(stream = id, "gateway stream too slow, closing it");
            self.close(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Status, StatusView};

    fn ev(user: UserId, version: u64) -> Event {
        Event {
            view: StatusView {
                user_id: user,
                status: Status::Online,
                last_active_time: 0,
                devices: Vec::new(),
                custom_text: None,
                manual_status: None,
                version,
                last_seen: None,
            },
            ..Event::new(StatusView::offline(user, 0, 0), 1)
        }
    }

    #[tokio::test]
    async fn one_event_per_interested_gateway() {
        let f = Fanout::new(Arc::new(Metrics::new()), 16);
        let Opened {
            id: g1, rx: mut r1, ..
        } = f.open("g1");
        let Opened {
            id: g2, rx: mut r2, ..
        } = f.open("g2");
        f.interest(g1, &[7, 8], &[]);
        f.interest(g2, &[7], &[]);
        assert!(f.wants(8) && !f.wants(9));
        f.publish(ev(7, 1));
        f.publish(ev(8, 1));
        assert_eq!(r1.try_recv().unwrap().unwrap().presence.unwrap().user_id, 7);
        assert_eq!(r1.try_recv().unwrap().unwrap().presence.unwrap().user_id, 8);
        assert_eq!(r2.try_recv().unwrap().unwrap().presence.unwrap().user_id, 7);
        assert!(r2.try_recv().is_err());
        f.interest(g1, &[], &[8]);
        assert!(!f.wants(8));
        f.close(g2);
        f.close(g1);
        assert!(!f.wants(7));
    }

    #[tokio::test]
    async fn a_slow_gateway_is_cut_off_and_its_stream_says_so() {
        let f = Fanout::new(Arc::new(Metrics::new()), 16);
        let g = f.open("slow");
        f.interest(g.id, &[7], &[]);
        for v in 0..17 {
            f.publish(ev(7, v));
        }
        // The queue overflowed: the stream is cut (the gRPC side ends it with an error, so
        // the gateway reconnects), and the shard no longer counts the gateway as interested.
        assert!(g.cut.is_cancelled());
        assert!(!f.wants(7));
        let other = f.open("other");
        f.close_all();
        assert!(other.cut.is_cancelled());
    }
}
