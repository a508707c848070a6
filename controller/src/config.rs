//! The controller's configuration file (TOML), validated before anything starts.
//!
//! ```toml
//! host = "a"                                  # this host's name in the pool (1–64 of A-Z a-z 0-9 . _ -)
//! pool_secret_file = "/etc/eac/pool.secret"   # ≥ 16 bytes, the same on every host
//! state_file = "/shared/eac/statefile"        # on storage every host sees; created at start if missing
//! data_dir = "/var/lib/eac"                   # pool configuration + guest definitions
//! api_socket = "/run/eac/controller.sock"     # optional (this default); root-only (0600)
//! api_listen = "10.250.0.1:7411"              # optional authenticated TCP endpoint
//! libvirt_uri = "qemu:///system"              # optional (this default)
//! watchdog = "/dev/watchdog"                  # optional; armed when this host fences itself
//! realtime_priority = 10                      # optional: run under SCHED_FIFO 1-99 (recommended)
//!
//! [timeouts]                                  # optional; milliseconds; these are the defaults
//! heartbeat_interval_ms = 100
//! statefile_interval_ms = 200
//! channel_timeout_ms = 400
//! dead_after_ms = 2000
//! isolation_after_ms = 800
//! fence_deadline_ms = 2800
//! fence_grace_ms = 1100
//!
//! [[network]]                                 # one per heartbeat network (management, AL1, AL2)
//! name = "mgmt"
//! bind = "10.250.0.1:7410"
//! [[network]]
//! name = "al1"
//! bind = "10.250.2.1:7410"
//!
//! [[peer]]                                    # every other host of the pool
//! name = "b"
//! addresses = { mgmt = "10.250.0.2:7410", al1 = "10.250.2.2:7410" }
//! capacity = { mem_mib = 4096, vcpus = 4 }    # optional: what the peer offers guests
//!
//! [capacity]                                  # what this host offers guests
//! mem_mib = 4096
//! vcpus = 4
//! ```
//!
//! Every error names the field and says what is expected; the daemon exits with
//! `eac_common::EXIT_USAGE` (64, "do not restart") on any of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// The shortest pool secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// The longest host or network name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a configuration file was refused.
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
    #[error("{config}: pool_secret_file: cannot read {secret}")]
    Secret {
        config: PathBuf,
        secret: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pool secret: authenticates heartbeats, the TCP API and every other protocol between
/// hosts. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolSecret(Vec<u8>);

impl PoolSecret {
    /// A secret from raw bytes (≥ [`MIN_SECRET_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the pool secret is {} bytes; at least {MIN_SECRET_LEN} are required (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PoolSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolSecret({} bytes)", self.0.len())
    }
}

/// The validated configuration of this host's controller.
#[derive(Clone, Debug)]
pub struct Config {
    /// This host's name in the pool.
    pub host: String,
    pub pool_secret_file: PathBuf,
    /// The secret read from `pool_secret_file` (surrounding whitespace removed).
    pub pool_secret: PoolSecret,
    pub state_file: PathBuf,
    pub data_dir: PathBuf,
    pub api_socket: PathBuf,
    pub api_listen: Option<SocketAddr>,
    pub libvirt_uri: String,
    pub watchdog: Option<PathBuf>,
    /// Run under SCHED_FIFO at this priority (1–99), as corosync runs, so a busy host cannot
    /// delay heartbeats and judgements past the timeouts. Applied at start; refused (no
    /// CAP_SYS_NICE, no real-time budget) it is logged and the controller runs on as before.
    pub realtime_priority: Option<u8>,
    pub timeouts: Timeouts,
    /// The heartbeat networks this host binds, in file order.
    pub networks: Vec<Network>,
    /// The other hosts of the pool, in file order.
    pub peers: Vec<Peer>,
    /// What this host offers guests.
    pub capacity: Capacity,
}

/// A heartbeat network this host is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    /// Our address on it (heartbeats are sent from and received on this socket).
    pub bind: SocketAddr,
}

/// Another host of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its heartbeat address per network name (a subset of our networks, at least one).
    pub addresses: BTreeMap<String, SocketAddr>,
    pub capacity: Option<Capacity>,
}

/// Resources a host offers guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub mem_mib: u64,
    pub vcpus: u32,
}

/// The controller's timers (`[timeouts]`, each key the field's name with an `_ms` suffix):
/// one type with one validator, [`Timeouts::validate`], shared with membership and fencing.
pub use crate::membership::{Timeouts, TimeoutsError};

/// The file as written, before validation.
mod raw {
    use std::{collections::BTreeMap, path::PathBuf};

