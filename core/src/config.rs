//! The operator-facing configuration schema (plugin configuration JSON).
//!
//! These are plain serde types, strict about unknown fields. They carry no
//! behaviour: the `compile` module validates them and builds the policy.

use serde::{Deserialize, Serialize};

/// The whole plugin configuration. `Keys` is the form the key records take:
/// the key-list compiler takes them while they are parsed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config<Keys> {
    /// Where the key may come from, tried in order. Default: `x-api-key`, then Bearer.
    #[serde(default = "default_sources")]
    pub credential_sources: Vec<SourceConfig>,
    /// The key list: ids and SHA-256 digests, never plaintext keys.
    /// Compiled while it is parsed, so a large list is never held twice.
    #[serde(default, skip_serializing)]
    pub keys: Keys,
    /// Default per-key rate limit. Absent means no rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Default per-key limits, all of which must admit (instead of `rate_limit`).
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
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
    /// `crc32`: a key must end with its checksum (see `checksum`), else it
    /// is `malformed_api_key` before any hashing. Default `none`.
    #[serde(default)]
    pub key_checksum: KeyChecksum,
    /// Realm named in `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Route rules, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// What happens to a request that matches no rule.
    #[serde(default)]
    pub default_action: DefaultAction,
    /// Largest request body buffered for a JSON-body attachment check; over it is 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Poll a control plane for (more) keys.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// `enforce` (default) or `shadow`; a rule or a key record may override it.
    #[serde(default)]
    pub mode: Mode,
    /// Key fields forwarded to the backend, each in a header of its own.
    #[serde(default)]
    pub forward: ForwardConfig,
    /// For a key with a `consumer`, the header that carries the key's own id
    /// (the identity header then carries the consumer).
    #[serde(default = "default_key_id_header")]
    pub key_id_header: String,
    /// How an allowed request's identity and forwarded fields reach the
    /// backend: `headers` (default, keygate edits the request) or
    /// `filter_state` (keygate writes filter state, the Envoy route adds
    /// the headers and removes the credential).
    #[serde(default)]
    pub forward_with: ForwardWith,
}

/// `forward_with`: who puts the identity on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardWith {
    /// keygate removes the credential and sets the identity headers itself.
    #[default]
    Headers,
    /// keygate writes the identity and forwarded fields to filter state
    /// (`wasm.keygate_identity`, ...); the route's `request_headers_to_add`
    /// puts them in headers and its `request_headers_to_remove` strips the
    /// credential. Saves Envoy's route-cache clear on every allowed request.
    FilterState,
}

fn default_key_id_header() -> String {
    "x-api-key-key-id".into()
}

/// `forward`: the header that carries each forwarded key field. Client
/// copies of these headers never reach the backend.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// The key's `environment`, e.g. `x-api-key-environment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The key's `scopes`, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<String>,
}

/// The checksum keys end with, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyChecksum {
    /// No checksum.
    #[default]
    None,
    /// Six base62 characters of the CRC-32 of the rest of the key.
    Crc32,
}

/// Whether refusals are answered or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refusals are answered locally; the backend never sees the request.
    #[default]
    Enforce,
    /// Refusals are reported (filter state, stats, debug log) and the
    /// request is forwarded, with an identity only for a valid key.
    Shadow,
}

/// Handling of requests that match no rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// A valid key is required (no scope, no attachment).
    #[default]
    RequireKey,
    /// 403 `route_not_allowed`.
    Deny,
}

/// What a rule does with a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// No key needed.
    Public,
    /// A valid key, plus the rule's scope, environment and attachment checks.
    Require,
    /// 403 `route_not_allowed`.
    Deny,
}

/// One route rule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name used in logs and in the rule's own bucket keys. Default `rules[i]`.
    #[serde(default)]
    pub name: Option<String>,
    /// Which requests the rule applies to.
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    /// What the rule does.
    pub action: RuleAction,
    /// The key must hold at least one of these scopes.
    #[serde(default)]
    pub scopes_any_of: Vec<String>,
    /// The key must hold all of these scopes.
    #[serde(default)]
    pub scopes_all_of: Vec<String>,
    /// The key's `environment` must be one of these.
    #[serde(default)]
    pub environments: Vec<String>,
    /// A request value that must be in one of the key's attachment sets.
    #[serde(default)]
    pub attachment: Option<AttachmentConfig>,
    /// Several such values, all of which must hold (instead of `attachment`).
    #[serde(default)]
    pub attachments: Vec<AttachmentConfig>,
    /// Credential sources for this rule instead of the top-level ones.
    #[serde(default)]
    pub credential_sources: Option<Vec<SourceConfig>>,
    /// Rate limit for this rule instead of the key's, in a bucket of its own.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Mode of this rule's refusals, over the top-level `mode`.
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// Request matcher; every present field must match.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Host (`:authority` without port), case-insensitive; `*.example.com` matches subdomains.
    #[serde(default)]
    pub host: Option<String>,
    /// Path equal to this (query string excluded).
    #[serde(default)]
    pub path: Option<String>,
    /// Path starting with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Method is one of these.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// The value checked against a key's attachment set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentConfig {
    /// Name of the key's attachment set, e.g. `campaigns`.
    pub set: String,
    /// Where the value comes from.
    pub from: AttributeConfig,
}

/// A request attribute.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AttributeConfig {
    /// A request header.
    Header(String),
    /// A query-string parameter.
    Query(String),
    /// A JSON body field: a top-level name, or a JSON pointer starting with `/`.
    JsonBody(String),
}

