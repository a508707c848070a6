//! Where a protected guest runs: the pool's record follows what libvirt reports.
//!
//! The pool configuration names each protected guest's `home` (the host that runs it); the
//! survivors of a host death restart the guests that ran there. A record that disagrees with
//! reality loses protection silently: a guest whose record says "b" while it runs on "a" is not
//! restarted when "a" dies. So every host compares, for each protected guest, what its own
//! libvirt reports with the record, and corrects the record for the guests it runs (each
//! host speaks only for itself, so the hosts never contradict each other).
//!
//! Sans-I/O: [`Reconciler::decide`] gets a snapshot and returns what to do; the daemon does it
//! (a pool change, a destroy) and reports it.
//!
//! The rules, for each protected guest `g` active here:
//! - the record says another host, and no live peer reports running `g` → **record** that it
//!   runs here (a restart whose record was lost, a migration done outside eac, a failover
//!   that was refused while the record already moved);
//! - a live peer reports running `g` too: two copies. Right after this host was not
//!   scheduled for longer than the dead timeout (its peers may have declared it dead and
//!   restarted its guests), the copy the record does *not* place here **yields** (destroyed
//!   here: the pool chose the peer's copy). Otherwise it is **reported** once per episode
//!   (an incoming live migration is active on both hosts for a while; not ours to stop);
//! - the record says here: nothing to do.
//!
//! A peer's slot lists the guests it runs *or is starting*, so the daemon confirms a duplicate
//! with the peer's own libvirt answer before it reports or yields (and calls
//! [`Reconciler::not_duplicate`] when the peer says no).
//!
//! Nothing is decided while this host fences, while its configuration is older than a live
//! peer's (it would correct a stale record), or for a guest this host is starting.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What the daemon knows, at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub me: String,
    /// Protected guests → the host the pool record places them on (their home).
    pub homes: BTreeMap<String, String>,
    /// Guests libvirt reports active (running or paused) here.
    pub active_here: BTreeSet<String>,
    /// Guests this host is starting right now.
    pub starting: BTreeSet<String>,
    /// Live (not dead) peers → the guests they report running (their state-file slot).
    pub live_peers_running: BTreeMap<String, BTreeSet<String>>,
    /// This host's configuration epoch is at least every live peer's.
    pub config_current: bool,
    /// This host is not fencing and not fenced.
    pub normal: bool,
    /// This host's controller was not scheduled for longer than the dead timeout recently:
    /// its peers may have declared it dead.
    pub after_stall: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record that `guest` runs here (the record said `was`).
    Record { guest: String, was: String },
    /// Destroy this host's copy of `guest`: `peer` runs it and the record places it there.
    Yield { guest: String, peer: String },
    /// `guest` is active here and on `peers` (reported once per episode).
    Duplicate { guest: String, peers: Vec<String> },
    /// A duplicate reported earlier is over.
    DuplicateOver { guest: String },
}

/// Keeps the per-guest episodes (a duplicate is reported once; a yield needs the conflict
/// to persist, so one stale slot never destroys a guest).
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Guest → when the duplicate was first seen.
    duplicates: BTreeMap<String, Instant>,
    reported: BTreeSet<String>,
}

/// How long two copies must be seen before this host yields its own.
pub const YIELD_CONFIRM: Duration = Duration::from_millis(1000);
/// How long two copies must be seen before they are reported: a peer's slot lists the guests
/// it is *starting* too, and a refused start is retried for up to a second after contact.
pub const DUPLICATE_CONFIRM: Duration = Duration::from_secs(3);

impl Reconciler {
    /// The peers' own answer (libvirt there) says `guest` is not active on them: the slot
    /// listed it only because they were starting it. Its duplicate episode starts over.
    pub fn not_duplicate(&mut self, guest: &str) {
        self.duplicates.remove(guest);
        self.reported.remove(guest);
    }

