//! Consumers: keys of one consumer show the backend one identity (and each
//! its own id in a second header) and share their rate-limit buckets.
#![allow(clippy::unwrap_used)]

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::{Decision, Denied};
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use serde_json::json;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

fn policy() -> Policy {
    let limit = json!({"requests": 3, "per": "1000s"});
    let cfg = json!({"keys": [
        {"id": "acme-old", "sha256": h("k-old"), "consumer": "acme", "rate_limit": limit},
        {"id": "acme-new", "sha256": h("k-new"), "consumer": "acme", "rate_limit": limit},
        // A key whose id is the consumer's name counts on its own.
        {"id": "acme", "sha256": h("k-lone"), "rate_limit": limit}
    ]});
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

/// What the backend gets for `key`: (identity, key id header), or the code.
fn send(
    p: &Policy,
    host: &FakeHost,
    key: &'static [u8],
) -> Result<(String, Option<String>), String> {
    let map = HeaderMap::from_pairs(vec![(b"x-api-key", key)]);
    match p.decide(&map, host) {
        Decision::Allow(a) => {
            let identity = a.edits.identity.unwrap().1.to_string();
            let key_id = a
                .edits
                .metadata()
                .find(|(n, _)| *n == "x-api-key-key-id")
                .map(|(_, v)| v.into_owned());
            Ok((identity, key_id))
        }
        Decision::Deny(Denied { denial, .. }) => Err(denial.code.as_str().to_string()),
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_consumers_keys_share_identity_and_buckets() {
    let p = policy();
    let host = FakeHost::default();
    let who = |id: &str| Ok(("acme".to_string(), Some(id.to_string())));
    assert_eq!(send(&p, &host, b"k-old"), who("acme-old"));
    assert_eq!(send(&p, &host, b"k-new"), who("acme-new"));
    assert_eq!(send(&p, &host, b"k-old"), who("acme-old"));
    // Three requests spent the consumer's three tokens, whichever key sent them.
    assert_eq!(send(&p, &host, b"k-new"), Err("rate_limited".into()));
    assert_eq!(send(&p, &host, b"k-old"), Err("rate_limited".into()));
    // The key named like the consumer has buckets of its own and no second header.
    assert_eq!(send(&p, &host, b"k-lone"), Ok(("acme".into(), None)));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_consumer_name_is_checked_with_its_path() {
    let cfg = json!({"keys": [{"id": "a", "sha256": h("a"), "consumer": ""}]});
    let e = Policy::from_json(cfg.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        e[0].to_string(),
        "keys[0].consumer: must be 1-128 visible ASCII characters"
    );
    let cfg = json!({"key_id_header": "x-api-key-id"});
    let e = Policy::from_json(cfg.to_string().as_bytes()).unwrap_err();
    assert!(
        e[0].to_string()
            .starts_with("key_id_header: must differ from identity_header"),
        "{e:?}"
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn consumer_names_and_key_ids_are_1_to_128_visible_characters() {
    let errors = |id: &str, consumer: &str| {
        let cfg = json!({"keys": [{"id": id, "sha256": h("a"), "consumer": consumer}]});
        match Policy::from_json(cfg.to_string().as_bytes()) {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    };
    let longest = "c".repeat(128);
    let too_long = "c".repeat(129);
    assert_eq!(errors(&longest, &longest), Vec::<String>::new());
    assert_eq!(errors("a", "!~"), Vec::<String>::new());
    for bad in [too_long.as_str(), "acme corp", "acmé", ""] {
        assert_eq!(
            errors("a", bad),
            ["keys[0].consumer: must be 1-128 visible ASCII characters"],
            "{bad:?}"
        );
        assert_eq!(
            errors(bad, "acme"),
            ["keys[0].id: must be 1-128 visible ASCII characters"],
            "{bad:?}"
        );
    }
}
