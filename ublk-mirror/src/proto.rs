//! The disk replication protocol between a mirror's primary and its replica.
//!
//! One TCP connection per availability link (the primary dials the replica's listen address on
//! AL1 and on AL2). Each connection starts with a [`handshake`] — both sides send a [`Hello`],
//! then an [`Message::Auth`] proving knowledge of the pool secret over both sides' fresh nonces
//! — and then carries [`Frame`]s in both directions: a fixed header, a small bincode body (the
//! [`Message`]) and a raw payload (the data of writes, read replies and resync blocks, kept out
//! of bincode so it is copied once).
//!
//! The full wire format, the order of the receiver's checks, the limits and the versioning rules
//! are in `docs/protocol.md` ("Disk replication protocol"). In short:
//!
//! ```text
//! offset  size  field
//!      0     4  magic        "EACM" (45 41 43 4d)
//!      4     8  seq          u64, 1 for the first frame of a connection in this direction, +1 per frame
//!     12     4  body_len     u32, B ≤ 65536 (MAX_BODY)
//!     16     4  payload_len  u32, P ≤ 8 MiB (MAX_PAYLOAD); 0 unless the message carries data
//!     20     B  body         bincode 2 (serde; big-endian, fixed-width integers) of Message
//! 20 + B     P  payload      raw bytes
//! ```
//!
//! Nothing a peer sends can make this module panic or allocate more than the limits: every
//! violation is a typed [`ProtoError`] and the connection must then be closed.
//!
//! Speed: a frame is one header + body buffer (reused) and the payload handed to the socket in
//! one vectored write, so the payload is copied once (by the kernel). The reader buffers headers
//! and bodies (64 KiB) and reads a payload into a [`BytesMut`] of its exact size, bypassing the
//! buffer for large payloads. Set `TCP_NODELAY` on the socket: every frame is a complete request.

use std::fmt;
use std::io::{self, IoSlice, Read as _};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tracing::debug;

use crate::genid::{GenIds, Role};

/// "EACM": an eac mirror frame.
pub const MAGIC: [u8; 4] = *b"EACM";
/// The protocol version this build speaks (carried in [`Hello::version`]).
pub const PROTO_VERSION: u16 = 1;
/// Fixed header: magic, seq, body_len, payload_len.
pub const HEADER_LEN: usize = 20;
/// The largest body (the encoded [`Message`]) sent or accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// The largest payload sent or accepted; also the largest [`Message::Read`] length.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;
/// The most dirty-bitmap words one [`Message::Bitmap`] may carry.
pub const MAX_BITMAP_WORDS: usize = 4096;
/// The longest host name in a [`Hello`], in bytes.
pub const MAX_HOST_LEN: usize = 64;
/// The longest resource name in a [`Hello`], in bytes.
pub const MAX_RESOURCE_LEN: usize = 128;
/// The longest [`Message::Error`] reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Length of the handshake nonces.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// The context string that starts every handshake MAC input.
pub const AUTH_CONTEXT: &[u8] = b"eac-mirror-v1";
/// A sensible handshake timeout for callers that have no better idea.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer of a [`FrameReader`]: a header and the largest body fit.
const READ_BUFFER: usize = MAX_BODY + HEADER_LEN;
/// Most frames [`FrameWriter::send_batch`] takes at once (two I/O vectors each, far below
/// the kernel's `IOV_MAX` of 1024).
pub const MAX_BATCH: usize = 64;
/// Without vectored writes, payloads up to this size are copied behind the body so a frame
/// is still one write.
const INLINE_PAYLOAD: usize = 16 * 1024;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// bincode 2 through serde: big-endian, fixed-width integers (the documented layout is then a
/// plain byte map), and a byte limit so no length field can make the decoder allocate past it.
const BINCODE: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_BODY>,
> = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding()
    .with_limit::<MAX_BODY>();

