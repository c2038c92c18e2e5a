//! CLI behaviour: help that teaches, refusals that say what to do.

use crate::harness::{ControlPlane, agent_bin, outpost_bin, run};

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
                "https://cp",
                "--token",
                "x",
                "--data-dir",
                d,
            ],
            "https",
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
