//! The controller lab: two lab hosts (network namespaces from [`Lab::two_hosts`]), a real
//! libvirtd per host inside its namespace (with virtlockd and a lease directory both hosts
//! share), a directory both hosts see (the state-file and the guests' disks, standing in for
//! shared storage), a controller configuration per host, the `eac-controller` processes and
//! the `eac` command against each host's API.
//!
//! ```text
//! LAB_DIR/                    (Lab::dir(), removed at the end)
//!   pool.secret               the pool secret both controllers use
//!   shared/statefile          the state-file; host a may reach it through a FaultyDisk
//!   shared/disks/GUEST.raw    guest disks (virtlockd leases in LAB_DIR/shared-locks)
//!   hosts/NAME/               libvirtd state (LibvirtHost), and:
//!     controller.toml         the controller's configuration
//!     controller.log          its stdout + stderr
//!     eac/                    its data_dir (pool.json)
//!     eac.sock                its API socket
//!     var/log/libvirt/qemu/GUEST.console   a guest's serial console while it ran on NAME
//! ```
//!
//! A guest's domain XML names its console `/var/log/libvirt/qemu/GUEST.console`: `/var` is
//! bind-mounted per host inside each libvirtd's mount namespace, so the same definition logs
//! to a different file on each host and a test can tell where the guest ran.
//!
//! Drop order: controllers (SIGTERM), libvirt hosts (guests destroyed, daemons stopped), the
//! state-file fault (unmounted), the namespaces, the directory.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eac_controller::libvirt::{DomainState, Hypervisor};

use crate::faulty_disk::FaultyDisk;
use crate::libvirt::{Disk, GuestSpec, LibvirtHost};
use crate::wait::wait_until;
use crate::{Lab, workspace_bin};

/// Heartbeat port on every network; the API's TCP port on every address.
pub const HEARTBEAT_PORT: u16 = 7410;
pub const API_PORT: u16 = 7411;

/// Heartbeat networks of the lab: (network name, interface, third octet of its subnet).
pub const NETWORKS: [(&str, &str, u8); 3] = [("mgmt", "mgmt0", 0), ("al1", "al1", 2), ("al2", "al2", 3)];

/// Errors of the controller lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lab(#[from] crate::Error),
    #[error(transparent)]
    Libvirt(#[from] crate::libvirt::Error),
    #[error(transparent)]
    Disk(#[from] crate::faulty_disk::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How to build the lab.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tag in namespace and directory names.
    pub tag: String,
    /// What each host offers guests (`[capacity]`).
    pub mem_mib: u64,
    pub vcpus: u32,
    /// `[timeouts]` overrides, e.g. `("dead_after_ms", 3000)`; empty = the defaults.
    pub timeouts: Vec<(String, u64)>,
    /// Host a reaches the state-file through a [`FaultyDisk`] the test can make fail.
    pub statefile_fault_on_a: bool,
    /// QEMU takes its own image locks (the default). Off: guests run under
    /// [`crate::libvirt::qemu_without_image_locking`], so only the lock manager's lease stops a
    /// second start of a disk.
    pub qemu_image_locking: bool,
}

impl Options {
    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            mem_mib: 1024,
            vcpus: 4,
            timeouts: Vec::new(),
            statefile_fault_on_a: false,
            qemu_image_locking: true,
        }
    }
}

/// A running `eac-controller run --config F` inside a lab host's network namespace. Dropping
/// it sends SIGTERM and waits (10 s) for the drain, then SIGKILLs.
#[derive(Debug)]
pub struct ControllerProc {
    child: Child,
    host: String,
}

