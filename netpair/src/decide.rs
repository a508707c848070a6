//! The joint path decision: when does a guest's traffic go through the partner's NIC?
//!
//! Pure logic over explicit times (milliseconds on a monotonic clock), so every timeline is
//! a unit test. The daemon feeds it what it knows — our carrier, when our last path probe
//! was answered, the partner's latest observation and when it arrived — and applies the
//! changes it returns.
//!
//! Rules (docs/architecture.md, "netpair"):
//! - Our path is **bad** on carrier loss, or when no probe reply came for `probe_loss` ms
//!   of our own running time: a stall of our loop ([`crate::stall`]; we sent no probes) is
//!   no evidence and is not counted, so after a stall the path is re-observed first. The
//!   daemon reads every reply and pairing message already queued before it judges.
//! - A local guest is steered through the partner only when our path is bad **and** the
//!   partner's evidence agrees: its observation is fresh (it reached us over an AL within
//!   `peer_timeout`), it has carrier and its own probes are answered. Losing the ALs alone
//!   therefore never moves traffic: it only makes the partner's evidence stale.
//! - Nothing is steered into availability links that do not work: with no link judged
//!   working ([`crate::links`]) the partner's path counts as unusable.
//! - Traffic returns once our path has been good for `heal_hold` ms (hysteresis against a
//!   flapping link) and is not suppressed by flap damping, or at once if the partner's path
//!   fails or falls silent while ours works. While ours is bad, a partner that falls silent
//!   keeps the traffic as long as an AL works: its pinned programs carry it on while its
//!   daemon restarts, and our own path is known bad; no working AL stops steering.
//! - A local guest is **cut off** while our path is bad and the partner cannot carry it
//!   (no working AL, its path bad, or silent — when we still steer through a silent partner
//!   the reason says so): one state and one event when it starts ([`GuestEvent::CutOff`])
//!   and ends.
//! - A new daemon that adopted steering from its predecessor's pinned data path
//!   ([`Judge::adopt_steering`]) undoes none of it until the partner speaks or
//!   `peer_timeout` has passed.
//! - Flap damping ([`crate::damping`]): every failure of our path after it had worked for
//!   `heal_hold` ms (it was trusted, traffic would have come back: one full flap) adds a
//!   penalty; a path that flaps is suppressed — not trusted, traffic stays on the partner —
//!   until the penalty decays. A failure during the heal hold only restarts the hold, except
//!   while suppressed (then every failure adds penalty). Damping never delays moving away
//!   from a failing path, nor returning when the partner's path fails or goes silent.
//! - We lend our NIC to a partner's guest exactly while the partner's fresh observation asks
//!   for it (after a start, adopted lending waits for the partner's first word as above).

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    Mac, Role,
    config::Timing,
    damping::{DampEvent, Damping, DampingConfig},
    stall::Stall,
};

/// At most this many stalls are remembered (only those since the last probe reply matter).
const STALLS_KEPT: usize = 64;

/// What the partner told us in its latest observation, and when it arrived.
#[derive(Clone, Debug, Default)]
pub struct PartnerView {
    pub received_ms: u64,
    pub carrier: bool,
    pub probe_ok: bool,
    /// Guests the partner runs and asks us to lend our NIC to.
    pub requests: BTreeSet<Mac>,
}

/// Everything the judge looks at, at one moment.
#[derive(Clone, Debug)]
pub struct Evidence {
    pub now_ms: u64,
    pub own_carrier: bool,
    /// When our last probe reply arrived (None: never). Ignored when no probe targets exist.
    pub own_last_probe_reply_ms: Option<u64>,
    pub partner: Option<PartnerView>,
    /// Some availability link is judged to work ([`crate::links::Links::usable`]): steered
    /// frames have a way to the partner.
    pub al_usable: bool,
}

/// A decision to apply: steer (or stop steering) one guest, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub mac: Mac,
    pub role: Role,
    pub steer: bool,
    pub why: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GuestDecision {
    pub role: Role,
    pub steering: bool,
    pub since_ms: u64,
    pub why: String,
    /// A local guest that no path carries: ours is bad and the partner cannot carry it.
    pub cut_off: Option<CutOff>,
}

/// Since when, and why, a local guest is cut off.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CutOff {
    pub since_ms: u64,
    pub why: String,
}

/// A guest's cut-off state changed; the daemon reports each as an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// Our application path is bad and the partner cannot carry the guest (no working
    /// availability link, the partner silent, or its path bad too): nothing carries it.
    CutOff { mac: Mac, why: String },
    /// Carried again, after `after_ms` cut off: `how` says by which path.
    Restored { mac: Mac, after_ms: u64, how: String },
}

#[derive(Debug)]
pub struct Judge {
    timing: Timing,
    probes: bool,
    started_ms: u64,
    /// Since when our path has been continuously good (None: it is bad now).
    own_good_since: Option<u64>,
    damping: Damping,
    /// Damping changes not yet taken by the daemon.
    damp_events: Vec<DampEvent>,
    /// Our own loop's recent stalls ([`crate::stall`]): no evidence against our path.
    stalls: std::collections::VecDeque<Stall>,
    guests: BTreeMap<Mac, GuestDecision>,
    /// Cut-off changes not yet taken by the daemon.
    guest_events: Vec<GuestEvent>,
}

