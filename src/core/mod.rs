//! Value types and pure rules: no `kube::Client`, no HTTP, no clock but the one passed in.
//! Everything here is decided from its arguments and tested beside its code.

pub mod accounts;
pub mod credential;
pub(crate) mod duration;
pub(crate) mod images;
pub(crate) mod jwt;
pub(crate) mod names;
pub mod namespaces;
pub mod patch;
pub(crate) mod pods;
pub(crate) mod remediation;
pub mod subject;
