//! The controller's API server: versioned JSON lines over a root-only unix socket (for `eac`
//! on the host) and over TCP with a pool-secret challenge–response (for `eac` elsewhere and
//! for peer controllers). The wire types and the client live in `eac-api`
//! ([`eac_api::controller`], re-exported here); its module documentation describes the
//! protocol.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use hmac::Mac;
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener},
    sync::broadcast,
};

use eac_api::controller::wire::*;
/// The framing of every API connection (public for the fuzz targets).
pub use eac_api::controller::wire::{LineRead, read_line};
pub use eac_api::controller::{
    ApiError, Client, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_LINE, MAX_PER_SOURCE, MAX_RESPONSE_LINE,
    Op, Origin, Outcome, ROOT_RESERVE, Request, Response, VERSION, codes,
};
use eac_api::controller::{CLIENT_LABEL, SERVER_LABEL};

use crate::events::Event;

/// Time allowed to write a refusal (`busy`, `forbidden`, …) before the connection is dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the daemon implements: answers requests, and supplies events for `events.follow`.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request (every op but `events.follow`). Should not panic; if it does, the
    /// client gets `internal`.
    fn handle(&self, req: Request) -> BoxFuture<'static, Response>;
    /// A receiver of events published from now on.
    fn events(&self) -> broadcast::Receiver<Event>;
}

/// Parses one request line (without its `\n`). `Err` is the response to send instead. Never
/// panics, whatever the bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let bad = |id, msg: String| {
        Response::error(
            id,
            ApiError::new(codes::BAD_REQUEST, msg)
                .with_hint("send one JSON object per line: {\"v\":1,\"id\":N,\"op\":\"...\", ...}"),
        )
    };
    let v: Value = serde_json::from_slice(line).map_err(|e| bad(None, format!("not JSON: {e}")))?;
    let Value::Object(obj) = &v else {
        return Err(bad(None, "a request must be a JSON object".into()));
    };
    let id = obj.get("id").and_then(Value::as_u64);
    match obj.get("v") {
        Some(x) if x.as_u64() == Some(u64::from(VERSION)) => {}
        Some(x) => {
            return Err(Response::error(
                id,
                ApiError::new(
                    codes::UNSUPPORTED_VERSION,
                    format!("API version {x} is not supported; this controller speaks version {VERSION}"),
                )
                .with_hint("use an eac of the same release as the controller"),
            ));
        }
        None => return Err(bad(id, "missing \"v\" (the API version, 1)".into())),
    }
    let Some(id) = id else {
        return Err(bad(None, "missing or invalid \"id\" (a non-negative integer)".into()));
    };
    let name = match obj.get("op") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad(Some(id), "missing \"op\" (a string)".into())),
    };
    if !Op::NAMES.contains(&name.as_str()) {
        return Err(Response::error(
            Some(id),
            ApiError::new(codes::UNKNOWN_OP, format!("unknown operation {name:?}"))
                .with_hint(format!("known operations: {}", Op::NAMES.join(", "))),
        ));
    }
    let op: Op = serde_json::from_value(v).map_err(|e| bad(Some(id), format!("bad {name} request: {e}")))?;
    Ok(Request::new(id, op))
}

/// Connection slots of one listener (sans-I/O accounting): `total` slots, of which the last
/// `reserve` only a privileged peer (root on the unix socket) may take. A [`Slot`] returns
/// itself when dropped.
#[derive(Clone, Debug)]
pub struct Slots(Arc<SlotsInner>);

#[derive(Debug)]
struct SlotsInner {
    total: usize,
    reserve: usize,
    used: std::sync::Mutex<usize>,
}

/// One taken slot of [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<SlotsInner>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(1);
    }
}

impl Slots {
    /// `total` slots, `reserve` of them (at most `total`) for privileged peers only.
    pub fn new(total: usize, reserve: usize) -> Self {
        Self(Arc::new(SlotsInner {
            total,
            reserve: reserve.min(total),
            used: std::sync::Mutex::new(0),
        }))
    }

