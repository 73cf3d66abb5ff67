//! Helpers shared by the integration tests: run the `keygate` binary.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A finished run of `keygate`.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }
}

/// The command, not started.
pub fn keygate(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
    c.args(args);
    c
}

/// Runs `keygate args` with empty stdin.
pub fn run(args: &[&str]) -> Run {
    run_with_stdin(args, b"")
}

/// Runs `keygate args` with `stdin`.
pub fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Run {
    let mut child = keygate(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap().into()
}

/// `keys create --id id --file file` plus `extra`; returns the printed key.
pub fn create(file: &Path, id: &str, extra: &[&str]) -> String {
    let file = file.to_str().unwrap();
    let mut args = vec!["keys", "create", "--id", id, "--file", file];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert_eq!(r.code, 0, "create failed: {}", r.stderr);
    r.stdout.strip_suffix('\n').unwrap().to_string()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(keygate_core::keys::digest(bytes))
}

/// The key list file, parsed.
pub fn read_list(file: &Path) -> keygate_core::config::KeyList {
    keygate_core::keylist::validate_key_list(&std::fs::read(file).unwrap()).unwrap()
}

pub mod server;
