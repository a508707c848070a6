#!/usr/bin/env bash
# scripts/lab/run-vm.sh -- boot Debian's 6.12 kernel in QEMU with a tiny busybox initramfs and
# run host-built binaries against the *real* ublk kernel driver (ublk_drv).
#
# Why: the host kernel (Firecracker-style 6.18 VM) has no ublk driver and cannot load
# modules, but the Debian package linux-image-6.12.*-amd64-unsigned is installed, so we
# boot that kernel as a guest.  The guest sees the host's whole root filesystem read-only
# over virtio-9p and chroots into it, so host binaries (fio, dd, bash, cargo-built test
# binaries linked against host glibc) run unchanged.  One directory (--share, default:
# $PWD) is shared read-write at the SAME path, so `target/release/foo` paths and result
# files work identically inside and outside the guest.
#
# Usage:
#   run-vm.sh [options] -- CMD [ARGS...]   run CMD (in the chroot, cwd = current dir),
#                                          power off, exit with CMD's exit status
#   run-vm.sh [options]                    interactive shell on the serial console
#                                          (Ctrl-A X quits QEMU)
# Options:
#   --accel auto|kvm|tcg   default auto: kvm only on a real VMX/SVM KVM host; a PVM
#                          host (kvm_pvm) cannot run an unmodified kernel -> tcg
#   --mem SIZE             guest RAM (default 2G)
#   --smp N                vCPUs (default 2)
#   --share DIR            read-write 9p share, mounted at the same path (default $PWD;
#                          "none" to disable)
#   --timeout SECS         kill QEMU after SECS (default 600 with CMD, none for the
#                          interactive shell; 0 = none); exit status 125 then
#   --console FILE         write the serial console to FILE instead of stdout
#   --net-local SOCK       enable virtio-net over a unix datagram socket bound to SOCK ...
#   --net-remote SOCK      ... sending to the peer VM's SOCK (point-to-point link; no
#                          host networking, no root/tap/bridge needed)
#   --net-tap IFNAME       alternatively: virtio-net on an existing tap device (run
#                          QEMU inside a netns you created: ip netns exec NS run-vm.sh
#                          ...; bridge the taps there for N guests + the netns itself).
#                          Repeatable: the Nth --net-tap is the guest's eth(N-1)
#   --ip CIDR              guest address on eth0 (use 10.251.0.0/16 only); repeatable:
#                          the Nth --ip goes to eth(N-1)
#   --mac MAC              eth0's MAC (default derived from --ip; ethN's from the Nth --ip)
#   --hostname NAME        guest hostname (default ublkvm)
#   --modules "a b"        extra modules to modprobe in the guest (host kmod, from the
#                          9p-mounted /lib/modules); ublk_drv is always loaded
#   --rebuild              force rebuilding the cached initramfs
#   --verbose              show kernel messages on the console
# Environment: KVER (default 6.12.107+deb12-amd64), VM_CACHE (initramfs cache dir,
#   default <repo>/target/vm-cache), QEMU (default qemu-system-x86_64).
# Output: the guest's console (CMD's stdout+stderr, CRLF line ends) goes to stdout;
#   a summary line "run-vm.sh: accel=.. wall=..s qemu_rc=.." goes to stderr.
# Exit status: CMD's; 125 when the guest reported none (crash, timeout); 2 for a bad
#   option or a missing kernel; 129/130/143 when stopped by HUP/INT/TERM.
# Clean-up: QEMU is stopped (TERM, KILL after 5 s) on timeout, on INT/TERM/HUP and on
#   any exit; it also gets SIGKILL if this script is SIGKILLed (parent-death signal via
#   setpriv). The per-run control dir and initramfs staging files are removed.
# As a cargo runner (one VM boot per test binary, ~5 s each under TCG):
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="/path/run-vm.sh --" cargo test
# Two nodes (no privileges needed):
#   run-vm.sh --ip 10.251.0.1/24 --net-local /tmp/a.sock --net-remote /tmp/b.sock -- CMD &
#   run-vm.sh --ip 10.251.0.2/24 --net-local /tmp/b.sock --net-remote /tmp/a.sock -- CMD
#
# Inside the guest: /dev/ublk-control exists (ublk_drv loaded), devtmpfs provides
# /dev/ublkbN and /dev/ublkcN automatically (no udev), /tmp /run /dev/shm are tmpfs,
# env VM_GUEST=1 is set, hostname and eth0 are configured.
set -euo pipefail

