//! The controller's events as the API carries them: every failure detected, decision taken
//! and action completed (the controller's `events` module logs, broadcasts and keeps them).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, milliseconds since the Unix epoch (for humans and logs only; nothing
    /// decides on it).
    pub ts_ms: u64,
    /// The host that saw it.
    pub host: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What happened and why, for the operator.
    pub detail: String,
}

/// What kind of thing happened. Serialized in snake_case (`"peer_dead"`); a kind this build
/// does not know (from a newer peer) reads as [`EventKind::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The controller started (detail: version, incarnation).
    Started,
    /// The controller is stopping.
    Stopping,
    /// A heartbeat channel (network) or the state-file channel to a peer came up.
    ChannelUp,
    /// A heartbeat channel or the state-file channel to a peer went silent.
    ChannelDown,
    /// A channel was lost: one failure away from less protection (reported, not acted on).
    RedundancyLost,
    /// Every channel to every peer works again.
    RedundancyRestored,
    /// A peer is silent on some channels and may be failing.
    PeerSuspect,
    /// A peer is (again) alive.
    PeerAlive,
    /// Every channel to a peer has been silent past `dead_after`.
    PeerDead,
    /// This host can reach no peer and not the state-file.
    Isolated,
    /// This host regained contact.
    NotIsolated,
    /// This host is fencing itself (destroying its protected guests).
    Fencing,
    /// Fencing finished (detail: what was destroyed, how long it took).
    Fenced,
    /// The hardware watchdog was armed.
    WatchdogArmed,
    /// The state-file cannot be read or written.
    StateFileError,
    /// The state-file works again.
    StateFileOk,
    /// The state-file's path is missing (deleted or renamed); the open file is still used.
    StateFileMissing,
    /// The state-file's path is not a regular file (a directory, a FIFO, …).
    StateFileNotRegular,
    /// The state-file's path names a file that cannot be adopted (too small, cannot be
    /// checked or opened).
    StateFileUnusable,
    /// The state-file's path names another file (replaced, restored): reopened.
    StateFileReplaced,
    /// A state-file problem ended (no peer: the file; a peer: its slot decodes again).
    StateFileHealed,
    /// A peer's state-file slot does not decode (torn, garbage): not a silent peer.
    StateFileSlotCorrupt,
    /// A guest was started (by an operator or a decision).
    GuestStarted,
    /// A start of a guest failed (libvirt launched QEMU, then gave up): one event, with what
    /// refused (the lock manager's lease, QEMU's image lock, …) when this controller made it.
    GuestStartFailed,
    /// A guest stopped.
    GuestStopped,
    /// A guest crashed.
    GuestCrashed,
    /// A protected guest was restarted (after a crash or on a survivor).
    GuestRestarted,
    /// A restart was attempted and failed.
    GuestRestartFailed,
    /// A guest was protected (or its level changed).
    GuestProtected,
    /// A guest's protection was removed.
    GuestUnprotected,
    /// The failover plan holds again.
    PlanOk,
    /// The failover plan no longer covers the configured host failures.
    PlanBroken,
    /// A change was refused by admission control.
    AdmissionRefused,
    /// The pool configuration changed (detail: epoch, what).
    ConfigChanged,
    /// This host's controller was not scheduled for longer than the dead timeout: its peers
    /// may have declared it dead (detail: how long; what the re-check of ownership found).
    Stalled,
    /// The pool's record of where a guest runs was corrected to what libvirt reports.
    GuestLocation,
    /// A protected guest is active on more than one host (or no longer: detail says).
    GuestDuplicate,
    /// This host destroyed its copy of a guest that a peer runs and the pool places there.
    GuestYielded,
    /// A kind this build does not know.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The level the event is logged at (docs/logging.md: error = redundancy or service lost
    /// and not compensated; warn = failure detected and handled; info = state change).
    pub fn level(self) -> tracing::Level {
        use EventKind::*;
        match self {
            PeerDead | Isolated | Fencing | GuestRestartFailed | PlanBroken | StateFileError | StateFileMissing
            | StateFileNotRegular | StateFileUnusable | GuestDuplicate => tracing::Level::ERROR,
            ChannelDown | RedundancyLost | PeerSuspect | GuestCrashed | WatchdogArmed | AdmissionRefused
            | StateFileReplaced | StateFileSlotCorrupt | Stalled | GuestLocation | GuestYielded | GuestStartFailed
            | Unknown => tracing::Level::WARN,
            _ => tracing::Level::INFO,
        }
    }

    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        use EventKind::*;
        match self {
            Started => "started",
            Stopping => "stopping",
            ChannelUp => "channel_up",
            ChannelDown => "channel_down",
            RedundancyLost => "redundancy_lost",
            RedundancyRestored => "redundancy_restored",
            PeerSuspect => "peer_suspect",
            PeerAlive => "peer_alive",
            PeerDead => "peer_dead",
            Isolated => "isolated",
            NotIsolated => "not_isolated",
            Fencing => "fencing",
            Fenced => "fenced",
            WatchdogArmed => "watchdog_armed",
            StateFileError => "state_file_error",
            StateFileOk => "state_file_ok",
            StateFileMissing => "state_file_missing",
            StateFileNotRegular => "state_file_not_regular",
            StateFileUnusable => "state_file_unusable",
            StateFileReplaced => "state_file_replaced",
            StateFileHealed => "state_file_healed",
            StateFileSlotCorrupt => "state_file_slot_corrupt",
            GuestStarted => "guest_started",
            GuestStartFailed => "guest_start_failed",
            GuestStopped => "guest_stopped",
            GuestCrashed => "guest_crashed",
            GuestRestarted => "guest_restarted",
            GuestRestartFailed => "guest_restart_failed",
            GuestProtected => "guest_protected",
            GuestUnprotected => "guest_unprotected",
            PlanOk => "plan_ok",
            PlanBroken => "plan_broken",
            AdmissionRefused => "admission_refused",
            ConfigChanged => "config_changed",
            Stalled => "stalled",
            GuestLocation => "guest_location",
            GuestDuplicate => "guest_duplicate",
            GuestYielded => "guest_yielded",
            Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
