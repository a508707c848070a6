//! netpair in the lab, against the real kernel: a guest on host a keeps a TCP stream from a
//! client through faults of a's application path, by steering through host b's NIC; faults
//! of the availability links move nothing. Each test prints the measured traffic gap.
//! Privileged: run by scripts/test.sh as root.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use eac_lab::{
    Lab, faults,
    netpair_daemon::{GUEST_IP, GUEST_MAC, GuestSpec, NetpairDaemon as Daemon},
    require_root, topology,
    traffic::TcpStreamProbe,
    wait_until,
};

struct Setup {
    a: Daemon,
    b: Daemon,
    lab: Lab,
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, "")
}

fn setup_with(tag: &str, extra: &str) -> Setup {
    require_root();
    let mut lab = Lab::two_hosts(tag, 1).unwrap();
    lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).unwrap();
    let a = Daemon::start_with(&lab, "a", "local", extra);
    let b = Daemon::start_with(&lab, "b", "partner", extra);
    wait_until(Duration::from_secs(10), "both daemons hear their partner", || {
        a.partner_reachable() && b.partner_reachable()
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", a.log(), b.log()));
    wait_until(Duration::from_secs(5), "both paths judged healthy", || {
        a.status().is_some_and(|s| s["app"]["path_ok"] == true)
            && b.status().is_some_and(|s| s["app"]["path_ok"] == true)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- a: {:?}\n{}\n--- b: {:?}\n{}",
            a.status(),
            a.log(),
            b.status(),
            b.log()
        )
    });
    Setup { a, b, lab }
}

/// Runs a stream client → guest, applies `fault` and waits for the expected steering; then
/// `heal` and waits for traffic to come home. Returns (fault gap, heal gap).
fn fault_and_heal(
    s: &Setup,
    name: &str,
    fault: impl FnOnce() -> Box<dyn std::any::Any>,
    expect_steer: bool,
) -> (Duration, Duration) {
    let guest = &s.lab.guests[0];
    let probe = TcpStreamProbe::start(&guest.ns, GUEST_IP, 5001, &s.lab.clients[0].ns).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // steady state before the fault
    let t_fault = Instant::now();
    let guard = fault();
    if expect_steer {
        let took = wait_until(Duration::from_secs(5), "a steers and b lends its NIC", || {
            s.a.steering() == Some(true) && s.b.steering() == Some(true)
        })
        .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log()));
        println!("{name}: steering on both hosts {took:?} after the fault");
    }
    wait_until(Duration::from_secs(5), "stream flowing after the fault", || {
        probe.flowing_after(Instant::now() - Duration::from_millis(20))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log()));
    std::thread::sleep(Duration::from_millis(1500));
    let fault_gap = probe.max_gap_since(t_fault);
    if !expect_steer {
        assert_eq!(s.a.steering(), Some(false), "{name}: a must not steer");
        assert_eq!(s.b.steering(), Some(false), "{name}: b must not lend");
    }
    let t_heal = Instant::now();
    drop(guard);
    if expect_steer {
        let took = wait_until(Duration::from_secs(5), "traffic back on a's own NIC", || {
            s.a.steering() == Some(false) && s.b.steering() == Some(false)
        })
        .unwrap();
        println!("{name}: traffic home {took:?} after healing (hold time 1 s)");
    }
    std::thread::sleep(Duration::from_millis(500));
    let heal_gap = probe.max_gap_since(t_heal);
    let report = probe.stop();
    assert!(
        report.errors.is_empty(),
        "{name}: the TCP stream broke: {:?}",
        report.errors
    );
    assert!(report.bytes_received > 0);
    println!(
        "{name}: TCP gap during the fault {:.0} ms, when healing {:.0} ms; {} bytes sent, {} received, no reset",
        fault_gap.as_secs_f64() * 1e3,
        heal_gap.as_secs_f64() * 1e3,
        report.bytes_sent,
        report.bytes_received
    );
    (fault_gap, heal_gap)
}

struct OnDrop<F: FnMut()>(F);
impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn app_nic_down_steers_through_the_partner() {
    let s = setup("np-down");
    let ns = s.lab.host("a").ns.name().to_owned();
    let (gap, _) = fault_and_heal(
        &s,
        "a's app NIC down",
        || {
            faults::link_down(&s.lab.host("a").ns, topology::APP_IF).unwrap();
            Box::new(OnDrop(move || {
                let _ = Command::new("ip")
                    .args(["-n", &ns, "link", "set", topology::APP_IF, "up"])
                    .status();
            }))
        },
        true,
    );
    assert!(gap < Duration::from_secs(1), "gap {gap:?}");
    let st = s.a.status().unwrap();
    assert!(st["events"].to_string().contains("path change"), "{st}");
}

