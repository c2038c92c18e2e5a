use std::collections::BTreeMap;

use super::{
    CancelError, Config, Effect, Found, MissedRuns, RescheduleError, Scheduler, SubmitError,
    TaskState,
};
use crate::tasks::model::{Kind, RunOutcome, Schedule, TaskSpec, status};

const S: i64 = 1000;

fn spec(kind: Kind, schedule: Schedule) -> TaskSpec {
    TaskSpec {
        kind,
        params: BTreeMap::new(),
        argv: vec!["true".into()],
        schedule,
        timeout_ms: 60 * S,
        key: "k".into(),
        window: None,
        critical: false,
    }
}

fn outcome(st: u32) -> RunOutcome {
    RunOutcome {
        status: st,
        exit_code: Some(if st == status::DONE { 0 } else { 1 }),
        error: None,
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}

fn dispatched(effects: &[Effect]) -> Vec<(String, i64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(job) => Some((job.task_id.clone(), job.run_id)),
            _ => None,
        })
        .collect()
}

fn status_of(s: &Scheduler, id: &str) -> &'static str {
    // Every look at a task also checks that the scheduler is consistent.
    s.debug_assert_invariants();
    status::name(s.task(id).expect("task").status)
}

#[test]
fn a_one_off_task_runs_once_when_due() {
    let mut s = Scheduler::new(Config::default());
    s.submit(
        0,
        "t1".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 5 * S }),
    )
    .expect("submit");
    assert_eq!(status_of(&s, "t1"), "scheduled");
    assert!(
        dispatched(&s.tick(4 * S)).is_empty(),
        "not before it is due"
    );
    let effects = s.tick(5 * S);
    assert_eq!(dispatched(&effects), vec![("t1".to_string(), 1)]);
    assert!(
        matches!(effects[0], Effect::SaveTask(ref t) if t.status == status::QUEUED),
        "persisted before dispatch"
    );
    assert_eq!(status_of(&s, "t1"), "queued");
    s.started("t1", 1);
    assert_eq!(status_of(&s, "t1"), "doing");
    let effects = s.finished(6 * S, "t1", 1, outcome(status::DONE));
    assert!(matches!(&effects[0], Effect::RunEnded { run_id: 1, .. }));
    assert_eq!(status_of(&s, "t1"), "done");
    assert!(dispatched(&s.tick(100 * S)).is_empty(), "never again");
}

#[test]
fn a_duplicate_signature_is_refused_and_named() {
    let mut s = Scheduler::new(Config::default());
    s.submit(
        0,
        "vac".into(),
        spec(Kind::Vacuum, Schedule::Once { at_ms: 0 }),
    )
    .expect("submit");
    let err = s
        .submit(
            0,
            "vac".into(),
            spec(Kind::Vacuum, Schedule::Once { at_ms: 0 }),
        )
        .expect_err("dup");
    assert_eq!(
        err,
        SubmitError::Duplicate {
            id: "vac".into(),
            status: "scheduled"
        }
    );
    assert!(err.to_string().contains("vac"));
}

#[test]
fn a_periodic_task_never_overlaps_itself() {
    let mut s = Scheduler::new(Config::default());
    s.submit(
        0,
        "hc".into(),
        spec(
            Kind::HealthCheck,
            Schedule::Every {
                interval_ms: 10 * S,
                first_ms: 0,
            },
        ),
    )
    .expect("submit");
    assert_eq!(dispatched(&s.tick(0)).len(), 1);
    s.started("hc", 1);
    for t in [10, 20] {
        assert!(
            dispatched(&s.tick(t * S)).is_empty(),
            "still running at {t}s: no second run"
        );
    }
    s.finished(25 * S, "hc", 1, outcome(status::DONE));
    let task = s.task("hc").expect("task").clone();
    assert_eq!(task.status, status::SCHEDULED);
    assert_eq!(
        task.next_run_ms,
        Some(30 * S),
        "next slot after the run, missed slots collapse"
    );
    assert_eq!(dispatched(&s.tick(30 * S)), vec![("hc".to_string(), 2)]);
}

