//! The metadata file of one mirrored disk: superblock, activity log, dirty bitmap.
//!
//! The file lives next to the backing store, never inside the guest's data. Layout (all
//! integers little-endian, every 4 KiB block that carries a checksum ends with a CRC-32C of
//! the bytes before it):
//!
//! | offset | size | content |
//! |--------|------|---------|
//! | 0      | 4 KiB | superblock slot 0 |
//! | 4 KiB  | 4 KiB | superblock slot 1 |
//! | 8 KiB  | 4 KiB | activity-log slot 0 |
//! | 12 KiB | 4 KiB | activity-log slot 1 |
//! | 16 KiB | ⌈regions / 8⌉ rounded up to 4 KiB | dirty bitmap, 1 bit per region, LSB first in 64-bit words |
//!
//! **Superblock** — magic `EACMIRMD`, format version, a sequence number, the device id,
//! size, region size, activity-log geometry, the [`GenIds`], role and flags (consistent,
//! crashed primary, discard-my-data, *clean*). Each update writes the slot the previous one
//! did not use (`sequence % 2`) and `fdatasync`s; opening takes the valid slot with the
//! higher sequence, so a torn superblock write falls back to the previous state.
//!
//! **Activity log (AL)** — the extents (default 4 MiB each) that may have writes in flight,
//! with its own magic `EACMIRAL`, sequence and checksum, in two alternating slots like the
//! superblock. [`Meta::al_begin`] persists the log *before* a write to a newly active extent
//! may start; extents stay in the log while idle (so a hot extent costs no metadata write),
//! until a new one needs the slot: then the idle extent's bitmap pages are written first and
//! the log afterwards. After a crash (the superblock's *clean* flag is not set) every extent
//! in the log is marked dirty, so only those regions are resynced.
//!
//! **Bitmap** — one bit per region (default 4 KiB): set = this region may differ from the
//! peer. Kept in memory; written in 4 KiB pages, only the pages that changed, on
//! [`Meta::flush_bitmap`], on AL eviction and on [`Meta::close_clean`]. Bits set inside an
//! active AL extent are covered by the AL until then; bits set elsewhere (e.g. merged from
//! the peer) are durable after the next `flush_bitmap`.
//!
//! The API is synchronous (`pwrite` + `fdatasync`); the engine keeps a `Meta` behind a mutex
//! and calls the persisting methods from a blocking thread. The file is locked (`flock`)
//! while open, so two daemons cannot use the same metadata.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::genid::{GenIds, Role, Side};

/// The metadata block size: superblock and AL slots, bitmap pages.
pub const BLOCK: u64 = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"EACMIRMD";
/// Activity-log magic.
pub const AL_MAGIC: [u8; 8] = *b"EACMIRAL";
/// The metadata format version this build reads and writes.
pub const META_VERSION: u32 = 1;
/// Offset of the first superblock slot (the second follows).
const SB_OFFSET: u64 = 0;
/// Offset of the first activity-log slot (the second follows).
const AL_OFFSET: u64 = 2 * BLOCK;
/// Offset of the bitmap area.
pub const BITMAP_OFFSET: u64 = 4 * BLOCK;
/// Where the CRC-32C of a checksummed block is stored (over the bytes before it).
const CSUM_AT: usize = BLOCK as usize - 4;
/// Header bytes of an AL slot before the extent list.
const AL_HEADER: usize = 32;
/// The most extents one AL slot can hold (`al_slots` may not exceed it; busy extents may
/// temporarily overflow `al_slots` up to it).
pub const AL_MAX_SLOTS: u32 = ((CSUM_AT - AL_HEADER) / 8) as u32;
/// The largest bitmap this build accepts (1 GiB: 32 TiB of disk at 4 KiB regions).
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;
/// 64-bit words per bitmap page.
const WORDS_PER_PAGE: usize = BLOCK as usize / 8;

const FLAG_CONSISTENT: u8 = 1;
const FLAG_CRASHED_PRIMARY: u8 = 2;
const FLAG_DISCARD_MY_DATA: u8 = 4;
const FLAG_CLEAN: u8 = 8;
const FLAG_NEVER_STARTED: u8 = 16;
const FLAGS_KNOWN: u8 = FLAG_CONSISTENT | FLAG_CRASHED_PRIMARY | FLAG_DISCARD_MY_DATA | FLAG_CLEAN | FLAG_NEVER_STARTED;

/// Everything that can go wrong with a metadata file. Messages are written for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The file does not exist.
    #[error("metadata file {} does not exist (create it for a new disk)", path.display())]
    NotFound { path: PathBuf },
    /// `create` found a file already there.
    #[error("metadata file {} already exists; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    /// Another process (or another `Meta` in this one) has the file open.
    #[error("metadata file {} is in use by another ublk-mirror process", path.display())]
    Locked { path: PathBuf },
    /// A system call on the file failed.
    #[error("cannot {op} metadata file {}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Neither superblock slot carries our magic: some other file.
    #[error("{} is not ublk-mirror metadata (no superblock magic in either slot); wrong path?", path.display())]
    NotMetadata { path: PathBuf },
    /// Written by a different format version.
    #[error("metadata file {} has format version {found}; this build reads version {META_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    /// Both superblock slots are damaged, or the content is inconsistent.
    #[error("metadata file {} is corrupt: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The file is shorter than its layout.
    #[error("metadata file {} is truncated: {len} bytes, the layout needs {need}", path.display())]
    Truncated { path: PathBuf, len: u64, need: u64 },
    /// The file belongs to another disk.
    #[error("metadata file {} belongs to device {found:016x}, not {expected:016x}", path.display())]
    DeviceMismatch { path: PathBuf, expected: u64, found: u64 },
    /// The file describes a disk of another size than the backing store.
    #[error(
        "metadata file {} describes a {meta_size}-byte disk but the backing store has {device_size} bytes",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        meta_size: u64,
        device_size: u64,
    },
    /// `create` was given unusable parameters.
    #[error("invalid metadata parameters: {detail}")]
    InvalidParams { detail: String },
    /// [`Meta::update`] tried to change a field fixed at creation.
    #[error("the superblock field {field} is fixed at creation and cannot be changed")]
    Immutable { field: &'static str },
    /// Every activity-log slot has writes in flight.
    #[error("activity log full: {active} extents have writes in flight (at most {max})")]
    ActivityLogFull { active: usize, max: usize },
    /// [`Meta::close_clean`] while writes are in flight.
    #[error("cannot close metadata cleanly: {active} activity-log extents still have writes in flight")]
    Busy { active: usize },
}

/// Geometry of a metadata file, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaParams {
    /// Size of the mirrored disk in bytes.
    pub size: u64,
    /// Bytes per bitmap bit (a power of two, 512 B … 1 GiB; default 4096).
    pub region_size: u32,
    /// Bytes per activity-log extent (a power of two, ≥ `region_size`; default 4 MiB).
    pub al_extent: u64,
    /// Extents the activity log keeps (1 … [`AL_MAX_SLOTS`]; default 64).
    pub al_slots: u32,
}

impl Default for MetaParams {
    /// The defaults with `size` 0 (which [`validate`](MetaParams::validate) refuses): use as
    /// `MetaParams { size, ..Default::default() }`.
    fn default() -> MetaParams {
        MetaParams::with_size(0)
    }
}

impl MetaParams {
    /// The defaults for a disk of `size` bytes: 4 KiB regions, 256 extents of 4 MiB (1 GiB of
    /// hot data without activity-log writes; a crash resyncs at most that much). 64 was too
    /// few: bench-mirror's 1000 MiB random-write working set paid an AL write per request.
    pub fn with_size(size: u64) -> MetaParams {
        MetaParams {
            size,
            region_size: 4096,
            al_extent: 4 << 20,
            al_slots: 256,
        }
    }

    /// Number of bitmap bits.
    pub fn regions(&self) -> u64 {
        self.size.div_ceil(u64::from(self.region_size.max(1)))
    }

    /// Number of activity-log extents on the disk.
    pub fn extents(&self) -> u64 {
        self.size.div_ceil(self.al_extent.max(1))
    }

    /// Bytes of the bitmap area (a multiple of [`BLOCK`]).
    pub fn bitmap_bytes(&self) -> u64 {
        self.regions()
            .div_ceil(64)
            .saturating_mul(8)
            .div_ceil(BLOCK)
            .saturating_mul(BLOCK)
    }

    /// The size of the whole metadata file.
    pub fn file_len(&self) -> u64 {
        BITMAP_OFFSET.saturating_add(self.bitmap_bytes())
    }

    /// Checks the geometry; the message names the offending value.
    pub fn validate(&self) -> Result<(), String> {
        let rs = u64::from(self.region_size);
        if self.size == 0 {
            return Err("size is 0".into());
        }
        if !rs.is_power_of_two() || !(512..=1 << 30).contains(&rs) {
            return Err(format!("region_size {rs} is not a power of two between 512 and 1 GiB"));
        }
        if !self.al_extent.is_power_of_two() || self.al_extent < rs {
            return Err(format!(
                "al_extent {} is not a power of two ≥ region_size {rs}",
                self.al_extent
            ));
        }
        if self.al_slots == 0 || self.al_slots > AL_MAX_SLOTS {
            return Err(format!(
                "al_slots {} is not between 1 and {AL_MAX_SLOTS}",
                self.al_slots
            ));
        }
        if self.bitmap_bytes() > MAX_BITMAP_BYTES {
            return Err(format!(
                "a {}-byte disk at {rs}-byte regions needs a {}-byte bitmap (at most {MAX_BITMAP_BYTES}); use larger regions",
                self.size,
                self.bitmap_bytes()
            ));
        }
        Ok(())
    }
}

