//! The sans-IO half of recording: output entries and input events in, asciicast v2 chunks out,
//! each chained to the one before by its hash; and the checks a stored recording must pass.
//!
//! A chunk covers output bytes `start..end` of the session's byte-offset stream: every byte is
//! in exactly one chunk, whatever replica wrote it. Bytes that could not be recorded (trimmed
//! from the stream store before a recorder read them) become a marker event and make the
//! recording incomplete; they are never silently skipped.

use proto::terminal::Cursor;
use sha2::{Digest, Sha256};

use crate::storage::{RecordingChunk, RecordingRow};
use crate::terminal::{InEvent, OutEntry};

/// Printable output carried from one chunk into the next one's search text, so a word
/// split by a chunk boundary is still found.
const TEXT_OVERLAP_CHARS: usize = 64;

/// The hash a recording's chain starts from (the `prev_hash` of chunk 0).
pub fn seed_hash(session_id: &str) -> String {
    hex::encode(Sha256::digest(
        format!("outpost recording\n{session_id}").as_bytes(),
    ))
}

/// A chunk's hash: over the hash before it, where it sits and what it holds.
pub fn chunk_hash(
    prev_hash: &str,
    session_id: &str,
    seq: i64,
    start: i64,
    end: i64,
    events: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(format!("{prev_hash}\n{session_id}\n{seq}\n{start}\n{end}\n").as_bytes());
    h.update(events.as_bytes());
    hex::encode(h.finalize())
}

/// The asciicast v2 header line of a recording.
pub fn header(row: &RecordingRow) -> String {
    let header = serde_json::json!({
        "version": 2,
        "width": row.width,
        "height": row.height,
        "timestamp": row.started_ms / 1000,
        "title": format!("{} on {}", row.username, row.agent_name),
        "env": {"TERM": "xterm-256color"},
    });
    format!("{header}\n")
}

/// One asciicast event line: seconds since the start, the code, the data.
fn event_line(out: &mut String, started_ms: i64, at_ms: i64, code: &str, data: &str) {
    let t = at_ms.saturating_sub(started_ms).max(0) as f64 / 1000.0;
    let line = serde_json::to_string(&(t, code, data)).unwrap_or_default();
    out.push_str(&line);
    out.push('\n');
}

/// Removes terminal escape sequences and control characters, keeping lines: what a person
/// reading the screen would search for. Keeps its state across calls (a sequence may be split
/// between two output chunks).
#[derive(Clone, Debug, Default)]
pub struct Printable {
    state: Escape,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Escape {
    #[default]
    Text,
    /// After ESC.
    Esc,
    /// Inside `ESC [ …` until a final byte.
    Csi,
    /// Inside `ESC ] …` until BEL or `ESC \`.
    Osc,
    OscEsc,
}

impl Printable {
    pub fn push(&mut self, s: &str, out: &mut String) {
        for c in s.chars() {
            self.state = match (self.state, c) {
                (Escape::Text, '\u{1b}') => Escape::Esc,
                (Escape::Text, '\n') => {
                    out.push('\n');
                    Escape::Text
                }
                (Escape::Text, '\t') => {
                    out.push(' ');
                    Escape::Text
                }
                (Escape::Text, c) if c.is_control() => Escape::Text,
                (Escape::Text, c) => {
                    out.extend(c.to_lowercase());
                    Escape::Text
                }
                (Escape::Esc, '[') => Escape::Csi,
                (Escape::Esc, ']') => Escape::Osc,
                (Escape::Esc, _) => Escape::Text,
                (Escape::Csi, c) if ('\u{40}'..='\u{7e}').contains(&c) => Escape::Text,
                (Escape::Csi, _) => Escape::Csi,
                (Escape::Osc, '\u{7}') => Escape::Text,
                (Escape::Osc, '\u{1b}') => Escape::OscEsc,
                (Escape::Osc, _) => Escape::Osc,
                (Escape::OscEsc, _) => Escape::Text,
            };
        }
    }
}

/// Decode `bytes` (after `carry`, the incomplete character the last call left) as UTF-8:
/// invalid sequences become U+FFFD, an incomplete character at the end is left in `carry`.
fn decode(carry: &mut Vec<u8>, bytes: &[u8], out: &mut String) {
    carry.extend_from_slice(bytes);
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{fffd}');
                        rest = &bad[n..];
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let kept = rest.to_vec();
    *carry = kept;
}

/// One recorder's position and the chunk it is filling.
#[derive(Debug)]
pub struct Track {
    session_id: String,
    started_ms: i64,
    input: bool,
    /// Every output entry passes through it: resends are cut, holes become skips.
    cursor: Cursor,
    /// An incomplete UTF-8 character at the cursor (its bytes are not in a chunk yet).
    carry: Vec<u8>,
    /// Where the pending events start in the output stream.
    start: u64,
    events: String,
    printable: Printable,
    text: String,
    /// The previous chunk's last printable characters.
    overlap: String,
    last_ms: i64,
    /// Bytes lost since the last chunk was taken.
    lost: u64,
    /// Bytes lost over the whole recording (by this recorder).
    lost_total: u64,
    closed: Option<String>,
}

impl Track {
    /// Continue a recording from its stored head.
    pub fn new(row: &RecordingRow) -> Track {
        let at = u64::try_from(row.bytes).unwrap_or(0);
        Track {
            session_id: row.session_id.clone(),
            started_ms: row.started_ms,
            input: row.input,
            cursor: Cursor::new(at),
            carry: Vec::new(),
            start: at,
            events: String::new(),
            printable: Printable::default(),
            text: String::new(),
            overlap: String::new(),
            last_ms: row.last_ms,
            lost: 0,
            lost_total: 0,
            closed: None,
        }
    }

