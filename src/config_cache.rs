//! The compiled configuration shared between the VMs of one Envoy, host
//! side: the configuration buffer, randomness, the clock and the log of
//! `keygate_core::config_share`, which decides what is adopted or published.

use keygate_core::config_share::{self, ShareHost, KEEP_ENV};
use keygate_core::poller;
use keygate_core::{ConfigError, Policy};

pub use keygate_core::config_share::Origin;

use crate::abi;
use crate::shared::SharedCounters;

/// The plugin configuration and the rest of the VM, through `crate::abi`.
struct VmHost;

impl ShareHost for VmHost {
    fn config_chunk(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        abi::plugin_configuration_range(at, len).ok()
    }

    fn config(&self) -> Result<Vec<u8>, String> {
        abi::plugin_configuration().map_err(|s| s.to_string())
    }

    fn random_secret(&self) -> Option<[u8; 16]> {
        let mut drawn = [0u8; 16];
        getrandom::fill(&mut drawn).ok()?;
        Some(drawn)
    }

    fn monotonic_ns(&self) -> Option<u64> {
        abi::monotonic_ns()
    }

    fn keep_setting(&self) -> Option<String> {
        std::env::var(KEEP_ENV).ok()
    }

    fn log(&self, level: poller::Level, message: &str) {
        abi::log(crate::control::level(level), message);
    }
}

/// The policy for the plugin configuration of `size` bytes: adopted from
/// another VM when it was compiled already, else compiled here and published.
pub fn load(size: usize) -> Result<(Policy, Origin), Vec<ConfigError>> {
    config_share::load(size, &SharedCounters, &VmHost)
}
