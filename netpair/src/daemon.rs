//! The netpair daemon: one per host. It attaches the data path, watches link state
//! (rtnetlink), probes its own application path (ARP), exchanges observations with the
//! partner over both availability links (authenticated, [`crate::proto`]), lets the
//! [`Judge`] decide, applies the decisions to the data path, announces guests where they
//! move (gratuitous ARP / unsolicited NA), and answers `status` on a unix control socket.
//!
//! Everything runs on one task: a `select!` over timers, sockets and link events. Time is
//! tokio time, so the loop can be driven on paused time.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UdpSocket, UnixListener},
    time::{Instant, MissedTickBehavior},
};

use crate::{
    Datapath, Error, Mac, Role,
    config::{Config, Guest},
    control::{self, Action, ApiError, Request},
    damping::DampEvent,
    decide::{Change, Evidence, GuestEvent, Judge, PartnerView},
    link,
    links::{Health, LinkEvent, Links, health_word},
    packet::{Announcer, AsyncArpProber},
    proto::{Body, GuestObservation, Observation, Opener, ProtoError, Sealer},
    stall::StallClock,
};

/// A message older than the last accepted one by at most this many is the other link's
/// copy, reordered: it still proves that its link works.
const REORDER_WINDOW: u64 = 64;

/// At most this many queued datagrams are read per wake-up before judging.
const DRAIN_MAX: usize = 256;

/// How many events `status` keeps (and `status --json` returns, newest first). A flapping
/// path produced 40 path changes in 30 s in issue 12's lab: keep minutes of that.
const EVENTS_KEPT: usize = 256;

#[derive(Clone, Debug, serde::Serialize)]
struct Event {
    at_ms: u64,
    level: &'static str,
    what: String,
}

struct Al {
    iface: String,
    sock: UdpSocket,
    peer: SocketAddr,
}

struct PartnerState {
    host: String,
    view: PartnerView,
    guests: BTreeMap<Mac, GuestObservation>,
    probe_age_ms: u32,
}

struct State {
    cfg: Config,
    start: Instant,
    dp: Datapath,
    judge: Judge,
    app_carrier: bool,
    last_probe_reply_ms: Option<u64>,
    als: Vec<Al>,
    /// Per-link health from per-link arrivals, and the link steered frames use.
    links: Links,
    partner: Option<PartnerState>,
    partner_fresh: bool,
    own_ok: bool,
    sealer: Sealer,
    opener: Opener,
    announcer: Announcer,
    events: VecDeque<Event>,
    /// Stalls of this loop ([`crate::stall`]), told to the judge.
    stalls: StallClock,
    /// The scheduling policy in effect, as `status` shows it.
    sched: String,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn event(&mut self, level: &'static str, what: String) {
        match level {
            "error" => tracing::error!("{what}"),
            "warn" => tracing::warn!("{what}"),
            _ => tracing::info!("{what}"),
        }
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        let at_ms = self.now_ms();
        self.events.push_back(Event { at_ms, level, what });
    }

    fn guest(&self, mac: Mac) -> Option<&Guest> {
        self.cfg.guests.iter().find(|g| g.mac == mac)
    }

    fn evidence(&self) -> Evidence {
        Evidence {
            now_ms: self.now_ms(),
            own_carrier: self.app_carrier,
            own_last_probe_reply_ms: self.last_probe_reply_ms,
            partner: self.partner.as_ref().map(|p| p.view.clone()),
            al_usable: self.links.usable(),
        }
    }

