//! The Redis store: Redis Streams through the `redis` crate over `world` streams (so it runs
//! under the simulator and over `world::tls` for `rediss://`).
//!
//! Connections: one shared multiplexed connection for every short command (pipelined, 5 s per
//! reply), and a small pool of dedicated ones for blocking `XREAD`s, which would otherwise stall
//! every command queued behind them; each of those waits for its block time plus 5 s. A
//! connection that failed is dropped and dialed again on the next call. The drivers of all
//! connections are owned by a tracker and end with their connection.
//!
//! Keys: `outpost:term:live` (set of open session ids), `outpost:term:{id}:meta` (hash),
//! `…:out` and `…:in` (streams), `…:reply` (the relay's answer), `outpost:term:requests`.
//! Changing a record and creating one under the limit are Lua scripts, so a writer never
//! undoes another's fields and a session that closed stays closed.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, RedisConnectionInfo, RedisError, Script, Value};
use tokio_util::task::TaskTracker;
use world::World;

use super::model::{
    INPUT_ENTRIES_MAX, InEvent, InputEntry, MetaPatch, OutEntry, READ_ENTRIES_MAX, Result,
    SessionMeta, SessionState, StreamsError,
};

const KEY_PREFIX: &str = "outpost:term:";
/// Dialing, TLS and the handshake of one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one reply, on top of any blocking time.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Dedicated connections kept idle for blocking reads.
const BLOCKING_IDLE_MAX: usize = 32;

/// `KEYS[1]` live set, `KEYS[2]` meta hash; `ARGV[1]` the limit, `ARGV[2]` the session id,
/// then field/value pairs. 1 when created, 0 at the limit.
const CREATE_SCRIPT: &str = r"
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[1], ARGV[2])
return 1
";

/// `KEYS[1]` meta hash; `ARGV[1]` now in ms, then field/value pairs. Writes only those
/// fields, and nothing when the session is closed or unknown.
const UPDATE_SCRIPT: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'closed' then return 0 end
for i = 2, #ARGV, 2 do
  if ARGV[i] == 'state' and ARGV[i + 1] ~= state then
    redis.call('HSET', KEYS[1], 'changed_ms', ARGV[1])
  end
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
";

/// `KEYS[1]` meta hash. The session's next input sequence number; 0 when the session is gone
/// (a keystroke must not bring back a record that expired).
const INPUT_SEQ_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'input_seq', 1)
";

/// How far apart the time a replica signed into an entry and the time in the id Redis gave
/// it may be (the two clocks, and the write's own delay). A valid entry copied into the stream
/// later gets a new id and fails this.
pub const ENTRY_SKEW_MS: i64 = 60_000;

/// Whether the signed time `signed_ms` of an entry fits the time in its stream id.
pub(in crate::terminal) fn fresh_for_id(entry_id: &[u8], signed_ms: i64) -> bool {
    parse_id(entry_id).is_some_and(|(id_ms, _)| {
        i64::try_from(id_ms).is_ok_and(|id_ms| (id_ms - signed_ms).abs() <= ENTRY_SKEW_MS)
    })
}

/// Where and how to connect, from a `redis[s]://[[user]:password@]host[:port][/db]` URL.
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub addr: String,
    /// `rediss://`: the host name the server's certificate must match.
    pub tls_host: Option<String>,
    pub info: RedisConnectionInfo,
}

impl RedisTarget {
    pub fn parse(raw: &str) -> Result<RedisTarget> {
        // An error names the URL, never its password.
        let bad = |reason: &str| StreamsError::Url {
            url: without_password(raw),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err(bad("must start with redis:// or rediss:// (TLS)")),
        };
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let port = url.port().unwrap_or(6379);
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            n => n
                .parse()
                .map_err(|_| bad("the path must be a database number"))?,
        };
        let mut info = RedisConnectionInfo::default()
            .set_db(db)
            .set_skip_set_lib_name();
        if !url.username().is_empty() {
            info = info.set_username(url.username());
        }
        if let Some(password) = url.password() {
            info = info.set_password(password);
        }
        Ok(RedisTarget {
            addr: format!("{host}:{port}"),
            tls_host: tls.then(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }),
            info,
        })
    }
}

