//! The ublk control device, `/dev/ublk-control`: one io_uring with 128-byte SQEs on which
//! control commands (`UBLK_U_CMD_*`) are issued one at a time as `IORING_OP_URING_CMD`.
//!
//! Control commands are rare and slow (the driver runs most of them from an io-wq worker),
//! so this ring is synchronous: submit one command, wait for its completion, reap it.
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::sys::{self, Plain, ublk_params, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info};
use crate::{Error, Result};

/// Where ublk_drv puts its control node.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Control commands are issued one at a time; a few entries are plenty.
const RING_ENTRIES: u32 = 4;

/// The feature bitmask `UBLK_U_CMD_GET_FEATURES` returns (`UBLK_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// The raw bitmask.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True when every bit of `flags` (`sys::UBLK_F_*`) is advertised.
    pub const fn contains(self, flags: u64) -> bool {
        self.0 & flags == flags
    }

    /// Bits this code has no name for (features of kernels newer than 6.12).
    pub fn unknown(self) -> u64 {
        let known = sys::FEATURE_NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
        self.0 & !known
    }

    /// Names of the advertised features in bit order, as in the header minus `UBLK_F_`;
    /// bits unknown to this build are named `BIT<n>`.
    pub fn names(self) -> Vec<String> {
        (0..64)
            .map(|i| 1u64 << i)
            .filter(|bit| self.0 & bit != 0)
            .map(|bit| match sys::FEATURE_NAMES.iter().find(|(b, _)| *b == bit) {
                Some((_, name)) => (*name).to_owned(),
                None => format!("BIT{}", bit.trailing_zeros()),
            })
            .collect()
    }
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x} ({})", self.0, self.names().join(" "))
    }
}

