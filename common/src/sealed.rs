//! Sealed datagrams: the envelope shared by the UDP protocols between hosts (netpair's
//! pairing messages, the controller's heartbeats). Each protocol has its own magic, version
//! and body; the envelope, its checks and the replay protection are the same, so they live
//! here once.
//!
//! ```text
//! offset  size  field (integers big-endian)
//!      0     4  magic        per protocol ("EACP", "EACH")
//!      4     2  version      u16
//!      6     2  body_len     u16, N
//!      8     8  session      u64, random per sender start
//!     16     8  seq          u64, 1 for the first datagram of a session, +1 per datagram
//!     24     N  body
//! 24 + N    32  mac          HMAC-SHA256(pool secret, bytes 0 .. 24 + N)
//! ```
use std::collections::{HashMap, VecDeque};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// HMAC-SHA256 keyed with the pool secret.
pub type HmacSha256 = Hmac<Sha256>;

/// Bytes before the body.
pub const HEADER_LEN: usize = 24;
/// Bytes of the authentication code after the body.
pub const MAC_LEN: usize = 32;

/// A protocol's envelope identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The first four bytes of every datagram.
    pub magic: [u8; 4],
    /// The only version this build speaks.
    pub version: u16,
}

/// Why an envelope was refused, in the order the checks run (the body is not looked at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not this protocol's magic.
    BadMagic { got: Vec<u8> },
    /// Another version of the protocol.
    UnsupportedVersion { got: u16, supported: u16 },
    /// Truncated, or the length field disagrees with the datagram.
    Malformed(String),
    /// The authentication code does not match: wrong pool secret or tampering.
    BadMac,
}

/// An authenticated envelope: its session, sequence and (still undecoded) body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    pub session: u64,
    pub seq: u64,
    pub body: &'a [u8],
}

/// A MAC keyed with `secret`.
pub fn mac(secret: &[u8]) -> Result<HmacSha256, String> {
    HmacSha256::new_from_slice(secret).map_err(|e| e.to_string())
}

/// Seals `body` (at most `u16::MAX` bytes; callers bound their bodies far below).
pub fn seal(env: Envelope, mac: &HmacSha256, session: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    assert!(
        body.len() <= usize::from(u16::MAX),
        "sealed body of {} bytes",
        body.len()
    );
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + MAC_LEN);
    out.extend_from_slice(&env.magic);
    out.extend_from_slice(&env.version.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
    let mut m = mac.clone();
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Checks magic, version, length and the authentication code (in constant time), in that
/// order. The caller checks the datagram's size limit first. Never panics.
pub fn open<'a>(env: Envelope, mac: &HmacSha256, d: &'a [u8]) -> Result<Opened<'a>, EnvelopeError> {
    if d.len() < env.magic.len() || d[..4] != env.magic {
        return Err(EnvelopeError::BadMagic {
            got: d[..d.len().min(4)].to_vec(),
        });
    }
    if d.len() < 6 {
        return Err(EnvelopeError::Malformed(format!(
            "{} bytes: truncated before the version",
            d.len()
        )));
    }
    let version = u16::from_be_bytes([d[4], d[5]]);
    if version != env.version {
        return Err(EnvelopeError::UnsupportedVersion {
            got: version,
            supported: env.version,
        });
    }
    if d.len() < HEADER_LEN + MAC_LEN {
        return Err(EnvelopeError::Malformed(format!(
            "{} bytes: shorter than header and authentication code ({})",
            d.len(),
            HEADER_LEN + MAC_LEN
        )));
    }
    let body_len = usize::from(u16::from_be_bytes([d[6], d[7]]));
    if HEADER_LEN + body_len + MAC_LEN != d.len() {
        return Err(EnvelopeError::Malformed(format!(
            "body length field says {body_len} bytes but the datagram carries {}",
            d.len() - HEADER_LEN - MAC_LEN
        )));
    }
    let (signed, tag) = d.split_at(HEADER_LEN + body_len);
    let mut m = mac.clone();
    m.update(signed);
    m.verify_slice(tag).map_err(|_| EnvelopeError::BadMac)?;
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[at..at + 8]);
        u64::from_be_bytes(b)
    };
    Ok(Opened {
        session: word(8),
        seq: word(16),
        body: &signed[HEADER_LEN..],
    })
}

/// An authenticated datagram's place in its sender's stream, when accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The first datagram from this sender.
    First,
    /// The next one of the current session.
    Next,
    /// A new session: the sender restarted; the old session is retired.
    NewSession { old_session: u64, old_seq: u64 },
}

