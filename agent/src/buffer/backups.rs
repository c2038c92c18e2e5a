//! Backup status: every `[backups] info_interval` (and after each `pgbackrest_backup` run)
//! `pgbackrest info --output=json` runs with the task user's rights, and what it says about
//! the granted stanzas is appended to the buffer as one `backup_info` row, delivered like
//! every other statistic. A failed `info` is a row too (`{"error": …}`): a host whose status
//! cannot be read is something to see, not a gap.
//!
//! The row is bounded whatever the repository holds: per stanza its status, WAL archive range
//! and the newest [`BACKUPS_KEPT`] backups with the fields the control plane ranks on; and,
//! from the task store, how the stanza's newest check, verify and restore drill ended (the
//! drill with its measured RTO).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use world::World;

use super::SharedBuffer;
use crate::config::BackupsConfig;
use crate::run_as::RunAs;

/// Backups kept per stanza in a row, newest first.
pub const BACKUPS_KEPT: usize = 30;
/// `pgbackrest info` gets this long.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of `info` output read; a repository listing more is cut and reported.
const INFO_BYTES_MAX: u64 = 16 << 20;
/// The metric kind.
pub const KIND: &str = "backup_info";

/// Collect until `shutdown`: at start, every `interval`, and when `backup_ended` fires.
pub async fn run(
    world: World,
    config: BackupsConfig,
    run_as: RunAs,
    buffer: SharedBuffer,
    backup_ended: Arc<tokio::sync::Notify>,
    tasks: crate::tasks::driver::Reader,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.info_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            _ = backup_ended.notified() => {}
        }
        let row = match info(&config, &run_as).await {
            Ok(mut stanzas) => {
                add_last_runs(&mut stanzas, &tasks).await;
                json!({ "tool": "pgbackrest", "stanzas": stanzas })
            }
            Err(error) => {
                tracing::warn!(%error, "pgbackrest info failed; the failure is reported as the backup status");
                json!({ "tool": "pgbackrest", "error": error })
            }
        };
        let rows = vec![(KIND.to_string(), row.to_string())];
        let ts_ms = world.now_unix_ms();
        if let Err(error) = buffer.with(&world, move |b| b.append(ts_ms, &rows)).await {
            tracing::error!(%error, "append the backup status to the metrics buffer");
        }
    }
}

/// The kinds whose newest run each stanza reports.
const REPORTED_KINDS: [&str; 3] = ["pgbackrest_check", "pgbackrest_verify", "restore_drill"];

/// Each stanza's newest check, verify and drill run (`last_runs`), from the task store.
async fn add_last_runs(stanzas: &mut Value, tasks: &crate::tasks::driver::Reader) {
    let runs = match tasks
        .with(|store| store.newest_runs_by_stanza(&REPORTED_KINDS))
        .await
    {
        Ok(runs) => runs,
        Err(error) => {
            tracing::warn!(%error, "read the backup kinds' last runs");
            return;
        }
    };
    for stanza in stanzas.as_array_mut().into_iter().flatten() {
        let name = stanza["name"].as_str().unwrap_or_default().to_string();
        let mut last = serde_json::Map::new();
        for (kind, of, status, finished_ms, error, output) in &runs {
            if *of != name {
                continue;
            }
            let mut run = json!({
                "status": crate::tasks::model::status::name(*status),
                "at_ms": finished_ms,
                "error": error,
            });
            if let Some(report) = drill_report(output) {
                run["rto_s"] = report["rto_s"].clone();
                run["set"] = report["set"].clone();
            }
            last.insert(kind.clone(), run);
        }
        stanza["last_runs"] = Value::Object(last);
    }
}

/// A drill's `drill: {…}` report line, from the end of its output.
fn drill_report(output: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(output)
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("drill: "))
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
}

