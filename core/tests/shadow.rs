//! Shadow (report-only) mode: the same decision as enforce mode, reported
//! and forwarded instead of answered, with an identity only for a valid key.
#![allow(clippy::unwrap_used)]

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::{Decision, Denied};
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use serde_json::{json, Value};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

/// One configuration with every kind of refusal, in `mode`.
fn config(mode: &str) -> Value {
    json!({
        "mode": mode,
        "keys": [
            {"id": "reader", "sha256": h("k-read"), "scopes": ["read"],
             "rate_limit": {"requests_per_second": 0.001, "burst": 2}},
            {"id": "gone", "sha256": h("k-gone"), "disabled": true},
            {"id": "old", "sha256": h("k-old"), "expires_at": "2020-01-01T00:00:00Z"},
            {"id": "campaigner", "sha256": h("k-camp"), "attachments": {"campaigns": ["c-1"]}}
        ],
        "rules": [
            {"name": "admin", "match": {"path_prefix": "/admin"}, "action": "deny"},
            {"name": "write", "match": {"path": "/write"}, "action": "require", "scopes_any_of": ["write"]},
            {"name": "ingest", "match": {"path": "/ingest"}, "action": "require",
             "attachment": {"set": "campaigns", "from": {"json_body": "campaign"}}}
        ]
    })
}

fn policy(cfg: &Value) -> Policy {
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

/// The requests of the comparison: path and headers.
fn requests() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![
        ("/", vec![("x-api-key", "k-read")]),
        ("/", vec![("x-api-key", "k-read")]),
        ("/", vec![("x-api-key", "k-read")]), // rate_limited: burst 2
        ("/", vec![]),
        ("/", vec![("x-api-key", "bad key")]),
        ("/", vec![("x-api-key", "k-unknown-but-long-enough")]),
        ("/", vec![("x-api-key", "k-gone")]),
        ("/", vec![("x-api-key", "k-old")]),
        ("/write", vec![("x-api-key", "k-camp")]),
        ("/admin/x", vec![("x-api-key", "k-camp")]),
        (
            "/",
            vec![("x-api-key", "k-camp"), ("x-api-key-id", "spoofed")],
        ),
    ]
}

/// What a request became: the code refused (or would have refused, in
/// shadow) and, when forwarded, the identity set and the headers removed.
#[derive(Debug, PartialEq)]
struct Seen {
    code: Option<&'static str>,
    forwarded: bool,
    identity: Option<String>,
    removed: Vec<String>,
}

