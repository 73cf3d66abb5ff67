//! Sharing one compiled configuration between the VMs of an Envoy through shared data.
//!
//! Envoy gives every VM (the main thread's and one per worker) its own copy
//! of the plugin configuration, and each would parse and index the whole key
//! list again. Instead, the first VM to load a configuration publishes its
//! compiled form in shared data (the key store's wire form and the rest of
//! the configuration as JSON) under the configuration's id. Every other VM
//! computes the id of its configuration in chunks (never holding it whole),
//! finds the entry and adopts the key store as is. An entry stays a minute
//! (see [`KEEP_ENV`]), and the next publication after that frees it (see
//! [`crate::published`]): a reload does not leave the old key store behind
//! for long, and two keygate filters in one VM keep theirs.
//!
//! The id is a 128-bit SipHash-1-3 of the configuration, keyed with a random
//! secret that the first VM draws and keeps in shared data. It is much
//! faster than SHA-256 in V8 (measured in bench/README.md), and nobody who writes configurations can make two of them share an id
//! without knowing the secret, which only keygate's own code can read.

use std::hash::Hasher as _;
use std::sync::Arc;

use siphasher::sip128::{Hasher128 as _, SipHasher13};

use crate::error::ConfigError;
use crate::keys::KeyStore;
use crate::policy::Policy;
use crate::poller::Level;
use crate::published;
use crate::ratelimit::CounterStore;

/// Shared-data key of the secret that keys configuration ids.
pub const SECRET: &str = "keygate/cfg/secret";
/// Shared-data key of the index of published entries.
pub const INDEX: &str = "keygate/cfg/index";
/// How long an entry is kept for VMs still loading its configuration,
/// unless the VM's environment sets [`KEEP_ENV`].
pub const DEFAULT_KEEP_S: u64 = 60;
/// VM environment variable (Envoy's `vm_config.environment_variables`)
/// that sets the keep period in seconds.
pub const KEEP_ENV: &str = "KEYGATE_SHARE_KEEP_S";
/// CAS attempts on the index before giving up.
const MAX_CAS_RETRIES: usize = 16;
/// Chunk size for reading the configuration.
pub const CHUNK: usize = 1 << 20;

/// What configuration sharing needs from the host besides shared data.
pub trait ShareHost {
    /// Up to `len` bytes of the plugin configuration from offset `at`
    /// (`None` if the host refuses).
    fn config_chunk(&self, at: usize, len: usize) -> Option<Vec<u8>>;
    /// The whole plugin configuration, or the host's status as text.
    fn config(&self) -> Result<Vec<u8>, String>;
    /// 16 fresh random bytes.
    fn random_secret(&self) -> Option<[u8; 16]>;
    /// The monotonic clock in nanoseconds.
    fn monotonic_ns(&self) -> Option<u64>;
    /// The value of [`KEEP_ENV`] in the VM's environment, if set.
    fn keep_setting(&self) -> Option<String>;
    /// Writes one log line.
    fn log(&self, level: Level, message: &str);
}

/// How a VM got its policy, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Adopted from shared data.
    Adopted,
    /// Parsed and compiled here.
    Compiled,
}

/// Shared-data key of an entry's key store.
pub fn keys_key(id: &str) -> String {
    format!("keygate/cfg/{id}/keys")
}

/// Shared-data key of an entry's configuration without keys.
pub fn rest_key(id: &str) -> String {
    format!("keygate/cfg/{id}/rest")
}

/// The policy for the plugin configuration of `size` bytes: adopted from
/// another VM when it was compiled already, else compiled here and published.
pub fn load(
    size: usize,
    store: &dyn CounterStore,
    host: &dyn ShareHost,
) -> Result<(Policy, Origin), Vec<ConfigError>> {
    let id = configuration_id(size, store, host);
    if let Some(policy) = id.as_deref().and_then(|id| adopt(id, store, host)) {
        return Ok((policy, Origin::Adopted));
    }
    let bytes = host.config().map_err(|s| {
        vec![ConfigError {
            field: "configuration".into(),
            message: format!("cannot read the plugin configuration (status {s})"),
        }]
    })?;
    let (policy, rest) = Policy::from_json_shareable(&bytes)?;
    drop(bytes);
    if let Some(id) = id {
        publish(&id, &policy, &rest, store, host);
    }
    Ok((policy, Origin::Compiled))
}

