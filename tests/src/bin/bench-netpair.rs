//! `bench-netpair [--trials N] [--bond] [--iperf-seconds S]` — the netpair benchmark (run by
//! scripts/bench-netpair.sh; a benchmark that prints figures, not a test).
//!
//! 1. netpair in the two-host lab (guest namespace on host a, client on the switch): N trials
//!    each of (a) carrier loss (host a's app0 down) and (b) silent 100 % loss on a's switch
//!    port (nftables drop, carrier up). Per trial: time from the path dying (the last UDP
//!    datagram before the gap) to steering decided (from `netpair status`), the UDP gap (one
//!    16-byte datagram per ms client → guest, receiver-timestamped), the TCP gap (a 64-byte
//!    write per ms), whether TCP survived, and the gap when traffic returns after healing.
//!    iperf3 client → guest throughput (i) without netpair, (ii) with both daemons running,
//!    (iii) while steering through b, and (i') without netpair again after the daemons stop.
//! 2. With `--bond`: Linux bonding (active-backup, two veths into a switch bridge, client on
//!    the switch) under the same faults and probes: miimon 100 / carrier loss, ARP monitor
//!    100 ms / silent loss, miimon 100 / silent loss (bounded wait). Needs a kernel with
//!    bonding (the Debian 6.12 guest); otherwise says so and goes on.
//!
//! Machine-readable `RESULT …` lines are printed for the script's summary. Everything created
//! (namespaces, daemons, pinned maps, nft tables) is removed at the end, also on failure.
use std::{
    fs::File,
    io::{Read, Seek},
    panic::AssertUnwindSafe,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use eac_lab::{
    Lab, faults,
    netns::{Netns, run},
    netpair_daemon::{GUEST_IP, GUEST_MAC, NetpairDaemon},
    topology::{self, veth},
    traffic::{Gap, TcpStreamProbe, UdpStreamProbe},
    wait_until,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Carrier,
    Silent,
    /// What a's switch port sends to a is lost (a hears nothing; a's frames get through).
    OneWayIn,
    /// What a sends to its switch port is lost (a hears everything).
    OneWayOut,
    /// AL1 silently dead on both hosts (blackhole, carrier up), then silent loss on a's port.
    AlDeadSilent,
    /// AL1 and a's app0 down in the same instant (`ip -batch` on a).
    AlNicDown,
}

impl Fault {
    fn key(self) -> &'static str {
        match self {
            Fault::Carrier => "carrier",
            Fault::Silent => "silent",
            Fault::OneWayIn => "oneway_to_a",
            Fault::OneWayOut => "oneway_from_a",
            Fault::AlDeadSilent => "al1_dead_then_silent",
            Fault::AlNicDown => "al1_and_app0_down",
        }
    }
}

struct Args {
    trials: usize,
    bond: bool,
    iperf_secs: u32,
    /// `--cost-rounds N`: only the interleaved throughput-cost measurement, N rounds.
    cost_rounds: usize,
    /// `--hogs N`: N busy-loop processes beside the daemons for the whole run.
    hogs: usize,
    /// `--faults-only`: no throughput runs.
    faults_only: bool,
    /// `--flap-only`: only the flapping series.
    flap_only: bool,
    /// `--daemon-config LINE`: a top-level configuration line for every daemon of the fault
    /// and flapping series (e.g. `realtime_priority = 10`).
    daemon_config: String,
    /// `--flap-trials N` (default: --trials) and `--flap-seconds S` (default 60).
    flap_trials: Option<usize>,
    flap_secs: u64,
}

/// `--hogs` of this run, for the TABLE lines.
static HOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The fault series are isolated faults, a few seconds apart: with flap damping's defaults
/// (half-life 15 s) the second one would already be a "flapping path" and keep traffic on
/// the partner. A 1 s half-life (the least allowed) forgets a trial before the next one;
/// the flapping series runs with the defaults.
const NO_DAMPING: &str = "damping = { half_life = 1000 }";

