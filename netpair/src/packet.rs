//! Raw layer-2 frames on an interface: ARP path probes from the application NIC, and the
//! gratuitous ARP / unsolicited IPv6 Neighbor Advertisement sent on a guest's behalf (with the
//! guest's source MAC) so a switch learns the guest's MAC on the port its traffic now uses.
//!
//! - Pure builders and parsers ([`build_arp_request`], [`parse_arp_reply`], [`build_garp`],
//!   [`build_unsolicited_na`], [`icmpv6_checksum`]): no I/O, never panic on any input.
//! - [`ArpProber`]: a non-blocking `AF_PACKET` socket bound to one interface (ETH_P_ARP);
//!   [`AsyncArpProber`] is the same registered with tokio's reactor.
//! - [`Announcer`] (and [`announce_ipv4`] / [`announce_ipv6`]): sends announcements.
//!
//! All sockets need CAP_NET_RAW and belong to the network namespace of the thread that opens
//! them; the interface's MAC and index are read through that socket (SIOCGIFHWADDR,
//! SIOCGIFINDEX), not through /sys, which shows the namespace sysfs was mounted in.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::io::unix::AsyncFd;

pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// The Ethernet destination of ff02::1 (all nodes).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// ff02::1.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Frames shorter than this (without FCS) are padded: the Ethernet minimum.
pub const ETH_MIN_FRAME: usize = 60;
const ETH_HLEN: usize = 14;
const ARP_LEN: usize = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// NA flags: Override (RFC 4861 §4.4), not Router, not Solicited.
const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// ICMPv6 NA: type, code, checksum, flags (8) + target (16) + option (8).
const NA_LEN: usize = 32;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

fn arp_frame(eth_dst: [u8; 6], op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_MIN_FRAME);
    ethernet(eth_dst, sha, ETH_P_ARP, &mut f);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(ETH_MIN_FRAME, 0);
    f
}

/// A broadcast ARP request "who has `target`? tell `src_ip`" from `src_mac` (60 bytes).
pub fn build_arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp_frame(BROADCAST, ARP_REQUEST, src_mac, src_ip, [0; 6], target)
}

/// A gratuitous ARP for a guest: a broadcast ARP request with sender = target = `guest_ip`,
/// from `guest_mac` (Ethernet source and ARP sender), target hardware address zero (RFC 5227
/// announcement). Switches learn `guest_mac` on the port it leaves by; neighbours update
/// their cache entry for `guest_ip`.
pub fn build_garp(guest_mac: [u8; 6], guest_ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(BROADCAST, ARP_REQUEST, guest_mac, guest_ip, [0; 6], guest_ip)
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 = request, 2 = reply.
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

/// Parses an Ethernet frame carrying IPv4-over-Ethernet ARP; `None` for anything else
/// (other ethertype, other hardware/protocol, short frame).
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let eth = frame.get(..ETH_HLEN)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_ARP {
        return None;
    }
    let a = frame.get(ETH_HLEN..ETH_HLEN + ARP_LEN)?;
    let u16_at = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    if u16_at(0) != 1 || u16_at(2) != ETH_P_IPV4 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    let mac_at = |i: usize| -> [u8; 6] { [a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5]] };
    let ip_at = |i: usize| Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]);
    Some(Arp {
        op: u16_at(6),
        sender_mac: mac_at(8),
        sender_ip: ip_at(14),
        target_mac: mac_at(18),
        target_ip: ip_at(24),
    })
}

/// The (sender IP, sender MAC) of an ARP reply; `None` for anything else.
pub fn parse_arp_reply(frame: &[u8]) -> Option<(Ipv4Addr, [u8; 6])> {
    parse_arp(frame)
        .filter(|a| a.op == ARP_REPLY)
        .map(|a| (a.sender_ip, a.sender_mac))
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `msg` (checksum field zeroed or not: it is skipped)
/// between `src` and `dst`: one's complement sum over the pseudo-header (source, destination,
/// upper-layer length, next header 58) and the message.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    fn add(sum: &mut u32, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            *sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            *sum += u32::from(*last) << 8;
        }
    }
    let mut sum = 0u32;
    add(&mut sum, &src.octets());
    add(&mut sum, &dst.octets());
    add(&mut sum, &(msg.len() as u32).to_be_bytes());
    add(&mut sum, &[0, 0, 0, IPPROTO_ICMPV6]);
    // The checksum field (bytes 2..4) counts as zero.
    add(&mut sum, msg.get(..2).unwrap_or(msg));
    if msg.len() > 4 {
        add(&mut sum, &msg[4..]);
    }
    // Folding twice suffices for any message that fits in an IPv6 packet (< 2^16 words).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// An unsolicited Neighbor Advertisement for a guest (RFC 4861 §7.2.6): from `guest_mac` and
