//! One storage suite, run against both backends.

use control_plane::auth::Role;
use control_plane::storage::{
    AuditQuery, AuditRow, EnrollAttempt, EnrollRefusal, Enrollment, Storage, StorageError,
    UserApplied, UserRow,
};
use world::World;

fn user(name: &str) -> UserRow {
    UserRow {
        id: format!("usr_{name}"),
        name: name.to_string(),
        role: Role::Operator,
        password_hash: "$argon2id$fake".to_string(),
        created_at_ms: 1_000,
    }
}

fn attempt(
    token: &str,
    enrollment_id: &str,
    agent_id: &str,
    credential: &str,
    now_ms: i64,
) -> EnrollAttempt {
    EnrollAttempt {
        token_hash: token.to_string(),
        enrollment_id: enrollment_id.to_string(),
        name: "db1".to_string(),
        new_agent_id: agent_id.to_string(),
        credential_hash: credential.to_string(),
        now_ms,
    }
}

async fn check(s: Storage) {
    let v = s.migrate().await.expect("migrate");
    assert_eq!(
        s.migrate().await.expect("migrate again"),
        v,
        "migrations are idempotent"
    );

    // Users.
    s.create_user(user("alice")).await.expect("create user");
    assert!(matches!(
        s.create_user(user("alice")).await,
        Err(StorageError::Conflict(_))
    ));
    let alice = s
        .user_by_name("alice")
        .await
        .expect("query")
        .expect("alice exists");
    assert_eq!(alice, user("alice"));
    assert_eq!(s.user_by_name("bob").await.expect("query"), None);

    // API tokens expire.
    s.create_api_token("tok1", &alice.id, 1_000, 5_000)
        .await
        .expect("token");
    assert_eq!(
        s.user_by_token("tok1", 4_999)
            .await
            .expect("q")
            .map(|u| u.name),
        Some("alice".into())
    );
    assert_eq!(s.user_by_token("tok1", 5_000).await.expect("q"), None);
    assert_eq!(s.user_by_token("nope", 1_000).await.expect("q"), None);

    // Enrollment: single use, retry-safe for the same enrollment id, expiry.
    s.create_enroll_token("et1", 1_000, 10_000)
        .await
        .expect("enroll token");
    let first = s
        .enroll_agent(attempt("et1", "enr_a", "agt_1", "cred_1", 2_000))
        .await
        .expect("enroll");
    assert_eq!(
        first,
        Enrollment::Enrolled {
            agent_id: "agt_1".into()
        }
    );
    let retry = s
        .enroll_agent(attempt("et1", "enr_a", "agt_2", "cred_2", 3_000))
        .await
        .expect("retry");
    assert_eq!(
        retry,
        Enrollment::Enrolled {
            agent_id: "agt_1".into()
        },
        "a retry keeps the agent id"
    );
    assert_eq!(
        s.agent_by_credential("cred_1").await.expect("q"),
        None,
        "the retry re-keyed the agent"
    );
    assert_eq!(
        s.agent_by_credential("cred_2")
            .await
            .expect("q")
            .map(|a| a.id),
        Some("agt_1".into())
    );
    let other = s
        .enroll_agent(attempt("et1", "enr_b", "agt_3", "cred_3", 3_000))
        .await
        .expect("other");
    assert_eq!(other, Enrollment::Refused(EnrollRefusal::AlreadyUsed));
    let late = s
        .enroll_agent(attempt("et1", "enr_a", "agt_4", "cred_4", 10_000))
        .await
        .expect("late");
    assert_eq!(late, Enrollment::Refused(EnrollRefusal::Expired));
    let unknown = s
        .enroll_agent(attempt("nope", "enr_a", "agt_5", "cred_5", 3_000))
        .await
        .expect("unknown");
    assert_eq!(unknown, Enrollment::Refused(EnrollRefusal::UnknownToken));
    s.create_enroll_token("et2", 1_000, 2_000)
        .await
        .expect("enroll token");
    let expired = s
        .enroll_agent(attempt("et2", "enr_c", "agt_6", "cred_6", 2_000))
        .await
        .expect("expired");
    assert_eq!(expired, Enrollment::Refused(EnrollRefusal::Expired));
    assert!(matches!(
        s.create_enroll_token("et2", 1, 2).await,
        Err(StorageError::Conflict(_))
    ));

    let agents = s.list_agents().await.expect("list");
    assert_eq!(
        agents.len(),
        1,
        "one identity however often enrollment was retried"
    );
    assert!(!agents[0].connected);

    // Connection ownership: a stale connection cannot mark a newer one offline.
    s.agent_connected("agt_1", "conn_a", 4_000)
        .await
        .expect("connected");
    assert!(
        s.agent_seen("agt_1", "conn_a", 4_500, None)
            .await
            .expect("seen")
    );
    s.agent_connected("agt_1", "conn_b", 5_000)
        .await
        .expect("replaced");
    assert!(
        !s.agent_seen("agt_1", "conn_a", 5_100, None)
            .await
            .expect("stale seen"),
        "old connection lost ownership"
    );
    // Heartbeats batched: each row answers whether its connection still holds the agent.
    let seen = |conn: &str, now_ms: i64, buffer: Option<&str>| control_plane::storage::SeenRow {
        agent_id: "agt_1".into(),
        connection_id: conn.into(),
        now_ms,
        buffer: buffer.map(str::to_string),
    };
    assert_eq!(
        s.agents_seen(vec![
            seen("conn_b", 5_050, Some(r#"{"rows":7}"#)),
            seen("conn_a", 5_060, Some(r#"{"rows":9}"#)),
        ])
        .await
        .expect("batch"),
        [true, false]
    );
    let a = &s.list_agents().await.expect("list")[0];
    assert_eq!(
        a.last_seen_ms,
        Some(5_050),
        "only the holder's row was written"
    );
    assert_eq!(a.buffer.as_deref(), Some(r#"{"rows":7}"#));
    assert_eq!(
        s.agents_seen(vec![seen("conn_b", 5_000, None)])
            .await
            .expect("batch"),
        [true],
        "figures are kept when a heartbeat carries none"
    );
    assert_eq!(
        s.list_agents().await.expect("list")[0].buffer.as_deref(),
        Some(r#"{"rows":7}"#)
    );
    assert!(
        s.agents_seen(Vec::new())
            .await
            .expect("empty batch")
            .is_empty()
    );
    s.agent_disconnected("agt_1", "conn_a", 5_200)
        .await
        .expect("stale disconnect");
    let a = &s.list_agents().await.expect("list")[0];
    assert!(
        a.connected,
        "stale disconnect must not mark the agent offline"
    );
    assert_eq!(a.last_seen_ms, Some(5_000));
    s.agent_disconnected("agt_1", "conn_b", 6_000)
        .await
        .expect("disconnect");
    let a = &s.list_agents().await.expect("list")[0];
    assert!(!a.connected);
    assert_eq!(a.last_seen_ms, Some(6_000));

    // Metrics: stored once per (agent, epoch, seq), whatever is replayed.
    let row = |seq: i64, ts_ms: i64| control_plane::storage::MetricRow {
        seq,
        ts_ms,
        kind: "db".into(),
        data: format!("{{\"n\":{seq}}}"),
    };
    assert_eq!(
        s.insert_metrics("agt_1", "ep1", vec![row(1, 100), row(2, 200)])
            .await
            .expect("insert"),
        2
    );
    assert_eq!(
        s.insert_metrics("agt_1", "ep1", vec![row(2, 200), row(3, 300)])
            .await
            .expect("replay"),
        1
    );
    assert_eq!(
        s.insert_metrics("agt_1", "ep2", vec![row(1, 400)])
            .await
            .expect("new epoch"),
        1,
        "a new epoch reuses seq"
    );
    let q = |kind: Option<&str>, from_ms, to_ms| control_plane::storage::MetricQuery {
        agent_id: "agt_1".into(),
        kind: kind.map(str::to_string),
        from_ms,
        to_ms,
        limit: 100,
        bytes_max: 1 << 20,
    };
    let all = s.metrics(q(None, 0, 1000)).await.expect("read");
    assert_eq!(
        all.iter()
            .map(|m| (m.epoch.as_str(), m.row.seq))
            .collect::<Vec<_>>(),
        vec![("ep1", 1), ("ep1", 2), ("ep1", 3), ("ep2", 1)]
    );
    assert_eq!(
        s.metrics(q(Some("db"), 150, 350))
            .await
            .expect("window")
            .len(),
        2
    );
    assert!(
        s.metrics(q(Some("other"), 0, 1000))
            .await
            .expect("kind")
            .is_empty()
    );
    // Reads stop before their data passes bytes_max: each {"n":N} here is 7 bytes.
    let capped = s
        .metrics(control_plane::storage::MetricQuery {
            bytes_max: 20,
            ..q(None, 0, 1000)
        })
        .await
        .expect("capped read");
    assert_eq!(capped.len(), 2, "{capped:?}");

    // Retention: whole days before the cut go; a later day stays.
    const DAY_MS: i64 = control_plane::time::DAY_MS;
    s.insert_metrics("agt_1", "ep2", vec![row(2, 2 * DAY_MS + 5)])
        .await
        .expect("insert day 2");
    let pruned = s.prune_metrics(2 * DAY_MS).await.expect("prune");
    assert_eq!(pruned.rows, 4, "{pruned:?}");
    let left = s.metrics(q(None, 0, 3 * DAY_MS)).await.expect("read");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].row.ts_ms, 2 * DAY_MS + 5);
    // A pruned day takes new rows again (its partition is recreated).
    assert_eq!(
        s.insert_metrics("agt_1", "ep3", vec![row(1, 100)])
            .await
            .expect("insert into a pruned day"),
        1
    );
    // A backlog's large batches (Postgres takes them by COPY), one delivered again in part.
    let big = |from: i64, to: i64| {
        (from..to)
            .map(|q| row(q, 9 * DAY_MS + q))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        s.insert_metrics("agt_1", "bulk", big(1, 301))
            .await
            .expect("bulk"),
        300
    );
    assert_eq!(
        s.insert_metrics("agt_1", "bulk", big(201, 501))
            .await
            .expect("bulk replay"),
        200,
        "only the rows not stored before are new"
    );

    // Once the agent has connected, a replay of its enrollment is refused: whoever still holds
    // the token must not take over a live agent's identity.
    // (agt_1 connected in the ownership checks above.)
    let replayed = s
        .enroll_agent(attempt("et1", "enr_a", "agt_9", "cred_9", 5_000))
        .await
        .expect("replay");
    assert_eq!(replayed, Enrollment::Refused(EnrollRefusal::AlreadyUsed));
    assert_eq!(
        s.agent_by_credential("cred_2")
            .await
            .expect("q")
            .map(|a| a.id),
        Some("agt_1".into()),
        "the live agent keeps its credential"
    );
    // And a replay after the window is refused even for an agent never seen.
    s.create_enroll_token("et_w", 1_000, 100 * 60_000)
        .await
        .expect("enroll token");
    let enrolled = s
        .enroll_agent(attempt("et_w", "enr_w", "agt_w", "cred_w", 2_000))
        .await
        .expect("enroll");
    assert!(matches!(enrolled, Enrollment::Enrolled { .. }));
    let late_replay = s
        .enroll_agent(attempt(
            "et_w",
            "enr_w",
            "agt_x",
            "cred_x",
            2_000 + control_plane::storage::ENROLL_REPLAY_WINDOW_MS + 1,
        ))
        .await
        .expect("late replay");
    assert_eq!(late_replay, Enrollment::Refused(EnrollRefusal::AlreadyUsed));

    // Purge removes expired tokens of both kinds.
    assert_eq!(s.purge_expired(20_000).await.expect("purge"), 3);

    // Audit: appended with increasing ids, listed newest first, filtered and paged.
    for (i, action) in ["login", "task.created", "login"].into_iter().enumerate() {
        s.audit_append(AuditRow {
            id: 0,
            ts_ms: 1000 + i as i64,
            actor: format!("user{i}"),
            action: action.to_string(),
            target: "t".to_string(),
            detail: r#"{"k":1}"#.to_string(),
        })
        .await
        .expect("audit append");
    }
    let audit = |action: Option<&str>, before_id: Option<i64>| {
        s.audit_list(AuditQuery {
            target: None,
            action: action.map(str::to_string),
            before_id,
            limit: 10,
        })
    };
    let all = audit(None, None).await.expect("audit list");
    assert_eq!(
        all.iter().map(|r| r.actor.as_str()).collect::<Vec<_>>(),
        ["user2", "user1", "user0"]
    );
    assert!(all[0].id > all[1].id && all[1].id > all[2].id);
    assert_eq!(all[2].detail, r#"{"k":1}"#);
    let logins = audit(Some("login"), Some(all[0].id))
        .await
        .expect("audit list");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].actor, "user0");

    // Retention removes what is older than the horizon, nothing younger.
    assert_eq!(s.prune_audit(1001).await.expect("prune audit"), 1);
    let kept = audit(None, None).await.expect("audit list");
    assert_eq!(
        kept.iter().map(|r| r.actor.as_str()).collect::<Vec<_>>(),
        ["user2", "user1"]
    );

    // Tokens by id: listed without their secret, revoked by id.
    let owner = s
        .user_by_name("alice")
        .await
        .expect("look up")
        .expect("alice");
    let (hash_a, hash_b) = (
        "a".repeat(64),
        format!("{}{}", "b".repeat(16), "c".repeat(48)),
    );
    s.create_api_token(&hash_a, &owner.id, 50_000, 90_000)
        .await
        .expect("token a");
    s.create_api_token(&hash_b, &owner.id, 60_000, 90_000)
        .await
        .expect("token b");
    let tokens = s.list_tokens(55_000).await.expect("list tokens");
    let ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["b".repeat(16), "a".repeat(16)], "newest first, by id");
    assert_eq!(tokens[0].user, "alice");
    assert!(s.revoke_token_id(&"b".repeat(16)).await.expect("revoke"));
    assert!(
        !s.revoke_token_id(&"b".repeat(16))
            .await
            .expect("revoke again")
    );
    assert!(
        s.user_by_token(&hash_b, 55_000)
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        s.user_by_token(&hash_a, 55_000)
            .await
            .expect("lookup")
            .is_some()
    );
    assert!(
        s.list_tokens(95_000).await.expect("list").is_empty(),
        "expired are not listed"
    );

    // Users: a role change holds for existing tokens at once; disabling deletes the tokens and
    // stops logins; enabling lets the user log in again (with new tokens); deleting removes it.
    let hash_d = "d".repeat(64);
    s.create_api_token(&hash_d, &owner.id, 50_000, 90_000)
        .await
        .expect("token d");
    let done = Ok::<_, ()>(UserApplied::Done);
    let ok = |r: Result<UserApplied, StorageError>| r.map_err(|e| panic!("storage: {e}"));
    assert_eq!(ok(s.set_user_role("alice", Role::Admin).await), done);
    let by_token = s.user_by_token(&hash_d, 55_000).await.expect("lookup");
    assert_eq!(by_token.map(|u| u.role), Some(Role::Admin));
    assert_eq!(
        ok(s.set_user_role("nobody", Role::Admin).await),
        Ok(UserApplied::NoSuchUser)
    );
    // Alice is the only admin: she is neither demoted, disabled nor deleted.
    for refused in [
        s.set_user_role("alice", Role::Viewer).await,
        s.set_user_disabled("alice", true).await,
        s.delete_user("alice").await,
    ] {
        assert_eq!(ok(refused), Ok(UserApplied::LastAdmin));
    }
    s.create_user(UserRow {
        role: Role::Admin,
        ..user("root")
    })
    .await
    .expect("second admin");
    assert_eq!(ok(s.set_user_disabled("alice", true).await), done);
    assert!(s.user_by_name("alice").await.expect("lookup").is_none());
    assert!(
        s.user_by_token(&hash_d, 55_000)
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        s.list_tokens(55_000)
            .await
            .expect("list")
            .iter()
            .all(|t| t.user != "alice"),
        "a disabled user's tokens are gone"
    );
    let listed = s.list_users().await.expect("users");
    let alice = listed.iter().find(|u| u.name == "alice").expect("listed");
    assert!(alice.disabled);
    assert_eq!(alice.role, Role::Admin);
    assert_eq!(ok(s.set_user_disabled("alice", false).await), done);
    assert!(s.user_by_name("alice").await.expect("lookup").is_some());
    assert!(
        s.user_by_token(&hash_d, 55_000)
            .await
            .expect("lookup")
            .is_none(),
        "enabling does not bring old tokens back"
    );
    assert_eq!(ok(s.delete_user("alice").await), done);
    assert_eq!(
        ok(s.delete_user("alice").await),
        Ok(UserApplied::NoSuchUser)
    );
    assert!(
        s.list_users()
            .await
            .expect("users")
            .iter()
            .all(|u| u.name != "alice")
    );

    // Removing an agent takes its credential with it.
    s.create_enroll_token("et_rm", 1_000, 1_000_000)
        .await
        .expect("enroll token");
    s.enroll_agent(attempt("et_rm", "enr_rm", "agt_rm", "cred_rm", 2_000))
        .await
        .expect("enroll");
    assert!(s.agent_by_credential("cred_rm").await.expect("q").is_some());
    // Task snapshots are pruned by age and by count per agent.
    // Task t2 is critical and its latest run failed: the one failing critical task, until
    // pruned.
    for (task, at) in [("t1", 1_000), ("t2", 2_000), ("t3", 3_000)] {
        s.upsert_agent_tasks(
            "agt_rm",
            vec![control_plane::storage::TaskRecord {
                task_id: task.to_string(),
                snapshot: format!("{{\"id\":\"{task}\"}}"),
                failing_critical: task == "t2",
            }],
            at,
        )
        .await
        .expect("upsert");
    }
    assert_eq!(
        s.failing_critical_tasks(10).await.expect("failing"),
        vec![("agt_rm".to_string(), r#"{"id":"t2"}"#.to_string())]
    );
    assert_eq!(s.prune_agent_tasks(1_500, 1).await.expect("prune"), 2);
    assert!(
        s.failing_critical_tasks(10)
            .await
            .expect("failing")
            .is_empty()
    );
    // Exec runs: the first write holds the request; later ones change times and hosts only.
    let exec = |updated_ms: i64, finished_ms: Option<i64>, hosts: &[(&str, &str)]| {
        control_plane::storage::ExecRunRow {
            op_id: "op_1".into(),
            run: if updated_ms == 1_000 {
                "asked"
            } else {
                "ignored"
            }
            .into(),
            started_ms: 1_000,
            updated_ms,
            finished_ms,
            hosts: hosts
                .iter()
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect(),
        }
    };
    s.exec_write(exec(1_000, None, &[("db1", "v1"), ("db2", "v1")]))
        .await
        .expect("first write");
    s.exec_write(exec(2_000, Some(2_000), &[("db2", "v2")]))
        .await
        .expect("end");
    let read = s.exec_read("op_1").await.expect("read").expect("stored");
    assert_eq!(
        (read.run.as_str(), read.updated_ms, read.finished_ms),
        ("asked", 2_000, Some(2_000))
    );
    assert_eq!(
        read.hosts,
        vec![
            ("db1".to_string(), "v1".to_string()),
            ("db2".to_string(), "v2".to_string())
        ]
    );
    assert!(s.exec_read("op_none").await.expect("read").is_none());
    assert_eq!(s.prune_exec_runs(1_000).await.expect("prune"), 0);
    assert_eq!(s.prune_exec_runs(1_001).await.expect("prune"), 1);
    assert!(s.exec_read("op_1").await.expect("read").is_none());
    assert_eq!(
        s.agent_tasks("agt_rm", 10).await.expect("tasks"),
        vec![r#"{"id":"t3"}"#.to_string()]
    );
    // A token bound to the agent rotates its credential and keeps its id.
    assert!(
        s.create_rekey_token("rk", "agt_rm", 3_000, 1_000_000)
            .await
            .expect("rekey token")
    );
    assert!(
        !s.create_rekey_token("rk2", "agt_none", 3_000, 1_000_000)
            .await
            .expect("rekey token for nobody")
    );
    let rekeyed = s
        .enroll_agent(attempt("rk", "enr_rk", "agt_fresh", "cred_rk", 4_000))
        .await
        .expect("enroll");
    assert_eq!(
        rekeyed,
        Enrollment::Enrolled {
            agent_id: "agt_rm".into()
        }
    );
    assert!(s.agent_by_credential("cred_rm").await.expect("q").is_none());
    assert!(s.agent_by_credential("cred_rk").await.expect("q").is_some());
    assert!(s.agent("agt_fresh").await.expect("q").is_none());
    assert_eq!(
        s.agent_tasks("agt_rm", 10).await.expect("tasks").len(),
        1,
        "history kept"
    );
    let rm_row = control_plane::storage::MetricRow {
        seq: 1,
        ts_ms: 100,
        kind: "db".into(),
        data: "{}".into(),
    };
    s.insert_metrics("agt_rm", "ep1", vec![rm_row])
        .await
        .expect("insert");
    let rm_metrics = || control_plane::storage::MetricQuery {
        agent_id: "agt_rm".into(),
        kind: None,
        from_ms: 0,
        to_ms: 1000,
        limit: 100,
        bytes_max: 1 << 20,
    };
    assert_eq!(s.metrics(rm_metrics()).await.expect("read").len(), 1);
    // Unused enrollment tokens are listed by id (never the secret) and revoked by it.
    s.create_enroll_token(&"e".repeat(64), 5_000, 900_000)
        .await
        .expect("enroll token");
    assert!(
        s.create_rekey_token(&"f".repeat(64), "agt_rm", 6_000, 900_000)
            .await
            .expect("rekey token")
    );
    let listed = s.list_enroll_tokens(7_000).await.expect("list");
    let ids: Vec<_> = listed
        .iter()
        .map(|t| (t.id.as_str(), t.agent_id.as_deref()))
        .collect();
    assert!(
        ids.contains(&(&"f".repeat(16)[..], Some("agt_rm"))),
        "{ids:?}"
    );
    assert!(ids.contains(&(&"e".repeat(16)[..], None)), "{ids:?}");
    assert!(
        listed.iter().all(|t| t.id != "rk"[..].repeat(8)),
        "used tokens are not listed"
    );
    assert!(
        s.revoke_enroll_token_id(&"e".repeat(16))
            .await
            .expect("revoke")
    );
    assert!(
        !s.revoke_enroll_token_id(&"e".repeat(16))
            .await
            .expect("revoke again")
    );
    assert_eq!(
        s.enroll_agent(attempt(&"e".repeat(64), "enr_e", "agt_e", "cred_e", 8_000))
            .await
            .expect("enroll"),
        Enrollment::Refused(EnrollRefusal::UnknownToken),
        "a revoked token enrolls nothing"
    );
    assert!(s.remove_agent("agt_rm").await.expect("remove"));
    assert_eq!(
        s.enroll_agent(attempt(&"f".repeat(64), "enr_f", "agt_f", "cred_f", 9_000))
            .await
            .expect("enroll"),
        Enrollment::Refused(EnrollRefusal::UnknownToken),
        "an unexpired rekey token does not bring a removed agent back"
    );
    assert!(s.agent("agt_rm").await.expect("q").is_none());
    assert!(
        s.metrics(rm_metrics()).await.expect("read").is_empty(),
        "a removed agent's metrics go with it"
    );
    assert!(s.agent_by_credential("cred_rk").await.expect("q").is_none());
    assert!(s.agent("agt_rm").await.expect("q").is_none());
    assert!(!s.remove_agent("agt_rm").await.expect("remove again"));

    // A shared secret: the first replica's candidate is kept, later ones get it back.
    let first = s.cluster_secret("signing", "aaaa").await.expect("secret");
    assert_eq!(first, "aaaa");
    let again = s.cluster_secret("signing", "bbbb").await.expect("secret");
    assert_eq!(again, "aaaa");
    let other = s.cluster_secret("other", "cccc").await.expect("secret");
    assert_eq!(other, "cccc");

    recordings(&s).await;
    alerts(&s).await;
    rollouts(&s).await;
}

/// The alert lease (one holder, taken over once it lapses, a fence that rises), a round's
/// commit refused to a holder that lost the lease, the outbox in order with one row per key
/// and channel, and specs with their secrets.
async fn alerts(s: &Storage) {
    use control_plane::storage::{AlertCommit, AlertRow, SendOutcome, SpecRow};
    let one = s
        .take_lease("alerts", "r1", 1_000, 500)
        .await
        .expect("lease");
    assert_eq!(one, Some(1));
    assert_eq!(
        s.take_lease("alerts", "r2", 1_200, 500)
            .await
            .expect("lease"),
        None
    );
    assert_eq!(
        s.take_lease("alerts", "r1", 1_400, 500)
            .await
            .expect("renew"),
        Some(1)
    );
    // r1 stops renewing: its lease ends at 1,900.
    let two = s
        .take_lease("alerts", "r2", 2_000, 500)
        .await
        .expect("taken over");
    assert_eq!(two, Some(2), "the fence rises with a new holder");
    let held = s.lease("alerts").await.expect("lease").expect("held");
    assert_eq!(
        (held.holder.as_str(), held.fence, held.expires_ms),
        ("r2", 2, 2_500)
    );
    assert!(s.lease("nothing").await.expect("lease").is_none());
    let commit = |holder: &str, fence: i64, key: &str| AlertCommit {
        lease: "alerts".into(),
        holder: holder.into(),
        fence,
        now_ms: 2_000,
        alerts: vec![AlertRow {
            key: key.into(),
            data: "{}".into(),
            updated_ms: 2_000,
        }],
        removed: vec![],
        events: vec![
            (key.into(), "{\"e\":1}".into()),
            (key.into(), "{\"e\":2}".into()),
        ],
        notifications: vec![
            (format!("{key}:firing"), "ch_a".into(), "1".into()),
            (format!("{key}:firing"), "ch_b".into(), "2".into()),
        ],
    };
    assert!(
        !s.alert_commit(commit("r1", 1, "k1")).await.expect("commit"),
        "r1 lost the lease"
    );
    assert!(s.alerts().await.expect("alerts").is_empty());
    assert!(s.alert_commit(commit("r2", 2, "k2")).await.expect("commit"));
    assert!(
        s.alert_commit(commit("r2", 2, "k2")).await.expect("again"),
        "a replay is harmless"
    );
    let alerts = s.alerts().await.expect("alerts");
    assert_eq!(alerts.len(), 1);
    let events = s.alert_events(10).await.expect("events");
    let datas: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(
        datas,
        ["{\"e\":2}", "{\"e\":1}", "{\"e\":2}", "{\"e\":1}"],
        "newest first"
    );
    let pending = s.notifications_pending(10).await.expect("pending");
    let rows: Vec<(&str, &str)> = pending
        .iter()
        .map(|n| (n.key.as_str(), n.channel.as_str()))
        .collect();
    assert_eq!(
        rows,
        [("k2:firing", "ch_a"), ("k2:firing", "ch_b")],
        "one row per key and channel"
    );
    let b = s.channel_pending("ch_b", 10).await.expect("ch_b");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].channel, "ch_b", "one channel's rows only");
    s.notification_sent(SendOutcome {
        id: pending[0].id,
        attempts: 1,
        delivered_ms: Some(2_100),
        next_ms: 2_100,
        error: None,
    })
    .await
    .expect("sent");
    s.notification_sent(SendOutcome {
        id: pending[1].id,
        attempts: 1,
        delivered_ms: None,
        next_ms: 3_100,
        error: Some("HTTP 503".into()),
    })
    .await
    .expect("failed");
    let pending = s.notifications_pending(10).await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].attempts, pending[0].next_ms), (1, 3_100));
    assert_eq!(pending[0].last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(
        s.prune_alerts(2_101).await.expect("prune"),
        5,
        "4 events and the delivered row"
    );

    let spec = |name: &str| SpecRow {
        kind: "alert_channel".into(),
        id: format!("ch_{name}"),
        name: name.into(),
        spec: "{}".into(),
        secret: Some("s3cret".into()),
        created_ms: 1,
    };
    assert!(s.create_spec(spec("ops")).await.expect("create"));
    assert!(
        !s.create_spec(SpecRow {
            id: "ch_other".into(),
            ..spec("ops")
        })
        .await
        .expect("same name")
    );
    let specs = s.specs("alert_channel").await.expect("specs");
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].secret.as_deref(), Some("s3cret"));
    assert!(s.specs("alert_rule").await.expect("specs").is_empty());
    assert!(s.delete_spec("alert_channel", "ops").await.expect("delete"));
    assert!(
        !s.delete_spec("alert_channel", "ops")
            .await
            .expect("delete again")
    );
}

