//! Several named limits per key (and quotas as long windows): all must
//! admit, tokens are spent only when they do, and a 429 names the limit
//! that refused.
#![allow(clippy::unwrap_used)]

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::{Decision, Denied};
use keygate_core::reply;
use keygate_core::testing::FakeHost;
use keygate_core::Policy;
use serde_json::{json, Value};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn h(k: &str) -> String {
    hex::encode(digest(k.as_bytes()))
}

fn policy(limits: Value) -> Policy {
    let cfg = json!({"keys": [{"id": "sup", "sha256": h("k-sup"), "rate_limits": limits}]});
    Policy::from_json(cfg.to_string().as_bytes()).unwrap()
}

/// The Lead Distro promise: 100 rps sustained, 200 rps for 10 s.
fn lead_distro() -> Policy {
    policy(json!([
        {"name": "sustained", "requests": 100, "per": "1s", "burst": 1010},
        {"name": "peak", "requests": 200, "per": "1s", "burst": 60}
    ]))
}

/// Sends `n` requests `gap_ns` apart; the index and limit of each refusal.
fn pace(p: &Policy, host: &FakeHost, n: usize, gap_ns: u64) -> Vec<(usize, String)> {
    let map = HeaderMap::from_pairs(vec![(b"x-api-key", b"k-sup")]);
    let mut refused = Vec::new();
    for i in 0..n {
        if let Decision::Deny(Denied { denial, .. }) = p.decide(&map, host) {
            assert_eq!(denial.code.as_str(), "rate_limited");
            refused.push((i, denial.rate.unwrap().policy.as_str().to_string()));
        }
        host.advance_ns(gap_ns);
    }
    refused
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn two_hundred_rps_for_ten_seconds_is_never_refused() {
    let refused = pace(&lead_distro(), &FakeHost::default(), 2_000, 5_000_000);
    assert_eq!(refused, []);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn two_hundred_rps_for_twenty_seconds_is_refused_from_about_the_tenth_second() {
    let refused = pace(&lead_distro(), &FakeHost::default(), 4_000, 5_000_000);
    let (first, limit) = refused.first().unwrap();
    let at_s = *first as f64 * 0.005;
    assert!((9.9..=10.5).contains(&at_s), "first refusal at {at_s} s");
    assert_eq!(limit, "sustained");
    // From then on about half are refused: the sustained 100 rps still pass.
    let late = refused.iter().filter(|(i, _)| *i >= 3_000).count();
    assert!(
        (450..=550).contains(&late),
        "{late} of the last 1000 refused"
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn three_hundred_rps_is_refused_at_once_by_the_peak_limit() {
    let refused = pace(&lead_distro(), &FakeHost::default(), 300, 3_333_333);
    let (first, limit) = refused.first().unwrap();
    assert!(
        *first as f64 * 0.00333 < 1.0,
        "first refusal after {first} requests"
    );
    assert_eq!(limit, "peak");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_request_one_limit_refuses_spends_no_token_of_another() {
    // fast: 2 per 200 s (a token every 100 s); slow: 3 per 3000 s (every 1000 s).
    let p = policy(json!([
        {"name": "fast", "requests": 2, "per": "200s"},
        {"name": "slow", "requests": 3, "per": "3000s"}
    ]));
    let host = FakeHost::default();
    assert_eq!(pace(&p, &host, 2, 0), []);
    // Eight refusals by `fast`, while `slow` still holds one token.
    let refused = pace(&p, &host, 8, 0);
    assert_eq!(refused.len(), 8);
    assert!(refused.iter().all(|(_, l)| l == "fast"));
    host.advance_ns(100_000_000_000);
    // `fast` has refilled one token; `slow` still has its last one, so the
    // request passes only if the refused ones did not drain it.
    assert_eq!(pace(&p, &host, 1, 0), []);
    assert_eq!(pace(&p, &host, 1, 0), [(0, "slow".to_string())]);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_long_window_is_a_quota() {
    let p = policy(json!([
        {"name": "per-second", "requests": 50, "per": "1s"},
        {"name": "daily", "requests": 3, "per": "1d"}
    ]));
    let host = FakeHost::default();
    let refused = pace(&p, &host, 5, 1_000_000_000);
    assert_eq!(
        refused,
        [(3, "daily".to_string()), (4, "daily".to_string())]
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_429_names_the_refusing_limit_in_its_headers() {
    let p = lead_distro();
    let host = FakeHost::default();
    let map = HeaderMap::from_pairs(vec![(b"x-api-key", b"k-sup")]);
    let denial = loop {
        if let Decision::Deny(d) = p.decide(&map, &host) {
            break d.denial;
        }
    };
    let r = reply::render(&denial, "");
    let get = |n: &str| {
        r.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("ratelimit-policy").as_deref(),
        Some("\"peak\";q=60;w=1")
    );
    assert!(get("ratelimit").unwrap().starts_with("\"peak\";r=0;t="));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn limit_lists_are_checked_with_their_paths() {
    let first_error =
        |cfg: Value| Policy::from_json(cfg.to_string().as_bytes()).unwrap_err()[0].to_string();
    let key = |extra: Value| {
        let mut k = json!({"id": "a", "sha256": h("a")});
        k.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"keys": [k]})
    };
    assert_eq!(
        first_error(key(json!({"rate_limits": [{"requests": 5, "per": "1s"}]}))),
        "keys[0].rate_limits[0].name: a limit in a list needs a name"
    );
    assert_eq!(
        first_error(key(json!({"rate_limits": [
            {"name": "a", "requests": 5, "per": "1s"}, {"name": "a", "requests": 9, "per": "1m"}]}))),
        "keys[0].rate_limits[1].name: two limits have this name"
    );
    assert_eq!(
        first_error(key(
            json!({"rate_limit": {"requests_per_second": 1, "burst": 1},
                               "rate_limits": [{"name": "a", "requests": 5, "per": "1s"}]})
        )),
        "keys[0].rate_limits: give rate_limit or rate_limits, not both"
    );
    assert!(
        first_error(json!({"rate_limits": [{"name": "x", "requests": 5, "per": "1y"}]}))
            .starts_with("rate_limits[0].per: must be a duration")
    );
    assert_eq!(
        first_error(json!({"rate_limit": {"requests_per_second": 5}})),
        "rate_limit.burst: is required with requests_per_second"
    );
    assert!(first_error(
        json!({"rate_limits": [{"name": "bad name", "requests": 1, "per": "1s"}]})
    )
    .starts_with("rate_limits[0].name: must be 1-16 characters"));
    assert!(first_error(
        json!({"rate_limits": [{"name": "q", "requests": 10, "per": "300d", "burst": 1000}]})
    )
    .starts_with("rate_limits[0].burst: makes the bucket take longer than 366 days"));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn limit_numbers_are_accepted_up_to_their_bounds_and_refused_past_them() {
    let errors = |limit: Value| match Policy::from_json(
        json!({ "rate_limit": limit }).to_string().as_bytes(),
    ) {
        Ok(_) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    };
    let accepted = |limit: Value| {
        let e = errors(limit.clone());
        assert!(e.is_empty(), "{limit}: {e:?}");
    };
    let refused = |limit: Value, error: &str| assert_eq!(errors(limit.clone()), [error], "{limit}");

    let burst = "rate_limit.burst: must be an integer from 1 to 1000000";
    accepted(json!({"requests_per_second": 1, "burst": 1}));
    accepted(json!({"requests_per_second": 1, "burst": 1_000_000}));
    refused(json!({"requests_per_second": 1, "burst": 0}), burst);
    refused(json!({"requests_per_second": 1, "burst": 1_000_001}), burst);

    let rps = "rate_limit.requests_per_second: must be a number from 0.001 to 1000000";
    accepted(json!({"requests_per_second": 0.001, "burst": 1}));
    accepted(json!({"requests_per_second": 1_000_000, "burst": 1}));
    refused(json!({"requests_per_second": 0.0009, "burst": 1}), rps);
    refused(json!({"requests_per_second": 1_000_000.5, "burst": 1}), rps);

    let requests = "rate_limit.requests: must be an integer from 1 to 1000000000";
    accepted(json!({"requests": 1, "per": "1s"}));
    accepted(json!({"requests": 1_000_000_000u64, "per": "1d", "burst": 10}));
    refused(json!({"requests": 0, "per": "1s"}), requests);
    refused(
        json!({"requests": 1_000_000_001u64, "per": "1d", "burst": 10}),
        requests,
    );

    // The bucket defaults to `requests`, up to a million.
    accepted(json!({"requests": 1_000_000, "per": "1d"}));
    refused(
        json!({"requests": 1_000_001, "per": "1d"}),
        "rate_limit.burst: must be given when requests is over 1000000",
    );
    accepted(json!({"requests": 1_000_001, "per": "1d", "burst": 1_000}));

    let per = "rate_limit.per: must be a duration from 1ms to 366d, e.g. \"1s\", \"1h\", \"30d\"";
    accepted(json!({"requests": 1, "per": "1ms"}));
    accepted(json!({"requests": 1, "per": "366d"}));
    refused(json!({"requests": 1, "per": "0ms"}), per);
    refused(json!({"requests": 1, "per": "31622400001ms"}), per);

    // A bucket that refills in exactly 366 days is the longest allowed.
    accepted(json!({"requests": 2, "per": "366d", "burst": 2}));
    refused(
        json!({"requests": 2, "per": "366d", "burst": 3}),
        "rate_limit.burst: makes the bucket take longer than 366 days to refill",
    );

    let either = "rate_limit.requests_per_second: give requests_per_second (with burst), or requests and per";
    refused(json!({"requests": 5}), either);
    refused(json!({"per": "1s"}), either);
    refused(
        json!({"requests_per_second": 5, "requests": 5, "per": "1s", "burst": 1}),
        either,
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_429_that_fails_closed_still_carries_retry_after_and_the_policy() {
    // Without a monotonic clock no bucket can be counted: the request is
    // refused, and the client is still told when to retry and which limit.
    let p = policy(json!([{"name": "peak", "requests": 200, "per": "1s", "burst": 60}]));
    let host = FakeHost::default();
    host.monotonic.set(None);
    let map = HeaderMap::from_pairs(vec![(&b"x-api-key"[..], &b"k-sup"[..]), (b":path", b"/")]);
    let Decision::Deny(Denied { denial, .. }) = p.decide(&map, &host) else {
        panic!("allowed without a clock");
    };
    assert_eq!(denial.code.as_str(), "rate_limited");
    let r = reply::render(&denial, "");
    let get = |n: &str| {
        r.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("retry-after").as_deref(), Some("1"));
    assert_eq!(
        get("ratelimit-policy").as_deref(),
        Some("\"peak\";q=60;w=1")
    );
}
