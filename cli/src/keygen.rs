//! Key generation: `<prefix><random characters>[<checksum>]` from the OS
//! CSPRNG, in the alphabet and length a product documents.

use clap::ValueEnum;

use crate::error::{Failure, Result};

/// Base62: URL-safe, and a double-click selects the whole key.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Default length of the random part: 32 × log2(62) ≈ 190 bits of entropy.
pub const RANDOM_CHARS: usize = 32;

/// Shortest and longest random part `--length` accepts.
pub const LENGTHS: std::ops::RangeInclusive<usize> = 16..=128;

/// The characters of a key's random part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Alphabet {
    /// `0-9 A-Z a-z`.
    #[default]
    Base62,
    /// `0-9 a-z`: letters and digits in one case.
    Alnum,
    /// `0-9 a-f`.
    Hex,
}

impl Alphabet {
    fn chars(self) -> &'static [u8] {
        match self {
            Alphabet::Base62 => ALPHABET,
            Alphabet::Alnum => b"0123456789abcdefghijklmnopqrstuvwxyz",
            Alphabet::Hex => b"0123456789abcdef",
        }
    }
}

/// Longest accepted prefix.
pub const MAX_PREFIX: usize = 64;

/// Characters shown at the end of a key's display form.
const DISPLAY_TAIL: usize = 4;

/// `len` uniformly random characters of `alphabet`.
pub fn random_part(len: usize, alphabet: Alphabet) -> Result<String> {
    let chars = alphabet.chars();
    let n = chars.len();
    // Bytes at or above the largest multiple of n are rejected, so that
    // every character is equally likely.
    let limit = 256 - 256 % n;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 48];
    while out.len() < len {
        getrandom::fill(&mut buf)
            .map_err(|e| Failure::because("cannot read the system random number generator", e))?;
        for &b in buf.iter().filter(|&&b| usize::from(b) < limit) {
            if out.len() == len {
                break;
            }
            if let Some(&c) = chars.get(usize::from(b) % n) {
                out.push(char::from(c));
            }
        }
    }
    Ok(out)
}

/// A new key: `prefix`, `len` random characters of `alphabet`, then the
/// checksum of all that when `checksum` is set (see `keygate_core::checksum`).
pub fn new_key(prefix: &str, len: usize, alphabet: Alphabet, checksum: bool) -> Result<String> {
    let mut key = format!("{prefix}{}", random_part(len, alphabet)?);
    if checksum {
        let suffix = keygate_core::checksum::suffix(key.as_bytes());
        key.push_str(&String::from_utf8_lossy(&suffix));
    }
    Ok(key)
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
        let a = random_part(RANDOM_CHARS, Alphabet::Base62).unwrap();
        let b = random_part(RANDOM_CHARS, Alphabet::Base62).unwrap();
        assert_eq!(a.len(), RANDOM_CHARS);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }

    #[test]
    fn every_character_turns_up() {
        let mut seen = [false; 62];
        for _ in 0..200 {
            for c in random_part(RANDOM_CHARS, Alphabet::Base62).unwrap().bytes() {
                let i = ALPHABET.iter().position(|&a| a == c).unwrap();
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn each_alphabet_and_length_has_its_shape() {
        let alnum = random_part(40, Alphabet::Alnum).unwrap();
        assert_eq!(alnum.len(), 40);
        assert!(alnum
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
        let hex = random_part(64, Alphabet::Hex).unwrap();
        assert!(hex
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let key = new_key("lfk_", 40, Alphabet::Base62, true).unwrap();
        assert_eq!(key.len(), 4 + 40 + keygate_core::checksum::LEN);
        assert!(keygate_core::checksum::verify(key.as_bytes()));
        let plain = new_key("lfk_", 40, Alphabet::Base62, false).unwrap();
        assert!(!keygate_core::checksum::verify(plain.as_bytes()) || plain.len() == 44);
        assert_eq!(plain.len(), 44);
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
