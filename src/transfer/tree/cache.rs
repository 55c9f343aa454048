//! An on-disk cache of [`Tree`]s, so sending the same file again does not hash it again.
//!
//! One file per entry, named after a hash of its [`FileKey`]. An entry is
//! `MAGIC | key length (u32 BE) | key | encoded tree | BLAKE3 of all that`, written to a
//! temporary file and renamed into place, so readers see a whole entry or none. It is not
//! fsynced: an entry torn by a crash fails its checksum and is simply not used. Nothing in
//! an entry is trusted until its length, format, checksum, key and size all agree; a bad
//! entry is counted, deleted and treated as a miss.
//!
//! The cache stays small: entries above [`TreeCache::MAX_ENTRY_BYTES`] are not stored, and
//! after each store the least recently used entries (by modification time, refreshed on
//! every hit) go until at most [`TreeCache::MAX_ENTRIES`] entries and
//! [`TreeCache::MAX_TOTAL_BYTES`] remain.

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use super::{Tree, hash::hash_file};

/// First bytes of every entry (format version 1).
const MAGIC: &[u8; 8] = b"qptree\x00\x01";
/// Bytes of the fields of a key before its path.
const KEY_FIXED: usize = 8 * 7;
/// Entry file names end so; temporary files start with [`TEMP_PREFIX`].
const SUFFIX: &str = ".tree";
const TEMP_PREFIX: &str = ".tmp-";
/// Temporary files older than this were left by a crash: removed when evicting.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// One version of one file, as far as the file system can tell: a cached tree is used only
/// when every field is still the same.
///
/// The modification time alone is not enough: `cp --preserve=timestamps`, `rsync -t` or
/// `touch -r` can rewrite a file in place and put its old mtime back. The change time
/// (ctime) cannot be set by such tools, so it is part of the key too; the cost is that a
/// `chmod` also makes the next send hash the file again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileKey {
    /// Canonical path (symbolic links and `..` resolved).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
    /// Status change time: seconds and nanoseconds since the epoch.
    pub ctime: (i64, i64),
    /// Inode number.
    pub inode: u64,
    /// Device the inode lives on.
    pub device: u64,
}

impl FileKey {
    /// The key of the file at `path` now.
    pub fn of(path: &Path) -> io::Result<FileKey> {
        let canonical = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&canonical)?;
        Ok(Self::from_metadata(canonical, &meta))
    }

    /// The key of a file whose canonical path and metadata are known (for example from
    /// the open file, so the key describes what is actually read).
    pub fn from_metadata(canonical: PathBuf, meta: &Metadata) -> FileKey {
        FileKey {
            path: canonical,
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }

    /// Unambiguous bytes: fixed-width fields, then the path.
    fn encode(&self) -> Vec<u8> {
        let path = self.path.as_os_str().as_bytes();
        let mut out = Vec::with_capacity(KEY_FIXED + path.len());
        for field in [self.size, self.inode, self.device] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        for field in [self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(path);
        out
    }

    /// The entry's file name: a hash, so any path maps to a short, harmless name.
    fn file_name(&self) -> String {
        let id = blake3::hash(&self.encode()).to_hex();
        format!("{}{SUFFIX}", &id[..32])
    }
}

/// What a [`TreeCache`] did since it was opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found no usable entry (corrupt ones included).
    pub misses: u64,
    /// Entries found damaged, truncated or belonging to another key: deleted, not used.
    pub corrupt: u64,
    /// Entries written.
    pub stored: u64,
    /// Entries removed to respect the limits.
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    stored: AtomicU64,
    evicted: AtomicU64,
}

/// Trees of files already hashed, kept in a directory (`<qpunch home>/cache`).
#[derive(Debug)]
pub struct TreeCache {
    dir: PathBuf,
    max_entries: usize,
    max_bytes: u64,
    counters: Counters,
}

impl TreeCache {
    /// Most entries kept by default.
    pub const MAX_ENTRIES: usize = 1000;
    /// Largest entry stored: the tree of a 512 GiB file. Larger files are hashed every time.
    pub const MAX_ENTRY_BYTES: u64 = 64 << 20;
    /// Most bytes all entries may take together by default.
    pub const MAX_TOTAL_BYTES: u64 = 256 << 20;

