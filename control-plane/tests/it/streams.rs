//! The terminal stream store: one `check` suite that every backend passes the same way (the
//! in-process store and a real Redis, plain and over TLS), plus what only a shared store does
//! (the relay of open requests) and what only a server can do (restart under a live store).

use fixtures::poll::until_true;
use std::time::Duration;

use control_plane::terminal::relay::{self, OpenRefusal, OpenRequest};
use control_plane::terminal::streams::SigningKey;
use control_plane::terminal::{
    InEvent, MetaPatch, OutEntry, SessionMeta, SessionState, Streams, StreamsError,
};
use world::World;

const KEEP: Duration = Duration::from_secs(60);
const NO_WAIT: Duration = Duration::from_millis(1);

fn meta() -> SessionMeta {
    SessionMeta {
        agent_id: "agt_1".into(),
        user_id: "usr_1".into(),
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

fn data(offset: u64, text: &str) -> OutEntry {
    OutEntry::Data {
        offset,
        bytes: text.as_bytes().to_vec(),
    }
}

/// Everything both backends must do alike.
async fn check(streams: Streams) {
    ordering_and_resends(&streams).await;
    trimming_announces_nothing_but_keeps_the_tail(&streams).await;
    input_in_order_from_a_cursor(&streams).await;
    updates_write_only_their_fields(&streams).await;
    exactly_one_closer(&streams).await;
    no_update_reopens_a_closed_session(&streams).await;
    the_limit_counts_open_sessions(&streams).await;
    oversized_entries_are_refused(&streams).await;
    closed_sessions_expire(&streams).await;
}

async fn ordering_and_resends(streams: &Streams) {
    streams.create("order", &meta(), 10).await.expect("create");
    let batch = [
        data(0, "hello "),
        data(6, "world"),
        OutEntry::Skipped { from: 11, to: 20 },
    ];
    streams
        .append_output("order", &batch, 1 << 20)
        .await
        .expect("append");
    // A resend after a reattach: at or below the top, ignored.
    streams
        .append_output("order", &[data(6, "world")], 1 << 20)
        .await
        .expect("resend");
    assert_eq!(streams.output_end("order").await.expect("end"), 20);
    let all = streams
        .read_output("order", 0, NO_WAIT)
        .await
        .expect("read");
    assert_eq!(all, batch.to_vec());
    let tail = streams
        .read_output("order", 6, NO_WAIT)
        .await
        .expect("read");
    assert_eq!(tail, batch[1..].to_vec(), "entries that end after 6");
    let closed = OutEntry::Closed {
        end: 20,
        reason: "psql exited".into(),
    };
    streams
        .append_output("order", std::slice::from_ref(&closed), 1 << 20)
        .await
        .expect("close entry");
    let after_end = streams
        .read_output("order", 20, NO_WAIT)
        .await
        .expect("read");
    assert_eq!(
        after_end,
        vec![closed],
        "the close sorts after the data it ends"
    );
    assert!(
        streams
            .read_output("unknown", 0, NO_WAIT)
            .await
            .expect("read unknown")
            .is_empty()
    );
}

async fn trimming_announces_nothing_but_keeps_the_tail(streams: &Streams) {
    streams.create("trim", &meta(), 10).await.expect("create");
    let mut offset = 0;
    for _ in 0..10 {
        streams
            .append_output("trim", &[data(offset, "0123456789")], 30)
            .await
            .expect("append");
        offset += 10;
    }
    let kept = streams.read_output("trim", 0, NO_WAIT).await.expect("read");
    let first = kept.first().expect("something kept");
    // The oldest bytes are gone; what is kept is contiguous up to the end.
    assert!(first.end() > 10 && first.end() <= 100 - 30 + 10, "{kept:?}");
    assert_eq!(kept.last().map(OutEntry::end), Some(100));
    for pair in kept.windows(2) {
        assert_eq!(pair[0].end() + 10, pair[1].end());
    }
}

async fn input_in_order_from_a_cursor(streams: &Streams) {
    streams.create("input", &meta(), 10).await.expect("create");
    let events = [
        InEvent::Attach { cols: 80, rows: 24 },
        InEvent::Data(b"select 1;\r".to_vec()),
        InEvent::Resize {
            cols: 120,
            rows: 40,
        },
        InEvent::Close {
            reason: "bye".into(),
        },
    ];
    for event in &events {
        streams
            .append_input("input", event.clone())
            .await
            .expect("append input");
    }
    let read = streams
        .read_input("input", "", NO_WAIT)
        .await
        .expect("read");
    assert_eq!(
        read.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        events.to_vec()
    );
    let after_second = &read[1].id;
    let rest = streams
        .read_input("input", after_second, NO_WAIT)
        .await
        .expect("read from cursor");
    assert_eq!(
        rest.into_iter().map(|e| e.event).collect::<Vec<_>>(),
        events[2..].to_vec()
    );
    // A blocked reader wakes when input arrives.
    let (found, ()) = tokio::join!(
        streams.read_input("input", &read[3].id, Duration::from_secs(5)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            streams
                .append_input("input", InEvent::Data(b"x".to_vec()))
                .await
                .expect("append");
        }
    );
    assert_eq!(
        found.expect("blocked read").len(),
        1,
        "woken by the new entry"
    );
}

async fn updates_write_only_their_fields(streams: &Streams) {
    streams.create("patch", &meta(), 10).await.expect("create");
    streams
        .update("patch", 5, MetaPatch::input_cursor("3-0"))
        .await
        .expect("cursor");
    streams
        .update("patch", 9, MetaPatch::state(SessionState::Live))
        .await
        .expect("state");
    let m = streams.meta("patch").await.expect("meta").expect("exists");
    assert_eq!(m.input_cursor, "3-0");
    assert_eq!((m.state, m.changed_ms), (SessionState::Live, 9));
    assert!(!m.started);
    // Racing writers of different fields never undo each other.
    let (a, b) = tokio::join!(
        streams.update("patch", 10, MetaPatch::input_cursor("8-0")),
        streams.update("patch", 11, MetaPatch::state(SessionState::Reconnecting)),
    );
    a.expect("cursor");
    b.expect("state");
    let m = streams.meta("patch").await.expect("meta").expect("exists");
    assert_eq!(m.input_cursor, "8-0");
    assert_eq!((m.state, m.changed_ms), (SessionState::Reconnecting, 11));
    assert_eq!((m.agent_id.as_str(), m.username.as_str()), ("agt_1", "ops"));
    // An unknown session is not created by an update.
    streams
        .update("nobody", 1, MetaPatch::state(SessionState::Live))
        .await
        .expect("update unknown");
    assert_eq!(streams.meta("nobody").await.expect("meta"), None);
}

async fn exactly_one_closer(streams: &Streams) {
    streams.create("s1", &meta(), 10).await.expect("create");
    let (a, b) = tokio::join!(
        streams.finish("s1", 2, "psql exited", KEEP),
        streams.finish("s1", 2, "abandoned", KEEP),
    );
    let (a, b) = (a.expect("finish"), b.expect("finish"));
    assert!(a ^ b, "exactly one caller closed it: {a} {b}");
    assert!(
        !streams
            .finish("s1", 3, "again", KEEP)
            .await
            .expect("finish")
    );
    let meta = streams
        .meta("s1")
        .await
        .expect("meta")
        .expect("still readable");
    assert_eq!(meta.state, SessionState::Closed);
    assert!(
        !streams
            .live()
            .await
            .expect("live")
            .iter()
            .any(|(id, _)| id == "s1")
    );
    assert!(
        !streams
            .finish("unknown", 3, "x", KEEP)
            .await
            .expect("finish"),
        "an unknown session was not closed by anyone"
    );
}

async fn no_update_reopens_a_closed_session(streams: &Streams) {
    // The race the old read-modify-write lost: a link marking the session live while the
    // janitor closes it. Whatever the interleaving, closed stays closed.
    for round in 0..20 {
        let id = format!("race{round}");
        streams.create(&id, &meta(), 100).await.expect("create");
        let (updated, finished) = tokio::join!(
            streams.update(
                &id,
                4,
                MetaPatch {
                    state: Some(SessionState::Live),
                    started: Some(true),
                    input_cursor: Some("1-0".into()),
                    recording: None,
                },
            ),
            streams.finish(&id, 4, "janitor", KEEP),
        );
        updated.expect("update");
        assert!(finished.expect("finish"));
        let m = streams.meta(&id).await.expect("meta").expect("exists");
        assert_eq!(m.state, SessionState::Closed, "round {round}");
        assert_eq!(m.reason, "janitor");
    }
}

async fn the_limit_counts_open_sessions(streams: &Streams) {
    let open = streams.live().await.expect("live").len();
    let limit = open + 2;
    streams.create("l1", &meta(), limit).await.expect("first");
    streams.create("l2", &meta(), limit).await.expect("second");
    let refused = streams.create("l3", &meta(), limit).await;
    assert!(
        matches!(refused, Err(StreamsError::LimitReached(n)) if n == limit),
        "{refused:?}"
    );
    assert!(streams.finish("l1", 5, "done", KEEP).await.expect("finish"));
    streams
        .create("l3", &meta(), limit)
        .await
        .expect("a closed session frees its slot");
}

async fn oversized_entries_are_refused(streams: &Streams) {
    let huge = vec![b'x'; control_plane::terminal::streams::ENTRY_BYTES_MAX + 1];
    let out = streams
        .append_output("order", &[data(1 << 30, "")], 1 << 20)
        .await;
    assert!(out.is_ok(), "an empty chunk is fine: {out:?}");
    let refused = streams
        .append_output(
            "order",
            &[OutEntry::Data {
                offset: 1 << 31,
                bytes: huge.clone(),
            }],
            1 << 20,
        )
        .await;
    assert!(
        matches!(refused, Err(StreamsError::EntryTooLarge { .. })),
        "{refused:?}"
    );
    let refused = streams.append_input("input", InEvent::Data(huge)).await;
    assert!(
        matches!(refused, Err(StreamsError::EntryTooLarge { .. })),
        "{refused:?}"
    );
}

async fn closed_sessions_expire(streams: &Streams) {
    streams.create("short", &meta(), 100).await.expect("create");
    streams
        .append_output("short", &[data(0, "bye")], 1 << 20)
        .await
        .expect("append");
    assert!(
        streams
            .finish("short", 6, "done", Duration::from_secs(1))
            .await
            .expect("finish")
    );
    // Redis expires keys on its own clock; poll up to 5 s rather than guess.
    let expired = until_true(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async { streams.meta("short").await.expect("meta").is_none() },
    )
    .await;
    assert!(
        expired,
        "a session closed with a keep of 1 s was still readable after 5 s"
    );
    assert!(
        streams
            .read_output("short", 0, NO_WAIT)
            .await
            .expect("read")
            .is_empty(),
        "the output expired with the record"
    );
}

#[tokio::test]
async fn in_process_store_passes_the_suite() {
    let streams = Streams::memory(&World::real());
    check(streams.clone()).await;
    assert!(streams.shared().is_none(), "one replica: nothing to relay");
}

#[tokio::test]
async fn redis_store_passes_the_suite() {
    let redis = fixtures::Redis::start().await.expect("start redis");
    check(Streams::redis(World::real(), &redis.url()).expect("redis url")).await;
}

#[tokio::test]
async fn rediss_store_passes_the_suite_and_refuses_an_untrusted_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = fixtures::tls::TestCerts::generate(dir.path()).expect("certificates");
    let redis = fixtures::Redis::start_tls(&certs).expect("start redis with TLS");
    let url = redis.tls_url().expect("TLS url");

    // The system's CAs do not know this one: refused, with the reason.
    let stranger = Streams::redis(World::real(), &url).expect("rediss url");
    let err = stranger
        .create("s0", &meta(), 10)
        .await
        .expect_err("untrusted certificate")
        .to_string()
        .to_lowercase();
    assert!(err.contains("certificate"), "{err}");

    let world = World::real();
    world.set_tls_client(world::tls::client_config(&certs.ca).expect("CA"));
    check(Streams::redis(world, &url).expect("rediss url")).await;
}

#[tokio::test]
async fn the_relay_carries_requests_and_typed_answers_between_replicas() {
    let redis = fixtures::Redis::start().await.expect("start redis");
    let here = Streams::redis(World::real(), &redis.url()).expect("redis url");
    let there = Streams::redis(World::real(), &redis.url()).expect("redis url");
    let (here, there) = (
        here.shared().expect("shared").clone(),
        there.shared().expect("shared").clone(),
    );
    here.set_keys(
        SigningKey {
            id: 1,
            key: [3; 32],
        },
        &[],
    );
    there.set_keys(
        SigningKey {
            id: 1,
            key: [3; 32],
        },
        &[],
    );

    let cursor = relay::requests_tail(&there).await.expect("tail");
    let request = OpenRequest {
        session_id: "s1".into(),
        agent_id: "agt_9".into(),
    };
    relay::request_open(&here, &request).await.expect("request");
    let (next, requests) = relay::read_requests(&there, &cursor, Duration::from_secs(2))
        .await
        .expect("read requests");
    assert_eq!(requests, vec![relay::Relayed::Open(request)]);
    let (_, none) = relay::read_requests(&there, &next, NO_WAIT)
        .await
        .expect("read again");
    assert!(none.is_empty(), "a request is read once per cursor");

    // Refusals keep their kind across the hop.
    let answers = [
        (
            "s1",
            Err(OpenRefusal::LimitReached("10 sessions open".into())),
        ),
        (
            "s2",
            Err(OpenRefusal::Failed("agent did not answer".into())),
        ),
        ("s3", Err(OpenRefusal::BadAnswer("something else".into()))),
        ("s4", Ok(false)),
        ("s6", Ok(true)),
    ];
    for (session, answer) in &answers {
        relay::reply_open(&there, session, answer)
            .await
            .expect("reply");
        let got = relay::wait_open_reply(&here, session, Duration::from_secs(2))
            .await
            .expect("wait");
        assert_eq!(got.as_ref(), Some(answer), "{session}");
    }
    let nobody = relay::wait_open_reply(&here, "s5", Duration::from_millis(200))
        .await
        .expect("wait");
    assert_eq!(nobody, None, "no replica answered");
}

#[tokio::test]
async fn a_redis_restart_is_survived_without_a_new_store() {
    let mut redis = fixtures::Redis::start().await.expect("start redis");
    let streams = Streams::redis(World::real(), &redis.url()).expect("redis url");
    streams.create("before", &meta(), 10).await.expect("create");
    streams
        .read_output("before", 0, NO_WAIT)
        .await
        .expect("a blocking connection exists");

    redis.restart().expect("restart redis");

    // The connections from before are dead; the first call may fail with them, and then the
    // store dials again. Nothing survived the restart (no persistence).
    let mut recovered = false;
    for _ in 0..3 {
        if streams.create("after", &meta(), 10).await.is_ok() {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "the store reconnected after the restart");
    assert_eq!(streams.meta("before").await.expect("meta"), None);
    let mut read_again = false;
    for _ in 0..3 {
        if streams.read_output("after", 0, NO_WAIT).await.is_ok() {
            read_again = true;
            break;
        }
    }
    assert!(read_again, "blocking reads reconnect too");
    streams
        .append_output("after", &[data(0, "ok")], 1 << 20)
        .await
        .expect("append after restart");
}

#[tokio::test]
async fn entries_not_signed_by_a_replica_are_dropped() {
    let redis = fixtures::Redis::start().await.expect("start redis");
    let replica = |key: [u8; 32]| {
        let streams = Streams::redis(World::real(), &redis.url()).expect("redis url");
        streams
            .shared()
            .expect("shared")
            .set_keys(SigningKey { id: 1, key }, &[]);
        streams
    };
    let (sender, reader, stranger) = (replica([5; 32]), replica([5; 32]), replica([6; 32]));
    let reader_redis = reader.shared().expect("shared").clone();

    // Relayed requests: only the one a replica with the shared key signed is read.
    let cursor = relay::requests_tail(&reader_redis).await.expect("tail");
    let signed = OpenRequest {
        session_id: "ses_signed".into(),
        agent_id: "agt_1".into(),
    };
    relay::request_open(sender.shared().expect("shared"), &signed)
        .await
        .expect("request");
    let requests = "outpost:term:requests";
    redis
        .cli(&["XADD", requests, "*", "s", "ses_bare", "a", "agt_1"])
        .expect("redis-cli");
    redis
        .cli(&[
            "XADD",
            requests,
            "*",
            "s",
            "ses_forged",
            "a",
            "agt_1",
            "m",
            "0123456789abcdef0123456789abcdef",
        ])
        .expect("redis-cli");
    redis
        .cli(&[
            "XADD",
            requests,
            "*",
            "s",
            "ses_cmd",
            "a",
            "agt_1",
            "c",
            r#"{"type":"task_add"}"#,
        ])
        .expect("redis-cli");
    relay::request_open(
        stranger.shared().expect("shared"),
        &OpenRequest {
            session_id: "ses_other_key".into(),
            agent_id: "agt_1".into(),
        },
    )
    .await
    .expect("request");
    let (_, got) = relay::read_requests(&reader_redis, &cursor, Duration::from_secs(2))
        .await
        .expect("read");
    assert_eq!(got, vec![relay::Relayed::Open(signed)]);

    // Terminal input: keystrokes written straight into Redis never reach the agent side.
    sender.create("ses_1", &meta(), 10).await.expect("create");
    sender
        .append_input("ses_1", InEvent::Data(b"select 1;\r".to_vec()))
        .await
        .expect("append");
    redis
        .cli(&[
            "XADD",
            "outpost:term:ses_1:in",
            "*",
            "k",
            "data",
            "d",
            "\\! id\r",
        ])
        .expect("redis-cli");
    stranger
        .append_input("ses_1", InEvent::Data(b"\\! id\r".to_vec()))
        .await
        .expect("append");
    let input = reader.read_input("ses_1", "", NO_WAIT).await.expect("read");
    let events: Vec<InEvent> = input.iter().map(|e| e.event.clone()).collect();
    assert_eq!(events, vec![InEvent::Data(b"select 1;\r".to_vec())]);
    assert_eq!(input[0].seq, 1, "numbered from 1");
    // Input for a session that is gone brings no record back.
    sender
        .append_input("ses_gone", InEvent::Data(b"x".to_vec()))
        .await
        .expect("append");
    assert!(reader.meta("ses_gone").await.expect("meta").is_none());
    // A session record pointed at another agent is taken for unknown.
    assert!(reader.meta("ses_1").await.expect("meta").is_some());
    redis
        .cli(&["HSET", "outpost:term:ses_1:meta", "agent_id", "agt_tap"])
        .expect("redis-cli");
    assert!(
        reader.meta("ses_1").await.expect("meta").is_none(),
        "a changed agent_id does not verify"
    );

    // Terminal output: what a browser is shown comes from a replica too.
    sender
        .append_output("ses_1", &[data(0, "real")], 1 << 20)
        .await
        .expect("append output");
    let out = "outpost:term:ses_1:out";
    redis
        .cli(&["XADD", out, "9-0", "o", "4", "d", "FAKE!"])
        .expect("redis-cli");
    redis
        .cli(&[
            "XADD",
            out,
            "12-0",
            "o",
            "9",
            "d",
            "abc",
            "m",
            "0123456789abcdef",
        ])
        .expect("redis-cli");
    stranger
        .append_output("ses_1", &[data(12, "other")], 1 << 20)
        .await
        .expect("append output");
    sender
        .append_output("ses_1", &[data(17, "more")], 1 << 20)
        .await
        .expect("append output");
    let shown = reader.read_output("ses_1", 0, NO_WAIT).await.expect("read");
    assert_eq!(shown, vec![data(0, "real"), data(17, "more")]);

    // Relay answers: a forged "opened" ahead of the real refusal is skipped.
    redis
        .cli(&[
            "XADD",
            "outpost:term:ses_r:reply",
            "*",
            "ok",
            "1",
            "code",
            "",
            "error",
            "",
        ])
        .expect("redis-cli");
    relay::reply_open(
        sender.shared().expect("shared"),
        "ses_r",
        &Err(OpenRefusal::LimitReached("at its limit".into())),
    )
    .await
    .expect("reply");
    let answer = relay::wait_open_reply(&reader_redis, "ses_r", Duration::from_secs(2))
        .await
        .expect("read reply");
    assert_eq!(
        answer,
        Some(Err(OpenRefusal::LimitReached("at its limit".into())))
    );
}