fn run(p: &Policy, host: &FakeHost, path: &str, headers: &[(&str, &str)]) -> Seen {
    let mut pairs: Vec<(&[u8], &[u8])> = vec![(b":path", path.as_bytes()), (b":method", b"GET")];
    pairs.extend(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let map = HeaderMap::from_pairs(pairs);
    match p.decide(&map, host) {
        Decision::Allow(a) => {
            let mut removed: Vec<String> = a
                .edits
                .remove
                .iter()
                .copied()
                .chain(a.edits.strip())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            removed.sort();
            Seen {
                code: a.shadow.map(|d| d.denial.code.as_str()),
                forwarded: true,
                identity: a.edits.identity.map(|(_, id)| id.to_string()),
                removed,
            }
        }
        Decision::Deny(Denied { denial, .. }) => Seen {
            code: Some(denial.code.as_str()),
            forwarded: false,
            identity: None,
            removed: vec![],
        },
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn shadow_reports_exactly_what_enforce_refuses_and_forwards_it() {
    let (enforce, shadow) = (policy(&config("enforce")), policy(&config("shadow")));
    let (he, hs) = (FakeHost::default(), FakeHost::default());
    let mut refused = 0;
    for (path, headers) in requests() {
        let e = run(&enforce, &he, path, &headers);
        let s = run(&shadow, &hs, path, &headers);
        assert_eq!(e.code, s.code, "{path} {headers:?}");
        assert!(s.forwarded, "shadow forwards {path} {headers:?}");
        assert_eq!(e.forwarded, e.code.is_none());
        refused += usize::from(e.code.is_some());
    }
    assert_eq!(refused, 8, "every kind of refusal is in the set");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn in_shadow_only_a_valid_key_gets_an_identity_and_nothing_spoofed_passes() {
    let p = policy(&config("shadow"));
    let host = FakeHost::default();
    let seen = |path: &str, headers: &[(&str, &str)]| run(&p, &host, path, headers);
    let spoof = ("x_api_key-ID", "spoofed");
    // A listed key refused for scope: its identity, credential stripped.
    let s = seen("/write", &[("x-api-key", "k-camp"), spoof]);
    assert_eq!(s.code, Some("insufficient_scope"));
    assert_eq!(s.identity.as_deref(), Some("campaigner"));
    assert_eq!(s.removed, ["x-api-key", "x_api_key-ID"]);
    // Unknown, revoked and expired keys: no identity, every copy removed.
    for key in ["k-unknown-but-long-enough", "k-gone", "k-old"] {
        let s = seen("/", &[("x-api-key", key), spoof]);
        assert!(s.code.is_some(), "{key}");
        assert_eq!(s.identity, None, "{key}");
        assert_eq!(s.removed, ["x-api-key", "x_api_key-ID"], "{key}");
    }
    // No usable key: every configured source is stripped, and the identity.
    let s = seen(
        "/",
        &[
            ("x-api-key", "bad key"),
            ("authorization", "Bearer x y"),
            spoof,
        ],
    );
    assert_eq!(s.code, Some("malformed_api_key"));
    assert_eq!(s.identity, None);
    assert_eq!(s.removed, ["authorization", "x-api-key", "x_api_key-ID"]);
    // Only the sources the request holds are removed (an absent header needs
    // no host call, and each removal makes Envoy match the route again).
    for (headers, removed) in [
        (vec![], vec![]),
        (
            vec![("authorization", "Basic dXNlcjpwdw==")],
            vec!["authorization"],
        ),
        (vec![("X-Api-Key", "bad key")], vec!["x-api-key"]),
    ] {
        let s = seen("/", &headers);
        assert!(s.code.is_some(), "{headers:?}");
        assert_eq!(s.removed, removed, "{headers:?}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn shadow_spends_rate_limit_tokens_as_enforce_does() {
    let (enforce, shadow) = (policy(&config("enforce")), policy(&config("shadow")));
    let (he, hs) = (FakeHost::default(), FakeHost::default());
    let key = [("x-api-key", "k-read")];
    let codes = |p: &Policy, host: &FakeHost| -> Vec<Option<&'static str>> {
        (0..5).map(|_| run(p, host, "/", &key).code).collect()
    };
    let e = codes(&enforce, &he);
    assert_eq!(
        e,
        [
            None,
            None,
            Some("rate_limited"),
            Some("rate_limited"),
            Some("rate_limited")
        ]
    );
    assert_eq!(codes(&shadow, &hs), e);
    // A refused request in shadow still forwards with the key's identity.
    let s = run(&shadow, &hs, "/", &key);
    assert_eq!(
        (s.code, s.identity.as_deref()),
        (Some("rate_limited"), Some("reader"))
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_key_overrides_its_rule_and_a_rule_overrides_the_top_level() {
    let mut cfg = config("enforce");
    cfg["rules"][1]["mode"] = json!("shadow");
    cfg["keys"][1]["mode"] = json!("shadow");
    let mut camp = cfg["keys"][3].clone();
    camp["id"] = json!("strict");
    camp["sha256"] = json!(h("k-strict"));
    camp["mode"] = json!("enforce");
    cfg["keys"].as_array_mut().unwrap().push(camp);
    let p = policy(&cfg);
    let host = FakeHost::default();
    let seen = |path: &str, key: &'static str| run(&p, &host, path, &[("x-api-key", key)]);
    // The rule in shadow: reported and forwarded.
    let s = seen("/write", "k-camp");
    assert_eq!((s.code, s.forwarded), (Some("insufficient_scope"), true));
    // A key in enforce on that rule: refused.
    let s = seen("/write", "k-strict");
    assert_eq!((s.code, s.forwarded), (Some("insufficient_scope"), false));
    // A revoked key in shadow under an enforcing top level: forwarded, no identity.
    let s = seen("/", "k-gone");
    assert_eq!(
        (s.code, s.forwarded, s.identity),
        (Some("invalid_api_key"), true, None)
    );
    // Everything else enforces.
    let s = seen("/", "k-old");
    assert_eq!((s.code, s.forwarded), (Some("expired_api_key"), false));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_body_refusal_in_shadow_is_reported_and_forwarded() {
    for (mode, want) in [
        ("shadow", Ok(Some("not_attached"))),
        ("enforce", Err("not_attached")),
    ] {
        let p = policy(&config(mode));
        let host = FakeHost::default();
        let map = HeaderMap::from_pairs(vec![
            (b":path", b"/ingest"),
            (b":method", b"POST"),
            (b"x-api-key", b"k-camp"),
        ]);
        let Decision::Allow(a) = p.decide(&map, &host) else {
            panic!("{mode}: held for the body");
        };
        let hold = a.body_check.unwrap();
        let ok = p.decide_body(hold, br#"{"campaign":"c-1"}"#, false);
        assert!(matches!(ok, Ok(None)), "{mode}");
        let got = p
            .decide_body(hold, br#"{"campaign":"c-2"}"#, false)
            .map(|s| s.map(|d| d.denial.code.as_str()))
            .map_err(|d| d.denial.code.as_str());
        assert_eq!(got, want, "{mode}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_mode_that_is_not_enforce_or_shadow_names_its_field() {
    for (cfg, field) in [
        (json!({"mode": "report"}), "mode"),
        (
            json!({"rules": [{"match": {}, "action": "require", "mode": "off"}]}),
            "rules[0].mode",
        ),
        (
            json!({"keys": [{"id": "a", "sha256": h("a"), "mode": 1}]}),
            "keys[0].mode",
        ),
    ] {
        let errors = Policy::from_json(cfg.to_string().as_bytes()).unwrap_err();
        assert!(errors[0].field.starts_with(field), "{errors:?}");
    }
}
