//! Putting received bytes on disk: partial files, bounded disk work, the final name.
//!
//! - **Partials live in a private directory**, `OUT/.qpunch-partial/` (mode 0700), named by
//!   us (the offered BLAKE3 hash), never by the peer, and are opened with `O_CREAT|O_EXCL|
//!   O_NOFOLLOW`: a symlink or hard link planted under the expected name is refused, never
//!   written through, in every mode including `--overwrite`. A partial takes its final name
//!   only after size and hash match ([`names::commit_part`]: a no-clobber link, or a rename
//!   that replaces a symlink rather than following it).
//! - **Partials outlive interruptions.** A transfer cut short (connection lost, sender or
//!   receiver interrupted, disk full) keeps its partial when it holds at least one whole
//!   [`GROUP`], so the next attempt resumes; one that proved corrupt is removed. Nothing in
//!   a kept partial is trusted: a resume keeps only the prefix the sender's tree proves.
//! - **One writer per partial.** Every open partial is locked (`flock`), so two receivers
//!   (or two transfers of the same content) never write one file; within a receiver,
//!   [`Claims`] lets a sender that comes back take over its own partial from a transfer
//!   that has not yet noticed its connection died.
//! - **Disk work is bounded.** Writes, hashing, fsync and renames run on tokio's blocking
//!   pool, but only [`DISK_JOBS`] at a time for the whole receiver: a file waiting for
//!   bytes holds a descriptor, not a thread, so a peer dripping one byte a minute into
//!   hundreds of streams pins no threads at all.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, Semaphore, watch};

use super::names;
use super::tree::{GROUP, GroupVerifier, Tree, verified_prefix};
use crate::identity::Fingerprint;

/// Blocking disk jobs running at once, for the whole receiver.
pub const DISK_JOBS: usize = 8;

/// Name of the private directory of partial files inside the output directory.
pub const PARTIAL_DIR: &str = ".qpunch-partial";

/// Bytes between early-writeback requests (see [`Part::write`]).
const WRITEBACK: u64 = 16 << 20;

/// Bytes between background `fdatasync`s of a file being received (see [`Part::sync_due`]).
const SYNC_EVERY: u64 = 32 << 20;

/// Bytes of large files received and queued for the disk, across the whole receiver (see
/// [`super::writer`]): what a disk slower than the network makes us hold beyond the QUIC
/// windows.
pub const DISK_QUEUE: usize = 32 << 20;

/// Runs blocking disk work, at most [`DISK_JOBS`] jobs at a time, and holds the budget of
/// bytes waiting for it ([`DISK_QUEUE`]).
#[derive(Debug, Clone)]
pub(crate) struct Disk {
    slots: Arc<Semaphore>,
    /// Jobs waiting for a slot (see [`Disk::others_waiting`]).
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    queue: Arc<Semaphore>,
    /// Bytes `queue` holds when nothing is queued.
    queue_size: usize,
}

impl Default for Disk {
    fn default() -> Self {
        Disk::with_queue(DISK_QUEUE)
    }
}

impl Disk {
    /// Run `job` on the blocking pool once a slot is free, and wait for it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.spawn(job).await.expect("disk job panicked")
    }

    /// A disk whose queue holds `bytes` at most ([`DISK_QUEUE`] by default).
    pub(crate) fn with_queue(bytes: usize) -> Self {
        Disk {
            slots: Arc::new(Semaphore::new(DISK_JOBS)),
            waiting: Arc::default(),
            queue: Arc::new(Semaphore::new(bytes)),
            queue_size: bytes,
        }
    }

    /// Whether a job is waiting for a slot: a long job then gives its slot back.
    pub(crate) fn others_waiting(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Every job slot, held until the permit is dropped: no job starts meanwhile.
    #[cfg(test)]
    pub(crate) async fn hold_every_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_many_owned(DISK_JOBS as u32)
            .await
            .unwrap()
    }

    /// Room for `bytes` (at most the whole queue) in the receiver's queue for the disk,
    /// given back when the permit is dropped. Cancel-safe.
    pub(crate) async fn queue_room(&self, bytes: usize) -> tokio::sync::OwnedSemaphorePermit {
        debug_assert!(
            bytes <= self.queue_size,
            "a batch larger than the whole queue"
        );
        let bytes = bytes.min(self.queue_size) as u32;
        self.queue
            .clone()
            .acquire_many_owned(bytes)
            .await
            .expect("never closed")
    }

    /// Start `job` (once a slot is free) without waiting: the caller may overlap it with
    /// network reads. The job runs to completion even if the handle is dropped.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            // A free slot (none is free while others wait: permits go to waiters first).
            return tokio::task::spawn_blocking(move || {
                let _slot = slot;
                job()
            });
        }
        let (slots, waiting) = (self.slots.clone(), Waiting::new(&self.waiting));
        tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            drop(waiting);
            tokio::task::spawn_blocking(job)
                .await
                .expect("disk job panicked")
        })
    }
}

