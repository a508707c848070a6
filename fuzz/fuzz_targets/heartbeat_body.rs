//! Past the MAC: the fuzzer's bytes are the body of a heartbeat sealed with the pool secret
//! (session and seq from the first 16 bytes), so the body decoder and every check after the
//! authentication run on arbitrary bodies. An accepted body must re-encode to the same bytes
//! (the encoding is canonical) and the re-sealed heartbeat must open to the same value.
#![no_main]
use eac_common::sealed;
use eac_controller::heartbeat::{MAGIC, MAX_DATAGRAM, Sealer, VERSION};
use eac_fuzz::{NETWORK, SECRET, heartbeat_opener, mac, peer_addr, sealed_body, split_sealed_input};
use libfuzzer_sys::fuzz_target;

const ENV: sealed::Envelope = sealed::Envelope {
    magic: MAGIC,
    version: VERSION,
};

fuzz_target!(|data: &[u8]| {
    let (session, seq, body) = split_sealed_input(data, MAX_DATAGRAM - sealed::HEADER_LEN - sealed::MAC_LEN);
    let d = sealed::seal(ENV, &mac(), session, seq, body);
    let Ok(hb) = heartbeat_opener().open(peer_addr(), &d) else {
        return;
    };
    assert_eq!(hb.seq, seq);
    let mut sealer = Sealer::with_session(SECRET, &hb.host, NETWORK, session).expect("an accepted host name seals");
    let (again, seq1) = sealer.seal(&hb).expect("an accepted heartbeat seals");
    assert_eq!(seq1, 1);
    assert_eq!(sealed_body(&again), body, "the body encoding is not canonical");
    let back = heartbeat_opener()
        .open(peer_addr(), &again)
        .expect("a re-sealed heartbeat opens");
    assert_eq!(back, eac_controller::heartbeat::Heartbeat { seq: 1, ..hb });
});
