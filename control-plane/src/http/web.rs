//! The browser UI: static files built under `control-plane/web` and embedded at build time.
//! They carry no data; everything they show comes from the authenticated API.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

fn asset(path: &str) -> Response {
    if assets::ASSETS.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the web UI was not built into this binary: run `just web` (npm) and rebuild outpost\n",
        )
            .into_response();
    }
    match assets::ASSETS.iter().find(|(name, _)| *name == path) {
        Some((_, bytes)) => (
            [
                (header::CONTENT_TYPE, content_type(path)),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// `GET /`: the UI's page.
pub async fn index() -> Response {
    asset("index.html")
}

/// `GET /assets/{*path}`.
pub async fn file(Path(path): Path<String>) -> Response {
    asset(&path)
}
