//! The ublk guest: a QEMU guest booting Debian's 6.12 kernel (which has ublk_drv) through
//! `scripts/lab/run-vm.sh`. The guest sees the host's root read-only, so workspace binaries
//! run in it unchanged; each run gets a fresh, unique, writable share directory that is
//! the command's working directory in the guest and is removed when the [`GuestRun`] is
//! dropped. Machine-readable results go into files in the share, not the console.
//!
//! Each boot costs about 5 s under TCG: put as many checks as possible into one run.
//!
//! ```no_run
//! use eac_lab::ublk_guest::{skip_reason, UblkGuest};
//! if let Some(why) = skip_reason() {
//!     eprintln!("skipped: {why}");
//!     return;
//! }
//! let run = UblkGuest::new().run_script("test -c /dev/ublk-control && echo yes > ctl").unwrap();
//! assert_eq!(run.status, Some(0), "{}", run.transcript());
//! assert_eq!(run.read("ctl").unwrap().trim(), "yes");
//! ```
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The guest kernel release run-vm.sh boots by default (package
/// `linux-image-6.12.107+deb12-amd64-unsigned`, installed by scripts/setup.sh).
pub const GUEST_KVER: &str = "6.12.107+deb12-amd64";

/// Default limit for one guest run (boot ≈ 5 s under TCG, plus the command).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// Failures of the guest wrapper itself (not of the command run in the guest).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot create the share directory {}", path.display())]
    Share {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {}", script.display())]
    Spawn {
        script: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`cargo build -p {package}` failed ({status}):\n{stderr}")]
    Build {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run cargo to build {package}")]
    Cargo {
        package: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot locate the target directory from the test executable")]
    TargetDir(#[source] io::Error),
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `<root>/scripts/lab/run-vm.sh`.
pub fn run_vm_script() -> PathBuf {
    repo_root().join("scripts/lab/run-vm.sh")
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .any(|d| std::fs::metadata(d.join(prog)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    })
}

/// Why guest tests cannot run on this machine, or `None` when they can. Tests print the
/// reason and return instead of failing where the lab is not installed.
pub fn skip_reason() -> Option<String> {
    let kver = std::env::var("KVER").unwrap_or_else(|_| GUEST_KVER.to_owned());
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{kver}"));
    let script = run_vm_script();
    let mut why = Vec::new();
    if !script.is_file() {
        why.push(format!("{} is missing", script.display()));
    }
    if std::fs::File::open(&kernel).is_err() {
        why.push(format!(
            "no guest kernel {} (apt-get install linux-image-{kver}-unsigned; scripts/setup.sh does)",
            kernel.display()
        ));
    }
    if !Path::new(&format!("/lib/modules/{kver}/modules.dep")).is_file() {
        why.push(format!("no modules for {kver} in /lib/modules"));
    }
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned());
    let qemu_found = if Path::new(&qemu).is_absolute() {
        Path::new(&qemu).is_file()
    } else {
        in_path(&qemu)
    };
    if !qemu_found {
        why.push(format!("no {qemu} (apt-get install qemu-system-x86)"));
    }
    if !Path::new("/bin/busybox").is_file() {
        why.push("no /bin/busybox (apt-get install busybox-static)".to_owned());
    }
    for tool in ["cpio", "xz", "setsid"] {
        if !in_path(tool) {
            why.push(format!("no {tool} in PATH"));
        }
    }
    (!why.is_empty()).then(|| format!("ublk guest unavailable: {}", why.join("; ")))
}

/// The profile directory the running test executable was built into (`target/debug`
/// for `target/debug/deps/foo-HASH`), where workspace binaries are built too.
pub fn profile_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("EAC_PROFILE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(Error::TargetDir)?;
    let deps = exe
        .parent()
        .ok_or_else(|| Error::TargetDir(io::Error::other("no parent")))?;
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent()
    } else {
        Some(deps)
    };
    dir.map(Path::to_path_buf)
        .ok_or_else(|| Error::TargetDir(io::Error::other(format!("{} has no profile dir", exe.display()))))
}

/// Builds binary `bin` of workspace package `package` in the profile the tests run with
/// (a no-op of ~0.3 s when it is fresh) and returns its path. Cargo does not build the
/// binaries of other crates for an integration test, so a test must not rely on a stale
/// or missing one.
pub fn build_workspace_bin(package: &str, bin: &str) -> Result<PathBuf, Error> {
    let dir = profile_dir()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| Error::Cargo {
        package: package.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Build {
            package: package.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(dir.join(bin))
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A configured guest. Every [`UblkGuest::run_script`] / [`UblkGuest::run`] is one boot.
#[derive(Debug, Clone)]
pub struct UblkGuest {
    timeout: Duration,
    mem: String,
    smp: u32,
    modules: Vec<String>,
    verbose: bool,
    netns: Option<String>,
    nics: Vec<(String, String)>,
}

impl Default for UblkGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl UblkGuest {
    /// 2 vCPUs, 2 GiB, [`DEFAULT_TIMEOUT`], ublk_drv loaded.
    pub fn new() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            mem: "2G".into(),
            smp: 2,
            modules: Vec::new(),
            verbose: false,
            netns: None,
            nics: Vec::new(),
        }
    }
    /// Kill the guest after this long (the run then has status 125).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Guest RAM, QEMU syntax ("2G").
    pub fn mem(mut self, mem: &str) -> Self {
        self.mem = mem.to_owned();
        self
    }
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }
    /// Extra kernel modules to modprobe in the guest (e.g. "brd", "null_blk").
    pub fn module(mut self, m: &str) -> Self {
        self.modules.push(m.to_owned());
        self
    }
    /// Show kernel messages on the console.
    pub fn verbose(mut self, v: bool) -> Self {
        self.verbose = v;
        self
    }

    /// Runs QEMU inside network namespace `name` (`/run/netns/<name>`, e.g. a
    /// [`crate::netns::Netns`]), where the tap devices given with [`UblkGuest::tap`] live.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }
    /// Adds a virtio NIC on the existing tap device `tap` (in the [`UblkGuest::netns`]
    /// namespace) with guest address `cidr`; the Nth call gives the guest's eth(N-1).
    pub fn tap(mut self, tap: &str, cidr: &str) -> Self {
        self.nics.push((tap.to_owned(), cidr.to_owned()));
        self
    }

    /// Runs `script` with `bash -c` in the guest; its cwd is the run's share directory.
    pub fn run_script(&self, script: &str) -> Result<GuestRun, Error> {
        self.run(&["bash", "-c", script])
    }

    /// Runs `argv` in the guest (cwd = the run's share directory) and waits for it.
    ///
    /// A guest kernel that crashes *before* init reported "ready" (seen once in a while
    /// under TCG on a loaded machine, before any of the test's work started) is booted once
    /// more, and the first console is printed; a failure after "ready" is the test's.
    pub fn run(&self, argv: &[&str]) -> Result<GuestRun, Error> {
        let first = self.spawn(argv)?.wait()?;
        if first.status != Some(125) || first.stdout.contains("] ready") {
            return Ok(first);
        }
        eprintln!(
            "ublk guest: the guest crashed during boot, before the command started; booting once more. \
             First console:\n{}",
            first.transcript()
        );
        self.spawn(argv)?.wait()
    }

    /// Boots the guest running `script` with `bash -c` and returns at once: the host side
    /// of a test can work with the guest while it runs (files in [`RunningGuest::share`]
    /// are the usual rendezvous).
    pub fn spawn_script(&self, script: &str) -> Result<RunningGuest, Error> {
        self.spawn(&["bash", "-c", script])
    }

    /// Boots the guest running `argv` (cwd = the run's share directory) and returns at once.
    pub fn spawn(&self, argv: &[&str]) -> Result<RunningGuest, Error> {
        let share = ShareDir::new()?;
        let script = run_vm_script();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(&script);
                c
            }
            None => Command::new(&script),
        };
        for (tap, cidr) in &self.nics {
            cmd.args(["--net-tap", tap, "--ip", cidr]);
        }
        cmd.current_dir(share.path())
            .arg("--share")
            .arg(share.path())
            .args(["--timeout", &self.timeout.as_secs().max(1).to_string()])
            .args(["--mem", &self.mem, "--smp", &self.smp.to_string()]);
        if !self.modules.is_empty() {
            cmd.args(["--modules", &self.modules.join(" ")]);
        }
        if self.verbose {
            cmd.arg("--verbose");
        }
        cmd.arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(PR_SET_PDEATHSIG), which is async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies, run-vm.sh gets SIGTERM and stops QEMU.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(io::Error::from)
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            script: script.clone(),
            source,
        })?;
        // Drained on their own threads: a full pipe would stall the guest's console.
        let drain = |r: Option<Box<dyn io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).replace('\r', "")
            })
        };
        let stdout = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn io::Read + Send>));
        let stderr = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn io::Read + Send>));
        Ok(RunningGuest {
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
            start,
            share: Some(share),
        })
    }
}

