//! Generates the committed seeds of the fuzz targets (see fuzz/Cargo.toml): a few valid
//! encodings per target, in each target's input layout.
use std::{fs, path::Path};

use eac_controller::{api, heartbeat, statefile};
use hmac::{KeyInit, Mac};
use ublk_mirror::{
    genid::{GenIds, Role},
    proto::{self as mp, Message as M},
};

// The fixtures of fuzz/src/lib.rs (this crate does not link libFuzzer, so it repeats them).
const SECRET: &[u8] = b"fuzz pool secret, fixed";
const PEER: &str = "b";
const NETWORK: &str = "mgmt";
const SERVER_NONCE: [u8; 32] = [0x5a; 32];

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
}

fn sealed_input(d: &[u8]) -> Vec<u8> {
    // session (8) + seq (8) + body, as split_sealed_input reads it.
    let mut v = d[8..24].to_vec();
    v.extend_from_slice(&d[24..d.len() - 32]);
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: eac-fuzz-seeds CORPUS_DIR");
    let dir = Path::new(&dir);

    // Heartbeats.
    let mut s = heartbeat::Sealer::with_session(SECRET, PEER, NETWORK, 0x1122334455667788).unwrap();
    let hbs = [
        heartbeat::Heartbeat {
            host: PEER.into(),
            incarnation: 3,
            seq: 0,
            network: NETWORK.into(),
            sees: vec!["a".into()],
            fencing: false,
            config_epoch: 7,
            api_addr: Some("10.250.0.2:7411".into()),
        },
        heartbeat::Heartbeat {
            host: PEER.into(),
            incarnation: 1,
            seq: 0,
            network: NETWORK.into(),
            sees: vec![],
            fencing: true,
            config_epoch: 0,
            api_addr: None,
        },
    ];
    for (i, hb) in hbs.iter().enumerate() {
        let (d, _) = s.seal(hb).unwrap();
        write(dir, "heartbeat_datagram", &i.to_string(), &d);
        write(dir, "heartbeat_body", &i.to_string(), &sealed_input(&d));
    }

    // State-file slots.
    let r = statefile::SlotRecord {
        host: PEER.into(),
        incarnation: 2,
        tick: 99,
        wall_ms: 1_700_000_000_000,
        fencing: false,
        guests: vec!["web".into(), "db".into()],
        guests_truncated: false,
        config_epoch: 4,
        sees: vec!["a".into()],
    };
    let mut slot = vec![0u8; statefile::SLOT_SIZE];
    let (n, _) = statefile::encode_slot(&r, &mut slot).unwrap();
    let mut raw = vec![0u8];
    raw.extend_from_slice(&slot);
    write(dir, "statefile_slot", "raw", &raw);
    let mut body = vec![1u8];
    body.extend_from_slice(&slot[..8 + n]);
    write(dir, "statefile_slot", "body", &body);

    // API request lines (one stream per seed, the chunk-count byte first).
    let ops = [
        r#"{"v":1,"id":1,"op":"pool.status"}"#,
        r#"{"v":1,"id":2,"op":"vm.protect","name":"web","level":1}"#,
        r#"{"v":1,"id":3,"op":"events.recent","limit":10}"#,
        r#"{"v":1,"id":4,"op":"pool.propose","epoch":5,"config":{"hosts":["a","b"],"guests":{"web":{"level":1}}}}"#,
        r#"{"v":1,"id":5,"op":"ext","name":"x","args":[1,"two",null,true]}"#,
        r#"{"v":1,"id":6,"op":"pool.commit","epoch":5}"#,
    ];
    for (i, line) in ops.iter().enumerate() {
        api::parse_request(line.as_bytes()).unwrap();
        write(
            dir,
            "api_request",
            &i.to_string(),
            format!("\x02\x07\x20{line}\n").as_bytes(),
        );
    }
    let stream: String = ops.iter().map(|l| format!("{l}\n")).collect();
    write(dir, "api_request", "all", format!("\0{stream}").as_bytes());

    // API handshake: a valid answer to the fixed challenge, and a response line.
    let client = [0x33u8; 32];
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
    m.update(b"eac-api-v1");
    m.update(&SERVER_NONCE);
    m.update(&client);
    let proof = m.finalize().into_bytes();
    let answer = serde_json::json!({"v": 1, "client_nonce": hex(&client), "proof": hex(&proof)}).to_string();
    api::check_client_proof(SECRET, &SERVER_NONCE, answer.as_bytes()).unwrap();
    write(dir, "api_handshake", "answer", answer.as_bytes());
    write(
        dir,
        "api_handshake",
        "response",
        br#"{"v":1,"id":7,"error":{"code":"plan_broken","message":"no room","hint":"add a host"}}"#,
    );

    // Pairing datagrams.
    use netpair::proto::{Body, GuestObservation, Observation, Sealer};
    let mut s = Sealer::with_session(SECRET, PEER, 0x0102030405060708).unwrap();
    let bodies = [
        Body::Observation(Observation {
            app_carrier: true,
            probe_ok: true,
            probe_age_ms: 12,
            guests: vec![GuestObservation {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                rx_packets: 1000,
                tx_packets: 900,
                last_rx_age_ms: 3,
                steering_requested: false,
            }],
        }),
        Body::Observation(Observation {
            app_carrier: false,
            probe_ok: false,
            probe_age_ms: u32::MAX,
            guests: vec![],
        }),
    ];
    for (i, b) in bodies.into_iter().enumerate() {
        let d = s.seal_at(123_456_789, b);
        write(dir, "pairing_datagram", &i.to_string(), &d);
        write(dir, "pairing_body", &i.to_string(), &sealed_input(&d));
    }

    // Mirror frames: a connection's worth, seq 1, 2, ...
    let g = GenIds {
        current: 0x1234_5678_9abc_def0,
        bitmap: 0,
        history: [0x42, 0],
    };
    let frames: Vec<(M, Vec<u8>)> = vec![
        (
            M::Hello(mp::Hello {
                version: mp::PROTO_VERSION,
                nonce: [7; 32],
                host: "a".into(),
                resource: "disk0".into(),
                role: Role::Primary,
            }),
            vec![],
        ),
        (M::Auth { mac: [9; 32] }, vec![]),
        (
            M::State {
                device_id: 1,
                size: 32 << 20,
                region_size: 4 << 20,
                r#gen: g,
                role: Role::Primary,
                flags: mp::StateFlags::default(),
                dirty_bytes: 4096,
            },
            vec![],
        ),
        (
            M::Bitmap {
                first_word: 0,
                words: vec![1, 0, u64::MAX],
            },
            vec![],
        ),
        (M::BitmapDone, vec![]),
        (
            M::Write {
                id: 1,
                offset: 4096,
                fua: true,
            },
            vec![0xab; 64],
        ),
        (M::Ack { id: 1, errno: 0 }, vec![]),
        (
            M::Read {
                id: 2,
                offset: 0,
                len: 16,
            },
            vec![],
        ),
        (M::ReadReply { id: 2, errno: 0 }, vec![0xcd; 16]),
        (M::ResyncDone { r#gen: g }, vec![]),
        (M::Ping { id: 3 }, vec![]),
        (M::error("bye"), vec![]),
    ];
    let mut stream = vec![0u8];
    for (i, (msg, payload)) in frames.iter().enumerate() {
        let f = mp::encode_frame(i as u64 + 1, msg, payload).unwrap();
        stream.extend_from_slice(&f);
        let mut one = vec![0u8];
        one.extend_from_slice(&mp::encode_frame(1, msg, payload).unwrap());
        write(dir, "mirror_frame", &format!("{i:02}-{}", msg.kind()), &one);
    }
    write(dir, "mirror_frame", "connection", &stream);
    let mut chunked = vec![3u8, 1, 5, 19];
    chunked.extend_from_slice(&stream[1..]);
    write(dir, "mirror_frame", "connection-chunked", &chunked);

    // Round trips: any bytes make a case; a few to start from.
    for (i, b) in [
        &b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"[..],
        b"\x01abcdefgh\x02web\x02db",
        b"\x04\x05\x06\x07",
    ]
    .iter()
    .enumerate()
    {
        write(dir, "roundtrip", &i.to_string(), b);
    }
    println!("seeds written to {}", dir.display());
}
