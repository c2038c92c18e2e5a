//! The browser psql terminal end to end: real `outpost` and `outpost-agent`, real Postgres
//! and psql in a PTY, real Redis, and a WebSocket client speaking the browser protocol.

use fixtures::poll::until_true;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use world::{World, WsStream};

use crate::harness::{ControlPlane, Proc, agent_bin};

/// What a test waits for at most before it fails (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

/// A control plane (or two), one enrolled agent with psql pointed at a fresh database.
struct Rig {
    /// Where the browser goes.
    cp: ControlPlane,
    /// Where the agent goes, when that is another replica.
    agent_cp: Option<ControlPlane>,
    agent_id: String,
    /// The database psql is connected to.
    dsn: String,
    /// The control plane's own database, when it is PostgreSQL.
    cp_db: Option<String>,
    _agent: Proc,
    _dir: tempfile::TempDir,
}

async fn rig(
    cp: ControlPlane,
    agent_cp: Option<ControlPlane>,
    postgres: &fixtures::Postgres,
    terminal: &str,
) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("agent");
    let d = data.display().to_string();
    agent_cp.as_ref().unwrap_or(&cp).enroll_agent("db1", &d);
    let dsn = postgres
        .create_database(&format!("term_{}", crate::harness::free_port()))
        .expect("create database");
    let config = dir.path().join("agent.toml");
    // Tests run as root: psql may run as root only when the config says so.
    let run_as = if terminal.contains("run_as") {
        ""
    } else {
        "run_as = \"root\"\n"
    };
    std::fs::write(&config, format!("[terminal]\n{run_as}{terminal}\n")).expect("write config");
    let agent = Proc::spawn(
        &agent_bin(),
        &[
            "run",
            "--data-dir",
            &d,
            "--postgres",
            &dsn,
            "--config",
            config.to_str().expect("utf8"),
        ],
        &dir.path().join("agent.log"),
    );
    cp.wait_status("db1", "online", PATIENCE).await;
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let v: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let agent_id = v[0]["id"].as_str().expect("id").to_string();
    Rig {
        cp,
        agent_cp,
        agent_id,
        dsn,
        cp_db: None,
        _agent: agent,
        _dir: dir,
    }
}

/// Two replicas sharing a fresh database `db` and `redis`: the browser talks to the first
/// (`cp`), the agent is enrolled with and dials the second (`agent_cp`).
async fn two_replicas(pg: &fixtures::Postgres, redis: &fixtures::Redis, db: &str) -> Rig {
    let db = pg.create_database(db).expect("database");
    let storage = ["--database-url", db.as_str()];
    let serve = ["--redis-url", &redis.url()];
    let browser_side = ControlPlane::start_with(&storage, &serve, true).await;
    let agent_side = ControlPlane::start_with(&storage, &serve, false).await;
    let mut rig = rig(browser_side, Some(agent_side), pg, "").await;
    rig.cp_db = Some(db);
    rig
}

impl Rig {
    fn agent_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `POST /api/v1/terminal/sessions`: `(status, body)`.
    async fn create(&self, agent_id: &str) -> (u16, serde_json::Value) {
        let r = self
            .cp
            .api(
                http::Method::POST,
                "/api/v1/terminal/sessions",
                Some(serde_json::json!({ "agent_id": agent_id })),
            )
            .await
            .expect("control plane reachable");
        (
            r.status.as_u16(),
            serde_json::from_slice(&r.body).unwrap_or_default(),
        )
    }

    async fn session(&self) -> String {
        let (status, body) = self.create(&self.agent_id).await;
        assert_eq!(status, 201, "create session: {body}\n{}", self.cp.log());
        body["session_id"].as_str().expect("session_id").to_string()
    }
}

/// The browser's view of one WebSocket: bytes by offset, announced gaps, the close.
struct Term {
    ws: WsStream,
    /// Offset of the next byte expected.
    offset: u64,
    screen: Vec<u8>,
    skipped: Vec<(u64, u64)>,
    closed: Option<String>,
    /// `state` frames, in order.
    states: Vec<String>,
    /// `recording` frames' details, in order (empty: the recording is whole).
    recording: Vec<String>,
}

impl Term {
    async fn open(cp: &ControlPlane, session: &str, offset: u64) -> Term {
        Term::open_as(cp, &cp.token, session, offset).await
    }

    /// As [`Term::open`], with another login's token.
    async fn open_as(cp: &ControlPlane, token: &str, session: &str, offset: u64) -> Term {
        let url = url::Url::parse(&format!(
            "{}/api/v1/terminal/sessions/{session}/ws?offset={offset}",
            cp.url()
        ))
        .expect("url");
        let ws = world::ws_connect(&World::real(), &url, Some(token), PATIENCE, 1 << 20)
            .await
            .expect("browser WebSocket");
        let mut term = Term {
            ws,
            offset: u64::MAX,
            screen: Vec::new(),
            skipped: Vec::new(),
            closed: None,
            states: Vec::new(),
            recording: Vec::new(),
        };
        // The first control frame says where this view starts.
        while term.offset == u64::MAX {
            assert!(term.next_frame().await, "closed before the offset frame");
        }
        term
    }

