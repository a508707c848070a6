//! The ublk frontend (`ublk-mirror ublk-local`) against the real ublk_drv of the 6.12 guest:
//! data integrity with fio verify and a byte-for-byte compare with the backing file, a
//! filesystem with fsync, discard and write-zeroes, a failing backing read that reaches the
//! application as EIO, and user recovery after `kill -9` of the server under load.
//!
//! Each test is one guest boot; the guest writes its results into files of the share and the
//! assertions happen here. Timings under TCG are noisy (and worse on a busy machine): the
//! workloads are sized to finish in seconds, and nothing asserts on speed.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use eac_lab::ublk_guest::{GuestRun, UblkGuest, build_workspace_bin, shell_quote, skip_reason};

/// One guest at a time: two TCG guests on a 2-core machine would only slow each other.
static GUEST: Mutex<()> = Mutex::new(());

/// Shell helpers shared by the guest scripts. `start_daemon NAME ARGS..` runs `ublk-local`
/// in the background and waits for the device path it prints; it sets PID, DEV, ID, NAME.
/// `lap LABEL` appends the seconds since the previous lap to `timings`.
fn prelude(bin: &str) -> String {
    format!(
        r#"
set -u
BIN={bin}
now() {{ date +%s.%N; }}
T0=$(now)
lap() {{ local t; t=$(now); echo "$1 $(awk -v a="$T0" -v b="$t" 'BEGIN {{ printf "%.2f", b - a }}')" >> timings; T0=$t; }}
start_daemon() {{
  local n=$1; shift
  : > "$n.out"
  EAC_LOG_JSON=1 RUST_LOG=info "$BIN" ublk-local "$@" > "$n.out" 2> "$n.err" &
  PID=$!
  for _ in $(seq 1200); do
    [ -s "$n.out" ] && break
    kill -0 "$PID" 2> /dev/null || break
    sleep 0.05
  done
  DEV=$(head -n1 "$n.out"); ID=${{DEV#/dev/ublkb}}; NAME=${{DEV#/dev/}}
  # devtmpfs creates the node asynchronously (and may still be removing the previous
  # daemon's node of the same number): give it a moment.
  for _ in $(seq 100); do [ -b "$DEV" ] && break; sleep 0.05; done
  [ -b "$DEV" ] || {{ echo "$n did not start: $(cat "$n.err")" > fatal; exit 3; }}
}}
stop_daemon() {{ kill -TERM "$PID"; wait "$PID"; echo $? > "$1.rc"; }}
# writes completed on the device so far (/sys/block/X/stat field 5)
writes_done() {{ awk '{{ print $5 }}' "/sys/block/$NAME/stat"; }}
"#
    )
}

fn run_guest(script: &str, modules: &[&str]) -> GuestRun {
    // An ignored test run on purpose (scripts/test.sh, after setup.sh) must not pass without
    // the guest: fail with the reason instead of returning early.
    if let Some(why) = skip_reason() {
        panic!("the ublk guest cannot run here: {why} (run scripts/setup.sh)");
    }
    let _one = GUEST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let guest = modules
        .iter()
        .fold(UblkGuest::new().timeout(Duration::from_secs(420)), |g, m| g.module(m));
    let run = guest.run_script(script).expect("run guest");
    eprintln!("guest run: {:.1?} wall, status {:?}", run.wall, run.status);
    for line in run.read("timings").unwrap_or_default().lines() {
        eprintln!("  {line} s");
    }
    run
}

fn assert_ok(run: &GuestRun) {
    assert_eq!(
        run.status,
        Some(0),
        "{}\n{}",
        run.read("fatal").unwrap_or_default(),
        run.transcript()
    );
}

fn bin() -> String {
    let t0 = Instant::now();
    let bin = build_workspace_bin("ublk-mirror", "ublk-mirror").expect("build ublk-mirror");
    eprintln!("cargo build check: {:.1?}", t0.elapsed());
    shell_quote(bin.to_str().expect("utf-8 path"))
}

/// Reads a result file of the run, trimmed; panics with the transcript if it is missing.
fn read(run: &GuestRun, f: &str) -> String {
    run.read(f)
        .unwrap_or_else(|e| panic!("{f}: {e}\n{}", run.transcript()))
        .trim()
        .to_owned()
}

/// The counters the daemon printed as its last stdout line on a clean stop.
fn stats(run: &GuestRun, out: &str) -> serde_json::Value {
    let text = read(run, out);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{out}: last line is not JSON ({e}): {text}"));
    v["stats"].clone()
}

fn count(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {stats}"))
}

#[test]
#[ignore = "vm: boots the 6.12 guest (ublk_drv); run by scripts/test.sh"]
fn data_path_fio_verify_filesystem_discard_and_read_errors() {
    let bin = bin();
    let script = format!(
        r#"{prelude}
MNT=$(mktemp -d /tmp/ublkfe-mnt.XXXXXX)
trap 'umount "$MNT" 2> /dev/null; [ -n "${{PID:-}}" ] && kill "$PID" 2> /dev/null' EXIT
B=$(mktemp /tmp/ublkfe-back.XXXXXX)
truncate -s 64M "$B"
lap boot_to_script

# --- (1) a file-backed device: parameters, fio verify, placement, full compare
start_daemon d1 --backing "$B"
lap start
for f in write_cache fua discard_max_bytes write_zeroes_max_bytes logical_block_size physical_block_size max_sectors_kb; do
  echo "$f $(cat /sys/block/$NAME/queue/$f)" >> queue
done
blockdev --getsize64 "$DEV" > size
fio --name=v --filename="$DEV" --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=8M --verify=crc32c --do_verify=1 --output=fio.txt > /dev/null 2>&1
echo $? > fio.rc
lap fio_verify_8M
head -c 1M /dev/urandom > pat
dd if=pat of="$DEV" bs=1M seek=5 oflag=direct conv=fsync 2> dd.err; echo $? > dd.rc
dd if="$B" bs=1M skip=5 count=1 2> /dev/null | cmp - pat > place.txt 2>&1; echo $? > place.rc
cmp "$DEV" "$B" > cmp.txt 2>&1; echo $? > cmp.rc
lap compare_64M

# --- (2) discard and write-zeroes reach the backing file at the right place
head -c 4M /dev/urandom > pat4
dd if=pat4 of="$DEV" bs=1M seek=9 oflag=direct conv=fsync 2> /dev/null
blkdiscard -o $((10 << 20)) -l $((1 << 20)) "$DEV" 2> discard.err; echo $? > discard.rc
blkdiscard -z -o $((11 << 20)) -l $((1 << 20)) "$DEV" 2> zero.err; echo $? > zero.rc
# 10M..12M are zeroes in the backing file; 9M..10M and 12M..13M still hold the pattern.
dd if="$B" bs=1M skip=10 count=2 2> /dev/null | cmp -n $((2 << 20)) - /dev/zero > zeroes.txt 2>&1; echo $? > zeroes.rc
{{ dd if="$B" bs=1M skip=9 count=1 2> /dev/null; dd if="$B" bs=1M skip=12 count=1 2> /dev/null; }} > around
{{ head -c 1M pat4; tail -c 1M pat4; }} | cmp - around > around.txt 2>&1; echo $? > around.rc
cmp "$DEV" "$B" > cmp2.txt 2>&1; echo $? > cmp2.rc
lap discard_zeroes

# --- a filesystem: mkfs (discards the device), write + fsync, fsck, read back. Mounted in
# the guest's own mount namespace and unmounted before the server stops (a server must not
# outlive a mount of its own device in a namespace only it holds).
mkfs.ext4 -q -F "$DEV" > mkfs.txt 2>&1; echo $? > mkfs.rc

mount "$DEV" "$MNT" 2> mount.err; echo $? > mount.rc
head -c 3M /dev/urandom > file
cp file "$MNT/file" && sync "$MNT/file"; echo $? > fsync.rc
umount "$MNT"; echo $? > umount.rc
e2fsck -fn "$DEV" > fsck.txt 2>&1; echo $? > fsck.rc
mount -o ro "$DEV" "$MNT" && cmp file "$MNT/file" > fs.txt 2>&1; echo $? > fs.rc
umount "$MNT"
lap filesystem
stop_daemon d1
[ -e "$DEV" ]; echo $? > gone.rc
lap stop

# --- (4) a failing backing read: the application gets EIO, the server keeps serving
start_daemon d2 --backing "$B" --fail-reads $((8 << 20)):4096
dd if="$DEV" of=/dev/null bs=4k skip=2048 count=1 iflag=direct 2> eio.err; echo $? > eio.rc
dd if="$DEV" of=/dev/null bs=4k skip=2047 count=1 iflag=direct 2> before.err; echo $? > before.rc
dd if="$DEV" of=/dev/null bs=4k skip=2049 count=1 iflag=direct 2> after.err; echo $? > after.rc
dd if=/dev/zero of="$DEV" bs=4k seek=2048 count=1 oflag=direct conv=fsync 2> wr.err; echo $? > wr.rc
kill -0 "$PID"; echo $? > alive.rc
fio --name=a --filename="$DEV" --rw=randwrite --bs=4k --iodepth=8 --ioengine=io_uring --direct=1 \
    --offset=16M --size=1M --verify=crc32c --do_verify=1 --output=fio2.txt > /dev/null 2>&1
echo $? > fio2.rc
stop_daemon d2
lap read_errors
dmesg | grep -cE "WARNING:|BUG:|Call Trace" > kwarn
dmesg | tail -n 40 > dmesg.txt
rm -f "$B"
"#,
        prelude = prelude(&bin)
    );
    let run = run_guest(&script, &["ext4"]);
    assert_ok(&run);
    let r = |f: &str| read(&run, f);

    // Parameters as the kernel applied them.
    let queue = r("queue");
    for want in [
        "write_cache write back",
        "fua 1",
        "logical_block_size 512",
        "physical_block_size 4096",
        "max_sectors_kb 512",
        "discard_max_bytes 268435456",
        "write_zeroes_max_bytes 268435456",
    ] {
        assert!(queue.lines().any(|l| l == want), "{want:?} not in\n{queue}");
    }
    assert_eq!(r("size"), (64u64 << 20).to_string());

    // (1) fio verify, placement, whole-device compare.
    assert_eq!(r("fio.rc"), "0", "fio verify failed:\n{}", r("fio.txt"));
    assert!(r("fio.txt").contains("err= 0"), "{}", r("fio.txt"));
    assert_eq!(r("dd.rc"), "0", "{}", r("dd.err"));
    assert_eq!(
        r("place.rc"),
        "0",
        "data written at 5 MiB is elsewhere in the backing file: {}",
        r("place.txt")
    );
    assert_eq!(r("cmp.rc"), "0", "device and backing file differ: {}", r("cmp.txt"));

    // (2) discard and write-zeroes.
    assert_eq!(r("discard.rc"), "0", "blkdiscard: {}", r("discard.err"));
    assert_eq!(r("zero.rc"), "0", "blkdiscard -z: {}", r("zero.err"));
    assert_eq!(
        r("zeroes.rc"),
        "0",
        "10M..12M not zero in the backing: {}",
        r("zeroes.txt")
    );
    assert_eq!(
        r("around.rc"),
        "0",
        "discard touched its neighbours: {}",
        r("around.txt")
    );
    assert_eq!(
        r("cmp2.rc"),
        "0",
        "device and backing differ after discard: {}",
        r("cmp2.txt")
    );

    // The filesystem, with fsync (FLUSH must not fail: it carries a garbage sector).
    assert_eq!(r("mkfs.rc"), "0", "{}", r("mkfs.txt"));
    assert_eq!(r("mount.rc"), "0", "{}", r("mount.err"));
    assert_eq!(r("fsync.rc"), "0");
    assert_eq!(r("umount.rc"), "0");
    assert_eq!(r("fsck.rc"), "0", "{}", r("fsck.txt"));
    assert_eq!(r("fs.rc"), "0", "file read back differs: {}", r("fs.txt"));
    assert_eq!(r("d1.rc"), "0", "clean stop: {}", r("d1.err"));
    assert_eq!(r("gone.rc"), "1", "the block device must be gone after the stop");

    let s1 = stats(&run, "d1.out");
    eprintln!("d1 stats: {s1}");
    assert!(count(&s1, "writes") >= 2048, "{s1}");
    assert!(count(&s1, "reads") >= 2048, "{s1}");
    assert!(count(&s1, "flushes") >= 1, "fsync must reach the device as FLUSH: {s1}");
    assert!(count(&s1, "discards") >= 2, "blkdiscard and mkfs discard: {s1}");
    assert!(count(&s1, "write_zeroes") >= 1, "blkdiscard -z: {s1}");
    assert_eq!(count(&s1, "errors"), 0, "{s1}");

    // (4) EIO for the failing range only; the server survives and keeps serving.
    assert_ne!(r("eio.rc"), "0", "a read of the failing range succeeded");
    assert!(r("eio.err").contains("Input/output error"), "{}", r("eio.err"));
    assert_eq!(r("before.rc"), "0", "{}", r("before.err"));
    assert_eq!(r("after.rc"), "0", "{}", r("after.err"));
    assert_eq!(r("wr.rc"), "0", "a write to the failing range: {}", r("wr.err"));
    assert_eq!(
        r("alive.rc"),
        "0",
        "the server died after a read error: {}",
        r("d2.err")
    );
    assert_eq!(r("fio2.rc"), "0", "I/O after the error: {}", r("fio2.txt"));
    assert_eq!(r("d2.rc"), "0", "clean stop: {}", r("d2.err"));
    let s2 = stats(&run, "d2.out");
    eprintln!("d2 stats: {s2}");
    assert!(count(&s2, "errors") >= 1, "{s2}");
    assert_eq!(r("kwarn"), "0", "kernel warnings:\n{}", r("dmesg.txt"));
}

#[test]
#[ignore = "vm: boots the 6.12 guest (ublk_drv); run by scripts/test.sh"]
fn user_recovery_after_kill_9_under_fio_verify() {
    let bin = bin();
    let script = format!(
        r#"{prelude}
trap '[ -n "${{PID:-}}" ] && kill "$PID" 2> /dev/null' EXIT
B=$(mktemp /tmp/ublkfe-back.XXXXXX)
truncate -s 64M "$B"
dmesg -C
lap boot_to_script
start_daemon d1 --backing "$B"
echo "$ID" > id
fio --name=r --filename="$DEV" --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --size=16M --verify=crc32c --do_verify=1 --output=fio.txt > /dev/null 2>&1 &
FIO=$!
# Kill the server once fio is well into its write phase.
for _ in $(seq 1200); do [ "$(writes_done)" -ge 400 ] && break; sleep 0.05; done
lap fio_until_kill
kill -0 "$FIO"; echo $? > fio_running_at_kill
kill -9 "$PID"; wait "$PID" 2> /dev/null
writes_done > writes_at_kill
# The device stays, and fio neither fails nor finishes while no server is there.
sleep 1
[ -b "$DEV" ]; echo $? > node_kept
kill -0 "$FIO"; echo $? > fio_held
writes_done > writes_while_dead
lap dead_1s
start_daemon d2 --backing "$B" --id "$ID" --recover
lap recover
wait "$FIO"; echo $? > fio.rc
lap fio_rest
cmp "$DEV" "$B" > cmp.txt 2>&1; echo $? > cmp.rc
stop_daemon d2
[ -e "$DEV" ]; echo $? > gone.rc
# Recovering a device that no longer exists: a clear operator error.
"$BIN" ublk-local --backing "$B" --id "$ID" --recover > none.out 2> none.err; echo $? > none.rc
dmesg | grep -ci "i/o error" > ioerrors
dmesg | grep -cE "WARNING:|BUG:|Call Trace" > kwarn
dmesg | tail -n 40 > dmesg.txt
lap stop
rm -f "$B"
"#,
        prelude = prelude(&bin)
    );
    let run = run_guest(&script, &[]);
    assert_ok(&run);
    let r = |f: &str| read(&run, f);

    eprintln!(
        "writes completed at kill: {}, while dead: {}",
        r("writes_at_kill"),
        r("writes_while_dead")
    );
    assert_eq!(
        r("fio_running_at_kill"),
        "0",
        "fio ended before the kill: {}",
        r("fio.txt")
    );
    assert_eq!(r("node_kept"), "0", "/dev/ublkbN vanished when its server died");
    assert_eq!(
        r("fio_held"),
        "0",
        "fio ended while no server was running: {}",
        r("fio.txt")
    );
    assert_eq!(
        r("writes_at_kill").parse::<u64>().ok(),
        r("writes_while_dead").parse::<u64>().ok(),
        "writes completed while no server was running"
    );
    let recovered = r("d2.err")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "ublk device recovered")
        .unwrap_or_else(|| panic!("no recovery log line: {}", r("d2.err")));
    eprintln!(
        "recovery: START_USER_RECOVERY after {} ms of waiting, I/O released {} ms after the new server began",
        recovered["fields"]["waited_ms"], recovered["fields"]["took_ms"]
    );
    assert_eq!(r("fio.rc"), "0", "fio across the recovery:\n{}", r("fio.txt"));
    assert!(r("fio.txt").contains("err= 0"), "{}", r("fio.txt"));
    assert_eq!(r("cmp.rc"), "0", "device and backing differ: {}", r("cmp.txt"));
    assert_eq!(r("d2.rc"), "0", "clean stop: {}", r("d2.err"));
    assert_eq!(r("gone.rc"), "1", "the block device must be gone after the stop");
    assert_eq!(r("ioerrors"), "0", "the kernel logged I/O errors:\n{}", r("dmesg.txt"));
    assert_eq!(r("kwarn"), "0", "kernel warnings:\n{}", r("dmesg.txt"));
    let s = stats(&run, "d2.out");
    eprintln!("recovered server's stats: {s}");
    assert!(count(&s, "writes") > 0 && count(&s, "reads") >= 4096, "{s}");
    assert_eq!(count(&s, "errors"), 0, "{s}");

    assert_eq!(r("none.rc"), "64", "{}", r("none.err"));
    assert!(
        r("none.err").contains(&format!("cannot recover ublk device {}: no such device", r("id"))),
        "{}",
        r("none.err")
    );
}