    /// Re-judges; applies and announces changes; reports redundancy transitions.
    fn evaluate(&mut self) {
        let link_events = self.links.evaluate(self.now_ms());
        self.apply_link_events(link_events);
        let ev = self.evidence();
        let own_ok = self.judge.own_path_ok(&ev);
        if own_ok != self.own_ok {
            self.own_ok = own_ok;
            if own_ok {
                self.event(
                    "info",
                    format!("application path on {} works again", self.cfg.app_iface),
                );
            } else {
                let why = if !ev.own_carrier {
                    "carrier lost".to_owned()
                } else {
                    "probes unanswered".to_owned()
                };
                self.event(
                    "warn",
                    format!("application path on {} failing: {why}", self.cfg.app_iface),
                );
            }
        }
        let fresh = ev
            .partner
            .as_ref()
            .is_some_and(|p| ev.now_ms.saturating_sub(p.received_ms) <= self.cfg.timing.peer_timeout);
        if fresh != self.partner_fresh {
            self.partner_fresh = fresh;
            if fresh {
                self.event("info", "partner reachable over the availability links".into());
            } else {
                self.event(
                    "error",
                    "loss of redundancy: partner silent on every availability link; traffic stays where it is".into(),
                );
            }
        }
        let changes = self.judge.evaluate(&ev);
        for e in self.judge.take_damp_events() {
            let app = self.cfg.app_iface.clone();
            let d = self.cfg.damping;
            match e {
                DampEvent::Suppressed { penalty, until_ms } => self.event(
                    "warn",
                    format!(
                        "application path on {app} suppressed by flap damping: it failed again after healing (penalty {penalty:.0} above {}); not trusted for at least {} ms, traffic stays through the partner while it can",
                        d.suppress,
                        until_ms.saturating_sub(ev.now_ms)
                    ),
                ),
                DampEvent::Reused {
                    penalty,
                    suppressed_for_ms,
                } => self.event(
                    "info",
                    format!(
                        "application path on {app} trusted again: flap damping penalty decayed to {penalty:.0} (below {}) after {suppressed_for_ms} ms suppressed",
                        d.reuse
                    ),
                ),
            }
        }
        if !changes.is_empty() {
            self.apply(changes);
        }
        for e in self.judge.take_guest_events() {
            match e {
                GuestEvent::CutOff { mac, why } => {
                    let name = self.guest(mac).map(|g| g.name.clone()).unwrap_or_default();
                    self.event(
                        "error",
                        format!("guest {name} ({mac}) cut off: nothing carries its traffic: {why}"),
                    );
                }
                GuestEvent::Restored { mac, after_ms, how } => {
                    let name = self.guest(mac).map(|g| g.name.clone()).unwrap_or_default();
                    self.event(
                        "info",
                        format!("guest {name} ({mac}) no longer cut off after {after_ms} ms: {how}"),
                    );
                }
            }
        }
    }

    fn apply(&mut self, changes: Vec<Change>) {
        for c in changes {
            let name = self.guest(c.mac).map(|g| g.name.clone()).unwrap_or_default();
            if let Err(e) = self.dp.set_steer(c.mac, c.steer) {
                self.event(
                    "error",
                    format!(
                        "guest {name} ({}): cannot change steering: {}",
                        c.mac,
                        eac_common::error_chain(&e)
                    ),
                );
                continue;
            }
            let what = match (c.role, c.steer) {
                (Role::Local, true) => "traffic now through the partner's NIC",
                (Role::Local, false) => "traffic back on our NIC",
                (Role::Partner, true) => "lending our NIC to the partner's guest",
                (Role::Partner, false) => "no longer lending our NIC",
            };
            self.event(
                "warn",
                format!("path change: guest {name} ({}): {what}: {}", c.mac, c.why),
            );
            // The switch must learn the guest's MAC on the port its traffic now uses.
            if matches!((c.role, c.steer), (Role::Partner, true) | (Role::Local, false)) {
                self.announce(c.mac);
            }
        }
        self.send_observation();
    }

    fn announce(&mut self, mac: Mac) {
        let Some(g) = self.guest(mac).cloned() else { return };
        if let Some(ip) = g.ip
            && let Err(e) = self.announcer.ipv4(mac.0, ip)
        {
            self.event("error", format!("guest {}: {e}", g.name));
        }
        if let Some(ip6) = g.ipv6
            && let Err(e) = self.announcer.ipv6(mac.0, ip6)
        {
            self.event("error", format!("guest {}: {e}", g.name));
        }
    }

    /// Our counters per guest (empty if the maps cannot be read; logged by the caller's use).
    fn guest_stats(&self) -> BTreeMap<Mac, ebpf_common::GuestStats> {
        match self.dp.guests() {
            Ok(g) => g.into_iter().map(|(m, _, s)| (m, s)).collect(),
            Err(e) => {
                tracing::warn!(error = %eac_common::error_chain(&e), "reading the per-guest counters");
                BTreeMap::new()
            }
        }
    }

    fn observation(&self) -> Observation {
        let now = self.now_ms();
        let requests = self.judge.requests();
        let stats = self.guest_stats();
        let mono_now_ns = mono_ns();
        Observation {
            app_carrier: self.app_carrier,
            probe_ok: self.own_ok,
            probe_age_ms: self
                .last_probe_reply_ms
                .map_or(u32::MAX, |t| now.saturating_sub(t).min(u64::from(u32::MAX - 1)) as u32),
            guests: self
                .cfg
                .guests
                .iter()
                .map(|g| {
                    let s = stats.get(&g.mac).copied().unwrap_or_default();
                    GuestObservation {
                        mac: g.mac.0,
                        rx_packets: s.rx_packets,
                        tx_packets: s.tx_packets,
                        last_rx_age_ms: if s.last_rx_ns == 0 {
                            u32::MAX
                        } else {
                            (mono_now_ns.saturating_sub(s.last_rx_ns) / 1_000_000).min(u64::from(u32::MAX - 1)) as u32
                        },
                        steering_requested: requests.contains(&g.mac),
                    }
                })
                .collect(),
        }
    }

