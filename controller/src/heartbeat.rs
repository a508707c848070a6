//! Controller heartbeats: the UDP protocol by which controllers tell each other, on every
//! heartbeat network, that they are alive and what they see.
//!
//! Each host binds one [`HeartbeatSocket`] per configured network and sends a heartbeat every
//! `heartbeat_interval` to each peer's address on that network. Every datagram is versioned
//! and authenticated with the pool secret; nothing in it is trusted, or even decoded, before
//! its source address and authentication code are checked. The format follows the netpair
//! pairing protocol (`netpair/src/proto.rs`).
//!
//! # Wire format (version 1)
//!
//! All integers are big-endian.
//!
//! ```text
//! offset  size  field
//!      0     4  magic        "EACH" (45 41 43 48)
//!      4     2  version      u16, 1 (VERSION)
//!      6     2  body_len     u16, N: length of the body that follows the header
//!      8     8  session      u64, random, chosen by the sending socket when it is bound
//!     16     8  seq          u64, 1 for the first datagram of a session, +1 per datagram
//!     24     N  body         bincode 2 (serde; big-endian, fixed-width integers) of the body
//! 24 + N    32  mac          HMAC-SHA256(pool secret, bytes 0 .. 24 + N)
//! ```
//!
//! A datagram is at most 8192 bytes ([`MAX_DATAGRAM`]). The body, field after field:
//!
//! ```text
//! host          u64 length + UTF-8 (1..=64 bytes)   the sender
//! incarnation   u64                                 the sender's incarnation (bumped per start)
//! network       u64 length + UTF-8 (1..=64 bytes)   the network it was sent on
//! sees          u64 count (≤ 64), count × (u64 length + UTF-8 ≤ 64 bytes)
//!                                                   peers the sender currently hears
//! fencing       u8 (0|1)                            the sender is isolated and fencing itself
//! config_epoch  u64                                 the sender's pool configuration epoch
//! api_addr      u8 (0 = none | 1 = some), then u64 length + UTF-8 (≤ 128 bytes)
//!                                                   the sender's TCP API endpoint, if any
//! ```
//!
//! A change an old receiver cannot decode bumps `version`; a receiver refuses versions it does
//! not speak (naming both).
//!
//! # What a receiver checks, in order
//!
//! 1. size ≤ 8192, else [`RejectReason::TooLarge`];
//! 2. the source address is a configured peer address on this network, else
//!    [`RejectReason::UnknownSource`] (nothing of the datagram is read);
//! 3. magic ([`RejectReason::BadMagic`]), version ([`RejectReason::UnsupportedVersion`]),
//!    `24 + body_len + 32` = size ([`RejectReason::Malformed`]);
//! 4. the HMAC, in constant time, else [`RejectReason::BadMac`] (wrong pool secret or tampered);
//! 5. the body decodes (bincode with an 8 KiB limit; counts and lengths checked before
//!    anything is allocated) and fills the datagram exactly, else [`RejectReason::Malformed`];
//! 6. the body's `network` is this socket's network, else [`RejectReason::WrongNetwork`] (a
//!    datagram recorded on one network cannot be replayed onto another);
//! 7. `host` is not this host ([`RejectReason::Reflected`]), is a configured peer
//!    ([`RejectReason::UnknownPeer`]), and the source address is that peer's address on this
//!    network ([`RejectReason::WrongSource`]);
//! 8. freshness, per (peer, network): same session and `seq` not above the last accepted one is
//!    [`RejectReason::Replayed`] (equal) or [`RejectReason::Stale`] (older). A new session means
//!    the peer's socket was re-created (it restarted): accepted and logged, and the old session
//!    is retired — its datagrams are refused from then on ([`RejectReason::RetiredSession`]).
//!
//! Every rejected datagram is logged at `warn` with its source and reason, rate-limited per
//! (reason, source address) to one line per 10 s with a count of the suppressed ones
//! (`eac_common::ratelimit`; at most 1024 pairs are tracked, the rest share one line).
//!
//! Known limit (as in netpair): freshness lives in memory, so after *this* daemon restarts one
//! recorded heartbeat of a peer's previous session could be accepted once, until the peer's
//! next genuine heartbeat retires that session. A replayed heartbeat can make a dead peer look
//! alive for at most one `channel_timeout`, not longer: the replay cannot be repeated.

use std::{
    fmt,
    io::Read,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use hmac::KeyInit;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::{net::UdpSocket, time::Instant};

use crate::config::{Config, MAX_NAME_LEN};

/// "EACH": an eac controller heartbeat.
pub const MAGIC: [u8; 4] = *b"EACH";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8192;
/// Fixed header: magic, version, body_len, session, seq.
pub const HEADER_LEN: usize = 24;
/// HMAC-SHA256 tag length.
pub const MAC_LEN: usize = 32;
/// The most peer names in `sees`.
pub const MAX_SEES: usize = 64;
/// The longest `api_addr`, in bytes.
pub const MAX_API_ADDR_LEN: usize = 128;
/// How many retired sessions per peer are remembered (and refused).
const RETIRED_SESSIONS: usize = 16;
/// One log line per (reason, source) per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);

use eac_common::sealed::{self, Accepted, EnvelopeError, HmacSha256, Opened, Refused, Sessions};

/// The heartbeat protocol's envelope.
const ENVELOPE: sealed::Envelope = sealed::Envelope {
    magic: MAGIC,
    version: VERSION,
};

const BINCODE: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_DATAGRAM>,
> = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_DATAGRAM>();

/// One heartbeat, as sent and as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's host name.
    pub host: String,
    /// The sender's incarnation: a number it increases every time it starts.
    pub incarnation: u64,
    /// The datagram's sequence number in its session. Set by [`HeartbeatSocket::send`].
    pub seq: u64,
    /// The network it was sent on. Set by [`HeartbeatSocket::send`].
    pub network: String,
    /// The peers the sender currently hears (on any channel), ≤ 64 names of ≤ 64 bytes.
    pub sees: Vec<String>,
    /// The sender is isolated and fencing itself.
    pub fencing: bool,
    /// The epoch of the sender's pool configuration.
    pub config_epoch: u64,
    /// The sender's TCP API endpoint (`IP:port`), if it has one.
    pub api_addr: Option<String>,
}

