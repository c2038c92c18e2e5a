//! The pgBackRest kinds end to end: Debian's real `pgbackrest`, a real Postgres archiving WAL
//! into a posix repository in a temp directory, the agent running the kinds as `postgres`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fixtures::poll::until;

use crate::harness::ControlPlane;
use crate::tasks::Agent;

/// Directories pgBackRest uses, owned by `postgres` (the user it runs as, from the tasks and
/// from `archive_command`), and its config file.
struct Repo {
    _dir: tempfile::TempDir,
    root: PathBuf,
    conf: PathBuf,
}

impl Repo {
    fn new(pgbackrest: &Path) -> Repo {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("pgbackrest");
        let (uid, gid) =
            fixtures::user_ids("postgres").expect("the postgres user (package postgresql)");
        for sub in ["", "repo", "log", "lock", "spool", "drills"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).expect("mkdir");
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let conf = root.join("pgbackrest.conf");
        let _ = pgbackrest;
        Repo {
            _dir: dir,
            root,
            conf,
        }
    }

    /// Write the config for stanza `main` on `pg`.
    fn configure(&self, pg: &fixtures::Postgres) {
        let r = |sub: &str| self.root.join(sub).display().to_string();
        let text = format!(
            "[global]\nrepo1-path={}\nlog-path={}\nlock-path={}\nspool-path={}\nstart-fast=y\n\
             repo1-retention-full=4\nlog-level-console=info\n\n[main]\npg1-path={}\npg1-port={}\n\
             pg1-socket-path={}\npg1-user=postgres\n",
            r("repo"),
            r("log"),
            r("lock"),
            r("spool"),
            pg.data_dir().expect("local server").display(),
            pg.port(),
            pg.socket_dir().expect("local server").display(),
        );
        std::fs::write(&self.conf, text).expect("write pgbackrest.conf");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.conf, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
}

/// Poll the task until its status is `want` (backups take seconds, not milliseconds).
async fn wait_for(agent: &Agent, id: &str, want: &str) -> serde_json::Value {
    let shown = until(Duration::from_secs(120), Duration::from_millis(200), || {
        let t = agent.show(id);
        async move {
            let status = t["status"].as_str().unwrap_or("").to_string();
            let ended =
                ["done", "failed", "aborted", "canceled", "skipped"].contains(&status.as_str());
            ended.then_some(t)
        }
    })
    .await
    .unwrap_or_else(|| panic!("task {id} did not end: {}", agent.show(id)));
    assert_eq!(
        shown["status"],
        want,
        "{id}: {shown}\n{}",
        agent.ok(&["logs", id])
    );
    shown
}

/// The records of `kind` the control plane stored for agent `name`, newest first.
async fn stored(cp: &ControlPlane, name: &str, kind: &str) -> Vec<serde_json::Value> {
    let r = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("GET /api/v1/agents");
    let agents: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let Some(id) = agents
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .and_then(|x| x["id"].as_str())
    else {
        return Vec::new();
    };
    let r = cp
        .api(
            http::Method::GET,
            &format!("/api/v1/agents/{id}/metrics?type={kind}&from=0"),
            None,
        )
        .await
        .expect("GET metrics");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap_or_default();
    rows.into_iter().rev().map(|r| r["data"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbackrest_kinds_back_up_check_verify_and_report_status() {
    let pgbackrest = fixtures::find_binary("pgbackrest", &[], "pgbackrest").expect("pgbackrest");
    let repo = Repo::new(&pgbackrest);
    let archive_command = format!(
        "{} --config={} --stanza=main archive-push %p",
        pgbackrest.display(),
        repo.conf.display()
    );
    let pg = fixtures::Postgres::start_local_with(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
        ("wal_level", "replica"),
    ])
    .expect("postgres fixture");
    repo.configure(&pg);
    let config = repo.root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks]\nrun_as = \"nobody\"\n[metrics]\ninterval = \"10s\"\n\
             [backups]\nrun_as = \"postgres\"\npgbackrest = \"{}\"\nconfig = \"{}\"\nstanzas = [\"main\"]\ninfo_interval = \"1m\"\n\
             restore_scratch_dirs = [\"{}\"]\n",
            pgbackrest.display(),
            repo.conf.display(),
            repo.root.join("drills").display()
        ),
    )
    .expect("agent config");
    let config = config.display().to_string();
    let mut agent = Agent::start(&["--config", &config, "--postgres", &pg.url()]).await;
    // Enrolled, so its records reach a control plane (nothing runs yet: a restart is free).
    let cp = ControlPlane::start().await;
    agent.kill_9();
    cp.enroll_agent("db1", &agent.data().display().to_string());
    agent.launch().await;

