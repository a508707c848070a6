//! `ublk-mirror` — thin command line over the library.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use eac_common::{EXIT_TRANSIENT, EXIT_USAGE, error_chain};
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
