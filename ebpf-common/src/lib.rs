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
