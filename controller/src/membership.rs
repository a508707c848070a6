//! Pool membership: which peers are alive, over which channels, and whether this host is
//! isolated.
//!
//! Pure logic on [`tokio::time::Instant`]: the daemon feeds observations (a heartbeat arrived, a
//! peer's state-file slot advanced, our own state-file I/O succeeded or failed) and calls
//! [`Membership::tick`] regularly (every `heartbeat / 2` or so); `tick` returns the transitions
//! since the previous call as [`MembershipEvent`]s. Nothing here sleeps, reads a clock or does
//! I/O, so every timeline is a unit test on paused tokio time.
//!
//! # Rules (docs/controller.md)
//! - A **channel** to a peer is one heartbeat network ([`Channel::Net`]) or the peer's
//!   state-file slot ([`Channel::StateFile`]). A channel is *up* while something arrived on it
//!   within `channel_timeout`, *down* after that much silence. A state-file slot counts only when
//!   its tick counter advanced (or its incarnation changed): a stale slot is silence.
//! - A peer is **alive** when all its channels are up, **suspect** when some are down, and
//!   **dead** only when every channel — every heartbeat network and its state-file slot — *and*
//!   every other peer's report of hearing it (the `sees` list of their heartbeats) has been
//!   silent for `dead_after`. Losing a channel is an event ([`MembershipEvent::ChannelDown`],
//!   "redundancy lost"), never an action.
//! - This host is **isolated** when, for `isolation_after`, no peer's heartbeat arrived *that
//!   says the peer hears us* (mutual contact) and no state-file I/O (read and write) succeeded.
//!   Requiring mutual contact closes the one-way-link hole: a host that still receives a peer's
//!   heartbeats but is no longer heard by it must fence, because that peer will declare it dead.
//! - A peer seen again after it was declared dead is reported as [`MembershipEvent::PeerRejoined`].
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Timing of membership and fencing: the configuration file's `[timeouts]` table, each field
/// read from the key of the same name with an `_ms` suffix (`heartbeat_interval_ms`, …). This is
/// the only timeouts type: the configuration parser builds it and calls [`Timeouts::validate`],
/// whose errors name those keys; membership and fencing use it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Heartbeats are sent this often on every network (`heartbeat_interval_ms`, default 100).
    pub heartbeat_interval: Duration,
    /// Each host rewrites its state-file slot this often (`statefile_interval_ms`, default 200).
    pub statefile_interval: Duration,
    /// A channel is down after this much silence (`channel_timeout_ms`, default 400).
    pub channel_timeout: Duration,
    /// A peer is dead after this much silence on every channel (`dead_after_ms`, default 2000).
    pub dead_after: Duration,
    /// This host is isolated after this long without any contact (`isolation_after_ms`, default
    /// 800).
    pub isolation_after: Duration,
    /// An isolated host's protected guests are destroyed by last contact + this
    /// (`fence_deadline_ms`, default 2800).
    pub fence_deadline: Duration,
    /// Survivors wait this long after `dead_after` before restarting a dead peer's guests
    /// (`fence_grace_ms`, default 1100): restart at last seen + `dead_after` + `fence_grace`.
    pub fence_grace: Duration,
}

impl Timeouts {
    /// The timing the unit and scenario tests were written against (the defaults until
    /// issue 13 §6): 200 ms heartbeats, 500 ms slot writes, 1 s channels, dead after 3 s,
    /// isolated after 2 s, fenced by 4 s, restart at 5 s. Tests of logic use it so their
    /// timelines stay readable; the defaults have their own tests.
    #[cfg(test)]
    pub fn reference() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            statefile_interval: Duration::from_millis(500),
            channel_timeout: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            isolation_after: Duration::from_secs(2),
            fence_deadline: Duration::from_secs(4),
            fence_grace: Duration::from_secs(2),
        }
    }
}

/// The defaults restart a dead host's guests 3.1 s after its last heartbeat (issue 13 §6: ≤ 4 s
/// from death to the guest running) and give an isolated host 2 s to destroy its guests
/// (TCG guests in the lab take 1.2–1.9 s; beyond the deadline the watchdog resets the host).
impl Default for Timeouts {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            statefile_interval: Duration::from_millis(200),
            channel_timeout: Duration::from_millis(400),
            dead_after: Duration::from_millis(2000),
            isolation_after: Duration::from_millis(800),
            fence_deadline: Duration::from_millis(2800),
            fence_grace: Duration::from_millis(1100),
        }
    }
}

/// A `[timeouts]` combination that would make failover unsafe or flappy. Each message names the
/// configuration file's keys (`timeouts.channel_timeout_ms`, …) and their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutsError {
    #[error("timeouts.{key} is 0; every timeout must be positive")]
    Zero { key: &'static str },
    #[error(
        "timeouts.channel_timeout_ms ({channel_timeout} ms) must be at least twice \
         timeouts.heartbeat_interval_ms ({heartbeat_interval} ms), so that one lost heartbeat does \
         not take a channel down"
    )]
    ChannelVsHeartbeat {
        channel_timeout: u128,
        heartbeat_interval: u128,
    },
    #[error(
        "timeouts.channel_timeout_ms ({channel_timeout} ms) must be at least twice \
         timeouts.statefile_interval_ms ({statefile_interval} ms), so that the state-file channel \
         does not flap between two slot writes"
    )]
    ChannelVsStateFile {
        channel_timeout: u128,
        statefile_interval: u128,
    },
    #[error(
        "timeouts.channel_timeout_ms ({channel_timeout} ms) must be less than timeouts.dead_after_ms \
         ({dead_after} ms): a channel goes down before its peer is declared dead"
    )]
    ChannelVsDead { channel_timeout: u128, dead_after: u128 },
    #[error(
        "timeouts.isolation_after_ms ({isolation_after} ms) must be at least \
         timeouts.channel_timeout_ms ({channel_timeout} ms), or a short outage of every channel \
         fences the host"
    )]
    IsolationVsChannel {
        isolation_after: u128,
        channel_timeout: u128,
    },
    #[error(
        "timeouts.fence_deadline_ms ({fence_deadline} ms) must be greater than \
         timeouts.isolation_after_ms ({isolation_after} ms): an isolated host needs time to destroy \
         its guests"
    )]
    DeadlineVsIsolation {
        fence_deadline: u128,
        isolation_after: u128,
    },
    #[error(
        "unsafe timeouts: timeouts.dead_after_ms + timeouts.fence_grace_ms ({restart} ms, when \
         survivors restart a dead host's guests) must be at least {required} ms = \
         timeouts.fence_deadline_ms ({fence_deadline} ms) + 3 × timeouts.heartbeat_interval_ms \
         ({heartbeat_interval} ms: how stale a peer's 'sees' report can be, 2 heartbeats, plus one \
         of margin). Raise fence_grace_ms to at least {min_grace} ms, or lower fence_deadline_ms"
    )]
    RestartBeforeFence {
        restart: u128,
        required: u128,
        fence_deadline: u128,
        heartbeat_interval: u128,
        min_grace: u128,
    },
}

impl Timeouts {
    /// How recently a peer must have been heard on a heartbeat network to be listed in the
    /// `sees` field of our heartbeats ([`Membership::sees`]): two heartbeat intervals.
    pub fn sees_window(&self) -> Duration {
        self.heartbeat_interval * 2
    }

    /// When survivors may restart the guests of a peer last seen at `last_seen`.
    pub fn restart_at(&self, last_seen: Instant) -> Instant {
        last_seen + self.dead_after + self.fence_grace
    }