/// Per-copy state flags kept in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetaFlags {
    /// The copy holds a complete data set (false for a blank replica and an unfinished
    /// resync target).
    pub consistent: bool,
    /// The copy was primary when its host crashed; cleared by the engine after the resync.
    pub crashed_primary: bool,
    /// The administrator chose this copy as the split-brain victim.
    pub discard_my_data: bool,
    /// Created as the first primary (`create-meta --consistent`) and never started since:
    /// the one state in which a daemon configured as primary serves at once, without the
    /// peer confirming that this copy is current. Cleared by the first start in any role.
    pub never_started: bool,
}

/// The persistent identity and state of one copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    /// Identifies the mirrored disk (both copies share it). Fixed at creation.
    pub device_id: u64,
    /// Disk size in bytes. Fixed at creation.
    pub size: u64,
    /// Bytes per bitmap region. Fixed at creation.
    pub region_size: u32,
    /// Generation identifiers.
    pub r#gen: GenIds,
    /// Role at the last update.
    pub role: Role,
    /// State flags.
    pub flags: MetaFlags,
}

impl Superblock {
    /// This copy as one side of [`decide`](crate::genid::decide).
    pub fn side(&self) -> Side {
        Side {
            device_id: self.device_id,
            size: self.size,
            r#gen: self.r#gen,
            role: self.role,
            consistent: self.flags.consistent,
            crashed_primary: self.flags.crashed_primary,
            discard_my_data: self.flags.discard_my_data,
        }
    }
}

/// What [`Meta::open`] did because the previous run did not close cleanly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// Activity-log extents whose regions were marked dirty.
    pub al_extents: usize,
    /// No activity-log slot was readable: the whole disk was marked dirty.
    pub all_dirty: bool,
    /// Dirty bytes the recovery added.
    pub added_dirty_bytes: u64,
    /// The copy was primary: `crashed_primary` was set.
    pub crashed_primary: bool,
}

/// Counters for the status and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStats {
    /// Activity-log writes (each followed by `fdatasync`).
    pub al_persists: u64,
    /// Idle extents evicted from the activity log.
    pub al_evictions: u64,
    /// Bitmap pages written.
    pub bitmap_pages_written: u64,
    /// Superblock writes.
    pub superblock_writes: u64,
}

/// One activity-log entry in memory.
#[derive(Clone, Copy, Debug)]
struct AlEntry {
    extent: u64,
    /// Writes in flight in this extent.
    refs: u32,
    /// For least-recently-used eviction.
    last_used: u64,
}

/// An open metadata file. See the module documentation.
#[derive(Debug)]
pub struct Meta {
    path: PathBuf,
    file: Flock<File>,
    params: MetaParams,
    sb: Superblock,
    /// Sequence of the newest valid superblock on disk.
    sb_seq: u64,
    /// The clean flag as last written.
    clean_on_disk: bool,
    regions: u64,
    words: Vec<u64>,
    /// Set bits in `words`.
    dirty_regions: u64,
    /// Bitmap pages changed since they were last written.
    page_dirty: Vec<bool>,
    al: Vec<AlEntry>,
    /// Sequence of the newest valid AL slot on disk.
    al_seq: u64,
    /// The extents the newest AL slot on disk lists (sorted).
    al_on_disk: Vec<u64>,
    tick: u64,
    recovery: Option<Recovery>,
    stats: MetaStats,
}