/// The encoded body (everything but `seq`, which the header carries).
#[derive(Serialize)]
struct BodyRef<'a> {
    host: &'a str,
    incarnation: u64,
    network: &'a str,
    sees: &'a [String],
    fencing: bool,
    config_epoch: u64,
    api_addr: Option<&'a str>,
}

#[derive(Deserialize)]
struct Body {
    host: String,
    incarnation: u64,
    network: String,
    #[serde(deserialize_with = "bounded_names")]
    sees: Vec<String>,
    fencing: bool,
    config_epoch: u64,
    api_addr: Option<String>,
}

/// Decodes `sees`, refusing more than [`MAX_SEES`] names before allocating for them.
fn bounded_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    eac_common::bounded::bounded_vec(d, MAX_SEES, "names in sees")
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    #[error("datagram of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("no peer is configured at this source address on network {network}")]
    UnknownSource { network: String },
    #[error("not a heartbeat (bad magic {got:02x?})")]
    BadMagic { got: Vec<u8> },
    #[error("unsupported heartbeat protocol version {got} (this build speaks version {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("malformed datagram: {0}")]
    Malformed(String),
    #[error("authentication failed: wrong pool secret or tampered datagram")]
    BadMac,
    #[error("heartbeat of network {claimed} arrived on network {ours} (replayed across networks?)")]
    WrongNetwork { claimed: String, ours: String },
    #[error("heartbeat claims to come from this host ({host}): reflected back to us")]
    Reflected { host: String },
    #[error("heartbeat from {host}, which is not a configured peer")]
    UnknownPeer { host: String },
    #[error("heartbeat from {host} came from the wrong address (configured: {expected})")]
    WrongSource { host: String, expected: SocketAddr },
    #[error("replayed heartbeat from {host}: session {session:016x} seq {seq} already accepted")]
    Replayed { host: String, session: u64, seq: u64 },
    #[error("stale heartbeat from {host}: session {session:016x} seq {seq} is older than the last accepted seq {last}")]
    Stale {
        host: String,
        session: u64,
        seq: u64,
        last: u64,
    },
    #[error("heartbeat from {host} belongs to its retired session {session:016x} (replayed from before a restart)")]
    RetiredSession { host: String, session: u64 },
}

impl RejectReason {
    /// A short stable name of the reason (log field, rate-limit key).
    pub fn kind(&self) -> &'static str {
        match self {
            RejectReason::TooLarge { .. } => "too_large",
            RejectReason::UnknownSource { .. } => "unknown_source",
            RejectReason::BadMagic { .. } => "bad_magic",
            RejectReason::UnsupportedVersion { .. } => "unsupported_version",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::BadMac => "bad_mac",
            RejectReason::WrongNetwork { .. } => "wrong_network",
            RejectReason::Reflected { .. } => "reflected",
            RejectReason::UnknownPeer { .. } => "unknown_peer",
            RejectReason::WrongSource { .. } => "wrong_source",
            RejectReason::Replayed { .. } => "replayed",
            RejectReason::Stale { .. } => "stale",
            RejectReason::RetiredSession { .. } => "retired_session",
        }
    }
}

/// A datagram that was refused, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat from {from} rejected: {reason}")]
pub struct Rejected {
    pub reason: RejectReason,
    pub from: SocketAddr,
}

/// Errors setting up or sending heartbeats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeartbeatError {
    #[error("bad heartbeat configuration: {0}")]
    Config(String),
    #[error("cannot bind the heartbeat socket of network {network} to {addr}")]
    Bind {
        network: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send a heartbeat on network {network} to {to}")]
    Send {
        network: String,
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("heartbeat cannot be sent: {0}")]
    Invalid(String),
    #[error("cannot read random bytes for the session id")]
    Random(#[source] std::io::Error),
}

fn check_len(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("{what} of {} bytes (1 to {max})", s.len()));
    }
    Ok(())
}

fn random_u64() -> Result<u64, HeartbeatError> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(HeartbeatError::Random)?;
    Ok(u64::from_be_bytes(b))
}

fn new_mac(secret: &[u8]) -> Result<HmacSha256, HeartbeatError> {
    if secret.is_empty() {
        return Err(HeartbeatError::Config("the pool secret is empty".into()));
    }
    HmacSha256::new_from_slice(secret).map_err(|e| HeartbeatError::Config(e.to_string()))
}

/// Seals this host's heartbeats for one network: one session per socket.
pub struct Sealer {
    mac: HmacSha256,
    host: String,
    network: String,
    session: u64,
    seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("host", &self.host)
            .field("network", &self.network)
            .field("session", &format_args!("{:016x}", self.session))
            .field("seq", &self.seq)
            .finish()
    }
}

