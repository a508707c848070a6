//! The controller's libvirt lifecycle stream (`eac_controller::libvirt::watch`, polling every
//! 250 ms) against a real libvirtd and QEMU: start, destroy, start, kill -9 of QEMU → each
//! event arrives, and how late compared with libvirt's own event callbacks (`virsh event
//! --loop`, which registers `virConnectDomainEventRegisterAny`) is printed.
//!
//! Privileged: `sudo cargo test -p eac-lab --test lab_libvirt_events -- --ignored --nocapture`.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eac_controller::libvirt::{ErrorKind, Hypervisor, LifecycleKind, WATCH_INTERVAL, WatchEvent, watch};
use eac_lab::libvirt::{Disk, LabDir, LibvirtHost};
use eac_lab::require_root;

/// libvirt's own events as `virsh event --all --loop` prints them, with their arrival time.
struct VirshEvents {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl VirshEvents {
    fn start(uri: &str) -> Self {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "virsh", "-q", "-c", uri, "event", "--all", "--loop"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("virsh event");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push((Instant::now(), line));
            }
        });
        Self { child, lines }
    }

    /// When the first line containing all of `words` arrived after `since`.
    fn wait(&self, since: Instant, words: &[&str], timeout: Duration) -> Option<Instant> {
        let mut found = None;
        let _ = eac_lab::wait_until(timeout, "virsh event", || {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(t, l)| *t >= since && words.iter().all(|w| l.contains(w)))
                .map(|(t, _)| *t);
            found.is_some()
        });
        found
    }
}

impl Drop for VirshEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
#[ignore = "privileged: needs root, libvirtd, qemu; run by scripts/test.sh"]
fn lifecycle_events_from_a_real_libvirtd() {
    require_root();
    let lab = LabDir::new("lvev").unwrap();
    let host = LibvirtHost::start(lab.path(), "a", None, false).unwrap();
    let name = "evguest";
    let spec = host.guest(name).unwrap();
    let hv = Hypervisor::connect(host.uri()).unwrap();
    hv.define(&spec.to_xml()).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let handle = watch(host.uri(), WATCH_INTERVAL, tx);
    let virsh = VirshEvents::start(host.uri());
    // Both listeners are ready once the watcher sent its snapshot and virsh is connected.
    let snap = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), rx.recv()).await });
    match snap {
        Ok(Some(WatchEvent::Snapshot(doms))) => assert!(doms.iter().any(|d| d.name == name), "{doms:?}"),
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(500));

    let mut next = |want: LifecycleKind| -> (Instant, String) {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match rx.recv().await.expect("watcher alive") {
                        WatchEvent::Lifecycle { event, at } if event.domain == name && event.kind == want => {
                            return (at, event.detail);
                        }
                        WatchEvent::Lifecycle { event, .. } => println!("  (also: {} {})", event.kind, event.detail),
                        other => println!("  (also: {other:?})"),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {want} event within 30 s"))
        })
    };

    println!("action            action-call   libvirt event   our event (poll {WATCH_INTERVAL:?})   difference");
    let report = |what: &str, t0: Instant, call: Duration, native: Option<Instant>, ours: Instant| {
        let native_ms = native.map(|n| ms(n.saturating_duration_since(t0)));
        let ours_ms = ms(ours.saturating_duration_since(t0));
        println!(
            "{what:16} {:9.0} ms   {:>10} ms   {:>10.0} ms   {:>+8} ms",
            ms(call),
            native_ms.map_or("-".into(), |v| format!("{v:.0}")),
            ours_ms,
            native_ms.map_or("-".into(), |v| format!("{:.0}", ours_ms - v)),
        );
    };

    // start
    let t0 = Instant::now();
    hv.start(name).unwrap();
    let call = t0.elapsed();
    let (ours, _) = next(LifecycleKind::Started);
    report(
        "start",
        t0,
        call,
        virsh.wait(t0, &["Started"], Duration::from_secs(5)),
        ours,
    );

    // destroy
    let t0 = Instant::now();
    hv.destroy(name).unwrap();
    let call = t0.elapsed();
    let (ours, detail) = next(LifecycleKind::Stopped);
    assert!(detail.contains("destroy"), "detail {detail}");
    report(
        "destroy",
        t0,
        call,
        virsh.wait(t0, &["Stopped", "Destroyed"], Duration::from_secs(5)),
        ours,
    );

    // start again, then kill QEMU: a crash
    hv.start(name).unwrap();
    next(LifecycleKind::Started);
    let pidfile = host.dir().join(format!("run/libvirt/qemu/{name}.pid"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
        .trim()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let (ours, detail) = next(LifecycleKind::Crashed);
    assert!(detail.contains("crash"), "detail {detail}");
    report(
        "kill -9 qemu",
        t0,
        Duration::ZERO,
        virsh.wait(t0, &["Stopped", "Failed"], Duration::from_secs(5)),
        ours,
    );

    // the daemon dies: one ConnectionLost
    let t0 = Instant::now();
    drop(virsh);
    host.down().unwrap();
    let lost = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(WatchEvent::ConnectionLost { error }) = rx.recv().await {
                    return error;
                }
            }
        })
        .await
    });
    let error = lost.expect("ConnectionLost after libvirtd stopped");
    println!(
        "libvirtd stopped → ConnectionLost after {:.0} ms: {error}",
        ms(t0.elapsed())
    );
    handle.stop();
}

