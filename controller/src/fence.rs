//! Fencing: when this host must stop its protected guests, and when a dead peer's guests may be
//! restarted here.
//!
//! [`Fencer`] is a pure state machine fed with [`MembershipEvent`]s and the time; it returns
//! [`FenceDecision`]s for the daemon to carry out. [`fence_guests`] carries out the one decision
//! that must finish against a deadline: destroy this host's protected guests (concurrently,
//! through a [`Vmm`]) after arming the [`Watchdog`].
//!
//! ```text
//!   Normal ──Isolated{last_contact}──▶ Fencing{deadline = last_contact + fence_deadline}
//!     ▲                                   │ fence_finished(all guests off)
//!     │                                   ▼
//!     └──────NotIsolated (Rejoin)──── Fenced (stays down until contact returns)
//! ```
//!
//! For peers: when membership declares a peer dead with `last_seen`, its guests may be restarted
//! at `last_seen + dead_after + fence_grace` — never earlier, never while this host is itself
//! fencing or fenced, and not at all if the peer is heard again first (it then fenced itself and
//! the pool configuration still places its guests there).
use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::libvirt::ErrorKind;
use crate::membership::{MembershipEvent, Timeouts};
use crate::vmm::Vmm;

/// This host's fencing state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceState {
    /// In contact; guests run normally.
    Normal,
    /// Isolated since `last_contact`: protected guests are being destroyed; they must be off by
    /// `deadline`. `contact_back` is set if contact returned meanwhile (the fence still finishes).
    Fencing {
        last_contact: Instant,
        deadline: Instant,
        contact_back: bool,
    },
    /// Protected guests are off. Nothing protected may start here until contact returns.
    Fenced {
        last_contact: Instant,
        completed_at: Instant,
        guests: Vec<String>,
    },
}

