//! Decodes arbitrary bytes as an authenticated probe or reply: must never panic, and
//! whatever verifies must survive an encode → decode round trip unchanged (a fixed key:
//! the fuzzer may find a valid tag only by breaking BLAKE3, so it mostly exercises the
//! checks before the tag and the plain decoder behind it via `Message::decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::wire::{Message, ProbeKey};

fuzz_target!(|data: &[u8]| {
    let key = ProbeKey::from_bytes([0x5a; 32]);
    if let Ok(message) = Message::decode_authenticated(data, &key) {
        let bytes = message.to_authenticated_vec(&key);
        assert_eq!(Message::decode_authenticated(&bytes, &key), Ok(message));
    }
    // A valid plain message made authenticated must verify and decode to itself.
    if let Ok(message) = Message::decode(data) {
        let bytes = message.to_authenticated_vec(&key);
        assert_eq!(Message::decode_authenticated(&bytes, &key), Ok(message));
    }
});
