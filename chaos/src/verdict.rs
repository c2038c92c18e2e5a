//! Verdicts from the ledger — the files and tables the run left, never its logs: the agents'
//! buffer and task stores, the control plane's stored metrics, the marker and receipt files,
//! the monitored database's `chaos_typed` table, the terminal browsers' byte accounting.
//! Each invariant ends `valid`, `invalid` or `unknown` (the evidence could not decide), with
//! the evidence.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::workload::{AskedTask, ExecRun, RolloutRun, TaskShape, TerminalLedger, read_markers};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    Invalid,
    Unknown,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Invalid => "invalid",
            Outcome::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Verdict {
    pub invariant: &'static str,
    pub outcome: Outcome,
    /// What was checked, in figures.
    pub checked: String,
    /// Each problem found (for invalid) or each reason it could not be decided (unknown).
    pub evidence: Vec<String>,
}

impl Verdict {
    pub fn new(
        invariant: &'static str,
        checked: String,
        invalid: Vec<String>,
        unknown: Vec<String>,
    ) -> Verdict {
        let outcome = if !invalid.is_empty() {
            Outcome::Invalid
        } else if !unknown.is_empty() {
            Outcome::Unknown
        } else {
            Outcome::Valid
        };
        let mut evidence = invalid;
        evidence.extend(unknown);
        Verdict {
            invariant,
            outcome,
            checked,
            evidence,
        }
    }
}

/// A buffer file's ledger: its epoch, the next sequence number it would hand out, the
/// sequence numbers it still holds and its drop counters.
#[derive(Clone, Debug)]
pub struct BufferSnapshot {
    pub epoch: String,
    pub next_seq: i64,
    pub seqs: Vec<i64>,
    pub dropped: BTreeMap<String, i64>,
}

