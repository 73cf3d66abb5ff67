//! `keygate serve`: the reference control plane.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create, read_list};

/// A running `keygate serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(keys: &Path) -> Server {
        Server::start_with(keys, &[])
    }

    fn start_with(keys: &Path, extra: &[&str]) -> Server {
        let mut args = vec![
            "serve",
            "--keys",
            keys.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = common::keygate(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    log.lock().unwrap().push(line.unwrap());
                }
            });
        }
        let mut server = Server {
            child,
            addr: String::new(),
            log,
        };
        let line = server.wait_for_log("listening on http://", Duration::from_secs(10));
        server.addr = line.rsplit("http://").next().unwrap().to_string();
        server
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, path: &str, extra_headers: &str) -> Reply {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n{extra_headers}\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn version(&self) -> u64 {
        let r = self.get("/v1/keys", "");
        assert_eq!(r.status, 200);
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["version"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

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
    let r = common::run(&[
        "serve",
        "--keys",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
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
