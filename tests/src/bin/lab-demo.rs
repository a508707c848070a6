//! `lab-demo` — the main job of scripts/demo.sh: what a new user runs first.
//!
//! 1. a two-host lab: hosts a and b (network namespaces with a management network and two
//!    availability links), a real libvirtd per host, a directory both see (state-file, guest
//!    disks, virtlockd leases), an `eac-controller` per host;
//! 2. a guest boots on host a; `eac vm protect demo-vm --level 1`;
//! 3. host a dies (every process of it is killed: controller, libvirtd, QEMU);
//! 4. the guest runs on host b, with the timeline of events and the measured times.
//!
//! `lab-demo --all` then also shows the Level 2 parts: netpair keeping a TCP stream through
//! NIC faults, and the ublk driver in Debian's 6.12 kernel. Everything it creates is removed
//! when it ends (or fails).
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eac_controller::libvirt::DomainState;
use eac_lab::{
    Lab,
    controller::{ControllerLab, Options},
    libvirt::READY,
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

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Prints `$ eac ARGS` (on `host`) and its output.
fn eac(lab: &ControllerLab, host: &str, args: &[&str]) {
    let out = lab.eac(host, args);
    println!("[{host}]$ eac {}", args.join(" "));
    print!("{}", out.stdout);
    if !out.ok() {
        print!("{}", out.stderr);
        panic!("eac {} failed on {host} (exit {})", args.join(" "), out.code);
    }
}

fn main() {
    eac_lab::require_root();
    let all = std::env::args().any(|a| a == "--all");
    let t0 = Instant::now();

    step(1, "two hosts, a libvirtd and a controller on each, shared storage");
    let mut lab = ControllerLab::new(Options::new("demo")).expect("controller lab");
    for h in &lab.lab.hosts {
        println!(
            "host {}: namespace {}, mgmt {}, AL1 {}, AL2 {}",
            h.name,
            h.ns.name(),
            h.mgmt_ip(),
            h.al_ip(1),
            h.al_ip(2)
        );
    }
    println!("shared storage: {} (state-file, guest disks)", lab.shared.display());
    lab.start_controllers().expect("controllers");
    wait_until(Duration::from_secs(20), "hosts in contact", || {
        lab.eac("a", &["pool", "status", "--json"])
            .json()
            .is_ok_and(|v| v["redundancy_ok"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    eac(&lab, "a", &["pool", "status"]);

    step(2, "a guest on host a, protected at level 1");
    let spec = lab.guest_spec("demo-vm").expect("guest");
    lab.define_and_start("a", &spec).expect("start demo-vm on a");
    let booted = wait_until(Duration::from_secs(120), "GUEST-READY on a", || {
        lab.host("a").console("demo-vm").contains(READY)
    })
    .expect("demo-vm boots");
    println!(
        "demo-vm booted on host a: {READY} on its serial console after {}",
        ms(booted)
    );
    eac(&lab, "a", &["vm", "protect", "demo-vm", "--level", "1"]);
    eac(&lab, "a", &["vm", "list"]);
    eac(&lab, "b", &["plan"]);

    step(3, "host a dies: its controller, libvirtd and QEMU are killed");
    std::thread::sleep(Duration::from_secs(1));
    let t_kill = wall_ms();
    let n = lab.kill_host("a");
    println!("killed {n} processes of host a");
    let running = wait_until(Duration::from_secs(60), "demo-vm running on b", || {
        lab.host("b").domain_state("demo-vm") == Some(DomainState::Running)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let ready = wait_until(Duration::from_secs(120), "GUEST-READY on b", || {
        lab.host("b").console("demo-vm").contains(READY)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    step(4, "the guest runs on host b");
    eac(&lab, "b", &["vm", "list"]);
    println!("event timeline on host b (ms after the kill):");
    let evs = lab
        .eac("b", &["events", "--json"])
        .json()
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let mut detect = None;
    let mut restart = None;
    for e in evs.iter().filter(|e| e["ts_ms"].as_u64().is_some_and(|t| t >= t_kill)) {
        let dt = e["ts_ms"].as_u64().unwrap_or(t_kill) - t_kill;
        let kind = e["kind"].as_str().unwrap_or("?");
        if kind == "peer_dead" {
            detect.get_or_insert(dt);
        }
        if kind == "guest_restarted" {
            restart.get_or_insert(dt);
        }
        println!(
            "  +{dt:>6}  {kind:<18} {}{}",
            e["guest"].as_str().map(|g| format!("[{g}] ")).unwrap_or_default(),
            e["detail"].as_str().unwrap_or("")
        );
    }
    println!(
        "\nhost a died → declared dead after {} ms → demo-vm started on b after {} ms (libvirt: running at {}); \
         {READY} on b's console {:.1} s after the kill (TCG boot)",
        detect.map_or("?".into(), |d| d.to_string()),
        restart.map_or("?".into(), |d| d.to_string()),
        ms(running),
        (running + ready).as_secs_f64()
    );
    drop(lab);

    if all {
        netpair_tour(5);
        ublk_tour(6);
    } else {
        println!("\n(`lab-demo --all` also shows netpair and the ublk driver)");
    }
    println!(
        "\n=== done in {:.1} s; everything the demo created is gone",
        t0.elapsed().as_secs_f64()
    );
}

/// Level 2 networking: a TCP stream to a guest survives its host's NIC failing.
fn netpair_tour(n: u32) {
    step(
        n,
        "netpair: a lab with a switch, a client and a guest stand-in on host a",
    );
    let mut lab = Lab::two_hosts("demonp", 1).expect("lab");
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

    println!("netpair: both application NICs active, paired over AL1/AL2");
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
    drop(lab);
}

/// The ublk driver in Debian's 6.12 kernel (QEMU guest).
fn ublk_tour(n: u32) {
    step(n, "ublk: the real ublk driver in Debian's 6.12 kernel (QEMU guest)");
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
}
