//! Wire types between the Outpost agent and the control plane.
//!
//! # Compatibility rule
//! * **Unknown fields are ignored.** No type here denies unknown fields, so a newer peer may
//!   add optional fields freely. New fields are always `#[serde(default)]`.
//! * **Unknown message kinds are answered, not fatal.** Every message enum has an `Unknown`
//!   variant (`#[serde(other)]`); a receiver that decodes one replies with
//!   [`ErrorCode::UnknownMessage`] and keeps the channel open. Unknown commands are acked with
//!   `ok: false` and [`ErrorCode::UnknownCommand`].
//! * **The version is negotiated at hello.** The agent sends the range it speaks
//!   (`protocol_min..=protocol_max`); the control plane picks the highest version both speak
//!   ([`negotiate`]) and names it in [`ServerMessage::Welcome`], or answers
//!   [`ErrorCode::UnsupportedVersion`] and closes. A message whose meaning changes gets a new
//!   protocol version; removing a message kind or a required field needs a new version too.
//!
//! Frames are JSON text frames, one message per frame, at most [`FRAME_BYTES_MAX`] bytes.

pub mod cron;
pub mod labels;
pub mod prometheus;
pub mod terminal;

use serde::{Deserialize, Serialize};

/// Oldest protocol version this build speaks.
pub const PROTOCOL_MIN: u32 = 1;
/// Newest protocol version this build speaks.
pub const PROTOCOL_MAX: u32 = 1;
/// Largest control-channel frame either side accepts.
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Path of the agent control channel (WebSocket, `Authorization: Bearer <agent credential>`).
pub const CHANNEL_PATH: &str = "/api/v1/agent/channel";
/// Path of agent enrollment (HTTP POST, JSON [`EnrollRequest`]).
pub const ENROLL_PATH: &str = "/api/v1/agents/enroll";

/// The highest version in both ranges, or `None` when they do not overlap.
pub fn negotiate(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let low = ours.0.max(theirs.0);
    let high = ours.1.min(theirs.1);
    (low <= high).then_some(high)
}

/// Path of metrics delivery (HTTP POST, JSON [`MetricsBatch`], agent credential).
pub const METRICS_PATH: &str = "/api/v1/agent/metrics";
/// Where an agent silences its own alerts (`outpost-agent silence`): a JSON body of
/// `{"for": "1h", "rule": "…", "comment": "…"}` (rule optional).
pub const SILENCES_PATH: &str = "/api/v1/agent/silences";

/// A pgBackRest stanza name as the backup tasks' `stanza` parameter takes it (the agent checks
/// it, and so does a control-plane backup policy before it sends one): 1 to 64 letters,
/// digits, `-`, `_` or `.`, not starting with `-`, so it can never read as an option.
pub fn stanza_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
/// Records per delivered batch at most.
pub const METRICS_BATCH_ROWS_MAX: usize = 10_000;
/// Bytes of one record's JSON data at most: the control plane refuses a batch holding a larger
/// one, and the agent drops such a record when it is collected (counted as `too_large`).
pub const METRIC_RECORD_BYTES_MAX: usize = 256 * 1024;

/// A batch of buffered metric records, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricsBatch {
    /// The buffer's epoch: `(agent, epoch, seq)` identifies a record for good.
    pub epoch: String,
    pub records: Vec<MetricRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricRecord {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    /// The record's JSON payload, passed through without being parsed.
    pub data: Box<serde_json::value::RawValue>,
}

/// The batch is durably stored (duplicates of earlier deliveries included): the agent may
/// delete everything through `stored_through`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct MetricsAck {
    pub stored_through: i64,
    /// Records that were new (the rest had been delivered before).
    pub new_records: u64,
}

/// `POST /api/v1/agents/enroll`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The one-time enrollment token an admin created.
    pub token: String,
    /// Display name of the agent (host name by default).
    pub name: String,
    /// Chosen by the agent once and reused on retries: a retry of the same enrollment (its
    /// answer was lost) gets the same agent id and a fresh credential instead of a refusal.
    pub enrollment_id: String,
    /// Labels for selectors (`env`, `cluster`, `role`, free keys); absent from older agents.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct EnrollResponse {
    pub agent_id: String,
    /// Secret the agent presents as a bearer token; the control plane keeps only its hash.
    pub credential: String,
}

/// Error body of every refused HTTP request: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// Agent → control plane.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame on every connection.
    Hello {
        protocol_min: u32,
        protocol_max: u32,
        agent_version: String,
        #[serde(default)]
        hostname: String,
        /// Labels from the agent's config (`[labels]`): at each connection they win over
        /// the stored ones for the keys they name. Absent from older agents.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// Sent every heartbeat interval; answered by [`ServerMessage::HeartbeatAck`].
    Heartbeat {
        seq: u64,
        sent_at_ms: i64,
        /// The metrics buffer's health, when the agent has one.
        #[serde(default)]
        buffer: Option<BufferStats>,
    },
    /// Answer to [`ServerMessage::Command`].
    CommandAck {
        id: u64,
        ok: bool,
        #[serde(default)]
        result: Option<CommandResult>,
        #[serde(default)]
        error: Option<WireError>,
    },
    /// Task state changes, oldest first, resent until acked by [`ServerMessage::TaskEventsAck`].
    TaskEvents {
        events: Vec<TaskEvent>,
    },
    Error(WireError),
    #[serde(other)]
    Unknown,
}

