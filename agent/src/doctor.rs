//! `outpost-agent doctor`: checks this host's setup the way the running agent would use it and
//! prints one line per check, with what to do when it fails. Failures are what blocks normal
//! operation (the command then exits non-zero); warnings are what works but is not as intended.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderMap, Method};
use serde::Serialize;
use world::World;

use crate::config::AgentConfig;
use crate::identity;
use crate::run_as::RunAs;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew against the control plane above this is a warning, above `SKEW_FAIL` a failure
/// (time-stamped metrics and task history go wrong).
const SKEW_WARN: Duration = Duration::from_secs(2);
const SKEW_FAIL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it (warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Every check, in order. `config` is the result of loading the configuration (from `file`);
/// when it failed, that is the only check.
pub async fn checks(
    world: &World,
    file: Option<&Path>,
    config: anyhow::Result<AgentConfig>,
) -> Vec<Check> {
    let source = file.map_or(
        "no config file (defaults, flags and OUTPOST_* variables)".into(),
        |f| f.display().to_string(),
    );
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            return vec![fail(
                "config",
                format!("{source}: {e:#}"),
                "fix the file (every key is described in the packaged /etc/outpost/agent.toml and the README)",
            )];
        }
    };
    let mut out = vec![ok("config", format!("{source} is valid"))];
    out.extend(data_dir(&config.data_dir));
    let enrolled = identity::load(&config.data_dir);
    let url = match &enrolled {
        Ok(Some(id)) => {
            out.push(ok(
                "enrollment",
                format!(
                    "agent {} ({}) at {}",
                    id.agent_id, id.name, id.control_plane
                ),
            ));
            config
                .control_plane
                .clone()
                .or_else(|| url::Url::parse(&id.control_plane).ok())
        }
        Ok(None) => {
            out.push(warn(
                "enrollment",
                "not enrolled: tasks run, but nothing reaches a control plane",
                "outpost-agent enroll --control-plane URL --token TOKEN (as the agent's user)",
            ));
            None
        }
        Err(e) => {
            out.push(fail(
                "enrollment",
                e.to_string(),
                "the identity file is unreadable: check its owner (the agent's user) and mode 0600, or enroll again with --force",
            ));
            None
        }
    };
    if let Some(url) = url {
        if let Some(tls) = &config.tls_client {
            world.set_tls_client(tls.clone());
        }
        out.extend(control_plane(world, &url).await);
    }
    out.extend(postgres(world, &config).await);
    out.extend(policy(&config));
    out.extend(credential(&config));
    out.push(socket(&config.socket));
    out
}

/// What the host lets the control plane do: the task kinds, pg_dump's directories (each must
/// exist and be writable by whoever task commands run as), and the terminal.
fn policy(config: &AgentConfig) -> Vec<Check> {
    let tasks = &config.tasks;
    let kinds: Vec<&str> = tasks.policy.remote_kinds.iter().map(|k| k.name()).collect();
    let mut out = vec![ok(
        "remote_kinds",
        format!(
            "the control plane may create: {}",
            if kinds.is_empty() {
                "nothing".to_string()
            } else {
                kinds.join(", ")
            }
        ),
    )];
    if tasks.policy.dump_dirs.is_empty() {
        out.push(ok("dump_dirs", "none: pg_dump is off ([tasks] dump_dirs)"));
    }
    for dir in &tasks.policy.dump_dirs {
        let shown = dir.display();
        let writable = match std::fs::metadata(dir) {
            Err(e) => Err(format!("{shown}: {e}")),
            Ok(meta) if !meta.is_dir() => Err(format!("{shown} is not a directory")),
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                let (mode, owner, group) = (meta.mode(), meta.uid(), meta.gid());
                // Whose rights task commands get: run_as, else the agent's own.
                let (uid, gid) = match &tasks.run_as {
                    RunAs::User { uid, gid, .. } => (*uid, *gid),
                    _ => (
                        nix::unistd::geteuid().as_raw(),
                        nix::unistd::getegid().as_raw(),
                    ),
                };
                let can = uid == 0
                    || (owner == uid && mode & 0o200 != 0)
                    || (group == gid && mode & 0o020 != 0)
                    || mode & 0o002 != 0;
                if can {
                    Ok(())
                } else {
                    Err(format!(
                        "{shown} is not writable by the user task commands run as"
                    ))
                }
            }
        };
        out.push(match writable {
            Ok(()) => ok("dump_dirs", format!("{shown} is writable")),
            Err(detail) => fail(
                "dump_dirs",
                detail,
                "create the directory and give it to the user of [tasks] run_as (or the agent's user)",
            ),
        });
    }
    out.push(ok(
        "terminal",
        if config.terminal.enabled {
            "enabled ([terminal] enabled = false turns it off)"
        } else {
            "off on this host ([terminal] enabled = false)"
        },
    ));
    out
}