    /// A cache in `dir` (created if missing) with the default limits.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<TreeCache> {
        Self::with_limits(dir, Self::MAX_ENTRIES, Self::MAX_TOTAL_BYTES)
    }

    /// A cache in `dir` keeping at most `max_entries` entries of `max_bytes` in total
    /// (each entry still at most [`TreeCache::MAX_ENTRY_BYTES`]).
    pub fn with_limits(
        dir: impl Into<PathBuf>,
        max_entries: usize,
        max_bytes: u64,
    ) -> io::Result<TreeCache> {
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(TreeCache {
            dir,
            max_entries,
            max_bytes,
            counters: Counters::default(),
        })
    }

    /// The tree of the file at `path`: from the cache when this version of the file was
    /// hashed before, else hashed ([`Tree::from_file`]'s bounded memory) and stored.
    ///
    /// The key is taken from the open file before and after hashing; a file that changed
    /// meanwhile is an error rather than a tree of half old, half new bytes. A cache that
    /// cannot be written only costs the next send a re-hash.
    pub fn tree(&self, path: &Path) -> io::Result<Tree> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let canonical = std::fs::canonicalize(path).map_err(context)?;
        let file = File::open(&canonical).map_err(context)?;
        let meta = file.metadata().map_err(context)?;
        if !meta.is_file() {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
            return Err(context(e));
        }
        let key = FileKey::from_metadata(canonical, &meta);
        if let Some(tree) = self.get(&key) {
            return Ok(tree);
        }
        let tree = hash_file(&file, key.size).map_err(context)?;
        let after = FileKey::from_metadata(key.path.clone(), &file.metadata().map_err(context)?);
        if after != key {
            let e = io::Error::other("the file changed while it was being hashed");
            return Err(context(e));
        }
        if let Err(e) = self.put(&key, &tree) {
            tracing::warn!(cache = %self.dir.display(), "cannot store a hash tree: {e}");
        }
        Ok(tree)
    }

    /// The cached tree of `path` as it is now, without hashing it on a miss: what a
    /// sender uses to offer a hash it already knows, while a first send is hashed as it
    /// goes.
    pub fn lookup(&self, path: &Path) -> io::Result<Option<Tree>> {
        let canonical = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&canonical)?;
        Ok(self.get(&FileKey::from_metadata(canonical, &meta)))
    }

    /// The cached tree of exactly this version of a file, if there is a sound one.
    /// Unreadable or corrupt entries count as misses (corrupt ones are also deleted).
    pub fn get(&self, key: &FileKey) -> Option<Tree> {
        let path = self.dir.join(key.file_name());
        let found = match read_entry(&path) {
            Ok(bytes) => match parse_entry(&bytes, key) {
                Ok(tree) => Some(tree),
                Err(why) => {
                    tracing::debug!(entry = %path.display(), "ignoring a bad cache entry: {why}");
                    self.counters.corrupt.fetch_add(1, Relaxed);
                    let _ = std::fs::remove_file(&path);
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::debug!(entry = %path.display(), "cannot read a cache entry: {e}");
                None
            }
        };
        match &found {
            Some(_) => {
                self.counters.hits.fetch_add(1, Relaxed);
                // Recently used: the last to be evicted. Best effort.
                if let Ok(f) = File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
            }
            None => {
                self.counters.misses.fetch_add(1, Relaxed);
            }
        }
        found
    }

    /// Store `tree` as the tree of `key`'s file version, atomically. Returns false when the
    /// entry would exceed [`TreeCache::MAX_ENTRY_BYTES`] or the cache's total, and so was not stored.
    pub fn put(&self, key: &FileKey, tree: &Tree) -> io::Result<bool> {
        if tree.size() != key.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the tree is not of this file's size",
            ));
        }
        let entry = build_entry(key, tree);
        if entry.len() as u64 > Self::MAX_ENTRY_BYTES.min(self.max_bytes) {
            return Ok(false);
        }
        let mut temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)?;
        temp.write_all(&entry)?;
        temp.persist(self.dir.join(key.file_name()))
            .map_err(|e| e.error)?;
        self.counters.stored.fetch_add(1, Relaxed);
        self.evict()?;
        Ok(true)
    }

    /// Counters since this cache was opened.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            corrupt: c.corrupt.load(Relaxed),
            stored: c.stored.load(Relaxed),
            evicted: c.evicted.load(Relaxed),
        }
    }

    /// Remove least recently used entries beyond the limits, and stale temporary files.
    fn evict(&self) -> io::Result<()> {
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for item in std::fs::read_dir(&self.dir)? {
            let Ok(item) = item else { continue };
            let name = item.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = item.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.starts_with(TEMP_PREFIX) {
                if now.duration_since(modified).unwrap_or_default() > STALE_TEMP {
                    let _ = std::fs::remove_file(item.path());
                }
            } else if name.ends_with(SUFFIX) && meta.is_file() {
                entries.push((modified, meta.len(), item.path()));
            }
        }
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut total = 0u64;
        for (kept, (_, len, path)) in entries.iter().enumerate() {
            total = total.saturating_add(*len);
            if kept >= self.max_entries || total > self.max_bytes {
                if std::fs::remove_file(path).is_ok() {
                    self.counters.evicted.fetch_add(1, Relaxed);
                }
                total -= len;
            }
        }
        Ok(())
    }
}

