//! BLAKE3 chunk-group trees: verified streaming, resume, and bounded-memory hashing.
//!
//! A BLAKE3 hash *is* the root of a Merkle tree over 1 KiB chunks. We cut a file into
//! groups of [`GROUP`] bytes (2^8 chunks). A group is a power-of-two number of chunks that
//! starts at a multiple of its own length, so it is exactly one complete subtree of
//! BLAKE3's own tree and its chaining value (CV) is one of that tree's interior nodes. The
//! list of group CVs (a [`Tree`]) therefore merges up to the very hash the sender offers,
//! with nothing but BLAKE3 itself (`blake3::hazmat`) and no second hash format.
//!
//! That buys three things:
//! - **resume**: a receiver holding a partial file hashes its complete groups and keeps
//!   the longest prefix that matches ([`verified_prefix`]); only the rest travels;
//! - **verified streaming**: each group is checked the moment its last byte arrives
//!   ([`GroupVerifier`]), so bad bytes are caught within 256 KiB, not at the end of 4 GiB,
//!   and everything before them is known good;
//! - **bounded-memory hashing**: groups are independent, so [`Tree::from_file`] reads them
//!   with `pread` into one buffer per thread and hashes them on all cores, where mapping
//!   the whole file used to show up as gigabytes of resident memory. [`TreeCache`] keeps
//!   the result so a re-send does not hash twice.
//!
//! A tree is only as trustworthy as its root: check [`Tree::root`] against a hash you
//! already trust (the one in the manifest, [`Tree::decode_with_root`]) before believing its
//! CVs.
//!
//! # The one-group special case
//! A file of at most [`GROUP`] bytes (including the empty file) has exactly one group, and
//! BLAKE3 computes its hash from that data with the *root* flag set: no parent node exists
//! to merge a non-root CV into. So for a one-group file the single "CV" stored is the
//! file's BLAKE3 hash itself, and [`Tree::root`] returns it unchanged. This is why
//! [`group_cv`] needs the file size: the first 256 KiB of a 256 KiB file and of a 1 GiB
//! file hash differently.

mod cache;
mod hash;

use std::ops::Range;
use std::sync::Arc;

use blake3::hazmat::{self, HasherExt, Mode};

pub use cache::{CacheStats, FileKey, TreeCache};
pub use hash::verified_prefix;

/// Bytes per group: 256 KiB, i.e. 2^8 BLAKE3 chunks.
///
/// The trade-off is CV-list size against granularity. The tree costs 32 bytes per group,
/// 1/8192 of the file (128 KiB per GiB, 512 KiB for 4 GiB), small enough to send ahead of
/// the data and to cache. Smaller groups would grow it (64 KiB groups: 512 KiB per GiB)
/// for little gain, since a group is what a resume may re-send and what a corruption
/// costs, and 256 KiB is a fraction of a second even on a slow link. Larger groups would
/// make each check later and each per-thread hashing buffer bigger. 256 chunks per group
/// also give BLAKE3's SIMD (which wants 8 to 16 chunks at once) plenty of parallel work,
/// so hashing one group on one thread runs at full single-core speed.
///
/// It must stay a power-of-two multiple of `blake3::CHUNK_LEN`: that is what makes a group
/// a subtree of BLAKE3's tree.
pub const GROUP: u64 = 256 << 10;

/// [`GROUP`] as a buffer length.
const GROUP_LEN: usize = GROUP as usize;

const _: () = assert!(GROUP.is_power_of_two() && GROUP >= blake3::CHUNK_LEN as u64);

/// A BLAKE3 chaining value: the 32-byte hash of an interior node.
pub type Cv = [u8; 32];

/// Bytes of a [`Tree::encode`]d size field.
const SIZE_LEN: usize = 8;

