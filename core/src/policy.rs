//! The compiled policy: configuration validated and indexed once, then used
//! to decide every request.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{
    Config, DefaultAction, KeyConfig, RateLimitConfig, RuleAction, RuleConfig, SourceConfig,
};
use crate::control::{ControlPlane, StalePolicy};
use crate::credential::{Credential, Extractor, Source};
use crate::denial::{Denial, DenyCode, RateInfo};
use crate::headers::{same_header, HeaderMap};
use crate::keys::{
    self, parse_digest, BucketName, Clash, Digest, KeyMeta, KeyRef, KeySet, KeyStore,
    KeyStoreBuilder, Profile,
};
use crate::ratelimit::{self, BlockedBuckets, CounterStore, Limit, Outcome, TakeError};
use crate::rules::{
    read_json_body, AttachmentCheck, AttrValue, Attribute, BodyValue, Effect, Matcher, RequestLine,
    Requirement, Rule, MAX_BODY_DEPTH,
};

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

/// What the decision may ask of the host. The filter implements it with
/// proxy-wasm calls made only when needed; tests use a fake.
pub trait Host {
    /// Monotonic nanoseconds (rate arithmetic). `None` fails closed.
    fn monotonic_ns(&self) -> Option<u64>;
    /// Wall-clock Unix seconds (key expiry). `None` fails closed.
    fn unix_secs(&self) -> Option<i64>;
    /// Envoy's downstream address (`source.address`). `None` fails closed.
    fn source_ip(&self) -> Option<IpAddr>;
    /// Bucket storage.
    fn counters(&self) -> &dyn CounterStore;
    /// True when the control-plane list is older than `max_staleness`.
    fn key_list_stale(&self) -> bool {
        false
    }
}

/// The validated, indexed form of a [`Config`].
#[derive(Debug, Clone)]
pub struct Policy {
    extractor: Extractor,
    keys: KeySet,
    rules: Vec<Rule>,
    default_action: DefaultAction,
    identity_header: String,
    strip_credentials: bool,
    www_authenticate: String,
    realm: String,
    max_body_bytes: usize,
    control_plane: Option<ControlPlane>,
    default_limit: Option<Limit>,
    /// Control plane configured, no list yet, no static keys: 503.
    awaiting_list: bool,
    /// Version of the merged control-plane list, if any.
    list_version: Option<u64>,
    /// Start of this filter's bucket names, from [`keys::bucket_scope`].
    bucket_scope: String,
    /// Buckets this VM found blocked: their 429s skip the shared-data read.
    blocked: BlockedBuckets,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<'p, 'h> {
    /// Forward it, after applying [`Policy::forward_edits`]; if
    /// [`Allowed::body_check`] is set, hold it until [`Policy::decide_body`].
    Allow(Allowed<'p, 'h>),
    /// Answer locally with [`crate::reply::render`].
    Deny(Denial),
}

/// An admitted request (so far, if a body check remains).
#[derive(Debug, Clone, PartialEq)]
pub struct Allowed<'p, 'h> {
    /// The matched key; `None` on a public route.
    pub key: Option<KeyRef<'p>>,
    /// Where the key was found, and which extractor found it.
    pub credential: Option<(Credential<'h>, &'p Extractor)>,
    /// Bucket figures after this request, if the key is limited.
    pub rate: Option<RateInfo>,
    /// A JSON body attachment check still to pass, for [`Policy::decide_body`].
    pub body_check: Option<Hold>,
}

/// A request held for its body: which key and which rule, by position, so
/// the filter can keep it across callbacks without borrowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    record: u32,
    rule: u32,
}

/// Header changes to make before forwarding an allowed request.
#[derive(Debug, Clone)]
pub struct Edits<'p, 'h> {
    /// Client copies of the identity header (any case, `_` for `-`) to remove.
    pub remove: Vec<&'h [u8]>,
    /// The credential whose headers [`Edits::strip`] names, when stripping.
    strip: Option<(Credential<'h>, &'p Extractor)>,
    /// The identity header and its value (replaces any client copy); `None`
    /// on public routes.
    pub identity: Option<(&'p str, &'p str)>,
}

impl<'p> Edits<'p, '_> {
    /// Credential headers to remove (none when credentials are kept). Named
    /// on demand rather than collected: an allowed request allocates nothing.
    pub fn strip(&self) -> impl Iterator<Item = &'p [u8]> + '_ {
        self.strip
            .iter()
            .flat_map(|(credential, extractor)| extractor.carrier_names(credential))
    }
}

