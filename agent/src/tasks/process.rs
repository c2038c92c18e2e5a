//! What the agent and the run keepers share about a run's process: the
//! environment it starts with, and how a process is known across pid reuse (its start time)
//! and found alive. A leaf of `tasks`.

/// The environment of a run's process: the agent's own (`clear: false`) or an empty one,
/// with `vars` set on top.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    pub clear: bool,
    pub vars: Vec<(String, String)>,
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the pid
/// it identifies a process across pid reuse.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `ticks` is still alive (not a zombie).
pub fn alive(pid: i32, ticks: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    match ticks {
        Some(t) => start_ticks(pid) == Some(t),
        None => true,
    }
}