/// `guest_ip6` to ff02::1 (33:33:00:00:00:01), hop limit 255, flags Override only, target
/// `guest_ip6` with a target link-layer address option carrying `guest_mac` (86 bytes).
pub fn build_unsolicited_na(guest_mac: [u8; 6], guest_ip6: Ipv6Addr) -> Vec<u8> {
    let mut na = Vec::with_capacity(NA_LEN);
    na.push(ND_NEIGHBOR_ADVERT);
    na.push(0); // code
    na.extend_from_slice(&[0, 0]); // checksum, filled below
    na.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    na.extend_from_slice(&guest_ip6.octets());
    na.push(ND_OPT_TARGET_LL_ADDR);
    na.push(1); // option length in units of 8 bytes
    na.extend_from_slice(&guest_mac);
    let sum = icmpv6_checksum(guest_ip6, ALL_NODES, &na);
    na[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(ETH_HLEN + 40 + NA_LEN);
    ethernet(ALL_NODES_MAC, guest_mac, ETH_P_IPV6, &mut f);
    f.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // version 6, traffic class 0, flow 0
    f.extend_from_slice(&(NA_LEN as u16).to_be_bytes()); // payload length
    f.push(IPPROTO_ICMPV6); // next header
    f.push(255); // hop limit: receivers drop ND with any other value
    f.extend_from_slice(&guest_ip6.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&na);
    f
}

/// An `AF_PACKET`/`SOCK_RAW` socket on one interface (non-blocking, close-on-exec).
#[derive(Debug)]
struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

fn sockaddr_ll(ifindex: i32, protocol: u16, dst: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is a plain C struct of integers and a byte array; all-zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = protocol.to_be();
    sa.sll_ifindex = ifindex;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&dst);
    sa
}

fn ifreq(iface: &str) -> io::Result<libc::ifreq> {
    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?} is not an interface name"),
        ));
    }
    // SAFETY: ifreq is a plain C struct (a name array and a union of plain data); all-zero is valid.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

