//! JSON-body attribute extraction: any bytes, any nesting, any pointer, and
//! the body check of a held request.
//!
//! Checks: nothing panics; `read_json_body` is `JsonBody::parse` then
//! `value_at`; a body nested within `MAX_BODY_DEPTH` levels parses and one
//! nested deeper reads as `TooDeep`; `decide_body` forwards a request only
//! when the body holds one of the key's values at the rule's pointer.
#![no_main]

use keygate_core::attribute::{read_json_body, BodyValue, JsonBody, JsonPointer, MAX_BODY_DEPTH};
use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use keygate_fuzz::{byte, json, string};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

/// Rules of the fixed policy: path, pointer as configured, pointer parsed.
const RULES: [(&str, &str, &str); 3] = [
    ("/b", "campaign", "/campaign"),
    ("/n", "/a/0/~1x", "/a/0/~1x"),
    ("/e", "/~0k/", "/~0k/"),
];
const ALLOWED: [&str; 3] = ["c-17", "17", "true"];
const MAX_BODY: usize = 512;

/// Built once per thread (a policy is not `Sync`: it keeps a cache of
/// blocked buckets) and kept for the whole run.
fn policy() -> &'static Policy {
    thread_local! {
        static POLICY: &'static Policy = Box::leak(Box::new(build_policy()));
    }
    POLICY.with(|p| *p)
}

fn build_policy() -> Policy {
    let rules: Vec<_> = RULES
        .iter()
        .map(|(path, pointer, _)| {
            json!({"match": {"path": path}, "action": "require",
                       "attachment": {"set": "campaigns", "from": {"json_body": pointer}}})
        })
        .collect();
    let cfg = json!({
        "keys": [{"id": "a", "sha256": hex::encode(digest(b"key-a")),
                  "attachments": {"campaigns": ALLOWED}}],
        "rules": rules,
        "max_body_bytes": MAX_BODY
    });
    match Policy::from_json(cfg.to_string().as_bytes()) {
        Ok(p) => p,
        Err(e) => panic!("the fuzz policy does not compile: {e:?}"),
    }
}

const POINTERS: &[&str] = &[
    "",
    "/",
    "/campaign",
    "/a/0/~1x",
    "/a",
    "/a/0",
    "/0",
    "/~0",
    "/~1",
    "/~",
    "/a//b",
    "/-",
    "/01",
    "/18446744073709551616",
];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let pointer = match byte(&mut u) % 4 {
        0 => string(&mut u).unwrap_or_default(),
        _ => u
            .choose(POINTERS)
            .map(|p| p.to_string())
            .unwrap_or_default(),
    };
    let pointer = JsonPointer::parse(&pointer);
    let shape = byte(&mut u) % 4;
    let mut depth_built = None;
    let body: Vec<u8> = match shape {
        0 => u.bytes(u.len()).unwrap_or_default().to_vec(),
        1 => {
            // A scalar inside `levels` arrays and objects.
            let levels = usize::from(byte(&mut u) % 160);
            let kinds = u.bytes(levels.min(u.len())).unwrap_or_default().to_vec();
            let mut text = String::new();
            for i in 0..levels {
                text.push_str(match kinds.get(i).map(|k| k & 1) {
                    Some(1) => "{\"a\":",
                    _ => "[",
                });
            }
            text.push_str("\"c-17\"");
            for i in (0..levels).rev() {
                text.push(match kinds.get(i).map(|k| k & 1) {
                    Some(1) => '}',
                    _ => ']',
                });
            }
            depth_built = Some(levels);
            text.into_bytes()
        }
        _ => match json(&mut u, 6) {
            Ok(v) => {
                let mut text = v.to_string();
                // Sometimes repeat a field or change the case of a name.
                if shape == 3 {
                    text = text.replacen("{", "{\"campaign\":\"c-17\",\"Campaign\":1,", 1);
                }
                text.into_bytes()
            }
            Err(_) => return,
        },
    };

    let parsed = JsonBody::parse(&body);
    let direct = read_json_body(&body, &pointer);
    let via_doc = match &parsed {
        Ok(doc) => doc.value_at(&pointer),
        Err(why) => why.clone(),
    };
    assert_eq!(direct, via_doc);
    if let Some(levels) = depth_built {
        if levels <= MAX_BODY_DEPTH {
            assert!(parsed.is_ok(), "{levels} levels refused");
        } else {
            assert!(
                matches!(parsed, Err(BodyValue::TooDeep)),
                "{levels} levels not refused as too deep"
            );
        }
    }

    // The body check of a held request.
    let (path, _, rule_pointer) = RULES[usize::from(byte(&mut u)) % RULES.len()];
    let pairs: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":path", path.as_bytes()),
        (b":authority", b"api.example.com"),
        (b"x-api-key", b"key-a"),
    ];
    let policy = policy();
    let Decision::Allow(allowed) =
        policy.decide(&HeaderMap::from_pairs(pairs), &FakeHost::default())
    else {
        panic!("the held request is refused before its body");
    };
    let Some(hold) = allowed.body_check else {
        panic!("the request is not held for its body");
    };
    let truncated = byte(&mut u).is_multiple_of(8);
    let forwarded = matches!(policy.decide_body(hold, &body, truncated), Ok(None));
    if forwarded {
        assert!(
            !truncated && body.len() <= MAX_BODY,
            "forwarded a truncated body"
        );
        let value = read_json_body(&body, &JsonPointer::parse(rule_pointer));
        assert!(
            matches!(&value, BodyValue::Found(v) if ALLOWED.contains(&v.as_str())),
            "forwarded with {value:?} at {rule_pointer:?}"
        );
    }
});
