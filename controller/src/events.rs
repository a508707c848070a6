//! Events: every failure detected, decision taken and action completed.
//!
//! An event is logged as one structured `tracing` line (target `eac::event`, fields `kind`,
//! `host`, `guest`, `peer`, and the detail as the message) at the level its kind calls for,
//! broadcast to API followers (`eac events --follow`), and kept in a bounded history (the
//! last [`HISTORY`] events) for `eac events`. The types are `eac-api`'s.

use std::{collections::VecDeque, sync::Mutex};

use tokio::sync::broadcast;

pub use eac_api::controller::events::{Event, EventKind, now_ms};

/// How many past events [`EventBus::recent`] keeps.
pub const HISTORY: usize = 1000;
/// Capacity of the broadcast channel; a follower further behind sees a "lagged" gap.
const CHANNEL: usize = 1024;

/// Logs, broadcasts and remembers this host's events. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EventBus {
    host: String,
    tx: broadcast::Sender<Event>,
    history: Mutex<VecDeque<Event>>,
}

impl EventBus {
    /// A bus for events seen by `host`.
    pub fn new(host: impl Into<String>) -> Self {
        let (tx, _) = broadcast::channel(CHANNEL);
        Self {
            host: host.into(),
            tx,
            history: Mutex::new(VecDeque::with_capacity(64)),
        }
    }

    /// Records an event seen by this host now: logs it, broadcasts it, keeps it. Returns it.
    pub fn emit(&self, kind: EventKind, guest: Option<&str>, peer: Option<&str>, detail: impl Into<String>) -> Event {
        let e = Event {
            ts_ms: now_ms(),
            host: self.host.clone(),
            kind,
            guest: guest.map(str::to_owned),
            peer: peer.map(str::to_owned),
            detail: detail.into(),
        };
        self.publish(e.clone());
        e
    }

    /// Records a ready-made event (e.g. one relayed from a peer) as [`EventBus::emit`] does.
    pub fn publish(&self, e: Event) {
        log_event(&e);
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(e.clone());
        }
        // No follower is not an error.
        let _ = self.tx.send(e);
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The last `limit` events (at most [`HISTORY`]), oldest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let skip = h.len().saturating_sub(limit);
        h.iter().skip(skip).cloned().collect()
    }

    /// The host name events are stamped with.
    pub fn host(&self) -> &str {
        &self.host
    }
}

fn log_event(e: &Event) {
    let guest = e.guest.as_deref().unwrap_or("");
    let peer = e.peer.as_deref().unwrap_or("");
    let kind = e.kind.as_str();
    // tracing's level must be a constant per call site.
    match e.kind.level() {
        tracing::Level::ERROR => {
            tracing::error!(target: "eac::event", kind, host = %e.host, guest, peer, ts_ms = e.ts_ms, "{}", e.detail)
        }
        tracing::Level::WARN => {
            tracing::warn!(target: "eac::event", kind, host = %e.host, guest, peer, ts_ms = e.ts_ms, "{}", e.detail)
        }
        _ => tracing::info!(target: "eac::event", kind, host = %e.host, guest, peer, ts_ms = e.ts_ms, "{}", e.detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_in_snake_case_and_unknown_kinds_survive() {
        let e = Event {
            ts_ms: 1,
            host: "a".into(),
            kind: EventKind::PeerDead,
            guest: None,
            peer: Some("b".into()),
            detail: "silent on mgmt, al1 and the state-file for 3.0 s".into(),
        };
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(
            j,
            r#"{"ts_ms":1,"host":"a","kind":"peer_dead","peer":"b","detail":"silent on mgmt, al1 and the state-file for 3.0 s"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&j).unwrap(), e);
        let newer = j.replace("peer_dead", "peer_teleported");
        assert_eq!(serde_json::from_str::<Event>(&newer).unwrap().kind, EventKind::Unknown);
        for k in [
            EventKind::GuestRestartFailed,
            EventKind::StateFileOk,
            EventKind::RedundancyLost,
            EventKind::StateFileMissing,
            EventKind::StateFileNotRegular,
            EventKind::StateFileUnusable,
            EventKind::StateFileReplaced,
            EventKind::StateFileHealed,
            EventKind::StateFileSlotCorrupt,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[tokio::test]
    async fn the_bus_broadcasts_and_keeps_a_bounded_history() {
        let bus = EventBus::new("a");
        let mut rx = bus.subscribe();
        let e = bus.emit(EventKind::ChannelDown, None, Some("b"), "al1 silent for 1.0 s");
        assert_eq!(e.host, "a");
        assert!(e.ts_ms > 1_600_000_000_000);
        assert_eq!(rx.recv().await.unwrap(), e);
        for i in 0..HISTORY + 5 {
            bus.emit(EventKind::GuestStarted, Some(&format!("g{i}")), None, "started");
        }
        let all = bus.recent(usize::MAX);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].guest.as_deref(), Some("g5"));
        let last = bus.recent(2);
        assert_eq!(last.len(), 2);
        assert_eq!(last[1].guest.as_deref(), Some(&*format!("g{}", HISTORY + 4)));
    }
}
