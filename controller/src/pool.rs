//! The pool configuration: which guests are protected and at what level, with the domain XML
//! every host needs to start them; the hosts and what they offer; the pool's policy. Every host
//! holds a copy (`DATA_DIR/pool.json`, written atomically) with an **epoch** that grows by one
//! with every change.
//!
//! # Changing it (no single point of failure for management)
//! A change can be made through any live host. That host computes the new configuration
//! (`epoch + 1`, [`PoolConfig::apply`]) and runs a two-phase exchange over the peers' API:
//! `pool.propose` to every live peer (each accepts only if the proposal builds on the epoch it
//! holds itself and is well-formed, and holds it as pending), then `pool.commit` (each stores
//! it). If any live peer refuses or cannot be reached, the proposer sends `pool.abort` and the
//! change is refused: no live host ever acts on a configuration another live host does not
//! have. Dead peers are skipped; they catch up when they come back (a higher epoch wins, see
//! [`PoolConfig::newer_than`]). A survivor acts on the configuration it has.
//!
//! This module is pure (no sockets): the daemon does the exchange.
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the `pool.json` format.
pub const FORMAT_VERSION: u32 = 1;
/// File name inside the data directory.
pub const FILE_NAME: &str = "pool.json";
/// Largest accepted pool file / proposal (domain XMLs are a few KiB each).
pub const MAX_BYTES: usize = 8 << 20;

/// How available a guest is. Level 2 (component fault tolerance) is a valid level that this
/// build refuses with an explanation until ublk-mirror and netpair are wired in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Level {
    /// Restart on a survivor when the host dies; restart in place when the guest crashes.
    L1,
    /// Component fault tolerance: mirrored disks, paired network, paused secondary.
    L2,
}

impl Level {
    /// Whether this build can protect a guest at this level; the refusal says what is missing.
    pub fn available(self) -> Result<(), Refusal> {
        match self {
            Level::L1 => Ok(()),
            Level::L2 => Err(Refusal::new(
                "level 2 not available yet: needs ublk-mirror and netpair on both hosts",
                "protect the guest at --level 1 now; level 2 arrives with the ublk-mirror and netpair integration",
            )),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Level::L1 => 1,
            Level::L2 => 2,
        }
    }
}

impl TryFrom<u8> for Level {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(Level::L1),
            2 => Ok(Level::L2),
            _ => Err(format!(
                "level {v} does not exist (levels are 1 = restart, 2 = component fault tolerance)"
            )),
        }
    }
}

impl From<Level> for u8 {
    fn from(l: Level) -> u8 {
        l.number()
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Why a change was refused: what and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub message: String,
    pub hint: String,
}

impl Refusal {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

/// The pool's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Every protected guest must still have a place after any this many hosts fail.
    pub host_failures_to_tolerate: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            host_failures_to_tolerate: 1,
        }
    }
}

/// A host of the pool and what it offers guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub mem_mib: u64,
    pub vcpus: u32,
}

/// A protected guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectedGuest {
    pub name: String,
    pub uuid: String,
    pub level: Level,
    /// The persistent domain XML (defined on every host so any survivor can start it).
    pub xml: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// The host that runs it (updated when a survivor restarts it elsewhere).
    pub home: String,
}

/// The pool configuration every host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub version: u32,
    /// Grows by one with every committed change.
    pub epoch: u64,
    /// The host through which the last change was made, and when (unix ms; informational).
    pub changed_by: String,
    pub changed_at_ms: u64,
    pub policy: Policy,
    pub hosts: BTreeMap<String, HostEntry>,
    pub guests: BTreeMap<String, ProtectedGuest>,
}

/// A change to the pool configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Protect a guest (or change its level / definition).
    Protect(ProtectedGuest),
    Unprotect {
        name: String,
    },
    /// A guest now runs on `host` (after a restart there).
    Moved {
        name: String,
        host: String,
    },
    SetPolicy(Policy),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Protect(g) => write!(f, "protect {} at level {} (home {})", g.name, g.level, g.home),
            Change::Unprotect { name } => write!(f, "unprotect {name}"),
            Change::Moved { name, host } => write!(f, "{name} now runs on {host}"),
            Change::SetPolicy(p) => write!(f, "host-failures-to-tolerate = {}", p.host_failures_to_tolerate),
        }
    }
}

