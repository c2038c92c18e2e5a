//! Sockets chosen at run time: tokio (real) or turmoil (simulated).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Opens connections and listeners in the world it was made from.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    simulated: bool,
}

/// A byte stream: TCP (real or simulated) or a Unix socket (real only).
#[derive(Debug)]
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Sim(turmoil::net::TcpStream),
    /// TLS over one of the others (see [`crate::tls`]).
    Tls(Box<tokio_rustls::TlsStream<Stream>>),
}

/// A listener yielding [`Stream`]s.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
    Sim(turmoil::net::TcpListener),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local_addr() {
            Ok(addr) => write!(f, "Listener({addr})"),
            Err(_) => f.write_str("Listener(?)"),
        }
    }
}

/// Address of an accepted peer.
#[derive(Clone, Debug)]
pub enum PeerAddr {
    Tcp(std::net::SocketAddr),
    /// A Unix-socket peer with its credentials (`SO_PEERCRED`), when the OS told them.
    Unix {
        uid: Option<u32>,
        gid: Option<u32>,
    },
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Tcp(addr) => write!(f, "{addr}"),
            PeerAddr::Unix { uid, .. } => match uid {
                Some(uid) => write!(f, "unix(uid={uid})"),
                None => f.write_str("unix"),
            },
        }
    }
}

impl Net {
    pub(crate) fn new(simulated: bool) -> Net {
        Net { simulated }
    }

    /// Connect to `host:port`. Host names resolve through the OS (real, see [`resolve`]) or
    /// turmoil's DNS; each address found is tried in turn.
    pub async fn connect(&self, addr: &str) -> io::Result<Stream> {
        if self.simulated {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            return Ok(Stream::Sim(stream));
        }
        let mut last = None;
        for target in resolve(addr).await? {
            match tokio::net::TcpStream::connect(target).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Stream::Tcp(stream));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address found"))
        }))
    }

    /// Listen on `host:port` (`127.0.0.1:0` picks a free port).
    pub async fn bind(&self, addr: &str) -> io::Result<Listener> {
        if self.simulated {
            Ok(Listener::Sim(turmoil::net::TcpListener::bind(addr).await?))
        } else {
            Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?))
        }
    }

    /// Connect to a Unix socket. Not available in simulation.
    pub async fn connect_unix(&self, path: &Path) -> io::Result<Stream> {
        if self.simulated {
            return Err(unsupported_in_simulation());
        }
        Ok(Stream::Unix(tokio::net::UnixStream::connect(path).await?))
    }

    /// Listen on a Unix socket path. Not available in simulation.
    pub async fn bind_unix(&self, path: &Path) -> io::Result<Listener> {
        if self.simulated {
            return Err(unsupported_in_simulation());
        }
        Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
    }
}

/// How long a name lookup may take before the last answer for the same name is used instead.
/// A lookup normally answers in milliseconds; a resolver that drops a query (a container
/// network's DNS reloading while containers start, seen to lose queries for 5 to 12 s) makes
/// the OS wait seconds before it asks again, longer than the callers' connect deadlines.
const LOOKUP_PATIENCE: Duration = Duration::from_secs(1);

/// How many names keep their last answer (the configured endpoints; a handful in practice).
const REMEMBERED_NAMES: usize = 64;

/// The last answer per `host:port` name, for [`resolve`].
static LAST_ANSWERS: std::sync::Mutex<
    std::collections::BTreeMap<String, Vec<std::net::SocketAddr>>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

fn last_answer(name: &str) -> Option<Vec<std::net::SocketAddr>> {
    let answers = LAST_ANSWERS.lock().unwrap_or_else(|e| e.into_inner());
    answers.get(name).cloned()
}

fn remember_answer(name: &str, found: &[std::net::SocketAddr]) {
    let mut answers = LAST_ANSWERS.lock().unwrap_or_else(|e| e.into_inner());
    if answers.len() >= REMEMBERED_NAMES && !answers.contains_key(name) {
        answers.pop_first();
    }
    answers.insert(name.to_string(), found.to_vec());
}

