//! The pull Secret: its [`layout`] (what is written and how it is read back), `renewal`
//! timing, the pure `write` plan (the next version's credentials), the `pacer` that spaces
//! out mints, `capacity` (whether that pace keeps up with the renewals needed), and the
//! [`provisioner`] that mints through `sources`, caches, single-flights and writes it.

pub(crate) mod capacity;
pub(crate) mod error;
pub(crate) mod failures;
pub mod layout;
pub(crate) mod pacer;
pub mod provisioner;
pub(crate) mod renewal;
pub(crate) mod write;
