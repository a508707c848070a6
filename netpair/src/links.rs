//! Which availability link works, and which one carries steered frames — judged from the
//! partner's pairing messages as they arrive over each link, not from carrier.
//!
//! Pure logic over explicit times (milliseconds on a monotonic clock), so every timeline is
//! a unit test. The daemon tells it each link's carrier and every authenticated copy of a
//! pairing message that arrived over a link — the second copy of a message too, which the
//! protocol otherwise drops — and applies the events it returns.
//!
//! Every pairing message is sent over every availability link, so each link hears the
//! partner every `observation_interval`. Rules (docs/architecture.md, "netpair"):
//! - a link is **up** while a copy arrived over it within `link_timeout`;
//! - **down** without carrier;
//! - **silent** (dead with carrier up: a blackholing qdisc, a broken cable half, a switch in
//!   between that drops) when nothing arrived over it for `link_timeout` while another link
//!   has delivered without a gap for at least `link_timeout`: the partner is talking, only
//!   not over this link (just after the partner resumes from a stall, one link's copy read
//!   before the other's is no evidence);
//! - **unknown** before anything arrived over it (at start, after its carrier returns);
//! - when the partner is silent on *every* link there is no evidence against one link in
//!   particular (the partner stalled, or both links died — reported as the partner falling
//!   silent): each link keeps the health it had.
//!
//! Steered frames use the **active** link: it stays while it is up; when it is not, the
//! first up link takes over; with no up link, the current one stays unless it is silent or
//! down, then the first with carrier that is not silent; with no carrier anywhere, none.

/// A link's health, as reported in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Unknown,
    Up,
    Silent,
    Down,
}

#[derive(Clone, Debug)]
struct Link {
    name: String,
    carrier: bool,
    /// When carrier last came up (or when we started with it).
    carrier_since_ms: u64,
    last_rx_ms: Option<u64>,
    /// Since when copies have arrived over it without a gap longer than the timeout.
    run_since_ms: Option<u64>,
    health: Health,
}

/// Something the daemon must report or apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Link `link` changed health.
    Health {
        link: usize,
        from: Health,
        to: Health,
        why: String,
    },
    /// Steered frames now use `to` (None: no link has carrier).
    Active {
        from: Option<usize>,
        to: Option<usize>,
        why: String,
    },
}

#[derive(Debug)]
pub struct Links {
    timeout_ms: u64,
    links: Vec<Link>,
    active: Option<usize>,
}

impl Links {
    /// `links`: (interface name, carrier now) in configuration order.
    pub fn new(links: &[(String, bool)], timeout_ms: u64, now_ms: u64) -> Self {
        Self {
            timeout_ms,
            links: links
                .iter()
                .map(|(name, carrier)| Link {
                    name: name.clone(),
                    carrier: *carrier,
                    carrier_since_ms: now_ms,
                    last_rx_ms: None,
                    run_since_ms: None,
                    health: if *carrier { Health::Unknown } else { Health::Down },
                })
                .collect(),
            active: None,
        }
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        self.links.get(i).map_or("", |l| l.name.as_str())
    }

    pub fn carrier(&self, i: usize) -> bool {
        self.links.get(i).is_some_and(|l| l.carrier)
    }

    pub fn health(&self, i: usize) -> Health {
        self.links.get(i).map_or(Health::Down, |l| l.health)
    }

    pub fn last_rx_ms(&self, i: usize) -> Option<u64> {
        self.links.get(i).and_then(|l| l.last_rx_ms)
    }

    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// Some link is judged to work (steering through the partner has a way there).
    pub fn usable(&self) -> bool {
        self.links.iter().any(|l| l.health == Health::Up)
    }

    /// Carrier of link `i` changed. Returns false when nothing changed.
    pub fn set_carrier(&mut self, i: usize, carrier: bool, now_ms: u64) -> bool {
        let Some(l) = self.links.get_mut(i) else { return false };
        if l.carrier == carrier {
            return false;
        }
        l.carrier = carrier;
        if carrier {
            l.carrier_since_ms = now_ms;
        }
        true
    }

