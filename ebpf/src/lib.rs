// Exists so that `cargo check` of the host target has a library to look at.
#![no_std]
