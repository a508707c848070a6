//! Rate limit of log lines about rejected input (bad datagrams, refused connections, bad
//! control requests), so a flood of bad input cannot flood the log.
//!
//! [`LogLimiter`] is sans-I/O: it is told the key of each rejection (typically the source
//! address) and the time, and answers whether to log a line now and how many rejections of
//! the same key it suppressed since the key's previous line. Per key:
//!
//! - the first rejection is logged at once;
//! - later ones within `every` of the key's last line are counted, not logged;
//! - the first one after that window is logged with the count of the suppressed ones;
//! - [`LogLimiter::flush`], called now and then (e.g. every `every`), reports the counts a
//!   key accumulated when no further rejection came to carry them, so a burst that stopped
//!   is still reported in full.
//!
//! Memory is bounded: keys idle for [`FORGET_AFTER_WINDOWS`] windows are forgotten, and at
//! most `cap` keys are tracked; rejections from keys beyond the cap share one bucket ("other
//! sources"), so a flood from many source addresses costs at most `cap + 1` entries and at
//! most `cap + 1` lines per window.
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The usual window: at most one line per key per 10 s.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(10);
/// The usual number of keys tracked one by one.
pub const DEFAULT_CAP: usize = 256;
/// A key without a rejection for this many windows is forgotten.
pub const FORGET_AFTER_WINDOWS: u32 = 6;

/// What a line logged now should add: the rejections suppressed since the previous line of
/// the same key (or of the shared bucket of untracked keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Rejections not logged since the previous line of this bucket.
    pub suppressed: u64,
    /// Time since that previous line (zero for the first line of a bucket).
    pub since: Duration,
    /// The rejection fell in the shared bucket of keys beyond the cap.
    pub other: bool,
}

impl Report {
    /// A note to append to the line: empty when nothing was suppressed, else e.g.
    /// `" (37 similar from 10.0.0.1 suppressed in the last 10 s)"`; `who` names the key, and
    /// is replaced by "other sources" for the shared bucket.
    pub fn note(&self, who: impl fmt::Display) -> String {
        if self.suppressed == 0 {
            return String::new();
        }
        let secs = self.since.as_secs_f64().round() as u64;
        if self.other {
            format!(
                " ({} similar from other sources suppressed in the last {secs} s)",
                self.suppressed
            )
        } else {
            format!(
                " ({} similar from {who} suppressed in the last {secs} s)",
                self.suppressed
            )
        }
    }
}

/// A count [`LogLimiter::flush`] reports: `suppressed` rejections of `key` (None: the
/// shared bucket of untracked keys) in the last `since`, not logged yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary<K> {
    /// The key, or None for the shared bucket of keys beyond the cap.
    pub key: Option<K>,
    /// Rejections not logged.
    pub suppressed: u64,
    /// Time since the bucket's previous line.
    pub since: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    logged_at: Instant,
    seen_at: Instant,
    suppressed: u64,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            logged_at: now,
            seen_at: now,
            suppressed: 0,
        }
    }

    /// A rejection in an existing bucket.
    fn hit(&mut self, now: Instant, every: Duration, other: bool) -> Option<Report> {
        self.seen_at = self.seen_at.max(now);
        let since = now.saturating_duration_since(self.logged_at);
        if since < every {
            self.suppressed += 1;
            return None;
        }
        let r = Report {
            suppressed: self.suppressed,
            since,
            other,
        };
        self.logged_at = now;
        self.suppressed = 0;
        Some(r)
    }
}

/// The rate limiter: at most one line per key per `every`, with bounded memory (see the
/// module documentation).
#[derive(Debug)]
pub struct LogLimiter<K> {
    every: Duration,
    cap: usize,
    tracked: HashMap<K, Bucket>,
    other: Option<Bucket>,
    last_sweep: Option<Instant>,
}

impl<K: Eq + Hash + Clone> Default for LogLimiter<K> {
    fn default() -> Self {
        Self::new(DEFAULT_EVERY, DEFAULT_CAP)
    }
}

impl<K: Eq + Hash + Clone> LogLimiter<K> {
    /// At most one line per key per `every`; at most `cap` keys tracked one by one.
    pub fn new(every: Duration, cap: usize) -> Self {
        LogLimiter {
            every,
            cap,
            tracked: HashMap::new(),
            other: None,
            last_sweep: None,
        }
    }

    /// The window.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// How many keys are tracked one by one (at most `cap`).
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    fn forget_after(&self) -> Duration {
        self.every * FORGET_AFTER_WINDOWS
    }