    /// Sends our observation over every availability link that has carrier.
    fn send_observation(&mut self) {
        let datagram = self.sealer.seal(Body::Observation(self.observation()));
        for (i, al) in self.als.iter().enumerate() {
            if !self.links.carrier(i) {
                continue;
            }
            if let Err(e) = al.sock.try_send_to(&datagram, al.peer) {
                tracing::debug!(iface = al.iface, error = %e, "observation not sent");
            }
        }
    }

    fn on_datagram(&mut self, al_index: usize, from: SocketAddr, bytes: &[u8]) {
        if from.ip() != self.als[al_index].peer.ip() {
            tracing::warn!(%from, iface = self.als[al_index].iface, expected = %self.als[al_index].peer.ip(),
                "pairing message rejected: not from the configured partner address");
            return;
        }
        let now = self.now_ms();
        let msg = match self.opener.open(from, bytes) {
            Ok(m) => m,
            Err(e) if is_copy(&e) => {
                // The same message over the other AL (or reordered between the two): dropped,
                // but it arrived over this link, which therefore works.
                tracing::debug!(%from, iface = self.als[al_index].iface, reason = %e, "second copy");
                self.links.heard(al_index, now);
                return;
            }
            Err(e) => {
                tracing::warn!(%from, iface = self.als[al_index].iface, reason = %e, "pairing message rejected");
                return;
            }
        };
        self.links.heard(al_index, now);
        let Body::Observation(o) = msg.body;
        let guests: BTreeMap<Mac, GuestObservation> = o.guests.into_iter().map(|g| (Mac(g.mac), g)).collect();
        let requests = guests
            .values()
            .filter(|g| g.steering_requested)
            .map(|g| Mac(g.mac))
            .collect();
        self.partner = Some(PartnerState {
            host: msg.host,
            view: PartnerView {
                received_ms: now,
                carrier: o.app_carrier,
                probe_ok: o.probe_ok,
                requests,
            },
            guests,
            probe_age_ms: o.probe_age_ms,
        });
    }

