//! The decision: a compiled [`Policy`] applied to one request's headers
//! (and, when a rule reads it, its body).

use crate::attribute::AttrValue;
use crate::config::{DefaultAction, ForwardWith, Mode, StalePolicy};
use crate::control::ControlPlane;
use crate::credential::{Credential, Extractor};
use crate::denial::{Denial, DenyCode, KeyLabel, LimitName, Masked, RateInfo};
use crate::error::{err, ConfigError};
use crate::headers::{same_header, HeaderMap};
use crate::host::Host;
use crate::keylist::CompiledKeyList;
use crate::keys::{KeyMeta, KeyRef, KeySet};
use crate::ratelimit::{self, BlockedBuckets, BucketName, NamedLimit};
use crate::request::{is_grpc, RequestLine};
use crate::rules::{AttachmentCheck, Effect, Requirement, Rule};

mod body;
mod edits;
mod limit;

pub use edits::{Edits, ForwardField, RouteHeaders, IDENTITY_FILTER_STATE};

/// The validated, indexed form of a plugin configuration (built by the
/// `compile` module).
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) extractor: Extractor,
    pub(crate) keys: KeySet,
    pub(crate) rules: Vec<Rule>,
    pub(crate) default_action: DefaultAction,
    pub(crate) identity_header: String,
    /// Headers carrying key fields to the backend (lowercase), and which.
    pub(crate) forward: Vec<(String, ForwardField)>,
    pub(crate) strip_credentials: bool,
    pub(crate) www_authenticate: String,
    pub(crate) realm: String,
    pub(crate) max_body_bytes: usize,
    pub(crate) control_plane: Option<ControlPlane>,
    pub(crate) default_limits: Vec<NamedLimit>,
    /// Control plane configured, no list yet, no static keys: 503.
    pub(crate) awaiting_list: bool,
    /// Version of the merged control-plane list, if any.
    pub(crate) list_version: Option<u64>,
    /// Start of this filter's bucket names, from [`ratelimit::bucket_scope`].
    pub(crate) bucket_scope: String,
    /// Start of this filter's consumer bucket names.
    pub(crate) consumer_scope: String,
    /// Buckets this VM found blocked: their 429s skip the shared-data read.
    pub(crate) blocked: BlockedBuckets,
    /// Top-level mode of refusals.
    pub(crate) mode: Mode,
    /// Who puts the identity on the wire: keygate, or the Envoy route.
    pub(crate) forward_with: ForwardWith,
}

/// What to do with a request: everything the filter needs to act on it.
/// It lives on the stack for one request; boxing the larger variant would
/// allocate on every allowed request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Decision<'p, 'h> {
    /// Forward it after [`Allowed::edits`]; if [`Allowed::body_check`] is
    /// set, hold it until [`Policy::decide_body`].
    Allow(Allowed<'p, 'h>),
    /// Answer locally with the reply for [`Denied::denial`].
    Deny(Denied<'p>),
}

/// An admitted request (so far, if a body check remains).
#[derive(Debug, Clone)]
pub struct Allowed<'p, 'h> {
    /// The matched key; `None` on a public route.
    pub key: Option<KeyRef<'p>>,
    /// Bucket figures after this request, if the key is limited.
    pub rate: Option<RateInfo>,
    /// The header edits to make before forwarding.
    pub edits: Edits<'p, 'h>,
    /// A JSON body attachment check still to pass, for [`Policy::decide_body`].
    pub body_check: Option<Hold>,
    /// In shadow mode, the refusal enforce mode would have answered with.
    pub shadow: Option<Denied<'p>>,
}

/// A refused request: the denial to answer with, and the key it is about
/// for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied<'p> {
    /// Code, reason and figures for the reply.
    pub denial: Denial,
    /// The key as a log line may name it.
    pub key: KeyLabel<'p>,
}

