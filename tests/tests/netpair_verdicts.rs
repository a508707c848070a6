//! Verdicts of netpair's eBPF programs on crafted frames, through BPF_PROG_TEST_RUN:
//! counting, steering redirects, loop drops, frames of other hosts untouched, short and
//! malformed frames passed safely. Privileged (root, BPF); the programs are attached in a
//! throw-away namespace because steering needs real ifindexes.

use eac_lab::{netns::Netns, require_root, topology::veth};
use ebpf_common::{PROG_TC_AL_INGRESS, PROG_TC_APP_EGRESS, PROG_TC_APP_INGRESS, PROG_TC_GUEST_INGRESS, PROG_XDP_APP};
use netpair::{Datapath, Mac, Role};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL_GUEST: Mac = Mac([0x52, 0x54, 0, 0xfb, 1, 0x0a]);
const PARTNER_GUEST: Mac = Mac([0x52, 0x54, 0, 0xfb, 1, 0x0b]);
const CLIENT: Mac = Mac([0x02, 0, 0, 0, 0, 0x64]);
const BROADCAST: Mac = Mac([0xff; 6]);

/// An Ethernet frame: dst, src, IPv4 ethertype and `payload` zero bytes.
fn frame(dst: Mac, src: Mac, payload: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(14 + payload, 0);
    f
}

/// A namespace with app0, al1, al2 and a guest port vg0 (veths to a sink namespace), and
/// the data path attached; `f` runs inside it.
fn with_datapath(f: impl FnOnce(&mut Datapath) + Send) {
    with_datapath_mode(true, f)
}

fn with_datapath_mode(xdp: bool, f: impl FnOnce(&mut Datapath) + Send) {
    require_root();
    let ns = Netns::create("verdict").unwrap();
    let sink = Netns::create("vsink").unwrap();
    for (i, name) in ["app0", "al1", "al2", "vg0"].into_iter().enumerate() {
        veth(&ns, name, &sink, &format!("p{i}")).unwrap();
        ns.ip(&["link", "set", name, "up"]).unwrap();
        sink.ip(&["link", "set", &format!("p{i}"), "up"]).unwrap();
    }
    let pin = eac_lab::BpfPinDir::new(ns.name());
    let pin = pin.path();
    ns.enter(|| {
        let mut dp = Datapath::attach(pin, "app0", &["al1", "al2"], xdp).expect("attach");
        dp.add_guest(LOCAL_GUEST, Role::Local, Some("vg0")).unwrap();
        dp.add_guest(PARTNER_GUEST, Role::Partner, None).unwrap();
        f(&mut dp);
    })
    .unwrap();
}

#[test]
#[ignore = "privileged: needs root and BPF; run by scripts/test.sh"]
fn xdp_app_counts_guest_frames_and_drops_looped_ones() {
    with_datapath(|dp| {
        assert_eq!(
            dp.test_run(PROG_XDP_APP, &frame(LOCAL_GUEST, CLIENT, 86)).unwrap(),
            XDP_PASS
        );
        assert_eq!(
            dp.test_run(PROG_XDP_APP, &frame(PARTNER_GUEST, CLIENT, 86)).unwrap(),
            XDP_PASS
        );
        let s = dp.stats(LOCAL_GUEST).unwrap();
        assert_eq!((s.rx_packets, s.rx_bytes), (1, 100));
        assert!(s.last_rx_ns > 0);
        assert_eq!(dp.stats(PARTNER_GUEST).unwrap().rx_packets, 1);
        // Our own guest's frame coming back from the switch is a loop: dropped.
        assert_eq!(
            dp.test_run(PROG_XDP_APP, &frame(BROADCAST, LOCAL_GUEST, 46)).unwrap(),
            XDP_DROP
        );
        // Frames of others and broadcasts pass untouched and are not counted for a guest.
        assert_eq!(dp.test_run(PROG_XDP_APP, &frame(CLIENT, CLIENT, 46)).unwrap(), XDP_PASS);
        assert_eq!(
            dp.test_run(PROG_XDP_APP, &frame(BROADCAST, CLIENT, 46)).unwrap(),
            XDP_PASS
        );
        assert_eq!(dp.stats(LOCAL_GUEST).unwrap().rx_packets, 1);
        // Frames shorter than an Ethernet header never reach XDP: the kernel refuses them.
        assert!(dp.test_run(PROG_XDP_APP, &frame(LOCAL_GUEST, CLIENT, 0)[..13]).is_err());
        // A bare header, and an IPv4 ethertype with a truncated IP header: passed, counted
        // as frames for the guest, nothing read beyond the Ethernet header.
        for payload in [0usize, 3] {
            assert_eq!(
                dp.test_run(PROG_XDP_APP, &frame(LOCAL_GUEST, CLIENT, payload)).unwrap(),
                XDP_PASS
            );
        }
        assert_eq!(dp.stats(LOCAL_GUEST).unwrap().rx_packets, 3);
    });
}

