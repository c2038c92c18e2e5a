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
    in_flight: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl IngestPermits {
    pub fn new(permits: usize) -> IngestPermits {
        IngestPermits {
            permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            in_flight: Arc::default(),
        }
    }

    /// `agent_id`'s place as the one batch it has in flight; `None` while another holds it.
    pub fn agent_slot(&self, agent_id: &str) -> Option<AgentSlot> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        in_flight.insert(agent_id.to_string()).then(|| AgentSlot {
            in_flight: Arc::clone(&self.in_flight),
            agent_id: agent_id.to_string(),
        })
    }
}

/// An agent's one batch in flight; given back on drop.
pub struct AgentSlot {
    in_flight: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    agent_id: String,
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.agent_id);
    }
}
