//! A small adapter over libvirt (the `virt` crate): connect to one host's libvirtd, define,
//! start (or start paused), resume, suspend, destroy, undefine and inspect domains.
//!
//! # Blocking
//! Every call here is a **blocking** libvirt RPC (a start under TCG takes about 0.5 s, a destroy
//! 1–2 s, the first define on a fresh daemon about 4 s while it probes QEMU). Async callers must
//! run them off the runtime's worker threads, e.g. with `tokio::task::spawn_blocking` or on a
//! dedicated thread per host. A [`Hypervisor`] is `Send + Sync` (libvirt connections are
//! thread-safe), so one can be shared through an `Arc`. Keep each call and its error handling on
//! one thread: libvirt reports errors through thread-local state, which this module reads right
//! after the call.
//!
//! # Lifecycle events
//! [`watch`] turns one host's domains into a stream of [`LifecycleEvent`]s (started, stopped,
//! crashed, paused, resumed, defined, undefined) on a tokio channel. It polls libvirt's domain
//! list on a thread of its own (every 250 ms by default) and reports the *differences* between
//! two snapshots, instead of registering libvirt event callbacks: the `virt` crate has no safe
//! wrapper for `virConnectDomainEventRegisterAny`, the controller crate forbids `unsafe`, and
//! a level-triggered diff cannot lose an event across a libvirtd restart or a reconnect (it
//! compares against the last state seen, whatever happened in between). The price is latency
//! (at most one interval, measured in `tests/tests/lab_libvirt_events.rs` against libvirt's own
//! events) and that a transition undone within one interval is not seen; the daemon also reads
//! the state itself before acting. See docs/architecture.md, "libvirt lifecycle events".
//!
//! # States
//! [`DomainState`] is libvirt's state, with one deliberate refinement: a domain that is shut off
//! *because its emulator died* (libvirt: "shut off (crashed)", e.g. QEMU killed) is reported as
//! [`DomainState::Crashed`], because that is the fact the controller acts on. The raw libvirt
//! reason is available from [`Hypervisor::state_reason`].
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};

/// The state of a domain as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// Defined or created, but libvirt reports no state.
    NoState,
    Running,
    /// Blocked on a resource (reported by some hypervisors; treated like running).
    Blocked,
    Paused,
    /// Being shut down by the guest.
    ShuttingDown,
    ShutOff,
    /// The emulator or the guest crashed (including libvirt's "shut off (crashed)").
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// A state this version of the adapter does not know (raw libvirt value).
    Unknown(i64),
}

impl DomainState {
    /// True while QEMU exists for the domain (running, blocked, paused, shutting down, pm-suspended).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Blocked | Self::Paused | Self::ShuttingDown | Self::PmSuspended
        )
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoState => f.write_str("no state"),
            Self::Running => f.write_str("running"),
            Self::Blocked => f.write_str("blocked"),
            Self::Paused => f.write_str("paused"),
            Self::ShuttingDown => f.write_str("shutting down"),
            Self::ShutOff => f.write_str("shut off"),
            Self::Crashed => f.write_str("crashed"),
            Self::PmSuspended => f.write_str("pm-suspended"),
            Self::Unknown(v) => write!(f, "unknown state {v}"),
        }
    }
}

/// One domain in [`Hypervisor::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
}

/// The operation that failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    StartPaused,
    Resume,
    Suspend,
    Destroy,
    Undefine,
    GetState,
    GetXml,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Start => "start",
            Op::StartPaused => "start (paused)",
            Op::Resume => "resume",
            Op::Suspend => "suspend",
            Op::Destroy => "destroy",
            Op::Undefine => "undefine",
            Op::GetState => "read the state of",
            Op::GetXml => "read the XML of",
        })
    }
}

/// A coarse classification of libvirt failures, for callers that react to them.
///
/// A start that another host's guest prevents is classified by *what* refused it, because only
/// one of them is the protection the pool relies on:
/// - [`ErrorKind::LeaseHeld`]: libvirt's lock manager (virtlockd with `lock_manager = "lockd"`,
///   or sanlock) refused to give this QEMU the disk's lease. It works wherever the lockspace
///   directory is shared, whatever the storage's own locking does.
/// - [`ErrorKind::ImageLocked`]: QEMU's own image lock (an OFD lock on the image file) refused.
///   libvirt launches QEMU paused and acquires the leases only when it resumes the vCPUs, so
///   where QEMU's lock works it refuses first; on storage where it does not (some NFS set-ups,
///   `file.locking=off`) only the lease stands in the way.
/// - [`ErrorKind::Busy`]: any other "resource busy".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such domain.
    NotFound,
    /// The domain is not in a state that allows the operation (e.g. destroy of a shut-off domain).
    InvalidState,
    /// The lock manager refused: another host (or QEMU) holds a lease of the domain's disks.
    LeaseHeld,
    /// QEMU's own image lock refused: another QEMU has the disk open for writing.
    ImageLocked,
    /// Some other resource is busy.
    Busy,
    /// The daemon is gone or the connection broke.
    ConnectionLost,
    /// Anything else; read the message.
    Other,
}

impl ErrorKind {
    /// True for every "someone else holds it" failure: [`ErrorKind::LeaseHeld`],
    /// [`ErrorKind::ImageLocked`] and [`ErrorKind::Busy`]. Such a start may succeed once the
    /// holder is gone.
    pub fn is_busy(self) -> bool {
        matches!(self, Self::LeaseHeld | Self::ImageLocked | Self::Busy)
    }

