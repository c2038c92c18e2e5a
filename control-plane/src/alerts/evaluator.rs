//! The alert loop every replica runs. Each tick it takes (or renews) the `alerts` lease; only
//! the holder evaluates and sends, so one replica does at a time, and another takes over
//! within the lease's time to live after the holder dies.
//!
//! A round reads every agent's row, measures each rule, advances the stored alerts and writes
//! the changed alerts, their history and the notices' outbox rows (one per channel) in one
//! transaction that checks the lease's fence: a replica that lost the lease writes nothing.
//! Delivery then sends what the outbox holds, per channel in order (a failed send holds back
//! the channel's later ones until it is tried again, with back-off). A send marked delivered
//! only after the receiver answered 2xx: a holder dying between the two leaves the row for the
//! next holder, which sends it again with the same key (at most one duplicate per key).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::channels::{self, Channel};
use super::rules::{self, Facts, RULES, RuleOverride};
use super::silences::{self, Silence};
use super::state::{self, Alert, Grouping, Notice, Observation};
use crate::handles::Handles;
use crate::storage::{AlertCommit, AlertRow, NotificationRow, SendOutcome, StorageError};

/// The lease the evaluating replica holds.
pub const LEASE: &str = "alerts";
/// The spec kind rule overrides are stored under.
pub const OVERRIDE_KIND: &str = "alert_rule";
/// Outbox rows looked at per channel per tick.
const SEND_BATCH: i64 = 200;
/// Back-off of a failing channel: 1 s doubling up to this.
const RETRY_MAX_MS: i64 = 60_000;
/// History and delivered notifications are kept this long.
const HISTORY_MS: i64 = 30 * 86_400_000;

fn ms(d: Duration) -> i64 {
    crate::time::duration_ms(d)
}

/// This replica's name as a lease holder: host, process id and a random part (a restarted
/// process is another holder), so an operator can tell which replica evaluates.
pub fn replica_name(world: &world::World) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{host}/{}/{}",
        std::process::id(),
        hex::encode(world.random_bytes::<3>())
    )
}

/// Run until `shutdown`, as replica `holder`.
pub async fn run_forever(h: Handles, holder: String, shutdown: CancellationToken) {
    let timing = h.settings.alerts;
    let grouping = Grouping {
        group_wait_ms: ms(timing.group_wait),
        digest_over: timing.digest_over,
        repeat_ms: ms(timing.repeat),
        ..Grouping::default()
    };
    let mut last_evaluation: Option<i64> = None;
    let mut last_prune = 0;
    loop {
        if let Err(error) = tick(&h, &holder, grouping, &mut last_evaluation, &mut last_prune).await
        {
            tracing::warn!(%error, "alerts: round failed; tried again next tick");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(timing.tick) => {}
        }
    }
}

async fn tick(
    h: &Handles,
    holder: &str,
    grouping: Grouping,
    last_evaluation: &mut Option<i64>,
    last_prune: &mut i64,
) -> Result<(), StorageError> {
    let timing = h.settings.alerts;
    let now_ms = h.world.now_unix_ms();
    let ttl_ms = ms(timing.lease_ttl);
    let Some(fence) = h.storage.take_lease(LEASE, holder, now_ms, ttl_ms).await? else {
        *last_evaluation = None;
        return Ok(());
    };
    if last_evaluation.is_none_or(|t| now_ms - t >= ms(timing.evaluate_every)) {
        *last_evaluation = Some(now_ms);
        if evaluate_round(h, holder, fence, now_ms, grouping)
            .await?
            .is_none()
        {
            tracing::warn!(
                "alerts: the lease moved to another replica during the round; its result was not stored"
            );
            return Ok(());
        }
    }
    if now_ms - *last_prune >= 3_600_000 {
        *last_prune = now_ms;
        h.storage.prune_alerts(now_ms - HISTORY_MS).await?;
    }
    deliver(h, now_ms + ttl_ms).await
}

/// One evaluation round as lease holder `holder` with `fence`: measure, advance, commit.
/// The number of notifications queued, `None` when the lease had moved (nothing stored).
pub async fn evaluate_round(
    h: &Handles,
    holder: &str,
    fence: i64,
    now_ms: i64,
    grouping: Grouping,
) -> Result<Option<usize>, StorageError> {
    let commit = evaluate(h, holder, fence, now_ms, grouping).await?;
    let notices = commit.notifications.len();
    if !h.storage.alert_commit(commit).await? {
        return Ok(None);
    }
    if notices > 0 {
        tracing::info!(notifications = notices, "alerts: notifications queued");
    }
    Ok(Some(notices))
}

/// Channels by id.
async fn channels(h: &Handles) -> Result<BTreeMap<String, Channel>, StorageError> {
    Ok(h.storage
        .specs(channels::SPEC_KIND)
        .await?
        .iter()
        .filter_map(Channel::from_row)
        .map(|c| (c.id.clone(), c))
        .collect())
}