#[test]
fn concurrency_is_capped_and_freed_slots_are_reused() {
    let mut s = Scheduler::new(Config {
        concurrency_max: 2,
        ..Config::default()
    });
    for i in 0..5 {
        s.submit(
            0,
            format!("t{i}"),
            spec(Kind::Command, Schedule::Once { at_ms: i }),
        )
        .expect("submit");
    }
    let first = dispatched(&s.tick(10));
    assert_eq!(
        first.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        vec!["t0", "t1"],
        "earliest first"
    );
    let next = dispatched(&s.finished(20, "t0", first[0].1, outcome(status::DONE)));
    assert_eq!(
        next.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        vec!["t2"]
    );
    assert_eq!(s.running(), 2);
}

/// With `dispatch_ahead`, as many runs again as there are slots are dispatched (they wait in
/// the pool), earliest first; a task with a window is never dispatched ahead, and what is due
/// after it waits behind it.
#[test]
fn runs_are_dispatched_ahead_except_windowed_ones() {
    let mut s = Scheduler::new(Config {
        concurrency_max: 2,
        dispatch_ahead: 2,
        ..Config::default()
    });
    let ms = |t: &str| t.parse::<jiff::Timestamp>().expect("ts").as_millisecond();
    // 02:40 Berlin on 1 June: inside the nightly window.
    let now = ms("2027-06-01T00:40:00Z");
    for i in 0..3 {
        s.submit(
            0,
            format!("t{i}"),
            spec(Kind::Command, Schedule::Once { at_ms: i }),
        )
        .expect("submit");
    }
    let mut windowed = windowed_every_10m("2027-06-01T00:00:00Z");
    windowed.schedule = Schedule::Once { at_ms: 3 };
    s.submit(0, "w".into(), windowed).expect("submit");
    s.submit(
        0,
        "t4".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 4 }),
    )
    .expect("submit");
    let first = dispatched(&s.tick(now));
    let names = |d: &[(String, i64)]| d.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&first),
        vec!["t0", "t1", "t2"],
        "the window holds the rest"
    );
    assert_eq!(
        s.next_due_ms(),
        None,
        "nothing to wake for while every slot is taken"
    );
    let next = dispatched(&s.finished(now, "t0", first[0].1, outcome(status::DONE)));
    assert!(next.is_empty(), "still no free slot: {next:?}");
    let next = dispatched(&s.tick(now));
    assert!(next.is_empty(), "still no free slot: {next:?}");
    let last = s.finished(now, "t1", first[1].1, outcome(status::DONE));
    assert_eq!(names(&dispatched(&last)), vec!["w", "t4"]);
    s.debug_assert_invariants();
}

#[test]
fn cancellation_of_scheduled_running_and_finished_tasks() {
    let mut s = Scheduler::new(Config::default());
    s.submit(
        0,
        "a".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 100 * S }),
    )
    .expect("submit");
    s.cancel("a").expect("cancel scheduled");
    assert_eq!(status_of(&s, "a"), "canceled");
    assert!(dispatched(&s.tick(200 * S)).is_empty());

    s.submit(
        0,
        "b".into(),
        spec(Kind::Vacuum, Schedule::Once { at_ms: 0 }),
    )
    .expect("submit");
    let run = dispatched(&s.tick(0))[0].1;
    s.started("b", run);
    let effects = s.cancel("b").expect("cancel running");
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Kill { run_id, .. } if *run_id == run))
    );
    // The pool reports the killed run as failed; cancellation wins, and no retry happens.
    let effects = s.finished(S, "b", run, outcome(status::FAILED));
    assert!(effects.iter().any(
        |e| matches!(e, Effect::RunEnded { outcome, .. } if outcome.status == status::CANCELED)
    ));
    assert_eq!(status_of(&s, "b"), "canceled");
    assert_eq!(
        s.cancel("b"),
        Err(CancelError::Finished {
            id: "b".into(),
            status: "canceled"
        })
    );
    assert_eq!(s.cancel("zzz"), Err(CancelError::Unknown("zzz".into())));
}

