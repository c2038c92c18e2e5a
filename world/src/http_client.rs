//! A minimal HTTP/1.1 client over [`crate::Stream`]: one connection per request, a deadline
//! on the whole exchange and a cap on the response body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use crate::World;

#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr} did not finish within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u128 },
    #[error("HTTP exchange with {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("response body from {addr} is larger than {limit_bytes} bytes")]
    BodyTooLarge { addr: String, limit_bytes: usize },
}

/// `host:port` of an `http://` or `ws://` URL; other schemes are refused with a clear reason.
pub(crate) fn authority(url: &url::Url) -> Result<String, HttpError> {
    let bad = |reason: &str| HttpError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let default_port = match url.scheme() {
        "http" | "ws" => 80,
        "https" | "wss" => {
            return Err(bad(
                "TLS is not supported by this build; use http:// behind a TLS-terminating proxy",
            ));
        }
        _ => return Err(bad("scheme must be http or ws")),
    };
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let port = url.port().unwrap_or(default_port);
    Ok(format!("{host}:{port}"))
}

/// Where an HTTP request goes.
#[derive(Clone, Debug)]
pub enum Target<'a> {
    /// `http://host:port/…`
    Url(&'a url::Url),
    /// A Unix socket and the path (with query) to request on it.
    Unix {
        socket: &'a std::path::Path,
        path: &'a str,
    },
}

/// Send one request and read the whole response (at most `body_bytes_max` bytes), all within
/// `timeout`.
pub async fn http_request(
    world: &World,
    method: Method,
    url: &url::Url,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
    body_bytes_max: usize,
) -> Result<HttpResponse, HttpError> {
    request(
        world,
        Target::Url(url),
        method,
        headers,
        body,
        timeout,
        body_bytes_max,
    )
    .await
}

/// [`http_request`] to any [`Target`], e.g. an agent's local API socket.
pub async fn request(
    world: &World,
    target: Target<'_>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
    body_bytes_max: usize,
) -> Result<HttpResponse, HttpError> {
    let (addr, path, socket) = match target {
        Target::Url(url) => {
            let addr = authority(url)?;
            let path = match url.query() {
                Some(q) => format!("{}?{}", url.path(), q),
                None => url.path().to_string(),
            };
            (addr, path, None)
        }
        Target::Unix { socket, path } => ("localhost".to_string(), path.to_string(), Some(socket)),
    };
    exchange(
        world,
        addr,
        path,
        socket,
        method,
        headers,
        body,
        timeout,
        body_bytes_max,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    world: &World,
    addr: String,
    path: String,
    socket: Option<&std::path::Path>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
    body_bytes_max: usize,
) -> Result<HttpResponse, HttpError> {
    let url = format!("http://{addr}{path}");
    let shown = match socket {
        Some(s) => s.display().to_string(),
        None => addr.clone(),
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.as_str());
    for (name, value) in &headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| HttpError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let exchange = async {
        let addr = &shown;
        let stream = match socket {
            Some(s) => world.net().connect_unix(s).await,
            None => world.net().connect(addr).await,
        }
        .map_err(|source| HttpError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let protocol = |e: hyper::Error| HttpError::Protocol {
            addr: addr.clone(),
            reason: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
        // The connection future ends once `sender` is dropped at the end of `talk`.
        let talk = async move {
            let response = sender.send_request(request).await.map_err(protocol)?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, body_bytes_max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::BodyTooLarge {
                            addr: addr.clone(),
                            limit_bytes: body_bytes_max,
                        }
                    } else {
                        HttpError::Protocol {
                            addr: addr.clone(),
                            reason: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let (result, _conn) = tokio::join!(talk, conn);
        result
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout {
            addr: shown,
            timeout_ms: timeout.as_millis(),
        }),
    }
}
