//! The record and entry rules shared by both backends; the backends themselves are checked
//! together against real Redis in `tests/it/streams.rs`.

use super::model::{MetaPatch, SessionMeta, SessionState};

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
        recording: String::new(),
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