/// What can go wrong with trees: malformed encodings and data that does not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// An encoded tree that is not one.
    #[error("malformed tree: {0}")]
    Malformed(&'static str),
    /// A well-formed tree whose CVs do not merge to the hash that was expected.
    #[error("tree root {found} does not match the expected hash {expected}")]
    RootMismatch {
        /// The trusted hash.
        expected: blake3::Hash,
        /// What the tree's CVs merge to.
        found: blake3::Hash,
    },
    /// A complete group whose bytes do not hash to the tree's CV.
    #[error("group {index} (bytes {start}..{end}) does not match the tree")]
    BadGroup {
        /// The group's index.
        index: u64,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// A group index past the end of the file.
    #[error("group {index} does not exist in a file of {groups} groups")]
    NoSuchGroup {
        /// The index asked for.
        index: u64,
        /// Groups in the file.
        groups: u64,
    },
    /// Data of the wrong length for its group.
    #[error("group {index} has {expected} bytes, got {got}")]
    GroupLength {
        /// The group's index.
        index: u64,
        /// Its length in the file.
        expected: u64,
        /// The length given.
        got: u64,
    },
    /// A stream that starts neither at a group boundary nor at the end of the file.
    #[error("offset {offset} is not a group boundary of a {size}-byte file")]
    Misaligned {
        /// The offset asked for.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// More bytes than the file has.
    #[error("stream runs past the end of the {size}-byte file")]
    TooLong {
        /// The file's size.
        size: u64,
    },
    /// The stream ended before the file did.
    #[error("stream ended at byte {got} of {size}")]
    Truncated {
        /// Bytes up to where the stream ended (absolute offset).
        got: u64,
        /// The file's size.
        size: u64,
    },
}

/// Groups in a file of `size` bytes: at least one, since even the empty file has a hash.
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP).max(1)
}

/// The bytes group `index` covers in a file of `size` bytes, if it exists.
pub fn group_range(size: u64, index: u64) -> Option<Range<u64>> {
    if index >= group_count(size) {
        return None;
    }
    // index < group_count, so start < size (or both are 0): no overflow.
    let start = index * GROUP;
    Some(start..start.saturating_add(GROUP).min(size))
}

/// The CV of group `index` of a file of `size` bytes, from exactly that group's `data`.
///
/// For a one-group file (`size <= GROUP`) this is the file's BLAKE3 hash (see the
/// [module docs](self)). Wrong lengths and indices are errors, not panics: BLAKE3's
/// low-level API would otherwise assert.
pub fn group_cv(size: u64, index: u64, data: &[u8]) -> Result<Cv, TreeError> {
    let range = group_range(size, index).ok_or(TreeError::NoSuchGroup {
        index,
        groups: group_count(size),
    })?;
    let expected = range.end - range.start;
    if data.len() as u64 != expected {
        return Err(TreeError::GroupLength {
            index,
            expected,
            got: data.len() as u64,
        });
    }
    Ok(hash_group(size, index, data))
}

/// [`group_cv`] without the checks: `data` must be exactly group `index` of the file.
fn hash_group(size: u64, index: u64, data: &[u8]) -> Cv {
    let mut hasher = group_hasher(size, index);
    hasher.update(data);
    finish_group(size, &hasher)
}

/// A hasher positioned at the start of group `index`.
fn group_hasher(size: u64, index: u64) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new();
    if group_count(size) > 1 {
        hasher.set_input_offset(index * GROUP);
    }
    hasher
}

/// The CV of a group whose bytes `hasher` has seen.
fn finish_group(size: u64, hasher: &blake3::Hasher) -> Cv {
    if group_count(size) == 1 {
        *hasher.finalize().as_bytes()
    } else {
        hasher.finalize_non_root()
    }
}

/// The CV of every group of one file: enough to verify any group-aligned piece of it, and
/// to recompute its BLAKE3 hash ([`Tree::root`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    size: u64,
    cvs: Vec<Cv>,
}

impl Tree {
    /// A tree from its parts; `cvs` must hold one CV per group of `size` bytes.
    pub fn new(size: u64, cvs: Vec<Cv>) -> Result<Self, TreeError> {
        if cvs.len() as u64 != group_count(size) {
            return Err(TreeError::Malformed("CV count does not match the size"));
        }
        Ok(Tree { size, cvs })
    }