pub fn snapshot_buffer(path: &Path) -> Result<BufferSnapshot, String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let meta = |key: &str| -> Option<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .ok()
    };
    let epoch = meta("epoch").ok_or("no epoch")?;
    let mut stmt = conn
        .prepare("SELECT seq FROM records ORDER BY seq")
        .map_err(|e| e.to_string())?;
    let seqs: Vec<i64> = stmt
        .query_map([], |r| r.get(0))
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let max = seqs.last().copied().unwrap_or(0);
    let next_seq = meta("next_seq")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1i64)
        .max(max + 1);
    let dropped = agent::buffer::store::DROP_REASONS
        .into_iter()
        .map(|r| {
            (
                r.to_string(),
                meta(&format!("dropped_{r}"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect();
    Ok(BufferSnapshot {
        epoch,
        next_seq,
        seqs,
        dropped,
    })
}

/// Stored metric rows of one agent: (epoch, seq) → how many times stored.
pub type Stored = BTreeMap<(String, i64), i64>;

/// One agent's metric evidence: its name, its buffer at the end, its stored rows, and the
/// buffers read just before corruption faults.
pub type AgentMetrics = (
    String,
    Result<BufferSnapshot, String>,
    Stored,
    Vec<BufferSnapshot>,
);

/// Invariant 1: per epoch, stored + still buffered + counted drops = appended; nothing stored
/// twice. `live` is the agent's buffer at the end; `corrupted` the snapshots taken just
/// before a corruption fault moved a file aside (those rows are the quarantine's loss).
pub fn metrics(agents: &[AgentMetrics]) -> Verdict {
    let mut invalid = Vec::new();
    let mut unknown = Vec::new();
    let (mut appended_total, mut stored_total, mut epochs) = (0i64, 0i64, 0usize);
    for (name, live, stored, corrupted) in agents {
        for ((epoch, seq), n) in stored {
            if *n > 1 {
                invalid.push(format!("{name}: epoch {epoch} seq {seq} stored {n} times"));
            }
        }
        stored_total += stored.len() as i64;
        let mut ledgers: Vec<(&BufferSnapshot, bool)> =
            corrupted.iter().map(|s| (s, true)).collect();
        match live {
            Ok(s) => ledgers.push((s, false)),
            Err(e) => unknown.push(format!("{name}: its buffer could not be read: {e}")),
        }
        let known: BTreeSet<&str> = ledgers.iter().map(|(s, _)| s.epoch.as_str()).collect();
        for (epoch, _) in stored.keys() {
            if !known.contains(epoch.as_str()) {
                unknown.push(format!(
                    "{name}: stored rows of epoch {epoch}, whose buffer the suite never read"
                ));
                break;
            }
        }
        for (snap, quarantined) in ledgers {
            epochs += 1;
            let appended = snap.next_seq - 1;
            appended_total += appended;
            let held: BTreeSet<i64> = snap.seqs.iter().copied().collect();
            let missing: Vec<i64> = (1..=appended)
                .filter(|s| !stored.contains_key(&(snap.epoch.clone(), *s)) && !held.contains(s))
                .collect();
            // Rows the age limit discarded carry seqs and are counted; in a quarantined file
            // the held rows themselves are the loss, announced by the quarantine.
            let counted = if quarantined {
                0
            } else {
                snap.dropped.get("age").copied().unwrap_or(0)
            };
            if missing.len() as i64 > counted {
                invalid.push(format!(
                    "{name}: epoch {}: {} of {appended} appended rows neither stored nor buffered nor counted (first: {:?}; counted age drops {counted})",
                    snap.epoch,
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ));
            }
        }
    }
    Verdict::new(
        "metrics: nothing lost, nothing stored twice",
        format!(
            "{appended_total} rows appended in {epochs} epochs on {} agents, {stored_total} stored",
            agents.len()
        ),
        invalid,
        unknown,
    )
}

/// A task run as the agent's store holds it.
#[derive(Clone, Debug)]
pub struct RunRecord {
    pub status: i64,
    pub exit_code: Option<i64>,
    /// Aborted because its keeper died without recording how the command ended: the command
    /// may have run to its end on the host.
    pub end_lost: bool,
}

/// A task as the agent's store holds it.
#[derive(Clone, Debug)]
pub struct TaskRecord {
    pub id: String,
    pub key: String,
    pub status: i64,
    pub next_run_ms: Option<i64>,
    pub created_ms: i64,
    pub runs: Vec<RunRecord>,
}

/// An agent's task store as the suite read it just before a fault damaged it.
#[derive(Clone, Debug)]
pub struct DamagedStore {
    pub agent: usize,
    /// When it was damaged (unix ms).
    pub at_ms: i64,
    pub before: Result<Vec<TaskRecord>, String>,
}

// The task store's status bits, as the agent defines them: the suite reads the evidence
// independently, but in the agent's own vocabulary.
const DONE: i64 = agent::tasks::model::status::DONE as i64;
const TERMINAL: i64 = agent::tasks::model::status::TERMINAL as i64;
const SCHEDULED: i64 = agent::tasks::model::status::SCHEDULED as i64;
const IN_FLIGHT: i64 = agent::tasks::model::status::IN_FLIGHT as i64;
const ABORTED: i64 = agent::tasks::model::status::ABORTED as i64;

pub fn read_tasks(path: &Path) -> Result<Vec<TaskRecord>, String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT id, key, status, next_run_ms, created_ms FROM tasks")
        .map_err(|e| e.to_string())?;
    let mut tasks: Vec<TaskRecord> = stmt
        .query_map([], |r| {
            Ok(TaskRecord {
                id: r.get(0)?,
                key: r.get(1)?,
                status: r.get(2)?,
                next_run_ms: r.get(3)?,
                created_ms: r.get(4)?,
                runs: Vec::new(),
            })
        })
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT task_id, status, exit_code, error FROM runs ORDER BY run_id")
        .map_err(|e| e.to_string())?;
    let runs: Vec<(String, RunRecord)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                RunRecord {
                    status: r.get(1)?,
                    exit_code: r.get(2)?,
                    end_lost: r.get::<_, i64>(1)? == ABORTED
                        && r.get::<_, Option<String>>(3)?.is_some_and(|e| {
                            e == agent::tasks::pool::KEEPER_DIED
                                || e == agent::tasks::pool::LEFT_NO_STATUS
                        }),
                },
            ))
        })
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    for (task_id, run) in runs {
        if let Some(t) = tasks.iter_mut().find(|t| t.id == task_id) {
            t.runs.push(run);
        }
    }
    Ok(tasks)
}