impl Sealer {
    /// A sealer with a random session id.
    pub fn new(secret: &[u8], host: &str, network: &str) -> Result<Self, HeartbeatError> {
        Self::with_session(secret, host, network, random_u64()?)
    }

    /// A sealer with a chosen session id (tests).
    pub fn with_session(secret: &[u8], host: &str, network: &str, session: u64) -> Result<Self, HeartbeatError> {
        let mac = new_mac(secret)?;
        check_len("host name", host, MAX_NAME_LEN).map_err(HeartbeatError::Config)?;
        check_len("network name", network, MAX_NAME_LEN).map_err(HeartbeatError::Config)?;
        Ok(Self {
            mac,
            host: host.to_owned(),
            network: network.to_owned(),
            session,
            seq: 0,
        })
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// Seals `hb` as the next datagram of the session; `hb.host` must be this sealer's host,
    /// `hb.seq` and `hb.network` are ignored (the sealer's are used). Returns the datagram and
    /// its seq.
    pub fn seal(&mut self, hb: &Heartbeat) -> Result<(Vec<u8>, u64), HeartbeatError> {
        if hb.host != self.host {
            return Err(HeartbeatError::Invalid(format!(
                "heartbeat names host {:?} but this socket sends for {:?}",
                hb.host, self.host
            )));
        }
        if hb.sees.len() > MAX_SEES {
            return Err(HeartbeatError::Invalid(format!(
                "{} names in sees (at most {MAX_SEES})",
                hb.sees.len()
            )));
        }
        for s in &hb.sees {
            check_len("a name in sees", s, MAX_NAME_LEN).map_err(HeartbeatError::Invalid)?;
        }
        if let Some(a) = &hb.api_addr {
            check_len("api_addr", a, MAX_API_ADDR_LEN).map_err(HeartbeatError::Invalid)?;
        }
        let body = BodyRef {
            host: &self.host,
            incarnation: hb.incarnation,
            network: &self.network,
            sees: &hb.sees,
            fencing: hb.fencing,
            config_epoch: hb.config_epoch,
            api_addr: hb.api_addr.as_deref(),
        };
        // Bounded above: ≤ 8 + 64 + 8 + 8 + 64 + 8 + 64 × 72 + 1 + 8 + 9 + 128 bytes < 5 KiB.
        let encoded = bincode::serde::encode_to_vec(&body, BINCODE)
            .map_err(|e| HeartbeatError::Invalid(format!("body does not encode: {e}")))?;
        self.seq += 1;
        Ok((
            sealed::seal(ENVELOPE, &self.mac, self.session, self.seq, &encoded),
            self.seq,
        ))
    }
}

/// Opens heartbeats received on one network: the checks of the module documentation, and
/// (session, seq) per peer.
pub struct Opener {
    mac: HmacSha256,
    local_host: String,
    network: String,
    /// Configured peer → its address on this network.
    peers: Vec<(String, SocketAddr)>,
    state: Sessions,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Opener")
            .field("local_host", &self.local_host)
            .field("network", &self.network)
            .field("peers", &self.peers)
            .field("state", &self.state)
            .finish()
    }
}

impl Opener {
    /// An opener for `network`, accepting heartbeats from `peers` (name, address on this
    /// network) only.
    pub fn new(
        secret: &[u8],
        local_host: &str,
        network: &str,
        peers: Vec<(String, SocketAddr)>,
    ) -> Result<Self, HeartbeatError> {
        Ok(Self {
            mac: new_mac(secret)?,
            local_host: local_host.to_owned(),
            network: network.to_owned(),
            peers,
            state: Sessions::new(RETIRED_SESSIONS),
        })
    }

    /// The last accepted (session, seq) of `peer`.
    pub fn peer_position(&self, peer: &str) -> Option<(u64, u64)> {
        self.state.position(peer)
    }

    /// Checks one datagram received from `from`. Never panics, whatever the bytes.
    pub fn open(&mut self, from: SocketAddr, d: &[u8]) -> Result<Heartbeat, RejectReason> {
        if d.len() > MAX_DATAGRAM {
            return Err(RejectReason::TooLarge {
                len: d.len(),
                max: MAX_DATAGRAM,
            });
        }
        if !self.peers.iter().any(|(_, a)| *a == from) {
            return Err(RejectReason::UnknownSource {
                network: self.network.clone(),
            });
        }
        let (session, seq, body) = self.authenticate_and_decode(d)?;
        if body.network != self.network {
            return Err(RejectReason::WrongNetwork {
                claimed: body.network,
                ours: self.network.clone(),
            });
        }
        if body.host == self.local_host {
            return Err(RejectReason::Reflected { host: body.host });
        }
        let Some((_, expected)) = self.peers.iter().find(|(n, _)| *n == body.host) else {
            return Err(RejectReason::UnknownPeer { host: body.host });
        };
        if *expected != from {
            return Err(RejectReason::WrongSource {
                host: body.host,
                expected: *expected,
            });
        }
        self.check_fresh(&body.host, from, session, seq)?;
        Ok(Heartbeat {
            host: body.host,
            incarnation: body.incarnation,
            seq,
            network: body.network,
            sees: body.sees,
            fencing: body.fencing,
            config_epoch: body.config_epoch,
            api_addr: body.api_addr,
        })
    }

