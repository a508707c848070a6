#!/usr/bin/env bash
# scripts/lab/bench-mirror-node.sh ROLE RUNDIR -- one node of scripts/bench-mirror.sh's
# two-guest benchmark; runs INSIDE a scripts/lab/run-vm.sh guest (Debian 6.12 kernel).
#
#   ROLE a: "vma" 10.251.0.11, the primary: ping + iperf3 to b, then the same fio jobs on
#           (a) the raw brd /dev/ram0, (b) ublk-mirror's /dev/ublkbN (replica in b),
#           (c) DRBD protocol C /dev/drbd0 (secondary in b), in that order.
#   ROLE b: "vmb" 10.251.0.12, the peer: iperf3 server, then the replica / the DRBD
#           secondary whenever a asks for it.
# The two guests coordinate through flag files in RUNDIR (the 9p share, visible on the host
# too); every result is a file there: fio JSON, ping/iperf3 output, logs, "<phase>.skipped"
# with the reason when a phase could not run. Nothing is parsed from the console.
# Environment (set by bench-mirror.sh): RT (measured s per job), RAMP (s), RD_MB (brd size),
# FIO_SIZE (MiB, the region fio writes), IPERF_S, BIN (ublk-mirror binary), JOBS_ONLY.
set -u
ROLE=$1 RUN=$2
RT=${RT:-10} RAMP=${RAMP:-2} RD_MB=${RD_MB:-1024} FIO_SIZE=${FIO_SIZE:-1000} IPERF_S=${IPERF_S:-10}
BIN=${BIN:?BIN (the ublk-mirror binary) is required}
A_IP=10.251.0.11 B_IP=10.251.0.12
RES=$RUN/r0.res
C="drbdadm -c $RES"
SECRET=$RUN/mirror.secret
MPORT=7800

