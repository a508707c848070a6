//! The pairing protocol: what the two hosts' netpair daemons tell each other over the
//! availability links.
//!
//! Every message travels in one UDP datagram, sent on AL1 **and** AL2 at once; the receiver
//! keeps the first copy and rejects the second as a replay ([`ProtoError::Replayed`], which the
//! daemon logs at debug level — see [`ProtoError::is_duplicate`]). Every datagram is versioned
//! and authenticated with the pool secret; nothing in it is trusted, or even decoded, before
//! its authentication code is checked.
//!
//! # Wire format (version 1)
//!
//! All integers are big-endian.
//!
//! ```text
//! offset  size  field
//!      0     4  magic        "EACP" (45 41 43 50)
//!      4     2  version      u16, 1 (PROTO_VERSION)
//!      6     2  body_len     u16, N: length of the body that follows the header
//!      8     8  session      u64, random, chosen by the sender when it starts
//!     16     8  seq          u64, 1 for the first message of a session, +1 per message
//!     24     N  body         bincode 2 (serde; big-endian, fixed-width integers) of Message
//! 24 + N    32  mac          HMAC-SHA256(pool secret, bytes 0 .. 24 + N)
//! ```
//!
//! A datagram is at most 8192 bytes ([`MAX_DATAGRAM`]), so N ≤ 8136.
//!
//! The body is the bincode encoding of [`Message`], field after field, with no padding:
//!
//! ```text
//! Message          host: u64 length + UTF-8 bytes (≤ 64)   sent_mono_ns: u64
//!                  body: u32 tag, then the variant's fields
//!   tag 0 Observation   app_carrier: u8 (0|1)  probe_ok: u8 (0|1)  probe_age_ms: u32
//!                       guests: u64 count (≤ 256), then count × GuestObservation
//!   GuestObservation    mac: 6 × u8  rx_packets: u64  tx_packets: u64  last_rx_age_ms: u32
//!                       steering_requested: u8 (0|1)
//! ```
//!
//! Tags ≥ 1 are reserved for future bodies (e.g. a `Hello` carrying capabilities); a
//! receiver that does not know a tag rejects the datagram as [`ProtoError::Malformed`]. A
//! change that an old receiver cannot decode bumps `version`.
//!
//! # What a receiver checks, in order
//!
//! 1. size ≤ 8192, else [`ProtoError::TooLarge`] (nothing else is read);
//! 2. magic, else [`ProtoError::BadMagic`]; version, else [`ProtoError::UnsupportedVersion`]
//!    (naming both versions);
//! 3. `24 + body_len + 32` equals the datagram's size, else [`ProtoError::Malformed`];
//! 4. the HMAC, in constant time, else [`ProtoError::BadMac`] — wrong pool secret or a
//!    tampered frame;
//! 5. the body decodes (bincode with an 8 KiB limit, so no length field can make it allocate
//!    more) and fills the datagram exactly, `host` ≤ 64 bytes, `guests` ≤ 256 (checked before
//!    the vector is allocated), else [`ProtoError::Malformed`];
//! 6. freshness, per peer host: the same session with `seq` not above the last accepted one is
//!    [`ProtoError::Replayed`] (equal: the other link's copy) or [`ProtoError::Stale`] (older:
//!    reordered or replayed). A new session id means the peer restarted: accepted and logged,
//!    and the old session is retired — its messages are rejected from then on
//!    ([`ProtoError::RetiredSession`]), so a recorded message of the peer's previous life
//!    cannot be replayed to make the peer look restarted again.
//!
//! Known limit: freshness lives in memory. After *this* daemon restarts, one recorded message
//! of the peer could be accepted as a "new session" until the peer's next genuine message
//! (which then retires the replayed session). Observations are snapshots sent several times a
//! second, so this can inject at most one stale snapshot for one interval; a challenge–response
//! `Hello` body would close it.

use std::{fmt, io::Read, net::SocketAddr};

use hmac::KeyInit;
use serde::{Deserialize, Deserializer, Serialize};

