//! NBD export: serves any [`BlockDev`] over the Network Block Device protocol, so QEMU's
//! built-in NBD client (a guest disk `<source protocol='nbd'>`), `qemu-io`, `qemu-img` and
//! `nbd-client`-style tools can use the (mirrored) device.
//!
//! # Why hand-written
//!
//! There is no maintained, permissively licensed async NBD *server* crate to build on:
//! `tokio-nbd` is GPL-2.0+, `nbd` (MIT/Apache) is synchronous (`Read + Write + Seek`, one
//! request at a time), `nbd-async` (MIT) drives the kernel's `/dev/nbdX` client and pins an
//! old `nix`. The server side of the protocol we need is small — fixed newstyle option
//! haggling and simple replies — and owning it lets requests run concurrently against the
//! `BlockDev` with our own limits. Facts come from the protocol document
//! (`NetworkBlockDevice/nbd` `doc/proto.md`, public domain); no code was copied.
//!
//! # What is spoken
//!
//! - Handshake: fixed newstyle (`NBD_FLAG_FIXED_NEWSTYLE` + `NBD_FLAG_NO_ZEROES`); options
//!   `EXPORT_NAME`, `GO`, `INFO` (replies `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` and, when
//!   asked, `NBD_INFO_NAME`), `LIST`, `ABORT`. `STRUCTURED_REPLY`, `STARTTLS`, meta contexts
//!   and extended headers are refused with `NBD_REP_ERR_UNSUP` (simple replies only); any
//!   other option gets `NBD_REP_ERR_UNSUP` too. The empty export name selects the export.
//! - Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES` and `CAN_MULTI_CONN`. Multi-conn is safe because this server keeps
//!   no cache of its own and [`BlockDev::flush`] makes *every* completed write durable, not
//!   only those of the connection that asked — so a flush or FUA reply on one connection
//!   covers writes completed on all of them, which is what the flag promises.
//! - Commands: `READ`, `WRITE` (FUA), `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (FUA,
//!   `NO_HOLE`). `NO_HOLE` asks for the range to stay provisioned, so it is served with
//!   ordinary writes of zeroes ([`BlockDev::write`]) instead of [`BlockDev::write_zeroes`]
//!   (which may deallocate). FUA on trim/write-zeroes is a flush after the operation.
//! - Size constraints advertised: minimum 512, preferred 4096, maximum 32 MiB per read or
//!   write ([`MAX_REQUEST`]). Alignment to 512 is enforced (`EINVAL`) only for a client that
//!   asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO` (it promised to obey); other clients may
//!   send byte-granular requests, which a `BlockDev` accepts.
//!
//! # Concurrency and robustness
//!
//! Per connection one task reads requests and starts one task per request; a single writer
//! task sends the replies as they complete (out of order, batched into few socket writes).
//! In-flight work is bounded per connection ([`INFLIGHT_BUDGET`] units, one per request plus
//! one per 64 KiB of payload), so a client cannot make the server buffer unbounded data.
//! A request that is too long, outside the device or carries unknown flags gets an error
//! reply (`EINVAL`; `ENOSPC` for writes past the end, as the protocol asks) and the
//! connection goes on — an oversized write's payload is read and discarded to stay in step.
//! Bad magic, unknown client flags, a truncated header or an over-long option end the
//! connection with a logged reason; nothing a client sends can panic the server.
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use eac_common::error_chain;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::dev::{BlockDev, IoError, IoResult};

/// Largest `NBD_CMD_READ` / `NBD_CMD_WRITE` length served (also advertised as the maximum
/// block size). Longer requests are answered with `EINVAL`.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Minimum block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Units of in-flight work per connection: a request costs 1 + one per 64 KiB it carries
/// or returns, so at most 2048 requests or ≈ 128 MiB of payload are held at once.
pub const INFLIGHT_BUDGET: u32 = 2048;
/// The whole option haggling must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown, connections get this long to finish the requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

