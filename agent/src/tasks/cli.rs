//! `outpost-agent tasks …`: a client of the local task API.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use world::{Target, World};

use super::bridge::{AddRequest, TaskView};
use super::store::Store;

#[derive(Args, Clone)]
pub struct Where {
    /// Agent API socket [default: DATA_DIR/agent.sock].
    #[arg(long, env = "OUTPOST_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Agent state directory [default: /var/lib/outpost-agent].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl Where {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::layout::DEFAULT_DATA_DIR))
    }

    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir().join(crate::layout::SOCKET_FILE))
    }
}

/// When a task runs; none of them means now.
#[derive(Args, Clone, Default)]
pub struct ScheduleArgs {
    /// Run once at this RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    /// Run once after this delay (30s, 10m, 2h).
    #[arg(long = "in", value_name = "D")]
    pub in_: Option<String>,
    /// Run every D, starting now; never overlapping itself.
    #[arg(long)]
    pub every: Option<String>,
    /// Five-field cron expression.
    #[arg(long)]
    pub cron: Option<String>,
    /// IANA time zone for --cron [default: UTC].
    #[arg(long)]
    pub tz: Option<String>,
}

/// A window runs may start in (all of --window, --window-cron and --window-for, or none).
#[derive(Args, Clone, Debug, Default)]
pub struct WindowArgs {
    /// Runs start only inside this window (its name, as reports show it); due runs wait for
    /// its next opening, missed slots collapse into one run there.
    #[arg(long, value_name = "NAME", requires_all = ["window_cron", "window_for"])]
    pub window: Option<String>,
    /// When the window opens: five-field cron, e.g. '0 1 * * *'.
    #[arg(long, value_name = "CRON", requires = "window")]
    pub window_cron: Option<String>,
    /// IANA time zone of --window-cron [default: UTC].
    #[arg(long, value_name = "TZ", requires = "window")]
    pub window_tz: Option<String>,
    /// How long each opening lasts (elapsed time), e.g. 3h.
    #[arg(long, value_name = "D", requires = "window")]
    pub window_for: Option<String>,
    /// No run starts this long before the window closes, e.g. 30m.
    #[arg(long, value_name = "D", requires = "window")]
    pub window_cutoff: Option<String>,
    /// Stop a run still going this long after the window closed [default: let it finish].
    #[arg(long, value_name = "D", requires = "window")]
    pub window_grace: Option<String>,
}

