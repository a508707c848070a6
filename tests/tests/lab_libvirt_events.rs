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

use eac_controller::libvirt::{Hypervisor, LifecycleKind, WATCH_INTERVAL, WatchEvent, watch};
use eac_lab::libvirt::{LabDir, LibvirtHost};
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
