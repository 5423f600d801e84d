//! The gateway's side of push across the cluster: one `Events` stream per shard, opened once and
//! reopened after a failure; each shard is told which of its users this gateway is interested in,
//! again in full after a reconnect, and interest moves with the ring.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use super::client::Clients;
use crate::metrics::Metrics;
use crate::presence::{StatusView, UserId};
use crate::privacy::Audience;
use crate::proto::v1;
use crate::push::hub::{Hub, InterestDelta};
use crate::push::Event;
use crate::ring::Ring;

/// Most user ids in one interest message.
const CHUNK: usize = 10_000;

/// A stream that carried nothing, not even a ping, for this long is dead: reopen it.
const STREAM_IDLE: Duration = Duration::from_secs(3 * super::server::PING.as_secs());

struct Link {
    targets: Mutex<HashSet<UserId>>,
    tx: Mutex<Option<mpsc::UnboundedSender<v1::Interest>>>,
    cancel: CancellationToken,
}

impl Link {
    fn change(&self, gateway: &str, add: Vec<UserId>, remove: Vec<UserId>) {
        let mut targets = self.targets.lock();
        for t in &add {
            targets.insert(*t);
        }
        for t in &remove {
            targets.remove(t);
        }
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(v1::Interest {
                gateway: gateway.to_owned(),
                add,
                remove,
            });
        }
    }
}

/// The shard streams of one gateway.
pub struct Upstreams {
    gateway: String,
    hub: Arc<Hub>,
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Where each target's interest was declared.
    placed: Mutex<HashMap<UserId, String>>,
}

impl Upstreams {
    pub fn new(
        gateway: String,
        hub: Arc<Hub>,
        clients: Arc<Clients>,
        metrics: Arc<Metrics>,
    ) -> Arc<Upstreams> {
        Arc::new(Upstreams {
            gateway,
            hub,
            clients,
            metrics,
            links: Mutex::new(HashMap::new()),
            placed: Mutex::new(HashMap::new()),
        })
    }

