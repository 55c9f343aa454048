//! Turning untrusted, peer-offered file names into safe destinations.
//!
//! A peer controls the name string completely, so everything here assumes it
//! is hostile: it may try to escape the download directory (`../`, absolute
//! paths, Windows drive or UNC prefixes), smuggle terminal escape sequences or
//! bidi overrides into logs and prompts, hit Windows device names, or race us
//! into overwriting a file. The intended flow on the receiver is:
//!
//! 1. [`sanitize`] the offered name (reject the transfer on error, logging the
//!    raw name only through [`display_safe`]);
//! 2. [`choose_destination`] inside the download directory;
//! 3. write into [`part_path`] of that destination, opened with
//!    [`std::fs::OpenOptions::create_new`] so a file or symlink that appeared
//!    since step 2 is refused rather than followed or truncated;
//! 4. after verifying the content, [`commit_part`] it into place.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Longest accepted name, in UTF-8 bytes.
///
/// 255 is the per-component limit of ext4, btrfs, APFS and (in UTF-16 units,
/// which is never fewer than this many bytes' worth) NTFS, so a longer name
/// could never be created anyway; rejecting it up front gives the peer a
/// clear error instead of an I/O failure halfway through a transfer.
pub const MAX_NAME_BYTES: usize = 255;

/// Suffix of the in-progress file; see [`part_path`].
const PART_SUFFIX: &str = ".part";

/// How many candidate names [`choose_destination`] tries before giving up.
const MAX_TRIES: u32 = 10_000;

/// Why an offered name was refused by [`sanitize`].
///
/// The variants are specific so the receiver can tell the user (and the
/// peer) *what* was wrong; the `Display` text never echoes a raw control
/// character, so it is safe to print as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum NameError {
    /// The name (or its last component, e.g. `"dir/"`) is empty: there is
    /// nothing to call the file.
    #[error("file name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`] UTF-8 bytes (the payload is
    /// the actual length), which no common filesystem can store.
    #[error("file name is {0} bytes long (at most {MAX_NAME_BYTES} allowed)")]
    TooLong(usize),
    /// The name is `.` or `..`, which denote directories, not files.
    #[error("file name must not be \".\" or \"..\"")]
    DotOrDotDot,
    /// The name is an absolute path (leading `/` or `\`, a Windows drive
    /// prefix such as `C:` or a UNC path `\\server`); a peer asking for one
    /// is trying to write outside the download directory.
    #[error("absolute paths are not allowed")]
    Absolute,
    /// Some component is `..`. Even though only the last component would be
    /// kept, a traversal attempt signals a hostile or broken peer, so the
    /// whole name is refused rather than silently "repaired".
    #[error("\"..\" path components are not allowed")]
    ParentComponent,
    /// The name contains a NUL byte, which C APIs would treat as the end of
    /// the string, so what is checked and what is opened could differ.
    #[error("file name contains a NUL character")]
    Nul,
    /// The name contains a control or invisible formatting character (C0,
    /// DEL, C1, bidi controls, BOM, line/paragraph separators). These can
    /// drive the terminal, forge log lines, or make `evil.exe` look like
    /// `exe.txt`, so they are refused anywhere in the raw name.
    #[error("file name contains control character {}", escape_char(*.0))]
    Control(char),
    /// The name is unusable on Windows (device names like `CON` or
    /// `LPT1.log`, a trailing `.` or space, or a `:` which would address an
    /// NTFS alternate data stream). The payload is the offending component.
    /// These are refused on every platform so a file accepted on Linux can
    /// later be copied to Windows without surprises, and so behaviour does
    /// not depend on the receiver's OS.
    #[error("file name {:?} is reserved or invalid on Windows", display_safe(.0))]
    Reserved(String),
}

/// Characters refused anywhere in an offered name.
///
/// Besides Unicode `Cc` (C0, DEL, C1) this covers the bidi controls (which
/// reorder what the user sees, e.g. U+202E makes `\u{202E}txt.exe` render as
/// `exe.txt`), the BOM / zero-width no-break space, and the line/paragraph
/// separators (they split log lines like `\n` does). Joiners (U+200C/D) are
/// deliberately allowed: they are needed for legitimate Persian, Indic and
/// emoji names and cannot reorder text.
fn is_forbidden_in_name(c: char) -> bool {
    crate::text::is_control_or_bidi(c)
}