KVER=${KVER:-6.12.107+deb12-amd64}
KERNEL=${KERNEL:-/boot/vmlinuz-$KVER}
MODDIR=/lib/modules/$KVER
QEMU=${QEMU:-qemu-system-x86_64}
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT_PATH")/../.." && pwd)
CACHE=${VM_CACHE:-$REPO/target/vm-cache}

accel=auto mem=2G smp=2 share=$PWD timeout="" console="" rebuild=0 verbose=0
net_local="" net_remote="" net_taps=() ips=() mac="" vmhost=ublkvm modules=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --accel) accel=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --share) share=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --console) console=$2; shift 2 ;;
        --net-local) net_local=$2; shift 2 ;;
        --net-remote) net_remote=$2; shift 2 ;;
        --net-tap) net_taps+=("$2"); shift 2 ;;
        --ip) ips+=("$2"); shift 2 ;;
        --mac) mac=$2; shift 2 ;;
        --hostname) vmhost=$2; shift 2 ;;
        --modules) modules=$2; shift 2 ;;
        --rebuild) rebuild=1; shift ;;
        --verbose) verbose=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$SCRIPT_PATH" | sed '$d'; exit 0 ;;
        *) echo "run-vm.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mode=shell; [[ $# -gt 0 ]] && mode=run
[[ -z $timeout ]] && { [[ $mode = run ]] && timeout=600 || timeout=0; }

# ---------------------------------------------------------------------------------
# 0. clean-up: everything this run creates is registered here and removed on exit.
# ---------------------------------------------------------------------------------
qpid="" spid="" ctl="" stage="" tmp_initrd=""
stop_qemu() {
    [[ -n $qpid ]] || return 0
    if kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        local i
        for i in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=""
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    stop_qemu
    if [[ -n $spid ]]; then kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; fi
    [[ -n $ctl ]] && rm -rf "$ctl"
    [[ -n $stage ]] && rm -rf "$stage"
    [[ -n $tmp_initrd ]] && rm -f "$tmp_initrd"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

[[ -r $KERNEL ]] || { echo "run-vm.sh: no kernel $KERNEL (apt-get install linux-image-$KVER-unsigned)" >&2; exit 2; }
[[ -d $MODDIR ]] || { echo "run-vm.sh: no modules dir $MODDIR" >&2; exit 2; }

# ---------------------------------------------------------------------------------
# 1. initramfs: static busybox + the few modules needed before the 9p root is
#    reachable (9p stack, virtio_net) + ublk_drv.  Everything else is modprobe'd
#    later from the host's /lib/modules via 9p.  Cached; rebuilt when this script or
#    the kernel's modules.dep changes.
# ---------------------------------------------------------------------------------
INITRD_MODULES="netfs 9pnet 9pnet_virtio 9p failover net_failover virtio_net ublk_drv"
initrd=$CACHE/initramfs-$KVER.cpio

# Print the dependency-ordered (deps first) list of module paths (relative to MODDIR).
resolve_modules() {
    local -A seen=()
    local out=()
    visit() {
        local path=$1 dep
        [[ -n ${seen[$path]:-} ]] && return 0
        seen[$path]=1
        local line deps
        line=$(grep -E "^${path//./\\.}:" "$MODDIR/modules.dep") || return 0
        deps=${line#*:}
        for dep in $deps; do visit "$dep"; done
        out+=("$path")
    }
    local name p
    for name in "$@"; do
        p=$(grep -E "/${name}\.ko(\.xz|\.zst|\.gz)?:" "$MODDIR/modules.dep" | head -1 | cut -d: -f1)
        [[ -n $p ]] || { echo "run-vm.sh: module $name not in modules.dep" >&2; return 1; }
        visit "$p"
    done
    printf '%s\n' "${out[@]}"
}

build_initramfs() {
    stage=$(mktemp -d "$CACHE/stage.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,ctl,host,etc,lib/modules,root}
    cp /bin/busybox "$stage/bin/busybox"   # Debian busybox-static (statically linked)
    ln -s busybox "$stage/bin/sh"
    : > "$stage/etc/modules.load"
    local m base mods
    mods=$(resolve_modules $INITRD_MODULES) || exit 2
    for m in $mods; do
        base=$(basename "$m"); base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
        case $m in
            *.xz) xz -dc "$MODDIR/$m" > "$stage/lib/modules/$base" ;;
            *.zst) zstd -dcq "$MODDIR/$m" > "$stage/lib/modules/$base" ;;
            *.gz) gzip -dc "$MODDIR/$m" > "$stage/lib/modules/$base" ;;
            *) cp "$MODDIR/$m" "$stage/lib/modules/$base" ;;
        esac
        echo "$base" >> "$stage/etc/modules.load"
    done
    # The guest's PID 1.  Configuration comes from /ctl/env (a per-run 9p share).
    cat > "$stage/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[vm-init $(up)s] $*"; }