#[test]
fn only_idempotent_kinds_retry_and_retries_are_capped() {
    let mut s = Scheduler::new(Config {
        retries_max: 2,
        retry_base_ms: S,
        ..Config::default()
    });
    s.submit(
        0,
        "v".into(),
        spec(Kind::Vacuum, Schedule::Once { at_ms: 0 }),
    )
    .expect("submit");
    s.submit(
        0,
        "c".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 0 }),
    )
    .expect("submit");
    let runs = dispatched(&s.tick(0));
    for (task, run) in &runs {
        s.finished(10 * S, task, *run, outcome(status::FAILED));
    }
    assert_eq!(
        status_of(&s, "c"),
        "failed",
        "a command is not idempotent: no retry"
    );
    assert_eq!(
        s.task("v").expect("v").next_run_ms,
        Some(11 * S),
        "first retry after 1 s"
    );
    let r = dispatched(&s.tick(11 * S))[0].1;
    s.finished(12 * S, "v", r, outcome(status::FAILED));
    assert_eq!(
        s.task("v").expect("v").next_run_ms,
        Some(14 * S),
        "backoff doubles"
    );
    let r = dispatched(&s.tick(14 * S))[0].1;
    s.finished(15 * S, "v", r, outcome(status::FAILED));
    assert_eq!(status_of(&s, "v"), "failed", "capped at retries_max");
}

fn persisted(id: &str, kind: Kind, schedule: Schedule, st: u32, next: Option<i64>) -> TaskState {
    TaskState {
        id: id.into(),
        spec: spec(kind, schedule),
        status: st,
        next_run_ms: next,
        attempt: 0,
        created_ms: 0,
        cancel_requested: false,
    }
}

#[test]
fn recovery_adopts_live_runs_records_real_ends_and_reruns_what_never_started() {
    let mut s = Scheduler::new(Config {
        concurrency_max: 2,
        ..Config::default()
    });
    let every = Schedule::Every {
        interval_ms: 60 * S,
        first_ms: 0,
    };
    let once = || Schedule::Once { at_ms: 0 };
    let mut canceled = persisted("cancel", Kind::Command, once(), status::DOING, Some(0));
    canceled.cancel_requested = true;
    let tasks = vec![
        persisted("live", Kind::Command, every.clone(), status::DOING, Some(0)),
        persisted("ended", Kind::Command, once(), status::DOING, Some(0)),
        persisted("lost", Kind::Command, once(), status::DOING, Some(0)),
        persisted("vac", Kind::Vacuum, once(), status::DOING, Some(0)),
        persisted("queued", Kind::Command, once(), status::QUEUED, Some(0)),
        canceled,
        persisted(
            "future",
            Kind::Command,
            Schedule::Once {
                at_ms: 3 * 3600 * S,
            },
            status::SCHEDULED,
            Some(3 * 3600 * S),
        ),
    ];
    let aborted = RunOutcome {
        status: status::ABORTED,
        exit_code: None,
        error: Some("left no exit status".into()),
        output: Vec::new(),
        output_dropped_bytes: 0,
    };
    let effects = s.recover(
        100 * S,
        tasks,
        vec![
            (3, "live".into(), Found::Running),
            (4, "ended".into(), Found::Ended(outcome(status::FAILED))),
            (5, "lost".into(), Found::Ended(aborted.clone())),
            (6, "vac".into(), Found::Ended(aborted)),
            (7, "queued".into(), Found::NeverStarted),
            (8, "cancel".into(), Found::Running),
        ],
        9,
    );
    let ended: Vec<(i64, &'static str)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::RunEnded {
                run_id, outcome, ..
            } => Some((*run_id, status::name(outcome.status))),
            _ => None,
        })
        .collect();
    assert_eq!(
        ended,
        vec![(4, "failed"), (5, "aborted"), (6, "aborted")],
        "ended runs keep their real outcome; adopted ones are not ended"
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::RunWithdrawn { run_id: 7, .. })),
        "a run that never started is withdrawn, not recorded"
    );
    assert_eq!(status_of(&s, "live"), "doing", "a live run is adopted");
    assert_eq!(status_of(&s, "ended"), "failed", "its real outcome");
    assert_eq!(status_of(&s, "lost"), "aborted", "a command is not retried");
    assert_eq!(
        status_of(&s, "vac"),
        "scheduled",
        "an idempotent kind retries"
    );
    assert_eq!(
        s.task("queued").expect("t").next_run_ms,
        Some(100 * S),
        "a run that provably never started runs again at once"
    );
    let kills: Vec<i64> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Kill { run_id, .. } => Some(*run_id),
            _ => None,
        })
        .collect();
    assert_eq!(
        kills,
        vec![8],
        "a cancellation asked before the stop is carried out"
    );
    assert_eq!(s.running(), 2, "adopted runs hold their slots");
    assert!(
        dispatched(&s.tick(100 * S)).is_empty(),
        "no free slot: the adopted runs fill it"
    );
    assert!(
        dispatched(&s.tick(200 * S)).is_empty(),
        "the periodic task does not start again while its adopted run lives"
    );
    s.finish_one(201 * S, "cancel", 8, outcome(status::FAILED));
    assert_eq!(status_of(&s, "cancel"), "canceled");
    s.finish_one(202 * S, "live", 3, outcome(status::DONE));
    assert_eq!(
        s.task("live").expect("t").next_run_ms,
        Some(240 * S),
        "the periodic task keeps its schedule once the adopted run ends"
    );
    assert_eq!(status_of(&s, "future"), "scheduled");
    assert_eq!(
        s.task("future").expect("t").next_run_ms,
        Some(3 * 3600 * S),
        "future tasks stay intact"
    );
    let runs = dispatched(&s.tick(202 * S));
    assert!(
        runs.iter().any(|(t, _)| t == "queued"),
        "the never-started task runs: {runs:?}"
    );
    assert!(
        runs.iter().all(|(_, r)| *r >= 10),
        "new run ids continue: {runs:?}"
    );
}

