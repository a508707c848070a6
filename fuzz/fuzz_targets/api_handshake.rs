//! The controller API's TCP handshake frames. Arbitrary bytes as the client's answer to a
//! fixed challenge (`api::check_client_proof`) and as a response line a client decodes
//! (`api::Response`); then a valid answer built around a fuzzer-chosen client nonce (the proof
//! computed here from the documented formula) must be accepted with the documented server
//! proof, and the same answer with one proof bit flipped refused.
#![no_main]
use eac_controller::api::{Response, check_client_proof};
use eac_fuzz::SECRET;
use hmac::{KeyInit, Mac};
use libfuzzer_sys::fuzz_target;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const SERVER_NONCE: [u8; 32] = [0x5a; 32];

fn proof(label: &[u8], client: &[u8; 32]) -> [u8; 32] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(SECRET).unwrap();
    m.update(label);
    m.update(&SERVER_NONCE);
    m.update(client);
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let _ = check_client_proof(SECRET, &SERVER_NONCE, data);
    let _ = serde_json::from_slice::<Response>(data);

    let Some(client) = data.first_chunk::<32>() else {
        return;
    };
    let p = proof(b"eac-api-v1", client);
    let answer = serde_json::json!({"v": 1, "client_nonce": hex(client), "proof": hex(&p)}).to_string();
    let r = check_client_proof(SECRET, &SERVER_NONCE, answer.as_bytes());
    if *client == SERVER_NONCE {
        assert!(r.is_err(), "a reflected challenge was accepted");
        return;
    }
    assert_eq!(r, Ok(proof(b"eac-api-v1 server", client)));
    let bit = data.get(32).copied().unwrap_or(0);
    let mut bad = p;
    bad[usize::from(bit / 8) % 32] ^= 1 << (bit % 8);
    let answer = serde_json::json!({"v": 1, "client_nonce": hex(client), "proof": hex(&bad)}).to_string();
    assert!(check_client_proof(SECRET, &SERVER_NONCE, answer.as_bytes()).is_err());
});
