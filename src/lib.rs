//! pull-secret-injector: a mutating admission webhook and a background refresher that keep one
//! short-lived registry pull Secret in every opted-in namespace and attach it to Pods and
//! ServiceAccounts.
//!
//! The folders are the two paths. Follow a request through [`admission`]: the HTTP server, the
//! wire format, the pure `decide`, and the thin shell around it (namespace lookup, budget,
//! failure hold). Follow a credential: [`sources`] mint it, [`secret`] caches it, writes it into
//! the Secret and knows when to renew, and `refresh` keeps every Secret renewed in the
//! leading replica. Both paths rest on [`core`] (value types and rules, no client, no HTTP).
//! [`settings`] is built once from [`config`] and the environment and handed to all of them;
//! [`service`] assembles them. `compat`, [`ops`], [`token_server`] and
//! [`credential_provider`] (the kubelet plugin, minting with the same sources) are the other
//! entry points.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api_client;
pub mod cluster;
pub(crate) mod coarse_timer;
pub(crate) mod compat;
pub mod config;
pub(crate) mod connections;
pub mod core;
pub mod credential_provider;
#[doc(hidden)]
pub mod footprint;
pub mod http;
pub mod metrics;
pub mod ops;
pub(crate) mod refresh;
pub mod secret;
pub mod service;
pub mod settings;
pub(crate) mod slim;
pub mod sources;
pub mod tls;
pub mod token_server;

pub use service::Service;