/// Errors reading or writing the pool file.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot read the pool configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pool configuration {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the pool configuration {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PoolConfig {
    /// A fresh configuration (epoch 0): the hosts from this host's config file, no guests.
    pub fn initial(hosts: BTreeMap<String, HostEntry>, by: &str) -> Self {
        Self {
            version: FORMAT_VERSION,
            epoch: 0,
            changed_by: by.to_owned(),
            changed_at_ms: 0,
            policy: Policy::default(),
            hosts,
            guests: BTreeMap::new(),
        }
    }

    /// Checks a configuration received from outside (a file or a peer).
    pub fn validate(&self) -> Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.hosts.is_empty() {
            return Err("no hosts".into());
        }
        for (name, g) in &self.guests {
            if name != &g.name {
                return Err(format!("guest entry '{name}' names '{}'", g.name));
            }
            if !valid_name(name) {
                return Err(format!("guest name '{name}' (use A-Z a-z 0-9 . _ -, at most 64)"));
            }
            if !self.hosts.contains_key(&g.home) {
                return Err(format!(
                    "guest '{name}' has home '{}', which is not a host of the pool",
                    g.home
                ));
            }
            if g.xml.is_empty() || g.xml.len() > 1 << 20 {
                return Err(format!("guest '{name}': domain XML of {} bytes", g.xml.len()));
            }
        }
        Ok(())
    }

    /// The configuration after `change`, with the epoch advanced; refusals explain themselves.
    /// Capacity (admission control) is checked by the caller with the plan.
    pub fn apply(&self, change: &Change, by: &str, now_ms: u64) -> Result<PoolConfig, Refusal> {
        let mut next = self.clone();
        match change {
            Change::Protect(g) => {
                g.level.available()?;
                if !valid_name(&g.name) {
                    return Err(Refusal::new(
                        format!("'{}' is not a valid guest name", g.name),
                        "guest names use A-Z a-z 0-9 . _ - (at most 64)",
                    ));
                }
                if !self.hosts.contains_key(&g.home) {
                    return Err(Refusal::new(
                        format!("host '{}' is not in the pool", g.home),
                        "add the host to every controller's configuration first",
                    ));
                }
                next.guests.insert(g.name.clone(), g.clone());
            }
            Change::Unprotect { name } => {
                if next.guests.remove(name).is_none() {
                    return Err(Refusal::new(
                        format!("guest '{name}' is not protected"),
                        "`eac vm list` shows the protected guests",
                    ));
                }
            }
            Change::Moved { name, host } => {
                let Some(g) = next.guests.get_mut(name) else {
                    return Err(Refusal::new(format!("guest '{name}' is not protected"), ""));
                };
                if !self.hosts.contains_key(host) {
                    return Err(Refusal::new(format!("host '{host}' is not in the pool"), ""));
                }
                g.home = host.clone();
            }
            Change::SetPolicy(p) => {
                let n = u32::try_from(self.hosts.len()).unwrap_or(u32::MAX);
                if p.host_failures_to_tolerate >= n {
                    return Err(Refusal::new(
                        format!(
                            "host-failures-to-tolerate {} needs at least {} hosts; the pool has {n}",
                            p.host_failures_to_tolerate,
                            p.host_failures_to_tolerate + 1
                        ),
                        "tolerate fewer failures or add hosts",
                    ));
                }
                next.policy = *p;
            }
        }
        next.epoch = self.epoch + 1;
        next.changed_by = by.to_owned();
        next.changed_at_ms = now_ms;
        Ok(next)
    }

    /// Whether `self` should replace `other` when two hosts compare copies: the higher epoch
    /// wins; at equal epochs with different content (both sides of a partition changed the
    /// configuration) the later change wins, then the smaller host name — the same answer on
    /// every host.
    pub fn newer_than(&self, other: &PoolConfig) -> bool {
        if self.epoch != other.epoch {
            return self.epoch > other.epoch;
        }
        if self == other {
            return false;
        }
        (self.changed_at_ms, std::cmp::Reverse(&self.changed_by))
            > (other.changed_at_ms, std::cmp::Reverse(&other.changed_by))
    }

    /// Loads `DATA_DIR/pool.json`; `Ok(None)` if there is none yet.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, PoolError> {
        let path = data_dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PoolError::Read { path, source }),
        };
        if bytes.len() > MAX_BYTES {
            return Err(PoolError::Invalid {
                path,
                message: format!("{} bytes (at most {MAX_BYTES})", bytes.len()),
            });
        }
        let cfg: PoolConfig = serde_json::from_slice(&bytes).map_err(|e| PoolError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| PoolError::Invalid { path, message })?;
        Ok(Some(cfg))
    }

    /// Writes `DATA_DIR/pool.json` atomically (temporary file, fsync, rename, fsync of the
    /// directory), mode 0600.
    pub fn save(&self, data_dir: &Path) -> Result<(), PoolError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(FILE_NAME);
        let tmp = data_dir.join(format!(".{FILE_NAME}.tmp"));
        let werr = |source| PoolError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(werr)?;
        let body = serde_json::to_vec_pretty(self).map_err(|e| werr(std::io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(&body).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)?;
        std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(werr)?;
        Ok(())
    }

    /// A short fingerprint of the content (for logs and comparisons in `eac pool status`).
    pub fn fingerprint(&self) -> String {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let h = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{h:016x}")
    }
}

