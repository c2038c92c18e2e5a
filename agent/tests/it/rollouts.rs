//! Rollouts over real agents: `outpost serve` drives a task over enrolled `outpost-agent`
//! processes in waves (canary, approval, the error budget, a fix and retry-failed, abort).

use std::path::Path;
use std::time::Duration;

use fixtures::poll::until;

use crate::harness::ControlPlane;
use crate::tasks::Agent;

/// The rollout as the API shows it, once `done(rollout)` holds (40 s at most).
async fn wait_rollout(
    cp: &ControlPlane,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let path = format!("/api/v1/rollouts/{id}");
    let read = || async {
        let r = cp.api(http::Method::GET, &path, None).await?;
        serde_json::from_slice::<serde_json::Value>(&r.body).ok()
    };
    let found = until(
        Duration::from_secs(40),
        Duration::from_millis(200),
        || async { read().await.filter(|v| done(v)) },
    )
    .await;
    match found {
        Some(v) => v,
        None => panic!(
            "rollout {id} never {what}: {:#}",
            read().await.unwrap_or_default()
        ),
    }
}

fn host<'a>(v: &'a serde_json::Value, agent: &str) -> &'a serde_json::Value {
    v["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["agent"] == agent))
        .unwrap_or_else(|| panic!("no host {agent}: {v}"))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Five agents, a canary wave of one then the rest, no failure tolerated, approval after the
/// canary. One host refuses command tasks (its `[tasks] remote_kinds`): the rollout halts with
/// the hosts already given the task running to their end; once the host allows it,
/// retry-failed runs it there and the rollout ends done; every host ran the command exactly
/// once. Then a rollout of a slower command is aborted while it runs: the commands finish and
/// are recorded, nothing else starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_runs_in_waves_halts_on_its_budget_and_a_retry_after_the_fix_finishes_it() {
    let cp = ControlPlane::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let allowed = tmp.path().join("allowed.toml");
    std::fs::write(&allowed, "[tasks]\nrun_as = \"root\"\n").expect("config");
    let refusing = tmp.path().join("refusing.toml");
    std::fs::write(
        &refusing,
        "[tasks]\nrun_as = \"root\"\nremote_kinds = [\"health_check\"]\n",
    )
    .expect("config");
    let mut agents = Vec::new();
    for i in 1..=5 {
        let config = if i == 3 { &refusing } else { &allowed };
        agents.push(Agent::online(&cp, &format!("db{i}"), config).await);
    }
    let ledger = tmp.path().join("ledger");
    let script = format!("echo ran >> {}", ledger.display());
    let (status, body) = cp
        .post(
            "/api/v1/rollouts",
            serde_json::json!({
                "name": "ledger",
                "agents": ["db*"],
                "waves": [1, "100%"],
                "soak": "1s",
                "approve_after_canary": true,
                "task": {"kind": "command", "argv": ["sh", "-c", script]},
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["plan"]["waves"][0]["hosts"][0]["agent"], "db1");

    let v = wait_rollout(&cp, &id, "awaited approval", |v| {
        v["state"] == "awaiting_approval"
    })
    .await;
    assert_eq!(host(&v, "db1")["state"], "ok", "{v}");
    assert_eq!(host(&v, "db2")["state"], "pending", "{v}");
    assert_eq!(lines(&ledger), 1, "only the canary ran");
    let (status, body) = cp
        .post(
            &format!("/api/v1/rollouts/{id}/resume"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 409, "resume is not approve: {body}");
    // Approved in the browser: the Rollouts page shows waves × hosts and the controls.
    cp.page_test("rollouts.mjs", "rollouts", &[]);

    let v = wait_rollout(&cp, &id, "halted with its wave ended", |v| {
        v["state"] == "halted" && v["counts"]["dispatched"].is_null()
    })
    .await;
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("wave 2: 1 hosts failed, more than the 0 tolerated"),
        "{v}"
    );
    let refused = host(&v, "db3");
    assert_eq!(refused["state"], "refused_by_policy", "{v}");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap_or("")
            .contains("remote_kinds"),
        "{v}"
    );
    assert_eq!(
        lines(&ledger),
        4,
        "the hosts given the task before the halt ran it"
    );

    // The fix: db3 allows command tasks; retry-failed runs it there only.
    let db3 = &mut agents[2];
    db3.kill_9();
    std::fs::copy(&allowed, &refusing).expect("config");
    db3.launch().await;
    cp.wait_status("db3", "online", Duration::from_secs(10))
        .await;
    let (status, body) = cp
        .post(
            &format!("/api/v1/rollouts/{id}/retry-failed"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v = wait_rollout(&cp, &id, "ended done", |v| v["state"] == "done").await;
    assert_eq!(v["counts"]["ok"], 5, "{v}");
    assert_eq!(host(&v, "db3")["attempt"], 1, "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lines(&ledger), 5, "every host ran the command exactly once");

    // An abort while the commands run leaves them alone; nothing more starts.
    let slow = tmp.path().join("slow");
    let script = format!("sleep 3; echo ran >> {}", slow.display());
    let (status, body) = cp
        .post(
            "/api/v1/rollouts",
            serde_json::json!({
                "name": "slow",
                "agents": ["db*"],
                "waves": [2, "100%"],
                "task": {"kind": "command", "argv": ["sh", "-c", script]},
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_rollout(&cp, &id, "dispatched its first wave", |v| {
        v["counts"]["dispatched"] == 2
    })
    .await;
    let (status, body) = cp
        .post(
            &format!("/api/v1/rollouts/{id}/abort"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v = wait_rollout(&cp, &id, "collected the aborted wave's outcomes", |v| {
        v["counts"]["ok"] == 2
    })
    .await;
    assert_eq!(v["state"], "aborted", "{v}");
    assert_eq!(v["counts"]["not_started"], 3, "{v}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        lines(&slow),
        2,
        "the running commands finished; no other host started"
    );
    let audit = cp
        .api(
            http::Method::GET,
            "/api/v1/audit?action=rollout.controlled",
            None,
        )
        .await
        .expect("audit");
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    assert_eq!(
        audit.as_array().map(Vec::len),
        Some(3),
        "approve (in the browser), retry-failed, abort: {audit}"
    );
}

/// The health gate after a wave: a task of the canary's own that fails after the rollout's
/// task was given to it (here a command due a few seconds later) halts the rollout at the
/// gate, naming the host and the task; the next wave never starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_on_the_canary_after_the_change_halts_the_rollout_at_its_gate() {
    let cp = ControlPlane::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[tasks]\nrun_as = \"root\"\n").expect("config");
    let _db1 = Agent::online(&cp, "db1", &config).await;
    let _db2 = Agent::online(&cp, "db2", &config).await;
    let listed = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("list");
    let listed: serde_json::Value = serde_json::from_slice(&listed.body).expect("json");
    let db1 = listed
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "db1"))
        .and_then(|a| a["id"].as_str())
        .expect("db1's id")
        .to_string();
    let (status, body) = cp
        .post(
            &format!("/api/v1/agents/{db1}/tasks"),
            serde_json::json!({"kind": "command", "argv": ["false"], "in": "4s", "key": "nightly-check"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp
        .post(
            "/api/v1/rollouts",
            serde_json::json!({
                "name": "gated",
                "agents": ["db*"],
                "waves": [1, "100%"],
                "soak": "8s",
                "gate_wait": "0s",
                "task": {"kind": "command", "argv": ["true"]},
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let v = wait_rollout(&cp, &id, "halted at its gate", |v| v["state"] == "halted").await;
    let reason = v["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("health gate after wave 1")
            && reason.contains("db1: its task nightly-check (command) failed since the change"),
        "{v}"
    );
    assert_eq!(host(&v, "db1")["state"], "ok", "{v}");
    assert_eq!(host(&v, "db2")["state"], "not_started", "{v}");
}
