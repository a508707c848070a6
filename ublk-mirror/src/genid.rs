//! Generation identifiers and the resync decision.
//!
//! Every copy of a mirrored disk carries a small set of random 64-bit identifiers
//! ([`GenIds`]) that name *data generations*, in the manner of DRBD's UUIDs:
//!
//! - `current` — the generation this copy's data belongs to. Two copies with the same
//!   `current` hold the same data (up to the dirty bitmap, see below).
//! - `bitmap` — while a copy has changes its peer does not have, the generation the peer was
//!   last in sync with (0 when there is none). The dirty bitmap records every region written
//!   since then.
//! - `history` — the two generations before that (0 = none), newest first.
//!
//! When two copies meet, [`decide`] compares the identifiers (and a few flags) and answers
//! who copies what to whom ([`Decision`]). The transitions that keep the identifiers true are
//! pure functions here too: [`new_data_generation`] (a primary writes without its peer),
//! [`sync_started_source`] (a source begins a resync), [`sync_finished_source`] /
//! [`sync_finished_target`] (a resync completed).
//!
//! Identifiers are random ([`fresh_id`], from `/dev/urandom`); the small values
//! `0..=GEN_RESERVED_MAX` are never generated: 0 means "none" and [`GEN_JUST_CREATED`] marks
//! a copy that was never synced with anything.
//!
//! # The life of a pair
//!
//! ```text
//!                              primary A                  replica B
//! in sync                      {C, 0, [h]}                {C, 0, [h]}
//! partition, A writes          {N, C, [h]}   (new gen)    {C, 0, [h]}
//! reconnect: decide(A, B)      SourceBitmap               TargetBitmap   (A.bitmap == B.current)
//! resync done                  {N, 0, [C, h]}             {N, 0, [C, h]} (target adopts source)
//! both wrote while apart       {N1, C, ..}                {N2, C, ..}    → SplitBrain
//! resolve on B (discard)       SourceBitmap               TargetBitmap   (union of both bitmaps)
//! ```
//!
//! Bitmap-based resyncs copy the **union** of both sides' dirty bitmaps (exchanged in
//! `Bitmap` frames): the source's bits are what it wrote since the common generation, the
//! target's bits are what the target wrote (split brain) or what is still missing from an
//! interrupted resync or a crash. That is why resolving a split brain by discarding one side
//! needs no full copy.
//!
//! (DRBD's `drbd_uuid_compare` was read for the idea only; this is an independent,
//! simplified table for two hosts.)
use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};

/// The data-generation identifiers of one copy. `0` means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GenIds {
    /// The generation this copy's data belongs to.
    pub current: u64,
    /// The generation the peer was last in sync with, while this copy has changes the peer
    /// lacks (tracked in the dirty bitmap); 0 when in sync.
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

/// The `current` of a copy that was never synced with anything (DRBD's `UUID_JUST_CREATED`).
pub const GEN_JUST_CREATED: u64 = 4;

/// Identifiers `0..=GEN_RESERVED_MAX` are reserved for markers and never generated.
pub const GEN_RESERVED_MAX: u64 = 15;

/// The role a copy plays: the primary serves the guest, the secondary is the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Serves the guest's I/O and replicates writes to the peer.
    Primary,
    /// Applies the primary's writes to its backing store.
    Secondary,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

impl GenIds {
    /// The identifiers of a copy that was never synced: `{JUST_CREATED, 0, [0, 0]}`.
    pub fn just_created() -> GenIds {
        GenIds {
            current: GEN_JUST_CREATED,
            ..GenIds::default()
        }
    }

    /// True when this copy was never synced with anything.
    pub fn is_just_created(&self) -> bool {
        self.current == GEN_JUST_CREATED
    }

    /// True when `id` is one of this copy's older generations (`history`), ignoring markers.
    pub fn in_history(&self, id: u64) -> bool {
        is_real(id) && self.history.contains(&id)
    }

    /// [`new_data_generation`] as a method.
    pub fn new_data_generation(&self) -> GenIds {
        new_data_generation(self)
    }

    /// [`sync_finished_source`] as a method.
    pub fn sync_finished_source(&self) -> GenIds {
        sync_finished_source(self)
    }

    /// The real generations (not 0, not markers) this copy descends from: `bitmap` and
    /// `history`.
    fn ancestors(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.bitmap)
            .chain(self.history.iter().copied())
            .filter(|&id| is_real(id))
    }

    fn push_history(&mut self, id: u64) {
        if is_real(id) && self.history[0] != id {
            self.history = [id, self.history[0]];
        }
    }
}