/// The secret shared by this Envoy's VMs, drawn by the first VM that needs
/// it. Of two VMs drawing at once, the first write wins and the other VM
/// reads the winner's secret.
fn secret(store: &dyn CounterStore, host: &dyn ShareHost) -> Option<[u8; 16]> {
    let stored = || match store.get(SECRET) {
        Ok(Some((v, _))) => <[u8; 16]>::try_from(v.as_slice()).ok(),
        _ => None,
    };
    if let Some(secret) = stored() {
        return Some(secret);
    }
    let drawn = host.random_secret()?;
    match store.create(SECRET, &drawn) {
        Ok(true) => Some(drawn),
        Ok(false) => stored(),
        Err(_) => None,
    }
}

/// The id of the plugin configuration of `size` bytes, read in chunks; `None`
/// when it cannot be computed (then the configuration is compiled, not shared).
pub fn configuration_id(
    size: usize,
    store: &dyn CounterStore,
    host: &dyn ShareHost,
) -> Option<String> {
    let mut hasher = SipHasher13::new_with_key(&secret(store, host)?);
    // Another build may lay the compiled form out differently.
    hasher.write(b"keygate compiled configuration v2\0");
    let mut at = 0;
    while at < size {
        let chunk = host.config_chunk(at, CHUNK.min(size - at))?;
        if chunk.is_empty() {
            return None;
        }
        hasher.write(&chunk);
        at += chunk.len();
    }
    Some(hex::encode(hasher.finish128().as_bytes()))
}

/// The policy published under `id`, if there is a whole, valid one.
fn adopt(id: &str, store: &dyn CounterStore, host: &dyn ShareHost) -> Option<Policy> {
    let rest = non_empty(store, &rest_key(id))?;
    let keys = KeyStore::from_bytes(non_empty(store, &keys_key(id))?)?;
    match Policy::from_parts(&rest, Arc::new(keys)) {
        Ok(policy) => Some(policy),
        Err(errors) => {
            for e in errors {
                host.log(Level::Warn, &format!("shared configuration not used: {e}"));
            }
            None
        }
    }
}

fn non_empty(store: &dyn CounterStore, key: &str) -> Option<Vec<u8>> {
    store
        .get(key)
        .ok()
        .flatten()
        .map(|(v, _)| v)
        .filter(|v| !v.is_empty())
}

/// Puts the compiled form in shared data, then registers it in the index
/// and frees the entries past their keep period.
fn publish(id: &str, policy: &Policy, rest: &[u8], store: &dyn CounterStore, host: &dyn ShareHost) {
    let keys = policy.keys().fixed().as_bytes();
    let ok = store.set(&keys_key(id), keys, None).is_ok()
        && store.set(&rest_key(id), rest, None).is_ok();
    if !ok {
        host.log(Level::Warn, "could not share the compiled configuration");
        return;
    }
    let Some(now) = host.monotonic_ns() else {
        return;
    };
    let keep_s = keep_seconds(host);
    for _ in 0..MAX_CAS_RETRIES {
        let (stored, cas) = match store.get(INDEX) {
            Ok(Some((v, cas))) => (v, Some(cas)),
            Ok(None) => (Vec::new(), None),
            Err(_) => break,
        };
        let registered = published::register(&stored, id, now, keep_s * 1_000_000_000);
        // The first write only creates: of two VMs creating the index at
        // once, the second retries on top of the first one's entry.
        let written = match cas {
            Some(cas) => store.set(INDEX, &registered.index, cas),
            None => store.create(INDEX, &registered.index),
        };
        if written != Ok(true) {
            continue;
        }
        for stale in &registered.stale {
            let _ = store.set(&keys_key(stale), b"", None);
            let _ = store.set(&rest_key(stale), b"", None);
        }
        if !registered.stale.is_empty() {
            host.log(
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
    host.log(
        Level::Warn,
        "could not index the shared compiled configuration: older ones stay in memory",
    );
}

/// The keep period: [`KEEP_ENV`] if it holds a whole number of seconds (at
/// most a day), else [`DEFAULT_KEEP_S`].
fn keep_seconds(host: &dyn ShareHost) -> u64 {
    let Some(value) = host.keep_setting() else {
        return DEFAULT_KEEP_S;
    };
    match value.parse::<u64>() {
        Ok(s) if s <= 86_400 => s,
        _ => {
            host.log(
                Level::Warn,
                &format!("{KEEP_ENV}={value:?} is not a number of seconds up to 86400; using {DEFAULT_KEEP_S}"),
            );
            DEFAULT_KEEP_S
        }
    }
}
