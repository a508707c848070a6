//! Overlapping writes in flight, serialized.
//!
//! A guest may issue two writes to the same block without waiting for the first (legal: the
//! result is either one). A mirror must still end with *the same* one on both copies, but
//! the two copies apply concurrent requests in their own order (the local write and the
//! replica's write each go through a thread pool), so without care the primary keeps the
//! second write and the replica the first — both acknowledged, both sides "in sync", the
//! copies different. Like DRBD (which waits for conflicting requests before submitting a
//! write), a modification waits here until no earlier modification that overlaps it is in
//! flight; non-overlapping writes are not slowed down.
//!
//! The in-flight ranges are kept disjoint (a range is only admitted when it overlaps none),
//! so one look at the range starting last before the new range's end answers "does it
//! overlap anything". (No crate offers an async interval lock; this is ~80 lines.)
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The set of byte ranges being modified now.
#[derive(Default)]
pub(crate) struct InFlight {
    ranges: Mutex<BTreeMap<u64, Entry>>,
}

struct Entry {
    end: u64,
    waiters: Vec<oneshot::Sender<()>>,
}

/// Holds a range; releasing it (drop) wakes the modifications waiting for it.
pub(crate) struct RangeGuard {
    owner: Arc<InFlight>,
    start: u64,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `[offset, offset + len)` overlaps no range in flight, then holds it.
    /// An empty range is treated as one byte long.
    pub(crate) async fn acquire(self: &Arc<Self>, offset: u64, len: u64) -> RangeGuard {
        let end = offset.saturating_add(len.max(1));
        loop {
            let wait = {
                let mut r = self.lock();
                match r.range_mut(..end).next_back() {
                    Some((_, e)) if e.end > offset => {
                        let (tx, rx) = oneshot::channel();
                        e.waiters.push(tx);
                        rx
                    }
                    _ => {
                        r.insert(
                            offset,
                            Entry {
                                end,
                                waiters: Vec::new(),
                            },
                        );
                        return RangeGuard {
                            owner: self.clone(),
                            start: offset,
                        };
                    }
                }
            };
            let _ = wait.await;
        }
    }

    /// Ranges in flight now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let entry = self.owner.lock().remove(&self.start);
        if let Some(e) = entry {
            for w in e.waiters {
                let _ = w.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admitted(f: &mut (impl std::future::Future + Unpin)) -> bool {
        let w = futures_noop_waker();
        let mut cx = std::task::Context::from_waker(&w);
        std::pin::Pin::new(f).poll(&mut cx).is_ready()
    }

    fn futures_noop_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let f = Arc::new(InFlight::default());
        let a = f.acquire(4096, 4096).await;
        // Disjoint neighbours on both sides are admitted at once.
        let _left = f.acquire(0, 4096).await;
        let _right = f.acquire(8192, 4096).await;
        // Overlaps (inside, straddling either edge, covering) wait.
        for (o, l) in [(4096, 4096), (6000, 10), (2048, 4096), (6144, 4096), (0, 1 << 20)] {
            let mut w = Box::pin(f.acquire(o, l));
            assert!(!admitted(&mut w), "{o}+{l} was admitted while 4096+4096 is in flight");
        }
        assert_eq!(f.len(), 3);
        drop(a);
        assert_eq!(f.len(), 2);
        let _again = f.acquire(4096, 4096).await;
    }

    #[tokio::test]
    async fn a_waiter_runs_after_the_holder_releases() {
        let f = Arc::new(InFlight::default());
        let g = f.acquire(0, 8192).await;
        let f2 = f.clone();
        let t = tokio::spawn(async move {
            let _g = f2.acquire(4096, 4096).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap();
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_nothing_behind() {
        let f = Arc::new(InFlight::default());
        let g = f.acquire(0, 4096).await;
        {
            let mut w = Box::pin(f.acquire(0, 4096));
            assert!(!admitted(&mut w));
        }
        drop(g);
        assert_eq!(f.len(), 0);
        let _g = f.acquire(0, 4096).await;
        // Zero-length ranges still order against a write at the same offset.
        let mut z = Box::pin(f.acquire(0, 0));
        assert!(!admitted(&mut z));
    }
}