/// Recordings: the head moves only where a chunk starts, searches find chunks by words and
/// owner, retention removes whole recordings.
/// Rollouts: inserted with their hosts, written only at the version read (a stale write
/// changes nothing), listed newest first and by activity.
async fn rollouts(s: &Storage) {
    use control_plane::storage::{RolloutHostRow, RolloutRow};
    let row = |id: &str, version: i64, data: &str, active: bool| RolloutRow {
        id: id.into(),
        data: data.into(),
        active,
        version,
        created_ms: 1_000,
        updated_ms: 1_000,
    };
    let host = |agent: &str, data: &str| RolloutHostRow {
        agent_id: agent.into(),
        wave: 1,
        data: data.into(),
    };
    s.rollout_insert(
        row("ro_1", 0, "{}", true),
        vec![host("a1", "p"), host("a2", "p")],
    )
    .await
    .expect("insert");
    assert!(
        s.rollout_write(row("ro_1", 0, "{\"s\":1}", true), vec![host("a1", "ok")])
            .await
            .expect("write")
    );
    assert!(
        !s.rollout_write(row("ro_1", 0, "{\"s\":2}", false), vec![host("a2", "ok")])
            .await
            .expect("stale write"),
        "a write that read an older version is refused"
    );
    let (stored, hosts) = s.rollout("ro_1").await.expect("read").expect("there");
    assert_eq!(
        (stored.version, stored.data.as_str(), stored.active),
        (1, "{\"s\":1}", true)
    );
    let datas: Vec<&str> = hosts.iter().map(|h| h.data.as_str()).collect();
    assert_eq!(datas, ["ok", "p"], "only the written host changed");
    assert!(
        s.rollout_write(row("ro_1", 1, "{}", false), Vec::new())
            .await
            .expect("write")
    );
    assert!(s.rollouts(true, 10).await.expect("active").is_empty());
    assert_eq!(s.rollouts(false, 10).await.expect("all").len(), 1);
    assert!(s.rollout("ro_2").await.expect("read").is_none());
}

