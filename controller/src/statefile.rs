//! The state-file: a file on storage every host sees, in which each host owns one 4 KiB slot
//! that it rewrites every `statefile_interval`. A host whose slot keeps changing is alive, even
//! when every heartbeat network is cut.
//!
//! # Layout (version 2; version 1 is still read)
//!
//! The file is `slots × 4096` bytes. Slot `i` (at offset `i × 4096`) belongs to the host whose
//! name is at position `i` in the sorted list of all the pool's host names — every host must
//! be configured with the same list. All integers are big-endian.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "EACS" (45 41 43 53)
//!      4     2  version    u16, 2 (VERSION); 1 is read too
//!      6     2  body_len   u16, N ≤ 4056
//!      8     N  body       bincode 2 (serde; big-endian, fixed-width integers) of SlotRecord:
//!                            host: u64 length + UTF-8 (1..=64)
//!                            incarnation: u64   tick: u64   wall_ms: u64   fencing: u8 (0|1)
//!                            guests: u64 count (≤ 1024), count × (u64 length + UTF-8 1..=64)
//!                            guests_truncated: u8 (0|1)   config_epoch: u64
//!                            sees: u64 count (≤ 1024), count × (u64 length + UTF-8 ≤ 64)
//!                              (version 2 only: the hosts the writer has direct evidence of
//!                              life from, by heartbeat or slot — relayed, so a host that
//!                              reads only this file learns who is alive beyond it)
//!  8 + N    …  zeros up to offset 4064
//!   4064    32  checksum   SHA-256 of bytes 0 .. 4064 of the slot
//! ```
//!
//! Every write replaces the whole slot in one 4096-byte `pwrite`. A slot that was torn (part
//! old, part new), overwritten with garbage or never written reads as an error
//! ([`SlotError`]), never as a live host: the checksum covers every byte before it, padding
//! included. A reader decides liveness from `tick` changing, not from `wall_ms` (clocks of
//! different hosts differ).
//!
//! # I/O
//!
//! The file is opened with `O_DIRECT` where the filesystem allows it, and every read and write
//! goes through a 4096-aligned buffer, so a write reaches the shared storage at once and a read
//! sees the other hosts' latest writes rather than a cached copy (this matters on NFS). Where
//! `O_DIRECT` is refused (`EINVAL` at open or at the first write), the file is used through the
//! page cache and every write is followed by `fdatasync`; [`StateFile::io_mode`] says which,
//! and it is logged.
//!
//! Every call **blocks** and can hang indefinitely when the storage does (NFS hard mounts do):
//! the daemon must run each call with `tokio::task::spawn_blocking` under
//! `tokio::time::timeout`, and treat a timeout as a failed state-file access (a hung thread is
//! left behind; the next tick starts a new one).
//!
//! A descriptor outlives its path: whether the open file is still the one at the configured
//! path (deleted, replaced, restored) is checked by [`crate::statefile_watch`].

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::config::MAX_NAME_LEN;

/// "EACS": an eac state-file slot.
pub const MAGIC: [u8; 4] = *b"EACS";
/// The slot format version this build writes (it reads this one and [`OLDEST_READABLE`]).
pub const VERSION: u16 = 2;
/// The oldest slot format version this build reads (version 1 has no `sees`).
pub const OLDEST_READABLE: u16 = 1;
/// Bytes per slot (and the alignment of every I/O).
pub const SLOT_SIZE: usize = 4096;
const HEADER_LEN: usize = 8;
const SUM_LEN: usize = 32;
/// The largest encoded body that fits a slot.
pub const MAX_BODY: usize = SLOT_SIZE - HEADER_LEN - SUM_LEN;
/// The most guest names a record may carry when read (a writer keeps what fits in the slot).
pub const MAX_GUESTS: usize = 1024;
/// The most slots (hosts) a state-file can have.
pub const MAX_SLOTS: usize = 256;

/// The size of a state-file for a pool of `hosts` hosts.
pub fn len_for(hosts: usize) -> u64 {
    (hosts * SLOT_SIZE) as u64
}

const BINCODE: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
    bincode::config::Limit<SLOT_SIZE>,
> = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding()
    .with_limit::<SLOT_SIZE>();