/// An open `/dev/ublk-control` with its control ring.
pub struct Control {
    // Field order matters: the ring is dropped (closed) before the device file.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    path: PathBuf,
    next_user_data: u64,
    /// Set when a command may still be in the kernel's hands after an error; the ring is
    /// then never used again (a later `io_uring_enter` could submit a stale SQE).
    broken: bool,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("path", &self.path)
            .field("fd", &self.file.as_raw_fd())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Opens [`CONTROL_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(CONTROL_PATH)
    }

    /// Opens a control node at `path` (tests point this at missing or wrong files).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                // No node, or a stale node without a driver behind it.
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Error::DriverNotLoaded { path: path.clone() },
                _ => Error::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(RING_ENTRIES)
            .map_err(|source| Error::RingSetup {
                entries: RING_ENTRIES,
                source,
            })?;
        tracing::debug!(path = %path.display(), "opened ublk control device");
        Ok(Self {
            ring,
            file,
            path,
            next_user_data: 1,
            broken: false,
        })
    }

    /// The path this control device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `UBLK_U_CMD_GET_FEATURES`: what this ublk_drv supports (kernel ≥ 6.5).
    pub fn features(&mut self) -> Result<Features> {
        const OP: &str = "GET_FEATURES";
        let header = ublksrv_ctrl_cmd {
            // The driver answers GET_FEATURES before looking a device up.
            dev_id: u32::MAX,
            queue_id: u16::MAX,
            ..Default::default()
        };
        let buf = vec![0u8; usize::from(sys::UBLK_FEATURES_LEN)];
        let (res, buf) = self.command_with_buf(OP, sys::UBLK_U_CMD_GET_FEATURES, header, buf)?;
        if res != 0 {
            return Err(Error::Protocol {
                op: OP,
                detail: format!("result {res}, expected 0"),
            });
        }
        let bytes: [u8; 8] = buf.as_slice().try_into().map_err(|_| Error::Protocol {
            op: OP,
            detail: format!("{} byte buffer", buf.len()),
        })?;
        let features = Features(u64::from_ne_bytes(bytes));
        tracing::debug!(%features, "ublk_drv features");
        Ok(features)
    }

    /// `UBLK_U_CMD_ADD_DEV`: creates a device (and its `/dev/ublkcN`) from `info`; `info.dev_id`
    /// is the wanted id or `u32::MAX` for any. Returns the kernel's view: the id it chose,
    /// the flags it accepted (unsupported ones cleared, `CMD_IOCTL_ENCODE` and
    /// `URING_CMD_COMP_IN_TASK` added), `nr_hw_queues` capped at the CPU count and
    /// `max_io_buf_bytes` rounded down to the page size.
    pub fn add_dev(&mut self, info: &ublksrv_ctrl_dev_info) -> Result<ublksrv_ctrl_dev_info> {
        const OP: &str = "ADD_DEV";
        let header = ublksrv_ctrl_cmd {
            dev_id: info.dev_id,
            queue_id: u16::MAX,
            ..Default::default()
        };
        let (_, buf) = self.command_with_buf(OP, sys::UBLK_U_CMD_ADD_DEV, header, info.to_bytes())?;
        let out = ublksrv_ctrl_dev_info::from_bytes(&buf).ok_or_else(|| short_reply(OP, buf.len()))?;
        tracing::debug!(
            dev_id = out.dev_id,
            queues = out.nr_hw_queues,
            depth = out.queue_depth,
            max_io = out.max_io_buf_bytes,
            flags = format_args!("{:#x}", out.flags),
            "ublk device added"
        );
        Ok(out)
    }

    /// `UBLK_U_CMD_GET_DEV_INFO`: the device's description, including its state
    /// (`sys::UBLK_S_DEV_*`) and the pid of its server.
    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        const OP: &str = "GET_DEV_INFO";
        let buf = ublksrv_ctrl_dev_info::default().to_bytes();
        let (_, buf) = self.command_with_buf(OP, sys::UBLK_U_CMD_GET_DEV_INFO, device_header(dev_id), buf)?;
        ublksrv_ctrl_dev_info::from_bytes(&buf).ok_or_else(|| short_reply(OP, buf.len()))
    }

    /// `UBLK_U_CMD_SET_PARAMS`: size, limits and attributes; only before START_DEV.
    pub fn set_params(&mut self, dev_id: u32, params: &ublk_params) -> Result<()> {
        let mut p = *params;
        p.len = size_of::<ublk_params>() as u32;
        self.command_with_buf(
            "SET_PARAMS",
            sys::UBLK_U_CMD_SET_PARAMS,
            device_header(dev_id),
            p.to_bytes(),
        )?;
        Ok(())
    }

    /// `UBLK_U_CMD_GET_PARAMS`: the parameters the device was started with (plus
    /// `UBLK_PARAM_TYPE_DEVT`, filled in by the kernel).
    pub fn get_params(&mut self, dev_id: u32) -> Result<ublk_params> {
        const OP: &str = "GET_PARAMS";
        let p = ublk_params {
            len: size_of::<ublk_params>() as u32,
            ..Default::default()
        };
        let (_, buf) = self.command_with_buf(OP, sys::UBLK_U_CMD_GET_PARAMS, device_header(dev_id), p.to_bytes())?;
        ublk_params::from_bytes(&buf).ok_or_else(|| short_reply(OP, buf.len()))
    }

    /// `UBLK_U_CMD_START_DEV`: waits until every queue has fetched all its tags, then adds
    /// `/dev/ublkbN` (reading the partition table through the queues: they must be served
    /// while this blocks). `pid` is recorded as the device's server.
    pub fn start_dev(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        self.command_no_buf("START_DEV", sys::UBLK_U_CMD_START_DEV, dev_id, pid_data(pid))
    }

    /// `UBLK_U_CMD_STOP_DEV`: removes `/dev/ublkbN` (in-flight requests are completed by the
    /// queues first) and aborts every fetched command with `UBLK_IO_RES_ABORT`. A no-op on a
    /// device that is not started.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.command_no_buf("STOP_DEV", sys::UBLK_U_CMD_STOP_DEV, dev_id, 0)
    }

    /// `UBLK_U_CMD_DEL_DEV`: deletes the device and waits until the id is free, which needs
    /// every `/dev/ublkcN` file and mapping closed first — or this blocks.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        self.command_no_buf("DEL_DEV", sys::UBLK_U_CMD_DEL_DEV, dev_id, 0)
    }

    /// `UBLK_U_CMD_START_USER_RECOVERY`: prepares a device whose server died for a new one
    /// (`EBUSY` while the old server's files are still open or the queue is not quiesced
    /// yet; `EINVAL` without `UBLK_F_USER_RECOVERY`).
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.command_no_buf("START_USER_RECOVERY", sys::UBLK_U_CMD_START_USER_RECOVERY, dev_id, 0)
    }

    /// `UBLK_U_CMD_END_USER_RECOVERY`: waits until every queue of the new server has fetched
    /// its tags, then releases the held I/O to it.
    pub fn end_user_recovery(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        self.command_no_buf(
            "END_USER_RECOVERY",
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            dev_id,
            pid_data(pid),
        )
    }

    /// A device command without a buffer; `data` goes into `data[0]`.
    fn command_no_buf(&mut self, op: &'static str, cmd_op: u32, dev_id: u32, data: u64) -> Result<()> {
        let header = ublksrv_ctrl_cmd {
            data: [data],
            ..device_header(dev_id)
        };
        // SAFETY: `addr` is 0 and `len` 0: the command references no user memory.
        unsafe { self.submit_and_reap(op, cmd_op, &header) }?;
        tracing::debug!(op, dev_id, "ublk control command done");
        Ok(())
    }

    /// Issues `cmd_op` with `buf` as the command's data buffer (`addr`/`len` of the header
    /// are set from it) and returns the command's result and the buffer.
    ///
    /// The buffer is moved in, not borrowed, so this function decides its lifetime: it is
    /// returned once the completion is reaped, and leaked if the command may still be in
    /// flight after an error (the kernel could otherwise write into freed memory).
    pub fn command_with_buf(
        &mut self,
        op: &'static str,
        cmd_op: u32,
        mut header: ublksrv_ctrl_cmd,
        mut buf: Vec<u8>,
    ) -> Result<(i32, Vec<u8>)> {
        header.len = u16::try_from(buf.len()).map_err(|_| Error::Protocol {
            op,
            detail: format!("{} byte buffer does not fit the 16-bit length", buf.len()),
        })?;
        header.addr = buf.as_mut_ptr() as u64;
        // SAFETY: `header.addr`/`len` describe `buf`, which this function owns and does not
        // touch while the command runs. On success the completion has been reaped, so the
        // kernel is done with it; on failure with the ring marked broken the command may
        // still be in flight, and the buffer is leaked below instead of freed.
        match unsafe { self.submit_and_reap(op, cmd_op, &header) } {
            Ok(res) => Ok((res, buf)),
            Err(e) => {
                if self.broken {
                    std::mem::forget(buf);
                }
                Err(e)
            }
        }
    }

    /// Submits one control command and waits until its completion is reaped; returns the
    /// completion's result (≥ 0), or [`Error::Command`] with the driver's errno.
    ///
    /// # Safety
    ///
    /// If `header.addr` is non-zero it must point to `header.len` bytes that stay valid
    /// and are not otherwise accessed until the kernel has completed the command. The
    /// kernel reads and writes that memory asynchronously through the io_uring; the
    /// borrow checker cannot see its pointer. The command is complete when this function
    /// returns `Ok` or returns `Err` with the ring *not* broken. If it returns `Err` and
    /// [`Control::is_broken`] is then true, the command may still be in flight: the
    /// buffer must never be freed or reused (leak it).
    pub unsafe fn submit_and_reap(&mut self, op: &'static str, cmd_op: u32, header: &ublksrv_ctrl_cmd) -> Result<i32> {
        if self.broken {
            return Err(Error::Submit {
                op,
                source: io::Error::other("control ring unusable after an earlier failure"),
            });
        }
        let user_data = self.next_user_data;
        self.next_user_data = self.next_user_data.wrapping_add(1).max(1);
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(sys::cmd_bytes(header))
            .build()
            .user_data(user_data);
        // SAFETY: the SQE refers to `self.file` (open for as long as `self`, and the ring
        // is closed first on drop) and to the caller's buffer, which the caller keeps
        // valid until completion per this function's contract.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return Err(Error::QueueFull { op });
        }
        // From here on the kernel may hold the buffer: any failure marks the ring broken.
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                    continue;
                }
                Err(source) => {
                    self.broken = true;
                    return Err(Error::Submit { op, source });
                }
            }
            let Some(cqe) = self.ring.completion().next() else {
                continue;
            };
            if cqe.user_data() != user_data {
                self.broken = true;
                return Err(Error::Protocol {
                    op,
                    detail: format!(
                        "completion for user_data {} while waiting for {user_data}",
                        cqe.user_data()
                    ),
                });
            }
            let res = cqe.result();
            tracing::trace!(op, cmd_op = format_args!("{cmd_op:#x}"), res, "ublk control command");
            return if res < 0 {
                Err(Error::Command {
                    op,
                    source: io::Error::from_raw_os_error(-res),
                })
            } else {
                Ok(res)
            };
        }
    }

    /// True when a command may still be in the kernel's hands after an error; the control
    /// ring then refuses further commands. Open a new [`Control`].
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// The header of a command addressed to device `dev_id` (not to one of its queues).
fn device_header(dev_id: u32) -> ublksrv_ctrl_cmd {
    ublksrv_ctrl_cmd {
        dev_id,
        queue_id: u16::MAX,
        ..Default::default()
    }
}

/// `data[0]` carrying a pid, as START_DEV / END_USER_RECOVERY read it (`(int)data[0]`).
fn pid_data(pid: i32) -> u64 {
    u64::from(pid.max(0).unsigned_abs())
}

fn short_reply(op: &'static str, len: usize) -> Error {
    Error::Protocol {
        op,
        detail: format!("{len} byte reply is too short"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decode_the_6_12_driver_bitmask() {
        // What the Debian 6.12.107 kernel's ublk_drv returns (notes/ublk-guest.md).
        let f = Features(0x1fe);
        assert_eq!(
            f.names(),
            [
                "URING_CMD_COMP_IN_TASK",
                "NEED_GET_DATA",
                "USER_RECOVERY",
                "USER_RECOVERY_REISSUE",
                "UNPRIVILEGED_DEV",
                "CMD_IOCTL_ENCODE",
                "USER_COPY",
                "ZONED",
            ]
        );
        assert!(f.contains(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_COPY));
        assert!(!f.contains(sys::UBLK_F_SUPPORT_ZERO_COPY));
        assert_eq!(f.unknown(), 0);
        assert_eq!(f.to_string().split_once(' ').unwrap().0, "0x1fe");
    }

    #[test]
    fn unknown_bits_of_newer_kernels_are_named_by_position() {
        let f = Features(sys::UBLK_F_USER_COPY | 1 << 9 | 1 << 63);
        assert_eq!(f.names(), ["USER_COPY", "BIT9", "BIT63"]);
        assert_eq!(f.unknown(), 1 << 9 | 1 << 63);
        assert!(Features(0).names().is_empty());
    }

    #[test]
    fn missing_node_means_the_driver_is_not_loaded() {
        let path = "/nonexistent/ublk-control-for-a-unit-test";
        match Control::open_path(path) {
            Err(Error::DriverNotLoaded { path: p }) => assert_eq!(p, Path::new(path)),
            other => panic!("expected DriverNotLoaded, got {other:?}"),
        }
    }

    #[test]
    fn a_file_that_is_not_ublk_rejects_the_command() {
        // A uring command on a regular file: io_uring itself rejects it (EOPNOTSUPP),
        // which exercises the submit → reap → errno path without ublk_drv.
        let dir = std::env::temp_dir().join(format!(
            "ublk-mirror-ctrl-test.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-ublk");
        std::fs::write(&file, b"").unwrap();
        let res = Control::open_path(&file).and_then(|mut c| {
            let r = c.features();
            assert!(!c.is_broken(), "a rejected command must leave the ring usable");
            r
        });
        std::fs::remove_dir_all(&dir).unwrap();
        match res {
            Err(e @ Error::Command { .. }) => assert!(e.to_errno() < 0, "{e}"),
            // io_uring unavailable (e.g. a sandbox with io_uring_disabled=2).
            Err(Error::RingSetup { source, .. }) => {
                eprintln!("skipped: io_uring unavailable here: {source}");
            }
            other => panic!("expected a rejected command, got {other:?}"),
        }
    }
}
