//! The keys the replicas sign Redis entries with (see `streams::sign`): kept in storage
//! (`signing_keys`), read by every replica at start-up and every [`REFRESH_EVERY`] after, and
//! rotated by `outpost admin rotate-signing-key`.
//!
//! A rotation adds a key that signs only from [`ACTIVATION_DELAY`] later, so every replica
//! has read it (and accepts it) before any signs with it; the older keys stay accepted until
//! they are retired (by default a day after the new key signs), so entries and live sessions
//! signed before the rotation keep working until then.

use std::time::Duration;

use anyhow::Context;
use world::World;

use super::streams::{RedisStreams, SigningKey};
use crate::storage::{SigningKeyRow, Storage};

/// How often a replica reads the keys again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(15);
/// The least time between a rotation and its key signing: more than one refresh, so every
/// live replica accepts the key before any signs with it.
pub const ACTIVATION_MIN: Duration = Duration::from_secs(20);

/// The key to sign with at `now_ms` (the newest whose time has come) and every key accepted.
pub fn ring_at(
    rows: &[SigningKeyRow],
    now_ms: i64,
) -> anyhow::Result<(SigningKey, Vec<SigningKey>)> {
    let mut accepted = Vec::new();
    let mut current: Option<SigningKey> = None;
    for row in rows {
        if row.retire_at_ms.is_some_and(|at| at <= now_ms) {
            continue;
        }
        let mut key = [0; 32];
        hex::decode_to_slice(&row.key_hex, &mut key)
            .with_context(|| format!("signing key {} is not 32 bytes of hex", row.id))?;
        let key = SigningKey { id: row.id, key };
        if row.active_from_ms <= now_ms && current.is_none_or(|c| c.id < key.id) {
            current = Some(key);
        }
        accepted.push(key);
    }
    // Before the first key's time (clocks apart): the oldest accepted one.
    let current = current
        .or_else(|| accepted.first().copied())
        .context("every signing key is retired: run `outpost admin rotate-signing-key`")?;
    Ok((current, accepted))
}

/// Read the keys (making key 1 if there is none) and give them to `redis`.
pub async fn load(world: &World, storage: &Storage, redis: &RedisStreams) -> anyhow::Result<()> {
    let candidate = hex::encode(world.random_bytes::<32>());
    let rows = storage
        .signing_keys(&candidate)
        .await
        .context("read the replicas' signing keys")?;
    let (current, accepted) = ring_at(&rows, world.now_unix_ms())?;
    let before = redis.signing_key_id();
    redis.set_keys(current, &accepted);
    if before != current.id {
        tracing::info!(
            key = current.id,
            accepted = ?accepted.iter().map(|k| k.id).collect::<Vec<_>>(),
            "signing Redis entries with a new key"
        );
    }
    Ok(())
}

/// [`load`] every [`REFRESH_EVERY`] until `stop`; a failure is logged and the keys held are kept.
pub async fn refresh_forever(
    world: World,
    storage: Storage,
    redis: std::sync::Arc<RedisStreams>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(REFRESH_EVERY) => {}
        }
        if let Err(error) = load(&world, &storage, &redis).await {
            tracing::warn!(error = format!("{error:#}"), "signing keys not refreshed");
        }
    }
}

/// What a rotation did.
pub struct Rotated {
    pub id: u32,
    pub active_from_ms: i64,
    pub old_retire_at_ms: i64,
}

/// Add a new key that signs `activate_in` from now (at least [`ACTIVATION_MIN`]); the keys
/// before it stay accepted `retire_after` longer.
pub async fn rotate(
    world: &World,
    storage: &Storage,
    activate_in: Duration,
    retire_after: Duration,
) -> anyhow::Result<Rotated> {
    let now_ms = world.now_unix_ms();
    let active_from_ms =
        now_ms.saturating_add(crate::time::duration_ms(activate_in.max(ACTIVATION_MIN)));
    let old_retire_at_ms = active_from_ms.saturating_add(crate::time::duration_ms(retire_after));
    // Key 1 exists first, so a rotation on a fresh store does not retire the key it makes.
    storage
        .signing_keys(&hex::encode(world.random_bytes::<32>()))
        .await
        .context("read the signing keys")?;
    let id = storage
        .rotate_signing_key(
            &hex::encode(world.random_bytes::<32>()),
            now_ms,
            active_from_ms,
            old_retire_at_ms,
        )
        .await
        .context("store the new signing key")?;
    Ok(Rotated {
        id,
        active_from_ms,
        old_retire_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::{SigningKeyRow, ring_at};

    fn row(id: u32, active_from_ms: i64, retire_at_ms: Option<i64>) -> SigningKeyRow {
        SigningKeyRow {
            id,
            key_hex: hex::encode([u8::try_from(id).expect("small"); 32]),
            active_from_ms,
            retire_at_ms,
        }
    }

    #[test]
    fn the_newest_key_whose_time_came_signs_and_unretired_ones_verify() {
        let rows = [row(1, 0, Some(5_000)), row(2, 1_000, None)];
        let ids = |at| {
            let (current, accepted) = ring_at(&rows, at).expect("ring");
            (
                current.id,
                accepted.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
        };
        assert_eq!(ids(500), (1, vec![1, 2]), "2 accepted before it signs");
        assert_eq!(ids(1_000), (2, vec![1, 2]));
        assert_eq!(ids(5_000), (2, vec![2]), "1 retired");
        assert!(ring_at(&[row(1, 0, Some(10))], 10).is_err(), "nothing left");
        let mut bad = row(3, 0, None);
        bad.key_hex = "zz".into();
        assert!(ring_at(&[bad], 0).is_err());
    }
}
