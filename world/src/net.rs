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

    /// Connect to `host:port`. Host names resolve through the OS (real) or turmoil's DNS.
    pub async fn connect(&self, addr: &str) -> io::Result<Stream> {
        if self.simulated {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Stream::Sim(stream))
        } else {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Stream::Tcp(stream))
        }
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