impl RawSocket {
    /// Opens a socket on `iface`; with `receive = Some(protocol)` it is bound to receive
    /// that ethertype from `iface` only, with `None` it only sends.
    fn open(iface: &str, receive: Option<u16>) -> io::Result<Self> {
        let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} on {iface}: {e}"));
        // Protocol 0: nothing is queued until bind() names the protocol and the interface, so
        // no frame from another interface slips in between.
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(ctx("AF_PACKET socket (needs CAP_NET_RAW)", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut req = ifreq(iface)?;
        // SAFETY: SIOCGIFINDEX reads the name from and writes an int into the ifreq, which
        // is live and writable for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
            return Err(ctx("SIOCGIFINDEX", io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFINDEX succeeded, so the union holds ifru_ifindex.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };

        let mut req = ifreq(iface)?;
        // SAFETY: SIOCGIFHWADDR writes a sockaddr into the live, writable ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
            return Err(ctx("SIOCGIFHWADDR", io::Error::last_os_error()));
        }
        // SAFETY: SIOCGIFHWADDR succeeded, so the union holds ifru_hwaddr.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        if hw.sa_family != libc::ARPHRD_ETHER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{iface} is not an Ethernet interface (hardware type {})", hw.sa_family),
            ));
        }
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(hw.sa_data) {
            *m = b as u8;
        }

        if let Some(protocol) = receive {
            // Bound to one ethertype, a packet socket only sees frames the stack delivers
            // after the rx_handler; on a bridge port (our application NIC) the bridge consumes
            // them first. So tap ETH_P_ALL — which runs before the bridge — and let a classic
            // BPF filter in the kernel keep only `protocol`, attached before bind so no other
            // frame is ever queued.
            let filter = [
                libc::sock_filter {
                    code: 0x28,
                    jt: 0,
                    jf: 0,
                    k: 12,
                }, // ldh [12]  (ethertype)
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: u32::from(protocol),
                }, // jeq protocol
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0004_0000,
                }, // ret: accept
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0,
                }, // ret: drop
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            // SAFETY: setsockopt copies the sock_fprog and the filter array it points to, both
            // live locals, during the call.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    size_of::<libc::sock_fprog>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(ctx("attach socket filter", io::Error::last_os_error()));
            }
            let sa = sockaddr_ll(ifindex, libc::ETH_P_ALL as u16, [0; 6]);
            // SAFETY: bind reads a sockaddr_ll of the given size from a live local.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(ctx("bind AF_PACKET socket", io::Error::last_os_error()));
            }
        }
        Ok(Self { fd, ifindex, mac })
    }

    /// Sends one complete Ethernet frame (header included) out of the interface.
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let (dst, proto) = match frame.get(..ETH_HLEN) {
            Some(h) => ([h[0], h[1], h[2], h[3], h[4], h[5]], u16::from_be_bytes([h[12], h[13]])),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "frame shorter than an Ethernet header",
                ));
            }
        };
        let sa = sockaddr_ll(self.ifindex, proto, dst);
        // SAFETY: sendto reads `frame.len()` bytes from the live slice and a sockaddr_ll of
        // the given size from a live local.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!("short send: {n} of {} bytes", frame.len())));
        }
        Ok(())
    }

    /// Receives one frame not sent by this host; `WouldBlock` when none is queued.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut sa: libc::sockaddr_ll = unsafe { zeroed() };
            let mut salen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most `buf.len()` bytes into the live, writable
            // buffer and at most `salen` bytes into the live local `sa`.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sa as *mut libc::sockaddr_ll).cast(),
                    &mut salen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if sa.sll_pkttype == libc::PACKET_OUTGOING {
                continue; // our own probes, looped back to packet sockets
            }
            return Ok(n as usize);
        }
    }
}

/// Sends ARP requests from one interface to path-probe targets and collects their replies.
///
/// Non-blocking; poll [`ArpProber::recv_replies`], or use [`AsyncArpProber`] under tokio.
#[derive(Debug)]
pub struct ArpProber {
    sock: RawSocket,
    ip: Ipv4Addr,
}

impl ArpProber {
    /// A prober on `iface` (its MAC is read from the interface) asking as `our_ip`.
    pub fn new(iface: &str, our_ip: Ipv4Addr) -> io::Result<Self> {
        Ok(Self {
            sock: RawSocket::open(iface, Some(ETH_P_ARP))?,
            ip: our_ip,
        })
    }

    /// The interface's MAC: the sender of our requests.
    pub fn mac(&self) -> [u8; 6] {
        self.sock.mac
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ifindex(&self) -> i32 {
        self.sock.ifindex
    }

    /// Broadcasts "who has `target`? tell our IP".
    pub fn send_probe(&self, target: Ipv4Addr) -> io::Result<()> {
        self.sock
            .send(&build_arp_request(self.sock.mac, self.ip, target))
            .map_err(|e| io::Error::new(e.kind(), format!("ARP probe for {target}: {e}")))
    }

    /// Every ARP reply addressed to our IP queued so far, as (their IP, their MAC); empty
    /// when there is none. Other ARP traffic is read and dropped.
    pub fn recv_replies(&mut self) -> io::Result<Vec<(Ipv4Addr, [u8; 6])>> {
        match self.drain() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Vec::new()),
            r => r,
        }
    }

    /// Reads until the socket is empty: the replies, or `WouldBlock` when none was among
    /// the frames read (so an async caller clears readiness).
    fn drain(&self) -> io::Result<Vec<(Ipv4Addr, [u8; 6])>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if let Some(a) = parse_arp(&buf[..n.min(buf.len())])
                        && a.op == ARP_REPLY
                        && a.target_ip == self.ip
                    {
                        out.push((a.sender_ip, a.sender_mac));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !out.is_empty() => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for ArpProber {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.fd.as_fd()
    }
}

impl AsRawFd for ArpProber {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.fd.as_raw_fd()
    }
}

