//! What the suite reads from `/proc`: the control-plane replicas' descriptors, threads and
//! memory over the run (a growth is a leak), and task processes that outlived every agent.

use std::collections::BTreeMap;
use std::path::Path;

use crate::verdict::Verdict;

/// Pids of processes whose command line names the marker folder (task runs).
pub fn marker_processes(markers: &Path) -> Vec<i32> {
    let needle = markers.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// How long a replica process must have lived for its resources to be compared (ms).
pub const LIFE_COMPARED_MS: u64 = 90_000;

/// Resource samples per (replica, pid): (ms since start, figures).
pub type Series = BTreeMap<(usize, i32), Vec<(u64, Proc)>>;

/// A process's open files, threads and resident memory.
#[derive(Clone, Copy, Debug)]
pub struct Proc {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

pub fn proc_figures(pid: i32) -> Option<Proc> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Proc {
        fds,
        threads: field("Threads:")? as usize,
        rss_kib: field("VmRSS:")?,
    })
}

/// No growth of file descriptors, threads or memory in a replica: each replica process that
/// lived long enough is compared between a window after its warm-up and its last window.
pub fn resource_verdict(series: &Series) -> (Vec<String>, Verdict) {
    let mut lines = Vec::new();
    let mut invalid = Vec::new();
    let mut judged = 0;
    for ((replica, pid), points) in series {
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            continue;
        };
        let life = last.0 - first.0;
        let avg = |from: u64, to: u64| {
            let w: Vec<&Proc> = points
                .iter()
                .filter(|(t, _)| *t >= from && *t <= to)
                .map(|(_, p)| p)
                .collect();
            if w.is_empty() {
                return None;
            }
            let n = w.len() as f64;
            Some((
                w.iter().map(|p| p.fds as f64).sum::<f64>() / n,
                w.iter().map(|p| p.threads as f64).sum::<f64>() / n,
                w.iter().map(|p| p.rss_kib as f64).sum::<f64>() / n,
            ))
        };
        if life < LIFE_COMPARED_MS {
            continue;
        }
        let (Some(early), Some(late)) = (
            avg(first.0 + 30_000, first.0 + 50_000),
            avg(last.0 - 20_000, last.0),
        ) else {
            continue;
        };
        judged += 1;
        lines.push(format!(
            "replica {} (pid {pid}, {} s): fds {:.0} → {:.0}, threads {:.0} → {:.0}, RSS {:.1} → {:.1} MiB",
            replica + 1,
            life / 1000,
            early.0,
            late.0,
            early.1,
            late.1,
            early.2 / 1024.0,
            late.2 / 1024.0
        ));
        if late.0 > early.0 * 1.25 + 16.0 {
            invalid.push(format!(
                "replica {} file descriptors grew {:.0} → {:.0}",
                replica + 1,
                early.0,
                late.0
            ));
        }
        if late.1 > early.1 + 8.0 {
            invalid.push(format!(
                "replica {} threads grew {:.0} → {:.0}",
                replica + 1,
                early.1,
                late.1
            ));
        }
        if late.2 > early.2 * 1.5 + 65_536.0 {
            invalid.push(format!(
                "replica {} RSS grew {:.1} → {:.1} MiB",
                replica + 1,
                early.2 / 1024.0,
                late.2 / 1024.0
            ));
        }
    }
    let unknown = if judged == 0 {
        vec!["no replica process lived 90 s: nothing to compare".to_string()]
    } else {
        Vec::new()
    };
    (
        lines,
        Verdict::new(
            "resources: no growth of fds, threads or memory in the control plane",
            format!("{judged} replica processes compared after warm-up against their last 20 s"),
            invalid,
            unknown,
        ),
    )
}
