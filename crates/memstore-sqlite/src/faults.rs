//! A fault-injecting SQLite VFS for tests (feature `faults`): power loss
//! and I/O errors under a store, without root, a special filesystem or a
//! second process.
//!
//! The VFS named [`VFS_NAME`] wraps the platform's default VFS, in the
//! manner of SQLite's own test VFSes (`test_devsym.c`, the crash VFS of
//! `test6.c`): every call is forwarded, and for the files under a
//! [`Session`]'s directory it counts the I/O calls (`xRead`, `xWrite`,
//! `xTruncate`, `xSync`) and can
//!
//! - **fail them**: from the N-th counted call on, every one returns an I/O
//!   error (`SQLITE_IOERR_*`, or `SQLITE_FULL` for a write when the fault is
//!   [`Fault::Enospc`]) until [`Session::clear`], as a failing disk does;
//! - **lose power**: it keeps each file's *durable image*, its content as of
//!   its last `xSync` (a file never synced has none; a deleted one loses
//!   its image). [`Session::crash_at`] freezes the images at the N-th
//!   counted call, before that call runs: what a power loss at that moment
//!   leaves on a disk that drops every write since the last sync, the
//!   strictest model a correct database must survive. [`Session::write_crash_image`]
//!   writes those files into another directory, where the store opens as it
//!   would after the reboot.
//!
//! Stores use it through `SqliteOptions::with_vfs(VFS_NAME)`. Files opened
//! outside the session's directory pass through untouched, and one session
//! runs at a time in a process (its guard serialises tests that use it).

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use libsqlite3_sys as ffi;

/// The name the VFS is registered under.
pub const VFS_NAME: &str = "memstore-faults";

/// The error an injected fault reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An I/O error (EIO): `SQLITE_IOERR_READ`, `_WRITE`, `_TRUNCATE` or `_FSYNC`.
    Eio,
    /// A full disk (ENOSPC): `SQLITE_FULL` for writes, I/O errors otherwise.
    Enospc,
}

#[derive(Default)]
struct State {
    /// The session's directory (files below it are watched).
    root: Option<PathBuf>,
    /// Counted I/O calls since the session began.
    calls: u64,
    /// Fail every counted call from this one on.
    fail_from: Option<(u64, Fault)>,
    /// Calls failed so far.
    failed: u64,
    /// Each watched file's content at its last sync.
    durable: HashMap<PathBuf, Vec<u8>>,
    /// Freeze the durable images at this call.
    crash_at: Option<u64>,
    /// The frozen images.
    crash_image: Option<HashMap<PathBuf, Vec<u8>>>,
}

fn state() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE
        .get_or_init(|| Mutex::new(State::default()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The default VFS the shim forwards to, and the shim itself.
struct Registered {
    real: *mut ffi::sqlite3_vfs,
}

// SAFETY: the pointer names SQLite's static default VFS, which lives for
// the process and is safe to use from any thread.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<std::result::Result<Registered, c_int>> = OnceLock::new();

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    match REGISTERED.get() {
        Some(Ok(r)) => r.real,
        _ => std::ptr::null_mut(),
    }
}

/// Registers the VFS (once; later calls return the first result).
pub fn register() -> std::result::Result<(), String> {
    let r = REGISTERED.get_or_init(|| {
        // SAFETY: plain SQLite API calls; the VFS struct is leaked, so it
        // outlives every connection that may use it.
        unsafe {
            let rc = ffi::sqlite3_initialize();
            if rc != ffi::SQLITE_OK {
                return Err(rc);
            }
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            if real.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            let name = CString::new(VFS_NAME).map_err(|_| ffi::SQLITE_ERROR)?;
            let mut vfs: ffi::sqlite3_vfs = std::ptr::read(real);
            vfs.szOsFile = (std::mem::size_of::<ShimFile>() + (*real).szOsFile as usize) as c_int;
            vfs.pNext = std::ptr::null_mut();
            vfs.zName = name.into_raw();
            vfs.pAppData = std::ptr::null_mut();
            vfs.xOpen = Some(shim_open);
            vfs.xDelete = Some(shim_delete);
            vfs.xAccess = Some(shim_access);
            vfs.xFullPathname = Some(shim_full_pathname);
            let vfs = Box::into_raw(Box::new(vfs));
            let rc = ffi::sqlite3_vfs_register(vfs, 0);
            if rc != ffi::SQLITE_OK {
                return Err(rc);
            }
            Ok(Registered { real })
        }
    });
    match r {
        Ok(_) => Ok(()),
        Err(rc) => Err(format!("registering the {VFS_NAME} VFS failed (SQLite code {rc})")),
    }
}

/// A file of the shim: SQLite's header, then the real VFS's file in the
/// same allocation (`szOsFile` covers both).
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// The watched path, or null for a file outside the session.
    path: *mut PathBuf,
}

unsafe fn real_file(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY (caller): `f` is a ShimFile opened by `shim_open`.
    unsafe { (f as *mut u8).add(std::mem::size_of::<ShimFile>()) as *mut ffi::sqlite3_file }
}

