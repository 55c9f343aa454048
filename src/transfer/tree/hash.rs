//! Hashing files group by group: all cores, one [`GROUP`]-sized buffer per thread.
//!
//! `pread` (not a memory map) keeps the file's pages out of our resident set: a mapped
//! 4 GiB file shows up as 4 GB RSS once hashed, and tools and OOM killers believe it.
//! Workers of rayon's global pool (the one BLAKE3 itself uses) take group indices from a
//! shared counter, so memory is `threads × GROUP` whatever the file size, and neighbouring
//! groups are read at about the same time, which the kernel's read-ahead recognises.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Cv, GROUP_LEN, Tree, group_count, group_range, hash_group};

impl Tree {
    /// Hash the file at `path` on all cores with bounded memory: one [`super::GROUP`]
    /// buffer per thread, read with `pread`, never a map of the whole file.
    ///
    /// The tree describes the file's first `len` bytes as of opening it; a file that
    /// shrinks meanwhile is an error. [`super::TreeCache::tree`] also notices one that
    /// merely changed. Blocks until done: async code calls it from `spawn_blocking`.
    pub fn from_file(path: &Path) -> io::Result<Tree> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(context)?;
        let meta = file.metadata().map_err(context)?;
        if !meta.is_file() {
            return Err(context(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        hash_file(&file, meta.len()).map_err(context)
    }
}

/// The tree of the first `size` bytes of an open file.
pub(super) fn hash_file(file: &File, size: u64) -> io::Result<Tree> {
    let cvs = hash_groups(file, size, group_count(size), None)?;
    Tree::new(size, cvs).map_err(io::Error::other)
}

/// The length of the longest prefix of the file at `partial` that is the start of
/// `tree`'s file: every complete group in it matches its CV. Hashes with bounded memory,
/// in parallel, and stops early past the first bad group.
///
/// A partial file may be stale, corrupted or forged: none of it is trusted beyond the
/// returned length, which is a multiple of [`super::GROUP`] or the whole file. The caller
/// truncates it to that length and resumes from there ([`super::GroupVerifier::new`]).
/// Bytes past the tree's size are ignored here, never counted.
///
/// `tree` itself must be trusted: decoded with [`Tree::decode_with_root`] or computed.
pub fn verified_prefix(tree: &Tree, partial: &Path) -> io::Result<u64> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", partial.display()));
    let file = File::open(partial).map_err(context)?;
    let len = file.metadata().map_err(context)?.len();
    let complete = if len >= tree.size() {
        tree.groups()
    } else {
        len / super::GROUP
    };
    let good = hash_groups(&file, tree.size(), complete, Some(tree.cvs())).map_err(context)?;
    Ok(tree.prefix_len(good.len() as u64))
}

/// The CVs of groups `0..count` of `file`, a file of `size` bytes, hashed on rayon's pool.
///
/// With `expected`, hashing stops at the first group whose CV differs and only the CVs
/// of the matching groups before it are returned.
fn hash_groups(file: &File, size: u64, count: u64, expected: Option<&[Cv]>) -> io::Result<Vec<Cv>> {
    let workers = rayon_core::current_num_threads().clamp(1, count.max(1) as usize);
    let next = AtomicU64::new(0);
    // Groups at or past `limit` are not needed: the count, lowered by a mismatch (or to
    // 0 by an I/O error). Every index below its final value is handed out and hashed,
    // because the counter only grows and a worker stops only at an index >= limit.
    let limit = AtomicU64::new(count);
    let failure = Mutex::new(None::<io::Error>);
    let found = Mutex::new(Vec::<(u64, Cv)>::new());
    rayon_core::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                let mut buffer = vec![0u8; GROUP_LEN];
                let mut mine = Vec::new();
                loop {
                    let index = next.fetch_add(1, Relaxed);
                    if index >= limit.load(Relaxed) {
                        break;
                    }
                    let Some(range) = group_range(size, index) else {
                        break;
                    };
                    let data = &mut buffer[..(range.end - range.start) as usize];
                    if let Err(e) = read_at(file, data, range.start) {
                        limit.store(0, Relaxed);
                        lock(&failure).get_or_insert(e);
                        break;
                    }
                    let cv = hash_group(size, index, data);
                    match expected {
                        Some(cvs) if cvs.get(index as usize) != Some(&cv) => {
                            limit.fetch_min(index, Relaxed);
                        }
                        _ => mine.push((index, cv)),
                    }
                }
                lock(&found).extend(mine);
            });
        }
    });
    if let Some(e) = lock(&failure).take() {
        return Err(e);
    }
    let limit = limit.into_inner();
    let mut found = found.into_inner().unwrap_or_else(|e| e.into_inner());
    found.retain(|&(index, _)| index < limit);
    found.sort_unstable_by_key(|&(index, _)| index);
    debug_assert!(
        found
            .iter()
            .enumerate()
            .all(|(i, &(index, _))| i as u64 == index)
    );
    debug_assert_eq!(found.len() as u64, limit);
    Ok(found.into_iter().map(|(_, cv)| cv).collect())
}

