#!/usr/bin/env bash
# scripts/setup.sh — install everything this project needs on a fresh Debian 12 machine
# (root, no systemd). Idempotent: every step checks before it acts, so a second run is a
# few seconds of checks. Called first by scripts/demo.sh and scripts/test.sh.
#
# Installs: system packages (LLVM 22 for bpf-linker, libvirt daemon/clients/dev, QEMU,
# Debian's 6.12 kernel image for the ublk guest, busybox-static, fio, iperf3, nftables,
# bpftool, ...), the nightly toolchain's rust-src (eBPF build-std), bpf-linker, cargo-fuzz
# (scripts/fuzz.sh), and the `libvirt-qemu` account libvirtd insists on when
# libvirt-daemon-system (systemd) is absent.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
CARGO_FUZZ_VERSION=0.13.2           # scripts/fuzz.sh (libFuzzer targets in fuzz/, nightly)
LLVM_MAJOR=22                       # must equal the LLVM major of the nightly rustc
GUEST_KVER=6.12.107+deb12-amd64     # Debian's 6.12: ublk_drv, drbd, nbd, bonding as modules
NIGHTLY=nightly                     # aya-build runs `rustup run nightly cargo build ...`

log() { printf '[setup] %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "[setup] must run as root (installs packages)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

pkgs=(
  "llvm-${LLVM_MAJOR}-dev"                       # libLLVM for bpf-linker
  iproute2 iputils-ping ethtool bpftool nftables iperf3 tcpdump  # network lab
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkgconf
  qemu-system-x86 qemu-utils qemu-block-extra
  "linux-image-${GUEST_KVER}-unsigned"           # guest kernel (ublk guest + libvirt guests)
  busybox-static cpio gzip xz-utils zstd kmod util-linux fio procps psmisc jq
  drbd-utils                                      # DRBD peer for the mirror benchmark
)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
# QEMU's packages must come from one source package at one version. This kind of machine
# ships a newer qemu-utils (a backport, in no configured repository) that Breaks Debian 12's
# qemu-system-common: a plain install of qemu-system-x86 would silently *remove* it (and
# nothing could reinstall it). So whenever a QEMU package is missing or the three disagree,
# all three are installed pinned to one version (qemu-system-x86's candidate), downgrading
# the backport if there is one.
qemu_pkgs=(qemu-system-x86 qemu-utils qemu-block-extra)
qemu_ok=1
for p in "${qemu_pkgs[@]}"; do
  installed "$p" && [ "$(pkg_version "$p")" = "$(pkg_version qemu-system-x86)" ] || qemu_ok=0
done
if [ "${#missing[@]}" -gt 0 ] || [ $qemu_ok -eq 0 ]; then
  apt-get update -qq
  request=()
  for p in "${missing[@]}"; do
    case " ${qemu_pkgs[*]} " in *" $p "*) ;; *) request+=("$p") ;; esac
  done
  if [ $qemu_ok -eq 0 ]; then
    qemu_v=$(candidate qemu-system-x86)
    [ -n "$qemu_v" ] && [ "$qemu_v" != "(none)" ] \
      || { echo "[setup] no installable qemu-system-x86 in the apt sources" >&2; exit 1; }
    for p in "${qemu_pkgs[@]}"; do request+=("$p=${qemu_v}"); done
  fi
  log "apt-get install ${request[*]}"
  # iperf3's debconf question (start as a daemon?) must not block a non-interactive run.
  echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${request[@]}" >/dev/null
fi
# Checked after the install, not only before: apt may remove a package to satisfy another.
gone=()
for p in "${pkgs[@]}"; do installed "$p" || gone+=("$p"); done
if [ "${#gone[@]}" -gt 0 ]; then
  echo "[setup] still not installed after apt-get: ${gone[*]} (apt removed or skipped them)" >&2
  exit 1
fi