    /// Reads every datagram already queued on the availability links (up to [`DRAIN_MAX`]),
    /// so that a judgement after a wake-up sees every link's arrivals, not one link's.
    fn drain_als(&mut self, buf: &mut [u8]) {
        for _ in 0..DRAIN_MAX {
            let mut got = false;
            for i in 0..self.als.len() {
                match self.als[i].sock.try_recv_from(buf) {
                    Ok((n, from)) => {
                        got = true;
                        let bytes = buf[..n].to_vec();
                        self.on_datagram(i, from, &bytes);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => tracing::debug!(iface = self.als[i].iface, error = %e, "AL socket"),
                }
            }
            if !got {
                return;
            }
        }
    }

    /// A batch of probe replies read now: any from a probe target proves our path works.
    fn on_replies(&mut self, replies: &[(std::net::Ipv4Addr, [u8; 6])]) {
        if replies.iter().any(|(ip, _)| self.cfg.probe_targets.contains(ip)) {
            self.last_probe_reply_ms = Some(self.now_ms());
        }
    }

    /// Runs after every wake-up of the loop: notes whether the loop itself was stalled
    /// (then missing replies in that time are no evidence: [`crate::stall`]), reads every
    /// pairing message and probe reply already queued, each stamped when read, and only
    /// then judges — so a late wake-up never judges on half its input.
    fn settle(&mut self, prober: Option<&AsyncArpProber>, buf: &mut [u8]) {
        if let Some(s) = self.stalls.woke(self.now_ms()) {
            self.judge.stalled(s);
            if s.len_ms() >= self.cfg.timing.probe_loss {
                tracing::info!(
                    stalled_ms = s.len_ms(),
                    "netpair was not running for {} ms (not scheduled, or stopped): missing probe replies in that time are not counted; judging after reading what arrived",
                    s.len_ms()
                );
            } else {
                tracing::debug!(stalled_ms = s.len_ms(), "loop woke late");
            }
        }
        self.drain_als(buf);
        if let Some(p) = prober {
            match p.try_recv_replies() {
                Ok(r) => self.on_replies(&r),
                Err(e) => tracing::warn!(error = %e, "reading probe replies"),
            }
        }
        self.evaluate();
        let now = self.now_ms();
        self.stalls.asleep(now);
    }

    fn on_link(&mut self, l: link::LinkState) {
        if l.name == self.cfg.app_iface {
            // Judged by `settle`, which follows every wake-up.
            self.app_carrier = l.carrier;
            return;
        }
        let Some(i) = self.als.iter().position(|a| a.iface == l.name) else {
            return;
        };
        let now = self.now_ms();
        if !self.links.set_carrier(i, l.carrier, now) {
            return;
        }
        if l.carrier {
            self.event("info", format!("availability link {} up", l.name));
        } else {
            self.event("warn", format!("loss of redundancy: availability link {} down", l.name));
        }
    }

    /// Reports link health changes and moves steered frames to the active link.
    fn apply_link_events(&mut self, events: Vec<LinkEvent>) {
        for e in events {
            match e {
                LinkEvent::Health { link, from, to, why } => {
                    let name = self.links.name(link).to_owned();
                    match (from, to) {
                        (_, Health::Silent) => self.event(
                            "error",
                            format!("loss of redundancy: availability link {name} silently dead: {why}"),
                        ),
                        (Health::Silent, Health::Up) => {
                            self.event("info", format!("availability link {name} works again: {why}"))
                        }
                        // Carrier changes are reported where they are noticed (on_link);
                        // a link heard for the first time is the normal start.
                        _ => tracing::debug!(link = name, ?from, ?to, why, "availability link health"),
                    }
                }
                LinkEvent::Active { to: None, why, .. } => {
                    self.event("error", format!("no availability link to steer over: {why}"));
                }
                LinkEvent::Active { to: Some(i), why, .. } => {
                    let name = self.links.name(i).to_owned();
                    match self.dp.use_al(&name) {
                        Ok(()) => self.event("info", format!("steering uses availability link {name}: {why}")),
                        Err(e) => self.event(
                            "error",
                            format!("cannot switch steering to {name}: {}", eac_common::error_chain(&e)),
                        ),
                    }
                }
            }
        }
    }

    /// What redundancy is lost right now, one sentence each (empty: none).
    fn redundancy_lost(&self) -> Vec<String> {
        let mut lost: Vec<String> = (0..self.links.len())
            .filter(|&i| matches!(self.links.health(i), Health::Silent | Health::Down))
            .map(|i| {
                format!(
                    "availability link {} {}",
                    self.links.name(i),
                    health_word(self.links.health(i))
                )
            })
            .collect();
        if !self.partner_fresh {
            lost.push("partner silent on every availability link".into());
        }
        if !self.own_ok {
            lost.push(format!("application path on {} failing", self.cfg.app_iface));
        }
        for (mac, c) in self.judge.cut_off() {
            let name = self.guest(mac).map(|g| g.name.as_str()).unwrap_or_default();
            lost.push(format!("guest {name} cut off: {}", c.why));
        }
        lost
    }

    /// Answers one control request ([`crate::control`]).
    fn handle(&mut self, req: Request) -> serde_json::Value {
        match req {
            Request::LegacyStatus => self.status(),
            Request::Versioned { id, op } => {
                let r = control::validate(&op, &self.cfg).and_then(|a| self.act(a));
                if let Err(e) = &r {
                    tracing::info!(code = e.code, "control request refused: {}", e.message);
                }
                control::reply(&id, r)
            }
        }
    }

    /// Applies a validated request. A change touches only the guest concerned (its map
    /// entries and its port's program); on failure nothing is changed.
    fn act(&mut self, a: Action) -> Result<serde_json::Value, ApiError> {
        let now = self.now_ms();
        let dp_err =
            |what: &str, e: Error| ApiError::new("datapath", format!("{what}: {}", eac_common::error_chain(&e)));
        let shown = |st: &Self, mac: Mac| {
            let g = st.guest(mac).cloned();
            g.map(|g| st.guest_json(&g, st.now_ms(), &st.guest_stats()))
                .unwrap_or(serde_json::Value::Null)
        };
        match a {
            Action::Status => Ok(self.status()),
            Action::Show(g) => Ok(shown(self, g.mac)),
            Action::Add(g) => {
                port_exists(&g)?;
                self.dp
                    .add_guest(g.mac, g.role, g.port.as_deref())
                    .map_err(|e| dp_err("protecting the guest", e))?;
                self.judge.add_guest(g.mac, g.role, now);
                self.cfg.guests.push(g.clone());
                self.event(
                    "info",
                    format!("guest {} ({}) added at runtime: {}", g.name, g.mac, where_word(&g)),
                );
                self.send_observation();
                Ok(shown(self, g.mac))
            }
            Action::Remove(g) => {
                let was = self.judge.remove_guest(g.mac);
                if let Err(e) = self.dp.remove_guest(g.mac) {
                    self.event(
                        "error",
                        format!(
                            "guest {} ({}): removing it from the data path: {}",
                            g.name,
                            g.mac,
                            eac_common::error_chain(&e)
                        ),
                    );
                }
                // A local guest steered until now: its traffic is back on our NIC, and the
                // switch must learn that (as when traffic comes home), if our path works.
                if g.role == Role::Local && was.as_ref().is_some_and(|d| d.steering) && self.own_ok {
                    self.announce(g.mac);
                }
                self.cfg.guests.retain(|o| o.mac != g.mac);
                self.event(
                    "info",
                    format!(
                        "guest {} ({}) removed at runtime: no longer protected{}",
                        g.name,
                        g.mac,
                        if was.is_some_and(|d| d.steering) {
                            " (its steering stopped)"
                        } else {
                            ""
                        }
                    ),
                );
                self.send_observation();
                Ok(json!({"removed": g}))
            }
            Action::SetRole { from, to } => {
                port_exists(&to)?;
                let was = self.judge.remove_guest(from.mac);
                let _ = self.dp.remove_guest(from.mac);
                if let Err(e) = self.dp.add_guest(to.mac, to.role, to.port.as_deref()) {
                    // Put the guest back as it was.
                    let back = self.dp.add_guest(from.mac, from.role, from.port.as_deref());
                    self.judge.add_guest(from.mac, from.role, now);
                    if let Err(b) = back {
                        self.event(
                            "error",
                            format!(
                                "guest {} ({}): role change failed and restoring it failed too: {}",
                                from.name,
                                from.mac,
                                eac_common::error_chain(&b)
                            ),
                        );
                    }
                    return Err(dp_err("changing the role", e));
                }
                self.judge.add_guest(to.mac, to.role, now);
                if let Some(slot) = self.cfg.guests.iter_mut().find(|o| o.mac == from.mac) {
                    *slot = to.clone();
                }
                self.event(
                    "info",
                    format!(
                        "guest {} ({}) role changed at runtime: was {}, now {}{}",
                        to.name,
                        to.mac,
                        where_word(&from),
                        where_word(&to),
                        if was.is_some_and(|d| d.steering) {
                            " (its steering stopped)"
                        } else {
                            ""
                        }
                    ),
                );
                self.send_observation();
                Ok(shown(self, to.mac))
            }
        }
    }

    /// One guest as `status` and `guest.show` show it.
    fn guest_json(&self, g: &Guest, now: u64, stats: &BTreeMap<Mac, ebpf_common::GuestStats>) -> serde_json::Value {
        let d = self.judge.guests().get(&g.mac);
        let steering = d.is_some_and(|d| d.steering);
        let cut_off = d.and_then(|d| d.cut_off.as_ref());
        let s = stats.get(&g.mac).copied().unwrap_or_default();
        let p = self.partner.as_ref().and_then(|p| p.guests.get(&g.mac));
        let (active_path, state) = match (g.role, steering, cut_off) {
            (Role::Local, true, Some(_)) => (
                "partner NIC (over the availability link), not confirmed: cut off",
                "cut_off",
            ),
            (Role::Local, false, Some(_)) => ("none: cut off", "cut_off"),
            (Role::Local, false, None) => ("own NIC", "own_nic"),
            (Role::Local, true, None) => ("partner NIC (over the availability link)", "through_partner"),
            (Role::Partner, false, _) => ("partner's own NIC", "on_partner"),
            (Role::Partner, true, _) => ("our NIC (lent)", "lent"),
        };
        json!({
            "name": g.name, "mac": g.mac, "ip": g.ip, "ipv6": g.ipv6, "role": g.role, "port": g.port,
            "state": state, "active_path": active_path, "steering": steering,
            "cut_off": cut_off.map(|c| json!({"ms_ago": now.saturating_sub(c.since_ms), "why": c.why})),
            "last_decision": d.map(|d| json!({"ms_ago": now.saturating_sub(d.since_ms), "why": d.why})),
            "counters": {
                "here": {"rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes, "tx_packets": s.tx_packets,
                         "tx_bytes": s.tx_bytes, "to_al_packets": s.to_al_packets, "from_al_packets": s.from_al_packets},
                "partner": p.map(|p| json!({"rx_packets": p.rx_packets, "tx_packets": p.tx_packets, "last_rx_age_ms": age_or_null(p.last_rx_age_ms)})),
            },
        })
    }

    fn status(&self) -> serde_json::Value {
        let now = self.now_ms();
        let stats = self.guest_stats();
        let lost = self.redundancy_lost();
        let guests: Vec<_> = self
            .cfg
            .guests
            .iter()
            .map(|g| self.guest_json(g, now, &stats))
            .collect();
        json!({
            "host": self.cfg.host,
            "uptime_ms": now,
            "app": {"iface": self.cfg.app_iface, "carrier": self.app_carrier, "path_ok": self.own_ok,
                    "probe_targets": self.cfg.probe_targets,
                    "last_probe_reply_ms_ago": self.last_probe_reply_ms.map(|t| now.saturating_sub(t)),
                    "damping": self.judge.damping().status(now),
                    "attach": self.dp.app_attach()},
            "availability_links": self.als.iter().enumerate().map(|(i, a)| json!({
                "iface": a.iface, "peer": a.peer.to_string(), "carrier": self.links.carrier(i),
                "health": self.links.health(i), "active": self.links.active() == Some(i),
                "last_heard_ms_ago": self.links.last_rx_ms(i).map(|t| now.saturating_sub(t)),
            })).collect::<Vec<_>>(),
            "redundancy": {"ok": lost.is_empty(), "lost": lost},
            "partner": self.partner.as_ref().map(|p| json!({
                "host": p.host, "reachable": self.partner_fresh, "heard_ms_ago": now.saturating_sub(p.view.received_ms),
                "carrier": p.view.carrier, "path_ok": p.view.probe_ok, "probe_age_ms": age_or_null(p.probe_age_ms),
            })),
            "guests": guests,
            "pin_dir": self.dp.pin_dir(),
            "scheduling": self.sched,
            "stalls": self.stalls.status(now),
            "events": self.events.iter().rev().collect::<Vec<_>>(),
        })
    }
}

/// Refuses a guest whose port is not an interface here (before anything is changed).
fn port_exists(g: &Guest) -> Result<(), ApiError> {
    match g.port.as_deref() {
        Some(p) => crate::xdp::ifindex(p)
            .map(drop)
            .map_err(|e| ApiError::new("invalid", format!("guest {}: port {p}: {e}", g.name))),
        None => Ok(()),
    }
}

/// "local, port vg0" / "partner".
fn where_word(g: &Guest) -> String {
    match &g.port {
        Some(p) => format!("{} (port {p})", control::role_word(g.role)),
        None => control::role_word(g.role).to_owned(),
    }
}

/// The protocol's "never" (u32::MAX) as null; an age otherwise.
fn age_or_null(ms: u32) -> Option<u32> {
    (ms != u32::MAX).then_some(ms)
}

/// An authenticated copy of a message already accepted: the other link's copy, or one
/// reordered between the links within [`REORDER_WINDOW`].
fn is_copy(e: &ProtoError) -> bool {
    match e {
        ProtoError::Stale { seq, last, .. } => last.saturating_sub(*seq) <= REORDER_WINDOW,
        e => e.is_duplicate(),
    }
}

/// CLOCK_MONOTONIC in ns, the clock `bpf_ktime_get_ns` uses.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Runs the daemon until `shutdown` completes; detaches everything on the way out.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let secret = cfg
        .pool_secret()
        .map_err(|e| Error::Config(eac_common::error_chain(&e)))?;
    let start = Instant::now();
    let al_names: Vec<&str> = cfg.availability_links.iter().map(|a| a.iface.as_str()).collect();
    let mode = match cfg.app_xdp {
        None => crate::AppMode::Auto,
        Some(true) => crate::AppMode::Xdp,
        Some(false) => crate::AppMode::Tc,
    };
    let mut dp = Datapath::attach_mode(&cfg.pin_dir, &cfg.app_iface, &al_names, mode)?;
    let mut steered = Vec::new();
    for g in &cfg.guests {
        if dp.add_guest(g.mac, g.role, g.port.as_deref())? {
            steered.push(g.mac);
        }
    }
    let adopted = dp.adopted().map(|a| a.links);
    let released = dp.release_unclaimed();
    start_bpf_logger(&mut dp);

