//! Lists served in pages: assembled, checked as a whole, and never applied
//! in part.

use keygate_core::poller::{Counts, Level};

use super::{list, Envoy, Reply, Server, Vm, ONE_FAILURE, S};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_paged_list_is_applied_only_once_complete() {
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1", "k2", "k3", "k4", "k5"]);
    server.page_size = Some(2);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    a.tick(&envoy);
    let first = a.in_flight().cloned().unwrap();
    a.deliver(&envoy, server.answer(&first));
    // Page 2 is asked for with the first page's ETag; nothing applies yet.
    let second = a.in_flight().cloned().unwrap();
    assert_eq!(second.header(":path"), Some("/v1/keys?page=2"));
    assert_eq!(second.header("if-match"), Some("\"v1\""));
    assert_eq!(second.header("if-none-match"), None);
    b.tick(&envoy);
    for vm in [&a, &b] {
        assert_eq!(
            (vm.version(), vm.verdict("k1")),
            (None, "invalid_api_key".into())
        );
    }
    a.serve(&envoy, &mut server);
    b.tick(&envoy);
    assert_eq!(server.hits, 3);
    for vm in [&a, &b] {
        assert_eq!(vm.version(), Some(1));
        for k in ["k1", "k3", "k5", "static"] {
            assert_eq!(vm.verdict(k), "allowed");
        }
        assert_eq!(vm.keys_loaded, Some(6));
    }
    assert_eq!(
        a.counts,
        Counts {
            ok: 1,
            ..Counts::default()
        },
        "one fetch, however many pages"
    );
}

/// An Envoy serving version 1 (`k1`, one page) from VM `a`, with a server
/// that now has version 2 (`k2`..`k4`) in pages of one key.
fn paged_update() -> (Envoy, Vm, Server) {
    let envoy = Envoy::new();
    let mut a = Vm::new(&envoy, 1);
    let mut server = Server::new(1, &["k1"]);
    a.poll(&envoy, &mut server);
    a.counts = Counts::default();
    server.set(2, &["k2", "k3", "k4"]);
    server.page_size = Some(1);
    envoy.advance(S);
    a.tick(&envoy);
    let first = a.in_flight().cloned().unwrap();
    a.deliver(&envoy, server.answer(&first));
    (envoy, a, server)
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_page_failing_midway_keeps_the_last_good_list_and_the_next_poll_starts_over() {
    let faults: Vec<(&str, Reply)> = vec![
        ("reset", Reply::Reset),
        ("500", Reply::status(500, b"")),
        ("timeout", Reply::status(504, b"upstream request timeout")),
        ("304 mid-list", Reply::status(304, b"")),
        ("garbage", Reply::ok("\"v2\"", b"garbage".to_vec())),
        ("other version", Reply::ok("\"v2\"", list(3, &["k3"], None))),
        (
            "duplicate across pages",
            Reply::ok("\"v2\"", list(2, &["k2"], None)),
        ),
    ];
    for (case, reply) in faults {
        let (envoy, mut a, mut server) = paged_update();
        a.deliver(&envoy, reply);
        assert_eq!(a.counts, ONE_FAILURE, "{case}");
        assert!(a.in_flight().is_none(), "{case}: the rest is not asked for");
        assert_eq!(
            (a.version(), a.verdict("k1"), a.verdict("k2")),
            (Some(1), "allowed".into(), "invalid_api_key".into()),
            "{case}"
        );
        envoy.advance(S);
        a.tick(&envoy);
        assert_eq!(
            a.in_flight().unwrap().header(":path"),
            Some("/v1/keys"),
            "{case}"
        );
        a.serve(&envoy, &mut server);
        assert_eq!(
            (a.version(), a.verdict("k4"), a.verdict("k1")),
            (Some(2), "allowed".into(), "invalid_api_key".into()),
            "{case}"
        );
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_list_that_changes_while_paging_is_refused_and_refetched() {
    let (envoy, mut a, mut server) = paged_update();
    server.version = 3;
    a.serve(&envoy, &mut server);
    assert_eq!(
        a.logged(
            Level::Warn,
            "changed while its pages were fetched (HTTP 412)"
        ),
        1
    );
    assert_eq!(a.version(), Some(1));
    envoy.advance(S);
    a.poll(&envoy, &mut server);
    assert_eq!((a.version(), a.verdict("k3")), (Some(3), "allowed".into()));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_page_the_host_refuses_to_send_ends_the_fetch() {
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1", "k2"]);
    server.page_size = Some(1);
    let mut a = Vm::new(&envoy, 1);
    a.tick(&envoy);
    let first = a.in_flight().cloned().unwrap();
    a.net.refuse = Some("InternalFailure".into());
    a.deliver(&envoy, server.answer(&first));
    assert_eq!(a.counts, ONE_FAILURE);
    assert_eq!(a.logged(Level::Warn, "fetch not sent"), 1);
    assert_eq!((a.in_flight(), a.version()), (None, None));
    a.net.refuse = None;
    envoy.advance(S);
    a.tick(&envoy);
    assert_eq!(a.in_flight().unwrap().header(":path"), Some("/v1/keys"));
    a.serve(&envoy, &mut server);
    assert_eq!(a.verdict("k2"), "allowed");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_fetcher_keeps_its_lease_while_pages_arrive() {
    // Each page takes 3 s to come; the lease lasts 5 s from its last renewal.
    let envoy = Envoy::new();
    let mut server = Server::new(1, &["k1", "k2", "k3", "k4"]);
    server.page_size = Some(1);
    let (mut a, mut b) = (Vm::new(&envoy, 1), Vm::new(&envoy, 2));
    a.tick(&envoy);
    while let Some(req) = a.in_flight().cloned() {
        envoy.advance(3 * S);
        b.tick(&envoy);
        assert!(b.net.sent.is_empty(), "B took the lease during paging");
        let reply = server.answer(&req);
        a.deliver(&envoy, reply);
    }
    assert_eq!(a.verdict("k4"), "allowed");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn pages_count_together_against_max_list_bytes() {
    let envoy = Envoy::new();
    let ids: Vec<String> = (0..60).map(|i| format!("key-{i:03}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut server = Server::new(1, &ids);
    server.page_size = Some(15);
    let mut a = Vm::new(&envoy, 1);
    a.tick(&envoy);
    let first = a.in_flight().cloned().unwrap();
    let Reply::Http { body, .. } = server.answer(&first) else {
        unreachable!()
    };
    assert!(
        body.len() < 4096 && 4 * body.len() > 4096,
        "each page fits, all four do not"
    );
    a.serve(&envoy, &mut server);
    assert_eq!(a.counts, ONE_FAILURE);
    assert_eq!(a.logged(Level::Warn, "larger than max_list_bytes"), 1);
    assert_eq!(a.version(), None);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_control_plane_that_never_stops_paging_is_cut_off() {
    let envoy = Envoy::with_config(serde_json::json!({"max_list_bytes": 1 << 20}));
    let mut a = Vm::new(&envoy, 1);
    a.tick(&envoy);
    let endless = list(1, &[], Some("/v1/keys?again"));
    let mut pages = 0;
    while a.in_flight().is_some() && pages <= keygate_core::keylist::MAX_PAGES {
        a.deliver(&envoy, Reply::ok("\"e\"", endless.clone()));
        pages += 1;
    }
    assert_eq!(pages, keygate_core::keylist::MAX_PAGES);
    assert_eq!(a.counts, ONE_FAILURE);
    assert_eq!(a.logged(Level::Warn, "past 10000 pages"), 1);
    assert_eq!(a.version(), None);
}
