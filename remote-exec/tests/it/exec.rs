//! Every outcome class against a real sshd, host key policy, and receipts.

use fixtures::poll::until;
use std::sync::Arc;
use std::time::Duration;

use remote_exec::fleet::{self, Pool};
use remote_exec::quote::command_line;
use remote_exec::receipt;
use remote_exec::{
    Client, Host, HostKeyPolicy, OpId, Outcome, OutputKind, Phase, ReceiptStatus, Report, Timeouts,
};
use tokio_util::sync::CancellationToken;
use world::World;

use crate::harness::{Relay, Setup, closed_port, silent_listener, timeouts};

struct Ran {
    report: Report,
    stdout: String,
    stderr: String,
}

async fn run_on(
    client: &Client,
    host: &Host,
    line: &[u8],
    stop: Option<&[u8]>,
    cancel: &CancellationToken,
) -> Ran {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let report = match client.connect(host).await {
        Err(report) => report,
        Ok(mut conn) => {
            let mut sink = |kind: OutputKind, chunk: &[u8]| match kind {
                OutputKind::Stdout => out.extend_from_slice(chunk),
                OutputKind::Stderr => err.extend_from_slice(chunk),
            };
            let report = conn.exec(line, stop, &mut sink, cancel).await;
            conn.close().await;
            report
        }
    };
    Ran {
        report,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

async fn run_argv(client: &Client, host: &Host, argv: &[&str]) -> Ran {
    let line = command_line(argv).expect("quotable");
    run_on(client, host, &line, None, &CancellationToken::new()).await
}

fn error_of(r: &Report) -> &str {
    r.error.as_deref().unwrap_or("")
}

async fn receipt_status(client: Arc<Client>, host: &Host, op: &OpId) -> ReceiptStatus {
    let pool = Arc::new(Pool::new(client));
    let mut all = fleet::status(pool, vec![host.clone()], op, 1).await;
    let (_, status, error) = all.pop().expect("one host");
    assert!(error.is_none(), "status: {error:?}");
    status
}

/// Poll the receipts until they say `finished` (the remote command outlives the transport).
async fn wait_finished(client: Arc<Client>, host: &Host, op: &OpId) -> i32 {
    let finished = until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            match receipt_status(client.clone(), host, op).await {
                ReceiptStatus::Finished(code) => Some(code),
                _ => None,
            }
        },
    )
    .await;
    finished.unwrap_or_else(|| panic!("operation {op} never finished on {}", host.name))
}

#[tokio::test]
async fn exit_zero_is_ok_and_output_streams_by_kind() {
    let s = Setup::start().await;
    let client = s.client(timeouts());
    let ran = run_argv(
        &client,
        &s.good("db1"),
        &["sh", "-c", "echo out; echo err >&2"],
    )
    .await;
    assert_eq!(ran.report.outcome, Outcome::Ok, "{:?}", ran.report);
    assert_eq!(ran.report.exit_code, Some(0));
    assert_eq!(ran.stdout, "out\n");
    assert_eq!(ran.stderr, "err\n");
    assert!(ran.report.error.is_none());
}

#[tokio::test]
async fn non_zero_exit_is_command_failed_with_its_status() {
    let s = Setup::start().await;
    let client = s.client(timeouts());
    let ran = run_argv(&client, &s.good("db1"), &["sh", "-c", "exit 3"]).await;
    assert_eq!(ran.report.outcome, Outcome::CommandFailed);
    assert_eq!(ran.report.exit_code, Some(3));
    let ran = run_argv(&client, &s.good("db1"), &["sh", "-c", "kill -KILL $$"]).await;
    assert_eq!(
        ran.report.outcome,
        Outcome::CommandFailed,
        "{:?}",
        ran.report
    );
    assert_eq!(ran.report.exit_signal.as_deref(), Some("KILL"));
}

#[tokio::test]
async fn a_refused_port_is_not_started_in_connect() {
    let s = Setup::start().await;
    let client = s.client(timeouts());
    let ran = run_argv(&client, &s.host("db1", closed_port().await), &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::NotStarted);
    assert_eq!(ran.report.phase, Phase::Connect);
    assert!(
        error_of(&ran.report).contains("refused"),
        "{:?}",
        ran.report
    );
}