/// Issue 13 §2: a second start of a disk on another host is refused, and the refusal says what
/// refused. Two lab hosts with libvirt's lock manager (virtlockd, a lease directory both share)
/// and one disk:
/// 1. QEMU's own image lock on (the default): QEMU on b refuses first (libvirt acquires leases
///    only when it resumes the paused QEMU) → [`ErrorKind::ImageLocked`].
/// 2. QEMU's image lock off (`file.locking=off`, as on storage where it does not work): the
///    lock manager refuses → [`ErrorKind::LeaseHeld`], "Lockspace resource … is locked".
///
/// Each time b's watcher reports one `StartFailed` whose detail names what refused, and never
/// `Started`. Without the lock manager (`EAC_LAB_LOCK_MANAGER=off`) step 2's start succeeds:
/// two writers, and the test fails.
#[test]
#[ignore = "privileged: needs root, libvirtd, qemu; run by scripts/test.sh"]
fn a_second_start_is_refused_and_the_refusal_names_what_refused() {
    require_root();
    let lab = LabDir::new("lvlease").unwrap();
    let a = LibvirtHost::start(lab.path(), "a", None, true).unwrap();
    let b = LibvirtHost::start(lab.path(), "b", None, true).unwrap();
    let disk = lab.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let name = "leaseguest";
    let spec_a = a.guest(name).unwrap().disk(Disk::File(disk.clone()));
    let spec_b = b.guest(name).unwrap().disk(Disk::File(disk.clone()));
    let hv_a = Hypervisor::connect(a.uri()).unwrap();
    let hv_b = Hypervisor::connect(b.uri()).unwrap();
    hv_a.define(&spec_a.to_xml()).unwrap();
    hv_b.define(&spec_b.to_xml()).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let handle = watch(b.uri(), WATCH_INTERVAL, tx);
    let snap = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), rx.recv()).await });
    assert!(matches!(snap, Ok(Some(WatchEvent::Snapshot(_)))), "{snap:?}");
    // b's lifecycle events of the guest up to its StartFailed
    let mut until_failed = || -> Vec<(LifecycleKind, String)> {
        rt.block_on(async {
            let mut seen = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    if let WatchEvent::Lifecycle { event, .. } = rx.recv().await.expect("watcher alive")
                        && event.domain == name
                    {
                        seen.push((event.kind, event.detail.clone()));
                        if event.kind == LifecycleKind::StartFailed {
                            return;
                        }
                    }
                }
            })
            .await;
            assert!(r.is_ok(), "no StartFailed on b within 20 s; saw {seen:?}");
            seen
        })
    };
    let pid_cmdline = |h: &LibvirtHost| {
        let pid = std::fs::read_to_string(h.dir().join(format!("run/libvirt/qemu/{name}.pid"))).unwrap();
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap()).replace('\0', " ")
    };

    // 1. QEMU's image lock on: it refuses before the lock manager is asked.
    hv_a.start(name).unwrap();
    let e = hv_b
        .start(name)
        .expect_err("a second start with QEMU's image lock on must fail");
    let chain = eac_common::error_chain(&e);
    println!("1. QEMU locks its image: {chain}");
    assert_eq!(e.kind(), ErrorKind::ImageLocked, "{chain}");
    let seen = until_failed();
    println!("   b's events: {seen:?}");
    assert!(seen.iter().all(|(k, _)| *k != LifecycleKind::Started), "{seen:?}");
    assert!(seen.last().unwrap().1.contains("QEMU's image lock"), "{seen:?}");
    hv_a.destroy(name).unwrap();

    // 2. QEMU's image lock off: the lock manager refuses.
    hv_a.define(&spec_a.clone().without_qemu_image_locking().to_xml())
        .unwrap();
    hv_b.define(&spec_b.clone().without_qemu_image_locking().to_xml())
        .unwrap();
    hv_a.start(name).unwrap();
    let cmdline = pid_cmdline(&a);
    assert!(
        cmdline.contains(r#"{"driver":"file","locking":"off","#),
        "QEMU on a still locks its image: {cmdline}"
    );
    match hv_b.start(name) {
        Ok(()) => panic!(
            "a second start succeeded with QEMU's image lock off: two QEMUs write {} ({:?} on a, {:?} on b); \
             the lock manager did not refuse",
            disk.display(),
            hv_a.state(name),
            hv_b.state(name)
        ),
        Err(e) => {
            let chain = eac_common::error_chain(&e);
            println!("2. QEMU does not lock: {chain}");
            assert_eq!(e.kind(), ErrorKind::LeaseHeld, "{chain}");
            assert!(chain.contains("Lockspace resource"), "{chain}");
        }
    }
    let seen = until_failed();
    println!("   b's events: {seen:?}");
    assert!(seen.iter().all(|(k, _)| *k != LifecycleKind::Started), "{seen:?}");
    let detail = &seen.last().unwrap().1;
    assert!(
        detail.contains("lock manager (virtlockd)") && detail.contains("Lockspace resource"),
        "{detail}"
    );
    assert_eq!(hv_b.state(name).unwrap(), eac_controller::libvirt::DomainState::ShutOff);
    assert!(hv_a.state(name).unwrap().is_active());
    let log = std::fs::read_to_string(b.dir().join("logs/libvirtd.log")).unwrap_or_default();
    assert!(
        log.contains("Lockspace resource"),
        "b's libvirtd log has no lock-manager refusal"
    );

    hv_a.destroy(name).unwrap();
    handle.stop();
    drop((hv_a, hv_b));
    a.down().unwrap();
    b.down().unwrap();
}