    // The stanza is made by hand, as the README's set-up does.
    let created = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&pgbackrest)
        .arg(format!("--config={}", repo.conf.display()))
        .args(["--stanza=main", "stanza-create"])
        .output()
        .expect("run runuser (package util-linux)");
    assert!(
        created.status.success(),
        "stanza-create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    // Plain tasks keep [tasks] run_as; only the backup kinds run as [backups] run_as.
    let whoami = agent.ok(&["add", "command", "--", "id", "-un"]);
    wait_for(&agent, &whoami, "done").await;
    assert_eq!(agent.ok(&["logs", &whoami]).trim(), "nobody");

    let full = agent.ok(&[
        "add",
        "pgbackrest_backup",
        "--param",
        "stanza=main",
        "--param",
        "type=full",
    ]);
    wait_for(&agent, &full, "done").await;
    let incr = agent.ok(&[
        "add",
        "pgbackrest_backup",
        "--param",
        "stanza=main",
        "--param",
        "type=incr",
    ]);
    wait_for(&agent, &incr, "done").await;
    // The agent killed with kill -9 in the middle of a backup: the next agent adopts it and
    // records it once, as it ended; nothing starts it again.
    let adopted = agent.ok(&[
        "add",
        "pgbackrest_backup",
        "--param",
        "stanza=main",
        "--param",
        "type=diff",
    ]);
    let doing = until(Duration::from_secs(30), Duration::from_millis(20), || {
        let t = agent.show(&adopted);
        async move { (t["status"] == "doing").then_some(t) }
    })
    .await
    .unwrap_or_else(|| panic!("the diff backup never ran: {}", agent.show(&adopted)));
    agent.kill_9();
    agent.launch().await;
    let ended = wait_for(&agent, &adopted, "done").await;
    assert_eq!(
        ended["runs"].as_array().map(Vec::len),
        Some(1),
        "{ended}\n{doing}"
    );
    let check = agent.ok(&["add", "pgbackrest_check", "--param", "stanza=main"]);
    wait_for(&agent, &check, "done").await;

    // Only granted stanzas, and only on the role the task names.
    let refused = agent.tasks(&["add", "pgbackrest_backup", "--param", "stanza=other"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("not granted"), "{said}");
    let standby_only = agent.ok(&[
        "add",
        "pgbackrest_backup",
        "--param",
        "stanza=main",
        "--param",
        "run_on=standby",
    ]);
    let skipped = wait_for(&agent, &standby_only, "skipped").await;
    let reason = skipped["runs"][0]["error"].as_str().unwrap_or("");
    assert!(reason.contains("this host is a primary"), "{skipped}");

    // After the backups the status names both, with their sizes and times.
    let status = until(Duration::from_secs(30), Duration::from_millis(200), || {
        let cp = &cp;
        async move {
            let rows = stored(cp, "db1", "backup_info").await;
            rows.into_iter().find(|row| {
                row["stanzas"][0]["backups"]
                    .as_array()
                    .is_some_and(|b| b.len() >= 3)
            })
        }
    })
    .await
    .unwrap_or_else(|| panic!("no backup_info with three backups stored:\n{}", cp.log()));
    let stanza = &status["stanzas"][0];
    assert_eq!(stanza["name"], "main");
    assert_eq!(stanza["status"]["code"], 0, "{stanza}");
    let types: Vec<&str> = stanza["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["diff", "incr", "full"],
        "newest first, each once: {stanza}"
    );
    for backup in stanza["backups"].as_array().expect("backups") {
        assert!(backup["size"].as_u64().unwrap_or(0) > 0, "{backup}");
        assert!(
            backup["stop"].as_i64() >= backup["start"].as_i64(),
            "{backup}"
        );
        assert_eq!(backup["error"], false, "{backup}");
    }
    assert!(stanza["archive"][0]["max"].is_string(), "{stanza}");

    // WAL archiving, with each metrics round.
    let archiver = until(Duration::from_secs(30), Duration::from_millis(200), || {
        let cp = &cp;
        async move {
            let rows = stored(cp, "db1", "archiver").await;
            rows.into_iter()
                .find(|a| a["archived_count"].as_i64().unwrap_or(0) > 0)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no archiver record with archived WAL stored:\n{}", cp.log()));
    assert_eq!(archiver["archive_mode"], "on");
    assert!(archiver["last_archived_wal"].is_string(), "{archiver}");

    // The control plane's view: the API, then the Backups page in a real browser.
    let host = backups_of(&cp, "db1", |h| {
        h["backups"]["stanzas"][0]["incr"].is_object() && h["archiver"].is_object()
    })
    .await;
    assert_eq!(host["risk"], "healthy", "{host}");
    let main = &host["backups"]["stanzas"][0];
    for kind in ["full", "incr"] {
        assert!(main[kind]["size"].as_u64().unwrap_or(0) > 0, "{host}");
        assert!(main[kind]["stop_ms"].as_i64().unwrap_or(0) > 0, "{host}");
    }
    page(&cp, "healthy");

    // Archiving breaks: the host ranks as failing, on the API and on the page.
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &pg.url(), "-c", sql])
            .output()
            .expect("run psql (package postgresql-client)");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The server's archive_command comes from its command line (ALTER SYSTEM cannot change
    // it): the repository's WAL directory becomes read-only for postgres instead.
    let wal_dir = repo.root.join("repo/archive/main");
    let set_mode = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        for entry in walk(&wal_dir) {
            if entry.is_dir() {
                std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
            }
        }
    };
    set_mode(0o555);
    psql("CREATE TABLE churn AS SELECT generate_series(1, 1000) AS n");
    psql("SELECT pg_switch_wal()");
    let failing = backups_of(&cp, "db1", |h| h["risk"] == "archive_failing").await;
    assert!(
        failing["reasons"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("WAL archiving failing"),
        "{failing}"
    );
    page(&cp, "archive_failing");
    set_mode(0o750);

    // A restore drill: restores the newest backup into the scratch directory, starts it,
    // checks it, reports its RTO, and leaves nothing behind.
    let drills = repo.root.join("drills");
    let drill = agent.ok(&[
        "add",
        "restore_drill",
        "--param",
        "stanza=main",
        "--param",
        "check=SELECT count(*) FROM pg_database",
    ]);
    wait_for(&agent, &drill, "done").await;
    let said = agent.ok(&["logs", &drill]);
    let report: serde_json::Value = said
        .lines()
        .filter_map(|l| l.strip_prefix("drill: "))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no drill report: {said}"));
    assert_eq!(report["stanza"], "main", "{report}");
    assert!(report["rto_s"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert!(report["size"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(
        report["answer"], "3",
        "postgres, template0, template1: {report}"
    );
    let left: Vec<_> = std::fs::read_dir(&drills)
        .expect("scratch")
        .flatten()
        .collect();
    assert!(left.is_empty(), "the drill left {left:?}");
    // A scratch directory reached through a link is refused before anything is written.
    let outside = repo.root.join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let link = drills.join("elsewhere");
    std::os::unix::fs::symlink(&outside, &link).expect("symlink");
    let refused = agent.tasks(&[
        "add",
        "restore_drill",
        "--param",
        "stanza=main",
        "--param",
        &format!("scratch={}", link.display()),
    ]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("symbolic link"), "{why}");
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0);
    std::fs::remove_file(&link).expect("remove the link");

    // A WAL segment lost from the repository (the one the newest backup starts in): verify
    // and a drill of that backup fail, and both name it.
    let name = stanza["backups"][0]["wal_start"]
        .as_str()
        .expect("the newest backup's first WAL segment")
        .to_string();
    let archive = repo.root.join("repo/archive/main");
    let segment = walk(&archive)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}-")))
        })
        .unwrap_or_else(|| panic!("{name} is not in {}", archive.display()));
    std::fs::remove_file(&segment).expect("remove a segment");
    let verify = agent.ok(&["add", "pgbackrest_verify", "--param", "stanza=main"]);
    wait_for(&agent, &verify, "failed").await;
    let logs = agent.ok(&["logs", &verify]);
    assert!(logs.contains(&name), "verify names {name}: {logs}");
    // A finding, not a passing fault: not retried on its own.
    assert_eq!(
        agent.show(&verify)["runs"].as_array().map(Vec::len),
        Some(1)
    );
    let broken = agent.ok(&["add", "restore_drill", "--param", "stanza=main"]);
    wait_for(&agent, &broken, "failed").await;
    let logs = agent.ok(&["logs", &broken]);
    assert!(logs.contains(&name), "the drill names {name}: {logs}");
    let left: Vec<_> = std::fs::read_dir(&drills)
        .expect("scratch")
        .flatten()
        .collect();
    assert!(left.is_empty(), "the failed drill left {left:?}");
    // Both failures are reasons on the Backups page.
    let failed = backups_of(&cp, "db1", |h| {
        h["backups"]["stanzas"][0]["drill"]["status"] == "failed"
    })
    .await;
    let reasons = failed["reasons"].to_string();
    assert!(reasons.contains("the last verify failed"), "{failed}");
    assert!(
        reasons.contains("the last restore drill failed"),
        "{failed}"
    );
}

/// The host `name` from `GET /api/v1/backups` once `ready` holds (metrics flow every 10 s).
async fn backups_of(
    cp: &ControlPlane,
    name: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..300 {
        let r = cp
            .api(http::Method::GET, "/api/v1/backups", None)
            .await
            .expect("GET /api/v1/backups");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let hosts: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        if let Some(host) = hosts
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == name))
        {
            if ready(host) {
                return host.clone();
            }
            last = host.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{name} never got there in /api/v1/backups: {last}\n{}",
        cp.log()
    );
}

/// The Backups page in headless Chromium shows db1 at `risk` with its full and incremental
/// backups.
fn page(cp: &ControlPlane, risk: &str) {
    cp.page_test(
        "backups.mjs",
        "backups",
        &[("OUTPOST_AGENT", "db1"), ("OUTPOST_RISK", risk)],
    );
}

/// `dir` and every directory and file under it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[i]) {
            all.extend(entries.flatten().map(|e| e.path()));
        }
        i += 1;
    }
    all
}

