//! The key store's unit tests: lookup, duplicates, profiles, the wire form
//! and the merged key set.

use super::*;
use crate::denial::LimitName;
use crate::ratelimit::{Limit, NamedLimit};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

fn store(keys: &[(&str, &str)]) -> Result<KeyStore, Vec<Clash>> {
    let mut b = KeyStoreBuilder::default();
    for (i, (key, id)) in keys.iter().enumerate() {
        b.push(digest(key.as_bytes()), id, Profile::default(), i as u32);
    }
    b.build()
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn lookup_finds_exact_key_only() {
    let store = store(&[("alpha", "a"), ("beta", "b")]).unwrap();
    assert_eq!(store.lookup(b"alpha").unwrap().id(), "a");
    assert_eq!(store.lookup(b"beta").unwrap().id(), "b");
    assert!(store.lookup(b"Alpha").is_none());
    assert!(store.lookup(b"alpha ").is_none());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn duplicates_are_reported_by_source_position() {
    let err = store(&[("x", "a"), ("y", "b"), ("x", "c"), ("z", "b")]).unwrap_err();
    let digest_clash = Clash::Digest {
        id: "c".into(),
        first: 0,
        later: 2,
    };
    let id_clash = Clash::Id {
        id: "b".into(),
        first: 1,
        later: 3,
    };
    assert!(err.contains(&digest_clash), "{err:?}");
    assert!(err.contains(&id_clash), "{err:?}");
    assert_eq!(err.len(), 2);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn parses_hex_digests() {
    let h = hex::encode(digest(b"k"));
    assert_eq!(parse_digest(&h), Some(digest(b"k")));
    assert_eq!(parse_digest(&h.to_uppercase()), Some(digest(b"k")));
    assert_eq!(parse_digest(&h[..63]), None);
    assert_eq!(parse_digest(&format!("{}zz", &h[..62])), None);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn profiles_are_interned_and_survive_the_wire_form() {
    let limited = Profile {
        limits: vec![NamedLimit {
            name: LimitName::DEFAULT,
            limit: Limit::new(5.0, 10),
        }],
        meta: KeyMeta {
            scopes: vec!["read".into()],
            allowed_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..KeyMeta::default()
        },
    };
    let mut b = KeyStoreBuilder::default();
    for i in 0..1000u32 {
        let p = if i % 2 == 0 {
            limited.clone()
        } else {
            Profile::default()
        };
        b.push(
            digest(format!("key-{i}").as_bytes()),
            &format!("id-{i}"),
            p,
            i,
        );
    }
    let built = b.build().unwrap();
    assert_eq!(built.len(), 1000);
    assert_eq!(built.profile_count(), 2);
    let copy = KeyStore::from_bytes(built.as_bytes().to_vec()).unwrap();
    for i in 0..1000u32 {
        let k = copy.lookup(format!("key-{i}").as_bytes()).unwrap();
        assert_eq!(k.id(), format!("id-{i}"));
        assert_eq!(!k.limits().is_empty(), i % 2 == 0);
        assert_eq!(k.meta().scopes.len(), usize::from(i % 2 == 0));
    }
    assert!(copy.lookup(b"key-1000").is_none());
    // About 40 bytes per key plus the id.
    assert!(built.as_bytes().len() < 1000 * (40 + 6) + 300);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn corrupt_wire_forms_are_refused() {
    let built = store(&[("alpha", "a"), ("beta", "b"), ("gamma", "g")]).unwrap();
    let good = built.as_bytes().to_vec();
    assert!(KeyStore::from_bytes(good.clone()).is_some());
    assert!(KeyStore::from_bytes(Vec::new()).is_none());
    assert!(KeyStore::from_bytes(good[..good.len() - 1].to_vec()).is_none());
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(KeyStore::from_bytes(bad_magic).is_none());
    // Digests out of order.
    let mut swapped = good.clone();
    let (a, b) = swapped[HEADER..HEADER + 64].split_at_mut(32);
    a.swap_with_slice(b);
    assert!(KeyStore::from_bytes(swapped).is_none());
    // Huge count.
    let mut huge = good;
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(KeyStore::from_bytes(huge).is_none());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn key_sets_number_static_keys_first_and_refuse_clashes() {
    let fixed = Arc::new(store(&[("s1", "static-1")]).unwrap());
    let set = KeySet::new(fixed);
    let merged = set
        .with_list(Arc::new(
            store(&[("d1", "dyn-1"), ("d2", "dyn-2")]).unwrap(),
        ))
        .unwrap();
    assert_eq!(merged.len(), 3);
    let (pos, k) = merged.get(&digest(b"d2")).unwrap();
    assert_eq!(k.id(), "dyn-2");
    assert_eq!(merged.at(pos).unwrap().id(), "dyn-2");
    assert_eq!(merged.get(&digest(b"s1")).unwrap().0, 0);
    let same_id = set.with_list(Arc::new(store(&[("other", "static-1")]).unwrap()));
    assert_eq!(
        same_id.unwrap_err(),
        vec![("static-1".to_string(), "same id".to_string())]
    );
    let same_digest = set.with_list(Arc::new(store(&[("s1", "renamed")]).unwrap()));
    assert_eq!(
        same_digest.unwrap_err(),
        vec![(
            "renamed".to_string(),
            "same sha256 as static key \"static-1\"".to_string()
        )]
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn digests_sharing_a_long_prefix_are_still_ordered_and_found() {
    let mut b = KeyStoreBuilder::default();
    let mut digests = Vec::new();
    for (i, last) in [9u8, 3, 7, 1].iter().enumerate() {
        let mut d = [0xabu8; 32];
        d[31] = *last;
        digests.push(d);
        b.push(d, &format!("id-{i}"), Profile::default(), i as u32);
    }
    let store = b.build().unwrap();
    let order: Vec<&[u8]> = store.digests().collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]));
    for (i, d) in digests.iter().enumerate() {
        assert_eq!(store.get(d).unwrap().1.id(), format!("id-{i}"));
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn keys_with_settings_of_their_own_each_keep_theirs() {
    let mut b = KeyStoreBuilder::default();
    for i in 0..500u32 {
        let meta = KeyMeta {
            expires_at: Some(1_700_000_000 + i64::from(i)),
            ..KeyMeta::default()
        };
        b.push(
            digest(&i.to_le_bytes()),
            &format!("k{i}"),
            Profile {
                limits: Vec::new(),
                meta,
            },
            i,
        );
    }
    let store = KeyStore::from_bytes(b.build().unwrap().as_bytes().to_vec()).unwrap();
    assert_eq!(store.profile_count(), 500);
    for i in [0u32, 17, 499] {
        let k = store.lookup(&i.to_le_bytes()).unwrap();
        assert_eq!(k.id(), format!("k{i}"));
        assert_eq!(k.meta().expires_at, Some(1_700_000_000 + i64::from(i)));
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn wire_forms_with_bad_id_offsets_or_profile_indexes_are_refused() {
    // Another VM adopts a shared key store only if every id and profile
    // reference in it is sound; otherwise it compiles its own.
    let good = store(&[("alpha", "a"), ("beta", "b"), ("gamma", "g")])
        .unwrap()
        .as_bytes()
        .to_vec();
    let adopted = KeyStore::from_bytes(good.clone()).unwrap();
    let mut ids: Vec<&str> = adopted.iter().map(|k| k.id()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b", "g"]);
    let ends_at = HEADER + 32 * 3;
    let profiles_at = ends_at + 4 * 3;
    let with = |at: usize, value: u32| {
        let mut buf = good.clone();
        buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
        KeyStore::from_bytes(buf)
    };
    assert!(with(ends_at, 1).is_some(), "the id ends as written");
    for (what, at, value) in [
        ("an empty first id", ends_at, 0),
        ("an id ending where the next one does", ends_at, 2),
        ("an id ending before the previous one", ends_at + 4, 0),
        ("an id past the arena", ends_at + 8, 4),
        ("a profile that does not exist", profiles_at, 1),
    ] {
        assert!(with(at, value).is_none(), "{what}");
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_key_set_lists_its_static_keys_then_the_control_plane_ones() {
    // The filter creates the bucket of every key it lists this way at load.
    let set = KeySet::new(Arc::new(store(&[("s1", "static-1")]).unwrap()));
    let ids = |set: &KeySet| set.iter().map(|k| k.id().to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&set), ["static-1"]);
    let merged = set
        .with_list(Arc::new(store(&[("d1", "dyn-1")]).unwrap()))
        .unwrap();
    assert_eq!(ids(&merged), ["static-1", "dyn-1"]);
}