/// `c` as `\u{..}` if it is unsafe to print, else as itself.
fn escape_char(c: char) -> String {
    display_safe(c.encode_utf8(&mut [0; 4]))
}

/// True for `X:` at the start followed by nothing or a separator, i.e. a
/// Windows drive root or drive-relative directory.
///
/// `a:b` (no separator) is left to the `:` check in [`is_reserved`] so it
/// is reported as an NTFS stream name rather than a path.
fn has_drive_prefix(raw: &str) -> bool {
    let b = raw.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b[1] == b':'
        && (b.len() == 2 || b[2] == b'/' || b[2] == b'\\')
}

/// Windows device names, matched case-insensitively against the part before
/// the first `.`. Windows also treats `COM¹`..`LPT³` (superscript digits) and
/// the console pseudo-files as devices, so they are included.
const RESERVED_DEVICES: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "COM0", "COM1", "COM2", "COM3", "COM4",
    "COM5", "COM6", "COM7", "COM8", "COM9", "COM¹", "COM²", "COM³", "LPT0", "LPT1", "LPT2", "LPT3",
    "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9", "LPT¹", "LPT²", "LPT³",
];

/// Whether a single (already split) name is reserved or invalid on Windows.
fn is_reserved(name: &str) -> bool {
    if name.contains(':') || name.ends_with('.') || name.ends_with(' ') {
        return true;
    }
    // "con.txt" and "CON .tar.gz" open the console on Windows: the device
    // check looks at the base before the first dot, ignoring trailing spaces.
    let base = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    RESERVED_DEVICES
        .iter()
        .any(|dev| dev.eq_ignore_ascii_case(base))
}

/// Turn an untrusted offered name into a single safe path component.
///
/// The result can be joined onto the download directory and is guaranteed to
/// stay directly inside it on Unix and Windows: it contains no separator, is
/// not `.`/`..`, has no control or bidi characters, is at most
/// [`MAX_NAME_BYTES`] long and is not a Windows device name.
///
/// Directory parts are stripped (`"a/b/c.txt"` becomes `"c.txt"`) because a
/// peer must not choose where a file goes, only what it is called; `/` and
/// `\` are both treated as separators whatever the local OS, since a name
/// that is harmless on Linux could be a path on Windows. Anything that looks
/// like an *attack* rather than a directory prefix (absolute paths, `..`
/// anywhere, control characters anywhere) is rejected outright instead of
/// being repaired, so a hostile peer is noticed. Leading dots are allowed here:
/// `.bashrc` stays inside the download directory like any other name, and whether a
/// hidden file may be created there is the receiver's policy (see [`undot`]).
///
/// Checks run in this order, which decides the error for names with several
/// problems: empty, NUL/control characters, absolute, bare `.`/`..`, any `..`
/// component, empty last component (`"dir/"`), `.`, length, Windows reserved.
pub fn sanitize(raw: &str) -> Result<String, NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    for c in raw.chars() {
        if c == '\0' {
            return Err(NameError::Nul);
        }
        if is_forbidden_in_name(c) {
            return Err(NameError::Control(c));
        }
    }
    // Leading '/' or '\' also covers UNC (`\\server`) and `\\?\` paths.
    if raw.starts_with(['/', '\\']) || has_drive_prefix(raw) {
        return Err(NameError::Absolute);
    }
    if raw == "." || raw == ".." {
        return Err(NameError::DotOrDotDot);
    }
    let is_sep = |c: char| c == '/' || c == '\\';
    if raw.split(is_sep).any(|part| part == "..") {
        return Err(NameError::ParentComponent);
    }
    // `split` always yields at least one item.
    let name = raw.split(is_sep).next_back().unwrap_or_default();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." {
        return Err(NameError::DotOrDotDot);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if is_reserved(name) {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(name.to_owned())
}

/// A sanitized name made visible: a leading `.` becomes `_` (`.bash_aliases` is stored as
/// `_bash_aliases`).
///
/// Receivers do this unless told otherwise, because a hidden file is where a planted
/// payload does harm: a `.bash_aliases` or `.profile` accepted with `--yes` into a home
/// directory would run at the next login, and nobody sees it in a plain `ls`.
pub fn undot(name: &str) -> String {
    match name.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => name.to_owned(),
    }
}

