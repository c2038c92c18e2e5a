//! The pgBackRest kinds (`pgbackrest_backup`, `pgbackrest_check`, `pgbackrest_verify`): what
//! the host grants in `[backups]`, how a request's parameters are checked, the command line,
//! and the role gate that runs first.
//!
//! A backup kind runs as `outpost-agent backup-gate --run-on ROLE -d DSN -- pgbackrest …`
//! with the run user's rights. The gate asks Postgres `pg_is_in_recovery()`; on the role the
//! task names (or on `any`) it becomes pgBackRest (exec: same process, same group, so timeouts,
//! cancels and adoption treat it as any command), else it prints why and exits with
//! [`SKIPPED_EXIT`], which the agent records as `skipped`: an HA pair whose schedule says
//! `run_on = primary` makes one backup after a failover, and the standby's runs are not
//! failures.
//!
//! `pgbackrest verify` checks each backup's own WAL but reports a hole between two archived
//! ranges only as two `DETAIL` lines, and ends successfully: a point-in-time recovery across
//! that hole would fail. For `pgbackrest_verify` the gate therefore stays the parent, passes
//! pgBackRest's output through, and fails the run naming the missing segments when the
//! archive of any database system has more than one range.

use std::path::PathBuf;

use super::model::{Kind, TaskSpec};

/// The gate's exit code for "not this host's role": sysexits' EX_TEMPFAIL, which pgBackRest
/// does not use (its own errors exit with codes from 25 upward).
pub const SKIPPED_EXIT: i32 = 75;

/// What `[backups]` grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupGrant {
    /// The pgBackRest program.
    pub pgbackrest: PathBuf,
    /// `--config` for pgBackRest; its default file when `None`.
    pub config: Option<PathBuf>,
    /// Stanzas the backup kinds may name; none turns them off.
    pub stanzas: Vec<String>,
    /// Whose rights pgBackRest runs with (the data directory's owner, usually `postgres`);
    /// `[tasks] run_as` when `None`. Only the backup kinds get these rights.
    pub run_as: Option<crate::run_as::RunAs>,
    /// Where restore drills may restore (none: drills are off).
    pub scratch_dirs: Vec<PathBuf>,
    /// The server programs drills start; Debian's for the backup's version when `None`.
    pub pg_bin: Option<PathBuf>,
}

/// Longest check query a drill takes.
pub const CHECK_BYTES_MAX: usize = 4096;

/// The role a backup kind runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOn {
    Primary,
    Standby,
    Any,
}