    async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .expect("send input");
    }

    async fn resize(&mut self, cols: u16, rows: u16) {
        let msg = serde_json::json!({"type": "resize", "cols": cols, "rows": rows});
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send resize");
    }

    /// Apply one frame; false when the socket ended. Checks the stream's own invariant:
    /// bytes arrive in order and every gap is announced where it starts.
    async fn next_frame(&mut self) -> bool {
        let frame = match tokio::time::timeout(PATIENCE, self.ws.next()).await {
            Err(_) => panic!(
                "no frame within {PATIENCE:?}; the screen ends:\n{}",
                self.tail()
            ),
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return false,
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            Message::Binary(data) => {
                assert_ne!(self.offset, u64::MAX, "data before the offset frame");
                self.offset += data.len() as u64;
                self.screen.extend_from_slice(&data);
            }
            Message::Text(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).expect("control frame is JSON");
                match v["type"].as_str() {
                    Some("offset") => self.offset = v["offset"].as_u64().expect("offset"),
                    Some("skipped") => {
                        let (from, to) = (
                            v["from"].as_u64().expect("from"),
                            v["to"].as_u64().expect("to"),
                        );
                        assert_eq!(
                            from, self.offset,
                            "a gap must start where the data stopped: {v}"
                        );
                        assert!(to > from, "{v}");
                        self.skipped.push((from, to));
                        self.offset = to;
                    }
                    Some("closed") => {
                        self.closed = Some(v["reason"].as_str().unwrap_or("").to_string())
                    }
                    Some("state") => self
                        .states
                        .push(v["state"].as_str().unwrap_or("").to_string()),
                    Some("recording") => self
                        .recording
                        .push(v["detail"].as_str().unwrap_or("").to_string()),
                    other => panic!("unknown control frame {other:?}: {v}"),
                }
            }
            _ => {}
        }
        true
    }

    fn tail(&self) -> String {
        let from = self.screen.len().saturating_sub(1500);
        String::from_utf8_lossy(&self.screen[from..]).into_owned()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen).into_owned()
    }

    /// Read until the screen contains `needle` (after `from` bytes of it).
    async fn wait_for(&mut self, needle: &str, from: usize) -> usize {
        let mut searched = from;
        loop {
            let start = searched.min(self.screen.len());
            if let Some(at) = find(&self.screen[start..], needle) {
                return start + at + needle.len();
            }
            // Only new bytes (plus an overlap for a needle split across frames) are searched.
            searched = self.screen.len().saturating_sub(needle.len()).max(from);
            assert!(
                self.next_frame().await,
                "socket ended before {needle:?}:\n{}",
                self.tail()
            );
        }
    }
}

fn find(hay: &[u8], needle: &str) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w == needle.as_bytes())
}

/// Read until the session's close arrives.
async fn until_closed(term: &mut Term) -> String {
    while term.closed.is_none() {
        assert!(
            term.next_frame().await || term.closed.is_some(),
            "socket ended without a close"
        );
    }
    term.closed.clone().unwrap_or_default()
}

/// A recording through the API: its row, its `.cast` (header and events), its chain check.
struct Recording {
    view: serde_json::Value,
    header: serde_json::Value,
    events: Vec<(f64, String, String)>,
    verify: serde_json::Value,
}

impl Recording {
    async fn fetch(cp: &ControlPlane, session: &str) -> Recording {
        let get = |path: String| async move {
            let r = cp
                .api(http::Method::GET, &path, None)
                .await
                .expect("control plane reachable");
            assert_eq!(
                r.status,
                200,
                "{path}: {}",
                String::from_utf8_lossy(&r.body)
            );
            r.body
        };
        let path = format!("/api/v1/terminal/recordings/{session}");
        let view = serde_json::from_slice(&get(path.clone()).await).expect("json");
        let cast = get(format!("{path}/cast?download=true")).await;
        let text = String::from_utf8(cast.to_vec()).expect("a cast is UTF-8");
        let mut lines = text.lines();
        let header = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
        let events = lines
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l:?}: {e}")))
            .collect();
        let verify = serde_json::from_slice(&get(format!("{path}/verify")).await).expect("json");
        Recording {
            view,
            header,
            events,
            verify,
        }
    }

    /// The output events joined: the bytes the session showed.
    fn output(&self) -> String {
        self.events
            .iter()
            .filter(|(_, code, _)| code == "o")
            .map(|(_, _, data)| data.as_str())
            .collect()
    }
}

/// Read frames until `done` holds of the view, at most [`PATIENCE`].
async fn until(term: &mut Term, what: &str, done: impl Fn(&Term) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done(term) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {PATIENCE:?}; recording frames {:?}, states {:?}",
            term.recording,
            term.states
        );
        assert!(term.next_frame().await, "socket ended before {what}");
    }
}

/// Run `sql` in the control plane's database (a fault injected from outside).
fn psql(url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql (Debian package postgresql-client)");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn postgres() -> fixtures::Postgres {
    fixtures::Postgres::start()
        .await
        .expect("postgres fixture (Debian package postgresql)")
}

