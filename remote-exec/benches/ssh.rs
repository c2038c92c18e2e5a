//! `just bench ssh`: `hostname` on 10, 50 and 100 loopback sshd instances, cold and over
//! reused connections, next to pssh (apt), parallel-ssh (pip) and ansible ad-hoc (pip) in the
//! same run. Prints wall time and client CPU (user + system of the client process and
//! everything it forked) against its target (README, Benchmarks).
#![allow(clippy::disallowed_methods)] // a benchmark measures wall time

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::resource::{UsageWho, getrusage};
use remote_exec::fleet::{self, ErrorBudget, Plan, Pool};
use remote_exec::quote::command_line;
use remote_exec::{Client, Host, HostKeyPolicy, OpId, Outcome, RetryPolicy, Timeouts};
use tokio_util::sync::CancellationToken;
use world::World;

const SIZES: [usize; 3] = [10, 50, 100];
const REPS: usize = 3;

#[derive(Clone, Copy, Default)]
struct Cost {
    wall_s: f64,
    cpu_s: f64,
}

fn cpu_s(who: UsageWho) -> f64 {
    getrusage(who).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Run a client command to its end; its CPU is what it and its children used.
fn measure(cmd: &mut Command) -> anyhow::Result<Cost> {
    let before = cpu_s(UsageWho::RUSAGE_CHILDREN);
    let start = std::time::Instant::now();
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let wall_s = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{:?} failed: {}\n{}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(Cost {
        wall_s,
        cpu_s: cpu_s(UsageWho::RUSAGE_CHILDREN) - before,
    })
}

/// The fastest of `REPS` runs (least disturbed by the rest of the machine).
fn best(reps: usize, mut f: impl FnMut() -> anyhow::Result<Cost>) -> anyhow::Result<Cost> {
    let mut all = Vec::new();
    for _ in 0..reps {
        all.push(f()?);
    }
    all.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    Ok(all[0])
}

fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Fleet {
    _servers: Vec<fixtures::Sshd>,
    ports: Vec<u16>,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(n: usize) -> anyhow::Result<Fleet> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-bench-ssh-")
            .tempdir()?;
        let key = dir.path().join("id_ed25519");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .context("run ssh-keygen (openssh-client)")?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
        let mut servers = Vec::new();
        let mut known = String::new();
        for _ in 0..n {
            let s = fixtures::Sshd::start_with_client_key(&key).await?;
            known.push_str(&std::fs::read_to_string(s.known_hosts())?);
            servers.push(s);
        }
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, known)?;
        Ok(Fleet {
            ports: servers.iter().map(fixtures::Sshd::port).collect(),
            user: servers[0].user().to_string(),
            _servers: servers,
            key,
            known_hosts,
            dir,
        })
    }

    fn hosts(&self, n: usize) -> Vec<Host> {
        self.ports[..n]
            .iter()
            .enumerate()
            .map(|(i, port)| Host {
                name: format!("h{i}"),
                address: "127.0.0.1".into(),
                port: *port,
                user: self.user.clone(),
                identity_file: self.key.clone(),
                known_hosts: self.known_hosts.clone(),
                groups: vec![],
            })
            .collect()
    }

    fn write(&self, name: &str, text: String) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    fn inventory(&self, n: usize) -> anyhow::Result<PathBuf> {
        let mut t = format!(
            "[defaults]\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\n",
            self.user,
            self.key.display(),
            self.known_hosts.display()
        );
        for (i, p) in self.ports[..n].iter().enumerate() {
            let _ = write!(
                t,
                "[[hosts]]\nname = \"h{i}\"\naddress = \"127.0.0.1\"\nport = {p}\n"
            );
        }
        self.write(&format!("inventory-{n}.toml"), t)
    }

    fn ssh_options(&self) -> Vec<String> {
        vec![
            format!("IdentityFile={}", self.key.display()),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "StrictHostKeyChecking=yes".into(),
            "BatchMode=yes".into(),
            "ControlMaster=no".into(),
        ]
    }
}