const MAX_OPTION_DATA: u32 = 64 << 10;
const MAX_OPTIONS: usize = 256;
const MAX_EXPORT_NAME: usize = 4096;

// Handshake.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CFLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
const CFLAG_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission.
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The transmission flags every export of this server advertises.
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

// Error values allowed on the wire.
const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_ENOMEM: u32 = 12;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_EOVERFLOW: u32 = 75;
const NBD_ENOTSUP: u32 = 95;
const NBD_ESHUTDOWN: u32 = 108;

/// What can go wrong in the NBD export: setting up the listener, or one connection (the
/// latter is logged and ends only that connection).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The listen address is neither `host:port` nor an absolute unix socket path.
    #[error("invalid NBD listen address {addr:?}: {reason}")]
    Address { addr: String, reason: &'static str },
    /// Binding the TCP or unix socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// Another server answers on the unix socket path.
    #[error("unix socket {} is in use by a running server", path.display())]
    SocketInUse { path: PathBuf },
    /// The path exists and is not a socket; it is not removed.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    /// Reading from or writing to the client failed.
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Option haggling did not finish in time.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

type Result<T, E = NbdError> = std::result::Result<T, E>;

/// A bound NBD listening socket: TCP (`host:port`) or a unix socket (an absolute path).
#[derive(Debug)]
pub struct NbdListener {
    kind: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener, SocketAddr),
    Unix(UnixListener, SocketPath),
}

/// Removes the unix socket file when the listener goes away.
#[derive(Debug)]
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl NbdListener {
    /// Binds `addr`: a path starting with `/` is a unix socket (a stale socket file nobody
    /// answers on is replaced; a live one or a non-socket file is an error), anything else
    /// is a TCP `host:port` (`127.0.0.1:10809`, `[::1]:0`, `localhost:10809`). Must be called
    /// inside a tokio runtime.
    pub async fn bind(addr: &str) -> Result<NbdListener> {
        if addr.starts_with('/') {
            let path = PathBuf::from(addr);
            remove_stale_socket(&path)?;
            let l = UnixListener::bind(&path).map_err(|source| NbdError::Bind {
                addr: addr.to_owned(),
                source,
            })?;
            return Ok(NbdListener {
                kind: ListenerKind::Unix(l, SocketPath(path)),
            });
        }
        if !addr.contains(':') {
            return Err(NbdError::Address {
                addr: addr.to_owned(),
                reason: "expected host:port or an absolute unix socket path",
            });
        }
        let l = TcpListener::bind(addr).await.map_err(|source| NbdError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let local = l.local_addr().map_err(|source| NbdError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(NbdListener {
            kind: ListenerKind::Tcp(l, local),
        })
    }

    /// The URL a client uses for `export`: `nbd://127.0.0.1:10809/name` or
    /// `nbd+unix:///name?socket=/run/x.sock` (QEMU and libnbd syntax).
    pub fn url(&self, export: &str) -> String {
        match &self.kind {
            ListenerKind::Tcp(_, a) => format!("nbd://{a}/{export}"),
            ListenerKind::Unix(_, p) => format!("nbd+unix:///{export}?socket={}", p.0.display()),
        }
    }

    /// The bound TCP address (with the real port when `:0` was asked), if TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            ListenerKind::Tcp(_, a) => Some(*a),
            ListenerKind::Unix(..) => None,
        }
    }

    /// The unix socket path, if unix.
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.kind {
            ListenerKind::Unix(_, p) => Some(&p.0),
            ListenerKind::Tcp(..) => None,
        }
    }
}

