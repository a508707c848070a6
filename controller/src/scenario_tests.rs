//! Whole-pool timelines on paused tokio time: every host runs its own [`Membership`] and
//! [`Fencer`] over a simulated network and state-file, and acts through its own [`FakeVmm`].
//! The checks look at all hosts at once: a guest never runs on two hosts at the same instant.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, advance};

use crate::fence::{FenceDecision, FenceOutcome, Fencer, RecordingWatchdog, fence_guests};
use crate::libvirt::DomainState;
use crate::membership::{Membership, MembershipEvent, PeerSpec, Timeouts};
use crate::plan::{self, Guest, Host, Reserve};
use crate::vmm::Vmm;
use crate::vmm::fake::FakeVmm;

const STEP: Duration = Duration::from_millis(10);
const NETS: [&str; 3] = ["mgmt", "al1", "al2"];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Node {
    name: String,
    m: Membership,
    f: Fencer,
    vmm: FakeVmm,
    incarnation: u64,
    tick: u64,
    /// This host's own storage path works.
    storage: bool,
    fence: Option<tokio::task::JoinHandle<(FenceOutcome, RecordingWatchdog)>>,
    watchdog: Option<RecordingWatchdog>,
    events: Vec<(Instant, MembershipEvent)>,
    decisions: Vec<(Instant, FenceDecision)>,
    fence_outcome: Option<FenceOutcome>,
    /// Guests whose start this host called, with when.
    started: Vec<(Instant, String)>,
}

type Slots = BTreeMap<String, (u64, u64, Vec<String>)>;

struct World {
    t0: Instant,
    nodes: Vec<Node>,
    /// Directed (from, to, net) links that drop everything.
    cut: BTreeSet<(String, String, String)>,
    /// The shared state-file: host → (incarnation, tick, sees).
    slots: Arc<Mutex<Slots>>,
    hosts: Vec<Host>,
    guests: Vec<Guest>,
    /// Guest name → hosts where it was active at the same time, with when (violations).
    violations: Vec<(Instant, String, Vec<String>)>,
    /// Heartbeat, slot-write and tick periods in ms (from the timeouts).
    hb_ms: u128,
    slot_ms: u128,
    tick_ms: u128,
}

impl World {
    /// Hosts `names`, every pair connected on every network; each host's guests run on it.
    fn new(names: &[&str], guests: Vec<Guest>, destroy: Duration, start: Duration) -> Self {
        Self::with_timeouts(names, guests, destroy, start, Timeouts::reference())
    }