    /// The next output byte this recording wants.
    pub fn wants(&self) -> u64 {
        self.cursor.at()
    }

    /// The session's close, once recorded.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Bytes of events waiting to be stored.
    pub fn pending_bytes(&self) -> usize {
        self.events.len()
    }

    /// Bytes this recorder could not record, if any.
    pub fn lost_total(&self) -> u64 {
        self.lost_total
    }

    fn stamp(&mut self, at_ms: i64) -> i64 {
        // Event times never go backwards, whatever clock stamped them.
        self.last_ms = self.last_ms.max(at_ms);
        self.last_ms
    }

    fn flush_carry(&mut self, at_ms: i64) {
        if self.carry.is_empty() {
            return;
        }
        let s = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry.clear();
        self.printable.push(&s, &mut self.text);
        event_line(&mut self.events, self.started_ms, at_ms, "o", &s);
    }

    /// Record an output entry read at `at_ms`.
    pub fn output(&mut self, at_ms: i64, entry: OutEntry) {
        let mut emit = Vec::new();
        self.cursor.take(entry, &mut emit);
        for entry in emit {
            let at_ms = self.stamp(at_ms);
            match entry {
                OutEntry::Data { bytes, .. } => {
                    let mut s = String::new();
                    decode(&mut self.carry, &bytes, &mut s);
                    if !s.is_empty() {
                        self.printable.push(&s, &mut self.text);
                        event_line(&mut self.events, self.started_ms, at_ms, "o", &s);
                    }
                }
                OutEntry::Skipped { from, to } => {
                    self.flush_carry(at_ms);
                    let n = to.saturating_sub(from);
                    self.lost += n;
                    self.lost_total += n;
                    let note = format!("{n} bytes of output ({from}..{to}) were not recorded");
                    event_line(&mut self.events, self.started_ms, at_ms, "m", &note);
                }
                OutEntry::Closed { reason, .. } => {
                    self.flush_carry(at_ms);
                    self.closed = Some(reason);
                }
            }
        }
    }

    /// Record a browser's event forwarded at `at_ms`: sizes always, keystrokes only when the
    /// recording includes input.
    pub fn input(&mut self, at_ms: i64, event: &InEvent) {
        match event {
            InEvent::Resize { cols, rows } | InEvent::Attach { cols, rows } => {
                let at_ms = self.stamp(at_ms);
                let size = format!("{cols}x{rows}");
                event_line(&mut self.events, self.started_ms, at_ms, "r", &size);
            }
            InEvent::Data(data) if self.input => {
                let at_ms = self.stamp(at_ms);
                let s = String::from_utf8_lossy(data);
                event_line(&mut self.events, self.started_ms, at_ms, "i", &s);
            }
            InEvent::Data(_) | InEvent::Close { .. } => {}
        }
    }