impl fmt::Display for NbdListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ListenerKind::Tcp(_, a) => write!(f, "tcp {a}"),
            ListenerKind::Unix(_, p) => write!(f, "unix {}", p.0.display()),
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(NbdError::Bind {
                addr: path.display().to_string(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(NbdError::NotASocket { path: path.to_owned() });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(NbdError::SocketInUse { path: path.to_owned() }),
        Err(_) => {
            info!(path = %path.display(), "removing stale NBD socket");
            std::fs::remove_file(path).map_err(|source| NbdError::Bind {
                addr: path.display().to_string(),
                source,
            })
        }
    }
}

/// One export: its name and the device behind it.
struct Export<D> {
    name: String,
    dev: Arc<D>,
}

/// Serves `dev` as the export `export_name` on `listener` until `shutdown` completes.
///
/// Every accepted connection runs on its own task. On shutdown the listener closes, each
/// connection stops reading new requests, finishes the ones in flight (up to
/// [`SHUTDOWN_GRACE`]) and closes; then this returns. Connection failures are logged and
/// end only that connection; accept errors (e.g. out of file descriptors) are logged and
/// retried.
pub async fn serve<D: BlockDev>(listener: NbdListener, export_name: String, dev: Arc<D>, shutdown: impl Future) {
    let export = Arc::new(Export { name: export_name, dev });
    info!(
        url = %listener.url(&export.name),
        size = export.dev.size(),
        "NBD export listening on {listener}"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let active = Arc::new(AtomicUsize::new(0));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    warn!("NBD connection task failed: {e}");
                }
                continue;
            }
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((r, w, peer)) => {
                let export = export.clone();
                let stop = stop_rx.clone();
                // Several clients may write at once (multi-conn); a second one is worth a
                // look (libvirt's lock manager does not cover NBD disks).
                let clients = active.fetch_add(1, Ordering::SeqCst) + 1;
                let active = active.clone();
                conns.spawn(async move {
                    if clients > 1 {
                        warn!(%peer, clients, "NBD client connected while others are connected");
                    } else {
                        info!(%peer, "NBD client connected");
                    }
                    match handle_connection(r, w, export, stop).await {
                        Ok(()) => info!(%peer, "NBD client disconnected"),
                        Err(e) => warn!(%peer, "NBD connection closed: {}", error_chain(&e)),
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) => {
                warn!("NBD accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            left = conns.len(),
            "NBD connections still busy {SHUTDOWN_GRACE:?} after shutdown; closing them"
        );
        conns.shutdown().await;
    }
    info!("NBD export stopped");
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn accept(listener: &NbdListener) -> io::Result<(BoxRead, BoxWrite, String)> {
    match &listener.kind {
        ListenerKind::Tcp(l, _) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), peer.to_string()))
        }
        ListenerKind::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), format!("unix:{}", p.0.display())))
        }
    }
}

/// One client from the first byte to the close.
async fn handle_connection<D, R, W>(
    r: R,
    mut w: W,
    export: Arc<Export<D>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()>
where
    D: BlockDev,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(64 << 10, r);
    let negotiated = tokio::select! {
        res = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut r, &mut w, &export)) => {
            res.map_err(|_| NbdError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??
        }
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    let Some(neg) = negotiated else {
        return Ok(()); // NBD_OPT_ABORT
    };
    debug!(strict_align = neg.strict_align, "NBD transmission phase");
    transmission(&mut r, w, export, neg, stop).await
}

#[derive(Debug, Clone, Copy)]
struct Negotiated {
    /// The client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO: it promised to align.
    strict_align: bool,
}

async fn read_exact_or<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(NbdError::Protocol(format!("connection closed while reading {what}")))
        }
        Err(e) => Err(NbdError::Io(e)),
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, rtype: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| NbdError::Protocol("option reply too long".into()))?;
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).await?;
    w.flush().await?;
    Ok(())
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: (name, requested info types).
fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = be_u32(data) as usize;
    if name_len > data.len() - 6 {
        return Err("export name length exceeds the option data");
    }
    let name = &data[4..4 + name_len];
    let n = be_u16(&data[4 + name_len..]) as usize;
    let rest = &data[6 + name_len..];
    if rest.len() != 2 * n {
        return Err("information request count does not match the option length");
    }
    Ok((name, rest.chunks_exact(2).map(be_u16).collect()))
}

