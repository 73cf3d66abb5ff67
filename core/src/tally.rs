//! Request outcomes counted inside the VM and handed to the host in batches.
//!
//! A metric host call on every request costs Envoy more than a counter that
//! is current to the microsecond is worth: the filter adds each outcome to a
//! [`Tally`] and hands Envoy the sums once per tick.

use std::cell::Cell;

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
}