impl Meta {
    /// Creates a new metadata file for a disk (refuses to overwrite an existing file): the
    /// generation is [`GEN_JUST_CREATED`](crate::genid::GEN_JUST_CREATED), role Secondary,
    /// not consistent, bitmap clean. The engine sets role, flags and generation with
    /// [`update`](Meta::update). `device_id` must not be 0.
    pub fn create(path: impl AsRef<Path>, params: MetaParams, device_id: u64) -> Result<Meta, MetaError> {
        let path = path.as_ref().to_path_buf();
        params
            .validate()
            .map_err(|detail| MetaError::InvalidParams { detail })?;
        if device_id == 0 {
            return Err(MetaError::InvalidParams {
                detail: "device id 0 is reserved".into(),
            });
        }
        let file = match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(MetaError::Exists { path }),
            Err(source) => {
                return Err(MetaError::Io {
                    path,
                    op: "create",
                    source,
                });
            }
        };
        let file = lock(file, &path)?;
        let len = params.file_len();
        file.set_len(len).map_err(io_err(&path, "size"))?;
        let regions = params.regions();
        let words = usize::try_from(regions.div_ceil(64)).map_err(|_| MetaError::InvalidParams {
            detail: "bitmap too large for this machine".into(),
        })?;
        let pages = words.div_ceil(WORDS_PER_PAGE);
        let mut meta = Meta {
            sb: Superblock {
                device_id,
                size: params.size,
                region_size: params.region_size,
                r#gen: GenIds::just_created(),
                role: Role::Secondary,
                flags: MetaFlags::default(),
            },
            path,
            file,
            params,
            sb_seq: 0,
            clean_on_disk: false,
            regions,
            words: vec![0; words],
            dirty_regions: 0,
            page_dirty: vec![false; pages],
            al: Vec::new(),
            al_seq: 0,
            al_on_disk: Vec::new(),
            tick: 0,
            recovery: None,
            stats: MetaStats::default(),
        };
        // Both slots of each pair valid from the start (sequence 0 and 1).
        let sb = meta.sb.clone();
        meta.write_block(SB_OFFSET, &encode_sb(&sb, &params, 0, false), "write the superblock of")?;
        meta.write_block(
            SB_OFFSET + BLOCK,
            &encode_sb(&sb, &params, 1, false),
            "write the superblock of",
        )?;
        meta.write_block(AL_OFFSET, &encode_al(device_id, 0, &[]), "write the activity log of")?;
        meta.write_block(
            AL_OFFSET + BLOCK,
            &encode_al(device_id, 1, &[]),
            "write the activity log of",
        )?;
        meta.sync()?;
        (meta.sb_seq, meta.al_seq) = (1, 1);
        sync_parent_dir(&meta.path)?;
        tracing::info!(path = %meta.path.display(), device_id = format_args!("{device_id:016x}"), size = params.size,
            "created mirror metadata");
        Ok(meta)
    }

    /// Opens an existing metadata file: checks magic, version and checksums (a damaged
    /// superblock or AL slot falls back to the other slot), loads the bitmap and marks the
    /// file in use. If the last run did not [`close_clean`](Meta::close_clean), every
    /// activity-log extent is marked dirty (persisted before returning), `crashed_primary`
    /// is set if the copy was primary, and [`recovery`](Meta::recovery) reports it.
    pub fn open(path: impl AsRef<Path>) -> Result<Meta, MetaError> {
        let path = path.as_ref().to_path_buf();
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MetaError::NotFound { path }),
            Err(source) => {
                return Err(MetaError::Io {
                    path,
                    op: "open",
                    source,
                });
            }
        };
        let file = lock(file, &path)?;
        let len = file.metadata().map_err(io_err(&path, "stat"))?.len();
        let mut head = vec![0u8; BITMAP_OFFSET as usize];
        let got = read_up_to(&file, 0, &mut head).map_err(io_err(&path, "read"))?;
        head.truncate(got);

        // A slot the file only partly covers is passed short (and reported as truncated).
        let slot = |i: usize| {
            let start = i * BLOCK as usize;
            (head.len() > start).then(|| &head[start..head.len().min(start + BLOCK as usize)])
        };
        let slots = [slot(0).map(decode_sb), slot(1).map(decode_sb)];
        let best = slots
            .iter()
            .filter_map(|s| match s {
                Some(Ok(v)) => Some(v),
                _ => None,
            })
            .max_by_key(|v| v.seq);
        let Some(sb) = best.cloned() else {
            return Err(classify_bad_superblocks(&path, len, &slots));
        };
        for (i, s) in slots.iter().enumerate() {
            if let Some(Err(why)) = s {
                tracing::warn!(path = %path.display(), slot = i, reason = %why.describe(),
                    "superblock slot damaged (a torn write?); using the other slot");
            }
        }
        let params = sb.params;
        let need = params.file_len();
        if len < need {
            return Err(MetaError::Truncated { path, len, need });
        }

        // Activity log: the valid slot with the higher sequence.
        let al_slot = |i: usize| head.get((2 + i) * BLOCK as usize..(3 + i) * BLOCK as usize);
        let al_best = [al_slot(0), al_slot(1)]
            .into_iter()
            .flatten()
            .filter_map(|b| decode_al(b, sb.sb.device_id).ok())
            .max_by_key(|(seq, _)| *seq);

        // Bitmap.
        let regions = params.regions();
        let nwords = usize::try_from(regions.div_ceil(64)).map_err(|_| MetaError::Corrupt {
            path: path.clone(),
            detail: "bitmap too large for this machine".into(),
        })?;
        let mut raw = vec![0u8; nwords * 8];
        file.read_exact_at(&mut raw, BITMAP_OFFSET)
            .map_err(io_err(&path, "read the bitmap of"))?;
        let mut words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(regions);
        }
        let dirty_regions = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let pages = nwords.div_ceil(WORDS_PER_PAGE);
        let was_clean = sb.clean;
        let (al_seq, al_on_disk) = match &al_best {
            Some((seq, ext)) => (*seq, ext.clone()),
            None => (0, Vec::new()),
        };
        let mut meta = Meta {
            path,
            file,
            params,
            sb: sb.sb,
            sb_seq: sb.seq,
            clean_on_disk: was_clean,
            regions,
            words,
            dirty_regions,
            page_dirty: vec![false; pages],
            al: Vec::new(),
            al_seq,
            al_on_disk,
            tick: 0,
            recovery: None,
            stats: MetaStats::default(),
        };

        if !was_clean {
            let before = meta.dirty_bytes();
            let mut rec = Recovery {
                al_extents: 0,
                all_dirty: false,
                added_dirty_bytes: 0,
                crashed_primary: false,
            };
            match &al_best {
                Some((_, extents)) => {
                    for &e in extents {
                        let (off, len) = meta.extent_range(e);
                        meta.mark_dirty(off, len);
                    }
                    rec.al_extents = extents.len();
                }
                None => {
                    meta.set_all_dirty();
                    rec.all_dirty = true;
                }
            }
            rec.added_dirty_bytes = meta.dirty_bytes() - before;
            // Persist the recovered bits before the log that justified them is emptied.
            meta.flush_bitmap()?;
            if meta.sb.role == Role::Primary {
                meta.sb.flags.crashed_primary = true;
                rec.crashed_primary = true;
            }
            tracing::warn!(path = %meta.path.display(), al_extents = rec.al_extents, all_dirty = rec.all_dirty,
                added_dirty_bytes = rec.added_dirty_bytes, crashed_primary = rec.crashed_primary,
                "metadata was not closed cleanly: activity-log regions marked dirty");
            meta.recovery = Some(rec);
        }
        if !meta.al_on_disk.is_empty() || al_best.is_none() {
            meta.persist_al()?;
        }
        let sb = meta.sb.clone();
        meta.write_sb(&sb, false)?;
        Ok(meta)
    }

    /// [`open`](Meta::open), or [`create`](Meta::create) if the file does not exist; then
    /// checks that it belongs to `device_id` and has `params.size` ([`verify`](Meta::verify)).
    pub fn open_or_create(path: impl AsRef<Path>, params: MetaParams, device_id: u64) -> Result<Meta, MetaError> {
        let meta = match Meta::open(path.as_ref()) {
            Err(MetaError::NotFound { .. }) => Meta::create(path, params, device_id)?,
            other => other?,
        };
        meta.verify(device_id, params.size)?;
        Ok(meta)
    }

    /// Checks that this file belongs to the disk `device_id` of `size` bytes.
    pub fn verify(&self, device_id: u64, size: u64) -> Result<(), MetaError> {
        if self.sb.device_id != device_id {
            return Err(MetaError::DeviceMismatch {
                path: self.path.clone(),
                expected: device_id,
                found: self.sb.device_id,
            });
        }
        if self.sb.size != size {
            return Err(MetaError::SizeMismatch {
                path: self.path.clone(),
                meta_size: self.sb.size,
                device_size: size,
            });
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The geometry.
    pub fn params(&self) -> &MetaParams {
        &self.params
    }

    /// The superblock as last persisted.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Changes the superblock (generation, role, flags) and persists it (`fdatasync`)
    /// before returning. Changing `device_id`, `size` or `region_size` is refused; on any
    /// error the superblock is unchanged.
    pub fn update(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut new = self.sb.clone();
        f(&mut new);
        if new.device_id != self.sb.device_id {
            return Err(MetaError::Immutable { field: "device_id" });
        }
        if new.size != self.sb.size {
            return Err(MetaError::Immutable { field: "size" });
        }
        if new.region_size != self.sb.region_size {
            return Err(MetaError::Immutable { field: "region_size" });
        }
        self.write_sb(&new, self.clean_on_disk)
    }

    /// True when [`open`](Meta::open) found that the last run did not close cleanly.
    pub fn recovered_from_crash(&self) -> bool {
        self.recovery.is_some()
    }

    /// What the crash recovery did, if there was one.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> MetaStats {
        self.stats
    }

    /// Activity-log writes since this `Meta` was opened.
    pub fn al_persists(&self) -> u64 {
        self.stats.al_persists
    }

    /// Extents in the activity log (active or idle).
    pub fn al_len(&self) -> usize {
        self.al.len()
    }

    /// Extents with writes in flight.
    pub fn al_busy(&self) -> usize {
        self.al.iter().filter(|e| e.refs > 0).count()
    }

    // ---- bitmap ------------------------------------------------------------------------

    /// Number of regions (bitmap bits).
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Marks every region overlapping `[offset, offset + len)` dirty (in memory). The part
    /// beyond the disk is ignored; `len == 0` does nothing.
    pub fn mark_dirty(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.overlapping(offset, len) {
            self.set_range(first, end, true);
        }
    }

    /// Clears the regions that lie entirely inside `[offset, offset + len)` (in memory): a
    /// region only partly covered stays dirty. The last, partial region of the disk counts
    /// as covered when the range reaches the end of the disk.
    pub fn clear(&mut self, offset: u64, len: u64) {
        let size = self.params.size;
        if len == 0 || offset >= size {
            return;
        }
        let rs = self.rs();
        let end = offset.saturating_add(len).min(size);
        let first = offset.div_ceil(rs);
        let last = if end == size { self.regions } else { end / rs };
        self.set_range(first, last, false);
    }

    /// Marks the whole disk dirty (a full resync).
    pub fn set_all_dirty(&mut self) {
        self.set_range(0, self.regions, true);
    }

    /// True when any region overlapping `[offset, offset + len)` is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        let Some((first, end)) = self.overlapping(offset, len) else {
            return false;
        };
        self.find_set(first).is_some_and(|r| r < end)
    }

    /// Bytes in dirty regions (the last region counts only its part inside the disk).
    pub fn dirty_bytes(&self) -> u64 {
        let rs = self.rs();
        let mut bytes = self.dirty_regions * rs;
        let tail = self.params.size % rs;
        if tail != 0 && self.bit(self.regions - 1) {
            bytes -= rs - tail;
        }
        bytes
    }

    /// The first run of consecutive dirty regions at or after the region containing
    /// `from`: `(offset, len)`, clamped to the disk. The run starts at a region boundary
    /// (before `from` if `from` is inside a dirty region); iterate with
    /// `next_dirty(offset + len)`. Runs can be long: callers cut them to their transfer size.
    pub fn next_dirty(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.params.size {
            return None;
        }
        let rs = self.rs();
        let start = self.find_set(from / rs)?;
        let end = self.find_clear(start);
        let off = start * rs;
        let end_off = end.saturating_mul(rs).min(self.params.size);
        Some((off, end_off - off))
    }

    /// The bitmap words (bit `i` of word `w` = region `64 w + i`), for sending to the peer.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs the peer's words in, starting at word index `first` (union of both bitmaps).
    /// Words beyond the disk are ignored. In memory; durable after
    /// [`flush_bitmap`](Meta::flush_bitmap).
    pub fn merge_words(&mut self, first: u64, w: &[u64]) {
        let Ok(first) = usize::try_from(first) else {
            return;
        };
        let n = self.words.len();
        let tail = tail_mask(self.regions);
        for (i, &x) in w.iter().enumerate() {
            let Some(idx) = first.checked_add(i).filter(|&idx| idx < n) else {
                break;
            };
            let x = if idx + 1 == n { x & tail } else { x };
            let old = self.words[idx];
            let new = old | x;
            if new != old {
                self.words[idx] = new;
                self.dirty_regions += u64::from(new.count_ones() - old.count_ones());
                self.page_dirty[idx / WORDS_PER_PAGE] = true;
            }
        }
    }

    /// Writes every changed bitmap page and `fdatasync`s (nothing to do if none changed).
    pub fn flush_bitmap(&mut self) -> Result<(), MetaError> {
        let pages = self.page_dirty.len();
        self.write_pages(0, pages)
    }

    // ---- activity log ------------------------------------------------------------------

    /// Before a write to `[offset, offset + len)`: makes the extents covering it active
    /// (refcounted). If an extent had to be added, the activity log is persisted (write +
    /// `fdatasync`) before this returns `Ok(true)`; when all were already in the log it
    /// returns `Ok(false)` without I/O. To make room, the least recently used idle extent
    /// is evicted after its bitmap pages were written. If every slot is busy the log
    /// grows past `al_slots` up to [`AL_MAX_SLOTS`], then answers
    /// [`MetaError::ActivityLogFull`]. On error nothing is active for this range.
    /// A range outside the disk or of length 0 activates nothing (`Ok(false)`).
    pub fn al_begin(&mut self, offset: u64, len: u64) -> Result<bool, MetaError> {
        let Some((first, last)) = self.extents_of(offset, len) else {
            return Ok(false);
        };
        self.tick += 1;
        let tick = self.tick;
        let mut missing = Vec::new();
        for e in first..=last {
            match self.al.iter_mut().find(|a| a.extent == e) {
                Some(a) => {
                    a.refs += 1;
                    a.last_used = tick;
                }
                None => missing.push(e),
            }
        }
        if missing.is_empty() {
            return Ok(false);
        }
        match self.al_add(&missing, first, last, tick) {
            Ok(()) => Ok(true),
            Err(e) => {
                // Undo: nothing of this range stays active.
                self.al.retain(|a| !missing.contains(&a.extent));
                for a in self.al.iter_mut().filter(|a| (first..=last).contains(&a.extent)) {
                    a.refs = a.refs.saturating_sub(1);
                }
                Err(e)
            }
        }
    }

    /// The fast path of [`al_begin`](Meta::al_begin), for callers that must not block on
    /// metadata I/O: when every extent covering `[offset, offset + len)` is already active
    /// *and* in the activity log last persisted (and the file is marked in use), takes a
    /// reference on each and returns `true` — no I/O, nothing written. Otherwise changes
    /// nothing and returns `false`: the caller then runs `al_begin` where it may block.
    /// Either way the range is released with [`al_end`](Meta::al_end). The check against
    /// the persisted log makes the crash guarantee hold by construction: a write this lets
    /// through lands in an extent a crash recovery marks dirty.
    pub fn al_begin_hot(&mut self, offset: u64, len: u64) -> bool {
        let Some((first, last)) = self.extents_of(offset, len) else {
            return true;
        };
        if self.clean_on_disk {
            return false;
        }
        for e in first..=last {
            let active = self.al.iter().any(|a| a.extent == e);
            if !active || self.al_on_disk.binary_search(&e).is_err() {
                return false;
            }
        }
        self.tick += 1;
        let tick = self.tick;
        for a in self.al.iter_mut().filter(|a| (first..=last).contains(&a.extent)) {
            a.refs += 1;
            a.last_used = tick;
        }
        true
    }

    /// After the write to `[offset, offset + len)` completed (or failed): releases the
    /// extents. They stay in the log, idle, until evicted or [`close_clean`](Meta::close_clean).
    /// If the write must be resynced (the peer did not get it), call
    /// [`mark_dirty`](Meta::mark_dirty) *before* `al_end`: once the extent is idle it may be
    /// evicted, and only bits set by then are written with it.
    pub fn al_end(&mut self, offset: u64, len: u64) {
        let Some((first, last)) = self.extents_of(offset, len) else {
            return;
        };
        for e in first..=last {
            match self.al.iter_mut().find(|a| a.extent == e) {
                Some(a) if a.refs > 0 => a.refs -= 1,
                _ => tracing::warn!(extent = e, "al_end without a matching al_begin"),
            }
        }
    }

    /// Clean shutdown: bitmap written, activity log emptied, superblock marked clean, all
    /// synced. Refused while writes are in flight. The `Meta` stays usable: the next
    /// [`al_begin`](Meta::al_begin) marks the file in use again.
    pub fn close_clean(&mut self) -> Result<(), MetaError> {
        let busy = self.al_busy();
        if busy > 0 {
            return Err(MetaError::Busy { active: busy });
        }
        self.flush_bitmap()?;
        self.al.clear();
        if !self.al_on_disk.is_empty() {
            self.persist_al()?;
        }
        let sb = self.sb.clone();
        self.write_sb(&sb, true)?;
        tracing::debug!(path = %self.path.display(), "metadata closed cleanly");
        Ok(())
    }

    // ---- internals ---------------------------------------------------------------------

    fn rs(&self) -> u64 {
        u64::from(self.params.region_size)
    }

    fn bit(&self, r: u64) -> bool {
        self.words[(r / 64) as usize] & (1 << (r % 64)) != 0
    }

    /// Regions `[first, end)` overlapping a byte range, clamped to the disk.
    fn overlapping(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.params.size;
        if len == 0 || offset >= size {
            return None;
        }
        let end = offset.saturating_add(len).min(size);
        let rs = self.rs();
        Some((offset / rs, (end - 1) / rs + 1))
    }

    /// Extents `first..=last` overlapping a byte range, clamped to the disk.
    fn extents_of(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.params.size;
        if len == 0 || offset >= size {
            return None;
        }
        let end = offset.saturating_add(len).min(size);
        let ext = self.params.al_extent;
        Some((offset / ext, (end - 1) / ext))
    }

    /// The byte range of extent `e`, clamped to the disk.
    fn extent_range(&self, e: u64) -> (u64, u64) {
        let off = e.saturating_mul(self.params.al_extent);
        let end = off.saturating_add(self.params.al_extent).min(self.params.size);
        (off, end.saturating_sub(off))
    }

    /// Sets or clears regions `[first, end)`.
    fn set_range(&mut self, first: u64, end: u64, value: bool) {
        let end = end.min(self.regions);
        let mut r = first;
        while r < end {
            let w = (r / 64) as usize;
            let bit = r % 64;
            let n = (64 - bit).min(end - r);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << bit };
            let old = self.words[w];
            let new = if value { old | mask } else { old & !mask };
            if new != old {
                self.words[w] = new;
                self.dirty_regions = self.dirty_regions + u64::from(new.count_ones()) - u64::from(old.count_ones());
                self.page_dirty[w / WORDS_PER_PAGE] = true;
            }
            r += n;
        }
    }

    /// The first dirty region ≥ `from`.
    fn find_set(&self, from: u64) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (r < self.regions).then_some(r);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// The first clean region ≥ `from` (or `regions`).
    fn find_clear(&self, from: u64) -> u64 {
        if from >= self.regions {
            return self.regions;
        }
        let mut w = (from / 64) as usize;
        let mut word = !self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                return r.min(self.regions);
            }
            w += 1;
            match self.words.get(w) {
                Some(x) => word = !x,
                None => return self.regions,
            }
        }
    }

    /// Writes the changed bitmap pages among `[first_page, end_page)` (coalescing
    /// neighbours) and `fdatasync`s if anything was written.
    fn write_pages(&mut self, first_page: usize, end_page: usize) -> Result<(), MetaError> {
        let end_page = end_page.min(self.page_dirty.len());
        let mut wrote = false;
        let mut p = first_page;
        while p < end_page {
            if !self.page_dirty[p] {
                p += 1;
                continue;
            }
            let mut q = p;
            while q < end_page && self.page_dirty[q] {
                q += 1;
            }
            let mut buf = vec![0u8; (q - p) * BLOCK as usize];
            let words = &self.words[p * WORDS_PER_PAGE..(q * WORDS_PER_PAGE).min(self.words.len())];
            for (chunk, w) in buf.chunks_exact_mut(8).zip(words) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            let off = BITMAP_OFFSET + p as u64 * BLOCK;
            self.file
                .write_all_at(&buf, off)
                .map_err(io_err(&self.path, "write the bitmap of"))?;
            for d in &mut self.page_dirty[p..q] {
                *d = false;
            }
            self.stats.bitmap_pages_written += (q - p) as u64;
            wrote = true;
            p = q;
        }
        if wrote {
            self.sync()?;
        }
        Ok(())
    }

    /// Bitmap pages holding extent `e`'s regions: `[first, end)`.
    fn pages_of_extent(&self, e: u64) -> (usize, usize) {
        let (off, len) = self.extent_range(e);
        match self.overlapping(off, len) {
            Some((r0, r1)) => (
                (r0 / 64) as usize / WORDS_PER_PAGE,
                ((r1 - 1) / 64) as usize / WORDS_PER_PAGE + 1,
            ),
            None => (0, 0),
        }
    }

    /// Adds `missing` extents (in range `first..=last`, whose present extents already got a
    /// reference) to the log, evicting idle ones, and persists the log.
    fn al_add(&mut self, missing: &[u64], first: u64, last: u64, tick: u64) -> Result<(), MetaError> {
        if self.clean_on_disk {
            // The log is about to hold extents: a crash from now on needs recovery.
            let sb = self.sb.clone();
            self.write_sb(&sb, false)?;
        }
        for &e in missing {
            if self.al.len() >= self.params.al_slots as usize {
                let victim = self
                    .al
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.refs == 0 && !(first..=last).contains(&a.extent))
                    .min_by_key(|(_, a)| a.last_used)
                    .map(|(i, _)| i);
                match victim {
                    Some(i) => {
                        let (p0, p1) = self.pages_of_extent(self.al[i].extent);
                        self.write_pages(p0, p1)?;
                        self.al.swap_remove(i);
                        self.stats.al_evictions += 1;
                    }
                    None if self.al.len() < AL_MAX_SLOTS as usize => {
                        tracing::debug!(active = self.al.len(), "activity log beyond al_slots: all extents busy");
                    }
                    None => {
                        return Err(MetaError::ActivityLogFull {
                            active: self.al.len(),
                            max: AL_MAX_SLOTS as usize,
                        });
                    }
                }
            }
            self.al.push(AlEntry {
                extent: e,
                refs: 1,
                last_used: tick,
            });
        }
        self.persist_al()
    }

    /// Writes the in-memory log to the next AL slot and `fdatasync`s.
    fn persist_al(&mut self) -> Result<(), MetaError> {
        let mut extents: Vec<u64> = self.al.iter().map(|a| a.extent).collect();
        extents.sort_unstable();
        let seq = self.al_seq + 1;
        let block = encode_al(self.sb.device_id, seq, &extents);
        self.write_block(AL_OFFSET + (seq % 2) * BLOCK, &block, "write the activity log of")?;
        self.sync()?;
        self.al_seq = seq;
        self.al_on_disk = extents;
        self.stats.al_persists += 1;
        Ok(())
    }

    /// Writes `sb` with the clean flag to the next superblock slot and `fdatasync`s; the
    /// in-memory state changes only on success.
    fn write_sb(&mut self, sb: &Superblock, clean: bool) -> Result<(), MetaError> {
        let seq = self.sb_seq + 1;
        let block = encode_sb(sb, &self.params, seq, clean);
        self.write_block(SB_OFFSET + (seq % 2) * BLOCK, &block, "write the superblock of")?;
        self.sync()?;
        self.sb_seq = seq;
        self.sb = sb.clone();
        self.clean_on_disk = clean;
        self.stats.superblock_writes += 1;
        Ok(())
    }

    fn write_block(&self, off: u64, block: &[u8], op: &'static str) -> Result<(), MetaError> {
        self.file.write_all_at(block, off).map_err(io_err(&self.path, op))
    }

    fn sync(&self) -> Result<(), MetaError> {
        self.file.sync_data().map_err(io_err(&self.path, "fdatasync"))
    }
}