unsafe fn watched(f: *mut ffi::sqlite3_file) -> Option<PathBuf> {
    // SAFETY (caller): `f` is a ShimFile opened by `shim_open`.
    let p = unsafe { (*(f as *mut ShimFile)).path };
    if p.is_null() {
        None
    } else {
        Some(unsafe { (*p).clone() })
    }
}

/// What a counted call on `path` must do: fail with a code, or run.
/// Counts the call and freezes the crash image when its moment comes.
fn count(path: &Path, kind: Io) -> Option<c_int> {
    let mut s = state();
    if !s.root.as_ref().is_some_and(|r| path.starts_with(r)) {
        return None;
    }
    s.calls += 1;
    let call = s.calls;
    if s.crash_at == Some(call) && s.crash_image.is_none() {
        s.crash_image = Some(s.durable.clone());
    }
    match s.fail_from {
        Some((from, fault)) if call >= from => {
            s.failed += 1;
            Some(match (kind, fault) {
                (Io::Write, Fault::Enospc) => ffi::SQLITE_FULL,
                (Io::Read, _) => ffi::SQLITE_IOERR_READ,
                (Io::Write, _) => ffi::SQLITE_IOERR_WRITE,
                (Io::Truncate, _) => ffi::SQLITE_IOERR_TRUNCATE,
                (Io::Sync, _) => ffi::SQLITE_IOERR_FSYNC,
            })
        }
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum Io {
    Read,
    Write,
    Truncate,
    Sync,
}

unsafe extern "C" fn shim_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = real_vfs();
    // SAFETY: SQLite hands a buffer of `szOsFile` bytes; the real file
    // lives after the shim's header, and the real VFS opens it.
    unsafe {
        let shim = file as *mut ShimFile;
        (*shim).base.pMethods = std::ptr::null();
        (*shim).path = std::ptr::null_mut();
        let Some(open) = (*real).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let rc = open(real, name, real_file(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if !name.is_null() {
            let path = PathBuf::from(CStr::from_ptr(name).to_string_lossy().into_owned());
            let inside = state().root.as_ref().is_some_and(|r| path.starts_with(r));
            if inside {
                (*shim).path = Box::into_raw(Box::new(path));
            }
        }
        (*shim).base.pMethods = &METHODS;
        rc
    }
}

unsafe extern "C" fn shim_delete(_vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync_dir: c_int) -> c_int {
    let real = real_vfs();
    // SAFETY: forwarded with the real VFS; `name` is a C string.
    unsafe {
        if !name.is_null() {
            let path = PathBuf::from(CStr::from_ptr(name).to_string_lossy().into_owned());
            state().durable.remove(&path);
        }
        match (*real).xDelete {
            Some(f) => f(real, name, sync_dir),
            None => ffi::SQLITE_ERROR,
        }
    }
}

unsafe extern "C" fn shim_access(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let real = real_vfs();
    // SAFETY: forwarded with the real VFS.
    unsafe {
        match (*real).xAccess {
            Some(f) => f(real, name, flags, out),
            None => ffi::SQLITE_ERROR,
        }
    }
}

unsafe extern "C" fn shim_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let real = real_vfs();
    // SAFETY: forwarded with the real VFS.
    unsafe {
        match (*real).xFullPathname {
            Some(f) => f(real, name, n, out),
            None => ffi::SQLITE_ERROR,
        }
    }
}

/// Forwards a method of the real file, or returns `$missing` when the
/// real VFS has none.
macro_rules! forward {
    ($file:expr, $method:ident, $missing:expr $(, $arg:expr)*) => {{
        let real = real_file($file);
        match (*(*real).pMethods).$method {
            Some(m) => m(real $(, $arg)*),
            None => $missing,
        }
    }};
}

unsafe extern "C" fn shim_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `f` is a ShimFile that `shim_open` opened.
    unsafe {
        let rc = forward!(f, xClose, ffi::SQLITE_OK);
        let shim = f as *mut ShimFile;
        if !(*shim).path.is_null() {
            drop(Box::from_raw((*shim).path));
            (*shim).path = std::ptr::null_mut();
        }
        rc
    }
}

unsafe extern "C" fn shim_read(f: *mut ffi::sqlite3_file, buf: *mut c_void, n: c_int, off: i64) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe {
        if let Some(path) = watched(f)
            && let Some(rc) = count(&path, Io::Read)
        {
            return rc;
        }
        forward!(f, xRead, ffi::SQLITE_IOERR_READ, buf, n, off)
    }
}

unsafe extern "C" fn shim_write(f: *mut ffi::sqlite3_file, buf: *const c_void, n: c_int, off: i64) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe {
        if let Some(path) = watched(f)
            && let Some(rc) = count(&path, Io::Write)
        {
            return rc;
        }
        forward!(f, xWrite, ffi::SQLITE_IOERR_WRITE, buf, n, off)
    }
}

