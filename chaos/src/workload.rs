//! Workloads that leave evidence the verdicts read afterwards:
//!
//! * **tasks**: per agent a periodic task (every 10 s), a cron task (every minute) and a task
//!   due in three hours; one-off tasks every few seconds, round robin. Each run appends
//!   `start PID NANOS` and `end PID NANOS` to a marker file named after the task's key, so a
//!   run's real execution is on disk whatever the agent recorded;
//! * **terminal**: a scripted browser per session types numbered `INSERT … RETURNING`
//!   statements into psql, waits for each answer, reads every byte with its offset, and
//!   reattaches (or opens a new session) when the link breaks;
//! * **exec**: fleet exec of a command that appends its token to the host's receipt file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::api::Api;

/// What the suite knows about a task it asked for.
#[derive(Clone, Debug)]
pub struct AskedTask {
    pub agent: usize,
    pub key: String,
    pub what: TaskShape,
    /// The API's answer: `Some(id)` when created, `None` when refused or unanswered.
    pub id: Option<String>,
    /// Whether the answer was lost (no answer, or a gateway error): the task may exist.
    pub uncertain: bool,
    /// When it was asked for (unix ms).
    pub asked_ms: i64,
    /// When the answer (or its failure) came (unix ms): the request was in flight between.
    pub answered_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskShape {
    OneOff,
    Periodic,
    Cron,
    Future,
}

/// The command a task runs: two marker lines around a one-second sleep.
fn marker_argv(markers: &Path, key: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        "echo \"start $$ $(date +%s%N)\" >> \"$0\"; sleep 1; echo \"end $$ $(date +%s%N)\" >> \"$0\""
            .into(),
        markers.join(key).display().to_string(),
    ]
}

pub async fn ask_task(
    api: &Api,
    agent_id: &str,
    agent: usize,
    key: &str,
    what: TaskShape,
    markers: &Path,
) -> AskedTask {
    let mut body = json!({
        "kind": "command",
        "argv": marker_argv(markers, key),
        "key": key,
        "timeout": "30s",
    });
    match what {
        TaskShape::OneOff => {}
        TaskShape::Periodic => body["every"] = json!("10s"),
        TaskShape::Cron => body["cron"] = json!("* * * * *"),
        TaskShape::Future => body["in"] = json!("3h"),
    }
    let asked_ms = world::World::real().now_unix_ms();
    let answer = api
        .call(
            Method::POST,
            &format!("/api/v1/agents/{agent_id}/tasks"),
            Some(body),
        )
        .await;
    let (id, uncertain) = match answer {
        Ok((StatusCode::CREATED, v)) => (v["id"].as_str().map(str::to_string), false),
        Ok((status, _)) => (
            None,
            status == StatusCode::GATEWAY_TIMEOUT || status == StatusCode::BAD_GATEWAY,
        ),
        Err(_) => (None, true),
    };
    AskedTask {
        agent,
        key: key.to_string(),
        what,
        id,
        uncertain,
        asked_ms,
        answered_ms: world::World::real().now_unix_ms(),
    }
}

/// Pause between an answer and the next statement.
const TYPING_PAUSE: Duration = Duration::from_millis(200);
/// How long an answer may take before its statement is given up as lost on the way.
const ANSWER_WAIT: Duration = Duration::from_secs(8);

/// One statement typed into a terminal, and what became of it.
#[derive(Clone, Debug)]
pub struct Typed {
    pub session: String,
    pub n: u64,
    /// Its answer was read back.
    pub confirmed: bool,
}

/// Everything one scripted browser saw.
#[derive(Debug, Default)]
pub struct TerminalLedger {
    pub typed: Vec<Typed>,
    /// Problems seen in the byte stream: a repeated answer, an unannounced jump.
    pub violations: Vec<String>,
    pub bytes: u64,
    pub skipped: u64,
    pub reattached: u64,
    pub sessions: u64,
    /// When the last confirmation arrived (ms since the suite's start).
    pub last_confirmed_ms: u64,
}

