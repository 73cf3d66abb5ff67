//! Per-key rate limiting with GCRA (a token bucket kept as one timestamp).
//!
//! The whole state of a bucket is its theoretical arrival time (TAT), eight
//! bytes in shared data. A request is admitted when moving the TAT forward by
//! one emission interval keeps it within `burst` intervals of now. Updates go
//! through compare-and-swap so that every Envoy worker sees one bucket.

mod blocked;
mod bucket;

pub use blocked::BlockedBuckets;
pub use bucket::{bucket_scope, BucketName, BUCKET_PREFIX};

use crate::config::RateLimitConfig;
use crate::denial::RateInfo;
use crate::error::{err, ConfigError};

const NANOS: u64 = 1_000_000_000;
/// Longest emission interval (one request per 1000 s) and largest burst;
/// together they keep `interval * burst` far below `u64::MAX`.
const MAX_INTERVAL_NS: u64 = 1_000 * NANOS;

/// Bounded CAS retries before failing closed.
pub const MAX_CAS_RETRIES: usize = 32;

/// A compiled limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Limit {
    /// Nanoseconds between two admitted requests at the sustained rate.
    pub interval_ns: u64,
    /// Bucket size.
    pub burst: u64,
}

impl Limit {
    /// Compiles `rate_limit` at `field`, recording each problem with its path.
    pub(crate) fn from_config(
        l: &RateLimitConfig,
        field: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Option<Limit> {
        let mut ok = true;
        if !(l.requests_per_second.is_finite()
            && (0.001..=1_000_000.0).contains(&l.requests_per_second))
        {
            errors.push(err(
                format!("{field}.requests_per_second"),
                "must be a number from 0.001 to 1000000",
            ));
            ok = false;
        }
        if !(1..=1_000_000).contains(&l.burst) {
            errors.push(err(
                format!("{field}.burst"),
                "must be an integer from 1 to 1000000",
            ));
            ok = false;
        }
        ok.then(|| Limit::new(l.requests_per_second, l.burst as u64))
    }

    /// From a rate in requests per second and a burst. The caller validates
    /// ranges; this clamps so the arithmetic cannot overflow.
    pub fn new(requests_per_second: f64, burst: u64) -> Self {
        let interval = (NANOS as f64 / requests_per_second).round();
        let interval_ns = if interval.is_finite() {
            (interval as u64).clamp(1, MAX_INTERVAL_NS)
        } else {
            1
        };
        Limit {
            interval_ns,
            burst: burst.max(1),
        }
    }

    fn tolerance_ns(&self) -> u64 {
        self.interval_ns.saturating_mul(self.burst)
    }

    /// Seconds to refill the bucket from empty (`w` in `RateLimit-Policy`).
    pub fn window_secs(&self) -> u64 {
        ceil_secs(self.tolerance_ns()).max(1)
    }
}

/// The result of one `take`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// Whether `new_tat` must be stored: always when admitted; when denied,
    /// only if the stored TAT was capped (see [`take`]).
    pub store: bool,
    /// The TAT to store when `store` is set.
    pub new_tat: u64,
    /// Figures for the response headers.
    pub info: RateInfo,
}

/// Pure GCRA step: given the stored TAT and the monotonic time, decide.
///
/// Under one limit the TAT never gets further than `burst` intervals ahead
/// of now. A TAT further ahead than that by more than one interval was
/// written under another limit (the configuration changed: a key blocked
/// for 1000 s whose limit is raised to 100/s): it is capped to an empty
/// bucket of this limit, and the capped value is stored, so that the new
/// limit applies within its own window instead of the old one's debt.
pub fn take(limit: &Limit, tat: u64, now: u64) -> Outcome {
    let tolerance = limit.tolerance_ns();
    let ceiling = now.saturating_add(tolerance);
    let capped = tat > ceiling.saturating_add(limit.interval_ns);
    let tat = if capped { ceiling } else { tat };
    let base = tat.max(now);
    let new_tat = base.saturating_add(limit.interval_ns);
    let ahead = new_tat - now;
    if ahead > tolerance {
        let wait = ahead - tolerance;
        Outcome {
            allowed: false,
            store: capped,
            new_tat: tat,
            info: RateInfo {
                burst: limit.burst,
                window_secs: limit.window_secs(),
                remaining: 0,
                retry_after_secs: ceil_secs(wait).max(1),
            },
        }
    } else {
        Outcome {
            allowed: true,
            store: true,
            new_tat,
            info: RateInfo {
                burst: limit.burst,
                window_secs: limit.window_secs(),
                remaining: (tolerance - ahead) / limit.interval_ns,
                retry_after_secs: 0,
            },
        }
    }
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(NANOS)
}

/// A stored value and its CAS token (`None` when the host gave none).
pub type Versioned = (Vec<u8>, Option<u32>);

/// Where bucket states live: proxy-wasm shared data in the filter, a map in tests.
pub trait CounterStore {
    /// The stored bytes and their CAS token (`None` when never written).
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `value` if `cas` still matches; `cas = None` writes unconditionally.
    /// Returns false on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
    /// Writes `value` only if `key` holds nothing yet. Returns false if it
    /// exists: of two VMs creating one bucket, the first wins and the second
    /// cannot reset what the first one has taken since.
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError>;
}

/// The store failed for a reason other than a CAS mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError;

/// Encodes a TAT for storage.
pub fn encode_tat(tat: u64) -> [u8; 8] {
    tat.to_le_bytes()
}

/// Decodes a stored TAT; anything that is not 8 bytes reads as a full bucket.
pub fn decode_tat(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

/// Why a take could not be decided from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeError {
    /// `MAX_CAS_RETRIES` conflicts in a row.
    Contention,
    /// The store refused the write.
    Store,
}

/// Takes one token from the bucket at `key`: read, decide, CAS-write, retry.
/// A denied request writes nothing, unless its TAT was capped.
pub fn take_shared(
    store: &dyn CounterStore,
    key: &str,
    limit: &Limit,
    now: u64,
) -> Result<Outcome, TakeError> {
    for _ in 0..MAX_CAS_RETRIES {
        let (tat, cas) = match store.get(key) {
            Ok(Some((bytes, Some(cas)))) => (decode_tat(&bytes), cas),
            Ok(None) => {
                // Never written: create the full-bucket state unless another
                // VM just did, then decide under CAS.
                store
                    .create(key, &encode_tat(0))
                    .map_err(|_| TakeError::Store)?;
                continue;
            }
            Ok(Some((_, None))) => {
                // A value without a version (no host gives one): replace it
                // so that the next read has one.
                store
                    .set(key, &encode_tat(0), None)
                    .map_err(|_| TakeError::Store)?;
                continue;
            }
            Err(StoreError) => return Err(TakeError::Store),
        };
        let outcome = take(limit, tat, now);
        if !outcome.store {
            return Ok(outcome);
        }
        match store.set(key, &encode_tat(outcome.new_tat), Some(cas)) {
            Ok(true) => return Ok(outcome),
            Ok(false) => continue,
            Err(StoreError) => return Err(TakeError::Store),
        }
    }
    Err(TakeError::Contention)
}

/// Creates an empty-state bucket if none exists, so that later updates are
/// always CAS-protected. Never resets an existing bucket.
pub fn ensure_bucket(store: &dyn CounterStore, key: &str) -> Result<(), StoreError> {
    match store.get(key)? {
        Some((bytes, Some(_))) if bytes.len() == 8 => Ok(()),
        None => store.create(key, &encode_tat(0)).map(|_| ()),
        Some(_) => store.set(key, &encode_tat(0), None).map(|_| ()),
    }
}

#[cfg(test)]
mod tests;
