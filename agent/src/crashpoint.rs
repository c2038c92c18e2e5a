//! Named instants where the chaos suite (`just chaos`) makes the agent die as if killed with
//! kill -9: `OUTPOST_CHAOS_CRASH_AT=NAME:N` ends the process with SIGKILL on its N-th pass
//! through the point NAME. Without the variable a point costs one load of a cached value.
//! The suite uses it to hit instants a signal from outside could only hit by luck: between
//! the control plane's acknowledgement of a batch and the buffer's delete, between a task
//! process's start and the storing of its pid, and in a run's keeper before, during and after
//! its command.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The control plane acknowledged a batch; the buffer has not deleted it yet.
pub const AFTER_ACK: &str = "buffer.after_ack";
/// The agent handed a run to its keeper and has not heard it start.
pub const AFTER_HANDOVER: &str = "task.after_handover";
/// A task's process started; its pid is not stored yet.
pub const AFTER_SPAWN: &str = "task.after_spawn";
/// A run keeper recorded its intent to start a run; the command is not started yet (in the
/// keeper).
pub const KEEPER_AFTER_INTENT: &str = "keeper.after_intent";
/// A run keeper started the command and has not recorded its pid (in the keeper).
pub const KEEPER_AFTER_SPAWN: &str = "keeper.after_spawn";
/// The command ended; its keeper has not recorded how (in the keeper).
pub const KEEPER_BEFORE_STATUS: &str = "keeper.before_status";

/// A run keeper is about to act on a request from its agent (a delay point: see [`delay`]).
pub const KEEPER_BEFORE_REQUEST: &str = "keeper.before_request";

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static DELAY: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let value = std::env::var("OUTPOST_CHAOS_CRASH_AT").ok()?;
        let (name, n) = value.rsplit_once(':')?;
        Some((name.to_string(), n.parse().ok()?))
    })
}

/// Pass through the point `name`.
pub fn pass(name: &str) {
    let Some((at, n)) = plan() else {
        return;
    };
    if at == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::warn!(point = name, "crash point reached: dying as if killed -9");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Pass through the delay point `name`: `OUTPOST_CHAOS_DELAY_AT=NAME:MS` makes every pass
/// wait MS milliseconds (a slow process, at the instant that matters). Without the variable a
/// point costs one load of a cached value.
pub fn delay(name: &str) {
    let plan = DELAY.get_or_init(|| {
        let value = std::env::var("OUTPOST_CHAOS_DELAY_AT").ok()?;
        let (name, ms) = value.rsplit_once(':')?;
        Some((name.to_string(), ms.parse().ok()?))
    });
    if let Some((at, ms)) = plan
        && at == name
    {
        std::thread::sleep(std::time::Duration::from_millis(*ms));
    }
}
