//! A backing device that starts failing I/O, for real: a tiny FUSE filesystem serving one file,
//! `<mountpoint>/disk`, that passes reads, writes, fsync and fallocate through to a backing
//! file — until a test flips its [`Mode`], and from then on the kernel hands `EIO` to whoever
//! uses the file (QEMU, a loop device, ublk-mirror's io_uring, `dd`).
//!
//! This machine has no device-mapper (`dm-error`, `dm-flakey`), no nbd and no scsi_debug; FUSE
//! is always there. The server runs in-process on background threads ([`fuser`], pure-Rust
//! mount: it calls mount(2) itself, so it needs root but neither libfuse nor `fusermount3`).
//!
//! - Every open is answered with `FOPEN_DIRECT_IO`: the kernel keeps no page cache for the file,
//!   so every read and write (buffered, `O_DIRECT` or io_uring alike) reaches this server and a
//!   fault is seen by the very next I/O, never hidden by cached pages. `O_DIRECT` opens work.
//! - Faults affect data operations (read, write, fsync, fallocate, truncate). Lookup, stat,
//!   open and close keep working, as the device node of a failing disk stays openable.
//! - The kernel splits a large I/O into requests of at most 1 MiB (`fs.fuse.max_pages_limit`);
//!   with [`Mode::FailRange`] an I/O whose first requests succeed returns a short count rather
//!   than `EIO`, as a real disk's partial failure can.
//! - The file is served with `allow_other`, so an unprivileged consumer (libvirt's QEMU user)
//!   can open it too; the kernel checks no permissions on it.
//!
//! Dropping a [`FaultyDisk`] (also during a panic) unmounts it: a plain unmount when nothing
//! holds the file open, otherwise a lazy unmount followed by aborting the FUSE connection
//! (`/sys/fs/fuse/connections/N/abort`, mounting fusectl there if needed), so the server
//! threads always end and are joined; holders of the file then get `ENOTCONN`.
//!
//! ```no_run
//! use eac_lab::faulty_disk::{FaultyDisk, Mode};
//! # fn main() -> Result<(), eac_lab::faulty_disk::Error> {
//! let disk = FaultyDisk::mount("/tmp", "/var/tmp/disk.img")?;
//! // hand disk.path() to the consumer under test ...
//! disk.set(Mode::FailAll);
//! // ... the consumer's next read or write fails with EIO ...
//! assert!(disk.errors_returned() > 0);
//! disk.set(Mode::Healthy);
//! # Ok(()) }
//! ```
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    SessionACL, WriteFlags,
};
use nix::errno::Errno as NixErrno;
use nix::mount::MntFlags;

use crate::wait::wait_until;

/// Name of the one file in the filesystem.
pub const DISK_NAME: &str = "disk";
/// Name of the mounted filesystem in /proc/mounts (its "device" column).
pub const FS_NAME: &str = "eac-faulty-disk";

const DISK_INO: INodeNo = INodeNo(2);
/// Attributes are never cached: the size is the backing file's, which a test may change.
const TTL: Duration = Duration::ZERO;
/// Server threads: two, so a queue depth above one is served concurrently.
const THREADS: usize = 2;
/// How long the unmount waits for the server threads before it aborts the connection, and
/// then again before it gives up on them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Where the kernel's FUSE control filesystem (fusectl) lives.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Tells mountpoints of this process apart; with the pid it makes every mountpoint unique.
static NEXT_MOUNT: AtomicU64 = AtomicU64::new(0);

