//! The real PTY (portable-pty). One blocking reader per PTY appends to the session's
//! [`Output`] and never waits on anything else; one blocking writer applies input and
//! resizes in order. The child is a session leader (setsid), so its pid is its process group
//! and teardown signals the whole group.

use std::io::{Read, Write};
use std::sync::Arc;

use portable_pty::{CommandBuilder, MasterPty, PtySize as PortableSize, native_pty_system};
use tokio::sync::mpsc;
use world::World;

use super::model::{Output, PtyChild, PtyHandle, PtyInput, PtySize, PtySpec, PtySystem};

/// Bytes per PTY read (the sender batches further, up to the link's chunk size).
const READ_BYTES: usize = 64 * 1024;
/// Input chunks queued for the writer.
const INPUT_QUEUED_MAX: usize = 256;

/// Spawns real PTY processes.
pub struct OsPty;

fn portable(size: PtySize) -> PortableSize {
    PortableSize {
        rows: size.rows,
        cols: size.cols,
        pixel_width: 0,
        pixel_height: 0,
    }
}

struct OsChild {
    pid: Option<i32>,
    /// psql's user, when it is not the agent's.
    run_uid: Option<u32>,
}

impl PtyChild for OsChild {
    fn interrupt(&mut self) {
        use nix::sys::signal::Signal;
        use nix::unistd::Pid;
        if let Some(pid) = self.pid {
            crate::signal::killpg_as(Pid::from_raw(pid), Signal::SIGINT, self.run_uid);
        }
    }

    fn terminate(&mut self) {
        use nix::sys::signal::Signal;
        use nix::unistd::Pid;
        if let Some(pid) = self.pid.take() {
            // HUP first (what closing a terminal does), then KILL the group: psql has no
            // state worth a grace period, and a stuck backend query ends with its connection.
            let group = Pid::from_raw(pid);
            crate::signal::killpg_as(group, Signal::SIGHUP, self.run_uid);
            crate::signal::killpg_as(group, Signal::SIGKILL, self.run_uid);
        }
    }
}

impl Drop for OsChild {
    fn drop(&mut self) {
        self.terminate();
    }
}

impl PtySystem for OsPty {
    fn spawn(
        &self,
        world: &World,
        spec: &PtySpec,
        size: PtySize,
        output: Arc<Output>,
    ) -> std::io::Result<PtyHandle> {
        let io_err = |what: &str, e: anyhow::Error| std::io::Error::other(format!("{what}: {e:#}"));
        let pair = native_pty_system()
            .openpty(portable(size))
            .map_err(|e| io_err("open a PTY", e))?;
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty argv"))?;
        let mut cmd = CommandBuilder::new(program);
        cmd.args(args);
        cmd.env_clear();
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(cwd) = &spec.cwd {
            cmd.cwd(cwd);
        }
        let mut child = pair
            .slave
            .spawn_command(cmd)
            .map_err(|e| io_err(&format!("start {program}"), e))?;
        // The slave end belongs to the child now; holding it would keep the PTY open after
        // the child exits and the reader would never see the end.
        drop(pair.slave);
        let pid = child.process_id().and_then(|p| i32::try_from(p).ok());
        let mut reader = pair
            .master
            .try_clone_reader()
            .map_err(|e| io_err("clone the PTY reader", e))?;
        let writer = pair
            .master
            .take_writer()
            .map_err(|e| io_err("take the PTY writer", e))?;

        let reader_output = Arc::clone(&output);
        let reader_world = world.clone();
        tokio::spawn(async move {
            let read_loop = move || {
                let mut buf = vec![0u8; READ_BYTES];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => reader_output.push(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // EIO is how Linux says the last slave fd closed: the child is gone.
                        Err(_) => break,
                    }
                }
                let reason = match child.wait() {
                    Ok(status) if status.success() => "psql exited".to_string(),
                    Ok(status) => format!("psql exited with status {}", status.exit_code()),
                    Err(e) => format!("psql ended; its status is unknown: {e}"),
                };
                reader_output.close(reason);
            };
            if let Err(e) = reader_world.blocking(read_loop).await {
                tracing::error!(error = %e, "PTY reader ended abnormally");
                output.close("PTY reader failed".into());
            }
        });

        let (input, rx) = mpsc::channel(INPUT_QUEUED_MAX);
        let writer_world = world.clone();
        let master = pair.master;
        tokio::spawn(async move {
            let write_loop = move || write_input(rx, writer, master);
            if let Err(e) = writer_world.blocking(write_loop).await {
                tracing::error!(error = %e, "PTY writer ended abnormally");
            }
        });
        Ok(PtyHandle {
            input,
            child: Box::new(OsChild {
                pid,
                run_uid: spec.run_uid,
            }),
        })
    }
}

/// Apply input until the session drops its sender or the PTY is gone.
fn write_input(
    mut rx: mpsc::Receiver<PtyInput>,
    mut writer: Box<dyn Write + Send>,
    master: Box<dyn MasterPty + Send>,
) {
    while let Some(input) = rx.blocking_recv() {
        match input {
            PtyInput::Data(data) => {
                if writer
                    .write_all(&data)
                    .and_then(|()| writer.flush())
                    .is_err()
                {
                    break;
                }
            }
            PtyInput::Resize(size) => {
                if let Err(e) = master.resize(portable(size)) {
                    tracing::warn!(error = %e, "resize PTY");
                }
            }
        }
    }
}
