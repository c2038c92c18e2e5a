//! One supervised SSH connection and the commands run on it (the driver around
//! [`crate::outcome`]).
//!
//! Every phase runs under its own timeout; the socket sits behind a kill switch, so giving up
//! on a connection (a timeout, a dead link, a drop) ends russh's session task and closes the
//! socket even when the peer never answers again. [`Gauges`] count open sockets and channels,
//! which is how tests prove nothing leaks.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::ChannelMsg;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use world::World;

use crate::inventory::Host;
use crate::outcome::{End, Outcome, Phase, classify};

/// The five layered timeouts: connect, handshake, auth, command (total) and idle (transport
/// liveness), each with its own outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// SSH version exchange, key exchange and host key check.
    pub handshake: Duration,
    /// User authentication.
    pub auth: Duration,
    /// The command from the exec request to its exit status.
    pub command: Duration,
    /// Transport liveness: no data and no keepalive answer for this long means the link is
    /// dead. A quiet command on a live link is not idle: keepalives are answered.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(15),
            auth: Duration::from_secs(15),
            command: Duration::from_secs(600),
            idle: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Keepalive period: three unanswered periods make the idle timeout.
    fn keepalive_interval(&self) -> Duration {
        (self.idle / 3).max(Duration::from_millis(100))
    }

    /// The longest an operation may take from connect to its end, with `slack` per phase for
    /// the clean-up that follows a timeout. What the simulator checks every operation against.
    pub fn bound(&self, slack: Duration) -> Duration {
        self.connect + self.handshake + self.auth + self.idle + self.command + slack * 5
    }
}

/// What to do with a host key that known_hosts does not list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Refuse it (`not_started`). A changed key is always refused.
    Strict,
    /// Record it in known_hosts and go on (the explicit `--accept-new-host-keys`).
    AcceptNew,
}

/// Live resources, counted so that a leak is visible.
#[derive(Debug, Default)]
pub struct Gauges {
    sockets: AtomicI64,
    channels: AtomicI64,
    connections: AtomicI64,
}

/// A reading of [`Gauges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Live {
    /// Sockets not yet dropped (russh's session task holds one per connection).
    pub sockets: i64,
    /// Session channels not yet dropped.
    pub channels: i64,
    /// [`Connection`] values not yet dropped.
    pub connections: i64,
}

