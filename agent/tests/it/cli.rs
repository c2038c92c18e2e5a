//! CLI behaviour: help that teaches, refusals that say what to do.

use fixtures::poll::{until, until_true};
use std::time::Duration;

use crate::harness::{ControlPlane, agent_bin, outpost_bin, run, stdout};

#[test]
fn both_binaries_explain_themselves() {
    let out = run(&outpost_bin(), &["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["serve", "admin"] {
        assert!(help.contains(word), "{help}");
    }
    let out = run(&agent_bin(), &["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "enroll"] {
        assert!(help.contains(word), "{help}");
    }
    let out = run(&agent_bin(), &["enroll", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--control-plane"));
}

/// `--help` is the first thing an operator reads: every change to it is a reviewed diff.
#[test]
fn help_texts_are_snapshots() {
    let cases: [(&str, std::path::PathBuf, &[&str]); 11] = [
        ("outpost_help", outpost_bin(), &["--help"]),
        ("outpost_serve_help", outpost_bin(), &["serve", "--help"]),
        ("outpost_exec_help", outpost_bin(), &["exec", "--help"]),
        ("outpost_admin_help", outpost_bin(), &["admin", "--help"]),
        ("agent_help", agent_bin(), &["--help"]),
        ("agent_run_help", agent_bin(), &["run", "--help"]),
        ("agent_enroll_help", agent_bin(), &["enroll", "--help"]),
        (
            "agent_tasks_add_help",
            agent_bin(),
            &["tasks", "add", "--help"],
        ),
        ("agent_buffer_help", agent_bin(), &["buffer", "--help"]),
        ("agent_silence_help", agent_bin(), &["silence", "--help"]),
        (
            "outpost_notify_test_help",
            outpost_bin(),
            &["notify", "test", "--help"],
        ),
    ];
    for (name, bin, args) in cases {
        // clap shows the value of a set `OUTPOST_*` variable in the help: none is set here.
        let mut command = std::process::Command::new(&bin);
        command.args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OUTPOST_") {
                command.env_remove(key);
            }
        }
        let out = command.output().expect("run the binary");
        assert!(out.status.success(), "{name}");
        insta::assert_snapshot!(name, String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn bad_input_fails_with_a_reason_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let cases: Vec<(std::path::PathBuf, Vec<&str>, &str)> = vec![
        (
            agent_bin(),
            vec![
                "enroll",
                "--control-plane",
                "cp.example",
                "--token",
                "x",
                "--data-dir",
                d,
            ],
            "control-plane",
        ),
        (
            agent_bin(),
            vec![
                "enroll",
                "--control-plane",
                "ftp://cp",
                "--token",
                "x",
                "--data-dir",
                d,
            ],
            "http or https",
        ),
        (
            agent_bin(),
            vec![
                "enroll",
                "--control-plane",
                "http://127.0.0.1:9",
                "--token",
                "x",
                "--data-dir",
                d,
            ],
            "reach",
        ),
        (
            outpost_bin(),
            vec![
                "admin",
                "create-user",
                "bad name",
                "--role",
                "admin",
                "--data-dir",
                d,
            ],
            "user name",
        ),
        (
            outpost_bin(),
            vec!["admin", "enroll-token", "--ttl", "forever", "--data-dir", d],
            "--ttl",
        ),
        (
            outpost_bin(),
            vec!["admin", "enroll-token", "--ttl", "30d", "--data-dir", d],
            "7d",
        ),
        (
            outpost_bin(),
            vec!["serve", "--listen", "nowhere", "--data-dir", d],
            "listen",
        ),
        (
            outpost_bin(),
            vec!["serve", "--database-url", "mysql://x", "--data-dir", d],
            "database_url",
        ),
    ];
    for (bin, args, needle) in cases {
        let out = run(&bin, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_data_dir_is_not_enrolled_twice_by_accident() {
    let cp = ControlPlane::start().await;
    let dir = cp.dir.path().join("agent");
    let d = dir.to_str().expect("utf8");
    let t1 = cp.enroll_token();
    let out = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &cp.url(),
            "--token",
            &t1,
            "--data-dir",
            d,
        ],
    );
    assert!(out.status.success());
    let t2 = cp.enroll_token();
    let out = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &cp.url(),
            "--token",
            &t2,
            "--data-dir",
            d,
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("identity.json"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the credential file is private");
    let out = run(
        &outpost_bin(),
        &[
            "admin",
            "create-user",
            "admin",
            "--role",
            "admin",
            "--data-dir",
            cp.data_dir().to_str().expect("utf8"),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

/// `[metrics] listen`: the agent's own figures in Prometheus text, loopback only.
#[tokio::test]
async fn the_metrics_listener_reports_buffer_tasks_and_link_and_refuses_public_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8").to_string();
    let public = dir.path().join("public.toml");
    std::fs::write(&public, "[metrics]\nlisten = \"0.0.0.0:9187\"\n").expect("write");
    let out = run(
        &agent_bin(),
        &[
            "run",
            "--data-dir",
            &d,
            "--config",
            public.to_str().expect("utf8"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics.listen") && err.contains("loopback"),
        "{err}"
    );

    let port = crate::harness::free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        // Tests run as root: commands may run as root only when the config says so.
        format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[tasks]\nrun_as = \"root\"\n"),
    )
    .expect("write");
    let mut agent = crate::harness::Proc::spawn(
        &agent_bin(),
        &[
            "run",
            "--data-dir",
            &d,
            "--config",
            config.to_str().expect("utf8"),
        ],
        &dir.path().join("agent.log"),
    );
    let socket = format!("{d}/agent.sock");
    let added = until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            run(
                &agent_bin(),
                &["tasks", "add", "command", "--socket", &socket, "--", "true"],
            )
            .status
            .success()
        },
    )
    .await;
    assert!(added, "the agent's task API never answered");
    let url = url::Url::parse(&format!("http://127.0.0.1:{port}/metrics")).expect("url");
    let scrape = || async {
        let r = world::http_request(
            &world::World::real(),
            http::Method::GET,
            &url,
            http::HeaderMap::new(),
            bytes::Bytes::new(),
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .ok()?;
        Some(String::from_utf8_lossy(&r.body).into_owned())
    };
    let counted = until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            scrape()
                .await
                .filter(|text| text.contains("outpost_agent_task_runs{status=\"done\"} 1"))
        },
    )
    .await;
    let text = match counted {
        Some(text) => text,
        None => scrape().await.unwrap_or_default(),
    };
    for line in [
        "outpost_agent_task_runs{status=\"done\"} 1",
        "outpost_agent_tasks{status=\"done\"} 1",
        "outpost_agent_buffer_rows{agent=\"unenrolled\"} 0",
        "outpost_agent_control_plane_connected 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    agent.signal("-TERM");
    assert!(agent.wait_exit(Duration::from_secs(20)).await.is_some());
}

/// Untrusted strings are escaped in the control plane's log: a user name with a newline
/// cannot forge a log line of its own.
#[tokio::test]
async fn a_user_name_cannot_forge_a_log_line() {
    let cp = ControlPlane::start().await;
    let forged = "mallory\n2026-01-01T00:00:00.000000Z ERROR forged: every agent was removed";
    let r = cp
        .api(
            http::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"username": forged, "password": "wrong-password"})),
        )
        .await
        .expect("control plane answers");
    assert_eq!(r.status, 401);
    let log = cp.log();
    assert!(log.contains("login refused"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR forged") && !l.contains("mallory")),
        "a forged line appeared in the log:\n{log}"
    );
}

/// Enrolling over plain http:// to another host warns (the token and the credential travel
/// unencrypted); loopback, as in the demo, does not.
#[test]
fn enrolling_over_plain_http_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("agent");
    let d = d.to_str().expect("utf8");
    let remote = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            "http://cp.invalid:1/",
            "--token",
            "t",
            "--data-dir",
            d,
        ],
    );
    assert!(!remote.status.success(), "nothing answers there");
    let stderr = String::from_utf8_lossy(&remote.stderr);
    assert!(
        stderr.contains("WARNING") && stderr.contains("https://"),
        "{stderr}"
    );
    let local = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            "http://127.0.0.1:1/",
            "--token",
            "t",
            "--data-dir",
            d,
        ],
    );
    assert!(!local.status.success());
    let stderr = String::from_utf8_lossy(&local.stderr);
    assert!(!stderr.contains("WARNING"), "{stderr}");
}

