//! ublk-mirror — one userspace block device per guest disk, mirrored synchronously to the
//! partner host.
//!
//! # Why the ublk layer is written directly on the `io-uring` crate
//!
//! ublk is a small protocol: a few control commands on `/dev/ublk-control` and, per queue,
//! FETCH / COMMIT_AND_FETCH commands on `/dev/ublkcN`, all as `IORING_OP_URING_CMD` with
//! 128-byte SQEs. We implement it ourselves on `io-uring` 0.7 instead of using `libublk`
//! (0.4.8, MIT/Apache, which works on the 6.12 guest) because:
//!
//! - **The mirror owns its I/O path.** A write completes only when it is durable locally
//!   *and* on the partner; each ublk request is handed to the mirror (a [`BlockDev`] on our
//!   tokio runtime) and committed with its result, with our own completion bookkeeping,
//!   buffer ownership and error mapping (every request is always completed, with a negative
//!   errno if need be). A library that owns the queue loop and its executor stands between
//!   us and that path.
//! - **No libclang at build time.** `libublk` generates its ABI with bindgen. Our ABI is a
//!   hand transcription of one uapi header ([`sys`], Linux 6.12) with size and encoding
//!   checks, so the workspace builds with nothing but rustc.
//! - **Only what the 6.12 kernel has.** We use the plain copy path (or USER_COPY) and
//!   USER_RECOVERY; no zero copy, quiesce or resize, so the layer stays small.
//!
//! (`rublk` is GPL and is not a source for this code; `libublk` was read for facts only.)
//!
//! Modules: [`sys`] — the kernel ABI; [`ctrl`] — the control device (features, device
//! lifecycle, recovery); [`ublk`] — the ublk frontend serving any [`BlockDev`] as
//! `/dev/ublkbN`; [`dev`] — the block-device interface and the local backing store; [`nbd`] —
//! the NBD export of any [`BlockDev`]; [`meta`] — the metadata file (bitmap, activity log);
//! [`genid`] — generation identifiers; `conflict` — overlapping writes in flight, serialized; [`proto`] — the replication protocol; [`engine`] — the
//! mirror (primary, [`Mirror`]); [`replica`] — the secondary; [`daemon`] / [`control`] — the
//! process and its control socket.

mod conflict;
pub mod control;
pub mod ctrl;
pub mod daemon;
pub mod dev;
pub mod engine;
pub mod genid;
pub mod meta;
pub mod nbd;
pub mod proto;
pub mod replica;
pub mod sys;
pub mod ublk;

use std::io;
use std::path::PathBuf;

pub use ctrl::{CONTROL_PATH, Control, Features};
pub use dev::{BlockDev, IoError, IoResult, LocalDisk};
pub use engine::{Mirror, MirrorConfig};
pub use replica::Replica;
pub use ublk::{StopHandle, UblkDevice, UblkOptions, UblkStats};

