//! Sharing compiled configurations between VMs: fake VMs with their own
//! copy of the configuration, one shared store, and what each ends up
//! serving.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;

use keygate_core::config_share::{self, keys_key, rest_key, Origin, INDEX, SECRET};
use keygate_core::headers::{encode, HeaderMap};
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::poller::Level;
use keygate_core::ratelimit::{CounterStore, StoreError, Versioned};
use keygate_core::testing::{FakeHost, FakeShareHost, MemStore};
use keygate_core::{ConfigError, Policy};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

const S: u64 = 1_000_000_000;

/// `keys_key` or `rest_key`: which part of an entry a case corrupts.
type EntryKey = fn(&str) -> String;

fn config(ids: &[&str]) -> Vec<u8> {
    let keys: Vec<_> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "sha256": hex::encode(digest(format!("secret-{id}").as_bytes()))}))
        .collect();
    serde_json::json!({
        "credential_sources": [{"type": "header", "name": "x-api-key"}],
        "keys": keys,
        "rules": [{"name": "health", "match": {"path": "/healthz"}, "action": "public"}],
        "default_action": "require_key"
    })
    .to_string()
    .into_bytes()
}

/// What a request to `path` with key `k` gets from `policy`.
fn verdict(policy: &Policy, path: &str, k: &str) -> String {
    let secret = format!("secret-{k}");
    let wire = encode(&[
        (b":method", b"GET"),
        (b":path", path.as_bytes()),
        (b":authority", b"api.example.com"),
        (b"x-api-key", secret.as_bytes()),
    ]);
    let map = HeaderMap::decode(&wire).unwrap();
    match policy.decide(&map, &FakeHost::default()) {
        Decision::Allow(_) => "allowed".into(),
        Decision::Deny(d) => d.denial.code.as_str().into(),
    }
}

fn load(store: &MemStore, vm: &FakeShareHost) -> (Policy, Origin) {
    config_share::load(vm.config.len(), store, vm).unwrap()
}

/// The id `vm` files its configuration under.
fn id_of(store: &MemStore, vm: &FakeShareHost) -> String {
    config_share::configuration_id(vm.config.len(), store, vm).unwrap()
}

