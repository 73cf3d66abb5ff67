//! `keygate serve`: the reference control plane, serving the key list (ETag,
//! 304, reloads, pages). TLS is in serve_tls.rs, usage reports in serve_usage.rs.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::server::{serve_args, Server};
use common::{create, read_list};

#[test]
fn serves_the_list_with_an_etag_and_304() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &["--scopes", "read"]);
    let server = Server::start(&file);
    server.wait_for_log("loaded", Duration::from_secs(1));

    let r = server.get("/v1/keys", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let list = read_list(&file);
    assert_eq!(r.body, serde_json::to_string(&list).unwrap());
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(
        etag,
        format!("\"{}\"", common::sha256_hex(r.body.as_bytes()))
    );
    // What the filter accepts.
    keygate_core::keylist::validate_key_list(r.body.as_bytes()).unwrap();

    let r = server.get("/v1/keys", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    assert_eq!(r.body, "");
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let r = server.get("/v1/keys", "If-None-Match: \"something-else\"\r\n");
    assert_eq!(r.status, 200);

    assert_eq!(server.get("/healthz", "").status, 200);
    assert_eq!(server.get("/nope", "").status, 404);
}

#[test]
fn reloads_changes_and_keeps_serving_through_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let server = Server::start(&file);
    assert_eq!(server.version(), 1);
    let old_etag = server
        .get("/v1/keys", "")
        .header("etag")
        .unwrap()
        .to_string();

    // A change is served within about a second.
    create(&file, "b", &[]);
    let changed = Instant::now();
    while server.version() != 2 {
        assert!(
            changed.elapsed() < Duration::from_millis(1500),
            "reload too slow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_for_log("reloaded", Duration::from_secs(1));
    assert!(server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("version 2, 2 keys")));
    let r = server.get("/v1/keys", &format!("If-None-Match: {old_etag}\r\n"));
    assert_eq!(r.status, 200, "old ETag still matched after a change");
    let served = r.body.clone();

    // A broken file: the old list stays, the reason names the field.
    std::fs::write(
        &file,
        r#"{"version":3,"keys":[{"id":"a","sha256":"oops"}]}"#,
    )
    .unwrap();
    let line = server.wait_for_log("not reloaded", Duration::from_secs(3));
    assert!(line.contains("keys[0].sha256"), "{line}");
    assert!(line.contains("still serving version 2"), "{line}");
    let r = server.get("/v1/keys", "");
    assert_eq!((r.status, r.body.as_str()), (200, served.as_str()));

    // An older version is not served either.
    std::fs::write(&file, r#"{"version":1,"keys":[]}"#).unwrap();
    server.wait_for_log("version 1 is older", Duration::from_secs(3));
    assert_eq!(server.version(), 2);

    // Fixed: served again.
    std::fs::write(&file, r#"{"version":3,"keys":[]}"#).unwrap();
    let fixed = Instant::now();
    while server.version() != 3 {
        assert!(
            fixed.elapsed() < Duration::from_secs(3),
            "not reloaded after a fix"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn refuses_to_start_on_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    std::fs::write(&file, r#"{"version":1,"keys":[{"id":"a"}]}"#).unwrap();
    let r = common::run(&serve_args(&file, &[]));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("missing field `sha256`"), "{}", r.stderr);
}

#[test]
fn serves_long_lists_in_pages_that_the_filter_assembles() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    for id in ["a", "b", "c", "d", "e"] {
        create(&file, id, &[]);
    }
    let server = Server::start_with(&file, &["--page-size", "2"]);
    server.wait_for_log("5 keys in 3 page(s)", Duration::from_secs(2));

    let first = server.get("/v1/keys", "");
    assert_eq!(first.status, 200);
    let etag = first.header("etag").unwrap().to_string();
    let mut pages = keygate_core::keylist::KeyListPages::default();
    pages.add(first.body.as_bytes()).unwrap();
    let mut paths = Vec::new();
    while let Some(next) = pages.next.clone() {
        let r = server.get(&next, &format!("If-Match: {etag}\r\n"));
        assert_eq!(r.status, 200, "{next}");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        pages.add(r.body.as_bytes()).unwrap();
        paths.push(next);
    }
    assert_eq!(paths, ["/v1/keys?page=2", "/v1/keys?page=3"]);
    assert_eq!(pages.finish().unwrap().store.len(), 5);

    // The first page answers 304 to its ETag; later pages do not.
    let r = server.get("/v1/keys", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    // A page of a list that changed since the first page: 412.
    let r = server.get("/v1/keys?page=2", "If-Match: \"stale\"\r\n");
    assert_eq!(r.status, 412);
    assert_eq!(server.get("/v1/keys?page=4", "").status, 404);
    assert_eq!(server.get("/v1/keys?page=0", "").status, 404);
    assert_eq!(server.get("/v1/keys?page=x", "").status, 404);
}