impl RunOn {
    pub fn parse(v: &str) -> Result<RunOn, String> {
        match v {
            "primary" => Ok(RunOn::Primary),
            "standby" => Ok(RunOn::Standby),
            "any" => Ok(RunOn::Any),
            other => Err(format!("run_on {other:?} must be primary, standby or any")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RunOn::Primary => "primary",
            RunOn::Standby => "standby",
            RunOn::Any => "any",
        }
    }

    /// Why a host whose `in_recovery` is as given must not run it, if it must not.
    pub fn refuses(self, in_recovery: bool) -> Option<String> {
        match (self, in_recovery) {
            (RunOn::Primary, true) => Some(
                "skipped: this host is a standby (in recovery) and the task runs on the primary (run_on = primary)"
                    .into(),
            ),
            (RunOn::Standby, false) => Some(
                "skipped: this host is a primary and the task runs on a standby (run_on = standby)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// `s` as a stanza name ([`proto::stanza_name_ok`]), or why not.
pub fn check_stanza_name(s: &str) -> Result<(), String> {
    if proto::stanza_name_ok(s) {
        return Ok(());
    }
    Err(format!(
        "stanza {s:?} is not a stanza name (letters, digits, '-', '_', '.'; at most 64)"
    ))
}

/// Check a backup kind's parameters against the grant; every refusal says what to change.
/// Run when the task is added and again before each run (the config may have changed).
pub fn check(
    grant: Option<&BackupGrant>,
    kind: Kind,
    params: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let stanza = params.get("stanza").map(String::as_str).unwrap_or_default();
    check_stanza_name(stanza)?;
    let Some(grant) = grant.filter(|g| !g.stanzas.is_empty()) else {
        return Err(format!(
            "{} is off on this host: grant it in the agent's config ([backups] stanzas = [\"{stanza}\"])",
            kind.name()
        ));
    };
    if !grant.stanzas.iter().any(|s| s == stanza) {
        return Err(format!(
            "stanza {stanza:?} is not granted on this host ([backups] stanzas: {})",
            grant.stanzas.join(", ")
        ));
    }
    if let Some(t) = params.get("type")
        && !["full", "diff", "incr"].contains(&t.as_str())
    {
        return Err(format!("type {t:?} must be full, diff or incr"));
    }
    if let Some(r) = params.get("repo")
        && !r.parse::<u16>().is_ok_and(|n| (1..=256).contains(&n))
    {
        return Err(format!("repo {r:?} must be a repository number, 1 to 256"));
    }
    if let Some(r) = params.get("run_on") {
        RunOn::parse(r)?;
    }
    if kind == Kind::RestoreDrill {
        check_drill(grant, params)?;
    }
    Ok(())
}

/// A drill's own parameters: its scratch directory (the first listed by default), the backup
/// label, the check query.
fn check_drill(
    grant: &BackupGrant,
    params: &std::collections::BTreeMap<String, String>,
) -> Result<PathBuf, String> {
    if let Some(set) = params.get("set")
        && (set.is_empty()
            || set.len() > 64
            || !set
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)))
    {
        return Err(format!(
            "set {set:?} is not a backup label (e.g. 20261207-010000F)"
        ));
    }
    if let Some(check) = params.get("check")
        && (check.trim().is_empty() || check.len() > CHECK_BYTES_MAX)
    {
        return Err(format!("check must be 1 to {CHECK_BYTES_MAX} bytes of SQL"));
    }
    let scratch = match params.get("scratch") {
        Some(dir) => dir.clone(),
        None => grant
            .scratch_dirs
            .first()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    };
    super::drill::check_scratch(&scratch, &grant.scratch_dirs)
}

/// The gate and pgBackRest's argv for `spec` (checked again here), given the agent binary
/// and the DSN (its password travels apart, in `PGPASSWORD`).
pub fn argv(
    spec: &TaskSpec,
    grant: Option<&BackupGrant>,
    agent_exe: &std::path::Path,
    dsn: Option<String>,
) -> Result<Vec<String>, String> {
    check(grant, spec.kind, &spec.params)?;
    let grant = grant.ok_or("no [backups] grant")?;
    let p = |k: &str| spec.params.get(k).map(String::as_str);
    if spec.kind == Kind::RestoreDrill {
        return Ok(drill_argv(
            spec,
            grant,
            agent_exe,
            check_drill(grant, &spec.params)?,
        ));
    }
    let run_on = match p("run_on") {
        Some(r) => RunOn::parse(r)?,
        // Backups and checks go to the primary unless said otherwise; verify only reads the
        // repository, so any host with the stanza may run it.
        None if spec.kind == Kind::PgbackrestVerify => RunOn::Any,
        None => RunOn::Primary,
    };
    let mut argv = vec![
        agent_exe.display().to_string(),
        "backup-gate".into(),
        "--run-on".into(),
        run_on.name().into(),
    ];
    match dsn {
        Some(dsn) => argv.extend(["-d".into(), dsn]),
        None if run_on == RunOn::Any => {}
        None => {
            return Err(format!(
                "{} with run_on = {} asks Postgres for this host's role: start the agent with --postgres (or set run_on = any)",
                spec.kind.name(),
                run_on.name()
            ));
        }
    }
    argv.extend(["--".into(), grant.pgbackrest.display().to_string()]);
    if let Some(config) = &grant.config {
        argv.push(format!("--config={}", config.display()));
    }
    argv.push(format!("--stanza={}", p("stanza").unwrap_or_default()));
    if let Some(repo) = p("repo") {
        argv.push(format!("--repo={repo}"));
    }
    let command = match spec.kind {
        Kind::PgbackrestBackup => {
            argv.push(format!("--type={}", p("type").unwrap_or("incr")));
            "backup"
        }
        Kind::PgbackrestCheck => "check",
        Kind::PgbackrestVerify => {
            // The ranges the gate checks are printed at this level.
            argv.push("--log-level-console=detail".into());
            argv.insert(4, "--check-wal-ranges".into());
            "verify"
        }
        other => return Err(format!("{} is not a pgBackRest command", other.name())),
    };
    argv.push(command.into());
    Ok(argv)
}

/// A drill: the gate (no role asked: the drill touches only its copy) and `restore-drill`.
fn drill_argv(
    spec: &TaskSpec,
    grant: &BackupGrant,
    exe: &std::path::Path,
    scratch: PathBuf,
) -> Vec<String> {
    let exe = exe.display().to_string();
    let mut argv = vec![
        exe.clone(),
        "backup-gate".into(),
        "--run-on".into(),
        "any".into(),
        "--".into(),
        exe,
        "restore-drill".into(),
        "--stanza".into(),
        spec.params.get("stanza").cloned().unwrap_or_default(),
        "--scratch".into(),
        scratch.display().to_string(),
        "--pgbackrest".into(),
        grant.pgbackrest.display().to_string(),
    ];
    if let Some(config) = &grant.config {
        argv.extend(["--config".into(), config.display().to_string()]);
    }
    if let Some(bin) = &grant.pg_bin {
        argv.extend(["--pg-bin".into(), bin.display().to_string()]);
    }
    if let Some(set) = spec.params.get("set") {
        argv.extend(["--set".into(), set.clone()]);
    }
    if let Some(check) = spec.params.get("check") {
        argv.extend(["--check".into(), check.clone()]);
    }
    argv
}

/// `outpost-agent backup-gate --run-on ROLE -d DSN -- PROGRAM ARGS…`: exit with
/// [`SKIPPED_EXIT`] and the reason when this host's role is not `run_on`, else become
/// `PROGRAM`. Returns (with the error) only when neither could be done.
pub fn gate(run_on: &str, dsn: Option<&str>, check_ranges: bool, argv: &[String]) -> String {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        return "backup-gate: no command after --".into();
    };
    let run_on = match RunOn::parse(run_on) {
        Ok(r) => r,
        Err(e) => return format!("backup-gate: {e}"),
    };
    if run_on != RunOn::Any {
        let Some(dsn) = dsn else {
            return format!("backup-gate: run_on = {} needs -d DSN", run_on.name());
        };
        match in_recovery(dsn) {
            Ok(in_recovery) => {
                if let Some(why) = run_on.refuses(in_recovery) {
                    println!("{why}");
                    std::process::exit(SKIPPED_EXIT);
                }
            }
            Err(e) => return format!("backup-gate: ask Postgres for this host's role: {e}"),
        }
    }
    if check_ranges {
        return match verify_ranges(program, args) {
            Ok(code) => std::process::exit(code),
            Err(e) => e,
        };
    }
    let error = std::process::Command::new(program).args(args).exec();
    format!("start {program}: {error}")
}

/// Run `pgbackrest … verify` as a child with its output passed through; its exit code, or 1
/// when it succeeded but the archive has a hole (named on the last lines).
fn verify_ranges(program: &str, args: &[String]) -> Result<i32, String> {
    use std::io::{BufRead, Write};
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut ranges = Vec::new();
    let mut out = std::io::stdout().lock();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(range) = WalRange::parse(&line) {
            ranges.push(range);
        }
        let _ = writeln!(out, "{line}");
    }
    let status = child
        .wait()
        .map_err(|e| format!("wait for {program}: {e}"))?;
    let code = status.code().unwrap_or(1);
    if code != 0 {
        return Ok(code);
    }
    let holes = holes(&ranges);
    for hole in &holes {
        let _ = writeln!(out, "{hole}");
    }
    Ok(if holes.is_empty() { 0 } else { 1 })
}

/// One `archiveId: 15-1, wal start: …, wal stop: …` line of `verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WalRange {
    archive: String,
    start: String,
    stop: String,
}

