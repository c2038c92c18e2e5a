//! `just bench fleet`: one release control-plane replica holding a simulated fleet, played
//! from this one process with the real protocol: enrollment through the API (tokens made in
//! bulk beforehand), the control channel (hello, welcome, heartbeats carrying buffer figures
//! every heartbeat interval, with each agent's first one at a random phase), gzip metrics
//! batches of the collector's size at its interval, and the agents' own reconnect back-off
//! (`agent::backoff`, base 1 s, max 30 s, jitter).
//!
//! Ramp 1,000 → 2,500 → 5,000 → 10,000 agents (`OUTPOST_FLEET_STEPS` to change), on SQLite
//! storage and then on Postgres. At each step, over a measuring window: heartbeat-ack p50/p99,
//! ingest acknowledgements p50/p99 and rows/s, refusals (429) and disconnects, the replica's
//! CPU, RSS and open files, whether the API showed any connected agent offline, and the
//! Backups page's API (`GET /api/v1/backups`, every agent reporting pgBackRest status and WAL
//! archiving) next to the fleet list's (`GET /api/v1/agents`), p95 of six calls each. Then a
//! reconnect storm: kill -9 the replica with the largest fleet connected, restart it, and time
//! until every agent has its welcome again, with the replica's peak CPU on the way.
//!
//! At the step with `OUTPOST_FLEET_ROLLOUT` agents (default 5,000; 0: none), a rollout of a
//! `command` task over all of them (a canary, 10 %, the rest; 500 at once): the simulated
//! agents take the task as the real one does (a second one with the same key is refused)
//! and report it done 0.5 to 1.5 s later. Measured: when each wave's first task arrives after
//! the previous wave's last report, and `GET /api/v1/rollouts/{id}` p95 while it runs.
#![allow(clippy::disallowed_methods)] // a load generator measures wall time and owns sockets

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use world::World;

use harness::ControlPlane;

/// The control plane's default heartbeat interval (agents are told it in `welcome`).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The collector's default interval, and one collection's records (one per statistic).
const METRICS_EVERY: Duration = Duration::from_secs(15);
const RECORDS_PER_BATCH: usize = 10;
/// How long each step is measured once every agent of it is connected.
const WINDOW: Duration = Duration::from_secs(30);
/// Enrollments and connections started at once while ramping.
const RAMP_PARALLEL: usize = 200;

/// Latencies in microseconds, shared by all agents; cleared at each window's start.
#[derive(Default)]
struct Samples {
    heartbeat_us: Vec<u64>,
    ingest_us: Vec<u64>,
}

#[derive(Default)]
struct Counters {
    welcomed: AtomicU64,
    connected: AtomicU64,
    disconnects: AtomicU64,
    refused_429: AtomicU64,
    ingest_errors: AtomicU64,
    rows_acked: AtomicU64,
}

/// When the simulated agents were given a rollout's task and reported it done, by agent.
#[derive(Default)]
struct RolloutSeen {
    given: std::collections::BTreeMap<usize, Instant>,
    /// The same, in Unix milliseconds (to compare with the control plane's times).
    given_ms: std::collections::BTreeMap<usize, i64>,
    reported: std::collections::BTreeMap<usize, Instant>,
}

struct Fleet {
    /// Replicas; agent `i` uses `urls[i % len]`.
    urls: Vec<String>,
    rollout: std::sync::Mutex<RolloutSeen>,
    samples: Mutex<Samples>,
    counters: Counters,
    /// Measuring: latencies are kept.
    measuring: AtomicBool,
}

