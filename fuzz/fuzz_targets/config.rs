//! Plugin configuration parsing: arbitrary bytes, and JSON documents built
//! from the input out of the schema's own words so that they get past the
//! syntax into compilation.
//!
//! Checks: nothing panics; a configuration that compiles also compiles
//! through the sharing path (`from_json_shareable` then `from_parts`), and
//! decides a request with its credential headers without panicking.
#![no_main]

use std::sync::Arc;

use keygate_core::headers::HeaderMap;
use keygate_core::keys::KeyStore;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use keygate_fuzz::{byte, json};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let doc: Vec<u8> = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut u = Unstructured::new(rest);
        let depth = 2 + u32::from(byte(&mut u) % 4);
        match json(&mut u, depth) {
            Ok(v) => v.to_string().into_bytes(),
            Err(_) => return,
        }
    };
    let Ok(policy) = Policy::from_json(&doc) else {
        return;
    };
    let (shared, rest) = match Policy::from_json_shareable(&doc) {
        Ok(parts) => parts,
        Err(e) => panic!("compiles with from_json, not from_json_shareable: {e:?}"),
    };
    // What another VM receives: the key store's wire form and the rest.
    let wire = shared.keys().fixed().as_bytes().to_vec();
    let Some(keys) = KeyStore::from_bytes(wire) else {
        panic!("the key store's wire form does not load");
    };
    if let Err(e) = Policy::from_parts(&rest, Arc::new(keys)) {
        panic!("from_parts refuses what from_json_shareable returned: {e:?}");
    }

    // A request carrying a key in every usual place.
    let pairs: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":path", b"/api?campaign=c-17"),
        (b":authority", b"api.example.com"),
        (b"x-api-key", b"a"),
        (b"authorization", b"Bearer a"),
        (b"x-campaign", b"c-17"),
    ];
    let map = HeaderMap::from_pairs(pairs);
    let host = FakeHost::default();
    if let keygate_core::Decision::Allow(a) = policy.decide(&map, &host) {
        let _ = a.edits.strip().count();
        if let Some(hold) = a.body_check {
            let _ = policy.decide_body(hold, br#"{"campaign":"c-17"}"#, false);
        }
    }
});