/// Counts a job waiting for a slot while it lives (dropped with a job never started too).
struct Waiting(Arc<std::sync::atomic::AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Create (if needed) and check the private partial directory inside `out_dir`.
///
/// It must be a real directory (not a symlink to elsewhere); it is made 0700 so other
/// local users cannot plant files in it.
pub(crate) fn partial_dir(out_dir: &Path) -> io::Result<PathBuf> {
    let dir = out_dir.join(PARTIAL_DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(&dir) {
                Ok(()) => {}
                // Another transfer made it first.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            return partial_dir(out_dir);
        }
        Err(e) => return Err(e),
    }
    Ok(dir)
}

/// Partial names tried per content hash: `HASH.part`, `HASH.1.part`, ...
const PART_NAMES: u32 = 64;

/// The name of the `n`th partial for content `hash`.
fn part_name(hash: &str, n: u32) -> String {
    if n == 0 {
        format!("{hash}.part")
    } else {
        format!("{hash}.{n}.part")
    }
}

/// How a partial's bytes are checked.
enum Check {
    /// A fresh file: hash everything, compare at the end.
    Whole(Box<blake3::Hasher>),
    /// A resumed file: every group against the sender's (root-checked) tree, whose root
    /// (lowercase hex) is the file's hash.
    Groups(Box<GroupVerifier>, String),
}

/// A partial file being written and checked; it holds the partial's lock while it lives.
pub(crate) struct Part {
    file: File,
    path: PathBuf,
    check: Check,
    /// Bytes in the file (where the next write goes).
    written: u64,
    flushed: u64,
    /// Bytes written when the last background sync was handed out.
    synced: u64,
}

impl Part {
    /// Create a fresh, locked partial for content `hash` in `dir`: `HASH.part`, or
    /// `HASH.N.part` when another transfer of the same content holds that one. Never opens
    /// an existing file and never follows a symlink.
    pub(crate) fn create(dir: &Path, hash: &str) -> io::Result<Part> {
        for n in 0..PART_NAMES {
            let path = dir.join(part_name(hash, n));
            match open_exclusive(&path) {
                Ok(file) => {
                    // Another process may have opened and locked it in between: then it
                    // is theirs, and we try the next name.
                    if file.try_lock().is_err() {
                        continue;
                    }
                    return Ok(Part {
                        file,
                        path,
                        check: Check::Whole(Box::new(blake3::Hasher::new())),
                        written: 0,
                        flushed: 0,
                        synced: 0,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "too many partial files for this content",
        ))
    }

    /// Open the existing partial at `path` to resume the file `tree` describes: a regular
    /// file with a single link (never a symlink, never a hard link to something else), not
    /// locked by anyone. Its longest prefix proven by `tree` is kept, the rest cut off, and
    /// the bytes that follow will be checked group by group. `tree` must be trusted.
    pub(crate) fn resume(path: &Path, tree: Arc<Tree>) -> io::Result<Part> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a private regular file",
            ));
        }
        file.try_lock()
            .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "in use by another transfer"))?;
        let keep = verified_prefix(&tree, path)?;
        file.set_len(keep)?;
        let mut file = file;
        file.seek(io::SeekFrom::Start(keep))?;
        let root = tree.root().to_hex().to_string();
        let verifier = GroupVerifier::new(tree, keep).map_err(io::Error::other)?;
        Ok(Part {
            file,
            path: path.to_path_buf(),
            check: Check::Groups(Box::new(verifier), root),
            written: keep,
            flushed: keep,
            synced: keep,
        })
    }

    /// Where the partial is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file: where the stream continues.
    pub(crate) fn offset(&self) -> u64 {
        self.written
    }

    /// Blocking: append `batch`, checking it on the way; every [`WRITEBACK`] bytes ask the
    /// kernel to start writing back, so the final fsync waits for the last stretch only.
    /// A resumed file whose group does not match is cut back to its verified prefix.
    pub(crate) fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        let bad = match &mut self.check {
            Check::Whole(hasher) => {
                hasher.update(batch);
                None
            }
            Check::Groups(verifier, _) => verifier.update(batch).err(),
        };
        if let (Some(e), Check::Groups(verifier, _)) = (bad, &self.check) {
            // Keep what is proven, drop the rest: never write bytes known to be bad.
            let good = (verifier.verified().saturating_sub(self.written) as usize).min(batch.len());
            self.file.write_all(&batch[..good])?;
            self.written += good as u64;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        self.file.write_all(batch)?;
        self.written += batch.len() as u64;
        if self.written - self.flushed >= WRITEBACK {
            start_writeback(&self.file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(())
    }

    /// Once every [`SYNC_EVERY`] bytes: a second handle on the file, for the caller to
    /// `fdatasync` in the background while more bytes arrive.
    ///
    /// Early writeback ([`WRITEBACK`]) only hands pages to the disk; the fsync in
    /// [`finish`](Self::finish) must still wait for the device to make them durable, which
    /// on a virtual disk (whose host caches writes) is a flush of everything written
    /// since the last one: 0.3 s for 256 MiB here, right on the critical path before the
    /// verdict. Syncing as the file arrives leaves that fsync only the last stretch. The
    /// handle shares this partial's open file (and so its lock).
    pub(crate) fn sync_due(&mut self) -> Option<io::Result<File>> {
        if self.written - self.synced < SYNC_EVERY {
            return None;
        }
        self.synced = self.written;
        Some(self.file.try_clone())
    }

    /// Blocking: make the bytes durable (with the owner's execute bit when asked), and
    /// return the hash of the whole file: what was written for a fresh file, or the
    /// tree's root once every group matched for a resumed one (else an empty hash).
    pub(crate) fn finish(self, executable: bool) -> (String, io::Result<()>) {
        let synced = set_executable(&self.file, executable).and_then(|()| self.file.sync_all());
        match self.check {
            Check::Whole(hasher) => (hasher.finalize().to_hex().to_string(), synced),
            Check::Groups(verifier, root) => match verifier.finish() {
                Ok(()) => (root, synced),
                Err(e) => (
                    String::new(),
                    synced.and(Err(io::Error::other(e.to_string()))),
                ),
            },
        }
    }

    /// The hash of what was written so far (for error reports; empty for a resumed file).
    pub(crate) fn hash_so_far(&self) -> String {
        match &self.check {
            Check::Whole(hasher) => hasher.finalize().to_hex().to_string(),
            Check::Groups(..) => String::new(),
        }
    }
}

/// The mode a finished file takes: what any new file gets here (0666, or 0777 for an
/// executable, less the process's umask), like a download or `cp`. Partials stay 0600
/// while they are written; a sender chooses only the execute bit.
fn set_executable(file: &File, executable: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let wanted = if executable { 0o777 } else { 0o666 };
    file.set_permissions(std::fs::Permissions::from_mode(wanted & !umask()))
}

/// The process's umask, read once from `/proc/self/status` (reading it with `umask(2)`
/// means setting it, which races with other threads); 022 where that is not available.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
            })
            .unwrap_or(0o022)
    })
}