/// A refusal before its mode applies, with what shadow mode needs to
/// forward the request anyway.
struct Refusal<'p, 'h> {
    denial: Denial,
    key: KeyLabel<'p>,
    /// The key when it is listed, enabled and unexpired: only such a key
    /// earns an identity header in shadow mode.
    valid_key: Option<KeyRef<'p>>,
    /// The key record's own mode.
    key_mode: Option<Mode>,
    /// The credential found, if any, and the sources that applied.
    credential: Option<Credential<'h>>,
    extractor: &'p Extractor,
}

impl<'p> Refusal<'p, '_> {
    /// A refusal before any key was read.
    fn anonymous(denial: Denial, extractor: &'p Extractor) -> Self {
        Refusal {
            denial,
            key: KeyLabel::None,
            valid_key: None,
            key_mode: None,
            credential: None,
            extractor,
        }
    }
}

/// A request held for its body: which key and which rule, by position, so
/// the filter can keep it across callbacks without borrowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    record: u32,
    rule: u32,
    /// The request is gRPC (its refusal is a gRPC status).
    grpc: bool,
}

impl Policy {
    /// The key list.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// With `"forward_with": "filter_state"`, the header configuration the
    /// Envoy routes behind this filter need; `None` in the default mode.
    pub fn route_headers(&self) -> Option<RouteHeaders> {
        if self.forward_with != ForwardWith::FilterState {
            return None;
        }
        let mut remove: Vec<String> = Vec::new();
        let mut push = |name: &[u8]| {
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            if !remove.contains(&name) {
                remove.push(name);
            }
        };
        if self.strip_credentials {
            let every = std::iter::once(&self.extractor).chain(self.rules.iter().filter_map(|r| {
                match &r.effect {
                    Effect::Require(req) => req.extractor.as_ref(),
                    Effect::Public | Effect::Deny => None,
                }
            }));
            for extractor in every {
                extractor
                    .carrier_names(&extractor.every_carrier())
                    .for_each(&mut push);
            }
        }
        push(self.identity_header.as_bytes());
        for (header, _) in &self.forward {
            push(header.as_bytes());
        }
        let mut add = vec![(self.identity_header.clone(), IDENTITY_FILTER_STATE)];
        add.extend(
            self.forward
                .iter()
                .map(|(h, f)| (h.clone(), f.filter_state_name())),
        );
        Some(RouteHeaders { remove, add })
    }

    /// The effective limits of a key: its own, else the default ones.
    pub fn limit_of<'p>(&'p self, key: &KeyRef<'p>) -> &'p [NamedLimit] {
        match key.limits() {
            [] => &self.default_limits,
            own => own,
        }
    }

    /// The default limits (top-level `rate_limit` or `rate_limits`), for
    /// keys without their own.
    pub fn default_limits(&self) -> &[NamedLimit] {
        &self.default_limits
    }

    /// Names this filter's buckets after its plugin name (see
    /// [`ratelimit::bucket_scope`]), so that filters sharing a VM count apart.
    pub fn scope_buckets(&mut self, plugin_name: &str) {
        self.bucket_scope = ratelimit::bucket_scope(plugin_name);
        self.consumer_scope = ratelimit::consumer_scope(&self.bucket_scope);
    }

    /// The start of this filter's bucket names.
    pub fn bucket_scope(&self) -> &str {
        &self.bucket_scope
    }

    /// The bucket of a key's own limit.
    pub fn key_bucket(&self, key: &KeyRef<'_>) -> Option<BucketName> {
        let (scope, who) = self.counted_as(key);
        BucketName::new(scope, "", who)
    }