impl ControllerProc {
    /// Starts the controller of `host` (its config and log paths are the lab's).
    pub fn start(host: &CtlHost, netns_path: &Path) -> Result<Self> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log_path)
            .map_err(io_err(format!("open {}", host.log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log"))?;
        let bin = workspace_bin("eac-controller");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns_path.display()))
            .arg("--")
            .arg(&bin)
            .arg("run")
            .arg("--config")
            .arg(&host.config_path)
            .env(
                "RUST_LOG",
                std::env::var("EAC_LAB_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(format!("spawn {}", bin.display())))?;
        Ok(Self {
            child,
            host: host.name.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait up to `grace` (SIGKILL after that). Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < grace {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "lab: controller of {} ignored SIGTERM for {grace:?}; SIGKILL",
            self.host
        );
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// One host of the controller lab.
#[derive(Debug)]
pub struct CtlHost {
    // Field order = drop order: the controller before its libvirtd.
    controller: Option<ControllerProc>,
    pub libvirt: LibvirtHost,
    pub name: String,
    pub netns_path: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub data_dir: PathBuf,
    pub api_socket: PathBuf,
    pub mgmt_ip: String,
}

impl CtlHost {
    /// The controller's log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn controller(&mut self) -> Option<&mut ControllerProc> {
        self.controller.as_mut()
    }

    /// Path of a guest's serial console as it ran on this host (see the module docs).
    pub fn console_path(&self, guest: &str) -> PathBuf {
        self.libvirt.dir().join(format!("var/log/libvirt/qemu/{guest}.console"))
    }

    /// The guest's serial console on this host so far.
    pub fn console(&self, guest: &str) -> String {
        fs::read(self.console_path(guest))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The guest's state in this host's libvirtd; `None` when the daemon cannot be reached or
    /// the guest is not defined there.
    pub fn domain_state(&self, guest: &str) -> Option<DomainState> {
        let hv = Hypervisor::connect(self.libvirt.uri()).ok()?;
        hv.state(guest).ok()
    }

    /// A connection to this host's libvirtd.
    pub fn hypervisor(&self) -> Result<Hypervisor> {
        Hypervisor::connect(self.libvirt.uri()).map_err(|e| Error::Failed(eac_common::error_chain(&e)))
    }
}

/// What `eac` printed and how it exited.
#[derive(Debug, Clone)]
pub struct EacOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl EacOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout parsed as JSON (for `--json` calls).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).map_err(|e| Error::Failed(format!("eac printed no JSON ({e}): {self}")))
    }
}

impl std::fmt::Display for EacOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The two-host controller lab.
#[derive(Debug)]
pub struct ControllerLab {
    // Field order = drop order (see the module docs).
    hosts: Vec<CtlHost>,
    statefile_fault: Option<FaultyDisk>,
    pub lab: Lab,
    pub shared: PathBuf,
    pub secret_file: PathBuf,
    pub opts: Options,
}

impl ControllerLab {
    /// Builds the lab (namespaces, libvirtd per host, shared dir, configs); the controllers
    /// are not started yet ([`ControllerLab::start_controller`]).
    pub fn new(opts: Options) -> Result<Self> {
        let lab = Lab::two_hosts(&opts.tag, 0)?;
        let dir = lab.dir().to_path_buf();
        let shared = dir.join("shared");
        fs::create_dir_all(shared.join("disks")).map_err(io_err("create shared dir"))?;
        let secret_file = dir.join("pool.secret");
        fs::write(
            &secret_file,
            format!("lab-secret-{}-{}\n", std::process::id(), opts.tag),
        )
        .map_err(io_err("write the pool secret"))?;
        let statefile = shared.join("statefile");
        fs::File::create(&statefile).map_err(io_err("create the state-file"))?;

        let mut me = Self {
            hosts: Vec::new(),
            statefile_fault: None,
            shared,
            secret_file,
            opts,
            lab,
        };
        if me.opts.statefile_fault_on_a {
            me.statefile_fault = Some(FaultyDisk::mount(&dir, &statefile)?);
        }
        let names: Vec<String> = me.lab.hosts.iter().map(|h| h.name.clone()).collect();
        for name in &names {
            let h = me.lab.host(name);
            let libvirt = LibvirtHost::start(&dir, name, Some(h.ns.name()), true)?;
            let hdir = libvirt.dir();
            let host = CtlHost {
                controller: None,
                name: name.clone(),
                netns_path: h.ns.path(),
                config_path: hdir.join("controller.toml"),
                log_path: hdir.join("controller.log"),
                data_dir: hdir.join("eac"),
                api_socket: hdir.join("eac.sock"),
                mgmt_ip: h.mgmt_ip(),
                libvirt,
            };
            me.hosts.push(host);
        }
        for name in &names {
            let cfg = me.config_text(name);
            let path = me.host(name).config_path.clone();
            fs::write(&path, cfg).map_err(io_err(format!("write {}", path.display())))?;
        }
        // Warm each libvirtd's QEMU capabilities cache (the first define takes seconds), so
        // the first failover does not pay for it.
        for h in &me.hosts {
            let hv = h.hypervisor()?;
            let spec = me.guest_spec("warmup")?;
            hv.define(&spec.to_xml())
                .and_then(|_| hv.undefine("warmup"))
                .map_err(|e| Error::Failed(eac_common::error_chain(&e)))?;
        }
        Ok(me)
    }

    /// The state-file path as host `name` reaches it.
    pub fn statefile_path(&self, name: &str) -> PathBuf {
        match (&self.statefile_fault, name) {
            (Some(f), "a") => f.path(),
            _ => self.shared.join("statefile"),
        }
    }

    /// The state-file fault of host a (with [`Options::statefile_fault_on_a`]).
    pub fn statefile_fault(&self) -> Option<&FaultyDisk> {
        self.statefile_fault.as_ref()
    }

    /// The controller configuration (TOML) of host `name`.
    pub fn config_text(&self, name: &str) -> String {
        use std::fmt::Write as _;
        let me = self.lab.host(name);
        let idx = |h: &crate::topology::Host| h.mgmt_ip().rsplit('.').next().unwrap_or("0").to_owned();
        let host = self.host(name);
        let mut s = String::new();
        let _ = writeln!(s, "host = \"{name}\"");
        let _ = writeln!(s, "pool_secret_file = \"{}\"", self.secret_file.display());
        let _ = writeln!(s, "state_file = \"{}\"", self.statefile_path(name).display());
        let _ = writeln!(s, "data_dir = \"{}\"", host.data_dir.display());
        let _ = writeln!(s, "api_socket = \"{}\"", host.api_socket.display());
        let _ = writeln!(s, "api_listen = \"0.0.0.0:{API_PORT}\"");
        let _ = writeln!(s, "libvirt_uri = \"{}\"", host.libvirt.uri());
        // As deployed (docs/operations.md): under SCHED_FIFO 10, as corosync runs, so a busy
        // host (TCG guests, CPU hogs) cannot delay heartbeats past the timeouts.
        // EAC_LAB_CONTROLLER_RT=0 runs it under the normal scheduler.
        if std::env::var("EAC_LAB_CONTROLLER_RT").map_or(true, |v| v != "0") {
            let _ = writeln!(s, "realtime_priority = 10");
        }
        if !self.opts.timeouts.is_empty() {
            let _ = writeln!(s, "\n[timeouts]");
            for (k, v) in &self.opts.timeouts {
                let _ = writeln!(s, "{k} = {v}");
            }
        }
        let _ = writeln!(
            s,
            "\n[capacity]\nmem_mib = {}\nvcpus = {}",
            self.opts.mem_mib, self.opts.vcpus
        );
        for (net, _, octet) in NETWORKS {
            let _ = writeln!(
                s,
                "\n[[network]]\nname = \"{net}\"\nbind = \"10.250.{octet}.{}:{HEARTBEAT_PORT}\"",
                idx(me)
            );
        }
        for peer in self.lab.hosts.iter().filter(|h| h.name != name) {
            let addrs: Vec<String> = NETWORKS
                .iter()
                .map(|(net, _, octet)| format!("{net} = \"10.250.{octet}.{}:{HEARTBEAT_PORT}\"", idx(peer)))
                .collect();
            let _ = writeln!(
                s,
                "\n[[peer]]\nname = \"{}\"\naddresses = {{ {} }}\ncapacity = {{ mem_mib = {}, vcpus = {} }}",
                peer.name,
                addrs.join(", "),
                self.opts.mem_mib,
                self.opts.vcpus
            );
        }
        s
    }

    pub fn host(&self, name: &str) -> &CtlHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no controller lab host {name}"))
    }

    pub fn host_mut(&mut self, name: &str) -> &mut CtlHost {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no controller lab host {name}"))
    }

    pub fn hosts(&self) -> &[CtlHost] {
        &self.hosts
    }

    /// Starts host `name`'s controller and waits until its API answers (`eac pool status`).
    pub fn start_controller(&mut self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        let host = self.host(name);
        let proc_ = ControllerProc::start(host, &host.netns_path)?;
        self.host_mut(name).controller = Some(proc_);
        let mut last = None;
        let waited = wait_until(Duration::from_secs(20), "the controller's API", || {
            if let Some(c) = self.host_mut(name).controller.as_mut()
                && c.try_wait().is_some()
            {
                return true; // exited: reported below
            }
            let out = self.eac(name, &["pool", "status"]);
            let ok = out.ok();
            last = Some(out);
            ok
        });
        let exited = self.host_mut(name).controller.as_mut().and_then(|c| c.try_wait());
        if let Some(status) = exited {
            return Err(Error::Failed(format!(
                "controller of {name} exited ({status}) during start-up; log:\n{}",
                tail(&self.host(name).log(), 30)
            )));
        }
        if waited.is_err() {
            return Err(Error::Failed(format!(
                "controller of {name} did not answer within 20 s; last eac: {}\nlog:\n{}",
                last.map(|o| o.to_string()).unwrap_or_default(),
                tail(&self.host(name).log(), 30)
            )));
        }
        Ok(t.elapsed())
    }

    /// Starts both controllers.
    pub fn start_controllers(&mut self) -> Result<()> {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for n in names {
            self.start_controller(&n)?;
        }
        Ok(())
    }

    /// Stops host `name`'s controller with SIGTERM (drain); returns its exit status.
    pub fn stop_controller(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let mut c = self.host_mut(name).controller.take()?;
        c.stop(Duration::from_secs(10))
    }

    /// Runs `eac --socket HOST_API_SOCKET ARGS…` (from the root namespace: a unix socket).
    pub fn eac(&self, name: &str, args: &[&str]) -> EacOutput {
        let mut cmd = Command::new(workspace_bin("eac"));
        cmd.arg("--socket").arg(&self.host(name).api_socket).args(args);
        run_eac(&mut cmd)
    }

    /// Runs `eac --connect MGMT_IP:API_PORT --secret-file SECRET ARGS…` inside another
    /// host's namespace (the authenticated TCP API over the management network).
    pub fn eac_tcp(&self, from: &str, to: &str, args: &[&str]) -> EacOutput {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host(from).netns_path.display()))
            .arg("--")
            .arg(workspace_bin("eac"))
            .arg("--connect")
            .arg(format!("{}:{API_PORT}", self.host(to).mgmt_ip))
            .arg("--secret-file")
            .arg(&self.secret_file)
            .args(args);
        run_eac(&mut cmd)
    }

    /// A lab guest whose definition works on either host: disk on the shared directory (so
    /// virtlockd's leases apply), console in the host's own `/var/log/libvirt/qemu`.
    pub fn guest_spec(&self, guest: &str) -> Result<GuestSpec> {
        let disk = self.shared.join("disks").join(format!("{guest}.raw"));
        if !disk.exists() {
            let f = fs::File::create(&disk).map_err(io_err(format!("create {}", disk.display())))?;
            f.set_len(16 << 20).map_err(io_err("size the guest disk"))?;
        }
        let spec = GuestSpec::new(guest, PathBuf::from(format!("/var/log/libvirt/qemu/{guest}.console")))?
            .disk(Disk::File(disk));
        Ok(if self.opts.qemu_image_locking {
            spec
        } else {
            spec.without_qemu_image_locking()
        })
    }

    /// Defines `spec` on `host` and starts it there.
    pub fn define_and_start(&self, host: &str, spec: &GuestSpec) -> Result<()> {
        let hv = self.host(host).hypervisor()?;
        hv.define(&spec.to_xml())
            .and_then(|_| hv.start(&spec.name))
            .map_err(|e| Error::Failed(eac_common::error_chain(&e)))
    }

    /// Kills every process of `host` with SIGKILL: controller, libvirtd, virtlogd, virtlockd,
    /// QEMU. Returns how many.
    pub fn kill_host(&mut self, host: &str) -> usize {
        let n = self.lab.kill_host_processes(host);
        // reap the controller (it was in the namespace)
        if let Some(mut c) = self.host_mut(host).controller.take() {
            let _ = c.child.wait();
        }
        n
    }

    /// Where `guest` is active right now: the hosts whose libvirtd reports it active.
    pub fn running_on(&self, guest: &str) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|h| h.domain_state(guest).is_some_and(|s| s.is_active()))
            .map(|h| h.name.clone())
            .collect()
    }

    /// Every controller's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            s.push_str(&format!(
                "--- controller {} (last 40 lines)\n{}\n",
                h.name,
                tail(&h.log(), 40)
            ));
        }
        s
    }
}

fn run_eac(cmd: &mut Command) -> EacOutput {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => EacOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => EacOutput {
            code: -1,
            stdout: String::new(),
            stderr: format!("cannot run eac: {e}"),
        },
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
