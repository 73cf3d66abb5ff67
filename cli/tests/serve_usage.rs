//! `keygate serve`'s usage reports: `POST /v1/usage`, `keys.usage.json`, and
//! `keygate keys list` reading it.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::create;
use common::server::{serve_args, Server};

/// `keys list --json` of `file`, as JSON.
fn listing(file: &Path) -> serde_json::Value {
    let r = common::run(&["keys", "list", "--json", "--file", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn usage_reports_add_up_in_a_file_that_keys_list_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    create(&file, "b", &[]);
    create(&file, "idle", &[]);
    let server = Server::start(&file);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Two Envoys report, one of them twice.
    for body in [
        format!(
            r#"{{"keys":[{{"id":"a","requests":3,"last_used":{}}}]}}"#,
            now - 60
        ),
        format!(
            r#"{{"keys":[{{"id":"a","requests":4,"last_used":{now}}},{{"id":"b","requests":1,"last_used":{}}}]}}"#,
            now - 30
        ),
    ] {
        let r = server.post("/v1/usage", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let usage_file = dir.path().join("keys.usage.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v = listing(&file);
        if v["keys"][0]["requests_24h"] == 7 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(usage_file.exists());
    let row = |id: &str| {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(row("a")["requests_24h"], 7, "{v}");
    assert_eq!(row("b")["requests_24h"], 1, "{v}");
    assert_eq!(row("idle")["requests_24h"], 0, "{v}");
    assert_eq!(row("idle")["last_used"], serde_json::Value::Null, "{v}");
    let a_last = row("a")["last_used"].as_str().unwrap().to_string();
    let parsed =
        time::OffsetDateTime::parse(&a_last, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(
        parsed.unix_timestamp(),
        now as i64,
        "the later of the two reports"
    );

    // The table says the same.
    let r = common::run(&["keys", "list", "--file", file.to_str().unwrap()]);
    let line = |id: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap()
            .to_string()
    };
    assert!(
        r.stdout
            .lines()
            .next()
            .unwrap()
            .contains("STATUS  LAST USED             24H  LABEL"),
        "{}",
        r.stdout
    );
    assert!(line("a").contains(&format!("{a_last}  7 ")), "{}", r.stdout);
    assert!(line("idle").contains("never"), "{}", r.stdout);

    // A restarted server keeps what it recorded.
    drop(server);
    let server = Server::start(&file);
    let body = format!(r#"{{"keys":[{{"id":"idle","requests":2,"last_used":{now}}}]}}"#);
    assert_eq!(server.post("/v1/usage", &body).status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listing(&file)["keys"][2]["requests_24h"] != 2 {
        assert!(Instant::now() < deadline, "{}", listing(&file));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(listing(&file)["keys"][0]["requests_24h"], 7);
}

#[test]
fn a_malformed_usage_report_gets_a_json_error_and_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let server = Server::start(&file);
    for (body, status, code, message) in [
        ("{", 400, "invalid_usage_report", "EOF while parsing"),
        (
            r#"{"keys":[{"id":"a","requests":0,"last_used":1}]}"#,
            400,
            "invalid_usage_report",
            "keys[0].requests: must be at least 1",
        ),
        (
            r#"{"keys":[{"id":"a","requests":1,"last_used":1,"key":"sk_x"}]}"#,
            400,
            "invalid_usage_report",
            "keys[0].key: unknown field `key`",
        ),
    ] {
        let r = server.post("/v1/usage", body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], code, "{}", r.body);
        assert!(
            v["message"].as_str().unwrap().contains(message),
            "{}",
            r.body
        );
        server.wait_for_log(
            &format!(
                "usage report refused ({status}): {}",
                v["message"].as_str().unwrap()
            ),
            Duration::from_secs(5),
        );
    }
    // A body announced over the limit is refused before it is read.
    let r = server.send("POST", "/v1/usage", "Content-Length: 30000000\r\n", "");
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("report_too_large"), "{}", r.body);
    let r = server.get("/v1/usage", "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    // Nothing was recorded.
    assert!(!dir.path().join("keys.usage.json").exists());
    assert_eq!(listing(&file)["keys"][0]["requests_24h"], 0);
}

#[test]
fn refuses_to_start_on_a_broken_usage_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    std::fs::write(dir.path().join("keys.usage.json"), b"not json").unwrap();
    let r = common::run(&serve_args(&file, &[]));
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("keys.usage.json: not a usage file"),
        "{}",
        r.stderr
    );
    let r = common::run(&["keys", "list", "--file", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("keys.usage.json: not a usage file"),
        "{}",
        r.stderr
    );
}
