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

/// A control, bidi or separator character: Unicode `Cc` (C0, DEL, C1), the bidi controls
/// (which reorder what the user sees, e.g. U+202E makes `\u{202E}txt.exe` render as
/// `exe.txt`), the BOM / zero-width no-break space, and the line/paragraph separators (they
/// split log lines like `\n` does). Joiners (U+200C/D) are not in it: legitimate Persian,
/// Indic and emoji text needs them and they cannot reorder text. File names may not contain
/// any of these ([`crate::transfer::names::sanitize`]).
pub fn is_control_or_bidi(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'                  // ARABIC LETTER MARK (bidi)
            | '\u{200E}' | '\u{200F}'   // LRM, RLM
            | '\u{202A}'..='\u{202E}'   // LRE, RLE, PDF, LRO, RLO
            | '\u{2066}'..='\u{2069}'   // LRI, RLI, FSI, PDI
            | '\u{2028}' | '\u{2029}'   // LINE / PARAGRAPH SEPARATOR
            | '\u{FEFF}' // BOM / ZWNBSP
        )
}

/// Unicode general category `Cf` (format characters), as of Unicode 16.
///
/// Used only for display: these are invisible, so escaping them lets a user
/// see that `ok\u{200B}.txt` is not `ok.txt`.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Whether `c` is escaped by [`peer`]: a control or format character (including line
/// breaks and bidi controls) that must never reach a terminal raw.
pub fn is_unsafe(c: char) -> bool {
    // Most text is ASCII, where only the C0 controls and DEL are unsafe.
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    is_control_or_bidi(c) || is_format(c)
}

/// A peer-supplied string made safe to embed anywhere (terminals, logs): escapes every control/format char as
/// `\u{..}`, so no terminal escape passes through.
///
/// Use this whenever a peer-supplied string (a raw offered name, a rejected
/// name, a peer's error message) is shown to a user or written to a log:
/// an unescaped ESC could recolour or rewrite the terminal, a newline or
/// U+2028 could forge a log line, and a bidi override could make the text
/// read differently from what it is. Escaped are Unicode `Cc` (C0, DEL, C1),
/// every `Cf` format character (bidi controls, zero-width characters, soft
/// hyphen, BOM, tag characters, ...) and the line/paragraph separators; the
/// escape uses Rust's `\u{1b}` notation. Everything else, including
/// non-ASCII letters such as `música`, passes through unchanged. A literal
/// backslash is not escaped, so the output is for humans, not for parsing.
pub fn peer(s: &str) -> String {
    if !s.chars().any(is_unsafe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Lossy UTF-8 of peer bytes (e.g. a QUIC close reason), made safe like [`peer`].
pub fn peer_bytes(bytes: &[u8]) -> String {
    peer(&String::from_utf8_lossy(bytes))
}

/// Our own multi-line text made safe for a terminal: like [`peer`], but `\n` stays a line
/// break. Apply it to the complete message, as the last step before printing.
pub fn terminal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c != '\n' && is_unsafe(c) {
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
        assert!(!out.chars().any(is_unsafe), "{out:?}");
        assert!(!out.contains('\n'));
        assert!(out.contains("\\u{1b}]0;pwned\\u{7}"), "{out}");
    }

    #[test]
    fn terminal_keeps_our_line_breaks_only() {
        let out = terminal(NASTY);
        assert_eq!(out.lines().count(), 2);
        assert!(!out.chars().any(|c| c != '\n' && is_unsafe(c)), "{out:?}");
        assert!(out.contains("\\u{d}f"));
    }

    #[test]
    fn close_reasons_are_escaped_even_when_not_utf8() {
        let out = peer_bytes(b"\xff\x1b[2J\xc2\x9b");
        assert_eq!(out, "\u{fffd}\\u{1b}[2J\\u{9b}");
    }
}
