//! The lab: reusable test infrastructure that makes every part of the stack testable on one
//! machine against the real kernel, a real libvirtd per host and a real ublk-capable kernel.
//!
//! - [`netns`]: network namespaces, entering one from a thread, running commands in one.
//! - [`topology`]: a two-host lab (management, app NIC on a switch, AL1/AL2, clients).
//! - [`faults`]: link down, silent loss with carrier up, killing a host's processes, failing disks.
//! - [`libvirt`]: a real libvirtd per lab host and small TCG guests.
//! - [`ublk_guest`]: the QEMU guest booting Debian's 6.12 kernel (ublk_drv).
//! - [`wait`]: `wait_until(timeout, condition)` instead of sleeps.

pub mod libvirt;
pub mod wait;
pub mod ublk_guest;