/// The data directory: present, 0700, owned by the user the agent runs as, and so is
/// everything the agent keeps in it.
/// Whether task commands and psql (whose users run what they like: `command` tasks, `\!`)
/// can read the agent's credential. If they can, any of them can act as this agent: dial its
/// terminal links, report its tasks.
fn credential(config: &AgentConfig) -> Vec<Check> {
    let path = config.data_dir.join(crate::layout::IDENTITY_FILE);
    let mut sections = vec![("tasks", &config.tasks.run_as)];
    if config.terminal.enabled {
        sections.push(("terminal", &config.terminal.run_as));
    }
    let fix = "set run_as to a user of its own in [tasks] and [terminal] (the packages make \
               outpost-run) and keep the data directory 0700, owned by the agent's user";
    sections
        .into_iter()
        .map(|(section, run_as)| {
            let (name, uid, gid) = match run_as {
                RunAs::RefuseRoot => {
                    return ok(
                        "credential",
                        format!("[{section}] runs nothing until run_as is set"),
                    );
                }
                RunAs::User { name, uid, gid, .. } => (name.clone(), *uid, *gid),
                RunAs::Agent => {
                    let uid = nix::unistd::geteuid();
                    let name = nix::unistd::User::from_uid(uid)
                        .ok()
                        .flatten()
                        .map_or_else(|| uid.to_string(), |u| u.name);
                    (name, uid.as_raw(), nix::unistd::getegid().as_raw())
                }
            };
            let groups = std::ffi::CString::new(name.clone())
                .ok()
                .and_then(|c| nix::unistd::getgrouplist(&c, nix::unistd::Gid::from_raw(gid)).ok())
                .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|| vec![gid]);
            if readable_by(&path, uid, &groups) {
                fail(
                    "credential",
                    format!(
                        "[{section}] runs as {name}, which can read {}: a task command or `\\!` \
                         could act as this agent",
                        path.display()
                    ),
                    fix,
                )
            } else {
                ok(
                    "credential",
                    format!(
                        "[{section}] runs as {name}, which cannot read {}",
                        path.display()
                    ),
                )
            }
        })
        .collect()
}

/// Whether `uid` (in `groups`) may read `path`: search on every directory above it, read on
/// it, by the owner, group and other bits that apply (root may do anything).
fn readable_by(path: &Path, uid: u32, groups: &[u32]) -> bool {
    if uid == 0 {
        return true;
    }
    let may = |p: &Path, bit: u32| {
        std::fs::metadata(p).is_ok_and(|m| {
            let shift = if m.uid() == uid {
                6
            } else if groups.contains(&m.gid()) {
                3
            } else {
                0
            };
            m.mode() & (bit << shift) != 0
        })
    };
    path.ancestors().skip(1).all(|dir| may(dir, 0o1)) && may(path, 0o4)
}

