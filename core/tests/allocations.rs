//! The allowed path allocates nothing of its own: decoding the header map,
//! the decision and the forwarding edits run on borrowed slices. The only
//! allocation left is the bucket state the store returns (in Envoy, the
//! host's copy of the shared-data value, made through the VM's allocator).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::ratelimit::{CounterStore, StoreError, Versioned};
use keygate_core::testing::get_request_wire;
use keygate_core::Host;
use keygate_core::Policy;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

/// Counts allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// One bucket held in place; `get` returns a fresh copy, as the host does.
#[derive(Default)]
struct OneBucket {
    state: Cell<Option<([u8; 8], u32)>>,
}

impl CounterStore for OneBucket {
    fn get(&self, _key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.state.get().map(|(v, cas)| (v.to_vec(), Some(cas))))
    }
    fn set(&self, _key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let current = self.state.get().map(|(_, c)| c);
        if cas.is_some() && cas != current {
            return Ok(false);
        }
        let bytes: [u8; 8] = value.try_into().map_err(|_| StoreError)?;
        self.state.set(Some((bytes, current.unwrap_or(0) + 1)));
        Ok(true)
    }
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        if self.state.get().is_some() {
            return Ok(false);
        }
        self.set(key, value, None)
    }
}

struct TestHost {
    bucket: OneBucket,
}

impl Host for TestHost {
    fn monotonic_ns(&self) -> Option<u64> {
        Some(1_000_000_000_000)
    }
    fn unix_secs(&self) -> Option<i64> {
        Some(1_800_000_000)
    }
    fn source_ip(&self) -> Option<std::net::IpAddr> {
        None
    }
    fn counters(&self) -> &dyn CounterStore {
        &self.bucket
    }
}

const FREE: &str = "free-key-0123456789abcdefghijklmn";
const METERED: &str = "metered-key-0123456789abcdefghijk";

fn policy() -> Policy {
    let config = format!(
        r#"{{"keys":[{{"id":"free","sha256":"{}"}},
            {{"id":"metered","sha256":"{}","rate_limit":{{"requests_per_second":1000,"burst":1000}}}}]}}"#,
        hex::encode(digest(FREE.as_bytes())),
        hex::encode(digest(METERED.as_bytes())),
    );
    Policy::from_json(config.as_bytes()).unwrap()
}

/// Decodes `wire`, decides and walks the edits as the filter does; returns
/// the length of the identity it would set (0 when denied).
fn allowed_request(policy: &Policy, wire: &[u8], host: &TestHost) -> usize {
    let map = HeaderMap::decode(wire).unwrap();
    let decision = policy.decide(&map, host);
    let Decision::Allow(allowed) = decision else {
        return 0; // the callers' identity check fails
    };
    let edits = &allowed.edits;
    let names = edits.remove.iter().copied().chain(edits.strip());
    assert_eq!(names.count(), 1, "the credential header is stripped");
    edits.identity.map_or(0, |(_, id)| id.len())
}

/// Decides one request for `key` after a first one (the warm-up, which also
/// creates a limited key's bucket); returns the identity's length and the
/// allocations the second request made.
fn second_request_allocations(key: &str) -> (usize, usize) {
    let policy = policy();
    let host = TestHost {
        bucket: OneBucket::default(),
    };
    let wire = get_request_wire(Some(key.as_bytes()));
    allowed_request(&policy, &wire, &host);
    let mut identity = 0;
    let n = allocations_during(|| identity = allowed_request(&policy, &wire, &host));
    (identity, n)
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn an_allowed_request_without_a_limit_allocates_nothing() {
    let (identity, n) = second_request_allocations(FREE);
    assert_eq!(identity, "free".len());
    assert_eq!(n, 0, "allocations on the allowed path");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn an_allowed_limited_request_allocates_only_the_bucket_copy() {
    let (identity, n) = second_request_allocations(METERED);
    assert_eq!(identity, "metered".len());
    assert_eq!(n, 1, "allocations on the allowed path with a limit");
}
