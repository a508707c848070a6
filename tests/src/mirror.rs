//! ublk-mirror in the lab: a mirrored disk between lab hosts `a` (primary) and `b`
//! (secondary) over both availability links, the primary's NBD export on a unix socket, a
//! checksummed write workload through it driven by `qemu-io` (a client nobody here wrote),
//! and a checker that reads both backing files.
//!
//! - [`MirrorDaemon`]: one `ublk-mirror run` in a host's namespace (config written for the
//!   lab topology), status and control requests over its socket, kill -9 and restart.
//! - [`Workload`]: one long-running `qemu-io` fed a `write -P PATTERN OFFSET 4k` per
//!   line; a write counts as acknowledged when qemu-io printed `wrote 4096/4096`. The pattern
//!   byte is a function of (block, version), and consecutive versions of a block differ, so
//!   an acknowledged write that is missing on a copy is always seen.
//! - [`check_copy`]: every block of a backing file holds its last acknowledged version (or
//!   the one in flight when the client died).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Lab, wait_until, workspace_bin};

/// The block size of the workload.
pub const BLOCK: u64 = 4096;
/// The lab's pool secret.
const SECRET: &str = "lab-mirror-secret-0123456789abcdef";
/// The mirror's device id (both sides).
pub const DEVICE_ID: &str = "0xeac0de";
/// The resource name (also the NBD export name).
pub const RESOURCE: &str = "lab-disk";
/// Replication port on each availability link.
const PORT: u16 = 7789;

/// A `ublk-mirror run` daemon in a lab host.
pub struct MirrorDaemon {
    pub host: String,
    ns: String,
    child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub nbd_socket: PathBuf,
    pub backing: PathBuf,
    pub meta: PathBuf,
    pub log: PathBuf,
    starts: u32,
}

impl MirrorDaemon {
    /// Writes the configuration for `host` (role `role`) and starts the daemon.
    pub fn start(lab: &Lab, host: &str, role: &str, backing: &Path, meta: &Path, peer_timeout_ms: u64) -> MirrorDaemon {
        let h = lab.host(host);
        let peer = lab.hosts.iter().find(|p| p.name != host).expect("two hosts");
        let dir = lab.dir();
        let secret = dir.join("pool.secret");
        std::fs::write(&secret, SECRET).unwrap();
        let socket = dir.join(format!("mirror-{host}.sock"));
        let nbd_socket = dir.join(format!("nbd-{host}.sock"));
        let cfg = format!(
            r#"resource = "{RESOURCE}"
host = "{host}"
role = "{role}"
backing = "{backing}"
meta = "{meta}"
pool_secret_file = "{secret}"
control_socket = "{socket}"
peer_timeout_ms = {peer_timeout_ms}
reconnect_interval_ms = 200
nbd = "{nbd}"
[[link]]
listen = "{l1}:{PORT}"
peer = "{p1}:{PORT}"
[[link]]
listen = "{l2}:{PORT}"
peer = "{p2}:{PORT}"
"#,
            backing = backing.display(),
            meta = meta.display(),
            secret = secret.display(),
            socket = socket.display(),
            nbd = nbd_socket.display(),
            l1 = h.al_ip(1),
            p1 = peer.al_ip(1),
            l2 = h.al_ip(2),
            p2 = peer.al_ip(2),
        );
        let config = dir.join(format!("mirror-{host}.toml"));
        std::fs::write(&config, cfg).unwrap();
        let mut d = MirrorDaemon {
            host: host.to_owned(),
            ns: h.ns.name().to_owned(),
            child: None,
            config,
            socket,
            nbd_socket,
            backing: backing.to_owned(),
            meta: meta.to_owned(),
            log: dir.join(format!("mirror-{host}.log")),
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "==== start {} ====", self.starts).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(workspace_bin("ublk-mirror"))
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let what = format!("{} control socket", self.host);
        if let Err(e) = wait_until(Duration::from_secs(20), &what, || self.status().is_some()) {
            panic!("{e}\n{}", self.log());
        }
    }

