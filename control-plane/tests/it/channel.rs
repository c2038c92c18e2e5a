//! The agent control channel spoken raw, frame by frame.

use fixtures::poll::until;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proto::{AgentMessage, Command, CommandResult, ErrorCode, ServerMessage};
use tokio_tungstenite::tungstenite::Message;
use world::WsStream;

use crate::harness::Server;

async fn dial(server: &Server, credential: &str) -> WsStream {
    let url = server.base.join(proto::CHANNEL_PATH).expect("url");
    world::ws_connect(
        &server.world,
        &url,
        Some(credential),
        Duration::from_secs(5),
        proto::FRAME_BYTES_MAX,
    )
    .await
    .expect("dial channel")
}

async fn send(ws: &mut WsStream, msg: &AgentMessage) {
    ws.send(Message::Text(
        serde_json::to_string(msg).expect("json").into(),
    ))
    .await
    .expect("send");
}

async fn send_raw(ws: &mut WsStream, text: &str) {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .expect("send");
}

/// Next server message, skipping heartbeat acks; `None` when the server closed.
async fn recv(ws: &mut WsStream) -> Option<ServerMessage> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("server answers within 5 s");
        match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => {
                let msg: ServerMessage = serde_json::from_str(&t).expect("server sends valid JSON");
                if !matches!(msg, ServerMessage::HeartbeatAck { .. }) {
                    return Some(msg);
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

/// A heartbeat with sequence number `seq`, carrying `buffer` figures.
async fn heartbeat(ws: &mut WsStream, seq: u64, buffer: Option<proto::BufferStats>) {
    send(
        ws,
        &AgentMessage::Heartbeat {
            seq,
            sent_at_ms: 0,
            buffer,
        },
    )
    .await;
}

fn hello(min: u32, max: u32) -> AgentMessage {
    AgentMessage::Hello {
        protocol_min: min,
        protocol_max: max,
        agent_version: "test".into(),
        hostname: "test-host".into(),
        labels: Default::default(),
    }
}

async fn welcomed(server: &Server, credential: &str) -> WsStream {
    let mut ws = dial(server, credential).await;
    send(&mut ws, &hello(proto::PROTOCOL_MIN, proto::PROTOCOL_MAX)).await;
    match recv(&mut ws).await {
        Some(ServerMessage::Welcome {
            protocol_version, ..
        }) => assert_eq!(protocol_version, proto::PROTOCOL_MAX),
        other => panic!("expected welcome, got {other:?}"),
    }
    ws
}

async fn status_of(server: &Server, token: &str, agent_id: &str) -> String {
    let agents = server.agents(token).await;
    let agent = agents
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["id"] == agent_id)
        .expect("listed");
    agent["status"].as_str().expect("status").to_string()
}

#[tokio::test]
async fn version_ranges_that_do_not_overlap_are_refused_with_a_reason() {
    let server = Server::start().await;
    let (_, cred) = server.enroll("db1").await;
    let mut ws = dial(&server, &cred).await;
    send(
        &mut ws,
        &hello(proto::PROTOCOL_MAX + 1, proto::PROTOCOL_MAX + 5),
    )
    .await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("upgrade"), "{}", e.message);
        }
        other => panic!("expected unsupported_version, got {other:?}"),
    }
    assert_eq!(
        recv(&mut ws).await,
        None,
        "the server closes after refusing"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_first_frame_must_be_hello() {
    let server = Server::start().await;
    let (_, cred) = server.enroll("db1").await;
    let mut ws = dial(&server, &cred).await;
    heartbeat(&mut ws, 1, None).await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::ProtocolViolation),
        other => panic!("expected protocol_violation, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_messages_are_answered_and_the_channel_stays_up() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let token = server
        .token_for("viewer", control_plane::auth::Role::Viewer)
        .await;
    let mut ws = welcomed(&server, &cred).await;
    send_raw(&mut ws, r#"{"type":"from_the_future","x":1}"#).await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::UnknownMessage),
        other => panic!("expected unknown_message, got {other:?}"),
    }
    send_raw(&mut ws, "{not json").await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Malformed),
        other => panic!("expected malformed, got {other:?}"),
    }
    heartbeat(&mut ws, 7, None).await;
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("ack")
        .expect("frame")
        .expect("ok");
    let ack: ServerMessage = serde_json::from_str(frame.to_text().expect("text")).expect("json");
    assert!(
        matches!(ack, ServerMessage::HeartbeatAck { seq: 7, .. }),
        "{ack:?}"
    );
    assert_eq!(status_of(&server, &token, &agent_id).await, "online");
    server.stop().await;
}

