//! The offline metrics buffer: a SQLite WAL queue on the agent. Collection appends, delivery
//! reads the oldest rows and deletes them only after the control plane acknowledged a durable
//! write. Bounded by size and by record age; every drop is counted by reason. A file that fails
//! its integrity check is quarantined and a fresh buffer with a new epoch takes its place, so
//! corruption never blocks start-up. `seq` never repeats within an epoch.
//!
//! [`store`] is the file, [`SharedBuffer`] the one way into it, [`policy`] the sans-IO rules
//! of delivery, [`delivery`] and [`collector`] the drivers.

pub mod backups;
pub mod cli;
pub mod collector;
pub mod delivery;
pub mod policy;
pub mod store;

pub use store::{Buffer, BufferError, Limits, OpenReport, Record, Stats};

use std::sync::{Arc, Mutex};

use world::World;

/// The buffer shared by its one writer's parts (collector, delivery, heartbeat figures, the
/// metrics listener): the only way into it. Every call runs on a blocking thread, under the
/// lock, so SQLite work never stalls the async runtime.
#[derive(Clone)]
pub struct SharedBuffer(Arc<Mutex<Buffer>>);

impl std::fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBuffer")
    }
}

impl SharedBuffer {
    pub fn new(buffer: Buffer) -> SharedBuffer {
        SharedBuffer(Arc::new(Mutex::new(buffer)))
    }

    /// Run `f` on the buffer.
    pub async fn with<T: Send + 'static>(
        &self,
        world: &World,
        f: impl FnOnce(&mut Buffer) -> Result<T, BufferError> + Send + 'static,
    ) -> Result<T, BufferError> {
        let buffer = Arc::clone(&self.0);
        world
            .blocking(move || {
                let mut b = buffer.lock().map_err(|_| BufferError::Poisoned)?;
                f(&mut b)
            })
            .await
            .map_err(|e| BufferError::Blocking(e.to_string()))?
    }

    /// The figures every heartbeat carries.
    pub async fn wire_stats(&self, world: &World) -> Option<proto::BufferStats> {
        let now_ms = world.now_unix_ms();
        let stats = self.with(world, move |b| b.stats(now_ms)).await.ok()?;
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