/// Why an authenticated datagram is not fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The same (session, seq) again (e.g. the copy sent on the other link).
    Replayed,
    /// Older than the last accepted one of the session: reordered or replayed.
    Stale { last: u64 },
    /// A session the sender already left: a recording of its previous life.
    RetiredSession,
}

#[derive(Debug)]
struct Position {
    session: u64,
    seq: u64,
    retired: VecDeque<u64>,
}

/// Replay protection: the last accepted (session, seq) per sender, and up to
/// `retired_max` retired sessions each. In memory only (see the protocols' docs).
#[derive(Debug)]
pub struct Sessions {
    senders: HashMap<String, Position>,
    retired_max: usize,
}

impl Sessions {
    /// Empty, remembering `retired_max` retired sessions per sender.
    pub fn new(retired_max: usize) -> Sessions {
        Sessions {
            senders: HashMap::new(),
            retired_max: retired_max.max(1),
        }
    }

    /// The last accepted (session, seq) of `sender`.
    pub fn position(&self, sender: &str) -> Option<(u64, u64)> {
        self.senders.get(sender).map(|p| (p.session, p.seq))
    }

    /// Accepts (and records) or refuses `(session, seq)` from `sender`.
    pub fn check(&mut self, sender: &str, session: u64, seq: u64) -> Result<Accepted, Refused> {
        let Some(p) = self.senders.get_mut(sender) else {
            self.senders.insert(
                sender.to_owned(),
                Position {
                    session,
                    seq,
                    retired: VecDeque::new(),
                },
            );
            return Ok(Accepted::First);
        };
        if p.session == session {
            return match seq.cmp(&p.seq) {
                std::cmp::Ordering::Equal => Err(Refused::Replayed),
                std::cmp::Ordering::Less => Err(Refused::Stale { last: p.seq }),
                std::cmp::Ordering::Greater => {
                    p.seq = seq;
                    Ok(Accepted::Next)
                }
            };
        }
        if p.retired.contains(&session) {
            return Err(Refused::RetiredSession);
        }
        if p.retired.len() == self.retired_max {
            p.retired.pop_front();
        }
        p.retired.push_back(p.session);
        let old = Accepted::NewSession {
            old_session: p.session,
            old_seq: p.seq,
        };
        p.session = session;
        p.seq = seq;
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: Envelope = Envelope {
        magic: *b"TEST",
        version: 3,
    };

    #[test]
    fn seal_open_round_trip_and_every_corruption_is_refused() {
        let m = mac(b"a pool secret of some length").unwrap();
        let d = seal(ENV, &m, 7, 9, b"hello");
        assert_eq!(d.len(), HEADER_LEN + 5 + MAC_LEN);
        assert_eq!(
            open(ENV, &m, &d),
            Ok(Opened {
                session: 7,
                seq: 9,
                body: b"hello"
            })
        );
        for i in 0..d.len() * 8 {
            let mut x = d.clone();
            x[i / 8] ^= 1 << (i % 8);
            assert!(open(ENV, &m, &x).is_err(), "bit {i}");
        }
        for n in 0..d.len() {
            assert!(open(ENV, &m, &d[..n]).is_err(), "cut at {n}");
        }
        let other = mac(b"another pool secret entirely").unwrap();
        assert_eq!(open(ENV, &other, &d), Err(EnvelopeError::BadMac));
        let v4 = Envelope { version: 4, ..ENV };
        assert_eq!(
            open(v4, &m, &d),
            Err(EnvelopeError::UnsupportedVersion { got: 3, supported: 4 })
        );
    }

    #[test]
    fn sessions_refuse_replays_stale_and_retired() {
        let mut s = Sessions::new(2);
        assert_eq!(s.check("b", 1, 1), Ok(Accepted::First));
        assert_eq!(s.check("b", 1, 1), Err(Refused::Replayed));
        assert_eq!(s.check("b", 1, 3), Ok(Accepted::Next));
        assert_eq!(s.check("b", 1, 2), Err(Refused::Stale { last: 3 }));
        assert_eq!(
            s.check("b", 2, 1),
            Ok(Accepted::NewSession {
                old_session: 1,
                old_seq: 3
            })
        );
        assert_eq!(s.check("b", 1, 4), Err(Refused::RetiredSession));
        assert_eq!(s.position("b"), Some((2, 1)));
        assert_eq!(s.check("c", 1, 1), Ok(Accepted::First));
    }
}