    use serde::Deserialize;

    use super::Capacity;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub host: String,
        pub pool_secret_file: PathBuf,
        pub state_file: PathBuf,
        pub data_dir: PathBuf,
        pub api_socket: Option<PathBuf>,
        pub api_listen: Option<String>,
        pub libvirt_uri: Option<String>,
        pub watchdog: Option<PathBuf>,
        pub realtime_priority: Option<u8>,
        #[serde(default)]
        pub timeouts: Timeouts,
        #[serde(default, rename = "network")]
        pub networks: Vec<Network>,
        #[serde(default, rename = "peer")]
        pub peers: Vec<Peer>,
        pub capacity: Capacity,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Network {
        pub name: String,
        pub bind: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Peer {
        pub name: String,
        #[serde(default)]
        pub addresses: BTreeMap<String, String>,
        pub capacity: Option<Capacity>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Timeouts {
        pub heartbeat_interval_ms: Option<u64>,
        pub statefile_interval_ms: Option<u64>,
        pub channel_timeout_ms: Option<u64>,
        pub dead_after_ms: Option<u64>,
        pub isolation_after_ms: Option<u64>,
        pub fence_deadline_ms: Option<u64>,
        pub fence_grace_ms: Option<u64>,
    }
}

/// Default of `api_socket`.
pub const DEFAULT_API_SOCKET: &str = "/run/eac/controller.sock";
/// Default of `libvirt_uri`.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// Host, network and peer names: 1–64 bytes of `A-Z a-z 0-9 . _ -` (they travel in
/// heartbeats, state-file slots and logs).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("{what} {name:?} must be 1 to {MAX_NAME_LEN} bytes long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn socket_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{what} = {s:?} is not an IP:port (e.g. \"10.250.0.1:7410\" or \"[fd00::1]:7410\"; host names are not accepted)")
    })
}

