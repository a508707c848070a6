//! Watching the state-file: is the file this controller has open still the one at the
//! configured path, and does every peer's slot decode?
//!
//! An open file descriptor outlives its path: after the state-file is deleted, renamed away or
//! replaced (by an empty file, a directory, a restored copy), a controller that only kept
//! writing its descriptor would keep using a file no host that (re)opens the path can see.
//! So at every state-file tick the I/O shell ([`check`]) compares the identity of the open file
//! (`fstat`: device and inode) with the path's (`stat`), and (re)opens the path when it names
//! another regular file that is large enough for the pool. A path that is missing, not a
//! regular file, too small, or cannot be checked or opened is a [`FileProblem`]; the open file,
//! if any, is kept meanwhile (hosts that still have it open keep seeing each other through it).
//!
//! The decisions are sans-I/O, so they are tested without a filesystem:
//! - [`decide`]: from the two identities, keep the open file or (re)open the path;
//! - [`FileCheck::problem`]: what is wrong with the path, if anything;
//! - [`Watcher`]: *episodes*. A problem is reported once when it starts (each kind of problem
//!   at most once per episode, e.g. "missing", then "a directory"), and once when it ends
//!   ([`WatchEvent::FileHealed`]); a reopen is reported as [`WatchEvent::Replaced`]. A peer's
//!   slot that does not decode (torn, garbage, another format version, another host's record)
//!   is an episode of its own per peer ([`WatchEvent::SlotCorrupt`] … [`WatchEvent::SlotHealed`]),
//!   so "its slot is corrupt" is told apart from "the peer is silent". A slot that was never
//!   written (all zeros) neither starts nor ends an episode.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::statefile::{self, SlotError, StateFile};

/// A file's identity: device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {:#x} inode {}", self.dev, self.ino)
    }
}

/// What the configured path names right now (`stat`, following symbolic links).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathState {
    /// A regular file of `len` bytes.
    File { id: FileId, len: u64 },
    /// Nothing (ENOENT, or a directory on the way is missing).
    Missing,
    /// Something else: "a directory", "a FIFO", ….
    NotRegular(&'static str),
    /// `stat` failed otherwise (permissions, I/O error, a stale NFS handle, a symlink loop).
    Error(String),
}

/// What to do with the open state-file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the open file (or, with none open, stay without one).
    Keep,
    /// Open the path (a new file replaces the open one).
    Open,
}

/// Keep the open file (`own`) or (re)open `path`? A file is adopted when it is another regular
/// file of at least `need` bytes; with no file open, any regular file is opened (and extended
/// to `need`, as at start), and a missing path is created only when `may_create` (before the
/// first successful open, as documented for the start).
pub fn decide(own: Option<FileId>, path: &PathState, need: u64, may_create: bool) -> Action {
    match (own, path) {
        (Some(o), PathState::File { id, .. }) if o == *id => Action::Keep,
        (None, PathState::File { .. }) => Action::Open,
        (Some(_), PathState::File { len, .. }) if *len >= need => Action::Open,
        (None, PathState::Missing) if may_create => Action::Open,
        _ => Action::Keep,
    }
}

/// One look at the state-file: what was open, what the path names, what a (re)open gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCheck {
    /// The open file's identity before the check (None: none open, or its `fstat` failed).
    pub own: Option<FileId>,
    pub path: PathState,
    /// The size the pool needs.
    pub need: u64,
    /// The result of opening the path, when [`decide`] said [`Action::Open`].
    pub opened: Option<Result<FileId, String>>,
}

impl FileCheck {
    /// The file in use after the check.
    pub fn in_use(&self) -> Option<FileId> {
        match &self.opened {
            Some(Ok(id)) => Some(*id),
            _ => self.own,
        }
    }

    /// No file was open and the path's regular file could not be opened: a state-file I/O
    /// failure (reported as such by membership, `state_file_error`), not a problem of the
    /// path. Neither starts nor ends an episode.
    pub fn io_failure_only(&self) -> bool {
        self.own.is_none() && matches!(self.path, PathState::File { .. }) && matches!(self.opened, Some(Err(_)))
    }

