//! Protocol tests against an in-memory device, with a hand-written client on a duplex pipe.
use std::sync::Mutex;

use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::*;

const SIZE: u64 = 4 << 20;

/// What the fake saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, bool),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64),
}

/// An in-memory BlockDev; reads at `gate_offset` wait until `gate` is notified.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    ops: Mutex<Vec<Op>>,
    gate_offset: Option<u64>,
    gate: Notify,
}

impl MemDisk {
    fn new() -> Arc<MemDisk> {
        Self::gated(None)
    }
    fn gated(gate_offset: Option<u64>) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0u8; SIZE as usize]),
            ops: Mutex::new(Vec::new()),
            gate_offset,
            gate: Notify::new(),
        })
    }
    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }
    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }
}

impl BlockDev for MemDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, len: usize) -> IoResult<Bytes> {
        crate::dev::check_range(SIZE, offset, len as u64)?;
        self.ops.lock().unwrap().push(Op::Read(offset, len));
        if self.gate_offset == Some(offset) {
            self.gate.notified().await;
        }
        let d = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(&d[offset as usize..offset as usize + len]))
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoResult<()> {
        crate::dev::check_range(SIZE, offset, data.len() as u64)?;
        self.ops.lock().unwrap().push(Op::Write(offset, data.len(), fua));
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> IoResult<()> {
        self.ops.lock().unwrap().push(Op::Flush);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        self.ops.lock().unwrap().push(Op::Discard(offset, len));
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> IoResult<()> {
        crate::dev::check_range(SIZE, offset, len)?;
        self.ops.lock().unwrap().push(Op::WriteZeroes(offset, len));
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A device whose every operation fails with a fixed errno.
struct FailDisk(i32);

impl BlockDev for FailDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, _: u64, _: usize) -> IoResult<Bytes> {
        Err(IoError(self.0))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> IoResult<()> {
        Err(IoError(self.0))
    }
    async fn flush(&self) -> IoResult<()> {
        Err(IoError(self.0))
    }
    async fn discard(&self, _: u64, _: u64) -> IoResult<()> {
        Err(IoError(self.0))
    }
    async fn write_zeroes(&self, _: u64, _: u64) -> IoResult<()> {
        Err(IoError(self.0))
    }
}

/// The test client: raw protocol on one end of a pipe; the server task on the other.
struct Client {
    r: ReadHalf<DuplexStream>,
    w: WriteHalf<DuplexStream>,
    server: tokio::task::JoinHandle<Result<()>>,
    stop: watch::Sender<bool>,
}

fn start<D: BlockDev>(dev: Arc<D>, name: &str) -> Client {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (sr, sw) = tokio::io::split(b);
    let export = Arc::new(Export {
        name: name.to_owned(),
        dev,
    });
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(handle_connection(sr, sw, export, stop_rx));
    let (r, w) = tokio::io::split(a);
    Client { r, w, server, stop }
}

impl Client {
    async fn greeting(&mut self) -> u16 {
        let mut g = [0u8; 18];
        self.r.read_exact(&mut g).await.unwrap();
        assert_eq!(be_u64(&g), NBDMAGIC);
        assert_eq!(be_u64(&g[8..]), IHAVEOPT);
        be_u16(&g[16..])
    }
    async fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }
    async fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m).await;
    }
    /// (option, reply type, data)
    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.r.read_exact(&mut h).await.unwrap();
        assert_eq!(be_u64(&h), OPT_REPLY_MAGIC);
        let mut d = vec![0u8; be_u32(&h[16..]) as usize];
        self.r.read_exact(&mut d).await.unwrap();
        (be_u32(&h[8..]), be_u32(&h[12..]), d)
    }
    /// Handshake + NBD_OPT_GO asking for the block size: returns (size, flags).
    async fn go(&mut self, infos: &[u16]) -> (u64, u16) {
        assert_eq!(self.greeting().await, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.send(&(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES).to_be_bytes()).await;
        self.option(OPT_GO, &info_data(b"exp", infos)).await;
        let (mut size, mut flags, mut block) = (None, None, None);
        loop {
            let (opt, t, d) = self.opt_reply().await;
            assert_eq!(opt, OPT_GO);
            match t {
                REP_INFO => match be_u16(&d) {
                    INFO_EXPORT => {
                        assert_eq!(d.len(), 12);
                        size = Some(be_u64(&d[2..]));
                        flags = Some(be_u16(&d[10..]));
                    }
                    INFO_BLOCK_SIZE => {
                        assert_eq!(d.len(), 14);
                        block = Some((be_u32(&d[2..]), be_u32(&d[6..]), be_u32(&d[10..])));
                    }
                    INFO_NAME => assert_eq!(&d[2..], b"exp"),
                    other => panic!("unexpected info {other}"),
                },
                REP_ACK => break,
                other => panic!("unexpected reply {other:#x}: {}", String::from_utf8_lossy(&d)),
            }
        }
        assert_eq!(block, Some((512, 4096, 32 << 20)));
        (size.unwrap(), flags.unwrap())
    }
    async fn request(&mut self, typ: u16, flags: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.send(&m).await;
    }
    /// (handle, error)
    async fn reply(&mut self) -> (u64, u32) {
        let mut h = [0u8; 16];
        self.r.read_exact(&mut h).await.unwrap();
        assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC);
        (be_u64(&h[8..]), be_u32(&h[4..]))
    }
    async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.r.read_exact(&mut d).await.unwrap();
        d
    }
    /// Waits for the server to close its side; returns the connection's result.
    async fn closed(mut self) -> Result<()> {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), self.r.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "server did not close the connection");
        assert!(rest.is_empty(), "unexpected bytes before close: {rest:?}");
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("server task did not end")
            .expect("server task panicked")
    }
}

fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn protocol_error(r: Result<()>, want: &str) {
    match r {
        Err(NbdError::Protocol(m)) => assert!(m.contains(want), "{m:?} does not mention {want:?}"),
        other => panic!("expected a protocol error mentioning {want:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn go_then_write_read_flush_disc() {
    let dev = MemDisk::new();
    let mut c = start(dev.clone(), "exp");
    let (size, flags) = c.go(&[INFO_BLOCK_SIZE, INFO_NAME]).await;
    assert_eq!(size, SIZE);
    assert_eq!(flags, TRANSMISSION_FLAGS);
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, TFLAG_CAN_MULTI_CONN);

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &pattern).await;
    assert_eq!(c.reply().await, (1, 0));
    c.request(CMD_READ, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(c.reply().await, (2, 0));
    assert_eq!(c.read_data(8192).await, pattern);
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (3, 0));
    assert_eq!(dev.bytes(4096, 8192), pattern);
    assert_eq!(
        dev.ops(),
        vec![Op::Write(4096, 8192, true), Op::Read(4096, 8192), Op::Flush]
    );
    c.request(CMD_DISC, 0, 4, 0, 0, &[]).await;
    c.closed().await.unwrap();
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for (cflags, pad) in [(CFLAG_FIXED_NEWSTYLE, 124), (CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES, 0)] {
        let mut c = start(MemDisk::new(), "exp");
        c.greeting().await;
        c.send(&cflags.to_be_bytes()).await;
        c.option(OPT_EXPORT_NAME, b"exp").await;
        let d = c.read_data(10 + pad).await;
        assert_eq!(be_u64(&d), SIZE);
        assert_eq!(be_u16(&d[8..]), TRANSMISSION_FLAGS);
        assert!(d[10..].iter().all(|&b| b == 0));
        // Unaligned I/O is fine for a client that never saw the block size.
        c.request(CMD_WRITE, 0, 9, 3, 5, b"hello").await;
        assert_eq!(c.reply().await, (9, 0));
        c.request(CMD_DISC, 0, 10, 0, 0, &[]).await;
        c.closed().await.unwrap();
    }
}

#[tokio::test]
async fn empty_name_is_the_default_export() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await;
    c.option(OPT_INFO, &info_data(b"", &[])).await;
    let (_, t, d) = c.opt_reply().await;
    assert_eq!((t, be_u16(&d)), (REP_INFO, INFO_EXPORT));
    assert_eq!(c.opt_reply().await.1, REP_INFO); // block size, always sent
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    c.option(OPT_EXPORT_NAME, b"").await;
    assert_eq!(be_u64(&c.read_data(134).await), SIZE);
}

#[tokio::test]
async fn unknown_options_are_refused_and_haggling_goes_on() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await;
    c.option(4242, b"whatever data").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNSUP);
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_POLICY);
    c.option(OPT_LIST, &[]).await;
    let (opt, t, d) = c.opt_reply().await;
    assert_eq!((opt, t), (OPT_LIST, REP_SERVER));
    assert_eq!((be_u32(&d), &d[4..]), (3, &b"exp"[..]));
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    c.option(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    // Malformed INFO: the name length runs past the data; then a count that does not fit.
    c.option(OPT_INFO, &[0, 0, 0, 200, b'e', 0, 0]).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    let mut bad = info_data(b"exp", &[INFO_EXPORT]);
    bad.push(0);
    c.option(OPT_GO, &bad).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_GO, &info_data(b"nope", &[])).await;
    let (_, t, msg) = c.opt_reply().await;
    assert_eq!(t, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    // Still usable: ABORT is acknowledged and ends the session cleanly.
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    c.closed().await.unwrap();
}