/// What a host writes into its slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The owner's host name (a reader checks it is the slot's host).
    pub host: String,
    /// The owner's incarnation (bumped per start).
    pub incarnation: u64,
    /// Incremented at every write: the liveness signal.
    pub tick: u64,
    /// The writer's wall clock, ms since the Unix epoch (informational).
    pub wall_ms: u64,
    /// The owner is isolated and fencing itself.
    pub fencing: bool,
    /// Guests running on the owner (each name ≤ 64 bytes). A writer keeps as many as fit in
    /// the slot and sets `guests_truncated` when some were left out.
    #[serde(deserialize_with = "bounded_guests")]
    pub guests: Vec<String>,
    /// `guests` is incomplete (they did not all fit in 4 KiB).
    pub guests_truncated: bool,
    /// The owner's pool configuration epoch.
    pub config_epoch: u64,
    /// Hosts the owner has direct evidence of life from (heartbeat or slot), relayed to
    /// readers (empty in a version 1 slot).
    #[serde(deserialize_with = "bounded_guests")]
    pub sees: Vec<String>,
}

/// A version 1 slot's record (no `sees`).
#[derive(Deserialize)]
struct SlotRecordV1 {
    host: String,
    incarnation: u64,
    tick: u64,
    wall_ms: u64,
    fencing: bool,
    #[serde(deserialize_with = "bounded_guests")]
    guests: Vec<String>,
    guests_truncated: bool,
    config_epoch: u64,
}

impl From<SlotRecordV1> for SlotRecord {
    fn from(r: SlotRecordV1) -> Self {
        SlotRecord {
            host: r.host,
            incarnation: r.incarnation,
            tick: r.tick,
            wall_ms: r.wall_ms,
            fencing: r.fencing,
            guests: r.guests,
            guests_truncated: r.guests_truncated,
            config_epoch: r.config_epoch,
            sees: Vec::new(),
        }
    }
}

fn bounded_guests<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {MAX_GUESTS} guest names")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let n = seq.size_hint().unwrap_or(0);
            if n > MAX_GUESTS {
                return Err(serde::de::Error::custom(format_args!(
                    "{n} guests (at most {MAX_GUESTS})"
                )));
            }
            let mut v = Vec::with_capacity(n);
            while let Some(s) = seq.next_element::<String>()? {
                if v.len() == MAX_GUESTS {
                    return Err(serde::de::Error::custom("too many guests"));
                }
                v.push(s);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V)
}

/// Why one slot does not hold a valid record. None of these means "alive".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// All zeros: the host never wrote (or the file was just created).
    #[error("slot {slot} ({host}) was never written")]
    Empty { slot: usize, host: String },
    /// Torn write, garbage, or a bad checksum.
    #[error("slot {slot} ({host}) is corrupt: {reason}")]
    Corrupt { slot: usize, host: String, reason: String },
    /// Written by a build that speaks another slot version.
    #[error("slot {slot} ({host}) has format version {got} (this build reads versions 1 to {supported})")]
    UnsupportedVersion {
        slot: usize,
        host: String,
        got: u16,
        supported: u16,
    },
    /// A valid record of another host: the hosts disagree about the pool's host list.
    #[error(
        "slot {slot} belongs to {expected} but holds a record of {found} (do all hosts list the same pool members?)"
    )]
    WrongHost {
        slot: usize,
        expected: String,
        found: String,
    },
}

/// Errors using the state-file as a whole (the state-file channel is down).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    #[error("cannot open the state-file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write slot {slot} of the state-file {path}")]
    Write {
        path: PathBuf,
        slot: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the state-file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad state-file use: {0}")]
    Invalid(String),
}

/// One slot as read: whose it is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRead {
    /// The host the slot belongs to.
    pub host: String,
    /// Its index in the file.
    pub slot: usize,
    /// Its record, or why it has none (never "alive" then).
    pub record: Result<SlotRecord, SlotError>,
}

/// How the state-file's I/O reaches the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: no page cache on either side.
    Direct,
    /// Through the page cache; every write is followed by `fdatasync`.
    Buffered,
}

/// An open state-file. Methods take `&self` and may be called from several threads.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    hosts: Vec<String>,
    file: File,
    /// Set when O_DIRECT was refused after open (first I/O): then `buffered` is used.
    direct: AtomicBool,
    buffered: File,
    warned_truncation: AtomicBool,
}

