//! Network namespaces owned by a test: created with a unique name, every process inside
//! killed and the namespace deleted on drop (also when the test panics).

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::Error;

/// A name no other test (in this or another process) uses: `eac-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "eac-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it exits non-zero. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String, Error> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and returns its output whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output, Error> {
    cmd.stdin(Stdio::null()).output().map_err(|source| Error::Spawn {
        cmd: format!("{cmd:?}"),
        source,
    })
}

/// A network namespace created by this process.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `eac-<tag>-<pid>-<n>` with its loopback up.
    pub fn create(tag: &str) -> Result<Self, Error> {
        let name = unique_name(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the handle `setns(2)` takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that will run inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command that runs in the namespace but keeps the machine's mounts (`nsenter --net`),
    /// unlike [`Netns::command`], whose `ip netns exec` remounts /sys and so hides
    /// /sys/fs/bpf. Daemons that pin BPF objects run this way.
    pub fn command_keep_mounts(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Runs `PROGRAM ARGS` inside the namespace; fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        run(self.command(program).args(args))
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Sockets, netlink handles and BPF attachments made by `f` belong to the namespace;
    /// processes `f` spawns start in it.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let file = File::open(self.path()).map_err(|source| Error::Io {
            what: format!("open {}", self.path().display()),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| Error::Io {
                    what: format!("setns {}", self.name),
                    source: source.into(),
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::enter`], but the thread keeps running: returns its handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>, Error> {
        let file = File::open(self.path()).map_err(|source| Error::Io {
            what: format!("open {}", self.path().display()),
            source,
        })?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let r = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
            let ok = r.is_ok();
            let _ = tx.send(r.map_err(|e| Error::Io {
                what: format!("setns {name}"),
                source: e.into(),
            }));
            if !ok {
                panic!("setns failed");
            }
            f()
        });
        rx.recv().map_err(|_| Error::Io {
            what: "namespace thread".into(),
            source: std::io::Error::other("exited"),
        })??;
        Ok(h)
    }

    /// Processes running in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = output(Command::new("ip").args(["netns", "pids", &self.name]));
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
    }

    /// SIGKILLs every process in the namespace and waits (up to 5 s) until none is left.
    /// Returns how many were killed.
    pub fn kill_all(&self) -> usize {
        let pids = self.pids();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = crate::wait::wait_until(std::time::Duration::from_secs(5), "namespace emptied", || {
            self.pids().is_empty()
        });
        pids.len()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("lab: could not delete namespace {}: {e}", self.name);
        }
    }
}
