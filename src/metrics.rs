//! Envoy stats keygate publishes (shown as `wasmcustom.keygate.*`).
//!
//! Requests only count into a [`Tally`] inside the VM; [`Metrics::flush`]
//! hands the sums to Envoy once per tick, so no request pays a metric host
//! call. A counter lags the traffic by at most one tick (one second).

use std::rc::Rc;

use keygate_core::tally::{Outcome, Tally};
use keygate_core::DenyCode;

use crate::abi;

/// How often a VM without a control plane hands its counts to Envoy.
pub const FLUSH_PERIOD_MS: u32 = 1_000;

/// Counter ids, defined once per VM at configure time, and the counts not
/// yet handed to Envoy.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Envoy's counter id for each outcome, at [`Outcome::index`].
    ids: Vec<Option<u32>>,
    /// Shared by every configuration of this root, so counts made by a
    /// request that outlives a reload are still flushed.
    tally: Rc<Tally>,
}

impl Metrics {
    /// Defines every counter (on a reload, `abi` hands back the ids it was
    /// given the first time), counting into this tally, so counts not yet flushed and those of
    /// requests that outlive the reload are kept. A host that refuses a
    /// definition just loses that counter.
    pub fn redefine(&self) -> Self {
        let ids = Outcome::all()
            .map(|o| match o {
                Outcome::Allowed => abi::define_counter("keygate.allowed").ok(),
                Outcome::Denied(code) => {
                    abi::define_counter(&format!("keygate.denied.{}", code.as_str())).ok()
                }
                Outcome::Shadow(code) => {
                    abi::define_counter(&format!("keygate.shadow.{}", code.as_str())).ok()
                }
            })
            .collect();
        Metrics {
            ids,
            tally: self.tally.clone(),
        }
    }

    /// One more allowed request.
    pub fn allowed(&self) {
        self.tally.add(Outcome::Allowed);
    }

    /// One more denial with `code`.
    pub fn denied(&self, code: DenyCode) {
        self.tally.add(Outcome::Denied(code));
    }

    /// One more refusal with `code` reported in shadow mode.
    pub fn shadowed(&self, code: DenyCode) {
        self.tally.add(Outcome::Shadow(code));
    }

    /// Hands the counts made since the last flush to Envoy.
    pub fn flush(&self) {
        self.tally.drain(|outcome, n| {
            if let Some(Some(id)) = self.ids.get(outcome.index()) {
                abi::increment(*id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        });
    }
}
