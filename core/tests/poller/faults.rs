//! Every fault keeps the last good list, counts one failed fetch, and does
//! not stop the next poll.

use keygate_core::control::ControlPlane;
use keygate_core::poller::{Counts, Level, SharedKeys};
use keygate_core::ratelimit::CounterStore;

use super::{h, list, Envoy, Reply, Server, Vm, ONE_FAILURE, S};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

/// An Envoy whose VMs `a` (the fetcher) and `b` use list version 1 (`k1`),
/// with `a`'s counts reset, one interval later: `a`'s next tick fetches.
fn serving_v1() -> (Envoy, Vm, Vm) {
    let envoy = Envoy::new();
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    a.poll(&envoy, &mut Server::new(1, &["k1"]));
    b.tick(&envoy);
    assert_eq!(
        (a.verdict("k1"), b.verdict("k1")),
        ("allowed".into(), "allowed".into())
    );
    a.counts = Counts::default();
    envoy.advance(S);
    (envoy, a, b)
}

/// After a fault: one failure counted, nothing else, and both VMs still
/// on version 1; then the next poll applies version 2.
fn assert_kept_and_recovers(case: &str, envoy: &Envoy, a: &mut Vm, b: &mut Vm) {
    assert_eq!(a.counts, ONE_FAILURE, "{case}");
    let warned = a.logs.iter().filter(|(l, _)| *l != Level::Info).count();
    assert_eq!(warned, 1, "{case}: {:?}", a.logs);
    b.tick(envoy);
    for vm in [&*a, &*b] {
        assert_eq!(vm.version(), Some(1), "{case}");
        assert_eq!(vm.verdict("k1"), "allowed", "{case}");
        assert_eq!(vm.verdict("k2"), "invalid_api_key", "{case}");
    }
    assert_eq!(b.switches, 1, "{case}: nothing new published");
    envoy.advance(S);
    a.poll(envoy, &mut Server::new(2, &["k2"]));
    b.tick(envoy);
    assert_eq!(a.counts.ok, 1, "{case}");
    for vm in [&*a, &*b] {
        assert_eq!(vm.version(), Some(2), "{case}");
        assert_eq!(vm.verdict("k2"), "allowed", "{case}");
    }
}

