//! `eac` — the administrator's command. Output for people by default, `--json` for scripts.
#![forbid(unsafe_code)]

mod check;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "eac", version, about = "Dialable availability for KVM/libvirt hosts")]
struct Cli {
    /// Machine-readable output (one JSON document).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This host.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Check that this host can run the stack (BPF, io_uring, ublk, libvirt) and say what
    /// to fix. Exits 0 when every check passes, 1 otherwise.
    Check {
        /// libvirtd's unix socket.
        #[arg(long, default_value = "/run/libvirt/libvirt-sock")]
        libvirt_socket: PathBuf,
    },
}

fn main() {
    eac_common::init_logging();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Host {
            cmd: HostCmd::Check { libvirt_socket },
        } => {
            let checks = check::run(&check::Probe {
                root: std::path::Path::new("/"),
                libvirt_socket: &libvirt_socket,
                euid_is_root: is_root(),
            });
            if cli.json {
                println!("{}", serde_json::json!({ "checks": checks }));
            } else {
                for c in &checks {
                    println!(
                        "{:4} {:9} {:24} {}",
                        if c.ok { "ok" } else { "FAIL" },
                        c.name,
                        c.needed_for,
                        c.detail
                    );
                    if let Some(fix) = c.fix {
                        println!("{:39}fix: {fix}", "");
                    }
                }
            }
            if checks.iter().all(|c| c.ok) {
                0
            } else {
                eac_common::EXIT_TRANSIENT
            }
        }
    };
    std::process::exit(code);
}

fn is_root() -> bool {
    // /proc/self/status "Uid: real effective ..." — avoids unsafe geteuid().
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