impl Judge {
    pub fn new(timing: Timing, damping: DampingConfig, probes_configured: bool, now_ms: u64) -> Self {
        Self {
            timing,
            probes: probes_configured,
            started_ms: now_ms,
            own_good_since: Some(now_ms),
            damping: Damping::new(damping),
            damp_events: Vec::new(),
            stalls: std::collections::VecDeque::new(),
            guests: BTreeMap::new(),
            guest_events: Vec::new(),
        }
    }

    /// Our loop was stalled (not running) during `s`: we sent no probes then, so missing
    /// replies in that time say nothing about our path.
    pub fn stalled(&mut self, s: Stall) {
        if self.stalls.len() == STALLS_KEPT {
            self.stalls.pop_front();
        }
        self.stalls.push_back(s);
    }

    pub fn add_guest(&mut self, mac: Mac, role: Role, now_ms: u64) {
        self.guests.insert(
            mac,
            GuestDecision {
                role,
                steering: false,
                since_ms: now_ms,
                why: "protected".into(),
                cut_off: None,
            },
        );
    }

    /// The previous daemon left this guest steered (its pinned programs still act on it):
    /// carry on from there instead of undoing it before anything is known.
    pub fn adopt_steering(&mut self, mac: Mac, now_ms: u64) {
        if let Some(g) = self.guests.get_mut(&mac) {
            g.steering = true;
            g.since_ms = now_ms;
            g.why = "steered when the previous daemon stopped (pinned data path adopted)".into();
        }
    }

    /// Forgets a guest (removed at runtime, or before it is added again with another
    /// role). The caller turns its steering off in the data path.
    pub fn remove_guest(&mut self, mac: Mac) -> Option<GuestDecision> {
        self.guests.remove(&mac)
    }

    /// The cut-off changes since the last call, in order, to report.
    pub fn take_guest_events(&mut self) -> Vec<GuestEvent> {
        std::mem::take(&mut self.guest_events)
    }

    pub fn guests(&self) -> &BTreeMap<Mac, GuestDecision> {
        &self.guests
    }

    /// Flap damping of our path (penalty, suppression), for `status`.
    pub fn damping(&self) -> &Damping {
        &self.damping
    }

    /// The damping changes since the last call, oldest first, to report.
    pub fn take_damp_events(&mut self) -> Vec<DampEvent> {
        std::mem::take(&mut self.damp_events)
    }

    /// Is our own path working, as we report it to the partner?
    pub fn own_path_ok(&self, ev: &Evidence) -> bool {
        self.own_path_problem(ev).is_none()
    }

    /// Why our path is bad, or None when it works.
    ///
    /// Probe loss counts only the time our loop ran since the last reply: stalled time
    /// (no probes sent) is no evidence, so after a stall the path is re-observed first.
    fn own_path_problem(&self, ev: &Evidence) -> Option<String> {
        if !ev.own_carrier {
            return Some("carrier lost on the application NIC".into());
        }
        if self.probes {
            let last = ev.own_last_probe_reply_ms.unwrap_or(self.started_ms);
            let age = ev.now_ms.saturating_sub(last);
            let stalled: u64 = self.stalls.iter().map(|s| s.overlap_ms(last, ev.now_ms)).sum();
            let observed = age.saturating_sub(stalled);
            if observed > self.timing.probe_loss {
                let stalled = if stalled > 0 {
                    format!(", {stalled} ms of it stalled and not counted")
                } else {
                    String::new()
                };
                return Some(format!(
                    "no probe reply for {age} ms{stalled} (limit {} ms)",
                    self.timing.probe_loss
                ));
            }
        }
        None
    }

