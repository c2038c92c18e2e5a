//! `just bench buffer`: the metrics buffer against its targets (README, Benchmarks), next to the SQLite engine's own
//! ceiling measured in the same run.
//!
//! * batched append (500-row batches of ~200-byte JSON) vs raw prepared inserts, same pragmas
//! * end-to-end drain, agent buffer → control-plane storage, into SQLite and into Postgres
//! * time to drain a 128 MiB backlog (SQLite storage)
//! * agent RSS and CPU while collecting from a real Postgres at a 10 s interval
#![allow(clippy::disallowed_methods)] // a benchmark measures wall time

use std::time::{Duration, Instant};

use agent::buffer::delivery::{DeliveryConfig, run_delivery};
use agent::buffer::{Buffer, Limits};
use control_plane::auth::{self, SecretKind};
use control_plane::settings::Settings;
use control_plane::state::AppState;
use control_plane::storage::{EnrollAttempt, Enrollment, Storage};
use tokio_util::sync::CancellationToken;
use world::World;

const BATCH: usize = 500;

fn row(i: usize) -> (String, String) {
    (
        "pg_stat_database".to_string(),
        format!(
            r#"{{"datname":"app","numbackends":{},"xact_commit":{},"xact_rollback":3,"blks_read":{},"blks_hit":{},"tup_returned":{},"deadlocks":0}}"#,
            i % 97,
            i * 7,
            i * 3,
            i * 11,
            i * 13
        ),
    )
}

