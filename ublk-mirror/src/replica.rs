//! The secondary side of a mirrored device: accepts the primary's links (AL1 and AL2),
//! applies what arrives to the local backing store and answers every request after it
//! completed (`Ack` after the write returned, after `fdatasync` for FUA and `Flush`).
//!
//! A connection whose first frame is `State` starts a new session (any older connections are
//! closed); a connection starting with anything else joins the current session — that is how
//! the primary's second link, or a link it re-established, attaches. Requests carry ids
//! unique within a session; a request the primary resent on another link after a link
//! failure is recognised by its id: applied once, answered on every link it came on.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::dev::{BlockDev, IoError, LocalDisk, check_range};
use crate::engine::{
    EngineError, Events, LinkReader, LinkWriter, MirrorConfig, SharedMeta, SyncPlan, exchange_bitmaps, gen_json,
    local_state, meta_blocking, plan_of, side_of, spawn_writer,
};
use crate::{genid, proto};
use genid::Role;
use proto::{Frame, Message};

/// Completed request ids remembered per session to drop resent duplicates.
const DEDUP_WINDOW: usize = 1 << 16;

type Out = (Message, Bytes);

enum Dedup {
    /// Being applied; answer on these links (link index, connection) when done.
    Running(Vec<(usize, u64)>),
    /// Done with this errno.
    Done(i32),
}

#[derive(Default)]
struct RLink {
    tx: Option<mpsc::UnboundedSender<Out>>,
    reader: Option<AbortHandle>,
    conn: u64,
    last_rx: Option<Instant>,
    up_since: Option<Instant>,
    connects: u64,
    last_error: Option<String>,
}

struct Session {
    epoch: u64,
    active: bool,
    plan: SyncPlan,
    synced: bool,
    links: Vec<RLink>,
    dedup: HashMap<u64, Dedup>,
    done_order: VecDeque<u64>,
    peer_host: Option<String>,
    refused: Option<(String, String)>,
    next_conn: u64,
}

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    resync_bytes: AtomicU64,
    resync_frames: AtomicU64,
    duplicates: AtomicU64,
    verifies: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    cfg: MirrorConfig,
    disk: LocalDisk,
    meta: SharedMeta,
    size: u64,
    sess: Mutex<Session>,
    setup: tokio::sync::Mutex<()>,
    /// Held (read) by every modification being applied (and by a `ResyncDone` being
    /// recorded); a new session and `shutdown` take it (write) once, so no write of a previous
    /// session lands after the new session's resync data, and none lands after `shutdown`
    /// returned (after a promotion, the disk belongs to the new primary).
    drain: Arc<tokio::sync::RwLock<()>>,
    /// Test-only: awaited before a modification is applied (injected delays and gates at the
    /// racing point).
    #[cfg(test)]
    apply_hook: Mutex<Option<ApplyHook>>,
    stats: Stats,
    events: Events,
    stop: watch::Sender<bool>,
    started: Instant,
}

/// The replica (secondary) of a mirrored device; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("resource", &self.sh.cfg.resource)
            .finish()
    }
}

impl Replica {
    /// Starts the replica over `disk` (persists the secondary role). Connections are handed
    /// to it with [`Replica::accept`] after the handshake.
    pub async fn start(cfg: MirrorConfig, disk: LocalDisk, meta: SharedMeta) -> Result<Replica, EngineError> {
        let size = meta.lock().unwrap_or_else(|p| p.into_inner()).superblock().size;
        if disk.size() < size {
            return Err(EngineError::Mismatch(format!(
                "{} has {} bytes, the metadata describes {size}",
                disk.path().display(),
                disk.size()
            )));
        }
        meta_blocking(&meta, |m| {
            m.update(|sb| {
                sb.role = Role::Secondary;
                sb.flags.never_started = false;
            })
        })
        .await?;
        let n = cfg.links.len();
        let (stop, _) = watch::channel(false);
        let sh = Arc::new(Shared {
            disk,
            meta,
            size,
            sess: Mutex::new(Session {
                epoch: 0,
                active: false,
                plan: SyncPlan::None,
                synced: false,
                links: (0..n).map(|_| RLink::default()).collect(),
                dedup: HashMap::new(),
                done_order: VecDeque::new(),
                peer_host: None,
                refused: None,
                next_conn: 1,
            }),
            setup: tokio::sync::Mutex::new(()),
            drain: Arc::new(tokio::sync::RwLock::new(())),
            #[cfg(test)]
            apply_hook: Mutex::new(None),
            stats: Stats::default(),
            events: Events::default(),
            stop,
            started: Instant::now(),
            cfg,
        });
        sh.events.emit(
            &sh.cfg.resource,
            "secondary",
            format!("secondary for {}: waiting for the primary", sh.cfg.resource),
        );
        tokio::spawn(sh.clone().keepalive());
        Ok(Replica { sh })
    }

