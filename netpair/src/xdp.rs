//! Loading and attaching the XDP programs built from `ebpf/`, and reading their maps.

use aya::{
    Ebpf,
    maps::PerCpuHashMap,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use ebpf_common::{Counters, MAP_IFACE_RX, PROG_XDP_COUNT};

/// The eBPF object built by build.rs, embedded in the binary.
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/eac-ebpf"));

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no interface named {0:?} in this network namespace")]
    NoSuchInterface(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad configuration: {0}")]
    Config(String),
    /// The daemon refused a control request (nothing was changed).
    #[error("refused ({code}): {message}")]
    Refused { code: String, message: String },
}

/// `xdp_count` attached to one interface: counts every frame it receives.
/// Detaches when dropped.
pub struct CountProgram {
    ebpf: Ebpf,
    iface: String,
    ifindex: u32,
    _link: XdpLinkId,
}

impl CountProgram {
    /// Loads the object and attaches `xdp_count` to `iface` in the calling thread's network
    /// namespace, in driver mode when the driver supports it (veth does), else generic mode.
    pub fn attach(iface: &str) -> Result<Self, Error> {
        let ifindex = ifindex(iface)?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(Error::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP_COUNT)
            .ok_or(Error::MissingProgram(PROG_XDP_COUNT))?
            .try_into()
            .map_err(|source| Error::Program {
                name: PROG_XDP_COUNT,
                source,
            })?;
        prog.load().map_err(|source| Error::Program {
            name: PROG_XDP_COUNT,
            source,
        })?;
        let link = match prog.attach(iface, XdpMode::Driver) {
            Ok(link) => link,
            Err(e) => {
                tracing::info!(iface, error = %e, "driver-mode XDP refused; using generic mode");
                prog.attach(iface, XdpMode::Skb).map_err(|source| Error::Program {
                    name: PROG_XDP_COUNT,
                    source,
                })?
            }
        };
        tracing::info!(iface, ifindex, "attached {PROG_XDP_COUNT}");
        Ok(Self {
            ebpf,
            iface: iface.to_owned(),
            ifindex,
            _link: link,
        })
    }

    /// Frames and bytes received on the interface since the program was attached.
    pub fn received(&self) -> Result<Counters, Error> {
        let map = self.ebpf.map(MAP_IFACE_RX).ok_or(Error::MissingMap(MAP_IFACE_RX))?;
        let map: PerCpuHashMap<_, u32, Counters> = PerCpuHashMap::try_from(map).map_err(|source| Error::Map {
            name: MAP_IFACE_RX,
            source,
        })?;
        match map.get(&self.ifindex, 0) {
            Ok(per_cpu) => Ok(Counters::sum(per_cpu.iter())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(Counters::default()),
            Err(source) => Err(Error::Map {
                name: MAP_IFACE_RX,
                source,
            }),
        }
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }
}

pub(crate) fn ifindex(name: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(name).map_err(|_| Error::NoSuchInterface(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::NoSuchInterface(name.to_owned()));
    }
    Ok(idx)
}

/// The driver behind an interface, from the ethtool driver-info ioctl (SIOCETHTOOL,
/// ETHTOOL_GDRVINFO) in the calling thread's network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverInfo {
    /// "veth", "virtio_net", "ixgbe", …
    pub driver: String,
    /// The bus address ("0000:03:00.0"); empty for a virtual device (veth, tap, bridge).
    pub bus_info: String,
}

impl DriverInfo {
    /// A device backed by hardware (or a paravirtual NIC) on a bus, not a kernel-made
    /// virtual device.
    pub fn on_a_bus(&self) -> bool {
        !self.bus_info.is_empty() && !matches!(self.driver.as_str(), "veth" | "tun" | "bridge" | "bonding")
    }
}

pub fn driver_info(iface: &str) -> Result<DriverInfo, Error> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(Error::NoSuchInterface(iface.to_owned()));
    }
    let io = |what: &str, source| Error::Io {
        what: format!("{what} ({iface})"),
        source,
    };
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| io("socket for the ethtool ioctl", e))?;
    // SAFETY: DrvInfo is plain old data; all-zero is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: `req` is a live ifreq with a NUL-terminated name and `data` pointing at `info`,
    // a live ethtool_drvinfo the kernel fills in; both outlive the call; the fd is open.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), SIOCETHTOOL, &mut req) };
    if r != 0 {
        return Err(io("ethtool driver info", std::io::Error::last_os_error()));
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok(DriverInfo {
        driver: text(&info.driver),
        bus_info: text(&info.bus_info),
    })
}