struct Agent {
    index: usize,
    credential: String,
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn now_ms() -> i64 {
    World::real().now_unix_ms()
}

/// One gzip metrics batch of the collector's shape.
fn batch(agent: &Agent, seq: &mut i64) -> Vec<u8> {
    let mut records = Vec::with_capacity(RECORDS_PER_BATCH);
    let ts = now_ms();
    for kind in [
        "pg_stat_database",
        "bgwriter",
        "activity",
        "locks",
        "database_size",
        "xid_age",
        "replication",
        "dead_tuples",
        "backup_info",
        "archiver",
    ] {
        *seq += 1;
        let data = match kind {
            // A host with pgBackRest: one stanza, a week of daily backups (what the agent
            // sends: the newest first).
            "backup_info" => backup_info(ts / 1000),
            "archiver" => format!(
                r#"{{"archive_mode":"on","archived_count":{},"failed_count":0,"last_archived_wal":"00000001000000000000{:04X}","last_archived_ms":{ts},"last_failed_wal":null,"last_failed_ms":null,"ready_count":0}}"#,
                *seq,
                *seq % 0xFFFF
            ),
            "xid_age" => format!(r#"{{"postgres":{},"app":{}}}"#, 1000 + *seq, 5000 + *seq),
            "replication" => "[]".to_string(),
            "activity" => r#"{"active":3,"idle":12,"idle in transaction":1}"#.to_string(),
            _ => format!(
                r#"{{"xact_commit":{},"xact_rollback":3,"blks_read":1234,"blks_hit":987654,"tup_returned":55555,"agent":{}}}"#,
                *seq * 7,
                agent.index
            ),
        };
        records.push(format!(
            r#"{{"seq":{},"ts_ms":{ts},"kind":"{kind}","data":{data}}}"#,
            *seq
        ));
    }
    let json = format!(
        r#"{{"epoch":"fleet-{}","records":[{}]}}"#,
        agent.index,
        records.join(",")
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(json.as_bytes()).expect("gzip");
    gz.finish().expect("gzip")
}

/// A `backup_info` record: stanza `main`, a full backup and six incrementals a day apart,
/// stamped as whole hours so that a steady host's summary does not change between batches.
fn backup_info(now_s: i64) -> String {
    let day = 86_400;
    let last = now_s - now_s % 3600;
    let backups: Vec<String> = (0..7)
        .map(|i| {
            let stop = last - i * day;
            let kind = if i == 6 { "full" } else { "incr" };
            format!(
                r#"{{"label":"B{stop}","type":"{kind}","start":{},"stop":{stop},"size":52000000,"delta":1000000,"repo_size":7000000,"repo_delta":300000,"wal_start":"000000010000000000000003","wal_stop":"000000010000000000000003","error":false,"repo":1}}"#,
                stop - 120
            )
        })
        .collect();
    format!(
        r#"{{"tool":"pgbackrest","stanzas":[{{"name":"main","status":{{"code":0,"message":"ok","backup_running":false}},"archive":[{{"id":"15-1","min":"000000010000000000000001","max":"000000010000000000000009"}}],"backups":[{}],"backups_total":7}}]}}"#,
        backups.join(",")
    )
}

/// Milliseconds one `GET path` took, or `None` when it failed.
async fn api_ms(cp: &ControlPlane, path: &str) -> Option<f64> {
    let start = Instant::now();
    let r = cp.api(http::Method::GET, path, None).await?;
    (r.status == 200).then(|| start.elapsed().as_secs_f64() * 1000.0)
}

fn buffer_stats(agent: &Agent) -> proto::BufferStats {
    proto::BufferStats {
        epoch: format!("fleet-{}", agent.index),
        rows: 0,
        size_bytes: 4096,
        oldest_record_age_s: 0,
        utilization: 0.0001,
        delivery_failures: 0,
        dropped_total: Default::default(),
    }
}

/// One simulated agent: the control channel with heartbeats, and metrics deliveries, until
/// `stop`; reconnects with the agent's back-off.
async fn run_agent(fleet: Arc<Fleet>, agent: Agent, stop: Arc<AtomicBool>) {
    let world = World::real();
    let mut backoff = agent::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut metrics_seq = 0i64;
    let base = &fleet.urls[agent.index % fleet.urls.len()];
    let channel_url = url::Url::parse(&format!("{base}{}", proto::CHANNEL_PATH)).expect("url");
    let metrics_url = url::Url::parse(&format!("{base}{}", proto::METRICS_PATH)).expect("url");
    // The first heartbeat and delivery at a random phase, as a fleet started over time would be.
    let phase = Duration::from_millis(u64::from_le_bytes(world.random_bytes::<8>()) % 5000);
    let mut next_metrics = Instant::now() + METRICS_EVERY.mul_f64((agent.index % 15) as f64 / 15.0);
    // Its task runtime: the keys it holds, and the tasks that ended, to report.
    let mut keys = std::collections::BTreeSet::new();
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel::<proto::TaskSnapshot>();
    let mut event_seq = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let ws = world::ws_connect(
            &world,
            &channel_url,
            Some(&agent.credential),
            Duration::from_secs(30),
            1 << 20,
        )
        .await;
        let mut ws = match ws {
            Ok(ws) => ws,
            Err(_) => {
                let wait = backoff.next_delay(u64::from_le_bytes(world.random_bytes::<8>()));
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let hello = proto::AgentMessage::Hello {
            protocol_min: 1,
            protocol_max: 1,
            agent_version: "fleet-bench".into(),
            hostname: format!("fleet-{}", agent.index),
            labels: Default::default(),
        };
        if ws
            .send(Message::Text(
                serde_json::to_string(&hello).expect("json").into(),
            ))
            .await
            .is_err()
        {
            continue;
        }
        let mut welcomed = false;
        let mut seq = 0u64;
        let mut sent: std::collections::BTreeMap<u64, Instant> = Default::default();
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT);
        fleet.counters.connected.fetch_add(1, Ordering::Relaxed);
        let ended = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            tokio::select! {
                _ = beat.tick() => {
                    if !welcomed { continue; }
                    seq += 1;
                    let hb = proto::AgentMessage::Heartbeat { seq, sent_at_ms: now_ms(), buffer: Some(buffer_stats(&agent)) };
                    sent.insert(seq, Instant::now());
                    if ws.send(Message::Text(serde_json::to_string(&hb).expect("json").into())).await.is_err() {
                        break true;
                    }
                    if Instant::now() >= next_metrics {
                        next_metrics += METRICS_EVERY;
                        let fleet = Arc::clone(&fleet);
                        let body = batch(&agent, &mut metrics_seq);
                        let credential = agent.credential.clone();
                        let metrics_url = metrics_url.clone();
                        tokio::spawn(async move { deliver(&fleet, &metrics_url, &credential, body).await });
                    }
                }
                frame = ws.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        _ => break true,
                    };
                    match serde_json::from_str::<proto::ServerMessage>(&text) {
                        Ok(proto::ServerMessage::Welcome { .. }) => {
                            welcomed = true;
                            backoff.reset();
                            fleet.counters.welcomed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(proto::ServerMessage::HeartbeatAck { seq, .. }) => {
                            if let Some(at) = sent.remove(&seq)
                                && fleet.measuring.load(Ordering::Relaxed)
                            {
                                fleet.samples.lock().await.heartbeat_us.push(at.elapsed().as_micros() as u64);
                            }
                        }
                        Ok(proto::ServerMessage::Command { id, command }) => {
                            let ack = match command {
                                proto::Command::TaskAdd { task } => task_added(&fleet, &agent, id, &task, &mut keys, &ended_tx),
                                _ => proto::AgentMessage::CommandAck { id, ok: false, result: None, error: Some(proto::WireError::new(proto::ErrorCode::Unavailable, "fleet bench agent")) },
                            };
                            let _ = ws.send(Message::Text(serde_json::to_string(&ack).expect("json").into())).await;
                        }
                        _ => {}
                    }
                }
                Some(task) = ended_rx.recv(), if welcomed => {
                    event_seq += 1;
                    let events = proto::AgentMessage::TaskEvents { events: vec![proto::TaskEvent { seq: event_seq, task }] };
                    if ws.send(Message::Text(serde_json::to_string(&events).expect("json").into())).await.is_err() {
                        break true;
                    }
                    fleet.rollout.lock().expect("lock").reported.insert(agent.index, Instant::now());
                }
            }
        };
        fleet.counters.connected.fetch_sub(1, Ordering::Relaxed);
        if welcomed {
            fleet.counters.welcomed.fetch_sub(1, Ordering::Relaxed);
        }
        if ended {
            fleet.counters.disconnects.fetch_add(1, Ordering::Relaxed);
            let wait = backoff.next_delay(u64::from_le_bytes(world.random_bytes::<8>()));
            tokio::time::sleep(wait).await;
        }
    }
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_default()
}

/// A simulated agent takes task `task` (command `id`) as the real one does: refused when it
/// holds the key already, else queued at once and done 0.5 to 1.5 s later (sent on `ended`).
fn task_added(
    fleet: &Fleet,
    agent: &Agent,
    id: u64,
    task: &proto::TaskRequest,
    keys: &mut std::collections::BTreeSet<String>,
    ended: &tokio::sync::mpsc::UnboundedSender<proto::TaskSnapshot>,
) -> proto::AgentMessage {
    let key = task.key.clone().unwrap_or_default();
    if !keys.insert(key.clone()) {
        let error = proto::WireError::new(
            proto::ErrorCode::Refused,
            format!("a task with key {key:?} already exists"),
        );
        return proto::AgentMessage::CommandAck {
            id,
            ok: false,
            result: None,
            error: Some(error),
        };
    }
    let now = now_ms();
    {
        let mut seen = fleet.rollout.lock().expect("lock");
        seen.given.insert(agent.index, Instant::now());
        seen.given_ms.insert(agent.index, now);
    }
    let took = 500 + (u64::from_le_bytes(World::real().random_bytes::<8>()) % 1000) as i64;
    let snapshot = |status: &str, runs: Vec<proto::RunSnapshot>| proto::TaskSnapshot {
        id: proto::task_id(&key),
        kind: task.kind.clone(),
        status: status.into(),
        schedule: "once".into(),
        key: key.clone(),
        created_at: rfc3339(now),
        next_run_at: None,
        runs,
        window: None,
        critical: false,
    };
    let done = snapshot(
        "done",
        vec![proto::RunSnapshot {
            run_id: 1,
            started_at: Some(rfc3339(now)),
            finished_at: Some(rfc3339(now + took)),
            status: "done".into(),
            exit_code: Some(0),
            error: None,
            output_bytes: 0,
            output_dropped_bytes: 0,
        }],
    );
    let ended = ended.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(took as u64)).await;
        let _ = ended.send(done);
    });
    let queued = snapshot("queued", Vec::new());
    proto::AgentMessage::CommandAck {
        id,
        ok: true,
        result: Some(proto::CommandResult::Task { task: queued }),
        error: None,
    }
}