    /// Serves one authenticated connection that arrived on link `link` (0-based).
    pub fn accept(&self, link: usize, rd: LinkReader, wr: LinkWriter, peer: proto::Hello) {
        let sh = self.sh.clone();
        tokio::spawn(async move { sh.serve(link, rd, wr, peer).await });
    }

    /// Status as one JSON document.
    pub fn status(&self) -> Value {
        self.sh.status()
    }

    /// The replica's event ring.
    pub fn events(&self) -> Vec<Value> {
        self.sh.events.recent()
    }

    /// True while a primary is connected (a session is active with at least one link).
    pub fn connected(&self) -> bool {
        let s = self.sh.lock();
        s.active && s.links.iter().any(|l| l.tx.is_some())
    }

    /// Closes every link and stops. Returns once every modification already accepted has
    /// reached the disk (or failed): after this, nothing of this replica writes to the disk
    /// or the metadata any more — the next owner (a promoted primary, a new replica) starts
    /// from a copy that does not change under it.
    pub async fn shutdown(&self) {
        let sh = &self.sh;
        let _ = sh.stop.send(true);
        // A session being set up right now (its State exchange, its drain) finishes first,
        // then is closed with the others: none can start after this point.
        let _setup = sh.setup.lock().await;
        {
            let mut s = sh.lock();
            // Frames still being read belong to no session: not applied.
            s.epoch += 1;
            s.active = false;
            for l in &mut s.links {
                l.tx = None;
                if let Some(r) = l.reader.take() {
                    r.abort();
                }
            }
        }
        let t0 = Instant::now();
        let mut drained = std::pin::pin!(sh.drain.write());
        loop {
            tokio::select! {
                _ = &mut drained => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => tracing::warn!(
                    resource = %sh.cfg.resource,
                    "shutdown: still waiting for writes in flight to the local disk ({:.0} s)",
                    t0.elapsed().as_secs_f64()
                ),
            }
        }
        let _ = sh.disk.flush().await;
        if let Err(e) = meta_blocking(&sh.meta, |m| m.flush_bitmap()).await {
            tracing::warn!(error = %eac_common::error_chain(&e), "flushing the bitmap at shutdown");
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.sess.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, kind: &'static str, reason: String) {
        let changed = {
            let mut s = self.lock();
            let changed = s.refused.as_ref().is_none_or(|(_, r)| *r != reason);
            s.refused = Some((kind.to_owned(), reason.clone()));
            changed
        };
        if changed {
            let k = if kind == "split-brain" {
                "split-brain"
            } else {
                "refused"
            };
            self.events
                .emit(&self.cfg.resource, k, format!("connection refused: {reason}"));
        }
    }

    async fn serve(self: Arc<Self>, i: usize, mut rd: LinkReader, mut wr: LinkWriter, peer: proto::Hello) {
        if *self.stop.borrow() {
            return;
        }
        let first = match tokio::time::timeout(self.cfg.peer_timeout, rd.next()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(link = i + 1, peer = %peer.host, "link closed before its first frame: {}", eac_common::error_chain(&e));
                return;
            }
            Err(_) => {
                tracing::info!(link = i + 1, peer = %peer.host, "no frame within the peer timeout; closing");
                return;
            }
        };
        if matches!(first.msg, Message::State { .. }) {
            let _setup = self.setup.lock().await;
            if *self.stop.borrow() {
                return;
            }
            match self.new_session(i, &mut rd, &mut wr, &peer, &first.msg).await {
                Ok(epoch) => self.attach(i, epoch, rd, wr, None),
                Err(reason) => {
                    tracing::warn!(link = i + 1, peer = %peer.host, "session refused: {reason}");
                    let _ = wr.send(&Message::Error { reason }, &[]).await;
                }
            }
            return;
        }
        let epoch = {
            let s = self.lock();
            s.active.then_some(s.epoch)
        };
        match epoch {
            Some(e) => self.attach(i, e, rd, wr, Some(first)),
            None => {
                let reason = "no session: the first connection must start with State".to_string();
                let _ = wr.send(&Message::Error { reason }, &[]).await;
            }
        }
    }