    /// Checks the inequalities failover safety rests on, with an error naming the file's keys
    /// (docs/controller.md "Timing" and docs/operations.md state the same rules):
    /// - every value positive;
    /// - `channel_timeout ≥ 2 × heartbeat_interval` and `≥ 2 × statefile_interval` (no flapping
    ///   on one lost datagram or between two slot writes);
    /// - `channel_timeout < dead_after`; `isolation_after ≥ channel_timeout`;
    /// - `fence_deadline > isolation_after` (time to destroy guests);
    /// - **`dead_after + fence_grace ≥ fence_deadline + sees_window + heartbeat_interval`**
    ///   (`sees_window` = 2 × `heartbeat_interval`): a survivor's restart (measured from its last
    ///   contact with the dead host) comes strictly after the isolated host's fence deadline
    ///   (measured from *its* last contact, which can be up to `sees_window` later because mutual
    ///   contact is judged from the peer's `sees` report), with at least one heartbeat interval
    ///   to spare. With the defaults: 5 s ≥ 4 s + 0.4 s + 0.2 s.
    pub fn validate(&self) -> Result<(), TimeoutsError> {
        let fields = [
            ("heartbeat_interval_ms", self.heartbeat_interval),
            ("statefile_interval_ms", self.statefile_interval),
            ("channel_timeout_ms", self.channel_timeout),
            ("dead_after_ms", self.dead_after),
            ("isolation_after_ms", self.isolation_after),
            ("fence_deadline_ms", self.fence_deadline),
            ("fence_grace_ms", self.fence_grace),
        ];
        if let Some((key, _)) = fields.iter().find(|(_, d)| d.is_zero()) {
            return Err(TimeoutsError::Zero { key });
        }
        let ms = |d: Duration| d.as_millis();
        if self.channel_timeout < self.heartbeat_interval * 2 {
            return Err(TimeoutsError::ChannelVsHeartbeat {
                channel_timeout: ms(self.channel_timeout),
                heartbeat_interval: ms(self.heartbeat_interval),
            });
        }
        if self.channel_timeout < self.statefile_interval * 2 {
            return Err(TimeoutsError::ChannelVsStateFile {
                channel_timeout: ms(self.channel_timeout),
                statefile_interval: ms(self.statefile_interval),
            });
        }
        if self.channel_timeout >= self.dead_after {
            return Err(TimeoutsError::ChannelVsDead {
                channel_timeout: ms(self.channel_timeout),
                dead_after: ms(self.dead_after),
            });
        }
        if self.isolation_after < self.channel_timeout {
            return Err(TimeoutsError::IsolationVsChannel {
                isolation_after: ms(self.isolation_after),
                channel_timeout: ms(self.channel_timeout),
            });
        }
        if self.fence_deadline <= self.isolation_after {
            return Err(TimeoutsError::DeadlineVsIsolation {
                fence_deadline: ms(self.fence_deadline),
                isolation_after: ms(self.isolation_after),
            });
        }
        let restart = self.dead_after + self.fence_grace;
        let required = self.fence_deadline + self.sees_window() + self.heartbeat_interval;
        if restart < required {
            return Err(TimeoutsError::RestartBeforeFence {
                restart: ms(restart),
                required: ms(required),
                fence_deadline: ms(self.fence_deadline),
                heartbeat_interval: ms(self.heartbeat_interval),
                min_grace: ms(required.saturating_sub(self.dead_after)),
            });
        }
        Ok(())
    }
}

/// One way of hearing a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Channel {
    /// Heartbeats over the named network (`[[network]] name`).
    Net(String),
    /// The peer's slot in the shared state-file.
    StateFile,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Net(n) => write!(f, "network {n}"),
            Channel::StateFile => f.write_str("state-file"),
        }
    }
}

/// A peer as configured: its name and the heartbeat networks it has an address on. Every peer
/// also has the [`Channel::StateFile`] channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub networks: Vec<String>,
}

impl PeerSpec {
    pub fn new(name: impl Into<String>, networks: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            name: name.into(),
            networks: networks.into_iter().map(Into::into).collect(),
        }
    }
}

/// What we think of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Not heard since we started, and `dead_after` has not passed yet.
    Unknown,
    /// Every channel is up.
    Alive,
    /// Some channels are down (possibly all, for less than `dead_after`).
    Suspect,
    /// Silent on every channel, and unreported by every other peer, for `dead_after`.
    Dead,
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerState::Unknown => "unknown",
            PeerState::Alive => "alive",
            PeerState::Suspect => "suspect",
            PeerState::Dead => "dead",
        })
    }
}

/// A transition, returned by [`Membership::tick`] in a deterministic order (peers by name, then
/// channels, then this host's own state-file and isolation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A channel to `peer` carries traffic again (or for the first time).
    ChannelUp { peer: String, channel: Channel },
    /// **Redundancy lost**: `channel` to `peer` has been silent for `channel_timeout`.
    /// `still_up` lists the channels that still reach the peer (empty: the peer is unreachable
    /// and will be declared dead after `dead_after` unless it reappears).
    ChannelDown {
        peer: String,
        channel: Channel,
        last_seen: Option<Instant>,
        still_up: Vec<Channel>,
    },
    /// Every channel to `peer` is up (again).
    PeerAlive { peer: String },
    /// Some channels to `peer` are down; `down` lists them.
    PeerSuspect { peer: String, down: Vec<Channel> },
    /// Every channel to `peer` (and every other peer's report of it) has been silent since
    /// `last_seen` (our start, if we never heard it) for `dead_after`.
    PeerDead { peer: String, last_seen: Instant },
    /// A peer declared dead is heard again (it was fenced and came back, or rebooted). Followed by
    /// its new state ([`MembershipEvent::PeerAlive`] or [`MembershipEvent::PeerSuspect`]).
    PeerRejoined { peer: String, dead_since: Instant },
    /// **Redundancy lost**: our own state-file I/O fails (or has not succeeded for
    /// `channel_timeout`). `last_ok` is the last success.
    StateFileLost {
        last_ok: Option<Instant>,
        error: Option<String>,
    },
    /// Our own state-file I/O succeeds again.
    StateFileRestored,
    /// This host has had no contact (mutual heartbeat or state-file I/O) since `last_contact`,
    /// for `isolation_after`: it must fence.
    Isolated { last_contact: Instant },
    /// Contact is back after isolation.
    NotIsolated { isolated_since: Instant },
}

impl MembershipEvent {
    /// True for the events that report a lost channel (redundancy lost).
    pub fn is_redundancy_loss(&self) -> bool {
        matches!(
            self,
            MembershipEvent::ChannelDown { .. } | MembershipEvent::StateFileLost { .. }
        )
    }

    /// The peer this event is about, if any.
    pub fn peer(&self) -> Option<&str> {
        match self {
            MembershipEvent::ChannelUp { peer, .. }
            | MembershipEvent::ChannelDown { peer, .. }
            | MembershipEvent::PeerAlive { peer }
            | MembershipEvent::PeerSuspect { peer, .. }
            | MembershipEvent::PeerDead { peer, .. }
            | MembershipEvent::PeerRejoined { peer, .. } => Some(peer),
            _ => None,
        }
    }
}

fn list(channels: &[Channel]) -> String {
    if channels.is_empty() {
        return "nothing".into();
    }
    channels.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for MembershipEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembershipEvent::ChannelUp { peer, channel } => write!(f, "{channel} to peer {peer} is up"),
            MembershipEvent::ChannelDown {
                peer,
                channel,
                still_up,
                ..
            } => write!(
                f,
                "redundancy lost: {channel} to peer {peer} is down; still up: {}",
                list(still_up)
            ),
            MembershipEvent::PeerAlive { peer } => write!(f, "peer {peer} is alive on every channel"),
            MembershipEvent::PeerSuspect { peer, down } => {
                write!(f, "peer {peer} is suspect: {} down", list(down))
            }
            MembershipEvent::PeerDead { peer, .. } => {
                write!(f, "peer {peer} is dead: silent on every channel")
            }
            MembershipEvent::PeerRejoined { peer, .. } => {
                write!(f, "peer {peer}, declared dead, is heard again")
            }
            MembershipEvent::StateFileLost { error, .. } => match error {
                Some(e) => write!(f, "redundancy lost: state-file I/O fails: {e}"),
                None => f.write_str("redundancy lost: state-file I/O has stalled"),
            },
            MembershipEvent::StateFileRestored => f.write_str("state-file I/O works again"),
            MembershipEvent::Isolated { .. } => {
                f.write_str("this host is isolated: it lost contact with a majority of the pool (in a pool of two: with its peer and the state-file)")
            }
            MembershipEvent::NotIsolated { .. } => f.write_str("this host has contact again"),
        }
    }
}

