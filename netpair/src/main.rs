//! `netpair` — command-line entry point; the logic lives in the library.
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "netpair", version, about = "Active-active network pairing for protected guests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