/// What the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceDecision {
    /// We are isolated: run [`fence_guests`] on every protected guest running here, with this
    /// deadline, then report with [`Fencer::fence_finished`]. `late` is set when the isolation
    /// was noticed after the deadline had already passed (a stalled daemon): fence anyway.
    FenceSelf {
        last_contact: Instant,
        deadline: Instant,
        late: bool,
    },
    /// The fence did not stop every guest. The watchdog (if armed) will reset the host; otherwise
    /// retry [`fence_guests`] on `still_running`.
    FenceIncomplete { still_running: Vec<String> },
    /// Contact is back after fencing. The `fenced` guests must **not** be started automatically:
    /// first re-synchronise the pool configuration with the peers now in contact, then start only
    /// those the pool still places on this host and that no peer reports running.
    Rejoin { fenced: Vec<String> },
    /// `peer` was declared dead (last seen `last_seen`) and its restart time has come: restart its
    /// protected guests that [`crate::plan::place_failed`] places on this host. Issued once per
    /// death.
    RestartGuestsOf { peer: String, last_seen: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeadPeer {
    last_seen: Instant,
    allowed_at: Instant,
    issued: bool,
}

/// The fencing state machine of one host. See the module documentation.
#[derive(Debug)]
pub struct Fencer {
    timeouts: Timeouts,
    state: FenceState,
    dead: BTreeMap<String, DeadPeer>,
}

impl Fencer {
    /// A fencer in [`FenceState::Normal`].
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            state: FenceState::Normal,
            dead: BTreeMap::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> &FenceState {
        &self.state
    }

    /// True in [`FenceState::Normal`]: protected guests may be started here (crash restarts,
    /// failovers, admin starts). False while fencing or fenced.
    pub fn may_start_guests(&self) -> bool {
        self.state == FenceState::Normal
    }

    /// When `peer`'s guests may be restarted: `last_seen + dead_after + fence_grace` while it is
    /// dead; `None` while it is not (or was heard again).
    pub fn restart_allowed_at(&self, peer: &str) -> Option<Instant> {
        self.dead.get(peer).map(|d| d.allowed_at)
    }

    /// Feeds the membership events of one tick (in order) and the time; returns decisions.
    pub fn update(&mut self, now: Instant, events: &[MembershipEvent]) -> Vec<FenceDecision> {
        let mut out = Vec::new();
        for ev in events {
            match ev {
                MembershipEvent::Isolated { last_contact } if self.state == FenceState::Normal => {
                    let deadline = *last_contact + self.timeouts.fence_deadline;
                    self.state = FenceState::Fencing {
                        last_contact: *last_contact,
                        deadline,
                        contact_back: false,
                    };
                    out.push(FenceDecision::FenceSelf {
                        last_contact: *last_contact,
                        deadline,
                        late: now >= deadline,
                    });
                }
                MembershipEvent::NotIsolated { .. } => match &mut self.state {
                    FenceState::Fencing { contact_back, .. } => *contact_back = true,
                    FenceState::Fenced { guests, .. } => {
                        out.push(FenceDecision::Rejoin {
                            fenced: std::mem::take(guests),
                        });
                        self.state = FenceState::Normal;
                    }
                    FenceState::Normal => {}
                },
                MembershipEvent::PeerDead { peer, last_seen } => {
                    self.dead.insert(
                        peer.clone(),
                        DeadPeer {
                            last_seen: *last_seen,
                            allowed_at: self.timeouts.restart_at(*last_seen),
                            issued: false,
                        },
                    );
                }
                MembershipEvent::PeerRejoined { peer, .. } => {
                    self.dead.remove(peer);
                }
                _ => {}
            }
        }
        if self.state == FenceState::Normal {
            for (peer, d) in &mut self.dead {
                if !d.issued && now >= d.allowed_at {
                    d.issued = true;
                    out.push(FenceDecision::RestartGuestsOf {
                        peer: peer.clone(),
                        last_seen: d.last_seen,
                    });
                }
            }
        }
        out
    }

    /// Reports the outcome of [`fence_guests`]. Complete → [`FenceState::Fenced`] (or straight
    /// back to normal with [`FenceDecision::Rejoin`] if contact already returned); incomplete →
    /// stays fencing with [`FenceDecision::FenceIncomplete`].
    pub fn fence_finished(&mut self, now: Instant, outcome: &FenceOutcome) -> Vec<FenceDecision> {
        let FenceState::Fencing {
            last_contact,
            contact_back,
            ..
        } = self.state
        else {
            return Vec::new();
        };
        if !outcome.complete() {
            return vec![FenceDecision::FenceIncomplete {
                still_running: outcome.failed.iter().map(|f| f.guest.clone()).collect(),
            }];
        }
        let guests = outcome.destroyed.clone();
        if contact_back {
            self.state = FenceState::Normal;
            return vec![FenceDecision::Rejoin { fenced: guests }];
        }
        self.state = FenceState::Fenced {
            last_contact,
            completed_at: now,
            guests,
        };
        Vec::new()
    }
}

/// The host watchdog (`/dev/watchdog`), driven by [`fence_guests`].
pub trait Watchdog: Send {
    /// Arms (or re-arms) the watchdog to reset the host after `timeout` unless disarmed.
    fn arm(&mut self, timeout: Duration) -> std::io::Result<()>;
    /// Disarms it (the fence completed; no reset needed).
    fn disarm(&mut self) -> std::io::Result<()>;
}

/// No watchdog device configured.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn arm(&mut self, _: Duration) -> std::io::Result<()> {
        Ok(())
    }
    fn disarm(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A watchdog that records what it was told (tests; `cfg(test)` or feature `fake`).
#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Default, Clone)]
pub struct RecordingWatchdog {
    /// `(when, Some(timeout))` for arm, `(when, None)` for disarm.
    pub calls: Vec<(Instant, Option<Duration>)>,
}

#[cfg(any(test, feature = "fake"))]
impl Watchdog for RecordingWatchdog {
    fn arm(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.calls.push((Instant::now(), Some(timeout)));
        Ok(())
    }
    fn disarm(&mut self) -> std::io::Result<()> {
        self.calls.push((Instant::now(), None));
        Ok(())
    }
}

/// A guest the fence could not confirm stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceFailure {
    pub guest: String,
    pub reason: String,
}

/// What [`fence_guests`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceOutcome {
    /// Destroyed by this fence.
    pub destroyed: Vec<String>,
    /// Already off or not defined here.
    pub already_off: Vec<String>,
    /// Not confirmed off (error, or still running at the deadline).
    pub failed: Vec<FenceFailure>,
    pub started_at: Instant,
    pub finished_at: Instant,
    pub deadline: Instant,
    /// The timeout the watchdog was armed with, if arming worked.
    pub watchdog_armed: Option<Duration>,
    /// Why arming or disarming the watchdog failed, if it did.
    pub watchdog_error: Option<String>,
}

