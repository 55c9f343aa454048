//! What `send DIR...` means: the files and empty folders of trees, as offers.
//!
//! A folder is sent as itself: `photos/2024/a.jpg` arrives as `OUT/photos/2024/a.jpg`.
//! Symbolic links inside a tree are never followed (a link could lead anywhere on the
//! sender's disk, and a loop would never end): they are skipped and said so, like sockets
//! and devices. Folders with nothing selected below them are sent as empty folders, so the
//! shape of the tree survives. Paths named on the command line are taken as given, links
//! included, as `cp` and `tar` do.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::send::{Listed, Outgoing};
use super::{MAX_DEPTH, MAX_FILES, TransferError};

/// Everything one send offers.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Files, in a stable order (arguments in order, folders sorted by name).
    pub files: Vec<Outgoing>,
    /// Folders with nothing below them, as components from the top folder down.
    pub empty_dirs: Vec<Vec<String>>,
    /// What was left out and why (symlinks, special files, names that are not UTF-8).
    pub skipped: Vec<String>,
}

impl Selection {
    /// Files and empty folders together: what counts against [`MAX_FILES`].
    pub fn entries(&self) -> usize {
        self.files.len() + self.empty_dirs.len()
    }

    /// Bytes of all files, as seen while walking.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Walk `paths` (files and folders) into a [`Selection`]. Fails on what cannot be read and
/// on sends of more than [`MAX_FILES`] entries or folders deeper than [`MAX_DEPTH`].
pub fn select(paths: &[PathBuf]) -> Result<Selection, TransferError> {
    let mut selection = Selection::default();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
        if meta.is_file() {
            let mut file = Outgoing::from_path(path)?;
            file.executable = meta.permissions().mode() & 0o111 != 0;
            file.size = meta.len();
            file.listed = Some(Listed {
                metadata: meta,
                at: std::time::Instant::now(),
            });
            selection.files.push(file);
        } else if meta.is_dir() {
            let name = top_name(path)?;
            let mut dir = vec![name];
            walk_top(path, &mut dir, &mut selection)?;
        } else {
            return Err(file_error(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file or folder",
                ),
            ));
        }
        check_count(&selection)?;
    }
    Ok(selection)
}

/// The name a folder argument is sent under: its own name, even for `.` or `dir/..`.
fn top_name(path: &Path) -> Result<String, TransferError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| file_error(path, e))?;
    let name = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            file_error(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a folder without a (UTF-8) name cannot be sent: name a folder inside it",
                ),
            )
        })?;
    Ok(name.to_string())
}

/// How many threads walk a folder's subfolders at once (at most; fewer on fewer cores).
/// Listing ten thousand files is ten thousand `stat`s, ~25 ms on one core, and nothing
/// goes to the receiver before it is done.
const WALKERS: usize = 4;

/// Walk the folder `path` (whose components are `dir`), its subfolders on up to
/// [`WALKERS`] threads. The selection is the one [`walk`] makes, in the same order, with
/// the same first error.
fn walk_top(
    path: &Path,
    dir: &mut Vec<String>,
    selection: &mut Selection,
) -> Result<bool, TransferError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(WALKERS));
    // The tally starts at what earlier arguments selected: one limit for the whole send.
    let tally = AtomicUsize::new(selection.entries());
    walk_with(path, dir, selection, threads, &tally)
}