#[test]
#[ignore = "privileged: needs root and BPF; run by scripts/test.sh"]
fn partner_steers_guest_frames_only_while_steering() {
    with_datapath(|dp| {
        let to_guest = frame(PARTNER_GUEST, CLIENT, 46);
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &to_guest).unwrap(),
            TC_ACT_OK,
            "not steering"
        );
        dp.set_steer(PARTNER_GUEST, true).unwrap();
        assert_eq!(dp.test_run(PROG_TC_APP_INGRESS, &to_guest).unwrap(), TC_ACT_REDIRECT);
        assert_eq!(dp.stats(PARTNER_GUEST).unwrap().to_al_packets, 1);
        // Frames for anyone else stay on this host.
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &frame(CLIENT, PARTNER_GUEST, 46))
                .unwrap(),
            TC_ACT_OK
        );
        // The partner guest's outbound frames arriving over the AL leave through our NIC.
        assert_eq!(
            dp.test_run(PROG_TC_AL_INGRESS, &frame(CLIENT, PARTNER_GUEST, 46))
                .unwrap(),
            TC_ACT_REDIRECT
        );
        assert_eq!(dp.stats(PARTNER_GUEST).unwrap().from_al_packets, 1);
        // A broadcast on the app NIC is copied to the AL and still delivered here.
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &frame(BROADCAST, CLIENT, 46)).unwrap(),
            TC_ACT_OK
        );
        dp.set_steer(PARTNER_GUEST, false).unwrap();
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &to_guest).unwrap(),
            TC_ACT_OK,
            "steering off again"
        );
        assert_eq!(
            dp.test_run(PROG_TC_AL_INGRESS, &frame(CLIENT, PARTNER_GUEST, 46))
                .unwrap(),
            TC_ACT_OK
        );
    });
}

#[test]
#[ignore = "privileged: needs root and BPF; run by scripts/test.sh"]
fn local_guest_frames_go_over_the_al_only_while_steering() {
    with_datapath(|dp| {
        let from_guest = frame(CLIENT, LOCAL_GUEST, 46);
        let to_guest = frame(LOCAL_GUEST, CLIENT, 46);
        assert_eq!(dp.test_run(PROG_TC_GUEST_INGRESS, &from_guest).unwrap(), TC_ACT_OK);
        assert_eq!(dp.test_run(PROG_TC_AL_INGRESS, &to_guest).unwrap(), TC_ACT_OK);
        dp.set_steer(LOCAL_GUEST, true).unwrap();
        assert_eq!(
            dp.test_run(PROG_TC_GUEST_INGRESS, &from_guest).unwrap(),
            TC_ACT_REDIRECT
        );
        assert_eq!(dp.test_run(PROG_TC_AL_INGRESS, &to_guest).unwrap(), TC_ACT_REDIRECT);
        // The guest's broadcasts are copied to the AL and still reach our bridge.
        assert_eq!(
            dp.test_run(PROG_TC_GUEST_INGRESS, &frame(BROADCAST, LOCAL_GUEST, 46))
                .unwrap(),
            TC_ACT_OK
        );
        // A broadcast from the AL is copied to the steered port and reaches the AL's stack.
        assert_eq!(
            dp.test_run(PROG_TC_AL_INGRESS, &frame(BROADCAST, CLIENT, 46)).unwrap(),
            TC_ACT_OK
        );
        let s = dp.stats(LOCAL_GUEST).unwrap();
        assert_eq!((s.to_al_packets, s.from_al_packets), (2, 1));
        // Another host's frame on the guest port is not steered.
        assert_eq!(
            dp.test_run(PROG_TC_GUEST_INGRESS, &frame(CLIENT, CLIENT, 46)).unwrap(),
            TC_ACT_OK
        );
    });
}

#[test]
#[ignore = "privileged: needs root and BPF; run by scripts/test.sh"]
fn egress_counts_guest_frames_and_header_only_frames_are_safe() {
    with_datapath(|dp| {
        assert_eq!(
            dp.test_run(PROG_TC_APP_EGRESS, &frame(CLIENT, LOCAL_GUEST, 86))
                .unwrap(),
            TC_ACT_OK
        );
        let s = dp.stats(LOCAL_GUEST).unwrap();
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 100));
        dp.set_steer(LOCAL_GUEST, true).unwrap();
        dp.set_steer(PARTNER_GUEST, true).unwrap();
        // A bare Ethernet header (experimental ethertype; the kernel refuses an IPv4 one
        // without an IP header for TC test runs).
        let mut bare = frame(LOCAL_GUEST, PARTNER_GUEST, 0);
        bare[12..14].copy_from_slice(&[0x88, 0xb5]);
        for prog in [
            PROG_TC_APP_INGRESS,
            PROG_TC_APP_EGRESS,
            PROG_TC_AL_INGRESS,
            PROG_TC_GUEST_INGRESS,
        ] {
            let v = dp.test_run(prog, &bare).unwrap();
            assert!(v == TC_ACT_OK || v == TC_ACT_REDIRECT, "{prog}: verdict {v}");
        }
    });
}

#[test]
#[ignore = "privileged: needs root and BPF; run by scripts/test.sh"]
fn without_xdp_the_tc_program_counts_and_drops_loops() {
    with_datapath_mode(false, |dp| {
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &frame(LOCAL_GUEST, CLIENT, 86))
                .unwrap(),
            TC_ACT_OK
        );
        let s = dp.stats(LOCAL_GUEST).unwrap();
        assert_eq!((s.rx_packets, s.rx_bytes), (1, 100));
        const TC_ACT_SHOT: u32 = 2;
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &frame(BROADCAST, LOCAL_GUEST, 46))
                .unwrap(),
            TC_ACT_SHOT
        );
        assert_eq!(
            dp.test_run(PROG_TC_APP_INGRESS, &frame(CLIENT, CLIENT, 46)).unwrap(),
            TC_ACT_OK
        );
        assert_eq!(dp.stats(LOCAL_GUEST).unwrap().rx_packets, 1);
    });
}