    /// The tree of bytes already in memory (small files, tests). Files have
    /// [`Tree::from_file`].
    pub fn from_data(data: &[u8]) -> Self {
        let size = data.len() as u64;
        let cvs = if data.is_empty() {
            vec![*blake3::hash(data).as_bytes()]
        } else {
            data.chunks(GROUP_LEN)
                .enumerate()
                .map(|(i, group)| hash_group(size, i as u64, group))
                .collect()
        };
        Tree { size, cvs }
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One CV per group, in order.
    pub fn cvs(&self) -> &[Cv] {
        &self.cvs
    }

    /// Number of groups (at least one).
    pub fn groups(&self) -> u64 {
        self.cvs.len() as u64
    }

    /// The bytes group `index` covers, if it exists.
    pub fn group_range(&self, index: u64) -> Option<Range<u64>> {
        group_range(self.size, index)
    }

    /// Byte length of the file's first `groups` groups.
    pub fn prefix_len(&self, groups: u64) -> u64 {
        groups.saturating_mul(GROUP).min(self.size)
    }

    /// The file's BLAKE3 hash, merged from the group CVs in BLAKE3's own tree shape:
    /// every left subtree is the largest power of two strictly smaller than its parent
    /// (`hazmat::left_subtree_len`), and only the top merge carries the root flag.
    pub fn root(&self) -> blake3::Hash {
        if self.cvs.len() == 1 {
            return blake3::Hash::from(self.cvs[0]);
        }
        let left = hazmat::left_subtree_len(self.size);
        hazmat::merge_subtrees_root(
            &self.subtree(0, left),
            &self.subtree(left, self.size - left),
            Mode::Hash,
        )
    }

    /// The CV of the subtree of `len` bytes starting at `start`. Callers only pass
    /// subtrees of BLAKE3's shape over more than one group, so `start` is a multiple of
    /// [`GROUP`] and every split lands on a group boundary (a left subtree is a power of
    /// two larger than, hence a multiple of, `GROUP`). Depth is at most 64 - 18.
    fn subtree(&self, start: u64, len: u64) -> Cv {
        if len <= GROUP {
            return self.cvs[(start / GROUP) as usize];
        }
        let left = hazmat::left_subtree_len(len);
        hazmat::merge_subtrees_non_root(
            &self.subtree(start, left),
            &self.subtree(start + left, len - left),
            Mode::Hash,
        )
    }

    /// Compact binary form: the size (8 bytes, big-endian), then the CVs, nothing else.
    /// There is exactly one encoding per tree, and its length follows from the size.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIZE_LEN + 32 * self.cvs.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Bytes [`Tree::encode`] produces for a file of `size` bytes (`None` if that would
    /// not fit in memory anyway).
    pub fn encoded_len(size: u64) -> Option<usize> {
        let cvs = usize::try_from(group_count(size)).ok()?;
        cvs.checked_mul(32)?.checked_add(SIZE_LEN)
    }

    /// Parse [`Tree::encode`]'s output. Never panics, and allocates only after the length
    /// was checked against the input, so a lying size field costs nothing. The result is
    /// well-formed, not trusted: see [`Tree::decode_with_root`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TreeError> {
        let (size, cvs) = bytes
            .split_first_chunk::<SIZE_LEN>()
            .ok_or(TreeError::Malformed("shorter than its size field"))?;
        let size = u64::from_be_bytes(*size);
        if Self::encoded_len(size) != Some(bytes.len()) {
            return Err(TreeError::Malformed("length does not match the size"));
        }
        let (cvs, rest) = cvs.as_chunks::<32>();
        debug_assert!(rest.is_empty());
        Ok(Tree {
            size,
            cvs: cvs.to_vec(),
        })
    }

    /// [`Tree::decode`], then accept the tree only if it merges to `root`, the hash the
    /// sender offered. Because BLAKE3 is collision resistant, the CVs of such a tree are
    /// the real file's: nobody can forge a group that matches them.
    pub fn decode_with_root(bytes: &[u8], root: &blake3::Hash) -> Result<Self, TreeError> {
        let tree = Self::decode(bytes)?;
        let found = tree.root();
        if found != *root {
            return Err(TreeError::RootMismatch {
                expected: *root,
                found,
            });
        }
        Ok(tree)
    }
}

/// Checks a stream of a file's bytes group by group, as they arrive.
///
/// Sans-IO: feed it the bytes the network delivered with [`GroupVerifier::update`]; each
/// group is checked against the tree the moment it is complete, and the first bad one is
/// named. [`GroupVerifier::verified`] is then the length of the prefix known good, which
/// a receiver may keep on disk and resume from. Memory is one BLAKE3 hasher: bytes are
/// hashed as they come, never buffered.
#[derive(Debug, Clone)]
pub struct GroupVerifier {
    tree: Arc<Tree>,
    /// Absolute offset of the next byte expected.
    position: u64,
    /// The group being received; `tree.groups()` once all are checked.
    group: u64,
    /// Hashes the current group's bytes received so far.
    hasher: blake3::Hasher,
    /// Bytes `0..verified` are known good.
    verified: u64,
    /// The first error, repeated by every later call.
    failed: Option<TreeError>,
}

