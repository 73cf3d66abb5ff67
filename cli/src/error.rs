//! The error every command returns, and writing to stdout without panicking.

use std::fmt::Display;
use std::io::Write;

use keygate_core::ConfigError;

/// A failed command: each line is printed as `error: <line>` on stderr and
/// the process exits with status 1.
#[derive(Debug)]
pub struct Failure {
    /// The problems, one per line.
    pub lines: Vec<String>,
}

impl Failure {
    /// One problem.
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            lines: vec![message.into()],
        }
    }

    /// A problem caused by `cause`, e.g. an I/O error.
    pub fn because(context: impl Display, cause: impl Display) -> Self {
        Failure::new(format!("{context}: {cause}"))
    }

    /// Configuration problems, each as `[<prefix>: ]<field>: <message>`.
    pub fn config(prefix: Option<&str>, errors: &[ConfigError]) -> Self {
        Failure {
            lines: errors
                .iter()
                .map(|e| match prefix {
                    Some(p) => format!("{p}: {e}"),
                    None => e.to_string(),
                })
                .collect(),
        }
    }
}

/// Shorthand for command results.
pub type Result<T> = std::result::Result<T, Failure>;

/// Writes `text` to stdout and flushes it.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::because("cannot write to stdout", e))
}