impl fmt::Display for GenIds {
    /// `CURRENT:BITMAP:HIST0:HIST1` in hex, like DRBD's logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}:{:016X}:{:016X}:{:016X}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

/// A real generation identifier: not "none" and not a reserved marker.
fn is_real(id: u64) -> bool {
    id > GEN_RESERVED_MAX
}

/// A fresh random generation identifier (never `0..=GEN_RESERVED_MAX`).
///
/// Read from `/dev/urandom`; if that fails (no /dev in a sandbox), falls back to std's
/// randomly keyed hasher (seeded by the OS random source, per process) mixed with the time
/// and a counter, and logs a warning. Never panics.
pub fn fresh_id() -> u64 {
    loop {
        let id = match urandom_u64() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /dev/urandom; generation id from the hasher seed");
                fallback_u64()
            }
        };
        if is_real(id) {
            return id;
        }
    }
}

fn urandom_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn fallback_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// A primary starts writing without its peer (the peer is lost, or it was promoted while
/// disconnected): the data leaves the generation the peer knows.
///
/// - `bitmap = current` — the dirty bitmap now records everything the peer lacks. If a
///   bitmap generation is already set (a second generation while still apart), it is kept:
///   the bitmap still covers every change since that older common point, and the abandoned
///   `current` goes to `history`.
/// - a just-created copy gets no bitmap generation (its peer never had its data; a full
///   sync is needed anyway).
/// - `current = fresh_id()`.
pub fn new_data_generation(ids: &GenIds) -> GenIds {
    new_data_generation_with(ids, fresh_id())
}

/// [`new_data_generation`] with a given new identifier (deterministic, for tests).
pub fn new_data_generation_with(ids: &GenIds, fresh: u64) -> GenIds {
    let mut g = *ids;
    if is_real(g.bitmap) {
        g.push_history(g.current);
    } else if is_real(g.current) {
        g.bitmap = g.current;
    }
    g.current = fresh;
    g
}

/// The identifiers a sync source uses from the start of a resync (persist them before the
/// first block is sent): a just-created source first takes a real generation
/// ([`new_data_generation`]), because its data is about to exist on two copies and a pair of
/// just-created copies could otherwise never tell that they are in sync (DRBD gets the same
/// effect from `primary --force`). Any other source keeps its identifiers.
pub fn sync_started_source(ids: &GenIds) -> GenIds {
    if ids.is_just_created() {
        new_data_generation(ids)
    } else {
        *ids
    }
}

/// The sync source finished a resync: the peer now has everything, so the bitmap
/// generation moves into `history` and `bitmap = 0`. Unchanged when `bitmap` was 0 (a full
/// sync from an in-sync source).
pub fn sync_finished_source(ids: &GenIds) -> GenIds {
    let mut g = *ids;
    if g.bitmap != 0 {
        g.push_history(g.bitmap);
        g.bitmap = 0;
    }
    g
}

/// The sync target finished a resync from a source whose identifiers are `source_gen`
/// (what `ResyncDone` carries): the target adopts the source's generation, so both sides
/// end with identical identifiers. `source_gen` may be the source's identifiers before or
/// after [`sync_finished_source`]; the result is the same.
///
/// This is also the transition after `resolve --discard-local`: the victim's own
/// generation is dropped for the survivor's.
pub fn sync_finished_target(source_gen: &GenIds) -> GenIds {
    sync_finished_source(source_gen)
}

/// What one side knows about a copy when two copies meet (its own, or the peer's from the
/// `State` message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// Identifies the mirrored disk; both copies of one disk share it.
    pub device_id: u64,
    /// Size of the disk in bytes.
    pub size: u64,
    /// The copy's generation identifiers.
    pub r#gen: GenIds,
    /// The copy's current role.
    pub role: Role,
    /// The copy holds a complete data set of *some* generation (false for a blank replica
    /// and for the target of an unfinished resync). An inconsistent copy is never a source.
    pub consistent: bool,
    /// The copy was primary when its host crashed (writes may have been in flight): its
    /// activity-log regions may differ from the peer although `current` is equal.
    pub crashed_primary: bool,
    /// The administrator chose this copy as the victim of a split brain
    /// (`resolve --discard-local`).
    pub discard_my_data: bool,
}

/// The outcome of [`decide`], from the point of view of the *local* side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Both copies hold the same data.
    NoSync,
    /// Local is the source; copy the union of both dirty bitmaps to the peer.
    SourceBitmap,
    /// Local is the target; receive the union of both dirty bitmaps.
    TargetBitmap,
    /// Local is the source; copy the whole disk to the peer.
    SourceFull,
    /// Local is the target; receive the whole disk.
    TargetFull,
    /// Both sides wrote while apart; refuse until an administrator picks the survivor.
    SplitBrain,
    /// The copies belong to different disks or share no generation; refuse.
    Unrelated {
        /// What did not match, for the operator.
        reason: String,
    },
    /// The copies have different sizes; refuse.
    SizeMismatch,
    /// No side is fit to be the sync source (the would-be source is inconsistent, or no
    /// source can be chosen between two fresh copies); refuse and wait.
    NeitherConsistent,
}

