//! `ublk-mirror` — thin command line over the library.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use eac_common::{EXIT_TRANSIENT, EXIT_USAGE, error_chain};
use ublk_mirror::control::{self, Request};
use ublk_mirror::daemon::{self, Config, LinkConfig, Rate, StartRole};
use ublk_mirror::{BlockDev, CONTROL_PATH, Control, Error, IoError, IoResult, LocalDisk, UblkDevice, UblkOptions, nbd};

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
    /// Create the metadata file (superblock, activity log, dirty bitmap) of one side of a
    /// mirror. Both sides need the same --device-id; the side whose data is valid (the first
    /// primary) is created with --consistent and fully copied to the other on first contact.
    CreateMeta(CreateMeta),
    /// Run the mirror for one resource (primary or secondary) until SIGTERM.
    Run(Box<RunArgs>),
    /// Show the state of a running mirror.
    Status {
        /// The full status document as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make this side the primary. Refused while the peer is connected as primary, and for a
    /// copy whose resync did not finish unless --force.
    Promote {
        /// Promote even an inconsistent copy (failover of last resort; split brain likely).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Make this side the secondary (frontends stop, in-flight I/O completes first).
    Demote {
        #[command(flatten)]
        target: Target,
    },
    /// Resolve a split brain: on the copy to throw away run --discard-local (it becomes
    /// secondary and takes the peer's data for every region either side changed); on the
    /// survivor, --keep reconnects at once.
    Resolve {
        /// This copy's changes since the split are discarded.
        #[arg(long, conflicts_with = "keep", required_unless_present = "keep")]
        discard_local: bool,
        /// This copy survives.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Compare both copies by checksum in the background; mismatching regions are reported
    /// and resynced from the primary.
    Verify {
        /// Wait until the verify finished and print its result.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// The guest's owner is confirmed (`on_peer_loss = "freeze"`): writes held since the peer
    /// was lost complete, later ones go on without the peer (degraded) until it is back.
    ResumeIo {
        #[command(flatten)]
        target: Target,
    },
    /// Give a diskless primary a (new or repaired) local disk; it is resynced from the peer.
    AttachDisk {
        /// Default: the configured backing.
        #[arg(long, value_name = "FILE")]
        path: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Serve a local file or block device as /dev/ublkbN (no mirroring) until SIGTERM or
    /// SIGINT, then remove the device. Prints the device path on stdout once it exists, and
    /// on a clean stop one JSON line of request counters.
    UblkLocal {
        /// The backing file or block device (its size is the device's size).
        #[arg(long, value_name = "PATH")]
        backing: PathBuf,
        /// The device number N; by default the driver picks one.
        #[arg(long, value_name = "N")]
        id: Option<u32>,
        /// Take over device N (--id) whose server died, instead of creating one.
        #[arg(long, requires = "id")]
        recover: bool,
        /// Number of queues (one thread each).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = ublk_mirror::ublk::DEFAULT_DEPTH)]
        depth: u16,
        /// Largest request in KiB (a multiple of 4).
        #[arg(long, value_name = "KIB", default_value_t = ublk_mirror::ublk::DEFAULT_MAX_IO >> 10)]
        max_io_kib: u32,
        /// Fail I/O instead of holding it when this server dies (no --recover possible).
        #[arg(long)]
        no_recovery: bool,
        /// Testing: reads overlapping OFFSET:LEN (bytes) fail with EIO.
        #[arg(long, value_name = "OFFSET:LEN", hide = true)]
        fail_reads: Option<String>,
    },
    /// Delete a ublk device, e.g. one whose server was killed (held I/O then fails).
    UblkDel {
        /// The device number N.
        #[arg(long, value_name = "N")]
        id: u32,
    },
}

/// Which daemon to talk to.
#[derive(Debug, Args)]
struct Target {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "UBLK_MIRROR_SOCKET")]
    socket: Option<PathBuf>,
    /// Or its configuration file (the socket is taken from it).
    #[arg(long, value_name = "FILE", conflicts_with = "socket")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CreateMeta {
    /// The metadata file to create (never the backing itself).
    #[arg(long, value_name = "FILE")]
    meta: PathBuf,
    /// The device size in bytes (default: the size of --backing).
    #[arg(long, value_name = "BYTES", required_unless_present = "backing")]
    size: Option<u64>,
    /// The backing store, to take the size from.
    #[arg(long, value_name = "FILE")]
    backing: Option<PathBuf>,
    /// The mirror's device id, the same on both sides (hex or decimal; default: random,
    /// printed — pass it to the other side).
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,
    /// Dirty-bitmap granularity in bytes (power of two, 4096 … 1 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    region_size: u32,
    /// This side's data is valid (the first primary): it becomes the source of the first sync.
    #[arg(long)]
    consistent: bool,
    /// With --consistent: a data generation (hex) to start with. Giving both sides the same
    /// one declares them identical already (e.g. both zeroed) and skips the first full sync.
    #[arg(long, value_name = "HEX", requires = "consistent")]
    generation: Option<String>,
    /// Overwrite an existing metadata file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The configuration file (TOML). Without it, the flags below configure the daemon.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["resource", "role", "backing", "meta", "secret_file", "link"])]
    config: Option<PathBuf>,
    /// The resource name (the same on both sides).
    #[arg(long, required_unless_present = "config")]
    resource: Option<String>,
    /// This host's name (default: the hostname).
    #[arg(long)]
    host: Option<String>,
    /// The role to start in: primary or secondary.
    #[arg(long, required_unless_present = "config", value_parser = ["primary", "secondary"])]
    role: Option<String>,
    /// The backing file or block device.
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    backing: Option<PathBuf>,
    /// The metadata file (made by create-meta).
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    meta: Option<PathBuf>,
    /// The pool secret file.
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    secret_file: Option<PathBuf>,
    /// An availability link as LISTEN=PEER (ip:port each); once or twice.
    #[arg(long, value_name = "LISTEN=PEER", required_unless_present = "config")]
    link: Vec<String>,
    /// No answer from the peer for this long → degraded.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    peer_timeout_ms: u64,
    /// Resync rate limit in bytes/s (K, M, G suffixes; 0 = unlimited).
    #[arg(long, value_name = "RATE", default_value = "0")]
    resync_rate: String,
    /// What writes do when the peer is lost: continue (degraded at once) or freeze (held until
    /// `resume-io` or the peer is back).
    #[arg(long, value_name = "POLICY", default_value = "continue", value_parser = ["continue", "freeze"])]
    on_peer_loss: String,
    /// Serve the device over NBD while primary (host:port or an absolute unix socket path).
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Serve the device as /dev/ublkbN while primary (needs ublk_drv).
    #[arg(long)]
    ublk: bool,
    /// The ublk device number; a device left by a killed daemon is taken over.
    #[arg(long, value_name = "N", requires = "ublk")]
    ublk_id: Option<u32>,
    /// The control socket (default /run/eac/ublk-mirror/RESOURCE.sock).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
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
    let cli = match cli.cmd {
        Cmd::Features { .. } | Cmd::UblkLocal { .. } | Cmd::UblkDel { .. } => cli,
        other => return mirror_cmd(other),
    };
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
        Cmd::NbdLocal { .. }
        | Cmd::CreateMeta(_)
        | Cmd::Run(_)
        | Cmd::Status { .. }
        | Cmd::Promote { .. }
        | Cmd::Demote { .. }
        | Cmd::Resolve { .. }
        | Cmd::Verify { .. }
        | Cmd::ResumeIo { .. }
        | Cmd::AttachDisk { .. } => unreachable!("handled in main"),
        Cmd::UblkLocal {
            backing,
            id,
            recover,
            queues,
            depth,
            max_io_kib,
            no_recovery,
            fail_reads,
        } => {
            let disk = LocalDisk::open(&backing).map_err(|source| Error::Backing {
                path: backing.clone(),
                source,
            })?;
            let opts = UblkOptions {
                id,
                queues,
                depth,
                max_io: max_io_kib.saturating_mul(1024),
                recovery: !no_recovery,
            };
            let recover = recover.then_some(id).flatten();
            match fail_reads {
                None => serve(Arc::new(disk), opts, recover),
                Some(spec) => {
                    let (start, len) = parse_range(&spec)?;
                    serve(
                        Arc::new(FailReads {
                            inner: disk,
                            start,
                            len,
                        }),
                        opts,
                        recover,
                    )
                }
            }
        }
        Cmd::UblkDel { id } => {
            let mut ctrl = Control::open()?;
            ctrl.del_dev(id)?;
            println!("deleted /dev/ublkb{id}");
            Ok(())
        }
    }
}

/// Creates (or recovers) the device, serves it until SIGTERM/SIGINT, removes it.
fn serve<D: BlockDev>(disk: Arc<D>, opts: UblkOptions, recover: Option<u32>) -> ublk_mirror::Result<()> {
    let setup = |what: &str, source: std::io::Error| Error::Setup {
        what: what.to_owned(),
        source,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ublk-io")
        .enable_all()
        .build()
        .map_err(|e| setup("the tokio runtime", e))?;
    // Installed before the device exists, so an early SIGTERM still stops it cleanly.
    let (mut term, mut int) = rt
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
        })
        .map_err(|e| setup("signal handlers", e))?;
    let dev = match recover {
        Some(id) => UblkDevice::recover(disk, id, rt.handle().clone())?,
        None => UblkDevice::create(disk, opts, rt.handle().clone())?,
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", dev.block_path().display());
    let _ = out.flush();
    drop(out);
    let stop = dev.stop_handle();
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the device"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the device"),
        }
        match tokio::task::spawn_blocking(move || stop.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %error_chain(&e), "stopping the device failed"),
            Err(e) => tracing::error!(error = %e, "stopping the device failed"),
        }
    });
    let stats = dev.wait()?;
    println!("{}", serde_json::json!({ "stats": stats }));
    Ok(())
}