fn data_dir(dir: &Path) -> Vec<Check> {
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) => {
            return vec![fail(
                "data_dir",
                format!("{shown}: {e}"),
                format!(
                    "install -d -m 0700 -o outpost-agent -g outpost-agent {shown} (the package does this)"
                ),
            )];
        }
    };
    let me = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    let name = |uid: u32| {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or(uid.to_string(), |u| u.name)
    };
    let mut out = Vec::new();
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        out.push(fail(
            "data_dir",
            format!("{shown} has mode {mode:04o}: other users can reach the agent's credential and task output"),
            format!("chmod 0700 {shown}"),
        ));
    } else if me != 0 && owner != me {
        out.push(fail(
            "data_dir",
            format!(
                "{shown} is owned by {}, this check runs as {}",
                name(owner),
                name(me)
            ),
            format!(
                "run the agent and this check as {}, or chown -R {} {shown}",
                name(owner),
                name(me)
            ),
        ));
    } else if owner == 0 {
        out.push(warn(
            "data_dir",
            format!("{shown} is owned by root: the agent runs as root"),
            format!("run the agent as outpost-agent (the packaged unit does): chown -R outpost-agent:outpost-agent {shown}"),
        ));
    } else {
        out.push(ok(
            "data_dir",
            format!("{shown}: mode {mode:04o}, owner {}", name(owner)),
        ));
    }
    let files = [
        crate::layout::IDENTITY_FILE,
        crate::layout::TASKS_FILE,
        crate::layout::BUFFER_FILE,
    ];
    let foreign: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            (m.uid() != owner).then(|| format!("{f} (owned by {})", name(m.uid())))
        })
        .collect();
    if !foreign.is_empty() {
        out.push(fail(
            "data_files",
            format!(
                "not owned by the directory's owner {}: {}; the agent cannot use them",
                name(owner),
                foreign.join(", ")
            ),
            format!(
                "chown -R {}: {shown} (enroll as the agent's user: sudo -u {} outpost-agent enroll …)",
                name(owner),
                name(owner)
            ),
        ));
    }
    out
}

async fn control_plane(world: &World, url: &url::Url) -> Vec<Check> {
    let Ok(health) = url.join("/healthz") else {
        return vec![fail(
            "control_plane",
            format!("{url} has no usable path"),
            "enroll again with a base URL",
        )];
    };
    let answer = world::http_request(
        world,
        Method::GET,
        &health,
        HeaderMap::new(),
        bytes::Bytes::new(),
        TIMEOUT,
        64 * 1024,
    )
    .await;
    let response = match answer {
        Ok(r) if r.status.is_success() => r,
        Ok(r) => {
            return vec![fail(
                "control_plane",
                format!("{health} answered {}", r.status),
                "check the URL (it must reach the control plane or its proxy)",
            )];
        }
        Err(e) => {
            let text = e.to_string();
            let fix = if text.contains("certificate") || text.contains("tls") {
                "the certificate is not trusted: pass the private CA with ca_file (config) or --ca-file"
            } else {
                "check the URL, DNS and the firewall: the agent needs outbound HTTPS to the control plane"
            };
            return vec![fail("control_plane", format!("{health}: {text}"), fix)];
        }
    };
    let mut out = vec![ok(
        "control_plane",
        format!(
            "{url} is reachable{}",
            if url.scheme() == "https" {
                " and its certificate is trusted"
            } else {
                " (plain http: credentials cross the network unencrypted)"
            }
        ),
    )];
    let remote = response
        .headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| jiff::fmt::rfc2822::parse(v).ok())
        .map(|z| z.timestamp().as_millisecond());
    out.push(match remote {
        None => warn(
            "clock",
            "the control plane sent no Date header; skew unknown",
            "check that both hosts run NTP",
        ),
        Some(remote_ms) => {
            let skew_ms = world.now_unix_ms() - remote_ms;
            let skew = Duration::from_millis(skew_ms.unsigned_abs());
            let detail = format!("{skew_ms:+} ms against the control plane (1 s resolution)");
            if skew > SKEW_FAIL {
                fail("clock", detail, "synchronise this host's clock (NTP)")
            } else if skew > SKEW_WARN {
                warn("clock", detail, "synchronise this host's clock (NTP)")
            } else {
                ok("clock", detail)
            }
        }
    });
    out
}

