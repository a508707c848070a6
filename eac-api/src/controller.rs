//! The controller's API (client side and wire types; the server is in `eac-controller`): versioned JSON lines over a root-only unix socket (for `eac` on the
//! host) and over TCP with a pool-secret challenge–response (for `eac` elsewhere and for
//! peer controllers).
//!
//! # Framing
//! One JSON object per line (`\n`), UTF-8, at most [`MAX_LINE`] bytes. Requests and responses
//! carry `"v": 1` ([`VERSION`]).
//!
//! ```text
//! → {"v":1,"id":7,"op":"vm.protect","name":"web","level":1}
//! ← {"v":1,"id":7,"ok":{...}}
//! ← {"v":1,"id":7,"error":{"code":"plan_broken","message":"...","hint":"..."}}
//! ```
//!
//! The server answers requests of one connection in order. A line that is not JSON, not an
//! object, lacks `id`, or has bad fields gets `bad_request` (with `"id": null` when the id
//! could not be read) and the connection stays usable; another `v` gets
//! `unsupported_version`; an unknown `op` gets `unknown_op`. A line over [`MAX_LINE`] gets
//! `too_large` and the connection is closed (the stream cannot be resynchronised cheaply).
//!
//! `events.follow` turns the connection into an event stream: after its `ok` the server sends
//! `{"v":1,"event":{...}}` lines (and `{"v":1,"lagged":N}` when the follower fell N events
//! behind) until the client closes it.
//!
//! # Unix socket
//! Created with mode 0600; every accepted peer's credentials (`SO_PEERCRED`) are checked and a
//! peer whose uid is not root is answered `forbidden`, logged and disconnected.
//!
//! # TCP authentication (before any request)
//! ```text
//! ← {"v":1,"challenge":"<64 hex: server nonce, 32 random bytes>"}
//! → {"v":1,"client_nonce":"<64 hex: 32 random bytes>","proof":"<64 hex>"}
//!      proof = HMAC-SHA256(pool secret, "eac-api-v1" || server nonce || client nonce)
//! ← {"v":1,"proof":"<64 hex>"}
//!      proof = HMAC-SHA256(pool secret, "eac-api-v1 server" || server nonce || client nonce)
//!    or {"v":1,"id":null,"error":{"code":"unauthenticated",...}} and the connection is closed.
//! ```
//! The client checks the server's proof, so it never sends requests to an impostor. The
//! handshake must complete within [`HANDSHAKE_TIMEOUT`]. Known limit: after the handshake the
//! lines are neither encrypted nor individually authenticated (someone able to inject into
//! the TCP stream could alter requests): use the TCP endpoint on the management network only.

use std::{fmt, io::Read, net::SocketAddr, path::Path, time::Duration};

use futures::Stream;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpStream, UnixStream},
};

pub mod events;
pub mod view;

use events::Event;

/// The API version this build speaks.
pub const VERSION: u32 = 1;
/// The longest line a server accepts (1 MiB).
pub const MAX_LINE: usize = 1 << 20;
/// The longest line a client accepts (responses can be large: 16 MiB).
pub const MAX_RESPONSE_LINE: usize = 16 << 20;
/// Time allowed for the TCP handshake: an unauthenticated connection holds a slot at most this
/// long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection that sends no complete request line for this long is closed (an
/// `events.follow` stream is not idle: it is never closed for this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once per listener; more are answered `busy` and closed. The unix
/// socket and the TCP endpoint each have their own slots, so TCP clients cannot take the
/// unix socket's.
pub const MAX_CONNECTIONS: usize = 64;
/// Of the unix socket's [`MAX_CONNECTIONS`], slots only root (uid 0 by `SO_PEERCRED`) may take.
pub const ROOT_RESERVE: usize = 8;
/// Of the TCP endpoint's [`MAX_CONNECTIONS`], the most one source address may hold, so one
/// flooding address leaves room for the other hosts of the pool.
pub const MAX_PER_SOURCE: usize = 16;
/// The label of the client's proof.
pub const CLIENT_LABEL: &[u8] = b"eac-api-v1";
/// The label of the server's proof.
pub const SERVER_LABEL: &[u8] = b"eac-api-v1 server";