impl Decision {
    /// The same decision seen from the peer: sources become targets and vice versa.
    pub fn mirror(&self) -> Decision {
        match self {
            Decision::SourceBitmap => Decision::TargetBitmap,
            Decision::TargetBitmap => Decision::SourceBitmap,
            Decision::SourceFull => Decision::TargetFull,
            Decision::TargetFull => Decision::SourceFull,
            other => other.clone(),
        }
    }

    /// Local sends data.
    pub fn is_source(&self) -> bool {
        matches!(self, Decision::SourceBitmap | Decision::SourceFull)
    }

    /// Local receives data.
    pub fn is_target(&self) -> bool {
        matches!(self, Decision::TargetBitmap | Decision::TargetFull)
    }

    /// A whole-disk copy (the bitmap must be set all dirty first).
    pub fn is_full(&self) -> bool {
        matches!(self, Decision::SourceFull | Decision::TargetFull)
    }

    /// The connection must be refused (split brain, unrelated, size mismatch, no source).
    pub fn is_refusal(&self) -> bool {
        !(self.is_source() || self.is_target() || *self == Decision::NoSync)
    }
}

/// Which side a rule picked as the sync source.
#[derive(Clone, Copy)]
enum Who {
    Local,
    Peer,
}

/// Bitmap-based or full resync.
#[derive(Clone, Copy)]
enum Kind {
    Bitmap,
    Full,
}

/// `who` is the source of a `kind` resync — if it is consistent; otherwise no side can be.
fn sync_from(who: Who, kind: Kind, local: &Side, peer: &Side) -> Decision {
    let source = match who {
        Who::Local => local,
        Who::Peer => peer,
    };
    if !source.consistent {
        return Decision::NeitherConsistent;
    }
    match (who, kind) {
        (Who::Local, Kind::Bitmap) => Decision::SourceBitmap,
        (Who::Local, Kind::Full) => Decision::SourceFull,
        (Who::Peer, Kind::Bitmap) => Decision::TargetBitmap,
        (Who::Peer, Kind::Full) => Decision::TargetFull,
    }
}

/// Split brain, unless exactly one side has `discard_my_data`: that side becomes the target.
fn split_brain(kind: Kind, local: &Side, peer: &Side) -> Decision {
    match (local.discard_my_data, peer.discard_my_data) {
        (true, false) => sync_from(Who::Peer, kind, local, peer),
        (false, true) => sync_from(Who::Local, kind, local, peer),
        _ => Decision::SplitBrain,
    }
}

/// Evaluates a rule both ways: `l` = "local is the source by this rule", `p` = "peer is".
/// Both at once is contradictory evidence: treated as a split brain (full copy if resolved).
fn rule(l: bool, p: bool, kind: Kind, local: &Side, peer: &Side) -> Option<Decision> {
    match (l, p) {
        (true, false) => Some(sync_from(Who::Local, kind, local, peer)),
        (false, true) => Some(sync_from(Who::Peer, kind, local, peer)),
        (true, true) => Some(split_brain(Kind::Full, local, peer)),
        (false, false) => None,
    }
}

