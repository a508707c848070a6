//! The two-host lab: hosts as network namespaces, an application switch and a management
//! switch (bridges in a switch namespace), two availability links straight between the
//! hosts, and client namespaces on the application switch.
//!
//! ```text
//!            switch namespace: bridge brmgmt           bridge brapp
//!                          mgmt-a   mgmt-b       app-a   app-b   cli-0 ...
//!                            |        |            |       |       |
//! host a: mgmt0 10.250.0.1 --+        |   app0 ----+       |     client 0: eth0 10.250.1.100
//!         br0 (app0 + guest ports) 10.250.1.1              |
//! host b: mgmt0 10.250.0.2 -----------+   app0 ------------+   br0 10.250.1.2
//! a:al1 10.250.2.1 <-> b:al1 10.250.2.2      a:al2 10.250.3.1 <-> b:al2 10.250.3.2
//! ```
//! Every lab has its own namespaces, so all labs use the same addresses and interface
//! names without clashing; nothing touches the machine's own interfaces.

use std::path::{Path, PathBuf};

use crate::{Error, netns::Netns};

/// Interface names inside a host namespace.
pub const MGMT_IF: &str = "mgmt0";
pub const APP_IF: &str = "app0";
pub const APP_BRIDGE: &str = "br0";
pub const AL_IFS: [&str; 2] = ["al1", "al2"];

/// A lab host: a network namespace with its management, application and availability links.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    index: u8,
    pub ns: Netns,
}

impl Host {
    pub fn mgmt_ip(&self) -> String {
        format!("10.250.0.{}", self.index + 1)
    }
    /// The host's own address on its application bridge.
    pub fn app_ip(&self) -> String {
        format!("10.250.1.{}", self.index + 1)
    }
    /// Address on availability link 1 or 2.
    pub fn al_ip(&self, link: u8) -> String {
        assert!(link == 1 || link == 2, "availability links are 1 and 2");
        format!("10.250.{}.{}", link + 1, self.index + 1)
    }
    /// Name of this host's port on the application switch.
    pub fn switch_port(&self) -> String {
        format!("app-{}", self.name)
    }
}

/// A client on the application switch.
#[derive(Debug)]
pub struct Client {
    pub ns: Netns,
    pub ip: String,
}

/// A namespace that owns a guest's MAC and IP, plugged into a host's application bridge:
/// the network-only stand-in for a guest.
#[derive(Debug)]
pub struct GuestNs {
    pub ns: Netns,
    pub mac: String,
    pub ip: String,
    /// The guest's port on the host bridge (in the host namespace).
    pub host_port: String,
}

#[derive(Debug)]
pub struct Lab {
    // Drop order: guests and clients, then hosts, then the switch; the directory last.
    pub guests: Vec<GuestNs>,
    pub clients: Vec<Client>,
    pub hosts: Vec<Host>,
    pub switch: Netns,
    dir: LabDir,
}

impl Lab {
    /// Two hosts `a` and `b` and `clients` clients.
    pub fn two_hosts(tag: &str, clients: usize) -> Result<Self, Error> {
        let switch = Netns::create(&format!("{tag}-sw"))?;
        for br in ["brapp", "brmgmt"] {
            add_bridge(&switch, br)?;
        }
        let mut lab = Lab {
            guests: Vec::new(),
            clients: Vec::new(),
            hosts: Vec::new(),
            dir: LabDir::create(tag)?,
            switch,
        };
        for (index, name) in ["a", "b"].into_iter().enumerate() {
            let host = Host {
                name: name.to_owned(),
                index: index as u8,
                ns: Netns::create(&format!("{tag}-{name}"))?,
            };
            lab.plug_host(&host)?;
            lab.hosts.push(host);
        }
        for link in [1u8, 2] {
            let ifname = AL_IFS[link as usize - 1];
            let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
            veth(&a.ns, ifname, &b.ns, ifname)?;
            for h in [a, b] {
                h.ns.ip(&["addr", "add", &format!("{}/24", h.al_ip(link)), "dev", ifname])?;
                h.ns.ip(&["link", "set", ifname, "up"])?;
            }
        }
        for k in 0..clients {
            let ns = Netns::create(&format!("{tag}-c{k}"))?;
            let port = format!("cli-{k}");
            let ip = format!("10.250.1.{}", 100 + k);
            veth(&ns, "eth0", &lab.switch, &port)?;
            lab.switch.ip(&["link", "set", &port, "master", "brapp", "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            lab.clients.push(Client { ns, ip });
        }
        Ok(lab)
    }

    fn plug_host(&self, h: &Host) -> Result<(), Error> {
        let mgmt_port = format!("mgmt-{}", h.name);
        veth(&h.ns, MGMT_IF, &self.switch, &mgmt_port)?;
        self.switch.ip(&["link", "set", &mgmt_port, "master", "brmgmt", "up"])?;
        h.ns.ip(&["addr", "add", &format!("{}/24", h.mgmt_ip()), "dev", MGMT_IF])?;
        h.ns.ip(&["link", "set", MGMT_IF, "up"])?;

        let app_port = h.switch_port();
        veth(&h.ns, APP_IF, &self.switch, &app_port)?;
        self.switch.ip(&["link", "set", &app_port, "master", "brapp", "up"])?;
        add_bridge(&h.ns, APP_BRIDGE)?;
        h.ns.ip(&["link", "set", APP_IF, "master", APP_BRIDGE, "up"])?;
        h.ns.ip(&["addr", "add", &format!("{}/24", h.app_ip()), "dev", APP_BRIDGE])?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no lab host {name}"))
    }

    /// A per-lab scratch directory, removed when the lab is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Plugs a guest stand-in (a namespace owning `mac`/`ip` on eth0) into `host`'s bridge.
    pub fn add_guest_ns(&mut self, host: &str, mac: &str, ip: &str) -> Result<&GuestNs, Error> {
        let n = self.guests.len();
        let ns = Netns::create(&format!("g{n}"))?;
        let host_port = format!("vg{n}");
        let h = self.host(host);
        veth(&ns, "eth0", &h.ns, &host_port)?;
        h.ns.ip(&["link", "set", &host_port, "master", APP_BRIDGE, "up"])?;
        ns.ip(&["link", "set", "eth0", "address", mac])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.guests.push(GuestNs {
            ns,
            mac: mac.to_owned(),
            ip: ip.to_owned(),
            host_port,
        });
        Ok(&self.guests[n])
    }

    /// Every namespace this lab created (to check that they are gone after drop).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut v = vec![self.switch.name().to_owned()];
        v.extend(self.hosts.iter().map(|h| h.ns.name().to_owned()));
        v.extend(self.clients.iter().map(|c| c.ns.name().to_owned()));
        v.extend(self.guests.iter().map(|g| g.ns.name().to_owned()));
        v
    }
}

/// A bridge without STP (ports forward at once), up.
fn add_bridge(ns: &Netns, name: &str) -> Result<(), Error> {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])?;
    ns.ip(&["link", "set", name, "up"]).map(drop)
}

/// A veth pair with one end in each namespace, created directly there.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), Error> {
    crate::netns::run(std::process::Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))?;
    Ok(())
}

/// `/tmp/eac-<tag>-<pid>-<n>`, removed on drop.
#[derive(Debug)]
struct LabDir(PathBuf);

impl LabDir {
    fn create(tag: &str) -> Result<Self, Error> {
        let p = std::env::temp_dir().join(crate::netns::unique_name(tag));
        std::fs::create_dir_all(&p).map_err(|source| Error::Io {
            what: format!("create {}", p.display()),
            source,
        })?;
        Ok(Self(p))
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
