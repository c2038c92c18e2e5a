//! Entry points for the fuzz targets in `fuzz/` (`just fuzz`): each feeds bytes from outside
//! to a decoder exactly as the control plane does, and must return, never panic or hang.

/// A metrics ingest body (gzip or not) through decoding and admission.
pub fn ingest_body(body: &[u8], gzip: bool) {
    if let Ok(batch) = crate::http::metrics::decode(body, gzip) {
        let _ = crate::http::metrics::admit(batch, 1_700_000_000_000, 30 * crate::time::DAY_MS);
    }
}

/// An XREAD reply from Redis (RESP bytes) through the terminal store's entry decoding and MAC
/// check.
pub fn redis_reply(resp: &[u8]) {
    let signer = crate::terminal::streams::sign::Signer::new([7; 32]);
    let _ = crate::terminal::streams::redis::decode_xread(resp, &signer);
}

/// A text frame from a browser's terminal socket.
pub fn browser_frame(text: &str) {
    let _ = serde_json::from_str::<crate::terminal::browser::FromBrowser>(text);
}

/// `outpost serve --config` text through parsing and validation. The keys naming files are
/// dropped first: the target is the decoder, not whatever file a fuzzer names (`/dev/zero`).
pub fn serve_config(text: &str) {
    if let Ok(mut raw) = toml::from_str::<crate::config::RawServeConfig>(text) {
        raw.tls_cert = None;
        raw.tls_key = None;
        raw.ca_file = None;
        raw.inventory = None;
        let _ = crate::config::validate(raw);
    }
}