    async fn new_session(
        &self,
        i: usize,
        rd: &mut LinkReader,
        wr: &mut LinkWriter,
        peer: &proto::Hello,
        st: &Message,
    ) -> Result<u64, String> {
        // A new session replaces the old one and its links.
        let mine = {
            let mut s = self.lock();
            s.epoch += 1;
            s.active = false;
            s.dedup.clear();
            s.done_order.clear();
            for l in &mut s.links {
                l.tx = None;
                if let Some(r) = l.reader.take() {
                    r.abort();
                }
                l.up_since = None;
            }
            s.epoch
        };
        // Writes of the old session still on their way to the disk finish first: one of them
        // landing after this session's resync of the same block would leave stale data on a
        // copy both sides call in sync.
        drop(self.drain.write().await);
        let my_state = local_state(&self.meta, Role::Secondary);
        wr.send(&my_state, &[]).await.map_err(|e| format!("send State: {e}"))?;
        let (Some(local), Some(remote)) = (side_of(&my_state), side_of(st)) else {
            return Err("bad State".into());
        };
        if remote.role != Role::Primary {
            let r = format!("{} connected as secondary; only a primary connects", peer.host);
            self.refuse("refused", r.clone());
            return Err(r);
        }
        let decision = genid::decide(&local, &remote);
        let plan = match plan_of(&decision) {
            Ok(p) => p,
            Err((kind, reason)) => {
                self.refuse(kind, reason.clone());
                return Err(reason);
            }
        };
        match plan {
            SyncPlan::Source { full: false } | SyncPlan::Target { full: false } => {
                exchange_bitmaps(rd, wr, &self.meta, self.cfg.peer_timeout).await?;
            }
            SyncPlan::Source { full: true } | SyncPlan::Target { full: true } => {
                self.meta.lock().unwrap_or_else(|p| p.into_inner()).set_all_dirty();
            }
            SyncPlan::None => {}
        }
        if let SyncPlan::Target { .. } = plan {
            // Persisted before any resync data is applied: an interrupted resync leaves a
            // copy that knows it is inconsistent.
            meta_blocking(&self.meta, |m| {
                m.update(|sb| sb.flags.consistent = false)?;
                m.flush_bitmap()
            })
            .await
            .map_err(|e| eac_common::error_chain(&e))?;
        }
        let dirty = self.meta.lock().unwrap_or_else(|p| p.into_inner()).dirty_bytes();
        let epoch = {
            let mut s = self.lock();
            // Stopped (or replaced) while this session was being set up: it never starts.
            if *self.stop.borrow() || s.epoch != mine {
                return Err("the replica stopped while the session was being set up".into());
            }
            s.active = true;
            s.plan = plan;
            s.synced = plan == SyncPlan::None;
            s.peer_host = Some(peer.host.clone());
            s.refused = None;
            s.epoch
        };
        self.events.emit(
            &self.cfg.resource,
            "connected",
            format!(
                "primary {} connected on link {} ({decision:?}; {dirty} dirty bytes)",
                peer.host,
                i + 1
            ),
        );
        Ok(epoch)
    }

