//! netpair's pairing datagram decoder (`proto::Opener::open`) on arbitrary bytes: must refuse
//! or accept, never panic.
#![no_main]
use eac_fuzz::{pairing_opener, peer_addr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut opener = pairing_opener();
    if let Ok(m) = opener.open(peer_addr(), data) {
        assert_ne!(m.host, eac_fuzz::LOCAL);
        assert!(opener.open(peer_addr(), data).is_err(), "a replay was accepted");
    }
});
