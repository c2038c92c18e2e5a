//! `GET /api/v1/backups`: the agents' `backup_info` and `archiver` records, delivered as any
//! agent delivers them, ranked by the risk each host runs.

use http::Method;

use crate::harness::{Server, deliver};
use control_plane::auth::Role;

fn info(stanza_code: i64, backups: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"tool": "pgbackrest", "stanzas": [{
        "name": "main",
        "status": {"code": stanza_code, "message": if stanza_code == 0 { "ok" } else { "no valid backups" }, "backup_running": false},
        "archive": [{"id": "15-1", "min": "000000010000000000000001", "max": "000000010000000000000009"}],
        "backups": backups, "backups_total": 1}]})
}

fn archiver(now_ms: i64, failing: bool) -> serde_json::Value {
    serde_json::json!({
        "archive_mode": "on", "archived_count": 9, "failed_count": if failing { 3 } else { 0 },
        "last_archived_wal": "000000010000000000000009", "last_archived_ms": now_ms - 3_600_000,
        "last_failed_wal": if failing { serde_json::json!("00000001000000000000000A") } else { serde_json::Value::Null },
        "last_failed_ms": if failing { serde_json::json!(now_ms - 60_000) } else { serde_json::Value::Null },
        "ready_count": if failing { 4 } else { 0 },
    })
}

#[tokio::test]
async fn hosts_are_ranked_by_backup_risk_with_their_reasons() {
    let server = Server::start().await;
    let viewer = server.token_for("backup-viewer", Role::Viewer).await;
    let now_ms = server.world.now_unix_ms();
    let now_s = now_ms / 1000;
    let two_hours_ago = serde_json::json!([{
        "label": "20261207-010000F", "type": "full", "start": now_s - 7300, "stop": now_s - 7200,
        "size": 52_000_000, "delta": 52_000_000, "repo_size": 7_000_000, "repo_delta": 7_000_000,
        "wal_start": "000000010000000000000003", "wal_stop": "000000010000000000000003", "error": false, "repo": 1,
    }]);

    let (_, none) = server.enroll("db-none").await;
    deliver(
        &server,
        &none,
        "e1",
        now_ms,
        &[
            ("backup_info", info(2, serde_json::json!([]))),
            ("archiver", archiver(now_ms, false)),
        ],
    )
    .await;
    let (_, good) = server.enroll("db-good").await;
    deliver(
        &server,
        &good,
        "e2",
        now_ms,
        &[
            ("backup_info", info(0, two_hours_ago.clone())),
            ("archiver", archiver(now_ms, false)),
        ],
    )
    .await;
    let (_, failing) = server.enroll("db-archive").await;
    deliver(
        &server,
        &failing,
        "e3",
        now_ms,
        &[
            ("backup_info", info(0, two_hours_ago)),
            ("archiver", archiver(now_ms, true)),
        ],
    )
    .await;
    let (_, silent) = server.enroll("db-silent").await;
    let _ = silent;

    let list = |query: &'static str| {
        let (server, viewer) = (&server, viewer.clone());
        async move {
            let r = server
                .request(
                    Method::GET,
                    &format!("/api/v1/backups{query}"),
                    Some(&viewer),
                    "",
                )
                .await;
            (
                r.status,
                serde_json::from_slice::<serde_json::Value>(&r.body).expect("json"),
            )
        }
    };
    let (status, hosts) = list("").await;
    assert_eq!(status, 200, "{hosts}");
    let order: Vec<(&str, &str)> = hosts
        .as_array()
        .expect("array")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or(""),
                h["risk"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("db-none", "no_backup"),
            ("db-archive", "archive_failing"),
            ("db-silent", "unknown"),
            ("db-good", "healthy")
        ],
        "{hosts}"
    );
    let archive = &hosts[1];
    assert!(
        archive["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("00000001000000000000000A failed last, 4 segments waiting"),
        "{archive}"
    );
    let good = &hosts[3];
    let full = &good["backups"]["stanzas"][0]["full"];
    assert_eq!(full["label"], "20261207-010000F", "{good}");
    assert_eq!(full["duration_s"], 100);
    assert_eq!(full["size"], 52_000_000);

    // A tighter objective: the two-hour-old backups breach it; with a second reason, the
    // failing archive ranks first.
    let (_, hosts) = list("?rpo=1h").await;
    let names: Vec<&str> = hosts
        .as_array()
        .expect("array")
        .iter()
        .map(|h| h["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        ["db-none", "db-archive", "db-good", "db-silent"],
        "{hosts}"
    );
    assert_eq!(hosts[2]["risk"], "rpo_breached", "{hosts}");
    assert!(
        hosts[2]["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("2 h old (objective 1 h)")
    );

    // The fleet list carries the verdict, not the summaries (the Backups page has those).
    let agents = server.agents(&viewer).await;
    let good_agent = agents
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "db-good"))
        .expect("db-good");
    assert_eq!(good_agent["backup"]["risk"], "healthy", "{good_agent}");
    assert!(
        good_agent["health"].get("backups").is_none(),
        "{good_agent}"
    );
    assert!(
        good_agent["health"].get("archiver").is_none(),
        "{good_agent}"
    );

    // The gauges the alert rules watch (deploy/alerts).
    let r = server
        .request(Method::GET, "/metrics", Some(&viewer), "")
        .await;
    let text = String::from_utf8_lossy(&r.body);
    let stop_s = (now_s - 7200) as f64;
    for line in [
        "outpost_backup_status_code{agent=\"db-none\",stanza=\"main\"} 2".to_string(),
        "outpost_backup_status_code{agent=\"db-good\",stanza=\"main\"} 0".to_string(),
        format!(
            "outpost_backup_last_success_timestamp_seconds{{agent=\"db-good\",stanza=\"main\",type=\"full\"}} {stop_s}"
        ),
        "outpost_wal_archive_failing{agent=\"db-archive\"} 1".to_string(),
        "outpost_wal_archive_failing{agent=\"db-good\"} 0".to_string(),
        "outpost_wal_archive_ready_segments{agent=\"db-archive\"} 4".to_string(),
        "outpost_backup_info_error{agent=\"db-good\"} 0".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{text}"
        );
    }

    // A backup policy's objective applies to the hosts it selects, unless the request sets one.
    let admin = server.token_for("backup-admin", Role::Admin).await;
    let policy = serde_json::json!({"name": "tight", "agents": ["db-good"], "stanza": "main",
        "full": "0 * * * *", "rpo": "1h"});
    let r = server
        .request(
            Method::POST,
            "/api/v1/backup-policies",
            Some(&admin),
            policy.to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let (_, hosts) = list("").await;
    let good = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == "db-good"))
        .expect("db-good");
    assert_eq!(good["risk"], "rpo_breached", "{good}");
    let (_, hosts) = list("?rpo=26h").await;
    let good = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == "db-good"))
        .expect("db-good");
    assert_eq!(good["risk"], "healthy", "{good}");

    let (status, body) = list("?rpo=soon").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("rpo"),
        "{body}"
    );
}