    /// [`World::new`] with timeouts `t` (e.g. the defaults).
    fn with_timeouts(names: &[&str], guests: Vec<Guest>, destroy: Duration, start: Duration, t: Timeouts) -> Self {
        let t0 = Instant::now();
        let nodes = names
            .iter()
            .map(|&n| {
                let peers = names.iter().filter(|&&p| p != n).map(|&p| PeerSpec::new(p, NETS));
                let vmm = FakeVmm::new();
                vmm.set_delays(start, destroy);
                for g in &guests {
                    let state = if g.host.as_deref() == Some(n) {
                        DomainState::Running
                    } else {
                        DomainState::ShutOff
                    };
                    vmm.add(&g.name, state);
                }
                Node {
                    name: n.to_owned(),
                    m: Membership::new(n, peers, t, t0).unwrap(),
                    f: Fencer::new(t),
                    vmm,
                    incarnation: 1,
                    tick: 0,
                    storage: true,
                    fence: None,
                    watchdog: None,
                    events: Vec::new(),
                    decisions: Vec::new(),
                    fence_outcome: None,
                    started: Vec::new(),
                }
            })
            .collect();
        let hosts = names
            .iter()
            .map(|&n| Host {
                name: n.into(),
                mem_mib: 8192,
                vcpus: 8,
                alive: true,
            })
            .collect();
        World {
            t0,
            hb_ms: t.heartbeat_interval.as_millis(),
            slot_ms: t.statefile_interval.as_millis(),
            tick_ms: (t.heartbeat_interval / 4).as_millis().max(10),
            nodes,
            cut: BTreeSet::new(),
            slots: Arc::default(),
            hosts,
            guests,
            violations: Vec::new(),
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn cut_net(&mut self, from: &str, to: &str, net: &str) {
        self.cut.insert((from.into(), to.into(), net.into()));
    }

    fn heal_net(&mut self, from: &str, to: &str, net: &str) {
        self.cut.remove(&(from.to_owned(), to.to_owned(), net.to_owned()));
    }

    /// Cuts every network of `host` in both directions.
    fn cut_all_nets(&mut self, host: &str) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for other in names.iter().filter(|n| *n != host) {
            for net in NETS {
                self.cut_net(host, other, net);
                self.cut_net(other, host, net);
            }
        }
    }

    fn set_storage(&mut self, host: &str, ok: bool) {
        self.nodes.iter_mut().find(|n| n.name == host).unwrap().storage = ok;
    }

    /// Simulated milliseconds since the start.
    fn ms(&self) -> u128 {
        (Instant::now() - self.t0).as_millis()
    }

    /// One 10 ms step: heartbeats and slot reads every heartbeat interval, slot writes every
    /// state-file interval, membership ticks every quarter heartbeat (the reference timing:
    /// 200 / 500 / 50 ms), fencing decisions, then the safety check.
    async fn step(&mut self) {
        advance(STEP).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let now = Instant::now();
        let t = self.ms();
        if t.is_multiple_of(self.hb_ms) {
            let sent: Vec<(String, Vec<String>)> = self.nodes.iter().map(|n| (n.name.clone(), n.m.sees(now))).collect();
            for (from, sees) in &sent {
                for to in self.nodes.iter_mut().filter(|n| &n.name != from) {
                    for net in NETS {
                        if !self.cut.contains(&(from.clone(), to.name.clone(), net.to_owned())) {
                            to.m.observe_heartbeat(from, net, now, sees).unwrap();
                        }
                    }
                }
            }
        }
        let mut slots = self.slots.lock().unwrap().clone();
        for n in &mut self.nodes {
            if t.is_multiple_of(self.slot_ms) {
                if n.storage {
                    n.tick += 1;
                    slots.insert(n.name.clone(), (n.incarnation, n.tick, n.m.sees(now)));
                }
                n.m.observe_statefile_io(n.storage, now);
            }
            if t.is_multiple_of(self.hb_ms) && n.storage {
                for (peer, (inc, tick, sees)) in slots.iter().filter(|(p, _)| **p != n.name) {
                    n.m.observe_slot_with_sees(peer, *inc, *tick, sees, now).unwrap();
                }
            }
        }
        *self.slots.lock().unwrap() = slots;
        if t.is_multiple_of(self.tick_ms) {
            let hosts = self.hosts.clone();
            let guests = self.guests.clone();
            for n in &mut self.nodes {
                let events = n.m.tick(now);
                let mut decisions = n.f.update(now, &events);
                n.events.extend(events.into_iter().map(|e| (now, e)));
                if let Some(h) = n.fence.take_if(|h| h.is_finished()) {
                    let (outcome, wd) = h.await.unwrap();
                    decisions.extend(n.f.fence_finished(now, &outcome));
                    n.fence_outcome = Some(outcome);
                    n.watchdog = Some(wd);
                }
                for d in &decisions {
                    match d {
                        FenceDecision::FenceSelf { deadline, .. } => {
                            let protected: Vec<String> = guests
                                .iter()
                                .filter(|g| g.protected && n.vmm.is_active(&g.name))
                                .map(|g| g.name.clone())
                                .collect();
                            let vmm = n.vmm.clone();
                            let deadline = *deadline;
                            n.fence = Some(tokio::spawn(async move {
                                let mut wd = RecordingWatchdog::default();
                                let out = fence_guests(&vmm, &mut wd, &protected, deadline).await;
                                (out, wd)
                            }));
                        }
                        FenceDecision::RestartGuestsOf { peer, .. } => {
                            let dead: Vec<String> = n.m.dead_peers().into_iter().collect();
                            assert!(dead.contains(peer));
                            let p = plan::place_failed(&hosts, &guests, &dead, Reserve::default()).unwrap();
                            for g in p.for_host(&n.name) {
                                // Only the dead peer's guests (place_failed covers all dead).
                                let from = guests.iter().find(|x| x.name == g).unwrap().host.clone();
                                if from.as_deref() != Some(peer.as_str()) {
                                    continue;
                                }
                                n.started.push((now, g.to_owned()));
                                let vmm = n.vmm.clone();
                                let g = g.to_owned();
                                tokio::spawn(async move { vmm.start(&g).await });
                            }
                        }
                        _ => {}
                    }
                }
                n.decisions.extend(decisions.into_iter().map(|d| (now, d)));
            }
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        // Safety: at no instant does a guest run on two hosts.
        for g in &self.guests {
            let on: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.vmm.is_active(&g.name))
                .map(|n| n.name.clone())
                .collect();
            if on.len() > 1 {
                self.violations.push((now, g.name.clone(), on));
            }
        }
    }

    async fn run_until(&mut self, ms_since_start: u64) {
        while Instant::now() < self.t0 + ms(ms_since_start) {
            self.step().await;
        }
    }

    fn assert_safe(&self) {
        assert!(
            self.violations.is_empty(),
            "a guest ran on two hosts: first at {:?} ms: {:?}",
            self.violations[0].0 - self.t0,
            self.violations[0]
        );
    }

    fn count(&self, host: &str, f: impl Fn(&MembershipEvent) -> bool) -> usize {
        self.node(host).events.iter().filter(|(_, e)| f(e)).count()
    }

    fn first_event(&self, host: &str, f: impl Fn(&MembershipEvent) -> bool) -> Option<(Instant, MembershipEvent)> {
        self.node(host).events.iter().find(|(_, e)| f(e)).cloned()
    }

    fn decisions(&self, host: &str, f: impl Fn(&FenceDecision) -> bool) -> Vec<(Instant, FenceDecision)> {
        self.node(host)
            .decisions
            .iter()
            .filter(|(_, d)| f(d))
            .cloned()
            .collect()
    }

    /// When `guest` became active on `host` (fake: when its start was called).
    fn active_since(&self, host: &str, guest: &str) -> Option<Instant> {
        self.node(host)
            .vmm
            .history()
            .into_iter()
            .filter(|(_, g, active)| g == guest && *active)
            .map(|(t, _, _)| t)
            .next_back()
    }

    /// When `guest` stopped on `host` (fake: when its destroy returned).
    fn stopped_at(&self, host: &str, guest: &str) -> Option<Instant> {
        self.node(host)
            .vmm
            .history()
            .into_iter()
            .filter(|(_, g, active)| g == guest && !*active)
            .map(|(t, _, _)| t)
            .next_back()
    }
}

fn protected(name: &str, host: &str) -> Guest {
    Guest {
        name: name.into(),
        mem_mib: 1024,
        vcpus: 1,
        host: Some(host.into()),
        protected: true,
        level: 1,
    }
}

fn is_dead(e: &MembershipEvent) -> bool {
    matches!(e, MembershipEvent::PeerDead { .. })
}

fn is_isolated(e: &MembershipEvent) -> bool {
    matches!(e, MembershipEvent::Isolated { .. })
}

#[tokio::test(start_paused = true)]
async fn isolated_host_fences_before_the_survivor_restarts() {
    // TCG-like timings: destroy 1.5 s, start 0.5 s.
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
    w.run_until(5_000).await;
    assert!(w.node("a").vmm.is_active("g"));
    assert_eq!(w.count("a", is_dead) + w.count("b", is_dead), 0);
    // A loses every network and its storage at 5 s.
    w.cut_all_nets("a");
    w.set_storage("a", false);
    w.run_until(20_000).await;
    w.assert_safe();

    // A's view: isolated 2 s after its last contact, fenced by its deadline.
    let (iso_at, iso) = w.first_event("a", is_isolated).expect("a isolates itself");
    let MembershipEvent::Isolated { last_contact } = iso else {
        unreachable!()
    };
    assert!(last_contact <= w.t0 + ms(5000), "{:?}", last_contact - w.t0);
    assert!(iso_at >= last_contact + ms(2000) && iso_at < last_contact + ms(2100));
    let out = w.node("a").fence_outcome.clone().expect("fence finished");
    assert!(out.in_time(), "{out:?}");
    assert_eq!(out.destroyed, ["g"]);
    let a_stopped = w.stopped_at("a", "g").unwrap();
    assert!(a_stopped <= last_contact + ms(4000));
    // Watchdog armed for the remaining whole seconds, then disarmed.
    let wd = w.node("a").watchdog.clone().unwrap();
    assert_eq!(wd.calls.len(), 2);
    assert_eq!(wd.calls[1].1, None);

    // B's view: dead 3 s after its last sight of A, restart not before +5 s.
    let (dead_at, dead) = w.first_event("b", is_dead).expect("b declares a dead");
    let MembershipEvent::PeerDead { last_seen, .. } = dead else {
        unreachable!()
    };
    assert!(dead_at >= last_seen + ms(3000));
    let restarts = w.decisions("b", |d| matches!(d, FenceDecision::RestartGuestsOf { .. }));
    assert_eq!(restarts.len(), 1);
    assert!(restarts[0].0 >= last_seen + ms(5000));
    let b_started = w.active_since("b", "g").expect("b restarted g");
    assert!(b_started >= last_seen + ms(5000));
    // The two timelines: A's guest was gone well before B's started.
    assert!(
        b_started - a_stopped >= Timeouts::reference().heartbeat_interval,
        "margin {:?}",
        b_started - a_stopped
    );
    assert!(w.node("b").vmm.is_active("g") && !w.node("a").vmm.is_active("g"));
    // Total: failure at 5 s → guest running on B.
    let total = b_started - (w.t0 + ms(5000));
    assert!(total <= ms(5500), "failover took {total:?}");
    // A stays fenced (no contact): nothing protected may start there.
    assert!(!w.node("a").f.may_start_guests());
}

#[tokio::test(start_paused = true)]
async fn one_way_cut_still_fences_before_the_restart() {
    // The worst case for the margin: B stops hearing A (A→B dropped on every network) while
    // A still hears B, and A's storage fails. A's mutual contact ends only when B's `sees`
    // stops naming it, up to two heartbeats later than B's last sight of A.
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1900), ms(500));
    w.run_until(5_000).await;
    for net in NETS {
        w.cut_net("a", "b", net);
    }
    w.set_storage("a", false);
    w.run_until(20_000).await;
    w.assert_safe();
    let (_, iso) = w.first_event("a", is_isolated).expect("a isolates itself");
    let MembershipEvent::Isolated { last_contact } = iso else {
        unreachable!()
    };
    let (_, dead) = w.first_event("b", is_dead).expect("b declares a dead");
    let MembershipEvent::PeerDead { last_seen, .. } = dead else {
        unreachable!()
    };
    assert!(last_contact > last_seen, "a's contact outlives b's sight of it");
    let a_stopped = w.stopped_at("a", "g").unwrap();
    let b_started = w.active_since("b", "g").unwrap();
    assert!(a_stopped <= last_contact + ms(4000));
    eprintln!(
        "one-way: b last saw a at +{:?}, a's last contact +{:?}, a's guest off +{:?}, b started it +{:?}",
        last_seen - w.t0,
        last_contact - w.t0,
        a_stopped - w.t0,
        b_started - w.t0
    );
    assert!(
        b_started - a_stopped >= Timeouts::reference().heartbeat_interval,
        "{:?}",
        b_started - a_stopped
    );
    // A still hears B, so A never declares B dead.
    assert_eq!(w.count("a", is_dead), 0);
}

