//! The hypervisor operations the controller's decisions need, as a trait: the daemon implements
//! it over [`crate::libvirt::Hypervisor`] (blocking calls moved off the runtime), tests use
//! [`fake::FakeVmm`] (enabled by `cfg(test)` or the crate feature `fake`).
//!
//! Methods return `Send` futures so a fence or a restart can run in a spawned task.
use std::future::Future;

use crate::libvirt::{self, DomainState, DomainSummary, ErrorKind};

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmmOp {
    List,
    State,
    Define,
    Start,
    Destroy,
}

impl std::fmt::Display for VmmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmmOp::List => "list",
            VmmOp::State => "read the state of",
            VmmOp::Define => "define",
            VmmOp::Start => "start",
            VmmOp::Destroy => "destroy",
        })
    }
}

/// A failed hypervisor operation: what we tried, on which guest, what kind of failure, and the
/// cause underneath.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {op} {}{}",
    guest.as_deref().map_or_else(|| "guests".to_owned(), |g| format!("guest '{g}'")),
    if kind.is_busy() { format!(" ({kind})") } else { String::new() }
)]
pub struct VmmError {
    pub op: VmmOp,
    pub guest: Option<String>,
    pub kind: ErrorKind,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl VmmError {
    /// An error with a plain-text cause.
    pub fn new(op: VmmOp, guest: Option<&str>, kind: ErrorKind, cause: impl Into<String>) -> Self {
        Self {
            op,
            guest: guest.map(str::to_owned),
            kind,
            source: cause.into().into(),
        }
    }

    /// Wraps a libvirt adapter error, keeping its [`ErrorKind`].
    pub fn libvirt(op: VmmOp, guest: Option<&str>, e: libvirt::Error) -> Self {
        Self {
            op,
            guest: guest.map(str::to_owned),
            kind: e.kind(),
            source: Box::new(e),
        }
    }
}

/// What the controller asks of a host's hypervisor.
pub trait Vmm: Send + Sync {
    /// All defined guests with their states, sorted by name.
    fn list(&self) -> impl Future<Output = Result<Vec<DomainSummary>, VmmError>> + Send;
    /// One guest's state ([`ErrorKind::NotFound`] if it is not defined here).
    fn state(&self, name: &str) -> impl Future<Output = Result<DomainState, VmmError>> + Send;
    /// Defines (or redefines) a guest from its XML; returns its name.
    fn define(&self, xml: &str) -> impl Future<Output = Result<String, VmmError>> + Send;
    /// Starts a defined guest.
    fn start(&self, name: &str) -> impl Future<Output = Result<(), VmmError>> + Send;
    /// Stops a guest at once (QEMU killed). [`ErrorKind::InvalidState`] if it is not running.
    fn destroy(&self, name: &str) -> impl Future<Output = Result<(), VmmError>> + Send;
}

/// An in-memory hypervisor for tests (`cfg(test)` or feature `fake`).
#[cfg(any(test, feature = "fake"))]
pub mod fake {
    use std::collections::{BTreeMap, BTreeSet};
    use std::future::Future;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{DomainState, DomainSummary, ErrorKind, Vmm, VmmError, VmmOp};

    /// One call made to a [`FakeVmm`], with its tokio time and result.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FakeCall {
        pub op: VmmOp,
        pub guest: Option<String>,
        /// When the call began.
        pub started: Instant,
        /// When it returned.
        pub finished: Instant,
        pub ok: bool,
    }

    #[derive(Debug, Default)]
    struct Inner {
        domains: BTreeMap<String, DomainState>,
        start_delay: Duration,
        destroy_delay: Duration,
        failures: BTreeMap<(VmmOp, String), ErrorKind>,
        hangs: BTreeSet<(VmmOp, String)>,
        calls: Vec<FakeCall>,
        /// Every (time, guest, active) change, for "never twice" checks.
        history: Vec<(Instant, String, bool)>,
    }

    /// A fake hypervisor. Cheap to clone (shared state). Timing is conservative for safety
    /// checks: a guest counts as running from the moment `start` is *called* until `destroy`
    /// *returns*; each takes its configured delay on tokio time.
    #[derive(Debug, Clone, Default)]
    pub struct FakeVmm {
        inner: Arc<Mutex<Inner>>,
    }

    impl FakeVmm {
        /// An empty fake with instant operations.
        pub fn new() -> Self {
            Self::default()
        }

