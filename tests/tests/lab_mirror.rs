//! ublk-mirror end to end in the lab: two daemons in lab hosts `a` (primary) and `b`
//! (secondary), replicating over AL1 (10.250.2.x) and AL2 (10.250.3.x); the primary's NBD
//! export is written by `qemu-io` / `qemu-img`; the two backing files are then compared byte
//! for byte. Faults: kill -9 of either daemon, AL1 then AL2 down, the primary's backing on a
//! failing (FUSE) disk, and a split brain. After every fault and recovery, every write the
//! client saw acknowledged is on both copies.
//!
//! Privileged (namespaces, FUSE): run by scripts/test.sh as root
//! (`cargo test -p eac-lab --test lab_mirror -- --ignored --nocapture`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use eac_lab::faults::{link_down, link_up};
use eac_lab::faulty_disk::{FaultyDisk, Mode};
use eac_lab::mirror::{Ledger, MirrorDaemon, Workload, check_copy, create_side, qemu_io, same_bytes};
use eac_lab::{Lab, require_root};
use serde_json::Value;

/// Device size.
const SIZE: u64 = 32 << 20;
/// Blocks the workload writes (the first 16 MiB).
const BLOCKS: u64 = 4096;
/// The daemons' peer timeout.
const PEER_TIMEOUT_MS: u64 = 2000;
const LONG: Duration = Duration::from_secs(60);

/// Drop order: daemons first (they use the lab's namespaces and files), then the lab.
struct Setup {
    a: MirrorDaemon,
    b: MirrorDaemon,
    a_img: PathBuf,
    b_img: PathBuf,
    lab: Lab,
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A mirrored disk between a (primary, consistent) and b (blank secondary), in sync after
/// the initial full copy. `a_backing` overrides where the primary's daemon finds its disk.
/// Where the primary's daemon finds its disk, given the lab and the backing file.
type BackingPath<'a> = &'a dyn Fn(&Lab, &std::path::Path) -> PathBuf;

fn setup(tag: &str, a_backing: Option<BackingPath>) -> Setup {
    require_root();
    let lab = Lab::two_hosts(tag, 0).unwrap();
    let (a_img, a_meta) = create_side(lab.dir(), "a", SIZE, true);
    let (b_img, b_meta) = create_side(lab.dir(), "b", SIZE, false);
    let a_path = a_backing.map(|f| f(&lab, &a_img)).unwrap_or_else(|| a_img.clone());
    let b = MirrorDaemon::start(&lab, "b", "secondary", &b_img, &b_meta, PEER_TIMEOUT_MS);
    let t0 = Instant::now();
    let a = MirrorDaemon::start(&lab, "a", "primary", &a_path, &a_meta, PEER_TIMEOUT_MS);
    a.wait(LONG, "initial sync", |s| s["sync"] == "in-sync");
    let s = a.status().unwrap();
    println!(
        "initial full sync: {} bytes transferred for {} dirty in {:?} (both links: {} {})",
        s["resync"]["last_transferred_bytes"],
        s["resync"]["last_dirty_bytes_at_start"],
        t0.elapsed(),
        s["links"][0]["connected"],
        s["links"][1]["connected"]
    );
    assert_eq!(u(&s["resync"]["last_transferred_bytes"]), SIZE, "{s:#}");
    Setup {
        a,
        b,
        a_img,
        b_img,
        lab,
    }
}

/// Both copies hold every acknowledged write and are identical.
fn assert_copies(st: &Setup, a_copy: &std::path::Path, ledger: &Ledger) {
    let bad_a = check_copy(a_copy, ledger);
    let bad_b = check_copy(&st.b_img, ledger);
    assert!(
        bad_a.is_empty(),
        "{} bad blocks on a: {:?}",
        bad_a.len(),
        &bad_a[..bad_a.len().min(5)]
    );
    assert!(
        bad_b.is_empty(),
        "{} bad blocks on b: {:?}",
        bad_b.len(),
        &bad_b[..bad_b.len().min(5)]
    );
    same_bytes(a_copy, &st.b_img, SIZE).unwrap();
    println!(
        "checked: {} acknowledged writes ({} blocks touched) present on both copies; copies identical",
        ledger.ok,
        ledger.acked.iter().filter(|&&v| v > 0).count()
    );
}

/// (dirty bytes the last resync had to copy — at its start plus regions dirtied by writes
/// that raced the reconnect —, bytes it transferred, its duration in ms).
fn resync_numbers(d: &MirrorDaemon) -> (u64, u64, u64) {
    let s = d.status().unwrap();
    (
        u(&s["resync"]["last_dirty_bytes_at_start"]) + u(&s["resync"]["last_dirty_bytes_added"]),
        u(&s["resync"]["last_transferred_bytes"]),
        u(&s["resync"]["last_duration_ms"]),
    )
}

#[test]
#[ignore = "privileged: network namespaces"]
fn qemu_io_and_qemu_img_writes_reach_the_replica_byte_for_byte() {
    let st = setup("mir-io", None);
    let url = st.a.nbd_url();
    let out = qemu_io(
        &url,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 3146240 7168",
            "write -z 1M 256k",
            "discard 2M 1M",
            "write -P 0x77 -f 8M 64k",
            "flush",
            "read -P 0xa5 0 1M",
            "read -P 0x77 8M 64k",
            "read -P 0 1M 256k",
        ],
    )
    .unwrap();
    assert!(out.contains("read 65536/65536 bytes at offset 8388608"), "{out}");
    // qemu-img copies a random image into the export.
    let src = st.lab.dir().join("random.img");
    let data: Vec<u8> = (0..4u64 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let conv = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&url)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{}", String::from_utf8_lossy(&conv.stderr));
    let s = st.a.status().unwrap();
    assert_eq!(s["sync"], "in-sync", "{s:#}");
    assert_eq!(u(&s["io"]["unreplicated"]), 0, "{s:#}");
    // A client nobody here wrote says the copies are the same, and so does a byte compare.
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&st.a_img)
        .arg(&st.b_img)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    same_bytes(&st.a_img, &st.b_img, SIZE).unwrap();
    let head = std::fs::read(&st.b_img).unwrap();
    assert_eq!(&head[..4 << 20], &data[..], "qemu-img's data on the replica");
    println!(
        "replica b: {} writes, {} bytes received; copies identical",
        st.b.status().unwrap()["io"]["writes"],
        st.b.status().unwrap()["io"]["write_bytes"]
    );
}

