//! A run's directory, `DATA_DIR/runs/<run_id>/`: what lets a run outlive the agent that
//! started it. Every run executes in a small wrapper process ([`super::wrapper`], forked by the
//! run launcher) that owns the command, and the wrapper and the agent meet only here:
//!
//! - `claim`, written once and atomically (a complete temporary file hard-linked into place,
//!   which fails if the name exists): `started <pid> <start ticks>` by the wrapper *before* it
//!   starts the command, or `abandoned` by a recovering agent that found no claim. Whoever links
//!   first wins, so a wrapper still starting when its agent died is either found by the next
//!   agent (pid and start time) or never starts the command. No instant of a kill -9 leaves a
//!   process nobody accounts for.
//! - `output`: the command's stdout and stderr, interleaved, the first `output_bytes_max` bytes.
//! - `dropped`: bytes cut beyond that, rewritten as the count grows, so a wrapper stopped with
//!   SIGKILL still leaves the count.
//! - `status`: written by the wrapper when the command ended (temporary file, then rename):
//!   exit code or signal, or why the command could not start.
//!
//! Nothing here is synced to disk: it only has to outlive the agent, which the page cache
//! does. A power loss is told apart by the host's boot id, which the task store keeps: after a
//! reboot a missing claim proves nothing, so the runs of the old boot are recorded `aborted`
//! (with any status they left) and never run again as "never started".
//!
//! The agent deletes the directory once the run's end is in the task store.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{RunOutcome, status};

pub const CLAIM: &str = "claim";
pub const OUTPUT: &str = "output";
pub const DROPPED: &str = "dropped";
pub const STATUS: &str = "status";
const ABANDONED: &str = "abandoned";
/// The `dropped` file is rewritten each time the count grows by this much.
pub const DROPPED_STEP: u64 = 1024 * 1024;

/// The directory of run `run_id` under `runs` (`DATA_DIR/runs`).
pub fn dir(runs: &Path, run_id: i64) -> PathBuf {
    runs.join(run_id.to_string())
}

/// Who holds a run's claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The wrapper: the process `pid`, started at `ticks` (clock ticks since boot).
    Started { pid: i32, ticks: Option<u64> },
    /// A recovering agent: the command never starts.
    Abandoned,
}

impl Claim {
    fn encode(self) -> String {
        match self {
            Claim::Started { pid, ticks } => {
                format!(
                    "started {pid} {}\n",
                    ticks.map_or("-".into(), |t| t.to_string())
                )
            }
            Claim::Abandoned => format!("{ABANDONED}\n"),
        }
    }

    fn decode(text: &str) -> Option<Claim> {
        let mut words = text.split_whitespace();
        match words.next()? {
            "started" => {
                let pid = words.next()?.parse().ok()?;
                let ticks = words.next()?.parse().ok();
                Some(Claim::Started { pid, ticks })
            }
            ABANDONED => Some(Claim::Abandoned),
            _ => None,
        }
    }
}

/// Write `text` to `dir/name` only if nothing is there yet, all at once: readers see the whole
/// text or no file. `Ok(false)`: somebody else's file is there.
fn create_once(dir: &Path, name: &str, text: &str) -> std::io::Result<bool> {
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    let linked = std::fs::hard_link(&tmp, dir.join(name));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replace `dir/name` with `text` atomically for readers (temporary file, then rename). Not
/// synced: it only has to survive the agent, not the host; after a power loss a missing or
/// unreadable status reads as "left none" and the run is recorded `aborted`.
pub fn replace(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Try to take the claim; the claim in force afterwards (ours or the one already there).
pub fn claim(dir: &Path, mine: Claim) -> std::io::Result<Claim> {
    if create_once(dir, CLAIM, &mine.encode())? {
        return Ok(mine);
    }
    read_claim(dir)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable claim in {}", dir.display()),
        )
    })
}

