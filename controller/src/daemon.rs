//! The controller daemon: wires membership, fencing, the plan, the pool configuration, libvirt,
//! the API and events together on one tokio runtime.
//!
//! # Tasks
//! - **heartbeat send**, one per network: every `heartbeat_interval`, a heartbeat to every peer
//!   on that network (host, incarnation, who we hear, fencing flag, configuration epoch);
//! - **heartbeat receive**, one per network: each accepted heartbeat → [`Membership`]; a peer
//!   with a newer configuration epoch → fetch its configuration;
//! - **state-file**: every `statefile_interval`, write our slot and read every slot (blocking
//!   I/O on a blocking thread, bounded by a timeout; a stalled write counts as a failure);
//!   before each, check that the open file is still the path's ([`statefile_watch`]: reopen a
//!   replaced file, report a missing one and a peer's corrupt slot once per episode);
//! - **tick**: every 100 ms, [`Membership::tick`] → events → [`Fencer`] → decisions (fence
//!   ourselves; restart a dead peer's guests that [`plan::place_failed`] puts here); the plan's
//!   status is re-checked and a change reported;
//! - **libvirt**: [`libvirt::watch`] → guest events; a Level 1 guest that crashes on this host
//!   while it is healthy is restarted here with exponential backoff;
//! - **API**: the root-only unix socket and, if configured, the authenticated TCP endpoint.
//!
//! Every decision and action is an [`Event`](crate::events::Event). Blocking libvirt calls
//! run on blocking threads ([`LibvirtVmm`]). State shared by the tasks lives in one
//! `std::sync::Mutex` held only for short computations, never across an `.await`.
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::{self, ApiError, Handler, Op, Request, Response};
use crate::config::Config;
use crate::events::{Event, EventBus, EventKind, now_ms};
use crate::fence::{self, FenceDecision, FenceOutcome, FenceState, Fencer, Watchdog};
use crate::heartbeat::{Heartbeat, HeartbeatSocket};
use crate::libvirt::{self, DomainState, DomainSummary, ErrorKind, Hypervisor, LifecycleKind, WatchEvent};
use crate::membership::{self, Channel, Membership, MembershipEvent, PeerSpec, PeerState};
use crate::plan;
use crate::pool::{self, Level, PoolConfig, ProtectedGuest, Refusal};
use crate::reconcile::{self, Reconciler};
use crate::statefile::{SlotRecord, StateFile};
use crate::statefile_watch::{self, SlotHealth, WatchEvent as SfEvent, Watcher};
use crate::view;
use crate::vmm::{Vmm, VmmError, VmmOp};