#[test]
#[ignore = "privileged: network namespaces"]
fn replica_killed_at_random_moments_loses_no_acknowledged_write() {
    let mut st = setup("mir-krep", None);
    let w = Workload::start(&st.a.nbd_url(), Ledger::new(BLOCKS), 0x5eed_0001);
    let t = Instant::now();
    w.wait_more(300, LONG);
    let rate = w.acked() as f64 / t.elapsed().as_secs_f64();
    println!("workload: {rate:.0} acknowledged 4 KiB writes/s while in sync");
    let mut rnd = 0x9e37_79b9_7f4a_7c15u64;
    for round in 1..=3 {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 7;
        rnd ^= rnd << 17;
        std::thread::sleep(Duration::from_millis(100 + rnd % 900));
        let before = w.acked();
        let unrepl_before = u(&st.a.status().unwrap()["io"]["unreplicated"]);
        st.b.kill9();
        let t0 = Instant::now();
        let took = st.a.wait(LONG, "degraded", |s| s["sync"] == "degraded");
        w.wait_more(100, LONG);
        let degraded_at_least = w.acked() - before;
        st.b.restart();
        let t1 = Instant::now();
        st.a.wait(LONG, "in sync again", |s| {
            s["sync"] == "in-sync" && u(&s["resync"]["runs"]) > round
        });
        let degraded_at_most = w.acked() - before + 1;
        let (dirty, sent, ms) = resync_numbers(&st.a);
        let s = st.a.status().unwrap();
        // Writes completed without the peer, by the engine's count — which must lie between
        // what the client saw acknowledged before the restart and until in sync again.
        let unreplicated = u(&s["io"]["unreplicated"]) - unrepl_before;
        assert!(
            (degraded_at_least..=degraded_at_most).contains(&unreplicated),
            "{unreplicated} unreplicated writes, the client saw {degraded_at_least}..={degraded_at_most}"
        );
        // Writes the replica acknowledged but had not flushed yet when it died are resynced
        // too (like DRBD's transfer log); the engine reports how many bytes that added.
        let unflushed = u(&s["last_peer_loss"]["unflushed_dirty_bytes"]);
        println!(
            "round {round}: degraded after {took:?} (killed {:?} ago); {unreplicated} writes while degraded; \
             reconnected and resynced in {:?}: {sent} bytes transferred for {dirty} dirty bytes \
             ({unflushed} of them acknowledged-but-unflushed at the kill; {ms} ms of resync)",
            t0.elapsed(),
            t1.elapsed()
        );
        assert_eq!(sent, dirty, "resync transferred exactly the dirty regions");
        assert!(dirty >= 4096, "writes while degraded were recorded");
        assert!(
            dirty <= 4096 * unreplicated + unflushed,
            "dirty {dirty} for {unreplicated} writes + {unflushed} unflushed bytes"
        );
    }
    w.wait_more(50, LONG);
    let ledger = w.stop();
    assert!(ledger.errors.is_empty(), "the client saw errors: {:?}", ledger.errors);
    st.a.wait(LONG, "in sync at the end", |s| {
        s["sync"] == "in-sync" && s["dirty_bytes"] == 0
    });
    println!("slowest acknowledged write: {:?}", ledger.max_latency);
    assert_copies(&st, &st.a_img.clone(), &ledger);
}