impl Policy {
    /// Parses and compiles plugin configuration JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, Vec<ConfigError>> {
        let mut cfg: Config = parse_json(bytes, "configuration")?;
        let keys = std::mem::take(&mut cfg.keys);
        Policy::build(&cfg, keys)
    }

    /// [`Policy::from_json`], also returning the configuration without its
    /// keys as JSON. With the static key store's wire form
    /// (`keys().fixed().as_bytes()`) that is all another VM needs to rebuild
    /// the same policy with [`Policy::from_parts`], without parsing the keys.
    pub fn from_json_shareable(bytes: &[u8]) -> Result<(Policy, Vec<u8>), Vec<ConfigError>> {
        let mut cfg: Config = parse_json(bytes, "configuration")?;
        let keys = std::mem::take(&mut cfg.keys);
        let policy = Policy::build(&cfg, keys)?;
        let rest =
            serde_json::to_vec(&cfg).map_err(|e| vec![err("configuration", e.to_string())])?;
        Ok((policy, rest))
    }

    /// Rebuilds a policy from the parts [`Policy::from_json_shareable`] returned.
    pub fn from_parts(rest: &[u8], keys: Arc<KeyStore>) -> Result<Policy, Vec<ConfigError>> {
        let cfg: Config = parse_json(rest, "configuration")?;
        if !cfg.keys.is_empty() {
            return Err(vec![err("keys", "expected a configuration without keys")]);
        }
        Policy::assemble(&cfg, Some(keys), Vec::new())
    }

    /// Validates `cfg` and builds the indexes. Returns every problem found.
    pub fn compile(cfg: &Config) -> Result<Policy, Vec<ConfigError>> {
        Policy::build(cfg, cfg.keys.clone())
    }

    /// `compile`, with the key records moved in rather than copied.
    fn build(cfg: &Config, compiled: CompiledKeys) -> Result<Policy, Vec<ConfigError>> {
        let mut errors = compiled.errors.clone();
        errors.extend(failed_duplicate_ids(&compiled.keys, &compiled.failed_ids));
        let keys = build_store(compiled.keys, &mut errors);
        Policy::assemble(cfg, keys.map(Arc::new), errors)
    }

    /// Validates everything but the key records and puts the policy together.
    fn assemble(
        cfg: &Config,
        keys: Option<Arc<KeyStore>>,
        mut errors: Vec<ConfigError>,
    ) -> Result<Policy, Vec<ConfigError>> {
        let extractor = compile_sources(
            &cfg.credential_sources,
            "credential_sources",
            cfg,
            &mut errors,
        );

        let identity = cfg.identity_header.to_ascii_lowercase();
        if !is_header_name(&identity) {
            errors.push(err(
                "identity_header",
                format!("{:?} is not a valid header name", cfg.identity_header),
            ));
        }
        if let Some(why) = managed_header(&identity) {
            errors.push(err(
                "identity_header",
                format!("{:?} cannot carry the key id: {why}", cfg.identity_header),
            ));
        }
        // Client copies of the identity header are removed in every spelling
        // (`_` for `-`), so a credential header spelled alike would go too.
        let credential_header = |sources: &[SourceConfig]| {
            sources.iter().any(|s| {
                matches!(s, SourceConfig::Header { name } if same_header(name.as_bytes(), identity.as_bytes()))
            })
        };
        if credential_header(&cfg.credential_sources)
            || cfg.rules.iter().any(|r| {
                r.credential_sources
                    .as_deref()
                    .is_some_and(credential_header)
            })
            || same_header(identity.as_bytes(), b"authorization")
        {
            errors.push(err(
                "identity_header",
                "must differ from every credential header, also when spelled with '_' for '-'",
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
        if !(1..=16 * 1024 * 1024).contains(&cfg.max_body_bytes) {
            errors.push(err("max_body_bytes", "must be between 1 and 16777216"));
        }

        let default_limit = cfg
            .rate_limit
            .as_ref()
            .and_then(|l| compile_limit(l, "rate_limit", &mut errors));
        let control_plane = cfg
            .control_plane
            .as_ref()
            .and_then(|c| ControlPlane::compile(c, &mut errors));
        let rules = compile_rules(cfg, &mut errors);

        match (errors.is_empty(), keys, extractor) {
            (true, Some(keys), Some(extractor)) => {
                let www_authenticate = if extractor.accepts_bearer() {
                    format!("Bearer realm=\"{}\"", cfg.realm)
                } else {
                    format!("ApiKey realm=\"{}\"", cfg.realm)
                };
                Ok(Policy {
                    extractor,
                    awaiting_list: control_plane.is_some() && keys.is_empty(),
                    keys: KeySet::new(keys),
                    rules,
                    default_action: cfg.default_action,
                    identity_header: identity,
                    strip_credentials: cfg.strip_credentials,
                    www_authenticate,
                    realm: cfg.realm.clone(),
                    max_body_bytes: cfg.max_body_bytes,
                    control_plane,
                    default_limit,
                    list_version: None,
                    bucket_scope: keys::bucket_scope(""),
                    blocked: BlockedBuckets::default(),
                })
            }
            _ => Err(errors),
        }
    }

    /// The key list.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The effective limit of a key: its own, else the default.
    pub fn limit_of(&self, key: &KeyRef<'_>) -> Option<Limit> {
        key.limit().or(self.default_limit)
    }

    /// Names this filter's buckets after its plugin name (see
    /// [`keys::bucket_scope`]), so that filters sharing a VM count apart.
    pub fn scope_buckets(&mut self, plugin_name: &str) {
        self.bucket_scope = keys::bucket_scope(plugin_name);
    }

    /// The start of this filter's bucket names.
    pub fn bucket_scope(&self) -> &str {
        &self.bucket_scope
    }

    /// The bucket of a key's own limit.
    pub fn key_bucket(&self, key: &KeyRef<'_>) -> Option<BucketName> {
        BucketName::new(&self.bucket_scope, "", key.id())
    }

    /// The control plane, if one is configured.
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        self.control_plane.as_ref()
    }

    /// Version of the control-plane list in use, if any.
    pub fn list_version(&self) -> Option<u64> {
        self.list_version
    }

    /// This policy with the static keys merged with a control-plane list.
    /// A key in both (same id or same digest) is an error; nothing changes then.
    pub fn with_key_list(&self, list: CompiledKeyList) -> Result<Policy, Vec<ConfigError>> {
        match self.keys.with_list(list.store) {
            Ok(keys) => Ok(Policy {
                keys,
                awaiting_list: false,
                list_version: Some(list.version),
                ..self.clone()
            }),
            Err(clashes) => Err(clashes
                .into_iter()
                .map(|(id, clash)| {
                    err(
                        "key_list.keys",
                        format!("key {id:?} clashes with a static key ({clash})"),
                    )
                })
                .collect()),
        }
    }

    /// The challenge sent in `WWW-Authenticate` on 401 by default.
    pub fn www_authenticate(&self) -> &str {
        &self.www_authenticate
    }

    /// The challenge for `denial`: `Bearer` when the credential sources that
    /// applied accept Bearer, `ApiKey` otherwise.
    pub fn challenge(&self, denial: &Denial) -> String {
        self.challenge_for(denial.bearer)
    }

    /// The challenge for a denial whose `bearer` is `bearer` (see [`Denial::bearer`]).
    pub fn challenge_for(&self, bearer: Option<bool>) -> String {
        match bearer {
            None => self.www_authenticate.clone(),
            Some(true) => format!("Bearer realm=\"{}\"", self.realm),
            Some(false) => format!("ApiKey realm=\"{}\"", self.realm),
        }
    }

    /// Largest body buffered for a JSON-body check.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// How the request's key may appear in a log line: `id=<id>` for a known
    /// key, `masked=<first4…last4>` otherwise, `-` without a usable key.
    /// Never the key itself. Meant for denied requests at debug level.
    pub fn describe_key(&self, headers: &HeaderMap<'_>) -> String {
        let line = RequestLine::from_headers(headers);
        let extractor = match self.rule_index_for(&line).map(|(_, r)| &r.effect) {
            Some(Effect::Require(req)) => req.extractor.as_ref().unwrap_or(&self.extractor),
            _ => &self.extractor,
        };
        match extractor.extract(headers) {
            Ok(c) => match self.keys.lookup(c.key) {
                Some(k) => format!("id={}", k.id()),
                None => format!("masked={}", crate::credential::mask(c.key)),
            },
            Err(_) => "-".to_string(),
        }
    }

    fn rule_index_for(&self, line: &RequestLine<'_>) -> Option<(u32, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matcher.matches(line))
            .map(|(i, r)| (i as u32, r))
    }

    /// Decides a request from its headers. A JSON-body attachment check, if
    /// the route has one, is left in [`Allowed::body_check`].
    pub fn decide<'p, 'h>(&'p self, headers: &HeaderMap<'h>, host: &dyn Host) -> Decision<'p, 'h> {
        let line = RequestLine::from_headers(headers);
        let (requirement, rule_index) = match self.rule_index_for(&line) {
            Some((_, rule)) if matches!(rule.effect, Effect::Public) => {
                return Decision::Allow(Allowed {
                    key: None,
                    credential: None,
                    rate: None,
                    body_check: None,
                })
            }
            Some((i, rule)) => match &rule.effect {
                Effect::Require(req) => (Some(&**req), Some(i)),
                _ => {
                    return Decision::Deny(Denial::new(
                        DenyCode::RouteNotAllowed,
                        "rule denies this route",
                    ))
                }
            },
            None if self.default_action == DefaultAction::Deny => {
                return Decision::Deny(Denial::new(
                    DenyCode::RouteNotAllowed,
                    "no rule matches this route",
                ))
            }
            None => (None, None),
        };
        match self.authorize(headers, &line, requirement, rule_index, host) {
            Ok(a) => Decision::Allow(a),
            // The challenge names the sources that applied on this route.
            Err(d) => Decision::Deny(Denial {
                bearer: requirement
                    .and_then(|r| r.extractor.as_ref())
                    .map(Extractor::accepts_bearer),
                ..d
            }),
        }
    }

    fn authorize<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        line: &RequestLine<'h>,
        requirement: Option<&'p Requirement>,
        rule_index: Option<u32>,
        host: &dyn Host,
    ) -> Result<Allowed<'p, 'h>, Denial> {
        if self.awaiting_list {
            return Err(Denial::new(
                DenyCode::KeyListUnavailable,
                "no key list loaded yet",
            ));
        }
        if host.key_list_stale()
            && self
                .control_plane
                .as_ref()
                .is_some_and(|c| c.stale_policy == StalePolicy::FailClosed)
        {
            return Err(Denial::new(
                DenyCode::KeyListUnavailable,
                "key list older than max_staleness",
            ));
        }
        let extractor = requirement
            .and_then(|r| r.extractor.as_ref())
            .unwrap_or(&self.extractor);
        let credential = extractor.extract(headers)?;
        let (record, key) = self
            .keys
            .get(&crate::keys::digest(credential.key))
            .ok_or(Denial::new(DenyCode::InvalidApiKey, "unknown key"))?;
        let meta = key.meta();
        if meta.disabled {
            // Same public code as an unknown key: a client cannot tell them apart.
            return Err(Denial::new(DenyCode::InvalidApiKey, "revoked key"));
        }
        if let Some(exp) = meta.expires_at {
            if host.unix_secs().is_none_or(|now| now >= exp) {
                return Err(Denial::new(DenyCode::ExpiredApiKey, "key expired"));
            }
        }
        if !meta.allowed_cidrs.is_empty() {
            let permitted = host
                .source_ip()
                .is_some_and(|ip| meta.allowed_cidrs.iter().any(|n| n.contains(&ip)));
            if !permitted {
                return Err(Denial::new(
                    DenyCode::IpNotAllowed,
                    "source address outside allowed_cidrs",
                ));
            }
        }
        let mut body_check = None;
        if let (Some(req), Some(rule)) = (requirement, rule_index) {
            if !req.permits(&meta.scopes, meta.environment.as_deref()) {
                return Err(Denial::new(
                    DenyCode::InsufficientScope,
                    "key lacks the rule's scope or environment",
                ));
            }
            if let Some(AttachmentCheck { set, attribute }) = &req.attachment {
                if attribute.needs_body() {
                    body_check = Some(Hold { record, rule });
                } else {
                    match attribute.read_from_request(headers, line) {
                        AttrValue::Found(value) => check_attached(meta, set, &value)?,
                        AttrValue::Absent => {
                            return Err(Denial::new(
                                DenyCode::MissingAttribute,
                                "attachment attribute absent",
                            ))
                        }
                        AttrValue::Repeated => {
                            return Err(Denial::new(
                                DenyCode::AmbiguousAttribute,
                                "attachment attribute repeated",
                            ))
                        }
                    }
                }
            }
        }
        // The rate limit is taken after every header-level check and before
        // any body is buffered, so a flood is refused without buffering.
        let rate = match (
            requirement.and_then(|r| r.limit.as_ref()),
            &self.limit_of(&key),
        ) {
            (Some((limit, rule)), _) => self.take(host, rule, key.id(), limit)?,
            (None, Some(limit)) => self.take(host, "", key.id(), limit)?,
            (None, None) => None,
        };
        Ok(Allowed {
            key: Some(key),
            credential: Some((credential, extractor)),
            rate,
            body_check,
        })
    }

    /// Finishes a held request: reads the attachment value from the buffered
    /// JSON body and checks it against the key. `truncated` means the body
    /// went over `max_body_bytes`.
    pub fn decide_body(&self, hold: Hold, body: &[u8], truncated: bool) -> Result<(), Denial> {
        let key = self.keys.at(hold.record);
        let check = self
            .rules
            .get(hold.rule as usize)
            .and_then(|r| match &r.effect {
                Effect::Require(req) => req.attachment.as_ref(),
                _ => None,
            });
        let (
            Some(key),
            Some(AttachmentCheck {
                set,
                attribute: Attribute::JsonBody(pointer),
            }),
        ) = (key, check)
        else {
            return Err(Denial::new(
                DenyCode::NotAttached,
                "held request lost its rule",
            ));
        };
        if truncated || body.len() > self.max_body_bytes {
            return Err(Denial::new(
                DenyCode::BodyTooLarge,
                "body over max_body_bytes",
            ));
        }
        match read_json_body(body, pointer) {
            BodyValue::Found(v) => check_attached(key.meta(), set, &v),
            BodyValue::NotJson => Err(Denial::new(
                DenyCode::InvalidJsonBody,
                "request body is not JSON",
            )),
            BodyValue::TooDeep => {
                // The reason and the reply's message name the limit.
                const _: () = assert!(MAX_BODY_DEPTH == 127);
                Err(Denial::new(
                    DenyCode::InvalidJsonBody,
                    "request body nests deeper than 127 levels",
                ))
            }
            BodyValue::Missing => Err(Denial::new(
                DenyCode::MissingAttribute,
                "attachment field absent from body",
            )),
            BodyValue::Duplicate => Err(Denial::new(
                DenyCode::AmbiguousAttribute,
                "a field repeated in the JSON body, or the field beside a copy differing in case",
            )),
        }
    }

    /// The header edits for an allowed request: strip the credential (if
    /// configured) and every client copy of the identity header, including
    /// case and underscore variants, then set the identity (not on public routes).
    pub fn forward_edits<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        allowed: &Allowed<'p, 'h>,
    ) -> Edits<'p, 'h> {
        let identity = allowed.key.map(|k| (self.identity_header.as_str(), k.id()));
        let mut remove: Vec<&'h [u8]> = Vec::new();
        for (name, _) in headers.iter() {
            // With an identity to set, the exact name is replaced, not removed.
            let exact = name == self.identity_header.as_bytes();
            if (identity.is_none() || !exact)
                && same_header(name, self.identity_header.as_bytes())
                && !remove.contains(&name)
            {
                remove.push(name);
            }
        }
        let strip = allowed.credential.filter(|_| self.strip_credentials);
        Edits {
            remove,
            strip,
            identity,
        }
    }
}