/// How often membership is ticked.
const TICK: Duration = Duration::from_millis(100);
/// A gap between two membership ticks this long means the process was not scheduled.
const STALL: Duration = Duration::from_millis(500);
/// Timeout of one call to a peer's API (connect + request).
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A proposal not committed within this long is dropped.
const PROPOSAL_TTL: Duration = Duration::from_secs(15);
/// Crash restarts: first delay, cap, and how long a guest must run to reset the backoff.
const CRASH_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(30);
const CRASH_BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Failover start attempts (e.g. while a lock lease is still held) and their spacing.
const FAILOVER_ATTEMPTS: u32 = 10;
const FAILOVER_RETRY: Duration = Duration::from_secs(1);
/// How long after a stall longer than the dead timeout a duplicate copy here yields.
const AFTER_STALL: Duration = Duration::from_secs(15);

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid membership setup")]
    Membership(#[source] membership::MembershipError),
    #[error("cannot load the pool configuration")]
    Pool(#[source] pool::PoolError),
    #[error("cannot set up heartbeats on network {network}")]
    Heartbeat {
        network: String,
        #[source]
        source: crate::heartbeat::HeartbeatError,
    },
    #[error("cannot listen on the API {what}")]
    Api {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// True when the configuration itself is wrong (exit 64: do not restart).
    pub fn is_config(&self) -> bool {
        matches!(self, DaemonError::Membership(_) | DaemonError::Pool(_))
    }
}

// ---------------------------------------------------------------------------------------------
// libvirt as a Vmm (blocking calls on blocking threads, reconnect after the daemon restarted)

/// [`Vmm`] over [`Hypervisor`]: every call runs on a blocking thread; a connection that broke
/// (libvirtd restarted) is replaced at the next call.
#[derive(Debug)]
pub struct LibvirtVmm {
    uri: String,
    conn: Mutex<Option<Arc<Hypervisor>>>,
}

impl LibvirtVmm {
    pub fn new(uri: &str) -> Self {
        Self {
            uri: uri.to_owned(),
            conn: Mutex::new(None),
        }
    }

    /// Runs `f` with a connection on a blocking thread; reconnects once if the connection broke.
    async fn call<T: Send + 'static>(
        &self,
        op: VmmOp,
        guest: Option<&str>,
        f: impl Fn(&Hypervisor) -> libvirt::Result<T> + Send + Sync + 'static,
    ) -> Result<T, VmmError> {
        let f = Arc::new(f);
        for attempt in 0..2 {
            let cached = lock(&self.conn).clone();
            let uri = self.uri.clone();
            let f2 = f.clone();
            let r = tokio::task::spawn_blocking(move || -> (Option<Arc<Hypervisor>>, libvirt::Result<T>) {
                let hv = match cached {
                    Some(h) => h,
                    None => match Hypervisor::connect(&uri) {
                        Ok(h) => Arc::new(h),
                        Err(e) => return (None, Err(e)),
                    },
                };
                let r = f2(&hv);
                (Some(hv), r)
            })
            .await;
            let (hv, r) = match r {
                Ok(x) => x,
                Err(e) => {
                    return Err(VmmError::new(
                        op,
                        guest,
                        ErrorKind::Other,
                        format!("libvirt call panicked: {e}"),
                    ));
                }
            };
            match r {
                Err(e) if e.kind() == ErrorKind::ConnectionLost && attempt == 0 => {
                    *lock(&self.conn) = None;
                    continue;
                }
                Err(e) => {
                    if e.kind() == ErrorKind::ConnectionLost {
                        *lock(&self.conn) = None;
                    } else if let Some(hv) = hv {
                        *lock(&self.conn) = Some(hv);
                    }
                    return Err(VmmError::libvirt(op, guest, e));
                }
                Ok(v) => {
                    if let Some(hv) = hv {
                        *lock(&self.conn) = Some(hv);
                    }
                    return Ok(v);
                }
            }
        }
        Err(VmmError::new(
            op,
            guest,
            ErrorKind::ConnectionLost,
            "libvirt connection lost twice",
        ))
    }

    /// The persistent XML of a domain.
    pub async fn xml(&self, name: &str) -> Result<String, VmmError> {
        let n = name.to_owned();
        self.call(VmmOp::State, Some(name), move |h| h.xml(&n)).await
    }
}

impl Vmm for LibvirtVmm {
    fn list(&self) -> impl Future<Output = Result<Vec<DomainSummary>, VmmError>> + Send {
        self.call(VmmOp::List, None, |h| h.list())
    }

    fn state(&self, name: &str) -> impl Future<Output = Result<DomainState, VmmError>> + Send {
        let n = name.to_owned();
        async move {
            let n2 = n.clone();
            self.call(VmmOp::State, Some(&n), move |h| h.state(&n2)).await
        }
    }

    fn define(&self, xml: &str) -> impl Future<Output = Result<String, VmmError>> + Send {
        let x = xml.to_owned();
        async move {
            let name = pool_xml_name(&x);
            self.call(VmmOp::Define, name.as_deref(), move |h| h.define(&x)).await
        }
    }

    fn start(&self, name: &str) -> impl Future<Output = Result<(), VmmError>> + Send {
        let n = name.to_owned();
        async move {
            let n2 = n.clone();
            self.call(VmmOp::Start, Some(&n), move |h| h.start(&n2)).await
        }
    }

    fn destroy(&self, name: &str) -> impl Future<Output = Result<(), VmmError>> + Send {
        let n = name.to_owned();
        async move {
            let n2 = n.clone();
            self.call(VmmOp::Destroy, Some(&n), move |h| h.destroy(&n2)).await
        }
    }
}

fn pool_xml_name(xml: &str) -> Option<String> {
    let start = xml.find("<name>")? + "<name>".len();
    let len = xml[start..].find("</name>")?;
    Some(xml[start..start + len].trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// The watchdog device

/// `/dev/watchdog`: armed by opening it (the device's own timeout applies: setting it needs an
/// ioctl, which this crate does not do), kept alive while the fence runs, disarmed by writing
/// the magic close character `V`. If the fence does not complete, the device stays armed and the
/// host resets when its timeout expires.
#[derive(Debug)]
pub struct DevWatchdog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl DevWatchdog {
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }
}

impl Watchdog for DevWatchdog {
    fn arm(&mut self, _timeout: Duration) -> std::io::Result<()> {
        use std::io::Write;
        if self.file.is_none() {
            let mut f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.write_all(b"\0")?;
            self.file = Some(f);
        }
        Ok(())
    }

    fn disarm(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(mut f) = self.file.take() {
            f.write_all(b"V")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default, Clone)]
struct PeerInfo {
    api_addr: Option<SocketAddr>,
    config_epoch: u64,
    fencing: bool,
    /// Guests running there, from its state-file slot or vm.local.
    running: Vec<String>,
}

#[derive(Debug)]
struct CrashState {
    attempts: u32,
    last_start: Instant,
    pending: bool,
}

struct St {
    membership: Membership,
    fencer: Fencer,
    pool: PoolConfig,
    /// This host's domains as the libvirt watcher last saw them.
    local: BTreeMap<String, DomainSummary>,
    local_known: bool,
    peers: BTreeMap<String, PeerInfo>,
    crash: BTreeMap<String, CrashState>,
    /// Guests this host is starting right now (failover or crash restart).
    starting: BTreeSet<String>,
    /// (epoch, config, from, received) of a peer's proposal not yet committed.
    pending: Option<(u64, PoolConfig, Instant)>,
    plan_ok: Option<bool>,
    redundancy_ok: bool,
    statefile_busy: bool,
    /// Is the open state-file the path's, does every peer's slot decode (episodes → events).
    sf_watch: Watcher,
    /// The state-file was opened once: from then on a missing file is reported, not created.
    sf_opened_once: bool,
    /// Rate limit of the "still broken" log lines about the state-file and peers' slots.
    sf_log_limit: eac_common::ratelimit::LogLimiter<String>,
    /// The error of our last slot write, if it failed.
    last_write_error: Option<String>,
    /// Guests this host's fences were asked to stop (a retried fence finds them "already
    /// off", which the fencer does not count as fenced): restarted after rejoining if the
    /// pool still places them here.
    fenced_guests: BTreeSet<String>,
    tick: u64,
    syncing: BTreeSet<String>,
    /// Does the pool's record of where each guest runs match libvirt (see `reconcile`).
    reconciler: Reconciler,
    /// A reconciliation pass is running.
    reconciling: bool,
    /// Guests whose record could not be corrected (warned once per episode).
    record_warned: BTreeSet<String>,
    /// Until when this host counts as "just resumed from a stall longer than the dead
    /// timeout" (its peers may have declared it dead; a duplicate copy here yields).
    after_stall_until: Option<Instant>,
}

/// The daemon. Cheap to share (`Arc`).
pub struct Ctl {
    cfg: Config,
    me: String,
    incarnation: u64,
    bus: EventBus,
    vmm: Arc<LibvirtVmm>,
    st: Mutex<St>,
    /// Serialises pool changes made through this host.
    change_lock: tokio::sync::Mutex<()>,
    statefile: Mutex<Option<Arc<StateFile>>>,
    watchdog: Mutex<Box<dyn Watchdog>>,
}

/// The error of a pool change that live host `p` did not accept with `e`. Only a refusal by
/// `p` (its answer to this change) is a refusal here (`eac` exits 64: don't retry); a peer
/// that is busy, unreachable, failed internally or spoke garbage is transient (`eac` exits 1).
fn peer_did_not_accept(p: &str, change: &str, e: &ApiError) -> ApiError {
    let msg = format!("live host {p} did not accept the change ({change}): {}", e.message);
    match e.code.as_str() {
        api::codes::UNREACHABLE | api::codes::PROTOCOL => ApiError::new("peer_unreachable", format!("refused: {msg}"))
            .with_hint(format!(
                "host {p} is alive (heartbeats) but its API cannot be reached; retry, or check its controller"
            )),
        api::codes::BUSY | api::codes::INTERNAL | api::codes::LAGGED => {
            ApiError::new(e.code.clone(), format!("not applied: {msg}")).with_hint(
                e.hint
                    .clone()
                    .unwrap_or_else(|| format!("retry shortly; see host {p}'s controller log")),
            )
        }
        _ => ApiError::new("refused", format!("refused: {msg}")).with_hint(
            e.hint
                .clone()
                .unwrap_or_else(|| "retry: the pool changed meanwhile".into()),
        ),
    }
}

fn refused(r: Refusal) -> ApiError {
    ApiError::new("refused", r.message).with_hint(r.hint)
}

fn internal(what: &str, e: &dyn std::error::Error) -> ApiError {
    ApiError::new(api::codes::INTERNAL, format!("{what}: {}", eac_common::error_chain(e)))
}

impl Ctl {
    fn new(cfg: Config, now: Instant) -> Result<Arc<Self>, DaemonError> {
        // Validated when the configuration was parsed; Membership::new checks again.
        let timeouts = cfg.timeouts;
        let peers = cfg
            .peers
            .iter()
            .map(|p| PeerSpec::new(p.name.clone(), p.addresses.keys().cloned()));
        let membership = Membership::new(cfg.host.clone(), peers, timeouts, now).map_err(DaemonError::Membership)?;
        let hosts = pool_hosts(&cfg);
        let pool = match PoolConfig::load(&cfg.data_dir).map_err(DaemonError::Pool)? {
            Some(mut p) => {
                p.hosts = hosts;
                p
            }
            None => PoolConfig::initial(hosts, &cfg.host),
        };
        let incarnation = now_ms();
        let watchdog: Box<dyn Watchdog> = match &cfg.watchdog {
            Some(p) => Box::new(DevWatchdog::new(p.clone())),
            None => Box::new(fence::NoWatchdog),
        };
        let bus = EventBus::new(cfg.host.clone());
        Ok(Arc::new(Self {
            me: cfg.host.clone(),
            incarnation,
            bus,
            vmm: Arc::new(LibvirtVmm::new(&cfg.libvirt_uri)),
            st: Mutex::new(St {
                membership,
                fencer: Fencer::new(timeouts),
                pool,
                local: BTreeMap::new(),
                local_known: false,
                peers: cfg
                    .peers
                    .iter()
                    .map(|p| (p.name.clone(), PeerInfo::default()))
                    .collect(),
                crash: BTreeMap::new(),
                starting: BTreeSet::new(),
                pending: None,
                plan_ok: None,
                redundancy_ok: true,
                statefile_busy: false,
                sf_watch: Watcher::new(),
                sf_opened_once: false,
                sf_log_limit: eac_common::ratelimit::LogLimiter::default(),
                last_write_error: None,
                fenced_guests: BTreeSet::new(),
                tick: 0,
                syncing: BTreeSet::new(),
                reconciler: Reconciler::default(),
                reconciling: false,
                record_warned: BTreeSet::new(),
                after_stall_until: None,
            }),
            change_lock: tokio::sync::Mutex::new(()),
            statefile: Mutex::new(None),
            watchdog: Mutex::new(watchdog),
            cfg,
        }))
    }

    fn st(&self) -> MutexGuard<'_, St> {
        lock(&self.st)
    }

    fn emit(&self, kind: EventKind, guest: Option<&str>, peer: Option<&str>, detail: impl Into<String>) {
        self.bus.emit(kind, guest, peer, detail);
    }

    // -----------------------------------------------------------------------------------------
    // Plan inputs

    /// Hosts and guests as the plan sees them now.
    fn plan_inputs(&self, st: &St) -> (Vec<plan::Host>, Vec<plan::Guest>) {
        let hosts: Vec<plan::Host> = st
            .pool
            .hosts
            .iter()
            .map(|(name, h)| plan::Host {
                name: name.clone(),
                mem_mib: h.mem_mib,
                vcpus: h.vcpus,
                alive: name == &self.me || st.membership.state(name).is_some_and(|s| s != PeerState::Dead),
            })
            .collect();
        let mut guests = Vec::new();
        for g in st.pool.guests.values() {
            guests.push(plan::Guest {
                name: g.name.clone(),
                mem_mib: g.mem_mib,
                vcpus: g.vcpus,
                host: self.where_runs(st, g),
                protected: true,
                level: g.level.number(),
            });
        }
        // Unprotected guests running here use capacity too.
        for d in st.local.values() {
            if d.state.is_active() && !st.pool.guests.contains_key(&d.name) {
                let (mem, cpus) = st.local_resources(&d.name).unwrap_or((0, 0));
                guests.push(plan::Guest {
                    name: d.name.clone(),
                    mem_mib: mem,
                    vcpus: cpus,
                    host: Some(self.me.clone()),
                    protected: false,
                    level: 0,
                });
            }
        }
        (hosts, guests)
    }

    /// Where a protected guest runs, as far as this host knows: here if libvirt says so; on a
    /// peer whose state-file slot lists it; else its home. A protected guest is meant to run,
    /// so it counts against its home's capacity even while it is stopped (conservative for
    /// admission control), and is restarted elsewhere if its home dies.
    fn where_runs(&self, st: &St, g: &ProtectedGuest) -> Option<String> {
        if st.local.get(&g.name).is_some_and(|d| d.state.is_active()) || st.starting.contains(&g.name) {
            return Some(self.me.clone());
        }
        if let Some((peer, _)) = st.peers.iter().find(|(_, p)| p.running.contains(&g.name)) {
            return Some(peer.clone());
        }
        Some(g.home.clone())
    }

    fn plan_report(&self, st: &St) -> Result<plan::PlanReport, plan::PlanError> {
        let (hosts, guests) = self.plan_inputs(st);
        plan::check(
            &hosts,
            &guests,
            st.pool.policy.host_failures_to_tolerate as usize,
            plan::Reserve::default(),
        )
    }

    /// Re-checks the plan; reports a change of its status.
    fn recheck_plan(&self) {
        let (ok, summary) = {
            let st = self.st();
            match self.plan_report(&st) {
                Ok(r) => (r.ok, r.summary()),
                Err(e) => (false, e.to_string()),
            }
        };
        let changed = {
            let mut st = self.st();
            let changed = st.plan_ok != Some(ok);
            st.plan_ok = Some(ok);
            changed
        };
        if changed {
            self.emit(
                if ok { EventKind::PlanOk } else { EventKind::PlanBroken },
                None,
                None,
                summary,
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Heartbeats

    fn heartbeat(&self, now: Instant) -> Heartbeat {
        let st = self.st();
        let api_addr = self
            .cfg
            .api_listen
            .filter(|a| !a.ip().is_unspecified())
            .map(|a| a.to_string());
        Heartbeat {
            host: self.me.clone(),
            incarnation: self.incarnation,
            seq: 0,
            network: String::new(),
            sees: st.membership.sees(now),
            fencing: !matches!(st.fencer.state(), FenceState::Normal),
            config_epoch: st.pool.epoch,
            api_addr,
        }
    }

    async fn heartbeat_sender(self: Arc<Self>, sock: Arc<HeartbeatSocket>) {
        let mut iv = tokio::time::interval(self.cfg.timeouts.heartbeat_interval);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let hb = self.heartbeat(Instant::now());
            if let Err(e) = sock.send_to_peers(&hb).await {
                tracing::debug!(network = sock.network(), error = %eac_common::error_chain(&e), "heartbeat not sent");
            }
        }
    }

    async fn heartbeat_receiver(self: Arc<Self>, sock: Arc<HeartbeatSocket>) {
        loop {
            let hb = match sock.recv().await {
                Ok(hb) => hb,
                Err(_rejected) => continue, // logged (with its reason) by the socket
            };
            let now = Instant::now();
            let sync = {
                let mut st = self.st();
                if let Err(e) = st.membership.observe_heartbeat(&hb.host, sock.network(), now, &hb.sees) {
                    tracing::warn!(peer = %hb.host, network = sock.network(), error = %e, "heartbeat not usable");
                    continue;
                }
                let our_epoch = st.pool.epoch;
                let info = st.peers.entry(hb.host.clone()).or_default();
                info.config_epoch = hb.config_epoch;
                info.fencing = hb.fencing;
                info.api_addr = hb.api_addr.as_deref().and_then(|a| a.parse().ok());
                hb.config_epoch > our_epoch && st.syncing.insert(hb.host.clone())
            };
            if sync {
                let me = self.clone();
                tokio::spawn(async move { me.sync_from(&hb.host).await });
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // State-file

    /// Writes our slot every `statefile_interval` and reads every slot every
    /// `heartbeat_interval` (a peer's progress is then seen within `statefile_interval +
    /// heartbeat_interval` < `channel_timeout`, see docs/controller.md).
    async fn statefile_loop(self: Arc<Self>) {
        let t = self.cfg.timeouts;
        let mut iv = tokio::time::interval(t.heartbeat_interval);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick: u64 = 0;
        let mut last_write: Option<Instant> = None;
        loop {
            iv.tick().await;
            let now = Instant::now();
            {
                let mut st = self.st();
                if st.statefile_busy {
                    // The previous I/O has not returned: the storage hangs.
                    st.membership
                        .observe_statefile_result(Err("state-file I/O has not completed (storage hangs?)".into()), now);
                    continue;
                }
                st.statefile_busy = true;
            }
            let write_due = last_write.is_none_or(|w| now.saturating_duration_since(w) >= t.statefile_interval);
            let record = if write_due {
                last_write = Some(now);
                tick += 1;
                let st = self.st();
                let mut guests: Vec<String> = st
                    .local
                    .values()
                    .filter(|d| d.state.is_active())
                    .map(|d| d.name.clone())
                    .collect();
                guests.extend(st.starting.iter().cloned());
                guests.sort();
                guests.dedup();
                Some(SlotRecord {
                    host: self.me.clone(),
                    incarnation: self.incarnation,
                    tick,
                    wall_ms: now_ms(),
                    fencing: !matches!(st.fencer.state(), FenceState::Normal),
                    guests,
                    guests_truncated: false,
                    config_epoch: st.pool.epoch,
                    sees: st.membership.sees(now),
                })
            } else {
                None
            };
            let sf = lock(&self.statefile).clone();
            let path = self.cfg.state_file.clone();
            let hosts = self.cfg.all_hosts();
            let may_create = !self.st().sf_opened_once;
            let io = tokio::task::spawn_blocking(move || {
                // Is the open file still the path's? (Re)open a replaced or restored one.
                let (sf, check) = statefile_watch::check(sf, &path, &hosts, may_create);
                let io = match &sf {
                    None => Err(match check.problem() {
                        Some(p) => format!("no state-file open: {} {p}", path.display()),
                        None => format!("no state-file open: {}", path.display()),
                    }),
                    Some(sf) => (|| {
                        if let Some(record) = &record {
                            sf.write_slot(record).map_err(|e| eac_common::error_chain(&e))?;
                        }
                        sf.read_all().map_err(|e| eac_common::error_chain(&e))
                    })(),
                };
                (sf, check, io)
            });
            let me = self.clone();
            // The I/O may hang (dead NFS, failing disk): wait for it on its own task and count
            // a late answer as a failure; the next tick sees `statefile_busy` meanwhile.
            tokio::spawn(async move {
                let limit = me.cfg.timeouts.channel_timeout;
                let r = tokio::time::timeout(limit, io).await;
                let at = Instant::now();
                let mut check = None;
                let result = match r {
                    Ok(Ok((sf, c, io))) => {
                        check = Some(c);
                        // On an I/O error the handle is dropped: reopened next time.
                        *lock(&me.statefile) = if io.is_ok() { sf } else { None };
                        io
                    }
                    Ok(Err(e)) => Err(format!("state-file task failed: {e}")),
                    Err(_) => Err(format!("state-file I/O took longer than {limit:?}")),
                };
                let mut watch_events = Vec::new();
                let mut sync = Vec::new();
                {
                    let mut st = me.st();
                    st.statefile_busy = false;
                    if let Some(c) = &check {
                        if c.in_use().is_some() {
                            st.sf_opened_once = true;
                        }
                        watch_events.extend(st.sf_watch.observe_file(c, at));
                        if watch_events.is_empty()
                            && let Some(p) = st.sf_watch.file_problem().cloned()
                        {
                            me.still_broken(&mut st, "file".into(), &format!("{p}"), at); // host names have no spaces
                        }
                    }
                    if write_due {
                        st.last_write_error = result.as_ref().err().cloned();
                    }
                    match result {
                        Ok(all) => {
                            // Reads alone do not prove our slot is written: a failing write
                            // keeps the channel failing until a write succeeds.
                            let own = match &st.last_write_error {
                                Some(e) => Err(e.clone()),
                                None => Ok(()),
                            };
                            st.membership.observe_statefile_result(own, at);
                            let our_epoch = st.pool.epoch;
                            for read in all {
                                let host = read.host;
                                if host == me.me {
                                    continue;
                                }
                                let health = SlotHealth::of(&read.record);
                                if let Some(ev) = st.sf_watch.observe_slot(&host, health.clone(), at) {
                                    watch_events.push(ev);
                                } else if let SlotHealth::Corrupt(why) | SlotHealth::Unreadable(why) = &health {
                                    me.still_broken(
                                        &mut st,
                                        format!("slot {host}"),
                                        &format!("slot of peer {host}: {why}"),
                                        at,
                                    );
                                }
                                let Ok(rec) = read.record else { continue };
                                if rec.host != host {
                                    continue;
                                }
                                let _ = st.membership.observe_slot_with_sees(
                                    &host,
                                    rec.incarnation,
                                    rec.tick,
                                    &rec.sees,
                                    at,
                                );
                                let info = st.peers.entry(host.clone()).or_default();
                                info.running = rec.guests.clone();
                                if rec.config_epoch > our_epoch && st.syncing.insert(host.clone()) {
                                    sync.push(host);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "state-file I/O failed");
                            st.membership.observe_statefile_result(Err(e), at);
                        }
                    }
                }
                for ev in &watch_events {
                    me.report_watch(ev);
                }
                for peer in sync {
                    let me2 = me.clone();
                    tokio::spawn(async move { me2.sync_from(&peer).await });
                }
            });
        }
    }

    /// Reports a state-file watch event (see `statefile_watch`): the file's problems and
    /// reopen, a peer's corrupt slot, and their ends.
    fn report_watch(&self, ev: &SfEvent) {
        let path = self.cfg.state_file.display();
        let (kind, peer) = match ev {
            SfEvent::File { problem, .. } => (
                match problem {
                    statefile_watch::FileProblem::Missing => EventKind::StateFileMissing,
                    statefile_watch::FileProblem::NotRegular(_) => EventKind::StateFileNotRegular,
                    _ => EventKind::StateFileUnusable,
                },
                None,
            ),
            SfEvent::Replaced { .. } => (EventKind::StateFileReplaced, None),
            SfEvent::FileHealed { .. } => (EventKind::StateFileHealed, None),
            SfEvent::SlotCorrupt { peer, .. } => (EventKind::StateFileSlotCorrupt, Some(peer.as_str())),
            SfEvent::SlotHealed { peer, .. } => (EventKind::StateFileHealed, Some(peer.as_str())),
        };
        let detail = match ev {
            SfEvent::SlotCorrupt { .. } | SfEvent::SlotHealed { .. } => format!("state-file {path}: {ev}"),
            _ => format!("state-file {path} {ev}"),
        };
        self.emit(kind, None, peer, detail.clone());
        if let SfEvent::File {
            episode_start: true, ..
        } = ev
        {
            // Every loss of redundancy is visible: the path no longer names the file in use.
            self.emit(EventKind::RedundancyLost, None, None, detail);
        }
    }

    /// A state-file problem that continues (no new event): a log line now and then, with the
    /// count of the suppressed ones.
    fn still_broken(&self, st: &mut St, key: String, what: &str, at: Instant) {
        if let Some(r) = st.sf_log_limit.check(key, at.into_std())
            && !r.since.is_zero()
        {
            tracing::warn!(
                path = %self.cfg.state_file.display(),
                "state-file: still {what}{}",
                r.note("the state-file")
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Membership tick → events → fencing decisions

    async fn tick_loop(self: Arc<Self>) {
        let mut iv = tokio::time::interval(TICK);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick: Option<Instant> = None;
        let mut deferred = false;
        loop {
            iv.tick().await;
            let now = Instant::now();
            // After this process was not scheduled for a while (CPU starvation, a stopped
            // process, a slow VM host), every channel looks silent only because the
            // receivers have not run yet: judge once they caught up (one tick later), so a
            // pause of our own is never taken for isolation or a peer's death. At most one
            // tick in a row is deferred, so a host that is really cut off still fences.
            let gap = last_tick.map(|t| now.saturating_duration_since(t));
            last_tick = Some(now);
            if let Some(gap) = gap
                && gap >= STALL
                && !deferred
            {
                deferred = true;
                tracing::warn!(
                    gap_ms = gap.as_millis() as u64,
                    "the controller was not scheduled for {gap:?}; judging membership after the receivers caught up"
                );
                let dead_after = self.cfg.timeouts.dead_after;
                if gap >= dead_after {
                    // Peers may have declared this host dead meanwhile and restarted (or tried
                    // to restart) its guests: re-check ownership at once.
                    self.st().after_stall_until = Some(now + AFTER_STALL);
                    self.emit(
                        EventKind::Stalled,
                        None,
                        None,
                        format!(
                            "this host's controller was not scheduled for {} ms, longer than dead_after ({} ms): its peers may have declared it dead; re-checking where its guests run",
                            gap.as_millis(),
                            dead_after.as_millis()
                        ),
                    );
                    let me = self.clone();
                    tokio::spawn(async move { me.recheck_after_stall().await });
                }
                continue;
            }
            deferred = false;
            let (events, decisions, redundancy_change) = {
                let mut st = self.st();
                st.tick += 1;
                let events = st.membership.tick(now);
                let decisions = st.fencer.update(now, &events);
                let ok = redundancy_ok(&st);
                let change = (ok != st.redundancy_ok).then_some(ok);
                st.redundancy_ok = ok;
                (events, decisions, change)
            };
            for ev in &events {
                self.report_membership(ev);
            }
            if redundancy_change == Some(true) {
                self.emit(
                    EventKind::RedundancyRestored,
                    None,
                    None,
                    "every channel to every peer works",
                );
            }
            let mut rejoined = Vec::new();
            for ev in &events {
                if let MembershipEvent::PeerRejoined { peer, .. } = ev {
                    rejoined.push(peer.clone());
                }
            }
            for peer in rejoined {
                let me = self.clone();
                tokio::spawn(async move { me.sync_from(&peer).await });
            }
            for d in decisions {
                self.clone().decide(d);
            }
            if !events.is_empty() || self.st().tick.is_multiple_of(10) {
                self.recheck_plan();
                let me = self.clone();
                tokio::spawn(async move { me.reconcile().await });
            }
        }
    }

    fn report_membership(&self, ev: &MembershipEvent) {
        let peer = ev.peer();
        let mut detail = ev.to_string();
        if let MembershipEvent::ChannelDown {
            peer,
            channel: Channel::StateFile,
            ..
        } = ev
            && self.st().sf_watch.slot_bad(peer)
        {
            detail.push_str(" (its slot does not decode: corrupt, not silent)");
        }
        let kind = match ev {
            MembershipEvent::ChannelUp { .. } => EventKind::ChannelUp,
            MembershipEvent::ChannelDown { .. } => EventKind::ChannelDown,
            MembershipEvent::PeerAlive { .. } => EventKind::PeerAlive,
            MembershipEvent::PeerSuspect { .. } => EventKind::PeerSuspect,
            MembershipEvent::PeerDead { .. } => EventKind::PeerDead,
            MembershipEvent::PeerRejoined { .. } => EventKind::PeerAlive,
            MembershipEvent::StateFileLost { .. } => EventKind::StateFileError,
            MembershipEvent::StateFileRestored => EventKind::StateFileOk,
            MembershipEvent::Isolated { .. } => EventKind::Isolated,
            MembershipEvent::NotIsolated { .. } => EventKind::NotIsolated,
        };
        self.emit(kind, None, peer, detail.clone());
        if ev.is_redundancy_loss() {
            self.emit(EventKind::RedundancyLost, None, peer, detail);
        }
    }

    fn decide(self: Arc<Self>, d: FenceDecision) {
        match d {
            FenceDecision::FenceSelf {
                last_contact,
                deadline,
                late,
            } => {
                tokio::spawn(async move { self.fence(last_contact, deadline, late).await });
            }
            FenceDecision::FenceIncomplete { still_running } => {
                self.emit(
                    EventKind::Fencing,
                    None,
                    None,
                    format!(
                        "fence incomplete, retrying: still running: {}",
                        still_running.join(", ")
                    ),
                );
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    self.fence_now(still_running, deadline).await;
                });
            }
            FenceDecision::Rejoin { fenced } => {
                let mut all: BTreeSet<String> = std::mem::take(&mut self.st().fenced_guests);
                all.extend(fenced);
                let all: Vec<String> = all.into_iter().collect();
                self.emit(
                    EventKind::NotIsolated,
                    None,
                    None,
                    format!(
                        "contact is back after fencing; fenced guests ({}) restart here only if the pool still places them here and no peer runs them",
                        if all.is_empty() { "none".into() } else { all.join(", ") }
                    ),
                );
                tokio::spawn(async move {
                    self.clone().sync_all().await;
                    self.restart_after_rejoin(all).await;
                });
            }
            FenceDecision::RestartGuestsOf { peer, last_seen } => {
                tokio::spawn(async move { self.failover(peer, last_seen).await });
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fencing

    async fn fence(self: Arc<Self>, last_contact: Instant, deadline: Instant, late: bool) {
        let guests: Vec<String> = {
            let st = self.st();
            st.pool
                .guests
                .keys()
                .filter(|g| st.local.get(*g).is_none_or(|d| d.state.is_active()) || st.starting.contains(*g))
                .cloned()
                .collect()
        };
        self.emit(
            EventKind::Fencing,
            None,
            None,
            format!(
                "isolated since {} ms ago: destroying protected guests [{}] before the deadline in {} ms{}",
                last_contact.elapsed().as_millis(),
                guests.join(", "),
                deadline.saturating_duration_since(Instant::now()).as_millis(),
                if late { " (noticed late)" } else { "" }
            ),
        );
        self.fence_now(guests, deadline).await;
    }

    async fn fence_now(self: Arc<Self>, guests: Vec<String>, deadline: Instant) {
        self.st().fenced_guests.extend(guests.iter().cloned());
        let outcome: FenceOutcome = {
            // The watchdog is a blocking device but arm/disarm are single small writes.
            let mut wd = std::mem::replace(&mut *lock(&self.watchdog), Box::new(fence::NoWatchdog));
            let out = fence::fence_guests(self.vmm.as_ref(), wd.as_mut(), &guests, deadline).await;
            *lock(&self.watchdog) = wd;
            out
        };
        if let Some(t) = outcome.watchdog_armed
            && self.cfg.watchdog.is_some()
        {
            self.emit(
                EventKind::WatchdogArmed,
                None,
                None,
                format!("watchdog armed ({t:?}) during the fence"),
            );
        }
        if let Some(e) = &outcome.watchdog_error {
            tracing::warn!(error = %e, "watchdog");
        }
        let took = outcome.finished_at.saturating_duration_since(outcome.started_at);
        self.emit(
            EventKind::Fenced,
            None,
            None,
            format!(
                "destroyed [{}], already off [{}], failed [{}] in {} ms ({} the deadline)",
                outcome.destroyed.join(", "),
                outcome.already_off.join(", "),
                outcome
                    .failed
                    .iter()
                    .map(|f| format!("{}: {}", f.guest, f.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
                took.as_millis(),
                if outcome.in_time() { "within" } else { "NOT within" }
            ),
        );
        let decisions = self.st().fencer.fence_finished(Instant::now(), &outcome);
        for d in decisions {
            self.clone().decide(d);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Failover

    async fn failover(self: Arc<Self>, peer: String, last_seen: Instant) {
        let (mine, unplaced, may_start) = {
            let st = self.st();
            let (hosts, guests) = self.plan_inputs(&st);
            let dead: Vec<String> = st.membership.dead_peers().into_iter().collect();
            match plan::place_failed(&hosts, &guests, &dead, plan::Reserve::default()) {
                Ok(p) => {
                    // The guests that ran on a dead host (by what the hosts last reported, else
                    // the pool's record), not only those the record places there: a record that
                    // lags reality must not cost a guest its restart.
                    let dead_set: BTreeSet<&str> = dead.iter().map(String::as_str).collect();
                    let mine: Vec<String> = p
                        .for_host(&self.me)
                        .filter(|g| {
                            st.pool
                                .guests
                                .get(*g)
                                .and_then(|pg| self.where_runs(&st, pg))
                                .is_some_and(|h| dead_set.contains(h.as_str()))
                        })
                        .map(str::to_owned)
                        .collect();
                    (mine, p.unplaced, st.fencer.may_start_guests())
                }
                Err(e) => {
                    drop(st);
                    self.emit(
                        EventKind::GuestRestartFailed,
                        None,
                        Some(&peer),
                        format!("cannot place the guests of dead host {peer}: {e}"),
                    );
                    return;
                }
            }
        };
        let since = last_seen.elapsed();
        if !may_start {
            self.emit(
                EventKind::GuestRestartFailed,
                None,
                Some(&peer),
                "not restarting: this host is fencing or fenced itself",
            );
            return;
        }
        for s in &unplaced {
            self.emit(
                EventKind::GuestRestartFailed,
                Some(&s.guest),
                Some(&peer),
                s.explanation.clone(),
            );
        }
        if mine.is_empty() {
            tracing::info!(%peer, "failover: no guest of the dead host is placed here");
            return;
        }
        tracing::info!(%peer, guests = ?mine, since_last_seen_ms = since.as_millis() as u64, "failover");
        let mut set = JoinSet::new();
        for g in mine {
            let me = self.clone();
            let peer = peer.clone();
            set.spawn(async move { me.restart_here(&g, &peer, last_seen).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Starts protected guest `name` here after host `from` died (retrying while e.g. a lock
    /// lease is still held), then records that it now runs here.
    async fn restart_here(self: Arc<Self>, name: &str, from: &str, last_seen: Instant) {
        let Some(xml) = self.st().pool.guests.get(name).map(|g| g.xml.clone()) else {
            return;
        };
        {
            let mut st = self.st();
            if let Some((peer, _)) = st
                .peers
                .iter()
                .find(|(p, i)| p.as_str() != from && i.running.iter().any(|g| g == name))
            {
                let peer = peer.clone();
                drop(st);
                self.emit(
                    EventKind::GuestRestartFailed,
                    Some(name),
                    Some(from),
                    format!("not restarting: host {peer} reports it running"),
                );
                return;
            }
            if !st.starting.insert(name.to_owned()) {
                return;
            }
        }
        // The new home is recorded only once the guest runs here (below): a start that is
        // refused (the dead host was only frozen and still holds the disk) must not move the
        // record away from where the guest really runs. Until the record follows, this host's
        // state-file slot lists the guest (it is `starting`, then active), so the pool knows.
        let t0 = Instant::now();
        let mut last_err = String::new();
        let mut ok = false;
        for attempt in 1..=FAILOVER_ATTEMPTS {
            let still_dead = {
                let st = self.st();
                st.membership.state(from) == Some(PeerState::Dead) && st.fencer.may_start_guests()
            };
            if !still_dead {
                last_err = format!("{from} is no longer dead (or this host is fencing): not starting");
                break;
            }
            match self.vmm.state(name).await {
                Ok(s) if s.is_active() => {
                    ok = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {
                    if let Err(e) = self.vmm.define(&xml).await {
                        last_err = eac_common::error_chain(&e);
                        continue;
                    }
                }
                Err(e) => {
                    last_err = eac_common::error_chain(&e);
                }
            }
            match self.vmm.start(name).await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    last_err = eac_common::error_chain(&e);
                    tracing::warn!(guest = name, attempt, error = %last_err, "failover start failed");
                    if e.kind.is_busy() && attempt == 1 {
                        // last_err names what refused: the lock manager's lease or QEMU's image lock
                        self.emit(
                            EventKind::GuestRestartFailed,
                            Some(name),
                            Some(from),
                            format!("start refused, retrying every {FAILOVER_RETRY:?}: {last_err}"),
                        );
                    }
                    // Wait for the next attempt, but stop at once when `from` is heard again.
                    let until = Instant::now() + FAILOVER_RETRY;
                    while Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if self.st().membership.state(from) != Some(PeerState::Dead) {
                            break;
                        }
                    }
                }
            }
        }
        if !ok {
            self.st().starting.remove(name);
            self.emit(
                EventKind::GuestRestartFailed,
                Some(name),
                Some(from),
                format!("could not start it here: {last_err}"),
            );
            return;
        }
        // Record the new home (on every live host; dead ones catch up). If that fails, the
        // reconciliation records it later (the guest runs here, the record says elsewhere).
        let change = pool::Change::Moved {
            name: name.to_owned(),
            host: self.me.clone(),
        };
        if let Err(e) = self.change_pool(change, None).await {
            tracing::warn!(guest = name, error = %e, "could not record the guest's new home yet; reconciliation retries");
        }
        self.st().starting.remove(name);
        self.emit(
            EventKind::GuestRestarted,
            Some(name),
            Some(from),
            format!(
                "restarted here after host {from} died: start took {} ms, {} ms after {from} was last heard",
                t0.elapsed().as_millis(),
                last_seen.elapsed().as_millis()
            ),
        );
    }

    /// After a fence and regained contact (configuration re-synchronised first): starts the
    /// fenced guests the pool still places here and that no peer reports running (its
    /// state-file slot or its `vm.local`). A guest a survivor restarted meanwhile has its home
    /// there, so it stays off here.
    async fn restart_after_rejoin(self: Arc<Self>, fenced: Vec<String>) {
        // Let slots and heartbeats from the peers arrive before deciding.
        tokio::time::sleep(self.cfg.timeouts.statefile_interval + self.cfg.timeouts.heartbeat_interval).await;
        let (live, _) = self.live_peers();
        let mut elsewhere: BTreeSet<String> = BTreeSet::new();
        for p in &live {
            match self
                .peer_call(
                    p,
                    Op::Ext {
                        name: "vm.local".into(),
                        args: Value::Null,
                    },
                )
                .await
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<view::LocalGuest>>(v).ok())
            {
                Some(list) => elsewhere.extend(list.into_iter().filter(|g| g.active).map(|g| g.name)),
                None => {
                    // Cannot ask it: trust only a definite answer; keep everything off.
                    self.emit(
                        EventKind::GuestRestartFailed,
                        None,
                        Some(p),
                        format!("not restarting fenced guests: cannot ask host {p} what it runs"),
                    );
                    return;
                }
            }
        }
        for g in fenced {
            let go = {
                let st = self.st();
                let here = st.pool.guests.get(&g).is_some_and(|pg| pg.home == self.me);
                let reported = st.peers.values().any(|i| i.running.contains(&g));
                here && !reported && !elsewhere.contains(&g) && st.fencer.may_start_guests()
            };
            if !go {
                tracing::info!(guest = %g, "fenced guest stays off (runs elsewhere or is placed elsewhere)");
                continue;
            }
            let t0 = Instant::now();
            match self.vmm.start(&g).await {
                Ok(()) => self.emit(
                    EventKind::GuestRestarted,
                    Some(&g),
                    None,
                    format!(
                        "restarted here after this host's fence: contact is back and no peer runs it (start {} ms)",
                        t0.elapsed().as_millis()
                    ),
                ),
                Err(e) => self.emit(
                    EventKind::GuestRestartFailed,
                    Some(&g),
                    None,
                    format!("restart after the fence failed: {}", eac_common::error_chain(&e)),
                ),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Where guests run: the pool's record follows libvirt (see `reconcile`)

    fn reconcile_snapshot(&self, st: &St, now: Instant) -> reconcile::Snapshot {
        let mut live_peers_running = BTreeMap::new();
        let mut config_current = true;
        for (p, info) in &st.peers {
            if st.membership.state(p) == Some(PeerState::Dead) {
                continue;
            }
            if info.config_epoch > st.pool.epoch {
                config_current = false;
            }
            live_peers_running.insert(p.clone(), info.running.iter().cloned().collect());
        }
        reconcile::Snapshot {
            me: self.me.clone(),
            homes: st
                .pool
                .guests
                .values()
                .map(|g| (g.name.clone(), g.home.clone()))
                .collect(),
            active_here: st
                .local
                .values()
                .filter(|d| d.state.is_active())
                .map(|d| d.name.clone())
                .collect(),
            starting: st.starting.clone(),
            live_peers_running,
            config_current: config_current && st.pending.is_none() && st.syncing.is_empty(),
            normal: matches!(st.fencer.state(), FenceState::Normal) && st.local_known,
            after_stall: st.after_stall_until.is_some_and(|t| now < t),
        }
    }

    /// One reconciliation pass (at most one at a time): corrects the record of guests that
    /// run here, reports duplicates, and right after a stall yields a duplicate copy.
    async fn reconcile(self: Arc<Self>) -> Vec<reconcile::Action> {
        let actions = {
            let mut st = self.st();
            if st.reconciling {
                return Vec::new();
            }
            let now = Instant::now();
            let snap = self.reconcile_snapshot(&st, now);
            let actions = st.reconciler.decide(now.into_std(), &snap);
            if !actions.is_empty() {
                st.reconciling = true;
            }
            actions
        };
        if actions.is_empty() {
            return actions;
        }
        let mut done = Vec::new();
        for a in actions {
            // A duplicate is confirmed by the peer's own libvirt (its slot lists the guests it
            // is starting too): no answer or "not active there" → not acted on.
            if let reconcile::Action::Duplicate { guest, .. } | reconcile::Action::Yield { guest, .. } = &a {
                let peers: Vec<String> = match &a {
                    reconcile::Action::Duplicate { peers, .. } => peers.clone(),
                    reconcile::Action::Yield { peer, .. } => vec![peer.clone()],
                    _ => Vec::new(),
                };
                let mut confirmed = false;
                for p in &peers {
                    confirmed |= self.peer_runs(p, guest).await == Some(true);
                }
                if !confirmed {
                    self.st().reconciler.not_duplicate(guest);
                    continue;
                }
            }
            match &a {
                reconcile::Action::Record { guest, was } => {
                    let change = pool::Change::Moved {
                        name: guest.clone(),
                        host: self.me.clone(),
                    };
                    match self.change_pool(change, None).await {
                        Ok(_) => {
                            self.st().record_warned.remove(guest);
                            self.emit(
                                EventKind::GuestLocation,
                                Some(guest),
                                None,
                                format!("{guest} runs here but the pool placed it on {was}: recorded that it runs here"),
                            )
                        }
                        Err(e) if self.st().record_warned.insert(guest.clone()) => tracing::warn!(
                            guest = %guest, error = %e,
                            "{guest} runs here but the pool places it on {was}; cannot record it yet (retrying every second)"
                        ),
                        Err(e) => tracing::debug!(guest = %guest, error = %e, "record still not corrected"),
                    }
                }
                reconcile::Action::Duplicate { guest, peers } => self.emit(
                    EventKind::GuestDuplicate,
                    Some(guest),
                    peers.first().map(String::as_str),
                    format!(
                        "{guest} is active here and on {} at once (a migration in progress, or two copies: check its disk)",
                        peers.join(", ")
                    ),
                ),
                reconcile::Action::DuplicateOver { guest } => self.emit(
                    EventKind::GuestLocation,
                    Some(guest),
                    None,
                    format!("{guest} is no longer active on two hosts"),
                ),
                reconcile::Action::Yield { guest, peer } => {
                    let r = self.vmm.destroy(guest).await;
                    self.emit(
                        EventKind::GuestYielded,
                        Some(guest),
                        Some(peer),
                        match &r {
                            Ok(()) => format!(
                                "this host was declared dead while it was not scheduled and {peer} restarted {guest}, which the pool now places there: destroyed this host's copy"
                            ),
                            Err(e) => format!(
                                "{peer} runs {guest} and the pool places it there, but destroying this host's copy failed: {}",
                                eac_common::error_chain(e)
                            ),
                        },
                    );
                }
            }
            done.push(a);
        }
        self.st().reconciling = false;
        done
    }

    /// Does `peer`'s libvirt report `guest` active (its `vm.local`)? None: no answer.
    async fn peer_runs(&self, peer: &str, guest: &str) -> Option<bool> {
        let v = self
            .peer_call(
                peer,
                Op::Ext {
                    name: "vm.local".into(),
                    args: Value::Null,
                },
            )
            .await
            .ok()?;
        let list: Vec<view::LocalGuest> = serde_json::from_value(v).ok()?;
        Some(list.iter().any(|g| g.name == guest && g.active))
    }

    /// After a stall longer than the dead timeout: take the newest configuration, let the
    /// peers' slots arrive, re-check where this host's guests run, and say what was found.
    async fn recheck_after_stall(self: Arc<Self>) {
        self.clone().sync_all().await;
        let t = self.cfg.timeouts;
        let until = Instant::now() + reconcile::YIELD_CONFIRM + t.statefile_interval * 2 + t.heartbeat_interval;
        let mut done = Vec::new();
        tokio::time::sleep(t.statefile_interval + t.heartbeat_interval).await;
        // Passes until a duplicate is confirmed (or none is seen).
        while Instant::now() < until {
            done.extend(self.clone().reconcile().await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (kept, elsewhere): (Vec<String>, Vec<String>) = {
            let st = self.st();
            let active: Vec<String> = st
                .pool
                .guests
                .keys()
                .filter(|g| st.local.get(*g).is_some_and(|d| d.state.is_active()))
                .cloned()
                .collect();
            let elsewhere = st
                .pool
                .guests
                .values()
                .filter(|g| g.home != self.me && !active.contains(&g.name))
                .filter(|g| st.peers.get(&g.home).is_some_and(|i| i.running.contains(&g.name)))
                .map(|g| format!("{} on {}", g.name, g.home))
                .collect();
            (active, elsewhere)
        };
        let acted: Vec<String> = done
            .iter()
            .filter_map(|a| match a {
                reconcile::Action::Record { guest, was } => Some(format!("recorded {guest} here (was {was})")),
                reconcile::Action::Yield { guest, peer } => Some(format!("yielded {guest} to {peer}")),
                _ => None,
            })
            .collect();
        self.emit(
            EventKind::Stalled,
            None,
            None,
            format!(
                "ownership re-checked after the stall (peers may have declared this host dead): runs here [{}]; runs elsewhere [{}]; {}",
                kept.join(", "),
                elsewhere.join(", "),
                if acted.is_empty() { "nothing to correct".to_owned() } else { acted.join("; ") }
            ),
        );
    }

    // -----------------------------------------------------------------------------------------
    // libvirt events and crash restarts

    async fn libvirt_loop(self: Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let _watch = libvirt::watch(&self.cfg.libvirt_uri, libvirt::WATCH_INTERVAL, tx);
        let mut lost = false;
        while let Some(ev) = rx.recv().await {
            match ev {
                WatchEvent::Snapshot(doms) => {
                    if lost {
                        self.emit(EventKind::RedundancyRestored, None, None, "libvirtd reachable again");
                        lost = false;
                    }
                    let define = {
                        let mut st = self.st();
                        st.local = doms.into_iter().map(|d| (d.name.clone(), d)).collect();
                        let first = !st.local_known;
                        st.local_known = true;
                        first
                    };
                    if define {
                        self.clone().ensure_definitions().await;
                    }
                }
                WatchEvent::Lifecycle { event, .. } => {
                    {
                        let mut st = self.st();
                        if event.kind == LifecycleKind::Undefined {
                            st.local.remove(&event.domain);
                        } else {
                            let uuid = st.local.get(&event.domain).map(|d| d.uuid.clone()).unwrap_or_default();
                            st.local.insert(
                                event.domain.clone(),
                                DomainSummary {
                                    name: event.domain.clone(),
                                    uuid,
                                    state: event.state,
                                },
                            );
                        }
                    }
                    self.on_lifecycle(&event);
                }
                WatchEvent::ConnectionLost { error } => {
                    lost = true;
                    self.emit(
                        EventKind::RedundancyLost,
                        None,
                        None,
                        format!("libvirtd unreachable (guests keep running; nothing can be started here): {error}"),
                    );
                }
            }
        }
    }

    fn on_lifecycle(self: &Arc<Self>, ev: &libvirt::LifecycleEvent) {
        let name = ev.domain.as_str();
        let detail = format!("{} ({})", ev.kind, if ev.detail.is_empty() { "-" } else { &ev.detail });
        match ev.kind {
            LifecycleKind::Started => self.emit(EventKind::GuestStarted, Some(name), None, detail),
            LifecycleKind::Stopped => self.emit(EventKind::GuestStopped, Some(name), None, detail),
            LifecycleKind::StartFailed => self.emit(EventKind::GuestStartFailed, Some(name), None, ev.detail.clone()),
            LifecycleKind::Crashed => {
                self.emit(EventKind::GuestCrashed, Some(name), None, detail);
                self.clone().schedule_crash_restart(name.to_owned());
            }
            _ => tracing::debug!(guest = name, %detail, "guest lifecycle"),
        }
        if matches!(
            ev.kind,
            LifecycleKind::Started | LifecycleKind::Stopped | LifecycleKind::Crashed | LifecycleKind::StartFailed
        ) {
            self.recheck_plan();
        }
    }

    /// A Level 1 guest that crashed here, while this host is healthy, is restarted here after a
    /// backoff (1 s, doubling to 30 s; reset once it ran for 60 s).
    fn schedule_crash_restart(self: Arc<Self>, name: String) {
        let delay = {
            let mut st = self.st();
            let protected_here = st
                .pool
                .guests
                .get(&name)
                .is_some_and(|g| g.level == Level::L1 && g.home == self.me);
            if !protected_here || !st.fencer.may_start_guests() {
                return;
            }
            let now = Instant::now();
            let c = st.crash.entry(name.clone()).or_insert(CrashState {
                attempts: 0,
                last_start: now,
                pending: false,
            });
            if c.pending {
                return;
            }
            if c.attempts > 0 && now.saturating_duration_since(c.last_start) >= CRASH_BACKOFF_RESET {
                c.attempts = 0;
            }
            let delay = CRASH_BACKOFF_FIRST
                .saturating_mul(1 << c.attempts.min(5))
                .min(CRASH_BACKOFF_MAX);
            c.attempts += 1;
            c.pending = true;
            delay
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let ok_to_start = {
                let mut st = self.st();
                if let Some(c) = st.crash.get_mut(&name) {
                    c.pending = false;
                    c.last_start = Instant::now();
                }
                st.fencer.may_start_guests()
                    && st.pool.guests.get(&name).is_some_and(|g| g.home == self.me)
                    && !st.local.get(&name).is_some_and(|d| d.state.is_active())
            };
            if !ok_to_start {
                return;
            }
            let t0 = Instant::now();
            match self.vmm.start(&name).await {
                Ok(()) => self.emit(
                    EventKind::GuestRestarted,
                    Some(&name),
                    None,
                    format!(
                        "restarted here after it crashed (backoff {} ms, start {} ms)",
                        delay.as_millis(),
                        t0.elapsed().as_millis()
                    ),
                ),
                Err(e) => self.emit(
                    EventKind::GuestRestartFailed,
                    Some(&name),
                    None,
                    format!("restart after crash failed: {}", eac_common::error_chain(&e)),
                ),
            }
        });
    }

    /// Defines every protected guest that libvirt here does not know yet (so any survivor can
    /// start it), and refreshes the definition of those not running here.
    async fn ensure_definitions(self: Arc<Self>) {
        let todo: Vec<(String, String)> = {
            let st = self.st();
            if !st.local_known {
                return;
            }
            st.pool
                .guests
                .values()
                .filter(|g| !st.local.get(&g.name).is_some_and(|d| d.state.is_active()))
                .map(|g| (g.name.clone(), g.xml.clone()))
                .collect()
        };
        for (name, xml) in todo {
            if let Err(e) = self.vmm.define(&xml).await {
                tracing::warn!(guest = %name, error = %eac_common::error_chain(&e), "cannot define the protected guest here");
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Pool configuration: changes, proposals, synchronisation

    fn live_peers(&self) -> (Vec<String>, Vec<String>) {
        let st = self.st();
        let mut live = Vec::new();
        let mut dead = Vec::new();
        for p in &self.cfg.peers {
            if st.membership.state(&p.name) == Some(PeerState::Dead) {
                dead.push(p.name.clone());
            } else {
                live.push(p.name.clone());
            }
        }
        (live, dead)
    }

    /// The TCP API addresses to try for `peer`: what it advertises in its heartbeats, then its
    /// heartbeat addresses on our API port.
    fn peer_api_addrs(&self, peer: &str) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if let Some(a) = self.st().peers.get(peer).and_then(|p| p.api_addr) {
            out.push(a);
        }
        let port = self.cfg.api_listen.map_or(7411, |a| a.port());
        if let Some(p) = self.cfg.peer(peer) {
            for a in p.addresses.values() {
                let a = SocketAddr::new(a.ip(), port);
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out
    }

    /// Calls `op` on `peer`'s API, trying each of its addresses.
    async fn peer_call(&self, peer: &str, op: Op) -> Result<Value, ApiError> {
        let mut last = ApiError::new(api::codes::UNREACHABLE, format!("host {peer} has no API address"));
        for addr in self.peer_api_addrs(peer) {
            let r = tokio::time::timeout(PEER_CALL_TIMEOUT, async {
                let mut c = api::Client::connect_tcp(addr, self.cfg.pool_secret.as_bytes()).await?;
                c.call(op.clone()).await
            })
            .await;
            match r {
                Ok(Ok(v)) => return Ok(v),
                // An answer (even a refusal) ends the search; only transport failures move on.
                Ok(Err(e)) if e.code != api::codes::UNREACHABLE && e.code != api::codes::PROTOCOL => return Err(e),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = ApiError::new(
                        api::codes::UNREACHABLE,
                        format!("host {peer} did not answer at {addr} within {PEER_CALL_TIMEOUT:?}"),
                    )
                }
            }
        }
        Err(last)
    }

    /// Applies `change` on every live host or on none (see the `pool` module). `admit` is the
    /// admission check to run against the plan first.
    async fn change_pool(
        &self,
        change: pool::Change,
        admit: Option<plan::Change>,
    ) -> Result<view::ChangeResult, ApiError> {
        let _serial = self.change_lock.lock().await;
        let (next, live, dead) = {
            let st = self.st();
            if !st.fencer.may_start_guests() {
                return Err(ApiError::new(
                    "isolated",
                    format!(
                        "host {} is isolated or fenced: it cannot change the pool configuration",
                        self.me
                    ),
                )
                .with_hint("make the change through a host that is in contact with the pool"));
            }
            let next = st.pool.apply(&change, &self.me, now_ms()).map_err(refused)?;
            if let Some(c) = &admit {
                let (hosts, guests) = self.plan_inputs(&st);
                if let Err(r) = plan::admit(
                    &hosts,
                    &guests,
                    st.pool.policy.host_failures_to_tolerate as usize,
                    plan::Reserve::default(),
                    c,
                ) {
                    drop(st);
                    self.emit(EventKind::AdmissionRefused, None, None, r.explanation.clone());
                    return Err(ApiError::new("plan_broken", r.explanation)
                        .with_hint("`eac plan` shows where every protected guest would restart"));
                }
            }
            drop(st);
            let (live, dead) = self.live_peers();
            (next, live, dead)
        };
        // Phase 1: every live peer must accept.
        let cfg_value = serde_json::to_value(&next).map_err(|e| internal("cannot encode the configuration", &e))?;
        let propose = futures::future::join_all(live.iter().map(|p| {
            let op = Op::PoolPropose {
                epoch: next.epoch,
                config: cfg_value.clone(),
            };
            async move { (p.clone(), self.peer_call(p, op).await) }
        }))
        .await;
        let mut accepted = Vec::new();
        let mut failed = Vec::new();
        for (p, r) in propose {
            match r {
                Ok(_) => accepted.push(p),
                Err(e) => failed.push((p, e)),
            }
        }
        if !failed.is_empty() {
            for p in &accepted {
                let _ = self.peer_call(p, Op::PoolAbort { epoch: next.epoch }).await;
            }
            let (p, e) = &failed[0];
            return Err(peer_did_not_accept(p, &change.to_string(), e));
        }
        // Phase 2.
        for p in &accepted {
            if let Err(e) = self.peer_call(p, Op::PoolCommit { epoch: next.epoch }).await {
                tracing::warn!(peer = %p, error = %e, "commit not confirmed; the peer catches up by epoch");
            }
        }
        self.adopt(next.clone(), &format!("{change} (through {})", self.me))
            .await;
        let mut applied_on = vec![self.me.clone()];
        applied_on.extend(accepted);
        Ok(view::ChangeResult {
            change: change.to_string(),
            epoch: next.epoch,
            applied_on,
            pending_on: dead,
        })
    }

    /// Makes `cfg` this host's configuration (saved first), reports it, defines its guests.
    async fn adopt(&self, cfg: PoolConfig, why: &str) {
        let dir = self.cfg.data_dir.clone();
        let c2 = cfg.clone();
        match tokio::task::spawn_blocking(move || c2.save(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %eac_common::error_chain(&e), "cannot save the pool configuration"),
            Err(e) => tracing::error!(error = %e, "pool save task failed"),
        }
        let epoch = cfg.epoch;
        {
            let mut st = self.st();
            let hosts = std::mem::take(&mut st.pool.hosts);
            st.pool = cfg;
            if st.pool.hosts.is_empty() {
                st.pool.hosts = hosts;
            }
        }
        self.emit(
            EventKind::ConfigChanged,
            None,
            None,
            format!("configuration epoch {epoch}: {why}"),
        );
        self.recheck_plan();
    }

    /// Fetches `peer`'s configuration and adopts it if it is newer.
    async fn sync_from(self: Arc<Self>, peer: &str) {
        let r = self.peer_call(peer, Op::PoolGet).await;
        self.st().syncing.remove(peer);
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot fetch the peer's pool configuration");
                return;
            }
        };
        let cfg: PoolConfig = match serde_json::from_value(v)
            .map_err(|e| e.to_string())
            .and_then(|c: PoolConfig| {
                c.validate()?;
                Ok(c)
            }) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "peer sent an invalid pool configuration");
                return;
            }
        };
        let newer = cfg.newer_than(&self.st().pool);
        if newer {
            let epoch = cfg.epoch;
            self.adopt(cfg, &format!("adopted epoch {epoch} from {peer}")).await;
            self.clone().ensure_definitions().await;
        }
    }

    async fn sync_all(self: Arc<Self>) {
        let (live, _) = self.live_peers();
        for p in live {
            self.clone().sync_from(&p).await;
        }
    }

    // -----------------------------------------------------------------------------------------
    // API

    async fn handle_op(self: Arc<Self>, req: Request) -> Result<Value, ApiError> {
        match req.op {
            Op::PoolStatus => Ok(to_value(self.pool_status())?),
            Op::HostList => Ok(to_value(view::HostList {
                answered_by: self.me.clone(),
                hosts: self.host_views(),
            })?),
            Op::VmList => Ok(to_value(self.vm_list().await)?),
            Op::VmProtect { name, level } => self.protect(&name, level).await.and_then(to_value),
            Op::VmUnprotect { name } => {
                let r = self
                    .change_pool(pool::Change::Unprotect { name: name.clone() }, None)
                    .await?;
                self.emit(EventKind::GuestUnprotected, Some(&name), None, "protection removed");
                to_value(r)
            }
            Op::Plan => {
                let st = self.st();
                match self.plan_report(&st) {
                    Ok(r) => {
                        let summary = r.summary();
                        let mut v = to_value(r)?;
                        if let Value::Object(m) = &mut v {
                            m.insert("summary".into(), Value::String(summary));
                        }
                        Ok(v)
                    }
                    Err(e) => Err(ApiError::new("plan_error", e.to_string())),
                }
            }
            Op::EventsRecent { limit } => Ok(to_value(self.bus.recent(limit.unwrap_or(crate::events::HISTORY)))?),
            Op::EventsFollow => Err(ApiError::new(
                api::codes::BAD_REQUEST,
                "events.follow is served by the transport",
            )),
            Op::PoolGet => Ok(to_value(self.st().pool.clone())?),
            Op::PoolPropose { epoch, config } => self.on_propose(epoch, config),
            Op::PoolCommit { epoch } => self.on_commit(epoch).await,
            Op::PoolAbort { epoch } => {
                let mut st = self.st();
                if st.pending.as_ref().is_some_and(|(e, _, _)| *e == epoch) {
                    st.pending = None;
                }
                Ok(json!({ "aborted": epoch }))
            }
            Op::Ext { name, args } => match name.as_str() {
                "vm.local" => {
                    if let Ok(list) = self.vmm.list().await {
                        let mut st = self.st();
                        for d in list {
                            st.local.insert(d.name.clone(), d);
                        }
                    }
                    Ok(to_value(self.local_guests())?)
                }
                "vm.xml" => {
                    let guest = args.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                    match self.vmm.xml(&guest).await {
                        Ok(x) => Ok(json!({ "xml": x })),
                        Err(e) if e.kind == ErrorKind::NotFound => {
                            Err(ApiError::new("not_found", format!("no guest '{guest}' on {}", self.me)))
                        }
                        Err(e) => Err(internal("cannot read the guest's XML", &e)),
                    }
                }
                "pool.policy" => {
                    let n = args
                        .get("host_failures_to_tolerate")
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| {
                            ApiError::new(
                                api::codes::BAD_REQUEST,
                                "pool.policy needs host_failures_to_tolerate (a number)",
                            )
                        })?;
                    self.set_policy(n).await.and_then(to_value)
                }
                other => Err(ApiError::new(
                    api::codes::UNKNOWN_OP,
                    format!("unknown extension '{other}'"),
                )),
            },
        }
    }

    async fn set_policy(&self, n: u32) -> Result<view::ChangeResult, ApiError> {
        {
            let st = self.st();
            let mut trial = st.pool.clone();
            trial.policy.host_failures_to_tolerate = n;
            let (hosts, guests) = self.plan_inputs(&st);
            match plan::check(&hosts, &guests, n as usize, plan::Reserve::default()) {
                Ok(r) if !r.ok => {
                    let why = r.shortfalls().next().map(|s| s.explanation.clone()).unwrap_or_default();
                    drop(st);
                    self.emit(
                        EventKind::AdmissionRefused,
                        None,
                        None,
                        format!("host-failures-to-tolerate {n}: {why}"),
                    );
                    return Err(ApiError::new(
                        "plan_broken",
                        format!("refused: with host-failures-to-tolerate = {n} the plan breaks: {why}"),
                    )
                    .with_hint("add capacity or unprotect guests first; `eac plan` shows the shortfalls"));
                }
                Ok(_) => {}
                Err(e) => return Err(ApiError::new("refused", e.to_string())),
            }
        }
        self.change_pool(
            pool::Change::SetPolicy(pool::Policy {
                host_failures_to_tolerate: n,
            }),
            None,
        )
        .await
    }

    async fn protect(&self, name: &str, level: u8) -> Result<view::ChangeResult, ApiError> {
        let level = Level::try_from(level).map_err(|m| ApiError::new("refused", m).with_hint("use --level 1"))?;
        level
            .available()
            .map_err(|r| ApiError::new("level_unavailable", r.message).with_hint(r.hint))?;
        // Where the guest is: running here, running on a live peer, defined here, defined there.
        // Ask libvirt now rather than the watcher's last look (the guest may be seconds old).
        let local = match self.vmm.list().await {
            Ok(list) => list.into_iter().find(|d| d.name == name),
            Err(e) => return Err(internal("cannot list this host's guests", &e)),
        };
        let (live, _) = self.live_peers();
        let mut remote: Vec<(String, view::LocalGuest)> = Vec::new();
        for p in &live {
            if let Ok(v) = self
                .peer_call(
                    p,
                    Op::Ext {
                        name: "vm.local".into(),
                        args: Value::Null,
                    },
                )
                .await
                && let Ok(list) = serde_json::from_value::<Vec<view::LocalGuest>>(v)
                && let Some(g) = list.into_iter().find(|g| g.name == name)
            {
                remote.push((p.clone(), g));
            }
        }
        let home = if local.as_ref().is_some_and(|d| d.state.is_active()) {
            self.me.clone()
        } else if let Some((p, _)) = remote.iter().find(|(_, g)| g.active) {
            p.clone()
        } else if local.is_some() {
            self.me.clone()
        } else if let Some((p, _)) = remote.first() {
            p.clone()
        } else {
            return Err(ApiError::new(
                "not_found",
                format!("no guest named '{name}' is defined on any live host"),
            )
            .with_hint("define it in libvirt on one of the pool's hosts first (virsh define), then protect it"));
        };
        let xml = if home == self.me {
            self.vmm
                .xml(name)
                .await
                .map_err(|e| internal("cannot read the guest's definition", &e))?
        } else {
            let v = self
                .peer_call(
                    &home,
                    Op::Ext {
                        name: "vm.xml".into(),
                        args: json!({ "name": name }),
                    },
                )
                .await?;
            v.get("xml")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::new(api::codes::PROTOCOL, format!("host {home} sent no XML for '{name}'")))?
                .to_owned()
        };
        let (mem_mib, vcpus) = pool::xml_resources(&xml).ok_or_else(|| {
            ApiError::new(
                "refused",
                format!("cannot read <memory> and <vcpu> from the definition of '{name}'"),
            )
        })?;
        let uuid = pool::xml_uuid(&xml).unwrap_or_default().to_owned();
        let guest = ProtectedGuest {
            name: name.to_owned(),
            uuid,
            level,
            xml,
            mem_mib,
            vcpus,
            home: home.clone(),
        };
        // Admission: the guest as it is now (unprotected, where it runs), then protected.
        let admit = plan::Change::Protect {
            guest: name.to_owned(),
            level: level.number(),
        };
        let r = self
            .change_pool_with_candidate(
                pool::Change::Protect(guest),
                admit,
                mem_mib,
                vcpus,
                &home,
                local.is_some() || remote.iter().any(|(_, g)| g.active),
            )
            .await?;
        self.emit(
            EventKind::GuestProtected,
            Some(name),
            None,
            format!("protected at level {level} (home {home}, {mem_mib} MiB, {vcpus} vCPU)"),
        );
        Ok(r)
    }

    /// [`Ctl::change_pool`] for a protect: the admission check needs the guest in the plan's
    /// guest list even though it is not protected yet.
    async fn change_pool_with_candidate(
        &self,
        change: pool::Change,
        admit: plan::Change,
        mem_mib: u64,
        vcpus: u32,
        home: &str,
        running: bool,
    ) -> Result<view::ChangeResult, ApiError> {
        {
            let st = self.st();
            let (hosts, mut guests) = self.plan_inputs(&st);
            if let Some(g) = guests
                .iter_mut()
                .find(|g| Some(g.name.as_str()) == plan_guest_name(&admit))
            {
                // Already protected (a level change) or running here unprotected.
                g.protected = false;
            } else {
                guests.push(plan::Guest {
                    name: plan_guest_name(&admit).unwrap_or_default().to_owned(),
                    mem_mib,
                    vcpus,
                    host: running.then(|| home.to_owned()).or_else(|| Some(home.to_owned())),
                    protected: false,
                    level: 0,
                });
            }
            if let Err(r) = plan::admit(
                &hosts,
                &guests,
                st.pool.policy.host_failures_to_tolerate as usize,
                plan::Reserve::default(),
                &admit,
            ) {
                drop(st);
                self.emit(
                    EventKind::AdmissionRefused,
                    plan_guest_name(&admit),
                    None,
                    r.explanation.clone(),
                );
                return Err(ApiError::new("plan_broken", r.explanation)
                    .with_hint("`eac plan` shows where every protected guest would restart"));
            }
        }
        self.change_pool(change, None).await
    }

    fn on_propose(&self, epoch: u64, config: Value) -> Result<Value, ApiError> {
        let cfg: PoolConfig = serde_json::from_value(config).map_err(|e| {
            ApiError::new(
                api::codes::BAD_REQUEST,
                format!("proposal is not a pool configuration: {e}"),
            )
        })?;
        cfg.validate()
            .map_err(|m| ApiError::new(api::codes::BAD_REQUEST, format!("invalid proposal: {m}")))?;
        let mut st = self.st();
        if cfg.epoch != epoch || epoch != st.pool.epoch + 1 {
            return Err(ApiError::new(
                "refused",
                format!(
                    "proposal for epoch {epoch} does not follow this host's epoch {} ({})",
                    st.pool.epoch, self.me
                ),
            )
            .with_hint("the configuration changed meanwhile; retry"));
        }
        if !st.fencer.may_start_guests() {
            return Err(ApiError::new(
                "refused",
                format!("host {} is fencing or fenced", self.me),
            ));
        }
        if let Some((e, _, at)) = &st.pending
            && at.elapsed() < PROPOSAL_TTL
            && *e == epoch
        {
            return Err(ApiError::new(
                "refused",
                format!("another change to epoch {epoch} is being made on {}", self.me),
            )
            .with_hint("retry in a moment"));
        }
        st.pending = Some((epoch, cfg, Instant::now()));
        Ok(json!({ "accepted": epoch }))
    }

    async fn on_commit(self: &Arc<Self>, epoch: u64) -> Result<Value, ApiError> {
        let cfg = {
            let mut st = self.st();
            match st.pending.take() {
                Some((e, cfg, _)) if e == epoch => cfg,
                other => {
                    st.pending = other;
                    return Err(ApiError::new(
                        "refused",
                        format!("no proposal for epoch {epoch} on {}", self.me),
                    ));
                }
            }
        };
        let by = cfg.changed_by.clone();
        self.adopt(cfg, &format!("committed by {by}")).await;
        let me = self.clone();
        tokio::spawn(async move { me.ensure_definitions().await });
        Ok(json!({ "committed": epoch }))
    }

    fn local_guests(&self) -> Vec<view::LocalGuest> {
        let st = self.st();
        st.local
            .values()
            .map(|d| {
                let (mem, cpus) = st.local_resources(&d.name).unwrap_or((0, 0));
                view::LocalGuest {
                    name: d.name.clone(),
                    state: d.state.to_string(),
                    active: d.state.is_active(),
                    mem_mib: mem,
                    vcpus: cpus,
                }
            })
            .collect()
    }

    fn host_views(&self) -> Vec<view::HostView> {
        let st = self.st();
        let now = Instant::now();
        let peers: BTreeMap<String, membership::PeerView> =
            st.membership.view().into_iter().map(|p| (p.name.clone(), p)).collect();
        let (hosts, guests) = self.plan_inputs(&st);
        hosts
            .iter()
            .map(|h| {
                let used: Vec<&plan::Guest> = guests.iter().filter(|g| g.host.as_deref() == Some(&h.name)).collect();
                let mut v = view::HostView {
                    name: h.name.clone(),
                    state: "self".into(),
                    channels: Vec::new(),
                    mem_mib: h.mem_mib,
                    vcpus: h.vcpus,
                    mem_used_mib: used.iter().map(|g| g.mem_mib).sum(),
                    vcpus_used: used.iter().map(|g| g.vcpus).sum(),
                    fencing: None,
                };
                if h.name == self.me {
                    v.fencing = Some(fence_state_name(st.fencer.state()).into());
                } else if let Some(p) = peers.get(&h.name) {
                    v.state = p.state.to_string();
                    v.channels = p
                        .channels
                        .iter()
                        .map(|c| view::ChannelView {
                            name: match &c.channel {
                                Channel::Net(n) => n.clone(),
                                Channel::StateFile => "statefile".into(),
                            },
                            up: c.up,
                            last_seen_ms_ago: c.last_seen.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                        })
                        .collect();
                } else {
                    v.state = "unknown".into();
                }
                v
            })
            .collect()
    }

    fn pool_status(&self) -> view::PoolStatus {
        let hosts = self.host_views();
        let st = self.st();
        let (plan_ok, plan_summary) = match self.plan_report(&st) {
            Ok(r) => (r.ok, r.summary()),
            Err(e) => (false, e.to_string()),
        };
        let mut lost = Vec::new();
        for h in &hosts {
            for c in &h.channels {
                if !c.up {
                    let why = match st.sf_watch.bad_slots().find(|(p, _)| *p == h.name) {
                        Some((_, SlotHealth::Corrupt(r))) if c.name == "statefile" => {
                            format!(" (its slot is corrupt: {r})")
                        }
                        Some((_, SlotHealth::Unreadable(r))) if c.name == "statefile" => format!(" ({r})"),
                        _ => String::new(),
                    };
                    lost.push(format!("{}: {} down{why}", h.name, c.name));
                }
            }
        }
        let sv = st.membership.self_view();
        if !sv.statefile_ok {
            lost.push(format!("{}: own state-file I/O failing", self.me));
        }
        if let Some(p) = st.sf_watch.file_problem() {
            lost.push(format!(
                "{}: state-file {} {}",
                self.me,
                self.cfg.state_file.display(),
                p
            ));
        }

        view::PoolStatus {
            answered_by: self.me.clone(),
            config_epoch: st.pool.epoch,
            config_fingerprint: st.pool.fingerprint(),
            host_failures_to_tolerate: st.pool.policy.host_failures_to_tolerate,
            hosts,
            protected_guests: st.pool.guests.len(),
            isolated: sv.isolated,
            // The API runs on the runtime's threads, which inherit the process's policy.
            realtime: Some(eac_common::sched::is_fifo()),
            fencing: fence_state_name(st.fencer.state()).into(),
            redundancy_ok: lost.is_empty(),
            redundancy_lost: lost,
            plan_ok,
            plan_summary,
        }
    }

    async fn vm_list(&self) -> view::VmList {
        let (live, _) = self.live_peers();
        let mut remote: BTreeMap<String, Option<Vec<view::LocalGuest>>> = BTreeMap::new();
        let answers = futures::future::join_all(live.iter().map(|p| async move {
            let r = self
                .peer_call(
                    p,
                    Op::Ext {
                        name: "vm.local".into(),
                        args: Value::Null,
                    },
                )
                .await
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<view::LocalGuest>>(v).ok());
            (p.clone(), r)
        }))
        .await;
        remote.extend(answers);
        let states: BTreeMap<String, String> = self.host_views().into_iter().map(|h| (h.name, h.state)).collect();
        let local = self.local_guests();
        let st = self.st();
        let mut hosts = Vec::new();
        for name in st.pool.hosts.keys() {
            let state = states.get(name).cloned().unwrap_or_else(|| "unknown".into());
            let list = if name == &self.me {
                Some(local.clone())
            } else {
                remote.get(name).cloned().flatten()
            };
            let reachable = list.is_some();
            let mut guests: Vec<view::VmView> = match list {
                Some(list) => {
                    list.into_iter()
                        // A protected guest defined everywhere shows only where it runs, or at home.
                        .filter(|g| {
                            st.pool.guests.get(&g.name).is_none_or(|pg| {
                                g.active || (pg.home == *name && !self.runs_elsewhere(&st, &g.name, name))
                            })
                        })
                        .map(|g| {
                            let pg = st.pool.guests.get(&g.name);
                            view::VmView {
                                level: pg.map(|p| p.level.number()),
                                health: health(
                                    pg.is_some(),
                                    g.active,
                                    st.starting.contains(&g.name),
                                    fence_state_name(st.fencer.state()),
                                    name == &self.me,
                                ),
                                name: g.name,
                                state: g.state,
                                mem_mib: g.mem_mib,
                                vcpus: g.vcpus,
                            }
                        })
                        .collect()
                }
                None => st
                    .pool
                    .guests
                    .values()
                    .filter(|g| g.home == *name)
                    .map(|g| view::VmView {
                        name: g.name.clone(),
                        level: Some(g.level.number()),
                        state: "unknown".into(),
                        health: if state == "dead" {
                            "down".into()
                        } else {
                            "unknown".into()
                        },
                        mem_mib: g.mem_mib,
                        vcpus: g.vcpus,
                    })
                    .collect(),
            };
            guests.sort_by(|a, b| a.name.cmp(&b.name));
            hosts.push(view::HostGuests {
                host: name.clone(),
                state,
                reachable,
                guests,
            });
        }
        view::VmList {
            answered_by: self.me.clone(),
            hosts,
        }
    }

    fn runs_elsewhere(&self, st: &St, guest: &str, host: &str) -> bool {
        if host != self.me && st.local.get(guest).is_some_and(|d| d.state.is_active()) {
            return true;
        }
        st.peers
            .iter()
            .any(|(p, i)| p != host && i.running.iter().any(|g| g == guest))
    }
}

impl St {
    /// Memory and vCPUs of a local domain, from the pool configuration when protected.
    fn local_resources(&self, name: &str) -> Option<(u64, u32)> {
        self.pool.guests.get(name).map(|g| (g.mem_mib, g.vcpus))
    }
}

fn plan_guest_name(c: &plan::Change) -> Option<&str> {
    match c {
        plan::Change::Protect { guest, .. }
        | plan::Change::Unprotect { guest }
        | plan::Change::SetLevel { guest, .. }
        | plan::Change::Start { guest, .. } => Some(guest),
    }
}

fn health(protected: bool, active: bool, starting: bool, fencing: &str, here: bool) -> String {
    match (protected, active) {
        (false, _) => "unprotected",
        (true, true) => "ok",
        (true, false) if starting => "restarting",
        (true, false) if here && fencing != "normal" => "fenced",
        (true, false) => "down",
    }
    .into()
}

fn fence_state_name(s: &FenceState) -> &'static str {
    match s {
        FenceState::Normal => "normal",
        FenceState::Fencing { .. } => "fencing",
        FenceState::Fenced { .. } => "fenced",
    }
}

fn redundancy_ok(st: &St) -> bool {
    let m = &st.membership;
    st.sf_watch.file_ok() && m.self_view().statefile_ok && m.view().iter().all(|p| p.channels.iter().all(|c| c.up))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| internal("cannot encode the answer", &e))
}

/// The pool's hosts with their capacity, from this host's configuration (a peer without a
/// `capacity` is assumed to offer what this host offers).
pub fn pool_hosts(cfg: &Config) -> BTreeMap<String, pool::HostEntry> {
    let own = pool::HostEntry {
        mem_mib: cfg.capacity.mem_mib,
        vcpus: cfg.capacity.vcpus,
    };
    let mut m = BTreeMap::new();
    m.insert(cfg.host.clone(), own);
    for p in &cfg.peers {
        let c = p.capacity.map_or(own, |c| pool::HostEntry {
            mem_mib: c.mem_mib,
            vcpus: c.vcpus,
        });
        m.insert(p.name.clone(), c);
    }
    m
}

struct ApiHandler(Arc<Ctl>);

impl Handler for ApiHandler {
    fn handle(&self, req: Request) -> BoxFuture<'static, Response> {
        let ctl = self.0.clone();
        Box::pin(async move {
            let id = req.id;
            let op = req.op.name();
            match ctl.handle_op(req).await {
                Ok(v) => Response::ok(id, v),
                Err(e) => {
                    tracing::info!(op, code = %e.code, error = %e.message, "api request refused");
                    Response::error(Some(id), e)
                }
            }
        })
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.0.bus.subscribe()
    }
}

/// Runs the controller until `shutdown` resolves (SIGTERM/SIGINT in the binary), then drains:
/// reports `stopping`, stops every task, removes the API socket.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let ctl = Ctl::new(cfg, Instant::now())?;
    let cfg = &ctl.cfg;
    let mut tasks = JoinSet::new();

    // Heartbeat sockets first: a wrong address fails the start.
    for net in &cfg.networks {
        let sock = HeartbeatSocket::for_network(cfg, &net.name)
            .await
            .map_err(|source| DaemonError::Heartbeat {
                network: net.name.clone(),
                source,
            })?;
        let sock = Arc::new(sock);
        tasks.spawn(ctl.clone().heartbeat_sender(sock.clone()));
        tasks.spawn(ctl.clone().heartbeat_receiver(sock));
    }
    let handler: Arc<dyn Handler> = Arc::new(ApiHandler(ctl.clone()));
    let unix = api::bind_unix(&cfg.api_socket).map_err(|source| DaemonError::Api {
        what: format!("socket {}", cfg.api_socket.display()),
        source,
    })?;
    tasks.spawn(api::serve_unix(unix, handler.clone()));
    if let Some(addr) = cfg.api_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Api {
                what: format!("address {addr}"),
                source,
            })?;
        tasks.spawn(api::serve_tcp(l, cfg.pool_secret.as_bytes().to_vec(), handler));
    }
    tasks.spawn(ctl.clone().statefile_loop());
    tasks.spawn(ctl.clone().tick_loop());
    tasks.spawn(ctl.clone().libvirt_loop());
    let (epoch, protected) = {
        let st = ctl.st();
        (st.pool.epoch, st.pool.guests.len())
    };
    ctl.emit(
        EventKind::Started,
        None,
        None,
        format!(
            "eac-controller {} incarnation {} (pool configuration epoch {epoch}, {protected} protected guests)",
            env!("CARGO_PKG_VERSION"),
            ctl.incarnation,
        ),
    );
    tokio::select! {
        () = shutdown => {}
        r = tasks.join_next() => {
            if let Some(Err(e)) = r {
                tracing::error!(error = %e, "a controller task ended unexpectedly");
            }
        }
    }
    ctl.emit(
        EventKind::Stopping,
        None,
        None,
        "controller stopping (guests keep running; peers will see this host's channels go silent)",
    );
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&cfg.api_socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_words() {
        assert_eq!(health(false, true, false, "normal", true), "unprotected");
        assert_eq!(health(true, true, false, "normal", true), "ok");
        assert_eq!(health(true, false, true, "normal", true), "restarting");
        assert_eq!(health(true, false, false, "fenced", true), "fenced");
        assert_eq!(health(true, false, false, "fenced", false), "down");
        assert_eq!(health(true, false, false, "normal", true), "down");
    }

    /// A busy or broken peer makes a pool change fail transiently (eac exits 1), with a hint
    /// that fits; only the peer's own refusal is a refusal (eac exits 64).
    #[test]
    fn a_busy_peer_is_a_transient_failure_not_a_refusal() {
        let busy =
            ApiError::new(api::codes::BUSY, "the controller serves at most 64 connections").with_hint("retry shortly");
        let e = peer_did_not_accept("a", "policy", &busy);
        assert_eq!(e.code, api::codes::BUSY);
        assert_eq!(
            e.message,
            "not applied: live host a did not accept the change (policy): the controller serves at most 64 connections"
        );
        assert_eq!(e.hint.as_deref(), Some("retry shortly"));
        let e = peer_did_not_accept("a", "policy", &ApiError::new(api::codes::INTERNAL, "boom"));
        assert_eq!(e.code, api::codes::INTERNAL);
        assert_eq!(e.hint.as_deref(), Some("retry shortly; see host a's controller log"));
        let e = peer_did_not_accept("a", "policy", &ApiError::new(api::codes::UNREACHABLE, "gone"));
        assert_eq!(e.code, "peer_unreachable");
        let e = peer_did_not_accept("a", "policy", &ApiError::new("refused", "stale epoch"));
        assert_eq!(e.code, "refused");
        assert!(
            e.message.starts_with("refused: live host a did not accept"),
            "{}",
            e.message
        );
    }

    #[test]
    fn pool_hosts_take_peer_capacity_or_ours() {
        let dir = std::env::temp_dir().join(format!("eac-daemon-ut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        let text = format!(
            "host = \"a\"\npool_secret_file = \"{}\"\nstate_file = \"{}/sf\"\ndata_dir = \"{}/data\"\n\
             [capacity]\nmem_mib = 2048\nvcpus = 8\n\
             [[network]]\nname = \"mgmt\"\nbind = \"127.0.0.1:7410\"\n\
             [[peer]]\nname = \"b\"\naddresses = {{ mgmt = \"127.0.0.2:7410\" }}\ncapacity = {{ mem_mib = 512, vcpus = 2 }}\n\
             [[peer]]\nname = \"c\"\naddresses = {{ mgmt = \"127.0.0.3:7410\" }}\n",
            secret.display(),
            dir.display(),
            dir.display()
        );
        let cfg = Config::parse(&dir.join("c.toml"), &text).unwrap();
        let h = pool_hosts(&cfg);
        assert_eq!(
            h["a"],
            pool::HostEntry {
                mem_mib: 2048,
                vcpus: 8
            }
        );
        assert_eq!(h["b"], pool::HostEntry { mem_mib: 512, vcpus: 2 });
        assert_eq!(
            h["c"],
            pool::HostEntry {
                mem_mib: 2048,
                vcpus: 8
            }
        );
        assert!(cfg.timeouts.validate().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn libvirt_vmm_against_the_test_driver() {
        let vmm = LibvirtVmm::new("test:///default");
        let name = format!("eac-daemon-ut-{}", std::process::id());
        let xml = format!(
            "<domain type='test'><name>{name}</name><uuid>{:08x}-0000-4000-8000-00000000da01</uuid>\
             <memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
            std::process::id()
        );
        assert_eq!(vmm.define(&xml).await.unwrap(), name);
        assert_eq!(vmm.state(&name).await.unwrap(), DomainState::ShutOff);
        vmm.start(&name).await.unwrap();
        assert!(
            vmm.list()
                .await
                .unwrap()
                .iter()
                .any(|d| d.name == name && d.state == DomainState::Running)
        );
        assert!(vmm.xml(&name).await.unwrap().contains(&name));
        vmm.destroy(&name).await.unwrap();
        let e = vmm.destroy(&name).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidState, "{e:?}");
        let e = vmm.state("eac-daemon-ut-no-such").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let hv = Hypervisor::connect("test:///default").unwrap();
        hv.undefine(&name).unwrap();
    }
}
