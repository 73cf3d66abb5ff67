//! Control-plane polling, host side: the callout, the clock and the metrics
//! of `keygate_core::poller`, whose state machine makes every decision.

use std::time::Duration;

use keygate_core::control::ControlPlane;
use keygate_core::poller::{self, Callout, Io, Response, Step};
use keygate_core::Policy;

use crate::abi::{self, Level};
use crate::shared::SharedCounters;

/// Counters and gauges of the control plane.
#[derive(Debug, Default, Clone)]
pub struct PollMetrics {
    ok: Option<u32>,
    not_modified: Option<u32>,
    failed: Option<u32>,
    version: Option<u32>,
    keys: Option<u32>,
    age: Option<u32>,
}

impl PollMetrics {
    /// Defines the metrics (idempotent in Envoy).
    pub fn define() -> Self {
        PollMetrics {
            ok: abi::define_counter("keygate.control_plane.fetch_ok").ok(),
            not_modified: abi::define_counter("keygate.control_plane.fetch_not_modified").ok(),
            failed: abi::define_counter("keygate.control_plane.fetch_failed").ok(),
            version: abi::define_gauge("keygate.control_plane.list_version").ok(),
            keys: abi::define_gauge("keygate.control_plane.keys_loaded").ok(),
            age: abi::define_gauge("keygate.control_plane.seconds_since_last_good_fetch").ok(),
        }
    }

    fn count(id: Option<u32>, by: u64) {
        if let (Some(id), true) = (id, by > 0) {
            abi::increment(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    fn set(id: Option<u32>, v: Option<u64>) {
        if let (Some(id), Some(v)) = (id, v) {
            abi::record(id, v);
        }
    }
}

/// What a tick asks the root to do.
pub enum TickAction {
    /// Nothing changed.
    Nothing,
    /// Switch to this policy (a newly published list merged with static keys).
    Switch(Box<Policy>),
}

/// The host's log level for a line of the core.
pub fn level(level: poller::Level) -> Level {
    match level {
        poller::Level::Debug => Level::Debug,
        poller::Level::Info => Level::Info,
        poller::Level::Warn => Level::Warn,
        poller::Level::Error => Level::Error,
    }
}

/// Logs, counts and gauges what `step` reports; returns its policy switch.
fn apply(step: Step, metrics: &PollMetrics) -> TickAction {
    for (l, line) in &step.logs {
        abi::log(level(*l), line);
    }
    PollMetrics::count(metrics.ok, step.counts.ok);
    PollMetrics::count(metrics.not_modified, step.counts.not_modified);
    PollMetrics::count(metrics.failed, step.counts.failed);
    PollMetrics::set(metrics.age, step.seconds_since_last_good_fetch);
    PollMetrics::set(metrics.version, step.list_version);
    PollMetrics::set(metrics.keys, step.keys_loaded);
    match step.switch {
        Some(policy) => TickAction::Switch(policy),
        None => TickAction::Nothing,
    }
}

/// Envoy's HTTP callouts.
struct HostCallout;

impl Callout for HostCallout {
    fn dispatch_get(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        proxy_wasm::hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            None,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map_err(|s| format!("{s:?}"))
    }

    fn response_body(&mut self, max: usize) -> Vec<u8> {
        abi::callout_body(max).unwrap_or_default()
    }
}

/// Runs `f` with this VM's shared data, callouts and clock.
fn with_io<R>(f: impl FnOnce(&mut Io<'_>) -> R) -> R {
    f(&mut Io {
        store: &SharedCounters,
        callout: &mut HostCallout,
        clock: &abi::monotonic_ns,
    })
}

/// Per-VM polling state, owned by the root context.
#[derive(Debug)]
pub struct Poller(poller::Poller);

impl Poller {
    /// A poller of `cp` with a VM-unique id.
    pub fn new(cp: &ControlPlane) -> Self {
        // VMs are created at different nanoseconds; a collision would only
        // mean two fetchers for a while, never a wrong list.
        let me =
            (abi::monotonic_ns().unwrap_or(0) ^ abi::unix_ns().unwrap_or(0).rotate_left(17)) | 1;
        Poller(poller::Poller::new(cp, me))
    }

    /// True when this poller polls `cp` (a reload may point elsewhere).
    pub fn polls(&self, cp: &ControlPlane) -> bool {
        self.0.polls(cp)
    }

    /// True when this VM holds the fetch lease (it sends the usage reports).
    pub fn holds_lease(&self) -> bool {
        abi::monotonic_ns().is_some_and(|now| self.0.holds_lease(&SharedCounters, now))
    }

    /// See [`poller::Poller::tick_period_ms`].
    pub fn tick_period(cp: &ControlPlane) -> Duration {
        Duration::from_millis(poller::Poller::tick_period_ms(cp))
    }

    /// Once per tick (see [`poller::Poller::tick`]). Returns the policy to
    /// switch to and whether the list is stale.
    pub fn tick(
        &mut self,
        base: &Policy,
        cp: &ControlPlane,
        metrics: &PollMetrics,
    ) -> (TickAction, bool) {
        let step = with_io(|io| self.0.tick(base, cp, io));
        let stale = step.stale;
        (apply(step, metrics), stale)
    }

    /// Loads the published list now (used right after a configuration update).
    pub fn sync(&mut self, base: &Policy, metrics: &PollMetrics) -> TickAction {
        apply(self.0.sync(base, &SharedCounters), metrics)
    }

    /// Hands the callout response to the poller: validate, publish, count.
    pub fn on_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        base: &Policy,
        cp: &ControlPlane,
        metrics: &PollMetrics,
    ) -> TickAction {
        // A reset callout has no headers, and reading them would fail.
        let headers = (num_headers > 0)
            .then(|| abi::header_pairs(abi::CALLOUT_RESPONSE_HEADERS).unwrap_or_default());
        let response = Response {
            token,
            headers: headers.as_deref(),
            body_size,
        };
        let step = with_io(|io| self.0.on_response(response, base, cp, io));
        apply(step, metrics)
    }
}
