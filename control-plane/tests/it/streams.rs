//! The terminal stream store, both backends (in-process and a real Redis): closing a session
//! is reported to exactly one of the callers that race to close it, so its end is audited once.

use std::time::Duration;

use control_plane::terminal::Streams;
use control_plane::terminal::streams::{SessionMeta, SessionState};
use world::World;

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
    }
}

async fn exactly_one_closer(streams: Streams) {
    streams.create("s1", &meta(), 10).await.expect("create");
    let keep = Duration::from_secs(60);
    let (a, b) = tokio::join!(
        streams.finish("s1", 2, "psql exited", keep),
        streams.finish("s1", 2, "abandoned", keep),
    );
    let (a, b) = (a.expect("finish"), b.expect("finish"));
    assert!(a ^ b, "exactly one caller closed it: {a} {b}");
    assert!(
        !streams
            .finish("s1", 3, "again", keep)
            .await
            .expect("finish")
    );
    let meta = streams
        .meta("s1")
        .await
        .expect("meta")
        .expect("still readable");
    assert_eq!(meta.state, SessionState::Closed);
    assert!(streams.live().await.expect("live").is_empty());
    assert!(
        !streams
            .finish("unknown", 3, "x", keep)
            .await
            .expect("finish"),
        "an unknown session was not closed by anyone"
    );
}

#[tokio::test]
async fn in_process_store_reports_one_closer() {
    exactly_one_closer(Streams::memory()).await;
}

#[tokio::test]
async fn redis_store_reports_one_closer() {
    let redis = fixtures::Redis::start().await.expect("start redis");
    let streams = Streams::redis(World::real(), &redis.url()).expect("redis url");
    exactly_one_closer(streams).await;
}

#[tokio::test]
async fn rediss_store_reports_one_closer_and_refuses_an_untrusted_certificate() {
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
    exactly_one_closer(Streams::redis(world, &url).expect("rediss url")).await;
}
