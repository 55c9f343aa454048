//! The receiver's checks of a manifest that need neither the disk nor a person: ids,
//! hashes, names and folders, whether the sizes fit, whether a partial can be resumed.
//!
//! Pure functions over plain data, so every refusal a hostile manifest can provoke is
//! tested here directly; [`super::receive`] runs them in order and only then touches the
//! directory or asks (its `decide`).

use std::collections::HashSet;

use super::tree::Tree;
use super::{FileOffer, MAX_DEPTH, MAX_TEXT, MAX_TREE, SMALL_FILE, is_hash_hex, names};

/// Every offer checked, in the manifest's order: the offer with its name and folders as
/// they will be stored, or the offer as sent and why it is declined. Duplicate ids are
/// declined after the first; a malformed hash and unsafe names are declined.
pub(super) fn offers(
    files: Vec<FileOffer>,
    allow_dotfiles: bool,
) -> Vec<Result<FileOffer, (FileOffer, String)>> {
    let mut seen_ids = HashSet::new();
    files
        .into_iter()
        .map(|mut offer| {
            if !seen_ids.insert(offer.id) {
                return Err((offer, "duplicate file id".to_string()));
            }
            // No hash: the file is hashed while it is sent (its trailer says the hash).
            if !offer.blake3.is_empty() && !is_hash_hex(&offer.blake3) {
                return Err((offer, "malformed hash".to_string()));
            }
            if offer.stream && (offer.size != 0 || !offer.blake3.is_empty() || offer.text) {
                return Err((offer, "malformed stream offer".to_string()));
            }
            if offer.text && offer.size > MAX_TEXT {
                let why = format!("a text of more than {}", human_bytes(MAX_TEXT));
                return Err((offer, why));
            }
            let name = match names::sanitize(&offer.name) {
                Ok(safe) if allow_dotfiles => Ok(safe),
                Ok(safe) => Ok(names::undot(&safe)),
                Err(e) => Err(format!(
                    "unsafe file name {}: {e}",
                    names::display_safe(&offer.name)
                )),
            };
            match (name, folder(&offer.dir, allow_dotfiles)) {
                (Ok(name), Ok(dir)) => {
                    offer.name = name;
                    offer.dir = dir;
                    Ok(offer)
                }
                (Err(why), _) | (_, Err(why)) => Err((offer, why)),
            }
        })
        .collect()
}

/// One folder name as stored, or why it is refused: it must already be a single safe
/// name (a folder is never rewritten into another path), dotted only where allowed.
fn component(raw: &str, allow_dotfiles: bool) -> Result<String, String> {
    match names::sanitize(raw) {
        Ok(safe) if safe == raw => Ok(if allow_dotfiles {
            safe
        } else {
            names::undot(&safe)
        }),
        Ok(_) => Err(format!(
            "unsafe folder name {}: it must be a single name",
            names::display_safe(raw)
        )),
        Err(e) => Err(format!(
            "unsafe folder name {}: {e}",
            names::display_safe(raw)
        )),
    }
}

/// Folder components as stored, or why they are refused.
fn folder(dir: &[String], allow_dotfiles: bool) -> Result<Vec<String>, String> {
    if dir.len() > MAX_DEPTH {
        return Err(format!("folders nested deeper than {MAX_DEPTH} levels"));
    }
    dir.iter()
        .map(|part| component(part, allow_dotfiles))
        .collect()
}

/// The empty folders of a manifest that are safe to make, and why each other one is left
/// out (they carry no data, so they are dropped, not declined).
pub(super) fn empty_folders(
    dirs: &[Vec<String>],
    allow_dotfiles: bool,
) -> (Vec<Vec<String>>, Vec<String>) {
    let mut safe = Vec::new();
    let mut left_out = Vec::new();
    for dir in dirs {
        match folder(dir, allow_dotfiles) {
            Ok(dir) if !dir.is_empty() => safe.push(dir),
            Ok(_) => {}
            Err(why) => left_out.push(why),
        }
    }
    (safe, left_out)
}