/// How the disk behaves; switch at run time with [`FaultyDisk::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every operation passes through to the backing file.
    #[default]
    Healthy,
    /// Every read, write, fsync, fallocate and truncate fails with `EIO`.
    FailAll,
    /// Writes, fsync, fallocate and truncate fail with `EIO`; reads still work.
    FailWrites,
    /// A read, write or fallocate touching a byte of `[offset, offset + len)` fails with `EIO`
    /// (a bad region of the medium); everything else, fsync included, works.
    FailRange { offset: u64, len: u64 },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot open backing file {}", path.display())]
    OpenBacking {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("backing file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("cannot create a mountpoint under {}", parent.display())]
    Mountpoint {
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount the FUSE filesystem at {}", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the FUSE server thread")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("{} is not in /proc/self/mountinfo after mounting it", mountpoint.display())]
    NotMounted { mountpoint: PathBuf },
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo {
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {}", mountpoint.display())]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: NixErrno,
    },
    #[error("cannot abort FUSE connection {conn} through {FUSECTL}")]
    Abort {
        conn: u64,
        #[source]
        source: io::Error,
    },
    #[error("the FUSE server of {} did not stop; its threads are left running", mountpoint.display())]
    Stuck { mountpoint: PathBuf },
    #[error("the FUSE server of {} failed", mountpoint.display())]
    Server {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove mountpoint {}", mountpoint.display())]
    RemoveMountpoint {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A mounted faulty disk; dropping it unmounts, stops the server and removes the mountpoint.
#[derive(Debug)]
pub struct FaultyDisk {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    backing: PathBuf,
    /// The filesystem's device number (`major:minor` in mountinfo), which also names its
    /// fusectl connection directory.
    dev: (u32, u32),
    server: Option<JoinHandle<io::Result<()>>>,
}

impl FaultyDisk {
    /// Mounts a new faulty disk serving `backing` (an existing regular file, opened read-write)
    /// at a fresh mountpoint `parent/faulty-disk-<pid>-<n>`, healthy; needs root and /dev/fuse.
    pub fn mount(parent: impl AsRef<Path>, backing: impl AsRef<Path>) -> Result<Self, Error> {
        let parent = parent.as_ref();
        let backing = backing.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&backing)
            .map_err(|source| Error::OpenBacking {
                path: backing.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| Error::OpenBacking {
            path: backing.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(Error::NotAFile { path: backing });
        }
        let mountpoint = create_mountpoint(parent)?;
        match Self::serve(file, &mountpoint, &backing) {
            Ok(disk) => Ok(disk),
            Err(e) => {
                // Already removed if serving got as far as the handle (its drop cleans up).
                if let Err(rm) = std::fs::remove_dir(&mountpoint)
                    && rm.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(mountpoint = %mountpoint.display(), error = %rm, "cannot remove mountpoint");
                }
                Err(e)
            }
        }
    }

    fn serve(file: File, mountpoint: &Path, backing: &Path) -> Result<Self, Error> {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Healthy),
            errors: AtomicU64::new(0),
        });
        let fs = DiskFs {
            backing: file,
            shared: shared.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName(FS_NAME.to_owned()), MountOption::NoExec];
        config.acl = SessionACL::All;
        config.n_threads = Some(THREADS);
        config.clone_fd = true;
        // Mounts and completes the INIT handshake with the kernel before returning.
        let session = fuser::Session::new(fs, mountpoint, &config).map_err(|source| Error::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
        let server = std::thread::Builder::new()
            .name("faulty-disk".to_owned())
            .spawn(move || session.run())
            .map_err(|source| Error::Spawn { source })?;
        let mut disk = FaultyDisk {
            shared,
            mountpoint: mountpoint.to_path_buf(),
            backing: backing.to_path_buf(),
            dev: (0, 0),
            server: Some(server),
        };
        // From here on, dropping `disk` unmounts (it finds the mount by path while dev is
        // unknown, which is safe: the mountpoint was created by us a moment ago).
        match find_mount(&disk.mountpoint)? {
            Some(dev) => disk.dev = dev,
            None => {
                return Err(Error::NotMounted {
                    mountpoint: disk.mountpoint.clone(),
                });
            }
        }
        tracing::info!(
            mountpoint = %disk.mountpoint.display(),
            backing = %disk.backing.display(),
            dev = ?disk.dev,
            "faulty disk mounted"
        );
        Ok(disk)
    }

    /// The file to hand to the consumer: `<mountpoint>/disk`.
    pub fn path(&self) -> PathBuf {
        self.mountpoint.join(DISK_NAME)
    }

    /// The directory the filesystem is mounted on (created by [`FaultyDisk::mount`]).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing file the disk passes I/O through to.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Switches the behaviour; takes effect for the next request the kernel sends.
    pub fn set(&self, mode: Mode) {
        tracing::info!(mountpoint = %self.mountpoint.display(), ?mode, "faulty disk mode");
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// The current behaviour.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// How many requests this disk has failed on purpose (injected `EIO`s) since it was
    /// mounted. Errors of the backing file itself are passed on but not counted here.
    pub fn errors_returned(&self) -> u64 {
        self.shared.errors.load(Ordering::SeqCst)
    }

    /// Unmounts, stops the server and removes the mountpoint, reporting what went wrong (drop
    /// does the same and logs instead).
    pub fn unmount(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let mut first_error = None;
        let mut note = |e: Error| {
            tracing::warn!(error = %ErrorChain(&e), "faulty disk unmount");
            first_error.get_or_insert(e);
        };
        let mounted = match find_mount(&self.mountpoint) {
            Ok(found) => found.is_some_and(|dev| self.dev == (0, 0) || dev == self.dev),
            Err(e) => {
                note(e);
                true
            }
        };
        let mut detached = false;
        if mounted {
            match nix::mount::umount2(&self.mountpoint, MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => {}
                Err(errno) => {
                    if errno != NixErrno::EBUSY {
                        note(Error::Unmount {
                            mountpoint: self.mountpoint.clone(),
                            source: errno,
                        });
                    }
                    // Busy (the file is held open): detach now; the connection is aborted
                    // below so the server stops even while someone holds the file.
                    match nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                        Ok(()) => detached = true,
                        Err(source) => note(Error::Unmount {
                            mountpoint: self.mountpoint.clone(),
                            source,
                        }),
                    }
                }
            }
        }
        // A plain unmount destroys the superblock, which aborts the connection and ends the
        // server; a lazy one leaves it serving until the last holder closes the file.
        let finished =
            |h: &JoinHandle<_>| wait_until(STOP_GRACE, "the FUSE server to stop", || h.is_finished()).is_ok();
        if detached || !finished(&server) {
            if let Err(e) = abort_connection(self.dev) {
                note(e);
            }
            if !finished(&server) {
                // Leak the threads rather than hang the test forever.
                note(Error::Stuck {
                    mountpoint: self.mountpoint.clone(),
                });
                drop(server);
                return Err(first_error.unwrap_or(Error::Stuck {
                    mountpoint: self.mountpoint.clone(),
                }));
            }
        }
        match server.join() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => note(Error::Server {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
            Err(_) => note(Error::Server {
                mountpoint: self.mountpoint.clone(),
                source: io::Error::other("server thread panicked"),
            }),
        }
        if let Err(source) = std::fs::remove_dir(&self.mountpoint) {
            note(Error::RemoveMountpoint {
                mountpoint: self.mountpoint.clone(),
                source,
            });
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), detached, "faulty disk unmounted");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        // Errors were logged by stop().
        let _ = self.stop();
    }
}

/// Prints an error with its whole `source` chain, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Creates `parent/faulty-disk-<pid>-<n>` with the first `n` not taken.
fn create_mountpoint(parent: &Path) -> Result<PathBuf, Error> {
    let parent = parent.canonicalize().map_err(|source| Error::Mountpoint {
        parent: parent.to_path_buf(),
        source,
    })?;
    loop {
        let n = NEXT_MOUNT.fetch_add(1, Ordering::SeqCst);
        let path = parent.join(format!("faulty-disk-{}-{n}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(Error::Mountpoint { parent, source }),
        }
    }
}

/// The device number of the FUSE filesystem mounted at `mountpoint` (the topmost one), found
/// in /proc/self/mountinfo so that no request reaches the (maybe stuck) server.
fn find_mount(mountpoint: &Path) -> Result<Option<(u32, u32)>, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::MountInfo { source })?;
    Ok(parse_mountinfo(&info, mountpoint))
}

