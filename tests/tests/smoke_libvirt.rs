//! Smoke tests of the libvirt lab against real libvirtd daemons and TCG guests: two lab hosts,
//! each with its own libvirtd in its own network namespace, each booting a guest through the
//! controller's libvirt adapter; and a guest with a file disk.
//!
//! Privileged: `sudo cargo test -p eac-lab --test smoke_libvirt -- --ignored --nocapture`
//! (scripts/test.sh runs the ignored tests as root).
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use eac_controller::libvirt::{DomainState, Hypervisor};
use eac_lab::libvirt::{Disk, LabDir, LibvirtHost, READY, lab_processes};
use eac_lab::netns::{Netns, unique_name};
use eac_lab::require_root;
use eac_lab::wait::wait_until;

/// Under TCG the guest needs 7–10 s to print READY; leave room for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The tests of this file run one at a time: parallel TCG guests on a 2-core machine would
/// distort the printed timings (and slow every boot).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Timings {
    connect: Duration,
    define: Duration,
    start_to_running: Duration,
    running_to_ready: Duration,
    destroy: Duration,
}

/// define → start → running → READY on the console → destroy → shut off → undefine.
fn boot_cycle(host: &LibvirtHost, guest: &str) -> Timings {
    let spec = host.guest(guest).expect("guest spec");
    let t = Instant::now();
    let hv = Hypervisor::connect(host.uri()).expect("connect");
    let connect = t.elapsed();

    let t = Instant::now();
    assert_eq!(hv.define(&spec.to_xml()).expect("define"), guest);
    let define = t.elapsed();
    assert_eq!(hv.state(guest).unwrap(), DomainState::ShutOff);

    let t = Instant::now();
    hv.start(guest).expect("start");
    wait_until(Duration::from_secs(30), "state running", || {
        hv.state(guest).is_ok_and(|s| s == DomainState::Running)
    })
    .expect("running");
    let start_to_running = t.elapsed();
    assert!(
        hv.list()
            .unwrap()
            .iter()
            .any(|d| d.name == guest && d.state == DomainState::Running)
    );

    let running_to_ready = host
        .wait_for_console(guest, READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hv.state(guest).unwrap(),
        DomainState::Running,
        "still running after READY"
    );
    let log = host.serial_log(guest);
    assert!(log.contains("kernel=6.12"), "guest kernel: {log}");

    let t = Instant::now();
    hv.destroy(guest).expect("destroy");
    let destroy = t.elapsed();
    let (state, reason) = hv.state_reason(guest).unwrap();
    assert_eq!(state, DomainState::ShutOff, "after destroy ({reason})");
    hv.undefine(guest).expect("undefine");
    Timings {
        connect,
        define,
        start_to_running,
        running_to_ready,
        destroy,
    }
}

fn assert_nothing_left(lab: &Path) {
    let left = lab_processes(lab);
    assert!(left.is_empty(), "processes of the lab still running: {left:#?}");
}

#[test]
#[ignore = "privileged: needs root, libvirtd, qemu; run by scripts/test.sh"]
fn two_hosts_each_boot_a_guest() {
    require_root();
    let _serial = serial();
    let lab = LabDir::new("lv").unwrap();
    let (ns1, ns2) = (Netns::create("lv").unwrap(), Netns::create("lv").unwrap());
    let t = Instant::now();
    let h1 = LibvirtHost::start(lab.path(), "h1", Some(ns1.name()), true).unwrap();
    let h2 = LibvirtHost::start(lab.path(), "h2", Some(ns2.name()), true).unwrap();
    println!(
        "two libvirt hosts up in {:.2?}: {} | {}",
        t.elapsed(),
        h1.uri(),
        h2.uri()
    );
    assert_ne!(h1.uri(), h2.uri());
    assert!(!h1.pids().unwrap().is_empty());

    // The daemons really live in the hosts' network namespaces.
    for (h, ns) in [(&h1, &ns1), (&h2, &ns2)] {
        let pid = h.pids().unwrap()[0];
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let ours = ns.exec("readlink", &["/proc/self/ns/net"]).unwrap();
        assert_eq!(theirs.to_string_lossy(), ours.trim(), "netns of {}", h.name());
    }

    // Same guest name on both hosts (the identity a protected VM has on its partner).
    let guest = unique_name("g");
    let (t1, t2) = std::thread::scope(|s| {
        let a = s.spawn(|| boot_cycle(&h1, &guest));
        let b = s.spawn(|| boot_cycle(&h2, &guest));
        (a.join().expect("h1 cycle"), b.join().expect("h2 cycle"))
    });
    for (h, t) in [("h1", &t1), ("h2", &t2)] {
        println!(
            "{h}: connect {:.3?}  define {:.3?}  start→running {:.3?}  running→READY {:.2?}  destroy {:.2?}",
            t.connect, t.define, t.start_to_running, t.running_to_ready, t.destroy
        );
    }

    let t = Instant::now();
    drop(h1);
    drop(h2);
    println!("both hosts down in {:.2?}", t.elapsed());
    assert_nothing_left(lab.path());
}