async fn recordings(s: &Storage) {
    use control_plane::storage::{RecordingQuery, RecordingRow};
    use control_plane::terminal::OutEntry;
    use control_plane::terminal::recording::cast::{Track, Verify, seed_hash};

    let row = |id: &str, user: &str, started_ms: i64| RecordingRow {
        session_id: id.into(),
        agent_id: "agt_r".into(),
        agent_name: "db1".into(),
        user_id: user.into(),
        username: format!("name_{user}"),
        started_ms,
        ended_ms: None,
        width: 80,
        height: 24,
        input: false,
        chunks: 0,
        bytes: 0,
        head_hash: seed_hash(id),
        last_ms: started_ms,
        incomplete: None,
    };
    assert!(
        s.create_recording(row("rec1", "u1", 10_000))
            .await
            .expect("create")
    );
    assert!(
        !s.create_recording(row("rec1", "u2", 1))
            .await
            .expect("again"),
        "a second create (another replica) keeps the first"
    );
    let mut head = s.recording("rec1").await.expect("q").expect("exists");
    assert_eq!(head.user_id, "u1");
    let mut track = Track::new(&head);
    let mut stored = Vec::new();
    for (i, text) in ["select 1;\r\n", "DROP TABLE orders;\r\n", "bye\r\n"]
        .iter()
        .enumerate()
    {
        let offset = head.bytes as u64;
        track.output(
            11_000 + i as i64 * 1_000,
            OutEntry::Data {
                offset,
                bytes: text.as_bytes().to_vec(),
            },
        );
        let chunk = track.take_chunk(&head).expect("chunk");
        assert!(
            s.append_recording_chunk(chunk.clone(), None)
                .await
                .expect("append")
        );
        // The same chunk again (a retry whose answer was lost, or a second writer) moves
        // nothing.
        assert!(
            !s.append_recording_chunk(chunk.clone(), None)
                .await
                .expect("append again")
        );
        head = s.recording("rec1").await.expect("q").expect("exists");
        assert_eq!((head.chunks, head.bytes), (i as i64 + 1, chunk.end_offset));
        assert_eq!(head.head_hash, chunk.hash);
        assert_eq!(head.last_ms, 11_000 + i as i64 * 1_000);
        stored.push(chunk);
    }
    let read = s.recording_chunks("rec1", 1, 10).await.expect("chunks");
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].events, stored[1].events);
    let mut verify = Verify::new("rec1");
    for c in s.recording_chunks("rec1", 0, 10).await.expect("chunks") {
        verify.chunk(&c).expect("chain");
    }
    verify.finish(&head).expect("head");

    s.create_recording(row("rec2", "u2", 20_000))
        .await
        .expect("create");
    s.finish_recording("rec1", 14_000, Some("3 bytes lost".into()))
        .await
        .expect("finish");
    s.finish_recording("rec1", 99_000, None)
        .await
        .expect("finish again");
    let rec1 = s.recording("rec1").await.expect("q").expect("exists");
    assert_eq!(rec1.ended_ms, Some(14_000), "the first end stands");
    assert_eq!(rec1.incomplete.as_deref(), Some("3 bytes lost"));

    let all = |q: RecordingQuery| async move { s.list_recordings(q).await.expect("list") };
    let q = RecordingQuery {
        limit: 10,
        ..RecordingQuery::default()
    };
    let ids = |rows: Vec<RecordingRow>| rows.into_iter().map(|r| r.session_id).collect::<Vec<_>>();
    assert_eq!(ids(all(q.clone()).await), ["rec2", "rec1"], "newest first");
    let mine = RecordingQuery {
        user_id: Some("u1".into()),
        ..q.clone()
    };
    assert_eq!(ids(all(mine.clone()).await), ["rec1"]);
    let window = RecordingQuery {
        from_ms: Some(15_000),
        to_ms: Some(25_000),
        ..q.clone()
    };
    assert_eq!(ids(all(window).await), ["rec2"]);

    let search = |words: &[&str], base: &RecordingQuery| RecordingQuery {
        words: words.iter().map(|w| w.to_string()).collect(),
        ..base.clone()
    };
    let found = s
        .search_recordings(search(&["drop table", "orders"], &q))
        .await
        .expect("search");
    // Chunk 2 matches too: its search text starts with the tail of chunk 1 (so a word split
    // by a chunk boundary is found).
    assert_eq!(found.len(), 2);
    assert_eq!(
        (found[0].recording.session_id.as_str(), found[0].seq),
        ("rec1", 1)
    );
    let none = s
        .search_recordings(search(&["drop", "vacuum"], &q))
        .await
        .expect("search");
    assert!(none.is_empty(), "every word must match");
    let not_theirs = RecordingQuery {
        user_id: Some("u2".into()),
        ..q.clone()
    };
    assert!(
        s.search_recordings(search(&["orders"], &not_theirs))
            .await
            .expect("search")
            .is_empty()
    );

    assert_eq!(s.prune_recordings(15_000).await.expect("prune"), 1);
    assert!(s.recording("rec1").await.expect("q").is_none());
    assert!(
        s.recording_chunks("rec1", 0, 10)
            .await
            .expect("chunks")
            .is_empty()
    );
    assert!(s.recording("rec2").await.expect("q").is_some());
}

