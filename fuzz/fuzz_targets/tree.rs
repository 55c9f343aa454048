//! Untrusted encoded trees: `Tree::decode` must never panic, whatever decodes must
//! re-encode to the same bytes (one encoding per tree), and a decoded tree must survive
//! `root` and a `GroupVerifier` fed arbitrary bytes without panicking.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qpunch::transfer::tree::{GroupVerifier, Tree};

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into an encoded tree and a stream to verify.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize * 8).min(rest.len());
    let (encoded, stream) = rest.split_at(at);
    for bytes in [rest, encoded] {
        let Ok(tree) = Tree::decode(bytes) else {
            continue;
        };
        assert_eq!(tree.encode(), bytes);
        let root = tree.root();
        assert_eq!(Tree::decode_with_root(bytes, &root), Ok(tree.clone()));
        let tree = Arc::new(tree);
        let Ok(mut verifier) = GroupVerifier::new(tree.clone(), 0) else {
            panic!("offset 0 is valid for every tree");
        };
        let mut verified = 0;
        for piece in stream.chunks(97) {
            if verifier.update(piece).is_err() {
                break;
            }
            assert!(verifier.verified() >= verified);
            verified = verifier.verified();
        }
        assert!(verifier.verified() <= tree.size());
        let _ = verifier.finish();
    }
});