impl GroupVerifier {
    /// A verifier for the bytes of `tree`'s file from `offset` on. `offset` must be a
    /// group boundary, or the file's size (nothing left to send). Bytes before it are
    /// taken as already verified (by [`verified_prefix`]).
    pub fn new(tree: Arc<Tree>, offset: u64) -> Result<Self, TreeError> {
        let size = tree.size;
        let group = if offset == size && size > 0 {
            tree.groups()
        } else if offset.is_multiple_of(GROUP) && offset < size.max(1) {
            offset / GROUP
        } else {
            return Err(TreeError::Misaligned { offset, size });
        };
        let hasher = if group < tree.groups() {
            group_hasher(size, group)
        } else {
            blake3::Hasher::new()
        };
        Ok(GroupVerifier {
            tree,
            position: offset,
            group,
            hasher,
            verified: offset,
            failed: None,
        })
    }

    /// Take the next bytes of the stream. Fails, for good, on the first group that does
    /// not match (after checking every complete group before it) and on bytes past the end
    /// of the file.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), TreeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let size = self.tree.size;
        while !data.is_empty() {
            let Some(range) = self.tree.group_range(self.group) else {
                return self.fail(TreeError::TooLong { size });
            };
            // In-bounds: range.end - position <= GROUP.
            let take = ((range.end - self.position) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.position += take as u64;
            data = &data[take..];
            if self.position == range.end {
                self.check_group(range)?;
            }
        }
        Ok(())
    }