/// `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600: only a file we create ourselves.
fn open_exclusive(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW).mode(0o600);
    }
    options.open(path)
}

/// Ask the kernel to start writing back a range (Linux); a no-op elsewhere.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a valid, open descriptor; it only asks the kernel to
        // start writing back a range and touches no memory of ours.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Decides, when a transfer ends early, whether its partial stays for a resume: it stays
/// when at least one whole [`GROUP`] reached it and nothing proved it corrupt. Dropping the
/// guard (a failure, or the transfer's future dropped on Ctrl-C) applies the decision.
pub(crate) struct PartGuard {
    path: Option<PathBuf>,
    keep: bool,
    /// Never kept, however much arrives (a corrupt partial, a stream).
    condemned: bool,
}

impl PartGuard {
    pub(crate) fn new(path: &Path) -> Self {
        PartGuard {
            path: Some(path.to_path_buf()),
            keep: false,
            condemned: false,
        }
    }

    /// `bytes` reached the partial so far: keep it if that is worth resuming.
    pub(crate) fn reached(&mut self, bytes: u64) {
        self.keep = !self.condemned && bytes >= GROUP;
    }

    /// The partial proved corrupt, or can never be resumed (a stream): remove it whatever
    /// its size, now and after whatever else reaches it.
    pub(crate) fn condemn(&mut self) {
        self.keep = false;
        self.condemned = true;
    }

