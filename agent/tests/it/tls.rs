//! TLS end to end with the real binaries: `outpost serve --tls-cert --tls-key`, an agent that
//! enrolls and runs against `https://` trusting a private CA (`--ca-file`), and refusals when
//! the certificate is not trusted or the client speaks plain HTTP.

use fixtures::poll::until_true;
use std::time::Duration;

use crate::harness::{Proc, agent_bin, free_port, outpost_bin, run, stdout};

async fn get(world: &world::World, url: &str, bearer: Option<&str>) -> Option<world::HttpResponse> {
    let mut headers = http::HeaderMap::new();
    if let Some(token) = bearer {
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    world::http_request(
        world,
        http::Method::GET,
        &url::Url::parse(url).expect("url"),
        headers,
        bytes::Bytes::new(),
        Duration::from_secs(5),
        1 << 20,
    )
    .await
    .ok()
}

#[tokio::test]
async fn an_agent_enrolls_and_connects_over_https_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = fixtures::tls::TestCerts::generate(dir.path()).expect("certificates");
    let cp_dir = dir.path().join("cp");
    let cp = cp_dir.to_str().expect("utf8");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("https://localhost:{port}");

    crate::harness::create_admin(cp, &[]);
    let token = stdout(&run(
        &outpost_bin(),
        &["admin", "enroll-token", "--data-dir", cp],
    ))
    .trim()
    .to_string();

    let _cp = Proc::spawn(
        &outpost_bin(),
        &[
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            cp,
            "--tls-cert",
            certs.cert.to_str().expect("utf8"),
            "--tls-key",
            certs.key.to_str().expect("utf8"),
        ],
        &dir.path().join("cp.log"),
    );
    let trusting = world::World::real();
    trusting.set_tls_client(world::tls::client_config(&certs.ca).expect("CA"));
    let healthy = until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            get(&trusting, &format!("{base}/healthz"), None)
                .await
                .is_some_and(|r| r.status == 200)
        },
    )
    .await;
    assert!(
        healthy,
        "no HTTPS answer:\n{}",
        std::fs::read_to_string(dir.path().join("cp.log")).unwrap_or_default()
    );

    // A flood of clients that connect and never start a handshake: more than the 256 pending
    // handshakes the listener keeps. A real client still gets through at once (the oldest silent
    // one gives way), not after the silent ones time out 10 s later.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(
            trusting
                .net()
                .connect(&listen)
                .await
                .expect("silent connect"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = get(&trusting, &format!("{base}/healthz"), None).await;
    assert!(
        during.is_some_and(|r| r.status == 200),
        "300 silent TLS clients locked out a real one for 5 s"
    );
    assert!(
        get(
            &world::World::real(),
            &format!("http://127.0.0.1:{port}/healthz"),
            None
        )
        .await
        .is_none_or(|r| r.status != 200),
        "plain HTTP must not be served on the TLS port"
    );

    // Without the CA the agent refuses the certificate and says so.
    let agent_dir = dir.path().join("agent");
    let a = agent_dir.to_str().expect("utf8");
    let refused = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &base,
            "--token",
            &token,
            "--name",
            "db1",
            "--data-dir",
            a,
        ],
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(err.contains("certificate"), "{err}");

    let ca = certs.ca.to_str().expect("utf8");
    let enrolled = run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &base,
            "--token",
            &token,
            "--name",
            "db1",
            "--data-dir",
            a,
            "--ca-file",
            ca,
        ],
    );
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut agent = Proc::spawn(
        &agent_bin(),
        &["run", "--data-dir", a, "--ca-file", ca],
        &dir.path().join("agent.log"),
    );

    let login = world::http_request(
        &trusting,
        http::Method::POST,
        &url::Url::parse(&format!("{base}/api/v1/sessions")).expect("url"),
        {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                "application/json".parse().expect("header"),
            );
            h
        },
        bytes::Bytes::from_static(br#"{"username":"admin","password":"admin-password-1234"}"#),
        Duration::from_secs(5),
        1 << 20,
    )
    .await
    .expect("login over https");
    assert_eq!(login.status, 200);
    let cookie = login
        .headers
        .get(http::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        cookie.contains("; Secure"),
        "the cookie is Secure over HTTPS: {cookie}"
    );
    // Under TLS the session cookie is a `__Host-` one, and only that name is taken: a cookie
    // planted by a sibling host or a plain-HTTP page carries no session.
    let token = cookie
        .strip_prefix("__Host-outpost_session=")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("a __Host- cookie over HTTPS: {cookie}"));
    for (name, want) in [("__Host-outpost_session", 200), ("outpost_session", 401)] {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("{name}={token}").parse().expect("header"),
        );
        let me = world::http_request(
            &trusting,
            http::Method::GET,
            &url::Url::parse(&format!("{base}/api/v1/me")).expect("url"),
            headers,
            bytes::Bytes::new(),
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .expect("me over https");
        assert_eq!(me.status, want, "cookie {name}");
    }
    assert!(
        login
            .headers
            .get(http::header::STRICT_TRANSPORT_SECURITY)
            .is_some(),
        "HTTPS answers tell browsers to keep to HTTPS"
    );
    let session: serde_json::Value = serde_json::from_slice(&login.body).expect("json");
    let bearer = session["token"].as_str().expect("token").to_string();
    let online = until_true(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let Some(r) = get(&trusting, &format!("{base}/api/v1/agents"), Some(&bearer)).await
            else {
                return false;
            };
            let agents: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            agents[0]["status"] == "online"
        },
    )
    .await;
    assert!(
        online,
        "the agent did not come online over wss:\n{}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
    let metrics = get(&trusting, &format!("{base}/metrics"), Some(&bearer))
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    let evicted: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("outpost_tls_handshakes_evicted_total "))
        .and_then(|v| v.parse().ok())
        .expect("outpost_tls_handshakes_evicted_total in /metrics");
    assert!(
        evicted >= 45.0,
        "300 silent clients and one real one over 256 slots evict at least 45 handshakes, counted {evicted}"
    );
    drop(silent);
    agent.signal("-TERM");
    assert!(agent.wait_exit(Duration::from_secs(20)).await.is_some());
}
