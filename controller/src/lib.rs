//! The per-host controller daemon's logic.
#![forbid(unsafe_code)]

pub mod libvirt;
