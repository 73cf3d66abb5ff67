//! keygate-core: everything keygate decides, with no proxy-wasm dependency.
//!
//! Request flow: [`headers::HeaderMap`] → [`credential::Extractor::extract`]
//! → [`keys::KeyStore::lookup`] → [`ratelimit::take_shared`] →
//! [`policy::Decision`] → [`reply::render`] or [`policy::Policy::forward_edits`].

pub mod config;
pub mod config_share;
pub mod control;
pub mod credential;
pub mod denial;
pub mod headers;
pub mod keys;
pub mod policy;
pub mod poller;
pub mod published;
pub mod ratelimit;
pub mod reply;
pub mod rules;
pub mod tally;
pub mod testing;

pub use denial::{Denial, DenyCode};
pub use policy::{ConfigError, Decision, Host, Policy};
