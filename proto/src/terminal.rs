//! The terminal's byte-offset protocol in one place, sans-IO.
//!
//! A terminal's output is one stream of bytes numbered from 0. Every hop carries it as
//! [`Entry`]s: data at an offset, a skipped range (bytes overwritten before anyone could send
//! them, always announced), and the close. The agent's output ring produces entries, the
//! reverse link carries them as frames ([`Entry::to_frame`], [`Entry::from_frame`]), the
//! control plane stores them, and the browser handler reads them back.
//!
//! Entries may arrive resent (after a reattach), overlapping, or with a hole. A [`Cursor`] is
//! a reader's position: it takes entries in any such condition and says what to pass on so
//! that its consumer sees each byte once, in order, and every gap as a skip that starts
//! exactly where the data stopped. The agent link (agent → store) and the browser handler
//! (store → browser) each stitch through one.

use crate::TerminalFromAgent;

/// One piece of a terminal's output stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Output bytes starting at `offset`.
    Data { offset: u64, bytes: Vec<u8> },
    /// `from..to` will never be shown (overwritten, or trimmed from the store).
    Skipped { from: u64, to: u64 },
    /// The process ended; nothing follows `end`.
    Closed { end: u64, reason: String },
}

impl Entry {
    /// The stream position just after this entry: where the next read continues.
    pub fn end(&self) -> u64 {
        match self {
            Entry::Data { offset, bytes } => offset + bytes.len() as u64,
            Entry::Skipped { to, .. } => *to,
            Entry::Closed { end, .. } => *end,
        }
    }

    /// Its position in a stored stream: `(end, 0)`, or `(end, 1)` for the close, which sorts
    /// after the data it ends. Entries at or below the newest stored one are resends.
    pub fn id(&self) -> (u64, u64) {
        match self {
            Entry::Closed { end, .. } => (*end, 1),
            other => (other.end(), 0),
        }
    }

    /// The frame that carries this entry from the agent to the control plane.
    pub fn to_frame(&self) -> Frame {
        match self {
            Entry::Data { offset, bytes } => Frame::Binary(chunk_frame(*offset, bytes)),
            Entry::Skipped { from, to } => Frame::Text(TerminalFromAgent::Skipped {
                from: *from,
                to: *to,
            }),
            Entry::Closed { end, reason } => Frame::Text(TerminalFromAgent::Closed {
                reason: reason.clone(),
                end: *end,
            }),
        }
    }

    /// The entry an agent frame carries; `None` for other frames (`pong`) and malformed ones.
    pub fn from_frame(frame: Frame) -> Option<Entry> {
        match frame {
            Frame::Binary(mut data) => {
                let (offset, _) = parse_chunk_frame(&data)?;
                data.drain(..8);
                Some(Entry::Data {
                    offset,
                    bytes: data,
                })
            }
            Frame::Text(TerminalFromAgent::Skipped { from, to }) => {
                Some(Entry::Skipped { from, to })
            }
            Frame::Text(TerminalFromAgent::Closed { reason, end }) => {
                Some(Entry::Closed { end, reason })
            }
            Frame::Text(TerminalFromAgent::Pong | TerminalFromAgent::Unknown) => None,
        }
    }
}

/// A frame of the reverse link from the agent: binary output chunks, text control messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Binary(Vec<u8>),
    Text(TerminalFromAgent),
}

/// Encode one output chunk: 8-byte big-endian offset, then the bytes.
pub fn chunk_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&offset.to_be_bytes());
    frame.extend_from_slice(data);
    frame
}

/// Split an output chunk into its offset and data; `None` when shorter than 8 bytes.
pub fn parse_chunk_frame(frame: &[u8]) -> Option<(u64, &[u8])> {
    let (head, data) = frame.split_at_checked(8)?;
    let offset = u64::from_be_bytes(head.try_into().ok()?);
    Some((offset, data))
}

/// Input taken at most once: a number at or below the highest one taken is refused. The
/// control plane's agent link (per link) and the agent (for the session's whole life) each
/// keep one, so a copied or re-read input entry never reaches psql twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputGate {
    applied: u64,
}

impl InputGate {
    /// Whether input number `n` is new; if so it is the highest taken from now on.
    pub fn take(&mut self, n: u64) -> bool {
        let new = n > self.applied;
        if new {
            self.applied = n;
        }
        debug_assert!(
            self.applied >= n,
            "the highest number taken never moves back"
        );
        new
    }
}

/// A reader's position in an output stream: the next byte it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    at: u64,
    closed: bool,
}

