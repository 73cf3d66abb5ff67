//! The compiled policy: configuration validated and indexed once, then used
//! to decide every request.

use std::collections::HashSet;
use std::fmt;

use crate::config::{Config, RateLimitConfig, SourceConfig};
use crate::credential::{Credential, Extractor, Source};
use crate::denial::{Denial, DenyCode, RateInfo};
use crate::headers::HeaderMap;
use crate::keys::{parse_digest, KeyRecord, KeyStore};
use crate::ratelimit::{self, CounterStore, Limit, TakeError};

/// Prefix of every bucket key in shared data.
pub const BUCKET_PREFIX: &str = "keygate/rl/";

/// A configuration problem, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the field, e.g. `keys[2].sha256`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The validated, indexed form of a [`Config`].
#[derive(Debug, Clone)]
pub struct Policy {
    extractor: Extractor,
    keys: KeyStore,
    identity_header: String,
    strip_credentials: bool,
    www_authenticate: String,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<'p, 'h> {
    /// Forward it, after applying [`Policy::forward_edits`].
    Allow(Allowed<'p, 'h>),
    /// Answer locally with [`crate::reply::render`].
    Deny(Denial),
}

/// An admitted request.
#[derive(Debug, Clone, PartialEq)]
pub struct Allowed<'p, 'h> {
    /// The matched key.
    pub key: &'p KeyRecord,
    /// Where the key was found.
    pub credential: Credential<'h>,
    /// Bucket figures after this request, if the key is limited.
    pub rate: Option<RateInfo>,
}

/// Header changes to make before forwarding an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edits<'p, 'h> {
    /// Headers to remove (credential carriers, spoofed identity variants).
    pub remove: Vec<&'h [u8]>,
    /// The identity header and its value (replaces any client copy).
    pub identity: (&'p str, &'p str),
    /// Stripped credential carriers that are not in `remove` because they
    /// are named by the policy rather than the request.
    pub strip: Vec<&'p [u8]>,
}

/// Environment the decision reads: time and the shared bucket store.
pub struct Env<'s> {
    /// Monotonic nanoseconds, for rate arithmetic.
    pub monotonic_ns: u64,
    /// Bucket storage.
    pub counters: &'s dyn CounterStore,
}

