//! A crash-injecting SQLite VFS: it wraps the default unix VFS, forwards every call, and keeps
//! an undo record of every byte written to a database, WAL or journal file since that file's
//! last successful sync. At the N-th counted operation (write, truncate or sync; N from the
//! seed) it "crashes": that operation and every later write, sync, truncate, delete and lock
//! fails, so the dying connection cannot checkpoint or clean up on close. After the host is
//! gone the driver rolls unsynced bytes back on disk — none of them (a process kill), all of
//! them (a power loss) or a random subset with some turned to garbage (torn writes) — and the
//! host starts again on what a real disk could have kept.
//!
//! Not modelled (as in the prototype this follows): directory syncs (creating and deleting
//! files is durable at once) and memory-mapped I/O (the wrapper offers no `xFetch`, so SQLite
//! does not map the file).

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use rand::rngs::StdRng;
use rusqlite::ffi;

/// What the disk keeps of unsynced writes when the host dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollback {
    /// A process kill: the OS page cache keeps everything written.
    KeepAll,
    /// A power loss: everything written since the last sync is gone.
    LoseAll,
    /// A power loss with torn writes: a random subset of 512-byte blocks reverted, some of
    /// them left as garbage, and the file length either kept or cut back.
    Torn,
}

/// One unsynced change: the bytes at `offset` before it (zero-filled beyond the old end).
struct Undo {
    offset: u64,
    before: Vec<u8>,
}

#[derive(Default)]
struct FileLog {
    /// File length at the last sync (when the first unsynced change was made).
    synced_len: u64,
    changes: Vec<Undo>,
}

#[derive(Default)]
struct Inner {
    ops: u64,
    crash_at: Option<u64>,
    dead: bool,
    wal_syncs: u64,
    logs: BTreeMap<String, FileLog>,
}

/// Shared between the VFS callbacks and the simulation driver.
#[derive(Default)]
pub struct CrashState {
    inner: Mutex<Inner>,
}

impl CrashState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Crash at the `n`-th counted operation from now (`None`: never).
    pub fn arm(&self, n: Option<u64>) {
        let mut inner = self.lock();
        inner.crash_at = n.map(|n| inner.ops + n.max(1));
    }

    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Successful syncs of WAL files so far: a commit made before one of them survives any
    /// crash under `synchronous=NORMAL`.
    pub fn wal_syncs(&self) -> u64 {
        self.lock().wal_syncs
    }

    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// After every connection through this VFS is closed: put on disk what `mode` keeps of
    /// the unsynced changes, then come back to life. Returns the bytes reverted.
    pub fn restore(&self, mode: Rollback, rng: &mut StdRng) -> std::io::Result<u64> {
        let mut inner = self.lock();
        let logs = std::mem::take(&mut inner.logs);
        inner.dead = false;
        inner.crash_at = None;
        drop(inner);
        let mut reverted = 0u64;
        if mode == Rollback::KeepAll {
            return Ok(0);
        }
        for (path, log) in logs {
            let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(&path) else {
                continue; // deleted since: deletion is durable here
            };
            for change in log.changes.iter().rev() {
                for (i, block) in change.before.chunks(512).enumerate() {
                    let revert = match mode {
                        Rollback::LoseAll => true,
                        _ => rng.random_bool(0.5),
                    };
                    if !revert {
                        continue;
                    }
                    let bytes: Vec<u8> = if mode == Rollback::Torn && rng.random_bool(0.125) {
                        (0..block.len()).map(|_| rng.random()).collect()
                    } else {
                        block.to_vec()
                    };
                    file.seek(SeekFrom::Start(change.offset + (i * 512) as u64))?;
                    file.write_all(&bytes)?;
                    reverted += bytes.len() as u64;
                }
            }
            if mode == Rollback::LoseAll || rng.random_bool(0.5) {
                file.set_len(log.synced_len)?;
            }
        }
        Ok(reverted)
    }
}

/// A registered crash VFS.
pub struct CrashVfs {
    pub name: String,
    pub state: Arc<CrashState>,
}

