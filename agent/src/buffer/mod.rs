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

use std::sync::{Arc, Mutex};

/// The buffer shared by its one writer's parts (collector, delivery, heartbeat figures).
#[derive(Clone)]
pub struct SharedBuffer(pub Arc<Mutex<Buffer>>);

impl std::fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBuffer")
    }
}

impl SharedBuffer {
    /// The figures every heartbeat carries.
    pub async fn wire_stats(&self, world: &world::World) -> Option<proto::BufferStats> {
        let (buffer, now_ms) = (self.0.clone(), world.now_unix_ms());
        let stats = world
            .blocking(move || buffer.lock().ok().and_then(|b| b.stats(now_ms).ok()))
            .await
            .ok()
            .flatten()?;
        Some(proto::BufferStats {
            epoch: stats.epoch,
            rows: stats.rows,
            size_bytes: stats.size_bytes,
            oldest_record_age_s: stats.oldest_record_age_s,
            utilization: stats.utilization,
            delivery_failures: stats.delivery_failures,
            dropped_total: stats.dropped_total,
        })
    }
}
