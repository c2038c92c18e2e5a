//! Heartbeats' storage writes, batched: a fleet's heartbeats become one write per flush
//! (one transaction on SQLite, one statement on Postgres) instead of one per heartbeat. A
//! heartbeat is acknowledged at once; its write's answer (does this connection still hold its
//! agent?) reaches the connection at the next flush, which is at most half a heartbeat
//! interval (and at most a second) away, well inside the dead deadline that decides "online".

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::storage::{SeenRow, Storage};

/// Heartbeats waiting for a flush; past this a heartbeat is written on its own.
const QUEUED_MAX: usize = 50_000;
/// Longest pause between flushes.
const FLUSH_MAX: Duration = Duration::from_secs(1);

/// Whether the connection still holds its agent (`Ok(false)`: another connection took over,
/// or the agent was removed), or the storage error.
pub type Held = Result<bool, String>;

struct Seen {
    row: SeenRow,
    reply: oneshot::Sender<Held>,
}

/// The replica's heartbeat writer: started on first use, it lives as long as the replica.
#[derive(Clone, Default)]
pub struct Heartbeats {
    tx: Arc<OnceLock<mpsc::Sender<Seen>>>,
}

impl Heartbeats {
    /// Queue a heartbeat's write; the answer comes at the next flush. `None` when the queue
    /// is full (the caller writes on its own).
    pub fn seen(
        &self,
        storage: &Storage,
        heartbeat_interval: Duration,
        row: SeenRow,
    ) -> Option<oneshot::Receiver<Held>> {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUED_MAX);
            let every = (heartbeat_interval / 2).min(FLUSH_MAX);
            tokio::spawn(write(storage.clone(), rx, every));
            tx
        });
        let (reply, answer) = oneshot::channel();
        tx.try_send(Seen { row, reply }).ok()?;
        Some(answer)
    }
}

/// Flush every `every`: the newest heartbeat of each connection heard since, in one write.
async fn write(storage: Storage, mut rx: mpsc::Receiver<Seen>, every: Duration) {
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        tokio::time::sleep(every).await;
        let mut batch = vec![first];
        while let Ok(seen) = rx.try_recv() {
            batch.push(seen);
        }
        // One row per connection (its newest figures); every heartbeat gets the answer.
        let mut rows: BTreeMap<(String, String), SeenRow> = BTreeMap::new();
        for seen in &batch {
            let key = (seen.row.agent_id.clone(), seen.row.connection_id.clone());
            rows.insert(key, seen.row.clone());
        }
        let keys: Vec<(String, String)> = rows.keys().cloned().collect();
        let answer = storage.agents_seen(rows.into_values().collect()).await;
        let held: BTreeMap<(String, String), Held> = match answer {
            Ok(held) => keys.into_iter().zip(held.into_iter().map(Ok)).collect(),
            Err(e) => {
                let e = e.to_string();
                keys.into_iter().map(|k| (k, Err(e.clone()))).collect()
            }
        };
        for seen in batch {
            let key = (seen.row.agent_id, seen.row.connection_id);
            let answer = held.get(&key).cloned().unwrap_or(Ok(false));
            let _ = seen.reply.send(answer);
        }
    }
}