# libvirt's QEMU driver refuses to start without its compiled-in default account, which
# only libvirt-daemon-system (and with it systemd units) would create.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null \
  || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# bpffs for pinned maps (not mounted by default on this kind of machine).
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Rust: nightly + rust-src builds the eBPF crate (-Z build-std=core, bpfel-unknown-none).
if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
  rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src
fi
rustup component list --toolchain "${NIGHTLY}" --installed | grep -q '^rust-src' \
  || rustup component add rust-src --toolchain "${NIGHTLY}"
rustc_llvm=$(rustc +"${NIGHTLY}" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ "${rustc_llvm}" != "${LLVM_MAJOR}" ]; then
  echo "[setup] rustc +${NIGHTLY} uses LLVM ${rustc_llvm} but bpf-linker is built for LLVM ${LLVM_MAJOR}" >&2
  exit 1
fi

have_linker() {
  command -v bpf-linker >/dev/null 2>&1 \
    && bpf-linker --version 2>/dev/null | grep -q " ${BPF_LINKER_VERSION}$" \
    && ldd "$(command -v bpf-linker)" | grep -q "/usr/lib/llvm-${LLVM_MAJOR}/lib/libLLVM"
}
if ! have_linker; then
  log "cargo install bpf-linker ${BPF_LINKER_VERSION} (llvm-${LLVM_MAJOR}); about one minute"
  # A plain `cargo install bpf-linker` picks /usr/bin/llvm-config (LLVM 14) and fails to link.
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install bpf-linker \
    --version "${BPF_LINKER_VERSION}" --locked --force \
    --no-default-features --features "llvm-${LLVM_MAJOR}"
fi
have_cargo_fuzz() {
  command -v cargo-fuzz >/dev/null 2>&1 \
    && cargo-fuzz --version 2>/dev/null | grep -q " ${CARGO_FUZZ_VERSION}$"
}
if ! have_cargo_fuzz; then
  log "cargo install cargo-fuzz ${CARGO_FUZZ_VERSION} (scripts/fuzz.sh); about two minutes"
  cargo install cargo-fuzz --version "${CARGO_FUZZ_VERSION}" --locked --force
fi
# Every external program the tests, the lab and the scripts call, with the package that
# provides it: a missing one fails here, loudly, not as a confusing test failure later.
need=(
  "qemu-io qemu-utils" "qemu-img qemu-utils" "qemu-nbd qemu-utils"
  "qemu-system-x86_64 qemu-system-x86" "fio fio" "iperf3 iperf3" "bpftool bpftool"
  "nft nftables" "tc iproute2" "ip iproute2" "bridge iproute2" "ss iproute2"
  "ping iputils-ping" "ethtool ethtool" "tcpdump tcpdump"
  "virsh libvirt-clients" "libvirtd libvirt-daemon" "virtlockd libvirt-daemon"
  "virtlogd libvirt-daemon" "drbdadm drbd-utils" "busybox busybox-static" "cpio cpio"
  "xz xz-utils" "zstd zstd" "jq jq" "modprobe kmod" "insmod kmod" "nsenter util-linux"
  "unshare util-linux" "setsid util-linux" "flock util-linux" "blkdiscard util-linux"
  "blockdev util-linux" "mkfs.ext4 e2fsprogs" "cmp diffutils" "pgrep procps" "killall psmisc"
)
absent=()
for entry in "${need[@]}"; do
  set -- $entry
  command -v "$1" >/dev/null 2>&1 || absent+=("$1 (package $2)")
done
if [ "${#absent[@]}" -gt 0 ]; then
  for a in "${absent[@]}"; do echo "[setup] missing program: $a" >&2; done
  exit 1
fi
[ -e "/boot/vmlinuz-${GUEST_KVER}" ] \
  || { echo "[setup] missing /boot/vmlinuz-${GUEST_KVER} (package linux-image-${GUEST_KVER}-unsigned)" >&2; exit 1; }

log "ready: $(bpf-linker --version), $(cargo-fuzz --version), $(rustc +"${NIGHTLY}" --version), libvirtd $(libvirtd --version | awk '{print $NF}'), guest kernel ${GUEST_KVER}"
