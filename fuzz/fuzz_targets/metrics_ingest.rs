//! A metrics ingest body, plain or gzip (first byte chooses), through decoding and admission.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((mode, body)) = data.split_first() {
        control_plane::fuzz::ingest_body(body, mode & 1 == 1);
    }
});