#[tokio::test]
async fn garbage_instead_of_client_flags_disconnects() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    protocol_error(c.closed().await, "unknown client flags");
}

#[tokio::test]
async fn bad_option_magic_disconnects() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await;
    c.send(&[0xde; 16]).await;
    protocol_error(c.closed().await, "bad option magic");
}

#[tokio::test]
async fn oversized_option_and_truncated_handshake_disconnect() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&m).await;
    protocol_error(c.closed().await, "limit");

    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&[0, 0]).await;
    c.w.shutdown().await.unwrap();
    protocol_error(c.closed().await, "client flags");
}

#[tokio::test]
async fn wrong_export_name_disconnects_and_old_newstyle_gets_only_export_name() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await;
    c.option(OPT_EXPORT_NAME, b"other").await;
    protocol_error(c.closed().await, "other");

    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.send(&0u32.to_be_bytes()).await;
    c.option(OPT_LIST, &[]).await;
    protocol_error(c.closed().await, "without fixed newstyle");
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_survives() {
    let dev = MemDisk::new();
    let mut c = start(dev.clone(), "exp");
    c.go(&[INFO_BLOCK_SIZE]).await;
    // Out of range read, overflowing offset, write past the end.
    c.request(CMD_READ, 0, 1, SIZE - 512, 1024, &[]).await;
    assert_eq!(c.reply().await, (1, NBD_EINVAL));
    c.request(CMD_READ, 0, 2, u64::MAX - 10, 512, &[]).await;
    assert_eq!(c.reply().await, (2, NBD_EINVAL));
    c.request(CMD_WRITE, 0, 3, SIZE, 4, b"abcd").await;
    assert_eq!(c.reply().await, (3, NBD_ENOSPC));
    c.request(CMD_TRIM, 0, 4, SIZE, 512, &[]).await;
    assert_eq!(c.reply().await, (4, NBD_EINVAL));
    // Oversized read; oversized write whose payload is discarded to stay in step.
    c.request(CMD_READ, 0, 5, 0, MAX_REQUEST + 1, &[]).await;
    assert_eq!(c.reply().await, (5, NBD_EINVAL));
    let big = vec![0x5a; MAX_REQUEST as usize + 512];
    let (w_big, r_big) = tokio::join!(
        async {
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&CMD_WRITE.to_be_bytes());
            m.extend_from_slice(&6u64.to_be_bytes());
            m.extend_from_slice(&0u64.to_be_bytes());
            m.extend_from_slice(&(big.len() as u32).to_be_bytes());
            c.w.write_all(&m).await.unwrap();
            c.w.write_all(&big).await.unwrap();
        },
        async {
            let mut h = [0u8; 16];
            c.r.read_exact(&mut h).await.unwrap();
            (be_u64(&h[8..]), be_u32(&h[4..]))
        }
    );
    let () = w_big;
    assert_eq!(r_big, (6, NBD_EINVAL));
    // Unknown command, unknown flag, NO_HOLE where it does not belong.
    c.request(5, 0, 7, 0, 512, &[]).await;
    assert_eq!(c.reply().await, (7, NBD_EINVAL));
    c.request(CMD_READ, 1 << 4, 8, 0, 512, &[]).await;
    assert_eq!(c.reply().await, (8, NBD_EINVAL));
    c.request(CMD_WRITE, CMD_FLAG_NO_HOLE, 9, 0, 4, b"abcd").await;
    assert_eq!(c.reply().await, (9, NBD_EINVAL));
    // This client asked for the block size in GO, so misalignment is refused.
    c.request(CMD_READ, 0, 10, 1, 512, &[]).await;
    assert_eq!(c.reply().await, (10, NBD_EINVAL));
    // Nothing of the above reached the device; a good request still works.
    assert!(dev.ops().is_empty(), "{:?}", dev.ops());
    assert!(dev.bytes(0, 4).iter().all(|&b| b == 0));
    c.request(CMD_READ, 0, 11, SIZE - 512, 512, &[]).await;
    assert_eq!(c.reply().await, (11, 0));
    assert_eq!(c.read_data(512).await.len(), 512);
    c.request(CMD_DISC, 0, 12, 0, 0, &[]).await;
    c.closed().await.unwrap();
}

