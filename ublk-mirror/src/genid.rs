//! Generation identifiers: which data history a copy of the disk belongs to.
//!
//! (Minimal: only the types the replication protocol carries. The resync decision table and
//! the transitions live here too; see the mirror plan.)

use serde::{Deserialize, Serialize};

/// A copy's generation identifiers (0 = none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GenIds {
    /// The generation of the data on this copy now.
    pub current: u64,
    /// The generation at which the dirty bitmap started recording (0 = not recording).
    pub bitmap: u64,
    /// Earlier generations, newest first.
    pub history: [u64; 2],
}

/// DRBD's UUID_JUST_CREATED idea: a copy that was never synced.
pub const GEN_JUST_CREATED: u64 = 4;

/// Which side of the mirror a host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Serves the device to the guest and replicates writes to the partner.
    Primary,
    /// Applies the primary's writes to its own backing store.
    Secondary,
}