/// Why a frame or a handshake was refused. After any error the connection must be closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The socket failed.
    #[error("replication connection I/O failed")]
    Io(#[source] io::Error),
    /// The stream (or buffer) ended inside a frame.
    #[error("connection closed in the middle of a frame ({part} incomplete)")]
    Truncated { part: &'static str },
    /// The frame does not start with "EACM": not our protocol, or the stream lost its framing.
    #[error("not a mirror replication frame (bad magic {got:02x?})")]
    BadMagic { got: [u8; 4] },
    /// A frame's sequence number is not the previous one + 1 (lost, duplicated or injected).
    #[error("frame out of sequence: expected seq {expected}, got {got}")]
    OutOfSequence { expected: u64, got: u64 },
    /// The header announces a body above [`MAX_BODY`] (refused before reading it).
    #[error("frame body of {len} bytes exceeds the {max}-byte limit")]
    BodyTooLarge { len: u64, max: usize },
    /// The header announces a payload above [`MAX_PAYLOAD`] (refused before reading it).
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge { len: u64, max: usize },
    /// The body is not a valid bincode [`Message`].
    #[error("malformed frame body")]
    Decode(#[source] bincode::error::DecodeError),
    /// A message could not be encoded (a bug: every valid message encodes).
    #[error("cannot encode a {kind} frame")]
    Encode {
        kind: &'static str,
        #[source]
        source: bincode::error::EncodeError,
    },
    /// The body decodes but breaks a rule of the protocol (a bound, trailing bytes).
    #[error("malformed {kind} frame: {detail}")]
    Malformed { kind: &'static str, detail: String },
    /// A payload on a message that takes none (refused before reading it).
    #[error("{kind} frame carries a {len}-byte payload but takes none")]
    UnexpectedPayload { kind: &'static str, len: u64 },
    /// The handshake received another message than the one it waits for.
    #[error("expected {expected} during the handshake, got {got}")]
    UnexpectedMessage { expected: &'static str, got: &'static str },
    /// The peer speaks another protocol version.
    #[error("unsupported replication protocol version {got} (this build speaks version {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    /// The peer serves another resource (a replica of another disk, or a misconfigured port).
    #[error("peer serves resource {got:?}, expected {expected:?}")]
    WrongResource { expected: String, got: String },
    /// The peer's MAC is wrong: it does not know the pool secret, or the handshake was tampered.
    #[error("authentication failed: the peer does not know the pool secret (or the handshake was tampered with)")]
    AuthFailed,
    /// The connection leads back to this very handshake (our own nonce came back).
    #[error("the connection leads back to ourselves (our own Hello came back)")]
    Reflected,
    /// The peer refused the handshake and said why.
    #[error("the peer refused the connection: {reason}")]
    PeerRefused { reason: String },
    /// The peer closed the connection before the handshake finished.
    #[error("the peer closed the connection during the handshake (waiting for {waiting_for})")]
    ClosedDuringHandshake { waiting_for: &'static str },
    /// The handshake did not finish in time (a silent or stalled peer).
    #[error("the handshake did not finish within {timeout:?}")]
    HandshakeTimeout { timeout: Duration },
    /// The local parameters are unusable (empty secret, bad local Hello).
    #[error("bad replication configuration: {0}")]
    Config(String),
    /// The nonce could not be drawn.
    #[error("cannot read random bytes for the handshake nonce")]
    Random(#[source] io::Error),
}

impl ProtoError {
    /// True when the peer broke the protocol and deserves a [`Message::Error`] saying why
    /// before the connection is closed.
    fn tell_peer(&self) -> bool {
        matches!(
            self,
            ProtoError::BadMagic { .. }
                | ProtoError::OutOfSequence { .. }
                | ProtoError::BodyTooLarge { .. }
                | ProtoError::PayloadTooLarge { .. }
                | ProtoError::Decode(_)
                | ProtoError::Malformed { .. }
                | ProtoError::UnexpectedPayload { .. }
                | ProtoError::UnexpectedMessage { .. }
                | ProtoError::UnsupportedVersion { .. }
                | ProtoError::WrongResource { .. }
                | ProtoError::AuthFailed
        )
    }
}

/// The first message of each side of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version, [`PROTO_VERSION`]. Always the first field (see the versioning rules).
    pub version: u16,
    /// Fresh random bytes per connection; [`handshake`] draws them (the caller's are ignored).
    pub nonce: [u8; NONCE_LEN],
    /// The sender's host name (1 to 64 bytes), for logs and status.
    pub host: String,
    /// The mirrored resource (disk) name (1 to 128 bytes); both sides must agree.
    pub resource: String,
    /// The sender's current role.
    pub role: Role,
}

impl Hello {
    /// A Hello of this protocol version; the nonce is filled in per connection by [`handshake`].
    pub fn new(host: impl Into<String>, resource: impl Into<String>, role: Role) -> Hello {
        Hello {
            version: PROTO_VERSION,
            nonce: [0; NONCE_LEN],
            host: host.into(),
            resource: resource.into(),
            role,
        }
    }
}

/// Flags in a [`Message::State`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StateFlags {
    /// The sender's copy is consistent (not in the middle of being resynced as a target).
    pub consistent: bool,
    /// The sender was primary and did not shut down cleanly.
    pub crashed_primary: bool,
    /// An administrator chose this copy as the split-brain victim.
    pub discard_my_data: bool,
}

/// One replication message. Each variant's tag is its position: append, never reorder.
/// Ids are chosen by the sender of a request and echoed in its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Tag 0: the first frame of each side. Its layout never changes (versioning rules).
    Hello(Hello),
    /// Tag 1: HMAC-SHA256 proof of the pool secret over both nonces (see [`handshake`]).
    Auth { mac: [u8; MAC_LEN] },
    /// Tag 2: the sender refuses or ends the connection, and why (≤ 1024 bytes).
    Error { reason: String },
    /// Tag 3: the sender's disk state, exchanged after the handshake to decide the resync.
    State {
        device_id: u64,
        size: u64,
        region_size: u32,
        r#gen: GenIds,
        role: Role,
        flags: StateFlags,
        dirty_bytes: u64,
    },
    /// Tag 4: a chunk of the sender's dirty bitmap (≤ 4096 words).
    Bitmap {
        first_word: u64,
        #[serde(deserialize_with = "bounded_words")]
        words: Vec<u64>,
    },
    /// Tag 5: the sender's whole bitmap was sent.
    BitmapDone,
    /// Tag 6: write the payload at `offset`; answered by [`Message::Ack`].
    Write { id: u64, offset: u64, fua: bool },
    /// Tag 7: make every acknowledged write durable; answered by [`Message::Ack`].
    Flush { id: u64 },
    /// Tag 8: discard a range; answered by [`Message::Ack`].
    Discard { id: u64, offset: u64, len: u64 },
    /// Tag 9: write zeroes to a range; answered by [`Message::Ack`].
    WriteZeroes { id: u64, offset: u64, len: u64 },
    /// Tag 10: the request `id` completed; `errno` 0 = success, else a positive errno.
    Ack { id: u64, errno: i32 },
    /// Tag 11: read `len` (≤ 8 MiB) bytes at `offset`; answered by [`Message::ReadReply`].
    Read { id: u64, offset: u64, len: u64 },
    /// Tag 12: the data of read `id` as payload (`errno` 0), or no payload and an errno.
    ReadReply { id: u64, errno: i32 },
    /// Tag 13: a resync block (payload) at `offset`, applied like a write; answered by Ack.
    ResyncData { id: u64, offset: u64 },
    /// Tag 14: the resync finished; the target adopts `gen`.
    ResyncDone { r#gen: GenIds },
    /// Tag 15: compute the SHA-256 of a range; answered by [`Message::VerifyReply`].
    Verify { id: u64, offset: u64, len: u64 },
    /// Tag 16: the SHA-256 of verify `id`'s range (`errno` 0), or an errno and zeroes.
    VerifyReply { id: u64, errno: i32, digest: [u8; 32] },
    /// Tag 17: liveness probe; answered by [`Message::Pong`] with the same id.
    Ping { id: u64 },
    /// Tag 18: answer to [`Message::Ping`].
    Pong { id: u64 },
}

impl Message {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Auth { .. } => "Auth",
            Message::Error { .. } => "Error",
            Message::State { .. } => "State",
            Message::Bitmap { .. } => "Bitmap",
            Message::BitmapDone => "BitmapDone",
            Message::Write { .. } => "Write",
            Message::Flush { .. } => "Flush",
            Message::Discard { .. } => "Discard",
            Message::WriteZeroes { .. } => "WriteZeroes",
            Message::Ack { .. } => "Ack",
            Message::Read { .. } => "Read",
            Message::ReadReply { .. } => "ReadReply",
            Message::ResyncData { .. } => "ResyncData",
            Message::ResyncDone { .. } => "ResyncDone",
            Message::Verify { .. } => "Verify",
            Message::VerifyReply { .. } => "VerifyReply",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
        }
    }

    /// True for the messages that may carry a payload: `Write`, `ReadReply`, `ResyncData`.
    pub fn carries_payload(&self) -> bool {
        matches!(
            self,
            Message::Write { .. } | Message::ReadReply { .. } | Message::ResyncData { .. }
        )
    }

    /// An [`Message::Error`] with `reason` cut to [`MAX_REASON_LEN`] bytes (on a char boundary).
    pub fn error(reason: impl Into<String>) -> Message {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Message::Error { reason }
    }

    /// Checks the protocol's rules for this message with a payload of `payload_len` bytes —
    /// the same rules on both sides, so a sender cannot produce what a receiver refuses.
    pub fn validate(&self, payload_len: u64) -> Result<(), ProtoError> {
        let kind = self.kind();
        if payload_len > MAX_PAYLOAD as u64 {
            return Err(ProtoError::PayloadTooLarge {
                len: payload_len,
                max: MAX_PAYLOAD,
            });
        }
        if payload_len > 0 && !self.carries_payload() {
            return Err(ProtoError::UnexpectedPayload { kind, len: payload_len });
        }
        let bad = |detail: String| Err(ProtoError::Malformed { kind, detail });
        match self {
            Message::Hello(h) => {
                if h.host.is_empty() || h.host.len() > MAX_HOST_LEN {
                    return bad(format!("host name of {} bytes (1 to {MAX_HOST_LEN})", h.host.len()));
                }
                if h.resource.is_empty() || h.resource.len() > MAX_RESOURCE_LEN {
                    return bad(format!(
                        "resource name of {} bytes (1 to {MAX_RESOURCE_LEN})",
                        h.resource.len()
                    ));
                }
            }
            Message::Error { reason } if reason.len() > MAX_REASON_LEN => {
                return bad(format!("reason of {} bytes (at most {MAX_REASON_LEN})", reason.len()));
            }
            Message::Bitmap { words, .. } if words.len() > MAX_BITMAP_WORDS => {
                return bad(format!("{} words (at most {MAX_BITMAP_WORDS})", words.len()));
            }
            Message::Read { len, .. } if *len > MAX_PAYLOAD as u64 => {
                return bad(format!("read of {len} bytes (at most {MAX_PAYLOAD})"));
            }
            Message::ReadReply { errno, .. } if *errno != 0 && payload_len > 0 => {
                return Err(ProtoError::UnexpectedPayload {
                    kind: "failed ReadReply",
                    len: payload_len,
                });
            }
            _ => {}
        }
        Ok(())
    }
}

/// Decodes `words`, refusing a count above [`MAX_BITMAP_WORDS`] before anything is allocated.
fn bounded_words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    eac_common::bounded::bounded_vec(d, MAX_BITMAP_WORDS, "bitmap words")
}

/// One received frame: the message and its payload (empty for most messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The decoded body.
    pub msg: Message,
    /// The raw payload: write data, read reply data or a resync block.
    pub payload: Bytes,
}

/// A parsed and checked frame header.
#[derive(Clone, Copy, Debug)]
struct Header {
    body_len: usize,
    payload_len: usize,
}

/// Checks a header in the documented order: magic, seq, body and payload limits.
fn parse_header(h: &[u8; HEADER_LEN], expected_seq: u64) -> Result<Header, ProtoError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { got: magic });
    }
    let seq = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    if seq != expected_seq {
        return Err(ProtoError::OutOfSequence {
            expected: expected_seq,
            got: seq,
        });
    }
    let body_len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    if body_len as usize > MAX_BODY {
        return Err(ProtoError::BodyTooLarge {
            len: body_len.into(),
            max: MAX_BODY,
        });
    }
    let payload_len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLarge {
            len: payload_len.into(),
            max: MAX_PAYLOAD,
        });
    }
    Ok(Header {
        body_len: body_len as usize,
        payload_len: payload_len as usize,
    })
}

/// Decodes a body (exactly `body.len()` bytes) and checks the message against the payload
/// length announced in the header.
fn decode_body(body: &[u8], payload_len: usize) -> Result<Message, ProtoError> {
    let msg = match bincode::serde::decode_from_slice::<Message, _>(body, BINCODE) {
        Ok((msg, used)) if used == body.len() => msg,
        Ok((msg, used)) => {
            check_hello_version(body)?;
            return Err(ProtoError::Malformed {
                kind: msg.kind(),
                detail: format!("{} trailing bytes after the message", body.len() - used),
            });
        }
        Err(e) => {
            check_hello_version(body)?;
            return Err(ProtoError::Decode(e));
        }
    };
    msg.validate(payload_len as u64)?;
    Ok(msg)
}

/// A Hello of another version may not decode as ours: its tag (0) and version (the first
/// field) never move, so report the version rather than a decoding error.
fn check_hello_version(body: &[u8]) -> Result<(), ProtoError> {
    if body.len() >= 6 && body[..4] == [0, 0, 0, 0] {
        let got = u16::from_be_bytes([body[4], body[5]]);
        if got != PROTO_VERSION {
            return Err(ProtoError::UnsupportedVersion {
                got,
                supported: PROTO_VERSION,
            });
        }
    }
    Ok(())
}

/// Encodes header + body of a frame into `buf` (cleared first); the payload is not copied.
fn encode_head(buf: &mut Vec<u8>, seq: u64, msg: &Message, payload_len: usize) -> Result<(), ProtoError> {
    buf.clear();
    append_head(buf, seq, msg, payload_len)
}

