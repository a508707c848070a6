//! Flap damping of our application path: an exponential hold-down, like routing protocols'
//! route-flap damping (RFC 2439), in milliseconds instead of minutes.
//!
//! Pure logic over explicit times (milliseconds on a monotonic clock), so every timeline is
//! a unit test. The [`crate::decide::Judge`] tells it each failure of our path; the daemon
//! reports the events it returns.
//!
//! - Every failure of the path adds `penalty` to a figure of merit that halves every
//!   `half_life` ms.
//! - When the figure exceeds `suppress` the path is **suppressed**: it is not trusted again
//!   (traffic steered away does not come back on it) until the figure has decayed below
//!   `reuse`. Failures while suppressed keep adding penalty.
//! - The figure never exceeds `reuse × 2^(max_suppress / half_life)`, so a path is never
//!   suppressed longer than `max_suppress` ms after its last failure.
//! - Damping only ever delays the *return* to a path: moving away from a failing path is
//!   never delayed, and a single failure (one `penalty`, below `suppress`) is not damped at
//!   all.

use serde::Deserialize;

/// Flap damping parameters (`[damping]` in the configuration file).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DampingConfig {
    /// Added per failure of the path.
    pub penalty: u32,
    /// Above this the path is suppressed.
    pub suppress: u32,
    /// A suppressed path is trusted again once the penalty has decayed below this.
    pub reuse: u32,
    /// The penalty halves every this many ms.
    pub half_life: u64,
    /// At most this long suppressed after the last failure (caps the penalty), ms.
    pub max_suppress: u64,
}

impl Default for DampingConfig {
    fn default() -> Self {
        Self {
            penalty: 1000,
            suppress: 1500,
            reuse: 750,
            half_life: 15_000,
            max_suppress: 60_000,
        }
    }
}

impl DampingConfig {
    /// Checks the ranges; Err says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.penalty == 0 {
            return Err("damping: penalty must be > 0".into());
        }
        if self.reuse == 0 || self.reuse >= self.suppress {
            return Err(format!(
                "damping: reuse ({}) must be > 0 and below suppress ({})",
                self.reuse, self.suppress
            ));
        }
        if !(1_000..=3_600_000).contains(&self.half_life) {
            return Err(format!(
                "damping: half_life ({} ms) must be between 1000 and 3600000 ms",
                self.half_life
            ));
        }
        if self.max_suppress > 4 * 3_600_000 {
            return Err(format!(
                "damping: max_suppress ({} ms) must be at most 4 hours",
                self.max_suppress
            ));
        }
        if self.ceiling() <= f64::from(self.suppress) {
            return Err(format!(
                "damping: max_suppress ({} ms) is too short to ever suppress: the penalty is capped at reuse × 2^(max_suppress / half_life) = {:.0}, which must exceed suppress ({})",
                self.max_suppress,
                self.ceiling(),
                self.suppress
            ));
        }
        Ok(())
    }

    /// The highest penalty: decays to `reuse` in exactly `max_suppress` ms.
    fn ceiling(&self) -> f64 {
        f64::from(self.reuse) * (self.max_suppress as f64 / self.half_life as f64).exp2()
    }
}

/// A change of the path's damping state, to report.
#[derive(Clone, Debug, PartialEq)]
pub enum DampEvent {
    /// The penalty rose above `suppress`: the path is not trusted until `until_ms`
    /// (if it does not fail again).
    Suppressed { penalty: f64, until_ms: u64 },
    /// The penalty decayed to `reuse`: the path is trusted again.
    Reused { penalty: f64, suppressed_for_ms: u64 },
}

/// What `status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DampStatus {
    /// Current (decayed) penalty, rounded.
    pub penalty: u64,
    pub suppressed: bool,
    /// When suppressed: ms from now until the path is trusted again if it does not fail again.
    pub suppressed_for_ms_more: Option<u64>,
    pub failures: u64,
    pub suppress: u32,
    pub reuse: u32,
}

#[derive(Debug)]
pub struct Damping {
    cfg: DampingConfig,
    /// Penalty as of `at_ms`.
    penalty: f64,
    at_ms: u64,
    /// Since when the path is suppressed.
    suppressed_since: Option<u64>,
    failures: u64,
}

impl Damping {
    pub fn new(cfg: DampingConfig) -> Self {
        Self {
            cfg,
            penalty: 0.0,
            at_ms: 0,
            suppressed_since: None,
            failures: 0,
        }
    }

    /// The penalty decayed to `now_ms`.
    pub fn penalty(&self, now_ms: u64) -> f64 {
        let dt = now_ms.saturating_sub(self.at_ms) as f64;
        self.penalty * (-dt / self.cfg.half_life as f64).exp2()
    }

    pub fn suppressed(&self) -> bool {
        self.suppressed_since.is_some()
    }

    /// When the penalty, without further failures, falls to `reuse`.
    fn reuse_at(&self, now_ms: u64) -> u64 {
        let p = self.penalty(now_ms);
        let reuse = f64::from(self.cfg.reuse);
        if p <= reuse {
            return now_ms;
        }
        now_ms + ((p / reuse).log2() * self.cfg.half_life as f64).ceil() as u64
    }

    /// The path failed at `now_ms`. Returns `Suppressed` when this failure crossed the
    /// suppress threshold.
    pub fn failure(&mut self, now_ms: u64) -> Option<DampEvent> {
        // Time never runs backwards for the penalty.
        let now_ms = now_ms.max(self.at_ms);
        let p = (self.penalty(now_ms) + f64::from(self.cfg.penalty)).min(self.cfg.ceiling());
        self.penalty = p;
        self.at_ms = now_ms;
        self.failures += 1;
        if self.suppressed_since.is_none() && p > f64::from(self.cfg.suppress) {
            self.suppressed_since = Some(now_ms);
            return Some(DampEvent::Suppressed {
                penalty: p,
                until_ms: self.reuse_at(now_ms),
            });
        }
        None
    }

