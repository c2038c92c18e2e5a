//! Outpost agent: the daemon on each database host.
//!
//! Code map: [`config`] (validated configuration), [`identity`] (enrollment and the stored
//! credential), [`link`] (the control channel to the control plane: backoff core and driver),
//! [`run`] (the daemon's top level).

pub mod buffer;
pub mod config;
pub mod identity;
pub mod link;
pub mod observe;
pub mod run;
pub mod tasks;
pub mod terminal;

/// Version reported in hello and `describe`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
