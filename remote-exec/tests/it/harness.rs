//! One real sshd per test, hosts that point at it, and a TCP relay that can freeze a link.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use remote_exec::{Client, Host, HostKeyPolicy, Timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use world::World;

pub struct Setup {
    pub sshd: fixtures::Sshd,
}

/// Short timeouts so failures show in seconds; the command deadline stays generous.
pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(5),
        command: Duration::from_secs(30),
        idle: Duration::from_millis(1500),
    }
}

impl Setup {
    pub async fn start() -> Setup {
        let sshd = fixtures::Sshd::start().await.expect("start sshd");
        Setup { sshd }
    }

    /// A host reaching this sshd (or `port` instead, for the failure cases).
    pub fn host(&self, name: &str, port: u16) -> Host {
        Host {
            name: name.to_string(),
            address: "127.0.0.1".to_string(),
            port,
            user: self.sshd.user().to_string(),
            identity_file: self.sshd.client_key(),
            known_hosts: self.sshd.known_hosts(),
            groups: vec![],
        }
    }

    pub fn good(&self, name: &str) -> Host {
        self.host(name, self.sshd.port())
    }

    pub fn client(&self, timeouts: Timeouts) -> Arc<Client> {
        Arc::new(Client::new(World::real(), timeouts, HostKeyPolicy::Strict))
    }

    /// A known_hosts file with this server's key (for the relay's address too).
    pub fn known_hosts_for(&self, ports: &[u16], dir: &std::path::Path) -> PathBuf {
        let line = std::fs::read_to_string(self.sshd.known_hosts()).expect("read known_hosts");
        let key = line.split_once(' ').expect("host and key").1;
        let path = dir.join("known_hosts");
        let text: String = ports
            .iter()
            .map(|p| format!("[127.0.0.1]:{p} {key}"))
            .collect();
        std::fs::write(&path, text).expect("write known_hosts");
        path
    }
}

/// A port on which nothing listens (bound, then released).
pub async fn closed_port() -> u16 {
    let l = World::real()
        .net()
        .bind("127.0.0.1:0")
        .await
        .expect("bind probe");
    port_of(&l)
}

pub fn port_of(l: &world::Listener) -> u16 {
    match l.local_addr().expect("local addr") {
        world::PeerAddr::Tcp(a) => a.port(),
        world::PeerAddr::Unix { .. } => unreachable!("tcp listener"),
    }
}

/// A listener that accepts connections, writes `greeting` (nothing, or an SSH banner) and then
/// holds them open in silence: a host that hangs before or during the key exchange.
async fn holding_listener(greeting: &'static [u8]) -> (u16, tokio::task::JoinHandle<()>) {
    let l = World::real()
        .net()
        .bind("127.0.0.1:0")
        .await
        .expect("bind holding listener");
    let port = port_of(&l);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(greeting).await;
            held.push(s);
        }
    });
    (port, task)
}

/// Accepts and never says a word (no SSH banner).
pub async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    holding_listener(b"").await
}

/// Sends an SSH banner and then nothing: the key exchange never completes.
pub async fn mute_after_banner() -> (u16, tokio::task::JoinHandle<()>) {
    holding_listener(b"SSH-2.0-OpenSSH_9.2\r\n").await
}

/// A TCP relay in front of `upstream`. `freeze()` stops forwarding in both directions while
/// keeping both sockets open: a half-open link, as a frozen kernel or a dropped route makes.
pub struct Relay {
    pub port: u16,
    frozen: CancellationToken,
    stop: CancellationToken,
}

impl Relay {
    pub async fn start(upstream: u16) -> Relay {
        let net = World::real().net();
        let l = net.bind("127.0.0.1:0").await.expect("bind relay");
        let port = port_of(&l);
        let frozen = CancellationToken::new();
        let stop = CancellationToken::new();
        let (f, s) = (frozen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    () = s.cancelled() => return,
                };
                let Ok((down, _)) = accepted else { return };
                let Ok(up) = net.connect(&format!("127.0.0.1:{upstream}")).await else {
                    continue;
                };
                let (dr, dw) = tokio::io::split(down);
                let (ur, uw) = tokio::io::split(up);
                tokio::spawn(pump(dr, uw, f.clone(), s.clone()));
                tokio::spawn(pump(ur, dw, f.clone(), s.clone()));
            }
        });
        Relay { port, frozen, stop }
    }

    pub fn freeze(&self) {
        self.frozen.cancel();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pump<R, W>(mut r: R, mut w: W, frozen: CancellationToken, stop: CancellationToken)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            () = frozen.cancelled() => break,
            () = stop.cancelled() => return,
        };
        if frozen.is_cancelled() {
            break;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: hold both sockets open, forward nothing, until the test ends.
    stop.cancelled().await;
    drop((r, w));
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}
