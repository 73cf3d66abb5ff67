//! Replays the shared case table (`tests/cases/auth.json`) against the core,
//! with an in-memory bucket store. The e2e suite replays the same table in Envoy.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::{Decision, Denied};
use keygate_core::testing::FakeHost;
use keygate_core::{reply, Policy};
use serde_json::Value;

const TABLE: &str = include_str!("../../tests/cases/auth.json");

/// Replaces `{key:NAME}` / `{sha256:NAME}` and decodes `\xNN`.
fn expand(s: &str, keys: &HashMap<String, String>) -> Vec<u8> {
    let mut text = s.to_string();
    for (name, key) in keys {
        text = text.replace(&format!("{{key:{name}}}"), key);
        text = text.replace(
            &format!("{{sha256:{name}}}"),
            &hex::encode(digest(key.as_bytes())),
        );
    }
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 4 <= b.len() {
            out.push(u8::from_str_radix(&text[i + 2..i + 4], 16).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn case_table() {
    let table: Value = serde_json::from_str(TABLE).unwrap();
    let keys: HashMap<String, String> = serde_json::from_value(table["keys"].clone()).unwrap();
    let config = expand(&table["config"].to_string(), &keys);
    let policy = Policy::from_json(&config).unwrap();
    let mut failures = Vec::new();
    for case in table["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let owned: Vec<(Vec<u8>, Vec<u8>)> = case["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    expand(p[0].as_str().unwrap(), &keys),
                    expand(p[1].as_str().unwrap(), &keys),
                )
            })
            .collect();
        let map = HeaderMap::from_pairs(
            owned
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .collect(),
        );
        let host = FakeHost::default();
        let expect = &case["expect"];
        let (status, code, identity) = match policy.decide(&map, &host) {
            Decision::Allow(a) => {
                let edits = &a.edits;
                let mut forwarded: Vec<&[u8]> = map.iter().map(|(n, _)| n).collect();
                let stripped: Vec<&[u8]> = edits.strip().collect();
                forwarded.retain(|n| !edits.remove.contains(n) && !stripped.contains(n));
                let (identity_header, identity) = edits.identity.unwrap();
                forwarded.retain(|n| *n != identity_header.as_bytes());
                for s in expect["stripped"].as_array().into_iter().flatten() {
                    let s = s.as_str().unwrap().as_bytes();
                    if forwarded.iter().any(|n| n.eq_ignore_ascii_case(s)) {
                        failures.push(format!(
                            "{name}: {} not stripped",
                            String::from_utf8_lossy(s)
                        ));
                    }
                }
                if forwarded
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(b"x_api_key_id"))
                {
                    failures.push(format!("{name}: spoofed identity variant kept"));
                }
                (200, None, Some(identity.to_string()))
            }
            Decision::Deny(Denied { denial: d, .. }) => {
                let r = reply::render(&d, policy.www_authenticate());
                let body: Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(body["error"], d.code.as_str());
                (r.status, Some(d.code.as_str().to_string()), None)
            }
        };
        if expect["status"] != status {
            failures.push(format!(
                "{name}: status {status}, expected {}",
                expect["status"]
            ));
        }
        if let Some(c) = expect["code"].as_str() {
            if code.as_deref() != Some(c) {
                failures.push(format!("{name}: code {code:?}, expected {c}"));
            }
        }
        if let Some(i) = expect["identity"].as_str() {
            if identity.as_deref() != Some(i) {
                failures.push(format!("{name}: identity {identity:?}, expected {i}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