impl Gauges {
    pub fn live(&self) -> Live {
        Live {
            sockets: self.sockets.load(Ordering::SeqCst),
            channels: self.channels.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    Stdout,
    Stderr,
}

/// How one operation on one host ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// The phase it ended in.
    pub phase: Phase,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<String>,
    /// What went wrong, for every outcome but `ok` (and `command_failed`, whose exit status
    /// says it).
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl Report {
    /// An ending without an exit status, on `host`, of an operation begun at `started`.
    fn failed(
        host: &str,
        phase: Phase,
        end: End,
        error: String,
        started: tokio::time::Instant,
    ) -> Report {
        Report {
            outcome: classify(phase, &end),
            phase,
            exit_code: None,
            exit_signal: None,
            error: Some(format!("{host}: {error}")),
            elapsed: started.elapsed(),
        }
    }
}

/// Connects to hosts: timeouts, host key policy, loaded identities and the gauges.
pub struct Client {
    world: World,
    timeouts: Timeouts,
    host_keys: HostKeyPolicy,
    config: Arc<russh::client::Config>,
    gauges: Arc<Gauges>,
    keys: Mutex<BTreeMap<PathBuf, Arc<PrivateKey>>>,
    /// Serializes appends to known_hosts files (many hosts may learn keys at once).
    known_hosts_lock: Arc<Mutex<()>>,
}

impl Client {
    pub fn new(world: World, timeouts: Timeouts, host_keys: HostKeyPolicy) -> Client {
        let mut config = russh::client::Config {
            keepalive_interval: Some(timeouts.keepalive_interval()),
            keepalive_max: 2,
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        };
        // Commands' output is small or already compressed; zlib would only cost CPU.
        config.preferred.compression = std::borrow::Cow::Borrowed(&[russh::compression::NONE]);
        Client {
            world,
            timeouts,
            host_keys,
            config: Arc::new(config),
            gauges: Arc::new(Gauges::default()),
            keys: Mutex::new(BTreeMap::new()),
            known_hosts_lock: Arc::new(Mutex::new(())),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    pub fn gauges(&self) -> &Arc<Gauges> {
        &self.gauges
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// Use `key` for hosts whose identity file is `path` (instead of reading the file).
    pub fn add_key(&self, path: &Path, key: PrivateKey) {
        lock(&self.keys).insert(path.to_path_buf(), Arc::new(key));
    }

    /// Load (once) the private key at `path`. Encrypted keys are not supported: use a key
    /// without a passphrase dedicated to automation.
    pub fn load_key(&self, path: &Path) -> Result<Arc<PrivateKey>, String> {
        if let Some(key) = lock(&self.keys).get(path) {
            return Ok(key.clone());
        }
        let key = russh::keys::load_secret_key(path, None)
            .map_err(|e| format!("load identity file {}: {e}", path.display()))?;
        let key = Arc::new(key);
        lock(&self.keys).insert(path.to_path_buf(), key.clone());
        Ok(key)
    }

    /// Connect, verify the host key and authenticate, each phase under its own timeout. An
    /// error is a `not_started` report.
    pub async fn connect(&self, host: &Host) -> Result<Connection, Report> {
        let started = tokio::time::Instant::now();
        let fail = |phase, end, error| Report::failed(&host.name, phase, end, error, started);
        let key = self
            .load_key(&host.identity_file)
            .map_err(|e| fail(Phase::Connect, End::TransportLost, e))?;

        let t = self.timeouts;
        let addr = host.socket_addr();
        let stream = match tokio::time::timeout(t.connect, self.world.net().connect(&addr)).await {
            Err(_) => {
                return Err(fail(
                    Phase::Connect,
                    End::PhaseTimeout,
                    format!("connect to {addr}: no answer within {:?}", t.connect),
                ));
            }
            Ok(Err(e)) => {
                return Err(fail(
                    Phase::Connect,
                    End::TransportLost,
                    format!("connect to {addr}: {e}"),
                ));
            }
            Ok(Ok(s)) => s,
        };
        let kill = CancellationToken::new();
        let stream = Guarded::new(stream, kill.clone(), self.gauges.clone());
        let link = Arc::new(LinkState::default());
        let handler = Handler {
            address: host.address.clone(),
            port: host.port,
            known_hosts: host.known_hosts.clone(),
            policy: self.host_keys,
            lock: self.known_hosts_lock.clone(),
            link: link.clone(),
        };
        let handshake = russh::client::connect_stream(self.config.clone(), stream, handler);
        let handle = match tokio::time::timeout(t.handshake, handshake).await {
            Err(_) => {
                kill.cancel();
                return Err(fail(
                    Phase::Handshake,
                    End::PhaseTimeout,
                    format!(
                        "SSH handshake with {addr} did not finish within {:?}",
                        t.handshake
                    ),
                ));
            }
            Ok(Err(e)) => {
                kill.cancel();
                let why = match lock(&link.host_key).take() {
                    Some(verdict) => verdict,
                    None => format!("SSH handshake with {addr}: {e}"),
                };
                return Err(fail(Phase::Handshake, End::TransportLost, why));
            }
            Ok(Ok(handle)) => handle,
        };
        let mut conn = Connection {
            handle,
            kill,
            link,
            gauges: self.gauges.clone(),
            timeouts: t,
            reusable: true,
            host: host.name.clone(),
            _count: Counted::new(&self.gauges, Gauge::Connections),
        };
        let auth = async {
            let hash = match conn.handle.best_supported_rsa_hash().await {
                Ok(h) => h.flatten(),
                Err(_) => None,
            };
            conn.handle
                .authenticate_publickey(
                    host.user.clone(),
                    PrivateKeyWithHashAlg::new(key.clone(), hash.or(Some(HashAlg::Sha256))),
                )
                .await
        };
        match tokio::time::timeout(t.auth, auth).await {
            Err(_) => Err(fail(
                Phase::Auth,
                End::PhaseTimeout,
                format!(
                    "authentication as {} did not finish within {:?}",
                    host.user, t.auth
                ),
            )),
            Ok(Err(e)) => Err(fail(
                Phase::Auth,
                End::TransportLost,
                format!("authentication as {}: {e}", host.user),
            )),
            Ok(Ok(result)) if !result.success() => Err(fail(
                Phase::Auth,
                End::Refused,
                format!(
                    "the server refused user {} with key {} ({})",
                    host.user,
                    host.identity_file.display(),
                    key.public_key().fingerprint(HashAlg::Sha256)
                ),
            )),
            Ok(Ok(_)) => Ok(conn),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the data (a map, a string) is still usable.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What the session task learned that the caller needs to explain an ending.
#[derive(Default)]
struct LinkState {
    /// Why the host key was refused, in words for the operator.
    host_key: Mutex<Option<String>>,
    /// Why the session ended, if it did.
    disconnect: Mutex<Option<(End, String)>>,
}

struct Handler {
    address: String,
    port: u16,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    lock: Arc<Mutex<()>>,
    link: Arc<LinkState>,
}

impl Handler {
    /// The keys known_hosts lists for this host, with their line numbers (none when the file
    /// cannot be read: `verify` reports that itself).
    fn recorded(&self) -> Vec<(usize, russh::keys::PublicKey)> {
        russh::keys::known_hosts::known_host_keys_path(&self.address, self.port, &self.known_hosts)
            .unwrap_or_default()
    }

    fn verify(&self, key: &russh::keys::PublicKey) -> Result<(), String> {
        let fingerprint = key.fingerprint(HashAlg::Sha256);
        let algorithm = key.algorithm();
        let shown = if self.port == 22 {
            self.address.clone()
        } else {
            format!("[{}]:{}", self.address, self.port)
        };
        let _guard = lock(&self.lock);
        match russh::keys::check_known_hosts_path(&self.address, self.port, key, &self.known_hosts)
        {
            Ok(true) => Ok(()),
            // Listed with another algorithm only: the host's identity changed as surely as
            // with a different key of the same algorithm, so it is refused under every policy.
            Ok(false) if !self.recorded().is_empty() => {
                let recorded = self.recorded();
                let listed: Vec<String> = recorded
                    .iter()
                    .map(|(line, key)| format!("{} (line {line})", key.algorithm()))
                    .collect();
                Err(format!(
                    "HOST KEY CHANGED for {shown}: it now offers {algorithm} {fingerprint}, but {} \
                     knows it only by {}; this may be an attack; if the host was reinstalled, \
                     remove those lines and verify the new key",
                    self.known_hosts.display(),
                    listed.join(", ")
                ))
            }
            Ok(false) => match self.policy {
                HostKeyPolicy::AcceptNew => {
                    russh::keys::known_hosts::learn_known_hosts_path(
                        &self.address,
                        self.port,
                        key,
                        &self.known_hosts,
                    )
                    .map_err(|e| {
                        format!(
                            "record the new host key in {}: {e}",
                            self.known_hosts.display()
                        )
                    })?;
                    tracing::warn!(host = %shown, %fingerprint, known_hosts = %self.known_hosts.display(), "recorded a new host key");
                    Ok(())
                }
                HostKeyPolicy::Strict => Err(format!(
                    "unknown host key for {shown} ({algorithm} {fingerprint}): it is not in {}; \
                     verify the fingerprint and add it (ssh-keyscan), or pass --accept-new-host-keys",
                    self.known_hosts.display()
                )),
            },
            Err(russh::keys::Error::KeyChanged { line }) => Err(format!(
                "HOST KEY CHANGED for {shown}: it is now {algorithm} {fingerprint}, which does not \
                 match line {line} of {}; this may be an attack; if the host was reinstalled, \
                 remove that line and verify the new key",
                self.known_hosts.display()
            )),
            Err(e) => Err(format!("read {}: {e}", self.known_hosts.display())),
        }
    }
}

impl russh::client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, russh::Error> {
        let verdict = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => self.verify(key),
            russh::keys::PublicKeyOrCertificate::Certificate(_) => Err(
                "the server offered a host certificate; only known_hosts keys are trusted".into(),
            ),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                *lock(&self.link.host_key) = Some(why);
                Ok(false)
            }
        }
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<russh::Error>,
    ) -> Result<(), russh::Error> {
        let ended = match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => (
                End::TransportLost,
                format!("the server disconnected: {}", info.message),
            ),
            russh::client::DisconnectReason::Error(russh::Error::KeepaliveTimeout) => (
                End::LinkDead,
                "link dead: no data and no answer to keepalives".to_string(),
            ),
            russh::client::DisconnectReason::Error(e) => {
                (End::TransportLost, format!("connection lost: {e}"))
            }
        };
        lock(&self.link.disconnect).get_or_insert(ended);
        Ok(())
    }
}

/// An authenticated connection to one host. Dropping it closes the socket even when the
/// peer is unreachable.
pub struct Connection {
    handle: russh::client::Handle<Handler>,
    kill: CancellationToken,
    link: Arc<LinkState>,
    gauges: Arc<Gauges>,
    timeouts: Timeouts,
    reusable: bool,
    host: String,
    _count: Counted,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

/// The pause allowed for a courtesy message (signal, close, disconnect) on the way out.
const COURTESY: Duration = Duration::from_secs(1);

impl Connection {
    /// Whether another command may run on this connection.
    pub fn is_reusable(&self) -> bool {
        self.reusable && !self.handle.is_closed() && !self.kill.is_cancelled()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Run `command` (a complete command line for the remote shell), streaming its output to
    /// `sink` as it arrives. On `cancel` or at the command deadline the remote process is sent
    /// TERM (an SSH signal request, and `stop` run on a second channel when given) and the
    /// channel is closed.
    pub async fn exec(
        &mut self,
        command: &[u8],
        stop: Option<&[u8]>,
        sink: &mut (dyn FnMut(OutputKind, &[u8]) + Send),
        cancel: &CancellationToken,
    ) -> Report {
        let started = tokio::time::Instant::now();
        let t = self.timeouts;
        let mut channel = match self.open_exec(command, cancel, started).await {
            Ok(channel) => channel,
            Err(report) => return *report,
        };

        let deadline = started + t.command;
        let mut exit_code: Option<i32> = None;
        let mut exit_signal: Option<String> = None;
        let mut confirmed = false;
        let end = loop {
            tokio::select! {
                msg = channel.channel.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => sink(OutputKind::Stdout, &data),
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => sink(OutputKind::Stderr, &data),
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        exit_code = Some(i32::try_from(exit_status).unwrap_or(i32::MAX));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, error_message, .. }) => {
                        let name = format!("{signal_name:?}");
                        exit_signal = Some(if error_message.is_empty() { name } else { format!("{name} ({error_message})") });
                    }
                    Some(ChannelMsg::Success) => confirmed = true,
                    Some(ChannelMsg::Failure) if !confirmed && exit_code.is_none() => break End::Refused,
                    Some(ChannelMsg::Close) | None => break match (&exit_code, &exit_signal) {
                        (Some(code), _) => End::Exited(u32::try_from(*code).unwrap_or(u32::MAX)),
                        (None, Some(sig)) => End::Signalled(sig.clone()),
                        (None, None) => {
                            self.reusable = false;
                            self.disconnect_reason().map_or(End::TransportLost, |(end, _)| end)
                        }
                    },
                    Some(_) => {}
                },
                () = tokio::time::sleep_until(deadline) => break End::PhaseTimeout,
                () = cancel.cancelled() => break End::Canceled,
            }
        };
        if matches!(end, End::PhaseTimeout | End::Canceled) {
            // Stop the remote process (the receipt wrapper forwards TERM to the command),
            // then close the channel. Neither may wait on a dead link for long.
            self.reusable = false;
            let ch = &channel.channel;
            let _ = tokio::time::timeout(COURTESY, ch.signal(russh::Sig::TERM)).await;
            let _ = tokio::time::timeout(COURTESY, ch.close()).await;
            if let Some(stop) = stop {
                let _ = tokio::time::timeout(COURTESY * 2, self.run_quietly(stop)).await;
            }
        }
        let error = self.end_error(&end);
        Report {
            outcome: classify(Phase::Running, &end),
            phase: if end == End::Refused {
                Phase::Open
            } else {
                Phase::Running
            },
            exit_code,
            exit_signal,
            error: error.map(|e| format!("{}: {e}", self.host)),
            elapsed: started.elapsed(),
        }
    }

    /// Open a session channel and send it `command`; a failed report when that fails.
    async fn open_exec(
        &mut self,
        command: &[u8],
        cancel: &CancellationToken,
        started: tokio::time::Instant,
    ) -> Result<ChannelGuard, Box<Report>> {
        let t = self.timeouts;
        let host = self.host.clone();
        let fail = |phase, end, error| Box::new(Report::failed(&host, phase, end, error, started));
        let open = tokio::select! {
            r = tokio::time::timeout(t.idle, self.handle.channel_open_session()) => r,
            () = cancel.cancelled() => {
                return Err(fail(Phase::Open, End::Canceled, "canceled before the command was sent".into()));
            }
        };
        let channel = match open {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.reusable = false;
                let why = self.disconnect_reason().map(|(_, w)| w);
                return Err(fail(
                    Phase::Open,
                    End::TransportLost,
                    why.unwrap_or_else(|| format!("open a session channel: {e}")),
                ));
            }
            Err(_) => {
                self.reusable = false;
                return Err(fail(
                    Phase::Open,
                    End::PhaseTimeout,
                    format!("open a session channel: no answer within {:?}", t.idle),
                ));
            }
        };
        let channel = ChannelGuard {
            channel,
            _count: Counted::new(&self.gauges, Gauge::Channels),
        };
        if let Err(e) = channel.channel.exec(true, command.to_vec()).await {
            // The request never reached the session task, so it never reached the wire.
            self.reusable = false;
            return Err(fail(
                Phase::Open,
                End::TransportLost,
                format!("send the exec request: {e}"),
            ));
        }
        Ok(channel)
    }

    /// What went wrong, in words, for a command that ended with `end` (`None`: it ran to its
    /// end on the host).
    fn end_error(&self, end: &End) -> Option<String> {
        let t = self.timeouts;
        let lost = || {
            self.disconnect_reason()
                .map(|(_, why)| why)
                .unwrap_or_else(|| "the channel closed without an exit status".to_string())
        };
        match end {
            End::Exited(_) | End::Signalled(_) => None,
            End::Refused => Some("the server refused to start the command".to_string()),
            End::PhaseTimeout => Some(format!(
                "the command did not finish within {:?}; the remote process was sent TERM",
                t.command
            )),
            End::Canceled => Some("canceled; the remote process was sent TERM".to_string()),
            End::LinkDead => Some(format!(
                "{} within the idle timeout ({:?}) after the command was sent; it may have run",
                lost(),
                t.idle
            )),
            End::TransportLost => Some(format!(
                "{} after the command was sent; it may have run",
                lost()
            )),
        }
    }

    /// Run a helper command to its end, ignoring its output (bounded by the caller).
    async fn run_quietly(&self, line: &[u8]) {
        let Ok(channel) = self.handle.channel_open_session().await else {
            return;
        };
        let mut channel = ChannelGuard {
            channel,
            _count: Counted::new(&self.gauges, Gauge::Channels),
        };
        if channel.channel.exec(false, line.to_vec()).await.is_err() {
            return;
        }
        while let Some(msg) = channel.channel.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                break;
            }
        }
    }

