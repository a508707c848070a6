//! Waiting on conditions instead of sleeping for guessed durations.
use std::time::{Duration, Instant};

/// How often a condition is re-checked.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}")]
pub struct Timeout {
    pub what: String,
    pub waited: Duration,
}

/// Re-checks `cond` every 20 ms until it returns true; fails after `timeout`.
/// Returns how long it took, which tests print as a measurement.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<Duration, Timeout> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(Timeout {
                what: what.to_owned(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_when_condition_holds() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(5), "three polls", || {
            n += 1;
            n >= 3
        })
        .unwrap();
        assert!(took < Duration::from_secs(5));
        assert_eq!(n, 3);
    }

    #[test]
    fn times_out_with_what_it_waited_for() {
        let e = wait_until(Duration::from_millis(50), "never", || false).unwrap_err();
        assert!(e.waited >= Duration::from_millis(50));
        assert!(e.to_string().contains("never"), "{e}");
    }
}
