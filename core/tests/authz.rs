//! Authorization in code where a case file cannot say it: a body check's
//! truncation flag, a rule's bucket over several requests, configuration
//! errors, control-plane lists and staleness. The request/answer pairs of
//! this configuration are cases in `tests/cases/authz-core.json`.
#![allow(clippy::unwrap_used)]

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::{Decision, Denied, Hold};
use keygate_core::testing::FakeHost;
use keygate_core::{Host, Policy};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

fn policy() -> Policy {
    let cfg = serde_json::json!({
        "credential_sources": [{"type": "header", "name": "x-api-key"}],
        "keys": [
            {"id": "sup", "sha256": h("k-sup"), "scopes": ["ingest"], "attachments": {"campaigns": ["c-17", "c-42"]}},
            {"id": "reader", "sha256": h("k-read"), "scopes": ["read"]},
            {"id": "gone", "sha256": h("k-gone"), "disabled": true},
            {"id": "old", "sha256": h("k-old"), "expires_at": "2020-01-01T00:00:00Z"},
            {"id": "later", "sha256": h("k-later"), "expires_at": "2099-01-01T00:00:00+02:00"},
            {"id": "office", "sha256": h("k-office"), "allowed_cidrs": ["10.1.0.0/16", "2001:db8::/32", "192.0.2.7"]},
            {"id": "test", "sha256": h("k-test"), "environment": "test", "scopes": ["read"]},
            {"id": "live", "sha256": h("k-live"), "environment": "live", "scopes": ["read"]}
        ],
        "rules": [
            {"name": "health", "match": {"path": "/healthz"}, "action": "public"},
            {"name": "admin", "match": {"path_prefix": "/admin"}, "action": "deny"},
            {"name": "ingest", "match": {"path": "/api/v1/ingest", "methods": ["POST"]}, "action": "require",
             "scopes_any_of": ["ingest"], "attachment": {"set": "campaigns", "from": {"json_body": "flo_campaign_id"}}},
            {"name": "by-query", "match": {"path": "/q"}, "action": "require", "attachment": {"set": "campaigns", "from": {"query": "campaign"}}},
            {"name": "by-header", "match": {"path": "/h"}, "action": "require", "attachment": {"set": "campaigns", "from": {"header": "x-campaign"}}},
            {"name": "lookup", "match": {"path": "/api/v1/leads/lookup", "methods": ["GET"]}, "action": "require", "scopes_any_of": ["read", "ingest"]},
            {"name": "sandbox", "match": {"path_prefix": "/v1/sandbox/"}, "action": "require", "environments": ["live", "test"]},
            {"name": "live-only", "match": {"path_prefix": "/v1/"}, "action": "require", "environments": ["live"]},
            {"name": "bearer-only", "match": {"host": "*.bearer.test"}, "action": "require", "credential_sources": [{"type": "bearer"}],
             "rate_limit": {"requests_per_second": 1, "burst": 1}}
        ],
        "default_action": "deny",
        "max_body_bytes": 64
    });
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

struct Req(Vec<(String, String)>);

impl Req {
    fn new(method: &str, path: &str) -> Self {
        Req(vec![
            (":method".into(), method.into()),
            (":path".into(), path.into()),
            (":authority".into(), "api.example.com".into()),
        ])
    }
    fn key(mut self, k: &str) -> Self {
        self.0.push(("x-api-key".into(), k.into()));
        self
    }
    fn decide(&self, p: &Policy, host: &dyn Host) -> (String, Option<Hold>) {
        let map = HeaderMap::from_pairs(
            self.0
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect(),
        );
        match p.decide(&map, host) {
            Decision::Allow(a) => (
                format!("allow:{}", a.key.map_or("-", |k| k.id())),
                a.body_check,
            ),
            Decision::Deny(Denied { denial: d, .. }) => (d.code.as_str().to_string(), None),
        }
    }
}

fn code(p: &Policy, r: Req) -> String {
    r.decide(p, &FakeHost::default()).0
}

/// What a case file cannot say: `decide_body`'s truncation flag, and that a
/// route without a body rule never holds. The requests themselves are cases
/// in `tests/cases/authz-core.json`.
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn body_hold_and_truncation_flag() {
    let p = policy();
    let (c, hold) = Req::new("POST", "/api/v1/ingest")
        .key("k-sup")
        .decide(&p, &FakeHost::default());
    assert_eq!(c, "allow:sup");
    assert_eq!(
        p.decide_body(hold.unwrap(), b"{}", true)
            .map_err(|d| d.denial.code.as_str()),
        Err("body_too_large")
    );
    // Routes without a body rule never hold.
    let (_, none) = Req::new("GET", "/api/v1/leads/lookup")
        .key("k-sup")
        .decide(&p, &FakeHost::default());
    assert!(none.is_none());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn per_rule_sources_and_rate_limit_use_their_own_bucket() {
    let p = policy();
    let host = FakeHost::default();
    let bearer = |k: &str| {
        Req(vec![
            (":method".into(), "GET".into()),
            (":path".into(), "/x".into()),
            (":authority".into(), "a.bearer.test:8443".into()),
            ("authorization".into(), format!("Bearer {k}")),
        ])
    };
    assert_eq!(bearer("k-read").decide(&p, &host).0, "allow:reader");
    assert_eq!(bearer("k-read").decide(&p, &host).0, "rate_limited");
    // The key's default (unlimited) route is unaffected by the rule's bucket.
    for _ in 0..5 {
        assert_eq!(
            Req::new("GET", "/api/v1/leads/lookup")
                .key("k-read")
                .decide(&p, &host)
                .0,
            "allow:reader"
        );
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn rule_validation_names_fields() {
    let bad = [
        (
            r#"{"rules":[{"match":{"path":"x"},"action":"public"}]}"#,
            "rules[0].match.path",
        ),
        (
            r#"{"rules":[{"action":"public","scopes_any_of":["a"]}]}"#,
            "rules[0].action",
        ),
        (
            r#"{"rules":[{"name":"a","action":"deny"},{"name":"a","action":"deny"}]}"#,
            "rules[1].name",
        ),
        (
            r#"{"rules":[{"action":"require","attachment":{"set":"c","from":{"cookie":"x"}}}]}"#,
            "rules[0].attachment.from",
        ),
        (
            r#"{"rules":[{"action":"require","credential_sources":[]}]}"#,
            "rules[0].credential_sources",
        ),
        (r#"{"default_action":"allow"}"#, "default_action"),
        (
            r#"{"keys":[{"id":"a","sha256":"0000000000000000000000000000000000000000000000000000000000000000","expires_at":"tomorrow"}]}"#,
            "keys[0].expires_at",
        ),
        (
            r#"{"keys":[{"id":"a","sha256":"0000000000000000000000000000000000000000000000000000000000000000","allowed_cidrs":["10.0.0.0/33"]}]}"#,
            "keys[0].allowed_cidrs[0]",
        ),
        (r#"{"max_body_bytes":0}"#, "max_body_bytes"),
    ];
    for (json, field) in bad {
        let errors = Policy::from_json(json.as_bytes()).unwrap_err();
        assert!(
            errors.iter().any(|e| e.to_string().starts_with(field)),
            "{json}: {errors:?}"
        );
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn control_plane_lists_merge_with_static_keys() {
    let base = Policy::from_json(
        serde_json::json!({
            "keys": [{"id": "static", "sha256": h("k-static")}],
            "control_plane": {"cluster": "cp", "authority": "cp.local", "stale_policy": "fail_closed"}
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let list = |v: serde_json::Value| {
        keygate_core::keylist::compile_key_list(v.to_string().as_bytes()).unwrap()
    };
    let merged = base
        .with_key_list(list(
            serde_json::json!({"version": 3, "keys": [{"id": "dyn", "sha256": h("k-dyn")}]}),
        ))
        .unwrap();
    assert_eq!(merged.list_version(), Some(3));
    let get = |p: &Policy, k: &str| {
        Req::new("GET", "/x")
            .key(k)
            .decide(p, &FakeHost::default())
            .0
    };
    assert_eq!(get(&merged, "k-dyn"), "allow:dyn");
    assert_eq!(get(&merged, "k-static"), "allow:static");
    assert_eq!(get(&base, "k-dyn"), "invalid_api_key");
    // A clash with a static key is refused, naming the list record.
    let clash = base
        .with_key_list(list(
            serde_json::json!({"version": 4, "keys": [{"id": "static", "sha256": h("k-other")}]}),
        ))
        .unwrap_err();
    assert_eq!(clash[0].field, "key_list.keys", "{clash:?}");
    assert!(clash[0].message.contains("\"static\""), "{clash:?}");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn cold_start_and_staleness_answer_503() {
    let cfg = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"control_plane": {"cluster": "cp", "authority": "cp.local", "max_staleness": "10s"}});
        v["control_plane"]
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Policy::from_json(v.to_string().as_bytes()).unwrap()
    };
    let cold = cfg(serde_json::json!({}));
    assert_eq!(
        code(&cold, Req::new("GET", "/x").key("k")),
        "key_list_unavailable"
    );

    struct Stale(FakeHost);
    impl Host for Stale {
        fn monotonic_ns(&self) -> Option<u64> {
            self.0.monotonic_ns()
        }
        fn unix_secs(&self) -> Option<i64> {
            self.0.unix_secs()
        }
        fn source_ip(&self) -> Option<std::net::IpAddr> {
            self.0.source_ip()
        }
        fn counters(&self) -> &dyn keygate_core::ratelimit::CounterStore {
            self.0.counters()
        }
        fn key_list_stale(&self) -> bool {
            true
        }
    }
    let list = keygate_core::keylist::compile_key_list(
        serde_json::json!({"version": 1, "keys": [{"id": "d", "sha256": h("k-d")}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let serve = cfg(serde_json::json!({}))
        .with_key_list(list.clone())
        .unwrap();
    let closed = cfg(serde_json::json!({"stale_policy": "fail_closed"}))
        .with_key_list(list)
        .unwrap();
    let stale = Stale(FakeHost::default());
    assert_eq!(
        Req::new("GET", "/x").key("k-d").decide(&serve, &stale).0,
        "allow:d"
    );
    assert_eq!(
        Req::new("GET", "/x").key("k-d").decide(&closed, &stale).0,
        "key_list_unavailable"
    );
    assert_eq!(code(&closed, Req::new("GET", "/x").key("k-d")), "allow:d");
    let bad = Policy::from_json(
        br#"{"control_plane":{"cluster":"cp","authority":"cp.local","poll_interval":"1x"}}"#,
    )
    .unwrap_err();
    assert!(bad[0].field == "control_plane.poll_interval", "{bad:?}");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn envoy_source_addresses_give_the_client_ip_that_allowed_cidrs_check() {
    use keygate_core::host::parse_source_address;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
    // Envoy's `source.address`, with a port; a bare IP too.
    assert_eq!(parse_source_address(b"10.1.2.3:40000"), ip("10.1.2.3"));
    assert_eq!(
        parse_source_address(b"[2001:db8::7]:443"),
        ip("2001:db8::7")
    );
    assert_eq!(parse_source_address(b"192.0.2.7"), ip("192.0.2.7"));
    assert_eq!(parse_source_address(b"::1"), ip("::1"));
    // Anything else is no address: the decision then fails closed.
    for bad in [&b""[..], b"localhost:80", b"10.1.2.3:port", b"\xff10.1.2.3"] {
        assert_eq!(parse_source_address(bad), None, "{bad:?}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_grpc_body_refusal_is_a_grpc_reply() {
    let p = policy();
    for (content_type, grpc_status) in [("application/grpc", Some(3)), ("application/json", None)] {
        let mut req = Req::new("POST", "/api/v1/ingest").key("k-sup");
        req.0.push(("content-type".into(), content_type.into()));
        let (c, hold) = req.decide(&p, &FakeHost::default());
        assert_eq!(c, "allow:sup");
        let refused = p
            .decide_body(hold.unwrap(), b"not json", false)
            .unwrap_err();
        assert_eq!(refused.denial.code.as_str(), "invalid_json_body");
        let reply = keygate_core::reply::render(&refused.denial, "");
        assert_eq!(reply.grpc_status, grpc_status, "{content_type}");
    }
}