/// [`ArpProber`] registered with tokio's reactor: `recv_replies().await` wakes when replies
/// arrive. Must be created inside a tokio runtime.
#[derive(Debug)]
pub struct AsyncArpProber {
    inner: AsyncFd<ArpProber>,
}

impl AsyncArpProber {
    pub fn new(iface: &str, our_ip: Ipv4Addr) -> io::Result<Self> {
        let prober = ArpProber::new(iface, our_ip)?;
        // SAFETY: the prober owns its descriptor (an OwnedFd that nothing replaces or closes
        // before the prober is dropped), and this type only ever hands out `&ArpProber`, so
        // the descriptor stays open and the same for the whole life of the AsyncFd.
        let inner = unsafe { AsyncFd::register_with_interest(prober, tokio::io::Interest::READABLE) }?;
        Ok(Self { inner })
    }

    pub fn get_ref(&self) -> &ArpProber {
        self.inner.get_ref()
    }

    /// Broadcasts "who has `target`? tell our IP" (a full socket buffer is an error, not a wait:
    /// a probe that cannot leave now is a probe lost).
    pub fn send_probe(&self, target: Ipv4Addr) -> io::Result<()> {
        self.inner.get_ref().send_probe(target)
    }

    /// Every ARP reply addressed to our IP queued now, without waiting (empty: none).
    pub fn try_recv_replies(&self) -> io::Result<Vec<(Ipv4Addr, [u8; 6])>> {
        match self.inner.get_ref().drain() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Vec::new()),
            r => r,
        }
    }

    /// Waits for at least one ARP reply addressed to our IP and returns all queued ones.
    /// Cancel-safe: a reply is only consumed when it is returned.
    pub async fn recv_replies(&self) -> io::Result<Vec<(Ipv4Addr, [u8; 6])>> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|p| p.get_ref().drain()) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Sends announcements on a guest's behalf from one interface.
#[derive(Debug)]
pub struct Announcer {
    sock: RawSocket,
    iface: String,
}

impl Announcer {
    pub fn new(iface: &str) -> io::Result<Self> {
        Ok(Self {
            sock: RawSocket::open(iface, None)?,
            iface: iface.to_owned(),
        })
    }

    /// A gratuitous ARP for `guest_ip` at `guest_mac` ([`build_garp`]).
    pub fn ipv4(&self, guest_mac: [u8; 6], guest_ip: Ipv4Addr) -> io::Result<()> {
        self.sock.send(&build_garp(guest_mac, guest_ip)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("gratuitous ARP for {guest_ip} on {}: {e}", self.iface),
            )
        })
    }

    /// An unsolicited NA for `guest_ip6` at `guest_mac` ([`build_unsolicited_na`]).
    pub fn ipv6(&self, guest_mac: [u8; 6], guest_ip6: Ipv6Addr) -> io::Result<()> {
        self.sock
            .send(&build_unsolicited_na(guest_mac, guest_ip6))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("unsolicited NA for {guest_ip6} on {}: {e}", self.iface),
                )
            })
    }
}

/// Sends one gratuitous ARP for a guest from `iface` (opens a socket for the call; keep an
/// [`Announcer`] to send many).
pub fn announce_ipv4(iface: &str, guest_mac: [u8; 6], guest_ip: Ipv4Addr) -> io::Result<()> {
    Announcer::new(iface)?.ipv4(guest_mac, guest_ip)
}