/// Two replicas (two connections) demote the only two admins at once, many times: one
/// demotion passes each time and one admin stays.
async fn demote_each_other(here: &Storage, there: &Storage) {
    here.migrate().await.expect("migrate");
    for name in ["alice", "root"] {
        here.create_user(UserRow {
            role: Role::Admin,
            ..user(name)
        })
        .await
        .expect("admin");
    }
    for round in 0..30 {
        let (a, b) = tokio::join!(
            here.set_user_role("alice", Role::Operator),
            there.set_user_role("root", Role::Operator)
        );
        let mut outcomes = [a.expect("alice"), b.expect("root")];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [UserApplied::Done, UserApplied::LastAdmin],
            "round {round}: exactly one demotion passes"
        );
        let users = there.list_users().await.expect("users");
        assert_eq!(
            users.iter().filter(|u| u.role == Role::Admin).count(),
            1,
            "round {round}"
        );
        for name in ["alice", "root"] {
            assert_eq!(
                here.set_user_role(name, Role::Admin)
                    .await
                    .expect("promote"),
                UserApplied::Done
            );
        }
    }
}

#[tokio::test]
async fn sqlite_keeps_an_admin_when_two_writers_demote_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = World::real();
    let open = || control_plane::server::open_storage(&world, dir.path(), None);
    let here = open().await.expect("open");
    let there = open().await.expect("open again");
    demote_each_other(&here, &there).await;
}