/// Takes the exclusive lock, or says who holds it.
fn lock(file: File, path: &Path) -> Result<Flock<File>, MetaError> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            MetaError::Locked { path: path.into() }
        } else {
            MetaError::Io {
                path: path.into(),
                op: "lock",
                source: io::Error::from(errno),
            }
        }
    })
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        path: path.into(),
        op,
        source,
    }
}

/// Makes the new file's directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), MetaError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path, "sync the directory of"))
}

/// Reads as much of `buf` as the file has at `off`.
fn read_up_to(file: &File, off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Valid bits of the last bitmap word.
fn tail_mask(regions: u64) -> u64 {
    match regions % 64 {
        0 => !0,
        n => (1u64 << n) - 1,
    }
}

// ---- checksummed blocks ------------------------------------------------------------------

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), as used by iSCSI, ext4 and btrfs metadata.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn seal(block: &mut [u8]) {
    let c = crc32c(&block[..CSUM_AT]);
    block[CSUM_AT..].copy_from_slice(&c.to_le_bytes());
}

fn sealed(block: &[u8]) -> bool {
    block.len() == BLOCK as usize && block[CSUM_AT..] == crc32c(&block[..CSUM_AT]).to_le_bytes()
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

// Superblock field offsets.
const SB_VERSION: usize = 8;
const SB_SEQ: usize = 16;
const SB_DEVICE: usize = 24;
const SB_SIZE: usize = 32;
const SB_REGION: usize = 40;
const SB_AL_SLOTS: usize = 44;
const SB_AL_EXTENT: usize = 48;
const SB_GEN: usize = 56; // current, bitmap, history[0], history[1]
const SB_ROLE: usize = 88;
const SB_FLAGS: usize = 89;
const SB_BITMAP_OFF: usize = 96;
const SB_BITMAP_LEN: usize = 104;

fn encode_sb(sb: &Superblock, params: &MetaParams, seq: u64, clean: bool) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&SB_MAGIC);
    put_u32(&mut b, SB_VERSION, META_VERSION);
    put_u64(&mut b, SB_SEQ, seq);
    put_u64(&mut b, SB_DEVICE, sb.device_id);
    put_u64(&mut b, SB_SIZE, params.size);
    put_u32(&mut b, SB_REGION, params.region_size);
    put_u32(&mut b, SB_AL_SLOTS, params.al_slots);
    put_u64(&mut b, SB_AL_EXTENT, params.al_extent);
    let g = &sb.r#gen;
    for (i, v) in [g.current, g.bitmap, g.history[0], g.history[1]]
        .into_iter()
        .enumerate()
    {
        put_u64(&mut b, SB_GEN + 8 * i, v);
    }
    b[SB_ROLE] = match sb.role {
        Role::Primary => 1,
        Role::Secondary => 2,
    };
    let f = &sb.flags;
    b[SB_FLAGS] = (if f.consistent { FLAG_CONSISTENT } else { 0 })
        | (if f.crashed_primary { FLAG_CRASHED_PRIMARY } else { 0 })
        | (if f.discard_my_data { FLAG_DISCARD_MY_DATA } else { 0 })
        | (if f.never_started { FLAG_NEVER_STARTED } else { 0 })
        | (if clean { FLAG_CLEAN } else { 0 });
    put_u64(&mut b, SB_BITMAP_OFF, BITMAP_OFFSET);
    put_u64(&mut b, SB_BITMAP_LEN, params.bitmap_bytes());
    seal(&mut b);
    b
}