#[test]
fn missed_runs_follow_the_policy() {
    let tasks = || {
        vec![
            persisted(
                "every",
                Kind::HealthCheck,
                Schedule::Every {
                    interval_ms: 60 * S,
                    first_ms: 0,
                },
                status::SCHEDULED,
                Some(60 * S),
            ),
            persisted(
                "once",
                Kind::Command,
                Schedule::Once { at_ms: 60 * S },
                status::SCHEDULED,
                Some(60 * S),
            ),
        ]
    };
    let mut run_once = Scheduler::new(Config::default());
    run_once.recover(1000 * S, tasks(), Vec::new(), 0);
    assert_eq!(
        dispatched(&run_once.tick(1000 * S)).len(),
        2,
        "each missed task runs once"
    );

    let mut skip = Scheduler::new(Config {
        missed: MissedRuns::Skip,
        ..Config::default()
    });
    skip.recover(1000 * S, tasks(), Vec::new(), 0);
    assert!(dispatched(&skip.tick(1000 * S)).is_empty());
    assert_eq!(skip.task("every").expect("t").next_run_ms, Some(1020 * S));
    assert_eq!(status_of(&skip, "once"), "aborted");
}

#[test]
fn signatures_of_ended_tasks_stay_taken_across_a_restart_until_purged() {
    let mut s = Scheduler::new(Config::default());
    s.remember_ended(vec![("old".into(), status::DONE)]);
    s.recover(0, Vec::new(), Vec::new(), 0);
    let err = s
        .submit(
            0,
            "old".into(),
            spec(Kind::Command, Schedule::Once { at_ms: 0 }),
        )
        .expect_err("taken");
    assert_eq!(
        err,
        SubmitError::Duplicate {
            id: "old".into(),
            status: "done"
        }
    );
    assert_eq!(
        s.cancel("old"),
        Err(CancelError::Finished {
            id: "old".into(),
            status: "done"
        })
    );
    s.forget(&["old".to_string()]);
    s.submit(
        0,
        "old".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 0 }),
    )
    .expect("free again after purge");
}

#[test]
fn rescheduling_moves_the_next_run_and_a_running_task_keeps_its_run() {
    let mut s = Scheduler::new(Config::default());
    s.submit(
        0,
        "a".into(),
        spec(Kind::Command, Schedule::Once { at_ms: 100 * S }),
    )
    .expect("submit");
    s.reschedule(0, "a", Schedule::Once { at_ms: 10 * S })
        .expect("reschedule");
    assert_eq!(s.task("a").expect("a").next_run_ms, Some(10 * S));
    assert!(dispatched(&s.tick(9 * S)).is_empty());
    let run = dispatched(&s.tick(10 * S))[0].1;
    s.started("a", run);
    // While it runs it becomes periodic: this run finishes, then the new schedule applies.
    s.reschedule(
        11 * S,
        "a",
        Schedule::Every {
            interval_ms: 60 * S,
            first_ms: 11 * S,
        },
    )
    .expect("reschedule running");
    assert_eq!(status_of(&s, "a"), "doing");
    s.finished(20 * S, "a", run, outcome(status::DONE));
    assert_eq!(status_of(&s, "a"), "scheduled");
    assert_eq!(s.task("a").expect("a").next_run_ms, Some(71 * S));
    s.cancel("a").expect("cancel");
    assert!(matches!(
        s.reschedule(0, "a", Schedule::Once { at_ms: 0 }),
        Err(RescheduleError::Finished { .. })
    ));
    assert!(matches!(
        s.reschedule(0, "zz", Schedule::Once { at_ms: 0 }),
        Err(RescheduleError::Unknown(_))
    ));
}

