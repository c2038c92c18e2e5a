//! The record and entry rules shared by both backends; the backends themselves are checked
//! together against real Redis in `tests/it/streams.rs`.

use super::{MetaPatch, OutEntry, SessionMeta, SessionState};

fn meta() -> SessionMeta {
    SessionMeta {
        agent_id: "agt".into(),
        user_id: "usr".into(),
        username: "ops".into(),
        state: SessionState::Pending,
        created_ms: 1,
        changed_ms: 1,
        started: false,
        reason: String::new(),
        input_cursor: String::new(),
    }
}

#[test]
fn a_patch_writes_only_its_fields_and_stamps_state_changes() {
    let mut m = meta();
    MetaPatch::input_cursor("7-0").apply(&mut m, 5);
    assert_eq!(m.input_cursor, "7-0");
    assert_eq!(m.changed_ms, 1, "no state change, no new stamp");
    assert_eq!(m.state, SessionState::Pending);

    MetaPatch::state(SessionState::Live).apply(&mut m, 9);
    assert_eq!((m.state, m.changed_ms), (SessionState::Live, 9));
    assert_eq!(m.input_cursor, "7-0", "untouched");

    MetaPatch::state(SessionState::Live).apply(&mut m, 12);
    assert_eq!(m.changed_ms, 9, "the same state is not a change");

    MetaPatch {
        started: Some(true),
        ..MetaPatch::default()
    }
    .apply(&mut m, 20);
    assert!(m.started);
    assert_eq!(m.changed_ms, 9);
}

#[test]
fn entry_ids_order_data_skips_and_the_close() {
    let data = OutEntry::Data {
        offset: 10,
        bytes: b"abc".to_vec(),
    };
    let skipped = OutEntry::Skipped { from: 13, to: 40 };
    let closed = OutEntry::Closed {
        end: 40,
        reason: "psql exited".into(),
    };
    assert_eq!((data.id(), data.end()), ((13, 0), 13));
    assert_eq!(skipped.id(), (40, 0));
    assert_eq!(closed.id(), (40, 1));
    assert!(data.id() < skipped.id() && skipped.id() < closed.id());
}
