//! Credential extraction and the whole header decision on arbitrary header
//! maps: any bytes, repeated names, any case.
//!
//! Checks: nothing panics; the wire form decodes back to the same pairs; an
//! extracted key is a non-empty slice of visible ASCII without a comma,
//! within the length limit, taken from one of the request's values; a
//! request admitted with a key carries that key's secret.
#![no_main]

use std::sync::OnceLock;

use keygate_core::credential::{Extractor, Source};
use keygate_core::headers::{encode, HeaderMap};
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use keygate_fuzz::{byte, recase, word_or_bytes};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

const SECRETS: [(&str, &[u8]); 3] = [
    ("a", b"kg_alpha0001"),
    ("b", b"kg_bravo0002"),
    ("c", b"kg_charlie03"),
];

/// Built once per thread (a policy is not `Sync`: it keeps a cache of
/// blocked buckets) and kept for the whole run.
fn policy() -> &'static Policy {
    thread_local! {
        static POLICY: &'static Policy = Box::leak(Box::new(build_policy()));
    }
    POLICY.with(|p| *p)
}

fn build_policy() -> Policy {
    let sha = |s: &[u8]| hex::encode(digest(s));
    let cfg = serde_json::json!({
        "credential_sources": [
            {"type": "header", "name": "x-api-key"},
            {"type": "header", "name": "X-Other-Key"},
            {"type": "bearer"}
        ],
        "key_prefixes": ["kg_"],
        "max_key_length": 32,
        "keys": [
            {"id": "a", "sha256": sha(SECRETS[0].1), "scopes": ["read"],
             "attachments": {"campaigns": ["c-17"]}},
            {"id": "b", "sha256": sha(SECRETS[1].1), "scopes": ["write"],
             "rate_limit": {"requests_per_second": 1, "burst": 2}},
            {"id": "c", "sha256": sha(SECRETS[2].1), "allowed_cidrs": ["10.0.0.0/8"],
             "rate_limits": [
                 {"name": "s", "requests_per_second": 10, "burst": 1},
                 {"name": "d", "requests": 3, "per": "1d"}
             ]}
        ],
        "rules": [
            {"match": {"path": "/healthz"}, "action": "public"},
            {"match": {"path_prefix": "/admin"}, "action": "deny"},
            {"match": {"path": "/r", "methods": ["GET"]}, "action": "require",
             "scopes_any_of": ["read"]},
            {"match": {"path": "/h"}, "action": "require",
             "attachment": {"set": "campaigns", "from": {"header": "x-campaign"}}},
            {"match": {"path": "/q"}, "action": "require",
             "attachment": {"set": "campaigns", "from": {"query": "campaign"}}},
            {"match": {"path": "/b", "methods": ["POST"]}, "action": "require",
             "attachment": {"set": "campaigns", "from": {"json_body": "campaign"}}},
            {"match": {"host": "*.bearer.test"}, "action": "require",
             "credential_sources": [{"type": "bare"}]}
        ],
        "default_action": "require_key",
        "max_body_bytes": 256
    });
    match Policy::from_json(cfg.to_string().as_bytes()) {
        Ok(p) => p,
        Err(e) => panic!("the fuzz policy does not compile: {e:?}"),
    }
}

const NAMES: &[&[u8]] = &[
    b"x-api-key",
    b"x-other-key",
    b"authorization",
    b":path",
    b":method",
    b":authority",
    b"x-campaign",
    b"content-type",
    b"grpc-timeout",
];

const VALUES: &[&[u8]] = &[
    b"kg_alpha0001",
    b"kg_bravo0002",
    b"kg_charlie03",
    b"Bearer kg_alpha0001",
    b"bearer  kg_bravo0002",
    b"Basic kg_alpha0001",
    b"kg_alpha0001, kg_alpha0001",
    b" kg_alpha0001\t",
    b"/r",
    b"/h",
    b"/q?campaign=c-17&campaign=c-17",
    b"/b",
    b"/healthz",
    b"/admin/x",
    b"/%72",
    b"GET",
    b"POST",
    b"api.bearer.test",
    b"c-17",
    b"application/grpc",
];

