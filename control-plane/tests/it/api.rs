//! The HTTP API: authentication on every route, login, limits.

use control_plane::auth::Role;
use control_plane::http::{Access, route_specs};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::harness::Server;

/// Fill `{param}` segments with a placeholder value.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_route_but_login_health_and_enrollment_requires_credentials() {
    let server = Server::start().await;
    let public: Vec<_> = route_specs()
        .into_iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        public,
        vec![
            "GET /healthz",
            "GET /",
            "GET /assets/{*path}",
            "POST /api/v1/sessions",
            "POST /api/v1/agents/enroll"
        ],
        "adding a public route is a security decision: update this list deliberately"
    );
    let mut checked = 0;
    for spec in route_specs()
        .into_iter()
        .filter(|r| r.access != Access::Public)
    {
        let path = concrete(spec.path);
        for bearer in [None, Some("opt_not-a-real-token")] {
            let r = server
                .request(spec.method.clone(), &path, bearer, "{}")
                .await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{} {path} with {bearer:?}",
                spec.method
            );
            let body: proto::ErrorBody = serde_json::from_slice(&r.body).expect("JSON error body");
            assert!(!body.error.is_empty());
            checked += 1;
        }
    }
    assert!(checked >= 4, "the router has protected routes to check");
    server.stop().await;
}