/// Control plane → agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to hello: the agreed version and the liveness deadlines both sides apply.
    Welcome {
        protocol_version: u32,
        agent_id: String,
        heartbeat_interval_ms: u64,
        /// A side that hears nothing for this long declares the link dead.
        dead_after_ms: u64,
    },
    HeartbeatAck {
        seq: u64,
        server_time_ms: i64,
    },
    /// A request the agent must answer with [`AgentMessage::CommandAck`] carrying `id`.
    Command {
        id: u64,
        command: Command,
    },
    /// Every task event with `seq <= upto_seq` is stored; the agent may forget them.
    TaskEventsAck {
        upto_seq: i64,
    },
    Error(WireError),
    #[serde(other)]
    Unknown,
}

/// Commands the control plane sends over the channel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Report what the agent is and how long it has run.
    Describe,
    /// Schedule a task (the body mirrors `outpost-agent tasks add`).
    TaskAdd { task: Box<TaskRequest> },
    /// Cancel a task.
    TaskCancel { task_id: String },
    /// Open a terminal session: the agent checks its session limit, answers, then dials
    /// [`TERMINAL_PATH`] for `session_id`, sending `link_secret` in [`LINK_SECRET_HEADER`]
    /// (the proof that it is this agent process, not another process on the host that read
    /// the agent's credential). No PTY exists before that link sends `start`.
    TerminalOpen {
        session_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link_secret: Option<String>,
    },
    #[serde(other)]
    Unknown,
}

/// A task to schedule, as `outpost-agent tasks add` and `POST …/tasks` take it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    pub kind: String,
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub argv: Vec<String>,
    /// RFC 3339.
    #[serde(default)]
    pub at: Option<String>,
    /// humantime delay from now.
    #[serde(default, rename = "in")]
    pub in_: Option<String>,
    #[serde(default)]
    pub every: Option<String>,
    #[serde(default)]
    pub cron: Option<String>,
    /// IANA time zone for `cron` (default UTC).
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// Runs start only inside this window (absent: whenever due). Omitted when absent, so
    /// an agent that predates windows refuses a gated task instead of ignoring its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<TaskWindow>,
    /// A failed run of this task raises the `critical_task_failed` alert.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
}

/// A recurring period a task's runs may start in: a cron start in a time zone and a
/// duration. Through the control plane only `name` is needed (it fills in the rest from the
/// window of that name); on a host every field but the optional ones is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TaskWindow {
    pub name: String,
    /// Five-field cron of the window's starts, e.g. `0 1 * * *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone of `cron` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// How long each occurrence lasts (elapsed time), e.g. `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// No run starts this long before the window ends, e.g. `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<String>,
    /// A run still going this long after the window ended is stopped (absent: it is let
    /// finish, and its record says by how much it overran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
}

/// A task as every interface shows it (local API, control plane API, task events).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct TaskSnapshot {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub schedule: String,
    pub key: String,
    pub created_at: String,
    pub next_run_at: Option<String>,
    pub runs: Vec<RunSnapshot>,
    /// The window its runs start in, by name (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// A failed run raises the `critical_task_failed` alert.
    #[serde(default)]
    pub critical: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct RunSnapshot {
    pub run_id: i64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub status: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    #[serde(default)]
    pub output_bytes: i64,
    #[serde(default)]
    pub output_dropped_bytes: i64,
}

/// Health of an agent's metrics buffer (the `buffer stats --json` shape).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct BufferStats {
    pub epoch: String,
    pub rows: i64,
    pub size_bytes: u64,
    pub oldest_record_age_s: i64,
    pub utilization: f64,
    pub delivery_failures: i64,
    pub dropped_total: std::collections::BTreeMap<String, i64>,
}

/// One change of a task, numbered by the agent's durable outbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskEvent {
    pub seq: i64,
    pub task: TaskSnapshot,
}

/// Results of commands, tagged like [`Command`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandResult {
    Describe {
        agent_version: String,
        hostname: String,
        protocol_version: u32,
        uptime_s: u64,
    },
    Task {
        task: TaskSnapshot,
    },
    /// The agent accepted a terminal session and is dialing its reverse WebSocket.
    TerminalOpened {
        session_id: String,
        /// The agent's configuration asks for keystrokes to be recorded too (absent from
        /// older agents: output only).
        #[serde(default)]
        record_input: bool,
    },
    #[serde(other)]
    Unknown,
}