/// A 4096-aligned region of `len` bytes inside a larger vector (no unsafe code needed).
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + SLOT_SIZE];
        let off = buf.as_ptr().align_offset(SLOT_SIZE);
        Self { buf, off, len }
    }
    fn get(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl StateFile {
    /// Opens (creating if missing, not its directory) the state-file at `path` for the pool
    /// of `hosts` (every host's name, this one included; any order). Slot `i` belongs to the
    /// `i`-th name in sorted order. Prefers `O_DIRECT`.
    pub fn open(path: &Path, hosts: &[String]) -> Result<Self, StateFileError> {
        Self::open_with(path, hosts, IoMode::Direct)
    }

    /// As [`StateFile::open`], choosing the I/O mode (`Buffered` forces the page cache path;
    /// `Direct` still falls back when the filesystem refuses it).
    pub fn open_with(path: &Path, hosts: &[String], prefer: IoMode) -> Result<Self, StateFileError> {
        Self::open_inner(path, hosts, prefer, true)
    }

    /// As [`StateFile::open`], but never creates the file: used to (re)open a state-file that
    /// was replaced or restored while the controller runs (a missing file is then reported,
    /// not silently created where perhaps no other host looks). A regular file shorter than
    /// the pool needs is extended, as at start.
    pub fn open_existing(path: &Path, hosts: &[String]) -> Result<Self, StateFileError> {
        Self::open_inner(path, hosts, IoMode::Direct, false)
    }

    fn open_inner(path: &Path, hosts: &[String], prefer: IoMode, create: bool) -> Result<Self, StateFileError> {
        let mut sorted = hosts.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != hosts.len() {
            return Err(StateFileError::Invalid("a host is listed twice".into()));
        }
        if sorted.is_empty() || sorted.len() > MAX_SLOTS {
            return Err(StateFileError::Invalid(format!(
                "{} hosts (1 to {MAX_SLOTS})",
                sorted.len()
            )));
        }
        if let Some(h) = sorted.iter().find(|h| h.is_empty() || h.len() > MAX_NAME_LEN) {
            return Err(StateFileError::Invalid(format!(
                "host name {h:?} must be 1 to {MAX_NAME_LEN} bytes"
            )));
        }
        let open_err = |source| StateFileError::Open {
            path: path.to_owned(),
            source,
        };
        let opts = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(create).mode(0o644);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o
        };
        let buffered = opts(false).open(path).map_err(open_err)?;
        let meta = buffered.metadata().map_err(open_err)?;
        if !meta.is_file() {
            // A directory cannot be opened for writing; a FIFO, socket or device can.
            return Err(open_err(io::Error::other("not a regular file")));
        }
        let need = len_for(sorted.len());
        let len = meta.len();
        if len < need {
            // New slots read as zeros ("never written").
            buffered.set_len(need).map_err(open_err)?;
            buffered.sync_all().map_err(open_err)?;
        }
        let (file, direct) = match prefer {
            IoMode::Buffered => (buffered.try_clone().map_err(open_err)?, false),
            IoMode::Direct => match opts(true).open(path) {
                Ok(f) => (f, true),
                Err(e) if is_einval(&e) => {
                    tracing::info!(path = %path.display(), "state-file: the filesystem refuses O_DIRECT; using the page cache with fdatasync");
                    (buffered.try_clone().map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            },
        };
        // Two opens of the path: make sure they reached the same file (it may be replaced at
        // any moment).
        let same = |a: &File, b: &File| -> io::Result<bool> {
            use std::os::unix::fs::MetadataExt;
            let (a, b) = (a.metadata()?, b.metadata()?);
            Ok(a.dev() == b.dev() && a.ino() == b.ino())
        };
        if !same(&file, &buffered).map_err(open_err)? {
            return Err(open_err(io::Error::other(
                "the file was replaced while it was being opened",
            )));
        }
        if direct {
            tracing::info!(path = %path.display(), slots = sorted.len(), "state-file opened with O_DIRECT");
        }
        Ok(Self {
            path: path.to_owned(),
            hosts: sorted,
            file,
            direct: AtomicBool::new(direct),
            buffered,
            warned_truncation: AtomicBool::new(false),
        })
    }

    /// The I/O mode in use.
    pub fn io_mode(&self) -> IoMode {
        if self.direct.load(Ordering::Relaxed) {
            IoMode::Direct
        } else {
            IoMode::Buffered
        }
    }

    /// The pool's host names in slot order.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The slot index of `host`.
    pub fn slot_of(&self, host: &str) -> Option<usize> {
        self.hosts.binary_search_by(|h| h.as_str().cmp(host)).ok()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `fstat` of the open file (its identity, even after the path was removed or replaced).
    /// Blocks like every other I/O.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.buffered.metadata()
    }

    /// Switches to buffered I/O after the filesystem refused an O_DIRECT transfer.
    fn fall_back(&self, during: &str, e: &io::Error) {
        if self.direct.swap(false, Ordering::Relaxed) {
            tracing::info!(path = %self.path.display(), error = %e, "state-file: O_DIRECT {during} refused; using the page cache with fdatasync");
        }
    }

    /// Writes `record` into its host's slot (one whole-slot write). If the guest list does not
    /// fit in the slot, the guests that fit are kept and `guests_truncated` is set (a slot is
    /// always written: a host that stops writing looks dead).
    pub fn write_slot(&self, record: &SlotRecord) -> Result<(), StateFileError> {
        let slot = self.slot_of(&record.host).ok_or_else(|| {
            StateFileError::Invalid(format!(
                "host {:?} has no slot (not in the pool's host list)",
                record.host
            ))
        })?;
        if let Some(g) = record.guests.iter().find(|g| g.is_empty() || g.len() > MAX_NAME_LEN) {
            return Err(StateFileError::Invalid(format!(
                "guest name {g:?} must be 1 to {MAX_NAME_LEN} bytes"
            )));
        }
        let mut buf = Aligned::zeroed(SLOT_SIZE);
        let n = self.encode(record, buf.get_mut())?;
        tracing::trace!(slot, tick = record.tick, body = n, "state-file slot write");
        let offset = (slot * SLOT_SIZE) as u64;
        let write_err = |source| StateFileError::Write {
            path: self.path.clone(),
            slot,
            source,
        };
        if self.direct.load(Ordering::Relaxed) {
            match self.file.write_all_at(buf.get(), offset) {
                Ok(()) => return Ok(()),
                Err(e) if is_einval(&e) => self.fall_back("write", &e),
                Err(e) => return Err(write_err(e)),
            }
        }
        self.buffered.write_all_at(buf.get(), offset).map_err(write_err)?;
        self.buffered.sync_data().map_err(write_err)
    }

    /// Encodes `record` into `slot` (SLOT_SIZE bytes); returns the body length. Warns once per
    /// handle when guests had to be left out.
    fn encode(&self, record: &SlotRecord, slot: &mut [u8]) -> Result<usize, StateFileError> {
        let (n, kept) = encode_slot(record, slot)?;
        if kept < record.guests.len() && !self.warned_truncation.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                host = %record.host, guests = record.guests.len(), kept,
                "state-file: the guest list does not fit in a 4 KiB slot; only the first guests are recorded"
            );
        }
        Ok(n)
    }

    /// Reads every slot in one read: per host (slot order), its record or why it has none.
    /// `Err` means the state-file itself could not be read.
    pub fn read_all(&self) -> Result<Vec<SlotRead>, StateFileError> {
        let len = self.hosts.len() * SLOT_SIZE;
        let mut buf = Aligned::zeroed(len);
        self.read_at(buf.get_mut(), 0)?;
        Ok(self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| SlotRead {
                host: h.clone(),
                slot: i,
                record: decode_slot(i, h, &buf.get()[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]),
            })
            .collect())
    }

    /// Reads one host's slot.
    pub fn read_slot(&self, host: &str) -> Result<Result<SlotRecord, SlotError>, StateFileError> {
        let slot = self
            .slot_of(host)
            .ok_or_else(|| StateFileError::Invalid(format!("host {host:?} has no slot")))?;
        let mut buf = Aligned::zeroed(SLOT_SIZE);
        self.read_at(buf.get_mut(), (slot * SLOT_SIZE) as u64)?;
        Ok(decode_slot(slot, host, buf.get()))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StateFileError> {
        let read_err = |source| StateFileError::Read {
            path: self.path.clone(),
            source,
        };
        if self.direct.load(Ordering::Relaxed) {
            match self.file.read_exact_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if is_einval(&e) => self.fall_back("read", &e),
                Err(e) => return Err(read_err(e)),
            }
        }
        self.buffered.read_exact_at(buf, offset).map_err(read_err)
    }
}

