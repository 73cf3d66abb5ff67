//! `keygate validate`.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{run, run_with_stdin};

const SHA: &str = "9ff305e8e315f55bc15411c061d2b5f2cbc49448d9a3ed57c5b646f8c776e9fc";

fn validate(json: &str) -> common::Run {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.json");
    std::fs::write(&file, json).unwrap();
    run(&["validate", file.to_str().unwrap()])
}

#[test]
fn accepts_a_good_plugin_configuration() {
    let r = validate(&format!(
        r#"{{"keys":[{{"id":"a","sha256":"{SHA}","scopes":["read"]}}],
            "rules":[{{"match":{{"path_prefix":"/v1/"}},"action":"require","scopes_any_of":["read"]}}]}}"#
    ));
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "ok: 1 keys\n"),
        "{}",
        r.stderr
    );
    assert_eq!(validate("{}").stdout, "ok: 0 keys\n");
}

#[test]
fn accepts_a_good_key_list() {
    let r = validate(&format!(
        r#"{{"version":7,"keys":[{{"id":"a","sha256":"{SHA}"}},{{"id":"b","sha256":"{}","disabled":true}}]}}"#,
        "0".repeat(64)
    ));
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "ok: 2 keys\n"),
        "{}",
        r.stderr
    );
    let r = run_with_stdin(&["validate", "-"], br#"{"version":1,"keys":[]}"#);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "ok: 0 keys\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn rejects_bad_files_naming_the_field() {
    let cases = [
        // Plugin configurations.
        (
            r#"{"keys":[{"id":"a","sha256":"abc"}]}"#.to_string(),
            "error: keys[0].sha256: ",
        ),
        (
            r#"{"rules":[{"action":"allow"}]}"#.to_string(),
            "error: rules[0].action: ",
        ),
        (
            r#"{"kyes":[]}"#.to_string(),
            "error: kyes: unknown field `kyes`",
        ),
        ("not json".to_string(), "error: configuration: "),
        // Key lists.
        (
            format!(
                r#"{{"version":1,"keys":[{{"id":"a","sha256":"{SHA}","expires_at":"soon"}}]}}"#
            ),
            "error: keys[0].expires_at: ",
        ),
        (
            format!(
                r#"{{"version":1,"keys":[{{"id":"a","sha256":"{SHA}"}},{{"id":"a","sha256":"{}"}}]}}"#,
                "0".repeat(64)
            ),
            "error: keys[1].id: duplicate id",
        ),
        (
            r#"{"version":1,"keys":[],"extra":1}"#.to_string(),
            "error: extra: unknown field `extra`",
        ),
        (r#"{"version":-1}"#.to_string(), "error: version: "),
    ];
    for (json, expected) in cases {
        let r = validate(&json);
        assert_eq!(r.code, 1, "{json}");
        assert!(r.stdout.is_empty(), "{json}: {}", r.stdout);
        assert!(
            r.stderr.lines().any(|l| l.starts_with(expected)),
            "{json}: {}",
            r.stderr
        );
    }
}

#[test]
fn reports_every_problem_and_honours_kind() {
    let r = validate(r#"{"keys":[{"id":"","sha256":"x"},{"id":"b","sha256":"y"}]}"#);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr
            .lines()
            .filter(|l| l.starts_with("error: keys["))
            .count(),
        3,
        "{}",
        r.stderr
    );

    // Forced: a key list read as a plugin configuration has an unknown field.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.json");
    std::fs::write(&file, r#"{"version":1,"keys":[]}"#).unwrap();
    let r = run(&["validate", "--kind", "config", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown field `version`"), "{}", r.stderr);

    let r = run(&[
        "validate",
        dir.path().join("missing.json").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: cannot read "), "{}", r.stderr);
}