fn check_attached(meta: &KeyMeta, set: &str, value: &str) -> Result<(), Denial> {
    if meta.attached(set, value) {
        Ok(())
    } else {
        Err(Denial::new(
            DenyCode::NotAttached,
            "value not in the key's attachment set",
        ))
    }
}

impl Policy {
    /// Takes a token from the bucket of `id` under `rule`: refused from
    /// [`BlockedBuckets`] when this VM already found it blocked, else
    /// read and written in shared data.
    fn take(
        &self,
        host: &dyn Host,
        rule: &str,
        id: &str,
        limit: &Limit,
    ) -> Result<Option<RateInfo>, Denial> {
        let closed = |reason| Denial {
            rate: Some(RateInfo {
                burst: limit.burst,
                window_secs: limit.window_secs(),
                remaining: 0,
                retry_after_secs: 1,
            }),
            ..Denial::new(DenyCode::RateLimited, reason)
        };
        let bucket =
            BucketName::new(&self.bucket_scope, rule, id).ok_or(closed("bucket name too long"))?;
        let now = host
            .monotonic_ns()
            .ok_or(closed("monotonic clock unavailable (failing closed)"))?;
        let refused = |o: Outcome| Denial {
            rate: Some(o.info),
            ..Denial::new(DenyCode::RateLimited, "bucket empty")
        };
        if let Some(o) = self.blocked.refusal(bucket.as_str(), limit, now) {
            return Err(refused(o));
        }
        match ratelimit::take_shared(host.counters(), bucket.as_str(), limit, now) {
            Ok(o) if o.allowed => Ok(Some(o.info)),
            Ok(o) => {
                self.blocked.record(bucket.as_str(), limit, now, &o);
                Err(refused(o))
            }
            Err(TakeError::Contention) => Err(closed("bucket update contention (failing closed)")),
            Err(TakeError::Store) => Err(closed("bucket store error (failing closed)")),
        }
    }
}

