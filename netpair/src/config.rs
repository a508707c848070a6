//! The netpair daemon's configuration file (TOML), validated before anything is attached.
//!
//! ```toml
//! host = "a"                                  # this host's name in the pool
//! pool_secret_file = "/etc/eac/pool.secret"   # shared by every host of the pool
//! app_iface = "app0"                          # the application NIC (bridge port)
//! app_ip = "10.250.1.1"                       # our address, source of path probes
//! probe_targets = ["10.250.1.100"]            # e.g. the gateway; answered ARP = path works
//! # app_xdp = false                           # optional override; unset: native XDP on a NIC that has it, else TC
//! pin_dir = "/sys/fs/bpf/eac/netpair"         # optional
//! control_socket = "/run/eac/netpair.sock"    # optional
//! realtime_priority = 10                      # optional: SCHED_FIFO 1-99, best effort
//!
//! [[availability_link]]                       # two, straight to the partner
//! iface = "al1"
//! local = "10.250.2.1:7301"
//! peer = "10.250.2.2:7301"
//!
//! [[guest]]
//! name = "web"
//! mac = "52:54:00:fb:01:0a"
//! ip = "10.250.1.10"                          # announced with gratuitous ARP
//! ipv6 = "fd00::10"                           # optional, announced with unsolicited NA
//! role = "local"                              # runs here ("partner": runs on the partner)
//! port = "vg0"                                # local guests: the guest's port on our bridge
//!
//! [timing]                                    # optional; milliseconds
//! probe_interval = 10
//! probe_loss = 40          # no probe reply for this long: our path is failing
//! heal_hold = 1000         # our path must work this long before traffic returns
//! observation_interval = 10
//! peer_timeout = 100       # no word from the partner for this long: its evidence is stale
//! link_timeout = 30        # nothing over one AL this long while another delivers: it is dead
//!
//! [damping]                                   # optional; flap damping of our path (damping.rs)
//! penalty = 1000           # added per failure of our application path
//! suppress = 1500          # above this the path is not trusted: traffic stays on the partner
//! reuse = 750              # trusted again once the penalty has decayed below this
//! half_life = 15000        # ms; the penalty halves this often
//! max_suppress = 60000     # ms; never suppressed longer than this after the last failure
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{Mac, Role, damping::DampingConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host: String,
    pub pool_secret_file: PathBuf,
    pub app_iface: String,
    pub app_ip: Ipv4Addr,
    #[serde(default)]
    pub probe_targets: Vec<Ipv4Addr>,
    /// Where the per-guest counter runs on the application NIC. Unset (default): chosen
    /// at start — native (driver-mode) XDP on a NIC on a bus whose driver takes it, TC
    /// otherwise (veth, tap, a driver without XDP: XDP on a veth forces segmentation of
    /// every GSO packet, −79 % single-stream TCP in scripts/bench-netpair-cost.sh). `true`
    /// forces XDP (driver mode, else generic), `false` forces TC. `netpair status` shows
    /// the mode in effect and why.
    #[serde(default)]
    pub app_xdp: Option<bool>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Run the daemon under SCHED_FIFO with this priority (1-99), so a busy host does not
    /// delay its judgements. Best effort: refused (no CAP_SYS_NICE, RT throttling, a cgroup
    /// without RT budget) it is logged and the daemon runs on as before. Off by default.
    #[serde(default)]
    pub realtime_priority: Option<u8>,
    #[serde(rename = "availability_link")]
    pub availability_links: Vec<AvailabilityLink>,
    #[serde(default, rename = "guest")]
    pub guests: Vec<Guest>,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub damping: DampingConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityLink {
    pub iface: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub name: String,
    pub mac: Mac,
    pub ip: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub role: Role,
    pub port: Option<String>,
}

/// Timers, in milliseconds.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    pub probe_interval: u64,
    pub probe_loss: u64,
    pub heal_hold: u64,
    pub observation_interval: u64,
    pub peer_timeout: u64,
    /// No pairing message over one availability link for this long while another link
    /// delivers them: that link is silently dead (see `links`).
    pub link_timeout: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            probe_interval: 10,
            probe_loss: 40,
            heal_hold: 1000,
            observation_interval: 10,
            peer_timeout: 100,
            link_timeout: 30,
        }
    }
}

