//! The per-host controller daemon's logic.
#![forbid(unsafe_code)]

pub mod fence;
pub mod libvirt;
pub mod membership;
pub mod plan;
pub mod vmm;

#[cfg(test)]
mod scenario_tests;