/// A key list as served by a control plane and written by `keygate keys`:
/// the same key records as the plugin configuration, with a version that
/// only ever grows.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    /// Monotonic version; a fetched list older than the current one is refused.
    #[serde(default)]
    pub version: u64,
    /// Key records.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

/// One credential source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The whole value of a named header, e.g. `x-api-key`.
    Header {
        /// Header name (case-insensitive).
        name: String,
    },
    /// `Authorization: Bearer <key>` (scheme case-insensitive). Written with
    /// braces so that serde refuses fields it does not have (`"scheme"`,
    /// `"prefix"`): on a unit variant of a tagged enum it ignores them.
    Bearer {},
    /// `Authorization: <key>` with no scheme.
    Bare {},
}

/// One key record.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Stable identifier sent to the backend and written in logs.
    pub id: String,
    /// Lowercase or uppercase hex SHA-256 of the key (64 characters).
    pub sha256: String,
    /// This key's own rate limit, overriding the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// This key's own limits, all of which must admit (instead of `rate_limit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Scopes the key holds, e.g. `ingest`, `read`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// RFC 3339 time after which the key is `expired_api_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// A disabled key is revoked: 401, same public body as an unknown key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// RFC 3339 time the key was revoked: refused for good, whatever
    /// `disabled` says (`keygate keys revoke` sets both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// If non-empty, the downstream address must be in one of these CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<String>,
    /// Named sets of values the key is attached to, e.g. `{"campaigns": ["c-17"]}`.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "unique_sets"
    )]
    pub attachments: std::collections::BTreeMap<String, Vec<String>>,
    /// Free-form label for people (shown in logs and `keygate keys list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Environment such as `live` or `test`, usable in rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Display form of the key (prefix + last 4), written by `keygate keys create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// Mode of this key's refusals, over the rule's and the top-level `mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The consumer this key belongs to: keys of one consumer share the
    /// identity the backend sees and their rate-limit buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// A token-bucket rate limit.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Name of the limit in a `rate_limits` list, shown in `RateLimit-Policy`
    /// (`default` for a lone `rate_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Sustained rate; may be fractional (0.5 = one request every 2 s).
    /// Give this, or `requests` and `per`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// `requests` per `per` (`"1s"`, `"1h"`, `"1d"`, `"30d"`): a long window
    /// makes a quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// The window of `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
    /// Bucket size: how many requests may arrive at once. Required with
    /// `requests_per_second`; with `requests`/`per` it defaults to `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
}

/// An object of string lists, refusing a name given twice: serde would keep
/// the last copy and silently drop the other's values.
fn unique_sets<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, D::Error> {
    struct Sets;
    impl<'de> serde::de::Visitor<'de> for Sets {
        type Value = std::collections::BTreeMap<String, Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of lists of strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut sets = Self::Value::new();
            while let Some(name) = map.next_key::<String>()? {
                let values: Vec<String> = map.next_value()?;
                if sets.contains_key(&name) {
                    return Err(serde::de::Error::custom(format_args!(
                        "{name:?} is given twice"
                    )));
                }
                sets.insert(name, values);
            }
            Ok(sets)
        }
    }
    d.deserialize_map(Sets)
}

fn default_sources() -> Vec<SourceConfig> {
    vec![
        SourceConfig::Header {
            name: "x-api-key".into(),
        },
        SourceConfig::Bearer {},
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

fn default_max_body_bytes() -> usize {
    65_536
}

fn default_realm() -> String {
    "keygate".into()
}

/// `control_plane` in the plugin configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Envoy cluster that reaches the control plane.
    pub cluster: String,
    /// `:authority` of the request.
    pub authority: String,
    /// Path of the key list, e.g. `/v1/keys`.
    #[serde(default = "default_path")]
    pub path: String,
    /// How often to poll, e.g. `"1s"`, `"500ms"`.
    #[serde(default = "default_poll")]
    pub poll_interval: String,
    /// Callout timeout.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Age of the last good fetch after which `stale_policy` applies.
    #[serde(default = "default_staleness")]
    pub max_staleness: String,
    /// `serve` (default): keep using the last good list; `fail_closed`: 503.
    #[serde(default)]
    pub stale_policy: StalePolicy,
    /// Largest accepted response body.
    #[serde(default = "default_max_bytes")]
    pub max_list_bytes: usize,
    /// How often the fetching VM reports per-key usage (`"10s"`); no
    /// reports when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_report_interval: Option<String>,
    /// Path usage reports are POSTed to.
    #[serde(default = "default_usage_path")]
    pub usage_path: String,
    /// Most keys in one usage report.
    #[serde(default = "default_usage_batch_keys")]
    pub usage_batch_keys: usize,
}

fn default_usage_path() -> String {
    "/v1/usage".into()
}
fn default_usage_batch_keys() -> usize {
    1000
}

/// What to do once the list is older than `max_staleness`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StalePolicy {
    /// Keep serving the last good list.
    #[default]
    Serve,
    /// Answer 503 `key_list_unavailable`.
    FailClosed,
}

fn default_path() -> String {
    "/v1/keys".into()
}
fn default_poll() -> String {
    "1s".into()
}
fn default_timeout() -> String {
    "2s".into()
}
fn default_staleness() -> String {
    "5m".into()
}
fn default_max_bytes() -> usize {
    256 * 1024 * 1024
}
