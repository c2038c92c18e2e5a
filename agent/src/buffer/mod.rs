//! The offline metrics buffer: a SQLite WAL queue on the agent. Collection appends, delivery
//! reads the oldest rows and deletes them only after the control plane acknowledged a durable
//! write. Bounded by size and by record age; every drop is counted by reason. A file that fails
//! its integrity check is quarantined and a fresh buffer with a new epoch takes its place, so
//! corruption never blocks start-up. `seq` never repeats within an epoch.

pub mod cli;
pub mod collector;
pub mod delivery;
pub mod store;

pub use store::{Buffer, Limits, OpenReport, Record, Stats};