/// `pgbackrest info` for the granted stanzas, trimmed.
async fn info(config: &BackupsConfig, run_as: &RunAs) -> Result<Value, String> {
    let grant = &config.grant;
    let mut argv = vec![grant.pgbackrest.display().to_string()];
    if let Some(path) = &grant.config {
        argv.push(format!("--config={}", path.display()));
    }
    // No log file: `info` runs often and has nothing to keep.
    argv.extend([
        "--log-level-file=off".into(),
        "--output=json".into(),
        "info".into(),
    ]);
    let launch = crate::tasks::command::as_user(run_as, argv)?;
    let (program, args) = launch.argv.split_first().ok_or("empty command")?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if launch.env.clear {
        command.env_clear();
    }
    command.envs(launch.env.vars.iter().map(|(k, v)| (k, v)));
    let mut child = command
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))?;
    let (mut stdout, mut stderr) = (
        child.stdout.take().ok_or("no stdout")?.take(INFO_BYTES_MAX),
        child.stderr.take().ok_or("no stderr")?.take(64 << 10),
    );
    let read = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e).map_err(|e| format!("read pgbackrest info: {e}"))?;
        let status = child.wait().await.map_err(|e| format!("wait: {e}"))?;
        Ok::<_, String>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(INFO_TIMEOUT, read)
        .await
        .map_err(|_| {
            format!(
                "pgbackrest info took longer than {} s",
                INFO_TIMEOUT.as_secs()
            )
        })??;
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        return Err(format!(
            "pgbackrest info exited with {status}: {}",
            said.trim().chars().take(2000).collect::<String>()
        ));
    }
    let all: Value = serde_json::from_slice(&out)
        .map_err(|e| format!("pgbackrest info printed no JSON ({} bytes): {e}", out.len()))?;
    Ok(trim(&all, &grant.stanzas))
}

/// What is kept of `info`'s output: the granted stanzas, each with its newest backups.
pub fn trim(all: &Value, granted: &[String]) -> Value {
    let stanzas = all.as_array().map(Vec::as_slice).unwrap_or_default();
    let kept: Vec<Value> = granted
        .iter()
        .map(|name| {
            match stanzas
                .iter()
                .find(|s| s["name"].as_str() == Some(name.as_str()))
            {
                Some(stanza) => trim_stanza(stanza),
                None => json!({ "name": name, "status": { "code": 1, "message": "missing stanza (not in pgbackrest info)" } }),
            }
        })
        .collect();
    Value::Array(kept)
}

fn trim_stanza(stanza: &Value) -> Value {
    let backups = stanza["backup"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let newest: Vec<Value> = backups
        .iter()
        .rev()
        .take(BACKUPS_KEPT)
        .map(|b| {
            json!({
                "label": b["label"],
                "type": b["type"],
                "start": b["timestamp"]["start"],
                "stop": b["timestamp"]["stop"],
                "size": b["info"]["size"],
                "delta": b["info"]["delta"],
                "repo_size": b["info"]["repository"]["size"],
                "repo_delta": b["info"]["repository"]["delta"],
                "wal_start": b["archive"]["start"],
                "wal_stop": b["archive"]["stop"],
                "error": b["error"],
                "repo": b["database"]["repo-key"],
            })
        })
        .collect();
    let archive: Vec<Value> = stanza["archive"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| json!({ "id": a["id"], "min": a["min"], "max": a["max"] }))
        .collect();
    json!({
        "name": stanza["name"],
        "status": {
            "code": stanza["status"]["code"],
            "message": stanza["status"]["message"],
            "backup_running": stanza["status"]["lock"]["backup"]["held"],
        },
        "archive": archive,
        "backups": newest,
        "backups_total": backups.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_stanzas_and_the_newest_backups_are_kept() {
        let backups: Vec<Value> = (0..40)
            .map(|i| {
                json!({
                    "label": format!("b{i}"), "type": "incr",
                    "timestamp": {"start": i, "stop": i + 1},
                    "info": {"size": 10, "delta": 1, "repository": {"size": 5, "delta": 1}},
                    "archive": {"start": "000000010000000000000001", "stop": "000000010000000000000002"},
                    "error": false, "database": {"id": 1, "repo-key": 1},
                    "link": null, "lsn": {}, "prior": null, "reference": null,
                })
            })
            .collect();
        let all = json!([
            {"name": "main", "backup": backups, "archive": [{"id": "15-1", "min": "a", "max": "b", "database": {}}],
             "status": {"code": 0, "message": "ok", "lock": {"backup": {"held": false}}}, "db": [], "cipher": "none", "repo": []},
            {"name": "not-granted", "backup": [], "archive": [], "status": {"code": 0}}
        ]);
        let kept = trim(&all, &["main".into(), "gone".into()]);
        let kept = kept.as_array().expect("array");
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0]["backups_total"], 40);
        let labels: Vec<&str> = kept[0]["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["label"].as_str().expect("label"))
            .collect();
        assert_eq!(labels.len(), BACKUPS_KEPT);
        assert_eq!(labels[0], "b39", "newest first");
        assert_eq!(kept[0]["status"]["backup_running"], false);
        assert_eq!(kept[1]["name"], "gone");
        assert_eq!(kept[1]["status"]["code"], 1);
    }
}
