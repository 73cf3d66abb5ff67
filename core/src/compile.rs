//! Configuration → policy: the plugin configuration validated (every
//! problem named by its field path) and compiled into a [`Policy`].

use std::collections::HashSet;
use std::sync::Arc;

use crate::attribute::Attribute;
use crate::config::{AttachmentConfig, Config, KeyChecksum, RuleAction, RuleConfig, SourceConfig};
use crate::control::ControlPlane;
use crate::credential::{Extractor, Source};
use crate::error::{err, parse_json, ConfigError};
use crate::headers::same_header;
use crate::keylist::{is_word, CompiledKeys};
use crate::keys::{KeySet, KeyStore};
use crate::policy::{ForwardField, Policy};
use crate::ratelimit::{bucket_scope, compile_limits, consumer_scope, BlockedBuckets, Limit};
use crate::rules::{AttachmentCheck, Effect, Matcher, Requirement, Rule};

/// The plugin configuration, its key records compiled while they are parsed.
type PluginConfig = Config<CompiledKeys>;

impl Policy {
    /// Parses and compiles plugin configuration JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, Vec<ConfigError>> {
        let mut cfg: PluginConfig = parse_json(bytes, "configuration")?;
        let keys = std::mem::take(&mut cfg.keys);
        Policy::build(&cfg, keys)
    }

    /// [`Policy::from_json`], also returning the configuration without its
    /// keys as JSON. With the static key store's wire form
    /// (`keys().fixed().as_bytes()`) that is all another VM needs to rebuild
    /// the same policy with [`Policy::from_parts`], without parsing the keys.
    pub fn from_json_shareable(bytes: &[u8]) -> Result<(Policy, Vec<u8>), Vec<ConfigError>> {
        let mut cfg: PluginConfig = parse_json(bytes, "configuration")?;
        let keys = std::mem::take(&mut cfg.keys);
        let policy = Policy::build(&cfg, keys)?;
        // The text as written with `[]` for the key records: serializing the
        // parsed configuration again would put serde's serializers (about
        // 12 KB) in the module for this alone.
        let rest = crate::json_scan::member_value(bytes, "keys")
            .and_then(|(start, end)| Some([bytes.get(..start)?, b"[]", bytes.get(end..)?].concat()))
            .unwrap_or_else(|| bytes.to_vec());
        Ok((policy, rest))
    }

    /// Rebuilds a policy from the parts [`Policy::from_json_shareable`] returned.
    pub fn from_parts(rest: &[u8], keys: Arc<KeyStore>) -> Result<Policy, Vec<ConfigError>> {
        let cfg: PluginConfig = parse_json(rest, "configuration")?;
        if !cfg.keys.is_empty() {
            return Err(vec![err("keys", "expected a configuration without keys")]);
        }
        Policy::assemble(&cfg, Some(keys), Vec::new())
    }

    /// Validates `cfg` with the key records taken out of it, and builds the indexes.
    fn build(cfg: &PluginConfig, compiled: CompiledKeys) -> Result<Policy, Vec<ConfigError>> {
        let (keys, errors) = compiled.index();
        Policy::assemble(cfg, keys.map(Arc::new), errors)
    }

    /// Validates everything but the key records and puts the policy together.
    fn assemble(
        cfg: &PluginConfig,
        keys: Option<Arc<KeyStore>>,
        mut errors: Vec<ConfigError>,
    ) -> Result<Policy, Vec<ConfigError>> {
        let extractor = compile_sources(
            &cfg.credential_sources,
            "credential_sources",
            cfg,
            &mut errors,
        );

        let identity = backend_header(
            &cfg.identity_header,
            "identity_header",
            "the key id",
            cfg,
            &mut errors,
        );
        let mut forward: Vec<(String, ForwardField)> = Vec::new();
        let key_id = Some(cfg.key_id_header.clone());
        for (field, name, path) in [
            (ForwardField::KeyId, &key_id, "key_id_header"),
            (
                ForwardField::Environment,
                &cfg.forward.environment,
                "forward.environment",
            ),
            (ForwardField::Scopes, &cfg.forward.scopes, "forward.scopes"),
        ] {
            let Some(name) = name else { continue };
            let header = backend_header(name, path, "a key field", cfg, &mut errors);
            let taken = same_header(header.as_bytes(), identity.as_bytes())
                || forward
                    .iter()
                    .any(|(h, _)| same_header(h.as_bytes(), header.as_bytes()));
            if taken {
                errors.push(err(
                    path,
                    "must differ from identity_header and the other forwarded headers",
                ));
            }
            forward.push((header, field));
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

        let default_limits =
            compile_limits(cfg.rate_limit.as_ref(), &cfg.rate_limits, "", &mut errors);
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
                    forward,
                    strip_credentials: cfg.strip_credentials,
                    www_authenticate,
                    realm: cfg.realm.clone(),
                    max_body_bytes: cfg.max_body_bytes,
                    control_plane,
                    default_limits,
                    list_version: None,
                    bucket_scope: bucket_scope(""),
                    consumer_scope: consumer_scope(&bucket_scope("")),
                    mode: cfg.mode,
                    forward_with: cfg.forward_with,
                    blocked: BlockedBuckets::default(),
                })
            }
            _ => Err(errors),
        }
    }
}

