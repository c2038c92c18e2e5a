//! The one seam between Outpost code and the outside world.
//!
//! Production code reaches wall-clock time, randomness, the network and blocking work only
//! through a [`World`] handle that is passed in explicitly. A world is either *real* (tokio
//! sockets, the OS clock, an OS-seeded RNG, a blocking thread pool) or *simulated* (turmoil
//! sockets, turmoil's virtual clock, an RNG seeded from the simulation seed, blocking work run
//! inline). The choice is made at run time, never by a cargo feature: features unify across the
//! workspace, so a compile-time switch would leak simulated sockets into the real binaries.
//!
//! Monotonic time and sleeps use `tokio::time` directly: under turmoil it is virtual.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // this crate *is* the seam

mod http_client;
mod net;
mod postgres;
mod serve;
mod signal;
mod slots;
pub mod tls;
mod ws;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use http_client::{HttpError, HttpResponse, Target, http_request, request};
pub use net::{Listener, Net, PeerAddr, Stream};
pub use postgres::postgres_connect;
pub use serve::{ConnectionCounters, ServeLimits, serve};
pub use signal::{on_shutdown_signal, shutdown_signal};
pub use slots::{KeyedSlots, Slot};
pub use ws::{WsError, WsStream, ws_connect, ws_connect_with};

/// Handle to the outside world. Cheap to clone; clones share one RNG.
#[derive(Clone)]
pub struct World {
    inner: Arc<Inner>,
}

struct Inner {
    mode: Mode,
    rng: Mutex<StdRng>,
    /// Trust for `https://` and `wss://`; the system bundle when never set.
    tls_client: Mutex<Option<Arc<rustls::ClientConfig>>>,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Real,
    Simulated { epoch: SystemTime },
}

/// Blocking work failed to complete (the worker thread panicked or was cancelled).
#[derive(Debug, thiserror::Error)]
#[error("blocking task did not complete: {0}")]
pub struct BlockingError(String);

impl World {
    /// The production world: OS clock, OS-seeded randomness, tokio sockets, a thread pool for
    /// blocking work.
    pub fn real() -> World {
        World::new(Mode::Real, StdRng::from_os_rng())
    }

    /// A simulated world for code running inside a turmoil simulation. `seed` drives every
    /// random choice made through this handle; `epoch` is the wall-clock time reported when no
    /// simulated host is current (turmoil's own clock is used inside hosts).
    pub fn simulated(seed: u64, epoch: SystemTime) -> World {
        World::new(Mode::Simulated { epoch }, StdRng::seed_from_u64(seed))
    }

    /// Trust `config`'s CAs for `https://` and `wss://` (every clone of this world).
    pub fn set_tls_client(&self, config: Arc<rustls::ClientConfig>) {
        let mut slot = self
            .inner
            .tls_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(config);
    }

    /// The client TLS configuration: the one set, else the system's CA bundle.
    pub fn tls_client(&self) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
        let mut slot = self
            .inner
            .tls_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(config) = slot.as_ref() {
            return Ok(Arc::clone(config));
        }
        let config = tls::client_config(std::path::Path::new(tls::SYSTEM_CA_BUNDLE))?;
        *slot = Some(Arc::clone(&config));
        Ok(config)
    }

    fn new(mode: Mode, rng: StdRng) -> World {
        World {
            inner: Arc::new(Inner {
                mode,
                rng: Mutex::new(rng),
                tls_client: Mutex::new(None),
            }),
        }
    }

    pub fn is_simulated(&self) -> bool {
        matches!(self.inner.mode, Mode::Simulated { .. })
    }

    /// Wall-clock time. Use `tokio::time` for durations and deadlines.
    pub fn now(&self) -> SystemTime {
        match self.inner.mode {
            Mode::Real => SystemTime::now(),
            Mode::Simulated { epoch } => match turmoil::since_epoch() {
                Some(since) => UNIX_EPOCH + since,
                None => epoch,
            },
        }
    }

    /// Wall-clock time in milliseconds since the Unix epoch (what storage and the wire carry).
    pub fn now_unix_ms(&self) -> i64 {
        let since = self
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    }

    fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-draw; the RNG state is still
        // a valid RNG state, so keep using it.
        let mut rng = match self.inner.rng.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut rng)
    }

    pub fn random_u64(&self) -> u64 {
        self.with_rng(|rng| rng.random())
    }

    /// A uniformly random value in `[0, upper)`; `0` when `upper` is 0.
    pub fn random_below(&self, upper: u64) -> u64 {
        if upper == 0 {
            return 0;
        }
        self.with_rng(|rng| rng.random_range(0..upper))
    }

    pub fn random_bytes<const N: usize>(&self) -> [u8; N] {
        self.with_rng(|rng| {
            let mut out = [0u8; N];
            rng.fill(&mut out[..]);
            out
        })
    }

    pub fn net(&self) -> Net {
        Net::new(self.is_simulated())
    }

    /// Run blocking work (SQLite, file system, CPU-heavy hashing). Real: on tokio's blocking
    /// pool. Simulated: inline, so the simulation stays single-threaded and deterministic.
    pub async fn blocking<F, R>(&self, f: F) -> Result<R, BlockingError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self.inner.mode {
            Mode::Real => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| BlockingError(e.to_string())),
            Mode::Simulated { .. } => Ok(f()),
        }
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::World;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn simulated_randomness_follows_the_seed() {
        let epoch = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = World::simulated(7, epoch);
        let b = World::simulated(7, epoch);
        let c = World::simulated(8, epoch);
        let draws = |w: &World| (0..8).map(|_| w.random_u64()).collect::<Vec<_>>();
        let (da, db, dc) = (draws(&a), draws(&b), draws(&c));
        assert_eq!(da, db);
        assert_ne!(da, dc);
    }

    #[test]
    fn simulated_clock_outside_a_host_is_the_epoch() {
        let epoch = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let w = World::simulated(1, epoch);
        assert_eq!(w.now(), epoch);
        assert_eq!(w.now_unix_ms(), 1_800_000_000_000);
    }

    #[test]
    fn random_below_stays_in_range() {
        let w = World::simulated(3, UNIX_EPOCH);
        assert_eq!(w.random_below(0), 0);
        assert!((0..1000).all(|_| w.random_below(10) < 10));
    }
}
