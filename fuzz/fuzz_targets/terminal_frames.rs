//! The terminal's reverse-link frames from an agent (binary chunks with an 8-byte offset, text
//! control messages) through `Entry::from_frame` and a reader's `Cursor`, as the control plane
//! stitches them: every entry passed on must be in order and positioned sanely.
#![no_main]

use proto::terminal::{Cursor, Entry, Frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut cursor = Cursor::new(0);
    let mut out = Vec::new();
    // Frames separated by 0xFF; a leading 0 makes a frame text, anything else binary.
    for piece in data.split(|b| *b == 0xFF) {
        let frame = match piece.split_first() {
            Some((0, text)) => match serde_json::from_slice::<proto::TerminalFromAgent>(text) {
                Ok(message) => Frame::Text(message),
                Err(_) => continue,
            },
            Some((_, bytes)) => Frame::Binary(bytes.to_vec()),
            None => continue,
        };
        if let Some(entry) = Entry::from_frame(frame) {
            let before = cursor.at();
            out.clear();
            cursor.take(entry, &mut out);
            let mut at = before;
            for passed in &out {
                match passed {
                    Entry::Data { offset, .. } => {
                        assert_eq!(*offset, at, "data starts at the cursor")
                    }
                    Entry::Skipped { from, to } => {
                        assert_eq!(*from, at, "a skip starts at the cursor");
                        assert!(to > from, "a skip moves forward");
                    }
                    Entry::Closed { end, .. } => {
                        assert!(*end >= at, "the close is at the cursor at least")
                    }
                }
                at = passed.end();
                let _ = passed.id();
            }
            if !cursor.is_closed() {
                assert_eq!(
                    cursor.at(),
                    at.max(before),
                    "the cursor stands after what it passed on"
                );
            }
        }
    }
});
