//! One fetcher per Envoy, lease takeover, adoption by the other VMs,
//! generations, "unchanged" detection and staleness.

use keygate_core::poller::{Level, Poller};

use super::{list, Envoy, Reply, Server, Vm, S};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn one_vm_fetches_once_per_interval_and_the_others_adopt_its_list() {
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1", "k2"]);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    assert_eq!(a.verdict("k1"), "invalid_api_key");
    a.poll(&envoy, &mut server);
    b.poll(&envoy, &mut server);
    assert_eq!(server.hits, 1, "only the lease holder fetches");
    // The fetcher switches at once, the other VM not before its tick.
    assert_eq!((a.verdict("k1"), a.version()), ("allowed".into(), Some(1)));
    assert_eq!(a.verdict("static"), "allowed");
    assert_eq!(a.counts.ok, 1);
    assert_eq!(b.verdict("k1"), "allowed", "adopted in the same tick");
    assert_eq!(b.net.sent.len(), 0);
    assert_eq!((b.list_version, b.keys_loaded), (Some(1), Some(3)));
    assert_eq!(
        b.counts,
        Default::default(),
        "only the fetcher counts fetches"
    );
    // A quarter interval later nobody fetches; a whole interval later the
    // holder does, with the ETag it has.
    envoy.advance(S / 4);
    a.poll(&envoy, &mut server);
    b.poll(&envoy, &mut server);
    assert_eq!(server.hits, 1);
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    assert_eq!(server.hits, 2);
    assert_eq!(a.net.sent[1].header("if-none-match"), Some("\"v1\""));
    assert_eq!(a.net.sent[1].header(":authority"), Some("keys.internal"));
    assert_eq!(a.net.sent[1].cluster, "keygate_cp");
    assert_eq!(a.net.sent[1].timeout_ms, 2000);
    assert_eq!(a.counts.not_modified, 1);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_lease_is_taken_over_after_its_ttl_and_not_before() {
    // TTL: three poll intervals and the timeout, 5 s here.
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1"]);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    a.poll(&envoy, &mut server);
    assert_eq!(server.hits, 1);
    // A stops ticking (its worker is stuck). B waits out the lease.
    for _ in 0..4 {
        envoy.advance(S);
        b.poll(&envoy, &mut server);
    }
    envoy.advance(S - 1);
    b.poll(&envoy, &mut server);
    assert_eq!(server.hits, 1, "a lease 1 ns from lapsing is not taken");
    envoy.advance(1);
    server.set(2, &["k9"]);
    b.poll(&envoy, &mut server);
    assert_eq!(server.hits, 2, "B took over");
    assert_eq!(b.verdict("k9"), "allowed");
    // A comes back: it adopts B's list and leaves the fetching to B.
    a.poll(&envoy, &mut server);
    assert_eq!(
        (a.verdict("k9"), a.verdict("k1")),
        ("allowed".into(), "invalid_api_key".into())
    );
    assert_eq!(a.net.sent.len(), 1);
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    b.poll(&envoy, &mut server);
    assert_eq!((a.net.sent.len(), b.net.sent.len()), (1, 2));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_fetch_in_flight_is_not_doubled_by_later_ticks() {
    let envoy = Envoy::new();
    let mut a = Vm::new(&envoy, 1);
    a.tick(&envoy);
    envoy.advance(S);
    a.tick(&envoy);
    assert_eq!(a.net.sent.len(), 1, "still waiting for the first answer");
    // A response to some other callout changes nothing.
    let mut server = Server::new(1, &["k1"]);
    let reply = server.answer(&a.net.sent[0].clone());
    a.deliver_token(&envoy, 99, reply);
    assert_eq!((a.version(), a.counts), (None, Default::default()));
    a.serve(&envoy, &mut server);
    assert_eq!(a.verdict("k1"), "allowed");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn generations_publish_each_new_list_once() {
    let envoy = Envoy::new();
    let mut server = Server::new(4, &["k1"]);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    a.poll(&envoy, &mut server);
    b.tick(&envoy);
    assert_eq!((a.switches, b.switches), (1, 1));
    // 304: nothing to apply anywhere.
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    b.tick(&envoy);
    assert_eq!(a.counts.not_modified, 1);
    // A 200 with the same version and ETag (a control plane that ignores
    // If-None-Match) is a good fetch but not a new list.
    envoy.advance(S);
    a.tick(&envoy);
    a.deliver(&envoy, Reply::ok("\"v4\"", list(4, &["k1"], None)));
    b.tick(&envoy);
    assert_eq!(a.counts.ok, 2);
    assert_eq!((a.switches, b.switches), (1, 1));
    assert_eq!(a.logged(Level::Info, "version 4 published"), 1);
    // The same version with a new ETag is republished and picked up.
    envoy.advance(S);
    a.tick(&envoy);
    a.deliver(&envoy, Reply::ok("\"v4b\"", list(4, &["k1", "k2"], None)));
    b.tick(&envoy);
    assert_eq!((a.switches, b.switches), (2, 2));
    assert_eq!(b.verdict("k2"), "allowed");
    // A newer version too.
    server.set(5, &["k3"]);
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    b.tick(&envoy);
    assert_eq!(
        (b.verdict("k3"), b.verdict("k1"), b.version()),
        ("allowed".into(), "invalid_api_key".into(), Some(5))
    );
    assert_eq!(b.switches, 3);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn staleness_counts_from_the_last_good_fetch_for_every_vm() {
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1"]);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    // Cold start: no list, not stale, no age.
    a.tick(&envoy);
    assert_eq!((a.stale, a.age_s), (false, None));
    a.serve(&envoy, &mut server);
    envoy.advance(S);
    b.tick(&envoy);
    assert_eq!((b.stale, b.age_s), (false, Some(1)));
    // The control plane fails from now on: the list ages.
    for _ in 0..9 {
        envoy.advance(S);
        a.tick(&envoy);
        if a.in_flight().is_some() {
            a.deliver(&envoy, Reply::status(503, b"no healthy upstream"));
        }
    }
    b.tick(&envoy);
    assert_eq!(
        (b.stale, b.age_s),
        (false, Some(10)),
        "10 s is not past max_staleness"
    );
    envoy.advance(1_000_000);
    a.tick(&envoy);
    b.tick(&envoy);
    assert!(a.stale && b.stale);
    assert_eq!(
        a.verdict("k1"),
        "allowed",
        "stale_policy serve keeps the list"
    );
    assert_eq!(a.counts.failed, 9);
    // A 304 confirms the list again.
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    assert_eq!(a.counts.not_modified, 1);
    a.tick(&envoy);
    b.tick(&envoy);
    assert_eq!((b.stale, b.age_s, a.stale), (false, Some(0), false));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_reload_adopts_the_published_list_at_once() {
    let envoy = Envoy::new();
    let mut server = Server::new(3, &["k1"]);
    let mut a = Vm::new(&envoy, 1);
    a.poll(&envoy, &mut server);
    // The new root starts from the configuration alone, then syncs.
    a.sync(&envoy);
    assert_eq!((a.verdict("k1"), a.version()), ("allowed".into(), Some(3)));
    // A VM created by the reload (a new poller) too.
    let mut fresh = Vm::new(&envoy, 7);
    fresh.sync(&envoy);
    assert_eq!(fresh.verdict("k1"), "allowed");
    assert_eq!(fresh.net.sent.len(), 0);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_reload_that_only_changes_timings_polls_the_same_list() {
    let envoy = Envoy::new();
    let slower =
        Envoy::with_config(serde_json::json!({"poll_interval": "2s", "max_staleness": "1m"}));
    let elsewhere = Envoy::with_config(serde_json::json!({"path": "/v2/keys"}));
    let poller = Poller::new(envoy.cp(), 1);
    assert!(poller.polls(slower.cp()));
    assert!(!poller.polls(elsewhere.cp()));
    assert_eq!(Poller::tick_period_ms(envoy.cp()), 250);
    assert_eq!(Poller::tick_period_ms(elsewhere.cp()), 250);
    let hourly =
        Envoy::with_config(serde_json::json!({"poll_interval": "1h", "max_staleness": "2h"}));
    assert_eq!(Poller::tick_period_ms(hourly.cp()), 1000);
    let fast = Envoy::with_config(serde_json::json!({"poll_interval": "100ms"}));
    assert_eq!(Poller::tick_period_ms(fast.cp()), 50);
}
