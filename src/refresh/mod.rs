//! The background path: the [`refresher`] (a controller over Namespaces) that keeps every
//! opted-in namespace's Secret renewed and attached, the [`watched`] views it reads, and the
//! [`leadership`] that runs it in one replica at a time; [`slipped`] reports Pods admitted
//! without the Secret, [`capacity`] renewals that need more mints than the ceiling allows.

pub(crate) mod capacity;
pub(crate) mod inbox;
pub(crate) mod leadership;
pub(crate) mod refresher;
pub(crate) mod slipped;
pub(crate) mod watched;
