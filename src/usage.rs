//! Usage reporting, host side: the POST callout, the clocks and the metrics
//! of `keygate_core::usage`, which counts, merges and batches.

use std::rc::Rc;
use std::time::Duration;

use keygate_core::control::ControlPlane;
use keygate_core::usage::{self, Poster, UsageIo, UsageStep, UsageTally};

use crate::abi;
use crate::control::level;
use crate::shared::SharedCounters;

/// Envoy's HTTP callouts, for POSTs.
struct HostPoster;

impl Poster for HostPoster {
    fn dispatch_post(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        proxy_wasm::hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            Some(body),
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map_err(|s| format!("{s:?}"))
    }
}

fn unix_secs() -> Option<i64> {
    abi::unix_ns().and_then(|ns| i64::try_from(ns / 1_000_000_000).ok())
}

/// Runs `f` with this VM's shared data, callouts and clocks.
fn with_io<R>(f: impl FnOnce(&mut UsageIo<'_>) -> R) -> R {
    f(&mut UsageIo {
        store: &SharedCounters,
        poster: &mut HostPoster,
        monotonic_ns: &abi::monotonic_ns,
        unix_secs: &unix_secs,
    })
}

/// Per-VM usage reporting, owned by the root context; requests count into
/// its tally, which the root hands them.
#[derive(Debug)]
pub struct Reporting {
    reporter: usage::Reporter,
    tally: Rc<UsageTally>,
    ok: Option<u32>,
    failed: Option<u32>,
}

impl Reporting {
    /// Reporting to `cp`, keeping `previous` (its tally, and a report in
    /// flight) when it reports to the same control plane.
    pub fn new(cp: &ControlPlane, previous: Option<Reporting>) -> Self {
        let ok = abi::define_counter("keygate.usage.reports_ok").ok();
        let failed = abi::define_counter("keygate.usage.reports_failed").ok();
        match previous {
            Some(p) if p.reporter.reports_to(cp) => Reporting { ok, failed, ..p },
            other => {
                // Another control plane: the old one's entry gets the last counts.
                if let Some(p) = other {
                    p.flush();
                }
                Reporting {
                    reporter: usage::Reporter::new(cp),
                    tally: Rc::default(),
                    ok,
                    failed,
                }
            }
        }
    }

    /// The tally requests count into.
    pub fn tally(&self) -> Rc<UsageTally> {
        self.tally.clone()
    }

    fn apply(&self, step: UsageStep) {
        for (l, line) in &step.logs {
            abi::log(level(*l), line);
        }
        for (id, by) in [
            (self.ok, step.reports_ok),
            (self.failed, step.reports_failed),
        ] {
            if let (Some(id), true) = (id, by > 0) {
                abi::increment(id, i64::try_from(by).unwrap_or(i64::MAX));
            }
        }
    }

    /// Once per tick: merge this VM's counts; report if `leader` and due.
    pub fn tick(&mut self, cp: &ControlPlane, leader: bool) {
        let step = with_io(|io| self.reporter.tick(&self.tally, cp, leader, io));
        self.apply(step);
    }

    /// A callout answered (maybe the poller's: then nothing happens).
    pub fn on_response(&mut self, token: u32, num_headers: usize, cp: &ControlPlane) {
        if !self.reporter.in_flight() {
            return;
        }
        let headers = (num_headers > 0)
            .then(|| abi::header_pairs(abi::CALLOUT_RESPONSE_HEADERS).unwrap_or_default());
        let status = usage::response_status(headers.as_deref());
        let step = with_io(|io| self.reporter.on_response(token, status, cp, io));
        self.apply(step);
    }

    /// Hands this VM's last counts to shared data (the root is going away).
    pub fn flush(&self) {
        let mut step = UsageStep::default();
        with_io(|io| self.reporter.flush(&self.tally, io, &mut step));
        self.apply(step);
    }
}
