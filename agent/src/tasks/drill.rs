//! Restore drills (`restore_drill`): prove a backup restores, without touching the server.
//!
//! `outpost-agent restore-drill` runs as the `[backups] run_as` user (through the role gate,
//! with `run_on = any`) and, in order:
//! 1. checks the scratch directory (listed in `[backups] restore_scratch_dirs`, absolute,
//!    reached through no symbolic link) and removes what an earlier drill that was killed left
//!    there (a drill directory whose lock nobody holds; its postmaster stopped first);
//! 2. reads the backup's size from `pgbackrest info` and refuses unless the scratch file
//!    system has 1.1 × that free;
//! 3. makes `drill-<stanza>-<ms>/` (mode 0700, locked while the drill lives) and restores the
//!    backup into it with `pgbackrest restore --type=immediate --archive-mode=off`: recovery
//!    ends where the backup becomes consistent, and nothing is archived from the copy;
//! 4. starts a postmaster on it with no TCP listener, its socket in the drill directory only,
//!    trust for local connections in a directory only the run user can enter, archiving and
//!    replication off, and waits until recovery has reached its target;
//! 5. runs the check query (default `SELECT count(*) FROM pg_class`) with psql;
//! 6. prints one `drill: {…}` JSON line (the backup, its size, restore, start and check
//!    seconds, and the RTO: restore start to check end), stops the postmaster and removes the
//!    directory, on success, failure and SIGTERM (a timeout or a cancel) alike.
//!
//! A drill killed with SIGKILL (or the host rebooting) leaves its directory; the next drill in
//! that scratch directory removes it (step 1). A kill -9 of the agent does not stop a drill:
//! its keeper keeps it, and the next agent adopts it as any run.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A drill's directory name starts with this.
const DRILL_PREFIX: &str = "drill-";
/// The default check.
pub const DEFAULT_CHECK: &str = "SELECT count(*) FROM pg_class";
/// Free space wanted, as a multiple of the backup's size.
const SPACE_FACTOR: f64 = 1.1;
/// How long the restored server gets to reach its recovery target.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// What a drill is told on its command line (`outpost-agent restore-drill`).
#[derive(Clone, Debug, clap::Args)]
pub struct Drill {
    #[arg(long)]
    pub stanza: String,
    /// A backup label [default: the newest good backup].
    #[arg(long)]
    pub set: Option<String>,
    #[arg(long)]
    pub scratch: PathBuf,
    #[arg(long)]
    pub pgbackrest: PathBuf,
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The server programs (`postgres`, `psql`) [default: Debian's directory for the
    /// backup's major version, /usr/lib/postgresql/VERSION/bin].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_CHECK)]
    pub check: String,
}

/// `dir` as a scratch directory: absolute, existing, reached through no symbolic link, and
/// one of `allowed` (themselves resolved).
pub fn check_scratch(dir: &str, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    let given = Path::new(dir);
    if !given.is_absolute() {
        return Err(format!(
            "scratch directory {dir:?} must be an absolute path"
        ));
    }
    if allowed.is_empty() {
        return Err(
            "restore drills are off on this host: list their scratch directories in the agent's config ([backups] restore_scratch_dirs)"
                .into(),
        );
    }
    let real =
        std::fs::canonicalize(given).map_err(|e| format!("scratch directory {dir:?}: {e}"))?;
    if real != given {
        return Err(format!(
            "scratch directory {dir:?} is reached through a symbolic link (it is {}); drills write only into real directories",
            real.display()
        ));
    }
    if !allowed
        .iter()
        .any(|a| std::fs::canonicalize(a).is_ok_and(|a| a == real))
    {
        let list: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
        return Err(format!(
            "scratch directory {dir:?} is not one of [backups] restore_scratch_dirs ({})",
            list.join(", ")
        ));
    }
    Ok(real)
}

/// A line for the run's output (the agent keeps it with the run).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "drill: {line}");
    let _ = out.flush();
}

fn now_ms() -> i64 {
    world::World::real().now_unix_ms()
}