/// A guest or host name we accept: 1–64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The `<memory>` (MiB) and `<vcpu>` count of a domain XML, for capacity planning. Reads the
/// two elements with their `unit` attribute (KiB default, as libvirt); no full XML parse.
pub fn xml_resources(xml: &str) -> Option<(u64, u32)> {
    let mem_start = xml.find("<memory")?;
    let mem_tag_end = mem_start + xml[mem_start..].find('>')?;
    let tag = &xml[mem_start..mem_tag_end];
    let value_end = mem_tag_end + 1 + xml[mem_tag_end + 1..].find('<')?;
    let value: u64 = xml[mem_tag_end + 1..value_end].trim().parse().ok()?;
    let unit = tag
        .split("unit=")
        .nth(1)
        .map(|u| u.trim_matches(|c| c == '\'' || c == '"' || c == '/' || c == ' '))
        .map(|u| u.split(['\'', '"']).next().unwrap_or(u).to_owned())
        .unwrap_or_else(|| "KiB".into());
    let mib = match unit.as_str() {
        "b" | "bytes" => value >> 20,
        "KB" => value * 1000 / (1 << 20),
        "k" | "KiB" => value >> 10,
        "MB" => value * 1_000_000 / (1 << 20),
        "M" | "MiB" => value,
        "GB" => value * 1_000_000_000 / (1 << 20),
        "G" | "GiB" => value << 10,
        _ => return None,
    };
    let vcpu_start = xml.find("<vcpu")?;
    let vcpu_tag_end = vcpu_start + xml[vcpu_start..].find('>')?;
    let vcpu_end = vcpu_tag_end + 1 + xml[vcpu_tag_end + 1..].find('<')?;
    let vcpus: u32 = xml[vcpu_tag_end + 1..vcpu_end].trim().parse().ok()?;
    Some((mib, vcpus))
}