fn append_rate(n: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) = Buffer::open(
        &dir.path().join("b.db"),
        Limits {
            bytes_max: 1 << 40,
            ..Limits::default()
        },
        "ep",
        0,
    )
    .expect("open");
    let batch: Vec<_> = (0..BATCH).map(row).collect();
    let start = Instant::now();
    for i in 0..n / BATCH {
        b.append(i as i64, &batch).expect("append");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn engine_rate(n: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("sync");
    conn.execute_batch(
        "CREATE TABLE r (seq INTEGER PRIMARY KEY, ts_ms INTEGER, kind TEXT, data TEXT)",
    )
    .expect("table");
    let batch: Vec<_> = (0..BATCH).map(row).collect();
    let start = Instant::now();
    let mut seq = 0i64;
    for _ in 0..n / BATCH {
        let tx = conn.transaction().expect("tx");
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO r VALUES (?1, ?2, ?3, ?4)")
                .expect("stmt");
            for (k, d) in &batch {
                seq += 1;
                stmt.execute(rusqlite::params![seq, 0, k, d])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Fill a buffer with `n` rows, serve a control plane on `storage`, deliver until empty.
/// Returns (rows/s, seconds, buffer bytes at the start).
async fn drain(storage: Storage, n: usize) -> (f64, f64, u64) {
    let world = World::real();
    storage.migrate().await.expect("migrate");
    let token = auth::new_secret(&world, SecretKind::EnrollToken);
    let now = world.now_unix_ms();
    storage
        .create_enroll_token(&auth::secret_hash(&token), now, now + 60_000)
        .await
        .expect("token");
    let credential = auth::new_secret(&world, SecretKind::AgentCredential);
    let enrolled = storage
        .enroll_agent(EnrollAttempt {
            token_hash: auth::secret_hash(&token),
            enrollment_id: "bench".into(),
            name: "bench".into(),
            new_agent_id: auth::new_id(&world, "agt"),
            credential_hash: auth::secret_hash(&credential),
            now_ms: now,
        })
        .await
        .expect("enroll");
    assert!(matches!(enrolled, Enrollment::Enrolled { .. }));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) = Buffer::open(
        &dir.path().join("b.db"),
        Limits {
            bytes_max: 1 << 40,
            age_max_ms: i64::MAX / 2,
            quarantined_max: 3,
        },
        "ep",
        0,
    )
    .expect("open");
    let batch: Vec<_> = (0..BATCH).map(row).collect();
    for _ in 0..n / BATCH {
        b.append(now, &batch).expect("append");
    }
    let bytes = b.size_bytes();
    let buffer = agent::buffer::SharedBuffer::new(b);
    let listener = world.net().bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let state = AppState::new(
        world.clone(),
        storage,
        Settings::default(),
        shutdown.clone(),
    );
    let server = tokio::spawn(control_plane::server::run(
        state,
        listener,
        std::future::pending(),
    ));
    let config = DeliveryConfig {
        url: url::Url::parse(&format!("http://{addr}{}", proto::METRICS_PATH)).expect("url"),
        credential,
        batch_rows_max: 5_000,
        idle_poll: Duration::from_millis(5),
        request_timeout: Duration::from_secs(60),
    };
    let stop = CancellationToken::new();
    let delivery = tokio::spawn(run_delivery(
        world.clone(),
        buffer.clone(),
        config,
        stop.clone(),
    ));
    let start = Instant::now();
    // Polled with a primary-key probe: `stats` counts every row, which at 5 ms intervals
    // would cost more than the drain it watches (and hold the buffer's lock meanwhile).
    loop {
        let empty = buffer
            .with(&world, |b| b.oldest(1))
            .await
            .expect("oldest")
            .is_empty();
        if empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = delivery.await;
    shutdown.cancel();
    let _ = server.await;
    (n as f64 / secs, secs, bytes)
}

fn rss_and_cpu(pid: u32, wall_s: f64) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (rss_kib, ticks as f64 / 100.0 / wall_s * 100.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `OUTPOST_BUFFER_ONLY=drain` (SQLite storage) or `drain-postgres`: one end-to-end drain
    // of 400,000 rows, for a profiler.
    let only = std::env::var("OUTPOST_BUFFER_ONLY").unwrap_or_default();
    if only.starts_with("drain") {
        let world = World::real();
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = (only == "drain-postgres").then(|| {
            let pg = rt
                .block_on(fixtures::Postgres::start())
                .expect("postgres fixture (package postgresql)");
            let url = pg.create_database("bench").expect("database");
            (pg, url)
        });
        let storage = rt
            .block_on(control_plane::server::open_storage(
                &world,
                dir.path(),
                pg.as_ref().map(|(_, url)| url.as_str()),
            ))
            .expect("storage");
        let (rate, _, _) = rt.block_on(drain(storage, 400_000));
        println!("end-to-end drain ({only}): {rate:.0} rows/s");
        return;
    }
    let append = append_rate(200_000);
    let engine = engine_rate(200_000);
    let world = World::real();

    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = rt
        .block_on(control_plane::server::open_storage(
            &world,
            dir.path(),
            None,
        ))
        .expect("sqlite storage");
    let (drain_sqlite, _, _) = rt.block_on(drain(sqlite, 200_000));
    let pg = rt
        .block_on(fixtures::Postgres::start())
        .expect("postgres fixture (package postgresql)");
    let pg_url = pg.create_database("bench").expect("database");
    let postgres = rt
        .block_on(control_plane::server::open_storage(
            &world,
            dir.path(),
            Some(&pg_url),
        ))
        .expect("postgres storage");
    let (drain_pg, _, _) = rt.block_on(drain(postgres, 200_000));
    let dir2 = tempfile::tempdir().expect("tempdir");
    let sqlite2 = rt
        .block_on(control_plane::server::open_storage(
            &world,
            dir2.path(),
            None,
        ))
        .expect("sqlite storage");
    // ~128 MiB of buffer at ~250 bytes a row.
    let (_, backlog_s, backlog_bytes) = rt.block_on(drain(sqlite2, 520_000));

    // The real agent collecting every 10 s for 30 s.
    let adir = tempfile::tempdir().expect("tempdir");
    let config = adir.path().join("agent.toml");
    std::fs::write(&config, "[metrics]\ninterval = \"10s\"\n").expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(["run", "--data-dir"])
        .arg(adir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--postgres", &pg.url()])
        .env("OUTPOST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    std::thread::sleep(Duration::from_secs(30));
    let (rss_kib, cpu_pct) = rss_and_cpu(child.id(), 30.0);
    let _ = child.kill();
    let _ = child.wait();

    println!(
        "buffer benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("{:<52} {:>14} {:>22}", "workload", "outpost", "target");
    println!(
        "{:<52} {:>12.0}/s {:>22}",
        "batched append (500-row batches)", append, ">= 600,000/s"
    );
    println!(
        "{:<52} {:>12.0}/s {:>22}",
        "  SQLite engine, same rows and pragmas", engine, "(ceiling)"
    );
    println!(
        "{:<52} {:>12.0}/s {:>22}",
        "end-to-end drain into SQLite storage", drain_sqlite, ">= 300,000/s"
    );
    println!(
        "{:<52} {:>12.0}/s {:>22}",
        "end-to-end drain into Postgres storage", drain_pg, ">= 200,000/s"
    );
    println!(
        "{:<52} {:>12.1} s {:>22}",
        format!(
            "drain a {} MiB backlog (SQLite storage)",
            backlog_bytes >> 20
        ),
        backlog_s,
        "<= 20 s for 128 MiB"
    );
    println!(
        "{:<52} {:>10} KiB {:>22}",
        "agent RSS, collecting every 10 s", rss_kib, "-"
    );
    println!(
        "{:<52} {:>13.2}% {:>22}",
        "agent CPU, collecting every 10 s (30 s average)", cpu_pct, "-"
    );
}
