//! `keygate keys create|revoke|list` and `keygate hash`.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use common::{create, read_list, run, run_with_stdin, sha256_hex};

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[test]
fn create_prints_the_key_once_and_stores_only_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let f = file.to_str().unwrap();
    let r = run(&[
        "keys",
        "create",
        "--id",
        "ci",
        "--prefix",
        "sk_live_",
        "--scopes",
        "read,ingest",
        "--expires",
        "2030-01-01T00:00:00Z",
        "--environment",
        "live",
        "--label",
        "CI job",
        "--file",
        f,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Only the key and a newline on stdout.
    assert_eq!(r.stdout.lines().count(), 1);
    let key = r.stdout.strip_suffix('\n').unwrap();
    let random = key.strip_prefix("sk_live_").unwrap();
    assert_eq!(random.len(), 32);
    assert!(is_base62(random), "{key}");
    assert!(!r.stderr.contains(random));

    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(random), "the file holds the key: {text}");
    let list = read_list(&file);
    assert_eq!(list.version, 1);
    let k = &list.keys[0];
    assert_eq!(k.id, "ci");
    assert_eq!(k.sha256, sha256_hex(key.as_bytes()));
    assert_eq!(
        k.display.as_deref(),
        Some(format!("sk_live_…{}", &random[28..]).as_str())
    );
    assert_eq!(k.scopes, ["read", "ingest"]);
    assert_eq!(k.expires_at.as_deref(), Some("2030-01-01T00:00:00Z"));
    assert_eq!(k.environment.as_deref(), Some("live"));
    assert_eq!(k.label.as_deref(), Some("CI job"));
    assert!(!k.disabled);

    // Two keys are different; the version grows.
    let other = create(&file, "ci2", &[]);
    assert_ne!(other, key);
    assert!(
        other.starts_with("sk_") && is_base62(&other[3..]) && other.len() == 35,
        "{other}"
    );
    assert_eq!(read_list(&file).version, 2);
}