fn build_entry(key: &FileKey, tree: &Tree) -> Vec<u8> {
    let key = key.encode();
    let mut entry = Vec::new();
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(&(key.len() as u32).to_be_bytes());
    entry.extend_from_slice(&key);
    entry.extend_from_slice(&tree.encode());
    let sum = blake3::hash(&entry);
    entry.extend_from_slice(sum.as_bytes());
    entry
}

/// Read an entry, but never more than [`TreeCache::MAX_ENTRY_BYTES`] (+1, to notice a
/// longer one).
fn read_entry(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(TreeCache::MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The tree in `entry`, if it is a whole, intact entry for exactly `key`.
fn parse_entry(entry: &[u8], key: &FileKey) -> Result<Tree, &'static str> {
    if entry.len() as u64 > TreeCache::MAX_ENTRY_BYTES {
        return Err("too large");
    }
    let (body, sum) = entry
        .split_last_chunk::<32>()
        .ok_or("shorter than a checksum")?;
    if blake3::hash(body) != *sum {
        return Err("checksum mismatch");
    }
    let rest = body.strip_prefix(MAGIC).ok_or("not a tree cache entry")?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or("no key length")?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > rest.len() {
        return Err("key longer than the entry");
    }
    let (stored_key, tree) = rest.split_at(len);
    if stored_key != key.encode() {
        return Err("entry of another file or version");
    }
    let tree = Tree::decode(tree).map_err(|_| "malformed tree")?;
    if tree.size() != key.size {
        return Err("tree of another size");
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::super::tests::data;
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        cache: TreeCache,
        cache_dir: PathBuf,
        file: PathBuf,
        bytes: Vec<u8>,
    }

    fn fixture(len: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("home/cache");
        let file = dir.path().join("file.bin");
        let bytes = data(len, 21);
        std::fs::write(&file, &bytes).unwrap();
        Fixture {
            cache: TreeCache::open(&cache_dir).unwrap(),
            _dir: dir,
            cache_dir,
            file,
            bytes,
        }
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        found.sort();
        found
    }

    /// Shift the file's mtime by one nanosecond (content, size and inode unchanged).
    fn nudge_mtime(path: &Path) {
        let file = File::options().append(true).open(path).unwrap();
        let mtime = file.metadata().unwrap().modified().unwrap();
        file.set_modified(mtime + Duration::from_nanos(1)).unwrap();
    }

    #[test]
    fn second_lookup_is_a_hit() {
        let f = fixture(3 * super::super::GROUP_LEN + 5);
        let tree = f.cache.tree(&f.file).unwrap();
        assert_eq!(tree.root(), blake3::hash(&f.bytes));
        assert_eq!(f.cache.stats().misses, 1);
        assert_eq!(f.cache.stats().stored, 1);
        assert_eq!(f.cache.tree(&f.file).unwrap(), tree);
        assert_eq!(f.cache.stats().hits, 1);
        // A second cache over the same directory (the next run) hits too.
        let again = TreeCache::open(&f.cache_dir).unwrap();
        assert_eq!(again.tree(&f.file).unwrap(), tree);
        assert_eq!(again.stats().hits, 1);
        // Through another path to the same file as well: keys use the canonical path.
        let dotted = f.file.parent().unwrap().join("home/../file.bin");
        assert_eq!(again.tree(&dotted).unwrap(), tree);
        assert_eq!(again.stats().hits, 2);
    }

    #[test]
    fn a_hit_is_served_from_the_entry() {
        // Prove the hit does not re-hash: a stored (wrong) tree for this key comes back.
        let f = fixture(1000);
        let key = FileKey::of(&f.file).unwrap();
        let planted = Tree::from_data(&data(1000, 99));
        assert!(f.cache.put(&key, &planted).unwrap());
        assert_eq!(f.cache.tree(&f.file).unwrap(), planted);
    }

    #[test]
    fn touching_the_mtime_misses() {
        let f = fixture(5000);
        f.cache.tree(&f.file).unwrap();
        nudge_mtime(&f.file);
        f.cache.tree(&f.file).unwrap();
        assert_eq!(f.cache.stats().hits, 0);
        assert_eq!(f.cache.stats().misses, 2);
    }

    #[test]
    fn truncation_misses_and_gives_the_new_tree() {
        let f = fixture(2 * super::super::GROUP_LEN);
        f.cache.tree(&f.file).unwrap();
        File::options()
            .write(true)
            .open(&f.file)
            .unwrap()
            .set_len(100)
            .unwrap();
        let tree = f.cache.tree(&f.file).unwrap();
        assert_eq!(tree.root(), blake3::hash(&f.bytes[..100]));
        assert_eq!(f.cache.stats().hits, 0);
    }

    #[test]
    fn rewriting_in_place_with_the_old_mtime_misses() {
        // Same size, same inode, mtime put back: only the ctime tells.
        let f = fixture(4096);
        let before = f.cache.tree(&f.file).unwrap();
        let key_before = FileKey::of(&f.file).unwrap();
        let mtime = std::fs::metadata(&f.file).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut changed = f.bytes.clone();
        changed[10] ^= 1;
        let file = File::options().write(true).open(&f.file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &changed, 0).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        let (old, new) = (key_before, FileKey::of(&f.file).unwrap());
        assert_eq!(
            (old.size, old.mtime, old.inode),
            (new.size, new.mtime, new.inode)
        );
        assert_ne!(old.ctime, new.ctime);
        let after = f.cache.tree(&f.file).unwrap();
        assert_ne!(after, before);
        assert_eq!(after.root(), blake3::hash(&changed));
    }

    #[test]
    fn corrupt_entries_are_ignored_and_replaced() {
        let f = fixture(3 * super::super::GROUP_LEN);
        let good = f.cache.tree(&f.file).unwrap();
        let [entry] = entries(&f.cache_dir).try_into().unwrap();
        let original = std::fs::read(&entry).unwrap();
        let damages: Vec<Vec<u8>> = vec![
            {
                let mut b = original.clone();
                b[original.len() / 2] ^= 1;
                b
            },
            original[..original.len() - 1].to_vec(),
            original[..10].to_vec(),
            Vec::new(),
            [original.as_slice(), b"x"].concat(),
        ];
        for (i, damaged) in damages.into_iter().enumerate() {
            std::fs::write(&entry, damaged).unwrap();
            assert_eq!(f.cache.tree(&f.file).unwrap(), good, "damage {i}");
            assert_eq!(f.cache.stats().corrupt, i as u64 + 1, "damage {i}");
            // It was re-hashed and stored afresh.
            assert_eq!(std::fs::read(&entry).unwrap(), original, "damage {i}");
        }
        assert_eq!(f.cache.stats().hits, 0);
    }

    #[test]
    fn an_entry_of_another_file_is_not_trusted() {
        // A well-formed entry with a valid checksum, under this key's name, but made for
        // another file: the key stored inside it gives it away.
        let f = fixture(2000);
        let other = f.file.with_file_name("other.bin");
        std::fs::write(&other, data(2000, 22)).unwrap();
        f.cache.tree(&other).unwrap();
        let [entry] = entries(&f.cache_dir).try_into().unwrap();
        let key = FileKey::of(&f.file).unwrap();
        std::fs::rename(&entry, f.cache_dir.join(key.file_name())).unwrap();
        assert_eq!(f.cache.get(&key), None);
        assert_eq!(f.cache.stats().corrupt, 1);
        assert_eq!(
            f.cache.tree(&f.file).unwrap().root(),
            blake3::hash(&f.bytes)
        );
    }

    #[test]
    fn least_recently_used_entries_are_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TreeCache::with_limits(dir.path().join("cache"), 2, TreeCache::MAX_TOTAL_BYTES)
            .unwrap();
        let files: Vec<PathBuf> = (0..3)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, data(100, i)).unwrap();
                path
            })
            .collect();
        let key = |i: usize| FileKey::of(&files[i]).unwrap();
        cache.tree(&files[0]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        cache.tree(&files[1]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Using f0 again makes f1 the least recently used.
        assert!(cache.get(&key(0)).is_some());
        std::thread::sleep(Duration::from_millis(20));
        cache.tree(&files[2]).unwrap();
        assert_eq!(cache.stats().evicted, 1);
        assert_eq!(entries(&dir.path().join("cache")).len(), 2);
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(2)).is_some());
    }

    #[test]
    fn entries_over_the_byte_limit_are_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TreeCache::with_limits(dir.path().join("cache"), 10, 200).unwrap();
        let file = dir.path().join("f");
        // 5 groups: 8 + 5 × 32 bytes of tree, plus the key and framing: over 200 bytes.
        std::fs::write(&file, data(5 * super::super::GROUP_LEN, 1)).unwrap();
        let key = FileKey::of(&file).unwrap();
        let tree = cache.tree(&file).unwrap();
        assert_eq!(cache.stats().stored, 0);
        assert!(!cache.put(&key, &tree).unwrap());
        assert!(entries(&dir.path().join("cache")).is_empty());
    }

    #[test]
    fn a_tree_of_another_size_is_refused() {
        let f = fixture(10);
        let key = FileKey::of(&f.file).unwrap();
        let e = f.cache.put(&key, &Tree::from_data(b"abc")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn directories_are_not_hashed() {
        let f = fixture(10);
        let e = f.cache.tree(&f.cache_dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