#[tokio::test]
async fn postgres_keeps_an_admin_when_two_replicas_demote_at_once() {
    let pg = fixtures::Postgres::start()
        .await
        .expect("start postgres fixture");
    let url = pg.create_database("last_admin").expect("create database");
    let world = World::real();
    let nowhere = std::path::Path::new("/nonexistent");
    let here = control_plane::server::open_storage(&world, nowhere, Some(&url))
        .await
        .expect("open");
    let there = control_plane::server::open_storage(&world, nowhere, Some(&url))
        .await
        .expect("open again");
    demote_each_other(&here, &there).await;
}

#[tokio::test]
async fn sqlite_backend_passes_the_storage_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = World::real();
    let s = control_plane::server::open_storage(&world, dir.path(), None)
        .await
        .expect("open");
    check(s).await;
}

#[tokio::test]
async fn postgres_backend_passes_the_storage_suite() {
    let pg = fixtures::Postgres::start()
        .await
        .expect("start postgres fixture");
    let url = pg
        .create_database("storage_suite")
        .expect("create database");
    let world = World::real();
    let s = control_plane::server::open_storage(
        &world,
        std::path::Path::new("/nonexistent"),
        Some(&url),
    )
    .await
    .expect("open");
    check(s).await;
}

#[tokio::test]
async fn postgres_metrics_move_into_daily_partitions_on_upgrade() {
    let pg = fixtures::Postgres::start()
        .await
        .expect("start postgres fixture");
    let url = pg.create_database("upgrade").expect("create database");
    let world = World::real();
    // A database at schema 4 (metrics unpartitioned) with rows on two days.
    let config: tokio_postgres::Config = url.parse().expect("url");
    let (client, driver) =
        world::postgres_connect(&world, &config, std::time::Duration::from_secs(10))
            .await
            .expect("connect");
    client
        .batch_execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)")
        .await
        .expect("schema table");
    for (i, step) in control_plane::storage::migrations::POSTGRES[..4]
        .iter()
        .enumerate()
    {
        client.batch_execute(step).await.expect("old migration");
        client
            .execute(
                "INSERT INTO schema_migrations VALUES ($1, 0)",
                &[&(i as i32 + 1)],
            )
            .await
            .expect("record");
    }
    client
        .batch_execute(
            "INSERT INTO agents (id, name, credential_hash, created_at_ms) VALUES ('agt_1', 'db1', 'h', 0);
             INSERT INTO metrics VALUES ('agt_1', 'ep', 1, 1795341873120, 'db', '{}'), ('agt_1', 'ep', 2, 1795400000000, 'db', '{}');",
        )
        .await
        .expect("old rows");
    drop(client);
    driver.abort();

    let s = control_plane::server::open_storage(
        &world,
        std::path::Path::new("/nonexistent"),
        Some(&url),
    )
    .await
    .expect("upgrade");
    let rows = s
        .metrics(control_plane::storage::MetricQuery {
            agent_id: "agt_1".into(),
            kind: None,
            from_ms: 0,
            to_ms: i64::MAX,
            limit: 10,
            bytes_max: 1 << 20,
        })
        .await
        .expect("read");
    assert_eq!(
        rows.iter().map(|r| r.row.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Replays still deduplicate in the partitioned table.
    let replay = control_plane::storage::MetricRow {
        seq: 2,
        ts_ms: 1_795_400_000_000,
        kind: "db".into(),
        data: "{}".into(),
    };
    assert_eq!(
        s.insert_metrics("agt_1", "ep", vec![replay])
            .await
            .expect("replay"),
        0
    );
    let pruned = s.prune_metrics(1_795_400_000_000).await.expect("prune");
    assert_eq!(
        (pruned.rows, pruned.partitions),
        (1, 1),
        "2026-11-22 goes, 2026-11-23 stays"
    );
}

/// Two replicas on one database: the one whose retention drops a day's partition leaves
/// the other with a stale partition cache. Its next insert into that day, small batch or
/// large, recreates the partition and lands.
#[tokio::test]
async fn a_partition_dropped_by_another_replica_is_recreated_on_insert() {
    let pg = fixtures::Postgres::start()
        .await
        .expect("start postgres fixture");
    let url = pg.create_database("two_replicas").expect("create database");
    let world = World::real();
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || control_plane::server::open_storage(&world, dir.path(), Some(&url));
    let (a, b) = (
        open().await.expect("replica a"),
        open().await.expect("replica b"),
    );
    a.create_enroll_token("et1", 1_000, 10_000)
        .await
        .expect("enroll token");
    a.enroll_agent(attempt("et1", "enr_a", "agt_1", "cred_1", 2_000))
        .await
        .expect("enroll");
    const DAY_MS: i64 = control_plane::time::DAY_MS;
    let rows = |seqs: std::ops::Range<i64>| {
        seqs.map(|seq| control_plane::storage::MetricRow {
            seq,
            ts_ms: DAY_MS + seq,
            kind: "db".into(),
            data: "{}".into(),
        })
        .collect::<Vec<_>>()
    };
    for (batch, (from, to)) in [(1, 2), (2, 302)].into_iter().enumerate() {
        a.insert_metrics("agt_1", "ep", rows(from..to))
            .await
            .expect("a caches the day's partition");
        let pruned = b.prune_metrics(2 * DAY_MS).await.expect("b drops the day");
        assert_eq!(pruned.partitions, 1, "batch {batch}");
        assert_eq!(
            a.insert_metrics("agt_1", "ep", rows(from..to))
                .await
                .expect("a inserts into the dropped day"),
            (to - from) as u64,
            "batch {batch}"
        );
    }
}

/// `outpost admin` opens the file a running replica writes: an up-to-date schema is only
/// read, so opening succeeds while another connection holds the write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_sqlite_schema_opens_beside_a_writer_holding_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = World::real();
    drop(
        control_plane::server::open_storage(&world, dir.path(), None)
            .await
            .expect("open"),
    );
    let mut writer = rusqlite::Connection::open(dir.path().join("outpost.db")).expect("open raw");
    let held = writer
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("write lock");
    let opened = control_plane::server::open_storage(&world, dir.path(), None).await;
    held.commit().expect("commit");
    assert!(opened.is_ok(), "{:#}", opened.err().expect("error"));
}