#[test]
fn create_refuses_a_duplicate_id_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let f = file.to_str().unwrap();
    create(&file, "dup", &[]);
    let before = std::fs::read(&file).unwrap();

    let r = run(&["keys", "create", "--id", "dup", "--file", f]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains(r#"a key with id "dup" already exists"#),
        "{}",
        r.stderr
    );

    let r = run(&[
        "keys",
        "create",
        "--id",
        "x",
        "--expires",
        "tomorrow",
        "--file",
        f,
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--expires"), "{}", r.stderr);

    let r = run(&[
        "keys", "create", "--id", "x", "--prefix", "sk live", "--file", f,
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--prefix"), "{}", r.stderr);

    let r = run(&["keys", "create", "--id", "has space", "--file", f]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--id"), "{}", r.stderr);

    // Validated like the filter's keys: an invalid scope is refused.
    let r = run(&[
        "keys",
        "create",
        "--id",
        "x",
        "--scopes",
        "ok,b\u{e9}d",
        "--file",
        f,
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("keys[1].scopes[1]"), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "a refused create changed the file"
    );
}

#[test]
fn list_shows_masked_keys_and_status_never_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let f = file.to_str().unwrap();
    let a = create(&file, "a", &["--environment", "test", "--scopes", "read"]);
    let b = create(&file, "b", &["--expires", "2001-01-01T00:00:00Z"]);
    let c = create(&file, "c", &[]);
    assert_eq!(run(&["keys", "revoke", "c", "--file", f]).code, 0);

    let r = run(&["keys", "list", "--file", f]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert!(lines[0].starts_with("ID"));
    let row = |id: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap()
            .to_string()
    };
    assert!(
        row("a").contains(&format!("sk_test_…{}", &a[a.len() - 4..])),
        "{}",
        r.stdout
    );
    assert!(
        row("a").contains("read") && row("a").contains("active"),
        "{}",
        r.stdout
    );
    assert!(row("b").contains("expired") && row("b").contains("2001-01-01T00:00:00Z"));
    assert!(row("c").contains("revoked"));
    for key in [&a, &b, &c] {
        assert!(!r.stdout.contains(key.as_str()));
        assert!(!r.stdout.contains(&key[key.len() - 20..]));
    }

    let r = run(&["keys", "list", "--json", "--file", f]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["version"], 4);
    assert_eq!(v["keys"][0]["id"], "a");
    assert_eq!(
        v["keys"][0]["display"],
        format!("sk_test_…{}", &a[a.len() - 4..])
    );
    assert_eq!(v["keys"][1]["status"], "expired");
    assert_eq!(v["keys"][2]["status"], "revoked");
    for key in [&a, &b, &c] {
        assert!(!r.stdout.contains(&key[key.len() - 20..]));
    }

    let r = run(&[
        "keys",
        "list",
        "--file",
        dir.path().join("missing.json").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
}

#[test]
fn revoke_disables_delete_removes_unknown_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let f = file.to_str().unwrap();
    create(&file, "a", &[]);
    create(&file, "b", &[]);

    let r = run(&["keys", "revoke", "a", "--file", f]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list = read_list(&file);
    assert_eq!(list.version, 3);
    assert!(list.keys[0].disabled && !list.keys[1].disabled);
    let revoked_at = list.keys[0].revoked_at.clone().unwrap();
    assert!(
        revoked_at.ends_with('Z') && revoked_at.len() == 20,
        "{revoked_at}"
    );
    assert!(list.keys[1].revoked_at.is_none());

    // Already revoked: nothing to change.
    assert_eq!(run(&["keys", "revoke", "a", "--file", f]).code, 0);
    assert_eq!(read_list(&file).version, 3);

    let r = run(&["keys", "revoke", "b", "--delete", "--file", f]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list = read_list(&file);
    assert_eq!(list.version, 4);
    assert_eq!(list.keys.len(), 1);
    assert_eq!(list.keys[0].id, "a");

    let r = run(&["keys", "revoke", "nope", "--file", f]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(r#"no key with id "nope""#),
        "{}",
        r.stderr
    );
    assert_eq!(read_list(&file).version, 4);

    let r = run(&[
        "keys",
        "revoke",
        "a",
        "--file",
        dir.path().join("missing.json").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(!dir.path().join("missing.json").exists());
}

#[test]
fn hash_matches_the_stored_digest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let key = create(&file, "a", &[]);
    let stored = read_list(&file).keys[0].sha256.clone();
    for input in [key.clone(), format!("{key}\n"), format!("{key}\r\n")] {
        let r = run_with_stdin(&["hash"], input.as_bytes());
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.stdout, format!("{stored}\n"));
    }
    // Only one line ending is removed.
    let r = run_with_stdin(&["hash"], format!("{key}\n\n").as_bytes());
    assert_eq!(
        r.stdout,
        format!("{}\n", sha256_hex(format!("{key}\n").as_bytes()))
    );
    assert_eq!(run_with_stdin(&["hash"], b"\n").code, 1);
}

#[test]
fn concurrent_creates_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let f = file.to_str().unwrap();
    let children: Vec<_> = (0..20)
        .map(|i| {
            common::keygate(&["keys", "create", "--id", &format!("k{i}"), "--file", f])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let keys: Vec<String> = children
        .into_iter()
        .map(|c| {
            let r: common::Run = c.wait_with_output().unwrap().into();
            assert_eq!(r.code, 0, "{}", r.stderr);
            r.stdout.trim_end().to_string()
        })
        .collect();
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 20);

    let list = read_list(&file);
    assert_eq!(list.version, 20);
    assert_eq!(list.keys.len(), 20);
    for (i, key) in keys.iter().enumerate() {
        let record = list.keys.iter().find(|k| k.id == format!("k{i}")).unwrap();
        assert_eq!(record.sha256, sha256_hex(key.as_bytes()));
    }
    // Only keys.json and its lock file are left (no temporary files).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["keys.json", "keys.json.lock"]);
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["keys", "--help"],
        vec!["keys", "create", "--help"],
        vec!["keys", "revoke", "--help"],
        vec!["keys", "list", "--help"],
        vec!["hash", "--help"],
        vec!["validate", "--help"],
        vec!["serve", "--help"],
    ] {
        let r = run(&args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(
            r.stdout.contains("Usage: keygate"),
            "{args:?}: {}",
            r.stdout
        );
    }
    assert_eq!(run(&["keys", "create"]).code, 2);
}
