//! Rate-limit buckets in proxy-wasm shared data.

use keygate_core::ratelimit::{CounterStore, StoreError, Versioned};

use crate::abi;

/// The process-wide shared-data store of this plugin's `vm_id`.
pub struct SharedCounters;

impl CounterStore for SharedCounters {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        abi::get_shared_data(key)
            .map(|v| v.map(|(bytes, cas)| (bytes, (cas != 0).then_some(cas))))
            .map_err(|_| StoreError)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        abi::set_shared_data(key, value, cas.unwrap_or(0)).map_err(|_| StoreError)
    }

    /// Envoy writes an absent key whatever the CAS, and refuses to overwrite
    /// a present one unless the CAS is 0 or its current token. Tokens come
    /// from one process-wide counter, so `CREATE_CAS` matches an existing
    /// bucket only if its last write happened to draw that exact token:
    /// about once in 2^32 writes.
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        abi::set_shared_data(key, value, CREATE_CAS).map_err(|_| StoreError)
    }
}

/// The CAS token a create passes: never 0 (which would overwrite).
const CREATE_CAS: u32 = u32::MAX;
