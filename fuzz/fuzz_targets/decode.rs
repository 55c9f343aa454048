//! Decodes arbitrary bytes: must never panic, and whatever decodes must
//! survive an encode → decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let bytes = message.to_vec();
        assert_eq!(Message::decode(&bytes), Ok(message));
    }
});
