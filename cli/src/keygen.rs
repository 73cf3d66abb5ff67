//! Key generation: `<prefix><32 base62 characters>` from the OS CSPRNG.

use crate::error::{Failure, Result};

/// Alphabet of the random part: URL-safe, and a double-click selects the whole key.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the random part: 32 × log2(62) ≈ 190 bits of entropy.
pub const RANDOM_CHARS: usize = 32;

/// Longest accepted prefix.
pub const MAX_PREFIX: usize = 64;

/// Characters shown at the end of a key's display form.
const DISPLAY_TAIL: usize = 4;

/// `RANDOM_CHARS` uniformly random characters of [`ALPHABET`].
pub fn random_part() -> Result<String> {
    // Bytes >= 248 (= 4 × 62) are rejected so that every character is equally likely.
    const LIMIT: u8 = 248;
    let mut out = String::with_capacity(RANDOM_CHARS);
    let mut buf = [0u8; 48];
    while out.len() < RANDOM_CHARS {
        getrandom::fill(&mut buf)
            .map_err(|e| Failure::because("cannot read the system random number generator", e))?;
        for &b in buf.iter().filter(|&&b| b < LIMIT) {
            if out.len() == RANDOM_CHARS {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

/// Checks a key prefix: at most [`MAX_PREFIX`] characters of `A-Z a-z 0-9 _ -`.
pub fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    if prefix.len() > MAX_PREFIX {
        return Err(format!("longer than {MAX_PREFIX} characters"));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "{c:?} is not allowed (use letters, digits, '_' and '-')"
        ));
    }
    Ok(())
}

/// The display form stored with a key: prefix + `…` + last 4 characters.
pub fn display(prefix: &str, key: &str) -> String {
    let tail: String = {
        let mut rev: Vec<char> = key.chars().rev().take(DISPLAY_TAIL).collect();
        rev.reverse();
        rev.into_iter().collect()
    };
    format!("{prefix}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_part_has_the_expected_shape() {
        let a = random_part().unwrap();
        let b = random_part().unwrap();
        assert_eq!(a.len(), RANDOM_CHARS);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }

    #[test]
    fn every_character_turns_up() {
        let mut seen = [false; 62];
        for _ in 0..200 {
            for c in random_part().unwrap().bytes() {
                let i = ALPHABET.iter().position(|&a| a == c).unwrap();
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn display_is_prefix_ellipsis_last_four() {
        assert_eq!(display("sk_live_", "sk_live_abcdefWXYZ"), "sk_live_…WXYZ");
        assert_eq!(display("", "abcdef"), "…cdef");
    }

    #[test]
    fn prefixes() {
        assert!(check_prefix("sk_live_").is_ok());
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("a-b_C9").is_ok());
        assert!(check_prefix("sk live").is_err());
        assert!(check_prefix("sk/").is_err());
        assert!(check_prefix(&"a".repeat(MAX_PREFIX + 1)).is_err());
    }
}