/// "EACP": an eac pairing datagram.
pub const MAGIC: [u8; 4] = *b"EACP";
/// The protocol version this build speaks.
pub const PROTO_VERSION: u16 = 1;
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8192;
/// Fixed header: magic, version, body_len, session, seq.
pub const HEADER_LEN: usize = 24;
/// HMAC-SHA256 tag length.
pub const MAC_LEN: usize = 32;
/// The largest body that fits in a datagram.
pub const MAX_BODY: usize = MAX_DATAGRAM - HEADER_LEN - MAC_LEN;
/// The longest host name, in bytes.
pub const MAX_HOST_LEN: usize = 64;
/// The most guests one observation may carry.
pub const MAX_GUESTS: usize = 256;
/// How many retired sessions per peer are remembered (and refused).
const RETIRED_SESSIONS: usize = 16;

use eac_common::sealed::{self, Accepted, EnvelopeError, HmacSha256, Opened, Refused, Sessions};

/// The pairing protocol's envelope.
const ENVELOPE: sealed::Envelope = sealed::Envelope {
    magic: MAGIC,
    version: PROTO_VERSION,
};

/// bincode 2 through serde: big-endian, fixed-width integers (the layout above is then a plain
/// byte map), and a byte limit so a length field cannot make the decoder allocate past it.
const BINCODE: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_DATAGRAM>,
> = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_DATAGRAM>();

/// Why a datagram was refused (or a sealer/opener could not be made). The daemon logs it
/// with the sender's address.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("datagram of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("not a pairing datagram (bad magic {got:02x?})")]
    BadMagic { got: Vec<u8> },
    #[error("unsupported pairing protocol version {got} (this build speaks version {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("authentication failed: wrong pool secret or tampered frame")]
    BadMac,
    #[error("replayed message from {host}: session {session:016x} seq {seq} already accepted")]
    Replayed { host: String, session: u64, seq: u64 },
    #[error("stale message from {host}: session {session:016x} seq {seq} is older than the last accepted seq {last}")]
    Stale {
        host: String,
        session: u64,
        seq: u64,
        last: u64,
    },
    #[error("message from {host} belongs to its retired session {session:016x} (replayed from before a restart)")]
    RetiredSession { host: String, session: u64 },
    #[error("message claims to come from this host ({host}): reflected back to us")]
    Reflected { host: String },
    #[error("malformed datagram: {0}")]
    Malformed(String),
    #[error("bad pairing configuration: {0}")]
    Config(String),
    #[error("cannot read random bytes for the session id")]
    Random(#[source] std::io::Error),
}

impl ProtoError {
    /// True for the expected second copy of a message (it was sent on both links): log it at
    /// debug level, not as a warning.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, ProtoError::Replayed { .. })
    }
}

/// One pairing message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's host name (≤ 64 bytes), as in the pool configuration.
    pub host: String,
    /// The sender's CLOCK_MONOTONIC when it sealed the message, in nanoseconds.
    pub sent_mono_ns: u64,
    pub body: Body,
}

/// What a message says. Each variant's tag is its position: append, never reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Tag 0: this host's view of its application path and of its guests.
    Observation(Observation),
}

/// A host's view of its application network path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Carrier on the application NIC.
    pub app_carrier: bool,
    /// The last round of path probes (ARP to the configured targets) got a reply.
    pub probe_ok: bool,
    /// Time since the last probe reply, in ms; `u32::MAX` = never.
    pub probe_age_ms: u32,
    /// Per protected guest (≤ 256).
    #[serde(deserialize_with = "bounded_guests")]
    pub guests: Vec<GuestObservation>,
}

/// A host's counters for one guest MAC, as its XDP/TC programs see them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestObservation {
    pub mac: [u8; 6],
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Time since a frame for the guest was last received on the app NIC, in ms;
    /// `u32::MAX` = never.
    pub last_rx_age_ms: u32,
    /// Set by the guest's primary host: "my path is degraded, lend me your NIC".
    pub steering_requested: bool,
}

/// Decodes `guests`, refusing a count above [`MAX_GUESTS`] before anything is allocated.
fn bounded_guests<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<GuestObservation>, D::Error> {
    eac_common::bounded::bounded_vec(d, MAX_GUESTS, "guests")
}

