//! Configuration text: the agent's and the control plane's TOML, and an `outpost exec`
//! inventory, each through parsing and validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    control_plane::fuzz::serve_config(text);
    if let Ok(mut raw) = toml::from_str::<agent::config::RawAgentConfig>(text) {
        // Keys that name files are dropped: the target is the decoder, not /dev/zero.
        raw.ca_file = None;
        let _ = agent::config::validate(raw);
    }
    let _ = remote_exec::Inventory::parse(
        text,
        std::path::Path::new("fuzz.toml"),
        std::path::Path::new("/nonexistent"),
        None,
    );
});