#[test]
fn the_invariant_check_names_what_is_inconsistent() {
    let mut s = Scheduler::new(Config::default());
    let id = "t_1".to_string();
    s.submit(
        100,
        id.clone(),
        spec(Kind::HealthCheck, Schedule::Once { at_ms: 100 }),
    )
    .expect("submitted");
    assert_eq!(s.invariant_violation(), None);
    let dispatched = dispatched(&s.tick(100));
    assert_eq!(dispatched.len(), 1);
    assert_eq!(s.invariant_violation(), None);
    // A second run for the same task, as a bug in recovery could make.
    s.running.insert(s.next_run_id, id.clone());
    s.next_run_id += 1;
    let violation = s.invariant_violation().expect("two runs of one task");
    assert!(violation.contains("two runs in flight"), "{violation}");
    s.running.clear();
    let violation = s.invariant_violation().expect("in flight with no run");
    assert!(violation.contains("no run in flight"), "{violation}");
}

/// Every tick of a minute for three days, each run ending a second after it starts: the
/// times runs were dispatched at.
fn dispatch_times(task: TaskSpec, from: &str, days: i64) -> Vec<String> {
    let ms = |s: &str| s.parse::<jiff::Timestamp>().expect("ts").as_millisecond();
    let mut s = Scheduler::new(Config::default());
    let start = ms(from);
    s.submit(start, "t".into(), task).expect("submit");
    let mut at = Vec::new();
    let mut now = start;
    while now < start + days * 86_400 * S {
        for (id, run) in dispatched(&s.tick(now)) {
            at.push(
                jiff::Timestamp::from_millisecond(now)
                    .expect("ts")
                    .to_string(),
            );
            s.started(&id, run);
            s.finished(now + S, &id, run, outcome(status::DONE));
        }
        s.debug_assert_invariants();
        now += 60 * S;
    }
    at
}

fn windowed_every_10m(first: &str) -> TaskSpec {
    let ms = |s: &str| s.parse::<jiff::Timestamp>().expect("ts").as_millisecond();
    TaskSpec {
        window: Some(crate::tasks::model::Window {
            name: "nightly".into(),
            cron: "30 2 * * *".into(),
            tz: "Europe/Berlin".into(),
            duration_ms: 3_600 * S,
            cutoff_ms: 600 * S,
            grace_ms: None,
        }),
        ..spec(
            Kind::Command,
            Schedule::Every {
                interval_ms: 600 * S,
                first_ms: ms(first),
            },
        )
    }
}