    /// An authenticated copy of a pairing message arrived over link `i` (first copy or not).
    pub fn heard(&mut self, i: usize, now_ms: u64) {
        let timeout = self.timeout_ms;
        if let Some(l) = self.links.get_mut(i) {
            if l.last_rx_ms.is_none_or(|t| now_ms.saturating_sub(t) > timeout) {
                l.run_since_ms = Some(now_ms);
            }
            l.last_rx_ms = Some(l.last_rx_ms.map_or(now_ms, |t| t.max(now_ms)));
        }
    }

    fn fresh(&self, l: &Link, now_ms: u64) -> bool {
        l.last_rx_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= self.timeout_ms && t >= l.carrier_since_ms)
    }

    /// Re-judges every link and the active one; returns what changed, health first.
    pub fn evaluate(&mut self, now_ms: u64) -> Vec<LinkEvent> {
        let mut events = Vec::new();
        let fresh: Vec<bool> = self.links.iter().map(|l| l.carrier && self.fresh(l, now_ms)).collect();
        // Evidence against a link: another one has delivered without a gap for at least the
        // timeout. Just after the partner resumed from a stall (or both links from an
        // outage) one link's copy may be read before the other's: no evidence yet.
        let talking: Vec<bool> = self
            .links
            .iter()
            .zip(&fresh)
            .map(|(l, f)| {
                *f && l
                    .run_since_ms
                    .is_some_and(|s| now_ms.saturating_sub(s) >= self.timeout_ms)
            })
            .collect();
        let any_talking = talking.iter().any(|t| *t);
        // Indexes: the body reads other links (`talking`) and then updates link `i`.
        #[allow(clippy::needless_range_loop)]
        for i in 0..self.links.len() {
            let l = &self.links[i];
            let silent_for = now_ms.saturating_sub(l.last_rx_ms.unwrap_or(0).max(l.carrier_since_ms));
            let (to, why) = if !l.carrier {
                (Health::Down, "no carrier".to_owned())
            } else if fresh[i] {
                (Health::Up, "pairing messages arrive over it".to_owned())
            } else if matches!(l.health, Health::Down | Health::Up)
                && l.last_rx_ms.is_none_or(|t| t < l.carrier_since_ms)
            {
                (
                    Health::Unknown,
                    "carrier back, no pairing message over it yet".to_owned(),
                )
            } else if any_talking && silent_for > self.timeout_ms {
                let others: Vec<&str> = (0..self.links.len())
                    .filter(|&j| talking[j])
                    .map(|j| self.links[j].name.as_str())
                    .collect();
                let heard = match l.last_rx_ms {
                    Some(t) if t >= l.carrier_since_ms => {
                        format!("no pairing message over it for {} ms", now_ms.saturating_sub(t))
                    }
                    _ => format!("no pairing message over it in the {silent_for} ms since its carrier came up"),
                };
                (
                    Health::Silent,
                    format!("carrier up but {heard} while {} delivers them", others.join(", ")),
                )
            } else {
                // No evidence either way (too early, or the partner is silent everywhere).
                (l.health, String::new())
            };
            if to != l.health {
                let from = l.health;
                self.links[i].health = to;
                events.push(LinkEvent::Health { link: i, from, to, why });
            }
        }
        let health = |i: usize| self.links[i].health;
        let next = match self.active {
            Some(a) if health(a) == Health::Up => Some(a),
            _ => (0..self.links.len())
                .find(|&i| health(i) == Health::Up)
                .or(match self.active {
                    Some(a) if health(a) == Health::Unknown => Some(a),
                    _ => None,
                })
                .or_else(|| (0..self.links.len()).find(|&i| health(i) == Health::Unknown))
                .or_else(|| (0..self.links.len()).find(|&i| self.links[i].carrier)),
        };
        if next != self.active {
            let why = match (self.active, next) {
                (_, None) => "no availability link has carrier".to_owned(),
                (Some(a), Some(n)) => format!(
                    "{} is {}; {} is {}",
                    self.links[a].name,
                    health_word(health(a)),
                    self.links[n].name,
                    health_word(health(n))
                ),
                (None, Some(n)) => format!("{} is {}", self.links[n].name, health_word(health(n))),
            };
            events.push(LinkEvent::Active {
                from: self.active,
                to: next,
                why,
            });
            self.active = next;
        }
        events
    }
}

