//! Stalls of the daemon's own loop: intervals in which it was not running (not scheduled
//! under load, stopped, a slow host) and so neither sent probes nor read replies.
//!
//! Pure logic over explicit times (milliseconds on a monotonic clock). The loop wakes at
//! least every `interval` ms (its probe timer); the daemon tells [`StallClock`] when it goes
//! to sleep and when it wakes. A wake-up more than `interval + slack` ms after the loop went
//! to sleep is a stall, from the moment the loop should have woken (`interval` after it
//! slept) to the moment it did.
//!
//! A stall is no evidence of anything *we* produce the input for: our probes were not sent,
//! so their replies are missing for reasons of our own. [`crate::decide::Judge`] does not
//! count stalled time towards `probe_loss`. Arrivals from the partner are different: the
//! kernel queues them while we are stalled, and the daemon reads everything queued before
//! it judges, so silence of the partner during our stall is real silence.

/// One stall: the loop should have run at `from_ms` and ran again at `to_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Stall {
    pub fn len_ms(&self) -> u64 {
        self.to_ms.saturating_sub(self.from_ms)
    }

    /// How much of this stall lies inside `[since_ms, now_ms]`.
    pub fn overlap_ms(&self, since_ms: u64, now_ms: u64) -> u64 {
        now_ms.min(self.to_ms).saturating_sub(since_ms.max(self.from_ms))
    }
}

/// Counts and detects stalls; `status` shows its figures.
#[derive(Debug)]
pub struct StallClock {
    interval_ms: u64,
    slack_ms: u64,
    asleep_since_ms: Option<u64>,
    count: u64,
    longest_ms: u64,
    last: Option<Stall>,
}

/// What `status` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StallStatus {
    /// Wake-ups later than the loop's interval plus the slack, since start.
    pub count: u64,
    pub longest_ms: u64,
    pub last_ms: Option<u64>,
    pub last_ended_ms_ago: Option<u64>,
}

impl StallClock {
    /// `interval_ms`: the loop wakes at least this often; `slack_ms`: lateness tolerated
    /// before a wake-up counts as a stall.
    pub fn new(interval_ms: u64, slack_ms: u64) -> Self {
        Self {
            interval_ms,
            slack_ms,
            asleep_since_ms: None,
            count: 0,
            longest_ms: 0,
            last: None,
        }
    }

    /// The loop finished its work at `now_ms` and waits for the next event.
    pub fn asleep(&mut self, now_ms: u64) {
        self.asleep_since_ms = Some(now_ms);
    }

    /// The loop woke at `now_ms`; the stall if it woke late.
    pub fn woke(&mut self, now_ms: u64) -> Option<Stall> {
        let slept = self.asleep_since_ms.take()?;
        if now_ms.saturating_sub(slept) <= self.interval_ms + self.slack_ms {
            return None;
        }
        let s = Stall {
            from_ms: slept + self.interval_ms,
            to_ms: now_ms,
        };
        self.count += 1;
        self.longest_ms = self.longest_ms.max(s.len_ms());
        self.last = Some(s);
        Some(s)
    }

    pub fn status(&self, now_ms: u64) -> StallStatus {
        StallStatus {
            count: self.count,
            longest_ms: self.longest_ms,
            last_ms: self.last.map(|s| s.len_ms()),
            last_ended_ms_ago: self.last.map(|s| now_ms.saturating_sub(s.to_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wake_up_later_than_interval_plus_slack_is_a_stall() {
        let mut c = StallClock::new(10, 10);
        assert_eq!(c.woke(5), None, "never slept: nothing to compare with");
        c.asleep(100);
        assert_eq!(c.woke(120), None, "20 ms: within interval + slack");
        c.asleep(120);
        assert_eq!(
            c.woke(341),
            Some(Stall {
                from_ms: 130,
                to_ms: 341
            })
        );
        assert_eq!(c.woke(400), None, "woke without sleeping in between");
        c.asleep(341);
        assert_eq!(c.woke(372).map(|s| s.len_ms()), Some(21));
        let st = c.status(400);
        assert_eq!(
            (st.count, st.longest_ms, st.last_ms, st.last_ended_ms_ago),
            (2, 211, Some(21), Some(28))
        );
    }

    #[test]
    fn overlap_is_the_part_of_the_stall_inside_the_window() {
        let s = Stall {
            from_ms: 100,
            to_ms: 300,
        };
        assert_eq!(s.overlap_ms(0, 1000), 200);
        assert_eq!(s.overlap_ms(150, 1000), 150);
        assert_eq!(s.overlap_ms(0, 200), 100);
        assert_eq!(s.overlap_ms(300, 400), 0);
        assert_eq!(s.overlap_ms(0, 50), 0);
    }
}
