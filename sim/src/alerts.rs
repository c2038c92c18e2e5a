//! The `alerts` scenario: a control plane with a webhook channel, agents that go offline for
//! longer than the `agent_offline` rule's 5 minutes and come back, and the receiver down for
//! an hour of simulated time (its network cut, or answering 503), with the control plane
//! crashed once during the outage and once as delivery resumes. Checked at the end: every
//! notification in the outbox was delivered; the receiver took each key once, or twice at
//! most (a crash between a send and its mark); it took the keys in the outbox's order; and
//! some were made while the receiver was down (so the outage was really crossed).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::link::{LinkConfig, LinkStatus};
use control_plane::settings::{AlertTiming, Settings};
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::watch;

use crate::harness::{self, CP_PORT, Driver, EPOCH_S, LinkFaults, Power, Prepare, host_world};
use crate::scenario::{Fault, Schedule, secs};
use crate::trace;

const AGENTS: usize = 3;
const SINK_PORT: u16 = 9000;
/// The webhook channel's URL on the simulated network: host `sink`, [`SINK_PORT`].
const SINK_URL: &str = "http://sink:9000/hook";
/// How long the receiver is down.
const OUTAGE: Duration = Duration::from_secs(3600);
/// The receiver goes down once every agent has had time to enroll.
const DOWN_AT: Duration = Duration::from_secs(90);
/// After the last fault, everything due is delivered within this long (back-off at most 60 s
/// per channel, 200 rows a tick).
const DRAIN: Duration = Duration::from_secs(600);

/// What the receiver took: each notification key with the simulated time it arrived.
#[derive(Default)]
struct Sink {
    /// Answer 503 to everything (the receiver's "down" when its network is not cut).
    refusing: bool,
    taken: Vec<(String, Duration)>,
    refused: usize,
}

type Shared = Arc<Mutex<Sink>>;

fn agent_host(i: usize) -> String {
    format!("agent{}", i + 1)
}

/// The receiver down for an hour; agents partitioned for 6 to 15 minutes at a time within it
/// (overlapping); the control plane crashed once in the outage and once just after it.
pub fn schedule(rng: &mut StdRng) -> Schedule {
    let up = DOWN_AT + OUTAGE;
    let mut events = vec![
        (
            DOWN_AT,
            Fault::SinkDown {
                refuse: rng.random_bool(0.5),
            },
        ),
        (up, Fault::SinkUp),
    ];
    let mut t = DOWN_AT + secs(rng, 30, 120);
    while t + Duration::from_secs(900) < up {
        let agent = rng.random_range(0..AGENTS);
        events.push((t, Fault::Partition { agent }));
        events.push((t + secs(rng, 360, 900), Fault::Repair { agent }));
        t += secs(rng, 120, 900);
    }
    let crash = DOWN_AT + secs(rng, 600, 3000);
    events.push((crash, Fault::CrashCp));
    events.push((crash + secs(rng, 5, 40), Fault::StartCp));
    let again = up + secs(rng, 0, 90);
    events.push((again, Fault::CrashCp));
    events.push((again + secs(rng, 5, 20), Fault::StartCp));
    events.sort_by_key(|(at, _)| *at);
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or(up);
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + DRAIN,
    }
}

fn settings() -> Settings {
    Settings {
        alerts: AlertTiming {
            tick: Duration::from_secs(1),
            evaluate_every: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(20),
            group_wait: Duration::from_secs(10),
            digest_over: 20,
            // Firing alerts are sent again within the outage too.
            repeat: Duration::from_secs(20 * 60),
        },
        ..Settings::default()
    }
}

