//! Quoting, property-tested against real shells with arbitrary bytes, and injection attempts
//! through a real sshd.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use remote_exec::Outcome;
use remote_exec::quote::command_line;
use tokio_util::sync::CancellationToken;

use crate::harness::{Setup, timeouts};

/// Bytes that matter most to a shell, drawn often; any other non-NUL byte drawn too.
const NASTY: &[u8] = b" \t\n'\"\\$`;&|<>(){}[]*?~#!=%^,-\x01\x7f\xff";

fn random_arg(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(0..24);
    (0..len)
        .map(|_| {
            if rng.random_bool(0.6) {
                NASTY[rng.random_range(0..NASTY.len())]
            } else {
                rng.random_range(1..=255u8)
            }
        })
        .collect()
}

/// `printf '%s\0'` over the quoted args, through `shell -c`: the bytes must come back exactly.
fn round_trip(shell: &str, argv: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut full: Vec<Vec<u8>> = vec![b"printf".to_vec(), b"%s\\0".to_vec()];
    full.extend(argv.iter().cloned());
    let line = command_line(&full).expect("no NUL in generated args");
    let out = std::process::Command::new(shell)
        .arg("-c")
        .arg(OsStr::from_bytes(&line))
        .output()
        .unwrap_or_else(|e| panic!("run {shell}: {e}"));
    assert!(out.status.success(), "{shell} failed on {line:?}");
    let mut words: Vec<Vec<u8>> = out.stdout.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    words.pop(); // after the last NUL
    words
}

#[test]
fn quoted_arguments_reach_real_shells_byte_for_byte() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let shells: Vec<&str> = ["sh", "bash", "dash"]
        .into_iter()
        .filter(|s| {
            std::process::Command::new(s)
                .args(["-c", "true"])
                .status()
                .is_ok()
        })
        .collect();
    assert!(shells.contains(&"sh"), "no `sh` on this machine");
    for case in 0..300 {
        let n = rng.random_range(1..6);
        let argv: Vec<Vec<u8>> = (0..n).map(|_| random_arg(&mut rng)).collect();
        for shell in &shells {
            assert_eq!(round_trip(shell, &argv), argv, "case {case} in {shell}");
        }
    }
}

/// No argument is syntax, in command position either: `["X=1", "env"]` asks for a program
/// named `X=1` (not found, 127), never for `env` with `X=1` in its environment.
#[test]
fn an_assignment_in_command_position_stays_a_word() {
    for shell in ["sh", "bash", "dash"] {
        let line = command_line(&["X=1", "env"]).expect("quotable");
        let Ok(out) = std::process::Command::new(shell)
            .arg("-c")
            .arg(OsStr::from_bytes(&line))
            .output()
        else {
            continue; // that shell is not installed; `sh` is checked by the property test
        };
        assert_eq!(out.status.code(), Some(127), "{shell} ran {line:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("X=1"),
            "{shell}"
        );
    }
}

#[tokio::test]
async fn no_argument_injects_a_command_through_sshd() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("pwned");
    let m = marker.display();
    let attacks = [
        format!("; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("\ntouch {m}"),
        format!("' ; touch {m} ; '"),
        format!("\" ; touch {m} ; \""),
        format!("&& touch {m}"),
        format!("| touch {m}"),
        format!("> {m}"),
        format!("\\'; touch {m}; #"),
    ];
    let mut argv = vec!["printf".to_string(), "%s\\n".to_string()];
    argv.extend(attacks.iter().cloned());
    let line = command_line(&argv).expect("quotable");
    let client = s.client(timeouts());
    let mut conn = client.connect(&s.good("db1")).await.expect("connect");
    let mut out = Vec::new();
    let mut sink = |_: remote_exec::OutputKind, chunk: &[u8]| out.extend_from_slice(chunk);
    let report = conn
        .exec(&line, None, &mut sink, &CancellationToken::new())
        .await;
    conn.close().await;
    assert_eq!(report.outcome, Outcome::Ok, "{report:?}");
    let expected: String = attacks.iter().map(|a| format!("{a}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out), expected);
    assert!(!marker.exists(), "an argument ran as a command");
}