/// A rollout over the whole fleet (see the module's doc): its figures, printed.
async fn rollout_over(fleet: &Fleet, cp: &ControlPlane, label: &str, agents: usize) {
    const IN_FLIGHT: usize = 500;
    let (status, body) = cp
        .post(
            "/api/v1/rollouts",
            serde_json::json!({
                "name": "bench",
                "agents": ["fleet-*"],
                "waves": [1, "10%", "100%"],
                "max_in_flight": IN_FLIGHT,
                "max_errors": "1%",
                "task": {"kind": "command", "argv": ["true"]},
            }),
        )
        .await;
    if status != 201 {
        eprintln!("{label}: the rollout was refused ({status}): {body}");
        return;
    }
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = created["id"].as_str().expect("id").to_string();
    let waves: Vec<Vec<usize>> = created["plan"]["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| {
            w["hosts"]
                .as_array()
                .expect("hosts")
                .iter()
                .filter_map(|h| h["agent"].as_str()?.strip_prefix("fleet-")?.parse().ok())
                .collect()
        })
        .collect();
    let start = Instant::now();
    let path = format!("/api/v1/rollouts/{id}");
    let mut reads = Vec::new();
    let mut state = String::new();
    let mut last_started_ms = 0i64;
    while start.elapsed() < Duration::from_secs(900) {
        let t = Instant::now();
        if let Some(r) = cp.api(http::Method::GET, &path, None).await
            && r.status == 200
        {
            reads.push(t.elapsed().as_secs_f64() * 1000.0);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            state = v["state"].as_str().unwrap_or("").to_string();
            last_started_ms = v["wave_started_ms"].as_i64().unwrap_or(0);
            if state == "done" || state == "halted" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = start.elapsed();
    let seen = fleet.rollout.lock().expect("lock");
    let mut gaps = Vec::new();
    for pair in waves.windows(2) {
        let last = pair[0].iter().filter_map(|i| seen.reported.get(i)).max();
        let first = pair[1].iter().filter_map(|i| seen.given.get(i)).min();
        gaps.push(match (last, first) {
            (Some(l), Some(f)) => format!("{:.2} s", f.saturating_duration_since(*l).as_secs_f64()),
            _ => "never".into(),
        });
    }
    // The last wave started in the step whose gate passed: its first task after that step began.
    let last_first_ms = waves
        .last()
        .and_then(|w| w.iter().filter_map(|i| seen.given_ms.get(i)).min())
        .map(|ms| ms - last_started_ms);
    let given = seen.given.len();
    let mut us: Vec<u64> = reads.iter().map(|ms| (ms * 1000.0) as u64).collect();
    let p95 = percentile(&mut us, 0.95);
    let sizes: Vec<String> = waves.iter().map(|w| w.len().to_string()).collect();
    eprintln!(
        "{label} rollout over {agents} agents (waves {}, {IN_FLIGHT} at once, tasks of 0.5-1.5 s): {state} in {:.1} s, {given} hosts given the task ({:.0}/s)",
        sizes.join("/"),
        took.as_secs_f64(),
        given as f64 / took.as_secs_f64()
    );
    eprintln!(
        "{label} rollout: next wave's first task after the previous wave's last report (its collection, the gate and the dispatch): {}; the last wave's first task {} ms after the start of the step whose gate passed (target: next wave <= 2 s after its gate passes)",
        gaps.join(", "),
        last_first_ms.map_or("?".to_string(), |ms| ms.to_string())
    );
    eprintln!(
        "{label} rollout: GET /api/v1/rollouts/{{id}} p95 {p95:.1} ms over {} reads while it ran (target <= 300 ms)",
        reads.len()
    );
}

async fn deliver(fleet: &Fleet, url: &url::Url, credential: &str, body: Vec<u8>) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {credential}").parse().expect("header"),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    headers.insert(
        http::header::CONTENT_ENCODING,
        "gzip".parse().expect("header"),
    );
    let start = Instant::now();
    let r = world::http_request(
        &World::real(),
        http::Method::POST,
        url,
        headers,
        body.into(),
        Duration::from_secs(30),
        1 << 20,
    )
    .await;
    match r {
        Ok(r) if r.status == 200 => {
            fleet
                .counters
                .rows_acked
                .fetch_add(RECORDS_PER_BATCH as u64, Ordering::Relaxed);
            if fleet.measuring.load(Ordering::Relaxed) {
                fleet
                    .samples
                    .lock()
                    .await
                    .ingest_us
                    .push(start.elapsed().as_micros() as u64);
            }
        }
        Ok(r) if r.status == 429 => {
            fleet.counters.refused_429.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            fleet.counters.ingest_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The replica's CPU seconds (user + system), RSS in bytes and open files, from /proc.
fn proc_figures(pid: u32) -> (f64, u64, usize) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command: state is field 0 here, utime 11, stime 12 (clock ticks of 1/100 s).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (cpu, rss, fds)
}

/// Enroll `n` agents through the API with tokens made in bulk.
async fn enroll(cp: &ControlPlane, first: usize, n: usize) -> Vec<Agent> {
    let mut args = vec![
        "admin".to_string(),
        "enroll-token".into(),
        "--count".into(),
        n.to_string(),
        "--ttl".into(),
        "1h".into(),
        "--data-dir".into(),
        cp.data_dir().display().to_string(),
    ];
    args.extend(cp.storage_args.iter().cloned());
    let out = std::process::Command::new(harness::outpost_bin())
        .args(&args)
        .output()
        .expect("outpost admin enroll-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(tokens.len(), n);
    let url = url::Url::parse(&format!("{}{}", cp.url(), proto::ENROLL_PATH)).expect("url");
    futures_util::stream::iter(tokens.into_iter().enumerate())
        .map(|(i, token)| {
            let url = url.clone();
            async move {
                let body = serde_json::to_vec(&proto::EnrollRequest {
                    token,
                    name: format!("fleet-{:05}", first + i),
                    enrollment_id: format!("enr-fleet-{}", first + i),
                    labels: Default::default(),
                })
                .expect("json");
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    "application/json".parse().expect("header"),
                );
                let r = world::http_request(
                    &World::real(),
                    http::Method::POST,
                    &url,
                    headers,
                    body.into(),
                    Duration::from_secs(60),
                    1 << 16,
                )
                .await
                .expect("enroll");
                assert_eq!(
                    r.status,
                    200,
                    "enroll: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let e: proto::EnrollResponse = serde_json::from_slice(&r.body).expect("json");
                Agent {
                    index: first + i,
                    credential: e.credential,
                }
            }
        })
        .buffer_unordered(RAMP_PARALLEL)
        .collect::<Vec<_>>()
        .await
}

/// Agents the API shows offline.
async fn shown_offline(cp: &ControlPlane) -> usize {
    let Some(r) = cp.api(http::Method::GET, "/api/v1/agents", None).await else {
        return usize::MAX;
    };
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v.as_array().map_or(usize::MAX, |a| {
        a.iter().filter(|x| x["status"] != "online").count()
    })
}

async fn wait_welcomed(fleet: &Fleet, n: u64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while fleet.counters.welcomed.load(Ordering::Relaxed) < n {
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(start.elapsed())
}

struct Row {
    agents: usize,
    cpu_pct: f64,
    rss: u64,
    fds: usize,
    hb_p50: f64,
    hb_p99: f64,
    ingest_p50: f64,
    ingest_p99: f64,
    rows_s: f64,
    refused: u64,
    disconnects: u64,
    offline_shown: usize,
    /// p95 of `GET /api/v1/backups` and of `GET /api/v1/agents`, ms.
    backups_p95: f64,
    agents_p95: f64,
}

/// One replica through the ramp and the reconnect storm; returns the largest step's row.
async fn run_backend(label: &str, storage: &[&str], steps: &[usize]) -> Option<Row> {
    let mut cp = ControlPlane::start_with(
        storage,
        &[
            "--max-connections",
            "30000",
            "--max-connections-per-address",
            "30000",
        ],
        true,
    )
    .await;
    let fleet = Arc::new(Fleet {
        urls: vec![cp.url()],
        samples: Mutex::new(Samples::default()),
        rollout: Default::default(),
        counters: Counters::default(),
        measuring: AtomicBool::new(false),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut running = 0usize;
    let mut rows = Vec::new();
    for &target in steps {
        grow(&fleet, &cp, &stop, running, target, label).await;
        running = target;
        let pid = cp.proc.as_ref().expect("running").0.id();
        let (mut rows_of, _) = measure(&fleet, &cp, &[pid], target).await;
        let row = rows_of.remove(0);
        eprintln!(
            "{label} {target}: cpu {:.0}% rss {} MiB fds {} hb p50/p99 {:.1}/{:.1} ms ingest p50/p99 {:.1}/{:.1} ms {:.0} rows/s 429s {} disconnects {} offline shown {}",
            row.cpu_pct,
            row.rss >> 20,
            row.fds,
            row.hb_p50,
            row.hb_p99,
            row.ingest_p50,
            row.ingest_p99,
            row.rows_s,
            row.refused,
            row.disconnects,
            row.offline_shown
        );
        rows.push(row);
        if target == rollout_at() {
            rollout_over(&fleet, &cp, label, target).await;
        }
    }

    // Reconnect storm: kill -9 with the whole fleet connected, restart, time every welcome.
    let n = running as u64;
    cp.proc.as_ref().expect("running").signal("-KILL");
    let _ = cp
        .proc
        .as_mut()
        .expect("running")
        .wait_exit(Duration::from_secs(10))
        .await;
    while fleet.counters.welcomed.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = Instant::now();
    cp.launch();
    let pid = cp.proc.as_ref().expect("running").0.id();
    let mut peak_cpu: f64 = 0.0;
    let mut last = (Instant::now(), 0.0);
    let back = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (cpu, _, _) = proc_figures(pid);
        let now = Instant::now();
        peak_cpu = peak_cpu.max((cpu - last.1) / now.duration_since(last.0).as_secs_f64() * 100.0);
        last = (now, cpu);
        if fleet.counters.welcomed.load(Ordering::Relaxed) >= n {
            break Some(restarted.elapsed());
        }
        if restarted.elapsed() > Duration::from_secs(300) {
            break None;
        }
    };
    stop.store(true, Ordering::Relaxed);

    println!();
    println!(
        "fleet on {label} storage (one replica, release build; this machine: {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>7} {:>7} {:>9} {:>7} {:>17} {:>19} {:>9} {:>6} {:>6} {:>8}",
        "agents",
        "CPU",
        "RSS",
        "files",
        "heartbeat p50/p99",
        "ingest ack p50/p99",
        "rows/s",
        "429s",
        "drops",
        "offline"
    );
    for r in &rows {
        println!(
            "{:>7} {:>6.0}% {:>5} MiB {:>7} {:>17} {:>19} {:>9.0} {:>6} {:>6} {:>8}",
            r.agents,
            r.cpu_pct,
            r.rss >> 20,
            r.fds,
            format!("{:.1} / {:.1} ms", r.hb_p50, r.hb_p99),
            format!("{:.1} / {:.1} ms", r.ingest_p50, r.ingest_p99),
            r.rows_s,
            r.refused,
            r.disconnects,
            r.offline_shown
        );
    }
    for r in &rows {
        println!(
            "Backups page API at {:>6} agents: p95 {:>7.1} ms (target <= 300 ms); the fleet list in the same window: p95 {:.1} ms ({:.2}x of it)",
            r.agents,
            r.backups_p95,
            r.agents_p95,
            r.backups_p95 / r.agents_p95
        );
    }
    if let Some(r) = rows.last() {
        // The replica's density at the largest step: agents per vCPU it kept busy, agents per
        // GiB it held.
        let per_vcpu = r.agents as f64 / (r.cpu_pct / 100.0).max(1e-9);
        let per_gib = r.agents as f64 / (r.rss as f64 / (1u64 << 30) as f64);
        println!(
            "targets at 10,000: heartbeat p99 ≤ 500 ms, CPU ≤ 50 % (of one vCPU's worth per 5,000 agents), RSS ≤ 1.5 GiB, none shown offline"
        );
        println!(
            "density at {} agents: {per_vcpu:.0} agents per busy vCPU ({:.1}× Teleport's published 1,250), {per_gib:.0} agents per GiB of RSS ({:.1}× Elastic Fleet Server's 1,000)",
            r.agents,
            per_vcpu / 1250.0,
            per_gib / 1000.0
        );
    }
    match back {
        Some(d) => println!(
            "reconnect storm: {n} agents welcomed again {:.1} s after a kill -9 and restart (target ≤ 60 s), peak replica CPU {peak_cpu:.0}%",
            d.as_secs_f64()
        ),
        None => println!(
            "reconnect storm: only {} of {n} agents back within 300 s (target: all within 60 s), peak replica CPU {peak_cpu:.0}%",
            fleet.counters.welcomed.load(Ordering::Relaxed)
        ),
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    rows.pop()
}

/// The step at which a rollout over the fleet is measured (`OUTPOST_FLEET_ROLLOUT`).
fn rollout_at() -> usize {
    std::env::var("OUTPOST_FLEET_ROLLOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

/// Enroll agents `from..to`, start them, and wait until all are welcomed.
async fn grow(
    fleet: &Arc<Fleet>,
    cp: &ControlPlane,
    stop: &Arc<AtomicBool>,
    from: usize,
    to: usize,
    label: &str,
) {
    for agent in enroll(cp, from, to - from).await {
        let (fleet, stop) = (Arc::clone(fleet), Arc::clone(stop));
        tokio::spawn(run_agent(fleet, agent, stop));
    }
    if wait_welcomed(fleet, to as u64, Duration::from_secs(300))
        .await
        .is_none()
    {
        eprintln!(
            "{label}: only {} of {to} agents welcomed within 300 s",
            fleet.counters.welcomed.load(Ordering::Relaxed)
        );
    }
}

/// After one heartbeat interval of settling, measure a [`WINDOW`]: one row per replica
/// process in `pids` (its CPU, RSS and files; the latencies and counters are the fleet's),
/// and the fleet's heartbeat p99.
async fn measure(fleet: &Fleet, cp: &ControlPlane, pids: &[u32], agents: usize) -> (Vec<Row>, f64) {
    tokio::time::sleep(HEARTBEAT).await;
    fleet.samples.lock().await.heartbeat_us.clear();
    fleet.samples.lock().await.ingest_us.clear();
    let cpu0: Vec<f64> = pids.iter().map(|p| proc_figures(*p).0).collect();
    let (rows0, refused0, disc0) = (
        fleet.counters.rows_acked.load(Ordering::Relaxed),
        fleet.counters.refused_429.load(Ordering::Relaxed),
        fleet.counters.disconnects.load(Ordering::Relaxed),
    );
    fleet.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let mut offline_shown = 0;
    let (mut backups_us, mut agents_us) = (Vec::new(), Vec::new());
    while start.elapsed() < WINDOW {
        tokio::time::sleep(Duration::from_secs(5)).await;
        offline_shown = offline_shown.max(shown_offline(cp).await);
        // Failed calls count as the window's length: they are not hidden.
        let window_ms = WINDOW.as_secs_f64() * 1000.0;
        let ms = api_ms(cp, "/api/v1/backups").await.unwrap_or(window_ms);
        backups_us.push((ms * 1000.0) as u64);
        let ms = api_ms(cp, "/api/v1/agents").await.unwrap_or(window_ms);
        agents_us.push((ms * 1000.0) as u64);
    }
    let backups_p95 = percentile(&mut backups_us, 0.95);
    let agents_p95 = percentile(&mut agents_us, 0.95);
    fleet.measuring.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let mut samples = fleet.samples.lock().await;
    let (hb_p50, hb_p99) = (
        percentile(&mut samples.heartbeat_us, 0.5),
        percentile(&mut samples.heartbeat_us, 0.99),
    );
    let (ingest_p50, ingest_p99) = (
        percentile(&mut samples.ingest_us, 0.5),
        percentile(&mut samples.ingest_us, 0.99),
    );
    drop(samples);
    let rows = pids
        .iter()
        .zip(cpu0)
        .map(|(pid, cpu0)| {
            let (cpu1, rss, fds) = proc_figures(*pid);
            Row {
                agents,
                cpu_pct: (cpu1 - cpu0) / secs * 100.0,
                rss,
                fds,
                hb_p50,
                hb_p99,
                ingest_p50,
                ingest_p99,
                rows_s: (fleet.counters.rows_acked.load(Ordering::Relaxed) - rows0) as f64 / secs,
                refused: fleet.counters.refused_429.load(Ordering::Relaxed) - refused0,
                disconnects: fleet.counters.disconnects.load(Ordering::Relaxed) - disc0,
                offline_shown,
                backups_p95,
                agents_p95,
            }
        })
        .collect();
    (rows, hb_p99)
}

/// Two replicas sharing Postgres and Redis, `per_replica` agents on each, measured over one
/// window and printed next to `single` (one replica's largest step on the same storage).
async fn run_pair(storage: &[&str], redis_url: &str, per_replica: usize, single: Option<&Row>) {
    let serve = [
        "--max-connections",
        "30000",
        "--max-connections-per-address",
        "30000",
        "--redis-url",
        redis_url,
    ];
    let first = ControlPlane::start_with(storage, &serve, true).await;
    let second = ControlPlane::start_with(storage, &serve, false).await;
    let replicas = [&first, &second];
    let fleet = Arc::new(Fleet {
        urls: replicas.iter().map(|cp| cp.url()).collect(),
        samples: Mutex::new(Samples::default()),
        rollout: Default::default(),
        counters: Counters::default(),
        measuring: AtomicBool::new(false),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let total = per_replica * 2;
    let mut running = 0;
    // Ramped, so connections do not all arrive at once.
    for target in [total / 4, total / 2, total] {
        grow(&fleet, &first, &stop, running, target, "two replicas").await;
        running = target;
    }
    let pids: Vec<u32> = replicas
        .iter()
        .map(|cp| cp.proc.as_ref().expect("running").0.id())
        .collect();
    let (rows, hb99) = measure(&fleet, &first, &pids, total).await;
    stop.store(true, Ordering::Relaxed);
    println!();
    println!(
        "fleet on two replicas sharing Postgres and Redis ({per_replica} agents each, release build)"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "  replica {}: CPU {:.0}%, RSS {} MiB, {} open files",
            i + 1,
            r.cpu_pct,
            r.rss >> 20,
            r.fds
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "  {total} agents: heartbeat p50/p99 {:.1} / {:.1} ms, ingest ack p50/p99 {:.1} / {:.1} ms, {:.0} rows/s, 429s {}, disconnects {}, shown offline {}",
            r.hb_p50,
            r.hb_p99,
            r.ingest_p50,
            r.ingest_p99,
            r.rows_s,
            r.refused,
            r.disconnects,
            r.offline_shown
        );
    }
    if let Some(one) = single {
        println!(
            "  against one replica with {} agents (heartbeat p99 {:.1} ms): {:.2}× the agents at {:.2}× its heartbeat p99 (target: ≥ 1.8× at the same latency)",
            one.agents,
            one.hb_p99,
            total as f64 / one.agents as f64,
            hb99 / one.hb_p99.max(1e-9)
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::main]
async fn main() {
    let steps: Vec<usize> = std::env::var("OUTPOST_FLEET_STEPS")
        .unwrap_or_else(|_| "1000,2500,5000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let backends =
        std::env::var("OUTPOST_FLEET_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    for backend in backends.split(',') {
        match backend.trim() {
            "sqlite" => {
                run_backend("SQLite", &[], &steps).await;
            }
            "postgres" => {
                let pg = fixtures::Postgres::start()
                    .await
                    .expect("postgres fixture (Debian package postgresql)");
                let url = pg.create_database("fleet").expect("database");
                let single = run_backend("Postgres", &["--database-url", &url], &steps).await;
                // The generator holds every agent's socket in this one process, whose open
                // files are capped by the hard limit (20,000 here): 9,000 per replica fits.
                let per_replica: usize = std::env::var("OUTPOST_FLEET_PAIR")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(9_000);
                if per_replica > 0 {
                    let redis = fixtures::Redis::start()
                        .await
                        .expect("redis fixture (Debian package redis-server)");
                    let url = pg.create_database("fleet_pair").expect("database");
                    run_pair(
                        &["--database-url", &url],
                        &redis.url(),
                        per_replica,
                        single.as_ref(),
                    )
                    .await;
                }
            }
            other => panic!("OUTPOST_FLEET_BACKENDS: unknown backend {other:?} (sqlite, postgres)"),
        }
    }
}
