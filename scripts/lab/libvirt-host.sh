#!/usr/bin/env bash
# scripts/lab/libvirt-host.sh — one lab "host"'s libvirt: a real privileged libvirtd + virtlogd
# (+ virtlockd) with all state under LAB_DIR/hosts/HOST.
#
#   libvirt-host.sh up   LAB_DIR HOST [NETNS|-] [lock]   prints the URI on stdout
#   libvirt-host.sh down LAB_DIR HOST                    destroys guests, stops every process
#   libvirt-host.sh pids LAB_DIR HOST                    lists the pids belonging to HOST
#
# How it isolates a host (see /work/shared/notes/libvirt-lab.md):
# - a private mount namespace (unshare --mount) in which per-host directories are BIND-mounted
#   over /etc/libvirt, /var and /run. Bind mounts, not overlayfs: a restarted libvirtd must see
#   the same inodes (QMP sockets) to re-attach to running guests. Inside the namespace every
#   libvirt path is the stock one, so the unix socket paths QEMU and virtlogd use stay short.
# - when NETNS is given, everything runs inside `ip netns exec NETNS`, so the tap devices of
#   the guests are created in the lab host's network namespace and can join its bridges.
# - with `lock`, the lockd plugin + virtlockd and a lease directory shared by all hosts of the
#   lab (LAB_DIR/shared-locks): the same disk cannot run on two hosts at once.
#
# `up` on a host whose libvirtd is still alive only prints the URI. `up` after the daemon was
# killed starts a new one, which re-attaches to the guests still running (fault tests).
#
# A process belongs to HOST when its /run is the bind mount of LAB_DIR/hosts/HOST/run (same
# device and inode through /proc/PID/root/run) — that covers libvirtd, virtlogd,
# virtlockd, every QEMU and anything else started in the host's namespace, even after the
# daemon that started it died — or when its command line names LAB_DIR/hosts/HOST.
set -euo pipefail

die() { echo "libvirt-host.sh: $*" >&2; exit 1; }
usage() { die "usage: $0 up LAB_DIR HOST [NETNS|-] [lock] | down LAB_DIR HOST | pids LAB_DIR HOST"; }

