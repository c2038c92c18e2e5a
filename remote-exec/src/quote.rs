//! Quoting argv for a POSIX shell.
//!
//! An SSH `exec` request carries one string that the remote login shell parses. Every argument
//! is wrapped in single quotes, inside which a POSIX shell gives no character a meaning; a
//! single quote itself becomes `'\''` (close, escaped quote, reopen). Words made only of
//! characters no shell treats specially are left bare for readability. NUL cannot travel in an
//! argv at all and is refused.

/// An argument that no shell quoting can carry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    #[error("argument {index} contains a NUL byte, which no process argument can hold")]
    Nul { index: usize },
    #[error("the command is empty: give a program name")]
    Empty,
}

/// Bytes a shell never gives a meaning to, so a word made only of them needs no quotes. `=`
/// is not one: a bare `NAME=value` in command position is an assignment, so `["X=1", "env"]`
/// would run `env` with `X` set instead of a program named `X=1`.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"_-./:@%+,".contains(&byte)
}

/// Quote one argument so a POSIX shell reads it back as exactly these bytes.
pub fn quote_arg(arg: &[u8], out: &mut Vec<u8>) {
    // A leading `=` or `%` is harmless, but `~` and `#` at the start are not: plain set excludes them.
    if !arg.is_empty() && arg.iter().all(|&b| is_plain(b)) {
        out.extend_from_slice(arg);
        return;
    }
    out.push(b'\'');
    for &b in arg {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// Join argv into one command line for a POSIX shell, each argument quoted.
pub fn command_line<A: AsRef<[u8]>>(argv: &[A]) -> Result<Vec<u8>, QuoteError> {
    if argv.is_empty() {
        return Err(QuoteError::Empty);
    }
    let mut out = Vec::new();
    for (index, arg) in argv.iter().enumerate() {
        let arg = arg.as_ref();
        if arg.contains(&0) {
            return Err(QuoteError::Nul { index });
        }
        if index > 0 {
            out.push(b' ');
        }
        quote_arg(arg, &mut out);
    }
    Ok(out)
}

/// Split a command line made by [`command_line`] back into argv. Understands single quotes,
/// backslash escapes outside quotes and blanks between words: the subset this module emits
/// (the simulated SSH server uses it; real hosts run a real shell).
pub fn split(line: &[u8]) -> Vec<Vec<u8>> {
    let mut words = Vec::new();
    let mut word: Option<Vec<u8>> = None;
    let mut bytes = line.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b' ' | b'\t' | b'\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            b'\'' => {
                let w = word.get_or_insert_with(Vec::new);
                for q in bytes.by_ref() {
                    if q == b'\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            b'\\' => {
                let w = word.get_or_insert_with(Vec::new);
                if let Some(next) = bytes.next() {
                    w.push(next);
                }
            }
            other => word.get_or_insert_with(Vec::new).push(other),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::{QuoteError, command_line, split};

    fn line(argv: &[&str]) -> String {
        String::from_utf8(command_line(argv).expect("quotable")).expect("utf-8 in, utf-8 out")
    }

    #[test]
    fn plain_words_stay_bare_and_everything_else_is_single_quoted() {
        assert_eq!(line(&["ls", "-la", "/etc"]), "ls -la /etc");
        assert_eq!(line(&["echo", "a b"]), "echo 'a b'");
        assert_eq!(line(&["echo", ""]), "echo ''");
        assert_eq!(line(&["echo", "it's"]), r"echo 'it'\''s'");
        assert_eq!(line(&["echo", "$(id)"]), "echo '$(id)'");
        assert_eq!(line(&["echo", "~root"]), "echo '~root'");
        assert_eq!(line(&["echo", "#x"]), "echo '#x'");
        assert_eq!(line(&["X=1", "env"]), "'X=1' env");
    }

    #[test]
    fn nul_and_empty_commands_are_refused() {
        assert_eq!(
            command_line(&[b"echo".as_slice(), b"a\0b".as_slice()]),
            Err(QuoteError::Nul { index: 1 })
        );
        assert_eq!(command_line::<&[u8]>(&[]), Err(QuoteError::Empty));
    }

    #[test]
    fn split_reads_back_what_command_line_wrote() {
        let argv: Vec<&[u8]> = vec![b"printf", b"%s\n", b"it's", b"", b"a\\b", b"  x  "];
        let joined = command_line(&argv).expect("quotable");
        assert_eq!(
            split(&joined),
            argv.iter().map(|a| a.to_vec()).collect::<Vec<_>>()
        );
    }
}
