//! A control plane running in-process on 127.0.0.1 with its own SQLite data dir.

use std::time::Duration;

use bytes::Bytes;
use control_plane::auth::{self, Role, SecretKind};
use control_plane::settings::Settings;
use control_plane::state::AppState;
use control_plane::storage::{Storage, UserRow};
use http::{HeaderMap, Method};
use tokio_util::sync::CancellationToken;
use world::{HttpResponse, World};

pub struct Server {
    pub world: World,
    pub storage: Storage,
    pub state: AppState,
    pub base: url::Url,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

pub fn fast_settings() -> Settings {
    Settings {
        heartbeat_interval: Duration::from_millis(200),
        dead_after: Duration::from_millis(1000),
        session_ttl: Duration::from_secs(3600),
        ..Settings::default()
    }
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(fast_settings()).await
    }

    pub async fn start_with(settings: Settings) -> Server {
        Server::start_custom(settings, None).await
    }

    /// With `streams` as the terminal stream store instead of the in-process one.
    pub async fn start_custom(
        settings: Settings,
        streams: Option<control_plane::terminal::Streams>,
    ) -> Server {
        let world = World::real();
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = control_plane::server::open_storage(&world, dir.path(), None)
            .await
            .expect("open storage");
        let listener = world.net().bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let base = url::Url::parse(&format!("http://{addr}")).expect("url");
        let shutdown = CancellationToken::new();
        let mut state = AppState::new(world.clone(), storage.clone(), settings, shutdown.clone());
        if let Some(streams) = streams {
            state = state.with_terminal(control_plane::terminal::Terminal::new(
                streams,
                control_plane::terminal::TerminalSettings::default(),
            ));
        }
        let task = tokio::spawn(control_plane::server::run(
            state.clone(),
            listener,
            shutdown.clone().cancelled_owned(),
        ));
        Server {
            world,
            storage,
            state,
            base,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    /// A control plane running in another process on `port` over `storage`, once it answers
    /// `/healthz`: requests go there, nothing is served in-process.
    pub async fn connect(world: &World, storage: &Storage, port: u16) -> Server {
        let base = url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        let health = base.join("/healthz").expect("url");
        let up =
            fixtures::poll::until_true(Duration::from_secs(30), Duration::from_millis(100), || {
                let health = health.clone();
                async move {
                    world::http_request(
                        world,
                        Method::GET,
                        &health,
                        HeaderMap::new(),
                        Bytes::new(),
                        Duration::from_secs(2),
                        4096,
                    )
                    .await
                    .is_ok_and(|r| r.status == 200)
                }
            })
            .await;
        assert!(
            up,
            "the control plane on port {port} did not come up within 30 s"
        );
        let shutdown = CancellationToken::new();
        Server {
            world: world.clone(),
            storage: storage.clone(),
            state: AppState::new(
                world.clone(),
                storage.clone(),
                fast_settings(),
                shutdown.clone(),
            ),
            base,
            shutdown,
            task: None,
            _dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Its data directory (the SQLite file `outpost admin` and `outpost notify` open).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Create a user with `role` and return an API token for it.
    pub async fn token_for(&self, name: &str, role: Role) -> String {
        let hash = auth::hash_password([1; 16], "a-long-enough-password").expect("hash");
        self.storage
            .create_user(UserRow {
                id: auth::new_id(&self.world, "usr"),
                name: name.to_string(),
                role,
                password_hash: hash,
                created_at_ms: self.world.now_unix_ms(),
            })
            .await
            .expect("create user");
        let response = self
            .request(
                Method::POST,
                "/api/v1/sessions",
                None,
                format!(r#"{{"username":"{name}","password":"a-long-enough-password"}}"#),
            )
            .await;
        assert_eq!(response.status, 200, "{:?}", response.body);
        let v: serde_json::Value = serde_json::from_slice(&response.body).expect("json");
        v["token"].as_str().expect("token").to_string()
    }

    pub async fn enroll_token(&self) -> String {
        let token = auth::new_secret(&self.world, SecretKind::EnrollToken);
        let now = self.world.now_unix_ms();
        self.storage
            .create_enroll_token(&auth::secret_hash(&token), now, now + 3_600_000)
            .await
            .expect("store enroll token");
        token
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: impl Into<Bytes>,
    ) -> HttpResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(token) = bearer {
            headers.insert(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            );
        }
        self.request_with(method, path, headers, body).await
    }

    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> HttpResponse {
        let url = self.base.join(path).expect("url");
        world::http_request(
            &self.world,
            method,
            &url,
            headers,
            body.into(),
            Duration::from_secs(10),
            1 << 20,
        )
        .await
        .expect("request")
    }

    /// Enroll an agent over HTTP; returns (agent_id, credential).
    pub async fn enroll(&self, name: &str) -> (String, String) {
        let token = self.enroll_token().await;
        let body = serde_json::to_vec(&proto::EnrollRequest {
            token,
            name: name.to_string(),
            enrollment_id: format!("enr_{name}"),
            labels: Default::default(),
        })
        .expect("json");
        let r = self
            .request(Method::POST, proto::ENROLL_PATH, None, body)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let answer: proto::EnrollResponse = serde_json::from_slice(&r.body).expect("json");
        (answer.agent_id, answer.credential)
    }

    pub async fn agents(&self, token: &str) -> serde_json::Value {
        let r = self
            .request(Method::GET, "/api/v1/agents", Some(token), "")
            .await;
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).expect("json")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .expect("join")
                .expect("serve");
        }
    }
}

/// Deliver metric `records` (`(kind, data)`) as agent `credential` would, stamped `ts_ms`.
pub async fn deliver(
    server: &Server,
    credential: &str,
    epoch: &str,
    ts_ms: i64,
    records: &[(&str, serde_json::Value)],
) {
    let records: Vec<serde_json::Value> = records
        .iter()
        .enumerate()
        .map(|(i, (kind, data))| serde_json::json!({"seq": i + 1, "ts_ms": ts_ms, "kind": kind, "data": data}))
        .collect();
    let body = serde_json::json!({"epoch": epoch, "records": records}).to_string();
    let r = server
        .request(Method::POST, proto::METRICS_PATH, Some(credential), body)
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("addr").port()
}

/// `outpost serve` on `port` against `database_url` (a replica of a pair sharing it), with
/// fast alert timing and `extra` flags.
pub fn replica(
    dir: &std::path::Path,
    port: u16,
    database_url: &str,
    extra: &[&str],
) -> std::process::Child {
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "alert_group_wait = \"0s\"\nalert_evaluate_every = \"1s\"\nalert_lease_ttl = \"3s\"\n",
    )
    .expect("config");
    std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            database_url,
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{port}")))
        .args(extra)
        .env("OUTPOST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start outpost serve")
}

/// An API token of a new user `name` with `role`, made directly in `storage`.
pub async fn token_in(storage: &Storage, world: &World, name: &str, role: Role) -> String {
    let token = auth::new_secret(world, SecretKind::ApiToken);
    let user = UserRow {
        id: auth::new_id(world, "usr"),
        name: name.into(),
        role,
        password_hash: "unused".into(),
        created_at_ms: world.now_unix_ms(),
    };
    storage.create_user(user.clone()).await.expect("user");
    let now = world.now_unix_ms();
    storage
        .create_api_token(&auth::secret_hash(&token), &user.id, now, now + 3_600_000)
        .await
        .expect("token");
    token
}

/// Two `outpost serve` replicas sharing a database on a real Postgres, with `extra` flags,
/// and an API token of a user with `role`; a `Server` handle talks to the first.
pub struct Pair {
    pub _pg: fixtures::Postgres,
    pub world: World,
    pub storage: Storage,
    pub ports: [u16; 2],
    pub replicas: Vec<std::process::Child>,
    pub token: String,
    pub _dir: tempfile::TempDir,
}

impl Pair {
    pub async fn start(database: &str, extra: &[&str], role: Role) -> Pair {
        let pg = fixtures::Postgres::start().await.expect("postgres");
        let url = pg.create_database(database).expect("database");
        let world = World::real();
        let dir = tempfile::tempdir().expect("dir");
        let storage = control_plane::server::open_storage(&world, dir.path(), Some(&url))
            .await
            .expect("storage");
        let ports = [free_port(), free_port()];
        let replicas = ports
            .iter()
            .map(|p| replica(dir.path(), *p, &url, extra))
            .collect();
        let token = token_in(&storage, &world, "pair-user", role).await;
        Pair {
            _pg: pg,
            world,
            storage,
            ports,
            replicas,
            token,
            _dir: dir,
        }
    }

    /// A handle on replica `i`, once it answers.
    pub async fn server(&self, i: usize) -> Server {
        Server::connect(&self.world, &self.storage, self.ports[i]).await
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}
