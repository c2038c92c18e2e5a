//! The leaf handles most HTTP handlers need, extracted from the state as one substate
//! (`State<Handles>`); a handler that needs a feature as well takes that feature's handle
//! beside it (`State<Channels>`, `State<Terminal>`, …). A leaf: nothing here knows the state.

use std::sync::Arc;

use world::World;

use crate::audit::Audit;
use crate::observe::Observed;
use crate::settings::Settings;
use crate::storage::Storage;

#[derive(Clone)]
pub struct Handles {
    pub world: World,
    pub storage: Storage,
    pub settings: Arc<Settings>,
    pub observed: Arc<Observed>,
    pub audit: Audit,
}

/// Metrics batches stored at once; beyond it ingest answers 429 (load shedding). An agent has
/// at most one batch in flight (its delivery sends one at a time), so one credential cannot
/// hold every permit with bodies that never arrive.
#[derive(Clone)]
pub struct IngestPermits {
    pub permits: Arc<tokio::sync::Semaphore>,
    /// Batches in flight per agent id (one each).
    in_flight: Arc<world::KeyedSlots<String>>,
}

impl IngestPermits {
    pub fn new(permits: usize) -> IngestPermits {
        IngestPermits {
            permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            in_flight: Arc::default(),
        }
    }

    /// `agent_id`'s place as the one batch it has in flight; `None` while another holds it.
    pub fn agent_slot(&self, agent_id: &str) -> Option<world::Slot<String>> {
        self.in_flight.acquire(&agent_id.to_string(), 1)
    }
}