unsafe extern "C" fn shim_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe {
        if let Some(path) = watched(f)
            && let Some(rc) = count(&path, Io::Truncate)
        {
            return rc;
        }
        forward!(f, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)
    }
}

unsafe extern "C" fn shim_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe {
        let path = watched(f);
        if let Some(path) = &path
            && let Some(rc) = count(path, Io::Sync)
        {
            return rc;
        }
        let rc = forward!(f, xSync, ffi::SQLITE_IOERR_FSYNC, flags);
        if rc == ffi::SQLITE_OK
            && let Some(path) = path
        {
            // What the sync made durable: the file as it is now.
            match std::fs::read(&path) {
                Ok(bytes) => {
                    state().durable.insert(path, bytes);
                }
                Err(_) => return ffi::SQLITE_IOERR_FSYNC,
            }
        }
        rc
    }
}

unsafe extern "C" fn shim_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xFileSize, ffi::SQLITE_IOERR_FSTAT, size) }
}

unsafe extern "C" fn shim_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xLock, ffi::SQLITE_OK, level) }
}

unsafe extern "C" fn shim_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xUnlock, ffi::SQLITE_OK, level) }
}

unsafe extern "C" fn shim_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xCheckReservedLock, ffi::SQLITE_OK, out) }
}

unsafe extern "C" fn shim_file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xFileControl, ffi::SQLITE_NOTFOUND, op, arg) }
}

unsafe extern "C" fn shim_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xSectorSize, 4096) }
}

unsafe extern "C" fn shim_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xDeviceCharacteristics, 0) }
}

unsafe extern "C" fn shim_shm_map(
    f: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xShmMap, ffi::SQLITE_IOERR_SHMMAP, region, size, extend, out) }
}

unsafe extern "C" fn shim_shm_lock(f: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags) }
}

unsafe extern "C" fn shim_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xShmBarrier, ()) }
}

unsafe extern "C" fn shim_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: forwarded to the real file.
    unsafe { forward!(f, xShmUnmap, ffi::SQLITE_OK, delete) }
}

unsafe extern "C" fn shim_fetch(f: *mut ffi::sqlite3_file, off: i64, n: c_int, out: *mut *mut c_void) -> c_int {
    // SAFETY: no memory-mapped reads through the shim (every read is
    // counted): SQLite falls back to xRead when fetch gives nothing.
    unsafe {
        let _ = (f, off, n);
        *out = std::ptr::null_mut();
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn shim_unfetch(_f: *mut ffi::sqlite3_file, _off: i64, _p: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    xFetch: Some(shim_fetch),
    xUnfetch: Some(shim_unfetch),
};

/// A test's use of the VFS: the files under its directory are watched
/// until it is dropped; one session at a time in a process.
pub struct Session {
    _exclusive: MutexGuard<'static, ()>,
}

impl Session {
    /// Registers the VFS and watches the files under `dir` (an absolute,
    /// canonical path: the one SQLite's file names start with).
    pub fn begin(dir: &Path) -> std::result::Result<Session, String> {
        static EXCLUSIVE: Mutex<()> = Mutex::new(());
        register()?;
        let guard = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
        let root = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        *state() = State {
            root: Some(root),
            ..State::default()
        };
        Ok(Session { _exclusive: guard })
    }

    /// Counted I/O calls so far.
    pub fn calls(&self) -> u64 {
        state().calls
    }

    /// Fails the `n`-th counted call from now (1 = the next) and every one
    /// after it with `fault`, until [`Session::clear`].
    pub fn fail_after(&self, n: u64, fault: Fault) {
        let mut s = state();
        s.fail_from = Some((s.calls + n.max(1), fault));
    }

    /// Calls failed since the session began.
    pub fn failed(&self) -> u64 {
        state().failed
    }

    /// Stops failing calls.
    pub fn clear(&self) {
        state().fail_from = None;
    }

    /// Freezes the durable images at the `n`-th counted call from now (1 =
    /// the next), before it runs.
    pub fn crash_at(&self, n: u64) {
        let mut s = state();
        s.crash_at = Some(s.calls + n.max(1));
        s.crash_image = None;
    }

    /// Whether the crash moment has come.
    pub fn crashed(&self) -> bool {
        state().crash_image.is_some()
    }

    /// Writes the files as a power loss at the crash moment (or now, if it
    /// has not come) leaves them into `dir`, under their names relative to
    /// the session's directory: each file as of its last sync, files never
    /// synced absent. Returns how many files it wrote.
    pub fn write_crash_image(&self, dir: &Path) -> std::io::Result<usize> {
        let (root, image) = {
            let s = state();
            let image = s.crash_image.clone().unwrap_or_else(|| s.durable.clone());
            (s.root.clone().unwrap_or_default(), image)
        };
        let mut written = 0;
        for (path, bytes) in image {
            let Ok(rel) = path.strip_prefix(&root) else { continue };
            let to = dir.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&to, bytes)?;
            written += 1;
        }
        Ok(written)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        *state() = State::default();
    }
}
