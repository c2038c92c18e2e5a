//! Where terminal sessions live between the browser handler and the agent handler: session
//! records, the output stream (byte offsets, capped) and the input stream. Two backends behind
//! one interface, [`Streams`], with the same semantics and one test suite
//! (`tests/it/streams.rs`):
//!
//! * [`memory`]: in-process, the embedded default (one replica);
//! * [`redis`]: Redis Streams when `--redis-url` is given, so any replica may hold either side.
//!
//! Output entries are keyed by byte offset ([`OutEntry::id`]): a data chunk `offset..end` is
//! `(end, 0)`, a skipped range `from..to` is `(to, 0)`, the close is `(end, 1)`. Reading "after
//! offset N" takes the entries whose id is above `(N, 0)`; trimming to the cap drops entries
//! that end before `top - cap`; an entry at or below the top is a resend and is ignored.

pub mod memory;
pub mod model;
pub mod redis;
pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use world::World;

pub use self::memory::MemoryStreams;
pub use self::redis::RedisStreams;
pub use self::sign::SigningKey;

pub use self::model::{
    ENTRY_BYTES_MAX, INPUT_ENTRIES_MAX, InEvent, InputEntry, MetaPatch, OutEntry, READ_ENTRIES_MAX,
    Result, SessionMeta, SessionState, StreamsError,
};
use self::model::{check_size, out_payload_bytes};

/// The terminal stream store: a thin dispatch to the backend, nothing implemented here.
#[derive(Clone)]
pub enum Streams {
    Memory(Arc<MemoryStreams>),
    Redis(Arc<RedisStreams>),
}

impl Streams {
    /// The in-process store; `world` makes the key its sessions' link secrets derive from.
    pub fn memory(world: &World) -> Streams {
        Streams::Memory(Arc::new(MemoryStreams::new(world.random_bytes::<32>())))
    }

    /// The secret the agent must show when it dials session `id`'s link: derived from a key
    /// only the replicas hold (for Redis, the shared signing key), so every replica can check
    /// it and none has to store it. It never reaches psql's environment or argv.
    pub fn link_secret(&self, id: &str) -> String {
        hex::encode(self.link_signer().sign(&link_context(id), &[]))
    }

    /// Whether `shown` is session `id`'s link secret (compared in constant time).
    pub fn link_secret_matches(&self, id: &str, shown: &[u8]) -> bool {
        self.link_signer().verify_hex(&link_context(id), &[], shown)
    }

    fn link_signer(&self) -> &sign::Signer {
        match self {
            Streams::Memory(m) => m.link_signer(),
            Streams::Redis(r) => r.signer(),
        }
    }

    /// A Redis store at `url` (`redis://` or `rediss://`); connects on first use.
    pub fn redis(world: World, url: &str) -> Result<Streams> {
        Ok(Streams::Redis(Arc::new(RedisStreams::new(world, url)?)))
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Streams::Memory(_) => "memory",
            Streams::Redis(_) => "redis",
        }
    }

    /// The Redis store, which replicas share (open requests are relayed through it); `None`
    /// for the in-process store, which only this replica sees.
    pub fn shared(&self) -> Option<&Arc<RedisStreams>> {
        match self {
            Streams::Memory(_) => None,
            Streams::Redis(r) => Some(r),
        }
    }

    /// Record a new session unless `live_max` sessions are live already.
    pub async fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        match self {
            Streams::Memory(m) => m.create(id, meta, live_max),
            Streams::Redis(r) => r.create(id, meta, live_max).await,
        }
    }

    pub async fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        match self {
            Streams::Memory(m) => m.meta(id),
            Streams::Redis(r) => r.meta(id).await,
        }
    }

    /// Write the fields `patch` names into a session's record, unless the session is closed
    /// or unknown. `changed_ms` becomes `now_ms` when the state changes.
    pub async fn update(&self, id: &str, now_ms: i64, patch: MetaPatch) -> Result<()> {
        match self {
            Streams::Memory(m) => m.update(id, now_ms, patch),
            Streams::Redis(r) => r.update(id, now_ms, patch).await,
        }
    }

    /// The offset after the newest output entry (0 when there is none).
    pub async fn output_end(&self, id: &str) -> Result<u64> {
        match self {
            Streams::Memory(m) => m.output_end(id),
            Streams::Redis(r) => r.output_end(id).await,
        }
    }

    /// Append output entries (in order, one round trip) and trim the stream to about
    /// `bytes_max` bytes. Entries at or below the newest one are resends and are ignored.
    pub async fn append_output(&self, id: &str, batch: &[OutEntry], bytes_max: u64) -> Result<()> {
        for entry in batch {
            check_size(out_payload_bytes(entry))?;
        }
        match self {
            Streams::Memory(m) => m.append_output(id, batch, bytes_max),
            Streams::Redis(r) => r.append_output(id, batch, bytes_max).await,
        }
    }

    /// At most [`READ_ENTRIES_MAX`] output entries that end after `after`, waiting up to
    /// `block` for one to appear.
    pub async fn read_output(
        &self,
        id: &str,
        after: u64,
        block: Duration,
    ) -> Result<Vec<OutEntry>> {
        match self {
            Streams::Memory(m) => m.read_output(id, after, block).await,
            Streams::Redis(r) => r.read_output(id, after, block).await,
        }
    }

    pub async fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        check_size(event.payload_bytes())?;
        match self {
            Streams::Memory(m) => m.append_input(id, event),
            Streams::Redis(r) => r.append_input(id, event).await,
        }
    }

    /// At most [`READ_ENTRIES_MAX`] input entries after `cursor` (`""` = from the start),
    /// waiting up to `block`.
    pub async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<InputEntry>> {
        match self {
            Streams::Memory(m) => m.read_input(id, cursor, block).await,
            Streams::Redis(r) => r.read_input(id, cursor, block).await,
        }
    }

    /// Mark the session closed, free its slot and let its streams expire after `keep`.
    /// `true` when this call closed it (exactly one caller learns that, across replicas).
    pub async fn finish(
        &self,
        id: &str,
        now_ms: i64,
        reason: &str,
        keep: Duration,
    ) -> Result<bool> {
        match self {
            Streams::Memory(m) => m.finish(id, now_ms, reason, keep),
            Streams::Redis(r) => r.finish(id, now_ms, reason, keep).await,
        }
    }

    /// Whether the store answers now.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Streams::Memory(m) => m.ping(),
            Streams::Redis(r) => r.ping().await,
        }
    }

    /// Ids of sessions not closed, with their agent.
    pub async fn live(&self) -> Result<Vec<(String, String)>> {
        match self {
            Streams::Memory(m) => m.live(),
            Streams::Redis(r) => r.live().await,
        }
    }
}

/// What a session's link secret signs.
fn link_context(id: &str) -> String {
    format!("terminal-link:{id}")
}

#[cfg(test)]
mod tests;