/// Invariant 2: every asked-for task is kept; every run that really ran is recorded once with
/// its real outcome; no task runs twice at once; future tasks are intact.
pub fn tasks(
    asked: &[AskedTask],
    stores: &[Result<Vec<TaskRecord>, String>],
    corrupted: &[DamagedStore],
    markers: &Path,
    end_ms: i64,
) -> Verdict {
    let mut lost_with_store = 0usize;
    let mut before_damage = 0usize;
    let mut invalid = Vec::new();
    let mut unknown = Vec::new();
    let (mut runs_checked, mut tasks_checked, mut uncertain_absent) = (0usize, 0usize, 0usize);
    for a in asked {
        let Some(Ok(store)) = stores.get(a.agent) else {
            unknown.push(format!("agent {}: task store unreadable", a.agent));
            continue;
        };
        // A task store damaged after the task was asked for was moved aside with its tasks
        // (an announced loss: the agent logs it). The task is judged on the store as it was
        // read just before the damage.
        let damaged = corrupted
            .iter()
            .filter(|d| d.agent == a.agent && d.at_ms > a.asked_ms)
            .min_by_key(|d| d.at_ms);
        // A request still in flight when the store was damaged may have been carried out by
        // the restarted agent, into the store that replaced it: then it is judged there.
        let (store, replaced_by) = match damaged {
            None => (store, None),
            Some(d) => match &d.before {
                Ok(before) => {
                    before_damage += 1;
                    (before, (d.at_ms < a.answered_ms).then_some(store))
                }
                Err(_) => {
                    lost_with_store += 1;
                    continue;
                }
            },
        };
        let asked_for = |t: &&TaskRecord| Some(&t.id) == a.id.as_ref() || t.key == a.key;
        let found = store
            .iter()
            .find(asked_for)
            .or_else(|| replaced_by.and_then(|s| s.iter().find(asked_for)));
        let Some(task) = found else {
            if a.uncertain {
                uncertain_absent += 1;
            }
            if a.id.is_some() {
                invalid.push(format!(
                    "task {} ({}) was created but is gone",
                    a.key,
                    a.id.as_deref().unwrap_or("")
                ));
            }
            continue;
        };
        tasks_checked += 1;
        runs_checked += task.runs.len();
        runs_against_markers(a, task, markers, &mut invalid);
        state_for_shape(a, task, damaged.is_some(), end_ms, &mut invalid);
    }
    Verdict::new(
        "tasks: every run recorded once, never two at once, future tasks intact",
        format!(
            "{} tasks asked for, {tasks_checked} found and checked with {runs_checked} recorded runs against their markers ({before_damage} of them in a store read just before it was damaged); {uncertain_absent} whose creation went unanswered do not exist; {lost_with_store} went with a damaged store that could not be read",
            asked.len()
        ),
        invalid,
        unknown,
    )
}

/// A task's runs against the markers its command left on the host: never two at once, every
/// completed run recorded as succeeded, every unfinished one recorded as not.
fn runs_against_markers(
    a: &AskedTask,
    task: &TaskRecord,
    markers: &Path,
    invalid: &mut Vec<String>,
) {
    let marks = read_markers(markers, &a.key);
    // Pair starts and ends by pid; intervals of one task must not overlap.
    let mut open: BTreeMap<u32, u128> = BTreeMap::new();
    let mut intervals: Vec<(u128, u128)> = Vec::new();
    for (start, pid, at) in &marks {
        if *start {
            open.insert(*pid, *at);
        } else if let Some(s) = open.remove(pid) {
            intervals.push((s, *at));
        }
    }
    intervals.sort_unstable();
    for w in intervals.windows(2) {
        if w[1].0 < w[0].1 {
            invalid.push(format!(
                "task {}: two runs at once ({} ns overlap)",
                a.key,
                w[0].1 - w[1].0
            ));
        }
    }
    let done = task
        .runs
        .iter()
        .filter(|r| r.status == DONE && r.exit_code == Some(0))
        .count();
    let not_done = task.runs.len() - done;
    // A run in flight when its agent stopped for the last time may finish afterwards:
    // its end is on the host, its outcome not yet in the store. A run whose keeper died
    // without writing the end may have completed on the host too (recorded `aborted`).
    let in_flight = task
        .runs
        .iter()
        .filter(|r| r.status & IN_FLIGHT != 0 || r.end_lost)
        .count();
    if intervals.len() < done || intervals.len() > done + in_flight {
        invalid.push(format!(
            "task {}: {} runs completed on the host, {done} recorded as succeeded ({} runs recorded)",
            a.key,
            intervals.len(),
            task.runs.len()
        ));
    }
    if open.len() > not_done {
        invalid.push(format!(
            "task {}: {} runs started and never finished on the host, only {not_done} recorded as not succeeded",
            a.key,
            open.len()
        ));
    }
}