/// `raw` with any password replaced by `***` (a URL that does not parse: everything between
/// `://` and the last `@`).
fn without_password(raw: &str) -> String {
    if let Ok(mut url) = url::Url::parse(raw) {
        if url.password().is_some() && url.set_password(Some("***")).is_ok() {
            return url.to_string();
        }
        return raw.to_string();
    }
    match (raw.find("://"), raw.rfind('@')) {
        (Some(start), Some(at)) if at > start + 3 => {
            format!("{}***{}", &raw[..start + 3], &raw[at..])
        }
        _ => raw.to_string(),
    }
}

pub struct RedisStreams {
    world: World,
    target: RedisTarget,
    shared: Mutex<Option<MultiplexedConnection>>,
    blocking_idle: Mutex<Vec<MultiplexedConnection>>,
    drivers: TaskTracker,
    create_script: Script,
    update_script: Script,
    input_seq_script: Script,
    signer: super::sign::Signer,
}

/// The key of part `part` of session `id`.
pub(in crate::terminal) fn key(id: &str, part: &str) -> String {
    format!("{KEY_PREFIX}{id}:{part}")
}

/// A key shared by all sessions.
pub(in crate::terminal) fn global_key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// The guarded value; a panic elsewhere cannot leave a connection list half-changed.
fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the connection that returned `e` can be used again (the server answered).
fn connection_survives(e: &RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
}

impl RedisStreams {
    pub fn new(world: World, url: &str) -> Result<RedisStreams> {
        Ok(RedisStreams {
            target: RedisTarget::parse(url)?,
            shared: Mutex::new(None),
            blocking_idle: Mutex::new(Vec::new()),
            drivers: TaskTracker::new(),
            create_script: Script::new(CREATE_SCRIPT),
            update_script: Script::new(UPDATE_SCRIPT),
            input_seq_script: Script::new(INPUT_SEQ_SCRIPT),
            // A key of its own until the shared one is set: entries it signs are only ever
            // accepted by itself.
            signer: super::sign::Signer::new(world.random_bytes::<32>()),
            world,
        })
    }

    /// Sign with `current` and accept `accepted`: the keys all replicas share (see
    /// [`crate::terminal::keys`]).
    pub fn set_keys(&self, current: super::sign::SigningKey, accepted: &[super::sign::SigningKey]) {
        self.signer.set_keys(current, accepted);
    }

    /// The id of the key this replica signs with now.
    pub fn signing_key_id(&self) -> u32 {
        self.signer.current_id()
    }

    /// Whether the URL carries a password (Redis without one lets anybody who reaches it in).
    pub fn has_password(&self) -> bool {
        self.target.info.password().is_some()
    }

    /// This replica's clock, for the times signed into entries.
    pub(in crate::terminal) fn now_unix_ms(&self) -> i64 {
        self.world.now_unix_ms()
    }