/// The `<uuid>` of a domain XML.
pub fn xml_uuid(xml: &str) -> Option<&str> {
    let start = xml.find("<uuid>")? + "<uuid>".len();
    let len = xml[start..].find("</uuid>")?;
    Some(xml[start..start + len].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> BTreeMap<String, HostEntry> {
        ["a", "b"]
            .into_iter()
            .map(|h| {
                (
                    h.to_owned(),
                    HostEntry {
                        mem_mib: 1024,
                        vcpus: 4,
                    },
                )
            })
            .collect()
    }

    fn guest(name: &str, level: Level) -> ProtectedGuest {
        ProtectedGuest {
            name: name.into(),
            uuid: "u".into(),
            level,
            xml: format!("<domain><name>{name}</name></domain>"),
            mem_mib: 160,
            vcpus: 1,
            home: "a".into(),
        }
    }

    #[test]
    fn changes_advance_the_epoch_and_explain_refusals() {
        let c0 = PoolConfig::initial(hosts(), "a");
        let c1 = c0.apply(&Change::Protect(guest("g", Level::L1)), "a", 10).unwrap();
        assert_eq!((c1.epoch, c1.changed_by.as_str()), (1, "a"));
        assert!(c1.guests.contains_key("g"));
        let r = c1.apply(&Change::Protect(guest("h", Level::L2)), "a", 11).unwrap_err();
        assert!(r.message.contains("level 2 not available yet"), "{r:?}");
        assert!(r.hint.contains("--level 1"));
        let c2 = c1
            .apply(
                &Change::Moved {
                    name: "g".into(),
                    host: "b".into(),
                },
                "b",
                12,
            )
            .unwrap();
        assert_eq!(c2.guests["g"].home, "b");
        assert!(
            c2.apply(
                &Change::Moved {
                    name: "g".into(),
                    host: "z".into()
                },
                "b",
                13
            )
            .is_err()
        );
        let c3 = c2.apply(&Change::Unprotect { name: "g".into() }, "b", 14).unwrap();
        assert!(c3.guests.is_empty());
        assert_eq!(c3.epoch, 3);
        assert!(c3.apply(&Change::Unprotect { name: "g".into() }, "b", 15).is_err());
        let r = c3
            .apply(
                &Change::SetPolicy(Policy {
                    host_failures_to_tolerate: 2,
                }),
                "a",
                16,
            )
            .unwrap_err();
        assert!(r.message.contains("needs at least 3 hosts"), "{r:?}");
        let c4 = c3
            .apply(
                &Change::SetPolicy(Policy {
                    host_failures_to_tolerate: 0,
                }),
                "a",
                16,
            )
            .unwrap();
        assert_eq!(c4.policy.host_failures_to_tolerate, 0);
    }

    #[test]
    fn newer_than_is_the_same_on_every_host() {
        let c0 = PoolConfig::initial(hosts(), "a");
        let c1 = c0.apply(&Change::Protect(guest("g", Level::L1)), "a", 10).unwrap();
        assert!(c1.newer_than(&c0) && !c0.newer_than(&c1));
        assert!(!c1.newer_than(&c1.clone()));
        // both sides of a partition changed it: later wins, then smaller host name
        let x = c1.apply(&Change::Unprotect { name: "g".into() }, "a", 20).unwrap();
        let y = c1
            .apply(
                &Change::Moved {
                    name: "g".into(),
                    host: "b".into(),
                },
                "b",
                30,
            )
            .unwrap();
        assert!(y.newer_than(&x) && !x.newer_than(&y));
        let y2 = c1
            .apply(
                &Change::Moved {
                    name: "g".into(),
                    host: "b".into(),
                },
                "b",
                20,
            )
            .unwrap();
        assert!(x.newer_than(&y2) && !y2.newer_than(&x));
    }

    #[test]
    fn save_and_load_round_trip_and_bad_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("eac-pool-ut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(PoolConfig::load(&dir).unwrap().is_none());
        let c = PoolConfig::initial(hosts(), "a")
            .apply(&Change::Protect(guest("g", Level::L1)), "a", 1)
            .unwrap();
        c.save(&dir).unwrap();
        assert_eq!(PoolConfig::load(&dir).unwrap(), Some(c.clone()));
        std::fs::write(dir.join(FILE_NAME), b"{ not json").unwrap();
        let e = PoolConfig::load(&dir).unwrap_err();
        assert!(e.to_string().contains("is invalid"), "{e}");
        let mut bad = c.clone();
        bad.guests.get_mut("g").unwrap().home = "z".into();
        std::fs::write(dir.join(FILE_NAME), serde_json::to_vec(&bad).unwrap()).unwrap();
        let e = PoolConfig::load(&dir).unwrap_err();
        assert!(e.to_string().contains("not a host of the pool"), "{e}");
        let level3 = serde_json::to_string(&c)
            .unwrap()
            .replace("\"level\": 1", "\"level\":3")
            .replace("\"level\":1", "\"level\":3");
        std::fs::write(dir.join(FILE_NAME), level3).unwrap();
        let e = PoolConfig::load(&dir).unwrap_err();
        assert!(e.to_string().contains("level 3 does not exist"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resources_from_domain_xml() {
        assert_eq!(
            xml_resources("<domain><memory unit='MiB'>160</memory><vcpu>1</vcpu></domain>"),
            Some((160, 1))
        );
        assert_eq!(
            xml_resources("<domain><memory unit=\"KiB\">524288</memory><vcpu placement='static'>2</vcpu></domain>"),
            Some((512, 2))
        );
        assert_eq!(
            xml_resources("<domain><memory>1048576</memory><vcpu>4</vcpu></domain>"),
            Some((1024, 4))
        );
        assert_eq!(
            xml_resources("<domain><memory unit='GiB'>2</memory><vcpu>1</vcpu></domain>"),
            Some((2048, 1))
        );
        assert_eq!(xml_resources("<domain/>"), None);
        assert_eq!(
            xml_resources("<domain><memory unit='parsec'>1</memory><vcpu>1</vcpu></domain>"),
            None
        );
        assert_eq!(xml_uuid("<domain><uuid> abc </uuid></domain>"), Some("abc"));
    }

    #[test]
    fn names() {
        assert!(valid_name("web-1.prod_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
