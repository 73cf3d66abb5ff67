//! The decision's unit tests: rate limits per key and per plugin, and
//! what a refusal says about the key.

use std::net::IpAddr;

use super::*;
use crate::keys::digest;
use crate::ratelimit::CounterStore;
use crate::testing::FakeHost;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn decide_rate_limits_per_key_and_fails_closed_on_store_errors() {
    struct Broken;
    impl CounterStore for Broken {
        fn get(&self, _: &str) -> Result<Option<ratelimit::Versioned>, ratelimit::StoreError> {
            Err(ratelimit::StoreError)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, ratelimit::StoreError> {
            Err(ratelimit::StoreError)
        }
        fn create(&self, _: &str, _: &[u8]) -> Result<bool, ratelimit::StoreError> {
            Err(ratelimit::StoreError)
        }
    }
    let json = format!(
        r#"{{"rate_limit":{{"requests_per_second":1,"burst":2}},
                "keys":[{{"id":"a","sha256":"{}"}},{{"id":"b","sha256":"{}","rate_limit":{{"requests_per_second":1,"burst":1}}}}]}}"#,
        h("ka"),
        h("kb")
    );
    struct BrokenHost(Broken);
    impl Host for BrokenHost {
        fn monotonic_ns(&self) -> Option<u64> {
            Some(1)
        }
        fn unix_secs(&self) -> Option<i64> {
            None
        }
        fn source_ip(&self) -> Option<IpAddr> {
            None
        }
        fn counters(&self) -> &dyn CounterStore {
            &self.0
        }
    }
    let p = Policy::from_json(json.as_bytes()).unwrap();
    let host = FakeHost::default();
    let run = |k: &[u8], host: &dyn Host| match p
        .decide(&HeaderMap::from_pairs(vec![(b"x-api-key", k)]), host)
    {
        Decision::Allow(_) => "allow",
        Decision::Deny(d) => d.denial.code.as_str(),
    };
    assert_eq!(run(b"ka", &host), "allow");
    assert_eq!(run(b"ka", &host), "allow");
    assert_eq!(run(b"ka", &host), "rate_limited");
    assert_eq!(run(b"kb", &host), "allow");
    assert_eq!(run(b"kb", &host), "rate_limited");
    assert_eq!(run(b"ka", &BrokenHost(Broken)), "rate_limited");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_key_id_with_a_slash_does_not_share_a_rule_bucket() {
    // Key "metered/b" has a limit of its own; rule "metered" limits key "b".
    // Both buckets once were `keygate/rl/metered/b`.
    let json = format!(
        r#"{{"keys":[{{"id":"metered/b","sha256":"{}","rate_limit":{{"requests_per_second":0.01,"burst":1}}}},
                        {{"id":"b","sha256":"{}"}}],
                "rules":[{{"name":"metered","match":{{"path_prefix":"/metered/"}},"action":"require",
                           "rate_limit":{{"requests_per_second":0.01,"burst":2}}}}]}}"#,
        h("k-slash"),
        h("k-b")
    );
    let p = Policy::from_json(json.as_bytes()).unwrap();
    let host = FakeHost::default();
    let run = |k: &[u8], path: &[u8]| match p.decide(
        &HeaderMap::from_pairs(vec![(b"x-api-key", k), (b":path", path)]),
        &host,
    ) {
        Decision::Allow(_) => "allow",
        Decision::Deny(d) => d.denial.code.as_str(),
    };
    assert_eq!(run(b"k-b", b"/metered/1"), "allow");
    assert_eq!(run(b"k-b", b"/metered/2"), "allow");
    assert_eq!(run(b"k-b", b"/metered/3"), "rate_limited");
    // The rule's bucket for "b" is empty; the key "metered/b" still has its token.
    assert_eq!(run(b"k-slash", b"/other"), "allow");
    assert_eq!(run(b"k-slash", b"/other"), "rate_limited");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn filters_with_other_plugin_names_keep_their_own_buckets() {
    // Two filters in one VM (one counter store), each listing key "k"
    // with a burst of 2: apart by plugin name, together under one name.
    let json = format!(
        r#"{{"keys":[{{"id":"k","sha256":"{}","rate_limit":{{"requests_per_second":0.01,"burst":2}}}}]}}"#,
        h("k-scoped")
    );
    let scoped = |name: &str| {
        let mut p = Policy::from_json(json.as_bytes()).unwrap();
        p.scope_buckets(name);
        p
    };
    let (public, partner, public_again) = (scoped("public"), scoped("partner"), scoped("public"));
    let host = FakeHost::default();
    let run = |p: &Policy| match p.decide(
        &HeaderMap::from_pairs(vec![(b"x-api-key", b"k-scoped"), (b":path", b"/")]),
        &host,
    ) {
        Decision::Allow(_) => "allow",
        Decision::Deny(d) => d.denial.code.as_str(),
    };
    assert_eq!(run(&public), "allow");
    assert_eq!(run(&public), "allow");
    assert_eq!(run(&public), "rate_limited");
    assert_eq!(run(&partner), "allow");
    assert_eq!(run(&partner), "allow");
    assert_eq!(run(&public_again), "rate_limited");
    let key = public.keys().lookup(b"k-scoped").unwrap();
    assert_eq!(
        public.key_bucket(&key).unwrap().as_str(),
        "keygate/rl/public//k"
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_refusal_names_the_key_by_id_or_masked_never_in_full() {
    let p = Policy::from_json(
            format!(
                r#"{{"keys":[{{"id":"a","sha256":"{}","scopes":["read"]}}],
                    "rules":[{{"match":{{"path_prefix":"/admin"}},"action":"require","scopes_any_of":["admin"]}}]}}"#,
                h("kg_live_0123456789abcdef")
            )
            .as_bytes(),
        )
        .unwrap();
    let host = FakeHost::default();
    let d = |k: &[u8], path: &[u8]| match p.decide(
        &HeaderMap::from_pairs(vec![(b"x-api-key", k), (b":path", path)]),
        &host,
    ) {
        Decision::Allow(_) => "allowed".to_string(),
        Decision::Deny(d) => d.key.to_string(),
    };
    assert_eq!(d(b"kg_live_0123456789abcdef", b"/admin"), "id=a");
    assert_eq!(d(b"kg_live_ffffffffffff9999", b"/"), "masked=kg_l…9999");
    assert_eq!(d(b"bad key", b"/"), "-");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_bucket_scope_logged_at_load_is_where_the_key_buckets_are() {
    // The filter logs "buckets under <scope>" when it loads a configuration:
    // an operator looking for a key's bucket in shared data starts there.
    let mut p = Policy::from_json(
        format!(
            r#"{{"keys":[{{"id":"k","sha256":"{}","rate_limit":{{"requests_per_second":1,"burst":1}}}}]}}"#,
            h("k-logged")
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(p.bucket_scope(), "keygate/rl//");
    p.scope_buckets("edge/public");
    assert_eq!(p.bucket_scope(), "keygate/rl/edge%2Fpublic/");
    let key = p.keys().lookup(b"k-logged").unwrap();
    let bucket = p.key_bucket(&key).unwrap();
    assert!(
        bucket.as_str().starts_with(p.bucket_scope()),
        "{}",
        bucket.as_str()
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn grpc_callers_are_refused_with_a_grpc_status() {
    let p = Policy::from_json(
        format!(r#"{{"keys":[{{"id":"a","sha256":"{}"}}]}}"#, h("k-grpc")).as_bytes(),
    )
    .unwrap();
    let host = FakeHost::default();
    for (content_type, grpc_status) in [
        (&b"application/grpc"[..], Some(16)),
        (b"application/grpc+proto", Some(16)),
        (b"application/json", None),
    ] {
        let headers = HeaderMap::from_pairs(vec![
            (&b":path"[..], &b"/pkg.Service/Method"[..]),
            (b"content-type", content_type),
        ]);
        match p.decide(&headers, &host) {
            Decision::Deny(d) => {
                assert_eq!(d.denial.code, DenyCode::MissingApiKey);
                let reply = crate::reply::render(&d.denial, "");
                assert_eq!(reply.grpc_status, grpc_status, "{content_type:?}");
            }
            Decision::Allow(_) => panic!("{content_type:?}: allowed without a key"),
        }
    }
}
