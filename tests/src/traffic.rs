//! Traffic that tests measure: a TCP stream from a client to a server, timestamped at the
//! receiver, so a test can say how long a fault interrupted it and whether the connection
//! survived (no reset).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
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