/// Appends header + body of a frame to `buf`; on error `buf` is left as it was.
fn append_head(buf: &mut Vec<u8>, seq: u64, msg: &Message, payload_len: usize) -> Result<(), ProtoError> {
    msg.validate(payload_len as u64)?;
    let start = buf.len();
    buf.resize(start + HEADER_LEN, 0);
    if let Err(source) = bincode::serde::encode_into_std_write(msg, buf, BINCODE) {
        buf.truncate(start);
        return Err(ProtoError::Encode {
            kind: msg.kind(),
            source,
        });
    }
    let body_len = buf.len() - start - HEADER_LEN;
    if body_len > MAX_BODY {
        buf.truncate(start);
        return Err(ProtoError::BodyTooLarge {
            len: body_len as u64,
            max: MAX_BODY,
        });
    }
    let h = &mut buf[start..start + HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..12].copy_from_slice(&seq.to_be_bytes());
    h[12..16].copy_from_slice(&(body_len as u32).to_be_bytes());
    h[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
    Ok(())
}

/// Encodes one frame with sequence number `seq` (sync helper for tests and fuzzing; the
/// connection uses [`FrameWriter`]).
pub fn encode_frame(seq: u64, msg: &Message, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 64 + payload.len());
    encode_head(&mut buf, seq, msg, payload.len())?;
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// Decodes the frame at the start of `buf`, which must carry sequence number `expected_seq`,
/// with exactly the checks of [`FrameReader::next`]. Returns the frame and the number of bytes
/// it took; an incomplete frame is [`ProtoError::Truncated`].
pub fn decode_frame(buf: &[u8], expected_seq: u64) -> Result<(Frame, usize), ProtoError> {
    let Some((h, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Err(ProtoError::Truncated { part: "header" });
    };
    let h = parse_header(h, expected_seq)?;
    let Some(body) = rest.get(..h.body_len) else {
        return Err(ProtoError::Truncated { part: "body" });
    };
    let msg = decode_body(body, h.payload_len)?;
    let Some(payload) = rest.get(h.body_len..h.body_len + h.payload_len) else {
        return Err(ProtoError::Truncated { part: "payload" });
    };
    let frame = Frame {
        msg,
        payload: Bytes::copy_from_slice(payload),
    };
    Ok((frame, HEADER_LEN + h.body_len + h.payload_len))
}

/// Maps an I/O error while reading `part` of a frame: EOF there means a truncated frame.
fn read_error(part: &'static str) -> impl FnOnce(io::Error) -> ProtoError {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated { part }
        } else {
            ProtoError::Io(e)
        }
    }
}

/// Reads frames from one direction of a connection, checking each (see `docs/protocol.md`).
///
/// [`FrameReader::next`] is not cancel-safe (a frame half read is lost): run it in a task of
/// its own, or drop the connection when cancelling it.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    next_seq: u64,
    body: Vec<u8>,
}

impl<R> fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("FrameReader").field("next_seq", &self.next_seq).finish()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader at the start of a connection: the first frame must have seq 1.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(READ_BUFFER, inner),
            next_seq: 1,
            body: Vec::with_capacity(256),
        }
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next frame, or `None` when the peer closed the connection between frames.
    /// Limits are checked before anything is allocated; the payload is read into a buffer of
    /// exactly its size.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtoError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut filled = 0;
        while filled < HEADER_LEN {
            let n = self.inner.read(&mut hdr[filled..]).await.map_err(ProtoError::Io)?;
            if n == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated { part: "header" })
                };
            }
            filled += n;
        }
        let h = parse_header(&hdr, self.next_seq)?;
        self.body.clear();
        self.body.resize(h.body_len, 0);
        self.inner
            .read_exact(&mut self.body)
            .await
            .map_err(read_error("body"))?;
        let msg = decode_body(&self.body, h.payload_len)?;
        let payload = if h.payload_len == 0 {
            Bytes::new()
        } else {
            let mut buf = BytesMut::with_capacity(h.payload_len);
            while buf.len() < h.payload_len {
                let want = h.payload_len - buf.len();
                let n = self
                    .inner
                    .read_buf(&mut (&mut buf).limit(want))
                    .await
                    .map_err(ProtoError::Io)?;
                if n == 0 {
                    return Err(ProtoError::Truncated { part: "payload" });
                }
            }
            buf.freeze()
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(Some(Frame { msg, payload }))
    }
}

/// Writes frames in one direction of a connection, numbering them.
///
/// [`FrameWriter::send`] is not cancel-safe (a frame half written breaks the stream): share
/// the writer behind a lock or a channel, and drop the connection when cancelling a send.
pub struct FrameWriter<W> {
    inner: W,
    next_seq: u64,
    buf: Vec<u8>,
}

impl<W> fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("FrameWriter").field("next_seq", &self.next_seq).finish()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer at the start of a connection: the first frame gets seq 1.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            next_seq: 1,
            buf: Vec::with_capacity(256),
        }
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The underlying writer (e.g. to shut it down).
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Sends one frame and flushes. The message is checked first ([`Message::validate`]): a
    /// frame the peer would refuse is not sent, and nothing is written then. Header and body
    /// go out with the payload in one vectored write, so the payload is copied once.
    pub async fn send(&mut self, msg: &Message, payload: &[u8]) -> Result<(), ProtoError> {
        encode_head(&mut self.buf, self.next_seq, msg, payload.len())?;
        let vectored = self.inner.is_write_vectored();
        if !vectored && payload.len() <= INLINE_PAYLOAD {
            self.buf.extend_from_slice(payload);
            self.inner.write_all(&self.buf).await.map_err(ProtoError::Io)?;
        } else {
            write_all_two(&mut self.inner, &self.buf, payload)
                .await
                .map_err(ProtoError::Io)?;
        }
        self.inner.flush().await.map_err(ProtoError::Io)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(())
    }

    /// Sends `frames` in order, numbered like consecutive [`send`](FrameWriter::send)s, with
    /// one flush: all headers go into one buffer and, with the payloads, out in as few
    /// vectored writes as the socket takes (one `writev` for a batch that fits its buffer) —
    /// so a writer with several frames queued pays one system call, not one per frame.
    /// Payloads are not copied. A message that fails its check ends the batch: the frames
    /// before it are sent, then its error is returned (as with one `send` per frame). At most
    /// [`MAX_BATCH`] frames per call.
    pub async fn send_batch(&mut self, frames: &[(Message, Bytes)]) -> Result<(), ProtoError> {
        assert!(frames.len() <= MAX_BATCH, "send_batch: more than MAX_BATCH frames");
        self.buf.clear();
        let mut ends = Vec::with_capacity(frames.len());
        let mut failed = None;
        for (k, (msg, payload)) in frames.iter().enumerate() {
            let seq = self.next_seq.wrapping_add(k as u64);
            if let Err(e) = append_head(&mut self.buf, seq, msg, payload.len()) {
                failed = Some(e);
                break;
            }
            ends.push(self.buf.len());
        }
        let mut slices = Vec::with_capacity(2 * ends.len());
        let mut start = 0;
        for (&end, (_, payload)) in ends.iter().zip(frames) {
            slices.push(IoSlice::new(&self.buf[start..end]));
            if !payload.is_empty() {
                slices.push(IoSlice::new(payload));
            }
            start = end;
        }
        write_all_slices(&mut self.inner, &mut slices)
            .await
            .map_err(ProtoError::Io)?;
        self.inner.flush().await.map_err(ProtoError::Io)?;
        self.next_seq = self.next_seq.wrapping_add(ends.len() as u64);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Writes every slice completely, in as few vectored writes as the writer takes.
async fn write_all_slices<W: AsyncWrite + Unpin>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Writes `a` then `b` completely, both in one `writev` when the writer supports it.
async fn write_all_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else if b.is_empty() {
            w.write(a).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Which end of the TCP connection this is: the side that dialled (the primary) is the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The side that connected.
    Client,
    /// The side that accepted.
    Server,
}

impl Side {
    /// The byte that ends the MAC input of the Auth this side sends.
    fn direction_byte(self) -> u8 {
        match self {
            Side::Client => b'C',
            Side::Server => b'S',
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// The MAC the side `from` sends: HMAC-SHA256(secret, "eac-mirror-v1" || client_nonce ||
/// server_nonce || resource || direction byte ('C' from the client, 'S' from the server)).
fn auth_mac(
    key: &HmacSha256,
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
    resource: &str,
    from: Side,
) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(AUTH_CONTEXT);
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac.update(resource.as_bytes());
    mac.update(&[from.direction_byte()]);
    mac
}

fn random_nonce() -> Result<[u8; NONCE_LEN], ProtoError> {
    let mut nonce = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(ProtoError::Random)?;
    Ok(nonce)
}

/// Runs the handshake on a fresh connection and splits it into a frame reader and writer.
///
/// Both sides send their [`Hello`] (with a fresh random nonce drawn here), check the peer's
/// (version, not our own nonce, `expect_resource`), then send an [`Message::Auth`] and verify
/// the peer's in constant time. A violation is answered with [`Message::Error`] where the
/// peer can still read it, logged at `warn`, and returned as the specific [`ProtoError`].
/// The whole exchange must finish within `timeout` ([`ProtoError::HandshakeTimeout`]).
/// Returns the peer's Hello; the frames that follow continue the sequence numbers.
pub async fn handshake<S>(
    stream: S,
    side: Side,
    secret: &[u8],
    local: &Hello,
    expect_resource: &str,
    timeout: Duration,
) -> Result<(FrameReader<ReadHalf<S>>, FrameWriter<WriteHalf<S>>, Hello), ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, w) = tokio::io::split(stream);
    handshake_split(r, w, side, secret, local, expect_resource, timeout).await
}

/// [`handshake`] on separate read and write halves (e.g. `TcpStream::into_split`, which
/// avoids the lock of `tokio::io::split`).
pub async fn handshake_split<R, W>(
    reader: R,
    writer: W,
    side: Side,
    secret: &[u8],
    local: &Hello,
    expect_resource: &str,
    timeout: Duration,
) -> Result<(FrameReader<R>, FrameWriter<W>, Hello), ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if secret.is_empty() {
        return Err(ProtoError::Config("the pool secret is empty".into()));
    }
    if local.resource != expect_resource {
        return Err(ProtoError::Config(format!(
            "the local Hello names resource {:?} but the handshake expects {expect_resource:?}",
            local.resource
        )));
    }
    let mut hello = local.clone();
    hello.nonce = random_nonce()?;
    Message::Hello(hello.clone())
        .validate(0)
        .map_err(|e| ProtoError::Config(format!("the local Hello is invalid: {e}")))?;
    let key = HmacSha256::new_from_slice(secret).map_err(|e| ProtoError::Config(e.to_string()))?;

    let mut fr = FrameReader::new(reader);
    let mut fw = FrameWriter::new(writer);
    let outcome = tokio::time::timeout(timeout, async {
        let r = exchange(&mut fr, &mut fw, side, &key, &hello).await;
        if let Err(e) = &r
            && e.tell_peer()
        {
            // Best effort: the peer may already be gone.
            let _ = fw.send(&Message::error(e.to_string()), &[]).await;
        }
        r
    })
    .await;
    let res = outcome.unwrap_or(Err(ProtoError::HandshakeTimeout { timeout }));
    match res {
        Ok(peer) => {
            debug!(?side, resource = expect_resource, peer = %peer.host, peer_role = ?peer.role, "replication handshake done");
            Ok((fr, fw, peer))
        }
        Err(e) => {
            // The callers report it: the server rate-limited per source (`accept_loop`), the
            // client once per distinct error (the connector's "link not up").
            debug!(?side, resource = expect_resource, error = %e, "replication handshake failed");
            Err(e)
        }
    }
}

