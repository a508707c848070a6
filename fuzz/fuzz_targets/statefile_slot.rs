//! The controller's state-file slot decoder (`statefile::decode_slot`). The first byte picks
//! the mode: even — the rest is the slot as read (any length: wrong sizes, zeros, garbage);
//! odd — the rest is the slot's first 4064 bytes (header and body), zero-padded, with a valid
//! checksum, so the record decoder behind the checksum runs. An accepted slot must re-encode
//! (`statefile::encode_slot`) to the same 4096 bytes.
#![no_main]
use eac_controller::statefile::{SLOT_SIZE, decode_slot, encode_slot};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const SUM_AT: usize = SLOT_SIZE - 32;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let slot: Vec<u8> = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut s = vec![0u8; SLOT_SIZE];
        let n = rest.len().min(SUM_AT);
        s[..n].copy_from_slice(&rest[..n]);
        let sum = Sha256::digest(&s[..SUM_AT]);
        s[SUM_AT..].copy_from_slice(&sum);
        s
    };
    let Ok(record) = decode_slot(1, eac_fuzz::PEER, &slot) else {
        return;
    };
    assert_eq!(record.host, eac_fuzz::PEER);
    let mut again = vec![0u8; SLOT_SIZE];
    let (_, kept) = encode_slot(&record, &mut again).expect("an accepted record encodes");
    assert_eq!(kept, record.guests.len(), "an accepted record fits its slot");
    assert!(again == slot, "the slot encoding is not canonical");
});
