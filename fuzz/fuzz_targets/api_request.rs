//! The controller API's request path: the line framing (`api::read_line`, fed in
//! fuzzer-chosen segments, with a small limit so the too-long path is reached) and the request
//! decoder (`api::parse_request`) on every line. Input: one byte N, N chunk-size bytes, then
//! the stream. Checks: framing yields exactly the `\n`-separated lines (a line over the limit
//! ends the stream as too long; an unterminated last line is dropped), parsing never panics,
//! and an accepted request survives serialise → parse unchanged (requests holding JSON
//! floats excepted: serde_json's default float parser may differ from the printer by an ulp).
#![no_main]
use eac_controller::api::{LineRead, Request, parse_request, read_line};
use eac_fuzz::{Chunked, chunk_sizes};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const LIMIT: usize = 512;

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn check_request(line: &[u8]) {
    let Ok(req) = parse_request(line) else {
        return;
    };
    if let Ok(v) = serde_json::from_slice::<Value>(line)
        && has_float(&v)
    {
        return;
    }
    let again = serde_json::to_vec(&req).expect("a request serialises");
    let back: Request = parse_request(&again).unwrap_or_else(|e| panic!("re-serialised request refused: {e:?}"));
    assert_eq!(back, req);
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (seed, stream) = rest.split_at(n);

    // The reference: split on '\n'.
    let mut expected = Vec::new();
    let mut segments = stream.split(|&b| b == b'\n').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.len() > LIMIT {
            expected.push((LineRead::TooLong, Vec::new()));
            break;
        }
        if last {
            expected.push((LineRead::Eof, Vec::new()));
        } else {
            expected.push((LineRead::Complete, seg.to_vec()));
        }
    }

    let mut r = Chunked::new(stream, chunk_sizes(seed));
    let mut buf = Vec::new();
    for (want, line) in expected {
        let got = futures::executor::block_on(read_line(&mut r, &mut buf, LIMIT)).expect("in-memory reads do not fail");
        assert_eq!(got, want);
        if got == LineRead::Complete {
            assert_eq!(buf, line);
            check_request(&buf);
        }
    }
    // The whole stream as one line too (large inputs reach the parser unsplit).
    check_request(stream);
});
