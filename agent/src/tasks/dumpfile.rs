//! The file a `pg_dump` task writes, opened without a check-then-use window.
//!
//! The agent checks a dump path against `[tasks] dump_dirs` (links resolved) before each run;
//! pg_dump would then open the path again, and a link swapped into it in between would send
//! the dump elsewhere with the run user's rights. Instead the run starts as
//! `outpost-agent dump-into PATH -- pg_dump …`, after the switch to the run user: it opens
//! every directory of the checked path with `O_NOFOLLOW` from `/`, creates or truncates the
//! file in the last one with `O_NOFOLLOW`, and hands pg_dump that open file (`--file
//! /dev/fd/N`, which names the open file, not a path). A link anywhere in the path fails the
//! run instead.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

/// Open `path` (absolute, no `..`) for writing, following no symbolic link on the way:
/// created 0600 when new, truncated when not.
pub fn open(path: &Path) -> Result<OwnedFd, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("dump path {shown} is not absolute"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("dump path {shown} names no file"))?;
    let walk = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir: OwnedFd =
        nix::fcntl::open("/", walk, Mode::empty()).map_err(|e| format!("open /: {e}"))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    for component in parent.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => {
                dir = openat(&dir, part, walk, Mode::empty()).map_err(|e| {
                    format!(
                        "dump path {shown}: {}: {e}{}",
                        part.to_string_lossy(),
                        if e == nix::errno::Errno::ELOOP || e == nix::errno::Errno::ENOTDIR {
                            " (a symbolic link: dumps are not written through links)"
                        } else {
                            ""
                        }
                    )
                })?;
            }
            _ => return Err(format!("dump path {shown} must not contain . or ..")),
        }
    }
    openat(
        &dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| {
        format!(
            "dump path {shown}: {e}{}",
            if e == nix::errno::Errno::ELOOP {
                " (a symbolic link: dumps are not written through links)"
            } else {
                ""
            }
        )
    })
}

/// `outpost-agent dump-into PATH -- PG_DUMP ARGS…`: open `path` as [`open`] does, then become
/// pg_dump writing to it. Returns only when that fails.
pub fn exec(path: &Path, argv: &[String]) -> String {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        return "dump-into: no pg_dump command after --".into();
    };
    let file = match open(path) {
        Ok(file) => file,
        Err(e) => return e,
    };
    let error = std::process::Command::new(program)
        .arg(format!("--file=/dev/fd/{}", file.as_raw_fd()))
        .args(args)
        .exec();
    format!("start {program}: {error}")
}

#[cfg(test)]
mod tests {
    use super::open;

    #[test]
    fn a_link_anywhere_in_the_path_is_refused_and_a_real_path_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("dumps");
        std::fs::create_dir(&real).expect("mkdir");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");

        let good = real.join("a.sql");
        drop(open(&good).expect("a real path opens"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&good).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let linked_dir = tmp.path().join("linked");
        std::os::unix::fs::symlink(&elsewhere, &linked_dir).expect("symlink");
        let error = open(&linked_dir.join("b.sql")).expect_err("through a linked directory");
        assert!(error.contains("symbolic link"), "{error}");

        let linked_file = real.join("c.sql");
        std::os::unix::fs::symlink(elsewhere.join("c.sql"), &linked_file).expect("symlink");
        let error = open(&linked_file).expect_err("a linked file");
        assert!(error.contains("symbolic link"), "{error}");
        assert!(
            !elsewhere.join("c.sql").exists(),
            "nothing written through the link"
        );

        assert!(open(std::path::Path::new("relative.sql")).is_err());
    }
}
