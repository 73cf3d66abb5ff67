//! The proxy-wasm contexts: configuration in the root, one decision per request.

use std::rc::Rc;

use keygate_core::headers::{self, HeaderMap};
use keygate_core::policy::{Decision, Env};
use keygate_core::ratelimit::ensure_bucket;
use keygate_core::{reply, Denial, DenyCode, Policy};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::abi::{self, Level};
use crate::metrics::Metrics;
use crate::shared::SharedCounters;

/// Name of the filter-state value carrying the denial, for access logs
/// (`%FILTER_STATE(wasm.keygate_denial:PLAIN)%`).
const FILTER_STATE_DENIAL: &str = "keygate_denial";

/// Per-VM root: owns the compiled policy and the metric ids.
#[derive(Default)]
pub struct KeygateRoot {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
}

impl Context for KeygateRoot {}

impl RootContext for KeygateRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match abi::plugin_configuration() {
            Ok(b) => b,
            Err(s) => {
                abi::log(
                    Level::Error,
                    &format!("cannot read plugin configuration (status {s})"),
                );
                return false;
            }
        };
        let policy = match Policy::from_json(&bytes) {
            Ok(p) => p,
            Err(errors) => {
                for e in &errors {
                    abi::log(Level::Error, &format!("invalid configuration: {e}"));
                }
                return false;
            }
        };
        for key in policy.keys().records().iter().filter(|k| k.limit.is_some()) {
            if ensure_bucket(&SharedCounters, &key.bucket_key).is_err() {
                abi::log(
                    Level::Warn,
                    &format!("cannot create rate-limit bucket for key {:?}", key.id),
                );
            }
        }
        // Defining a metric again returns the same id, so a reload is harmless.
        self.metrics = Rc::new(Metrics::define());
        abi::log(
            Level::Info,
            &format!("configuration loaded: {} keys", policy.keys().len()),
        );
        self.policy = Some(Rc::new(policy));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateRequest {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request's context.
pub struct KeygateRequest {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
}

impl Context for KeygateRequest {}

impl HttpContext for KeygateRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            // Unreachable in practice: Envoy never runs a plugin whose on_configure failed.
            return self.deny(
                None,
                &Denial::new(DenyCode::InvalidApiKey, "no configuration loaded"),
            );
        };
        let raw = match abi::request_header_pairs() {
            Ok(raw) => raw,
            Err(_) => {
                return self.deny(
                    Some(&policy),
                    &Denial::new(DenyCode::MalformedApiKey, "header map unreadable"),
                )
            }
        };
        let Some(map) = HeaderMap::decode(&raw) else {
            return self.deny(
                Some(&policy),
                &Denial::new(DenyCode::MalformedApiKey, "header map undecodable"),
            );
        };
        let Some(now) = abi::monotonic_ns() else {
            return self.deny(
                Some(&policy),
                &Denial::new(DenyCode::RateLimited, "monotonic clock unavailable"),
            );
        };
        let env = Env {
            monotonic_ns: now,
            counters: &SharedCounters,
        };
        match policy.decide(&map, &env) {
            Decision::Allow(allowed) => {
                let edits = policy.forward_edits(&map, &allowed);
                for name in edits
                    .remove
                    .iter()
                    .copied()
                    .chain(edits.strip.iter().copied())
                {
                    let _ = abi::remove_request_header(name);
                }
                let (name, id) = edits.identity;
                if abi::replace_request_header(name.as_bytes(), id.as_bytes()).is_err() {
                    // Forwarding without a trustworthy identity is worse than refusing.
                    return self.deny(
                        Some(&policy),
                        &Denial::new(DenyCode::InvalidApiKey, "identity header not set"),
                    );
                }
                self.metrics.allowed();
                Action::Continue
            }
            Decision::Deny(denial) => {
                if abi::log_enabled(Level::Debug) {
                    let shown = policy.describe_key(&map);
                    abi::log(
                        Level::Debug,
                        &format!(
                            "denied {} ({}) key={}",
                            denial.code.as_str(),
                            denial.reason,
                            shown
                        ),
                    );
                }
                self.deny(Some(&policy), &denial)
            }
        }
    }
}

impl KeygateRequest {
    /// Sends the local reply for `denial`; nothing reaches the backend.
    fn deny(&self, policy: Option<&Policy>, denial: &Denial) -> Action {
        self.metrics.denied(denial.code);
        let state = format!("{} ({})", denial.code.as_str(), denial.reason);
        let _ = abi::set_filter_state(FILTER_STATE_DENIAL, state.as_bytes());
        let challenge = policy.map_or("Bearer realm=\"keygate\"", |p| p.www_authenticate());
        let r = reply::render(denial, challenge);
        let pairs: Vec<(&[u8], &[u8])> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        let details = format!("keygate_{}", denial.code.as_str());
        if abi::send_local_response(
            u32::from(r.status),
            &details,
            r.body.as_bytes(),
            &headers::encode(&pairs),
        )
        .is_err()
        {
            abi::log(Level::Error, "could not send the local reply");
        }
        Action::Pause
    }
}