/// Sends one unsolicited Neighbor Advertisement for a guest from `iface`.
pub fn announce_ipv6(iface: &str, guest_mac: [u8; 6], guest_ip6: Ipv6Addr) -> io::Result<()> {
    Announcer::new(iface)?.ipv6(guest_mac, guest_ip6)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn arp_request_layout() {
        let f = build_arp_request(MAC, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 254));
        #[rustfmt::skip]
        let want: &[u8] = &[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 0, 0, 1,
            0, 0, 0, 0, 0, 0, 10, 0, 0, 254,
        ];
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..42], want);
        assert!(f[42..].iter().all(|&b| b == 0));
        let a = parse_arp(&f).unwrap();
        assert_eq!(
            (a.op, a.sender_ip, a.target_ip),
            (1, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 254))
        );
        assert_eq!(parse_arp_reply(&f), None, "a request is not a reply");
    }

    #[test]
    fn arp_reply_is_parsed() {
        let theirs = [2, 0, 0, 0, 0, 9];
        let f = arp_frame(
            MAC,
            ARP_REPLY,
            theirs,
            Ipv4Addr::new(10, 0, 0, 254),
            MAC,
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert_eq!(parse_arp_reply(&f), Some((Ipv4Addr::new(10, 0, 0, 254), theirs)));
        // Without padding (as a kernel sends it on veth) too.
        assert_eq!(parse_arp_reply(&f[..42]), Some((Ipv4Addr::new(10, 0, 0, 254), theirs)));
    }

    #[test]
    fn garp_layout() {
        let ip = Ipv4Addr::new(192, 168, 7, 50);
        let f = build_garp(MAC, ip);
        let a = parse_arp(&f).unwrap();
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(
            a,
            Arp {
                op: 1,
                sender_mac: MAC,
                sender_ip: ip,
                target_mac: [0; 6],
                target_ip: ip
            }
        );
    }

    #[test]
    fn truncated_and_garbage_frames_are_none() {
        let good = arp_frame(
            MAC,
            ARP_REPLY,
            MAC,
            Ipv4Addr::new(1, 2, 3, 4),
            MAC,
            Ipv4Addr::new(5, 6, 7, 8),
        );
        for len in 0..42 {
            assert_eq!(parse_arp(&good[..len]), None, "truncated to {len}");
        }
        // Wrong ethertype, hardware type, protocol type, lengths.
        for (i, v) in [(12, 0x86), (15, 6), (16, 0x86), (18, 8), (19, 16)] {
            let mut f = good.clone();
            f[i] = v;
            assert_eq!(parse_arp(&f), None, "byte {i} = {v:#x}");
        }
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 80) as usize;
            let mut f: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            if len > 14 && x & 1 == 0 {
                f[12] = 0x08;
                f[13] = 0x06;
            }
            let _ = parse_arp_reply(&f);
        }
        assert_eq!(parse_arp_reply(&build_unsolicited_na(MAC, Ipv6Addr::LOCALHOST)), None);
    }

    #[test]
    fn unsolicited_na_layout_and_checksum() {
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = build_unsolicited_na(MAC, ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[..6], &ALL_NODES_MAC);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip6 = &f[14..54];
        assert_eq!(ip6[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip6[4], ip6[5]]), 32, "payload length");
        assert_eq!(ip6[6], 58, "next header ICMPv6");
        assert_eq!(ip6[7], 255, "hop limit");
        assert_eq!(&ip6[8..24], &ip.octets());
        assert_eq!(&ip6[24..40], &ALL_NODES.octets());
        let na = &f[54..];
        assert_eq!((na[0], na[1]), (136, 0));
        assert_eq!(&na[4..8], &[0x20, 0, 0, 0], "Override only");
        assert_eq!(&na[8..24], &ip.octets());
        assert_eq!(&na[24..32], &[2, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        // Computed independently (a few lines of Python summing the pseudo-header and the
        // message as 16-bit words, folding the carries, complementing).
        assert_eq!(u16::from_be_bytes([na[2], na[3]]), 0x7451);
        let ll: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        let f = build_unsolicited_na(MAC, ll);
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), 0xcb68);
        // A receiver's check: the sum over everything, checksum included, is 0xffff.
        assert_eq!(
            icmpv6_checksum(ll, ALL_NODES, &f[54..]),
            0xcb68,
            "the checksum field is skipped"
        );
    }

    #[test]
    fn icmpv6_checksum_handles_odd_and_tiny_messages() {
        // RFC 1071 style: an odd trailing byte is padded with zero.
        let a = icmpv6_checksum(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, &[128, 0, 0, 0, 1]);
        let b = icmpv6_checksum(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, &[128, 0, 0, 0, 1, 0]);
        assert_ne!(a, b, "the length is part of the pseudo-header");
        for len in 0..6 {
            let _ = icmpv6_checksum(Ipv6Addr::LOCALHOST, ALL_NODES, &[0xff; 6][..len]);
        }
    }

    #[test]
    fn bad_interface_names_are_refused_before_any_syscall() {
        for n in ["", "a-name-that-is-too-long", "nul\0"] {
            assert_eq!(ifreq(n).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{n:?}");
        }
    }
}