#[test]
#[ignore = "privileged: needs root, BPF, nftables and network namespaces; run by scripts/test.sh"]
fn silent_loss_on_the_switch_port_steers_through_the_partner() {
    let s = setup("np-loss");
    let (gap, _) = fault_and_heal(
        &s,
        "silent loss on a's switch port",
        || Box::new(s.lab.silent_loss_on_switch_port("a").unwrap()),
        true,
    );
    assert!(gap < Duration::from_secs(1), "gap {gap:?}");
    // While steering, b's counters saw the guest's frames cross the availability link.
    let b = s.b.status().unwrap();
    // The lab's NICs are veths: the automatic attach mode is TC.
    let attach = &b["app"]["attach"];
    assert_eq!(
        (attach["mode"].as_str(), attach["chosen"].as_str()),
        (Some("tc"), Some("auto")),
        "{b}"
    );
    let here = &b["guests"][0]["counters"]["here"];
    assert!(here["to_al_packets"].as_u64().unwrap() > 0, "{b}");
    assert!(here["from_al_packets"].as_u64().unwrap() > 0, "{b}");
    // The same counters through bpftool, from the pinned map (BTF-formatted).
    let pin = b["pin_dir"].as_str().unwrap();
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &format!("{pin}/GUEST_STATS")])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dump.contains("to_al_packets") && dump.contains("[82,84,0,251,1,10]"),
        "{dump}"
    );
    println!(
        "bpftool map dump pinned {pin}/GUEST_STATS: {} bytes of JSON",
        dump.len()
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn one_availability_link_down_moves_nothing() {
    let s = setup("np-al1");
    let ns = s.lab.host("a").ns.name().to_owned();
    let (gap, _) = fault_and_heal(
        &s,
        "AL1 down",
        || {
            faults::link_down(&s.lab.host("a").ns, "al1").unwrap();
            Box::new(OnDrop(move || {
                let _ = Command::new("ip")
                    .args(["-n", &ns, "link", "set", "al1", "up"])
                    .status();
            }))
        },
        false,
    );
    assert!(
        gap < Duration::from_millis(200),
        "nothing moved, yet the stream stalled {gap:?}"
    );
    assert!(s.a.partner_reachable(), "AL2 still carries the pairing");
    assert!(
        s.a.status().unwrap()["events"]
            .to_string()
            .contains("loss of redundancy: availability link al1 down")
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn both_availability_links_down_moves_nothing_and_is_reported() {
    let s = setup("np-al12");
    let ns = s.lab.host("a").ns.name().to_owned();
    let (gap, _) = fault_and_heal(
        &s,
        "AL1 and AL2 down",
        || {
            faults::link_down(&s.lab.host("a").ns, "al1").unwrap();
            faults::link_down(&s.lab.host("a").ns, "al2").unwrap();
            Box::new(OnDrop(move || {
                for l in ["al1", "al2"] {
                    let _ = Command::new("ip").args(["-n", &ns, "link", "set", l, "up"]).status();
                }
            }))
        },
        false,
    );
    assert!(
        gap < Duration::from_millis(200),
        "nothing moved, yet the stream stalled {gap:?}"
    );
    let events = s.a.status().unwrap()["events"].to_string();
    assert!(events.contains("partner silent on every availability link"), "{events}");
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn garbage_and_wrong_secret_pairing_messages_are_rejected_with_a_reason() {
    let s = setup("np-junk");
    let a = s.lab.host("a");
    let b_al1 = format!("{}:7301", s.lab.host("b").al_ip(1));
    a.ns.enter(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"garbage that is not a pairing message", &b_al1).unwrap();
        sock.send_to(&[0u8; 9000], &b_al1).unwrap();
    })
    .unwrap();
    wait_until(Duration::from_secs(5), "b logs the rejections", || {
        s.b.log().matches("pairing message rejected").count() >= 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.b.log()));
    assert!(s.b.partner_reachable(), "b still hears a");
    let _ = Path::new("");
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn restarting_a_daemon_does_not_disturb_flowing_traffic() {
    let Setup { a, b, lab } = setup("np-restart");
    let probe = TcpStreamProbe::start(&lab.guests[0].ns, GUEST_IP, 5001, &lab.clients[0].ns).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    drop(a); // SIGTERM: the programs detach, the bridge carries the traffic alone
    let a = Daemon::start(&lab, "a", "local");
    wait_until(Duration::from_secs(10), "a pairs again", || a.partner_reachable()).unwrap();
    let restart = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let gap = probe.max_gap_since(t);
    let report = probe.stop();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    println!(
        "daemon restart: paired again after {restart:?}; longest TCP gap {:.0} ms",
        gap.as_secs_f64() * 1e3
    );
    assert!(gap < Duration::from_millis(200), "{gap:?}");
    assert_eq!(a.steering(), Some(false));
    drop(b);
}

#[test]
#[ignore = "privileged: needs root, BPF, nftables and network namespaces; run by scripts/test.sh"]
fn silent_loss_is_handled_the_same_with_xdp_forced() {
    // The lab's veths get TC automatically; `app_xdp = true` forces native XDP on them.
    let s = setup_with("np-xdp", "app_xdp = true");
    let attach = s.a.status().unwrap()["app"]["attach"].clone();
    assert_eq!(
        (attach["mode"].as_str(), attach["chosen"].as_str()),
        (Some("xdp-driver"), Some("config")),
        "{attach}"
    );
    let (gap, _) = fault_and_heal(
        &s,
        "silent loss, counting in XDP (app_xdp = true)",
        || Box::new(s.lab.silent_loss_on_switch_port("a").unwrap()),
        true,
    );
    assert!(gap < Duration::from_secs(1), "gap {gap:?}");
    let a = s.a.status().unwrap();
    assert!(
        a["guests"][0]["counters"]["here"]["rx_packets"].as_u64().unwrap() > 0,
        "{a}"
    );
}

/// `path change` events in a daemon's log (every one is logged, `status` keeps only the last).
fn path_changes(d: &Daemon) -> usize {
    d.log().matches("path change:").count()
}

#[test]
#[ignore = "privileged: needs root, BPF, nftables and network namespaces; run by scripts/test.sh"]
fn a_flapping_path_is_damped_and_reported() {
    // Silent loss on a's switch port 1 s on / 1 s off for 16 s. Undamped, every cycle moved
    // the guest out and back (issue 12: 19-20 path changes per host in 20 s), traffic often
    // coming home just as the path failed again. Damped: out, home after the heal hold,
    // out again at the next failure — which suppresses a's path — and then it stays out.
    let s = setup("np-flap");
    let (guest, client) = (&s.lab.guests[0], &s.lab.clients[0]);
    let tcp = TcpStreamProbe::start(&guest.ns, GUEST_IP, 5001, &client.ns).unwrap();
    // The path must have worked for the heal hold (1 s) before the first failure: a failure
    // sooner after the daemons start counts as one during the hold, not as a flap.
    std::thread::sleep(Duration::from_millis(1500));
    let (a0, b0) = (path_changes(&s.a), path_changes(&s.b));
    let t0 = Instant::now();
    for _ in 0..8 {
        let loss = s.lab.silent_loss_on_switch_port("a").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        drop(loss);
        std::thread::sleep(Duration::from_secs(1));
    }
    let flapped = t0.elapsed();
    let (a_n, b_n) = (path_changes(&s.a) - a0, path_changes(&s.b) - b0);
    let st = s.a.status().unwrap();
    let damping = &st["app"]["damping"];
    println!(
        "flapping for {:.1} s: path changes a {a_n}, b {b_n}; a's damping {damping}",
        flapped.as_secs_f64()
    );
    let report = tcp.stop();
    let show = || format!("--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log());
    assert!(
        a_n <= 4 && b_n <= 4,
        "not damped: a {a_n}, b {b_n} path changes\n{}",
        show()
    );
    assert!(a_n >= 1, "the flapping never moved the guest\n{}", show());
    assert_eq!(damping["suppressed"], true, "{st}");
    assert!(
        damping["penalty"].as_u64().unwrap() > damping["reuse"].as_u64().unwrap(),
        "{st}"
    );
    assert!(damping["suppressed_for_ms_more"].as_u64().unwrap() > 0, "{st}");
    assert!(
        st["events"].to_string().contains("suppressed by flap damping"),
        "no suppression event: {}",
        st["events"]
    );
    // Suppressed, the guest stays on the partner's NIC although a's path works now.
    assert_eq!(s.a.steering(), Some(true), "{}", show());
    assert_eq!(s.b.steering(), Some(true), "{}", show());
    assert!(report.errors.is_empty(), "the TCP stream broke: {:?}", report.errors);
    assert!(report.bytes_received > 0);
}

/// Log lines of a daemon that contain every one of `words`.
fn log_lines(d: &Daemon, words: &[&str]) -> usize {
    d.log().lines().filter(|l| words.iter().all(|w| l.contains(w))).count()
}

/// Waits up to 200 ms for `pid` to be in state `want` ('T' stopped, else running).
fn wait_state(pid: i32, stopped: bool) -> bool {
    wait_until(Duration::from_millis(200), "process state", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
        (state == Some("T")) == stopped
    })
    .is_ok()
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn stalled_daemons_change_no_path_and_report_no_false_failure() {
    // Issue 12, item 4: a daemon not scheduled for 100-200 ms judged "probes unanswered"
    // (and the partner's messages stale) on waking, while the replies were already queued:
    // false path changes and false "application path failing" events. Here each daemon in
    // turn is stopped (SIGSTOP) for 150-250 ms and continued, 24 times, with no fault on
    // any path. Nothing may move and neither may report its application path failing.
    use nix::{sys::signal, unistd::Pid};
    let s = setup("np-stall");
    let (guest, client) = (&s.lab.guests[0], &s.lab.clients[0]);
    let tcp = TcpStreamProbe::start(&guest.ns, GUEST_IP, 5001, &client.ns).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let counts = |d: &Daemon| {
        (
            log_lines(d, &["path change:"]),
            log_lines(d, &["application path on", "failing:"]),
        )
    };
    let (a0, b0) = (counts(&s.a), counts(&s.b));
    let mut stopped_ms = [0u64; 2];
    let mut not_stopped = Vec::new();
    let t0 = Instant::now();
    for i in 0..24u64 {
        let (h, d) = if i % 2 == 0 { (0, &s.a) } else { (1, &s.b) };
        let pid = Pid::from_raw(d.pid());
        let len = Duration::from_millis(150 + (i * 37) % 101);
        signal::kill(pid, signal::Signal::SIGSTOP).unwrap();
        let t = Instant::now();
        if !wait_state(d.pid(), true) {
            not_stopped.push(i);
        }
        std::thread::sleep(len.saturating_sub(t.elapsed()));
        signal::kill(pid, signal::Signal::SIGCONT).unwrap();
        stopped_ms[h] += t.elapsed().as_millis() as u64;
        assert!(wait_state(d.pid(), false), "daemon {} not continued", ["a", "b"][h]);
        std::thread::sleep(Duration::from_millis(350 + (i * 53) % 200));
    }
    // Judgements after the last stall: a false failure would show within probe_loss, a
    // false path change at once (and a return only after the 1 s heal hold).
    std::thread::sleep(Duration::from_millis(1200));
    let (a1, b1) = (counts(&s.a), counts(&s.b));
    let gap = tcp.max_gap_since(t0);
    let report = tcp.stop();
    let stalls = |d: &Daemon| d.status().map(|st| st["stalls"].clone()).unwrap_or_default();
    // Not asserted (a partner that stalls is really silent): what the other side reported.
    println!(
        "events: partner silent a {}, b {}; an AL judged silently dead a {}, b {}",
        log_lines(&s.a, &["partner silent on every"]),
        log_lines(&s.b, &["partner silent on every"]),
        log_lines(&s.a, &["silently dead"]),
        log_lines(&s.b, &["silently dead"]),
    );
    println!(
        "24 stops of 150-250 ms over {:.1} s (a stopped {} ms, b {} ms in all): path changes a {}, b {}; \"application path failing\" a {}, b {}; longest TCP gap {:.0} ms; stalls seen: a {}, b {}",
        t0.elapsed().as_secs_f64(),
        stopped_ms[0],
        stopped_ms[1],
        a1.0 - a0.0,
        b1.0 - b0.0,
        a1.1 - a0.1,
        b1.1 - b0.1,
        gap.as_secs_f64() * 1e3,
        stalls(&s.a),
        stalls(&s.b),
    );
    let show = || format!("--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log());
    assert!(not_stopped.is_empty(), "stops {not_stopped:?} did not take effect");
    assert_eq!(
        (a1.0 - a0.0, b1.0 - b0.0),
        (0, 0),
        "false path changes (a, b) with no fault\n{}",
        show()
    );
    assert_eq!(
        (a1.1 - a0.1, b1.1 - b0.1),
        (0, 0),
        "false \"application path failing\" (a, b) with no fault\n{}",
        show()
    );
    assert_eq!((s.a.steering(), s.b.steering()), (Some(false), Some(false)));
    assert!(report.errors.is_empty(), "the TCP stream broke: {:?}", report.errors);
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn realtime_priority_runs_the_daemon_under_sched_fifo() {
    let s = setup_with("np-rt", "realtime_priority = 10");
    for d in [&s.a, &s.b] {
        let st = d.status().unwrap();
        assert_eq!(st["scheduling"], "SCHED_FIFO priority 10", "{st}");
        // proc(5): field 40 of /proc/PID/stat is the real-time priority, 41 the policy
        // (1 = SCHED_FIFO); `rest` starts at field 3, after the command in parentheses.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
        let rest: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        assert_eq!((rest[40 - 3], rest[41 - 3]), ("10", "1"), "{stat}");
        assert!(st["events"].to_string().contains("running under SCHED_FIFO"), "{st}");
    }
}

/// `netpair ARGS…` (the command an administrator runs): (exit code, stdout, stderr).
fn netpair_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(eac_lab::workspace_bin("netpair"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The names of the guests a daemon protects, in its status order.
fn guest_names(d: &Daemon) -> Vec<String> {
    d.status().unwrap()["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
#[ignore = "privileged: needs root, BPF, nftables and network namespaces; run by scripts/test.sh"]
fn guests_are_added_removed_and_changed_at_runtime_without_disturbing_the_others() {
    // Issue 12, runtime control: two guests paired from the configuration files; a third
    // added at runtime is paired (steered through b on a fault of a's path); removing one
    // and changing another's role touch no other guest's traffic; bad requests change
    // nothing. On the code before this, every request but a bare `status` was answered
    // "unknown request" (the first assertion on a reply fails).
    require_root();
    let mut lab = Lab::two_hosts("np-ctl", 1).unwrap();
    let ids = [
        ("web", "52:54:00:fb:01:0a", "10.250.1.10"),
        ("db", "52:54:00:fb:01:0b", "10.250.1.11"),
        ("app", "52:54:00:fb:01:0c", "10.250.1.12"),
    ];
    for (_, mac, ip) in ids {
        lab.add_guest_ns("a", mac, ip).unwrap();
    }
    let spec = |i: usize, role: &str| {
        let (name, mac, ip) = ids[i];
        let port = format!("vg{i}");
        GuestSpec::new(name, mac, ip, role, (role == "local").then_some(port.as_str()))
    };
    let a = Daemon::start_guests(&lab, "a", "", &[spec(0, "local"), spec(1, "local")]);
    let b = Daemon::start_guests(&lab, "b", "", &[spec(0, "partner"), spec(1, "partner")]);
    let show = || format!("--- a:\n{}\n--- b:\n{}", a.log(), b.log());
    wait_until(Duration::from_secs(10), "both daemons pair, paths healthy", || {
        a.partner_reachable()
            && b.partner_reachable()
            && a.status().is_some_and(|s| s["app"]["path_ok"] == true)
            && b.status().is_some_and(|s| s["app"]["path_ok"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    let client = &lab.clients[0].ns;
    let web = TcpStreamProbe::start(&lab.guests[0].ns, ids[0].2, 5001, client).unwrap();
    let db = TcpStreamProbe::start(&lab.guests[1].ns, ids[1].2, 5002, client).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sock = a.socket().to_str().unwrap().to_owned();

    // Bad input: a clear refusal, exit 64 from the command, nothing changed.
    let refusals = [
        (spec(0, "local").json(), "duplicate"),
        (
            serde_json::json!({"name": "x", "mac": "52:54:00:fb:01", "role": "partner"}),
            "bad_request",
        ),
        (
            serde_json::json!({"name": "x", "mac": "52:54:00:fb:01:99", "role": "local", "port": "no-such-if"}),
            "invalid",
        ),
        (
            serde_json::json!({"name": "x", "mac": "52:54:00:fb:01:99", "role": "boss"}),
            "bad_request",
        ),
    ];
    for (guest, code) in refusals {
        let r = a.request("guest.add", serde_json::json!({ "guest": guest })).unwrap();
        assert_eq!(r["error"]["code"], code, "{guest}: {r}");
        println!("refused: {}", r["error"]["message"]);
    }
    let (rc, _, err) = netpair_cmd(&["guest", "remove", "nosuch", "--socket", &sock]);
    assert_eq!(rc, 64, "{err}");
    assert!(err.contains("no guest nosuch (known: web, db)"), "{err}");
    let (rc, _, err) = netpair_cmd(&["guest", "role", "db", "primary", "--socket", &sock]);
    assert_eq!(rc, 64, "{err}");
    assert!(err.contains("unknown variant"), "{err}");
    assert_eq!(guest_names(&a), ["web", "db"]);

    // Add a third guest at runtime: on a with the command, on b over the socket.
    let t_add = Instant::now();
    let (rc, out, err) = netpair_cmd(&[
        "guest", "add", "--name", "app", "--mac", ids[2].1, "--ip", ids[2].2, "--role", "local", "--port", "vg2",
        "--socket", &sock,
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("guest app 52:54:00:fb:01:0c role=local port=vg2"), "{out}");
    let r = b
        .request("guest.add", serde_json::json!({"guest": spec(2, "partner").json()}))
        .unwrap();
    assert_eq!(r["ok"]["role"], "partner", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let gap_add = web.max_gap_since(t_add).max(db.max_gap_since(t_add));
    let app = TcpStreamProbe::start(&lab.guests[2].ns, ids[2].2, 5003, client).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // A fault of a's path: the runtime guest is steered through b like the others.
    let t_fault = Instant::now();
    let loss = lab.silent_loss_on_switch_port("a").unwrap();
    let steered = |d: &Daemon, n: &str| d.guest(n).is_some_and(|g| g["steering"] == true);
    let took = wait_until(Duration::from_secs(5), "all three steered through b", || {
        ["web", "db", "app"].iter().all(|n| steered(&a, n) && steered(&b, n))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    wait_until(Duration::from_secs(5), "app's stream flows through b", || {
        app.flowing_after(Instant::now() - Duration::from_millis(20))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    std::thread::sleep(Duration::from_millis(500));
    let gap_app = app.max_gap_since(t_fault);
    let lent = b.guest("app").unwrap();
    assert!(
        lent["counters"]["here"]["to_al_packets"].as_u64().unwrap() > 0,
        "{lent}"
    );
    drop(loss);
    wait_until(Duration::from_secs(5), "traffic home", || {
        ["web", "db", "app"].iter().all(|n| !steered(&a, n) && !steered(&b, n))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    std::thread::sleep(Duration::from_millis(500));

    // Remove db on both while web's stream flows.
    let t_rm = Instant::now();
    for d in [&a, &b] {
        let r = d.request("guest.remove", serde_json::json!({"guest": "db"})).unwrap();
        assert_eq!(r["ok"]["removed"]["name"], "db", "{r}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let gap_rm = web.max_gap_since(t_rm).max(app.max_gap_since(t_rm));
    assert_eq!(guest_names(&a), ["web", "app"]);
    assert!(
        db.flowing_after(t_rm + Duration::from_millis(200)),
        "db itself is only unprotected"
    );

    // Change app's role on a (it "moved" to b) and back, while web's stream flows.
    let t_role = Instant::now();
    let (rc, out, err) = netpair_cmd(&["guest", "role", "app", "partner", "--socket", &sock]);
    assert_eq!(rc, 0, "{out}{err}");
    let g = a.guest("app").unwrap();
    assert_eq!(
        (g["role"].as_str(), g["state"].as_str(), g["port"].as_str()),
        (Some("partner"), Some("on_partner"), None),
        "{g}"
    );
    let (rc, out, err) = netpair_cmd(&[
        "guest",
        "role",
        "52:54:00:fb:01:0c",
        "local",
        "--port",
        "vg2",
        "--socket",
        &sock,
    ]);
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(a.guest("app").unwrap()["port"], "vg2");
    std::thread::sleep(Duration::from_millis(500));
    let gap_role = web.max_gap_since(t_role);
    let (rc, out, _) = netpair_cmd(&["guest", "show", "app", "--json", "--socket", &sock]);
    assert_eq!(rc, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (shown["role"].as_str(), shown["state"].as_str()),
        (Some("local"), Some("own_nic")),
        "{shown}"
    );

    let events = a.status().unwrap()["events"].to_string();
    for want in [
        "guest app (52:54:00:fb:01:0c) added at runtime",
        "guest db (52:54:00:fb:01:0b) removed at runtime",
        "role changed at runtime: was local (port vg2), now partner",
    ] {
        assert!(events.contains(want), "no {want:?} in {events}");
    }
    let reports = [web.stop(), db.stop(), app.stop()];
    for r in &reports {
        assert!(r.errors.is_empty(), "a TCP stream broke: {:?}", r.errors);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "runtime control: longest gap of the other guests' streams: adding app {:.0} ms, removing db {:.0} ms, changing app's role twice {:.0} ms; app (added at runtime) steered on both hosts {took:?} after the fault, its stream's gap {:.0} ms",
        ms(gap_add),
        ms(gap_rm),
        ms(gap_role),
        ms(gap_app)
    );
    for (what, gap) in [
        ("adding a guest", gap_add),
        ("removing a guest", gap_rm),
        ("changing a role", gap_role),
    ] {
        assert!(
            gap <= Duration::from_millis(20),
            "{what} disturbed another guest's stream: {gap:?}"
        );
    }
    assert!(
        gap_app < Duration::from_secs(1),
        "app's stream gap {gap_app:?}\n{}",
        show()
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn a_guest_nothing_can_carry_is_reported_cut_off_and_restored() {
    // Issue 12, item 5: both availability links down and then a's application NIC down —
    // our path is bad and the partner cannot carry the guest. One clear state (`cut_off`)
    // and event within ~100 ms, nothing steered into links known down; when one link comes
    // back the guest is carried through b and the end of the cut-off is an event. On the
    // code before this there is no such state or event (the first wait times out).
    let s = setup("np-cut");
    let a_ns = s.lab.host("a").ns.name().to_owned();
    let _restore = OnDrop(move || {
        for l in ["al1", "al2", topology::APP_IF] {
            let _ = Command::new("ip").args(["-n", &a_ns, "link", "set", l, "up"]).status();
        }
    });
    let guest = &s.lab.guests[0];
    let tcp = TcpStreamProbe::start(&guest.ns, GUEST_IP, 5001, &s.lab.clients[0].ns).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ns = &s.lab.host("a").ns;
    faults::link_down(ns, "al1").unwrap();
    faults::link_down(ns, "al2").unwrap();
    faults::link_down(ns, topology::APP_IF).unwrap();
    let t = Instant::now();
    let show = || format!("--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log());
    let took = wait_until(Duration::from_secs(2), "a reports web cut off", || {
        s.a.guest("web").is_some_and(|g| g["state"] == "cut_off")
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", s.a.guest("web"), show()));
    let st = s.a.status().unwrap();
    let g = s.a.guest("web").unwrap();
    assert_eq!(g["steering"], false, "steered into links known down: {g}");
    assert!(g["cut_off"]["why"].as_str().unwrap().contains("carrier lost"), "{g}");
    assert!(
        st["redundancy"]["lost"].to_string().contains("guest web cut off"),
        "{st}"
    );
    assert!(
        st["events"]
            .to_string()
            .contains("guest web (52:54:00:fb:01:0a) cut off"),
        "{}",
        st["events"]
    );
    // Held a while: still one cut-off event, never a steer.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.a.log().matches(") cut off:").count(), 1, "{}", show());
    assert_eq!(
        s.a.log().matches("traffic now through the partner").count(),
        0,
        "{}",
        show()
    );

    faults::link_up(ns, "al1").unwrap();
    let back = wait_until(Duration::from_secs(5), "web carried through b", || {
        s.a.guest("web").is_some_and(|g| g["state"] == "through_partner") && s.b.steering() == Some(true)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", s.a.guest("web"), show()));
    wait_until(Duration::from_secs(10), "the stream flows through b", || {
        tcp.flowing_after(Instant::now() - Duration::from_millis(50))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    let events = s.a.status().unwrap()["events"].to_string();
    assert!(events.contains("no longer cut off after"), "{events}");
    assert!(events.contains("through the partner's NIC"), "{events}");
    let report = tcp.stop();
    assert!(report.errors.is_empty(), "the TCP stream broke: {:?}", report.errors);
    println!(
        "cut off: state and event {took:?} after a's NIC went down (both ALs down); carried through b {back:?} after AL1 came back; test ran {:?} since the fault",
        t.elapsed()
    );
    assert!(
        took <= Duration::from_millis(100),
        "cut off reported only after {took:?}"
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and network namespaces; run by scripts/test.sh"]
fn status_keeps_every_event_and_shows_no_sentinels() {
    // Issue 12, operator-facing: `status --json` returned only the last 20 events, and a
    // counter the partner never saw was `last_rx_age_ms: 4294967295`. Here: 14 AL1
    // down/up cycles (28+ events), and a guest nobody ever sent to (role partner on both
    // hosts, no traffic). On the code before this, 20 events and the raw sentinel.
    require_root();
    let mut lab = Lab::two_hosts("np-ev", 1).unwrap();
    lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).unwrap();
    let idle = GuestSpec::new("idle", "52:54:00:fb:01:0e", "10.250.1.14", "partner", None);
    let web = |role: &str| GuestSpec::new("web", GUEST_MAC, GUEST_IP, role, (role == "local").then_some("vg0"));
    let a = Daemon::start_guests(&lab, "a", "", &[web("local"), idle.clone()]);
    let b = Daemon::start_guests(&lab, "b", "", &[web("partner"), idle]);
    wait_until(Duration::from_secs(10), "pairing", || {
        a.partner_reachable() && b.partner_reachable()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), b.log()));
    let ns = &lab.host("a").ns;
    for _ in 0..14 {
        faults::link_down(ns, "al1").unwrap();
        std::thread::sleep(Duration::from_millis(60));
        faults::link_up(ns, "al1").unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
    let logged = a.log().matches("availability link al1 ").count();
    let st = a.status().unwrap();
    let kept = st["events"].as_array().unwrap().len();
    println!("{logged} AL1 events logged; status --json returns {kept} events");
    assert!(logged >= 28, "{}", a.log());
    assert!(kept > logged, "status keeps {kept} events of {logged}+ logged");
    let idle_here = st["guests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "idle")
        .unwrap();
    assert!(
        idle_here["counters"]["partner"]["last_rx_age_ms"].is_null(),
        "{idle_here}"
    );
    let text = st.to_string();
    assert!(!text.contains("4294967295"), "a raw sentinel in status: {text}");
    // The human status: the recent events and "never".
    let (rc, out, err) = netpair_cmd(&["status", "--socket", a.socket().to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("recent events (newest first;"), "{out}");
    assert!(out.contains("last frame for it never"), "{out}");
    assert!(out.contains("availability link al1 up"), "{out}");
}

#[test]
#[ignore = "privileged: needs root, BPF, nftables and network namespaces; run by scripts/test.sh"]
fn partner_daemon_killed_while_lending_keeps_the_data_path() {
    // Issue 12, item 6: b lends its NIC to a's guest (silent loss on a's switch port) and
    // b's daemon is killed (SIGKILL) and started again. Its programs and maps are pinned, so
    // they keep carrying the guest's traffic while no daemon runs, and the new daemon adopts
    // them; a keeps steering through b although b is silent, since a's own path is bad. On
    // the code before this, b's programs vanished with its daemon and a stopped steering when
    // b fell silent: the guest was cut off until b ran again (the stream's gap was the
    // restart time, 2.5 s in issue 12).
    let mut s = setup("np-kill");
    let (guest, client) = (&s.lab.guests[0], &s.lab.clients[0]);
    let tcp = TcpStreamProbe::start(&guest.ns, GUEST_IP, 5001, &client.ns).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let loss = s.lab.silent_loss_on_switch_port("a").unwrap();
    wait_until(Duration::from_secs(5), "a steers and b lends", || {
        s.a.steering() == Some(true) && s.b.steering() == Some(true)
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", s.a.log(), s.b.log()));
    std::thread::sleep(Duration::from_millis(500));
    let t_kill = Instant::now();
    s.b.kill9();
    // Down for a while, as a supervisor's restart delay would be.
    std::thread::sleep(Duration::from_millis(1000));
    let gap_dead = tcp.max_gap_since(t_kill);
    let b_log_before = s.b.log();
    s.b = Daemon::start(&s.lab, "b", "partner");
    let show = || {
        format!(
            "--- a:\n{}\n--- b (before):\n{b_log_before}\n--- b:\n{}",
            s.a.log(),
            s.b.log()
        )
    };
    let took = wait_until(Duration::from_secs(10), "the new b pairs and lends", || {
        s.b.partner_reachable() && s.b.steering() == Some(true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", show()));
    std::thread::sleep(Duration::from_millis(500));
    let gap = tcp.max_gap_since(t_kill);
    let events_b = s.b.status().unwrap()["events"].to_string();
    drop(loss);
    let report = tcp.stop();
    println!(
        "b killed while lending: longest TCP gap {:.0} ms ({:.0} ms in the 1 s with no daemon on b); the new b lent again {took:?} after it started",
        gap.as_secs_f64() * 1e3,
        gap_dead.as_secs_f64() * 1e3
    );
    assert!(report.errors.is_empty(), "the TCP stream broke: {:?}", report.errors);
    assert!(
        gap < Duration::from_millis(200),
        "the guest was cut off for {gap:?}\n{}",
        show()
    );
    assert!(events_b.contains("adopted"), "{events_b}");
    assert_eq!(s.a.log().matches("traffic back on our NIC").count(), 0, "{}", show());
}