/// Everything that can fail in this crate. Any variant maps to a negative errno
/// ([`Error::to_errno`]) so a block request can always be completed with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/ublk-control` does not exist.
    #[error(
        "{} is missing; ublk_drv is not loaded: modprobe ublk_drv (kernel ≥ 6.0 with CONFIG_BLK_DEV_UBLK)",
        path.display()
    )]
    DriverNotLoaded { path: PathBuf },
    /// A ublk device node could not be opened (other than it not existing).
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating the io_uring failed (kernel without io_uring, io_uring disabled, memlock).
    #[error("cannot create an io_uring with {entries} SQE128 entries")]
    RingSetup {
        entries: u32,
        #[source]
        source: io::Error,
    },
    /// `io_uring_enter` failed while submitting or waiting for a command.
    #[error("io_uring_enter failed for {op}")]
    Submit {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The submission queue had no free entry.
    #[error("io_uring submission queue is full ({op})")]
    QueueFull { op: &'static str },
    /// The driver completed a command with a negative result.
    #[error("ublk_drv rejected {op}")]
    Command {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The driver answered with something this code does not understand.
    #[error("unexpected reply to {op}: {detail}")]
    Protocol { op: &'static str, detail: String },
    /// An option or request the caller passed cannot work (bad configuration).
    #[error("invalid argument: {detail}")]
    InvalidArgument { detail: String },
    /// The backing store could not be opened.
    #[error("cannot open the backing store {}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A resource a ublk queue needs could not be set up (mmap, eventfd, thread).
    #[error("cannot set up {what}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A device cannot be taken over by this server (`--recover`).
    #[error("cannot recover ublk device {id}: {detail}")]
    Recovery { id: u32, detail: String },
}

impl Error {
    /// The negative errno that describes this failure, for completing a block request
    /// (`ublksrv_io_cmd.result`) or a uring command. Never 0.
    pub fn to_errno(&self) -> i32 {
        let pos = match self {
            Error::DriverNotLoaded { .. } => libc::ENODEV,
            Error::Open { source, .. }
            | Error::RingSetup { source, .. }
            | Error::Submit { source, .. }
            | Error::Command { source, .. }
            | Error::Backing { source, .. }
            | Error::Setup { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::QueueFull { .. } => libc::EAGAIN,
            Error::Protocol { .. } => libc::EPROTO,
            Error::InvalidArgument { .. } => libc::EINVAL,
            Error::Recovery { .. } => libc::EBUSY,
        };
        if pos > 0 { -pos } else { -libc::EIO }
    }

    /// True when retrying (or restarting the process) cannot help until an administrator
    /// acts: the driver is missing or we lack the privilege. Binaries exit with
    /// `EXIT_USAGE` then, `EXIT_TRANSIENT` otherwise.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            Error::DriverNotLoaded { .. }
                | Error::InvalidArgument { .. }
                | Error::Backing { .. }
                | Error::Recovery { .. }
        ) || matches!(-self.to_errno(), libc::EPERM | libc::EACCES)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_negative_errno() {
        let errs = [
            Error::DriverNotLoaded {
                path: CONTROL_PATH.into(),
            },
            Error::Open {
                path: "/x".into(),
                source: io::Error::from_raw_os_error(libc::EACCES),
            },
            Error::RingSetup {
                entries: 4,
                source: io::Error::other("no raw errno"),
            },
            Error::Submit {
                op: "GET_FEATURES",
                source: io::Error::from_raw_os_error(libc::EINTR),
            },
            Error::QueueFull { op: "GET_FEATURES" },
            Error::Command {
                op: "ADD_DEV",
                source: io::Error::from_raw_os_error(libc::EEXIST),
            },
            Error::Protocol {
                op: "GET_FEATURES",
                detail: "short".into(),
            },
            Error::InvalidArgument {
                detail: "depth 0".into(),
            },
            Error::Backing {
                path: "/missing".into(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            },
            Error::Setup {
                what: "queue 0 buffers".into(),
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            },
            Error::Recovery {
                id: 3,
                detail: "not started".into(),
            },
        ];
        let want = [
            -libc::ENODEV,
            -libc::EACCES,
            -libc::EIO,
            -libc::EINTR,
            -libc::EAGAIN,
            -libc::EEXIST,
            -libc::EPROTO,
            -libc::EINVAL,
            -libc::ENOENT,
            -libc::ENOMEM,
            -libc::EBUSY,
        ];
        for (e, w) in errs.iter().zip(want) {
            assert_eq!(e.to_errno(), w, "{e}");
        }
        assert!(errs[0].needs_operator());
        assert!(errs[1].needs_operator());
        assert!(!errs[5].needs_operator());
        // Bad configuration: do not restart.
        assert!(errs[7].needs_operator() && errs[8].needs_operator() && errs[10].needs_operator());
        assert!(!errs[9].needs_operator());
    }

    #[test]
    fn missing_driver_message_tells_the_operator_what_to_do() {
        let e = Error::DriverNotLoaded {
            path: CONTROL_PATH.into(),
        };
        let m = e.to_string();
        assert!(m.contains("/dev/ublk-control"), "{m}");
        assert!(
            m.contains("ublk_drv is not loaded: modprobe ublk_drv (kernel ≥ 6.0 with CONFIG_BLK_DEV_UBLK)"),
            "{m}"
        );
    }
}

/// Captures this thread's log output in tests (a current-thread runtime keeps spawned tasks
/// on the test's thread, so their lines are captured too).
#[cfg(test)]
pub(crate) mod test_log {
    use std::sync::{Arc, Mutex};

    /// The captured text.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// The lines at `level` ("WARN", "INFO", …).
        pub(crate) fn lines(&self, level: &str) -> Vec<String> {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            text.lines()
                .filter(|l| l.split_whitespace().nth(1) == Some(level))
                .map(str::to_owned)
                .collect()
        }
    }

    /// Captures every line logged on this thread until the guard is dropped.
    pub(crate) fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
        let c = Captured::default();
        let w = c.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        (c, tracing::subscriber::set_default(sub))
    }
}
