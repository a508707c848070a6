//! The netpair data path: the eBPF programs on one host's application NIC, availability
//! links and guest ports, and the maps userspace drives them through.
//!
//! Attachments are BPF links (TCX for TC programs on kernels ≥ 6.6, driver or generic XDP),
//! pinned under `<pin_dir>/links/` beside the maps (`Config::pin_dir`,
//! `/sys/fs/bpf/eac/netpair` by default: `/sys/fs/bpf/eac/netpair/GUEST_STATS`). Pinned,
//! they outlive the process: a daemon that is killed (or crashes) leaves its programs
//! running on the last map state — a guest steered or lent stays so — and the next daemon
//! **adopts** them: it reuses the pinned maps, loads its programs and swaps each into the
//! pinned link atomically (`bpf_link_update`), so no frame meets a missing program. A
//! clean stop (dropping [`Datapath`]) unpins everything and so detaches it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use ebpf_common::{
    CFG_AL_IFINDEX, CFG_APP_IFINDEX, CFG_COUNT_IN_TC, CFG_PARTNER_STEERING, GuestEntry, GuestStats, MAP_CONFIG,
    MAP_GUEST_STATS, MAP_GUESTS, MAP_STEERED_PORTS, MacKey, PROG_TC_AL_INGRESS, PROG_TC_APP_EGRESS,
    PROG_TC_APP_INGRESS, PROG_TC_GUEST_INGRESS, PROG_XDP_APP, ROLE_LOCAL, ROLE_PARTNER, STEERED_PORTS_MAX,
};

use crate::{Error, Mac, xdp::ifindex};

/// Where a protected guest runs, seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The guest runs here, plugged into our bridge through `port`.
    Local,
    /// The guest runs on the partner; we lend it our application NIC when its path fails.
    Partner,
}

/// How the application NIC's frames are counted (and loops dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppMode {
    /// Native XDP on a NIC on a bus whose driver takes it; TC otherwise (veth, tap, a driver
    /// without XDP). Generic XDP is never chosen automatically.
    #[default]
    Auto,
    /// XDP: driver mode, else generic mode.
    Xdp,
    /// TC only.
    Tc,
}

/// The attach mode in effect (`status`: `app.attach`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AppAttach {
    /// "xdp-driver", "xdp-generic", "xdp-adopted" (the previous daemon's XDP link) or "tc".
    pub mode: &'static str,
    /// "auto" or "config" (`app_xdp` set).
    pub chosen: &'static str,
    pub why: String,
}

/// Maps pinned under the pin directory for bpftool, removed again on drop.
const PINNED_MAPS: [&str; 4] = [MAP_GUESTS, MAP_GUEST_STATS, MAP_CONFIG, MAP_STEERED_PORTS];

/// One host's data path.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    al_ifindexes: Vec<(String, u32)>,
    /// Every attachment, by its pin name under `<pin_dir>/links/`.
    links: HashMap<String, FdLink>,
    /// Local guests' ports (their attachment is `links["guest-<port>"]`).
    guest_ports: HashMap<Mac, String>,
    /// Guests protected by this daemon.
    claimed: std::collections::HashSet<Mac>,
    /// Taken over from a daemon that did not stop cleanly (see the module doc).
    adopted: Option<Adopted>,
    app_attach: AppAttach,
}

/// What a new daemon found left running by the previous one.
#[derive(Clone, Debug, Default)]
pub struct Adopted {
    /// Attachments whose program was swapped in place.
    pub links: usize,
    /// Guest entries found in the pinned `GUESTS` map (steering flags included).
    pub guests: HashMap<Mac, GuestEntry>,
}

impl Datapath {
    /// With `xdp` false, no XDP program is attached and the TC ingress program counts and
    /// drops loops instead (see `Config::app_xdp` for when that is better).
    ///
    /// Loads the programs, pins the maps under `pin_dir` (created if needed; stale pins are
    /// replaced; removed again on drop), and attaches: XDP + TC ingress + TC egress on `app_iface`, TC ingress
    /// on every availability link. The first AL carries steered frames until
    /// [`Datapath::use_al`] says otherwise.
    pub fn attach(pin_dir: &Path, app_iface: &str, al_ifaces: &[&str], xdp: bool) -> Result<Self, Error> {
        let mode = if xdp { AppMode::Xdp } else { AppMode::Tc };
        Self::attach_mode(pin_dir, app_iface, al_ifaces, mode)
    }

