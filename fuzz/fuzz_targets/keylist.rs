//! Control-plane key lists, received in pages: a few chunks, each arbitrary
//! bytes or a page built from the input (version, records, `next`), added
//! in turn, then the list finished and merged with a policy's static keys.
//!
//! Checks: nothing panics; a finished list holds exactly the records of
//! the pages accepted; merging it never panics, and a merged policy
//! decides a request with one of the list's keys without panicking.
#![no_main]

use keygate_core::headers::HeaderMap;
use keygate_core::keylist::KeyListPages;
use keygate_core::keys::digest;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use keygate_fuzz::{byte, json, string};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const FIELDS: &[&str] = &[
    "scopes",
    "expires_at",
    "revoked_at",
    "disabled",
    "allowed_cidrs",
    "attachments",
    "label",
    "environment",
    "display",
    "mode",
    "rate_limit",
    "rate_limits",
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
    let cfg = json!({
        "keys": [{"id": "static", "sha256": hex::encode(digest(b"static-key"))}],
        "control_plane": {"cluster": "cp", "authority": "cp", "path": "/keys"}
    });
    match Policy::from_json(cfg.to_string().as_bytes()) {
        Ok(p) => p,
        Err(e) => panic!("the fuzz policy does not compile: {e:?}"),
    }
}

/// One key record: an id and a digest (of a short secret, so that a
/// request can carry it), and a few other fields.
fn record(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut map = Map::new();
    let n = byte(u);
    let id = if n.is_multiple_of(5) {
        string(u)?
    } else {
        format!("k{}", n % 16)
    };
    map.insert("id".into(), Value::String(id));
    let sha = if byte(u).is_multiple_of(6) {
        string(u)?
    } else {
        let secret = format!("s{}", byte(u) % 16);
        hex::encode(digest(secret.as_bytes()))
    };
    map.insert("sha256".into(), Value::String(sha));
    for _ in 0..byte(u) % 4 {
        let field = u.choose(FIELDS)?;
        map.insert((*field).into(), json(u, 2)?);
    }
    Ok(Value::Object(map))
}

fn page(u: &mut Unstructured<'_>, last: bool) -> Result<Vec<u8>> {
    if byte(u).is_multiple_of(4) {
        let len = usize::from(byte(u)) * 4;
        return Ok(u.bytes(len.min(u.len()))?.to_vec());
    }
    let mut doc = Map::new();
    doc.insert("version".into(), Value::from(u64::from(byte(u) % 3)));
    let mut keys = Vec::new();
    for _ in 0..byte(u) % 6 {
        keys.push(record(u)?);
    }
    doc.insert("keys".into(), Value::Array(keys));
    match byte(u) % 4 {
        0 => {}
        1 if last => {}
        1 | 2 => {
            doc.insert(
                "next".into(),
                Value::String(format!("/keys?page={}", byte(u))),
            );
        }
        _ => {
            doc.insert("next".into(), json(u, 1)?);
        }
    }
    Ok(Value::Object(doc).to_string().into_bytes())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let count = 1 + byte(&mut u) % 4;
    let mut list = KeyListPages::default();
    let mut accepted = 0usize;
    for i in 0..count {
        let Ok(bytes) = page(&mut u, i + 1 == count) else {
            break;
        };
        let before = list.bytes();
        match list.add(&bytes) {
            Ok(()) => {
                assert_eq!(list.pages, u32::from(i) + 1);
                assert_eq!(list.bytes(), before + bytes.len());
                if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(&bytes) {
                    accepted += doc
                        .get("keys")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                }
            }
            // The poller drops a list with a bad page.
            Err(e) => {
                assert!(!e.is_empty(), "a refused page names no problem");
                return;
            }
        }
    }
    let Ok(compiled) = list.finish() else {
        return;
    };
    assert_eq!(compiled.store.len(), accepted);
    let Ok(merged) = policy().with_key_list(compiled) else {
        return;
    };
    let secret = format!("s{}", byte(&mut u) % 16);
    let pairs: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":path", b"/"),
        (b":authority", b"api.example.com"),
        (b"x-api-key", secret.as_bytes()),
    ];
    let _ = merged.decide(&HeaderMap::from_pairs(pairs), &FakeHost::default());
});
