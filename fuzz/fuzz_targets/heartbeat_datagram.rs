//! The controller's heartbeat datagram decoder (`heartbeat::Opener::open`) on arbitrary bytes
//! from the configured peer's address: must refuse or accept, never panic.
#![no_main]
use eac_fuzz::{heartbeat_opener, peer_addr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut opener = heartbeat_opener();
    if let Ok(hb) = opener.open(peer_addr(), data) {
        // Only a forgery with the fixed secret gets here (the seeds are such datagrams).
        assert_eq!(hb.host, eac_fuzz::PEER);
        assert_eq!(hb.network, eac_fuzz::NETWORK);
        // The same datagram again is a replay.
        assert!(opener.open(peer_addr(), data).is_err());
    }
});
