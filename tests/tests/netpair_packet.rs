//! netpair's raw frames on a real kernel: an ARP probe gets its reply with the right MAC, a
//! gratuitous ARP and an unsolicited NA sent with a guest's MAC make a neighbour update its
//! tables and a bridge learn the guest's MAC on the port they came in by.
//!
//! Topology (per test): namespace `h` (the netpair host, interface `app0`) joined by a veth to
//! namespace `sw` (a bridge `br0` with port `port0`, 10.77.0.1/24 on the bridge — a switch
//! with a router on it). Privileged: run by scripts/test.sh as root (`-- --ignored`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use eac_lab::{netns::Netns, require_root, topology, wait_until};
use netpair::{Mac, packet};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

struct Pair {
    h: Netns,
    sw: Netns,
}

fn pair(tag: &str) -> Pair {
    let h = Netns::create(&format!("{tag}-h")).unwrap();
    let sw = Netns::create(&format!("{tag}-sw")).unwrap();
    topology::veth(&h, "app0", &sw, "port0").unwrap();
    sw.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    sw.ip(&["link", "set", "port0", "master", "br0"]).unwrap();
    sw.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"]).unwrap();
    sw.ip(&["addr", "add", "2001:db8:77::1/64", "dev", "br0", "nodad"])
        .unwrap();
    for (ns, dev) in [(&sw, "port0"), (&sw, "br0"), (&h, "app0")] {
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    Pair { h, sw }
}

fn mac_of(ns: &Netns, dev: &str) -> Mac {
    ns.exec("cat", &[&format!("/sys/class/net/{dev}/address")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn sysctl(ns: &Netns, key: &str, value: &str) {
    ns.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]).unwrap();
}

/// The bridge has learned `mac` on `port0` (its forwarding database).
fn fdb_has(sw: &Netns, mac: Mac) -> bool {
    let fdb = sw.exec("bridge", &["fdb", "show", "dev", "port0"]).unwrap();
    fdb.lines()
        .any(|l| l.starts_with(&mac.to_string()) && !l.contains("permanent"))
}

fn neigh_has(sw: &Netns, family: &str, ip: &str, mac: Mac) -> bool {
    let out = sw.ip(&[family, "neigh", "show", ip, "dev", "br0"]).unwrap();
    out.contains(&format!("lladdr {mac}"))
}

#[test]
#[ignore = "privileged: needs root and network namespaces; run by scripts/test.sh"]
fn arp_probe_gets_the_reply_with_the_right_mac() {
    require_root();
    let p = pair("arp");
    let host_mac = mac_of(&p.h, "app0");
    let router_mac = mac_of(&p.sw, "br0");
    let (replies, took) =
        p.h.enter(|| {
            let mut prober = packet::ArpProber::new("app0", HOST_IP).unwrap();
            assert_eq!(Mac(prober.mac()), host_mac, "the prober's MAC is the interface's");
            assert!(
                prober.recv_replies().unwrap().is_empty(),
                "nothing before the first probe"
            );
            let mut replies = Vec::new();
            let took = wait_until(Duration::from_secs(5), "an ARP reply from the router", || {
                prober.send_probe(ROUTER_IP).unwrap();
                prober.send_probe(Ipv4Addr::new(10, 77, 0, 99)).unwrap(); // nobody has it
                std::thread::sleep(Duration::from_millis(20));
                replies.extend(prober.recv_replies().unwrap());
                !replies.is_empty()
            })
            .unwrap();
            // Give a reply for the absent address every chance to (wrongly) show up.
            std::thread::sleep(Duration::from_millis(200));
            replies.extend(prober.recv_replies().unwrap());
            (replies, took)
        })
        .unwrap();
    println!("ARP reply after {took:?}: {replies:?}");
    assert!(
        replies
            .iter()
            .all(|&(ip, mac)| ip == ROUTER_IP && Mac(mac) == router_mac),
        "{replies:?}"
    );
    // The router learned us from the request: the probe really went out with our MAC/IP.
    assert!(neigh_has(&p.sw, "-4", &HOST_IP.to_string(), host_mac));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; run by scripts/test.sh"]
fn gratuitous_arp_updates_neighbours_and_the_switch() {
    require_root();
    let p = pair("garp");
    // Linux ignores gratuitous ARP for unknown addresses unless told to accept it.
    sysctl(&p.sw, "net.ipv4.conf.br0.arp_accept", "1");
    let guest: Mac = "52:54:00:77:00:50".parse().unwrap();
    let guest_ip = Ipv4Addr::new(10, 77, 0, 50);
    // A second guest whose address the router already knows at an old MAC (the usual case after
    // a failover): the announcement must override it.
    let moved: Mac = "52:54:00:77:00:51".parse().unwrap();
    let moved_ip = Ipv4Addr::new(10, 77, 0, 51);
    p.sw.ip(&[
        "neigh",
        "replace",
        "10.77.0.51",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "br0",
        "nud",
        "stale",
    ])
    .unwrap();

    let announcer = p.h.enter(|| packet::Announcer::new("app0").unwrap()).unwrap();
    let took = wait_until(
        Duration::from_secs(5),
        "the router and the switch learn the guests",
        || {
            announcer.ipv4(guest.0, guest_ip).unwrap();
            announcer.ipv4(moved.0, moved_ip).unwrap();
            neigh_has(&p.sw, "-4", "10.77.0.50", guest)
                && neigh_has(&p.sw, "-4", "10.77.0.51", moved)
                && fdb_has(&p.sw, guest)
                && fdb_has(&p.sw, moved)
        },
    )
    .unwrap();
    println!("gratuitous ARP learned after {took:?}");
    // The one-shot helper works too (and fails cleanly on an absent interface).
    p.h.enter(|| packet::announce_ipv4("app0", guest.0, guest_ip))
        .unwrap()
        .unwrap();
    let e =
        p.h.enter(|| packet::announce_ipv4("nosuch0", guest.0, guest_ip))
            .unwrap()
            .unwrap_err();
    assert!(e.to_string().contains("nosuch0"), "{e}");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; run by scripts/test.sh"]
fn unsolicited_na_updates_neighbours_and_the_switch() {
    require_root();
    let p = pair("na");
    // Linux creates neighbour entries from unsolicited NAs only on a router that accepts
    // untracked NAs (RFC 9131); the kernel still checks hop limit 255 and the ICMPv6 checksum.
    sysctl(&p.sw, "net.ipv6.conf.all.forwarding", "1");
    sysctl(&p.sw, "net.ipv6.conf.br0.accept_untracked_na", "1");
    let guest: Mac = "52:54:00:77:00:66".parse().unwrap();
    let guest_ip: Ipv6Addr = "2001:db8:77::66".parse().unwrap();

    // tcpdump verifies the checksum independently and prints the decoded NA.
    let mut dump =
        p.sw.command("tcpdump")
            .args([
                "-i",
                "port0",
                "-n",
                "-vv",
                "-c",
                "1",
                "-l",
                "icmp6 and ip6[40] == 136 and src host 2001:db8:77::66",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    // tcpdump has no "ready" signal; its "listening on" line is printed once capture starts.
    let mut stderr = std::io::BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("listening on"), "tcpdump: {line}");

    let announcer = p.h.enter(|| packet::Announcer::new("app0").unwrap()).unwrap();
    let took = wait_until(
        Duration::from_secs(5),
        "the router and the switch learn the guest",
        || {
            announcer.ipv6(guest.0, guest_ip).unwrap();
            neigh_has(&p.sw, "-6", "2001:db8:77::66", guest) && fdb_has(&p.sw, guest)
        },
    )
    .unwrap();
    println!("unsolicited NA learned after {took:?}");
    let out = dump.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.contains("neighbor advertisement") && text.contains("tgt is 2001:db8:77::66"),
        "{text}"
    );
    assert!(text.contains("hlim 255") && text.contains("Flags [override]"), "{text}");
    assert!(text.contains("[icmp6 sum ok]"), "{text}");
    assert!(
        text.contains("52:54:00:77:00:66"),
        "target link-layer address option: {text}"
    );
}
