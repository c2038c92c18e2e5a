//! `outpost demo`, the README's first command, through headless Chromium: the real binary
//! with its throwaway Postgres and enrolled agent; the page shows the agent online, its
//! charts, a task, a working psql terminal and the audit log. Ctrl+C leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("addr").port()
}

/// `outpost demo` on `listen` in `data_dir`, stdout piped (its url/user/password lines).
fn spawn_demo(data_dir: &std::path::Path, listen: &str, stderr: Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["demo", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start outpost demo")
}

#[test]
fn the_demo_works_in_a_browser_and_cleans_up_after_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("demo");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut demo = spawn_demo(&data_dir, &listen, Stdio::piped());
    let stderr = demo.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut found = std::collections::BTreeMap::new();
    for line in BufReader::new(demo.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
    {
        if let Some((key, value)) = line.split_once(": ") {
            found.insert(key.to_string(), value.to_string());
        }
        if found.contains_key("password") {
            break;
        }
    }
    let Some(password) = found.get("password").cloned() else {
        let _ = demo.wait();
        panic!(
            "the demo did not print url/user/password:\n{}",
            errors.join().unwrap_or_default()
        );
    };
    assert_eq!(found.get("url"), Some(&format!("http://{listen}")));
    assert_eq!(found.get("user").map(String::as_str), Some("admin"));

    // A viewer too, made the way an operator would, to check what the UI hides from it.
    let mut viewer = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "admin",
            "create-user",
            "watcher",
            "--role",
            "viewer",
            "--password-stdin",
        ])
        .arg("--data-dir")
        .arg(data_dir.join("control-plane"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run outpost admin create-user");
    {
        use std::io::Write;
        let mut stdin = viewer.stdin.take().expect("stdin");
        stdin
            .write_all(b"viewer-password-1234\n")
            .expect("write password");
    }
    assert!(viewer.wait().expect("wait").success());

    // A long-lived token for a scraper: /metrics shows the demo's agent online.
    let cp_dir = data_dir.join("control-plane");
    let token = |user: &str| {
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["admin", "api-token", user, "--ttl", "400d", "--data-dir"])
            .arg(&cp_dir)
            .output()
            .expect("run outpost admin api-token")
    };
    let unknown = token("nobody");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("create-user nobody"));
    let issued = token("watcher");
    assert!(issued.status.success(), "{issued:?}");
    let bearer = String::from_utf8_lossy(&issued.stdout).trim().to_string();
    let scrape = Command::new("curl")
        .args(["-sf", "-H", &format!("authorization: Bearer {bearer}")])
        .arg(format!("{}/metrics", found["url"]))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        text.lines()
            .any(|l| l == "outpost_agents{status=\"online\"} 1"),
        "scrape with the issued token:\n{text}"
    );

    let shots = fixtures::browser::screenshots_dir("demo");
    let browser = fixtures::browser::run_script(
        "demo.mjs",
        &[
            ("OUTPOST_URL", found["url"].as_str()),
            ("OUTPOST_USER", "admin"),
            ("OUTPOST_PASSWORD", password.as_str()),
            ("OUTPOST_VIEWER", "watcher"),
            ("OUTPOST_VIEWER_PASSWORD", "viewer-password-1234"),
        ],
        &shots,
    );

    // Ctrl+C: everything stops and the data dir goes.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break status;
        }
        waited += Duration::from_millis(100);
        if waited > Duration::from_secs(60) {
            let _ = demo.kill();
            panic!("the demo did not stop within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = errors.join().unwrap_or_default();
    if let Err(e) = browser {
        panic!("{e:#}\ndemo output:\n{log}");
    }
    assert!(status.success(), "demo exit {status}:\n{log}");
    assert!(
        !data_dir.exists(),
        "the demo left {} behind:\n{log}",
        data_dir.display()
    );
    let leftovers = Command::new("pgrep")
        .args(["-f", &data_dir.display().to_string()])
        .output()
        .expect("run pgrep (Debian package procps)");
    assert!(
        leftovers.stdout.is_empty(),
        "processes still running from the demo: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
}

/// Even a SIGKILLed demo (no chance to clean up) takes its Postgres and agent with it.
#[test]
fn a_killed_demo_takes_postgres_and_the_agent_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("demo");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut demo = spawn_demo(&data_dir, &listen, Stdio::null());
    let printed = BufReader::new(demo.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("password: "));
    assert!(printed, "the demo did not start");
    let running = |what: &str| {
        let out = Command::new("pgrep")
            .args(["-f", what])
            .output()
            .expect("run pgrep (Debian package procps)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let pg = data_dir.join("pg").display().to_string();
    let agent = data_dir.join("agent").display().to_string();
    assert!(!running(&pg).is_empty(), "postgres runs");
    assert!(!running(&agent).is_empty(), "the agent runs");
    // The demo's Postgres trusts whoever reaches its socket: only its owner (and root, as the
    // agent here) may. Another local user is refused at the socket's directory.
    let psql_as = |user: Option<&str>| {
        let mut command = match user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={user}"),
                    "--regid=nogroup",
                    "--clear-groups",
                    "--",
                    "psql",
                ]);
                c
            }
            None => Command::new("psql"),
        };
        command
            .args([
                "-X",
                "-h",
                &pg,
                "-p",
                "5432",
                "-U",
                "postgres",
                "-Atc",
                "select 42",
            ])
            .output()
            .expect("run psql (Debian package postgresql-client)")
    };
    let owner = psql_as(None);
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout).trim(),
        "42",
        "root reaches the demo's Postgres: {}",
        String::from_utf8_lossy(&owner.stderr)
    );
    let other = psql_as(Some("nobody"));
    assert!(
        !other.status.success(),
        "another local user reached the demo's Postgres: {}",
        String::from_utf8_lossy(&other.stdout)
    );
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    demo.kill().expect("SIGKILL");
    let _ = demo.wait();
    let mut waited = Duration::ZERO;
    while !(running(&pg).is_empty() && running(&agent).is_empty()) {
        assert!(
            waited < Duration::from_secs(30),
            "still running 30 s after the demo was killed: postgres [{}] agent [{}]",
            running(&pg),
            running(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
}