fn check_secret(secret: &[u8]) -> Result<(), ProtoError> {
    if secret.is_empty() {
        return Err(ProtoError::Config("the pool secret is empty".into()));
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), ProtoError> {
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(ProtoError::Config(format!(
            "host name {host:?} must be 1 to {MAX_HOST_LEN} bytes long"
        )));
    }
    Ok(())
}

/// The sender's CLOCK_MONOTONIC in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live, writable local;
    // CLOCK_MONOTONIC is always available on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Seals messages from this host: one per daemon run (one session).
pub struct Sealer {
    mac: HmacSha256,
    host: String,
    session: u64,
    seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // Never print the keyed state.
        f.debug_struct("Sealer")
            .field("host", &self.host)
            .field("session", &self.session)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Sealer {
    /// A sealer for `host` with a random session id (from /dev/urandom).
    pub fn new(secret: &[u8], host: &str) -> Result<Self, ProtoError> {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(ProtoError::Random)?;
        Self::with_session(secret, host, u64::from_be_bytes(b))
    }

    /// A sealer with a chosen session id (tests; the daemon uses [`Sealer::new`]).
    pub fn with_session(secret: &[u8], host: &str, session: u64) -> Result<Self, ProtoError> {
        check_secret(secret)?;
        check_host(host)?;
        let mac = HmacSha256::new_from_slice(secret).map_err(|e| ProtoError::Config(e.to_string()))?;
        Ok(Self {
            mac,
            host: host.to_owned(),
            session,
            seq: 0,
        })
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// The seq of the last sealed message (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Seals `body`, stamped with CLOCK_MONOTONIC now. Send the result on both links.
    ///
    /// Panics only if the encoded message exceeds [`MAX_DATAGRAM`], which the type bounds
    /// prevent for up to [`MAX_GUESTS`] guests (a bug in the caller otherwise).
    pub fn seal(&mut self, body: Body) -> Vec<u8> {
        self.seal_at(monotonic_ns(), body)
    }

    /// Seals `body` with a given `sent_mono_ns` (for tests on controlled time).
    pub fn seal_at(&mut self, sent_mono_ns: u64, body: Body) -> Vec<u8> {
        match &body {
            Body::Observation(o) => {
                assert!(
                    o.guests.len() <= MAX_GUESTS,
                    "{} guests in one observation (at most {MAX_GUESTS})",
                    o.guests.len()
                )
            }
        }
        let msg = Message {
            host: self.host.clone(),
            sent_mono_ns,
            body,
        };
        let encoded = bincode::serde::encode_to_vec(&msg, BINCODE).expect("a bounded message always encodes");
        assert!(
            encoded.len() <= MAX_BODY,
            "pairing body of {} bytes exceeds {MAX_BODY}",
            encoded.len()
        );
        self.seq += 1;
        sealed::seal(ENVELOPE, &self.mac, self.session, self.seq, &encoded)
    }
}

/// Opens datagrams from peers: checks them in the order the module documentation lists and
/// tracks each peer host's (session, seq).
pub struct Opener {
    mac: HmacSha256,
    local_host: Option<String>,
    peers: Sessions,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Opener")
            .field("local_host", &self.local_host)
            .field("peers", &self.peers)
            .finish()
    }
}

impl Opener {
    pub fn new(secret: &[u8]) -> Result<Self, ProtoError> {
        check_secret(secret)?;
        let mac = HmacSha256::new_from_slice(secret).map_err(|e| ProtoError::Config(e.to_string()))?;
        Ok(Self {
            mac,
            local_host: None,
            peers: Sessions::new(RETIRED_SESSIONS),
        })
    }

    /// Also refuse messages that claim to come from `local_host` (our own datagrams reflected
    /// back to us). The daemon should still check that `host` is its configured partner.
    pub fn with_local_host(mut self, local_host: &str) -> Self {
        self.local_host = Some(local_host.to_owned());
        self
    }

    /// The last accepted (session, seq) of `host`.
    pub fn peer_position(&self, host: &str) -> Option<(u64, u64)> {
        self.peers.position(host)
    }