/// [`walk_top`] on `threads` threads. `tally` counts the entries selected, by every
/// thread (and the send's earlier arguments): the limit holds for the whole send, not
/// per subfolder, and each thread stops once it is passed.
fn walk_with(
    path: &Path,
    dir: &mut Vec<String>,
    selection: &mut Selection,
    threads: usize,
    tally: &AtomicUsize,
) -> Result<bool, TransferError> {
    let entries = listing(path, dir)?;
    let subfolders: Vec<(PathBuf, Vec<String>)> = entries
        .iter()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let folder = entry.file_type().ok()?.is_dir();
            folder.then(|| (entry.path(), [dir, &[name][..]].concat()))
        })
        .collect();
    if threads < 2 || subfolders.len() < 2 {
        return walk_entries(
            entries,
            dir,
            selection,
            tally,
            &mut |child, dir, selection| walk(child, dir, selection, tally),
        );
    }
    // Each subfolder walked on its own into a part of its own, taken from a shared
    // counter; then the entries are gone through in order, as `walk` does, each
    // subfolder's part appended where its walk would have been.
    type Part = Result<(Selection, bool), TransferError>;
    let next = AtomicUsize::new(0);
    let parts: Mutex<HashMap<PathBuf, Part>> = Mutex::default();
    let work = || {
        loop {
            let Some((child, components)) = subfolders.get(next.fetch_add(1, Ordering::Relaxed))
            else {
                return;
            };
            let mut part = Selection::default();
            let mut components = components.clone();
            let walked = walk(child, &mut components, &mut part, tally).map(|any| (part, any));
            let mut parts = parts.lock().unwrap_or_else(|e| e.into_inner());
            parts.insert(child.clone(), walked);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
    let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    walk_entries(
        entries,
        dir,
        selection,
        tally,
        &mut |child, dir, selection| {
            // Keyed by path: a folder seen as one above but not here (a file system
            // without entry types, changing under us) is walked now, or not at all.
            let Some(part) = parts.remove(child) else {
                return walk(child, dir, selection, tally);
            };
            let (part, any) = part?;
            selection.files.extend(part.files);
            selection.empty_dirs.extend(part.empty_dirs);
            selection.skipped.extend(part.skipped);
            Ok(any)
        },
    )
}

/// Recursively collect the files under `path` (whose components are `dir`) into
/// `selection`; empty subfolders are recorded. Returns whether anything below `path`
/// was selected (file or empty folder).
fn walk(
    path: &Path,
    dir: &mut Vec<String>,
    selection: &mut Selection,
    tally: &AtomicUsize,
) -> Result<bool, TransferError> {
    let entries = listing(path, dir)?;
    walk_entries(
        entries,
        dir,
        selection,
        tally,
        &mut |child, dir, selection| walk(child, dir, selection, tally),
    )
}

/// The entries of the folder `path`, sorted by name (checked against [`MAX_DEPTH`]).
fn listing(path: &Path, dir: &[String]) -> Result<Vec<std::fs::DirEntry>, TransferError> {
    if dir.len() > MAX_DEPTH {
        return Err(file_error(
            path,
            std::io::Error::other(format!("folders nested deeper than {MAX_DEPTH} levels")),
        ));
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// Walks a subfolder (components pushed on the `Vec`) into the selection: whether
/// anything below it was selected.
type WalkFolder<'a> =
    dyn FnMut(&Path, &mut Vec<String>, &mut Selection) -> Result<bool, TransferError> + 'a;

/// Go through a folder's sorted `entries`: files selected, links and the rest skipped,
/// each subfolder handed to `subfolder` (with its components pushed on `dir`), which
/// says whether anything below it was selected.
fn walk_entries(
    entries: Vec<std::fs::DirEntry>,
    dir: &mut Vec<String>,
    selection: &mut Selection,
    tally: &AtomicUsize,
    subfolder: &mut WalkFolder<'_>,
) -> Result<bool, TransferError> {
    let mut any = false;
    for entry in entries {
        let child = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            selection
                .skipped
                .push(format!("{}: name is not UTF-8", child.display()));
            continue;
        };
        let kind = entry.file_type().map_err(|e| file_error(&child, e))?;
        if kind.is_symlink() {
            selection
                .skipped
                .push(format!("{}: symbolic link, not followed", child.display()));
        } else if kind.is_dir() {
            dir.push(name);
            if !subfolder(&child, dir, selection)? {
                selection.empty_dirs.push(dir.clone());
                count(tally)?;
            }
            dir.pop();
            any = true;
        } else if kind.is_file() {
            let meta = entry.metadata().map_err(|e| file_error(&child, e))?;
            selection.files.push(Outgoing {
                name,
                path: child,
                dir: dir.clone(),
                executable: meta.permissions().mode() & 0o111 != 0,
                size: meta.len(),
                listed: Some(Listed {
                    metadata: meta,
                    at: std::time::Instant::now(),
                }),
                ..Outgoing::default()
            });
            count(tally)?;
            any = true;
        } else {
            selection
                .skipped
                .push(format!("{}: not a regular file", child.display()));
        }
    }
    Ok(any)
}

/// One more entry selected in this send (`tally` counts them all, across threads):
/// refused past [`MAX_FILES`].
fn count(tally: &AtomicUsize) -> Result<(), TransferError> {
    match tally.fetch_add(1, Ordering::Relaxed) {
        n if n >= MAX_FILES => Err(too_many()),
        _ => Ok(()),
    }
}

fn check_count(selection: &Selection) -> Result<(), TransferError> {
    if selection.entries() > MAX_FILES {
        return Err(too_many());
    }
    Ok(())
}

fn too_many() -> TransferError {
    TransferError::Protocol(format!(
        "more than {MAX_FILES} files and folders in one send: send subfolders separately"
    ))
}

fn file_error(path: &Path, source: std::io::Error) -> TransferError {
    TransferError::File {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn trees_keep_their_shape_and_skip_links() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("top");
        fs::create_dir_all(top.join("a/deep/er")).unwrap();
        fs::create_dir_all(top.join("empty")).unwrap();
        fs::create_dir_all(top.join("only-link")).unwrap();
        fs::write(top.join("z.txt"), b"z").unwrap();
        fs::write(top.join("a/x.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(top.join("a/x.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(top.join("a/deep/er/f"), b"ff").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", top.join("only-link/passwd")).unwrap();
        std::os::unix::fs::symlink(&top, top.join("a/loop")).unwrap();

        let s = select(std::slice::from_ref(&top)).unwrap();
        let files: Vec<_> = s
            .files
            .iter()
            .map(|f| (f.dir.join("/"), f.name.as_str(), f.executable, f.size))
            .collect();
        assert_eq!(
            files,
            [
                ("top/a/deep/er".to_string(), "f", false, 2),
                ("top/a".to_string(), "x.sh", true, 10),
                ("top".to_string(), "z.txt", false, 1),
            ]
        );
        let mut empty = s.empty_dirs.clone();
        empty.sort();
        assert_eq!(empty, [vec!["top", "empty"], vec!["top", "only-link"]]);
        assert_eq!(s.skipped.len(), 2, "{:?}", s.skipped);
        assert!(s.skipped.iter().all(|w| w.contains("symbolic link")));
        // A file argument is sent by its own name, with no folder.
        let one = select(&[top.join("z.txt")]).unwrap();
        assert_eq!(one.files[0].name, "z.txt");
        assert!(one.files[0].dir.is_empty());
        // `.` is sent under its real name.
        let dot = select(&[top.join("a/deep/.")]).unwrap();
        assert_eq!(dot.files[0].dir, ["deep", "er"]);
    }

    /// What a walk selected, comparable: files (folder, name, size), empty folders,
    /// what was skipped.
    type Walked = (Vec<(String, String, u64)>, Vec<Vec<String>>, Vec<String>);

    fn walked(top: &Path, threads: usize) -> Result<Walked, String> {
        let mut selection = Selection::default();
        let mut dir = vec!["top".to_string()];
        let any = walk_with(top, &mut dir, &mut selection, threads, &AtomicUsize::new(0))
            .map_err(|e| e.to_string())?;
        assert!(any);
        let files = selection
            .files
            .iter()
            .map(|f| (f.dir.join("/"), f.name.clone(), f.size))
            .collect();
        Ok((files, selection.empty_dirs, selection.skipped))
    }

    #[test]
    fn subfolders_walked_at_once_give_the_same_selection_in_the_same_order() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("top");
        for d in 0..12 {
            let sub = top.join(format!("d{d:02}"));
            fs::create_dir_all(sub.join("inner")).unwrap();
            for f in 0..(d % 4) {
                fs::write(sub.join(format!("f{f}")), vec![b'x'; d * 10 + f]).unwrap();
            }
            fs::write(sub.join("inner/deep"), b"deep").unwrap();
            // Files between the folders, by name.
            fs::write(top.join(format!("d{d:02}.txt")), b"between").unwrap();
        }
        fs::create_dir_all(top.join("d05/empty/also-empty")).unwrap();
        std::os::unix::fs::symlink("/etc", top.join("d07/link")).unwrap();
        std::os::unix::fs::symlink("/etc", top.join("d08-link")).unwrap();
        let one = walked(&top, 1).unwrap();
        assert_eq!(one.0.len(), 12 + 12 + 18, "{one:?}");
        for threads in [2, 4, 16] {
            assert_eq!(walked(&top, threads).unwrap(), one, "{threads} threads");
        }
        // The first error in order is the one reported, however many walk.
        for bad in ["d03", "d09"] {
            let deep: PathBuf = (0..=MAX_DEPTH).map(|i| format!("n{i}")).collect();
            fs::create_dir_all(top.join(bad).join(&deep)).unwrap();
        }
        let one = walked(&top, 1).unwrap_err();
        assert!(one.contains("d03"), "{one}");
        assert_eq!(walked(&top, 4).unwrap_err(), one);
    }

    #[test]
    fn the_limit_holds_for_all_the_threads_together() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("top");
        // Three subfolders of 4,000: none too many alone, too many together.
        for d in 0..3 {
            let sub = top.join(format!("d{d}"));
            fs::create_dir_all(&sub).unwrap();
            for f in 0..4_000 {
                fs::File::create(sub.join(f.to_string())).unwrap();
            }
        }
        let tally = AtomicUsize::new(0);
        let mut dir = vec!["top".to_string()];
        let e = walk_with(&top, &mut dir, &mut Selection::default(), 3, &tally).unwrap_err();
        assert!(e.to_string().contains("send subfolders separately"), "{e}");
        // Each thread stopped at the first entry past the limit (one more per subfolder
        // at most), instead of listing all 12,000.
        let counted = tally.load(Ordering::Relaxed);
        assert!(counted <= MAX_FILES + 3, "{counted}");
    }

    #[test]
    fn too_many_entries_are_refused_early() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("many");
        fs::create_dir(&top).unwrap();
        for i in 0..=MAX_FILES {
            fs::create_dir(top.join(i.to_string())).unwrap();
        }
        let e = select(&[top]).unwrap_err();
        assert!(e.to_string().contains("send subfolders separately"), "{e}");
    }
}