/// A superblock slot read back.
#[derive(Clone, Debug)]
struct SbRead {
    sb: Superblock,
    params: MetaParams,
    seq: u64,
    clean: bool,
}

/// Why a superblock slot was rejected.
#[derive(Clone, Debug)]
enum SlotError {
    Short,
    NoMagic,
    Checksum,
    Version(u32),
    Invalid(String),
}

impl SlotError {
    fn describe(&self) -> String {
        match self {
            SlotError::Short => "short".into(),
            SlotError::NoMagic => "no magic".into(),
            SlotError::Checksum => "checksum mismatch".into(),
            SlotError::Version(v) => format!("version {v}"),
            SlotError::Invalid(d) => d.clone(),
        }
    }
}

fn decode_sb(b: &[u8]) -> Result<SbRead, SlotError> {
    if b.len() < BLOCK as usize {
        return Err(if b.len() >= 8 && b[..8] == SB_MAGIC {
            SlotError::Short
        } else {
            SlotError::NoMagic
        });
    }
    if b[..8] != SB_MAGIC {
        return Err(SlotError::NoMagic);
    }
    if !sealed(b) {
        return Err(SlotError::Checksum);
    }
    let version = get_u32(b, SB_VERSION);
    if version != META_VERSION {
        return Err(SlotError::Version(version));
    }
    let params = MetaParams {
        size: get_u64(b, SB_SIZE),
        region_size: get_u32(b, SB_REGION),
        al_extent: get_u64(b, SB_AL_EXTENT),
        al_slots: get_u32(b, SB_AL_SLOTS),
    };
    params.validate().map_err(SlotError::Invalid)?;
    let role = match b[SB_ROLE] {
        1 => Role::Primary,
        2 => Role::Secondary,
        r => return Err(SlotError::Invalid(format!("unknown role byte {r}"))),
    };
    let flags = b[SB_FLAGS];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(SlotError::Invalid(format!("unknown flags {flags:#x}")));
    }
    if get_u64(b, SB_BITMAP_OFF) != BITMAP_OFFSET || get_u64(b, SB_BITMAP_LEN) != params.bitmap_bytes() {
        return Err(SlotError::Invalid("bitmap location does not match the geometry".into()));
    }
    let device_id = get_u64(b, SB_DEVICE);
    if device_id == 0 {
        return Err(SlotError::Invalid("device id 0".into()));
    }
    let g = |i: usize| get_u64(b, SB_GEN + 8 * i);
    Ok(SbRead {
        sb: Superblock {
            device_id,
            size: params.size,
            region_size: params.region_size,
            r#gen: GenIds {
                current: g(0),
                bitmap: g(1),
                history: [g(2), g(3)],
            },
            role,
            flags: MetaFlags {
                consistent: flags & FLAG_CONSISTENT != 0,
                crashed_primary: flags & FLAG_CRASHED_PRIMARY != 0,
                discard_my_data: flags & FLAG_DISCARD_MY_DATA != 0,
                never_started: flags & FLAG_NEVER_STARTED != 0,
            },
        },
        params,
        seq: get_u64(b, SB_SEQ),
        clean: flags & FLAG_CLEAN != 0,
    })
}

/// The error for a file where no superblock slot is usable.
fn classify_bad_superblocks(path: &Path, len: u64, slots: &[Option<Result<SbRead, SlotError>>; 2]) -> MetaError {
    let path = path.to_path_buf();
    let errs: Vec<&SlotError> = slots.iter().flatten().filter_map(|s| s.as_ref().err()).collect();
    if let Some(found) = errs.iter().find_map(|e| match e {
        SlotError::Version(v) => Some(*v),
        _ => None,
    }) {
        return MetaError::UnsupportedVersion { path, found };
    }
    let ours = errs.iter().any(|e| !matches!(e, SlotError::NoMagic));
    if !ours {
        return if len == 0 {
            MetaError::Truncated {
                path,
                len,
                need: BITMAP_OFFSET,
            }
        } else {
            MetaError::NotMetadata { path }
        };
    }
    if len < 2 * BLOCK {
        return MetaError::Truncated {
            path,
            len,
            need: BITMAP_OFFSET,
        };
    }
    let detail = slots
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(Err(e)) => format!("superblock slot {i}: {}", e.describe()),
            Some(Ok(_)) => format!("superblock slot {i}: ok"),
            None => format!("superblock slot {i}: missing"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    MetaError::Corrupt { path, detail }
}

fn encode_al(device_id: u64, seq: u64, extents: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&AL_MAGIC);
    put_u64(&mut b, 8, seq);
    put_u64(&mut b, 16, device_id);
    let n = extents.len().min(AL_MAX_SLOTS as usize);
    put_u32(&mut b, 24, n as u32);
    for (i, &e) in extents[..n].iter().enumerate() {
        put_u64(&mut b, AL_HEADER + 8 * i, e);
    }
    seal(&mut b);
    b
}

/// `(sequence, extents)` of a valid AL slot of this device.
fn decode_al(b: &[u8], device_id: u64) -> Result<(u64, Vec<u64>), &'static str> {
    if b.len() < BLOCK as usize || b[..8] != AL_MAGIC {
        return Err("no magic");
    }
    if !sealed(b) {
        return Err("checksum mismatch");
    }
    if get_u64(b, 16) != device_id {
        return Err("another device");
    }
    let n = get_u32(b, 24) as usize;
    if n > AL_MAX_SLOTS as usize {
        return Err("too many extents");
    }
    let extents = (0..n).map(|i| get_u64(b, AL_HEADER + 8 * i)).collect();
    Ok((get_u64(b, 8), extents))
}