pub fn read_claim(dir: &Path) -> std::io::Result<Option<Claim>> {
    match std::fs::read_to_string(dir.join(CLAIM)) {
        Ok(text) => Ok(Claim::decode(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// How the command ended, as the wrapper saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The command could not be started (or waited for).
    pub error: Option<String>,
    pub dropped: u64,
}

impl Exit {
    /// The run's outcome (output not yet attached).
    pub fn outcome(&self) -> RunOutcome {
        let failed = |error: String| RunOutcome {
            status: status::FAILED,
            exit_code: self.exit_code,
            error: Some(error),
            output: Vec::new(),
            output_dropped_bytes: 0,
        };
        match (&self.error, self.exit_code, self.signal) {
            (Some(e), _, _) => failed(e.clone()),
            (None, Some(0), _) => RunOutcome {
                status: status::DONE,
                exit_code: Some(0),
                error: None,
                output: Vec::new(),
                output_dropped_bytes: 0,
            },
            (None, Some(code), _) => failed(format!("exit code {code}")),
            (None, None, Some(sig)) => failed(format!("killed by signal {sig}")),
            (None, None, None) => failed("ended abnormally".into()),
        }
    }
}

pub fn write_exit(dir: &Path, exit: &Exit) -> std::io::Result<()> {
    let text = serde_json::to_string(exit).map_err(std::io::Error::other)?;
    replace(dir, STATUS, &text)
}

pub fn read_exit(dir: &Path) -> Option<Exit> {
    let text = std::fs::read_to_string(dir.join(STATUS)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The captured output (at most `limit` bytes are read) and the dropped count: the status's
/// when there is one, else the last count the wrapper wrote down.
pub fn read_output(dir: &Path, limit: usize, exit: Option<&Exit>) -> (Vec<u8>, u64) {
    let mut output = Vec::new();
    if let Ok(file) = std::fs::File::open(dir.join(OUTPUT)) {
        let _ = file.take(limit as u64).read_to_end(&mut output);
    }
    let dropped = match exit {
        Some(e) => e.dropped,
        None => std::fs::read_to_string(dir.join(DROPPED))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
    };
    (output, dropped)
}

/// Run ids that have a directory under `runs`.
pub fn list(runs: &Path) -> std::io::Result<Vec<i64>> {
    let entries = match std::fs::read_dir(runs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids: Vec<i64> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_wins_and_both_sides_read_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let started = Claim::Started {
            pid: 4242,
            ticks: Some(77),
        };
        assert_eq!(read_claim(tmp.path()).expect("read"), None);
        assert_eq!(claim(tmp.path(), started).expect("claim"), started);
        assert_eq!(
            claim(tmp.path(), Claim::Abandoned).expect("claim"),
            started,
            "a later claim finds the first"
        );
        let other = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            claim(other.path(), Claim::Abandoned).expect("claim"),
            Claim::Abandoned
        );
        assert_eq!(
            claim(other.path(), started).expect("claim"),
            Claim::Abandoned
        );
        let leftovers: Vec<_> = std::fs::read_dir(other.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CLAIM)]);
    }

    #[test]
    fn exits_become_outcomes_and_the_dropped_count_survives_a_missing_status() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join(OUTPUT), b"0123456789").expect("output");
        replace(tmp.path(), DROPPED, "3145728").expect("dropped");
        assert_eq!(
            read_output(tmp.path(), 4, None),
            (b"0123".to_vec(), 3_145_728)
        );
        let exit = Exit {
            exit_code: Some(3),
            dropped: 5,
            ..Exit::default()
        };
        write_exit(tmp.path(), &exit).expect("status");
        let back = read_exit(tmp.path()).expect("read");
        assert_eq!(back, exit);
        assert_eq!(back.outcome().error.as_deref(), Some("exit code 3"));
        assert_eq!(read_output(tmp.path(), 64, Some(&back)).1, 5);
        let ok = Exit {
            exit_code: Some(0),
            ..Exit::default()
        };
        assert_eq!(ok.outcome().status, status::DONE);
        let signaled = Exit {
            signal: Some(9),
            ..Exit::default()
        };
        assert_eq!(
            signaled.outcome().error.as_deref(),
            Some("killed by signal 9")
        );
    }
}
