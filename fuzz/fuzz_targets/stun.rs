//! The STUN decoding path on the shared socket: arbitrary bytes must never panic the
//! demultiplexer's test ([`qpunch::stun::is_stun`]) or the response parser, and whatever
//! the parser accepts names an address that passes the vetting (never loopback,
//! unspecified, multicast, ..., never port 0) of the family asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qpunch::stun;

fuzz_target!(|data: &[u8]| {
    let _ = stun::is_stun(data);
    let _ = stun::is_response(data);
    let txid = stun::transaction_id(data).unwrap_or([0; 12]);
    for v4 in [true, false] {
        if let Ok(binding) = stun::parse_binding_response(data, txid, v4) {
            assert!(stun::plausible_public(binding.mapped));
            assert_eq!(binding.mapped.is_ipv4(), v4);
        }
    }
});
