//! Deadlines for a whole request, not only its headers (the server loop has those): a body
//! must arrive within `body_timeout` of the headers, and every request that is not a WebSocket
//! upgrade is answered within `request_timeout`. Either miss answers an error with
//! `Connection: close`, so a client that sends `Content-Length: 100` and one byte holds its
//! connection for seconds, not forever. Upgrades are left alone: their handlers answer at once
//! and the socket lives on under the terminal's and the channel's own liveness checks.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::edge::ApiError;
use crate::state::AppState;

/// A request body that fails once its deadline passes, and says so through `expired`.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new("request body deadline passed"))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn is_upgrade(request: &Request) -> bool {
    request.headers().contains_key(header::UPGRADE)
}

/// The middleware: every non-upgrade request under both deadlines.
pub async fn enforce(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_upgrade(&request) {
        return next.run(request).await;
    }
    let (body_timeout, request_timeout) =
        (state.settings.body_timeout, state.settings.request_timeout);
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(body_timeout)),
            expired: Arc::clone(&expired),
        })
    });
    let answer = tokio::time::timeout(request_timeout, next.run(request)).await;
    let (status, message, counter) = match answer {
        Ok(response) if !expired.load(Ordering::Relaxed) => return response,
        Ok(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s (body_timeout)",
                body_timeout.as_secs()
            ),
            &state.observed.http_body_deadlines_total,
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request was not answered within {} s (request_timeout)",
                request_timeout.as_secs()
            ),
            &state.observed.http_request_deadlines_total,
        ),
    };
    crate::observe::add(counter, 1);
    let mut response = ApiError::new(status, message).into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}
