//! Alerts end to end: agents deliver metrics as they do, the rules fire and resolve, and the
//! notifications reach a real HTTP receiver on loopback (one that can refuse for a while).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use http::Method;

use crate::harness::{Server, deliver, fast_settings};
use control_plane::auth::Role;
use control_plane::settings::{AlertTiming, Settings};

/// What the receiver took: (key header, signature header, body).
type Received = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

#[derive(Clone, Default)]
struct Sink {
    received: Received,
    /// Requests refused with 503 before any is taken.
    refuse_first: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    /// Requests left unanswered (for good) before any is taken: a sender stuck mid-send.
    hang_first: Arc<AtomicUsize>,
    /// The key of every request that arrived, taken or not.
    arrived: Arc<Mutex<Vec<String>>>,
}

async fn take(State(sink): State<Sink>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    let key = headers
        .get("x-outpost-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    sink.arrived.lock().expect("lock").push(key);
    if sink.hang_first.load(Ordering::SeqCst) > 0 {
        sink.hang_first.fetch_sub(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
    if sink.refuse_first.load(Ordering::SeqCst) > 0 {
        sink.refuse_first.fetch_sub(1, Ordering::SeqCst);
        sink.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    sink.received.lock().expect("lock").push((
        header("x-outpost-key"),
        header("x-outpost-signature"),
        body,
    ));
    StatusCode::OK
}

/// A receiver on loopback; its URL.
async fn start_sink(world: &world::World, sink: Sink) -> String {
    let listener = world.net().bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(take))
        .with_state(sink);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

fn alert_settings(digest_over: usize) -> Settings {
    Settings {
        alerts: AlertTiming {
            tick: Duration::from_millis(100),
            evaluate_every: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(2),
            group_wait: Duration::from_millis(300),
            digest_over,
            repeat: Duration::from_secs(3600),
        },
        ..fast_settings()
    }
}

async fn webhook(server: &Server, admin: &str, url: &str, secret: &str) {
    let body = serde_json::json!({"name": "ops", "kind": "webhook", "url": url, "secret": secret});
    let r = server
        .request(
            Method::POST,
            "/api/v1/alert-channels",
            Some(admin),
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

async fn received_at_least(
    server: &Server,
    sink: &Sink,
    n: usize,
    within: Duration,
) -> Vec<(String, String, serde_json::Value)> {
    let got = fixtures::poll::until(within, Duration::from_millis(50), || async {
        let r = sink.received.lock().expect("lock").clone();
        (r.len() >= n).then_some(r)
    })
    .await;
    match got {
        Some(got) => got,
        None => {
            let stored = server.storage.alerts().await.expect("alerts");
            let outbox = server
                .storage
                .notifications_pending(100)
                .await
                .expect("outbox");
            panic!(
                "the receiver did not get {n} notifications within {within:?}: {:?}\nalerts: {stored:?}\noutbox: {outbox:?}",
                sink.received.lock().expect("lock")
            )
        }
    }
}

/// A server with fast alert timing and a webhook channel `ops` to a receiver that refuses its
/// first `refuse_first` requests.
async fn with_webhook(digest_over: usize, refuse_first: usize) -> (Server, String, Sink) {
    let server = Server::start_with(alert_settings(digest_over)).await;
    let admin = server.token_for("alert-admin", Role::Admin).await;
    let sink = Sink::default();
    sink.refuse_first.store(refuse_first, Ordering::SeqCst);
    let url = start_sink(&server.world, sink.clone()).await;
    webhook(&server, &admin, &url, "k3y").await;
    (server, admin, sink)
}

fn xid(age: i64) -> serde_json::Value {
    serde_json::json!({ "app": age, "postgres": 1000 })
}

#[tokio::test]
async fn a_rule_fires_reaches_a_signed_webhook_and_resolves() {
    let (server, admin, sink) = with_webhook(20, 0).await;
    let (_, db1) = server.enroll("db1").await;
    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;

    let got = received_at_least(&server, &sink, 1, Duration::from_secs(15)).await;
    let (key, signature, body) = &got[0];
    assert!(
        key.starts_with("xid_age/") && key.ends_with(":firing"),
        "{key}"
    );
    let raw = serde_json::to_vec(body).expect("json");
    // The signature covers the bytes sent; serde_json writes the same bytes back here.
    assert_eq!(
        signature,
        &format!(
            "sha256={}",
            control_plane::alerts::channels::sign("k3y", &raw)
        )
    );
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["alerts"][0]["labels"]["agent"], "db1");
    assert_eq!(body["alerts"][0]["labels"]["severity"], "critical");

    let r = server
        .request(Method::GET, "/metrics", Some(&admin), "")
        .await;
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains(r#"outpost_alerts{rule="xid_age",severity="critical",state="firing"} 1"#)
            && text.contains(r#"outpost_notifications_pending{channel="ops"} 0"#),
        "{text}"
    );
    deliver(
        &server,
        &db1,
        "e2",
        now + 1_000,
        &[("xid_age", xid(500_000_000))],
    )
    .await;
    let got = received_at_least(&server, &sink, 2, Duration::from_secs(15)).await;
    let (key, _, body) = &got[1];
    assert!(key.ends_with(":resolved"), "{key}");
    assert_eq!(body["status"], "resolved");
    assert_ne!(body["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");

    let r = server
        .request(Method::GET, "/api/v1/alerts", Some(&admin), "")
        .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["alerts"][0]["phase"], "resolved", "{v}");
    let phases: Vec<&str> = v["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["phase"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(phases, ["resolved", "firing"], "{v}");

    // The channel test goes at once; no secret is ever shown again.
    let r = server
        .request(
            Method::POST,
            "/api/v1/alert-channels/ops/test",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = received_at_least(&server, &sink, 3, Duration::from_secs(5)).await;
    assert!(got[2].0.starts_with("test:"), "{:?}", got[2]);
    let r = server
        .request(Method::GET, "/api/v1/alert-channels", Some(&admin), "")
        .await;
    assert!(!String::from_utf8_lossy(&r.body).contains("k3y"));
    assert_eq!(sink.received.lock().expect("lock").len(), 3, "nothing more");
    server.stop().await;
}

#[tokio::test]
async fn many_agents_at_once_make_one_digest_and_a_receiver_that_was_down_gets_every_transition_in_order()
 {
    let (server, _admin, sink) = with_webhook(5, 3).await;
    let now = server.world.now_unix_ms();
    let mut agents = Vec::new();
    for i in 0..8 {
        agents.push(server.enroll(&format!("db{i}")).await.1);
    }
    for a in &agents {
        deliver(&server, a, "e1", now, &[("xid_age", xid(1_100_000_000))]).await;
    }
    // Resolve them while the receiver still refuses: both transitions wait in the outbox.
    fixtures::poll::until_true(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { sink.refused.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    for a in &agents {
        deliver(&server, a, "e2", now + 1_000, &[("xid_age", xid(1_000))]).await;
    }
    let got = received_at_least(&server, &sink, 2, Duration::from_secs(30)).await;
    assert_eq!(sink.refused.load(Ordering::SeqCst), 3);
    let statuses: Vec<(&str, usize)> = got
        .iter()
        .map(|(_, _, b)| {
            (
                b["status"].as_str().unwrap_or_default(),
                b["alerts"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [("firing", 8), ("resolved", 8)],
        "one digest each, in order"
    );
    assert!(
        got[0].0.starts_with("digest:xid_age:firing:"),
        "{}",
        got[0].0
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sink.received.lock().expect("lock").len(), 2, "nothing more");
    server.stop().await;
}

#[tokio::test]
async fn a_silence_holds_notices_back_and_what_still_fires_is_sent_when_it_ends() {
    let (server, admin, sink) = with_webhook(20, 0).await;
    let (_, db1) = server.enroll("db1").await;
    let (_, db2) = server.enroll("db2").await;
    // db1 silences itself with its own credential (as `outpost-agent silence` does); a user
    // silences db2 for every rule.
    let r = server
        .request(
            Method::POST,
            proto::SILENCES_PATH,
            Some(&db1),
            r#"{"for":"3s","rule":"xid_age","comment":"nightly pg_dump"}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let mine: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(mine["created_by"], "agent:db1");
    let r = server
        .request(
            Method::POST,
            proto::SILENCES_PATH,
            Some(&db1),
            r#"{"for":"1h","agents":["*"],"comment":"everyone"}"#,
        )
        .await;
    assert_eq!(r.status, 400, "an agent silences only itself");
    let r = server
        .request(
            Method::POST,
            "/api/v1/silences",
            Some(&admin),
            r#"{"for":"1h","agents":["db2"],"comment":"rebuilding db2"}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let db2_silence: serde_json::Value = serde_json::from_slice(&r.body).expect("json");

    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    deliver(&server, &db2, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        sink.received.lock().expect("lock").is_empty(),
        "both silenced"
    );
    // The alerts say what holds them back.
    let r = server
        .request(Method::GET, "/api/v1/alerts", Some(&admin), "")
        .await;
    let listed: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let muted: std::collections::BTreeMap<String, String> = listed["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["agent"].as_str()?.into(), a["muted_by"].as_str()?.into())))
        .collect();
    assert_eq!(
        muted.get("db2").map(String::as_str),
        Some(format!("silence {}", db2_silence["id"].as_str().unwrap_or("")).as_str()),
        "{listed}"
    );
    assert!(
        muted.get("db1").is_some_and(|m| m.starts_with("silence ")),
        "{listed}"
    );
    // db1's silence ends by itself: its still-firing alert goes then; db2's is ended early.
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].2["alerts"][0]["labels"]["agent"], "db1");
    let r = server
        .request(
            Method::DELETE,
            &format!(
                "/api/v1/silences/{}",
                db2_silence["id"].as_str().expect("id")
            ),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(r.status, 204);
    let got = received_at_least(&server, &sink, 2, Duration::from_secs(10)).await;
    assert_eq!(got[1].2["alerts"][0]["labels"]["agent"], "db2");
    server.stop().await;
}

/// The evaluating replica killed with kill -9 while a notification is on its way: the other
/// replica takes the lease over and sends it again with the same key, once; the next
/// transition goes once too, and nothing is left in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluating_replica_killed_mid_send_loses_nothing_and_duplicates_at_most_once() {
    let mut pair = crate::harness::Pair::start("alert_takeover", &[], Role::Admin).await;
    // Stand-ins for the two replicas behind one proxy: every request goes to the first.
    let server = pair.server(0).await;
    let (world, admin) = (pair.world.clone(), pair.token.clone());
    let now = world.now_unix_ms();
    let sink = Sink::default();
    sink.hang_first.store(1, Ordering::SeqCst);
    let hook = start_sink(&world, sink.clone()).await;
    webhook(&server, &admin, &hook, "k3y").await;
    let (_, db1) = server.enroll("db1").await;
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;

    // The first send hangs: its sender is the lease holder (host/pid/…). Kill it.
    let arrived = fixtures::poll::until_true(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { !sink.arrived.lock().expect("lock").is_empty() },
    )
    .await;
    assert!(arrived, "no notification was sent");
    let holder = pair
        .storage
        .lease("alerts")
        .await
        .expect("lease")
        .expect("held")
        .holder;
    let pid: u32 = holder
        .split('/')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("pid in the holder");
    let victim = pair
        .replicas
        .iter()
        .position(|c| c.id() == pid)
        .expect("the holder is one of ours");
    pair.replicas[victim].kill().expect("kill -9");
    let _ = pair.replicas[victim].wait();
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(20)).await;
    let first_key = sink.arrived.lock().expect("lock")[0].clone();
    assert_eq!(got[0].0, first_key, "sent again with the same key");
    let survivor = pair
        .storage
        .lease("alerts")
        .await
        .expect("lease")
        .expect("held")
        .holder;
    assert_ne!(survivor, holder, "the other replica took over");

    // The next transition, through the survivor.
    let server = pair.server(1 - victim).await;
    deliver(&server, &db1, "e2", now + 1_000, &[("xid_age", xid(1_000))]).await;
    let got = received_at_least(&server, &sink, 2, Duration::from_secs(20)).await;
    assert!(got[1].0.ends_with(":resolved"), "{:?}", got[1].0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let arrived = sink.arrived.lock().expect("lock").clone();
    assert_eq!(
        arrived.len(),
        3,
        "one duplicate, of the send cut short: {arrived:?}"
    );
    assert!(
        pair.storage
            .notifications_pending(10)
            .await
            .expect("outbox")
            .is_empty()
    );
}

/// `outpost notify channels` lists channels without their secrets; `outpost notify test`
/// sends through one and says whether it arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_test_sends_through_a_channel_from_the_command_line() {
    let (server, _admin, sink) = with_webhook(20, 0).await;
    let dir = server.data_dir().to_str().expect("utf8").to_string();
    let outpost = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(args)
            .args(["--data-dir", &dir])
            .output()
            .expect("run outpost")
    };
    let out = outpost(&["notify", "channels"]);
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listed.contains("ops") && listed.contains("webhook"),
        "{listed}"
    );
    assert!(!listed.contains("k3y"), "no secret: {listed}");
    let out = outpost(&["notify", "test", "ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(5)).await;
    assert!(got[0].0.starts_with("test:"), "{:?}", got[0]);
    assert_eq!(got[0].2["alerts"][0]["labels"]["alertname"], "outpost_test");
    let out = outpost(&["notify", "test", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outpost notify channels"));
    server.stop().await;
}

/// The Alerts page in headless Chromium (control-plane/web/tests/alerts.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_page_shows_alerts_and_makes_and_ends_a_silence() {
    let (server, _admin, sink) = with_webhook(20, 0).await;
    let (_, db1) = server.enroll("db1").await;
    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    received_at_least(&server, &sink, 1, Duration::from_secs(15)).await;
    let shots = fixtures::browser::screenshots_dir("alerts");
    let url = server.base.to_string();
    let run = tokio::task::block_in_place(|| {
        fixtures::browser::run_script(
            "alerts.mjs",
            &[
                ("OUTPOST_URL", url.as_str()),
                ("OUTPOST_USER", "alert-admin"),
                ("OUTPOST_PASSWORD", "a-long-enough-password"),
            ],
            &shots,
        )
    });
    if let Err(e) = run {
        panic!("{e:#}");
    }
    server.stop().await;
}

/// A maintenance window open now holds db1's notice back (db2's goes); the still-firing alert
/// is sent once the window no longer applies. The window lists its next occurrences.
#[tokio::test]
async fn a_maintenance_window_holds_back_the_agents_it_names() {
    let (server, admin, sink) = with_webhook(20, 0).await;
    // Opens every minute for a minute: open whenever the test runs.
    let window = serde_json::json!({"name": "nightly-dump", "cron": "* * * * *", "tz": "Europe/Berlin",
        "duration": "1m", "agents": ["db1"], "comment": "pg_dump runs"});
    let r = server
        .request(
            Method::POST,
            "/api/v1/windows",
            Some(&admin),
            window.to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = server
        .request(
            Method::POST,
            "/api/v1/windows",
            Some(&admin),
            r#"{"name":"x","cron":"0 25 * * *","duration":"1h","agents":["*"]}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("cron:"));
    let r = server
        .request(Method::GET, "/api/v1/windows", Some(&admin), "")
        .await;
    let listed: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(listed[0]["open"], true, "{listed}");
    assert_eq!(
        listed[0]["next"].as_array().map(Vec::len),
        Some(5),
        "{listed}"
    );

    let (_, db1) = server.enroll("db1").await;
    let (_, db2) = server.enroll("db2").await;
    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    deliver(&server, &db2, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].2["alerts"][0]["labels"]["agent"], "db2");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        sink.received.lock().expect("lock").len(),
        1,
        "db1 is held back"
    );
    let r = server
        .request(
            Method::DELETE,
            "/api/v1/windows/nightly-dump",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(r.status, 204);
    let got = received_at_least(&server, &sink, 2, Duration::from_secs(15)).await;
    assert_eq!(got[1].2["alerts"][0]["labels"]["agent"], "db1");
    server.stop().await;
}

/// 500 agents lose their control plane at once (their last heartbeat at the same time): one
/// digest listing all 500 goes out, not 500 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_agents_going_offline_at_once_make_one_digest() {
    let mut settings = alert_settings(20);
    settings.alerts.group_wait = Duration::from_secs(2);
    let server = Server::start_with(settings).await;
    let admin = server.token_for("alert-admin", Role::Admin).await;
    let sink = Sink::default();
    let url = start_sink(&server.world, sink.clone()).await;
    webhook(&server, &admin, &url, "k3y").await;
    let now = server.world.now_unix_ms();
    for i in 0..500 {
        let token = format!("tok{i}");
        server
            .storage
            .create_enroll_token(&token, now, now + 60_000)
            .await
            .expect("token");
        let id = format!("agt_{i:03}");
        server
            .storage
            .enroll_agent(control_plane::storage::EnrollAttempt {
                token_hash: token,
                enrollment_id: format!("enr{i}"),
                name: format!("db{i:03}"),
                new_agent_id: id.clone(),
                credential_hash: format!("cred{i}"),
                now_ms: now,
            })
            .await
            .expect("enroll");
        server
            .storage
            .agent_connected(&id, &format!("conn{i}"), now)
            .await
            .expect("connected");
    }
    // Offline after 2 s instead of 5 min, for every agent. The override comes after the
    // enrollments, so however long those take, all 500 cross the threshold at one instant.
    let r = server
        .request(
            Method::POST,
            "/api/v1/alert-rules",
            Some(&admin),
            r#"{"name":"fast-offline","rule":"agent_offline","agents":["*"],"critical":2}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // None heartbeats again: all are offline after `dead_after` and fire together.
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_all = sink.received.lock().expect("lock").clone();
    assert_eq!(
        got_all.len(),
        1,
        "one message: {:?}",
        got_all.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    assert!(
        got[0].0.starts_with("digest:agent_offline:firing:"),
        "{}",
        got[0].0
    );
    assert_eq!(got[0].2["alerts"].as_array().map(Vec::len), Some(500));
    server.stop().await;
}

/// Labels set at enrollment or by an admin choose agents: a silence on `env=prod` mutes the
/// production agent only; bad labels are refused with the reason.
#[tokio::test]
async fn labels_choose_agents_for_silences() {
    let (server, admin, sink) = with_webhook(20, 0).await;
    let token = server.enroll_token().await;
    let body = serde_json::json!({"token": token, "name": "db1", "enrollment_id": "enr-db1",
        "labels": {"env": "prod", "cluster": "main"}});
    let r = server
        .request(Method::POST, proto::ENROLL_PATH, None, body.to_string())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let db1: proto::EnrollResponse = serde_json::from_slice(&r.body).expect("json");
    let (db2_id, db2) = server.enroll("db2").await;
    let label = |body: &'static str| {
        let (server, admin, path) = (
            &server,
            admin.clone(),
            format!("/api/v1/agents/{db2_id}/labels"),
        );
        async move {
            server
                .request(Method::PUT, &path, Some(&admin), body)
                .await
                .status
        }
    };
    assert_eq!(label(r#"{"env":"dev"}"#).await, 200);
    assert_eq!(label(r#"{"Env":"dev"}"#).await, 400, "a key is lower case");
    let agents = server.agents(&admin).await;
    let labels: Vec<(String, serde_json::Value)> = agents
        .as_array()
        .expect("array")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_string(),
                a["labels"].clone(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            (
                "db1".to_string(),
                serde_json::json!({"cluster": "main", "env": "prod"})
            ),
            ("db2".to_string(), serde_json::json!({"env": "dev"})),
        ]
    );
    let r = server
        .request(
            Method::POST,
            "/api/v1/silences",
            Some(&admin),
            r#"{"for":"1h","agents":["env=prod"],"comment":"prod maintenance"}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let now = server.world.now_unix_ms();
    deliver(
        &server,
        &db1.credential,
        "e1",
        now,
        &[("xid_age", xid(1_600_000_000))],
    )
    .await;
    deliver(&server, &db2, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    let got = received_at_least(&server, &sink, 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].2["alerts"][0]["labels"]["agent"], "db2");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        sink.received.lock().expect("lock").len(),
        1,
        "db1 (env=prod) is silenced"
    );
    server.stop().await;
}

/// An SMTP server on loopback (aiosmtpd) that wants STARTTLS with a private CA's certificate
/// and a login; its messages land in `dir/mail`. Returns the port and the process.
fn smtp_sink(
    dir: &std::path::Path,
    certs: &fixtures::tls::TestCerts,
) -> (u16, std::process::Child) {
    use std::io::BufRead;
    let port = crate::harness::free_port();
    let mail = dir.join("mail");
    std::fs::create_dir_all(&mail).expect("mail dir");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/smtp_sink.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .arg(port.to_string())
        .arg(&certs.cert)
        .arg(&certs.key)
        .arg(&mail)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start /usr/bin/python3 (Debian package python3)");
    let mut line = String::new();
    let _ = std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    if line.trim() != "ready" {
        let _ = child.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
        panic!("the SMTP sink did not start (Debian package python3-aiosmtpd): {err}");
    }
    (port, child)
}

/// The email channel: STARTTLS to a server with a private CA's certificate, AUTH PLAIN, the
/// alert as a plain-text mail with its key; a wrong password is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_arrives_by_email_over_starttls_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = fixtures::tls::TestCerts::generate(dir.path()).expect("certs");
    let (port, mut sink) = smtp_sink(dir.path(), &certs);
    let server = Server::start_with(alert_settings(20)).await;
    server.world.set_tls_client(
        world::tls::client_config_with_system(&certs.ca).expect("trust the test CA"),
    );
    let admin = server.token_for("alert-admin", Role::Admin).await;
    let channel = |name: &str, password: &str| {
        serde_json::json!({"name": name, "kind": "email", "url": format!("smtp://localhost:{port}"),
            "secret": password, "email": {"from": "outpost@example.org", "to": ["dba@example.org"], "user": "outpost"}})
        .to_string()
    };
    for (name, password) in [("mail", "pw"), ("wrong", "nope")] {
        let r = server
            .request(
                Method::POST,
                "/api/v1/alert-channels",
                Some(&admin),
                channel(name, password),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = server
        .request(
            Method::POST,
            "/api/v1/alert-channels/wrong/test",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(r.status, 502);
    let said: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert!(
        said["error"]
            .as_str()
            .is_some_and(|e| e.contains("AUTH PLAIN")),
        "{said}"
    );
    let r = server
        .request(
            Method::DELETE,
            "/api/v1/alert-channels/wrong",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(r.status, 204);

    let (_, db1) = server.enroll("db1").await;
    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    let first = dir.path().join("mail/0000.eml");
    let arrived =
        fixtures::poll::until_true(Duration::from_secs(20), Duration::from_millis(100), || {
            let first = first.clone();
            async move { first.exists() }
        })
        .await;
    assert!(
        arrived,
        "no mail: outbox {:?}",
        server.storage.notifications_pending(10).await
    );
    let mail = std::fs::read_to_string(&first).expect("mail");
    assert!(
        mail.contains("Subject: [FIRING critical] xid_age\r\n"),
        "{mail}"
    );
    assert!(mail.contains("To: dba@example.org\r\n"), "{mail}");
    assert!(mail.contains("X-Outpost-Key: xid_age/"), "{mail}");
    assert!(
        mail.contains("db1: database app is at transaction-ID age 1.60 billion"),
        "{mail}"
    );
    let _ = sink.kill();
    let _ = sink.wait();
    server.stop().await;
}

/// The alertmanager channel against a real Alertmanager (Debian's prometheus-alertmanager):
/// the firing alert is there with its labels, and its resolution ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alertmanager_receives_the_alert_and_its_end() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n",
    )
    .expect("config");
    let port = crate::harness::free_port();
    let mut am = std::process::Command::new("/usr/bin/prometheus-alertmanager")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start /usr/bin/prometheus-alertmanager (Debian package prometheus-alertmanager)");
    let server = Server::start_with(alert_settings(20)).await;
    let admin = server.token_for("alert-admin", Role::Admin).await;
    let base = format!("http://127.0.0.1:{port}");
    let alerts_url = url::Url::parse(&format!("{base}/api/v2/alerts")).expect("url");
    let world = server.world.clone();
    let am_alerts = || {
        let (world, url) = (world.clone(), alerts_url.clone());
        async move {
            let r = world::http_request(
                &world,
                Method::GET,
                &url,
                http::HeaderMap::new(),
                bytes::Bytes::new(),
                Duration::from_secs(2),
                1 << 20,
            )
            .await
            .ok()?;
            (r.status == 200)
                .then(|| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
                .flatten()
        }
    };
    let up = fixtures::poll::until(Duration::from_secs(20), Duration::from_millis(100), || {
        am_alerts()
    })
    .await;
    assert!(up.is_some(), "Alertmanager did not come up on {base}");
    let body = serde_json::json!({"name": "am", "kind": "alertmanager", "url": base});
    let r = server
        .request(
            Method::POST,
            "/api/v1/alert-channels",
            Some(&admin),
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let (_, db1) = server.enroll("db1").await;
    let now = server.world.now_unix_ms();
    deliver(&server, &db1, "e1", now, &[("xid_age", xid(1_600_000_000))]).await;
    let firing = fixtures::poll::until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let list = am_alerts().await?;
            let a = list
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "xid_age")?
                .clone();
            Some(a)
        },
    )
    .await
    .expect("the alert reached Alertmanager");
    assert_eq!(firing["labels"]["agent"], "db1");
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(firing["status"]["state"], "active");
    deliver(&server, &db1, "e2", now + 1_000, &[("xid_age", xid(1_000))]).await;
    // Resolved: Alertmanager lists only alerts still active by default.
    let gone = fixtures::poll::until_true(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            am_alerts()
                .await
                .and_then(|l| {
                    l.as_array()
                        .map(|a| a.iter().all(|x| x["labels"]["alertname"] != "xid_age"))
                })
                .unwrap_or(false)
        },
    )
    .await;
    assert!(gone, "the resolution did not end the alert in Alertmanager");
    let _ = am.kill();
    let _ = am.wait();
    server.stop().await;
}
