//! eBPF programs of the availability stack, loaded by `netpair`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuHashMap,
    programs::XdpContext,
};
use ebpf_common::{Counters, IFACE_RX_MAX};

/// Ingress ifindex → frames and bytes received (see `ebpf_common::MAP_IFACE_RX`).
#[map]
static IFACE_RX: PerCpuHashMap<u32, Counters> = PerCpuHashMap::with_max_entries(IFACE_RX_MAX, 0);

/// Counts every frame received on the interface it is attached to, then passes it on.
/// Never drops or alters a frame: a counter that cannot be updated is skipped, not fatal.
#[xdp]
pub fn xdp_count(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u64;
    match IFACE_RX.get_ptr_mut(ifindex) {
        Some(c) => {
            // SAFETY: the pointer comes from the map lookup and this CPU's slot is ours alone.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += len;
            }
        }
        None => {
            let _ = IFACE_RX.insert(ifindex, Counters { packets: 1, bytes: len }, 0);
        }
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
