//! An XREAD reply as Redis would send it (RESP bytes), through the terminal store's parsing
//! of output entries and input events and its MAC check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    control_plane::fuzz::redis_reply(data);
});
