//! The task runtime through the real binary: `outpost-agent run` and `outpost-agent tasks …`
//! over its Unix socket, including kill -9 in the middle of a run.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::harness::{Proc, agent_bin, run};

struct Agent {
    dir: tempfile::TempDir,
    proc: Option<Proc>,
    extra: Vec<String>,
}

impl Agent {
    async fn start(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut agent = Agent {
            dir,
            proc: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        agent.launch().await;
        agent
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    async fn launch(&mut self) {
        let data = self.data();
        let mut args = vec![
            "run".to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        args.extend(self.extra.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", self.proc.is_some() as u8));
        self.proc = Some(Proc::spawn(&agent_bin(), &args, &log));
        for _ in 0..200 {
            if self.tasks(&["list"]).status.success() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "agent API did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn tasks(&self, args: &[&str]) -> Output {
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

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tasks(args);
        assert!(
            out.status.success(),
            "tasks {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn show(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["show", id, "--json"])).expect("json")
    }

    /// Poll until the task's status is `want`.
    async fn wait_status(&self, id: &str, want: &str) -> serde_json::Value {
        for _ in 0..300 {
            let t = self.show(id);
            if t["status"] == want {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("task {id} not {want}: {}", self.show(id));
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