fn compile_sources(
    sources: &[SourceConfig],
    path: &str,
    cfg: &Config,
    errors: &mut Vec<ConfigError>,
) -> Option<Extractor> {
    let before = errors.len();
    if sources.is_empty() {
        errors.push(err(path, "must list at least one source"));
    }
    if sources.len() > 16 {
        errors.push(err(path, "at most 16 sources"));
    }
    let mut seen = HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let field = format!("{path}[{i}]");
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
            } else if let Some(why) = managed_header(&name.to_ascii_lowercase()) {
                errors.push(err(
                    format!("{field}.name"),
                    format!("{name:?} cannot carry a key: {why}"),
                ));
            }
        }
        if !seen.insert(Source::from(s)) {
            errors.push(err(field, "listed twice"));
        }
    }
    (errors.len() == before).then(|| {
        let compiled: Vec<Source> = sources.iter().map(Source::from).collect();
        Extractor::new(&compiled, cfg.max_key_length, &cfg.key_prefixes)
    })
}

/// Deserializes JSON, naming the field of the first problem by its path
/// (`root` when the problem is the document itself).
fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    root: &str,
) -> Result<T, Vec<ConfigError>> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if matches!(path.as_str(), "." | "?" | "") {
            root.to_string()
        } else {
            path
        };
        vec![err(field, e.into_inner().to_string())]
    })
}

/// Parses and validates a key list (control-plane or `keys.json` format)
/// with the same rules as the `keys` of a plugin configuration.
pub fn validate_key_list(bytes: &[u8]) -> Result<crate::config::KeyList, Vec<ConfigError>> {
    let list: crate::config::KeyList = parse_json(bytes, "key list")?;
    let mut errors = Vec::new();
    let mut keys = KeyStoreBuilder::default();
    let mut failed = Vec::new();
    for (i, k) in list.keys.iter().enumerate() {
        match compile_key(k, i as u32, &mut errors) {
            Some((d, profile)) => keys.push(d, &k.id, profile, i as u32),
            None => failed.push((k.id.clone(), i as u32)),
        }
    }
    errors.extend(failed_duplicate_ids(&keys, &failed));
    let _ = build_store(keys, &mut errors);
    if errors.is_empty() {
        Ok(list)
    } else {
        Err(errors)
    }
}

