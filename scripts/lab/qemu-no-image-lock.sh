#!/bin/bash
# scripts/lab/qemu-no-image-lock.sh — a QEMU that does not take its own image locks, for lab
# guests (`<emulator>` of a GuestSpec built with `without_qemu_image_locking()`).
#
# QEMU locks every image it opens (OFD locks, `file.locking=auto`), and libvirt launches QEMU
# paused and acquires the lock manager's leases only when it resumes the vCPUs: where QEMU's
# lock works it refuses a second start before the lock manager is even asked. On storage where
# it does not (some NFS set-ups), only the lease stands in the way. The lab proves the lease by
# turning QEMU's lock off: libvirt 9.0 always uses -blockdev and offers no XML for
# `locking` (<qemu:override> covers device properties only; -set does not reach -blockdev),
# so this wrapper adds "locking":"off" to every `file` blockdev and runs the real QEMU.
# Everything else — capability probes included — passes through unchanged.
args=()
for a in "$@"; do
  case $a in
    '{"driver":"file",'*) a='{"driver":"file","locking":"off",'"${a#'{"driver":"file",'}" ;;
  esac
  args+=("$a")
done
exec /usr/bin/qemu-system-x86_64 "${args[@]}"
