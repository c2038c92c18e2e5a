//! The PTY output ring: sans-IO, byte offsets from 0, bounded. The PTY reader appends and never
//! waits; a sender reads from its own cursor and learns when the bytes it wanted were
//! overwritten, so every gap it forwards is announced. It hands out the protocol's own
//! [`Entry`]s (`proto::terminal`), so what it produces is what the link carries.

use std::collections::VecDeque;

use proto::terminal::Entry;

#[derive(Debug)]
pub struct OutputRing {
    bytes: VecDeque<u8>,
    /// Offset of `bytes[0]`.
    start: u64,
    bytes_max: usize,
    closed: Option<String>,
    /// Why the session is ending, set before the process is stopped: it is the close reason
    /// whatever exit status the stopped process reports.
    ending: Option<String>,
    /// Bytes overwritten before any reader took them (for the session's log line).
    overwritten_total: u64,
}

impl OutputRing {
    pub fn new(bytes_max: usize) -> OutputRing {
        assert!(bytes_max > 0, "a ring needs room for at least one byte");
        OutputRing {
            bytes: VecDeque::new(),
            start: 0,
            bytes_max,
            closed: None,
            ending: None,
            overwritten_total: 0,
        }
    }

    /// Offset one past the newest byte.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    pub fn overwritten_total(&self) -> u64 {
        self.overwritten_total
    }

    /// Append output; the oldest bytes make room. Never fails, never waits.
    pub fn push(&mut self, data: &[u8]) {
        if self.closed.is_some() {
            return;
        }
        self.bytes.extend(data);
        let over = self.bytes.len().saturating_sub(self.bytes_max);
        if over > 0 {
            self.bytes.drain(..over);
            self.start += over as u64;
        }
        debug_assert!(
            self.bytes.len() <= self.bytes_max,
            "output ring invariant violated: {} bytes held, at most {}",
            self.bytes.len(),
            self.bytes_max
        );
    }

    /// The session is ending for `reason` and is about to stop the process: output is still
    /// taken until [`OutputRing::close`], which then reports this reason rather than the exit
    /// status the signal caused, however the two race.
    pub fn ending(&mut self, reason: String) {
        if self.ending.is_none() {
            self.ending = Some(reason);
        }
    }

    /// The process ended: nothing more will be appended.
    pub fn close(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(self.ending.take().unwrap_or(reason));
        }
    }

    /// What a reader whose next wanted byte is `cursor` gets, at most `max` bytes of it;
    /// `None` while there is nothing new.
    pub fn next(&mut self, cursor: u64, max: usize) -> Option<Entry> {
        let entry = self.next_unchecked(cursor, max);
        if cfg!(debug_assertions)
            && let Some(violation) = self.violated_by(cursor, max, entry.as_ref())
        {
            panic!("output ring invariant violated: {violation}");
        }
        entry
    }

    /// Why `entry`, given for a reader at `cursor`, breaks what a reader relies on: data
    /// starts at the cursor, is held here and is at most `max` bytes; a skip starts at the
    /// cursor and ends at the oldest byte held; the close comes at the end, once closed.
    fn violated_by(&self, cursor: u64, max: usize, entry: Option<&Entry>) -> Option<String> {
        match entry {
            Some(Entry::Data { offset, bytes }) => {
                let end = offset + bytes.len() as u64;
                (*offset != cursor
                    || bytes.is_empty()
                    || bytes.len() > max
                    || *offset < self.start
                    || end > self.end())
                .then(|| {
                    format!(
                        "data {offset}..{end} for a reader at {cursor} (held {}..{}, max {max})",
                        self.start,
                        self.end()
                    )
                })
            }
            Some(Entry::Skipped { from, to }) => {
                (*from != cursor || *to != self.start || to <= from).then(|| {
                    format!(
                        "skip {from}..{to} for a reader at {cursor} (oldest held {})",
                        self.start
                    )
                })
            }
            Some(Entry::Closed { end, .. }) => {
                (*end != self.end() || !self.is_closed() || cursor < self.end()).then(|| {
                    format!(
                        "close at {end} for a reader at {cursor} (end {})",
                        self.end()
                    )
                })
            }
            None => (cursor < self.end() && cursor >= self.start).then(|| {
                format!(
                    "nothing for a reader at {cursor} while {}..{} is held",
                    self.start,
                    self.end()
                )
            }),
        }
    }

    fn next_unchecked(&mut self, cursor: u64, max: usize) -> Option<Entry> {
        if cursor < self.start {
            self.overwritten_total += self.start - cursor;
            return Some(Entry::Skipped {
                from: cursor,
                to: self.start,
            });
        }
        let end = self.end();
        let offset = cursor;
        let skip = usize::try_from(offset - self.start).unwrap_or(usize::MAX);
        if skip >= self.bytes.len() {
            return self.closed.as_ref().map(|reason| Entry::Closed {
                end,
                reason: reason.clone(),
            });
        }
        let take = (self.bytes.len() - skip).min(max);
        let bytes = self.bytes.range(skip..skip + take).copied().collect();
        Some(Entry::Data { offset, bytes })
    }
}