    fn attach(self: &Arc<Self>, i: usize, epoch: u64, rd: LinkReader, wr: LinkWriter, first: Option<Frame>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = {
            let mut s = self.lock();
            if s.epoch != epoch || *self.stop.borrow() {
                return;
            }
            let c = s.next_conn;
            s.next_conn += 1;
            c
        };
        let sh = self.clone();
        spawn_writer(wr, rx, move |e| sh.link_down(i, conn, &e));
        {
            let mut s = self.lock();
            let l = &mut s.links[i];
            if let Some(r) = l.reader.take() {
                r.abort();
            }
            l.tx = Some(tx);
            l.conn = conn;
            l.last_rx = Some(Instant::now());
            l.up_since = Some(Instant::now());
            l.connects += 1;
            l.last_error = None;
        }
        let reader = tokio::spawn(self.clone().reader(i, conn, epoch, rd, first)).abort_handle();
        let mut s = self.lock();
        if s.links[i].conn == conn {
            s.links[i].reader = Some(reader);
        } else {
            reader.abort();
        }
        drop(s);
        tracing::info!(target: "event", resource = %self.cfg.resource, kind = "link-up", link = i + 1, "link {} up", i + 1);
    }

    fn link_down(&self, i: usize, conn: u64, why: &str) {
        let mut s = self.lock();
        let l = &mut s.links[i];
        if l.conn != conn || l.tx.is_none() {
            return;
        }
        l.tx = None;
        if let Some(r) = l.reader.take() {
            r.abort();
        }
        l.up_since = None;
        l.last_error = Some(why.to_owned());
        drop(s);
        tracing::warn!(target: "event", resource = %self.cfg.resource, kind = "link-down", link = i + 1, "link {} down: {why}", i + 1);
    }

    async fn reader(self: Arc<Self>, i: usize, conn: u64, epoch: u64, mut rd: LinkReader, first: Option<Frame>) {
        if let Some(f) = first
            && let Err(e) = self.on_frame(i, conn, epoch, f)
        {
            self.link_down(i, conn, &e);
            return;
        }
        loop {
            match rd.next().await {
                Ok(Some(f)) => {
                    if let Err(e) = self.on_frame(i, conn, epoch, f) {
                        self.link_down(i, conn, &e);
                        return;
                    }
                }
                Ok(None) => {
                    self.link_down(i, conn, "closed by the peer");
                    return;
                }
                Err(e) => {
                    self.link_down(i, conn, &format!("receive: {}", eac_common::error_chain(&e)));
                    return;
                }
            }
        }
    }

    /// Sends on link `i` if it is still connection `conn`, else on any link of the session.
    fn reply(&self, i: usize, conn: u64, msg: Message, payload: Bytes) {
        let s = self.lock();
        if let Some(tx) = s.links.get(i).filter(|l| l.conn == conn).and_then(|l| l.tx.as_ref())
            && tx.send((msg.clone(), payload.clone())).is_ok()
        {
            return;
        }
        for l in &s.links {
            if let Some(tx) = &l.tx
                && tx.send((msg.clone(), payload.clone())).is_ok()
            {
                return;
            }
        }
    }

