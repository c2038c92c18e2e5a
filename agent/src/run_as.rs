//! Whose rights task commands and psql get (`[tasks] run_as`, `[terminal] run_as`), resolved
//! against the user the agent runs as, and the `setpriv` words that switch to them. A leaf:
//! the config, the task pool, the terminal and `doctor` all use it.

use std::path::PathBuf;

use anyhow::bail;

/// Whose rights task commands and psql get. An agent running as root never gives them root's
/// unless the config says so (`run_as = "root"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// The agent's own user.
    Agent,
    /// Another user, switched to with `setpriv` (the agent runs as root, or holds
    /// CAP_SETUID and CAP_SETGID as the packaged unit gives it).
    User {
        name: String,
        uid: u32,
        gid: u32,
        home: PathBuf,
        shell: PathBuf,
    },
    /// The agent can switch users (root, or CAP_SETUID) and no `run_as` is configured:
    /// refused, so nothing inherits those rights by default.
    RefuseRoot,
}

impl RunAs {
    /// The uid to signal this user's processes as, when it is another user.
    pub fn other_uid(&self) -> Option<u32> {
        match self {
            RunAs::User { uid, .. } => Some(*uid),
            _ => None,
        }
    }

    /// The `setpriv` words that switch a command to this user, with `options` (e.g.
    /// `--reset-env`) before the `--`; none unless it is another user. The command keeps no
    /// capability: the inheritable and ambient sets are emptied, so a non-root agent's
    /// CAP_SETUID does not reach it.
    pub fn setpriv(&self, options: &[&str]) -> Vec<String> {
        let RunAs::User { uid, gid, .. } = self else {
            return Vec::new();
        };
        let mut words = vec![
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--init-groups".to_string(),
            "--inh-caps=-all".to_string(),
            "--ambient-caps=-all".to_string(),
        ];
        words.extend(options.iter().map(|o| o.to_string()));
        words.push("--".to_string());
        words
    }
}

/// Whether this process holds CAP_SETUID and CAP_SETGID in its effective set (bits 7 and 6
/// of `CapEff` in /proc/self/status).
pub fn can_switch_users() -> bool {
    const SETGID_SETUID: u64 = (1 << 6) | (1 << 7);
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & SETGID_SETUID == SETGID_SETUID)
}

/// `[SECTION] run_as`, resolved against the user the agent runs as.
pub fn resolve(section: &str, run_as: Option<&str>) -> anyhow::Result<RunAs> {
    use nix::unistd::{User, geteuid};
    let root = geteuid().is_root();
    // Root, or the packaged unit's CAP_SETUID and CAP_SETGID: commands could switch users.
    let switches = root || can_switch_users();
    match run_as {
        None if switches => Ok(RunAs::RefuseRoot),
        None => Ok(RunAs::Agent),
        Some(name) if name.is_empty() || name.starts_with('-') => {
            bail!("{section}.run_as: {name:?} is not a user name")
        }
        Some("root") if root => Ok(RunAs::Agent),
        Some("root") if switches => {
            bail!("{section}.run_as = \"root\" needs the agent to run as root")
        }
        // Even its own name goes through setpriv, which drops the capabilities.
        Some(name) if switches => match User::from_name(name) {
            Ok(Some(user)) => Ok(RunAs::User {
                name: name.to_string(),
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                home: user.dir,
                shell: user.shell,
            }),
            Ok(None) => bail!("{section}.run_as: no such user {name:?}"),
            Err(e) => bail!("{section}.run_as: look up {name:?}: {e}"),
        },
        Some(name) => {
            let me = User::from_uid(geteuid()).ok().flatten().map(|u| u.name);
            if me.as_deref() == Some(name) {
                Ok(RunAs::Agent)
            } else {
                bail!(
                    "{section}.run_as = {name:?} needs the agent to run as root (it runs as {:?})",
                    me.unwrap_or_default()
                )
            }
        }
    }
}
