//! Traffic that tests measure: a TCP stream from a client to a server, timestamped at the
//! receiver, so a test can say how long a fault interrupted it and whether the connection
//! survived (no reset); and a UDP stream (one small datagram per millisecond, timestamped at
//! the receiver) that shows the raw path gap without TCP's retransmission back-off.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Error, netns::Netns};

/// A running stream: the client writes a small chunk every `interval`; the server records
/// when each read returned.
pub struct TcpStreamProbe {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    client: Option<JoinHandle<Result<u64, String>>>,
    server: Option<JoinHandle<Result<u64, String>>>,
}

/// What the stream saw.
#[derive(Debug)]
pub struct StreamReport {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Errors of either side (a reset shows up here); empty when the connection survived.
    pub errors: Vec<String>,
}

impl TcpStreamProbe {
    /// Starts a server on `server_ip:port` inside `server_ns` and a client inside
    /// `client_ns` that sends 64 bytes every millisecond.
    pub fn start(server_ns: &Netns, server_ip: &str, port: u16, client_ns: &Netns) -> Result<Self, Error> {
        let addr: SocketAddr = format!("{server_ip}:{port}").parse().expect("valid address");
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(100_000)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, arr) = (stop.clone(), arrivals.clone());
        let server = server_ns.spawn(move || -> Result<u64, String> {
            let l = TcpListener::bind(addr).map_err(|e| format!("server bind {addr}: {e}"))?;
            let _ = ready_tx.send(());
            let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(100))).ok();
            let mut buf = [0u8; 65536];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => {
                        total += n as u64;
                        arr.lock().unwrap().push(Instant::now());
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        if st.load(Ordering::Relaxed) {
                            return Ok(total);
                        }
                    }
                    Err(e) => return Err(format!("server read: {e}")),
                }
            }
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5)).map_err(|_| Error::Io {
            what: "stream server".into(),
            source: std::io::Error::other("did not start"),
        })?;
        let st = stop.clone();
        let client = client_ns.spawn(move || -> Result<u64, String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_nodelay(true).ok();
            let chunk = [0x5au8; 64];
            let mut total = 0u64;
            while !st.load(Ordering::Relaxed) {
                s.write_all(&chunk).map_err(|e| format!("client write: {e}"))?;
                total += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(total)
        })?;
        let probe = Self {
            stop,
            arrivals,
            client: Some(client),
            server: Some(server),
        };
        crate::wait_until(Duration::from_secs(5), "first bytes of the stream", || {
            probe.arrivals() > 0
        })?;
        Ok(probe)
    }

    pub fn arrivals(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// The longest time without data arriving, between `from` and now.
    pub fn max_gap_since(&self, from: Instant) -> Duration {
        let a = self.arrivals.lock().unwrap();
        let mut prev = from;
        let mut max = Duration::ZERO;
        for &t in a.iter().filter(|&&t| t >= from) {
            max = max.max(t - prev);
            prev = t;
        }
        max.max(Instant::now().saturating_duration_since(prev))
    }

    /// Data arrived after `t`.
    pub fn flowing_after(&self, t: Instant) -> bool {
        self.arrivals.lock().unwrap().last().is_some_and(|&l| l > t)
    }

    /// The longest time without data arriving between `from` and now, with where it began
    /// and whether it is still open (nothing has arrived since).
    pub fn longest_gap_since(&self, from: Instant) -> Gap {
        longest_gap(&self.arrivals.lock().unwrap(), from, Instant::now())
    }

    /// Stops both sides and reports. The server drains for up to 100 ms.
    pub fn stop(mut self) -> StreamReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        let sent = join(self.client.take(), &mut errors);
        let received = join(self.server.take(), &mut errors);
        StreamReport {
            bytes_sent: sent,
            bytes_received: received,
            errors,
        }
    }
}

fn join(h: Option<JoinHandle<Result<u64, String>>>, errors: &mut Vec<String>) -> u64 {
    match h.map(|h| h.join()) {
        Some(Ok(Ok(n))) => n,
        Some(Ok(Err(e))) => {
            errors.push(e);
            0
        }
        Some(Err(_)) => {
            errors.push("stream thread panicked".into());
            0
        }
        None => 0,
    }
}

impl Drop for TcpStreamProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A gap in a stream's arrivals.
#[derive(Clone, Copy, Debug)]
pub struct Gap {
    /// The last arrival before the gap (or the start of the window if none came before).
    pub start: Instant,
    pub len: Duration,
    /// Nothing has arrived since `start`: the gap lasts at least `len`.
    pub open: bool,
}

/// The longest gap in `arrivals` (sorted) between `from` and `now`. The gap in progress at
/// `from` counts from the last arrival before `from`, so a fault injected at `from` is
/// measured from the last datagram that made it through.
pub fn longest_gap(arrivals: &[Instant], from: Instant, now: Instant) -> Gap {
    let i = arrivals.partition_point(|&t| t < from);
    let mut prev = if i > 0 { arrivals[i - 1] } else { from };
    let mut best = Gap {
        start: prev,
        len: Duration::ZERO,
        open: false,
    };
    for &t in &arrivals[i..] {
        if t - prev > best.len {
            best = Gap {
                start: prev,
                len: t - prev,
                open: false,
            };
        }
        prev = t;
    }
    let tail = now.saturating_duration_since(prev);
    if tail > best.len {
        best = Gap {
            start: prev,
            len: tail,
            open: true,
        };
    }
    best
}