#[tokio::test]
async fn a_silent_listener_is_not_started_at_the_handshake_timeout() {
    let s = Setup::start().await;
    let (port, _listener) = silent_listener().await;
    let client = s.client(timeouts());
    let ran = run_argv(&client, &s.host("db1", port), &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::NotStarted);
    assert_eq!(ran.report.phase, Phase::Handshake);
    assert!(
        error_of(&ran.report).contains("did not finish within 2s"),
        "{:?}",
        ran.report
    );
    // The abandoned session task let go of its socket.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.gauges().live(), remote_exec::Live::default());
}

#[tokio::test]
async fn an_unknown_host_key_is_refused_unless_new_keys_are_accepted_and_then_recorded() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut host = s.good("db1");
    host.known_hosts = dir.path().join("known_hosts");
    std::fs::write(&host.known_hosts, "").expect("empty known_hosts");

    let ran = run_argv(&s.client(timeouts()), &host, &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::NotStarted);
    assert_eq!(ran.report.phase, Phase::Handshake);
    let e = error_of(&ran.report);
    assert!(e.contains("unknown host key for [127.0.0.1]:"), "{e}");
    assert!(
        e.contains("SHA256:") && e.contains("--accept-new-host-keys"),
        "{e}"
    );

    let accepting = Client::new(World::real(), timeouts(), HostKeyPolicy::AcceptNew);
    let ran = run_argv(&accepting, &host, &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::Ok, "{:?}", ran.report);
    let recorded = std::fs::read_to_string(&host.known_hosts).expect("read known_hosts");
    assert!(
        recorded
            .trim_start()
            .starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", s.sshd.port())),
        "{recorded}"
    );
    // Now known: the strict client trusts it.
    let ran = run_argv(&s.client(timeouts()), &host, &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::Ok, "{:?}", ran.report);
}

#[tokio::test]
async fn a_changed_host_key_is_refused_even_when_new_keys_are_accepted() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut host = s.good("db1");
    host.known_hosts = dir.path().join("known_hosts");
    // Another ed25519 key (the client's) recorded for this host.
    let other = std::fs::read_to_string(s.sshd.client_key().with_extension("pub"))
        .expect("read client public key");
    std::fs::write(
        &host.known_hosts,
        format!("[127.0.0.1]:{} {other}", s.sshd.port()),
    )
    .expect("write known_hosts");
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let client = Client::new(World::real(), timeouts(), policy);
        let ran = run_argv(&client, &host, &["true"]).await;
        assert_eq!(ran.report.outcome, Outcome::NotStarted);
        assert!(
            error_of(&ran.report).contains("HOST KEY CHANGED"),
            "{:?}",
            ran.report
        );
    }
}

#[tokio::test]
async fn a_host_known_by_a_key_of_another_algorithm_is_refused_even_when_new_keys_are_accepted() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut host = s.good("db1");
    host.known_hosts = dir.path().join("known_hosts");
    // The host is known by an RSA key; the server now offers ed25519.
    let rsa = dir.path().join("rsa");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
        .arg(&rsa)
        .status()
        .expect("run ssh-keygen (openssh-client)");
    assert!(status.success());
    let rsa_pub = std::fs::read_to_string(rsa.with_extension("pub")).expect("read rsa key");
    let recorded = format!("[127.0.0.1]:{} {rsa_pub}", s.sshd.port());
    std::fs::write(&host.known_hosts, &recorded).expect("write known_hosts");
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let client = Client::new(World::real(), timeouts(), policy);
        let ran = run_argv(&client, &host, &["true"]).await;
        assert_eq!(ran.report.outcome, Outcome::NotStarted, "{policy:?}");
        let e = error_of(&ran.report);
        assert!(
            e.contains("HOST KEY CHANGED") && e.contains("ssh-rsa (line 1)"),
            "{policy:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&host.known_hosts).expect("read known_hosts"),
        recorded,
        "nothing was learned"
    );
}