    /// The partial became the final file: nothing to remove.
    pub(crate) fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && !self.keep
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Blocking: move a verified partial to `dest` (see [`names::commit_part`]). Without
/// `overwrite` this is one `renameat2(RENAME_NOREPLACE)` where the file system has it:
/// the same no-clobber guarantee as a link, in one step instead of link and unlink.
pub(crate) fn commit(part: &Path, dest: &Path, overwrite: bool) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !overwrite {
        use std::os::unix::ffi::OsStrExt;
        let (from, to) = (
            std::ffi::CString::new(part.as_os_str().as_bytes())?,
            std::ffi::CString::new(dest.as_os_str().as_bytes())?,
        );
        // SAFETY: two valid NUL-terminated paths; the call only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // Not supported here: fall back to the portable way.
        if !matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
        ) {
            return Err(e);
        }
    }
    names::commit_part(part, dest, overwrite)
}

/// Blocking: flush every dirty page of the file system holding `dir` (`syncfs`), once for
/// a whole batch of small files instead of one fsync each.
pub(crate) fn sync_filesystem(dir: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let dir = File::open(dir)?;
        // SAFETY: a plain syscall on a valid, open descriptor.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        // SAFETY: `sync` takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let _ = dir;
        Ok(())
    }
}

/// A small file verified in memory, to be stored with others of its batch.
pub(crate) struct SmallFile {
    /// Its bytes (hash and size already checked).
    pub(crate) data: bytes::Bytes,
    /// Its BLAKE3, names its partial.
    pub(crate) hash: String,
    /// Where it goes.
    pub(crate) dest: PathBuf,
    /// Owner's execute bit.
    pub(crate) executable: bool,
}

/// A small file written and not yet named.
pub(crate) enum Written {
    /// A partial in the partial folder, renamed into place by [`commit_small`].
    Named(PathBuf),
    /// An unnamed file (`O_TMPFILE`) in its destination's folder (`dir`, held open),
    /// given its name by [`commit_small`] with `linkat`.
    Unnamed {
        file: File,
        dir: Arc<std::os::fd::OwnedFd>,
    },
}

impl Written {
    /// Blocking: let it go without a name (a partial is removed).
    pub(crate) fn discard(self) {
        if let Written::Named(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Blocking: the first half of storing a batch of verified small files. Each is written
/// unnamed in its destination folder (`O_TMPFILE`, where the file system has it): no name
/// exists until [`commit_small`] links it, a crash leaves nothing behind, and creating
/// files spreads over their own folders instead of every disk job taking the lock of one
/// shared partial folder (which cost receivers of many small files most of their time in
/// the kernel, contending for that folder's lock). Elsewhere each is written to a fresh
/// partial (no lock: small files are never resumed, so nothing else opens them). Not
/// durable yet: the caller makes the batch durable with one `syncfs`, then calls
/// [`commit_small`].
pub(crate) fn write_small(partial_dir: &Path, files: &[SmallFile]) -> Vec<io::Result<Written>> {
    let mut folders = Folders::new(partial_dir);
    files
        .iter()
        .map(|f| {
            if let Some(unnamed) = unnamed_in(&f.dest, &mut folders) {
                let (mut file, dir) = unnamed?;
                file.write_all(&f.data)?;
                // Created with 0666 less the umask: only an executable needs a change.
                if f.executable {
                    set_executable(&file, true)?;
                }
                return Ok(Written::Unnamed { file, dir });
            }
            let (mut file, path) = create_unlocked(partial_dir, &f.hash)?;
            let written = file
                .write_all(&f.data)
                .and_then(|()| set_executable(&file, f.executable));
            drop(file);
            written
                .map(|()| Written::Named(path.clone()))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&path);
                })
        })
        .collect()
}

/// An unnamed file in `dest`'s folder (and that folder, open), or `None` where that
/// cannot be done (no `O_TMPFILE` on this file system, no `/proc` to link it through,
/// too few descriptors for a batch to hold, or a folder on another file system than the
/// partial folder, which the batch's `syncfs` would not cover): then the caller uses a
/// named partial.
fn unnamed_in(
    dest: &Path,
    folders: &mut Folders,
) -> Option<io::Result<(File, Arc<std::os::fd::OwnedFd>)>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::{AsRawFd, FromRawFd};
        if !unnamed_files_work() {
            return None;
        }
        let dir = folders.open(dest.parent()?)?;
        // Unnamed, so never visible half-written: the final mode from the start. Opened
        // relative to the folder, so the kernel walks no path per file.
        // SAFETY: a valid descriptor and a NUL-terminated path; the call only reads them.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c".".as_ptr(),
                libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
                0o666 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just opened and is owned by nothing else.
            return Some(Ok((unsafe { File::from_raw_fd(fd) }, dir)));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT) => None,
            _ => Some(Err(e)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (dest, folders);
        None
    }
}