    fn check_fresh(&mut self, host: &str, from: SocketAddr, session: u64, seq: u64) -> Result<(), RejectReason> {
        let host_s = || host.to_owned();
        match self.state.check(host, session, seq) {
            Ok(Accepted::First) => {
                tracing::info!(peer = %host, network = %self.network, %from, session = format_args!("{session:016x}"), seq, "heartbeat: first from peer");
            }
            Ok(Accepted::Next) => {}
            Ok(Accepted::NewSession { old_session, old_seq }) => tracing::warn!(
                peer = %host, network = %self.network, %from,
                old_session = format_args!("{old_session:016x}"), old_seq,
                new_session = format_args!("{session:016x}"), seq,
                "heartbeat: peer started a new session (it restarted)"
            ),
            Err(Refused::Replayed) => {
                return Err(RejectReason::Replayed {
                    host: host_s(),
                    session,
                    seq,
                });
            }
            Err(Refused::Stale { last }) => {
                return Err(RejectReason::Stale {
                    host: host_s(),
                    session,
                    seq,
                    last,
                });
            }
            Err(Refused::RetiredSession) => {
                return Err(RejectReason::RetiredSession {
                    host: host_s(),
                    session,
                });
            }
        }
        Ok(())
    }

    fn authenticate_and_decode(&self, d: &[u8]) -> Result<(u64, u64, Body), RejectReason> {
        let Opened { session, seq, body } = sealed::open(ENVELOPE, &self.mac, d).map_err(|e| match e {
            EnvelopeError::BadMagic { got } => RejectReason::BadMagic { got },
            EnvelopeError::UnsupportedVersion { got, supported } => RejectReason::UnsupportedVersion { got, supported },
            EnvelopeError::Malformed(m) => RejectReason::Malformed(m),
            EnvelopeError::BadMac => RejectReason::BadMac,
        })?;
        let (b, used): (Body, usize) = bincode::serde::decode_from_slice(body, BINCODE)
            .map_err(|e| RejectReason::Malformed(format!("body does not decode: {e}")))?;
        if used != body.len() {
            return Err(RejectReason::Malformed(format!(
                "{} trailing bytes after the body",
                body.len() - used
            )));
        }
        let bounds = || -> Result<(), String> {
            check_len("host name", &b.host, MAX_NAME_LEN)?;
            check_len("network name", &b.network, MAX_NAME_LEN)?;
            for s in &b.sees {
                check_len("a name in sees", s, MAX_NAME_LEN)?;
            }
            if let Some(a) = &b.api_addr {
                check_len("api_addr", a, MAX_API_ADDR_LEN)?;
            }
            Ok(())
        };
        bounds().map_err(RejectReason::Malformed)?;
        Ok((session, seq, b))
    }
}

/// Rate limit of rejection logs: one line per (reason, source address) per [`LOG_EVERY`]
/// (the shared limiter of `eac_common`, which also bounds the number of tracked sources).
type RejectLog = eac_common::ratelimit::LogLimiter<(&'static str, IpAddr)>;

/// How many (reason, source) pairs the rejection log tracks one by one.
const LOG_TRACKED: usize = 1024;

/// Where and for whom a [`HeartbeatSocket`] works.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The network's name (as in the configuration; it is carried in every heartbeat).
    pub network: String,
    /// Our address on it.
    pub bind: SocketAddr,
    /// This host's name.
    pub local_host: String,
    /// Every peer with an address on this network: (name, address).
    pub peers: Vec<(String, SocketAddr)>,
}

impl Endpoint {
    /// The endpoint of `network` in `config` (its bind address, the peers on it).
    pub fn from_config(config: &Config, network: &str) -> Result<Self, HeartbeatError> {
        let net = config
            .network(network)
            .ok_or_else(|| HeartbeatError::Config(format!("no network named {network:?} in the configuration")))?;
        Ok(Self {
            network: net.name.clone(),
            bind: net.bind,
            local_host: config.host.clone(),
            peers: config
                .peers
                .iter()
                .filter_map(|p| p.addresses.get(network).map(|a| (p.name.clone(), *a)))
                .collect(),
        })
    }
}

/// A UDP socket bound to one heartbeat network's address: seals what it sends, checks what
/// it receives. Methods take `&self`, so one socket can be shared (`Arc`) by a sending task
/// and a receiving task.
#[derive(Debug)]
pub struct HeartbeatSocket {
    socket: UdpSocket,
    endpoint: Endpoint,
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
    log: Mutex<RejectLog>,
}

impl HeartbeatSocket {
    /// Binds `endpoint.bind` and starts a new session (random id).
    pub async fn bind(endpoint: Endpoint, secret: &[u8]) -> Result<Self, HeartbeatError> {
        let sealer = Sealer::new(secret, &endpoint.local_host, &endpoint.network)?;
        let opener = Opener::new(secret, &endpoint.local_host, &endpoint.network, endpoint.peers.clone())?;
        let socket = UdpSocket::bind(endpoint.bind)
            .await
            .map_err(|source| HeartbeatError::Bind {
                network: endpoint.network.clone(),
                addr: endpoint.bind,
                source,
            })?;
        tracing::info!(network = %endpoint.network, bind = %endpoint.bind, peers = endpoint.peers.len(), session = format_args!("{:016x}", sealer.session()), "heartbeat socket bound");
        Ok(Self {
            socket,
            endpoint,
            sealer: Mutex::new(sealer),
            opener: Mutex::new(opener),
            log: Mutex::new(RejectLog::new(LOG_EVERY, LOG_TRACKED)),
        })
    }