#[tokio::test]
async fn bad_request_magic_and_truncated_requests_disconnect() {
    let mut c = start(MemDisk::new(), "exp");
    c.go(&[]).await;
    c.send(&[0xff; 28]).await;
    protocol_error(c.closed().await, "bad request magic");

    let mut c = start(MemDisk::new(), "exp");
    c.go(&[]).await;
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1, 2, 3]).await;
    c.w.shutdown().await.unwrap();
    protocol_error(c.closed().await, "write payload");

    let mut c = start(MemDisk::new(), "exp");
    c.go(&[]).await;
    c.send(&REQUEST_MAGIC.to_be_bytes()).await;
    c.w.shutdown().await.unwrap();
    protocol_error(c.closed().await, "request header");
}

#[tokio::test]
async fn replies_go_out_of_order_while_a_request_is_slow() {
    let dev = MemDisk::gated(Some(0));
    let mut c = start(dev.clone(), "exp");
    c.go(&[]).await;
    c.request(CMD_READ, 0, 100, 0, 512, &[]).await; // blocks in the device
    c.request(CMD_WRITE, 0, 101, 8192, 512, &[7; 512]).await;
    c.request(CMD_READ, 0, 102, 8192, 512, &[]).await;
    assert_eq!(c.reply().await, (101, 0));
    assert_eq!(c.reply().await, (102, 0));
    assert_eq!(c.read_data(512).await, vec![7; 512]);
    dev.gate.notify_one();
    assert_eq!(c.reply().await, (100, 0));
    assert_eq!(c.read_data(512).await, vec![0; 512]);
}

#[tokio::test]
async fn disc_waits_for_requests_in_flight() {
    let dev = MemDisk::gated(Some(4096));
    let mut c = start(dev.clone(), "exp");
    c.go(&[]).await;
    c.request(CMD_READ, 0, 1, 4096, 512, &[]).await;
    c.request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!c.server.is_finished(), "closed with a request in flight");
    dev.gate.notify_one();
    assert_eq!(c.reply().await, (1, 0));
    c.read_data(512).await;
    c.closed().await.unwrap();
}

#[tokio::test]
async fn trim_write_zeroes_no_hole_and_fua_map_onto_the_device() {
    let dev = MemDisk::new();
    dev.data.lock().unwrap().fill(0xee);
    let mut c = start(dev.clone(), "exp");
    c.go(&[]).await;
    c.request(CMD_TRIM, CMD_FLAG_FUA, 1, 0, 4096, &[]).await;
    assert_eq!(c.reply().await, (1, 0));
    c.request(CMD_WRITE_ZEROES, 0, 2, 4096, 4096, &[]).await;
    assert_eq!(c.reply().await, (2, 0));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3, SIZE - 4096, 8192, &[])
        .await;
    assert_eq!(c.reply().await, (3, NBD_ENOSPC), "runs past the end");
    // NO_HOLE longer than one zero chunk: plain writes of zeroes, then one flush for FUA.
    let long: u32 = 3 << 19;
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 4, 8192, long, &[])
        .await;
    assert_eq!(c.reply().await, (4, 0));
    c.request(CMD_FLUSH, CMD_FLAG_FUA, 5, 0, 0, &[]).await; // FUA on flush is accepted
    assert_eq!(c.reply().await, (5, 0));
    assert_eq!(
        dev.ops(),
        vec![
            Op::Discard(0, 4096),
            Op::Flush,
            Op::WriteZeroes(4096, 4096),
            Op::Write(8192, 1 << 20, false),
            Op::Write(8192 + (1 << 20), (long as usize) - (1 << 20), false),
            Op::Flush,
            Op::Flush,
        ]
    );
    assert!(dev.bytes(4096, 4096 + long as usize).iter().all(|&b| b == 0));
    assert!(dev.bytes(8192 + long as usize, 512).iter().all(|&b| b == 0xee));
}

#[tokio::test]
async fn device_errors_reach_the_client_as_protocol_errno() {
    for (errno, wire) in [
        (libc::EIO, NBD_EIO),
        (libc::ENOSPC, NBD_ENOSPC),
        (libc::EDQUOT, NBD_ENOSPC),
        (libc::EROFS, NBD_EPERM),
        (libc::EOPNOTSUPP, NBD_ENOTSUP),
        (libc::ENOLINK, NBD_EIO),
    ] {
        let mut c = start(Arc::new(FailDisk(errno)), "exp");
        c.go(&[]).await;
        c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
        assert_eq!(c.reply().await, (1, wire), "errno {errno}");
        c.request(CMD_WRITE, 0, 2, 0, 3, b"abc").await;
        assert_eq!(c.reply().await, (2, wire), "errno {errno}");
        c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
        assert_eq!(c.reply().await, (3, wire), "errno {errno}");
    }
}