impl WalRange {
    fn parse(line: &str) -> Option<WalRange> {
        let rest = &line[line.find("archiveId: ")? + "archiveId: ".len()..];
        let (archive, rest) = rest.split_once(", wal start: ")?;
        let (start, stop) = rest.split_once(", wal stop: ")?;
        let segment = |s: &str| s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let stop = stop.trim();
        (segment(start) && segment(stop)).then(|| WalRange {
            archive: archive.to_string(),
            start: start.to_string(),
            stop: stop.to_string(),
        })
    }
}

/// What lies between consecutive ranges of one archive, as a sentence each. Segments are
/// named when the hole stays within one log file (their names then differ only in the last
/// eight digits, whatever the segment size), else the hole's bounds are given.
fn holes(ranges: &[WalRange]) -> Vec<String> {
    let mut holes = Vec::new();
    for pair in ranges.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.archive != b.archive {
            continue;
        }
        let same_log = a.stop[..16] == b.start[..16];
        let seg = |s: &str| u32::from_str_radix(&s[16..], 16).ok();
        let missing = match (same_log, seg(&a.stop), seg(&b.start)) {
            (true, Some(from), Some(to)) if to > from + 1 => {
                let names: Vec<String> = (from + 1..to)
                    .take(20)
                    .map(|n| format!("{}{n:08X}", &a.stop[..16]))
                    .collect();
                let more = (to - from - 1) as usize - names.len();
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("{}{more}", names.join(", "))
            }
            _ => format!("the segments after {} and before {}", a.stop, b.start),
        };
        holes.push(format!(
            "WAL missing from the archive {}: {missing} (a recovery through this stretch would stop there)",
            a.archive
        ));
    }
    holes
}