#[test]
#[ignore = "privileged: network namespaces"]
fn primary_killed_and_restarted_resyncs_only_its_activity_log() {
    let mut st = setup("mir-kpri", None);
    let mut ledger = Ledger::new(BLOCKS);
    for round in 1..=2u64 {
        let w = Workload::start(&st.a.nbd_url(), ledger, 0x5eed_0002 + round);
        w.wait_more(150, LONG);
        st.a.kill9();
        ledger = w.stop();
        // The client died with the primary: at most the write in flight is unknown.
        assert!(ledger.errors.len() <= 1, "{:?}", ledger.errors);
        ledger.errors.clear();
        st.b.wait(LONG, "b sees the primary gone", |s| s["connection"] != "connected");
        let t0 = Instant::now();
        st.a.restart();
        // The restarted crashed primary holds its export until b confirms it (a session),
        // then resyncs its activity log's regions to b (the status may already show that
        // finished: crashed_primary is cleared by the resync).
        let log = st.a.log();
        let this_start = &log[log.rfind("==== start").unwrap_or(0)..];
        assert!(
            this_start.contains("did not stop cleanly") && this_start.contains("not serving yet"),
            "crash recovery through the activity log, export held:\n{this_start}"
        );
        st.a.wait(LONG, "in sync after the crash, serving", |s| {
            s["sync"] == "in-sync" && s["dirty_bytes"] == 0 && s["crashed_primary"] == false && s["nbd"].is_string()
        });
        let (dirty, sent, ms) = resync_numbers(&st.a);
        println!(
            "round {round}: primary restarted and in sync after {:?}: {sent} bytes transferred for {dirty} dirty bytes \
             (the activity log's extents; {ms} ms of resync)",
            t0.elapsed()
        );
        assert_eq!(sent, dirty);
        assert!(
            dirty > 0,
            "the activity log's regions are resynced; a's log:\n{}",
            eac_lab::mirror::tail(&st.a.log(), 40)
        );
        assert!(dirty < SIZE, "only the activity log, not the whole disk");
    }
    // The restarted primary still serves and mirrors.
    let w = Workload::start(&st.a.nbd_url(), ledger, 0x5eed_0009);
    w.wait_more(100, LONG);
    let ledger = w.stop();
    assert!(ledger.errors.is_empty(), "{:?}", ledger.errors);
    assert_copies(&st, &st.a_img.clone(), &ledger);
}