/// The state a task of its shape must be in at the end: a one-off finished, a future one
/// still scheduled at its time with no run, a recurring one neither ended nor never run.
/// A task judged on its store as read before a damage may not have been due yet.
fn state_for_shape(
    a: &AskedTask,
    task: &TaskRecord,
    damaged: bool,
    end_ms: i64,
    invalid: &mut Vec<String>,
) {
    match a.what {
        TaskShape::OneOff | TaskShape::Periodic | TaskShape::Cron if damaged => {}
        TaskShape::OneOff => {
            if task.status & TERMINAL == 0 {
                invalid.push(format!(
                    "one-off task {} never finished (status {})",
                    a.key, task.status
                ));
            }
        }
        TaskShape::Future => {
            let due = task.created_ms + 3 * 3600 * 1000;
            if task.status != SCHEDULED
                || task.next_run_ms.is_none_or(|n| (n - due).abs() > 5_000)
                || !task.runs.is_empty()
            {
                invalid.push(format!(
                    "future task {}: status {} next run {:?}, expected scheduled at {due} with no run",
                    a.key, task.status, task.next_run_ms
                ));
            }
        }
        TaskShape::Periodic | TaskShape::Cron => {
            if task.status & TERMINAL != 0 {
                invalid.push(format!(
                    "recurring task {} ended (status {})",
                    a.key, task.status
                ));
            }
            if task.runs.is_empty() && end_ms > task.created_ms + 120_000 {
                invalid.push(format!("recurring task {} never ran", a.key));
            }
        }
    }
}

/// Invariant 3: terminal bytes in order, gaps only announced, no statement executed twice,
/// every confirmed statement executed.
pub fn terminal(
    ledger: &TerminalLedger,
    executed: &Result<BTreeMap<(String, i64), i64>, String>,
) -> Verdict {
    let mut invalid = ledger.violations.clone();
    let mut unknown = Vec::new();
    match executed {
        Ok(rows) => {
            for ((session, n), count) in rows {
                if *count > 1 {
                    invalid.push(format!("{session}: statement {n} executed {count} times"));
                }
            }
            for t in ledger.typed.iter().filter(|t| t.confirmed) {
                if !rows.contains_key(&(t.session.clone(), t.n as i64)) {
                    invalid.push(format!(
                        "{}: statement {} answered but not in the table",
                        t.session, t.n
                    ));
                }
            }
        }
        Err(e) => unknown.push(format!("chaos_typed could not be read: {e}")),
    }
    if ledger.typed.is_empty() {
        unknown.push("no statement was typed".into());
    }
    let confirmed = ledger.typed.iter().filter(|t| t.confirmed).count();
    Verdict::new(
        "terminal: bytes in order, gaps announced, no statement run twice",
        format!(
            "{} statements typed ({confirmed} answered) in {} sessions, {} bytes read, {} reattachments, {} bytes announced skipped",
            ledger.typed.len(),
            ledger.sessions,
            ledger.bytes,
            ledger.reattached,
            ledger.skipped
        ),
        invalid,
        unknown,
    )
}

/// Invariant 4: every exec outcome agrees with the host's receipt.
pub fn exec(runs: &[ExecRun], receipts: &BTreeMap<String, Vec<String>>) -> Verdict {
    let mut invalid = Vec::new();
    let mut unknown = 0usize;
    let mut outcomes = BTreeMap::<String, usize>::new();
    for run in runs {
        if run.outcomes.is_empty() {
            match &run.op_id {
                // Runs are in storage: a started run is shown ended (or abandoned) by a replica.
                Some(op) => invalid.push(format!(
                    "exec {} ({op}) was never shown ended by any replica within 120 s",
                    run.token
                )),
                None => unknown += 1,
            }
            continue;
        }
        for (host, outcome) in &run.outcomes {
            *outcomes.entry(outcome.clone()).or_default() += 1;
            let ran = receipts.get(host).is_some_and(|r| r.contains(&run.token));
            match outcome.as_str() {
                "ok" if !ran => {
                    invalid.push(format!("{host}: exec {} ok without a receipt", run.token))
                }
                "not_started" if ran => {
                    invalid.push(format!("{host}: exec {} not_started but it ran", run.token));
                }
                _ => {}
            }
        }
    }
    let unknown_note = if runs.is_empty() {
        vec!["no exec run was started".to_string()]
    } else {
        Vec::new()
    };
    Verdict::new(
        "exec: outcomes agree with the hosts' receipts",
        format!(
            "{} runs asked for ({unknown} not accepted: no replica or storage answered the request), outcomes {outcomes:?}",
            runs.len()
        ),
        invalid,
        unknown_note,
    )
}

