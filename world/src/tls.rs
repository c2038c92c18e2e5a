//! TLS over world streams (rustls with the ring provider): [`TlsListener`] turns a listener's
//! connections into TLS server streams for the control plane; [`connect`] wraps a dialed
//! stream for `https://` and `wss://` URLs. Both give back a [`Stream`], so every HTTP and
//! WebSocket code path is the same with or without TLS.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
pub use rustls::{ClientConfig, ServerConfig};
use tokio::sync::mpsc;

use crate::net::{Listener, PeerAddr, Stream};
use crate::serve::ConnectionCounters;

/// Where Debian (and most Linux distributions) keep the system's trusted CA certificates.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once. A connection accepted beyond it takes the slot of the
/// handshake that has waited longest, which is dropped: clients that connect and stay silent
/// cannot lock out the ones that finish their handshake in milliseconds.
const HANDSHAKES_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A server configuration from PEM files: the certificate chain (leaf first) and its key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting the CA certificates in `ca_file` (PEM), e.g. a private CA
/// or the system bundle ([`SYSTEM_CA_BUNDLE`]).
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_of(ca_file, false)
}

/// As [`client_config`], and the system bundle too when there is one: a private CA for some
/// peers (a Redis) beside public ones (a chat service's webhooks).
pub fn client_config_with_system(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_of(ca_file, true)
}

fn client_config_of(ca_file: &Path, system_too: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates(ca_file)?);
    if added == 0 {
        return Err(file_error(ca_file, "no usable CA certificate in the file"));
    }
    if system_too && let Ok(system) = certificates(Path::new(SYSTEM_CA_BUNDLE)) {
        roots.add_parsable_certificates(system);
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Wrap a dialed stream in TLS, verifying the server's certificate for `host`.
pub async fn connect(config: Arc<ClientConfig>, host: &str, stream: Stream) -> io::Result<Stream> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await?;
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
}

/// A listener whose connections come out as TLS streams. Handshakes run concurrently (one slow
/// client never holds up the others), must finish within 10 s, and at most [`HANDSHAKES_MAX`]
/// are pending: the oldest gives way to a new connection.
pub struct TlsListener {
    ready: mpsc::Receiver<(Stream, PeerAddr)>,
    local: PeerAddr,
    task: tokio::task::JoinHandle<()>,
}

/// A handshake in progress, as the accept loop sees it.
struct Pending {
    handshaking: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl TlsListener {
    pub fn new(
        listener: Listener,
        config: Arc<ServerConfig>,
        counters: Arc<ConnectionCounters>,
    ) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(HANDSHAKES_MAX);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            let mut listener = listener;
            let mut pending: VecDeque<Pending> = VecDeque::with_capacity(HANDSHAKES_MAX);
            loop {
                let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
                pending.retain(|p| p.handshaking.load(Ordering::Relaxed) && !p.task.is_finished());
                if pending.len() >= HANDSHAKES_MAX
                    && let Some(oldest) = pending.pop_front()
                {
                    oldest.task.abort();
                    let evicted = counters.handshakes_evicted.fetch_add(1, Ordering::Relaxed) + 1;
                    if evicted.is_power_of_two() {
                        tracing::warn!(
                            evicted,
                            "{HANDSHAKES_MAX} TLS handshakes pending: dropping the oldest for each new connection (a flood of silent clients?)"
                        );
                    }
                }
                let handshaking = Arc::new(AtomicBool::new(true));
                let (acceptor, tx, counters) =
                    (acceptor.clone(), tx.clone(), Arc::clone(&counters));
                let flag = Arc::clone(&handshaking);
                let task = tokio::spawn(async move {
                    let outcome =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    flag.store(false, Ordering::Relaxed);
                    match outcome {
                        Ok(Ok(tls)) => {
                            let stream =
                                Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => {
                            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
                pending.push_back(Pending {
                    handshaking,
                    task: task.abort_handle(),
                });
            }
        });
        Ok(TlsListener { ready, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Stream;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (Stream, PeerAddr) {
        match self.ready.recv().await {
            Some(pair) => pair,
            // The accept loop only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<PeerAddr> {
        Ok(self.local.clone())
    }
}