    /// [`Datapath::attach`] with the application NIC's attach mode chosen by `mode`
    /// ([`AppMode::Auto`]: native XDP on a NIC on a bus whose driver takes it, TC otherwise);
    /// [`Datapath::app_attach`] says what was chosen and why.
    pub fn attach_mode(pin_dir: &Path, app_iface: &str, al_ifaces: &[&str], mode: AppMode) -> Result<Self, Error> {
        std::fs::create_dir_all(pin_dir).map_err(|source| Error::Io {
            what: format!("create {}", pin_dir.display()),
            source,
        })?;
        let app_ifindex = ifindex(app_iface)?;
        let al_ifindexes = al_ifaces
            .iter()
            .map(|n| Ok(((*n).to_owned(), ifindex(n)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        // Maps pinned by a daemon that did not stop cleanly are reused (their state — which
        // guest is steered — is what its programs still act on); otherwise created and pinned.
        let adopting = pin_dir.join(MAP_GUESTS).exists();
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| Error::Io {
            what: format!("create {}", links_dir.display()),
            source,
        })?;
        let load = || {
            let mut loader = EbpfLoader::new();
            let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|n| (*n, pin_dir.join(n))).collect();
            for (name, path) in &paths {
                loader.map_pin_path(name, path.as_path());
            }
            loader.load(crate::xdp::EBPF_OBJECT)
        };
        let ebpf = match load() {
            Ok(e) => e,
            Err(e) if adopting => {
                // Left by another build (another map layout): start afresh.
                tracing::warn!(error = %e, "the pinned maps cannot be reused; replacing them (steering restarts)");
                for name in PINNED_MAPS {
                    let _ = std::fs::remove_file(pin_dir.join(name));
                }
                load().map_err(Error::Load)?
            }
            Err(e) => return Err(Error::Load(e)),
        };
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            al_ifindexes,
            links: HashMap::new(),
            guest_ports: HashMap::new(),
            claimed: std::collections::HashSet::new(),
            adopted: None,
            app_attach: AppAttach::default(),
        };
        if adopting {
            let guests = dp
                .guests_map()?
                .iter()
                .filter_map(Result::ok)
                .map(|(k, e)| (Mac(k.addr), e))
                .collect();
            dp.adopted = Some(Adopted { links: 0, guests });
        }

        // What the application NIC gets: XDP (driver, else generic mode) or TC only.
        let (try_xdp, generic_ok, why) = match mode {
            AppMode::Xdp => (true, true, "app_xdp = true in the configuration".to_owned()),
            AppMode::Tc => (false, false, "app_xdp = false in the configuration".to_owned()),
            AppMode::Auto => match crate::xdp::driver_info(app_iface) {
                Ok(d) if d.on_a_bus() => (true, false, format!("driver {} on bus {}", d.driver, d.bus_info)),
                Ok(d) => (
                    false,
                    false,
                    format!(
                        "virtual device (driver {}): XDP there would cost segmentation of GSO packets",
                        if d.driver.is_empty() { "?" } else { &d.driver }
                    ),
                ),
                Err(e) => (false, false, format!("driver unknown ({e})")),
            },
        };
        let mut xdp = false;
        let mut active = AppAttach {
            mode: "tc",
            chosen: if mode == AppMode::Auto { "auto" } else { "config" },
            why,
        };
        if try_xdp {
            let prog: &mut Xdp = program(&mut dp.ebpf, PROG_XDP_APP)?;
            prog.load().map_err(|source| Error::Program {
                name: PROG_XDP_APP,
                source,
            })?;
            let pin = format!("xdp-{app_iface}");
            let path = links_dir.join(&pin);
            let adopted = adopt::<XdpLink>(&path).and_then(|l| match prog.attach_to_link(l) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(link = pin, error = %e, "cannot swap our program into the pinned link; attaching anew");
                    None
                }
            });
            let was_adopted = adopted.is_some();
            if was_adopted {
                active.mode = "xdp-adopted";
            }
            let id = match adopted {
                Some(id) => Some(id),
                None => {
                    let _ = std::fs::remove_file(&path);
                    match prog.attach(app_iface, XdpMode::Driver) {
                        Ok(id) => {
                            active.mode = "xdp-driver";
                            Some(id)
                        }
                        Err(e) if generic_ok => {
                            tracing::info!(app_iface, error = %e, "driver-mode XDP refused; using generic mode");
                            active.mode = "xdp-generic";
                            Some(prog.attach(app_iface, XdpMode::Skb).map_err(|source| Error::Program {
                                name: PROG_XDP_APP,
                                source,
                            })?)
                        }
                        Err(e) => {
                            tracing::info!(app_iface, error = %e, "driver-mode XDP refused; counting in TC");
                            active.why = format!("{}; driver-mode XDP refused: {e}", active.why);
                            None
                        }
                    }
                }
            };
            if let Some(id) = id {
                let link = prog.take_link(id).map_err(|source| Error::Program {
                    name: PROG_XDP_APP,
                    source,
                })?;
                let fd = FdLink::try_from(link).map_err(|e| Error::Io {
                    what: format!("XDP on {app_iface} is not a BPF link (kernel too old to keep it across restarts)"),
                    source: std::io::Error::other(e.to_string()),
                })?;
                dp.keep_link(pin, fd, was_adopted)?;
                xdp = true;
            }
        }
        if !xdp {
            // An XDP link pinned by a daemon that ran in XDP mode: unpinned, it detaches.
            let _ = std::fs::remove_file(links_dir.join(format!("xdp-{app_iface}")));
        }
        dp.app_attach = active;
        for name in [
            PROG_TC_APP_INGRESS,
            PROG_TC_APP_EGRESS,
            PROG_TC_AL_INGRESS,
            PROG_TC_GUEST_INGRESS,
        ] {
            let p: &mut SchedClassifier = program(&mut dp.ebpf, name)?;
            p.load().map_err(|source| Error::Program { name, source })?;
        }
        // The configuration first: an adopted program sees it from its first frame.
        dp.set_config(CFG_APP_IFINDEX, app_ifindex)?;
        dp.set_config(CFG_COUNT_IN_TC, u32::from(!xdp))?;
        let kept_al = dp
            .config(CFG_AL_IFINDEX)
            .filter(|i| dp.al_ifindexes.iter().any(|(_, a)| a == i));
        match kept_al {
            // Adopted: steered frames keep their link until the new daemon judges the links.
            Some(_) if dp.adopted.is_some() => {}
            _ => {
                let first_al = dp.al_ifindexes.first().map(|(_, i)| *i).unwrap_or(0);
                dp.set_config(CFG_AL_IFINDEX, first_al)?;
            }
        }
        dp.attach_tc(
            PROG_TC_APP_INGRESS,
            app_iface,
            TcAttachType::Ingress,
            format!("tc-in-{app_iface}"),
        )?;
        dp.attach_tc(
            PROG_TC_APP_EGRESS,
            app_iface,
            TcAttachType::Egress,
            format!("tc-out-{app_iface}"),
        )?;
        for al in al_ifaces {
            dp.attach_tc(PROG_TC_AL_INGRESS, al, TcAttachType::Ingress, format!("tc-in-{al}"))?;
        }
        tracing::info!(app_iface, ?al_ifaces, mode = dp.app_attach.mode, why = dp.app_attach.why, pin_dir = %pin_dir.display(), adopted = ?dp.adopted.as_ref().map(|a| a.links), "netpair data path attached");
        Ok(dp)
    }

    /// How the application NIC is attached, and why.
    pub fn app_attach(&self) -> &AppAttach {
        &self.app_attach
    }

    /// What was taken over from a previous daemon (None: a fresh start).
    pub fn adopted(&self) -> Option<&Adopted> {
        self.adopted.as_ref()
    }

    /// Ends the adoption once every configured guest is added: attachments and guest
    /// entries the previous daemon left that nobody claimed are removed (detached).
    /// Returns what was removed, one name each.
    pub fn release_unclaimed(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.pin_dir.join("links")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !self.links.contains_key(&name) && std::fs::remove_file(e.path()).is_ok() {
                    gone.push(format!("link {name}"));
                }
            }
        }
        if let Some(a) = self.adopted.take() {
            for mac in a.guests.keys() {
                if !self.claimed.contains(mac) {
                    let key = MacKey::new(mac.0);
                    if let Ok(mut m) = self.guests_map_mut() {
                        let _ = m.remove(&key);
                    }
                    if let Ok(mut m) = self.stats_map_mut() {
                        let _ = m.remove(&key);
                    }
                    gone.push(format!("guest {mac}"));
                }
            }
            self.adopted = Some(Adopted {
                guests: HashMap::new(),
                ..a
            });
        }
        let _ = self.refresh_steering_tables();
        gone
    }

    /// Attaches TC program `prog` to `iface` (or swaps it into the link a previous daemon
    /// pinned as `pin`), and pins the link.
    fn attach_tc(&mut self, prog: &'static str, iface: &str, at: TcAttachType, pin: String) -> Result<(), Error> {
        let path = self.pin_dir.join("links").join(&pin);
        let p: &mut SchedClassifier = program(&mut self.ebpf, prog)?;
        let adopted = adopt::<SchedClassifierLink>(&path).and_then(|l| match p.attach_to_link(l) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(link = pin, error = %e, "cannot swap our program into the pinned link; attaching anew");
                None
            }
        });
        let was_adopted = adopted.is_some();
        let id = match adopted {
            Some(id) => id,
            None => {
                let _ = std::fs::remove_file(&path);
                p.attach(iface, at)
                    .map_err(|source| Error::Program { name: prog, source })?
            }
        };
        let link = p
            .take_link(id)
            .map_err(|source| Error::Program { name: prog, source })?;
        let fd = FdLink::try_from(link).map_err(|e| Error::Io {
            what: format!("{prog} on {iface} is not a BPF link (TCX needs kernel 6.6)"),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.keep_link(pin, fd, was_adopted)
    }

    /// Keeps `fd` as attachment `pin`, pinning it unless it was adopted (already pinned).
    fn keep_link(&mut self, pin: String, fd: FdLink, adopted: bool) -> Result<(), Error> {
        let fd = if adopted {
            if let Some(a) = &mut self.adopted {
                a.links += 1;
            }
            fd
        } else {
            let path = self.pin_dir.join("links").join(&pin);
            FdLink::from(fd.pin(&path).map_err(|e| Error::Io {
                what: format!("pin link {}", path.display()),
                source: std::io::Error::other(e.to_string()),
            })?)
        };
        self.links.insert(pin, fd);
        Ok(())
    }

    /// Detaches attachment `pin` (unpins it and closes our handle).
    fn drop_link(&mut self, pin: &str) {
        let _ = std::fs::remove_file(self.pin_dir.join("links").join(pin));
        self.links.remove(pin);
    }

    /// The directory holding the pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Protects a guest: counts its frames, and (LOCAL) watches its port so its frames can
    /// be steered. `port` is required for [`Role::Local`]. Map updates and one program
    /// attachment on the guest's own port: other guests are not touched. On error nothing
    /// is left behind.
    ///
    /// Returns whether the guest is steered: only a guest adopted from a previous daemon
    /// (same role and port) can be, keeping the flag its programs act on.
    pub fn add_guest(&mut self, mac: Mac, role: Role, port: Option<&str>) -> Result<bool, Error> {
        let guest_ifindex = match (role, port) {
            (Role::Local, Some(p)) => ifindex(p)?,
            (Role::Local, None) => return Err(Error::Config(format!("local guest {mac} needs its port"))),
            (Role::Partner, _) => 0,
        };
        let entry = GuestEntry {
            role: if role == Role::Local { ROLE_LOCAL } else { ROLE_PARTNER },
            steer: 0,
            guest_ifindex,
            _pad: 0,
        };
        let key = MacKey::new(mac.0);
        // Left by the previous daemon with the same role and port: keep its steering flag
        // and counters (its programs act on them now).
        let kept = self
            .adopted
            .as_mut()
            .and_then(|a| a.guests.remove(&mac))
            .filter(|e| e.role == entry.role && e.guest_ifindex == entry.guest_ifindex);
        if let Some(k) = kept {
            if let (Role::Local, Some(p)) = (role, port) {
                self.attach_tc(PROG_TC_GUEST_INGRESS, p, TcAttachType::Ingress, format!("guest-{p}"))?;
                self.guest_ports.insert(mac, p.to_owned());
            }
            self.claimed.insert(mac);
            tracing::info!(%mac, ?role, port, steer = k.steer, "guest protected (adopted from the previous daemon)");
            return Ok(k.steer != 0);
        }
        let cpus = nr_cpus().map_err(|(what, source)| Error::Io {
            what: what.to_owned(),
            source,
        })?;
        let zero = PerCpuValues::try_from(vec![GuestStats::default(); cpus]).map_err(|source| Error::Io {
            what: "per-CPU values".into(),
            source,
        })?;
        self.stats_map_mut()?
            .insert(key, zero, 0)
            .map_err(|source| Error::Map {
                name: MAP_GUEST_STATS,
                source,
            })?;
        self.guests_map_mut()?
            .insert(key, entry, 0)
            .map_err(|source| Error::Map {
                name: MAP_GUESTS,
                source,
            })?;
        if let (Role::Local, Some(p)) = (role, port) {
            match self.attach_tc(PROG_TC_GUEST_INGRESS, p, TcAttachType::Ingress, format!("guest-{p}")) {
                Ok(()) => {
                    self.guest_ports.insert(mac, p.to_owned());
                }
                Err(e) => {
                    // Nothing half-done: the guest is not protected at all.
                    let _ = self.guests_map_mut()?.remove(&key);
                    let _ = self.stats_map_mut()?.remove(&key);
                    return Err(e);
                }
            }
        }
        self.claimed.insert(mac);
        tracing::info!(%mac, ?role, port, "guest protected");
        Ok(false)
    }

    /// Stops protecting a guest (steering off, counters removed, port program detached).
    pub fn remove_guest(&mut self, mac: Mac) -> Result<(), Error> {
        let _ = self.set_steer(mac, false);
        let key = MacKey::new(mac.0);
        let _ = self.guests_map_mut()?.remove(&key);
        let _ = self.stats_map_mut()?.remove(&key);
        self.claimed.remove(&mac);
        if let Some(port) = self.guest_ports.remove(&mac) {
            self.drop_link(&format!("guest-{port}"));
        }
        Ok(())
    }

    /// Turns steering of one guest through the partner's NIC on or off.
    pub fn set_steer(&mut self, mac: Mac, on: bool) -> Result<(), Error> {
        let key = MacKey::new(mac.0);
        let mut entry = self.guests_map()?.get(&key, 0).map_err(|source| Error::Map {
            name: MAP_GUESTS,
            source,
        })?;
        entry.steer = u32::from(on);
        self.guests_map_mut()?
            .insert(key, entry, 0)
            .map_err(|source| Error::Map {
                name: MAP_GUESTS,
                source,
            })?;
        self.refresh_steering_tables()
    }

    /// Makes `al_iface` the availability link steered frames take.
    pub fn use_al(&mut self, al_iface: &str) -> Result<(), Error> {
        let idx = self
            .al_ifindexes
            .iter()
            .find(|(n, _)| n == al_iface)
            .map(|(_, i)| *i)
            .ok_or_else(|| Error::Config(format!("{al_iface} is not an availability link of this data path")))?;
        self.set_config(CFG_AL_IFINDEX, idx)
    }

    /// Every protected guest with its steering state and counters.
    pub fn guests(&self) -> Result<Vec<(Mac, GuestEntry, GuestStats)>, Error> {
        let guests = self.guests_map()?;
        let stats = self.stats_map()?;
        let mut out = Vec::new();
        for item in guests.iter() {
            let (key, entry) = item.map_err(|source| Error::Map {
                name: MAP_GUESTS,
                source,
            })?;
            let s = stats
                .get(&key, 0)
                .map(|v| GuestStats::sum(v.iter()))
                .unwrap_or_default();
            out.push((Mac(key.addr), entry, s));
        }
        Ok(out)
    }

    /// Counters of one guest (summed over CPUs).
    pub fn stats(&self, mac: Mac) -> Result<GuestStats, Error> {
        let v = self
            .stats_map()?
            .get(&MacKey::new(mac.0), 0)
            .map_err(|source| Error::Map {
                name: MAP_GUEST_STATS,
                source,
            })?;
        Ok(GuestStats::sum(v.iter()))
    }

    /// Recomputes STEERED_PORTS (local steered guests' ports) and CFG_PARTNER_STEERING.
    fn refresh_steering_tables(&mut self) -> Result<(), Error> {
        let guests = self.guests()?;
        let ports: Vec<u32> = guests
            .iter()
            .filter(|(_, e, _)| e.role == ROLE_LOCAL && e.steer == 1)
            .map(|(_, e, _)| e.guest_ifindex)
            .collect();
        if ports.len() > STEERED_PORTS_MAX as usize {
            tracing::warn!(
                n = ports.len(),
                max = STEERED_PORTS_MAX,
                "more steered guests than broadcast slots"
            );
        }
        let partner = guests.iter().any(|(_, e, _)| e.role == ROLE_PARTNER && e.steer == 1);
        let mut slots: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, MAP_STEERED_PORTS)?;
        for i in 0..STEERED_PORTS_MAX {
            let v = ports.get(i as usize).copied().unwrap_or(0);
            slots.set(i, v, 0).map_err(|source| Error::Map {
                name: MAP_STEERED_PORTS,
                source,
            })?;
        }
        self.set_config(CFG_PARTNER_STEERING, u32::from(partner))
    }

    fn config(&self, index: u32) -> Option<u32> {
        let m = self.ebpf.map(MAP_CONFIG)?;
        let cfg: Array<&MapData, u32> = Array::try_from(m).ok()?;
        cfg.get(&index, 0).ok()
    }

    fn set_config(&mut self, index: u32, value: u32) -> Result<(), Error> {
        let mut cfg: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, MAP_CONFIG)?;
        cfg.set(index, value, 0).map_err(|source| Error::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    fn guests_map(&self) -> Result<BpfHashMap<&MapData, MacKey, GuestEntry>, Error> {
        let m = self.ebpf.map(MAP_GUESTS).ok_or(Error::MissingMap(MAP_GUESTS))?;
        BpfHashMap::try_from(m).map_err(|source| Error::Map {
            name: MAP_GUESTS,
            source,
        })
    }
    fn guests_map_mut(&mut self) -> Result<BpfHashMap<&mut MapData, MacKey, GuestEntry>, Error> {
        map_mut(&mut self.ebpf, MAP_GUESTS)
    }
    fn stats_map(&self) -> Result<PerCpuHashMap<&MapData, MacKey, GuestStats>, Error> {
        let m = self
            .ebpf
            .map(MAP_GUEST_STATS)
            .ok_or(Error::MissingMap(MAP_GUEST_STATS))?;
        PerCpuHashMap::try_from(m).map_err(|source| Error::Map {
            name: MAP_GUEST_STATS,
            source,
        })
    }
    fn stats_map_mut(&mut self) -> Result<PerCpuHashMap<&mut MapData, MacKey, GuestStats>, Error> {
        map_mut(&mut self.ebpf, MAP_GUEST_STATS)
    }

    /// Runs one program once on a crafted frame with `BPF_PROG_TEST_RUN` (nothing is sent,
    /// except what `bpf_clone_redirect` transmits) and returns its verdict: an `xdp_action`
    /// for XDP programs, a `TC_ACT_*` code (as `u32`) for TC programs.
    pub fn test_run(&mut self, prog: &'static str, frame: &[u8]) -> Result<u32, Error> {
        use aya::programs::{TestRun, TestRunOptions};
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        let p = self.ebpf.program_mut(prog).ok_or(Error::MissingProgram(prog))?;
        let r = match p {
            aya::programs::Program::Xdp(x) => x.test_run(opts),
            aya::programs::Program::SchedClassifier(c) => c.test_run(opts),
            _ => return Err(Error::Config(format!("{prog} is neither XDP nor TC"))),
        };
        r.map(|r| r.return_value)
            .map_err(|source| Error::Program { name: prog, source })
    }

    /// The eBPF object, for callers that need more (aya-log).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Drop for Datapath {
    /// A clean stop: every attachment unpinned and detached, the maps unpinned.
    fn drop(&mut self) {
        for pin in self.links.keys().cloned().collect::<Vec<String>>() {
            self.drop_link(&pin);
        }
        let _ = std::fs::remove_dir(self.pin_dir.join("links"));
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(self.pin_dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
    T::try_from(m).map_err(|source| Error::Map { name, source })
}

/// The link a previous daemon pinned at `path`, if there is one of type `L`.
fn adopt<L: TryFrom<FdLink>>(path: &Path) -> Option<L> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    L::try_from(FdLink::from(pinned)).ok()
}