    let (links, mut link_rx) = link::watch().await?;
    let carrier = |name: &str| links.iter().any(|l| l.name == name && l.carrier);
    let mut als = Vec::new();
    for a in &cfg.availability_links {
        let sock = UdpSocket::bind(a.local).await.map_err(|source| Error::Io {
            what: format!("bind {} on {}", a.local, a.iface),
            source,
        })?;
        als.push(Al {
            iface: a.iface.clone(),
            sock,
            peer: a.peer,
        });
    }
    let prober = if cfg.probe_targets.is_empty() {
        None
    } else {
        Some(
            AsyncArpProber::new(&cfg.app_iface, cfg.app_ip).map_err(|source| Error::Io {
                what: format!("ARP probe socket on {}", cfg.app_iface),
                source,
            })?,
        )
    };
    let announcer = Announcer::new(&cfg.app_iface).map_err(|source| Error::Io {
        what: format!("announcement socket on {}", cfg.app_iface),
        source,
    })?;
    let control = bind_control(&cfg.control_socket)?;
    let (ctl_tx, mut ctl_rx) =
        tokio::sync::mpsc::channel::<(Request, tokio::sync::oneshot::Sender<serde_json::Value>)>(16);
    let probe_interval = cfg.timing.probe_interval;

    let now0 = start.elapsed().as_millis() as u64;
    let links = Links::new(
        &als.iter()
            .map(|a| (a.iface.clone(), carrier(&a.iface)))
            .collect::<Vec<_>>(),
        cfg.timing.link_timeout,
        now0,
    );
    let mut judge = Judge::new(cfg.timing, cfg.damping, prober.is_some(), now0);
    for g in &cfg.guests {
        judge.add_guest(g.mac, g.role, now0);
    }
    for mac in &steered {
        judge.adopt_steering(*mac, now0);
    }
    let sealer = Sealer::new(&secret, &cfg.host).map_err(|e| Error::Config(e.to_string()))?;
    let opener = Opener::new(&secret)
        .map_err(|e| Error::Config(e.to_string()))?
        .with_local_host(&cfg.host);
    let mut st = State {
        app_carrier: carrier(&cfg.app_iface),
        cfg,
        start,
        dp,
        judge,
        last_probe_reply_ms: None,
        als,
        links,
        partner: None,
        partner_fresh: false,
        own_ok: true,
        sealer,
        opener,
        announcer,
        events: VecDeque::new(),
        stalls: StallClock::new(probe_interval, probe_interval),
        sched: "normal (SCHED_OTHER)".into(),
    };
    if let Some(prio) = st.cfg.realtime_priority {
        match eac_common::sched::set_fifo(prio) {
            Ok(()) => {
                st.sched = format!("SCHED_FIFO priority {prio}");
                st.event("info", format!("running under SCHED_FIFO, priority {prio}"));
            }
            Err(e) => st.event(
                "warn",
                format!("realtime_priority {prio} refused ({e}): running under the normal scheduler; judgements may come late on a busy host"),
            ),
        }
    }
    if let Some(links) = adopted {
        let names: Vec<String> = steered
            .iter()
            .map(|m| st.guest(*m).map(|g| g.name.clone()).unwrap_or_default())
            .collect();
        st.event(
            "warn",
            format!(
                "data path adopted from a daemon that did not stop cleanly: {links} pinned attachments kept running and now run our programs; guests still steered or lent: {}{}",
                if names.is_empty() { "none".into() } else { names.join(", ") },
                if released.is_empty() { String::new() } else { format!("; released (no longer configured): {}", released.join(", ")) }
            ),
        );
    }
    st.evaluate();
    st.event(
        "info",
        format!(
            "netpair started on host {} ({} guests)",
            st.cfg.host,
            st.cfg.guests.len()
        ),
    );