/// A peer-supplied string made safe to print: see [`crate::text::peer`], where the
/// escaping lives (kept under this name for the naming code and its callers).
pub use crate::text::peer as display_safe;

/// The temporary path for a destination: `<dest>.part` in the same directory.
///
/// Same directory, so the final [`commit_part`] is a link/rename within one
/// filesystem (atomic, no copy), and a visible suffix, so an interrupted
/// transfer is never mistaken for a complete file.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(PART_SUFFIX);
    PathBuf::from(s)
}

/// Whether something (a file, directory, or even a dangling symlink) is at `p`.
///
/// Uses `symlink_metadata` rather than `Path::exists`, which follows symlinks
/// and reports a dangling one as absent: writing there would then create the
/// symlink's target, possibly outside the download directory.
fn occupied(p: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `path` clashes with a destination already handed out: the same
/// path, or one being the other's `.part` sibling.
fn clashes_with_taken(path: &Path, taken: &HashSet<PathBuf>) -> bool {
    if taken.contains(path) || taken.contains(&part_path(path)) {
        return true;
    }
    // A taken "x" writes to "x.part", so a file literally named "x.part"
    // would collide with that transfer's temporary file.
    match path.as_os_str().to_str() {
        Some(s) => s
            .strip_suffix(PART_SUFFIX)
            .is_some_and(|base| taken.contains(Path::new(base))),
        None => false,
    }
}

/// Longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_bytes(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Candidate number `n` for `name`: the name itself for 0, else
/// `"stem (n).ext"`, shortened so that it plus `.part` fits in
/// [`MAX_NAME_BYTES`].
fn candidate_name(name: &str, n: u32) -> String {
    let suffix = if n == 0 {
        String::new()
    } else {
        format!(" ({n})")
    };
    // Leave room for ".part": otherwise a 251..=255-byte name would be
    // accepted but its temporary file could not be created.
    let budget = MAX_NAME_BYTES - PART_SUFFIX.len();
    let (stem, ext) = match name.rfind('.') {
        // A leading dot (".bashrc") marks a hidden file, not an extension.
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    let mut out = if stem.len() + suffix.len() + ext.len() <= budget {
        format!("{stem}{suffix}{ext}")
    } else if suffix.len() + ext.len() < budget {
        format!(
            "{}{suffix}{ext}",
            truncate_bytes(stem, budget - suffix.len() - ext.len())
        )
    } else {
        // Absurdly long "extension": shorten the whole name instead.
        format!("{}{suffix}", truncate_bytes(name, budget - suffix.len()))
    };
    // Truncation can expose a trailing '.' or ' ', reserved on Windows.
    while out.ends_with(['.', ' ']) {
        out.pop();
    }
    out
}

/// Choose where an accepted file goes: `dir/name`, or, when that exists (or
/// is in `taken`), `name (1).ext`, `name (2).ext`, ...
///
/// The extension is what follows the last dot (`archive.tar.gz` becomes
/// `archive.tar (1).gz`); a name without one, or whose only dot is leading
/// (`.bashrc`, `noext`), gets ` (1)` appended at the end. With `overwrite`,
/// `dir/name` is returned even if it exists. Otherwise the `.part` sibling
/// (`<chosen>.part`) must not exist either, so an in-progress or leftover
/// partial is never clobbered. After 10 000 candidates it gives up with an
/// [`io::Error`].
///
/// Why each rule exists:
///
/// * Never overwriting by default: a peer must not be able to destroy the
///   user's files just by offering a name that already exists.
/// * `taken` holds destinations already handed out in this session whose
///   files may not exist yet (several transfers of `photo.jpg` in one batch
///   must not share a path). It is honoured **even with `overwrite`**, since
///   two concurrent transfers into one file would corrupt both; a candidate
///   also clashes if it is the `.part` of a taken path or vice versa.
/// * The `.part` check keeps a resumable or in-progress partial intact.
/// * Existence is tested without following symlinks, so a dangling symlink
///   counts as occupied and is never written through.
/// * Names are shortened (keeping the extension and the ` (n)` suffix) so
///   that the chosen name *plus* `.part` fits in [`MAX_NAME_BYTES`]. This
///   means a 251..=255-byte name is stored under a shorter name, even with
///   `overwrite`; without it the temporary file could not be created.
///
/// `name` must already be the output of [`sanitize`]; anything else is
/// refused with [`io::ErrorKind::InvalidInput`], so this function alone
/// already guarantees the result lies directly inside `dir`. Running out of
/// candidates yields [`io::ErrorKind::AlreadyExists`]; a failure to inspect
/// `dir` (e.g. permission denied) is returned as is.
///
/// This only *chooses*: another process can still create the path before the
/// caller does, which is why the `.part` should be opened with `create_new`
/// and moved into place with [`commit_part`].
pub fn choose_destination(
    dir: &Path,
    name: &str,
    overwrite: bool,
    taken: &HashSet<PathBuf>,
) -> io::Result<PathBuf> {
    choose_destination_from(dir, name, overwrite, taken, 0).map(|(path, _)| path)
}

/// [`choose_destination`] starting at candidate number `start` (0 is the name itself), and
/// also returning the number chosen.
///
/// A caller that reserves many files of one name (a hostile manifest can offer 10,000
/// files all called `a`) passes the number after the last one it handed out, so each
/// choice costs a step instead of a scan over every earlier candidate.
pub fn choose_destination_from(
    dir: &Path,
    name: &str,
    overwrite: bool,
    taken: &HashSet<PathBuf>,
    start: u32,
) -> io::Result<(PathBuf, u32)> {
    if sanitize(name).as_deref() != Ok(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a sanitized file name: {:?}", display_safe(name)),
        ));
    }
    for n in start..start.saturating_add(MAX_TRIES) {
        let cand = candidate_name(name, n);
        // Defensive: shortening must never produce an unsafe name (the name itself was
        // checked above).
        if cand != name && sanitize(&cand).as_deref() != Ok(cand.as_str()) {
            continue;
        }
        let path = dir.join(&cand);
        if clashes_with_taken(&path, taken) {
            continue;
        }
        if overwrite || !(occupied(&path)? || occupied(&part_path(&path))?) {
            return Ok((path, n));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free name for {:?} in {} after {MAX_TRIES} tries",
            display_safe(name),
            dir.display()
        ),
    ))
}

