//! The durable task runtime: a scheduler (durable state machine over SQLite) and a worker
//! pool (subprocess supervisor) that share no memory and talk through bounded queues.

pub mod api;
pub mod backup;
pub mod bridge;
pub mod cli;
pub mod command;
pub mod core;
pub use proto::cron;
pub mod drill;
pub mod driver;
pub mod dumpfile;
pub mod keeper;
pub mod keepers;
pub mod model;
pub mod os;
pub mod policy;
pub mod pool;
pub mod process;
pub mod rundir;
pub mod slot;
pub mod store;