    let mut probe_tick = tokio::time::interval(Duration::from_millis(st.cfg.timing.probe_interval));
    probe_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut obs_tick = tokio::time::interval(Duration::from_millis(st.cfg.timing.observation_interval));
    obs_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let targets = st.cfg.probe_targets.clone();
    let (mut buf0, mut buf1) = (vec![0u8; 9000], vec![0u8; 9000]);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = probe_tick.tick() => {
                if let Some(p) = &prober {
                    for t in &targets {
                        if let Err(e) = p.send_probe(*t) {
                            tracing::debug!(target = %t, error = %e, "probe not sent");
                        }
                    }
                }
            }
            _ = obs_tick.tick() => st.send_observation(),
            r = async { match &prober { Some(p) => p.recv_replies().await, None => std::future::pending().await } } => {
                match r {
                    Ok(replies) => st.on_replies(&replies),
                    Err(e) => tracing::warn!(error = %e, "reading probe replies"),
                }
            }
            Some(l) = link_rx.recv() => st.on_link(l),
            r = st.als[0].sock.recv_from(&mut buf0) => {
                match r {
                    Ok((n, from)) => st.on_datagram(0, from, &buf0[..n]),
                    Err(e) => tracing::debug!(error = %e, "AL socket"),
                }
            }
            r = async { match st.als.get(1) { Some(a) => a.sock.recv_from(&mut buf1).await, None => std::future::pending().await } } => {
                match r {
                    Ok((n, from)) => st.on_datagram(1, from, &buf1[..n]),
                    Err(e) => tracing::debug!(error = %e, "AL socket"),
                }
            }
            Ok((stream, _)) = control.accept() => {
                tokio::spawn(serve_control(stream, ctl_tx.clone()));
            }
            Some((req, reply)) = ctl_rx.recv() => {
                let _ = reply.send(st.handle(req));
            }
        }
        // Every wake-up ends here: read what is queued, then judge.
        st.settle(prober.as_ref(), &mut buf0);
    }
    st.event("info", "netpair stopping: detaching the data path".into());
    let _ = std::fs::remove_file(&st.cfg.control_socket);
    Ok(())
}

