//! What the API returns: the views are `eac-api`'s types.
pub use eac_api::controller::view::*;