    /// Takes a slot, or None when every slot this peer may use is taken: an unprivileged peer
    /// may use `total - reserve` slots in all, a privileged one every slot.
    pub fn take(&self, privileged: bool) -> Option<Slot> {
        let mut used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        let limit = if privileged {
            self.0.total
        } else {
            self.0.total - self.0.reserve
        };
        if *used >= limit {
            return None;
        }
        *used += 1;
        Some(Slot(self.0.clone()))
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Connections held per source address (sans-I/O accounting, as [`Slots`]): at most `max`
/// each. A [`SourceSlot`] gives itself back on drop; an address holding none is forgotten.
#[derive(Clone, Debug)]
pub struct PerSource {
    max: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One connection counted against its source by [`PerSource`].
#[derive(Debug)]
pub struct SourceSlot(PerSource, std::net::IpAddr);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

impl PerSource {
    /// At most `max` connections per source address.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// Counts a connection from `ip`, or None when `ip` already holds `max`.
    pub fn take(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }

    /// Addresses holding a connection now.
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Rate-limited warnings about rejected connections and requests, keyed by (what, source):
/// the source is the client's IP address (TCP, without the port) or its uid (unix), so 300
/// connections from one source log one line per 10 s, the next one with the count of those
/// suppressed (`eac_common::ratelimit::LogLimiter`, shared with the heartbeat receiver).
#[derive(Clone, Default)]
struct Rejects(Arc<std::sync::Mutex<eac_common::ratelimit::LogLimiter<(&'static str, String)>>>);

impl Rejects {
    /// Logs `line()` at warn unless the limiter suppresses it; true when it was logged.
    fn warn(&self, what: &'static str, source: &str, line: impl FnOnce() -> String) -> bool {
        self.warn_at(std::time::Instant::now(), what, source, line)
    }

    fn warn_at(
        &self,
        now: std::time::Instant,
        what: &'static str,
        source: &str,
        line: impl FnOnce() -> String,
    ) -> bool {
        let report = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check((what, source.to_owned()), now);
        let Some(r) = report else { return false };
        tracing::warn!(source, suppressed = r.suppressed, "api: {}{}", line(), r.note(source));
        true
    }

    /// Logs the counts of bursts that stopped (no later rejection carried them); returns the
    /// lines. The servers call it every limiter window.
    fn flush_at(&self, now: std::time::Instant) -> Vec<String> {
        let sums = self.0.lock().unwrap_or_else(|e| e.into_inner()).flush(now);
        let lines: Vec<String> = sums
            .into_iter()
            .map(|s| {
                let who = match s.key {
                    Some((what, source)) => format!("{what} from {source}"),
                    None => "rejections from other sources".into(),
                };
                format!(
                    "{} more {who} in the last {} s (not logged one by one)",
                    s.suppressed,
                    s.since.as_secs_f64().round() as u64
                )
            })
            .collect();
        for l in &lines {
            tracing::warn!("api: {l}");
        }
        lines
    }

    /// How often [`Rejects::flush_at`] is due.
    fn every(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).every()
    }
}

/// The next connection from `listener`, flushing `rejects`' stopped bursts meanwhile.
async fn accept_or_flush<T, F>(accept: impl Fn() -> F, rejects: &Rejects, flush: &mut tokio::time::Interval) -> T
where
    F: std::future::Future<Output = T>,
{
    loop {
        tokio::select! {
            r = accept() => return r,
            _ = flush.tick() => {
                rejects.flush_at(std::time::Instant::now());
            }
        }
    }
}

/// The rate-limit key of a rejected request line: its error code, so that each kind of bad
/// request from a source is logged at least once per window.
fn rejection_kind(code: &str) -> &'static str {
    match code {
        codes::UNKNOWN_OP => codes::UNKNOWN_OP,
        codes::UNSUPPORTED_VERSION => codes::UNSUPPORTED_VERSION,
        codes::TOO_LARGE => codes::TOO_LARGE,
        _ => codes::BAD_REQUEST,
    }
}

/// Serves one connection after authentication: request lines until EOF, an oversized line, a
/// connection idle for `idle`, or an event stream that ends. `source` keys its rate-limited
/// warnings.
async fn serve_lines<S>(
    stream: S,
    origin: Origin,
    handler: Arc<dyn Handler>,
    peer: String,
    source: String,
    idle: Duration,
    rejects: Rejects,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        let line = match tokio::time::timeout(idle, read_line(&mut r, &mut buf, MAX_LINE)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "api: connection read failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "api: connection idle for {idle:?}; closed");
                let _ = w.shutdown().await;
                return;
            }
        };
        match line {
            LineRead::Eof => return,
            LineRead::TooLong => {
                rejects.warn("too_long", &source, || {
                    format!("{peer}: request line longer than {MAX_LINE} bytes; closing the connection")
                });
                let resp = Response::error(
                    None,
                    ApiError::new(
                        codes::TOO_LARGE,
                        format!("request line longer than {MAX_LINE} bytes; closing the connection"),
                    ),
                );
                let _ = write_json(&mut w, &resp).await;
                let _ = w.shutdown().await;
                return;
            }
            LineRead::Complete => {}
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut req = match parse_request(&buf) {
            Ok(r) => r,
            Err(resp) => {
                if let Outcome::Error(e) = &resp.outcome {
                    rejects.warn(rejection_kind(&e.code), &source, || {
                        format!("{peer}: request rejected ({}): {}", e.code, e.message)
                    });
                }
                if write_json(&mut w, &resp).await.is_err() {
                    return;
                }
                continue;
            }
        };
        req.origin = origin.clone();
        if req.op == Op::EventsFollow {
            follow(req.id, &mut r, &mut w, handler.events(), &peer).await;
            return;
        }
        let (id, op) = (req.id, req.op.name());
        tracing::debug!(%peer, id, op, "api request");
        let resp = match tokio::spawn(handler.handle(req)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%peer, id, op, error = %e, "api: handler failed");
                Response::error(
                    Some(id),
                    ApiError::new(codes::INTERNAL, format!("the controller failed while handling {op}"))
                        .with_hint("see the controller's log"),
                )
            }
        };
        if write_json(&mut w, &resp).await.is_err() {
            return;
        }
    }
}

/// Streams events until the client closes the connection.
async fn follow<R, W>(id: u64, r: &mut R, w: &mut W, mut rx: broadcast::Receiver<Event>, peer: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tracing::debug!(%peer, "api: event follower attached");
    if write_json(w, &Response::ok(id, serde_json::json!({ "following": true })))
        .await
        .is_err()
    {
        return;
    }
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let line = match ev {
                    Ok(event) => StreamLine::Event { v: VERSION, event },
                    Err(broadcast::error::RecvError::Lagged(n)) => StreamLine::Lagged { v: VERSION, lagged: n },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if write_json(w, &line).await.is_err() {
                    break;
                }
            }
            // The client sends nothing more; reading only notices that it went away.
            n = r.read(&mut scratch) => {
                if matches!(n, Ok(0) | Err(_)) {
                    break;
                }
            }
        }
    }
    tracing::debug!(%peer, "api: event follower detached");
}

/// Creates the API's unix socket at `path` with mode 0600, replacing a stale socket file (the
/// directory is created, mode 0755, if missing). Refuses to replace anything but a socket.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the unix socket, admitting only root peers. Runs until the task is dropped.
pub async fn serve_unix(listener: UnixListener, handler: Arc<dyn Handler>) {
    serve_unix_with(listener, handler, UnixLimits::default()).await
}

/// As [`serve_unix`], admitting only peers with uid `allowed_uid` (tests and non-root
/// deployments; production uses [`serve_unix`]).
pub async fn serve_unix_for_uid(listener: UnixListener, handler: Arc<dyn Handler>, allowed_uid: u32) {
    let limits = UnixLimits {
        allowed_uid,
        admit_root: false,
        ..UnixLimits::default()
    };
    serve_unix_with(listener, handler, limits).await
}

/// Who the unix socket serves, and how many at once.
#[derive(Clone, Copy, Debug)]
pub struct UnixLimits {
    /// Peers of this uid are served (0, root, in production).
    pub allowed_uid: u32,
    /// Also serve root when `allowed_uid` is another uid.
    pub admit_root: bool,
    /// Connections at once ([`MAX_CONNECTIONS`]).
    pub slots: usize,
    /// Of those, the ones only root may take ([`ROOT_RESERVE`]).
    pub root_reserve: usize,
    /// A connection without a request for this long is closed ([`IDLE_TIMEOUT`]).
    pub idle: Duration,
}