/// One channel in a [`PeerView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub channel: Channel,
    pub last_seen: Option<Instant>,
    pub up: bool,
}

/// A snapshot of one peer, for status output and decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub name: String,
    pub state: PeerState,
    /// The latest evidence of life on any channel or via any other peer.
    pub last_seen: Option<Instant>,
    pub channels: Vec<ChannelView>,
    /// Other peers whose heartbeats say they hear this one, with when that report arrived.
    pub seen_via: Vec<(String, Instant)>,
    /// The incarnation in the peer's state-file slot, when one was read.
    pub incarnation: Option<u64>,
}

/// This host's own contact status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfView {
    pub isolated: bool,
    /// The latest mutual heartbeat or successful state-file I/O (our start if none yet).
    pub last_contact: Instant,
    pub statefile_ok: bool,
    pub last_statefile_ok: Option<Instant>,
}

/// Bad arguments to [`Membership`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Timeouts(#[from] TimeoutsError),
    #[error("peer name is empty")]
    EmptyName,
    #[error("peer '{0}' is listed twice")]
    DuplicatePeer(String),
    #[error("peer '{0}' is this host itself")]
    PeerIsSelf(String),
    #[error("peer '{peer}' lists network '{network}' twice")]
    DuplicateNetwork { peer: String, network: String },
    #[error("unknown peer '{0}'")]
    UnknownPeer(String),
    #[error("peer '{peer}' has no address on network '{network}'")]
    UnknownNetwork { peer: String, network: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelStatus {
    /// Never heard, `channel_timeout` since our start not yet passed.
    Pending,
    Up,
    Down,
}

#[derive(Debug)]
struct ChannelSlot {
    last_seen: Option<Instant>,
    status: ChannelStatus,
}

#[derive(Debug)]
struct Peer {
    channels: BTreeMap<Channel, ChannelSlot>,
    /// Other peer → when its heartbeat last said it hears this one.
    via: BTreeMap<String, Instant>,
    /// (incarnation, tick) of the latest state-file slot read.
    slot: Option<(u64, u64)>,
    state: PeerState,
    /// When declared dead: the `last_seen` it was declared with.
    dead_since: Option<Instant>,
    /// Latest contact with this peer: a heartbeat that says it hears us, or its slot advancing.
    contact: Option<Instant>,
}

impl Peer {
    fn last_seen(&self) -> Option<Instant> {
        let direct = self.channels.values().filter_map(|c| c.last_seen);
        direct.chain(self.via.values().copied()).max()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    Unknown,
    Ok,
    Failing,
}

/// The membership state machine of one host. See the module documentation.
#[derive(Debug)]
pub struct Membership {
    self_name: String,
    timeouts: Timeouts,
    started: Instant,
    peers: BTreeMap<String, Peer>,
    last_mutual: Option<Instant>,
    last_io_ok: Option<Instant>,
    last_io_err: Option<(Instant, String)>,
    io: Io,
    isolated: Option<Instant>,
}

impl Membership {
    /// A membership for host `self_name` with these peers, started at `now` (a peer never heard
    /// is declared dead `dead_after` after `now`). Fails on invalid timeouts or peer lists.
    pub fn new(
        self_name: impl Into<String>,
        peers: impl IntoIterator<Item = PeerSpec>,
        timeouts: Timeouts,
        now: Instant,
    ) -> Result<Self, MembershipError> {
        timeouts.validate()?;
        let self_name = self_name.into();
        let mut map = BTreeMap::new();
        for spec in peers {
            if spec.name.is_empty() {
                return Err(MembershipError::EmptyName);
            }
            if spec.name == self_name {
                return Err(MembershipError::PeerIsSelf(spec.name));
            }
            let mut channels = BTreeMap::new();
            for net in spec.networks {
                let slot = ChannelSlot {
                    last_seen: None,
                    status: ChannelStatus::Pending,
                };
                if channels.insert(Channel::Net(net.clone()), slot).is_some() {
                    return Err(MembershipError::DuplicateNetwork {
                        peer: spec.name,
                        network: net,
                    });
                }
            }
            channels.insert(
                Channel::StateFile,
                ChannelSlot {
                    last_seen: None,
                    status: ChannelStatus::Pending,
                },
            );
            let peer = Peer {
                channels,
                via: BTreeMap::new(),
                slot: None,
                state: PeerState::Unknown,
                dead_since: None,
                contact: None,
            };
            if map.insert(spec.name.clone(), peer).is_some() {
                return Err(MembershipError::DuplicatePeer(spec.name));
            }
        }
        Ok(Self {
            self_name,
            timeouts,
            started: now,
            peers: map,
            last_mutual: None,
            last_io_ok: None,
            last_io_err: None,
            io: Io::Unknown,
            isolated: None,
        })
    }

    /// This host's name.
    pub fn self_name(&self) -> &str {
        &self.self_name
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    fn peer_mut(&mut self, peer: &str) -> Result<&mut Peer, MembershipError> {
        self.peers
            .get_mut(peer)
            .ok_or_else(|| MembershipError::UnknownPeer(peer.to_owned()))
    }

    fn record(&mut self, peer: &str, channel: &Channel, at: Instant) -> Result<(), MembershipError> {
        let p = self.peer_mut(peer)?;
        let slot = p
            .channels
            .get_mut(channel)
            .ok_or_else(|| MembershipError::UnknownNetwork {
                peer: peer.to_owned(),
                network: match channel {
                    Channel::Net(n) => n.clone(),
                    Channel::StateFile => "state-file".into(),
                },
            })?;
        slot.last_seen = slot.last_seen.max(Some(at));
        Ok(())
    }

    /// Evidence of `peer` on `channel` at `at`: a heartbeat from a peer that hears us, or a
    /// state-file slot whose counter the caller has seen advance. Prefer
    /// [`Membership::observe_heartbeat`] and [`Membership::observe_slot`], which apply the mutual
    /// contact and stale-slot rules themselves; this one counts a heartbeat as mutual contact.
    pub fn observe(&mut self, peer: &str, channel: Channel, at: Instant) -> Result<(), MembershipError> {
        self.record(peer, &channel, at)?;
        if matches!(channel, Channel::Net(_)) {
            self.last_mutual = self.last_mutual.max(Some(at));
        }
        let p = self.peer_mut(peer)?;
        p.contact = p.contact.max(Some(at));
        Ok(())
    }

    /// A heartbeat from `peer` arrived on `network` at `at`; `sees` is the list of hosts the
    /// sender says it hears (its own [`Membership::sees`]). The heartbeat keeps `peer` alive; it
    /// is *contact* (against our isolation) only if `sees` names us; every other peer it names is
    /// reported alive through `peer`.
    pub fn observe_heartbeat(
        &mut self,
        peer: &str,
        network: &str,
        at: Instant,
        sees: &[String],
    ) -> Result<(), MembershipError> {
        self.record(peer, &Channel::Net(network.to_owned()), at)?;
        for other in sees {
            if other == &self.self_name {
                self.last_mutual = self.last_mutual.max(Some(at));
                if let Some(p) = self.peers.get_mut(peer) {
                    p.contact = p.contact.max(Some(at));
                }
            } else if other != peer
                && let Some(o) = self.peers.get_mut(other)
            {
                let e = o.via.entry(peer.to_owned()).or_insert(at);
                *e = (*e).max(at);
            }
        }
        Ok(())
    }

    /// We read `peer`'s state-file slot at `at` and found `(incarnation, tick)`. It counts as
    /// evidence of life only if it differs from the previous read: a new incarnation (the peer's
    /// controller restarted) or a higher tick. The first read after our start is only a baseline.
    /// Returns whether it counted.
    pub fn observe_slot(
        &mut self,
        peer: &str,
        incarnation: u64,
        tick: u64,
        at: Instant,
    ) -> Result<bool, MembershipError> {
        self.observe_slot_with_sees(peer, incarnation, tick, &[], at)
    }

    /// [`Membership::observe_slot`] with the `sees` list the slot carries (version 2): when the
    /// slot advanced, every other host it names is reported alive through `peer`, as a
    /// heartbeat's `sees` would (so a host that reaches the others only through the state-file
    /// does not declare dead a host they hear).
    pub fn observe_slot_with_sees(
        &mut self,
        peer: &str,
        incarnation: u64,
        tick: u64,
        sees: &[String],
        at: Instant,
    ) -> Result<bool, MembershipError> {
        let p = self.peer_mut(peer)?;
        let advanced = match p.slot {
            None => false,
            Some((inc, t)) => inc != incarnation || tick > t,
        };
        if p.slot.is_none() || advanced {
            p.slot = Some((incarnation, tick));
        }
        if advanced {
            self.record(peer, &Channel::StateFile, at)?;
            let p = self.peer_mut(peer)?;
            p.contact = p.contact.max(Some(at));
            for other in sees {
                if other != peer
                    && other != &self.self_name
                    && let Some(o) = self.peers.get_mut(other)
                {
                    let e = o.via.entry(peer.to_owned()).or_insert(at);
                    *e = (*e).max(at);
                }
            }
        }
        Ok(advanced)
    }

    /// The outcome of our own state-file I/O (write our slot and read the others) at `at`.
    pub fn observe_statefile_io(&mut self, ok: bool, at: Instant) {
        self.observe_statefile_result(if ok { Ok(()) } else { Err("I/O error".into()) }, at);
    }

    /// Like [`Membership::observe_statefile_io`], with the error text for the event.
    pub fn observe_statefile_result(&mut self, result: Result<(), String>, at: Instant) {
        match result {
            Ok(()) => self.last_io_ok = self.last_io_ok.max(Some(at)),
            Err(e) => {
                if self.last_io_err.as_ref().is_none_or(|(t, _)| *t <= at) {
                    self.last_io_err = Some((at, e));
                }
            }
        }
    }

    /// Peers we have direct evidence of life from: heard on a heartbeat network within
    /// [`Timeouts::sees_window`], or whose state-file slot advanced within one slot interval
    /// plus two reads. What our heartbeats and our slot carry in their `sees` field: a peer
    /// that reads it knows we know those hosts are alive (and, if it is named, that we know it
    /// is — mutual contact).
    pub fn sees(&self, now: Instant) -> Vec<String> {
        let window = self.timeouts.sees_window();
        let slot_window = self.timeouts.statefile_interval + window;
        self.peers
            .iter()
            .filter(|(_, p)| {
                p.channels.iter().any(|(c, s)| {
                    let w = if matches!(c, Channel::Net(_)) {
                        window
                    } else {
                        slot_window
                    };
                    s.last_seen.is_some_and(|t| now.saturating_duration_since(t) < w)
                })
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The last instant this host had a **quorum**: contact (a heartbeat saying the peer hears
    /// us, or the peer's slot advancing) with enough peers that, counting itself, it was in
    /// contact with a strict majority of the pool — or with exactly half of it *and* its own
    /// state-file I/O worked (the state-file breaks the tie). Our start if never.
    ///
    /// In a two-host pool this is "mutual contact with the peer, or the state-file works" (the
    /// rule of the two-host design). In larger pools the state-file alone no longer keeps a
    /// host out of isolation: a host cut from the majority fences even if it still reaches the
    /// state-file that the majority lost, because the majority, which cannot read its slot,
    /// will declare it dead (docs/controller.md, "Partition rules").
    pub fn last_contact(&self) -> Instant {
        let mut contacts: Vec<Instant> = self.peers.values().filter_map(|p| p.contact).collect();
        contacts.sort_unstable_by(|a, b| b.cmp(a));
        let n = self.peers.len() + 1;
        let need = n / 2; // peers besides us for a strict majority
        // The latest time at least `k` peers were in contact (k = 0: always).
        let kth = |k: usize| -> Option<Option<Instant>> {
            if k == 0 {
                Some(None)
            } else {
                contacts.get(k - 1).map(|t| Some(*t))
            }
        };
        let majority = match kth(need) {
            Some(Some(t)) => Some(t),
            Some(None) => None,
            None => None,
        };
        let tie = if n.is_multiple_of(2) {
            match kth(need - 1) {
                Some(None) => self.last_io_ok,
                Some(Some(t)) => self.last_io_ok.map(|io| io.min(t)),
                None => None,
            }
        } else {
            None
        };
        majority.max(tie).unwrap_or(self.started).max(self.started)
    }

    /// Recomputes every state at `now` and returns the transitions since the previous call.
    pub fn tick(&mut self, now: Instant) -> Vec<MembershipEvent> {
        let t = self.timeouts;
        let started = self.started;
        let mut events = Vec::new();
        for (name, p) in &mut self.peers {
            // Channels.
            let mut changed = Vec::new();
            for (ch, slot) in &mut p.channels {
                // A slot needs two reads to show progress (the first is a baseline), so a
                // state-file channel never heard gets one write interval more at startup.
                let (since, limit) = match (slot.last_seen, ch) {
                    (Some(seen), _) => (seen, t.channel_timeout),
                    (None, Channel::StateFile) => (started, t.channel_timeout + t.statefile_interval),
                    (None, Channel::Net(_)) => (started, t.channel_timeout),
                };
                let status = if now.saturating_duration_since(since) >= limit {
                    ChannelStatus::Down
                } else if slot.last_seen.is_some() {
                    ChannelStatus::Up
                } else {
                    ChannelStatus::Pending
                };
                if status != slot.status {
                    slot.status = status;
                    changed.push((ch.clone(), status, slot.last_seen));
                }
            }
            let up: Vec<Channel> = p
                .channels
                .iter()
                .filter(|(_, s)| s.status == ChannelStatus::Up)
                .map(|(c, _)| c.clone())
                .collect();
            let down: Vec<Channel> = p
                .channels
                .iter()
                .filter(|(_, s)| s.status == ChannelStatus::Down)
                .map(|(c, _)| c.clone())
                .collect();
            for (channel, status, last_seen) in changed {
                match status {
                    ChannelStatus::Up => events.push(MembershipEvent::ChannelUp {
                        peer: name.clone(),
                        channel,
                    }),
                    ChannelStatus::Down => events.push(MembershipEvent::ChannelDown {
                        peer: name.clone(),
                        channel,
                        last_seen,
                        still_up: up.clone(),
                    }),
                    ChannelStatus::Pending => {}
                }
            }
            // Peer.
            let last = p.last_seen();
            let silent_since = last.unwrap_or(started).max(started);
            let state = if now.saturating_duration_since(silent_since) >= t.dead_after {
                PeerState::Dead
            } else if last.is_none() {
                PeerState::Unknown
            } else if down.is_empty() && !up.is_empty() {
                PeerState::Alive
            } else if down.is_empty() {
                // Heard only through another peer so far; no channel of its own is up yet.
                PeerState::Unknown
            } else {
                PeerState::Suspect
            };
            if state == p.state {
                continue;
            }
            if p.state == PeerState::Dead
                && let Some(dead_since) = p.dead_since.take()
            {
                events.push(MembershipEvent::PeerRejoined {
                    peer: name.clone(),
                    dead_since,
                });
            }
            p.state = state;
            match state {
                PeerState::Alive => events.push(MembershipEvent::PeerAlive { peer: name.clone() }),
                PeerState::Suspect => events.push(MembershipEvent::PeerSuspect {
                    peer: name.clone(),
                    down,
                }),
                PeerState::Dead => {
                    p.dead_since = Some(silent_since);
                    events.push(MembershipEvent::PeerDead {
                        peer: name.clone(),
                        last_seen: silent_since,
                    });
                }
                PeerState::Unknown => {}
            }
        }

        // Our own state-file I/O: failing if the latest result is an error, or if nothing
        // succeeded for channel_timeout (a hung NFS read never returns an error).
        let ok_since = self.last_io_ok.unwrap_or(started).max(started);
        let latest_is_err = match (&self.last_io_err, self.last_io_ok) {
            (Some((e, _)), Some(ok)) => *e > ok,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let stalled = now.saturating_duration_since(ok_since) >= t.channel_timeout;
        let io = if latest_is_err || stalled {
            Io::Failing
        } else if self.last_io_ok.is_some() {
            Io::Ok
        } else {
            Io::Unknown
        };
        if io != self.io {
            match io {
                Io::Failing => events.push(MembershipEvent::StateFileLost {
                    last_ok: self.last_io_ok,
                    error: self
                        .last_io_err
                        .as_ref()
                        .filter(|_| latest_is_err)
                        .map(|(_, e)| e.clone()),
                }),
                Io::Ok if self.io == Io::Failing => events.push(MembershipEvent::StateFileRestored),
                _ => {}
            }
            self.io = io;
        }

        // Isolation: only meaningful with peers (a lone host has nobody to fail over to).
        if !self.peers.is_empty() {
            let last_contact = self.last_contact();
            let cut_off = now.saturating_duration_since(last_contact) >= t.isolation_after;
            match (self.isolated, cut_off) {
                (None, true) => {
                    self.isolated = Some(last_contact);
                    events.push(MembershipEvent::Isolated { last_contact });
                }
                (Some(since), false) => {
                    self.isolated = None;
                    events.push(MembershipEvent::NotIsolated { isolated_since: since });
                }
                _ => {}
            }
        }
        events
    }

    /// Per-peer snapshot as of the last [`Membership::tick`].
    pub fn view(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(name, p)| PeerView {
                name: name.clone(),
                state: p.state,
                last_seen: p.last_seen(),
                channels: p
                    .channels
                    .iter()
                    .map(|(c, s)| ChannelView {
                        channel: c.clone(),
                        last_seen: s.last_seen,
                        up: s.status == ChannelStatus::Up,
                    })
                    .collect(),
                seen_via: p.via.iter().map(|(n, t)| (n.clone(), *t)).collect(),
                incarnation: p.slot.map(|(i, _)| i),
            })
            .collect()
    }

    /// The state of one peer as of the last tick.
    pub fn state(&self, peer: &str) -> Option<PeerState> {
        self.peers.get(peer).map(|p| p.state)
    }

    /// Peers currently dead, by name.
    pub fn dead_peers(&self) -> BTreeSet<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.state == PeerState::Dead)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// This host's own status as of the last tick.
    pub fn self_view(&self) -> SelfView {
        SelfView {
            isolated: self.isolated.is_some(),
            last_contact: self.last_contact(),
            statefile_ok: self.io == Io::Ok,
            last_statefile_ok: self.last_io_ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn two_nets(now: Instant) -> Membership {
        Membership::new("a", [PeerSpec::new("b", ["mgmt", "al1"])], Timeouts::reference(), now).unwrap()
    }

    fn sees_a() -> Vec<String> {
        vec!["a".to_string()]
    }

    /// Drives `m` in 50 ms steps from `from` to `to`, calling `feed` before each tick;
    /// returns every event with its time.
    async fn run(
        m: &mut Membership,
        to: Instant,
        mut feed: impl FnMut(&mut Membership, Instant),
    ) -> Vec<(Instant, MembershipEvent)> {
        let mut out = Vec::new();
        while Instant::now() < to {
            advance(ms(50)).await;
            let now = Instant::now();
            feed(m, now);
            out.extend(m.tick(now).into_iter().map(|e| (now, e)));
        }
        out
    }

    /// Heartbeats every 200 ms on the given networks, slot advance every 500 ms, own I/O ok.
    fn feeder(nets: &'static [&'static str], slot: bool, t0: Instant) -> impl FnMut(&mut Membership, Instant) {
        move |m, now| {
            let ms_since = (now - t0).as_millis();
            if ms_since.is_multiple_of(200) {
                for n in nets {
                    m.observe_heartbeat("b", n, now, &sees_a()).unwrap();
                }
            }
            if ms_since.is_multiple_of(500) {
                if slot {
                    // The slot's tick counter: one write every 500 ms since t0.
                    m.observe_slot("b", 7, (ms_since / 500) as u64, now).unwrap();
                }
                m.observe_statefile_io(true, now);
            }
        }
    }

    #[test]
    fn default_timeouts_are_valid_and_the_inequality_holds() {
        let t = Timeouts::reference();
        t.validate().unwrap();
        assert!(t.dead_after + t.fence_grace >= t.fence_deadline + t.sees_window() + t.heartbeat_interval);
    }

    /// The configuration file's `[timeouts]` keys (config.rs `raw::Timeouts`).
    const FILE_KEYS: [&str; 7] = [
        "heartbeat_interval_ms",
        "statefile_interval_ms",
        "channel_timeout_ms",
        "dead_after_ms",
        "isolation_after_ms",
        "fence_deadline_ms",
        "fence_grace_ms",
    ];

    /// Every `timeouts.<key>` an error names is a key of the configuration file.
    fn assert_names_only_file_keys(e: &str) {
        for (i, _) in e.match_indices("timeouts.") {
            let key: String = e[i + "timeouts.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                FILE_KEYS.contains(&key.as_str()),
                "{e:?} names timeouts.{key}, not a file key"
            );
        }
    }

    /// Each rule at its boundary: the value on the allowed side passes, one millisecond across
    /// fails with that rule's error.
    #[test]
    fn each_timeouts_rule_at_its_boundary() {
        let d = Timeouts::reference();
        let ok = |t: Timeouts| t.validate().unwrap_or_else(|e| panic!("{t:?} refused: {e}"));
        let err = |t: Timeouts| t.validate().expect_err(&format!("{t:?} accepted"));

        // Every value positive; 1 ms of heartbeat is still a valid setting.
        ok(Timeouts {
            heartbeat_interval: ms(1),
            ..d
        });
        let zeroed: [(Timeouts, &str); 7] = [
            (
                Timeouts {
                    heartbeat_interval: ms(0),
                    ..d
                },
                "heartbeat_interval_ms",
            ),
            (
                Timeouts {
                    statefile_interval: ms(0),
                    ..d
                },
                "statefile_interval_ms",
            ),
            (
                Timeouts {
                    channel_timeout: ms(0),
                    ..d
                },
                "channel_timeout_ms",
            ),
            (Timeouts { dead_after: ms(0), ..d }, "dead_after_ms"),
            (
                Timeouts {
                    isolation_after: ms(0),
                    ..d
                },
                "isolation_after_ms",
            ),
            (
                Timeouts {
                    fence_deadline: ms(0),
                    ..d
                },
                "fence_deadline_ms",
            ),
            (
                Timeouts {
                    fence_grace: ms(0),
                    ..d
                },
                "fence_grace_ms",
            ),
        ];
        for (t, key) in zeroed {
            assert_eq!(err(t), TimeoutsError::Zero { key });
        }

        // channel_timeout ≥ 2 × heartbeat_interval (200 / 300 from the issue fails; 200 / 400 passes).
        let hb = Timeouts {
            heartbeat_interval: ms(200),
            statefile_interval: ms(200),
            channel_timeout: ms(400),
            ..d
        };
        ok(hb);
        for channel in [399u64, 300] {
            assert_eq!(
                err(Timeouts {
                    channel_timeout: ms(channel),
                    ..hb
                }),
                TimeoutsError::ChannelVsHeartbeat {
                    channel_timeout: channel.into(),
                    heartbeat_interval: 200
                }
            );
        }
        ok(Timeouts {
            heartbeat_interval: ms(201),
            channel_timeout: ms(402),
            ..hb
        });

        // channel_timeout ≥ 2 × statefile_interval: the defaults sit on the boundary.
        ok(Timeouts {
            statefile_interval: ms(500),
            ..d
        });
        assert_eq!(
            err(Timeouts {
                statefile_interval: ms(501),
                ..d
            }),
            TimeoutsError::ChannelVsStateFile {
                channel_timeout: 1000,
                statefile_interval: 501
            }
        );

        // channel_timeout < dead_after.
        let near_dead = Timeouts {
            channel_timeout: ms(2999),
            isolation_after: ms(2999),
            ..d
        };
        ok(near_dead);
        assert_eq!(
            err(Timeouts {
                channel_timeout: ms(3000),
                isolation_after: ms(3000),
                ..d
            }),
            TimeoutsError::ChannelVsDead {
                channel_timeout: 3000,
                dead_after: 3000
            }
        );

        // isolation_after ≥ channel_timeout.
        ok(Timeouts {
            isolation_after: ms(1000),
            ..d
        });
        assert_eq!(
            err(Timeouts {
                isolation_after: ms(999),
                ..d
            }),
            TimeoutsError::IsolationVsChannel {
                isolation_after: 999,
                channel_timeout: 1000
            }
        );

        // fence_deadline > isolation_after.
        ok(Timeouts {
            fence_deadline: ms(2001),
            ..d
        });
        assert_eq!(
            err(Timeouts {
                fence_deadline: ms(2000),
                ..d
            }),
            TimeoutsError::DeadlineVsIsolation {
                fence_deadline: 2000,
                isolation_after: 2000
            }
        );

        // dead_after + fence_grace ≥ fence_deadline + 2 × heartbeat_interval + heartbeat_interval:
        // 5000 = 4400 + 400 + 200 passes, 4401 fails; likewise fence_grace 1600 / 1599.
        ok(Timeouts {
            fence_deadline: ms(4400),
            ..d
        });
        assert_eq!(
            err(Timeouts {
                fence_deadline: ms(4401),
                ..d
            }),
            TimeoutsError::RestartBeforeFence {
                restart: 5000,
                required: 5001,
                fence_deadline: 4401,
                heartbeat_interval: 200,
                min_grace: 2001
            }
        );
        ok(Timeouts {
            fence_grace: ms(1600),
            ..d
        });
        assert!(matches!(
            err(Timeouts {
                fence_grace: ms(1599),
                ..d
            }),
            TimeoutsError::RestartBeforeFence {
                restart: 4599,
                required: 4600,
                ..
            }
        ));
        // The case: dead 3000 + grace 1300 against deadline 4000 (the old, weaker rule
        // in the configuration parser let it through).
        assert!(matches!(
            err(Timeouts {
                fence_grace: ms(1300),
                ..d
            }),
            TimeoutsError::RestartBeforeFence {
                restart: 4300,
                required: 4600,
                min_grace: 1600,
                ..
            }
        ));
    }

    /// The messages name the configuration file's keys, with their values.
    #[test]
    fn timeouts_errors_name_the_file_keys() {
        let d = Timeouts::reference();
        let cases: Vec<(Timeouts, &str)> = vec![
            (
                Timeouts {
                    heartbeat_interval: Duration::ZERO,
                    ..d
                },
                "timeouts.heartbeat_interval_ms is 0; every timeout must be positive",
            ),
            (
                Timeouts {
                    heartbeat_interval: ms(200),
                    statefile_interval: ms(100),
                    channel_timeout: ms(300),
                    ..d
                },
                "timeouts.channel_timeout_ms (300 ms) must be at least twice timeouts.heartbeat_interval_ms \
                 (200 ms), so that one lost heartbeat does not take a channel down",
            ),
            (
                Timeouts {
                    statefile_interval: ms(700),
                    ..d
                },
                "timeouts.channel_timeout_ms (1000 ms) must be at least twice timeouts.statefile_interval_ms \
                 (700 ms), so that the state-file channel does not flap between two slot writes",
            ),
            (
                Timeouts {
                    channel_timeout: ms(3000),
                    isolation_after: ms(3000),
                    ..d
                },
                "timeouts.channel_timeout_ms (3000 ms) must be less than timeouts.dead_after_ms (3000 ms): \
                 a channel goes down before its peer is declared dead",
            ),
            (
                Timeouts {
                    isolation_after: ms(900),
                    ..d
                },
                "timeouts.isolation_after_ms (900 ms) must be at least timeouts.channel_timeout_ms (1000 ms), \
                 or a short outage of every channel fences the host",
            ),
            (
                Timeouts {
                    fence_deadline: ms(2000),
                    ..d
                },
                "timeouts.fence_deadline_ms (2000 ms) must be greater than timeouts.isolation_after_ms \
                 (2000 ms): an isolated host needs time to destroy its guests",
            ),
            (
                Timeouts {
                    fence_grace: ms(1300),
                    ..d
                },
                "unsafe timeouts: timeouts.dead_after_ms + timeouts.fence_grace_ms (4300 ms, when survivors \
                 restart a dead host's guests) must be at least 4600 ms = timeouts.fence_deadline_ms \
                 (4000 ms) + 3 × timeouts.heartbeat_interval_ms (200 ms: how stale a peer's 'sees' report \
                 can be, 2 heartbeats, plus one of margin). Raise fence_grace_ms to at least 1600 ms, or \
                 lower fence_deadline_ms",
            ),
        ];
        for (t, want) in cases {
            let e = t.validate().unwrap_err().to_string();
            assert_eq!(e, want, "{t:?}");
            assert_names_only_file_keys(&e);
        }
        for key in FILE_KEYS {
            assert_names_only_file_keys(&TimeoutsError::Zero { key }.to_string());
        }
    }

    #[test]
    fn bad_peer_lists_are_rejected() {
        let t0 = Instant::now();
        let t = Timeouts::reference();
        let e = Membership::new("a", [PeerSpec::new("a", ["m"])], t, t0).unwrap_err();
        assert_eq!(e, MembershipError::PeerIsSelf("a".into()));
        let e = Membership::new("a", [PeerSpec::new("b", ["m"]), PeerSpec::new("b", ["m"])], t, t0).unwrap_err();
        assert_eq!(e, MembershipError::DuplicatePeer("b".into()));
        let e = Membership::new("a", [PeerSpec::new("b", ["m", "m"])], t, t0).unwrap_err();
        assert!(matches!(e, MembershipError::DuplicateNetwork { .. }));
        let e = Membership::new("a", [PeerSpec::new("", ["m"])], t, t0).unwrap_err();
        assert_eq!(e, MembershipError::EmptyName);
        let bad = Timeouts {
            fence_grace: ms(1),
            ..t
        };
        assert!(matches!(
            Membership::new("a", [PeerSpec::new("b", ["m"])], bad, t0),
            Err(MembershipError::Timeouts(_))
        ));
        let mut m = two_nets(t0);
        assert_eq!(
            m.observe_heartbeat("zz", "mgmt", t0, &[]).unwrap_err().to_string(),
            "unknown peer 'zz'"
        );
        assert_eq!(
            m.observe_heartbeat("b", "al9", t0, &[]).unwrap_err().to_string(),
            "peer 'b' has no address on network 'al9'"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_channels_up_is_alive_without_noise() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        let ev = run(&mut m, t0 + ms(30_000), feeder(&["mgmt", "al1"], true, t0)).await;
        let kinds: Vec<_> = ev.iter().map(|(_, e)| e.clone()).collect();
        // Up events first, then alive; nothing else in 30 s.
        assert!(
            kinds
                .iter()
                .all(|e| matches!(e, MembershipEvent::ChannelUp { .. } | MembershipEvent::PeerAlive { .. })),
            "{kinds:#?}"
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|e| matches!(e, MembershipEvent::ChannelUp { .. }))
                .count(),
            3
        );
        assert_eq!(m.state("b"), Some(PeerState::Alive));
        assert!(!m.self_view().isolated);
        let v = m.view();
        assert_eq!(v[0].incarnation, Some(7));
        assert!(v[0].channels.iter().all(|c| c.up));
    }

    #[tokio::test(start_paused = true)]
    async fn one_channel_lost_is_an_event_only_and_recovers() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        // mgmt is cut: last mgmt heartbeat at 2000.
        let ev = run(&mut m, t0 + ms(20_000), feeder(&["al1"], true, t0)).await;
        let want_down = MembershipEvent::ChannelDown {
            peer: "b".into(),
            channel: Channel::Net("mgmt".into()),
            last_seen: Some(t0 + ms(2000)),
            still_up: vec![Channel::Net("al1".into()), Channel::StateFile],
        };
        assert_eq!(
            ev,
            vec![
                (t0 + ms(3000), want_down.clone()),
                (
                    t0 + ms(3000),
                    MembershipEvent::PeerSuspect {
                        peer: "b".into(),
                        down: vec![Channel::Net("mgmt".into())]
                    }
                ),
            ]
        );
        assert!(want_down.is_redundancy_loss());
        assert_eq!(
            want_down.to_string(),
            "redundancy lost: network mgmt to peer b is down; still up: network al1, state-file"
        );
        // mgmt comes back.
        let ev = run(&mut m, t0 + ms(21_000), feeder(&["mgmt", "al1"], true, t0)).await;
        let kinds: Vec<_> = ev.into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            kinds,
            vec![
                MembershipEvent::ChannelUp {
                    peer: "b".into(),
                    channel: Channel::Net("mgmt".into())
                },
                MembershipEvent::PeerAlive { peer: "b".into() }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn state_file_keeps_a_peer_alive_with_every_network_cut() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        let ev = run(&mut m, t0 + ms(120_000), feeder(&[], true, t0)).await;
        assert!(
            !ev.iter().any(|(_, e)| matches!(e, MembershipEvent::PeerDead { .. })),
            "{ev:#?}"
        );
        let downs = ev.iter().filter(|(_, e)| e.is_redundancy_loss()).count();
        assert_eq!(downs, 2, "one redundancy-lost event per network: {ev:#?}");
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
        // Own state-file I/O works, so we are not isolated either.
        assert!(!m.self_view().isolated);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_only_when_every_channel_is_silent_for_dead_after() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        // Networks go first; the slot keeps advancing for 5 more seconds.
        run(&mut m, t0 + ms(7000), feeder(&[], true, t0)).await;
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
        // Last slot advance at 7000. Now everything is silent (own I/O still fine).
        let mut io = |m: &mut Membership, now: Instant| m.observe_statefile_io(true, now);
        let ev = run(&mut m, t0 + ms(9950), &mut io).await;
        assert!(!ev.iter().any(|(_, e)| matches!(e, MembershipEvent::PeerDead { .. })));
        let ev = run(&mut m, t0 + ms(10_000), &mut io).await;
        assert_eq!(
            ev,
            vec![(
                t0 + ms(10_000),
                MembershipEvent::PeerDead {
                    peer: "b".into(),
                    last_seen: t0 + ms(7000)
                }
            )]
        );
        assert_eq!(m.dead_peers().into_iter().collect::<Vec<_>>(), ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_slot_stays_dead_and_a_new_tick_rejoins() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        // The slot's counter is frozen at its last value (4 writes in 2 s): re-read forever.
        let frozen = |m: &mut Membership, now: Instant| {
            assert!(!m.observe_slot("b", 7, 4, now).unwrap(), "a stale slot must not count");
            m.observe_statefile_io(true, now);
        };
        let ev = run(&mut m, t0 + ms(30_000), frozen).await;
        let dead: Vec<_> = ev
            .iter()
            .filter(|(_, e)| matches!(e, MembershipEvent::PeerDead { .. }))
            .collect();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, t0 + ms(5000));
        assert!(
            !ev.iter()
                .any(|(_, e)| matches!(e, MembershipEvent::PeerRejoined { .. }))
        );
        // The host reboots: a new incarnation, tick 1.
        assert!(m.observe_slot("b", 8, 1, t0 + ms(30_000)).unwrap());
        let ev = m.tick(t0 + ms(30_000));
        assert_eq!(
            ev,
            vec![
                MembershipEvent::ChannelUp {
                    peer: "b".into(),
                    channel: Channel::StateFile
                },
                MembershipEvent::PeerRejoined {
                    peer: "b".into(),
                    dead_since: t0 + ms(2000)
                },
                MembershipEvent::PeerSuspect {
                    peer: "b".into(),
                    down: vec![Channel::Net("al1".into()), Channel::Net("mgmt".into())]
                },
            ]
        );
        assert_eq!(m.view()[0].incarnation, Some(8));
    }

    #[tokio::test(start_paused = true)]
    async fn first_slot_read_is_only_a_baseline() {
        let t0 = Instant::now();
        let mut m = Membership::new("a", [PeerSpec::new("b", ["mgmt"])], Timeouts::reference(), t0).unwrap();
        assert!(!m.observe_slot("b", 1, 100, t0).unwrap());
        assert!(!m.observe_slot("b", 1, 100, t0 + ms(500)).unwrap());
        assert!(
            !m.observe_slot("b", 1, 99, t0 + ms(600)).unwrap(),
            "going backwards is not progress"
        );
        assert!(m.observe_slot("b", 1, 101, t0 + ms(700)).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn never_heard_peer_is_dead_dead_after_our_start() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        let mut io = |m: &mut Membership, now: Instant| m.observe_statefile_io(true, now);
        let ev = run(&mut m, t0 + ms(3000), &mut io).await;
        assert_eq!(m.state("b"), Some(PeerState::Dead));
        let (at, last) = ev
            .iter()
            .find_map(|(t, e)| match e {
                MembershipEvent::PeerDead { last_seen, .. } => Some((*t, *last_seen)),
                _ => None,
            })
            .unwrap();
        assert_eq!((at, last), (t0 + ms(3000), t0));
        // Networks never heard are reported down at channel_timeout, the state-file slot one
        // write interval later (its first read is only a baseline).
        let downs: Vec<_> = ev
            .iter()
            .filter_map(|(t, e)| match e {
                MembershipEvent::ChannelDown { channel, .. } => Some((*t - t0, channel.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            downs,
            vec![
                (ms(1000), Channel::Net("al1".into())),
                (ms(1000), Channel::Net("mgmt".into())),
                (ms(1500), Channel::StateFile)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn isolation_needs_no_mutual_contact_and_no_state_file_for_isolation_after() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        // Everything stops at 2000 (last heartbeat and last I/O success at 2000).
        let mut fail = |m: &mut Membership, now: Instant| {
            m.observe_statefile_result(Err("EIO".into()), now);
        };
        let ev = run(&mut m, t0 + ms(3950), &mut fail).await;
        assert!(!ev.iter().any(|(_, e)| matches!(e, MembershipEvent::Isolated { .. })));
        assert!(ev.contains(&(
            t0 + ms(2050),
            MembershipEvent::StateFileLost {
                last_ok: Some(t0 + ms(2000)),
                error: Some("EIO".into())
            }
        )));
        let ev = run(&mut m, t0 + ms(4000), &mut fail).await;
        assert_eq!(
            ev,
            vec![(
                t0 + ms(4000),
                MembershipEvent::Isolated {
                    last_contact: t0 + ms(2000)
                }
            )]
        );
        assert!(m.self_view().isolated);
        assert_eq!(
            m.tick(t0 + ms(5000)),
            vec![MembershipEvent::PeerDead {
                peer: "b".into(),
                last_seen: t0 + ms(2000)
            }]
        );
        // Contact returns (one mutual heartbeat).
        m.observe_heartbeat("b", "al1", t0 + ms(6000), &sees_a()).unwrap();
        let ev = m.tick(t0 + ms(6000));
        assert!(ev.contains(&MembershipEvent::NotIsolated {
            isolated_since: t0 + ms(2000)
        }));
        assert!(ev.contains(&MembershipEvent::PeerRejoined {
            peer: "b".into(),
            dead_since: t0 + ms(2000)
        }));
    }

    #[tokio::test(start_paused = true)]
    async fn state_file_alone_or_heartbeats_alone_prevent_isolation() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        // Only our own state-file I/O works (peer silent): not isolated.
        let mut io = |m: &mut Membership, now: Instant| m.observe_statefile_io(true, now);
        let ev = run(&mut m, t0 + ms(20_000), &mut io).await;
        assert!(!ev.iter().any(|(_, e)| matches!(e, MembershipEvent::Isolated { .. })));
        // Only mutual heartbeats (state-file failing): not isolated.
        let t1 = Instant::now();
        let mut m = two_nets(t1);
        let mut hb = |m: &mut Membership, now: Instant| {
            if (now - t1).as_millis().is_multiple_of(200) {
                m.observe_heartbeat("b", "mgmt", now, &sees_a()).unwrap();
            }
            m.observe_statefile_io(false, now);
        };
        let ev = run(&mut m, t1 + ms(20_000), &mut hb).await;
        assert!(!ev.iter().any(|(_, e)| matches!(e, MembershipEvent::Isolated { .. })));
        assert!(
            ev.iter()
                .any(|(_, e)| matches!(e, MembershipEvent::StateFileLost { .. }))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_way_link_isolates_the_host_nobody_hears() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        run(&mut m, t0 + ms(2000), feeder(&["mgmt", "al1"], true, t0)).await;
        // b's heartbeats still arrive but no longer list us (b stopped hearing us); our storage
        // fails. We keep b alive, yet we are isolated: b will declare us dead.
        let mut one_way = |m: &mut Membership, now: Instant| {
            if (now - t0).as_millis().is_multiple_of(200) {
                m.observe_heartbeat("b", "mgmt", now, &[]).unwrap();
                m.observe_heartbeat("b", "al1", now, &[]).unwrap();
            }
            m.observe_statefile_io(false, now);
        };
        let ev = run(&mut m, t0 + ms(10_000), &mut one_way).await;
        let iso: Vec<_> = ev
            .iter()
            .filter(|(_, e)| matches!(e, MembershipEvent::Isolated { .. }))
            .collect();
        assert_eq!(iso.len(), 1, "{ev:#?}");
        assert_eq!(iso[0].0, t0 + ms(4000));
        assert_ne!(m.state("b"), Some(PeerState::Dead));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_heard_by_another_peer_is_not_dead() {
        let t0 = Instant::now();
        let peers = [PeerSpec::new("b", ["mgmt"]), PeerSpec::new("c", ["mgmt"])];
        let mut m = Membership::new("a", peers, Timeouts::reference(), t0).unwrap();
        // We hear c (which hears us and b); b is silent to us on every channel.
        let relay_until = t0 + ms(20_000);
        let mut feed = |m: &mut Membership, now: Instant| {
            if (now - t0).as_millis().is_multiple_of(200) {
                let sees: Vec<String> = if now <= relay_until {
                    vec!["a".into(), "b".into()]
                } else {
                    vec!["a".into()]
                };
                m.observe_heartbeat("c", "mgmt", now, &sees).unwrap();
            }
            m.observe_statefile_io(true, now);
        };
        let ev = run(&mut m, t0 + ms(20_000), &mut feed).await;
        assert!(
            !ev.iter().any(|(_, e)| matches!(e, MembershipEvent::PeerDead { .. })),
            "{ev:#?}"
        );
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
        assert_eq!(m.view()[0].seen_via, vec![("c".to_string(), t0 + ms(20_000))]);
        // c stops hearing b after 20 s: b is dead 3 s after the last relayed report.
        let ev = run(&mut m, t0 + ms(30_000), &mut feed).await;
        let dead: Vec<_> = ev
            .iter()
            .filter_map(|(t, e)| match e {
                MembershipEvent::PeerDead { peer, last_seen } => Some((*t, peer.clone(), *last_seen)),
                _ => None,
            })
            .collect();
        assert_eq!(dead, vec![(t0 + ms(23_000), "b".to_string(), t0 + ms(20_000))]);
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_state_file_io_is_reported_and_restored() {
        let t0 = Instant::now();
        let mut m = two_nets(t0);
        m.observe_statefile_io(true, t0 + ms(100));
        assert!(m.tick(t0 + ms(100)).is_empty());
        // No result at all (a hung read) for channel_timeout.
        let ev = m.tick(t0 + ms(1100));
        assert!(
            ev.contains(&MembershipEvent::StateFileLost {
                last_ok: Some(t0 + ms(100)),
                error: None
            }),
            "{ev:?}"
        );
        m.observe_statefile_io(true, t0 + ms(1200));
        assert!(m.tick(t0 + ms(1200)).contains(&MembershipEvent::StateFileRestored));
        assert!(m.self_view().statefile_ok);
    }

    #[tokio::test(start_paused = true)]
    async fn sees_lists_peers_heard_within_two_heartbeats() {
        let t0 = Instant::now();
        let peers = [PeerSpec::new("b", ["mgmt"]), PeerSpec::new("c", ["mgmt"])];
        let mut m = Membership::new("a", peers, Timeouts::reference(), t0).unwrap();
        m.observe_heartbeat("b", "mgmt", t0, &[]).unwrap();
        m.observe_heartbeat("c", "mgmt", t0 + ms(300), &[]).unwrap();
        assert_eq!(m.sees(t0 + ms(399)), ["b", "c"]);
        assert_eq!(m.sees(t0 + ms(400)), ["c"]);
        assert!(m.sees(t0 + ms(700)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_that_advanced_is_seen_for_one_slot_interval_more() {
        let t0 = Instant::now();
        let peers = [PeerSpec::new("b", ["mgmt"]), PeerSpec::new("c", ["mgmt"])];
        let mut m = Membership::new("a", peers, Timeouts::reference(), t0).unwrap();
        // The first read is a baseline, not evidence.
        m.observe_slot("b", 1, 1, t0).unwrap();
        assert!(m.sees(t0).is_empty());
        m.observe_slot("b", 1, 2, t0 + ms(500)).unwrap();
        // Slots advance every 500 ms and are read every 200 ms: 500 + 400 ms.
        assert_eq!(m.sees(t0 + ms(1399)), ["b"]);
        assert!(m.sees(t0 + ms(1400)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_relays_the_hosts_its_writer_sees() {
        let t0 = Instant::now();
        let peers = [PeerSpec::new("b", ["mgmt"]), PeerSpec::new("c", ["mgmt"])];
        let mut m = Membership::new("a", peers, Timeouts::reference(), t0).unwrap();
        // a hears nobody on the network; b's slot advances and says b hears c.
        let mut tick = 0;
        let mut t = t0;
        while t < t0 + ms(10_000) {
            tick += 1;
            m.observe_slot_with_sees("b", 1, tick, &["c".into(), "a".into()], t)
                .unwrap();
            m.tick(t);
            t += ms(500);
        }
        assert_eq!(m.state("c"), Some(PeerState::Suspect), "c is alive through b's slot");
        assert_eq!(m.state("b"), Some(PeerState::Suspect));
        assert!(m.dead_peers().is_empty());
        // A slot that stops advancing relays nothing more.
        m.observe_slot_with_sees("b", 1, tick, &["c".into()], t).unwrap();
        m.tick(t + ms(3100));
        assert_eq!(m.dead_peers().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_host_is_never_isolated() {
        let t0 = Instant::now();
        let mut m = Membership::new("a", [], Timeouts::reference(), t0).unwrap();
        m.observe_statefile_io(false, t0);
        assert!(
            !m.tick(t0 + ms(60_000))
                .iter()
                .any(|e| matches!(e, MembershipEvent::Isolated { .. }))
        );
    }
}
