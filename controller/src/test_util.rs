//! Test-only helpers shared by the crate's unit tests.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory unique to this process and call, removed (with its contents) on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// `<tmp>/eac-<tag>-<pid>-<n>`.
    pub(crate) fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// `<base>/eac-<tag>-<pid>-<n>` (a test that needs a particular filesystem).
    pub(crate) fn new_in(base: &Path, tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = base.join(format!(
            "eac-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
