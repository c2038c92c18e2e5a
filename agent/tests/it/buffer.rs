//! The metrics buffer through the real binary: corruption never blocks start-up.

use fixtures::poll::{until, until_true};
use std::time::Duration;

use crate::harness::{ControlPlane, Proc, agent_bin, run};

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
        let appeared = until_true(
            Duration::from_secs(5),
            Duration::from_millis(25),
            || async { path.exists() },
        )
        .await;
        assert!(appeared, "{} never appeared", path.display());
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
    for reason in ["age", "size", "quarantine", "too_large"] {
        assert_eq!(first["dropped_total"][reason], 0, "{first}");
    }
    // `buffer stats --json` is a stable interface: a change is a snapshot diff.
    insta::assert_json_snapshot!("buffer_stats_json", first, {
        ".epoch" => "[epoch]",
        ".size_bytes" => "[bytes]",
        ".utilization" => "[fraction]",
    });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_survive_killed_processes_during_an_outage_and_arrive_exactly_once() {
    use http::Method;
    let pg = fixtures::Postgres::start().await.expect("postgres fixture");
    let mut cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("agent").display().to_string();
    cp.enroll_agent("db1", &d);
    let url = pg.url();
    let start = |n: u32| {
        Proc::spawn(
            &agent_bin(),
            &["run", "--data-dir", &d, "--postgres", &url],
            &dir.path().join(format!("agent-{n}.log")),
        )
    };
    let buffered = || -> i64 {
        let out = run(
            &agent_bin(),
            &["buffer", "stats", "--json", "--data-dir", &d],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v["rows"].as_i64().unwrap_or(-1))
            .unwrap_or(-1)
    };
    let mut agent = start(1);
    let first = until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { cp.metrics("from=0").await.filter(|m| !m.is_empty()) },
    )
    .await
    .unwrap_or_default();
    let kinds: std::collections::BTreeSet<String> = first
        .iter()
        .filter_map(|m| m["type"].as_str().map(str::to_string))
        .collect();
    for kind in [
        "pg_stat_database",
        "bgwriter",
        "activity",
        "locks",
        "database_size",
        "xid_age",
        "connections",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    // Ingest keeps the server's summary on the agent's row for the fleet page's ranking.
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let agents: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let xid = &agents[0]["health"]["xid_age"];
    assert!(
        xid["age"].as_i64().is_some_and(|a| a > 0) && xid["database"].is_string(),
        "{agents}"
    );
    assert!(
        agents[0]["health"]["replication"]["standbys"] == 0,
        "a server without standbys: {agents}"
    );
    let connections = &agents[0]["health"]["connections"];
    assert!(
        connections["used"].as_i64().is_some_and(|n| n >= 1)
            && connections["max"].as_i64().is_some_and(|n| n > 1),
        "the agent's own connection against max_connections: {agents}"
    );

    // Outage: the control plane dies, then the agent dies twice; each start collects once.
    cp.proc
        .take()
        .expect("running")
        .0
        .kill()
        .expect("kill -9 control plane");
    for round in 2..4 {
        let before = buffered();
        agent.0.kill().expect("kill -9 agent");
        let _ = agent.0.wait();
        agent = start(round);
        let buffered = &buffered;
        until_true(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move { buffered() > before },
        )
        .await;
        assert!(
            buffered() > before,
            "round {round}: the restarted agent buffers while the control plane is down"
        );
    }
    let held = buffered();

    cp.launch();
    cp.wait_healthy().await;
    until_true(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { buffered() == 0 },
    )
    .await;
    assert_eq!(
        buffered(),
        0,
        "the backlog drains once the control plane is back"
    );
    let all = cp.metrics("from=0").await.expect("metrics");
    // What was delivered before the outage may still be in the buffer too (stored, but the
    // control plane died before the agent committed its acknowledgement): it is delivered
    // again and deduplicated, so the store holds at least each part, and the sequence check
    // below proves nothing is missing or doubled.
    assert!(
        all.len() as i64 >= held.max(first.len() as i64),
        "{} stored, {} before, {held} held",
        all.len(),
        first.len()
    );
    let mut by_epoch: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for m in &all {
        by_epoch
            .entry(m["epoch"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(m["seq"].as_i64().unwrap_or(0));
    }
    assert_eq!(by_epoch.len(), 1, "one buffer, one epoch");
    // Every heartbeat carries the buffer's figures; the fleet list shows them.
    let epoch = by_epoch.keys().next().cloned().unwrap_or_default();
    let buffer_shown = || async {
        let r = cp.api(Method::GET, "/api/v1/agents", None).await?;
        serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .map(|v| v[0]["buffer"].clone())
    };
    let caught_up = until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            buffer_shown()
                .await
                .filter(|b| b["epoch"] == epoch.as_str() && b["rows"] == 0)
        },
    )
    .await;
    let shown = match caught_up {
        Some(shown) => shown,
        None => buffer_shown().await.unwrap_or_default(),
    };
    assert_eq!(shown["epoch"], epoch.as_str(), "{shown}");
    for key in [
        "size_bytes",
        "oldest_record_age_s",
        "utilization",
        "delivery_failures",
        "dropped_total",
    ] {
        assert!(
            shown.get(key).is_some(),
            "buffer figures lack {key}: {shown}"
        );
    }
    for seqs in by_epoch.values_mut() {
        seqs.sort_unstable();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(
            *seqs, expected,
            "contiguous seq, nothing twice, nothing lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_record_age_max_drops_and_counts_what_an_outage_made_stale() {
    let pg = fixtures::Postgres::start().await.expect("postgres fixture");
    let mut cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("agent").display().to_string();
    cp.enroll_agent("db1", &d);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[metrics]\nrecord_age_max = \"3s\"\nbuffer_bytes_max = \"2MiB\"\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let url = pg.url();
    let start = |n: u32| {
        Proc::spawn(
            &agent_bin(),
            &[
                "run",
                "--config",
                &config,
                "--data-dir",
                &d,
                "--postgres",
                &url,
            ],
            &dir.path().join(format!("agent-{n}.log")),
        )
    };
    let stats = || -> serde_json::Value {
        let out = run(
            &agent_bin(),
            &["buffer", "stats", "--json", "--data-dir", &d],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let world = world::World::real();

    let mut agent = start(1);
    let delivered = until_true(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { cp.metrics("from=0").await.is_some_and(|m| !m.is_empty()) },
    )
    .await;
    assert!(delivered, "metrics flow before the outage");
    let s = stats();
    let expected = s["size_bytes"].as_f64().unwrap_or(0.0) / (2u64 << 20) as f64;
    assert!(
        expected > 0.0 && (s["utilization"].as_f64().unwrap_or(0.0) - expected).abs() < 1e-9,
        "`buffer stats` measures utilization against the configured 2MiB: {s}"
    );

    // Outage: the control plane dies; a restarted agent collects into its buffer.
    cp.proc
        .take()
        .expect("running")
        .0
        .kill()
        .expect("kill -9 control plane");
    let outage_from = world.now_unix_ms();
    agent.0.kill().expect("kill -9 agent");
    let _ = agent.0.wait();
    agent = start(2);
    let stats = &stats;
    let held = until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async move { Some(stats()["rows"].as_i64().unwrap_or(0)).filter(|&rows| rows > 0) },
    )
    .await
    .unwrap_or(0);
    assert!(held > 0, "the agent buffers during the outage");
    // Longer than record_age_max.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stale_before = world.now_unix_ms() - 3_000;
    cp.launch();
    cp.wait_healthy().await;
    let emptied = until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move {
            let s = stats();
            (s["rows"] == 0 && s["dropped_total"]["age"].as_i64().unwrap_or(0) >= held).then_some(s)
        },
    )
    .await;
    let s = emptied.unwrap_or_else(stats);
    assert_eq!(s["rows"], 0, "the buffer empties: {s}");
    assert!(
        s["dropped_total"]["age"].as_i64().unwrap_or(0) >= held,
        "the {held} stale rows are counted as dropped by age: {s}"
    );
    let in_gap = cp
        .metrics(&format!("from={outage_from}&to={stale_before}"))
        .await
        .expect("metrics");
    assert!(
        in_gap.is_empty(),
        "nothing collected during the outage was stored; the outage is a gap: {in_gap:?}"
    );
    drop(agent);
}