#[test]
#[ignore = "privileged: network namespaces"]
fn losing_al1_is_invisible_losing_al2_too_degrades_and_both_back_resync() {
    let st = setup("mir-links", None);
    let a_ns = &st.lab.host("a").ns;
    let w = Workload::start(&st.a.nbd_url(), Ledger::new(BLOCKS), 0x5eed_0003);
    w.wait_more(100, LONG);
    link_down(a_ns, "al1").unwrap();
    let t0 = Instant::now();
    st.a.wait(LONG, "link 1 seen down", |s| s["links"][0]["connected"] == false);
    let seen = t0.elapsed();
    w.wait_more(200, LONG);
    let s = st.a.status().unwrap();
    assert_eq!(s["sync"], "in-sync", "one link lost is invisible: {s:#}");
    assert_eq!(u(&s["io"]["unreplicated"]), 0, "{s:#}");
    println!(
        "AL1 down: noticed after {seen:?}, {} requests resent on AL2, still in sync",
        s["io"]["resends"]
    );
    link_down(a_ns, "al2").unwrap();
    let t1 = Instant::now();
    let took = st.a.wait(LONG, "degraded", |s| s["sync"] == "degraded");
    println!("AL2 down too: degraded after {took:?} (peer_timeout {PEER_TIMEOUT_MS} ms)");
    w.wait_more(100, LONG);
    let _ = t1;
    link_up(a_ns, "al1").unwrap();
    link_up(a_ns, "al2").unwrap();
    let t2 = Instant::now();
    st.a.wait(LONG, "in sync", |s| {
        s["sync"] == "in-sync" && s["links"][0]["connected"] == true && s["links"][1]["connected"] == true
    });
    let (dirty, sent, ms) = resync_numbers(&st.a);
    println!(
        "links back: reconnected and resynced in {:?}: {sent} bytes transferred for {dirty} dirty bytes ({ms} ms)",
        t2.elapsed()
    );
    assert_eq!(sent, dirty);
    w.wait_more(50, LONG);
    let ledger = w.stop();
    assert!(ledger.errors.is_empty(), "the client saw errors: {:?}", ledger.errors);
    println!("slowest acknowledged write: {:?}", ledger.max_latency);
    st.a.wait(LONG, "clean", |s| s["sync"] == "in-sync" && s["dirty_bytes"] == 0);
    assert_copies(&st, &st.a_img.clone(), &ledger);
}

