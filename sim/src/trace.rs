//! The simulation trace: every event our crates log, stamped with simulated time, hashed.
//! The same seed must give the same hash (`--check-determinism` proves it per seed).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};

/// Lines kept to print when a seed fails.
const TAIL_LINES_MAX: usize = 400;

struct State {
    hasher: Sha256,
    events: u64,
    tail: VecDeque<String>,
    echo: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state<T>(f: impl FnOnce(&mut Option<State>) -> T) -> T {
    let mut guard = match STATE.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    f(&mut guard)
}

/// Start a fresh trace (one per seed run).
pub fn reset(echo: bool) {
    with_state(|s| {
        *s = Some(State {
            hasher: Sha256::new(),
            events: 0,
            tail: VecDeque::new(),
            echo,
        })
    });
}

thread_local! {
    static DRIVER_ELAPSED_MS: std::cell::Cell<u128> = const { std::cell::Cell::new(0) };
}

/// Simulated time as the driver (outside every host) sees it.
pub fn set_driver_elapsed(elapsed: std::time::Duration) {
    DRIVER_ELAPSED_MS.with(|c| c.set(elapsed.as_millis()));
}

fn driver_elapsed_ms() -> u128 {
    DRIVER_ELAPSED_MS.with(std::cell::Cell::get)
}

/// Record a line (the driver's own events: faults, checks).
pub fn record(line: String) {
    push(format!("{:>9} sim {line}", driver_elapsed_ms()));
}

fn turmoil_elapsed_ms() -> u128 {
    turmoil::sim_elapsed().map(|d| d.as_millis()).unwrap_or(0)
}

fn push(line: String) {
    with_state(|s| {
        if let Some(s) = s.as_mut() {
            s.hasher.update(line.as_bytes());
            s.hasher.update(b"\n");
            s.events += 1;
            if s.echo {
                println!("{line}");
            }
            if s.tail.len() == TAIL_LINES_MAX {
                s.tail.pop_front();
            }
            s.tail.push_back(line);
        }
    });
}

/// (hash hex, event count, last lines).
pub fn finish() -> (String, u64, Vec<String>) {
    with_state(|s| match s.take() {
        Some(s) => (
            hex::encode(&s.hasher.finalize()[..8]),
            s.events,
            s.tail.into_iter().collect(),
        ),
        None => (String::new(), 0, Vec::new()),
    })
}

/// Feeds events from the product crates into the trace.
pub struct TraceLayer;

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl<S: tracing::Subscriber> Layer<S> for TraceLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let target = meta.target();
        if !(target.starts_with("agent")
            || target.starts_with("control_plane")
            || target.starts_with("world"))
        {
            return;
        }
        let host = turmoil::sim_elapsed().is_some();
        let elapsed = if host {
            turmoil_elapsed_ms()
        } else {
            driver_elapsed_ms()
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        push(format!(
            "{elapsed:>9} {} {target}{}",
            meta.level(),
            fields.0
        ));
    }
}
