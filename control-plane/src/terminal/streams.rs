//! Where terminal sessions live between the browser handler and the agent handler: session
//! records, the output stream (byte offsets, capped), the input stream and the open-request
//! relay. Redis Streams when `--redis-url` is given (any replica may hold either side), an
//! in-process store otherwise (one replica). Both behind [`Streams`], both tested.
//!
//! Output entries are keyed by byte offset: a data chunk `offset..end` has stream id `end-0`,
//! a skipped range `from..to` has id `to-0`, and the closing entry has id `end-1`. Reading
//! "after offset N" is then `XREAD … STREAMS key N-0`, and trimming to the cap is
//! `XADD … MINID end-cap`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use world::World;

use super::resp::{RedisTarget, RespConn, RespError, Value};

/// Input events kept per session (a browser typing into a session with no agent attached).
const INPUT_ENTRIES_MAX: usize = 4096;
/// Redis connections kept idle for reuse.
const IDLE_CONNECTIONS_MAX: usize = 32;
/// Entries per read.
const READ_ENTRIES_MAX: usize = 256;
const KEY_PREFIX: &str = "outpost:term:";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutEntry {
    Data { offset: u64, bytes: Vec<u8> },
    Skipped { from: u64, to: u64 },
    Closed { end: u64, reason: String },
}

impl OutEntry {
    /// The stream position just after this entry: what the next read continues from.
    pub fn end(&self) -> u64 {
        match self {
            OutEntry::Data { offset, bytes } => offset + bytes.len() as u64,
            OutEntry::Skipped { to, .. } => *to,
            OutEntry::Closed { end, .. } => *end,
        }
    }

    fn id(&self) -> (u64, u64) {
        match self {
            OutEntry::Closed { end, .. } => (*end, 1),
            other => (other.end(), 0),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InEvent {
    Data(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A browser attached (its window size); the first one starts the PTY.
    Attach {
        cols: u16,
        rows: u16,
    },
    Close {
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Created; waiting for the agent's link and a browser.
    Pending,
    /// The PTY runs and the agent's link is attached.
    Live,
    /// The agent's link dropped; the PTY waits for the reconnect window.
    Reconnecting,
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pending => "pending",
            SessionState::Live => "live",
            SessionState::Reconnecting => "reconnecting",
            SessionState::Closed => "closed",
        }
    }

    fn parse(s: &str) -> SessionState {
        match s {
            "live" => SessionState::Live,
            "reconnecting" => SessionState::Reconnecting,
            "closed" => SessionState::Closed,
            _ => SessionState::Pending,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionMeta {
    pub agent_id: String,
    pub user_id: String,
    pub username: String,
    pub state: SessionState,
    pub created_ms: i64,
    /// When `state` last changed.
    pub changed_ms: i64,
    /// Whether the agent's PTY was started (a reattaching link resumes instead of waiting).
    pub started: bool,
    /// Why it closed.
    pub reason: String,
    /// Id of the last input entry forwarded to the agent.
    pub input_cursor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error("terminal stream store unavailable: {0}")]
    Unavailable(String),
    #[error("terminal session limit reached ({0} sessions on this control plane)")]
    LimitReached(usize),
}

impl From<RespError> for StreamsError {
    fn from(e: RespError) -> StreamsError {
        StreamsError::Unavailable(e.to_string())
    }
}

type Result<T> = std::result::Result<T, StreamsError>;

/// A request to open a session on an agent whose control channel may be on another replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    pub session_id: String,
    pub agent_id: String,
}

/// The terminal stream store.
#[derive(Clone)]
pub enum Streams {
    Memory(Arc<MemoryStreams>),
    Redis(Arc<RedisStreams>),
}

impl Streams {
    pub fn memory() -> Streams {
        Streams::Memory(Arc::new(MemoryStreams::default()))
    }

    pub fn redis(world: World, url: &str) -> std::result::Result<Streams, RespError> {
        Ok(Streams::Redis(Arc::new(RedisStreams {
            world,
            target: RedisTarget::parse(url)?,
            idle: Mutex::new(Vec::new()),
        })))
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Streams::Memory(_) => "memory",
            Streams::Redis(_) => "redis",
        }
    }

    /// Whether sessions can be relayed to agents on other replicas.
    pub fn is_shared(&self) -> bool {
        matches!(self, Streams::Redis(_))
    }

    /// Record a new session unless `live_max` sessions are live already.
    pub async fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        match self {
            Streams::Memory(m) => m.create(id, meta, live_max),
            Streams::Redis(r) => r.create(id, meta, live_max).await,
        }
    }

    pub async fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        match self {
            Streams::Memory(m) => m.with(|s| Ok(s.sessions.get(id).map(|x| x.meta.clone()))),
            Streams::Redis(r) => r.meta(id).await,
        }
    }

    /// Change a live session's record (never reopens a closed one).
    pub async fn update(
        &self,
        id: &str,
        now_ms: i64,
        f: impl FnOnce(&mut SessionMeta) + Send,
    ) -> Result<()> {
        match self {
            Streams::Memory(m) => m.with(|s| {
                if let Some(x) = s.sessions.get_mut(id)
                    && x.meta.state != SessionState::Closed
                {
                    let before = x.meta.state;
                    f(&mut x.meta);
                    if x.meta.state != before {
                        x.meta.changed_ms = now_ms;
                    }
                }
                Ok(())
            }),
            Streams::Redis(r) => r.update(id, now_ms, f).await,
        }
    }

    /// The offset after the newest output entry (0 when there is none).
    pub async fn output_end(&self, id: &str) -> Result<u64> {
        match self {
            Streams::Memory(m) => m.with(|s| {
                Ok(s.sessions
                    .get(id)
                    .and_then(|x| x.out.back())
                    .map_or(0, OutEntry::end))
            }),
            Streams::Redis(r) => r.output_end(id).await,
        }
    }

    /// Append output entries (in order, one round trip) and trim the stream to about
    /// `bytes_max` bytes.
    pub async fn append_output(&self, id: &str, batch: &[OutEntry], bytes_max: u64) -> Result<()> {
        match self {
            Streams::Memory(m) => {
                for entry in batch {
                    m.append_output(id, entry.clone(), bytes_max)?;
                }
                Ok(())
            }
            Streams::Redis(r) => r.append_output(id, batch, bytes_max).await,
        }
    }

    /// Output entries that end after `after`, waiting up to `block` for one to appear.
    pub async fn read_output(
        &self,
        id: &str,
        after: u64,
        block: Duration,
    ) -> Result<Vec<OutEntry>> {
        match self {
            Streams::Memory(m) => m.read_output(id, after, block).await,
            Streams::Redis(r) => r.read_output(id, after, block).await,
        }
    }

    pub async fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        match self {
            Streams::Memory(m) => m.append_input(id, event),
            Streams::Redis(r) => r.append_input(id, event).await,
        }
    }