fn parse_range(spec: &str) -> ublk_mirror::Result<(u64, u64)> {
    let bad = || Error::InvalidArgument {
        detail: format!("--fail-reads {spec:?}: expected OFFSET:LEN in bytes"),
    };
    let (a, b) = spec.split_once(':').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

/// A backing store whose reads of one range fail with EIO (fault tests).
struct FailReads<D> {
    inner: D,
    start: u64,
    len: u64,
}

impl<D: BlockDev> BlockDev for FailReads<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: usize) -> IoResult<Bytes> {
        let end = offset.saturating_add(len as u64);
        if offset < self.start.saturating_add(self.len) && self.start < end {
            return Err(IoError::EIO);
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> IoResult<()> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> IoResult<()> {
        self.inner.write_zeroes(offset, len).await
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

fn exit(code: i32, msg: &str) -> ExitCode {
    eprintln!("ublk-mirror: {msg}");
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The mirror's subcommands (everything but `features` and `nbd-local`).
fn mirror_cmd(cmd: Cmd) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return exit(EXIT_TRANSIENT, &format!("cannot start the runtime: {e}")),
    };
    match cmd {
        Cmd::CreateMeta(a) => create_meta(a),
        Cmd::Run(a) => {
            let cfg = match run_config(*a) {
                Ok(c) => c,
                Err(e) => return exit(EXIT_USAGE, &error_chain(&e)),
            };
            match rt.block_on(daemon::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => exit(if e.is_usage() { EXIT_USAGE } else { EXIT_TRANSIENT }, &error_chain(&e)),
            }
        }
        Cmd::Status { json, target } => rt.block_on(async {
            let sock = match socket_of(&target) {
                Ok(s) => s,
                Err(e) => return exit(EXIT_USAGE, &e),
            };
            match control::request(&sock, &Request::Status).await {
                Ok(v) if json => {
                    println!("{v}");
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    print_status(&v);
                    ExitCode::SUCCESS
                }
                Err(e) => exit(EXIT_TRANSIENT, &error_chain(&e)),
            }
        }),
        Cmd::Promote { force, target } => simple(&rt, &target, Request::Promote { force }),
        Cmd::Demote { target } => simple(&rt, &target, Request::Demote),
        Cmd::Resolve {
            discard_local, target, ..
        } => simple(&rt, &target, Request::Resolve { discard_local }),
        Cmd::AttachDisk { path, target } => simple(&rt, &target, Request::AttachDisk { path }),
        Cmd::ResumeIo { target } => simple(&rt, &target, Request::ResumeIo),
        Cmd::Verify { wait, target } => rt.block_on(async {
            let sock = match socket_of(&target) {
                Ok(s) => s,
                Err(e) => return exit(EXIT_USAGE, &e),
            };
            if let Err(e) = control::request(&sock, &Request::Verify).await {
                return exit(EXIT_TRANSIENT, &error_chain(&e));
            }
            if !wait {
                println!("verify started");
                return ExitCode::SUCCESS;
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                match control::request(&sock, &Request::Status).await {
                    Ok(v) if v["verify"]["active"] == false => {
                        println!("{}", v["verify"]);
                        return if v["verify"]["last_error"].is_null() {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(EXIT_TRANSIENT as u8)
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return exit(EXIT_TRANSIENT, &error_chain(&e)),
                }
            }
        }),
        Cmd::Features { .. } | Cmd::NbdLocal { .. } | Cmd::UblkLocal { .. } | Cmd::UblkDel { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn simple(rt: &tokio::runtime::Runtime, target: &Target, req: Request) -> ExitCode {
    rt.block_on(async {
        let sock = match socket_of(target) {
            Ok(s) => s,
            Err(e) => return exit(EXIT_USAGE, &e),
        };
        match control::request(&sock, &req).await {
            Ok(v) => {
                println!("{}", v["message"].as_str().unwrap_or("ok"));
                ExitCode::SUCCESS
            }
            Err(control::ControlError::Failed(m)) => exit(EXIT_USAGE, &m),
            Err(control::ControlError::Transient(m)) => exit(EXIT_TRANSIENT, &m),
            Err(e) => exit(EXIT_TRANSIENT, &error_chain(&e)),
        }
    })
}

fn socket_of(t: &Target) -> Result<PathBuf, String> {
    match (&t.socket, &t.config) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(c)) => Config::load(c).map(|c| c.control_socket()).map_err(|e| error_chain(&e)),
        (None, None) => Err("which daemon? give --socket PATH or --config FILE (or UBLK_MIRROR_SOCKET)".into()),
    }
}

fn run_config(a: RunArgs) -> Result<Config, daemon::DaemonError> {
    if let Some(path) = &a.config {
        let mut c = Config::load(path)?;
        if a.nbd.is_some() {
            c.nbd = a.nbd;
        }
        if a.control_socket.is_some() {
            c.control_socket = a.control_socket;
        }
        return Ok(c);
    }
    let bad = |m: String| daemon::DaemonError::Config(m);
    let mut links = Vec::new();
    for l in &a.link {
        let (listen, peer) = l.split_once('=').ok_or_else(|| {
            bad(format!(
                "--link {l}: expected LISTEN=PEER, e.g. 10.250.2.1:7789=10.250.2.2:7789"
            ))
        })?;
        links.push(LinkConfig {
            listen: listen.parse().map_err(|e| bad(format!("--link {l}: {listen}: {e}")))?,
            peer: peer.parse().map_err(|e| bad(format!("--link {l}: {peer}: {e}")))?,
        });
    }
    let c = Config {
        resource: a.resource.unwrap_or_default(),
        host: a.host,
        role: if a.role.as_deref() == Some("primary") {
            StartRole::Primary
        } else {
            StartRole::Secondary
        },
        backing: a.backing.unwrap_or_default(),
        meta: a.meta.unwrap_or_default(),
        pool_secret_file: a.secret_file.unwrap_or_default(),
        control_socket: a.control_socket,
        peer_timeout_ms: a.peer_timeout_ms,
        reconnect_interval_ms: 1000,
        resync_rate: Rate(daemon::parse_rate(&a.resync_rate).map_err(bad)?),
        on_peer_loss: if a.on_peer_loss == "freeze" {
            ublk_mirror::engine::PeerLossPolicy::Freeze
        } else {
            ublk_mirror::engine::PeerLossPolicy::Continue
        },
        nbd: a.nbd,
        ublk: a.ublk,
        ublk_id: a.ublk_id,
        links,
    };
    c.validate().map_err(bad)?;
    Ok(c)
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok().or_else(|| u64::from_str_radix(s, 16).ok()),
    }
}

fn create_meta(a: CreateMeta) -> ExitCode {
    use ublk_mirror::engine::{CreateMetaOptions, create_meta_file};
    let size = match (a.size, &a.backing) {
        (Some(s), _) => s,
        (None, Some(b)) => match ublk_mirror::LocalDisk::open(b) {
            Ok(d) => ublk_mirror::BlockDev::size(&d),
            Err(e) => return exit(EXIT_USAGE, &format!("cannot open {}: {e}", b.display())),
        },
        (None, None) => return exit(EXIT_USAGE, "give --size or --backing"),
    };
    let device_id = match a.device_id.as_deref().map(parse_u64) {
        Some(None) => return exit(EXIT_USAGE, "--device-id: expected a number (hex with 0x, or decimal)"),
        Some(Some(0)) => return exit(EXIT_USAGE, "--device-id must not be 0"),
        Some(Some(id)) => id,
        None => ublk_mirror::engine::random_u64(),
    };
    let generation = match a.generation.as_deref().map(parse_u64) {
        Some(None) | Some(Some(0..=15)) => {
            return exit(EXIT_USAGE, "--generation: expected a hex number ≥ 0x10");
        }
        Some(Some(g)) => Some(g),
        None => None,
    };
    if a.meta.exists() && !a.force {
        return exit(
            EXIT_USAGE,
            &format!("{} exists; --force overwrites it", a.meta.display()),
        );
    }
    if a.backing.as_ref().is_some_and(|b| b == &a.meta) {
        return exit(EXIT_USAGE, "the metadata must not be the backing store");
    }
    if a.force
        && a.meta.exists()
        && let Err(e) = std::fs::remove_file(&a.meta)
    {
        return exit(EXIT_USAGE, &format!("cannot remove {}: {e}", a.meta.display()));
    }
    let opts = CreateMetaOptions {
        size,
        region_size: a.region_size,
        device_id,
        consistent: a.consistent,
        generation,
    };
    match create_meta_file(&a.meta, &opts) {
        Ok(()) => {
            println!(
                "{}: {} bytes, region {} bytes, device id {:#x}{}",
                a.meta.display(),
                size,
                a.region_size,
                device_id,
                if a.consistent { ", consistent" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => exit(EXIT_USAGE, &error_chain(&e)),
    }
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = n as f64;
    let mut u = 0;
    while f >= 1024.0 && u < units.len() - 1 {
        f /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{f:.1} {}", units[u])
    }
}

fn print_status(v: &serde_json::Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_owned();
    println!(
        "{} on {}: {}, {}, disk {}",
        s("resource"),
        s("host"),
        s("role"),
        s("sync"),
        s("disk")
    );
    let links: Vec<String> = v["links"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    format!(
                        "link {} {}",
                        l["link"],
                        if l["connected"] == true { "up" } else { "down" }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "  peer {}: {} ({})",
        v["peer"].as_str().unwrap_or("-"),
        s("connection"),
        links.join(", ")
    );
    if let Some(r) = v["refused"].as_object() {
        println!("  REFUSED: {}", r.get("reason").and_then(|x| x.as_str()).unwrap_or("?"));
    }
    println!("  dirty {}", human_bytes(v["dirty_bytes"].as_u64().unwrap_or(0)));
    let r = &v["resync"];
    if r["active"] == true {
        println!(
            "  resync {}: {:.1} % ({} of {})",
            r["direction"].as_str().unwrap_or(""),
            r["percent"].as_f64().unwrap_or(0.0),
            human_bytes(r["done_bytes"].as_u64().unwrap_or(0)),
            human_bytes(r["dirty_bytes_at_start"].as_u64().unwrap_or(0))
        );
    }
    if let Some(u) = v["nbd"].as_str() {
        println!("  nbd {u}");
    }
}