#[tokio::test(start_paused = true)]
async fn hung_destroy_is_left_to_the_watchdog_before_the_restart() {
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
    w.node("a").vmm.hang(crate::vmm::VmmOp::Destroy, "g");
    w.run_until(5_000).await;
    w.cut_all_nets("a");
    w.set_storage("a", false);
    w.run_until(12_000).await;
    let out = w
        .node("a")
        .fence_outcome
        .clone()
        .expect("fence gave up at the deadline");
    assert!(!out.complete());
    let wd = w.node("a").watchdog.clone().unwrap();
    // Armed with whole seconds that expire by the deadline, never disarmed: the host resets
    // (at ≤ deadline) before B restarts (≥ deadline + 1 s). The fake cannot reset; check times.
    assert_eq!(wd.calls.len(), 1);
    let (armed_at, Some(timeout)) = wd.calls[0] else {
        panic!()
    };
    assert!(armed_at + timeout <= out.deadline);
    let restarts = w.decisions("b", |d| matches!(d, FenceDecision::RestartGuestsOf { .. }));
    assert_eq!(restarts.len(), 1);
    assert!(restarts[0].0 >= out.deadline + Timeouts::reference().heartbeat_interval);
    assert!(
        w.decisions("a", |d| matches!(d, FenceDecision::FenceIncomplete { .. }))
            .len()
            == 1
    );
}

