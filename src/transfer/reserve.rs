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
    /// The batch it was booked with, while that is still booking (see [`Batch`]).
    batch: Option<Held>,
}

/// The releases a batch holds back, `(dest, name)`; `None` once it has let them go.
type Held = Arc<Mutex<Option<Vec<(PathBuf, PathBuf)>>>>;

/// A batch of reservations being booked. Until it is dropped, the names its reservations
/// let go of stay booked: a batch whose names are booked while its first files are
/// already stored (and released) gets the names it would have got all at once. That is
/// what lets a folder it created skip the disk (every name in it is in the book), and two
/// files of one name in one folder never share a destination.
#[derive(Debug)]
pub(crate) struct Batch {
    book: Arc<NameBook>,
    held: Held,
}

impl Drop for Batch {
    fn drop(&mut self) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut book = self.book.lock();
        for (dest, name) in held.unwrap_or_default() {
            book.release(&dest, &name);
        }
    }
}

impl Batch {
    /// [`NameBook::reserve`], as part of this batch.
    pub(crate) fn reserve(
        &self,
        dir: &Path,
        name: &str,
        overwrite: bool,
    ) -> io::Result<Reservation> {
        let mut reservation = self.book.reserve(dir, name, overwrite)?;
        reservation.batch = Some(self.held.clone());
        Ok(reservation)
    }
}

impl Reservation {
    /// The reserved path.
    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(batch) = &self.batch {
            let mut held = batch.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = held.as_mut() {
                held.push((
                    std::mem::take(&mut self.dest),
                    std::mem::take(&mut self.name),
                ));
                return;
            }
        }
        self.book.lock().release(&self.dest, &self.name);
    }
}

impl Book {
    fn release(&mut self, dest: &Path, name: &Path) {
        self.taken.remove(dest);
        if let Some(entry) = self.next.get_mut(name) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.next.remove(name);
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
            batch: None,
        })
    }

    /// Start booking a batch (see [`Batch`]).
    pub(crate) fn batch(self: &Arc<Self>) -> Batch {
        Batch {
            book: self.clone(),
            held: Arc::new(Mutex::new(Some(Vec::new()))),
        }
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

    #[test]
    fn a_batch_holds_the_names_it_let_go_of_until_it_is_booked() {
        let dir = tempfile::tempdir().unwrap();
        let book = Arc::new(NameBook::default());
        let batch = book.batch();
        // Booked without the disk (`overwrite`, or a folder the batch made): only the
        // book stands between two files of one name.
        let first = batch.reserve(dir.path(), "f", true).unwrap();
        drop(first); // stored and answered while the batch is still booking
        let second = batch.reserve(dir.path(), "f", true).unwrap();
        assert_eq!(second.dest(), dir.path().join("f (1)"), "not the first's");
        assert_eq!(book.reserved(), 2);
        drop(batch);
        assert_eq!(
            book.reserved(),
            1,
            "the first's name is let go with the batch"
        );
        drop(second);
        assert_eq!(book.reserved(), 0);
        assert!(book.lock().next.is_empty());
        // Outside a batch a name is free again as soon as it is let go.
        drop(book.reserve(dir.path(), "f", true).unwrap());
        assert_eq!(
            book.reserve(dir.path(), "f", true).unwrap().dest(),
            dir.path().join("f")
        );
    }
}
