//! The `terminal` scenario: the real agent terminal sessions, the real control-plane browser
//! and agent handlers and the real in-process stream store, with a simulated PTY and a
//! simulated browser, under agent link flaps (inside and beyond the reconnect window),
//! half-open links, stream store outages, vanishing browsers and control-plane bounces.
//!
//! The simulated psql answers each `g<N>\r` line with N bytes whose values are a function of
//! their byte offset, so the browser can check every byte it is shown. Checked (the terminal
//! invariant in ARCHITECTURE.md): every byte the browser receives is the byte at that offset (in order, no
//! corruption); every gap is announced by a `skipped` frame that starts exactly where the
//! data stopped; the browser never runs ahead of what the PTY produced; the PTY never waits
//! on a consumer (its output is pushed synchronously); and after the last fault heals the
//! browser holds a live session whose output is delivered through its last byte.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent::link::{LinkConfig, LinkStatus, run_link};
use agent::terminal::{
    Output, PtyChild, PtyHandle, PtyInput, PtySize, PtySpec, PtySystem, SESSION_ENV,
    TerminalConfig, TerminalLink, Terminals,
};
use control_plane::settings::Settings;
use control_plane::state::AppState;
use control_plane::terminal::streams::MemoryStreams;
use control_plane::terminal::{Streams, Terminal, TerminalSettings};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use world::World;

use crate::harness::{self, CP_PORT, Driver, LinkFaults, Prepare, host_world, new_sim};
use crate::scenario::{Fault, Schedule, secs};
use crate::trace;

const RECONNECT_WINDOW: Duration = Duration::from_secs(20);
/// Output kept per session in the store: small, so slow browsers fall behind it.
const STREAM_BYTES_MAX: u64 = 256 * 1024;
/// Output kept by the agent for a link that is down.
const AGENT_RING_BYTES: usize = 128 * 1024;
/// A browser that hears nothing (not even a ping) for this long reconnects.
const BROWSER_DEAD_AFTER: Duration = Duration::from_secs(25);

/// The byte at `offset` of every simulated psql's output.
fn byte_at(offset: u64) -> u8 {
    b'!' + ((offset ^ (offset >> 7)) % 90) as u8
}

#[derive(Debug, Default)]
struct SessionLedger {
    /// Bytes the PTY produced.
    produced: u64,
    /// Where the browser is: bytes shown plus announced gaps.
    browser_offset: u64,
    shown: u64,
    skipped: u64,
    closed: Option<String>,
}

#[derive(Debug, Default)]
struct Ledger {
    sessions: BTreeMap<String, SessionLedger>,
    /// The session the browser uses now.
    current: Option<String>,
    /// Commands the browser typed (each has a unique number).
    typed: u64,
    /// Commands a simulated psql ran, by number: none may run twice.
    ran: std::collections::BTreeSet<u64>,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> MutexGuard<'_, Ledger> {
    match ledger.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One fault at a time for 150 s, then a quiet minute.
pub fn schedule(rng: &mut StdRng) -> Schedule {
    let mut events = Vec::new();
    let mut t = secs(rng, 5, 15);
    while t < Duration::from_secs(150) {
        let length = match rng.random_range(0..2) {
            0 => secs(rng, 1, 15),  // inside the reconnect window
            _ => secs(rng, 25, 40), // beyond it
        };
        match rng.random_range(0..6) {
            0 => {
                events.push((t, Fault::Partition { agent: 0 }));
                events.push((t + length, Fault::Repair { agent: 0 }));
            }
            1 => {
                events.push((t, Fault::Hold { agent: 0 }));
                events.push((t + length, Fault::Release { agent: 0 }));
            }
            2 => {
                events.push((t, Fault::StoreOutage));
                events.push((t + length / 2, Fault::StoreBack));
            }
            3 => {
                events.push((t, Fault::PartitionBrowser));
                events.push((t + length, Fault::RepairBrowser));
            }
            4 => events.push((t, Fault::BounceCp)),
            _ => events.push((t, Fault::BounceAgent { agent: 0 })),
        }
        t += length + secs(rng, 2, 15);
    }
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default();
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(90),
    }
}

/// A psql stand-in: `g<N>.<K>\r` (command number K) produces N bytes at once, `q\r` exits.
struct SimPty {
    ledger: Shared,
}