#[test]
#[ignore = "privileged: namespaces and FUSE"]
fn a_failing_primary_disk_is_detached_and_io_continues_from_the_replica() {
    let fuse: std::cell::RefCell<Option<FaultyDisk>> = std::cell::RefCell::new(None);
    let mount = |lab: &Lab, img: &std::path::Path| {
        let d = FaultyDisk::mount(lab.dir(), img).unwrap();
        let p = d.path();
        *fuse.borrow_mut() = Some(d);
        p
    };
    let st = setup("mir-disk", Some(&mount));
    let disk = fuse.borrow_mut().take().unwrap();
    let w = Workload::start(&st.a.nbd_url(), Ledger::new(BLOCKS), 0x5eed_0004);
    w.wait_more(100, LONG);
    disk.set(Mode::FailAll);
    let t0 = Instant::now();
    st.a.wait(LONG, "diskless", |s| s["disk"] == "diskless");
    println!(
        "FailAll: detached after {:?} ({} EIO returned by the disk)",
        t0.elapsed(),
        disk.errors_returned()
    );
    w.wait_more(200, LONG);
    // Reads are served by the replica now.
    let out = qemu_io(&st.a.nbd_url(), &["read -P 0 20M 64k"]).unwrap();
    assert!(out.contains("read 65536/65536"), "{out}");
    let ledger = w.stop();
    assert!(ledger.errors.is_empty(), "the client saw errors: {:?}", ledger.errors);
    let s = st.a.status().unwrap();
    assert!(u(&s["io"]["remote_reads"]) > 0, "{s:#}");
    assert!(u(&s["io"]["local_errors"]) > 0, "{s:#}");
    let bad = check_copy(&st.b_img, &ledger);
    assert!(bad.is_empty(), "the replica misses acknowledged writes: {bad:?}");
    println!("the replica holds all {} acknowledged writes", ledger.ok);
    // The disk is repaired: attach it again; it is resynced from the replica.
    disk.set(Mode::Healthy);
    let t1 = Instant::now();
    st.a.request(r#"{"cmd":"attach-disk"}"#).unwrap();
    st.a.wait(LONG, "resynced from the peer", |s| {
        s["disk"] == "up-to-date" && s["sync"] == "in-sync"
    });
    let (dirty, sent, _) = resync_numbers(&st.a);
    println!(
        "attach-disk: resynced from the replica in {:?}: {sent} bytes for {dirty} dirty",
        t1.elapsed()
    );
    assert_eq!(sent, SIZE, "a re-attached disk is fully resynced");
    assert_copies(&st, disk.backing(), &ledger);
    // The daemons, then the FUSE mount (inside the lab's directory), then the lab.
    let Setup { a, b, lab, .. } = st;
    drop((a, b));
    disk.unmount().unwrap();
    drop(lab);
}

#[test]
#[ignore = "privileged: network namespaces"]
fn split_brain_is_refused_and_resolve_discard_local_converges() {
    let st = setup("mir-split", None);
    let a_ns = &st.lab.host("a").ns;
    qemu_io(&st.a.nbd_url(), &["write -P 0x11 0 64k", "flush"]).unwrap();
    link_down(a_ns, "al1").unwrap();
    link_down(a_ns, "al2").unwrap();
    qemu_io(&st.a.nbd_url(), &["write -P 0x22 1M 64k", "flush"]).unwrap();
    st.a.wait(LONG, "a degraded", |s| s["sync"] == "degraded");
    st.b.wait(LONG, "b disconnected", |s| s["connection"] != "connected");
    st.b.request(r#"{"cmd":"promote","force":true}"#).unwrap();
    st.b.wait(LONG, "b primary", |s| s["role"] == "primary");
    qemu_io(&st.b.nbd_url(), &["write -P 0x33 2M 64k", "flush"]).unwrap();
    link_up(a_ns, "al1").unwrap();
    link_up(a_ns, "al2").unwrap();
    let t0 = Instant::now();
    for d in [&st.a, &st.b] {
        d.wait(LONG, "split brain reported", |s| s["refused"]["kind"] == "split-brain");
    }
    println!(
        "split brain reported on both sides after {:?}: {}",
        t0.elapsed(),
        st.a.status().unwrap()["refused"]["reason"]
    );
    assert!(same_bytes(&st.a_img, &st.b_img, SIZE).is_err(), "the copies diverged");
    // Nothing was merged while refused.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(st.a.field("sync"), "refused");
    // b is the victim.
    let t1 = Instant::now();
    st.b.request(r#"{"cmd":"resolve","discard_local":true}"#).unwrap();
    st.a.request(r#"{"cmd":"resolve","discard_local":false}"#).unwrap();
    st.a.wait(LONG, "converged", |s| s["sync"] == "in-sync" && s["dirty_bytes"] == 0);
    st.b.wait(LONG, "b in sync", |s| {
        s["sync"] == "in-sync" && s["role"] == "secondary"
    });
    let (dirty, sent, _) = resync_numbers(&st.a);
    println!(
        "resolved: converged after {:?}: {sent} bytes transferred for {dirty} dirty (a's 64 KiB + b's 64 KiB, not the disk)",
        t1.elapsed()
    );
    assert_eq!(sent, dirty);
    assert!((2 * 65536..SIZE).contains(&dirty), "{dirty}");
    same_bytes(&st.a_img, &st.b_img, SIZE).unwrap();
    let b = std::fs::read(&st.b_img).unwrap();
    assert!(
        b[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x22),
        "a's write survived"
    );
    assert!(
        b[2 << 20..(2 << 20) + 65536].iter().all(|&x| x == 0),
        "b's write was discarded"
    );
    assert_eq!(st.b.status().unwrap()["discard_my_data"], false);
}

#[test]
#[ignore = "privileged: network namespaces"]
fn online_verify_finds_silent_corruption_on_the_replica_and_repairs_it() {
    let st = setup("mir-verify", None);
    qemu_io(&st.a.nbd_url(), &["write -P 0x6c 0 4M", "flush"]).unwrap();
    same_bytes(&st.a_img, &st.b_img, SIZE).unwrap();
    // Bit rot behind both daemons' backs: two 4 KiB regions of the replica's file change.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&st.b_img).unwrap();
        f.write_all_at(&[0xeeu8; 4096], 3 << 20).unwrap();
        f.write_all_at(&[0x01u8; 1], (20 << 20) + 4096 + 17).unwrap();
        f.sync_all().unwrap();
    }
    assert!(same_bytes(&st.a_img, &st.b_img, SIZE).is_err());
    // The administrator's command, as documented: verify and wait for the result.
    let t0 = Instant::now();
    let out = std::process::Command::new(eac_lab::workspace_bin("ublk-mirror"))
        .args(["verify", "--wait", "--socket"])
        .arg(&st.a.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ublk-mirror verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = st.a.status().unwrap();
    println!("verify of {SIZE} bytes took {:?}: {}", t0.elapsed(), s["verify"]);
    assert_eq!(u(&s["verify"]["mismatched_bytes"]), 2 * 4096, "{s:#}");
    let offsets: Vec<u64> = s["verify"]["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| u(&m["offset"]))
        .collect();
    assert_eq!(offsets, vec![3 << 20, (20 << 20) + 4096], "{s:#}");
    // The mismatching regions were marked for resync and copied from the primary.
    st.a.wait(LONG, "repaired", |s| s["sync"] == "in-sync" && s["dirty_bytes"] == 0);
    same_bytes(&st.a_img, &st.b_img, SIZE).unwrap();
}

/// Both of a's availability links down (or up again).
fn a_links(st: &Setup, up: bool) {
    let ns = &st.lab.host("a").ns;
    for l in ["al1", "al2"] {
        if up {
            link_up(ns, l).unwrap()
        } else {
            link_down(ns, l).unwrap()
        }
    }
}

/// The old primary `a` crashes with an unacknowledged write in flight while both links are
/// cut, and `b` is promoted: a's copy holds a write nobody acknowledged (0x22), b's holds
/// the acknowledged data (0x11). Returns the lab with a dead, b primary.
fn crash_a_with_a_write_in_flight_and_promote_b(tag: &str) -> Setup {
    let mut st = setup(tag, None);
    qemu_io(&st.a.nbd_url(), &["write -P 0x11 1M 64k", "flush"]).unwrap();
    a_links(&st, false);
    // The write reaches a's disk, then waits for the peer: never acknowledged.
    let mut w = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &st.a.nbd_url(), "-c", "write -P 0x22 1M 64k"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    st.a.kill9();
    let _ = w.kill();
    let _ = w.wait();
    let a = std::fs::read(&st.a_img).unwrap();
    assert!(
        a[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x22),
        "the unacknowledged write is on a's disk (the scenario needs it there)"
    );
    st.b.wait(LONG, "b sees the primary gone", |s| s["connection"] != "connected");
    st.b.request(r#"{"cmd":"promote"}"#).unwrap();
    st.b.wait(LONG, "b primary", |s| s["role"] == "primary" && s["nbd"].is_string());
    qemu_io(&st.b.nbd_url(), &["read -P 0x11 1M 64k"]).expect("b serves the acknowledged data");
    st
}

#[test]
#[ignore = "privileged: network namespaces"]
fn a_crashed_old_primary_returning_as_secondary_never_changes_the_promoted_copy() {
    let mut st = crash_a_with_a_write_in_flight_and_promote_b("mir-promo");
    let g = st.b.status().unwrap()["gen"].clone();
    println!("b promoted, generation {g}");
    a_links(&st, true);
    // a comes back as secondary (a crashed primary with 0x22 in its activity log).
    let a_meta = st.a.meta.clone();
    st.a = MirrorDaemon::start(&st.lab, "a", "secondary", &st.a_img, &a_meta, PEER_TIMEOUT_MS);
    let t0 = Instant::now();
    st.b.wait(LONG, "b in sync with a", |s| {
        s["connection"] == "connected" && s["sync"] == "in-sync" && s["dirty_bytes"] == 0
    });
    let ev = st.b.status().unwrap()["events"].to_string();
    println!("in sync after {:?}; b's events: {ev}", t0.elapsed());
    assert!(
        !ev.contains("TargetBitmap"),
        "b took data from the crashed old primary: {ev}"
    );
    qemu_io(&st.b.nbd_url(), &["read -P 0x11 1M 64k"])
        .expect("nothing was written through b: its data must not have changed");
    same_bytes(&st.a_img, &st.b_img, SIZE).expect("a took b's data");
}

#[test]
#[ignore = "privileged: network namespaces"]
fn a_restarted_old_primary_serves_nothing_until_it_rejoined_as_secondary() {
    let mut st = crash_a_with_a_write_in_flight_and_promote_b("mir-stale");
    qemu_io(&st.b.nbd_url(), &["write -P 0x33 2M 64k", "flush"]).unwrap();
    // a restarts with its unchanged configuration (role = "primary"), the links still cut.
    st.a.restart();
    std::thread::sleep(Duration::from_millis(500));
    let r = qemu_io(&st.a.nbd_url(), &["read 1M 64k"]);
    assert!(
        r.is_err(),
        "a restarted crashed primary must not serve (stale data): {r:?}"
    );
    st.a.wait(LONG, "a held", |s| s["role"] == "primary" && s["held"].is_object());
    println!("a restarted: held {}", st.a.status().unwrap()["held"]);
    let p = st.a.request(r#"{"cmd":"promote"}"#);
    assert!(
        p.as_ref().is_err_and(|e| e.contains("held")),
        "a plain promote of a crashed primary is refused: {p:?}"
    );
    // The links return: a finds b primary with newer data and rejoins as secondary.
    a_links(&st, true);
    let t0 = Instant::now();
    st.a.wait(LONG, "a rejoined as secondary", |s| s["role"] == "secondary");
    st.b.wait(LONG, "b in sync with a", |s| {
        s["connection"] == "connected" && s["sync"] == "in-sync" && s["dirty_bytes"] == 0
    });
    println!("a rejoined and in sync after {:?}", t0.elapsed());
    assert!(
        qemu_io(&st.a.nbd_url(), &["read 1M 64k"]).is_err(),
        "a secondary serves nothing"
    );
    qemu_io(&st.b.nbd_url(), &["read -P 0x11 1M 64k", "read -P 0x33 2M 64k"]).unwrap();
    same_bytes(&st.a_img, &st.b_img, SIZE).expect("a took b's data");
    assert!(
        st.a.log().contains("rejoins as secondary"),
        "the rejoin is an event:\n{}",
        st.a.log()
    );
}

#[test]
#[ignore = "privileged: network namespaces"]
fn promote_right_after_a_silent_primary_death_waits_for_the_peer_timeout() {
    let st = setup("mir-silent", None);
    qemu_io(&st.a.nbd_url(), &["write -P 0x44 0 64k", "flush"]).unwrap();
    // The primary goes silent on both links (carrier up, nothing arrives).
    let a_ns = &st.lab.host("a").ns;
    let _l1 = eac_lab::faults::SilentLoss::on(a_ns, "al1").unwrap();
    let _l2 = eac_lab::faults::SilentLoss::on(a_ns, "al2").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(st.b.field("connection"), "connected", "b has not noticed yet");
    let t0 = Instant::now();
    let r = st.b.request(r#"{"cmd":"promote"}"#);
    let took = t0.elapsed();
    println!("promote {took:?} after the primary went silent: {r:?}");
    r.expect("promote waits for the peer timeout instead of refusing");
    assert!(
        took < Duration::from_millis(PEER_TIMEOUT_MS + 2000),
        "bounded by the peer timeout: {took:?}"
    );
    st.b.wait(LONG, "b serves", |s| s["role"] == "primary" && s["nbd"].is_string());
    qemu_io(&st.b.nbd_url(), &["read -P 0x44 0 64k"]).unwrap();
    // A primary that keeps answering is refused, after the bounded wait, as a usage error.
    let st2 = setup("mir-alive", None);
    let t1 = Instant::now();
    let r = st2.b.request(r#"{"cmd":"promote"}"#);
    println!("promote with a live primary: refused after {:?}: {r:?}", t1.elapsed());
    let e = r.expect_err("a live primary is never joined by a second one");
    assert!(
        e.contains("demote it first") && !e.contains("\"transient\":true"),
        "{e}"
    );
    assert_eq!(st2.a.field("role"), "primary");
}

/// Issue 10 ("partition without death"): with `on_peer_loss = "freeze"` a primary that loses
/// both links acknowledges nothing more until the owner is confirmed (`resume-io`); then it
/// goes on degraded, and when the links are back the copies converge with every acknowledged
/// write on both.
#[test]
#[ignore = "privileged: network namespaces"]
fn freeze_policy_acknowledges_nothing_without_the_peer_until_resume_io() {
    let mut st = setup("mir-freeze", None);
    let cfg = std::fs::read_to_string(&st.a.config).unwrap();
    std::fs::write(
        &st.a.config,
        cfg.replacen("nbd = ", "on_peer_loss = \"freeze\"\nnbd = ", 1),
    )
    .unwrap();
    st.a.restart();
    st.a.wait(LONG, "in sync with freeze, serving", |s| {
        s["sync"] == "in-sync" && s["on_peer_loss"] == "freeze" && s["held"].is_null()
    });
    let sock = st.a.nbd_socket.clone();
    eac_lab::wait::wait_until(LONG, "NBD export of a", || sock.exists()).unwrap();
    let w = Workload::start(&st.a.nbd_url(), Ledger::new(BLOCKS), 0x5eed_00f2);
    w.wait_more(100, LONG);
    assert!(!w.finished(), "the workload stopped");
    let ns = &st.lab.host("a").ns;
    link_down(ns, "al1").unwrap();
    link_down(ns, "al2").unwrap();
    let t0 = Instant::now();
    let took = st.a.wait(LONG, "frozen", |s| u(&s["io_frozen"]["held_writes"]) > 0);
    let acked = w.acked();
    std::thread::sleep(Duration::from_secs(3));
    let s = st.a.status().unwrap();
    println!(
        "both links down: frozen after {took:?} ({} held write(s)); {} acknowledged in the next 3 s",
        s["io_frozen"]["held_writes"],
        w.acked() - acked
    );
    assert_eq!(
        w.acked(),
        acked,
        "a write was acknowledged without the peer while frozen: {s:#}"
    );
    let r = st.a.request(r#"{"cmd":"resume-io"}"#).expect("resume-io");
    println!("resume-io after {:?}: {}", t0.elapsed(), r["message"]);
    w.wait_more(100, LONG);
    let s = st.a.status().unwrap();
    assert!(s["io_frozen"].is_null(), "{s:#}");
    assert_eq!(s["sync"], "degraded", "{s:#}");
    link_up(ns, "al1").unwrap();
    link_up(ns, "al2").unwrap();
    st.a.wait(LONG, "in sync", |s| s["sync"] == "in-sync" && s["dirty_bytes"] == 0);
    let ledger = w.stop();
    assert!(ledger.errors.is_empty(), "the client saw errors: {:?}", ledger.errors);
    println!(
        "slowest acknowledged write (includes the freeze): {:?}",
        ledger.max_latency
    );
    st.a.wait(LONG, "clean", |s| s["sync"] == "in-sync" && s["dirty_bytes"] == 0);
    let a_img = st.a_img.clone();
    assert_copies(&st, &a_img, &ledger);
}