/// Option haggling. `Ok(None)`: the client aborted cleanly.
async fn handshake<D, R, W>(r: &mut R, w: &mut W, export: &Export<D>) -> Result<Option<Negotiated>>
where
    D: BlockDev,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greet).await?;
    w.flush().await?;

    let mut b4 = [0u8; 4];
    read_exact_or(r, &mut b4, "the client flags").await?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!("unknown client flags {cflags:#x}")));
    }
    let fixed = cflags & CFLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & CFLAG_NO_ZEROES != 0;
    let size = export.dev.size();

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; 16];
        read_exact_or(r, &mut hdr, "an option header").await?;
        let magic = be_u64(&hdr);
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "bad option magic {magic:#018x} (expected IHAVEOPT)"
            )));
        }
        let opt = be_u32(&hdr[8..]);
        let len = be_u32(&hdr[12..]);
        if len > MAX_OPTION_DATA {
            return Err(NbdError::Protocol(format!(
                "option {opt} carries {len} bytes (limit {MAX_OPTION_DATA})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        read_exact_or(r, &mut data, "option data").await?;
        if !fixed && opt != OPT_EXPORT_NAME {
            return Err(NbdError::Protocol(format!(
                "option {opt} from a client without fixed newstyle"
            )));
        }
        match opt {
            OPT_EXPORT_NAME => {
                if !data.is_empty() && data != export.name.as_bytes() {
                    return Err(NbdError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME asked for export {:?}; this server exports {:?}",
                        String::from_utf8_lossy(&data),
                        export.name
                    )));
                }
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&size.to_be_bytes());
                m.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&m).await?;
                w.flush().await?;
                return Ok(Some(Negotiated { strict_align: false }));
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_opt_reply(w, opt, REP_ACK, &[]).await;
                debug!("client sent NBD_OPT_ABORT");
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let name = export.name.as_bytes();
                let mut m = Vec::with_capacity(4 + name.len());
                m.extend_from_slice(&(name.len() as u32).to_be_bytes());
                m.extend_from_slice(name);
                send_opt_reply(w, opt, REP_SERVER, &m).await?;
                send_opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(&data) {
                    Ok(x) => x,
                    Err(why) => {
                        warn!("malformed NBD_OPT_INFO/GO: {why}");
                        send_opt_reply(w, opt, REP_ERR_INVALID, why.as_bytes()).await?;
                        continue;
                    }
                };
                if name.len() > MAX_EXPORT_NAME || (!name.is_empty() && name != export.name.as_bytes()) {
                    let msg = format!(
                        "unknown export {:?}; this server exports {:?}",
                        String::from_utf8_lossy(&name[..name.len().min(256)]),
                        export.name
                    );
                    send_opt_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let mut m = Vec::with_capacity(12);
                m.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                m.extend_from_slice(&size.to_be_bytes());
                m.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                send_opt_reply(w, opt, REP_INFO, &m).await?;
                if infos.contains(&INFO_NAME) {
                    let mut m = INFO_NAME.to_be_bytes().to_vec();
                    m.extend_from_slice(export.name.as_bytes());
                    send_opt_reply(w, opt, REP_INFO, &m).await?;
                }
                let mut m = Vec::with_capacity(14);
                m.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                m.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                m.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                m.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                send_opt_reply(w, opt, REP_INFO, &m).await?;
                send_opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated {
                        strict_align: infos.contains(&INFO_BLOCK_SIZE),
                    }));
                }
            }
            OPT_STARTTLS => {
                send_opt_reply(w, opt, REP_ERR_POLICY, b"TLS is not offered by this server").await?;
            }
            OPT_STRUCTURED_REPLY => {
                send_opt_reply(w, opt, REP_ERR_UNSUP, b"only simple replies are supported").await?;
            }
            _ => {
                debug!(option = opt, "unsupported NBD option");
                send_opt_reply(w, opt, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// One reply for the writer task; the permit is released once it is on the wire.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Bytes>,
    _permit: OwnedSemaphorePermit,
}

/// The NBD error value for a device error (only values the protocol defines go out).
fn wire_errno(e: IoError) -> u32 {
    match e.0 {
        libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

fn cmd_name(t: u16) -> &'static str {
    match t {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write_zeroes",
        _ => "unknown",
    }
}

/// A parsed request header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    typ: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// Reads one request header; `Ok(None)` on a clean close between requests.
async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Request>> {
    let mut h = [0u8; 28];
    let mut got = 0;
    while got < h.len() {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(NbdError::Protocol(format!(
                "connection closed after {got} of 28 request header bytes"
            )));
        }
        got += n;
    }
    let magic = be_u32(&h);
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad request magic {magic:#010x} (expected {REQUEST_MAGIC:#010x})"
        )));
    }
    Ok(Some(Request {
        flags: be_u16(&h[4..]),
        typ: be_u16(&h[6..]),
        handle: be_u64(&h[8..]),
        offset: be_u64(&h[16..]),
        len: be_u32(&h[24..]),
    }))
}

