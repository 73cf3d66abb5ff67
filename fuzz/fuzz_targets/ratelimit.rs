//! Rate-limit arithmetic: `take`, `take_shared` and `take_shared_all` over
//! a `MemStore`, at arbitrary (monotonic) times, with arbitrary limits and
//! stored states, and a store that sometimes loses the CAS race or fails.
//!
//! Checks: nothing panics; the figures of an outcome agree with its verdict;
//! and no limit over-admits: from the first request of a run to the last,
//! each limit admits at most `burst + elapsed / interval` requests
//! (computed in u128). A run starts again where the fuzzer overwrites a
//! stored state, since any state it writes may be a full bucket.
#![no_main]

use std::cell::Cell;

use keygate_core::denial::LimitName;
use keygate_core::ratelimit::{
    take, take_shared, take_shared_all, CounterStore, Limit, NamedLimit, Outcome, StoreError,
    Versioned, MAX_LIMITS,
};
use keygate_core::testing::MemStore;
use keygate_fuzz::byte;
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

/// The longest interval a configuration yields (one request per 366 days).
const MAX_INTERVAL_NS: u64 = 366 * 86_400 * 1_000_000_000;
/// The longest refill time a configuration yields: 1000000 requests at
/// 0.001 per second.
const MAX_TOLERANCE_NS: u128 = 1_000_000_000_000_000_000;

/// A `MemStore` whose next writes can be told to lose the CAS race, or to
/// fail, and whose reads can drop the CAS token.
#[derive(Default)]
struct FlakyStore {
    inner: MemStore,
    lose: Cell<u32>,
    fail: Cell<bool>,
    no_token: Cell<bool>,
}

impl CounterStore for FlakyStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let got = self.inner.get(key)?;
        if self.no_token.replace(false) {
            return Ok(got.map(|(v, _)| (v, None)));
        }
        Ok(got)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        if self.fail.replace(false) {
            return Err(StoreError);
        }
        if self.lose.get() > 0 && cas.is_some() {
            self.lose.set(self.lose.get() - 1);
            return Ok(false);
        }
        self.inner.set(key, value, cas)
    }
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.inner.create(key, value)
    }
}

/// A limit within what a configuration compiles to, built either way a
/// configuration builds one.
fn limit(u: &mut Unstructured<'_>) -> Limit {
    if byte(u) & 1 == 0 {
        let rps = f64::from(u.int_in_range(1u32..=1_000_000_000).unwrap_or(1)) / 1000.0;
        let burst = u.int_in_range(1u64..=1_000_000).unwrap_or(1);
        Limit::new(rps, burst)
    } else {
        let interval_ns = u.int_in_range(1..=MAX_INTERVAL_NS).unwrap_or(1);
        let max_burst = (MAX_TOLERANCE_NS / u128::from(interval_ns)).min(1_000_000) as u64;
        let burst = u.int_in_range(1..=max_burst.max(1)).unwrap_or(1);
        Limit { interval_ns, burst }
    }
}

/// Admissions of one limit in the current run.
#[derive(Clone, Copy)]
struct Run {
    first: Option<u64>,
    admitted: u128,
}

impl Run {
    const NEW: Run = Run {
        first: None,
        admitted: 0,
    };

    fn record(&mut self, limit: &Limit, now: u64, allowed: bool) {
        let first = *self.first.get_or_insert(now);
        if allowed {
            self.admitted += 1;
        }
        let bound =
            u128::from(limit.burst) + u128::from(now - first) / u128::from(limit.interval_ns);
        assert!(
            self.admitted <= bound,
            "{limit:?}: {} admitted in {} ns from {first}, at most {bound}",
            self.admitted,
            now - first
        );
    }
}

