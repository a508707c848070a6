//! The ublk frontend: serves any [`BlockDev`] as `/dev/ublkbN` through the kernel's ublk
//! driver, directly on the `io-uring` crate (see the crate docs for why not `libublk`).
//!
//! # Threads
//!
//! - **The caller's thread** runs the control commands ([`Control`], one synchronous
//!   io_uring on `/dev/ublk-control`): ADD_DEV, SET_PARAMS, START_DEV, and later STOP_DEV
//!   and DEL_DEV. START_DEV blocks until every queue has fetched its tags and then reads the
//!   partition table through the queues, so the queues already run while it waits.
//! - **One thread per queue** owns that queue's io_uring (SQE128) on `/dev/ublkcN`. It
//!   submits FETCH_REQ for every tag, then loops: a completed command means a request is in
//!   the tag's descriptor; the thread turns it into a [`BlockDev`] call spawned on the tokio
//!   runtime given to [`UblkDevice::create`], and when that finishes it submits
//!   COMMIT_AND_FETCH_REQ with the result (bytes, or a negative errno) — which also fetches
//!   the tag's next request. The kernel insists that one thread issues every command of a
//!   queue, so nothing else ever touches the ring.
//! - **Tokio tasks** run the block I/O. A finished task pushes its outcome onto the queue's
//!   list and writes the queue's eventfd; the queue thread keeps a POLL_ADD on that eventfd
//!   in the same ring, so one `io_uring_enter` waits for both the kernel and the tasks.
//!
//! # Buffer ownership
//!
//! Each tag has a buffer of `max_io` bytes in one anonymous mapping per queue (the classic
//! copy path: its address travels in the `addr` of every FETCH/COMMIT command). The kernel
//! owns a tag's buffer from the submission of its command until that command's completion
//! is reaped: for a write it copies the data in before completing the fetch, for a read it
//! copies the data out while processing the commit. In between, only the queue thread
//! touches it — tokio tasks never see the buffer; data crosses as [`Bytes`] (a write's data
//! is copied out before the task is spawned, a read's data is copied in before the commit).
//! The mapping is unmapped only after every tag's command has completed (the driver aborts
//! all of them on STOP_DEV); if the thread has to leave while commands may still be in the
//! kernel (a ring failure, a panic, an abandoned recovery), the mapping is leaked instead.
//!
//! # Requests
//!
//! Every request is completed, always: FLUSH is answered before any bounds check (its sector
//! field is garbage), READ/WRITE/DISCARD/WRITE_ZEROES outside the device or larger than a
//! buffer get `-EINVAL`, any other operation `-EOPNOTSUPP`, a [`BlockDev`] error its errno,
//! and a task that dies without answering (runtime shut down, panic) `-EIO`.
//!
//! # User recovery
//!
//! With [`UblkOptions::recovery`] the device is created with `UBLK_F_USER_RECOVERY` and
//! `UBLK_F_USER_RECOVERY_REISSUE`. If the server process dies, `/dev/ublkbN` stays and the
//! kernel holds every request (new ones and those the dead server had fetched but not
//! committed) until a new server takes over with [`UblkDevice::recover`]:
//! START_USER_RECOVERY (retried while the old server's files are still closing), new queue
//! threads fetch every tag, END_USER_RECOVERY releases the held requests to them. REISSUE
//! is what makes the requests the dead server had in hand re-run instead of failing with
//! EIO; re-running them is safe for a disk, because a read has no effect and a write stores
//! the same data at the same place again (the block layer never orders overlapping
//! in-flight writes, so no filesystem depends on which of two racing copies wins).
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use eac_common::error_chain;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::runtime::Handle;

use crate::ctrl::Control;
use crate::dev::{BlockDev, IoError, IoResult, check_range};
use crate::sys::{self, ublk_param_basic, ublk_param_discard, ublk_params, ublksrv_ctrl_dev_info, ublksrv_io_desc};
use crate::{Error, Result};

/// Default size of one request buffer, and so the largest request (`max_sectors`).
pub const DEFAULT_MAX_IO: u32 = 512 << 10;
/// Default number of tags (requests in flight) per queue.
pub const DEFAULT_DEPTH: u16 = 64;
/// The largest request buffer accepted (the driver's own limit for one I/O is 32 MiB).
pub const MAX_IO_LIMIT: u32 = 1 << sys::UBLK_IO_BUF_BITS;
/// Largest single DISCARD / WRITE_ZEROES request the device advertises (256 MiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 19;
/// How long [`UblkDevice::recover`] waits for the dead server's files to be released.
const RECOVERY_WAIT: Duration = Duration::from_secs(10);
/// How long a queue thread waits for its aborted commands after STOP_DEV returned.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a device node to appear (devtmpfs creates it synchronously; udev
/// setups without devtmpfs may lag).
const NODE_WAIT: Duration = Duration::from_secs(5);
/// `user_data` of the eventfd poll; tags use their number.
const WAKE: u64 = u64::MAX;

/// How to create a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// The device number N (`/dev/ublkbN`), or `None` to let the driver choose.
    pub id: Option<u32>,
    /// Number of hardware queues, one server thread each (the driver caps it at the number
    /// of CPUs).
    pub queues: u16,
    /// Requests in flight per queue (1..=4096).
    pub depth: u16,
    /// Buffer size per request = the largest request, in bytes (a multiple of 4096).
    pub max_io: u32,
    /// Keep the device and hold its I/O when the server dies, for [`UblkDevice::recover`].
    pub recovery: bool,
}

impl Default for UblkOptions {
    /// One queue of depth 64, 512 KiB requests, recovery on.
    fn default() -> Self {
        Self {
            id: None,
            queues: 1,
            depth: DEFAULT_DEPTH,
            max_io: DEFAULT_MAX_IO,
            recovery: true,
        }
    }
}