fn bind_control(path: &std::path::Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Config(format!(
            "{} is in use: is another netpair running?",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| Error::Io {
        what: format!("bind {}", path.display()),
        source,
    })?;
    // Root only: the socket reveals the pool's topology.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// Serves one control connection: request lines in order, each answered with one line
/// ([`crate::control`]). Lines are parsed here; the daemon's loop applies them, so a slow
/// client never holds up the loop.
async fn serve_control(
    stream: tokio::net::UnixStream,
    to_loop: tokio::sync::mpsc::Sender<(Request, tokio::sync::oneshot::Sender<serde_json::Value>)>,
) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let reply = match (&mut r).take(control::MAX_LINE as u64 + 1).read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) if line.len() > control::MAX_LINE => {
                let e = ApiError::new(
                    "too_large",
                    format!("a request line is at most {} bytes", control::MAX_LINE),
                );
                let _ = w
                    .write_all(format!("{}\n", control::reply(&serde_json::Value::Null, Err(e))).as_bytes())
                    .await;
                return;
            }
            Ok(_) => match control::parse(&line) {
                Err((id, e)) => control::reply(&id, Err(e)),
                Ok(req) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if to_loop.send((req, tx)).await.is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(v) => v,
                        Err(_) => return,
                    }
                }
            },
            Err(e) => {
                let e = ApiError::new("bad_request", format!("unreadable request line: {e}"));
                let _ = w
                    .write_all(format!("{}\n", control::reply(&serde_json::Value::Null, Err(e))).as_bytes())
                    .await;
                return;
            }
        };
        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Asks a running daemon for its status.