/// The handshake's messages, without the timeout.
async fn exchange<R, W>(
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    side: Side,
    key: &HmacSha256,
    hello: &Hello,
) -> Result<Hello, ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fw.send(&Message::Hello(hello.clone()), &[]).await?;
    let peer = match expect(fr, "Hello").await? {
        Message::Hello(h) => h,
        other => return Err(unexpected("Hello", other)),
    };
    if peer.version != PROTO_VERSION {
        return Err(ProtoError::UnsupportedVersion {
            got: peer.version,
            supported: PROTO_VERSION,
        });
    }
    if peer.nonce == hello.nonce {
        return Err(ProtoError::Reflected);
    }
    if peer.resource != hello.resource {
        return Err(ProtoError::WrongResource {
            expected: hello.resource.clone(),
            got: peer.resource,
        });
    }
    let (client_nonce, server_nonce) = match side {
        Side::Client => (&hello.nonce, &peer.nonce),
        Side::Server => (&peer.nonce, &hello.nonce),
    };
    let ours = auth_mac(key, client_nonce, server_nonce, &hello.resource, side);
    let mac: [u8; MAC_LEN] = ours.finalize().into_bytes().into();
    fw.send(&Message::Auth { mac }, &[]).await?;
    let theirs = match expect(fr, "Auth").await? {
        Message::Auth { mac } => mac,
        other => return Err(unexpected("Auth", other)),
    };
    auth_mac(key, client_nonce, server_nonce, &hello.resource, side.other())
        .verify_slice(&theirs)
        .map_err(|_| ProtoError::AuthFailed)?;
    Ok(peer)
}

/// The next handshake message; the peer's `Error` becomes [`ProtoError::PeerRefused`].
async fn expect<R: AsyncRead + Unpin>(
    fr: &mut FrameReader<R>,
    waiting_for: &'static str,
) -> Result<Message, ProtoError> {
    match fr.next().await? {
        None => Err(ProtoError::ClosedDuringHandshake { waiting_for }),
        Some(Frame {
            msg: Message::Error { reason },
            ..
        }) => Err(ProtoError::PeerRefused { reason }),
        Some(f) => Ok(f.msg),
    }
}

