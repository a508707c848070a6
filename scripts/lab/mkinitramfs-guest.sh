#!/usr/bin/env bash
# scripts/lab/mkinitramfs-guest.sh OUT [KVER] — a busybox initramfs for the lab's libvirt guests.
#
# The guest (Debian's kernel KVER, default 6.12.107+deb12-amd64, booted directly by QEMU):
#   - loads the kernel modules it needs (default: virtio_blk virtio_net; override with
#     GUEST_MODULES="…"), dependencies resolved through KVER's modules.dep, modules built into
#     the kernel (modules.builtin) skipped, .ko.xz/.ko.zst/.ko.gz decompressed at build time;
#   - for every virtio disk /dev/vdX prints
#       GUEST-DISK /dev/vdX size=<bytes> head=<first 32 bytes, printable> hex=<first 16 bytes>
#     and, with `eac.diskwrite=TOKEN` on the kernel command line, writes "GUEST-WROTE TOKEN\n"
#     at byte offset 512 of the disk, syncs, and prints `GUEST-WROTE /dev/vdX TOKEN`;
#   - with `eac.ip=ADDR/LEN` (and optionally `eac.gw=ADDR`) configures eth0;
#   - prints `GUEST-READY uptime=…` on the console (ttyS0), then `GUEST-ALIVE uptime=…` every
#     `eac.alive=SECONDS` (default 2) forever.
#
# The output is written atomically (temporary file + rename), so a concurrent reader never sees
# a half-written archive. The caller caches it (tests/src/libvirt.rs keys the cache on this
# script's content and KVER).
set -euo pipefail

die() { echo "mkinitramfs-guest.sh: $*" >&2; exit 1; }
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 OUT [KVER]"
OUT=$1
KVER=${2:-6.12.107+deb12-amd64}
MODDIR=/lib/modules/$KVER
MODULES=${GUEST_MODULES:-virtio_blk virtio_net}
BUSYBOX=${BUSYBOX:-/bin/busybox}

[ -f "$MODDIR/modules.dep" ] || die "no $MODDIR/modules.dep: kernel $KVER is not installed (run scripts/setup.sh)"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
! command -v file >/dev/null || ! file -b "$BUSYBOX" | grep -q 'dynamically linked' \
  || die "$BUSYBOX is dynamically linked; the initramfs needs busybox-static"
for t in cpio gzip xz; do command -v $t >/dev/null || die "$t not installed"; done

R=$(mktemp -d "${TMPDIR:-/tmp}/eac-initramfs.XXXXXX")
tmp=
trap 'rm -rf "$R" ${tmp:+"$tmp"}' EXIT
mkdir -p "$R"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"

# --- modules: resolve dependencies (depth first, dependencies before dependents) -------------
declare -A seen=()
order=()
module_path() { # name -> relative path from modules.dep ('-' and '_' are equivalent)
  local n=${1//-/_}
  awk -F: -v n="$n" '{ f = $1; b = f; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b);
                       gsub(/-/, "_", b); if (b == n) { print f; exit } }' "$MODDIR/modules.dep"
}
is_builtin() {
  local n=${1//-/_}
  sed -e 's#.*/##' -e 's/\.ko$//' -e 's/-/_/g' "$MODDIR/modules.builtin" | grep -qx "$n"
}
add_module() { # relative path
  local rel=$1 dep
  [ -z "${seen[$rel]:-}" ] || return 0
  seen[$rel]=1
  for dep in $(awk -F: -v f="$rel" '$1 == f { print $2; exit }' "$MODDIR/modules.dep"); do
    add_module "$dep"
  done
  order+=("$rel")
}
for m in $MODULES; do
  rel=$(module_path "$m")
  if [ -n "$rel" ]; then add_module "$rel"
  elif is_builtin "$m"; then echo "mkinitramfs-guest.sh: $m is built into $KVER" >&2
  else die "module $m not found in $MODDIR/modules.dep nor modules.builtin"
  fi
done
: > "$R/lib/modules/load-order"
for rel in "${order[@]}"; do
  base=$(basename "$rel"); base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
  case "$rel" in
    *.xz)  xz -dc "$MODDIR/$rel" > "$R/lib/modules/$base" ;;
    *.zst) zstd -qdc "$MODDIR/$rel" > "$R/lib/modules/$base" ;;
    *.gz)  gzip -dc "$MODDIR/$rel" > "$R/lib/modules/$base" ;;
    *)     cp "$MODDIR/$rel" "$R/lib/modules/$base" ;;
  esac
  echo "$base" >> "$R/lib/modules/load-order"
done

# --- /init ----------------------------------------------------------------------------------
cat > "$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
arg() { for a in $(cat /proc/cmdline); do case "$a" in "$1"=*) echo "${a#*=}"; return;; esac; done; }
echo "GUEST-INIT uptime=$(up) kernel=$(uname -r)"
while read -r m; do
  insmod "/lib/modules/$m" || echo "GUEST-WARN insmod $m failed"
done < /lib/modules/load-order
# virtio probing is asynchronous: give disks a moment to appear (no sleep if none expected)
if grep -q virtio_blk /lib/modules/load-order && ls /sys/bus/virtio/devices/*/ >/dev/null 2>&1; then
  for i in 1 2 3 4 5 6 7 8 9 10; do
    n=0; for d in /sys/bus/virtio/devices/*; do
      [ "$(cat $d/device)" = 0x0002 ] && n=$((n+1)); done
    b=$(ls -d /sys/block/vd? 2>/dev/null | wc -l)
    [ "$b" -ge "$n" ] && break; sleep 0.1
  done
fi
token=$(arg eac.diskwrite)
for d in /dev/vd?; do
  [ -b "$d" ] || continue
  size=$(( $(cat /sys/block/${d#/dev/}/size) * 512 ))
  head=$(dd if=$d bs=32 count=1 2>/dev/null | tr -c ' -~' '.')
  hex=$(dd if=$d bs=16 count=1 2>/dev/null | hexdump -v -e '16/1 "%02x"')
  echo "GUEST-DISK $d size=$size head=$head hex=$hex"
  if [ -n "$token" ]; then
    printf 'GUEST-WROTE %s\n' "$token" | dd of=$d bs=512 seek=1 conv=sync,notrunc 2>/dev/null && sync \
      && echo "GUEST-WROTE $d $token" || echo "GUEST-WARN write to $d failed"
  fi
done
ip link set lo up 2>/dev/null
addr=$(arg eac.ip)
if [ -n "$addr" ] && [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add "$addr" dev eth0
  gw=$(arg eac.gw); [ -z "$gw" ] || ip route add default via "$gw"
  echo "GUEST-NET eth0 $addr mac=$(cat /sys/class/net/eth0/address)"
fi
echo "GUEST-READY uptime=$(up)"
every=$(arg eac.alive); every=${every:-2}
while true; do sleep "$every"; echo "GUEST-ALIVE uptime=$(up)"; done
INIT
chmod +x "$R/init"

tmp=$(mktemp "$(dirname "$OUT")/.$(basename "$OUT").XXXXXX")
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$OUT"; tmp=
echo "mkinitramfs-guest.sh: built $OUT ($(stat -c %s "$OUT") bytes; kernel $KVER; modules: $(echo $(cat "$R/lib/modules/load-order")))" >&2
