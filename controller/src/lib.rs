//! The per-host controller daemon's logic.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod events;
pub mod fence;
pub mod heartbeat;
pub mod libvirt;
pub mod membership;
pub mod plan;
pub mod pool;
pub mod reconcile;
pub mod statefile;
pub mod statefile_watch;
pub mod view;
pub mod vmm;

#[cfg(test)]
mod scenario_tests;
#[cfg(test)]
mod test_util;