    pub fn decide(&mut self, now: Instant, s: &Snapshot) -> Vec<Action> {
        let mut out = Vec::new();
        let mut seen_dup = BTreeSet::new();
        if !s.normal || !s.config_current {
            return out;
        }
        for (guest, home) in &s.homes {
            if !s.active_here.contains(guest) || s.starting.contains(guest) {
                continue;
            }
            let peers: Vec<String> = s
                .live_peers_running
                .iter()
                .filter(|(_, r)| r.contains(guest))
                .map(|(p, _)| p.clone())
                .collect();
            if peers.is_empty() {
                if home != &s.me {
                    out.push(Action::Record {
                        guest: guest.clone(),
                        was: home.clone(),
                    });
                }
                continue;
            }
            seen_dup.insert(guest.clone());
            let since = *self.duplicates.entry(guest.clone()).or_insert(now);
            if s.after_stall
                && home != &s.me
                && peers.contains(home)
                && now.saturating_duration_since(since) >= YIELD_CONFIRM
            {
                out.push(Action::Yield {
                    guest: guest.clone(),
                    peer: home.clone(),
                });
            } else if now.saturating_duration_since(since) >= DUPLICATE_CONFIRM && self.reported.insert(guest.clone()) {
                out.push(Action::Duplicate {
                    guest: guest.clone(),
                    peers,
                });
            }
        }
        self.duplicates.retain(|g, _| seen_dup.contains(g));
        let over: Vec<String> = self
            .reported
            .iter()
            .filter(|g| !seen_dup.contains(*g))
            .cloned()
            .collect();
        for g in over {
            self.reported.remove(&g);
            out.push(Action::DuplicateOver { guest: g });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(me: &str) -> Snapshot {
        Snapshot {
            me: me.into(),
            config_current: true,
            normal: true,
            ..Default::default()
        }
    }

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_guest_running_here_but_recorded_elsewhere_is_recorded_here() {
        let mut s = snap("a");
        s.homes.insert("g1".into(), "b".into());
        s.active_here = set(&["g1"]);
        s.live_peers_running.insert("b".into(), set(&[]));
        let mut r = Reconciler::default();
        assert_eq!(
            r.decide(Instant::now(), &s),
            vec![Action::Record {
                guest: "g1".into(),
                was: "b".into()
            }]
        );
    }

    #[test]
    fn nothing_is_decided_on_a_stale_configuration_or_while_fencing() {
        let mut s = snap("a");
        s.homes.insert("g1".into(), "b".into());
        s.active_here = set(&["g1"]);
        let mut r = Reconciler::default();
        s.config_current = false;
        assert!(r.decide(Instant::now(), &s).is_empty());
        s.config_current = true;
        s.normal = false;
        assert!(r.decide(Instant::now(), &s).is_empty());
        s.normal = true;
        s.starting = set(&["g1"]);
        assert!(
            r.decide(Instant::now(), &s).is_empty(),
            "a guest being started is left alone"
        );
    }

    #[test]
    fn a_guest_at_home_or_not_running_here_needs_nothing() {
        let mut s = snap("a");
        s.homes.insert("g1".into(), "a".into());
        s.homes.insert("g2".into(), "b".into());
        s.active_here = set(&["g1"]);
        let mut r = Reconciler::default();
        assert!(r.decide(Instant::now(), &s).is_empty());
    }

    #[test]
    fn two_copies_are_reported_once_and_not_destroyed_without_a_stall() {
        let t0 = Instant::now();
        let mut s = snap("a");
        s.homes.insert("g1".into(), "b".into());
        s.active_here = set(&["g1"]);
        s.live_peers_running.insert("b".into(), set(&["g1"]));
        let mut r = Reconciler::default();
        assert!(
            r.decide(t0, &s).is_empty(),
            "not at first sight (a peer's start being retried)"
        );
        assert_eq!(
            r.decide(t0 + DUPLICATE_CONFIRM, &s),
            vec![Action::Duplicate {
                guest: "g1".into(),
                peers: vec!["b".into()]
            }]
        );
        assert!(r.decide(t0 + Duration::from_secs(5), &s).is_empty(), "reported once");
        s.live_peers_running.insert("b".into(), set(&[]));
        // b stopped its copy (a migration finished): the episode ends, and the record follows.
        let out = r.decide(t0 + Duration::from_secs(6), &s);
        assert!(out.contains(&Action::DuplicateOver { guest: "g1".into() }), "{out:?}");
        assert!(out.contains(&Action::Record {
            guest: "g1".into(),
            was: "b".into()
        }));
    }

    #[test]
    fn after_a_stall_the_copy_the_record_does_not_place_here_yields_once_confirmed() {
        let t0 = Instant::now();
        let mut s = snap("a");
        s.after_stall = true;
        s.homes.insert("g1".into(), "b".into());
        s.active_here = set(&["g1"]);
        s.live_peers_running.insert("b".into(), set(&["g1"]));
        let mut r = Reconciler::default();
        // First sight: not yet (one stale slot must not destroy a guest).
        let first = r.decide(t0, &s);
        assert!(!first.iter().any(|a| matches!(a, Action::Yield { .. })), "{first:?}");
        let later = r.decide(t0 + YIELD_CONFIRM, &s);
        assert_eq!(
            later,
            vec![Action::Yield {
                guest: "g1".into(),
                peer: "b".into()
            }]
        );
    }

    #[test]
    fn a_duplicate_the_peer_denies_starts_over() {
        let t0 = Instant::now();
        let mut s = snap("a");
        s.after_stall = true;
        s.homes.insert("g1".into(), "b".into());
        s.active_here = set(&["g1"]);
        s.live_peers_running.insert("b".into(), set(&["g1"]));
        let mut r = Reconciler::default();
        r.decide(t0, &s);
        assert!(matches!(r.decide(t0 + YIELD_CONFIRM, &s)[..], [Action::Yield { .. }]));
        r.not_duplicate("g1");
        // The episode starts over: no yield at once.
        assert!(r.decide(t0 + YIELD_CONFIRM * 2, &s).is_empty());
    }

    #[test]
    fn after_a_stall_the_copy_the_record_places_here_stays() {
        let t0 = Instant::now();
        let mut s = snap("a");
        s.after_stall = true;
        s.homes.insert("g1".into(), "a".into());
        s.active_here = set(&["g1"]);
        // b is (still) trying to start it: its slot lists it.
        s.live_peers_running.insert("b".into(), set(&["g1"]));
        let mut r = Reconciler::default();
        for i in 0..5 {
            let out = r.decide(t0 + Duration::from_secs(i), &s);
            assert!(!out.iter().any(|a| matches!(a, Action::Yield { .. })), "{out:?}");
        }
    }

    #[test]
    fn a_copy_reported_by_a_peer_the_record_does_not_name_does_not_make_us_yield() {
        let t0 = Instant::now();
        let mut s = snap("a");
        s.after_stall = true;
        s.homes.insert("g1".into(), "c".into());
        s.active_here = set(&["g1"]);
        s.live_peers_running.insert("b".into(), set(&["g1"]));
        let mut r = Reconciler::default();
        r.decide(t0, &s);
        let out = r.decide(t0 + Duration::from_secs(2), &s);
        assert!(!out.iter().any(|a| matches!(a, Action::Yield { .. })), "{out:?}");
    }
}