    /// Claim `name` for this replica once: `true` only for the first caller, on any replica,
    /// within `keep_ms` (Redis `SET NX PX`).
    pub(in crate::terminal) async fn claim_once(&self, name: &str, keep_ms: i64) -> Result<bool> {
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(global_key(&format!("once:{name}")))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(keep_ms.max(1)),
            )
            .await?;
        Ok(set.is_some())
    }

    pub(in crate::terminal) fn signer(&self) -> &super::sign::Signer {
        &self.signer
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> StreamsError {
        StreamsError::Unavailable(format!("redis at {}: {e}", self.target.addr))
    }

    async fn connect(&self) -> Result<MultiplexedConnection> {
        let target = &self.target;
        let dial = async {
            let stream = self.world.net().connect(&target.addr).await?;
            match &target.tls_host {
                None => Ok(stream),
                Some(host) => {
                    let config = self
                        .world
                        .tls_client()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    world::tls::connect(config, host, stream).await
                }
            }
        };
        let timed_out = || self.unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| self.unavailable(e))?;
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(CALL_TIMEOUT));
        let (conn, driver) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            MultiplexedConnection::new_with_config(&target.info, stream, config),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| self.unavailable(e))?;
        self.drivers.spawn(driver);
        Ok(conn)
    }

    async fn shared(&self) -> Result<MultiplexedConnection> {
        let existing = locked(&self.shared).clone();
        if let Some(conn) = existing {
            return Ok(conn);
        }
        let conn = self.connect().await?;
        *locked(&self.shared) = Some(conn.clone());
        Ok(conn)
    }

    fn forget_shared(&self, e: &RedisError) {
        if !connection_survives(e) {
            *locked(&self.shared) = None;
        }
    }

    /// Whether the server answers (`PING`), connecting first if needed.
    pub async fn ping(&self) -> Result<()> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    /// One short command on the shared connection.
    pub(in crate::terminal) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &Cmd,
    ) -> Result<T> {
        let mut conn = self.shared().await?;
        cmd.query_async(&mut conn).await.map_err(|e| {
            self.forget_shared(&e);
            self.unavailable(e)
        })
    }

    /// A pipeline on the shared connection, one round trip (with `ignore_errors`, each
    /// command's server error is its own result).
    pub(in crate::terminal) async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let mut conn = self.shared().await?;
        pipe.query_async(&mut conn).await.map_err(|e| {
            self.forget_shared(&e);
            self.unavailable(e)
        })
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.shared().await?;
        invocation.invoke_async(&mut conn).await.map_err(|e| {
            self.forget_shared(&e);
            self.unavailable(e)
        })
    }

    /// A blocking read (`XREAD … BLOCK`) on a dedicated connection, waiting up to `block`.
    pub(in crate::terminal) async fn blocking(&self, cmd: &Cmd, block: Duration) -> Result<Value> {
        let idle = locked(&self.blocking_idle).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        conn.set_response_timeout(block + CALL_TIMEOUT);
        let value = cmd.query_async(&mut conn).await.map_err(|e| {
            if !connection_survives(&e) {
                // The server went away: the idle ones are as dead as this one.
                locked(&self.blocking_idle).clear();
            }
            self.unavailable(e)
        })?;
        let mut idle = locked(&self.blocking_idle);
        if idle.len() < BLOCKING_IDLE_MAX {
            idle.push(conn);
        }
        Ok(value)
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
            ("recording", meta.recording.clone()),
        ]
    }

    /// The MAC over what decides who may see a session and which agent may dial its link:
    /// its agent, its owner and when it was made. A record whose `bind` does not verify is
    /// taken for unknown.
    fn bind(&self, meta_key: &str, meta: &SessionMeta) -> String {
        let created_ms = meta.created_ms.to_string();
        hex::encode(self.signer.sign(meta_key, &bound_fields(meta, &created_ms)))
    }

    /// Whether `claimed` (a record's `bind`) is the MAC of its identity.
    fn bind_holds(&self, meta_key: &str, meta: &SessionMeta, claimed: &str) -> bool {
        let created_ms = meta.created_ms.to_string();
        let fields = bound_fields(meta, &created_ms);
        self.signer
            .verify_hex(meta_key, &fields, claimed.as_bytes())
    }

    pub(super) async fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        let (live_key, meta_key) = (global_key("live"), key(id, "meta"));
        let mut fields = Self::meta_fields(meta);
        fields.push(("bind", self.bind(&meta_key, meta)));
        let try_create = || {
            let mut invocation = self.create_script.key(&live_key);
            invocation.key(&meta_key).arg(live_max).arg(id);
            for (field, value) in &fields {
                invocation.arg(*field).arg(value);
            }
            async move { self.script::<i64>(invocation).await.map(|n| n == 1) }
        };
        if try_create().await? {
            return Ok(());
        }
        // Sessions whose record expired (a replica died before finishing them) free their
        // slot here; then one more try.
        self.prune_live().await?;
        if try_create().await? {
            return Ok(());
        }
        Err(StreamsError::LimitReached(live_max))
    }

    pub(super) async fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        let fields: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(key(id, "meta")))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let f = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        let meta = SessionMeta {
            agent_id: f("agent_id").to_string(),
            user_id: f("user_id").to_string(),
            username: f("username").to_string(),
            state: SessionState::parse(f("state")),
            created_ms: f("created_ms").parse().unwrap_or_default(),
            changed_ms: f("changed_ms").parse().unwrap_or_default(),
            started: f("started") == "1",
            reason: f("reason").to_string(),
            input_cursor: f("input_cursor").to_string(),
            recording: f("recording").to_string(),
        };
        if !self.bind_holds(&key(id, "meta"), &meta, f("bind")) {
            tracing::warn!(
                session_id = %id,
                "terminal session record whose agent or owner was changed in Redis (its signature does not verify): taken for unknown"
            );
            return Ok(None);
        }
        Ok(Some(meta))
    }

    pub(super) async fn update(&self, id: &str, now_ms: i64, patch: MetaPatch) -> Result<()> {
        let meta_key = key(id, "meta");
        let mut invocation = self.update_script.key(&meta_key);
        invocation.arg(now_ms);
        if let Some(state) = patch.state {
            invocation.arg("state").arg(state.as_str());
        }
        if let Some(started) = patch.started {
            invocation.arg("started").arg(u8::from(started));
        }
        if let Some(cursor) = &patch.input_cursor {
            invocation.arg("input_cursor").arg(cursor);
        }
        if let Some(recording) = &patch.recording {
            invocation.arg("recording").arg(recording);
        }
        self.script::<i64>(invocation).await?;
        Ok(())
    }

    /// The id of the newest entry of stream `key` (`None` when it is empty or gone).
    pub(in crate::terminal) async fn newest_id(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let last: Value = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(entries(last).into_iter().next().map(|(id, _)| id))
    }

    pub(super) async fn output_end(&self, id: &str) -> Result<u64> {
        let newest = self.newest_id(&key(id, "out")).await?;
        Ok(newest
            .as_deref()
            .and_then(parse_id)
            .map_or(0, |(end, _)| end))
    }

    pub(super) async fn append_output(
        &self,
        id: &str,
        batch: &[OutEntry],
        bytes_max: u64,
    ) -> Result<()> {
        let out_key = key(id, "out");
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for entry in batch {
            let (end, seq) = entry.id();
            let id = format!("{end}-{seq}");
            let number;
            let fields: Vec<(&str, &[u8])> = match entry {
                OutEntry::Data { offset, bytes } => {
                    number = offset.to_string();
                    vec![("o", number.as_bytes()), ("d", bytes.as_slice())]
                }
                OutEntry::Skipped { from, .. } => {
                    number = from.to_string();
                    vec![("skip", number.as_bytes())]
                }
                OutEntry::Closed { reason, .. } => vec![("closed", reason.as_bytes())],
            };
            // The MAC covers the entry's id too: a valid entry copied to another position
            // does not verify.
            let mac = self.signer.sign(&format!("{out_key}#{id}"), &fields);
            let cmd = pipe
                .cmd("XADD")
                .arg(&out_key)
                .arg("MINID")
                .arg(end.saturating_sub(bytes_max))
                .arg(&id);
            for (name, value) in &fields {
                cmd.arg(*name).arg(*value);
            }
            cmd.arg(super::sign::MAC_FIELD).arg(mac);
        }
        // One round trip for the whole batch.
        let replies: Vec<redis::RedisResult<Value>> = self.pipeline(&pipe).await?;
        for reply in replies {
            match reply {
                // An id at or below the top: this chunk was written before (a resent frame).
                Err(e) if e.to_string().contains("equal or smaller") => {}
                Err(e) => return Err(self.unavailable(format!("XADD refused: {e}"))),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    fn xread(key: &str, from: &str, count: usize, block: Duration) -> Cmd {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(key)
            .arg(from);
        cmd
    }

    /// Entries of one stream after `from`, at most `count`, waiting up to `block`.
    pub(in crate::terminal) async fn read_stream(
        &self,
        key: &str,
        from: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(Vec<u8>, Vec<Value>)>> {
        let reply = self
            .blocking(&Self::xread(key, from, count, block), block)
            .await?;
        Ok(xread_entries(reply))
    }

    pub(super) async fn read_output(
        &self,
        id: &str,
        after: u64,
        block: Duration,
    ) -> Result<Vec<OutEntry>> {
        let found = self
            .read_stream(
                &key(id, "out"),
                &format!("{after}-0"),
                READ_ENTRIES_MAX,
                block,
            )
            .await?;
        let out_key = key(id, "out");
        Ok(found
            .into_iter()
            .filter_map(|(entry_id, fields)| {
                let signed_as = format!("{out_key}#{}", String::from_utf8_lossy(&entry_id));
                if !self.signer.verify(&signed_as, &fields) {
                    tracing::warn!(
                        session_id = %id,
                        "terminal output entry without a valid signature dropped (written to Redis by something other than a replica)"
                    );
                    return None;
                }
                out_entry(&entry_id, fields)
            })
            .collect())
    }

    pub(super) async fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        let stream = key(id, "in");
        let seq: u64 = self
            .script(self.input_seq_script.key(key(id, "meta")))
            .await?;
        if seq == 0 {
            return Ok(());
        }
        let (seq, written_ms) = (seq.to_string(), self.world.now_unix_ms().to_string());
        let (cols, rows);
        let mut fields: Vec<(&str, &[u8])> = match &event {
            InEvent::Data(d) => vec![("k", b"data"), ("d", d.as_slice())],
            InEvent::Resize { cols: c, rows: r } | InEvent::Attach { cols: c, rows: r } => {
                (cols, rows) = (c.to_string(), r.to_string());
                let kind: &[u8] = if matches!(event, InEvent::Resize { .. }) {
                    b"resize"
                } else {
                    b"attach"
                };
                vec![("k", kind), ("c", cols.as_bytes()), ("r", rows.as_bytes())]
            }
            InEvent::Close { reason } => vec![("k", b"close"), ("d", reason.as_bytes())],
        };
        // Inside the MAC: which input this is (a copy repeats it) and when it was written (a
        // copy added later has a newer stream id).
        fields.push(("n", seq.as_bytes()));
        fields.push(("t", written_ms.as_bytes()));
        self.add_signed(&stream, INPUT_ENTRIES_MAX, &fields).await
    }

    /// Append an entry with `fields` and their MAC to `stream`, trimmed to about `kept`
    /// entries.
    pub(in crate::terminal) async fn add_signed(
        &self,
        stream: &str,
        kept: usize,
        fields: &[(&str, &[u8])],
    ) -> Result<()> {
        let mac = self.signer.sign(stream, fields);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("MAXLEN").arg("~").arg(kept).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        cmd.arg(super::sign::MAC_FIELD).arg(mac);
        self.query::<Value>(&cmd).await?;
        Ok(())
    }

    pub(super) async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<InputEntry>> {
        let from = if cursor.is_empty() { "0-0" } else { cursor };
        let stream = key(id, "in");
        let found = self
            .read_stream(&stream, from, READ_ENTRIES_MAX, block)
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|(entry, fields)| {
                if !self.signer.verify(&stream, &fields) {
                    tracing::warn!(
                        session_id = %id,
                        "terminal input entry without a valid signature dropped (written to Redis by something other than a replica)"
                    );
                    return None;
                }
                if !fresh_for_id(&entry, number(field(&fields, b"t"))) {
                    tracing::warn!(
                        session_id = %id,
                        "terminal input entry whose stream id does not match its signed time dropped (a copy added to Redis later)"
                    );
                    return None;
                }
                Some(InputEntry {
                    id: String::from_utf8_lossy(&entry).into_owned(),
                    seq: number(field(&fields, b"n")),
                    event: in_event(&fields)?,
                })
            })
            .collect())
    }

    pub(super) async fn finish(
        &self,
        id: &str,
        now_ms: i64,
        reason: &str,
        keep: Duration,
    ) -> Result<bool> {
        let meta_key = key(id, "meta");
        let keep_s = keep.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&meta_key)
            .arg("state")
            .arg(SessionState::Closed.as_str())
            .arg("changed_ms")
            .arg(now_ms)
            .arg("reason")
            .arg(reason)
            .ignore()
            .cmd("SREM")
            .arg(global_key("live"))
            .arg(id);
        for part in ["meta", "out", "in", "reply"] {
            pipe.cmd("EXPIRE").arg(key(id, part)).arg(keep_s).ignore();
        }
        let (removed,): (i64,) = self.pipeline(&pipe).await?;
        // The live set holds open sessions: whoever removes the id closed the session.
        Ok(removed == 1)
    }

    pub(super) async fn live(&self) -> Result<Vec<(String, String)>> {
        let ids: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(global_key("live")))
            .await?;
        let mut out = std::collections::BTreeSet::new();
        for id in ids {
            if let Some(meta) = self.meta(&id).await?
                && meta.state != SessionState::Closed
            {
                out.insert((id, meta.agent_id));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Remove ids from the live set whose record is gone or closed.
    async fn prune_live(&self) -> Result<()> {
        let live_key = global_key("live");
        let ids: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&live_key)).await?;
        for id in ids {
            let gone = self
                .meta(&id)
                .await?
                .is_none_or(|m| m.state == SessionState::Closed);
            if gone {
                self.query::<Value>(redis::cmd("SREM").arg(&live_key).arg(&id))
                    .await?;
            }
        }
        Ok(())
    }
}