fn many_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key-number-{i}")).collect()
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn every_faulty_response_keeps_the_last_good_list() {
    let big = many_keys(60);
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let oversize = list(2, &big, None);
    assert!(oversize.len() > 4096);
    let good = list(2, &["k2"], None);
    let clash = serde_json::json!({"version": 2, "keys": [{"id": "static", "sha256": h("new")}]});
    let clash = clash.to_string();
    let cases: Vec<(&str, Reply, &str)> = vec![
        ("reset", Reply::Reset, "callout reset"),
        (
            "500",
            Reply::status(500, br#"{"error":"boom"}"#),
            "HTTP 500",
        ),
        (
            "503",
            Reply::status(503, b"no healthy upstream"),
            "HTTP 503",
        ),
        ("404", Reply::status(404, b"not found"), "HTTP 404"),
        (
            "timeout",
            Reply::status(504, b"upstream request timeout"),
            "HTTP 504",
        ),
        ("412 on a first page", Reply::status(412, b""), "HTTP 412"),
        (
            "invalid JSON",
            Reply::ok("\"x\"", b"garbage".to_vec()),
            "invalid key list",
        ),
        (
            "cut JSON",
            Reply::ok("\"x\"", good[..good.len() - 5].to_vec()),
            "invalid key list",
        ),
        (
            "wrong schema",
            Reply::ok("\"x\"", br#"{"version":2,"keyz":[]}"#.to_vec()),
            "invalid key list",
        ),
        (
            "invalid key",
            Reply::ok(
                "\"x\"",
                br#"{"version":2,"keys":[{"id":"k2","sha256":"xyz"}]}"#.to_vec(),
            ),
            "sha256",
        ),
        (
            "duplicate key",
            Reply::ok("\"x\"", list(2, &["k2", "k2"], None)),
            "invalid key list",
        ),
        (
            "oversize body",
            Reply::ok("\"x\"", oversize),
            "larger than max_list_bytes",
        ),
        (
            "body shorter than announced",
            Reply::Http {
                status: 200,
                etag: Some("\"x\"".into()),
                announced: good.len() + 100,
                body: good.clone(),
            },
            "larger than max_list_bytes",
        ),
        (
            "older version",
            Reply::ok("\"v0\"", list(0, &["k2"], None)),
            "older than the current 1",
        ),
        (
            "clash with a static key",
            Reply::ok("\"x\"", clash.into_bytes()),
            "clashes with a static key",
        ),
    ];
    for (case, reply, why) in cases {
        let (envoy, mut a, mut b) = serving_v1();
        a.tick(&envoy);
        a.deliver(&envoy, reply);
        assert_eq!(
            a.logs.iter().filter(|(_, m)| m.contains(why)).count(),
            1,
            "{case}: {:?}",
            a.logs
        );
        assert_kept_and_recovers(case, &envoy, &mut a, &mut b);
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_callout_the_host_refuses_to_send_is_a_failed_fetch() {
    let (envoy, mut a, mut b) = serving_v1();
    a.net.refuse = Some("BadArgument".into());
    a.tick(&envoy);
    assert_eq!(
        a.logged(
            Level::Warn,
            "fetch not sent (cluster \"keygate_cp\", status BadArgument)"
        ),
        1
    );
    a.net.refuse = None;
    assert_kept_and_recovers("refused", &envoy, &mut a, &mut b);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_list_that_cannot_be_published_is_not_used() {
    let (envoy, mut a, mut b) = serving_v1();
    *envoy.broken.borrow_mut() = Some("/list");
    a.poll(&envoy, &mut Server::new(2, &["k2"]));
    // Fetched fine, then refused by shared data: counted both ways.
    assert_eq!(a.counts.ok, 1);
    assert_eq!(a.counts.failed, 1);
    assert_eq!(a.logged(Level::Error, "could not publish"), 1);
    b.tick(&envoy);
    assert_eq!((a.version(), b.version()), (Some(1), Some(1)));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn without_shared_data_for_the_lease_nobody_fetches() {
    let envoy = Envoy::new();
    *envoy.broken.borrow_mut() = Some("/lease");
    let mut a = Vm::new(&envoy, 1);
    a.tick(&envoy);
    assert!(a.net.sent.is_empty());
    *envoy.broken.borrow_mut() = None;
    a.tick(&envoy);
    assert_eq!(a.net.sent.len(), 1);
}

/// Writes `bytes` as the published list of `cp`, with a new generation.
fn publish_raw(envoy: &Envoy, cp: &ControlPlane, bytes: &[u8]) {
    let keys = SharedKeys::of(cp);
    let (meta, cas) = envoy.store.get(&keys.meta).unwrap().unwrap();
    let mut meta = keygate_core::control::Published::decode(&meta).unwrap();
    meta.generation += 1;
    meta.version += 1;
    envoy.store.set(&keys.list, bytes, None).unwrap();
    assert!(envoy.store.set(&keys.meta, &meta.encode(), cas).unwrap());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_corrupt_published_list_is_not_adopted() {
    let (envoy, mut a, mut b) = serving_v1();
    publish_raw(&envoy, envoy.cp(), b"KGKSnot a key store");
    b.tick(&envoy);
    assert_eq!(b.logged(Level::Error, "published key list is corrupt"), 1);
    assert_eq!((b.version(), b.verdict("k1")), (Some(1), "allowed".into()));
    // Reported once per generation, not on every tick.
    b.tick(&envoy);
    assert_eq!(b.logs.len(), 1);
    // The fetcher's next good list repairs it.
    a.poll(&envoy, &mut Server::new(3, &["k3"]));
    b.tick(&envoy);
    assert_eq!(b.verdict("k3"), "allowed");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_published_list_missing_from_shared_data_is_picked_up_when_it_appears() {
    // What a fetcher in another Envoy published, copied over in two steps.
    let elsewhere = Envoy::new();
    Vm::new(&elsewhere, 1).poll(&elsewhere, &mut Server::new(1, &["k1"]));
    let keys = SharedKeys::of(elsewhere.cp());
    let (meta, _) = elsewhere.store.get(&keys.meta).unwrap().unwrap();
    let (stored, _) = elsewhere.store.get(&keys.list).unwrap().unwrap();
    let envoy = Envoy::new();
    envoy.store.set(&keys.meta, &meta, None).unwrap();
    *envoy.broken.borrow_mut() = Some("/lease");
    let mut b = Vm::new(&envoy, 2);
    b.tick(&envoy);
    assert_eq!(
        (b.verdict("k1"), b.version()),
        ("invalid_api_key".into(), None)
    );
    envoy.store.set(&keys.list, &stored, None).unwrap();
    b.tick(&envoy);
    assert_eq!((b.verdict("k1"), b.version()), ("allowed".into(), Some(1)));
}