/// Checks a header keygate sets for the backend (the identity, a forwarded
/// key field) at `field`; returns it lowercased. Client copies of it are
/// removed in every spelling (`_` for `-`), so a credential header spelled
/// alike would go too.
fn backend_header(
    name: &str,
    field: &str,
    carries: &str,
    cfg: &PluginConfig,
    errors: &mut Vec<ConfigError>,
) -> String {
    let header = name.to_ascii_lowercase();
    if !is_header_name(&header) {
        errors.push(err(field, format!("{name:?} is not a valid header name")));
    }
    if let Some(why) = managed_header(&header) {
        errors.push(err(
            field,
            format!("{name:?} cannot carry {carries}: {why}"),
        ));
    }
    let credential_header = |sources: &[SourceConfig]| {
        sources.iter().any(|s| {
            matches!(s, SourceConfig::Header { name } if same_header(name.as_bytes(), header.as_bytes()))
        })
    };
    if credential_header(&cfg.credential_sources)
        || cfg.rules.iter().any(|r| {
            r.credential_sources
                .as_deref()
                .is_some_and(credential_header)
        })
        || same_header(header.as_bytes(), b"authorization")
    {
        errors.push(err(
            field,
            "must differ from every credential header, also when spelled with '_' for '-'",
        ));
    }
    header
}

fn compile_sources(
    sources: &[SourceConfig],
    path: &str,
    cfg: &PluginConfig,
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
            .with_checksum(cfg.key_checksum == KeyChecksum::Crc32)
    })
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

fn compile_rules(cfg: &PluginConfig, errors: &mut Vec<ConfigError>) -> Vec<Rule> {
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
                        "public and deny rules take no scopes, environments, attachment(s), credential_sources or rate_limit",
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
            mode: r.mode,
        });
    }
    rules
}

fn has_requirements(r: &RuleConfig) -> bool {
    !r.scopes_any_of.is_empty()
        || !r.scopes_all_of.is_empty()
        || !r.environments.is_empty()
        || r.attachment.is_some()
        || !r.attachments.is_empty()
        || r.credential_sources.is_some()
        || r.rate_limit.is_some()
}

fn compile_requirement(
    r: &RuleConfig,
    name: &str,
    field: &str,
    cfg: &PluginConfig,
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
    if r.attachment.is_some() && !r.attachments.is_empty() {
        errors.push(err(
            format!("{field}.attachments"),
            "give attachment or attachments, not both",
        ));
    }
    let mut attachments = Vec::with_capacity(r.attachments.len() + 1);
    if let Some(a) = &r.attachment {
        attachments.push(compile_attachment(
            a,
            &format!("{field}.attachment"),
            errors,
        ));
    }
    for (j, a) in r.attachments.iter().enumerate() {
        attachments.push(compile_attachment(
            a,
            &format!("{field}.attachments[{j}]"),
            errors,
        ));
    }
    // Header and query values are checked before the rate limit, body
    // values once the body is in; the order within each stays as written.
    // (A partition rather than a stable sort: no second sort routine in the module.)
    let (mut attachments, from_body): (Vec<_>, Vec<_>) = attachments
        .into_iter()
        .partition(|a| !a.attribute.needs_body());
    attachments.extend(from_body);
    let extractor = r
        .credential_sources
        .as_ref()
        .and_then(|s| compile_sources(s, &format!("{field}.credential_sources"), cfg, errors));
    let limit = r
        .rate_limit
        .as_ref()
        .and_then(|l| Limit::from_config(l, &format!("{field}.rate_limit"), errors))
        .map(|l| (l, name.to_string()));
    Requirement {
        scopes_any_of: r.scopes_any_of.clone(),
        scopes_all_of: r.scopes_all_of.clone(),
        environments: r.environments.clone(),
        attachments,
        extractor,
        limit,
    }
}

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

/// HTTP token characters only (RFC 9110), not a pseudo-header.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One attachment check at `field`, its problems recorded with their paths.
fn compile_attachment(
    a: &AttachmentConfig,
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> AttachmentCheck {
    if !is_word(&a.set) {
        errors.push(err(
            format!("{field}.set"),
            "must be 1-64 visible ASCII characters",
        ));
    }
    let attribute = Attribute::from(&a.from);
    match &attribute {
        Attribute::Header(h) if !is_header_name(&String::from_utf8_lossy(h)) => errors.push(err(
            format!("{field}.from.header"),
            "not a valid header name",
        )),
        Attribute::Query(q) if q.is_empty() => {
            errors.push(err(format!("{field}.from.query"), "must not be empty"))
        }
        Attribute::JsonBody(p) if p.as_str().len() < 2 => {
            errors.push(err(format!("{field}.from.json_body"), "must name a field"))
        }
        Attribute::JsonBody(p)
            if p.as_str()
                .split('~')
                .skip(1)
                .any(|t| !t.starts_with(['0', '1'])) =>
        {
            errors.push(err(
                format!("{field}.from.json_body"),
                "in a JSON pointer, '~' is written ~0 and '/' in a name ~1 (RFC 6901)",
            ))
        }
        _ => {}
    }
    AttachmentCheck {
        set: a.set.clone(),
        attribute,
    }
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