struct AppData {
    real: *mut ffi::sqlite3_vfs,
    state: Arc<CrashState>,
}

#[repr(C)]
struct CrashFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    state: *const CrashState,
    /// Path of a database, WAL or journal file (tracked); null for other files.
    path: *mut String,
    wal: bool,
}

/// Register a VFS named `name` over the default VFS. It lives for the rest of the process
/// (each seed runs in its own process).
pub fn register(name: &str) -> anyhow::Result<CrashVfs> {
    let state = Arc::new(CrashState::default());
    // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, valid for the process lifetime.
    let real = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
    if real.is_null() {
        anyhow::bail!("no default SQLite VFS");
    }
    let zname = CString::new(name)?;
    // SAFETY: `real` is a valid VFS; the copy forwards every method we do not override, and
    // the unix VFS's forwarded methods do not use the VFS pointer's app data.
    let mut vfs: ffi::sqlite3_vfs = unsafe { std::ptr::read(real) };
    vfs.szOsFile = std::mem::size_of::<CrashFile>() as c_int;
    vfs.pNext = std::ptr::null_mut();
    vfs.zName = zname.into_raw();
    vfs.pAppData = Box::into_raw(Box::new(AppData {
        real,
        state: Arc::clone(&state),
    })) as *mut c_void;
    vfs.xOpen = Some(x_open);
    vfs.xDelete = Some(x_delete);
    let vfs = Box::into_raw(Box::new(vfs));
    // SAFETY: `vfs` is leaked, so it outlives every connection.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        anyhow::bail!("register VFS {name}: code {rc}");
    }
    Ok(CrashVfs {
        name: name.to_string(),
        state,
    })
}

unsafe fn app<'a>(vfs: *mut ffi::sqlite3_vfs) -> &'a AppData {
    // SAFETY: pAppData was set in `register` and is never freed.
    unsafe { &*((*vfs).pAppData as *const AppData) }
}

unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (&'a CrashFile, *mut ffi::sqlite3_file, &'a CrashState) {
    // SAFETY: SQLite passes back the file it had us open; fields were set in `x_open`.
    unsafe {
        let f = &*(file as *const CrashFile);
        (f, f.real, &*f.state)
    }
}

unsafe fn real_methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an opened real file always has methods.
    unsafe { &*(*real).pMethods }
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let app = app(vfs);
        let real_vfs = &*app.real;
        let real = ffi::sqlite3_malloc(real_vfs.szOsFile) as *mut ffi::sqlite3_file;
        if real.is_null() {
            return ffi::SQLITE_NOMEM;
        }
        std::ptr::write_bytes(real as *mut u8, 0, real_vfs.szOsFile as usize);
        let f = file as *mut CrashFile;
        (*f).base.pMethods = std::ptr::null();
        let Some(open) = real_vfs.xOpen else {
            ffi::sqlite3_free(real as *mut c_void);
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open(app.real, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
            ffi::sqlite3_free(real as *mut c_void);
            return rc;
        }
        let tracked = flags
            & (ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL | ffi::SQLITE_OPEN_MAIN_JOURNAL)
            != 0;
        let path = if tracked && !name.is_null() {
            let p = CStr::from_ptr(name).to_string_lossy().into_owned();
            Box::into_raw(Box::new(p))
        } else {
            std::ptr::null_mut()
        };
        std::ptr::write(
            f,
            CrashFile {
                base: ffi::sqlite3_file {
                    pMethods: &IO_METHODS,
                },
                real,
                state: Arc::as_ptr(&app.state),
                path,
                wal: flags & ffi::SQLITE_OPEN_WAL != 0,
            },
        );
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        let app = app(vfs);
        let mut inner = app.state.lock();
        if inner.dead {
            return ffi::SQLITE_IOERR_DELETE;
        }
        if !name.is_null() {
            inner
                .logs
                .remove(&CStr::from_ptr(name).to_string_lossy().into_owned());
        }
        drop(inner);
        match (*app.real).xDelete {
            Some(delete) => delete(app.real, name, sync_dir),
            None => ffi::SQLITE_IOERR_DELETE,
        }
    }
}