    /// Classifies a libvirt error (see the type's documentation).
    pub fn of(e: &virt::error::Error) -> Self {
        // EOF, keepalive timeouts and the like come from libvirt's RPC layer.
        if matches!(e.domain(), virt::enumutil::Enum::Known(ErrorDomain::Rpc)) {
            return Self::ConnectionLost;
        }
        let msg = e.message();
        // QEMU's image lock shows only in the text QEMU printed before it exited
        // ("Failed to get \"write\" lock", "Failed to get shared \"write\" lock").
        if msg.contains("Failed to get") && msg.contains("lock") && !msg.contains("Lockspace") {
            return Self::ImageLocked;
        }
        match known(e.code()) {
            Some(ErrorNumber::NoDomain) => Self::NotFound,
            Some(ErrorNumber::OperationInvalid) => Self::InvalidState,
            // virtlockd: "Lockspace resource '<sha256>' is locked" (error domain "lockspace",
            // relayed by libvirtd); sanlock: "Failed to acquire lock" (domain "locking").
            Some(ErrorNumber::ResourceBusy)
                if matches!(
                    e.domain(),
                    virt::enumutil::Enum::Known(ErrorDomain::Lockspace | ErrorDomain::Locking)
                ) || msg.contains("Lockspace resource")
                    || msg.contains("acquire lock") =>
            {
                Self::LeaseHeld
            }
            Some(ErrorNumber::ResourceBusy) => Self::Busy,
            Some(ErrorNumber::NoConnect) => Self::ConnectionLost,
            _ => Self::Other,
        }
    }
}

/// What refused, in the operator's words (used in event texts).
impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "no such guest",
            Self::InvalidState => "not possible in the guest's state",
            Self::LeaseHeld => "refused by the lock manager (virtlockd): the disk lease is held elsewhere",
            Self::ImageLocked => {
                "refused by QEMU's image lock (another QEMU has the disk open), not by the lock manager"
            }
            Self::Busy => "a resource is busy",
            Self::ConnectionLost => "libvirtd unreachable",
            Self::Other => "libvirt error",
        })
    }
}