fn parse_mountinfo(info: &str, mountpoint: &Path) -> Option<(u32, u32)> {
    let want = escape_mount_path(mountpoint);
    info.lines().rev().find_map(|line| {
        // id parent major:minor root mountpoint options [optional...] - fstype source ...
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
        if point != want || !(fstype == "fuse" || fstype.starts_with("fuse.")) {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    })
}

/// A path as the kernel writes it in mountinfo (space, tab, newline, backslash as octal).
fn escape_mount_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(char::from(b)),
        }
    }
    out
}

/// Aborts the FUSE connection of the filesystem with device number `dev`: pending and future
/// requests fail with `ENOTCONN` and the server's reads of /dev/fuse end, so it stops.
fn abort_connection((major, minor): (u32, u32)) -> Result<(), Error> {
    // The kernel names the directory after its internal dev_t: major << 20 | minor.
    let conn = (u64::from(major) << 20) | u64::from(minor);
    let dir = Path::new(FUSECTL).join(conn.to_string());
    if !dir.exists() {
        let fusectl_mounted = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|source| Error::MountInfo { source })?
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(FUSECTL));
        if !fusectl_mounted {
            tracing::info!("mounting fusectl at {FUSECTL}");
            nix::mount::mount(
                Some("fusectl"),
                FUSECTL,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| Error::Abort { conn, source: e.into() })?;
        }
        if !dir.exists() {
            // The connection is gone already: nothing left to abort.
            return Ok(());
        }
    }
    std::fs::write(dir.join("abort"), "1").map_err(|source| Error::Abort { conn, source })
}