impl Cursor {
    /// A reader that has seen everything before `at`.
    pub fn new(at: u64) -> Cursor {
        Cursor { at, closed: false }
    }

    /// The next byte the reader wants.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Whether the close was passed on (nothing is passed on after it).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Take `entry` and push onto `out` what the reader must see of it, in order: nothing for
    /// what it has seen, a skip from the cursor for any hole before the entry, the unseen tail
    /// of data, a skip that ends past the cursor, the close (at the cursor at least).
    pub fn take(&mut self, entry: Entry, out: &mut Vec<Entry>) {
        let (from, first) = (self.at, out.len());
        self.take_unchecked(entry, out);
        if cfg!(debug_assertions)
            && let Some(violation) = stitched_wrong(from, self.at, &out[first..])
        {
            panic!("terminal cursor invariant violated: {violation}");
        }
    }

    fn take_unchecked(&mut self, entry: Entry, out: &mut Vec<Entry>) {
        if self.closed {
            return;
        }
        match entry {
            Entry::Data { offset, mut bytes } => {
                // Offsets come from the agent: one whose end does not fit is malformed, and
                // is dropped rather than wrapped around or allowed to panic.
                let Some(end) = offset.checked_add(bytes.len() as u64) else {
                    return;
                };
                if end <= self.at {
                    return; // seen already (a resend)
                }
                if offset > self.at {
                    out.push(Entry::Skipped {
                        from: self.at,
                        to: offset,
                    });
                    self.at = offset;
                }
                let seen = usize::try_from(self.at - offset).unwrap_or(usize::MAX);
                if seen > 0 {
                    bytes.drain(..seen.min(bytes.len()));
                }
                // An empty chunk (a malformed frame) only moved the cursor, if anything.
                if !bytes.is_empty() {
                    out.push(Entry::Data {
                        offset: self.at,
                        bytes,
                    });
                }
                self.at = end;
            }
            Entry::Skipped { to, .. } => {
                if to > self.at {
                    out.push(Entry::Skipped { from: self.at, to });
                    self.at = to;
                }
            }
            Entry::Closed { end, reason } => {
                self.closed = true;
                out.push(Entry::Closed {
                    end: end.max(self.at),
                    reason,
                });
            }
        }
    }
}

/// Why `passed`, what a cursor moving from `from` to `to` passed on, is not a contiguous
/// stretch from `from` to `to`: data and skips that follow each other without a gap or an
/// overlap, never empty, and nothing after a close.
fn stitched_wrong(from: u64, to: u64, passed: &[Entry]) -> Option<String> {
    let mut at = from;
    for (i, entry) in passed.iter().enumerate() {
        match entry {
            Entry::Data { offset, bytes } => {
                if *offset != at || bytes.is_empty() {
                    return Some(format!(
                        "data at {offset} ({} bytes) where {at} was next",
                        bytes.len()
                    ));
                }
                at += bytes.len() as u64;
            }
            Entry::Skipped { from: f, to: t } => {
                if *f != at || t <= f {
                    return Some(format!("skip {f}..{t} where {at} was next"));
                }
                at = *t;
            }
            Entry::Closed { end, .. } => {
                if *end < at || i + 1 != passed.len() {
                    return Some(format!(
                        "close at {end} after {at}, entry {i} of {}",
                        passed.len()
                    ));
                }
            }
        }
    }
    (at != to).then(|| format!("passed on up to {at} but the cursor is at {to}"))
}

#[cfg(test)]
mod tests {
    use super::{Cursor, Entry, Frame, chunk_frame, parse_chunk_frame};

    fn data(offset: u64, text: &str) -> Entry {
        Entry::Data {
            offset,
            bytes: text.as_bytes().to_vec(),
        }
    }

    fn stitch(cursor: &mut Cursor, entries: Vec<Entry>) -> Vec<Entry> {
        let mut out = Vec::new();
        for entry in entries {
            cursor.take(entry, &mut out);
        }
        out
    }

    #[test]
    fn an_input_gate_takes_each_number_once_and_never_moves_back() {
        let mut gate = super::InputGate::default();
        assert!(gate.take(1));
        assert!(!gate.take(1), "a copy");
        assert!(gate.take(4), "gaps are fine");
        assert!(!gate.take(2), "a re-read after the cursor was set back");
    }

    #[test]
    fn an_offset_whose_end_overflows_is_dropped() {
        let mut c = Cursor::new(5);
        let out = stitch(&mut c, vec![data(u64::MAX - 1, "abc"), data(5, "ok")]);
        assert_eq!(out, vec![data(5, "ok")]);
        assert_eq!(c.at(), 7);
    }