/// Test helper: the extents of the activity log as persisted in the file at `path` right
/// now (the valid slot with the higher sequence; empty if none), read without the lock.
#[cfg(test)]
pub(crate) fn persisted_activity_log(path: &Path, device_id: u64) -> Vec<u64> {
    let Ok(b) = std::fs::read(path) else {
        return Vec::new();
    };
    let slot = |i: u64| b.get(((2 + i) * BLOCK) as usize..((3 + i) * BLOCK) as usize);
    [slot(0), slot(1)]
        .into_iter()
        .flatten()
        .filter_map(|x| decode_al(x, device_id).ok())
        .max_by_key(|(seq, _)| *seq)
        .map(|(_, e)| e)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const DEV: u64 = 0xdead_beef_0000_0001;

    /// A unique path in the temp dir, removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Tmp {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "ublk-mirror-meta-{}-{}-{name}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&p);
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn params(size: u64) -> MetaParams {
        MetaParams::with_size(size)
    }

    fn small(size: u64, region: u32, extent: u64, slots: u32) -> MetaParams {
        MetaParams {
            size,
            region_size: region,
            al_extent: extent,
            al_slots: slots,
        }
    }

    fn patch(path: &Path, off: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, off).unwrap();
    }

    fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn crc32c_known_answer() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn create_open_round_trip() {
        let t = Tmp::new("roundtrip");
        let p = params(1 << 30);
        let mut m = Meta::create(&t.0, p, DEV).unwrap();
        assert_eq!(m.superblock().r#gen, GenIds::just_created());
        assert_eq!(m.superblock().role, Role::Secondary);
        assert!(!m.superblock().flags.consistent);
        assert_eq!(std::fs::metadata(&t.0).unwrap().len(), p.file_len());
        assert_eq!(
            p.file_len(),
            BITMAP_OFFSET + 32 * 1024,
            "1 GiB at 4 KiB = 2^18 bits = 32 KiB"
        );
        let g = GenIds {
            current: 0x1111_2222_3333_4444,
            bitmap: 0x5555_6666_7777_8888,
            history: [0x9999_0000_aaaa_bbbb, 0xcccc_dddd_eeee_ffff],
        };
        m.update(|sb| {
            sb.r#gen = g;
            sb.role = Role::Primary;
            sb.flags.consistent = true;
            sb.flags.discard_my_data = true;
        })
        .unwrap();
        m.mark_dirty(5 << 20, 3 << 20);
        m.mark_dirty((1 << 30) - 1, 1);
        let words = m.words().to_vec();
        let dirty = m.dirty_bytes();
        assert_eq!(dirty, (3 << 20) + 4096);
        m.close_clean().unwrap();
        drop(m);

        let m = Meta::open(&t.0).unwrap();
        assert!(!m.recovered_from_crash());
        assert_eq!(m.params(), &p);
        let sb = m.superblock();
        assert_eq!((sb.device_id, sb.size, sb.region_size), (DEV, 1 << 30, 4096));
        assert_eq!(sb.r#gen, g);
        assert_eq!(sb.role, Role::Primary);
        assert_eq!(
            sb.flags,
            MetaFlags {
                consistent: true,
                crashed_primary: false,
                discard_my_data: true,
                never_started: false,
            }
        );
        assert_eq!(m.words(), &words[..]);
        assert_eq!(m.dirty_bytes(), dirty);
        let side = sb.side();
        assert_eq!((side.device_id, side.r#gen, side.role), (DEV, g, Role::Primary));
        assert!(side.consistent && side.discard_my_data && !side.crashed_primary);
        m.verify(DEV, 1 << 30).unwrap();
    }

    #[test]
    fn errors_for_missing_existing_locked_and_bad_params() {
        assert_eq!(
            MetaParams {
                size: 8192,
                ..Default::default()
            },
            MetaParams::with_size(8192)
        );
        let t = Tmp::new("errors");
        let e = Meta::open(&t.0).unwrap_err();
        assert!(matches!(e, MetaError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains(&t.0.display().to_string()), "{e}");
        let m = Meta::create(&t.0, params(1 << 20), DEV).unwrap();
        let e = Meta::create(&t.0, params(1 << 20), DEV).unwrap_err();
        assert!(matches!(e, MetaError::Exists { .. }), "{e}");
        let e = Meta::open(&t.0).unwrap_err();
        assert!(matches!(e, MetaError::Locked { .. }), "{e}");
        drop(m);
        Meta::open(&t.0).unwrap();

        let t2 = Tmp::new("badparams");
        for (p, dev) in [
            (params(0), DEV),
            (small(1 << 20, 1000, 4 << 20, 64), DEV),
            (small(1 << 20, 4096, 2048, 64), DEV),
            (small(1 << 20, 4096, 4 << 20, 0), DEV),
            (small(1 << 20, 4096, 4 << 20, AL_MAX_SLOTS + 1), DEV),
            (small(1 << 50, 512, 4 << 20, 64), DEV),
            (params(1 << 20), 0),
        ] {
            let e = Meta::create(&t2.0, p, dev).unwrap_err();
            assert!(matches!(e, MetaError::InvalidParams { .. }), "{p:?}: {e}");
            assert!(!t2.0.exists(), "nothing created for {p:?}");
        }
        let e = Meta::create(Path::new("/nonexistent-dir-ublk-mirror/x"), params(1 << 20), DEV).unwrap_err();
        assert!(matches!(e, MetaError::Io { op: "create", .. }), "{e}");
    }

    #[test]
    fn open_or_create_and_verify() {
        let t = Tmp::new("ooc");
        let m = Meta::open_or_create(&t.0, params(1 << 20), DEV).unwrap();
        drop(m);
        let m = Meta::open_or_create(&t.0, params(1 << 20), DEV).unwrap();
        drop(m);
        let e = Meta::open_or_create(&t.0, params(1 << 20), DEV + 1).unwrap_err();
        assert!(matches!(e, MetaError::DeviceMismatch { .. }), "{e}");
        assert!(e.to_string().contains("belongs to device dead"), "{e}");
        let e = Meta::open_or_create(&t.0, params(2 << 20), DEV).unwrap_err();
        assert!(matches!(e, MetaError::SizeMismatch { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("1048576-byte disk but the backing store has 2097152"),
            "{e}"
        );
    }

    #[test]
    fn update_refuses_fixed_fields_and_keeps_state() {
        let t = Tmp::new("immutable");
        let mut m = Meta::create(&t.0, params(1 << 20), DEV).unwrap();
        let before = m.superblock().clone();
        let e = m
            .update(|sb| {
                sb.size += 4096;
                sb.role = Role::Primary;
            })
            .unwrap_err();
        assert!(matches!(e, MetaError::Immutable { field: "size" }), "{e}");
        assert!(matches!(
            m.update(|sb| sb.device_id = 7).unwrap_err(),
            MetaError::Immutable { field: "device_id" }
        ));
        assert!(matches!(
            m.update(|sb| sb.region_size = 512).unwrap_err(),
            MetaError::Immutable { field: "region_size" }
        ));
        assert_eq!(m.superblock(), &before);
    }

    /// 10 full regions of 4 KiB and a last region of 100 bytes.
    const ODD: u64 = 10 * 4096 + 100;

    #[test]
    fn bitmap_edges() {
        let t = Tmp::new("edges");
        let mut m = Meta::create(&t.0, small(ODD, 4096, 8192, 4), DEV).unwrap();
        assert_eq!(m.regions(), 11);
        m.mark_dirty(0, 0);
        m.mark_dirty(ODD, 10);
        m.mark_dirty(u64::MAX - 1, 10);
        m.mark_dirty(u64::MAX, u64::MAX);
        assert_eq!(m.dirty_bytes(), 0);
        assert_eq!(m.next_dirty(0), None);
        // Unaligned, two bytes straddling a boundary → two regions.
        m.mark_dirty(4095, 2);
        assert_eq!(m.dirty_bytes(), 8192);
        assert!(m.is_dirty(0, 1) && m.is_dirty(8191, 1) && !m.is_dirty(8192, 4096));
        assert!(!m.is_dirty(0, 0) && !m.is_dirty(ODD, 1) && !m.is_dirty(u64::MAX, u64::MAX));
        assert_eq!(m.next_dirty(0), Some((0, 8192)));
        assert_eq!(m.next_dirty(5000), Some((4096, 4096)), "from inside a dirty region");
        assert_eq!(m.next_dirty(8192), None);
        // The last, partial region: counts 100 bytes.
        m.mark_dirty(ODD - 1, 1000);
        assert_eq!(m.dirty_bytes(), 8192 + 100);
        assert_eq!(m.next_dirty(8192), Some((10 * 4096, 100)));
        assert_eq!(m.next_dirty(ODD), None);
        assert_eq!(m.next_dirty(u64::MAX), None);
        // clear only clears fully covered regions.
        m.clear(1, 8191);
        assert_eq!(m.dirty_bytes(), 4096 + 100, "region 0 was not fully covered");
        m.clear(0, 4095);
        assert_eq!(m.dirty_bytes(), 4096 + 100);
        m.clear(0, 4096);
        assert_eq!(m.dirty_bytes(), 100);
        // The last region is covered once the range reaches the end of the disk.
        m.clear(10 * 4096, 99);
        assert_eq!(m.dirty_bytes(), 100);
        m.clear(10 * 4096, u64::MAX);
        assert_eq!(m.dirty_bytes(), 0);
        m.clear(0, 0);
        m.clear(u64::MAX, 1);
        // Everything.
        m.set_all_dirty();
        assert_eq!(m.dirty_bytes(), ODD);
        assert_eq!(m.words(), &[(1 << 11) - 1]);
        assert_eq!(m.next_dirty(0), Some((0, ODD)));
        assert_eq!(m.next_dirty(ODD - 1), Some((10 * 4096, 100)));
        m.clear(0, ODD);
        assert_eq!((m.dirty_bytes(), m.words()), (0, &[0u64][..]));
    }

    #[test]
    fn merge_words_is_a_union_clamped_to_the_disk() {
        let t = Tmp::new("merge");
        // 130 regions: 3 words, the last with 2 valid bits.
        let mut m = Meta::create(&t.0, small(130 * 512, 512, 4096, 4), DEV).unwrap();
        m.mark_dirty(0, 512);
        m.merge_words(0, &[0b110, 1 << 63]);
        assert_eq!(m.words(), &[0b111, 1 << 63, 0]);
        m.merge_words(2, &[!0, !0, !0]);
        assert_eq!(
            m.words(),
            &[0b111, 1 << 63, 0b11],
            "tail bits and words beyond the end ignored"
        );
        m.merge_words(3, &[!0]);
        m.merge_words(u64::MAX, &[!0]);
        m.merge_words(0, &[]);
        assert_eq!(m.dirty_bytes(), 6 * 512);
        assert_eq!(m.next_dirty(0), Some((0, 3 * 512)));
        assert_eq!(m.next_dirty(3 * 512), Some((127 * 512, 3 * 512)));
        // Merged bits are durable after flush_bitmap.
        m.flush_bitmap().unwrap();
        drop(m);
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(m.words(), &[0b111, 1 << 63, 0b11]);
    }

    /// splitmix64 for the model test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn bitmap_matches_a_naive_model() {
        let t = Tmp::new("model");
        let rs = 512u64;
        let size = 1000 * rs + 17; // 1001 regions, partial last one
        let mut m = Meta::create(&t.0, small(size, 512, 4096, 8), DEV).unwrap();
        let mut model = vec![false; 1001];
        let mut rng = Rng(42);
        for step in 0..5000 {
            let off = rng.next() % (size + 2000);
            let len = match rng.next() % 4 {
                0 => 0,
                1 => rng.next() % 600,
                2 => rng.next() % (70 * rs),
                _ => rng.next() % (size + 100),
            };
            let end = off.saturating_add(len).min(size);
            match rng.next() % 3 {
                0 => {
                    m.mark_dirty(off, len);
                    if len > 0 && off < size {
                        for r in off / rs..=(end - 1) / rs {
                            model[r as usize] = true;
                        }
                    }
                }
                1 => {
                    m.clear(off, len);
                    if len > 0 && off < size {
                        for (r, bit) in model.iter_mut().enumerate() {
                            let (a, b) = (r as u64 * rs, ((r as u64 + 1) * rs).min(size));
                            if a >= off && b <= end {
                                *bit = false;
                            }
                        }
                    }
                }
                _ => {
                    let want = len > 0 && off < size && (off / rs..=(end - 1) / rs).any(|r| model[r as usize]);
                    assert_eq!(m.is_dirty(off, len), want, "step {step}: is_dirty({off}, {len})");
                }
            }
            let bytes: u64 = (0..1001)
                .filter(|&r| model[r])
                .map(|r| ((r as u64 + 1) * rs).min(size) - r as u64 * rs)
                .sum();
            assert_eq!(m.dirty_bytes(), bytes, "step {step}");
        }
        // next_dirty enumerates exactly the model's runs.
        let mut runs = Vec::new();
        let mut at = 0;
        while let Some((o, l)) = m.next_dirty(at) {
            assert!(l > 0);
            runs.push((o, l));
            at = o + l;
        }
        let mut want = Vec::new();
        let mut r = 0;
        while r < 1001 {
            if model[r] {
                let s = r;
                while r < 1001 && model[r] {
                    r += 1;
                }
                want.push((s as u64 * rs, (r as u64 * rs).min(size) - s as u64 * rs));
            } else {
                r += 1;
            }
        }
        assert_eq!(runs, want);
    }

    #[test]
    fn crash_recovery_marks_activity_log_extents_dirty() {
        let t = Tmp::new("crash");
        // 64 MiB disk, 4 MiB extents, 4 KiB regions.
        let size = 64 << 20;
        let mut m = Meta::create(&t.0, params(size), DEV).unwrap();
        m.update(|sb| sb.role = Role::Primary).unwrap();
        assert!(m.al_begin(13 << 20, 4096).unwrap(), "extent 3 added → persisted");
        assert!(m.al_begin((8 << 20) - 512, 1024).unwrap(), "extents 1 and 2");
        assert!(!m.al_begin(12 << 20, 100).unwrap(), "extent 3 again: no I/O");
        assert_eq!(m.al_persists(), 2);
        assert_eq!((m.al_len(), m.al_busy()), (3, 3));
        m.al_end(13 << 20, 4096);
        m.al_end(12 << 20, 100);
        assert_eq!(m.al_busy(), 2);
        assert_eq!(m.dirty_bytes(), 0, "al_begin does not dirty the bitmap");
        drop(m); // crash: no close_clean

        let m = Meta::open(&t.0).unwrap();
        assert!(m.recovered_from_crash());
        let rec = m.recovery().unwrap().clone();
        assert_eq!(rec.al_extents, 3);
        assert!(!rec.all_dirty);
        assert_eq!(rec.added_dirty_bytes, 12 << 20);
        assert!(rec.crashed_primary);
        assert!(m.superblock().flags.crashed_primary);
        assert_eq!(m.next_dirty(0), Some((4 << 20, 12 << 20)));
        assert_eq!(m.al_len(), 0);
        // The recovered bits are on disk: a second crash right now loses nothing.
        drop(m);
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(
            m.recovery().unwrap().al_extents,
            0,
            "the log was emptied after recovery"
        );
        assert_eq!(m.dirty_bytes(), 12 << 20);
        assert!(m.superblock().flags.crashed_primary);
        drop(m);

        // A secondary's crash does not set crashed_primary.
        let t2 = Tmp::new("crash2");
        let mut m = Meta::create(&t2.0, params(size), DEV).unwrap();
        m.al_begin(0, 1).unwrap();
        drop(m);
        let m = Meta::open(&t2.0).unwrap();
        let rec = m.recovery().unwrap();
        assert!(!rec.crashed_primary && !m.superblock().flags.crashed_primary);
        assert_eq!(m.dirty_bytes(), 4 << 20);
    }

    #[test]
    fn clean_close_needs_no_recovery_and_is_refused_while_busy() {
        let t = Tmp::new("clean");
        let mut m = Meta::create(&t.0, params(64 << 20), DEV).unwrap();
        m.al_begin(0, 4096).unwrap();
        let e = m.close_clean().unwrap_err();
        assert!(matches!(e, MetaError::Busy { active: 1 }), "{e}");
        m.mark_dirty(0, 4096);
        m.al_end(0, 4096);
        m.close_clean().unwrap();
        assert_eq!(m.al_len(), 0);
        // Still usable: a new write marks the file in use again.
        assert!(m.al_begin(20 << 20, 4096).unwrap());
        drop(m);
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(m.recovery().unwrap().al_extents, 1);
        assert_eq!(m.next_dirty(0), Some((0, 4096)));
        assert_eq!(m.next_dirty(4096), Some((20 << 20, 4 << 20)));
        drop(m);
        // open marks the file in use: a crash after a clean open still recovers.
        let mut m = Meta::open(&t.0).unwrap();
        m.close_clean().unwrap();
        drop(m);
        let m = Meta::open(&t.0).unwrap();
        assert!(!m.recovered_from_crash());
        drop(m);
        let m = Meta::open(&t.0).unwrap();
        assert!(m.recovered_from_crash(), "dropped without close_clean");
    }

    #[test]
    fn al_eviction_persists_the_bitmap_first() {
        let t = Tmp::new("evict");
        // 2 AL slots of 1 MiB; 4 KiB regions; 8 MiB disk → one bitmap page.
        let mut m = Meta::create(&t.0, small(8 << 20, 4096, 1 << 20, 2), DEV).unwrap();
        let bit0 = |path: &Path| read(path, BITMAP_OFFSET, 8)[0];
        m.al_begin(0, 4096).unwrap();
        m.mark_dirty(4096, 4096); // region 1 (extent 0), e.g. a degraded write
        m.al_end(0, 4096);
        m.al_begin(1 << 20, 4096).unwrap();
        m.al_end(1 << 20, 4096);
        assert_eq!(bit0(&t.0), 0, "not yet on disk");
        let pages_before = m.stats().bitmap_pages_written;
        // Extent 2 needs a slot: extent 0 is the least recently used idle one.
        assert!(m.al_begin(2 << 20, 4096).unwrap());
        assert_eq!(m.stats().al_evictions, 1);
        assert_eq!(m.stats().bitmap_pages_written, pages_before + 1);
        assert_eq!(bit0(&t.0), 0b10, "region 1 persisted before extent 0 left the log");
        // Using extent 1 keeps it; the next eviction takes extent 2 (idle, older).
        m.al_end(2 << 20, 4096);
        m.al_begin(1 << 20, 1).unwrap();
        m.al_end(1 << 20, 1);
        m.al_begin(3 << 20, 1).unwrap();
        m.al_end(3 << 20, 1);
        drop(m);
        // Crash: extents 1 and 3 (in the log) are fully dirty, extent 0 only region 1.
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(m.recovery().unwrap().al_extents, 2);
        assert_eq!(m.next_dirty(0), Some((4096, 4096)));
        assert_eq!(m.next_dirty(8192), Some((1 << 20, 1 << 20)));
        assert_eq!(m.next_dirty(2 << 20), Some((3 << 20, 1 << 20)));
        assert_eq!(m.next_dirty(4 << 20), None);
    }

    #[test]
    fn hot_extent_takes_the_fast_path_without_any_write() {
        let t = Tmp::new("hot");
        let mut m = Meta::create(&t.0, small(8 << 20, 4096, 1 << 20, 2), DEV).unwrap();
        // Cold: the fast path refuses and changes nothing.
        assert!(!m.al_begin_hot(0, 4096));
        assert_eq!((m.al_len(), m.al_busy()), (0, 0));
        assert!(m.al_begin(0, 4096).unwrap(), "cold extent: persisted");
        assert_eq!(persisted_activity_log(&t.0, DEV), vec![0]);
        let (persists, sb_writes) = (m.al_persists(), m.stats().superblock_writes);
        // Hot (busy or idle): a reference, no write at all.
        assert!(m.al_begin_hot(8192, 4096));
        assert_eq!(m.al_busy(), 1);
        m.al_end(0, 4096);
        m.al_end(8192, 4096);
        assert_eq!(m.al_busy(), 0);
        assert!(m.al_begin_hot(4096, 4096), "an idle extent still in the log is hot");
        assert_eq!(m.al_busy(), 1);
        m.al_end(4096, 4096);
        // A range reaching into a cold extent is not hot, and takes no reference.
        assert!(!m.al_begin_hot((1 << 20) - 4096, 8192));
        assert_eq!(m.al_busy(), 0);
        // Empty or outside the disk: nothing to activate.
        assert!(m.al_begin_hot(8 << 20, 4096));
        assert!(m.al_begin_hot(0, 0));
        assert_eq!((m.al_persists(), m.stats().superblock_writes), (persists, sb_writes));
        // Evicted, or after a clean close: cold again.
        assert!(m.al_begin(1 << 20, 1).unwrap());
        m.al_end(1 << 20, 1);
        assert!(m.al_begin(2 << 20, 1).unwrap(), "evicts extent 0");
        m.al_end(2 << 20, 1);
        assert!(!m.al_begin_hot(0, 4096));
        assert!(m.al_begin_hot(2 << 20, 1));
        m.al_end(2 << 20, 1);
        m.close_clean().unwrap();
        assert!(!m.al_begin_hot(2 << 20, 1));
        assert_eq!(m.al_busy(), 0);
    }

    #[test]
    fn an_extent_is_hot_only_once_its_log_was_persisted() {
        let t = Tmp::new("hotfail");
        let mut m = Meta::create(&t.0, small(8 << 20, 4096, 1 << 20, 2), DEV).unwrap();
        // In memory but not persisted (as inside al_add before persist_al): never hot.
        m.al.push(AlEntry {
            extent: 3,
            refs: 0,
            last_used: 0,
        });
        m.clean_on_disk = false;
        assert!(!m.al_begin_hot(3 << 20, 4096));
        m.al.clear();
        assert!(m.al_begin(3 << 20, 4096).unwrap());
        m.al_end(3 << 20, 4096);
        assert!(m.al_begin_hot(3 << 20, 4096));
        m.al_end(3 << 20, 4096);
    }

    #[test]
    fn busy_extents_overflow_al_slots_then_the_log_is_full() {
        let t = Tmp::new("full");
        let n = AL_MAX_SLOTS as u64 + 2;
        let mut m = Meta::create(&t.0, small(n * 4096, 4096, 4096, 2), DEV).unwrap();
        for e in 0..AL_MAX_SLOTS as u64 {
            assert!(m.al_begin(e * 4096, 4096).unwrap());
        }
        assert_eq!(m.al_busy(), AL_MAX_SLOTS as usize);
        let persists = m.al_persists();
        let e = m.al_begin(u64::from(AL_MAX_SLOTS) * 4096, 4096).unwrap_err();
        assert!(matches!(e, MetaError::ActivityLogFull { .. }), "{e}");
        assert_eq!(m.al_persists(), persists, "nothing written");
        // A range with a present and a missing extent: the present one's ref is undone.
        let e = m.al_begin(u64::from(AL_MAX_SLOTS - 1) * 4096, 8192).unwrap_err();
        assert!(matches!(e, MetaError::ActivityLogFull { .. }), "{e}");
        m.al_end(u64::from(AL_MAX_SLOTS - 1) * 4096, 4096);
        assert_eq!(m.al_busy(), AL_MAX_SLOTS as usize - 1, "exactly one reference was held");
        // Now an idle extent can be evicted.
        assert!(m.al_begin(u64::from(AL_MAX_SLOTS) * 4096, 4096).unwrap());
        assert_eq!(m.al_len(), AL_MAX_SLOTS as usize);
        // al_end without al_begin is harmless.
        m.al_end((n - 1) * 4096, 4096);
        m.al_end(0, 0);
        m.al_end(u64::MAX, 5);
        assert!(!m.al_begin(0, 0).unwrap());
        assert!(!m.al_begin(n * 4096, 1).unwrap());
    }

    #[test]
    fn torn_superblock_falls_back_to_the_other_slot() {
        let t = Tmp::new("torn");
        let mut m = Meta::create(&t.0, params(1 << 20), DEV).unwrap();
        let old = GenIds {
            current: 0x100,
            ..GenIds::default()
        };
        let new = GenIds {
            current: 0x200,
            ..GenIds::default()
        };
        m.update(|sb| sb.r#gen = old).unwrap();
        m.update(|sb| sb.r#gen = new).unwrap();
        m.close_clean().unwrap();
        let newest = m.sb_seq;
        drop(m);
        // Tear the newest slot (the clean close): flip a byte in its middle.
        let slot = SB_OFFSET + (newest % 2) * BLOCK;
        let mut b = read(&t.0, slot + 2000, 1);
        b[0] ^= 0xff;
        patch(&t.0, slot + 2000, &b);
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(m.superblock().r#gen, new, "the previous slot (the last update) is used");
        assert!(m.recovered_from_crash(), "that slot was written before the clean close");
        drop(m);
        // open wrote a fresh superblock into the torn slot: both slots valid again. Tear both.
        for s in 0..2 {
            patch(&t.0, SB_OFFSET + s * BLOCK + SB_GEN as u64, &[0x42]);
        }
        let e = Meta::open(&t.0).unwrap_err();
        assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("slot 0: checksum mismatch") && msg.contains("slot 1: checksum mismatch"),
            "{msg}"
        );
    }

    #[test]
    fn torn_activity_log_falls_back_or_marks_everything() {
        let t = Tmp::new("tornal");
        let mut m = Meta::create(&t.0, params(64 << 20), DEV).unwrap();
        m.al_begin(0, 1).unwrap(); // log {0}
        m.al_begin(8 << 20, 1).unwrap(); // log {0, 2}
        let seq = m.al_seq;
        drop(m);
        // The newest AL write was torn: the previous log {0} is used (writes to extent 2
        // had not started before that write completed).
        patch(&t.0, AL_OFFSET + (seq % 2) * BLOCK + 100, &[0xff]);
        let m = Meta::open(&t.0).unwrap();
        assert_eq!(m.recovery().unwrap().al_extents, 1);
        assert_eq!(m.dirty_bytes(), 4 << 20);
        drop(m);
        // Both AL slots unreadable after a crash: everything is dirty.
        let t2 = Tmp::new("tornal2");
        let mut m = Meta::create(&t2.0, params(64 << 20), DEV).unwrap();
        m.al_begin(0, 1).unwrap();
        drop(m);
        patch(&t2.0, AL_OFFSET, &[0u8; 2 * BLOCK as usize]);
        let m = Meta::open(&t2.0).unwrap();
        assert!(m.recovery().unwrap().all_dirty);
        assert_eq!(m.dirty_bytes(), 64 << 20);
        drop(m);
        // ... and the log was rewritten: a clean reopen after close works.
        let mut m = Meta::open(&t2.0).unwrap();
        assert_eq!(m.recovery().unwrap().al_extents, 0);
        m.close_clean().unwrap();
        drop(m);
        assert!(!Meta::open(&t2.0).unwrap().recovered_from_crash());
    }

    #[test]
    fn foreign_garbage_truncated_and_newer_files_are_refused() {
        // Garbage.
        let t = Tmp::new("garbage");
        let mut rng = Rng(7);
        let junk: Vec<u8> = (0..64 * 1024).map(|_| rng.next() as u8).collect();
        std::fs::write(&t.0, &junk).unwrap();
        let e = Meta::open(&t.0).unwrap_err();
        assert!(matches!(e, MetaError::NotMetadata { .. }), "{e}");
        assert!(e.to_string().contains("is not ublk-mirror metadata"), "{e}");
        // Empty and short files.
        std::fs::write(&t.0, b"").unwrap();
        assert!(matches!(
            Meta::open(&t.0).unwrap_err(),
            MetaError::Truncated { len: 0, .. }
        ));
        std::fs::write(&t.0, b"hello").unwrap();
        assert!(matches!(Meta::open(&t.0).unwrap_err(), MetaError::NotMetadata { .. }));

        // A valid file cut short: the bitmap is missing.
        let t2 = Tmp::new("trunc");
        drop(Meta::create(&t2.0, params(1 << 30), DEV).unwrap());
        let f = OpenOptions::new().write(true).open(&t2.0).unwrap();
        f.set_len(BITMAP_OFFSET + 4096).unwrap();
        drop(f);
        let e = Meta::open(&t2.0).unwrap_err();
        assert!(
            matches!(e, MetaError::Truncated { need, .. } if need == BITMAP_OFFSET + 32768),
            "{e}"
        );
        // Cut inside the second superblock slot.
        let f = OpenOptions::new().write(true).open(&t2.0).unwrap();
        f.set_len(BLOCK + 100).unwrap();
        drop(f);
        patch(&t2.0, 10, &[0xff]); // and slot 0 damaged
        let e = Meta::open(&t2.0).unwrap_err();
        assert!(matches!(e, MetaError::Truncated { .. }), "{e}");

        // A newer format version (valid checksum).
        let t3 = Tmp::new("version");
        drop(Meta::create(&t3.0, params(1 << 20), DEV).unwrap());
        for s in 0..2 {
            let mut b = read(&t3.0, s * BLOCK, BLOCK as usize);
            put_u32(&mut b, SB_VERSION, 2);
            seal(&mut b);
            patch(&t3.0, s * BLOCK, &b);
        }
        let e = Meta::open(&t3.0).unwrap_err();
        assert!(matches!(e, MetaError::UnsupportedVersion { found: 2, .. }), "{e}");

        // A checksummed superblock with nonsense geometry is corrupt, not a panic.
        for s in 0..2 {
            let mut b = read(&t3.0, s * BLOCK, BLOCK as usize);
            put_u32(&mut b, SB_VERSION, META_VERSION);
            put_u32(&mut b, SB_REGION, 3);
            seal(&mut b);
            patch(&t3.0, s * BLOCK, &b);
        }
        let e = Meta::open(&t3.0).unwrap_err();
        assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("region_size 3"), "{e}");

        // Another device's metadata.
        let t4 = Tmp::new("foreign");
        drop(Meta::create(&t4.0, params(1 << 20), DEV + 5).unwrap());
        let m = Meta::open(&t4.0).unwrap();
        assert!(matches!(m.verify(DEV, 1 << 20), Err(MetaError::DeviceMismatch { .. })));
    }

    #[test]
    fn garbage_after_a_valid_superblock_never_panics() {
        // Random corruption of every part of a valid file: open answers Ok or an error.
        let t = Tmp::new("fuzz");
        drop(Meta::create(&t.0, small(3 << 20, 4096, 1 << 20, 4), DEV).unwrap());
        let pristine = std::fs::read(&t.0).unwrap();
        let mut rng = Rng(99);
        for _ in 0..120 {
            let mut b = pristine.clone();
            for _ in 0..1 + rng.next() % 8 {
                let i = (rng.next() % b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                let i = (rng.next() % 2) * BLOCK;
                let mut blk = b[i as usize..(i + BLOCK) as usize].to_vec();
                seal(&mut blk); // corrupt but checksummed
                b[i as usize..(i + BLOCK) as usize].copy_from_slice(&blk);
            }
            std::fs::write(&t.0, &b).unwrap();
            if let Ok(mut m) = Meta::open(&t.0) {
                let _ = m.next_dirty(0);
                let _ = m.dirty_bytes();
                m.al_begin(0, 1 << 20).unwrap();
                m.al_end(0, 1 << 20);
                m.close_clean().unwrap();
            }
        }
    }
}
