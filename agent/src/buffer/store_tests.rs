use super::{Buffer, Limits, OpenReport, check, stats_at};

fn recs(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| ("pg_stat_database".to_string(), format!("{{\"i\":{i}}}")))
        .collect()
}

#[test]
fn seq_never_repeats_within_an_epoch_across_deletes_and_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    {
        let (mut b, report) = Buffer::open(&path, Limits::default(), "ep1", 0).expect("open");
        assert_eq!(report, OpenReport::Created);
        assert_eq!(b.append(1_000, &recs(5)).expect("append"), 5);
        let oldest = b.oldest(3).expect("oldest");
        assert_eq!(
            oldest.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        b.delete_through(5).expect("delete all");
    }
    let (mut b, report) = Buffer::open(&path, Limits::default(), "ignored", 0).expect("reopen");
    assert_eq!(report, OpenReport::Opened);
    assert_eq!(b.epoch(), "ep1", "the epoch belongs to the file");
    b.append(2_000, &recs(2)).expect("append");
    assert_eq!(
        b.oldest(10)
            .expect("oldest")
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        vec![6, 7]
    );
}

#[test]
fn a_record_larger_than_the_control_plane_takes_is_dropped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) =
        Buffer::open(&dir.path().join("buffer.db"), Limits::default(), "ep", 0).expect("open");
    let records = vec![
        ("ok".to_string(), "1".to_string()),
        (
            "huge".to_string(),
            format!("\"{}\"", "x".repeat(proto::METRIC_RECORD_BYTES_MAX)),
        ),
    ];
    assert_eq!(b.append(1_000, &records).expect("append"), 1);
    let s = b.stats(1_000).expect("stats");
    assert_eq!(s.rows, 1);
    assert_eq!(s.dropped_total["too_large"], 1);
}

#[test]
fn size_and_age_limits_drop_and_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let limits = Limits {
        bytes_max: 1024 * 1024,
        age_max_ms: 60_000,
        quarantined_max: 3,
    };
    let (mut b, _) = Buffer::open(&path, limits, "ep", 0).expect("open");
    let big: Vec<(String, String)> = (0..200)
        .map(|_| ("t".to_string(), "x".repeat(1000)))
        .collect();
    let mut stored = 0;
    let mut offered = 0;
    for i in 0..40 {
        offered += big.len();
        stored += b.append(i * 1000, &big).expect("append");
    }
    assert!(b.is_full());
    let s = b.stats(40_000).expect("stats");
    assert_eq!(s.rows as usize, stored);
    assert_eq!(
        s.dropped_total["size"] as usize,
        offered - stored,
        "every refused row is counted"
    );
    assert!(s.utilization >= 1.0, "{}", s.utilization);
    // Age: records stamped before `now - 60 s` go, counted; the newest batch (ts 1000) stays.
    assert!(stored > 200, "more than one batch fits before the limit");
    let now = 1_000 + 60_000;
    let expired = b.expire(now).expect("expire");
    assert_eq!(expired, 200, "exactly the batch stamped 0");
    let s = b.stats(now).expect("stats");
    assert_eq!(s.dropped_total["age"], expired);
    assert_eq!(s.rows as usize, stored - expired as usize);
    assert!(
        b.oldest(1000)
            .expect("oldest")
            .iter()
            .all(|r| r.ts_ms >= now - 60_000)
    );
    assert!(!b.is_full() || s.rows > 0);
}

#[test]
fn garbage_is_quarantined_a_new_epoch_begins_and_old_files_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    {
        let (mut b, _) = Buffer::open(&path, Limits::default(), "first", 0).expect("open");
        b.append(1, &recs(3)).expect("append");
    }
    for round in 0..5i64 {
        std::fs::write(
            &path,
            b"this is not a sqlite file, it is garbage from a bad disk",
        )
        .expect("garbage");
        assert!(check(&path).is_err());
        let (mut b, report) = Buffer::open(
            &path,
            Limits::default(),
            &format!("new{round}"),
            1_000 + round,
        )
        .expect("open after garbage");
        match report {
            OpenReport::Quarantined { moved_to, .. } => assert!(moved_to.exists() || round > 2),
            other => panic!("expected quarantine, got {other:?}"),
        }
        assert_eq!(b.epoch(), format!("new{round}"));
        assert_eq!(b.append(2, &recs(1)).expect("append"), 1);
        assert_eq!(
            b.oldest(1).expect("oldest")[0].seq,
            1,
            "a new epoch starts its own seq"
        );
    }
    let quarantined = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_string_lossy().contains(".corrupt-")
                && !e.file_name().to_string_lossy().ends_with("-wal")
                && !e.file_name().to_string_lossy().ends_with("-shm")
        })
        .count();
    assert_eq!(quarantined, 3, "at most quarantined_max files are kept");
    let s = stats_at(&path, 10).expect("stats");
    assert_eq!(s.epoch, "new4");
    assert_eq!(check(&path).expect("healthy"), 1);
}

#[test]
fn delivery_failures_count_up_and_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut b, _) =
        Buffer::open(&dir.path().join("b.db"), Limits::default(), "ep", 0).expect("open");
    b.delivery_result(false).expect("fail");
    b.delivery_result(false).expect("fail");
    assert_eq!(b.stats(0).expect("stats").delivery_failures, 2);
    b.delivery_result(true).expect("ok");
    assert_eq!(b.stats(0).expect("stats").delivery_failures, 0);
}

#[test]
fn records_whose_append_fails_are_counted_as_write_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let (mut b, _) = Buffer::open(&path, Limits::default(), "ep", 0).expect("open");
    b.append(1_000, &recs(3)).expect("append");
    // The file may not grow: what a full disk does to SQLite.
    let pages: i64 = b
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("page count");
    b.conn
        .pragma_update(None, "max_page_count", pages)
        .expect("cap");
    let big: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                "pg_stat_database".to_string(),
                format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(2000)),
            )
        })
        .collect();
    assert!(b.append(2_000, &big).is_err(), "the append cannot fit");
    assert_eq!(
        b.stats(2_000).expect("stats").dropped_total["write_failed"],
        200
    );
    // Room again: the next append lands and writes the count down with it.
    b.conn
        .pragma_update(None, "max_page_count", 1_000_000)
        .expect("uncap");
    assert_eq!(b.append(3_000, &recs(2)).expect("append"), 2);
    drop(b);
    let stats = stats_at(&path, 3_000).expect("stats");
    assert_eq!(stats.dropped_total["write_failed"], 200);
    assert_eq!(
        stats.rows, 5,
        "seq continues: nothing of the failed append is on disk"
    );
}
