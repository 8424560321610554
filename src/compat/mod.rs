//! Compatibility with other tools' conventions: chainguard's pull-secret-updater ([`updater`]).

pub mod updater;
