//! Deterministic simulation of Outpost under faults (turmoil).
//!
//! A control plane and agents run as turmoil hosts over the `world` seam; a fault schedule
//! drawn from the seed partitions, holds (half-open) and bounces them; the invariants
//! (ARCHITECTURE.md, Simulation) are checked every simulated 100 ms; every event is hashed into a trace so the
//! same seed is proven to replay identically.

pub mod alerts;
pub mod harness;
pub mod link;
pub mod metrics;
pub mod processes;
pub mod rollouts;
pub mod run;
pub mod scenario;
pub mod ssh;
pub mod tasks;
pub mod terminal;
pub mod trace;
pub mod vfs;