    /// A rejection from `key` at `now`: `Some` when a line should be logged now.
    pub fn check(&mut self, key: K, now: Instant) -> Option<Report> {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.every)
        {
            self.sweep(now);
        }
        let every = self.every;
        if let Some(b) = self.tracked.get_mut(&key) {
            return b.hit(now, every, false);
        }
        if self.tracked.len() < self.cap {
            self.tracked.insert(key, Bucket::new(now));
            return Some(Report {
                suppressed: 0,
                since: Duration::ZERO,
                other: false,
            });
        }
        match &mut self.other {
            Some(b) => b.hit(now, every, true),
            None => {
                self.other = Some(Bucket::new(now));
                Some(Report {
                    suppressed: 0,
                    since: Duration::ZERO,
                    other: true,
                })
            }
        }
    }

    /// The counts of buckets whose window is over and that suppressed rejections no later
    /// rejection reported; each counts as that bucket's line for the window. Also forgets
    /// idle keys. Call it about every `every`.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary<K>> {
        let every = self.every;
        let mut out = Vec::new();
        let mut due = |key: Option<&K>, b: &mut Bucket| {
            let since = now.saturating_duration_since(b.logged_at);
            if b.suppressed > 0 && since >= every {
                out.push(Summary {
                    key: key.cloned(),
                    suppressed: b.suppressed,
                    since,
                });
                b.suppressed = 0;
                b.logged_at = now;
            }
        };
        for (k, b) in self.tracked.iter_mut() {
            due(Some(k), b);
        }
        if let Some(b) = &mut self.other {
            due(None, b);
        }
        self.sweep(now);
        out
    }

    /// Forgets buckets without a rejection for [`FORGET_AFTER_WINDOWS`] windows (a count
    /// they still held is lost: [`flush`](Self::flush) reports it before that).
    fn sweep(&mut self, now: Instant) {
        let forget = self.forget_after();
        let idle = |b: &Bucket| now.saturating_duration_since(b.seen_at) >= forget;
        self.tracked.retain(|_, b| !idle(b));
        if self.other.as_ref().is_some_and(idle) {
            self.other = None;
        }
        self.last_sweep = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn report(suppressed: u64, since: Duration) -> Option<Report> {
        Some(Report {
            suppressed,
            since,
            other: false,
        })
    }

    #[test]
    fn first_is_logged_then_one_line_per_window_with_the_count() {
        let mut l = LogLimiter::new(10 * S, 8);
        let t0 = Instant::now();
        assert_eq!(l.check("a", t0), report(0, Duration::ZERO));
        for i in 1..=37 {
            assert_eq!(l.check("a", t0 + Duration::from_millis(i * 100)), None);
        }
        // Another key has its own window.
        assert_eq!(l.check("b", t0 + S), report(0, Duration::ZERO));
        assert_eq!(l.check("a", t0 + 10 * S), report(37, 10 * S));
        // The window restarts at the line just logged.
        assert_eq!(l.check("a", t0 + 15 * S), None);
        assert_eq!(l.check("a", t0 + 21 * S), report(1, 11 * S));
        assert_eq!(l.check("a", t0 + 40 * S), report(0, 19 * S));
    }

    #[test]
    fn flush_reports_a_burst_that_stopped_once() {
        let mut l = LogLimiter::new(10 * S, 8);
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_some());
        for _ in 0..499 {
            assert_eq!(l.check("a", t0 + S), None);
        }
        assert!(l.check("b", t0).is_some());
        // Window not over yet: nothing to report.
        assert_eq!(l.flush(t0 + 5 * S), vec![]);
        assert_eq!(
            l.flush(t0 + 10 * S),
            vec![Summary {
                key: Some("a"),
                suppressed: 499,
                since: 10 * S
            }]
        );
        assert_eq!(l.flush(t0 + 20 * S), vec![]);
        // The flushed line counts as the window's line.
        assert_eq!(l.check("a", t0 + 15 * S), None);
        assert_eq!(l.check("a", t0 + 20 * S), report(1, 10 * S));
    }

    #[test]
    fn keys_beyond_the_cap_share_one_bucket() {
        let mut l = LogLimiter::new(10 * S, 4);
        let t0 = Instant::now();
        for k in 0..4u32 {
            assert_eq!(l.check(k, t0), report(0, Duration::ZERO));
        }
        let other = |suppressed, since| {
            Some(Report {
                suppressed,
                since,
                other: true,
            })
        };
        assert_eq!(l.check(4, t0), other(0, Duration::ZERO));
        for k in 5..10_000u32 {
            assert_eq!(l.check(k, t0 + S), None);
        }
        assert_eq!(l.tracked(), 4);
        // Tracked keys keep their own windows.
        assert_eq!(l.check(0, t0 + S), None);
        assert_eq!(l.check(123_456, t0 + 10 * S), other(9_995, 10 * S));
        assert_eq!(
            l.flush(t0 + 10 * S),
            vec![Summary {
                key: Some(0),
                suppressed: 1,
                since: 10 * S
            }]
        );
    }

    #[test]
    fn idle_keys_are_forgotten_and_make_room() {
        let mut l = LogLimiter::new(10 * S, 2);
        let t0 = Instant::now();
        assert!(l.check(1u8, t0).is_some());
        assert!(l.check(2u8, t0).is_some());
        assert!(l.check(3u8, t0).unwrap().other);
        // Key 2 stays busy; key 1 and the shared bucket go idle.
        for i in 1..=7 {
            l.check(2u8, t0 + i * 10 * S);
        }
        let later = t0 + 70 * S;
        let r = l.check(3u8, later).unwrap();
        assert!(!r.other, "key 1 was forgotten, so key 3 gets its own bucket");
        assert_eq!(l.tracked(), 2);
        // A forgotten key starts afresh.
        assert_eq!(l.check(1u8, later).map(|r| r.other), Some(true));
        assert!(l.flush(t0 + 1000 * S).is_empty());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_log() {
        let mut l = LogLimiter::new(10 * S, 2);
        let t0 = Instant::now() + 100 * S;
        assert!(l.check("a", t0).is_some());
        assert_eq!(l.check("a", t0 - 50 * S), None);
        assert!(l.flush(t0 - 60 * S).is_empty());
        assert_eq!(l.check("a", t0 + 10 * S), report(1, 10 * S));
    }

    #[test]
    fn the_note_names_the_source_and_the_count() {
        let r = Report {
            suppressed: 37,
            since: Duration::from_millis(10_400),
            other: false,
        };
        assert_eq!(
            r.note("10.0.0.1"),
            " (37 similar from 10.0.0.1 suppressed in the last 10 s)"
        );
        let o = Report { other: true, ..r };
        assert_eq!(
            o.note("10.0.0.1"),
            " (37 similar from other sources suppressed in the last 10 s)"
        );
        assert_eq!(Report { suppressed: 0, ..r }.note("x"), "");
    }
}
