//! `eac host check`: is this host able to run the stack? Each check says what it looked at,
//! what it found and, when it fails, what to do.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// Which levels need it.
    pub needed_for: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<&'static str>,
}

/// Where the checks look; tests point these at fixtures.
pub struct Probe<'a> {
    pub root: &'a Path,
    pub libvirt_socket: &'a Path,
    pub euid_is_root: bool,
}

pub fn run(p: &Probe<'_>) -> Vec<Check> {
    let at = |rel: &str| p.root.join(rel.trim_start_matches('/'));
    let mounts = std::fs::read_to_string(at("/proc/mounts")).unwrap_or_default();
    let bpffs = mounts.lines().any(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "bpf" && f[1] == "/sys/fs/bpf"
    });
    let uring_disabled = std::fs::read_to_string(at("/proc/sys/kernel/io_uring_disabled"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned());
    vec![
        Check {
            name: "root",
            needed_for: "all",
            ok: p.euid_is_root,
            detail: if p.euid_is_root {
                "running as root".into()
            } else {
                "not root".into()
            },
            fix: (!p.euid_is_root).then_some("run as root: the stack loads BPF programs and creates block devices"),
        },
        Check {
            name: "bpffs",
            needed_for: "level 2 (netpair)",
            ok: bpffs,
            detail: if bpffs {
                "/sys/fs/bpf is a bpf filesystem".into()
            } else {
                "/sys/fs/bpf is not mounted".into()
            },
            fix: (!bpffs).then_some("mount -t bpf bpf /sys/fs/bpf"),
        },
        exists(
            "btf",
            "level 2 (netpair)",
            &at("/sys/kernel/btf/vmlinux"),
            "kernel BTF at /sys/kernel/btf/vmlinux",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ),
        Check {
            name: "io_uring",
            needed_for: "level 2 (ublk-mirror)",
            ok: uring_disabled == "0",
            detail: format!("kernel.io_uring_disabled = {uring_disabled}"),
            fix: (uring_disabled != "0").then_some("sysctl kernel.io_uring_disabled=0"),
        },
        exists(
            "ublk",
            "level 2 (ublk-mirror)",
            &at("/dev/ublk-control"),
            "/dev/ublk-control (ublk_drv loaded)",
            "modprobe ublk_drv (kernel >= 6.0 with CONFIG_BLK_DEV_UBLK)",
        ),
        libvirt(p.libvirt_socket),
    ]
}

fn libvirt(socket: &Path) -> Check {
    let r = std::os::unix::net::UnixStream::connect(socket);
    Check {
        name: "libvirt",
        needed_for: "levels 1 and 2",
        ok: r.is_ok(),
        fix: r.is_err().then_some("start libvirtd, or pass --libvirt-socket PATH"),
        detail: match r {
            Ok(_) => format!("libvirtd answers on {}", socket.display()),
            Err(e) => format!("cannot connect to libvirtd at {}: {e}", socket.display()),
        },
    }
}

fn exists(name: &'static str, needed_for: &'static str, path: &Path, what: &str, fix: &'static str) -> Check {
    let ok = path.exists();
    Check {
        name,
        needed_for,
        ok,
        detail: if ok {
            format!("found {what}")
        } else {
            format!("missing {what}")
        },
        fix: (!ok).then_some(fix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(files: &[(&str, &str)]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("eac-check-{}-{}", std::process::id(), files.len()));
        let _ = std::fs::remove_dir_all(&root);
        for (rel, content) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        root
    }

    #[test]
    fn a_bare_host_fails_every_check_with_a_fix() {
        let root = fixture(&[("proc/mounts", "proc /proc proc rw 0 0\n")]);
        let checks = run(&Probe {
            root: &root,
            libvirt_socket: &root.join("nope"),
            euid_is_root: false,
        });
        assert!(
            checks
                .iter()
                .filter(|c| c.name != "io_uring")
                .all(|c| !c.ok && c.fix.is_some()),
            "{checks:#?}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_ready_host_passes() {
        let root = fixture(&[
            ("proc/mounts", "bpf /sys/fs/bpf bpf rw 0 0\n"),
            ("proc/sys/kernel/io_uring_disabled", "0\n"),
            ("sys/kernel/btf/vmlinux", ""),
            ("dev/ublk-control", ""),
        ]);
        let sock = root.join("libvirt-sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let checks = run(&Probe {
            root: &root,
            libvirt_socket: &sock,
            euid_is_root: true,
        });
        assert!(checks.iter().all(|c| c.ok && c.fix.is_none()), "{checks:#?}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
