//! `keygate hash`: SHA-256 hex of a key read on stdin.

use std::io::Read;

use crate::error::{print_stdout, Failure, Result};

/// Reads a key on stdin and prints its SHA-256 hex.
pub fn run() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .map_err(|e| Failure::because("cannot read stdin", e))?;
    let key = strip_newline(&input);
    if key.is_empty() {
        return Err(Failure::new("no key on stdin"));
    }
    if key.first().is_some_and(u8::is_ascii_whitespace)
        || key.last().is_some_and(u8::is_ascii_whitespace)
        || key.iter().any(u8::is_ascii_control)
    {
        eprintln!(
            "warning: the key has surrounding whitespace or control characters; \
             a client cannot send it as is in a header"
        );
    }
    print_stdout(&format!(
        "{}\n",
        hex::encode(keygate_core::keys::digest(key))
    ))
}

/// `input` without one trailing `\n` or `\r\n`.
fn strip_newline(input: &[u8]) -> &[u8] {
    input
        .strip_suffix(b"\r\n")
        .or_else(|| input.strip_suffix(b"\n"))
        .unwrap_or(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_one_line_ending_only() {
        assert_eq!(strip_newline(b"k\n"), b"k");
        assert_eq!(strip_newline(b"k\r\n"), b"k");
        assert_eq!(strip_newline(b"k\n\n"), b"k\n");
        assert_eq!(strip_newline(b"k "), b"k ");
        assert_eq!(strip_newline(b"k"), b"k");
    }
}
