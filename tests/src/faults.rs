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

/// 100 % silent loss on one interface, in both directions, while its carrier stays up.
///
/// - What the interface sends: a `blackhole` root qdisc. Every frame that leaves through
///   the device passes its root qdisc, frames that TC *redirects* onto it included. (An
///   nftables netdev egress chain does not see those: a redirect from TC ingress skips the
///   egress netfilter hook, so a fault built that way on a redirect target was no fault.)
/// - What it receives: an nftables netdev ingress drop chain. It runs after TC ingress, so
///   it is meant for a device with no TC program of its own that redirects (a switch port,
///   a client's NIC); to kill a link whose ends run netpair's programs, put a [`Blackhole`]
///   on both ends.
///
/// `lab_net::silent_loss_drops_frames_netpair_redirects` proves both with netpair's own
/// redirect. The two parts are started concurrently (two processes, not one transaction:
/// this kernel has no TC drop action to do both in one `tc -batch`); `on` returns when both
/// are in place. The loss ends when the guard is dropped.
#[derive(Debug)]
pub struct SilentLoss {
    ns: String,
    iface: String,
    table: String,
    sent: bool,
    received: bool,
}

impl SilentLoss {
    pub fn on(ns: &Netns, iface: &str) -> Result<Self, Error> {
        Self::only(ns, iface, true, true)
    }

    /// Loss in one direction: what `iface` sends (`sent`) and/or what it receives.
    pub fn only(ns: &Netns, iface: &str, sent: bool, received: bool) -> Result<Self, Error> {
        let table = format!("eacloss_{}", iface.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let rules = format!(
            "table netdev {table} {{\n\
             chain rx {{ type filter hook ingress device \"{iface}\" priority -500; policy drop; }}\n}}\n"
        );
        let spawn_err = |cmd: &str| {
            let cmd = cmd.to_owned();
            move |source| Error::Spawn { cmd, source }
        };
        let mut tc = ns.command("tc");
        tc.args(["qdisc", "add", "dev", iface, "root", "blackhole"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut nft = ns.command("nft");
        nft.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A part not asked for is `true` (exits 0 at once).
        let mut skip = ns.command("true");
        skip.stdout(Stdio::null()).stderr(Stdio::piped());
        let tc = if sent { tc.spawn() } else { skip.spawn() }.map_err(spawn_err("tc qdisc add … blackhole"))?;
        let mut nft = if received { nft.spawn() } else { skip.spawn() }.map_err(spawn_err("nft -f -"))?;
        if let Some(mut stdin) = nft.stdin.take() {
            stdin.write_all(rules.as_bytes()).map_err(spawn_err("nft -f -"))?;
        }
        let tc_out = tc.wait_with_output().map_err(spawn_err("tc qdisc add … blackhole"))?;
        let nft_out = nft.wait_with_output().map_err(spawn_err("nft -f -"))?;
        // The guard exists from here on, so a half-applied fault is removed on error.
        let guard = Self {
            ns: ns.name().to_owned(),
            iface: iface.to_owned(),
            table,
            sent,
            received,
        };
        for (what, out) in [
            ("tc qdisc add … root blackhole", &tc_out),
            ("nft -f - (ingress drop)", &nft_out),
        ] {
            if !out.status.success() {
                return Err(Error::Command {
                    cmd: format!("{what} on {iface}"),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        Ok(guard)
    }
}

impl Drop for SilentLoss {
    fn drop(&mut self) {
        let ns = self.ns.as_str();
        let table = self.received.then(|| {
            run(Command::new("ip").args(["netns", "exec", ns, "nft", "delete", "table", "netdev", &self.table]))
        });
        let qdisc = self.sent.then(|| {
            run(Command::new("ip").args(["netns", "exec", ns, "tc", "qdisc", "del", "dev", &self.iface, "root"]))
        });
        for r in [table, qdisc].into_iter().flatten() {
            // Both parts are removed even when one was never added (a failed `on`); only
            // a part that is still there is worth a word.
            if let Err(e) = r {
                let text = e.to_string();
                if !text.contains("No such file") && !text.contains("Cannot find specified qdisc") {
                    eprintln!("lab: could not lift silent loss on {}: {e}", self.iface);
                }
            }
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
/// they pass its root qdisc — `lab_net::silent_loss_drops_frames_netpair_redirects` shows
/// it; an XDP redirect would bypass it, and netpair has none). On both ends of a veth, the
/// link is silently dead in both directions whatever programs run on either end.
/// Removed when the guard is dropped.
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