/// Overrides in name order (unreadable ones skipped).
pub async fn overrides(h: &Handles) -> Result<Vec<RuleOverride>, StorageError> {
    Ok(h.storage
        .specs(OVERRIDE_KIND)
        .await?
        .iter()
        .filter_map(|r| serde_json::from_str(&r.spec).ok())
        .collect())
}

/// Every maintenance window (unreadable ones skipped).
pub async fn windows(h: &Handles) -> Result<Vec<super::windows::Window>, StorageError> {
    Ok(h.storage
        .specs(super::windows::SPEC_KIND)
        .await?
        .iter()
        .filter_map(|r| serde_json::from_str::<super::windows::WindowSpec>(&r.spec).ok())
        .filter_map(|spec| spec.check().ok())
        .collect())
}

/// Silences in force at `now_ms`; those ended a day ago are removed.
async fn active_silences(h: &Handles, now_ms: i64) -> Result<Vec<Silence>, StorageError> {
    let mut active = Vec::new();
    for (name, s) in stored_silences(h).await? {
        if now_ms - s.ends_ms > 86_400_000 {
            h.storage.delete_spec(silences::SPEC_KIND, &name).await?;
        } else if s.active(now_ms) {
            active.push(s);
        }
    }
    Ok(active)
}

/// Every stored silence that reads, by its spec name.
async fn stored_silences(h: &Handles) -> Result<Vec<(String, Silence)>, StorageError> {
    Ok(h.storage
        .specs(silences::SPEC_KIND)
        .await?
        .into_iter()
        .filter_map(|row| Some((row.name, serde_json::from_str::<Silence>(&row.spec).ok()?)))
        .collect())
}

/// What holds notices back at `now_ms`: the silences in force and the windows (read only).
pub async fn muting(
    h: &Handles,
    now_ms: i64,
) -> Result<(Vec<Silence>, Vec<super::windows::Window>), StorageError> {
    let silences = stored_silences(h)
        .await?
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.active(now_ms))
        .collect();
    Ok((silences, windows(h).await?))
}

/// Why `a`'s notices are held back at `now_ms`, if they are: `silence ID` or `window NAME`.
pub fn muted_by(
    a: &Alert,
    now_ms: i64,
    labels: &crate::labels::Labels,
    silences: &[Silence],
    windows: &[super::windows::Window],
) -> Option<String> {
    silences
        .iter()
        .find(|s| s.mutes(a, now_ms, labels))
        .map(|s| format!("silence {}", s.id))
        .or_else(|| {
            windows
                .iter()
                .find(|w| w.mutes(a, now_ms, labels))
                .map(|w| format!("window {}", w.spec.name))
        })
}

/// Failing critical tasks read per round at most (the rule counts what it read).
const FAILING_READ_MAX: i64 = 10_000;

/// Measure every rule on every agent and advance the stored alerts.
async fn evaluate(
    h: &Handles,
    holder: &str,
    fence: i64,
    now_ms: i64,
    grouping: Grouping,
) -> Result<AlertCommit, StorageError> {
    let agents = h.storage.list_agents().await?;
    let overrides = overrides(h).await?;
    let channels = channels(h).await?;
    let stored: BTreeMap<String, Alert> = h
        .storage
        .alerts()
        .await?
        .into_iter()
        .filter_map(|r| Some((r.key, serde_json::from_str(&r.data).ok()?)))
        .collect();
    let mut failing: BTreeMap<String, Vec<proto::TaskSnapshot>> = BTreeMap::new();
    for (agent_id, json) in h.storage.failing_critical_tasks(FAILING_READ_MAX).await? {
        if let Ok(task) = serde_json::from_str(&json) {
            failing.entry(agent_id).or_default().push(task);
        }
    }
    let mut observed = Vec::with_capacity(agents.len() * RULES.len());
    let mut labels_of: BTreeMap<&str, crate::labels::Labels> = BTreeMap::new();
    for row in &agents {
        let labels = crate::labels::of(row.labels.as_deref());
        let facts = Facts {
            row,
            online: h.settings.is_online(row, now_ms),
            health: row
                .health
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            buffer: row
                .buffer
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            failing: failing.get(&row.id).map_or(&[], Vec::as_slice),
        };
        for def in RULES {
            let t = rules::thresholds(def, &overrides, &row.name, &labels);
            if !t.enabled {
                continue;
            }
            let holds = rules::measure(def.name, &facts, now_ms)
                .and_then(|(value, summary)| Some((t.severity(value)?, value, summary)));
            observed.push(Observation {
                rule: def.name.to_string(),
                agent_id: row.id.clone(),
                agent: row.name.clone(),
                holds,
                for_ms: t.for_s as i64 * 1000,
            });
        }
        labels_of.insert(&row.id, labels);
    }
    let silences = active_silences(h, now_ms).await?;
    let windows = windows(h).await?;
    let none = crate::labels::Labels::new();
    let muted = |a: &Alert| {
        let labels = labels_of.get(a.agent_id.as_str()).unwrap_or(&none);
        muted_by(a, now_ms, labels, &silences, &windows).is_some()
    };
    let round = state::advance(stored, observed, now_ms, grouping, &muted);
    let json = |a: &Alert| serde_json::to_string(a).unwrap_or_default();
    let mut notifications = Vec::new();
    for notice in &round.notices {
        let body = serde_json::to_string(notice).unwrap_or_default();
        for c in channels.values().filter(|c| c.wants(notice)) {
            notifications.push((notice.key.clone(), c.id.clone(), body.clone()));
        }
    }
    Ok(AlertCommit {
        lease: LEASE.to_string(),
        holder: holder.to_string(),
        fence,
        now_ms,
        alerts: round
            .changed
            .iter()
            .map(|a| AlertRow {
                key: a.key(),
                data: json(a),
                updated_ms: now_ms,
            })
            .collect(),
        removed: round.removed,
        events: round
            .events
            .iter()
            .map(|(k, a)| (k.clone(), json(a)))
            .collect(),
        notifications,
    })
}

