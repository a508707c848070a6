//! A real libvirtd per lab host, and small TCG guests to run under it.
//!
//! - [`LibvirtHost`] starts one host's libvirtd + virtlogd (+ virtlockd) through
//!   `scripts/lab/libvirt-host.sh` (private mount namespace, optionally inside the host's network
//!   namespace) and stops everything of that host again on drop, also when a test panics.
//! - [`GuestSpec`] builds the domain XML of a lab guest: domain type `qemu` (TCG), 1 vCPU,
//!   direct kernel boot of Debian's 6.12 kernel with the lab initramfs
//!   (`scripts/lab/mkinitramfs-guest.sh`, built once per content into `target/lab-cache/`),
//!   serial console logged to a file under the lab directory, optional disks and NICs.
//! - [`LibvirtHost::wait_for_console`] waits for a marker such as `GUEST-READY` on that console.
//! - [`lab_processes`] finds anything of a lab that is still running (for leak checks).
//!
//! Everything here is blocking and needs root, libvirtd and QEMU (see scripts/setup.sh).
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::netns::unique_name;
use crate::wait::{self, wait_until};

/// Debian's kernel the lab guests boot (installed by scripts/setup.sh).
pub const GUEST_KVER: &str = "6.12.107+deb12-amd64";

/// Printed by the lab initramfs once init is done (after the `GUEST-DISK` lines).
pub const READY: &str = "GUEST-READY";

/// Errors of the libvirt lab: the crate's command/I/O errors, a guest that did not print what
/// was expected, or a machine that is not set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lab(#[from] crate::Error),
    #[error(transparent)]
    Console(Box<ConsoleTimeout>),
    #[error("{0}")]
    Setup(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A marker did not appear on a guest's console in time; carries what the guest did print.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest '{guest}' on lab host {host}: {timeout}\n--- serial console (last lines) ---\n{console}\n--- QEMU log (last lines) ---\n{qemu_log}"
)]
pub struct ConsoleTimeout {
    pub host: String,
    pub guest: String,
    pub timeout: wait::Timeout,
    pub console: String,
    pub qemu_log: String,
}

/// The workspace root (scripts/ lives there).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the directory holding cargo's
/// `CACHEDIR.TAG` above the running test binary, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        return d.to_path_buf();
    }
    workspace_root().join("target")
}

fn run(cmd: &mut Command) -> Result<String> {
    Ok(crate::netns::run(cmd)?)
}

fn io_err(what: &str, path: &Path, source: io::Error) -> Error {
    Error::Lab(crate::Error::Io {
        what: format!("{what}: {}", path.display()),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Kernel and initramfs

/// The guest kernel: `EAC_GUEST_KERNEL`, else `/boot/vmlinuz-<GUEST_KVER>`.
pub fn guest_kernel() -> Result<PathBuf> {
    let k = std::env::var_os("EAC_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{GUEST_KVER}")));
    if !k.is_file() {
        return Err(Error::Setup(format!(
            "guest kernel {} is missing (scripts/setup.sh installs linux-image-{GUEST_KVER}-unsigned)",
            k.display()
        )));
    }
    Ok(k)
}

/// The lab initramfs for [`GUEST_KVER`], built by `scripts/lab/mkinitramfs-guest.sh` into
/// `target/lab-cache/initramfs-<kver>-<hash of the script>.cpio.gz`. Built once: later calls,
/// other test binaries and later runs reuse it; concurrent builders are serialised by an
/// exclusive `flock` on `target/lab-cache/initramfs.lock`. Editing the script changes the hash.
pub fn guest_initramfs() -> Result<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let script = workspace_root().join("scripts/lab/mkinitramfs-guest.sh");
    let content = fs::read(&script).map_err(|source| io_err("cannot read the initramfs script", &script, source))?;
    let cache = target_dir().join("lab-cache");
    fs::create_dir_all(&cache).map_err(|source| io_err("cannot create the lab cache", &cache, source))?;
    let out = cache.join(format!("initramfs-{GUEST_KVER}-{:016x}.cpio.gz", fnv1a(&content)));

    let lock_path = cache.join("initramfs.lock");
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| io_err("cannot open the cache lock", &lock_path, source))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("cannot lock the lab cache", &lock_path, io::Error::from(errno)))?;
    if !out.is_file() {
        run(Command::new(&script).arg(&out).arg(GUEST_KVER))?;
    }
    *built = Some(out.clone());
    Ok(out)
}