/// One row of the control plane's notification outbox.
#[derive(Clone, Debug)]
pub struct Notification {
    pub id: i64,
    pub key: String,
    pub created_ms: i64,
    pub delivered_ms: Option<i64>,
}

/// Rows made this long before the end must have been delivered (the back-off is at most 60 s
/// and a dead evaluator's lease lapses within seconds).
const DELIVERY_BOUND_MS: i64 = 90_000;

/// The alert path: every transition the control plane put in its outbox (while faults were
/// injected too) reached the receiver once, or once plus one duplicate after a replica died
/// mid-send; in the outbox's order; nothing reached it that the outbox does not hold.
pub fn alerts(outbox: &[Notification], taken: &[(String, i64)], end_ms: i64) -> Verdict {
    let mut invalid = Vec::new();
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, _) in taken {
        *times.entry(key.as_str()).or_default() += 1;
    }
    let in_outbox: BTreeSet<&str> = outbox.iter().map(|n| n.key.as_str()).collect();
    for key in times.keys().filter(|k| !in_outbox.contains(*k)) {
        invalid.push(format!(
            "the receiver took {key}, which no outbox row holds"
        ));
    }
    let mut delivered = 0;
    let mut duplicates = 0;
    for n in outbox {
        let got = times.get(n.key.as_str()).copied().unwrap_or(0);
        match n.delivered_ms {
            None if n.created_ms < end_ms - DELIVERY_BOUND_MS => invalid.push(format!(
                "notification {} ({}) made {} s before the end was never delivered",
                n.id,
                n.key,
                (end_ms - n.created_ms) / 1000
            )),
            None => {}
            Some(_) if got == 0 => invalid.push(format!(
                "notification {} ({}) is marked delivered but the receiver never took it",
                n.id, n.key
            )),
            Some(_) => delivered += 1,
        }
        if got > 2 {
            invalid.push(format!(
                "notification {} ({}) reached the receiver {got} times",
                n.id, n.key
            ));
        }
        duplicates += got.saturating_sub(1);
    }
    // First arrivals follow the outbox's order (one channel).
    let mut seen = BTreeSet::new();
    let first: Vec<&str> = taken
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| seen.insert(*k))
        .collect();
    let expected: Vec<&str> = outbox
        .iter()
        .map(|n| n.key.as_str())
        .filter(|k| seen.contains(k))
        .collect();
    if first != expected {
        invalid.push(format!(
            "the receiver took the keys out of the outbox's order: took {first:?}, outbox {expected:?}"
        ));
    }
    Verdict::new(
        "alerts: every transition delivered once (at most one duplicate), in order",
        format!(
            "{} outbox rows, {delivered} delivered, {} taken, {duplicates} duplicates",
            outbox.len(),
            taken.len()
        ),
        invalid,
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::{BufferSnapshot, Outcome, Stored, metrics};

    fn snap(epoch: &str, next_seq: i64, held: &[i64], age: i64) -> BufferSnapshot {
        BufferSnapshot {
            epoch: epoch.into(),
            next_seq,
            seqs: held.to_vec(),
            dropped: [("age".to_string(), age)].into(),
        }
    }

    fn stored(epoch: &str, seqs: impl IntoIterator<Item = i64>) -> Stored {
        seqs.into_iter()
            .map(|s| ((epoch.to_string(), s), 1))
            .collect()
    }

    #[test]
    fn stored_plus_buffered_plus_counted_must_cover_what_was_appended() {
        // 10 appended: 1..=7 stored, 8..=10 still buffered.
        let ok = metrics(&[(
            "a".into(),
            Ok(snap("e", 11, &[8, 9, 10], 0)),
            stored("e", 1..=7),
            vec![],
        )]);
        assert_eq!(ok.outcome, Outcome::Valid, "{:?}", ok.evidence);
        // Seq 4 vanished without a counted drop.
        let lost = metrics(&[(
            "a".into(),
            Ok(snap("e", 11, &[8, 9, 10], 0)),
            stored("e", [1, 2, 3, 5, 6, 7]),
            vec![],
        )]);
        assert_eq!(lost.outcome, Outcome::Invalid);
        // The same gap counted as an age drop is fine.
        let aged = metrics(&[(
            "a".into(),
            Ok(snap("e", 11, &[8, 9, 10], 1)),
            stored("e", [1, 2, 3, 5, 6, 7]),
            vec![],
        )]);
        assert_eq!(aged.outcome, Outcome::Valid);
        // Stored twice.
        let mut twice = stored("e", 1..=10);
        twice.insert(("e".into(), 3), 2);
        let dup = metrics(&[("a".into(), Ok(snap("e", 11, &[], 0)), twice, vec![])]);
        assert_eq!(dup.outcome, Outcome::Invalid);
    }

    #[test]
    fn a_quarantined_epoch_loses_exactly_what_it_held() {
        // Epoch "old" appended 6: 1..=4 delivered, 5 and 6 went with the corrupted file.
        let mut rows = stored("old", 1..=4);
        rows.extend(stored("new", 1..=2));
        let v = metrics(&[(
            "a".into(),
            Ok(snap("new", 3, &[], 0)),
            rows.clone(),
            vec![snap("old", 7, &[5, 6], 0)],
        )]);
        assert_eq!(v.outcome, Outcome::Valid, "{:?}", v.evidence);
        // A stored epoch the suite never read cannot be judged.
        let v = metrics(&[("a".into(), Ok(snap("new", 3, &[], 0)), rows, vec![])]);
        assert_eq!(v.outcome, Outcome::Unknown);
    }
}