/// The library with a warm pool: connect once, then time a second round on the same
/// connections.
async fn outpost_reused(fleet: &Fleet, n: usize) -> anyhow::Result<(Cost, Cost)> {
    let client = Arc::new(Client::new(
        World::real(),
        Timeouts::default(),
        HostKeyPolicy::Strict,
    ));
    let pool = Arc::new(Pool::new(client));
    let mut costs = Vec::new();
    for _ in 0..=REPS {
        let plan = Arc::new(Plan {
            op_id: OpId::generate(&World::real()),
            command: command_line(&["hostname"])?,
            receipts: true,
            concurrency: n,
            budget: ErrorBudget::Unlimited,
            retry: RetryPolicy::default(),
            output_bytes_max: 4096,
        });
        let before = cpu_s(UsageWho::RUSAGE_SELF);
        let start = std::time::Instant::now();
        let (results, _) = fleet::run(
            pool.clone(),
            fleet.hosts(n),
            plan,
            None,
            CancellationToken::new(),
        )
        .await;
        let cost = Cost {
            wall_s: start.elapsed().as_secs_f64(),
            cpu_s: cpu_s(UsageWho::RUSAGE_SELF) - before,
        };
        let ok = results
            .iter()
            .filter(|r| r.report.outcome == Outcome::Ok)
            .count();
        anyhow::ensure!(ok == n, "library run: {ok} of {n} hosts ok");
        costs.push(cost);
    }
    pool.close().await;
    let cold = costs[0];
    let mut warm = costs[1..].to_vec();
    warm.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    Ok((cold, warm[0]))
}

const PARALLEL_SSH_SCRIPT: &str = r#"
import json, sys
from pssh.clients import ParallelSSHClient
from pssh.config import HostConfig
cfg = json.load(open(sys.argv[1]))
hosts = ["127.0.0.1"] * len(cfg["ports"])
configs = [HostConfig(port=p, user=cfg["user"], private_key=cfg["key"]) for p in cfg["ports"]]
client = ParallelSSHClient(hosts, host_config=configs, pool_size=len(hosts), timeout=30)
output = client.run_command("hostname")
client.join(output)
bad = [o for o in output if o.exit_code != 0 or not list(o.stdout)]
sys.exit(1 if bad else 0)
"#;

fn row(out: &mut String, tool: &str, cost: Option<Cost>, reference: Cost, note: &str) {
    match cost {
        Some(c) => {
            let _ = writeln!(
                out,
                "| {tool} | {:.2} | {:.2} | {:.1}x | {:.1}x | {note} |",
                c.wall_s,
                c.cpu_s,
                c.wall_s / reference.wall_s,
                c.cpu_s / reference.cpu_s.max(1e-6),
            );
        }
        None => {
            let _ = writeln!(out, "| {tool} | – | – | – | – | {note} |");
        }
    }
}

