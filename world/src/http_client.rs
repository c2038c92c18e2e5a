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

/// Where a URL leads: `host:port` to dial, the host name a TLS certificate must match, and
/// whether the scheme (`https`, `wss`) asks for TLS.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub addr: String,
    pub host: String,
    pub tls: bool,
}

/// The [`Endpoint`] of an `http(s)://` or `ws(s)://` URL; other schemes are refused.
pub(crate) fn authority(url: &url::Url) -> Result<Endpoint, HttpError> {
    let bad = |reason: &str| HttpError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (default_port, tls) = match url.scheme() {
        "http" | "ws" => (80, false),
        "https" | "wss" => (443, true),
        _ => return Err(bad("scheme must be http, https, ws or wss")),
    };
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let port = url.port().unwrap_or(default_port);
    // An IPv6 literal keeps its brackets in `host:port`, not in the certificate name.
    let name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Endpoint {
        addr: format!("{host}:{port}"),
        host: name,
        tls,
    })
}

/// Dial an endpoint, with TLS when it asks for it (trusting [`World::set_tls_client`]'s CAs).
pub(crate) async fn dial(world: &World, endpoint: &Endpoint) -> std::io::Result<crate::Stream> {
    let stream = world.net().connect(&endpoint.addr).await?;
    if !endpoint.tls {
        return Ok(stream);
    }
    let config = world
        .tls_client()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    crate::tls::connect(config, &endpoint.host, stream).await
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
    let (endpoint, path, socket) = match target {
        Target::Url(url) => {
            let endpoint = authority(url)?;
            let path = match url.query() {
                Some(q) => format!("{}?{}", url.path(), q),
                None => url.path().to_string(),
            };
            (endpoint, path, None)
        }
        Target::Unix { socket, path } => (
            Endpoint {
                addr: "localhost".to_string(),
                host: "localhost".to_string(),
                tls: false,
            },
            path.to_string(),
            Some(socket),
        ),
    };
    exchange(
        world,
        endpoint,
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
    endpoint: Endpoint,
    path: String,
    socket: Option<&std::path::Path>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
    body_bytes_max: usize,
) -> Result<HttpResponse, HttpError> {
    let addr = endpoint.addr.clone();
    let scheme = if endpoint.tls { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
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
            None => dial(world, &endpoint).await,
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