#[tokio::test]
async fn stop_ends_haggling_and_drains_transmission() {
    let mut c = start(MemDisk::new(), "exp");
    c.greeting().await;
    c.stop.send(true).unwrap();
    c.closed().await.unwrap();

    let dev = MemDisk::gated(Some(0));
    let mut c = start(dev.clone(), "exp");
    c.go(&[]).await;
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!c.server.is_finished());
    dev.gate.notify_one();
    assert_eq!(c.reply().await, (1, 0));
    c.read_data(512).await;
    c.closed().await.unwrap();
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let dev = MemDisk::new();
    let mut c = start(dev.clone(), "exp");
    c.go(&[]).await;
    let n = 200u64;
    let (_, replies) = tokio::join!(
        async {
            let mut m = Vec::new();
            for i in 0..n {
                m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                m.extend_from_slice(&0u16.to_be_bytes());
                m.extend_from_slice(&CMD_WRITE.to_be_bytes());
                m.extend_from_slice(&i.to_be_bytes());
                m.extend_from_slice(&(i * 4096).to_be_bytes());
                m.extend_from_slice(&4096u32.to_be_bytes());
                m.extend_from_slice(&[i as u8; 4096]);
            }
            c.w.write_all(&m).await.unwrap();
        },
        async {
            let mut got = Vec::new();
            for _ in 0..n {
                let mut h = [0u8; 16];
                c.r.read_exact(&mut h).await.unwrap();
                assert_eq!(be_u32(&h[4..]), 0);
                got.push(be_u64(&h[8..]));
            }
            got
        }
    );
    let mut sorted = replies.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    for i in 0..n {
        assert!(dev.bytes((i * 4096) as usize, 4096).iter().all(|&b| b == i as u8));
    }
}

#[tokio::test]
async fn listener_addresses_and_urls() {
    let l = NbdListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.tcp_addr().unwrap().port();
    assert_ne!(port, 0);
    assert_eq!(l.url("exp"), format!("nbd://127.0.0.1:{port}/exp"));
    assert!(matches!(
        NbdListener::bind("nonsense").await,
        Err(NbdError::Address { .. })
    ));
    assert!(matches!(
        NbdListener::bind("256.0.0.1:1").await,
        Err(NbdError::Bind { .. })
    ));

    let dir = std::env::temp_dir().join(format!("eac-nbd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let p = sock.to_str().unwrap();
    let l = NbdListener::bind(p).await.unwrap();
    assert_eq!(l.url("exp"), format!("nbd+unix:///exp?socket={p}"));
    assert!(matches!(NbdListener::bind(p).await, Err(NbdError::SocketInUse { .. })));
    drop(l);
    assert!(!sock.exists(), "socket file left behind");
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let l = NbdListener::bind(p).await.unwrap();
    drop(l);
    // A regular file is never removed.
    std::fs::write(&sock, b"keep").unwrap();
    assert!(matches!(NbdListener::bind(p).await, Err(NbdError::NotASocket { .. })));
    assert_eq!(std::fs::read(&sock).unwrap(), b"keep");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn serve_accepts_clients_and_stops_on_shutdown() {
    let dev = MemDisk::new();
    let l = NbdListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.tcp_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(l, "exp".into(), dev.clone(), async {
        let _ = rx.await;
    }));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(be_u64(&g), NBDMAGIC);
    s.write_all(&CFLAG_FIXED_NEWSTYLE.to_be_bytes()).await.unwrap();
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&3u32.to_be_bytes());
    m.extend_from_slice(b"exp");
    s.write_all(&m).await.unwrap();
    let mut info = [0u8; 134];
    s.read_exact(&mut info).await.unwrap();
    assert_eq!(be_u64(&info), SIZE);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve did not return after shutdown")
        .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still listening");
}

#[test]
fn info_request_parsing() {
    assert_eq!(
        parse_info_request(&info_data(b"ab", &[3, 1])).unwrap(),
        (&b"ab"[..], vec![3, 1])
    );
    assert!(parse_info_request(&[0, 0, 0]).is_err());
    assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]).is_err());
}
