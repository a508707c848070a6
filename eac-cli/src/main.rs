//! `eac` — the administrator's command. Output for people by default, `--json` for scripts.
//!
//! Exit codes: 0 done; 64 the request was refused or is wrong (fix the command or the pool:
//! retrying will not help); 1 a transient failure (controller unreachable, peer unreachable:
//! retry may help).
#![forbid(unsafe_code)]

mod check;
mod ctl;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "eac", version, about = "Dialable availability for KVM/libvirt hosts")]
struct Cli {
    /// Machine-readable output (one JSON document; `events --follow`: one per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct TargetArgs {
    /// The local controller's API socket (root only).
    #[arg(long, global = true, env = "EAC_SOCKET", default_value = "/run/eac/controller.sock")]
    socket: PathBuf,
    /// Talk to a controller over TCP instead (its `api_listen`, e.g. 10.250.0.1:7411);
    /// needs --secret-file.
    #[arg(long, global = true, value_name = "ADDR", requires = "secret_file")]
    connect: Option<SocketAddr>,
    /// The pool secret file (the controllers' `pool_secret_file`), for --connect.
    #[arg(long, global = true, value_name = "FILE")]
    secret_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The pool: members, redundancy, configuration, plan summary.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Hosts.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Guests and their protection.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// The failover plan: where every protected guest restarts after any
    /// host-failures-to-tolerate host failures, and what does not fit.
    Plan,
    /// Events (failures detected, decisions, actions): the recent ones, or --follow.
    Events {
        /// Keep printing events as they happen (Ctrl-C ends).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N events (with --follow: print them first).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Members, their state per heartbeat channel, redundancy, configuration epoch, plan.
    Status,
    /// Change the pool's policy (applied on every live host, or refused).
    Policy {
        /// Every protected guest must still have a place after any N host failures.
        #[arg(long, value_name = "N")]
        host_failures_to_tolerate: u32,
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
    /// The pool's hosts: state, capacity in use, heartbeat channels.
    List,
}

#[derive(Subcommand)]
enum VmCmd {
    /// A tree: host → guests, with protection level, state and health.
    List,
    /// Protect a guest defined on one of the pool's hosts. Level 1: restarted on a survivor
    /// when its host dies, restarted in place when it crashes. Level 2 (component fault
    /// tolerance) is refused until ublk-mirror and netpair run on both hosts. Admission
    /// control refuses a protection that would break the failover plan.
    Protect {
        /// The libvirt domain name.
        name: String,
        /// 1 = restart; 2 = component fault tolerance.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        level: u8,
    },
    /// Stop protecting a guest (it keeps running where it is).
    Unprotect { name: String },
}

fn main() {
    eac_common::init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help / --version print and succeed; a usage error exits 64 (EX_USAGE).
            let code = if e.use_stderr() { eac_common::EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let target = match (&cli.target.connect, &cli.target.secret_file) {
        (Some(addr), Some(f)) => ctl::Target::Tcp {
            addr: *addr,
            secret_file: f.clone(),
        },
        _ => ctl::Target::Unix(cli.target.socket.clone()),
    };
    let cmd = match cli.cmd {
        Cmd::Host {
            cmd: HostCmd::Check { libvirt_socket },
        } => std::process::exit(host_check(&libvirt_socket, cli.json)),
        Cmd::Host { cmd: HostCmd::List } => ctl::Command::HostList,
        Cmd::Pool { cmd: PoolCmd::Status } => ctl::Command::PoolStatus,
        Cmd::Pool {
            cmd: PoolCmd::Policy {
                host_failures_to_tolerate,
            },
        } => ctl::Command::PoolPolicy {
            host_failures_to_tolerate,
        },
        Cmd::Vm { cmd: VmCmd::List } => ctl::Command::VmList,
        Cmd::Vm {
            cmd: VmCmd::Protect { name, level },
        } => ctl::Command::VmProtect { name, level },
        Cmd::Vm {
            cmd: VmCmd::Unprotect { name },
        } => ctl::Command::VmUnprotect { name },
        Cmd::Plan => ctl::Command::Plan,
        Cmd::Events { follow, limit } => ctl::Command::Events { follow, limit },
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eac: cannot start: {e}");
            std::process::exit(eac_common::EXIT_TRANSIENT);
        }
    };
    let json = cli.json;
    let result = rt.block_on(async move {
        tokio::select! {
            r = ctl::run(&target, cmd, json) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    if let Err(f) = result {
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": { "message": f.message, "hint": f.hint, "exit": f.code } })
            );
        }
        eprintln!("eac: {}", f.message);
        if let Some(h) = f.hint.filter(|h| !h.is_empty()) {
            eprintln!("hint: {h}");
        }
        std::process::exit(f.code);
    }
}

fn host_check(libvirt_socket: &std::path::Path, json: bool) -> i32 {
    let checks = check::run(&check::Probe {
        root: std::path::Path::new("/"),
        libvirt_socket,
        euid_is_root: is_root(),
    });
    if json {
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
