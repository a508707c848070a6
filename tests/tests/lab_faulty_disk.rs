//! The failing-disk fault is real: a FUSE file whose I/O reaches the kernel and comes back as
//! `EIO` for whoever uses it, with `O_DIRECT` and without, while the data written before the
//! fault survives it; and every mount is unique and gone after drop, panic or not.
//! Privileged: run by scripts/test.sh as root (`cargo test -- --ignored`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eac_lab::faulty_disk::{Error, FaultyDisk, Mode};
use eac_lab::require_root;

const DISK_SIZE: u64 = 4 << 20;
const BLOCK: usize = 4096;

/// A scratch directory unique to this process and test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("eac-lab-fd-{}-{n}-{test}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        Scratch(dir)
    }

    /// A zero-filled backing file of DISK_SIZE bytes.
    fn backing(&self) -> PathBuf {
        let path = self.0.join("backing.img");
        File::create(&path).unwrap().set_len(DISK_SIZE).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A buffer aligned for O_DIRECT, without unsafe: a slice of an over-allocated Vec.
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let v = vec![0u8; len + BLOCK];
        let off = v.as_ptr().align_offset(BLOCK);
        Aligned { v, off, len }
    }
    fn pattern(len: usize, seed: u8) -> Self {
        let mut b = Self::zeroed(len);
        for (i, x) in b.as_mut().iter_mut().enumerate() {
            *x = (i as u8)
                .wrapping_mul(31)
                .wrapping_add((i / BLOCK) as u8)
                .wrapping_add(seed);
        }
        b
    }
    fn as_ref(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

fn read_direct(f: &File, offset: u64, len: usize) -> io::Result<Aligned> {
    let mut buf = Aligned::zeroed(len);
    let n = f.read_at(buf.as_mut(), offset)?;
    assert_eq!(n, len, "short read at {offset}");
    Ok(buf)
}

fn write_direct(f: &File, offset: u64, data: &Aligned) -> io::Result<()> {
    let n = f.write_at(data.as_ref(), offset)?;
    assert_eq!(n, data.len, "short write at {offset}");
    Ok(())
}

fn assert_eio<T: std::fmt::Debug>(res: io::Result<T>, what: &str) {
    match res {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: want EIO, got {e}"),
        Ok(v) => panic!("{what}: want EIO, got success ({v:?})"),
    }
}

/// The backing file's bytes, read without going through FUSE.
fn backing_bytes(disk: &FaultyDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(disk.backing())
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let want = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(want))
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn o_direct_writes_read_back_and_reach_the_backing_file() {
    require_root();
    let scratch = Scratch::new("rw");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    assert_eq!(std::fs::metadata(disk.path()).unwrap().len(), DISK_SIZE);

    let f = open_direct(&disk.path());
    let data = Aligned::pattern(256 << 10, 7);
    write_direct(&f, 64 << 10, &data).unwrap();
    f.sync_all().unwrap();
    let back = read_direct(&f, 64 << 10, data.len).unwrap();
    assert!(
        back.as_ref() == data.as_ref(),
        "read back differs from what was written"
    );
    assert!(
        backing_bytes(&disk, 64 << 10, data.len) == data.as_ref(),
        "backing file differs from what was written through FUSE"
    );
    assert!(
        backing_bytes(&disk, 0, 64 << 10).iter().all(|&b| b == 0),
        "bytes before the write changed"
    );
    assert_eq!(disk.errors_returned(), 0);
    assert_eq!(disk.mode(), Mode::Healthy);
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn fail_all_returns_eio_and_healing_keeps_the_data() {
    require_root();
    let scratch = Scratch::new("failall");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let f = open_direct(&disk.path());
    let data = Aligned::pattern(128 << 10, 1);
    write_direct(&f, 0, &data).unwrap();
    f.sync_data().unwrap();

    disk.set(Mode::FailAll);
    let before = disk.errors_returned();
    assert_eio(read_direct(&f, 0, BLOCK).map(|_| ()), "read");
    assert_eio(write_direct(&f, 0, &Aligned::pattern(BLOCK, 0xAA)), "write");
    assert_eio(f.sync_all(), "fsync");
    assert_eio(f.sync_data(), "fdatasync");
    // A fresh open still works (the device is there), its I/O does not.
    let g = open_direct(&disk.path());
    assert_eio(read_direct(&g, 1 << 20, BLOCK).map(|_| ()), "read on a new fd");
    let errors = disk.errors_returned() - before;
    assert!(errors >= 5, "counted {errors} injected errors, want at least 5");
    println!("FailAll: {errors} injected EIOs counted");

    disk.set(Mode::Healthy);
    let back = read_direct(&f, 0, data.len).unwrap();
    assert!(back.as_ref() == data.as_ref(), "data written before the fault changed");
    assert!(
        backing_bytes(&disk, 0, data.len) == data.as_ref(),
        "the failed write reached the backing file"
    );
    let more = Aligned::pattern(BLOCK, 9);
    write_direct(&f, 1 << 20, &more).unwrap();
    f.sync_all().unwrap();
    assert!(read_direct(&g, 1 << 20, BLOCK).unwrap().as_ref() == more.as_ref());
    assert_eq!(
        disk.errors_returned() - before,
        errors,
        "healthy I/O counted as an error"
    );
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn fail_writes_keeps_reads_working() {
    require_root();
    let scratch = Scratch::new("failwrites");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let f = open_direct(&disk.path());
    let data = Aligned::pattern(64 << 10, 3);
    write_direct(&f, 8192, &data).unwrap();

    disk.set(Mode::FailWrites);
    assert!(
        read_direct(&f, 8192, data.len).unwrap().as_ref() == data.as_ref(),
        "reads must work"
    );
    assert_eio(write_direct(&f, 8192, &Aligned::pattern(BLOCK, 0xEE)), "write");
    assert_eio(f.sync_all(), "fsync");
    assert_eio(f.set_len(0), "truncate");
    assert_eq!(disk.errors_returned(), 3);
    assert!(
        read_direct(&f, 8192, data.len).unwrap().as_ref() == data.as_ref(),
        "the failed write changed data"
    );
    assert_eq!(
        std::fs::metadata(disk.path()).unwrap().len(),
        DISK_SIZE,
        "the failed truncate changed the size"
    );
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn fail_range_fails_only_io_touching_the_range() {
    require_root();
    let scratch = Scratch::new("failrange");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let f = open_direct(&disk.path());
    let bad = 16 * BLOCK as u64;
    disk.set(Mode::FailRange {
        offset: bad,
        len: BLOCK as u64,
    });
    read_direct(&f, bad - BLOCK as u64, BLOCK).unwrap();
    read_direct(&f, bad + BLOCK as u64, BLOCK).unwrap();
    assert_eio(read_direct(&f, bad, BLOCK).map(|_| ()), "read of the bad block");
    assert_eio(
        read_direct(&f, bad - BLOCK as u64, 2 * BLOCK).map(|_| ()),
        "read straddling the bad block",
    );
    assert_eio(
        write_direct(&f, bad, &Aligned::pattern(BLOCK, 5)),
        "write of the bad block",
    );
    write_direct(&f, 0, &Aligned::pattern(BLOCK, 5)).unwrap();
    f.sync_all().unwrap();
    assert_eq!(disk.errors_returned(), 3);
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn buffered_io_sees_the_fault_at_once() {
    require_root();
    let scratch = Scratch::new("buffered");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    // No O_DIRECT: were pages cached, the second read would be served from memory.
    let f = OpenOptions::new().read(true).write(true).open(disk.path()).unwrap();
    let mut buf = [0u8; 512];
    f.read_exact_at(&mut buf, 0).unwrap();
    disk.set(Mode::FailAll);
    assert_eio(f.read_exact_at(&mut buf, 0), "buffered re-read of a page just read");
    assert_eio(f.write_all_at(&buf, 0), "buffered write");
    assert_eq!(disk.errors_returned(), 2);
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn mountpoints_are_unique_and_drop_unmounts_and_removes_them() {
    require_root();
    let scratch = Scratch::new("unique");
    let a = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let b = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let (pa, pb) = (a.mountpoint().to_owned(), b.mountpoint().to_owned());
    assert_ne!(pa, pb);
    let pid = std::process::id().to_string();
    for p in [&pa, &pb] {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.contains(&pid), "{name} does not name the pid");
        assert!(mounted(p), "{} not in /proc/mounts", p.display());
    }
    b.set(Mode::FailAll);
    let t = Instant::now();
    drop(a);
    println!("unmount took {:?}", t.elapsed());
    assert!(!mounted(&pa), "{} still mounted after drop", pa.display());
    assert!(!pa.exists(), "{} left behind", pa.display());
    // The other disk is untouched, mode included.
    assert!(mounted(&pb));
    assert_eio(
        read_direct(&open_direct(&b.path()), 0, BLOCK).map(|_| ()),
        "read on the other disk",
    );
    b.unmount().unwrap();
    assert!(!mounted(&pb) && !pb.exists());
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn drop_while_the_file_is_held_open_detaches_and_does_not_hang() {
    require_root();
    let scratch = Scratch::new("busy");
    let disk = FaultyDisk::mount(&scratch.0, scratch.backing()).unwrap();
    let mountpoint = disk.mountpoint().to_owned();
    let held = open_direct(&disk.path());
    read_direct(&held, 0, BLOCK).unwrap();
    let t = Instant::now();
    disk.unmount().unwrap();
    println!("busy unmount (lazy + abort) took {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "busy unmount waited for the grace period"
    );
    assert!(!mounted(&mountpoint), "still mounted");
    assert!(!mountpoint.exists(), "mountpoint left behind");
    let err = read_direct(&held, 0, BLOCK).map(|_| ()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "I/O on the held fd: {err}");
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn a_panicking_test_still_unmounts() {
    require_root();
    let scratch = Scratch::new("panic");
    let backing = scratch.backing();
    let parent = scratch.0.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::panic::catch_unwind(move || {
        let disk = FaultyDisk::mount(&parent, &backing).unwrap();
        let _held = open_direct(&disk.path());
        tx.send(disk.mountpoint().to_owned()).unwrap();
        panic!("expected panic: a simulated test failure while the disk is mounted and its file open");
    });
    assert!(res.is_err());
    let mountpoint = rx.recv().unwrap();
    assert!(!mounted(&mountpoint), "still mounted after the panic");
    assert!(!mountpoint.exists(), "mountpoint left behind after the panic");
}

#[test]
#[ignore = "privileged: needs root and /dev/fuse; run by scripts/test.sh"]
fn throughput_through_fuse_and_of_the_backing_file() {
    require_root();
    let scratch = Scratch::new("dd");
    let backing = scratch.0.join("big.img");
    File::create(&backing).unwrap().set_len(256 << 20).unwrap();
    let disk = FaultyDisk::mount(&scratch.0, &backing).unwrap();
    let dd = |what: &str, args: &[String]| {
        let out = Command::new("dd").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dd {what}: {err}");
        println!("{what:<24} {}", err.lines().last().unwrap_or(""));
    };
    for (name, path) in [("fuse", disk.path()), ("backing", backing.clone())] {
        let p = path.display();
        dd(
            &format!("{name} write O_DIRECT"),
            &[
                format!("of={p}"),
                "if=/dev/zero".into(),
                "bs=1M".into(),
                "count=256".into(),
                "oflag=direct".into(),
                "conv=notrunc,fsync".into(),
            ],
        );
        dd(
            &format!("{name} read O_DIRECT"),
            &[
                format!("if={p}"),
                "of=/dev/null".into(),
                "bs=1M".into(),
                "count=256".into(),
                "iflag=direct".into(),
            ],
        );
    }
    assert_eq!(disk.errors_returned(), 0);
}

#[test]
fn mount_reports_a_missing_or_wrong_backing_file() {
    // No root needed: both fail before anything is mounted.
    let scratch = Scratch::new("errors");
    let missing = scratch.0.join("missing.img");
    match FaultyDisk::mount(&scratch.0, &missing) {
        Err(e @ Error::OpenBacking { .. }) => {
            assert!(e.to_string().contains("missing.img"), "{e}");
            assert!(std::error::Error::source(&e).is_some(), "the cause is chained");
        }
        other => panic!("want OpenBacking, got {other:?}"),
    }
    // A directory cannot be opened for writing: also OpenBacking, with EISDIR as the cause.
    assert!(matches!(
        FaultyDisk::mount(&scratch.0, &scratch.0),
        Err(Error::OpenBacking { .. })
    ));
    // Nothing was left in the parent but the scratch's own files.
    let left: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