/// Key records compiled one by one as they are parsed (each `KeyConfig` is
/// dropped right away), with the problems found in them. Duplicates are
/// checked when the records are indexed.
#[derive(Debug, Clone, Default)]
pub struct CompiledKeys {
    keys: KeyStoreBuilder,
    errors: Vec<ConfigError>,
    /// Ids of records that failed, still checked for duplicates.
    failed_ids: Vec<(String, u32)>,
}

impl CompiledKeys {
    /// Number of records that compiled.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no record compiled.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<'de> serde::Deserialize<'de> for CompiledKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Records;
        impl<'de> serde::de::Visitor<'de> for Records {
            type Value = CompiledKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key records")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CompiledKeys, A::Error> {
                let mut out = CompiledKeys::default();
                let mut i = 0u32;
                while let Some(k) = seq.next_element::<KeyConfig>()? {
                    match compile_key(&k, i, &mut out.errors) {
                        Some((d, profile)) => out.keys.push(d, &k.id, profile, i),
                        None => out.failed_ids.push((k.id, i)),
                    }
                    i += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Records)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyListDocument {
    #[serde(default)]
    version: u64,
    #[serde(default)]
    keys: CompiledKeys,
    #[serde(default)]
    next: Option<String>,
}

/// A control-plane key list compiled and indexed for the filter.
#[derive(Debug, Clone, Default)]
pub struct CompiledKeyList {
    /// The list's version.
    pub version: u64,
    /// Its records.
    pub store: Arc<KeyStore>,
}

/// A key list received so far: one page or several, not yet indexed. A
/// control plane may split a long list into pages (Envoy refuses callout
/// responses of a few tens of megabytes); each page names the path of the
/// next in `next`, and the last page has none.
#[derive(Debug, Clone, Default)]
pub struct KeyListPages {
    /// Version, the same on every page.
    pub version: u64,
    /// Path of the next page, if any.
    pub next: Option<String>,
    /// Pages received.
    pub pages: u32,
    keys: KeyStoreBuilder,
    bytes: usize,
}

/// Most pages one list may have: a control plane that keeps naming a next
/// page is cut off here (and by `max_list_bytes`, counted over all pages).
pub const MAX_PAGES: u32 = 10_000;

impl KeyListPages {
    /// Bytes of all pages received so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Parses and compiles one page and adds it. The first page starts a
    /// list; a later page must carry the same version. Problems name the
    /// page and its record (`page 2: keys[7].sha256`).
    pub fn add(&mut self, bytes: &[u8]) -> Result<(), Vec<ConfigError>> {
        let label = |e: ConfigError| {
            if self.pages == 0 {
                e
            } else {
                err(format!("page {}: {}", self.pages + 1, e.field), e.message)
            }
        };
        let doc: KeyListDocument = parse_json(bytes, "key list")
            .map_err(|e| e.into_iter().map(label).collect::<Vec<_>>())?;
        if !doc.keys.errors.is_empty() {
            return Err(doc.keys.errors.into_iter().map(label).collect());
        }
        if self.pages > 0 && doc.version != self.version {
            return Err(vec![err(
                "version",
                format!(
                    "page {} has version {}, the first page {}: the list changed while paging",
                    self.pages + 1,
                    doc.version,
                    self.version
                ),
            )]);
        }
        if doc.next.is_some() && self.pages + 1 >= MAX_PAGES {
            return Err(vec![err(
                "next",
                format!("the list goes on past {MAX_PAGES} pages"),
            )]);
        }
        if let Some(next) = &doc.next {
            if !next.starts_with('/')
                || next.len() > 2048
                || !next.bytes().all(|b| (0x21..=0x7e).contains(&b))
            {
                return Err(vec![label(err(
                    "next",
                    "must be a path starting with '/' (visible ASCII, at most 2048 bytes)",
                ))]);
            }
        }
        // Source positions continue across pages, so duplicates name both records.
        let offset = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        self.keys.append(&doc.keys.keys, offset);
        self.version = doc.version;
        self.next = doc.next;
        self.pages += 1;
        self.bytes = self.bytes.saturating_add(bytes.len());
        Ok(())
    }

