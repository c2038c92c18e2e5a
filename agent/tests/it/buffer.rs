//! The metrics buffer through the real binary: corruption never blocks start-up.

use std::time::Duration;

use crate::harness::{Proc, agent_bin, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_over_the_buffer_is_quarantined_and_the_agent_starts_with_a_new_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("agent");
    let d = data.display().to_string();
    let start = |log: &str| {
        Proc::spawn(
            &agent_bin(),
            &["run", "--data-dir", &d],
            &dir.path().join(log),
        )
    };
    let stats = || -> serde_json::Value {
        let out = run(
            &agent_bin(),
            &["buffer", "stats", "--json", "--data-dir", &d],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let wait_for = |path: std::path::PathBuf| async move {
        for _ in 0..200 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} never appeared", path.display());
    };

    let missing = run(&agent_bin(), &["buffer", "stats", "--data-dir", &d]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no metrics buffer"));

    let mut agent = start("agent-1.log");
    wait_for(data.join("agent.sock")).await;
    let first = stats();
    for key in [
        "epoch",
        "rows",
        "size_bytes",
        "oldest_record_age_s",
        "utilization",
        "delivery_failures",
        "dropped_total",
    ] {
        assert!(first.get(key).is_some(), "stats lack {key}: {first}");
    }
    for reason in ["age", "size", "quarantine"] {
        assert_eq!(first["dropped_total"][reason], 0, "{first}");
    }
    assert!(
        run(&agent_bin(), &["buffer", "check", "--data-dir", &d])
            .status
            .success()
    );
    agent.signal("-TERM");
    agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent stops");

    std::fs::write(data.join("buffer.db"), vec![0x5a; 64 * 1024]).expect("garbage");
    let _ = std::fs::remove_file(data.join("buffer.db-wal"));
    let check = run(
        &agent_bin(),
        &["buffer", "check", "--json", "--data-dir", &d],
    );
    assert!(
        !check.status.success(),
        "a corrupt buffer must fail the check"
    );
    let verdict: serde_json::Value = serde_json::from_slice(&check.stdout).expect("json verdict");
    assert_eq!(verdict["ok"], false);

    let _agent = start("agent-2.log");
    wait_for(data.join("agent.sock")).await;
    let second = stats();
    assert_ne!(
        second["epoch"], first["epoch"],
        "a recreated buffer gets a new epoch"
    );
    let quarantined = std::fs::read_dir(&data)
        .expect("dir")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("buffer.db.corrupt-")
        });
    assert!(quarantined, "the bad file is kept aside for inspection");
    let log = std::fs::read_to_string(dir.path().join("agent-2.log")).unwrap_or_default();
    assert!(log.contains("quarantined"), "the event is reported: {log}");
}
