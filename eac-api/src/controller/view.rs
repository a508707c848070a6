//! What the API's read operations return (`pool.status`, `host.list`, `vm.list`, `plan`): the
//! daemon builds these, `eac` prints them (for people) or passes them through (`--json`).
//! Fields are only ever added (readers ignore unknown fields).
use serde::{Deserialize, Serialize};

/// One heartbeat channel (a network or the state-file) to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// Network name (`mgmt`, `al1`, …) or `statefile`.
    pub name: String,
    pub up: bool,
    /// Milliseconds since something was last heard on it; `None` if never.
    #[serde(default)]
    pub last_seen_ms_ago: Option<u64>,
}

/// A host of the pool as the answering host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    /// `self` for the answering host; else `alive`, `suspect`, `dead` or `unknown`.
    pub state: String,
    /// Per channel to this peer (empty for the answering host).
    #[serde(default)]
    pub channels: Vec<ChannelView>,
    /// What the host offers guests.
    pub mem_mib: u64,
    pub vcpus: u32,
    /// What protected and other running guests use there (as far as known).
    #[serde(default)]
    pub mem_used_mib: u64,
    #[serde(default)]
    pub vcpus_used: u32,
    /// The answering host only: fencing state (`normal`, `fencing`, `fenced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing: Option<String>,
}

/// `host.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostList {
    pub answered_by: String,
    pub hosts: Vec<HostView>,
}

/// `pool.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub answered_by: String,
    pub config_epoch: u64,
    pub config_fingerprint: String,
    pub host_failures_to_tolerate: u32,
    pub hosts: Vec<HostView>,
    pub protected_guests: usize,
    /// This host lost quorum (contact with a majority of the pool; in a pool of two, with
    /// its peer and the state-file) for `isolation_after`.
    pub isolated: bool,
    /// The answering controller runs under SCHED_FIFO (`realtime_priority`); `None` from a
    /// controller that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realtime: Option<bool>,
    /// `normal`, `fencing` or `fenced`.
    pub fencing: String,
    /// Every channel to every peer works.
    pub redundancy_ok: bool,
    /// What is lost, e.g. "b: mgmt down".
    #[serde(default)]
    pub redundancy_lost: Vec<String>,
    pub plan_ok: bool,
    pub plan_summary: String,
}

/// A guest in `vm.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    /// Protection level, `None` when unprotected.
    #[serde(default)]
    pub level: Option<u8>,
    /// libvirt state on this host (`running`, `shut off`, `crashed`, …) or `unknown`.
    pub state: String,
    /// `ok`, `unprotected`, `down` (protected, not running), `restarting`, `unknown` (host
    /// unreachable), `fenced`.
    pub health: String,
    #[serde(default)]
    pub mem_mib: u64,
    #[serde(default)]
    pub vcpus: u32,
}

/// One host's branch of `vm.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGuests {
    pub host: String,
    /// Host state as in [`HostView::state`].
    pub state: String,
    /// Whether the guests were read from the host itself (else from the pool configuration).
    pub reachable: bool,
    pub guests: Vec<VmView>,
}

/// `vm.list`: a tree host → guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmList {
    pub answered_by: String,
    pub hosts: Vec<HostGuests>,
}

/// A guest on this host, as a peer reports it (`ext` `vm.local`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalGuest {
    pub name: String,
    pub state: String,
    pub active: bool,
    #[serde(default)]
    pub mem_mib: u64,
    #[serde(default)]
    pub vcpus: u32,
}

/// `vm.protect` / `vm.unprotect` / `pool.policy`: what was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    pub change: String,
    pub epoch: u64,
    /// Live hosts that hold the new configuration (including the answering one).
    pub applied_on: Vec<String>,
    /// Dead hosts that will catch up when they return.
    #[serde(default)]
    pub pending_on: Vec<String>,
}