    /// What is wrong with the path, if anything (None: the file in use is the path's).
    pub fn problem(&self) -> Option<FileProblem> {
        // Just opened from the path (perhaps created there at start): it is the path's file.
        if let Some(Ok(_)) = &self.opened {
            return None;
        }
        if let Some(Err(e)) = &self.opened {
            if matches!(self.path, PathState::Missing) {
                return Some(FileProblem::Missing);
            }
            return Some(FileProblem::OpenFailed(e.clone()));
        }
        match &self.path {
            PathState::File { id, len } => {
                if self.in_use() == Some(*id) {
                    None
                } else if *len < self.need {
                    Some(FileProblem::TooSmall {
                        len: *len,
                        need: self.need,
                    })
                } else {
                    // Not adopted for another reason (cannot happen with `decide`).
                    Some(FileProblem::OpenFailed("not opened".into()))
                }
            }
            PathState::Missing => Some(FileProblem::Missing),
            PathState::NotRegular(what) => Some(FileProblem::NotRegular(what)),
            PathState::Error(e) => Some(FileProblem::Unreachable(e.clone())),
        }
    }
}

/// Why the configured path does not name a usable state-file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileProblem {
    /// Deleted or renamed away.
    Missing,
    /// A directory, FIFO, socket or device is there instead.
    NotRegular(&'static str),
    /// Another regular file, too small for the pool's slots (not adopted; it may be a copy in
    /// progress).
    TooSmall { len: u64, need: u64 },
    /// The path cannot be checked (`stat` fails).
    Unreachable(String),
    /// Another file is there but cannot be opened.
    OpenFailed(String),
}

impl FileProblem {
    /// A short name, the same for every instance of a kind (one report per kind and episode).
    pub fn name(&self) -> &'static str {
        match self {
            FileProblem::Missing => "missing",
            FileProblem::NotRegular(_) => "not a regular file",
            FileProblem::TooSmall { .. } => "too small",
            FileProblem::Unreachable(_) => "cannot be checked",
            FileProblem::OpenFailed(_) => "cannot be opened",
        }
    }
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileProblem::Missing => f.write_str("is missing (deleted or renamed)"),
            FileProblem::NotRegular(what) => write!(f, "is not a regular file (it is {what})"),
            FileProblem::TooSmall { len, need } => write!(
                f,
                "was replaced by a file too small for the pool ({len} bytes, the slots need {need}); not adopted"
            ),
            FileProblem::Unreachable(e) => write!(f, "cannot be checked: {e}"),
            FileProblem::OpenFailed(e) => write!(f, "names another file that cannot be opened: {e}"),
        }
    }
}

/// How a peer's slot read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotHealth {
    /// A valid record of that peer.
    Valid,
    /// Never written (all zeros).
    Empty,
    /// Torn, garbage, bad checksum.
    Corrupt(String),
    /// A valid slot this host cannot use: another format version, another host's record.
    Unreadable(String),
}

impl SlotHealth {
    pub fn of(r: &Result<statefile::SlotRecord, SlotError>) -> Self {
        match r {
            Ok(_) => SlotHealth::Valid,
            Err(SlotError::Empty { .. }) => SlotHealth::Empty,
            Err(SlotError::Corrupt { reason, .. }) => SlotHealth::Corrupt(reason.clone()),
            Err(e) => SlotHealth::Unreadable(e.to_string()),
        }
    }
}

/// What the watcher reports. Each maps to one controller event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The path has a problem: the first of its kind in this episode (`episode_start`: the
    /// first problem of the episode, i.e. redundancy was just lost). `using`: the file still
    /// in use (the removed or replaced one), if any.
    File {
        problem: FileProblem,
        using: Option<FileId>,
        episode_start: bool,
    },
    /// The path names another file, which is now in use (old → new).
    Replaced { old: FileId, new: FileId },
    /// The episode ended: the file in use is the path's again. `problems`: what was reported.
    FileHealed {
        problems: Vec<&'static str>,
        lasted: Duration,
    },
    /// The peer's slot does not decode: the first such read of an episode.
    SlotCorrupt { peer: String, health: SlotHealth },
    /// The peer's slot decodes again.
    SlotHealed { peer: String, lasted: Duration },
}

impl fmt::Display for WatchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchEvent::File { problem, using, .. } => {
                write!(f, "{problem}: ")?;
                match using {
                    Some(id) => write!(
                        f,
                        "this host keeps using the file it has open ({id}), which a host that opens the path cannot see"
                    ),
                    None => f.write_str("no state-file is open"),
                }?;
                f.write_str("; restore the state-file (or recreate it) and every controller uses it within a tick")
            }
            WatchEvent::Replaced { old, new } => write!(
                f,
                "now names another file ({old} → {new}): reopened, slots are read and written there from now on"
            ),
            WatchEvent::FileHealed { problems, lasted } => write!(
                f,
                "is usable again after {:.1} s (was: {})",
                lasted.as_secs_f64(),
                problems.join(", ")
            ),
            WatchEvent::SlotCorrupt { peer, health } => match health {
                SlotHealth::Corrupt(reason) => write!(
                    f,
                    "corrupt slot of peer {peer}: {reason} (the slot holds bytes that do not decode, the peer is not merely silent)"
                ),
                SlotHealth::Unreadable(reason) => write!(f, "unreadable slot of peer {peer}: {reason}"),
                SlotHealth::Valid | SlotHealth::Empty => write!(f, "slot of peer {peer} does not decode"),
            },
            WatchEvent::SlotHealed { peer, lasted } => write!(
                f,
                "slot of peer {peer} decodes again after {:.1} s",
                lasted.as_secs_f64()
            ),
        }
    }
}

