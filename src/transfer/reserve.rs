//! Destinations handed out to transfers in progress, so concurrent files never share a path.
//!
//! A reservation is an owned value that frees its name when dropped: whatever way a
//! transfer ends (verified, failed, declined after the fact, its connection gone while
//! the decisions were being written, the task cancelled), the name cannot leak.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::names;

/// The book of reserved destinations of one receiver.
#[derive(Debug, Default)]
pub(crate) struct NameBook(Mutex<Book>);

#[derive(Debug, Default)]
struct Book {
    /// Destinations reserved and not yet released.
    taken: HashSet<PathBuf>,
    /// Per offered name (in its folder): the candidate number after the last one handed
    /// out, and how many of its reservations are alive. Dropped with the last reservation,
    /// so the map holds only names in flight.
    next: HashMap<PathBuf, (u32, usize)>,
}

/// A destination reserved for one file; released on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    book: Arc<NameBook>,
    dest: PathBuf,
    /// The offered name in its folder: the key of its hint.
    name: PathBuf,
}

impl Reservation {
    /// The reserved path.
    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut book = self.book.lock();
        book.taken.remove(&self.dest);
        if let Some(entry) = book.next.get_mut(&self.name) {
            entry.1 -= 1;
            if entry.1 == 0 {
                book.next.remove(&self.name);
            }
        }
    }
}

impl NameBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve a destination for the sanitized `name` in `dir` (see
    /// [`names::choose_destination`]). Blocking: it inspects the directory.
    ///
    /// Repeated names continue from the last number handed out, so reserving n files of
    /// one name costs O(n) rather than O(n²).
    pub(crate) fn reserve(
        self: &Arc<Self>,
        dir: &Path,
        name: &str,
        overwrite: bool,
    ) -> io::Result<Reservation> {
        use std::collections::hash_map::Entry;
        let mut guard = self.lock();
        let book = &mut *guard;
        // One lookup of the hint, kept for its update.
        let hint = book.next.entry(dir.join(name));
        let start = match &hint {
            Entry::Occupied(hint) => hint.get().0,
            Entry::Vacant(_) => 0,
        };
        let (dest, n) = names::choose_destination_from(dir, name, overwrite, &book.taken, start)?;
        let key = hint.key().clone();
        let hint = hint.or_insert((0, 0));
        *hint = (n.saturating_add(1), hint.1 + 1);
        book.taken.insert(dest.clone());
        Ok(Reservation {
            book: self.clone(),
            dest,
            name: key,
        })
    }

    /// Destinations currently reserved (for tests).
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.lock().taken.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_are_numbered_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let book = Arc::new(NameBook::default());
        let a = book.reserve(dir.path(), "f.txt", false).unwrap();
        let b = book.reserve(dir.path(), "f.txt", false).unwrap();
        assert_eq!(a.dest(), dir.path().join("f.txt"));
        assert_eq!(b.dest(), dir.path().join("f (1).txt"));
        drop((a, b));
        assert_eq!(book.reserved(), 0);
        let again = book.reserve(dir.path(), "f.txt", false).unwrap();
        assert_eq!(
            again.dest(),
            dir.path().join("f.txt"),
            "names are free again"
        );
    }

    #[test]
    fn one_name_in_two_folders_is_numbered_per_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let book = Arc::new(NameBook::default());
        let first = book.reserve(&a, "index.html", false).unwrap();
        let second = book.reserve(&a, "index.html", false).unwrap();
        let other = book.reserve(&b, "index.html", false).unwrap();
        assert_eq!(first.dest(), a.join("index.html"));
        assert_eq!(second.dest(), a.join("index (1).html"));
        assert_eq!(other.dest(), b.join("index.html"), "{other:?}");
    }

    #[test]
    fn ten_thousand_of_one_name_continue_from_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let book = Arc::new(NameBook::default());
        let held: Vec<_> = (0..10_000)
            .map(|_| book.reserve(dir.path(), "a", false).unwrap())
            .collect();
        assert_eq!(held[9_999].dest(), dir.path().join("a (9999)"));
        assert_eq!(book.reserved(), 10_000);
        // Each reservation started where the previous one ended, instead of at 0 (which
        // would have examined ~50 million candidates in all).
        assert_eq!(
            book.lock().next.get(&dir.path().join("a")),
            Some(&(10_000, 10_000))
        );
        drop(held);
        assert!(
            book.lock().next.is_empty(),
            "hints go with their reservations"
        );
    }
}
