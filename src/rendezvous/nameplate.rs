//! The nameplate: the public part of a code, and the one name the rendezvous pairs by.
//!
//! It lives here, below [`crate::meet`], because the rendezvous carries and checks it on
//! the wire (a chosen nameplate is validated before it is reserved); [`crate::meet::code`]
//! builds codes on top of it and re-exports it.

use std::fmt;
use std::str::FromStr;

/// Longest nameplate, in characters.
pub const MAX_NAMEPLATE_LEN: usize = 32;

/// The public part of a code: what the rendezvous pairs peers by.
///
/// 1 to [`MAX_NAMEPLATE_LEN`] characters of `a-z` and `0-9`: usually a small decimal
/// number the rendezvous hands out, but a script may pick any such token. No dash, since
/// the dash separates the parts of a code. Parsed case-insensitively, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nameplate(String);

impl Nameplate {
    /// The nameplate as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<u32> for Nameplate {
    fn from(number: u32) -> Self {
        Nameplate(number.to_string())
    }
}

impl fmt::Display for Nameplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why text is not a [`Nameplate`] (within a code, it becomes
/// [`CodeError::Nameplate`](crate::meet::code::CodeError::Nameplate)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad nameplate {nameplate:?}: {problem}")]
pub struct NameplateError {
    /// The nameplate as given (at most its first 40 characters).
    pub nameplate: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl FromStr for Nameplate {
    type Err = NameplateError;

    /// Accepts surrounding whitespace and any case. A nameplate may come from the
    /// (untrusted) rendezvous, so the error echoes at most a short prefix of the input.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let problem = if trimmed.is_empty() {
            "it is empty"
        } else if trimmed.chars().count() > MAX_NAMEPLATE_LEN {
            "it is longer than 32 characters"
        } else if !trimmed.chars().all(|c| c.is_ascii_alphanumeric()) {
            "only letters a-z and digits 0-9 are allowed"
        } else {
            return Ok(Nameplate(trimmed.to_ascii_lowercase()));
        };
        Err(NameplateError {
            nameplate: shown(trimmed),
            problem,
        })
    }
}

/// At most the first 40 characters of untrusted text, for error messages.
pub(crate) fn shown(text: &str) -> String {
    const SHOWN: usize = 40;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}