    /// Input entries after `cursor` (`""` = from the start), waiting up to `block`.
    pub async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<(String, InEvent)>> {
        match self {
            Streams::Memory(m) => m.read_input(id, cursor, block).await,
            Streams::Redis(r) => r.read_input(id, cursor, block).await,
        }
    }

    /// Mark the session closed, free its slot and let its streams expire after `keep`.
    /// `true` when this call closed it (exactly one caller learns that, across replicas).
    pub async fn finish(
        &self,
        id: &str,
        now_ms: i64,
        reason: &str,
        keep: Duration,
    ) -> Result<bool> {
        match self {
            Streams::Memory(m) => m.finish(id, now_ms, reason, keep),
            Streams::Redis(r) => r.finish(id, now_ms, reason, keep).await,
        }
    }

    /// Ids of sessions not closed, with their agent.
    pub async fn live(&self) -> Result<Vec<(String, String)>> {
        match self {
            Streams::Memory(m) => m.with(|s| {
                Ok(s.sessions
                    .iter()
                    .filter(|(_, x)| x.meta.state != SessionState::Closed)
                    .map(|(id, x)| (id.clone(), x.meta.agent_id.clone()))
                    .collect())
            }),
            Streams::Redis(r) => r.live().await,
        }
    }

    /// Ask whichever replica holds the agent's channel to open the session (shared stores).
    pub async fn request_open(&self, request: &OpenRequest) -> Result<()> {
        match self {
            Streams::Memory(_) => Err(StreamsError::Unavailable(
                "the in-process store cannot reach other replicas".into(),
            )),
            Streams::Redis(r) => r.request_open(request).await,
        }
    }