/// A guest's name: 1 to 64 of `A-Z a-z 0-9 . _ -` (it appears in logs and events).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("a name is 1 to 64 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("{c:?} is not allowed in a name (A-Z a-z 0-9 . _ -)"));
    }
    Ok(())
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("an interface name is 1 to 15 bytes".into());
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("not a valid interface name (no '/', ':' or whitespace)".into());
    }
    Ok(())
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/eac/netpair")
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/eac/netpair.sock")
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        c.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() || self.host.len() > 64 {
            return Err("host must be 1 to 64 characters".into());
        }
        if self.availability_links.is_empty() || self.availability_links.len() > 2 {
            return Err(format!(
                "expected 1 or 2 [[availability_link]], found {}",
                self.availability_links.len()
            ));
        }
        if self.availability_links.iter().any(|l| l.iface == self.app_iface) {
            return Err(format!(
                "{} cannot be both the application NIC and an availability link",
                self.app_iface
            ));
        }
        let t = &self.timing;
        if t.probe_interval == 0 || t.observation_interval == 0 {
            return Err("timing: intervals must be > 0".into());
        }
        if t.probe_loss < 2 * t.probe_interval {
            return Err(format!(
                "timing: probe_loss ({} ms) must be at least two probe intervals ({} ms)",
                t.probe_loss,
                2 * t.probe_interval
            ));
        }
        if t.peer_timeout < 2 * t.observation_interval {
            return Err("timing: peer_timeout must be at least two observation intervals".into());
        }
        if t.link_timeout < 2 * t.observation_interval || t.link_timeout > t.peer_timeout {
            return Err(format!(
                "timing: link_timeout ({} ms) must be at least two observation intervals ({} ms) and at most peer_timeout ({} ms)",
                t.link_timeout,
                2 * t.observation_interval,
                t.peer_timeout
            ));
        }
        self.damping.validate()?;
        if let Some(p) = self.realtime_priority
            && !(1..=99).contains(&p)
        {
            return Err(format!("realtime_priority ({p}) must be between 1 and 99 (SCHED_FIFO)"));
        }
        for (i, g) in self.guests.iter().enumerate() {
            self.check_guest(g, &self.guests[..i])?;
        }
        Ok(())
    }

    /// Checks one guest against the rest of the configuration and the guests `others`
    /// (those already protected): the same rules for the configuration file and for a guest
    /// added or changed at runtime ([`crate::control`]). The reason names the guest.
    pub fn check_guest(&self, g: &Guest, others: &[Guest]) -> Result<(), String> {
        check_name(&g.name).map_err(|e| format!("guest {:?}: {e}", g.name))?;
        if let Some(o) = others.iter().find(|o| o.name == g.name) {
            return Err(format!("guest {}: the name is taken (MAC {})", g.name, o.mac));
        }
        if let Some(o) = others.iter().find(|o| o.mac == g.mac) {
            return Err(format!("guest {}: MAC {} is already guest {}", g.name, g.mac, o.name));
        }
        if g.mac.0[0] & 1 == 1 {
            return Err(format!("guest {}: {} is a multicast MAC", g.name, g.mac));
        }
        if g.mac.0 == [0; 6] {
            return Err(format!("guest {}: {} is not a usable MAC", g.name, g.mac));
        }
        match (g.role, &g.port) {
            (Role::Local, None) => return Err(format!("guest {}: a local guest needs `port`", g.name)),
            (Role::Partner, Some(_)) => {
                return Err(format!("guest {}: `port` is only for local guests", g.name));
            }
            (Role::Local, Some(p)) => {
                check_ifname(p).map_err(|e| format!("guest {}: port {p:?}: {e}", g.name))?;
                if *p == self.app_iface || self.availability_links.iter().any(|l| l.iface == *p) {
                    return Err(format!(
                        "guest {}: port {p} is the application NIC or an availability link, not a guest's port",
                        g.name
                    ));
                }
                if let Some(o) = others.iter().find(|o| o.port.as_deref() == Some(p.as_str())) {
                    return Err(format!("guest {}: port {p} is already guest {}'s", g.name, o.name));
                }
            }
            (Role::Partner, None) => {}
        }
        Ok(())
    }

    /// The pool secret (file contents, surrounding whitespace removed); at least 16 bytes.
    pub fn pool_secret(&self) -> Result<Vec<u8>, ConfigError> {
        let raw = std::fs::read(&self.pool_secret_file).map_err(|source| ConfigError::Read {
            path: self.pool_secret_file.clone(),
            source,
        })?;
        let s = raw.trim_ascii().to_vec();
        if s.len() < 16 {
            return Err(ConfigError::Invalid {
                path: self.pool_secret_file.clone(),
                message: format!("the pool secret is {} bytes; at least 16 are required", s.len()),
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host = "a"
pool_secret_file = "/etc/eac/pool.secret"
app_iface = "app0"
app_ip = "10.250.1.1"
probe_targets = ["10.250.1.100"]
[[availability_link]]
iface = "al1"
local = "10.250.2.1:7301"
peer = "10.250.2.2:7301"
[[availability_link]]
iface = "al2"
local = "10.250.3.1:7301"
peer = "10.250.3.2:7301"
[[guest]]
name = "web"
mac = "52:54:00:fb:01:0a"
ip = "10.250.1.10"
role = "local"
port = "vg0"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), s)
    }

    #[test]
    fn a_good_config_parses_with_default_timing() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.availability_links.len(), 2);
        assert_eq!(c.guests[0].role, Role::Local);
        assert_eq!(c.timing.probe_loss, 40);
        assert_eq!(c.damping, DampingConfig::default());
        assert_eq!(c.app_xdp, None, "unset: the attach mode is chosen at start");
        let c = parse(&format!("app_xdp = false\n{GOOD}")).unwrap();
        assert_eq!(c.app_xdp, Some(false));
        let c = parse(&format!("{GOOD}\n[damping]\nhalf_life = 5000\nmax_suppress = 30000\n")).unwrap();
        assert_eq!((c.damping.half_life, c.damping.penalty), (5000, 1000));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (
                GOOD.replace("role = \"local\"", "role = \"primary\""),
                "unknown variant",
            ),
            (GOOD.replace("port = \"vg0\"", ""), "needs `port`"),
            (GOOD.replace("52:54:00:fb:01:0a", "53:54:00:fb:01:0a"), "multicast"),
            (GOOD.replace("52:54:00:fb:01:0a", "not-a-mac"), "not a MAC"),
            (
                GOOD.replace("iface = \"al1\"", "iface = \"app0\""),
                "both the application NIC",
            ),
            (GOOD.replace("host = \"a\"", "host = \"a\"\nbogus = 1"), "unknown field"),
            (
                format!("{GOOD}\n[timing]\nprobe_loss = 5\n"),
                "at least two probe intervals",
            ),
            (
                format!("{GOOD}\n[timing]\nlink_timeout = 15\n"),
                "link_timeout (15 ms) must be at least two observation intervals",
            ),
            (
                format!("{GOOD}\n[timing]\nlink_timeout = 500\n"),
                "at most peer_timeout",
            ),
            (
                format!("{GOOD}\n[damping]\nreuse = 2000\n"),
                "damping: reuse (2000) must be > 0 and below suppress (1500)",
            ),
            (format!("{GOOD}\n[damping]\nhalflife = 1\n"), "unknown field"),
            (
                format!("realtime_priority = 0\n{GOOD}"),
                "realtime_priority (0) must be between 1 and 99",
            ),
            (format!("realtime_priority = 300\n{GOOD}"), "realtime_priority"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "expected {want:?} in {e:?}");
        }
    }
}
