//! Cron expressions and time zone names as `outpost-agent tasks add --cron --tz` takes them;
//! a parsed schedule must answer "when next" without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, tz) = text.split_once('\n').unwrap_or((text, "UTC"));
    if let Ok(cron) = agent::tasks::cron::Cron::parse(expr, tz) {
        let _ = cron.next_after_ms(1_700_000_000_000);
    }
});
