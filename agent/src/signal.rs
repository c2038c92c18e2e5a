//! Signals to process groups whose processes may run as another user (`run_as`).
//!
//! The packaged agent is not root: it holds only CAP_SETUID and CAP_SETGID (ambient), enough
//! for `setpriv` to start task commands and psql as the run user, but not CAP_KILL, so the
//! kernel refuses its signals to their processes. Linux keeps credentials per thread, and the
//! raw `setresuid` system call changes only the calling thread's (libc's wrapper changes every
//! thread's), so a short-lived thread takes the run user's effective uid, signals the group,
//! and ends with its credentials.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, geteuid};

/// Send `signal` to process group `group`: as the agent (its own processes in the group,
/// such as a task's wrapper), and as `run_uid` when that is another user the agent may not
/// signal otherwise. Errors are ignored: a group that is gone has nothing left to stop.
pub fn killpg_as(group: Pid, signal: Signal, run_uid: Option<u32>) {
    let _ = killpg(group, signal);
    let Some(uid) = run_uid else {
        return;
    };
    let me = geteuid();
    if me.is_root() || me.as_raw() == uid {
        return;
    }
    let _ = std::thread::spawn(move || {
        const UNCHANGED: nix::libc::uid_t = nix::libc::uid_t::MAX;
        // SAFETY: a system call that changes this thread's effective uid and touches no
        // memory; the thread ends right after, so nothing else runs with that uid.
        #[allow(unsafe_code)]
        let switched =
            unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, UNCHANGED, uid, UNCHANGED) } == 0;
        if switched {
            let _ = killpg(group, signal);
        }
    })
    .join();
}