/// A UDP stream: the client sends a small numbered datagram every `interval` (paced on an
/// absolute schedule; it skips rather than bursts when it falls behind), the server records
/// the arrival time of each one.
pub struct UdpStreamProbe {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
    max_seq: Arc<AtomicU64>,
    client: Option<JoinHandle<Result<u64, String>>>,
    server: Option<JoinHandle<Result<u64, String>>>,
}

/// What the UDP stream saw.
#[derive(Debug)]
pub struct UdpReport {
    pub sent: u64,
    pub received: u64,
    /// Datagrams sent but never received (sent − received, counting only up to the last one
    /// that was received, so datagrams in flight at stop do not count).
    pub lost: u64,
    pub errors: Vec<String>,
}

impl UdpStreamProbe {
    /// Starts a receiver on `server_ip:port` inside `server_ns` and a sender inside
    /// `client_ns` sending 16-byte datagrams every `interval`; returns once the first
    /// datagram has arrived.
    pub fn start(
        server_ns: &Netns,
        server_ip: &str,
        port: u16,
        client_ns: &Netns,
        interval: Duration,
    ) -> Result<Self, Error> {
        let addr: SocketAddr = format!("{server_ip}:{port}").parse().expect("valid address");
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(200_000)));
        let max_seq = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, arr, mx) = (stop.clone(), arrivals.clone(), max_seq.clone());
        let server = server_ns.spawn(move || -> Result<u64, String> {
            let s = UdpSocket::bind(addr).map_err(|e| format!("udp bind {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            let mut n = 0u64;
            loop {
                match s.recv(&mut buf) {
                    Ok(len) => {
                        let now = Instant::now();
                        n += 1;
                        let seq = if len >= 8 {
                            u64::from_be_bytes(buf[..8].try_into().unwrap())
                        } else {
                            0
                        };
                        mx.fetch_max(seq, Ordering::Relaxed);
                        arr.lock().unwrap().push((now, seq));
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(format!("udp recv: {e}")),
                }
                if st.load(Ordering::Relaxed) {
                    return Ok(n);
                }
            }
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5)).map_err(|_| Error::Io {
            what: "udp stream receiver".into(),
            source: std::io::Error::other("did not start"),
        })?;
        let st = stop.clone();
        let client = client_ns.spawn(move || -> Result<u64, String> {
            let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
            s.connect(addr).map_err(|e| format!("udp connect {addr}: {e}"))?;
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                seq += 1;
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&seq.to_be_bytes());
                // While the path is down the neighbour may be unresolved or the device
                // down: such errors are part of the fault, not of the probe.
                let _ = s.send(&d);
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else if now - next > interval {
                    next = now;
                }
            }
            Ok(seq)
        })?;
        let probe = Self {
            stop,
            arrivals,
            max_seq,
            client: Some(client),
            server: Some(server),
        };
        crate::wait_until(Duration::from_secs(10), "first datagram of the UDP stream", || {
            probe.arrivals() > 0
        })?;
        Ok(probe)
    }

    pub fn arrivals(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn times(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().iter().map(|&(t, _)| t).collect()
    }

    /// The longest gap between arrivals from `from` to now (see [`longest_gap`]).
    pub fn longest_gap_since(&self, from: Instant) -> Gap {
        longest_gap(&self.times(), from, Instant::now())
    }

    /// The longest gap between arrivals within `[from, to]` (a quiet period's noise floor).
    pub fn max_gap_between(&self, from: Instant, to: Instant) -> Duration {
        let a = self.times();
        let end = a.partition_point(|&t| t <= to);
        longest_gap(&a[..end], from, to).len
    }

    /// Where the first loss after `from` began: the arrival time of the last datagram
    /// before the first missing sequence number (None when nothing was lost).
    pub fn first_loss_since(&self, from: Instant) -> Option<Instant> {
        let a = self.arrivals.lock().unwrap();
        let i = a.partition_point(|&(t, _)| t < from);
        let mut prev = *a.get(i.checked_sub(1)?)?;
        for &(t, seq) in &a[i..] {
            if seq > prev.1 + 1 {
                return Some(prev.0);
            }
            if seq > prev.1 {
                prev = (t, seq);
            }
        }
        None
    }

    /// Datagrams lost since `from`: sequence numbers missing between the last one received
    /// before `from` and the last one received. Unlike a gap in time, this does not count a
    /// sender that was not scheduled (it skips, it does not number the slots it missed).
    pub fn lost_since(&self, from: Instant) -> u64 {
        let a = self.arrivals.lock().unwrap();
        let i = a.partition_point(|&(t, _)| t < from);
        let Some(&(_, first)) = a.get(i.saturating_sub(1)) else {
            return 0;
        };
        let seqs: std::collections::BTreeSet<u64> = a[i..].iter().map(|&(_, s)| s).filter(|&s| s > first).collect();
        let last = seqs.last().copied().unwrap_or(first);
        (last - first).saturating_sub(seqs.len() as u64)
    }

    /// A datagram arrived after `t`.
    pub fn flowing_after(&self, t: Instant) -> bool {
        self.arrivals.lock().unwrap().last().is_some_and(|&(l, _)| l > t)
    }

    /// Stops both sides and reports.
    pub fn stop(mut self) -> UdpReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        let sent = join(self.client.take(), &mut errors);
        let received = join(self.server.take(), &mut errors);
        let last = self.max_seq.load(Ordering::Relaxed);
        UdpReport {
            sent,
            received,
            lost: last.saturating_sub(received),
            errors,
        }
    }
}

impl Drop for UdpStreamProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
