//! The host inventory (TOML: `[defaults]` and `[[hosts]]`, see the README) and `--hosts` selection.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest inventory file read.
pub const INVENTORY_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Most hosts one inventory may list.
pub const HOSTS_MAX: usize = 10_000;

/// One host to run on, with everything needed to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub groups: Vec<String>,
}

impl Host {
    /// `address:port` for a TCP connect (IPv6 literals in brackets).
    pub fn socket_addr(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("read inventory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory {path} is larger than {INVENTORY_BYTES_MAX} bytes")]
    TooLarge { path: PathBuf },
    #[error("inventory {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("inventory {path}: host {host}: {message}")]
    Host {
        path: PathBuf,
        host: String,
        message: String,
    },
    #[error("--hosts {pattern:?} selects no host (groups: {groups})")]
    NothingSelected { pattern: String, groups: String },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    user: Option<String>,
    port: Option<u16>,
    identity_file: Option<String>,
    known_hosts: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    address: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    identity_file: Option<String>,
    known_hosts: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    hosts: Vec<RawHost>,
}

/// A validated inventory: names unique, every host reachable in principle.
#[derive(Clone, Debug)]
pub struct Inventory {
    pub hosts: Vec<Host>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `~/x` to `$HOME/x`; a relative path is taken from the inventory's folder.
fn resolve_path(raw: &str, base: &Path, home: Option<&Path>) -> Result<PathBuf, String> {
    let path = if let Some(rest) = raw.strip_prefix("~/") {
        home.ok_or("`~` needs HOME to be set")?.join(rest)
    } else {
        PathBuf::from(raw)
    };
    Ok(if path.is_relative() {
        base.join(path)
    } else {
        path
    })
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let read = |source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > INVENTORY_BYTES_MAX {
            return Err(InventoryError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let base = path.parent().unwrap_or(Path::new("."));
        Inventory::parse(&text, path, base, home.as_deref())
    }

    /// Parse inventory text; `path` names it in errors, `base` resolves relative paths.
    pub fn parse(
        text: &str,
        path: &Path,
        base: &Path,
        home: Option<&Path>,
    ) -> Result<Inventory, InventoryError> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if raw.hosts.is_empty() {
            return Err(InventoryError::Parse {
                path: path.to_path_buf(),
                message: "no [[hosts]] entries".into(),
            });
        }
        if raw.hosts.len() > HOSTS_MAX {
            return Err(InventoryError::Parse {
                path: path.to_path_buf(),
                message: format!("{} hosts; at most {HOSTS_MAX}", raw.hosts.len()),
            });
        }
        let d = raw.defaults;
        let mut seen = BTreeSet::new();
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        for h in raw.hosts {
            let fail = |message: String| InventoryError::Host {
                path: path.to_path_buf(),
                host: h.name.clone(),
                message,
            };
            if !valid_name(&h.name) {
                return Err(fail(
                    "name must be 1-253 characters of A-Z a-z 0-9 - _ .".into(),
                ));
            }
            if !seen.insert(h.name.clone()) {
                return Err(fail("listed twice".into()));
            }
            for g in &h.groups {
                if !valid_name(g) {
                    return Err(fail(format!(
                        "group {g:?} must be 1-253 characters of A-Z a-z 0-9 - _ ."
                    )));
                }
            }
            let address = h.address.clone().unwrap_or_else(|| h.name.clone());
            if address.is_empty() || address.chars().any(|c| c.is_whitespace() || c == '/') {
                return Err(fail(format!(
                    "address {address:?} is not a host name or IP"
                )));
            }
            let port = h.port.or(d.port).unwrap_or(22);
            if port == 0 {
                return Err(fail("port 0 is not a port".into()));
            }
            let user = h
                .user
                .clone()
                .or_else(|| d.user.clone())
                .ok_or_else(|| fail("no user: set `user` here or in [defaults]".into()))?;
            let identity = h
                .identity_file
                .as_deref()
                .or(d.identity_file.as_deref())
                .ok_or_else(|| fail("no identity_file: set it here or in [defaults]".into()))?;
            let identity_file = resolve_path(identity, base, home).map_err(&fail)?;
            let known = h
                .known_hosts
                .as_deref()
                .or(d.known_hosts.as_deref())
                .unwrap_or("~/.ssh/known_hosts");
            let known_hosts = resolve_path(known, base, home).map_err(&fail)?;
            hosts.push(Host {
                name: h.name,
                address,
                port,
                user,
                identity_file,
                known_hosts,
                groups: h.groups,
            });
        }
        Ok(Inventory { hosts })
    }

    /// Hosts matching `pattern`, in inventory order. The pattern is a comma-separated list of
    /// terms: a host name glob (`*` and `?`), `@group`, or a bare group name; a term starting
    /// with `!` removes what it matches. Only exclusions means "all hosts except".
    pub fn select(&self, pattern: &str) -> Result<Vec<Host>, InventoryError> {
        let terms: Vec<&str> = pattern
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let includes: Vec<&str> = terms
            .iter()
            .copied()
            .filter(|t| !t.starts_with('!'))
            .collect();
        let excludes: Vec<&str> = terms.iter().filter_map(|t| t.strip_prefix('!')).collect();
        let matches = |host: &Host, term: &str| match term.strip_prefix('@') {
            Some(group) => host.groups.iter().any(|g| g == group),
            None => glob(term, &host.name) || host.groups.iter().any(|g| g == term),
        };
        let selected: Vec<Host> = self
            .hosts
            .iter()
            .filter(|h| includes.is_empty() || includes.iter().any(|t| matches(h, t)))
            .filter(|h| !excludes.iter().any(|t| matches(h, t)))
            .cloned()
            .collect();
        if selected.is_empty() {
            let groups: BTreeSet<&str> = self
                .hosts
                .iter()
                .flat_map(|h| h.groups.iter().map(String::as_str))
                .collect();
            return Err(InventoryError::NothingSelected {
                pattern: pattern.to_string(),
                groups: if groups.is_empty() {
                    "none".into()
                } else {
                    groups.into_iter().collect::<Vec<_>>().join(", ")
                },
            });
        }
        Ok(selected)
    }
}

/// Match `text` against a glob with `*` (any run) and `?` (one character).
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::{Inventory, InventoryError, glob};
    use std::path::Path;