/// Count a write, truncate or sync of a tracked file; `true` when this one is the crash.
fn counted(inner: &mut Inner) -> bool {
    if inner.dead {
        return true;
    }
    inner.ops += 1;
    if inner.crash_at.is_some_and(|at| inner.ops >= at) {
        inner.dead = true;
        return true;
    }
    false
}

unsafe fn file_size(real: *mut ffi::sqlite3_file) -> Option<u64> {
    unsafe {
        let mut size: ffi::sqlite3_int64 = 0;
        let rc = (real_methods(real).xFileSize?)(real, &mut size);
        (rc == ffi::SQLITE_OK).then_some(size as u64)
    }
}

/// The bytes in `[offset, offset + len)` as they are now, zero beyond the end of the file.
unsafe fn read_before(real: *mut ffi::sqlite3_file, offset: u64, len: usize, size: u64) -> Vec<u8> {
    let mut before = vec![0u8; len];
    let readable = size.saturating_sub(offset).min(len as u64) as usize;
    if readable > 0
        && let Some(read) = unsafe { real_methods(real) }.xRead
    {
        // SAFETY: `before` has room for `readable` bytes. A short read zero-fills.
        unsafe {
            read(
                real,
                before.as_mut_ptr() as *mut c_void,
                readable as c_int,
                offset as ffi::sqlite3_int64,
            )
        };
    }
    before
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (f, real, _) = parts(file);
        let rc = match real_methods(real).xClose {
            Some(close) => close(real),
            None => ffi::SQLITE_OK,
        };
        ffi::sqlite3_free(real as *mut c_void);
        if !f.path.is_null() {
            drop(Box::from_raw(f.path));
        }
        (*(file as *mut CrashFile)).base.pMethods = std::ptr::null();
        rc
    }
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xRead {
            Some(read) => read(real, buf, amount, offset),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let (f, real, state) = parts(file);
        let mut inner = state.lock();
        if inner.dead {
            return ffi::SQLITE_IOERR_WRITE;
        }
        if !f.path.is_null() {
            if counted(&mut inner) {
                return ffi::SQLITE_IOERR_WRITE;
            }
            let Some(size) = file_size(real) else {
                return ffi::SQLITE_IOERR_WRITE;
            };
            let before = read_before(real, offset as u64, amount as usize, size);
            let log = inner
                .logs
                .entry((*f.path).clone())
                .or_insert_with(|| FileLog {
                    synced_len: size,
                    changes: Vec::new(),
                });
            log.changes.push(Undo {
                offset: offset as u64,
                before,
            });
        }
        drop(inner);
        match real_methods(real).xWrite {
            Some(write) => write(real, buf, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe {
        let (f, real, state) = parts(file);
        let mut inner = state.lock();
        if inner.dead {
            return ffi::SQLITE_IOERR_TRUNCATE;
        }
        if !f.path.is_null() {
            if counted(&mut inner) {
                return ffi::SQLITE_IOERR_TRUNCATE;
            }
            let Some(current) = file_size(real) else {
                return ffi::SQLITE_IOERR_TRUNCATE;
            };
            let new_len = size as u64;
            let before = if current > new_len {
                read_before(real, new_len, (current - new_len) as usize, current)
            } else {
                Vec::new()
            };
            let log = inner
                .logs
                .entry((*f.path).clone())
                .or_insert_with(|| FileLog {
                    synced_len: current,
                    changes: Vec::new(),
                });
            log.changes.push(Undo {
                offset: new_len,
                before,
            });
        }
        drop(inner);
        match real_methods(real).xTruncate {
            Some(truncate) => truncate(real, size),
            None => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let (f, real, state) = parts(file);
        let mut inner = state.lock();
        if inner.dead {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        if !f.path.is_null() && counted(&mut inner) {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        let rc = match real_methods(real).xSync {
            Some(sync) => sync(real, flags),
            None => ffi::SQLITE_OK,
        };
        if rc == ffi::SQLITE_OK && !f.path.is_null() {
            inner.logs.remove(&*f.path);
            if f.wal {
                inner.wal_syncs += 1;
            }
        }
        rc
    }
}

unsafe extern "C" fn x_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xFileSize {
            Some(file_size) => file_size(real, size),
            None => ffi::SQLITE_IOERR_FSTAT,
        }
    }
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (_, real, state) = parts(file);
        if state.is_dead() {
            return ffi::SQLITE_IOERR_LOCK;
        }
        match real_methods(real).xLock {
            Some(lock) => lock(real, level),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xUnlock {
            Some(unlock) => unlock(real, level),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xCheckReservedLock {
            Some(check) => check(real, out),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn x_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xFileControl {
            Some(control) => control(real, op, arg),
            None => ffi::SQLITE_NOTFOUND,
        }
    }
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        real_methods(real).xSectorSize.map_or(512, |f| f(real))
    }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        real_methods(real)
            .xDeviceCharacteristics
            .map_or(0, |f| f(real))
    }
}

unsafe extern "C" fn x_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xShmMap {
            Some(map) => map(real, region, size, extend, out),
            None => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn x_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xShmLock {
            Some(lock) => lock(real, offset, n, flags),
            None => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe {
        let (_, real, _) = parts(file);
        if let Some(barrier) = real_methods(real).xShmBarrier {
            barrier(real);
        }
    }
}

unsafe extern "C" fn x_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe {
        let (_, real, _) = parts(file);
        match real_methods(real).xShmUnmap {
            Some(unmap) => unmap(real, delete),
            None => ffi::SQLITE_OK,
        }
    }
}

/// Version 2: shared memory for WAL, no `xFetch`/`xUnfetch` (so no memory-mapped reads).
static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rusqlite::{Connection, OpenFlags};

    use super::{Rollback, register};

    fn open(path: &std::path::Path, vfs: &str) -> rusqlite::Result<Connection> {
        let c = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs)?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "NORMAL")?;
        c.execute_batch("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")?;
        Ok(c)
    }

    /// Commits survive as a prefix, at least through the last WAL sync, whatever the disk
    /// keeps; a process kill keeps all of them.
    #[test]
    fn crashes_leave_a_prefix_of_commits_through_the_last_wal_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vfs = register("crash-test-prefix").expect("register");
        for (round, mode) in [Rollback::KeepAll, Rollback::LoseAll, Rollback::Torn]
            .into_iter()
            .cycle()
            .take(150)
            .enumerate()
        {
            let path = dir.path().join(format!("t{round}.db"));
            let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64);
            let c = open(&path, &vfs.name).expect("open");
            vfs.state.arm(Some(1 + (round as u64 * 7) % 500));
            // (n, WAL syncs completed when its commit returned): a commit is durable once a
            // WAL sync completes after it.
            let mut commits = Vec::new();
            for n in 1..=400 {
                if c.execute("INSERT INTO t (n) VALUES (?1)", [n]).is_err() {
                    break;
                }
                commits.push((n, vfs.state.wal_syncs()));
                if n % 50 == 0 {
                    let _ = c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
                }
            }
            let final_syncs = vfs.state.wal_syncs();
            let committed = commits.last().map_or(0, |c| c.0);
            let durable = commits
                .iter()
                .filter(|(_, s)| *s < final_syncs)
                .map(|c| c.0)
                .max()
                .unwrap_or(0);
            assert!(
                vfs.state.is_dead(),
                "round {round}: the crash point was reached"
            );
            drop(c);
            vfs.state.restore(mode, &mut rng).expect("restore");
            let c = open(&path, &vfs.name).expect("reopen");
            let ok: String = c
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .expect("check");
            assert_eq!(ok, "ok", "round {round} {mode:?}");
            let (count, max): (i64, Option<i64>) = c
                .query_row("SELECT count(*), max(n) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .expect("count");
            assert_eq!(Some(count), max.or(Some(0)), "round {round}: a prefix");
            assert!(
                count >= durable,
                "round {round} {mode:?}: {count} < synced {durable}"
            );
            if mode == Rollback::KeepAll {
                assert_eq!(count, committed, "round {round}: a kill loses nothing");
            }
        }
    }
}
