//! What a remote host prints for `outpost exec status` (receipt lines), and op ids.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = remote_exec::receipt::parse_status(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = remote_exec::receipt::OpId::parse(text);
    }
});
