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
        println!(
            "guest {} {} role={} path: {}",
            s(&g["name"]),
            s(&g["mac"]),
            s(&g["role"]),
            s(&g["active_path"])
        );
        println!("    here: {}", g["counters"]["here"]);
        println!("    partner: {}", g["counters"]["partner"]);
        if let Some(d) = g["last_decision"].as_object() {
            println!("    last decision {} ms ago: {}", d["ms_ago"], s(&d["why"]));
        }
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