    fn on_frame(self: &Arc<Self>, i: usize, conn: u64, epoch: u64, f: Frame) -> Result<(), String> {
        {
            let mut s = self.lock();
            if s.epoch != epoch {
                return Err("session replaced".into());
            }
            s.links[i].last_rx = Some(Instant::now());
        }
        match f.msg {
            Message::Ping { id } => self.reply(i, conn, Message::Pong { id }, Bytes::new()),
            Message::Write { id, offset, fua } => {
                self.stats.writes.fetch_add(1, Relaxed);
                self.stats.write_bytes.fetch_add(f.payload.len() as u64, Relaxed);
                self.apply(
                    i,
                    conn,
                    epoch,
                    id,
                    Apply::Write {
                        offset,
                        data: f.payload,
                        fua,
                    },
                );
            }
            Message::ResyncData { id, offset } => {
                self.stats.resync_frames.fetch_add(1, Relaxed);
                self.stats.resync_bytes.fetch_add(f.payload.len() as u64, Relaxed);
                self.apply(
                    i,
                    conn,
                    epoch,
                    id,
                    Apply::Resync {
                        offset,
                        data: f.payload,
                    },
                );
            }
            Message::Discard { id, offset, len } => {
                self.stats.discards.fetch_add(1, Relaxed);
                self.apply(i, conn, epoch, id, Apply::Discard { offset, len });
            }
            Message::WriteZeroes { id, offset, len } => {
                self.stats.discards.fetch_add(1, Relaxed);
                self.apply(i, conn, epoch, id, Apply::Zeroes { offset, len });
            }
            Message::Flush { id } => {
                self.stats.flushes.fetch_add(1, Relaxed);
                let sh = self.clone();
                tokio::spawn(async move {
                    let errno = errno_of(sh.disk.flush().await);
                    sh.reply(i, conn, Message::Ack { id, errno }, Bytes::new());
                });
            }
            Message::Read { id, offset, len } => {
                let sh = self.clone();
                tokio::spawn(async move {
                    let r = match usize::try_from(len) {
                        Ok(n) if n <= proto::MAX_PAYLOAD => match check_range(sh.size, offset, len) {
                            Ok(()) => sh.disk.read(offset, n).await,
                            Err(e) => Err(e),
                        },
                        _ => Err(IoError::EINVAL),
                    };
                    sh.stats.reads.fetch_add(1, Relaxed);
                    match r {
                        Ok(data) => {
                            sh.stats.read_bytes.fetch_add(data.len() as u64, Relaxed);
                            sh.reply(i, conn, Message::ReadReply { id, errno: 0 }, data)
                        }
                        Err(e) => sh.reply(i, conn, Message::ReadReply { id, errno: e.0 }, Bytes::new()),
                    }
                });
            }
            Message::Verify { id, offset, len } => {
                let sh = self.clone();
                tokio::spawn(async move {
                    use sha2::{Digest, Sha256};
                    sh.stats.verifies.fetch_add(1, Relaxed);
                    let r = match usize::try_from(len) {
                        Ok(n) if n <= proto::MAX_PAYLOAD => match check_range(sh.size, offset, len) {
                            Ok(()) => sh.disk.read(offset, n).await,
                            Err(e) => Err(e),
                        },
                        _ => Err(IoError::EINVAL),
                    };
                    let (errno, digest) = match r {
                        Ok(d) => match tokio::task::spawn_blocking(move || Sha256::digest(&d).into()).await {
                            Ok(h) => (0, h),
                            Err(_) => (libc::EIO, [0u8; 32]),
                        },
                        Err(e) => (e.0, [0u8; 32]),
                    };
                    sh.reply(i, conn, Message::VerifyReply { id, errno, digest }, Bytes::new());
                });
            }
            Message::ResyncDone { r#gen } => {
                // Recorded under the drain guard: a ResyncDone of a replaced session (or
                // one after shutdown) never rewrites the metadata.
                let guard = {
                    let s = self.lock();
                    if s.epoch != epoch {
                        return Ok(());
                    }
                    self.drain.clone().try_read_owned()
                };
                if let Ok(guard) = guard {
                    let sh = self.clone();
                    tokio::spawn(async move {
                        sh.resync_done(r#gen).await;
                        drop(guard);
                    });
                }
            }
            Message::Error { reason } => return Err(format!("the primary reported: {reason}")),
            m => return Err(format!("unexpected {} from the primary", m.kind())),
        }
        Ok(())
    }

    /// Applies a modification once per request id and answers every link it arrived on.
    fn apply(self: &Arc<Self>, i: usize, conn: u64, epoch: u64, id: u64, op: Apply) {
        let in_flight = {
            let mut s = self.lock();
            // A frame of a session that was just replaced is not applied (nor acknowledged):
            // the primary counts it unacknowledged and resends or resyncs it.
            if s.epoch != epoch {
                return;
            }
            let Ok(guard) = self.drain.clone().try_read_owned() else {
                return;
            };
            match s.dedup.get_mut(&id) {
                Some(Dedup::Running(w)) => {
                    w.push((i, conn));
                    self.stats.duplicates.fetch_add(1, Relaxed);
                    return;
                }
                Some(Dedup::Done(errno)) => {
                    let errno = *errno;
                    drop(s);
                    self.stats.duplicates.fetch_add(1, Relaxed);
                    self.reply(i, conn, Message::Ack { id, errno }, Bytes::new());
                    return;
                }
                None => {
                    s.dedup.insert(id, Dedup::Running(vec![(i, conn)]));
                }
            }
            guard
        };
        // Straight to the blocking pool: the thread that writes also answers (no task per
        // write in between). The pool bounds nothing by itself; the primary's queue depth
        // does. `in_flight` (the drain guard) lives until the write returned.
        #[cfg(test)]
        let hook = self
            .apply_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|h| h(op.offset()));
        let sh = self.clone();
        let run = move || {
            // A panic is answered as EIO, as `LocalDisk`'s async calls answer one.
            let errno = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sh.apply_op(op))).unwrap_or(libc::EIO);
            drop(in_flight);
            sh.applied(epoch, id, errno);
        };
        #[cfg(test)]
        if let Some(wait) = hook {
            // Tests only: the hook's future (a delay or gate at the racing point) first.
            tokio::spawn(async move {
                wait.await;
                let _ = tokio::task::spawn_blocking(run).await;
            });
            return;
        }
        tokio::task::spawn_blocking(run);
    }

    /// Applies one modification to the disk, on the calling (blocking-pool) thread.
    fn apply_op(&self, op: Apply) -> i32 {
        match op {
            Apply::Write { offset, data, fua } => errno_of(self.disk.write_blocking(offset, &data, fua)),
            Apply::Resync { offset, data } => {
                let len = data.len() as u64;
                let r = self.disk.write_blocking(offset, &data, false);
                if r.is_ok() {
                    self.meta.lock().unwrap_or_else(|p| p.into_inner()).clear(offset, len);
                }
                errno_of(r)
            }
            Apply::Discard { offset, len } => errno_of(self.disk.discard_blocking(offset, len)),
            Apply::Zeroes { offset, len } => errno_of(self.disk.write_zeroes_blocking(offset, len)),
        }
    }

    /// Request `id` of session `epoch` was applied with `errno`: remember it (duplicates of
    /// it are answered from the window) and answer every link it arrived on.
    fn applied(&self, epoch: u64, id: u64, errno: i32) {
        if errno != 0 {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        let waiters = {
            let mut s = self.lock();
            if s.epoch != epoch {
                return;
            }
            let w = match s.dedup.insert(id, Dedup::Done(errno)) {
                Some(Dedup::Running(w)) => w,
                _ => Vec::new(),
            };
            s.done_order.push_back(id);
            while s.done_order.len() > DEDUP_WINDOW {
                if let Some(old) = s.done_order.pop_front() {
                    s.dedup.remove(&old);
                }
            }
            w
        };
        for (li, c) in waiters {
            self.reply(li, c, Message::Ack { id, errno }, Bytes::new());
        }
    }

    async fn resync_done(&self, r#gen: genid::GenIds) {
        let plan = self.lock().plan;
        if let Err(e) = self.disk.flush().await {
            tracing::error!("flush at the end of the resync: {e}");
            return;
        }
        let size = self.size;
        let r = meta_blocking(&self.meta, move |m| {
            m.update(|sb| {
                sb.r#gen = match plan {
                    SyncPlan::Source { .. } => genid::sync_finished_source(&sb.r#gen),
                    _ => genid::sync_finished_target(&r#gen),
                };
                sb.flags.consistent = true;
                sb.flags.discard_my_data = false;
                sb.flags.crashed_primary = false;
            })?;
            m.clear(0, size);
            m.flush_bitmap()
        })
        .await;
        match r {
            Ok(()) => {
                let mut s = self.lock();
                s.synced = true;
                s.plan = SyncPlan::None;
                drop(s);
                let b = self.stats.resync_bytes.load(Relaxed);
                self.events.emit(
                    &self.cfg.resource,
                    "in-sync",
                    format!("resync finished ({b} resync bytes received so far); in sync"),
                );
            }
            Err(e) => tracing::error!(error = %eac_common::error_chain(&e), "recording the finished resync"),
        }
    }

    async fn keepalive(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(self.cfg.link_timeout() / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            let dead: Vec<(usize, u64)> = {
                let s = self.lock();
                s.links
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.tx.is_some() && l.last_rx.is_some_and(|t| now - t > self.cfg.peer_timeout))
                    .map(|(i, l)| (i, l.conn))
                    .collect()
            };
            for (i, c) in dead {
                self.link_down(i, c, "nothing received within the peer timeout");
            }
        }
    }

    fn status(&self) -> Value {
        let now = Instant::now();
        let s = self.lock();
        let links: Vec<Value> = s
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                json!({
                    "link": i + 1,
                    "listen": self.cfg.links[i].local.map(|a| a.to_string()),
                    "connected": l.tx.is_some(),
                    "up_for_ms": l.up_since.map(|t| (now - t).as_millis() as u64),
                    "last_rx_ms_ago": l.last_rx.filter(|_| l.tx.is_some()).map(|t| (now - t).as_millis() as u64),
                    "connects": l.connects,
                    "last_error": l.last_error,
                })
            })
            .collect();
        let connected = s.active && s.links.iter().any(|l| l.tx.is_some());
        let sync = if s.refused.is_some() && !s.active {
            "refused"
        } else if !s.active {
            "waiting"
        } else if s.synced {
            if connected { "in-sync" } else { "disconnected" }
        } else {
            match s.plan {
                SyncPlan::Target { .. } => "resync-target",
                SyncPlan::Source { .. } => "resync-source",
                SyncPlan::None => "in-sync",
            }
        };
        let refused = s.refused.clone();
        let peer = s.peer_host.clone();
        drop(s);
        let (r#gen, consistent, dirty, device_id, region, discard) = {
            let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let sb = m.superblock();
            (
                sb.r#gen,
                sb.flags.consistent,
                m.dirty_bytes(),
                sb.device_id,
                sb.region_size,
                sb.flags.discard_my_data,
            )
        };
        let st = &self.stats;
        json!({
            "resource": self.cfg.resource,
            "host": self.cfg.host,
            "role": "secondary",
            "device_id": format!("{device_id:#x}"),
            "size": self.size,
            "region_size": region,
            "disk": if consistent { "up-to-date" } else { "inconsistent" },
            "backing": self.disk.path().display().to_string(),
            "connection": if connected { "connected" } else if refused.is_some() { "refused" } else { "waiting" },
            "peer": peer,
            "links": links,
            "sync": sync,
            "refused": refused.map(|r| json!({"kind": r.0, "reason": r.1})),
            "dirty_bytes": dirty,
            "consistent": consistent,
            "discard_my_data": discard,
            "gen": gen_json(&r#gen),
            "resync": {
                "received_bytes": st.resync_bytes.load(Relaxed),
                "received_frames": st.resync_frames.load(Relaxed),
            },
            "io": {
                "writes": st.writes.load(Relaxed),
                "write_bytes": st.write_bytes.load(Relaxed),
                "flushes": st.flushes.load(Relaxed),
                "discards": st.discards.load(Relaxed),
                "reads": st.reads.load(Relaxed),
                "read_bytes": st.read_bytes.load(Relaxed),
                "verifies": st.verifies.load(Relaxed),
                "duplicates": st.duplicates.load(Relaxed),
                "errors": st.errors.load(Relaxed),
            },
            "uptime_ms": (now - self.started).as_millis() as u64,
            "events": self.events.recent(),
        })
    }
}

enum Apply {
    Write { offset: u64, data: Bytes, fua: bool },
    Resync { offset: u64, data: Bytes },
    Discard { offset: u64, len: u64 },
    Zeroes { offset: u64, len: u64 },
}

#[cfg(test)]
impl Apply {
    fn offset(&self) -> u64 {
        match self {
            Apply::Write { offset, .. }
            | Apply::Resync { offset, .. }
            | Apply::Discard { offset, .. }
            | Apply::Zeroes { offset, .. } => *offset,
        }
    }
}

/// Test-only: called with a modification's offset before it is applied; the future it
/// returns is awaited first.
#[cfg(test)]
pub(crate) type ApplyHook =
    Arc<dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

#[cfg(test)]
impl Replica {
    /// Installs (or removes) the hook awaited before each modification is applied.
    pub(crate) fn set_apply_hook(&self, hook: Option<ApplyHook>) {
        *self.sh.apply_hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }
}

fn errno_of(r: Result<(), IoError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.0,
    }
}
