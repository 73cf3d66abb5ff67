//! The proxy-wasm contexts: configuration in the root, one decision per request.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;

use keygate_core::denial::KeyLabel;
use keygate_core::headers::HeaderMap;
use keygate_core::host::parse_source_address;
use keygate_core::policy::{Decision, Denied, Edits, Hold, IDENTITY_FILTER_STATE};
use keygate_core::ratelimit::{ensure_bucket, CounterStore};
use keygate_core::reply::{EncodedReply, ReplyBook};
use keygate_core::{Denial, DenyCode, Host, Policy};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::abi::{self, Level};
use crate::config_cache;
use crate::control::{PollMetrics, Poller, TickAction};
use crate::metrics::{Metrics, FLUSH_PERIOD_MS};
use crate::shared::SharedCounters;
use crate::usage::Reporting;
use keygate_core::keys::KeyRef;
use keygate_core::usage::UsageTally;

/// Name of the filter-state value carrying the denial, for access logs
/// (`%FILTER_STATE(wasm.keygate_denial:PLAIN)%`).
const FILTER_STATE_DENIAL: &str = "keygate_denial";
/// Filter state naming the key a refusal is about: its id, or its masked
/// form when it is not in the list (`%FILTER_STATE(wasm.keygate_key:PLAIN)%`).
const FILTER_STATE_KEY: &str = "keygate_key";
/// Filter state naming the refusal shadow mode let through, as
/// `<code> (<reason>)` (`%FILTER_STATE(wasm.keygate_shadow:PLAIN)%`).
const FILTER_STATE_SHADOW: &str = "keygate_shadow";

/// Buckets are created at configure time for lists up to this size; larger
/// lists create them on first use.
const PRECREATE_BUCKETS_UP_TO: usize = 10_000;

/// Per-VM root: owns the compiled policy, the metric ids and, with a control
/// plane, the poller.
#[derive(Default)]
pub struct KeygateRoot {
    /// The configured policy (static keys only).
    base: Option<Rc<Policy>>,
    /// The policy requests use: `base` merged with the control-plane list.
    policy: Option<Rc<Policy>>,
    /// Counter ids and the tally of outcomes not yet handed to Envoy.
    metrics: Rc<Metrics>,
    /// Every local reply of the configuration, encoded once.
    replies: Option<Rc<ReplyBook>>,
    poller: Option<Poller>,
    poll_metrics: PollMetrics,
    /// The control-plane list is older than `max_staleness`.
    stale: Rc<Cell<bool>>,
    /// Per-key usage counting and reporting, when configured.
    usage: Option<Reporting>,
}

impl KeygateRoot {
    fn switch(&mut self, action: TickAction) {
        if let TickAction::Switch(p) = action {
            self.policy = Some(Rc::new(*p));
        }
    }
}

impl Drop for KeygateRoot {
    /// The plugin or the VM is going away (the SDK drops the root in
    /// `on_delete`): hand over what was counted. Flushing here rather than in
    /// `on_done` lets the module leave `proxy_on_done` unexported, which
    /// spares every request one call into the VM.
    fn drop(&mut self) {
        self.metrics.flush();
        if let Some(usage) = &self.usage {
            usage.flush();
        }
    }
}

impl Context for KeygateRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let (Some(base), Some(poller)) = (self.base.clone(), self.poller.as_mut()) else {
            return;
        };
        if let Some(cp) = base.control_plane() {
            if let Some(usage) = self.usage.as_mut() {
                usage.on_response(token, num_headers, cp);
            }
            let action =
                poller.on_response(token, num_headers, body_size, &base, cp, &self.poll_metrics);
            self.switch(action);
        }
    }
}

