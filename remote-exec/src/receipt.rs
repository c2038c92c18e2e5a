//! Execution receipts: the remote side records start and exit status under the operation id,
//! so a run whose transport died can be reconciled later (`outpost exec status OP_ID`).
//!
//! The command runs inside a small POSIX `sh` wrapper that
//! 1. writes `~/.outpost/receipts/OP_ID.start` (the wrapper's pid) before the command starts —
//!    if it cannot, the command does not run and the wrapper exits 255 with a message;
//! 2. runs the command as a child and forwards TERM/INT/HUP to it, so cancellation and the
//!    command deadline stop the real process, not only the shell;
//! 3. writes `OP_ID.exit` (the exit status, atomically by rename) when it ends.
//!
//! Receipts older than 30 days are removed now and then by later runs.

use std::fmt;

/// Exit status of the wrapper when it cannot record the start receipt (the command did not run).
pub const RECEIPT_UNWRITABLE_EXIT: u32 = 255;

/// An operation id: what receipts are keyed by. 1-64 of `a-z 0-9 -`, so it is safe in a path
/// and in a shell word without quoting.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(String);

#[derive(Debug, thiserror::Error)]
#[error("operation id {0:?} is not 1-64 characters of a-z 0-9 -")]
pub struct BadOpId(String);

impl OpId {
    pub fn parse(s: &str) -> Result<OpId, BadOpId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(OpId(s.to_string()))
        } else {
            Err(BadOpId(s.to_string()))
        }
    }

    /// A fresh id: wall-clock milliseconds (so ids sort by time) and 32 random bits.
    pub fn generate(world: &world::World) -> OpId {
        OpId(format!(
            "op-{:x}-{:08x}",
            world.now_unix_ms(),
            world.random_below(1 << 32)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const DIR: &str = r#"d="$HOME/.outpost/receipts""#;

/// The remote command line that runs `command` (already quoted for a POSIX shell) under
/// receipts for `op_id`.
pub fn wrap(op_id: &OpId, command: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(command.len() + 600);
    s.extend_from_slice(DIR.as_bytes());
    s.extend_from_slice(
        format!(
            "; o={op_id}; umask 077\n\
             if ! {{ {{ [ -d \"$d\" ] || mkdir -p \"$d\"; }} && printf '%s\\n' \"$$\" > \"$d/$o.start\"; }}; then \
             echo \"outpost: cannot write the execution receipt $d/$o.start; the command did not run\" >&2; exit {RECEIPT_UNWRITABLE_EXIT}; fi\n\
             [ $(($$ % 64)) -eq 0 ] && find \"$d\" -type f -mtime +30 -exec rm -f {{}} + 2>/dev/null\n\
             trap 'kill -TERM \"$c\" 2>/dev/null' TERM INT HUP\n"
        )
        .as_bytes(),
    );
    s.extend_from_slice(command);
    s.extend_from_slice(
        b" &\nc=$!\n\
          while :; do wait \"$c\"; r=$?; kill -0 \"$c\" 2>/dev/null || break; done\n\
          printf '%s\\n' \"$r\" > \"$d/$o.exit.tmp\" && mv -f \"$d/$o.exit.tmp\" \"$d/$o.exit\"\n\
          exit \"$r\"\n",
    );
    s
}

/// The remote command line that sends TERM to a running operation's wrapper, which forwards
/// it to the command. Used on cancellation and at the command deadline: it does not depend on
/// the server honouring SSH `signal` requests (OpenSSH refuses them for root sessions).
pub fn stop_script(op_id: &OpId) -> Vec<u8> {
    format!(
        "{DIR}; o={op_id}\n\
         [ -f \"$d/$o.exit\" ] || {{ read p < \"$d/$o.start\" && kill -TERM \"$p\"; }} 2>/dev/null; exit 0\n"
    )
    .into_bytes()
}

/// What the receipts on one host say about an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// The command ended with this exit status.
    Finished(i32),
    /// Started and its wrapper is still alive.
    Running,
    /// No start receipt: the command never started on this host.
    NeverStarted,
    /// Started, but the wrapper is gone without an exit receipt (host rebooted, wrapper
    /// killed), or the host could not be asked.
    Unknown,
}

impl ReceiptStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReceiptStatus::Finished(_) => "finished",
            ReceiptStatus::Running => "running",
            ReceiptStatus::NeverStarted => "never_started",
            ReceiptStatus::Unknown => "unknown",
        }
    }
}

/// The remote command line that reports the receipts of `op_id`, one line.
pub fn status_script(op_id: &OpId) -> Vec<u8> {
    format!(
        "{DIR}; o={op_id}\n\
         if [ -f \"$d/$o.exit\" ]; then printf 'finished %s\\n' \"$(cat \"$d/$o.exit\")\"\n\
         elif [ -f \"$d/$o.start\" ]; then read p < \"$d/$o.start\"; \
         if kill -0 \"$p\" 2>/dev/null; then echo running; else echo unknown; fi\n\
         else echo never_started; fi\n"
    )
    .into_bytes()
}

/// Parse what [`status_script`] printed.
pub fn parse_status(output: &[u8]) -> Option<ReceiptStatus> {
    let text = std::str::from_utf8(output).ok()?.trim();
    match text.split_once(' ') {
        Some(("finished", code)) => code.trim().parse().ok().map(ReceiptStatus::Finished),
        None if text == "running" => Some(ReceiptStatus::Running),
        None if text == "never_started" => Some(ReceiptStatus::NeverStarted),
        None if text == "unknown" => Some(ReceiptStatus::Unknown),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{OpId, ReceiptStatus, parse_status};

    #[test]
    fn op_ids_are_path_and_shell_safe() {
        assert!(OpId::parse("op-18f3c2a-1b2c3d4e").is_ok());
        for bad in ["", "A", "a/b", "a b", "$(x)", &"a".repeat(65)] {
            assert!(OpId::parse(bad).is_err(), "{bad:?}");
        }
        let w = world::World::simulated(1, std::time::UNIX_EPOCH);
        let id = OpId::generate(&w);
        assert_eq!(OpId::parse(id.as_str()).expect("generated ids parse"), id);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            parse_status(b"finished 0\n"),
            Some(ReceiptStatus::Finished(0))
        );
        assert_eq!(
            parse_status(b"finished 143\n"),
            Some(ReceiptStatus::Finished(143))
        );
        assert_eq!(parse_status(b"running\n"), Some(ReceiptStatus::Running));
        assert_eq!(
            parse_status(b"never_started\n"),
            Some(ReceiptStatus::NeverStarted)
        );
        assert_eq!(parse_status(b"unknown\n"), Some(ReceiptStatus::Unknown));
        assert_eq!(parse_status(b"finished x\n"), None);
        assert_eq!(parse_status(b"bash: no such file\n"), None);
    }
}