    /// SIGKILL (no cleanup at all: the metadata stays "in use", as after a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the daemon again with the same configuration.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The status document, None if the daemon does not answer.
    pub fn status(&self) -> Option<Value> {
        self.request(r#"{"cmd":"status"}"#).ok()
    }

    /// One control request; Ok(answer) when `"ok": true`, Err(answer or reason) otherwise.
    pub fn request(&self, line: &str) -> Result<Value, String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(b"\n").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| format!("{e}: {answer:?}"))?;
        if v["ok"] == true { Ok(v) } else { Err(v.to_string()) }
    }

    /// A status field as a string ("" when absent).
    pub fn field(&self, key: &str) -> String {
        self.status()
            .and_then(|s| s[key].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits until `cond(status)` holds; panics with both the status and the log if not.
    pub fn wait(&self, timeout: Duration, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Duration {
        let mut last = Value::Null;
        let r = wait_until(timeout, &format!("{}: {what}", self.host), || match self.status() {
            Some(s) => {
                let ok = cond(&s);
                last = s;
                ok
            }
            None => false,
        });
        match r {
            Ok(d) => d,
            Err(e) => panic!("{e}\nlast status: {last:#}\nlog:\n{}", tail(&self.log(), 60)),
        }
    }

    /// The NBD URL of this daemon's export (served while it is primary).
    pub fn nbd_url(&self) -> String {
        format!("nbd+unix:///{RESOURCE}?socket={}", self.nbd_socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MirrorDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of a log.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Creates a zero-filled backing file and its metadata with `ublk-mirror create-meta`.
pub fn create_side(dir: &Path, name: &str, size: u64, consistent: bool) -> (PathBuf, PathBuf) {
    let backing = dir.join(format!("{name}.img"));
    let meta = dir.join(format!("{name}.meta"));
    std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
    let mut cmd = Command::new(workspace_bin("ublk-mirror"));
    cmd.args(["create-meta", "--meta", meta.to_str().unwrap(), "--backing"])
        .arg(&backing)
        .args(["--device-id", DEVICE_ID]);
    if consistent {
        cmd.arg("--consistent");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "create-meta: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (backing, meta)
}

/// The pattern byte of `version` of `block` (never 0; consecutive versions differ).
pub fn pattern(block: u64, version: u32) -> u8 {
    ((block * 131 + u64::from(version) * 29) % 251 + 1) as u8
}

/// What the workload knows about every block.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// The last acknowledged version per block (0 = never written: zeroes).
    pub acked: Vec<u32>,
    /// A write that was in flight when the client failed: (block → version).
    pub maybe: HashMap<u64, u32>,
    /// Acknowledged writes in total.
    pub ok: u64,
    /// Failed writes (the guest would have seen an error), with qemu-io's message.
    pub errors: Vec<String>,
    /// The slowest acknowledged write.
    pub max_latency: Duration,
}

impl Ledger {
    pub fn new(blocks: u64) -> Ledger {
        Ledger {
            acked: vec![0; blocks as usize],
            ..Ledger::default()
        }
    }
}

/// A running write workload through one NBD export.
pub struct Workload {
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workload {
    /// Starts `qemu-io` on `url` and writes random blocks (`seed`) until stopped or the
    /// client fails.
    pub fn start(url: &str, ledger: Ledger, seed: u64) -> Workload {
        let ledger = Arc::new(Mutex::new(ledger));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, url) = (ledger.clone(), stop.clone(), url.to_owned());
        let thread = std::thread::spawn(move || run_workload(&url, &l, &s, seed));
        Workload {
            ledger,
            stop,
            thread: Some(thread),
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        self.ledger.lock().unwrap().ok
    }

    /// Waits until `n` more writes were acknowledged (panics after `timeout`).
    pub fn wait_more(&self, n: u64, timeout: Duration) {
        let start = self.acked();
        if let Err(e) = wait_until(timeout, &format!("{n} more acknowledged writes"), || {
            self.acked() >= start + n || self.finished()
        }) {
            panic!("{e}; ledger errors: {:?}", self.ledger.lock().unwrap().errors);
        }
    }

    /// The client stopped on its own (failed).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the client and returns the ledger.
    pub fn stop(mut self) -> Ledger {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.ledger.lock().unwrap().clone()
    }
}

fn run_workload(url: &str, ledger: &Mutex<Ledger>, stop: &AtomicBool, seed: u64) {
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(format!("exec qemu-io -f raw '{url}' 2>&1"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            ledger.lock().unwrap().errors.push(format!("cannot start qemu-io: {e}"));
            return;
        }
    };
    let mut stdin: ChildStdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let blocks = ledger.lock().unwrap().acked.len() as u64;
    let mut x = seed | 1;
    while !stop.load(Ordering::SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % blocks;
        let version = ledger.lock().unwrap().acked[block as usize] + 1;
        let cmd = format!("write -P {} {} {}\n", pattern(block, version), block * BLOCK, BLOCK);
        let t0 = Instant::now();
        if stdin.write_all(cmd.as_bytes()).is_err() {
            let mut l = ledger.lock().unwrap();
            l.maybe.insert(block, version);
            l.errors.push("qemu-io exited".into());
            break;
        }
        let outcome = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("wrote ") => break Ok(()),
                Ok(line) if line.contains("failed") || line.contains("rror") => break Err(line),
                Ok(_) => continue,
                Err(_) => break Err("no answer from qemu-io within 60 s (or it exited)".into()),
            }
        };
        let mut l = ledger.lock().unwrap();
        match outcome {
            Ok(()) => {
                l.acked[block as usize] = version;
                l.maybe.remove(&block);
                l.ok += 1;
                l.max_latency = l.max_latency.max(t0.elapsed());
            }
            Err(e) => {
                l.maybe.insert(block, version);
                l.errors.push(e);
                break;
            }
        }
    }
    let _ = stdin.write_all(b"quit\n");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Checks every block of a backing file against the ledger; returns the mismatches.
pub fn check_copy(path: &Path, ledger: &Ledger) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut bad = Vec::new();
    let mut buf = vec![0u8; BLOCK as usize];
    for (block, &v) in ledger.acked.iter().enumerate() {
        let block = block as u64;
        f.read_exact_at(&mut buf, block * BLOCK).unwrap();
        let want = if v == 0 { 0 } else { pattern(block, v) };
        let also = ledger.maybe.get(&block).map(|&m| pattern(block, m));
        let fill = |b: u8| buf.iter().all(|&x| x == b);
        if !(fill(want) || also.is_some_and(fill)) {
            if bad.len() < 20 {
                bad.push(format!(
                    "{}: block {block} (version {v}) should be {want:#04x}{}, starts with {:02x?}",
                    path.display(),
                    also.map(|a| format!(" or {a:#04x}")).unwrap_or_default(),
                    &buf[..8]
                ));
            } else {
                bad.push(String::new());
            }
        }
    }
    bad
}

/// True when two files have the same bytes (the size of the smaller; the mirror's size).
pub fn same_bytes(a: &Path, b: &Path, size: u64) -> Result<(), String> {
    let fa = std::fs::File::open(a).map_err(|e| e.to_string())?;
    let fb = std::fs::File::open(b).map_err(|e| e.to_string())?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off).map_err(|e| e.to_string())?;
        fb.read_exact_at(&mut bb[..n], off).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            return Err(format!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            ));
        }
        off += n as u64;
    }
    Ok(())
}

/// Runs `qemu-io` with one command per `-c` on `url`; returns its output (fails on error).
pub fn qemu_io(url: &str, cmds: &[&str]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", url]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.output().map_err(|e| format!("qemu-io: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("failed") || text.contains("Pattern verification failed") {
        return Err(text);
    }
    Ok(text)
}
