//! Structured round trips, decode(encode(x)) == x, for every encoder that has a decoder:
//! heartbeats, state-file slots, pairing messages, mirror frames and API requests, built by
//! `arbitrary` from the fuzzer's bytes. Where the encoder refuses a value (a name too long,
//! a message the protocol forbids), the value must break a documented rule; where it
//! accepts, the real decoder must return the value unchanged.
#![no_main]
use arbitrary::{Arbitrary, Unstructured};
use eac_controller::{api, heartbeat, statefile};
use eac_fuzz::{NETWORK, PEER, SECRET, heartbeat_opener, pairing_opener, peer_addr};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use ublk_mirror::{
    genid::{GenIds, Role},
    proto::{self as mp, Message as M},
};

#[derive(Debug, Arbitrary)]
enum Case {
    Heartbeat {
        incarnation: u64,
        sees: Vec<String>,
        fencing: bool,
        config_epoch: u64,
        api_addr: Option<String>,
        session: u64,
    },
    Slot {
        incarnation: u64,
        tick: u64,
        wall_ms: u64,
        fencing: bool,
        guests: Vec<String>,
        guests_truncated: bool,
        config_epoch: u64,
        sees: Vec<String>,
    },
    Pairing {
        host: String,
        sent_mono_ns: u64,
        app_carrier: bool,
        probe_ok: bool,
        probe_age_ms: u32,
        guests: Vec<([u8; 6], u64, u64, u32, bool)>,
        session: u64,
    },
    Mirror {
        seq: u64,
        #[arbitrary(with = mirror_message)]
        msg: M,
        payload: Vec<u8>,
    },
    Request {
        id: u64,
        #[arbitrary(with = op)]
        op: api::Op,
    },
}

fn role(u: &mut Unstructured) -> arbitrary::Result<Role> {
    Ok(if bool::arbitrary(u)? {
        Role::Primary
    } else {
        Role::Secondary
    })
}

fn gen_ids(u: &mut Unstructured) -> arbitrary::Result<GenIds> {
    Ok(GenIds {
        current: u.arbitrary()?,
        bitmap: u.arbitrary()?,
        history: u.arbitrary()?,
    })
}

