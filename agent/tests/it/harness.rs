//! Runs the real `outpost` and `outpost-agent` binaries in a temp dir.

use fixtures::poll::{until, until_true};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use world::World;

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outpost-agent"))
}

/// `outpost` is built into the same directory as `outpost-agent` by a workspace build.
pub fn outpost_bin() -> PathBuf {
    let path = agent_bin().with_file_name("outpost");
    assert!(
        path.is_file(),
        "{} missing: build the workspace (cargo build --workspace --bins)",
        path.display()
    );
    path
}

pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("OUTPOST_LOG", "warn")
        .output()
        .expect("run binary")
}

pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(bin: &Path, args: &[&str], log: &Path) -> Proc {
        Proc::spawn_with_env(bin, args, &[], log)
    }

    pub fn spawn_with_env(bin: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
        let file = std::fs::File::create(log).expect("log file");
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .env("OUTPOST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn");
        Proc(child)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Wait for the exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.0;
        until(limit, Duration::from_millis(50), || {
            let exited = child.try_wait().ok().flatten();
            async move { exited }
        })
        .await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A control plane started from the binary, with an admin token for the API.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub proc: Option<Proc>,
    pub token: String,
    /// Storage flags for `serve` and `admin` (e.g. `--database-url`).
    pub storage_args: Vec<String>,
    /// Further `serve` flags (e.g. `--redis-url`).
    pub serve_args: Vec<String>,
}

impl ControlPlane {
    /// Run the page test `script` (control-plane/web/tests) in headless Chromium against this
    /// control plane, logged in as the admin, with `env` besides; screenshots go under
    /// `shots`. Panics with the script's error and the control plane's log.
    pub fn page_test(&self, script: &str, shots: &str, env: &[(&str, &str)]) {
        let shots = fixtures::browser::screenshots_dir(shots);
        let url = self.url();
        let mut all = vec![
            ("OUTPOST_URL", url.as_str()),
            ("OUTPOST_USER", "admin"),
            ("OUTPOST_PASSWORD", "admin-password-1234"),
        ];
        all.extend_from_slice(env);
        let run =
            tokio::task::block_in_place(|| fixtures::browser::run_script(script, &all, &shots));
        if let Err(e) = run {
            panic!("{e:#}\ncontrol plane log:\n{}", self.log());
        }
    }

    pub async fn start() -> ControlPlane {
        ControlPlane::start_with(&[], &[], true).await
    }

