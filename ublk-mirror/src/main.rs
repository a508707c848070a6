//! `ublk-mirror` — thin command line over the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eac_common::{EXIT_TRANSIENT, EXIT_USAGE, error_chain};
use ublk_mirror::{CONTROL_PATH, Control, nbd};

#[derive(Debug, Parser)]
#[command(name = "ublk-mirror", version, about = "Mirrored ublk block devices")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the features the running ublk_drv advertises (UBLK_U_CMD_GET_FEATURES).
    Features {
        /// One JSON object: {"control": PATH, "features": BITS, "names": [..]}.
        #[arg(long)]
        json: bool,
        /// The ublk control node.
        #[arg(long, value_name = "PATH", default_value = CONTROL_PATH, env = "UBLK_CONTROL")]
        control: PathBuf,
    },
    /// Serve a local file or block device over NBD (no mirror), for manual use and tests.
    /// Prints the client URL on stdout once listening; SIGINT/SIGTERM stop it.
    NbdLocal {
        /// The backing file or block device.
        #[arg(long, value_name = "FILE")]
        backing: PathBuf,
        /// `host:port` (TCP) or an absolute path (unix socket).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// The export name clients ask for.
        #[arg(long, value_name = "NAME", default_value = "ublk-mirror")]
        export: String,
    },
}

fn main() -> ExitCode {
    eac_common::init_logging();
    let cli = Cli::parse();
    if let Cmd::NbdLocal {
        backing,
        listen,
        export,
    } = cli.cmd
    {
        return nbd_local(&backing, &listen, export);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-mirror: {}", error_chain(&e));
            let code = if e.needs_operator() { EXIT_USAGE } else { EXIT_TRANSIENT };
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

fn run(cli: Cli) -> ublk_mirror::Result<()> {
    match cli.cmd {
        Cmd::Features { json, control } => {
            let mut ctrl = Control::open_path(&control)?;
            let f = ctrl.features()?;
            if json {
                let v = serde_json::json!({
                    "control": control,
                    "features": f.bits(),
                    "names": f.names(),
                });
                println!("{v}");
            } else {
                println!("{}: ublk_drv features {:#x}", control.display(), f.bits());
                for n in f.names() {
                    println!("  {n}");
                }
            }
            Ok(())
        }
        Cmd::NbdLocal { .. } => unreachable!("handled in main"),
    }
}

/// `ublk-mirror nbd-local`: a LocalDisk behind the NBD export until SIGINT/SIGTERM.
fn nbd_local(backing: &std::path::Path, listen: &str, export: String) -> ExitCode {
    let fail = |code: i32, msg: String| {
        eprintln!("ublk-mirror: {msg}");
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_TRANSIENT, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        let disk = match ublk_mirror::LocalDisk::open(backing) {
            Ok(d) => std::sync::Arc::new(d),
            Err(e) => return fail(EXIT_USAGE, format!("cannot open {}: {e}", backing.display())),
        };
        let listener = match nbd::NbdListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(EXIT_USAGE, error_chain(&e)),
        };
        println!("{}", listener.url(&export));
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
                (Ok(mut i), Ok(mut t)) => tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} },
                _ => std::future::pending::<()>().await,
            }
        };
        nbd::serve(listener, export, disk, stop).await;
        ExitCode::SUCCESS
    })
}
