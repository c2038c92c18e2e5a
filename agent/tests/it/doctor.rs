//! `outpost-agent doctor` against a real control plane and a real Postgres: a good setup
//! passes, and each fault fails (or warns) with the fix named.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use crate::harness::{ControlPlane, agent_bin, run};

fn doctor(args: &[&str]) -> (Output, BTreeMap<String, serde_json::Value>) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = run(&agent_bin(), &all);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let by_name = checks
        .into_iter()
        .map(|c| (c["check"].as_str().unwrap_or("").to_string(), c))
        .collect();
    (out, by_name)
}

fn status(checks: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    checks
        .get(name)
        .and_then(|c| c["status"].as_str())
        .unwrap_or("missing")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_setup_and_names_the_fix_for_each_fault() {
    let cp = ControlPlane::start().await;
    let pg = fixtures::Postgres::start().await.expect("postgres fixture");
    let url: tokio_postgres::Config = pg.url().parse().expect("url");
    let (admin, _driver) = world::postgres_connect(
        &world::World::real(),
        &url,
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("connect");
    admin
        .batch_execute("CREATE ROLE outpost_mon LOGIN IN ROLE pg_monitor")
        .await
        .expect("monitoring role");
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("agent");
    let data_s = data.to_str().expect("utf8").to_string();
    cp.enroll_agent("doctor", &data_s);
    let monitor = format!("postgres://outpost_mon@127.0.0.1:{}/postgres", pg.port());

    let (out, checks) = doctor(&["--data-dir", &data_s, "--postgres", &monitor]);
    for name in [
        "config",
        "enrollment",
        "control_plane",
        "clock",
        "postgres",
        "privileges",
        "psql",
        "pg_dump",
    ] {
        assert_eq!(
            status(&checks, name),
            "ok",
            "{name}: {:?}",
            checks.get(name)
        );
    }
    // Tests run as root: the data directory is root's, which works but is not the intent.
    assert_eq!(status(&checks, "data_dir"), "warn");
    assert_eq!(status(&checks, "socket"), "warn", "no agent runs");
    assert!(out.status.success(), "warnings alone do not fail");

    let (out, checks) = doctor(&["--data-dir", &data_s, "--postgres", &pg.url()]);
    assert_eq!(
        status(&checks, "privileges"),
        "warn",
        "a superuser is more than needed"
    );
    assert!(out.status.success());

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (out, checks) = doctor(&[
        "--data-dir",
        &data_s,
        "--postgres",
        &format!("postgres://nobody_here@127.0.0.1:{}/postgres", pg.port()),
        "--control-plane",
        "http://127.0.0.1:9",
    ]);
    assert!(!out.status.success(), "failures exit non-zero");
    assert_eq!(status(&checks, "data_dir"), "fail");
    assert_eq!(checks["data_dir"]["fix"], format!("chmod 0700 {data_s}"));
    assert_eq!(status(&checks, "control_plane"), "fail");
    assert_eq!(status(&checks, "postgres"), "fail");
    assert!(
        checks["postgres"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("nobody_here"),
        "{:?}",
        checks["postgres"]
    );

    // The host's policy: a dump directory that does not exist fails with the fix.
    let dumps = tmp.path().join("dumps");
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[tasks]\nrun_as = \"root\"\nremote_kinds = [\"vacuum\"]\ndump_dirs = [\"{}\"]\n[terminal]\nenabled = false\n",
            dumps.display()
        ),
    )
    .expect("write");
    let policy_args = [
        "--config",
        policy.to_str().expect("utf8"),
        "--data-dir",
        &data_s,
    ];
    let (_, checks) = doctor(&policy_args);
    assert_eq!(
        status(&checks, "dump_dirs"),
        "fail",
        "{:?}",
        checks.get("dump_dirs")
    );
    assert!(
        checks["remote_kinds"]["detail"]
            .as_str()
            .unwrap_or("")
            .ends_with("vacuum"),
        "{:?}",
        checks["remote_kinds"]
    );
    assert!(
        checks["terminal"]["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("off")
    );
    std::fs::create_dir(&dumps).expect("mkdir");
    let (_, checks) = doctor(&policy_args);
    assert_eq!(
        status(&checks, "dump_dirs"),
        "ok",
        "{:?}",
        checks.get("dump_dirs")
    );

    // Commands that run as a user who can read the agent's credential fail the check; a run
    // user of their own with the data directory closed to it passes.
    assert_eq!(
        status(&checks, "credential"),
        "fail",
        "root reads everything: {:?}",
        checks.get("credential")
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let own_user = tmp.path().join("own-user.toml");
    std::fs::write(
        &own_user,
        "[tasks]\nrun_as = \"nobody\"\n[terminal]\nrun_as = \"nobody\"\n",
    )
    .expect("write");
    let own_args = [
        "--config",
        own_user.to_str().expect("utf8"),
        "--data-dir",
        &data_s,
    ];
    let (_, checks) = doctor(&own_args);
    assert_eq!(
        status(&checks, "credential"),
        "ok",
        "{:?}",
        checks.get("credential")
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        data.join("identity.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let (out, checks) = doctor(&own_args);
    assert_eq!(
        status(&checks, "credential"),
        "fail",
        "a readable credential: {:?}",
        checks.get("credential")
    );
    assert!(!out.status.success());
    std::fs::set_permissions(
        data.join("identity.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[metrics]\ninterval = \"1s\"\n").expect("write");
    let (out, checks) = doctor(&["--config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert_eq!(checks.len(), 1);
    assert!(
        checks["config"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("metrics.interval"),
        "{:?}",
        checks["config"]
    );
}