/// Errors of the libvirt adapter. The message says what we tried, on which host (URI) and for
/// which domain; the libvirt error (its message and code) is the [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to libvirt at {uri} (is libvirtd running and the socket path right?)")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("libvirt at {uri} rejected the definition of domain '{name}'")]
    Define {
        uri: String,
        name: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain named '{name}' on {uri}")]
    NoSuchDomain {
        uri: String,
        name: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot {op} domain '{name}' on {uri}")]
    Operation {
        op: Op,
        uri: String,
        name: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot list the domains on {uri}")]
    List {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
}

impl Error {
    /// The libvirt error underneath.
    pub fn libvirt(&self) -> &virt::error::Error {
        match self {
            Error::Connect { source, .. }
            | Error::Define { source, .. }
            | Error::NoSuchDomain { source, .. }
            | Error::Operation { source, .. }
            | Error::List { source, .. } => source,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoSuchDomain { .. } => return ErrorKind::NotFound,
            Error::Connect { .. } => return ErrorKind::ConnectionLost,
            _ => {}
        }
        ErrorKind::of(self.libvirt())
    }
}

fn known(code: virt::error::ErrorNumberEnum) -> Option<ErrorNumber> {
    match code {
        virt::enumutil::Enum::Known(c) => Some(c),
        virt::enumutil::Enum::Unknown(_) => None,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection to one host's libvirtd (or any libvirt URI, e.g. `test:///default`).
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hypervisor")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl Hypervisor {
    /// Opens a read-write connection to `uri`, e.g.
    /// `qemu+unix:///system?socket=/tmp/lab/hosts/h1/sock/libvirt-sock`. Blocking.
    pub fn connect(uri: &str) -> Result<Self> {
        static QUIET: Once = Once::new();
        // libvirt's default error handler prints every error to stderr; we return them instead.
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|source| Error::Connect {
            uri: uri.to_owned(),
            source,
        })?;
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    /// The URI this hypervisor was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Defines (or redefines) a persistent domain from its XML and returns its name. Always put a
    /// `<uuid>` in the XML: redefining the same name without one fails. Blocking; the first
    /// define on a fresh libvirtd takes seconds (QEMU capabilities probe).
    pub fn define(&self, xml: &str) -> Result<String> {
        let dom = self.conn.define_domain_xml(xml).map_err(|source| Error::Define {
            uri: self.uri.clone(),
            name: xml_name(xml).unwrap_or("<no name in XML>").to_owned(),
            source,
        })?;
        dom.name().map_err(|source| Error::Operation {
            op: Op::GetState,
            uri: self.uri.clone(),
            name: xml_name(xml).unwrap_or_default().to_owned(),
            source,
        })
    }

    /// Starts a defined domain (boots it). Blocking (≈ 0.5 s under TCG). A failure is also
    /// remembered, with its [`ErrorKind`], for the [`watch`]er of the same URI in this process:
    /// its [`LifecycleKind::StartFailed`] event then says why.
    pub fn start(&self, name: &str) -> Result<()> {
        self.tracked_start(name, Op::Start, |d| d.create())
    }

    /// Starts a defined domain with its vCPUs paused: QEMU exists and holds the memory, the
    /// guest does not run until [`Hypervisor::resume`]. Not supported by libvirt's test driver.
    pub fn start_paused(&self, name: &str) -> Result<()> {
        self.tracked_start(name, Op::StartPaused, |d| {
            d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)
        })
    }

    fn tracked_start(
        &self,
        name: &str,
        op: Op,
        f: impl FnOnce(&Domain) -> Result<(), virt::error::Error>,
    ) -> Result<()> {
        let key = (self.uri.clone(), name.to_owned());
        starts().entry(key.clone()).or_default().in_progress += 1;
        let r = self.with_domain(name, op, f);
        let mut all = starts();
        let entry = all.entry(key.clone()).or_default();
        entry.in_progress = entry.in_progress.saturating_sub(1);
        entry.failure = match &r {
            Err(e) => Some((Instant::now(), start_failure_reason(e))),
            Ok(()) => None,
        };
        if entry.in_progress == 0 && entry.failure.is_none() {
            all.remove(&key);
        }
        r
    }

    /// Resumes a paused domain.
    pub fn resume(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::Resume, |d| d.resume())
    }

    /// Pauses a running domain's vCPUs.
    pub fn suspend(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::Suspend, |d| d.suspend())
    }

    /// Stops a domain at once (QEMU is terminated; the guest gets no shutdown). Fails with
    /// [`ErrorKind::InvalidState`] if it is not running. Blocking (1–2 s under TCG).
    pub fn destroy(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::Destroy, |d| d.destroy())
    }

    /// Removes a domain's persistent definition (a running domain becomes transient).
    pub fn undefine(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::Undefine, |d| d.undefine())
    }

    /// The domain's state (see the module documentation for "crashed").
    pub fn state(&self, name: &str) -> Result<DomainState> {
        self.state_reason(name).map(|(s, _)| s)
    }

    /// The domain's state and libvirt's reason for it, e.g. `(ShutOff, "destroyed")`.
    pub fn state_reason(&self, name: &str) -> Result<(DomainState, String)> {
        self.with_domain(name, Op::GetState, |d| d.state().map(map_state))
    }

    /// All domains (active and inactive) with their state. Domains that vanish while being
    /// listed are skipped.
    pub fn list(&self) -> Result<Vec<DomainSummary>> {
        Ok(self.list_with_reasons()?.into_iter().map(|(d, _)| d).collect())
    }

    /// Like [`Hypervisor::list`], with libvirt's reason for each state (e.g. "destroyed").
    pub fn list_with_reasons(&self) -> Result<Vec<(DomainSummary, String)>> {
        let list_err = |source| Error::List {
            uri: self.uri.clone(),
            source,
        };
        let domains = self.conn.list_all_domains(0).map_err(list_err)?;
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            let row = (|| -> Result<(DomainSummary, String), virt::error::Error> {
                let (state, reason) = map_state(d.state()?);
                Ok((
                    DomainSummary {
                        name: d.name()?,
                        uuid: d.uuid_string()?,
                        state,
                    },
                    reason,
                ))
            })();
            match row {
                Ok(row) => out.push(row),
                Err(e) if known(e.code()) == Some(ErrorNumber::NoDomain) => {}
                Err(e) => return Err(list_err(e)),
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// True while the connection to libvirtd works (a cheap local check plus keepalive state).
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// A domain's XML description (the persistent definition if there is one). Blocking.
    pub fn xml(&self, name: &str) -> Result<String> {
        self.with_domain(name, Op::GetXml, |d| d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE))
    }

    fn with_domain<T>(
        &self,
        name: &str,
        op: Op,
        f: impl FnOnce(&Domain) -> Result<T, virt::error::Error>,
    ) -> Result<T> {
        let dom = self.conn.lookup_domain_by_name(name).map_err(|source| {
            if known(source.code()) == Some(ErrorNumber::NoDomain) {
                Error::NoSuchDomain {
                    uri: self.uri.clone(),
                    name: name.to_owned(),
                    source,
                }
            } else {
                Error::Operation {
                    op,
                    uri: self.uri.clone(),
                    name: name.to_owned(),
                    source,
                }
            }
        })?;
        f(&dom).map_err(|source| Error::Operation {
            op,
            uri: self.uri.clone(),
            name: name.to_owned(),
            source,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Lifecycle events (polling; see the module documentation)

/// What happened to a domain between two looks at the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    /// A new (persistent or transient) domain appeared.
    Defined,
    /// A domain disappeared.
    Undefined,
    /// libvirt is starting the domain: QEMU exists, paused, while libvirt sets it up
    /// ("paused (starting up)"): disk leases, devices. Not a start yet: it ends in
    /// [`LifecycleKind::Started`] or [`LifecycleKind::StartFailed`].
    Starting,
    /// The domain started: it runs (booted), or was started paused on purpose.
    Started,
    /// A start failed: QEMU was launched but libvirt gave up (libvirt: "shut off (failed)"),
    /// e.g. the lock manager refused the disk lease. The event's detail says why when the start
    /// was made through a [`Hypervisor`] of this process (see [`Hypervisor::start`]).
    StartFailed,
    /// The domain stopped in an orderly way (destroyed, shut down, saved, migrated away).
    Stopped,
    /// The domain stopped because its emulator died or the guest crashed.
    Crashed,
    /// A running domain was paused.
    Paused,
    /// A paused domain runs again.
    Resumed,
}

impl fmt::Display for LifecycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Defined => "defined",
            Self::Undefined => "undefined",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::StartFailed => "start failed",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
            Self::Paused => "paused",
            Self::Resumed => "resumed",
        })
    }
}

/// One lifecycle event of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub domain: String,
    pub kind: LifecycleKind,
    /// libvirt's reason for the new state ("destroyed", "crashed", "booted", …) or "" if gone.
    pub detail: String,
    /// The state now (`ShutOff` for an undefined domain).
    pub state: DomainState,
}

/// What a [`watch`] stream delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The first complete look at the host (and again after every reconnect): every domain
    /// with its state. Events that follow are relative to it.
    Snapshot(Vec<DomainSummary>),
    /// Something changed, seen at `at`.
    Lifecycle { event: LifecycleEvent, at: Instant },
    /// libvirtd cannot be reached (daemon dead, socket gone, connection broken); the watcher
    /// keeps trying every interval. Sent once per outage.
    ConnectionLost { error: String },
}