/// How a health reads in a sentence.
pub fn health_word(h: Health) -> &'static str {
    match h {
        Health::Unknown => "not yet heard over",
        Health::Up => "working",
        Health::Silent => "silently dead (carrier up, nothing arrives)",
        Health::Down => "down (no carrier)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Links {
        Links::new(&[("al1".into(), true), ("al2".into(), true)], 30, 0)
    }

    /// The partner's messages every 10 ms from `from` to `to` over the links in `over`,
    /// evaluating after each round like the daemon; returns all events.
    fn talk(l: &mut Links, from: u64, to: u64, over: &[usize]) -> Vec<LinkEvent> {
        let mut ev = Vec::new();
        for t in (from..=to).step_by(10) {
            for &i in over {
                l.heard(i, t);
            }
            ev.extend(l.evaluate(t));
        }
        ev
    }

    fn healths(l: &Links) -> Vec<Health> {
        (0..l.len()).map(|i| l.health(i)).collect()
    }

    fn active_changes(ev: &[LinkEvent]) -> Vec<Option<usize>> {
        ev.iter()
            .filter_map(|e| match e {
                LinkEvent::Active { to, .. } => Some(*to),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn at_start_the_first_link_with_carrier_is_active_and_both_come_up() {
        let mut l = links();
        let ev = l.evaluate(0);
        assert_eq!(active_changes(&ev), [Some(0)]);
        assert_eq!(healths(&l), [Health::Unknown, Health::Unknown]);
        assert!(!l.usable());
        let ev = talk(&mut l, 10, 500, &[0, 1]);
        assert_eq!(healths(&l), [Health::Up, Health::Up]);
        assert!(active_changes(&ev).is_empty(), "{ev:?}");
        assert!(l.usable());
    }

    #[test]
    fn a_silently_dead_link_is_reported_and_steering_moves_off_it() {
        let mut l = links();
        talk(&mut l, 0, 1000, &[0, 1]);
        assert_eq!(l.active(), Some(0));
        // From 1000 on only al2's copies arrive (al1 blackholed, carrier up).
        let ev = talk(&mut l, 1010, 1030, &[1]);
        assert!(ev.is_empty(), "within the timeout nothing is judged: {ev:?}");
        let ev = l.evaluate(1031);
        assert_eq!(healths(&l), [Health::Silent, Health::Up]);
        assert_eq!(l.active(), Some(1));
        match &ev[..] {
            [
                LinkEvent::Health {
                    link: 0,
                    to: Health::Silent,
                    why,
                    ..
                },
                LinkEvent::Active {
                    from: Some(0),
                    to: Some(1),
                    ..
                },
            ] => {
                assert!(why.contains("no pairing message over it for 31 ms"), "{why}");
                assert!(why.contains("al2 delivers"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // al1 heals: it is up again, steering stays on al2 (no needless move).
        let ev = talk(&mut l, 2000, 2100, &[0, 1]);
        assert_eq!(healths(&l), [Health::Up, Health::Up]);
        assert_eq!(l.active(), Some(1));
        assert!(active_changes(&ev).is_empty());
    }

    #[test]
    fn the_partner_falling_silent_everywhere_blames_no_link() {
        let mut l = links();
        talk(&mut l, 0, 500, &[0, 1]);
        // A stall of the partner (or of both links): nothing arrives for a second.
        for t in (510..1500).step_by(10) {
            assert!(l.evaluate(t).is_empty(), "t={t}");
        }
        assert_eq!(healths(&l), [Health::Up, Health::Up]);
        // Then both links' queued copies arrive.
        let ev = talk(&mut l, 1500, 1600, &[0, 1]);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn after_the_partner_resumes_one_links_copy_read_first_blames_no_link() {
        let mut l = links();
        talk(&mut l, 0, 500, &[0, 1]);
        for t in (510..700).step_by(10) {
            assert!(l.evaluate(t).is_empty(), "t={t}");
        }
        // The partner resumes: al1's copy is read, and judged on, before al2's arrives.
        l.heard(0, 700);
        let ev = l.evaluate(700);
        assert!(ev.is_empty(), "al2 blamed for the partner's stall: {ev:?}");
        l.heard(1, 701);
        assert!(talk(&mut l, 710, 900, &[0, 1]).is_empty());
        assert_eq!(healths(&l), [Health::Up, Health::Up]);
        // But a link that stays silent after the partner resumed is judged within the
        // timeout of the other link delivering again.
        for t in (910..1200).step_by(10) {
            assert!(l.evaluate(t).is_empty(), "t={t}");
        }
        let ev = talk(&mut l, 1200, 1240, &[0]);
        assert_eq!(healths(&l), [Health::Up, Health::Silent], "{ev:?}");
    }

    #[test]
    fn carrier_loss_moves_steering_at_once_and_carrier_back_waits_for_messages() {
        let mut l = links();
        talk(&mut l, 0, 500, &[0, 1]);
        assert!(l.set_carrier(0, false, 505));
        assert!(!l.set_carrier(0, false, 506), "no change");
        let ev = l.evaluate(505);
        assert_eq!(healths(&l), [Health::Down, Health::Up]);
        assert_eq!(active_changes(&ev), [Some(1)]);
        // Carrier back at 600: unknown until a copy arrives over it after that instant.
        talk(&mut l, 510, 590, &[1]);
        l.set_carrier(0, true, 600);
        l.evaluate(600);
        assert_eq!(l.health(0), Health::Unknown);
        // Nothing over al1 within the timeout after carrier returned: silent.
        talk(&mut l, 600, 630, &[1]);
        assert_eq!(l.health(0), Health::Unknown);
        let ev = talk(&mut l, 640, 640, &[1]);
        assert_eq!(l.health(0), Health::Silent, "{ev:?}");
        talk(&mut l, 650, 700, &[0, 1]);
        assert_eq!(l.health(0), Health::Up);
        assert_eq!(l.active(), Some(1));
    }

    #[test]
    fn a_copy_from_before_the_carrier_came_back_does_not_count() {
        let mut l = links();
        talk(&mut l, 0, 100, &[0, 1]);
        l.set_carrier(0, false, 110);
        l.set_carrier(0, true, 120);
        l.heard(0, 115); // read late from the socket queue
        l.evaluate(120);
        assert_eq!(l.health(0), Health::Unknown);
    }

    #[test]
    fn one_sided_loss_seen_only_by_missing_messages() {
        // Host b's view when a sets its al1 down: b's carrier notification may come up to a
        // second later (linkwatch), but a's messages over al1 stop at once.
        let mut l = links();
        talk(&mut l, 0, 1000, &[0, 1]);
        let ev = talk(&mut l, 1010, 1040, &[1]);
        assert_eq!(l.active(), Some(1), "{ev:?}");
        assert_eq!(l.health(0), Health::Silent);
        // The carrier notification arrives later: silent becomes down, steering stays.
        l.set_carrier(0, false, 1900);
        let ev = l.evaluate(1900);
        assert_eq!(l.health(0), Health::Down);
        assert!(active_changes(&ev).is_empty());
    }

    #[test]
    fn no_carrier_anywhere_means_no_active_link_and_nothing_usable() {
        let mut l = links();
        talk(&mut l, 0, 100, &[0, 1]);
        l.set_carrier(0, false, 110);
        l.set_carrier(1, false, 110);
        let ev = l.evaluate(110);
        assert_eq!(active_changes(&ev), [None]);
        assert!(!l.usable());
        assert_eq!(l.active(), None);
        l.set_carrier(1, true, 200);
        assert_eq!(active_changes(&l.evaluate(200)), [Some(1)]);
    }

    #[test]
    fn both_links_silent_while_carrier_up_is_not_usable_only_once_each_was_judged() {
        // al1 dies silently first (judged), then al2 too: no copy arrives anywhere, so al2
        // keeps its last health (up) — the partner falling silent is what is reported then.
        let mut l = links();
        talk(&mut l, 0, 100, &[0, 1]);
        talk(&mut l, 110, 200, &[1]);
        assert_eq!(healths(&l), [Health::Silent, Health::Up]);
        for t in (210..1000).step_by(10) {
            l.evaluate(t);
        }
        assert_eq!(healths(&l), [Health::Silent, Health::Up]);
        assert_eq!(l.active(), Some(1));
    }

    #[test]
    fn out_of_range_indexes_are_ignored() {
        let mut l = links();
        l.heard(7, 10);
        assert!(!l.set_carrier(7, false, 10));
        assert_eq!(l.health(7), Health::Down);
        assert_eq!(l.name(7), "");
    }
}