fn unexpected(expected: &'static str, got: Message) -> ProtoError {
    ProtoError::UnexpectedMessage {
        expected,
        got: got.kind(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    const SECRET: &[u8] = b"pool secret for tests";
    const RES: &str = "vm1-disk0";

    /// A small xorshift64* PRNG so the garbage tests are reproducible without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// The wire tag of each variant. Exhaustive: a new variant does not compile until it is
    /// covered here (and so in `every_message`).
    fn tag(m: &Message) -> u32 {
        match m {
            Message::Hello(_) => 0,
            Message::Auth { .. } => 1,
            Message::Error { .. } => 2,
            Message::State { .. } => 3,
            Message::Bitmap { .. } => 4,
            Message::BitmapDone => 5,
            Message::Write { .. } => 6,
            Message::Flush { .. } => 7,
            Message::Discard { .. } => 8,
            Message::WriteZeroes { .. } => 9,
            Message::Ack { .. } => 10,
            Message::Read { .. } => 11,
            Message::ReadReply { .. } => 12,
            Message::ResyncData { .. } => 13,
            Message::ResyncDone { .. } => 14,
            Message::Verify { .. } => 15,
            Message::VerifyReply { .. } => 16,
            Message::Ping { .. } => 17,
            Message::Pong { .. } => 18,
        }
    }
    const VARIANTS: u32 = 19;

    fn gens() -> GenIds {
        GenIds {
            current: 0x1111_2222_3333_4444,
            bitmap: GEN_JUST,
            history: [7, u64::MAX],
        }
    }
    const GEN_JUST: u64 = crate::genid::GEN_JUST_CREATED;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Every variant at least once, with payloads of the interesting sizes.
    fn every_message() -> Vec<(Message, Vec<u8>)> {
        let mut hello = Hello::new("host-a", RES, Role::Primary);
        hello.nonce = [0xa5; NONCE_LEN];
        vec![
            (Message::Hello(hello), vec![]),
            (Message::Auth { mac: [0x5a; MAC_LEN] }, vec![]),
            (Message::error("resource mismatch: ü"), vec![]),
            (
                Message::State {
                    device_id: 0xdead_beef,
                    size: 10 << 30,
                    region_size: 4096,
                    r#gen: gens(),
                    role: Role::Secondary,
                    flags: StateFlags {
                        consistent: true,
                        crashed_primary: false,
                        discard_my_data: true,
                    },
                    dirty_bytes: 1 << 20,
                },
                vec![],
            ),
            (
                Message::Bitmap {
                    first_word: 9,
                    words: vec![1, 0, u64::MAX],
                },
                vec![],
            ),
            (
                Message::Bitmap {
                    first_word: 0,
                    words: (0..MAX_BITMAP_WORDS as u64).collect(),
                },
                vec![],
            ),
            (Message::BitmapDone, vec![]),
            (
                Message::Write {
                    id: 1,
                    offset: 4096,
                    fua: false,
                },
                pattern(4096, 1),
            ),
            (
                Message::Write {
                    id: 2,
                    offset: 1 << 20,
                    fua: true,
                },
                pattern(1 << 20, 2),
            ),
            (
                Message::Write {
                    id: 3,
                    offset: 0,
                    fua: false,
                },
                pattern(MAX_PAYLOAD, 3),
            ),
            (
                Message::Write {
                    id: 4,
                    offset: 0,
                    fua: true,
                },
                vec![],
            ),
            (Message::Flush { id: 5 }, vec![]),
            (
                Message::Discard {
                    id: 6,
                    offset: 8192,
                    len: 1 << 30,
                },
                vec![],
            ),
            (
                Message::WriteZeroes {
                    id: 7,
                    offset: 0,
                    len: 512,
                },
                vec![],
            ),
            (Message::Ack { id: 7, errno: 0 }, vec![]),
            (
                Message::Ack {
                    id: 8,
                    errno: libc::EIO,
                },
                vec![],
            ),
            (
                Message::Read {
                    id: 9,
                    offset: 512,
                    len: MAX_PAYLOAD as u64,
                },
                vec![],
            ),
            (Message::ReadReply { id: 9, errno: 0 }, pattern(512, 4)),
            (
                Message::ReadReply {
                    id: 10,
                    errno: libc::EIO,
                },
                vec![],
            ),
            (
                Message::ResyncData {
                    id: 11,
                    offset: 1 << 40,
                },
                pattern(64 * 1024 + 1, 5),
            ),
            (Message::ResyncDone { r#gen: gens() }, vec![]),
            (
                Message::Verify {
                    id: 12,
                    offset: 0,
                    len: u64::MAX,
                },
                vec![],
            ),
            (
                Message::VerifyReply {
                    id: 12,
                    errno: 0,
                    digest: [0x42; 32],
                },
                vec![],
            ),
            (Message::Ping { id: u64::MAX }, vec![]),
            (Message::Pong { id: u64::MAX }, vec![]),
        ]
    }

    #[test]
    fn every_variant_is_covered_and_tags_match_the_documentation() {
        let all = every_message();
        let mut seen: Vec<u32> = all.iter().map(|(m, _)| tag(m)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..VARIANTS).collect::<Vec<_>>());
        for (m, p) in &all {
            let f = encode_frame(1, m, p).unwrap();
            assert_eq!(&f[HEADER_LEN..HEADER_LEN + 4], &tag(m).to_be_bytes(), "{}", m.kind());
        }
    }

    #[tokio::test]
    async fn every_message_round_trips_through_a_stream() {
        let all = every_message();
        let (a, b) = duplex(64 * 1024);
        let sent = all.clone();
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a);
            for (m, p) in &sent {
                w.send(m, p).await.unwrap();
            }
            assert_eq!(w.next_seq(), sent.len() as u64 + 1);
            // Dropping the writer closes the stream: a clean end.
        });
        let mut r = FrameReader::new(b);
        for (i, (m, p)) in all.iter().enumerate() {
            let f = r
                .next()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("stream ended before frame {i}"));
            assert_eq!(&f.msg, m);
            assert_eq!(f.payload.len(), p.len(), "{}", m.kind());
            assert!(f.payload[..] == p[..], "payload of {} differs", m.kind());
        }
        assert!(r.next().await.unwrap().is_none());
        writer.await.unwrap();
    }

    /// Accepts at most 7 bytes per call, vectored: exercises partial writes.
    struct Trickle(Vec<u8>);
    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut left = 7;
            for b in bufs {
                let n = b.len().min(left);
                self.0.extend_from_slice(&b[..n]);
                left -= n;
            }
            std::task::Poll::Ready(Ok(7 - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_writer_sends_exactly_the_encoded_frames() {
        let all: Vec<_> = every_message().into_iter().filter(|(_, p)| p.len() < 100_000).collect();
        let mut expected = Vec::new();
        for (i, (m, p)) in all.iter().enumerate() {
            expected.extend_from_slice(&encode_frame(i as u64 + 1, m, p).unwrap());
        }
        // Vectored (Vec<u8>), vectored with partial writes, and plain (duplex is not vectored).
        let mut v = FrameWriter::new(Vec::new());
        let mut t = FrameWriter::new(Trickle(Vec::new()));
        let (a, mut b) = duplex(1 << 20);
        let mut d = FrameWriter::new(a);
        for (m, p) in &all {
            v.send(m, p).await.unwrap();
            t.send(m, p).await.unwrap();
            d.send(m, p).await.unwrap();
        }
        drop(d);
        let mut plain = Vec::new();
        b.read_to_end(&mut plain).await.unwrap();
        assert!(v.into_inner() == expected);
        assert!(t.into_inner().0 == expected);
        assert!(plain == expected);
        // And the sync decoder reads them back in order.
        let mut at = 0;
        for (i, (m, p)) in all.iter().enumerate() {
            let (f, used) = decode_frame(&expected[at..], i as u64 + 1).unwrap();
            assert_eq!(&f.msg, m);
            assert!(f.payload[..] == p[..]);
            at += used;
        }
        assert_eq!(at, expected.len());
    }

    #[test]
    fn wire_layout_matches_the_documentation() {
        let f = encode_frame(
            0x0102_0304_0506_0708,
            &Message::Write {
                id: 9,
                offset: 0x1000,
                fua: true,
            },
            b"data",
        )
        .unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            b'E', b'A', b'C', b'M',                  // magic
            1, 2, 3, 4, 5, 6, 7, 8,                  // seq
            0, 0, 0, 21,                             // body_len
            0, 0, 0, 4,                              // payload_len
            0, 0, 0, 6,                              // tag 6 = Write
            0, 0, 0, 0, 0, 0, 0, 9,                  // id
            0, 0, 0, 0, 0, 0, 0x10, 0,               // offset
            1,                                       // fua
            b'd', b'a', b't', b'a',                  // payload
        ];
        assert_eq!(f, expected);

        let h = Hello {
            version: 1,
            nonce: [7; 32],
            host: "a".into(),
            resource: "rs".into(),
            role: Role::Secondary,
        };
        let f = encode_frame(1, &Message::Hello(h), &[]).unwrap();
        let mut body = vec![0, 0, 0, 0, 0, 1];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b'a']);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, b'r', b's']);
        body.extend_from_slice(&[0, 0, 0, 1]);
        assert_eq!(&f[12..16], &(body.len() as u32).to_be_bytes());
        assert_eq!(&f[HEADER_LEN..], &body[..]);

        let f = encode_frame(
            1,
            &Message::State {
                device_id: 1,
                size: 2,
                region_size: 3,
                r#gen: GenIds {
                    current: 4,
                    bitmap: 5,
                    history: [6, 7],
                },
                role: Role::Primary,
                flags: StateFlags {
                    consistent: true,
                    crashed_primary: false,
                    discard_my_data: true,
                },
                dirty_bytes: 8,
            },
            &[],
        )
        .unwrap();
        let mut body = vec![0, 0, 0, 3];
        for v in [1u64, 2] {
            body.extend_from_slice(&v.to_be_bytes());
        }
        body.extend_from_slice(&3u32.to_be_bytes());
        for v in [4u64, 5, 6, 7] {
            body.extend_from_slice(&v.to_be_bytes());
        }
        body.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1]);
        body.extend_from_slice(&8u64.to_be_bytes());
        assert_eq!(&f[HEADER_LEN..], &body[..]);
    }

    #[test]
    fn every_bit_flip_and_truncation_is_handled() {
        let frames = [
            (Message::Hello(Hello::new("host-a", RES, Role::Primary)), vec![]),
            (every_message()[3].0.clone(), vec![]),
            (
                Message::Write {
                    id: 77,
                    offset: 4096,
                    fua: true,
                },
                pattern(16, 9),
            ),
            (
                Message::Bitmap {
                    first_word: 3,
                    words: vec![1, 2, 3],
                },
                vec![],
            ),
            (Message::error("no"), vec![]),
        ];
        for (m, p) in frames {
            let enc = encode_frame(1, &m, &p).unwrap();
            let original = Frame {
                msg: m.clone(),
                payload: Bytes::from(p.clone()),
            };
            assert_eq!(decode_frame(&enc, 1).unwrap(), (original.clone(), enc.len()));
            for i in 0..enc.len() {
                for bit in 0..8 {
                    let mut t = enc.clone();
                    t[i] ^= 1 << bit;
                    let r = decode_frame(&t, 1);
                    match i {
                        0..4 => assert!(matches!(r, Err(ProtoError::BadMagic { .. })), "byte {i}: {r:?}"),
                        4..12 => assert!(matches!(r, Err(ProtoError::OutOfSequence { .. })), "byte {i}: {r:?}"),
                        _ => {
                            if let Ok((f, used)) = r {
                                assert!(
                                    f != original || used != enc.len(),
                                    "{}: flipping bit {bit} of byte {i} decoded to the same frame",
                                    m.kind()
                                );
                            }
                        }
                    }
                }
            }
            for len in 0..enc.len() {
                let r = decode_frame(&enc[..len], 1);
                assert!(
                    matches!(r, Err(ProtoError::Truncated { .. })),
                    "{} cut to {len}: {r:?}",
                    m.kind()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_stream_cut_anywhere_is_truncated_never_a_frame() {
        let enc = encode_frame(1, &Message::ResyncData { id: 1, offset: 0 }, &pattern(70_000, 1)).unwrap();
        for len in (0..enc.len()).step_by(97).chain([1, 19, 20, 21, enc.len() - 1]) {
            let mut r = FrameReader::new(&enc[..len]);
            let got = r.next().await;
            if len == 0 {
                assert!(matches!(got, Ok(None)), "{got:?}");
            } else {
                assert!(
                    matches!(got, Err(ProtoError::Truncated { .. })),
                    "cut to {len}: {got:?}"
                );
            }
        }
        let mut r = FrameReader::new(&enc[..]);
        assert_eq!(r.next().await.unwrap().unwrap().payload.len(), 70_000);
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn out_of_sequence_frames_are_rejected() {
        let ping = |seq: u64| encode_frame(seq, &Message::Ping { id: seq }, &[]).unwrap();
        let mut s = Vec::new();
        for seq in [1, 2, 4] {
            s.extend_from_slice(&ping(seq));
        }
        let mut r = FrameReader::new(&s[..]);
        assert_eq!(r.next().await.unwrap().unwrap().msg, Message::Ping { id: 1 });
        assert_eq!(r.next().await.unwrap().unwrap().msg, Message::Ping { id: 2 });
        let e = r.next().await.unwrap_err();
        assert!(matches!(e, ProtoError::OutOfSequence { expected: 3, got: 4 }), "{e}");
        assert_eq!(e.to_string(), "frame out of sequence: expected seq 3, got 4");

        // A replayed (duplicated) frame.
        let mut s = ping(1);
        s.extend_from_slice(&ping(1));
        let mut r = FrameReader::new(&s[..]);
        r.next().await.unwrap().unwrap();
        let e = r.next().await.unwrap_err();
        assert!(matches!(e, ProtoError::OutOfSequence { expected: 2, got: 1 }), "{e}");
        assert!(matches!(
            decode_frame(&ping(5), 6),
            Err(ProtoError::OutOfSequence { expected: 6, got: 5 })
        ));
    }

    fn header(seq: u64, body_len: u32, payload_len: u32) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&body_len.to_be_bytes());
        h.extend_from_slice(&payload_len.to_be_bytes());
        h
    }

    /// A frame with a hand-made body, so it reaches the decoder.
    fn raw_frame(seq: u64, body: &[u8], payload_len: u32) -> Vec<u8> {
        let mut f = header(seq, body.len() as u32, payload_len);
        f.extend_from_slice(body);
        f
    }

    fn body_of(m: &Message) -> Vec<u8> {
        encode_frame(1, m, &[]).unwrap()[HEADER_LEN..].to_vec()
    }

    /// The stream holds only what is given and then ends: a reader that tried to read (or
    /// allocate for) the announced length would report Truncated instead of the limit.
    async fn read_one(bytes: &[u8]) -> Result<Option<Frame>, ProtoError> {
        FrameReader::new(bytes).next().await
    }

    #[tokio::test]
    async fn oversized_lengths_are_rejected_before_reading() {
        let e = read_one(&header(1, u32::MAX, 0)).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::BodyTooLarge {
                    len: 4294967295,
                    max: MAX_BODY
                }
            ),
            "{e}"
        );
        let e = read_one(&header(1, MAX_BODY as u32 + 1, 0)).await.unwrap_err();
        assert!(matches!(e, ProtoError::BodyTooLarge { .. }), "{e}");
        // The limit itself is accepted (and then the body is missing).
        let e = read_one(&header(1, MAX_BODY as u32, 0)).await.unwrap_err();
        assert!(matches!(e, ProtoError::Truncated { part: "body" }), "{e}");

        let write = body_of(&Message::Write {
            id: 1,
            offset: 0,
            fua: false,
        });
        let e = read_one(&raw_frame(1, &write, u32::MAX)).await.unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::PayloadTooLarge {
                    len: 4294967295,
                    max: MAX_PAYLOAD
                }
            ),
            "{e}"
        );
        let e = read_one(&raw_frame(1, &write, MAX_PAYLOAD as u32 + 1))
            .await
            .unwrap_err();
        assert!(matches!(e, ProtoError::PayloadTooLarge { .. }), "{e}");
        let e = read_one(&raw_frame(1, &write, MAX_PAYLOAD as u32)).await.unwrap_err();
        assert!(matches!(e, ProtoError::Truncated { part: "payload" }), "{e}");
        // A payload on a message that takes none is refused before it is read.
        let ping = body_of(&Message::Ping { id: 1 });
        let e = read_one(&raw_frame(1, &ping, MAX_PAYLOAD as u32)).await.unwrap_err();
        assert!(matches!(e, ProtoError::UnexpectedPayload { kind: "Ping", .. }), "{e}");
        let failed = body_of(&Message::ReadReply { id: 1, errno: 5 });
        let e = read_one(&raw_frame(1, &failed, 1)).await.unwrap_err();
        assert!(matches!(e, ProtoError::UnexpectedPayload { .. }), "{e}");

        // Length fields inside the body: a bitmap of 2^40 words, of 4097 words, a reason of
        // 2^64-1 bytes, a read above MAX_PAYLOAD.
        let mut b = vec![0, 0, 0, 4];
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let e = read_one(&raw_frame(1, &b, 0)).await.unwrap_err();
        assert!(matches!(e, ProtoError::Decode(_)), "{e}");
        let mut b = vec![0, 0, 0, 4];
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(MAX_BITMAP_WORDS as u64 + 1).to_be_bytes());
        for w in 0..=MAX_BITMAP_WORDS as u64 {
            b.extend_from_slice(&w.to_be_bytes());
        }
        let e = read_one(&raw_frame(1, &b, 0)).await.unwrap_err();
        assert!(
            matches!(&e, ProtoError::Decode(d) if d.to_string().contains("bitmap words")),
            "{e}: {:?}",
            std::error::Error::source(&e)
        );
        let mut b = vec![0, 0, 0, 2];
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(b"why");
        let e = read_one(&raw_frame(1, &b, 0)).await.unwrap_err();
        assert!(matches!(e, ProtoError::Decode(_)), "{e}");
        let mut b = vec![0, 0, 0, 11];
        for v in [1, 0, MAX_PAYLOAD as u64 + 1] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let e = read_one(&raw_frame(1, &b, 0)).await.unwrap_err();
        assert!(matches!(e, ProtoError::Malformed { kind: "Read", .. }), "{e}");
        // Trailing bytes, an unknown tag, a bool that is 2.
        let mut b = body_of(&Message::Flush { id: 1 });
        b.push(0);
        let e = read_one(&raw_frame(1, &b, 0)).await.unwrap_err();
        assert!(
            matches!(&e, ProtoError::Malformed { detail, .. } if detail.contains("trailing")),
            "{e}"
        );
        let e = read_one(&raw_frame(1, &[0, 0, 0, VARIANTS as u8, 0, 0], 0))
            .await
            .unwrap_err();
        assert!(matches!(e, ProtoError::Decode(_)), "{e}");
        let mut b = write.clone();
        *b.last_mut().unwrap() = 2;
        assert!(matches!(
            read_one(&raw_frame(1, &b, 0)).await,
            Err(ProtoError::Decode(_))
        ));
    }

    /// A batch is the same bytes as one `send` per frame; an invalid frame ends it after the
    /// ones before it, and the numbering continues right after them.
    #[tokio::test]
    async fn a_batch_is_the_frames_sent_one_by_one() {
        let frames: Vec<(Message, Bytes)> = (0..10u64)
            .map(|i| match i % 3 {
                0 => (
                    Message::Write {
                        id: i,
                        offset: i * 4096,
                        fua: i == 3,
                    },
                    Bytes::from(vec![i as u8; 4096 + i as usize]),
                ),
                1 => (Message::Ack { id: i, errno: 0 }, Bytes::new()),
                _ => (Message::Flush { id: i }, Bytes::new()),
            })
            .collect();
        let mut one = FrameWriter::new(Vec::new());
        for (m, p) in &frames {
            one.send(m, p).await.unwrap();
        }
        let mut batched = FrameWriter::new(Vec::new());
        batched.send_batch(&frames[..4]).await.unwrap();
        batched.send_batch(&[]).await.unwrap();
        batched.send_batch(&frames[4..]).await.unwrap();
        assert_eq!(batched.next_seq(), 11);
        assert_eq!(batched.into_inner(), one.into_inner());
        // An invalid frame in the middle: the two before it go out, then its error.
        let mut w = FrameWriter::new(Vec::new());
        let bad = (Message::Flush { id: 99 }, Bytes::from_static(b"x"));
        let batch = [frames[0].clone(), frames[1].clone(), bad, frames[2].clone()];
        let e = w.send_batch(&batch).await.unwrap_err();
        assert!(matches!(e, ProtoError::UnexpectedPayload { .. }), "{e}");
        w.send(&frames[2].0, &frames[2].1).await.unwrap();
        let bytes = w.into_inner();
        let mut at = 0;
        for (seq, (m, p)) in (1..).zip(&frames[..3]) {
            let (f, n) = decode_frame(&bytes[at..], seq).unwrap();
            assert_eq!((&f.msg, &f.payload), (m, p));
            at += n;
        }
        assert_eq!(at, bytes.len());
    }

    #[tokio::test]
    async fn invalid_messages_are_not_sent() {
        let mut w = FrameWriter::new(Vec::new());
        let too_many = Message::Bitmap {
            first_word: 0,
            words: vec![0; MAX_BITMAP_WORDS + 1],
        };
        let e = w.send(&too_many, &[]).await.unwrap_err();
        assert!(matches!(e, ProtoError::Malformed { kind: "Bitmap", .. }), "{e}");
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let wr = Message::Write {
            id: 1,
            offset: 0,
            fua: false,
        };
        assert!(matches!(
            w.send(&wr, &big).await,
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            w.send(&Message::Flush { id: 1 }, b"x").await,
            Err(ProtoError::UnexpectedPayload { .. })
        ));
        let long = Message::Error {
            reason: "x".repeat(MAX_REASON_LEN + 1),
        };
        assert!(matches!(w.send(&long, &[]).await, Err(ProtoError::Malformed { .. })));
        let mut h = Hello::new("", RES, Role::Primary);
        assert!(matches!(
            w.send(&Message::Hello(h.clone()), &[]).await,
            Err(ProtoError::Malformed { .. })
        ));
        h.host = "h".repeat(MAX_HOST_LEN + 1);
        assert!(matches!(
            w.send(&Message::Hello(h.clone()), &[]).await,
            Err(ProtoError::Malformed { .. })
        ));
        h.host = "h".into();
        h.resource = "r".repeat(MAX_RESOURCE_LEN + 1);
        assert!(matches!(
            w.send(&Message::Hello(h), &[]).await,
            Err(ProtoError::Malformed { .. })
        ));
        // Nothing was written and no sequence number was used.
        assert_eq!(w.next_seq(), 1);
        w.send(&Message::Flush { id: 1 }, &[]).await.unwrap();
        let out = w.into_inner();
        assert_eq!(decode_frame(&out, 1).unwrap().0.msg, Message::Flush { id: 1 });
    }

    #[test]
    fn error_reasons_are_cut_on_a_char_boundary() {
        let Message::Error { reason } = Message::error("é".repeat(MAX_REASON_LEN)) else {
            unreachable!()
        };
        assert_eq!(reason.len(), MAX_REASON_LEN);
        let Message::Error { reason } = Message::error(format!("x{}", "é".repeat(MAX_REASON_LEN))) else {
            unreachable!()
        };
        assert_eq!(reason.len(), MAX_REASON_LEN - 1);
        assert!(Message::error(reason).validate(0).is_ok());
    }

    #[tokio::test]
    async fn random_bytes_never_panic_and_both_decoders_agree() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = encode_frame(
            1,
            &Message::Write {
                id: 3,
                offset: 4096,
                fua: true,
            },
            &pattern(64, 0),
        )
        .unwrap();
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut d = match round % 4 {
                // Pure noise.
                0 => {
                    let n = (rng.next() % 300) as usize;
                    rng.bytes(n)
                }
                // A valid header around a random body: reaches the bincode decoder.
                1 | 2 => {
                    let n = (rng.next() % 120) as usize;
                    let body = rng.bytes(n);
                    let payload = (rng.next() % 3) as u32;
                    let mut f = raw_frame(1, &body, payload);
                    f.extend_from_slice(&rng.bytes(payload as usize));
                    if round % 4 == 2 && n >= 4 {
                        // A plausible tag so every variant's fields get random values.
                        let t = (rng.next() % (VARIANTS as u64 + 1)) as u32;
                        f[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&t.to_be_bytes());
                    }
                    f
                }
                // Random mutations of a valid frame.
                _ => {
                    let mut m = valid.clone();
                    for _ in 0..(1 + rng.next() % 4) {
                        let i = (rng.next() as usize) % m.len();
                        m[i] = rng.next() as u8;
                    }
                    m
                }
            };
            if round % 7 == 0 {
                let cut = (rng.next() as usize) % (d.len() + 1);
                d.truncate(cut);
            }
            let sync = decode_frame(&d, 1);
            let stream = read_one(&d).await;
            match (&sync, &stream) {
                (Ok((f, _)), Ok(Some(g))) => {
                    assert_eq!(f, g);
                    accepted += 1;
                }
                (Err(ProtoError::Truncated { .. }), Ok(None)) => assert!(d.is_empty()),
                (Err(a), Err(b)) => assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b), "{a} vs {b}"),
                _ => panic!("decoders disagree on {d:02x?}: {sync:?} vs {stream:?}"),
            }
        }
        // The fuzzer does reach valid frames (else it tests only the header checks).
        assert!(accepted > 100, "only {accepted} random frames decoded");
    }

    // ---- handshake ----

    fn hello(host: &str, role: Role) -> Hello {
        Hello::new(host, RES, role)
    }

    type Halves = (
        FrameReader<ReadHalf<tokio::io::DuplexStream>>,
        FrameWriter<WriteHalf<tokio::io::DuplexStream>>,
        Hello,
    );

    async fn both(
        client_secret: &[u8],
        server_secret: &[u8],
        client_local: Hello,
        server_local: Hello,
    ) -> (Result<Halves, ProtoError>, Result<Halves, ProtoError>) {
        let (a, b) = duplex(64 * 1024);
        let t = Duration::from_secs(5);
        let cr = client_local.resource.clone();
        let sr = server_local.resource.clone();
        tokio::join!(
            handshake(a, Side::Client, client_secret, &client_local, &cr, t),
            handshake(b, Side::Server, server_secret, &server_local, &sr, t),
        )
    }

    #[tokio::test]
    async fn handshake_succeeds_with_the_same_secret() {
        let (c, s) = both(
            SECRET,
            SECRET,
            hello("host-a", Role::Primary),
            hello("host-b", Role::Secondary),
        )
        .await;
        let (mut cr, mut cw, c_peer) = c.unwrap();
        let (mut sr, mut sw, s_peer) = s.unwrap();
        assert_eq!(c_peer.host, "host-b");
        assert_eq!(c_peer.role, Role::Secondary);
        assert_eq!(c_peer.resource, RES);
        assert_eq!(c_peer.version, PROTO_VERSION);
        assert_eq!(s_peer.host, "host-a");
        assert_eq!(s_peer.role, Role::Primary);
        assert_ne!(c_peer.nonce, [0; NONCE_LEN], "the nonce is drawn per connection");
        assert_ne!(c_peer.nonce, s_peer.nonce);
        // Frames continue the sequence numbers of the handshake (Hello 1, Auth 2).
        assert_eq!((cw.next_seq(), cr.next_seq()), (3, 3));
        cw.send(
            &Message::Write {
                id: 1,
                offset: 0,
                fua: true,
            },
            &pattern(4096, 7),
        )
        .await
        .unwrap();
        let f = sr.next().await.unwrap().unwrap();
        assert!(f.payload[..] == pattern(4096, 7)[..]);
        sw.send(&Message::Ack { id: 1, errno: 0 }, &[]).await.unwrap();
        assert_eq!(cr.next().await.unwrap().unwrap().msg, Message::Ack { id: 1, errno: 0 });

        // Another connection, other nonces.
        let (c2, _) = both(SECRET, SECRET, hello("a", Role::Primary), hello("b", Role::Secondary)).await;
        assert_ne!(c2.unwrap().2.nonce, c_peer.nonce);
    }

    #[tokio::test]
    async fn wrong_secret_fails_on_both_sides() {
        let (c, s) = both(
            SECRET,
            b"another pool",
            hello("a", Role::Primary),
            hello("b", Role::Secondary),
        )
        .await;
        for r in [c, s] {
            let e = r.unwrap_err();
            assert!(matches!(e, ProtoError::AuthFailed), "{e}");
        }
    }

    #[tokio::test]
    async fn wrong_resource_fails_on_both_sides() {
        let mut other = hello("b", Role::Secondary);
        other.resource = "vm2-disk0".into();
        let (c, s) = both(SECRET, SECRET, hello("a", Role::Primary), other).await;
        let e = c.unwrap_err();
        assert!(
            matches!(&e, ProtoError::WrongResource { expected, got } if expected == RES && got == "vm2-disk0"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "peer serves resource \"vm2-disk0\", expected \"vm1-disk0\""
        );
        assert!(matches!(s.unwrap_err(), ProtoError::WrongResource { .. }));
    }

    /// A hand-written peer: the raw frame API on the other end of a duplex.
    fn fake_peer(
        s: tokio::io::DuplexStream,
    ) -> (
        FrameReader<ReadHalf<tokio::io::DuplexStream>>,
        FrameWriter<WriteHalf<tokio::io::DuplexStream>>,
    ) {
        let (r, w) = tokio::io::split(s);
        (FrameReader::new(r), FrameWriter::new(w))
    }

    async fn client_against(
        peer: impl AsyncFnOnce(
            FrameReader<ReadHalf<tokio::io::DuplexStream>>,
            FrameWriter<WriteHalf<tokio::io::DuplexStream>>,
        ),
    ) -> ProtoError {
        let (a, b) = duplex(64 * 1024);
        let (r, w) = fake_peer(b);
        let local = hello("a", Role::Primary);
        // Bounded, so a handshake that wrongly succeeds (and leaves the fake peer waiting for
        // an Error) fails the test instead of hanging it.
        let both = async {
            tokio::join!(
                handshake(a, Side::Client, SECRET, &local, RES, Duration::from_secs(5)),
                peer(r, w)
            )
        };
        let (res, ()) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the fake peer did not get its answer");
        res.expect_err("the handshake must fail")
    }

    /// The peer's next frame must be our Error, naming `what`.
    async fn expect_error<R: AsyncRead + Unpin>(r: &mut FrameReader<R>, what: &str) {
        match r.next().await.unwrap().map(|f| f.msg) {
            Some(Message::Error { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("expected an Error about {what}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn wrong_version_is_refused_and_told() {
        let e = client_against(async |mut r, mut w| {
            let mut h = hello("b", Role::Secondary);
            h.version = 2;
            h.nonce = [1; NONCE_LEN];
            w.send(&Message::Hello(h), &[]).await.unwrap();
            assert!(matches!(r.next().await.unwrap().unwrap().msg, Message::Hello(_)));
            expect_error(&mut r, "version 2").await;
        })
        .await;
        assert!(
            matches!(e, ProtoError::UnsupportedVersion { got: 2, supported: 1 }),
            "{e}"
        );

        // A version-3 Hello whose layout we cannot decode is still reported as a version.
        let e = client_against(async |mut r, w| {
            let mut body = vec![0, 0, 0, 0, 0, 3];
            body.extend_from_slice(b"a layout from the future");
            let mut inner = w.into_inner();
            inner.write_all(&raw_frame(1, &body, 0)).await.unwrap();
            assert!(matches!(r.next().await.unwrap().unwrap().msg, Message::Hello(_)));
            expect_error(&mut r, "version 3").await;
        })
        .await;
        assert!(matches!(e, ProtoError::UnsupportedVersion { got: 3, .. }), "{e}");

        // Both sides through `handshake`: the newer side is told why.
        let mut newer = hello("b", Role::Secondary);
        newer.version = 2;
        let (c, s) = both(SECRET, SECRET, hello("a", Role::Primary), newer).await;
        assert!(matches!(c.unwrap_err(), ProtoError::UnsupportedVersion { got: 2, .. }));
        let e = s.unwrap_err();
        assert!(
            matches!(&e, ProtoError::PeerRefused { reason } if reason.contains("unsupported replication protocol version 2")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn garbage_instead_of_hello_is_refused() {
        let e = client_against(async |mut r, w| {
            let mut inner = w.into_inner();
            inner
                .write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
                .await
                .unwrap();
            assert!(matches!(r.next().await.unwrap().unwrap().msg, Message::Hello(_)));
            expect_error(&mut r, "bad magic").await;
        })
        .await;
        assert!(matches!(e, ProtoError::BadMagic { got } if &got == b"SSH-"), "{e}");

        // A valid frame, but not a Hello.
        let e = client_against(async |mut r, mut w| {
            w.send(&Message::Ping { id: 1 }, &[]).await.unwrap();
            r.next().await.unwrap().unwrap();
            expect_error(&mut r, "expected Hello").await;
        })
        .await;
        assert!(
            matches!(
                e,
                ProtoError::UnexpectedMessage {
                    expected: "Hello",
                    got: "Ping"
                }
            ),
            "{e}"
        );

        // A Hello, then a data frame instead of Auth.
        let e = client_against(async |mut r, mut w| {
            let mut h = hello("b", Role::Secondary);
            h.nonce = [9; NONCE_LEN];
            w.send(&Message::Hello(h), &[]).await.unwrap();
            w.send(
                &Message::Write {
                    id: 1,
                    offset: 0,
                    fua: false,
                },
                b"x",
            )
            .await
            .unwrap();
            r.next().await.unwrap().unwrap();
            r.next().await.unwrap().unwrap();
            expect_error(&mut r, "expected Auth").await;
        })
        .await;
        assert!(
            matches!(
                e,
                ProtoError::UnexpectedMessage {
                    expected: "Auth",
                    got: "Write"
                }
            ),
            "{e}"
        );
    }

    /// The MAC recipe of docs/protocol.md, written out independently of `auth_mac`.
    fn documented_mac(client_nonce: &[u8], server_nonce: &[u8], resource: &str, direction: u8) -> [u8; 32] {
        let mut input = b"eac-mirror-v1".to_vec();
        input.extend_from_slice(client_nonce);
        input.extend_from_slice(server_nonce);
        input.extend_from_slice(resource.as_bytes());
        input.push(direction);
        let mut m = HmacSha256::new_from_slice(SECRET).unwrap();
        m.update(&input);
        m.finalize().into_bytes().into()
    }

    #[tokio::test]
    async fn the_documented_mac_recipe_authenticates_and_directions_differ() {
        // A hand-written server that follows the documentation is accepted.
        let (a, b) = duplex(64 * 1024);
        let (mut r, mut w) = fake_peer(b);
        let local = hello("a", Role::Primary);
        let server = async {
            let Message::Hello(ch) = r.next().await.unwrap().unwrap().msg else {
                panic!("no Hello")
            };
            let mut h = hello("b", Role::Secondary);
            h.nonce = [3; NONCE_LEN];
            w.send(&Message::Hello(h.clone()), &[]).await.unwrap();
            let Message::Auth { mac } = r.next().await.unwrap().unwrap().msg else {
                panic!("no Auth")
            };
            assert_eq!(mac, documented_mac(&ch.nonce, &h.nonce, RES, b'C'));
            let mac = documented_mac(&ch.nonce, &h.nonce, RES, b'S');
            w.send(&Message::Auth { mac }, &[]).await.unwrap();
        };
        let (res, ()) = tokio::join!(
            handshake(a, Side::Client, SECRET, &local, RES, Duration::from_secs(5)),
            server
        );
        assert_eq!(res.unwrap().2.nonce, [3; NONCE_LEN]);

        // The client's own MAC sent back (direction 'C' instead of 'S') is refused.
        let e = client_against(async |mut r, mut w| {
            r.next().await.unwrap().unwrap();
            let mut h = hello("b", Role::Secondary);
            h.nonce = [4; NONCE_LEN];
            w.send(&Message::Hello(h), &[]).await.unwrap();
            let Message::Auth { mac } = r.next().await.unwrap().unwrap().msg else {
                panic!("no Auth")
            };
            w.send(&Message::Auth { mac }, &[]).await.unwrap();
            expect_error(&mut r, "authentication failed").await;
        })
        .await;
        assert!(matches!(e, ProtoError::AuthFailed), "{e}");
    }

    #[tokio::test]
    async fn a_connection_back_to_ourselves_is_refused() {
        // A peer that echoes every byte: our own Hello comes back.
        let e = client_against(async |r, w| {
            let mut r = r;
            let mut w = w.into_inner();
            let f = r.next().await.unwrap().unwrap();
            w.write_all(&encode_frame(1, &f.msg, &[]).unwrap()).await.unwrap();
        })
        .await;
        assert!(matches!(e, ProtoError::Reflected), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        for answers_hello in [false, true] {
            let (a, b) = duplex(64 * 1024);
            let (_r, mut w) = fake_peer(b);
            if answers_hello {
                let mut h = hello("b", Role::Secondary);
                h.nonce = [5; NONCE_LEN];
                w.send(&Message::Hello(h), &[]).await.unwrap();
            }
            let start = tokio::time::Instant::now();
            let local = hello("a", Role::Primary);
            let e = handshake(a, Side::Client, SECRET, &local, RES, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(e, ProtoError::HandshakeTimeout { timeout } if timeout == Duration::from_secs(5)),
                "{e}"
            );
            assert_eq!(start.elapsed(), Duration::from_secs(5));
        }
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_or_refuses_is_reported() {
        let e = client_against(async |mut r, w| {
            r.next().await.unwrap().unwrap();
            drop((r, w));
        })
        .await;
        assert!(
            matches!(e, ProtoError::ClosedDuringHandshake { waiting_for: "Hello" }),
            "{e}"
        );
        let e = client_against(async |_r, mut w| {
            w.send(&Message::error("not today"), &[]).await.unwrap();
        })
        .await;
        assert!(
            matches!(&e, ProtoError::PeerRefused { reason } if reason == "not today"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn bad_local_configuration_is_refused_before_any_io() {
        let (a, _b) = duplex(1024);
        let t = Duration::from_secs(1);
        let e = handshake(a, Side::Client, b"", &hello("a", Role::Primary), RES, t)
            .await
            .unwrap_err();
        assert!(matches!(&e, ProtoError::Config(m) if m.contains("secret")), "{e}");
        let (a, _b) = duplex(1024);
        let e = handshake(a, Side::Client, SECRET, &hello("a", Role::Primary), "other", t)
            .await
            .unwrap_err();
        assert!(matches!(e, ProtoError::Config(_)), "{e}");
        let (a, _b) = duplex(1024);
        let e = handshake(a, Side::Client, SECRET, &hello("", Role::Primary), RES, t)
            .await
            .unwrap_err();
        assert!(matches!(&e, ProtoError::Config(m) if m.contains("host name")), "{e}");
    }

    #[tokio::test]
    async fn handshake_and_frames_over_tcp_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_secs(5);
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let (r, w) = s.into_split();
            let local = hello("host-b", Role::Secondary);
            let (mut r, mut w, peer) = handshake_split(r, w, Side::Server, SECRET, &local, RES, t)
                .await
                .unwrap();
            assert_eq!(peer.host, "host-a");
            while let Some(f) = r.next().await.unwrap() {
                let Message::Write { id, .. } = f.msg else {
                    panic!("{:?}", f.msg)
                };
                // Echo the data back as a read reply so the client can compare it.
                w.send(&Message::ReadReply { id, errno: 0 }, &f.payload).await.unwrap();
            }
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let local = hello("host-a", Role::Primary);
        let (mut r, mut w, peer) = handshake(s, Side::Client, SECRET, &local, RES, t).await.unwrap();
        assert_eq!(peer.host, "host-b");
        for (id, len) in [(1u64, 4096usize), (2, 1 << 20), (3, MAX_PAYLOAD)] {
            let data = pattern(len, id as u8);
            w.send(
                &Message::Write {
                    id,
                    offset: 0,
                    fua: false,
                },
                &data,
            )
            .await
            .unwrap();
            let f = r.next().await.unwrap().unwrap();
            assert_eq!(f.msg, Message::ReadReply { id, errno: 0 });
            assert!(f.payload[..] == data[..], "payload {id} differs");
        }
        drop((r, w));
        server.await.unwrap();
    }
}