    /// Indexes the whole list, reporting duplicate ids and digests.
    pub fn finish(self) -> Result<CompiledKeyList, Vec<ConfigError>> {
        let mut errors = Vec::new();
        match build_store(self.keys, &mut errors) {
            Some(store) if errors.is_empty() => Ok(CompiledKeyList {
                version: self.version,
                store: Arc::new(store),
            }),
            _ => Err(errors),
        }
    }
}

/// Parses and compiles a control-plane key list (same JSON as
/// [`crate::config::KeyList`]), reporting every problem. Clashes with
/// static keys are found when the list is merged: `Policy::with_key_list`.
pub fn compile_key_list(bytes: &[u8]) -> Result<CompiledKeyList, Vec<ConfigError>> {
    let mut list = KeyListPages::default();
    list.add(bytes)?;
    list.finish()
}

/// One record, without the list-wide checks (duplicates). `index` is its
/// position in `keys`; the field name is only formatted for an error, since
/// a list may hold a million records.
fn compile_key(
    k: &KeyConfig,
    index: u32,
    errors: &mut Vec<ConfigError>,
) -> Option<(Digest, Profile)> {
    let field = || format!("keys[{index}]");
    let before = errors.len();
    if k.id.is_empty()
        || k.id.len() > crate::keys::MAX_ID_LEN
        || !k.id.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        errors.push(err(
            format!("{}.id", field()),
            "must be 1-128 visible ASCII characters",
        ));
    }
    let digest = parse_digest(&k.sha256);
    if digest.is_none() {
        errors.push(err(
            format!("{}.sha256", field()),
            "must be 64 hex characters (the SHA-256 of the key, never the key)",
        ));
    }
    let limit = k
        .rate_limit
        .as_ref()
        .and_then(|l| compile_limit(l, &format!("{}.rate_limit", field()), errors));
    let meta = if has_meta(k) {
        compile_meta(k, &field(), errors)
    } else {
        KeyMeta::default()
    };
    match digest {
        Some(d) if errors.len() == before => Some((d, Profile { limit, meta })),
        _ => None,
    }
}

/// True when a record sets any of the fields of [`KeyMeta`].
fn has_meta(k: &KeyConfig) -> bool {
    !k.scopes.is_empty()
        || k.expires_at.is_some()
        || k.disabled
        || !k.allowed_cidrs.is_empty()
        || !k.attachments.is_empty()
        || k.environment.is_some()
}

/// Duplicate ids involving a record that failed to compile (duplicates among
/// compiled records are reported by `build_store`).
fn failed_duplicate_ids(keys: &KeyStoreBuilder, failed: &[(String, u32)]) -> Vec<ConfigError> {
    if failed.is_empty() {
        return Vec::new();
    }
    let mut ids: Vec<(&str, u32, bool)> = keys.ids().map(|(id, i)| (id, i, false)).collect();
    ids.extend(
        failed
            .iter()
            .filter(|(id, _)| !id.is_empty())
            .map(|(id, i)| (id.as_str(), *i, true)),
    );
    ids.sort_unstable();
    ids.windows(2)
        .filter(|w| w[0].0 == w[1].0 && (w[0].2 || w[1].2))
        .map(|w| {
            err(
                format!("keys[{}].id", w[0].1.max(w[1].1)),
                format!("duplicate id {:?}", w[1].0),
            )
        })
        .collect()
}

/// Indexes compiled records, reporting duplicate ids and digests.
fn build_store(keys: KeyStoreBuilder, errors: &mut Vec<ConfigError>) -> Option<KeyStore> {
    match keys.build() {
        Ok(store) => Some(store),
        Err(clashes) => {
            for c in clashes {
                errors.push(match c {
                    Clash::Id { id, later, .. } => {
                        err(format!("keys[{later}].id"), format!("duplicate id {id:?}"))
                    }
                    Clash::Digest { id, .. } => err(
                        "keys",
                        format!("key {id:?} has the same sha256 as another key"),
                    ),
                });
            }
            None
        }
    }
}

fn compile_meta(k: &KeyConfig, field: &str, errors: &mut Vec<ConfigError>) -> KeyMeta {
    let expires_at = k.expires_at.as_ref().and_then(|t| {
        match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
            Ok(dt) => Some(dt.unix_timestamp()),
            Err(e) => {
                errors.push(err(
                    format!("{field}.expires_at"),
                    format!("not an RFC 3339 timestamp: {e}"),
                ));
                None
            }
        }
    });
    let mut allowed_cidrs = Vec::new();
    for (j, c) in k.allowed_cidrs.iter().enumerate() {
        match parse_cidr(c) {
            Some(net) => allowed_cidrs.push(net),
            None => errors.push(err(
                format!("{field}.allowed_cidrs[{j}]"),
                format!("{c:?} is not an IP address or CIDR"),
            )),
        }
    }
    for (j, s) in k.scopes.iter().enumerate() {
        if !is_word(s) {
            errors.push(err(
                format!("{field}.scopes[{j}]"),
                "must be 1-64 visible ASCII characters",
            ));
        }
    }
    if let Some(env) = &k.environment {
        if !is_word(env) {
            errors.push(err(
                format!("{field}.environment"),
                "must be 1-64 visible ASCII characters",
            ));
        }
    }
    let attachments = k
        .attachments
        .iter()
        .map(|(name, values)| {
            let mut v = values.clone();
            v.sort_unstable();
            v.dedup();
            (name.clone(), v)
        })
        .collect();
    KeyMeta {
        scopes: k.scopes.clone(),
        expires_at,
        disabled: k.disabled,
        allowed_cidrs,
        attachments,
        environment: k.environment.clone(),
    }
}

/// `api.example.com`, `*.example.com` or `[2001:db8::1]`: what a request's
/// host can equal once its port and trailing dot are removed. A pattern with
/// a port or a trailing dot could never match, and a `deny` rule that never
/// matches fails open.
fn is_host_pattern(h: &str) -> bool {
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !v6.is_empty() && v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn compile_rules(cfg: &Config, errors: &mut Vec<ConfigError>) -> Vec<Rule> {
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(cfg.rules.len());
    for (i, r) in cfg.rules.iter().enumerate() {
        let field = format!("rules[{i}]");
        let name = r.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
        if !is_word(&name) || name.contains('/') {
            errors.push(err(
                format!("{field}.name"),
                "must be 1-64 visible ASCII characters without '/'",
            ));
        } else if !names.insert(name.clone()) {
            errors.push(err(
                format!("{field}.name"),
                format!("duplicate rule name {name:?}"),
            ));
        }
        let m = &r.matches;
        if m.path.is_some() && m.path_prefix.is_some() {
            errors.push(err(
                format!("{field}.match"),
                "give path or path_prefix, not both",
            ));
        }
        for (key, p) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
            if p.as_ref().is_some_and(|p| !p.starts_with('/')) {
                errors.push(err(format!("{field}.match.{key}"), "must start with '/'"));
            } else if p.as_ref().is_some_and(|p| p.contains(['?', '#'])) {
                errors.push(err(
                    format!("{field}.match.{key}"),
                    "must not hold '?' or '#': the path is compared without its query, so the rule \
                     would never match (match a query parameter with an attachment instead)",
                ));
            }
        }
        for (j, method) in m.methods.iter().enumerate() {
            if !is_header_name(method) {
                errors.push(err(
                    format!("{field}.match.methods[{j}]"),
                    "not an HTTP method",
                ));
            }
        }
        if m.host.as_ref().is_some_and(|h| !is_host_pattern(h)) {
            errors.push(err(
                format!("{field}.match.host"),
                "must be a host name (api.example.com), *.suffix or [IPv6], without port or \
                 trailing dot: both are removed from :authority before it is compared",
            ));
        }
        let effect = match r.action {
            RuleAction::Public | RuleAction::Deny => {
                if has_requirements(r) {
                    errors.push(err(
                        format!("{field}.action"),
                        "public and deny rules take no scopes, environments, attachment, credential_sources or rate_limit",
                    ));
                }
                if r.action == RuleAction::Public {
                    Effect::Public
                } else {
                    Effect::Deny
                }
            }
            RuleAction::Require => {
                Effect::Require(Box::new(compile_requirement(r, &name, &field, cfg, errors)))
            }
        };
        rules.push(Rule {
            name,
            matcher: Matcher::new(m),
            effect,
        });
    }
    rules
}