/// State shared by the handle and the server threads.
#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    errors: AtomicU64,
}

/// What a request does, for deciding whether the current [`Mode`] fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Sync,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the current mode fails `op` on `[offset, offset + len)`; counts it if so.
    fn inject(&self, op: Op, offset: u64, len: u64) -> bool {
        let fail = match self.mode() {
            Mode::Healthy => false,
            Mode::FailAll => true,
            Mode::FailWrites => op != Op::Read,
            Mode::FailRange {
                offset: bad,
                len: bad_len,
            } => {
                op != Op::Sync
                    && len > 0
                    && bad_len > 0
                    && offset < bad.saturating_add(bad_len)
                    && bad < offset.saturating_add(len)
            }
        };
        if fail {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
}

/// The filesystem: a root directory holding the one file.
struct DiskFs {
    backing: File,
    shared: Arc<Shared>,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl DiskFs {
    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn disk_attr(&self) -> io::Result<FileAttr> {
        let m = self.backing.metadata()?;
        let time = |secs: i64, nsecs: i64| {
            let since = Duration::new(secs.max(0).unsigned_abs(), u32::try_from(nsecs).unwrap_or(0));
            UNIX_EPOCH + since
        };
        Ok(FileAttr {
            ino: DISK_INO,
            size: m.len(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.ctime(), m.ctime_nsec()),
            kind: FileType::RegularFile,
            perm: (m.mode() & 0o7777) as u16,
            nlink: 1,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Reads up to `size` bytes at `offset`, short only at the end of the file.
    fn read_backing(&self, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            match self.backing.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn fail(&self, op: &str, ino: INodeNo, offset: u64, len: u64) {
        tracing::debug!(op, ino = ino.0, offset, len, "faulty disk: injected EIO");
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Lets a consumer mmap the file although it is opened in direct-I/O mode (6.6+).
        if config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            tracing::debug!("kernel lacks FUSE_DIRECT_IO_ALLOW_MMAP; mmap of the disk will fail");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != OsStr::new(DISK_NAME) {
            return reply.error(Errno::ENOENT);
        }
        match self.disk_attr() {
            Ok(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&TTL, &self.root_attr());
        } else if ino == DISK_INO {
            match self.disk_attr() {
                Ok(attr) => reply.attr(&TTL, &attr),
                Err(e) => reply.error(errno(&e)),
            }
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &self.root_attr());
        }
        if ino != DISK_INO {
            return reply.error(Errno::ENOENT);
        }
        // Only the size is honoured (truncate, O_TRUNC); mode, owner and times are the backing
        // file's and stay so.
        if let Some(size) = size {
            if self.shared.inject(Op::Write, size, u64::MAX - size) {
                self.fail("truncate", ino, size, 0);
                return reply.error(Errno::EIO);
            }
            if let Err(e) = self.backing.set_len(size) {
                return reply.error(errno(&e));
            }
        }
        match self.disk_attr() {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        // No page cache: every I/O reaches us, so a fault is seen at once.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.shared.inject(Op::Read, offset, u64::from(size)) {
            self.fail("read", ino, offset, u64::from(size));
            return reply.error(Errno::EIO);
        }
        match self.read_backing(offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::warn!(offset, size, error = %e, "faulty disk: backing read failed");
                reply.error(errno(&e));
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let len = data.len() as u64;
        if self.shared.inject(Op::Write, offset, len) {
            self.fail("write", ino, offset, len);
            return reply.error(Errno::EIO);
        }
        // A FUSE request is at most max_write (well under 4 GiB), so the count fits.
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "faulty disk: backing write failed");
                reply.error(errno(&e));
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): nothing is buffered here, and a failing disk does not fail close.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if ino != DISK_INO {
            return reply.ok();
        }
        if self.shared.inject(Op::Sync, 0, 0) {
            self.fail("fsync", ino, 0, 0);
            return reply.error(Errno::EIO);
        }
        let res = if datasync {
            self.backing.sync_data()
        } else {
            self.backing.sync_all()
        };
        match res {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::warn!(error = %e, "faulty disk: backing fsync failed");
                reply.error(errno(&e));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.shared.inject(Op::Write, offset, length) {
            self.fail("fallocate", ino, offset, length);
            return reply.error(Errno::EIO);
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return reply.error(Errno::EINVAL);
        };
        let flags = nix::fcntl::FallocateFlags::from_bits_retain(mode);
        match nix::fcntl::fallocate(&self.backing, flags, off, len) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            // The offset given is that of the next entry.
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(mode: Mode) -> Shared {
        Shared {
            mode: Mutex::new(mode),
            errors: AtomicU64::new(0),
        }
    }

    #[test]
    fn healthy_fails_nothing() {
        let s = shared(Mode::Healthy);
        assert!(!s.inject(Op::Read, 0, 4096));
        assert!(!s.inject(Op::Write, 0, 4096));
        assert!(!s.inject(Op::Sync, 0, 0));
        assert_eq!(s.errors.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn fail_all_fails_everything_and_counts() {
        let s = shared(Mode::FailAll);
        assert!(s.inject(Op::Read, 0, 1));
        assert!(s.inject(Op::Write, 1 << 40, 1));
        assert!(s.inject(Op::Sync, 0, 0));
        assert_eq!(s.errors.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn fail_writes_spares_reads() {
        let s = shared(Mode::FailWrites);
        assert!(!s.inject(Op::Read, 0, 4096));
        assert!(s.inject(Op::Write, 0, 4096));
        assert!(s.inject(Op::Sync, 0, 0));
        assert_eq!(s.errors.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn fail_range_fails_only_overlapping_io() {
        let s = shared(Mode::FailRange {
            offset: 4096,
            len: 4096,
        });
        assert!(!s.inject(Op::Read, 0, 4096), "ends right before the range");
        assert!(s.inject(Op::Read, 4095, 2), "straddles the start");
        assert!(s.inject(Op::Write, 8191, 1), "last byte of the range");
        assert!(!s.inject(Op::Write, 8192, 4096), "starts right after the range");
        assert!(s.inject(Op::Read, 0, 1 << 20), "covers the range");
        assert!(!s.inject(Op::Sync, 0, 0), "flush works on a bad region");
        assert!(!s.inject(Op::Read, u64::MAX - 10, 100), "no overflow at the end");
        assert_eq!(s.errors.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn mountinfo_finds_the_topmost_fuse_mount_at_the_path() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 22 0:50 / /tmp/faulty-disk-7-0 rw,nosuid,nodev - fuse eac-faulty-disk rw,user_id=0
41 22 0:51 / /tmp/faulty-disk-7-1 rw - fuse.disk eac-faulty-disk rw
42 40 0:52 / /tmp/faulty-disk-7-0 rw - fuse eac-faulty-disk rw
43 22 0:53 / /tmp/with\\040space rw - fuse x rw
44 22 0:54 / /tmp/not-fuse rw - tmpfs tmpfs rw
";
        assert_eq!(parse_mountinfo(info, Path::new("/tmp/faulty-disk-7-0")), Some((0, 52)));
        assert_eq!(parse_mountinfo(info, Path::new("/tmp/faulty-disk-7-1")), Some((0, 51)));
        assert_eq!(parse_mountinfo(info, Path::new("/tmp/with space")), Some((0, 53)));
        assert_eq!(parse_mountinfo(info, Path::new("/tmp/not-fuse")), None);
        assert_eq!(parse_mountinfo(info, Path::new("/tmp/faulty-disk-7")), None);
    }
}