/// Drive terminal sessions on `agent_id` until `stop`; the ledger is shared so the end of
/// the run can read it while the browser keeps going.
pub async fn terminal_browser(
    api: Arc<Api>,
    agent_id: String,
    tag: String,
    ledger: Arc<Mutex<TerminalLedger>>,
    started: tokio::time::Instant,
    stop: CancellationToken,
) {
    let mut n: u64 = 0;
    while !stop.is_cancelled() {
        let opened = api
            .call(
                Method::POST,
                "/api/v1/terminal/sessions",
                Some(json!({"agent_id": agent_id})),
            )
            .await;
        let session = match opened {
            Ok((StatusCode::CREATED, v)) => {
                v["session_id"].as_str().unwrap_or_default().to_string()
            }
            _ => {
                sleep_or_stop(&stop, Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Ok(mut l) = ledger.lock() {
            l.sessions += 1;
        }
        let mut typist = Typist {
            me: format!("{tag}-{session}"),
            session,
            ledger: Arc::clone(&ledger),
            started,
            offset: 0,
            seen: None,
            pending: None,
            prompt_seen: false,
            pending_since: tokio::time::Instant::now(),
        };
        typist.attach_until_ended(&api, &mut n, &stop).await;
        // The session is over; a statement still unanswered stays unconfirmed (it may or
        // may not have run, but never twice: the verdict checks the table).
        let _ = api
            .call(
                Method::DELETE,
                &format!("/api/v1/terminal/sessions/{}", typist.session),
                None,
            )
            .await;
        sleep_or_stop(&stop, Duration::from_millis(500)).await;
    }
}

/// One scripted browser's session: where its output stands, what it typed and what was
/// answered.
struct Typist {
    session: String,
    /// The session as the typed rows name it (`TAG-SESSION`).
    me: String,
    ledger: Arc<Mutex<TerminalLedger>>,
    started: tokio::time::Instant,
    offset: u64,
    /// The last answer read.
    seen: Option<u64>,
    /// The statement typed and not answered yet.
    pending: Option<u64>,
    prompt_seen: bool,
    pending_since: tokio::time::Instant,
}

/// How one attachment ended.
enum Attachment {
    /// The session closed (or the run stops).
    Ended,
    /// The socket broke or went quiet: attach again.
    Broken,
}

/// What a text frame means for the attachment.
enum Told {
    Nothing,
    /// A skipped range (the first-frame check no longer applies).
    Skipped,
    Closed,
}

impl Typist {
    /// Attach, and attach again after breaks (alternating replicas), until the session ends,
    /// the run stops or 60 attempts were used.
    async fn attach_until_ended(&mut self, api: &Api, n: &mut u64, stop: &CancellationToken) {
        let mut attempts_left = 60;
        while !stop.is_cancelled() && attempts_left > 0 {
            let replica = &api.replicas[(attempts_left as usize) % api.replicas.len()];
            let Ok(url) = url::Url::parse(&format!(
                "ws://{replica}/api/v1/terminal/sessions/{}/ws?offset={}",
                self.session, self.offset
            )) else {
                break;
            };
            let ws = world::ws_connect(
                &world::World::real(),
                &url,
                Some(api.token()),
                Duration::from_secs(10),
                1 << 22,
            )
            .await;
            let Ok(mut ws) = ws else {
                attempts_left -= 1;
                sleep_or_stop(stop, Duration::from_millis(500)).await;
                continue;
            };
            if self.offset > 0
                && let Ok(mut l) = self.ledger.lock()
            {
                l.reattached += 1;
            }
            if let Attachment::Ended = self.attached(&mut ws, n, stop).await {
                break;
            }
            attempts_left -= 1;
            sleep_or_stop(stop, Duration::from_millis(300)).await;
        }
    }

    /// One attachment: type a statement whenever psql is idle, read output and notices.
    async fn attached(
        &mut self,
        ws: &mut world::WsStream,
        n: &mut u64,
        stop: &CancellationToken,
    ) -> Attachment {
        let mut first = true;
        let mut tail: Vec<u8> = Vec::new();
        let mut last_frame = tokio::time::Instant::now();
        loop {
            if self.pending.is_none() && self.prompt_seen && !self.type_next(ws, n, stop).await {
                return Attachment::Broken;
            }
            let frame = tokio::select! {
                () = stop.cancelled() => return Attachment::Ended,
                f = tokio::time::timeout(Duration::from_secs(2), ws.next()) => f,
            };
            let frame = match frame {
                Ok(Some(Ok(f))) => f,
                Err(_) => {
                    if !self.quiet(ws).await || last_frame.elapsed() > Duration::from_secs(30) {
                        return Attachment::Broken;
                    }
                    continue;
                }
                _ => return Attachment::Broken,
            };
            last_frame = tokio::time::Instant::now();
            match frame {
                Message::Binary(data) => self.output(&data, &mut tail),
                Message::Text(text) => match self.told(&text, first) {
                    Told::Closed => return Attachment::Ended,
                    Told::Skipped => {
                        first = false;
                        continue;
                    }
                    Told::Nothing => first = false,
                },
                Message::Close(_) => return Attachment::Broken,
                _ => {}
            }
        }
    }

    /// Type the next statement, at a typist's pace (a few statements a second). `false`
    /// when the socket did not take it (the same number is typed again after reattaching).
    async fn type_next(
        &mut self,
        ws: &mut world::WsStream,
        n: &mut u64,
        stop: &CancellationToken,
    ) -> bool {
        sleep_or_stop(stop, TYPING_PAUSE).await;
        let next = *n + 1;
        let sql = format!(
            "insert into chaos_typed (session, n) values ('{}', {next}) returning 'ok' || '-' || n;\r",
            self.me
        );
        if ws
            .send(Message::Binary(sql.into_bytes().into()))
            .await
            .is_err()
        {
            return false;
        }
        *n = next;
        self.pending = Some(next);
        self.pending_since = tokio::time::Instant::now();
        if let Ok(mut l) = self.ledger.lock() {
            l.typed.push(Typed {
                session: self.me.clone(),
                n: next,
                confirmed: false,
            });
        }
        true
    }

    /// No frame for a while. A statement lost on its way (typed into a link that broke) is
    /// never typed again: it is left unconfirmed, the line is cleared with Ctrl+C, and the
    /// next number follows. `false` when the socket did not take the Ctrl+C.
    async fn quiet(&mut self, ws: &mut world::WsStream) -> bool {
        if self.pending.is_some() && self.pending_since.elapsed() > ANSWER_WAIT {
            if ws
                .send(Message::Binary(b"\x03".to_vec().into()))
                .await
                .is_err()
            {
                return false;
            }
            self.pending = None;
        }
        true
    }

    /// Output bytes: answers must come in order (a repeat means replayed bytes); the pending
    /// statement's answer confirms it; a prompt means psql is idle.
    fn output(&mut self, data: &[u8], tail: &mut Vec<u8>) {
        self.offset += data.len() as u64;
        if let Ok(mut l) = self.ledger.lock() {
            l.bytes += data.len() as u64;
        }
        tail.extend_from_slice(data);
        let text = String::from_utf8_lossy(tail).into_owned();
        for k in answers(&text) {
            self.answered(k);
        }
        if text.contains("=# ") || text.contains("=> ") {
            self.prompt_seen = true;
        }
        // Keep only what a split answer or prompt could still need.
        let keep = tail.len().saturating_sub(32);
        tail.drain(..keep);
        if let Some(pos) = last_answer_end(tail) {
            tail.drain(..pos);
        }
    }

    fn answered(&mut self, k: u64) {
        let session = &self.session;
        if self.seen.is_some_and(|s| k <= s) {
            if let Ok(mut l) = self.ledger.lock() {
                l.violations.push(format!(
                    "session {session}: answer ok-{k} read again after ok-{}",
                    self.seen.unwrap_or(0)
                ));
            }
        } else {
            self.seen = Some(k);
        }
        if self.pending == Some(k) {
            self.pending = None;
            if let Ok(mut l) = self.ledger.lock() {
                l.last_confirmed_ms = self.started.elapsed().as_millis() as u64;
                if let Some(t) = l
                    .typed
                    .iter_mut()
                    .rev()
                    .find(|t| t.n == k && t.session == self.me)
                {
                    t.confirmed = true;
                }
            }
        }
    }

    /// A text frame: the offset output continues at (on the first frame it must be the one
    /// asked for), a skipped range, or the close.
    fn told(&mut self, text: &str, first: bool) -> Told {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        match v["type"].as_str() {
            Some("offset") => {
                let at = v["offset"].as_u64().unwrap_or(0);
                if first
                    && at != self.offset
                    && let Ok(mut l) = self.ledger.lock()
                {
                    l.violations.push(format!(
                        "session {}: asked for offset {}, got {at} without a skipped range",
                        self.session, self.offset
                    ));
                }
                self.offset = at;
                Told::Nothing
            }
            Some("skipped") => {
                let from = v["from"].as_u64().unwrap_or(0);
                let to = v["to"].as_u64().unwrap_or(0);
                if let Ok(mut l) = self.ledger.lock() {
                    l.skipped += to.saturating_sub(from);
                }
                self.offset = to;
                Told::Skipped
            }
            Some("closed") => Told::Closed,
            _ => Told::Nothing,
        }
    }
}

/// The numbers of `ok-N` answers in `text`, in order.
fn answers(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("ok-") {
        let digits: String = rest[pos + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let after = rest[pos + 3 + digits.len()..].chars().next();
        // Only whole answers: digits followed by the end of the line.
        if !digits.is_empty()
            && matches!(after, Some('\r' | '\n' | ' '))
            && let Ok(k) = digits.parse()
        {
            out.push(k);
        }
        rest = &rest[pos + 3..];
    }
    out
}

/// Where the last whole answer in `tail` ends, so it is not counted twice.
fn last_answer_end(tail: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(tail);
    let pos = text.rfind("ok-")?;
    let end = text[pos + 3..].find(['\r', '\n', ' '])?;
    Some(pos + 3 + end)
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

/// One fleet exec and what each host said.
#[derive(Clone, Debug)]
pub struct ExecRun {
    pub token: String,
    pub op_id: Option<String>,
    /// host → outcome (`ok`, `not_started`, `uncertain` when its replica died, …); empty when
    /// no replica showed the run ended within 120 s.
    pub outcomes: BTreeMap<String, String>,
}

/// Start an exec through the next replica and follow it to its end through any replica (runs
/// are in storage: the other replica answers when the starting one died).
pub async fn exec_once(api: &Api, token: &str, receipts: &Path, replica: usize) -> ExecRun {
    let script = format!(
        "echo \"$0\" >> {}/\"$OUTPOST_CHAOS_HOST\"",
        receipts.display()
    );
    let body = json!({
        "argv": ["sh", "-c", script, token],
        "command_timeout": "20s",
        "hosts": "*",
    });
    let target = api.replicas[replica % api.replicas.len()].clone();
    let mut run = ExecRun {
        token: token.to_string(),
        op_id: None,
        outcomes: BTreeMap::new(),
    };
    let Ok((status, v)) = api
        .call_on(&target, Method::POST, "/api/v1/exec", Some(body))
        .await
    else {
        return run;
    };
    if !status.is_success() {
        return run;
    }
    let Some(op) = v["op_id"].as_str().map(str::to_string) else {
        return run;
    };
    run.op_id = Some(op.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Storage or a replica may be away for a moment: ask again until the deadline.
        if let Ok((s, v)) = api
            .call(Method::GET, &format!("/api/v1/exec/{op}"), None)
            .await
            && s.is_success()
            && v["finished"] == true
        {
            for h in v["hosts"].as_array().into_iter().flatten() {
                if let (Some(host), Some(outcome)) = (h["host"].as_str(), h["outcome"].as_str()) {
                    run.outcomes.insert(host.to_string(), outcome.to_string());
                }
            }
            return run;
        }
    }
    run
}

/// Receipt tokens per host file in `receipts`.
pub fn read_receipts(receipts: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(receipts).into_iter().flatten().flatten() {
        let host = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        out.insert(host, text.lines().map(str::to_string).collect());
    }
    out
}

/// Marker lines of one task: `(start or end, pid, nanos)`.
pub fn read_markers(markers: &Path, key: &str) -> Vec<(bool, u32, u128)> {
    let path: PathBuf = markers.join(key);
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let start = match f.next()? {
                "start" => true,
                "end" => false,
                _ => return None,
            };
            Some((start, f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{answers, last_answer_end};

    #[test]
    fn only_whole_answers_count_and_the_echo_never_does() {
        let echo = "insert into chaos_typed (session, n) values ('a0-s', 7) returning 'ok' || '-' || n;\r\n";
        assert!(answers(echo).is_empty());
        assert_eq!(answers(" ok-7\r\n(1 row)\r\n ok-8\r\n"), vec![7, 8]);
        // Split across frames: not counted until the line ends.
        assert!(answers(" ok-1").is_empty());
        assert_eq!(answers(" ok-12\r\n"), vec![12]);
        assert_eq!(last_answer_end(b" ok-12\r\nINSERT"), Some(6));
    }
}

/// The alert receiver: a webhook endpoint on loopback that keeps the idempotency key of every
/// notification it takes, with when (unix ms).
#[derive(Clone, Default)]
pub struct AlertSink {
    pub taken: Arc<Mutex<Vec<(String, i64)>>>,
}

async fn take_alert(
    axum::extract::State(sink): axum::extract::State<AlertSink>,
    headers: http::HeaderMap,
) -> StatusCode {
    let key = headers
        .get("x-outpost-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let at = world::World::real().now_unix_ms();
    if let Ok(mut taken) = sink.taken.lock() {
        taken.push((key, at));
    }
    StatusCode::OK
}

/// Start the receiver, and point the control plane at it: a webhook channel, `agent_offline`
/// as soon as an agent is offline and `metrics_delivery_failing` at the first failed
/// delivery, so the faults make alerts that fire and resolve within the run.
pub async fn start_alert_path(api: &Api, sink: AlertSink) -> anyhow::Result<()> {
    let listener = world::World::real().net().bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(take_alert))
        .with_state(sink);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("chaos: the alert receiver stopped: {e}");
        }
    });
    for (path, body) in [
        (
            "/api/v1/alert-channels",
            json!({"name": "chaos", "kind": "webhook", "url": url, "secret": "chaos-signing-key"}),
        ),
        (
            "/api/v1/alert-rules",
            json!({"name": "chaos-offline", "rule": "agent_offline", "agents": ["*"], "critical": 1}),
        ),
        (
            "/api/v1/alert-rules",
            json!({"name": "chaos-delivery", "rule": "metrics_delivery_failing", "agents": ["*"],
                "warning": 1, "for": "0s"}),
        ),
    ] {
        match api.call(Method::POST, path, Some(body)).await {
            Ok((StatusCode::CREATED, _)) => {}
            Ok((status, answer)) => anyhow::bail!("POST {path}: {status} {answer}"),
            Err(e) => anyhow::bail!("POST {path}: {e}"),
        }
    }
    Ok(())
}

/// Where rollouts' commands leave their receipts (beside `receipts`): one file per agent, one
/// line per run, the rollout's token.
pub const ROLLOUT_RECEIPTS: &str = "rollout-receipts";

/// One rollout over every agent and what the control plane showed of it at the end.
#[derive(Clone, Debug)]
pub struct RolloutRun {
    pub token: String,
    pub id: Option<String>,
    /// Its state (`running`, `done`, `halted`, …) and each host's (agent name → state), as
    /// read at the end; empty when no replica answered.
    pub state: String,
    pub hosts: BTreeMap<String, String>,
}

/// Start a rollout over every agent through the next replica: a canary then the rest, two at
/// once, failures tolerated (faults fail runs; the ledger is what is judged), offline agents
/// waited for a minute. Its command appends the token to the agent's receipt file.
pub async fn rollout_once(api: &Api, token: &str, receipts: &Path, replica: usize) -> RolloutRun {
    let script = format!(
        "echo \"$0\" >> {}/\"$OUTPOST_CHAOS_AGENT\"",
        receipts.display()
    );
    let body = json!({
        "name": token,
        "agents": ["chaos-a*"],
        "waves": [1, "100%"],
        "max_in_flight": 2,
        "max_errors": "100%",
        "soak": "2s",
        "gate_wait": "20s",
        "offline": "wait",
        "offline_deadline": "60s",
        "task": {"kind": "command", "argv": ["sh", "-c", script, token], "timeout": "30s"},
    });
    let target = api.replicas[replica % api.replicas.len()].clone();
    let id = match api
        .call_on(&target, Method::POST, "/api/v1/rollouts", Some(body))
        .await
    {
        Ok((StatusCode::CREATED, v)) => v["id"].as_str().map(str::to_string),
        _ => None,
    };
    RolloutRun {
        token: token.to_string(),
        id,
        state: String::new(),
        hosts: BTreeMap::new(),
    }
}

/// Read each rollout's end state through any replica.
pub async fn rollouts_read(api: &Api, runs: &mut [RolloutRun]) {
    for run in runs.iter_mut() {
        let Some(id) = &run.id else { continue };
        if let Ok((s, v)) = api
            .call(Method::GET, &format!("/api/v1/rollouts/{id}"), None)
            .await
            && s.is_success()
        {
            run.state = v["state"].as_str().unwrap_or("").to_string();
            for h in v["hosts"].as_array().into_iter().flatten() {
                if let (Some(agent), Some(state)) = (h["agent"].as_str(), h["state"].as_str()) {
                    run.hosts.insert(agent.to_string(), state.to_string());
                }
            }
        }
    }
}