fn has_requirements(r: &RuleConfig) -> bool {
    !r.scopes_any_of.is_empty()
        || !r.scopes_all_of.is_empty()
        || !r.environments.is_empty()
        || r.attachment.is_some()
        || r.credential_sources.is_some()
        || r.rate_limit.is_some()
}

fn compile_requirement(
    r: &RuleConfig,
    name: &str,
    field: &str,
    cfg: &Config,
    errors: &mut Vec<ConfigError>,
) -> Requirement {
    for (list, key) in [
        (&r.scopes_any_of, "scopes_any_of"),
        (&r.scopes_all_of, "scopes_all_of"),
        (&r.environments, "environments"),
    ] {
        for (j, s) in list.iter().enumerate() {
            if !is_word(s) {
                errors.push(err(
                    format!("{field}.{key}[{j}]"),
                    "must be 1-64 visible ASCII characters",
                ));
            }
        }
    }
    let attachment = r.attachment.as_ref().map(|a| {
        if !is_word(&a.set) {
            errors.push(err(
                format!("{field}.attachment.set"),
                "must be 1-64 visible ASCII characters",
            ));
        }
        let attribute = Attribute::from(&a.from);
        match &attribute {
            Attribute::Header(h) if !is_header_name(&String::from_utf8_lossy(h)) => {
                errors.push(err(
                    format!("{field}.attachment.from.header"),
                    "not a valid header name",
                ))
            }
            Attribute::Query(q) if q.is_empty() => errors.push(err(
                format!("{field}.attachment.from.query"),
                "must not be empty",
            )),
            Attribute::JsonBody(p) if p.as_str().len() < 2 => errors.push(err(
                format!("{field}.attachment.from.json_body"),
                "must name a field",
            )),
            Attribute::JsonBody(p)
                if p.as_str()
                    .split('~')
                    .skip(1)
                    .any(|t| !t.starts_with(['0', '1'])) =>
            {
                errors.push(err(
                    format!("{field}.attachment.from.json_body"),
                    "in a JSON pointer, '~' is written ~0 and '/' in a name ~1 (RFC 6901)",
                ))
            }
            _ => {}
        }
        AttachmentCheck {
            set: a.set.clone(),
            attribute,
        }
    });
    let extractor = r
        .credential_sources
        .as_ref()
        .and_then(|s| compile_sources(s, &format!("{field}.credential_sources"), cfg, errors));
    let limit = r
        .rate_limit
        .as_ref()
        .and_then(|l| compile_limit(l, &format!("{field}.rate_limit"), errors))
        .map(|l| (l, name.to_string()));
    Requirement {
        scopes_any_of: r.scopes_any_of.clone(),
        scopes_all_of: r.scopes_all_of.clone(),
        environments: r.environments.clone(),
        attachment,
        extractor,
        limit,
    }
}

