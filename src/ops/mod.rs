//! Operator commands beside the service: `certs` (the webhook's own TLS) and `status` (what
//! the cluster records about every opted-in namespace).

pub mod certs;
pub mod status;
