//! keygate-core: everything keygate decides, with no proxy-wasm dependency.
//!
//! Configuration flow: [`config`] (serde schema) → [`compile`] (validated,
//! with [`keylist`] for the key records) → [`policy::Policy`].
//!
//! Request flow: [`headers::HeaderMap`] → [`policy::Policy::decide`]
//! (credential extraction, key lookup, rules, [`ratelimit`] through the
//! [`host::Host`] traits) → [`policy::Decision`]: the header edits to make,
//! or the denial to answer with [`reply`].

pub mod attribute;
pub mod checksum;
pub mod compile;
pub mod config;
pub mod config_share;
pub mod control;
pub mod credential;
pub mod denial;
pub mod duration;
pub mod error;
pub mod headers;
pub mod host;
pub mod json_scan;
pub mod keylist;
pub mod keys;
pub mod policy;
pub mod poller;
pub mod published;
pub mod ratelimit;
pub mod reply;
pub mod request;
pub mod rules;
pub mod tally;
pub mod testing;
pub mod usage;

pub use denial::{Denial, DenyCode};
pub use error::ConfigError;
pub use host::Host;
pub use policy::{Decision, Policy};
