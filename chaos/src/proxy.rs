//! The suite's userspace fault proxy: every agent reaches the control plane through its own
//! listener here, which spreads connections over the replicas (the next one that answers)
//! and, when told, delays every chunk or throttles the link to a few KiB/s. The kernel has no
//! `netem` on machines like this one, so latency and slow links are made here; cuts are
//! iptables rules in the agent's namespace ([`crate::host::Netns::cut`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Every chunk waits this long before it is passed on, both ways.
    Delay(Duration),
    /// At most this many bytes per second each way.
    Slow(u64),
}

pub struct Proxy {
    mode: Mutex<Mode>,
    backends: Vec<String>,
    next: AtomicUsize,
    pub connections: AtomicU64,
}

impl Proxy {
    /// Listen on `listen`, forwarding to `backends`, until `stop`.
    pub async fn start(
        listen: &str,
        backends: Vec<String>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Proxy>> {
        let world = world::World::real();
        let listener = world.net().bind(listen).await?;
        let proxy = Arc::new(Proxy {
            mode: Mutex::new(Mode::Pass),
            backends,
            next: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
        });
        let me = Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let me = Arc::clone(&me);
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Some(upstream) = me.connect().await {
                        me.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = me.pipe(client, upstream) => {}
                        }
                    }
                });
            }
        });
        Ok(proxy)
    }

    pub fn set(&self, mode: Mode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = mode;
        }
    }

    fn mode(&self) -> Mode {
        self.mode.lock().map(|m| *m).unwrap_or(Mode::Pass)
    }

    /// The next backend that accepts, starting from the one after the last used.
    async fn connect(&self) -> Option<world::Stream> {
        let world = world::World::real();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.backends.len() {
            let addr = &self.backends[(first + i) % self.backends.len()];
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), world.net().connect(addr)).await
            {
                return Some(s);
            }
        }
        None
    }

    async fn pipe(&self, client: world::Stream, upstream: world::Stream) {
        let (cr, cw) = tokio::io::split(client);
        let (ur, uw) = tokio::io::split(upstream);
        tokio::select! {
            () = self.copy(cr, uw) => {}
            () = self.copy(ur, cw) => {}
        }
    }

    async fn copy(
        &self,
        mut from: impl tokio::io::AsyncRead + Unpin,
        mut to: impl tokio::io::AsyncWrite + Unpin,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let limit = match self.mode() {
                Mode::Slow(rate) => (rate as usize / 10).clamp(1, buf.len()),
                _ => buf.len(),
            };
            let n = match from.read(&mut buf[..limit]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match self.mode() {
                Mode::Pass => {}
                Mode::Delay(d) => tokio::time::sleep(d).await,
                Mode::Slow(rate) => {
                    let ms = (n as u64 * 1000) / rate.max(1);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
}
