//! Versioned schema migrations. A migration is never edited once released: add a new one.
//! Index `i` of each list brings the schema from version `i` to `i + 1`.

/// Backup policies: what schedules of pgBackRest tasks the selected agents should hold. The
/// same statement on both backends.
const BACKUP_POLICIES: &str = r#"
CREATE TABLE backup_policies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
"#;

/// Agent labels (`env`, `cluster`, `role`, free keys) as a JSON object, for selectors.
const AGENT_LABELS: &str = "ALTER TABLE agents ADD COLUMN labels TEXT;";

/// Agent tasks whose latest finished run failed while marked critical, for the
/// `critical_task_failed` rule (found by one indexed read per round).
const FAILING_CRITICAL: &str =
    "ALTER TABLE agent_tasks ADD COLUMN failing_critical BIGINT NOT NULL DEFAULT 0;
CREATE INDEX agent_tasks_failing ON agent_tasks(agent_id) WHERE failing_critical = 1;";

/// Fleet exec runs through the API: one row per run (its request as JSON, when it started,
/// when the replica running it last wrote, when it finished) and one per host (its view as
/// JSON), so any replica answers for a run, also after the one running it died.
const EXEC_RUNS: &str = r#"
CREATE TABLE exec_runs (
    op_id TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    finished_ms BIGINT
);
CREATE TABLE exec_hosts (
    op_id TEXT NOT NULL,
    host TEXT NOT NULL,
    view TEXT NOT NULL,
    PRIMARY KEY (op_id, host)
);
"#;

/// Rollouts: one row per rollout (its spec, plan and progress as JSON, and a version every
/// write raises: a write that read an older version is refused and read again) and one per
/// target host (its wave and its state as JSON).
const ROLLOUTS: &str = r#"
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    active BIGINT NOT NULL,
    version BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_active ON rollouts(active);
CREATE TABLE rollout_hosts (
    rollout_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    wave BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (rollout_id, agent_id)
);
"#;

/// Alerts: the evaluator's lease, named specs (alert channels and rule overrides; a secret
/// column that the API never returns), each alert's state, its history and the notification
/// outbox. `$id` is the backend's auto-numbered key.
macro_rules! alerts_sql {
    ($id:literal) => {
        concat!(
            r#"
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    fence BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE TABLE specs (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    secret TEXT,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, name)
);
CREATE TABLE alerts (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE alert_events (
    id "#,
            $id,
            r#",
    key TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX alert_events_by_time ON alert_events(ts_ms);
CREATE TABLE notifications (
    id "#,
            $id,
            r#",
    key TEXT NOT NULL,
    channel TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_ms BIGINT NOT NULL,
    delivered_ms BIGINT,
    last_error TEXT,
    UNIQUE (key, channel)
);
CREATE INDEX notifications_pending ON notifications(delivered_ms, id);
"#
        )
    };
}

pub const SQLITE: &[&str] = &[
    r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX api_tokens_expiry ON api_tokens(expires_at_ms);
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER,
    enrollment_id TEXT,
    agent_id TEXT
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    last_seen_ms INTEGER,
    connection_id TEXT,
    connected INTEGER NOT NULL DEFAULT 0
);
"#,
    r#"
CREATE TABLE agent_tasks (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    task_id TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, task_id)
);
CREATE INDEX agent_tasks_recent ON agent_tasks(agent_id, updated_ms);
"#,
    r#"
CREATE TABLE metrics (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);
CREATE INDEX metrics_by_time ON metrics(agent_id, kind, ts_ms);
"#,
    r#"
ALTER TABLE agents ADD COLUMN buffer TEXT;
"#,
    r#"
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_action ON audit(action, id);
"#,
    r#"