/// A guest booted with [`UblkGuest::spawn`]. Dropping it unwaited stops the guest
/// (run-vm.sh gets SIGTERM and stops QEMU) and removes the share.
#[derive(Debug)]
pub struct RunningGuest {
    child: Option<std::process::Child>,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    start: Instant,
    share: Option<ShareDir>,
}

impl RunningGuest {
    /// The share directory: the command's cwd in the guest, same path on the host.
    pub fn share(&self) -> &Path {
        self.share.as_ref().map_or(Path::new("/nonexistent"), ShareDir::path)
    }
    /// True while run-vm.sh (and so the guest) is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
    /// Waits for the guest to power off and returns the outcome.
    pub fn wait(mut self) -> Result<GuestRun, Error> {
        let mut child = self.child.take().expect("a RunningGuest has its child until waited");
        let status = child.wait().map_err(|source| Error::Spawn {
            script: run_vm_script(),
            source,
        })?;
        let wall = self.start.elapsed();
        let join = |h: Option<std::thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        let stdout = join(self.stdout.take());
        let stderr = join(self.stderr.take());
        tracing::debug!(?wall, status = ?status.code(), "guest run finished");
        Ok(GuestRun {
            status: status.code(),
            stdout,
            stderr,
            wall,
            share: self.share.take().expect("a RunningGuest has its share until waited"),
        })
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// The outcome of one guest boot. The share directory is removed on drop.
#[derive(Debug)]
pub struct GuestRun {
    /// The command's exit status; 125 when the guest never reported one (crash,
    /// timeout); `None` if run-vm.sh itself was killed by a signal.
    pub status: Option<i32>,
    /// The guest console (the command's stdout and stderr, init's lines), CRs removed.
    pub stdout: String,
    /// run-vm.sh's own messages (timings, timeout notices).
    pub stderr: String,
    /// Wall time of the whole boot, run and power-off.
    pub wall: Duration,
    share: ShareDir,
}

impl GuestRun {
    /// The share directory: the command's cwd in the guest, same path on the host.
    pub fn share(&self) -> &Path {
        self.share.path()
    }
    /// Reads a file the guest wrote into the share (`name` relative to it).
    pub fn read(&self, name: &str) -> io::Result<String> {
        std::fs::read_to_string(self.share.path().join(name))
    }
    /// The console without the init script's and kernel's own lines.
    pub fn command_output(&self) -> String {
        self.stdout
            .lines()
            .filter(|l| !l.starts_with("[vm-init ") && !l.contains("reboot: Power down"))
            .map(|l| format!("{l}\n"))
            .collect()
    }
    /// Everything, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "status {:?} after {:.1?}\n--- console ---\n{}--- run-vm.sh ---\n{}",
            self.status, self.wall, self.stdout, self.stderr
        )
    }
}

/// A unique, empty directory under the temp dir, removed (recursively) on drop.
#[derive(Debug)]
struct ShareDir(PathBuf);

impl ShareDir {
    fn new() -> Result<Self, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "eac-ublk-guest.{}.{}.{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).map_err(|source| Error::Share {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShareDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove guest share");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_dirs_are_unique_and_removed() {
        let a = ShareDir::new().unwrap();
        let b = ShareDir::new().unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn profile_dir_is_where_this_test_binary_lives() {
        let d = profile_dir().unwrap();
        assert!(d.join("deps").is_dir(), "{}", d.display());
    }

    #[test]
    fn skip_reason_names_what_is_missing() {
        // Whatever this machine has, the answer must be printable and specific.
        if let Some(why) = skip_reason() {
            assert!(why.starts_with("ublk guest unavailable: "), "{why}");
        }
    }
}
