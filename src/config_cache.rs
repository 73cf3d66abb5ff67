//! The compiled configuration, shared between the VMs of one Envoy.
//!
//! Envoy gives every VM (the main thread's and one per worker) its own copy
//! of the plugin configuration, and each would parse and index the whole key
//! list again. Instead, the first VM to load a configuration publishes its
//! compiled form in shared data, under the SHA-256 of the configuration: the
//! key store's wire form and the rest of the configuration as JSON. Every
//! other VM hashes its configuration in chunks (never holding it whole),
//! finds the entry and adopts the key store as is.

use std::sync::Arc;

use keygate_core::keys::KeyStore;
use keygate_core::{ConfigError, Policy};
use sha2::{Digest as _, Sha256};

use crate::abi::{self, Level};

/// Shared-data key naming the configuration published last.
const CURRENT: &str = "keygate/cfg/current";
/// Chunk size for hashing the configuration.
const CHUNK: usize = 1 << 20;

fn keys_key(id: &str) -> String {
    format!("keygate/cfg/{id}/keys")
}

fn rest_key(id: &str) -> String {
    format!("keygate/cfg/{id}/rest")
}

/// Hex SHA-256 of the plugin configuration of `size` bytes, read in chunks.
fn configuration_id(size: usize) -> Option<String> {
    let mut hasher = Sha256::new();
    // Another build may lay the compiled form out differently.
    hasher.update(b"keygate compiled configuration v1\0");
    let mut at = 0;
    while at < size {
        let chunk = abi::plugin_configuration_range(at, CHUNK.min(size - at)).ok()?;
        if chunk.is_empty() {
            return None;
        }
        hasher.update(&chunk);
        at += chunk.len();
    }
    Some(hex::encode(hasher.finalize()))
}

/// How a VM got its policy, for the log line.
pub enum Origin {
    /// Adopted from shared data.
    Adopted,
    /// Parsed and compiled here.
    Compiled,
}

/// The policy for the plugin configuration of `size` bytes: adopted from
/// another VM when it was compiled already, else compiled here and published.
pub fn load(size: usize) -> Result<(Policy, Origin), Vec<ConfigError>> {
    let id = configuration_id(size);
    if let Some(policy) = id.as_deref().and_then(adopt) {
        return Ok((policy, Origin::Adopted));
    }
    let bytes = abi::plugin_configuration().map_err(|s| {
        vec![ConfigError {
            field: "configuration".into(),
            message: format!("cannot read the plugin configuration (status {s})"),
        }]
    })?;
    let (policy, rest) = Policy::from_json_shareable(&bytes)?;
    drop(bytes);
    if let Some(id) = id {
        publish(&id, &policy, &rest);
    }
    Ok((policy, Origin::Compiled))
}

fn adopt(id: &str) -> Option<Policy> {
    let rest = non_empty(&rest_key(id))?;
    let keys = KeyStore::from_bytes(non_empty(&keys_key(id))?)?;
    match Policy::from_parts(&rest, Arc::new(keys)) {
        Ok(policy) => Some(policy),
        Err(errors) => {
            for e in errors {
                abi::log(Level::Warn, &format!("shared configuration not used: {e}"));
            }
            None
        }
    }
}

fn non_empty(key: &str) -> Option<Vec<u8>> {
    abi::get_shared_data(key)
        .ok()
        .flatten()
        .map(|(v, _)| v)
        .filter(|v| !v.is_empty())
}

fn publish(id: &str, policy: &Policy, rest: &[u8]) {
    let keys = policy.keys().fixed().as_bytes();
    let ok = abi::set_shared_data(&keys_key(id), keys, 0).is_ok()
        && abi::set_shared_data(&rest_key(id), rest, 0).is_ok();
    if !ok {
        abi::log(Level::Warn, "could not share the compiled configuration");
        return;
    }
    // Free the entry of the configuration this one replaces (a reload).
    if let Some(previous) = non_empty(CURRENT) {
        if previous != id.as_bytes() {
            if let Ok(previous) = std::str::from_utf8(&previous) {
                let _ = abi::set_shared_data(&keys_key(previous), b"", 0);
                let _ = abi::set_shared_data(&rest_key(previous), b"", 0);
            }
        }
    }
    let _ = abi::set_shared_data(CURRENT, id.as_bytes(), 0);
}