struct SimChild {
    output: Arc<Output>,
}

impl PtyChild for SimChild {
    fn interrupt(&mut self) {}

    fn terminate(&mut self) {
        self.output.close("terminated".into());
    }
}

impl PtySystem for SimPty {
    fn spawn(
        &self,
        _world: &World,
        spec: &PtySpec,
        _size: PtySize,
        output: Arc<Output>,
    ) -> std::io::Result<PtyHandle> {
        let session = spec
            .env
            .iter()
            .find(|(k, _)| k == SESSION_ENV)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        trace::record(format!("pty spawned for {session}"));
        let (input, mut rx) = mpsc::channel::<PtyInput>(64);
        let ledger = Arc::clone(&self.ledger);
        let out = Arc::clone(&output);
        tokio::spawn(async move {
            let mut line = Vec::new();
            while let Some(event) = rx.recv().await {
                let PtyInput::Data(data) = event else {
                    continue;
                };
                for b in data {
                    if b != b'\r' {
                        line.push(b);
                        continue;
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    line.clear();
                    if text == "q" {
                        out.close("psql exited".into());
                        return;
                    }
                    // `g<N>.<K>`: N bytes, for command number K.
                    let Some((n, k)) = text
                        .strip_prefix('g')
                        .and_then(|c| c.split_once('.'))
                        .and_then(|(n, k)| Some((n.parse::<u64>().ok()?, k.parse::<u64>().ok()?)))
                    else {
                        continue;
                    };
                    {
                        let mut l = lock(&ledger);
                        if !l.ran.insert(k) {
                            l.violations.push(format!(
                                "command {k} reached psql twice (input delivered more than once)"
                            ));
                        }
                    }
                    // The whole burst is pushed without waiting: the ring never blocks.
                    let start = out.with(|r| r.end());
                    let mut at = start;
                    while at < start + n {
                        let len = (start + n - at).min(4096);
                        let chunk: Vec<u8> = (at..at + len).map(byte_at).collect();
                        out.push(&chunk);
                        at += len;
                    }
                    if let Some(s) = lock(&ledger).sessions.get_mut(&session) {
                        s.produced = at;
                    }
                }
            }
        });
        Ok(PtyHandle {
            input,
            child: Box::new(SimChild { output }),
        })
    }
}

pub fn simulate_terminal(seed: u64, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-sim-terminal-")
        .tempdir()?;
    let mut secrets = harness::prepare(
        dir.path(),
        seed,
        &[Prepare::EnrolledAgent, Prepare::OperatorToken],
    )?;
    let (token, credential) = (secrets.remove(1), secrets.remove(0));
    let ledger: Shared = Arc::default();
    // The store outlives control-plane restarts, as Redis would.
    // Its link key, like the replicas' shared key, outlives restarts; fixed for replay.
    let store = Arc::new(MemoryStreams::new([7; 32]));
    let mut sim = new_sim(seed, plan);
    {
        let world = host_world(seed, "cp");
        let data_dir = dir.path().join("cp");
        let store = Arc::clone(&store);
        sim.host("cp", move || {
            let (world, data_dir, store) = (world.clone(), data_dir.clone(), Arc::clone(&store));
            async move {
                let storage = control_plane::server::open_storage(&world, &data_dir, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let listener = world.net().bind(&format!("0.0.0.0:{CP_PORT}")).await?;
                let settings = TerminalSettings {
                    stream_bytes_max: STREAM_BYTES_MAX,
                    reconnect_grace: RECONNECT_WINDOW + Duration::from_secs(15),
                    ..TerminalSettings::default()
                };
                let state = AppState::new(
                    world,
                    storage,
                    Settings::default(),
                    CancellationToken::new(),
                )
                .with_terminal(Terminal::new(Streams::Memory(store), settings));
                control_plane::server::run(state, listener, std::future::pending())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        });
    }
    {
        let world = host_world(seed, "agent1");
        let ledger = Arc::clone(&ledger);
        let control_plane = url::Url::parse(&format!("http://cp:{CP_PORT}"))?;
        sim.host("agent1", move || {
            let (world, ledger, control_plane, credential) = (
                world.clone(),
                Arc::clone(&ledger),
                control_plane.clone(),
                credential.clone(),
            );
            async move {
                let shutdown = CancellationToken::new();
                let terminals = Terminals::new(
                    world.clone(),
                    TerminalConfig {
                        enabled: true,
                        psql: "psql".into(),
                        database: None,
                        run_as: agent::run_as::RunAs::Agent,
                        sessions_max: 10,
                        reconnect_window: RECONNECT_WINDOW,
                        idle_timeout: Duration::from_secs(3600),
                        output_bytes_max: AGENT_RING_BYTES,
                        record_input: false,
                    },
                    TerminalLink {
                        control_plane: control_plane.clone(),
                        credential: credential.clone(),
                    },
                    Arc::new(SimPty { ledger }),
                    shutdown.clone(),
                );
                let mut link = LinkConfig::new(control_plane, credential, "agent1".into());
                link.connect_timeout = Duration::from_secs(3);
                link.terminals = Some(terminals);
                let (status, _) = watch::channel(LinkStatus::Connecting { attempt: 0 });
                run_link(world, link, status, shutdown).await;
                Ok(())
            }
        });
    }
    {
        let world = host_world(seed, "browser");
        let ledger = Arc::clone(&ledger);
        // The browser stops typing well before the end, so the liveness check can require
        // that everything produced reaches it.
        let typing_for = plan.quiet_from + Duration::from_secs(20);
        sim.client("browser", async move {
            browser(world, token, ledger, typing_for).await;
            Ok(())
        });
    }

    let mut driver = TerminalDriver {
        store: Arc::clone(&store),
        ledger: ledger.clone(),
        links: LinkFaults::default(),
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    drop(sim);
    final_check(&lock(&ledger))?;
    audit_check(dir.path(), seed, &lock(&ledger))
}

/// Agent link flaps, store outages, browser partitions, control-plane and agent bounces.
struct TerminalDriver {
    store: Arc<MemoryStreams>,
    ledger: Shared,
    links: LinkFaults,
}

impl<'a> Driver<'a> for TerminalDriver {
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        _now: Duration,
    ) -> anyhow::Result<()> {
        self.links.count(fault);
        match fault {
            Fault::StoreOutage => self.store.set_outage(true),
            Fault::StoreBack => self.store.set_outage(false),
            Fault::PartitionBrowser => sim.partition("browser", "cp"),
            Fault::RepairBrowser => sim.repair("browser", "cp"),
            Fault::BounceCp => sim.bounce("cp"),
            Fault::BounceAgent { .. } => sim.bounce("agent1"),
            _ => {}
        }
        self.links.apply(sim, "agent1", "cp");
        Ok(())
    }

    fn stepped(&mut self, _sim: &mut turmoil::Sim<'a>, _now: Duration) -> anyhow::Result<()> {
        if let Some(v) = lock(&self.ledger).violations.first() {
            anyhow::bail!("{v}");
        }
        Ok(())
    }
}

/// The audit log agrees with what happened (and the recordings do, [`recording_check`]): every session the browser was given was recorded
/// as opened exactly once, and none was recorded as ended twice. (An end can go unrecorded
/// when the control plane dies between closing the session and writing the record.)
fn audit_check(dir: &std::path::Path, seed: u64, l: &Ledger) -> anyhow::Result<()> {
    use control_plane::audit::action;
    use control_plane::storage::AuditQuery;
    let world = host_world(seed, "auditor");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (rows, recordings) = rt.block_on(async {
        let storage = control_plane::server::open_storage(&world, &dir.join("cp"), None).await?;
        let rows = storage
            .audit_list(AuditQuery {
                target: None,
                action: None,
                before_id: None,
                limit: 100_000,
            })
            .await?;
        let mut recordings = BTreeMap::new();
        for id in l.sessions.keys() {
            let row = storage.recording(id).await?;
            let chunks = storage.recording_chunks(id, 0, 1_000_000).await?;
            recordings.insert(id.clone(), (row, chunks));
        }
        anyhow::Ok((rows, recordings))
    })?;
    recording_check(l, &recordings)?;
    let count = |what: &str, id: &str| {
        rows.iter()
            .filter(|r| r.action == what && r.target == id)
            .count()
    };
    let mut ended = 0;
    for id in l.sessions.keys() {
        let opened = count(action::TERMINAL_OPENED, id);
        anyhow::ensure!(
            opened == 1,
            "session {id}: {opened} terminal.opened audit records"
        );
        let ends = count(action::TERMINAL_ENDED, id);
        anyhow::ensure!(
            ends <= 1,
            "session {id}: {ends} terminal.ended audit records"
        );
        ended += ends;
    }
    let closed = l.sessions.values().filter(|s| s.closed.is_some()).count();
    trace::record(format!(
        "audit: {} sessions opened, {ended} ended, {closed} seen closed by the browser",
        l.sessions.len()
    ));
    Ok(())
}

type Recorded = BTreeMap<
    String,
    (
        Option<control_plane::storage::RecordingRow>,
        Vec<control_plane::storage::RecordingChunk>,
    ),
>;

/// Every session's recording holds each output byte once, at its offset (the byte there is
/// the one the PTY produced), every hole is a marker naming its range, the hash chain holds
/// to the recording's head, and the last session's recording reaches everything produced.
fn recording_check(l: &Ledger, recorded: &Recorded) -> anyhow::Result<()> {
    use control_plane::terminal::recording::cast::Verify;
    let mut bytes = 0u64;
    let mut lost = 0u64;
    for (id, s) in &l.sessions {
        let (Some(row), chunks) = &recorded[id] else {
            anyhow::bail!("session {id} has no recording");
        };
        let mut verify = Verify::new(id);
        let mut at = 0u64;
        for chunk in chunks {
            verify
                .chunk(chunk)
                .map_err(|e| anyhow::anyhow!("session {id}: {e}"))?;
            for line in chunk.events.lines() {
                let (_, code, data): (f64, String, String) = serde_json::from_str(line)?;
                match code.as_str() {
                    "o" => {
                        for b in data.bytes() {
                            anyhow::ensure!(
                                b == byte_at(at),
                                "session {id}: recorded byte {b} at offset {at} is not the byte produced there"
                            );
                            at += 1;
                        }
                    }
                    "m" => {
                        let range = data
                            .split(['(', ')'])
                            .nth(1)
                            .and_then(|r| r.split_once(".."))
                            .and_then(|(a, b)| {
                                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                            });
                        let Some((from, to)) = range else {
                            anyhow::bail!("session {id}: marker {data:?} names no range");
                        };
                        anyhow::ensure!(
                            from == at && to > from,
                            "session {id}: a hole {from}..{to} recorded at offset {at}"
                        );
                        lost += to - from;
                        at = to;
                    }
                    _ => {}
                }
            }
            anyhow::ensure!(
                at == chunk.end_offset as u64,
                "session {id}: chunk {} ends at {} but holds bytes up to {at}",
                chunk.seq,
                chunk.end_offset
            );
        }
        verify
            .finish(row)
            .map_err(|e| anyhow::anyhow!("session {id}: {e}"))?;
        anyhow::ensure!(
            at <= s.produced,
            "session {id}: recorded up to {at}, the PTY produced {}",
            s.produced
        );
        if l.current.as_deref() == Some(id.as_str()) {
            anyhow::ensure!(
                at == s.produced,
                "after the faults healed the recording of {id} is at {at} of {} produced bytes",
                s.produced
            );
        }
        bytes += at;
    }
    trace::record(format!(
        "recordings: {} sessions, {bytes} bytes recorded, {lost} recorded as lost",
        l.sessions.len()
    ));
    Ok(())
}

fn final_check(l: &Ledger) -> anyhow::Result<()> {
    for (id, s) in &l.sessions {
        anyhow::ensure!(
            s.browser_offset <= s.produced.max(s.browser_offset.min(s.produced)),
            "session {id}: the browser is at {} but the PTY produced only {}",
            s.browser_offset,
            s.produced
        );
        anyhow::ensure!(
            s.shown + s.skipped == s.browser_offset,
            "session {id}: {} shown + {} skipped != offset {}",
            s.shown,
            s.skipped,
            s.browser_offset
        );
    }
    let current = l
        .current
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the browser never got a session"))?;
    let s = &l.sessions[current];
    anyhow::ensure!(
        s.closed.is_none(),
        "the last session is closed ({:?}) a minute and a half after the faults healed",
        s.closed
    );
    anyhow::ensure!(
        s.browser_offset == s.produced,
        "after the faults healed the browser is at {} of {} produced bytes in session {current}",
        s.browser_offset,
        s.produced
    );
    let (shown, skipped): (u64, u64) = l
        .sessions
        .values()
        .fold((0, 0), |(a, b), s| (a + s.shown, b + s.skipped));
    trace::record(format!(
        "final: {} sessions, {shown} bytes shown, {skipped} announced as skipped, {} of {} commands ran",
        l.sessions.len(),
        l.ran.len(),
        l.typed
    ));
    Ok(())
}

/// How this browser reads: all at once, slowly, or with long pauses.
#[derive(Clone, Copy, Debug)]
enum Reading {
    Fast,
    Slow,
    Pausing,
}

/// The simulated browser: opens sessions, types, reads, reconnects from its offset.
async fn browser(world: World, token: String, ledger: Shared, typing_for: Duration) {
    let mut rng = StdRng::seed_from_u64(world.random_u64());
    let typing_until = tokio::time::Instant::now() + typing_for;
    loop {
        let Some(session) = create_session(&world, &token).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        trace::record(format!("browser: session {session}"));
        {
            let mut l = lock(&ledger);
            l.sessions.insert(session.clone(), SessionLedger::default());
            l.current = Some(session.clone());
        }
        let reading = match rng.random_range(0..3) {
            0 => Reading::Fast,
            1 => Reading::Slow,
            _ => Reading::Pausing,
        };
        // Reconnect until the session is closed.
        loop {
            let offset = lock(&ledger).sessions[&session].browser_offset;
            let how = How {
                reading,
                typing_until,
            };
            match attach(&world, &token, &session, offset, how, &ledger, &mut rng).await {
                Attach::Closed(reason) => {
                    trace::record(format!("browser: session closed: {reason}"));
                    if let Some(s) = lock(&ledger).sessions.get_mut(&session) {
                        s.closed = Some(reason);
                    }
                    break;
                }
                Attach::Gone => break,
                Attach::Dropped => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

async fn create_session(world: &World, token: &str) -> Option<String> {
    let url = url::Url::parse(&format!("http://cp:{CP_PORT}/api/v1/agents")).ok()?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().ok()?,
    );
    headers.insert(http::header::CONTENT_TYPE, "application/json".parse().ok()?);
    let agents = world::http_request(
        world,
        http::Method::GET,
        &url,
        headers.clone(),
        bytes::Bytes::new(),
        Duration::from_secs(3),
        1 << 20,
    )
    .await
    .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&agents.body).ok()?;
    let agent_id = v.get(0)?["id"].as_str()?.to_string();
    let url = url::Url::parse(&format!("http://cp:{CP_PORT}/api/v1/terminal/sessions")).ok()?;
    let body = serde_json::json!({ "agent_id": agent_id }).to_string();
    let r = world::http_request(
        world,
        http::Method::POST,
        &url,
        headers,
        body.into(),
        Duration::from_secs(15),
        1 << 20,
    )
    .await
    .ok()?;
    if r.status != 201 {
        trace::record(format!(
            "browser: create refused with {}",
            r.status.as_u16()
        ));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    Some(v["session_id"].as_str()?.to_string())
}

#[derive(Clone, Copy)]
struct How {
    reading: Reading,
    typing_until: tokio::time::Instant,
}

enum Attach {
    Closed(String),
    /// The session no longer exists (expired).
    Gone,
    Dropped,
}

async fn attach(
    world: &World,
    token: &str,
    session: &str,
    offset: u64,
    how: How,
    ledger: &Shared,
    rng: &mut StdRng,
) -> Attach {
    let Ok(url) = url::Url::parse(&format!(
        "http://cp:{CP_PORT}/api/v1/terminal/sessions/{session}/ws?offset={offset}"
    )) else {
        return Attach::Gone;
    };
    let ws =
        match world::ws_connect(world, &url, Some(token), Duration::from_secs(5), 1 << 20).await {
            Ok(ws) => ws,
            Err(e) if e.http_status() == Some(404) => return Attach::Gone,
            Err(_) => return Attach::Dropped,
        };
    let (mut sink, mut stream) = ws.split();
    let mut next_input =
        tokio::time::Instant::now() + Duration::from_millis(rng.random_range(200..2000));
    let mut pause_until = tokio::time::Instant::now();
    let mut started = false;
    loop {
        let now = tokio::time::Instant::now();
        if now >= next_input {
            if now >= how.typing_until {
                // Done typing: only read from now on.
                next_input = now + Duration::from_secs(86_400);
            } else {
                let n = rng.random_range(1..200_000u64);
                let k = {
                    let mut l = lock(ledger);
                    l.typed += 1;
                    l.typed
                };
                let line = Message::Binary(format!("g{n}.{k}\r").into_bytes().into());
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), sink.send(line)).await,
                    Ok(Ok(()))
                ) {
                    return Attach::Dropped;
                }
                next_input = now + Duration::from_millis(rng.random_range(200..1500));
            }
        }
        let wait = match how.reading {
            Reading::Slow => Duration::from_millis(rng.random_range(100..1000)),
            Reading::Pausing if rng.random_range(0..50) == 0 => {
                Duration::from_secs(rng.random_range(3..15))
            }
            _ => Duration::ZERO,
        };
        if !wait.is_zero() {
            pause_until = tokio::time::Instant::now() + wait;
        }
        if pause_until > tokio::time::Instant::now() {
            tokio::time::sleep_until(pause_until.min(next_input)).await;
        }
        let frame = tokio::select! {
            f = tokio::time::timeout(BROWSER_DEAD_AFTER, stream.next()) => f,
            () = tokio::time::sleep_until(next_input) => continue,
        };
        let frame = match frame {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => return Attach::Dropped,
            Ok(Some(Ok(frame))) => frame,
        };
        let mut l = lock(ledger);
        let Some(s) = l.sessions.get_mut(session) else {
            return Attach::Gone;
        };
        match check_frame(session, s, frame, &mut started) {
            Seen::Fine => {}
            Seen::Closed(reason) => return Attach::Closed(reason),
            Seen::Violation(v) => {
                l.violations.push(v);
                return Attach::Gone;
            }
        }
    }
}

/// What one frame to the browser said, checked against what the PTY produced.
enum Seen {
    Fine,
    Closed(String),
    Violation(String),
}

/// Check one frame: data only after the offset frame, each byte the one the PTY wrote at its
/// offset and never past what it produced; the offset frame where the browser asked; a skip
/// starting exactly where the data stopped.
fn check_frame(session: &str, s: &mut SessionLedger, frame: Message, started: &mut bool) -> Seen {
    let mut violation = None;
    match frame {
        Message::Binary(data) => {
            if !*started {
                violation = Some("data before the offset frame".to_string());
            }
            for (i, b) in data.iter().enumerate() {
                let at = s.browser_offset + i as u64;
                if *b != byte_at(at) {
                    violation = Some(format!(
                        "session {session}: byte at offset {at} is {b}, the PTY wrote {}",
                        byte_at(at)
                    ));
                    break;
                }
            }
            s.browser_offset += data.len() as u64;
            s.shown += data.len() as u64;
            if s.browser_offset > s.produced {
                violation = Some(format!(
                    "session {session}: the browser is at {} past the {} bytes produced",
                    s.browser_offset, s.produced
                ));
            }
        }
        Message::Text(text) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            match v["type"].as_str() {
                Some("offset") => {
                    let at = v["offset"].as_u64().unwrap_or(0);
                    if at != s.browser_offset && at != s.produced.min(s.browser_offset) {
                        // The control plane may start a new view at the live end only when
                        // asked for an offset past it, which this browser never does.
                        violation = Some(format!(
                            "session {session}: asked for {} and was started at {at}",
                            s.browser_offset
                        ));
                    }
                    *started = true;
                }
                Some("skipped") => {
                    let (from, to) = (
                        v["from"].as_u64().unwrap_or(0),
                        v["to"].as_u64().unwrap_or(0),
                    );
                    if from != s.browser_offset || to <= from {
                        violation = Some(format!(
                            "session {session}: skipped {from}..{to} announced at offset {}",
                            s.browser_offset
                        ));
                    }
                    trace::record(format!("browser: skipped {from}..{to}"));
                    s.skipped += to.saturating_sub(from);
                    s.browser_offset = to;
                }
                Some("closed") => {
                    return Seen::Closed(v["reason"].as_str().unwrap_or("").to_string());
                }
                _ => {}
            }
        }
        _ => {}
    }
    match violation {
        Some(v) => Seen::Violation(v),
        None => Seen::Fine,
    }
}