#[cfg(test)]
mod task_tests {
    use super::{DamagedStore, Outcome, TaskRecord, tasks};
    use crate::workload::{AskedTask, TaskShape};

    fn asked(asked_ms: i64, answered_ms: i64) -> AskedTask {
        AskedTask {
            agent: 0,
            key: "once-30".into(),
            what: TaskShape::Future,
            id: Some("t_1".into()),
            uncertain: false,
            asked_ms,
            answered_ms,
        }
    }

    fn record() -> TaskRecord {
        TaskRecord {
            id: "t_1".into(),
            key: "once-30".into(),
            status: i64::from(agent::tasks::model::status::SCHEDULED),
            next_run_ms: Some(1_500 + 3 * 3_600_000),
            created_ms: 1_500,
            runs: Vec::new(),
        }
    }

    #[test]
    fn a_task_asked_before_a_damage_and_created_after_it_is_judged_in_the_new_store() {
        let markers = tempfile::tempdir().expect("temp dir");
        let damage = vec![DamagedStore {
            agent: 0,
            at_ms: 1_000,
            before: Ok(Vec::new()),
        }];
        let after = vec![Ok(vec![record()])];
        // In flight across the damage: the restarted agent created it.
        let v = tasks(&[asked(900, 1_600)], &after, &damage, markers.path(), 2_000);
        assert_eq!(v.outcome, Outcome::Valid, "{:?}", v.evidence);
        // Answered before the damage: it had to be in the store read before it.
        let v = tasks(&[asked(800, 900)], &after, &damage, markers.path(), 2_000);
        assert_eq!(v.outcome, Outcome::Invalid, "{:?}", v.evidence);
    }

    #[test]
    fn a_run_that_ended_on_the_host_may_be_aborted_only_when_its_keeper_lost_the_end() {
        let markers = tempfile::tempdir().expect("temp dir");
        std::fs::write(markers.path().join("once-30"), "start 7 100\nend 7 200\n")
            .expect("markers");
        let aborted = |end_lost| TaskRecord {
            status: i64::from(agent::tasks::model::status::ABORTED),
            next_run_ms: None,
            runs: vec![super::RunRecord {
                status: super::ABORTED,
                exit_code: None,
                end_lost,
            }],
            ..record()
        };
        let one_off = AskedTask {
            what: TaskShape::OneOff,
            ..asked(900, 1_000)
        };
        let v = tasks(
            std::slice::from_ref(&one_off),
            &[Ok(vec![aborted(true)])],
            &[],
            markers.path(),
            2_000,
        );
        assert_eq!(v.outcome, Outcome::Valid, "{:?}", v.evidence);
        let v = tasks(
            &[one_off],
            &[Ok(vec![aborted(false)])],
            &[],
            markers.path(),
            2_000,
        );
        assert_eq!(v.outcome, Outcome::Invalid, "{:?}", v.evidence);
    }
}

