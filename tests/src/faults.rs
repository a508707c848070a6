//! Faults a test injects into the lab: a link down, silent loss with carrier up, a host's
//! processes killed. (A failing backing disk is in `faulty_disk`.)

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::{Error, netns::Netns, netns::run, topology::Lab};

/// Sets `iface` in `ns` down (carrier loss on both ends of a veth).
pub fn link_down(ns: &Netns, iface: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", iface, "down"]).map(drop)
}

pub fn link_up(ns: &Netns, iface: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", iface, "up"]).map(drop)
}

/// 100 % silent loss on one interface, in both directions, while its carrier stays up
/// (an nftables netdev table with ingress and egress drop chains, added in ONE transaction
/// so both directions start dropping at the same instant — added one by one, under TCG the
/// two commands land ~0.3 s apart). The loss ends when the guard is dropped.
#[derive(Debug)]
pub struct SilentLoss {
    ns: String,
    table: String,
}

impl SilentLoss {
    pub fn on(ns: &Netns, iface: &str) -> Result<Self, Error> {
        let table = format!("eacloss_{}", iface.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let rules = format!(
            "table netdev {table} {{\n\
             chain rx {{ type filter hook ingress device \"{iface}\" priority -500; policy drop; }}\n\
             chain tx {{ type filter hook egress device \"{iface}\" priority -500; policy drop; }}\n}}\n"
        );
        let mut cmd = ns.command("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawn_err = |source| Error::Spawn {
            cmd: "nft -f -".into(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(rules.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(Error::Command {
                cmd: format!("nft -f - ({table} on {iface})"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(Self {
            ns: ns.name().to_owned(),
            table,
        })
    }
}

impl Drop for SilentLoss {
    fn drop(&mut self) {
        let r = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            "nft",
            "delete",
            "table",
            "netdev",
            &self.table,
        ]));
        if let Err(e) = r {
            eprintln!("lab: could not lift silent loss {}: {e}", self.table);
        }
    }
}

impl Lab {
    /// Silent loss on `host`'s port of the application switch (the host sees carrier up).
    pub fn silent_loss_on_switch_port(&self, host: &str) -> Result<SilentLoss, Error> {
        SilentLoss::on(&self.switch, &self.host(host).switch_port())
    }

    /// Kills every process of `host` (daemons, QEMU, …) with SIGKILL: the host "dies".
    /// Returns how many processes were killed.
    pub fn kill_host_processes(&self, host: &str) -> usize {
        self.host(host).ns.kill_all()
    }
}

/// An interface that silently drops everything it sends while its carrier stays up: a
/// `blackhole` root qdisc (frames that TC redirects onto the device are dropped too, since
/// they pass its root qdisc). Removed when the guard is dropped.
#[derive(Debug)]
pub struct Blackhole {
    ns: String,
    iface: String,
}

impl Blackhole {
    pub fn on(ns: &Netns, iface: &str) -> Result<Self, Error> {
        ns.exec("tc", &["qdisc", "add", "dev", iface, "root", "blackhole"])?;
        Ok(Self {
            ns: ns.name().to_owned(),
            iface: iface.to_owned(),
        })
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let r = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            "tc",
            "qdisc",
            "del",
            "dev",
            &self.iface,
            "root",
        ]));
        if let Err(e) = r {
            eprintln!("lab: could not remove the blackhole on {}: {e}", self.iface);
        }
    }
}
