//! What the decision may ask of the host (clocks, the client's address, the
//! bucket store), as a trait the filter implements with proxy-wasm calls.

use std::net::IpAddr;

use crate::ratelimit::CounterStore;

/// What the decision may ask of the host. The filter implements it with
/// proxy-wasm calls made only when needed; tests use a fake.
pub trait Host {
    /// Monotonic nanoseconds (rate arithmetic). `None` fails closed.
    fn monotonic_ns(&self) -> Option<u64>;
    /// Wall-clock Unix seconds (key expiry). `None` fails closed.
    fn unix_secs(&self) -> Option<i64>;
    /// Envoy's downstream address (`source.address`). `None` fails closed.
    fn source_ip(&self) -> Option<IpAddr>;
    /// Bucket storage.
    fn counters(&self) -> &dyn CounterStore;
    /// True when the control-plane list is older than `max_staleness`.
    fn key_list_stale(&self) -> bool {
        false
    }
}

/// Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`) to an IP.
pub fn parse_source_address(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?;
    s.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}
