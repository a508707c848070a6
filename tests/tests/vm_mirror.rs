//! The mirrored ublk device end to end: the primary `ublk-mirror run --ublk` inside the 6.12
//! guest serves `/dev/ublkbN` over a file in the guest; the replica `ublk-mirror run` runs
//! on this machine inside a lab network namespace, reached by the guest over two tap
//! devices (AL1 and AL2, two virtio NICs, two subnets). fio with crc32c verify runs through
//! the device while faults hit either side:
//!
//! 1. connected: fio verify, then both backing files compared (SHA-256 in the guest vs on
//!    the host);
//! 2. the replica is killed with SIGKILL mid-run: fio goes on (the primary degrades), the
//!    replica restarts, the primary resyncs to "in-sync", the copies compare equal;
//! 3. the primary daemon is killed with SIGKILL mid-run and restarted with ublk user
//!    recovery (`--ublk --ublk-id N` finds
//!    the device left behind and takes it over): fio completes with verify OK, the kernel logs no I/O
//!    error, the copies compare equal after the resync.
//!
//! The guest and the host meet through files in the guest's share: the guest announces a
//! phase with `p.NAME`, the host answers with `host.NAME` (and `host.abort` when it gives
//! up). Every assertion happens here, after the guest powered off.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eac_lab::netns::{Netns, unique_name};
use eac_lab::ublk_guest::{GuestRun, RunningGuest, UblkGuest, build_workspace_bin, shell_quote, skip_reason};
use eac_lab::{require_root, wait_until};

const SECRET: &str = "vm-mirror-secret-0123456789abcdef";
const RESOURCE: &str = "vm-disk";
const DEVICE_ID: &str = "0xeac0f1";
/// Both sides start from zeroed backings declared identical: no initial full sync.
const GENERATION: &str = "0x5eed0001";
const SIZE: u64 = 32 << 20;
const PORT: u16 = 7789;
/// Host (replica) and guest (primary) addresses on AL1 and AL2.
const LINKS: [(&str, &str, &str); 2] = [
    ("al1", "10.251.10.1", "10.251.10.2"),
    ("al2", "10.251.11.1", "10.251.11.2"),
];
const PEER_TIMEOUT_MS: u64 = 1500;