    /// Time passes: returns `Reused` when the penalty has decayed to `reuse`.
    pub fn poll(&mut self, now_ms: u64) -> Option<DampEvent> {
        let since = self.suppressed_since?;
        let p = self.penalty(now_ms);
        // At `reuse` (not only below): the capped penalty reaches it exactly at max_suppress.
        if p <= f64::from(self.cfg.reuse) + 1e-6 {
            self.suppressed_since = None;
            return Some(DampEvent::Reused {
                penalty: p,
                suppressed_for_ms: now_ms.saturating_sub(since),
            });
        }
        None
    }

    pub fn status(&self, now_ms: u64) -> DampStatus {
        DampStatus {
            penalty: self.penalty(now_ms).round() as u64,
            suppressed: self.suppressed(),
            suppressed_for_ms_more: self.suppressed().then(|| self.reuse_at(now_ms).saturating_sub(now_ms)),
            failures: self.failures,
            suppress: self.cfg.suppress,
            reuse: self.cfg.reuse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Damping {
        Damping::new(DampingConfig::default())
    }

    #[test]
    fn the_defaults_are_valid() {
        DampingConfig::default().validate().unwrap();
    }

    #[test]
    fn a_single_failure_is_not_damped() {
        let mut d = d();
        assert_eq!(d.failure(1000), None);
        assert!(!d.suppressed());
        assert_eq!(d.penalty(1000).round(), 1000.0);
        assert_eq!(d.poll(1001), None);
        assert_eq!(d.status(1000).penalty, 1000);
    }

    #[test]
    fn the_penalty_halves_every_half_life() {
        let mut d = d();
        d.failure(0);
        assert!((d.penalty(15_000) - 500.0).abs() < 1e-6);
        assert!((d.penalty(30_000) - 250.0).abs() < 1e-6);
        // Two clean failures a minute apart: 1000/16 + 1000 — not suppressed.
        assert_eq!(d.failure(60_000), None);
        assert!(!d.suppressed());
    }

    #[test]
    fn a_second_failure_soon_after_suppresses_until_the_penalty_decays_below_reuse() {
        let mut d = d();
        assert_eq!(d.failure(0), None);
        let Some(DampEvent::Suppressed { penalty, until_ms }) = d.failure(2_000) else {
            panic!("not suppressed")
        };
        // 1000 · 2^(−2/15) + 1000 ≈ 1912; reuse 750 reached log2(1912/750) · 15 s ≈ 20.2 s later.
        assert!((1911.0..1913.0).contains(&penalty), "{penalty}");
        assert!((22_000..22_400).contains(&until_ms), "{until_ms}");
        assert!(d.suppressed());
        assert_eq!(d.status(2_000).suppressed_for_ms_more, Some(until_ms - 2_000));
        assert_eq!(d.poll(until_ms - 1), None);
        assert!(d.suppressed());
        match d.poll(until_ms) {
            Some(DampEvent::Reused {
                penalty,
                suppressed_for_ms,
            }) => {
                assert!(penalty <= 750.0 + 1e-6);
                assert_eq!(suppressed_for_ms, until_ms - 2_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(!d.suppressed());
        assert_eq!(d.poll(until_ms + 1), None, "reported once");
    }

    #[test]
    fn failures_while_suppressed_extend_it_but_report_nothing_new() {
        let mut d = d();
        d.failure(0);
        assert!(d.failure(2_000).is_some());
        for t in (4_000..=16_000).step_by(2_000) {
            assert_eq!(d.failure(t), None, "t={t}");
            assert!(d.suppressed());
        }
        assert_eq!(d.failures, 9);
        // Still suppressed well after the flapping stopped.
        assert_eq!(d.poll(40_000), None);
        assert!(d.suppressed());
    }

    #[test]
    fn suppression_lasts_at_most_max_suppress_after_the_last_failure() {
        let mut d = d();
        // Flapping for ten minutes, a failure every second: the penalty hits its ceiling.
        for t in (0..=600_000).step_by(1_000) {
            d.failure(t);
        }
        assert!((d.penalty(600_000) - 12_000.0).abs() < 1e-6, "{}", d.penalty(600_000));
        assert_eq!(d.poll(659_999), None);
        assert!(matches!(d.poll(660_000), Some(DampEvent::Reused { .. })));
    }

    #[test]
    fn time_running_backwards_does_not_inflate_the_penalty() {
        let mut d = d();
        d.failure(10_000);
        d.failure(9_000);
        assert!(d.penalty(10_000) <= 2000.0 + 1e-6);
        assert_eq!(d.penalty(5_000), d.penalty(10_000), "before the last failure: as at it");
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let ok = DampingConfig::default();
        let cases = [
            (DampingConfig { penalty: 0, ..ok }, "penalty must be > 0"),
            (DampingConfig { reuse: 1500, ..ok }, "below suppress"),
            (DampingConfig { reuse: 0, ..ok }, "must be > 0"),
            (DampingConfig { half_life: 10, ..ok }, "half_life (10 ms)"),
            (
                DampingConfig {
                    max_suppress: 5_000,
                    ..ok
                },
                "too short to ever suppress",
            ),
            (
                DampingConfig {
                    max_suppress: 5 * 3_600_000,
                    ..ok
                },
                "at most 4 hours",
            ),
        ];
        for (c, want) in cases {
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
    }
}