    /// Open requests after `cursor` (`"$"` = only new ones). Returns the new cursor.
    /// Where a relay starts reading open requests: after the newest one already stored. (A
    /// cursor of `$` would miss requests added between two reads.)
    pub async fn requests_tail(&self) -> Result<String> {
        match self {
            Streams::Memory(_) => Ok("0-0".to_string()),
            Streams::Redis(r) => r.requests_tail().await,
        }
    }

    pub async fn read_requests(
        &self,
        cursor: &str,
        block: Duration,
    ) -> Result<(String, Vec<OpenRequest>)> {
        match self {
            Streams::Memory(_) => {
                tokio::time::sleep(block).await;
                Ok((cursor.to_string(), Vec::new()))
            }
            Streams::Redis(r) => r.read_requests(cursor, block).await,
        }
    }

    /// The answer of the replica that handled an open request (`Ok` or the refusal).
    pub async fn reply_open(
        &self,
        id: &str,
        answer: std::result::Result<(), String>,
    ) -> Result<()> {
        match self {
            Streams::Memory(_) => Ok(()),
            Streams::Redis(r) => r.reply_open(id, answer).await,
        }
    }

    /// Wait up to `timeout` for the answer to an open request; `None` when nobody answered.
    pub async fn wait_open_reply(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<std::result::Result<(), String>>> {
        match self {
            Streams::Memory(_) => Ok(None),
            Streams::Redis(r) => r.wait_open_reply(id, timeout).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// In-process store (the embedded default; single replica).

struct MemSession {
    meta: SessionMeta,
    out: VecDeque<OutEntry>,
    input: VecDeque<(u64, InEvent)>,
    next_input: u64,
    out_changed: Arc<Notify>,
    in_changed: Arc<Notify>,
    expires_at: Option<Instant>,
}

#[derive(Default)]
struct MemState {
    sessions: BTreeMap<String, MemSession>,
    /// Set by the simulator to model a store outage: every call fails while it is set.
    outage: bool,
}

/// The in-process store: bounded like the Redis one (capped output, capped input), closed
/// sessions expire after their keep time.
#[derive(Default)]
pub struct MemoryStreams {
    state: Mutex<MemState>,
}

impl MemoryStreams {
    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> Result<T>) -> Result<T> {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.outage {
            return Err(StreamsError::Unavailable("store outage".into()));
        }
        let now = Instant::now();
        guard
            .sessions
            .retain(|_, s| s.expires_at.is_none_or(|at| at > now));
        f(&mut guard)
    }

    /// Fault injection for the simulator: while `down`, every operation fails.
    pub fn set_outage(&self, down: bool) {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.outage = down;
        for s in guard.sessions.values() {
            s.out_changed.notify_waiters();
            s.in_changed.notify_waiters();
        }
    }

    fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        self.with(|s| {
            let live = s
                .sessions
                .values()
                .filter(|x| x.meta.state != SessionState::Closed)
                .count();
            if live >= live_max {
                return Err(StreamsError::LimitReached(live_max));
            }
            s.sessions.insert(
                id.to_string(),
                MemSession {
                    meta: meta.clone(),
                    out: VecDeque::new(),
                    input: VecDeque::new(),
                    next_input: 1,
                    out_changed: Arc::new(Notify::new()),
                    in_changed: Arc::new(Notify::new()),
                    expires_at: None,
                },
            );
            Ok(())
        })
    }

    fn append_output(&self, id: &str, entry: OutEntry, bytes_max: u64) -> Result<()> {
        self.with(|s| {
            let Some(x) = s.sessions.get_mut(id) else {
                return Ok(());
            };
            if x.out.back().is_some_and(|last| last.id() >= entry.id()) {
                return Ok(());
            }
            let min_end = entry.end().saturating_sub(bytes_max);
            x.out.push_back(entry);
            while x.out.front().is_some_and(|e| e.end() < min_end) {
                x.out.pop_front();
            }
            x.out_changed.notify_waiters();
            Ok(())
        })
    }

    /// Wait up to `block` for `read` to find something in session `id`, woken by the
    /// session's `notify_of` notifier.
    async fn read_blocking<T>(
        &self,
        id: &str,
        block: Duration,
        notify_of: fn(&MemSession) -> &Arc<Notify>,
        read: impl Fn(&MemSession) -> Vec<T>,
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + block;
        loop {
            let notify = self.with(|s| Ok(s.sessions.get(id).map(|x| Arc::clone(notify_of(x)))))?;
            let Some(notify) = notify else {
                return Ok(Vec::new());
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before reading, so an append in between still wakes us.
            notified.as_mut().enable();
            let found = self.with(|s| Ok(s.sessions.get(id).map(&read).unwrap_or_default()))?;
            if !found.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    async fn read_output(&self, id: &str, after: u64, block: Duration) -> Result<Vec<OutEntry>> {
        self.read_blocking(
            id,
            block,
            |x| &x.out_changed,
            |x| {
                x.out
                    .iter()
                    .filter(|e| e.id() > (after, 0))
                    .take(READ_ENTRIES_MAX)
                    .cloned()
                    .collect()
            },
        )
        .await
    }

    fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        self.with(|s| {
            let Some(x) = s.sessions.get_mut(id) else {
                return Ok(());
            };
            let n = x.next_input;
            x.next_input += 1;
            x.input.push_back((n, event));
            while x.input.len() > INPUT_ENTRIES_MAX {
                x.input.pop_front();
            }
            x.in_changed.notify_waiters();
            Ok(())
        })
    }

    async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<(String, InEvent)>> {
        let after: u64 = cursor.parse().unwrap_or(0);
        self.read_blocking(
            id,
            block,
            |x| &x.in_changed,
            |x| {
                x.input
                    .iter()
                    .filter(|(n, _)| *n > after)
                    .take(READ_ENTRIES_MAX)
                    .map(|(n, e)| (n.to_string(), e.clone()))
                    .collect()
            },
        )
        .await
    }

    fn finish(&self, id: &str, now_ms: i64, reason: &str, keep: Duration) -> Result<bool> {
        self.with(|s| {
            let mut closed_now = false;
            if let Some(x) = s.sessions.get_mut(id) {
                if x.meta.state != SessionState::Closed {
                    x.meta.state = SessionState::Closed;
                    x.meta.changed_ms = now_ms;
                    x.meta.reason = reason.to_string();
                    closed_now = true;
                }
                x.expires_at = Some(Instant::now() + keep);
                x.out_changed.notify_waiters();
                x.in_changed.notify_waiters();
            }
            Ok(closed_now)
        })
    }
}

// ---------------------------------------------------------------------------------------
// Redis.

/// Per-call deadline on top of any blocking time.
const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisStreams {
    world: World,
    target: RedisTarget,
    idle: Mutex<Vec<RespConn>>,
}

fn key(id: &str, part: &str) -> String {
    format!("{KEY_PREFIX}{id}:{part}")
}

fn field<'a>(fields: &'a [Value], name: &[u8]) -> Option<&'a [u8]> {
    fields.chunks(2).find_map(|pair| match pair {
        [Value::Bulk(k), Value::Bulk(v)] if k.as_slice() == name => Some(v.as_slice()),
        _ => None,
    })
}

fn text(bytes: Option<&[u8]>) -> String {
    bytes
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn number<T: std::str::FromStr + Default>(bytes: Option<&[u8]>) -> T {
    text(bytes).parse().unwrap_or_default()
}

fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(id).ok()?;
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `[[id, [k, v, …]], …]` of one stream in an XREAD/XRANGE reply, taken apart without copying.
fn entries(value: Value) -> Vec<(Vec<u8>, Vec<Value>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| match item {
            Value::Array(pair) => {
                let mut pair = pair.into_iter();
                match (pair.next(), pair.next()) {
                    (Some(Value::Bulk(id)), Some(Value::Array(fields))) => Some((id, fields)),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// The entries of the single stream in an XREAD reply (`Nil` when it timed out).
fn xread_entries(value: Value) -> Vec<(Vec<u8>, Vec<Value>)> {
    match value {
        Value::Array(streams) => match streams.into_iter().next() {
            Some(Value::Array(pair)) => pair.into_iter().nth(1).map(entries).unwrap_or_default(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Move the bulk value of field `name` out of `fields`.
fn take_field(fields: &mut [Value], name: &[u8]) -> Option<Vec<u8>> {
    let at = fields
        .chunks(2)
        .position(|pair| matches!(pair, [Value::Bulk(k), _] if k.as_slice() == name))?;
    match std::mem::replace(&mut fields[at * 2 + 1], Value::Nil) {
        Value::Bulk(v) => Some(v),
        _ => None,
    }
}

fn out_entry(id: &[u8], mut fields: Vec<Value>) -> Option<OutEntry> {
    let (end, seq) = parse_id(id)?;
    if seq == 1 {
        return Some(OutEntry::Closed {
            end,
            reason: text(field(&fields, b"closed")),
        });
    }
    if let Some(from) = field(&fields, b"skip") {
        return Some(OutEntry::Skipped {
            from: number(Some(from)),
            to: end,
        });
    }
    Some(OutEntry::Data {
        offset: number(field(&fields, b"o")),
        bytes: take_field(&mut fields, b"d")?,
    })
}

fn in_event(fields: &[Value]) -> Option<InEvent> {
    let cols = || number(field(fields, b"c"));
    let rows = || number(field(fields, b"r"));
    Some(match field(fields, b"k")? {
        b"data" => InEvent::Data(field(fields, b"d")?.to_vec()),
        b"resize" => InEvent::Resize {
            cols: cols(),
            rows: rows(),
        },
        b"attach" => InEvent::Attach {
            cols: cols(),
            rows: rows(),
        },
        b"close" => InEvent::Close {
            reason: text(field(fields, b"d")),
        },
        _ => return None,
    })
}

impl RedisStreams {
    async fn conn(&self) -> Result<RespConn> {
        let reused = match self.idle.lock() {
            Ok(mut g) => g.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        match reused {
            Some(c) => Ok(c),
            None => Ok(RespConn::connect(&self.world, &self.target, REDIS_CALL_TIMEOUT).await?),
        }
    }

    fn put_back(&self, conn: RespConn) {
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if idle.len() < IDLE_CONNECTIONS_MAX {
            idle.push(conn);
        }
    }

    /// Run commands on a pooled connection; a connection that failed is not reused.
    async fn run(&self, commands: &[Vec<&[u8]>], block: Duration) -> Result<Vec<Value>> {
        let mut conn = self.conn().await?;
        let replies = conn.pipeline(commands, block + REDIS_CALL_TIMEOUT).await?;
        self.put_back(conn);
        for (reply, command) in replies.iter().zip(commands) {
            if let Value::Error(message) = reply {
                return Err(StreamsError::Unavailable(format!(
                    "redis refused {}: {message}",
                    String::from_utf8_lossy(command.first().copied().unwrap_or_default())
                )));
            }
        }
        Ok(replies)
    }

    async fn one(&self, command: Vec<&[u8]>, block: Duration) -> Result<Value> {
        let mut replies = self.run(&[command], block).await?;
        Ok(replies.pop().unwrap_or(Value::Nil))
    }

    fn meta_fields(meta: &SessionMeta) -> Vec<(&'static str, String)> {
        vec![
            ("agent_id", meta.agent_id.clone()),
            ("user_id", meta.user_id.clone()),
            ("username", meta.username.clone()),
            ("state", meta.state.as_str().to_string()),
            ("created_ms", meta.created_ms.to_string()),
            ("changed_ms", meta.changed_ms.to_string()),
            ("started", u8::from(meta.started).to_string()),
            ("reason", meta.reason.clone()),
            ("input_cursor", meta.input_cursor.clone()),
        ]
    }

    async fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        let live_key = format!("{KEY_PREFIX}live");
        // The count and the add are two steps: replicas racing at the limit may overshoot
        // by the number of replicas, never more.
        let live = match self
            .one(vec![b"SCARD", live_key.as_bytes()], Duration::ZERO)
            .await?
        {
            Value::Int(n) => usize::try_from(n).unwrap_or(usize::MAX),
            _ => 0,
        };
        if live >= live_max {
            // Sessions whose record expired (a replica died before finishing them) free
            // their slot here.
            self.prune_live().await?;
            let live = self.live().await?.len();
            if live >= live_max {
                return Err(StreamsError::LimitReached(live_max));
            }
        }
        self.write_meta(id, meta).await?;
        self.one(
            vec![b"SADD", live_key.as_bytes(), id.as_bytes()],
            Duration::ZERO,
        )
        .await?;
        Ok(())
    }

    async fn write_meta(&self, id: &str, meta: &SessionMeta) -> Result<()> {
        let meta_key = key(id, "meta");
        let fields = Self::meta_fields(meta);
        let mut cmd: Vec<&[u8]> = vec![b"HSET", meta_key.as_bytes()];
        for (k, v) in &fields {
            cmd.push(k.as_bytes());
            cmd.push(v.as_bytes());
        }
        self.one(cmd, Duration::ZERO).await?;
        Ok(())
    }

    async fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        let meta_key = key(id, "meta");
        let Value::Array(fields) = self
            .one(vec![b"HGETALL", meta_key.as_bytes()], Duration::ZERO)
            .await?
        else {
            return Ok(None);
        };
        if fields.is_empty() {
            return Ok(None);
        }
        let f = |name: &str| field(&fields, name.as_bytes());
        Ok(Some(SessionMeta {
            agent_id: text(f("agent_id")),
            user_id: text(f("user_id")),
            username: text(f("username")),
            state: SessionState::parse(&text(f("state"))),
            created_ms: number(f("created_ms")),
            changed_ms: number(f("changed_ms")),
            started: text(f("started")) == "1",
            reason: text(f("reason")),
            input_cursor: text(f("input_cursor")),
        }))
    }

    async fn update(
        &self,
        id: &str,
        now_ms: i64,
        f: impl FnOnce(&mut SessionMeta) + Send,
    ) -> Result<()> {
        let Some(mut meta) = self.meta(id).await? else {
            return Ok(());
        };
        if meta.state == SessionState::Closed {
            return Ok(());
        }
        let before = meta.state;
        f(&mut meta);
        if meta.state != before {
            meta.changed_ms = now_ms;
        }
        self.write_meta(id, &meta).await
    }

    async fn output_end(&self, id: &str) -> Result<u64> {
        let out_key = key(id, "out");
        let last = self
            .one(
                vec![b"XREVRANGE", out_key.as_bytes(), b"+", b"-", b"COUNT", b"1"],
                Duration::ZERO,
            )
            .await?;
        Ok(entries(last)
            .first()
            .and_then(|(id, _)| parse_id(id))
            .map_or(0, |(end, _)| end))
    }

    async fn append_output(&self, id: &str, batch: &[OutEntry], bytes_max: u64) -> Result<()> {
        let out_key = key(id, "out");
        // Strings the commands borrow: per entry its id, trim point and one number.
        let texts: Vec<(String, String, String)> = batch
            .iter()
            .map(|entry| {
                let (end, seq) = entry.id();
                let number = match entry {
                    OutEntry::Data { offset, .. } => offset.to_string(),
                    OutEntry::Skipped { from, .. } => from.to_string(),
                    OutEntry::Closed { .. } => String::new(),
                };
                (
                    format!("{end}-{seq}"),
                    end.saturating_sub(bytes_max).to_string(),
                    number,
                )
            })
            .collect();
        let commands: Vec<Vec<&[u8]>> = batch
            .iter()
            .zip(&texts)
            .map(|(entry, (entry_id, min_id, number))| {
                let mut cmd: Vec<&[u8]> = vec![
                    b"XADD",
                    out_key.as_bytes(),
                    b"MINID",
                    min_id.as_bytes(),
                    entry_id.as_bytes(),
                ];
                match entry {
                    OutEntry::Data { bytes, .. } => {
                        cmd.extend([b"o".as_slice(), number.as_bytes(), b"d", bytes.as_slice()])
                    }
                    OutEntry::Skipped { .. } => cmd.extend([b"skip".as_slice(), number.as_bytes()]),
                    OutEntry::Closed { reason, .. } => {
                        cmd.extend([b"closed".as_slice(), reason.as_bytes()])
                    }
                }
                cmd
            })
            .collect();
        // One round trip for the whole batch.
        let mut conn = self.conn().await?;
        let replies = conn.pipeline(&commands, REDIS_CALL_TIMEOUT).await?;
        self.put_back(conn);
        for reply in replies {
            match reply {
                // An id at or below the top: this chunk was written before (a resent frame).
                Value::Error(e) if e.contains("equal or smaller") => {}
                Value::Error(e) => {
                    return Err(StreamsError::Unavailable(format!(
                        "redis refused XADD: {e}"
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn read_output(&self, id: &str, after: u64, block: Duration) -> Result<Vec<OutEntry>> {
        let out_key = key(id, "out");
        let from = format!("{after}-0");
        let count = READ_ENTRIES_MAX.to_string();
        let block_ms = block.as_millis().max(1).to_string();
        let reply = self
            .one(
                vec![
                    b"XREAD",
                    b"COUNT",
                    count.as_bytes(),
                    b"BLOCK",
                    block_ms.as_bytes(),
                    b"STREAMS",
                    out_key.as_bytes(),
                    from.as_bytes(),
                ],
                block,
            )
            .await?;
        Ok(xread_entries(reply)
            .into_iter()
            .filter_map(|(id, fields)| out_entry(&id, fields))
            .collect())
    }

    async fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        let in_key = key(id, "in");
        let cap = INPUT_ENTRIES_MAX.to_string();
        let (c, r);
        let mut cmd: Vec<&[u8]> = vec![
            b"XADD",
            in_key.as_bytes(),
            b"MAXLEN",
            b"~",
            cap.as_bytes(),
            b"*",
        ];
        match &event {
            InEvent::Data(d) => cmd.extend([b"k".as_slice(), b"data", b"d", d.as_slice()]),
            InEvent::Resize { cols, rows } | InEvent::Attach { cols, rows } => {
                let kind: &[u8] = if matches!(event, InEvent::Resize { .. }) {
                    b"resize"
                } else {
                    b"attach"
                };
                c = cols.to_string();
                r = rows.to_string();
                cmd.extend([
                    b"k".as_slice(),
                    kind,
                    b"c",
                    c.as_bytes(),
                    b"r",
                    r.as_bytes(),
                ]);
            }
            InEvent::Close { reason } => {
                cmd.extend([b"k".as_slice(), b"close", b"d", reason.as_bytes()])
            }
        }
        self.one(cmd, Duration::ZERO).await?;
        Ok(())
    }

    async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<(String, InEvent)>> {
        let in_key = key(id, "in");
        let from = if cursor.is_empty() { "0-0" } else { cursor };
        let count = READ_ENTRIES_MAX.to_string();
        let block_ms = block.as_millis().max(1).to_string();
        let reply = self
            .one(
                vec![
                    b"XREAD",
                    b"COUNT",
                    count.as_bytes(),
                    b"BLOCK",
                    block_ms.as_bytes(),
                    b"STREAMS",
                    in_key.as_bytes(),
                    from.as_bytes(),
                ],
                block,
            )
            .await?;
        Ok(xread_entries(reply)
            .into_iter()
            .filter_map(|(id, fields)| {
                Some((
                    String::from_utf8_lossy(&id).into_owned(),
                    in_event(&fields)?,
                ))
            })
            .collect())
    }

    async fn finish(&self, id: &str, now_ms: i64, reason: &str, keep: Duration) -> Result<bool> {
        let live_key = format!("{KEY_PREFIX}live");
        let (meta_key, out_key, in_key, reply_key) = (
            key(id, "meta"),
            key(id, "out"),
            key(id, "in"),
            key(id, "reply"),
        );
        let state = SessionState::Closed.as_str();
        let now = now_ms.to_string();
        let keep_s = keep.as_secs().max(1).to_string();
        self.run(
            &[
                vec![
                    b"HSET",
                    meta_key.as_bytes(),
                    b"state",
                    state.as_bytes(),
                    b"changed_ms",
                    now.as_bytes(),
                    b"reason",
                    reason.as_bytes(),
                ],
                vec![b"SREM", live_key.as_bytes(), id.as_bytes()],
                vec![b"EXPIRE", meta_key.as_bytes(), keep_s.as_bytes()],
                vec![b"EXPIRE", out_key.as_bytes(), keep_s.as_bytes()],
                vec![b"EXPIRE", in_key.as_bytes(), keep_s.as_bytes()],
                vec![b"EXPIRE", reply_key.as_bytes(), keep_s.as_bytes()],
            ],
            Duration::ZERO,
        )
        .await
        // The live set holds open sessions: whoever removes the id closed the session.
        .map(|replies| matches!(replies.get(1), Some(Value::Int(1))))
    }

    async fn live(&self) -> Result<Vec<(String, String)>> {
        let live_key = format!("{KEY_PREFIX}live");
        let Value::Array(ids) = self
            .one(vec![b"SMEMBERS", live_key.as_bytes()], Duration::ZERO)
            .await?
        else {
            return Ok(Vec::new());
        };
        let mut out = BTreeSet::new();
        for id in ids {
            if let Value::Bulk(id) = id {
                let id = String::from_utf8_lossy(&id).into_owned();
                if let Some(meta) = self.meta(&id).await?
                    && meta.state != SessionState::Closed
                {
                    out.insert((id, meta.agent_id));
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Remove ids from the live set whose record is gone or closed.
    async fn prune_live(&self) -> Result<()> {
        let live_key = format!("{KEY_PREFIX}live");
        let Value::Array(ids) = self
            .one(vec![b"SMEMBERS", live_key.as_bytes()], Duration::ZERO)
            .await?
        else {
            return Ok(());
        };
        for id in ids {
            if let Value::Bulk(id) = id {
                let sid = String::from_utf8_lossy(&id).into_owned();
                let gone = self
                    .meta(&sid)
                    .await?
                    .is_none_or(|m| m.state == SessionState::Closed);
                if gone {
                    self.one(vec![b"SREM", live_key.as_bytes(), &id], Duration::ZERO)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn request_open(&self, request: &OpenRequest) -> Result<()> {
        let requests_key = format!("{KEY_PREFIX}requests");
        self.one(
            vec![
                b"XADD",
                requests_key.as_bytes(),
                b"MAXLEN",
                b"~",
                b"1000",
                b"*",
                b"s",
                request.session_id.as_bytes(),
                b"a",
                request.agent_id.as_bytes(),
            ],
            Duration::ZERO,
        )
        .await?;
        Ok(())
    }

    async fn requests_tail(&self) -> Result<String> {
        let requests_key = format!("{KEY_PREFIX}requests");
        let reply = self
            .one(
                vec![
                    b"XREVRANGE",
                    requests_key.as_bytes(),
                    b"+",
                    b"-",
                    b"COUNT",
                    b"1",
                ],
                Duration::ZERO,
            )
            .await?;
        Ok(entries(reply)
            .first()
            .map_or_else(|| "0-0".to_string(), |(id, _)| text(Some(id))))
    }

    async fn read_requests(
        &self,
        cursor: &str,
        block: Duration,
    ) -> Result<(String, Vec<OpenRequest>)> {
        let requests_key = format!("{KEY_PREFIX}requests");
        let block_ms = block.as_millis().max(1).to_string();
        let reply = self
            .one(
                vec![
                    b"XREAD",
                    b"COUNT",
                    b"100",
                    b"BLOCK",
                    block_ms.as_bytes(),
                    b"STREAMS",
                    requests_key.as_bytes(),
                    cursor.as_bytes(),
                ],
                block,
            )
            .await?;
        let found = xread_entries(reply);
        let next = found
            .last()
            .map(|(id, _)| String::from_utf8_lossy(id).into_owned())
            .unwrap_or_else(|| cursor.to_string());
        let requests = found
            .iter()
            .map(|(_, fields)| OpenRequest {
                session_id: text(field(fields, b"s")),
                agent_id: text(field(fields, b"a")),
            })
            .collect();
        Ok((next, requests))
    }

    async fn reply_open(&self, id: &str, answer: std::result::Result<(), String>) -> Result<()> {
        let reply_key = key(id, "reply");
        let (ok, error): (&[u8], String) = match answer {
            Ok(()) => (b"1", String::new()),
            Err(e) => (b"0", e),
        };
        self.run(
            &[
                vec![
                    b"XADD",
                    reply_key.as_bytes(),
                    b"*",
                    b"ok",
                    ok,
                    b"error",
                    error.as_bytes(),
                ],
                vec![b"EXPIRE", reply_key.as_bytes(), b"600"],
            ],
            Duration::ZERO,
        )
        .await?;
        Ok(())
    }

    async fn wait_open_reply(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<std::result::Result<(), String>>> {
        let reply_key = key(id, "reply");
        let block_ms = timeout.as_millis().max(1).to_string();
        let reply = self
            .one(
                vec![
                    b"XREAD",
                    b"COUNT",
                    b"1",
                    b"BLOCK",
                    block_ms.as_bytes(),
                    b"STREAMS",
                    reply_key.as_bytes(),
                    b"0-0",
                ],
                timeout,
            )
            .await?;
        Ok(xread_entries(reply).first().map(|(_, fields)| {
            if field(fields, b"ok") == Some(b"1") {
                Ok(())
            } else {
                Err(text(field(fields, b"error")))
            }
        }))
    }
}
