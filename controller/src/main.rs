//! `eac-controller` — the per-host controller daemon (a thin shell over the library).
//!
//! ```text
//! eac-controller run --config /etc/eac/controller.toml
//! eac-controller check-config --config FILE
//! ```
//! Exit codes: 0 stopped on SIGTERM/SIGINT; 64 bad configuration (do not restart);
//! 1 transient failure (restart).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use eac_controller::{config::Config, daemon};

#[derive(Parser)]
#[command(
    name = "eac-controller",
    version,
    about = "The eac controller: membership, fencing, failover, libvirt"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller until SIGTERM or SIGINT.
    Run {
        /// The configuration file (TOML; see docs/operations.md).
        #[arg(long, short, default_value = "/etc/eac/controller.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0 valid, 64 invalid).
    CheckConfig {
        #[arg(long, short, default_value = "/etc/eac/controller.toml")]
        config: PathBuf,
    },
}

fn main() {
    eac_common::init_logging();
    let cli = Cli::parse();
    let (path, run) = match cli.cmd {
        Cmd::Run { config } => (config, true),
        Cmd::CheckConfig { config } => (config, false),
    };
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eac-controller: {}", eac_common::error_chain(&e));
            eprintln!(
                "hint: fix the configuration file; the controller will not start with it (exit 64: do not restart)"
            );
            std::process::exit(eac_common::EXIT_USAGE);
        }
    };
    if !run {
        println!(
            "{}: valid (host {}, {} peers, {} networks)",
            path.display(),
            cfg.host,
            cfg.peers.len(),
            cfg.networks.len()
        );
        return;
    }
    // Before the runtime: its threads inherit the policy.
    if let Some(p) = cfg.realtime_priority {
        match eac_common::sched::set_fifo(p) {
            Ok(()) => tracing::info!(priority = p, "running under SCHED_FIFO"),
            Err(e) => tracing::warn!(
                priority = p, error = %e,
                "realtime_priority refused: running under the normal scheduler; on a busy host heartbeats and judgements may come late"
            ),
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("eac-controller")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eac-controller: cannot start the runtime: {e}");
            std::process::exit(eac_common::EXIT_TRANSIENT);
        }
    };
    let result = rt.block_on(daemon::run(cfg, shutdown_signal()));
    match result {
        Ok(()) => {}
        Err(e) => {
            eprintln!("eac-controller: {}", eac_common::error_chain(&e));
            std::process::exit(if e.is_config() {
                eac_common::EXIT_USAGE
            } else {
                eac_common::EXIT_TRANSIENT
            });
        }
    }
    // Blocking threads (a hung state-file read) must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM: draining"),
                _ = i.recv() => tracing::info!("SIGINT: draining"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping only when killed");
            std::future::pending::<()>().await;
        }
    }
}
