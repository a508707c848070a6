//! Faults a test injects into the lab: a link down, silent loss with carrier up, a host's
//! processes killed. (A failing backing disk is in `faulty_disk`.)

use std::process::Command;

use crate::{Error, netns::Netns, netns::run, topology::Lab};

/// Sets `iface` in `ns` down (carrier loss on both ends of a veth).
pub fn link_down(ns: &Netns, iface: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", iface, "down"]).map(drop)
}

pub fn link_up(ns: &Netns, iface: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", iface, "up"]).map(drop)
}

/// 100 % silent loss on one interface, in both directions, while its carrier stays up
/// (nftables netdev ingress + egress drop). The loss ends when the guard is dropped.
#[derive(Debug)]
pub struct SilentLoss {
    ns: String,
    table: String,
}

impl SilentLoss {
    pub fn on(ns: &Netns, iface: &str) -> Result<Self, Error> {
        let table = format!("eacloss_{}", iface.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let nft = |args: &[&str]| run(ns.command("nft").args(args));
        nft(&["add", "table", "netdev", &table])?;
        let guard = Self {
            ns: ns.name().to_owned(),
            table: table.clone(),
        };
        for (chain, hook) in [("rx", "ingress"), ("tx", "egress")] {
            nft(&[
                "add",
                "chain",
                "netdev",
                &table,
                chain,
                &format!("{{ type filter hook {hook} device \"{iface}\" priority -500; policy drop; }}"),
            ])?;
        }
        Ok(guard)
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