fn parse_args() -> Args {
    let mut a = Args {
        trials: 5,
        bond: false,
        iperf_secs: 5,
        cost_rounds: 0,
        hogs: 0,
        faults_only: false,
        flap_only: false,
        daemon_config: String::new(),
        flap_trials: None,
        flap_secs: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--trials" => a.trials = it.next().and_then(|v| v.parse().ok()).expect("--trials N"),
            "--bond" => a.bond = true,
            "--hogs" => a.hogs = it.next().and_then(|v| v.parse().ok()).expect("--hogs N"),
            "--faults-only" => a.faults_only = true,
            "--flap-only" => a.flap_only = true,
            "--daemon-config" => a.daemon_config = it.next().expect("--daemon-config LINE"),
            "--flap-trials" => a.flap_trials = Some(it.next().and_then(|v| v.parse().ok()).expect("--flap-trials N")),
            "--flap-seconds" => a.flap_secs = it.next().and_then(|v| v.parse().ok()).expect("--flap-seconds S"),
            "--cost-rounds" => a.cost_rounds = it.next().and_then(|v| v.parse().ok()).expect("--cost-rounds N"),
            "--iperf-seconds" => a.iperf_secs = it.next().and_then(|v| v.parse().ok()).expect("--iperf-seconds S"),
            "-h" | "--help" => {
                println!(
                    "usage: bench-netpair [--trials N] [--bond] [--iperf-seconds S] [--cost-rounds N] [--hogs N] [--faults-only] [--flap-only] [--flap-trials N] [--flap-seconds S]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("bench-netpair: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    a
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------
// One trial, whatever the failover mechanism
// ---------------------------------------------------------------------------------------

/// The failover mechanism under test.
trait Subject {
    /// Injects the fault (returns once the command has run).
    fn inject(&mut self, fault: Fault);
    /// Non-blocking: when failover has happened, the instant it was decided.
    fn decided(&mut self) -> Option<Instant>;
    /// Removes the fault.
    fn heal(&mut self, fault: Fault);
    /// Back to the protected steady state (both paths usable, traffic on the primary path
    /// for netpair; an active slave and both slaves up for bonding).
    fn healthy(&mut self) -> bool;
    /// Who answers the probes: (namespace, ip) and the client namespace.
    fn endpoints(&self) -> (&Netns, &str, &Netns);
    /// Diagnostics when something times out.
    fn diag(&self) -> String;
}

#[derive(Debug, Default, Clone)]
struct Trial {
    /// Path died (last datagram before the gap) → failover decided, ms. None: no failover.
    decided_ms: Option<f64>,
    /// fault command issued → failover decided, ms.
    decided_from_cmd_ms: Option<f64>,
    inject_cmd_ms: f64,
    udp_gap_ms: f64,
    udp_open: bool,
    udp_lost: u64,
    tcp_gap_ms: f64,
    tcp_open: bool,
    tcp_survived: bool,
    return_gap_ms: Option<f64>,
    noise_ms: f64,
    note: String,
}

fn trial(s: &mut dyn Subject, fault: Fault, port: u16, bound: Duration) -> Result<Trial, String> {
    let (sns, sip, cns) = s.endpoints();
    let udp = UdpStreamProbe::start(sns, sip, port, cns, Duration::from_millis(1)).map_err(|e| e.to_string())?;
    let tcp = TcpStreamProbe::start(sns, sip, port + 1, cns).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let now = Instant::now();
    let noise = udp.max_gap_between(now - Duration::from_millis(400), now);
    let mut t = Trial {
        noise_ms: ms(noise),
        ..Default::default()
    };

    let t_inject = Instant::now();
    s.inject(fault);
    t.inject_cmd_ms = ms(t_inject.elapsed());
    let deadline = t_inject + bound;
    let decided = loop {
        if let Some(d) = s.decided() {
            break Some(d);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    match decided {
        Some(d) => {
            // Traffic back on the new path; TCP resumes at its next retransmission (RTO
            // back-off 0.2, 0.6, 1.4, 3.0 s after the first loss).
            let _ = wait_until(Duration::from_secs(5), "UDP after failover", || {
                udp.flowing_after(d.max(Instant::now() - Duration::from_millis(20)))
            });
            let _ = wait_until(Duration::from_secs(8), "TCP after failover", || {
                tcp.flowing_after(d) && !tcp.longest_gap_since(t_inject).open
            });
            std::thread::sleep(Duration::from_millis(300));
        }
        None => {
            t.note = format!("no failover within {:.0} s", bound.as_secs_f64());
        }
    }
    let ug = udp.longest_gap_since(t_inject);
    let tg: Gap = tcp.longest_gap_since(t_inject);
    t.udp_gap_ms = ms(ug.len);
    t.udp_open = ug.open;
    t.tcp_gap_ms = ms(tg.len);
    t.tcp_open = tg.open;
    if let Some(d) = decided {
        t.decided_from_cmd_ms = Some(ms(d.saturating_duration_since(t_inject)));
        // The path died after the last datagram before the first lost one arrived; with
        // nothing lost, count from the fault command.
        let died = udp.first_loss_since(t_inject).unwrap_or(t_inject);
        t.decided_ms = Some(if d >= died { ms(d - died) } else { -ms(died - d) });
    }

    let t_heal = Instant::now();
    s.heal(fault);
    if let Err(e) = wait_until(Duration::from_secs(20), "healed", || s.healthy()) {
        t.note = format!("{} {e}", t.note).trim().to_owned();
        eprintln!("{}", s.diag());
    }
    let back = wait_until(Duration::from_secs(8), "UDP after healing", || {
        udp.flowing_after(Instant::now() - Duration::from_millis(20))
    })
    .is_ok();
    // After a long silent fault TCP is deep in RTO back-off: give it until its next try.
    let _ = wait_until(Duration::from_secs(8), "TCP after healing", || {
        tcp.flowing_after(Instant::now() - Duration::from_millis(50))
    });
    std::thread::sleep(Duration::from_millis(300));
    // The gap when traffic returns: only gaps that begin after the heal (a fault that was
    // still cutting the path at the heal has no separate return gap).
    if back && !t.udp_open && ms(udp.max_gap_between(t_heal - Duration::from_millis(50), t_heal)) < 50.0 {
        t.return_gap_ms = Some(ms(udp.max_gap_between(t_heal, Instant::now())));
    }
    let ur = udp.stop();
    let tr = tcp.stop();
    t.udp_lost = ur.lost;
    t.tcp_survived = tr.errors.is_empty() && tr.bytes_received > 0;
    if !tr.errors.is_empty() {
        t.note = format!("{} TCP: {:?}", t.note, tr.errors).trim().to_owned();
    }
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
fn run_trials(
    env: &str,
    imp: &str,
    label: &str,
    s: &mut dyn Subject,
    fault: Fault,
    n: usize,
    port0: u16,
    bound: Duration,
) -> Vec<Trial> {
    println!("\n--- {imp}: {label} ({n} trials)");
    println!(
        "{:>5} {:>9} {:>9} {:>10} {:>9} {:>10} {:>8} {:>9} {:>9} {:>8}  note",
        "trial", "cmd ms", "decide", "UDP gap", "UDP lost", "TCP gap", "TCP ok", "return", "noise", ""
    );
    let mut v = Vec::new();
    for i in 0..n {
        match trial(s, fault, port0 + 2 * i as u16, bound) {
            Ok(t) => {
                println!(
                    "{:>5} {:>9.0} {:>9} {:>10} {:>9} {:>10} {:>8} {:>9} {:>9.1} {:>8}  {}",
                    i + 1,
                    t.inject_cmd_ms,
                    t.decided_ms.map_or("-".into(), |d| format!("{d:.1}")),
                    fmt_gap(t.udp_gap_ms, t.udp_open),
                    t.udp_lost,
                    fmt_gap(t.tcp_gap_ms, t.tcp_open),
                    if t.tcp_survived { "yes" } else { "NO" },
                    t.return_gap_ms.map_or("-".into(), |d| format!("{d:.1}")),
                    t.noise_ms,
                    "",
                    t.note
                );
                v.push(t);
            }
            Err(e) => println!("{:>5} failed: {e}", i + 1),
        }
    }
    summarize(env, imp, fault, label, &v);
    v
}

/// min/median/max of `vals` ("-" when empty).
fn mmm(vals: &[f64]) -> String {
    if vals.is_empty() {
        return "-".into();
    }
    let mut v = vals.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.0}/{:.0}/{:.0}", v[0], v[v.len() / 2], v[v.len() - 1])
}

/// One row of the run's table (`TABLE …`, gathered by scripts/bench-netpair.sh).
fn table_line(imp: &str, fault: &str, metrics: &[(&str, Vec<f64>)], rest: String) {
    let hogs = HOGS.load(std::sync::atomic::Ordering::Relaxed);
    let m: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={}", mmm(v))).collect();
    println!(
        "TABLE hogs={hogs} impl={imp} fault={fault} n={} {} {rest}",
        metrics[0].1.len(),
        m.join(" ")
    );
}

/// Silent loss on a's switch port `flap_secs` long, 1 s on / 1 s off, daemons with the
/// default flap damping, started afresh per trial (damping remembers earlier trials).
/// Path changes per minute (per host, the larger), the longest UDP/TCP gaps, TCP survival.
fn flap_trials(lab: &Lab, n: usize, secs: u64, extra: &str) {
    println!(
        "\n--- netpair: flapping, silent loss on a's switch port 1 s on / 1 s off for {secs} s ({n} trials, default damping)"
    );
    let (mut rate, mut ugap, mut tgap) = (Vec::new(), Vec::new(), Vec::new());
    let (mut survived, mut resets) = (0, 0);
    let changes = |d: &NetpairDaemon| d.log().matches("path change:").count();
    for i in 0..n {
        let a = NetpairDaemon::start_with(lab, "a", "local", extra);
        let b = NetpairDaemon::start_with(lab, "b", "partner", extra);
        if let Err(e) = wait_until(Duration::from_secs(30), "paired and healthy", || {
            [&a, &b]
                .iter()
                .all(|d| d.partner_reachable() && d.status().is_some_and(|s| s["app"]["path_ok"] == true))
        }) {
            println!("{:>5} failed: {e}", i + 1);
            continue;
        }
        let port = 6900 + 2 * i as u16;
        let (g, c) = (&lab.guests[0].ns, &lab.clients[0].ns);
        // The switch may still place the guest's MAC on b's port (a previous phase ended
        // while steering): a frame from the guest puts it back on a's.
        let _ = g
            .command("ping")
            .args(["-c", "1", "-W", "1", "-q", &lab.clients[0].ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let (udp, tcp) = match (
            UdpStreamProbe::start(g, GUEST_IP, port, c, Duration::from_millis(1)),
            TcpStreamProbe::start(g, GUEST_IP, port + 1, c),
        ) {
            (Ok(u), Ok(t)) => (u, t),
            (u, t) => {
                println!("{:>5} failed: probes did not start: {:?} {:?}", i + 1, u.err(), t.err());
                continue;
            }
        };
        // The path must have worked for the heal hold before the first failure.
        std::thread::sleep(Duration::from_millis(1500));
        let (a0, b0) = (changes(&a), changes(&b));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            let loss = lab.silent_loss_on_switch_port("a").expect("silent loss");
            std::thread::sleep(Duration::from_secs(1));
            drop(loss);
            std::thread::sleep(Duration::from_secs(1));
        }
        let took = t0.elapsed().as_secs_f64();
        let (an, bn) = (changes(&a) - a0, changes(&b) - b0);
        let per_min = an.max(bn) as f64 * 60.0 / took;
        let ug = udp.longest_gap_since(t0);
        let tg = tcp.longest_gap_since(t0);
        let _ = udp.stop();
        let tr = tcp.stop();
        let ok = tr.errors.is_empty() && tr.bytes_received > 0;
        let reset = tr.errors.iter().any(|e| e.to_lowercase().contains("reset"));
        println!(
            "{:>5} path changes a {an} b {bn} in {took:.0} s = {per_min:.1}/min; longest UDP gap {:.0} ms, TCP gap {:.0} ms, TCP {}{}",
            i + 1,
            ms(ug.len),
            ms(tg.len),
            if ok { "survived" } else { "BROKE" },
            if tr.errors.is_empty() {
                String::new()
            } else {
                format!(" {:?}", tr.errors)
            }
        );
        rate.push(per_min);
        ugap.push(ms(ug.len));
        tgap.push(ms(tg.len));
        survived += usize::from(ok);
        resets += usize::from(reset);
        drop((a, b));
    }
    table_line(
        "netpair",
        "flapping",
        &[
            ("udp_gap_ms", ugap),
            ("tcp_gap_ms", tgap),
            ("path_changes_per_min", rate),
        ],
        format!("tcp_survived={survived}/{n} resets={resets}"),
    );
}

fn fmt_gap(v: f64, open: bool) -> String {
    if open { format!("≥{v:.1}") } else { format!("{v:.1}") }
}

/// "mean / min / max" (with ≥ when any value is a lower bound).
fn stats(vals: &[f64]) -> Option<(f64, f64, f64)> {
    if vals.is_empty() {
        return None;
    }
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((mean, min, max))
}

fn summarize(env: &str, imp: &str, fault: Fault, label: &str, v: &[Trial]) {
    let metrics: Vec<(&str, Vec<f64>, bool)> = vec![
        ("decide_ms", v.iter().filter_map(|t| t.decided_ms).collect(), false),
        (
            "udp_gap_ms",
            v.iter().map(|t| t.udp_gap_ms).collect(),
            v.iter().any(|t| t.udp_open),
        ),
        ("udp_lost", v.iter().map(|t| t.udp_lost as f64).collect(), false),
        (
            "tcp_gap_ms",
            v.iter().map(|t| t.tcp_gap_ms).collect(),
            v.iter().any(|t| t.tcp_open),
        ),
        (
            "return_gap_ms",
            v.iter().filter_map(|t| t.return_gap_ms).collect(),
            false,
        ),
        ("noise_ms", v.iter().map(|t| t.noise_ms).collect(), false),
    ];
    let survived = v.iter().filter(|t| t.tcp_survived).count();
    let failovers = v.iter().filter(|t| t.decided_ms.is_some()).count();
    let resets = v.iter().filter(|t| t.note.to_lowercase().contains("reset")).count();
    table_line(
        imp,
        fault.key(),
        &[
            ("udp_gap_ms", v.iter().map(|t| t.udp_gap_ms).collect()),
            ("tcp_gap_ms", v.iter().map(|t| t.tcp_gap_ms).collect()),
            ("decide_ms", v.iter().filter_map(|t| t.decided_ms).collect()),
        ],
        format!(
            "tcp_survived={survived}/{} resets={resets} failovers={failovers}",
            v.len()
        ),
    );
    println!("    {:<14} {:>28}", "metric", "mean / min / max");
    for (name, vals, open) in &metrics {
        match stats(vals) {
            Some((mean, min, max)) => {
                let p = if *open { "≥" } else { "" };
                println!(
                    "    {name:<14} {:>28}",
                    format!("{p}{mean:.1} / {p}{min:.1} / {p}{max:.1}")
                );
                println!(
                    "RESULT env={env} impl={imp} fault={} metric={name} n={} mean={mean:.1} min={min:.1} max={max:.1} open={}",
                    fault.key(),
                    vals.len(),
                    *open as u8
                );
            }
            None => println!("    {name:<14} {:>28}", "-"),
        }
    }
    println!(
        "    failover in {failovers}/{} trials, TCP survived {survived}/{} ({label})",
        v.len(),
        v.len()
    );
    println!(
        "RESULT env={env} impl={imp} fault={} metric=tcp_survived n={} value={survived} failovers={failovers}",
        fault.key(),
        v.len()
    );
}

// ---------------------------------------------------------------------------------------
// netpair
// ---------------------------------------------------------------------------------------

struct Netpair<'l> {
    lab: &'l Lab,
    a: &'l NetpairDaemon,
    b: &'l NetpairDaemon,
    loss: Option<eac_lab::faults::SilentLoss>,
    bh: Vec<eac_lab::faults::Blackhole>,
}

impl Netpair<'_> {
    /// When the daemon decided its current steering state (status' `ms_ago`).
    fn decision_instant(d: &NetpairDaemon) -> Option<Instant> {
        let asked = Instant::now();
        let st = d.status()?;
        let ago = st["guests"][0]["last_decision"]["ms_ago"].as_u64()?;
        asked.checked_sub(Duration::from_millis(ago))
    }
}

impl Subject for Netpair<'_> {
    fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::Carrier => faults::link_down(&self.lab.host("a").ns, topology::APP_IF).expect("app0 down"),
            Fault::Silent => {
                self.loss = Some(
                    eac_lab::faults::SilentLoss::on(&self.lab.switch, &self.lab.host("a").switch_port())
                        .expect("silent loss"),
                )
            }
            Fault::OneWayIn | Fault::OneWayOut => {
                // The switch port sends what a receives, and receives what a sends.
                let to_a = fault == Fault::OneWayIn;
                self.loss = Some(
                    eac_lab::faults::SilentLoss::only(&self.lab.switch, &self.lab.host("a").switch_port(), to_a, !to_a)
                        .expect("one-way loss"),
                )
            }
            Fault::AlDeadSilent => {
                for h in ["a", "b"] {
                    self.bh
                        .push(eac_lab::faults::Blackhole::on(&self.lab.host(h).ns, "al1").expect("al1 blackhole"));
                }
                // Long enough for both daemons to judge al1 dead (link_timeout 30 ms).
                std::thread::sleep(Duration::from_millis(300));
                self.loss = Some(
                    eac_lab::faults::SilentLoss::on(&self.lab.switch, &self.lab.host("a").switch_port())
                        .expect("silent loss"),
                )
            }
            Fault::AlNicDown => {
                let ns = self.lab.host("a").ns.name().to_owned();
                let mut c = std::process::Command::new("ip");
                c.args(["-n", &ns, "-batch", "-"]).stdin(Stdio::piped());
                let mut child = c.spawn().expect("ip -batch");
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(format!("link set al1 down\nlink set {} down\n", topology::APP_IF).as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "ip -batch: al1 and app0 down");
            }
        }
    }
    fn decided(&mut self) -> Option<Instant> {
        if self.a.steering() == Some(true) && self.b.steering() == Some(true) {
            let a = Self::decision_instant(self.a)?;
            let b = Self::decision_instant(self.b)?;
            Some(a.max(b))
        } else {
            None
        }
    }
    fn heal(&mut self, fault: Fault) {
        match fault {
            Fault::Carrier => faults::link_up(&self.lab.host("a").ns, topology::APP_IF).expect("app0 up"),
            Fault::Silent | Fault::OneWayIn | Fault::OneWayOut => self.loss = None,
            Fault::AlDeadSilent => {
                self.loss = None;
                self.bh.clear();
            }
            Fault::AlNicDown => {
                faults::link_up(&self.lab.host("a").ns, "al1").expect("al1 up");
                faults::link_up(&self.lab.host("a").ns, topology::APP_IF).expect("app0 up");
            }
        }
    }
    fn healthy(&mut self) -> bool {
        [self.a, self.b].iter().all(|d| {
            d.status().is_some_and(|s| {
                s["app"]["path_ok"] == true && s["guests"][0]["steering"] == false && s["redundancy"]["ok"] == true
            })
        })
    }
    fn endpoints(&self) -> (&Netns, &str, &Netns) {
        (&self.lab.guests[0].ns, GUEST_IP, &self.lab.clients[0].ns)
    }
    fn diag(&self) -> String {
        format!(
            "--- a: {:?}\n{}\n--- b: {:?}\n{}",
            self.a.status(),
            tail(&self.a.log()),
            self.b.status(),
            tail(&self.b.log())
        )
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// iperf3 client → server for `secs`; Gbit/s received, retransmits.
fn iperf(server_ns: &Netns, ip: &str, client_ns: &Netns, port: u16, secs: u32) -> Result<(f64, u64), String> {
    let mut server: Child = server_ns
        .command("iperf3")
        .args(["-s", "-1", "-B", ip, "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 -s: {e}"))?;
    let listening = wait_until(Duration::from_secs(20), "iperf3 server listening", || {
        server_ns
            .enter(|| std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default())
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
            })
    });
    let out = listening.map_err(|e| e.to_string()).and_then(|_| {
        run(client_ns
            .command("iperf3")
            .args(["-c", ip, "-p", &port.to_string(), "-t", &secs.to_string(), "-J"]))
        .map_err(|e| e.to_string())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(server.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(server.try_wait(), Ok(None)) {
        let _ = server.kill();
    }
    let _ = server.wait();
    let j: serde_json::Value = serde_json::from_str(&out?).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = j["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    let bps = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON: no end.sum_received")?;
    let retr = j["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retr))
}

/// The data path's throughput cost, interleaved: per round iperf3 client → guest without
/// netpair, then with both daemons running (attach mode chosen automatically), then (for
/// reference) with `app_xdp = true`. Ratios are taken per round against that round's
/// baseline, so slow drift of a shared machine cancels out.
fn bench_cost(env: &str, args: &Args) {
    println!(
        "\n=== netpair data-path cost, {} interleaved rounds ({env})",
        args.cost_rounds
    );
    let mut lab = Lab::two_hosts("bnc", 1).expect("lab");
    lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).expect("guest");
    let secs = args.iperf_secs;
    std::thread::sleep(Duration::from_millis(500));
    let mut port = 5300u16;
    let mut tp = |what: &str| -> Option<f64> {
        port += 1;
        match iperf(&lab.guests[0].ns, GUEST_IP, &lab.clients[0].ns, port, secs) {
            Ok((gbps, retr)) => {
                println!("    {what:<34} {gbps:>7.3} Gbit/s ({retr} retransmits)");
                Some(gbps)
            }
            Err(e) => {
                println!("    {what:<34} failed: {e}");
                None
            }
        }
    };
    let with = |extra: &str, tp: &mut dyn FnMut(&str) -> Option<f64>, what: &str| -> (Option<f64>, String) {
        let a = NetpairDaemon::start_with(&lab, "a", "local", extra);
        let b = NetpairDaemon::start_with(&lab, "b", "partner", extra);
        let ok = wait_until(Duration::from_secs(30), "paired and healthy", || {
            [&a, &b]
                .iter()
                .all(|d| d.partner_reachable() && d.status().is_some_and(|s| s["app"]["path_ok"] == true))
        });
        let mode = a
            .status()
            .map(|s| format!("{} ({})", s["app"]["attach"]["mode"], s["app"]["attach"]["why"]))
            .unwrap_or_default();
        let v = match ok {
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(300));
                tp(what)
            }
            Err(e) => {
                println!("    {what}: {e}");
                None
            }
        };
        drop((a, b));
        std::thread::sleep(Duration::from_millis(300));
        (v, mode)
    };
    let (mut base, mut auto, mut xdp) = (Vec::new(), Vec::new(), Vec::new());
    let mut modes = (String::new(), String::new());
    for r in 1..=args.cost_rounds {
        println!("  round {r}");
        let b = tp("baseline (no netpair)");
        let (a, m) = with("", &mut tp, "netpair, attach mode auto");
        modes.0 = m;
        let (x, m) = with("app_xdp = true", &mut tp, "netpair, app_xdp = true");
        modes.1 = m;
        if let Some(b) = b {
            base.push(b);
            if let Some(a) = a {
                auto.push(a / b);
            }
            if let Some(x) = x {
                xdp.push(x / b);
            }
        }
    }
    let b2 = tp("baseline (no netpair), closing");
    if let Some(b) = b2 {
        base.push(b);
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v.first().copied(), v.get(v.len() / 2).copied(), v.last().copied())
    };
    println!("\n--- data-path cost, iperf3 client → guest, 1 TCP stream, {secs} s per run ({env})");
    if let (Some(lo), Some(m), Some(hi)) = med(&base) {
        println!(
            "    baseline Gbit/s min / median / max: {lo:.3} / {m:.3} / {hi:.3} ({} runs)",
            base.len()
        );
    }
    for (name, key, v, mode) in [
        ("auto", "cost_auto", &auto, &modes.0),
        ("app_xdp = true", "cost_xdp", &xdp, &modes.1),
    ] {
        if let (Some(lo), Some(m), Some(hi)) = med(v) {
            println!(
                "    {name:<16} loss vs the same round's baseline, min / median / max: {:.1} / {:.1} / {:.1} %  (mode {mode})",
                100.0 * (1.0 - hi),
                100.0 * (1.0 - m),
                100.0 * (1.0 - lo)
            );
            println!(
                "RESULT env={env} impl=netpair metric={key} n={} median_loss_pct={:.1} min_loss_pct={:.1} max_loss_pct={:.1}",
                v.len(),
                100.0 * (1.0 - m),
                100.0 * (1.0 - hi),
                100.0 * (1.0 - lo)
            );
        }
    }
}

fn bench_netpair(env: &str, args: &Args) {
    println!("\n=== netpair ({env})");
    let mut lab = Lab::two_hosts("bnp", 1).expect("lab");
    lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).expect("guest");
    let (g, c) = (&lab.guests[0].ns, &lab.clients[0].ns);
    let secs = args.iperf_secs;
    let tp = |what: &str, port: u16| -> Option<f64> {
        if args.faults_only {
            return None;
        }
        match iperf(g, GUEST_IP, c, port, secs) {
            Ok((gbps, retr)) => {
                println!("throughput {what}: {gbps:.3} Gbit/s ({retr} retransmits, {secs} s)");
                Some(gbps)
            }
            Err(e) => {
                println!("throughput {what}: failed: {e}");
                None
            }
        }
    };
    // Let the lab settle (bridge learning, IPv6 DAD noise) before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let tp_i = tp("(i)   no netpair attached", 5201);
    // A reference point for per-frame cost: the same path without programs but with
    // GSO/TSO off on a's switch port, so a's app0 receives MTU-sized frames (as a path whose
    // segmentation offload is lost would).
    let port_a = lab.host("a").switch_port();
    let gso = |on: &str| {
        lab.switch
            .exec("ethtool", &["-K", &port_a, "gso", on, "tso", on])
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let tp_nogso = match gso("off") {
        Ok(()) => {
            let v = tp("(i-g) no netpair, GSO/TSO off on a's switch port", 5205);
            gso("on").expect("GSO back on");
            v
        }
        Err(e) => {
            println!("throughput (i-g): cannot turn GSO off: {e}");
            None
        }
    };

    let t = Instant::now();
    let extra = format!("{NO_DAMPING}\n{}", args.daemon_config);
    let a = NetpairDaemon::start_with(&lab, "a", "local", &extra);
    let b = NetpairDaemon::start_with(&lab, "b", "partner", &extra);
    wait_until(Duration::from_secs(30), "both daemons hear their partner", || {
        a.partner_reachable() && b.partner_reachable()
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", tail(&a.log()), tail(&b.log())));
    wait_until(Duration::from_secs(15), "both paths judged healthy", || {
        [&a, &b]
            .iter()
            .all(|d| d.status().is_some_and(|s| s["app"]["path_ok"] == true))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a:\n{}\n--- b:\n{}", tail(&a.log()), tail(&b.log())));
    println!("daemons started, paired and paths healthy in {:.0} ms", ms(t.elapsed()));
    std::thread::sleep(Duration::from_millis(300));
    let feat = lab.switch.exec("ethtool", &["-k", &port_a]).unwrap_or_default();
    let gso_now = feat
        .lines()
        .find(|l| l.starts_with("generic-segmentation-offload:"))
        .unwrap_or("generic-segmentation-offload: ?");
    println!("with netpair attached, a's switch port (veth peer of app0) has {gso_now}");
    let tp_ii = tp("(ii)  both daemons, programs attached, not steering", 5202);

    let mut np = Netpair {
        lab: &lab,
        a: &a,
        b: &b,
        loss: None,
        bh: Vec::new(),
    };
    let bound = Duration::from_secs(10);
    let carrier = run_trials(
        env,
        "netpair",
        "carrier loss: host a's app0 down",
        &mut np,
        Fault::Carrier,
        args.trials,
        6000,
        bound,
    );
    let silent = run_trials(
        env,
        "netpair",
        "silent loss: nft drop on a's switch port, carrier up",
        &mut np,
        Fault::Silent,
        args.trials,
        6200,
        bound,
    );
    let mut more = Vec::new();
    for (i, (fault, label)) in [
        (Fault::OneWayIn, "one-way loss: nothing reaches a from its switch port"),
        (
            Fault::OneWayOut,
            "one-way loss: nothing a sends reaches its switch port",
        ),
        (
            Fault::AlDeadSilent,
            "AL1 silently dead on both hosts, then silent loss on a's port",
        ),
        (Fault::AlNicDown, "AL1 and a's app0 down in the same instant"),
    ]
    .into_iter()
    .enumerate()
    {
        more.push(run_trials(
            env,
            "netpair",
            label,
            &mut np,
            fault,
            args.trials,
            6400 + 200 * i as u16,
            bound,
        ));
    }
    let _ = (carrier, silent, more);

    // (iii) steering through b for the whole run.
    println!();
    faults::link_down(&lab.host("a").ns, topology::APP_IF).expect("app0 down");
    let steer = wait_until(Duration::from_secs(10), "steering", || {
        a.steering() == Some(true) && b.steering() == Some(true)
    });
    let tp_iii = match steer {
        Ok(_) => {
            std::thread::sleep(Duration::from_millis(300));
            tp("(iii) steering through b (a's app0 down)", 5203)
        }
        Err(e) => {
            println!("throughput (iii): no steering: {e}");
            None
        }
    };
    faults::link_up(&lab.host("a").ns, topology::APP_IF).expect("app0 up");
    let _ = wait_until(Duration::from_secs(10), "home", || np.healthy());
    let log_a = a.log();
    drop(np);
    drop((a, b));
    let attached = lab
        .host("a")
        .ns
        .ip(&["-d", "link", "show", topology::APP_IF])
        .unwrap_or_default();
    if attached.contains("xdp") {
        println!("warning: an XDP program is still attached to a's app0 after the daemons stopped");
    }
    std::thread::sleep(Duration::from_millis(300));
    let tp_i2 = tp("(i')  no netpair attached, after the daemons stopped", 5204);

    // (ii-tc), (iii-tc): the same with `app_xdp = false` (counting in TC instead of XDP).
    let a = NetpairDaemon::start_with(&lab, "a", "local", "app_xdp = false");
    let b = NetpairDaemon::start_with(&lab, "b", "partner", "app_xdp = false");
    let paired = wait_until(Duration::from_secs(30), "pairing (app_xdp = false)", || {
        a.partner_reachable() && b.partner_reachable()
    });
    let (tp_ii_tc, tp_iii_tc) = if paired.is_ok() {
        std::thread::sleep(Duration::from_millis(300));
        let ii = tp("(ii-tc) programs attached, app_xdp = false", 5206);
        faults::link_down(&lab.host("a").ns, topology::APP_IF).expect("app0 down");
        let iii = match wait_until(Duration::from_secs(10), "steering", || {
            a.steering() == Some(true) && b.steering() == Some(true)
        }) {
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(300));
                tp("(iii-tc) steering through b, app_xdp = false", 5207)
            }
            Err(e) => {
                println!("throughput (iii-tc): no steering: {e}");
                None
            }
        };
        faults::link_up(&lab.host("a").ns, topology::APP_IF).expect("app0 up");
        let _ = wait_until(Duration::from_secs(10), "home (app_xdp = false)", || {
            [&a, &b].iter().all(|d| d.steering() == Some(false))
        });
        (ii, iii)
    } else {
        println!("throughput (ii-tc): daemons did not pair");
        (None, None)
    };
    drop((a, b));
    flap_trials(
        &lab,
        args.flap_trials.unwrap_or(args.trials),
        args.flap_secs,
        &args.daemon_config,
    );
    let errors: Vec<&str> = log_a.lines().filter(|l| l.contains("ERROR")).collect();
    if !errors.is_empty() {
        let mut kinds: Vec<String> = errors
            .iter()
            .map(|l| l.split("ERROR").nth(1).unwrap_or("").trim().chars().take(160).collect())
            .collect();
        kinds.sort();
        kinds.dedup();
        println!("note: daemon a logged {} ERROR lines, e.g.:", errors.len());
        for k in kinds.iter().take(5) {
            println!("      {k}");
        }
    }

    let base: Vec<f64> = [tp_i, tp_i2].into_iter().flatten().collect();
    let base = (!base.is_empty()).then(|| base.iter().sum::<f64>() / base.len() as f64);
    println!("\n--- throughput, iperf3 client → guest, 1 TCP stream, {secs} s each ({env})");
    let show = |name: &str, v: Option<f64>| match (v, base) {
        (Some(v), Some(b)) => {
            println!("    {name:<44} {v:>7.3} Gbit/s  {:>6.1} % of (i)", 100.0 * v / b);
            println!(
                "RESULT env={env} impl=netpair metric=throughput_{} gbps={v:.3} ratio={:.4}",
                name.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches(|c| c == '(' || c == ')')
                    .replace('-', "_"),
                v / b
            );
        }
        (Some(v), None) => println!("    {name:<44} {v:>7.3} Gbit/s"),
        _ => println!("    {name:<44} failed"),
    };
    if let Some(b) = base {
        println!("    {:<44} {b:>7.3} Gbit/s  (mean of i and i')", "(i) baseline");
        println!("RESULT env={env} impl=netpair metric=throughput_i gbps={b:.3} ratio=1");
    }
    show("(i-g) no netpair, GSO/TSO off on app-a", tp_nogso);
    show("(ii) daemons attached, not steering", tp_ii);
    show("(iii) steering through b", tp_iii);
    show("(ii-tc) attached, app_xdp = false", tp_ii_tc);
    show("(iii-tc) steering, app_xdp = false", tp_iii_tc);
    let f = |v: Option<f64>| v.map_or("failed".to_owned(), |v| format!("{v:.3}"));
    println!(
        "    (i) and (i') alone: {} / {} Gbit/s — their spread is the run-to-run noise",
        f(tp_i),
        f(tp_i2)
    );
}

// ---------------------------------------------------------------------------------------
// Linux bonding
// ---------------------------------------------------------------------------------------

const BOND_HOST_IP: &str = "10.252.0.1";
const BOND_CLIENT_IP: &str = "10.252.0.2";

struct BondLab {
    sw: Netns,
    hst: Netns,
    cli: Netns,
    proc_bond: Option<File>,
    active_before: String,
    loss: Option<eac_lab::faults::SilentLoss>,
}

#[derive(Debug, Default)]
struct BondState {
    active: Option<String>,
    slaves_up: usize,
}

impl BondLab {
    fn new() -> Result<Self, eac_lab::Error> {
        let sw = Netns::create("bbsw")?;
        let hst = Netns::create("bbh")?;
        let cli = Netns::create("bbc")?;
        for ns in [&sw, &hst, &cli] {
            ns.exec(
                "sysctl",
                &[
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
        }
        sw.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        veth(&hst, "h1", &sw, "sw-h1")?;
        veth(&hst, "h2", &sw, "sw-h2")?;
        veth(&cli, "c0", &sw, "sw-c")?;
        for p in ["sw-h1", "sw-h2", "sw-c"] {
            sw.ip(&["link", "set", p, "master", "br0", "up"])?;
        }
        cli.ip(&["addr", "add", &format!("{BOND_CLIENT_IP}/24"), "dev", "c0"])?;
        cli.ip(&["link", "set", "c0", "up"])?;
        Ok(Self {
            sw,
            hst,
            cli,
            proc_bond: None,
            active_before: String::new(),
            loss: None,
        })
    }

    fn create_bond(&mut self, opts: &[&str]) -> Result<(), String> {
        let _ = self.hst.ip(&["link", "del", "bond0"]);
        self.proc_bond = None;
        let mut a = vec!["link", "add", "bond0", "type", "bond", "mode", "active-backup"];
        a.extend_from_slice(opts);
        self.hst.ip(&a).map_err(|e| e.to_string())?;
        for s in ["h1", "h2"] {
            self.hst.ip(&["link", "set", s, "down"]).map_err(|e| e.to_string())?;
            self.hst
                .ip(&["link", "set", s, "master", "bond0"])
                .map_err(|e| e.to_string())?;
        }
        self.hst
            .ip(&["link", "set", "bond0", "up"])
            .map_err(|e| e.to_string())?;
        self.hst
            .ip(&["addr", "add", &format!("{BOND_HOST_IP}/24"), "dev", "bond0"])
            .map_err(|e| e.to_string())?;
        let f = self
            .hst
            .enter(|| File::open("/proc/thread-self/net/bonding/bond0"))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("open /proc/net/bonding/bond0: {e}"))?;
        self.proc_bond = Some(f);
        wait_until(
            Duration::from_secs(20),
            "bond0 with an active slave and both slaves up",
            || self.healthy(),
        )
        .map_err(|e| format!("{e}\n{}", self.diag()))?;
        let d = self.hst.ip(&["-d", "link", "show", "bond0"]).unwrap_or_default();
        let toks: Vec<&str> = d
            .lines()
            .find(|l| l.contains("bond mode"))
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let keep = [
            "mode",
            "active_slave",
            "miimon",
            "arp_interval",
            "arp_missed_max",
            "arp_ip_target",
            "arp_validate",
        ];
        let line: Vec<String> = toks
            .windows(2)
            .filter(|w| keep.contains(&w[0]))
            .map(|w| format!("{} {}", w[0], w[1]))
            .collect();
        println!("bond0: {}", line.join(", "));
        Ok(())
    }

    fn state(&mut self) -> BondState {
        let Some(f) = self.proc_bond.as_mut() else {
            return BondState::default();
        };
        let mut s = String::new();
        if f.rewind().is_err() || f.read_to_string(&mut s).is_err() {
            return BondState::default();
        }
        let mut st = BondState::default();
        let mut in_slave = false;
        for l in s.lines() {
            if let Some(v) = l.strip_prefix("Currently Active Slave: ") {
                st.active = (v != "None").then(|| v.trim().to_owned());
            } else if l.starts_with("Slave Interface: ") {
                in_slave = true;
            } else if in_slave && l.starts_with("MII Status: ") {
                if l.ends_with("up") {
                    st.slaves_up += 1;
                }
                in_slave = false;
            }
        }
        st
    }
}

impl Subject for BondLab {
    fn inject(&mut self, fault: Fault) {
        self.active_before = self.state().active.unwrap_or_else(|| "h1".into());
        let port = format!("sw-{}", self.active_before);
        match fault {
            Fault::Carrier => faults::link_down(&self.sw, &port).expect("switch port down"),
            Fault::Silent => self.loss = Some(eac_lab::faults::SilentLoss::on(&self.sw, &port).expect("silent loss")),
            other => unreachable!("bonding is measured on carrier and silent loss only, not {other:?}"),
        }
    }
    fn decided(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let st = self.state();
        st.active.is_some_and(|a| a != self.active_before).then_some(now)
    }
    fn heal(&mut self, fault: Fault) {
        match fault {
            Fault::Carrier => faults::link_up(&self.sw, &format!("sw-{}", self.active_before)).expect("switch port up"),
            Fault::Silent => self.loss = None,
            other => unreachable!("bonding is measured on carrier and silent loss only, not {other:?}"),
        }
    }
    fn healthy(&mut self) -> bool {
        let s = self.state();
        s.active.is_some() && s.slaves_up == 2
    }
    fn endpoints(&self) -> (&Netns, &str, &Netns) {
        (&self.hst, BOND_HOST_IP, &self.cli)
    }
    fn diag(&self) -> String {
        self.hst
            .enter(|| std::fs::read_to_string("/proc/thread-self/net/bonding/bond0").unwrap_or_default())
            .unwrap_or_default()
    }
}

/// Why bonding cannot be used here, if it cannot.
fn bonding_unavailable() -> Option<String> {
    let ns = match Netns::create("bbprobe") {
        Ok(ns) => ns,
        Err(e) => return Some(format!("cannot create a namespace: {e}")),
    };
    match ns.ip(&["link", "add", "bprobe0", "type", "bond"]) {
        Ok(_) => None,
        Err(e) => {
            let module = if std::path::Path::new("/sys/module/bonding").exists() {
                "/sys/module/bonding exists"
            } else {
                "no /sys/module/bonding"
            };
            let msg = match e {
                eac_lab::Error::Command { stderr, .. } => stderr,
                other => other.to_string(),
            };
            Some(format!("`ip link add type bond`: {msg}; {module}"))
        }
    }
}

fn bench_bond(env: &str, args: &Args) {
    println!("\n=== Linux bonding, active-backup ({env})");
    if let Some(why) = bonding_unavailable() {
        println!(
            "bonding: not available in this kernel ({why}); run with --in-guest \
             (scripts/bench-netpair.sh --in-guest runs this with --bond in the Debian 6.12 guest)"
        );
        println!("RESULT env={env} impl=bonding unavailable=1");
        return;
    }
    let mut bl = match BondLab::new() {
        Ok(b) => b,
        Err(e) => {
            println!("bonding lab setup failed: {e}");
            return;
        }
    };
    let configs: [(&str, Vec<&str>, Fault, &str, Duration); 3] = [
        (
            "bonding",
            vec!["miimon", "100"],
            Fault::Carrier,
            "miimon 100, carrier loss: active slave's switch port down",
            Duration::from_secs(10),
        ),
        (
            "bonding",
            vec![
                "arp_interval",
                "100",
                "arp_ip_target",
                BOND_CLIENT_IP,
                "arp_validate",
                "all",
            ],
            Fault::Silent,
            "arp_interval 100 arp_validate all, silent loss on the active slave's switch port",
            Duration::from_secs(10),
        ),
        (
            "bonding-miimon",
            vec!["miimon", "100"],
            Fault::Silent,
            "miimon 100, silent loss on the active slave's switch port (bounded wait 3 s)",
            Duration::from_secs(3),
        ),
    ];
    for (k, (imp, opts, fault, label, bound)) in configs.into_iter().enumerate() {
        println!();
        if let Err(e) = bl.create_bond(&opts) {
            println!("{imp}: cannot set up the bond ({}): {e}", opts.join(" "));
            continue;
        }
        run_trials(
            env,
            imp,
            label,
            &mut bl,
            fault,
            args.trials,
            7000 + 200 * k as u16,
            bound,
        );
    }
    let _ = bl.hst.ip(&["link", "del", "bond0"]);
    drop(bl);
}

// ---------------------------------------------------------------------------------------

fn pin_netdev_hooks() -> Result<Netns, eac_lab::Error> {
    let ns = Netns::create("bpin")?;
    ns.ip(&["link", "add", "pin-a", "type", "veth", "peer", "name", "pin-b"])?;
    ns.ip(&["link", "set", "pin-a", "up"])?;
    ns.ip(&["link", "set", "pin-b", "up"])?;
    let rules = "table netdev pin {\n\
        chain in { type filter hook ingress device \"pin-a\" priority 0; policy accept; }\n\
        chain out { type filter hook egress device \"pin-a\" priority 0; policy accept; }\n}\n";
    let path = std::env::temp_dir().join(format!("bench-netpair-pin-{}.nft", std::process::id()));
    std::fs::write(&path, rules).map_err(|source| eac_lab::Error::Io {
        what: "write pin.nft".into(),
        source,
    })?;
    let r = ns.exec("nft", &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(ns)
}

fn leftovers() -> Vec<String> {
    let tag = format!("-{}-", std::process::id());
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&tag))
        .map(|n| format!("namespace {n}"))
        .collect();
    v.extend(
        std::fs::read_dir("/sys/fs/bpf/eac")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(&tag))
            .map(|n| format!("pinned /sys/fs/bpf/eac/{n}")),
    );
    v
}

fn main() {
    eac_lab::require_root();
    let args = parse_args();
    let t0 = Instant::now();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let in_guest = std::env::var("VM_GUEST").is_ok_and(|v| v == "1");
    let env = if in_guest { "guest" } else { "host" };
    println!(
        "bench-netpair: env={env} kernel {kernel}{}, {} CPUs, trials {}, iperf3 {} s{}",
        if in_guest { " (QEMU TCG guest)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.trials,
        args.iperf_secs,
        if args.bond { ", with the bonding peer" } else { "" }
    );
    println!(
        "gaps: longest receive gap after the fault is injected (UDP 1 datagram/ms, TCP 64 B/ms); \
         decide: path died (last UDP datagram before the first lost one; the fault command if none was lost) → failover decided; \
         cmd ms: time the fault command itself took; return: longest UDP gap when healing; \
         noise: longest UDP gap in 400 ms before the fault"
    );
    println!("RESULT env={env} kernel={kernel}");

    let pin = match pin_netdev_hooks() {
        Ok(ns) => Some(ns),
        Err(e) => {
            println!("note: could not install the no-op nftables netdev pin: {e}");
            None
        }
    };

    HOGS.store(args.hogs, std::sync::atomic::Ordering::Relaxed);
    let mut hogs: Vec<Child> = (0..args.hogs)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("CPU hog")
        })
        .collect();
    if args.hogs > 0 {
        println!("{} CPU hogs (busy-loop shells) running beside the daemons", args.hogs);
    }
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if args.cost_rounds > 0 {
            bench_cost(env, &args)
        } else if args.flap_only {
            let mut lab = Lab::two_hosts("bnf", 1).expect("lab");
            lab.add_guest_ns("a", GUEST_MAC, GUEST_IP).expect("guest");
            flap_trials(
                &lab,
                args.flap_trials.unwrap_or(args.trials),
                args.flap_secs,
                &args.daemon_config,
            )
        } else {
            bench_netpair(env, &args)
        }
    }));
    if let Err(p) = r {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        println!(
            "\nnetpair: FAILED in this environment: {}",
            msg.lines().next().unwrap_or("")
        );
        println!(
            "RESULT env={env} impl=netpair failed=1 why={}",
            msg.lines().next().unwrap_or("").replace(' ', "_")
        );
        eprintln!("{msg}");
    }
    if args.bond {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| bench_bond(env, &args)));
        if r.is_err() {
            println!("\nbonding: FAILED in this environment (see stderr)");
        }
    }
    for h in &mut hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    drop(pin);
    let left = leftovers();
    if left.is_empty() {
        println!(
            "\ncleanup: no namespaces or pinned maps of this run left; done in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    } else {
        println!("\ncleanup: LEFT BEHIND: {left:?}");
        std::process::exit(1);
    }
}
