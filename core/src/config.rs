//! The operator-facing configuration schema (plugin configuration JSON).
//!
//! These are plain serde types, strict about unknown fields. They carry no
//! behaviour: [`crate::policy::Policy::compile`] validates and indexes them.

use serde::Deserialize;

/// The whole plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the key may come from, tried in order. Default: `x-api-key`, then Bearer.
    #[serde(default = "default_sources")]
    pub credential_sources: Vec<SourceConfig>,
    /// The key list: ids and SHA-256 digests, never plaintext keys.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Default per-key rate limit. Absent means no rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Header that carries the key id to the backend.
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
    /// Remove the credential header(s) before forwarding.
    #[serde(default = "default_true")]
    pub strip_credentials: bool,
    /// Longest key accepted, in bytes; longer is `malformed_api_key`.
    #[serde(default = "default_max_key_length")]
    pub max_key_length: usize,
    /// If non-empty, a key must start with one of these prefixes.
    #[serde(default)]
    pub key_prefixes: Vec<String>,
    /// Realm named in `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
}

/// One credential source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The whole value of a named header, e.g. `x-api-key`.
    Header {
        /// Header name (case-insensitive).
        name: String,
    },
    /// `Authorization: Bearer <key>` (scheme case-insensitive).
    Bearer,
    /// `Authorization: <key>` with no scheme.
    Bare,
}

/// One key record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Stable identifier sent to the backend and written in logs.
    pub id: String,
    /// Lowercase or uppercase hex SHA-256 of the key (64 characters).
    pub sha256: String,
    /// This key's own rate limit, overriding the default.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A token-bucket rate limit.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate; may be fractional (0.5 = one request every 2 s).
    pub requests_per_second: f64,
    /// Bucket size: how many requests may arrive at once.
    pub burst: i64,
}

fn default_sources() -> Vec<SourceConfig> {
    vec![
        SourceConfig::Header {
            name: "x-api-key".into(),
        },
        SourceConfig::Bearer,
    ]
}

fn default_identity_header() -> String {
    "x-api-key-id".into()
}

fn default_true() -> bool {
    true
}

fn default_max_key_length() -> usize {
    256
}

fn default_realm() -> String {
    "keygate".into()
}