/// Send what the outbox holds, each channel's rows in order, the channels side by side; stop
/// starting sends that could outlast the lease (`held_until_ms`). Rows of deleted channels are
/// closed with the reason.
async fn deliver(h: &Handles, held_until_ms: i64) -> Result<(), StorageError> {
    let channels = channels(h).await?;
    let mut per_channel: BTreeMap<String, (Option<Channel>, Vec<NotificationRow>)> =
        BTreeMap::new();
    for (id, channel) in &channels {
        let rows = h.storage.channel_pending(id, SEND_BATCH).await?;
        if !rows.is_empty() {
            per_channel.insert(id.clone(), (Some(channel.clone()), rows));
        }
    }
    // Rows whose channel is gone (read from the whole outbox, a batch at a time).
    for row in h.storage.notifications_pending(SEND_BATCH).await? {
        if !channels.contains_key(&row.channel) {
            per_channel
                .entry(row.channel.clone())
                .or_insert((None, Vec::new()))
                .1
                .push(row);
        }
    }
    let sends = per_channel
        .into_values()
        .map(|(channel, rows)| deliver_channel(h, channel, rows, held_until_ms));
    for r in join_all(sends).await {
        r?;
    }
    Ok(())
}

async fn deliver_channel(
    h: &Handles,
    channel: Option<Channel>,
    rows: Vec<NotificationRow>,
    held_until_ms: i64,
) -> Result<(), StorageError> {
    for row in rows {
        let now_ms = h.world.now_unix_ms();
        // A send ends before the lease could lapse (the next holder would send it too).
        let left_ms = held_until_ms - now_ms;
        if row.next_ms > now_ms || left_ms < 500 {
            // In order: the channel's later rows wait for this one.
            return Ok(());
        }
        let timeout = channels::SEND_TIMEOUT.min(Duration::from_millis(left_ms as u64));
        let notice: Option<Notice> = serde_json::from_str(&row.body).ok();
        let result = match (&channel, notice) {
            (None, _) => Err("the channel was deleted".to_string()),
            (_, None) => Err("the stored notification is unreadable".to_string()),
            (Some(c), Some(n)) => c.send(&h.world, &n, timeout).await,
        };
        let attempts = row.attempts + 1;
        let now_ms = h.world.now_unix_ms();
        let outcome = match result {
            Ok(()) => SendOutcome {
                id: row.id,
                attempts,
                delivered_ms: Some(now_ms),
                next_ms: now_ms,
                error: None,
            },
            // Nothing more can be done with these: kept as delivered, with the reason.
            Err(error) if channel.is_none() || error.starts_with("the stored") => SendOutcome {
                id: row.id,
                attempts,
                delivered_ms: Some(now_ms),
                next_ms: now_ms,
                error: Some(error),
            },
            Err(error) => {
                let wait = (1000_i64 << (attempts - 1).clamp(0, 16)).min(RETRY_MAX_MS);
                tracing::warn!(channel = %row.channel, key = %row.key, attempts, retry_in_ms = wait, %error, "alerts: a notification was not delivered");
                h.storage
                    .notification_sent(SendOutcome {
                        id: row.id,
                        attempts,
                        delivered_ms: None,
                        next_ms: now_ms + wait,
                        error: Some(error),
                    })
                    .await?;
                return Ok(());
            }
        };
        h.storage.notification_sent(outcome).await?;
    }
    Ok(())
}