/// A directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique_name("vm-mirror"));
        std::fs::create_dir(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The replica daemon on the host, in the lab namespace.
struct Replica {
    bin: PathBuf,
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Replica {
    fn backing(&self) -> PathBuf {
        self.dir.join("replica.img")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("replica.sock")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("replica.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("replica.log"))
            .expect("replica log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(&self.bin)
            .args([
                "run",
                "--resource",
                RESOURCE,
                "--host",
                "replica",
                "--role",
                "secondary",
            ])
            .arg("--backing")
            .arg(self.backing())
            .arg("--meta")
            .arg(self.dir.join("replica.meta"))
            .arg("--secret-file")
            .arg(self.dir.join("secret"))
            .arg("--control-socket")
            .arg(self.socket())
            .args(["--peer-timeout-ms", &PEER_TIMEOUT_MS.to_string()]);
        for (_, host, guest) in LINKS {
            cmd.args(["--link", &format!("{host}:{PORT}={guest}:{PORT}")]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start the replica");
        self.child = Some(child);
        let t = wait_until(Duration::from_secs(20), "the replica's control socket", || {
            self.status().is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        eprintln!("replica start {}: answering after {t:.1?}", self.starts);
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = wait_until(Duration::from_secs(5), "replica stopped", || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// The guest's side of the rendezvous, seen from the host.
struct Rendezvous<'a> {
    guest: &'a mut RunningGuest,
}

impl Rendezvous<'_> {
    /// Waits for the guest to announce `p.NAME`; false if the guest ended (or timed out)
    /// first — the assertions after the run then show why.
    fn wait(&mut self, name: &str, timeout: Duration) -> bool {
        let f = self.guest.share().join(format!("p.{name}"));
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if f.exists() {
                return true;
            }
            if !self.guest.running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("host: the guest did not reach {name} within {timeout:?}; aborting it");
        self.answer("abort");
        false
    }
    fn answer(&self, name: &str) {
        std::fs::write(self.guest.share().join(format!("host.{name}")), b"").expect("write answer");
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.guest.share().join(name), text).expect("write share file");
    }
}

fn guest_script(bin: &str) -> String {
    let links: String = LINKS
        .iter()
        .map(|(_, host, guest)| format!(" --link {guest}:{PORT}={host}:{PORT}"))
        .collect();
    format!(
        r#"
set -u
BIN={bin}
now() {{ date +%s.%N; }}
T0=$(now)
lap() {{ local t; t=$(now); echo "$1 $(awk -v a="$T0" -v b="$t" 'BEGIN {{ printf "%.2f", b - a }}')" >> timings; T0=$t; }}
fatal() {{ echo "$*" >> fatal; st > status.fatal 2>&1; exit 3; }}
phase() {{ touch "p.$1"; }}
wait_host() {{
  for _ in $(seq 1200); do
    [ -e "host.$1" ] && return 0
    [ -e host.abort ] && fatal "the host aborted while we waited for $1"
    sleep 0.05
  done
  fatal "the host did not answer $1 within 60 s"
}}
SOCK=/tmp/mirror.sock
st() {{ "$BIN" status --json --socket "$SOCK" 2> /dev/null; }}
field() {{ st | jq -r "$1" 2> /dev/null; }}
# wait_sync STATE SECONDS: until the primary's status says sync = STATE
wait_sync() {{
  for _ in $(seq $(( $2 * 10 ))); do [ "$(field .sync)" = "$1" ] && return 0; sleep 0.1; done
  fatal "the primary is not $1 after $2 s: $(st)"
}}
writes_done() {{ awk '{{ print $5 }}' "/sys/block/$NAME/stat"; }}
# wait_writes N: until N more writes completed on the device (fio is making progress)
wait_writes() {{
  local w0; w0=$(writes_done)
  for _ in $(seq 1200); do [ "$(writes_done)" -ge $(( w0 + $1 )) ] && return 0; sleep 0.05; done
  fatal "fewer than $1 writes completed in 60 s (in flight now, reads writes: $(cat /sys/block/$NAME/inflight 2> /dev/null); fio running: $(kill -0 "${{FIOPID:-0}}" 2> /dev/null && echo yes || echo no); primary io: $(st | jq -c .io 2> /dev/null))"
}}
B=/tmp/primary.img M=/tmp/primary.meta S=/tmp/secret
printf %s {secret} > "$S"
truncate -s {size} "$B"
"$BIN" create-meta --meta "$M" --backing "$B" --device-id {device_id} --consistent --generation {generation} > create-meta.out 2>&1 \
  || fatal "create-meta: $(cat create-meta.out)"
start_primary() {{
  echo "==== start $* ====" >> d.err
  RUST_LOG=info "$BIN" run --resource {resource} --host primary --role primary --backing "$B" --meta "$M" \
    --secret-file "$S" {links} --peer-timeout-ms {peer_timeout} --control-socket "$SOCK" --ublk "$@" >> d.out 2>> d.err &
  PID=$!
  for _ in $(seq 600); do
    DEV=$(field .ublk)
    [ -n "$DEV" ] && [ "$DEV" != null ] && [ -b "$DEV" ] && break
    kill -0 "$PID" 2> /dev/null || fatal "the primary exited: $(tail -n 20 d.err)"
    sleep 0.1
  done
  [ -b "$DEV" ] || fatal "no ublk device after 60 s: $(tail -n 20 d.err)"
  ID=${{DEV#/dev/ublkb}} NAME=${{DEV#/dev/}}
}}
FIO="--rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 --verify=crc32c --do_verify=1"
trap '[ -n "${{PID:-}}" ] && kill "$PID" 2> /dev/null' EXIT
dmesg -C
ping -c1 -W5 {al1_host} > ping1.txt 2>&1; echo $? > ping1.rc
ping -c1 -W5 {al2_host} > ping2.txt 2>&1; echo $? > ping2.rc
lap boot_to_script

# --- (1) connected: fio verify, then compare the copies
start_primary
echo "$DEV" > dev
lap primary_start
wait_sync in-sync 30
field '.links' > links.json
lap connected_in_sync
fio --name=s1 --filename="$DEV" $FIO --size=8M --output=fio1.txt > /dev/null 2>&1; echo $? > fio1.rc
lap step1_fio_8M
wait_sync in-sync 30
sha256sum "$B" | cut -d' ' -f1 > sha1
phase step1; wait_host step1
lap step1_compare

# --- (2) kill -9 the replica mid-run, restart it, resync
# Four passes over the 8 MiB (each written, then verified): the workload must outlast the
# time the primary takes to notice the kill (a single pass ended first once writes got faster).
fio --name=s2 --filename="$DEV" $FIO --offset=8M --size=8M --loops=4 --output=fio2.txt > /dev/null 2>&1 &
FIOPID=$!
wait_writes 200
phase kill-replica; wait_host kill-replica
lap step2_until_replica_killed
T=$(now)
wait_sync degraded 30
awk -v a="$T" -v b="$(now)" 'BEGIN {{ printf "%.2f", b - a }}' > degraded_after
kill -0 "$FIOPID" 2> /dev/null; echo $? > fio2_running_degraded
wait_writes 200
field '.dirty_bytes' > dirty_while_degraded
lap step2_degraded_writes
phase restart-replica; wait_host restart-replica
T=$(now)
wait "$FIOPID"; echo $? > fio2.rc
lap step2_fio_rest
wait_sync in-sync 60
awk -v a="$T" -v b="$(now)" 'BEGIN {{ printf "%.2f", b - a }}' > insync_after_restart
st > status2.json
sha256sum "$B" | cut -d' ' -f1 > sha2
phase step2; wait_host step2
lap step2_resync_compare

# --- (3) kill -9 the primary mid-run, restart it with ublk user recovery
fio --name=s3 --filename="$DEV" $FIO --offset=16M --size=8M --output=fio3.txt > /dev/null 2>&1 &
FIOPID=$!
wait_writes 200
kill -0 "$FIOPID" 2> /dev/null; echo $? > fio3_running_at_kill
kill -9 "$PID"; wait "$PID" 2> /dev/null
writes_done > writes_at_kill
lap step3_until_primary_killed
sleep 1
[ -b "$DEV" ]; echo $? > node_kept
kill -0 "$FIOPID" 2> /dev/null; echo $? > fio3_held
writes_done > writes_while_dead
OLD=$DEV
T=$(now)
start_primary --ublk-id "$ID"
awk -v a="$T" -v b="$(now)" 'BEGIN {{ printf "%.2f", b - a }}' > recover_took
[ "$DEV" = "$OLD" ]; echo $? > same_dev
lap step3_recover
wait "$FIOPID"; echo $? > fio3.rc
lap step3_fio_rest
wait_sync in-sync 60
st > status3.json
sha256sum "$B" | cut -d' ' -f1 > sha3
phase step3; wait_host step3
lap step3_resync_compare

kill -TERM "$PID"; wait "$PID"; echo $? > stop.rc; PID=
[ -e "$DEV" ]; echo $? > gone.rc
dmesg | grep -ci "i/o error" > ioerrors
dmesg | grep -cE "WARNING:|BUG:|Call Trace" > kwarn
dmesg | tail -n 40 > dmesg.txt
lap stop
"#,
        secret = shell_quote(SECRET),
        size = SIZE,
        device_id = DEVICE_ID,
        generation = GENERATION,
        resource = RESOURCE,
        peer_timeout = PEER_TIMEOUT_MS,
        al1_host = LINKS[0].1,
        al2_host = LINKS[1].1,
    )
}

/// Reads a result file of the run, trimmed; panics with the transcript if it is missing.
fn read(run: &GuestRun, f: &str) -> String {
    run.read(f)
        .unwrap_or_else(|e| {
            panic!(
                "{f}: {e}\nfatal: {}\n{}\nprimary log (tail):\n{}",
                run.read("fatal").unwrap_or_default(),
                run.transcript(),
                tail(&run.read("d.err").unwrap_or_default(), 40)
            )
        })
        .trim()
        .to_owned()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
#[ignore = "vm: boots the 6.12 guest (ublk_drv) with two tap links to a replica on this host; run by scripts/test.sh"]
fn mirrored_ublk_device_survives_replica_and_primary_kill() {
    require_root();
    if let Some(why) = skip_reason() {
        panic!("the ublk guest cannot run here: {why} (run scripts/setup.sh)");
    }
    let t_all = Instant::now();
    let bin = build_workspace_bin("ublk-mirror", "ublk-mirror").expect("build ublk-mirror");
    eprintln!("cargo build check: {:.1?}", t_all.elapsed());

    // The lab side: a namespace holding the two taps (AL1, AL2) and the replica.
    let ns = Netns::create("mvm").expect("namespace");
    for (tap, host, _) in LINKS {
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).expect("tap");
        ns.ip(&["addr", "add", &format!("{host}/24"), "dev", tap])
            .expect("addr");
        ns.ip(&["link", "set", tap, "up"]).expect("up");
    }
    let dir = TempDir::new();
    std::fs::write(dir.0.join("secret"), SECRET).expect("secret");
    let mut replica = Replica {
        bin: bin.clone(),
        ns: ns.name().to_owned(),
        dir: dir.0.clone(),
        child: None,
        starts: 0,
    };
    std::fs::File::create(replica.backing())
        .and_then(|f| f.set_len(SIZE))
        .expect("replica backing");
    run_ok(
        Command::new(&bin)
            .args(["create-meta", "--meta"])
            .arg(dir.0.join("replica.meta"))
            .arg("--backing")
            .arg(replica.backing())
            .args(["--device-id", DEVICE_ID, "--consistent", "--generation", GENERATION]),
    );
    replica.spawn();

    let guest = LINKS.iter().fold(
        UblkGuest::new().timeout(Duration::from_secs(400)).netns(ns.name()),
        |g, (tap, _, ip)| g.tap(tap, &format!("{ip}/24")),
    );
    let t_boot = Instant::now();
    let mut running = guest
        .spawn_script(&guest_script(&shell_quote(bin.to_str().expect("utf-8 path"))))
        .expect("boot the guest");

    let mut host_sha = Vec::new();
    let mut events = Vec::new();
    {
        let mut rv = Rendezvous { guest: &mut running };
        'steps: {
            if !rv.wait("step1", Duration::from_secs(200)) {
                break 'steps;
            }
            host_sha.push(sha256(&replica.backing()));
            rv.answer("step1");
            if !rv.wait("kill-replica", Duration::from_secs(60)) {
                break 'steps;
            }
            replica.kill9();
            events.push(format!("replica killed at {:.1?}", t_boot.elapsed()));
            rv.answer("kill-replica");
            if !rv.wait("restart-replica", Duration::from_secs(60)) {
                break 'steps;
            }
            replica.spawn();
            events.push(format!("replica restarted at {:.1?}", t_boot.elapsed()));
            rv.answer("restart-replica");
            if !rv.wait("step2", Duration::from_secs(120)) {
                break 'steps;
            }
            host_sha.push(sha256(&replica.backing()));
            if let Some(s) = replica.status() {
                rv.write("replica_status2.json", &s.to_string());
            }
            rv.answer("step2");
            if !rv.wait("step3", Duration::from_secs(120)) {
                break 'steps;
            }
            host_sha.push(sha256(&replica.backing()));
            if let Some(s) = replica.status() {
                rv.write("replica_status3.json", &s.to_string());
            }
            rv.answer("step3");
        }
    }
    let run = running.wait().expect("guest run");
    eprintln!("guest run: {:.1?} wall, status {:?}", run.wall, run.status);
    for line in run.read("timings").unwrap_or_default().lines() {
        eprintln!("  {line} s");
    }
    for e in &events {
        eprintln!("  host: {e}");
    }
    let r = |f: &str| read(&run, f);
    assert_eq!(
        run.status,
        Some(0),
        "fatal: {}\n{}\nprimary log (tail):\n{}\nreplica log (tail):\n{}",
        run.read("fatal").unwrap_or_default(),
        run.transcript(),
        tail(&run.read("d.err").unwrap_or_default(), 60),
        tail(&replica.log(), 40)
    );

    // The links: the guest reaches the replica's address on each.
    assert_eq!(r("ping1.rc"), "0", "AL1: {}", r("ping1.txt"));
    assert_eq!(r("ping2.rc"), "0", "AL2: {}", r("ping2.txt"));
    eprintln!("links while connected: {}", r("links.json").replace('\n', " "));

    // (1) connected
    assert_eq!(r("fio1.rc"), "0", "fio verify while connected:\n{}", r("fio1.txt"));
    assert!(r("fio1.txt").contains("err= 0"), "{}", r("fio1.txt"));
    assert_eq!(
        r("sha1"),
        host_sha[0],
        "step 1: the replica's backing differs from the primary's"
    );

    // (2) replica killed and restarted
    eprintln!(
        "step 2: degraded {} s after the replica was killed; in sync {} s after its restart; dirty while degraded {} bytes",
        r("degraded_after"),
        r("insync_after_restart"),
        r("dirty_while_degraded")
    );
    assert_eq!(
        r("fio2_running_degraded"),
        "0",
        "fio had ended before the primary degraded: the kill did not hit a running workload"
    );
    assert_eq!(r("fio2.rc"), "0", "fio across the replica's death:\n{}", r("fio2.txt"));
    assert!(r("fio2.txt").contains("err= 0"), "{}", r("fio2.txt"));
    assert!(
        r("dirty_while_degraded").parse::<u64>().is_ok_and(|d| d > 0),
        "no dirty regions recorded while degraded: {}",
        r("dirty_while_degraded")
    );
    let st2: serde_json::Value = serde_json::from_str(&r("status2.json")).expect("status2 JSON");
    eprintln!("step 2 resync: {}", st2["resync"]);
    assert_eq!(st2["dirty_bytes"], 0, "{st2}");
    assert_eq!(
        r("sha2"),
        host_sha[1],
        "step 2: the replica's backing differs after the resync"
    );

    // (3) primary killed, recovered
    assert_eq!(
        r("fio3_running_at_kill"),
        "0",
        "fio ended before the kill: {}",
        r("fio3.txt")
    );
    assert_eq!(r("node_kept"), "0", "/dev/ublkbN vanished when the primary died");
    assert_eq!(
        r("fio3_held"),
        "0",
        "fio ended while no primary was running: {}",
        r("fio3.txt")
    );
    assert_eq!(
        r("writes_at_kill"),
        r("writes_while_dead"),
        "writes completed while no primary was running"
    );
    assert_eq!(r("same_dev"), "0", "the recovered device is not the old one");
    eprintln!(
        "step 3: the restarted primary served the device again after {} s",
        r("recover_took")
    );
    assert_eq!(
        r("fio3.rc"),
        "0",
        "fio across the primary's recovery:\n{}",
        r("fio3.txt")
    );
    assert!(r("fio3.txt").contains("err= 0"), "{}", r("fio3.txt"));
    let st3: serde_json::Value = serde_json::from_str(&r("status3.json")).expect("status3 JSON");
    eprintln!("step 3 resync: {}", st3["resync"]);
    for f in ["replica_status2.json", "replica_status3.json"] {
        let v: serde_json::Value = serde_json::from_str(&r(f)).unwrap_or_default();
        eprintln!(
            "{f}: role {}, sync {}, connection {}",
            v["role"], v["sync"], v["connection"]
        );
    }
    assert_eq!(
        r("sha3"),
        host_sha[2],
        "step 3: the replica's backing differs after the recovery's resync"
    );
    assert_eq!(r("stop.rc"), "0", "clean stop of the primary");
    assert_eq!(r("gone.rc"), "1", "the block device must be gone after the stop");
    assert_eq!(r("ioerrors"), "0", "the kernel logged I/O errors:\n{}", r("dmesg.txt"));
    assert_eq!(r("kwarn"), "0", "kernel warnings:\n{}", r("dmesg.txt"));
    eprintln!("total: {:.1?}", t_all.elapsed());
}
