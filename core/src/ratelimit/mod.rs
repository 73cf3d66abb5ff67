//! Per-key rate limiting with GCRA (a token bucket kept as one timestamp).
//!
//! The whole state of a bucket is its theoretical arrival time (TAT), eight
//! bytes in shared data. A request is admitted when moving the TAT forward by
//! one emission interval keeps it within `burst` intervals of now. Updates go
//! through compare-and-swap so that every Envoy worker sees one bucket.

mod blocked;
mod bucket;

pub use blocked::BlockedBuckets;
pub use bucket::{bucket_scope, consumer_scope, BucketName, BUCKET_PREFIX, CONSUMER_PREFIX};

use crate::config::RateLimitConfig;
use crate::denial::LimitName;
use crate::denial::RateInfo;
use crate::duration::parse_duration_ms;
use crate::error::{err, ConfigError};

const NANOS: u64 = 1_000_000_000;
/// Longest window a limit may take to refill (a quota per 366 days at most):
/// it keeps `interval * burst` far below `u64::MAX` nanoseconds.
const MAX_WINDOW_MS: u64 = 366 * 86_400_000;
/// Longest emission interval: one request per window.
const MAX_INTERVAL_NS: u64 = MAX_WINDOW_MS * 1_000_000;

/// Bounded CAS retries before failing closed.
pub const MAX_CAS_RETRIES: usize = 32;

/// A compiled limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Nanoseconds between two admitted requests at the sustained rate.
    pub interval_ns: u64,
    /// Bucket size.
    pub burst: u64,
}

