//! The `ublk-mirror run` process: one mirrored device (a "resource") on this host.
//!
//! Configuration comes from a TOML file or the equivalent command-line flags and is
//! validated before anything is opened (a bad configuration exits 64). The process owns the
//! metadata and the backing store, listens on the availability links, and is either the
//! **primary** (a [`Mirror`] serving the frontends — NBD, ublk — and dialing the partner) or
//! the **secondary** (a [`Replica`] applying what the primary sends). `promote` / `demote`
//! switch between the two without restarting; the control socket ([`crate::control`])
//! drives it.
//!
//! ```toml
//! resource = "vm1-disk0"                 # the same on both hosts
//! host = "a"                             # optional; default: the hostname
//! role = "primary"                       # role at start: primary | secondary
//! backing = "/var/lib/eac/vm1-disk0.img" # file or block device (never holds metadata)
//! meta = "/var/lib/eac/vm1-disk0.meta"   # made by `ublk-mirror create-meta`
//! pool_secret_file = "/etc/eac/pool.secret"
//! control_socket = "/run/eac/ublk-mirror/vm1-disk0.sock"  # optional
//! peer_timeout_ms = 3000                 # optional: no answer this long → degraded
//! reconnect_interval_ms = 1000           # optional
//! resync_rate = "100M"                   # optional: bytes/s (K, M, G suffixes); 0 = unlimited
//! on_peer_loss = "freeze"                # optional: continue (default) | freeze: hold writes
//!                                        # that miss the peer until `resume-io` or the peer is
//!                                        # back (for a controller that may promote the partner)
//! nbd = "127.0.0.1:10809"                # optional: NBD export while primary (host:port or /path)
//! ublk = true                            # optional: /dev/ublkbN while primary (needs ublk_drv)
//! ublk_id = 7                            # optional: the device number; a device of a killed
//!                                        # daemon with this number is taken over (user recovery)
//!
//! [[link]]                               # one or two availability links
//! listen = "10.250.2.1:7789"             # our address on the link (also the source address)
//! peer = "10.250.2.2:7789"               # the partner's
//! [[link]]
//! listen = "10.250.3.1:7789"
//! peer = "10.250.3.2:7789"
//! ```
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::dev::LocalDisk;
use crate::engine;
use crate::engine::{EngineError, LinkAddr, Mirror, MirrorConfig, SharedMeta, accept_loop, meta_blocking};
use crate::nbd;
use crate::replica::Replica;
use crate::ublk::{UblkDevice, UblkOptions};
use crate::{genid, meta};
use genid::Role;

/// Errors of the process (configuration, startup, control requests).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration file could not be read.
    #[error("cannot read {}", path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid (the message says what and where).
    #[error("{0}")]
    Config(String),
    /// The metadata could not be opened.
    #[error("cannot open the metadata {}", path.display())]
    Meta {
        path: PathBuf,
        #[source]
        source: meta::MetaError,
    },
    /// The backing store could not be opened.
    #[error("cannot open the backing store {}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The NBD export could not start.
    #[error("NBD export")]
    Nbd(#[source] nbd::NbdError),
    /// The ublk device could not be created or recovered.
    #[error("ublk device")]
    Ublk(#[source] crate::Error),
    /// The engine refused or failed.
    #[error("engine")]
    Engine(#[from] EngineError),
    /// A control request is not possible (retrying the same request will not help).
    #[error("{0}")]
    Refused(String),
    /// A control request is not possible *yet* (retry; the message says when).
    #[error("{0}")]
    Busy(String),
}

impl DaemonError {
    /// True when restarting cannot help (bad configuration or files): exit 64.
    pub fn is_usage(&self) -> bool {
        if let DaemonError::Ublk(e) = self {
            return e.needs_operator();
        }
        matches!(
            self,
            DaemonError::ReadConfig { .. }
                | DaemonError::Config(_)
                | DaemonError::Meta { .. }
                | DaemonError::Backing { .. }
                | DaemonError::Engine(EngineError::Mismatch(_))
        )
    }
}

/// One availability link in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Our address on the link: we listen here, and connect from its IP.
    pub listen: SocketAddr,
    /// The partner's listen address on the link.
    pub peer: SocketAddr,
}

/// The role a daemon starts in.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartRole {
    /// Serve the device and replicate to the partner.
    Primary,
    /// Receive the primary's writes.
    Secondary,
}