#[tokio::test]
async fn a_key_the_server_does_not_accept_is_not_started_in_auth() {
    let s = Setup::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("other");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("run ssh-keygen (openssh-client)");
    assert!(status.success());
    let mut host = s.good("db1");
    host.identity_file = key;
    let ran = run_argv(&s.client(timeouts()), &host, &["true"]).await;
    assert_eq!(ran.report.outcome, Outcome::NotStarted);
    assert_eq!(ran.report.phase, Phase::Auth);
    assert!(
        error_of(&ran.report).contains("refused user"),
        "{:?}",
        ran.report
    );
}

#[tokio::test]
async fn a_quiet_command_on_a_live_link_is_not_idle() {
    let s = Setup::start().await;
    // Silent for more than twice the idle timeout: keepalives keep proving the link alive.
    let ran = run_argv(
        &s.client(timeouts()),
        &s.good("db1"),
        &["sh", "-c", "sleep 4; echo awake"],
    )
    .await;
    assert_eq!(ran.report.outcome, Outcome::Ok, "{:?}", ran.report);
    assert_eq!(ran.stdout, "awake\n");
}

#[tokio::test]
async fn a_frozen_link_is_uncertain_and_the_receipts_reconcile_it() {
    let s = Setup::start().await;
    let relay = Relay::start(s.sshd.port()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut via_relay = s.host("db1", relay.port);
    via_relay.known_hosts = s.known_hosts_for(&[relay.port], dir.path());
    let client = s.client(timeouts());
    let op = OpId::generate(&World::real());
    let line = receipt::wrap(
        &op,
        &command_line(&["sh", "-c", "sleep 4; echo done"]).expect("quotable"),
    );
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        relay.freeze();
    };
    let never_canceled = CancellationToken::new();
    let (ran, ()) = tokio::join!(
        run_on(&client, &via_relay, &line, None, &never_canceled),
        freeze
    );
    assert_eq!(ran.report.outcome, Outcome::Uncertain, "{:?}", ran.report);
    assert!(
        error_of(&ran.report).contains("link dead"),
        "{:?}",
        ran.report
    );
    // Straight to the host, around the frozen relay: still running, then finished.
    let direct = s.good("db1");
    assert_eq!(
        receipt_status(client.clone(), &direct, &op).await,
        ReceiptStatus::Running
    );
    assert_eq!(wait_finished(client.clone(), &direct, &op).await, 0);
    let never = OpId::parse("op-never-ran").expect("valid id");
    assert_eq!(
        receipt_status(client.clone(), &direct, &never).await,
        ReceiptStatus::NeverStarted
    );
    drop(relay);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.gauges().live(), remote_exec::Live::default());
}

#[tokio::test]
async fn the_command_deadline_is_timed_out_and_stops_the_remote_process() {
    let s = Setup::start().await;
    let client = s.client(Timeouts {
        command: Duration::from_secs(1),
        ..timeouts()
    });
    let op = OpId::generate(&World::real());
    let line = receipt::wrap(&op, &command_line(&["sleep", "30"]).expect("quotable"));
    let host = s.good("db1");
    let stop = receipt::stop_script(&op);
    let ran = run_on(
        &client,
        &host,
        &line,
        Some(&stop),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(ran.report.outcome, Outcome::TimedOut, "{:?}", ran.report);
    // TERM reached `sleep` through the wrapper: 128 + 15.
    assert_eq!(wait_finished(client, &host, &op).await, 143);
}

#[tokio::test]
async fn cancellation_signals_the_remote_process_and_is_uncertain() {
    let s = Setup::start().await;
    let client = s.client(timeouts());
    let op = OpId::generate(&World::real());
    let line = receipt::wrap(&op, &command_line(&["sleep", "30"]).expect("quotable"));
    let host = s.good("db1");
    let cancel = CancellationToken::new();
    let trigger = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel();
    };
    let stop = receipt::stop_script(&op);
    let (ran, ()) = tokio::join!(run_on(&client, &host, &line, Some(&stop), &cancel), trigger);
    assert_eq!(ran.report.outcome, Outcome::Uncertain, "{:?}", ran.report);
    assert!(error_of(&ran.report).contains("canceled"));
    assert_eq!(wait_finished(client, &host, &op).await, 143);
}