/// The agent's tasks whose key starts with `prefix`: (key, status).
fn policy_tasks(agent: &Agent, prefix: &str) -> Vec<(String, String)> {
    let list: serde_json::Value =
        serde_json::from_str(&agent.ok(&["list", "--json"])).expect("json");
    let mut found: Vec<(String, String)> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["key"].as_str().is_some_and(|k| k.starts_with(prefix)))
        .map(|t| {
            (
                t["key"].as_str().unwrap_or("").to_string(),
                t["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_policy_schedules_its_tasks_on_the_agents_it_names_and_deleting_it_cancels_them() {
    let cp = ControlPlane::start().await;
    let api = |method: http::Method, path: &str, body: Option<serde_json::Value>| {
        let (cp, path) = (&cp, path.to_string());
        async move {
            let r = cp.api(method, &path, body).await.expect("api");
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            (r.status, v)
        }
    };
    // Created while the agent is not there yet: it gets the tasks when it connects.
    let policy = serde_json::json!({
        "name": "nightly", "agents": ["db-*"], "stanza": "main",
        "full": "0 1 * * 0", "incr": "0 1 * * 1-6", "verify": "0 12 * * *",
        "tz": "Europe/Berlin",
    });
    let (status, created) = api(
        http::Method::POST,
        "/api/v1/backup-policies",
        Some(policy.clone()),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let (status, again) = api(http::Method::POST, "/api/v1/backup-policies", Some(policy)).await;
    assert_eq!(status, 409, "{again}");
    let (status, bad) = api(
        http::Method::POST,
        "/api/v1/backup-policies",
        Some(serde_json::json!({"name": "x", "agents": ["*"], "stanza": "main", "incr": "daily"})),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap_or("").contains("incr"),
        "{bad}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[tasks]\nrun_as = \"root\"\n[backups]\nstanzas = [\"main\"]\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let mut agent = Agent::start(&["--config", &config]).await;
    agent.kill_9();
    cp.enroll_agent("db-1", &agent.data().display().to_string());
    agent.launch().await;

    let prefix = format!("backup-policy:{id}:");
    let scheduled = until(Duration::from_secs(60), Duration::from_millis(250), || {
        let tasks = policy_tasks(&agent, &prefix);
        async move { (tasks.len() == 3).then_some(tasks) }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the policy's tasks never arrived: {:?}\n{}",
            policy_tasks(&agent, &prefix),
            cp.log()
        )
    });
    let keys: Vec<&str> = scheduled.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            format!("{prefix}full"),
            format!("{prefix}incr"),
            format!("{prefix}verify")
        ]
    );
    assert!(
        scheduled.iter().all(|(_, s)| s == "scheduled"),
        "{scheduled:?}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&agent.ok(&["list", "--json"])).expect("json");
    let full = shown
        .as_array()
        .and_then(|a| a.iter().find(|t| t["key"] == format!("{prefix}full")))
        .expect("the full backup task");
    assert_eq!(full["schedule"], "cron 0 1 * * 0 Europe/Berlin", "{full}");

    // The Backups page lists it with the agent in place; its form creates and deletes one.
    cp.page_test("policies.mjs", "policies", &[]);

    // A stanza the host does not grant, from the CLI this time: the refusal is shown with
    // the policy.
    let file = dir.path().join("other.json");
    std::fs::write(
        &file,
        r#"{"name": "other", "agents": ["db-1"], "stanza": "other", "full": "0 2 * * *"}"#,
    )
    .expect("policy file");
    let data = cp.data_dir().display().to_string();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.extend(["--data-dir", data.as_str()]);
        crate::harness::run(&crate::harness::outpost_bin(), &all)
    };
    let out = admin(&["backup-policy-create", &file.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(&["backup-policy-create", &file.display().to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    let listed = String::from_utf8_lossy(&admin(&["backup-policies"]).stdout).to_string();
    assert!(
        listed.contains("nightly") && listed.contains("other"),
        "{listed}"
    );
    assert!(listed.contains("full '0 1 * * 0'"), "{listed}");
    let refused = until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let (_, all) = api(http::Method::GET, "/api/v1/backup-policies", None).await;
            all.as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == "other").cloned())
                .filter(|p| p["agents_reconciled"][0]["error"].is_string())
        },
    )
    .await
    .expect("the refusal is shown");
    let error = refused["agents_reconciled"][0]["error"]
        .as_str()
        .unwrap_or("");
    assert!(error.contains("not granted"), "{refused}");

    // Deleting the policy cancels its tasks on the agent.
    let (status, _) = api(
        http::Method::DELETE,
        &format!("/api/v1/backup-policies/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let canceled = until(Duration::from_secs(60), Duration::from_millis(250), || {
        let tasks = policy_tasks(&agent, &prefix);
        async move { tasks.iter().all(|(_, s)| s == "canceled").then_some(tasks) }
    })
    .await;
    assert!(canceled.is_some(), "{:?}", policy_tasks(&agent, &prefix));
    let (status, _) = api(
        http::Method::DELETE,
        &format!("/api/v1/backup-policies/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}