CREATE TABLE cluster_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
CREATE TABLE recordings (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    username TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    input INTEGER NOT NULL,
    chunks INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    head_hash TEXT NOT NULL,
    last_ms INTEGER NOT NULL,
    incomplete TEXT
);
CREATE INDEX recordings_by_start ON recordings(started_ms);
CREATE TABLE recording_chunks (
    session_id TEXT NOT NULL REFERENCES recordings(session_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    start_offset INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    events TEXT NOT NULL,
    text TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"#,
    r#"
ALTER TABLE agents ADD COLUMN health TEXT;
"#,
    // Signing keys with ids, so they can rotate; the key made before becomes key 1. Audit
    // records by target (a recording's check reads its session's end).
    r#"
CREATE TABLE signing_keys (
    id INTEGER PRIMARY KEY,
    key_hex TEXT NOT NULL,
    active_from_ms INTEGER NOT NULL,
    retire_at_ms INTEGER
);
INSERT INTO signing_keys (id, key_hex, active_from_ms)
    SELECT 1, value, 0 FROM cluster_secrets WHERE name = 'redis_signing_key';
CREATE INDEX audit_by_target ON audit(target, id);
"#,
    BACKUP_POLICIES,
    alerts_sql!("INTEGER PRIMARY KEY AUTOINCREMENT"),
    AGENT_LABELS,
    FAILING_CRITICAL,
    EXEC_RUNS,
    ROLLOUTS,
];

pub const POSTGRES: &[&str] = &[
    r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX api_tokens_expiry ON api_tokens(expires_at_ms);
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms BIGINT,
    enrollment_id TEXT,
    agent_id TEXT
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    last_seen_ms BIGINT,
    connection_id TEXT,
    connected BOOLEAN NOT NULL DEFAULT FALSE
);
"#,
    r#"
CREATE TABLE agent_tasks (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    task_id TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, task_id)
);
CREATE INDEX agent_tasks_recent ON agent_tasks(agent_id, updated_ms);
"#,
    r#"
CREATE TABLE metrics (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    epoch TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);
CREATE INDEX metrics_by_time ON metrics(agent_id, kind, ts_ms);
"#,
    r#"
ALTER TABLE agents ADD COLUMN buffer TEXT;
"#,
    // Metrics move into a table partitioned by day, so retention drops whole partitions.
    // `ts_ms` joins the key (a partitioned table's unique key must hold the partition key);
    // a record's timestamp never changes between deliveries, so the key still deduplicates.
    r#"
ALTER TABLE metrics RENAME TO metrics_unpartitioned;
ALTER INDEX metrics_by_time RENAME TO metrics_unpartitioned_by_time;
CREATE TABLE metrics (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    epoch TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq, ts_ms)
) PARTITION BY RANGE (ts_ms);
CREATE INDEX metrics_by_time ON metrics(agent_id, kind, ts_ms);
DO $$
DECLARE d BIGINT;
BEGIN
    FOR d IN SELECT DISTINCT floor(ts_ms / 86400000.0)::bigint FROM metrics_unpartitioned LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF metrics FOR VALUES FROM (%s) TO (%s)',
            'metrics_p' || to_char(to_timestamp(d * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD'),
            d * 86400000, (d + 1) * 86400000);
    END LOOP;
END $$;
INSERT INTO metrics SELECT agent_id, epoch, seq, ts_ms, kind, data FROM metrics_unpartitioned;
DROP TABLE metrics_unpartitioned;
"#,
    r#"
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_action ON audit(action, id);
"#,
    r#"
CREATE TABLE cluster_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE;
"#,
    r#"
CREATE TABLE recordings (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    username TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms BIGINT,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    input BOOLEAN NOT NULL,
    chunks BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    head_hash TEXT NOT NULL,
    last_ms BIGINT NOT NULL,
    incomplete TEXT
);
CREATE INDEX recordings_by_start ON recordings(started_ms);
CREATE TABLE recording_chunks (
    session_id TEXT NOT NULL REFERENCES recordings(session_id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    start_offset BIGINT NOT NULL,
    end_offset BIGINT NOT NULL,
    events TEXT NOT NULL,
    text TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"#,
    r#"
ALTER TABLE agents ADD COLUMN health TEXT;
"#,
    // Metrics lose their foreign key to agents. Checking it ran one query per stored row,
    // about a third of the ingesting backend's time in a bulk COPY; every batch comes from
    // an authenticated agent, and removing an agent deletes its metrics in the same
    // statement (`remove_agent`). The constraint is found by kind, not by a name.
    r#"
DO $$
DECLARE c TEXT;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'metrics'::regclass AND contype = 'f' AND conparentid = 0 LOOP
        EXECUTE format('ALTER TABLE metrics DROP CONSTRAINT %I', c);
    END LOOP;
END $$;
"#, // Signing keys with ids, so they can rotate; the key made before becomes key 1.
    r#"
CREATE TABLE signing_keys (
    id INTEGER PRIMARY KEY,
    key_hex TEXT NOT NULL,
    active_from_ms BIGINT NOT NULL,
    retire_at_ms BIGINT
);
INSERT INTO signing_keys (id, key_hex, active_from_ms)
    SELECT 1, value, 0 FROM cluster_secrets WHERE name = 'redis_signing_key';
CREATE INDEX audit_by_target ON audit(target, id);
"#,
    BACKUP_POLICIES,
    alerts_sql!("BIGSERIAL PRIMARY KEY"),
    AGENT_LABELS,
    FAILING_CRITICAL,
    EXEC_RUNS,
    ROLLOUTS,
];
