//! The task runtime through the real binary: `outpost-agent run` and `outpost-agent tasks …`
//! over its Unix socket, including kill -9 in the middle of a run.

use fixtures::poll::{until, until_true};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::harness::{Proc, agent_bin, run};

pub(crate) struct Agent {
    pub(crate) dir: tempfile::TempDir,
    proc: Option<Proc>,
    extra: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

impl Agent {
    pub(crate) async fn start(extra: &[&str]) -> Agent {
        Agent::start_with_env(extra, &[]).await
    }

    async fn start_with_env(extra: &[&str], env: &[(&'static str, &'static str)]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut agent = Agent {
            dir,
            proc: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.to_vec(),
        };
        agent.launch().await;
        agent
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    pub(crate) async fn launch(&mut self) {
        let data = self.data();
        let mut args = vec![
            "run".to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        if !self.extra.iter().any(|a| a == "--config") {
            // Tests run as root: commands may run as root only when the config says so. Dumps
            // may go to the test's directory.
            let config = self.dir.path().join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    "[tasks]\nrun_as = \"root\"\ndump_dirs = [\"{}\"]\n",
                    self.dir.path().display()
                ),
            )
            .expect("config");
            args.extend(["--config".into(), config.display().to_string()]);
        }
        args.extend(self.extra.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", self.proc.is_some() as u8));
        self.proc = Some(Proc::spawn_with_env(&agent_bin(), &args, &self.env, &log));
        let up = until_true(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { self.tasks(&["list"]).status.success() },
        )
        .await;
        assert!(
            up,
            "agent API did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// SIGKILL the agent (its runs live on).
    pub(crate) fn kill_9(&mut self) {
        let mut proc = self.proc.take().expect("running");
        proc.0.kill().expect("kill -9");
        let _ = proc.0.wait();
    }

    pub(crate) fn tasks(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec!["tasks"];
        let (before, after) = match args.iter().position(|a| *a == "--") {
            Some(i) => (&args[..i], &args[i..]),
            None => (args, &[][..]),
        };
        all.extend_from_slice(before);
        let d = data.display().to_string();
        all.extend(["--data-dir", d.as_str()]);
        // An agent started with --socket is reached there.
        if let Some(i) = self.extra.iter().position(|a| a == "--socket") {
            all.extend(["--socket", self.extra[i + 1].as_str()]);
        }
        all.extend_from_slice(after);
        run(&agent_bin(), &all)
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.tasks(args);
        assert!(
            out.status.success(),
            "tasks {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub(crate) fn show(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["show", id, "--json"])).expect("json")
    }

    /// Poll until the task's status is `want`.
    pub(crate) async fn wait_status(&self, id: &str, want: &str) -> serde_json::Value {
        let shown = until(Duration::from_secs(15), Duration::from_millis(50), || {
            let t = self.show(id);
            async move { (t["status"] == want).then_some(t) }
        })
        .await;
        shown.unwrap_or_else(|| panic!("task {id} not {want}: {}", self.show(id)))
    }
    /// Add a command task that sleeps 300 s with `marker` in its argv (so its processes can
    /// be found), and wait until it runs.
    async fn add_marked_sleeper(&self, marker: &str) -> (String, serde_json::Value) {
        let id = self.ok(&[
            "add",
            "command",
            "--",
            "sh",
            "-c",
            "sleep 300; true",
            marker,
        ]);
        let task = self.wait_status(&id, "doing").await;
        (id, task)
    }
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_and_its_outcome_output_and_json_shape_are_recorded() {
    let agent = Agent::start(&[]).await;
    let id = agent.ok(&[
        "add",
        "command",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert!(id.starts_with("t_"), "{id}");
    let task = agent.wait_status(&id, "failed").await;
    for key in [
        "id",
        "kind",
        "status",
        "schedule",
        "key",
        "created_at",
        "next_run_at",
        "runs",
    ] {
        assert!(task.get(key).is_some(), "task JSON lacks {key}: {task}");
    }
    let run = &task["runs"][0];
    for key in ["started_at", "finished_at", "status", "exit_code", "error"] {
        assert!(run.get(key).is_some(), "run JSON lacks {key}: {run}");
    }
    assert_eq!(run["exit_code"], 3);
    assert_eq!(run["status"], "failed");
    assert!(
        run["started_at"].is_string() && run["finished_at"].is_string(),
        "{run}"
    );
    let logs = agent.ok(&["logs", &id]);
    assert!(logs.contains("out") && logs.contains("err"), "{logs}");
    let listed = agent.ok(&["list"]);
    assert!(listed.contains(&id));
    // The task JSON and the table are stable interfaces: a change is a snapshot diff.
    insta::assert_json_snapshot!("task_json", task, {
        ".id" => "[id]",
        ".key" => "[key]",
        ".created_at" => "[time]",
        ".next_run_at" => "[time]",
        ".runs[].started_at" => "[time]",
        ".runs[].finished_at" => "[time]",
        ".runs[].duration_ms" => "[ms]",
    });
    insta::assert_snapshot!("task_table", listed.replace(&id, "[id]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_refused_by_name_and_bad_input_gets_one_line_reasons() {
    let agent = Agent::start(&[]).await;
    let id = agent.ok(&[
        "add", "command", "--in", "1h", "--key", "nightly", "--", "true",
    ]);
    let dup = agent.tasks(&[
        "add", "command", "--in", "1h", "--key", "nightly", "--", "true",
    ]);
    assert!(!dup.status.success());
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(err.contains(&id) && err.contains("already exists"), "{err}");
    for (args, needle) in [
        (vec!["add", "bogus"], "unknown kind"),
        (
            vec!["add", "command", "--cron", "61 * * * *", "--", "true"],
            "minute",
        ),
        (vec!["add", "command", "--in", "soon", "--", "true"], "--in"),
        (
            vec![
                "add", "command", "--every", "1s", "--in", "1m", "--", "true",
            ],
            "at most one",
        ),
        (vec!["add", "command"], "after --"),
        (vec!["add", "vacuum", "--param", "database=x"], "--postgres"),
        (vec!["add", "analyze", "--param", "colour=red"], "database"),
        (
            vec!["add", "command", "--timeout", "30d", "--", "true"],
            "timeout",
        ),
        (vec!["show", "t_nope"], "no task"),
    ] {
        let out = agent.tasks(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line please: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_cancellation_kill_the_whole_process_group() {
    let agent = Agent::start(&[]).await;
    let pidfile = agent.dir.path().join("grandchild.pid");
    let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
    let id = agent.ok(&[
        "add",
        "command",
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let task = agent.wait_status(&id, "failed").await;
    assert!(
        task["runs"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{task}"
    );
    let grandchild = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .to_string();
    assert!(
        !alive(&grandchild),
        "the grandchild {grandchild} survived the timeout"
    );

    let id = agent.ok(&["add", "command", "--key", "long", "--", "sleep", "300"]);
    agent.wait_status(&id, "doing").await;
    agent.ok(&["cancel", &id]);
    let task = agent.wait_status(&id, "canceled").await;
    assert_eq!(task["runs"][0]["status"], "canceled");
    let again = agent.tasks(&["cancel", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_the_limit_is_counted_not_silently_cut() {
    let agent = Agent::start(&[]).await;
    let id = agent.ok(&[
        "add",
        "command",
        "--",
        "sh",
        "-c",
        "head -c 200000 /dev/zero | tr '\\0' x",
    ]);
    let task = agent.wait_status(&id, "done").await;
    let run = &task["runs"][0];
    assert_eq!(run["output_bytes"], 65536);
    assert_eq!(run["output_dropped_bytes"], 200000 - 65536);
    let logs = agent.ok(&["logs", &id]);
    assert!(
        logs.contains("134464 more bytes of output were dropped"),
        "{}",
        &logs[logs.len() - 120..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_outlives_a_kill_9_of_its_agent_and_the_next_agent_adopts_it() {
    let mut agent = Agent::start(&[]).await;
    let dir = agent.dir.path().to_path_buf();
    let (pidfile, marker) = (dir.join("victim.pid"), dir.join("marker"));
    let script = format!(
        "echo $$ > {}; echo before; sleep 2; echo after the restart; touch {}",
        pidfile.display(),
        marker.display()
    );
    let survivor = agent.ok(&[
        "add", "command", "--key", "survivor", "--", "sh", "-c", &script,
    ]);
    let hung = agent.ok(&[
        "add",
        "command",
        "--key",
        "hung",
        "--timeout",
        "3s",
        "--",
        "sleep",
        "300",
    ]);
    let future = agent.ok(&[
        "add", "command", "--in", "4s", "--key", "later", "--", "true",
    ]);
    agent.wait_status(&survivor, "doing").await;
    agent.wait_status(&hung, "doing").await;
    let victim = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .to_string();
    agent.kill_9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        alive(&victim),
        "the run's process outlives a kill -9 of the agent"
    );

    agent.launch().await;
    let task = agent.show(&survivor);
    assert_eq!(task["status"], "doing", "adopted, not aborted: {task}");
    let task = agent.wait_status(&survivor, "done").await;
    assert_eq!(task["runs"].as_array().map(Vec::len), Some(1), "{task}");
    assert_eq!(task["runs"][0]["exit_code"], 0, "{task}");
    assert!(marker.exists(), "the command ran to its end");
    let logs = agent.ok(&["logs", &survivor]);
    assert!(
        logs.contains("before") && logs.contains("after the restart"),
        "the output from both sides of the restart is kept: {logs}"
    );
    assert!(!alive(&victim));

    let task = agent.wait_status(&hung, "failed").await;
    assert!(
        task["runs"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "the adopted run's timeout is enforced: {task}"
    );
    let later = agent.wait_status(&future, "done").await;
    assert_eq!(
        later["runs"].as_array().map(Vec::len),
        Some(1),
        "the future task ran once: {later}"
    );
    let left = stale_slots(&agent);
    assert!(
        left.is_empty(),
        "finished runs leave nothing behind: {left:?}"
    );
}

/// Slot files in the agent's `keepers` directory whose keeper is gone: what finished runs
/// must not leave behind (a live keeper keeps its slot for its next run).
fn stale_slots(agent: &Agent) -> Vec<String> {
    std::fs::read_dir(agent.data().join("keepers"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|name| !name.split('-').next().is_some_and(alive))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_outlives_a_graceful_stop_and_ends_while_no_agent_watches() {
    let mut agent = Agent::start(&[]).await;
    let id = agent.ok(&[
        "add",
        "command",
        "--key",
        "short",
        "--",
        "sh",
        "-c",
        "sleep 1; echo finished; exit 3",
    ]);
    agent.wait_status(&id, "doing").await;
    let mut proc = agent.proc.take().expect("running");
    proc.signal("-TERM");
    let status = proc.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}"
    );
    // The run ends while no agent runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.launch().await;
    let task = agent.show(&id);
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(
        task["runs"][0]["exit_code"], 3,
        "its real exit code: {task}"
    );
    assert_eq!(agent.ok(&["logs", &id]).lines().next(), Some("finished"));
}

/// Kill the agent within milliseconds of a dispatch, many times: whatever the instant, every
/// command runs exactly once and no process is left that no agent accounts for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_dispatch_leaves_nothing_unaccounted() {
    const ROUNDS: usize = 15;
    let mut agent = Agent::start(&[]).await;
    let ledger = agent.dir.path().join("ledger");
    let mut ids = Vec::new();
    for round in 0..ROUNDS {
        let script = format!("echo round{round} $$ >> {}; sleep 1", ledger.display());
        let key = format!("round{round}");
        ids.push(agent.ok(&["add", "command", "--key", &key, "--", "sh", "-c", &script]));
        if round % 3 == 1 {
            tokio::time::sleep(Duration::from_millis(2 * round as u64)).await;
        }
        agent.kill_9();
        agent.launch().await;
    }
    for id in &ids {
        agent.wait_status(id, "done").await;
    }
    let ledger = std::fs::read_to_string(&ledger).expect("ledger");
    for round in 0..ROUNDS {
        let ran: Vec<&str> = ledger
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(&format!("round{round}")))
            .collect();
        assert_eq!(ran.len(), 1, "round {round} ran exactly once: {ledger}");
    }
    for line in ledger.lines() {
        let pid = line.split_whitespace().nth(1).expect("pid");
        assert!(!alive(pid), "{line}: still alive after its run ended");
    }
    let left = stale_slots(&agent);
    assert!(
        left.is_empty(),
        "no dead keeper's slot is left behind: {left:?}"
    );
}

/// Kill every keeper the (killed) agent left, with the command each was running, and remove
/// their slots: what a power loss or an agent from before run keepers leaves behind.
fn lose_keepers(agent: &Agent) {
    let keepers = agent.data().join("keepers");
    for entry in std::fs::read_dir(&keepers).expect("keepers").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let keeper = name
            .split('-')
            .next()
            .expect("the keeper's pid")
            .to_string();
        let text = std::fs::read_to_string(entry.path()).expect("slot");
        let header: serde_json::Value = text
            .lines()
            .next()
            .and_then(|l| serde_json::from_str(l.split_once(' ')?.1).ok())
            .expect("header");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &keeper])
            .status();
        if let Some(pid) = header["pid"].as_i64() {
            let killed = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status()
                .expect("kill");
            assert!(killed.success());
        }
        std::fs::remove_file(entry.path()).expect("remove the slot");
    }
}

/// Every process's argv, read from /proc (NUL-separated words joined by spaces), by pid.
fn all_cmdlines() -> Vec<(String, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().to_string();
            pid.chars().all(|c| c.is_ascii_digit()).then_some(pid)
        })
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let words: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|w| String::from_utf8_lossy(w).to_string())
                .collect();
            Some((pid, words.join(" ")))
        })
        .collect()
}

/// `ps` shows every user each process's argv: a Postgres password from the agent's DSN goes
/// to psql in PGPASSWORD (readable by its own user and root only), never in its argv.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_password_reaches_psql_in_its_environment_never_in_its_argv() {
    const SECRET: &str = "argv-must-not-show-this";
    let pg = fixtures::Postgres::start().await.expect("postgres fixture");
    let url = url::Url::parse(&pg.create_database("tasks_secret").expect("database"))
        .expect("fixture url");
    let mut with_password = url.clone();
    with_password.set_password(Some(SECRET)).expect("password");
    // In its config file, as a deployment keeps it (not on the agent's own command line).
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("postgres = \"{with_password}\"\n[tasks]\nrun_as = \"root\"\n"),
    )
    .expect("config");
    let agent = Agent::start(&["--config", config.to_str().expect("utf8")]).await;
    let id = agent.ok(&[
        "add",
        "sql",
        "--param",
        "database=tasks_secret",
        "--param",
        "query=SELECT pg_sleep(2)",
    ]);
    agent.wait_status(&id, "doing").await;
    let psql = until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        || async {
            all_cmdlines()
                .into_iter()
                .find(|(_, cmd)| cmd.contains("pg_sleep(2)"))
        },
    )
    .await;
    let (pid, cmd) = psql.expect("psql runs the query");
    for (other, line) in all_cmdlines() {
        assert!(
            !line.contains(SECRET),
            "pid {other} shows the password: {line}"
        );
    }
    assert!(cmd.contains("tasks_secret"), "{cmd}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == format!("PGPASSWORD={SECRET}").as_bytes()),
        "psql gets the password in PGPASSWORD"
    );
    agent.wait_status(&id, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kinds_run_through_the_configured_server() {
    let pg = fixtures::Postgres::start().await.expect("postgres fixture");
    let url = pg.create_database("tasks_kinds").expect("database");
    let agent = Agent::start(&["--postgres", &url]).await;
    let sql = agent.ok(&[
        "add",
        "sql",
        "--param",
        "database=tasks_kinds",
        "--param",
        "query=CREATE TABLE \"Odd \"\"name\" (id int)",
    ]);
    agent.wait_status(&sql, "done").await;
    let vacuum = agent.ok(&[
        "add",
        "vacuum",
        "--param",
        "database=tasks_kinds",
        "--param",
        "table=Odd \"name",
    ]);
    agent.wait_status(&vacuum, "done").await;
    let analyze = agent.ok(&["add", "analyze", "--param", "database=tasks_kinds"]);
    agent.wait_status(&analyze, "done").await;
    let health = agent.ok(&["add", "health_check"]);
    agent.wait_status(&health, "done").await;
    let dump_path = agent.dir.path().join("dump.sql");
    let dump = agent.ok(&[
        "add",
        "pg_dump",
        "--param",
        "database=tasks_kinds",
        "--param",
        &format!("path={}", dump_path.display()),
    ]);
    agent.wait_status(&dump, "done").await;
    let dumped = std::fs::read_to_string(&dump_path).expect("dump written");
    assert!(dumped.contains("Odd \"\"name"), "the dump holds the table");
    // Opened by the agent (no link followed) and handed to pg_dump open: private to its user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dump_path)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let outside = agent.tasks(&[
        "add",
        "pg_dump",
        "--param",
        "database=tasks_kinds",
        "--param",
        "path=/var/tmp/outside-dump-dirs.sql",
    ]);
    assert!(!outside.status.success());
    assert!(
        String::from_utf8_lossy(&outside.stderr).contains("not under [tasks] dump_dirs"),
        "{}",
        String::from_utf8_lossy(&outside.stderr)
    );
    let bad = agent.ok(&[
        "add",
        "sql",
        "--param",
        "database=tasks_kinds",
        "--param",
        "query=SELECT nope",
    ]);
    let task = agent.wait_status(&bad, "failed").await;
    assert!(agent.ok(&["logs", &bad]).contains("nope"), "{task}");

    // An agent whose role has pg_monitor only: a run denied a privilege says what it needs.
    let role = agent.ok(&[
        "add",
        "sql",
        "--param",
        "database=tasks_kinds",
        "--param",
        "query=CREATE ROLE outpost_mon LOGIN IN ROLE pg_monitor",
    ]);
    agent.wait_status(&role, "done").await;
    let monitor = format!("postgres://outpost_mon@127.0.0.1:{}/tasks_kinds", pg.port());
    let limited = Agent::start(&["--postgres", &monitor]).await;
    let denied = limited.ok(&[
        "add",
        "sql",
        "--param",
        "database=tasks_kinds",
        "--param",
        "query=SELECT * FROM \"Odd \"\"name\"",
    ]);
    let task = limited.wait_status(&denied, "failed").await;
    let error = task["runs"][0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("sql needs a Postgres role with the rights the query uses"),
        "{task}"
    );
}

/// The id of the one agent enrolled with `cp`.
/// Agent `db1` with the config file `config`, enrolled with `cp` and online: the agent and
/// its id.
async fn online_with_config(cp: &crate::harness::ControlPlane, config: &Path) -> (Agent, String) {
    let agent = Agent::online(cp, "db1", config).await;
    let agent_id = first_agent_id(cp).await;
    (agent, agent_id)
}

impl Agent {
    /// Agent `name` with the config file `config`, enrolled with `cp` and online.
    pub(crate) async fn online(
        cp: &crate::harness::ControlPlane,
        name: &str,
        config: &Path,
    ) -> Agent {
        let mut agent = Agent {
            dir: tempfile::tempdir().expect("tempdir"),
            proc: None,
            extra: vec!["--config".into(), config.display().to_string()],
            env: Vec::new(),
        };
        cp.enroll_agent(name, &agent.data().display().to_string());
        agent.launch().await;
        cp.wait_status(name, "online", Duration::from_secs(10))
            .await;
        agent
    }
}

async fn first_agent_id(cp: &crate::harness::ControlPlane) -> String {
    let listed = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("list");
    let agents: serde_json::Value = serde_json::from_slice(&listed.body).expect("json");
    agents[0]["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_tasks_and_history_that_finished_while_the_control_plane_was_down() {
    use crate::harness::ControlPlane;
    use http::Method;
    let mut cp = ControlPlane::start().await;
    let mut agent = Agent {
        dir: tempfile::tempdir().expect("tempdir"),
        proc: None,
        extra: Vec::new(),
        env: Vec::new(),
    };
    let data = agent.data();
    cp.enroll_agent("db1", &data.display().to_string());
    agent.launch().await;
    cp.wait_status("db1", "online", Duration::from_secs(10))
        .await;
    let agent_id = first_agent_id(&cp).await;
    let tasks_path = format!("/api/v1/agents/{agent_id}/tasks");

    // Through the control plane: created on the agent, refused with the agent's reason.
    let created = cp
        .api(Method::POST, &tasks_path, Some(serde_json::json!({"kind": "command", "argv": ["sh", "-c", "echo remote"], "in": "3s", "key": "remote-1"})))
        .await
        .expect("create");
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let task: serde_json::Value = serde_json::from_slice(&created.body).expect("json");
    let task_id = task["id"].as_str().expect("id").to_string();
    assert_eq!(task["status"], "scheduled");
    // The audit log says exactly what will run.
    let audit: serde_json::Value = serde_json::from_slice(
        &cp.api(Method::GET, "/api/v1/audit?action=task.created", None)
            .await
            .expect("audit")
            .body,
    )
    .expect("json");
    assert_eq!(audit[0]["target"], task_id.as_str(), "{audit}");
    assert_eq!(
        audit[0]["detail"]["argv"],
        serde_json::json!(["sh", "-c", "echo remote"]),
        "{audit}"
    );
    let refused = cp
        .api(
            Method::POST,
            &tasks_path,
            Some(serde_json::json!({"kind": "bogus"})),
        )
        .await
        .expect("answer");
    assert_eq!(refused.status, 400);
    assert!(String::from_utf8_lossy(&refused.body).contains("unknown kind"));
    // Each request is on record before it is sent, and its outcome after, by one request id.
    let audit_of = |action: &'static str| {
        let cp = &cp;
        async move {
            let r = cp
                .api(Method::GET, &format!("/api/v1/audit?action={action}"), None)
                .await
                .expect("audit");
            serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")
        }
    };
    let requested = audit_of("task.requested").await;
    assert_eq!(requested.as_array().map(Vec::len), Some(2), "{requested}");
    let refusals = audit_of("task.refused").await;
    assert_eq!(
        refusals[0]["detail"]["request"],
        requested[0]["detail"]["request"]
    );
    assert_eq!(requested[0]["detail"]["kind"], "bogus");
    assert_eq!(
        audit[0]["detail"]["request"],
        requested[1]["detail"]["request"]
    );
    assert_eq!(requested[1]["detail"]["argv"], audit[0]["detail"]["argv"]);
    let dup = cp
        .api(
            Method::POST,
            &tasks_path,
            Some(serde_json::json!({"kind": "command", "argv": ["true"], "key": "remote-1"})),
        )
        .await
        .expect("answer");
    assert_eq!(dup.status, 400, "{}", String::from_utf8_lossy(&dup.body));
    assert!(String::from_utf8_lossy(&dup.body).contains(&task_id));

    // The run happens while the control plane is dead.
    cp.proc.take().expect("running").0.kill().expect("kill -9");
    agent.wait_status(&task_id, "done").await;
    cp.launch();
    cp.wait_healthy().await;
    let listed = || async {
        let r = cp.api(Method::GET, &tasks_path, None).await.expect("list");
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")
    };
    let done = until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let seen = listed().await;
            seen.as_array()
                .and_then(|a| a.iter().find(|t| t["id"] == task_id.as_str()))
                .is_some_and(|t| t["status"] == "done")
                .then_some(seen)
        },
    )
    .await;
    let seen = match done {
        Some(seen) => seen,
        None => listed().await,
    };
    let stored = seen
        .as_array()
        .and_then(|a| a.iter().find(|t| t["id"] == task_id.as_str()))
        .cloned()
        .expect("task listed");
    assert_eq!(stored["status"], "done", "{seen}");
    assert_eq!(stored["runs"][0]["exit_code"], 0);

    // Cancel through the control plane.
    let later = cp
        .api(Method::POST, &tasks_path, Some(serde_json::json!({"kind": "command", "argv": ["true"], "in": "1h", "key": "remote-2"})))
        .await
        .expect("create");
    let later: serde_json::Value = serde_json::from_slice(&later.body).expect("json");
    let cancel = cp
        .api(
            Method::POST,
            &format!("{tasks_path}/{}/cancel", later["id"].as_str().expect("id")),
            None,
        )
        .await
        .expect("cancel");
    assert_eq!(
        cancel.status,
        200,
        "{}",
        String::from_utf8_lossy(&cancel.body)
    );
    let canceled: serde_json::Value = serde_json::from_slice(&cancel.body).expect("json");
    assert_eq!(canceled["status"], "canceled");
    let unknown = cp
        .api(Method::GET, "/api/v1/agents/agt_nobody/tasks", None)
        .await
        .expect("answer");
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_can_be_rescheduled_and_bad_reschedules_are_refused() {
    let agent = Agent::start(&[]).await;
    let id = agent.ok(&[
        "add", "command", "--in", "1h", "--key", "moved", "--", "true",
    ]);
    let before = agent.show(&id);
    let out = agent.ok(&["reschedule", &id, "--in", "1s", "--json"]);
    let after: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        after["next_run_at"].as_str() < before["next_run_at"].as_str(),
        "{before} → {after}"
    );
    agent.wait_status(&id, "done").await;
    for (args, needle) in [
        (
            vec!["reschedule", id.as_str(), "--in", "1m"],
            "already ended",
        ),
        (vec!["reschedule", "t_nope", "--in", "1m"], "no task"),
        (vec!["reschedule", id.as_str()], "give the new schedule"),
        (
            vec!["reschedule", id.as_str(), "--cron", "nonsense"],
            "--cron",
        ),
    ] {
        let out = agent.tasks(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let periodic = agent.ok(&[
        "add", "command", "--in", "1h", "--key", "to-cron", "--", "true",
    ]);
    let task: serde_json::Value = serde_json::from_str(&agent.ok(&[
        "reschedule",
        &periodic,
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--json",
    ]))
    .expect("json");
    assert_eq!(task["schedule"], "cron 0 3 * * * Europe/Berlin");
    assert!(
        task["next_run_at"]
            .as_str()
            .is_some_and(|t| t.contains("T02:00:00") || t.contains("T01:00:00")),
        "{task}"
    );
}

/// Tests run as root (here and in CI); the check needs another user to connect as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_refuses_other_users_by_mode_and_by_peer_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let open_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let socket = open_dir.path().join("agent.sock");
    let socket_arg = socket.display().to_string();
    let agent = Agent::start(&["--socket", &socket_arg]).await;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    let as_nobody = || {
        std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(agent_bin())
            .args(["tasks", "list", "--socket", &socket_arg])
            .output()
            .expect("runuser (util-linux)")
    };
    let out = as_nobody();
    assert!(
        !out.status.success(),
        "nobody listed tasks through a 0660 socket"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Even when an operator opens the socket up, the peer-credential check refuses.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let out = as_nobody();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not use the agent API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = agent.ok(&["list"]);
}

/// A run keeper on its own: it says hello, runs one command after another in the same
/// process (announcing a start after 20 ms, or with the end of a shorter command), each in a process group of its own with no signal blocked (whatever the keeper
/// blocks), keeps the first `output_max` bytes and counts the rest, reports a command that
/// cannot start without a start, records each end in its slot, and when its agent is gone
/// (stdin closed) finishes the run in hand, records it and exits, leaving the unacknowledged
/// end in its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_runs_commands_one_after_another_and_records_each_end() {
    use std::io::{BufRead, Read, Write};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("keepers");
    let mut keeper = std::process::Command::new(agent_bin())
        .args(["keeper", "--dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start a keeper");
    let mut requests = keeper.stdin.take().expect("stdin");
    let mut answers = std::io::BufReader::new(keeper.stdout.take().expect("stdout"));
    let mut next = move || -> (serde_json::Value, Vec<u8>) {
        let mut line = String::new();
        answers.read_line(&mut line).expect("an answer");
        let reply: serde_json::Value = serde_json::from_str(&line).expect("json");
        let mut output = vec![0u8; reply["output"].as_u64().unwrap_or(0) as usize];
        answers.read_exact(&mut output).expect("output");
        (reply, output)
    };
    let mut ask = |run_id: i64, output_max: u64, argv: &[&str]| {
        let request = serde_json::json!({
            "kind": "start", "run_id": run_id, "output_max": output_max, "argv": argv,
            "env_clear": true, "env": [["PATH", "/usr/bin:/bin"], ["WHO", "the keeper"]],
            "run_uid": null,
        });
        writeln!(requests, "{request}").expect("send");
    };
    let slot_file = std::fs::read_dir(&dir)
        .ok()
        .and_then(|mut d| d.next())
        .map(|e| e.expect("entry").path());
    let (hello, _) = next();
    assert_eq!(hello["protocol"], 1, "{hello}");
    let slot_file = slot_file
        .or_else(|| {
            std::fs::read_dir(&dir)
                .ok()?
                .next()
                .map(|e| e.expect("entry").path())
        })
        .expect("the keeper's slot");
    let slot = || -> serde_json::Value {
        let text = std::fs::read_to_string(&slot_file).expect("slot");
        let line = text.lines().next().expect("header");
        serde_json::from_str(line.split_once(' ').expect("checksum").1).expect("json")
    };
    assert!(
        slot_file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{}-", keeper.id()))),
        "{slot_file:?}"
    );

    ask(1, 5, &["sh", "-c", "echo started by $WHO; exec sleep 300"]);
    let (started, _) = next();
    assert_eq!(started["kind"], "started", "{started}");
    let pid = started["pid"].as_i64().expect("pid").to_string();
    assert_eq!(slot()["state"], "running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let pgrp = stat[stat.rfind(')').expect("comm") + 1..]
        .split_whitespace()
        .nth(2)
        .map(str::to_string);
    assert_eq!(pgrp.as_ref(), Some(&pid), "the command leads its own group");
    until_true(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { std::fs::metadata(&slot_file).is_ok_and(|m| m.len() > 4096) },
    )
    .await;
    let ok = std::process::Command::new("kill")
        .args(["-TERM", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(ok.success());
    let (ended, output) = next();
    assert_eq!(ended["kind"], "exited", "{ended}");
    assert_eq!(ended["exit"]["signal"], 15, "{ended}");
    // "started by the keeper\n" is 22 bytes: 5 kept, the rest counted.
    assert_eq!(output, b"start");
    assert_eq!(ended["exit"]["dropped"], 17, "{ended}");
    assert_eq!(slot()["state"], "ended");
    assert_eq!(slot()["exit"]["signal"], 15);

    ask(2, 100, &["sh", "-c", "grep SigBlk /proc/self/status"]);
    let (ended, output) = next();
    assert_eq!(ended["exit"]["exit_code"], 0, "{ended}");
    assert!(
        ended["pid"].as_i64().is_some(),
        "a command ended within 20 ms is announced with its end: {ended}"
    );
    assert_eq!(
        String::from_utf8_lossy(&output).trim(),
        "SigBlk:\t0000000000000000",
        "the command starts with no signal blocked"
    );

    ask(3, 100, &["/nonexistent/program"]);
    let (refused, _) = next();
    assert_eq!(refused["kind"], "exited", "no start: {refused}");
    let error = refused["exit"]["error"].as_str().unwrap_or("");
    assert!(error.contains("start /nonexistent/program"), "{refused}");

    ask(4, 100, &["sleep", "300"]);
    let pid = next().0["pid"].as_i64().expect("pid").to_string();
    drop(requests);
    until_true(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { slot()["drained"] == true },
    )
    .await;
    assert!(
        alive(&keeper.id().to_string()),
        "it finishes the run in hand"
    );
    let ok = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = keeper.wait().expect("wait");
    assert!(status.success(), "it ends after its run: {status}");
    let left = slot();
    assert_eq!(
        (&left["state"], &left["run_id"], &left["exit"]["signal"]),
        (&"ended".into(), &4.into(), &9.into()),
        "the unacknowledged end stays in the slot: {left}"
    );
}

/// The agent's keepers: its children whose argv is `outpost-agent keeper …`.
fn keepers_of(agent: &Agent) -> Vec<String> {
    let agent_pid = agent.proc.as_ref().expect("running").0.id().to_string();
    all_cmdlines()
        .into_iter()
        .filter(|(pid, cmd)| {
            cmd.contains(" keeper --dir ") && parent_of(pid).as_deref() == Some(&agent_pid)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// A keeper killed under a run in flight: that run is recorded `aborted` with the reason, its
/// command is stopped, and the next run gets a new keeper; a keeper whose run ended is
/// reused for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_keeper_aborts_its_run_stops_its_command_and_is_replaced() {
    let agent = Agent::start(&[]).await;
    let first = agent.ok(&["add", "command", "--key", "first", "--", "true"]);
    agent.wait_status(&first, "done").await;
    let keeper = keepers_of(&agent).pop().expect("a keeper runs");
    let marker = format!("killed-keeper-{}", std::process::id());
    let (second, _) = agent.add_marked_sleeper(&marker).await;
    assert_eq!(
        keepers_of(&agent),
        vec![keeper.clone()],
        "the idle keeper is reused"
    );
    let command = until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { marked(&marker).into_iter().next() },
    )
    .await
    .expect("the command runs");
    assert_eq!(parent_of(&command).as_deref(), Some(keeper.as_str()));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &keeper])
        .status()
        .expect("kill");
    assert!(killed.success());
    let task = agent.wait_status(&second, "aborted").await;
    let error = task["runs"][0]["error"].as_str().unwrap_or("");
    assert!(error.contains("keeper ended without recording"), "{task}");
    let gone = until_true(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { marked(&marker).is_empty() },
    )
    .await;
    assert!(gone, "the dead keeper's command is left running");
    let third = agent.ok(&["add", "command", "--key", "third", "--", "true"]);
    agent.wait_status(&third, "done").await;
    let now = keepers_of(&agent);
    assert!(!now.is_empty() && !now.contains(&keeper), "{now:?}");
    let log = std::fs::read_to_string(agent.dir.path().join("agent-0.log")).unwrap_or_default();
    assert!(log.contains("a run keeper was lost"), "{log}");
}

/// A keeper that stops answering (SIGSTOP) is given up after 10 s: it is killed, its run is
/// recorded as never started (its slot never named it, and a dead keeper starts nothing), and
/// the next run gets a new keeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_keeper_is_replaced_and_its_run_never_starts() {
    let agent = Agent::start(&[]).await;
    let first = agent.ok(&["add", "command", "--key", "first", "--", "true"]);
    agent.wait_status(&first, "done").await;
    let keeper = keepers_of(&agent).pop().expect("a keeper runs");
    let signal = |sig: &str, pid: &str| {
        std::process::Command::new("kill")
            .args([sig, pid])
            .status()
            .expect("kill")
            .success()
    };
    assert!(signal("-STOP", &keeper));
    let marker = agent.dir.path().join("ran");
    let stuck = agent.ok(&[
        "add",
        "command",
        "--key",
        "stuck",
        "--",
        "touch",
        marker.to_str().expect("utf8"),
    ]);
    let task = agent.wait_status(&stuck, "failed").await;
    let error = task["runs"][0]["error"].as_str().unwrap_or("");
    assert!(error.contains("did not answer within 10 s"), "{task}");
    assert!(error.contains("before it started the run"), "{task}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!alive(&keeper), "the hung keeper was killed");
    assert!(!marker.exists(), "the given-up run never ran");
    let next = agent.ok(&["add", "command", "--key", "next", "--", "true"]);
    agent.wait_status(&next, "done").await;
    assert!(!keepers_of(&agent).contains(&keeper));
}

/// After a reboot a run's unsynced claim may be lost with the power: a run in flight in an
/// earlier boot is recorded `aborted` and never run again, even with no trace of its process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_from_an_earlier_boot_are_aborted_never_rerun() {
    let mut agent = Agent::start(&[]).await;
    let marker = agent.dir.path().join("ran");
    let script = format!("echo x >> {}; exec sleep 300", marker.display());
    let id = agent.ok(&["add", "command", "--key", "boot", "--", "sh", "-c", &script]);
    agent.wait_status(&id, "doing").await;
    // "doing" is set once the keeper started the run; wait until the command itself ran.
    until_true(
        Duration::from_secs(2),
        Duration::from_millis(10),
        || async { std::fs::read_to_string(&marker).is_ok_and(|m| m.lines().count() == 1) },
    )
    .await;
    agent.kill_9();
    // The "power loss": the run's processes die and the keepers' unsynced slots are gone.
    lose_keepers(&agent);
    let db = rusqlite::Connection::open(agent.data().join("tasks.db")).expect("open");
    let stored: String = db
        .query_row("SELECT value FROM host WHERE name = 'boot_id'", [], |r| {
            r.get(0)
        })
        .expect("the agent stores the boot id");
    let booted = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(stored, booted.trim());
    db.execute("UPDATE host SET value = 'an-earlier-boot'", [])
        .expect("update");
    drop(db);

    agent.launch().await;
    let task = agent.show(&id);
    assert_eq!(task["status"], "aborted", "{task}");
    assert_eq!(
        task["runs"].as_array().map(Vec::len),
        Some(1),
        "not run again: {task}"
    );
    assert!(
        task["runs"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("host restarted"),
        "{task}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ran = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(ran.lines().count(), 1, "the command ran once");
}

/// An agent running as root runs task commands as root only when its config says so: without
/// `[tasks] run_as` a command is refused with the reason; with `run_as = "nobody"` it runs as
/// nobody. (Tests run as root.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_commands_run_as_the_configured_user_and_never_as_root_by_default() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let unset = tmp.path().join("unset.toml");
    std::fs::write(&unset, "[tasks]\nconcurrency_max = 2\n").expect("config");
    let agent = Agent::start(&["--config", unset.to_str().expect("utf8")]).await;
    let id = agent.ok(&["add", "command", "--key", "refused", "--", "id", "-un"]);
    let task = agent.wait_status(&id, "failed").await;
    let error = task["runs"][0]["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("run_as is not set") && error.contains("never get those rights"),
        "{task}"
    );
    drop(agent);

    let nobody = tmp.path().join("nobody.toml");
    std::fs::write(&nobody, "[tasks]\nrun_as = \"nobody\"\n").expect("config");
    let agent = Agent::start(&["--config", nobody.to_str().expect("utf8")]).await;
    let id = agent.ok(&[
        "add",
        "command",
        "--key",
        "who",
        "--",
        "sh",
        "-c",
        "id -un; echo \"$HOME\"",
    ]);
    agent.wait_status(&id, "done").await;
    let logs = agent.ok(&["logs", &id]);
    let mut lines = logs.lines();
    assert_eq!(lines.next(), Some("nobody"), "{logs}");
    assert_eq!(
        lines.next(),
        Some("/nonexistent"),
        "the user's own environment: {logs}"
    );

    let missing = tmp.path().join("missing.toml");
    std::fs::write(&missing, "[tasks]\nrun_as = \"no-such-user-here\"\n").expect("config");
    let out = run(
        &agent_bin(),
        &[
            "run",
            "--config",
            missing.to_str().expect("utf8"),
            "--data-dir",
            "/nonexistent/x",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tasks.run_as: no such user"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The host limits what the control plane may do there, whoever holds the control plane:
/// `[tasks] remote_kinds`, `[tasks] dump_dirs` and `[terminal] enabled`, each refused
/// remotely with the agent's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_policy_limits_what_the_control_plane_may_run_there() {
    use crate::harness::ControlPlane;
    use http::Method;
    let cp = ControlPlane::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dumps = tmp.path().join("dumps");
    std::fs::create_dir(&dumps).expect("dumps dir");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks]\nrun_as = \"root\"\nremote_kinds = [\"command\", \"pg_dump\"]\ndump_dirs = [\"{}\"]\n[terminal]\nenabled = false\n",
            dumps.display()
        ),
    )
    .expect("config");
    let (agent, agent_id) = online_with_config(&cp, &config).await;
    let tasks_path = format!("/api/v1/agents/{agent_id}/tasks");
    let add = |body: serde_json::Value| cp.post(&tasks_path, body);

    let (status, body) = add(serde_json::json!({"kind": "health_check"})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("[tasks] remote_kinds allows: pg_dump, command"),
        "{body}"
    );
    let (status, body) = add(serde_json::json!({"kind": "pg_dump", "params": {"database": "app", "path": "/etc/cron.d/evil"}})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not under [tasks] dump_dirs"), "{body}");
    let (status, body) = add(serde_json::json!({"kind": "command", "argv": ["true"]})).await;
    assert_eq!(status, 201, "{body}");
    // The host's own users (the task socket) are not limited by remote_kinds.
    let local = agent.tasks(&["add", "health_check"]);
    let said = String::from_utf8_lossy(&local.stderr);
    assert!(!said.contains("remote_kinds"), "{said}");

    let open = cp
        .api(
            Method::POST,
            "/api/v1/terminal/sessions",
            Some(serde_json::json!({ "agent_id": agent_id })),
        )
        .await
        .expect("answer");
    let body = String::from_utf8_lossy(&open.body);
    assert_ne!(open.status.as_u16(), 201, "{body}");
    assert!(body.contains("[terminal] enabled = false"), "{body}");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount (util-linux)");
        assert!(
            out.status.success(),
            "mount a tmpfs (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Write zeros until the filesystem is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        // Large blocks, then ever smaller ones: not even a short status file may fit.
        for size in [64 * 1024, 4096, 1] {
            let block = vec![0u8; size];
            while f.write(&block).is_ok_and(|n| n > 0) {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Found by the chaos suite: a full data disk made the task store's write fail, which
/// stopped the whole agent (metrics and terminal with it). Now the runtime waits and retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_task_runtime_and_the_agent_stays_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(&dir.path().join("agent"), 8);
    let mut agent = Agent {
        dir,
        proc: None,
        extra: Vec::new(),
        env: Vec::new(),
    };
    agent.launch().await;
    let id = agent.ok(&[
        "add", "command", "--every", "1s", "--key", "tick", "--", "sleep", "2",
    ]);
    let runs = |agent: &Agent| agent.show(&id)["runs"].as_array().map_or(0, Vec::len);
    until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { runs(&agent) >= 2 },
    )
    .await;
    let filler = disk.fill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let proc = agent.proc.as_mut().expect("started");
    assert!(
        proc.is_running(),
        "the agent stopped on a full disk: {}",
        std::fs::read_to_string(agent.dir.path().join("agent-0.log")).unwrap_or_default()
    );
    std::fs::remove_file(filler).expect("free the disk");
    let before = runs(&agent);
    until_true(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { runs(&agent) >= before + 2 },
    )
    .await;
    let after = runs(&agent);
    assert!(
        after >= before + 2,
        "runs go on once there is room: {before} → {after}"
    );
    // A run whose command ended while the disk was full is recorded as it ended, never as
    // killed for want of a status its keeper could not write.
    let task = agent.show(&id);
    for run in task["runs"].as_array().into_iter().flatten() {
        let error = run["error"].as_str().unwrap_or_default();
        assert!(!error.contains("without recording"), "{run}");
    }
    agent.kill_9();
}

/// The processes whose argv holds `marker`.
fn marked(marker: &str) -> Vec<String> {
    all_cmdlines()
        .into_iter()
        .filter(|(pid, cmd)| cmd.contains(marker) && alive(pid))
        .map(|(pid, _)| pid)
        .collect()
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
}

/// A run's keeper (what supervises its command) dying at each point of a run, with the agent
/// alive: after it recorded its intent but before the command starts, just after the command
/// started but before its pid is recorded (its output pipe's holders are stopped then), and
/// after it ended but before its end is recorded. Each time the run is recorded `aborted`
/// with the reason, it is never run again, and nothing it started is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_dying_at_any_point_aborts_its_run_once_and_leaves_nothing_running() {
    let points: [(&'static str, &str, std::ops::RangeInclusive<usize>); 3] = [
        ("keeper.after_intent:1", "sleep 30; true", 0..=0),
        ("keeper.after_spawn:1", "sleep 30; true", 0..=1),
        ("keeper.before_status:1", "exit 3", 1..=1),
    ];
    for (point, then, ran) in points {
        let agent = Agent::start_with_env(&[], &[("OUTPOST_CHAOS_CRASH_AT", point)]).await;
        let ledger = agent.dir.path().join("ledger");
        let marker = format!("keeper-death-{}", std::process::id());
        let script = format!("echo ran >> {}; {then}", ledger.display());
        let id = agent.ok(&["add", "command", "--", "sh", "-c", &script, &marker]);
        let task = agent.wait_status(&id, "aborted").await;
        let runs = task["runs"].as_array().cloned().unwrap_or_default();
        assert_eq!(runs.len(), 1, "{point}: never run again: {task}");
        assert!(
            runs[0]["error"]
                .as_str()
                .unwrap_or("")
                .contains("keeper ended without recording"),
            "{point}: {task}"
        );
        let gone = until_true(
            Duration::from_secs(5),
            Duration::from_millis(50),
            || async { marked(&marker).is_empty() },
        )
        .await;
        assert!(gone, "{point}: left running: {:?}", marked(&marker));
        let times = std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .count();
        assert!(
            ran.contains(&times),
            "{point}: the command ran {times} times"
        );
    }
}

/// A run's keeper and its agent both killed -9 while the command runs: the next agent
/// records the run `aborted`, never runs it again, and stops the command the dead keeper
/// left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_killed_with_its_agent_leaves_no_orphan_and_its_run_aborted() {
    let mut agent = Agent::start(&[]).await;
    let marker = format!("keeper-and-agent-{}", std::process::id());
    let (id, _) = agent.add_marked_sleeper(&marker).await;
    let command = until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { marked(&marker).into_iter().next() },
    )
    .await
    .expect("the command runs");
    let keeper = parent_of(&command).expect("the command's parent");
    agent.kill_9();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &keeper])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert!(
        alive(&command),
        "the command outlives its keeper until an agent stops it"
    );
    agent.launch().await;
    let task = agent.wait_status(&id, "aborted").await;
    assert_eq!(
        task["runs"].as_array().map(Vec::len),
        Some(1),
        "never run again: {task}"
    );
    let gone = until_true(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { !alive(&command) },
    )
    .await;
    assert!(gone, "the dead keeper's command is left running: {task}");
}

/// The agent dying right after it handed a run to its keeper, before it heard the run start
/// (crash point `task.after_handover`), while the keeper is slow to read it (delay point
/// `keeper.before_request`, 3 s): the next agent waits for the dead agent's keepers to read
/// all it sent before it decides anything, so it finds the run started, adopts it and
/// records its real end. The command ran once (an agent that decided at once would have
/// found no trace of the run and run it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_dying_as_it_hands_a_run_over_has_it_run_once_with_its_real_end() {
    let mut agent = Agent::start_with_env(
        &[],
        &[
            ("OUTPOST_CHAOS_CRASH_AT", "task.after_handover:1"),
            ("OUTPOST_CHAOS_DELAY_AT", "keeper.before_request:3000"),
        ],
    )
    .await;
    let ledger = agent.dir.path().join("ledger");
    let script = format!("echo ran >> {}; sleep 1; exit 3", ledger.display());
    // The agent may die before it answers: the task is committed before its run is handed over.
    let _ = agent.tasks(&[
        "add", "command", "--key", "handover", "--", "sh", "-c", &script,
    ]);
    let pid = agent.proc.as_ref().expect("started").0.id().to_string();
    let died = until_true(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { !alive(&pid) },
    )
    .await;
    assert!(died, "the agent reached its crash point");
    agent.kill_9();
    agent.env.clear();
    agent.launch().await;
    let listed: serde_json::Value =
        serde_json::from_str(&agent.ok(&["list", "--json"])).expect("json");
    let id = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["key"] == "handover")
        .and_then(|t| t["id"].as_str())
        .expect("the task was stored")
        .to_string();
    agent.wait_status(&id, "failed").await;
    // A second run, were there one, would have ended by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let task = agent.show(&id);
    assert_eq!(task["runs"].as_array().map(Vec::len), Some(1), "{task}");
    assert_eq!(task["runs"][0]["exit_code"], 3, "its real end: {task}");
    let ran = std::fs::read_to_string(&ledger).unwrap_or_default();
    assert_eq!(ran.lines().count(), 1, "the command ran once");
    let left = stale_slots(&agent);
    assert!(left.is_empty(), "{left:?}");
}

/// The cancel that raced adoption: a long command is added and the agent killed -9 right
/// after each of 8 dispatches and started again; then all 8 tasks are cancelled. Every run
/// ends `canceled` once, and no process of theirs is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_runs_adopted_right_after_their_dispatch_leaves_nothing_running() {
    const ROUNDS: usize = 8;
    let mut agent = Agent::start(&[]).await;
    let marker = format!("cancel-race-{}", std::process::id());
    let mut ids = Vec::new();
    for round in 0..ROUNDS {
        let key = format!("race{round}");
        let script = "sleep 300; true";
        ids.push(agent.ok(&[
            "add", "command", "--key", &key, "--", "sh", "-c", script, &marker,
        ]));
        tokio::time::sleep(Duration::from_millis(3 * round as u64)).await;
        agent.kill_9();
        agent.launch().await;
    }
    for id in &ids {
        agent.ok(&["cancel", id]);
    }
    for id in &ids {
        let task = agent.wait_status(id, "canceled").await;
        let runs = task["runs"].as_array().cloned().unwrap_or_default();
        assert!(runs.len() <= 2, "{task}");
    }
    let gone = until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { marked(&marker).is_empty() },
    )
    .await;
    assert!(
        gone,
        "left running after every cancel answered: {:?}",
        marked(&marker)
    );
}

/// An agent upgraded from a version before run keepers finds a run its predecessor left in a
/// run directory (`runs/RUN_ID`: the wrapper's claim, output and status): it adopts the
/// wrapper still running, records the end the wrapper wrote, and removes the directory once
/// that end is committed. Here the test plays the old wrapper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_in_a_run_directory_by_an_older_agent_is_adopted_and_recorded() {
    let mut agent = Agent::start(&[]).await;
    let marker = format!("old-run-{}", std::process::id());
    let (id, task) = agent.add_marked_sleeper(&marker).await;
    let run_id = task["runs"][0]["run_id"].as_i64().expect("run id");
    agent.kill_9();
    // What the older agent would have left: no keeper, no slot, a run directory.
    lose_keepers(&agent);
    let dir = agent.data().join("runs").join(run_id.to_string());
    std::fs::create_dir_all(&dir).expect("run dir");
    let wrapper = std::process::Command::new("setsid")
        .args([
            "sh",
            "-c",
            "sleep 1; printf 'old output' > output; \
             printf '{\"exit_code\":5,\"signal\":null,\"error\":null,\"dropped\":0}' > status",
        ])
        .current_dir(&dir)
        .spawn()
        .expect("the old wrapper");
    let pid = wrapper.id();
    let ticks = agent::tasks::process::start_ticks(pid as i32).expect("start ticks");
    std::fs::write(dir.join("claim"), format!("started {pid} {ticks}\n")).expect("claim");
    agent.launch().await;
    let task = agent.wait_status(&id, "failed").await;
    assert_eq!(task["runs"].as_array().map(Vec::len), Some(1), "{task}");
    assert_eq!(task["runs"][0]["exit_code"], 5, "the end it wrote: {task}");
    assert_eq!(agent.ok(&["logs", &id]), "old output");
    let removed = until_true(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { !dir.exists() },
    )
    .await;
    assert!(removed, "the run directory outlived its committed end");
    drop(wrapper);
}

/// A window that gates task runs (effect `allow`) reaches the agent with a task that names it:
/// the task created outside the window waits for the window's next opening, its agent keeps
/// the window (so it holds while the control plane is away), and names that are no window,
/// mute-only windows and windows that do not select the agent (by the labels its config set)
/// are refused with the reason. A task marked critical whose run fails raises
/// `critical_task_failed` for its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_gate_runs_on_the_agent_and_a_failed_critical_task_alerts() {
    use crate::harness::ControlPlane;
    use http::Method;
    let tmp = tempfile::tempdir().expect("tempdir");
    let cp_config = tmp.path().join("outpost.toml");
    std::fs::write(
        &cp_config,
        "alert_evaluate_every = \"1s\"\nalert_group_wait = \"1s\"\n",
    )
    .expect("config");
    let cp =
        ControlPlane::start_with(&[], &["--config", cp_config.to_str().expect("utf8")], true).await;
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        "[tasks]\nrun_as = \"root\"\n[terminal]\nenabled = false\n[labels]\nenv = \"prod\"\ncluster = \"main\"\n",
    )
    .expect("config");
    let (agent, agent_id) = online_with_config(&cp, &config).await;
    // The labels in the agent's config reach the control plane with its hello.
    let r = cp
        .api(Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let agents: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        agents[0]["labels"],
        serde_json::json!({"env": "prod", "cluster": "main"}),
        "{agents}"
    );
    // Twelve hours from now (UTC hours), so the window is closed while the test runs.
    let hour: u32 = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .hour()
        .try_into()
        .expect("hour");
    let cron = format!("0 {} * * *", (hour + 12) % 24);
    for (name, effect, agents) in [
        ("nightly", "allow", "env=prod"),
        ("quiet", "mute", "db*"),
        ("elsewhere", "both", "cluster=other"),
    ] {
        let (status, body) = cp
            .post(
                "/api/v1/windows",
                serde_json::json!({"name": name, "cron": cron, "duration": "1h", "agents": [agents],
                "effect": effect, "cutoff": (effect != "mute").then_some("10m")}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let tasks = format!("/api/v1/agents/{agent_id}/tasks");
    let task = |window: &str| {
        serde_json::json!({"kind": "command", "argv": ["true"], "key": format!("gated-{window}"),
            "window": {"name": window}})
    };
    for (window, reason) in [
        ("nope", "no window named"),
        ("quiet", "only mutes notices"),
        ("elsewhere", "does not select agent db1"),
    ] {
        let (status, body) = cp.post(&tasks, task(window)).await;
        assert_eq!(status, 400, "{window}: {body}");
        assert!(body.contains(reason), "{window}: {body}");
    }
    let (status, body) = cp
        .post(
            &tasks,
            serde_json::json!({"kind": "command", "argv": ["true"],
            "window": {"name": "nightly", "cron": "* * * * *"}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("give only its name"), "{body}");
    let (status, body) = cp.post(&tasks, task("nightly")).await;
    assert_eq!(status, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(created["window"], "nightly", "{created}");
    // Due now, it waits for the window: the agent moved its next run to the opening.
    let id = created["id"].as_str().expect("id").to_string();
    let opening = format!("T{:02}:00:00", (hour + 12) % 24);
    let shown = until(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = agent.tasks(&["show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let waits = v["next_run_at"]
            .as_str()
            .is_some_and(|next| next.contains(&opening));
        async move { waits.then_some(v) }
    })
    .await;
    let shown = shown.unwrap_or_else(|| panic!("the run waits for {opening}"));
    assert_eq!(shown["status"], "scheduled", "{shown}");
    assert!(
        shown["runs"].as_array().is_some_and(Vec::is_empty),
        "{shown}"
    );

    // A critical task whose run fails raises the alert on its agent.
    let (status, body) = cp
        .post(
        &tasks,
        serde_json::json!({"kind": "command", "argv": ["false"], "key": "must-work", "critical": true}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let firing = until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let r = cp.api(Method::GET, "/api/v1/alerts", None).await?;
            let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
            v["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["rule"] == "critical_task_failed" && a["phase"] == "firing")
                .cloned()
        },
    )
    .await;
    let firing = firing.unwrap_or_else(|| panic!("no critical_task_failed alert: {}", cp.log()));
    assert_eq!(firing["agent"], "db1", "{firing}");
    assert!(
        firing["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("command must-work:")),
        "{firing}"
    );
}

/// A run dispatched ahead (the agent keeps one ready per slot) waits for a free slot: its
/// command does not start while the slot is taken, not after a kill -9 of the agent either
/// (the next agent withdraws it, leaving no record, and runs it again once a slot is free: the
/// adopted run still holds it), and a cancel
/// while it waits ends it `canceled` with its command never started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_a_slot_never_starts_early_and_cancels_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[tasks]\nrun_as = \"root\"\nconcurrency_max = 1\n").expect("config");
    let mut agent = Agent::start(&["--config", config.to_str().expect("utf8")]).await;
    let (long, _) = agent.add_marked_sleeper("slot-holder").await;
    let marker = tmp.path().join("waiter-ran");
    let script = format!("touch {}", marker.display());
    let waiter = agent.ok(&[
        "add", "command", "--key", "waiter", "--", "sh", "-c", &script,
    ]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        agent.show(&waiter)["status"],
        "queued",
        "{}",
        agent.show(&waiter)
    );
    assert!(!marker.exists(), "the waiting run's command started");

    agent.kill_9();
    agent.launch().await;
    agent.wait_status(&long, "doing").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !marker.exists(),
        "the waiting run's command started after the restart"
    );

    agent.ok(&["cancel", &waiter]);
    let task = agent.wait_status(&waiter, "canceled").await;
    let runs = task["runs"].as_array().expect("runs");
    assert_eq!(
        runs.len(),
        1,
        "the run withdrawn at the restart left no record: {task}"
    );
    assert_eq!(runs[0]["status"], "canceled", "{task}");
    assert!(
        runs[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("never started"),
        "{task}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!marker.exists(), "a canceled waiting run's command started");
    assert_eq!(
        agent.show(&long)["status"],
        "doing",
        "the slot holder is untouched"
    );
    agent.ok(&["cancel", &long]);
    agent.wait_status(&long, "canceled").await;
}
