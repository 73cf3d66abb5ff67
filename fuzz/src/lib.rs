//! Helpers shared by the fuzz targets: turning fuzz bytes into header maps
//! and JSON documents that get past the parsers' syntax checks.

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use serde_json::{Map, Value};

/// Reads one byte, 0 when the input is used up.
pub fn byte(u: &mut Unstructured<'_>) -> u8 {
    u.arbitrary().unwrap_or(0)
}

/// Picks one of `words`, or arbitrary bytes one time in four.
pub fn word_or_bytes<'a>(u: &mut Unstructured<'a>, words: &[&'a [u8]]) -> Result<&'a [u8]> {
    if words.is_empty() || byte(u).is_multiple_of(4) {
        let len = usize::from(byte(u) % 48);
        return u.bytes(len.min(u.len()));
    }
    Ok(u.choose(words)?)
}

/// Flips the ASCII case of some bytes, as a client may send any case.
pub fn recase(u: &mut Unstructured<'_>, bytes: &[u8]) -> Vec<u8> {
    let mask = byte(u);
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if mask & (1 << (i % 8)) != 0 {
                if b.is_ascii_lowercase() {
                    b.to_ascii_uppercase()
                } else {
                    b.to_ascii_lowercase()
                }
            } else {
                *b
            }
        })
        .collect()
}

/// Words the configuration, key list and body schemas use: field names,
/// enum values and well-formed values, so that built documents reach the
/// checks behind the schema.
pub const WORDS: &[&str] = &[
    "credential_sources",
    "type",
    "header",
    "bearer",
    "bare",
    "name",
    "x-api-key",
    "authorization",
    "keys",
    "id",
    "sha256",
    "scopes",
    "scopes_any_of",
    "scopes_all_of",
    "environments",
    "environment",
    "expires_at",
    "revoked_at",
    "disabled",
    "allowed_cidrs",
    "attachments",
    "attachment",
    "set",
    "from",
    "json_body",
    "query",
    "label",
    "display",
    "mode",
    "shadow",
    "enforce",
    "rate_limit",
    "rate_limits",
    "requests_per_second",
    "requests",
    "per",
    "burst",
    "identity_header",
    "strip_credentials",
    "max_key_length",
    "key_prefixes",
    "key_checksum",
    "crc32",
    "none",
    "realm",
    "rules",
    "match",
    "host",
    "path",
    "path_prefix",
    "methods",
    "action",
    "public",
    "require",
    "deny",
    "allow",
    "require_key",
    "fail_closed",
    "serve",
    "default_action",
    "max_body_bytes",
    "control_plane",
    "cluster",
    "authority",
    "poll_interval",
    "timeout",
    "max_staleness",
    "stale_policy",
    "max_list_bytes",
    "usage_report_interval",
    "usage_path",
    "usage_batch_keys",
    "version",
    "next",
    "/next",
    "1s",
    "30d",
    "366d",
    "10ms",
    "2020-01-01T00:00:00Z",
    "2099-01-01T00:00:00+02:00",
    "10.0.0.0/8",
    "::1",
    "2001:db8::/32",
    "*.example.com",
    "GET",
    "POST",
    "/",
    "/api",
    "read",
    "live",
    "test",
    "campaigns",
    "c-17",
    "a",
    "",
    "~0~1",
    "K",
];

/// Arbitrary JSON, biased towards [`WORDS`] for object keys and strings,
/// nested at most `depth` levels.
pub fn json(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let pick = byte(u) % if depth == 0 { 6 } else { 9 };
    Ok(match pick {
        0 => Value::Null,
        1 => Value::Bool(byte(u) & 1 == 1),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => serde_json::Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
        4 | 5 => Value::String(string(u)?),
        6 => {
            let n = usize::from(byte(u) % 5);
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(json(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let n = usize::from(byte(u) % 6);
            let mut map = Map::new();
            for _ in 0..n {
                let key = string(u)?;
                map.insert(key, json(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// A word of [`WORDS`], a 64-digit hex digest, a small number as text, or
/// an arbitrary string.
pub fn string(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match byte(u) % 8 {
        0 => u.arbitrary::<String>()?,
        1 => hex::encode(u.bytes(32.min(u.len()))?),
        2 => byte(u).to_string(),
        _ => u.choose(WORDS)?.to_string(),
    })
}