/// Postgres with the configured DSN, the role's privileges, and psql / pg_dump against the
/// server's version.
async fn postgres(world: &World, config: &AgentConfig) -> Vec<Check> {
    let Some(dsn) = &config.postgres else {
        return vec![warn(
            "postgres",
            "no postgres connection configured: metrics collection, the Postgres task kinds and the terminal are off",
            "set postgres = \"…\" in the config (a role with pg_monitor)",
        )];
    };
    let parsed: tokio_postgres::Config = match dsn.parse() {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                "postgres",
                format!("the connection string does not parse: {e}"),
                "fix postgres = \"…\" in the config",
            )];
        }
    };
    let (client, driver) = match world::postgres_connect(world, &parsed, TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                "postgres",
                e,
                "check the server runs, pg_hba.conf admits this role, and the password",
            )];
        }
    };
    let mut out = Vec::new();
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('server_version_num')::int, \
             r.rolsuper, pg_has_role(current_user, 'pg_monitor', 'USAGE') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await;
    driver.abort();
    let (role, version, superuser, monitor) = match row {
        Ok(r) => (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, bool>(2),
            r.get::<_, bool>(3),
        ),
        Err(e) => {
            return vec![fail(
                "postgres",
                format!("connected, but the role query failed: {e}"),
                "check the role exists and may log in",
            )];
        }
    };
    let server_major = version / 10_000;
    out.push(ok(
        "postgres",
        format!("connected as {role}, server {server_major}"),
    ));
    out.push(if superuser {
        warn(
            "privileges",
            format!("{role} is a superuser: more than the agent needs"),
            "use a role with pg_monitor only: CREATE ROLE outpost_agent LOGIN IN ROLE pg_monitor;",
        )
    } else if monitor {
        ok("privileges", format!("{role} has pg_monitor"))
    } else {
        fail(
            "privileges",
            format!(
                "{role} lacks pg_monitor: statistics of other sessions and some views stay hidden"
            ),
            format!("GRANT pg_monitor TO \"{role}\";"),
        )
    });
    out.push(client_tool("psql", &config.tasks.psql, server_major, false).await);
    out.push(client_tool("pg_dump", &config.tasks.pg_dump, server_major, true).await);
    out
}

/// `TOOL --version` against the server's major version: pg_dump must be at least as new as
/// the server; an older psql works with a warning.
async fn client_tool(name: &'static str, path: &PathBuf, server_major: i32, strict: bool) -> Check {
    let output = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let text = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            return fail(
                name,
                format!("{} --version exited {}", path.display(), o.status),
                "install the PostgreSQL client tools (Debian: postgresql-client)",
            );
        }
        Err(e) => {
            return fail(
                name,
                format!("{}: {e}", path.display()),
                "install the PostgreSQL client tools (Debian: postgresql-client), or set the path in [tasks]",
            );
        }
    };
    let major = text
        .split_whitespace()
        .find_map(|w| w.split('.').next()?.parse::<i32>().ok());
    match major {
        Some(m) if m < server_major && strict => fail(
            name,
            format!("{text}: older than the server ({server_major}); it refuses to dump it"),
            format!("install postgresql-client-{server_major} and point [tasks] pg_dump at it"),
        ),
        Some(m) if m < server_major => warn(
            name,
            format!("{text}: older than the server ({server_major})"),
            format!("install postgresql-client-{server_major}"),
        ),
        _ => ok(name, text),
    }
}

/// The local task API socket: present while the agent runs, never open to other users.
fn socket(path: &Path) -> Check {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(_) => warn(
            "socket",
            format!("{shown} is missing: the agent is not running"),
            "systemctl start outpost-agent",
        ),
        Ok(m) if m.mode() & 0o007 != 0 => fail(
            "socket",
            format!(
                "{shown} has mode {:04o}: any user can submit tasks",
                m.mode() & 0o7777
            ),
            "restart the agent (it creates the socket 0660); check nothing else changes it",
        ),
        Ok(m) => ok("socket", format!("{shown}: mode {:04o}", m.mode() & 0o7777)),
    }
}

/// One line per check: `ok`, `WARN` or `FAIL`, the check, what was found, and what to do.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let label = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{label} {:<14} {}", c.check, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("\n     {:<14} → {fix}", ""));
        }
        out.push('\n');
    }
    out
}