#[tokio::test(start_paused = true)]
async fn state_file_alive_means_no_failover_with_every_network_cut() {
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
    w.run_until(5_000).await;
    w.cut_all_nets("a");
    w.run_until(60_000).await;
    w.assert_safe();
    for h in ["a", "b"] {
        assert_eq!(w.count(h, is_dead), 0, "{h}");
        assert_eq!(w.count(h, is_isolated), 0, "{h}");
        // One redundancy-lost event per network.
        assert_eq!(w.count(h, MembershipEvent::is_redundancy_loss), 3, "{h}");
    }
    assert!(w.node("a").vmm.is_active("g"));
    assert!(!w.node("b").vmm.is_active("g"));
}

#[tokio::test(start_paused = true)]
async fn management_cut_only_or_al_cut_only_is_an_event_only() {
    for cut in [&["mgmt"][..], &["al1", "al2"][..]] {
        let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
        w.run_until(3_000).await;
        for net in cut {
            w.cut_net("a", "b", net);
            w.cut_net("b", "a", net);
        }
        w.run_until(30_000).await;
        w.assert_safe();
        for h in ["a", "b"] {
            assert_eq!(w.count(h, is_dead), 0);
            assert_eq!(w.count(h, is_isolated), 0);
            assert_eq!(
                w.count(h, MembershipEvent::is_redundancy_loss),
                cut.len(),
                "{h} {cut:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn state_file_lost_everywhere_with_networks_up_is_an_event_only() {
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
    w.run_until(3_000).await;
    w.set_storage("a", false);
    w.set_storage("b", false);
    w.run_until(30_000).await;
    w.assert_safe();
    for h in ["a", "b"] {
        assert_eq!(w.count(h, is_dead), 0);
        assert_eq!(w.count(h, is_isolated), 0);
        assert_eq!(w.count(h, |e| matches!(e, MembershipEvent::StateFileLost { .. })), 1);
        // The peer's slot channel goes down too.
        assert_eq!(w.count(h, MembershipEvent::is_redundancy_loss), 2);
    }
    assert!(w.node("a").vmm.is_active("g"));
}

#[tokio::test(start_paused = true)]
async fn fenced_host_rejoins_without_restarting_and_the_survivor_keeps_the_guest() {
    let mut w = World::new(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500));
    w.run_until(5_000).await;
    w.cut_all_nets("a");
    w.set_storage("a", false);
    w.run_until(15_000).await;
    // Repair: A's networks and storage return.
    w.cut.clear();
    w.set_storage("a", true);
    w.run_until(25_000).await;
    w.assert_safe();
    let rejoin = w.decisions("a", |d| matches!(d, FenceDecision::Rejoin { .. }));
    assert_eq!(rejoin.len(), 1);
    assert_eq!(
        rejoin[0].1,
        FenceDecision::Rejoin {
            fenced: vec!["g".into()]
        }
    );
    assert!(w.node("a").f.may_start_guests());
    assert_eq!(w.count("b", |e| matches!(e, MembershipEvent::PeerRejoined { .. })), 1);
    assert!(w.node("b").vmm.is_active("g"));
    assert!(!w.node("a").vmm.is_active("g"));
}

#[tokio::test(start_paused = true)]
async fn three_hosts_partial_cut_keeps_everyone_alive_then_one_survivor_restarts() {
    let guests = vec![protected("g1", "a"), protected("g2", "a"), protected("h", "b")];
    let mut w = World::new(&["a", "b", "c"], guests, ms(1500), ms(500));
    w.run_until(5_000).await;
    // A loses its networks to B and its storage, but still talks to C.
    for net in NETS {
        w.cut_net("a", "b", net);
        w.cut_net("b", "a", net);
    }
    w.set_storage("a", false);
    w.run_until(30_000).await;
    w.assert_safe();
    for h in ["a", "b", "c"] {
        assert_eq!(w.count(h, is_dead), 0, "{h}: a is heard through c, nobody is dead");
        assert_eq!(w.count(h, is_isolated), 0, "{h}");
    }
    // Now A loses C too: isolated; B and C both see it dead, but only the host the plan
    // names starts each guest.
    w.cut_all_nets("a");
    w.run_until(45_000).await;
    w.assert_safe();
    assert_eq!(w.count("a", is_isolated), 1);
    assert_eq!(w.count("b", is_dead), 1);
    assert_eq!(w.count("c", is_dead), 1);
    let mut started: Vec<(String, String)> = ["b", "c"]
        .iter()
        .flat_map(|h| w.node(h).started.iter().map(move |(_, g)| (g.clone(), h.to_string())))
        .collect();
    started.sort();
    // First fit: both go to b (8192 MiB offered, 1024 used by h).
    assert_eq!(
        started,
        vec![("g1".to_string(), "b".to_string()), ("g2".to_string(), "b".to_string())]
    );
}

/// The flapping soak: 30 simulated minutes; one channel at a time goes out for 0.1–2.9 s
/// (nets: one direction or both; the state-file: one host's storage), then comes back; now
/// and then every network at once for 0.1–0.9 s. Deterministic schedule from `seed`.
/// Returns the world (checked safe) and the number of outages.
async fn flapping_soak(t: Timeouts, seed: u64) -> (World, usize) {
    let mut w = World::with_timeouts(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500), t);
    let mut seed = seed;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut at = 2_000u64;
    let end = 30 * 60 * 1000;
    let mut outages = 0;
    while at < end {
        w.run_until(at).await;
        let len = 100 + rand(2800);
        let kind = rand(10);
        let (a, b) = if rand(2) == 0 { ("a", "b") } else { ("b", "a") };
        if kind < 6 {
            let net = NETS[rand(3) as usize];
            w.cut_net(a, b, net);
            if kind < 3 {
                w.cut_net(b, a, net);
            }
            w.run_until(at + len).await;
            w.heal_net(a, b, net);
            w.heal_net(b, a, net);
        } else if kind < 9 {
            w.set_storage(a, false);
            w.run_until(at + len).await;
            w.set_storage(a, true);
        } else {
            let short = 100 + rand(800);
            w.cut_all_nets(a);
            w.run_until(at + short).await;
            w.cut.clear();
        }
        outages += 1;
        at += len + 500 + rand(3000);
    }
    w.run_until(end).await;
    w.assert_safe();
    (w, outages)
}

#[tokio::test(start_paused = true)]
async fn flapping_channels_soak_never_declares_anyone_dead() {
    // 30 simulated minutes. One channel at a time goes out for 0.1–2.9 s (nets: one direction or
    // both; the state-file: one host's storage), then comes back; now and then every network at
    // once for < channel_timeout. Deterministic pseudo-random schedule.
    let (w, outages) = flapping_soak(Timeouts::reference(), 0x2545_f491_4f6c_dd1d).await;
    eprintln!(
        "soak: 30 simulated minutes, {outages} outages, {} redundancy-lost events on a, {} on b",
        w.count("a", MembershipEvent::is_redundancy_loss),
        w.count("b", MembershipEvent::is_redundancy_loss)
    );
    assert!(outages > 500, "{outages}");
    for h in ["a", "b"] {
        assert_eq!(w.count(h, is_dead), 0, "{h}");
        assert_eq!(w.count(h, is_isolated), 0, "{h}");
        assert!(
            w.decisions(h, |_| true).is_empty(),
            "{h}: {:?}",
            w.decisions(h, |_| true)
        );
        // The soak did hurt: channels went down and came back, many times.
        assert!(w.count(h, MembershipEvent::is_redundancy_loss) > 100, "{h}");
    }
    assert!(w.node("a").vmm.is_active("g"));
}

/// Every way to split `hosts` into network components (set partitions).
fn set_partitions(hosts: &[&str]) -> Vec<Vec<Vec<String>>> {
    let Some((first, rest)) = hosts.split_first() else {
        return vec![Vec::new()];
    };
    let mut out = Vec::new();
    for p in set_partitions(rest) {
        // `first` alone, or added to each existing block.
        let mut alone = p.clone();
        alone.push(vec![first.to_string()]);
        out.push(alone);
        for i in 0..p.len() {
            let mut q = p.clone();
            q[i].push(first.to_string());
            out.push(q);
        }
    }
    out
}

/// Issue 13 §4: every partition shape of 2 and 3 hosts — each way to split the heartbeat
/// networks into components, times each subset of hosts that keep the state-file — after a
/// healthy start. In every shape: no guest ever runs on two hosts, and the hosts that may
/// still change the pool configuration (not fencing, every peer they do not consider dead
/// reachable in their own component) all lie in one component, so no two sides of a
/// partition can both commit a change.
#[tokio::test(start_paused = true)]
async fn every_partition_shape_of_two_and_three_hosts_is_safe() {
    let mut shapes = 0;
    let mut report = Vec::new();
    for names in [&["a", "b"][..], &["a", "b", "c"][..]] {
        for parts in set_partitions(names) {
            for mask in 0..(1u32 << names.len()) {
                let storage: Vec<bool> = (0..names.len()).map(|i| mask & (1 << i) != 0).collect();
                let guests: Vec<Guest> = names.iter().map(|h| protected(&format!("g{h}"), h)).collect();
                for t in [Timeouts::reference(), Timeouts::default()] {
                    let mut w = World::with_timeouts(names, guests.clone(), ms(1500), ms(500), t);
                    w.run_until(4_000).await;
                    let comp = |h: &str| parts.iter().position(|b| b.iter().any(|x| x == h)).unwrap();
                    for x in names {
                        for y in names {
                            if x != y && comp(x) != comp(y) {
                                for net in NETS {
                                    w.cut_net(x, y, net);
                                }
                            }
                        }
                    }
                    for (i, h) in names.iter().enumerate() {
                        w.set_storage(h, storage[i]);
                    }
                    w.run_until(20_000).await;
                    shapes += 1;
                    let shape = format!(
                        "{} storage [{}]",
                        parts.iter().map(|b| b.join("")).collect::<Vec<_>>().join("|"),
                        names
                            .iter()
                            .zip(&storage)
                            .filter(|(_, s)| **s)
                            .map(|(h, _)| *h)
                            .collect::<Vec<_>>()
                            .join("")
                    );
                    assert!(
                        w.violations.is_empty(),
                        "{shape}: a guest ran on two hosts: {:?}",
                        w.violations.first()
                    );
                    let committers: BTreeSet<usize> = names
                        .iter()
                        .filter(|h| {
                            let n = w.node(h);
                            n.f.may_start_guests()
                                && names.iter().filter(|p| p != h).all(|p| {
                                    n.m.state(p) == Some(crate::membership::PeerState::Dead) || comp(p) == comp(h)
                                })
                        })
                        .map(|h| comp(h))
                        .collect();
                    assert!(
                        committers.len() <= 1,
                        "{shape}: two sides may change the pool: {committers:?}"
                    );
                    let running: Vec<String> = names
                        .iter()
                        .flat_map(|h| {
                            let n = w.node(h);
                            names
                                .iter()
                                .filter(|g| n.vmm.is_active(&format!("g{g}")))
                                .map(move |g| format!("g{g}@{h}"))
                        })
                        .collect();
                    if t == Timeouts::default() {
                        report.push(format!("{shape:<22} running {running:?}"));
                    }
                }
            }
        }
    }
    for r in &report {
        eprintln!("{r}");
    }
    // 2 hosts: 2 partitions × 4 storage subsets; 3 hosts: 5 × 8; both timings.
    assert_eq!(shapes, 2 * (2 * 4 + 5 * 8));
}

/// Issue 13 §6: with the default timeouts, host death → guest running on the survivor in
/// ≤ 4 s, and the isolated host's guest is off before the survivor starts it (TCG-like
/// operation times: destroy 1.5 s, start 0.5 s).
#[tokio::test(start_paused = true)]
async fn default_timeouts_fail_over_within_4_s_and_fence_first() {
    let t = Timeouts::default();
    let mut w = World::with_timeouts(&["a", "b"], vec![protected("g", "a")], ms(1500), ms(500), t);
    w.run_until(5_000).await;
    assert_eq!(w.count("a", is_dead) + w.count("b", is_dead), 0);
    w.cut_all_nets("a");
    w.set_storage("a", false);
    w.run_until(15_000).await;
    w.assert_safe();
    let out = w.node("a").fence_outcome.clone().expect("fence finished");
    assert!(out.in_time(), "{out:?}");
    let a_stopped = w.stopped_at("a", "g").unwrap();
    let b_started = w.active_since("b", "g").expect("b restarted g");
    assert!(
        b_started - a_stopped >= t.heartbeat_interval,
        "margin {:?}",
        b_started - a_stopped
    );
    // The start call returns 0.5 s after b_started (the fake's start time).
    let total = b_started + ms(500) - (w.t0 + ms(5000));
    eprintln!("default timeouts: failure at 5 s → guest running on b after {total:?}");
    assert!(total <= ms(4000), "failover took {total:?}");
}

/// The flapping soak of `flapping_channels_soak_never_declares_anyone_dead`, with the default
/// (faster) timeouts: one channel at a time out for 0.1–2.9 s, sometimes every network for
/// up to 0.9 s, for 30 simulated minutes: nobody dead, nobody isolated, no decision.
#[tokio::test(start_paused = true)]
async fn default_timeouts_flapping_soak_never_declares_anyone_dead() {
    let (w, outages) = flapping_soak(Timeouts::default(), 0x9e37_79b9_7f4a_7c15).await;
    assert!(outages > 500, "{outages}");
    for h in ["a", "b"] {
        assert_eq!(w.count(h, is_dead), 0, "{h}");
        assert_eq!(w.count(h, is_isolated), 0, "{h}");
        assert!(
            w.decisions(h, |_| true).is_empty(),
            "{h}: {:?}",
            w.decisions(h, |_| true)
        );
    }
    assert!(w.node("a").vmm.is_active("g"));
}