/// The destination folders of one batch, each opened once (`O_PATH`) and checked to be
/// on the partial folder's file system.
struct Folders {
    device: Option<u64>,
    open: HashMap<PathBuf, Option<Arc<std::os::fd::OwnedFd>>>,
}

impl Folders {
    fn new(partial_dir: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        Folders {
            device: std::fs::metadata(partial_dir).ok().map(|m| m.dev()),
            open: HashMap::new(),
        }
    }

    /// `dir`, open, if it is on the partial folder's file system (unknown counts as no).
    #[cfg(target_os = "linux")]
    fn open(&mut self, dir: &Path) -> Option<Arc<std::os::fd::OwnedFd>> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let device = self.device;
        if let Some(known) = self.open.get(dir) {
            return known.clone();
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .ok()
            .filter(|folder| {
                let here = folder.metadata().ok().map(|m| m.dev());
                here.is_some() && here == device
            })
            .map(|folder| Arc::new(std::os::fd::OwnedFd::from(folder)));
        self.open.insert(dir.to_path_buf(), opened.clone());
        opened
    }
}

/// Whether unnamed files can be used: `/proc/self/fd` to link them through, and a
/// descriptor limit that lets the disk jobs hold a batch each (a batch keeps its files
/// open until they are linked).
fn unnamed_files_work() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit for the call to fill in.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        let wanted = (DISK_JOBS * super::BUNDLE_FILES * 2) as libc::rlim_t;
        got && limit.rlim_cur >= wanted && Path::new("/proc/self/fd").is_dir()
    })
}

/// Blocking: the second half, once the batch is durable ([`SyncGate`]): each takes its
/// final name. An unnamed file that cannot is simply closed (nothing is left); a partial
/// that cannot is removed.
pub(crate) fn commit_small(
    written: Vec<io::Result<Written>>,
    files: &[SmallFile],
    overwrite: bool,
) -> Vec<io::Result<()>> {
    written
        .into_iter()
        .zip(files)
        .map(|(slot, file)| match slot? {
            Written::Named(path) => commit(&path, &file.dest, overwrite).inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            }),
            Written::Unnamed { file: unnamed, dir } => {
                let name = file.dest.file_name().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "a destination without a name")
                })?;
                link_unnamed(&unnamed, &dir, name, overwrite)
            }
        })
        .collect()
}

