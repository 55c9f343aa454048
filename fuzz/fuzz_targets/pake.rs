//! PAKE messages relayed by an untrusted rendezvous: `Pake::finish` must never panic,
//! and a sender whose PAKE message from the receiver was replaced by anything else must
//! end up with keys whose sealed hello the real receiver refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::identity::Fingerprint;
use qpunch::meet::code::Code;
use qpunch::meet::pake::{Hello, Pake, Role, VERSION};
use rand::SeedableRng;
use rand::rngs::StdRng;

fuzz_target!(|data: &[u8]| {
    let code: Code = "7-clockwork-crossover".parse().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let (receiver, receiver_msg) = Pake::start(&code, Role::Receiver, &mut rng);
    let (sender, sender_msg) = Pake::start(&code, Role::Sender, &mut rng);
    let receiver = receiver.finish(&sender_msg).unwrap();
    // The rendezvous hands the sender `data` instead of the receiver's message.
    let Ok(mut sender) = sender.finish(data) else {
        return;
    };
    let hello = Hello {
        version: VERSION,
        role: Role::Sender,
        fingerprint: Fingerprint::of_spki(b"sender"),
        candidates: vec![],
        nat: String::new(),
    };
    let sealed = sender.seal(&hello).unwrap();
    assert_eq!(
        receiver.open(&sealed).is_ok(),
        data == receiver_msg.as_slice()
    );
});