/// Budget units a request holds while in flight.
fn cost(req: &Request) -> u32 {
    match req.typ {
        CMD_READ | CMD_WRITE => 1 + req.len.min(MAX_REQUEST) / (64 << 10),
        _ => 1,
    }
}

/// Checks a request against the export before it runs: `Err(nbd errno)` to reply at once.
fn validate(req: &Request, size: u64, strict_align: bool) -> Result<(), u32> {
    let allowed = match req.typ {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }
    match req.typ {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {}
        CMD_FLUSH => return Ok(()),
        _ => return Err(NBD_EINVAL),
    }
    if matches!(req.typ, CMD_READ | CMD_WRITE) && req.len > MAX_REQUEST {
        return Err(NBD_EINVAL);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    if !in_range {
        // The protocol asks for ENOSPC on writes past the end, EINVAL otherwise.
        return Err(if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        });
    }
    if strict_align && (!req.offset.is_multiple_of(u64::from(MIN_BLOCK)) || !req.len.is_multiple_of(MIN_BLOCK)) {
        return Err(NBD_EINVAL);
    }
    Ok(())
}

/// A shared 1 MiB buffer of zeroes for `NO_HOLE` write-zeroes.
fn zero_chunk() -> Bytes {
    static Z: OnceLock<Bytes> = OnceLock::new();
    Z.get_or_init(|| Bytes::from(vec![0u8; 1 << 20])).clone()
}

/// Runs one validated request against the device.
async fn execute<D: BlockDev>(dev: &D, req: Request, payload: Option<Bytes>) -> IoResult<Option<Bytes>> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, u64::from(req.len));
    match req.typ {
        CMD_READ => {
            if len == 0 {
                return Ok(Some(Bytes::new()));
            }
            let data = dev.read(off, req.len as usize).await?;
            if data.len() != req.len as usize {
                warn!(
                    offset = off,
                    want = len,
                    got = data.len(),
                    "device returned a short read"
                );
                return Err(IoError::EIO);
            }
            Ok(Some(data))
        }
        CMD_WRITE => {
            let data = payload.unwrap_or_default();
            if !data.is_empty() {
                dev.write(off, data, fua).await?;
            }
            Ok(None)
        }
        CMD_FLUSH => dev.flush().await.map(|()| None),
        CMD_TRIM => {
            if len > 0 {
                dev.discard(off, len).await?;
                if fua {
                    dev.flush().await?;
                }
            }
            Ok(None)
        }
        CMD_WRITE_ZEROES => {
            if len == 0 {
                return Ok(None);
            }
            if req.flags & CMD_FLAG_NO_HOLE != 0 {
                // Keep the range provisioned: real writes of zeroes, never a hole punch.
                let z = zero_chunk();
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(z.len() as u64) as usize;
                    dev.write(off + done, z.slice(..n), false).await?;
                    done += n as u64;
                }
            } else {
                dev.write_zeroes(off, len).await?;
            }
            if fua {
                dev.flush().await?;
            }
            Ok(None)
        }
        _ => Err(IoError::EINVAL),
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, rep: &Reply) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&rep.error.to_be_bytes());
    h[8..].copy_from_slice(&rep.handle.to_be_bytes());
    w.write_all(&h).await?;
    if rep.error == 0
        && let Some(d) = &rep.data
    {
        w.write_all(d).await?;
    }
    Ok(())
}