/// What a session record's `bind` signs: who may see it and which agent may dial its link.
fn bound_fields<'a>(meta: &'a SessionMeta, created_ms: &'a str) -> [(&'static str, &'a [u8]); 4] {
    [
        ("agent_id", meta.agent_id.as_bytes()),
        ("user_id", meta.user_id.as_bytes()),
        ("username", meta.username.as_bytes()),
        ("created_ms", created_ms.as_bytes()),
    ]
}

/// The value of field `name` in a stream entry's `[k, v, …]`.
pub(in crate::terminal) fn field<'a>(fields: &'a [Value], name: &[u8]) -> Option<&'a [u8]> {
    fields.chunks(2).find_map(|pair| match pair {
        [Value::BulkString(k), Value::BulkString(v)] if k.as_slice() == name => Some(v.as_slice()),
        _ => None,
    })
}

pub(in crate::terminal) fn text(bytes: Option<&[u8]>) -> String {
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
                    (Some(Value::BulkString(id)), Some(Value::Array(fields))) => Some((id, fields)),
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
        .position(|pair| matches!(pair, [Value::BulkString(k), _] if k.as_slice() == name))?;
    match std::mem::replace(&mut fields[at * 2 + 1], Value::Nil) {
        Value::BulkString(v) => Some(v),
        _ => None,
    }
}

