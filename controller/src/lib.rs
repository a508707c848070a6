//! The per-host controller daemon's logic.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod events;
pub mod heartbeat;
pub mod libvirt;
pub mod statefile;
