//! `netpair` — command-line entry point; the logic lives in the library.
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "netpair",
    version,
    about = "Active-active network pairing for protected guests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the pairing daemon (foreground) with the given configuration file. Exits 64 on a
    /// bad configuration (do not restart), 1 on other failures. SIGTERM/SIGINT detach cleanly.
    Run {
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Ask the running daemon for its state: per guest the active path, counters on both
    /// hosts, the last decision and why; links; the partner; recent events.
    Status {
        #[arg(long, default_value = "/run/eac/netpair.sock")]
        socket: std::path::PathBuf,
        /// Print the JSON document instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Change the protected guests of the running daemon, without a restart and without
    /// touching other guests' traffic. Not written to the configuration file: its guests
    /// are the boot-time set. Exits 64 when the daemon refuses (nothing was changed).
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
        #[arg(long, default_value = "/run/eac/netpair.sock", global = true)]
        socket: std::path::PathBuf,
    },
    /// Attach the frame counter (XDP) to IFACE and print what it counts, once a second.
    /// Detaches on exit (after --seconds, or on Ctrl-C / SIGTERM).
    Count {
        /// Interface in the current network namespace.
        #[arg(long)]
        iface: String,
        /// How long to stay attached.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Protect a guest: `--role local --port TAP` for a guest running here, `--role partner`
    /// for one running on the partner host.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        mac: String,
        /// Announced with gratuitous ARP when its traffic moves.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Announced with unsolicited NA when its traffic moves.
        #[arg(long)]
        ipv6: Option<std::net::Ipv6Addr>,
        /// local or partner.
        #[arg(long)]
        role: String,
        /// The guest's port on our bridge (local guests only).
        #[arg(long)]
        port: Option<String>,
    },
    /// Stop protecting a guest (by name or MAC); its steering stops.
    Remove { guest: String },
    /// Change where a guest runs, as seen from this host: local (with --port) or partner.
    Role {
        guest: String,
        /// local or partner.
        role: String,
        #[arg(long)]
        port: Option<String>,
    },
    /// Show one guest (by name or MAC) as `status` shows it.
    Show {
        guest: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    eac_common::init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("netpair: {}", eac_common::error_chain(&e));
        std::process::exit(eac_common::EXIT_TRANSIENT);
    }
}

fn run(cli: Cli) -> Result<(), netpair::Error> {
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = match netpair::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("netpair: {}", eac_common::error_chain(&e));
                    std::process::exit(eac_common::EXIT_USAGE);
                }
            };
            runtime()?.block_on(netpair::daemon::run(cfg, shutdown_signal()))
        }
        Cmd::Status { socket, json } => {
            let v = runtime()?.block_on(netpair::daemon::query_status(&socket))?;
            if json {
                println!("{v}");
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Cmd::Guest { cmd, socket } => {
            let (op, args, json_out) = match cmd {
                GuestCmd::Add {
                    name,
                    mac,
                    ip,
                    ipv6,
                    role,
                    port,
                } => (
                    "guest.add",
                    serde_json::json!({"guest": {"name": name, "mac": mac, "ip": ip, "ipv6": ipv6, "role": role, "port": port}}),
                    false,
                ),
                GuestCmd::Remove { guest } => ("guest.remove", serde_json::json!({ "guest": guest }), false),
                GuestCmd::Role { guest, role, port } => (
                    "guest.set_role",
                    serde_json::json!({"guest": guest, "role": role, "port": port}),
                    false,
                ),
                GuestCmd::Show { guest, json } => ("guest.show", serde_json::json!({ "guest": guest }), json),
            };
            match runtime()?.block_on(netpair::control::call(&socket, op, args)) {
                Ok(v) if json_out => println!("{v}"),
                Ok(v) if op == "guest.remove" => {
                    println!("removed guest {}", v["removed"]["name"].as_str().unwrap_or("?"))
                }
                Ok(v) => print_guest(&v),
                Err(e @ netpair::Error::Refused { .. }) => {
                    eprintln!("netpair: {e}");
                    std::process::exit(eac_common::EXIT_USAGE);
                }
                Err(e) => return Err(e),
            }
            Ok(())
        }
        Cmd::Count { iface, seconds } => {
            let prog = netpair::CountProgram::attach(&iface)?;
            let stop = stop_flag();
            let end = Instant::now() + Duration::from_secs(seconds);
            loop {
                let c = prog.received()?;
                println!(
                    "{}",
                    serde_json::json!({"iface": prog.iface(), "rx_packets": c.packets, "rx_bytes": c.bytes})
                );
                if Instant::now() >= end || stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())));
            }
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, netpair::Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| netpair::Error::Io {
            what: "tokio runtime".into(),
            source,
        })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