/// The daemon's configuration (see the module documentation for the file format).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub resource: String,
    #[serde(default)]
    pub host: Option<String>,
    pub role: StartRole,
    pub backing: PathBuf,
    pub meta: PathBuf,
    pub pool_secret_file: PathBuf,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_ms: u64,
    #[serde(default = "default_reconnect")]
    pub reconnect_interval_ms: u64,
    #[serde(default)]
    pub resync_rate: Rate,
    #[serde(default)]
    pub on_peer_loss: crate::engine::PeerLossPolicy,
    #[serde(default)]
    pub nbd: Option<String>,
    #[serde(default)]
    pub ublk: bool,
    #[serde(default)]
    pub ublk_id: Option<u32>,
    #[serde(rename = "link")]
    pub links: Vec<LinkConfig>,
}

fn default_peer_timeout() -> u64 {
    3000
}
fn default_reconnect() -> u64 {
    1000
}

/// A byte rate: an integer, or a string with a K/M/G suffix (powers of 1024).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate(pub u64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum R {
            N(u64),
            S(String),
        }
        match R::deserialize(d)? {
            R::N(n) => Ok(Rate(n)),
            R::S(s) => parse_rate(&s).map(Rate).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "100M", "512K", "1G", "12345" (bytes per second).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad rate {s:?}: expected bytes per second like 100M, 512K or 1048576"))
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        let c: Config =
            toml::from_str(&text).map_err(|e| DaemonError::Config(format!("{}: {}", path.display(), e.message())))?;
        c.validate()
            .map_err(|m| DaemonError::Config(format!("{}: {m}", path.display())))?;
        Ok(c)
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<(), String> {
        let ok_name = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !ok_name(&self.resource) {
            return Err(format!(
                "resource {:?}: 1 to 64 characters of letters, digits, '-', '_', '.'",
                self.resource
            ));
        }
        if let Some(h) = &self.host
            && (h.is_empty() || h.len() > 64)
        {
            return Err("host must be 1 to 64 characters".into());
        }
        if self.links.is_empty() || self.links.len() > 2 {
            return Err(format!("expected 1 or 2 [[link]], found {}", self.links.len()));
        }
        for (i, l) in self.links.iter().enumerate() {
            if l.listen == l.peer {
                return Err(format!(
                    "link {}: listen and peer are the same address {}",
                    i + 1,
                    l.peer
                ));
            }
            if l.listen.is_ipv4() != l.peer.is_ipv4() {
                return Err(format!(
                    "link {}: listen and peer must be the same address family",
                    i + 1
                ));
            }
        }
        if self.links.len() == 2 && self.links[0].listen == self.links[1].listen {
            return Err("the two links listen on the same address".into());
        }
        if !(100..=600_000).contains(&self.peer_timeout_ms) {
            return Err(format!(
                "peer_timeout_ms = {}: must be 100 to 600000",
                self.peer_timeout_ms
            ));
        }
        if !(10..=600_000).contains(&self.reconnect_interval_ms) {
            return Err(format!(
                "reconnect_interval_ms = {}: must be 10 to 600000",
                self.reconnect_interval_ms
            ));
        }
        if self.backing == self.meta {
            return Err("backing and meta must be different files (metadata never lives in the guest's data)".into());
        }
        if let Some(n) = &self.nbd
            && n.is_empty()
        {
            return Err("nbd: empty address".into());
        }
        if self.ublk_id.is_some() && !self.ublk {
            return Err("ublk_id without ublk = true".into());
        }
        Ok(())
    }

    /// The control socket path (default `/run/eac/ublk-mirror/<resource>.sock`).
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/eac/ublk-mirror/{}.sock", self.resource)))
    }

    /// The pool secret (file contents without surrounding whitespace; ≥ 16 bytes).
    pub fn pool_secret(&self) -> Result<Vec<u8>, DaemonError> {
        let raw = std::fs::read(&self.pool_secret_file).map_err(|source| DaemonError::ReadConfig {
            path: self.pool_secret_file.clone(),
            source,
        })?;
        let s = raw.trim_ascii().to_vec();
        if s.len() < 16 {
            return Err(DaemonError::Config(format!(
                "{}: the pool secret is {} bytes; at least 16 are required",
                self.pool_secret_file.display(),
                s.len()
            )));
        }
        Ok(s)
    }

    fn mirror_config(&self, secret: Vec<u8>) -> MirrorConfig {
        MirrorConfig {
            resource: self.resource.clone(),
            host: self.host.clone().unwrap_or_else(hostname),
            secret,
            links: self
                .links
                .iter()
                .map(|l| LinkAddr {
                    local: Some(l.listen),
                    peer: l.peer,
                })
                .collect(),
            peer_timeout: Duration::from_millis(self.peer_timeout_ms),
            reconnect_interval: Duration::from_millis(self.reconnect_interval_ms),
            resync_rate: self.resync_rate.0,
            on_peer_loss: self.on_peer_loss,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

enum Mode {
    Primary {
        mirror: Mirror,
        nbd: Option<NbdFrontend>,
        ublk: Option<UblkDevice>,
    },
    Secondary(Replica),
    Stopped,
}

struct NbdFrontend {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Node {
    cfg: Config,
    mcfg: Arc<MirrorConfig>,
    meta: SharedMeta,
    disk: Mutex<Option<LocalDisk>>,
    mode: tokio::sync::Mutex<Mode>,
    /// A primary that does not serve yet (no frontends): why, and whether a plain
    /// `promote` may release it (else only `promote --force`).
    held: Mutex<Option<Hold>>,
    /// Snapshot of the mode for dispatching connections and status without awaiting.
    current: Mutex<Current>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
}

/// Why a primary holds its frontends back (see [`Daemon::start`]).
#[derive(Clone, Debug)]
struct Hold {
    reason: String,
    /// A plain `promote` may release it (the copy stopped cleanly as primary).
    promote_ok: bool,
}

/// Whether the metadata alone lets a daemon configured as primary serve at once; `Some`
/// is why not. Only a copy created as the first primary and never started since does: in
/// every other state the peer may hold newer data — it may have been promoted while this
/// copy was down — so this copy waits for the peer to confirm (a session) or for an
/// explicit `promote`.
fn hold_at_start(m: &meta::Meta) -> Option<Hold> {
    let sb = m.superblock();
    let f = sb.flags;
    if f.never_started && f.consistent && !f.discard_my_data {
        return None;
    }
    let (reason, promote_ok) = if m.recovered_from_crash() || f.crashed_primary {
        (
            "this copy was primary when its daemon or host died: the peer may have been promoted since",
            false,
        )
    } else if !f.consistent {
        ("this copy is not consistent (a resync did not finish)", false)
    } else if f.discard_my_data {
        (
            "this copy was chosen as a split-brain victim (resolve --discard-local)",
            false,
        )
    } else if sb.role == Role::Secondary {
        (
            "this copy was a secondary when it stopped: the peer may hold newer data",
            false,
        )
    } else {
        (
            "this copy stopped cleanly as primary, but the peer may have been promoted since",
            true,
        )
    };
    Some(Hold {
        reason: reason.into(),
        promote_ok,
    })
}

#[derive(Clone)]
enum Current {
    /// The mirror, the NBD URL and the ublk block device path.
    Primary(Mirror, Option<String>, Option<PathBuf>),
    Secondary(Replica),
    Switching,
}

/// A running daemon; cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    node: Arc<Node>,
}

impl Daemon {
    /// Opens the metadata and the backing store, binds the link listeners and starts in the
    /// configured role.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        let secret = cfg.pool_secret()?;
        let mcfg = Arc::new(cfg.mirror_config(secret));
        let m = meta::Meta::open(&cfg.meta).map_err(|source| DaemonError::Meta {
            path: cfg.meta.clone(),
            source,
        })?;
        if m.recovered_from_crash() {
            tracing::warn!(target: "event", resource = %cfg.resource, kind = "crash-recovery",
                "the last run did not stop cleanly: the activity log's regions are marked for resync");
        }
        let meta: SharedMeta = Arc::new(Mutex::new(m));
        let disk = match LocalDisk::open(&cfg.backing) {
            Ok(d) => Some(d),
            Err(source) if cfg.role == StartRole::Secondary => {
                return Err(DaemonError::Backing {
                    path: cfg.backing.clone(),
                    source,
                });
            }
            Err(e) => {
                tracing::error!(target: "event", resource = %cfg.resource, kind = "local-disk-failed",
                    "cannot open {}: {e}; starting diskless", cfg.backing.display());
                None
            }
        };
        let node = Arc::new(Node {
            mcfg: mcfg.clone(),
            meta,
            disk: Mutex::new(disk),
            mode: tokio::sync::Mutex::new(Mode::Stopped),
            held: Mutex::new(None),
            current: Mutex::new(Current::Switching),
            listeners: Mutex::new(Vec::new()),
            cfg,
        });
        let d = Daemon { node };
        // Listeners first: a bad address fails the start.
        for (i, l) in d.node.cfg.links.iter().enumerate() {
            let listener = tokio::net::TcpListener::bind(l.listen)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: l.listen.to_string(),
                    source,
                })?;
            let n1 = d.node.clone();
            let n2 = d.node.clone();
            let role = move || match *n1.current.lock().unwrap_or_else(|p| p.into_inner()) {
                Current::Primary(..) => Role::Primary,
                _ => Role::Secondary,
            };
            let dispatch = move |link, rd, wr, hello| {
                let cur = n2.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match cur {
                    Current::Secondary(r) => r.accept(link, rd, wr, hello),
                    Current::Primary(m, _, _) => {
                        tokio::spawn(async move { m.handle_incoming(link, rd, wr, hello).await });
                    }
                    Current::Switching => {}
                }
            };
            let t = tokio::spawn(accept_loop(listener, i, mcfg.clone(), role, dispatch));
            d.node.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(t);
        }
        let started = match d.node.cfg.role {
            StartRole::Primary => {
                let hold = hold_at_start(&d.node.meta.lock().unwrap_or_else(|p| p.into_inner()));
                d.become_primary(hold).await
            }
            StartRole::Secondary => d.become_secondary().await,
        };
        if let Err(e) = started {
            // Nothing ran: leave the metadata clean, not "crashed".
            d.shutdown().await;
            return Err(e);
        }
        Ok(d)
    }

    /// The control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.node.cfg.control_socket()
    }

    /// Starts the mirror as primary. With `hold`, the frontends wait: they start when a
    /// session with the peer confirms this copy (or resyncs it while it serves), or on
    /// `promote`; if the peer turns out to be a primary with newer data, this copy rejoins
    /// as secondary on its own (as DRBD's restarted node does).
    async fn become_primary(&self, hold: Option<Hold>) -> Result<(), DaemonError> {
        let n = &self.node;
        let mut mode = n.mode.lock().await;
        let disk = n.disk.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mirror = Mirror::start((*n.mcfg).clone(), disk, n.meta.clone()).await?;
        if let Some(h) = hold {
            tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "held",
                "primary, not serving yet: {}; serving once the peer confirms this copy is current \
                 (or `promote{}`)", h.reason, if h.promote_ok { "" } else { " --force" });
            *n.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
            *n.current.lock().unwrap_or_else(|p| p.into_inner()) = Current::Primary(mirror.clone(), None, None);
            *mode = Mode::Primary {
                mirror: mirror.clone(),
                nbd: None,
                ublk: None,
            };
            tokio::spawn(self.clone().watch_held(mirror));
            return Ok(());
        }
        let (nbd, ublk) = match self.start_frontends(&mirror).await {
            Ok(f) => f,
            Err(e) => {
                mirror.shutdown().await;
                return Err(e);
            }
        };
        let url = nbd.as_ref().map(|f| f.url.clone());
        let dev = ublk.as_ref().map(|d| d.block_path());
        *n.current.lock().unwrap_or_else(|p| p.into_inner()) = Current::Primary(mirror.clone(), url, dev);
        *mode = Mode::Primary { mirror, nbd, ublk };
        Ok(())
    }

    /// Releases a held primary when the peer confirms it, or demotes it when the peer is a
    /// primary with newer data. Ends when the hold ends (released, promoted, stopped).
    async fn watch_held(self, mirror: Mirror) {
        let n = &self.node;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if n.held.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                return;
            }
            match mirror.session_verdict() {
                engine::SessionVerdict::Waiting => continue,
                engine::SessionVerdict::PeerIsPrimary { newer: false, .. } => continue,
                engine::SessionVerdict::Established => {
                    match self
                        .release(&mirror, "the peer confirmed this copy (a session is up)")
                        .await
                    {
                        Ok(_) => return,
                        Err(e) => {
                            // Still held (and shown so); try again.
                            tracing::error!(error = %eac_common::error_chain(&e), "starting the frontends; retrying in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                engine::SessionVerdict::PeerIsPrimary { host, newer: true } => {
                    tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "rejoin",
                        "{host} is primary with newer data: this copy rejoins as secondary and resyncs from it");
                    if let Err(e) = self.demote().await {
                        tracing::error!(error = %eac_common::error_chain(&e), "rejoining as secondary");
                    }
                    return;
                }
            }
        }
    }

    /// Starts the frontends of the held primary `mirror` (if it still is the held one).
    async fn release(&self, mirror: &Mirror, why: &str) -> Result<bool, DaemonError> {
        let n = &self.node;
        let mut mode = n.mode.lock().await;
        let Mode::Primary { mirror: m, .. } = &*mode else {
            return Ok(false);
        };
        if !m.same_as(mirror) || n.held.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            return Ok(false);
        }
        let (nbd, ublk) = self.start_frontends(mirror).await?;
        *n.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let url = nbd.as_ref().map(|f| f.url.clone());
        let dev = ublk.as_ref().map(|d| d.block_path());
        *n.current.lock().unwrap_or_else(|p| p.into_inner()) = Current::Primary(mirror.clone(), url, dev);
        *mode = Mode::Primary {
            mirror: mirror.clone(),
            nbd,
            ublk,
        };
        tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "serving", "primary serving: {why}");
        Ok(true)
    }

    /// Starts the configured frontends over `mirror`; on failure none is left running (the
    /// mirror keeps running; the caller decides).
    async fn start_frontends(&self, mirror: &Mirror) -> Result<(Option<NbdFrontend>, Option<UblkDevice>), DaemonError> {
        let n = &self.node;
        let nbd = match &n.cfg.nbd {
            None => None,
            Some(addr) => Some(start_nbd(addr, &n.cfg.resource, mirror.clone()).await?),
        };
        let ublk = if n.cfg.ublk {
            match start_ublk(mirror.clone(), n.cfg.ublk_id).await {
                Ok(d) => Some(d),
                Err(e) => {
                    if let Some(f) = nbd {
                        let _ = f.stop.send(());
                        let _ = f.task.await;
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok((nbd, ublk))
    }

    async fn become_secondary(&self) -> Result<(), DaemonError> {
        let n = &self.node;
        let mut mode = n.mode.lock().await;
        let disk = n.disk.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(disk) = disk else {
            return Err(DaemonError::Refused(
                "no local disk: a secondary needs one (attach-disk first)".into(),
            ));
        };
        let r = Replica::start((*n.mcfg).clone(), disk, n.meta.clone()).await?;
        *n.current.lock().unwrap_or_else(|p| p.into_inner()) = Current::Secondary(r.clone());
        *mode = Mode::Secondary(r);
        Ok(())
    }

    /// Stops whatever runs now (frontends first, then the engine) and leaves Stopped.
    async fn stop_mode(&self, mode: &mut Mode) {
        *self.node.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.node.current.lock().unwrap_or_else(|p| p.into_inner()) = Current::Switching;
        match std::mem::replace(mode, Mode::Stopped) {
            Mode::Primary { mirror, nbd, ublk } => {
                if let Some(d) = ublk {
                    match tokio::task::spawn_blocking(move || d.stop()).await {
                        Ok(Ok(stats)) => tracing::info!(?stats, "ublk device removed"),
                        Ok(Err(e)) => tracing::error!(error = %eac_common::error_chain(&e), "stopping the ublk device"),
                        Err(e) => tracing::error!("stopping the ublk device: {e}"),
                    }
                }
                if let Some(f) = nbd {
                    let _ = f.stop.send(());
                    let _ = f.task.await;
                }
                mirror.shutdown().await;
            }
            Mode::Secondary(r) => r.shutdown().await,
            Mode::Stopped => {}
        }
    }

    /// `promote [--force]`: secondary → primary, or a held primary → serving.
    ///
    /// A secondary whose primary went silent a moment ago is still "connected" until the
    /// peer timeout declares the primary lost: promote waits for that (bounded by the peer
    /// timeout), and refuses only a primary that keeps answering. An inconsistent copy (an
    /// unfinished resync) is refused unless forced. A promotion always starts a new data
    /// generation before the first write: from then on this copy is the newer one, and a
    /// returning old primary (even one that crashed with writes in flight) resyncs *from*
    /// it.
    pub async fn promote(&self, force: bool) -> Result<Value, DaemonError> {
        let n = &self.node;
        let held = n.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(h) = held {
            return self.promote_held(h, force).await;
        }
        let bound = n.mcfg.peer_timeout + n.mcfg.link_timeout() + Duration::from_millis(500);
        let t0 = std::time::Instant::now();
        let mut waited = false;
        loop {
            let cur = n.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match cur {
                Current::Secondary(r) if r.connected() => {
                    if t0.elapsed() >= bound {
                        return Err(DaemonError::Refused(format!(
                            "the primary is connected and kept answering for {:.1} s: demote it first (two primaries are never connected)",
                            bound.as_secs_f64()
                        )));
                    }
                    if !waited {
                        tracing::info!(resource = %n.cfg.resource,
                            "promote: the primary is still connected; waiting up to {:.1} s for it to be declared lost", bound.as_secs_f64());
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Current::Switching => {
                    if t0.elapsed() >= bound {
                        return Err(DaemonError::Busy(
                            "a role change is in progress; retry in a few seconds".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
        {
            let mut mode = n.mode.lock().await;
            match &*mode {
                Mode::Primary { .. } => return Ok(json!({"ok": true, "message": "already primary"})),
                Mode::Secondary(r) if r.connected() => {
                    return Err(DaemonError::Busy(
                        "the primary connected again just now: retry, or demote it first".into(),
                    ));
                }
                _ => {}
            }
            let consistent = n
                .meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .superblock()
                .flags
                .consistent;
            if !consistent && !force {
                return Err(DaemonError::Refused(
                    "the local copy is not consistent (a resync did not finish): promoting would serve outdated data; use --force to accept that"
                        .into(),
                ));
            }
            // In-flight writes of the old session land before this returns (Replica::shutdown).
            self.stop_mode(&mut mode).await;
            meta_blocking(&n.meta, |m| {
                m.update(|sb| {
                    sb.flags.consistent = true;
                    sb.flags.discard_my_data = false;
                    sb.r#gen = genid::new_data_generation(&sb.r#gen);
                })?;
                m.flush_bitmap()
            })
            .await?;
        }
        if let Err(e) = self.become_primary(None).await {
            // Do not stay without a role.
            let _ = self.become_secondary().await;
            return Err(e);
        }
        if let Current::Primary(m, _, _) = n.current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            m.generation_is_new();
        }
        let g = n.meta.lock().unwrap_or_else(|p| p.into_inner()).superblock().r#gen;
        tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "promoted", force,
            "promoted to primary; new data generation {g}");
        Ok(json!({"ok": true, "message": "promoted to primary"}))
    }

    /// `promote [--force]` of a held primary: its frontends start now, on the operator's
    /// word, in a new data generation.
    async fn promote_held(&self, h: Hold, force: bool) -> Result<Value, DaemonError> {
        let n = &self.node;
        if !h.promote_ok && !force {
            return Err(DaemonError::Refused(format!(
                "this primary is held ({}): it serves once the peer confirms it is current, or with `promote --force` \
                 (your word that the peer holds no newer data)",
                h.reason
            )));
        }
        let Current::Primary(m, _, _) = n.current.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Err(DaemonError::Busy("a role change is in progress; retry".into()));
        };
        meta_blocking(&n.meta, |m| {
            m.update(|sb| {
                sb.flags.consistent = true;
                sb.flags.discard_my_data = false;
                sb.flags.crashed_primary = false;
                sb.r#gen = genid::new_data_generation(&sb.r#gen);
            })?;
            m.flush_bitmap()
        })
        .await?;
        m.generation_is_new();
        let why = if force { "promote --force" } else { "promote" };
        if !self.release(&m, why).await? {
            return Err(DaemonError::Busy("a role change is in progress; retry".into()));
        }
        let g = n.meta.lock().unwrap_or_else(|p| p.into_inner()).superblock().r#gen;
        tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "promoted", force,
            "held primary promoted ({}); new data generation {g}", h.reason);
        Ok(json!({"ok": true, "message": "promoted: serving"}))
    }

    /// `demote`: primary → secondary (frontends stopped first, in-flight I/O completed).
    pub async fn demote(&self) -> Result<Value, DaemonError> {
        let n = &self.node;
        {
            let mut mode = n.mode.lock().await;
            if let Mode::Secondary(_) = &*mode {
                return Ok(json!({"ok": true, "message": "already secondary"}));
            }
            self.stop_mode(&mut mode).await;
        }
        self.become_secondary().await?;
        tracing::info!(target: "event", resource = %n.cfg.resource, kind = "demoted", "demoted to secondary");
        Ok(json!({"ok": true, "message": "demoted to secondary"}))
    }

    /// `resolve --discard-local` (this copy is the split-brain victim: it becomes secondary
    /// and takes the peer's data for every region either side changed) or `--keep` (this
    /// copy survives: reconnect now).
    pub async fn resolve(&self, discard_local: bool) -> Result<Value, DaemonError> {
        let n = &self.node;
        if discard_local {
            meta_blocking(&n.meta, |m| m.update(|sb| sb.flags.discard_my_data = true)).await?;
            let was_primary = matches!(&*n.mode.lock().await, Mode::Primary { .. });
            if was_primary {
                self.demote().await?;
            }
            tracing::warn!(target: "event", resource = %n.cfg.resource, kind = "resolve",
                "split brain resolved here: local changes will be discarded on reconnect");
            return Ok(json!({"ok": true, "message": "local changes will be discarded when the peer connects"}));
        }
        meta_blocking(&n.meta, |m| m.update(|sb| sb.flags.discard_my_data = false)).await?;
        let cur = n.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Current::Primary(m, _, _) = cur {
            m.resolve_keep();
        }
        tracing::info!(target: "event", resource = %n.cfg.resource, kind = "resolve", "keeping the local data; reconnecting");
        Ok(json!({"ok": true, "message": "keeping the local data; reconnecting"}))
    }

    /// `verify`: starts an online verify (primary only).
    pub async fn verify(&self) -> Result<Value, DaemonError> {
        let cur = self.node.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match cur {
            Current::Primary(m, _, _) => {
                m.start_verify()?;
                Ok(json!({"ok": true, "message": "verify started"}))
            }
            _ => Err(DaemonError::Refused("verify runs on the primary".into())),
        }
    }

    /// `resume-io`: the owner of the guest is confirmed (on_peer_loss = freeze): writes held
    /// since the peer was lost complete and later ones go on without it.
    pub async fn resume_io(&self) -> Result<Value, DaemonError> {
        let cur = self.node.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match cur {
            Current::Primary(m, _, _) => {
                let n = m.resume_io().map_err(DaemonError::Refused)?;
                Ok(json!({"ok": true, "message": format!("resumed: {n} held write(s) complete"), "held": n}))
            }
            _ => Err(DaemonError::Refused("resume-io applies to a serving primary".into())),
        }
    }

    /// `attach-disk [path]`: a (repaired or new) local disk for a diskless primary; resynced
    /// from the peer.
    pub async fn attach_disk(&self, path: Option<PathBuf>) -> Result<Value, DaemonError> {
        let n = &self.node;
        let path = path.unwrap_or_else(|| n.cfg.backing.clone());
        let disk = LocalDisk::open(&path).map_err(|source| DaemonError::Backing {
            path: path.clone(),
            source,
        })?;
        let cur = n.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match cur {
            Current::Primary(m, _, _) => m.attach_disk(disk.clone()).await?,
            _ => return Err(DaemonError::Refused("attach-disk is for a diskless primary".into())),
        }
        *n.disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(disk);
        Ok(json!({"ok": true, "message": format!("{} attached; resyncing from the peer", path.display())}))
    }

    /// The status document.
    pub fn status(&self) -> Value {
        let n = &self.node;
        let mut v = match n.current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Current::Primary(m, url, dev) => {
                let mut v = m.status();
                v["nbd"] = json!(url);
                v["ublk"] = json!(dev);
                let held = n.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
                v["held"] = json!(held.map(|h| json!({"reason": h.reason, "promote_needs_force": !h.promote_ok})));
                v
            }
            Current::Secondary(r) => r.status(),
            Current::Switching => json!({"resource": n.cfg.resource, "role": "switching"}),
        };
        v["ok"] = json!(true);
        v["control_socket"] = json!(n.cfg.control_socket());
        v["meta"] = json!(n.cfg.meta);
        v
    }

    /// Stops everything and closes the metadata cleanly.
    pub async fn shutdown(&self) {
        let n = &self.node;
        {
            let mut mode = n.mode.lock().await;
            self.stop_mode(&mut mode).await;
        }
        for t in n.listeners.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        if let Err(e) = meta_blocking(&n.meta, |m| m.close_clean()).await {
            tracing::error!(error = %eac_common::error_chain(&e), "closing the metadata");
        }
    }
}

/// Creates `/dev/ublkbN` over the mirror — or, when device `id` is left by a killed daemon
/// (created with user recovery), takes it over: the guest's held I/O resumes.
async fn start_ublk(mirror: Mirror, id: Option<u32>) -> Result<UblkDevice, DaemonError> {
    let rt = tokio::runtime::Handle::current();
    let dev = Arc::new(mirror);
    let r = tokio::task::spawn_blocking(move || {
        let opts = UblkOptions {
            id,
            ..UblkOptions::default()
        };
        match UblkDevice::create(dev.clone(), opts, rt.clone()) {
            Err(e) if e.to_errno() == -libc::EEXIST => {
                let id = id.unwrap_or_default();
                tracing::warn!(target: "event", kind = "ublk-recover", id,
                    "/dev/ublkb{id} exists (a previous daemon died): taking it over");
                UblkDevice::recover(dev, id, rt)
            }
            r => r,
        }
    })
    .await
    .map_err(|e| DaemonError::Refused(format!("ublk task: {e}")))?;
    let d = r.map_err(DaemonError::Ublk)?;
    tracing::info!(target: "event", kind = "ublk-up", "serving {}", d.block_path().display());
    Ok(d)
}

async fn start_nbd(addr: &str, export: &str, mirror: Mirror) -> Result<NbdFrontend, DaemonError> {
    let l = nbd::NbdListener::bind(addr).await.map_err(DaemonError::Nbd)?;
    let url = l.url(export);
    let (stop, rx) = oneshot::channel::<()>();
    let export = export.to_owned();
    let task = tokio::spawn(async move {
        nbd::serve(l, export, Arc::new(mirror), async {
            let _ = rx.await;
        })
        .await
    });
    Ok(NbdFrontend { url, stop, task })
}

/// Runs the daemon until SIGINT/SIGTERM: control socket, engine, frontends.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let socket = cfg.control_socket();
    let listener = crate::control::bind(&socket)?;
    let d = Daemon::start(cfg).await?;
    let ctl = tokio::spawn(crate::control::serve(listener, d.clone()));
    tracing::info!(socket = %socket.display(), "ublk-mirror running");
    use tokio::signal::unix::{SignalKind, signal};
    let (mut i, mut t) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(i), Ok(t)) => (i, t),
        _ => return Err(DaemonError::Refused("cannot install signal handlers".into())),
    };
    tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} }
    tracing::info!("stopping");
    ctl.abort();
    d.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
resource = "vm1-disk0"
host = "a"
role = "primary"
backing = "/var/lib/eac/vm1.img"
meta = "/var/lib/eac/vm1.meta"
pool_secret_file = "/etc/eac/pool.secret"
resync_rate = "100M"
nbd = "127.0.0.1:10809"
[[link]]
listen = "10.250.2.1:7789"
peer = "10.250.2.2:7789"
[[link]]
listen = "10.250.3.1:7789"
peer = "10.250.3.2:7789"
"#;

    fn parse(s: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(s).map_err(|e| e.message().to_owned())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.peer_timeout_ms, 3000);
        assert_eq!(c.resync_rate, Rate(100 << 20));
        assert_eq!(c.links.len(), 2);
        assert_eq!(c.control_socket(), PathBuf::from("/run/eac/ublk-mirror/vm1-disk0.sock"));
        let m = c.mirror_config(b"x".to_vec());
        assert_eq!(m.links[1].peer, "10.250.3.2:7789".parse().unwrap());
        assert_eq!(m.link_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (GOOD.replace("role = \"primary\"", "role = \"boss\""), "unknown variant"),
            (
                GOOD.replace("resource = \"vm1-disk0\"", "resource = \"a/b\""),
                "resource",
            ),
            (GOOD.replace("\"100M\"", "\"fast\""), "bad rate"),
            (
                GOOD.replace("meta = \"/var/lib/eac/vm1.meta\"", "meta = \"/var/lib/eac/vm1.img\""),
                "different files",
            ),
            (GOOD.replace("10.250.3.2:7789", "10.250.3.1:7789"), "same address"),
            (
                GOOD.replace("role = \"primary\"", "role = \"primary\"\npeer_timeout_ms = 5"),
                "peer_timeout_ms",
            ),
            (GOOD.replace("host = \"a\"", "hots = \"a\""), "unknown field"),
            (
                GOOD.replace(
                    "[[link]]\nlisten = \"10.250.3.1:7789\"\npeer = \"10.250.3.2:7789\"\n",
                    "",
                )
                .replace(
                    "[[link]]\nlisten = \"10.250.2.1:7789\"\npeer = \"10.250.2.2:7789\"\n",
                    "",
                ),
                "link",
            ),
            (GOOD.replace("10.250.2.2:7789", "[::1]:7789"), "address family"),
            (
                GOOD.replace("role = \"primary\"", "role = \"primary\"\nublk_id = 3"),
                "ublk_id without ublk",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn only_a_never_started_first_primary_serves_without_the_peer() {
        let d = std::env::temp_dir().join(format!("eac-hold-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("m.meta");
        // A new `create-meta --consistent` copy (the first primary).
        let create = || {
            let _ = std::fs::remove_file(&path);
            let o = crate::engine::CreateMetaOptions {
                size: 1 << 20,
                region_size: 4096,
                device_id: 7,
                consistent: true,
                generation: None,
            };
            crate::engine::create_meta_file(&path, &o).unwrap();
        };
        let open = |f: &dyn Fn(&mut meta::Superblock)| {
            create();
            let mut m = meta::Meta::open(&path).unwrap();
            m.update(|sb| f(sb)).unwrap();
            m.close_clean().unwrap();
            drop(m);
            meta::Meta::open(&path).unwrap()
        };
        assert!(hold_at_start(&open(&|_| {})).is_none(), "created as the first primary");
        let clean = hold_at_start(&open(&|sb| sb.flags.never_started = false)).unwrap();
        assert!(clean.promote_ok && clean.reason.contains("promoted since"), "{clean:?}");
        let crashed = hold_at_start(&open(&|sb| {
            sb.flags.never_started = false;
            sb.flags.crashed_primary = true;
        }))
        .unwrap();
        assert!(!crashed.promote_ok && crashed.reason.contains("died"), "{crashed:?}");
        let was_secondary = hold_at_start(&open(&|sb| {
            sb.flags.never_started = false;
            sb.role = Role::Secondary;
        }))
        .unwrap();
        assert!(!was_secondary.promote_ok && was_secondary.reason.contains("secondary"));
        let inconsistent = hold_at_start(&open(&|sb| sb.flags.consistent = false)).unwrap();
        assert!(!inconsistent.promote_ok && inconsistent.reason.contains("not consistent"));
        // A crash (metadata not closed) holds even a never-started copy.
        create();
        {
            let mut m = meta::Meta::open(&path).unwrap();
            m.update(|sb| sb.flags.never_started = false).unwrap();
            drop(m); // no close_clean: a crash
        }
        let m = meta::Meta::open(&path).unwrap();
        assert!(!hold_at_start(&m).unwrap().promote_ok);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("512K"), Ok(512 << 10));
        assert_eq!(parse_rate("2g"), Ok(2 << 30));
        assert!(parse_rate("").is_err());
        assert!(parse_rate("99999999999999999999G").is_err());
    }
}
