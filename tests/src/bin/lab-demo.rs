//! `lab-demo` — the main job of scripts/demo.sh: bring up a two-host lab on this machine and
//! show each part of the stack alive, with timings:
//!
//! 1. the network: hosts a and b (namespaces), a switch, a client, a guest on host a;
//! 2. netpair on both hosts: a TCP stream from the client to the guest survives host a's
//!    application NIC going down and a silent loss on its switch port;
//! 3. libvirt: a real libvirtd per host boots a guest on each;
//! 4. ublk: Debian's 6.12 kernel in QEMU runs `ublk-mirror features` against the real driver.
//!
//! Everything it creates is removed when it ends (or fails).
use std::time::{Duration, Instant};

use eac_controller::libvirt::{DomainState, Hypervisor};
use eac_lab::{
    Lab,
    libvirt::{LibvirtHost, READY},
    netpair_daemon::{GUEST_IP, GUEST_MAC, NetpairDaemon},
    topology,
    traffic::TcpStreamProbe,
    ublk_guest::{UblkGuest, skip_reason},
    wait_until, workspace_bin,
};

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    eac_lab::require_root();
    let t0 = Instant::now();

    step(1, "two lab hosts, a switch, a client, a guest on host a");
    let mut lab = Lab::two_hosts("demo", 1).expect("lab");
    lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).expect("guest");
    for h in &lab.hosts {
        println!(
            "host {}: namespace {}, mgmt {}, app {} (bridge {}), AL1 {}, AL2 {}",
            h.name,
            h.ns.name(),
            h.mgmt_ip(),
            h.app_ip(),
            topology::APP_BRIDGE,
            h.al_ip(1),
            h.al_ip(2)
        );
    }
    println!("client {}; guest {GUEST_MAC} {GUEST_IP} on host a", lab.clients[0].ip);

    step(2, "netpair: both application NICs active, paired over AL1/AL2");
    let a = NetpairDaemon::start(&lab, "a", "local");
    let b = NetpairDaemon::start(&lab, "b", "partner");
    wait_until(Duration::from_secs(10), "pairing", || {
        a.partner_reachable() && b.partner_reachable()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), b.log()));
    wait_until(Duration::from_secs(5), "paths healthy", || {
        [&a, &b]
            .iter()
            .all(|d| d.status().is_some_and(|s| s["app"]["path_ok"] == true))
    })
    .expect("paths");
    println!(
        "paired; maps pinned, e.g.: bpftool map dump pinned {}/GUEST_STATS",
        a.status().unwrap()["pin_dir"].as_str().unwrap()
    );
    let stream = TcpStreamProbe::start(&lab.guests[0].ns, GUEST_IP, 5001, &lab.clients[0].ns).expect("stream");
    println!("TCP stream client → guest running");
    for (name, fault) in [
        ("host a's application NIC down", 0),
        ("silent 100 % loss on host a's switch port (carrier up)", 1),
    ] {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let guard: Box<dyn std::any::Any> = if fault == 0 {
            eac_lab::faults::link_down(&lab.host("a").ns, topology::APP_IF).unwrap();
            Box::new(())
        } else {
            Box::new(lab.silent_loss_on_switch_port("a").unwrap())
        };
        let took = wait_until(Duration::from_secs(5), "steering", || {
            a.steering() == Some(true) && b.steering() == Some(true)
        })
        .expect("steering");
        std::thread::sleep(Duration::from_millis(1000));
        println!(
            "fault: {name}: traffic through host b's NIC {} later; longest TCP gap {}",
            ms(took),
            ms(stream.max_gap_since(t))
        );
        let st = a.status().unwrap();
        println!("  a says: {}", st["guests"][0]["last_decision"]["why"]);
        if fault == 0 {
            eac_lab::faults::link_up(&lab.host("a").ns, topology::APP_IF).unwrap();
        }
        drop(guard);
        let took = wait_until(Duration::from_secs(5), "home", || {
            a.steering() == Some(false) && b.steering() == Some(false)
        })
        .expect("home");
        println!(
            "healed: traffic back on host a's NIC after {} (1 s hold against flapping)",
            ms(took)
        );
    }
    let report = stream.stop();
    println!(
        "stream: {} bytes sent, {} received, {}",
        report.bytes_sent,
        report.bytes_received,
        if report.errors.is_empty() {
            "no reset".to_owned()
        } else {
            format!("errors: {:?}", report.errors)
        }
    );
    drop((a, b));

    step(3, "libvirt: a real libvirtd per host, a TCG guest on each");
    let mut hosts = Vec::new();
    for h in &lab.hosts {
        let lv = LibvirtHost::start(lab.dir(), &h.name, Some(h.ns.name()), false).expect("libvirtd");
        println!("host {}: libvirtd at {}", h.name, lv.uri());
        hosts.push(lv);
    }
    for lv in &hosts {
        let spec = lv.guest("demo-vm").expect("spec");
        let hv = Hypervisor::connect(lv.uri()).expect("connect");
        hv.define(&spec.to_xml()).expect("define");
        let t = Instant::now();
        hv.start("demo-vm").expect("start");
        lv.wait_for_console("demo-vm", READY, Duration::from_secs(120))
            .expect("guest ready");
        println!(
            "host {}: demo-vm {:?}, ready on its serial console {} after start",
            lv.name(),
            hv.state("demo-vm").unwrap(),
            ms(t.elapsed())
        );
        hv.destroy("demo-vm").expect("destroy");
        assert_eq!(hv.state("demo-vm").unwrap(), DomainState::ShutOff);
    }
    drop(hosts);

    step(4, "ublk: the real ublk driver in Debian's 6.12 kernel (QEMU guest)");
    match skip_reason() {
        Some(why) => println!("skipped: {why}"),
        None => {
            let bin = workspace_bin("ublk-mirror");
            let eac = workspace_bin("eac");
            let run = UblkGuest::new()
                .run_script(&format!(
                    "uname -r; {} features; {} host check | grep -E 'ublk|io_uring'",
                    bin.display(),
                    eac.display()
                ))
                .expect("ublk guest");
            println!("{}", run.command_output().trim());
            println!("(guest boot + run + power-off: {})", ms(run.wall));
        }
    }

    drop(lab);
    println!(
        "\n=== done in {:.1} s; everything the demo created is gone",
        t0.elapsed().as_secs_f64()
    );
}