pub async fn query_status(socket: &std::path::Path) -> Result<serde_json::Value, Error> {
    control::call(socket, "status", serde_json::Value::Null).await
}

/// Forwards the programs' aya-log records into our log (they are lost unless polled).
fn start_bpf_logger(dp: &mut Datapath) {
    match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        Err(e) => tracing::warn!(error = %e, "eBPF logger unavailable; in-program diagnostics will be lost"),
        Ok(logger) => {
            // SAFETY: the logger owns its ring-buffer fd, which stays open for as long as the
            // AsyncFd (and so the registration) lives.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
            match registered {
                Err(e) => tracing::warn!(error = %e, "eBPF logger not registered"),
                Ok(mut fd) => {
                    tokio::spawn(async move {
                        while let Ok(mut guard) = fd.readable_mut().await {
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_links_copy_and_a_reordered_one_count_as_arrivals_nothing_else_does() {
        let host = || "b".to_owned();
        let replayed = ProtoError::Replayed {
            host: host(),
            session: 1,
            seq: 7,
        };
        assert!(is_copy(&replayed));
        let reordered = ProtoError::Stale {
            host: host(),
            session: 1,
            seq: 7,
            last: 8,
        };
        assert!(is_copy(&reordered));
        let old = ProtoError::Stale {
            host: host(),
            session: 1,
            seq: 7,
            last: 7 + REORDER_WINDOW + 1,
        };
        assert!(!is_copy(&old), "a replay from long ago proves nothing about the link");
        assert!(!is_copy(&ProtoError::BadMac));
        assert!(!is_copy(&ProtoError::RetiredSession {
            host: host(),
            session: 1
        }));
    }
}