/// FNV-1a, 64 bit: a stable content hash for cache keys (std's hasher is not stable).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// Lab directory

/// A fresh directory `/tmp/eac-TAG-PID-N` for one lab, removed on drop (set `EAC_KEEP_LAB=1` to
/// keep it for post-mortems). Declare it *before* the hosts that live in it, so it is dropped
/// after them.
#[derive(Debug)]
pub struct LabDir {
    path: PathBuf,
}

impl LabDir {
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name(tag));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|source| io_err("cannot clear a stale lab dir", &path, source))?;
        }
        fs::create_dir_all(&path).map_err(|source| io_err("cannot create the lab dir", &path, source))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        if std::env::var_os("EAC_KEEP_LAB").is_some() {
            eprintln!("lab: keeping {} (EAC_KEEP_LAB)", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("lab: cannot remove {}: {e}", self.path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lab host

/// One lab host's libvirt: a real privileged libvirtd (+ virtlogd, + virtlockd with `lock`),
/// state under `LAB_DIR/hosts/NAME`. Dropping it runs `libvirt-host.sh down`: running guests
/// are destroyed and every process of the host is stopped.
#[derive(Debug)]
pub struct LibvirtHost {
    lab_dir: PathBuf,
    name: String,
    netns: Option<String>,
    uri: String,
    down: bool,
}

impl LibvirtHost {
    fn script() -> PathBuf {
        workspace_root().join("scripts/lab/libvirt-host.sh")
    }

    /// Starts the host's daemons (in network namespace `netns` if given; with a lease directory
    /// shared by the lab's hosts if `lock`). Takes about 0.2 s.
    ///
    /// `EAC_LAB_LOCK_MANAGER=off` starts every host without the lock manager, whatever `lock`
    /// says: the configuration before the lease was proven, to see what the lease tests catch
    /// (they must fail then).
    pub fn start(lab_dir: &Path, host_name: &str, netns: Option<&str>, lock: bool) -> Result<Self> {
        let lock = lock && !lock_manager_disabled();
        let mut cmd = Command::new(Self::script());
        cmd.arg("up").arg(lab_dir).arg(host_name).arg(netns.unwrap_or("-"));
        if lock {
            cmd.arg("lock");
        }
        // From here on the host may have processes: clean up even if parsing fails.
        let mut host = Self {
            lab_dir: lab_dir.to_path_buf(),
            name: host_name.to_owned(),
            netns: netns.map(str::to_owned),
            uri: String::new(),
            down: false,
        };
        let out = run(&mut cmd)?;
        host.uri = out
            .lines()
            .rev()
            .find(|l| l.starts_with("qemu+unix://"))
            .ok_or_else(|| Error::Setup(format!("libvirt-host.sh up printed no URI: {out:?}")))?
            .to_owned();
        Ok(host)
    }

    /// `qemu+unix:///system?socket=…` of this host's libvirtd.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// `LAB_DIR/hosts/NAME`: config, logs (`logs/`), libvirt state (`var/`, `run/`).
    pub fn dir(&self) -> PathBuf {
        self.lab_dir.join("hosts").join(&self.name)
    }

    /// A guest for this host with the lab kernel and initramfs, its console logged to
    /// `LAB_DIR/hosts/NAME/consoles/GUEST.log` (so the same guest name can run on two hosts).
    pub fn guest(&self, guest_name: &str) -> Result<GuestSpec> {
        let consoles = self.dir().join("consoles");
        fs::create_dir_all(&consoles).map_err(|source| io_err("cannot create the console dir", &consoles, source))?;
        GuestSpec::new(guest_name, consoles.join(format!("{guest_name}.log")))
    }

    /// Path of a guest's serial console log (see [`LibvirtHost::guest`]).
    pub fn console_path(&self, guest_name: &str) -> PathBuf {
        self.dir().join("consoles").join(format!("{guest_name}.log"))
    }

    /// The guest's serial console so far (empty if nothing was written yet).
    pub fn serial_log(&self, guest_name: &str) -> String {
        read_lossy(&self.console_path(guest_name))
    }

    /// Waits until `marker` appears on the guest's serial console; returns how long it took.
    /// On timeout the error carries the tail of the console and of the QEMU log.
    pub fn wait_for_console(&self, guest_name: &str, marker: &str, timeout: Duration) -> Result<Duration> {
        let path = self.console_path(guest_name);
        wait_until(
            timeout,
            &format!("'{marker}' on the serial console {}", path.display()),
            || read_lossy(&path).contains(marker),
        )
        .map_err(|timeout| {
            Error::Console(Box::new(ConsoleTimeout {
                host: self.name.clone(),
                guest: guest_name.to_owned(),
                timeout,
                console: tail(&read_lossy(&path), 20),
                qemu_log: tail(&self.qemu_log(guest_name), 20),
            }))
        })
    }

    /// libvirt's per-domain QEMU log (command line, QEMU's stderr).
    pub fn qemu_log(&self, guest_name: &str) -> String {
        read_lossy(&self.dir().join(format!("var/log/libvirt/qemu/{guest_name}.log")))
    }

    /// The pids of every process of this host (daemons, QEMU, …) still alive.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let out = run(Command::new(Self::script())
            .arg("pids")
            .arg(&self.lab_dir)
            .arg(&self.name))?;
        Ok(out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    /// Destroys the host's guests and stops its daemons, reporting failures (drop does the same
    /// but can only print them).
    pub fn down(mut self) -> Result<()> {
        self.down = true;
        self.run_down()
    }

    fn run_down(&self) -> Result<()> {
        run(Command::new(Self::script())
            .arg("down")
            .arg(&self.lab_dir)
            .arg(&self.name))
        .map(drop)
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if !self.down
            && let Err(e) = self.run_down()
        {
            eprintln!("lab: stopping libvirt host {} failed: {e}", self.name);
        }
    }
}

/// `EAC_LAB_LOCK_MANAGER=off` (see [`LibvirtHost::start`]).
pub fn lock_manager_disabled() -> bool {
    let off = std::env::var("EAC_LAB_LOCK_MANAGER").is_ok_and(|v| v == "off");
    if off {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("lab: EAC_LAB_LOCK_MANAGER=off: lab hosts run WITHOUT libvirt's lock manager"));
    }
    off
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Processes of a lab still running (not zombies): those whose `/run` is one of the lab hosts'
/// bind-mounted run dirs (daemons and QEMU of every host, even after their daemon died), and
/// those whose command line mentions the lab dir. Returns `(pid, command line)`.
pub fn lab_processes(lab_dir: &Path) -> Vec<(u32, String)> {
    let hosts_run: Vec<(u64, u64)> = fs::read_dir(lab_dir.join("hosts"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::metadata(e.path().join("run")).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let needle = lab_dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let p = entry.path();
        let cmdline = fs::read(p.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_owned())
            .unwrap_or_default();
        let in_host = fs::metadata(p.join("root/run")).is_ok_and(|m| hosts_run.contains(&(m.dev(), m.ino())));
        if !in_host && !cmdline.contains(&needle) {
            continue;
        }
        let zombie = fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true);
        if !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Guests

/// The machine type of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Q35,
    Pc,
}

/// A guest disk (a virtio disk `vda`, `vdb`, … in the order added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A raw image file.
    File(PathBuf),
    /// A block device (loop device, /dev/ublkbN, …).
    Block(PathBuf),
}

/// A NIC on a bridge that exists in the lab host's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub bridge: String,
    pub mac: String,
}

/// A lab guest: everything needed for its domain XML ([`GuestSpec::to_xml`]).
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    /// Derived from the name (same name ⇒ same UUID on every host: the guest's identity).
    pub uuid: String,
    pub machine: Machine,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to `console=ttyS0 quiet panic=-1` (e.g. `eac.diskwrite=TOKEN`, `eac.ip=…`).
    pub extra_cmdline: Vec<String>,
    pub console_log: PathBuf,
    pub disks: Vec<Disk>,
    /// libvirt disk cache mode; `none` (O_DIRECT, the mirror's semantics) by default.
    pub disk_cache: String,
    pub nics: Vec<Nic>,
    /// The `<emulator>`: [`QEMU`], or [`qemu_without_image_locking`].
    pub emulator: PathBuf,
}

/// The machine's QEMU.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// `scripts/lab/qemu-no-image-lock.sh`: QEMU with its own image locking off
/// (`file.locking=off` on every file blockdev), so that only libvirt's lock manager can refuse
/// a second start of a disk (see the script).
pub fn qemu_without_image_locking() -> PathBuf {
    workspace_root().join("scripts/lab/qemu-no-image-lock.sh")
}

impl GuestSpec {
    /// A guest with the lab kernel and initramfs (built on first use), q35, 160 MiB, 1 vCPU.
    pub fn new(name: &str, console_log: PathBuf) -> Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(Error::Setup(format!("guest name '{name}': use [A-Za-z0-9._-]")));
        }
        let h = fnv1a(name.as_bytes());
        let h2 = fnv1a(format!("{name}/uuid").as_bytes());
        Ok(Self {
            name: name.to_owned(),
            uuid: format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                h >> 32,
                (h >> 16) & 0xffff,
                h & 0xfff,
                (h2 >> 48) & 0xfff,
                h2 & 0xffff_ffff_ffff
            ),
            machine: Machine::Q35,
            memory_mib: 160,
            kernel: guest_kernel()?,
            initrd: guest_initramfs()?,
            extra_cmdline: Vec::new(),
            console_log,
            disks: Vec::new(),
            disk_cache: "none".into(),
            nics: Vec::new(),
            emulator: PathBuf::from(QEMU),
        })
    }

    /// Runs the guest with QEMU's image locking off ([`qemu_without_image_locking`]).
    pub fn without_qemu_image_locking(mut self) -> Self {
        self.emulator = qemu_without_image_locking();
        self
    }

    pub fn machine(mut self, m: Machine) -> Self {
        self.machine = m;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn disk(mut self, d: Disk) -> Self {
        self.disks.push(d);
        self
    }

    /// A NIC on `bridge` with a MAC derived from the guest name and NIC index.
    pub fn nic(mut self, bridge: &str) -> Self {
        let h = fnv1a(format!("{}/nic{}", self.name, self.nics.len()).as_bytes());
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (h >> 16) as u8,
            (h >> 8) as u8,
            h as u8
        );
        self.nics.push(Nic {
            bridge: bridge.to_owned(),
            mac,
        });
        self
    }

    pub fn cmdline_arg(mut self, arg: &str) -> Self {
        self.extra_cmdline.push(arg.to_owned());
        self
    }

    /// The libvirt domain XML.
    pub fn to_xml(&self) -> String {
        let machine = match self.machine {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        };
        let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
        for a in &self.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(a);
        }
        let mut x = String::new();
        let _ = write!(
            x,
            "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  \
             <memory unit='MiB'>{mem}</memory>\n  <vcpu>1</vcpu>\n  <os>\n    \
             <type arch='x86_64' machine='{machine}'>hvm</type>\n    <kernel>{kernel}</kernel>\n    \
             <initrd>{initrd}</initrd>\n    <cmdline>{cmdline}</cmdline>\n  </os>\n  \
             <features><acpi/></features>\n  <clock offset='utc'/>\n  \
             <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
             <on_crash>destroy</on_crash>\n  <devices>\n    \
             <emulator>{emulator}</emulator>\n",
            name = esc(&self.name),
            uuid = self.uuid,
            mem = self.memory_mib,
            kernel = esc(&self.kernel.to_string_lossy()),
            initrd = esc(&self.initrd.to_string_lossy()),
            cmdline = esc(&cmdline),
            emulator = esc(&self.emulator.to_string_lossy()),
        );
        for (i, d) in self.disks.iter().enumerate() {
            let dev = format!("vd{}", char::from(b'a' + i as u8));
            let cache = esc(&self.disk_cache);
            let _ = match d {
                Disk::File(p) => write!(
                    x,
                    "    <disk type='file' device='disk'>\n      \
                     <driver name='qemu' type='raw' cache='{cache}'/>\n      \
                     <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
                    esc(&p.to_string_lossy())
                ),
                Disk::Block(p) => write!(
                    x,
                    "    <disk type='block' device='disk'>\n      \
                     <driver name='qemu' type='raw' cache='{cache}' io='native'/>\n      \
                     <source dev='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
                    esc(&p.to_string_lossy())
                ),
            };
        }
        for n in &self.nics {
            let _ = write!(
                x,
                "    <interface type='bridge'>\n      <source bridge='{}'/>\n      \
                 <mac address='{}'/>\n      <model type='virtio'/>\n    </interface>\n",
                esc(&n.bridge),
                n.mac
            );
        }
        let _ = write!(
            x,
            "    <controller type='usb' model='none'/>\n    <serial type='pty'>\n      \
             <log file='{log}' append='off'/>\n      <target port='0'/>\n    </serial>\n    \
             <console type='pty'><target type='serial' port='0'/></console>\n    \
             <memballoon model='none'/>\n  </devices>\n</domain>\n",
            log = esc(&self.console_log.to_string_lossy()),
        );
        x
    }
}