impl UblkOptions {
    /// Checks the options against the driver's limits.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::InvalidArgument { detail });
        if self.queues == 0 || u32::from(self.queues) > sys::UBLK_MAX_NR_QUEUES {
            return bad(format!("{} queues (1..={})", self.queues, sys::UBLK_MAX_NR_QUEUES));
        }
        if self.depth == 0 || self.depth > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!(
                "queue depth {} (1..={})",
                self.depth,
                sys::UBLK_MAX_QUEUE_DEPTH
            ));
        }
        if self.max_io < 4096 || self.max_io > MAX_IO_LIMIT || !self.max_io.is_multiple_of(4096) {
            return bad(format!(
                "max I/O size {} (a multiple of 4096 up to {MAX_IO_LIMIT})",
                self.max_io
            ));
        }
        if let Some(id) = self.id
            && id >= 1 << 20
        {
            return bad(format!("device id {id} (0..{})", 1 << 20));
        }
        Ok(())
    }
}

/// Requests served since the device was created (or recovered) by this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UblkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Bytes stored by successful writes.
    pub written_bytes: u64,
    /// Requests completed with an error (including rejected and unsupported ones).
    pub errors: u64,
    /// Requests with an operation this frontend does not implement (`-EOPNOTSUPP`).
    pub unsupported: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    unsupported: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn snapshot(&self) -> UblkStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UblkStats {
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            read_bytes: g(&self.read_bytes),
            written_bytes: g(&self.written_bytes),
            errors: g(&self.errors),
            unsupported: g(&self.unsupported),
        }
    }
}

/// State shared by the device handle, its stop handles and its queue threads.
#[derive(Debug)]
struct Shared {
    id: u32,
    stats: Counters,
    /// STOP_DEV has returned: every fetched command has been aborted.
    stopped: AtomicBool,
    /// Queue threads leave at once, leaking their buffers (an abandoned recovery).
    abandon: AtomicBool,
    /// The device was deleted (or handed back); stop requests are no-ops. Written with the
    /// control lock held, so a stop can never hit a later device that reuses the id.
    finished: AtomicBool,
    wakers: Mutex<Vec<Arc<Completions>>>,
}

impl Shared {
    fn new(id: u32) -> Self {
        Self {
            id,
            stats: Counters::default(),
            stopped: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
        }
    }
    fn wake_all(&self) {
        for w in lock(&self.wakers).iter() {
            w.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running device threads: the open `/dev/ublkcN` and one thread per queue.
struct Running {
    /// `None` if it could not be opened (then there are no threads either).
    file: Option<Arc<File>>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// Each queue thread sends `(q_id, ok)` here when it leaves.
    exits: mpsc::Receiver<(u16, bool)>,
}

/// A ublk block device served by this process. Create it with [`UblkDevice::create`] or
/// take over a device whose server died with [`UblkDevice::recover`].
///
/// [`stop`](UblkDevice::stop) removes the device; [`wait`](UblkDevice::wait) blocks until
/// someone stops it (a [`StopHandle`], or STOP_DEV/DEL_DEV from another process). Dropping
/// the handle stops and deletes the device like `stop`. Do not call these (or `create`)
/// from a task of a current-thread runtime that also serves the I/O: they block.
pub struct UblkDevice {
    id: u32,
    info: ublksrv_ctrl_dev_info,
    ctrl: Arc<Mutex<Control>>,
    shared: Arc<Shared>,
    running: Option<Running>,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice")
            .field("id", &self.id)
            .field("queues", &self.info.nr_hw_queues)
            .field("depth", &self.info.queue_depth)
            .field("max_io", &self.info.max_io_buf_bytes)
            .field("flags", &format_args!("{:#x}", self.info.flags))
            .finish_non_exhaustive()
    }
}

/// Stops a [`UblkDevice`] from another thread (a signal handler task, a control socket).
/// Stopping makes [`UblkDevice::wait`] return after deleting the device.
#[derive(Clone)]
pub struct StopHandle {
    ctrl: Arc<Mutex<Control>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle").field("id", &self.shared.id).finish()
    }
}

impl StopHandle {
    /// Issues STOP_DEV (blocking; it waits for in-flight requests). `/dev/ublkbN`
    /// disappears; the queue threads end. A no-op once the device is gone.
    pub fn stop(&self) -> Result<()> {
        request_stop(&self.ctrl, &self.shared)
    }
}

/// STOP_DEV unless the device is already finished; then wakes the queue threads so they
/// reap their aborted commands and leave.
fn request_stop(ctrl: &Mutex<Control>, shared: &Shared) -> Result<()> {
    let mut c = lock(ctrl);
    if shared.finished.load(Ordering::SeqCst) {
        return Ok(());
    }
    let res = match c.stop_dev(shared.id) {
        Err(e) if e.to_errno() == -libc::ENODEV => Ok(()),
        r => r,
    };
    match &res {
        Ok(()) => {
            shared.stopped.store(true, Ordering::SeqCst);
            tracing::info!(id = shared.id, "ublk device stopped");
        }
        Err(e) => {
            // The threads would wait forever for aborts that never come: let them go.
            tracing::error!(id = shared.id, error = %error_chain(e), "STOP_DEV failed; abandoning the queues");
            shared.abandon.store(true, Ordering::SeqCst);
        }
    }
    shared.wake_all();
    res
}

/// `/dev/ublkbN`.
pub fn block_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// `/dev/ublkcN`.
pub fn char_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{id}"))
}

/// The parameters of a device of `size` bytes with `max_io`-byte buffers: 512-byte
/// logical and 4 KiB physical blocks, a volatile write cache with FUA (so the kernel sends
/// FLUSH and FUA writes, which the [`BlockDev`] makes durable), discard and write-zeroes.
pub fn device_params(size: u64, max_io: u32) -> ublk_params {
    ublk_params {
        len: std::mem::size_of::<ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: max_io >> 9,
            chunk_sectors: 0,
            dev_sectors: size >> 9,
            virt_boundary_mask: 0,
        },
        discard: ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    }
}

const RECOVERY_FLAGS: u64 = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;