#[cfg(test)]
mod tests {
    use proto::terminal::Entry;

    use super::OutputRing;

    fn data(offset: u64, bytes: &[u8]) -> Option<Entry> {
        Some(Entry::Data {
            offset,
            bytes: bytes.to_vec(),
        })
    }

    #[test]
    fn a_reader_gets_everything_in_order_in_bounded_chunks() {
        let mut ring = OutputRing::new(16);
        ring.push(b"hello ");
        ring.push(b"world");
        assert_eq!(ring.next(0, 4), data(0, b"hell"));
        assert_eq!(ring.next(4, 100), data(4, b"o world"));
        assert_eq!(ring.next(11, 100), None);
    }

    #[test]
    fn overwritten_bytes_are_announced_not_lost_silently() {
        let mut ring = OutputRing::new(4);
        ring.push(b"abcdef");
        assert_eq!(ring.end(), 6);
        assert_eq!(ring.next(0, 10), Some(Entry::Skipped { from: 0, to: 2 }));
        assert_eq!(ring.next(2, 10), data(2, b"cdef"));
        assert_eq!(ring.overwritten_total(), 2);
    }

    #[test]
    fn a_cursor_past_the_end_gets_nothing_until_output_reaches_it() {
        let mut ring = OutputRing::new(8);
        ring.push(b"abc");
        assert_eq!(ring.next(5, 10), None);
        ring.push(b"defg");
        assert_eq!(ring.next(5, 10), data(5, b"fg"));
    }

    #[test]
    fn a_session_ending_names_the_close_whatever_the_process_exit_says() {
        let mut ring = OutputRing::new(8);
        ring.ending("closed by the control plane".into());
        ring.push(b"^C");
        ring.close("psql exited with status 1".into());
        assert_eq!(ring.next(0, 10), data(0, b"^C"));
        assert_eq!(
            ring.next(2, 10),
            Some(Entry::Closed {
                end: 2,
                reason: "closed by the control plane".into()
            })
        );
    }

    #[test]
    fn close_is_reported_after_the_last_byte() {
        let mut ring = OutputRing::new(8);
        ring.push(b"bye");
        ring.close("psql exited with status 0".into());
        ring.push(b"ignored");
        assert_eq!(ring.next(0, 10), data(0, b"bye"));
        assert_eq!(
            ring.next(3, 10),
            Some(Entry::Closed {
                end: 3,
                reason: "psql exited with status 0".into()
            })
        );
    }

    #[test]
    fn the_read_check_names_an_entry_a_reader_could_not_use() {
        let mut ring = OutputRing::new(8);
        ring.push(b"0123456789");
        let fine = ring.next_unchecked(2, 4);
        assert_eq!(ring.violated_by(2, 4, fine.as_ref()), None);
        let late = Entry::Data {
            offset: 3,
            bytes: b"3".to_vec(),
        };
        assert!(
            ring.violated_by(2, 4, Some(&late)).is_some(),
            "not at the cursor"
        );
        let short_skip = Entry::Skipped { from: 0, to: 1 };
        assert!(
            ring.violated_by(0, 4, Some(&short_skip)).is_some(),
            "skip must reach the oldest byte"
        );
        assert!(
            ring.violated_by(4, 4, None).is_some(),
            "nothing although bytes are held"
        );
    }
}