/// XML escaping for text and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        // no kernel/initramfs needed to test the XML
        GuestSpec {
            name: "g1".into(),
            uuid: "00000000-0000-4000-8000-000000000001".into(),
            machine: Machine::Q35,
            memory_mib: 160,
            kernel: "/boot/vmlinuz".into(),
            initrd: "/tmp/i&r.gz".into(),
            extra_cmdline: vec!["eac.ip=10.250.0.2/24".into()],
            console_log: "/tmp/lab/c.log".into(),
            disks: vec![Disk::File("/tmp/d.raw".into()), Disk::Block("/dev/loop7".into())],
            disk_cache: "none".into(),
            nics: vec![],
            emulator: QEMU.into(),
        }
        .nic("br-app")
    }

    #[test]
    fn xml_has_the_parts() {
        let x = spec().to_xml();
        assert!(x.starts_with("<domain type='qemu'>"), "{x}");
        assert!(x.contains("machine='q35'"));
        assert!(x.contains("<initrd>/tmp/i&amp;r.gz</initrd>"));
        assert!(x.contains("<cmdline>console=ttyS0 quiet panic=-1 eac.ip=10.250.0.2/24</cmdline>"));
        assert!(x.contains("<source file='/tmp/d.raw'/>\n      <target dev='vda'"));
        assert!(x.contains("<source dev='/dev/loop7'/>\n      <target dev='vdb'"));
        assert!(x.contains("<source bridge='br-app'/>"));
        assert!(x.contains("<log file='/tmp/lab/c.log' append='off'/>"));
        assert_eq!(x.matches("<disk ").count(), 2);
        assert!(x.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
        let x = spec().without_qemu_image_locking().to_xml();
        assert!(x.contains("scripts/lab/qemu-no-image-lock.sh</emulator>"), "{x}");
    }

    #[test]
    fn names_are_unique_and_macs_stable() {
        assert_ne!(unique_name("x"), unique_name("x"));
        assert_eq!(spec().nics[0].mac, spec().nics[0].mac);
        assert!(spec().nics[0].mac.starts_with("52:54:00:"));
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(esc("a<'&\">"), "a&lt;&apos;&amp;&quot;&gt;");
    }
}
