//! netpair — the network half of Level 2.
//!
//! Today: the loader for the project's eBPF programs ([`xdp`]). The pairing daemon (link
//! state over rtnetlink, observations exchanged over the availability links, the joint
//! path decision and steering) builds on it.

pub mod xdp;

pub use xdp::{CountProgram, Error};
