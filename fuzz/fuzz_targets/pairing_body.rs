//! Past the MAC: the fuzzer's bytes are the body of a pairing datagram sealed with the pool
//! secret (session and seq from the first 16 bytes). An accepted message must re-encode to
//! the same body bytes and the re-sealed datagram must open to the same message.
#![no_main]
use eac_common::sealed;
use eac_fuzz::{SECRET, mac, pairing_opener, peer_addr, sealed_body, split_sealed_input};
use libfuzzer_sys::fuzz_target;
use netpair::proto::{MAGIC, MAX_BODY, PROTO_VERSION, Sealer};

const ENV: sealed::Envelope = sealed::Envelope {
    magic: MAGIC,
    version: PROTO_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let (session, seq, body) = split_sealed_input(data, MAX_BODY);
    let d = sealed::seal(ENV, &mac(), session, seq, body);
    let Ok(m) = pairing_opener().open(peer_addr(), &d) else {
        return;
    };
    let mut sealer = Sealer::with_session(SECRET, &m.host, session).expect("an accepted host name seals");
    let again = sealer.seal_at(m.sent_mono_ns, m.body.clone());
    assert_eq!(sealed_body(&again), body, "the body encoding is not canonical");
    let back = pairing_opener()
        .open(peer_addr(), &again)
        .expect("a re-sealed message opens");
    assert_eq!(back, m);
});
