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
    let keys = match kind {
        Kind::Keys => validate_key_list(&bytes).map(|list| list.keys.len()),
        _ => Policy::from_json(&bytes).map(|policy| policy.keys().len()),
    }
    .map_err(|errors| Failure::config(None, &errors))?;
    print_stdout(&format!("ok: {keys} keys\n"))
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
    fn detection() {
        assert_eq!(detect(br#"{"version":1,"keys":[]}"#), Kind::Keys);
        assert_eq!(detect(br#"{"version":1,"kyes":[]}"#), Kind::Keys);
        assert_eq!(detect(br#"{"keys":[]}"#), Kind::Config);
        assert_eq!(detect(br#"{}"#), Kind::Config);
        assert_eq!(detect(b"not json"), Kind::Config);
        assert_eq!(detect(b"[1]"), Kind::Config);
    }
}