fn compile_limit(l: &RateLimitConfig, field: &str, errors: &mut Vec<ConfigError>) -> Option<Limit> {
    let mut ok = true;
    if !(l.requests_per_second.is_finite()
        && (0.001..=1_000_000.0).contains(&l.requests_per_second))
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

/// An address (`10.0.0.1`) or a network (`10.0.0.0/8`).
fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`) to an IP.
pub fn parse_source_address(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?;
    s.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// HTTP token characters only (RFC 9110), not a pseudo-header.
/// Why Envoy's handling of the (lowercased) header `name` keeps it from
/// carrying a key or a key id, if it does.
fn managed_header(name: &str) -> Option<&'static str> {
    match name {
        "host" => Some("Envoy holds it as :authority"),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        | "te" | "trailer" => Some("a hop-by-hop header, which Envoy does not pass on"),
        "content-length" | "content-type" | "content-encoding" | "expect" => {
            Some("it describes the request body")
        }
        n if n.starts_with("x-envoy-") => Some("Envoy sets and trusts x-envoy-* headers"),
        _ => None,
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;
    use crate::testing::FakeHost;

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
            (
                r#"{"identity_header":"x_api_key","strip_credentials":false}"#.into(),
                "identity_header: must differ",
            ),
            (
                r#"{"identity_header":"Host"}"#.into(),
                "identity_header: \"Host\" cannot carry the key id",
            ),
            (
                r#"{"identity_header":"content-length"}"#.into(),
                "identity_header: \"content-length\" cannot carry the key id",
            ),
            (
                r#"{"credential_sources":[{"type":"header","name":"host"}]}"#.into(),
                "credential_sources[0].name: \"host\" cannot carry a key",
            ),
            (
                r#"{"credential_sources":[{"type":"bearer","scheme":"Token"}]}"#.into(),
                "credential_sources[0]: unknown field `scheme`",
            ),
            (
                r#"{"credential_sources":[{"type":"bare","prefix":"Token "}]}"#.into(),
                "credential_sources[0]: unknown field `prefix`",
            ),
            (
                r#"{"rules":[{"action":"require","attachment":{"set":"c","from":{"json_body":"/a~2"}}}]}"#
                    .into(),
                "rules[0].attachment.from.json_body: in a JSON pointer",
            ),
            (
                format!(
                    r#"{{"keys":[{{"id":"a","sha256":"{good}","attachments":{{"c":["x"],"c":["y"]}}}}]}}"#
                ),
                "keys[0].attachments: \"c\" is given twice",
            ),
            (
                r#"{"rules":[{"match":{"path":"/a?b=1"},"action":"deny"}]}"#.into(),
                "rules[0].match.path: must not hold '?'",
            ),
            (
                r#"{"rules":[{"match":{"path_prefix":"/a#x"},"action":"deny"}]}"#.into(),
                "rules[0].match.path_prefix: must not hold '?' or '#'",
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
            fn create(&self, _: &str, _: &[u8]) -> Result<bool, ratelimit::StoreError> {
                Err(ratelimit::StoreError)
            }
        }
        let json = format!(
            r#"{{"rate_limit":{{"requests_per_second":1,"burst":2}},
                "keys":[{{"id":"a","sha256":"{}"}},{{"id":"b","sha256":"{}","rate_limit":{{"requests_per_second":1,"burst":1}}}}]}}"#,
            h("ka"),
            h("kb")
        );
        struct BrokenHost(Broken);
        impl Host for BrokenHost {
            fn monotonic_ns(&self) -> Option<u64> {
                Some(1)
            }
            fn unix_secs(&self) -> Option<i64> {
                None
            }
            fn source_ip(&self) -> Option<IpAddr> {
                None
            }
            fn counters(&self) -> &dyn CounterStore {
                &self.0
            }
        }
        let p = Policy::from_json(json.as_bytes()).unwrap();
        let host = FakeHost::default();
        let run = |k: &[u8], host: &dyn Host| match p
            .decide(&HeaderMap::from_pairs(vec![(b"x-api-key", k)]), host)
        {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => d.code.as_str(),
        };
        assert_eq!(run(b"ka", &host), "allow");
        assert_eq!(run(b"ka", &host), "allow");
        assert_eq!(run(b"ka", &host), "rate_limited");
        assert_eq!(run(b"kb", &host), "allow");
        assert_eq!(run(b"kb", &host), "rate_limited");
        assert_eq!(run(b"ka", &BrokenHost(Broken)), "rate_limited");
    }

    #[test]
    fn host_patterns_that_could_never_match_are_refused() {
        for good in [
            "api.example.com",
            "*.tenants.example.com",
            "localhost",
            "Admin.Example.COM",
            "[2001:db8::1]",
            "10.0.0.1",
        ] {
            assert!(is_host_pattern(good), "{good}");
        }
        for bad in [
            "",
            "admin.example.com:8443",
            "admin.example.com.",
            ".example.com",
            "a..b",
            "api.*.example.com",
            "*",
            "*.",
            "exa mple.com",
            "[::1]:80",
            "[nothost]",
            "example.com/path",
        ] {
            assert!(!is_host_pattern(bad), "{bad}");
        }
        let e = first_error(
            r#"{"rules":[{"name":"admin","match":{"host":"admin.example.com:8443"},"action":"deny"}]}"#,
        );
        assert!(e.starts_with("rules[0].match.host: "), "{e}");
        assert!(e.contains("without port"), "{e}");
    }

    #[test]
    fn a_key_id_with_a_slash_does_not_share_a_rule_bucket() {
        // Key "metered/b" has a limit of its own; rule "metered" limits key "b".
        // Both buckets once were `keygate/rl/metered/b`.
        let json = format!(
            r#"{{"keys":[{{"id":"metered/b","sha256":"{}","rate_limit":{{"requests_per_second":0.01,"burst":1}}}},
                        {{"id":"b","sha256":"{}"}}],
                "rules":[{{"name":"metered","match":{{"path_prefix":"/metered/"}},"action":"require",
                           "rate_limit":{{"requests_per_second":0.01,"burst":2}}}}]}}"#,
            h("k-slash"),
            h("k-b")
        );
        let p = Policy::from_json(json.as_bytes()).unwrap();
        let host = FakeHost::default();
        let run = |k: &[u8], path: &[u8]| match p.decide(
            &HeaderMap::from_pairs(vec![(b"x-api-key", k), (b":path", path)]),
            &host,
        ) {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => d.code.as_str(),
        };
        assert_eq!(run(b"k-b", b"/metered/1"), "allow");
        assert_eq!(run(b"k-b", b"/metered/2"), "allow");
        assert_eq!(run(b"k-b", b"/metered/3"), "rate_limited");
        // The rule's bucket for "b" is empty; the key "metered/b" still has its token.
        assert_eq!(run(b"k-slash", b"/other"), "allow");
        assert_eq!(run(b"k-slash", b"/other"), "rate_limited");
    }

    #[test]
    fn filters_with_other_plugin_names_keep_their_own_buckets() {
        // Two filters in one VM (one counter store), each listing key "k"
        // with a burst of 2: apart by plugin name, together under one name.
        let json = format!(
            r#"{{"keys":[{{"id":"k","sha256":"{}","rate_limit":{{"requests_per_second":0.01,"burst":2}}}}]}}"#,
            h("k-scoped")
        );
        let scoped = |name: &str| {
            let mut p = Policy::from_json(json.as_bytes()).unwrap();
            p.scope_buckets(name);
            p
        };
        let (public, partner, public_again) =
            (scoped("public"), scoped("partner"), scoped("public"));
        let host = FakeHost::default();
        let run = |p: &Policy| match p.decide(
            &HeaderMap::from_pairs(vec![(b"x-api-key", b"k-scoped"), (b":path", b"/")]),
            &host,
        ) {
            Decision::Allow(_) => "allow",
            Decision::Deny(d) => d.code.as_str(),
        };
        assert_eq!(run(&public), "allow");
        assert_eq!(run(&public), "allow");
        assert_eq!(run(&public), "rate_limited");
        assert_eq!(run(&partner), "allow");
        assert_eq!(run(&partner), "allow");
        assert_eq!(run(&public_again), "rate_limited");
        let key = public.keys().lookup(b"k-scoped").unwrap();
        assert_eq!(
            public.key_bucket(&key).unwrap().as_str(),
            "keygate/rl/public//k"
        );
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

    #[test]
    fn a_policy_rebuilt_from_its_shared_parts_is_the_same() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../envoy/profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let (policy, rest) = Policy::from_json_shareable(&bytes).unwrap();
            assert!(!String::from_utf8_lossy(&rest).contains("sha256"));
            let keys = KeyStore::from_bytes(policy.keys().fixed().as_bytes().to_vec()).unwrap();
            let rebuilt = Policy::from_parts(&rest, Arc::new(keys)).unwrap();
            assert_eq!(format!("{policy:?}"), format!("{rebuilt:?}"), "{path:?}");
            seen += 1;
        }
        assert!(seen >= 4);
    }
}
