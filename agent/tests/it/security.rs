//! Attacks against the real `outpost` binary, each the way an attacker would try it: a login
//! lockout that must end, request bodies that never arrive, one address holding every
//! connection. (A demoted user's terminal is in `terminal.rs`, beside the other sockets.)

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
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(world.net().connect(&addr).await.expect("connect"));
    }
    // Each held connection is accepted (and counted) before the next is refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
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
    let counted = cp
        .wait_counter("outpost_http_connections_refused_per_address_total", |n| {
            n >= 1
        })
        .await;
    assert!(counted, "the refusal is not counted");
}