impl UblkDevice {
    /// Creates `/dev/ublkbN` serving `dev`, starts its queue threads (I/O runs on `rt`) and
    /// returns once the block device exists. On failure everything created is removed.
    pub fn create<D: BlockDev>(dev: Arc<D>, opts: UblkOptions, rt: Handle) -> Result<UblkDevice> {
        opts.validate()?;
        let size = dev.size();
        if size < 4096 || !size.is_multiple_of(512) {
            return Err(Error::InvalidArgument {
                detail: format!("backing size {size} is not a multiple of 512 of at least 4096 bytes"),
            });
        }
        let mut ctrl = Control::open()?;
        let mut flags = sys::UBLK_F_CMD_IOCTL_ENCODE;
        if opts.recovery {
            flags |= RECOVERY_FLAGS;
        }
        let want = ublksrv_ctrl_dev_info {
            nr_hw_queues: opts.queues,
            queue_depth: opts.depth,
            max_io_buf_bytes: opts.max_io,
            dev_id: opts.id.unwrap_or(u32::MAX),
            flags,
            ..Default::default()
        };
        let info = ctrl.add_dev(&want)?;
        let id = info.dev_id;
        let shared = Arc::new(Shared::new(id));
        // From here on, dropping `device` (an early return) stops and deletes the device.
        let mut device = UblkDevice {
            id,
            info,
            ctrl: Arc::new(Mutex::new(ctrl)),
            shared,
            running: None,
        };
        if opts.recovery && info.flags & RECOVERY_FLAGS != RECOVERY_FLAGS {
            return Err(Error::InvalidArgument {
                detail: format!(
                    "ublk_drv did not accept USER_RECOVERY(+REISSUE) (flags {:#x})",
                    info.flags
                ),
            });
        }
        if info.max_io_buf_bytes < 4096 || info.nr_hw_queues == 0 || info.queue_depth == 0 {
            return Err(Error::Protocol {
                op: "ADD_DEV",
                detail: format!(
                    "unusable device: {} queues of depth {}, {}-byte buffers",
                    info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes
                ),
            });
        }
        let params = device_params(size, info.max_io_buf_bytes);
        lock(&device.ctrl).set_params(id, &params)?;
        let (running, started) = start_queues(&info, dev, rt, &device.shared);
        device.running = Some(running);
        started?;
        lock(&device.ctrl).start_dev(id, std::process::id() as i32)?;
        wait_for_block_node(&block_path(id));
        tracing::info!(
            id,
            path = %block_path(id).display(),
            size,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            max_io = info.max_io_buf_bytes,
            recovery = opts.recovery,
            "ublk device started"
        );
        Ok(device)
    }