    #[test]
    fn in_order_entries_pass_unchanged() {
        let mut c = Cursor::new(0);
        let entries = vec![
            data(0, "ab"),
            data(2, "cd"),
            Entry::Skipped { from: 4, to: 9 },
        ];
        assert_eq!(stitch(&mut c, entries.clone()), entries);
        assert_eq!(c.at(), 9);
    }

    #[test]
    fn resends_and_overlaps_are_cut_to_what_was_not_seen() {
        let mut c = Cursor::new(0);
        let out = stitch(
            &mut c,
            vec![data(0, "hello"), data(0, "hello"), data(3, "lo world")],
        );
        assert_eq!(out, vec![data(0, "hello"), data(5, " world")]);
    }

    #[test]
    fn a_hole_is_announced_from_where_the_data_stopped() {
        let mut c = Cursor::new(4);
        let out = stitch(&mut c, vec![data(10, "x")]);
        assert_eq!(out, vec![Entry::Skipped { from: 4, to: 10 }, data(10, "x")]);
        // A skip that starts past the cursor still starts at the cursor: no silent gap.
        let out = stitch(&mut c, vec![Entry::Skipped { from: 20, to: 30 }]);
        assert_eq!(out, vec![Entry::Skipped { from: 11, to: 30 }]);
        // A skip inside what was seen is nothing.
        assert!(stitch(&mut c, vec![Entry::Skipped { from: 0, to: 30 }]).is_empty());
    }

    #[test]
    fn a_reader_in_the_middle_of_a_chunk_gets_its_tail() {
        let mut c = Cursor::new(3);
        assert_eq!(
            stitch(&mut c, vec![data(0, "abcdef")]),
            vec![data(3, "def")]
        );
    }

    #[test]
    fn nothing_passes_after_the_close_and_the_close_is_never_behind() {
        let mut c = Cursor::new(0);
        let out = stitch(
            &mut c,
            vec![
                data(0, "abc"),
                Entry::Closed {
                    end: 1,
                    reason: "psql exited".into(),
                },
                data(3, "late"),
            ],
        );
        assert_eq!(
            out,
            vec![
                data(0, "abc"),
                Entry::Closed {
                    end: 3,
                    reason: "psql exited".into()
                }
            ]
        );
        assert!(c.is_closed());
    }

    #[test]
    fn entries_cross_the_link_as_frames_and_back() {
        for entry in [
            data(7, "select 1;"),
            Entry::Skipped { from: 1, to: 5 },
            Entry::Closed {
                end: 16,
                reason: "bye".into(),
            },
        ] {
            assert_eq!(Entry::from_frame(entry.to_frame()), Some(entry));
        }
        assert_eq!(Entry::from_frame(Frame::Binary(vec![1, 2, 3])), None);
        assert_eq!(
            parse_chunk_frame(&chunk_frame(u64::MAX, b"z")),
            Some((u64::MAX, b"z".as_slice()))
        );
    }

    #[test]
    fn ids_put_the_close_after_the_data_it_ends() {
        let d = data(10, "abc");
        let s = Entry::Skipped { from: 13, to: 40 };
        let c = Entry::Closed {
            end: 40,
            reason: String::new(),
        };
        assert_eq!((d.id(), d.end()), ((13, 0), 13));
        assert!(d.id() < s.id() && s.id() < c.id());
    }

    #[test]
    fn an_empty_chunk_passes_on_nothing_but_its_gap() {
        let mut cursor = Cursor::new(3);
        let mut out = Vec::new();
        cursor.take(
            Entry::Data {
                offset: 5,
                bytes: Vec::new(),
            },
            &mut out,
        );
        assert_eq!(out, vec![Entry::Skipped { from: 3, to: 5 }]);
        assert_eq!(cursor.at(), 5);
    }

    #[test]
    fn the_stitch_check_finds_a_gap_an_overlap_and_a_late_close() {
        use super::stitched_wrong;
        assert_eq!(stitched_wrong(0, 4, &[data(0, "ab"), data(2, "cd")]), None);
        assert!(
            stitched_wrong(0, 4, &[data(0, "ab"), data(3, "d")]).is_some(),
            "a gap"
        );
        assert!(
            stitched_wrong(0, 3, &[data(0, "ab"), data(1, "bc")]).is_some(),
            "an overlap"
        );
        let close = Entry::Closed {
            end: 2,
            reason: "done".into(),
        };
        assert!(stitched_wrong(0, 4, &[data(0, "ab"), close, data(2, "cd")]).is_some());
    }
}
