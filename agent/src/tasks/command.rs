//! The command line of each task kind: what runs for a `vacuum`, an `analyze`, a health
//! check, SQL, a `pg_dump` into a checked directory, the agent's own retention clean-up, or a
//! plain command, and with whose rights (`run_as`). A Postgres password never appears in an
//! argv (which every user of the host can read): it goes in `PGPASSWORD`.

use std::path::Path;

use super::model::{Kind, TaskSpec};
use super::policy::TaskPolicy;
use super::process::Environment;
use crate::run_as::RunAs;

/// What the command lines are made from: the pool's configuration, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Setup<'a> {
    /// Connection string for the Postgres kinds; `None` makes them fail with a reason.
    pub postgres: Option<&'a str>,
    pub psql: &'a Path,
    pub pg_dump: &'a Path,
    /// This agent binary, for `retention_cleanup` (`outpost-agent tasks purge`) and
    /// `dump-into`.
    pub agent_exe: &'a Path,
    pub data_dir: &'a Path,
    /// Whose rights the commands get.
    pub run_as: &'a RunAs,
    /// What this host lets be run (pg_dump's directories are checked again before each run).
    pub policy: &'a TaskPolicy,
}

/// Double-quote an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `dsn` pointed at `database` (URL path replaced, or `dbname=` appended: later keys win).
pub fn dsn_for(dsn: &str, database: Option<&str>) -> String {
    let Some(db) = database else {
        return dsn.to_string();
    };
    if let Ok(mut url) = url::Url::parse(dsn)
        && (url.scheme() == "postgres" || url.scheme() == "postgresql")
    {
        url.set_path(&format!("/{db}"));
        return url.to_string();
    }
    format!(
        "{dsn} dbname='{}'",
        db.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// What starts a run: its argv and environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Environment,
}

/// How `spec` runs here; an error when it cannot. A Postgres password never appears in the
/// argv (which every user of the host can read): it is passed in `PGPASSWORD`.
pub fn launch_for(spec: &TaskSpec, config: &Setup<'_>) -> Result<Launch, String> {
    let mut password = None;
    let argv = argv_for(spec, config, &mut password)?;
    let backups = config.policy.backups.as_ref();
    let run_as = match backups.and_then(|b| b.run_as.as_ref()) {
        Some(run_as) if spec.kind.is_backup() => run_as,
        _ => config.run_as,
    };
    let mut launch = as_user(run_as, argv)?;
    if let Some(password) = password {
        launch.env.vars.push(("PGPASSWORD".into(), password));
    }
    Ok(launch)
}

/// The argv that runs `spec` (before switching user); a DSN's password goes to `password`.
fn argv_for(
    spec: &TaskSpec,
    config: &Setup<'_>,
    password: &mut Option<String>,
) -> Result<Vec<String>, String> {
    let p = |k: &str| spec.params.get(k).map(String::as_str);
    let postgres = || {
        config.postgres.map(str::to_string).ok_or_else(|| {
            format!(
                "{} needs a Postgres connection: start the agent with --postgres",
                spec.kind.name()
            )
        })
    };
    let mut dsn = |database: Option<&str>| -> Result<String, String> {
        let (dsn, pw) = crate::dsn::split_password(&dsn_for(&postgres()?, database));
        *password = pw;
        Ok(dsn)
    };
    let mut psql = |sql: String| -> Result<Vec<String>, String> {
        let dsn = dsn(p("database"))?;
        Ok(vec![
            config.psql.display().to_string(),
            "-X".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-d".into(),
            dsn,
            "-c".into(),
            sql,
        ])
    };
    let target = || match (p("schema"), p("table")) {
        (Some(s), Some(t)) => format!(" {}.{}", quote_ident(s), quote_ident(t)),
        (None, Some(t)) => format!(" {}", quote_ident(t)),
        _ => String::new(),
    };
    let argv = match spec.kind {
        Kind::Command => {
            if spec.argv.is_empty() {
                return Err("command needs its argv after --".into());
            }
            Ok(spec.argv.clone())
        }
        Kind::Vacuum => {
            let full = if p("full") == Some("true") {
                " (FULL)"
            } else {
                ""
            };
            psql(format!("VACUUM{full}{}", target()))
        }
        Kind::Analyze => psql(format!("ANALYZE{}", target())),
        Kind::HealthCheck => psql("SELECT 1".into()),
        Kind::Sql => psql(p("query").unwrap_or_default().to_string()),
        Kind::PgDump => {
            // Checked again here: the config may have changed, or a link appeared, since the
            // task was added.
            let path = config
                .policy
                .check_dump_path(p("path").unwrap_or_default())?;
            let dsn = dsn(p("database"))?;
            // The file is opened by `dump-into` (as the run user, following no link) and
            // handed to pg_dump open: nothing can swap the path between check and use.
            let mut argv = vec![
                config.agent_exe.display().to_string(),
                "dump-into".into(),
                path.display().to_string(),
                "--".into(),
                config.pg_dump.display().to_string(),
                "-d".into(),
                dsn,
            ];
            if let Some(s) = p("schema") {
                argv.extend(["-n".into(), s.into()]);
            }
            if let Some(t) = p("table") {
                argv.extend(["-t".into(), t.into()]);
            }
            Ok(argv)
        }
        Kind::PgbackrestBackup
        | Kind::PgbackrestCheck
        | Kind::PgbackrestVerify
        | Kind::RestoreDrill => {
            let dsn = match config.postgres {
                Some(_) => Some(dsn(None)?),
                None => None,
            };
            super::backup::argv(spec, config.policy.backups.as_ref(), config.agent_exe, dsn)
        }
        // The agent's own housekeeping on its own store: always as the agent's user.
        Kind::RetentionCleanup => {
            return Ok(vec![
                config.agent_exe.display().to_string(),
                "tasks".into(),
                "purge".into(),
                "--older-than".into(),
                p("older_than").unwrap_or("30d").into(),
                "--data-dir".into(),
                config.data_dir.display().to_string(),
            ]);
        }
    }?;
    Ok(argv)
}

/// `argv` run with `run_as`'s rights. Another user's run starts from an empty environment
/// with that user's HOME, SHELL, USER, LOGNAME and a plain PATH (what `setpriv --reset-env`
/// would set, done here so that `PGPASSWORD` can be added).
pub(crate) fn as_user(run_as: &RunAs, argv: Vec<String>) -> Result<Launch, String> {
    match run_as {
        RunAs::Agent => Ok(Launch {
            argv,
            env: Environment::default(),
        }),
        RunAs::RefuseRoot => Err(
            "the agent runs as root (or holds CAP_SETUID) and [tasks] run_as is not set: task \
             commands never get those rights unless the config says so. Set [tasks] run_as to \
             the user they should run as (the packages make outpost-run; \"root\" allows root \
             when the agent is root)"
                .into(),
        ),
        RunAs::User {
            name, home, shell, ..
        } => {
            let mut all = run_as.setpriv(&[]);
            all.extend(argv);
            let vars = [
                ("HOME", home.display().to_string()),
                ("SHELL", shell.display().to_string()),
                ("USER", name.clone()),
                ("LOGNAME", name.clone()),
                ("PATH", "/usr/local/bin:/bin:/usr/bin".to_string()),
            ];
            Ok(Launch {
                argv: all,
                env: Environment {
                    clear: true,
                    vars: vars.map(|(k, v)| (k.to_string(), v)).to_vec(),
                },
            })
        }
    }
}
