//! Compatibility with other tools' conventions: chainguard's pull-secret-updater ([`updater`]).

pub(crate) mod updater;