    /// Binds the socket of `network` as `config` describes it.
    pub async fn for_network(config: &Config, network: &str) -> Result<Self, HeartbeatError> {
        Self::bind(Endpoint::from_config(config, network)?, config.pool_secret.as_bytes()).await
    }

    /// The network's name.
    pub fn network(&self) -> &str {
        &self.endpoint.network
    }

    /// The peers on this network: (name, address).
    pub fn peers(&self) -> &[(String, SocketAddr)] {
        &self.endpoint.peers
    }

    /// The bound address (with the real port when the endpoint asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends `hb` to `to` as the next datagram of this socket's session. `hb.host` must be this
    /// host; `seq` and `network` are filled in. Returns the seq used.
    pub async fn send(&self, hb: &Heartbeat, to: SocketAddr) -> Result<u64, HeartbeatError> {
        let (d, seq) = self.lock_sealer().seal(hb)?;
        self.send_datagram(&d, to).await?;
        Ok(seq)
    }

    /// Sends `hb` (sealed once) to every peer on this network. Tries every peer; returns the
    /// seq used, or the first error (the others are logged at debug).
    pub async fn send_to_peers(&self, hb: &Heartbeat) -> Result<u64, HeartbeatError> {
        let (d, seq) = self.lock_sealer().seal(hb)?;
        let mut first = None;
        for (name, to) in &self.endpoint.peers {
            if let Err(e) = self.send_datagram(&d, *to).await {
                tracing::debug!(peer = %name, error = %eac_common::error_chain(&e), "heartbeat not sent");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(seq), Err)
    }

    async fn send_datagram(&self, d: &[u8], to: SocketAddr) -> Result<(), HeartbeatError> {
        self.socket
            .send_to(d, to)
            .await
            .map(|_| ())
            .map_err(|source| HeartbeatError::Send {
                network: self.endpoint.network.clone(),
                to,
                source,
            })
    }

    fn lock_sealer(&self) -> std::sync::MutexGuard<'_, Sealer> {
        self.sealer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the next datagram and checks it. A rejected datagram is logged here
    /// (rate-limited, with the reason) and returned as `Err` so the caller can count it; the
    /// caller need not log it again. Socket errors are logged and retried, never returned.
    pub async fn recv(&self) -> Result<Heartbeat, Rejected> {
        // One byte more than the limit, so an oversized datagram is seen as such.
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            match self.socket.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    let r = self
                        .opener
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .open(from, &buf[..n]);
                    return match r {
                        Ok(hb) => {
                            tracing::trace!(peer = %hb.host, network = %hb.network, seq = hb.seq, "heartbeat received");
                            Ok(hb)
                        }
                        Err(reason) => {
                            self.log_rejection(&reason, from);
                            Err(Rejected { reason, from })
                        }
                    };
                }
                Err(e) => {
                    tracing::warn!(network = %self.endpoint.network, error = %e, "heartbeat socket receive failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn log_rejection(&self, reason: &RejectReason, from: SocketAddr) {
        let now = Instant::now().into_std();
        let go = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check((reason.kind(), from.ip()), now);
        if let Some(r) = go {
            tracing::warn!(
                network = %self.endpoint.network, %from, reason = reason.kind(), suppressed = r.suppressed,
                "heartbeat rejected: {reason}{}", r.note(from.ip())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;

    const SECRET: &[u8] = b"pool secret for heartbeat tests";

    fn peer_addr() -> SocketAddr {
        "10.250.0.2:7410".parse().unwrap()
    }

    fn opener() -> Opener {
        Opener::new(SECRET, "a", "mgmt", vec![("b".into(), peer_addr())]).unwrap()
    }

    fn hb(host: &str, sees: usize) -> Heartbeat {
        Heartbeat {
            host: host.into(),
            incarnation: 7,
            seq: 0,
            network: String::new(),
            sees: (0..sees).map(|i| format!("host-{i:02}")).collect(),
            fencing: sees % 2 == 1,
            config_epoch: 42,
            api_addr: Some("10.250.0.2:7411".into()),
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Seals a hand-made body with the right secret so it reaches the decoder.
    fn seal_raw(body: &[u8], session: u64, seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&session.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(body);
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    fn string(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(&(s.len() as u64).to_be_bytes());
        b.extend_from_slice(s);
    }

    #[test]
    fn seal_and_open_round_trip_with_the_documented_layout() {
        let mut s = Sealer::with_session(SECRET, "b", "mgmt", 0x0102_0304_0506_0708).unwrap();
        let mut o = opener();
        let mut want = hb("b", 2);
        let (d, seq) = s.seal(&want).unwrap();
        assert_eq!(seq, 1);
        let mut body = Vec::new();
        string(&mut body, b"b");
        body.extend_from_slice(&7u64.to_be_bytes());
        string(&mut body, b"mgmt");
        body.extend_from_slice(&2u64.to_be_bytes());
        string(&mut body, b"host-00");
        string(&mut body, b"host-01");
        body.push(0);
        body.extend_from_slice(&42u64.to_be_bytes());
        body.push(1);
        string(&mut body, b"10.250.0.2:7411");
        assert_eq!(&d[..4], b"EACH");
        assert_eq!(&d[4..6], &[0, 1]);
        assert_eq!(&d[6..8], &(body.len() as u16).to_be_bytes());
        assert_eq!(&d[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&d[16..24], &1u64.to_be_bytes());
        assert_eq!(&d[24..24 + body.len()], &body[..]);
        assert_eq!(d.len(), 24 + body.len() + 32);
        let got = o.open(peer_addr(), &d).unwrap();
        want.seq = 1;
        want.network = "mgmt".into();
        assert_eq!(got, want);
        // The largest heartbeat fits.
        let mut big = hb("b", MAX_SEES);
        big.sees = (0..MAX_SEES).map(|i| format!("{i:0>64}")).collect();
        big.api_addr = Some("x".repeat(MAX_API_ADDR_LEN));
        let (d, _) = s.seal(&big).unwrap();
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(o.open(peer_addr(), &d).unwrap().sees, big.sees);
        assert_eq!(o.peer_position("b"), Some((0x0102_0304_0506_0708, 2)));
    }

    #[test]
    fn oversized_heartbeats_are_refused_at_the_sender() {
        let mut s = Sealer::with_session(SECRET, "b", "mgmt", 1).unwrap();
        assert!(matches!(
            s.seal(&hb("b", MAX_SEES + 1)),
            Err(HeartbeatError::Invalid(_))
        ));
        let mut h = hb("b", 1);
        h.sees[0] = "x".repeat(65);
        assert!(matches!(s.seal(&h), Err(HeartbeatError::Invalid(_))));
        assert!(matches!(s.seal(&hb("c", 1)), Err(HeartbeatError::Invalid(_))));
        assert!(Sealer::new(b"", "b", "mgmt").is_err());
        assert!(Sealer::new(SECRET, "", "mgmt").is_err());
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let mut s = Sealer::with_session(b"another pool's secret", "b", "mgmt", 1).unwrap();
        let e = opener().open(peer_addr(), &s.seal(&hb("b", 1)).unwrap().0).unwrap_err();
        assert_eq!(e, RejectReason::BadMac);
        assert_eq!(
            e.to_string(),
            "authentication failed: wrong pool secret or tampered datagram"
        );
    }

    #[test]
    fn every_bit_flip_and_truncation_is_rejected() {
        let mut s = Sealer::with_session(SECRET, "b", "mgmt", 7).unwrap();
        let (d, _) = s.seal(&hb("b", 3)).unwrap();
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut t = d.clone();
                t[i] ^= 1 << bit;
                let e = opener()
                    .open(peer_addr(), &t)
                    .expect_err("a flipped bit must be refused");
                match i {
                    0..4 => assert!(matches!(e, RejectReason::BadMagic { .. }), "byte {i}: {e}"),
                    4..6 => assert!(matches!(e, RejectReason::UnsupportedVersion { .. }), "byte {i}: {e}"),
                    6..8 => assert!(matches!(e, RejectReason::Malformed(_)), "byte {i}: {e}"),
                    _ => assert_eq!(e, RejectReason::BadMac, "byte {i}"),
                }
            }
        }
        for len in 0..d.len() {
            assert!(
                opener().open(peer_addr(), &d[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
        let mut longer = d.clone();
        longer.push(0);
        assert!(opener().open(peer_addr(), &longer).is_err());
        let e = opener().open(peer_addr(), &vec![0; MAX_DATAGRAM + 1]).unwrap_err();
        assert!(matches!(e, RejectReason::TooLarge { len: 8193, max: 8192 }), "{e}");
        let mut v2 = d.clone();
        v2[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            opener().open(peer_addr(), &v2).unwrap_err().to_string(),
            "unsupported heartbeat protocol version 2 (this build speaks version 1)"
        );
    }

    #[test]
    fn authenticated_but_malformed_bodies_are_rejected() {
        let mut base = Vec::new();
        string(&mut base, b"b");
        base.extend_from_slice(&1u64.to_be_bytes());
        string(&mut base, b"mgmt");
        let tail = |b: &mut Vec<u8>| {
            b.push(0);
            b.extend_from_slice(&1u64.to_be_bytes());
            b.push(0);
        };
        // Valid with no names.
        let mut ok = base.clone();
        ok.extend_from_slice(&0u64.to_be_bytes());
        tail(&mut ok);
        opener()
            .open(peer_addr(), &seal_raw(&ok, 1, 1))
            .expect("hand-made body is valid");
        // Far too many names: refused before allocating.
        let mut b = base.clone();
        b.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
        let e = opener().open(peer_addr(), &seal_raw(&b, 1, 1)).unwrap_err();
        assert!(matches!(&e, RejectReason::Malformed(m) if m.contains("sees")), "{e}");
        // 65 names.
        let mut b = base.clone();
        b.extend_from_slice(&65u64.to_be_bytes());
        for _ in 0..65 {
            string(&mut b, b"x");
        }
        tail(&mut b);
        assert!(matches!(
            opener().open(peer_addr(), &seal_raw(&b, 1, 1)),
            Err(RejectReason::Malformed(_))
        ));
        // A 65-byte name in sees.
        let mut b = base.clone();
        b.extend_from_slice(&1u64.to_be_bytes());
        string(&mut b, &[b'x'; 65]);
        tail(&mut b);
        let e = opener().open(peer_addr(), &seal_raw(&b, 1, 1)).unwrap_err();
        assert!(matches!(&e, RejectReason::Malformed(m) if m.contains("sees")), "{e}");
        // Bad bool, bad UTF-8, trailing bytes.
        let mut b = ok.clone();
        let n = b.len();
        b[n - 10] = 2;
        assert!(opener().open(peer_addr(), &seal_raw(&b, 1, 1)).is_err());
        let mut b = ok.clone();
        b[8] = 0xff;
        assert!(opener().open(peer_addr(), &seal_raw(&b, 1, 1)).is_err());
        let mut b = ok.clone();
        b.push(0);
        let e = opener().open(peer_addr(), &seal_raw(&b, 1, 1)).unwrap_err();
        assert!(
            matches!(&e, RejectReason::Malformed(m) if m.contains("trailing")),
            "{e}"
        );
    }

    #[test]
    fn source_network_and_host_must_match_the_configuration() {
        let mut s = Sealer::with_session(SECRET, "b", "mgmt", 1).unwrap();
        let (d, _) = s.seal(&hb("b", 0)).unwrap();
        // Not a peer address on this network: nothing is read.
        let stranger: SocketAddr = "10.250.0.9:7410".parse().unwrap();
        assert_eq!(
            opener().open(stranger, &d).unwrap_err(),
            RejectReason::UnknownSource { network: "mgmt".into() }
        );
        // Another configured peer's address: authenticated, but from the wrong place.
        let mut o = Opener::new(
            SECRET,
            "a",
            "mgmt",
            vec![
                ("b".into(), peer_addr()),
                ("c".into(), "10.250.0.3:7410".parse().unwrap()),
            ],
        )
        .unwrap();
        let e = o.open("10.250.0.3:7410".parse().unwrap(), &d).unwrap_err();
        assert_eq!(
            e,
            RejectReason::WrongSource {
                host: "b".into(),
                expected: peer_addr()
            }
        );
        // Same address, other port.
        assert!(matches!(
            opener().open("10.250.0.2:7411".parse().unwrap(), &d),
            Err(RejectReason::UnknownSource { .. })
        ));
        // Sent on al1, replayed onto mgmt.
        let mut al1 = Sealer::with_session(SECRET, "b", "al1", 2).unwrap();
        let e = opener()
            .open(peer_addr(), &al1.seal(&hb("b", 0)).unwrap().0)
            .unwrap_err();
        assert!(matches!(e, RejectReason::WrongNetwork { .. }), "{e}");
        // Our own heartbeat, reflected.
        let mut me = Sealer::with_session(SECRET, "a", "mgmt", 3).unwrap();
        let e = opener()
            .open(peer_addr(), &me.seal(&hb("a", 0)).unwrap().0)
            .unwrap_err();
        assert!(matches!(e, RejectReason::Reflected { .. }), "{e}");
        // A host with the secret but not in our configuration.
        let mut z = Sealer::with_session(SECRET, "z", "mgmt", 3).unwrap();
        let e = opener().open(peer_addr(), &z.seal(&hb("z", 0)).unwrap().0).unwrap_err();
        assert_eq!(e, RejectReason::UnknownPeer { host: "z".into() });
    }

    #[test]
    fn replay_stale_and_retired_sessions_are_rejected() {
        let mut o = opener();
        let mut s = Sealer::with_session(SECRET, "b", "mgmt", 7).unwrap();
        let m: Vec<_> = (0..3).map(|_| s.seal(&hb("b", 0)).unwrap().0).collect();
        o.open(peer_addr(), &m[0]).unwrap();
        o.open(peer_addr(), &m[2]).unwrap();
        assert!(matches!(
            o.open(peer_addr(), &m[2]),
            Err(RejectReason::Replayed { seq: 3, .. })
        ));
        assert!(matches!(
            o.open(peer_addr(), &m[1]),
            Err(RejectReason::Stale { seq: 2, last: 3, .. })
        ));
        // The peer restarts: a new session is accepted, the old one retired.
        let mut s2 = Sealer::with_session(SECRET, "b", "mgmt", 8).unwrap();
        o.open(peer_addr(), &s2.seal(&hb("b", 0)).unwrap().0).unwrap();
        assert_eq!(o.peer_position("b"), Some((8, 1)));
        let late_old = s.seal(&hb("b", 0)).unwrap().0;
        assert_eq!(
            o.open(peer_addr(), &late_old).unwrap_err(),
            RejectReason::RetiredSession {
                host: "b".into(),
                session: 7
            }
        );
        o.open(peer_addr(), &s2.seal(&hb("b", 0)).unwrap().0).unwrap();
        // Freshness is per network: another network's opener has its own view.
        let mut al1 = Opener::new(SECRET, "a", "al1", vec![("b".into(), peer_addr())]).unwrap();
        let mut sa = Sealer::with_session(SECRET, "b", "al1", 7).unwrap();
        al1.open(peer_addr(), &sa.seal(&hb("b", 0)).unwrap().0).unwrap();
        assert_eq!(al1.peer_position("b"), Some((7, 1)));
    }

    #[test]
    fn twenty_thousand_random_datagrams_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut o = opener();
        let valid = Sealer::with_session(SECRET, "b", "mgmt", 3)
            .unwrap()
            .seal(&hb("b", 5))
            .unwrap()
            .0;
        let mut accepted = 0;
        for round in 0..20_000u64 {
            let len = (rng.next() % (MAX_DATAGRAM as u64 + 64)) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if round % 2 == 0 && d.len() >= 8 {
                d[..4].copy_from_slice(&MAGIC);
                d[4..6].copy_from_slice(&VERSION.to_be_bytes());
            }
            assert!(o.open(peer_addr(), &d).is_err());
            let n = (rng.next() % 300) as usize;
            let body: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            if opener().open(peer_addr(), &seal_raw(&body, 1, 1)).is_ok() {
                accepted += 1;
            }
            let mut m = valid.clone();
            for _ in 0..(1 + rng.next() % 4) {
                let i = (rng.next() as usize) % m.len();
                m[i] = rng.next() as u8;
            }
            let _ = opener().open(peer_addr(), &m);
        }
        // Random bodies essentially never form a valid heartbeat for this network.
        assert_eq!(accepted, 0);
    }

    #[test]
    fn the_rejection_log_is_rate_limited_per_reason_and_source() {
        let mut l = RejectLog::new(LOG_EVERY, LOG_TRACKED);
        let t0 = std::time::Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut check = |kind, ip, t| l.check((kind, ip), t).map(|r| r.suppressed);
        assert_eq!(check("bad_mac", ip, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(check("bad_mac", ip, t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(check("stale", ip, t0), Some(0));
        assert_eq!(check("bad_mac", "10.0.0.2".parse().unwrap(), t0), Some(0));
        assert_eq!(check("bad_mac", ip, t0 + LOG_EVERY), Some(5));
    }

    async fn loopback_pair(secret_b: &[u8]) -> (HeartbeatSocket, HeartbeatSocket) {
        // Bind both on port 0 first to learn free ports, then describe each to the other.
        let probe_a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe_b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (aa, ba) = (probe_a.local_addr().unwrap(), probe_b.local_addr().unwrap());
        drop((probe_a, probe_b));
        let a = HeartbeatSocket::bind(
            Endpoint {
                network: "mgmt".into(),
                bind: aa,
                local_host: "a".into(),
                peers: vec![("b".into(), ba)],
            },
            SECRET,
        )
        .await
        .unwrap();
        let b = HeartbeatSocket::bind(
            Endpoint {
                network: "mgmt".into(),
                bind: ba,
                local_host: "b".into(),
                peers: vec![("a".into(), aa)],
            },
            secret_b,
        )
        .await
        .unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn round_trip_over_real_udp_on_loopback() {
        let (a, b) = loopback_pair(SECRET).await;
        let ba = b.local_addr().unwrap();
        for i in 1..=3 {
            let seq = a.send(&hb("a", 2), ba).await.unwrap();
            assert_eq!(seq, i);
            let got = tokio::time::timeout(Duration::from_secs(5), b.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((got.host.as_str(), got.network.as_str(), got.seq), ("a", "mgmt", i));
            assert_eq!(got.sees, ["host-00", "host-01"]);
        }
        assert_eq!(b.send_to_peers(&hb("b", 0)).await.unwrap(), 1);
        let got = tokio::time::timeout(Duration::from_secs(5), a.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.host, "b");
        // A stranger's socket on loopback: rejected by source address, with the reason.
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (d, _) = Sealer::with_session(SECRET, "a", "mgmt", 9)
            .unwrap()
            .seal(&hb("a", 0))
            .unwrap();
        stranger.send_to(&d, ba).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.from, stranger.local_addr().unwrap());
        assert!(matches!(e.reason, RejectReason::UnknownSource { .. }), "{e}");
        // Oversized datagrams are seen as such, not truncated into something else.
        stranger.send_to(&vec![0u8; MAX_DATAGRAM + 100], ba).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e.reason, RejectReason::TooLarge { .. }), "{e}");
    }

    #[tokio::test]
    async fn wrong_secret_over_udp_is_rejected_with_the_reason() {
        let (a, b) = loopback_pair(b"a different pool secret").await;
        a.send(&hb("a", 0), b.local_addr().unwrap()).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), b.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason, RejectReason::BadMac);
        assert_eq!(e.from, a.local_addr().unwrap());
    }

    #[test]
    fn endpoint_from_config_lists_the_peers_on_that_network() {
        let c = Config {
            host: "a".into(),
            pool_secret_file: "/x".into(),
            pool_secret: crate::config::PoolSecret::new(SECRET.to_vec()).unwrap(),
            state_file: "/s".into(),
            data_dir: "/d".into(),
            api_socket: "/r".into(),
            api_listen: None,
            libvirt_uri: "test:///default".into(),
            watchdog: None,
            realtime_priority: None,
            timeouts: Default::default(),
            networks: vec![
                crate::config::Network {
                    name: "mgmt".into(),
                    bind: "10.250.0.1:7410".parse().unwrap(),
                },
                crate::config::Network {
                    name: "al1".into(),
                    bind: "10.250.2.1:7410".parse().unwrap(),
                },
            ],
            peers: vec![
                crate::config::Peer {
                    name: "b".into(),
                    addresses: [("mgmt".to_string(), peer_addr())].into(),
                    capacity: None,
                },
                crate::config::Peer {
                    name: "c".into(),
                    addresses: [("al1".to_string(), "10.250.2.3:7410".parse().unwrap())].into(),
                    capacity: None,
                },
            ],
            capacity: crate::config::Capacity { mem_mib: 1, vcpus: 1 },
        };
        let e = Endpoint::from_config(&c, "al1").unwrap();
        assert_eq!(e.bind, "10.250.2.1:7410".parse().unwrap());
        assert_eq!(e.peers, [("c".to_string(), "10.250.2.3:7410".parse().unwrap())]);
        assert!(Endpoint::from_config(&c, "al2").is_err());
    }
}