/// Path prefix of the reverse terminal WebSocket the agent dials for one session:
/// `{TERMINAL_PATH}/{session_id}` (`Authorization: Bearer <agent credential>`).
///
/// Frames on that link:
/// * agent → control plane, binary: 8-byte big-endian byte offset, then PTY output starting
///   at that offset (at most [`TERMINAL_CHUNK_BYTES_MAX`]);
/// * agent → control plane, text: [`TerminalFromAgent`];
/// * control plane → agent, binary: keyboard input for the PTY;
/// * control plane → agent, text: [`TerminalToAgent`].
pub const TERMINAL_PATH: &str = "/api/v1/agent/terminal";
/// Largest PTY output chunk in one frame.
pub const TERMINAL_CHUNK_BYTES_MAX: usize = 256 * 1024;

/// The header carrying a terminal session's link secret when the agent dials its link.
pub const LINK_SECRET_HEADER: &str = "x-outpost-link-secret";

/// Control plane → agent on the reverse terminal link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TerminalToAgent {
    /// Start (or resume) output at byte offset `from`; spawns the PTY at `cols`×`rows` if it
    /// does not exist yet. Sent once per link, after a browser attached.
    Start {
        cols: u16,
        rows: u16,
        from: u64,
    },
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Tear the session down (the user closed it, or it timed out).
    Close {
        reason: String,
    },
    /// Liveness while nothing else flows; answered by [`TerminalFromAgent::Pong`].
    Ping,
    /// The next input frame (binary data, `resize` or `close`) is the session's input number
    /// `n` (from 1, increasing). An agent applies an input at most once: one whose number is
    /// not above the last it applied is dropped, whichever link or replica sends it again.
    /// Input without a number (an older control plane) is applied as it comes.
    Seq {
        n: u64,
    },
    #[serde(other)]
    Unknown,
}

/// Agent → control plane on the reverse terminal link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TerminalFromAgent {
    /// Output `from..to` was overwritten before it could be sent (the link was down or slow
    /// for longer than the agent's output ring holds).
    Skipped {
        from: u64,
        to: u64,
    },
    /// psql ended (or was torn down); no output follows `end`.
    Closed {
        reason: String,
        end: u64,
    },
    Pong,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    UnsupportedVersion,
    UnknownMessage,
    UnknownCommand,
    Malformed,
    /// The first frame was not a hello, or a hello came twice.
    ProtocolViolation,
    /// Another connection of the same agent took over; this one is closed.
    Replaced,
    /// The request was understood and refused (bad input, duplicate, unknown task).
    Refused,
    /// The agent cannot do it now (its task runtime is not running).
    Unavailable,
    /// A limit was reached (terminal sessions per agent).
    LimitReached,
    #[serde(other)]
    Other,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// The id an agent gives the task with `key`: the same key always gives the same id, so a
/// sender that lost the answer knows which task its request made (a second request with the
/// key is refused as a duplicate of it).
pub fn task_id(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("t_{hex}")
}

#[cfg(test)]
mod tests {
    use super::{AgentMessage, Command, ErrorCode, ServerMessage, negotiate};

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 2), (3, 4)), None);
        assert_eq!(negotiate((3, 4), (1, 2)), None);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let msg: AgentMessage = serde_json::from_str(
            r#"{"type":"heartbeat","seq":4,"sent_at_ms":10,"cpu":"new field"}"#,
        )
        .expect("extra field must not break decoding");
        assert_eq!(
            msg,
            AgentMessage::Heartbeat {
                seq: 4,
                sent_at_ms: 10,
                buffer: None
            }
        );
    }

    #[test]
    fn unknown_kinds_decode_to_unknown() {
        let msg: ServerMessage =
            serde_json::from_str(r#"{"type":"teleport","to":"mars"}"#).expect("decodes");
        assert_eq!(msg, ServerMessage::Unknown);
        let msg: ServerMessage =
            serde_json::from_str(r#"{"type":"command","id":9,"command":{"kind":"fly"}}"#)
                .expect("decodes");
        assert_eq!(
            msg,
            ServerMessage::Command {
                id: 9,
                command: Command::Unknown
            }
        );
        let code: ErrorCode = serde_json::from_str(r#""brand_new""#).expect("decodes");
        assert_eq!(code, ErrorCode::Other);
    }

    #[test]
    fn hello_without_optional_fields_decodes() {
        let msg: AgentMessage = serde_json::from_str(
            r#"{"type":"hello","protocol_min":1,"protocol_max":1,"agent_version":"0.1.0"}"#,
        )
        .expect("decodes");
        assert!(matches!(msg, AgentMessage::Hello { hostname, .. } if hostname.is_empty()));
    }

    #[test]
    fn wire_shape_is_stable() {
        let json = serde_json::to_string(&ServerMessage::Welcome {
            protocol_version: 1,
            agent_id: "a1".into(),
            heartbeat_interval_ms: 5000,
            dead_after_ms: 15000,
        })
        .expect("encodes");
        assert_eq!(
            json,
            r#"{"type":"welcome","protocol_version":1,"agent_id":"a1","heartbeat_interval_ms":5000,"dead_after_ms":15000}"#
        );
    }
}
