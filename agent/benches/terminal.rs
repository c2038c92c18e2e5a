//! `just bench terminal`: the browser terminal through the whole chain (WebSocket client →
//! control plane → Redis Streams → control plane → reverse WebSocket → agent → PTY → psql and
//! back), next to the bare-PTY ceiling and WeTTY measured in the same run.
//!
//! * output throughput: `seq 1 8000000` and 100 MB of 4000-byte lines, run from psql (`\!`)
//! * keystroke echo p50/p99: idle, and while `yes` floods the terminal
//! * replay: a new browser view from offset 0 reading the retained 4 MiB scrollback
//! * recording overhead: the throughput runs again with `--recording off`, and how much of
//!   the recorded run the recording holds
#![allow(clippy::disallowed_methods)] // a benchmark measures wall time

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::io::Read;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use world::{World, WsStream};

use harness::{ControlPlane, Proc, agent_bin};

const SEQ: &str = "seq 1 8000000";
const LONG: &str = "yes \"$(head -c 4000 /dev/zero | tr '\\0' x)\" | head -c 100000000";
/// The marker a command prints when it is done; the echoed command line holds `$((1+1))`
/// instead, so only the output matches.
const DONE: &[u8] = b"BENCH_2_DONE";
const DONE_CMD: &str = "echo BENCH_$((1+1))_DONE";