fn mirror_message(u: &mut Unstructured) -> arbitrary::Result<M> {
    Ok(match u.int_in_range(0..=18u8)? {
        0 => M::Hello(mp::Hello {
            version: u.arbitrary()?,
            nonce: u.arbitrary()?,
            host: u.arbitrary()?,
            resource: u.arbitrary()?,
            role: role(u)?,
        }),
        1 => M::Auth { mac: u.arbitrary()? },
        2 => M::Error { reason: u.arbitrary()? },
        3 => M::State {
            device_id: u.arbitrary()?,
            size: u.arbitrary()?,
            region_size: u.arbitrary()?,
            r#gen: gen_ids(u)?,
            role: role(u)?,
            flags: mp::StateFlags {
                consistent: u.arbitrary()?,
                crashed_primary: u.arbitrary()?,
                discard_my_data: u.arbitrary()?,
            },
            dirty_bytes: u.arbitrary()?,
        },
        4 => M::Bitmap {
            first_word: u.arbitrary()?,
            words: u.arbitrary()?,
        },
        5 => M::BitmapDone,
        6 => M::Write {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
            fua: u.arbitrary()?,
        },
        7 => M::Flush { id: u.arbitrary()? },
        8 => M::Discard {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        9 => M::WriteZeroes {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        10 => M::Ack {
            id: u.arbitrary()?,
            errno: u.arbitrary()?,
        },
        11 => M::Read {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        12 => M::ReadReply {
            id: u.arbitrary()?,
            errno: u.arbitrary()?,
        },
        13 => M::ResyncData {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
        },
        14 => M::ResyncDone { r#gen: gen_ids(u)? },
        15 => M::Verify {
            id: u.arbitrary()?,
            offset: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        16 => M::VerifyReply {
            id: u.arbitrary()?,
            errno: u.arbitrary()?,
            digest: u.arbitrary()?,
        },
        17 => M::Ping { id: u.arbitrary()? },
        _ => M::Pong { id: u.arbitrary()? },
    })
}

/// A JSON value without floats (see api_request.rs), nested at most `depth` deep.
fn json(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    let top = if depth == 0 { 3 } else { 5 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => {
            if u.arbitrary()? {
                Value::from(u.arbitrary::<i64>()?)
            } else {
                Value::from(u.arbitrary::<u64>()?)
            }
        }
        3 => Value::String(u.arbitrary()?),
        4 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| json(u, depth - 1)).collect::<Result<_, _>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut m = serde_json::Map::new();
            for _ in 0..n {
                m.insert(u.arbitrary()?, json(u, depth - 1)?);
            }
            Value::Object(m)
        }
    })
}

fn op(u: &mut Unstructured) -> arbitrary::Result<api::Op> {
    use api::Op;
    Ok(match u.int_in_range(0..=12u8)? {
        0 => Op::PoolStatus,
        1 => Op::HostList,
        2 => Op::VmList,
        3 => Op::VmProtect {
            name: u.arbitrary()?,
            level: u.arbitrary()?,
        },
        4 => Op::VmUnprotect { name: u.arbitrary()? },
        5 => Op::Plan,
        6 => Op::EventsFollow,
        7 => Op::EventsRecent { limit: u.arbitrary()? },
        8 => Op::PoolGet,
        9 => Op::PoolPropose {
            epoch: u.arbitrary()?,
            config: json(u, 3)?,
        },
        10 => Op::PoolCommit { epoch: u.arbitrary()? },
        11 => Op::PoolAbort { epoch: u.arbitrary()? },
        _ => Op::Ext {
            name: u.arbitrary()?,
            args: json(u, 3)?,
        },
    })
}

fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max
}

fuzz_target!(|case: Case| match case {
    Case::Heartbeat {
        incarnation,
        sees,
        fencing,
        config_epoch,
        api_addr,
        session,
    } => {
        let hb = heartbeat::Heartbeat {
            host: PEER.into(),
            incarnation,
            seq: 1,
            network: NETWORK.into(),
            sees,
            fencing,
            config_epoch,
            api_addr,
        };
        let valid = hb.sees.len() <= heartbeat::MAX_SEES
            && hb.sees.iter().all(|s| name_ok(s, 64))
            && hb
                .api_addr
                .as_deref()
                .is_none_or(|a| name_ok(a, heartbeat::MAX_API_ADDR_LEN));
        let mut sealer = heartbeat::Sealer::with_session(SECRET, PEER, NETWORK, session).unwrap();
        match sealer.seal(&hb) {
            Ok((d, _)) => {
                assert!(valid, "an invalid heartbeat was sealed: {hb:?}");
                assert_eq!(heartbeat_opener().open(peer_addr(), &d), Ok(hb));
            }
            Err(e) => assert!(!valid, "a valid heartbeat was refused: {e}"),
        }
    }
    Case::Slot {
        incarnation,
        tick,
        wall_ms,
        fencing,
        guests,
        guests_truncated,
        config_epoch,
        sees,
    } => {
        let r = statefile::SlotRecord {
            host: PEER.into(),
            incarnation,
            tick,
            wall_ms,
            fencing,
            guests,
            guests_truncated,
            config_epoch,
            sees,
        };
        if !r.guests.iter().chain(&r.sees).all(|g| name_ok(g, 64)) {
            return; // write_slot refuses these before encoding
        }
        let mut slot = vec![0u8; statefile::SLOT_SIZE];
        let (_, kept) = statefile::encode_slot(&r, &mut slot).expect("a record with valid names encodes");
        let back = statefile::decode_slot(1, PEER, &slot).expect("an encoded slot decodes");
        let mut want = r.clone();
        if kept < r.guests.len() {
            want.guests.truncate(kept);
            want.guests_truncated = true;
        }
        // A `sees` list that does not fit is cut (only when no guest is left to cut).
        want.sees.truncate(back.sees.len());
        assert_eq!(back, want);
    }
    Case::Pairing {
        host,
        sent_mono_ns,
        app_carrier,
        probe_ok,
        probe_age_ms,
        mut guests,
        session,
    } => {
        use netpair::proto::{Body, GuestObservation, MAX_GUESTS, Observation, Sealer};
        let Ok(mut sealer) = Sealer::with_session(SECRET, &host, session) else {
            assert!(!name_ok(&host, 64), "a valid host name was refused");
            return;
        };
        guests.truncate(MAX_GUESTS); // more is a caller bug (seal_at asserts)
        let body = Body::Observation(Observation {
            app_carrier,
            probe_ok,
            probe_age_ms,
            guests: guests
                .into_iter()
                .map(|(mac, rx, tx, age, steer)| GuestObservation {
                    mac,
                    rx_packets: rx,
                    tx_packets: tx,
                    last_rx_age_ms: age,
                    steering_requested: steer,
                })
                .collect(),
        });
        let d = sealer.seal_at(sent_mono_ns, body.clone());
        let m = pairing_opener().open(peer_addr(), &d);
        if host == eac_fuzz::LOCAL {
            assert!(m.is_err(), "our own message was accepted");
            return;
        }
        let m = m.expect("a sealed message opens");
        assert_eq!((m.host, m.sent_mono_ns, m.body), (host, sent_mono_ns, body));
    }
    Case::Mirror { seq, msg, payload } => {
        let payload = if msg.carries_payload() { payload } else { Vec::new() };
        match mp::encode_frame(seq, &msg, &payload) {
            Ok(f) => {
                msg.validate(payload.len() as u64).expect("an encoded message is valid");
                let (frame, used) = mp::decode_frame(&f, seq).expect("an encoded frame decodes");
                assert_eq!(used, f.len());
                assert_eq!(frame.msg, msg);
                assert_eq!(&frame.payload[..], &payload[..]);
            }
            Err(e) => assert!(
                msg.validate(payload.len() as u64).is_err(),
                "a valid message did not encode: {e}"
            ),
        }
    }
    Case::Request { id, op } => {
        let req = api::Request::new(id, op);
        let line = serde_json::to_vec(&req).expect("a request serialises");
        let back = api::parse_request(&line).unwrap_or_else(|e| panic!("a serialised request was refused: {e:?}"));
        assert_eq!(back, req);
    }
});