while read -r m; do insmod "/lib/modules/$m" || log "insmod $m failed"; done < /etc/modules.load
o9p=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o9p,cache=none vmctl /ctl || { log "cannot mount vmctl"; poweroff -f; }
. /ctl/env
[ "$VM_VERBOSE" = 1 ] || echo 1 > /proc/sys/kernel/printk
# host root, read-only; cache=loose => page-cached binaries and libraries
mount -t 9p -o $o9p,ro,cache=loose hostroot /host || { log "cannot mount hostroot"; poweroff -f; }
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=755 tmpfs /host/run
mount -o bind /dev /host/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mkdir -p /host/run/vmctl && mount -o bind /ctl /host/run/vmctl
# The repository (its built binaries) is visible through the host root, unless it lives
# under a directory the guest replaces with a tmpfs (a checkout under /tmp, as CI may use):
# then it comes read-only through its own share, at the same path.
case "$VM_REPO" in
    /tmp/*|/run/*|/dev/shm/*)
        mkdir -p "/host$VM_REPO" 2>/dev/null
        mount -t 9p -o $o9p,ro,cache=loose repo "/host$VM_REPO" || log "cannot mount repo" ;;
esac
if [ -n "$VM_SHARE" ]; then
    mkdir -p "/host$VM_SHARE" 2>/dev/null
    mount -t 9p -o $o9p,cache=$VM_SHARE_CACHE share "/host$VM_SHARE" || log "cannot mount share"
fi
hostname "$VM_HOSTNAME"
ip link set lo up
i=0
for a in $VM_IP; do
    { ip link set "eth$i" up && ip addr add "$a" dev "eth$i"; } || log "eth$i setup failed"
    i=$((i + 1))
done
for m in $VM_MODULES; do chroot /host /sbin/modprobe "$m" || log "modprobe $m failed"; done
log "ready (ublk-control: $(ls /dev/ublk-control 2>/dev/null || echo missing))"
ENVI="HOME=/root TERM=${VM_TERM:-linux} PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VM_GUEST=1"
if [ "$VM_MODE" = run ]; then
    chroot /host /usr/bin/env -i $ENVI /bin/bash /run/vmctl/cmd.sh </dev/null
    echo $? > /ctl/rc
else
    setsid -c chroot /host /usr/bin/env -i $ENVI /bin/bash /run/vmctl/cmd.sh </dev/ttyS0 >/dev/ttyS0 2>&1
fi
log "powering off"
sync
umount "/host$VM_SHARE" 2>/dev/null
umount /ctl /host/run/vmctl 2>/dev/null
poweroff -f
INIT
    chmod +x "$stage/init"
    tmp_initrd=$initrd.tmp.$$
    (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$tmp_initrd"
    mv "$tmp_initrd" "$initrd"
    tmp_initrd=""
    rm -rf "$stage"
    stage=""
}

mkdir -p "$CACHE"
# flock: several VMs started at once (multi-node tests) must not rebuild concurrently
exec 9>"$CACHE/.lock"
flock 9
if [[ $rebuild = 1 || ! -s $initrd || $SCRIPT_PATH -nt $initrd || $MODDIR/modules.dep -nt $initrd ]]; then
    build_initramfs
fi
flock -u 9; exec 9>&-

# ---------------------------------------------------------------------------------
# 2. per-run control directory (9p tag "vmctl"): env, cmd.sh, rc
# ---------------------------------------------------------------------------------
# Lives in the cache dir, named after our pid: a run that was SIGKILLed (no trap ran)
# leaves its dir behind, and the next run removes it once that pid is gone.
for d in "$CACHE"/run.*; do
    [[ -d $d ]] || continue
    p=${d#"$CACHE"/run.}; p=${p%%.*}
    [[ $p =~ ^[0-9]+$ ]] && ! kill -0 "$p" 2>/dev/null && rm -rf "$d"
done
ctl=$(mktemp -d "$CACHE/run.$$.XXXXXX")

repo=$(cd "$(dirname "$SCRIPT_PATH")/../.." && pwd -P)
[[ $share = none ]] && share=""
[[ -n $share ]] && share=$(readlink -f "$share")
# NIC n's MAC: 52:54:0n:fb:XX:YY from the last two octets of the nth --ip
mac_of() {
    local n=$1 o3=0 o4
    o4=$((n + 1))
    [[ -n ${ips[n]:-} ]] && IFS=./ read -r _ _ o3 o4 _ <<<"${ips[n]}"
    printf '52:54:%02x:fb:%02x:%02x' "$n" "$o3" "$o4"
}
[[ -z $mac ]] && mac=$(mac_of 0)
{
    printf 'VM_MODE=%q\nVM_SHARE=%q\nVM_SHARE_CACHE=mmap\n' "$mode" "$share"
    printf 'VM_REPO=%q\n' "$repo"
    printf 'VM_IP=%q\nVM_HOSTNAME=%q\nVM_MODULES=%q\n' "${ips[*]}" "$vmhost" "ublk_drv $modules"
    printf 'VM_VERBOSE=%q\nVM_TERM=%q\n' "$verbose" "${TERM:-linux}"
} > "$ctl/env"
{   # the guest runs: chroot /host bash /run/vmctl/cmd.sh (same cwd as here)
    printf 'cd %q || exit 126\n' "$PWD"
    if [[ $mode = run ]]; then printf 'exec'; printf ' %q' "$@"; echo
    else echo 'exec /bin/bash -i'; fi
} > "$ctl/cmd.sh"

# ---------------------------------------------------------------------------------
# 3. accelerator.  A PVM host (kvm_pvm module) only runs PVM-enabled guest kernels:
#    an unmodified kernel dies with "KVM internal error ... emulation failure" in the
#    decompressor (and -cpu host trips an assert on MSR 0x10a), so auto => tcg there.
# ---------------------------------------------------------------------------------
if [[ $accel = auto ]]; then
    accel=tcg
    if [[ -r /dev/kvm && -w /dev/kvm && ! -d /sys/module/kvm_pvm ]] &&
       [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then accel=kvm; fi
fi
if [[ $accel = kvm ]]; then accel_args=(-accel kvm -cpu host)
else accel_args=(-accel tcg,thread=multi -cpu max); fi

# ---------------------------------------------------------------------------------
# 4. QEMU
# ---------------------------------------------------------------------------------
append="console=ttyS0,115200 rdinit=/init panic=-1 mitigations=off 8250.nr_uarts=1"
append+=" random.trust_cpu=on audit=0 nowatchdog"
[[ $verbose = 1 ]] || append+=" quiet loglevel=1"
args=(
    -nodefaults -no-user-config -display none -no-reboot
    "${accel_args[@]}" -m "$mem" -smp "$smp"
    -kernel "$KERNEL" -initrd "$initrd" -append "$append"
    # host root, read-only.  multidevs=remap: host / spans several filesystems.
    -fsdev local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap
    -device virtio-9p-pci,fsdev=fsroot,mount_tag=hostroot
    -fsdev local,id=fsctl,path="$ctl",security_model=none
    -device virtio-9p-pci,fsdev=fsctl,mount_tag=vmctl
    -device virtio-rng-pci
)
args+=(-fsdev local,id=fsrepo,path="$repo",security_model=none,readonly=on,multidevs=remap
       -device virtio-9p-pci,fsdev=fsrepo,mount_tag=repo)
if [[ -n $share ]]; then
    args+=(-fsdev local,id=fsshare,path="$share",security_model=none,multidevs=remap
           -device virtio-9p-pci,fsdev=fsshare,mount_tag=share)
fi
if [[ -n $net_local ]]; then
    rm -f "$net_local"
    args+=(-netdev "dgram,id=n0,local.type=unix,local.path=$net_local,remote.type=unix,remote.path=$net_remote"
           -device "virtio-net-pci,netdev=n0,mac=$mac")
fi
for i in "${!net_taps[@]}"; do
    m=$mac; [[ $i -gt 0 ]] && m=$(mac_of "$i")
    args+=(-netdev "tap,id=t$i,ifname=${net_taps[i]},script=no,downscript=no"
           -device "virtio-net-pci,netdev=t$i,mac=$m")
done
if [[ -n $console ]]; then args+=(-serial "file:$console")
elif [[ $mode = shell ]]; then args+=(-serial mon:stdio)
else args+=(-chardev stdio,id=con0,signal=on -serial chardev:con0); fi

# QEMU dies with us even on SIGKILL (no trap runs then): parent-death signal.
pdeath=()
setpriv --help 2>/dev/null | grep -q -- --pdeathsig && pdeath=(setpriv --pdeathsig KILL --)
start=$(date +%s.%N)
timed_out=0
set +e
if [[ $mode = shell ]]; then
    # The console needs the terminal; Ctrl-A X quits. No timeout unless asked for.
    # (an asynchronous command would otherwise get /dev/null as its stdin)
    exec 8<&0
    "${pdeath[@]}" "$QEMU" "${args[@]}" <&8 8<&- &
    qpid=$!
    exec 8<&-
else
    "${pdeath[@]}" "$QEMU" "${args[@]}" </dev/null &
    qpid=$!
fi
if [[ $timeout != 0 ]]; then
    sleep "$timeout" &
    spid=$!
    wait -n "$qpid" "$spid"
    if kill -0 "$qpid" 2>/dev/null && ! kill -0 "$spid" 2>/dev/null; then
        timed_out=1
        echo "run-vm.sh: timeout after ${timeout}s, stopping QEMU" >&2
        stop_qemu
    fi
    kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; spid=""
fi
qrc=124
if [[ -n $qpid ]]; then wait "$qpid"; qrc=$?; fi
qpid=""
set -e
end=$(date +%s.%N)
echo "run-vm.sh: accel=$accel wall=$(awk "BEGIN{printf \"%.1f\", $end - $start}")s qemu_rc=$qrc" >&2
if [[ $mode = run ]]; then
    if [[ $timed_out = 0 && -s $ctl/rc ]]; then exit "$(cat "$ctl/rc")"; fi
    echo "run-vm.sh: guest did not report an exit status (crash/timeout?)" >&2
    exit 125
fi
exit "$qrc"