/// Why offers of these sizes cannot be stored with `free` bytes free, if they cannot (the
/// sum is checked: sizes are the peer's). Unknown free space refuses nothing.
pub(super) fn space_refusal(
    sizes: impl IntoIterator<Item = u64>,
    free: Option<u64>,
) -> Option<String> {
    let total = sizes
        .into_iter()
        .try_fold(0u64, |sum, size| sum.checked_add(size));
    match (total, free) {
        (None, _) => {
            Some("the offered sizes add up to more than 16 EiB: not enough free space".to_string())
        }
        (Some(total), Some(free)) if total > free => Some(format!(
            "not enough free space: {} offered, {} free",
            human_bytes(total),
            human_bytes(free)
        )),
        _ => None,
    }
}

/// Whether an accepted offer resumes a partial we hold: only large files have partials,
/// and only a tree we are willing to receive can prove the partial's prefix.
pub(super) fn resumable(offer: &FileOffer, partials: &HashSet<String>) -> bool {
    offer.size > SMALL_FILE
        && !offer.stream
        && offer.part_keys().iter().any(|key| partials.contains(key))
        && Tree::encoded_len(offer.size).is_some_and(|len| len <= MAX_TREE)
}

/// Bytes for people (binary units), without pulling a UI crate into the library.
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn offer(id: u32, name: &str, dir: &[&str], size: u64) -> FileOffer {
        FileOffer {
            id,
            name: name.into(),
            dir: dir.iter().map(|d| d.to_string()).collect(),
            size,
            blake3: HASH.into(),
            ..Default::default()
        }
    }

    fn verdicts(files: Vec<FileOffer>, dotfiles: bool) -> Vec<Result<String, String>> {
        offers(files, dotfiles)
            .into_iter()
            .map(|r| match r {
                Ok(o) => Ok(format!("{}/{}", o.dir.join("/"), o.name)),
                Err((_, why)) => Err(why),
            })
            .collect()
    }

    #[test]
    fn hashless_streams_and_texts_are_checked() {
        let hashless = FileOffer {
            blake3: String::new(),
            ..offer(1, "first-send.bin", &[], 10 << 20)
        };
        let stream = FileOffer {
            stream: true,
            size: 0,
            ..hashless.clone()
        };
        let sized_stream = FileOffer {
            id: 3,
            size: 5,
            ..stream.clone()
        };
        let hashed_stream = FileOffer {
            id: 4,
            blake3: HASH.into(),
            ..stream.clone()
        };
        let text = FileOffer {
            id: 5,
            text: true,
            size: MAX_TEXT,
            ..hashless.clone()
        };
        let long_text = FileOffer {
            id: 6,
            size: MAX_TEXT + 1,
            ..text.clone()
        };
        let got = verdicts(
            vec![
                hashless,
                FileOffer { id: 2, ..stream },
                sized_stream,
                hashed_stream,
                text,
                long_text,
            ],
            false,
        );
        assert_eq!(got[0], Ok("/first-send.bin".into()));
        assert_eq!(got[1], Ok("/first-send.bin".into()));
        assert_eq!(got[2], Err("malformed stream offer".into()));
        assert_eq!(got[3], Err("malformed stream offer".into()));
        assert_eq!(got[4], Ok("/first-send.bin".into()));
        assert_eq!(got[5], Err("a text of more than 64.0 KiB".into()));
    }

    #[test]
    fn a_first_send_finds_its_partial_by_path_and_size() {
        let mut hashless = offer(1, "big.iso", &["isos"], 10 << 20);
        hashless.blake3.clear();
        let keys = hashless.part_keys();
        assert_eq!(keys.len(), 1);
        let partials: HashSet<String> = keys.iter().cloned().collect();
        assert!(resumable(&hashless, &partials));
        // The same file with its hash known (a later send) finds it too.
        let hashed = offer(1, "big.iso", &["isos"], 10 << 20);
        assert_eq!(hashed.part_keys()[1], keys[0]);
        assert!(resumable(&hashed, &partials));
        // Another name, folder or size does not; nor does a stream.
        for other in [
            offer(1, "big2.iso", &["isos"], 10 << 20),
            offer(1, "big.iso", &[], 10 << 20),
            offer(1, "big.iso", &["isos"], 11 << 20),
            FileOffer {
                stream: true,
                ..hashless.clone()
            },
        ] {
            let mut other = other;
            other.blake3.clear();
            assert!(!resumable(&other, &partials), "{other:?}");
        }
    }

    #[test]
    fn offers_are_checked_in_order_and_each_refusal_says_why() {
        let mut bad_hash = offer(3, "c", &[], 1);
        bad_hash.blake3 = HASH.to_uppercase();
        let got = verdicts(
            vec![
                offer(1, "a.txt", &["docs"], 1),
                offer(1, "again.txt", &[], 1),
                bad_hash,
                offer(4, "../escape", &[], 1),
                offer(5, "ok", &["a/b"], 1),
                offer(6, "ok", &[".."], 1),
                offer(7, "x\u{1b}[31m", &[], 1),
            ],
            false,
        );
        assert_eq!(got[0], Ok("docs/a.txt".into()));
        assert_eq!(got[1], Err("duplicate file id".into()));
        assert_eq!(got[2], Err("malformed hash".into()));
        assert!(
            got[3].as_ref().unwrap_err().starts_with("unsafe file name"),
            "{got:?}"
        );
        assert!(
            got[4]
                .as_ref()
                .unwrap_err()
                .contains("must be a single name"),
            "{got:?}"
        );
        assert!(
            got[5]
                .as_ref()
                .unwrap_err()
                .starts_with("unsafe folder name"),
            "{got:?}"
        );
        let escaped = got[6].as_ref().unwrap_err();
        assert!(
            escaped.contains("\\u{1b}") && !escaped.contains('\x1b'),
            "{escaped:?}"
        );
    }

    #[test]
    fn dotfiles_are_undotted_unless_allowed() {
        let files = || vec![offer(1, ".bashrc", &[".config"], 1)];
        assert_eq!(verdicts(files(), false), vec![Ok("_config/_bashrc".into())]);
        assert_eq!(verdicts(files(), true), vec![Ok(".config/.bashrc".into())]);
    }

    #[test]
    fn folders_deeper_than_the_limit_are_refused() {
        let deep: Vec<String> = (0..=MAX_DEPTH).map(|i| format!("d{i}")).collect();
        let deep: Vec<&str> = deep.iter().map(String::as_str).collect();
        let got = verdicts(vec![offer(1, "f", &deep, 1)], false);
        assert!(
            got[0].as_ref().unwrap_err().contains("nested deeper"),
            "{got:?}"
        );
        let ok = verdicts(vec![offer(1, "f", &deep[..MAX_DEPTH], 1)], false);
        assert!(ok[0].is_ok(), "{ok:?}");
    }

    #[test]
    fn empty_folders_keep_the_safe_ones_and_say_why_the_rest_are_left_out() {
        let dirs = vec![
            vec!["keep".to_string(), "me".to_string()],
            vec![],
            vec!["..".to_string()],
            vec![".hidden".to_string()],
        ];
        let (safe, left_out) = empty_folders(&dirs, false);
        assert_eq!(
            safe,
            vec![
                vec!["keep".to_string(), "me".to_string()],
                vec!["_hidden".to_string()]
            ]
        );
        assert_eq!(left_out.len(), 1);
        assert!(
            left_out[0].starts_with("unsafe folder name"),
            "{left_out:?}"
        );
    }

    #[test]
    fn space_is_refused_when_the_sum_exceeds_free_or_overflows() {
        assert_eq!(space_refusal([10, 20], Some(30)), None);
        let short = space_refusal([10, 21], Some(30)).unwrap();
        assert_eq!(short, "not enough free space: 31 B offered, 30 B free");
        let overflow = space_refusal([u64::MAX, 1], None).unwrap();
        assert!(overflow.contains("more than 16 EiB"), "{overflow}");
        assert_eq!(space_refusal([u64::MAX], None), None);
    }

    #[test]
    fn only_large_files_with_a_held_partial_resume() {
        let partials: HashSet<String> = [HASH.to_string()].into();
        assert!(resumable(&offer(1, "big", &[], SMALL_FILE + 1), &partials));
        assert!(!resumable(&offer(1, "small", &[], SMALL_FILE), &partials));
        assert!(!resumable(
            &offer(1, "big", &[], SMALL_FILE + 1),
            &HashSet::new()
        ));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