impl Config {
    /// Reads, parses and validates `path`, and reads the pool secret it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text` (`path` is only used in messages; relative paths inside
    /// are taken as written). Reads the pool secret file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: raw::File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut c = Self::validate(raw).map_err(invalid)?;
        c.pool_secret = read_secret(&c.pool_secret_file).map_err(|e| match e {
            ConfigError::Read { path: secret, source } => ConfigError::Secret {
                config: path.to_owned(),
                secret,
                source,
            },
            ConfigError::Invalid { path: secret, message } => ConfigError::Invalid {
                path: path.to_owned(),
                message: format!("pool_secret_file {}: {message}", secret.display()),
            },
            other => other,
        })?;
        Ok(c)
    }

    fn validate(raw: raw::File) -> Result<Self, String> {
        check_name("host", &raw.host)?;
        for (what, p) in [
            ("pool_secret_file", &raw.pool_secret_file),
            ("state_file", &raw.state_file),
            ("data_dir", &raw.data_dir),
        ] {
            if p.as_os_str().is_empty() {
                return Err(format!("{what} must not be empty"));
            }
        }
        if raw.state_file.file_name().is_none() {
            return Err(format!("state_file {:?} must name a file", raw.state_file));
        }
        let api_listen = raw
            .api_listen
            .as_deref()
            .map(|s| socket_addr("api_listen", s))
            .transpose()?;

        let t = raw.timeouts;
        let d = Timeouts::default();
        let pick = |v: Option<u64>, def: Duration| v.map(Duration::from_millis).unwrap_or(def);
        let timeouts = Timeouts {
            heartbeat_interval: pick(t.heartbeat_interval_ms, d.heartbeat_interval),
            statefile_interval: pick(t.statefile_interval_ms, d.statefile_interval),
            channel_timeout: pick(t.channel_timeout_ms, d.channel_timeout),
            dead_after: pick(t.dead_after_ms, d.dead_after),
            isolation_after: pick(t.isolation_after_ms, d.isolation_after),
            fence_deadline: pick(t.fence_deadline_ms, d.fence_deadline),
            fence_grace: pick(t.fence_grace_ms, d.fence_grace),
        };
        timeouts.validate().map_err(|e| e.to_string())?;
        if let Some(p) = raw.realtime_priority
            && !(1..=99).contains(&p)
        {
            return Err(format!("realtime_priority ({p}) must be between 1 and 99 (SCHED_FIFO)"));
        }

        if raw.networks.is_empty() {
            return Err(
                "no [[network]]: at least one heartbeat network is required (management and both availability links are recommended)"
                    .into(),
            );
        }
        let mut networks = Vec::new();
        let mut binds = BTreeSet::new();
        for n in raw.networks {
            check_name("network name", &n.name)?;
            if networks.iter().any(|m: &Network| m.name == n.name) {
                return Err(format!("network {:?} is listed twice", n.name));
            }
            let bind = socket_addr(&format!("network {:?}: bind", n.name), &n.bind)?;
            if bind.port() == 0 || bind.ip().is_unspecified() {
                return Err(format!(
                    "network {:?}: bind = {:?} needs a specific address and port (peers check where heartbeats come from)",
                    n.name, n.bind
                ));
            }
            if !binds.insert(bind) {
                return Err(format!("network {:?}: bind address {bind} is used twice", n.name));
            }
            networks.push(Network { name: n.name, bind });
        }

        if raw.peers.is_empty() {
            return Err("no [[peer]]: a pool needs at least one other host".into());
        }
        let mut peers: Vec<Peer> = Vec::new();
        let mut peer_addrs = BTreeMap::new();
        for p in raw.peers {
            check_name("peer name", &p.name)?;
            if p.name == raw.host {
                return Err(format!(
                    "peer {:?} is this host (host = {:?}); list only the other hosts",
                    p.name, raw.host
                ));
            }
            if peers.iter().any(|q| q.name == p.name) {
                return Err(format!("peer {:?} is listed twice", p.name));
            }
            if p.addresses.is_empty() {
                return Err(format!(
                    "peer {:?} has no addresses: give its heartbeat address on at least one network, e.g. addresses = {{ {} = \"IP:PORT\" }}",
                    p.name, networks[0].name
                ));
            }
            let mut addresses = BTreeMap::new();
            for (net, a) in p.addresses {
                if !networks.iter().any(|n| n.name == net) {
                    let ours: Vec<_> = networks.iter().map(|n| n.name.as_str()).collect();
                    return Err(format!(
                        "peer {:?}: address for network {net:?}, which this host does not bind (its [[network]]s: {})",
                        p.name,
                        ours.join(", ")
                    ));
                }
                let addr = socket_addr(&format!("peer {:?}: addresses.{net}", p.name), &a)?;
                if let Some(other) = peer_addrs.insert(addr, p.name.clone()) {
                    return Err(format!(
                        "peer {:?}: address {addr} is also given for peer {other:?}",
                        p.name
                    ));
                }
                if binds.contains(&addr) {
                    return Err(format!(
                        "peer {:?}: address {addr} is one of this host's own bind addresses",
                        p.name
                    ));
                }
                addresses.insert(net, addr);
            }
            peers.push(Peer {
                name: p.name,
                addresses,
                capacity: p.capacity,
            });
        }

        Ok(Config {
            host: raw.host,
            pool_secret_file: raw.pool_secret_file,
            pool_secret: PoolSecret(Vec::new()),
            state_file: raw.state_file,
            data_dir: raw.data_dir,
            api_socket: raw.api_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)),
            api_listen,
            libvirt_uri: raw.libvirt_uri.unwrap_or_else(|| DEFAULT_LIBVIRT_URI.to_owned()),
            watchdog: raw.watchdog,
            realtime_priority: raw.realtime_priority,
            timeouts,
            networks,
            peers,
            capacity: raw.capacity,
        })
    }

    /// Every host name of the pool (this host and its peers), sorted: the state-file slot order.
    pub fn all_hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.host.clone())
            .chain(self.peers.iter().map(|p| p.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// The network named `name`.
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// Reads a pool secret file: contents with surrounding whitespace removed, ≥ 16 bytes.
/// Warns (does not refuse) when the file is readable by others than its owner.
pub fn read_secret(path: &Path) -> Result<PoolSecret, ConfigError> {
    let raw = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format_args!("{:o}", mode & 0o777), "the pool secret file is readable by other users; chmod 600 it");
        }
    }
    PoolSecret::new(raw.trim_ascii().to_vec()).map_err(|message| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::TempDir;

    fn good(dir: &TempDir) -> String {
        let secret = dir.0.join("pool.secret");
        std::fs::write(&secret, "0123456789abcdef-pool-secret\n").unwrap();
        format!(
            r#"
host = "a"
pool_secret_file = "{}"
state_file = "/shared/eac/statefile"
data_dir = "/var/lib/eac"
api_listen = "10.250.0.1:7411"
watchdog = "/dev/watchdog"

[[network]]
name = "mgmt"
bind = "10.250.0.1:7410"
[[network]]
name = "al1"
bind = "10.250.2.1:7410"
[[network]]
name = "al2"
bind = "10.250.3.1:7410"

[[peer]]
name = "b"
addresses = {{ mgmt = "10.250.0.2:7410", al1 = "10.250.2.2:7410", al2 = "10.250.3.2:7410" }}

[[peer]]
name = "c"
addresses = {{ mgmt = "10.250.0.3:7410" }}
capacity = {{ mem_mib = 2048, vcpus = 2 }}

[capacity]
mem_mib = 4096
vcpus = 4
"#,
            secret.display()
        )
    }

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("controller.toml"), s)
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let dir = TempDir::new("config-test");
        let c = parse(&good(&dir)).unwrap();
        assert_eq!(c.host, "a");
        assert_eq!(c.pool_secret.as_bytes(), b"0123456789abcdef-pool-secret");
        assert_eq!(format!("{:?}", c.pool_secret), "PoolSecret(28 bytes)");
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "Debug leaks the secret");
        assert_eq!(c.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(c.api_listen, Some("10.250.0.1:7411".parse().unwrap()));
        assert_eq!(c.libvirt_uri, DEFAULT_LIBVIRT_URI);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.networks.len(), 3);
        assert_eq!(c.network("al1").unwrap().bind, "10.250.2.1:7410".parse().unwrap());
        assert_eq!(c.peer("b").unwrap().addresses.len(), 3);
        assert_eq!(
            c.peer("c").unwrap().capacity,
            Some(Capacity {
                mem_mib: 2048,
                vcpus: 2
            })
        );
        assert_eq!(c.capacity.vcpus, 4);
        assert_eq!(c.all_hosts(), ["a", "b", "c"]);
        // The doc comment's example is the same shape.
        let doc = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("/etc/eac/pool.secret", &dir.0.join("pool.secret").display().to_string());
        let d = parse(&doc).unwrap();
        assert_eq!(d.timeouts, Timeouts::default());
        assert_eq!(d.peers[0].capacity.unwrap().mem_mib, 4096);
    }

    #[test]
    fn the_example_in_operations_md_is_valid() {
        let dir = TempDir::new("config-test");
        good(&dir);
        let doc = include_str!("../../docs/operations.md");
        let section = doc
            .split("## The controller's configuration file")
            .nth(1)
            .expect("docs/operations.md has the controller configuration section");
        let example = section
            .split("```toml\n")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .expect("a toml example");
        let text = example.replace("/etc/eac/pool.secret", &dir.0.join("pool.secret").display().to_string());
        let c = parse(&text).unwrap();
        assert_eq!(c.networks.len(), 3);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.peers[0].addresses.len(), 3);
    }

    #[test]
    fn timeouts_are_read_in_milliseconds() {
        let dir = TempDir::new("config-test");
        let text = format!(
            "{}\n[timeouts]\nheartbeat_interval_ms = 100\nfence_grace_ms = 2500\n",
            good(&dir)
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.timeouts.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.timeouts.fence_grace, Duration::from_millis(2500));
        assert_eq!(c.timeouts.dead_after, Duration::from_secs(2));
    }

    #[test]
    fn every_validation_error_names_the_field() {
        let dir = TempDir::new("config-test");
        let g = good(&dir);
        let short = dir.0.join("short.secret");
        std::fs::write(&short, "  too-short \n").unwrap();
        let secret_path = dir.0.join("pool.secret").display().to_string();
        let cases: Vec<(String, &str)> = vec![
            (
                g.replace("host = \"a\"", "host = \"a\"\nbogus = 1"),
                "unknown field `bogus`",
            ),
            (g.replace("host = \"a\"", "host = \"a b\""), "host \"a b\" contains ' '"),
            (g.replace("host = \"a\"", "host = \"\""), "host \"\" must be 1 to 64"),
            (
                g.replace(&secret_path, "/nonexistent/eac/pool.secret"),
                "controller.toml: pool_secret_file: cannot read /nonexistent/eac/pool.secret: No such file",
            ),
            (
                g.replace(&secret_path, &short.display().to_string()),
                "short.secret: the pool secret is 9 bytes; at least 16",
            ),
            (
                g.replace("name = \"al1\"", "name = \"mgmt\""),
                "network \"mgmt\" is listed twice",
            ),
            (
                g.replace("bind = \"10.250.2.1:7410\"", "bind = \"al1.example:7410\""),
                "network \"al1\": bind = \"al1.example:7410\" is not an IP:port",
            ),
            (
                g.replace("bind = \"10.250.2.1:7410\"", "bind = \"10.250.2.1\""),
                "is not an IP:port",
            ),
            (
                g.replace("bind = \"10.250.2.1:7410\"", "bind = \"0.0.0.0:7410\""),
                "needs a specific address",
            ),
            (
                g.replace("bind = \"10.250.2.1:7410\"", "bind = \"10.250.0.1:7410\""),
                "bind address 10.250.0.1:7410 is used twice",
            ),
            (
                g.replace("api_listen = \"10.250.0.1:7411\"", "api_listen = \"localhost:7411\""),
                "api_listen = \"localhost:7411\" is not an IP:port",
            ),
            (g.replace("name = \"c\"", "name = \"b\""), "peer \"b\" is listed twice"),
            (g.replace("name = \"c\"", "name = \"a\""), "peer \"a\" is this host"),
            (
                g.replace("mgmt = \"10.250.0.3:7410\"", "al9 = \"10.250.9.3:7410\""),
                "peer \"c\": address for network \"al9\", which this host does not bind (its [[network]]s: mgmt, al1, al2)",
            ),
            (
                g.replace("mgmt = \"10.250.0.3:7410\"", "mgmt = \"10.250.0.3\""),
                "peer \"c\": addresses.mgmt = \"10.250.0.3\" is not an IP:port",
            ),
            (
                g.replace("mgmt = \"10.250.0.3:7410\"", "mgmt = \"10.250.0.2:7410\""),
                "also given for peer \"b\"",
            ),
            (
                g.replace("addresses = { mgmt = \"10.250.0.3:7410\" }", "addresses = {}"),
                "peer \"c\" has no addresses",
            ),
            (
                g.replace("[[network]]\nname = \"mgmt\"", "[[networks]]\nname = \"mgmt\""),
                "unknown field `networks`",
            ),
            (g.replace("vcpus = 4\n", ""), "missing field `vcpus`"),
            (
                g.replacen("[[network]]", "realtime_priority = 0\n\n[[network]]", 1),
                "realtime_priority (0) must be between 1 and 99",
            ),
            (
                format!("{g}\n[timeouts]\nheartbeat_ms = 100\n"),
                "unknown field `heartbeat_ms`",
            ),
            (
                format!("{g}\n[timeouts]\nfence_grace_ms = 1000\n"),
                "timeouts.dead_after_ms + timeouts.fence_grace_ms (3000 ms, when survivors restart a dead host's guests) must be at least 3100 ms",
            ),
        ];
        for (text, want) in cases {
            let e = eac_common::error_chain(&parse(&text).expect_err(want));
            assert!(e.contains(want), "expected {want:?} in {e:?}");
            assert!(e.starts_with("controller.toml: "), "{e}");
        }
        let no_peers: String = g.split("[[peer]]").next().unwrap().to_owned() + "[capacity]\nmem_mib = 1\nvcpus = 1\n";
        let e = parse(&no_peers).unwrap_err().to_string();
        assert!(e.contains("no [[peer]]"), "{e}");
        let no_nets = g.replace("[[network]]", "[[peer]]");
        assert!(parse(&no_nets).is_err());
    }

    /// The file's `[timeouts]` go through the one validator (membership's rule, not a weaker
    /// one), and its errors name the file's keys.
    #[test]
    fn timeouts_are_validated_with_the_file_keys() {
        let dir = TempDir::new("config-test");
        let g = good(&dir);
        let cases = [
            (
                "heartbeat_interval_ms = 200\nstatefile_interval_ms = 100\nchannel_timeout_ms = 300\n",
                "controller.toml: timeouts.channel_timeout_ms (300 ms) must be at least twice \
                 timeouts.heartbeat_interval_ms (200 ms)",
            ),
            (
                "fence_grace_ms = 1000\n",
                "controller.toml: unsafe timeouts: timeouts.dead_after_ms + timeouts.fence_grace_ms (3000 ms",
            ),
            ("dead_after_ms = 0\n", "controller.toml: timeouts.dead_after_ms is 0"),
        ];
        for (table, want) in cases {
            let text = format!("{g}\n[timeouts]\n{table}");
            let e = eac_common::error_chain(&parse(&text).expect_err(want));
            assert!(e.starts_with(want), "expected {want:?} in {e:?}");
            assert!(!e.contains("timeouts.heartbeat "), "{e}");
        }
        // Both boundaries of the safety inequality through the file: 3100 = 2800 + 3 × 100.
        let c = parse(&format!("{g}\n[timeouts]\nfence_deadline_ms = 2800\n")).unwrap();
        assert_eq!(c.timeouts.fence_deadline, Duration::from_millis(2800));
        assert!(parse(&format!("{g}\n[timeouts]\nfence_deadline_ms = 2801\n")).is_err());
    }
}
