//! The HTTP/1.1 server loop the control plane runs on any listener (TCP, TLS or simulated):
//! a cap on connections served at once (in all and per source address), a deadline for each request's headers, graceful
//! shutdown. `axum::serve` has neither the cap nor the deadline, so a client that opens
//! connections and never finishes a request (slowloris) would hold them forever.

use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};

use crate::net::{PeerAddr, Stream};
use crate::slots::{KeyedSlots, Slot};

/// Limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections served at once (WebSockets included); a connection accepted beyond it is
    /// closed at once and counted in [`ConnectionCounters::refused`].
    pub max_connections: usize,
    /// A client must send a request's complete headers within this, counted from the moment
    /// the server waits for them: it is also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// Connections served at once from one IP address (`None`: no such cap, as behind a proxy
    /// every connection comes from); one beyond it is closed at once and counted in
    /// [`ConnectionCounters::refused_per_address`].
    pub max_connections_per_address: Option<usize>,
}

/// What [`serve`] and [`crate::tls::TlsListener`] count, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// Connections being served now.
    pub open: AtomicU64,
    /// Connections closed on accept because [`ServeLimits::max_connections`] were open.
    pub refused: AtomicU64,
    /// Connections closed on accept because their address had
    /// [`ServeLimits::max_connections_per_address`] open.
    pub refused_per_address: AtomicU64,
    /// TLS handshakes dropped unfinished to make room for a newer connection.
    pub handshakes_evicted: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub handshakes_failed: AtomicU64,
}

/// A served connection's stream holding its slot: the slot is given back when the stream is
/// dropped, which for a WebSocket is when the socket closes, not when the upgrade is done.
struct Counted {
    stream: Stream,
    counters: Arc<ConnectionCounters>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _address: Option<Slot<IpAddr>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serve `router` on every connection `listener` accepts until `shutdown` completes, then stop
/// accepting, let each connection finish the request it is serving, and return once all have.
/// Upgraded connections (WebSockets) are handed to their handlers and not waited for.
pub async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    limits: ServeLimits,
    counters: Arc<ConnectionCounters>,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener<Io = Stream, Addr = PeerAddr>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let addresses: Arc<KeyedSlots<IpAddr>> = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            pair = listener.accept() => pair,
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            let refused = counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
            // One line for the first refusal and then at every power of two, not one per
            // connection of a flood.
            if refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused,
                    max_connections = limits.max_connections,
                    "connection refused: max_connections are open (raise it if this is the fleet's size, not a flood)"
                );
            }
            drop(stream);
            continue;
        };
        let address = match (limits.max_connections_per_address, &peer) {
            (Some(max), PeerAddr::Tcp(addr)) => {
                let Some(place) = addresses.acquire(&addr.ip(), max) else {
                    let refused = counters.refused_per_address.fetch_add(1, Ordering::Relaxed) + 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            %peer,
                            refused,
                            max_connections_per_address = max,
                            "connection refused: its address has max_connections_per_address open (raise it for agents behind one NAT address)"
                        );
                    }
                    drop(stream);
                    continue;
                };
                Some(place)
            }
            _ => None,
        };
        counters.open.fetch_add(1, Ordering::Relaxed);
        let stream = Counted {
            stream,
            counters: Arc::clone(&counters),
            _slot: slot,
            _address: address,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let mut connection = pin!(
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
            );
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.changed() => connection.as_mut().graceful_shutdown(),
            }
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error during shutdown");
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}