    /// Authenticates, decodes and freshness-checks one datagram received from `from`.
    /// Never panics, whatever the bytes.
    pub fn open(&mut self, from: SocketAddr, datagram: &[u8]) -> Result<Message, ProtoError> {
        let (session, seq, msg) = self.authenticate_and_decode(datagram)?;
        if self.local_host.as_deref() == Some(msg.host.as_str()) {
            return Err(ProtoError::Reflected { host: msg.host });
        }
        match self.peers.check(&msg.host, session, seq) {
            Ok(Accepted::First) => {
                tracing::info!(peer = %msg.host, %from, session = format_args!("{session:016x}"), seq, "pairing: first message from peer");
            }
            Ok(Accepted::Next) => {}
            Ok(Accepted::NewSession { old_session, old_seq }) => tracing::warn!(
                peer = %msg.host, %from,
                old_session = format_args!("{old_session:016x}"), old_seq,
                new_session = format_args!("{session:016x}"), seq,
                "pairing: peer started a new session (it restarted)"
            ),
            Err(Refused::Replayed) => {
                return Err(ProtoError::Replayed {
                    host: msg.host,
                    session,
                    seq,
                });
            }
            Err(Refused::Stale { last }) => {
                return Err(ProtoError::Stale {
                    host: msg.host,
                    session,
                    seq,
                    last,
                });
            }
            Err(Refused::RetiredSession) => {
                return Err(ProtoError::RetiredSession {
                    host: msg.host,
                    session,
                });
            }
        }
        Ok(msg)
    }