/// `pread` exactly `buffer.len()` bytes at `offset`; a short file says what happened.
fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buffer, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "the file shrank while it was being hashed")
        } else {
            e
        }
    })
}

/// A worker that panicked poisons nothing we cannot still read: the panic itself is
/// propagated by `rayon_core::scope`.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::tests::data;
    use super::super::{GROUP, GroupVerifier};
    use super::*;
    use std::sync::Arc;

    const G: usize = GROUP_LEN;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn from_file_matches_blake3_and_the_in_memory_tree() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 1025, G - 1, G, G + 1, 6 * G, 37 * G + 4321] {
            let bytes = data(len, 11);
            let path = write(dir.path(), "f", &bytes);
            let tree = Tree::from_file(&path).unwrap();
            assert_eq!(tree, Tree::from_data(&bytes), "size {len}");
            assert_eq!(tree.root(), blake3::hash(&bytes), "size {len}");
        }
    }

    #[test]
    fn from_file_refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tree::from_file(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = Tree::from_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn hashing_a_file_that_shrank_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "f", &data(3 * G, 12));
        let file = File::open(&path).unwrap();
        // As if the file was truncated after its size was read.
        let e = hash_file(&file, 4 * GROUP).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn verified_prefix_keeps_whole_matching_groups_only() {
        let dir = tempfile::tempdir().unwrap();
        let len = 10 * G + 999;
        let bytes = data(len, 13);
        let tree = Tree::from_data(&bytes);
        let size = len as u64;
        let prefix = |partial: &[u8]| {
            let path = write(dir.path(), "partial", partial);
            verified_prefix(&tree, &path).unwrap()
        };
        // Complete, truncated anywhere, exactly at boundaries, empty.
        assert_eq!(prefix(&bytes), size);
        assert_eq!(prefix(&bytes[..len - 1]), 10 * GROUP);
        assert_eq!(prefix(&bytes[..4 * G]), 4 * GROUP);
        assert_eq!(prefix(&bytes[..4 * G - 1]), 3 * GROUP);
        assert_eq!(prefix(&bytes[..G - 1]), 0);
        assert_eq!(prefix(&[]), 0);
        // Longer than the file: only the file's own bytes count.
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"trailing junk");
        assert_eq!(prefix(&longer), size);
        // One flipped bit in group k keeps exactly groups 0..k.
        for (k, at) in [(0, 5), (6, 6 * G + 100), (10, len - 1)] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert_eq!(prefix(&bad), k * GROUP, "flip at {at}");
            assert_eq!(prefix(&bad[..7 * G]), (k * GROUP).min(7 * GROUP));
        }
        // A forged partial of the right length matches nothing.
        assert_eq!(prefix(&data(len, 14)), 0);
    }

    #[test]
    fn resume_from_a_verified_prefix_completes_the_file() {
        // The whole resume story: a damaged partial, its verified prefix, then the rest
        // streamed through a verifier starting there.
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(5 * G + 10, 15);
        let tree = Arc::new(Tree::from_data(&bytes));
        let mut partial = bytes[..4 * G + 7].to_vec();
        partial[3 * G + 1] ^= 4;
        let path = write(dir.path(), "partial", &partial);
        let keep = verified_prefix(&tree, &path).unwrap();
        assert_eq!(keep, 3 * GROUP);
        let mut v = GroupVerifier::new(tree, keep).unwrap();
        v.update(&bytes[keep as usize..]).unwrap();
        v.finish().unwrap();
    }

    #[test]
    fn verified_prefix_of_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::from_data(b"abc");
        let e = verified_prefix(&tree, &dir.path().join("gone")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
