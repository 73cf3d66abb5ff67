//! Request outcomes counted inside the VM and handed to the host in batches.
//!
//! A metric host call on every request costs Envoy more than a counter that
//! is current to the microsecond is worth: the filter adds each outcome to a
//! [`Tally`] and hands Envoy the sums once per tick.

use std::cell::Cell;
use std::collections::HashMap;

use crate::DenyCode;

/// One counted outcome: a request let through, a denial with its code, or
/// a refusal that shadow mode reported and let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the backend.
    Allowed,
    /// Answered locally with this code.
    Denied(DenyCode),
    /// Would have been answered with this code; forwarded in shadow mode.
    Shadow(DenyCode),
}

/// Number of distinct outcomes.
const OUTCOMES: usize = 1 + 2 * DenyCode::ALL.len();

impl Outcome {
    /// Every outcome, in index order: `Allowed`, each code of
    /// [`DenyCode::ALL`] denied, then each reported in shadow mode.
    pub fn all() -> impl Iterator<Item = Outcome> {
        std::iter::once(Outcome::Allowed)
            .chain(DenyCode::ALL.iter().map(|c| Outcome::Denied(*c)))
            .chain(DenyCode::ALL.iter().map(|c| Outcome::Shadow(*c)))
    }

    /// Position in [`Outcome::all`].
    pub fn index(self) -> usize {
        match self {
            Outcome::Allowed => 0,
            Outcome::Denied(code) => 1 + code as usize,
            Outcome::Shadow(code) => 1 + DenyCode::ALL.len() + code as usize,
        }
    }
}

/// Outcomes counted since the last [`Tally::drain`]. Single-threaded, like a VM.
#[derive(Debug)]
pub struct Tally {
    counts: [Cell<u64>; OUTCOMES],
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            counts: std::array::from_fn(|_| Cell::new(0)),
        }
    }
}

impl Tally {
    /// Counts one `outcome`.
    pub fn add(&self, outcome: Outcome) {
        if let Some(c) = self.counts.get(outcome.index()) {
            c.set(c.get().saturating_add(1));
        }
    }

    /// Hands every non-zero count to `sink` and resets it to zero.
    pub fn drain(&self, mut sink: impl FnMut(Outcome, u64)) {
        for (outcome, count) in Outcome::all().zip(self.counts.iter()) {
            let n = count.replace(0);
            if n > 0 {
                sink(outcome, n);
            }
        }
    }
}

/// What a metric is to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever incremented.
    Counter,
    /// Set to a value.
    Gauge,
}

/// The ids the host gave one VM's metrics, by kind and name.
///
/// Envoy hands out a new id on every definition, even of a name it already
/// knows, and keeps an entry for each id for the VM's life. A VM that
/// defined its metrics again on every configuration update would grow
/// Envoy's heap with each update; asking here first, it defines each name
/// once.
#[derive(Debug, Default)]
pub struct MetricIds {
    counters: HashMap<String, u32>,
    gauges: HashMap<String, u32>,
}

impl MetricIds {
    /// The id of `name`: the one `define` gave the first time, else what
    /// `define` gives now. A failed definition is not remembered.
    pub fn get_or_define<E>(
        &mut self,
        kind: MetricKind,
        name: &str,
        define: impl FnOnce() -> Result<u32, E>,
    ) -> Result<u32, E> {
        let ids = match kind {
            MetricKind::Counter => &mut self.counters,
            MetricKind::Gauge => &mut self.gauges,
        };
        if let Some(id) = ids.get(name) {
            return Ok(*id);
        }
        let id = define()?;
        ids.insert(name.to_owned(), id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    fn drained(t: &Tally) -> Vec<(Outcome, u64)> {
        let mut out = Vec::new();
        t.drain(|o, n| out.push((o, n)));
        out
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn drain_reports_each_outcome_once_then_starts_over() {
        let t = Tally::default();
        for _ in 0..3 {
            t.add(Outcome::Allowed);
        }
        t.add(Outcome::Denied(DenyCode::RateLimited));
        t.add(Outcome::Denied(DenyCode::MissingApiKey));
        t.add(Outcome::Denied(DenyCode::RateLimited));
        t.add(Outcome::Shadow(DenyCode::RateLimited));
        let mut got = drained(&t);
        got.sort_by_key(|(o, _)| o.index());
        assert_eq!(
            got,
            vec![
                (Outcome::Allowed, 3),
                (Outcome::Denied(DenyCode::MissingApiKey), 1),
                (Outcome::Denied(DenyCode::RateLimited), 2),
                (Outcome::Shadow(DenyCode::RateLimited), 1),
            ]
        );
        assert!(drained(&t).is_empty(), "a second drain has nothing new");
        t.add(Outcome::Denied(DenyCode::InvalidApiKey));
        assert_eq!(
            drained(&t),
            vec![(Outcome::Denied(DenyCode::InvalidApiKey), 1)]
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn every_outcome_has_its_own_slot() {
        let t = Tally::default();
        for o in Outcome::all() {
            t.add(o);
        }
        let got = drained(&t);
        assert_eq!(got.len(), OUTCOMES);
        assert!(got.iter().all(|(_, n)| *n == 1));
        assert!(got.iter().map(|(o, _)| *o).eq(Outcome::all()));
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn each_metric_is_defined_once_per_kind_and_name() {
        let mut ids = MetricIds::default();
        let mut next = 0u32;
        let mut calls = 0;
        let mut define = |ids: &mut MetricIds, kind, name: &str| {
            ids.get_or_define(kind, name, || -> Result<u32, ()> {
                calls += 1;
                next += 4;
                Ok(next)
            })
        };
        let allowed = define(&mut ids, MetricKind::Counter, "keygate.allowed");
        // A configuration update defines every metric again: same ids, no host call.
        assert_eq!(
            define(&mut ids, MetricKind::Counter, "keygate.allowed"),
            allowed
        );
        let denied = define(&mut ids, MetricKind::Counter, "keygate.denied.rate_limited");
        let gauge = define(&mut ids, MetricKind::Gauge, "keygate.allowed");
        assert_eq!(
            define(&mut ids, MetricKind::Gauge, "keygate.allowed"),
            gauge
        );
        assert_eq!((allowed, denied, gauge), (Ok(4), Ok(8), Ok(12)));
        assert_eq!(calls, 3);
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_refused_definition_is_asked_again() {
        let mut ids = MetricIds::default();
        assert_eq!(
            ids.get_or_define(MetricKind::Counter, "keygate.allowed", || Err("refused")),
            Err("refused")
        );
        assert_eq!(
            ids.get_or_define(MetricKind::Counter, "keygate.allowed", || Ok::<u32, &str>(
                7
            )),
            Ok(7)
        );
        assert_eq!(
            ids.get_or_define(MetricKind::Counter, "keygate.allowed", || Err("not asked")),
            Ok(7)
        );
    }
}
