//! WebSocket client over [`crate::Stream`]. The server side is axum's upgrade route served on
//! a [`crate::Listener`].

use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::http_client::{HttpError, authority, dial};
use crate::{Stream, World};

pub type WsStream = tokio_tungstenite::WebSocketStream<Stream>;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error(transparent)]
    Url(#[from] HttpError),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("WebSocket handshake with {addr} did not finish within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u128 },
    #[error("WebSocket handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
}

impl WsError {
    /// The HTTP status the server answered the upgrade with, when it refused it.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            WsError::Handshake { source, .. } => match source.as_ref() {
                tokio_tungstenite::tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Dial `url` (`ws://` or `http://`), optionally with a bearer token, and complete the
/// WebSocket handshake within `timeout`. Messages larger than `message_bytes_max` are refused.
pub async fn ws_connect(
    world: &World,
    url: &url::Url,
    bearer: Option<&str>,
    timeout: Duration,
    message_bytes_max: usize,
) -> Result<WsStream, WsError> {
    ws_connect_with(world, url, bearer, &[], timeout, message_bytes_max).await
}

/// As [`ws_connect`], with further request headers (name, value).
pub async fn ws_connect_with(
    world: &World,
    url: &url::Url,
    bearer: Option<&str>,
    headers: &[(&'static str, &str)],
    timeout: Duration,
    message_bytes_max: usize,
) -> Result<WsStream, WsError> {
    let endpoint = authority(url)?;
    let addr = endpoint.addr.clone();
    let mut ws_url = url.clone();
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => other,
    };
    // Only fails for cannot-be-a-base URLs, which `authority` already refused.
    let _ = ws_url.set_scheme(scheme);
    let mut request =
        ws_url
            .as_str()
            .into_client_request()
            .map_err(|source| WsError::Handshake {
                addr: addr.clone(),
                source: Box::new(source),
            })?;
    if let Some(token) = bearer {
        let value = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| {
            WsError::Url(HttpError::BadUrl {
                url: url.to_string(),
                reason: format!("credential is not a valid header value: {e}"),
            })
        })?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
    }
    for (name, value) in headers {
        let value = http::HeaderValue::from_str(value).map_err(|e| {
            WsError::Url(HttpError::BadUrl {
                url: url.to_string(),
                reason: format!("header {name} is not a valid header value: {e}"),
            })
        })?;
        request.headers_mut().insert(*name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(message_bytes_max))
        .max_frame_size(Some(message_bytes_max));
    let dial = async {
        let stream = dial(world, &endpoint)
            .await
            .map_err(|source| WsError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|source| WsError::Handshake {
                    addr: addr.clone(),
                    source: Box::new(source),
                })?;
        Ok(ws)
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(result) => result,
        Err(_) => Err(WsError::Timeout {
            addr,
            timeout_ms: timeout.as_millis(),
        }),
    }
}
