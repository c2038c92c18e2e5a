//! Attacks against the real `outpost` binary, each the way an attacker would try it: a login
//! lockout that must end, request bodies that never arrive, one address holding every
//! connection. (A demoted user's terminal is in `terminal.rs`, beside the other sockets.)

use fixtures::poll::until_true;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use world::World;

use crate::harness::ControlPlane;

/// What a test waits for at most before it fails (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_passwords_lock_a_user_only_until_the_lockout_ends() {
    let cp = ControlPlane::start_with(&[], &["--login-lockout", "2s"], true).await;
    cp.user("victim", "operator").await;
    for _ in 0..5 {
        let r = cp.try_login("victim", "not-the-password").await;
        assert_eq!(r.status, 401);
    }
    let r = cp.try_login("victim", "victim-password-1234").await;
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 429, "{text}");
    assert!(text.contains("locked for"), "the answer says why: {text}");
    // Junk names in between must not reset or extend the lock.
    for i in 0..50 {
        cp.try_login(&format!("junk{i}"), "whatever-whatever").await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let r = cp.try_login("victim", "victim-password-1234").await;
    assert_eq!(
        r.status,
        200,
        "after the lockout the right password logs in: {}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_closed_at_the_body_deadline_and_counted() {
    let cp = ControlPlane::start_with(&[], &["--body-timeout", "2s"], true).await;
    let before = cp.counter("outpost_http_body_deadlines_total").await;
    let addr = format!("127.0.0.1:{}", cp.port);
    let mut stream = World::real().net().connect(&addr).await.expect("connect");
    stream
        .write_all(
            b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .expect("send one byte of the body");
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(closed.is_ok(), "still open after {PATIENCE:?}: {text}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not closed before the body had its time"
    );
    let after = cp.counter("outpost_http_body_deadlines_total").await;
    assert_eq!(after, before + 1, "the deadline is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let cp = ControlPlane::start_with(&[], &["--max-connections-per-address", "4"], true).await;
    let addr = format!("127.0.0.1:{}", cp.port);
    let world = World::real();
    // The harness's readiness probes came from this address too, and the server frees a slot
    // when it sees the close, not at once: until then one of the four may be refused. The
    // four are taken again until all four are served.
    let mut held = Vec::new();
    for attempt in 0.. {
        match hold_served(&world, &addr, 4).await {
            Ok(conns) => {
                held = conns;
                break;
            }
            Err(error) if attempt < 50 => {
                eprintln!("attempt {attempt}: {error}; the probes' slots are not free yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("four connections were never all served: {error}"),
        }
    }
    let mut extra = world.net().connect(&addr).await.expect("connect");
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(PATIENCE, extra.read(&mut buf))
        .await
        .expect("the fifth connection is closed, not left waiting");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the fifth connection was served: {:?}",
        read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    drop(held);
    // The server frees the held slots when it sees them close, not at once: until then this
    // address is still refused.
    let back = until_true(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { cp.api(http::Method::GET, "/healthz", None).await.is_some() },
    )
    .await;
    assert!(back, "the address is refused after its connections closed");
    let counted = cp
        .wait_counter("outpost_http_connections_refused_per_address_total", |n| {
            n >= 1
        })
        .await;
    assert!(counted, "the refusal is not counted");
}

/// `outpost admin` on the same storage as a running control plane.
fn admin(cp: &ControlPlane, args: &[&str]) -> std::process::Output {
    let data = cp.data_dir();
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().expect("utf8")]);
    crate::harness::run(&crate::harness::outpost_bin(), &all)
}

#[tokio::test]
async fn enrollment_tokens_are_listed_and_revoked_and_admin_commands_are_audited() {
    let cp = ControlPlane::start().await;
    let token = cp.enroll_token();
    let listed = crate::harness::stdout(&admin(&cp, &["enroll-tokens"]));
    let line = listed
        .lines()
        .find(|l| l.ends_with("new agent"))
        .unwrap_or_else(|| panic!("the token is not listed:\n{listed}"));
    assert!(!listed.contains(&token), "a list shows no secret");
    let id = line.split_whitespace().next().expect("id");
    let revoked = admin(&cp, &["revoke-enroll-token", id]);
    assert!(revoked.status.success(), "{revoked:?}");
    let again = admin(&cp, &["revoke-enroll-token", id]);
    assert!(!again.status.success(), "revoked twice");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = crate::harness::run(
        &crate::harness::agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &cp.url(),
            "--token",
            &token,
            "--name",
            "db1",
            "--data-dir",
            dir.path().to_str().expect("utf8"),
        ],
    );
    assert!(!out.status.success(), "a revoked token enrolled a host");

    let changed = admin(&cp, &["set-user", "admin", "--role", "operator"]);
    assert!(!changed.status.success(), "the last admin was demoted");
    crate::harness::create_user(
        cp.data_dir().to_str().expect("utf8"),
        &[],
        "second",
        "viewer",
        "second-password-1234",
    );
    assert!(
        admin(&cp, &["set-user", "second", "--role", "operator"])
            .status
            .success()
    );
    let r = cp
        .api(http::Method::GET, "/api/v1/audit", None)
        .await
        .expect("control plane reachable");
    let rows: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let seen: Vec<(String, String)> = rows
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["actor"].as_str().is_some_and(|a| a.starts_with("cli:")))
        .map(|r| {
            (
                r["action"].as_str().unwrap_or("").to_string(),
                r["target"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("user.created", "admin"),
        ("enroll_token.created", ""),
        ("enroll_token.revoked", id),
        ("user.created", "second"),
        ("user.changed", "second"),
    ] {
        assert!(
            seen.iter().any(|(a, t)| a == want.0 && t == want.1),
            "{want:?} not audited: {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_rekey_token_does_not_bring_a_removed_agent_back() {
    let cp = ControlPlane::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    cp.enroll_agent("db1", data);
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let v: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let id = v[0]["id"].as_str().expect("enrolled").to_string();
    let r = cp
        .api(
            http::Method::POST,
            &format!("/api/v1/agents/{id}/rekey"),
            None,
        )
        .await
        .expect("rekey");
    assert_eq!(r.status, 201);
    let rekey: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let token = rekey["token"].as_str().expect("token");
    let r = cp
        .api(http::Method::DELETE, &format!("/api/v1/agents/{id}"), None)
        .await
        .expect("remove");
    assert!(r.status.is_success(), "{}", r.status);

    let out = crate::harness::run(
        &crate::harness::agent_bin(),
        &[
            "enroll",
            "--force",
            "--control-plane",
            &cp.url(),
            "--token",
            token,
            "--name",
            "db1",
            "--data-dir",
            data,
        ],
    );
    assert!(!out.status.success(), "the removed agent enrolled again");
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let v: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");
}

/// `n` connections to `addr`, each served once (so certainly accepted and counted) and then
/// held open by keep-alive; the first failure, in words.
async fn hold_served(world: &World, addr: &str, n: usize) -> Result<Vec<world::Stream>, String> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut conn = world
            .net()
            .connect(addr)
            .await
            .map_err(|e| format!("connect {i}: {e}"))?;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .map_err(|e| format!("write {i}: {e}"))?;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .map_err(|_| format!("no answer on connection {i}"))?
            .map_err(|e| format!("read {i}: {e}"))?;
        if !buf[..n].starts_with(b"HTTP/1.1 200") {
            return Err(format!(
                "connection {i}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ));
        }
        held.push(conn);
    }
    Ok(held)
}