#[test]
#[ignore = "privileged: needs root, libvirtd, qemu; run by scripts/test.sh"]
fn guest_sees_and_writes_its_file_disk() {
    require_root();
    let _serial = serial();
    let lab = LabDir::new("lv").unwrap();
    let ns = Netns::create("lv").unwrap();
    let host = LibvirtHost::start(lab.path(), "h1", Some(ns.name()), true).unwrap();

    // 32 MiB raw disk with a magic string at offset 0.
    let magic = format!("EAC-DISK-{}", std::process::id());
    let disk = lab.path().join("disk.raw");
    let mut image = vec![0u8; 32 << 20];
    image[..magic.len()].copy_from_slice(magic.as_bytes());
    std::fs::write(&disk, &image).unwrap();
    let token = unique_name("tok");

    let guest = unique_name("gd");
    let spec = host
        .guest(&guest)
        .unwrap()
        .disk(Disk::File(disk.clone()))
        .cmdline_arg(&format!("eac.diskwrite={token}"));
    let hv = Hypervisor::connect(host.uri()).unwrap();
    hv.define(&spec.to_xml()).unwrap();
    hv.start(&guest).unwrap();
    // lockd (`lock`) holds a lease for the disk while the guest runs
    let leases = std::fs::read_dir(lab.path().join("shared-locks")).unwrap().count();
    assert!(leases >= 1, "no lockd lease for the disk");

    let took = host
        .wait_for_console(&guest, READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = host.serial_log(&guest);
    println!(
        "disk guest READY after {took:.2?}; console:\n{}",
        log.lines()
            .filter(|l| l.starts_with("GUEST-"))
            .take(6)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("GUEST-DISK /dev/vda"))
        .unwrap_or_else(|| panic!("no GUEST-DISK line:\n{log}"));
    assert!(line.contains(&format!("size={}", 32u64 << 20)), "{line}");
    assert!(line.contains(&format!("head={magic}")), "{line}");
    assert!(log.contains(&format!("GUEST-WROTE /dev/vda {token}")), "{log}");

    hv.destroy(&guest).unwrap();
    assert_eq!(hv.state(&guest).unwrap(), DomainState::ShutOff);
    // The guest's write reached the image (offset 512).
    let after = std::fs::read(&disk).unwrap();
    let want = format!("GUEST-WROTE {token}\n");
    assert_eq!(&after[512..512 + want.len()], want.as_bytes());
    assert_eq!(&after[..magic.len()], magic.as_bytes());
    hv.undefine(&guest).unwrap();

    drop(hv);
    host.down().unwrap();
    assert_nothing_left(lab.path());
}

#[test]
#[ignore = "privileged: needs root, libvirtd, qemu; run by scripts/test.sh"]
fn guest_nic_on_a_bridge_in_the_host_netns() {
    require_root();
    let _serial = serial();
    let lab = LabDir::new("lv").unwrap();
    let ns = Netns::create("lv").unwrap();
    // A bridge in the lab host's namespace (lab addresses only, never the machine's interfaces).
    ns.ip(&["link", "add", "br-app", "type", "bridge"]).unwrap();
    ns.ip(&["addr", "add", "10.250.0.1/24", "dev", "br-app"]).unwrap();
    ns.ip(&["link", "set", "br-app", "up"]).unwrap();
    let host = LibvirtHost::start(lab.path(), "h1", Some(ns.name()), false).unwrap();
    let guest = unique_name("gn");
    let spec = host
        .guest(&guest)
        .unwrap()
        .nic("br-app")
        .cmdline_arg("eac.ip=10.250.0.2/24");
    let mac = spec.nics[0].mac.clone();
    let hv = Hypervisor::connect(host.uri()).unwrap();
    hv.define(&spec.to_xml()).unwrap();
    hv.start(&guest).unwrap();

    // libvirt created the guest's tap inside the host's namespace and enslaved it to the bridge.
    let ports = ns.ip(&["-o", "link", "show", "master", "br-app"]).unwrap();
    assert!(ports.contains("vnet"), "no guest tap on br-app: {ports}");
    host.wait_for_console(&guest, READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        host.serial_log(&guest)
            .contains(&format!("GUEST-NET eth0 10.250.0.2/24 mac={mac}"))
    );
    let took = wait_until(Duration::from_secs(20), "ping 10.250.0.2 from the host netns", || {
        ns.exec("ping", &["-c", "1", "-W", "1", "10.250.0.2"]).is_ok()
    })
    .unwrap();
    println!("guest answers ping on br-app after {took:.2?}");

    hv.destroy(&guest).unwrap();
    hv.undefine(&guest).unwrap();
    drop(hv);
    host.down().unwrap();
    assert_nothing_left(lab.path());
}
