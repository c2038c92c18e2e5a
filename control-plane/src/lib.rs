//! Outpost control plane: the only public entry point of the appliance.
//!
//! Code map: [`config`] (validated configuration), [`server`] (start-up and serve loop),
//! [`http`] (routes, access levels, handlers), [`channel`] (agent control channels),
//! [`storage`] (SQLite and Postgres behind one interface), [`auth`] (roles and secrets),
//! [`exec`] (`outpost exec`: fleet commands over supervised SSH), [`audit`] (who did what),
//! [`observe`] (`/metrics`), [`terminal`] (browser psql sessions), [`demo`] (`outpost demo`).

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod backup_policies;
pub mod backups;
pub mod channel;
pub mod config;
pub mod demo;
pub mod edge;
pub mod exec;
#[doc(hidden)]
pub mod fuzz;
pub mod handles;
pub mod health;
pub mod heartbeats;
pub mod http;
pub mod labels;
pub mod observe;
pub mod rollouts;
pub mod server;
pub mod settings;
pub mod state;
pub mod storage;
pub mod terminal;
pub mod throttle;
pub mod time;
