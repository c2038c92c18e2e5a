//! What this host lets be run, set in the agent's config and enforced by the agent: the control
//! plane (and whoever holds it) can only ask. `[tasks] remote_kinds` lists the kinds the control
//! plane may create; `[tasks] dump_dirs` the directories `pg_dump` may write under.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use super::model::{KINDS, Kind};

#[derive(Clone, Debug)]
pub struct TaskPolicy {
    /// Kinds the control plane may create. Local callers on the task socket (root or the
    /// agent's user) may create every kind.
    pub remote_kinds: BTreeSet<Kind>,
    /// Directories `pg_dump` may write under (symbolic links resolved when checked); none
    /// turns `pg_dump` off.
    pub dump_dirs: Vec<PathBuf>,
    /// `[backups]`: the pgBackRest kinds and the stanzas they may name (off when `None`).
    pub backups: Option<super::backup::BackupGrant>,
}

impl Default for TaskPolicy {
    /// Every kind from the control plane, no dump directory.
    fn default() -> TaskPolicy {
        TaskPolicy {
            remote_kinds: KINDS.into_iter().collect(),
            dump_dirs: Vec::new(),
            backups: None,
        }
    }
}

impl TaskPolicy {
    /// Whether the control plane may create a `kind` task here, with the reason if not.
    pub fn allow_remote(&self, kind: Kind) -> Result<(), String> {
        if self.remote_kinds.contains(&kind) {
            return Ok(());
        }
        let allowed: Vec<&str> = self.remote_kinds.iter().map(|k| k.name()).collect();
        Err(format!(
            "this host's agent does not let the control plane create {} tasks ([tasks] remote_kinds allows: {})",
            kind.name(),
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        ))
    }

    /// `path` if `pg_dump` may write it: absolute, no `..`, not a symbolic link, in a
    /// directory that (with links resolved) lies under one of [`TaskPolicy::dump_dirs`].
    pub fn check_dump_path(&self, path: &str) -> Result<PathBuf, String> {
        let given = Path::new(path);
        if !given.is_absolute() {
            return Err(format!("pg_dump path {path:?} must be absolute"));
        }
        if given.components().any(|c| c == Component::ParentDir) {
            return Err(format!("pg_dump path {path:?} must not contain .."));
        }
        if self.dump_dirs.is_empty() {
            return Err(
                "pg_dump is off on this host: list the directories dumps may be written to in the agent's config ([tasks] dump_dirs)"
                    .into(),
            );
        }
        let (Some(parent), Some(name)) = (given.parent(), given.file_name()) else {
            return Err(format!("pg_dump path {path:?} names no file"));
        };
        let parent = std::fs::canonicalize(parent)
            .map_err(|e| format!("pg_dump path {path:?}: its directory: {e}"))?;
        let resolved = parent.join(name);
        if std::fs::symlink_metadata(&resolved).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "pg_dump path {path:?} is a symbolic link; dumps are not written through links"
            ));
        }
        let under = self
            .dump_dirs
            .iter()
            .any(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| parent.starts_with(&dir)));
        if !under {
            let dirs: Vec<String> = self
                .dump_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(format!(
                "pg_dump path {path:?} is not under [tasks] dump_dirs ({})",
                dirs.join(", ")
            ));
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_kinds_refuse_the_rest_with_the_list() {
        let policy = TaskPolicy {
            remote_kinds: [Kind::Vacuum, Kind::Analyze].into_iter().collect(),
            ..TaskPolicy::default()
        };
        assert!(policy.allow_remote(Kind::Vacuum).is_ok());
        let refused = policy.allow_remote(Kind::Command).expect_err("refused");
        assert!(refused.contains("command"), "{refused}");
        assert!(refused.contains("vacuum, analyze"), "{refused}");
    }

    #[test]
    fn dump_paths_stay_under_the_configured_directories() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dumps = tmp.path().join("dumps");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(dumps.join("nightly")).expect("mkdir");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        let off = TaskPolicy::default();
        let p = |p: &Path| p.display().to_string();
        assert!(
            off.check_dump_path(&p(&dumps.join("a.sql")))
                .expect_err("off")
                .contains("dump_dirs")
        );
        let policy = TaskPolicy {
            dump_dirs: vec![dumps.clone()],
            ..TaskPolicy::default()
        };
        assert!(policy.check_dump_path(&p(&dumps.join("a.sql"))).is_ok());
        assert!(
            policy
                .check_dump_path(&p(&dumps.join("nightly/b.sql")))
                .is_ok()
        );
        for refused in [
            p(&elsewhere.join("a.sql")),
            format!("{}/../elsewhere/a.sql", p(&dumps)),
            "relative.sql".to_string(),
            "/etc/cron.d/x".to_string(),
            p(&dumps.join("missing/a.sql")),
        ] {
            assert!(policy.check_dump_path(&refused).is_err(), "{refused}");
        }
        // A link inside the directory does not lead out of it.
        std::os::unix::fs::symlink(&elsewhere, dumps.join("out")).expect("symlink");
        assert!(
            policy
                .check_dump_path(&p(&dumps.join("out/a.sql")))
                .is_err()
        );
        std::os::unix::fs::symlink(elsewhere.join("t"), dumps.join("t.sql")).expect("symlink");
        assert!(policy.check_dump_path(&p(&dumps.join("t.sql"))).is_err());
    }
}
