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
//! Domain lifecycle events are not covered yet (they need `virt::sys` FFI and the libvirt event
//! loop; a later issue).
//!
//! # States
//! [`DomainState`] is libvirt's state, with one deliberate refinement: a domain that is shut off
//! *because its emulator died* (libvirt: "shut off (crashed)", e.g. QEMU killed) is reported as
//! [`DomainState::Crashed`], because that is the fact the controller acts on. The raw libvirt
//! reason is available from [`Hypervisor::state_reason`].
use std::fmt;
use std::sync::Once;

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
        })
    }
}

/// A coarse classification of libvirt failures, for callers that react to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such domain.
    NotFound,
    /// The domain is not in a state that allows the operation (e.g. destroy of a shut-off domain).
    InvalidState,
    /// A lock manager lease or a disk image is held by someone else.
    Busy,
    /// The daemon is gone or the connection broke.
    ConnectionLost,
    /// Anything else; read the message.
    Other,
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
        let e = self.libvirt();
        // EOF, keepalive timeouts and the like come from libvirt's RPC layer.
        if matches!(e.domain(), virt::enumutil::Enum::Known(ErrorDomain::Rpc)) {
            return ErrorKind::ConnectionLost;
        }
        match known(e.code()) {
            Some(ErrorNumber::NoDomain) => ErrorKind::NotFound,
            Some(ErrorNumber::OperationInvalid) => ErrorKind::InvalidState,
            Some(ErrorNumber::ResourceBusy) => ErrorKind::Busy,
            // QEMU's own image locking only shows in the message text.
            Some(ErrorNumber::InternalError) if e.message().contains("Failed to get \"write\" lock") => ErrorKind::Busy,
            Some(ErrorNumber::NoConnect) => ErrorKind::ConnectionLost,
            _ => ErrorKind::Other,
        }
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

    /// Starts a defined domain (boots it). Blocking (≈ 0.5 s under TCG).
    pub fn start(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::Start, |d| d.create())
    }

    /// Starts a defined domain with its vCPUs paused: QEMU exists and holds the memory, the
    /// guest does not run until [`Hypervisor::resume`]. Not supported by libvirt's test driver.
    pub fn start_paused(&self, name: &str) -> Result<()> {
        self.with_domain(name, Op::StartPaused, |d| {
            d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)
        })
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
        let list_err = |source| Error::List {
            uri: self.uri.clone(),
            source,
        };
        let domains = self.conn.list_all_domains(0).map_err(list_err)?;
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            let row = (|| -> Result<DomainSummary, virt::error::Error> {
                Ok(DomainSummary {
                    name: d.name()?,
                    uuid: d.uuid_string()?,
                    state: map_state(d.state()?).0,
                })
            })();
            match row {
                Ok(row) => out.push(row),
                Err(e) if known(e.code()) == Some(ErrorNumber::NoDomain) => {}
                Err(e) => return Err(list_err(e)),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
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

    #[test]
    fn hypervisor_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Hypervisor>();
        check::<Error>();
    }
}
