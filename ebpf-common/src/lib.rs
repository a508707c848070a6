//! Types shared between the eBPF programs in `ebpf/` and their userspace loaders.
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by the BPF side
//! and read by userspace through BPF maps. Map names are constants here so the two sides
//! cannot drift apart.
#![no_std]

/// Packet and byte counters for one key (one CPU's share in per-CPU maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

impl Counters {
    /// Sum of the per-CPU values of a per-CPU map entry.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a Counters>) -> Counters {
        per_cpu.into_iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        })
    }
}

// SAFETY: `Counters` is `#[repr(C)]`, made only of `u64`s (no padding, every bit pattern valid).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}

/// Name of the XDP program that counts every frame received on an interface.
pub const PROG_XDP_COUNT: &str = "xdp_count";
/// Per-CPU hash map: ingress ifindex (`u32`) → [`Counters`].
pub const MAP_IFACE_RX: &str = "IFACE_RX";
/// Maximum number of interfaces [`MAP_IFACE_RX`] tracks.
pub const IFACE_RX_MAX: u32 = 256;

// ---------------------------------------------------------------------------------------
// netpair: per-guest counters and steering.
// ---------------------------------------------------------------------------------------

/// A guest's MAC address as a map key (padded to 8 bytes so it has no implicit padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}

impl MacKey {
    pub const fn new(addr: [u8; 6]) -> Self {
        Self { addr, _pad: [0; 2] }
    }
}

/// The guest runs on this host; its port on our bridge is `GuestEntry::guest_ifindex`.
pub const ROLE_LOCAL: u32 = 1;
/// The guest runs on the partner host; we lend it our application NIC when steering.
pub const ROLE_PARTNER: u32 = 2;

/// What this host knows and does about one protected guest (map [`MAP_GUESTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestEntry {
    /// [`ROLE_LOCAL`] or [`ROLE_PARTNER`].
    pub role: u32,
    /// 1 while the guest's traffic goes through the partner host's application NIC:
    /// on the LOCAL host, frames from the guest go over the AL and frames arriving from the
    /// AL for the guest go into its port; on the PARTNER host, frames for the guest arriving
    /// on the application NIC go over the AL and the guest's frames from the AL go out of the
    /// application NIC.
    pub steer: u32,
    /// LOCAL only: ifindex of the guest's port (tap/veth) on our bridge.
    pub guest_ifindex: u32,
    pub _pad: u32,
}

/// Per-guest counters, one copy per CPU (map [`MAP_GUEST_STATS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Frames for the guest (destination MAC) received on the application NIC.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the guest (source MAC) sent out of the application NIC.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames of this guest this host redirected into an availability link.
    pub to_al_packets: u64,
    /// Frames of this guest this host took from an availability link and delivered.
    pub from_al_packets: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last rx / tx; 0 = never.
    pub last_rx_ns: u64,
    pub last_tx_ns: u64,
}

impl GuestStats {
    /// Adds up the per-CPU copies (times: the latest).
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a GuestStats>) -> GuestStats {
        per_cpu.into_iter().fold(GuestStats::default(), |a, c| GuestStats {
            rx_packets: a.rx_packets + c.rx_packets,
            rx_bytes: a.rx_bytes + c.rx_bytes,
            tx_packets: a.tx_packets + c.tx_packets,
            tx_bytes: a.tx_bytes + c.tx_bytes,
            to_al_packets: a.to_al_packets + c.to_al_packets,
            from_al_packets: a.from_al_packets + c.from_al_packets,
            last_rx_ns: a.last_rx_ns.max(c.last_rx_ns),
            last_tx_ns: a.last_tx_ns.max(c.last_tx_ns),
        })
    }
}

// SAFETY: #[repr(C)], only u8 arrays with explicit padding fields; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for MacKey {}
// SAFETY: #[repr(C)], four u32s, no implicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuestEntry {}
// SAFETY: #[repr(C)], only u64s, no padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuestStats {}

/// Hash map [`MacKey`] → [`GuestEntry`]: the protected guests and their steering state.
pub const MAP_GUESTS: &str = "GUESTS";
/// Per-CPU hash map [`MacKey`] → [`GuestStats`].
pub const MAP_GUEST_STATS: &str = "GUEST_STATS";
/// Array `u32`, indexed by the `CFG_*` constants.
pub const MAP_CONFIG: &str = "NETPAIR_CONFIG";
/// Array `u32` of guest port ifindexes (0 = empty) to which broadcasts arriving from the
/// AL are delivered: the LOCAL guests being steered.
pub const MAP_STEERED_PORTS: &str = "STEERED_PORTS";
pub const STEERED_PORTS_MAX: u32 = 8;
pub const GUESTS_MAX: u32 = 1024;

/// [`MAP_CONFIG`] index: ifindex of this host's application NIC.
pub const CFG_APP_IFINDEX: u32 = 0;
/// [`MAP_CONFIG`] index: ifindex of the availability link steered frames take (AL1 or AL2,
/// chosen by userspace from link state).
pub const CFG_AL_IFINDEX: u32 = 1;
/// [`MAP_CONFIG`] index: 1 while we steer for at least one PARTNER guest, so broadcasts
/// arriving on our application NIC are copied over the AL.
pub const CFG_PARTNER_STEERING: u32 = 2;
/// [`MAP_CONFIG`] index: 1 when no XDP program runs on the application NIC, so the TC
/// ingress program does the per-guest counting and the loop drop instead.
pub const CFG_COUNT_IN_TC: u32 = 3;
pub const CFG_MAX: u32 = 4;

pub const PROG_XDP_APP: &str = "xdp_app";
pub const PROG_TC_APP_INGRESS: &str = "tc_app_ingress";
pub const PROG_TC_APP_EGRESS: &str = "tc_app_egress";
pub const PROG_TC_AL_INGRESS: &str = "tc_al_ingress";
pub const PROG_TC_GUEST_INGRESS: &str = "tc_guest_ingress";