impl WindowArgs {
    fn request(self) -> Option<proto::TaskWindow> {
        Some(proto::TaskWindow {
            name: self.window?,
            cron: self.window_cron,
            tz: self.window_tz,
            duration: self.window_for,
            cutoff: self.window_cutoff,
            grace: self.window_grace,
        })
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum TasksCommand {
    /// Schedule a task. Kinds: vacuum, analyze, health_check, retention_cleanup, pg_dump, sql,
    /// command (argv after --), pgbackrest_backup, pgbackrest_check, pgbackrest_verify,
    /// restore_drill (stanzas granted in [backups]). Without --at/--in/--every/--cron it runs now.
    ///
    /// Examples:
    ///   outpost-agent tasks add vacuum --param database=app --param table=orders --cron '0 3 * * *' --tz Europe/Berlin
    ///   outpost-agent tasks add health_check --every 5m
    ///   outpost-agent tasks add command --in 10m --timeout 30s -- /usr/local/bin/rotate-logs --keep 7
    ///   outpost-agent tasks add pgbackrest_backup --param stanza=main --param type=full --cron '0 1 * * 0' --timeout 6h
    ///   outpost-agent tasks add vacuum --param database=app --every 1d --window nightly --window-cron '0 1 * * *' --window-tz Europe/Berlin --window-for 3h --window-cutoff 30m --critical
    #[command(verbatim_doc_comment)]
    Add {
        /// vacuum | analyze | health_check | retention_cleanup | pg_dump | sql | command |
        /// pgbackrest_backup | pgbackrest_check | pgbackrest_verify | restore_drill
        kind: String,
        /// Task parameter, repeatable: --param database=app
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Kill the run's process group after this long [default: 1h].
        #[arg(long)]
        timeout: Option<String>,
        /// Operation signature the task id derives from [default: kind, params, argv, hour].
        #[arg(long)]
        key: Option<String>,
        /// Print the stored task as JSON (the API's shape) instead of its id.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        window: WindowArgs,
        /// A failed run raises the control plane's critical_task_failed alert.
        #[arg(long)]
        critical: bool,
        #[command(flatten)]
        at_where: Where,
        /// The command and its arguments (kind `command`).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// List tasks, newest first.
    List {
        /// Print the tasks as a JSON array (the API's shape) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at_where: Where,
    },
    /// A task and its runs.
    Show {
        id: String,
        /// Print the task and its runs as JSON (the API's shape).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at_where: Where,
    },
    /// Cancel a scheduled task, or stop a running one.
    Cancel {
        id: String,
        /// Print the task as it is after the cancel, as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at_where: Where,
    },
    /// Give a task a new schedule (a run in flight finishes first).
    Reschedule {
        id: String,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// Print the rescheduled task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at_where: Where,
    },
    /// Output of a task's latest run.
    Logs {
        id: String,
        #[command(flatten)]
        at_where: Where,
    },
    /// Delete ended tasks older than D from the history (what retention_cleanup runs).
    Purge {
        #[arg(long, default_value = "30d")]
        older_than: String,
        #[command(flatten)]
        at_where: Where,
    },
}

const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

async fn call(
    world: &World,
    at: &Where,
    method: http::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let socket = at.socket();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let response = world::request(
        world,
        Target::Unix { socket: &socket, path },
        method,
        headers,
        body.unwrap_or_default().into(),
        Duration::from_secs(30),
        RESPONSE_BYTES_MAX,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: is the agent running (`outpost-agent run`)? use --socket or --data-dir to point at it"))?;
    if !response.status.is_success() {
        let reason = serde_json::from_slice::<serde_json::Value>(&response.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {}", response.status));
        bail!("{reason}");
    }
    Ok(response.body.to_vec())
}

/// Print the agent's answer: as it came with `--json`, else read and shown by `human`.
fn answer<T: serde::de::DeserializeOwned>(
    out: &[u8],
    json: bool,
    human: impl FnOnce(T),
) -> anyhow::Result<()> {
    if json {
        println!("{}", String::from_utf8_lossy(out));
    } else {
        human(serde_json::from_slice(out).context("read the agent's answer")?);
    }
    Ok(())
}

fn print_task(t: &TaskView) {
    println!("id:          {}", t.id);
    println!("kind:        {}", t.kind);
    println!("status:      {}", t.status);
    println!("schedule:    {}", t.schedule);
    println!("key:         {}", t.key);
    println!("created_at:  {}", t.created_at);
    println!("next_run_at: {}", t.next_run_at.as_deref().unwrap_or("-"));
    for r in &t.runs {
        let dropped = if r.output_dropped_bytes > 0 {
            format!(" ({} bytes dropped)", r.output_dropped_bytes)
        } else {
            String::new()
        };
        println!(
            "run {:>6}  {:<9} exit={:<4} {} → {}  output {} bytes{dropped}{}",
            r.run_id,
            r.status,
            r.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.started_at.as_deref().unwrap_or("-"),
            r.finished_at.as_deref().unwrap_or("-"),
            r.output_bytes,
            r.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default(),
        );
    }
}

pub async fn run(command: TasksCommand) -> anyhow::Result<()> {
    let world = World::real();
    match command {
        TasksCommand::Add {
            kind,
            params,
            schedule:
                ScheduleArgs {
                    at,
                    in_,
                    every,
                    cron,
                    tz,
                },
            timeout,
            key,
            json,
            window,
            critical,
            at_where,
            argv,
        } => {
            let request = AddRequest {
                kind,
                params: param_map(params)?,
                argv,
                at,
                in_,
                every,
                cron,
                tz,
                timeout,
                key,
                window: window.request(),
                critical,
            };
            add(&world, &request, json, &at_where).await?;
        }
        TasksCommand::List { json, at_where } => {
            let out = call(&world, &at_where, http::Method::GET, "/v1/tasks", None).await?;
            answer(&out, json, |tasks: Vec<TaskView>| {
                println!(
                    "{:<20} {:<18} {:<10} {:<25} SCHEDULE",
                    "ID", "KIND", "STATUS", "NEXT RUN"
                );
                for t in tasks {
                    println!(
                        "{:<20} {:<18} {:<10} {:<25} {}",
                        t.id,
                        t.kind,
                        t.status,
                        t.next_run_at.as_deref().unwrap_or("-"),
                        t.schedule
                    );
                }
            })?;
        }
        TasksCommand::Show { id, json, at_where } => {
            let out = call(
                &world,
                &at_where,
                http::Method::GET,
                &format!("/v1/tasks/{}", encode(&id)),
                None,
            )
            .await?;
            answer(&out, json, |t: TaskView| print_task(&t))?;
        }
        TasksCommand::Cancel { id, json, at_where } => {
            let out = call(
                &world,
                &at_where,
                http::Method::POST,
                &format!("/v1/tasks/{}/cancel", encode(&id)),
                None,
            )
            .await?;
            answer(&out, json, |t: TaskView| println!("{} {}", t.id, t.status))?;
        }
        TasksCommand::Reschedule {
            id,
            schedule,
            json,
            at_where,
        } => reschedule(&world, &id, schedule, json, &at_where).await?,
        TasksCommand::Logs { id, at_where } => {
            let out = call(
                &world,
                &at_where,
                http::Method::GET,
                &format!("/v1/tasks/{}/logs", encode(&id)),
                None,
            )
            .await?;
            std::io::stdout().write_all(&out)?;
        }
        TasksCommand::Purge {
            older_than,
            at_where,
        } => purge(&world, &older_than, &at_where).await?,
    }
    Ok(())
}

/// `--param K=V`, repeated, as a map.
fn param_map(params: Vec<String>) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut map = std::collections::BTreeMap::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param {p:?} must be K=V");
        };
        map.insert(k.to_string(), v.to_string());
    }
    Ok(map)
}

/// `tasks add`: print the new task's id (or the task as JSON).
async fn add(
    world: &World,
    request: &AddRequest,
    json: bool,
    at_where: &Where,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(request)?;
    let out = call(world, at_where, http::Method::POST, "/v1/tasks", Some(body)).await?;
    let task: TaskView = serde_json::from_slice(&out).context("read the agent's answer")?;
    if json {
        println!("{}", String::from_utf8_lossy(&out));
    } else {
        println!("{}", task.id);
    }
    Ok(())
}

/// `tasks reschedule`.
async fn reschedule(
    world: &World,
    id: &str,
    schedule: ScheduleArgs,
    json: bool,
    at_where: &Where,
) -> anyhow::Result<()> {
    let ScheduleArgs {
        at,
        in_,
        every,
        cron,
        tz,
    } = schedule;
    if [&at, &in_, &every, &cron].iter().all(|v| v.is_none()) {
        bail!("give the new schedule: --at, --in, --every or --cron");
    }
    let body = serde_json::to_vec(&super::api::RescheduleRequest {
        at,
        in_,
        every,
        cron,
        tz,
    })?;
    let out = call(
        world,
        at_where,
        http::Method::POST,
        &format!("/v1/tasks/{}/reschedule", encode(id)),
        Some(body),
    )
    .await?;
    answer(&out, json, |t: TaskView| {
        println!(
            "{} {} next {}",
            t.id,
            t.schedule,
            t.next_run_at.as_deref().unwrap_or("-")
        )
    })
}

/// `tasks purge`: straight on the store file (the agent need not run).
async fn purge(world: &World, older_than: &str, at_where: &Where) -> anyhow::Result<()> {
    let age = humantime::parse_duration(older_than)
        .with_context(|| format!("--older-than {older_than:?} is not a duration"))?;
    let before = world.now_unix_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let path = at_where.data_dir().join(crate::layout::TASKS_FILE);
    let n = world
        .blocking(move || Store::open(&path).and_then(|mut s| s.purge(before)))
        .await??;
    println!("purged {} ended tasks older than {older_than}", n.len());
    Ok(())
}

/// Percent-encode a path segment (task ids are plain, but input is input).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
