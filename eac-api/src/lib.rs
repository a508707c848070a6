//! The small API crate of the stack: the wire types and the clients of the daemons' control
//! interfaces, so that `eac` and the daemons talk through it rather than through each
//! other's internals (`eac` depends on this crate alone, not on the controller and libvirt).
//!
//! - [`controller`]: the controller's JSON-lines API (unix socket and authenticated TCP).
//! - [`mirror`]: a ublk-mirror daemon's control socket.
pub mod controller;
pub mod mirror;
