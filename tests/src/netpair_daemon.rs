//! A netpair daemon in a lab host: configuration written for the lab topology, started in
//! the host's namespace, status read over its control socket, stopped on drop.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{BpfPinDir, Lab, topology, workspace_bin};

/// The lab guest's identity (see [`Lab::add_guest_ns`]).
pub const GUEST_MAC: &str = "52:54:00:fb:01:0a";
pub const GUEST_IP: &str = "10.250.1.10";
const SECRET: &str = "lab-pool-secret-0123456789abcdef";

/// A guest in a daemon's configuration file.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub name: String,
    pub mac: String,
    pub ip: String,
    /// "local" or "partner".
    pub role: String,
    /// Local guests: the guest's port on the host bridge.
    pub port: Option<String>,
}

impl GuestSpec {
    pub fn new(name: &str, mac: &str, ip: &str, role: &str, port: Option<&str>) -> Self {
        Self {
            name: name.into(),
            mac: mac.into(),
            ip: ip.into(),
            role: role.into(),
            port: port.map(str::to_owned),
        }
    }

    /// As a `guest.add` request's `guest` object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"name": self.name, "mac": self.mac, "ip": self.ip, "role": self.role, "port": self.port})
    }
}

/// A netpair daemon running in a lab host's namespace; SIGTERM and reaped on drop.
pub struct NetpairDaemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// None once [`NetpairDaemon::kill9`] left the pinned data path to the next daemon.
    _pin: Option<BpfPinDir>,
    exited: bool,
}

impl NetpairDaemon {
    /// Starts `netpair run` in `host`'s namespace (keeping the machine's mounts, so its maps
    /// are pinned where bpftool looks) for the one lab guest, `role` "local" or "partner";
    /// the client is the probe target. Panics with the daemon's log if it cannot start.
    pub fn start(lab: &Lab, host: &str, role: &str) -> NetpairDaemon {
        Self::start_with(lab, host, role, "")
    }

    /// [`NetpairDaemon::start`] with extra top-level configuration lines (e.g. `app_xdp = false`).
    pub fn start_with(lab: &Lab, host: &str, role: &str, extra: &str) -> NetpairDaemon {
        let port = (role == "local").then_some("vg0");
        Self::start_guests(
            lab,
            host,
            extra,
            &[GuestSpec::new("web", GUEST_MAC, GUEST_IP, role, port)],
        )
    }

    /// [`NetpairDaemon::start_with`] with the given guests in the configuration file.
    pub fn start_guests(lab: &Lab, host: &str, extra: &str, guests: &[GuestSpec]) -> NetpairDaemon {
        let h = lab.host(host);
        let peer = lab.hosts.iter().find(|p| p.name != host).unwrap();
        let dir = lab.dir();
        let secret = dir.join("pool.secret");
        // Written once, atomically: rewriting it in place while the other host's daemon
        // starts let that daemon read it empty ("the pool secret is 0 bytes").
        if std::fs::read_to_string(&secret).ok().as_deref() != Some(SECRET) {
            let tmp = dir.join(format!("pool.secret.{host}.tmp"));
            std::fs::write(&tmp, SECRET).unwrap();
            std::fs::rename(&tmp, &secret).unwrap();
        }
        // Removed by the guard when the daemon is dropped — but only once: a daemon started
        // after [`NetpairDaemon::kill9`] takes the directory over.
        let pin = BpfPinDir::new(&format!("{}-netpair", h.ns.name()));
        let socket = dir.join(format!("netpair-{host}.sock"));
        let guests: String = guests
            .iter()
            .map(|g| {
                let port = g.port.as_ref().map(|p| format!("port = \"{p}\"\n")).unwrap_or_default();
                format!(
                    "[[guest]]\nname = \"{}\"\nmac = \"{}\"\nip = \"{}\"\nrole = \"{}\"\n{port}",
                    g.name, g.mac, g.ip, g.role
                )
            })
            .collect();
        let cfg = format!(
            r#"host = "{host}"
{extra}
pool_secret_file = "{secret}"
app_iface = "{app}"
app_ip = "{app_ip}"
probe_targets = ["{client}"]
pin_dir = "{pin}"
control_socket = "{socket}"
[[availability_link]]
iface = "al1"
local = "{l1}:7301"
peer = "{p1}:7301"
[[availability_link]]
iface = "al2"
local = "{l2}:7301"
peer = "{p2}:7301"
{guests}"#,
            secret = secret.display(),
            app = topology::APP_IF,
            app_ip = h.app_ip(),
            client = lab.clients[0].ip,
            pin = pin.path().display(),
            socket = socket.display(),
            l1 = h.al_ip(1),
            p1 = peer.al_ip(1),
            l2 = h.al_ip(2),
            p2 = peer.al_ip(2),
        );
        let cfg_path = dir.join(format!("netpair-{host}.toml"));
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = dir.join(format!("netpair-{host}.log"));
        let child =
            h.ns.command_keep_mounts(workspace_bin("netpair").to_str().unwrap())
                .args(["run", "--config", cfg_path.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
        NetpairDaemon {
            child,
            socket,
            log,
            _pin: Some(pin),
            exited: false,
        }
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        s.write_all(b"status\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Sends one versioned control request (`op` plus the fields of `args`); the reply.
    pub fn request(&self, op: &str, args: serde_json::Value) -> Option<serde_json::Value> {
        let mut req = args.as_object().cloned().unwrap_or_default();
        req.insert("v".into(), 1.into());
        req.insert("id".into(), 1.into());
        req.insert("op".into(), op.into());
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        s.write_all(format!("{}\n", serde_json::Value::Object(req)).as_bytes())
            .ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// The control socket (for the `netpair` command's `--socket`).
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// One guest as `status` shows it, by name.
    pub fn guest(&self, name: &str) -> Option<serde_json::Value> {
        self.status()?["guests"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
    }

    pub fn steering(&self) -> Option<bool> {
        self.status()?["guests"][0]["steering"].as_bool()
    }

    pub fn partner_reachable(&self) -> bool {
        self.status().is_some_and(|s| s["partner"]["reachable"] == true)
    }

    /// SIGKILL, as a crash would: no clean-up runs. What it pinned stays (the next daemon
    /// started for this host takes it over and removes it when dropped).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
        if let Some(pin) = self._pin.take() {
            std::mem::forget(pin);
        }
    }

    /// The daemon's process id (to stop and continue it).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NetpairDaemon {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
