//! The lab: reusable test infrastructure that makes every part of the stack testable on one
//! machine against the real kernel, a real libvirtd per host and a real ublk-capable kernel.
//!
//! - [`netns`]: network namespaces, entering one from a thread, running commands in one.
//! - [`topology`]: a two-host lab (management, app NIC on a switch, AL1/AL2, clients).
//! - [`controller`]: the two-host controller lab (libvirtd + controller per host, shared storage, `eac`).
//! - [`faults`]: link down, silent loss with carrier up, killing a host's processes.
//! - [`faulty_disk`]: a backing disk (FUSE) that starts failing I/O on command.
//! - [`libvirt`]: a real libvirtd per lab host and small TCG guests.
//! - [`mirror`]: ublk-mirror daemons in lab hosts, a qemu-io write workload, copy checks.
//! - [`ublk_guest`]: the QEMU guest booting Debian's 6.12 kernel (ublk_drv).
//! - [`wait`]: `wait_until(timeout, condition)` instead of sleeps.
//!
//! Privileged tests call [`require_root`] first: without root they fail with the reason
//! (scripts/test.sh only runs them as root; plain `cargo test` leaves them ignored).

pub mod controller;
pub mod faults;
pub mod faulty_disk;
pub mod libvirt;
pub mod mirror;
pub mod netns;
pub mod netpair_daemon;
pub mod topology;
pub mod traffic;
pub mod ublk_guest;
pub mod wait;

pub use topology::Lab;
pub use wait::wait_until;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{cmd} exited with {status}: {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Timeout(#[from] wait::Timeout),
}

/// Panics with a clear reason unless the test runs as root (needed for namespaces, BPF,
/// libvirtd, FUSE).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this privileged test needs root (namespaces, BPF, libvirtd); run it through scripts/test.sh as root"
    );
}

/// Absolute path of a binary of this workspace in the same target profile as the running
/// test (`target/debug/<name>`); panics with a hint when it has not been built.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    // A test executable lives in target/<profile>/deps/, a binary in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable directory").to_owned();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A directory for pinned BPF objects, `/sys/fs/bpf/eac/<name>`, removed on drop.
#[derive(Debug)]
pub struct BpfPinDir(std::path::PathBuf);

impl BpfPinDir {
    pub fn new(name: &str) -> Self {
        Self(std::path::Path::new("/sys/fs/bpf/eac").join(name))
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for BpfPinDir {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("lab: could not remove {}: {e}", self.0.display());
        }
    }
}