#[cfg(test)]
mod alert_tests {
    use super::{Notification, Outcome, alerts};

    #[test]
    fn the_alert_path_allows_one_duplicate_in_order_and_nothing_else() {
        let row = |id: i64, key: &str, delivered: bool| Notification {
            id,
            key: key.into(),
            created_ms: 1_000 * id,
            delivered_ms: delivered.then_some(1_000 * id + 10),
        };
        let outbox = [row(1, "a", true), row(2, "b", true), row(3, "c", false)];
        let took = |keys: &[&str]| -> Vec<(String, i64)> {
            keys.iter().map(|k| (k.to_string(), 0)).collect()
        };
        // "c" was made 1 s before the end: still within the delivery bound.
        let ok = alerts(&outbox, &took(&["a", "b", "b"]), 4_000);
        assert_eq!(ok.outcome, Outcome::Valid, "{:?}", ok.evidence);
        let twice_more = alerts(&outbox, &took(&["a", "b", "b", "b"]), 4_000);
        assert_eq!(twice_more.outcome, Outcome::Invalid);
        let reordered = alerts(&outbox, &took(&["b", "a"]), 4_000);
        assert!(
            reordered.evidence[0].contains("order"),
            "{:?}",
            reordered.evidence
        );
        let lost = alerts(&outbox, &took(&["a", "b"]), 200_000);
        assert!(
            lost.evidence[0].contains("never delivered"),
            "{:?}",
            lost.evidence
        );
        let phantom = alerts(&outbox, &took(&["a", "b", "z"]), 4_000);
        assert!(
            phantom.evidence[0].contains("no outbox row"),
            "{:?}",
            phantom.evidence
        );
        let unmarked = alerts(&outbox, &took(&["a"]), 4_000);
        assert!(
            unmarked.evidence[0].contains("never took it"),
            "{:?}",
            unmarked.evidence
        );
    }
}

/// Rollouts: every target host ran a rollout's command at most once, and its recorded outcome
/// agrees with its receipts (`ok`: it ran; never given or offline: it did not; a failed or
/// canceled run may have written before it was stopped).
pub fn rollouts(runs: &[RolloutRun], receipts: &BTreeMap<String, Vec<String>>) -> Verdict {
    let mut invalid = Vec::new();
    let mut unknown = Vec::new();
    let mut states = BTreeMap::<String, usize>::new();
    let mut hosts = BTreeMap::<String, usize>::new();
    for run in runs {
        let Some(id) = &run.id else {
            continue;
        };
        if run.hosts.is_empty() {
            unknown.push(format!(
                "rollout {} ({id}): no replica showed it",
                run.token
            ));
            continue;
        }
        *states.entry(run.state.clone()).or_default() += 1;
        for (host, state) in &run.hosts {
            *hosts.entry(state.clone()).or_default() += 1;
            let ran = receipts
                .get(host)
                .map_or(0, |r| r.iter().filter(|t| **t == run.token).count());
            if ran > 1 {
                invalid.push(format!(
                    "{host}: rollout {} ({id}) ran its command {ran} times",
                    run.token
                ));
            }
            match state.as_str() {
                "ok" if ran == 0 => invalid.push(format!(
                    "{host}: rollout {} ({id}) recorded ok without a receipt",
                    run.token
                )),
                "offline" | "not_started" | "refused_by_policy" if ran > 0 => {
                    invalid.push(format!(
                        "{host}: rollout {} ({id}) recorded {state} but the command ran",
                        run.token
                    ));
                }
                _ => {}
            }
        }
    }
    let accepted = runs.iter().filter(|r| r.id.is_some()).count();
    if accepted == 0 {
        unknown.push("no rollout was accepted".to_string());
    }
    Verdict::new(
        "rollouts: each host ran the command at most once, as recorded",
        format!(
            "{} rollouts asked for, {accepted} accepted; rollouts by state {states:?}; hosts by state {hosts:?}",
            runs.len()
        ),
        invalid,
        unknown,
    )
}