impl RootContext for KeygateRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        abi::refresh_log_level();
        let started = abi::monotonic_ns().unwrap_or(0);
        let (mut policy, origin) = match config_cache::load(size) {
            Ok(p) => p,
            Err(errors) => {
                for e in &errors {
                    abi::log(Level::Error, &format!("invalid configuration: {e}"));
                }
                return false;
            }
        };
        // Shared data is per vm_id: the plugin's name keeps this filter's
        // buckets apart from other keygate filters in the VM.
        let plugin_name = abi::property(b"plugin_name\0")
            .ok()
            .flatten()
            .and_then(|raw| String::from_utf8(raw).ok())
            .unwrap_or_default();
        policy.scope_buckets(&plugin_name);
        if policy.keys().len() <= PRECREATE_BUCKETS_UP_TO {
            for key in policy
                .keys()
                .iter()
                .filter(|k| !policy.limit_of(k).is_empty())
            {
                let bucket = policy.key_bucket(&key);
                let created =
                    bucket.is_some_and(|b| ensure_bucket(&SharedCounters, b.as_str()).is_ok());
                if !created {
                    abi::log(
                        Level::Warn,
                        &format!("cannot create the bucket of key {:?}", key.id()),
                    );
                }
            }
        }
        // `abi` defines each metric once per VM and hands back its id after.
        self.metrics.flush();
        self.metrics = Rc::new(self.metrics.redefine());
        abi::log(
            Level::Info,
            &format!(
                "configuration loaded: {} keys, {} in {} ms, buckets under {}",
                policy.keys().len(),
                match origin {
                    config_cache::Origin::Adopted => "adopted from another VM",
                    config_cache::Origin::Compiled => "compiled",
                },
                abi::monotonic_ns().unwrap_or(0).saturating_sub(started) / 1_000_000,
                policy.bucket_scope()
            ),
        );
        let base = Rc::new(policy);
        // The challenge depends on the configured sources and realm only, which
        // a control-plane list never changes.
        self.replies = Some(Rc::new(ReplyBook::new(|b| base.challenge_for(b))));
        self.base = Some(base.clone());
        self.policy = Some(base.clone());
        if let Some(cp) = base.control_plane() {
            self.poll_metrics = PollMetrics::define();
            let mut poller = self
                .poller
                .take()
                .filter(|p| p.polls(cp))
                .unwrap_or_else(|| Poller::new(cp));
            let action = poller.sync(&base, &self.poll_metrics);
            self.switch(action);
            self.poller = Some(poller);
        } else {
            self.poller = None;
        }
        let previous = self.usage.take();
        self.usage = match base.control_plane().filter(|cp| cp.usage.is_some()) {
            Some(cp) => Some(Reporting::new(cp, previous)),
            None => {
                if let Some(p) = previous {
                    p.flush();
                }
                None
            }
        };
        // Ticks flush the counters, re-read the log level and, with a control
        // plane, drive the poller (whose period is at most the flush period).
        let tick_ms = base.control_plane().map_or(FLUSH_PERIOD_MS, |cp| {
            u32::try_from(Poller::tick_period(cp).as_millis()).unwrap_or(FLUSH_PERIOD_MS)
        });
        if abi::set_tick_period_ms(tick_ms).is_err() {
            abi::log(
                Level::Error,
                "cannot set the tick period: counters and polling stop",
            );
        }
        true
    }

    fn on_tick(&mut self) {
        self.metrics.flush();
        abi::refresh_log_level();
        let (Some(base), Some(mut poller)) = (self.base.clone(), self.poller.take()) else {
            return;
        };
        if let Some(cp) = base.control_plane() {
            let (action, stale) = poller.tick(&base, cp, &self.poll_metrics);
            self.stale.set(stale);
            self.switch(action);
            if let Some(usage) = self.usage.as_mut() {
                usage.tick(cp, poller.holds_lease());
            }
        }
        self.poller = Some(poller);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateRequest {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            replies: self.replies.clone(),
            hold: None,
            stale: self.stale.get(),
            usage: self.usage.as_ref().map(Reporting::tally),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The host as the decision sees it: each call is made only if the policy asks.
struct RequestHost {
    stale: bool,
}

impl Host for RequestHost {
    fn monotonic_ns(&self) -> Option<u64> {
        abi::monotonic_ns()
    }
    fn unix_secs(&self) -> Option<i64> {
        abi::unix_ns().map(|ns| (ns / 1_000_000_000) as i64)
    }
    fn source_ip(&self) -> Option<IpAddr> {
        let raw = abi::property(b"source\0address").ok()??;
        parse_source_address(&raw)
    }
    fn counters(&self) -> &dyn CounterStore {
        &SharedCounters
    }
    fn key_list_stale(&self) -> bool {
        self.stale
    }
}

/// One request's context.
pub struct KeygateRequest {
    policy: Option<Rc<Policy>>,
    metrics: Rc<Metrics>,
    replies: Option<Rc<ReplyBook>>,
    /// Set while the request waits for its body.
    hold: Option<Hold>,
    /// The control-plane list was stale when the request started.
    stale: bool,
    /// Where allowed requests are counted per key, when usage is reported.
    usage: Option<Rc<UsageTally>>,
}

impl Context for KeygateRequest {}

impl HttpContext for KeygateRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            // Unreachable in practice: Envoy never runs a plugin whose on_configure failed.
            return self.deny(&Denial::new(
                DenyCode::KeyListUnavailable,
                "no configuration loaded",
            ));
        };
        let Ok(raw) = abi::request_header_pairs() else {
            return self.fail("header map unreadable");
        };
        let Some(map) = HeaderMap::decode(&raw) else {
            return self.fail("header map undecodable");
        };
        #[cfg(feature = "crash-test")]
        crate::crash_test::panic_on_marker(&map);
        match policy.decide(&map, &RequestHost { stale: self.stale }) {
            Decision::Allow(allowed) => {
                if let Some(denied) = &allowed.shadow {
                    self.report(denied);
                }
                if !apply_edits(&allowed.edits) {
                    // Forwarding without a trustworthy identity is worse than refusing.
                    return self.fail("identity header not set");
                }
                match allowed.body_check {
                    None => self.allow(allowed.key),
                    Some(hold) if end_of_stream => self.finish_body(&policy, hold, &[], false),
                    Some(hold) => {
                        self.hold = Some(hold);
                        Action::Pause
                    }
                }
            }
            Decision::Deny(denied) => self.refuse(&denied),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(hold), Some(policy)) = (self.hold, self.policy.clone()) else {
            return Action::Continue;
        };
        if body_size > policy.max_body_bytes() {
            return self.finish_body(&policy, hold, &[], true);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.read_and_finish(&policy, hold, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // With trailers (HTTP/2, gRPC-style) the body never ends with
        // end_of_stream, so the held decision is made here.
        let (Some(hold), Some(policy)) = (self.hold, self.policy.clone()) else {
            return Action::Continue;
        };
        self.read_and_finish(&policy, hold, policy.max_body_bytes() + 1)
    }
}

/// Strips credentials and spoofed copies, sets the identity and the
/// forwarded key fields: as headers, or with `"forward_with":
/// "filter_state"` as filter state for the route to put in headers (no
/// request-header edit, so Envoy keeps its route cache). False if one of
/// them could not be set.
fn apply_edits(edits: &Edits<'_, '_>) -> bool {
    for name in edits.remove.iter().copied().chain(edits.strip()) {
        let _ = abi::remove_request_header(name);
    }
    if edits.to_filter_state {
        let identity = edits
            .identity
            .map(|(_, v)| (IDENTITY_FILTER_STATE, v.into()));
        let fields = edits.fields().map(|(_, f, v)| (f.filter_state_name(), v));
        return identity
            .into_iter()
            .chain(fields)
            .all(|(name, value)| abi::set_filter_state(name, value.as_bytes()).is_ok());
    }
    let identity = edits.identity.into_iter().map(|(n, v)| (n, v.into()));
    identity
        .chain(edits.metadata())
        .all(|(name, value)| abi::replace_request_header(name.as_bytes(), value.as_bytes()).is_ok())
}

impl KeygateRequest {
    /// Lets the request through, counting it (and, when usage is
    /// reported, counting it for its key: VM memory only, no host call).
    fn allow(&self, key: Option<KeyRef<'_>>) -> Action {
        self.metrics.allowed();
        if let (Some(usage), Some(key)) = (&self.usage, key) {
            usage.record(key.id());
        }
        Action::Continue
    }

    fn read_and_finish(&mut self, policy: &Policy, hold: Hold, upto: usize) -> Action {
        match abi::request_body(upto) {
            Ok(body) => {
                let over = body.len() > policy.max_body_bytes();
                self.finish_body(policy, hold, &body, over)
            }
            Err(_) => self.finish_body(policy, hold, &[], false),
        }
    }

    fn finish_body(&mut self, policy: &Policy, hold: Hold, body: &[u8], truncated: bool) -> Action {
        self.hold = None;
        match policy.decide_body(hold, body, truncated) {
            Ok(None) => self.allow(policy.held_key(hold)),
            Ok(Some(denied)) => {
                self.report(&denied);
                self.allow(policy.held_key(hold))
            }
            Err(denied) => self.refuse(&denied),
        }
    }

    /// Records a refusal that shadow mode lets through: filter state, stat
    /// and debug log, as a denial is recorded.
    fn report(&self, denied: &Denied<'_>) {
        let Denied { denial, key } = denied;
        let (code, reason) = (denial.code.as_str(), denial.reason);
        self.metrics.shadowed(denial.code);
        audit(key);
        let _ = abi::set_filter_state(FILTER_STATE_SHADOW, format!("{code} ({reason})").as_bytes());
        if abi::log_enabled(Level::Debug) {
            abi::log(
                Level::Debug,
                &format!("shadow: would deny {code} ({reason}) key={key}"),
            );
        }
    }

    /// Refuses as the policy decided, naming the key (id or masked) at debug level.
    fn refuse(&self, denied: &Denied<'_>) -> Action {
        let Denied { denial, key } = denied;
        audit(key);
        if abi::log_enabled(Level::Debug) {
            let (code, reason) = (denial.code.as_str(), denial.reason);
            abi::log(Level::Debug, &format!("denied {code} ({reason}) key={key}"));
        }
        self.deny(denial)
    }

    /// Refuses because the proxy failed the filter, not the request: the
    /// client gets `internal_error` and the log says what failed.
    fn fail(&self, reason: &'static str) -> Action {
        abi::log(Level::Warn, &format!("request refused: {reason}"));
        self.deny(&Denial::new(DenyCode::InternalError, reason))
    }

    /// Sends the local reply for `denial`; nothing reaches the backend.
    fn deny(&self, denial: &Denial) -> Action {
        self.metrics.denied(denial.code);
        let state = format!("{} ({})", denial.code.as_str(), denial.reason);
        let _ = abi::set_filter_state(FILTER_STATE_DENIAL, state.as_bytes());
        let reply = match &self.replies {
            Some(book) => book.reply(denial),
            // Only without a configuration, which Envoy never runs.
            None => Rc::new(EncodedReply::of(denial, "Bearer realm=\"keygate\"")),
        };
        if abi::send_local_response(
            u32::from(reply.status),
            &reply.details,
            reply.body.as_bytes(),
            &reply.headers,
            reply.grpc_status,
        )
        .is_err()
        {
            abi::log(Level::Error, "could not send the local reply");
        }
        Action::Pause
    }
}

/// Names the key a refusal is about in the filter state, for audit by key
/// in the access log (never the key itself).
fn audit(key: &KeyLabel<'_>) {
    if let Some(text) = key.audit() {
        let _ = abi::set_filter_state(FILTER_STATE_KEY, text.as_bytes());
    }
}