    /// Steps 1–5 of the module documentation: everything but freshness.
    fn authenticate_and_decode(&self, d: &[u8]) -> Result<(u64, u64, Message), ProtoError> {
        if d.len() > MAX_DATAGRAM {
            return Err(ProtoError::TooLarge {
                len: d.len(),
                max: MAX_DATAGRAM,
            });
        }
        let Opened { session, seq, body } = sealed::open(ENVELOPE, &self.mac, d).map_err(|e| match e {
            EnvelopeError::BadMagic { got } => ProtoError::BadMagic { got },
            EnvelopeError::UnsupportedVersion { got, supported } => ProtoError::UnsupportedVersion { got, supported },
            EnvelopeError::Malformed(m) => ProtoError::Malformed(m),
            EnvelopeError::BadMac => ProtoError::BadMac,
        })?;
        let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(body, BINCODE)
            .map_err(|e| ProtoError::Malformed(format!("body does not decode: {e}")))?;
        if used != body.len() {
            return Err(ProtoError::Malformed(format!(
                "{} trailing bytes after the body",
                body.len() - used
            )));
        }
        if msg.host.is_empty() || msg.host.len() > MAX_HOST_LEN {
            return Err(ProtoError::Malformed(format!(
                "host name of {} bytes (1 to {MAX_HOST_LEN})",
                msg.host.len()
            )));
        }
        Ok((session, seq, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;

    const SECRET: &[u8] = b"pool secret for tests";

    fn from() -> SocketAddr {
        "10.0.1.2:7800".parse().unwrap()
    }

    fn obs(n: usize) -> Body {
        Body::Observation(Observation {
            app_carrier: true,
            probe_ok: false,
            probe_age_ms: u32::MAX,
            guests: (0..n)
                .map(|i| GuestObservation {
                    mac: [0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8],
                    rx_packets: 1000 + i as u64,
                    tx_packets: u64::MAX - i as u64,
                    last_rx_age_ms: 17,
                    steering_requested: i % 2 == 0,
                })
                .collect(),
        })
    }

    /// A small xorshift64* PRNG so the garbage tests are reproducible without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn round_trip() {
        let mut s = Sealer::with_session(SECRET, "host-a", 0xfeed).unwrap();
        let mut o = Opener::new(SECRET).unwrap();
        for n in [0, 1, 3, MAX_GUESTS] {
            let d = s.seal_at(42, obs(n));
            assert!(d.len() <= MAX_DATAGRAM);
            let m = o.open(from(), &d).unwrap();
            assert_eq!(
                m,
                Message {
                    host: "host-a".into(),
                    sent_mono_ns: 42,
                    body: obs(n)
                }
            );
        }
        assert_eq!(o.peer_position("host-a"), Some((0xfeed, 4)));
        // The real clock stamps something non-zero.
        let m = o.open(from(), &s.seal(obs(0))).unwrap();
        assert!(m.sent_mono_ns > 0);
    }

    #[test]
    fn wire_layout_matches_the_documentation() {
        let mut s = Sealer::with_session(SECRET, "ab", 0x0102_0304_0506_0708).unwrap();
        let d = s.seal_at(
            9,
            Body::Observation(Observation {
                app_carrier: true,
                probe_ok: false,
                probe_age_ms: 5,
                guests: vec![GuestObservation {
                    mac: [1, 2, 3, 4, 5, 6],
                    rx_packets: 7,
                    tx_packets: 8,
                    last_rx_age_ms: 9,
                    steering_requested: true,
                }],
            }),
        );
        #[rustfmt::skip]
        let body: &[u8] = &[
            0, 0, 0, 0, 0, 0, 0, 2, b'a', b'b',          // host
            0, 0, 0, 0, 0, 0, 0, 9,                       // sent_mono_ns
            0, 0, 0, 0,                                   // tag 0 = Observation
            1, 0, 0, 0, 0, 5,                             // app_carrier, probe_ok, probe_age_ms
            0, 0, 0, 0, 0, 0, 0, 1,                       // 1 guest
            1, 2, 3, 4, 5, 6,                             // mac
            0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 8, // rx, tx
            0, 0, 0, 9, 1,                                // last_rx_age_ms, steering_requested
        ];
        assert_eq!(&d[..4], b"EACP");
        assert_eq!(&d[4..6], &[0, 1]);
        assert_eq!(&d[6..8], &(body.len() as u16).to_be_bytes());
        assert_eq!(&d[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&d[16..24], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&d[24..24 + body.len()], body);
        assert_eq!(d.len(), 24 + body.len() + 32);
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let mut s = Sealer::with_session(b"another pool", "host-a", 1).unwrap();
        let mut o = Opener::new(SECRET).unwrap();
        let e = o.open(from(), &s.seal_at(1, obs(2))).unwrap_err();
        assert!(matches!(e, ProtoError::BadMac), "{e}");
        assert_eq!(
            e.to_string(),
            "authentication failed: wrong pool secret or tampered frame"
        );
    }

    #[test]
    fn every_bit_flip_and_truncation_is_rejected_without_panic() {
        let mut s = Sealer::with_session(SECRET, "host-a", 7).unwrap();
        let d = s.seal_at(1, obs(3));
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut t = d.clone();
                t[i] ^= 1 << bit;
                let mut o = Opener::new(SECRET).unwrap();
                let e = o.open(from(), &t).expect_err("a flipped bit must be refused");
                match i {
                    0..4 => assert!(matches!(e, ProtoError::BadMagic { .. }), "byte {i}: {e}"),
                    4..6 => assert!(matches!(e, ProtoError::UnsupportedVersion { .. }), "byte {i}: {e}"),
                    6..8 => assert!(matches!(e, ProtoError::Malformed(_)), "byte {i}: {e}"),
                    _ => assert!(matches!(e, ProtoError::BadMac), "byte {i}: {e}"),
                }
            }
        }
        for len in 0..d.len() {
            let mut o = Opener::new(SECRET).unwrap();
            assert!(o.open(from(), &d[..len]).is_err(), "truncated to {len} accepted");
        }
        let mut longer = d.clone();
        longer.push(0);
        assert!(Opener::new(SECRET).unwrap().open(from(), &longer).is_err());
    }

    #[test]
    fn replay_and_reordering_are_rejected() {
        let mut s = Sealer::with_session(SECRET, "host-a", 7).unwrap();
        let mut o = Opener::new(SECRET).unwrap();
        let m1 = s.seal_at(1, obs(1));
        let m2 = s.seal_at(2, obs(1));
        let m3 = s.seal_at(3, obs(1));
        o.open(from(), &m1).unwrap();
        o.open(from(), &m3).unwrap();
        // The copy from the other availability link.
        let e = o.open(from(), &m3).unwrap_err();
        assert!(
            matches!(e, ProtoError::Replayed { seq: 3, .. }) && e.is_duplicate(),
            "{e}"
        );
        // Older than the last accepted: reordered or replayed.
        let e = o.open(from(), &m2).unwrap_err();
        assert!(
            matches!(e, ProtoError::Stale { seq: 2, last: 3, .. }) && !e.is_duplicate(),
            "{e}"
        );
        let e = o.open(from(), &m1).unwrap_err();
        assert!(matches!(e, ProtoError::Stale { seq: 1, last: 3, .. }), "{e}");
        assert!(e.to_string().contains("stale message from host-a"), "{e}");
    }

    #[test]
    fn peer_restart_is_accepted_and_its_old_session_retired() {
        let mut o = Opener::new(SECRET).unwrap();
        let mut before = Sealer::with_session(SECRET, "host-a", 1).unwrap();
        let old: Vec<_> = (0..5).map(|i| before.seal_at(i, obs(0))).collect();
        for d in &old {
            o.open(from(), d).unwrap();
        }
        let mut after = Sealer::with_session(SECRET, "host-a", 2).unwrap();
        o.open(from(), &after.seal_at(100, obs(0))).unwrap();
        assert_eq!(o.peer_position("host-a"), Some((2, 1)));
        // A recorded message of the previous life cannot make the peer look restarted again.
        let e = o.open(from(), &old[4]).unwrap_err();
        assert!(matches!(e, ProtoError::RetiredSession { session: 1, .. }), "{e}");
        o.open(from(), &after.seal_at(101, obs(0))).unwrap();
        // Peers are tracked independently.
        let mut b = Sealer::with_session(SECRET, "host-b", 1).unwrap();
        o.open(from(), &b.seal_at(1, obs(0))).unwrap();
        assert_eq!(o.peer_position("host-b"), Some((1, 1)));
    }

    #[test]
    fn reflected_messages_are_rejected() {
        let mut s = Sealer::with_session(SECRET, "host-a", 1).unwrap();
        let mut o = Opener::new(SECRET).unwrap().with_local_host("host-a");
        let e = o.open(from(), &s.seal_at(1, obs(0))).unwrap_err();
        assert!(matches!(e, ProtoError::Reflected { .. }), "{e}");
    }

    #[test]
    fn oversize_is_rejected_before_anything_else() {
        let mut o = Opener::new(SECRET).unwrap();
        let e = o.open(from(), &vec![0u8; MAX_DATAGRAM + 1]).unwrap_err();
        assert!(matches!(e, ProtoError::TooLarge { len: 8193, max: 8192 }), "{e}");
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut s = Sealer::with_session(SECRET, "host-a", 1).unwrap();
        let mut d = s.seal_at(1, obs(0));
        d[4..6].copy_from_slice(&2u16.to_be_bytes());
        let e = Opener::new(SECRET).unwrap().open(from(), &d).unwrap_err();
        assert!(
            matches!(e, ProtoError::UnsupportedVersion { got: 2, supported: 1 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "unsupported pairing protocol version 2 (this build speaks version 1)"
        );
        let e = Opener::new(SECRET)
            .unwrap()
            .open(from(), b"HTTP/1.1 200 OK")
            .unwrap_err();
        assert!(matches!(e, ProtoError::BadMagic { .. }), "{e}");
    }

    /// Seals hand-made bodies with the right secret, so they reach the decoder.
    fn seal_raw(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTO_VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&9u64.to_be_bytes());
        out.extend_from_slice(&1u64.to_be_bytes());
        out.extend_from_slice(body);
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    fn host_prefix(body: &mut Vec<u8>) {
        body.extend_from_slice(&1u64.to_be_bytes());
        body.push(b'h');
        body.extend_from_slice(&5u64.to_be_bytes());
    }

    #[test]
    fn authenticated_but_malformed_bodies_are_rejected() {
        // Unknown body tag.
        let mut b = Vec::new();
        host_prefix(&mut b);
        b.extend_from_slice(&1u32.to_be_bytes());
        let e = Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).unwrap_err();
        assert!(matches!(e, ProtoError::Malformed(_)), "{e}");

        // A guest count far beyond the limit: refused before allocating.
        let mut b = Vec::new();
        host_prefix(&mut b);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
        let e = Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).unwrap_err();
        assert!(matches!(&e, ProtoError::Malformed(m) if m.contains("guests")), "{e}");
        // Just above the limit.
        let mut b2 = b.clone();
        b2.truncate(b2.len() - 8);
        b2.extend_from_slice(&((MAX_GUESTS + 1) as u64).to_be_bytes());
        assert!(Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b2)).is_err());

