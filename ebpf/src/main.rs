//! eBPF programs of the availability stack, loaded by `netpair`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    btf_maps::{Array, HashMap, PerCpuHashMap as BtfPerCpuHashMap},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{btf_map, classifier, map, xdp},
    maps::PerCpuHashMap,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use ebpf_common::{
    CFG_AL_IFINDEX, CFG_APP_IFINDEX, CFG_COUNT_IN_TC, CFG_MAX, CFG_PARTNER_STEERING, Counters, GUESTS_MAX, GuestEntry,
    GuestStats, IFACE_RX_MAX, MacKey, ROLE_LOCAL, ROLE_PARTNER, STEERED_PORTS_MAX,
};

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

// ---------------------------------------------------------------------------------------
// netpair. The loader pins these maps under its pin directory after loading, so that
// `bpftool map dump pinned /sys/fs/bpf/eac/<instance>/GUEST_STATS` shows live counters. They
// are not declared `pinned`: that would make every load of this object (e.g. the plain frame
// counter) pin them at a default path, and a restarted daemon should decide afresh rather
// than inherit steering state.
// ---------------------------------------------------------------------------------------

// BTF-defined maps (the `.maps` section): bpftool prints keys and values with their field
// names. Sizes are const generics here and must match ebpf_common's constants.
const _: () = assert!(GUESTS_MAX == 1024 && CFG_MAX == 4 && STEERED_PORTS_MAX == 8);

#[btf_map]
static GUESTS: HashMap<MacKey, GuestEntry, 1024> = HashMap::new();

#[btf_map]
static GUEST_STATS: BtfPerCpuHashMap<MacKey, GuestStats, 1024> = BtfPerCpuHashMap::new();

#[btf_map]
static NETPAIR_CONFIG: Array<u32, 4> = Array::new();

#[btf_map]
static STEERED_PORTS: Array<u32, 8> = Array::new();

const ETH_HLEN: usize = 14;

#[inline(always)]
fn config(index: u32) -> u32 {
    NETPAIR_CONFIG.get(index).copied().unwrap_or(0)
}

#[inline(always)]
fn guest(mac: [u8; 6]) -> Option<GuestEntry> {
    // SAFETY: a map value pointer is valid for reading during this program run.
    GUESTS.get_ptr(MacKey::new(mac)).map(|p| unsafe { *p })
}