#[tokio::test]
async fn a_newer_schema_is_refused_not_downgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = World::real();
    let s = control_plane::server::open_storage(&world, dir.path(), None)
        .await
        .expect("open");
    drop(s);
    let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).expect("open raw");
    conn.pragma_update(None, "user_version", 99)
        .expect("bump version");
    drop(conn);
    let err = control_plane::server::open_storage(&world, dir.path(), None)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("newer than this build"),
        "{err:#}"
    );
}

/// Forward every connection accepted on `listener` to `127.0.0.1:to` (a thread per direction).
fn forward(listener: std::net::TcpListener, to: u16) {
    for inbound in listener.incoming() {
        let Ok(inbound) = inbound else { return };
        let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
            return;
        };
        for (mut from, mut into) in [
            (
                inbound.try_clone().expect("clone"),
                outbound.try_clone().expect("clone"),
            ),
            (outbound, inbound),
        ] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut into);
                let _ = into.shutdown(std::net::Shutdown::Write);
            });
        }
    }
}

/// A database that starts answering only after the replica (or `outpost admin`) started is
/// waited for, not a start-up failure; one that answers and refuses fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_reachable_yet_is_waited_for_and_a_refusal_is_not() {
    let pg = fixtures::Postgres::start().await.expect("postgres");
    let url = pg.create_database("late_start").expect("create database");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let late = url.replace(&format!(":{}/", pg.port()), &format!(":{port}/"));
    let target = pg.port();
    let opens_later = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(3));
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port");
        forward(listener, target);
    });
    let world = World::real();
    let opened = control_plane::server::open_storage(
        &world,
        std::path::Path::new("/nonexistent"),
        Some(&late),
    )
    .await;
    let storage = opened.expect("the database is waited for until it answers");
    assert!(storage.list_users().await.expect("list users").is_empty());
    assert!(!opens_later.is_finished(), "the forwarder still serves");

    let missing = url.replace("/late_start", "/no_such_database");
    let refused = control_plane::server::open_storage(
        &world,
        std::path::Path::new("/nonexistent"),
        Some(&missing),
    )
    .await
    .err()
    .expect("a missing database is refused");
    assert!(
        format!("{refused:#}").contains("does not exist"),
        "{refused:#}"
    );
}
