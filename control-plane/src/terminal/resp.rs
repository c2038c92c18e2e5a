//! A small Redis client (RESP2) over `world` streams: one request at a time per connection,
//! pipelines, bounded replies. Only what the terminal streams use; no pub/sub, no cluster.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use world::{Stream, World};

/// Largest bulk string accepted in a reply.
const BULK_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most elements in one reply array.
const ARRAY_LEN_MAX: usize = 1_000_000;
/// Deepest nesting of reply arrays.
const DEPTH_MAX: usize = 8;
/// Longest status or error line.
const LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    /// The server refused this command (`-ERR …`); the connection stays usable.
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("redis at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("redis at {addr} did not answer within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u128 },
    #[error("redis at {addr} sent an unreadable reply: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("redis refused {command}: {message}")]
    Server { command: String, message: String },
    #[error("redis_url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

/// Where and how to connect, from a `redis://[:password@]host:port[/db]` URL.
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub addr: String,
    /// `rediss://`: the host name the server's certificate must match.
    pub tls_host: Option<String>,
    pub password: Option<String>,
    pub username: Option<String>,
    pub db: u32,
}

impl RedisTarget {
    pub fn parse(raw: &str) -> Result<RedisTarget, RespError> {
        let bad = |reason: &str| RespError::Url {
            url: raw.to_string(),
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
        let username = (!url.username().is_empty()).then(|| url.username().to_string());
        Ok(RedisTarget {
            addr: format!("{host}:{port}"),
            tls_host: tls.then(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }),
            password: url.password().map(str::to_string),
            username,
            db,
        })
    }
}

pub struct RespConn {
    io: BufReader<Stream>,
    addr: String,
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl RespConn {
    /// Connect, authenticate and select the database, all within `timeout`.
    pub async fn connect(
        world: &World,
        target: &RedisTarget,
        timeout: Duration,
    ) -> Result<RespConn, RespError> {
        let addr = target.addr.clone();
        let timed_out = || RespError::Timeout {
            addr: addr.clone(),
            timeout_ms: timeout.as_millis(),
        };
        let dial = async {
            let stream = world.net().connect(&target.addr).await?;
            match &target.tls_host {
                None => Ok(stream),
                Some(host) => {
                    let config = world
                        .tls_client()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    world::tls::connect(config, host, stream).await
                }
            }
        };
        let stream = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| RespError::Io {
                addr: addr.clone(),
                source,
            })?;
        let mut conn = RespConn {
            io: BufReader::new(stream),
            addr: addr.clone(),
        };
        if let Some(password) = &target.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &target.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            conn.call_ok(&args, timeout).await?;
        }
        if target.db != 0 {
            let db = target.db.to_string();
            conn.call_ok(&[b"SELECT", db.as_bytes()], timeout).await?;
        }
        Ok(conn)
    }

    /// Send one command and read its reply; a server error is returned as `Value::Error`.
    pub async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Value, RespError> {
        let mut replies = self.pipeline(&[args.to_vec()], timeout).await?;
        replies.pop().ok_or_else(|| RespError::Protocol {
            addr: self.addr.clone(),
            reason: "no reply".into(),
        })
    }

    /// Like [`RespConn::call`], but a server error becomes `RespError::Server`.
    pub async fn call_ok(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Value, RespError> {
        match self.call(args, timeout).await? {
            Value::Error(message) => Err(RespError::Server {
                command: String::from_utf8_lossy(args.first().copied().unwrap_or_default())
                    .into_owned(),
                message,
            }),
            v => Ok(v),
        }
    }

    /// Send several commands in one write and read all replies, in order.
    pub async fn pipeline(
        &mut self,
        commands: &[Vec<&[u8]>],
        timeout: Duration,
    ) -> Result<Vec<Value>, RespError> {
        let mut out = Vec::new();
        for c in commands {
            encode(&mut out, c);
        }
        let addr = self.addr.clone();
        let io_err = |source| RespError::Io {
            addr: addr.clone(),
            source,
        };
        let work = async {
            self.io.get_mut().write_all(&out).await.map_err(io_err)?;
            self.io.get_mut().flush().await.map_err(io_err)?;
            let mut replies = Vec::with_capacity(commands.len());
            for _ in commands {
                replies.push(read_value(&mut self.io, &addr, 0).await?);
            }
            Ok(replies)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| RespError::Timeout {
                addr: self.addr.clone(),
                timeout_ms: timeout.as_millis(),
            })?
    }
}

type ValueFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, RespError>> + Send + 'a>>;

fn read_value<'a>(io: &'a mut BufReader<Stream>, addr: &'a str, depth: usize) -> ValueFuture<'a> {
    Box::pin(async move {
        let protocol = |reason: String| RespError::Protocol {
            addr: addr.to_string(),
            reason,
        };
        let io_err = |source| RespError::Io {
            addr: addr.to_string(),
            source,
        };
        let mut line = Vec::new();
        let n = (&mut *io)
            .take(LINE_BYTES_MAX as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(io_err)?;
        if n == 0 {
            return Err(io_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(protocol("line too long or not terminated".into()));
        }
        line.truncate(line.len() - 2);
        let (kind, rest) = line
            .split_first()
            .ok_or_else(|| protocol("empty line".into()))?;
        let text = String::from_utf8_lossy(rest).into_owned();
        let number = || -> Result<i64, RespError> {
            text.parse()
                .map_err(|_| protocol(format!("bad number {text:?}")))
        };
        match kind {
            b'+' => Ok(Value::Status(text)),
            b'-' => Ok(Value::Error(text)),
            b':' => Ok(Value::Int(number()?)),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    return Ok(Value::Nil);
                }
                let len = usize::try_from(len).map_err(|_| protocol("bad length".into()))?;
                if len > BULK_BYTES_MAX {
                    return Err(protocol(format!(
                        "bulk string of {len} bytes is over the limit"
                    )));
                }
                let mut buf = vec![0u8; len + 2];
                io.read_exact(&mut buf).await.map_err(io_err)?;
                buf.truncate(len);
                Ok(Value::Bulk(buf))
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    return Ok(Value::Nil);
                }
                let len = usize::try_from(len).map_err(|_| protocol("bad length".into()))?;
                if len > ARRAY_LEN_MAX || depth >= DEPTH_MAX {
                    return Err(protocol("array too large or too deep".into()));
                }
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    items.push(read_value(io, addr, depth + 1).await?);
                }
                Ok(Value::Array(items))
            }
            other => Err(protocol(format!("unknown reply type {:?}", *other as char))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::RedisTarget;

    #[test]
    fn urls_parse_or_say_why_not() {
        let t = RedisTarget::parse("redis://:s3cret@10.0.0.2:6380/2").expect("parses");
        assert_eq!(t.addr, "10.0.0.2:6380");
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert_eq!(t.db, 2);
        let t = RedisTarget::parse("redis://localhost").expect("parses");
        assert_eq!(t.addr, "localhost:6379");
        let t = RedisTarget::parse("rediss://cache.example:6380").expect("TLS parses");
        assert_eq!(t.tls_host.as_deref(), Some("cache.example"));
        assert!(
            RedisTarget::parse("redis://x")
                .expect("parses")
                .tls_host
                .is_none()
        );
        let e = RedisTarget::parse("http://x")
            .expect_err("scheme")
            .to_string();
        assert!(e.contains("rediss://"), "{e}");
        assert!(RedisTarget::parse("redis://h/notanumber").is_err());
    }
}
