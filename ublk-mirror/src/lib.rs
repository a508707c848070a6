//! ublk-mirror — one userspace block device per guest disk, mirrored synchronously to the
//! partner host.