fn print_status(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    println!(
        "host {}  app {} carrier={} path_ok={}",
        s(&v["host"]),
        s(&v["app"]["iface"]),
        v["app"]["carrier"],
        v["app"]["path_ok"]
    );
    let at = &v["app"]["attach"];
    println!("  attach {} ({}: {})", s(&at["mode"]), s(&at["chosen"]), s(&at["why"]));
    for a in v["availability_links"].as_array().into_iter().flatten() {
        println!(
            "  link {} {} carrier={} active={} heard {} ms ago",
            s(&a["iface"]),
            s(&a["health"]),
            a["carrier"],
            a["active"],
            match a["last_heard_ms_ago"].as_u64() {
                Some(ms) => ms.to_string(),
                None => "never".into(),
            }
        );
    }
    match v["redundancy"]["lost"].as_array() {
        Some(lost) if !lost.is_empty() => {
            for l in lost {
                println!("  LOSS OF REDUNDANCY: {}", s(l));
            }
        }
        _ => println!("  redundancy: ok"),
    }
    match v["partner"].as_object() {
        Some(p) => println!(
            "  partner {} reachable={} path_ok={}",
            s(&p["host"]),
            p["reachable"],
            p["path_ok"]
        ),
        None => println!("  partner: never heard"),
    }
    for g in v["guests"].as_array().into_iter().flatten() {
        print_guest(g);
    }
    let events: Vec<&serde_json::Value> = v["events"].as_array().into_iter().flatten().collect();
    if !events.is_empty() {
        let now = v["uptime_ms"].as_u64().unwrap_or(0);
        println!("recent events (newest first; {} kept, all with --json):", events.len());
        for e in events.iter().take(RECENT_EVENTS) {
            println!(
                "  {:>8} ms ago  {:<5}  {}",
                now.saturating_sub(e["at_ms"].as_u64().unwrap_or(0)),
                s(&e["level"]),
                s(&e["what"])
            );
        }
    }
}

/// How many events the human `status` prints.
const RECENT_EVENTS: usize = 15;

fn print_guest(g: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let port = g["port"].as_str().map(|p| format!(" port={p}")).unwrap_or_default();
    println!(
        "guest {} {} role={}{port} path: {}",
        s(&g["name"]),
        s(&g["mac"]),
        s(&g["role"]),
        s(&g["active_path"])
    );
    if let Some(c) = g["cut_off"].as_object() {
        println!("    CUT OFF for {} ms: {}", c["ms_ago"], s(&c["why"]));
    }
    let h = &g["counters"]["here"];
    println!(
        "    here: rx {} tx {} to AL {} from AL {} packets",
        h["rx_packets"], h["tx_packets"], h["to_al_packets"], h["from_al_packets"]
    );
    match g["counters"]["partner"].as_object() {
        Some(p) => println!(
            "    partner: rx {} tx {} packets, last frame for it {}",
            p["rx_packets"],
            p["tx_packets"],
            match p["last_rx_age_ms"].as_u64() {
                Some(ms) => format!("{ms} ms ago"),
                None => "never".into(),
            }
        ),
        None => println!("    partner: not heard"),
    }
    if let Some(d) = g["last_decision"].as_object() {
        println!("    last decision {} ms ago: {}", d["ms_ago"], s(&d["why"]));
    }
}

/// A flag set by SIGINT/SIGTERM so the loop ends and the program detaches cleanly.
fn stop_flag() -> &'static std::sync::atomic::AtomicBool {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    &STOP
}
