//! Untrusted file names: `sanitize` must never panic, and whatever it accepts must be a
//! single harmless path component that stays inside the download directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::transfer::names::sanitize;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(name) = sanitize(raw) {
        assert!(!name.is_empty() && name != "." && name != "..");
        assert!(!name.contains(['/', '\\', '\0']));
        assert!(!name.chars().any(char::is_control));
        let dir = std::path::Path::new("/downloads");
        assert_eq!(dir.join(&name).parent(), Some(dir));
    }
});
