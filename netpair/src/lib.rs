//! netpair — the network half of Level 2: a protected guest keeps its clients through the
//! failure of its host's NIC, cable, switch port or upstream path.
//!
//! - [`datapath`]: the eBPF programs on the application NIC, the availability links and the
//!   guest ports; per-guest counters and steering through the partner's NIC.
//! - [`decide`] and [`links`]: the sans-I/O decisions (steer a guest through the partner;
//!   which availability link works and carries steered frames), driven by [`daemon`].
//! - [`xdp`]: loading the eBPF object; the plain frame counter used by the lab smoke test.

pub mod config;
pub mod control;
pub mod daemon;
pub mod damping;
pub mod datapath;
pub mod decide;
pub mod link;
pub mod links;
pub mod packet;
pub mod proto;
pub mod stall;
pub mod xdp;

pub use datapath::{AppAttach, AppMode, Datapath, Role};
pub use xdp::{CountProgram, Error};

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Config(format!("{s:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: Mac = "52:54:00:fb:01:0a".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xfb, 1, 0x0a]);
        assert_eq!(m.to_string(), "52:54:00:fb:01:0a");
        for bad in [
            "",
            "52:54:00:fb:01",
            "52:54:00:fb:01:0a:00",
            "zz:54:00:fb:01:0a",
            "5:54:00:fb:01:0a0",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?} accepted");
        }
    }
}