/// Run the drill; the process's exit code.
pub fn run(drill: &Drill) -> i32 {
    match drill_steps(drill) {
        Ok(()) => 0,
        Err(e) => {
            say(&format!("failed: {e}"));
            1
        }
    }
}

fn drill_steps(drill: &Drill) -> Result<(), String> {
    remove_leftovers(&drill.scratch);
    let (label, size, version) = backup_of(drill)?;
    let pg_bin = match &drill.pg_bin {
        Some(dir) => dir.clone(),
        None => PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")),
    };
    if !pg_bin.join("postgres").exists() {
        return Err(format!(
            "{} has no postgres program for this PostgreSQL {version} backup; install its server package or set [backups] pg_bin",
            pg_bin.display()
        ));
    }
    let drill = &Drill {
        pg_bin: Some(pg_bin),
        ..drill.clone()
    };
    let free = free_bytes(&drill.scratch)?;
    let wanted = (size as f64 * SPACE_FACTOR) as u64;
    if free < wanted {
        return Err(format!(
            "{} has {free} bytes free; restoring {label} ({size} bytes) needs {wanted} (1.1 × its size)",
            drill.scratch.display()
        ));
    }
    let dir = drill
        .scratch
        .join(format!("{DRILL_PREFIX}{}-{}", drill.stanza, now_ms()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("make {}: {e}", dir.display()))?;
    let lock = lock(&dir)?;
    let guard = Cleanup::new(dir.clone());
    let result = restore_and_check(drill, &dir, &label, size);
    drop(guard);
    drop(lock);
    result
}

/// The backup to restore: `set`, or the newest; its label, database size and major version.
fn backup_of(drill: &Drill) -> Result<(String, u64, String), String> {
    let mut cmd = Command::new(&drill.pgbackrest);
    if let Some(c) = &drill.config {
        cmd.arg(format!("--config={}", c.display()));
    }
    let out = cmd
        .args([
            &format!("--stanza={}", drill.stanza),
            "--log-level-file=off",
            "--output=json",
            "info",
        ])
        .output()
        .map_err(|e| format!("run pgbackrest info: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pgbackrest info: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("pgbackrest info: {e}"))?;
    let backups = info[0]["backup"].as_array().cloned().unwrap_or_default();
    let chosen = match &drill.set {
        Some(set) => backups.iter().find(|b| b["label"].as_str() == Some(set)),
        None => backups
            .iter()
            .rev()
            .find(|b| b["error"] != serde_json::Value::Bool(true)),
    };
    let Some(b) = chosen else {
        return Err(match &drill.set {
            Some(set) => format!("stanza {} has no backup {set}", drill.stanza),
            None => format!("stanza {} has no backup to restore", drill.stanza),
        });
    };
    let label = b["label"].as_str().unwrap_or_default().to_string();
    let db_id = b["database"]["id"].as_i64();
    let version = info[0]["db"]
        .as_array()
        .and_then(|dbs| dbs.iter().find(|d| d["id"].as_i64() == db_id))
        .and_then(|d| d["version"].as_str())
        .unwrap_or_default()
        .to_string();
    Ok((label, b["info"]["size"].as_u64().unwrap_or(0), version))
}

fn free_bytes(dir: &Path) -> Result<u64, String> {
    let st =
        nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Hold `dir/.lock` for as long as the drill lives (a later drill sees it is alive).
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, String> {
    let file =
        File::create(dir.join(".lock")).map_err(|e| format!("lock {}: {e}", dir.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("lock {}: {e}", dir.display()))
}

/// Drill directories in `scratch` whose drill is gone: their postmaster stopped, removed.
fn remove_leftovers(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !name.starts_with(DRILL_PREFIX) || !is_dir {
            continue;
        }
        let Ok(file) = File::open(path.join(".lock")) else {
            continue;
        };
        // A live drill holds its lock: leave it alone.
        let Ok(held) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        stop_postmaster(&path.join("data"));
        match std::fs::remove_dir_all(&path) {
            Ok(()) => say(&format!(
                "removed what an earlier drill left: {}",
                path.display()
            )),
            Err(e) => say(&format!("could not remove {}: {e}", path.display())),
        }
        drop(held);
    }
}

/// Stop the postmaster `data/postmaster.pid` names, if it still runs that data directory.
fn stop_postmaster(data: &Path) {
    let Ok(pidfile) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let mut lines = pidfile.lines();
    let (Some(pid), Some(dir)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    // The pid may have been reused: only a process whose data directory is this one.
    let ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        cmd.split('\0')
            .any(|a| Path::new(a) == Path::new(dir.trim()))
    });
    if !ours {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    // SIGQUIT: immediate shutdown (nothing in the copy is worth a checkpoint).
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
    for _ in 0..100 {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Removes a drill's directory (its postmaster stopped first) when dropped, and on SIGTERM
/// or SIGINT (a timeout or a cancel), which would otherwise end the drill before it could: the
/// signals are blocked in the drill (children start with an empty mask) and a thread waits
/// for them.
struct Cleanup {
    dir: PathBuf,
}

impl Cleanup {
    fn new(dir: PathBuf) -> Cleanup {
        use nix::sys::signal::{SigSet, Signal};
        let mut stops = SigSet::empty();
        stops.add(Signal::SIGTERM);
        stops.add(Signal::SIGINT);
        if stops.thread_block().is_ok() {
            let watched = dir.clone();
            std::thread::spawn(move || {
                if stops.wait().is_ok() {
                    say("stopped (timeout or cancel): removing the restored copy");
                    stop_postmaster(&watched.join("data"));
                    let _ = std::fs::remove_dir_all(&watched);
                    std::process::exit(143);
                }
            });
        }
        Cleanup { dir }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        stop_postmaster(&self.dir.join("data"));
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => say(&format!("removed {}", self.dir.display())),
            Err(e) => say(&format!("could not remove {}: {e}", self.dir.display())),
        }
    }
}

fn restore_and_check(drill: &Drill, dir: &Path, label: &str, size: u64) -> Result<(), String> {
    let data = dir.join("data");
    let started = now_ms();
    say(&format!(
        "restoring {label} ({size} bytes) into {}",
        data.display()
    ));
    let mut cmd = Command::new(&drill.pgbackrest);
    if let Some(c) = &drill.config {
        cmd.arg(format!("--config={}", c.display()));
    }
    cmd.args([
        format!("--stanza={}", drill.stanza),
        format!("--pg1-path={}", data.display()),
        format!("--set={label}"),
        "--type=immediate".into(),
        "--archive-mode=off".into(),
        "--log-level-console=warn".into(),
        "--log-level-file=off".into(),
        "restore".into(),
    ]);
    let status = cmd
        .status()
        .map_err(|e| format!("run pgbackrest restore: {e}"))?;
    if !status.success() {
        return Err(format!("pgbackrest restore of {label} failed ({status})"));
    }
    let restored = now_ms();
    let mut server = start_postmaster(drill, dir, &data)?;
    let ready = wait_ready(drill, dir, &mut server);
    let ready = match ready {
        Ok(()) => now_ms(),
        Err(e) => {
            let _ = server.kill();
            let _ = server.wait();
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("{e}; the server's log ends:\n{}", tail.join("\n")));
        }
    };
    let answer = psql(drill, dir, &drill.check);
    let checked = now_ms();
    stop_postmaster(&data);
    let _ = server.wait();
    let answer = answer?;
    let report = serde_json::json!({
        "stanza": drill.stanza,
        "set": label,
        "size": size,
        "restore_s": (restored - started) as f64 / 1000.0,
        "start_s": (ready - restored) as f64 / 1000.0,
        "check_s": (checked - ready) as f64 / 1000.0,
        "rto_s": (checked - started) as f64 / 1000.0,
        "check": drill.check,
        "answer": answer.chars().take(200).collect::<String>(),
    });
    say(&report.to_string());
    Ok(())
}

fn start_postmaster(drill: &Drill, dir: &Path, data: &Path) -> Result<Child, String> {
    // Debian keeps the server's config outside the data directory: the copy gets its own,
    // trusting only local connections, in a directory only the run user can enter.
    for (file, text) in [
        ("postgresql.conf", ""),
        ("pg_hba.conf", "local all all trust\n"),
        ("pg_ident.conf", ""),
    ] {
        let path = data.join(file);
        if !path.exists() {
            std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        }
    }
    let mut settings = at_least_the_primarys(drill, data);
    let log = File::create(dir.join("postgres.log")).map_err(|e| format!("log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("log: {e}"))?;
    settings.extend([
        "listen_addresses=".to_string(),
        format!("unix_socket_directories={}", dir.display()),
        "port=5432".into(),
        "archive_mode=off".into(),
        "archive_command=".into(),
        "hot_standby=on".into(),
        "primary_conninfo=".into(),
        "primary_slot_name=".into(),
        "wal_level=replica".into(),
        format!("hba_file={}", data.join("pg_hba.conf").display()),
        format!("ident_file={}", data.join("pg_ident.conf").display()),
        "shared_preload_libraries=".into(),
        "logging_collector=off".into(),
    ]);
    let postgres = bin(drill, "postgres");
    let mut cmd = Command::new(&postgres);
    cmd.arg("-D").arg(data);
    for s in &settings {
        cmd.arg("-c").arg(s);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|e| format!("start {}: {e}", postgres.display()))
}

/// The settings a hot standby needs at least as high as the server the backup came from
/// (recovery stops otherwise), read from the copy's control file with `pg_controldata`.
fn at_least_the_primarys(drill: &Drill, data: &Path) -> Vec<String> {
    let Ok(out) = Command::new(bin(drill, "pg_controldata"))
        .arg(data)
        .output()
    else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    [
        ("max_connections setting:", "max_connections"),
        ("max_worker_processes setting:", "max_worker_processes"),
        ("max_wal_senders setting:", "max_wal_senders"),
        ("max_prepared_xacts setting:", "max_prepared_transactions"),
        ("max_locks_per_xact setting:", "max_locks_per_transaction"),
    ]
    .iter()
    .filter_map(|(label, name)| {
        let value = text.lines().find_map(|l| l.strip_prefix(label))?.trim();
        value.parse::<u32>().ok().map(|v| format!("{name}={v}"))
    })
    .collect()
}

/// A server program of the drill's PostgreSQL.
fn bin(drill: &Drill, program: &str) -> PathBuf {
    drill
        .pg_bin
        .as_deref()
        .unwrap_or(Path::new("/usr/lib/postgresql/bin"))
        .join(program)
}

/// Wait until the restored server answers and its recovery reached the target (replay
/// paused there, or already over).
fn wait_ready(drill: &Drill, dir: &Path, server: &mut Child) -> Result<(), String> {
    let deadline = now_ms() + READY_TIMEOUT.as_millis() as i64;
    let sql = "SELECT CASE WHEN NOT pg_is_in_recovery() THEN 'done' ELSE pg_get_wal_replay_pause_state() END";
    loop {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!("the restored server stopped ({status})"));
        }
        if let Ok(state) = psql(drill, dir, sql)
            && (state == "paused" || state == "done")
        {
            return Ok(());
        }
        if now_ms() > deadline {
            return Err(format!(
                "the restored server did not reach its recovery target within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One query through the drill's socket; its single value.
fn psql(drill: &Drill, dir: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new(bin(drill, "psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(dir)
        .args(["-p", "5432", "-d", "postgres", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "check {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_listed_real_and_absolute() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("drills");
        std::fs::create_dir(&real).expect("mkdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let real_s = real.display().to_string();
        let allowed = vec![real.clone()];
        assert_eq!(check_scratch(&real_s, &allowed).expect("listed"), real);
        assert!(
            check_scratch(&real_s, &[])
                .expect_err("off")
                .contains("restore_scratch_dirs")
        );
        assert!(
            check_scratch("drills", &allowed)
                .expect_err("relative")
                .contains("absolute")
        );
        let linked = check_scratch(&link.display().to_string(), std::slice::from_ref(&link))
            .expect_err("a link");
        assert!(linked.contains("symbolic link"), "{linked}");
        let other =
            check_scratch(&outside.display().to_string(), &allowed).expect_err("not listed");
        assert!(other.contains("not one of"), "{other}");
    }
}
