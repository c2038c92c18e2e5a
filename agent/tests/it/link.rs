//! The agent stays connected through control-plane crashes, by itself.

use std::time::Duration;

use crate::harness::{ControlPlane, Proc, agent_bin, run, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_comes_back_online_by_itself_after_the_control_plane_is_killed() {
    let mut cp = ControlPlane::start().await;
    let agent_dir = cp.dir.path().join("agent");
    let agent_dir_s = agent_dir.to_str().expect("utf8").to_string();
    let out = cp.enroll_agent("db1", &agent_dir_s);
    assert!(out.contains("agent_id: agt_"));
    let mut agent = Proc::spawn(
        &agent_bin(),
        &["run", "--data-dir", &agent_dir_s],
        &cp.dir.path().join("agent.log"),
    );
    cp.wait_status("db1", "online", Duration::from_secs(10))
        .await;

    for round in 0..2 {
        // kill -9: no close frames, no clean-up in storage.
        cp.proc.take().expect("running").0.kill().expect("kill -9");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            agent.is_running(),
            "round {round}: the agent exited when the control plane died"
        );
        cp.launch();
        cp.wait_healthy().await;
        let back = world::World::real().now();
        let took = cp
            .wait_status_since("db1", "online", back, Duration::from_secs(15))
            .await;
        eprintln!("round {round}: reconnected {took:?} after the control plane answered");
        assert!(agent.is_running());
    }

    // SIGTERM: a clean exit, and the control plane sees the agent leave.
    agent.signal("-TERM");
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    cp.wait_status("db1", "offline", Duration::from_secs(5))
        .await;
    let log = std::fs::read_to_string(cp.dir.path().join("agent.log")).unwrap_or_default();
    assert!(log.contains("SIGTERM"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_shuts_down_cleanly_on_sigterm_with_agents_connected() {
    let mut cp = ControlPlane::start().await;
    let token = cp.enroll_token();
    let agent_dir = cp.dir.path().join("agent");
    let agent_dir_s = agent_dir.to_str().expect("utf8").to_string();
    stdout(&run(
        &agent_bin(),
        &[
            "enroll",
            "--control-plane",
            &cp.url(),
            "--token",
            &token,
            "--data-dir",
            &agent_dir_s,
        ],
    ));
    let mut agent = Proc::spawn(
        &agent_bin(),
        &["run", "--data-dir", &agent_dir_s],
        &cp.dir.path().join("agent.log"),
    );
    let name = agent::identity::load(&agent_dir)
        .expect("load")
        .expect("enrolled")
        .name;
    cp.wait_status(&name, "online", Duration::from_secs(10))
        .await;
    let mut proc = cp.proc.take().expect("running");
    proc.signal("-TERM");
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("control plane exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", cp.log());
    assert!(agent.is_running(), "the agent outlives the control plane");
}
