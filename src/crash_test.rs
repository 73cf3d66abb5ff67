//! Test builds only (feature `crash-test`, never in the shipped module): a
//! request carrying [`MARKER`] panics the VM as a bug would, so that the e2e
//! suite (`tests/e2e/test_crash.py`) can see what Envoy's failure policy does
//! with a dead keygate: the request, the reload, and what survives it.

use keygate_core::headers::HeaderMap;

/// The request header that makes a crash-test build panic.
pub const MARKER: &[u8] = b"x-keygate-crash-test";

/// Panics when the request carries [`MARKER`], before any decision is made.
// The lints deny `panic!` everywhere else; a panic on demand is this test
// build's whole purpose.
#[allow(clippy::panic)]
pub fn panic_on_marker(map: &HeaderMap<'_>) {
    if map.get(MARKER).is_some() {
        panic!("crash test: the request carries x-keygate-crash-test");
    }
}
