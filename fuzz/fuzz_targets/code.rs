//! Typed or pasted codes and nameplates: parsing must never panic, and whatever parses
//! must display as a canonical code that parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::meet::code::{Code, Nameplate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(code) = text.parse::<Code>() {
        let canonical = code.to_string();
        assert_eq!(canonical, canonical.to_ascii_lowercase());
        assert_eq!(canonical.split('-').count(), 3);
        assert_eq!(canonical.parse::<Code>().as_ref(), Ok(&code));
    }
    if let Ok(nameplate) = text.parse::<Nameplate>() {
        let shown = nameplate.to_string();
        assert!(!shown.is_empty() && shown.len() <= 32);
        assert!(
            shown
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
});