        fn lock(&self) -> MutexGuard<'_, Inner> {
            // A test that panicked while holding the lock already failed; keep going.
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// How long `start` and `destroy` take (tokio time).
        pub fn set_delays(&self, start: Duration, destroy: Duration) {
            let mut i = self.lock();
            i.start_delay = start;
            i.destroy_delay = destroy;
        }

        /// Defines `name` in `state` (replacing any existing one).
        pub fn add(&self, name: &str, state: DomainState) {
            let mut i = self.lock();
            i.domains.insert(name.to_owned(), state);
            i.history.push((Instant::now(), name.to_owned(), state.is_active()));
        }

        /// Changes a guest's state behind the controller's back (e.g. a crash).
        pub fn set_state(&self, name: &str, state: DomainState) {
            self.add(name, state);
        }

        /// Makes every future `op` on `name` fail with `kind`.
        pub fn fail(&self, op: VmmOp, name: &str, kind: ErrorKind) {
            self.lock().failures.insert((op, name.to_owned()), kind);
        }

        /// Makes every future `op` on `name` hang forever (a stuck libvirt call).
        pub fn hang(&self, op: VmmOp, name: &str) {
            self.lock().hangs.insert((op, name.to_owned()));
        }

        /// Removes all injected failures and hangs.
        pub fn clear_faults(&self) {
            let mut i = self.lock();
            i.failures.clear();
            i.hangs.clear();
        }

        /// The guest's state, if defined.
        pub fn get(&self, name: &str) -> Option<DomainState> {
            self.lock().domains.get(name).copied()
        }

        /// True while the guest exists as a process (see the type's timing note).
        pub fn is_active(&self, name: &str) -> bool {
            self.get(name).is_some_and(DomainState::is_active)
        }

        /// Names of active guests, sorted.
        pub fn active(&self) -> Vec<String> {
            let i = self.lock();
            i.domains
                .iter()
                .filter(|(_, s)| s.is_active())
                .map(|(n, _)| n.clone())
                .collect()
        }

        /// Every call made so far.
        pub fn calls(&self) -> Vec<FakeCall> {
            self.lock().calls.clone()
        }

        /// Every change of a guest between active and not, with its time.
        pub fn history(&self) -> Vec<(Instant, String, bool)> {
            self.lock().history.clone()
        }

        fn set(&self, name: &str, state: DomainState) {
            let mut i = self.lock();
            let was = i.domains.get(name).is_some_and(|s| s.is_active());
            i.domains.insert(name.to_owned(), state);
            if was != state.is_active() {
                i.history.push((Instant::now(), name.to_owned(), state.is_active()));
            }
        }

        fn log(&self, op: VmmOp, guest: Option<&str>, started: Instant, ok: bool) {
            self.lock().calls.push(FakeCall {
                op,
                guest: guest.map(str::to_owned),
                started,
                finished: Instant::now(),
                ok,
            });
        }

        /// Injected fault for (op, name): hang forever, or return the error.
        async fn fault(&self, op: VmmOp, name: &str) -> Result<(), VmmError> {
            let (hang, fail) = {
                let i = self.lock();
                let key = (op, name.to_owned());
                (i.hangs.contains(&key), i.failures.get(&key).copied())
            };
            if hang {
                std::future::pending::<()>().await;
            }
            match fail {
                Some(kind) => Err(VmmError::new(op, Some(name), kind, "injected failure")),
                None => Ok(()),
            }
        }

        async fn run<T>(
            &self,
            op: VmmOp,
            name: Option<&str>,
            f: impl Future<Output = Result<T, VmmError>>,
        ) -> Result<T, VmmError> {
            let started = Instant::now();
            let r = async {
                if let Some(n) = name {
                    self.fault(op, n).await?;
                }
                f.await
            }
            .await;
            self.log(op, name, started, r.is_ok());
            r
        }
    }

    fn xml_name(xml: &str) -> Option<&str> {
        let start = xml.find("<name>")? + "<name>".len();
        let len = xml[start..].find("</name>")?;
        Some(xml[start..start + len].trim()).filter(|n| !n.is_empty())
    }

    impl Vmm for FakeVmm {
        async fn list(&self) -> Result<Vec<DomainSummary>, VmmError> {
            self.run(VmmOp::List, None, async {
                Ok(self
                    .lock()
                    .domains
                    .iter()
                    .map(|(n, s)| DomainSummary {
                        name: n.clone(),
                        uuid: String::new(),
                        state: *s,
                    })
                    .collect())
            })
            .await
        }

        async fn state(&self, name: &str) -> Result<DomainState, VmmError> {
            self.run(VmmOp::State, Some(name), async {
                self.get(name)
                    .ok_or_else(|| VmmError::new(VmmOp::State, Some(name), ErrorKind::NotFound, "no such domain"))
            })
            .await
        }