/// Give the unnamed `file` the name `name` in the folder `dir` (never replacing an
/// existing file unless `overwrite`: then through a fresh name in the same folder,
/// renamed over it).
fn link_unnamed(
    file: &File,
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    overwrite: bool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let dir = dir.as_raw_fd();
    let cstr = |name: &std::ffi::OsStr| std::ffi::CString::new(name.as_bytes());
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let link = |to: &std::ffi::CStr| -> io::Result<()> {
        // The descriptor itself (Linux 6.10 lets the opener do this without privilege),
        // else its `/proc` link.
        #[cfg(target_os = "linux")]
        {
            use std::sync::atomic::{AtomicBool, Ordering};
            static NO_EMPTY_PATH: AtomicBool = AtomicBool::new(false);
            if !NO_EMPTY_PATH.load(Ordering::Relaxed) {
                // SAFETY: valid descriptors and NUL-terminated paths; the call only reads them.
                let rc = unsafe {
                    libc::linkat(
                        file.as_raw_fd(),
                        c"".as_ptr(),
                        dir,
                        to.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                };
                match check(rc) {
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
                        NO_EMPTY_PATH.store(true, Ordering::Relaxed);
                    }
                    done => return done,
                }
            }
        }
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        // SAFETY: valid descriptors and NUL-terminated paths; the call only reads them.
        check(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                dir,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })
    };
    let to = cstr(name)?;
    if !overwrite {
        return link(&to);
    }
    for _ in 0..PART_NAMES {
        let random: u64 = rand::random();
        let temp = cstr(std::ffi::OsStr::new(&format!(".qpunch-{random:016x}.tmp")))?;
        match link(&temp) {
            Ok(()) => {
                // SAFETY: a valid descriptor and NUL-terminated paths; the call only reads them.
                return check(unsafe { libc::renameat(dir, temp.as_ptr(), dir, to.as_ptr()) })
                    .inspect_err(|_| {
                        // SAFETY: as above.
                        unsafe { libc::unlinkat(dir, temp.as_ptr(), 0) };
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

/// A fresh partial for content `hash`, not locked (see [`write_small`]).
fn create_unlocked(dir: &Path, hash: &str) -> io::Result<(File, PathBuf)> {
    for n in 0..PART_NAMES {
        let path = dir.join(part_name(hash, n));
        match open_exclusive(&path) {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "too many partial files for this content",
    ))
}

/// Group commit for the file system of the output directory: every batch of small files
/// needs a `syncfs` after its writes and before its files take their names, but batches
/// finishing together share one. A batch takes a ticket once its writes are done; any
/// `syncfs` that starts after that covers it.
#[derive(Debug, Default)]
pub(crate) struct SyncGate {
    requested: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
    turn: tokio::sync::Mutex<()>,
}

impl SyncGate {
    /// Make everything written before this call on the file system of `dir` durable.
    /// Cancel-safe: waiting for a turn or a disk job loses nothing.
    pub(crate) async fn sync(&self, disk: &Disk, dir: &Path) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.requested.fetch_add(1, SeqCst) + 1;
        let _turn = self.turn.lock().await;
        if self.completed.load(SeqCst) >= ticket {
            return Ok(()); // a syncfs that started after our writes has finished
        }
        // Every ticket taken so far had its writes done before it was taken.
        let covered = self.requested.load(SeqCst);
        let dir = dir.to_path_buf();
        disk.run(move || sync_filesystem(&dir)).await?;
        self.completed.fetch_max(covered, SeqCst);
        Ok(())
    }
}

/// Blocking: the folder `components` below `out`, created where missing. Every level must
/// be a real directory: a symlink (or a file) in the way is an error, never followed.
/// Also says whether the folder itself was created by this call (so it holds nothing yet).
pub(crate) fn make_dirs(out: &Path, components: &[String]) -> io::Result<(PathBuf, bool)> {
    let mut dir = out.to_path_buf();
    let mut created = false;
    for part in components {
        dir.push(part);
        created = match std::fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a folder", names::display_safe(part)),
            ));
        }
    }
    Ok((dir, created))
}

/// Blocking: the content hashes that have a partial in `dir` (for resume decisions).
pub(crate) fn partial_hashes(dir: &Path) -> io::Result<std::collections::HashSet<String>> {
    let mut hashes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((hash, _)) = name.split_once('.')
            && name.ends_with(".part")
            && super::is_hash_hex(hash)
        {
            hashes.insert(hash.to_string());
        }
    }
    Ok(hashes)
}

/// Blocking: the existing partials for content `hash` in `dir`, in name order.
pub(crate) fn partials_for(dir: &Path, hash: &str) -> Vec<PathBuf> {
    (0..PART_NAMES)
        .map(|n| dir.join(part_name(hash, n)))
        .filter(|path| std::fs::symlink_metadata(path).is_ok())
        .collect()
}

/// What [`clean_partials`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    /// Partial files removed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Blocking: remove the partial files in `out_dir`'s [`PARTIAL_DIR`] not modified for
/// `max_age` (all of them with `Duration::ZERO`, as `receive --clean` does), except those
/// a running transfer holds locked. Anything else found there (a symlink, a folder) is
/// not ours and is removed too when it is a symlink, left alone otherwise.
pub fn clean_partials(out_dir: &Path, max_age: Duration) -> io::Result<Cleaned> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = partial_dir(out_dir)?;
    let now = SystemTime::now();
    let mut cleaned = Cleaned::default();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            std::fs::remove_file(&path)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < max_age {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // a transfer in progress
        }
        std::fs::remove_file(&path)?;
        cleaned.files += 1;
        cleaned.bytes += meta.len();
    }
    Ok(cleaned)
}

/// Partials in use by this receiver's transfers, by path, with the sender that writes
/// each. Locks keep other processes out; this lets a sender that comes back (it was
/// killed, its network dropped) take over its own partial at once, instead of waiting for
/// the transfer that still holds it to notice its connection died.
#[derive(Debug, Default)]
pub(crate) struct Claims(Mutex<HashMap<PathBuf, Holder>>);