impl FenceOutcome {
    /// Every guest is confirmed off.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// Complete, and by the deadline.
    pub fn in_time(&self) -> bool {
        self.complete() && self.finished_at <= self.deadline
    }
}

/// The watchdog timeout for a fence that must be done by `deadline`: the whole seconds left
/// (watchdog devices count in seconds), at least 1 s.
pub fn watchdog_timeout(now: Instant, deadline: Instant) -> Duration {
    Duration::from_secs(deadline.saturating_duration_since(now).as_secs().max(1))
}

/// Fences this host: arms the watchdog to fire by `deadline`, destroys every guest in `guests`
/// concurrently (each bounded by `deadline`), confirms each is off, and disarms the watchdog
/// only if all are. A guest whose destroy fails, hangs past the deadline or that still runs
/// afterwards is in [`FenceOutcome::failed`]; with the watchdog left armed, the host resets.
pub async fn fence_guests<V, W>(vmm: &V, watchdog: &mut W, guests: &[String], deadline: Instant) -> FenceOutcome
where
    V: Vmm + ?Sized,
    W: Watchdog + ?Sized,
{
    let started_at = Instant::now();
    let timeout = watchdog_timeout(started_at, deadline);
    let (mut watchdog_armed, mut watchdog_error) = (None, None);
    match watchdog.arm(timeout) {
        Ok(()) => watchdog_armed = Some(timeout),
        Err(e) => watchdog_error = Some(format!("cannot arm the watchdog: {e}")),
    }
    let mut sorted: Vec<&String> = guests.iter().collect();
    sorted.sort();
    sorted.dedup();
    let results = futures::future::join_all(sorted.iter().map(|g| async move {
        let r = tokio::time::timeout_at(deadline, async {
            match vmm.destroy(g).await {
                Ok(()) => Ok(true),
                Err(e) if matches!(e.kind, ErrorKind::NotFound) => Ok(false),
                Err(e) if matches!(e.kind, ErrorKind::InvalidState) => {
                    // Not running? Check, rather than trust the error kind.
                    match vmm.state(g).await {
                        Ok(s) if !s.is_active() => Ok(false),
                        Ok(s) => Err(format!("destroy refused ({e}) and it is still {s}")),
                        Err(se) => Err(format!("destroy refused ({e}) and its state is unknown: {se}")),
                    }
                }
                Err(e) => Err(error_chain(&e)),
            }
        })
        .await;
        ((*g).clone(), r)
    }))
    .await;

    let mut out = FenceOutcome {
        destroyed: Vec::new(),
        already_off: Vec::new(),
        failed: Vec::new(),
        started_at,
        finished_at: started_at,
        deadline,
        watchdog_armed,
        watchdog_error: None,
    };
    for (guest, r) in results {
        match r {
            Ok(Ok(true)) => out.destroyed.push(guest),
            Ok(Ok(false)) => out.already_off.push(guest),
            Ok(Err(reason)) => out.failed.push(FenceFailure { guest, reason }),
            Err(_) => out.failed.push(FenceFailure {
                guest,
                reason: "destroy did not finish by the fence deadline".into(),
            }),
        }
    }
    out.finished_at = Instant::now();
    if out.failed.is_empty()
        && out.watchdog_armed.is_some()
        && let Err(e) = watchdog.disarm()
    {
        watchdog_error = Some(format!("cannot disarm the watchdog: {e}"));
    }
    out.watchdog_error = watchdog_error;
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::DomainState;
    use crate::vmm::VmmOp;
    use crate::vmm::fake::FakeVmm;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn isolation_orders_a_fence_with_the_deadline() {
        let t = Timeouts::reference();
        let mut f = Fencer::new(t);
        let t0 = Instant::now();
        assert!(f.may_start_guests());
        let d = f.update(t0 + ms(2000), &[MembershipEvent::Isolated { last_contact: t0 }]);
        assert_eq!(
            d,
            vec![FenceDecision::FenceSelf {
                last_contact: t0,
                deadline: t0 + ms(4000),
                late: false
            }]
        );
        assert!(!f.may_start_guests());
        // A second Isolated while fencing orders nothing new.
        assert!(
            f.update(t0 + ms(2100), &[MembershipEvent::Isolated { last_contact: t0 }])
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn late_isolation_is_marked_late() {
        let mut f = Fencer::new(Timeouts::reference());
        let t0 = Instant::now();
        let d = f.update(t0 + ms(4500), &[MembershipEvent::Isolated { last_contact: t0 }]);
        assert!(matches!(d[0], FenceDecision::FenceSelf { late: true, .. }), "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn fence_destroys_concurrently_before_the_deadline_and_disarms() {
        let vmm = FakeVmm::new();
        vmm.set_delays(ms(500), ms(1500));
        for g in ["g1", "g2", "g3"] {
            vmm.add(g, DomainState::Running);
        }
        vmm.add("off", DomainState::ShutOff);
        let mut wd = RecordingWatchdog::default();
        let t0 = Instant::now();
        let deadline = t0 + ms(2000);
        let out = fence_guests(&vmm, &mut wd, &names(&["g3", "g1", "g2", "off", "ghost"]), deadline).await;
        assert_eq!(out.destroyed, names(&["g1", "g2", "g3"]));
        assert_eq!(out.already_off, names(&["ghost", "off"]));
        assert!(out.in_time(), "{out:?}");
        // Concurrent: three 1.5 s destroys finish together, not after 4.5 s.
        assert_eq!(out.finished_at - t0, ms(1500));
        assert!(vmm.active().is_empty());
        assert_eq!(wd.calls, vec![(t0, Some(ms(2000))), (t0 + ms(1500), None)]);
        assert_eq!(out.watchdog_armed, Some(ms(2000)));
    }

    #[tokio::test(start_paused = true)]
    async fn hung_destroy_fails_at_the_deadline_and_leaves_the_watchdog_armed() {
        let vmm = FakeVmm::new();
        vmm.add("stuck", DomainState::Running);
        vmm.add("ok", DomainState::Running);
        vmm.hang(VmmOp::Destroy, "stuck");
        let mut wd = RecordingWatchdog::default();
        let t0 = Instant::now();
        let out = fence_guests(&vmm, &mut wd, &names(&["stuck", "ok"]), t0 + ms(1700)).await;
        assert_eq!(out.destroyed, names(&["ok"]));
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].guest, "stuck");
        assert!(out.failed[0].reason.contains("deadline"), "{:?}", out.failed);
        assert_eq!(out.finished_at - t0, ms(1700));
        // Armed with whole seconds (1.7 s → 1 s), never disarmed.
        assert_eq!(wd.calls, vec![(t0, Some(ms(1000)))]);

        let mut f = Fencer::new(Timeouts::reference());
        f.update(t0, &[MembershipEvent::Isolated { last_contact: t0 }]);
        let d = f.fence_finished(t0 + ms(1700), &out);
        assert_eq!(
            d,
            vec![FenceDecision::FenceIncomplete {
                still_running: names(&["stuck"])
            }]
        );
        assert!(matches!(f.state(), FenceState::Fencing { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn destroy_error_on_a_running_guest_is_a_failure() {
        let vmm = FakeVmm::new();
        vmm.add("g", DomainState::Running);
        vmm.fail(VmmOp::Destroy, "g", ErrorKind::InvalidState);
        let mut wd = NoWatchdog;
        let out = fence_guests(&vmm, &mut wd, &names(&["g"]), Instant::now() + ms(2000)).await;
        assert_eq!(out.failed.len(), 1, "{out:?}");
        assert!(out.failed[0].reason.contains("still running"), "{:?}", out.failed);
        vmm.fail(VmmOp::Destroy, "g", ErrorKind::ConnectionLost);
        let out = fence_guests(&vmm, &mut wd, &names(&["g"]), Instant::now() + ms(2000)).await;
        assert!(out.failed[0].reason.contains("injected failure"), "{:?}", out.failed);
    }

    #[tokio::test(start_paused = true)]
    async fn fenced_host_stays_down_until_contact_then_rejoins_without_restarting() {
        let vmm = FakeVmm::new();
        vmm.add("g1", DomainState::Running);
        let mut f = Fencer::new(Timeouts::reference());
        let t0 = Instant::now();
        f.update(t0 + ms(2000), &[MembershipEvent::Isolated { last_contact: t0 }]);
        let out = fence_guests(&vmm, &mut NoWatchdog, &names(&["g1"]), t0 + ms(4000)).await;
        assert!(f.fence_finished(Instant::now(), &out).is_empty());
        assert!(matches!(f.state(), FenceState::Fenced { guests, .. } if guests == &names(&["g1"])));
        assert!(!f.may_start_guests());
        // A long time fenced: nothing happens.
        assert!(f.update(t0 + ms(60_000), &[]).is_empty());
        let d = f.update(t0 + ms(61_000), &[MembershipEvent::NotIsolated { isolated_since: t0 }]);
        assert_eq!(d, vec![FenceDecision::Rejoin { fenced: names(&["g1"]) }]);
        assert!(f.may_start_guests());
        assert!(!vmm.is_active("g1"), "rejoin must not restart fenced guests by itself");
    }

    #[tokio::test(start_paused = true)]
    async fn contact_back_during_fence_rejoins_when_it_finishes() {
        let mut f = Fencer::new(Timeouts::reference());
        let t0 = Instant::now();
        f.update(t0 + ms(2000), &[MembershipEvent::Isolated { last_contact: t0 }]);
        assert!(
            f.update(t0 + ms(2500), &[MembershipEvent::NotIsolated { isolated_since: t0 }])
                .is_empty()
        );
        let vmm = FakeVmm::new();
        vmm.add("g", DomainState::Running);
        let out = fence_guests(&vmm, &mut NoWatchdog, &names(&["g"]), t0 + ms(4000)).await;
        assert_eq!(
            f.fence_finished(Instant::now(), &out),
            vec![FenceDecision::Rejoin { fenced: names(&["g"]) }]
        );
        assert_eq!(f.state(), &FenceState::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn restart_never_before_last_seen_plus_dead_after_plus_grace() {
        let t = Timeouts::reference();
        let mut f = Fencer::new(t);
        let t0 = Instant::now();
        let last_seen = t0 + ms(123);
        let dead = MembershipEvent::PeerDead {
            peer: "b".into(),
            last_seen,
        };
        let allowed = last_seen + ms(5000);
        assert!(f.update(last_seen + ms(3000), &[dead]).is_empty());
        assert_eq!(f.restart_allowed_at("b"), Some(allowed));
        assert_eq!(f.restart_allowed_at("c"), None);
        // Every millisecond up to the allowed time: nothing.
        let mut now = last_seen + ms(3000);
        while now < allowed {
            assert!(
                f.update(now, &[]).is_empty(),
                "restart issued early at {:?}",
                now - last_seen
            );
            now += ms(1);
        }
        assert_eq!(
            f.update(allowed, &[]),
            vec![FenceDecision::RestartGuestsOf {
                peer: "b".into(),
                last_seen
            }]
        );
        // Once only.
        assert!(f.update(allowed + ms(1000), &[]).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_restart_while_fencing_and_none_after_the_peer_rejoined() {
        let mut f = Fencer::new(Timeouts::reference());
        let t0 = Instant::now();
        f.update(
            t0 + ms(3000),
            &[
                MembershipEvent::PeerDead {
                    peer: "b".into(),
                    last_seen: t0,
                },
                MembershipEvent::PeerDead {
                    peer: "c".into(),
                    last_seen: t0,
                },
                MembershipEvent::Isolated { last_contact: t0 },
            ],
        );
        // Isolated ourselves: no restarts, even past the allowed time.
        assert!(f.update(t0 + ms(9000), &[]).is_empty());
        let vmm = FakeVmm::new();
        let out = fence_guests(&vmm, &mut NoWatchdog, &[], t0 + ms(4000)).await;
        f.fence_finished(t0 + ms(9000), &out);
        assert!(f.update(t0 + ms(9500), &[]).is_empty());
        // b is heard again before we rejoin: its restart is cancelled; c's goes ahead.
        let d = f.update(
            t0 + ms(10_000),
            &[
                MembershipEvent::PeerRejoined {
                    peer: "b".into(),
                    dead_since: t0,
                },
                MembershipEvent::NotIsolated { isolated_since: t0 },
            ],
        );
        assert_eq!(
            d,
            vec![
                FenceDecision::Rejoin { fenced: vec![] },
                FenceDecision::RestartGuestsOf {
                    peer: "c".into(),
                    last_seen: t0
                }
            ]
        );
        assert_eq!(f.restart_allowed_at("b"), None);
    }

    #[test]
    fn watchdog_timeout_is_whole_seconds_at_least_one() {
        let t0 = Instant::now();
        assert_eq!(watchdog_timeout(t0, t0 + ms(2000)), ms(2000));
        assert_eq!(watchdog_timeout(t0, t0 + ms(2999)), ms(2000));
        assert_eq!(watchdog_timeout(t0, t0 + ms(300)), ms(1000));
        assert_eq!(watchdog_timeout(t0 + ms(5000), t0), ms(1000));
    }
}
