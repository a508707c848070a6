//! `ublk-mirror` — thin command line over the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eac_common::{EXIT_TRANSIENT, EXIT_USAGE, error_chain};
use ublk_mirror::{CONTROL_PATH, Control};

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
}

fn main() -> ExitCode {
    eac_common::init_logging();
    let cli = Cli::parse();
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
    }
}