impl Policy {
    /// Parses and compiles plugin configuration JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, Vec<ConfigError>> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path == "?" || path.is_empty() {
                "configuration".to_string()
            } else {
                path
            };
            vec![err(field, e.into_inner().to_string())]
        })?;
        Policy::compile(&cfg)
    }

    /// Validates `cfg` and builds the indexes. Returns every problem found.
    pub fn compile(cfg: &Config) -> Result<Policy, Vec<ConfigError>> {
        let mut errors = Vec::new();

        if cfg.credential_sources.is_empty() {
            errors.push(err("credential_sources", "must list at least one source"));
        }
        let mut seen_sources = HashSet::new();
        for (i, s) in cfg.credential_sources.iter().enumerate() {
            let field = format!("credential_sources[{i}]");
            if let SourceConfig::Header { name } = s {
                if !is_header_name(name) {
                    errors.push(err(
                        format!("{field}.name"),
                        format!("{name:?} is not a valid header name"),
                    ));
                } else if name.eq_ignore_ascii_case("authorization") {
                    errors.push(err(
                        format!("{field}.name"),
                        "use {\"type\":\"bearer\"} or {\"type\":\"bare\"} for Authorization",
                    ));
                }
            }
            if !seen_sources.insert(Source::from(s)) {
                errors.push(err(field, "listed twice"));
            }
        }
        if cfg.credential_sources.len() > 16 {
            errors.push(err("credential_sources", "at most 16 sources"));
        }

        let identity = cfg.identity_header.to_ascii_lowercase();
        if !is_header_name(&identity) {
            errors.push(err(
                "identity_header",
                format!("{:?} is not a valid header name", cfg.identity_header),
            ));
        }
        if cfg.credential_sources.iter().any(
            |s| matches!(s, SourceConfig::Header { name } if name.eq_ignore_ascii_case(&identity)),
        ) || identity == "authorization"
        {
            errors.push(err(
                "identity_header",
                "must differ from every credential header",
            ));
        }
        if !(1..=4096).contains(&cfg.max_key_length) {
            errors.push(err("max_key_length", "must be between 1 and 4096"));
        }
        for (i, p) in cfg.key_prefixes.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
                errors.push(err(
                    format!("key_prefixes[{i}]"),
                    "must be non-empty visible ASCII",
                ));
            }
        }
        if cfg.realm.is_empty()
            || !cfg
                .realm
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        {
            errors.push(err(
                "realm",
                "must be non-empty printable ASCII without quotes",
            ));
        }

        let default_limit = cfg
            .rate_limit
            .as_ref()
            .and_then(|l| compile_limit(l, "rate_limit", &mut errors));

        let mut ids = HashSet::new();
        let mut entries = Vec::with_capacity(cfg.keys.len());
        for (i, k) in cfg.keys.iter().enumerate() {
            let field = format!("keys[{i}]");
            if k.id.is_empty()
                || k.id.len() > 128
                || !k.id.bytes().all(|b| (0x21..=0x7e).contains(&b))
            {
                errors.push(err(
                    format!("{field}.id"),
                    "must be 1-128 visible ASCII characters",
                ));
            } else if !ids.insert(k.id.as_str()) {
                errors.push(err(
                    format!("{field}.id"),
                    format!("duplicate id {:?}", k.id),
                ));
            }
            let digest = parse_digest(&k.sha256);
            if digest.is_none() {
                errors.push(err(
                    format!("{field}.sha256"),
                    "must be 64 hex characters (the SHA-256 of the key, never the key)",
                ));
            }
            let own = k
                .rate_limit
                .as_ref()
                .and_then(|l| compile_limit(l, &format!("{field}.rate_limit"), &mut errors));
            if let Some(d) = digest {
                entries.push((
                    d,
                    KeyRecord {
                        id: k.id.clone(),
                        limit: own.or(default_limit),
                        bucket_key: format!("{BUCKET_PREFIX}{}", k.id),
                    },
                ));
            }
        }
        let keys = match KeyStore::build(entries) {
            Ok(store) => Some(store),
            Err(dups) => {
                for id in dups {
                    errors.push(err(
                        "keys",
                        format!("key {id:?} has the same sha256 as another key"),
                    ));
                }
                None
            }
        };

        match (errors.is_empty(), keys) {
            (true, Some(keys)) => {
                let sources: Vec<Source> =
                    cfg.credential_sources.iter().map(Source::from).collect();
                let extractor = Extractor::new(&sources, cfg.max_key_length, &cfg.key_prefixes);
                let www_authenticate = if extractor.accepts_bearer() {
                    format!("Bearer realm=\"{}\"", cfg.realm)
                } else {
                    format!("ApiKey realm=\"{}\"", cfg.realm)
                };
                Ok(Policy {
                    extractor,
                    keys,
                    identity_header: identity,
                    strip_credentials: cfg.strip_credentials,
                    www_authenticate,
                })
            }
            _ => Err(errors),
        }
    }

    /// The key list.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// The challenge sent in `WWW-Authenticate` on 401.
    pub fn www_authenticate(&self) -> &str {
        &self.www_authenticate
    }

    /// How the request's key may appear in a log line: `id=<id>` for a known
    /// key, `masked=<first4…last4>` otherwise, `-` without a usable key.
    /// Never the key itself. Meant for denied requests at debug level.
    pub fn describe_key(&self, headers: &HeaderMap<'_>) -> String {
        match self.extractor.extract(headers) {
            Ok(c) => match self.keys.lookup(c.key) {
                Some(k) => format!("id={}", k.id),
                None => format!("masked={}", crate::credential::mask(c.key)),
            },
            Err(_) => "-".to_string(),
        }
    }

    /// Decides one request from its headers.
    pub fn decide<'p, 'h>(&'p self, headers: &HeaderMap<'h>, env: &Env<'_>) -> Decision<'p, 'h> {
        let credential = match self.extractor.extract(headers) {
            Ok(c) => c,
            Err(d) => return Decision::Deny(d),
        };
        let Some(key) = self.keys.lookup(credential.key) else {
            return Decision::Deny(Denial::new(DenyCode::InvalidApiKey, "unknown key"));
        };
        let rate = match &key.limit {
            None => None,
            Some(limit) => {
                match ratelimit::take_shared(env.counters, &key.bucket_key, limit, env.monotonic_ns)
                {
                    Ok(o) if o.allowed => Some(o.info),
                    Ok(o) => {
                        return Decision::Deny(Denial {
                            code: DenyCode::RateLimited,
                            reason: "bucket empty",
                            rate: Some(o.info),
                        })
                    }
                    Err(e) => {
                        let reason = match e {
                            TakeError::Contention => "bucket update contention (failing closed)",
                            TakeError::Store => "bucket store error (failing closed)",
                        };
                        return Decision::Deny(Denial {
                            code: DenyCode::RateLimited,
                            reason,
                            rate: Some(RateInfo {
                                burst: limit.burst,
                                window_secs: limit.window_secs(),
                                remaining: 0,
                                retry_after_secs: 1,
                            }),
                        });
                    }
                }
            }
        };
        Decision::Allow(Allowed {
            key,
            credential,
            rate,
        })
    }

    /// The header edits for an allowed request: strip the credential (if
    /// configured) and every client copy of the identity header, including
    /// case and underscore variants, then set the identity.
    pub fn forward_edits<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        allowed: &Allowed<'p, 'h>,
    ) -> Edits<'p, 'h> {
        let mut remove: Vec<&'h [u8]> = Vec::new();
        for (name, _) in headers.iter() {
            if name != self.identity_header.as_bytes()
                && same_header(name, self.identity_header.as_bytes())
                && !remove.contains(&name)
            {
                remove.push(name);
            }
        }
        let strip = if self.strip_credentials {
            self.extractor.carrier_names(&allowed.credential).collect()
        } else {
            Vec::new()
        };
        Edits {
            remove,
            identity: (self.identity_header.as_str(), allowed.key.id.as_str()),
            strip,
        }
    }
}