/// `pg_is_in_recovery()` on the server `dsn` names (password from `PGPASSWORD`).
fn in_recovery(dsn: &str) -> Result<bool, String> {
    let mut config: tokio_postgres::Config = dsn.parse().map_err(|e| format!("{e}"))?;
    if let Ok(password) = std::env::var("PGPASSWORD") {
        config.password(password);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("start a runtime: {e}"))?;
    runtime.block_on(async {
        let world = world::World::real();
        let (client, driver) =
            world::postgres_connect(&world, &config, std::time::Duration::from_secs(10)).await?;
        let row = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
        driver.abort();
        row.try_get::<_, bool>(0).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_granted_stanzas_and_known_values_pass() {
        let grant = BackupGrant {
            pgbackrest: "pgbackrest".into(),
            stanzas: vec!["main".into()],
            ..BackupGrant::default()
        };
        let backup = Kind::PgbackrestBackup;
        assert!(check(Some(&grant), backup, &params(&[("stanza", "main")])).is_ok());
        assert!(
            check(None, backup, &params(&[("stanza", "main")]))
                .expect_err("no grant")
                .contains("[backups] stanzas")
        );
        for (bad, says) in [
            (params(&[("stanza", "other")]), "not granted"),
            (params(&[("stanza", "--repo=2")]), "not a stanza name"),
            (
                params(&[("stanza", "main"), ("type", "log")]),
                "full, diff or incr",
            ),
            (params(&[("stanza", "main"), ("repo", "0")]), "1 to 256"),
            (
                params(&[("stanza", "main"), ("run_on", "leader")]),
                "primary, standby or any",
            ),
        ] {
            let error = check(Some(&grant), backup, &bad).expect_err("refused");
            assert!(error.contains(says), "{error}");
        }
    }

    #[test]
    fn the_command_line_is_the_gate_then_pgbackrest() {
        let grant = BackupGrant {
            pgbackrest: "/usr/bin/pgbackrest".into(),
            config: Some("/etc/pgbackrest/pgbackrest.conf".into()),
            stanzas: vec!["main".into()],
            ..BackupGrant::default()
        };
        let spec = TaskSpec {
            kind: Kind::PgbackrestBackup,
            params: params(&[("stanza", "main"), ("type", "full"), ("repo", "2")]),
            argv: Vec::new(),
            schedule: super::super::model::Schedule::Once { at_ms: 0 },
            timeout_ms: 1000,
            key: String::new(),
            window: None,
            critical: false,
        };
        let argv = argv(
            &spec,
            Some(&grant),
            std::path::Path::new("/usr/bin/outpost-agent"),
            Some("host=/run/postgresql".into()),
        )
        .expect("argv");
        assert_eq!(
            argv,
            [
                "/usr/bin/outpost-agent",
                "backup-gate",
                "--run-on",
                "primary",
                "-d",
                "host=/run/postgresql",
                "--",
                "/usr/bin/pgbackrest",
                "--config=/etc/pgbackrest/pgbackrest.conf",
                "--stanza=main",
                "--repo=2",
                "--type=full",
                "backup"
            ]
        );
        assert_eq!(RunOn::Primary.refuses(false), None);
        assert!(RunOn::Primary.refuses(true).is_some());
        assert!(RunOn::Standby.refuses(false).is_some());
        assert_eq!(RunOn::Any.refuses(true), None);
    }

    #[test]
    fn a_hole_between_archived_ranges_is_named() {
        let lines = [
            "2026-12-07 10:28:55.752 P00 DETAIL: archiveId: 15-1, wal start: 000000010000000000000001, wal stop: 000000010000000000000002",
            "2026-12-07 10:28:55.752 P00 DETAIL: archiveId: 15-1, wal start: 000000010000000000000004, wal stop: 000000010000000000000005",
            "2026-12-07 10:28:55.752 P00 DETAIL: archiveId: 15-1, wal start: 0000000100000001000000A0, wal stop: 0000000100000001000000A1",
            "2026-12-07 10:28:55.752 P00 DETAIL: archiveId: 16-2, wal start: 000000020000000100000001, wal stop: 000000020000000100000001",
            "2026-12-07 10:28:55.753 P00   INFO: verify command end: completed successfully (271ms)",
        ];
        let ranges: Vec<WalRange> = lines.iter().filter_map(|l| WalRange::parse(l)).collect();
        assert_eq!(ranges.len(), 4);
        let found = holes(&ranges);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("15-1: 000000010000000000000003 ("),
            "{}",
            found[0]
        );
        assert!(
            found[1].contains("after 000000010000000000000005 and before 0000000100000001000000A0"),
            "{}",
            found[1]
        );
        assert!(holes(&ranges[..1]).is_empty());
    }
}
