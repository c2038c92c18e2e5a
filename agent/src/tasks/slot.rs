//! A run keeper's slot file, `DATA_DIR/keepers/<pid>-<start ticks>.slot`: what lets a run
//! outlive the agent that started it. Each keeper ([`super::keeper`]) owns one slot and reuses
//! it run after run; the keeper and a recovering agent meet only here.
//!
//! - The first [`HEADER_BYTES`] hold the header: one line, a checksum and a JSON [`Header`]
//!   (format version, the keeper's run and how far it got, whether its agent is gone),
//!   rewritten in place with one `pwrite` per change. The block is written when the slot is
//!   made, so a state change never needs disk space: a full disk cannot keep a keeper from
//!   recording how a command ended.
//! - After it, the command's stdout and stderr, interleaved: the first `output_bytes_max`
//!   bytes of the current run (the file is cut back to the header when the next run starts).
//!
//! Nothing is synced to disk: a slot only has to outlive the agent, which the page cache does.
//! A power loss is told apart by the host's boot id, which the task store keeps.
//!
//! The format is versioned ([`FORMAT`]): a reader accepts every version up to its own, so an
//! agent upgraded while runs are in flight reads what the older keepers write.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::rundir::Exit;

/// The header's size; the output starts after it.
pub const HEADER_BYTES: u64 = 4096;
/// The header format this build writes (and the newest it reads).
pub const FORMAT: u32 = 1;
/// An error text in the header is cut to this many bytes, so the header fits its block.
const ERROR_BYTES_MAX: usize = 2048;
/// The slot files' extension.
const EXTENSION: &str = "slot";

/// What a keeper is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// No run, or the last one acknowledged.
    Idle,
    /// About to start run `run_id`, whose output pipe is inode `pipe` (what a recovering
    /// agent stops when the keeper died before it recorded the command's pid).
    Intent { run_id: i64, pipe: u64 },
    /// Run `run_id`'s command is the process `pid` (started at `ticks`), leading its own
    /// process group.
    Running {
        run_id: i64,
        pipe: u64,
        pid: i32,
        ticks: Option<u64>,
    },
    /// Run `run_id` ended: how, and how many output bytes were cut.
    Ended { run_id: i64, exit: Exit },
}