    const TEXT: &str = r#"
[defaults]
user = "postgres"
identity_file = "~/.ssh/id_ed25519"

[[hosts]]
name = "db1"
address = "10.0.0.5"
groups = ["primary", "eu"]

[[hosts]]
name = "db2"
port = 2222
groups = ["replica", "eu"]
known_hosts = "kh"

[[hosts]]
name = "web1"
address = "fd00::1"
user = "ops"
identity_file = "/keys/ops"
"#;

    fn inventory() -> Inventory {
        Inventory::parse(
            TEXT,
            Path::new("/etc/outpost/inv.toml"),
            Path::new("/etc/outpost"),
            Some(Path::new("/home/me")),
        )
        .expect("valid inventory")
    }

    fn names(pattern: &str) -> Vec<String> {
        inventory()
            .select(pattern)
            .expect("selects something")
            .into_iter()
            .map(|h| h.name)
            .collect()
    }

    #[test]
    fn defaults_fill_in_and_paths_resolve() {
        let inv = inventory();
        let db1 = &inv.hosts[0];
        assert_eq!(db1.socket_addr(), "10.0.0.5:22");
        assert_eq!(db1.user, "postgres");
        assert_eq!(db1.identity_file, Path::new("/home/me/.ssh/id_ed25519"));
        assert_eq!(db1.known_hosts, Path::new("/home/me/.ssh/known_hosts"));
        let db2 = &inv.hosts[1];
        assert_eq!(db2.socket_addr(), "db2:2222");
        assert_eq!(db2.known_hosts, Path::new("/etc/outpost/kh"));
        let web1 = &inv.hosts[2];
        assert_eq!(web1.socket_addr(), "[fd00::1]:22");
        assert_eq!(web1.user, "ops");
    }

    #[test]
    fn selection_by_glob_group_and_exclusion() {
        assert_eq!(names("*"), ["db1", "db2", "web1"]);
        assert_eq!(names("db*"), ["db1", "db2"]);
        assert_eq!(names("@eu,!db2"), ["db1"]);
        assert_eq!(names("replica"), ["db2"]);
        assert_eq!(names("!eu"), ["web1"]);
        assert_eq!(names("web?,db1"), ["db1", "web1"]);
        let err = inventory().select("nope*").expect_err("nothing matches");
        assert!(
            matches!(err, InventoryError::NothingSelected { ref groups, .. } if groups == "eu, primary, replica"),
            "{err}"
        );
    }

    #[test]
    fn bad_inventories_name_the_host_and_field() {
        let bad = |text: &str| {
            Inventory::parse(text, Path::new("inv.toml"), Path::new("."), None)
                .expect_err("invalid")
                .to_string()
        };
        assert!(
            bad("[[hosts]]\nname = \"a\"\nidentity_file = \"/k\"\n").contains("host a: no user")
        );
        let twice = bad(
            "[defaults]\nuser = \"u\"\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"\n[[hosts]]\nname = \"a\"\n[[hosts]]\nname = \"a\"\n",
        );
        assert!(twice.contains("listed twice"), "{twice}");
        assert!(
            bad("[defaults]\nuser = \"u\"\nidentity_file = \"/k\"\n[[hosts]]\nname = \"a b\"\n")
                .contains("name must be")
        );
        assert!(bad("[[hosts]]\nname = \"a\"\nbogus = 1\n").contains("unknown field"));
        assert!(bad("").contains("no [[hosts]]"));
        assert!(
            bad("[defaults]\nuser = \"u\"\nidentity_file = \"~/k\"\n[[hosts]]\nname = \"a\"\n")
                .contains("HOME")
        );
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob("*", ""));
        assert!(glob("db*1", "db-eu-1"));
        assert!(!glob("db*1", "db-eu-2"));
        assert!(glob("d?1", "db1"));
        assert!(!glob("d?1", "d1"));
        assert!(glob("*b*", "abc"));
    }
}