/// A domain as the watcher last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// [`seen_state`]: "paused (starting up)" counts as running.
    state: DomainState,
    /// libvirt's reason for the state.
    reason: String,
    /// libvirt is still starting it ("paused (starting up)"); no `Started` reported yet.
    starting: bool,
}

impl Seen {
    fn new(state: DomainState, reason: &str) -> Self {
        Self {
            state: seen_state(state, reason),
            reason: reason.to_owned(),
            starting: starting_up(state, reason),
        }
    }
}

/// libvirt shows a domain being started as "paused (starting up)".
fn starting_up(state: DomainState, reason: &str) -> bool {
    state == DomainState::Paused && reason.starts_with("starting")
}

/// libvirt's reason for a domain whose start failed: "shut off (failed)".
const FAILED_REASON: &str = "failed";

/// The state the watcher remembers: a domain "paused (starting up)" counts as running.
fn seen_state(state: DomainState, reason: &str) -> DomainState {
    if starting_up(state, reason) {
        DomainState::Running
    } else {
        state
    }
}

/// The events that lead from `prev` to `now` (both keyed by domain name). Pure, so it is
/// unit-tested; the order is by domain name, and per domain: defined, then state changes, then
/// undefined.
///
/// A start is reported once it is decided: libvirt shows a domain being started as "paused
/// (starting up)" (QEMU launched with its vCPUs stopped, leases not yet acquired), which is
/// reported as [`LifecycleKind::Starting`]; then either [`LifecycleKind::Started`] (it runs, or
/// was started paused on purpose) or [`LifecycleKind::StartFailed`] (it is shut off again), never
/// a start followed by a stop. A failed start that came and went between two looks shows only
/// as libvirt's reason changing to "failed" on a shut-off domain; that is a `StartFailed` too.
fn diff(prev: &BTreeMap<String, Seen>, now: &BTreeMap<String, (DomainState, String)>) -> Vec<LifecycleEvent> {
    let mut out = Vec::new();
    let ev = |domain: &str, kind, detail: &str, state| LifecycleEvent {
        domain: domain.to_owned(),
        kind,
        detail: detail.to_owned(),
        state,
    };
    let now: BTreeMap<&String, Seen> = now.iter().map(|(k, (s, r))| (k, Seen::new(*s, r))).collect();
    let mut names: Vec<&String> = prev.keys().chain(now.keys().copied()).collect();
    names.sort();
    names.dedup();
    for name in names {
        match (prev.get(name), now.get(name)) {
            (None, Some(n)) => {
                out.push(ev(name, LifecycleKind::Defined, &n.reason, n.state));
                if n.starting {
                    out.push(ev(name, LifecycleKind::Starting, &n.reason, n.state));
                } else if n.state.is_active() {
                    out.push(ev(name, LifecycleKind::Started, &n.reason, n.state));
                    if n.state == DomainState::Paused {
                        out.push(ev(name, LifecycleKind::Paused, &n.reason, n.state));
                    }
                }
            }
            (Some(old), None) => {
                if old.starting {
                    // a transient domain whose start failed
                    out.push(ev(name, LifecycleKind::StartFailed, "", DomainState::ShutOff));
                } else if old.state.is_active() {
                    out.push(ev(name, LifecycleKind::Stopped, "", DomainState::ShutOff));
                }
                out.push(ev(name, LifecycleKind::Undefined, "", DomainState::ShutOff));
            }
            (Some(old), Some(n)) => {
                let (was, is) = (old.state, n.state);
                if old.starting {
                    if n.starting {
                        continue;
                    }
                    if is.is_active() {
                        out.push(ev(name, LifecycleKind::Started, &n.reason, is));
                        if is == DomainState::Paused {
                            out.push(ev(name, LifecycleKind::Paused, &n.reason, is));
                        }
                    } else {
                        out.push(ev(name, LifecycleKind::StartFailed, &n.reason, is));
                    }
                    continue;
                }
                if n.starting {
                    if !was.is_active() {
                        out.push(ev(name, LifecycleKind::Starting, &n.reason, is));
                    }
                    continue;
                }
                if !was.is_active() && !is.is_active() {
                    // started and failed between two looks
                    if n.reason == FAILED_REASON && old.reason != FAILED_REASON {
                        out.push(ev(name, LifecycleKind::StartFailed, &n.reason, is));
                    }
                    continue;
                }
                if was == is {
                    continue;
                }
                let kind = match (was.is_active(), is.is_active()) {
                    (false, true) => {
                        out.push(ev(name, LifecycleKind::Started, &n.reason, is));
                        if is == DomainState::Paused {
                            Some(LifecycleKind::Paused)
                        } else {
                            None
                        }
                    }
                    (true, false) if is == DomainState::Crashed => Some(LifecycleKind::Crashed),
                    (true, false) => Some(LifecycleKind::Stopped),
                    (true, true) if is == DomainState::Paused => Some(LifecycleKind::Paused),
                    (true, true) if was == DomainState::Paused => Some(LifecycleKind::Resumed),
                    // running ↔ blocked …: not a lifecycle change
                    _ => None,
                };
                if let Some(kind) = kind {
                    out.push(ev(name, kind, &n.reason, is));
                }
            }
            (None, None) => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Why a start failed

/// Starts made through a [`Hypervisor`] in this process, per (URI, domain): how many are in
/// progress, and why the last one failed. libvirt keeps no reason with a domain whose start
/// failed (its state is just "shut off (failed)"); the caller of the start gets the error. The
/// watcher of the same URI looks the reason up here, so a failed start is one event that says
/// what refused.
#[derive(Debug, Default)]
struct StartEntry {
    in_progress: u32,
    failure: Option<(Instant, String)>,
}

static STARTS: Mutex<BTreeMap<(String, String), StartEntry>> = Mutex::new(BTreeMap::new());

/// How long a recorded start failure stays the explanation of a `StartFailed` seen later.
const START_FAILURE_TTL: Duration = Duration::from_secs(30);
/// How long the watcher holds a `StartFailed` back while a start of that domain by this process
/// is still returning (libvirt marks the domain shut off just before the call returns).
const START_FAILURE_WAIT: Duration = Duration::from_secs(5);

fn starts() -> MutexGuard<'static, BTreeMap<(String, String), StartEntry>> {
    STARTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// "what refused: libvirt's message", e.g. "refused by the lock manager (virtlockd): the disk
/// lease is held elsewhere: resource busy: Lockspace resource '…' is locked".
fn start_failure_reason(e: &Error) -> String {
    format!("{}: {}", e.kind(), e.libvirt().message())
}

/// The detail of a `StartFailed` of `name` at `uri`: the recorded reason of a start made in this
/// process; `None` while such a start is still returning (ask again, unless `give_up`); else
/// what libvirt says and that the reason is only in libvirtd's log.
fn start_failure_detail(uri: &str, name: &str, libvirt_reason: &str, give_up: bool) -> Option<String> {
    let key = (uri.to_owned(), name.to_owned());
    let mut all = starts();
    if let Some(entry) = all.get_mut(&key) {
        let recorded = entry.failure.take().filter(|(at, _)| at.elapsed() <= START_FAILURE_TTL);
        let in_progress = entry.in_progress > 0;
        if !in_progress {
            all.remove(&key);
        }
        if let Some((_, reason)) = recorded {
            return Some(reason);
        }
        if in_progress && !give_up {
            return None;
        }
    }
    let shown = if libvirt_reason.is_empty() {
        String::new()
    } else {
        format!(" (libvirt: shut off, {libvirt_reason})")
    };
    Some(format!(
        "the start failed{shown}; it was not made by this controller, so the reason is only in libvirtd's log"
    ))
}

/// Stops its [`watch`] thread when dropped (within one interval).
#[derive(Debug)]
pub struct WatchHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchHandle {
    /// Stops the watcher and waits for its thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Do not join in drop: it could block an async task for one interval. The thread ends
        // by itself at its next poll.
    }
}

/// The default polling interval of [`watch`].
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Watches the domains of the libvirtd at `uri` from a thread of its own (with its own
/// connection), sending a [`WatchEvent::Snapshot`] first and then every change. Reconnects by
/// itself after the daemon comes back (a new snapshot follows, then the changes relative to the
/// last state seen before the outage). Ends when the handle is dropped or the receiver closed.
pub fn watch(uri: &str, interval: Duration, tx: tokio::sync::mpsc::Sender<WatchEvent>) -> WatchHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let uri = uri.to_owned();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("libvirt-watch".into())
        .spawn(move || watch_loop(&uri, interval, &tx, &stop2))
        .ok();
    if thread.is_none() {
        tracing::error!("cannot spawn the libvirt watcher thread");
    }
    WatchHandle { stop, thread }
}

fn watch_loop(uri: &str, interval: Duration, tx: &tokio::sync::mpsc::Sender<WatchEvent>, stop: &AtomicBool) {
    let mut hv: Option<Hypervisor> = None;
    let mut last: Option<BTreeMap<String, Seen>> = None;
    let mut lost_reported = false;
    // StartFailed events waiting for their reason: (event, seen at, held since)
    let mut pending: Vec<(LifecycleEvent, Instant, Instant)> = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        if hv.is_none() {
            match Hypervisor::connect(uri) {
                Ok(h) => hv = Some(h),
                Err(e) => {
                    if !lost_reported {
                        lost_reported = true;
                        let error = eac_common::error_chain(&e);
                        tracing::warn!(uri, error, "libvirt watcher: cannot connect");
                        if tx.blocking_send(WatchEvent::ConnectionLost { error }).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if let Some(h) = &hv {
            match h.list_with_reasons() {
                Ok(rows) => {
                    let at = Instant::now();
                    let now: BTreeMap<String, (DomainState, String)> = rows
                        .iter()
                        .map(|(d, r)| (d.name.clone(), (d.state, r.clone())))
                        .collect();
                    let mut msgs = Vec::new();
                    if lost_reported || last.is_none() {
                        msgs.push(WatchEvent::Snapshot(rows.into_iter().map(|(d, _)| d).collect()));
                    }
                    lost_reported = false;
                    // failed starts held back while their start call returns (in order)
                    let mut ready = Vec::new();
                    pending.retain_mut(|(event, at, since)| {
                        let give_up = since.elapsed() >= START_FAILURE_WAIT;
                        match start_failure_detail(uri, &event.domain, &event.detail, give_up) {
                            Some(detail) => {
                                event.detail = detail;
                                ready.push(WatchEvent::Lifecycle {
                                    event: event.clone(),
                                    at: *at,
                                });
                                false
                            }
                            None => true,
                        }
                    });
                    msgs.extend(ready);
                    if let Some(prev) = &last {
                        for mut event in diff(prev, &now) {
                            // a newer event of a domain goes after its held-back failure
                            if let Some(i) = pending.iter().position(|(e, _, _)| e.domain == event.domain) {
                                let (mut held, held_at, _) = pending.remove(i);
                                held.detail =
                                    start_failure_detail(uri, &held.domain, &held.detail, true).unwrap_or_default();
                                msgs.push(WatchEvent::Lifecycle {
                                    event: held,
                                    at: held_at,
                                });
                            }
                            if event.kind == LifecycleKind::StartFailed {
                                match start_failure_detail(uri, &event.domain, &event.detail, false) {
                                    Some(detail) => event.detail = detail,
                                    None => {
                                        pending.push((event, at, Instant::now()));
                                        continue;
                                    }
                                }
                            }
                            msgs.push(WatchEvent::Lifecycle { event, at });
                        }
                    }
                    last = Some(
                        now.into_iter()
                            .map(|(k, (state, reason))| (k, Seen::new(state, &reason)))
                            .collect(),
                    );
                    for m in msgs {
                        if tx.blocking_send(m).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let error = eac_common::error_chain(&e);
                    hv = None; // reconnect next round
                    if !lost_reported {
                        lost_reported = true;
                        tracing::warn!(uri, error, "libvirt watcher: connection lost");
                        if tx.blocking_send(WatchEvent::ConnectionLost { error }).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now; // fell behind (slow RPC): do not burst
        }
    }
}

fn map_state(
    (state, reason): (virt::domain::DomainStateEnum, virt::domain::DomainStateReasonEnum),
) -> (DomainState, String) {
    use virt::domain::{DomainShutoffReason, DomainState as V, DomainStateReason as R};
    use virt::enumutil::Enum;
    let crashed_shutoff = matches!(
        reason,
        Enum::Known(R::Shutoff(Enum::Known(DomainShutoffReason::Crashed)))
    );
    let s = match state {
        Enum::Known(V::NoState) => DomainState::NoState,
        Enum::Known(V::Running) => DomainState::Running,
        Enum::Known(V::Blocked) => DomainState::Blocked,
        Enum::Known(V::Paused) => DomainState::Paused,
        Enum::Known(V::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(V::Shutoff) if crashed_shutoff => DomainState::Crashed,
        Enum::Known(V::Shutoff) => DomainState::ShutOff,
        Enum::Known(V::Crashed) => DomainState::Crashed,
        Enum::Known(V::PMSuspended) => DomainState::PmSuspended,
        Enum::Unknown(v) => DomainState::Unknown(i64::from(v)),
    };
    let reason = match reason {
        Enum::Known(r) => r.to_string().to_lowercase(),
        Enum::Unknown(v) => format!("reason {v}"),
    };
    (s, reason)
}

/// The `<name>` of a domain XML, for error messages (no full XML parse).
fn xml_name(xml: &str) -> Option<&str> {
    let start = xml.find("<name>")? + "<name>".len();
    let len = xml[start..].find("</name>")?;
    Some(xml[start..start + len].trim())
}

#[cfg(test)]
mod tests {
    //! Against libvirt's `test:///default` driver: no daemon needed. Its state is shared by
    //! every connection in the process, so each test uses its own domain names.
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const TEST_URI: &str = "test:///default";

    fn unique(tag: &str) -> (String, String) {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("eac-ut-{tag}-{pid}-{n}");
        let uuid = format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            pid,
            n,
            0xeac0_0000_u64 + u64::from(n)
        );
        (name, uuid)
    }

    fn test_xml(name: &str, uuid: &str) -> String {
        format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        )
    }

    fn hv() -> Hypervisor {
        Hypervisor::connect(TEST_URI).expect("test:///default is built into libvirt")
    }

    #[test]
    fn lifecycle_define_start_destroy_undefine() {
        let hv = hv();
        assert_eq!(hv.uri(), TEST_URI);
        let (name, uuid) = unique("life");
        assert_eq!(hv.define(&test_xml(&name, &uuid)).unwrap(), name);
        assert_eq!(hv.state(&name).unwrap(), DomainState::ShutOff);

        hv.start(&name).unwrap();
        assert_eq!(hv.state(&name).unwrap(), DomainState::Running);
        let row = hv.list().unwrap().into_iter().find(|d| d.name == name).expect("listed");
        assert_eq!(row.uuid, uuid);
        assert_eq!(row.state, DomainState::Running);

        hv.suspend(&name).unwrap();
        assert_eq!(hv.state(&name).unwrap(), DomainState::Paused);
        hv.resume(&name).unwrap();
        assert_eq!(hv.state(&name).unwrap(), DomainState::Running);

        hv.destroy(&name).unwrap();
        let (state, reason) = hv.state_reason(&name).unwrap();
        assert_eq!(state, DomainState::ShutOff);
        assert!(reason.contains("destroy"), "reason: {reason}");

        hv.undefine(&name).unwrap();
        let e = hv.state(&name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e:?}");
        assert!(!hv.list().unwrap().iter().any(|d| d.name == name));
    }

    #[test]
    fn redefine_same_uuid_updates() {
        let hv = hv();
        let (name, uuid) = unique("redef");
        hv.define(&test_xml(&name, &uuid)).unwrap();
        hv.define(&test_xml(&name, &uuid)).unwrap();
        hv.undefine(&name).unwrap();
    }

    #[test]
    fn missing_domain_is_not_found_with_a_clear_message() {
        let hv = hv();
        let e = hv.start("eac-ut-no-such-domain").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "no domain named 'eac-ut-no-such-domain' on test:///default"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn destroy_of_a_shut_off_domain_is_invalid_state() {
        let hv = hv();
        let (name, uuid) = unique("inval");
        hv.define(&test_xml(&name, &uuid)).unwrap();
        let e = hv.destroy(&name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidState, "{e:?}");
        assert!(
            e.to_string().starts_with(&format!("cannot destroy domain '{name}'")),
            "{e}"
        );
        hv.undefine(&name).unwrap();
    }

    #[test]
    fn bad_xml_is_a_define_error_naming_the_domain() {
        let hv = hv();
        let e = hv.define("<domain type='test'><name>eac-ut-broken</name>").unwrap_err();
        assert!(
            matches!(e, Error::Define { ref name, .. } if name == "eac-ut-broken"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("rejected the definition of domain 'eac-ut-broken'")
        );
    }

    #[test]
    fn start_paused_is_unsupported_by_the_test_driver() {
        // Documented limitation of libvirt's test driver (virCheckFlags(0)); the real daemon is
        // covered by the lab tests. This checks the error path and message.
        let hv = hv();
        let (name, uuid) = unique("paused");
        hv.define(&test_xml(&name, &uuid)).unwrap();
        let e = hv.start_paused(&name).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot start (paused) domain '{name}'")),
            "{e}"
        );
        assert_eq!(hv.state(&name).unwrap(), DomainState::ShutOff);
        hv.undefine(&name).unwrap();
    }

    #[test]
    fn connect_failure_names_the_uri() {
        let uri = "test:///nonexistent/eac-node.xml";
        let e = Hypervisor::connect(uri).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionLost);
        assert!(e.to_string().contains(uri), "{e}");
    }

    #[test]
    fn state_names_for_operators() {
        assert_eq!(DomainState::ShutOff.to_string(), "shut off");
        assert_eq!(DomainState::Crashed.to_string(), "crashed");
        assert!(DomainState::Paused.is_active());
        assert!(!DomainState::Crashed.is_active());
    }

    #[test]
    fn xml_name_extraction() {
        assert_eq!(xml_name("<domain><name> g1 </name></domain>"), Some("g1"));
        assert_eq!(xml_name("<domain/>"), None);
    }

    fn seen(rows: &[(&str, DomainState)]) -> BTreeMap<String, Seen> {
        rows.iter().map(|(n, s)| ((*n).to_owned(), Seen::new(*s, ""))).collect()
    }

    fn now(rows: &[(&str, DomainState, &str)]) -> BTreeMap<String, (DomainState, String)> {
        rows.iter()
            .map(|(n, s, r)| ((*n).to_owned(), (*s, (*r).to_owned())))
            .collect()
    }

    fn kinds(ev: &[LifecycleEvent]) -> Vec<(String, LifecycleKind)> {
        ev.iter().map(|e| (e.domain.clone(), e.kind)).collect()
    }

    #[test]
    fn diff_reports_each_transition_once() {
        use DomainState::*;
        use LifecycleKind as K;
        let k = |d: &str, x| (d.to_owned(), x);
        // nothing changed → nothing
        assert!(diff(&seen(&[("g", Running)]), &now(&[("g", Running, "booted")])).is_empty());
        // appeared running: defined + started
        assert_eq!(
            kinds(&diff(&seen(&[]), &now(&[("g", Running, "booted")]))),
            vec![k("g", K::Defined), k("g", K::Started)]
        );
        // started paused
        assert_eq!(
            kinds(&diff(&seen(&[("g", ShutOff)]), &now(&[("g", Paused, "user")]))),
            vec![k("g", K::Started), k("g", K::Paused)]
        );
        assert_eq!(
            kinds(&diff(&seen(&[("g", Running)]), &now(&[("g", Paused, "user")]))),
            vec![k("g", K::Paused)]
        );
        // libvirt's "paused (starting up)" during a start is not a start yet, nor a pause
        assert_eq!(
            kinds(&diff(&seen(&[("g", ShutOff)]), &now(&[("g", Paused, "startingup")]))),
            vec![k("g", K::Starting)]
        );
        assert!(diff(&seen(&[("g", Running)]), &now(&[("g", Running, "booted")])).is_empty());
        assert_eq!(
            kinds(&diff(&seen(&[("g", Paused)]), &now(&[("g", Running, "unpaused")]))),
            vec![k("g", K::Resumed)]
        );
        let d = diff(&seen(&[("g", Running)]), &now(&[("g", ShutOff, "destroyed")]));
        assert_eq!(kinds(&d), vec![k("g", K::Stopped)]);
        assert_eq!(d[0].detail, "destroyed");
        let d = diff(&seen(&[("g", Running)]), &now(&[("g", Crashed, "crashed")]));
        assert_eq!(kinds(&d), vec![k("g", K::Crashed)]);
        assert_eq!(d[0].state, Crashed);
        // a transient domain that vanished while running: stopped + undefined
        assert_eq!(
            kinds(&diff(&seen(&[("g", Running)]), &now(&[]))),
            vec![k("g", K::Stopped), k("g", K::Undefined)]
        );
        assert_eq!(
            kinds(&diff(&seen(&[("g", ShutOff)]), &now(&[]))),
            vec![k("g", K::Undefined)]
        );
        // crashed → shut off (libvirt re-reads), running ↔ blocked: no lifecycle change
        assert!(diff(&seen(&[("g", Crashed)]), &now(&[("g", ShutOff, "destroyed")])).is_empty());
        assert!(diff(&seen(&[("g", Running)]), &now(&[("g", Blocked, "")])).is_empty());
        // several domains, by name
        assert_eq!(
            kinds(&diff(
                &seen(&[("b", Running), ("a", ShutOff)]),
                &now(&[("a", Running, "booted"), ("b", Crashed, "crashed")])
            )),
            vec![k("a", K::Started), k("b", K::Crashed)]
        );
    }

    /// `prev` as the watcher remembers `now` after a look.
    fn remembered(rows: &[(&str, DomainState, &str)]) -> BTreeMap<String, Seen> {
        rows.iter()
            .map(|(n, s, r)| ((*n).to_owned(), Seen::new(*s, r)))
            .collect()
    }

    #[test]
    fn a_start_is_reported_once_it_is_decided() {
        use DomainState::*;
        use LifecycleKind as K;
        let k = |x| ("g".to_owned(), x);
        let starting = remembered(&[("g", Paused, "startingup")]);
        // starting up → running: started (no pause, no resume)
        let d = diff(&starting, &now(&[("g", Running, "booted")]));
        assert_eq!(kinds(&d), vec![k(K::Started)]);
        assert_eq!(d[0].state, Running);
        // still starting up: nothing more
        assert!(diff(&starting, &now(&[("g", Paused, "startingup")])).is_empty());
        // starting up → started paused on purpose: started + paused
        assert_eq!(
            kinds(&diff(&starting, &now(&[("g", Paused, "user")]))),
            vec![k(K::Started), k(K::Paused)]
        );
        // starting up → shut off (failed): one failed start, never started + stopped
        let d = diff(&starting, &now(&[("g", ShutOff, "failed")]));
        assert_eq!(kinds(&d), vec![k(K::StartFailed)]);
        assert_eq!((d[0].state, d[0].detail.as_str()), (ShutOff, "failed"));
        // a transient domain whose start failed vanishes
        assert_eq!(
            kinds(&diff(&starting, &now(&[]))),
            vec![k(K::StartFailed), k(K::Undefined)]
        );
        // a new domain seen while starting up
        assert_eq!(
            kinds(&diff(&seen(&[]), &now(&[("g", Paused, "startingup")]))),
            vec![k(K::Defined), k(K::Starting)]
        );
        // a start that failed between two looks: only the reason changed to "failed"
        let off = remembered(&[("g", ShutOff, "destroyed")]);
        assert_eq!(
            kinds(&diff(&off, &now(&[("g", ShutOff, "failed")]))),
            vec![k(K::StartFailed)]
        );
        // … once: the same failed state again is no new event
        assert!(
            diff(
                &remembered(&[("g", ShutOff, "failed")]),
                &now(&[("g", ShutOff, "failed")])
            )
            .is_empty()
        );
        // crashed → shut off: no failed start
        assert!(
            diff(
                &remembered(&[("g", Crashed, "crashed")]),
                &now(&[("g", ShutOff, "destroyed")])
            )
            .is_empty()
        );
    }

    #[test]
    fn a_failed_start_of_this_process_carries_its_reason() {
        let uri = "test:///eac-unit-start-reasons";
        // not started here: the reason is only in libvirtd's log
        let d = start_failure_detail(uri, "g", "failed", false).unwrap();
        assert!(d.contains("not made by this controller") && d.contains("failed"), "{d}");
        // a start still returning: held back, unless the watcher gives up
        starts().entry((uri.into(), "g".into())).or_default().in_progress = 1;
        assert_eq!(start_failure_detail(uri, "g", "failed", false), None);
        assert!(
            start_failure_detail(uri, "g", "failed", true)
                .unwrap()
                .contains("libvirtd's log")
        );
        // the start returned its error: that is the reason, given once
        {
            let mut all = starts();
            let e = all.entry((uri.into(), "g".into())).or_default();
            e.in_progress = 0;
            e.failure = Some((Instant::now(), "refused by the lock manager (virtlockd): …".into()));
        }
        assert_eq!(
            start_failure_detail(uri, "g", "failed", false).as_deref(),
            Some("refused by the lock manager (virtlockd): …")
        );
        assert!(
            start_failure_detail(uri, "g", "failed", false)
                .unwrap()
                .contains("libvirtd's log")
        );
        assert!(!starts().contains_key(&(uri.into(), "g".into())));
    }

    #[test]
    fn what_refused_a_start_is_named() {
        assert!(ErrorKind::LeaseHeld.to_string().contains("lock manager (virtlockd)"));
        assert!(ErrorKind::ImageLocked.to_string().contains("QEMU's image lock"));
        assert!(ErrorKind::ImageLocked.to_string().contains("not by the lock manager"));
        for k in [ErrorKind::LeaseHeld, ErrorKind::ImageLocked, ErrorKind::Busy] {
            assert!(k.is_busy());
        }
        assert!(!ErrorKind::Other.is_busy() && !ErrorKind::NotFound.is_busy());
    }

    #[test]
    fn watch_sees_the_lifecycle_on_the_test_driver() {
        let hv = hv();
        let (name, uuid) = unique("watch");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let handle = watch(TEST_URI, Duration::from_millis(20), tx);
        // Changes are relative to the first snapshot: wait for it before changing anything.
        let first = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.recv()).await });
        assert!(matches!(first, Ok(Some(WatchEvent::Snapshot(_)))), "{first:?}");
        let mut next = |want: LifecycleKind| -> LifecycleEvent {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match rx.recv().await.expect("watcher alive") {
                            WatchEvent::Lifecycle { event, .. } if event.domain == name => return event,
                            _ => {}
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("no {want} event for {name}"))
            })
        };
        hv.define(&test_xml(&name, &uuid)).unwrap();
        assert_eq!(next(LifecycleKind::Defined).kind, LifecycleKind::Defined);
        hv.start(&name).unwrap();
        assert_eq!(next(LifecycleKind::Started).kind, LifecycleKind::Started);
        hv.suspend(&name).unwrap();
        assert_eq!(next(LifecycleKind::Paused).kind, LifecycleKind::Paused);
        hv.resume(&name).unwrap();
        assert_eq!(next(LifecycleKind::Resumed).kind, LifecycleKind::Resumed);
        hv.destroy(&name).unwrap();
        let e = next(LifecycleKind::Stopped);
        assert_eq!((e.kind, e.state), (LifecycleKind::Stopped, DomainState::ShutOff));
        assert!(e.detail.contains("destroy"), "{e:?}");
        hv.undefine(&name).unwrap();
        assert_eq!(next(LifecycleKind::Undefined).kind, LifecycleKind::Undefined);
        handle.stop();
    }

    #[test]
    fn watch_reports_an_unreachable_daemon() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let _h = watch("test:///nonexistent/eac-watch.xml", Duration::from_millis(10), tx);
        let first = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), rx.recv()).await });
        match first {
            Ok(Some(WatchEvent::ConnectionLost { error })) => assert!(error.contains("eac-watch.xml"), "{error}"),
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
    }

    #[test]
    fn hypervisor_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Hypervisor>();
        check::<Error>();
    }
}