#[tokio::test]
async fn a_second_connection_replaces_the_first_and_the_agent_stays_online() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let token = server
        .token_for("viewer", control_plane::auth::Role::Viewer)
        .await;
    let mut first = welcomed(&server, &cred).await;
    let mut second = welcomed(&server, &cred).await;
    match recv(&mut first).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Replaced),
        other => panic!("expected replaced, got {other:?}"),
    }
    assert_eq!(recv(&mut first).await, None);
    assert_eq!(server.state.channels.connected(), vec![agent_id.clone()]);
    heartbeat(&mut second, 1, None).await;
    assert_eq!(status_of(&server, &token, &agent_id).await, "online");
    server.stop().await;
}

#[tokio::test]
async fn a_silent_agent_is_dropped_after_the_dead_deadline() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let token = server
        .token_for("viewer", control_plane::auth::Role::Viewer)
        .await;
    let mut ws = welcomed(&server, &cred).await;
    // Say nothing: the server must give up after dead_after (1 s in these tests).
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "server kept a silent channel open");
    assert!(server.state.channels.connected().is_empty());
    assert_eq!(status_of(&server, &token, &agent_id).await, "offline");
    server.stop().await;
}

#[tokio::test]
async fn commands_are_acked_and_unknown_commands_fail_cleanly() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let mut ws = welcomed(&server, &cred).await;
    let channels = server.state.channels.clone();
    let id = agent_id.clone();
    let pending = tokio::spawn(async move {
        channels
            .send_command(&id, Command::Describe, Duration::from_secs(5))
            .await
    });
    let (cmd_id, command) = match recv(&mut ws).await {
        Some(ServerMessage::Command { id, command }) => (id, command),
        other => panic!("expected a command, got {other:?}"),
    };
    assert_eq!(command, Command::Describe);
    let result = CommandResult::Describe {
        agent_version: "test".into(),
        hostname: "h".into(),
        protocol_version: 1,
        uptime_s: 3,
    };
    send(
        &mut ws,
        &AgentMessage::CommandAck {
            id: cmd_id,
            ok: true,
            result: Some(result.clone()),
            error: None,
        },
    )
    .await;
    assert_eq!(pending.await.expect("join").expect("answered"), result);

    let err = server
        .state
        .channels
        .send_command("agt_nobody", Command::Describe, Duration::from_secs(1))
        .await
        .expect_err("not connected");
    assert!(matches!(
        err,
        control_plane::channel::CommandError::NotConnected
    ));
    server.stop().await;
}

/// The shape of `GET /api/v1/agents` with an agent online and reporting buffer figures. A
/// changed shape shows up as a snapshot diff to review (ids and times redacted).
#[tokio::test]
async fn the_agent_list_has_its_documented_shape() {
    let server = Server::start().await;
    let (_agent_id, cred) = server.enroll("db1").await;
    server.enroll("db2").await;
    let token = server
        .token_for("viewer", control_plane::auth::Role::Viewer)
        .await;
    let mut ws = welcomed(&server, &cred).await;
    let figures = Some(proto::BufferStats {
        epoch: "ep_1".into(),
        rows: 120,
        size_bytes: 65_536,
        oldest_record_age_s: 42,
        utilization: 0.25,
        delivery_failures: 1,
        dropped_total: [("age".to_string(), 3), ("size".to_string(), 0)]
            .into_iter()
            .collect(),
    });
    // The first heartbeat claims the connection; its figures follow in the next batched
    // write: one heartbeat is enough for the list to show them.
    heartbeat(&mut ws, 1, figures.clone()).await;
    let reported = until(
        Duration::from_millis(2_500),
        Duration::from_millis(50),
        || async {
            let agents = server.agents(&token).await;
            let shown = agents
                .as_array()
                .is_some_and(|list| list.iter().any(|a| !a["buffer"].is_null()));
            shown.then_some(agents)
        },
    )
    .await;
    let mut agents = match reported {
        Some(agents) => agents,
        None => server.agents(&token).await,
    };

    if let Some(list) = agents.as_array_mut() {
        list.sort_by_key(|a| a["name"].as_str().unwrap_or_default().to_string());
    }
    insta::assert_json_snapshot!("agent_list", agents, {
        "[].id" => "[id]",
        "[].last_seen" => insta::dynamic_redaction(|value, _| {
            if value.as_str().is_some() { "[time]".into() } else { value }
        }),
    });
    server.stop().await;
}