    /// Whose buckets a key's requests count in: its consumer's, shared by
    /// all of the consumer's keys, else its own.
    fn counted_as<'k>(&'k self, key: &KeyRef<'k>) -> (&'k str, &'k str) {
        match key.meta().consumer.as_deref() {
            Some(consumer) => (&self.consumer_scope, consumer),
            None => (&self.bucket_scope, key.id()),
        }
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
                    rate: None,
                    edits: self.edits(headers, None, None),
                    body_check: None,
                    shadow: None,
                })
            }
            Some((i, rule)) => match &rule.effect {
                Effect::Require(req) => (Some(&**req), Some(i)),
                _ => {
                    let denial = Denial::new(DenyCode::RouteNotAllowed, "rule denies this route");
                    let refusal = Refusal::anonymous(denial, &self.extractor);
                    return self.refuse(headers, refusal, rule.mode);
                }
            },
            None if self.default_action == DefaultAction::Deny => {
                let denial = Denial::new(DenyCode::RouteNotAllowed, "no rule matches this route");
                return self.refuse(headers, Refusal::anonymous(denial, &self.extractor), None);
            }
            None => (None, None),
        };
        let rule_mode = rule_index.and_then(|i| self.rules.get(i as usize)?.mode);
        match self.authorize(headers, &line, requirement, rule_index, host) {
            Ok(a) => Decision::Allow(a),
            // The challenge names the sources that applied on this route.
            Err(r) => {
                let bearer = requirement
                    .and_then(|r| r.extractor.as_ref())
                    .map(Extractor::accepts_bearer);
                let denial = Denial { bearer, ..r.denial };
                self.refuse(headers, Refusal { denial, ..r }, rule_mode)
            }
        }
    }

    /// Applies the mode of a refusal: the key's, else the rule's, else the
    /// policy's. In shadow mode the request goes on, carrying the refusal;
    /// it gets an identity only from a valid key, and loses the credential
    /// (every configured source present when none was read) and client copies of
    /// the identity header as an allowed request does.
    fn refuse<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        r: Refusal<'p, 'h>,
        rule_mode: Option<Mode>,
    ) -> Decision<'p, 'h> {
        let denied = Denied {
            denial: r.denial,
            key: r.key,
        };
        match r.key_mode.or(rule_mode).unwrap_or(self.mode) {
            Mode::Enforce => Decision::Deny(Denied {
                denial: Denial {
                    grpc: is_grpc(headers),
                    ..denied.denial
                },
                ..denied
            }),
            Mode::Shadow => {
                let credential = r
                    .credential
                    .unwrap_or_else(|| r.extractor.carriers_in(headers));
                Decision::Allow(Allowed {
                    key: r.valid_key,
                    rate: None,
                    edits: self.edits(headers, r.valid_key, Some((credential, r.extractor))),
                    body_check: None,
                    shadow: Some(denied),
                })
            }
        }
    }

    // The refusal stays on the stack: boxing it would allocate on every
    // refused request, and the allowed side is as large.
    #[allow(clippy::result_large_err)]
    fn authorize<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        line: &RequestLine<'h>,
        requirement: Option<&'p Requirement>,
        rule_index: Option<u32>,
        host: &dyn Host,
    ) -> Result<Allowed<'p, 'h>, Refusal<'p, 'h>> {
        let extractor = requirement
            .and_then(|r| r.extractor.as_ref())
            .unwrap_or(&self.extractor);
        if self.awaiting_list {
            return Err(Refusal::anonymous(
                Denial::new(DenyCode::KeyListUnavailable, "no key list loaded yet"),
                extractor,
            ));
        }
        if host.key_list_stale()
            && self
                .control_plane
                .as_ref()
                .is_some_and(|c| c.stale_policy == StalePolicy::FailClosed)
        {
            return Err(Refusal::anonymous(
                Denial::new(
                    DenyCode::KeyListUnavailable,
                    "key list older than max_staleness",
                ),
                extractor,
            ));
        }
        let credential = extractor
            .extract(headers)
            .map_err(|d| Refusal::anonymous(d, extractor))?;
        let Some((record, key)) = self.keys.get(&crate::keys::digest(credential.key)) else {
            return Err(Refusal {
                key: KeyLabel::Masked(Masked::of(credential.key)),
                credential: Some(credential),
                ..Refusal::anonymous(
                    Denial::new(DenyCode::InvalidApiKey, "unknown key"),
                    extractor,
                )
            });
        };
        match self.admit(headers, line, requirement, rule_index, host, record, key) {
            Ok((rate, body_check)) => Ok(Allowed {
                key: Some(key),
                rate,
                edits: self.edits(headers, Some(key), Some((credential, extractor))),
                body_check,
                shadow: None,
            }),
            Err(denial) => Err(Refusal {
                // A revoked or expired key is not valid, whatever else is refused.
                valid_key: (!matches!(
                    denial.code,
                    DenyCode::InvalidApiKey | DenyCode::ExpiredApiKey
                ))
                .then_some(key),
                denial,
                key: KeyLabel::Id(key.id()),
                key_mode: key.meta().mode,
                credential: Some(credential),
                extractor,
            }),
        }
    }

    /// The checks on a listed key: state, address, scope, attachment and
    /// rate limit. Returns the bucket figures and any body check left.
    #[allow(clippy::too_many_arguments)]
    fn admit<'p>(
        &'p self,
        headers: &HeaderMap<'_>,
        line: &RequestLine<'_>,
        requirement: Option<&'p Requirement>,
        rule_index: Option<u32>,
        host: &dyn Host,
        record: u32,
        key: KeyRef<'p>,
    ) -> Result<(Option<RateInfo>, Option<Hold>), Denial> {
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
            // Header and query checks come first (compile sorts them so);
            // body checks wait for the body.
            for AttachmentCheck { set, attribute } in &req.attachments {
                if attribute.needs_body() {
                    body_check = Some(Hold {
                        record,
                        rule,
                        grpc: is_grpc(headers),
                    });
                    break;
                }
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
        // The rate limit is taken after every header-level check and before
        // any body is buffered, so a flood is refused without buffering.
        let who = self.counted_as(&key);
        let rate = match (
            requirement.and_then(|r| r.limit.as_ref()),
            self.limit_of(&key),
        ) {
            (Some((limit, rule)), _) => self.take(host, who, rule, &LimitName::DEFAULT, limit)?,
            (None, []) => None,
            (None, [one]) => self.take(host, who, "", &one.name, &one.limit)?,
            (None, several) => self.take_all(host, who, several)?,
        };
        Ok((rate, body_check))
    }

    /// The header edits for an allowed request: strip the credential (if
    /// configured) and every client copy of the identity header, including
    /// case and underscore variants, then set the identity of `key` (none on
    /// public routes).
    fn edits<'p, 'h>(
        &'p self,
        headers: &HeaderMap<'h>,
        key: Option<KeyRef<'p>>,
        credential: Option<(Credential<'h>, &'p Extractor)>,
    ) -> Edits<'p, 'h> {
        // A consumer's keys show the backend one identity: the consumer.
        let identity = key.map(|k| {
            let who = k.meta().consumer.as_deref().unwrap_or(k.id());
            (self.identity_header.as_str(), who)
        });
        let mut remove: Vec<&'h [u8]> = Vec::new();
        let to_filter_state = self.forward_with == ForwardWith::FilterState;
        for (name, _) in headers.iter() {
            // With an identity to set as a header, the exact name is replaced,
            // not removed. Through filter state keygate removes client copies
            // itself too (only when present, so an honest request makes no
            // edit), and the identity stays unspoofable even on a route that
            // forgets `request_headers_to_remove`.
            let exact = name == self.identity_header.as_bytes() && !to_filter_state;
            let spoofed = ((identity.is_none() || !exact)
                && same_header(name, self.identity_header.as_bytes()))
                || self
                    .forward
                    .iter()
                    .any(|(h, _)| same_header(name, h.as_bytes()));
            if spoofed && !remove.contains(&name) {
                remove.push(name);
            }
        }
        // Through filter state the route removes the credential headers.
        let strip = credential.filter(|_| self.strip_credentials && !to_filter_state);
        let forward = key
            .filter(|_| !self.forward.is_empty())
            .map(|k| (self.forward.as_slice(), k));
        Edits {
            to_filter_state,
            remove,
            strip,
            identity,
            forward,
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

#[cfg(test)]
mod tests;
