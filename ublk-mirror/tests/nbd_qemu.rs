//! The NBD export against QEMU's own NBD client: `ublk-mirror nbd-local` serves a temp file,
//! `qemu-io`, `qemu-img` and `qemu-nbd` (Debian's qemu-utils) talk to it over a unix socket
//! or loopback TCP, and the backing file is compared byte for byte with the image the test
//! expects. Not privileged. A missing QEMU tool fails the test with the reason.
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ublk-mirror");
const MIB: u64 = 1 << 20;

/// The absolute path of a QEMU tool; panics (the test fails) when it is not installed.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed (apt-get install qemu-utils; scripts/setup.sh does): this test needs it");
}

/// A directory under /tmp removed on drop (also when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "eac-nbd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ublk-mirror nbd-local` as a child process; SIGTERM + reap on drop.
struct Server {
    child: Option<Child>,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(backing: &Path, listen: &str, log: PathBuf) -> Server {
        let mut child = Command::new(BIN)
            .args(["nbd-local", "--backing"])
            .arg(backing)
            .args(["--listen", listen, "--export", "exp"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Server {
            child: Some(child),
            url: String::new(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if !line.trim().is_empty() => server.url = line.trim().to_owned(),
            _ => panic!("nbd-local printed no URL; its log:\n{}", server.log_text()),
        }
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the process must exit 0 within 10 s (graceful shutdown).
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        terminate(&child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "nbd-local exited with {st}; log:\n{}", self.log_text());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nbd-local ignored SIGTERM for 10 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn terminate(child: &Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command to completion within `timeout` (killed and failed after it).
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `qemu-io -f raw -d unmap -c CMD… URL`; every command must succeed.
fn qemu_io(url: &str, cmds: &[String]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", "-d", "unmap"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(url);
    let o = run(&mut c, Duration::from_secs(120));
    let t = text(&o);
    let lower = t.to_lowercase();
    assert!(
        o.status.success() && !lower.contains("failed") && !lower.contains("error"),
        "qemu-io {cmds:?} on {url}: {}\n{t}",
        o.status
    );
    t
}

fn qemu_img(args: &[&str]) -> String {
    let o = run(Command::new(tool("qemu-img")).args(args), Duration::from_secs(300));
    let t = text(&o);
    assert!(o.status.success(), "qemu-img {args:?}: {}\n{t}", o.status);
    t
}

/// A small deterministic generator (xorshift64*), seeded per run and printed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("random seed {seed:#x}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The image the test expects, built alongside the commands it sends.
struct Image(Vec<u8>);

impl Image {
    fn write(&mut self, cmds: &mut Vec<String>, verify: &mut Vec<String>, flags: &str, pat: u8, off: u64, len: u64) {
        cmds.push(format!("write {flags} -P {pat:#04x} {off} {len}"));
        verify.push(format!("read -P {pat:#04x} {off} {len}"));
        self.0[off as usize..(off + len) as usize].fill(pat);
    }
    fn zero(&mut self, cmds: &mut Vec<String>, verify: &mut Vec<String>, cmd: &str, off: u64, len: u64) {
        cmds.push(format!("{cmd} {off} {len}"));
        verify.push(format!("read -P 0 {off} {len}"));
        self.0[off as usize..(off + len) as usize].fill(0);
    }
}

fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, expected {:#04x})",
            got[i], want[i]
        );
    }
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Whether `[off, off + len)` of `path` is allocated (no hole), via SEEK_HOLE.
fn allocated(path: &Path, off: u64, len: u64) -> bool {
    use nix::unistd::{Whence, lseek};
    let f = std::fs::File::open(path).unwrap();
    let hole = lseek(f.as_fd(), off as i64, Whence::SeekHole).unwrap() as u64;
    hole >= off + len
}

/// Whether `[off, off + len)` of `path` is entirely a hole, via SEEK_DATA.
fn is_hole(path: &Path, off: u64, len: u64) -> bool {
    use nix::unistd::{Whence, lseek};
    let f = std::fs::File::open(path).unwrap();
    match lseek(f.as_fd(), off as i64, Whence::SeekData) {
        Ok(data) => data as u64 >= off + len,
        Err(nix::errno::Errno::ENXIO) => true,
        Err(e) => panic!("SEEK_DATA: {e}"),
    }
}

/// Whether the filesystem under `dir` deallocates punched ranges (ext4, xfs, tmpfs do).
fn punches_holes(dir: &Path) -> bool {
    use nix::fcntl::{FallocateFlags, fallocate};
    let p = dir.join("probe");
    std::fs::write(&p, vec![1u8; 1 << 16]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.sync_all().unwrap();
    let ok = fallocate(
        f.as_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        1 << 16,
    )
    .is_ok()
        && is_hole(&p, 0, 1 << 16);
    std::fs::remove_file(&p).unwrap();
    ok
}

#[test]
fn qemu_io_writes_reach_the_backing_file_byte_for_byte() {
    let dir = TempDir::new("io");
    let backing = dir.path("disk.raw");
    let size = 32 * MIB;
    sparse_file(&backing, size);
    let sock = dir.path("nbd.sock");
    let server = Server::start(&backing, sock.to_str().unwrap(), dir.path("server.log"));
    assert_eq!(server.url, format!("nbd+unix:///exp?socket={}", sock.display()));

    let mut img = Image(vec![0u8; size as usize]);
    let (mut cmds, mut verify) = (Vec::new(), Vec::new());
    img.write(&mut cmds, &mut verify, "", 0xab, 0, MIB);
    img.write(&mut cmds, &mut verify, "-f", 0xcd, MIB, 64 << 10); // FUA
    img.write(&mut cmds, &mut verify, "", 0x11, 2 * MIB, 2 * MIB);
    verify.pop(); // 2–4 MiB is partly overwritten below; verified after that
    img.zero(&mut cmds, &mut verify, "write -z", 2 * MIB, MIB); // NBD_CMD_FLAG_NO_HOLE
    img.zero(&mut cmds, &mut verify, "write -z -u", 3 * MIB, MIB / 2); // may punch a hole
    verify.push(format!("read -P 0x11 {} {}", 3 * MIB + MIB / 2, MIB / 2));
    img.write(&mut cmds, &mut verify, "", 0x22, 5 * MIB, MIB);
    verify.pop(); // discarded next
    // LocalDisk punches a hole for a discard on a regular file, so it reads back as zeroes.
    img.zero(&mut cmds, &mut verify, "discard", 5 * MIB, MIB);
    cmds.push("flush".into());
    img.write(&mut cmds, &mut verify, "", 0x77, 6 * MIB + 12345, 1000); // unaligned: QEMU RMW
    // Random writes, one per 512 KiB slot in 8..32 MiB so every one can be verified.
    let mut rng = Rng::seeded();
    for slot in 0..48u64 {
        let base = 8 * MIB + slot * (MIB / 2);
        let len = 512 * (1 + rng.below(1024));
        let off = base + 512 * rng.below((MIB / 2 - len) / 512 + 1);
        let pat = 1 + rng.below(255) as u8;
        let flags = if rng.below(4) == 0 { "-f" } else { "" };
        img.write(&mut cmds, &mut verify, flags, pat, off, len);
    }
    cmds.push("flush".into());
    qemu_io(&server.url, &cmds);
    // Read back through NBD in a fresh connection; then the zeroes nobody wrote.
    verify.push(format!("read -P 0 {} {}", 4 * MIB, MIB));
    qemu_io(&server.url, &verify);

    let file = std::fs::read(&backing).unwrap();
    assert_same_bytes("backing file", &file, &img.0);
    // NO_HOLE kept 2–3 MiB provisioned; `write -z -u` and discard may deallocate.
    assert!(allocated(&backing, 2 * MIB, MIB), "write -z (NO_HOLE) left a hole");
    if punches_holes(&dir.0) {
        assert!(is_hole(&backing, 3 * MIB, MIB / 2), "write -z -u did not deallocate");
        assert!(is_hole(&backing, 5 * MIB, MIB), "discard did not deallocate");
    } else {
        eprintln!("this filesystem does not punch holes: deallocation not checked");
    }
    server.stop();
    assert!(!sock.exists(), "the unix socket was not removed on shutdown");
}

#[test]
fn qemu_img_convert_and_compare_64m_over_tcp() {
    let dir = TempDir::new("img");
    let size = 64 * MIB;
    // Source: random data with every fourth MiB left zero; target starts as junk (0xff),
    // so the zero MiBs must be written as zeroes through NBD too.
    let mut rng = Rng::seeded();
    let mut src = vec![0u8; size as usize];
    for (i, mb) in src.chunks_mut(MIB as usize).enumerate() {
        if i % 4 != 3 {
            rng.fill(mb);
        }
    }
    let src_path = dir.path("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    let backing = dir.path("target.raw");
    std::fs::write(&backing, vec![0xffu8; size as usize]).unwrap();
    let server = Server::start(&backing, "127.0.0.1:0", dir.path("server.log"));
    assert!(
        server.url.starts_with("nbd://127.0.0.1:") && server.url.ends_with("/exp"),
        "{}",
        server.url
    );
    let url = server.url.clone();

    let t = Instant::now();
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src_path.to_str().unwrap(),
        &url,
    ]);
    let t_in = t.elapsed();
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", src_path.to_str().unwrap(), &url]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let out = dir.path("out.raw");
    let t = Instant::now();
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &url, out.to_str().unwrap()]);
    let t_out = t.elapsed();
    eprintln!(
        "qemu-img convert 64 MiB over NBD/TCP: in {:.0} MiB/s, out {:.0} MiB/s",
        64.0 / t_in.as_secs_f64(),
        64.0 / t_out.as_secs_f64()
    );
    assert_same_bytes("image read back through NBD", &std::fs::read(&out).unwrap(), &src);
    assert_same_bytes("backing file", &std::fs::read(&backing).unwrap(), &src);
    // A difference is seen through NBD too (compare is not vacuous).
    qemu_io(&url, &["write -P 0x42 4096 512".to_owned()]);
    let o = run(
        Command::new(tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", src_path.to_str().unwrap(), &url]),
        Duration::from_secs(120),
    );
    assert_eq!(o.status.code(), Some(1), "compare after a change: {}", text(&o));
    server.stop();
}

#[test]
fn parallel_requests_and_connections() {
    let dir = TempDir::new("par");
    let backing = dir.path("disk.raw");
    let size = 64 * MIB;
    sparse_file(&backing, size);
    let sock = dir.path("nbd.sock");
    let server = Server::start(&backing, sock.to_str().unwrap(), dir.path("server.log"));
    let url = server.url.clone();
    let mut img = vec![0u8; size as usize];

    // 1. 64 aio writes queued at once in one qemu-io (QEMU keeps up to 16 in flight).
    let mut cmds = Vec::new();
    let mut verify = Vec::new();
    for i in 0..64u64 {
        let (off, len, pat) = (i * 128 * 1024, 96 * 1024, (i + 1) as u8);
        cmds.push(format!("aio_write -P {pat} {off} {len}"));
        verify.push(format!("read -P {pat} {off} {len}"));
        img[off as usize..(off + len) as usize].fill(pat);
    }
    cmds.push("aio_flush".into());
    qemu_io(&url, &cmds);
    qemu_io(&url, &verify);

    // 2. qemu-img bench: 4096 writes of 4 KiB at queue depth 32, 8..24 MiB, one pattern.
    qemu_img(&[
        "bench",
        "-w",
        "-f",
        "raw",
        "-d",
        "32",
        "-c",
        "4096",
        "-s",
        "4096",
        "-o",
        "8388608",
        "--pattern",
        "90",
        &url,
    ]);
    img[8 << 20..24 << 20].fill(90);
    qemu_io(&url, &[format!("read -P 90 {} {}", 8 * MIB, 16 * MIB)]);

    // 3. Four clients at once on separate connections (the export offers multi-conn).
    let procs: Vec<_> = (0..4u64)
        .map(|k| {
            let base = 32 * MIB + k * 8 * MIB;
            let pat = 0xa0 + k as u8;
            img[base as usize..(base + 8 * MIB) as usize].fill(pat);
            let mut c = Command::new(tool("qemu-io"));
            c.args(["-f", "raw"]);
            for j in 0..8 {
                c.args(["-c", &format!("aio_write -P {pat} {} {}", base + j * MIB, MIB)]);
            }
            c.args(["-c", "aio_flush", "-c", &format!("read -P {pat} {base} {}", 8 * MIB)]);
            c.arg(&url);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for p in procs {
        let o = p.wait_with_output().unwrap();
        let t = text(&o);
        assert!(o.status.success() && !t.to_lowercase().contains("fail"), "{t}");
    }
    assert_same_bytes("backing file", &std::fs::read(&backing).unwrap(), &img);

    // LIST and INFO through qemu-nbd's client.
    let o = run(
        Command::new(tool("qemu-nbd")).args(["--list", "-k", sock.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for want in [
        "export: 'exp'",
        &format!("size:  {size}"),
        "min block: 512",
        "max block: 33554432",
        "multi",
    ] {
        assert!(t.contains(want), "qemu-nbd --list lacks {want:?}:\n{t}");
    }
    server.stop();
}

/// Parses "Run completed in 1.234 seconds." from qemu-img bench.
fn bench_secs(out: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no run time in qemu-img bench output:\n{out}"))
}

#[test]
fn bench_nbd_against_the_raw_file() {
    let dir = TempDir::new("bench");
    let size = 256 * MIB;
    let raw = dir.path("raw.img");
    let backing = dir.path("nbd.img");
    sparse_file(&raw, size);
    sparse_file(&backing, size);
    let server = Server::start(&backing, dir.path("nbd.sock").to_str().unwrap(), dir.path("server.log"));
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    eprintln!("qemu-img bench writes, same run (server: {build} build):");
    for (label, count, bs, depth) in [("4 KiB QD32", 20000u64, 4096u64, 32), ("1 MiB QD4", 256, MIB, 4)] {
        for (target, url) in [
            ("raw file", raw.to_str().unwrap().to_owned()),
            ("NBD", server.url.clone()),
        ] {
            let out = qemu_img(&[
                "bench",
                "-w",
                "-f",
                "raw",
                "-d",
                &depth.to_string(),
                "-c",
                &count.to_string(),
                "-s",
                &bs.to_string(),
                &url,
            ]);
            let secs = bench_secs(&out);
            eprintln!(
                "  {label:<11} {target:<9} {:>8.0} IOPS {:>8.1} MiB/s",
                count as f64 / secs,
                (count * bs) as f64 / MIB as f64 / secs
            );
        }
    }
    server.stop();
}

#[test]
fn nbd_local_rejects_bad_input_with_usage_exit() {
    let dir = TempDir::new("bad");
    let backing = dir.path("disk.raw");
    sparse_file(&backing, MIB);
    for (args, want) in [
        (
            vec!["--backing", backing.to_str().unwrap(), "--listen", "nonsense"],
            "invalid NBD listen address",
        ),
        (
            vec!["--backing", "/nonexistent/disk", "--listen", "127.0.0.1:0"],
            "/nonexistent/disk",
        ),
    ] {
        let o = run(Command::new(BIN).arg("nbd-local").args(&args), Duration::from_secs(10));
        let t = text(&o);
        assert_eq!(o.status.code(), Some(eac_common::EXIT_USAGE), "{t}");
        assert!(t.contains(want), "{t}");
    }
}