#[inline(always)]
fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// Runs `f` on this CPU's counters of `mac`, if the guest is known (userspace creates the
/// entry together with the guest's `GUESTS` entry).
#[inline(always)]
fn with_stats(mac: [u8; 6], f: impl FnOnce(&mut GuestStats)) {
    if let Some(p) = GUEST_STATS.get_ptr_mut(MacKey::new(mac)) {
        // SAFETY: per-CPU value: only this CPU writes it while the program runs.
        f(unsafe { &mut *p })
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: bpf_redirect only records the target; an unknown ifindex makes the kernel drop
    // the frame, never crash.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Application NIC, ingress (XDP, first to see a frame): counts frames for protected guests
/// and drops our own guests' frames coming back from the switch (a loop while steering:
/// the partner sends them out of its NIC and the switch floods broadcasts back to us).
#[xdp]
pub fn xdp_app(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN > end {
        return xdp_action::XDP_PASS; // runt frame: not ours to judge
    }
    // SAFETY: bounds checked above: 14 bytes are readable from `start`.
    let (dst, src) = unsafe { (*(start as *const [u8; 6]), *((start + 6) as *const [u8; 6])) };
    if app_rx(dst, src, (end - start) as u64) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// A frame received on the application NIC: counts it for its guest; false when it is one
/// of our own guests' frames coming back from the switch (a loop while steering: drop it).
#[inline(always)]
fn app_rx(dst: [u8; 6], src: [u8; 6], len: u64) -> bool {
    if guest(src).is_some_and(|g| g.role == ROLE_LOCAL) {
        return false;
    }
    if !is_multicast(&dst) && guest(dst).is_some() {
        with_stats(dst, |s| {
            s.rx_packets += 1;
            s.rx_bytes += len;
            s.last_rx_ns = now_ns();
        });
    }
    true
}

/// Application NIC, ingress (TC): counts and drops loops here when XDP is off; on the
/// PARTNER host while steering, frames for the guest
/// go over the AL to the host it runs on, and broadcasts are copied there too.
#[classifier]
pub fn tc_app_ingress(ctx: TcContext) -> i32 {
    let Ok(dst) = ctx.load::<[u8; 6]>(0) else {
        return TC_ACT_OK;
    };
    if config(CFG_COUNT_IN_TC) == 1 {
        let Ok(src) = ctx.load::<[u8; 6]>(6) else {
            return TC_ACT_OK;
        };
        if !app_rx(dst, src, ctx.len() as u64) {
            return TC_ACT_SHOT;
        }
    }
    let al = config(CFG_AL_IFINDEX);
    if al == 0 {
        return TC_ACT_OK;
    }
    if is_multicast(&dst) {
        if config(CFG_PARTNER_STEERING) == 1 && ctx.clone_redirect(al, 0).is_err() {
            warn!(&ctx, "clone of a broadcast to AL ifindex {} failed", al);
        }
        return TC_ACT_OK;
    }
    match guest(dst) {
        Some(g) if g.role == ROLE_PARTNER && g.steer == 1 => {
            with_stats(dst, |s| s.to_al_packets += 1);
            redirect(al)
        }
        _ => TC_ACT_OK,
    }
}

/// Application NIC, egress: counts frames sent by protected guests.
#[classifier]
pub fn tc_app_egress(ctx: TcContext) -> i32 {
    let Ok(src) = ctx.load::<[u8; 6]>(6) else {
        return TC_ACT_OK;
    };
    let len = ctx.len() as u64;
    with_stats(src, |s| {
        s.tx_packets += 1;
        s.tx_bytes += len;
        s.last_tx_ns = now_ns();
    });
    TC_ACT_OK
}

/// Availability link, ingress: frames the partner steers to us. A partner guest's outbound
/// frame leaves through our application NIC; a frame for one of our steered guests goes
/// into its port; a broadcast is copied to every steered guest port (and still reaches the
/// AL's own stack, which carries our pairing and replication traffic).
#[classifier]
pub fn tc_al_ingress(ctx: TcContext) -> i32 {
    let Ok(dst) = ctx.load::<[u8; 6]>(0) else {
        return TC_ACT_OK;
    };
    let Ok(src) = ctx.load::<[u8; 6]>(6) else {
        return TC_ACT_OK;
    };
    if let Some(g) = guest(src) {
        if g.role == ROLE_PARTNER && g.steer == 1 {
            let app = config(CFG_APP_IFINDEX);
            if app != 0 {
                with_stats(src, |s| s.from_al_packets += 1);
                return redirect(app);
            }
        }
    }
    if is_multicast(&dst) {
        for i in 0..STEERED_PORTS_MAX {
            let port = STEERED_PORTS.get(i).copied().unwrap_or(0);
            if port != 0 && ctx.clone_redirect(port, 0).is_err() {
                warn!(&ctx, "clone of a broadcast from the AL to port {} failed", port);
            }
        }
        return TC_ACT_OK;
    }
    match guest(dst) {
        Some(g) if g.role == ROLE_LOCAL && g.steer == 1 && g.guest_ifindex != 0 => {
            with_stats(dst, |s| s.from_al_packets += 1);
            redirect(g.guest_ifindex)
        }
        _ => TC_ACT_OK,
    }
}

/// A local guest's port, ingress (frames from the guest): while steering, its frames go
/// over the AL (broadcasts are copied, and still reach our bridge).
#[classifier]
pub fn tc_guest_ingress(ctx: TcContext) -> i32 {
    let Ok(dst) = ctx.load::<[u8; 6]>(0) else {
        return TC_ACT_OK;
    };
    let Ok(src) = ctx.load::<[u8; 6]>(6) else {
        return TC_ACT_OK;
    };
    match guest(src) {
        Some(g) if g.role == ROLE_LOCAL && g.steer == 1 => {
            let al = config(CFG_AL_IFINDEX);
            if al == 0 {
                return TC_ACT_OK;
            }
            with_stats(src, |s| s.to_al_packets += 1);
            if is_multicast(&dst) {
                if ctx.clone_redirect(al, 0).is_err() {
                    warn!(&ctx, "clone of a guest broadcast to AL ifindex {} failed", al);
                }
                TC_ACT_OK
            } else {
                redirect(al)
            }
        }
        _ => TC_ACT_OK,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