#[tokio::test]
async fn agent_credentials_do_not_open_user_routes_and_user_tokens_do_not_open_agent_routes() {
    let server = Server::start().await;
    let (_, credential) = server.enroll("db1").await;
    let user_token = server.token_for("ops", Role::Admin).await;
    let r = server
        .request(Method::GET, "/api/v1/agents", Some(&credential), "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = server
        .request(Method::GET, proto::CHANNEL_PATH, Some(&user_token), "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn login_issues_a_token_and_an_httponly_cookie_that_both_work() {
    let server = Server::start().await;
    let token = server.token_for("viewer1", Role::Viewer).await;
    assert!(token.starts_with("opt_"));
    let r = server
        .request(
            Method::POST,
            "/api/v1/sessions",
            None,
            r#"{"username":"viewer1","password":"a-long-enough-password"}"#,
        )
        .await;
    let cookie = r
        .headers
        .get(http::header::SET_COOKIE)
        .expect("cookie")
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("pair").to_string();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::COOKIE, pair.parse().expect("header"));
    let r = server
        .request_with(Method::GET, "/api/v1/agents", headers.clone(), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(server.agents(&token).await, serde_json::json!([]));

    // The cookie is ambient: another site's page may not use it; this control plane's may.
    let host = server.base.authority().to_string();
    let mut evil = headers.clone();
    evil.insert(
        http::header::ORIGIN,
        "http://evil.example".parse().expect("header"),
    );
    let r = server
        .request_with(
            Method::POST,
            "/api/v1/terminal/sessions",
            evil,
            r#"{"agent_id":"x"}"#,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "cross-site use of the cookie"
    );
    let mut own = headers.clone();
    own.insert(
        http::header::ORIGIN,
        format!("http://{host}").parse().expect("header"),
    );
    let r = server
        .request_with(Method::GET, "/api/v1/agents", own, "")
        .await;
    assert_eq!(r.status, StatusCode::OK, "same-origin use of the cookie");
    // A bearer token is not ambient: any origin may present it.
    let mut bearer = HeaderMap::new();
    bearer.insert(
        http::header::ORIGIN,
        "http://evil.example".parse().expect("header"),
    );
    bearer.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let r = server
        .request_with(Method::GET, "/api/v1/agents", bearer, "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let server = Server::start().await;
    server.token_for("alice", Role::Operator).await;
    let wrong = server
        .request(
            Method::POST,
            "/api/v1/sessions",
            None,
            r#"{"username":"alice","password":"nope-nope-nope"}"#,
        )
        .await;
    let unknown = server
        .request(
            Method::POST,
            "/api/v1/sessions",
            None,
            r#"{"username":"mallory","password":"nope-nope-nope"}"#,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.status, unknown.status);
    assert_eq!(wrong.body, unknown.body);
    server.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused() {
    let server = Server::start().await;
    let huge = format!(
        r#"{{"username":"a","password":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let r = server
        .request(Method::POST, "/api/v1/sessions", None, huge)
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = server
        .request(Method::POST, "/api/v1/sessions", None, "{not json")
        .await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let r = server
        .request(Method::GET, "/no/such/route", None, "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn enrollment_validates_input_and_refuses_reused_tokens() {
    let server = Server::start().await;
    let token = server.enroll_token().await;
    let req = |name: &str, eid: &str| {
        serde_json::to_vec(&proto::EnrollRequest {
            token: token.clone(),
            name: name.into(),
            enrollment_id: eid.into(),
            labels: Default::default(),
        })
        .expect("json")
    };
    let r = server
        .request(Method::POST, proto::ENROLL_PATH, None, req("", "e1"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = server
        .request(Method::POST, proto::ENROLL_PATH, None, req("db\u{7}", "e1"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = server
        .request(Method::POST, proto::ENROLL_PATH, None, req("db1", "e1"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = server
        .request(Method::POST, proto::ENROLL_PATH, None, req("db2", "e2"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let body: proto::ErrorBody = serde_json::from_slice(&r.body).expect("json");
    assert!(body.error.contains("already used"), "{}", body.error);
    server.stop().await;
}

#[tokio::test]
async fn task_routes_enforce_roles_and_name_unknown_or_offline_agents() {
    let server = Server::start().await;
    let (agent_id, _) = server.enroll("db1").await;
    let viewer = server.token_for("viewer1", Role::Viewer).await;
    let operator = server.token_for("operator1", Role::Operator).await;
    let tasks = format!("/api/v1/agents/{agent_id}/tasks");
    let body = r#"{"kind":"command","argv":["true"]}"#;
    let r = server
        .request(Method::POST, &tasks, Some(&viewer), body)
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "a viewer may not create tasks"
    );
    let r = server
        .request(
            Method::POST,
            &format!("{tasks}/t_x/cancel"),
            Some(&viewer),
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = server.request(Method::GET, &tasks, Some(&viewer), "").await;
    assert_eq!(r.status, StatusCode::OK, "a viewer reads task history");
    let r = server
        .request(Method::POST, &tasks, Some(&operator), body)
        .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "the agent is enrolled but not connected"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("not connected"));
    let r = server
        .request(
            Method::POST,
            "/api/v1/agents/agt_nobody/tasks",
            Some(&operator),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = server
        .request(
            Method::POST,
            &tasks,
            Some(&operator),
            r#"{"kind":"command","shell":"rm -rf /"}"#,
        )
        .await;
    assert!(
        r.status.is_client_error(),
        "unknown fields are refused: {}",
        r.status
    );
    server.stop().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

#[tokio::test]
async fn metrics_ingest_takes_gzip_and_refuses_unknown_encodings_and_inflation_bombs() {
    let server = Server::start().await;
    let (_, credential) = server.enroll("db1").await;
    let headers = |encoding: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {credential}")).expect("header"),
        );
        h.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_str(encoding).expect("header"),
        );
        h
    };
    let now = server.world.now_unix_ms();
    let batch_in = |epoch: &str, ts: [i64; 2]| {
        format!(
            r#"{{"epoch":"{epoch}","records":[{{"seq":1,"ts_ms":{},"kind":"db","data":{{"x":1}}}},{{"seq":2,"ts_ms":{},"kind":"db","data":{{"x":2}}}}]}}"#,
            ts[0],
            ts[1]
        )
        .into_bytes()
    };
    let batch = &batch_in("ep1", [now - 1000, now])[..];

    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("gzip"),
            gzip(batch),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let ack: proto::MetricsAck = serde_json::from_slice(&r.body).expect("ack");
    assert_eq!(
        ack,
        proto::MetricsAck {
            stored_through: 2,
            new_records: 2
        }
    );
    // The same rows again, uncompressed: acknowledged, nothing new stored.
    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("identity"),
            batch.to_vec(),
        )
        .await;
    let ack: proto::MetricsAck = serde_json::from_slice(&r.body).expect("ack");
    assert_eq!(
        ack,
        proto::MetricsAck {
            stored_through: 2,
            new_records: 0
        }
    );

    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("br"),
            batch.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("gzip"),
            batch.to_vec(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "plain JSON labelled gzip"
    );
    // 64 MiB of zeros compress to ~64 KiB; inflating stops at the batch limit.
    let bomb = gzip(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    let r = server
        .request_with(Method::POST, proto::METRICS_PATH, headers("gzip"), bomb)
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

    // A host clock two days ahead is refused by name; records older than the retention
    // period are acknowledged but not stored.
    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("identity"),
            batch_in("ep2", [now, now + 2 * 86_400_000]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("clock"));
    let old = now - 31 * 86_400_000;
    let r = server
        .request_with(
            Method::POST,
            proto::METRICS_PATH,
            headers("identity"),
            batch_in("ep3", [old, old]),
        )
        .await;
    let ack: proto::MetricsAck = serde_json::from_slice(&r.body).expect("ack");
    assert_eq!(ack.new_records, 0);
    server.stop().await;
}

#[tokio::test]
async fn the_audit_log_records_logins_refusals_and_enrollments_for_admins_only() {
    let server = Server::start().await;
    let admin = server.token_for("root-ops", Role::Admin).await;
    let viewer = server.token_for("watcher", Role::Viewer).await;
    let refused = server
        .request(
            Method::POST,
            "/api/v1/sessions",
            None,
            r#"{"username":"mallory","password":"guess-guess-guess"}"#,
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let (agent_id, _) = server.enroll("db7").await;

    let r = server
        .request(Method::GET, "/api/v1/audit", Some(&viewer), "")
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "viewers may not read the audit log"
    );

    let r = server
        .request(Method::GET, "/api/v1/audit", Some(&admin), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let records: Vec<serde_json::Value> = serde_json::from_slice(&r.body).expect("json");
    let seen: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().expect("actor").to_string(),
                r["action"].as_str().expect("action").to_string(),
                r["target"].as_str().expect("target").to_string(),
            )
        })
        .collect();
    let expect = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        seen,
        vec![
            expect("enrollment token", "agent.enrolled", &agent_id),
            expect("mallory", "login.refused", "mallory"),
            expect("watcher", "login", "watcher"),
            expect("root-ops", "login", "root-ops"),
        ],
        "newest first"
    );
    assert_eq!(records[3]["detail"]["role"], "admin");
    assert!(records[0]["ts"].as_str().expect("ts").ends_with('Z'));

    // Filter and page.
    let r = server
        .request(
            Method::GET,
            "/api/v1/audit?action=login&limit=1",
            Some(&admin),
            "",
        )
        .await;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["actor"], "watcher");
    let before = page[0]["id"].as_i64().expect("id");
    let r = server
        .request(
            Method::GET,
            &format!("/api/v1/audit?action=login&before={before}"),
            Some(&admin),
            "",
        )
        .await;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["actor"], "root-ops");
    let r = server
        .request(Method::GET, "/api/v1/audit?limit=0", Some(&admin), "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_latencies_and_fleet_figures() {
    let server = Server::start().await;
    let viewer = server.token_for("scraper", Role::Viewer).await;
    server.enroll("db8").await;
    let r = server.request(Method::GET, "/metrics", None, "").await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "metrics need a token too"
    );
    let r = server
        .request(Method::GET, "/metrics", Some(&viewer), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers.get(http::header::CONTENT_TYPE),
        Some(&HeaderValue::from_static(
            "text/plain; version=0.0.4; charset=utf-8"
        ))
    );
    let text = String::from_utf8(r.body.to_vec()).expect("utf-8");
    for line in [
        "outpost_agents{status=\"online\"} 0",
        "outpost_agents{status=\"offline\"} 1",
        "outpost_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/sessions\",status=\"200\"} 1",
        "outpost_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/agents/enroll\",status=\"200\"} 1",
        "outpost_ingest_batches_total 0",
        "outpost_terminal_sessions_live 0",
        "outpost_audit_write_failures_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Every sample belongs to a family announced with HELP and TYPE.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().expect("name");
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} "))
                || text.contains(&format!("# TYPE {name} ")),
            "{line}"
        );
    }
    server.stop().await;
}

/// Every `$ref` in `value`.
fn refs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push(v.as_str().expect("ref is a string").to_string());
                } else {
                    refs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_documents_every_route_of_the_router() {
    let server = Server::start().await;
    let viewer = server.token_for("reader", Role::Viewer).await;
    let r = server
        .request(Method::GET, "/api/openapi.json", None, "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = server
        .request(Method::GET, "/api/openapi.json", Some(&viewer), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(doc["openapi"], "3.1.0");

    let mut undocumented = Vec::new();
    for spec in route_specs() {
        if control_plane::http::openapi::describe(&spec.method, spec.path).is_none() {
            undocumented.push(format!("{} {}", spec.method, spec.path));
            continue;
        }
        let path = spec.path.replace("{*", "{");
        let op = &doc["paths"][&path][spec.method.as_str().to_lowercase()];
        assert!(
            op.is_object(),
            "{} {path} is missing from the document",
            spec.method
        );
        assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()));
        let params: Vec<&str> = op["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        let expected: Vec<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(String::from)
            .collect();
        assert_eq!(params, expected, "path parameters of {path}");
        let public = spec.access == Access::Public;
        assert_eq!(
            op["security"].as_array().expect("security").is_empty(),
            public,
            "security of {} {path}",
            spec.method
        );
    }
    assert!(
        undocumented.is_empty(),
        "routes without a description in http/openapi.rs: {undocumented:?}"
    );
    let count: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|p| p.as_object().expect("path item").len())
        .sum();
    assert_eq!(count, route_specs().len(), "no operation without a route");

    // Bodies are described by the handlers' types, and every reference resolves.
    let login = &doc["paths"]["/api/v1/sessions"]["post"];
    let login_ref = login["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .expect("login body ref");
    let name = login_ref.rsplit('/').next().expect("name");
    let login_schema = &doc["components"]["schemas"][name];
    assert_eq!(
        login_schema["required"],
        serde_json::json!(["username", "password"])
    );
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 10);
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected ref {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
    let audit = &doc["paths"]["/api/v1/audit"]["get"]["parameters"];
    assert!(
        audit
            .as_array()
            .expect("params")
            .iter()
            .any(|p| p["name"] == "action" && p["in"] == "query"),
        "query parameters come from the handler's query type: {audit}"
    );
    server.stop().await;
}

#[tokio::test]
async fn repeated_failed_logins_lock_the_name_out_even_for_the_right_password() {
    let server = Server::start().await;
    server.token_for("carol", Role::Operator).await;
    server.token_for("dave", Role::Operator).await;
    let login = |name: &str, password: &str| {
        let body = format!(r#"{{"username":"{name}","password":"{password}"}}"#);
        server.request(Method::POST, "/api/v1/sessions", None, body)
    };
    for _ in 0..control_plane::throttle::FREE_FAILURES {
        let r = login("carol", "wrong-wrong-wrong").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = login("carol", "a-long-enough-password").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "locked out");
    let wait: u64 = r
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=30).contains(&wait), "{wait}");
    // Anyone can send refused logins: while locked they are counted, not written one by one.
    for _ in 0..20 {
        let r = login("carol", "wrong-wrong-wrong").await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    }
    let admin = server.token_for("root", Role::Admin).await;
    let r = server
        .request(
            Method::GET,
            "/api/v1/audit?action=login.refused&limit=500",
            Some(&admin),
            "",
        )
        .await;
    let rows: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let carol = rows
        .as_array()
        .expect("array")
        .iter()
        .filter(|row| row["actor"] == "carol")
        .count();
    assert_eq!(
        carol,
        control_plane::throttle::FREE_FAILURES as usize + 1,
        "five failures and one lockout are recorded, not every refusal"
    );
    let r = login("dave", "a-long-enough-password").await;
    assert_eq!(r.status, StatusCode::OK, "another name is not affected");
    server.stop().await;
}

/// Every answer carries the security headers: the UI's pages (public), refusals (401), and
/// unknown routes; HSTS only under TLS (checked in the agent's TLS test).
#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let server = Server::start().await;
    for (path, status) in [
        ("/", StatusCode::OK),
        ("/api/v1/me", StatusCode::UNAUTHORIZED),
        ("/no/such/route", StatusCode::NOT_FOUND),
    ] {
        let r = server.request(Method::GET, path, None, "").await;
        assert_eq!(r.status, status, "{path}");
        let csp = r
            .headers
            .get(http::header::CONTENT_SECURITY_POLICY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp:?}"
        );
        assert!(!csp.contains("unsafe-eval"), "{path}: {csp:?}");
        assert_eq!(
            r.headers.get(http::header::X_CONTENT_TYPE_OPTIONS),
            Some(&HeaderValue::from_static("nosniff")),
            "{path}"
        );
        assert_eq!(
            r.headers.get(http::header::X_FRAME_OPTIONS),
            Some(&HeaderValue::from_static("DENY")),
            "{path}"
        );
        assert!(
            r.headers
                .get(http::header::STRICT_TRANSPORT_SECURITY)
                .is_none(),
            "no HSTS over plain HTTP"
        );
    }
    server.stop().await;
}

/// Behind a TLS-terminating proxy (`secure_cookies` without TLS here) the cookie is `Secure`
/// and answers carry HSTS: the browser speaks HTTPS to the proxy.
#[tokio::test]
async fn behind_a_tls_proxy_the_cookie_is_secure_and_hsts_is_sent() {
    let server = Server::start_with(control_plane::settings::Settings {
        secure_cookies: true,
        ..crate::harness::fast_settings()
    })
    .await;
    server.token_for("erin", Role::Operator).await;
    let r = server
        .request(
            Method::POST,
            "/api/v1/sessions",
            None,
            r#"{"username":"erin","password":"a-long-enough-password"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let cookie = r
        .headers
        .get(http::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(
        r.headers
            .get(http::header::STRICT_TRANSPORT_SECURITY)
            .is_some()
    );
    server.stop().await;
}

#[tokio::test]
async fn without_redis_a_replica_serves_all_but_terminals_and_says_so() {
    let closed_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
        probe.local_addr().expect("addr").port()
    };
    let streams = control_plane::terminal::Streams::redis(
        world::World::real(),
        &format!("redis://127.0.0.1:{closed_port}/"),
    )
    .expect("redis url");
    let server = Server::start_custom(crate::harness::fast_settings(), Some(streams)).await;

    let health = server.request(Method::GET, "/healthz", None, "").await;
    assert_eq!(
        health.status,
        StatusCode::OK,
        "liveness does not hang on Redis"
    );
    let health: serde_json::Value = serde_json::from_slice(&health.body).expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(
        health["terminal_store"],
        serde_json::json!({"backend": "redis", "reachable": false})
    );

    let token = server.token_for("ops", Role::Admin).await;
    let agents = server
        .request(Method::GET, "/api/v1/agents", Some(&token), "")
        .await;
    assert_eq!(agents.status, StatusCode::OK, "the fleet is served");
    let metrics = server
        .request(Method::GET, "/metrics", Some(&token), "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("\noutpost_terminal_store_up 0\n"), "{text}");

    let terminal = server
        .request(
            Method::POST,
            "/api/v1/terminal/sessions",
            Some(&token),
            r#"{"agent_id":"agt_nope"}"#,
        )
        .await;
    assert!(
        terminal.status.is_client_error() || terminal.status.is_server_error(),
        "a terminal is refused: {}",
        terminal.status
    );
    server.stop().await;
}

#[tokio::test]
async fn logout_revokes_the_token_at_once_and_clears_the_cookie() {
    let server = Server::start().await;
    let token = server.token_for("ops", Role::Viewer).await;
    let other = server.token_for("ops2", Role::Viewer).await;
    let me = server
        .request(Method::GET, "/api/v1/me", Some(&token), "")
        .await;
    assert_eq!(me.status, StatusCode::OK);

    let out = server
        .request(Method::DELETE, "/api/v1/sessions", Some(&token), "")
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let cookie = out
        .headers
        .get(http::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cookie.contains("Max-Age=0"), "{cookie}");

    let me = server
        .request(Method::GET, "/api/v1/me", Some(&token), "")
        .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "the token is revoked");
    let again = server
        .request(Method::DELETE, "/api/v1/sessions", Some(&token), "")
        .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    let me = server
        .request(Method::GET, "/api/v1/me", Some(&other), "")
        .await;
    assert_eq!(me.status, StatusCode::OK, "other tokens keep working");
    server.stop().await;
}

#[tokio::test]
async fn an_admin_lists_tokens_and_revokes_one_which_stops_working_at_once() {
    let server = Server::start().await;
    let admin = server.token_for("boss", Role::Admin).await;
    let ops = server.token_for("ops", Role::Operator).await;

    let listed = server
        .request(Method::GET, "/api/v1/tokens", Some(&admin), "")
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    let listed: serde_json::Value = serde_json::from_slice(&listed.body).expect("json");
    let rows = listed.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{listed}");
    assert!(
        !listed.to_string().contains(&ops) && !listed.to_string().contains(&admin),
        "secrets are never listed"
    );
    let ops_row = rows.iter().find(|r| r["user"] == "ops").expect("ops token");
    assert_eq!(ops_row["current"], false);
    let boss_row = rows
        .iter()
        .find(|r| r["user"] == "boss")
        .expect("boss token");
    assert_eq!(boss_row["current"], true);
    let id = ops_row["id"].as_str().expect("id");

    let forbidden = server
        .request(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&ops),
            "",
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN, "admins only");
    let bad = server
        .request(Method::DELETE, "/api/v1/tokens/xyz", Some(&admin), "")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let revoked = server
        .request(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let me = server
        .request(Method::GET, "/api/v1/me", Some(&ops), "")
        .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "revoked at once");
    let again = server
        .request(
            Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let audit = server
        .request(
            Method::GET,
            "/api/v1/audit?action=token.revoked",
            Some(&admin),
            "",
        )
        .await;
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    assert_eq!(audit[0]["target"], id, "{audit}");
    assert_eq!(audit[0]["actor"], "boss");
    server.stop().await;
}

/// Admins change roles, disable, enable and delete users; each change holds at once for the
/// user's existing tokens, and the last enabled admin cannot be demoted, disabled or deleted.
#[tokio::test]
async fn admins_manage_users_and_every_change_holds_at_once() {
    let server = Server::start().await;
    let admin = server.token_for("root", Role::Admin).await;
    let bob = server.token_for("bob", Role::Operator).await;
    let call = |method: Method, path: &str, token: &str, body: &str| {
        let (path, token, body) = (path.to_string(), token.to_string(), body.to_string());
        let server = &server;
        async move { server.request(method, &path, Some(&token), body).await }
    };
    let login = |name: &str| {
        let body = format!(r#"{{"username":"{name}","password":"a-long-enough-password"}}"#);
        let server = &server;
        async move {
            server
                .request(Method::POST, "/api/v1/sessions", None, body)
                .await
                .status
        }
    };
    assert_eq!(
        call(Method::GET, "/api/v1/users", &bob, "").await.status,
        403
    );
    let users = call(Method::GET, "/api/v1/users", &admin, "").await;
    assert_eq!(users.status, 200);
    let users: serde_json::Value = serde_json::from_slice(&users.body).expect("json");
    assert_eq!(users[0]["name"], "bob", "{users}");
    assert_eq!(users[0]["role"], "operator", "{users}");
    assert_eq!(users[0]["disabled"], false, "{users}");
    assert!(users[0].get("password_hash").is_none(), "{users}");

    // A role change holds for the token bob already has.
    let tasks = "/api/v1/agents/agt_x/tasks";
    assert_ne!(call(Method::POST, tasks, &bob, "{}").await.status, 403);
    let r = call(
        Method::PATCH,
        "/api/v1/users/bob",
        &admin,
        r#"{"role":"viewer"}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(call(Method::POST, tasks, &bob, "{}").await.status, 403);

    // Disabled: the token stops working, and so does logging in; enabled: logging in works.
    let r = call(
        Method::PATCH,
        "/api/v1/users/bob",
        &admin,
        r#"{"disabled":true}"#,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(call(Method::GET, "/api/v1/me", &bob, "").await.status, 401);
    assert_eq!(login("bob").await, 401);
    let r = call(
        Method::PATCH,
        "/api/v1/users/bob",
        &admin,
        r#"{"disabled":false}"#,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(login("bob").await, 200);

    // Refusals: the last admin, bad input, unknown users.
    for (method, body) in [
        (Method::PATCH, r#"{"role":"operator"}"#),
        (Method::PATCH, r#"{"disabled":true}"#),
        (Method::DELETE, ""),
    ] {
        let r = call(method, "/api/v1/users/root", &admin, body).await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert!(String::from_utf8_lossy(&r.body).contains("last enabled admin"));
    }
    let r = call(
        Method::PATCH,
        "/api/v1/users/bob",
        &admin,
        r#"{"role":"root"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = call(Method::PATCH, "/api/v1/users/bob", &admin, "{}").await;
    assert_eq!(r.status, 400);
    let r = call(
        Method::PATCH,
        "/api/v1/users/carol",
        &admin,
        r#"{"role":"admin"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        call(Method::GET, "/api/v1/me", &admin, "").await.status,
        200
    );

    // Deleted: gone, and its login with it.
    let r = call(Method::DELETE, "/api/v1/users/bob", &admin, "").await;
    assert_eq!(r.status, 204);
    assert_eq!(login("bob").await, 401);
    assert_eq!(
        call(Method::DELETE, "/api/v1/users/bob", &admin, "")
            .await
            .status,
        404
    );
    let audit = call(Method::GET, "/api/v1/audit?action=user.changed", &admin, "").await;
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    assert_eq!(audit.as_array().map(Vec::len), Some(3), "{audit}");
    assert_eq!(audit[2]["detail"]["role"], "viewer", "{audit}");
    let audit = call(Method::GET, "/api/v1/audit?action=user.deleted", &admin, "").await;
    let audit: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    assert_eq!(audit[0]["target"], "bob", "{audit}");
    server.stop().await;
}

/// Refusals are JSON everywhere, also the ones axum's extractors write in plain text (a body
/// that is not JSON, a missing content type) and a missing UI file: found by schemathesis.
#[tokio::test]
async fn extractor_refusals_and_missing_files_answer_in_json() {
    let server = Server::start().await;
    let r = server
        .request_with(
            Method::POST,
            "/api/v1/sessions",
            HeaderMap::new(),
            r#"{"username":"a","password":"b"}"#,
        )
        .await;
    assert_eq!(r.status, 415);
    assert_eq!(
        r.headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let body: proto::ErrorBody = serde_json::from_slice(&r.body).expect("an ErrorBody");
    assert!(body.error.contains("Content-Type"), "{}", body.error);
    let r = server
        .request(Method::POST, "/api/v1/sessions", None, "{not json")
        .await;
    assert_eq!(r.status, 400);
    serde_json::from_slice::<proto::ErrorBody>(&r.body).expect("an ErrorBody");
    let r = server
        .request(Method::GET, "/assets/nope.js", None, "")
        .await;
    assert_eq!(r.status, 404);
    serde_json::from_slice::<proto::ErrorBody>(&r.body).expect("an ErrorBody");
    server.stop().await;
}

/// Anyone can send logins, and with a new name each time no lockout bounds them: refused
/// logins are written to the audit log up to 60 a minute per replica, the rest only counted.
#[tokio::test]
async fn a_flood_of_refused_logins_cannot_grow_the_audit_log_without_bound() {
    let server = Server::start().await;
    let admin = server.token_for("root", Role::Admin).await;
    const SENT: usize = 130;
    for i in 0..SENT {
        let body = format!(r#"{{"username":"nobody{i}","password":"wrong-password-123"}}"#);
        let r = server
            .request(Method::POST, "/api/v1/sessions", None, body)
            .await;
        assert_eq!(r.status, 401);
    }
    let audit = server
        .request(
            Method::GET,
            "/api/v1/audit?action=login.refused&limit=500",
            Some(&admin),
            "",
        )
        .await;
    let records: serde_json::Value = serde_json::from_slice(&audit.body).expect("json");
    let audited = records.as_array().map_or(0, Vec::len);
    let unaudited = server
        .state
        .observed
        .login_refusals_unaudited_total
        .load(std::sync::atomic::Ordering::Relaxed) as usize;
    // The run spans at most two minutes of the budget.
    assert!(audited <= 120, "{audited} refusals audited");
    assert_eq!(
        audited + unaudited,
        SENT,
        "every refusal is audited or counted"
    );
    server.stop().await;
}

/// The live sessions list: an admin sees everyone's open sessions, an operator only their own,
/// a viewer none (the route is for operators), and closed sessions are not listed.
#[tokio::test]
async fn open_terminal_sessions_are_listed_to_their_owner_and_to_admins() {
    use control_plane::terminal::{SessionMeta, SessionState};
    let server = Server::start().await;
    let admin = server.token_for("root", Role::Admin).await;
    let alice = server.token_for("alice", Role::Operator).await;
    let viewer = server.token_for("val", Role::Viewer).await;
    let alice_id = server
        .storage
        .user_by_name("alice")
        .await
        .expect("lookup")
        .expect("alice")
        .id;
    let streams = &server.state.terminal.streams;
    for (id, user_id, username, state, at) in [
        ("ses_a", alice_id.as_str(), "alice", SessionState::Live, 2),
        ("ses_b", "usr_bob", "bob", SessionState::Pending, 1),
        ("ses_c", alice_id.as_str(), "alice", SessionState::Closed, 3),
    ] {
        let meta = SessionMeta {
            agent_id: "agt_1".into(),
            user_id: user_id.into(),
            username: username.into(),
            state,
            created_ms: at,
            changed_ms: at,
            started: false,
            reason: String::new(),
            input_cursor: String::new(),
            recording: String::new(),
        };
        streams.create(id, &meta, 100).await.expect("create");
    }
    let listed = |token: String| {
        let server = &server;
        async move {
            let r = server
                .request(Method::GET, "/api/v1/terminal/sessions", Some(&token), "")
                .await;
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let ids: Vec<String> = body
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s["session_id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (r.status.as_u16(), ids)
        }
    };
    assert_eq!(
        listed(admin).await,
        (200, vec!["ses_b".to_string(), "ses_a".into()])
    );
    assert_eq!(listed(alice).await, (200, vec!["ses_a".to_string()]));
    assert_eq!(listed(viewer).await.0, 403);
    server.stop().await;
}