/// The single writer: replies in completion order, flushed when no more are queued.
async fn writer_loop<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(rep) = rx.recv().await {
        write_reply(&mut w, &rep).await?;
        drop(rep);
        while let Ok(rep) = rx.try_recv() {
            write_reply(&mut w, &rep).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// The transmission phase: read requests, run each on its own task, reply via the writer.
async fn transmission<D, R, W>(
    r: &mut R,
    w: W,
    export: Arc<Export<D>>,
    neg: Negotiated,
    mut stop: watch::Receiver<bool>,
) -> Result<()>
where
    D: BlockDev,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(writer_loop(w, rx));
    let budget = Arc::new(Semaphore::new(INFLIGHT_BUDGET as usize));
    let size = export.dev.size();
    let mut outcome = Ok(());
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {
                debug!("shutdown: no more requests read on this connection");
                break;
            }
            _ = tx.closed() => break, // the writer failed; its error is reported below
            n = read_request(r) => n,
        };
        let req = match next {
            Ok(Some(req)) => req,
            Ok(None) => {
                debug!("client closed the connection without NBD_CMD_DISC");
                break;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        if req.typ == CMD_DISC {
            debug!("NBD_CMD_DISC: finishing requests in flight");
            break;
        }
        let permit = match budget.clone().acquire_many_owned(cost(&req)).await {
            Ok(p) => p,
            Err(_) => break, // never closed
        };
        // The payload of every write is consumed, valid or not, to stay in step.
        let mut payload = None;
        if req.typ == CMD_WRITE {
            if req.len > MAX_REQUEST {
                let mut sink = tokio::io::sink();
                match tokio::io::copy(&mut (&mut *r).take(u64::from(req.len)), &mut sink).await {
                    Ok(n) if n == u64::from(req.len) => {}
                    Ok(_) => {
                        outcome = Err(NbdError::Protocol("connection closed inside a write payload".into()));
                        break;
                    }
                    Err(e) => {
                        outcome = Err(NbdError::Io(e));
                        break;
                    }
                }
            } else {
                let mut buf = vec![0u8; req.len as usize];
                if let Err(e) = read_exact_or(r, &mut buf, "a write payload").await {
                    outcome = Err(e);
                    break;
                }
                payload = Some(Bytes::from(buf));
            }
        }
        if let Err(errno) = validate(&req, size, neg.strict_align) {
            debug!(
                cmd = cmd_name(req.typ),
                flags = req.flags,
                offset = req.offset,
                len = req.len,
                errno,
                "NBD request refused"
            );
            let _ = tx.send(Reply {
                handle: req.handle,
                error: errno,
                data: None,
                _permit: permit,
            });
            continue;
        }
        let tx = tx.clone();
        let dev = export.dev.clone();
        tokio::spawn(async move {
            let res = std::panic::AssertUnwindSafe(execute(&*dev, req, payload))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    warn!(cmd = cmd_name(req.typ), "block device panicked; answering EIO");
                    Err(IoError::EIO)
                });
            let (error, data) = match res {
                Ok(d) => (0, d),
                Err(e) => {
                    debug!(
                        cmd = cmd_name(req.typ),
                        offset = req.offset,
                        len = req.len,
                        "NBD request failed: {e}"
                    );
                    (wire_errno(e), None)
                }
            };
            let _ = tx.send(Reply {
                handle: req.handle,
                error,
                data,
                _permit: permit,
            });
        });
    }
    drop(tx);
    // The writer ends once every request task has sent its reply and dropped its sender.
    match writer.await {
        Ok(Ok(())) => outcome,
        Ok(Err(e)) => outcome.and(Err(NbdError::Io(e))),
        Err(_) => outcome.and(Err(NbdError::Protocol("reply writer task failed".into()))),
    }
}

#[cfg(test)]
mod tests;