async fn take(
    axum::extract::State(shared): axum::extract::State<Shared>,
    headers: axum::http::HeaderMap,
) -> axum::http::StatusCode {
    let key = headers
        .get("x-outpost-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut sink = harness::lock(&shared);
    if sink.refusing {
        sink.refused += 1;
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let at = turmoil::sim_elapsed().unwrap_or_default();
    trace::record(format!("sink took {key}"));
    sink.taken.push((key, at));
    axum::http::StatusCode::OK
}

pub fn simulate_alerts(seed: u64, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("outpost-sim-").tempdir()?;
    let tokens = harness::prepare(
        dir.path(),
        seed,
        &[
            Prepare::EnrollTokens(AGENTS),
            Prepare::AlertChannel(SINK_URL),
        ],
    )?;
    let shared: Shared = Arc::default();
    // Its deadlines are seconds (evaluation every 5 s, back-off from 1 s): 50 ms steps.
    let mut sim = harness::new_sim_ticking(seed, plan, Duration::from_millis(50));
    harness::control_plane_host(&mut sim, seed, dir.path().join("cp"), settings());
    {
        let world = host_world(seed, "sink");
        let shared = shared.clone();
        sim.host("sink", move || {
            let (world, shared) = (world.clone(), shared.clone());
            async move {
                let listener = world.net().bind(&format!("0.0.0.0:{SINK_PORT}")).await?;
                let app = axum::Router::new()
                    .route("/hook", axum::routing::post(take))
                    .with_state(shared);
                axum::serve(listener, app).await?;
                Ok(())
            }
        });
    }
    let link_defaults = LinkConfig::new(
        url::Url::parse(&format!("http://cp:{CP_PORT}")).map_err(|e| anyhow::anyhow!("{e}"))?,
        String::new(),
        String::new(),
    );
    for (i, token) in tokens.into_iter().enumerate() {
        let name = agent_host(i);
        let world = host_world(seed, &name);
        let data_dir = dir.path().join(&name);
        let link_defaults = link_defaults.clone();
        sim.host(name.clone().as_str(), move || {
            let (world, data_dir, token, name) =
                (world.clone(), data_dir.clone(), token.clone(), name.clone());
            let link = link_defaults.clone();
            async move {
                let (status, _receiver) = watch::channel(LinkStatus::Connecting { attempt: 0 });
                harness::run_enrolled_link(world, &data_dir, &token, name, link, status).await;
                Ok(())
            }
        });
    }
    let mut driver = AlertsDriver {
        shared: shared.clone(),
        cp: Power::on("cp"),
        links: (0..AGENTS).map(|_| LinkFaults::default()).collect(),
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    final_check(
        &dir.path()
            .join("cp")
            .join(control_plane::server::SQLITE_FILE),
        &shared,
    )
}

struct AlertsDriver {
    shared: Shared,
    cp: Power,
    links: Vec<LinkFaults>,
}

impl<'a> Driver<'a> for AlertsDriver {
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        _now: Duration,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::SinkDown { refuse: true } => harness::lock(&self.shared).refusing = true,
            Fault::SinkDown { refuse: false } => sim.partition("cp", "sink"),
            Fault::SinkUp => {
                harness::lock(&self.shared).refusing = false;
                sim.repair("cp", "sink");
            }
            Fault::Partition { agent } | Fault::Repair { agent } => {
                let links = &mut self.links[*agent];
                links.count(fault);
                links.apply(sim, "cp", &agent_host(*agent));
            }
            Fault::CrashCp => {
                self.cp.crash(sim);
            }
            Fault::StartCp => {
                self.cp.start(sim);
            }
            other => anyhow::bail!("the alerts scenario has no fault {other:?}"),
        }
        Ok(())
    }

    fn stepped(&mut self, _sim: &mut turmoil::Sim<'a>, _now: Duration) -> anyhow::Result<()> {
        Ok(())
    }
}

fn final_check(db: &std::path::Path, shared: &Shared) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt =
        conn.prepare("SELECT id, key, created_ms, delivered_ms FROM notifications ORDER BY id")?;
    type Row = (i64, String, i64, Option<i64>);
    let rows: Vec<Row> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let sink = harness::lock(shared);
    let epoch_ms = (EPOCH_S * 1000) as i64;
    let ms = |d: Duration| epoch_ms + i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let (down_ms, up_ms) = (ms(DOWN_AT), ms(DOWN_AT + OUTAGE));
    let mut during = 0;
    for (id, key, created_ms, delivered_ms) in &rows {
        if delivered_ms.is_none() {
            anyhow::bail!("notification {id} ({key}) was never delivered");
        }
        let times = sink.taken.iter().filter(|(k, _)| k == key).count();
        if !(1..=2).contains(&times) {
            anyhow::bail!(
                "notification {id} ({key}) reached the receiver {times} times (once, or twice after a crash mid-send)"
            );
        }
        if (down_ms..up_ms).contains(created_ms) {
            during += 1;
        }
    }
    let mut first: Vec<&str> = Vec::new();
    for (key, _) in &sink.taken {
        if !first.contains(&key.as_str()) {
            first.push(key);
        }
    }
    let outbox: Vec<&str> = rows.iter().map(|(_, k, _, _)| k.as_str()).collect();
    if first != outbox {
        anyhow::bail!(
            "the receiver took the keys out of the outbox's order:\n  outbox: {outbox:?}\n  taken:  {first:?}"
        );
    }
    if during == 0 {
        anyhow::bail!("no notification was made while the receiver was down");
    }
    let late = sink.taken.iter().filter(|(_, at)| ms(*at) >= up_ms).count();
    trace::record(format!(
        "final: {} notifications, {during} made during the outage, {} taken ({late} after it, {} duplicates), {} refused",
        rows.len(),
        sink.taken.len(),
        sink.taken.len() - first.len(),
        sink.refused
    ));
    Ok(())
}
