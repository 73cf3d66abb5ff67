//! Route rules: compiled matchers and the requirements a matching request must meet.

use crate::attribute::Attribute;
use crate::config::{MatchConfig, Mode};
use crate::credential::Extractor;
use crate::ratelimit::Limit;
use crate::request::RequestLine;

/// A compiled matcher.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    host: Option<HostMatch>,
    path: Option<Vec<u8>>,
    path_prefix: Option<Vec<u8>>,
    methods: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum HostMatch {
    Exact(Vec<u8>),
    /// `*.example.com` stored as `.example.com`.
    Suffix(Vec<u8>),
}

impl Matcher {
    /// Compiles a match block.
    pub fn new(m: &MatchConfig) -> Self {
        let host = m.host.as_ref().map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(rest) => HostMatch::Suffix(rest.as_bytes().to_vec()),
                None => HostMatch::Exact(h.into_bytes()),
            }
        });
        Matcher {
            host,
            path: m.path.as_ref().map(|p| p.as_bytes().to_vec()),
            path_prefix: m.path_prefix.as_ref().map(|p| p.as_bytes().to_vec()),
            methods: m
                .methods
                .iter()
                .map(|x| x.to_ascii_uppercase().into_bytes())
                .collect(),
        }
    }

    /// True when every present criterion matches.
    pub fn matches(&self, r: &RequestLine<'_>) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostMatch::Exact(h)) => r.host.eq_ignore_ascii_case(h),
            Some(HostMatch::Suffix(s)) => {
                r.host.len() > s.len() && r.host[r.host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        host_ok
            && self.path.as_ref().is_none_or(|p| r.path == p.as_slice())
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| r.path.starts_with(p))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == r.method))
    }
}

/// An attachment requirement.
#[derive(Debug, Clone)]
pub struct AttachmentCheck {
    /// The key's attachment set to look in.
    pub set: String,
    /// Where the value comes from.
    pub attribute: Attribute,
}

/// What a `require` rule asks of the key, compiled.
#[derive(Debug, Clone, Default)]
pub struct Requirement {
    /// At least one of these (if non-empty).
    pub scopes_any_of: Vec<String>,
    /// All of these.
    pub scopes_all_of: Vec<String>,
    /// Key environment in this list (if non-empty).
    pub environments: Vec<String>,
    /// Attachment checks, all of which must hold: those read from headers
    /// and the query first, then those read from the body.
    pub attachments: Vec<AttachmentCheck>,
    /// Credential sources overriding the top-level ones.
    pub extractor: Option<Extractor>,
    /// Limit overriding the key's, with the rule's name for its bucket.
    pub limit: Option<(Limit, String)>,
}

impl Requirement {
    /// True when `scopes` and `environment` satisfy the scope and environment checks.
    pub fn permits(&self, scopes: &[String], environment: Option<&str>) -> bool {
        let has = |s: &String| scopes.iter().any(|k| k == s);
        (self.scopes_any_of.is_empty() || self.scopes_any_of.iter().any(has))
            && self.scopes_all_of.iter().all(has)
            && (self.environments.is_empty()
                || environment.is_some_and(|e| self.environments.iter().any(|x| x == e)))
    }
}

/// A rule's effect.
#[derive(Debug, Clone)]
pub enum Effect {
    /// No key needed.
    Public,
    /// 403 `route_not_allowed`.
    Deny,
    /// A key meeting the requirement.
    Require(Box<Requirement>),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name for logs and bucket keys.
    pub name: String,
    /// When it applies.
    pub matcher: Matcher,
    /// What it does.
    pub effect: Effect,
    /// Mode of its refusals, if the rule sets one.
    pub mode: Option<Mode>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::line;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn matcher_criteria() {
        let m = Matcher::new(&MatchConfig {
            host: Some("*.example.com".into()),
            path: None,
            path_prefix: Some("/api/".into()),
            methods: vec!["post".into()],
        });
        let (_, ok) = line(&[
            (":method", "POST"),
            (":path", "/api/v1?q"),
            (":authority", "a.example.com"),
        ]);
        assert!(m.matches(&ok));
        let (_, bad_host) = line(&[
            (":method", "POST"),
            (":path", "/api/v1"),
            (":authority", "example.com"),
        ]);
        assert!(!m.matches(&bad_host));
        let (_, bad_method) = line(&[
            (":method", "GET"),
            (":path", "/api/v1"),
            (":authority", "a.example.com"),
        ]);
        assert!(!m.matches(&bad_method));
        let exact = Matcher::new(&MatchConfig {
            path: Some("/api/v1/ping".into()),
            ..Default::default()
        });
        let (_, p) = line(&[(":path", "/api/v1/ping?x=1")]);
        assert!(exact.matches(&p));
        let (_, p) = line(&[(":path", "/api/v1/ping/x")]);
        assert!(!exact.matches(&p));
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn requirement_scopes_and_environment() {
        let r = Requirement {
            scopes_any_of: vec!["read".into(), "ingest".into()],
            scopes_all_of: vec!["base".into()],
            environments: vec!["live".into()],
            ..Default::default()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(r.permits(&s(&["base", "read"]), Some("live")));
        assert!(!r.permits(&s(&["read"]), Some("live")));
        assert!(!r.permits(&s(&["base"]), Some("live")));
        assert!(!r.permits(&s(&["base", "ingest"]), Some("test")));
        assert!(!r.permits(&s(&["base", "ingest"]), None));
    }
}
