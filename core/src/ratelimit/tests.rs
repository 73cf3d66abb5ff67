//! Rate limiting's unit tests: GCRA arithmetic, the CAS loop over a shared
//! store, and the blocked-bucket memo.

use super::blocked::MAX_BLOCKED;
use super::*;
use crate::testing::MemStore;
use std::cell::Cell;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

/// Found by the `ratelimit` fuzz target: with the clock within one interval
/// of `u64::MAX`, the TAT saturated at `u64::MAX` and stopped moving, so
/// every request was admitted, with `remaining` equal to the burst.
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_clock_at_the_end_of_its_range_does_not_admit_everything() {
    let l = Limit::new(1.0, 2);
    let now = u64::MAX - S / 2;
    let mut tat = 0;
    let mut admitted = 0;
    for _ in 0..10 {
        let o = take(&l, tat, now);
        if o.allowed {
            admitted += 1;
            assert!(o.info.remaining < l.burst, "{o:?}");
        } else {
            assert!(o.info.retry_after_secs >= 1, "{o:?}");
        }
        if o.store {
            tat = o.new_tat;
        }
    }
    assert!(admitted <= l.burst, "{admitted} admitted at once");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn clock_going_backwards_does_not_mint_tokens() {
    let l = Limit::new(1.0, 1);
    let o = take(&l, 0, 10 * S);
    assert!(!take(&l, o.new_tat, 9 * S).allowed);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

// Spawns threads: wasm32-unknown-unknown has none (nor has Envoy's VM).
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
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
                    .filter(|_| matches!(take_shared(&*s, "k", &l, 1000 * S), Ok(o) if o.allowed))
                    .count()
            })
        })
        .collect();
    let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 50);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn ensure_bucket_keeps_existing_state() {
    let l = Limit::new(1.0, 1);
    let store = MemStore::default();
    ensure_bucket(&store, "k").unwrap();
    assert!(take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
    ensure_bucket(&store, "k").unwrap();
    assert!(!take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn ensure_bucket_creates_a_full_bucket_and_replaces_a_malformed_one() {
    // Envoy's shared data guards a write with its CAS token only once the
    // key exists: the filter creates every static key's bucket at load, so
    // that two workers' first requests cannot both write unguarded.
    let store = MemStore::default();
    ensure_bucket(&store, "k").unwrap();
    let Some((bytes, Some(_))) = store.get("k").unwrap() else {
        panic!("no bucket created");
    };
    assert_eq!(bytes, encode_tat(0));
    // A full bucket: a burst of 2 admits twice at once.
    let l = Limit::new(1.0, 2);
    assert!(take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
    assert!(take_shared(&store, "k", &l, 5 * S).unwrap().allowed);
    // A value that is no whole number of TATs is replaced with a full bucket.
    for bad in [&b""[..], b"\x01\x02\x03"] {
        let store = MemStore::default();
        store.set("k", bad, None).unwrap();
        ensure_bucket(&store, "k").unwrap();
        assert_eq!(
            store.get("k").unwrap().map(|(v, _)| v),
            Some(encode_tat(0).to_vec())
        );
    }
}

/// A request one limit refuses spends no token of the others, also when
/// that refusal writes the value back (its bucket was further behind than
/// its new limit allows, so its state is capped and stored). Found by
/// mutation testing: keeping the admitting limits' new state on such a
/// refusal went unseen.
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_refusal_by_one_limit_spends_nothing_of_the_others() {
    let named = |name: &str, limit: Limit| NamedLimit {
        name: LimitName::new(name).unwrap(),
        limit,
    };
    let store = MemStore::default();
    let t0 = 100 * S;
    // Under an old, slow `peak` the key's bucket is 1000 s in debt.
    let old = [named("peak", Limit::new(0.001, 1))];
    assert!(take_shared_all(&store, "k", &old, t0).unwrap().allowed);
    // Now `peak` is one a second and `reserve` five in all (it refills once
    // in 1000 s). The first request is refused by `peak`, whose debt is
    // capped and written back; `reserve` must keep its five.
    let limits = [
        named("peak", Limit::new(1.0, 1)),
        named("reserve", Limit::new(0.001, 5)),
    ];
    for _ in 0..3 {
        let o = take_shared_all(&store, "k", &limits, t0).unwrap();
        assert!(!o.allowed);
        assert_eq!(o.info.policy.as_str(), "peak");
    }
    let admitted: Vec<bool> = (1..=6)
        .map(|s| {
            take_shared_all(&store, "k", &limits, t0 + s * S)
                .unwrap()
                .allowed
        })
        .collect();
    assert_eq!(admitted, [true, true, true, true, true, false]);
    let last = take_shared_all(&store, "k", &limits, t0 + 7 * S).unwrap();
    assert_eq!(last.info.policy.as_str(), "reserve");
}

/// When the memo is full of buckets that still block, new ones replace the
/// oldest in turn, so the last `MAX_BLOCKED` refused keys are the ones
/// remembered, not only the very last (found by mutation testing: a
/// replacement cursor that never moved went unseen).
#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_full_memo_replaces_its_oldest_entries_in_turn() {
    let l = Limit::new(0.001, 1);
    let store = MemStore::default();
    let memo = BlockedBuckets::default();
    let now = 100 * S;
    let keys: Vec<String> = (0..MAX_BLOCKED + 2).map(|i| format!("k{i}")).collect();
    for key in &keys {
        assert!(take_with_memo(&memo, &store, key, &l, now).allowed);
        assert!(!take_with_memo(&memo, &store, key, &l, now).allowed);
    }
    assert_eq!(memo.len(), MAX_BLOCKED);
    let remembered: Vec<bool> = keys
        .iter()
        .map(|k| memo.refusal(k, &l, now).is_some())
        .collect();
    // The first two made room for the last two; every other one is kept.
    assert_eq!(remembered.iter().filter(|&&r| r).count(), MAX_BLOCKED);
    assert!(!remembered[0] && !remembered[1], "{remembered:?}");
    assert!(
        remembered[MAX_BLOCKED] && remembered[MAX_BLOCKED + 1],
        "{remembered:?}"
    );
}