    fn disconnect_reason(&self) -> Option<(End, String)> {
        lock(&self.link.disconnect).clone()
    }

    /// Say goodbye to the server (bounded), then close the socket.
    pub async fn close(self) {
        let _ = tokio::time::timeout(
            COURTESY,
            self.handle
                .disconnect(russh::Disconnect::ByApplication, "", "en"),
        )
        .await;
        self.kill.cancel();
    }
}

struct ChannelGuard {
    channel: russh::Channel<russh::client::Msg>,
    _count: Counted,
}

#[derive(Clone, Copy)]
enum Gauge {
    Sockets,
    Channels,
    Connections,
}

/// Adds one to a gauge while alive.
struct Counted {
    gauges: Arc<Gauges>,
    which: Gauge,
}

impl Counted {
    fn new(gauges: &Arc<Gauges>, which: Gauge) -> Counted {
        gauges.get(which).fetch_add(1, Ordering::SeqCst);
        Counted {
            gauges: gauges.clone(),
            which,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauges.get(self.which).fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gauges {
    fn get(&self, which: Gauge) -> &AtomicI64 {
        match which {
            Gauge::Sockets => &self.sockets,
            Gauge::Channels => &self.channels,
            Gauge::Connections => &self.connections,
        }
    }
}

/// A socket with a kill switch: once `kill` fires, every read and write fails at once (and a
/// pending read wakes up), so russh's session task ends and drops the socket even when the
/// peer has gone silent.
struct Guarded {
    inner: world::Stream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    _count: Counted,
}

impl Guarded {
    fn new(inner: world::Stream, kill: CancellationToken, gauges: Arc<Gauges>) -> Guarded {
        Guarded {
            inner,
            killed: Box::pin(kill.cancelled_owned()),
            _count: Counted::new(&gauges, Gauge::Sockets),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection abandoned",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