#[derive(Debug)]
struct Episode {
    since: Instant,
    reported: Vec<&'static str>,
    /// The last problem seen (for the status).
    last: FileProblem,
}

/// Episodes of the state-file and of every peer's slot (sans-I/O).
#[derive(Debug, Default)]
pub struct Watcher {
    /// The file last in use (survives a dropped handle, so a reopen that lands on another file
    /// is still reported as a replacement).
    current: Option<FileId>,
    file: Option<Episode>,
    slots: BTreeMap<String, (Instant, SlotHealth)>,
}

impl Watcher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one [`FileCheck`]; returns the events it causes (in order).
    pub fn observe_file(&mut self, check: &FileCheck, now: Instant) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        if check.io_failure_only() {
            return out;
        }
        if let Some(Ok(new)) = &check.opened {
            if let Some(old) = self.current
                && old != *new
            {
                out.push(WatchEvent::Replaced { old, new: *new });
            }
            self.current = Some(*new);
        } else if let Some(own) = check.own {
            self.current = Some(own);
        }
        match check.problem() {
            None => {
                if let Some(ep) = self.file.take() {
                    out.push(WatchEvent::FileHealed {
                        problems: ep.reported,
                        lasted: now.saturating_duration_since(ep.since),
                    });
                }
            }
            Some(problem) => {
                let name = problem.name();
                let (new_kind, episode_start) = match &mut self.file {
                    None => {
                        self.file = Some(Episode {
                            since: now,
                            reported: vec![name],
                            last: problem.clone(),
                        });
                        (true, true)
                    }
                    Some(ep) => {
                        ep.last = problem.clone();
                        let new_kind = !ep.reported.contains(&name);
                        if new_kind {
                            ep.reported.push(name);
                        }
                        (new_kind, false)
                    }
                };
                if new_kind {
                    out.push(WatchEvent::File {
                        problem,
                        using: check.in_use(),
                        episode_start,
                    });
                }
            }
        }
        out
    }

    /// Feeds how `peer`'s slot read; returns an event when an episode starts or ends.
    pub fn observe_slot(&mut self, peer: &str, health: SlotHealth, now: Instant) -> Option<WatchEvent> {
        match health {
            SlotHealth::Valid => self.slots.remove(peer).map(|(since, _)| WatchEvent::SlotHealed {
                peer: peer.to_owned(),
                lasted: now.saturating_duration_since(since),
            }),
            SlotHealth::Empty => None,
            bad => match self.slots.get_mut(peer) {
                Some((_, last)) => {
                    *last = bad;
                    None
                }
                None => {
                    self.slots.insert(peer.to_owned(), (now, bad.clone()));
                    Some(WatchEvent::SlotCorrupt {
                        peer: peer.to_owned(),
                        health: bad,
                    })
                }
            },
        }
    }

    /// The path names the file in use (no file episode open).
    pub fn file_ok(&self) -> bool {
        self.file.is_none()
    }

    /// The current file problem, if an episode is open.
    pub fn file_problem(&self) -> Option<&FileProblem> {
        self.file.as_ref().map(|e| &e.last)
    }

    /// Peers whose slot does not decode, with the last reason.
    pub fn bad_slots(&self) -> impl Iterator<Item = (&str, &SlotHealth)> {
        self.slots.iter().map(|(p, (_, h))| (p.as_str(), h))
    }

    /// Whether `peer`'s slot is in a corrupt episode.
    pub fn slot_bad(&self, peer: &str) -> bool {
        self.slots.contains_key(peer)
    }

    /// Forgets slot episodes of peers not in `peers` (bounded memory if the pool shrinks).
    pub fn retain_peers(&mut self, peers: &BTreeSet<String>) {
        self.slots.retain(|p, _| peers.contains(p));
    }
}

// ---------------------------------------------------------------------------------------------
// The I/O shell