fn check_figures(limit: Option<&Limit>, o: &Outcome) {
    if o.allowed {
        assert_eq!(o.info.retry_after_secs, 0, "{o:?}");
        assert!(o.store, "{o:?}");
        if let Some(l) = limit {
            assert!(o.info.remaining < l.burst, "{l:?} {o:?}");
        }
    } else {
        assert!(o.info.retry_after_secs >= 1, "{o:?}");
        assert_eq!(o.info.remaining, 0, "{o:?}");
    }
    assert!(o.info.window_secs >= 1, "{o:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);

    // Limit::new with any rate and burst never panics.
    let any = Limit::new(
        u.arbitrary::<f64>().unwrap_or(1.0),
        u.arbitrary::<u64>().unwrap_or(1),
    );
    assert!(any.interval_ns >= 1 && any.burst >= 1);
    let _ = any.window_secs();

    let single = limit(&mut u);
    let count = 1 + usize::from(byte(&mut u)) % (MAX_LIMITS + 2);
    let names: Vec<NamedLimit> = (0..count)
        .map(|i| NamedLimit {
            name: LimitName::new(&format!("l{i}")).unwrap_or(LimitName::DEFAULT),
            limit: limit(&mut u),
        })
        .collect();
    // take_shared_all uses the first MAX_LIMITS.
    let used = names.len().min(MAX_LIMITS);

    let store = FlakyStore::default();
    // A stored state before the first request, maybe.
    for key in ["one", "all"] {
        if byte(&mut u) & 1 == 1 {
            let len = usize::from(byte(&mut u) % 72);
            let bytes = u.bytes(len.min(u.len())).unwrap_or_default();
            let _ = store.inner.set(key, bytes, None);
        }
    }
    let mut pure_tat: u64 = u.arbitrary().unwrap_or(0);

    let mut now: u64 = match byte(&mut u) % 4 {
        0 => u.arbitrary().unwrap_or(0),
        1 => 0,
        _ => u.arbitrary::<u32>().unwrap_or(0).into(),
    };
    let mut pure_run = Run::NEW;
    let mut one_run = Run::NEW;
    let mut all_runs = [Run::NEW; MAX_LIMITS];

    while !u.is_empty() {
        let op = byte(&mut u);
        match op % 8 {
            // Time moves on: a little, an interval's worth, or a lot.
            0 => {
                let step = match byte(&mut u) % 4 {
                    0 => u64::from(byte(&mut u)),
                    1 => single.interval_ns,
                    2 => u.arbitrary::<u32>().unwrap_or(0).into(),
                    _ => u.arbitrary::<u64>().unwrap_or(0),
                };
                now = now.saturating_add(step);
            }
            1 => {
                let o = take(&single, pure_tat, now);
                check_figures(Some(&single), &o);
                if o.store {
                    pure_tat = o.new_tat;
                }
                pure_run.record(&single, now, o.allowed);
            }
            2 | 3 => {
                if let Ok(o) = take_shared(&store, "one", &single, now) {
                    check_figures(Some(&single), &o);
                    one_run.record(&single, now, o.allowed);
                }
            }
            4 | 5 => {
                if let Ok(o) = take_shared_all(&store, "all", &names, now) {
                    let refusing = names.iter().find(|n| n.name == o.info.policy);
                    check_figures(refusing.map(|n| &n.limit), &o);
                    for (run, n) in all_runs.iter_mut().zip(&names[..used]) {
                        run.record(&n.limit, now, o.allowed);
                    }
                }
            }
            // The store misbehaves on the next operations.
            6 => match byte(&mut u) % 3 {
                0 => store.lose.set(u32::from(byte(&mut u) % 40)),
                1 => store.fail.set(true),
                // A value without a CAS token is replaced by a full
                // bucket (no host gives one): a new run starts.
                _ => {
                    store.no_token.set(true);
                    one_run = Run::NEW;
                    all_runs = [Run::NEW; MAX_LIMITS];
                }
            },
            // Another writer leaves any state: a new run starts.
            _ => {
                let key = if byte(&mut u) & 1 == 0 { "one" } else { "all" };
                let len = usize::from(byte(&mut u) % 72);
                let bytes = u.bytes(len.min(u.len())).unwrap_or_default();
                let _ = store.inner.set(key, bytes, None);
                if key == "one" {
                    one_run = Run::NEW;
                } else {
                    all_runs = [Run::NEW; MAX_LIMITS];
                }
                pure_tat = u.arbitrary().unwrap_or(pure_tat);
                pure_run = Run::NEW;
            }
        }
    }
});
