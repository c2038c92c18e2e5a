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

/// Metrics batches stored at once; beyond it ingest answers 429 (load shedding).
#[derive(Clone)]
pub struct IngestPermits(pub Arc<tokio::sync::Semaphore>);
