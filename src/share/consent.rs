//! Who may send files to a receiver, decided the same way by every front end.
//!
//! [`Policy`] is what the [`Receiver`](crate::transfer::Receiver) enforces; this is how a
//! front end's options become one. The order matters and is the library's, not each
//! app's: an allow list wins, then "accept everyone", then asking a person; with nobody
//! to ask, a receiver meeting by code lets in only code holders (a code is a ticket),
//! and a receiver with no codes refuses to start rather than accept strangers silently.
//! [`Summary`] is what a prompt shows, so that front ends ask about the same thing.

use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::Fingerprint;
use crate::transfer::names::display_safe;
use crate::transfer::{Consent, FileOffer, Policy};

/// Who may send, as the user said it.
#[derive(Clone, Default)]
pub struct Accept {
    /// Accept every file from every sender without asking (`--yes`).
    pub everyone: bool,
    /// Accept files from these senders without asking (`--allow`); wins over `everyone`.
    pub allow: Vec<Fingerprint>,
    /// Who to ask about other senders, if anyone can be asked (a terminal, a dialog).
    pub ask: Option<Arc<dyn Consent>>,
}

impl std::fmt::Debug for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accept")
            .field("everyone", &self.everyone)
            .field("allow", &self.allow)
            .field("ask", &self.ask.is_some())
            .finish()
    }
}

impl Accept {
    /// Ask `decide` about senders not on the allow list: it gets the sender and the
    /// offered files and answers one `true` (take it) per file. It runs on a blocking
    /// thread, one offer at a time, so it may wait for a person.
    pub fn ask_with(
        mut self,
        decide: impl Fn(Fingerprint, &[FileOffer]) -> Vec<bool> + Send + Sync + 'static,
    ) -> Self {
        self.ask = Some(Arc::new(AskWith(decide)));
        self
    }
}

/// A closure as a [`Consent`].
struct AskWith<F>(F);

impl<F: Fn(Fingerprint, &[FileOffer]) -> Vec<bool> + Send + Sync> Consent for AskWith<F> {
    fn decide(&self, sender: Fingerprint, files: &[FileOffer]) -> Vec<bool> {
        (self.0)(sender, files)
    }
}

/// Nobody could be asked, and nothing else lets a sender in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("there is nobody to ask for consent, no allow list, and no code to let senders in")]
pub struct NobodyToAsk;

impl Accept {
    /// The policy to enforce; `codes` says whether this receiver hands out one-time codes
    /// (whose holders are admitted by ticket, past any policy).
    pub fn policy(&self, codes: bool) -> Result<Policy, NobodyToAsk> {
        if !self.allow.is_empty() {
            Ok(Policy::Allow(self.allow.clone()))
        } else if self.everyone {
            Ok(Policy::AcceptAll)
        } else if let Some(ask) = &self.ask {
            Ok(Policy::Ask(ask.clone()))
        } else if codes {
            // A code is a ticket: its holder is let in; nobody else.
            Ok(Policy::Allow(Vec::new()))
        } else {
            Err(NobodyToAsk)
        }
    }
}

/// One line of a consent prompt: a top-level file, or a folder with everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Safe to print; a folder's name ends with `/`.
    pub name: String,
    /// Files it stands for (1 for a file).
    pub files: u64,
    /// Their bytes (saturating: sizes are the peer's claim).
    pub bytes: u64,
    /// A stream (`send -`): its size is known only at its end.
    pub stream: bool,
    /// A text, to be shown rather than stored.
    pub text: bool,
}

impl Item {
    /// Whether this is a folder.
    pub fn is_folder(&self) -> bool {
        self.name.ends_with('/')
    }
}

/// What a person can take in about an offer: the top-level names, a folder once, the
/// largest first, and the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The sender.
    pub sender: Fingerprint,
    /// Files offered.
    pub files: usize,
    /// Bytes offered (saturating: a sum of peer-chosen sizes is never trusted not to
    /// wrap, though the receiver refuses offers larger than its free space before asking).
    pub bytes: u64,
    /// Largest first.
    pub items: Vec<Item>,
}

impl Summary {
    /// Summarize `files` offered by `sender`.
    pub fn new(sender: Fingerprint, files: &[FileOffer]) -> Self {
        let bytes = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        let mut items: Vec<Item> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for f in files {
            let (name, folder) = match f.dir.first() {
                Some(folder) => (format!("{}/", display_safe(folder)), true),
                None => (display_safe(&f.name), false),
            };
            let slot_key = if folder {
                name.clone()
            } else {
                format!("\0{}", f.id)
            };
            let slot = *index.entry(slot_key).or_insert_with(|| {
                items.push(Item {
                    name,
                    files: 0,
                    bytes: 0,
                    stream: !folder && f.stream,
                    text: !folder && f.text,
                });
                items.len() - 1
            });
            items[slot].files += 1;
            items[slot].bytes = items[slot].bytes.saturating_add(f.size);
        }
        items.sort_by_key(|item| std::cmp::Reverse(item.bytes));
        Summary {
            sender,
            files: files.len(),
            bytes,
            items,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    struct Never;
    impl Consent for Never {
        fn decide(&self, _: Fingerprint, files: &[FileOffer]) -> Vec<bool> {
            vec![false; files.len()]
        }
    }

    #[test]
    fn the_allow_list_wins_then_yes_then_asking_then_codes() {
        let fp = Identity::generate().unwrap().fingerprint();
        let ask: Arc<dyn Consent> = Arc::new(Never);
        let all = Accept {
            everyone: true,
            allow: vec![fp],
            ask: Some(ask.clone()),
        };
        assert!(matches!(all.policy(false), Ok(Policy::Allow(l)) if l == vec![fp]));
        let yes = Accept {
            allow: vec![],
            ..all.clone()
        };
        assert!(matches!(yes.policy(false), Ok(Policy::AcceptAll)));
        let asking = Accept {
            everyone: false,
            ..yes.clone()
        };
        assert!(matches!(asking.policy(false), Ok(Policy::Ask(_))));
        let nobody = Accept::default();
        assert!(matches!(nobody.policy(true), Ok(Policy::Allow(l)) if l.is_empty()));
        assert_eq!(nobody.policy(false).unwrap_err(), NobodyToAsk);
    }

    #[test]
    fn a_summary_counts_folders_once_largest_first() {
        let fp = Identity::generate().unwrap().fingerprint();
        let offer = |id, name: &str, dir: &[&str], size| FileOffer {
            id,
            name: name.into(),
            size,
            dir: dir.iter().map(|d| d.to_string()).collect(),
            ..FileOffer::default()
        };
        let files = [
            offer(1, "a.txt", &[], 10),
            offer(2, "x", &["photos"], 100),
            offer(3, "y", &["photos", "2024"], u64::MAX),
            offer(4, "a.txt", &[], 5),
        ];
        let summary = Summary::new(fp, &files);
        assert_eq!(summary.files, 4);
        assert_eq!(summary.bytes, u64::MAX);
        let lines: Vec<_> = summary
            .items
            .iter()
            .map(|i| (i.name.as_str(), i.files, i.is_folder()))
            .collect();
        assert_eq!(
            lines,
            [
                ("photos/", 2, true),
                ("a.txt", 1, false),
                ("a.txt", 1, false)
            ]
        );
    }
}