/// Move a verified `.part` file to its final name without ever replacing a
/// file that appeared meanwhile.
///
/// Without `overwrite` this is [`fs::hard_link`]`(part, dest)` (which fails
/// with [`io::ErrorKind::AlreadyExists`] if `dest` exists) followed by
/// removing `part`; with `overwrite` it is [`fs::rename`]. If `dest` exists
/// and `overwrite` is false, the error has kind `AlreadyExists` and both
/// files are left untouched.
///
/// [`choose_destination`] checked that `dest` was free, but time has passed
/// since (a whole transfer), so a plain `rename` could silently replace a
/// file the user or another transfer created meanwhile. Creating a hard link
/// is atomic and fails if `dest` exists, which closes that race.
///
/// Some filesystems (FAT/exFAT, some network mounts) cannot hard-link, and a
/// link cannot cross filesystems. For any `hard_link` failure other than
/// `AlreadyExists`/`NotFound`, `dest` is instead claimed atomically by
/// creating an empty file there with `create_new` (which also fails if it
/// exists) and the part is renamed over that placeholder, so the no-clobber
/// guarantee still holds; the placeholder is removed again if the rename
/// fails.
///
/// If the link succeeds but removing `part` fails, the error is returned even
/// though `dest` is complete; the caller should then not delete `dest`.
pub fn commit_part(part: &Path, dest: &Path, overwrite: bool) -> io::Result<()> {
    if overwrite {
        return fs::rename(part, dest);
    }
    match fs::hard_link(part, dest) {
        Ok(()) => fs::remove_file(part),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
            ) =>
        {
            Err(e)
        }
        Err(_) => commit_via_placeholder(part, dest),
    }
}

