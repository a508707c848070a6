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