    /// The stream is over: fails unless it reached the end of the file and every group,
    /// the last (possibly short, possibly empty) one included, matched.
    pub fn finish(mut self) -> Result<(), TreeError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let size = self.tree.size;
        if self.position < size {
            return Err(TreeError::Truncated {
                got: self.position,
                size,
            });
        }
        // Only the empty file's one empty group can still be pending here: every other
        // group was checked when its last byte arrived.
        if let Some(range) = self.tree.group_range(self.group) {
            self.check_group(range)?;
        }
        Ok(())
    }

    /// Bytes `0..verified()` of the file are known good.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// Absolute offset of the next byte expected.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Compare the completed current group with the tree, then move to the next one.
    fn check_group(&mut self, range: Range<u64>) -> Result<(), TreeError> {
        let size = self.tree.size;
        let index = self.group;
        if finish_group(size, &self.hasher) != self.tree.cvs[index as usize] {
            return self.fail(TreeError::BadGroup {
                index,
                start: range.start,
                end: range.end,
            });
        }
        self.verified = range.end;
        self.group += 1;
        if self.group < self.tree.groups() {
            self.hasher = group_hasher(size, self.group);
        }
        Ok(())
    }

    fn fail(&mut self, e: TreeError) -> Result<(), TreeError> {
        self.failed = Some(e.clone());
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: usize = 1024;
    const G: usize = GROUP_LEN;

    /// Deterministic incompressible bytes, different for each `seed`.
    pub(super) fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// Sizes around every boundary that matters: chunk, group, powers of two of groups.
    const SIZES: &[usize] = &[
        0,
        1,
        1023,
        K,
        K + 1,
        2 * K,
        G - 1,
        G,
        G + 1,
        2 * G - 1,
        2 * G,
        2 * G + 1,
        3 * G,
        3 * G + 5,
        4 * G,
        5 * G + K,
        7 * G + 1,
        8 * G,
        8 * G + 1,
        13 * G + 777,
        // A right subtree of 2^k groups plus one byte: splits at 2^k groups, not half.
        18 * G + 1,
        24 * G + 1,
        33 * G + 3,
    ];

    #[test]
    fn root_equals_blake3_for_boundary_sizes() {
        for &len in SIZES {
            let bytes = data(len, len as u64);
            let tree = Tree::from_data(&bytes);
            assert_eq!(tree.groups(), group_count(len as u64), "size {len}");
            assert_eq!(tree.root(), blake3::hash(&bytes), "size {len}");
        }
    }

    #[test]
    fn many_groups_merge_to_the_hash() {
        // 100 groups: a deep, lopsided tree (64 + 32 + 4) with a short last group.
        let bytes = data(100 * G - 12_345, 7);
        assert_eq!(Tree::from_data(&bytes).root(), blake3::hash(&bytes));
    }

    #[test]
    fn one_group_files_store_their_hash() {
        for len in [0, 1, G] {
            let bytes = data(len, 1);
            let tree = Tree::from_data(&bytes);
            assert_eq!(tree.cvs(), &[*blake3::hash(&bytes).as_bytes()]);
        }
        // The same first group is a non-root CV once the file is longer.
        let long = data(G + 1, 1);
        assert_ne!(
            group_cv(G as u64 + 1, 0, &long[..G]).unwrap(),
            group_cv(G as u64, 0, &long[..G]).unwrap()
        );
    }

    #[test]
    fn group_cv_matches_the_tree_and_refuses_wrong_shapes() {
        let bytes = data(3 * G + 10, 2);
        let size = bytes.len() as u64;
        let tree = Tree::from_data(&bytes);
        for i in 0..4u64 {
            let r = tree.group_range(i).unwrap();
            let cv = group_cv(size, i, &bytes[r.start as usize..r.end as usize]).unwrap();
            assert_eq!(cv, tree.cvs()[i as usize]);
        }
        assert_eq!(
            group_cv(size, 4, &[]),
            Err(TreeError::NoSuchGroup {
                index: 4,
                groups: 4
            })
        );
        // Too much data for a group would trip an assertion inside blake3.
        assert_eq!(
            group_cv(size, 1, &bytes[..G + 1]),
            Err(TreeError::GroupLength {
                index: 1,
                expected: G as u64,
                got: G as u64 + 1
            })
        );
        assert!(group_cv(size, 3, &bytes[..9]).is_err());
    }

    #[test]
    fn encode_round_trips_and_decode_refuses_bad_lengths() {
        for &len in SIZES {
            let tree = Tree::from_data(&data(len, 3));
            let bytes = tree.encode();
            assert_eq!(Some(bytes.len()), Tree::encoded_len(len as u64));
            assert_eq!(Tree::decode(&bytes), Ok(tree.clone()));
            assert_eq!(Tree::decode_with_root(&bytes, &tree.root()), Ok(tree));
            assert!(Tree::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Tree::decode(&longer).is_err());
        }
        assert!(Tree::decode(&[]).is_err());
        assert!(Tree::decode(&[0; 7]).is_err());
        // A size of 2^64-1 claims 2^46 CVs: refused without allocating them.
        let mut huge = u64::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 64]);
        assert_eq!(
            Tree::decode(&huge),
            Err(TreeError::Malformed("length does not match the size"))
        );
    }

    #[test]
    fn decode_with_root_refuses_a_forged_cv() {
        let tree = Tree::from_data(&data(5 * G, 4));
        let mut bytes = tree.encode();
        bytes[8 + 2 * 32] ^= 1;
        assert!(matches!(
            Tree::decode_with_root(&bytes, &tree.root()),
            Err(TreeError::RootMismatch { .. })
        ));
        // A one-group tree's CV is its root, so the check covers it too.
        let small = Tree::from_data(b"hello");
        let mut bytes = small.encode();
        bytes[8] ^= 1;
        assert!(Tree::decode_with_root(&bytes, &small.root()).is_err());
    }

    /// Feed `bytes[offset..]` to a verifier in pieces of varying length.
    fn stream(tree: &Arc<Tree>, bytes: &[u8], offset: usize) -> Result<u64, TreeError> {
        let mut v = GroupVerifier::new(tree.clone(), offset as u64)?;
        let mut rest = &bytes[offset..];
        let mut step = 1;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            v.update(&rest[..n])?;
            rest = &rest[n..];
            step = step * 7 % 100_003 + 1;
        }
        let verified = v.verified();
        v.finish()?;
        Ok(verified)
    }

    #[test]
    fn verifier_accepts_the_real_stream_from_any_boundary() {
        for &len in SIZES {
            let bytes = data(len, 5);
            let tree = Arc::new(Tree::from_data(&bytes));
            for offset in (0..=len).step_by(G).chain([len]) {
                assert_eq!(
                    stream(&tree, &bytes, offset),
                    Ok(len as u64),
                    "{len} @{offset}"
                );
            }
        }
    }

    #[test]
    fn verifier_names_the_group_with_a_flipped_byte() {
        let len = 9 * G + 100;
        let bytes = data(len, 6);
        let tree = Arc::new(Tree::from_data(&bytes));
        for (k, at) in [(0, 0), (3, 3 * G + 17), (8, 9 * G - 1), (9, len - 1)] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let mut v = GroupVerifier::new(tree.clone(), 0).unwrap();
            let err = bad
                .chunks(50_000)
                .map(|piece| v.update(piece))
                .find_map(Result::err)
                .expect("corruption detected");
            let r = tree.group_range(k).unwrap();
            assert_eq!(
                err,
                TreeError::BadGroup {
                    index: k,
                    start: r.start,
                    end: r.end
                }
            );
            // Everything before the bad group is kept; the verifier stays failed.
            assert_eq!(v.verified(), k * GROUP);
            assert_eq!(v.update(b"more"), Err(err.clone()));
            assert_eq!(v.finish(), Err(err));
        }
    }

    #[test]
    fn verifier_catches_short_long_and_misaligned_streams() {
        let bytes = data(2 * G + 3, 8);
        let size = bytes.len() as u64;
        let tree = Arc::new(Tree::from_data(&bytes));

        let mut v = GroupVerifier::new(tree.clone(), 0).unwrap();
        v.update(&bytes[..G + 5]).unwrap();
        assert_eq!(v.verified(), GROUP);
        assert_eq!(
            v.finish(),
            Err(TreeError::Truncated {
                got: GROUP + 5,
                size
            })
        );

        let mut v = GroupVerifier::new(tree.clone(), 0).unwrap();
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(v.update(&long), Err(TreeError::TooLong { size }));
        assert_eq!(v.verified(), size, "the real bytes were all checked first");

        let mut v = GroupVerifier::new(tree.clone(), size).unwrap();
        assert_eq!(v.update(b"x"), Err(TreeError::TooLong { size }));

        for offset in [1, GROUP - 1, 3 * GROUP, size + 1] {
            assert!(
                GroupVerifier::new(tree.clone(), offset).is_err(),
                "{offset}"
            );
        }
    }

    #[test]
    fn verifier_checks_the_empty_file() {
        let empty = Arc::new(Tree::from_data(b""));
        assert_eq!(
            GroupVerifier::new(empty.clone(), 0).unwrap().finish(),
            Ok(())
        );
        // An "empty file" tree whose CV is not the empty hash is caught at finish().
        let forged = Arc::new(Tree::new(0, vec![[0; 32]]).unwrap());
        assert!(matches!(
            GroupVerifier::new(forged, 0).unwrap().finish(),
            Err(TreeError::BadGroup { index: 0, .. })
        ));
        let mut v = GroupVerifier::new(empty, 0).unwrap();
        assert_eq!(v.update(b"x"), Err(TreeError::TooLong { size: 0 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn root_equals_blake3(len in 0..20 * G, seed: u64) {
            let bytes = data(len, seed);
            prop_assert_eq!(Tree::from_data(&bytes).root(), blake3::hash(&bytes));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(tree) = Tree::decode(&bytes) {
                prop_assert_eq!(tree.encode(), bytes);
                let _ = tree.root();
            }
        }

        #[test]
        fn decode_never_panics_on_near_valid_input(
            size in 0..6 * GROUP,
            cvs in proptest::collection::vec(any::<[u8; 32]>(), 0..8),
            edit in any::<(usize, u8)>(),
        ) {
            let mut bytes = size.to_be_bytes().to_vec();
            cvs.iter().for_each(|cv| bytes.extend_from_slice(cv));
            if !bytes.is_empty() {
                let at = edit.0 % bytes.len();
                bytes[at] ^= edit.1;
            }
            if let Ok(tree) = Tree::decode(&bytes) {
                prop_assert_eq!(tree.encode(), bytes);
                let root = tree.root();
                prop_assert!(Tree::decode_with_root(&tree.encode(), &root).is_ok());
                let mut v = GroupVerifier::new(Arc::new(tree), 0).unwrap();
                let _ = v.update(&cvs.concat());
                let _ = v.finish();
            }
        }
    }
}