pub type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Error codes (`error.code`). Handlers may use others; these are the transport's own and the
/// common ones.
pub mod codes {
    /// The line is not a valid request (JSON, fields); the connection stays usable.
    pub const BAD_REQUEST: &str = "bad_request";
    /// `v` is not a version this server speaks.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// `op` is not an operation this server knows.
    pub const UNKNOWN_OP: &str = "unknown_op";
    /// A line exceeded the size limit; the connection is closed.
    pub const TOO_LARGE: &str = "too_large";
    /// Unix-socket peer is not root.
    pub const FORBIDDEN: &str = "forbidden";
    /// TCP handshake failed (wrong pool secret, or not an eac client/server).
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    /// The server is at its connection limit.
    pub const BUSY: &str = "busy";
    /// The handler failed unexpectedly.
    pub const INTERNAL: &str = "internal";
    /// Client side: the controller could not be reached.
    pub const UNREACHABLE: &str = "unreachable";
    /// Client side: the connection broke or the server answered something unexpected.
    pub const PROTOCOL: &str = "protocol";
    /// Client side (event stream): events were missed.
    pub const LAGGED: &str = "lagged";
}

/// An operation. On the wire its name is the `op` field and its fields sit beside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Op {
    /// The pool: members, membership state, redundancy, plan summary.
    #[serde(rename = "pool.status")]
    PoolStatus,
    /// Hosts with their state and capacity.
    #[serde(rename = "host.list")]
    HostList,
    /// Guests per host, with level, state and health.
    #[serde(rename = "vm.list")]
    VmList,
    /// Protect a guest at a level (admission control may refuse).
    #[serde(rename = "vm.protect")]
    VmProtect { name: String, level: u8 },
    /// Remove a guest's protection.
    #[serde(rename = "vm.unprotect")]
    VmUnprotect { name: String },
    /// The failover plan.
    #[serde(rename = "plan")]
    Plan,
    /// Turn the connection into an event stream (handled by the server itself).
    #[serde(rename = "events.follow")]
    EventsFollow,
    /// The last `limit` events (default: all kept).
    #[serde(rename = "events.recent")]
    EventsRecent {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Peer to peer: the current pool configuration (JSON) and its epoch.
    #[serde(rename = "pool.get")]
    PoolGet,
    /// Peer to peer: propose pool configuration `config` as `epoch` (phase 1).
    #[serde(rename = "pool.propose")]
    PoolPropose { epoch: u64, config: Value },
    /// Peer to peer: apply the proposal of `epoch` (phase 2).
    #[serde(rename = "pool.commit")]
    PoolCommit { epoch: u64 },
    /// Peer to peer: drop the proposal of `epoch`.
    #[serde(rename = "pool.abort")]
    PoolAbort { epoch: u64 },
    /// An operation without a typed variant yet (extensions; no protocol bump needed).
    #[serde(rename = "ext")]
    Ext {
        name: String,
        #[serde(default)]
        args: Value,
    },
}

impl Op {
    /// Every operation name this build knows.
    pub const NAMES: &'static [&'static str] = &[
        "pool.status",
        "host.list",
        "vm.list",
        "vm.protect",
        "vm.unprotect",
        "plan",
        "events.follow",
        "events.recent",
        "pool.get",
        "pool.propose",
        "pool.commit",
        "pool.abort",
        "ext",
    ];

    /// The operation's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Op::PoolStatus => "pool.status",
            Op::HostList => "host.list",
            Op::VmList => "vm.list",
            Op::VmProtect { .. } => "vm.protect",
            Op::VmUnprotect { .. } => "vm.unprotect",
            Op::Plan => "plan",
            Op::EventsFollow => "events.follow",
            Op::EventsRecent { .. } => "events.recent",
            Op::PoolGet => "pool.get",
            Op::PoolPropose { .. } => "pool.propose",
            Op::PoolCommit { .. } => "pool.commit",
            Op::PoolAbort { .. } => "pool.abort",
            Op::Ext { .. } => "ext",
        }
    }
}

/// Who sent a request (not on the wire; set by the server).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// A local process on the unix socket.
    Unix { uid: u32, pid: Option<i32> },
    /// An authenticated TCP client (an operator's `eac` or a peer controller).
    Tcp { peer: SocketAddr },
    /// Not set (a request built in code).
    #[default]
    Unknown,
}

