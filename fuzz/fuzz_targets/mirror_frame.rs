//! ublk-mirror's replication frame decoder, two ways over the same bytes: `proto::decode_frame`
//! on the buffer and `proto::FrameReader::next` on a stream delivered in fuzzer-chosen
//! segments. Input: one byte N, N chunk-size bytes, then the stream of frames (seq 1, 2, …).
//! Both must agree frame by frame and on the error that ends the stream, never panic, and an
//! accepted frame must re-encode (`proto::encode_frame`) to exactly its bytes.
#![no_main]
use eac_fuzz::{Chunked, chunk_sizes};
use libfuzzer_sys::fuzz_target;
use ublk_mirror::proto::{FrameReader, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (seed, stream) = rest.split_at(n);

    let mut reader = FrameReader::new(Chunked::new(stream, chunk_sizes(seed)));
    let mut off = 0;
    let mut seq = 1u64;
    loop {
        let from_buf = decode_frame(&stream[off..], seq);
        let from_stream = futures::executor::block_on(reader.next());
        match (from_buf, from_stream) {
            (Ok((frame, used)), Ok(Some(f))) => {
                assert_eq!(frame, f);
                let again = encode_frame(seq, &frame.msg, &frame.payload).expect("an accepted frame encodes");
                assert!(again == stream[off..off + used], "the frame encoding is not canonical");
                off += used;
                seq += 1;
            }
            (Err(_), Ok(None)) => {
                assert_eq!(off, stream.len(), "the reader saw the end between frames too early");
                break;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string());
                break;
            }
            (a, b) => panic!("decode_frame and FrameReader disagree at frame {seq}: {a:?} vs {b:?}"),
        }
    }
});
