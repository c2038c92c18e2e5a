//! What the agent's two SQLite files (the metrics buffer and the task store) do alike when
//! one is damaged: check it without changing it, and move it aside for the operator.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

/// Open an existing file read-only and run `PRAGMA quick_check`: the connection when it
/// passes, else the reason.
pub fn checked(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if verdict == "ok" {
        Ok(conn)
    } else {
        Err(verdict)
    }
}

/// Move `path` (and its WAL and shm files) aside as `<path>.corrupt-<now_ms>`, keeping at
/// most `keep` quarantined files.
pub fn quarantine(path: &Path, now_ms: i64, keep: usize) -> std::io::Result<PathBuf> {
    let moved_to = PathBuf::from(format!("{}.corrupt-{now_ms}", path.display()));
    std::fs::rename(path, &moved_to)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", moved_to.display()));
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.corrupt-",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("buffer.db")
    );
    let mut kept: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && !n.ends_with("-wal") && !n.ends_with("-shm")
            })
        })
        .collect();
    // Names end in the time: lexical order is age order for equal-length timestamps.
    kept.sort();
    while kept.len() > keep {
        let old = kept.remove(0);
        let _ = std::fs::remove_file(&old);
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", old.display()));
        }
    }
    Ok(moved_to)
}