async fn redis() -> fixtures::Redis {
    fixtures::Redis::start()
        .await
        .expect("redis fixture (Debian package redis-server)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_answers_ctrl_c_cancels_and_a_reconnect_replays_from_offset_zero() {
    let (pg, redis) = (postgres().await, redis().await);
    let cp = ControlPlane::start_with(&[], &["--redis-url", &redis.url()], true).await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    term.resize(120, 40).await;
    let prompt = term.wait_for("=#", 0).await;
    let attached = rig
        .cp
        .api(
            http::Method::GET,
            "/api/v1/audit?action=terminal.attached",
            None,
        )
        .await
        .expect("audit");
    let attached: serde_json::Value = serde_json::from_slice(&attached.body).expect("json");
    assert_eq!(attached[0]["target"], session.as_str(), "{attached}");
    assert_eq!(attached[0]["actor"], "admin");
    assert_eq!(attached[0]["detail"]["by_owner"], true);

    term.send("select 6*7 as answer;\r").await;
    let answered = term.wait_for("42", prompt).await;
    term.wait_for("=#", answered).await;

    // Ctrl+C reaches psql as SIGINT: the running statement is cancelled, psql lives on.
    term.send("select pg_sleep(60);\r").await;
    let sleeping = term.wait_for("pg_sleep(60);", answered).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    term.send("\x03").await;
    let cancelled = term
        .wait_for("canceling statement due to user request", sleeping)
        .await;
    term.send("select 'still' || 'here';\r").await;
    term.wait_for("stillhere", cancelled).await;
    let seen = term.text();
    drop(term);

    // A new browser socket from offset 0 replays the whole scrollback, in order.
    let mut replay = Term::open(&rig.cp, &session, 0).await;
    assert_eq!(replay.offset, 0);
    let end = replay.wait_for("stillhere", 0).await;
    let replayed = String::from_utf8_lossy(&replay.screen[..end]).into_owned();
    assert!(
        seen.starts_with(&replayed[..replayed.len().min(seen.len())])
            || replayed.starts_with(&seen[..seen.len().min(replayed.len())]),
        "replay differs from the live view:\nlive:\n{seen}\nreplay:\n{replayed}"
    );
    assert!(
        replay.skipped.is_empty(),
        "nothing was trimmed: {:?}",
        replay.skipped
    );

    // An offset past the end starts at the live end.
    let live = Term::open(&rig.cp, &session, 1 << 40).await;
    assert!(live.offset >= end as u64, "{} < {end}", live.offset);

    // `\q` ends psql; the browser is told and the session is closed.
    replay.send("\\q\r").await;
    while replay.closed.is_none() {
        assert!(
            replay.next_frame().await || replay.closed.is_some(),
            "closed without a reason"
        );
    }
    let r = rig
        .cp
        .api(
            http::Method::GET,
            &format!("/api/v1/terminal/sessions/{session}"),
            None,
        )
        .await
        .expect("show");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["state"], "closed", "{v}\n{}", rig.agent_log());
    // The streams of a closed session expire (10 minutes to replay them, then gone).
    for part in ["meta", "out", "in"] {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port().to_string(),
                "TTL",
                &format!("outpost:term:{session}:{part}"),
            ])
            .output()
            .expect("run redis-cli (Debian package redis-tools)");
        let ttl: i64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(-9);
        assert!((1..=600).contains(&ttl), "{part} has TTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_does_not_stall_psql() {
    let pg = postgres().await;
    // The in-process store (no Redis): the embedded default behind the same interface.
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let mut typist = Term::open(&rig.cp, &session, 0).await;
    let prompt = typist.wait_for("=#", 0).await;
    // A second browser opens and then reads nothing for 10 s.
    let mut stuck = Term::open(&rig.cp, &session, 0).await;

    typist.send("\\pset pager off\r").await;
    let off = typist.wait_for("Pager usage is off.", prompt).await;
    // About 10 MB of output, far more than the socket buffers of the stuck reader.
    typist
        .send("select repeat('x', 100) || n from generate_series(1, 100000) n;\r")
        .await;
    let flood = typist.wait_for("(100000 rows)", off).await;
    typist.send("select 'after' || 'flood';\r").await;
    typist.wait_for("afterflood", flood).await;

    tokio::time::sleep(Duration::from_secs(10)).await;
    // The stuck reader catches up: in order, any trimmed output announced as skipped.
    stuck.wait_for("afterflood", 0).await;
    let received = stuck.screen.len() as u64;
    let skipped: u64 = stuck.skipped.iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        received + skipped,
        stuck.offset,
        "every byte is either received or announced"
    );
    assert!(
        skipped > 0,
        "10 MB through a 4 MiB stream cap must skip some output for a reader that slept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_and_refusals_are_json_errors() {
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "sessions_max = 2").await;
    let (status, body) = rig.create("no-such-agent").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no agent")),
        "{body}"
    );

    let first = rig.session().await;
    let second = rig.session().await;
    let (status, body) = rig.create(&rig.agent_id).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("limit reached")),
        "{body}"
    );

    // Closing one (never attached: no psql was started for it) frees its slot.
    let r = rig
        .cp
        .api(
            http::Method::DELETE,
            &format!("/api/v1/terminal/sessions/{first}"),
            None,
        )
        .await
        .expect("close");
    assert_eq!(r.status, 202);
    let third = fixtures::poll::until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let (status, body) = rig.create(&rig.agent_id).await;
            (status == 201).then_some(body)
        },
    )
    .await;
    assert!(
        third.is_some(),
        "a slot was freed\n{}\n{}",
        rig.agent_log(),
        rig.cp.log()
    );

    // Ending a busy session kills psql's process group: its backend goes away too.
    let mut busy = Term::open(&rig.cp, &second, 0).await;
    let prompt = busy.wait_for("=#", 0).await;
    busy.send("select pg_sleep(600);\r").await;
    busy.wait_for("pg_sleep(600);", prompt).await;
    let sleeping = || {
        let out = std::process::Command::new("psql")
            .args([&rig.dsn, "-At", "-c"])
            .arg("select count(*) from pg_stat_activity where application_name = 'outpost-terminal' and query like '%pg_sleep(600)%' and pid <> pg_backend_pid()")
            .output()
            .expect("run psql (Debian package postgresql-client)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let sleeping = &sleeping;
    until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move { sleeping() == "1" },
    )
    .await;
    assert_eq!(sleeping(), "1", "the terminal's backend runs pg_sleep");
    let r = rig
        .cp
        .api(
            http::Method::DELETE,
            &format!("/api/v1/terminal/sessions/{second}"),
            None,
        )
        .await
        .expect("close");
    assert_eq!(r.status, 202);
    while busy.closed.is_none() {
        assert!(
            busy.next_frame().await,
            "socket ended before the closed frame"
        );
    }
    until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move { sleeping() == "0" },
    )
    .await;
    assert_eq!(
        sleeping(),
        "0",
        "psql and its backend are gone after the session closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_and_agent_on_different_replicas_meet_through_redis() {
    let (pg, redis) = (postgres().await, redis().await);
    let rig = two_replicas(&pg, &redis, "replicas").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    term.send("select 6*7 as answer;\r").await;
    term.wait_for("42", prompt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recording_has_every_byte_once_when_the_replica_holding_the_agent_link_dies() {
    let (pg, redis) = (postgres().await, redis().await);
    let mut rig = two_replicas(&pg, &redis, "recorded").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    assert_eq!(
        term.recording,
        [""],
        "the browser is told the session is recorded"
    );
    term.send("\\pset pager off\r").await;
    let off = term.wait_for("Pager usage is off.", prompt).await;
    // Rows are printed as they are fetched, so output flows for seconds.
    term.send("\\set FETCH_COUNT 20\r").await;
    let off = term.wait_for("=#", off).await;

    // Output flows while the replica holding the agent's link is killed: some of it was in
    // the stream store but in no stored chunk yet.
    term.send("select 'line' || n, pg_sleep(0.001) from generate_series(1, 2000) n;\r")
        .await;
    term.wait_for("line500 ", off).await;
    let agent_cp = rig.agent_cp.as_mut().expect("agent side");
    agent_cp.proc.as_ref().expect("running").signal("-KILL");
    // The agent's ring holds the output while no replica takes it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent_cp.launch();
    agent_cp.wait_healthy().await;
    // The agent comes back through the restarted replica and the session goes on.
    let rows = term.wait_for("(2000 rows)", off).await;
    let restarted_log = agent_cp.log();
    term.send("select 'after' || 'restart';\r").await;
    term.wait_for("afterrestart", rows).await;
    term.send("\\q\r").await;
    let reason = until_closed(&mut term).await;
    assert!(
        term.skipped.is_empty(),
        "the browser saw everything: {:?}",
        term.skipped
    );

    let rec = Recording::fetch(&rig.cp, &session).await;
    assert_eq!(rec.header["version"], 2, "{}", rec.header);
    assert_eq!(rec.verify["valid"], true, "{}", rec.verify);
    assert_eq!(
        rec.view["incomplete"],
        serde_json::Value::Null,
        "{}",
        rec.view
    );
    assert_eq!(
        rec.view["bytes"].as_u64(),
        Some(term.offset),
        "{}",
        rec.view
    );
    let shown = term.text();
    let recorded = rec.output();
    assert!(
        recorded == shown,
        "the recording differs from what the browser showed ({} vs {} bytes); first difference at {:?}",
        recorded.len(),
        shown.len(),
        recorded
            .bytes()
            .zip(shown.bytes())
            .position(|(a, b)| a != b)
    );
    assert!(
        restarted_log.contains("read output no chunk held back from the stream store"),
        "the restarted replica recorded what the killed one had not stored:\n{restarted_log}"
    );
    for n in [1, 499, 500, 1000, 2000] {
        assert_eq!(
            recorded.matches(&format!("line{n} ")).count(),
            1,
            "line{n} recorded once"
        );
    }
    let times: Vec<f64> = rec.events.iter().map(|(t, _, _)| *t).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "event times only go forward"
    );

    // The session's end in the audit log carries the chain's last hash.
    let audit = rig
        .cp
        .api(
            http::Method::GET,
            "/api/v1/audit?action=terminal.ended",
            None,
        )
        .await
        .expect("audit");
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    let ended = &audit[0];
    assert_eq!(ended["target"], session.as_str(), "{audit}");
    assert_eq!(ended["detail"]["reason"], reason.as_str());
    assert_eq!(
        ended["detail"]["recording"]["hash"], rec.verify["hash"],
        "{audit}"
    );

    // Search finds the session by a word it printed, at the moment it was shown.
    let found = rig
        .cp
        .api(
            http::Method::GET,
            "/api/v1/terminal/recordings?q=afterrestart",
            None,
        )
        .await
        .expect("search");
    let found: serde_json::Value = serde_json::from_slice(&found.body).expect("json");
    assert_eq!(found[0]["session_id"], session.as_str(), "{found}");
    let at = found[0]["matches"][0]["at"].as_f64().expect("a moment");
    let shown_at = rec
        .events
        .iter()
        .find(|(_, code, data)| code == "o" && data.contains("afterrestart"))
        .map(|(t, _, _)| *t)
        .expect("in the cast");
    assert!(at <= shown_at, "{at} > {shown_at}");
    let searched = rig
        .cp
        .api(
            http::Method::GET,
            "/api/v1/audit?action=recording.searched",
            None,
        )
        .await
        .expect("audit");
    let searched: serde_json::Value = serde_json::from_slice(&searched.body).expect("json");
    assert_eq!(
        searched[0]["detail"]["words"],
        serde_json::json!(["afterrestart"]),
        "a search is audited: {searched}"
    );

    // The head is held against the hash in the session's end record: a recording rewritten
    // whole (its chain made consistent again) no longer matches it.
    assert_eq!(
        rec.verify["ended_hash"], rec.verify["hash"],
        "{}",
        rec.verify
    );
    let head = rec.verify["hash"].as_str().expect("hash");
    psql(
        rig.cp_db.as_deref().expect("postgres storage"),
        &format!(
            "UPDATE audit SET detail = replace(detail, '{head}', '{}') WHERE action = 'terminal.ended' AND target = '{session}'",
            "0".repeat(head.len())
        ),
    );
    let again = Recording::fetch(&rig.cp, &session).await;
    assert_eq!(again.verify["valid"], false, "{}", again.verify);
    assert!(
        again.verify["problem"]
            .as_str()
            .is_some_and(|p| p.contains("changed after the session ended")),
        "{}",
        again.verify
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_recordings_cannot_be_stored_fail_open_goes_on_and_fail_closed_closes() {
    let pg = postgres().await;

    // fail_open (the default): the session goes on, the user is told, the recording catches
    // up when storage is back.
    let db = pg.create_database("rec_open").expect("database");
    let cp = ControlPlane::start_with(&["--database-url", &db], &[], true).await;
    let r = rig(cp, None, &pg, "").await;
    let session = r.session().await;
    let mut term = Term::open(&r.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    psql(
        &db,
        "ALTER TABLE recording_chunks RENAME TO recording_chunks_away",
    );
    term.send("select 'while' || 'broken';\r").await;
    let shown = term.wait_for("whilebroken", prompt).await;
    until(&mut term, "a notice that the recording is delayed", |t| {
        t.recording
            .last()
            .is_some_and(|d| d.starts_with("recording delayed"))
    })
    .await;
    assert!(term.closed.is_none());
    psql(
        &db,
        "ALTER TABLE recording_chunks_away RENAME TO recording_chunks",
    );
    until(&mut term, "the all-clear", |t| {
        t.recording.last().is_some_and(String::is_empty)
    })
    .await;
    term.send("select 'after' || 'wards';\r").await;
    term.wait_for("afterwards", shown).await;
    term.send("\\q\r").await;
    until_closed(&mut term).await;
    let rec = Recording::fetch(&r.cp, &session).await;
    assert_eq!(rec.verify["valid"], true, "{}", rec.verify);
    assert_eq!(
        rec.view["incomplete"],
        serde_json::Value::Null,
        "{}",
        rec.view
    );
    assert_eq!(
        rec.output(),
        term.text(),
        "nothing was lost while storage was away"
    );
    drop(r);

    // fail_closed: a session whose recording cannot be stored is closed, and none opens.
    let db = pg.create_database("rec_closed").expect("database");
    let cp = ControlPlane::start_with(
        &["--database-url", &db],
        &["--recording-failure", "fail_closed"],
        true,
    )
    .await;
    let r = rig(cp, None, &pg, "").await;
    let session = r.session().await;
    let mut term = Term::open(&r.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    psql(
        &db,
        "ALTER TABLE recording_chunks RENAME TO recording_chunks_away",
    );
    term.send("select 'un' || 'recorded';\r").await;
    term.wait_for("unrecorded", prompt).await;
    let reason = until_closed(&mut term).await;
    assert!(reason.starts_with("recording failed"), "{reason}");
    assert!(
        term.recording
            .iter()
            .any(|d| d.starts_with("recording failed")),
        "{:?}",
        term.recording
    );
    psql(&db, "ALTER TABLE recordings RENAME TO recordings_away");
    let (status, body) = r.create(&r.agent_id).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("fail_closed"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_recording_off_sessions_run_and_nothing_is_recorded() {
    let pg = postgres().await;
    let cp = ControlPlane::start_with(&[], &["--recording", "off"], true).await;
    let r = rig(cp, None, &pg, "").await;
    let session = r.session().await;
    let mut term = Term::open(&r.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    term.send("select 'not' || 'kept';\r").await;
    term.wait_for("notkept", prompt).await;
    term.send("\\q\r").await;
    until_closed(&mut term).await;
    assert!(
        term.recording.is_empty(),
        "told of a recording: {:?}",
        term.recording
    );
    let list =
        r.cp.api(http::Method::GET, "/api/v1/terminal/recordings", None)
            .await
            .expect("list");
    assert_eq!(String::from_utf8_lossy(&list.body), "[]");
    let one =
        r.cp.api(
            http::Method::GET,
            &format!("/api/v1/terminal/recordings/{session}"),
            None,
        )
        .await
        .expect("show");
    assert_eq!(one.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_page_in_headless_chromium_runs_a_query_resizes_and_reconnects() {
    let (pg, redis) = (postgres().await, redis().await);
    let cp = ControlPlane::start_with(&[], &["--redis-url", &redis.url()], true).await;
    let rig = rig(cp, None, &pg, "").await;
    let url = rig.cp.url();
    let shots = fixtures::browser::screenshots_dir("terminal");
    // node runs for a while; the control plane and agent are processes of their own.
    let run = tokio::task::block_in_place(|| {
        fixtures::browser::run_script(
            "terminal.mjs",
            &[
                ("OUTPOST_URL", url.as_str()),
                ("OUTPOST_USER", "admin"),
                ("OUTPOST_PASSWORD", "admin-password-1234"),
                ("OUTPOST_AGENT", "db1"),
            ],
            &shots,
        )
    });
    if let Err(e) = run {
        panic!("{e:#}\ncontrol plane log:\n{}", rig.cp.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_the_session_psql_keeps_running_and_it_recovers() {
    let (pg, redis) = (postgres().await, redis().await);
    let cp = ControlPlane::start_with(&[], &["--redis-url", &redis.url()], true).await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    let prompt = term.wait_for("=#", 0).await;
    term.send("\\pset pager off\r").await;
    let off = term.wait_for("Pager usage is off.", prompt).await;

    let info = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "INFO", "server"])
        .output()
        .expect("run redis-cli (Debian package redis-tools)");
    let pid = String::from_utf8_lossy(&info.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .map(|p| p.trim().to_string())
        .expect("redis process id");
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("kill")
                .success()
        );
    };
    // Redis stops answering (a hung server: the worst kind of failure). psql produces output
    // meanwhile; the agent keeps what its ring holds and announces the rest.
    signal("-STOP");
    term.send("select 'during' || 'outage', n from generate_series(1, 50000) n;\r")
        .await;
    let degraded = async {
        while !term.states.iter().any(|s| s == "degraded") {
            assert!(term.next_frame().await, "socket ended while Redis was down");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), degraded)
        .await
        .expect("the browser is told the session is degraded");
    signal("-CONT");
    term.send("select 'back' || 'again';\r").await;
    term.wait_for("backagain", off).await;
    assert!(
        term.states
            .iter()
            .rev()
            .take_while(|s| *s != "degraded")
            .any(|s| s == "live"),
        "the session is live again: {:?}",
        term.states
    );
}

/// Found by the chaos suite: Redis killed and restarted without persistence lost a session
/// while a browser was attached through a replica that stayed up; the browser then waited on
/// a silent session for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_the_session_closes_it_for_the_browser() {
    let (pg, mut redis) = (postgres().await, redis().await);
    let mut rig = two_replicas(&pg, &redis, "lost").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    term.wait_for("=#", 0).await;
    // kill -9 and a new server on the same port, without persistence: nothing is left. Then
    // the replica holding the agent's link dies too; the agent redials, is told the session
    // does not exist, and ends it. The browser's replica stays up.
    redis.restart().expect("restart redis");
    let agent_cp = rig.agent_cp.as_mut().expect("agent side");
    agent_cp.proc.as_ref().expect("running").signal("-KILL");
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent_cp.launch();
    agent_cp.wait_healthy().await;
    let reason = tokio::time::timeout(PATIENCE, until_closed(&mut term))
        .await
        .expect("the browser is told the session is gone");
    assert!(reason.contains("lost"), "{reason}");
    // A new session works.
    let again = rig.session().await;
    let mut term = Term::open(&rig.cp, &again, 0).await;
    term.wait_for("=#", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_sixteen_terminal_sockets_per_replica() {
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(Term::open(&rig.cp, &session, 0).await);
    }
    let url = url::Url::parse(&format!(
        "{}/api/v1/terminal/sessions/{session}/ws?offset=0",
        rig.cp.url()
    ))
    .expect("url");
    let world = World::real();
    let connect = || world::ws_connect(&world, &url, Some(&rig.cp.token), PATIENCE, 1 << 20);
    let refused = match connect().await {
        Ok(_) => panic!("the 17th socket was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("429"), "{refused}");

    // Closing one frees its slot.
    drop(open.pop());
    let reopened = until_true(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async { connect().await.is_ok() },
    )
    .await;
    assert!(reopened, "a closed socket gave its slot back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_closes_the_browser_sockets_opened_with_that_login() {
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let second_login = rig.cp.login().await;
    let mut term = Term::open_as(&rig.cp, &second_login, &session, 0).await;
    term.wait_for("=#", 0).await;

    let url = url::Url::parse(&format!("{}/api/v1/sessions", rig.cp.url())).expect("url");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {second_login}").parse().expect("header"),
    );
    let out = world::http_request(
        &World::real(),
        http::Method::DELETE,
        &url,
        headers,
        bytes::Bytes::new(),
        PATIENCE,
        1 << 20,
    )
    .await
    .expect("logout");
    assert_eq!(out.status, 204);

    while term.next_frame().await {}
    let reason = term.closed.clone().unwrap_or_default();
    assert!(reason.contains("revoked"), "closed with {reason:?}");
    // The session itself goes on for logins that still stand.
    let mut again = Term::open(&rig.cp, &session, 0).await;
    again.wait_for("=#", 0).await;
}

/// Waits at most `limit` for the socket to be closed with a reason, and returns it.
async fn closed_within(term: &mut Term, limit: Duration) -> String {
    tokio::time::timeout(limit, async { while term.next_frame().await {} })
        .await
        .unwrap_or_else(|_| panic!("still open after {limit:?}"));
    term.closed.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demotion_closes_the_terminal_sockets_the_new_role_does_not_allow() {
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "").await;
    let operator = rig.cp.user("ops", "operator").await;
    let other_admin = rig.cp.user("boss", "admin").await;
    let r = rig
        .cp
        .api_as(
            &operator,
            http::Method::POST,
            "/api/v1/terminal/sessions",
            Some(serde_json::json!({ "agent_id": rig.agent_id })),
        )
        .await
        .expect("control plane reachable");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let session = body["session_id"].as_str().expect("session_id").to_string();
    let mut own = Term::open_as(&rig.cp, &operator, &session, 0).await;
    own.wait_for("=#", 0).await;
    let mut watching = Term::open_as(&rig.cp, &other_admin, &session, 0).await;
    watching.wait_for("=#", 0).await;

    let demote = |name: &'static str, role: &'static str| {
        let cp = &rig.cp;
        async move {
            let r = cp
                .api(
                    http::Method::PATCH,
                    &format!("/api/v1/users/{name}"),
                    Some(serde_json::json!({ "role": role })),
                )
                .await
                .expect("control plane reachable");
            assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        }
    };
    // An admin demoted to operator loses the other user's session it had attached to.
    demote("boss", "operator").await;
    let reason = closed_within(&mut watching, Duration::from_secs(10)).await;
    assert!(
        reason.contains("owner and admins"),
        "closed with {reason:?}"
    );
    // An operator demoted to viewer stops typing into psql.
    demote("ops", "viewer").await;
    let reason = closed_within(&mut own, Duration::from_secs(10)).await;
    assert!(reason.contains("now viewer"), "closed with {reason:?}");
}

/// Copy every entry of `stream` to its end, fields and MAC byte for byte (what a Redis
/// writer without the key can do), in one script; returns how many.
fn copy_entries(redis: &fixtures::Redis, stream: &str) -> usize {
    let script = "local e = redis.call('XRANGE', KEYS[1], '-', '+') \
                  for _, x in ipairs(e) do redis.call('XADD', KEYS[1], '*', unpack(x[2])) end \
                  return #e";
    redis
        .cli(&["EVAL", script, "1", stream])
        .expect("redis-cli")
        .trim()
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_relayed_requests_and_input_in_redis_run_nothing_twice() {
    let pg = postgres().await;
    let redis = redis().await;
    let db = pg.create_database("replay").expect("database");
    let storage = ["--database-url", db.as_str()];
    let serve = ["--redis-url", &redis.url()];
    let browser_side = ControlPlane::start_with(&storage, &serve, true).await;
    let agent_side = ControlPlane::start_with(&storage, &serve, false).await;
    let terminal = "run_as = \"root\"\n[tasks]\nrun_as = \"root\"";
    let mut rig = rig(browser_side, Some(agent_side), &pg, terminal).await;
    psql(&rig.dsn, "CREATE TABLE probe (n int)");

    // A task asked through the replica that does not hold the agent's channel is relayed.
    let runs = rig._dir.path().join("runs");
    let argv = format!("echo run >> {}", runs.display());
    let r = rig
        .cp
        .api(
            http::Method::POST,
            &format!("/api/v1/agents/{}/tasks", rig.agent_id),
            Some(serde_json::json!({"kind": "command", "argv": ["sh", "-c", argv]})),
        )
        .await
        .expect("control plane reachable");
    assert!(
        r.status.is_success(),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let requests = copy_entries(&redis, "outpost:term:requests");
    assert!(requests >= 1, "the task went through the relay");
    let agent_cp = rig.agent_cp.as_ref().expect("two replicas");
    let dropped = agent_cp
        .wait_counter("outpost_relay_replays_dropped_total", |n| n == 1)
        .await;
    assert!(
        dropped,
        "the copy of the relayed request was not refused as handled once"
    );

    // Keystrokes typed through one replica reach psql through the other.
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    term.wait_for("=#", 0).await;
    term.send("INSERT INTO probe VALUES (1);\r").await;
    let at = term.wait_for("INSERT 0 1", 0).await;
    let stream = format!("outpost:term:{session}:in");
    assert!(copy_entries(&redis, &stream) >= 2, "attach and keystrokes");
    redis
        .cli(&[
            "HSET",
            &format!("outpost:term:{session}:meta"),
            "input_cursor",
            "0-0",
        ])
        .expect("redis-cli");
    // A new link (the agent's replica restarts) starts from the cursor set back.
    let agent_cp = rig.agent_cp.as_mut().expect("two replicas");
    drop(agent_cp.proc.take());
    agent_cp.launch();
    agent_cp.wait_healthy().await;
    term.send("SELECT 'after' || 'replay';\r").await;
    term.wait_for("afterreplay", at).await;

    let count = std::process::Command::new("psql")
        .args([rig.dsn.as_str(), "-At", "-c", "SELECT count(*) FROM probe"])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&count.stdout).trim(),
        "1",
        "the INSERT ran once"
    );
    assert!(
        rig.agent_log()
            .contains("terminal input already applied: dropped"),
        "the new link forwarded the entries again and the agent dropped them:\n{}",
        rig.agent_log()
    );
    // Every run of the task has appended its line by now (the copies were read seconds ago).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = std::fs::read_to_string(&runs).unwrap_or_default();
    let tasks = rig
        .cp
        .api(
            http::Method::GET,
            &format!("/api/v1/agents/{}/tasks", rig.agent_id),
            None,
        )
        .await
        .expect("control plane reachable");
    assert_eq!(
        lines.lines().count(),
        1,
        "the relayed task ran once: {}",
        String::from_utf8_lossy(&tasks.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dial_of_a_live_session_with_only_the_agent_credential_is_refused_and_audited() {
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let rig = rig(cp, None, &pg, "").await;
    let session = rig.session().await;
    let mut term = Term::open(&rig.cp, &session, 0).await;
    let at = term.wait_for("=#", 0).await;

    // What any process running as the agent's user can read: the credential and the id.
    let identity = std::fs::read_to_string(rig._dir.path().join("agent/identity.json"))
        .expect("identity.json");
    let identity: serde_json::Value = serde_json::from_str(&identity).expect("json");
    let credential = identity["credential"].as_str().expect("credential");
    let url = url::Url::parse(&format!(
        "{}{}/{session}",
        rig.cp.url(),
        proto::TERMINAL_PATH
    ))
    .expect("url");
    let tap = world::ws_connect(&World::real(), &url, Some(credential), PATIENCE, 1 << 20).await;
    let status = tap.err().and_then(|e| e.http_status());
    assert_eq!(status, Some(403), "a tap of the live session was let in");

    let r = rig
        .cp
        .api(
            http::Method::GET,
            "/api/v1/audit?action=terminal.link_refused",
            None,
        )
        .await
        .expect("control plane reachable");
    let rows: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        rows.as_array().map(Vec::len),
        Some(1),
        "audited once: {rows}"
    );
    assert_eq!(rows[0]["target"], session.as_str(), "{rows}");
    // The session itself goes on.
    term.send("SELECT 'still' || 'here';\r").await;
    term.wait_for("stillhere", at).await;
}

/// `outpost admin rotate-signing-key` against a running pair of replicas: both sign with the
/// new key once its time comes, a session opened before goes on (its records were signed with
/// the old key, still accepted), and with `--old-valid-for 0s` the sessions signed with the
/// retired keys can no longer be attached while a new one works.
#[tokio::test]
async fn signing_keys_rotate_under_live_sessions() {
    let (pg, redis) = (postgres().await, redis().await);
    let rig = two_replicas(&pg, &redis, "rotate_keys").await;
    let db = rig.cp_db.clone().expect("postgres storage");
    let replicas = [&rig.cp, rig.agent_cp.as_ref().expect("second replica")];
    for cp in replicas {
        assert_eq!(cp.counter("outpost_signing_key_id").await, 1);
    }
    // 20 s to activation plus one 15 s refresh.
    let signing_with = |id: u64| async move {
        for cp in replicas {
            let mut switched = false;
            for _ in 0..5 {
                switched = cp.wait_counter("outpost_signing_key_id", |k| k == id).await;
                if switched {
                    break;
                }
            }
            assert!(
                switched,
                "a replica does not sign with key {id}\n{}",
                cp.log()
            );
        }
    };
    let before = rig.session().await;
    let mut old = Term::open(&rig.cp, &before, 0).await;
    let at = old.wait_for("=#", 0).await;

    let rotate = |retire: &str| {
        let out = crate::harness::run(
            &crate::harness::outpost_bin(),
            &[
                "admin",
                "rotate-signing-key",
                "--activate-in",
                "20s",
                "--old-valid-for",
                retire,
                "--database-url",
                &db,
            ],
        );
        assert!(
            out.status.success(),
            "rotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        crate::harness::stdout(&out)
    };
    let said = rotate("1d");
    assert!(said.starts_with("signing key 2 signs from "), "{said}");
    signing_with(2).await;
    old.send("SELECT 'signed' || 'before';\r").await;
    old.wait_for("signedbefore", at).await;
    let during = rig.session().await;
    let mut new = Term::open(&rig.cp, &during, 0).await;
    new.wait_for("=#", 0).await;

    // The keys before key 3 retire when it signs: what they signed can no longer be attached.
    rotate("0s");
    signing_with(3).await;
    for gone in [&before, &during] {
        let url = format!("/api/v1/terminal/sessions/{gone}");
        let r = rig
            .cp
            .api(http::Method::GET, &url, None)
            .await
            .expect("control plane reachable");
        assert_eq!(
            r.status.as_u16(),
            404,
            "a session signed with a retired key is still known: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let after = rig.session().await;
    let mut fresh = Term::open(&rig.cp, &after, 0).await;
    let at = fresh.wait_for("=#", 0).await;
    fresh.send("SELECT 'signed' || 'after';\r").await;
    fresh.wait_for("signedafter", at).await;
}

/// The packaged agent's shape, without a package: the agent runs as an unprivileged user
/// (`daemon`) holding only CAP_SETUID and CAP_SETGID (ambient, as the unit grants them),
/// and task commands and psql run as a user of their own (`nobody`). Neither a `command`
/// task nor psql's `\!` can read the agent's credential, nothing they start keeps a
/// capability, and the agent still stops what they started (a canceled task, a closed
/// session), which needs signals sent as the run user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_setuid_capabilities_runs_cannot_read_the_credential_and_still_stop() {
    use std::os::unix::fs::PermissionsExt;
    let pg = postgres().await;
    let cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = dir.path().join("agent");
    let d = data.display().to_string();
    cp.enroll_agent("db1", &d);
    let chown = std::process::Command::new("chown")
        .args(["-R", "daemon:daemon", &d])
        .status()
        .expect("chown");
    assert!(chown.success());
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let identity = data.join("identity.json").display().to_string();
    let dsn = pg.create_database("caps").expect("database");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[tasks]\nrun_as = \"nobody\"\n[terminal]\nrun_as = \"nobody\"\n",
    )
    .expect("write config");
    // A copy the agent's user can reach wherever the checkout is (under /root it could not).
    let agent_bin = dir.path().join("outpost-agent");
    std::fs::copy(crate::harness::agent_bin(), &agent_bin).expect("copy the agent binary");
    let _agent = Proc::spawn(
        std::path::Path::new("setpriv"),
        &[
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid",
            "--ambient-caps=+setuid,+setgid",
            "--bounding-set=-all,+setuid,+setgid",
            "--",
            agent_bin.to_str().expect("utf8"),
            "run",
            "--data-dir",
            &d,
            "--postgres",
            &dsn,
            "--config",
            config.to_str().expect("utf8"),
        ],
        &dir.path().join("agent.log"),
    );
    cp.wait_status("db1", "online", PATIENCE).await;
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();

    let tasks = |args: &[&str]| {
        let mut all = vec!["tasks"];
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        all.extend_from_slice(&args[..split]);
        all.extend(["--data-dir", &d]);
        all.extend_from_slice(&args[split..]);
        let out = crate::harness::run(&agent_bin, &all);
        assert!(
            out.status.success(),
            "tasks {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let wait_status = |id: String, want: &'static str| {
        let tasks = &tasks;
        async move {
            let shown = until_true(
                Duration::from_secs(30),
                Duration::from_millis(50),
                || async {
                    let shown: serde_json::Value =
                        serde_json::from_str(&tasks(&["show", &id, "--json"])).expect("json");
                    shown["status"] == want
                },
            )
            .await;
            assert!(shown, "task {id} is not {want}:\n{}", agent_log());
        }
    };
    let probe = format!(
        "id -un; grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status; cat {identity} || echo refused"
    );
    let id = tasks(&["add", "command", "--key", "probe", "--", "sh", "-c", &probe]);
    wait_status(id.clone(), "done").await;
    let said = tasks(&["logs", &id]);
    assert!(said.starts_with("nobody\n"), "{said}");
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        assert!(
            said.contains(&format!("{set}:\t0000000000000000")),
            "a run keeps no capability: {said}"
        );
    }
    assert!(said.contains("Permission denied"), "{said}");
    assert!(!said.contains("credential"), "{said}");

    // Canceling a running command stops it, though it runs as another user.
    // A duration no other process has: this test's own.
    let long = format!("{}", 100_000 + std::process::id());
    let id = tasks(&["add", "command", "--key", "long", "--", "sleep", &long]);
    wait_status(id.clone(), "doing").await;
    tasks(&["cancel", &id]);
    wait_status(id, "canceled").await;
    let gone = none_left(&["-u", "nobody", "-f", &format!("sleep {long}")]).await;
    assert!(gone, "the canceled command still runs:\n{}", agent_log());

    // psql and `\!` run as the run user too, and a closed session leaves nothing behind.
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let v: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let agent_id = v[0]["id"].as_str().expect("id");
    let r = cp
        .api(
            http::Method::POST,
            "/api/v1/terminal/sessions",
            Some(serde_json::json!({ "agent_id": agent_id })),
        )
        .await
        .expect("create");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let session: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let session = session["session_id"].as_str().expect("id").to_string();
    let mut term = Term::open(&cp, &session, 0).await;
    let at = term.wait_for("=#", 0).await;
    // The marker is computed by the shell, so the echo of the typed line does not match it.
    term.send(&format!(
        "\\! id -un; cat {identity} || echo shell-$((40+2))\r"
    ))
    .await;
    let at = term.wait_for("shell-42", at).await;
    let text = term.text();
    assert!(text.contains("nobody"), "{text}");
    assert!(text.contains("Permission denied"), "{text}");
    let _ = at;
    let r = cp
        .api(
            http::Method::DELETE,
            &format!("/api/v1/terminal/sessions/{session}"),
            None,
        )
        .await
        .expect("close");
    assert!(r.status.is_success(), "{}", r.status);
    let gone = none_left(&["-u", "nobody", "psql"]).await;
    assert!(gone, "psql outlived its session:\n{}", agent_log());
}

/// Whether, within 5 s, no process matches `pgrep ARGS`.
async fn none_left(args: &[&str]) -> bool {
    until_true(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let found = std::process::Command::new("pgrep")
                .args(args)
                .output()
                .expect("pgrep (Debian package procps)");
            !found.status.success()
        },
    )
    .await
}