/// `stat` of the path, as a [`PathState`]. Blocks (NFS).
pub fn probe(path: &Path) -> PathState {
    match std::fs::metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            if t.is_file() {
                PathState::File {
                    id: FileId::of(&m),
                    len: m.len(),
                }
            } else {
                PathState::NotRegular(if t.is_dir() {
                    "a directory"
                } else if t.is_fifo() {
                    "a FIFO"
                } else if t.is_socket() {
                    "a socket"
                } else if t.is_block_device() {
                    "a block device"
                } else if t.is_char_device() {
                    "a character device"
                } else {
                    "not a file"
                })
            }
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => PathState::Missing,
        Err(e) => PathState::Error(e.to_string()),
    }
}

/// One watch step: `fstat` the open file (a failing handle is dropped), `stat` the path,
/// [`decide`], and (re)open the path if told to. Returns the file to use from now on (None:
/// none usable) and what was seen, for [`Watcher::observe_file`]. Blocks: run it on a blocking
/// thread, bounded by a timeout, like every other state-file I/O.
pub fn check(
    sf: Option<Arc<StateFile>>,
    path: &Path,
    hosts: &[String],
    may_create: bool,
) -> (Option<Arc<StateFile>>, FileCheck) {
    let need = statefile::len_for(hosts.len());
    let (sf, own) = match sf {
        Some(s) => match s.metadata() {
            Ok(m) => (Some(s), Some(FileId::of(&m))),
            Err(e) => {
                tracing::debug!(error = %e, "state-file: fstat of the open file failed; reopening");
                (None, None)
            }
        },
        None => (None, None),
    };
    let state = probe(path);
    let mut out = FileCheck {
        own,
        path: state,
        need,
        opened: None,
    };
    if decide(own, &out.path, need, may_create) == Action::Keep {
        return (sf, out);
    }
    let opened = if own.is_none() && may_create {
        StateFile::open(path, hosts)
    } else {
        StateFile::open_existing(path, hosts)
    };
    match opened.and_then(|f| {
        let id = f.metadata().map_err(|source| statefile::StateFileError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok((f, FileId::of(&id)))
    }) {
        Ok((f, id)) => {
            out.opened = Some(Ok(id));
            (Some(Arc::new(f)), out)
        }
        Err(e) => {
            out.opened = Some(Err(eac_common::error_chain(&e)));
            (sf, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: FileId = FileId { dev: 1, ino: 10 };
    const B: FileId = FileId { dev: 1, ino: 11 };
    const NEED: u64 = 8192;

    fn file(id: FileId) -> PathState {
        PathState::File { id, len: NEED }
    }

    fn chk(own: Option<FileId>, path: PathState, opened: Option<Result<FileId, String>>) -> FileCheck {
        FileCheck {
            own,
            path,
            need: NEED,
            opened,
        }
    }

    /// Runs `decide` as the shell would, with `open` standing in for the open's result.
    fn step(w: &mut Watcher, own: Option<FileId>, path: PathState, now: Instant) -> (Action, Vec<WatchEvent>) {
        let a = decide(own, &path, NEED, false);
        let opened = match (a, &path) {
            (Action::Open, PathState::File { id, .. }) => Some(Ok(*id)),
            (Action::Open, _) => Some(Err("no such file".into())),
            (Action::Keep, _) => None,
        };
        (a, w.observe_file(&chk(own, path, opened), now))
    }

    #[test]
    fn decide_compares_identities() {
        assert_eq!(decide(Some(A), &file(A), NEED, false), Action::Keep);
        assert_eq!(decide(Some(A), &file(B), NEED, false), Action::Open);
        // Too small: not adopted while a file is open (a copy may be in progress) …
        let small = PathState::File { id: B, len: 0 };
        assert_eq!(decide(Some(A), &small, NEED, false), Action::Keep);
        // … but opened (and extended) when none is, as at start.
        assert_eq!(decide(None, &small, NEED, false), Action::Open);
        assert_eq!(decide(Some(A), &PathState::Missing, NEED, true), Action::Keep);
        assert_eq!(decide(None, &PathState::Missing, NEED, false), Action::Keep);
        assert_eq!(decide(None, &PathState::Missing, NEED, true), Action::Open);
        assert_eq!(
            decide(Some(A), &PathState::NotRegular("a directory"), NEED, true),
            Action::Keep
        );
        assert_eq!(
            decide(None, &PathState::NotRegular("a directory"), NEED, true),
            Action::Keep
        );
        assert_eq!(
            decide(Some(A), &PathState::Error("EIO".into()), NEED, false),
            Action::Keep
        );
    }

    #[test]
    fn a_healthy_file_reports_nothing() {
        let mut w = Watcher::new();
        let t = Instant::now();
        for i in 0..100 {
            let (a, ev) = step(&mut w, Some(A), file(A), t + Duration::from_millis(200 * i));
            assert_eq!(a, Action::Keep);
            assert!(ev.is_empty(), "{ev:?}");
        }
        assert!(w.file_ok());
    }

    #[test]
    fn delete_then_restore_is_one_missing_one_replaced_one_healed() {
        let mut w = Watcher::new();
        let t = Instant::now();
        assert!(step(&mut w, Some(A), file(A), t).1.is_empty());
        // Deleted: reported once, however long it lasts.
        let (a, ev) = step(&mut w, Some(A), PathState::Missing, t + Duration::from_millis(200));
        assert_eq!(a, Action::Keep);
        assert_eq!(
            ev,
            vec![WatchEvent::File {
                problem: FileProblem::Missing,
                using: Some(A),
                episode_start: true
            }]
        );
        assert!(ev[0].to_string().contains("is missing"), "{}", ev[0]);
        assert!(!w.file_ok());
        for i in 2..50 {
            assert!(
                step(&mut w, Some(A), PathState::Missing, t + Duration::from_millis(200 * i))
                    .1
                    .is_empty()
            );
        }
        // Restored (a new inode): reopened and healed, in that order.
        let (a, ev) = step(&mut w, Some(A), file(B), t + Duration::from_secs(10));
        assert_eq!(a, Action::Open);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0], WatchEvent::Replaced { old: A, new: B });
        assert!(
            matches!(&ev[1], WatchEvent::FileHealed { problems, lasted } if problems == &["missing"] && *lasted == Duration::from_millis(9800)),
            "{:?}",
            ev[1]
        );
        assert!(w.file_ok());
        assert!(step(&mut w, Some(B), file(B), t + Duration::from_secs(11)).1.is_empty());
    }

    #[test]
    fn the_same_file_moved_back_heals_without_a_reopen() {
        let mut w = Watcher::new();
        let t = Instant::now();
        step(&mut w, Some(A), file(A), t);
        assert_eq!(step(&mut w, Some(A), PathState::Missing, t).1.len(), 1);
        let (a, ev) = step(&mut w, Some(A), file(A), t + Duration::from_secs(1));
        assert_eq!(a, Action::Keep);
        assert!(matches!(&ev[..], [WatchEvent::FileHealed { .. }]), "{ev:?}");
    }

    #[test]
    fn each_kind_of_problem_is_reported_once_per_episode() {
        let mut w = Watcher::new();
        let t = Instant::now();
        step(&mut w, Some(A), file(A), t);
        let dir = PathState::NotRegular("a directory");
        let small = PathState::File { id: B, len: 0 };
        let seq = [
            PathState::Missing,
            dir.clone(),
            dir.clone(),
            PathState::Missing,
            small.clone(),
            small.clone(),
            PathState::Missing,
            dir.clone(),
        ];
        let mut names = Vec::new();
        let mut starts = 0;
        for p in seq {
            for e in step(&mut w, Some(A), p, t).1 {
                match e {
                    WatchEvent::File {
                        problem, episode_start, ..
                    } => {
                        names.push(problem.name());
                        starts += usize::from(episode_start);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(names, ["missing", "not a regular file", "too small"]);
        assert_eq!(starts, 1);
        assert!(matches!(w.file_problem(), Some(FileProblem::NotRegular("a directory"))));
        // The episode ends; a new one reports again.
        let ev = step(&mut w, Some(A), file(A), t).1;
        assert!(
            matches!(&ev[..], [WatchEvent::FileHealed { problems, .. }] if problems.len() == 3),
            "{ev:?}"
        );
        let ev = step(&mut w, Some(A), dir, t).1;
        assert!(
            matches!(
                &ev[..],
                [WatchEvent::File {
                    episode_start: true,
                    ..
                }]
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn an_atomic_replacement_is_a_reopen_without_an_episode() {
        let mut w = Watcher::new();
        let t = Instant::now();
        step(&mut w, Some(A), file(A), t);
        let (a, ev) = step(&mut w, Some(A), file(B), t);
        assert_eq!(a, Action::Open);
        assert_eq!(ev, vec![WatchEvent::Replaced { old: A, new: B }]);
        assert!(w.file_ok());
    }

    #[test]
    fn a_failed_reopen_keeps_the_old_file_and_is_reported() {
        let mut w = Watcher::new();
        let t = Instant::now();
        step(&mut w, Some(A), file(A), t);
        let ev = w.observe_file(&chk(Some(A), file(B), Some(Err("permission denied".into()))), t);
        assert!(
            matches!(&ev[..], [WatchEvent::File { problem: FileProblem::OpenFailed(e), using: Some(u), .. }] if e.contains("permission") && *u == A),
            "{ev:?}"
        );
        // Retried at every check; reported once; heals when it opens.
        let ev = w.observe_file(&chk(Some(A), file(B), Some(Err("permission denied".into()))), t);
        assert!(ev.is_empty());
        let ev = w.observe_file(&chk(Some(A), file(B), Some(Ok(B))), t);
        assert!(
            matches!(&ev[..], [WatchEvent::Replaced { .. }, WatchEvent::FileHealed { .. }]),
            "{ev:?}"
        );
    }

    #[test]
    fn no_file_open_at_all() {
        // Start with a directory at the path: nothing can be opened; then an admin fixes it.
        let mut w = Watcher::new();
        let t = Instant::now();
        let dir = PathState::NotRegular("a directory");
        let ev = w.observe_file(&chk(None, dir.clone(), None), t);
        assert!(
            matches!(
                &ev[..],
                [WatchEvent::File {
                    using: None,
                    episode_start: true,
                    ..
                }]
            ),
            "{ev:?}"
        );
        assert!(ev[0].to_string().contains("no state-file is open"), "{}", ev[0]);
        assert!(w.observe_file(&chk(None, dir, None), t).is_empty());
        // The first file ever opened is no replacement.
        let ev = w.observe_file(&chk(None, file(A), Some(Ok(A))), t);
        assert!(matches!(&ev[..], [WatchEvent::FileHealed { .. }]), "{ev:?}");
        // A handle dropped after an I/O error and reopened onto another inode is one.
        let ev = w.observe_file(&chk(None, file(B), Some(Ok(B))), t);
        assert_eq!(ev, vec![WatchEvent::Replaced { old: A, new: B }]);
        // No file open (dropped after an I/O error) and the path's file does not open either:
        // an I/O failure (membership reports it), neither a problem of the path nor its end.
        let ev = w.observe_file(&chk(Some(B), PathState::Missing, None), t);
        assert_eq!(ev.len(), 1);
        assert!(
            w.observe_file(&chk(None, file(B), Some(Err("EIO".into()))), t)
                .is_empty()
        );
        assert!(!w.file_ok());
        let ev = w.observe_file(&chk(None, file(B), Some(Ok(B))), t);
        assert!(matches!(&ev[..], [WatchEvent::FileHealed { .. }]), "{ev:?}");
        // A stat that fails is reported as such.
        let ev = w.observe_file(&chk(Some(B), PathState::Error("Input/output error".into()), None), t);
        assert!(
            matches!(
                &ev[..],
                [WatchEvent::File {
                    problem: FileProblem::Unreachable(_),
                    ..
                }]
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn a_corrupt_peer_slot_is_one_episode_per_peer() {
        let mut w = Watcher::new();
        let t = Instant::now();
        assert_eq!(w.observe_slot("b", SlotHealth::Valid, t), None);
        assert_eq!(w.observe_slot("b", SlotHealth::Empty, t), None);
        let ev = w.observe_slot("b", SlotHealth::Corrupt("checksum mismatch".into()), t);
        let ev = ev.expect("an event");
        assert_eq!(
            ev.to_string(),
            "corrupt slot of peer b: checksum mismatch (the slot holds bytes that do not decode, the peer is not merely silent)"
        );
        // Garbage again and again (different each time): no further event.
        for i in 0..100 {
            assert_eq!(
                w.observe_slot("b", SlotHealth::Corrupt(format!("garbage {i}")), t),
                None
            );
            assert_eq!(w.observe_slot("b", SlotHealth::Empty, t), None);
        }
        assert!(w.slot_bad("b"));
        // Another peer's episode is its own.
        assert!(matches!(
            w.observe_slot("c", SlotHealth::Unreadable("another host's record".into()), t),
            Some(WatchEvent::SlotCorrupt { ref peer, .. }) if peer == "c"
        ));
        assert_eq!(w.bad_slots().count(), 2);
        let ev = w.observe_slot("b", SlotHealth::Valid, t + Duration::from_secs(3));
        assert_eq!(
            ev,
            Some(WatchEvent::SlotHealed {
                peer: "b".into(),
                lasted: Duration::from_secs(3)
            })
        );
        assert_eq!(w.observe_slot("b", SlotHealth::Valid, t), None);
        assert!(!w.slot_bad("b"));
        // A torn slot once: one event, healed at the next valid read.
        assert!(w.observe_slot("b", SlotHealth::Corrupt("torn".into()), t).is_some());
        assert!(matches!(
            w.observe_slot("b", SlotHealth::Valid, t),
            Some(WatchEvent::SlotHealed { .. })
        ));
        w.retain_peers(&BTreeSet::from(["b".to_string()]));
        assert_eq!(w.bad_slots().count(), 0);
    }

    // -----------------------------------------------------------------------------------------
    // Against real files: the shell and the watcher as the daemon runs them.

    use crate::statefile::SlotRecord;
    use std::os::unix::fs::FileExt;

    use crate::test_util::TempDir;

    /// One host's state-file task, as the daemon runs it.
    struct Host {
        name: &'static str,
        sf: Option<Arc<StateFile>>,
        w: Watcher,
        opened_once: bool,
        tick: u64,
        /// The last valid tick read from each peer's slot.
        seen: BTreeMap<String, u64>,
    }

    impl Host {
        fn new(name: &'static str) -> Self {
            Self {
                name,
                sf: None,
                w: Watcher::new(),
                opened_once: false,
                tick: 0,
                seen: BTreeMap::new(),
            }
        }

        fn step(&mut self, path: &Path, now: Instant) -> Vec<WatchEvent> {
            let hosts = vec!["a".to_string(), "b".to_string()];
            let (sf, c) = check(self.sf.take(), path, &hosts, !self.opened_once);
            self.sf = sf;
            self.opened_once |= c.in_use().is_some();
            let mut ev = self.w.observe_file(&c, now);
            if let Some(sf) = &self.sf {
                self.tick += 1;
                sf.write_slot(&SlotRecord {
                    host: self.name.into(),
                    incarnation: 1,
                    tick: self.tick,
                    wall_ms: 0,
                    fencing: false,
                    guests: vec![],
                    guests_truncated: false,
                    config_epoch: 1,
                    sees: Vec::new(),
                })
                .unwrap();
                for r in sf.read_all().unwrap() {
                    if r.host == self.name {
                        continue;
                    }
                    if let Ok(rec) = &r.record {
                        self.seen.insert(r.host.clone(), rec.tick);
                    }
                    ev.extend(self.w.observe_slot(&r.host, SlotHealth::of(&r.record), now));
                }
            }
            ev
        }

        fn file_id(&self) -> Option<FileId> {
            self.sf.as_ref().map(|f| FileId::of(&f.metadata().unwrap()))
        }
    }

    fn path_id(p: &Path) -> FileId {
        FileId::of(&std::fs::metadata(p).unwrap())
    }

    /// Runs both hosts for `n` steps of 200 ms from `*t`; returns each host's events.
    fn run(a: &mut Host, b: &mut Host, path: &Path, t: &mut Instant, n: usize) -> (Vec<WatchEvent>, Vec<WatchEvent>) {
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        for _ in 0..n {
            *t += Duration::from_millis(200);
            ea.extend(a.step(path, *t));
            eb.extend(b.step(path, *t));
        }
        (ea, eb)
    }

    fn kinds(ev: &[WatchEvent]) -> Vec<String> {
        ev.iter()
            .map(|e| match e {
                WatchEvent::File { problem, .. } => problem.name().to_owned(),
                WatchEvent::Replaced { .. } => "replaced".into(),
                WatchEvent::FileHealed { .. } => "healed".into(),
                WatchEvent::SlotCorrupt { peer, .. } => format!("corrupt slot of peer {peer}"),
                WatchEvent::SlotHealed { peer, .. } => format!("slot of peer {peer} healed"),
            })
            .collect()
    }

    #[test]
    fn real_file_deleted_then_recreated_is_missing_then_replaced_and_healed() {
        let dir = TempDir::new("sfwatch-test");
        let path = dir.0.join("statefile");
        let (mut a, mut b) = (Host::new("a"), Host::new("b"));
        let mut t = Instant::now();
        // The first open creates the file (as at start).
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 3);
        assert!(ea.is_empty() && eb.is_empty(), "{ea:?} {eb:?}");
        let old = path_id(&path);
        assert_eq!(a.file_id(), Some(old));
        // Deleted: "missing" once on each host; both keep using the removed file, and still
        // see each other's slot advance there.
        std::fs::remove_file(&path).unwrap();
        let before = a.seen["b"];
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 10);
        assert_eq!(kinds(&ea), ["missing"]);
        assert_eq!(kinds(&eb), ["missing"]);
        assert!(
            ea[0].to_string().contains("keeps using the file it has open"),
            "{}",
            ea[0]
        );
        assert!(a.seen["b"] > before);
        assert!(!path.exists(), "a watcher must not recreate a missing state-file");
        assert_eq!(a.file_id(), Some(old));
        // Recreated by an administrator (an empty file of the right size): both reopen and
        // heal within one step, and write and read the new file.
        std::fs::File::create(&path).unwrap().set_len(2 * 4096).unwrap();
        let new = path_id(&path);
        assert_ne!(new, old);
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 1);
        assert_eq!(kinds(&ea), ["replaced", "healed"]);
        assert_eq!(kinds(&eb), ["replaced", "healed"]);
        assert_eq!(ea[0], WatchEvent::Replaced { old, new });
        assert!(ea[1].to_string().contains("was: missing"), "{}", ea[1]);
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 5);
        assert!(ea.is_empty() && eb.is_empty(), "{ea:?} {eb:?}");
        assert_eq!(a.file_id(), Some(new));
        assert_eq!(b.file_id(), Some(new));
        // A third reader of the path sees both hosts' latest writes.
        let r = StateFile::open_existing(&path, &["a".into(), "b".into()])
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(r[0].record.as_ref().unwrap().tick, a.tick);
        assert_eq!(r[1].record.as_ref().unwrap().tick, b.tick);
    }

    #[test]
    fn real_file_replaced_by_a_directory_or_an_empty_file_is_reported_and_heals() {
        let dir = TempDir::new("sfwatch-test");
        let path = dir.0.join("statefile");
        let saved = dir.0.join("statefile.saved");
        let (mut a, mut b) = (Host::new("a"), Host::new("b"));
        let mut t = Instant::now();
        run(&mut a, &mut b, &path, &mut t, 3);
        let old = path_id(&path);
        std::fs::rename(&path, &saved).unwrap();
        std::fs::create_dir(&path).unwrap();
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 5);
        assert_eq!(kinds(&ea), ["not a regular file"]);
        assert_eq!(kinds(&eb), ["not a regular file"]);
        assert!(ea[0].to_string().contains("it is a directory"), "{}", ea[0]);
        // The directory gives way to an empty file: too small, not adopted, reported once.
        std::fs::remove_dir(&path).unwrap();
        std::fs::File::create(&path).unwrap();
        let (ea, _) = run(&mut a, &mut b, &path, &mut t, 5);
        assert_eq!(kinds(&ea), ["too small"]);
        assert!(ea[0].to_string().contains("0 bytes"), "{}", ea[0]);
        assert_eq!(a.file_id(), Some(old));
        // The saved copy moved back: the very file in use, healed without a reopen.
        std::fs::rename(&saved, &path).unwrap();
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 2);
        assert_eq!(kinds(&ea), ["healed"]);
        assert_eq!(kinds(&eb), ["healed"]);
        assert!(
            ea[0].to_string().contains("missing") || ea[0].to_string().contains("not a regular file"),
            "{}",
            ea[0]
        );
        assert_eq!(a.file_id(), Some(old));
    }

    #[test]
    fn real_file_garbage_over_a_peer_slot_is_a_corrupt_slot_of_that_peer() {
        let dir = TempDir::new("sfwatch-test");
        let path = dir.0.join("statefile");
        let (mut a, mut b) = (Host::new("a"), Host::new("b"));
        let mut t = Instant::now();
        run(&mut a, &mut b, &path, &mut t, 3);
        let raw = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Garbage over b's slot (slot 1), again and again before a reads: one event.
        let mut ea = Vec::new();
        for i in 0..5u8 {
            raw.write_all_at(&[0x5a ^ i; 4096], 4096).unwrap();
            t += Duration::from_millis(200);
            ea.extend(a.step(&path, t));
        }
        assert_eq!(kinds(&ea), ["corrupt slot of peer b"]);
        assert!(ea[0].to_string().contains("checksum mismatch"), "{}", ea[0]);
        assert!(a.w.slot_bad("b"));
        // A torn slot: b's valid slot with its second half from another write.
        t += Duration::from_millis(200);
        assert!(b.step(&path, t).is_empty());
        t += Duration::from_millis(200);
        let healed = a.step(&path, t);
        assert_eq!(kinds(&healed), ["slot of peer b healed"]);
        raw.write_all_at(&[0xff; 2048], 4096 + 2048).unwrap();
        t += Duration::from_millis(200);
        let ev = a.step(&path, t);
        assert_eq!(kinds(&ev), ["corrupt slot of peer b"]);
        // b rewrites its slot: healed. a's own slot is never reported by a.
        let (ea, eb) = run(&mut a, &mut b, &path, &mut t, 2);
        assert_eq!(kinds(&ea), ["slot of peer b healed"]);
        assert!(eb.is_empty(), "{eb:?}");
        assert!(a.w.file_ok() && a.w.bad_slots().count() == 0);
    }
}
