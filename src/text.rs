//! Text a peer controls, on its way to a terminal or a log.
//!
//! Everything a peer sends can end up in front of a user: file names, decline reasons,
//! verdict errors, QUIC close reasons (which quinn prints verbatim), even before the peer
//! has authenticated. An escape sequence there could recolour or rewrite the terminal, set
//! its title, forge a line of output, or (with bidi controls) make text read differently
//! from what it is. Two functions, used at two depths:
//!
//! - [`peer`] wraps every peer-supplied string where it enters a message (library errors,
//!   reports): every control and format character becomes a visible `\u{..}` escape,
//!   newlines included, so a peer cannot start a line of its own;
//! - [`terminal`] is the last pass over everything the command line writes for humans: it
//!   escapes the same characters except our own line breaks. Whatever a future code path
//!   forgets to wrap, nothing raw reaches the terminal.

use crate::transfer::names::{display_safe, needs_display_escape};

/// Whether `c` is escaped by [`peer`]: a control or format character (including line
/// breaks and bidi controls) that must never reach a terminal raw.
pub fn is_unsafe(c: char) -> bool {
    needs_display_escape(c)
}

/// A peer-supplied string made safe to embed anywhere: controls, format characters and
/// line breaks escaped (see [`crate::transfer::names::display_safe`]).
pub fn peer(s: &str) -> String {
    display_safe(s)
}

/// Lossy UTF-8 of peer bytes (e.g. a QUIC close reason), made safe like [`peer`].
pub fn peer_bytes(bytes: &[u8]) -> String {
    display_safe(&String::from_utf8_lossy(bytes))
}

/// Our own multi-line text made safe for a terminal: like [`peer`], but `\n` stays a line
/// break. Apply it to the complete message, as the last step before printing.
pub fn terminal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c != '\n' && needs_display_escape(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NASTY: &str = "a\x1b]0;pwned\x07b\x1b[31mc\u{9b}d\u{202e}e\nforged line\rf";

    #[test]
    fn peer_text_keeps_no_control_and_no_line_break() {
        let out = peer(NASTY);
        assert!(!out.chars().any(needs_display_escape), "{out:?}");
        assert!(!out.contains('\n'));
        assert!(out.contains("\\u{1b}]0;pwned\\u{7}"), "{out}");
    }

    #[test]
    fn terminal_keeps_our_line_breaks_only() {
        let out = terminal(NASTY);
        assert_eq!(out.lines().count(), 2);
        assert!(
            !out.chars().any(|c| c != '\n' && needs_display_escape(c)),
            "{out:?}"
        );
        assert!(out.contains("\\u{d}f"));
    }

    #[test]
    fn close_reasons_are_escaped_even_when_not_utf8() {
        let out = peer_bytes(b"\xff\x1b[2J\xc2\x9b");
        assert_eq!(out, "\u{fffd}\\u{1b}[2J\\u{9b}");
    }
}