impl Limit {
    /// Compiles one limit at `field` (`requests_per_second` and `burst`, or
    /// `requests` per `per` with an optional `burst`), recording each problem
    /// with its path.
    pub(crate) fn from_config(
        l: &RateLimitConfig,
        field: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Option<Limit> {
        let before = errors.len();
        let mut problem = |name: &str, message: &str| {
            errors.push(err(format!("{field}.{name}"), message));
        };
        let burst = match l.burst {
            Some(b) if (1..=1_000_000).contains(&b) => Some(b as u64),
            Some(_) => {
                problem("burst", "must be an integer from 1 to 1000000");
                None
            }
            None => None,
        };
        let limit = match (l.requests_per_second, l.requests, l.per.as_deref()) {
            (Some(rps), None, None) => {
                if !(rps.is_finite() && (0.001..=1_000_000.0).contains(&rps)) {
                    problem(
                        "requests_per_second",
                        "must be a number from 0.001 to 1000000",
                    );
                }
                if l.burst.is_none() {
                    problem("burst", "is required with requests_per_second");
                }
                burst.map(|b| Limit::new(rps, b))
            }
            (None, Some(requests), Some(per)) => {
                let per_ms = parse_duration_ms(per).filter(|ms| (1..=MAX_WINDOW_MS).contains(ms));
                if per_ms.is_none() {
                    problem(
                        "per",
                        "must be a duration from 1ms to 366d, e.g. \"1s\", \"1h\", \"30d\"",
                    );
                }
                if !(1..=1_000_000_000).contains(&requests) {
                    problem("requests", "must be an integer from 1 to 1000000000");
                }
                if l.burst.is_none() && requests > 1_000_000 {
                    problem("burst", "must be given when requests is over 1000000");
                }
                let limit = per_ms
                    .map(|ms| Limit::per_window(requests.max(1), ms, burst.unwrap_or(requests)));
                if limit.is_some_and(|l| l.tolerance_ns() > MAX_WINDOW_MS * 1_000_000) {
                    problem(
                        "burst",
                        "makes the bucket take longer than 366 days to refill",
                    );
                }
                limit
            }
            _ => {
                problem(
                    "requests_per_second",
                    "give requests_per_second (with burst), or requests and per",
                );
                None
            }
        };
        limit.filter(|_| errors.len() == before)
    }

    /// `requests` per `window_ms`, with a bucket of `burst`.
    fn per_window(requests: u64, window_ms: u64, burst: u64) -> Self {
        let interval_ns = (u128::from(window_ms) * 1_000_000 / u128::from(requests.max(1)))
            .clamp(1, u128::from(MAX_INTERVAL_NS));
        Limit {
            interval_ns: interval_ns as u64,
            burst: burst.max(1),
        }
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

/// Most limits one key may have.
pub const MAX_LIMITS: usize = 8;

/// A limit and the name a 429 shows for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NamedLimit {
    /// Its name (`default` for a lone `rate_limit`).
    pub name: LimitName,
    /// The limit.
    pub limit: Limit,
}

/// Compiles `rate_limit` or `rate_limits` at `field` (their parent's path):
/// a lone limit is named `default`; a list needs unique names.
pub(crate) fn compile_limits(
    single: Option<&RateLimitConfig>,
    list: &[RateLimitConfig],
    field: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<NamedLimit> {
    let at = |name: &str| {
        if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        }
    };
    if single.is_some() && !list.is_empty() {
        errors.push(err(
            at("rate_limits"),
            "give rate_limit or rate_limits, not both",
        ));
    }
    if list.len() > MAX_LIMITS {
        errors.push(err(
            at("rate_limits"),
            format!("at most {MAX_LIMITS} limits"),
        ));
    }
    let mut out = Vec::new();
    if let Some(l) = single {
        let name = match l.name.as_deref() {
            None => Some(LimitName::DEFAULT),
            Some(n) => named(n, &at("rate_limit.name"), errors),
        };
        let limit = Limit::from_config(l, &at("rate_limit"), errors);
        out.extend(
            name.zip(limit)
                .map(|(name, limit)| NamedLimit { name, limit }),
        );
    }
    for (i, l) in list.iter().enumerate().take(MAX_LIMITS) {
        let field = at(&format!("rate_limits[{i}]"));
        let name = match l.name.as_deref() {
            None => {
                errors.push(err(
                    format!("{field}.name"),
                    "a limit in a list needs a name",
                ));
                None
            }
            Some(n) => named(n, &format!("{field}.name"), errors),
        };
        if name.is_some_and(|n| out.iter().any(|o: &NamedLimit| o.name == n)) {
            errors.push(err(format!("{field}.name"), "two limits have this name"));
        }
        let limit = Limit::from_config(l, &field, errors);
        out.extend(
            name.zip(limit)
                .map(|(name, limit)| NamedLimit { name, limit }),
        );
    }
    out
}

fn named(name: &str, field: &str, errors: &mut Vec<ConfigError>) -> Option<LimitName> {
    let n = LimitName::new(name);
    if n.is_none() {
        errors.push(err(field, "must be 1-16 characters of A-Z a-z 0-9 _ - ."));
    }
    n
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
    // A TAT past `u64::MAX` cannot be stored: saturating it would stop the
    // bucket from filling, and admit every request. Such a request (a clock
    // within one interval of the end of its range) is refused.
    let next = base.checked_add(limit.interval_ns);
    let ahead = next.map_or(u64::MAX, |t| t - now);
    let Some(new_tat) = next.filter(|_| ahead <= tolerance) else {
        let wait = ahead.saturating_sub(tolerance);
        return Outcome {
            allowed: false,
            store: capped,
            new_tat: tat,
            info: RateInfo {
                policy: LimitName::DEFAULT,
                burst: limit.burst,
                window_secs: limit.window_secs(),
                remaining: 0,
                retry_after_secs: ceil_secs(wait).max(1),
            },
        };
    };
    Outcome {
        allowed: true,
        store: true,
        new_tat,
        info: RateInfo {
            policy: LimitName::DEFAULT,
            burst: limit.burst,
            window_secs: limit.window_secs(),
            remaining: (tolerance - ahead) / limit.interval_ns,
            retry_after_secs: 0,
        },
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

/// Takes one token from every limit of `limits` in the one shared-data
/// value at `key` (eight bytes of TAT per limit, in order), under CAS:
/// tokens are spent only when every limit admits, so a request one limit
/// refuses drains none of the others. A refusal carries the figures of the
/// limit that asks for the longest wait.
pub fn take_shared_all(
    store: &dyn CounterStore,
    key: &str,
    limits: &[NamedLimit],
    now: u64,
) -> Result<Outcome, TakeError> {
    let limits = limits
        .get(..limits.len().min(MAX_LIMITS))
        .unwrap_or_default();
    let size = 8 * limits.len();
    let empty = [0u8; 8 * MAX_LIMITS];
    let empty = empty.get(..size).unwrap_or_default();
    for _ in 0..MAX_CAS_RETRIES {
        let (stored, cas) = match store.get(key) {
            Ok(Some((bytes, Some(cas)))) => (bytes, cas),
            Ok(None) => {
                store.create(key, empty).map_err(|_| TakeError::Store)?;
                continue;
            }
            Ok(Some((_, None))) => {
                store.set(key, empty, None).map_err(|_| TakeError::Store)?;
                continue;
            }
            Err(StoreError) => return Err(TakeError::Store),
        };
        let mut value = [0u8; 8 * MAX_LIMITS];
        let mut refused: Option<Outcome> = None;
        let mut tightest: Option<Outcome> = None;
        let mut capped = false;
        let mut outcomes = [None; MAX_LIMITS];
        for (i, named) in limits.iter().enumerate() {
            let tat = stored.get(8 * i..8 * i + 8).map_or(0, decode_tat);
            let mut o = take(&named.limit, tat, now);
            o.info.policy = named.name;
            if o.allowed {
                if tightest.is_none_or(|t| o.info.remaining < t.info.remaining) {
                    tightest = Some(o);
                }
            } else {
                capped |= o.store;
                if refused.is_none_or(|r| o.info.retry_after_secs > r.info.retry_after_secs) {
                    refused = Some(o);
                }
            }
            if let Some(slot) = outcomes.get_mut(i) {
                *slot = Some((tat, o));
            }
        }
        for (i, (tat, o)) in outcomes.iter().flatten().enumerate() {
            // Admitted: every limit moves on. Refused: none spends a token;
            // only a capped TAT (see `take`) is written back.
            let keep = if refused.is_none() || !o.allowed {
                o.new_tat
            } else {
                *tat
            };
            if let Some(slot) = value.get_mut(8 * i..8 * i + 8) {
                slot.copy_from_slice(&encode_tat(keep));
            }
        }
        let outcome = match (refused, tightest) {
            (Some(r), _) => r,
            (None, Some(t)) => t,
            (None, None) => return Err(TakeError::Store),
        };
        if refused.is_some() && !capped {
            return Ok(outcome);
        }
        match store.set(key, value.get(..size).unwrap_or_default(), Some(cas)) {
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
        // One TAT, or several for a key with several limits.
        Some((bytes, Some(_))) if !bytes.is_empty() && bytes.len() % 8 == 0 => Ok(()),
        None => store.create(key, &encode_tat(0)).map(|_| ()),
        Some(_) => store.set(key, &encode_tat(0), None).map(|_| ()),
    }
}

#[cfg(test)]
mod tests;
