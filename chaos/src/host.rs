//! The machine under the suite: network namespaces joined to this one by veth links,
//! iptables cuts inside them, small tmpfs mounts for agents' data, and the cleanup that
//! removes all of it, including what an interrupted earlier run left behind.
//!
//! Every name the suite makes starts with [`PREFIX`] (namespaces) or [`VETH_PREFIX`] (links),
//! and every mount lies under a run directory named `outpost-chaos-*`, so leftovers are found
//! by name alone.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Namespaces: `ochaos-a0` (agent 0), `ochaos-s1` (ssh host 1).
pub const PREFIX: &str = "ochaos-";
/// Root-side veth ends: `ocv-a0`; the namespace side is `ocw-a0`.
pub const VETH_PREFIX: &str = "ocv-";
/// Run directories are `/tmp/outpost-chaos-SEED-XXXX`.
pub const RUN_DIR_MARK: &str = "outpost-chaos-";

/// Run `program args`, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but only says whether it worked (for cleanup and for rules that may be gone).
pub fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace with one veth link to this (the root) namespace.
#[derive(Clone, Debug)]
pub struct Netns {
    /// `ochaos-a0`
    pub name: String,
    /// Address of the root side, which the namespace reaches the control plane through.
    pub gateway: String,
    /// Address inside the namespace.
    pub address: String,
}

impl Netns {
    /// Make namespace `PREFIX + tag` linked to the root namespace on `10.213.SUBNET.0/24`.
    pub fn create(tag: &str, subnet: u8) -> anyhow::Result<Netns> {
        let name = format!("{PREFIX}{tag}");
        let outer = format!("{VETH_PREFIX}{tag}");
        let inner = format!("ocw-{tag}");
        let gateway = format!("10.213.{subnet}.1");
        let address = format!("10.213.{subnet}.2");
        run("ip", &["netns", "add", &name])?;
        run(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &name,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &outer],
        )?;
        run("ip", &["link", "set", &outer, "up"])?;
        let inside = |args: &[&str]| -> anyhow::Result<String> {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&["addr", "add", &format!("{address}/24"), "dev", &inner])?;
        inside(&["link", "set", &inner, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(Netns {
            name,
            gateway,
            address,
        })
    }

    fn iptables(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", &self.name, "iptables", "-w"];
        all.extend_from_slice(args);
        run("ip", &all).map(drop)
    }

    /// Cut the link: `inbound` drops what reaches the namespace, `outbound` what leaves it.
    /// One of the two alone is a half-open link: the other side keeps writing into nothing.
    pub fn cut(&self, inbound: bool, outbound: bool) -> anyhow::Result<()> {
        if inbound {
            self.iptables(&["-A", "INPUT", "-s", &self.gateway, "-j", "DROP"])?;
        }
        if outbound {
            self.iptables(&["-A", "OUTPUT", "-d", &self.gateway, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Remove every cut.
    pub fn heal(&self) -> anyhow::Result<()> {
        self.iptables(&["-F", "INPUT"])?;
        self.iptables(&["-F", "OUTPUT"])
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the program's).
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

/// Mount a tmpfs of `mib` MiB on `dir` (created if missing).
pub fn mount_tmpfs(dir: &Path, mib: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.display().to_string();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "tmpfs",
            &path,
        ],
    )
    .map(drop)
}

/// Everything the suite makes on the machine, found by name: processes inside its namespaces
/// (killed), the namespaces and their links, tmpfs mounts under run directories. Safe to call
/// at any time; returns what it removed, for the log.
pub fn sweep() -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces = run("ip", &["netns", "list"]).unwrap_or_default();
    for line in namespaces.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let pids = run("ip", &["netns", "pids", name]).unwrap_or_default();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SIGCONT first: a stopped process does not die of SIGKILL until it runs.
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        if try_run("ip", &["netns", "del", name]) {
            removed.push(format!("namespace {name}"));
        }
    }
    let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        let Some(name) = line.split(':').nth(1).map(str::trim) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(VETH_PREFIX) && try_run("ip", &["link", "del", name]) {
            removed.push(format!("link {name}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.contains(RUN_DIR_MARK))
        .collect();
    // Deepest first.
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in ours {
        if try_run("umount", &["-l", mount]) {
            removed.push(format!("mount {mount}"));
        }
    }
    removed
}

/// Tools the suite runs, with the Debian package each comes from.
pub const TOOLS: [(&str, &str); 8] = [
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("mount", "mount"),
    ("redis-server", "redis-server"),
    ("sshd", "openssh-server"),
    ("ssh-keygen", "openssh-client"),
    ("pgbench", "postgresql"),
    ("setpriv", "util-linux"),
];

/// Fail unless the suite can work here: root, and every tool present.
pub fn preflight() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the chaos suite makes network namespaces, iptables rules and tmpfs mounts: run it as root"
        );
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, package)| fixtures::find_binary(tool, &[], package).is_err())
        .map(|(tool, package)| format!("{tool} (apt-get install {package})"))
        .collect();
    if !missing.is_empty() {
        bail!("missing tools: {}", missing.join(", "));
    }
    fixtures::postgres_bin_dir()?;
    Ok(())
}
