//! `outpost exec` and `outpost exec status`, the real binary against a real sshd.

use std::path::{Path, PathBuf};
use std::process::Output;

fn outpost() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outpost"))
}

fn inventory(dir: &Path, sshd: &fixtures::Sshd, refused_port: u16) -> PathBuf {
    let text = format!(
        r#"
[defaults]
user = "{user}"
identity_file = "{key}"
known_hosts = "{kh}"

[[hosts]]
name = "db1"
address = "127.0.0.1"
port = {port}
groups = ["primary"]

[[hosts]]
name = "db2"
address = "127.0.0.1"
port = {refused_port}
groups = ["replica"]
"#,
        user = sshd.user(),
        key = sshd.client_key().display(),
        kh = sshd.known_hosts().display(),
        port = sshd.port(),
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, text).expect("write inventory");
    path
}

fn run(args: &[&str]) -> Output {
    std::process::Command::new(outpost())
        .args(args)
        .output()
        .expect("run outpost")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A real sshd and an inventory with db1 (that sshd) and db2 (a refused port).
async fn setup() -> (fixtures::Sshd, tempfile::TempDir, String) {
    let sshd = fixtures::Sshd::start().await.expect("start sshd");
    let dir = tempfile::tempdir().expect("temp dir");
    let inv = inventory(dir.path(), &sshd, refused_port());
    let inv = inv.to_str().expect("utf-8 path").to_string();
    (sshd, dir, inv)
}

fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn exec_json_reports_each_host_and_status_reconciles_the_run() {
    let (_sshd, _dir, inv) = setup().await;
    let inv_s = inv.as_str();
    let out = run(&[
        "exec",
        "--inventory",
        inv_s,
        "--json",
        "--connect-timeout",
        "2s",
        "--",
        "printf",
        "%s\\n",
        "a b",
        "$(id)",
    ]);
    assert_eq!(out.status.code(), Some(1), "one host failed");
    let doc = json(&out);
    // The `--json` shape is a stable interface: a change shows up as a snapshot diff.
    insta::assert_json_snapshot!("exec_json", doc, {
        ".op_id" => "[op_id]",
        ".hosts[].duration_ms" => "[ms]",
        ".hosts[1].error" => "[why db2 did not start]",
        ".summary.duration_ms" => "[ms]",
    });
    let op_id = doc["op_id"].as_str().expect("op_id").to_string();
    let hosts = doc["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0]["host"], "db1");
    assert_eq!(hosts[0]["outcome"], "ok");
    assert_eq!(hosts[0]["exit_code"], 0);
    assert_eq!(hosts[0]["stdout"], "a b\n$(id)\n");
    assert!(hosts[0]["duration_ms"].is_u64());
    assert_eq!(hosts[1]["host"], "db2");
    assert_eq!(hosts[1]["outcome"], "not_started");
    assert!(
        hosts[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{doc}"
    );
    assert_eq!(hosts[1]["attempts"], 3, "not_started is retried");
    assert_eq!(doc["summary"]["ok"], 1);
    assert_eq!(doc["summary"]["not_started"], 1);

    let out = run(&[
        "exec",
        "status",
        &op_id,
        "--inventory",
        inv_s,
        "--hosts",
        "db1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = json(&out);
    assert_eq!(doc["hosts"][0]["status"], "finished");
    assert_eq!(doc["hosts"][0]["exit_code"], 0);
}

#[tokio::test]
async fn exec_prints_a_table_and_a_summary_and_refuses_bad_input() {
    let (_sshd, _dir, inv) = setup().await;
    let inv_s = inv.as_str();
    let out = run(&[
        "exec",
        "--inventory",
        inv_s,
        "--hosts",
        "@primary",
        "--raw",
        "--",
        "echo one | tr o O; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("db1  command_failed exit 4"), "{text}");
    assert!(text.contains("  | One"), "{text}");
    assert!(text.contains("1 hosts in"), "{text}");
    assert!(!text.contains("db2"), "{text}");

    for (args, needle) in [
        (
            vec!["exec", "--inventory", inv_s],
            "give the command after `--`",
        ),
        (vec!["exec", "--", "ls"], "--inventory FILE is required"),
        (
            vec!["exec", "--inventory", inv_s, "--hosts", "nope", "--", "ls"],
            "selects no host",
        ),
        (
            vec![
                "exec",
                "--inventory",
                inv_s,
                "--max-errors",
                "200%",
                "--",
                "ls",
            ],
            "0% to 100%",
        ),
        (
            vec![
                "exec",
                "--inventory",
                inv_s,
                "--idle-timeout",
                "soon",
                "--",
                "ls",
            ],
            "--idle-timeout",
        ),
        (
            vec!["exec", "status", "BAD/ID", "--inventory", inv_s],
            "operation id",
        ),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// The web UI's exec: started through the API, followed by polling, output per host,
/// classified outcomes, audited; refused without an inventory and for viewers.
#[tokio::test]
async fn exec_through_the_api_streams_per_host_results_and_is_audited() {
    use control_plane::auth::Role;
    use http::{Method, StatusCode};

    let (_sshd, _dir, inv) = setup().await;
    let bare = crate::harness::Server::start().await;
    let token = bare.token_for("ops", Role::Operator).await;
    let body = r#"{"argv":["echo","hello"]}"#;
    let r = bare
        .request(Method::POST, "/api/v1/exec", Some(&token), body)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "no inventory configured");
    assert!(String::from_utf8_lossy(&r.body).contains("--inventory"));
    bare.stop().await;

    let server = crate::harness::Server::start_with(control_plane::settings::Settings {
        inventory: Some(inv.into()),
        ..crate::harness::fast_settings()
    })
    .await;
    let operator = server.token_for("ops", Role::Operator).await;
    let viewer = server.token_for("look", Role::Viewer).await;
    let admin = server.token_for("boss", Role::Admin).await;
    let r = server
        .request(Method::POST, "/api/v1/exec", Some(&viewer), body)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = server
        .request(
            Method::POST,
            "/api/v1/exec",
            Some(&operator),
            r#"{"hosts":"nothing*","argv":["true"]}"#,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "a selection that matches nothing"
    );

    let r = server
        .request(
            Method::POST,
            "/api/v1/exec",
            Some(&operator),
            r#"{"argv":["sh","-c","echo out-$0; echo err-$0 >&2; exit 3","it's"]}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let started: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(started["hosts"], 2);
    let op_id = started["op_id"].as_str().expect("op_id").to_string();
    let finished = fixtures::poll::until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(100),
        || async {
            let r = server
                .request(
                    Method::GET,
                    &format!("/api/v1/exec/{op_id}"),
                    Some(&operator),
                    "",
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
            let view: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
            (view["finished"] == true).then_some(view)
        },
    )
    .await;
    let view = finished.expect("the exec run finishes within 60 s");
    let hosts = view["hosts"].as_array().expect("hosts");
    let db1 = hosts.iter().find(|h| h["host"] == "db1").expect("db1");
    assert_eq!(db1["outcome"], "command_failed");
    assert_eq!(db1["exit_code"], 3);
    assert_eq!(db1["stdout"], "out-it's\n", "the argument arrived intact");
    assert_eq!(db1["stderr"], "err-it's\n");
    let db2 = hosts.iter().find(|h| h["host"] == "db2").expect("db2");
    assert_eq!(db2["outcome"], "not_started");
    assert!(db2["error"].as_str().is_some_and(|e| !e.is_empty()));

    let r = server
        .request(Method::GET, "/api/v1/exec/op_unknown", Some(&operator), "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = server
        .request(
            Method::GET,
            "/api/v1/audit?action=exec.run",
            Some(&admin),
            "",
        )
        .await;
    let audit: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(audit[0]["actor"], "ops");
    assert_eq!(audit[0]["target"], op_id.as_str());
    assert_eq!(audit[0]["detail"]["host_count"], 2);
    let r = server
        .request(
            Method::GET,
            "/api/v1/audit?action=exec.finished",
            Some(&admin),
            "",
        )
        .await;
    let audit: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(audit[0]["detail"]["outcomes"]["command_failed"], 1);
    server.stop().await;
}

/// The exec page in headless Chromium: output shows while the command runs, then outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_page_shows_output_live_and_outcomes_per_host() {
    use control_plane::auth::Role;
    let (_sshd, _dir, inv) = setup().await;
    let server = crate::harness::Server::start_with(control_plane::settings::Settings {
        inventory: Some(inv.into()),
        ..crate::harness::fast_settings()
    })
    .await;
    server.token_for("ops", Role::Operator).await;
    let url = server.base.to_string();
    let shots = fixtures::browser::screenshots_dir("exec");
    // The server runs on the other worker thread while node drives the page.
    let run = tokio::task::block_in_place(|| {
        fixtures::browser::run_script(
            "exec.mjs",
            &[
                ("OUTPOST_URL", url.as_str()),
                ("OUTPOST_USER", "ops"),
                ("OUTPOST_PASSWORD", "a-long-enough-password"),
            ],
            &shots,
        )
    });
    if let Err(e) = run {
        panic!("{e:#}");
    }
    server.stop().await;
}

/// Exec runs are in storage as they happen: a second replica shows a run's live output while
/// the first runs it, and after the first is killed with kill -9 the run reads as abandoned,
/// its unfinished host `uncertain` with the way to its receipt, from the replica that is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_run_outlives_the_replica_that_ran_it() {
    use control_plane::auth::Role;
    use http::{Method, StatusCode};
    let (_sshd, _dir, inv) = setup().await;
    let mut pair =
        crate::harness::Pair::start("exec_takeover", &["--inventory", &inv], Role::Operator).await;
    let (first, second) = (pair.server(0).await, pair.server(1).await);
    let token = pair.token.clone();
    let r = first
        .request(
            Method::POST,
            "/api/v1/exec",
            Some(&token),
            r#"{"argv":["sh","-c","echo begun; sleep 120"]}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let started: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let path = format!("/api/v1/exec/{}", started["op_id"].as_str().expect("op_id"));
    let view_on_second = || async {
        let r = second.request(Method::GET, &path, Some(&token), "").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")
    };
    let host = |view: &serde_json::Value, name: &str| {
        view["hosts"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["host"] == name).cloned())
            .unwrap_or_default()
    };
    let live = fixtures::poll::until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        || async {
            let view = view_on_second().await;
            (host(&view, "db1")["stdout"] == "begun\n"
                && host(&view, "db2")["outcome"] == "not_started")
                .then_some(view)
        },
    )
    .await;
    let live = match live {
        Some(live) => live,
        None => panic!(
            "the other replica shows the run's output while it runs: {}",
            view_on_second().await
        ),
    };
    assert_eq!(live["finished"], false, "{live}");
    assert_eq!(host(&live, "db1")["outcome"], serde_json::Value::Null);

    pair.replicas[0]
        .kill()
        .expect("kill -9 the replica running it");
    let _ = pair.replicas[0].wait();
    let abandoned = fixtures::poll::until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(500),
        || async {
            let view = view_on_second().await;
            (view["finished"] == true).then_some(view)
        },
    )
    .await
    .expect("the run reads as ended once its replica stopped writing");
    assert_eq!(abandoned["abandoned"], true, "{abandoned}");
    let db1 = host(&abandoned, "db1");
    assert_eq!(db1["outcome"], "uncertain", "{db1}");
    assert_eq!(db1["stdout"], "begun\n", "{db1}");
    assert!(
        db1["error"]
            .as_str()
            .is_some_and(|e| e.contains("outpost exec status")),
        "{db1}"
    );
    assert_eq!(host(&abandoned, "db2")["outcome"], "not_started");
}

/// A rollout's dry run, through the API and `outpost rollout plan`: the waves it makes of the
/// agents its selector picks (replicas first), the failure that halts each, and refusals that
/// name the field; viewers may not ask.
#[tokio::test]
async fn a_rollout_dry_run_shows_its_waves_through_the_api_and_the_cli() {
    use control_plane::auth::Role;
    use http::{Method, StatusCode};
    let server = crate::harness::Server::start().await;
    let operator = server.token_for("ops", Role::Operator).await;
    let viewer = server.token_for("look", Role::Viewer).await;
    for i in 0..12 {
        let (id, _) = server.enroll(&format!("db{i:02}")).await;
        let role = if i % 3 == 0 { "primary" } else { "replica" };
        let labels = format!(r#"{{"env":"prod","role":"{role}"}}"#);
        server
            .storage
            .set_agent_labels(&id, Some(labels))
            .await
            .expect("labels");
    }
    server.enroll("web1").await;
    let spec = serde_json::json!({
        "name": "minor-upgrade", "agents": ["env=prod"], "waves": [1, "10%", "100%"],
        "max_errors": "20%", "replicas_first": true,
        "task": {"kind": "command", "argv": ["/usr/local/bin/upgrade-minor"]},
    });
    let r = server
        .request(
            Method::POST,
            "/api/v1/rollouts/dry-run",
            Some(&viewer),
            spec.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = server
        .request(
            Method::POST,
            "/api/v1/rollouts/dry-run",
            Some(&operator),
            spec.to_string(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let plan: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let waves = plan["waves"].as_array().expect("waves");
    let sizes: Vec<usize> = waves
        .iter()
        .map(|w| w["hosts"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, [1, 2, 9], "{plan}");
    assert_eq!(plan["targets"], 12, "web1 is not selected");
    assert_eq!(waves[0]["hosts"][0]["role"], "replica", "replicas first");
    assert_eq!(waves[2]["errors_tolerated"], 1, "20 % of 9, rounded down");
    let mut bad = spec.clone();
    bad["waves"] = serde_json::json!(["150%"]);
    let r = server
        .request(
            Method::POST,
            "/api/v1/rollouts/dry-run",
            Some(&operator),
            bad.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("waves:"));

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("rollout.toml");
    std::fs::write(
        &file,
        "name = \"minor-upgrade\"\nagents = [\"env=prod\"]\nwaves = [1, \"10%\", \"100%\"]\nmax_errors = 1\n[task]\nkind = \"command\"\nargv = [\"/usr/local/bin/upgrade-minor\"]\n",
    )
    .expect("rollout file");
    let data_dir = server.data_dir().display().to_string();
    let file_s = file.display().to_string();
    let out = run(&["rollout", "plan", "-f", &file_s, "--data-dir", &data_dir]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("rollout minor-upgrade: 12 agents in 3 waves, at most 10 at once\n"),
        "{text}"
    );
    assert!(
        text.contains("wave 3: 9 hosts; halts at failure 2: "),
        "{text}"
    );
    let out = run(&[
        "rollout",
        "plan",
        "-f",
        &file_s,
        "--data-dir",
        &data_dir,
        "--json",
    ]);
    assert_eq!(json(&out)["targets"], 12);
    std::fs::write(&file, "name = \"x\"\nagents = [\"*\"]\n").expect("rollout file");
    let out = run(&["rollout", "plan", "-f", &file_s, "--data-dir", &data_dir]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("task"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

/// A rollout is driven by one replica under its lease; killed with -9, the other replica
/// takes the lease over and finishes the rollout (here: two offline agents waited for until
/// the offline deadline, then reported offline), and the driver's end is in the audit log.
#[tokio::test]
async fn a_rollout_goes_on_when_the_replica_driving_it_is_killed() {
    use control_plane::auth::Role;
    use http::{Method, StatusCode};
    let mut pair = crate::harness::Pair::start("rollout_takeover", &[], Role::Operator).await;
    let (first, second) = (pair.server(0).await, pair.server(1).await);
    let token = pair.token.clone();
    first.enroll("db1").await;
    first.enroll("db2").await;
    let r = first
        .request(
            Method::POST,
            "/api/v1/rollouts",
            Some(&token),
            r#"{"name":"takeover","agents":["db*"],"waves":["100%"],"offline":"wait","offline_deadline":"25s","task":{"kind":"command","argv":["true"]}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let created: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let id = created["id"].as_str().expect("id").to_string();
    let lease = format!("rollout:{id}");
    let holder = fixtures::poll::until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(100),
        || async {
            pair.storage
                .lease(&lease)
                .await
                .expect("lease")
                .map(|l| l.holder)
        },
    )
    .await
    .expect("a replica drives the rollout");
    let pids: Vec<String> = pair
        .replicas
        .iter()
        .map(|c| format!("/{}/", c.id()))
        .collect();
    let pid_of = |i: usize| pids[i].clone();
    let driving = usize::from(!holder.contains(&pid_of(0)));
    assert!(holder.contains(&pid_of(driving)), "{holder}");
    pair.replicas[driving]
        .kill()
        .expect("kill -9 the driving replica");
    let _ = pair.replicas[driving].wait();
    let other = if driving == 0 { &second } else { &first };
    let path = format!("/api/v1/rollouts/{id}");
    let done = fixtures::poll::until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(500),
        || async {
            let r = other.request(Method::GET, &path, Some(&token), "").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
            (v["state"] == "done").then_some(v)
        },
    )
    .await
    .expect("the other replica finished the rollout");
    assert_eq!(done["counts"]["offline"], 2, "{done}");
    let now = pair
        .storage
        .lease(&lease)
        .await
        .expect("lease")
        .expect("held");
    assert!(now.holder.contains(&pid_of(1 - driving)), "{now:?}");
    assert!(now.fence > 1, "the fence rose with the new holder: {now:?}");
    let audit = pair
        .storage
        .audit_list(control_plane::storage::AuditQuery {
            action: Some("rollout.done".into()),
            target: Some(id.clone()),
            before_id: None,
            limit: 10,
        })
        .await
        .expect("audit");
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].actor, "rollout-driver", "{audit:?}");
}
