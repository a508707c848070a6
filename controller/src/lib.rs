//! The per-host controller daemon's logic.
#![forbid(unsafe_code)]

pub mod libvirt;
pub mod pool;
pub mod view;