/// The control plane's log, shown when a socket closes under the benchmark.
static CP_LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The browser socket ended under the benchmark: fail with where, and the control plane's
/// last log lines.
fn socket_closed(offset: u64) -> ! {
    let log = CP_LOG
        .get()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let tail: String = log
        .chars()
        .rev()
        .take(4000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    panic!("the socket closed (at offset {offset}); control plane log ends:\n{tail}")
}

struct Client {
    ws: WsStream,
    offset: u64,
    skipped: u64,
    /// Bytes of output received (not counting announced gaps).
    received: u64,
    tail: Vec<u8>,
}

impl Client {
    async fn open(cp: &ControlPlane, session: &str, offset: u64) -> Client {
        let url = url::Url::parse(&format!(
            "{}/api/v1/terminal/sessions/{session}/ws?offset={offset}",
            cp.url()
        ))
        .expect("url");
        let ws = world::ws_connect(
            &World::real(),
            &url,
            Some(&cp.token),
            Duration::from_secs(10),
            1 << 22,
        )
        .await
        .expect("browser WebSocket");
        Client {
            ws,
            offset,
            skipped: 0,
            received: 0,
            tail: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .expect("send");
    }

    /// Read until `needle` shows up in output not seen before this call.
    async fn until(&mut self, needle: &[u8]) {
        self.tail.clear();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{:?} within 120 s (at offset {}, last bytes {:?})",
                        String::from_utf8_lossy(needle),
                        self.offset,
                        String::from_utf8_lossy(&self.tail)
                    )
                })
                .unwrap_or_else(|| socket_closed(self.offset))
                .expect("frame");
            match frame {
                Message::Binary(data) => {
                    self.offset += data.len() as u64;
                    self.received += data.len() as u64;
                    let keep = self.tail.len().min(needle.len());
                    let start = self.tail.len() - keep;
                    self.tail.drain(..start);
                    self.tail.extend_from_slice(&data);
                    if self.tail.windows(needle.len()).any(|w| w == needle) {
                        return;
                    }
                }
                Message::Text(text) => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
                    match v["type"].as_str() {
                        Some("offset") => self.offset = v["offset"].as_u64().expect("offset"),
                        Some("skipped") => {
                            let (from, to) = (
                                v["from"].as_u64().unwrap_or(0),
                                v["to"].as_u64().unwrap_or(0),
                            );
                            self.skipped += to - from;
                            self.offset = to;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Read until the view reaches `end`.
    async fn reach(&mut self, end: u64) {
        while self.offset < end {
            let frame = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("replay within 60 s")
                .unwrap_or_else(|| socket_closed(self.offset))
                .expect("frame");
            match frame {
                Message::Binary(data) => {
                    self.offset += data.len() as u64;
                    self.tail.truncate(0);
                    self.received += data.len() as u64;
                }
                Message::Text(text) => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
                    match v["type"].as_str() {
                        Some("offset") => self.offset = v["offset"].as_u64().expect("offset"),
                        Some("skipped") => self.offset = v["to"].as_u64().unwrap_or(self.offset),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `command` in a bare PTY, read to the end: the ceiling of any terminal relay.
fn bare_pty(command: &str) -> (u64, f64) {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};
    let pair = native_pty_system()
        .openpty(PtySize {
            rows: 40,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("openpty");
    let mut cmd = CommandBuilder::new("sh");
    cmd.args(["-c", command]);
    let start = Instant::now();
    let mut child = pair.slave.spawn_command(cmd).expect("spawn");
    drop(pair.slave);
    let mut reader = pair.master.try_clone_reader().expect("reader");
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let _ = child.wait();
    (total, start.elapsed().as_secs_f64())
}

/// WeTTY, if `just bench terminal` could install it: the same commands through its browser
/// protocol (socket.io), timed by `wetty.mjs`. `None` when it is not available.
fn wetty(command: &str) -> Option<(u64, f64)> {
    let dir = std::env::var("OUTPOST_WETTY_DIR").ok()?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wetty.mjs");
    let out = std::process::Command::new("node")
        .arg(script)
        .arg(command)
        .env("NODE_PATH", format!("{dir}/node_modules"))
        .env("WETTY_DIR", &dir)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "wetty: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let bytes = parts.next()?.parse().ok()?;
    let secs = parts.next()?.parse().ok()?;
    Some((bytes, secs))
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{:.1} MB/s", bytes as f64 / secs / 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = fixtures::Postgres::start()
        .await
        .expect("postgres fixture (Debian package postgresql)");
    let redis = fixtures::Redis::start()
        .await
        .expect("redis fixture (Debian package redis-server)");
    let cp = ControlPlane::start_with(&[], &["--redis-url", &redis.url()], true).await;
    let _ = CP_LOG.set(cp.dir.path().join("cp.log"));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("agent");
    let d = data.display().to_string();
    cp.enroll_agent("bench", &d);
    // The benchmark runs as root (as CI does): psql may then run as root only when the
    // config says so.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[terminal]\nrun_as = \"root\"\n").expect("write agent config");
    let _agent = Proc::spawn(
        &agent_bin(),
        &[
            "run",
            "--data-dir",
            &d,
            "--postgres",
            &pg.url(),
            "--config",
            config.to_str().expect("utf8"),
        ],
        &dir.path().join("agent.log"),
    );
    cp.wait_status("bench", "online", Duration::from_secs(30))
        .await;
    let agents = cp
        .api(http::Method::GET, "/api/v1/agents", None)
        .await
        .expect("agents");
    let v: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let agent_id = v[0]["id"].as_str().expect("id").to_string();
    let (session, mut term) = open_session(&cp, &agent_id).await;
    // Throughput through the whole chain (recording on, the default).
    let chain = throughput(&mut term, "recorded").await;

    let idle = echo_idle(&mut term).await;

    // Keystroke echo while `yes` floods: the tty echoes typed characters even though `yes`
    // never reads them.
    term.send(b"\\! yes\r").await;
    term.until(b"y\r\ny\r\n").await;
    let mut flood = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        term.send(b"Z").await;
        term.until(b"Z").await;
        flood.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    flood.sort_by(f64::total_cmp);
    // Ctrl+C ends `yes`; a second one clears the Zs psql then reads as a half-typed line.
    term.send(b"\x03").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    term.send(b"\x03").await;
    // psql (readline) is still handling that interrupt for a moment; a line typed into that
    // moment loses its first byte, as it would from a fast typist.
    tokio::time::sleep(Duration::from_millis(300)).await;
    term.send(format!("\\! {DONE_CMD}\r").as_bytes()).await;
    term.until(DONE).await;

    // Replay of the retained scrollback (the stream keeps the newest 4 MiB).
    let end = term.offset;
    let start = Instant::now();
    let mut replay = Client::open(&cp, &session, 0).await;
    replay.reach(end).await;
    let replay_secs = start.elapsed().as_secs_f64();
    let replayed = replay.received;

    // What the recording holds of it all, once the session is closed (its last chunk stored).
    let recorded_end = term.offset;
    term.send(b"\\q\r").await;
    let mut recording = serde_json::Value::Null;
    for _ in 0..100 {
        let r = cp
            .api(
                http::Method::GET,
                &format!("/api/v1/terminal/recordings/{session}"),
                None,
            )
            .await
            .expect("recording");
        recording = serde_json::from_slice(&r.body).unwrap_or_default();
        if recording["ended_ms"].is_i64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((term, replay));

    // The same runs without recording: the control plane restarted with `--recording off`.
    let mut cp = cp;
    drop(cp.proc.take());
    cp.serve_args
        .extend(["--recording".to_string(), "off".to_string()]);
    cp.launch();
    cp.wait_healthy().await;
    cp.wait_status("bench", "online", Duration::from_secs(60))
        .await;
    let (_, mut unrecorded_term) = open_session(&cp, &agent_id).await;
    let unrecorded = throughput(&mut unrecorded_term, "not recorded").await;
    let unrecorded_idle = echo_idle(&mut unrecorded_term).await;

    let bare: Vec<(u64, f64)> = [SEQ, LONG].iter().map(|c| bare_pty(c)).collect();
    let wetty_rows: Vec<Option<(u64, f64)>> = [SEQ, LONG].iter().map(|c| wetty(c)).collect();

    println!();
    println!(
        "{:<44} {:>28} {:>14} {:>12} {:>24}",
        "workload", "outpost chain", "bare PTY", "WeTTY", "target"
    );
    // Targets are ratios to the peers measured in this run (the machine is shared).
    let targets = ["≥ 1.1× WeTTY", "≥ 0.9× the bare PTY"];
    let per_s = |bytes: u64, secs: f64| bytes as f64 / secs.max(1e-9);
    for (i, (name, produced, delivered, secs)) in chain.iter().enumerate() {
        let w = wetty_rows[i].map_or("n/a".to_string(), |(b, s)| rate(b, s));
        let ours = per_s(*produced, *secs);
        let ratios = format!(
            "{:.2}× bare, {}",
            ours / per_s(bare[i].0, bare[i].1),
            wetty_rows[i].map_or("WeTTY n/a".to_string(), |(b, s)| format!(
                "{:.2}× WeTTY",
                ours / per_s(b, s)
            ))
        );
        println!(
            "{:<44} {:>28} {:>14} {:>12} {:>24}   {ratios}",
            name,
            format!("{} ({})", rate(*produced, *secs), rate(*delivered, *secs)),
            rate(bare[i].0, bare[i].1),
            w,
            targets[i]
        );
    }
    println!(
        "  (produced through the chain, and in parentheses delivered to the reader; the rest was announced as skipped)"
    );
    println!(
        "{:<44} {:>16} {:>14} {:>12} {:>24}",
        "keystroke echo, idle: p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            percentile(&idle, 0.5),
            percentile(&idle, 0.99)
        ),
        "",
        "",
        "≤ 1.5 / ≤ 3 ms"
    );
    println!(
        "{:<44} {:>16} {:>14} {:>12} {:>24}",
        "keystroke echo under a `yes` flood: p50 / p99",
        format!(
            "{:.1} / {:.1} ms",
            percentile(&flood, 0.5),
            percentile(&flood, 0.99)
        ),
        "",
        "",
        "p99 < 30 ms"
    );
    println!(
        "{:<44} {:>16}",
        format!(
            "replay of {:.1} MiB from offset 0",
            replayed as f64 / 1048576.0
        ),
        format!("{:.0} ms", replay_secs * 1000.0)
    );
    println!();
    println!(
        "{:<44} {:>16} {:>16} {:>10}",
        "recording overhead", "recorded", "not recorded", "ratio"
    );
    for (i, (name, produced, _, secs)) in chain.iter().enumerate() {
        let (_, off_produced, _, off_secs) = unrecorded[i];
        let on = per_s(*produced, *secs);
        let off = per_s(off_produced, off_secs);
        println!(
            "{:<44} {:>16} {:>16} {:>9.2}×",
            name,
            rate(*produced, *secs),
            rate(off_produced, off_secs),
            on / off
        );
    }
    println!(
        "{:<44} {:>16} {:>16}",
        "keystroke echo, idle: p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            percentile(&idle, 0.5),
            percentile(&idle, 0.99)
        ),
        format!(
            "{:.2} / {:.2} ms",
            percentile(&unrecorded_idle, 0.5),
            percentile(&unrecorded_idle, 0.99)
        ),
    );
    println!(
        "{:<44} {:>16}",
        "recording of the recorded session",
        format!(
            "{} of {} bytes in {} chunks{}",
            recording["bytes"],
            recorded_end,
            recording["chunks"],
            recording["incomplete"]
                .as_str()
                .map_or(String::new(), |why| format!(" (incomplete: {why})"))
        )
    );
}

/// Keystroke echo, idle: a character and its erase, 200 times (after the prompt is back);
/// milliseconds, sorted.
async fn echo_idle(term: &mut Client) -> Vec<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        term.send(b"a").await;
        term.until(b"a").await;
        idle.push(start.elapsed().as_secs_f64() * 1000.0);
        term.send(b"\x7f").await;
        term.until(b"\x08").await;
    }
    idle.sort_by(f64::total_cmp);
    idle
}

/// A new session on the agent, at psql's prompt with the pager off.
/// (After a restart the agent's old row may say online for a while before it has
/// reconnected: creating is retried for a minute.)
async fn open_session(cp: &ControlPlane, agent_id: &str) -> (String, Client) {
    let mut v = serde_json::Value::Null;
    for _ in 0..60 {
        let r = cp
            .api(
                http::Method::POST,
                "/api/v1/terminal/sessions",
                Some(serde_json::json!({"agent_id": agent_id})),
            )
            .await
            .expect("create");
        v = serde_json::from_slice(&r.body).expect("json");
        if r.status == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let session = v["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {v}"))
        .to_string();
    let mut term = Client::open(cp, &session, 0).await;
    term.until(b"=#").await;
    term.send(b"\\pset pager off\r").await;
    term.until(b"Pager usage is off.").await;
    (session, term)
}

/// Both output workloads through the whole chain: `(name, produced, delivered, seconds)`.
async fn throughput(term: &mut Client, label: &str) -> Vec<(&'static str, u64, u64, f64)> {
    let mut out = Vec::new();
    for (name, command) in [("seq 1 8000000", SEQ), ("100 MB of 4000-byte lines", LONG)] {
        let (before, received_before, skipped_before) = (term.offset, term.received, term.skipped);
        let start = Instant::now();
        term.send(format!("\\! {command}; {DONE_CMD}\r").as_bytes())
            .await;
        term.until(DONE).await;
        let secs = start.elapsed().as_secs_f64();
        let produced = term.offset - before;
        let delivered = term.received - received_before;
        let skipped = term.skipped - skipped_before;
        eprintln!(
            "{name} ({label}): {produced} bytes produced, {delivered} delivered, {skipped} skipped in {secs:.2} s"
        );
        out.push((name, produced, delivered, secs));
    }
    out
}
