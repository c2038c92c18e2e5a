//! Outpost agent: the daemon on each database host.
//!
//! Code map: [`config`] (validated configuration), [`identity`] (enrollment and the stored
//! credential), [`backoff`] (the sans-IO retry policy every reconnecting part shares: the
//! control channel, metrics delivery, terminal links), [`link`] (the control channel),
//! [`run`] (the daemon's top level), [`doctor`] (the setup checks of `outpost-agent doctor`).

pub mod backoff;
pub mod buffer;
pub mod config;
pub mod crashpoint;
pub mod doctor;
pub mod dsn;
pub mod identity;
pub mod layout;
pub mod link;
pub mod observe;
pub mod run;
pub mod run_as;
pub mod signal;
pub mod silence;
pub mod sqlite_file;
pub mod tasks;
pub mod terminal;

/// Version reported in hello and `describe`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