/// Who writes a partial: a sender, on one of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// The sender's key.
    pub(crate) sender: Fingerprint,
    /// Its connection (`stable_id`): a takeover comes from another one.
    pub(crate) connection: usize,
}

impl Owner {
    /// Whether `self` may take a partial over from `holder`: the same sender, come back
    /// on a new connection (never two files of one connection, which may share content).
    fn succeeds(&self, holder: &Owner) -> bool {
        self.sender == holder.sender && self.connection != holder.connection
    }
}

#[derive(Debug)]
struct Holder {
    owner: Owner,
    cancel: Arc<Notify>,
    released: watch::Receiver<()>,
}

/// One transfer's hold on a partial path; released on drop.
#[derive(Debug)]
pub(crate) struct Claim {
    claims: Arc<Claims>,
    path: PathBuf,
    cancel: Arc<Notify>,
    _released: watch::Sender<()>,
}

impl Claim {
    /// Resolves when a later transfer from the same sender asked for this partial.
    /// Cancel-safe: it only waits for a notification.
    pub(crate) async fn taken_over(&self) {
        self.cancel.notified().await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.lock().remove(&self.path);
    }
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Holder>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `path` for `owner`, if no transfer of this receiver holds it. A transfer of
    /// the same sender on an earlier connection that holds it is asked to stop, and
    /// waited for up to `wait`.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        path: &Path,
        owner: Owner,
        wait: Duration,
    ) -> Option<Claim> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut released = {
                let mut held = self.lock();
                match held.get(path) {
                    None => return Some(self.insert(&mut held, path, owner)),
                    Some(holder) if owner.succeeds(&holder.owner) => {
                        holder.cancel.notify_one();
                        holder.released.clone()
                    }
                    Some(_) => return None,
                }
            };
            // Resolves (with an error) when the holder's claim is dropped.
            if tokio::time::timeout_at(deadline, released.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Ask the transfers of `owner`'s sender on earlier connections that hold partials of
    /// content `hash` to stop, and wait (until `deadline` at most) until they let go: a
    /// sender that comes back gets its partial, and the names its dead transfer had
    /// reserved, without waiting for a timeout.
    pub(crate) async fn take_back(&self, hash: &str, owner: Owner, deadline: tokio::time::Instant) {
        let waiting: Vec<watch::Receiver<()>> = self
            .lock()
            .iter()
            .filter(|(path, holder)| {
                owner.succeeds(&holder.owner)
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(hash))
            })
            .map(|(_, holder)| {
                holder.cancel.notify_one();
                holder.released.clone()
            })
            .collect();
        for mut released in waiting {
            // Resolves (with an error) when the holder's claim is dropped.
            let _ = tokio::time::timeout_at(deadline, released.changed()).await;
        }
    }

    /// Claim a path just created by this transfer (nobody else can hold it).
    pub(crate) fn claim_new(self: &Arc<Self>, path: &Path, owner: Owner) -> Claim {
        let mut held = self.lock();
        self.insert(&mut held, path, owner)
    }

    fn insert(
        self: &Arc<Self>,
        held: &mut HashMap<PathBuf, Holder>,
        path: &Path,
        owner: Owner,
    ) -> Claim {
        let cancel = Arc::new(Notify::new());
        let (tx, rx) = watch::channel(());
        held.insert(
            path.to_path_buf(),
            Holder {
                owner,
                cancel: cancel.clone(),
                released: rx,
            },
        );
        Claim {
            claims: self.clone(),
            path: path.to_path_buf(),
            cancel,
            _released: tx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(dest: &Path, data: &[u8], executable: bool) -> SmallFile {
        SmallFile {
            data: bytes::Bytes::copy_from_slice(data),
            hash: blake3::hash(data).to_hex().to_string(),
            dest: dest.to_path_buf(),
            executable,
        }
    }

    /// Small files are written without a name in their own folder, take their names only
    /// when committed, never replace a file unless asked to, and leave nothing behind.
    #[test]
    fn small_files_are_named_only_when_committed_and_replace_only_when_asked() {
        use std::os::unix::fs::PermissionsExt;
        let out = tempfile::tempdir().unwrap();
        let partials = partial_dir(out.path()).unwrap();
        let folder = out.path().join("docs");
        std::fs::create_dir(&folder).unwrap();
        let (a, b, c) = (folder.join("a"), folder.join("b"), folder.join("c"));
        std::fs::write(&b, b"precious").unwrap();
        std::fs::write(&c, b"old").unwrap();
        let files = [
            small(&a, b"first", true),
            small(&b, b"second", false),
            small(&c, b"third", false),
        ];
        let written = write_small(&partials, &files);
        let unnamed = written
            .iter()
            .filter(|w| matches!(w, Ok(Written::Unnamed { .. })))
            .count();
        let mut names: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["b", "c"], "nothing is named before the commit");
        if unnamed == 0 {
            eprintln!("no O_TMPFILE here: named partials were used");
        }
        let committed = commit_small(written, &files, false);
        assert!(committed[0].is_ok(), "{committed:?}");
        assert_eq!(std::fs::read(&a).unwrap(), b"first");
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o100, 0o100, "executable for its owner: {mode:o}");
        let refused = committed[1].as_ref().unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists, "{refused}");
        assert_eq!(std::fs::read(&b).unwrap(), b"precious", "never replaced");

        // Asked to overwrite: replaced, through no name left behind.
        let again = [small(&c, b"new", false)];
        let committed = commit_small(write_small(&partials, &again), &again, true);
        assert!(committed[0].is_ok(), "{committed:?}");
        assert_eq!(std::fs::read(&c).unwrap(), b"new");
        let mut left: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a", "b", "c"]);
        assert_eq!(std::fs::read_dir(&partials).unwrap().count(), 0);
    }

    #[test]
    fn partials_never_follow_or_reuse_what_is_there() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let victim = out.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("abc.part")).unwrap();
        let mut part = Part::create(&dir, "abc").unwrap();
        assert_eq!(part.path(), dir.join("abc.1.part"));
        part.write(b"new").unwrap();
        let (hash, synced) = part.finish(false);
        synced.unwrap();
        assert_eq!(hash, blake3::hash(b"new").to_hex().as_str());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    /// A background sync is handed out once per [`SYNC_EVERY`] bytes, for the partial
    /// itself, and the bytes stay what was written.
    #[test]
    fn background_syncs_come_every_few_megabytes_on_the_locked_file() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let mut part = Part::create(&dir, "abc").unwrap();
        let block = bytes::Bytes::from(vec![5u8; 1 << 20]);
        let mut handles = 0;
        for _ in 0..(SYNC_EVERY >> 20) * 2 + 1 {
            part.write(&block).unwrap();
            if let Some(file) = part.sync_due() {
                handles += 1;
                assert_eq!(part.offset() % SYNC_EVERY, 0);
                let file = file.unwrap();
                file.sync_data().unwrap();
                use std::os::unix::fs::MetadataExt;
                let ino = std::fs::metadata(part.path()).unwrap().ino();
                assert_eq!(file.metadata().unwrap().ino(), ino);
            }
        }
        assert_eq!(handles, 2);
        assert!(part.sync_due().is_none());
        let (hash, synced) = part.finish(false);
        synced.unwrap();
        let whole = vec![5u8; ((SYNC_EVERY >> 20) * 2 + 1) as usize * (1 << 20)];
        assert_eq!(hash, blake3::hash(&whole).to_hex().as_str());
    }

    #[test]
    fn clean_removes_old_partials_but_never_one_in_use() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let old = dir.join("old.part");
        std::fs::write(&old, b"stale").unwrap();
        let week_ago = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(week_ago)
            .unwrap();
        std::fs::write(dir.join("new.part"), b"fresh").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("planted.part")).unwrap();
        let busy = Part::create(&dir, "busy").unwrap();
        File::options()
            .write(true)
            .open(busy.path())
            .unwrap()
            .set_modified(week_ago)
            .unwrap();

        let cleaned = clean_partials(out.path(), Duration::from_secs(7 * 24 * 3600)).unwrap();
        assert_eq!(cleaned, Cleaned { files: 1, bytes: 5 });
        let left = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(left(&dir), ["busy.part", "new.part"], "symlinks go too");
        // --clean: everything not in use.
        clean_partials(out.path(), Duration::ZERO).unwrap();
        assert_eq!(left(&dir), ["busy.part"], "a locked partial is in use");
        drop(busy);
        clean_partials(out.path(), Duration::ZERO).unwrap();
        assert!(left(&dir).is_empty());
    }

    #[test]
    fn partial_dir_is_private_and_must_be_a_directory() {
        use std::os::unix::fs::PermissionsExt;
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let other = tempfile::tempdir().unwrap();
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(other.path(), &dir).unwrap();
        assert!(
            partial_dir(out.path()).is_err(),
            "a symlinked partial dir is refused"
        );
    }
}