    /// A control plane with extra storage and serve flags; `create_admin` is false for a
    /// second replica of a shared database, where the admin exists already.
    pub async fn start_with(
        storage_args: &[&str],
        serve_args: &[&str],
        create_admin: bool,
    ) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let data = dir.path().join("cp");
        let data_s = data.to_str().expect("utf8");
        let mut cp = ControlPlane {
            dir,
            port,
            proc: None,
            token: String::new(),
            storage_args: storage_args.iter().map(|s| s.to_string()).collect(),
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
        };
        if create_admin {
            cp.create_admin(data_s);
        }
        cp.launch();
        cp.wait_healthy().await;
        cp.token = cp.login().await;
        cp
    }

    fn create_admin(&self, data_s: &str) {
        create_admin(data_s, &self.storage_args);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cp")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn launch(&mut self) {
        let data = self.data_dir();
        let listen = format!("127.0.0.1:{}", self.port);
        let log = self.dir.path().join("cp.log");
        let mut args: Vec<&str> = vec![
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("utf8"),
        ];
        args.extend(self.storage_args.iter().map(String::as_str));
        args.extend(self.serve_args.iter().map(String::as_str));
        let proc = Proc::spawn(&outpost_bin(), &args, &log);
        self.proc = Some(proc);
    }

    /// Enroll an agent data dir with `outpost-agent enroll` and a fresh token; returns its output.
    pub fn enroll_agent(&self, name: &str, data_dir: &str) -> String {
        let token = self.enroll_token();
        stdout(&run(
            &agent_bin(),
            &[
                "enroll",
                "--control-plane",
                &self.url(),
                "--token",
                &token,
                "--name",
                name,
                "--data-dir",
                data_dir,
            ],
        ))
    }

    pub fn enroll_token(&self) -> String {
        let data = self.data_dir();
        let mut args: Vec<&str> = vec![
            "admin",
            "enroll-token",
            "--ttl",
            "10m",
            "--data-dir",
            data.to_str().expect("utf8"),
        ];
        args.extend(self.storage_args.iter().map(String::as_str));
        let out = run(&outpost_bin(), &args);
        stdout(&out).trim().to_string()
    }

    /// A request with the admin token; `None` if the control plane is unreachable.
    pub async fn api(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<world::HttpResponse> {
        self.api_as(&self.token, method, path, body).await
    }

    /// `POST path` with the admin token: the status and the body as text.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, String) {
        let r = self
            .api(http::Method::POST, path, Some(body))
            .await
            .expect("control plane reachable");
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).to_string(),
        )
    }

    /// As [`ControlPlane::api`], with another login's token.
    pub async fn api_as(
        &self,
        token: &str,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<world::HttpResponse> {
        let world = World::real();
        let url = url::Url::parse(&format!("{}{path}", self.url())).expect("url");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("header"),
        );
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        world::http_request(
            &world,
            method,
            &url,
            headers,
            body.into(),
            Duration::from_secs(20),
            64 << 20,
        )
        .await
        .ok()
    }

    /// The value of the unlabelled counter `name` in `GET /metrics` (admin token).
    pub async fn counter(&self, name: &str) -> u64 {
        let r = self
            .api(http::Method::GET, "/metrics", None)
            .await
            .expect("control plane reachable");
        let text = String::from_utf8_lossy(&r.body);
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    }

    /// Whether counter `name` comes to satisfy `done` within 10 s.
    pub async fn wait_counter(&self, name: &str, done: impl Fn(u64) -> bool) -> bool {
        until_true(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || async { done(self.counter(name).await) },
        )
        .await
    }

    /// Stored metrics of the first enrolled agent; `query` is the query string, e.g. `from=0`.
    pub async fn metrics(&self, query: &str) -> Option<Vec<serde_json::Value>> {
        let r = self.api(http::Method::GET, "/api/v1/agents", None).await?;
        let agents: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let id = agents[0]["id"].as_str()?;
        let r = self
            .api(
                http::Method::GET,
                &format!("/api/v1/agents/{id}/metrics?{query}"),
                None,
            )
            .await?;
        serde_json::from_slice(&r.body).ok()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Option<world::HttpResponse> {
        let world = World::real();
        let url = url::Url::parse(&format!("{}{path}", self.url())).expect("url");
        let mut headers = http::HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        world::http_request(
            &world,
            http::Method::GET,
            &url,
            headers,
            bytes::Bytes::new(),
            Duration::from_secs(2),
            1 << 20,
        )
        .await
        .ok()
    }

    pub async fn wait_healthy(&self) {
        let healthy = until_true(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async {
                self.get("/healthz", None)
                    .await
                    .is_some_and(|r| r.status == 200)
            },
        )
        .await;
        assert!(
            healthy,
            "control plane not healthy within 10 s: {}",
            self.log()
        );
    }

    pub async fn login(&self) -> String {
        let r = self.try_login("admin", "admin-password-1234").await;
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        v["token"].as_str().expect("token").to_string()
    }

    /// A user made with `outpost admin create-user`, logged in; returns the token.
    pub async fn user(&self, name: &str, role: &str) -> String {
        let password = format!("{name}-password-1234");
        create_user(
            self.data_dir().to_str().expect("utf8"),
            &self.storage_args,
            name,
            role,
            &password,
        );
        let r = self.try_login(name, &password).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        v["token"].as_str().expect("token").to_string()
    }

    /// `POST /api/v1/sessions` with `name` and `password`, whatever it answers.
    pub async fn try_login(&self, name: &str, password: &str) -> world::HttpResponse {
        let world = World::real();
        let url = url::Url::parse(&format!("{}/api/v1/sessions", self.url())).expect("url");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("header"),
        );
        let body = serde_json::json!({ "username": name, "password": password }).to_string();
        world::http_request(
            &world,
            http::Method::POST,
            &url,
            headers,
            body.into(),
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .expect("login")
    }

    /// `(status, last_seen)` of `name` in `GET /api/v1/agents`; `None` if unreachable or unlisted.
    pub async fn status(&self, name: &str) -> Option<(String, Option<SystemTime>)> {
        let r = self.get("/api/v1/agents", Some(&self.token)).await?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let agents = v.as_array()?;
        assert!(
            agents.iter().filter(|a| a["name"] == name).count() <= 1,
            "duplicate identity: {v}"
        );
        let agent = agents.iter().find(|a| a["name"] == name)?;
        let seen = agent["last_seen"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        Some((agent["status"].as_str().unwrap_or("").to_string(), seen))
    }

    /// Poll until `name` shows `want` with `last_seen` at or after `since` (so a stale row
    /// left by a killed control plane does not count); returns how long it took.
    pub async fn wait_status_since(
        &self,
        name: &str,
        want: &str,
        since: SystemTime,
        limit: Duration,
    ) -> Duration {
        let start = tokio::time::Instant::now();
        let shown = until_true(limit, Duration::from_millis(50), || async {
            self.status(name)
                .await
                .is_some_and(|(status, seen)| status == want && seen.is_some_and(|s| s >= since))
        })
        .await;
        if shown {
            return start.elapsed();
        }
        panic!(
            "{name} not {want} since {since:?} within {limit:?}; now {:?}\n{}",
            self.status(name).await,
            self.log()
        );
    }

    pub async fn wait_status(&self, name: &str, want: &str, limit: Duration) -> Duration {
        self.wait_status_since(name, want, UNIX_EPOCH, limit).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cp.log")).unwrap_or_default()
    }
}

/// `outpost admin create-user admin --role admin` with password `admin-password-1234`.
pub fn create_admin(data_s: &str, storage_args: &[String]) {
    create_user(
        data_s,
        storage_args,
        "admin",
        "admin",
        "admin-password-1234",
    );
}

/// `outpost admin create-user NAME --role ROLE --password-stdin`.
pub fn create_user(data_s: &str, storage_args: &[String], name: &str, role: &str, password: &str) {
    let mut create = Command::new(outpost_bin())
        .args([
            "admin",
            "create-user",
            name,
            "--role",
            role,
            "--password-stdin",
            "--data-dir",
            data_s,
        ])
        .args(storage_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn create-user");
    {
        use std::io::Write;
        let mut stdin = create.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .expect("write password");
    }
    let out = create.wait_with_output().expect("create-user");
    assert!(stdout(&out).contains(&format!("user: {name}")));
}