        // A host name length far beyond the datagram.
        let mut b = Vec::new();
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(b"abc");
        assert!(matches!(
            Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)),
            Err(ProtoError::Malformed(_))
        ));

        // A host name over 64 bytes.
        let mut b = Vec::new();
        b.extend_from_slice(&65u64.to_be_bytes());
        b.extend_from_slice(&[b'x'; 65]);
        b.extend_from_slice(&5u64.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&0u64.to_be_bytes());
        let e = Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).unwrap_err();
        assert!(matches!(&e, ProtoError::Malformed(m) if m.contains("host name")), "{e}");

        // A bool that is neither 0 nor 1, invalid UTF-8, trailing bytes.
        let mut b = Vec::new();
        host_prefix(&mut b);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&[2, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&0u64.to_be_bytes());
        assert!(Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).is_err());
        let mut b = Vec::new();
        b.extend_from_slice(&1u64.to_be_bytes());
        b.push(0xff);
        b.extend_from_slice(&5u64.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&0u64.to_be_bytes());
        assert!(Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).is_err());
        b[8] = b'h';
        Opener::new(SECRET)
            .unwrap()
            .open(from(), &seal_raw(&b))
            .expect("the same body, repaired, is valid");
        b.push(0);
        let e = Opener::new(SECRET).unwrap().open(from(), &seal_raw(&b)).unwrap_err();
        assert!(matches!(&e, ProtoError::Malformed(m) if m.contains("trailing")), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut o = Opener::new(SECRET).unwrap();
        let valid = Sealer::with_session(SECRET, "host-a", 3).unwrap().seal_at(1, obs(4));
        for round in 0..20_000 {
            let len = (rng.next() % (MAX_DATAGRAM as u64 + 64)) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half of the inputs get a valid-looking header so they reach the length and MAC checks.
            if round % 2 == 0 && d.len() >= 8 {
                d[..4].copy_from_slice(&MAGIC);
                d[4..6].copy_from_slice(&PROTO_VERSION.to_be_bytes());
            }
            assert!(o.open(from(), &d).is_err());
            // And random bodies that *are* authenticated, to exercise the decoder itself.
            let n = (rng.next() % 200) as usize;
            let body: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let _ = Opener::new(SECRET).unwrap().open(from(), &seal_raw(&body));
            // Random mutations of a valid message.
            let mut m = valid.clone();
            for _ in 0..(1 + rng.next() % 4) {
                let i = (rng.next() as usize) % m.len();
                m[i] = rng.next() as u8;
            }
            let _ = Opener::new(SECRET).unwrap().open(from(), &m);
        }
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(matches!(Sealer::new(b"", "a"), Err(ProtoError::Config(_))));
        assert!(matches!(Opener::new(b""), Err(ProtoError::Config(_))));
        assert!(matches!(Sealer::new(SECRET, ""), Err(ProtoError::Config(_))));
        assert!(matches!(
            Sealer::new(SECRET, &"x".repeat(65)),
            Err(ProtoError::Config(_))
        ));
        let a = Sealer::new(SECRET, "a").unwrap();
        let b = Sealer::new(SECRET, "a").unwrap();
        assert_ne!(a.session(), b.session(), "session ids are random");
        assert!(!format!("{a:?}").contains("mac"));
    }
}