export NO_COLOR=1
plain() { sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' | head -c 400; }   # log tail -> one plain line
log() { echo "[$ROLE $(cut -d' ' -f1 /proc/uptime)s] $*" >> "$RUN/$ROLE.log"; }
die() { log "FATAL: $*"; echo "$*" > "$RUN/$ROLE.failed"; [[ $ROLE = a ]] && touch "$RUN/a.done"; exit 1; }
run() { log "+ $*"; "$@" >> "$RUN/$ROLE.log" 2>&1; }
skip() { log "phase $1 not run: $2"; echo "$2" > "$RUN/$1.skipped"; }
# wait_flag FILE SECS: wait for a flag file; returns 1 on timeout or when a finished
wait_flag() {
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        [[ -e $1 ]] && return 0
        [[ $ROLE = b && -e $RUN/a.done ]] && return 1
        [[ $ROLE = a && -e $RUN/b.failed ]] && return 1
        sleep 0.2
    done
    return 1
}

# --- plumbing the read-only 9p root needs (recipes/drbd-bench pitfalls 1, 2, 5) ----------
mkdir -p /run/lock
mount -t tmpfs tmpfs /var/lib/drbd 2>/dev/null || mkdir -p /var/lib/drbd
modprobe drbd 2>>"$RUN/$ROLE.log" || log "modprobe drbd failed (DRBD phase will be skipped)"
modprobe brd rd_nr=1 rd_size=$((RD_MB * 1024)) max_part=0 || die "modprobe brd"
[[ -b /dev/ram0 ]] || die "no /dev/ram0"
log "kernel $(uname -r); ram0 $(blockdev --getsize64 /dev/ram0) bytes; $(head -1 /proc/drbd 2>/dev/null)"
# touch every brd page once, so no phase pays for first-write page allocation
run dd if=/dev/zero of=/dev/ram0 bs=1M count="$RD_MB" oflag=direct status=none || die "dd fill"
mkdir -p /run/mbench

# ublk-mirror daemons: the configuration is written here, the daemon runs in the background.
mirror_pid=""
mirror_stop() {
    [[ -n $mirror_pid ]] || return 0
    kill -TERM "$mirror_pid" 2>/dev/null
    local i
    for ((i = 0; i < 100; i++)); do kill -0 "$mirror_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$mirror_pid" 2>/dev/null
    wait "$mirror_pid" 2>/dev/null
    mirror_pid=""
}
# mirror_supported: prints why not and fails when this binary has no mirror daemon (whether
# it has the ublk frontend, the daemon itself says when asked for `ublk = true`)
mirror_supported() {
    [[ -x $BIN ]] || { echo "no ublk-mirror binary at $BIN"; return 1; }
    local h
    h=$("$BIN" --help 2>&1)
    grep -qE '^ +run ' <<<"$h" || { echo "this ublk-mirror has no 'run' subcommand (mirror engine not merged yet)"; return 1; }
    grep -qE '^ +create-meta ' <<<"$h" || { echo "this ublk-mirror has no 'create-meta' subcommand"; return 1; }
    "$BIN" run --help 2>&1 | grep -q -- '--config' || { echo "'ublk-mirror run' takes no --config"; return 1; }
    return 0
}
# mirror_conf FILE HOST ROLE META CTL EXTRA: the daemon's TOML (one link: the guest link)
mirror_conf() {
    local me peer
    if [[ $3 = primary ]]; then me=$A_IP peer=$B_IP; else me=$B_IP peer=$A_IP; fi
    cat > "$1" <<EOF
resource = "bench"
host = "$2"
role = "$3"
backing = "/dev/ram0"
meta = "$4"
pool_secret_file = "$SECRET"
control_socket = "$5"
$6

[[link]]
listen = "$me:$MPORT"
peer = "$peer:$MPORT"
EOF
}
mstatus() { "$BIN" status --json --socket "$1" 2>/dev/null; }
wait_status() {  # wait_status SOCK SECS JQ-CONDITION
    local i out
    for ((i = 0; i < $2 * 2; i++)); do
        out=$(mstatus "$1") && [[ -n $out ]] && jq -e "$3" <<<"$out" >/dev/null 2>&1 && return 0   # (jq 1.6 -e is 0 on no input)
        kill -0 "$mirror_pid" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}
# create-meta: both copies are zeroed brd disks with the same data generation -> no first sync
mirror_meta() {  # mirror_meta META
    local id gen
    read -r id gen < "$RUN/mirror.ids"
    "$BIN" create-meta --meta "$1" --backing /dev/ram0 --device-id "$id" --consistent --generation "$gen" --force \
        >> "$RUN/$ROLE.log" 2>&1
}
# mirror_replica_start (b) / mirror_primary_start (a, sets MIRROR_DEV to /dev/ublkbN): start
# the daemon in the background (mirror_pid), wait until it serves; on failure print why.
MIRROR_DEV=""
mirror_replica_start() {
    mirror_meta /run/mbench/b.meta || { echo "create-meta failed"; return 1; }
    mirror_conf /run/mbench/b.toml vmb secondary /run/mbench/b.meta /run/mbench/b.ctl ""
    cp /run/mbench/b.toml "$RUN/"
    "$BIN" run --config /run/mbench/b.toml >> "$RUN/mirror-b.log" 2>&1 &
    mirror_pid=$!
    wait_status /run/mbench/b.ctl 30 '.role != null' || { echo "replica daemon not answering: $(tail -n 3 "$RUN/mirror-b.log" | plain)"; return 1; }
}
mirror_primary_start() {
    local before d i
    mirror_meta /run/mbench/a.meta || { echo "create-meta failed"; return 1; }
    mirror_conf /run/mbench/a.toml vma primary /run/mbench/a.meta /run/mbench/a.ctl "ublk = true"
    cp /run/mbench/a.toml "$RUN/"
    before=$(ls /dev/ublkb* 2>/dev/null)
    "$BIN" run --config /run/mbench/a.toml >> "$RUN/mirror-a.log" 2>&1 &
    mirror_pid=$!
    wait_status /run/mbench/a.ctl 60 '.connection == "connected" and .sync == "in-sync"' || {
        echo "primary not connected and in sync: $(mstatus /run/mbench/a.ctl | jq -c '{connection, sync, refused}' 2>/dev/null) $(tail -n 3 "$RUN/mirror-a.log" | plain)"; return 1; }
    for ((i = 0; i < 100; i++)); do
        for d in /dev/ublkb*; do
            [[ -b $d ]] && ! grep -qx "$d" <<<"$before" && { MIRROR_DEV=$d; return 0; }
        done
        sleep 0.2
    done
    echo "the primary is connected and in sync but no new /dev/ublkbN appeared (is 'ublk = true' supported by this build?): $(grep -i -E 'ublk|error|warn' "$RUN/mirror-a.log" | tail -n 3 | plain)"; return 1
}

drbd_res() {
    cat > "$RES" <<EOF
global { usage-count no; }
resource r0 {
  net { protocol C; }
  device    /dev/drbd0 minor 0;
  disk      /dev/ram0;
  meta-disk internal;
  on vma { address $A_IP:7789; }
  on vmb { address $B_IP:7789; }
}
EOF
}

if [[ $ROLE = b ]]; then
    iperf3 -s -D -1 >/dev/null 2>&1 || iperf3 -s -D >/dev/null 2>&1
    touch "$RUN/b.up"
    log "up, iperf3 server started"
    done_m=0 done_ms=0 done_d=0
    while [[ ! -e $RUN/a.done ]]; do
        if [[ $done_m = 0 && -e $RUN/mirror.start ]]; then
            done_m=1
            if mirror_replica_start > "$RUN/b.mirror.why" 2>&1; then touch "$RUN/b.mirror.ready"; else
                log "replica did not start: $(cat "$RUN/b.mirror.why")"; mv "$RUN/b.mirror.why" "$RUN/b.mirror.failed"; fi
        fi
        if [[ $done_ms = 0 && -e $RUN/mirror.stop ]]; then
            done_ms=1; mirror_stop; touch "$RUN/b.mirror.stopped"
        fi
        if [[ $done_d = 0 && -e $RUN/drbd.start ]]; then
            done_d=1
            if run $C create-md --force r0 && run $C up r0; then touch "$RUN/b.drbd.ready"
            else echo "drbdadm create-md/up failed on b" > "$RUN/b.drbd.failed"; fi
        fi
        sleep 0.2
    done
    mirror_stop
    [[ $done_d = 1 ]] && { cat /proc/drbd > "$RUN/b.proc_drbd"; run $C down r0; }
    log "done"
    exit 0
fi

# --- role a ---------------------------------------------------------------------------
wait_flag "$RUN/b.up" 180 || die "peer b never came up"
ping -c 3 -W 2 $B_IP >/dev/null 2>&1 || die "peer b not reachable on the link"

log "link: ping + iperf3"
ping -c 20 -i 0.2 $B_IP > "$RUN/ping-56.txt" 2>&1
ping -c 20 -i 0.2 -s 4096 $B_IP > "$RUN/ping-4096.txt" 2>&1
iperf3 -c $B_IP -t "$IPERF_S" -J > "$RUN/iperf3.json" 2>>"$RUN/a.log" || log "iperf3 failed"

JOBS=("qd1 randwrite 4k 1" "qd32 randwrite 4k 32" "seq write 1M 8")
ticks() { local f; f=$(cut -d')' -f2- "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }; set -- $f; echo $(( ${12} + ${13} )); }
runfio() {  # runfio PHASE DEV: the three jobs; with a server (mirror_pid) its CPU per job too
    local phase=$1 dev=$2 j name rw bs qd t0 w0
    for j in "${JOBS[@]}"; do
        read -r name rw bs qd <<<"$j"
        log "fio $phase $name on $dev"
        [[ -n $mirror_pid ]] && t0=$(ticks "$mirror_pid") w0=$(date +%s.%N)
        fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" \
            --bs="$bs" --iodepth="$qd" --numjobs=1 --size="${FIO_SIZE}M" --time_based \
            --runtime="$RT" --ramp_time="$RAMP" --randrepeat=0 --norandommap \
            --lat_percentiles=1 --percentile_list=50:99:99.9 \
            --output-format=json --output="$RUN/$phase-$name.json" \
            >>"$RUN/a.log" 2>&1 || { log "fio $phase $name failed"; rm -f "$RUN/$phase-$name.json"; }
        # "server CPU seconds, wall seconds" of this job (ramp included)
        [[ -n $mirror_pid ]] && echo "$(( $(ticks "$mirror_pid") - t0 )) $(getconf CLK_TCK) $(echo "$(date +%s.%N) $w0" | awk '{print $1 - $2}')" \
            > "$RUN/$phase-$name.cpu"
    done
}

# (a) raw backing device, before anything else writes metadata to it
runfio raw /dev/ram0

# (a') the ublk frontend alone (ublk-local, no mirror) on the same brd: what ublk costs here
ublk_phase() {
    "$BIN" --help 2>&1 | grep -qE '^ +ublk-local ' || { skip ublk "this ublk-mirror has no ublk-local (frontend not merged yet)"; return; }
    "$BIN" ublk-local --backing /dev/ram0 > /run/mbench/ublk-local.out 2>>"$RUN/ublk-local.log" &
    mirror_pid=$!
    local i dev=""
    for ((i = 0; i < 100; i++)); do
        dev=$(grep -o '/dev/ublkb[0-9]*' /run/mbench/ublk-local.out 2>/dev/null | head -n 1)
        [[ -n $dev && -b $dev ]] && break
        kill -0 "$mirror_pid" 2>/dev/null || break
        sleep 0.2
    done
    if [[ -n $dev && -b $dev ]]; then runfio ublk "$dev"
    else skip ublk "ublk-local did not create a device: $(tail -n 3 "$RUN/ublk-local.log" | plain)"; fi
    mirror_stop
}
ublk_phase

# (b) ublk-mirror
mirror_phase() {
    local why
    why=$(mirror_supported) || { skip mirror "$why"; return; }
    touch "$RUN/mirror.start"
    wait_flag "$RUN/b.mirror.ready" 60 || {
        skip mirror "replica in guest b did not start: $(cat "$RUN/b.mirror.failed" 2>/dev/null || echo timeout)"; return; }
    local dev
    mirror_primary_start > "$RUN/a.mirror.why" 2>&1 || {
        skip mirror "primary did not start: $(tail -n 5 "$RUN/a.mirror.why" | plain)"; mirror_stop; return; }
    dev=$MIRROR_DEV
    log "mirror: primary on $dev"
    mstatus /run/mbench/a.ctl > "$RUN/mirror-status-before.json"
    runfio mirror "$dev"
    mstatus /run/mbench/a.ctl > "$RUN/mirror-status-after.json"
    # (b') the same primary with its replica stopped (degraded: local write + dirty bitmap):
    # the engine's local path alone, like DRBD StandAlone in recipes/drbd-bench
    touch "$RUN/mirror.stop"
    wait_flag "$RUN/b.mirror.stopped" 30 || log "replica did not report stopped"
    if wait_status /run/mbench/a.ctl 30 '.sync == "degraded"'; then
        runfio mirrordeg "$dev"
        mstatus /run/mbench/a.ctl > "$RUN/mirror-status-degraded.json"
    else
        skip mirrordeg "the primary did not report degraded after the replica stopped"
    fi
    mirror_stop
}
mirror_phase
touch "$RUN/mirror.stop"
wait_flag "$RUN/b.mirror.stopped" 30 || log "replica did not report stopped"

# (c) DRBD protocol C, default settings (recipes/drbd-bench)
drbd_phase() {
    [[ -e /proc/drbd ]] || { skip drbd "drbd.ko did not load in this kernel"; return; }
    drbd_res
    touch "$RUN/drbd.start"
    run $C create-md --force r0 || { skip drbd "drbdadm create-md failed on a"; return; }
    run $C up r0 || { skip drbd "drbdadm up failed on a"; return; }
    wait_flag "$RUN/b.drbd.ready" 60 || { skip drbd "secondary b not ready: $(cat "$RUN/b.drbd.failed" 2>/dev/null || echo timeout)"; return; }
    local i
    for ((i = 0; i < 60; i++)); do [[ $($C cstate r0 2>/dev/null) = Connected ]] && break; sleep 1; done
    [[ $($C cstate r0 2>/dev/null) = Connected ]] || { skip drbd "never Connected: $(tr '\n' ' ' </proc/drbd)"; return; }
    run $C -- --clear-bitmap new-current-uuid r0 || { skip drbd "new-current-uuid failed"; return; }
    run $C primary r0 || { skip drbd "primary failed"; return; }
    for ((i = 0; i < 20; i++)); do [[ $($C dstate r0) = UpToDate/UpToDate ]] && break; sleep 1; done
    [[ $($C dstate r0) = UpToDate/UpToDate ]] || { skip drbd "not UpToDate/UpToDate: $(tr '\n' ' ' </proc/drbd)"; return; }
    [[ -b /dev/drbd0 ]] || { skip drbd "/dev/drbd0 is not a block device"; return; }
    cat /proc/drbd > "$RUN/a.proc_drbd.before"
    runfio drbd /dev/drbd0
    cat /proc/drbd > "$RUN/a.proc_drbd.after"
    run $C secondary r0
    run $C down r0
}
drbd_phase
ping -c 10 -i 0.2 $B_IP > "$RUN/ping-56-after.txt" 2>&1
log "done"
touch "$RUN/a.done"
exit 0