    /// Takes over device `id` whose server died (it was created with recovery): the held
    /// I/O resumes, served by `dev`, which must have the device's size. Waits up to 10 s
    /// for the old server's files to be released. On failure the device is left as it was
    /// (I/O held) for another attempt, or for `ublk-mirror ublk-del`.
    pub fn recover<D: BlockDev>(dev: Arc<D>, id: u32, rt: Handle) -> Result<UblkDevice> {
        let recovery = |detail: String| Error::Recovery { id, detail };
        let mut ctrl = Control::open()?;
        let info = ctrl.get_dev_info(id).map_err(|e| match e.to_errno() {
            x if x == -libc::ENODEV => recovery("no such device".into()),
            _ => e,
        })?;
        if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
            return Err(recovery(
                "it was created without USER_RECOVERY (its I/O failed when its server died); delete it".into(),
            ));
        }
        if info.state == sys::UBLK_S_DEV_DEAD {
            return Err(recovery("it is not started (state DEAD): nothing to recover".into()));
        }
        let params = ctrl.get_params(id)?;
        if params.basic.dev_sectors != dev.size() >> 9 {
            return Err(recovery(format!(
                "its size is {} bytes, the backing store's {}",
                params.basic.dev_sectors << 9,
                dev.size()
            )));
        }
        let t0 = Instant::now();
        loop {
            match ctrl.start_user_recovery(id) {
                Ok(()) => break,
                Err(e) if e.to_errno() == -libc::EBUSY && t0.elapsed() < RECOVERY_WAIT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.to_errno() == -libc::EBUSY => {
                    let now = ctrl.get_dev_info(id).unwrap_or(info);
                    return Err(recovery(format!(
                        "still held after {RECOVERY_WAIT:?}: state {}, server pid {} (is it still running?)",
                        state_name(now.state),
                        now.ublksrv_pid
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        let info = ctrl.get_dev_info(id)?;
        let waited_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(id, waited_ms, "ublk user recovery started");
        let mut device = UblkDevice {
            id,
            info,
            ctrl: Arc::new(Mutex::new(ctrl)),
            shared: Arc::new(Shared::new(id)),
            running: None,
        };
        let (running, started) = start_queues(&info, dev, rt, &device.shared);
        device.running = Some(running);
        let res = started.and_then(|()| lock(&device.ctrl).end_user_recovery(id, std::process::id() as i32));
        if let Err(e) = res {
            device.abandon();
            return Err(e);
        }
        tracing::info!(
            id,
            waited_ms,
            took_ms = t0.elapsed().as_millis() as u64,
            "ublk device recovered"
        );
        Ok(device)
    }

    /// The device number N.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn block_path(&self) -> PathBuf {
        block_path(self.id)
    }

    /// The device as the driver described it (queues, depth, buffer size, flags).
    pub fn info(&self) -> &ublksrv_ctrl_dev_info {
        &self.info
    }

    /// Requests served so far.
    pub fn stats(&self) -> UblkStats {
        self.shared.stats.snapshot()
    }

    /// A handle that stops this device from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            ctrl: self.ctrl.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Stops and deletes the device (STOP_DEV, queue threads joined, DEL_DEV) and returns
    /// the final counters.
    pub fn stop(mut self) -> Result<UblkStats> {
        let stopped = request_stop(&self.ctrl, &self.shared);
        let finished = self.finish();
        stopped.and(finished).map(|()| self.stats())
    }

    /// Blocks until the device is stopped (a [`StopHandle`], or STOP_DEV/DEL_DEV from
    /// elsewhere) or a queue thread fails (the device is then stopped), deletes it and
    /// returns the final counters.
    pub fn wait(mut self) -> Result<UblkStats> {
        self.finish().map(|()| self.stats())
    }

    /// Waits for every queue thread (stopping the device if one fails), closes the char
    /// device, then deletes the device.
    fn finish(&mut self) -> Result<()> {
        let mut first_err = None;
        if let Some(running) = self.running.take() {
            let mut left = running.threads.len();
            while left > 0 {
                match running.exits.recv() {
                    Ok((q, ok)) => {
                        left -= 1;
                        if !ok && !self.shared.stopped.load(Ordering::SeqCst) {
                            tracing::error!(id = self.id, q, "ublk queue failed; stopping the device");
                            if let Err(e) = request_stop(&self.ctrl, &self.shared) {
                                first_err.get_or_insert(e);
                            }
                        }
                    }
                    // Every sender is gone: all threads have left.
                    Err(_) => break,
                }
            }
            for (q, t) in running.threads.into_iter().enumerate() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(Error::Setup {
                            what: format!("ublk queue {q} (the thread panicked)"),
                            source: io::Error::other("panic"),
                        });
                    }
                }
            }
            // The char device (and each queue's descriptor mapping, gone with its thread)
            // must be closed before DEL_DEV, which waits for the last reference.
            drop(running.file);
        }
        let mut ctrl = lock(&self.ctrl);
        if !self.shared.finished.swap(true, Ordering::SeqCst) {
            match ctrl.del_dev(self.id) {
                Ok(()) => tracing::info!(id = self.id, "ublk device deleted"),
                Err(e) if e.to_errno() == -libc::ENODEV => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Lets the queue threads go without stopping the device (a failed recovery): their
    /// rings close, the kernel holds the device's I/O again for the next server.
    fn abandon(&mut self) {
        self.shared.abandon.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        if let Some(running) = self.running.take() {
            for t in running.threads {
                let _ = t.join();
            }
        }
        self.shared.finished.store(true, Ordering::SeqCst);
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if self.shared.finished.load(Ordering::SeqCst) {
            return;
        }
        let stopped = request_stop(&self.ctrl, &self.shared);
        if let Err(e) = stopped.and(self.finish()) {
            tracing::warn!(id = self.id, error = %error_chain(&e), "removing the ublk device failed");
        }
    }
}

fn state_name(state: u16) -> &'static str {
    match state {
        sys::UBLK_S_DEV_DEAD => "DEAD",
        sys::UBLK_S_DEV_LIVE => "LIVE",
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        _ => "unknown",
    }
}

fn wait_for_block_node(path: &Path) {
    let t0 = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
            return;
        }
        if t0.elapsed() > NODE_WAIT {
            tracing::warn!(path = %path.display(), "the block device node did not appear (no devtmpfs/udev?)");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn open_char_device(id: u32) -> Result<File> {
    let path = char_path(id);
    let t0 = Instant::now();
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && t0.elapsed() < NODE_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => return Err(Error::Open { path, source }),
        }
    }
}

/// Opens `/dev/ublkcN` and starts one thread per queue; returns once every queue has
/// submitted FETCH for all its tags (or failed). The `Running` is returned even on failure
/// so the caller can stop and join the threads that did start.
fn start_queues<D: BlockDev>(
    info: &ublksrv_ctrl_dev_info,
    dev: Arc<D>,
    rt: Handle,
    shared: &Arc<Shared>,
) -> (Running, Result<()>) {
    let (exit_tx, exits) = mpsc::channel();
    let mut running = Running {
        file: None,
        threads: Vec::new(),
        exits,
    };
    let file = match open_char_device(info.dev_id) {
        Ok(f) => Arc::new(f),
        Err(e) => return (running, Err(e)),
    };
    running.file = Some(file.clone());
    let mut result = Ok(());
    let mut readies = Vec::new();
    for q in 0..info.nr_hw_queues {
        let queue = match Queue::new(q, info, file.clone(), dev.clone(), rt.clone(), shared.clone()) {
            Ok(queue) => queue,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        lock(&shared.wakers).push(queue.completions.clone());
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let exit_tx = exit_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublk{}-q{q}", info.dev_id))
            .spawn(move || {
                let r = queue.run(ready_tx);
                if let Err(e) = &r {
                    tracing::error!(q, error = %error_chain(e), "ublk queue thread failed");
                }
                let _ = exit_tx.send((q, r.is_ok()));
                r
            });
        match spawned {
            Ok(t) => {
                running.threads.push(t);
                readies.push((q, ready_rx));
            }
            Err(source) => {
                result = Err(Error::Setup {
                    what: format!("ublk queue {q} thread"),
                    source,
                });
                break;
            }
        }
    }
    for (q, rx) in readies {
        let r = rx.recv().unwrap_or_else(|_| {
            Err(Error::Setup {
                what: format!("ublk queue {q}"),
                source: io::Error::other("the queue thread ended before it was ready"),
            })
        });
        if let Err(e) = r
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    (running, result)
}

// ---------------------------------------------------------------------------------------
// Request decoding (pure)
// ---------------------------------------------------------------------------------------

/// What to do with one request descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Flush,
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    /// Complete at once with this (positive) errno.
    Reject {
        errno: i32,
    },
}

/// Decodes a request for a device of `size` bytes with `buf_size`-byte buffers. FLUSH is
/// recognised before anything else looks at the sector (which is garbage for a flush).
fn plan(desc: &ublksrv_io_desc, size: u64, buf_size: usize) -> Plan {
    let op = desc.op();
    if op == sys::UBLK_IO_OP_FLUSH {
        return Plan::Flush;
    }
    let is_data = op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE;
    if !is_data && op != sys::UBLK_IO_OP_DISCARD && op != sys::UBLK_IO_OP_WRITE_ZEROES {
        return Plan::Reject {
            errno: libc::EOPNOTSUPP,
        };
    }
    let len = u64::from(desc.nr_sectors) << 9;
    let Some(offset) = desc.start_sector.checked_mul(512) else {
        return Plan::Reject { errno: libc::EINVAL };
    };
    if check_range(size, offset, len).is_err() || len == 0 {
        return Plan::Reject { errno: libc::EINVAL };
    }
    if is_data && len > buf_size as u64 {
        return Plan::Reject { errno: libc::EINVAL };
    }
    match op {
        sys::UBLK_IO_OP_READ => Plan::Read {
            offset,
            len: len as usize,
        },
        sys::UBLK_IO_OP_WRITE => Plan::Write {
            offset,
            len: len as usize,
            fua: desc.op_flags & sys::UBLK_IO_F_FUA != 0,
        },
        sys::UBLK_IO_OP_DISCARD => Plan::Discard { offset, len },
        _ => Plan::WriteZeroes { offset, len },
    }
}

/// How a [`BlockDev`] call ended.
#[derive(Debug)]
enum Outcome {
    /// Success without data (write, flush, discard, write-zeroes).
    Done,
    /// A read's data.
    Data(Bytes),
    Failed(IoError),
}

/// A positive errno as the negative result of a commit (never 0: `EIO` for nonsense).
fn neg_errno(errno: i32) -> i32 {
    if errno > 0 { -errno } else { -libc::EIO }
}

/// The commit result for a request of operation `op` that carried `bytes` bytes: the byte
/// count for reads and writes (the kernel requeues the rest of a short one), 0 for the
/// others, or a negative errno. A read must come back with exactly `bytes` bytes.
fn commit_result(op: u8, bytes: u32, outcome: &Outcome) -> i32 {
    let full = i32::try_from(bytes).unwrap_or(i32::MAX);
    match outcome {
        Outcome::Failed(e) => neg_errno(e.0),
        Outcome::Data(d) if op == sys::UBLK_IO_OP_READ && d.len() == bytes as usize => full,
        Outcome::Data(_) => -libc::EIO,
        Outcome::Done if op == sys::UBLK_IO_OP_READ => -libc::EIO,
        Outcome::Done if op == sys::UBLK_IO_OP_WRITE => full,
        Outcome::Done => 0,
    }
}

// ---------------------------------------------------------------------------------------
// The queue thread
// ---------------------------------------------------------------------------------------

/// Outcomes of finished tasks, picked up by the queue thread when its eventfd fires.
#[derive(Debug)]
struct Completions {
    done: Mutex<Vec<(u16, Outcome)>>,
    efd: OwnedFd,
}

impl Completions {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            done: Mutex::new(Vec::new()),
            // SAFETY: eventfd returned a new descriptor that nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn push(&self, tag: u16, outcome: Outcome) {
        let first = {
            let mut d = lock(&self.done);
            d.push((tag, outcome));
            d.len() == 1
        };
        // The thread drains the whole list after a wakeup, so one write per batch suffices.
        if first {
            self.wake();
        }
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to an eventfd we own.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Resets the eventfd counter (non-blocking; nothing to read is fine).
    fn clear(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local array from an eventfd we own.
        let _ = unsafe { libc::read(self.efd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
    }

    fn take(&self) -> Vec<(u16, Outcome)> {
        std::mem::take(&mut *lock(&self.done))
    }
}

/// The answer slot of one spawned request: reports `-EIO` if dropped unanswered (the
/// task panicked or the runtime shut down), so every request is completed.
struct Reply {
    tag: u16,
    sink: Option<Arc<Completions>>,
}

impl Reply {
    fn send(mut self, outcome: Outcome) {
        if let Some(s) = self.sink.take() {
            s.push(self.tag, outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(s) = self.sink.take() {
            s.push(self.tag, Outcome::Failed(IoError::EIO));
        }
    }
}

/// A memory mapping owned by one queue.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Never unmap (the kernel may still write into it).
    leak: bool,
}

// SAFETY: the mapping is exclusively owned by one `Queue`, which moves to its thread once;
// the pointer is never shared with another thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), so no existing
        // memory is affected; the result is checked before use.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len, leak: false })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // While unwinding, commands may still be in the kernel: leak rather than free.
        if self.leak || std::thread::panicking() {
            return;
        }
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, unmapped once here;
        // no reference into it outlives the owning `Queue`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    /// A FETCH or COMMIT_AND_FETCH is in the kernel; the buffer belongs to the kernel.
    InKernel,
    /// The request is with a tokio task; the buffer belongs to the queue thread.
    Serving { op: u8, bytes: u32 },
    /// Aborted (the device is stopping) or rejected; no command in the kernel.
    Dead,
}

struct Queue<D: BlockDev> {
    // Field order: the ring closes first.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    q_id: u16,
    depth: u16,
    buf_size: usize,
    descs: Mapping,
    bufs: Mapping,
    tags: Vec<TagState>,
    live: usize,
    file: Arc<File>,
    completions: Arc<Completions>,
    dev: Arc<D>,
    rt: Handle,
    shared: Arc<Shared>,
}

impl<D: BlockDev> Queue<D> {
    fn new(
        q_id: u16,
        info: &ublksrv_ctrl_dev_info,
        file: Arc<File>,
        dev: Arc<D>,
        rt: Handle,
        shared: Arc<Shared>,
    ) -> Result<Self> {
        let setup = |what: &str, source: io::Error| Error::Setup {
            what: format!("ublk queue {q_id} {what}"),
            source,
        };
        let depth = info.queue_depth;
        let buf_size = info.max_io_buf_bytes as usize;
        let entries = u32::from(depth) + 4;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(entries)
            .map_err(|source| Error::RingSetup { entries, source })?;
        let page = page_size();
        let desc_size = std::mem::size_of::<ublksrv_io_desc>();
        // The driver lays the queues' descriptor arrays out at a stride sized for the
        // largest depth, and maps exactly this queue's array (read-only, shared).
        let stride = round_up(usize::from(sys::UBLK_MAX_QUEUE_DEPTH) * desc_size, page);
        let offset = sys::UBLKSRV_CMD_BUF_OFFSET + (usize::from(q_id) * stride) as i64;
        let descs = Mapping::new(
            round_up(usize::from(depth) * desc_size, page),
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            offset,
        )
        .map_err(|e| setup("descriptor mmap", e))?;
        let bufs = Mapping::new(
            usize::from(depth) * buf_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
        .map_err(|e| setup("buffers", e))?;
        let completions = Arc::new(Completions::new().map_err(|e| setup("eventfd", e))?);
        Ok(Self {
            ring,
            q_id,
            depth,
            buf_size,
            descs,
            bufs,
            tags: vec![TagState::Dead; usize::from(depth)],
            live: 0,
            file,
            completions,
            dev,
            rt,
            shared,
        })
    }

    /// Fetches every tag, reports readiness, serves until every tag is aborted.
    fn run(mut self, ready: mpsc::SyncSender<Result<()>>) -> Result<()> {
        let started = self.fetch_all();
        let ok = started.is_ok();
        let _ = ready.send(started);
        let res = if ok { self.serve() } else { Ok(()) };
        if self.live > 0 {
            // Commands may still be in the kernel: their buffers must never be reused.
            tracing::warn!(
                q = self.q_id,
                live = self.live,
                "ublk queue leaves with commands in flight; leaking its buffers"
            );
            self.bufs.leak = true;
        }
        res
    }

    fn fetch_all(&mut self) -> Result<()> {
        for tag in 0..self.depth {
            self.push_io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0)?;
            self.tags[usize::from(tag)] = TagState::InKernel;
            self.live += 1;
        }
        self.arm_wake()?;
        self.ring.submit().map_err(|source| Error::Submit {
            op: "FETCH_REQ",
            source,
        })?;
        // The driver validates FETCH inline: a rejection is already in the CQ.
        let mut early = Vec::new();
        for cqe in self.ring.completion() {
            early.push((cqe.user_data(), cqe.result()));
        }
        let mut rejected = None;
        for (ud, res) in early {
            if ud != WAKE && res < 0 && res != sys::UBLK_IO_RES_ABORT {
                rejected.get_or_insert(res);
            }
            self.on_cqe(ud, res)?;
        }
        if let Some(res) = rejected {
            return Err(Error::Command {
                op: "FETCH_REQ",
                source: io::Error::from_raw_os_error(-res),
            });
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<()> {
        let mut stop_seen: Option<Instant> = None;
        let mut cqes = Vec::with_capacity(usize::from(self.depth) + 1);
        let ts = types::Timespec::new().nsec(100_000_000);
        while self.live > 0 {
            if self.shared.abandon.load(Ordering::SeqCst) {
                return Ok(());
            }
            if stop_seen.is_none() && self.shared.stopped.load(Ordering::SeqCst) {
                stop_seen = Some(Instant::now());
            }
            if let Some(t) = stop_seen
                && t.elapsed() > STOP_GRACE
            {
                tracing::warn!(q = self.q_id, live = self.live, "ublk queue: no abort after STOP_DEV");
                return Ok(());
            }
            let waited = if stop_seen.is_some() {
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            } else {
                self.ring.submit_and_wait(1)
            };
            if let Err(e) = waited {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => {}
                    _ => {
                        return Err(Error::Submit {
                            op: "ublk queue wait",
                            source: e,
                        });
                    }
                }
            }
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.on_cqe(ud, res)?;
            }
        }
        Ok(())
    }

    fn on_cqe(&mut self, ud: u64, res: i32) -> Result<()> {
        if ud == WAKE {
            if res < 0 {
                tracing::warn!(q = self.q_id, res, "ublk queue: eventfd poll failed");
            }
            self.completions.clear();
            for (tag, outcome) in self.completions.take() {
                self.finish(tag, outcome)?;
            }
            return self.arm_wake();
        }
        let Some(state) = u16::try_from(ud)
            .ok()
            .filter(|&t| t < self.depth)
            .map(|t| self.tags[usize::from(t)])
        else {
            tracing::error!(
                q = self.q_id,
                user_data = ud,
                "ublk queue: completion for an unknown tag"
            );
            return Ok(());
        };
        let tag = ud as u16;
        if state != TagState::InKernel {
            tracing::error!(
                q = self.q_id,
                tag,
                ?state,
                res,
                "ublk queue: completion for a tag not in the kernel"
            );
            return Ok(());
        }
        match res {
            sys::UBLK_IO_RES_OK => self.dispatch(tag),
            sys::UBLK_IO_RES_ABORT => {
                self.kill(tag);
                Ok(())
            }
            r => {
                // A rejected command (or NEED_GET_DATA, which we never ask for): the tag
                // is lost; loud, because a request may now never complete.
                tracing::error!(q = self.q_id, tag, res = r, "ublk_drv rejected an I/O command");
                self.kill(tag);
                Ok(())
            }
        }
    }

    fn kill(&mut self, tag: u16) {
        self.tags[usize::from(tag)] = TagState::Dead;
        self.live -= 1;
    }

    fn desc(&self, tag: u16) -> ublksrv_io_desc {
        debug_assert!(tag < self.depth);
        // SAFETY: the mapping holds `depth` descriptors (page-aligned, so each is aligned)
        // and `tag < depth`. The kernel wrote this slot before completing the command whose
        // CQE we just reaped (the CQ tail load is an acquire); volatile because the kernel
        // writes the memory behind the compiler's back.
        unsafe { std::ptr::read_volatile(self.descs.ptr.as_ptr().cast::<ublksrv_io_desc>().add(usize::from(tag))) }
    }

    fn buf_addr(&self, tag: u16) -> u64 {
        self.bufs.ptr.as_ptr() as u64 + u64::from(tag) * self.buf_size as u64
    }

    /// The tag's buffer. Only for a tag in [`TagState::Serving`] (or being dispatched):
    /// no command of it is in the kernel, so nobody else touches the memory.
    fn buf(&mut self, tag: u16, len: usize) -> &mut [u8] {
        assert!(tag < self.depth && len <= self.buf_size);
        // SAFETY: the range lies inside the buffer mapping (`tag < depth`, `len <=
        // buf_size`); the tag has no command in the kernel, and `&mut self` makes this the
        // only reference.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.ptr.as_ptr().add(usize::from(tag) * self.buf_size), len) }
    }

    fn dispatch(&mut self, tag: u16) -> Result<()> {
        let desc = self.desc(tag);
        let stats = &self.shared.stats;
        let dev = self.dev.clone();
        match plan(&desc, dev.size(), self.buf_size) {
            Plan::Flush => {
                Counters::add(&stats.flushes, 1);
                self.spawn(
                    tag,
                    desc.op(),
                    0,
                    async move { dev.flush().await.map(|()| Outcome::Done) },
                );
            }
            Plan::Read { offset, len } => {
                Counters::add(&stats.reads, 1);
                self.spawn(tag, desc.op(), len as u32, async move {
                    dev.read(offset, len).await.map(Outcome::Data)
                });
            }
            Plan::Write { offset, len, fua } => {
                Counters::add(&stats.writes, 1);
                let data = Bytes::copy_from_slice(self.buf(tag, len));
                self.spawn(tag, desc.op(), len as u32, async move {
                    dev.write(offset, data, fua).await.map(|()| Outcome::Done)
                });
            }
            Plan::Discard { offset, len } => {
                Counters::add(&stats.discards, 1);
                self.spawn(tag, desc.op(), 0, async move {
                    dev.discard(offset, len).await.map(|()| Outcome::Done)
                });
            }
            Plan::WriteZeroes { offset, len } => {
                Counters::add(&stats.write_zeroes, 1);
                self.spawn(tag, desc.op(), 0, async move {
                    dev.write_zeroes(offset, len).await.map(|()| Outcome::Done)
                });
            }
            Plan::Reject { errno } => {
                Counters::add(&stats.errors, 1);
                if errno == libc::EOPNOTSUPP {
                    Counters::add(&stats.unsupported, 1);
                }
                tracing::debug!(
                    q = self.q_id,
                    tag,
                    op = desc.op(),
                    sector = desc.start_sector,
                    sectors = desc.nr_sectors,
                    errno,
                    "ublk request rejected"
                );
                return self.commit(tag, -errno);
            }
        }
        Ok(())
    }

    fn spawn<F>(&mut self, tag: u16, op: u8, bytes: u32, io: F)
    where
        F: Future<Output = IoResult<Outcome>> + Send + 'static,
    {
        self.tags[usize::from(tag)] = TagState::Serving { op, bytes };
        let reply = Reply {
            tag,
            sink: Some(self.completions.clone()),
        };
        // If the runtime is shut down the future is dropped, and `reply` answers -EIO.
        drop(self.rt.spawn(async move {
            let outcome = match io.await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(e),
            };
            reply.send(outcome);
        }));
    }

    fn finish(&mut self, tag: u16, outcome: Outcome) -> Result<()> {
        let Some(TagState::Serving { op, bytes }) = self.tags.get(usize::from(tag)).copied() else {
            tracing::error!(
                q = self.q_id,
                tag,
                "ublk queue: an answer for a tag that is not being served"
            );
            return Ok(());
        };
        let result = commit_result(op, bytes, &outcome);
        let stats = &self.shared.stats;
        if result < 0 {
            Counters::add(&stats.errors, 1);
            tracing::debug!(q = self.q_id, tag, op, errno = -result, "ublk request failed");
        } else if op == sys::UBLK_IO_OP_READ {
            Counters::add(&stats.read_bytes, u64::from(bytes));
        } else if op == sys::UBLK_IO_OP_WRITE {
            Counters::add(&stats.written_bytes, u64::from(bytes));
        }
        if result > 0
            && op == sys::UBLK_IO_OP_READ
            && let Outcome::Data(data) = &outcome
        {
            self.buf(tag, data.len()).copy_from_slice(data);
        }
        self.commit(tag, result)
    }

    fn commit(&mut self, tag: u16, result: i32) -> Result<()> {
        self.push_io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result)?;
        self.tags[usize::from(tag)] = TagState::InKernel;
        Ok(())
    }

    fn push_io_cmd(&mut self, cmd_op: u32, tag: u16, result: i32) -> Result<()> {
        let cmd = sys::ublksrv_io_cmd {
            q_id: self.q_id,
            tag,
            result,
            addr: self.buf_addr(tag),
        };
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(sys::cmd_bytes(&cmd))
            .build()
            .user_data(u64::from(tag));
        self.push(sqe, "ublk I/O command")
    }

    fn arm_wake(&mut self) -> Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(self.completions.efd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        self.push(sqe.into(), "eventfd poll")
    }

    fn push(&mut self, sqe: squeue::Entry128, op: &'static str) -> Result<()> {
        for _ in 0..2 {
            // SAFETY: the SQE refers to `self.file` or `self.completions.efd` (both live as
            // long as `self`, and the ring is dropped first) and to the tag's buffer, which
            // stays mapped until every command has completed (or is leaked).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            // Full: hand the queued entries to the kernel and retry once.
            self.ring.submit().map_err(|source| Error::Submit { op, source })?;
        }
        Err(Error::QueueFull { op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> ublksrv_io_desc {
        ublksrv_io_desc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    const SIZE: u64 = 64 << 20;
    const BUF: usize = 512 << 10;

    #[test]
    fn flush_is_answered_before_looking_at_its_garbage_sector() {
        // What the 6.12 driver really sends for a flush (notes/ublk-guest.md).
        let d = desc(sys::UBLK_IO_OP_FLUSH, 0, 0xffff_ffff_ffff_fe00 >> 9, 0);
        assert_eq!(plan(&d, SIZE, BUF), Plan::Flush);
        let d = desc(sys::UBLK_IO_OP_FLUSH, 0, u64::MAX, u32::MAX);
        assert_eq!(plan(&d, SIZE, BUF), Plan::Flush);
    }

    #[test]
    fn data_requests_are_decoded_and_bounds_checked() {
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_READ, 0, 8, 8), SIZE, BUF),
            Plan::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 0, 1024), SIZE, BUF),
            Plan::Write {
                offset: 0,
                len: BUF,
                fua: true
            }
        );
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_META, 0, 1), SIZE, BUF),
            Plan::Write {
                offset: 0,
                len: 512,
                fua: false
            }
        );
        let last = (SIZE >> 9) - 8;
        assert!(matches!(
            plan(&desc(sys::UBLK_IO_OP_READ, 0, last, 8), SIZE, BUF),
            Plan::Read { .. }
        ));
        let einval = Plan::Reject { errno: libc::EINVAL };
        // One sector past the end, an overflowing sector, an empty and an oversized request.
        assert_eq!(plan(&desc(sys::UBLK_IO_OP_READ, 0, last, 9), SIZE, BUF), einval);
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_WRITE, 0, u64::MAX >> 8, 1), SIZE, BUF),
            einval
        );
        assert_eq!(plan(&desc(sys::UBLK_IO_OP_READ, 0, 0, 0), SIZE, BUF), einval);
        assert_eq!(plan(&desc(sys::UBLK_IO_OP_READ, 0, 0, 1025), SIZE, BUF), einval);
    }

    #[test]
    fn discard_and_write_zeroes_may_exceed_the_buffer_but_not_the_device() {
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_DISCARD, 0, 2048, 1 << 16), SIZE, BUF),
            Plan::Discard {
                offset: 1 << 20,
                len: 32 << 20
            }
        );
        assert_eq!(
            plan(
                &desc(sys::UBLK_IO_OP_WRITE_ZEROES, sys::UBLK_IO_F_NOUNMAP, 0, 1 << 17),
                SIZE,
                BUF
            ),
            Plan::WriteZeroes { offset: 0, len: SIZE }
        );
        assert_eq!(
            plan(&desc(sys::UBLK_IO_OP_DISCARD, 0, 1, 1 << 17), SIZE, BUF),
            Plan::Reject { errno: libc::EINVAL }
        );
    }

    #[test]
    fn other_operations_are_not_supported() {
        for op in [
            sys::UBLK_IO_OP_WRITE_SAME,
            sys::UBLK_IO_OP_ZONE_OPEN,
            sys::UBLK_IO_OP_ZONE_APPEND,
            sys::UBLK_IO_OP_REPORT_ZONES,
            0xff,
        ] {
            assert_eq!(
                plan(&desc(op, 0, 0, 8), SIZE, BUF),
                Plan::Reject {
                    errno: libc::EOPNOTSUPP
                },
                "op {op}"
            );
        }
    }

    #[test]
    fn commit_results() {
        use sys::{UBLK_IO_OP_DISCARD as DISCARD, UBLK_IO_OP_FLUSH as FLUSH, UBLK_IO_OP_READ as READ};
        use sys::{UBLK_IO_OP_WRITE as WRITE, UBLK_IO_OP_WRITE_ZEROES as WZ};
        let data = Outcome::Data(Bytes::from(vec![1u8; 4096]));
        assert_eq!(commit_result(READ, 4096, &data), 4096);
        // A short or missing read is an error, never a partial success.
        assert_eq!(commit_result(READ, 8192, &data), -libc::EIO);
        assert_eq!(commit_result(READ, 4096, &Outcome::Done), -libc::EIO);
        assert_eq!(commit_result(WRITE, 4096, &Outcome::Done), 4096);
        assert_eq!(commit_result(WRITE, 4096, &data), -libc::EIO);
        for op in [FLUSH, DISCARD, WZ] {
            assert_eq!(commit_result(op, 0, &Outcome::Done), 0);
        }
        assert_eq!(
            commit_result(WRITE, 4096, &Outcome::Failed(IoError::ENOSPC)),
            -libc::ENOSPC
        );
        assert_eq!(commit_result(FLUSH, 0, &Outcome::Failed(IoError(0))), -libc::EIO);
        assert_eq!(commit_result(READ, 512, &Outcome::Failed(IoError(-3))), -libc::EIO);
    }

    #[test]
    fn params_describe_a_write_back_disk_with_discard() {
        let p = device_params(SIZE, DEFAULT_MAX_IO);
        assert_eq!(p.len, 112);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.dev_sectors, SIZE / 512);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!((p.basic.logical_bs_shift, p.basic.physical_bs_shift), (9, 12));
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        // The driver rejects discard params with max_discard_segments != 1 or no granularity.
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_ne!(p.discard.discard_granularity, 0);
        assert_ne!(p.discard.max_write_zeroes_sectors, 0);
    }

    #[test]
    fn options_are_checked_against_the_driver_limits() {
        assert!(UblkOptions::default().validate().is_ok());
        let bad = [
            UblkOptions {
                queues: 0,
                ..Default::default()
            },
            UblkOptions {
                depth: 0,
                ..Default::default()
            },
            UblkOptions {
                depth: 4097,
                ..Default::default()
            },
            UblkOptions {
                max_io: 4095,
                ..Default::default()
            },
            UblkOptions {
                max_io: 6000,
                ..Default::default()
            },
            UblkOptions {
                max_io: MAX_IO_LIMIT * 2,
                ..Default::default()
            },
            UblkOptions {
                id: Some(u32::MAX),
                ..Default::default()
            },
        ];
        for o in bad {
            let e = o.validate().expect_err(&format!("{o:?}"));
            assert!(e.needs_operator(), "{e}");
            assert_eq!(e.to_errno(), -libc::EINVAL);
        }
    }

    #[test]
    fn an_unanswered_reply_completes_with_eio() {
        let c = Arc::new(Completions::new().unwrap());
        drop(Reply {
            tag: 7,
            sink: Some(c.clone()),
        });
        Reply {
            tag: 8,
            sink: Some(c.clone()),
        }
        .send(Outcome::Done);
        let got = c.take();
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], (7, Outcome::Failed(IoError::EIO))));
        assert!(matches!(got[1], (8, Outcome::Done)));
        // One eventfd signal for the batch; clearing it makes the fd unreadable again.
        let mut v = [0u8; 8];
        // SAFETY: 8-byte read into a local array from the test's own eventfd.
        let n = unsafe { libc::read(c.efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(v), 1);
        c.clear();
    }

    #[test]
    fn create_without_the_driver_fails_cleanly() {
        if Path::new(crate::CONTROL_PATH).exists() {
            eprintln!("skipped: this host has ublk_drv; the VM tests cover create");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let p = std::env::temp_dir().join(format!("ublk-frontend-unit-{}", std::process::id()));
        let disk = crate::LocalDisk::create(&p, 1 << 20).unwrap();
        let r = UblkDevice::create(Arc::new(disk), UblkOptions::default(), rt.handle().clone());
        std::fs::remove_file(&p).unwrap();
        match r {
            Err(e @ Error::DriverNotLoaded { .. }) => assert!(e.needs_operator()),
            other => panic!("expected DriverNotLoaded, got {other:?}"),
        }
    }
}