    /// The partner's path as far as we know: Err(reason) if unknown or bad.
    fn partner_path<'e>(&self, ev: &'e Evidence) -> Result<&'e PartnerView, String> {
        let Some(p) = &ev.partner else {
            return Err("no word from the partner yet".into());
        };
        if !ev.al_usable {
            return Err("no availability link works".into());
        }
        let age = ev.now_ms.saturating_sub(p.received_ms);
        if age > self.timing.peer_timeout {
            return Err(format!(
                "no word from the partner for {age} ms over the availability links"
            ));
        }
        if !p.carrier {
            return Err("the partner has no carrier either".into());
        }
        if !p.probe_ok {
            return Err("the partner's probes are not answered either".into());
        }
        Ok(p)
    }

    /// Re-evaluates every guest; returns the changes to apply, in MAC order.
    pub fn evaluate(&mut self, ev: &Evidence) -> Vec<Change> {
        // Stalls before the last reply can no longer matter.
        let last = ev.own_last_probe_reply_ms.unwrap_or(self.started_ms);
        while self.stalls.front().is_some_and(|s| s.to_ms <= last) {
            self.stalls.pop_front();
        }
        let problem = self.own_path_problem(ev);
        match (&problem, self.own_good_since) {
            (None, None) => self.own_good_since = Some(ev.now_ms),
            (Some(_), Some(since)) => {
                self.own_good_since = None;
                // A failure of a healed (trusted) path is one flap; one during the heal hold
                // only restarts the hold — unless the path is suppressed: then every failure
                // counts, so a path that keeps flapping stays suppressed.
                if (ev.now_ms.saturating_sub(since) >= self.timing.heal_hold || self.damping.suppressed())
                    && let Some(e) = self.damping.failure(ev.now_ms)
                {
                    self.damp_events.push(e);
                }
            }
            _ => {}
        }
        if let Some(e) = self.damping.poll(ev.now_ms) {
            self.damp_events.push(e);
        }
        let suppressed = self.damping.suppressed();
        let partner = self.partner_path(ev);
        let partner_fresh = ev
            .partner
            .as_ref()
            .is_some_and(|p| ev.now_ms.saturating_sub(p.received_ms) <= self.timing.peer_timeout);
        let own_good_for = self.own_good_since.map(|s| ev.now_ms.saturating_sub(s));
        // Just started, the partner not heard yet: steering adopted from the previous daemon
        // ([`Judge::adopt_steering`]) is not undone for want of news (for `peer_timeout`).
        let starting = ev.partner.is_none() && ev.now_ms.saturating_sub(self.started_ms) <= self.timing.peer_timeout;
        // The partner is only silent (an AL works): steering through it may still carry.
        let partner_silent_only = ev.al_usable && !partner_fresh;
        let mut changes = Vec::new();
        for (mac, g) in self.guests.iter_mut() {
            let verdict: Option<(bool, String)> = match g.role {
                Role::Local if !g.steering => match (&problem, &partner) {
                    (Some(why), Ok(_)) if suppressed => Some((
                        true,
                        format!("{why}; the partner's path works; our path is suppressed (flapping)"),
                    )),
                    (Some(why), Ok(_)) => Some((true, format!("{why}; the partner's path works"))),
                    _ => None,
                },
                Role::Local => match (&problem, &partner, own_good_for) {
                    _ if starting => None,
                    (_, _, Some(good)) if good >= self.timing.heal_hold && !suppressed => {
                        Some((false, format!("our path has worked for {good} ms")))
                    }
                    (None, Err(why), _) => Some((false, format!("{why}; our path works"))),
                    // A silent partner with a working AL keeps our traffic: our path is bad,
                    // and the partner's pinned programs carry it on while its daemon is
                    // restarted (issue 12, item 6). Links that do not work carry nothing.
                    (_, Err(why), _) if !ev.al_usable => Some((false, format!("{why}: cannot steer through it"))),
                    _ => None,
                },
                Role::Partner => {
                    let asked = partner_fresh && ev.partner.as_ref().is_some_and(|p| p.requests.contains(mac));
                    match (asked, g.steering) {
                        (true, false) => Some((true, "the partner asks to use our NIC".into())),
                        // A new daemon keeps lending what it adopted until the partner speaks.
                        (false, true) if starting => None,
                        (false, true) if !partner_fresh => {
                            Some((false, "the partner went silent over the availability links".into()))
                        }
                        (false, true) => Some((false, "the partner no longer asks to use our NIC".into())),
                        _ => None,
                    }
                }
            };
            if let Some((steer, why)) = verdict
                && steer != g.steering
            {
                g.steering = steer;
                g.since_ms = ev.now_ms;
                g.why = why.clone();
                changes.push(Change {
                    mac: *mac,
                    role: g.role,
                    steer,
                    why,
                });
            }
            // Cut off: our path is bad and the partner cannot carry the guest. One state,
            // one event when it starts and one when it ends.
            let cut = match (g.role, &problem, &partner) {
                // Just started: the partner is not known to be unable yet.
                (Role::Local, Some(_), Err(_)) if g.steering && starting => None,
                // Steered through a partner that fell silent: its pinned programs may still
                // carry the guest (a daemon restart) or not (the host died) — not known to be
                // carried, so reported, saying that steering goes on.
                (Role::Local, Some(own), Err(p)) if g.steering && partner_silent_only => Some(format!(
                    "our path: {own}; the partner cannot confirm it carries it: {p} (still steered through it: its data path may outlive its daemon)"
                )),
                (Role::Local, Some(own), Err(p)) => Some(format!("our path: {own}; the partner cannot carry it: {p}")),
                _ => None,
            };
            match (&g.cut_off, cut) {
                (None, Some(why)) => {
                    self.guest_events.push(GuestEvent::CutOff {
                        mac: *mac,
                        why: why.clone(),
                    });
                    g.cut_off = Some(CutOff {
                        since_ms: ev.now_ms,
                        why,
                    });
                }
                (Some(c), None) => {
                    let how = if problem.is_none() {
                        "our path works again"
                    } else {
                        "through the partner's NIC"
                    };
                    self.guest_events.push(GuestEvent::Restored {
                        mac: *mac,
                        after_ms: ev.now_ms.saturating_sub(c.since_ms),
                        how: how.into(),
                    });
                    g.cut_off = None;
                }
                (Some(c), Some(why)) if c.why != why => {
                    // Still cut off, for another reason now: the state shows the latest.
                    g.cut_off = Some(CutOff {
                        since_ms: c.since_ms,
                        why,
                    });
                }
                _ => {}
            }
        }
        changes
    }

    /// Local guests that nothing carries right now.
    pub fn cut_off(&self) -> impl Iterator<Item = (Mac, &CutOff)> {
        self.guests
            .iter()
            .filter_map(|(m, g)| g.cut_off.as_ref().map(|c| (*m, c)))
    }

    /// Local guests we currently ask the partner to carry.
    pub fn requests(&self) -> BTreeSet<Mac> {
        self.guests
            .iter()
            .filter(|(_, g)| g.role == Role::Local && g.steering)
            .map(|(m, _)| *m)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Mac = Mac([0x52, 0x54, 0, 0xfb, 1, 0x0a]);
    const P: Mac = Mac([0x52, 0x54, 0, 0xfb, 1, 0x0b]);

    fn judge() -> Judge {
        let mut j = Judge::new(Timing::default(), DampingConfig::default(), true, 0);
        j.add_guest(G, Role::Local, 0);
        j.add_guest(P, Role::Partner, 0);
        j
    }

    fn partner(at: u64, ok: bool, requests: &[Mac]) -> Option<PartnerView> {
        Some(PartnerView {
            received_ms: at,
            carrier: true,
            probe_ok: ok,
            requests: requests.iter().copied().collect(),
        })
    }

    fn ev(now: u64, carrier: bool, last_reply: u64, p: Option<PartnerView>) -> Evidence {
        Evidence {
            now_ms: now,
            own_carrier: carrier,
            own_last_probe_reply_ms: Some(last_reply),
            partner: p,
            al_usable: true,
        }
    }

    fn steers(c: &[Change], mac: Mac) -> Option<bool> {
        c.iter().find(|c| c.mac == mac).map(|c| c.steer)
    }

    #[test]
    fn a_guest_nothing_can_carry_is_cut_off_once_and_restored_once() {
        let mut j = judge();
        assert!(j.evaluate(&ev(0, true, 0, partner(0, true, &[]))).is_empty());
        // Our NIC goes down while no availability link works: nothing is steered (never
        // into nothing), and the guest is cut off — one event.
        let mut e = ev(10, false, 0, partner(5, true, &[]));
        e.al_usable = false;
        assert_eq!(steers(&j.evaluate(&e), G), None, "never steer through nothing");
        let evs = j.take_guest_events();
        assert!(
            matches!(&evs[..], [GuestEvent::CutOff { mac, why }] if *mac == G && why.contains("no availability link works")),
            "{evs:?}"
        );
        assert_eq!(j.cut_off().count(), 1);
        // Still cut off later, the partner now silent as well: no second event.
        let mut e = ev(300, false, 0, partner(5, true, &[]));
        e.al_usable = false;
        j.evaluate(&e);
        assert!(j.take_guest_events().is_empty());
        assert!(j.cut_off().next().unwrap().1.why.contains("no availability link works"));
        // A link works again and the partner's path is fine: steered, and no longer cut off.
        let c = j.evaluate(&ev(320, false, 0, partner(318, true, &[])));
        assert_eq!(steers(&c, G), Some(true));
        let evs = j.take_guest_events();
        assert!(
            matches!(&evs[..], [GuestEvent::Restored { mac, after_ms: 310, how }] if *mac == G && how.contains("partner")),
            "{evs:?}"
        );
        // The partner's path fails while ours is still bad: cut off again (steering kept
        // is no help either way); ours heals: restored by our own path.
        j.evaluate(&ev(330, false, 0, partner(329, false, &[])));
        assert!(
            matches!(&j.take_guest_events()[..], [GuestEvent::CutOff { why, .. }] if why.contains("partner's probes"))
        );
        j.evaluate(&ev(340, true, 340, partner(339, false, &[])));
        assert!(matches!(&j.take_guest_events()[..], [GuestEvent::Restored { how, .. }] if how.contains("our path")));
        assert_eq!(j.cut_off().count(), 0);
        // A partner guest is never "cut off" here: its host judges that.
        assert!(j.guests()[&P].cut_off.is_none());
    }

    #[test]
    fn a_removed_guest_is_forgotten_and_can_come_back_with_another_role() {
        let mut j = judge();
        j.evaluate(&ev(0, true, 0, partner(0, true, &[])));
        let c = j.evaluate(&ev(10, false, 0, partner(9, true, &[])));
        assert_eq!(steers(&c, G), Some(true));
        assert!(j.remove_guest(G).is_some_and(|g| g.steering));
        assert!(!j.requests().contains(&G), "no longer asks the partner to carry it");
        j.add_guest(G, Role::Partner, 20);
        // As a partner guest it is lent our NIC only when the partner asks.
        let c = j.evaluate(&ev(20, false, 0, partner(19, true, &[G])));
        assert_eq!(steers(&c, G), Some(true));
    }

    #[test]
    fn healthy_paths_move_nothing() {
        let mut j = judge();
        for t in (0..2000).step_by(10) {
            assert!(j.evaluate(&ev(t, true, t, partner(t, true, &[]))).is_empty());
        }
    }

    #[test]
    fn silent_loss_steers_once_probes_time_out_and_partner_agrees() {
        let mut j = judge();
        j.evaluate(&ev(1000, true, 1000, partner(1000, true, &[])));
        // Replies stop at 1000; 40 ms later the path is not yet declared bad.
        assert!(j.evaluate(&ev(1040, true, 1000, partner(1040, true, &[]))).is_empty());
        let c = j.evaluate(&ev(1041, true, 1000, partner(1041, true, &[])));
        assert_eq!(steers(&c, G), Some(true), "{c:?}");
        assert!(c[0].why.contains("no probe reply"), "{}", c[0].why);
        assert_eq!(j.requests(), [G].into_iter().collect());
    }

    #[test]
    fn carrier_loss_steers_at_once() {
        let mut j = judge();
        let c = j.evaluate(&ev(500, false, 500, partner(495, true, &[])));
        assert_eq!(steers(&c, G), Some(true));
        assert!(c[0].why.contains("carrier"));
    }

    #[test]
    fn no_steering_without_the_partners_agreement() {
        let mut j = judge();
        // Partner's probes fail too: the fault is upstream of both; nothing moves.
        assert!(j.evaluate(&ev(2000, true, 1000, partner(2000, false, &[]))).is_empty());
        // Partner silent (both ALs down) while our probes fail: nothing moves.
        assert!(j.evaluate(&ev(3000, true, 1000, partner(2000, true, &[]))).is_empty());
        // Never heard from the partner at all.
        assert!(j.evaluate(&ev(4000, false, 1000, None)).is_empty());
    }

    #[test]
    fn losing_the_availability_links_alone_moves_nothing() {
        let mut j = judge();
        for t in (0..3000).step_by(10) {
            // Partner last heard at 100; our own path is fine throughout.
            assert!(
                j.evaluate(&ev(t, true, t, partner(100.min(t), true, &[]))).is_empty(),
                "t={t}"
            );
        }
    }

    #[test]
    fn traffic_returns_after_the_hold_time_not_before() {
        let mut j = judge();
        assert_eq!(
            steers(&j.evaluate(&ev(100, false, 100, partner(100, true, &[]))), G),
            Some(true)
        );
        // Carrier back at 200; flaps at 700; back at 800.
        assert!(j.evaluate(&ev(200, true, 200, partner(200, true, &[]))).is_empty());
        assert!(j.evaluate(&ev(700, false, 700, partner(700, true, &[]))).is_empty());
        assert!(j.evaluate(&ev(800, true, 800, partner(800, true, &[]))).is_empty());
        assert!(
            j.evaluate(&ev(1799, true, 1799, partner(1799, true, &[]))).is_empty(),
            "hold not over"
        );
        let c = j.evaluate(&ev(1800, true, 1800, partner(1800, true, &[])));
        assert_eq!(steers(&c, G), Some(false));
        assert!(c[0].why.contains("1000 ms"));
    }

    #[test]
    fn traffic_returns_at_once_when_the_partner_path_fails_and_ours_works() {
        let mut j = judge();
        j.evaluate(&ev(100, false, 100, partner(100, true, &[])));
        let c = j.evaluate(&ev(150, true, 150, partner(150, false, &[])));
        assert_eq!(steers(&c, G), Some(false));
    }

    #[test]
    fn a_silent_partner_keeps_our_traffic_while_our_path_is_bad_and_an_al_works() {
        // Its pinned programs carry on while its daemon restarts (issue 12, item 6);
        // our own path is known bad, so going home would certainly lose the traffic.
        let mut j = judge();
        let c = j.evaluate(&ev(100, false, 100, partner(100, true, &[])));
        assert_eq!(steers(&c, G), Some(true));
        let c = j.evaluate(&ev(300, false, 100, partner(100, true, &[])));
        assert!(c.is_empty(), "{c:?}");
        let cut: Vec<String> = j.cut_off().map(|(_, c)| c.why.clone()).collect();
        assert!(
            matches!(&cut[..], [why] if why.contains("still steered through it")),
            "steered through a silent partner: not known to be carried, and said so: {cut:?}"
        );
        // Our path works again: home at once (the partner cannot be trusted to carry it).
        let c = j.evaluate(&ev(310, true, 310, partner(100, true, &[])));
        assert_eq!(steers(&c, G), Some(false), "{c:?}");
        assert!(c[0].why.contains("our path works"), "{}", c[0].why);
        // Steering, and the links stop working: steering stops (nothing through nothing).
        let mut j = judge();
        j.evaluate(&ev(100, false, 100, partner(100, true, &[])));
        let c = j.evaluate(&Evidence {
            al_usable: false,
            ..ev(300, false, 100, partner(100, true, &[]))
        });
        assert_eq!(steers(&c, G), Some(false), "{c:?}");
        assert!(c[0].why.contains("cannot steer"), "{}", c[0].why);
    }

    #[test]
    fn adopted_steering_is_kept_until_the_partner_speaks_or_peer_timeout() {
        let mut j = Judge::new(Timing::default(), DampingConfig::default(), true, 1000);
        j.add_guest(G, Role::Local, 1000);
        j.add_guest(P, Role::Partner, 1000);
        j.adopt_steering(G, 1000);
        j.adopt_steering(P, 1000);
        // Not heard yet, no link judged yet: nothing undone.
        let starting = |now| Evidence {
            al_usable: false,
            ..ev(now, true, now, None)
        };
        assert!(j.evaluate(&starting(1010)).is_empty());
        assert!(j.evaluate(&starting(1100)).is_empty());
        // The partner speaks and still asks: we keep lending. Our path works: G comes home
        // after the heal hold as usual.
        assert!(j.evaluate(&ev(1110, true, 1110, partner(1110, true, &[P]))).is_empty());
        let c = j.evaluate(&ev(2000, true, 2000, partner(2000, true, &[P])));
        assert_eq!(steers(&c, G), Some(false), "{c:?}");
        // Never heard within peer_timeout of the start: lending stops.
        let mut j = Judge::new(Timing::default(), DampingConfig::default(), true, 0);
        j.add_guest(P, Role::Partner, 0);
        j.adopt_steering(P, 0);
        assert!(j.evaluate(&ev(50, true, 50, None)).is_empty());
        let c = j.evaluate(&ev(150, true, 150, None));
        assert_eq!(steers(&c, P), Some(false), "{c:?}");
    }

    #[test]
    fn nothing_is_steered_into_availability_links_that_do_not_work() {
        let mut j = judge();
        let dead = |now, carrier| Evidence {
            al_usable: false,
            ..ev(now, carrier, now, partner(now, true, &[]))
        };
        // Our carrier is gone, the partner is fresh, but no AL works: do not steer.
        let c = j.evaluate(&dead(100, false));
        assert!(c.is_empty(), "{c:?}");
        // Steering, then both ALs stop working while the partner's last word is still fresh.
        let c = j.evaluate(&ev(200, false, 200, partner(200, true, &[])));
        assert_eq!(steers(&c, G), Some(true));
        let c = j.evaluate(&dead(210, false));
        assert_eq!(steers(&c, G), Some(false), "{c:?}");
        assert!(c[0].why.contains("no availability link works"), "{}", c[0].why);
    }

    #[test]
    fn we_lend_our_nic_exactly_while_the_partner_asks() {
        let mut j = judge();
        assert!(j.evaluate(&ev(100, true, 100, partner(100, true, &[]))).is_empty());
        let c = j.evaluate(&ev(110, true, 110, partner(110, true, &[P])));
        assert_eq!(steers(&c, P), Some(true));
        assert!(j.evaluate(&ev(120, true, 120, partner(120, true, &[P]))).is_empty());
        let c = j.evaluate(&ev(130, true, 130, partner(130, true, &[])));
        assert_eq!(steers(&c, P), Some(false));
        // Asked again, then the partner goes silent: we stop lending.
        j.evaluate(&ev(140, true, 140, partner(140, true, &[P])));
        let c = j.evaluate(&ev(400, true, 400, partner(140, true, &[P])));
        assert_eq!(steers(&c, P), Some(false));
    }

    /// Runs the judge every 10 ms from `from` to `to` (exclusive) with silent loss on our
    /// path while `lossy(t)`: probe replies stop, the partner stays fresh and healthy.
    /// Returns the local guest's changes with their instants.
    fn run(j: &mut Judge, from: u64, to: u64, lossy: impl Fn(u64) -> bool) -> Vec<(u64, Change)> {
        let mut last_reply = from;
        let mut out = Vec::new();
        for t in (from..to).step_by(10) {
            if !lossy(t) {
                last_reply = t;
            }
            for c in j.evaluate(&ev(t, true, last_reply, partner(t, true, &[]))) {
                if c.mac == G {
                    out.push((t, c));
                }
            }
        }
        out
    }

    #[test]
    fn a_single_clean_failure_and_recovery_is_not_damped() {
        let mut j = judge();
        // Loss from 5000 to 6000, then a long healthy stretch.
        let c = run(&mut j, 0, 20_000, |t| (5000..6000).contains(&t));
        let at: Vec<(u64, bool)> = c.iter().map(|(t, c)| (*t, c.steer)).collect();
        // Steered at the probe-loss limit (as without damping), back after the heal hold.
        assert_eq!(at, [(5040, true), (7000, false)], "{c:?}");
        assert!(!j.damping().suppressed());
        assert!(j.take_damp_events().is_empty());
        assert_eq!(j.damping().status(7000).failures, 1);
    }

    #[test]
    fn a_flapping_path_is_suppressed_and_trusted_again_once_the_penalty_decays() {
        let mut j = judge();
        // Silent loss 1 s on / 1 s off from 2000 to 22000 (as in issue 12: 19-20 path
        // changes per host without damping).
        let flapping = |t: u64| (2000..22_000).contains(&t) && (t - 2000) % 2000 < 1000;
        let c = run(&mut j, 0, 24_000, flapping);
        let at: Vec<(u64, bool)> = c.iter().map(|(t, c)| (*t, c.steer)).collect();
        // Out at once, home after the heal hold — just as the path fails again: out at once
        // (that second failure of a healed path suppresses it), and then it stays out.
        assert_eq!(at, [(2040, true), (4000, false), (4040, true)], "{c:?}");
        assert!(c[2].1.why.contains("suppressed (flapping)"), "{}", c[2].1.why);
        let ev = j.take_damp_events();
        assert!(matches!(ev[..], [DampEvent::Suppressed { .. }]), "{ev:?}");
        assert!(j.damping().suppressed());
        assert_eq!(j.requests(), [G].into_iter().collect());
        // After the flapping, the path works but is not trusted until the penalty decays
        // below reuse; then traffic returns (the path has worked far longer than the hold).
        let c = run(&mut j, 24_000, 120_000, |_| false);
        let ev = j.take_damp_events();
        let [DampEvent::Reused { suppressed_for_ms, .. }] = ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(c.len(), 1, "{c:?}");
        let (back, change) = &c[0];
        assert!(!change.steer);
        assert_eq!(*back, 4040 + suppressed_for_ms);
        // Five path changes over ~a minute and a half, where undamped it would be 20 in 20 s.
        assert!(*back > 60_000 && *back < 90_000, "back at {back}");
        assert!(j.requests().is_empty());
    }

    #[test]
    fn a_suppressed_path_still_takes_traffic_back_when_the_partners_path_fails() {
        let mut j = judge();
        let flapping = |t: u64| (2000..8000).contains(&t) && (t - 2000) % 2000 < 1000;
        run(&mut j, 0, 9000, flapping);
        assert!(j.damping().suppressed());
        assert_eq!(j.requests(), [G].into_iter().collect());
        // Our path works, suppressed; the partner's path fails: our path is the better one.
        let c = j.evaluate(&ev(9010, true, 9010, partner(9010, false, &[])));
        assert_eq!(steers(&c, G), Some(false), "{c:?}");
        // Our path fails again while suppressed and the partner's works: out at once.
        j.evaluate(&ev(9020, true, 9020, partner(9020, true, &[])));
        let c = j.evaluate(&ev(9070, true, 9020, partner(9070, true, &[])));
        assert_eq!(steers(&c, G), Some(true), "{c:?}");
    }

    #[test]
    fn failures_during_the_heal_hold_only_restart_it() {
        let mut j = judge();
        // Loss 2000-2500, 3000-3500, 4000-4500: the path never works for the heal hold in
        // between, so traffic never came back — no flap, no penalty beyond the first.
        let c = run(&mut j, 0, 8000, |t| {
            [2000, 3000, 4000].iter().any(|s| (*s..s + 500).contains(&t))
        });
        let at: Vec<(u64, bool)> = c.iter().map(|(t, c)| (*t, c.steer)).collect();
        assert_eq!(at, [(2040, true), (5500, false)], "{c:?}");
        assert!(!j.damping().suppressed());
        assert_eq!(j.damping().status(8000).failures, 1);
    }

    #[test]
    fn while_suppressed_every_failure_adds_penalty() {
        let mut j = judge();
        let flapping = |t: u64| (2000..6000).contains(&t) && (t - 2000) % 2000 < 1000;
        run(&mut j, 0, 6000, flapping);
        assert!(j.damping().suppressed());
        let before = j.damping().status(6000).failures;
        // Short good stretches (below the heal hold) while suppressed still count.
        run(&mut j, 6000, 9000, |t| {
            [6500, 7500, 8500].iter().any(|s| (*s..s + 200).contains(&t))
        });
        assert_eq!(j.damping().status(9000).failures, before + 3);
    }

    /// Our daemon's loop on simulated time, 1 ms steps, as the daemon runs it: a probe
    /// timer every 10 ms (a missed tick fires at once after a stall, then every 10 ms from
    /// there: tokio's `MissedTickBehavior::Delay`); a probe's reply arrives 1 ms after it
    /// while `path_ok` held when it was sent, and wakes the loop; inside a stall
    /// `[from, to)` nothing runs and replies stay queued. On every wake-up the loop detects
    /// its own stall ([`StallClock`]; told to the judge only if `tell`), reads everything
    /// queued (stamped with the time it is read) and judges; the partner is fresh and healthy
    /// throughout (its messages queue during our stall too). Returns the local guest's
    /// changes and the instants our path was judged failing.
    fn sim(
        j: &mut Judge,
        span: (u64, u64),
        stalls: &[(u64, u64)],
        path_ok: impl Fn(u64) -> bool,
        tell: bool,
    ) -> (Vec<(u64, Change)>, Vec<u64>) {
        use crate::stall::StallClock;
        let mut clock = StallClock::new(10, 10);
        let (mut next_tick, mut last_reply) = (span.0, span.0);
        let mut queued: Vec<u64> = Vec::new();
        let (mut changes, mut failing) = (Vec::new(), Vec::new());
        for t in span.0..span.1 {
            if stalls.iter().any(|&(a, b)| (a..b).contains(&t)) {
                continue;
            }
            let tick = t >= next_tick;
            if !tick && !queued.iter().any(|&r| r <= t) {
                continue;
            }
            if let Some(st) = clock.woke(t)
                && tell
            {
                j.stalled(st);
            }
            if queued.iter().any(|&r| r <= t) {
                last_reply = t;
                queued.retain(|&r| r > t);
            }
            let e = ev(t, true, last_reply, partner(t, true, &[]));
            if !j.own_path_ok(&e) {
                failing.push(t);
            }
            changes.extend(j.evaluate(&e).into_iter().filter(|c| c.mac == G).map(|c| (t, c)));
            if tick {
                if path_ok(t) {
                    queued.push(t + 1);
                }
                next_tick = t + 10;
            }
            clock.asleep(t);
        }
        (changes, failing)
    }

    /// Stalls of 150-250 ms every 600-800 ms, starting at every offset against the probe
    /// timer (so some begin with a reply queued, some just after the last one was read).
    fn stalls_from(start: u64, n: u64) -> Vec<(u64, u64)> {
        (0..n)
            .map(|i| {
                let a = start + i * 700 + (i * 3) % 10 + (i % 3) * 50;
                (a, a + 150 + (i * 37) % 101)
            })
            .collect()
    }

    #[test]
    fn stalls_of_our_loop_with_a_working_path_move_nothing_and_restart_no_hold() {
        let stalls = stalls_from(2000, 20);
        let mut j = judge();
        let (c, failing) = sim(&mut j, (0, 17_000), &stalls, |_| true, true);
        assert!(c.is_empty(), "{c:?}");
        assert!(failing.is_empty(), "our path judged failing at {failing:?}");
        assert_eq!(j.damping().status(17_000).failures, 0);
        // The same stalls judged without knowing them (the old rule): the path "fails" after
        // most of them and, the partner being fresh, the guest is moved at the first one and
        // kept away, every later stall restarting the heal hold — issue 12, item 4. This is
        // what the stall rule prevents.
        let mut old = judge();
        let (c, failing) = sim(&mut old, (0, 17_000), &stalls, |_| true, false);
        assert!(c.first().is_some_and(|(t, c)| c.steer && *t < 2300), "{c:?}");
        let episodes = failing.windows(2).filter(|w| w[1] - w[0] > 100).count() + 1;
        assert!(episodes >= 10, "{episodes} false failures: {failing:?}");
    }

    #[test]
    fn real_loss_is_still_detected_within_50_ms_without_stalls() {
        for fault in [3000, 3003, 3007] {
            let mut j = judge();
            let (c, _) = sim(&mut j, (0, 4000), &[], |t| t < fault, true);
            let (at, change) = &c[0];
            assert!(change.steer && change.why.contains("no probe reply"), "{c:?}");
            // The last answered probe was sent up to 10 ms before the fault.
            assert!(
                *at > fault + 30 && *at <= fault + 50,
                "fault at {fault}, steered at {at}"
            );
        }
    }

    #[test]
    fn loss_across_a_stall_is_detected_once_re_observed_after_it() {
        // The path fails 20 ms before a 200 ms stall, and in the middle of another.
        for (fault, stall) in [(3000, (3020, 3220)), (3100, (3000, 3200))] {
            let mut j = judge();
            let (c, _) = sim(&mut j, (0, 4000), &[stall], |t| t < fault, true);
            let (at, change) = &c[0];
            assert!(change.steer, "{c:?}");
            assert!(change.why.contains("stalled and not counted"), "{}", change.why);
            // Not before the stall's end, and within probe_loss of running time after it.
            assert!(*at > stall.1 && *at <= stall.1 + 50, "stall {stall:?}, steered at {at}");
        }
    }

    #[test]
    fn a_loop_late_at_every_tick_still_detects_real_loss() {
        // Under heavy load: every wake-up 25 ms late (35 ms between probes), path dead from
        // 3000. Only the lateness beyond the timer's interval is discounted, so the unanswered
        // probes still add up.
        let stalls: Vec<(u64, u64)> = (0..200).map(|i| (i * 35 + 10, i * 35 + 35)).collect();
        let mut j = judge();
        let (c, _) = sim(&mut j, (0, 5000), &stalls, |t| t < 3000, true);
        let (at, change) = &c[0];
        assert!(change.steer, "{c:?}");
        assert!(*at > 3040 && *at <= 3200, "steered at {at}");
    }

    #[test]
    fn stalls_during_the_heal_hold_do_not_restart_it() {
        let mut j = judge();
        // Path dead 1000-2000, then works; stalls of ~200 ms during the hold.
        let stalls = [(2300, 2500), (2700, 2920)];
        let (c, _) = sim(&mut j, (0, 5000), &stalls, |t| !(1000..2000).contains(&t), true);
        let at: Vec<(u64, bool)> = c.iter().map(|(t, c)| (*t, c.steer)).collect();
        assert_eq!(at.len(), 2, "{c:?}");
        assert!(at[0].1 && !at[1].1);
        // Back after the 1 s hold from the first reply after the fault (~2001-2011).
        assert!(at[1].0 >= 3000 && at[1].0 <= 3030, "{at:?}");
    }

    #[test]
    fn without_probe_targets_only_carrier_counts() {
        let mut j = Judge::new(Timing::default(), DampingConfig::default(), false, 0);
        j.add_guest(G, Role::Local, 0);
        let none = Evidence {
            now_ms: 10_000,
            own_carrier: true,
            own_last_probe_reply_ms: None,
            partner: partner(10_000, true, &[]),
            al_usable: true,
        };
        assert!(j.evaluate(&none).is_empty());
        let down = Evidence {
            own_carrier: false,
            ..none
        };
        assert_eq!(steers(&j.evaluate(&down), G), Some(true));
    }
}