/// A request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
    #[serde(skip)]
    pub origin: Origin,
}

impl Request {
    pub fn new(id: u64, op: Op) -> Self {
        Self {
            v: VERSION,
            id,
            op,
            origin: Origin::Unknown,
        }
    }
}

/// An error as the API reports it: a stable `code`, a `message` for the operator, and a
/// `hint` saying what to do. Client-side failures (unreachable, broken connection) use the same
/// type, with the underlying error as `source()`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip)]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ApiError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

impl PartialEq for ApiError {
    fn eq(&self, o: &Self) -> bool {
        self.code == o.code && self.message == o.message && self.hint == o.hint
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// The outcome of a request.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    #[serde(rename = "ok")]
    Ok(Value),
    #[serde(rename = "error")]
    Error(ApiError),
}

/// A response.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    /// The request's id; `null` when it could not be read.
    pub id: Option<u64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Response {
    pub fn ok(id: u64, value: Value) -> Self {
        Self {
            v: VERSION,
            id: Some(id),
            outcome: Outcome::Ok(value),
        }
    }

    pub fn error(id: Option<u64>, error: ApiError) -> Self {
        Self {
            v: VERSION,
            id,
            outcome: Outcome::Error(error),
        }
    }
}

/// Framing and handshake pieces shared by the client (here) and the server (the controller).
pub mod wire {
    use super::*;

    /// Lines the server sends on an event stream.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum StreamLine {
        Event { v: u32, event: Event },
        Lagged { v: u32, lagged: u64 },
    }

    #[derive(Serialize, Deserialize)]
    pub struct Challenge {
        pub v: u32,
        pub challenge: String,
    }

    #[derive(Serialize, Deserialize)]
    pub struct ClientProof {
        pub v: u32,
        pub client_nonce: String,
        pub proof: String,
    }

    #[derive(Serialize, Deserialize)]
    pub struct ServerProof {
        pub v: u32,
        pub proof: String,
    }

    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn unhex32(s: &str) -> Option<[u8; 32]> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    pub fn nonce() -> std::io::Result<[u8; 32]> {
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(b)
    }

    pub fn proof_mac(secret: &[u8], label: &[u8], server: &[u8; 32], client: &[u8; 32]) -> HmacSha256 {
        // HMAC accepts keys of any length; an empty secret is refused before this is reached.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(label);
        m.update(server);
        m.update(client);
        m
    }

    /// How a line read ended.
    #[derive(Debug, PartialEq, Eq)]
    pub enum LineRead {
        /// A line (without its `\n`) is in the buffer.
        Complete,
        /// End of stream (a partial last line is dropped).
        Eof,
        /// The line exceeded the limit (its bytes were consumed).
        TooLong,
    }

    /// Reads one line of at most `limit` bytes into `buf` without ever buffering more.
    pub async fn read_line<R: AsyncBufRead + Unpin>(
        r: &mut R,
        buf: &mut Vec<u8>,
        limit: usize,
    ) -> std::io::Result<LineRead> {
        buf.clear();
        loop {
            let avail = r.fill_buf().await?;
            if avail.is_empty() {
                return Ok(LineRead::Eof);
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let too_long = buf.len() + i > limit;
                    if !too_long {
                        buf.extend_from_slice(&avail[..i]);
                    }
                    r.consume(i + 1);
                    return Ok(if too_long {
                        LineRead::TooLong
                    } else {
                        LineRead::Complete
                    });
                }
                None => {
                    let n = avail.len();
                    if buf.len() + n > limit {
                        r.consume(n);
                        return Ok(LineRead::TooLong);
                    }
                    buf.extend_from_slice(avail);
                    r.consume(n);
                }
            }
        }
    }

    pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> std::io::Result<()> {
        let mut s = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        s.push(b'\n');
        w.write_all(&s).await?;
        w.flush().await
    }
}

use wire::*;

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A connection to a controller's API.
pub struct Client {
    stream: BufReader<Box<dyn Conn>>,
    next_id: u64,
    peer: String,
    buf: Vec<u8>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("peer", &self.peer).finish()
    }
}

