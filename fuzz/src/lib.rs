//! Fixtures shared by the fuzz targets: the fixed pool secret and peers every target uses, the
//! sealing of a fuzzer-chosen body into a validly authenticated datagram (so the parser behind
//! the MAC is reached), and an in-memory reader that hands its bytes out in fuzzer-chosen
//! chunks (so the stream decoders see every split of a frame or line).
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use eac_common::sealed;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// The pool secret of every target.
pub const SECRET: &[u8] = b"fuzz pool secret, fixed";
/// This host.
pub const LOCAL: &str = "a";
/// The one configured peer.
pub const PEER: &str = "b";
/// The heartbeat network the targets receive on.
pub const NETWORK: &str = "mgmt";

/// The peer's address on [`NETWORK`].
pub fn peer_addr() -> SocketAddr {
    "10.250.0.2:7400".parse().unwrap()
}

/// A heartbeat opener as host [`LOCAL`] on [`NETWORK`] with peer [`PEER`].
pub fn heartbeat_opener() -> eac_controller::heartbeat::Opener {
    eac_controller::heartbeat::Opener::new(SECRET, LOCAL, NETWORK, vec![(PEER.to_owned(), peer_addr())]).unwrap()
}

/// A pairing opener of host [`LOCAL`].
pub fn pairing_opener() -> netpair::proto::Opener {
    netpair::proto::Opener::new(SECRET).unwrap().with_local_host(LOCAL)
}

/// The MAC every target seals with.
pub fn mac() -> sealed::HmacSha256 {
    sealed::mac(SECRET).unwrap()
}

/// Reads `(session, seq, body)` from the fuzzer's bytes: two big-endian words (zero-filled
/// when short), the rest is the body (cut to `max_body`).
pub fn split_sealed_input(data: &[u8], max_body: usize) -> (u64, u64, &[u8]) {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = data.get(at + i).copied().unwrap_or(0);
        }
        u64::from_be_bytes(b)
    };
    let body = data.get(16..).unwrap_or(&[]);
    (word(0), word(8), &body[..body.len().min(max_body)])
}

/// The body of a sealed datagram (between the 24-byte header and the 32-byte MAC).
pub fn sealed_body(d: &[u8]) -> &[u8] {
    &d[sealed::HEADER_LEN..d.len() - sealed::MAC_LEN]
}

/// Chunk sizes (1..=256) from the fuzzer's bytes; never empty.
pub fn chunk_sizes(seed: &[u8]) -> Vec<usize> {
    let mut v: Vec<usize> = seed.iter().map(|&b| usize::from(b) + 1).collect();
    if v.is_empty() {
        v.push(usize::MAX);
    }
    v
}

/// An in-memory stream that returns its bytes in chunks of the given sizes (cycled), like a
/// socket delivering a stream in arbitrary segments. Never pending.
#[derive(Debug)]
pub struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    chunk_end: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], sizes: Vec<usize>) -> Self {
        assert!(!sizes.is_empty() && sizes.iter().all(|&s| s > 0));
        let mut c = Chunked {
            data,
            pos: 0,
            chunk_end: 0,
            sizes,
            next: 0,
        };
        c.advance_chunk();
        c
    }

    fn advance_chunk(&mut self) {
        let s = self.sizes[self.next % self.sizes.len()];
        self.next += 1;
        self.chunk_end = self.pos.saturating_add(s).min(self.data.len());
    }

    fn available(&mut self) -> &'a [u8] {
        if self.pos == self.chunk_end && self.pos < self.data.len() {
            self.advance_chunk();
        }
        &self.data[self.pos..self.chunk_end]
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let avail = self.available();
        let n = avail.len().min(buf.remaining());
        buf.put_slice(&avail[..n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncBufRead for Chunked<'_> {
    fn poll_fill_buf(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        Poll::Ready(Ok(this.available()))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        assert!(self.pos + amt <= self.chunk_end, "consumed more than was filled");
        self.pos += amt;
    }
}
