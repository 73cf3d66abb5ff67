//! Key fields forwarded to the backend: set only from a valid key, never
//! from the client, and checked at configuration with their paths.
#![allow(clippy::unwrap_used, clippy::panic)]

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use serde_json::{json, Value};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

fn policy(mode: &str) -> Policy {
    let cfg = json!({
        "mode": mode,
        "forward": {"environment": "x-key-env", "scopes": "x-key-scopes"},
        "keys": [
            {"id": "live", "sha256": h("k-live"), "environment": "live", "scopes": ["read", "write"]},
            {"id": "bare", "sha256": h("k-bare")}
        ]
    });
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

/// The headers an allowed request gets set, and those it loses.
fn sent(
    p: &Policy,
    headers: Vec<(&'static [u8], &'static [u8])>,
) -> (Vec<(String, String)>, Vec<String>) {
    let map = HeaderMap::from_pairs(headers);
    let Decision::Allow(a) = p.decide(&map, &FakeHost::default()) else {
        return (vec![], vec!["(refused)".into()]);
    };
    let set = a
        .edits
        .metadata()
        .map(|(n, v)| (n.to_string(), v.into_owned()))
        .collect();
    let gone = a
        .edits
        .remove
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    (set, gone)
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_valid_key_forwards_its_fields_and_client_copies_go() {
    let (set, gone) = sent(
        &policy("enforce"),
        vec![
            (b"x-api-key", b"k-live"),
            (b"X_Key_Env", b"test"),
            (b"x-key-scopes", b"admin"),
        ],
    );
    assert_eq!(
        set,
        [
            ("x-key-env".into(), "live".into()),
            ("x-key-scopes".into(), "read,write".into())
        ]
    );
    assert_eq!(gone, ["X_Key_Env", "x-key-scopes"]);
    // A key without the fields: nothing set, client copies still removed.
    let (set, gone) = sent(
        &policy("enforce"),
        vec![(b"x-api-key", b"k-bare"), (b"x-key-env", b"live")],
    );
    assert_eq!(set, []);
    assert_eq!(gone, ["x-key-env"]);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn in_shadow_an_unknown_key_forwards_nothing() {
    let (set, gone) = sent(
        &policy("shadow"),
        vec![(b"x-api-key", b"k-nope"), (b"x-key-env", b"live")],
    );
    assert_eq!(set, []);
    assert_eq!(gone, ["x-key-env"]);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn forwarded_headers_are_checked_with_their_paths() {
    let first_error = |forward: Value| {
        let cfg = json!({"forward": forward});
        Policy::from_json(cfg.to_string().as_bytes()).unwrap_err()[0].to_string()
    };
    assert_eq!(
        first_error(json!({"environment": "X_API_KEY_ID"})),
        "forward.environment: must differ from identity_header and the other forwarded headers"
    );
    assert!(first_error(json!({"scopes": "x-envoy-scopes"}))
        .starts_with("forward.scopes: \"x-envoy-scopes\" cannot carry a key field"));
    assert!(first_error(json!({"environment": "x-api-key"}))
        .starts_with("forward.environment: must differ from every credential header"));
    assert!(first_error(json!({"label": "x-label"})).contains("unknown field `label`"));
}

fn filter_state_policy() -> Policy {
    let cfg = json!({
        "forward_with": "filter_state",
        "forward": {"environment": "x-key-env"},
        "credential_sources": [{"type": "header", "name": "x-api-key"}],
        "rules": [{"match": {"path_prefix": "/b"}, "action": "require",
                   "credential_sources": [{"type": "header", "name": "x-other-key"}, {"type": "bearer"}]}],
        "keys": [{"id": "live", "sha256": h("k-live"), "environment": "live"}]
    });
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn through_filter_state_an_honest_request_needs_no_header_edit() {
    let p = filter_state_policy();
    let map = HeaderMap::from_pairs(vec![(b":path", b"/a"), (b"x-api-key", b"k-live")]);
    let Decision::Allow(a) = p.decide(&map, &FakeHost::default()) else {
        panic!("refused");
    };
    assert!(a.edits.to_filter_state);
    assert!(a.edits.remove.is_empty() && a.edits.strip().next().is_none());
    assert_eq!(a.edits.identity, Some(("x-api-key-id", "live")));
    let fields: Vec<_> = a
        .edits
        .fields()
        .map(|(_, f, v)| (f.filter_state_name(), v.into_owned()))
        .collect();
    assert_eq!(fields, vec![("keygate_environment", "live".to_string())]);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn through_filter_state_client_copies_are_still_removed_by_keygate() {
    let p = filter_state_policy();
    let map = HeaderMap::from_pairs(vec![
        (b":path", b"/a"),
        (b"x-api-key", b"k-live"),
        (b"x-api-key-id", b"admin"),
        (b"x_api_key_id", b"admin"),
        (b"x-key-env", b"prod"),
    ]);
    let Decision::Allow(a) = p.decide(&map, &FakeHost::default()) else {
        panic!("refused");
    };
    let gone: Vec<&[u8]> = a.edits.remove.clone();
    assert_eq!(
        gone,
        vec![&b"x-api-key-id"[..], b"x_api_key_id", b"x-key-env"]
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_route_headers_cover_every_credential_source_and_forwarded_header() {
    let r = filter_state_policy().route_headers().unwrap();
    assert_eq!(
        r.remove,
        vec![
            "x-api-key",
            "x-other-key",
            "authorization",
            "x-api-key-id",
            "x-api-key-key-id",
            "x-key-env"
        ]
    );
    assert_eq!(
        r.add,
        vec![
            ("x-api-key-id".to_string(), "keygate_identity"),
            ("x-api-key-key-id".to_string(), "keygate_key_id"),
            ("x-key-env".to_string(), "keygate_environment"),
        ]
    );
    assert!(policy("enforce").route_headers().is_none());
}
