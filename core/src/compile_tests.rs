//! Configuration compilation's unit tests: every problem named by its
//! field, and a policy rebuilt from its shared parts.

use super::*;
use crate::keys::digest;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

// The profiles, embedded (shared with core/tests/cases.rs, which checks the list).
#[path = "../tests/embedded/mod.rs"]
mod embedded;
use embedded::PROFILES;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

fn errors(json: &str) -> Vec<String> {
    match Policy::from_json(json.as_bytes()) {
        Ok(_) => vec![],
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

fn first_error(json: &str) -> String {
    errors(json).into_iter().next().unwrap_or_default()
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn minimal_config_compiles_with_defaults() {
    let p =
        Policy::from_json(format!(r#"{{"keys":[{{"id":"a","sha256":"{}"}}]}}"#, h("k")).as_bytes())
            .unwrap();
    assert_eq!(p.keys().len(), 1);
    assert_eq!(p.www_authenticate(), "Bearer realm=\"keygate\"");
    assert_eq!(p.identity_header, "x-api-key-id");
    assert!(p.strip_credentials);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn every_validation_error_names_its_field() {
    let good = h("k");
    let cases: Vec<(String, &str)> = vec![
            ("{".into(), "configuration"),
            (r#"{"keyz":[]}"#.into(), "unknown field `keyz`"),
            (
                r#"{"keys":[{"id":"a","sha256":"abc"}]}"#.into(),
                "keys[0].sha256: must be 64 hex",
            ),
            (
                format!(r#"{{"keys":[{{"id":"a","sha256":"{good}","key":"plain"}}]}}"#),
                "keys[0]",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}"}},{{"id":"a","sha256":"{}"}}]}}"#,
                    h("j")
                ),
                "keys[1].id: duplicate id",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}"}},{{"id":"b","sha256":"{}"}}]}}"#,
                    good.to_uppercase()
                ),
                "keys: key \"b\" has the same sha256",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":0,"burst":5}}"#.into(),
                "rate_limit.requests_per_second",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":5,"burst":-1}}"#.into(),
                "rate_limit.burst",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":5,"burst":0}}"#.into(),
                "rate_limit.burst",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}","rate_limit":{{"requests_per_second":-2,"burst":1}}}}]}}"#
                ),
                "keys[0].rate_limit.requests_per_second",
            ),
            (
                r#"{"credential_sources":[]}"#.into(),
                "credential_sources: must list",
            ),
            (
                r#"{"credential_sources":[{"type":"cookie"}]}"#.into(),
                "credential_sources[0]",
            ),
            (
                r#"{"credential_sources":[{"type":"header","name":"bad name"}]}"#.into(),
                "credential_sources[0].name",
            ),
            (
                r#"{"credential_sources":[{"type":"bearer"},{"type":"bearer"}]}"#.into(),
                "credential_sources[1]: listed twice",
            ),
            (
                r#"{"identity_header":"x-api-key"}"#.into(),
                "identity_header: must differ",
            ),
            (
                r#"{"identity_header":"x_api_key","strip_credentials":false}"#.into(),
                "identity_header: must differ",
            ),
            (
                r#"{"identity_header":"Host"}"#.into(),
                "identity_header: \"Host\" cannot carry the key id",
            ),
            (
                r#"{"identity_header":"content-length"}"#.into(),
                "identity_header: \"content-length\" cannot carry the key id",
            ),
            (
                r#"{"credential_sources":[{"type":"header","name":"host"}]}"#.into(),
                "credential_sources[0].name: \"host\" cannot carry a key",
            ),
            (
                r#"{"credential_sources":[{"type":"bearer","scheme":"Token"}]}"#.into(),
                "credential_sources[0]: unknown field `scheme`",
            ),
            (
                r#"{"credential_sources":[{"type":"bare","prefix":"Token "}]}"#.into(),
                "credential_sources[0]: unknown field `prefix`",
            ),
            (
                r#"{"rules":[{"action":"require","attachment":{"set":"c","from":{"json_body":"/a~2"}}}]}"#
                    .into(),
                "rules[0].attachment.from.json_body: in a JSON pointer",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}","attachments":{{"c":["x"],"c":["y"]}}}}]}}"#
                ),
                "keys[0].attachments.c: \"c\" is given twice",
            ),
            (
                r#"{"rules":[{"match":{"path":"/a?b=1"},"action":"deny"}]}"#.into(),
                "rules[0].match.path: must not hold '?'",
            ),
            (
                r#"{"rules":[{"match":{"path_prefix":"/a#x"},"action":"deny"}]}"#.into(),
                "rules[0].match.path_prefix: must not hold '?' or '#'",
            ),
            (r#"{"max_key_length":0}"#.into(), "max_key_length"),
            (
                r#"{"keys":[{"id":"has space","sha256":"00"}]}"#.into(),
                "keys[0].id",
            ),
        ];
    for (json, want) in cases {
        let got = errors(&json);
        assert!(
            got.iter().any(|e| e.contains(want)),
            "{json}\n  want {want:?}\n  got {got:?}"
        );
    }
    assert!(first_error(r#"{"keys":[{"id":"a","sha256":"zz"}]}"#).starts_with("keys[0].sha256"));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn all_problems_are_reported_at_once() {
    let e = errors(
        r#"{"keys":[{"id":"","sha256":"x"}],"rate_limit":{"requests_per_second":0,"burst":0}}"#,
    );
    assert_eq!(e.len(), 4, "{e:?}");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn host_patterns_that_could_never_match_are_refused() {
    for good in [
        "api.example.com",
        "*.tenants.example.com",
        "localhost",
        "Admin.Example.COM",
        "[2001:db8::1]",
        "10.0.0.1",
    ] {
        assert!(is_host_pattern(good), "{good}");
    }
    for bad in [
        "",
        "admin.example.com:8443",
        "admin.example.com.",
        ".example.com",
        "a..b",
        "api.*.example.com",
        "*",
        "*.",
        "exa mple.com",
        "[::1]:80",
        "[nothost]",
        "example.com/path",
    ] {
        assert!(!is_host_pattern(bad), "{bad}");
    }
    let e = first_error(
        r#"{"rules":[{"name":"admin","match":{"host":"admin.example.com:8443"},"action":"deny"}]}"#,
    );
    assert!(e.starts_with("rules[0].match.host: "), "{e}");
    assert!(e.contains("without port"), "{e}");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_policy_rebuilt_from_its_shared_parts_is_the_same() {
    for (name, bytes) in PROFILES {
        let (policy, rest) = Policy::from_json_shareable(bytes).unwrap();
        assert!(!String::from_utf8_lossy(&rest).contains("sha256"));
        let keys = KeyStore::from_bytes(policy.keys().fixed().as_bytes().to_vec()).unwrap();
        let rebuilt = Policy::from_parts(&rest, Arc::new(keys)).unwrap();
        assert_eq!(format!("{policy:?}"), format!("{rebuilt:?}"), "{name}");
    }
    assert!(PROFILES.len() >= 4);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn sizes_are_accepted_up_to_their_limits_and_refused_past_them() {
    const NONE: [&str; 0] = [];
    for (field, lowest, highest, error) in [
        (
            "max_key_length",
            1,
            4096,
            "max_key_length: must be between 1 and 4096",
        ),
        (
            "max_body_bytes",
            1,
            16 << 20,
            "max_body_bytes: must be between 1 and 16777216",
        ),
    ] {
        for ok in [lowest, highest] {
            assert_eq!(
                errors(&format!(r#"{{"{field}":{ok}}}"#)),
                NONE,
                "{field} {ok}"
            );
        }
        for bad in [lowest - 1, highest + 1] {
            assert_eq!(
                errors(&format!(r#"{{"{field}":{bad}}}"#)),
                [error],
                "{field} {bad}"
            );
        }
    }
    let sources = |n: usize| {
        let list: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"type":"header","name":"x-key-{i}"}}"#))
            .collect();
        errors(&format!(r#"{{"credential_sources":[{}]}}"#, list.join(",")))
    };
    assert_eq!(sources(1), NONE);
    assert_eq!(sources(16), NONE);
    assert_eq!(sources(17), ["credential_sources: at most 16 sources"]);
    assert_eq!(
        sources(0),
        ["credential_sources: must list at least one source"]
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn key_prefixes_and_realm_must_be_plain_ascii() {
    const NONE: [&str; 0] = [];
    let prefixes = |p: &str| errors(&format!(r#"{{"key_prefixes":["kg_",{p}]}}"#));
    assert_eq!(prefixes(r#""sk-live_""#), NONE);
    assert_eq!(prefixes(r#""!~""#), NONE);
    for bad in [r#""""#, r#""a,b""#, r#""a b""#, r#""\u007f""#, r#""é""#] {
        assert_eq!(
            prefixes(bad),
            ["key_prefixes[1]: must be non-empty visible ASCII"],
            "{bad}"
        );
    }
    let realm = |r: &str| errors(&format!(r#"{{"realm":{r}}}"#));
    assert_eq!(realm(r#""my API ~ v2""#), NONE);
    for bad in [r#""""#, r#""a\"b""#, r#""a\\b""#, r#""a\tb""#, r#""é""#] {
        assert_eq!(
            realm(bad),
            ["realm: must be non-empty printable ASCII without quotes"],
            "{bad}"
        );
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn key_attachments_that_are_not_an_object_say_what_is_expected() {
    let e = first_error(&format!(
        r#"{{"keys":[{{"id":"a","sha256":"{}","attachments":["c-17"]}}]}}"#,
        h("k")
    ));
    assert!(
        e.starts_with(
            "keys[0].attachments: invalid type: sequence, expected an object of lists of strings"
        ),
        "{e}"
    );
}

/// Mutation testing (scripts/mutants.sh) found these boundaries unguarded:
/// a rule name that is not a word but holds no `/`; a public rule whose only
/// extra is a rate limit; a one-letter JSON-body field.
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn rule_names_public_rules_and_short_body_fields_at_their_edges() {
    let rule = |r: &str| format!(r#"{{"rules":[{r}]}}"#);
    for name in [r#""two words""#, r#""a/b""#, r#""""#] {
        let e = first_error(&rule(&format!(
            r#"{{"name":{name},"match":{{"path":"/x"}},"action":"require"}}"#
        )));
        assert!(
            e.starts_with("rules[0].name: must be 1-64 visible ASCII"),
            "{name}: {e}"
        );
    }
    assert_eq!(
        errors(&rule(
            r#"{"name":"plain-name_1.v2","match":{"path":"/x"},"action":"require"}"#
        )),
        Vec::<String>::new()
    );
    for action in ["public", "deny"] {
        let e = first_error(&rule(&format!(
            r#"{{"match":{{"path":"/x"}},"action":"{action}","rate_limit":{{"requests_per_second":1,"burst":1}}}}"#
        )));
        assert!(
            e.starts_with("rules[0].action: public and deny rules take no"),
            "{action}: {e}"
        );
    }
    let body_rule = |field: &str| {
        rule(&format!(
            r#"{{"match":{{"path":"/x"}},"action":"require","attachment":{{"set":"s","from":{{"json_body":"{field}"}}}}}}"#
        ))
    };
    assert_eq!(errors(&body_rule("a")), Vec::<String>::new());
    assert_eq!(errors(&body_rule("/a")), Vec::<String>::new());
    assert_eq!(
        first_error(&body_rule("/")),
        "rules[0].attachment.from.json_body: must name a field"
    );
}

/// A duplicate id is reported also when one of the two records failed to
/// compile for another reason, so one pass shows every problem (found by
/// mutation testing: skipping the failed records' ids went unseen).
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_duplicate_id_is_reported_beside_the_other_problem_of_its_record() {
    let good = format!(r#"{{"id":"dup","sha256":"{}"}}"#, h("k1"));
    let bad = r#"{"id":"dup","sha256":"not-hex"}"#;
    for keys in [format!("[{good},{bad}]"), format!("[{bad},{good}]")] {
        let e = errors(&format!(r#"{{"keys":{keys}}}"#));
        assert!(e.iter().any(|e| e.contains("].sha256: ")), "{e:?}");
        assert!(
            e.contains(&r#"keys[1].id: duplicate id "dup""#.to_string()),
            "{e:?}"
        );
    }
    let two_bad = r#"{"keys":[{"id":"dup","sha256":"x"},{"id":"dup","sha256":"y"}]}"#;
    assert!(errors(two_bad).contains(&r#"keys[1].id: duplicate id "dup""#.to_string()));
}