[ $# -ge 3 ] || usage
CMD=$1 LAB_DIR=$2 HOST=$3
case "$HOST" in ''|*/*|*' '*) die "bad host name '$HOST'";; esac
[ "${LAB_DIR#/}" != "$LAB_DIR" ] || die "LAB_DIR must be an absolute path, got '$LAB_DIR'"
LAB_DIR=${LAB_DIR%/}
B=$LAB_DIR/hosts/$HOST
SOCK=$B/sock/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"

# --- which processes belong to this host --------------------------------------------------
host_pids() {
  [ -d "$B/run" ] || return 0
  local p pid args stat
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" != $$ ] || continue
    # /proc/PID/root/run resolves /run inside the process's own mount namespace; -ef compares
    # device and inode (shell builtins only: this runs in a polling loop)
    if ! [ "$p/root/run" -ef "$B/run" ] 2>/dev/null; then
      args=; mapfile -d '' args 2>/dev/null < "$p/cmdline" || continue
      [[ " ${args[*]} " == *"$B/"* ]] || continue
    fi
    # zombies (no reaper on this machine) have exited already
    read -r stat 2>/dev/null < "$p/stat" || continue
    stat=${stat##*) }
    [ "${stat%% *}" = Z ] || echo "$pid"
  done
  return 0
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null)" != Z ]; }

# --- up ---------------------------------------------------------------------------------------
up() {
  local netns=${1:--} lock=${2:-}
  [ "$netns" = "-" ] && netns=
  [ -z "$lock" ] || [ "$lock" = lock ] || usage
  [ "$(id -u)" -eq 0 ] || die "must run as root (privileged libvirtd)"
  getent passwd libvirt-qemu >/dev/null \
    || die "account libvirt-qemu missing: libvirtd's QEMU driver refuses to start without it (run scripts/setup.sh)"
  for b in /usr/sbin/libvirtd /usr/sbin/virtlogd /usr/sbin/virtlockd; do
    [ -x $b ] || die "$b not installed (run scripts/setup.sh)"
  done
  # sun_path is 108 bytes including the NUL; libvirtd also creates libvirt-admin-sock there.
  case "$LAB_DIR/" in /var/*|/run/*|/etc/libvirt/*)
    die "LAB_DIR must not be under /var, /run or /etc/libvirt: those are replaced inside the host's namespace";; esac
  [ ${#B} -le 80 ] || die "host dir '$B' is ${#B} bytes; its unix socket paths would exceed 108 bytes (use a shorter LAB_DIR)"
  if [ -n "$netns" ]; then
    [ -e "/run/netns/$netns" ] || die "network namespace '$netns' does not exist (ip netns add $netns)"
  fi

  if alive "$(cat "$B/libvirtd.pid" 2>/dev/null)" && [ -S "$SOCK" ]; then
    echo "$URI"; return 0
  fi

  mkdir -p "$B"/{sock,logs,run,etc-libvirt/qemu,var/lib/libvirt/qemu,var/log/libvirt/qemu,var/cache/libvirt/qemu,var/tmp}
  [ -e "$B/var/run" ] || ln -s /run "$B/var/run"
  [ -e "$B/var/lock" ] || ln -s /run/lock "$B/var/lock"

  # host_uuid: stable per LAB_DIR/HOST, never all-identical digits (libvirt rejects those)
  local h uuid
  h=$(printf '%s' "$B" | md5sum | cut -c1-32)
  uuid="${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"

  cat > "$B/libvirtd.conf" <<CONF
unix_sock_dir = "$B/sock"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "$uuid"
log_filters = "1:locking 1:lockd 3:remote 4:event 4:json 4:object 4:util 4:rpc 3:qemu 3:conf"
log_outputs = "3:file:$B/logs/libvirtd.log"
CONF
  cat > "$B/virtlogd.conf" <<CONF
log_outputs = "3:file:$B/logs/virtlogd.log"
CONF
  cat > "$B/virtlockd.conf" <<CONF
log_outputs = "3:file:$B/logs/virtlockd.log"
CONF
  cat > "$B/etc-libvirt/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "logd"
CONF
  rm -f "$B/etc-libvirt/qemu-lockd.conf"
  if [ "$lock" = lock ]; then
    mkdir -p "$LAB_DIR/shared-locks"
    echo 'lock_manager = "lockd"' >> "$B/etc-libvirt/qemu.conf"
    cat > "$B/etc-libvirt/qemu-lockd.conf" <<CONF
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "$LAB_DIR/shared-locks"
CONF
  fi

  # Runs inside the new mount namespace (and the lab host's network namespace).
  cat > "$B/inner.sh" <<INNER
#!/bin/bash
set -e
mount --make-rprivate /
mount --bind '$B/etc-libvirt' /etc/libvirt
mount --bind '$B/var' /var
mount --bind '$B/run' /run
running() { kill -0 "\$(cat "\$1" 2>/dev/null)" 2>/dev/null; }
running /run/virtlogd.pid || /usr/sbin/virtlogd --daemon --config '$B/virtlogd.conf' --pid-file /run/virtlogd.pid
if [ -f /etc/libvirt/qemu-lockd.conf ] && ! running /run/virtlockd.pid; then
  /usr/sbin/virtlockd --daemon --config '$B/virtlockd.conf' --pid-file /run/virtlockd.pid
fi
exec /usr/sbin/libvirtd --config '$B/libvirtd.conf' --pid-file '$B/libvirtd.pid'
INNER
  chmod +x "$B/inner.sh"
  rm -f "$SOCK" "$B/libvirtd.pid"

  local -a wrap=()
  [ -z "$netns" ] || wrap=(ip netns exec "$netns")
  echo "=== $(date -Is) up netns=${netns:-none} lock=${lock:-no}" >> "$B/logs/stdout.log"
  setsid "${wrap[@]}" unshare --mount --propagation private "$B/inner.sh" \
    >> "$B/logs/stdout.log" 2>&1 < /dev/null &
  local launcher=$!
  echo "$netns" > "$B/netns"

  # wait for the socket (about 0.2 s; allow for a loaded machine)
  local i
  for i in $(seq 1 300); do
    [ -S "$SOCK" ] && break
    if ! alive "$launcher" && ! alive "$(cat "$B/libvirtd.pid" 2>/dev/null)"; then
      echo "libvirt-host.sh: libvirtd of $HOST exited during start-up; last output:" >&2
      tail -n 20 "$B/logs/stdout.log" "$B/logs/libvirtd.log" >&2 2>/dev/null || true
      down_host >/dev/null 2>&1 || true
      exit 1
    fi
    sleep 0.05
  done
  if [ ! -S "$SOCK" ]; then
    echo "libvirt-host.sh: libvirtd of $HOST did not create $SOCK within 15 s" >&2
    tail -n 20 "$B/logs/stdout.log" "$B/logs/libvirtd.log" >&2 2>/dev/null || true
    down_host >/dev/null 2>&1 || true
    exit 1
  fi
  echo "$URI"
}

# --- down -------------------------------------------------------------------------------------
down_host() {
  [ -d "$B" ] || return 0
  # 1. destroy the running guests through libvirt, so QEMU is stopped the way libvirt expects
  if alive "$(cat "$B/libvirtd.pid" 2>/dev/null)" && [ -S "$SOCK" ]; then
    local d
    for d in $(timeout 20 virsh -q -c "$URI" list --name 2>/dev/null || true); do
      timeout 30 virsh -q -c "$URI" destroy "$d" >/dev/null 2>&1 \
        || echo "libvirt-host.sh: virsh destroy $d on $HOST failed; killing its QEMU" >&2
    done
  fi
  # 2. stop every remaining process of the host: TERM, wait up to 10 s, then KILL
  local pids left i
  pids=$(host_pids)
  [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
  for i in $(seq 1 200); do
    left=$(host_pids); [ -z "$left" ] && break; sleep 0.05
  done
  if [ -n "$left" ]; then
    echo "libvirt-host.sh: $HOST: SIGKILL to $(echo $left)" >&2
    kill -KILL $left 2>/dev/null || true
    for i in $(seq 1 200); do
      left=$(host_pids); [ -z "$left" ] && break; sleep 0.05
    done
  fi
  rm -f "$SOCK" "$B/sock/libvirt-sock-ro" "$B/sock/libvirt-admin-sock" "$B/libvirtd.pid"
  if [ -n "$left" ]; then
    echo "libvirt-host.sh: $HOST: processes still alive after SIGKILL: $(echo $left)" >&2
    return 1
  fi
}

case "$CMD" in
  up)   [ $# -le 5 ] || usage; up "${4:--}" "${5:-}" ;;
  down) [ $# -eq 3 ] || usage; down_host ;;
  pids) [ $# -eq 3 ] || usage; host_pids ;;
  *)    usage ;;
esac