fn broken(peer: &str, what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(
        codes::PROTOCOL,
        format!("connection to the controller at {peer} broke while {what}"),
    )
    .with_hint("check the controller's log; it may have restarted")
    .with_source(e)
}

impl Client {
    /// Connects to the local controller's unix socket.
    pub async fn connect_unix(path: &Path) -> Result<Self, ApiError> {
        let s = UnixStream::connect(path).await.map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => "run eac as root (the socket is root-only)".to_string(),
                _ => format!(
                    "is eac-controller running on this host? (socket {}; see `api_socket` in its configuration)",
                    path.display()
                ),
            };
            ApiError::new(
                codes::UNREACHABLE,
                format!("cannot connect to the controller at {}", path.display()),
            )
            .with_hint(hint)
            .with_source(e)
        })?;
        Ok(Self {
            stream: BufReader::new(Box::new(s)),
            next_id: 1,
            peer: path.display().to_string(),
            buf: Vec::new(),
        })
    }

    /// Connects to a controller's TCP endpoint and authenticates both ways with the pool secret.
    pub async fn connect_tcp(addr: SocketAddr, secret: &[u8]) -> Result<Self, ApiError> {
        let peer = addr.to_string();
        if secret.is_empty() {
            return Err(ApiError::new(codes::UNAUTHENTICATED, "the pool secret is empty"));
        }
        let s = TcpStream::connect(addr).await.map_err(|e| {
            ApiError::new(
                codes::UNREACHABLE,
                format!("cannot connect to the controller at {addr}"),
            )
            .with_hint("is the host up and `api_listen` set in its configuration?")
            .with_source(e)
        })?;
        let mut c = Self {
            stream: BufReader::new(Box::new(s)),
            next_id: 1,
            peer,
            buf: Vec::new(),
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, c.client_handshake(secret))
            .await
            .map_err(|_| {
                ApiError::new(
                    codes::UNREACHABLE,
                    format!("no handshake from {addr} within {HANDSHAKE_TIMEOUT:?}"),
                )
                .with_hint("is this the controller's api_listen address?")
            })??;
        Ok(c)
    }

    async fn client_handshake(&mut self, secret: &[u8]) -> Result<(), ApiError> {
        let challenge: Challenge = self.read_handshake_line("reading the challenge").await?;
        let server_nonce = unhex32(&challenge.challenge)
            .ok_or_else(|| ApiError::new(codes::PROTOCOL, "the server's challenge is not 64 hex digits"))?;
        let client_nonce = nonce()
            .map_err(|e| ApiError::new(codes::PROTOCOL, "cannot read random bytes for the handshake").with_source(e))?;
        let proof = proof_mac(secret, CLIENT_LABEL, &server_nonce, &client_nonce)
            .finalize()
            .into_bytes();
        write_json(
            &mut self.stream,
            &ClientProof {
                v: VERSION,
                client_nonce: hex(&client_nonce),
                proof: hex(&proof),
            },
        )
        .await
        .map_err(|e| broken(&self.peer, "authenticating", e))?;
        let answer: ServerProof = self.read_handshake_line("authenticating").await?;
        let theirs = unhex32(&answer.proof)
            .ok_or_else(|| ApiError::new(codes::PROTOCOL, "the server's proof is not 64 hex digits"))?;
        proof_mac(secret, SERVER_LABEL, &server_nonce, &client_nonce)
            .verify_slice(&theirs)
            .map_err(|_| {
                ApiError::new(
                    codes::UNAUTHENTICATED,
                    format!("the server at {} does not know this pool's secret", self.peer),
                )
                .with_hint("check the address: it is not a controller of this pool")
            })
    }

    /// Reads a handshake line: `T`, or the server's error response.
    async fn read_handshake_line<T: serde::de::DeserializeOwned>(&mut self, what: &str) -> Result<T, ApiError> {
        let line = self.read_raw_line(what).await?;
        if let Ok(t) = serde_json::from_slice::<T>(&line) {
            return Ok(t);
        }
        match serde_json::from_slice::<Response>(&line) {
            Ok(Response {
                outcome: Outcome::Error(e),
                ..
            }) => Err(e),
            _ => Err(ApiError::new(
                codes::PROTOCOL,
                format!("unexpected answer from {} while {what}", self.peer),
            )
            .with_hint("is this the controller's API address?")),
        }
    }

    /// Reads one raw line (also for tests of the server's output).
    #[doc(hidden)]
    pub async fn read_raw_line(&mut self, what: &str) -> Result<Vec<u8>, ApiError> {
        self.read_line_or_eof(what).await?.ok_or_else(|| {
            ApiError::new(
                codes::PROTOCOL,
                format!("the controller at {} closed the connection while {what}", self.peer),
            )
            .with_hint("check the controller's log")
        })
    }

    /// A line, or `None` at the end of the stream.
    async fn read_line_or_eof(&mut self, what: &str) -> Result<Option<Vec<u8>>, ApiError> {
        match read_line(&mut self.stream, &mut self.buf, MAX_RESPONSE_LINE).await {
            Ok(LineRead::Complete) => Ok(Some(std::mem::take(&mut self.buf))),
            Ok(LineRead::Eof) => Ok(None),
            Ok(LineRead::TooLong) => Err(ApiError::new(
                codes::PROTOCOL,
                format!("a line from {} exceeds {MAX_RESPONSE_LINE} bytes", self.peer),
            )),
            Err(e) => Err(broken(&self.peer, what, e)),
        }
    }

    /// Sends `op` and waits for its response: the `ok` value, or the error the controller
    /// returned (with its hint).
    pub async fn call(&mut self, op: Op) -> Result<Value, ApiError> {
        let id = match self.send(op).await {
            Ok(id) => id,
            Err(e) => {
                // The server may have refused the connection (forbidden, busy, too_large) and
                // closed it: its reason is still there to read, and more useful than EPIPE.
                if let Ok(Some(line)) = self.read_line_or_eof("reading the refusal").await
                    && let Ok(Response {
                        outcome: Outcome::Error(refusal),
                        ..
                    }) = serde_json::from_slice::<Response>(&line)
                {
                    return Err(refusal);
                }
                return Err(e);
            }
        };
        loop {
            let line = self.read_raw_line("waiting for the response").await?;
            let resp: Response = serde_json::from_slice(&line).map_err(|e| {
                ApiError::new(
                    codes::PROTOCOL,
                    format!("the controller at {} sent an unreadable response", self.peer),
                )
                .with_source(e)
            })?;
            match resp.id {
                Some(x) if x == id => {}
                // An error the server could not attribute (e.g. too_large, forbidden): ours.
                None => {}
                Some(_) => continue,
            }
            return match resp.outcome {
                Outcome::Ok(v) => Ok(v),
                Outcome::Error(e) => Err(e),
            };
        }
    }

    async fn send(&mut self, op: Op) -> Result<u64, ApiError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request::new(id, op);
        write_json(&mut self.stream, &req)
            .await
            .map_err(|e| broken(&self.peer, "sending a request", e))?;
        Ok(id)
    }

    /// Sends a raw line (tests of the server's input handling).
    #[doc(hidden)]
    pub async fn send_raw(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(line).await?;
        self.stream.flush().await
    }

    /// Turns the connection into the controller's event stream. Each item is an event, or an
    /// error: `lagged` (events were missed; the stream goes on) or a broken connection (the
    /// stream then ends).
    pub async fn follow_events(mut self) -> Result<impl Stream<Item = Result<Event, ApiError>>, ApiError> {
        self.call(Op::EventsFollow).await?;
        Ok(futures::stream::unfold(Some(self), |state| async move {
            let mut c = state?;
            match c.read_line_or_eof("following events").await {
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
                Ok(Some(line)) => {
                    let item = match serde_json::from_slice::<StreamLine>(&line) {
                        Ok(StreamLine::Event { event, .. }) => Ok(event),
                        Ok(StreamLine::Lagged { lagged, .. }) => Err(ApiError::new(
                            codes::LAGGED,
                            format!("{lagged} events were missed (this follower was too slow)"),
                        )
                        .with_hint("`eac events` shows the recent history")),
                        Err(e) => Err(ApiError::new(codes::PROTOCOL, "unreadable event line").with_source(e)),
                    };
                    Some((item, Some(c)))
                }
            }
        }))
    }
}
