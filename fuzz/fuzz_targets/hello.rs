//! Hellos from the network: `Hello::decode` must never panic, whatever decodes must
//! re-encode to the same bytes, and `SessionKeys::open` must never panic nor accept
//! bytes that were not sealed with its key.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qpunch::meet::code::Code;
use qpunch::meet::pake::{Hello, Pake, Role, SessionKeys};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// A receiver's keys from one honest PAKE, made once.
fn keys() -> &'static SessionKeys {
    static KEYS: OnceLock<SessionKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let code: Code = "7-clockwork-crossover".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let (receiver, _) = Pake::start(&code, Role::Receiver, &mut rng);
        let (_, sender_msg) = Pake::start(&code, Role::Sender, &mut rng);
        receiver.finish(&sender_msg).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        assert_eq!(hello.encode().as_deref(), Ok(data));
    }
    assert!(
        keys().open(data).is_err(),
        "random bytes never authenticate"
    );
});