/// `outpost admin` manages users and agents on the storage directly, with the same rules as
/// the API: the last enabled admin stays an admin.
#[test]
fn admin_commands_manage_users_and_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    crate::harness::create_admin(data, &[]);
    let outpost = |args: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.extend(["--data-dir", data]);
        run(&outpost_bin(), &all)
    };
    let made = outpost(&["create-user", "bob", "--role", "operator"]);
    assert!(made.status.success());
    let users = stdout(&outpost(&["users"]));
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("bob ") && l.contains("operator") && l.contains("enabled")),
        "{users}"
    );
    assert!(
        outpost(&["set-user", "bob", "--disable", "--role", "viewer"])
            .status
            .success()
    );
    let users = stdout(&outpost(&["users"]));
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("bob ") && l.contains("viewer") && l.contains("disabled")),
        "{users}"
    );
    let last = outpost(&["set-user", "admin", "--role", "viewer"]);
    assert!(!last.status.success());
    assert!(String::from_utf8_lossy(&last.stderr).contains("last enabled admin"));
    assert!(
        !outpost(&["set-user", "bob"]).status.success(),
        "nothing to change"
    );
    assert!(outpost(&["delete-user", "bob"]).status.success());
    assert!(!stdout(&outpost(&["users"])).contains("bob"));
    assert!(stdout(&outpost(&["agents"])).starts_with("ID"));
    let missing = outpost(&["remove-agent", "agt_nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no agent \"agt_nope\""));
}

/// `outpost-agent silence`: the agent's own credential asks the control plane, which records
/// a silence of this host only; bad input is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_silences_its_own_alerts() {
    let cp = ControlPlane::start().await;
    let dir = cp.dir.path().join("agent");
    let d = dir.to_str().expect("utf8");
    cp.enroll_agent("db-nightly", d);
    let silence = |args: &[&str]| {
        let mut all = vec!["silence", "--data-dir", d];
        all.extend_from_slice(args);
        run(&agent_bin(), &all)
    };
    let out = silence(&[
        "--for",
        "2h",
        "--rule",
        "replication_lag",
        "--comment",
        "nightly dump",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).starts_with("silenced replication_lag on this host until "),
        "{}",
        stdout(&out)
    );
    let out = silence(&["--for", "30d"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at most 7d"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = cp
        .api(http::Method::GET, "/api/v1/silences", None)
        .await
        .expect("reachable");
    let list: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["created_by"], "agent:db-nightly");
    assert_eq!(list[0]["comment"], "nightly dump");
    let empty = tempfile::tempdir().expect("dir");
    let out = run(
        &agent_bin(),
        &[
            "silence",
            "--data-dir",
            empty.path().to_str().expect("utf8"),
            "--for",
            "1h",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("enroll first"));
}