    /// The pending events as the chunk that goes after `head` (`None` when nothing is
    /// pending). The track moves on as if it was stored; [`Track::rewind`] undoes that.
    pub fn take_chunk(&mut self, head: &RecordingRow) -> Option<RecordingChunk> {
        if self.events.is_empty() {
            return None;
        }
        let start = i64::try_from(self.start).unwrap_or(i64::MAX);
        let end_u = self.cursor.at() - self.carry.len() as u64;
        let end = i64::try_from(end_u).unwrap_or(i64::MAX);
        let events = std::mem::take(&mut self.events);
        let mut text = std::mem::take(&mut self.overlap);
        text.push_str(&self.text);
        let tail_from = self
            .text
            .char_indices()
            .rev()
            .nth(TEXT_OVERLAP_CHARS - 1)
            .map_or(0, |(i, _)| i);
        self.overlap = self.text[tail_from..].to_string();
        self.text.clear();
        self.start = end_u;
        self.lost = 0;
        let hash = chunk_hash(
            &head.head_hash,
            &self.session_id,
            head.chunks,
            start,
            end,
            &events,
        );
        Some(RecordingChunk {
            session_id: self.session_id.clone(),
            seq: head.chunks,
            start_offset: start,
            end_offset: end,
            events,
            text,
            prev_hash: head.head_hash.clone(),
            hash,
            last_ms: self.last_ms,
        })
    }

    /// Start again from `head` (another writer stored chunks this one had not seen): what is
    /// pending is dropped; the stream store still holds it, and a catch-up reads it again.
    pub fn rewind(&mut self, head: &RecordingRow) {
        let closed = self.closed.take();
        *self = Track::new(head);
        self.closed = closed;
    }
}

/// Where a stored recording stops being trustworthy, if anywhere.
#[derive(Debug, PartialEq, Eq)]
pub enum Broken {
    /// Chunk `seq` is missing (the chain has a hole).
    Missing { seq: i64 },
    /// Chunk `seq` does not start where the one before ended.
    Discontinuous { seq: i64, start: i64, expected: i64 },
    /// Chunk `seq` names another predecessor's hash.
    Unchained { seq: i64 },
    /// Chunk `seq`'s stored hash is not the hash of its content: it was changed.
    Altered { seq: i64 },
    /// The recording's head does not name the last chunk (chunks were removed or added).
    Head { chunks: i64, bytes: i64 },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Missing { seq } => write!(f, "chunk {seq} is missing"),
            Broken::Discontinuous {
                seq,
                start,
                expected,
            } => write!(
                f,
                "chunk {seq} starts at byte {start}, the chunk before ended at {expected}"
            ),
            Broken::Unchained { seq } => {
                write!(f, "chunk {seq} does not carry the hash of the chunk before")
            }
            Broken::Altered { seq } => write!(
                f,
                "chunk {seq} was altered: its content does not match its hash"
            ),
            Broken::Head { chunks, bytes } => write!(
                f,
                "the recording says {chunks} chunks and {bytes} bytes, which is not what is stored"
            ),
        }
    }
}

/// Checks chunks in order against the chain; [`Verify::finish`] compares the end with the
/// recording's head.
#[derive(Debug)]
pub struct Verify {
    session_id: String,
    seq: i64,
    end: i64,
    hash: String,
    pub events: u64,
}

impl Verify {
    pub fn new(session_id: &str) -> Verify {
        Verify {
            session_id: session_id.to_string(),
            seq: 0,
            end: 0,
            hash: seed_hash(session_id),
            events: 0,
        }
    }

    pub fn chunk(&mut self, chunk: &RecordingChunk) -> Result<(), Broken> {
        if chunk.seq != self.seq {
            return Err(Broken::Missing { seq: self.seq });
        }
        if chunk.start_offset != self.end {
            return Err(Broken::Discontinuous {
                seq: chunk.seq,
                start: chunk.start_offset,
                expected: self.end,
            });
        }
        if chunk.prev_hash != self.hash {
            return Err(Broken::Unchained { seq: chunk.seq });
        }
        let hash = chunk_hash(
            &chunk.prev_hash,
            &self.session_id,
            chunk.seq,
            chunk.start_offset,
            chunk.end_offset,
            &chunk.events,
        );
        if hash != chunk.hash {
            return Err(Broken::Altered { seq: chunk.seq });
        }
        self.events += chunk.events.lines().count() as u64;
        self.seq += 1;
        self.end = chunk.end_offset;
        self.hash = hash;
        Ok(())
    }