impl Default for UnixLimits {
    fn default() -> Self {
        Self {
            allowed_uid: 0,
            admit_root: true,
            slots: MAX_CONNECTIONS,
            root_reserve: ROOT_RESERVE,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// Serves the unix socket with explicit limits. A peer's uid (`SO_PEERCRED`) is checked before
/// it takes a slot: a refused peer takes none; root may take the reserved ones.
pub async fn serve_unix_with(listener: UnixListener, handler: Arc<dyn Handler>, limits: UnixLimits) {
    let slots = Slots::new(limits.slots, limits.root_reserve);
    let rejects = Rejects::default();
    let mut flush = tokio::time::interval(rejects.every());
    loop {
        let stream = match accept_or_flush(|| listener.accept(), &rejects, &mut flush).await {
            Ok((s, _)) => s,
            Err(e) => {
                rejects.warn("accept", "unix", || format!("unix accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut stream = stream;
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                rejects.warn("no_cred", "unix", || {
                    format!("cannot read the unix peer's credentials ({e}); refused")
                });
                continue;
            }
        };
        let uid = cred.uid();
        let source = format!("uid {uid}");
        let peer = format!("unix uid={uid} pid={}", cred.pid().unwrap_or(-1));
        let allowed = uid == limits.allowed_uid || (limits.admit_root && uid == 0);
        let slot = if allowed { slots.take(uid == 0) } else { None };
        let (handler, rejects) = (handler.clone(), rejects.clone());
        tokio::spawn(async move {
            if !allowed {
                rejects.warn("forbidden", &source, || {
                    format!(
                        "{peer} refused: only uid {} may use the controller socket",
                        limits.allowed_uid
                    )
                });
                let resp = Response::error(
                    None,
                    ApiError::new(codes::FORBIDDEN, format!("uid {uid} may not use the controller API"))
                        .with_hint("run eac as root (e.g. with sudo)"),
                );
                let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write_json(&mut stream, &resp)).await;
                return;
            }
            let Some(_slot) = slot else {
                refuse_busy(
                    &mut stream,
                    &format!("{} connections", limits.slots),
                    &peer,
                    &source,
                    &rejects,
                )
                .await;
                return;
            };
            let origin = Origin::Unix { uid, pid: cred.pid() };
            serve_lines(stream, origin, handler, peer, source, limits.idle, rejects).await;
        });
    }
}

/// Answers `busy` and logs it (rate-limited); `limit` says which limit was reached, e.g.
/// "64 connections".
async fn refuse_busy<W: AsyncWrite + Unpin>(w: &mut W, limit: &str, peer: &str, source: &str, rejects: &Rejects) {
    rejects.warn("busy", source, || {
        format!("{peer}: connection refused: at most {limit}")
    });
    let resp = Response::error(
        None,
        ApiError::new(codes::BUSY, format!("the controller serves at most {limit}"))
            .with_hint("retry shortly; close idle `eac events --follow` sessions"),
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write_json(w, &resp)).await;
}

/// Serves authenticated TCP clients (pool-secret challenge–response, then JSON lines). Runs
/// until the task is dropped.
pub async fn serve_tcp(listener: TcpListener, secret: Vec<u8>, handler: Arc<dyn Handler>) {
    serve_tcp_with(listener, secret, handler, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT).await
}

/// As [`serve_tcp`], with explicit handshake and idle timeouts (tests). Its slots are its own
/// ([`MAX_CONNECTIONS`], none reserved): TCP clients never take the unix socket's.
pub async fn serve_tcp_with(
    listener: TcpListener,
    secret: Vec<u8>,
    handler: Arc<dyn Handler>,
    handshake: Duration,
    idle: Duration,
) {
    let secret: Arc<[u8]> = secret.into();
    let slots = Slots::new(MAX_CONNECTIONS, 0);
    let per_source = PerSource::new(MAX_PER_SOURCE);
    let rejects = Rejects::default();
    let mut flush = tokio::time::interval(rejects.every());
    loop {
        let (mut stream, addr) = match accept_or_flush(|| listener.accept(), &rejects, &mut flush).await {
            Ok(x) => x,
            Err(e) => {
                rejects.warn("accept", "tcp", || format!("tcp accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handler, secret, rejects) = (handler.clone(), secret.clone(), rejects.clone());
        // A source at its limit takes no slot of the listener's.
        let slot = match per_source.take(addr.ip()) {
            None => Err(format!("{MAX_PER_SOURCE} connections from one address")),
            Some(s) => slots
                .take(false)
                .map(|t| (s, t))
                .ok_or_else(|| format!("{MAX_CONNECTIONS} connections")),
        };
        tokio::spawn(async move {
            let peer = format!("tcp {addr}");
            let source = addr.ip().to_string();
            let _slot = match slot {
                Ok(slot) => slot,
                Err(limit) => {
                    refuse_busy(&mut stream, &limit, &peer, &source, &rejects).await;
                    return;
                }
            };
            let mut stream = BufReader::new(stream);
            match tokio::time::timeout(handshake, server_handshake(&mut stream, &secret)).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    rejects.warn("unauthenticated", &source, || {
                        format!("{peer}: tcp client refused: {reason}")
                    });
                    let resp = Response::error(
                        None,
                        ApiError::new(codes::UNAUTHENTICATED, format!("authentication failed: {reason}"))
                            .with_hint("use the pool secret of this pool (pool_secret_file)"),
                    );
                    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write_json(&mut stream, &resp)).await;
                    return;
                }
                Err(_) => {
                    rejects.warn("handshake_timeout", &source, || {
                        format!("{peer}: tcp client refused: no handshake within {handshake:?}")
                    });
                    return;
                }
            }
            tracing::debug!(%peer, "api: tcp client authenticated");
            serve_lines(stream, Origin::Tcp { peer: addr }, handler, peer, source, idle, rejects).await;
        });
    }
}

/// Checks the client's handshake answer `line` (without its `\n`) to the challenge
/// `server_nonce`: version, both hex fields, no reflected nonce, the proof of the pool secret
/// (in constant time). Returns the server's proof to send back; `Err` is the reason to log.
/// Never panics, whatever the bytes.
pub fn check_client_proof(secret: &[u8], server_nonce: &[u8; 32], line: &[u8]) -> Result<[u8; 32], String> {
    let answer: ClientProof = serde_json::from_slice(line).map_err(|e| format!("not a handshake answer ({e})"))?;
    if answer.v != VERSION {
        return Err(format!(
            "client speaks API version {} (this server: {VERSION})",
            answer.v
        ));
    }
    let client_nonce = unhex32(&answer.client_nonce).ok_or("client_nonce is not 64 hex digits")?;
    let proof = unhex32(&answer.proof).ok_or("proof is not 64 hex digits")?;
    if client_nonce == *server_nonce {
        return Err("client_nonce repeats the challenge (reflection)".into());
    }
    proof_mac(secret, CLIENT_LABEL, server_nonce, &client_nonce)
        .verify_slice(&proof)
        .map_err(|_| "wrong proof: the client does not have this pool's secret".to_string())?;
    Ok(proof_mac(secret, SERVER_LABEL, server_nonce, &client_nonce)
        .finalize()
        .into_bytes()
        .into())
}

/// The server's side of the handshake; `Err` is the reason to log.
async fn server_handshake<S>(s: &mut BufReader<S>, secret: &[u8]) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let server_nonce = nonce().map_err(|e| format!("cannot read random bytes: {e}"))?;
    write_json(
        s,
        &Challenge {
            v: VERSION,
            challenge: hex(&server_nonce),
        },
    )
    .await
    .map_err(|e| format!("cannot send the challenge: {e}"))?;
    let mut buf = Vec::new();
    match read_line(s, &mut buf, 4096).await {
        Ok(LineRead::Complete) => {}
        Ok(LineRead::Eof) => return Err("closed during the handshake".into()),
        Ok(LineRead::TooLong) => return Err("oversized handshake line".into()),
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let mine = check_client_proof(secret, &server_nonce, &buf)?;
    write_json(
        s,
        &ServerProof {
            v: VERSION,
            proof: hex(&mine),
        },
    )
    .await
    .map_err(|e| format!("cannot send the server proof: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpStream;

    use crate::events::{EventBus, EventKind};

    const SECRET: &[u8] = b"api pool secret for tests";

    /// A toy handler: echoes the op, fails vm.protect of "big", panics on ext "panic".
    struct Toy {
        bus: EventBus,
    }

    impl Handler for Toy {
        fn handle(&self, req: Request) -> BoxFuture<'static, Response> {
            let recent = self.bus.recent(10);
            Box::pin(async move {
                match req.op {
                    Op::VmProtect { name, .. } if name == "big" => Response::error(
                        Some(req.id),
                        ApiError::new("plan_broken", "protecting big breaks the plan")
                            .with_hint("add capacity or lower host_failures_to_tolerate"),
                    ),
                    Op::Ext { name, .. } if name == "panic" => panic!("toy handler panics on purpose"),
                    Op::EventsRecent { .. } => Response::ok(req.id, serde_json::to_value(recent).unwrap()),
                    op => Response::ok(
                        req.id,
                        serde_json::json!({ "op": op.name(), "origin": format!("{:?}", req.origin) }),
                    ),
                }
            })
        }
        fn events(&self) -> broadcast::Receiver<Event> {
            self.bus.subscribe()
        }
    }

    fn toy() -> Arc<Toy> {
        Arc::new(Toy {
            bus: EventBus::new("a"),
        })
    }

    use crate::test_util::TempDir;

    fn my_uid() -> u32 {
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap()
    }

    async fn unix_server(h: Arc<Toy>, allowed: u32) -> (TempDir, PathBuf, tokio::task::JoinHandle<()>) {
        let dir = TempDir::new("api-test");
        let path = dir.0.join("controller.sock");
        let l = bind_unix(&path).unwrap();
        let t = tokio::spawn(serve_unix_for_uid(l, h, allowed));
        (dir, path, t)
    }

    async fn tcp_server(h: Arc<Toy>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, tokio::spawn(serve_tcp(l, SECRET.to_vec(), h)))
    }

    #[test]
    fn wire_shapes_match_the_documentation() {
        let r = Request::new(
            7,
            Op::VmProtect {
                name: "web".into(),
                level: 1,
            },
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"v":1,"id":7,"op":"vm.protect","name":"web","level":1}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::new(1, Op::PoolStatus)).unwrap(),
            r#"{"v":1,"id":1,"op":"pool.status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::ok(7, serde_json::json!({"a":1}))).unwrap(),
            r#"{"v":1,"id":7,"ok":{"a":1}}"#
        );
        let e = Response::error(None, ApiError::new("bad_request", "x").with_hint("y"));
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"id":null,"error":{"code":"bad_request","message":"x","hint":"y"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
        for name in Op::NAMES {
            let mut v =
                serde_json::json!({"v":1,"id":1,"op":name,"name":"g","level":1,"epoch":3,"config":{},"limit":5});
            if *name == "ext" {
                v["args"] = serde_json::json!([1]);
            }
            let req = parse_request(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(req.op.name(), *name);
            let again = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_request(again.as_bytes()).unwrap(), req);
        }
    }

    #[test]
    fn bad_lines_get_precise_errors() {
        let code = |l: &str| match parse_request(l.as_bytes()) {
            Err(Response {
                outcome: Outcome::Error(e),
                id,
                ..
            }) => (e.code, id),
            other => panic!("{l}: {other:?}"),
        };
        assert_eq!(code("not json"), (codes::BAD_REQUEST.into(), None));
        assert_eq!(code("[1,2]"), (codes::BAD_REQUEST.into(), None));
        assert_eq!(code(r#"{"v":1,"op":"plan"}"#), (codes::BAD_REQUEST.into(), None));
        assert_eq!(
            code(r#"{"v":1,"id":-1,"op":"plan"}"#),
            (codes::BAD_REQUEST.into(), None)
        );
        assert_eq!(code(r#"{"id":3,"op":"plan"}"#), (codes::BAD_REQUEST.into(), Some(3)));
        assert_eq!(
            code(r#"{"v":2,"id":3,"op":"plan"}"#),
            (codes::UNSUPPORTED_VERSION.into(), Some(3))
        );
        assert_eq!(
            code(r#"{"v":1,"id":3,"op":"vm.fly"}"#),
            (codes::UNKNOWN_OP.into(), Some(3))
        );
        assert_eq!(code(r#"{"v":1,"id":3,"op":7}"#), (codes::BAD_REQUEST.into(), Some(3)));
        assert_eq!(
            code(r#"{"v":1,"id":3,"op":"vm.protect","name":"x"}"#),
            (codes::BAD_REQUEST.into(), Some(3))
        );
        assert_eq!(
            code(r#"{"v":1,"id":3,"op":"vm.protect","name":"x","level":300}"#),
            (codes::BAD_REQUEST.into(), Some(3))
        );
        match parse_request(br#"{"v":1,"id":3,"op":"vm.protect","name":"x"}"#) {
            Err(Response {
                outcome: Outcome::Error(e),
                ..
            }) => assert!(e.message.contains("missing field `level`"), "{}", e.message),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn unix_round_trip_with_a_toy_handler() {
        let (_dir, path, server) = unix_server(toy(), my_uid()).await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut c = Client::connect_unix(&path).await.unwrap();
        let v = c.call(Op::PoolStatus).await.unwrap();
        assert_eq!(v["op"], "pool.status");
        assert!(v["origin"].as_str().unwrap().starts_with("Unix { uid"), "{v}");
        let v = c
            .call(Op::VmProtect {
                name: "web".into(),
                level: 1,
            })
            .await
            .unwrap();
        assert_eq!(v["op"], "vm.protect");
        let e = c
            .call(Op::VmProtect {
                name: "big".into(),
                level: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, "plan_broken");
        assert_eq!(
            e.hint.as_deref(),
            Some("add capacity or lower host_failures_to_tolerate")
        );
        assert_eq!(
            e.to_string(),
            "protecting big breaks the plan (plan_broken); hint: add capacity or lower host_failures_to_tolerate"
        );
        // A panicking handler: `internal`, and the connection survives.
        let e = c
            .call(Op::Ext {
                name: "panic".into(),
                args: Value::Null,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, codes::INTERNAL);
        assert_eq!(c.call(Op::Plan).await.unwrap()["op"], "plan");
        // A stale socket file is replaced on rebind; a regular file is not.
        server.abort();
        let _ = server.await;
        drop(c);
        let l = bind_unix(&path).unwrap();
        drop(l);
        let file = path.with_file_name("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_unix(&file).is_err());
        // Nobody listening: a clear error with a hint.
        let e = Client::connect_unix(&path.with_file_name("absent.sock"))
            .await
            .unwrap_err();
        assert_eq!(e.code, codes::UNREACHABLE);
        assert!(e.hint.unwrap().contains("is eac-controller running"));
    }

    #[tokio::test]
    async fn tcp_round_trip_with_challenge_response() {
        let (addr, _server) = tcp_server(toy()).await;
        let mut c = Client::connect_tcp(addr, SECRET).await.unwrap();
        let v = c.call(Op::HostList).await.unwrap();
        assert_eq!(v["op"], "host.list");
        assert!(v["origin"].as_str().unwrap().starts_with("Tcp"), "{v}");
        let v = c
            .call(Op::PoolPropose {
                epoch: 4,
                config: serde_json::json!({"guests": []}),
            })
            .await
            .unwrap();
        assert_eq!(v["op"], "pool.propose");
    }

    #[tokio::test]
    async fn tcp_with_the_wrong_secret_is_rejected_both_ways() {
        let (addr, _server) = tcp_server(toy()).await;
        let e = Client::connect_tcp(addr, b"some other pool secret").await.unwrap_err();
        assert_eq!(e.code, codes::UNAUTHENTICATED, "{e}");
        assert!(e.message.contains("wrong proof"), "{e}");
        // A raw client that skips the handshake and sends a request: refused, closed.
        let s = TcpStream::connect(addr).await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains("challenge"), "{line}");
        r.get_mut()
            .write_all(b"{\"v\":1,\"id\":1,\"op\":\"pool.status\"}\n")
            .await
            .unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains("unauthenticated"), "{line}");
        line.clear();
        assert_eq!(r.read_line(&mut line).await.unwrap(), 0, "connection closed");
        // A server that does not know the secret: the client refuses it.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let impostor = l.local_addr().unwrap();
        tokio::spawn(serve_tcp(l, b"the impostor's secret!!".to_vec(), toy()));
        // The impostor checks the client's proof first and refuses it; either way no request
        // is ever sent to it.
        let e = Client::connect_tcp(impostor, SECRET).await.unwrap_err();
        assert_eq!(e.code, codes::UNAUTHENTICATED);
    }

    #[tokio::test]
    async fn a_client_refuses_a_server_that_cannot_prove_the_secret() {
        // A fake server that answers any client proof with a made-up server proof.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            write_json(
                &mut s,
                &Challenge {
                    v: 1,
                    challenge: hex(&[7; 32]),
                },
            )
            .await
            .unwrap();
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            write_json(
                &mut s,
                &ServerProof {
                    v: 1,
                    proof: hex(&[9; 32]),
                },
            )
            .await
            .unwrap();
            let _ = s.read_line(&mut line).await;
        });
        let e = Client::connect_tcp(addr, SECRET).await.unwrap_err();
        assert_eq!(e.code, codes::UNAUTHENTICATED);
        assert!(e.message.contains("does not know this pool's secret"), "{e}");
    }

    #[tokio::test]
    async fn garbage_lines_get_bad_request_and_the_connection_still_works() {
        let (_dir, path, _server) = unix_server(toy(), my_uid()).await;
        let mut c = Client::connect_unix(&path).await.unwrap();
        for garbage in [
            &b"hello\n"[..],
            b"{\"v\":1,\n",
            b"\xff\xfe\x00\n",
            b"{\"v\":1,\"id\":5,\"op\":\"vm.protect\"}\n",
            b"{\"v\":9,\"id\":6,\"op\":\"plan\"}\n",
            b"{\"v\":1,\"id\":7,\"op\":\"teleport\"}\n",
            b"\n   \n",
        ] {
            c.send_raw(garbage).await.unwrap();
        }
        let mut codes_seen = Vec::new();
        for _ in 0..6 {
            let line = c.read_raw_line("test").await.unwrap();
            let r: Response = serde_json::from_slice(&line).unwrap();
            match r.outcome {
                Outcome::Error(e) => codes_seen.push((e.code, r.id)),
                Outcome::Ok(v) => panic!("garbage accepted: {v}"),
            }
        }
        assert_eq!(
            codes_seen,
            [
                (codes::BAD_REQUEST.to_string(), None),
                (codes::BAD_REQUEST.to_string(), None),
                (codes::BAD_REQUEST.to_string(), None),
                (codes::BAD_REQUEST.to_string(), Some(5)),
                (codes::UNSUPPORTED_VERSION.to_string(), Some(6)),
                (codes::UNKNOWN_OP.to_string(), Some(7)),
            ]
        );
        // Still usable.
        assert_eq!(c.call(Op::VmList).await.unwrap()["op"], "vm.list");
    }

    #[tokio::test]
    async fn an_oversized_line_closes_the_connection_with_the_reason() {
        let (addr, _server) = tcp_server(toy()).await;
        let mut c = Client::connect_tcp(addr, SECRET).await.unwrap();
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        // The server may close while we still write; that is fine.
        let _ = c.send_raw(&big).await;
        let line = c.read_raw_line("test").await.unwrap();
        let r: Response = serde_json::from_slice(&line).unwrap();
        match r.outcome {
            Outcome::Error(e) => {
                assert_eq!(e.code, codes::TOO_LARGE);
                assert!(e.message.contains("closing the connection"));
            }
            Outcome::Ok(v) => panic!("{v}"),
        }
        let e = c.call(Op::Plan).await.unwrap_err();
        assert_eq!(e.code, codes::PROTOCOL, "{e}");
        // A line exactly at the limit is read (and is then just bad JSON).
        let mut c = Client::connect_tcp(addr, SECRET).await.unwrap();
        let mut at = vec![b' '; MAX_LINE - 1];
        at.insert(0, b'x');
        at.push(b'\n');
        c.send_raw(&at).await.unwrap();
        let r: Response = serde_json::from_slice(&c.read_raw_line("test").await.unwrap()).unwrap();
        assert!(
            matches!(r.outcome, Outcome::Error(ref e) if e.code == codes::BAD_REQUEST),
            "{r:?}"
        );
        assert_eq!(c.call(Op::Plan).await.unwrap()["op"], "plan");
    }

    #[tokio::test]
    async fn a_peer_with_another_uid_is_refused() {
        // The server admits a uid that is not ours: we are the "wrong" peer. This runs as root
        // and as non-root alike; the test below does it with a real uid-65534 process.
        let me = my_uid();
        let (_dir, path, _server) = unix_server(toy(), me.wrapping_add(12345)).await;
        let mut c = Client::connect_unix(&path).await.unwrap();
        let e = c.call(Op::PoolStatus).await.unwrap_err();
        assert_eq!(e.code, codes::FORBIDDEN);
        assert!(e.message.contains(&format!("uid {me}")), "{e}");
        assert_eq!(e.hint.as_deref(), Some("run eac as root (e.g. with sudo)"));
    }

    #[tokio::test]
    async fn a_non_root_process_is_refused_by_the_root_only_socket() {
        let (dir, path, _server) = unix_server(toy(), 0).await;
        if my_uid() != 0 {
            // We are a non-root process: the real check applies to us directly.
            let e = match Client::connect_unix(&path).await {
                Err(e) => e,
                Ok(mut c) => c.call(Op::PoolStatus).await.unwrap_err(),
            };
            assert_eq!(e.code, codes::FORBIDDEN, "{e}");
            println!("not root: checked that this uid {} is refused", my_uid());
            return;
        }
        // As root: run a real client as uid 65534 (perl is part of Debian's essential set).
        let perl = Path::new("/usr/bin/perl");
        assert!(perl.exists(), "/usr/bin/perl is needed to run a client as another uid");
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = r#"use IO::Socket::UNIX; $SIG{PIPE} = "IGNORE"; my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or do { print "CONNECT-FAILED $!\n"; exit 0 }; print $s "{\"v\":1,\"id\":1,\"op\":\"pool.status\"}\n"; my $l = <$s>; print "GOT $l";"#;
        let run = |path: PathBuf| {
            use std::os::unix::process::CommandExt;
            let script = script.to_string();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("/usr/bin/perl")
                    .uid(65534)
                    .gid(65534)
                    .args(["-e", &script])
                    .arg(&path)
                    .output()
                    .unwrap()
            })
        };
        // As deployed (0600): the kernel refuses the connection itself.
        let out = run(path.clone()).await.unwrap();
        let so = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            so.starts_with("CONNECT-FAILED Permission denied"),
            "{so:?} {:?} {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // With the file mode opened up, SO_PEERCRED is the line of defence: refused, logged.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = run(path.clone()).await.unwrap();
        let so = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            so.starts_with("GOT "),
            "{so:?} {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Response = serde_json::from_str(so.trim_start_matches("GOT ").trim()).unwrap();
        match r.outcome {
            Outcome::Error(e) => {
                assert_eq!(e.code, codes::FORBIDDEN);
                assert!(e.message.contains("uid 65534"), "{}", e.message);
            }
            Outcome::Ok(v) => panic!("uid 65534 was served: {v}"),
        }
        // Root itself is still served.
        let mut c = Client::connect_unix(&path).await.unwrap();
        c.call(Op::PoolStatus).await.unwrap();
    }

    /// The slot accounting: unprivileged peers stop at `total - reserve`, a privileged one
    /// may take every slot, and a dropped slot is free again.
    #[test]
    fn slots_keep_a_reserve_for_the_privileged() {
        let s = Slots::new(4, 1);
        let a: Vec<Slot> = (0..3).map(|_| s.take(false).expect("general slot")).collect();
        assert_eq!(s.in_use(), 3);
        assert!(s.take(false).is_none(), "an unprivileged peer took the reserve");
        let root = s.take(true).expect("the reserve is root's");
        assert!(s.take(true).is_none(), "more than total");
        assert!(s.take(false).is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        // Root also uses general slots; an unprivileged peer gets a freed one.
        let mut b: Vec<Slot> = (0..2).map(|_| s.take(true).unwrap()).collect();
        assert_eq!(s.in_use(), 3);
        assert!(s.take(false).is_none());
        b.pop();
        let c = s.take(false).expect("a freed general slot");
        assert!(s.take(false).is_none());
        drop((root, b, c));
        assert_eq!(s.in_use(), 0);
        // A reserve as large as everything: only the privileged get in.
        let only_root = Slots::new(2, 5);
        assert!(only_root.take(false).is_none());
        assert!(only_root.take(true).is_some());
        // No reserve (the TCP endpoint): everyone alike.
        let tcp = Slots::new(1, 0);
        let _t = tcp.take(false).unwrap();
        assert!(tcp.take(true).is_none());
    }

    /// 300 refused connections from one source log one line; another source or another kind
    /// of rejection gets its own.
    #[test]
    fn rejections_are_logged_once_per_source_and_kind() {
        let r = Rejects::default();
        let t0 = std::time::Instant::now();
        let logged = (0..300)
            .filter(|i| r.warn_at(t0 + Duration::from_millis(*i), "busy", "10.0.0.9", || "busy".into()))
            .count();
        assert_eq!(logged, 1);
        assert!(r.warn_at(t0, "busy", "10.0.0.10", || "busy".into()));
        assert!(r.warn_at(t0, "handshake_timeout", "10.0.0.9", || "silent".into()));
        assert!(!r.warn_at(t0, "handshake_timeout", "10.0.0.9", || "silent".into()));
        assert!(r.warn_at(t0, "busy", "uid 65534", || "busy".into()));
        // Each kind of bad request line is its own key: an unknown op and a non-JSON line from
        // one source are both logged.
        for code in [codes::UNKNOWN_OP, codes::BAD_REQUEST, codes::UNSUPPORTED_VERSION] {
            assert!(r.warn_at(t0, rejection_kind(code), "uid 0", || code.into()), "{code}");
        }
        assert_eq!(rejection_kind("anything else"), codes::BAD_REQUEST);
        // The burst stopped: the next flush after the window reports what was suppressed, once.
        assert!(r.flush_at(t0 + Duration::from_secs(1)).is_empty());
        let mut lines = r.flush_at(t0 + r.every());
        lines.sort();
        assert_eq!(
            lines,
            [
                "1 more handshake_timeout from 10.0.0.9 in the last 10 s (not logged one by one)",
                "299 more busy from 10.0.0.9 in the last 10 s (not logged one by one)",
            ]
        );
        assert!(r.flush_at(t0 + r.every() * 2).is_empty());
    }

    /// Real sockets: a non-root uid (a uid-65534 perl process) fills every slot it may take
    /// with idle connections; root is still served from the reserve; the idle connections are
    /// closed after the idle timeout, and the uid is then served again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_of_another_uid_leave_roots_reserve_and_time_out() {
        if my_uid() != 0 {
            println!("not root: cannot run a client as uid 65534; the slot accounting is tested sans-I/O");
            return;
        }
        let dir = TempDir::new("api-test");
        let path = dir.0.join("controller.sock");
        let l = bind_unix(&path).unwrap();
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let idle = Duration::from_secs(3);
        let limits = UnixLimits {
            allowed_uid: 65534,
            admit_root: true,
            slots: 6,
            root_reserve: 2,
            idle,
        };
        let _server = tokio::spawn(serve_unix_with(l, toy(), limits));
        // 10 connections: 4 held (6 slots - 2 reserved), 6 answered `busy` at once.
        let script = r#"use IO::Socket::UNIX; use IO::Select; $| = 1; $SIG{PIPE} = "IGNORE";
my @s; for (1..10) { my $c = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!"; push @s, $c; }
select(undef, undef, undef, 0.3);
my ($busy, @held) = (0);
for my $c (@s) { if (IO::Select->new($c)->can_read(0.05)) { my $l = <$c>; if (defined $l && $l =~ /"busy"/) { $busy++ } else { print "UNEXPECTED ", ($l // "EOF"), "\n" } } else { push @held, $c } }
print "HELD ", scalar(@held), " BUSY $busy\n";
my $go = <STDIN>;
my $closed = 0; for my $c (@held) { if (IO::Select->new($c)->can_read(20)) { my $l = <$c>; $closed++ unless defined $l; } }
print "CLOSED $closed\n";
my $n = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!";
print $n "{\"v\":1,\"id\":1,\"op\":\"pool.status\"}\n"; my $l = <$n>; print "GOT $l";
"#;
        let mut child = tokio::process::Command::new("/usr/bin/perl")
            .uid(65534)
            .gid(65534)
            .args(["-e", script])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("perl");
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdin = child.stdin.take().unwrap();
        let line = out.next_line().await.unwrap().unwrap();
        assert_eq!(line, "HELD 4 BUSY 6");
        let held_at = tokio::time::Instant::now();
        // Root is served twice at once from the reserve; a third root connection is busy.
        let mut r1 = Client::connect_unix(&path).await.unwrap();
        r1.call(Op::PoolStatus).await.unwrap();
        let mut r2 = Client::connect_unix(&path).await.unwrap();
        r2.call(Op::PoolStatus).await.unwrap();
        let mut r3 = Client::connect_unix(&path).await.unwrap();
        assert_eq!(r3.call(Op::PoolStatus).await.unwrap_err().code, codes::BUSY);
        drop((r1, r2, r3));
        // With root's connections closed, root is served again (once the server saw them close).
        let mut served = false;
        for _ in 0..20 {
            let mut r4 = Client::connect_unix(&path).await.unwrap();
            if r4.call(Op::PoolStatus).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served, "root not served after closing its connections");
        stdin.write_all(b"go\n").await.unwrap();
        let line = out.next_line().await.unwrap().unwrap();
        assert_eq!(line, "CLOSED 4");
        let waited = held_at.elapsed();
        assert!(
            waited < idle + Duration::from_secs(2),
            "idle connections closed only after {waited:?}"
        );
        let line = out.next_line().await.unwrap().unwrap();
        assert!(line.starts_with("GOT ") && line.contains("\"ok\""), "{line}");
        child.wait().await.unwrap();
    }

    /// A TCP connection from 127.0.0.`last` (all of 127/8 is loopback).
    async fn connect_from(last: u8, to: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap();
        sock.connect(to).await.unwrap()
    }

    #[test]
    fn per_source_limits_count_and_forget() {
        let p = PerSource::new(2);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = p.take(a).unwrap();
        let a2 = p.take(a).unwrap();
        assert!(p.take(a).is_none(), "a third from the same source");
        let _b1 = p.take(b).expect("another source is not affected");
        drop(a1);
        let a3 = p.take(a).expect("a freed one");
        drop((a2, a3));
        assert_eq!(p.sources(), 1, "a source holding nothing is forgotten");
    }

    /// One address flooding the TCP endpoint with silent connections takes at most
    /// MAX_PER_SOURCE slots: another host is still served at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flooding_source_leaves_tcp_slots_for_the_others() {
        let (addr, _tcp) = tcp_server(toy()).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_PER_SOURCE {
            idle.push(connect_from(9, addr).await);
        }
        // The next one from that source is answered `busy` and closed.
        let mut extra = connect_from(9, addr).await;
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut got))
            .await
            .expect("closed")
            .unwrap();
        assert!(got.contains("\"busy\""), "{got}");
        assert!(got.contains("at most 16 connections from one address"), "{got}");
        // Another source (127.0.0.1) is served meanwhile.
        let mut c = Client::connect_tcp(addr, SECRET).await.unwrap();
        c.call(Op::PoolStatus).await.unwrap();
    }

    /// TCP clients that never authenticate take only the TCP endpoint's slots, for at most the
    /// handshake timeout: the unix socket serves root meanwhile, and TCP serves again after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unauthenticated_tcp_cannot_starve_the_unix_socket() {
        let h = toy();
        let (_dir, path, _unix) = unix_server(h.clone(), my_uid()).await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let handshake = Duration::from_millis(500);
        let _tcp = tokio::spawn(serve_tcp_with(l, SECRET.to_vec(), h, handshake, IDLE_TIMEOUT));
        // Silent clients from 127.0.0.2–5, each source at its own limit: every slot taken.
        let mut idle = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            idle.push(connect_from(2 + (i / MAX_PER_SOURCE) as u8, addr).await);
        }
        // Every TCP slot is held by a silent client: a real client is refused `busy` ...
        let e = Client::connect_tcp(addr, SECRET).await.unwrap_err();
        assert_eq!(e.code, codes::BUSY, "{e}");
        // ... but the unix socket serves.
        let mut c = Client::connect_unix(&path).await.unwrap();
        c.call(Op::PoolStatus).await.unwrap();
        // After the handshake timeout the silent clients are closed and TCP serves again.
        tokio::time::sleep(handshake + Duration::from_millis(300)).await;
        let mut c = Client::connect_tcp(addr, SECRET).await.unwrap();
        c.call(Op::PoolStatus).await.unwrap();
        for mut s in idle {
            let mut b = [0u8; 1];
            // The server sent its challenge, then closed: EOF after the challenge line.
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => seen.push(b[0]),
                    other => panic!("silent client not closed: {other:?}"),
                }
            }
            assert!(String::from_utf8_lossy(&seen).contains("challenge"));
        }
    }

    /// An authenticated or unix connection without a request for the idle timeout is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_unix_connection_is_closed() {
        let dir = TempDir::new("api-test");
        let path = dir.0.join("controller.sock");
        let l = bind_unix(&path).unwrap();
        let limits = UnixLimits {
            allowed_uid: my_uid(),
            idle: Duration::from_millis(300),
            ..UnixLimits::default()
        };
        let _server = tokio::spawn(serve_unix_with(l, toy(), limits));
        let mut c = Client::connect_unix(&path).await.unwrap();
        c.call(Op::PoolStatus).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let e = c.call(Op::PoolStatus).await.unwrap_err();
        assert_eq!(e.code, codes::PROTOCOL, "{e}");
    }

    #[tokio::test]
    async fn events_follow_streams_emitted_events() {
        let h = toy();
        let (addr, _server) = tcp_server(h.clone()).await;
        let (_dir, path, _userver) = unix_server(h.clone(), my_uid()).await;
        h.bus.emit(EventKind::Started, None, None, "before anyone follows");
        let mut recent = Client::connect_unix(&path).await.unwrap();
        let r = recent.call(Op::EventsRecent { limit: Some(5) }).await.unwrap();
        assert_eq!(r[0]["kind"], "started");
        let tcp = Client::connect_tcp(addr, SECRET).await.unwrap();
        let mut s1 = Box::pin(tcp.follow_events().await.unwrap());
        let unix = Client::connect_unix(&path).await.unwrap();
        let mut s2 = Box::pin(unix.follow_events().await.unwrap());
        let sent = [
            h.bus
                .emit(EventKind::ChannelDown, None, Some("b"), "al1 silent for 1.0 s"),
            h.bus.emit(
                EventKind::GuestRestarted,
                Some("web"),
                Some("b"),
                "restarted after b died",
            ),
        ];
        for s in [&mut s1, &mut s2] {
            for want in &sent {
                let got = tokio::time::timeout(Duration::from_secs(5), s.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!(&got, want);
            }
        }
        // The server notices a follower that went away (no leak, no error).
        drop(s2);
        h.bus.emit(EventKind::PlanOk, None, None, "after a follower left");
        let got = tokio::time::timeout(Duration::from_secs(5), s1.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.kind, EventKind::PlanOk);
    }

    #[tokio::test]
    async fn a_lagging_follower_is_told_how_many_events_it_missed() {
        let h = toy();
        let (_dir, path, _server) = unix_server(h.clone(), my_uid()).await;
        let c = Client::connect_unix(&path).await.unwrap();
        let mut s = Box::pin(c.follow_events().await.unwrap());
        // This test runs on a single-threaded runtime: the server cannot run while we emit, so
        // the broadcast channel (1024 events) overflows by exactly 5000 - 1024.
        for i in 0..5000 {
            h.bus
                .emit(EventKind::GuestStarted, Some(&format!("g{i}")), None, "flood");
        }
        let first = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap();
        let e = first.unwrap_err();
        assert_eq!(e.code, codes::LAGGED, "{e}");
        assert!(e.message.starts_with("3976 events were missed"), "{e}");
        let mut events = Vec::new();
        while events.len() < 1024 {
            let ev = tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            events.push(ev);
        }
        assert_eq!(events[0].guest.as_deref(), Some("g3976"));
        assert_eq!(events[1023].guest.as_deref(), Some("g4999"));
    }
}