/// No-clobber move for filesystems without hard links; see [`commit_part`].
fn commit_via_placeholder(part: &Path, dest: &Path) -> io::Result<()> {
    if !occupied(part)? {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("partial file {} does not exist", part.display()),
        ));
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    fs::rename(part, dest).inspect_err(|_| {
        // Best effort: do not leave an empty file under the final name.
        let _ = fs::remove_file(dest);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(err: NameError) -> Result<String, NameError> {
        Err(err)
    }
    fn ok(s: &str) -> Result<String, NameError> {
        Ok(s.to_owned())
    }
    fn reserved(s: &str) -> Result<String, NameError> {
        Err(NameError::Reserved(s.to_owned()))
    }

    #[test]
    fn sanitize_table() {
        let long = "a".repeat(300);
        let max = "b".repeat(MAX_NAME_BYTES);
        let long_multibyte = "é".repeat(128); // 256 bytes
        let cases: Vec<(&str, Result<String, NameError>)> = vec![
            // traversal and absolute paths
            ("../../etc/passwd", e(NameError::ParentComponent)),
            ("/etc/passwd", e(NameError::Absolute)),
            ("..\\..\\win.ini", e(NameError::ParentComponent)),
            ("C:\\Windows\\x", e(NameError::Absolute)),
            ("c:\\x", e(NameError::Absolute)),
            ("C:", e(NameError::Absolute)),
            ("z:/x", e(NameError::Absolute)),
            ("\\\\server\\share", e(NameError::Absolute)),
            ("\\\\?\\C:\\x", e(NameError::Absolute)),
            ("\\x", e(NameError::Absolute)),
            ("//server/share", e(NameError::Absolute)),
            ("a/../b", e(NameError::ParentComponent)),
            ("a\\..\\b", e(NameError::ParentComponent)),
            ("a/..", e(NameError::ParentComponent)),
            ("../x", e(NameError::ParentComponent)),
            ("x/../", e(NameError::ParentComponent)),
            // dots and empties
            (".", e(NameError::DotOrDotDot)),
            ("..", e(NameError::DotOrDotDot)),
            ("a/.", e(NameError::DotOrDotDot)),
            ("", e(NameError::Empty)),
            ("dir/", e(NameError::Empty)),
            ("dir\\", e(NameError::Empty)),
            // NUL and control/format characters, anywhere in the raw name
            ("a\0b", e(NameError::Nul)),
            ("dir\0/ok.txt", e(NameError::Nul)),
            ("evil\x1b[31m.txt", e(NameError::Control('\x1b'))),
            ("\u{202E}txt.exe", e(NameError::Control('\u{202E}'))),
            ("a\nb", e(NameError::Control('\n'))),
            ("a\rb", e(NameError::Control('\r'))),
            ("a\tb", e(NameError::Control('\t'))),
            ("a\x7fb", e(NameError::Control('\x7f'))),
            ("a\u{9b}b", e(NameError::Control('\u{9b}'))),
            ("a\u{200E}b", e(NameError::Control('\u{200E}'))),
            ("a\u{200F}b", e(NameError::Control('\u{200F}'))),
            ("a\u{202A}b", e(NameError::Control('\u{202A}'))),
            ("a\u{2066}b", e(NameError::Control('\u{2066}'))),
            ("a\u{2069}b", e(NameError::Control('\u{2069}'))),
            ("\u{FEFF}a", e(NameError::Control('\u{FEFF}'))),
            ("a\u{2028}b", e(NameError::Control('\u{2028}'))),
            ("\x1b/ok.txt", e(NameError::Control('\x1b'))), // before stripping
            // Windows reserved names and NTFS streams
            ("CON", reserved("CON")),
            ("con.txt", reserved("con.txt")),
            ("Con.tar.gz", reserved("Con.tar.gz")),
            ("CON .txt", reserved("CON .txt")),
            ("LPT1.log", reserved("LPT1.log")),
            ("lpt9", reserved("lpt9")),
            ("COM0", reserved("COM0")),
            ("com¹.txt", reserved("com¹.txt")),
            ("prn", reserved("prn")),
            ("aux.c", reserved("aux.c")),
            ("nul", reserved("nul")),
            ("dir/nul.txt", reserved("nul.txt")),
            ("name.", reserved("name.")),
            ("name ", reserved("name ")),
            ("   ", reserved("   ")),
            ("...", reserved("...")),
            ("a:b", reserved("a:b")),
            ("file.txt:stream", reserved("file.txt:stream")),
            ("ab:", reserved("ab:")),
            // length
            (long.as_str(), e(NameError::TooLong(300))),
            (long_multibyte.as_str(), e(NameError::TooLong(256))),
            (max.as_str(), Ok(max.clone())),
            // accepted
            ("dir/ok.txt", ok("ok.txt")),
            ("a/b/c.txt", ok("c.txt")),
            ("a\\b\\c.txt", ok("c.txt")),
            ("a//b", ok("b")),
            ("./x", ok("x")),
            ("ok.txt", ok("ok.txt")),
            ("música.flac", ok("música.flac")),
            ("日本語.txt", ok("日本語.txt")),
            ("👨\u{200D}👩.png", ok("👨\u{200D}👩.png")), // ZWJ is fine
            (".bashrc", ok(".bashrc")),
            ("..bashrc", ok("..bashrc")),
            ("...x", ok("...x")),
            ("CONSOLE.txt", ok("CONSOLE.txt")),
            ("COM10", ok("COM10")),
            ("xcon", ok("xcon")),
            (" lead", ok(" lead")),
            ("-rf", ok("-rf")),
        ];
        for (raw, want) in cases {
            assert_eq!(sanitize(raw), want, "sanitize({raw:?})");
        }
    }

    #[test]
    fn error_display_never_contains_controls() {
        for raw in ["evil\x1b[31m.txt", "\u{202E}txt.exe", "a\u{9b}b"] {
            let msg = sanitize(raw).unwrap_err().to_string();
            assert!(!msg.chars().any(crate::text::is_unsafe), "{msg:?}");
            assert!(msg.contains("\\u{"), "{msg:?}");
        }
    }

    #[test]
    fn display_safe_table() {
        let cases = [
            ("ok.txt", "ok.txt"),
            ("música", "música"),
            ("evil\x1b[31m.txt", "evil\\u{1b}[31m.txt"),
            ("a\nb\r", "a\\u{a}b\\u{d}"),
            ("\0", "\\u{0}"),
            ("\x7f\u{85}", "\\u{7f}\\u{85}"),
            ("\u{202E}txt.exe", "\\u{202e}txt.exe"),
            ("ok\u{200B}.txt", "ok\\u{200b}.txt"),
            ("\u{2028}\u{FEFF}\u{AD}", "\\u{2028}\\u{feff}\\u{ad}"),
            ("flag\u{E0067}", "flag\\u{e0067}"),
        ];
        for (input, want) in cases {
            assert_eq!(display_safe(input), want, "display_safe({input:?})");
        }
    }

    #[test]
    fn part_path_appends_suffix() {
        assert_eq!(
            part_path(Path::new("/d/a.txt")),
            PathBuf::from("/d/a.txt.part")
        );
        assert_eq!(part_path(Path::new("noext")), PathBuf::from("noext.part"));
    }

    #[test]
    fn candidate_names() {
        let cases = [
            ("name.ext", 1, "name (1).ext"),
            ("name.ext", 2, "name (2).ext"),
            ("archive.tar.gz", 1, "archive.tar (1).gz"),
            (".bashrc", 1, ".bashrc (1)"),
            ("noext", 3, "noext (3)"),
            ("noext", 0, "noext"),
        ];
        for (name, n, want) in cases {
            assert_eq!(candidate_name(name, n), want);
        }
    }

    #[test]
    fn candidate_names_fit_with_part_suffix() {
        let budget = MAX_NAME_BYTES - PART_SUFFIX.len();
        let long_stem = format!("{}.txt", "a".repeat(251));
        let long_multi = format!("{}.txt", "é".repeat(125));
        let long_ext = format!("a.{}", "e".repeat(253));
        let spaces = format!("a{}b", " ".repeat(253));
        for name in [&long_stem, &long_multi, &long_ext, &spaces] {
            assert_eq!(sanitize(name).as_ref(), Ok(name));
            for n in [0, 1, 9_999] {
                let c = candidate_name(name, n);
                assert!(c.len() <= budget, "{n}: {} bytes", c.len());
                assert_eq!(sanitize(&c).as_ref(), Ok(&c));
                if n > 0 {
                    assert!(c.contains(&format!(" ({n})")), "{c}");
                }
            }
        }
        let c = candidate_name(&long_stem, 1);
        assert!(c.ends_with("a (1).txt"), "{c}");
        assert_eq!(candidate_name(&spaces, 0), "a");
    }

    fn touch(p: &Path) {
        fs::write(p, b"x").unwrap();
    }

    #[test]
    fn choose_destination_free_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let got = choose_destination(d, "ok.txt", false, &HashSet::new()).unwrap();
        assert_eq!(got, d.join("ok.txt"));
    }

    #[test]
    fn choose_destination_numbers_existing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let none = HashSet::new();
        touch(&d.join("a.txt"));
        assert_eq!(
            choose_destination(d, "a.txt", false, &none).unwrap(),
            d.join("a (1).txt")
        );
        touch(&d.join("a (1).txt"));
        assert_eq!(
            choose_destination(d, "a.txt", false, &none).unwrap(),
            d.join("a (2).txt")
        );
        touch(&d.join("archive.tar.gz"));
        assert_eq!(
            choose_destination(d, "archive.tar.gz", false, &none).unwrap(),
            d.join("archive.tar (1).gz")
        );
        touch(&d.join(".bashrc"));
        assert_eq!(
            choose_destination(d, ".bashrc", false, &none).unwrap(),
            d.join(".bashrc (1)")
        );
        fs::create_dir(d.join("noext")).unwrap(); // a directory counts too
        assert_eq!(
            choose_destination(d, "noext", false, &none).unwrap(),
            d.join("noext (1)")
        );
    }

    #[test]
    fn choose_destination_respects_taken() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut taken = HashSet::new();
        for want in ["a.txt", "a (1).txt", "a (2).txt"] {
            let got = choose_destination(d, "a.txt", false, &taken).unwrap();
            assert_eq!(got, d.join(want));
            taken.insert(got);
        }
        // Honoured even with overwrite: two transfers must not share a file.
        let got = choose_destination(d, "a.txt", true, &taken).unwrap();
        assert_eq!(got, d.join("a (3).txt"));
    }

    #[test]
    fn choose_destination_taken_part_sibling_clash() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // "x" in flight writes "x.part"; a file named "x.part" must avoid it.
        let taken: HashSet<_> = [d.join("x")].into();
        assert_eq!(
            choose_destination(d, "x.part", false, &taken).unwrap(),
            d.join("x (1).part")
        );
        // And "x" must avoid a taken "x.part" (its own .part would be it).
        let taken: HashSet<_> = [d.join("x.part")].into();
        assert_eq!(
            choose_destination(d, "x", false, &taken).unwrap(),
            d.join("x (1)")
        );
    }

    #[test]
    fn choose_destination_respects_existing_part() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("a.txt.part"));
        assert_eq!(
            choose_destination(d, "a.txt", false, &HashSet::new()).unwrap(),
            d.join("a (1).txt")
        );
        // overwrite ignores what is on disk
        assert_eq!(
            choose_destination(d, "a.txt", true, &HashSet::new()).unwrap(),
            d.join("a.txt")
        );
    }

    #[test]
    fn choose_destination_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("a.txt"));
        assert_eq!(
            choose_destination(d, "a.txt", true, &HashSet::new()).unwrap(),
            d.join("a.txt")
        );
    }

    #[cfg(unix)]
    #[test]
    fn choose_destination_dangling_symlink_is_occupied() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::os::unix::fs::symlink("/nonexistent/target", d.join("a.txt")).unwrap();
        assert_eq!(
            choose_destination(d, "a.txt", false, &HashSet::new()).unwrap(),
            d.join("a (1).txt")
        );
    }

    #[test]
    fn choose_destination_rejects_unsanitized() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/b", "", "CON", "x\x1b"] {
            let err = choose_destination(dir.path(), bad, true, &HashSet::new()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn choose_destination_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut taken: HashSet<_> = (1..MAX_TRIES)
            .map(|n| d.join(candidate_name("f.bin", n)))
            .collect();
        taken.insert(d.join("f.bin"));
        let err = choose_destination(d, "f.bin", false, &taken).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        // The 10_000th try (n = 9_999) is still made.
        taken.remove(&d.join("f (9999).bin"));
        assert_eq!(
            choose_destination(d, "f.bin", false, &taken).unwrap(),
            d.join("f (9999).bin")
        );
    }

    #[test]
    fn choose_destination_shortens_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let name = format!("{}.txt", "a".repeat(251)); // 255 bytes
        let got = choose_destination(d, &name, false, &HashSet::new()).unwrap();
        let file = got.file_name().unwrap().to_str().unwrap();
        assert!(file.len() + PART_SUFFIX.len() <= MAX_NAME_BYTES);
        assert!(file.ends_with(".txt"));
        // The .part really can be created on this filesystem.
        fs::write(part_path(&got), b"data").unwrap();
        commit_part(&part_path(&got), &got, false).unwrap();
        assert_eq!(fs::read(&got).unwrap(), b"data");
    }

    #[test]
    fn commit_part_moves_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let part = part_path(&dest);
        fs::write(&part, b"payload").unwrap();
        commit_part(&part, &dest, false).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        assert!(!part.exists());
    }

    #[test]
    fn commit_part_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let part = part_path(&dest);
        fs::write(&part, b"new").unwrap();
        fs::write(&dest, b"appeared meanwhile").unwrap();
        let err = commit_part(&part, &dest, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&dest).unwrap(), b"appeared meanwhile");
        assert_eq!(fs::read(&part).unwrap(), b"new", "part is kept");
    }

    #[cfg(unix)]
    #[test]
    fn commit_part_refuses_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, &dest).unwrap();
        let part = part_path(&dest);
        fs::write(&part, b"new").unwrap();
        let err = commit_part(&part, &dest, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!target.exists());
    }

    #[test]
    fn commit_part_overwrite_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let part = part_path(&dest);
        fs::write(&part, b"new").unwrap();
        fs::write(&dest, b"old").unwrap();
        commit_part(&part, &dest, true).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert!(!part.exists());
    }

    #[test]
    fn commit_part_missing_part() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let err = commit_part(&part_path(&dest), &dest, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!dest.exists());
    }

    #[test]
    fn placeholder_fallback_moves_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.txt");
        let part = part_path(&dest);
        fs::write(&part, b"new").unwrap();
        commit_via_placeholder(&part, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert!(!part.exists());

        fs::write(&part, b"newer").unwrap();
        let err = commit_via_placeholder(&part, &dest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&dest).unwrap(), b"new");

        let other = dir.path().join("b.txt");
        let err = commit_via_placeholder(&dir.path().join("missing"), &other).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!other.exists(), "no placeholder left behind");
    }

    /// Strings rich in the characters that matter here, plus arbitrary ones.
    fn tricky_string() -> impl Strategy<Value = String> {
        let ch = prop_oneof![
            4 => prop::sample::select(vec![
                '/', '\\', '.', ':', ' ', '\0', '\x1b', '\u{202E}', 'C', 'o', 'n',
                'L', 'P', 'T', '1', 'a', 'é', '\u{200D}',
            ]),
            1 => any::<char>(),
        ];
        prop::collection::vec(ch, 0..24).prop_map(|v| v.into_iter().collect())
    }

    fn check_safe(raw: &str) {
        let Ok(name) = sanitize(raw) else { return };
        assert!(!name.is_empty());
        assert!(name.len() <= MAX_NAME_BYTES);
        assert!(!name.contains(['/', '\\', '\0', ':']), "{name:?}");
        assert!(
            !name
                .chars()
                .any(|c| c.is_control() || is_forbidden_in_name(c))
        );
        assert!(name != "." && name != "..");
        assert!(!is_reserved(&name));
        // Idempotent: a sanitized name is accepted unchanged.
        assert_eq!(sanitize(&name).as_ref(), Ok(&name));
        for dir in ["/tmp/dl", "dl", "/"] {
            let dir = Path::new(dir);
            let joined = dir.join(&name);
            assert_eq!(joined.parent(), Some(dir), "{name:?}");
            assert_eq!(joined.file_name().and_then(|f| f.to_str()), Some(&*name));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn sanitize_output_is_safe_any(raw in any::<String>()) {
            check_safe(&raw);
        }

        #[test]
        fn sanitize_output_is_safe_tricky(raw in tricky_string()) {
            check_safe(&raw);
        }

        #[test]
        fn display_safe_output_has_no_controls(s in any::<String>()) {
            let out = display_safe(&s);
            prop_assert!(!out.chars().any(crate::text::is_unsafe));
        }

        #[test]
        fn candidates_stay_safe(raw in tricky_string(), n in 0u32..MAX_TRIES) {
            if let Ok(name) = sanitize(&raw) {
                let c = candidate_name(&name, n);
                prop_assert!(c.len() + PART_SUFFIX.len() <= MAX_NAME_BYTES);
                prop_assert_eq!(sanitize(&c), Ok(c.clone()));
            }
        }
    }
}