/// A task gated by a window (02:30 Berlin time for an hour, no start in its last 10 minutes)
/// over three days around each 2027 daylight-saving change, with nothing but the agent's own
/// scheduler (as when it is cut off from the control plane): runs start only inside the
/// window, slots missed outside it collapse into one run at its opening, the skipped 02:30 of
/// 28 March opens the window at 03:00, and the repeated 02:30 of 31 October opens it once.
#[test]
fn a_window_gated_task_starts_only_inside_its_window_across_daylight_saving() {
    let runs = |hours: &[&str]| -> Vec<String> { hours.iter().map(|h| h.to_string()).collect() };
    let spring = dispatch_times(
        windowed_every_10m("2027-03-26T12:00:00Z"),
        "2027-03-26T12:00:00Z",
        3,
    );
    assert_eq!(
        spring,
        runs(&[
            // 27 March, CET: 02:30 is 01:30Z; the 02:20Z slot is past the cutoff.
            "2027-03-27T01:30:00Z",
            "2027-03-27T01:40:00Z",
            "2027-03-27T01:50:00Z",
            "2027-03-27T02:00:00Z",
            "2027-03-27T02:10:00Z",
            // 28 March: 02:30 does not exist; the window opens at 03:00 CEST (01:00Z).
            "2027-03-28T01:00:00Z",
            "2027-03-28T01:10:00Z",
            "2027-03-28T01:20:00Z",
            "2027-03-28T01:30:00Z",
            "2027-03-28T01:40:00Z",
            // 29 March, CEST: 02:30 is 00:30Z.
            "2027-03-29T00:30:00Z",
            "2027-03-29T00:40:00Z",
            "2027-03-29T00:50:00Z",
            "2027-03-29T01:00:00Z",
            "2027-03-29T01:10:00Z",
        ])
    );
    let autumn = dispatch_times(
        windowed_every_10m("2027-10-29T12:00:00Z"),
        "2027-10-29T12:00:00Z",
        3,
    );
    assert_eq!(
        autumn,
        runs(&[
            "2027-10-30T00:30:00Z",
            "2027-10-30T00:40:00Z",
            "2027-10-30T00:50:00Z",
            "2027-10-30T01:00:00Z",
            "2027-10-30T01:10:00Z",
            // 31 October: 02:30 happens twice (CEST, then CET); the window opens once.
            "2027-10-31T00:30:00Z",
            "2027-10-31T00:40:00Z",
            "2027-10-31T00:50:00Z",
            "2027-10-31T01:00:00Z",
            "2027-10-31T01:10:00Z",
            // 1 November, CET: 02:30 is 01:30Z.
            "2027-11-01T01:30:00Z",
            "2027-11-01T01:40:00Z",
            "2027-11-01T01:50:00Z",
            "2027-11-01T02:00:00Z",
            "2027-11-01T02:10:00Z",
        ])
    );
}

/// A one-off task due outside its window waits for the opening; a run still going when the
/// window ends is reported, and with a grace its deadline is the window's end plus the grace.
#[test]
fn a_window_holds_a_due_run_and_bounds_one_that_overruns() {
    let ms = |s: &str| s.parse::<jiff::Timestamp>().expect("ts").as_millisecond();
    let mut task = windowed_every_10m("2027-01-10T12:00:00Z");
    task.schedule = Schedule::Once {
        at_ms: ms("2027-01-10T12:00:00Z"),
    };
    let mut graced = task.clone();
    graced.timeout_ms = 2 * 3_600 * S;
    if let Some(w) = graced.window.as_mut() {
        w.grace_ms = Some(300 * S);
    }
    let mut s = Scheduler::new(Config::default());
    s.submit(ms("2027-01-10T12:00:00Z"), "t".into(), task)
        .expect("submit");
    assert!(dispatched(&s.tick(ms("2027-01-10T12:00:00Z"))).is_empty());
    assert_eq!(
        s.task("t").and_then(|t| t.next_run_ms),
        Some(ms("2027-01-11T01:30:00Z")),
        "due again when the window opens (02:30 Berlin)"
    );
    let effects = s.tick(ms("2027-01-11T01:30:00Z"));
    assert_eq!(dispatched(&effects), vec![("t".to_string(), 1)]);
    s.started("t", 1);
    let ended = s.finished(ms("2027-01-11T02:35:00Z"), "t", 1, outcome(status::DONE));
    let Effect::RunEnded { outcome: o, .. } = &ended[0] else {
        panic!("{ended:?}")
    };
    assert_eq!(o.status, status::DONE);
    assert_eq!(
        o.error.as_deref(),
        Some("ran 5m past the end of window \"nightly\"")
    );
    // With a 5-minute grace, a run started 10 minutes into the window gets at most the 55
    // minutes left to the end plus the grace.
    let mut s = Scheduler::new(Config::default());
    s.submit(ms("2027-01-11T01:40:00Z"), "g".into(), graced)
        .expect("submit");
    let effects = s.tick(ms("2027-01-11T01:40:00Z"));
    let job = effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(job) => Some(job.clone()),
            _ => None,
        })
        .expect("dispatched inside the window");
    assert_eq!(job.spec.timeout_ms, 55 * 60 * S);
}
