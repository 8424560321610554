//! The admission path: [`server`] (HTTPS, body limits and timeouts; `bytes`, the bodies held)
//! → [`webhook`] (the async shell: namespace facts, admission budget, failure hold) →
//! [`decide`] (pure: what to answer) → [`review`] (the AdmissionReview wire format) and
//! `core::patch`.

pub(crate) mod bytes;
pub mod decide;
pub mod review;
pub(crate) mod server;
pub mod webhook;
