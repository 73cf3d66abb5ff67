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
mod tests {
    use super::blocked::MAX_BLOCKED;
    use super::*;
    use crate::testing::MemStore;
    use std::cell::Cell;

    const S: u64 = NANOS;

    /// A store that lets a rival VM run in the gap after this VM's first
    /// read found no bucket: the rival creates the bucket and takes a token.
    struct RivalInTheGap<'a> {
        inner: &'a MemStore,
        limit: Limit,
        now: u64,
        raced: Cell<bool>,
    }

    impl CounterStore for RivalInTheGap<'_> {
        fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            if !self.raced.replace(true) {
                let rival = take_shared(self.inner, key, &self.limit, self.now);
                assert!(
                    rival.is_ok_and(|o| o.allowed),
                    "the rival takes the only token"
                );
                return Ok(None);
            }
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            self.inner.set(key, value, cas)
        }
        fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
            self.inner.create(key, value)
        }
    }

    #[test]
    fn a_bucket_created_by_a_rival_in_the_gap_keeps_its_token() {
        let store = MemStore::default();
        let racing = RivalInTheGap {
            inner: &store,
            limit: Limit::new(1.0, 1),
            now: 100 * S,
            raced: Cell::new(false),
        };
        let ours = take_shared(&racing, "k", &racing.limit, racing.now).unwrap();
        assert!(
            !ours.allowed,
            "burst 1 and the rival took it: this one must wait"
        );
        assert_eq!(ours.info.retry_after_secs, 1);
    }

    /// A store that counts reads, around a shared [`MemStore`].
    struct CountingStore<'a> {
        inner: &'a MemStore,
        gets: Cell<usize>,
    }

    impl CounterStore for CountingStore<'_> {
        fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.gets.set(self.gets.get() + 1);
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            self.inner.set(key, value, cas)
        }
        fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
            self.inner.create(key, value)
        }
    }

    /// One VM's step: its memo first, then the shared store, as the policy does.
    fn take_with_memo(
        memo: &BlockedBuckets,
        store: &dyn CounterStore,
        key: &str,
        limit: &Limit,
        now: u64,
    ) -> Outcome {
        if let Some(o) = memo.refusal(key, limit, now) {
            return o;
        }
        let o = take_shared(store, key, limit, now).unwrap();
        memo.record(key, limit, now, &o);
        o
    }

    #[test]
    fn a_remembered_block_refuses_without_a_read_and_with_the_same_figures() {
        let l = Limit::new(1.0, 2);
        let shared = MemStore::default();
        let store = CountingStore {
            inner: &shared,
            gets: Cell::new(0),
        };
        let memo = BlockedBuckets::default();
        let now = 100 * S;
        assert!(take_with_memo(&memo, &store, "k", &l, now).allowed);
        assert!(take_with_memo(&memo, &store, "k", &l, now).allowed);
        assert!(memo.is_empty(), "admissions are not remembered");
        let first = take_with_memo(&memo, &store, "k", &l, now);
        assert!(!first.allowed);
        assert_eq!(memo.len(), 1);
        let reads = store.gets.get();
        let again = take_with_memo(&memo, &store, "k", &l, now + S / 2);
        assert_eq!(store.gets.get(), reads, "refused from the memo");
        assert_eq!(
            again,
            take(
                &l,
                decode_tat(&shared.get("k").unwrap().unwrap().0),
                now + S / 2
            )
        );
        // Another limit for the same bucket (a reload) reads the store again.
        let other = Limit::new(10.0, 2);
        assert!(memo.refusal("k", &other, now + S / 2).is_none());
        // Once the bucket refills, the memo no longer decides.
        assert!(memo.refusal("k", &l, now + S).is_none());
        assert!(take_with_memo(&memo, &store, "k", &l, now + S).allowed);
    }

    #[test]
    fn vms_with_memos_decide_exactly_as_the_shared_bucket_alone() {
        // Three VMs, each with its memo, over one store, against a reference
        // that always reads the store: same decisions, same figures, in a
        // pseudo-random interleaving of keys, VMs and small time steps.
        let limits = [
            Limit::new(5.0, 3),
            Limit::new(0.5, 1),
            Limit::new(100.0, 10),
        ];
        let shared = MemStore::default();
        let reference = MemStore::default();
        let memos = [
            BlockedBuckets::default(),
            BlockedBuckets::default(),
            BlockedBuckets::default(),
        ];
        let mut now = 1_000 * S;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut refused = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % (S / 20);
            let k = (x >> 20) as usize % limits.len();
            let vm = (x >> 30) as usize % memos.len();
            let key = ["a", "b", "c"][k];
            let ours = take_with_memo(&memos[vm], &shared, key, &limits[k], now);
            let truth = take_shared(&reference, key, &limits[k], now).unwrap();
            assert_eq!(ours, truth, "key {key} on vm {vm} at {now}");
            refused += usize::from(!truth.allowed);
        }
        assert!(refused > 1_000, "the run must refuse often: {refused}");
    }

    #[test]
    fn the_memo_stays_bounded() {
        let l = Limit::new(0.001, 1);
        let store = MemStore::default();
        let memo = BlockedBuckets::default();
        let now = 100 * S;
        for i in 0..(MAX_BLOCKED + 10) {
            let key = format!("k{i}");
            assert!(take_with_memo(&memo, &store, &key, &l, now).allowed);
            assert!(!take_with_memo(&memo, &store, &key, &l, now).allowed);
            assert!(memo.len() <= MAX_BLOCKED);
        }
        assert!(!memo.is_empty());
    }

    #[test]
    fn burst_then_refill() {
        let l = Limit::new(2.0, 3);
        let store = MemStore::default();
        let now = 100 * S;
        let admitted: Vec<bool> = (0..5)
            .map(|_| take_shared(&store, "k", &l, now).unwrap().allowed)
            .collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        let denied = take_shared(&store, "k", &l, now).unwrap();
        assert_eq!(denied.info.remaining, 0);
        assert_eq!(denied.info.retry_after_secs, 1);
        assert_eq!(denied.info.window_secs, 2);
        // After one interval (0.5 s) exactly one more is admitted.
        assert!(take_shared(&store, "k", &l, now + S / 2).unwrap().allowed);
        assert!(!take_shared(&store, "k", &l, now + S / 2).unwrap().allowed);
    }

    #[test]
    fn remaining_counts_down() {
        let l = Limit::new(10.0, 4);
        let r: Vec<u64> = (0..4)
            .map(|_| 0)
            .scan(0u64, |tat, _| {
                let o = take(&l, *tat, 5 * S);
                *tat = o.new_tat;
                Some(o.info.remaining)
            })
            .collect();
        assert_eq!(r, [3, 2, 1, 0]);
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let l = Limit::new(0.1, 1); // one per 10 s
        let o1 = take(&l, 0, 50 * S);
        assert!(o1.allowed);
        let o2 = take(&l, o1.new_tat, 50 * S + 1);
        assert!(!o2.allowed);
        assert_eq!(o2.info.retry_after_secs, 10);
        let o3 = take(&l, o1.new_tat, 60 * S - 1);
        assert_eq!(o3.info.retry_after_secs, 1);
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let l = Limit::new(1.0, 1);
        let o = take(&l, 0, 10 * S);
        assert!(!take(&l, o.new_tat, 9 * S).allowed);
    }

    #[test]
    fn a_raised_limit_applies_within_its_own_window() {
        let slow = Limit::new(0.001, 1); // one per 1000 s
        let fast = Limit::new(100.0, 100); // window 1 s
        let store = MemStore::default();
        let now = 10 * S;
        assert!(take_shared(&store, "k", &slow, now).unwrap().allowed);
        let blocked = take_shared(&store, "k", &slow, now).unwrap();
        assert_eq!(blocked.info.retry_after_secs, 1000);
        // The configuration now says 100/s: at most one second of waiting.
        let first = take_shared(&store, "k", &fast, now).unwrap();
        assert!(!first.allowed);
        assert_eq!(first.info.retry_after_secs, 1);
        // Capped to an empty bucket of the new limit, which refills at 100/s.
        let soon = now + S / 100;
        assert!(take_shared(&store, "k", &fast, soon).unwrap().allowed);
        assert!(!take_shared(&store, "k", &fast, soon).unwrap().allowed);
        let later = now + 2 * S;
        let after: Vec<bool> = (0..101)
            .map(|_| take_shared(&store, "k", &fast, later).unwrap().allowed)
            .collect();
        assert_eq!(
            after.iter().filter(|&&a| a).count(),
            100,
            "a full bucket of the new limit"
        );
    }

    #[test]
    fn a_lowered_burst_keeps_at_most_its_own_debt() {
        let big = Limit::new(1.0, 100);
        let small = Limit::new(1.0, 2);
        let store = MemStore::default();
        let now = 1000 * S;
        for _ in 0..60 {
            assert!(take_shared(&store, "k", &big, now).unwrap().allowed);
        }
        // 60 s of debt under the old burst; the new one allows 2 s of it.
        let o = take_shared(&store, "k", &small, now).unwrap();
        assert!(!o.allowed);
        assert_eq!(o.info.retry_after_secs, 1);
        assert!(take_shared(&store, "k", &small, now + S).unwrap().allowed);
    }

    #[test]
    fn under_one_limit_a_denial_writes_nothing() {
        let l = Limit::new(1.0, 3);
        let mut tat = 0;
        for _ in 0..3 {
            tat = take(&l, tat, 50 * S).new_tat;
        }
        let denied = take(&l, tat, 50 * S);
        assert!(!denied.allowed && !denied.store);
        // A clock a little behind the writer's is not another limit.
        let behind = take(&l, tat, 50 * S - S / 2);
        assert!(!behind.allowed && !behind.store);
    }

    #[test]
    fn concurrent_takers_never_over_admit() {
        let l = Limit::new(1.0, 50); // no refill within the test's instant
        let store = std::sync::Arc::new(MemStore::default());
        ensure_bucket(&*store, "k").unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(
                            |_| matches!(take_shared(&*s, "k", &l, 1000 * S), Ok(o) if o.allowed),
                        )
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 50);
    }

    #[test]
    fn ensure_bucket_keeps_existing_state() {
        let l = Limit::new(1.0, 1);
        let store = MemStore::default();
        ensure_bucket(&store, "k").unwrap();
        assert!(take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
        ensure_bucket(&store, "k").unwrap();
        assert!(!take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
    }
}