/// The addresses of `host:port`, serving a stale answer when the resolver does not (in the
/// manner of RFC 8767): a lookup that fails, or takes longer than [`LOOKUP_PATIENCE`], falls
/// back to the last answer for the same name when there is one. Without one the lookup is
/// awaited to its end, so a first connection still waits for the resolver; a name whose
/// address changed is picked up by the next lookup that answers.
async fn resolve(addr: &str) -> io::Result<Vec<std::net::SocketAddr>> {
    if let Ok(literal) = addr.parse::<std::net::SocketAddr>() {
        return Ok(vec![literal]);
    }
    let lookup = tokio::net::lookup_host(addr);
    tokio::pin!(lookup);
    let answer = match tokio::time::timeout(LOOKUP_PATIENCE, &mut lookup).await {
        Ok(answer) => answer,
        Err(_) => match last_answer(addr) {
            Some(stale) => {
                tracing::warn!(
                    name = addr,
                    patience = ?LOOKUP_PATIENCE,
                    "name lookup did not answer in time; using its last answer"
                );
                return Ok(stale);
            }
            None => lookup.await,
        },
    };
    match answer {
        Ok(found) => {
            let found: Vec<_> = found.collect();
            if !found.is_empty() {
                remember_answer(addr, &found);
            }
            Ok(found)
        }
        Err(error) => match last_answer(addr) {
            Some(stale) => {
                tracing::warn!(name = addr, %error, "name lookup failed; using its last answer");
                Ok(stale)
            }
            None => Err(error),
        },
    }
}

fn unsupported_in_simulation() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "unix sockets are not simulated")
}

impl Listener {
    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), PeerAddr::Tcp(addr)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred().ok();
                let peer = PeerAddr::Unix {
                    uid: cred.map(|c| c.uid()),
                    gid: cred.map(|c| c.gid()),
                };
                Ok((Stream::Unix(s), peer))
            }
            Listener::Sim(l) => {
                let (s, addr) = l.accept().await?;
                Ok((Stream::Sim(s), PeerAddr::Tcp(addr)))
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<PeerAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(PeerAddr::Tcp),
            Listener::Unix(_) => Ok(PeerAddr::Unix {
                uid: None,
                gid: None,
            }),
            Listener::Sim(l) => l.local_addr().map(PeerAddr::Tcp),
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (Stream, PeerAddr) {
        loop {
            match Listener::accept(self).await {
                Ok(pair) => return pair,
                Err(error) => {
                    // Resource exhaustion (EMFILE and friends) must not spin the accept loop.
                    tracing::warn!(%error, "accept failed; pausing before the next accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        Listener::local_addr(self)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> PeerAddr {
        stream.remote_addr().clone()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
            Stream::Sim($s) => $e,
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_lookup_serves_the_last_answer_for_that_name() {
        // `.invalid` never resolves (RFC 6761).
        let name = "replica.outpost-test.invalid:6379";
        assert!(resolve(name).await.is_err(), "nothing remembered yet");
        let known: std::net::SocketAddr = "127.0.0.1:6379".parse().expect("an address");
        remember_answer(name, &[known]);
        assert_eq!(resolve(name).await.expect("the last answer"), vec![known]);
    }

    #[tokio::test]
    async fn an_answered_lookup_is_remembered_and_literals_pass_through() {
        let found = resolve("localhost:5432").await.expect("localhost resolves");
        assert!(
            found
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 5432)
        );
        assert_eq!(last_answer("localhost:5432"), Some(found));
        let literal = resolve("10.0.0.7:80").await.expect("a literal");
        assert_eq!(literal, vec!["10.0.0.7:80".parse().expect("an address")]);
        assert_eq!(last_answer("10.0.0.7:80"), None);
    }
}