impl State {
    pub fn run_id(&self) -> Option<i64> {
        match self {
            State::Idle => None,
            State::Intent { run_id, .. }
            | State::Running { run_id, .. }
            | State::Ended { run_id, .. } => Some(*run_id),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The format version ([`FORMAT`] when this build wrote it).
    pub v: u32,
    /// The keeper's agent is gone and the keeper has read all it sent: it starts no more runs.
    #[serde(default)]
    pub drained: bool,
    /// Output bytes cut so far in the current run (written down as the count grows).
    #[serde(default)]
    pub dropped: u64,
    #[serde(flatten)]
    pub state: State,
}

impl Header {
    pub fn new(state: State) -> Header {
        Header {
            v: FORMAT,
            drained: false,
            dropped: 0,
            state,
        }
    }

    /// The header block: `<checksum> <json>\n`, padded with spaces to a fixed length so a
    /// shorter header overwrites all of a longer one.
    pub fn encode(&self) -> Vec<u8> {
        let mut header = self.clone();
        if let State::Ended { exit, .. } = &mut header.state
            && let Some(error) = exit.error.as_mut()
            && error.len() > ERROR_BYTES_MAX
        {
            let mut cut = ERROR_BYTES_MAX;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let json = serde_json::to_string(&header).unwrap_or_default();
        let mut block = format!("{:016x} {json}\n", checksum(json.as_bytes())).into_bytes();
        block.resize(WRITTEN_BYTES.max(block.len()), b' ');
        block
    }

    /// `None` when the block is not a whole header (torn by a concurrent write, or not a
    /// slot) or comes from a newer format than this build reads.
    pub fn decode(block: &[u8]) -> Option<Header> {
        let line = block.split(|b| *b == b'\n').next()?;
        let text = std::str::from_utf8(line).ok()?;
        let (sum, json) = text.split_once(' ')?;
        if u64::from_str_radix(sum, 16).ok()? != checksum(json.as_bytes()) {
            return None;
        }
        let header: Header = serde_json::from_str(json).ok()?;
        (header.v <= FORMAT).then_some(header)
    }
}

/// How much of the header block each write covers: longer than any header.
const WRITTEN_BYTES: usize = ERROR_BYTES_MAX + 1024;

/// FNV-1a: enough to tell a torn header from a whole one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The slot of the keeper `pid` started at `ticks`, under `dir` (`DATA_DIR/keepers`).
pub fn path(dir: &Path, pid: i32, ticks: Option<u64>) -> PathBuf {
    dir.join(format!("{pid}-{}.{EXTENSION}", ticks.unwrap_or(0)))
}

/// The keeper a slot's name says owns it: (pid, start ticks).
pub fn owner(path: &Path) -> Option<(i32, Option<u64>)> {
    if path.extension()? != EXTENSION {
        return None;
    }
    let (pid, ticks) = path.file_stem()?.to_str()?.split_once('-')?;
    let ticks: u64 = ticks.parse().ok()?;
    Some((pid.parse().ok()?, (ticks != 0).then_some(ticks)))
}

/// Every slot under `dir`.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut slots: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| owner(p).is_some())
        .collect();
    slots.sort();
    Ok(slots)
}

/// Create the slot at `path` with its header block written (so later headers never need disk
/// space) and an idle header.
pub fn create(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let mut block = Header::new(State::Idle).encode();
    block.resize(HEADER_BYTES as usize, b' ');
    file.write_all_at(&block, 0)?;
    Ok(file)
}

/// Rewrite the header.
pub fn write(file: &std::fs::File, header: &Header) -> std::io::Result<()> {
    file.write_all_at(&header.encode(), 0)
}

/// Read the header of the slot at `path`; a torn read (a keeper writing at the same instant)
/// is read again. `Ok(None)`: no slot there, or no header this build can read.
pub fn read(path: &Path) -> std::io::Result<Option<Header>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut block = vec![0u8; WRITTEN_BYTES];
    for _ in 0..3 {
        let n = file.read_at(&mut block, 0)?;
        if let Some(header) = Header::decode(&block[..n]) {
            return Ok(Some(header));
        }
    }
    Ok(None)
}

/// The output the current run left in the slot at `path`: at most `limit` bytes.
pub fn read_output(path: &Path, limit: usize) -> Vec<u8> {
    let mut output = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        use std::io::Seek;
        if file.seek(std::io::SeekFrom::Start(HEADER_BYTES)).is_ok() {
            let _ = file.take(limit as u64).read_to_end(&mut output);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_a_torn_or_newer_one_is_refused() {
        let states = [
            State::Idle,
            State::Intent {
                run_id: 7,
                pipe: 99,
            },
            State::Running {
                run_id: 7,
                pipe: 99,
                pid: 4242,
                ticks: Some(77),
            },
            State::Ended {
                run_id: 7,
                exit: Exit {
                    exit_code: Some(3),
                    dropped: 12,
                    ..Exit::default()
                },
            },
        ];
        for state in states {
            let header = Header::new(state);
            let block = header.encode();
            assert_eq!(block.len(), WRITTEN_BYTES);
            assert_eq!(Header::decode(&block), Some(header.clone()));
            // Half of it over an older, longer header: refused, never misread.
            let mut torn = Header::new(State::Ended {
                run_id: 123_456,
                exit: Exit {
                    error: Some("x".repeat(300)),
                    ..Exit::default()
                },
            })
            .encode();
            torn[..40].copy_from_slice(&block[..40]);
            assert_eq!(Header::decode(&torn), None);
        }
        let newer = format!("{{\"v\":{},\"state\":\"idle\"}}", FORMAT + 1);
        let block = format!("{:016x} {newer}\n", checksum(newer.as_bytes()));
        assert_eq!(Header::decode(block.as_bytes()), None);
    }

    #[test]
    fn a_long_error_is_cut_to_fit_the_header() {
        let header = Header::new(State::Ended {
            run_id: 1,
            exit: Exit {
                error: Some("é".repeat(5000)),
                ..Exit::default()
            },
        });
        let block = header.encode();
        assert!(block.len() <= HEADER_BYTES as usize);
        let back = Header::decode(&block).expect("decodes");
        let State::Ended { exit, .. } = back.state else {
            panic!("ended")
        };
        assert!(exit.error.is_some_and(|e| e.len() <= ERROR_BYTES_MAX));
    }

    #[test]
    fn a_slot_is_found_by_its_keeper_and_keeps_its_output_after_the_header() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let at = path(tmp.path(), 4242, Some(77));
        assert_eq!(owner(&at), Some((4242, Some(77))));
        assert_eq!(owner(&tmp.path().join("notes.txt")), None);
        let file = create(&at).expect("create");
        assert_eq!(read(&at).expect("read"), Some(Header::new(State::Idle)));
        file.write_all_at(b"hello", HEADER_BYTES).expect("output");
        let running = Header::new(State::Running {
            run_id: 3,
            pipe: 1,
            pid: 10,
            ticks: None,
        });
        write(&file, &running).expect("write");
        assert_eq!(read(&at).expect("read"), Some(running));
        assert_eq!(read_output(&at, 3), b"hel");
        assert_eq!(list(tmp.path()).expect("list"), vec![at]);
        assert_eq!(
            read(&tmp.path().join("1-1.slot")).expect("read"),
            None,
            "no slot"
        );
    }
}