        async fn define(&self, xml: &str) -> Result<String, VmmError> {
            let Some(name) = xml_name(xml) else {
                return Err(VmmError::new(
                    VmmOp::Define,
                    None,
                    ErrorKind::Other,
                    "no <name> in the XML",
                ));
            };
            self.run(VmmOp::Define, Some(name), async {
                let mut i = self.lock();
                i.domains.entry(name.to_owned()).or_insert(DomainState::ShutOff);
                Ok(name.to_owned())
            })
            .await
        }

        async fn start(&self, name: &str) -> Result<(), VmmError> {
            self.run(VmmOp::Start, Some(name), async {
                let delay = {
                    let i = self.lock();
                    match i.domains.get(name) {
                        None => {
                            return Err(VmmError::new(
                                VmmOp::Start,
                                Some(name),
                                ErrorKind::NotFound,
                                "no such domain",
                            ));
                        }
                        Some(s) if s.is_active() => {
                            return Err(VmmError::new(
                                VmmOp::Start,
                                Some(name),
                                ErrorKind::InvalidState,
                                "domain is already running",
                            ));
                        }
                        Some(_) => i.start_delay,
                    }
                };
                self.set(name, DomainState::Running);
                tokio::time::sleep(delay).await;
                Ok(())
            })
            .await
        }

        async fn destroy(&self, name: &str) -> Result<(), VmmError> {
            self.run(VmmOp::Destroy, Some(name), async {
                let delay = {
                    let i = self.lock();
                    match i.domains.get(name) {
                        None => {
                            return Err(VmmError::new(
                                VmmOp::Destroy,
                                Some(name),
                                ErrorKind::NotFound,
                                "no such domain",
                            ));
                        }
                        Some(s) if !s.is_active() => {
                            return Err(VmmError::new(
                                VmmOp::Destroy,
                                Some(name),
                                ErrorKind::InvalidState,
                                "domain is not running",
                            ));
                        }
                        Some(_) => i.destroy_delay,
                    }
                };
                tokio::time::sleep(delay).await;
                self.set(name, DomainState::ShutOff);
                Ok(())
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fake::FakeVmm;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fake_lifecycle_and_errors() {
        let v = FakeVmm::new();
        v.set_delays(Duration::from_millis(500), Duration::from_secs(1));
        assert_eq!(v.define("<domain><name>g1</name></domain>").await.unwrap(), "g1");
        assert!(v.define("<domain/>").await.is_err());
        assert_eq!(v.state("g1").await.unwrap(), DomainState::ShutOff);
        assert_eq!(v.state("nope").await.unwrap_err().kind, ErrorKind::NotFound);

        let t0 = tokio::time::Instant::now();
        v.start("g1").await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        assert!(v.is_active("g1"));
        assert_eq!(v.start("g1").await.unwrap_err().kind, ErrorKind::InvalidState);

        v.destroy("g1").await.unwrap();
        assert!(!v.is_active("g1"));
        let e = v.destroy("g1").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidState);
        assert_eq!(e.to_string(), "cannot destroy guest 'g1'");
        assert!(std::error::Error::source(&e).is_some());

        v.fail(VmmOp::Start, "g1", ErrorKind::Busy);
        assert_eq!(v.start("g1").await.unwrap_err().kind, ErrorKind::Busy);
        // a refused start names what refused
        v.fail(VmmOp::Start, "g1", ErrorKind::LeaseHeld);
        let e = v.start("g1").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start guest 'g1' (refused by the lock manager (virtlockd): the disk lease is held elsewhere)"
        );
        v.clear_faults();
        v.start("g1").await.unwrap();
        let list = v.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].state, DomainState::Running);
        // start → running at the call, destroy → off when it returns.
        let h = v.history();
        assert!(h[0].2);
        assert_eq!(h[0].0, t0);
        assert_eq!(h[1].0, t0 + Duration::from_millis(1500));
        assert!(v.calls().iter().any(|c| c.op == VmmOp::Start && !c.ok));
    }

    #[tokio::test(start_paused = true)]
    async fn fake_hang_never_returns() {
        let v = FakeVmm::new();
        v.add("g", DomainState::Running);
        v.hang(VmmOp::Destroy, "g");
        let r = tokio::time::timeout(Duration::from_secs(60), v.destroy("g")).await;
        assert!(r.is_err(), "a hung destroy must not complete");
        assert!(v.is_active("g"));
    }
}