/// Everything this store reads out of one XREAD reply in RESP bytes, as the fuzz target
/// `redis_reply` drives it: the output entries and input events it would accept, and whether
/// each entry's MAC verifies under `signer`.
pub fn decode_xread(
    resp: &[u8],
    signer: &super::sign::Signer,
) -> Vec<(Option<OutEntry>, Option<InEvent>, bool)> {
    let Ok(value) = redis::parse_redis_value(resp) else {
        return Vec::new();
    };
    xread_entries(value)
        .into_iter()
        .map(|(id, fields)| {
            let verified = signer.verify("fuzz", &fields);
            let event = in_event(&fields);
            (out_entry(&id, fields), event, verified)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::{OutEntry, RedisTarget, Value, out_entry};

    #[test]
    fn urls() {
        let t = RedisTarget::parse("redis://:s3cret@10.0.0.2:6380/2").expect("parses");
        assert_eq!(t.addr, "10.0.0.2:6380");
        assert_eq!(t.info.password(), Some("s3cret"));
        assert_eq!(t.info.db(), 2);
        assert!(t.tls_host.is_none());
        let t = RedisTarget::parse("redis://localhost").expect("parses");
        assert_eq!(t.addr, "localhost:6379");
        let t = RedisTarget::parse("rediss://cache.example:6380").expect("TLS parses");
        assert_eq!(t.tls_host.as_deref(), Some("cache.example"));
        let t = RedisTarget::parse("redis://ops:pw@h/").expect("user parses");
        assert_eq!(t.info.username(), Some("ops"));
        let e = RedisTarget::parse("http://x")
            .expect_err("scheme")
            .to_string();
        assert!(e.contains("redis://"), "{e}");
        assert!(RedisTarget::parse("redis://h/notanumber").is_err());
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        for raw in [
            "redis://:s3cret@h/notanumber",
            "http://user:s3cret@h/",
            "redis://:s3cret@[bad/",
        ] {
            let e = RedisTarget::parse(raw).expect_err("bad url").to_string();
            assert!(!e.contains("s3cret"), "{e}");
            assert!(e.contains("***"), "{e}");
        }
    }

    #[test]
    fn output_entries_decode_from_their_ids() {
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        assert_eq!(
            out_entry(
                b"12-0",
                vec![bulk(b"o"), bulk(b"10"), bulk(b"d"), bulk(b"hi")]
            ),
            Some(OutEntry::Data {
                offset: 10,
                bytes: b"hi".to_vec()
            })
        );
        assert_eq!(
            out_entry(b"40-0", vec![bulk(b"skip"), bulk(b"12")]),
            Some(OutEntry::Skipped { from: 12, to: 40 })
        );
        assert_eq!(
            out_entry(b"40-1", vec![bulk(b"closed"), bulk(b"psql exited")]),
            Some(OutEntry::Closed {
                end: 40,
                reason: "psql exited".into()
            })
        );
        assert_eq!(out_entry(b"nonsense", Vec::new()), None);
    }
}