    pub fn finish(&self, row: &RecordingRow) -> Result<(), Broken> {
        if row.chunks != self.seq || row.bytes != self.end || row.head_hash != self.hash {
            return Err(Broken::Head {
                chunks: row.chunks,
                bytes: row.bytes,
            });
        }
        Ok(())
    }
}

/// The time of a chunk's first event (0 when it has none).
pub fn first_time(events: &str) -> f64 {
    events
        .lines()
        .find_map(|l| serde_json::from_str::<(f64, serde_json::Value, serde_json::Value)>(l).ok())
        .map_or(0.0, |(t, _, _)| t)
}

/// The first moment in a chunk's events where all of `words` (lower-cased) have been shown,
/// with the printable text around the last of them; `None` when the chunk does not show them
/// (a word split across chunks is found by the search, not placed here).
pub fn moment(events: &str, words: &[String]) -> Option<(f64, String)> {
    let mut printable = Printable::default();
    let mut text = String::new();
    for line in events.lines() {
        let Ok((t, code, data)) = serde_json::from_str::<(f64, String, String)>(line) else {
            continue;
        };
        if code != "o" {
            continue;
        }
        printable.push(&data, &mut text);
        if words.iter().all(|w| text.contains(w.as_str())) {
            let last = words
                .iter()
                .filter_map(|w| text.rfind(w.as_str()))
                .max()
                .unwrap_or(0);
            let from = text[..last]
                .char_indices()
                .rev()
                .nth(40)
                .map_or(0, |(i, _)| i);
            let excerpt: String = text[from..].chars().take(120).collect();
            return Some((t, excerpt.replace('\n', " ").trim().to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RecordingRow {
        RecordingRow {
            session_id: "s1".into(),
            agent_id: "a".into(),
            agent_name: "db1".into(),
            user_id: "u".into(),
            username: "admin".into(),
            started_ms: 1_000,
            ended_ms: None,
            width: 80,
            height: 24,
            input: false,
            chunks: 0,
            bytes: 0,
            head_hash: seed_hash("s1"),
            last_ms: 1_000,
            incomplete: None,
        }
    }

    fn data(offset: u64, s: &[u8]) -> OutEntry {
        OutEntry::Data {
            offset,
            bytes: s.to_vec(),
        }
    }

    /// Store `chunk` on `head` the way storage does.
    fn store(head: &mut RecordingRow, chunk: &RecordingChunk) {
        assert_eq!(chunk.seq, head.chunks);
        assert_eq!(chunk.start_offset, head.bytes);
        head.chunks += 1;
        head.bytes = chunk.end_offset;
        head.head_hash = chunk.hash.clone();
        head.last_ms = chunk.last_ms;
    }

    fn output_of(chunks: &[RecordingChunk]) -> String {
        chunks
            .iter()
            .flat_map(|c| c.events.lines())
            .filter_map(|l| serde_json::from_str::<(f64, String, String)>(l).ok())
            .filter(|(_, code, _)| code == "o")
            .map(|(_, _, d)| d)
            .collect()
    }

    #[test]
    fn every_byte_once_across_chunks_resends_and_a_split_character() {
        let mut head = row();
        let mut track = Track::new(&head);
        let mut chunks = Vec::new();
        // "é" is two bytes; the first chunk ends between them.
        track.output(1_100, data(0, b"select 1;\r\n\xc3"));
        let c = track.take_chunk(&head).expect("chunk");
        assert_eq!((c.start_offset, c.end_offset), (0, 11));
        store(&mut head, &c);
        chunks.push(c);
        // A resend of what was recorded, then the rest.
        track.output(1_200, data(0, b"select 1;\r\n\xc3"));
        track.output(1_300, data(11, b"\xc3\xa9t\xc3\xa9\r\n"));
        let c = track.take_chunk(&head).expect("chunk");
        assert_eq!((c.start_offset, c.end_offset), (11, 18));
        store(&mut head, &c);
        chunks.push(c);
        assert_eq!(output_of(&chunks), "select 1;\r\nété\r\n");
        let mut verify = Verify::new("s1");
        for c in &chunks {
            verify.chunk(c).expect("chain holds");
        }
        verify.finish(&head).expect("head matches");
    }

    #[test]
    fn a_hole_is_a_marker_and_counts_as_lost() {
        let head = row();
        let mut track = Track::new(&head);
        track.output(1_100, data(0, b"abc"));
        track.output(1_200, data(10, b"xyz"));
        assert_eq!(track.lost_total(), 7);
        let c = track.take_chunk(&head).expect("chunk");
        assert!(
            c.events
                .contains(r#""m","7 bytes of output (3..10) were not recorded""#)
        );
        assert_eq!(c.end_offset, 13);
    }

    #[test]
    fn times_are_seconds_since_the_start_and_never_go_back() {
        let head = row();
        let mut track = Track::new(&head);
        track.output(2_500, data(0, b"a"));
        track.output(2_000, data(1, b"b"));
        track.input(
            3_000,
            &InEvent::Resize {
                cols: 100,
                rows: 30,
            },
        );
        track.input(3_100, &InEvent::Data(b"secret".to_vec()));
        let c = track.take_chunk(&head).expect("chunk");
        assert_eq!(
            c.events, "[1.5,\"o\",\"a\"]\n[1.5,\"o\",\"b\"]\n[2.0,\"r\",\"100x30\"]\n",
            "keystrokes are not recorded unless input recording is on"
        );
    }

    #[test]
    fn input_is_recorded_when_asked() {
        let mut head = row();
        head.input = true;
        let mut track = Track::new(&head);
        track.input(1_500, &InEvent::Data(b"\\dt\r".to_vec()));
        let c = track.take_chunk(&head).expect("chunk");
        assert_eq!(c.events, "[0.5,\"i\",\"\\\\dt\\r\"]\n");
    }

    #[test]
    fn search_text_drops_escapes_and_keeps_the_tail_of_the_chunk_before() {
        let mut head = row();
        let mut track = Track::new(&head);
        track.output(1_100, data(0, b"\x1b[1mDROP\x1b[0m TA"));
        let c = track.take_chunk(&head).expect("chunk");
        assert_eq!(c.text, "drop ta");
        store(&mut head, &c);
        track.output(1_200, data(15, b"BLE\x1b]0;title\x07 done"));
        let c = track.take_chunk(&head).expect("chunk");
        assert!(c.text.contains("drop table done"), "{:?}", c.text);
    }

    #[test]
    fn verify_names_what_was_changed() {
        let mut head = row();
        let mut track = Track::new(&head);
        let mut chunks = Vec::new();
        for (i, s) in ["one\r\n", "two\r\n", "three\r\n"].iter().enumerate() {
            track.output(1_000 + i as i64, data(head.bytes as u64, s.as_bytes()));
            let c = track.take_chunk(&head).expect("chunk");
            store(&mut head, &c);
            chunks.push(c);
        }
        let check = |chunks: &[RecordingChunk], head: &RecordingRow| {
            let mut v = Verify::new("s1");
            for c in chunks {
                v.chunk(c)?;
            }
            v.finish(head)
        };
        assert_eq!(check(&chunks, &head), Ok(()));
        let mut altered = chunks.clone();
        altered[1].events = altered[1].events.replace("two", "TWO");
        assert_eq!(check(&altered, &head), Err(Broken::Altered { seq: 1 }));
        let mut missing = chunks.clone();
        missing.remove(1);
        assert_eq!(check(&missing, &head), Err(Broken::Missing { seq: 1 }));
        assert_eq!(
            check(&chunks[..2], &head),
            Err(Broken::Head {
                chunks: 3,
                bytes: 17
            }),
            "a removed last chunk is noticed by the head"
        );
    }

    #[test]
    fn a_moment_is_where_the_words_were_shown() {
        let events = "[0.5,\"o\",\"select 1;\\r\\n\"]\n[2.25,\"o\",\"\\u001b[1mDROP TABLE\\u001b[0m orders\\r\\n\"]\n";
        let (t, excerpt) = moment(events, &["drop table".into()]).expect("found");
        assert_eq!(t, 2.25);
        assert!(excerpt.contains("drop table orders"), "{excerpt}");
        assert_eq!(moment(events, &["vacuum".into()]), None);
    }
}