fn compile_limit(l: &RateLimitConfig, field: &str, errors: &mut Vec<ConfigError>) -> Option<Limit> {
    let mut ok = true;
    if !(l.requests_per_second.is_finite()
        && l.requests_per_second >= 0.001
        && l.requests_per_second <= 1_000_000.0)
    {
        errors.push(err(
            format!("{field}.requests_per_second"),
            "must be a number from 0.001 to 1000000",
        ));
        ok = false;
    }
    if !(1..=1_000_000).contains(&l.burst) {
        errors.push(err(
            format!("{field}.burst"),
            "must be an integer from 1 to 1000000",
        ));
        ok = false;
    }
    ok.then(|| Limit::new(l.requests_per_second, l.burst as u64))
}

/// HTTP token characters only (RFC 9110), not a pseudo-header.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Header names equal after lowercasing and mapping `_` to `-`.
fn same_header(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let n = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            n(*x) == n(*y)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;

    fn h(k: &str) -> String {
        hex::encode(digest(k.as_bytes()))
    }

    fn errors(json: &str) -> Vec<String> {
        match Policy::from_json(json.as_bytes()) {
            Ok(_) => vec![],
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn first_error(json: &str) -> String {
        errors(json).into_iter().next().unwrap_or_default()
    }

    #[test]
    fn minimal_config_compiles_with_defaults() {
        let p = Policy::from_json(
            format!(r#"{{"keys":[{{"id":"a","sha256":"{}"}}]}}"#, h("k")).as_bytes(),
        )
        .unwrap();
        assert_eq!(p.keys().len(), 1);
        assert_eq!(p.www_authenticate(), "Bearer realm=\"keygate\"");
        assert_eq!(p.identity_header, "x-api-key-id");
        assert!(p.strip_credentials);
    }

    #[test]
    fn every_validation_error_names_its_field() {
        let good = h("k");
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "configuration"),
            (r#"{"keyz":[]}"#.into(), "unknown field `keyz`"),
            (
                r#"{"keys":[{"id":"a","sha256":"abc"}]}"#.into(),
                "keys[0].sha256: must be 64 hex",
            ),
            (
                format!(r#"{{"keys":[{{"id":"a","sha256":"{good}","key":"plain"}}]}}"#),
                "keys[0]",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}"}},{{"id":"a","sha256":"{}"}}]}}"#,
                    h("j")
                ),
                "keys[1].id: duplicate id",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}"}},{{"id":"b","sha256":"{}"}}]}}"#,
                    good.to_uppercase()
                ),
                "keys: key \"b\" has the same sha256",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":0,"burst":5}}"#.into(),
                "rate_limit.requests_per_second",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":5,"burst":-1}}"#.into(),
                "rate_limit.burst",
            ),
            (
                r#"{"rate_limit":{"requests_per_second":5,"burst":0}}"#.into(),
                "rate_limit.burst",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}","rate_limit":{{"requests_per_second":-2,"burst":1}}}}]}}"#
                ),
                "keys[0].rate_limit.requests_per_second",
            ),
            (
                r#"{"credential_sources":[]}"#.into(),
                "credential_sources: must list",
            ),
            (
                r#"{"credential_sources":[{"type":"cookie"}]}"#.into(),
                "credential_sources[0]",
            ),
            (
                r#"{"credential_sources":[{"type":"header","name":"bad name"}]}"#.into(),
                "credential_sources[0].name",
            ),
            (
                r#"{"credential_sources":[{"type":"bearer"},{"type":"bearer"}]}"#.into(),
                "credential_sources[1]: listed twice",
            ),
            (
                r#"{"identity_header":"x-api-key"}"#.into(),
                "identity_header: must differ",
            ),
            (r#"{"max_key_length":0}"#.into(), "max_key_length"),
            (
                r#"{"keys":[{"id":"has space","sha256":"00"}]}"#.into(),
                "keys[0].id",
            ),
        ];
        for (json, want) in cases {
            let got = errors(&json);
            assert!(
                got.iter().any(|e| e.contains(want)),
                "{json}\n  want {want:?}\n  got {got:?}"
            );
        }
        assert!(first_error(r#"{"keys":[{"id":"a","sha256":"zz"}]}"#).starts_with("keys[0].sha256"));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = errors(
            r#"{"keys":[{"id":"","sha256":"x"}],"rate_limit":{"requests_per_second":0,"burst":0}}"#,
        );
        assert_eq!(e.len(), 4, "{e:?}");
    }

    #[test]
    fn decide_rate_limits_per_key_and_fails_closed_on_store_errors() {
        struct Broken;
        impl CounterStore for Broken {
            fn get(&self, _: &str) -> Result<Option<ratelimit::Versioned>, ratelimit::StoreError> {
                Err(ratelimit::StoreError)
            }
            fn set(
                &self,
                _: &str,
                _: &[u8],
                _: Option<u32>,
            ) -> Result<bool, ratelimit::StoreError> {
                Err(ratelimit::StoreError)
            }
        }
        let json = format!(
            r#"{{"rate_limit":{{"requests_per_second":1,"burst":2}},
                "keys":[{{"id":"a","sha256":"{}"}},{{"id":"b","sha256":"{}","rate_limit":{{"requests_per_second":1,"burst":1}}}}]}}"#,
            h("ka"),
            h("kb")
        );
        let p = Policy::from_json(json.as_bytes()).unwrap();
        let store = crate::ratelimit::tests::MemStore::default();
        let env = Env {
            monotonic_ns: 7_000_000_000,
            counters: &store,
        };
        let run = |k: &[u8], env: &Env<'_>| match p
            .decide(&HeaderMap::from_pairs(vec![(b"x-api-key", k)]), env)
        {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => d.code.as_str(),
        };
        assert_eq!(run(b"ka", &env), "allow");
        assert_eq!(run(b"ka", &env), "allow");
        assert_eq!(run(b"ka", &env), "rate_limited");
        assert_eq!(run(b"kb", &env), "allow");
        assert_eq!(run(b"kb", &env), "rate_limited");
        let broken = Env {
            monotonic_ns: 0,
            counters: &Broken,
        };
        assert_eq!(run(b"ka", &broken), "rate_limited");
    }

    #[test]
    fn describe_key_never_shows_the_key() {
        let p = Policy::from_json(
            format!(
                r#"{{"keys":[{{"id":"a","sha256":"{}"}}]}}"#,
                h("kg_live_0123456789abcdef")
            )
            .as_bytes(),
        )
        .unwrap();
        let d = |k: &[u8]| p.describe_key(&HeaderMap::from_pairs(vec![(b"x-api-key", k)]));
        assert_eq!(d(b"kg_live_0123456789abcdef"), "id=a");
        let m = d(b"kg_live_ffffffffffff9999");
        assert_eq!(m, "masked=kg_l…9999");
    }
}
