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

    /// See [`abi::create_shared_data`].
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        abi::create_shared_data(key, value).map_err(|_| StoreError)
    }
}
