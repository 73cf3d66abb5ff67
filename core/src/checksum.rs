//! Key checksums: a suffix that tells a key from noise before any hashing.
//!
//! The last [`LEN`] characters of a key with a checksum are the CRC-32
//! (ISO-HDLC, as zlib computes it) of everything before them, written in base62
//! (`0-9A-Za-z`, most significant digit first, padded with `0`). A secret
//! scanner can check a candidate the same way; the filter refuses a key
//! whose suffix does not match as `malformed_api_key`.

/// CRC-32 as zlib computes it, with a 256-entry table (1 KB) rather than the
/// 16 KB that a faster one would add to the module: a key is a few dozen bytes.
const CRC32: crc::Crc<u32, crc::Table<1>> =
    crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_ISO_HDLC);

/// Characters of the suffix: 62^6 > 2^32, so every CRC-32 fits.
pub const LEN: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The suffix for a key whose other characters are `body`.
pub fn suffix(body: &[u8]) -> [u8; LEN] {
    let mut n = u64::from(CRC32.checksum(body));
    let mut out = [b'0'; LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// True when the last [`LEN`] characters of `key` are the checksum of the rest.
pub fn verify(key: &[u8]) -> bool {
    match key.len().checked_sub(LEN) {
        Some(at) if at > 0 => key.get(at..) == Some(&suffix(&key[..at])[..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_suffix_is_the_base62_crc32_of_the_body() {
        // zlib.crc32(b"lfk_") == 0x6133de3c == 1630789180; in base62 "1mMclI".
        assert_eq!(CRC32.checksum(b"lfk_"), 0x6133_de3c);
        assert_eq!(&suffix(b"lfk_"), b"1mMclI");
        assert_eq!(&suffix(b""), b"000000");
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn only_the_right_suffix_verifies() {
        let mut key = b"kg_live_0123456789abcdef".to_vec();
        key.extend_from_slice(&suffix(&key));
        assert!(verify(&key));
        let last = key.len() - 1;
        key[last] ^= 1;
        assert!(!verify(&key), "one character changed");
        key[last] ^= 1;
        key[3] = b'X';
        assert!(!verify(&key), "the body changed");
        assert!(!verify(b"1mMclI"), "a suffix alone is no key");
        assert!(!verify(b"short"));
    }
}
