//! The compiled configuration, shared between the VMs of one Envoy.
//!
//! Envoy gives every VM (the main thread's and one per worker) its own copy
//! of the plugin configuration, and each would parse and index the whole key
//! list again. Instead, the first VM to load a configuration publishes its
//! compiled form in shared data (the key store's wire form and the rest of
//! the configuration as JSON) under the configuration's id. Every other VM
//! computes the id of its configuration in chunks (never holding it whole),
//! finds the entry and adopts the key store as is. An entry stays a minute
//! (see [`KEEP_ENV`]), and the next publication after that frees it (see
//! [`keygate_core::published`]): a reload does not leave the old key store
//! behind for long, and two keygate filters in one VM keep theirs.
//!
//! The id is a 128-bit SipHash-1-3 of the configuration, keyed with a random
//! secret that the first VM draws and keeps in shared data. Keyed, it is
//! about ten times faster than SHA-256 in V8 (25 against 280 ms for 94 MB),
//! and nobody who writes configurations can make two of them share an id
//! without knowing the secret, which only keygate's own code can read.

use std::hash::Hasher as _;
use std::sync::Arc;

use keygate_core::keys::KeyStore;
use keygate_core::published;
use keygate_core::{ConfigError, Policy};
use siphasher::sip128::{Hasher128 as _, SipHasher13};

use crate::abi::{self, Level};

/// Shared-data key of the secret that keys configuration ids.
const SECRET: &str = "keygate/cfg/secret";
/// Shared-data key of the index of published entries.
const INDEX: &str = "keygate/cfg/index";
/// How long an entry is kept for VMs still loading its configuration,
/// unless the VM's environment sets [`KEEP_ENV`].
const DEFAULT_KEEP_S: u64 = 60;
/// VM environment variable (Envoy's `vm_config.environment_variables`)
/// that sets the keep period in seconds.
const KEEP_ENV: &str = "KEYGATE_SHARE_KEEP_S";
/// CAS attempts on the index before giving up.
const MAX_CAS_RETRIES: usize = 16;
/// Chunk size for reading the configuration.
const CHUNK: usize = 1 << 20;

fn keys_key(id: &str) -> String {
    format!("keygate/cfg/{id}/keys")
}

fn rest_key(id: &str) -> String {
    format!("keygate/cfg/{id}/rest")
}

/// The secret shared by this Envoy's VMs, drawn by the first VM that needs
/// it. Of two VMs drawing at once, the first write wins and the other VM
/// reads the winner's secret.
fn secret() -> Option<[u8; 16]> {
    let stored = || match abi::get_shared_data(SECRET) {
        Ok(Some((v, _))) => <[u8; 16]>::try_from(v.as_slice()).ok(),
        _ => None,
    };
    if let Some(secret) = stored() {
        return Some(secret);
    }
    let mut drawn = [0u8; 16];
    getrandom::fill(&mut drawn).ok()?;
    match abi::create_shared_data(SECRET, &drawn) {
        Ok(true) => Some(drawn),
        Ok(false) => stored(),
        Err(_) => None,
    }
}

/// The id of the plugin configuration of `size` bytes, read in chunks; `None`
/// when it cannot be computed (then the configuration is compiled, not shared).
fn configuration_id(size: usize) -> Option<String> {
    let mut hasher = SipHasher13::new_with_key(&secret()?);
    // Another build may lay the compiled form out differently.
    hasher.write(b"keygate compiled configuration v2\0");
    let mut at = 0;
    while at < size {
        let chunk = abi::plugin_configuration_range(at, CHUNK.min(size - at)).ok()?;
        if chunk.is_empty() {
            return None;
        }
        hasher.write(&chunk);
        at += chunk.len();
    }
    Some(hex::encode(hasher.finish128().as_bytes()))
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

/// Puts the compiled form in shared data, then registers it in the index
/// and frees the entries past their keep period.
fn publish(id: &str, policy: &Policy, rest: &[u8]) {
    let keys = policy.keys().fixed().as_bytes();
    let ok = abi::set_shared_data(&keys_key(id), keys, 0).is_ok()
        && abi::set_shared_data(&rest_key(id), rest, 0).is_ok();
    if !ok {
        abi::log(Level::Warn, "could not share the compiled configuration");
        return;
    }
    let Some(now) = abi::monotonic_ns() else {
        return;
    };
    let keep_s = keep_seconds();
    for _ in 0..MAX_CAS_RETRIES {
        let (stored, cas) = match abi::get_shared_data(INDEX) {
            Ok(Some((v, cas))) => (v, Some(cas)),
            Ok(None) => (Vec::new(), None),
            Err(_) => break,
        };
        let registered = published::register(&stored, id, now, keep_s * 1_000_000_000);
        // The first write only creates: of two VMs creating the index at
        // once, the second retries on top of the first one's entry.
        let written = match cas {
            Some(cas) => abi::set_shared_data(INDEX, &registered.index, cas),
            None => abi::create_shared_data(INDEX, &registered.index),
        };
        if written != Ok(true) {
            continue;
        }
        for stale in &registered.stale {
            let _ = abi::set_shared_data(&keys_key(stale), b"", 0);
            let _ = abi::set_shared_data(&rest_key(stale), b"", 0);
        }
        if !registered.stale.is_empty() {
            abi::log(
                Level::Debug,
                &format!(
                    "freed {} shared compiled configuration(s) published over {} s ago",
                    registered.stale.len(),
                    keep_s
                ),
            );
        }
        return;
    }
    abi::log(
        Level::Warn,
        "could not index the shared compiled configuration: older ones stay in memory",
    );
}

/// The keep period: [`KEEP_ENV`] if it holds a whole number of seconds (at
/// most a day), else [`DEFAULT_KEEP_S`].
fn keep_seconds() -> u64 {
    let Ok(value) = std::env::var(KEEP_ENV) else {
        return DEFAULT_KEEP_S;
    };
    match value.parse::<u64>() {
        Ok(s) if s <= 86_400 => s,
        _ => {
            abi::log(
                Level::Warn,
                &format!("{KEEP_ENV}={value:?} is not a number of seconds up to 86400; using {DEFAULT_KEEP_S}"),
            );
            DEFAULT_KEEP_S
        }
    }
}
