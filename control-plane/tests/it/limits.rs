//! Connection limits of the server loop: a header deadline (slowloris) and a cap on
//! connections served at once, with refusals counted in `/metrics`.

use fixtures::poll::until_true;
use std::sync::atomic::Ordering;
use std::time::Duration;

use control_plane::auth::Role;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Server, fast_settings};

/// Reads until the server closes the connection (or `within` passes): true when it closed.
async fn closed_by_server(stream: &mut world::Stream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = Server::start_with(control_plane::settings::Settings {
        header_timeout: Duration::from_millis(500),
        ..fast_settings()
    })
    .await;
    let addr = server.base.authority().to_string();
    let mut slow = server.world.net().connect(&addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write part of the headers");
    // Each byte within the deadline does not extend it: the whole head must arrive in time.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break;
        }
    }
    assert!(
        closed_by_server(&mut slow, Duration::from_secs(10)).await,
        "a request head still unfinished after the header timeout keeps its connection"
    );

    // An idle keep-alive connection is closed after the same deadline.
    let mut idle = server.world.net().connect(&addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write a request");
    assert!(
        closed_by_server(&mut idle, Duration::from_secs(10)).await,
        "an idle keep-alive connection stays open past the header timeout"
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_on_accept_and_counted() {
    let server = Server::start_with(control_plane::settings::Settings {
        max_connections: 4,
        ..fast_settings()
    })
    .await;
    let admin = server.token_for("admin", Role::Admin).await;
    let addr = server.base.authority().to_string();
    let counters = std::sync::Arc::clone(&server.state.observed.connections);
    // The login's connection may still be counted for a moment after its answer.
    let open_is = |n: u64| {
        let counters = &counters;
        until_true(
            Duration::from_secs(2),
            Duration::from_millis(20),
            move || async move { counters.open.load(Ordering::Relaxed) == n },
        )
    };
    open_is(0).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(server.world.net().connect(&addr).await.expect("connect"));
    }
    open_is(4).await;
    assert_eq!(counters.open.load(Ordering::Relaxed), 4);
    let mut fifth = server.world.net().connect(&addr).await.expect("connect");
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_by_server(&mut fifth, Duration::from_secs(5)).await,
        "a fifth connection is served although max_connections is 4"
    );
    assert_eq!(counters.refused.load(Ordering::Relaxed), 1);

    // Giving one back lets the next client in; the refusal is in /metrics.
    drop(held.pop());
    let mut metrics = None;
    for _ in 0..100 {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {admin}").parse().expect("header"),
        );
        let url = server.base.join("/metrics").expect("url");
        let response = world::http_request(
            &server.world,
            Method::GET,
            &url,
            headers,
            bytes::Bytes::new(),
            Duration::from_secs(5),
            1 << 20,
        )
        .await;
        if let Ok(response) = response
            && response.status == 200
        {
            metrics = Some(String::from_utf8_lossy(&response.body).to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics.expect("a freed slot serves /metrics");
    assert!(
        text.contains("outpost_http_connections_refused_total 1\n"),
        "{text}"
    );
    assert!(text.contains("outpost_http_connections_open "), "{text}");
    server.stop().await;
}

/// Ingest sheds a batch before reading its body: a full control plane answers 429 to a
/// declared 16 MiB batch whose bytes never come.
#[tokio::test]
async fn a_shed_metrics_batch_is_answered_before_its_body_is_read() {
    let server = Server::start().await;
    let (_agent_id, credential) = server.enroll("db1").await;
    let permits = std::sync::Arc::clone(&server.state.ingest.permits);
    let all = u32::try_from(permits.available_permits()).expect("permits");
    let _held = permits
        .acquire_many_owned(all)
        .await
        .expect("take every permit");
    let addr = server.base.authority().to_string();
    let mut stream = server.world.net().connect(&addr).await.expect("connect");
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {credential}\r\nContent-Type: application/json\r\nContent-Length: 16000000\r\n\r\n",
        proto::METRICS_PATH
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer while the body is missing");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
    server.stop().await;
}
