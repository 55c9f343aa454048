//! Putting received bytes on disk: partial files, bounded disk work, the final name.
//!
//! - **Partials live in a private directory**, `OUT/.qpunch-partial/` (mode 0700), named by
//!   us (the offered BLAKE3 hash), never by the peer, and are opened with `O_CREAT|O_EXCL|
//!   O_NOFOLLOW`: a symlink or hard link planted under the expected name is refused, never
//!   written through, in every mode including `--overwrite`. A partial takes its final name
//!   only after size and hash match ([`names::commit_part`]: a no-clobber link, or a rename
//!   that replaces a symlink rather than following it).
//! - **Disk work is bounded.** Writes, hashing, fsync and renames run on tokio's blocking
//!   pool, but only [`DISK_JOBS`] at a time for the whole receiver: a file waiting for
//!   bytes holds a descriptor, not a thread, so a peer dripping one byte a minute into
//!   hundreds of streams pins no threads at all.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::names;

/// Blocking disk jobs running at once, for the whole receiver.
pub const DISK_JOBS: usize = 8;

/// Name of the private directory of partial files inside the output directory.
pub const PARTIAL_DIR: &str = ".qpunch-partial";

/// Bytes between early-writeback requests (see [`Part::write`]).
const WRITEBACK: u64 = 16 << 20;

/// Runs blocking disk work, at most [`DISK_JOBS`] jobs at a time.
#[derive(Debug, Clone)]
pub(crate) struct Disk(Arc<Semaphore>);

impl Default for Disk {
    fn default() -> Self {
        Disk(Arc::new(Semaphore::new(DISK_JOBS)))
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

    /// Start `job` (once a slot is free) without waiting: the caller may overlap it with
    /// network reads. The job runs to completion even if the handle is dropped.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let slots = self.0.clone();
        tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            tokio::task::spawn_blocking(job)
                .await
                .expect("disk job panicked")
        })
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

/// A partial file being written and hashed.
pub(crate) struct Part {
    file: File,
    path: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
    flushed: u64,
    buf: Vec<u8>,
}

impl Part {
    /// Create a fresh partial for content `hash` in `dir`: `HASH.part`, or `HASH.N.part`
    /// when another transfer of the same content is in progress. Never opens an existing
    /// file and never follows a symlink.
    pub(crate) fn create(dir: &Path, hash: &str) -> io::Result<Part> {
        for n in 0..64u32 {
            let name = if n == 0 {
                format!("{hash}.part")
            } else {
                format!("{hash}.{n}.part")
            };
            let path = dir.join(name);
            match open_exclusive(&path) {
                Ok(file) => {
                    return Ok(Part {
                        file,
                        path,
                        hasher: blake3::Hasher::new(),
                        written: 0,
                        flushed: 0,
                        buf: Vec::new(),
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

    /// Where the partial is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Blocking: append `batch`, hashing it on the way; every [`WRITEBACK`] bytes ask the
    /// kernel to start writing back, so the final fsync waits for the last stretch only.
    pub(crate) fn write(&mut self, batch: &[bytes::Bytes]) -> io::Result<()> {
        // One contiguous buffer: BLAKE3's SIMD and the disk both prefer large runs.
        self.buf.clear();
        for bytes in batch {
            self.buf.extend_from_slice(bytes);
        }
        self.hasher.update(&self.buf);
        self.file.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        if self.written - self.flushed >= WRITEBACK {
            start_writeback(&self.file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(())
    }

    /// Blocking: make the bytes durable, and return the hash of everything written.
    pub(crate) fn finish(self) -> (String, io::Result<()>) {
        let synced = self.file.sync_all();
        (self.hasher.finalize().to_hex().to_string(), synced)
    }

    /// The hash of what was written so far (for error reports).
    pub(crate) fn hash_so_far(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
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

/// Deletes a partial file when dropped, unless disarmed: no partial outlives a failed or
/// interrupted transfer (including this future being dropped on Ctrl-C).
pub(crate) struct PartGuard(Option<PathBuf>);

impl PartGuard {
    pub(crate) fn new(path: &Path) -> Self {
        PartGuard(Some(path.to_path_buf()))
    }

    /// The partial became the final file: keep it.
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Blocking: move a verified partial to `dest` (see [`names::commit_part`]).
pub(crate) fn commit(part: &Path, dest: &Path, overwrite: bool) -> io::Result<()> {
    names::commit_part(part, dest, overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_never_follow_or_reuse_what_is_there() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let victim = out.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("abc.part")).unwrap();
        let mut part = Part::create(&dir, "abc").unwrap();
        assert_eq!(part.path(), dir.join("abc.1.part"));
        part.write(&[bytes::Bytes::from_static(b"new")]).unwrap();
        let (hash, synced) = part.finish();
        synced.unwrap();
        assert_eq!(hash, blake3::hash(b"new").to_hex().as_str());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
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
