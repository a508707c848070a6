//! The block-device interface every part of the mirror speaks, and the local backing store.
//!
//! [`BlockDev`] is what a frontend (the NBD export, the ublk device) serves and what the
//! mirror engine implements: byte-addressed reads and writes with FUA, flush, discard and
//! write-zeroes, each answering either success or an errno ([`IoError`]) that the frontend
//! hands to the guest unchanged. [`LocalDisk`] is a file or block device on this host.
//!
//! # Why local I/O runs on blocking threads (for now)
//!
//! `LocalDisk` issues `pread`/`pwrite`/`fdatasync` on tokio's blocking pool: each request is
//! one system call on a thread, so up to the pool size (512) requests are in flight at once
//! and the page cache / block layer see the guest's queue depth. It is simple and obviously
//! correct about durability (a write is durable once `fdatasync` returned after it). io_uring
//! for the local path is a later optimisation if the benchmark shows the thread hops cost.
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

/// A block I/O failure as the guest will see it: a positive errno (`libc::EIO`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError(pub i32);

impl IoError {
    /// Generic I/O error.
    pub const EIO: IoError = IoError(libc::EIO);
    /// Request outside the device, misaligned, or otherwise invalid.
    pub const EINVAL: IoError = IoError(libc::EINVAL);
    /// Operation not supported by this device.
    pub const EOPNOTSUPP: IoError = IoError(libc::EOPNOTSUPP);
    /// The device has no room (thin backing full).
    pub const ENOSPC: IoError = IoError(libc::ENOSPC);

    /// The errno of an `io::Error`, `EIO` if it has none.
    pub fn from_io(e: &io::Error) -> IoError {
        IoError(e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO))
    }

    /// The same failure as an `io::Error`.
    pub fn to_io(self) -> io::Error {
        io::Error::from_raw_os_error(self.0)
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.to_io(), self.0)
    }
}

impl std::error::Error for IoError {}

impl From<io::Error> for IoError {
    fn from(e: io::Error) -> Self {
        IoError::from_io(&e)
    }
}

/// The result of one block request.
pub type IoResult<T> = std::result::Result<T, IoError>;

/// A byte-addressed block device. Offsets and lengths are in bytes; callers keep them
/// within [`BlockDev::size`] (implementations still check and answer `EINVAL`).
///
/// Semantics are those of the Linux block layer: a completed write is visible to later
/// reads; it is durable once a later [`flush`](BlockDev::flush) completed, or at once when it
/// was written with `fua`. Requests in flight at the same time may complete in any order.
pub trait BlockDev: Send + Sync + 'static {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = IoResult<Bytes>> + Send;

    /// Writes `data` at `offset`; with `fua`, durable before it completes.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = IoResult<()>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = IoResult<()>> + Send;

    /// The range may be deallocated; reads of it return zeroes or the old data.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = IoResult<()>> + Send;

    /// The range reads back as zeroes afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = IoResult<()>> + Send;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> IoResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::EINVAL),
    }
}

/// A local file or block device used as backing store.
#[derive(Debug, Clone)]
pub struct LocalDisk {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    size: u64,
    is_block: bool,
}

impl LocalDisk {
    /// Opens `path` read-write. A regular file's size is its length, a block device's its
    /// capacity (`BLKGETSIZE64`, via seeking to the end).
    pub fn open(path: &Path) -> io::Result<LocalDisk> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let size = if is_block {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(LocalDisk {
            inner: Arc::new(Inner {
                file,
                path: path.to_owned(),
                size: size & !511,
                is_block,
            }),
        })
    }

    /// Creates (or truncates) a regular file of `size` bytes and opens it.
    pub fn create(path: &Path, size: u64) -> io::Result<LocalDisk> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.set_len(size)?;
        drop(f);
        LocalDisk::open(path)
    }

    /// The path this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// [`BlockDev::write`] on the calling thread (which may block): for code already on the
    /// blocking pool, saving the hop.
    pub fn write_blocking(&self, offset: u64, data: &[u8], fua: bool) -> IoResult<()> {
        check_range(self.size(), offset, data.len() as u64)?;
        self.inner.write(offset, data, fua).map_err(IoError::from)
    }

    /// [`BlockDev::discard`] on the calling thread (which may block).
    pub fn discard_blocking(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(self.size(), offset, len)?;
        self.inner.discard(offset, len).map_err(IoError::from)
    }

    /// [`BlockDev::write_zeroes`] on the calling thread (which may block).
    pub fn write_zeroes_blocking(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(self.size(), offset, len)?;
        self.inner.write_zeroes(offset, len).map_err(IoError::from)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> IoResult<T> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r.map_err(IoError::from),
            Err(_) => Err(IoError::EIO),
        }
    }
}

impl BlockDev for LocalDisk {
    fn size(&self) -> u64 {
        self.inner.size
    }

    async fn read(&self, offset: u64, len: usize) -> IoResult<Bytes> {
        check_range(self.size(), offset, len as u64)?;
        self.blocking(move |d| {
            let mut buf = vec![0u8; len];
            d.file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoResult<()> {
        check_range(self.size(), offset, data.len() as u64)?;
        self.blocking(move |d| d.write(offset, &data, fua)).await
    }

    async fn flush(&self) -> IoResult<()> {
        self.blocking(|d| d.file.sync_data()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(self.size(), offset, len)?;
        self.blocking(move |d| d.discard(offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(self.size(), offset, len)?;
        self.blocking(move |d| d.write_zeroes(offset, len)).await
    }
}

impl Inner {
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block {
            // A block device discard is advisory; data may stay. Zeroing would cost a
            // full write, so it is left to the device's own discard (not issued here).
            return Ok(());
        }
        punch_hole(&self.file, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.is_block && punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Deallocates a range of a regular file; it reads back as zeroes.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        l,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("eac-dev-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn local_disk_reads_back_writes_and_zeroes() {
        let p = tmp("rw");
        let d = LocalDisk::create(&p, 1 << 20).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write(4096, Bytes::from(vec![7u8; 8192]), false).await.unwrap();
        d.flush().await.unwrap();
        assert_eq!(&d.read(4096, 8192).await.unwrap()[..], &[7u8; 8192][..]);
        d.write_zeroes(4096, 4096).await.unwrap();
        let r = d.read(4096, 8192).await.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0) && r[4096..].iter().all(|&b| b == 7));
        d.discard(8192, 4096).await.unwrap();
        assert!(d.read(8192, 4096).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(d.read((1 << 20) - 512, 1024).await, Err(IoError::EINVAL));
        assert_eq!(
            d.write(u64::MAX, Bytes::from_static(b"x"), true).await,
            Err(IoError::EINVAL)
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn io_error_keeps_the_errno() {
        assert_eq!(
            IoError::from(io::Error::from_raw_os_error(libc::ENOSPC)),
            IoError::ENOSPC
        );
        assert_eq!(IoError::from(io::Error::other("x")), IoError::EIO);
        assert!(IoError::EIO.to_string().contains("errno 5"));
    }
}