/// 400 parallel wrong passwords for one name: at most 5 reach the password check (the rest
/// are told to come back, 429), and an agent heartbeating meanwhile stays online throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_gets_five_checks_and_agents_stay_online() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let token = server
        .token_for("ops", control_plane::auth::Role::Operator)
        .await;
    let mut ws = welcomed(&server, &cred).await;
    let heartbeats = async {
        let mut offline_seen = 0;
        for seq in 1..=40 {
            heartbeat(&mut ws, seq, None).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if seq > 2 && status_of(&server, &token, &agent_id).await != "online" {
                offline_seen += 1;
            }
        }
        offline_seen
    };
    let flood = async {
        let body = r#"{"username":"ops","password":"wrong-wrong-wrong"}"#;
        let attempts =
            (0..400).map(|_| server.request(http::Method::POST, "/api/v1/sessions", None, body));
        futures_util::future::join_all(attempts).await
    };
    let (offline_seen, answers) = tokio::join!(heartbeats, flood);
    let unauthorized = answers.iter().filter(|r| r.status == 401).count();
    let busy = answers.iter().filter(|r| r.status == 429).count();
    assert_eq!(unauthorized + busy, 400, "only 401 and 429");
    assert!(unauthorized <= 5, "{unauthorized} passwords were checked");
    let checked = server
        .state
        .observed
        .login_failures_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(checked <= 5, "{checked} password checks ran");
    assert_eq!(offline_seen, 0, "the agent showed offline during the flood");
    server.stop().await;
}

/// An admin removes an agent: its live channel is told and closed at its next heartbeat, its
/// credential is refused from then on, it leaves the fleet, and the removal is audited.
#[tokio::test]
async fn a_removed_agent_loses_its_channel_and_its_credential() {
    let server = Server::start().await;
    let (agent_id, cred) = server.enroll("db1").await;
    let admin = server
        .token_for("admin", control_plane::auth::Role::Admin)
        .await;
    let operator = server
        .token_for("op", control_plane::auth::Role::Operator)
        .await;
    let mut ws = welcomed(&server, &cred).await;
    heartbeat(&mut ws, 1, None).await;
    assert_eq!(status_of(&server, &admin, &agent_id).await, "online");
    let path = format!("/api/v1/agents/{agent_id}");
    let denied = server
        .request(http::Method::DELETE, &path, Some(&operator), "")
        .await;
    assert_eq!(denied.status, 403, "only admins remove agents");
    let removed = server
        .request(http::Method::DELETE, &path, Some(&admin), "")
        .await;
    assert_eq!(removed.status, 204, "{:?}", removed.body);
    heartbeat(&mut ws, 2, None).await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Refused);
            assert!(e.message.contains("removed"), "{}", e.message);
        }
        other => panic!("expected the removal, got {other:?}"),
    }
    assert_eq!(recv(&mut ws).await, None, "the channel is closed");
    let url = server.base.join(proto::CHANNEL_PATH).expect("url");
    let again = world::ws_connect(
        &server.world,
        &url,
        Some(&cred),
        Duration::from_secs(5),
        proto::FRAME_BYTES_MAX,
    )
    .await;
    assert!(
        again.is_err_and(|e| e.http_status() == Some(401)),
        "the credential is refused"
    );
    assert!(
        server
            .agents(&admin)
            .await
            .as_array()
            .expect("array")
            .is_empty(),
        "the agent left the fleet"
    );
    let again = server
        .request(http::Method::DELETE, &path, Some(&admin), "")
        .await;
    assert_eq!(again.status, 404);
    let audit: serde_json::Value = serde_json::from_slice(
        &server
            .request(
                http::Method::GET,
                "/api/v1/audit?action=agent.removed",
                Some(&admin),
                "",
            )
            .await
            .body,
    )
    .expect("json");
    assert_eq!(audit[0]["target"], agent_id.as_str(), "{audit}");
    assert_eq!(audit[0]["detail"]["name"], "db1", "{audit}");
    server.stop().await;
}