/// Encodes `record` into `slot` (exactly [`SLOT_SIZE`] bytes, overwritten entirely): header,
/// body, zero padding, checksum — what [`decode_slot`] reads. If the guest list does not fit,
/// the first guests that fit are kept and `guests_truncated` is set. Returns the body length
/// and how many guests were kept. Never panics.
pub fn encode_slot(record: &SlotRecord, slot: &mut [u8]) -> Result<(usize, usize), StateFileError> {
    if slot.len() != SLOT_SIZE {
        return Err(StateFileError::Invalid(format!(
            "a slot buffer of {} bytes (a slot is {SLOT_SIZE})",
            slot.len()
        )));
    }
    let mut r = record.clone();
    let body = loop {
        let b = bincode::serde::encode_to_vec(&r, BINCODE)
            .map_err(|e| StateFileError::Invalid(format!("slot record does not encode: {e}")));
        match b {
            Ok(b) if b.len() <= MAX_BODY => break b,
            _ if !r.guests.is_empty() => {
                let keep = r.guests.len().saturating_sub(r.guests.len() / 8 + 1);
                r.guests.truncate(keep);
                r.guests_truncated = true;
            }
            // Only in pools of dozens of hosts with long names: relay what fits.
            _ if !r.sees.is_empty() => {
                let keep = r.sees.len().saturating_sub(r.sees.len() / 8 + 1);
                r.sees.truncate(keep);
            }
            Ok(b) => {
                return Err(StateFileError::Invalid(format!(
                    "slot record of {} bytes without guests exceeds {MAX_BODY}",
                    b.len()
                )));
            }
            Err(e) => return Err(e),
        }
    };
    slot.fill(0);
    slot[..4].copy_from_slice(&MAGIC);
    slot[4..6].copy_from_slice(&VERSION.to_be_bytes());
    slot[6..8].copy_from_slice(&(body.len() as u16).to_be_bytes());
    slot[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(&body);
    let sum = Sha256::digest(&slot[..SLOT_SIZE - SUM_LEN]);
    slot[SLOT_SIZE - SUM_LEN..].copy_from_slice(&sum);
    Ok((body.len(), r.guests.len()))
}

/// Checks and decodes one slot's bytes. Never panics.
pub fn decode_slot(slot: usize, host: &str, b: &[u8]) -> Result<SlotRecord, SlotError> {
    let corrupt = |reason: String| SlotError::Corrupt {
        slot,
        host: host.to_owned(),
        reason,
    };
    if b.len() != SLOT_SIZE {
        return Err(corrupt(format!("{} bytes (a slot is {SLOT_SIZE})", b.len())));
    }
    if b.iter().all(|&x| x == 0) {
        return Err(SlotError::Empty {
            slot,
            host: host.to_owned(),
        });
    }
    let (data, sum) = b.split_at(SLOT_SIZE - SUM_LEN);
    if Sha256::digest(data).as_slice() != sum {
        return Err(corrupt("checksum mismatch (torn or partial write, or garbage)".into()));
    }
    if b[..4] != MAGIC {
        return Err(corrupt(format!("bad magic {:02x?}", &b[..4])));
    }
    let version = u16::from_be_bytes([b[4], b[5]]);
    if !(OLDEST_READABLE..=VERSION).contains(&version) {
        return Err(SlotError::UnsupportedVersion {
            slot,
            host: host.to_owned(),
            got: version,
            supported: VERSION,
        });
    }
    let n = usize::from(u16::from_be_bytes([b[6], b[7]]));
    if n > MAX_BODY {
        return Err(corrupt(format!("body length {n} exceeds {MAX_BODY}")));
    }
    let body = &b[HEADER_LEN..HEADER_LEN + n];
    let (r, used): (SlotRecord, usize) = if version == 1 {
        bincode::serde::decode_from_slice::<SlotRecordV1, _>(body, BINCODE).map(|(r, n)| (r.into(), n))
    } else {
        bincode::serde::decode_from_slice(body, BINCODE)
    }
    .map_err(|e| corrupt(format!("record does not decode: {e}")))?;
    if used != n {
        return Err(corrupt(format!("{} trailing bytes after the record", n - used)));
    }
    if data[HEADER_LEN + n..].iter().any(|&x| x != 0) {
        return Err(corrupt("non-zero padding".into()));
    }
    // The writer's rule (`write_slot`): every name 1 to 64 bytes.
    let bad_name = |n: &String| n.is_empty() || n.len() > MAX_NAME_LEN;
    if bad_name(&r.host) || r.guests.iter().chain(&r.sees).any(bad_name) {
        return Err(corrupt(format!("a name is empty or longer than {MAX_NAME_LEN} bytes")));
    }
    if r.host != host {
        return Err(SlotError::WrongHost {
            slot,
            expected: host.to_owned(),
            found: r.host,
        });
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::TempDir;

    fn hosts() -> Vec<String> {
        vec!["b".into(), "a".into(), "c".into()]
    }

    fn rec(host: &str, tick: u64) -> SlotRecord {
        SlotRecord {
            host: host.into(),
            incarnation: 3,
            tick,
            wall_ms: 1_700_000_000_000 + tick,
            fencing: false,
            guests: vec!["web".into(), "db".into()],
            guests_truncated: false,
            config_epoch: 9,
            sees: vec!["b".into()],
        }
    }

    fn fs_type(p: &Path) -> String {
        std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(p)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    }

    fn two_hosts_see_each_other(base: &Path, prefer: IoMode) -> IoMode {
        let dir = TempDir::new_in(base, "statefile-test");
        let path = dir.0.join("statefile");
        let a = StateFile::open_with(&path, &hosts(), prefer).unwrap();
        let b = StateFile::open_with(&path, &hosts(), prefer).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * 4096);
        assert_eq!(a.slot_of("a"), Some(0));
        assert_eq!(a.slot_of("c"), Some(2));
        // Nothing written yet: every slot is empty, none alive.
        for r in a.read_all().unwrap() {
            assert!(matches!(r.record, Err(SlotError::Empty { .. })), "{r:?}");
        }
        for tick in 1..=20 {
            a.write_slot(&rec("a", tick)).unwrap();
            b.write_slot(&rec("b", tick * 10)).unwrap();
            let seen_by_b = b.read_all().unwrap();
            assert_eq!(
                seen_by_b[0],
                SlotRead {
                    host: "a".into(),
                    slot: 0,
                    record: Ok(rec("a", tick))
                }
            );
            let seen_by_a = a.read_slot("b").unwrap();
            assert_eq!(seen_by_a, Ok(rec("b", tick * 10)));
            assert!(matches!(seen_by_a, Ok(SlotRecord { tick: t, .. }) if t == tick * 10));
        }
        assert!(matches!(
            a.read_slot("c").unwrap(),
            Err(SlotError::Empty { slot: 2, .. })
        ));
        // A third handle opened later sees the same.
        let c = StateFile::open_with(&path, &hosts(), prefer).unwrap();
        assert_eq!(c.read_slot("a").unwrap().unwrap().tick, 20);
        assert_eq!(a.io_mode(), b.io_mode());
        a.io_mode()
    }

    #[test]
    fn two_hosts_see_each_others_writes_with_o_direct_where_supported() {
        for base in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
            if !base.is_dir() {
                println!("{}: not present, not tested", base.display());
                continue;
            }
            let mode = two_hosts_see_each_other(&base, IoMode::Direct);
            println!("state-file on {} ({}): {:?}", base.display(), fs_type(&base), mode);
        }
    }

    #[test]
    fn two_hosts_see_each_others_writes_buffered() {
        assert_eq!(
            two_hosts_see_each_other(&std::env::temp_dir(), IoMode::Buffered),
            IoMode::Buffered
        );
    }

    #[test]
    fn o_direct_is_used_on_ext4_and_tmpfs() {
        // This machine's /tmp is ext4 and /dev/shm tmpfs (≥ 6.6 accepts O_DIRECT): prove the
        // direct path really runs, and report where it does not.
        for base in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
            let t = fs_type(&base);
            let dir = TempDir::new_in(&base, "statefile-test");
            let f = StateFile::open(&dir.0.join("sf"), &hosts()).unwrap();
            f.write_slot(&rec("a", 1)).unwrap();
            f.read_all().unwrap();
            println!("{} ({t}): {:?}", base.display(), f.io_mode());
            if t == "ext2/ext3" || t == "ext4" || t == "xfs" {
                assert_eq!(f.io_mode(), IoMode::Direct, "{t} supports O_DIRECT");
            }
        }
    }

    #[test]
    fn torn_and_garbage_slots_read_as_corrupt_never_alive() {
        let dir = TempDir::new_in(&std::env::temp_dir(), "statefile-test");
        let path = dir.0.join("statefile");
        let a = StateFile::open(&path, &hosts()).unwrap();
        a.write_slot(&rec("a", 5)).unwrap();
        a.write_slot(&rec("b", 6)).unwrap();
        let raw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A torn write: the first half of slot a is new garbage, the second half old.
        raw.write_all_at(&[0xa5; SLOT_SIZE / 2], 0).unwrap();
        // Slot b: a valid slot with the second half replaced by a newer record's (torn between
        // two valid writes).
        let other = TempDir::new_in(&std::env::temp_dir(), "statefile-test");
        let o = StateFile::open(&other.0.join("sf"), &hosts()).unwrap();
        let mut newer = rec("b", 7);
        newer.guests = (0..40).map(|i| format!("guest-{i}")).collect();
        o.write_slot(&newer).unwrap();
        let mut newer_bytes = vec![0u8; SLOT_SIZE];
        std::fs::File::open(other.0.join("sf"))
            .unwrap()
            .read_exact_at(&mut newer_bytes, SLOT_SIZE as u64)
            .unwrap();
        raw.write_all_at(&newer_bytes[..512], SLOT_SIZE as u64).unwrap();
        raw.sync_all().unwrap();
        let r = a.read_all().unwrap();
        assert!(
            matches!(&r[0].record, Err(SlotError::Corrupt { slot: 0, reason, .. }) if reason.contains("checksum")),
            "{:?}",
            r[0]
        );
        assert!(
            matches!(&r[1].record, Err(SlotError::Corrupt { slot: 1, .. })),
            "{:?}",
            r[1]
        );
        assert!(matches!(&r[2].record, Err(SlotError::Empty { slot: 2, .. })));
        // Rewriting repairs it.
        a.write_slot(&rec("a", 6)).unwrap();
        assert_eq!(a.read_slot("a").unwrap(), Ok(rec("a", 6)));
    }

    #[test]
    fn decode_rejects_every_kind_of_damage_without_panicking() {
        let dir = TempDir::new_in(&std::env::temp_dir(), "statefile-test");
        let f = StateFile::open(&dir.0.join("sf"), &hosts()).unwrap();
        let mut slot = vec![0u8; SLOT_SIZE];
        f.encode(&rec("a", 1), &mut slot).unwrap();
        assert_eq!(decode_slot(0, "a", &slot), Ok(rec("a", 1)));
        // Valid record in the wrong slot (hosts disagree about the host list).
        assert!(matches!(
            decode_slot(1, "b", &slot),
            Err(SlotError::WrongHost { found, .. }) if found == "a"
        ));
        // Every single-bit flip is caught.
        for i in (0..SLOT_SIZE).step_by(7) {
            let mut t = slot.clone();
            t[i] ^= 0x10;
            assert!(decode_slot(0, "a", &t).is_err(), "flip at {i} accepted");
        }
        // Another version, correctly checksummed.
        let mut v3 = slot.clone();
        v3[4..6].copy_from_slice(&3u16.to_be_bytes());
        let sum = Sha256::digest(&v3[..SLOT_SIZE - SUM_LEN]);
        v3[SLOT_SIZE - SUM_LEN..].copy_from_slice(&sum);
        assert!(matches!(
            decode_slot(0, "a", &v3),
            Err(SlotError::UnsupportedVersion { got: 3, .. })
        ));
        // A version 1 slot (no `sees`: the body ends after config_epoch) is still read.
        let mut r1 = rec("a", 1);
        r1.sees.clear();
        let mut v1 = vec![0u8; SLOT_SIZE];
        let body = bincode::serde::encode_to_vec(&r1, BINCODE).unwrap();
        let body = &body[..body.len() - 8]; // drop the empty `sees` (its u64 count)
        v1[..4].copy_from_slice(&MAGIC);
        v1[4..6].copy_from_slice(&1u16.to_be_bytes());
        v1[6..8].copy_from_slice(&(body.len() as u16).to_be_bytes());
        v1[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
        let sum = Sha256::digest(&v1[..SLOT_SIZE - SUM_LEN]);
        v1[SLOT_SIZE - SUM_LEN..].copy_from_slice(&sum);
        assert_eq!(decode_slot(0, "a", &v1), Ok(r1));
        // Random contents with a valid checksum reach the decoder and are refused.
        let mut x = 0x1234_5678_9abc_def0u64;
        for round in 0..2000 {
            let mut t = vec![0u8; SLOT_SIZE];
            for b in t.iter_mut().take(64 + round % 512) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round % 2 == 0 {
                t[..4].copy_from_slice(&MAGIC);
                t[4..6].copy_from_slice(&VERSION.to_be_bytes());
            }
            let sum = Sha256::digest(&t[..SLOT_SIZE - SUM_LEN]);
            t[SLOT_SIZE - SUM_LEN..].copy_from_slice(&sum);
            assert!(decode_slot(0, "a", &t).is_err());
        }
        assert!(decode_slot(0, "a", &slot[..100]).is_err());
    }

    #[test]
    fn a_long_guest_list_is_truncated_not_refused() {
        let dir = TempDir::new_in(&std::env::temp_dir(), "statefile-test");
        let f = StateFile::open(&dir.0.join("sf"), &hosts()).unwrap();
        let mut r = rec("c", 1);
        r.guests = (0..200).map(|i| format!("{i:0>64}")).collect();
        f.write_slot(&r).unwrap();
        let got = f.read_slot("c").unwrap().unwrap();
        assert!(got.guests_truncated);
        assert!(got.guests.len() > 40 && got.guests.len() < 60, "{}", got.guests.len());
        assert_eq!(got.guests[..], r.guests[..got.guests.len()]);
        // Misuse is an error, not a panic.
        assert!(f.write_slot(&rec("zz", 1)).is_err());
        let mut bad = rec("a", 1);
        bad.guests.push("x".repeat(65));
        assert!(f.write_slot(&bad).is_err());
        assert!(StateFile::open(&dir.0.join("sf2"), &["a".into(), "a".into()]).is_err());
        assert!(matches!(
            StateFile::open(Path::new("/nonexistent-eac-dir/sf"), &hosts()),
            Err(StateFileError::Open { .. })
        ));
    }

    #[test]
    fn a_growing_pool_keeps_existing_slots_readable() {
        let dir = TempDir::new_in(&std::env::temp_dir(), "statefile-test");
        let path = dir.0.join("sf");
        let two = StateFile::open(&path, &["a".into(), "b".into()]).unwrap();
        two.write_slot(&rec("a", 1)).unwrap();
        let three = StateFile::open(&path, &hosts()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * 4096);
        assert_eq!(three.read_slot("a").unwrap(), Ok(rec("a", 1)));
        assert!(matches!(three.read_slot("c").unwrap(), Err(SlotError::Empty { .. })));
    }

    #[test]
    fn a_slot_with_a_name_no_writer_writes_is_corrupt() {
        // encode_slot does not check names (write_slot does), so it makes the slots a
        // foreign or broken writer could leave: each must read as corrupt, not as a record.
        for (host, guest) in [("b", ""), ("b", &"g".repeat(65)[..]), ("", "web")] {
            let mut r = rec("b", 1);
            r.host = host.into();
            r.guests = vec!["ok".into(), guest.into()];
            let mut slot = vec![0u8; SLOT_SIZE];
            encode_slot(&r, &mut slot).unwrap();
            let got = decode_slot(1, "b", &slot);
            assert!(
                matches!(&got, Err(SlotError::Corrupt { reason, .. }) if reason.contains("empty or longer")),
                "{host:?} {guest:?}: {got:?}"
            );
        }
        let mut slot = vec![0u8; SLOT_SIZE];
        encode_slot(&rec("b", 1), &mut slot).unwrap();
        assert_eq!(decode_slot(1, "b", &slot), Ok(rec("b", 1)));
        assert!(encode_slot(&rec("b", 1), &mut [0u8; 100]).is_err());
    }
}
