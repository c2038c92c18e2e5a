//! Control channel and terminal link text frames, both directions, as JSON.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<proto::AgentMessage>(data);
    let _ = serde_json::from_slice::<proto::ServerMessage>(data);
    let _ = serde_json::from_slice::<proto::TerminalFromAgent>(data);
    let _ = serde_json::from_slice::<proto::TerminalToAgent>(data);
    let _ = serde_json::from_slice::<proto::MetricsAck>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        control_plane::fuzz::browser_frame(text);
    }
});
