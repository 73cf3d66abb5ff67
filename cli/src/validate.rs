//! `keygate validate`: check a plugin configuration or a key list.

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use keygate_core::keylist::validate_key_list;
use keygate_core::Policy;

use crate::error::{print_stdout, Failure, Result};

/// Arguments of `validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The file to check, or `-` for stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// What the file is.
    #[arg(long, value_enum, default_value_t = Kind::Auto)]
    kind: Kind,
}

/// What a file is validated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A key list if the top level is a JSON object with a `version` field,
    /// else a plugin configuration.
    Auto,
    /// The filter's plugin configuration.
    Config,
    /// A key list (`{"version": N, "keys": [...]}`), as served by a control plane.
    Keys,
    /// An Envoy configuration (bootstrap or admin `/config_dump`, YAML or
    /// JSON): every keygate filter's plugin configuration and, for
    /// `"forward_with": "filter_state"`, the headers of each route behind it.
    Envoy,
}

/// Validates the file; prints `ok: N keys`, or fails with one line per problem.
pub fn run(args: ValidateArgs) -> Result<()> {
    let bytes = if args.file.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut b)
            .map_err(|e| Failure::because("cannot read stdin", e))?;
        b
    } else {
        std::fs::read(&args.file)
            .map_err(|e| Failure::because(format!("cannot read {}", args.file.display()), e))?
    };
    let kind = match args.kind {
        Kind::Auto => detect(&bytes),
        k => k,
    };
    if kind == Kind::Envoy {
        return check_envoy(&bytes);
    }
    let keys = match kind {
        Kind::Keys => validate_key_list(&bytes).map(|list| list.keys.len()),
        _ => Policy::from_json(&bytes).map(|policy| policy.keys().len()),
    }
    .map_err(|errors| Failure::config(None, &errors))?;
    for warning in reenabled_revocations(&bytes) {
        eprintln!("warning: {warning}");
    }
    print_stdout(&format!("ok: {keys} keys\n"))
}

/// `--kind envoy`: one `ok:` line per keygate filter, or one error line per problem.
fn check_envoy(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| Failure::because("not UTF-8", e))?;
    let report = crate::envoy::check(text);
    if !report.errors.is_empty() {
        return Err(Failure {
            lines: report.errors,
        });
    }
    let lines: String = report
        .filters
        .iter()
        .map(|f| format!("ok: {f}\n"))
        .collect();
    print_stdout(&lines)
}

/// Records revoked (`revoked_at`) and then set `disabled: false`: the filter
/// still refuses them, since a revocation is for good, but someone tried to
/// bring them back.
fn reenabled_revocations(bytes: &[u8]) -> Vec<String> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let records = doc.get("keys").and_then(|k| k.as_array());
    records
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, k)| {
            k.get("revoked_at").is_some_and(|t| !t.is_null())
                && k.get("disabled").and_then(|d| d.as_bool()) != Some(true)
        })
        .map(|(i, k)| {
            let id = k.get("id").and_then(|v| v.as_str()).unwrap_or("?");
            format!(
                "keys[{i}] ({id:?}) was revoked and re-enabled (disabled is not true): it stays refused; create a new key instead"
            )
        })
        .collect()
}

/// A top-level object with a `version` field is a key list (a plugin
/// configuration has no such field); anything else is a plugin configuration.
fn detect(bytes: &[u8]) -> Kind {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) if map.contains_key("version") => Kind::Keys,
        _ => Kind::Config,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_record_set_enabled_again_is_reported() {
        let list = br#"{"version": 1, "keys": [
            {"id": "a", "sha256": "x", "revoked_at": "2026-01-01T00:00:00Z", "disabled": true},
            {"id": "b", "sha256": "x", "revoked_at": "2026-01-01T00:00:00Z", "disabled": false},
            {"id": "c", "sha256": "x", "revoked_at": "2026-01-01T00:00:00Z"},
            {"id": "d", "sha256": "x", "disabled": false}]}"#;
        let got = reenabled_revocations(list);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("keys[1] (\"b\")"), "{got:?}");
        assert!(got[1].starts_with("keys[2] (\"c\")"), "{got:?}");
    }

    #[test]
    fn detection() {
        assert_eq!(detect(br#"{"version":1,"keys":[]}"#), Kind::Keys);
        assert_eq!(detect(br#"{"version":1,"kyes":[]}"#), Kind::Keys);
        assert_eq!(detect(br#"{"keys":[]}"#), Kind::Config);
        assert_eq!(detect(br#"{}"#), Kind::Config);
        assert_eq!(detect(b"not json"), Kind::Config);
        assert_eq!(detect(b"[1]"), Kind::Config);
    }
}
