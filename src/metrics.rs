//! Envoy stats keygate publishes (shown as `wasmcustom.keygate.*`).

use keygate_core::DenyCode;

use crate::abi;

/// Counter ids, defined once per VM at configure time.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    allowed: Option<u32>,
    denied: Vec<(DenyCode, u32)>,
}

impl Metrics {
    /// Defines every counter. A host that refuses a definition just loses that counter.
    pub fn define() -> Self {
        Metrics {
            allowed: abi::define_counter("keygate.allowed").ok(),
            denied: DenyCode::ALL
                .iter()
                .filter_map(|c| {
                    abi::define_counter(&format!("keygate.denied.{}", c.as_str()))
                        .ok()
                        .map(|id| (*c, id))
                })
                .collect(),
        }
    }

    /// One more allowed request.
    pub fn allowed(&self) {
        if let Some(id) = self.allowed {
            abi::increment(id, 1);
        }
    }

    /// One more denial with `code`.
    pub fn denied(&self, code: DenyCode) {
        if let Some((_, id)) = self.denied.iter().find(|(c, _)| *c == code) {
            abi::increment(*id, 1);
        }
    }
}