    /// Runs until `cancel`: follows the ring and the hub's interest.
    pub async fn run(
        self: Arc<Self>,
        mut ring: watch::Receiver<Arc<Ring>>,
        mut deltas: mpsc::UnboundedReceiver<InterestDelta>,
        cancel: CancellationToken,
    ) {
        let mut current = ring.borrow_and_update().clone();
        self.sync_links(&current, &cancel);
        self.place(&current, self.hub.interest(), Vec::new());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = ring.changed() => {
                    if r.is_err() { break }
                    current = ring.borrow_and_update().clone();
                    self.sync_links(&current, &cancel);
                    self.place(&current, self.hub.interest(), Vec::new());
                }
                d = deltas.recv() => {
                    let Some(d) = d else { break };
                    self.place(&current, d.add, d.remove);
                }
            }
        }
        for (_, l) in self.links.lock().drain() {
            l.cancel.cancel();
        }
    }

    /// Declares `add` at their owners (moving any whose owner changed) and withdraws `remove`.
    fn place(&self, ring: &Ring, add: Vec<UserId>, remove: Vec<UserId>) {
        let mut per: HashMap<String, (Vec<UserId>, Vec<UserId>)> = HashMap::new();
        {
            let mut placed = self.placed.lock();
            for t in add {
                let Some(owner) = ring.owner_of(t) else {
                    continue;
                };
                match placed.get(&t) {
                    Some(o) if o == owner => continue,
                    Some(o) => per.entry(o.clone()).or_default().1.push(t),
                    None => {}
                }
                per.entry(owner.to_owned()).or_default().0.push(t);
                placed.insert(t, owner.to_owned());
            }
            for t in remove {
                if let Some(o) = placed.remove(&t) {
                    per.entry(o).or_default().1.push(t);
                }
            }
        }
        let links = self.links.lock();
        for (shard, (add, remove)) in per {
            if let Some(link) = links.get(&shard) {
                link.change(&self.gateway, add, remove);
            }
        }
    }

    /// One link per ring member; links of members that left are closed.
    fn sync_links(self: &Arc<Self>, ring: &Ring, cancel: &CancellationToken) {
        let mut links = self.links.lock();
        links.retain(|addr, l| {
            let keep = ring.members().contains(addr);
            if !keep {
                l.cancel.cancel();
            }
            keep
        });
        for m in ring.members() {
            if links.contains_key(m) {
                continue;
            }
            let link = Arc::new(Link {
                targets: Mutex::new(HashSet::new()),
                tx: Mutex::new(None),
                cancel: cancel.child_token(),
            });
            links.insert(m.clone(), link.clone());
            tokio::spawn(self.clone().stream(m.clone(), link));
        }
        // Targets placed on members that left are placed again by the caller.
        let members: HashSet<&String> = ring.members().iter().collect();
        self.placed.lock().retain(|_, o| members.contains(o));
    }

    /// Keeps one `Events` stream to `shard` open until the link is cancelled.
    async fn stream(self: Arc<Self>, shard: String, link: Arc<Link>) {
        let mut backoff = Duration::from_millis(100);
        while !link.cancel.is_cancelled() {
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let targets = link.targets.lock();
                let all: Vec<UserId> = targets.iter().copied().collect();
                for chunk in all.chunks(CHUNK) {
                    let _ = tx.send(v1::Interest {
                        gateway: self.gateway.clone(),
                        add: chunk.to_vec(),
                        remove: Vec::new(),
                    });
                }
                if all.is_empty() {
                    let _ = tx.send(v1::Interest {
                        gateway: self.gateway.clone(),
                        add: Vec::new(),
                        remove: Vec::new(),
                    });
                }
                *link.tx.lock() = Some(tx);
            }
            let opened = match self.clients.get(&shard) {
                Ok(mut c) => c.events(UnboundedReceiverStream::new(rx)).await,
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match opened {
                Ok(resp) => {
                    self.metrics.push.event_streams.inc();
                    tracing::info!(shard = %shard, "event stream open");
                    let mut inbound = resp.into_inner();
                    let mut last = tokio::time::Instant::now();
                    loop {
                        tokio::select! {
                            _ = link.cancel.cancelled() => break,
                            _ = tokio::time::sleep_until(last + STREAM_IDLE) => {
                                self.metrics.push.stream_restarts.inc();
                                tracing::warn!(shard = %shard, idle = ?STREAM_IDLE, "event stream silent, reopening it");
                                break;
                            }
                            m = inbound.message() => match m {
                                Ok(Some(ev)) => {
                                    last = tokio::time::Instant::now();
                                    backoff = Duration::from_millis(100);
                                    if let Some(e) = from_wire(ev) {
                                        self.hub.deliver(&e);
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    self.metrics.push.stream_restarts.inc();
                                    tracing::info!(shard = %shard, error = %e, "event stream ended, reopening it");
                                    break;
                                }
                            }
                        }
                    }
                    self.metrics.push.event_streams.dec();
                }
                Err(e) => tracing::debug!(shard = %shard, error = %e, "cannot open event stream"),
            }
            *link.tx.lock() = None;
            tokio::select! {
                _ = link.cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// An event from the wire; malformed ones are dropped.
pub fn from_wire(e: v1::Event) -> Option<Event> {
    let view = StatusView::try_from(e.presence?).ok()?;
    let public = match e.public {
        Some(p) => Some(StatusView::try_from(p).ok()?),
        None => None,
    };
    let audience = match e.audience {
        Some(a) => Some(std::sync::Arc::new(Audience::try_from(a).ok()?)),
        None => None,
    };
    let subscriptions = e.subscriptions_changed.then_some(e.subscriptions);
    Some(Event {
        view,
        public,
        audience,
        changed_at: e.changed_at,
        subscriptions,
        snapshot: e.snapshot,
    })
}