/// Decides the resync when two copies meet. Pure; `decide(b, a)` is always
/// `decide(a, b).mirror()`.
///
/// The rules, first match wins ("L" = local, "P" = peer; every rule is applied in both
/// directions, and whichever side a rule names as the **source must be consistent**, else
/// the answer is `NeitherConsistent` — an inconsistent copy is never a source):
///
/// | # | condition | decision (local's view) |
/// |---|-----------|-------------------------|
/// | 1 | `device_id` differs | `Unrelated` |
/// | 2 | `size` differs | `SizeMismatch` |
/// | 3 | a `current` is 0 (no generation at all) | `Unrelated` |
/// | 4 | both `current == JUST_CREATED` | the one consistent side without `discard_my_data` is `SourceFull`; if both qualify: the Primary is the source, two Primaries are a `SplitBrain`, two Secondaries `NeitherConsistent`; if none qualifies `NeitherConsistent` |
/// | 5 | only P just created | `SourceFull` (mirror: `TargetFull`) |
/// | 6 | `L.current == P.current` | both consistent: `NoSync`, unless a side is `crashed_primary` → that side `SourceBitmap` (its activity-log regions are in its bitmap); both crashed: the Primary is the source, else as a split brain (rule 9). One inconsistent (unfinished resync): the consistent side `SourceBitmap`. Neither consistent: `NeitherConsistent` |
/// | 7 | `L.bitmap == P.current` (L wrote since they parted) | `SourceBitmap` (mirror: `TargetBitmap`) |
/// | 8 | `P.current` in `L.history` (P is an older generation of L) | `SourceFull` (mirror: `TargetFull`) |
/// | 9 | `L.bitmap == P.bitmap != 0` (both wrote since the same common generation) | `SplitBrain`; if exactly one side has `discard_my_data`, that side is `TargetBitmap` (union of both bitmaps) |
/// | 10 | `L.bitmap`/`L.history` and `P.bitmap`/`P.history` share a generation (diverged further) | `SplitBrain`; with exactly one `discard_my_data`, that side is `TargetFull` |
/// | 11 | otherwise | `Unrelated` (no common generation) |
///
/// If rule 7 or 8 holds in both directions at once (impossible for identifiers produced by
/// the transitions here, but possible for crafted ones), it is treated as rule 10.
pub fn decide(local: &Side, peer: &Side) -> Decision {
    if local.device_id != peer.device_id {
        return Decision::Unrelated {
            reason: format!(
                "different disks: device id {:016x} here, {:016x} on the peer",
                local.device_id, peer.device_id
            ),
        };
    }
    if local.size != peer.size {
        return Decision::SizeMismatch;
    }
    let (l, p) = (&local.r#gen, &peer.r#gen);
    if l.current == 0 || p.current == 0 {
        return Decision::Unrelated {
            reason: format!("a copy has no generation identifier (here {l}, peer {p})"),
        };
    }
    match (l.is_just_created(), p.is_just_created()) {
        (true, true) => return both_just_created(local, peer),
        (true, false) => return sync_from(Who::Peer, Kind::Full, local, peer),
        (false, true) => return sync_from(Who::Local, Kind::Full, local, peer),
        (false, false) => {}
    }
    if l.current == p.current {
        return equal_current(local, peer);
    }
    let bitmap_l = is_real(l.bitmap) && l.bitmap == p.current;
    let bitmap_p = is_real(p.bitmap) && p.bitmap == l.current;
    if let Some(d) = rule(bitmap_l, bitmap_p, Kind::Bitmap, local, peer) {
        return d;
    }
    if let Some(d) = rule(
        l.in_history(p.current),
        p.in_history(l.current),
        Kind::Full,
        local,
        peer,
    ) {
        return d;
    }
    if is_real(l.bitmap) && l.bitmap == p.bitmap {
        return split_brain(Kind::Bitmap, local, peer);
    }
    if l.ancestors().any(|a| p.ancestors().any(|b| a == b)) {
        return split_brain(Kind::Full, local, peer);
    }
    Decision::Unrelated {
        reason: format!("no common data generation (here {l}, peer {p})"),
    }
}

/// Rule 4: two copies that were never synced.
fn both_just_created(local: &Side, peer: &Side) -> Decision {
    let fit = |s: &Side| s.consistent && !s.discard_my_data;
    match (fit(local), fit(peer)) {
        (false, false) => Decision::NeitherConsistent,
        (true, false) => Decision::SourceFull,
        (false, true) => Decision::TargetFull,
        (true, true) => match (local.role, peer.role) {
            (Role::Primary, Role::Secondary) => Decision::SourceFull,
            (Role::Secondary, Role::Primary) => Decision::TargetFull,
            (Role::Primary, Role::Primary) => Decision::SplitBrain,
            (Role::Secondary, Role::Secondary) => Decision::NeitherConsistent,
        },
    }
}

/// Rule 6: same current generation.
fn equal_current(local: &Side, peer: &Side) -> Decision {
    match (local.consistent, peer.consistent) {
        (false, false) => Decision::NeitherConsistent,
        (true, false) => Decision::SourceBitmap,
        (false, true) => Decision::TargetBitmap,
        (true, true) => match (local.crashed_primary, peer.crashed_primary) {
            (false, false) => Decision::NoSync,
            (true, false) => Decision::SourceBitmap,
            (false, true) => Decision::TargetBitmap,
            (true, true) => match (local.role, peer.role) {
                (Role::Primary, Role::Secondary) => Decision::SourceBitmap,
                (Role::Secondary, Role::Primary) => Decision::TargetBitmap,
                _ => split_brain(Kind::Bitmap, local, peer),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u64 = 0x1234_5678_9abc_def0;
    const SIZE: u64 = 1 << 30;

    fn side(ids: GenIds) -> Side {
        Side {
            device_id: DEV,
            size: SIZE,
            r#gen: ids,
            role: Role::Secondary,
            consistent: true,
            crashed_primary: false,
            discard_my_data: false,
        }
    }

    fn primary(ids: GenIds) -> Side {
        Side {
            role: Role::Primary,
            ..side(ids)
        }
    }

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> GenIds {
        GenIds {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    fn same_kind(a: &Decision, b: &Decision) -> bool {
        match (a, b) {
            (Decision::Unrelated { .. }, Decision::Unrelated { .. }) => true,
            _ => a == b,
        }
    }

    /// decide(a, b) == want, and decide(b, a) is its mirror image.
    #[track_caller]
    fn check(a: &Side, b: &Side, want: Decision) {
        let ab = decide(a, b);
        let ba = decide(b, a);
        assert!(
            same_kind(&ab, &want),
            "decide(a, b) = {ab:?}, want {want:?}\na = {a:?}\nb = {b:?}"
        );
        assert!(
            same_kind(&ba, &want.mirror()),
            "decide(b, a) = {ba:?}, want {:?}\na = {a:?}\nb = {b:?}",
            want.mirror()
        );
    }

    const C: u64 = 0x1000_0000_0000_00c0;
    const N: u64 = 0x1000_0000_0000_00d0;
    const N2: u64 = 0x1000_0000_0000_00d2;
    const H: u64 = 0x1000_0000_0000_00e0;
    const H2: u64 = 0x1000_0000_0000_00e2;
    const X: u64 = 0x1000_0000_0000_00f0;

    #[test]
    fn rule1_different_device_is_unrelated_even_with_equal_generations() {
        let a = side(g(C, 0, 0, 0));
        let b = Side {
            device_id: DEV + 1,
            ..side(g(C, 0, 0, 0))
        };
        check(&a, &b, Decision::Unrelated { reason: String::new() });
        let Decision::Unrelated { reason } = decide(&a, &b) else {
            panic!()
        };
        assert!(reason.contains("different disks"), "{reason}");
    }

    #[test]
    fn rule2_size_mismatch() {
        let a = side(g(C, 0, 0, 0));
        let b = Side {
            size: SIZE / 2,
            ..side(g(C, 0, 0, 0))
        };
        check(&a, &b, Decision::SizeMismatch);
    }

    #[test]
    fn rule3_missing_generation_is_unrelated() {
        check(
            &side(GenIds::default()),
            &side(g(C, 0, 0, 0)),
            Decision::Unrelated { reason: String::new() },
        );
        check(
            &side(GenIds::default()),
            &side(GenIds::default()),
            Decision::Unrelated { reason: String::new() },
        );
    }

    #[test]
    fn rule4_both_just_created() {
        let jc = GenIds::just_created();
        let blank = Side {
            consistent: false,
            ..side(jc)
        };
        // The primary (consistent: it holds the guest's data) is the source.
        check(&primary(jc), &blank, Decision::SourceFull);
        // Consistency decides even against roles: an inconsistent primary is no source.
        let blank_primary = Side {
            consistent: false,
            ..primary(jc)
        };
        check(&side(jc), &blank_primary, Decision::SourceFull);
        // Both consistent: the primary wins.
        check(&primary(jc), &side(jc), Decision::SourceFull);
        // Both consistent primaries: both may have written.
        check(&primary(jc), &primary(jc), Decision::SplitBrain);
        // Two consistent secondaries: nobody to choose.
        check(&side(jc), &side(jc), Decision::NeitherConsistent);
        // Neither consistent.
        check(&blank, &blank, Decision::NeitherConsistent);
        check(&blank_primary, &blank, Decision::NeitherConsistent);
        // discard_my_data disqualifies one of two candidates.
        let victim = Side {
            discard_my_data: true,
            ..primary(jc)
        };
        check(&primary(jc), &victim, Decision::SourceFull);
        check(&side(jc), &victim, Decision::SourceFull);
    }

    #[test]
    fn rule5_one_just_created_gets_a_full_copy() {
        let jc = Side {
            consistent: false,
            ..side(GenIds::just_created())
        };
        check(&side(g(C, 0, H, 0)), &jc, Decision::SourceFull);
        check(&side(g(N, C, H, 0)), &jc, Decision::SourceFull);
        // Even if the fresh side is primary and claims consistency: it was never synced.
        check(
            &side(g(C, 0, 0, 0)),
            &primary(GenIds::just_created()),
            Decision::SourceFull,
        );
        // ... but the other side must be consistent.
        let inconsistent = Side {
            consistent: false,
            ..side(g(C, 0, 0, 0))
        };
        check(&inconsistent, &jc, Decision::NeitherConsistent);
    }

    #[test]
    fn rule6_equal_current() {
        let a = side(g(C, 0, H, 0));
        check(&a, &side(g(C, 0, H, 0)), Decision::NoSync);
        check(&primary(g(C, 0, H, 0)), &a, Decision::NoSync);
        // A crashed primary's activity-log regions must go to the peer.
        let crashed = Side {
            crashed_primary: true,
            ..side(g(C, 0, H, 0))
        };
        check(&crashed, &a, Decision::SourceBitmap);
        // Both crashed: the current primary is the source; otherwise split brain unless
        // one side gives up its data.
        let crashed_p = Side {
            role: Role::Primary,
            ..crashed.clone()
        };
        check(&crashed_p, &crashed, Decision::SourceBitmap);
        check(&crashed, &crashed, Decision::SplitBrain);
        check(&crashed_p, &crashed_p, Decision::SplitBrain);
        let crashed_victim = Side {
            discard_my_data: true,
            ..crashed.clone()
        };
        check(&crashed, &crashed_victim, Decision::SourceBitmap);
        // A mid-resync target with the same current: the consistent side resumes.
        let inconsistent = Side {
            consistent: false,
            ..side(g(C, 0, H, 0))
        };
        check(&a, &inconsistent, Decision::SourceBitmap);
        // ... even if the inconsistent side crashed as primary.
        let inconsistent_crashed = Side {
            crashed_primary: true,
            ..inconsistent.clone()
        };
        check(&a, &inconsistent_crashed, Decision::SourceBitmap);
        check(&inconsistent, &inconsistent, Decision::NeitherConsistent);
    }

    #[test]
    fn rule7_bitmap_equals_peer_current() {
        // L wrote while apart: L {N, C}, P {C, 0}.
        check(&primary(g(N, C, H, 0)), &side(g(C, 0, H, 0)), Decision::SourceBitmap);
        // Roles do not matter; generations do.
        check(&side(g(N, C, H, 0)), &primary(g(C, 0, H, 0)), Decision::SourceBitmap);
        // The peer is a mid-resync target (inconsistent): still the target, resync resumes.
        let target = Side {
            consistent: false,
            ..side(g(C, 0, H, 0))
        };
        check(&side(g(N, C, H, 0)), &target, Decision::SourceBitmap);
        // The would-be source is inconsistent: nobody can be the source.
        let bad_source = Side {
            consistent: false,
            ..side(g(N, C, H, 0))
        };
        check(&bad_source, &side(g(C, 0, H, 0)), Decision::NeitherConsistent);
        // Contradictory (crafted) identifiers: both claim to be ahead.
        check(&side(g(N, C, 0, 0)), &side(g(C, N, 0, 0)), Decision::SplitBrain);
    }

    #[test]
    fn rule8_peer_is_an_older_generation() {
        // L went through two generations since P was in sync.
        check(&side(g(N2, 0, N, C)), &side(g(C, 0, H, 0)), Decision::SourceFull);
        check(&side(g(N2, N, C, 0)), &side(g(C, 0, H, 0)), Decision::SourceFull);
        // P mid-resync from an even older state: still the target.
        let target = Side {
            consistent: false,
            ..side(g(C, 0, H, 0))
        };
        check(&side(g(N2, 0, C, H)), &target, Decision::SourceFull);
        let bad_source = Side {
            consistent: false,
            ..side(g(N2, 0, C, H))
        };
        check(&bad_source, &side(g(C, 0, H, 0)), Decision::NeitherConsistent);
        // Contradictory (crafted): each is in the other's history.
        check(&side(g(N, 0, C, 0)), &side(g(C, 0, N, 0)), Decision::SplitBrain);
    }

    #[test]
    fn rule9_both_wrote_since_the_same_generation() {
        let a = primary(g(N, C, H, 0));
        let b = primary(g(N2, C, H, 0));
        check(&a, &b, Decision::SplitBrain);
        let b_victim = Side {
            discard_my_data: true,
            ..b.clone()
        };
        check(&a, &b_victim, Decision::SourceBitmap);
        let a_victim = Side {
            discard_my_data: true,
            ..a.clone()
        };
        check(&a_victim, &b, Decision::TargetBitmap);
        // Both volunteer as victims: still unresolved.
        check(&a_victim, &b_victim, Decision::SplitBrain);
        // The survivor must be consistent.
        let b_victim_bad_a = Side {
            consistent: false,
            ..a.clone()
        };
        check(&b_victim_bad_a, &b_victim, Decision::NeitherConsistent);
    }

    #[test]
    fn rule10_diverged_further_is_split_brain_resolved_by_full_copy() {
        // Both descend from C, but neither's bitmap names the other's current.
        let a = side(g(N, C, H, 0));
        let b = side(g(N2, X, C, H));
        check(&a, &b, Decision::SplitBrain);
        let b_victim = Side {
            discard_my_data: true,
            ..b.clone()
        };
        check(&a, &b_victim, Decision::SourceFull);
        // Common history only.
        check(&side(g(N, 0, H, H2)), &side(g(N2, 0, X, H2)), Decision::SplitBrain);
    }

    #[test]
    fn rule11_no_common_generation_is_unrelated() {
        check(
            &side(g(N, C, H, 0)),
            &side(g(N2, X, H2, 0)),
            Decision::Unrelated { reason: String::new() },
        );
        // Markers never count as common ancestry.
        check(
            &side(g(N, GEN_JUST_CREATED, 0, 0)),
            &side(g(N2, GEN_JUST_CREATED, 0, 0)),
            Decision::Unrelated { reason: String::new() },
        );
    }

    #[test]
    fn transitions() {
        let g0 = g(C, 0, H, H2);
        let g1 = new_data_generation_with(&g0, N);
        assert_eq!(g1, g(N, C, H, H2));
        // A second generation while still apart keeps the older bitmap generation.
        let g2 = new_data_generation_with(&g1, N2);
        assert_eq!(g2, g(N2, C, N, H));
        assert_eq!(sync_finished_source(&g1), g(N, 0, C, H));
        assert_eq!(sync_finished_source(&g0), g0);
        assert_eq!(sync_finished_target(&g1), sync_finished_source(&g1));
        assert_eq!(
            sync_finished_target(&sync_finished_source(&g1)),
            sync_finished_source(&g1)
        );
        // A just-created copy that starts writing has no bitmap generation.
        let jc = new_data_generation_with(&GenIds::just_created(), N);
        assert_eq!(jc, g(N, 0, 0, 0));
        // A just-created source takes a real generation when a sync starts; others keep theirs.
        let s = sync_started_source(&GenIds::just_created());
        assert!(is_real(s.current) && s.bitmap == 0);
        assert_eq!(sync_started_source(&g1), g1);
        // Methods are the same functions.
        assert_eq!(g0.sync_finished_source(), sync_finished_source(&g0));
        let fresh = g0.new_data_generation();
        assert_eq!((fresh.bitmap, fresh.history), (C, [H, H2]));
        assert!(is_real(fresh.current) && fresh.current != C);
    }

    #[test]
    fn fresh_ids_are_random_and_never_reserved() {
        let ids: Vec<u64> = (0..1000).map(|_| fresh_id()).collect();
        assert!(ids.iter().all(|&id| id > GEN_RESERVED_MAX));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "1000 random u64 must not collide");
        let f = fallback_u64();
        assert_ne!(f, fallback_u64());
    }

    /// A two-copy world driven only by the transitions, as the engine will.
    struct Pair {
        a: Side,
        b: Side,
    }

    impl Pair {
        fn fresh() -> Pair {
            let a = primary(GenIds::just_created());
            let b = Side {
                consistent: false,
                ..side(GenIds::just_created())
            };
            Pair { a, b }
        }

        /// Connect: decide, run the resync to the end, return what was decided.
        fn connect(&mut self) -> Decision {
            let d = decide(&self.a, &self.b);
            assert!(same_kind(&decide(&self.b, &self.a), &d.mirror()));
            let (src, dst) = if d.is_source() {
                (&mut self.a, &mut self.b)
            } else if d.is_target() {
                (&mut self.b, &mut self.a)
            } else {
                return d;
            };
            src.r#gen = sync_finished_source(&sync_started_source(&src.r#gen));
            src.crashed_primary = false;
            dst.r#gen = sync_finished_target(&src.r#gen);
            dst.consistent = true;
            dst.discard_my_data = false;
            assert_eq!(src.r#gen, dst.r#gen);
            d
        }
    }

    #[test]
    fn scenario_initial_sync_then_partition_then_bitmap_resync() {
        let mut p = Pair::fresh();
        assert_eq!(p.connect(), Decision::SourceFull);
        assert!(
            !p.a.r#gen.is_just_created(),
            "the first sync gives the pair a real generation"
        );
        assert_eq!(p.connect(), Decision::NoSync);
        // Partition, the primary writes: new generation.
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceBitmap);
        assert_eq!(p.connect(), Decision::NoSync);
        // Partition, failover: B is promoted and writes; A is gone for a while.
        p.b.role = Role::Primary;
        p.a.role = Role::Secondary;
        p.b.r#gen = new_data_generation(&p.b.r#gen);
        p.b.r#gen = new_data_generation(&p.b.r#gen); // B's daemon restarted while still apart
        assert_eq!(p.connect(), Decision::TargetBitmap);
        assert_eq!(p.connect(), Decision::NoSync);
    }

    #[test]
    fn scenario_split_brain_and_resolve() {
        let mut p = Pair::fresh();
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceFull);
        // Partition; both become primary and write.
        p.b.role = Role::Primary;
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        p.b.r#gen = new_data_generation(&p.b.r#gen);
        assert_eq!(p.connect(), Decision::SplitBrain);
        assert_eq!(p.connect(), Decision::SplitBrain, "refused until resolved");
        // resolve --discard-local on B.
        p.b.role = Role::Secondary;
        p.b.discard_my_data = true;
        assert_eq!(p.connect(), Decision::SourceBitmap);
        assert!(!p.b.discard_my_data);
        assert_eq!(p.connect(), Decision::NoSync);
        // Split brain after A went through two generations: resolved with a full copy.
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        p.b.r#gen = new_data_generation(&p.b.r#gen);
        let x = p.a.r#gen;
        p.a.r#gen = new_data_generation(&sync_finished_source(&x));
        assert_eq!(p.connect(), Decision::SplitBrain);
        p.a.discard_my_data = true;
        assert_eq!(p.connect(), Decision::TargetFull);
        assert_eq!(p.connect(), Decision::NoSync);
    }

    #[test]
    fn scenario_replica_restarted_blank_and_old_replica() {
        let mut p = Pair::fresh();
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceFull);
        // The replica's disk is replaced: new metadata.
        p.b.r#gen = GenIds::just_created();
        p.b.consistent = false;
        assert_eq!(p.connect(), Decision::SourceFull);
        // Keep a copy of the replica, then two more generations pass.
        let old = p.b.clone();
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceBitmap);
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceBitmap);
        // The old replica comes back: its generation is in A's history → full copy.
        p.b = old;
        assert_eq!(p.connect(), Decision::SourceFull);
        assert_eq!(p.connect(), Decision::NoSync);
        // Three generations later it would be unknown: unrelated, refused.
        let old = p.b.clone();
        for _ in 0..3 {
            p.a.r#gen = new_data_generation(&p.a.r#gen);
            assert_eq!(p.connect(), Decision::SourceBitmap);
        }
        p.b = old;
        assert!(matches!(p.connect(), Decision::Unrelated { .. }));
    }

    #[test]
    fn scenario_crashed_primary_and_interrupted_resync() {
        let mut p = Pair::fresh();
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        assert_eq!(p.connect(), Decision::SourceFull);
        // The primary's host crashes while connected; it comes back.
        p.a.crashed_primary = true;
        assert_eq!(p.connect(), Decision::SourceBitmap);
        assert!(!p.a.crashed_primary);
        // Partition, A writes, the resync starts and is interrupted (B inconsistent).
        p.a.r#gen = new_data_generation(&p.a.r#gen);
        p.b.consistent = false;
        assert_eq!(decide(&p.a, &p.b), Decision::SourceBitmap, "the resync resumes");
        // A is lost; B must not become a source for anyone.
        let c = Side {
            consistent: false,
            ..side(p.b.r#gen)
        };
        assert_eq!(decide(&p.b, &c), Decision::NeitherConsistent);
        assert_eq!(p.connect(), Decision::SourceBitmap);
        assert_eq!(p.connect(), Decision::NoSync);
    }

    /// splitmix64: a tiny deterministic generator for the property test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn pick(&mut self, from: &[u64]) -> u64 {
            from[(self.next() % from.len() as u64) as usize]
        }
        fn bit(&mut self) -> bool {
            self.next() & 1 == 1
        }
    }

    #[test]
    fn property_never_both_sources_and_always_mirror_images() {
        // A small pool of ids so that random identifiers often share generations.
        let pool = [0, GEN_JUST_CREATED, C, N, N2, H, H2, X];
        let mut rng = Rng(0x5eed);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let mk = |rng: &mut Rng| Side {
                device_id: if rng.next().is_multiple_of(16) { DEV + 1 } else { DEV },
                size: if rng.next().is_multiple_of(16) { SIZE / 2 } else { SIZE },
                r#gen: GenIds {
                    current: rng.pick(&pool),
                    bitmap: rng.pick(&pool),
                    history: [rng.pick(&pool), rng.pick(&pool)],
                },
                role: if rng.bit() { Role::Primary } else { Role::Secondary },
                consistent: rng.bit(),
                crashed_primary: rng.bit(),
                discard_my_data: rng.next().is_multiple_of(4),
            };
            let a = mk(&mut rng);
            let b = mk(&mut rng);
            let ab = decide(&a, &b);
            let ba = decide(&b, &a);
            assert!(same_kind(&ba, &ab.mirror()), "{ab:?} vs {ba:?}\n{a:?}\n{b:?}");
            assert!(!(ab.is_source() && ba.is_source()), "both sources: {a:?} {b:?}");
            assert!(!(ab.is_target() && ba.is_target()), "both targets: {a:?} {b:?}");
            if ab.is_source() {
                assert!(a.consistent, "inconsistent source: {a:?} {b:?}");
            }
            if ba.is_source() {
                assert!(b.consistent, "inconsistent source: {a:?} {b:?}");
            }
            seen.insert(std::mem::discriminant(&ab));
        }
        // Every outcome was reached, so the property covered every rule's result.
        assert_eq!(seen.len(), 9, "{seen:?}");
    }
}