fn assert_serves_a_and_b(policy: &Policy) {
    assert_eq!(verdict(policy, "/x", "a"), "allowed");
    assert_eq!(verdict(policy, "/x", "b"), "allowed");
    assert_eq!(verdict(policy, "/x", "c"), "invalid_api_key");
    assert_eq!(verdict(policy, "/healthz", "c"), "allowed");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_first_vm_compiles_and_the_others_adopt() {
    let store = MemStore::default();
    let cfg = config(&["a", "b"]);
    // Each VM would draw its own secret; the first one drawn is kept.
    let (first, second) = (
        FakeShareHost::new(&cfg, 1, S),
        FakeShareHost::new(&cfg, 2, 2 * S),
    );
    let (p1, o1) = load(&store, &first);
    let (p2, o2) = load(&store, &second);
    assert_eq!((o1, o2), (Origin::Compiled, Origin::Adopted));
    assert_serves_a_and_b(&p1);
    assert_serves_a_and_b(&p2);
    assert_eq!(id_of(&store, &first), id_of(&store, &second));
    assert!(first.logs.borrow().is_empty() && second.logs.borrow().is_empty());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn another_configuration_is_compiled_not_adopted() {
    let store = MemStore::default();
    let (first, other) = (
        FakeShareHost::new(&config(&["a", "b"]), 1, S),
        FakeShareHost::new(&config(&["a", "b", "c"]), 1, S),
    );
    load(&store, &first);
    let (policy, origin) = load(&store, &other);
    assert_eq!(origin, Origin::Compiled);
    assert_eq!(verdict(&policy, "/x", "c"), "allowed");
    assert_ne!(id_of(&store, &first), id_of(&store, &other));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn ids_depend_on_the_secret() {
    let cfg = config(&["a"]);
    let (one, two) = (MemStore::default(), MemStore::default());
    let (x, y) = (
        FakeShareHost::new(&cfg, 1, S),
        FakeShareHost::new(&cfg, 2, S),
    );
    assert_ne!(id_of(&one, &x), id_of(&two, &y));
    assert_eq!(id_of(&one, &x), id_of(&one, &y), "same Envoy, same secret");
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_corrupt_or_absent_entry_falls_back_to_compiling() {
    let cfg = config(&["a", "b"]);
    let corruptions: Vec<(&str, EntryKey, &[u8], Option<&str>)> = vec![
        ("key store not a key store", keys_key, b"garbage", None),
        ("key store emptied (freed)", keys_key, b"", None),
        ("rest emptied (freed)", rest_key, b"", None),
        ("rest not JSON", rest_key, b"{not json", Some("shared configuration not used")),
        (
            "rest with keys",
            rest_key,
            br#"{"credential_sources":[{"type":"header","name":"x-api-key"}],"keys":[{"id":"z","sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
            Some("expected a configuration without keys"),
        ),
    ];
    for (case, key, bytes, warning) in corruptions {
        let store = MemStore::default();
        let first = FakeShareHost::new(&cfg, 1, S);
        load(&store, &first);
        store
            .set(&key(&id_of(&store, &first)), bytes, None)
            .unwrap();
        let second = FakeShareHost::new(&cfg, 2, 2 * S);
        let (policy, origin) = load(&store, &second);
        assert_eq!(origin, Origin::Compiled, "{case}");
        assert_serves_a_and_b(&policy);
        let warned = second.logged(Level::Warn);
        match warning {
            Some(w) => assert!(warned.iter().any(|l| l.contains(w)), "{case}: {warned:?}"),
            None => assert!(warned.is_empty(), "{case}: {warned:?}"),
        }
        // Compiling republished it: the next VM adopts again.
        let third = FakeShareHost::new(&cfg, 3, 3 * S);
        assert_eq!(load(&store, &third).1, Origin::Adopted, "{case}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn without_randomness_or_a_readable_chunk_nothing_is_shared() {
    let cfg = config(&["a", "b"]);
    let store = MemStore::default();
    let mut vm = FakeShareHost::new(&cfg, 1, S);
    vm.secret = None;
    assert_eq!(load(&store, &vm).1, Origin::Compiled);
    assert_eq!(load(&store, &vm).1, Origin::Compiled);
    assert_eq!(store.get(INDEX).unwrap(), None, "nothing published");
    // A configuration the host announces longer than it is cannot be hashed.
    let vm = FakeShareHost::new(&cfg, 1, S);
    let (policy, origin) = config_share::load(cfg.len() + 10, &store, &vm).unwrap();
    assert_eq!(origin, Origin::Compiled);
    assert_serves_a_and_b(&policy);
    assert_eq!(store.get(INDEX).unwrap(), None);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_configuration_larger_than_a_chunk_is_shared_too() {
    let mut cfg = config(&["a", "b"]);
    // JSON whitespace: another configuration byte for byte, the same policy.
    let pad = config_share::CHUNK + 10;
    cfg.splice(1..1, std::iter::repeat_n(b' ', pad));
    let store = MemStore::default();
    let short = FakeShareHost::new(&config(&["a", "b"]), 1, S);
    let (long1, long2) = (
        FakeShareHost::new(&cfg, 1, S),
        FakeShareHost::new(&cfg, 2, S),
    );
    assert_eq!(load(&store, &short).1, Origin::Compiled);
    assert_eq!(load(&store, &long1).1, Origin::Compiled);
    let (policy, origin) = load(&store, &long2);
    assert_eq!(origin, Origin::Adopted);
    assert_serves_a_and_b(&policy);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn entries_past_the_keep_period_are_freed_by_the_next_publication() {
    let store = MemStore::default();
    let old = FakeShareHost::new(&config(&["a", "b"]), 1, S);
    load(&store, &old);
    let old_id = id_of(&store, &old);
    // Within a minute, a new configuration leaves the old entry alone.
    load(&store, &FakeShareHost::new(&config(&["c"]), 1, 60 * S));
    assert_eq!(
        load(&store, &FakeShareHost::new(&old.config, 1, 61 * S)).1,
        Origin::Adopted
    );
    // Past it, the next publication frees it, and it is compiled again.
    let newer = FakeShareHost::new(&config(&["d"]), 1, 62 * S);
    load(&store, &newer);
    assert_eq!(
        newer.logged(Level::Debug),
        ["freed 1 shared compiled configuration(s) published over 60 s ago"]
    );
    assert_eq!(store.get(&keys_key(&old_id)).unwrap().unwrap().0, b"");
    let late = FakeShareHost::new(&old.config, 1, 63 * S);
    let (policy, origin) = load(&store, &late);
    assert_eq!(origin, Origin::Compiled);
    assert_serves_a_and_b(&policy);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_keep_period_comes_from_the_environment_when_valid() {
    for (setting, freed) in [
        ("5", true),
        ("600", false),
        ("soon", false),
        ("86401", false),
    ] {
        let store = MemStore::default();
        let old = FakeShareHost::new(&config(&["a"]), 1, S);
        load(&store, &old);
        let mut newer = FakeShareHost::new(&config(&["b"]), 1, 10 * S);
        newer.keep = Some(setting.into());
        load(&store, &newer);
        let adopted =
            load(&store, &FakeShareHost::new(&old.config, 1, 11 * S)).1 == Origin::Adopted;
        assert_eq!(adopted, !freed, "{setting}");
        let warned = newer.logged(Level::Warn);
        let valid = setting.parse::<u64>().is_ok_and(|s| s <= 86_400);
        assert_eq!(warned.len(), usize::from(!valid), "{setting}: {warned:?}");
    }
}

/// A store on which a rival VM loads its configuration just before this
/// VM's first create-if-absent of `key`: the race two VMs starting at once run.
struct Racing<'a> {
    inner: &'a MemStore,
    key: &'static str,
    rival: RefCell<Option<FakeShareHost>>,
}

impl CounterStore for Racing<'_> {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        self.inner.set(key, value, cas)
    }
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        if key == self.key {
            if let Some(rival) = self.rival.borrow_mut().take() {
                load(self.inner, &rival);
            }
        }
        self.inner.create(key, value)
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn two_vms_starting_at_once_agree_on_one_secret() {
    let store = MemStore::default();
    let cfg = config(&["a", "b"]);
    let rival = FakeShareHost::new(&cfg, 9, S);
    let racing = Racing {
        inner: &store,
        key: SECRET,
        rival: RefCell::new(Some(rival)),
    };
    let me = FakeShareHost::new(&cfg, 1, S);
    let (policy, origin) = config_share::load(cfg.len(), &racing, &me).unwrap();
    // The rival's secret won, so its published entry is this VM's too.
    assert_eq!(origin, Origin::Adopted);
    assert_serves_a_and_b(&policy);
    assert_eq!(store.get(SECRET).unwrap().unwrap().0, [9u8; 16]);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn two_vms_creating_the_index_at_once_both_get_listed() {
    let store = MemStore::default();
    let rival = FakeShareHost::new(&config(&["a"]), 1, S);
    let racing = Racing {
        inner: &store,
        key: INDEX,
        rival: RefCell::new(Some(rival)),
    };
    let me = FakeShareHost::new(&config(&["b"]), 1, S);
    let cfg = me.config.clone();
    assert_eq!(
        config_share::load(cfg.len(), &racing, &me).unwrap().1,
        Origin::Compiled
    );
    let (index, _) = store.get(INDEX).unwrap().unwrap();
    assert_eq!(keygate_core::published::parse(&index).len(), 2);
    assert!(me.logged(Level::Warn).is_empty());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn invalid_or_unreadable_configurations_report_errors_and_publish_nothing() {
    let store = MemStore::default();
    let vm = FakeShareHost::new(br#"{"keys": 3}"#, 1, S);
    let errors: Vec<ConfigError> = config_share::load(vm.config.len(), &store, &vm).unwrap_err();
    assert!(!errors.is_empty());
    let mut vm = FakeShareHost::new(&config(&["a"]), 1, S);
    vm.unreadable = Some("2".into());
    let errors = config_share::load(vm.config.len(), &store, &vm).unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "configuration: cannot read the plugin configuration (status 2)"
    );
    assert_eq!(store.get(INDEX).unwrap(), None);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn two_filters_in_one_envoy_each_adopt_their_own_keys() {
    // Two keygate filters (two configurations) published in one Envoy: a
    // worker adopting either gets that filter's keys, never the other's.
    let store = MemStore::default();
    let (ab, c) = (config(&["a", "b"]), config(&["c"]));
    load(&store, &FakeShareHost::new(&ab, 1, S));
    load(&store, &FakeShareHost::new(&c, 1, S));
    let (for_ab, origin_ab) = load(&store, &FakeShareHost::new(&ab, 2, 2 * S));
    let (for_c, origin_c) = load(&store, &FakeShareHost::new(&c, 2, 2 * S));
    assert_eq!((origin_ab, origin_c), (Origin::Adopted, Origin::Adopted));
    assert_serves_a_and_b(&for_ab);
    assert_eq!(verdict(&for_c, "/x", "c"), "allowed");
    assert_eq!(verdict(&for_c, "/x", "a"), "invalid_api_key");
}