async fn bench() -> anyhow::Result<()> {
    let outpost = std::env::var_os("OUTPOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/outpost"));
    anyhow::ensure!(
        outpost.is_file(),
        "{} not found: build it with `cargo build --release --bin outpost` (just bench ssh does)",
        outpost.display()
    );
    let max = *SIZES.iter().max().unwrap_or(&100);
    eprintln!("starting {max} sshd instances on loopback…");
    let fleet = Fleet::start(max).await?;
    let pssh = have("parallel-ssh", &["--version"]);
    let pyssh = have("python3", &["-c", "import pssh.clients"]);
    let ansible = have("ansible", &["--version"]);
    let script = fleet.write("parallel_ssh_bench.py", PARALLEL_SSH_SCRIPT.into())?;

    println!(
        "target: hostname on 100 loopback hosts >= 3x faster than pssh and ansible, \
         >= parallel-ssh, client CPU <= 1/3 of parallel-ssh"
    );
    println!(
        "wall and CPU in seconds, best of {REPS} (ansible: 1 run); ratios are tool / outpost cold (CLI)"
    );
    for n in SIZES {
        eprintln!("{n} hosts…");
        let inv = fleet.inventory(n)?;
        let cli = best(REPS, || {
            measure(
                Command::new(&outpost)
                    .arg("exec")
                    .arg("--inventory")
                    .arg(&inv)
                    .args(["--concurrency", &n.to_string(), "--json", "--", "hostname"]),
            )
        })?;
        let (lib_cold, lib_warm) = outpost_reused(&fleet, n).await?;
        let mut out = String::new();
        let _ = writeln!(out, "\n### {n} hosts\n");
        let _ = writeln!(
            out,
            "| client | wall s | client CPU s | wall / outpost | CPU / outpost | notes |\n|---|---|---|---|---|---|"
        );
        row(
            &mut out,
            "outpost exec (CLI, cold)",
            Some(cli),
            cli,
            "one process; receipts on",
        );
        row(
            &mut out,
            "outpost library, cold",
            Some(lib_cold),
            cli,
            "in-process, new connections",
        );
        row(
            &mut out,
            "outpost library, reused connections",
            Some(lib_warm),
            cli,
            "same connections, second round",
        );

        let hosts_file = fleet.write(
            &format!("pssh-{n}.txt"),
            fleet.ports[..n]
                .iter()
                .map(|p| format!("127.0.0.1:{p}\n"))
                .collect(),
        )?;
        let pssh_cost = if pssh {
            Some(best(REPS, || {
                let mut c = Command::new("parallel-ssh");
                c.arg("-h").arg(&hosts_file);
                c.args(["-p", &n.to_string(), "-l", &fleet.user, "-t", "60"]);
                for o in fleet.ssh_options() {
                    c.args(["-O", &o]);
                }
                c.arg("hostname");
                measure(&mut c)
            })?)
        } else {
            None
        };
        row(
            &mut out,
            "pssh (apt parallel-ssh, OpenSSH per host)",
            pssh_cost,
            cli,
            if pssh {
                ""
            } else {
                "not installed: apt-get install pssh"
            },
        );

        let cfg = fleet.write(
            &format!("parallel-ssh-{n}.json"),
            serde_json::json!({
                "ports": fleet.ports[..n],
                "user": fleet.user,
                "key": fleet.key,
            })
            .to_string(),
        )?;
        let py_cost = if pyssh {
            Some(best(REPS, || {
                measure(Command::new("python3").arg(&script).arg(&cfg))
            })?)
        } else {
            None
        };
        row(
            &mut out,
            "parallel-ssh (pip, libssh2)",
            py_cost,
            cli,
            if pyssh {
                "does not check host keys"
            } else {
                "not installed: pip install parallel-ssh"
            },
        );

        let ini = fleet.write(
            &format!("ansible-{n}.ini"),
            fleet.ports[..n]
                .iter()
                .enumerate()
                .map(|(i, p)| format!("h{i} ansible_host=127.0.0.1 ansible_port={p}\n"))
                .collect(),
        )?;
        let ansible_cost = if ansible {
            let args = fleet
                .ssh_options()
                .iter()
                .map(|o| format!("-o {o}"))
                .collect::<Vec<_>>()
                .join(" ");
            Some(best(1, || {
                measure(
                    Command::new("ansible")
                        .args(["all", "-i"])
                        .arg(&ini)
                        .args(["-m", "command", "-a", "hostname", "-f", &n.to_string()])
                        .args(["-u", &fleet.user])
                        .env("ANSIBLE_SSH_ARGS", &args)
                        .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
                        .env("ANSIBLE_LOCAL_TEMP", fleet.dir.path().join("ansible-tmp"))
                        .env("ANSIBLE_HOME", fleet.dir.path().join("ansible-home")),
                )
            })?)
        } else {
            None
        };
        row(
            &mut out,
            "ansible ad-hoc (pip ansible-core, -m command)",
            ansible_cost,
            cli,
            if ansible {
                "1 run"
            } else {
                "not installed: pip install ansible-core"
            },
        );
        print!("{out}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(bench());
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}