fn extractors() -> &'static [Extractor] {
    static EXTRACTORS: OnceLock<Vec<Extractor>> = OnceLock::new();
    EXTRACTORS.get_or_init(|| {
        let header = |n: &str| Source::Header(n.as_bytes().to_vec());
        vec![
            Extractor::new(&[header("x-api-key")], 64, &[]),
            Extractor::new(
                &[header("x-api-key"), header("x-other-key"), Source::Bearer],
                16,
                &["kg_".to_string()],
            ),
            Extractor::new(&[Source::Bare, Source::Bearer], 128, &[]),
            Extractor::new(&[Source::Bare, header("x-api-key")], 40, &[]).with_checksum(true),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    // The raw input as a serialized map: decoding never panics, and a map
    // it accepts can be walked.
    if let Some(map) = HeaderMap::decode(data) {
        assert_eq!(map.iter().count(), map.len());
    }

    let mut u = Unstructured::new(data);
    let count = usize::from(byte(&mut u) % 12);
    let mut owned: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count);
    for _ in 0..count {
        let (Ok(name), Ok(value)) = (word_or_bytes(&mut u, NAMES), word_or_bytes(&mut u, VALUES))
        else {
            break;
        };
        let name = recase(&mut u, name);
        owned.push((name, value.to_vec()));
    }
    let pairs: Vec<(&[u8], &[u8])> = owned
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();

    let wire = encode(&pairs);
    let Some(decoded) = HeaderMap::decode(&wire) else {
        panic!("encode's output does not decode");
    };
    assert!(decoded.iter().eq(pairs.iter().copied()));
    let map = HeaderMap::from_pairs(pairs.clone());

    for (i, ex) in extractors().iter().enumerate() {
        let from_pairs = ex.extract(&map);
        let from_wire = ex.extract(&decoded);
        assert_eq!(from_pairs, from_wire, "extractor {i}");
        if let Ok(cred) = from_pairs {
            let key = cred.key;
            assert!(!key.is_empty(), "extractor {i}: empty key");
            assert!(
                key.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b','),
                "extractor {i}: bad byte in {key:?}"
            );
            assert!(
                pairs
                    .iter()
                    .any(|(_, v)| v.windows(key.len()).any(|w| w == key)),
                "extractor {i}: key not taken from a value"
            );
            let carriers: Vec<&[u8]> = ex.carrier_names(&cred).collect();
            assert!(!carriers.is_empty(), "extractor {i}: no carrier");
        }
        // Never panics.
        let _ = ex.carrier_names(&ex.every_carrier()).count();
    }

    let host = FakeHost::default();
    if byte(&mut u) & 1 == 1 {
        host.advance_ns(u.arbitrary::<u32>().unwrap_or(0).into());
    }
    let policy = policy();
    for _ in 0..1 + byte(&mut u) % 3 {
        match policy.decide(&decoded, &host) {
            Decision::Allow(a) => {
                if let Some(key) = a.key {
                    let secret = SECRETS
                        .iter()
                        .find(|(id, _)| *id == key.id())
                        .map(|(_, s)| *s);
                    let Some(secret) = secret else {
                        panic!("admitted an unknown key id {:?}", key.id());
                    };
                    assert!(
                        pairs
                            .iter()
                            .any(|(_, v)| v.windows(secret.len()).any(|w| w == secret)),
                        "admitted key {:?} without its secret",
                        key.id()
                    );
                }
                let _ = a.edits.strip().count();
                if let Some(hold) = a.body_check {
                    let body = u.bytes(u.len()).unwrap_or_default();
                    let _ = policy.decide_body(hold, body, false);
                }
            }
            Decision::Deny(d) => {
                let _ = policy.challenge(&d.denial);
            }
        }
        host.advance_ns(250_000_000);
    }
});
