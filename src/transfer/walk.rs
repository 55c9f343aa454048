//! What `send DIR...` means: the files and empty folders of trees, as offers.
//!
//! A folder is sent as itself: `photos/2024/a.jpg` arrives as `OUT/photos/2024/a.jpg`.
//! Symbolic links inside a tree are never followed (a link could lead anywhere on the
//! sender's disk, and a loop would never end): they are skipped and said so, like sockets
//! and devices. Folders with nothing selected below them are sent as empty folders, so the
//! shape of the tree survives. Paths named on the command line are taken as given, links
//! included, as `cp` and `tar` do.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
            walk(path, &mut dir, &mut selection)?;
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

/// Add what is below `path` (whose components are `dir`); returns whether anything was.
fn walk(
    path: &Path,
    dir: &mut Vec<String>,
    selection: &mut Selection,
) -> Result<bool, TransferError> {
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
    let mut any = false;
    for entry in entries {
        let child = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            selection
                .skipped
                .push(format!("{}: name is not UTF-8", child.display()));
            continue;
        };
        // `file_type` does not follow symlinks.
        let kind = entry.file_type().map_err(|e| file_error(&child, e))?;
        if kind.is_symlink() {
            selection
                .skipped
                .push(format!("{}: symbolic link, not followed", child.display()));
        } else if kind.is_dir() {
            dir.push(name);
            if !walk(&child, dir, selection)? {
                selection.empty_dirs.push(dir.clone());
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
            any = true;
        } else {
            selection
                .skipped
                .push(format!("{}: not a regular file", child.display()));
        }
        check_count(selection)?;
    }
    Ok(any)
}

fn check_count(selection: &Selection) -> Result<(), TransferError> {
    if selection.entries() > MAX_FILES {
        return Err(TransferError::Protocol(format!(
            "more than {MAX_FILES} files and folders in one send: send subfolders separately"
        )));
    }
    Ok(())
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
