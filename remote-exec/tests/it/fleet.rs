//! Fan-out: error budget, connection reuse, and nothing left behind after many failures.

use std::sync::Arc;
use std::time::Duration;

use remote_exec::fleet::{self, ErrorBudget, Plan, Pool};
use remote_exec::quote::command_line;
use remote_exec::{Live, OpId, Outcome, RetryPolicy, Timeouts};
use tokio_util::sync::CancellationToken;
use world::World;

use crate::harness::{
    Relay, Setup, closed_port, mute_after_banner, open_fds, silent_listener, timeouts,
};

fn plan(argv: &[&str], concurrency: usize, budget: ErrorBudget) -> Arc<Plan> {
    Arc::new(Plan {
        op_id: OpId::generate(&World::real()),
        command: command_line(argv).expect("quotable"),
        receipts: true,
        concurrency,
        budget,
        retry: RetryPolicy {
            backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        output_bytes_max: 1024,
    })
}

#[tokio::test]
async fn a_spent_error_budget_stops_new_hosts_and_lets_running_ones_finish() {
    let s = Setup::start().await;
    let refused = closed_port().await;
    let hosts = vec![
        s.good("a"),
        s.host("b", refused),
        s.host("c", refused),
        s.good("d"),
        s.good("e"),
    ];
    let pool = Arc::new(Pool::new(s.client(timeouts())));
    let (results, summary) = fleet::run(
        pool.clone(),
        hosts,
        plan(&["true"], 1, ErrorBudget::Count(1)),
        None,
        CancellationToken::new(),
    )
    .await;
    let outcomes: Vec<(String, Outcome)> = results
        .iter()
        .map(|r| (r.host.clone(), r.report.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("a".into(), Outcome::Ok),
            ("b".into(), Outcome::NotStarted),
            ("c".into(), Outcome::NotStarted),
            ("d".into(), Outcome::NotStarted),
            ("e".into(), Outcome::NotStarted),
        ]
    );
    assert!(summary.budget_spent);
    assert_eq!(summary.skipped, 2);
    // not_started is safe to retry: b and c were tried three times each.
    assert_eq!(results[1].attempts, 3);
    assert_eq!(summary.retries, 4);
    assert!(
        results[3]
            .report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("error budget")),
        "{:?}",
        results[3].report
    );
    pool.close().await;
}

#[tokio::test]
async fn commands_reuse_one_connection_per_host() {
    let s = Setup::start().await;
    let pool = Arc::new(Pool::new(s.client(timeouts())));
    for round in 0..3 {
        let (results, _) = fleet::run(
            pool.clone(),
            vec![s.good("a")],
            plan(&["echo", "hi"], 4, ErrorBudget::Unlimited),
            None,
            CancellationToken::new(),
        )
        .await;
        assert_eq!(results[0].report.outcome, Outcome::Ok, "round {round}");
        assert_eq!(results[0].stdout.bytes, b"hi\n");
        assert_eq!(
            pool.client().gauges().live().connections,
            1,
            "round {round}"
        );
        assert_eq!(pool.idle_count(), 1);
    }
    pool.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pool.client().gauges().live(), Live::default());
}

#[tokio::test]
async fn many_operations_with_injected_failures_leave_no_socket_channel_or_task() {
    let s = Setup::start().await;
    let fds_before = open_fds();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    {
        let (silent, silent_task) = silent_listener().await;
        let (mute, mute_task) = mute_after_banner().await;
        let refused = closed_port().await;
        let relay = Relay::start(s.sshd.port()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let relayed_known_hosts = s.known_hosts_for(&[relay.port], dir.path());
        let mut hosts = Vec::new();
        for i in 0..60 {
            let name = format!("h{i}");
            let host = match i % 7 {
                0 => s.host(&name, refused),
                1 => s.host(&name, silent),
                6 => s.host(&name, mute),
                2 | 3 => s.good(&name),
                _ => {
                    let mut h = s.host(&name, relay.port);
                    h.known_hosts = relayed_known_hosts.clone();
                    h
                }
            };
            hosts.push(host);
        }
        let client = s.client(Timeouts {
            handshake: Duration::from_millis(500),
            command: Duration::from_secs(3),
            idle: Duration::from_millis(900),
            ..timeouts()
        });
        let pool = Arc::new(Pool::new(client));
        let cancel = CancellationToken::new();
        // Half the hosts fail their command, some time out; the relay freezes mid-run and a
        // cancel lands at the end.
        let argv = [
            "sh",
            "-c",
            "sleep 0.$(($$ % 9)); test $(($$ % 2)) -eq 0 || sleep 5",
        ];
        let run = fleet::run(
            pool.clone(),
            hosts,
            plan(&argv, 16, ErrorBudget::Unlimited),
            None,
            cancel.clone(),
        );
        let faults = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            relay.freeze();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            cancel.cancel();
        };
        let ((results, summary), ()) = tokio::join!(run, faults);
        assert_eq!(results.len(), 60);
        let classes: std::collections::BTreeSet<Outcome> =
            results.iter().map(|r| r.report.outcome).collect();
        assert!(
            classes.contains(&Outcome::NotStarted) && classes.len() >= 3,
            "{summary:?}"
        );
        pool.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Checked while the silent peers still hold their ends open: nothing here may rely
        // on the peer closing the connection.
        assert_eq!(
            pool.client().gauges().live(),
            Live::default(),
            "{summary:?}"
        );
        drop(relay);
        silent_task.abort(); // the test's own listeners, not the code under test
        mute_task.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        tasks_before,
        "tasks left running"
    );
    assert_eq!(open_fds(), fds_before, "file descriptors left open");
}