/// An agent that floods its channel is read at 20 frames a second beyond a burst of 200, so it
/// costs no more storage writes than that; every frame is still answered, and it is counted.
#[tokio::test]
async fn a_flooding_agent_is_slowed_to_the_frame_budget() {
    let server = Server::start().await;
    let (_agent_id, cred) = server.enroll("db1").await;
    let mut ws = welcomed(&server, &cred).await;
    const FLOOD: u64 = 300;
    for seq in 1..=FLOOD {
        heartbeat(&mut ws, seq, None).await;
    }
    let acked_all = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(t) = frame
                && let Ok(ServerMessage::HeartbeatAck { seq, .. }) = serde_json::from_str(&t)
                && seq == FLOOD
            {
                return;
            }
        }
        panic!("the channel closed before the last ack");
    })
    .await;
    assert!(acked_all.is_ok(), "every heartbeat is answered");
    let throttled = server
        .state
        .observed
        .agent_frames_throttled_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        throttled >= 90,
        "300 frames at once: the 100 beyond the burst wait (less what was earned meanwhile), throttled {throttled}"
    );
    server.stop().await;
}

/// An admin rotates an agent's credential: the host enrolls with a token bound to the agent
/// and gets a new credential for the same agent id; the old credential is refused from then
/// on and its live channel ends at its next heartbeat.
#[tokio::test]
async fn a_rotated_credential_replaces_the_old_one_for_the_same_agent() {
    let server = Server::start().await;
    let (agent_id, old) = server.enroll("db1").await;
    let admin = server
        .token_for("admin", control_plane::auth::Role::Admin)
        .await;
    let mut ws = welcomed(&server, &old).await;
    heartbeat(&mut ws, 1, None).await;
    let made = server
        .request(
            http::Method::POST,
            &format!("/api/v1/agents/{agent_id}/rekey"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let made: serde_json::Value = serde_json::from_slice(&made.body).expect("json");
    let token = made["token"].as_str().expect("token").to_string();
    let body = serde_json::to_vec(&proto::EnrollRequest {
        token,
        name: "db1".into(),
        enrollment_id: "enr_rotation".into(),
        labels: Default::default(),
    })
    .expect("json");
    let r = server
        .request(http::Method::POST, proto::ENROLL_PATH, None, body)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer: proto::EnrollResponse = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(answer.agent_id, agent_id, "the same agent, not a new one");
    assert_ne!(answer.credential, old);
    heartbeat(&mut ws, 2, None).await;
    match recv(&mut ws).await {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Replaced),
        other => panic!("expected the old channel to end, got {other:?}"),
    }
    let url = server.base.join(proto::CHANNEL_PATH).expect("url");
    let refused = world::ws_connect(
        &server.world,
        &url,
        Some(&old),
        Duration::from_secs(5),
        proto::FRAME_BYTES_MAX,
    )
    .await;
    assert!(refused.is_err_and(|e| e.http_status() == Some(401)));
    let mut fresh = welcomed(&server, &answer.credential).await;
    heartbeat(&mut fresh, 1, None).await;
    assert_eq!(status_of(&server, &admin, &agent_id).await, "online");
    let missing = server
        .request(
            http::Method::POST,
            "/api/v1/agents/agt_nope/rekey",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(missing.status, 404);
    server.stop().await;
}
