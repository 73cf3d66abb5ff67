//! The key list: SHA-256 digests indexed for lookup, and per-key records.
//!
//! A [`KeyStore`] is one byte buffer: sorted digests, key ids in one arena,
//! and per-key settings interned as [`Profile`]s (most keys share a plan).
//! That buffer is also its wire form, so a store built once can be published
//! in proxy-wasm shared data and adopted by every other VM without parsing
//! JSON again ([`KeyStore::as_bytes`], [`KeyStore::from_bytes`]).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::config::Mode;
use crate::ratelimit::NamedLimit;

mod profile_table;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of a presented key.
pub fn digest(key: &[u8]) -> Digest {
    Sha256::digest(key).into()
}

/// Parses 64 hex characters (either case) into a digest.
pub fn parse_digest(hex_str: &str) -> Option<Digest> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let hex: &[u8; 64] = hex_str.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Longest key id (ids are 1-128 visible ASCII characters).
pub const MAX_ID_LEN: usize = 128;

/// Optional per-key metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeyMeta {
    /// Scopes held.
    pub scopes: Vec<String>,
    /// Unix seconds after which the key is expired.
    pub expires_at: Option<i64>,
    /// Revoked.
    pub disabled: bool,
    /// Allowed downstream networks (empty: any).
    pub allowed_cidrs: Vec<ipnet::IpNet>,
    /// Attachment sets, each sorted for bisection.
    pub attachments: Vec<(String, Vec<String>)>,
    /// Environment, e.g. `live`.
    pub environment: Option<String>,
    /// Mode of this key's refusals, if the record sets one.
    pub mode: Option<Mode>,
    /// The consumer the key belongs to, if any.
    pub consumer: Option<String>,
}

impl KeyMeta {
    /// True when `value` is in the attachment set `set`.
    pub fn attached(&self, set: &str, value: &str) -> bool {
        self.attachments
            .iter()
            .find(|(name, _)| name == set)
            .is_some_and(|(_, values)| values.binary_search_by(|v| v.as_str().cmp(value)).is_ok())
    }
}

/// The settings of a key besides its id and digest. Keys with equal
/// settings share one profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Profile {
    /// The key's own rate limits, all of which must admit (the policy's
    /// default applies when there are none).
    pub limits: Vec<NamedLimit>,
    /// Scopes, expiry, revocation, CIDRs, attachments.
    pub meta: KeyMeta,
}

/// A key found in a store: its id and settings, borrowed from the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyRef<'s> {
    id: &'s str,
    profile: &'s Profile,
}

impl<'s> KeyRef<'s> {
    /// The operator-chosen id, sent to the backend and written in logs.
    pub fn id(&self) -> &'s str {
        self.id
    }

    /// The key's own rate limits (empty: the policy's default applies).
    pub fn limits(&self) -> &'s [NamedLimit] {
        &self.profile.limits
    }

    /// Scopes, expiry, revocation, CIDRs, attachments.
    pub fn meta(&self) -> &'s KeyMeta {
        &self.profile.meta
    }
}

const MAGIC: &[u8; 4] = b"KGK2";
const HEADER: usize = 16;

/// Digest → key index over one compact buffer (layout: 16-byte header with
/// the key count, arena and profile-table sizes; the sorted digests; the end
/// offset of each id; the profile index of each key; the id arena; the
/// profile table in keygate's own binary form, `keys/profile_table.rs`).
#[derive(Debug, Clone)]
pub struct KeyStore {
    buf: Vec<u8>,
    n: usize,
    profiles: Vec<Profile>,
}

impl Default for KeyStore {
    fn default() -> Self {
        KeyStoreBuilder::default()
            .build()
            .unwrap_or_else(|_| KeyStore {
                buf: Vec::new(),
                n: 0,
                profiles: Vec::new(),
            })
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

impl KeyStore {
    fn ends_at(&self) -> usize {
        HEADER + 32 * self.n
    }
    fn profile_index_at(&self) -> usize {
        self.ends_at() + 4 * self.n
    }
    fn ids_at(&self) -> usize {
        self.profile_index_at() + 4 * self.n
    }

    fn digest_at(&self, i: usize) -> &[u8] {
        self.buf
            .get(HEADER + 32 * i..HEADER + 32 * (i + 1))
            .unwrap_or(&[])
    }

    fn id_at(&self, i: usize) -> &str {
        let end = u32_at(&self.buf, self.ends_at() + 4 * i) as usize;
        let start = match i {
            0 => 0,
            _ => u32_at(&self.buf, self.ends_at() + 4 * (i - 1)) as usize,
        };
        let base = self.ids_at();
        self.buf
            .get(base + start..base + end)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The key at position `i` (digest order), if any.
    pub fn at(&self, i: u32) -> Option<KeyRef<'_>> {
        let i = i as usize;
        if i >= self.n {
            return None;
        }
        let p = u32_at(&self.buf, self.profile_index_at() + 4 * i) as usize;
        Some(KeyRef {
            id: self.id_at(i),
            profile: self.profiles.get(p)?,
        })
    }

    /// The key whose digest equals `d`, with its position.
    pub fn get(&self, d: &Digest) -> Option<(u32, KeyRef<'_>)> {
        let (mut lo, mut hi) = (0usize, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.digest_at(mid).cmp(d.as_slice()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    return self.at(mid as u32).map(|k| (mid as u32, k));
                }
            }
        }
        None
    }

    /// Hashes `key` and looks it up.
    pub fn lookup(&self, key: &[u8]) -> Option<KeyRef<'_>> {
        self.get(&digest(key)).map(|(_, k)| k)
    }

    /// Every key, in digest order.
    pub fn iter(&self) -> impl Iterator<Item = KeyRef<'_>> + '_ {
        (0..self.n as u32).filter_map(|i| self.at(i))
    }

    /// Every digest, in order.
    pub fn digests(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.n).map(|i| self.digest_at(i))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when the store is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of distinct profiles.
    pub fn profile_count(&self) -> usize {
        self.profiles.len()
    }

    /// The wire form, for [`KeyStore::from_bytes`] in another VM.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Adopts a buffer written by [`KeyStore::as_bytes`] (no copy of the
    /// digests or ids). Every offset is checked: `None` if anything is off.
    pub fn from_bytes(buf: Vec<u8>) -> Option<KeyStore> {
        if buf.get(..4)? != MAGIC {
            return None;
        }
        let n = u32_at(&buf, 4) as usize;
        let ids_len = u32_at(&buf, 8) as usize;
        let table_len = u32_at(&buf, 12) as usize;
        let ids_at = HEADER.checked_add(n.checked_mul(40)?)?;
        let table_at = ids_at.checked_add(ids_len)?;
        if table_at.checked_add(table_len)? != buf.len() {
            return None;
        }
        let profiles = profile_table::decode(buf.get(table_at..)?)?;
        let mut store = KeyStore { buf, n, profiles };
        let arena = store.buf.get(ids_at..table_at)?;
        if !arena.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return None;
        }
        let mut prev_end = 0u32;
        for i in 0..n {
            let end = u32_at(&store.buf, store.ends_at() + 4 * i);
            let profile = u32_at(&store.buf, store.profile_index_at() + 4 * i) as usize;
            if end <= prev_end || end as usize > ids_len || profile >= store.profiles.len() {
                return None;
            }
            if i > 0 && store.digest_at(i - 1) >= store.digest_at(i) {
                return None;
            }
            prev_end = end;
        }
        if prev_end as usize != ids_len {
            return None;
        }
        store.buf.truncate(table_at + table_len);
        Some(store)
    }
}

/// 64-bit FNV-1a, to bucket ids when looking for duplicates.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Two records that cannot both be in a store, by source position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clash {
    /// The same id twice.
    Id {
        /// The id.
        id: String,
        /// Position of the first record.
        first: u32,
        /// Position of the later record.
        later: u32,
    },
    /// The same digest twice.
    Digest {
        /// The later record's id.
        id: String,
        /// Position of the first record.
        first: u32,
        /// Position of the later record.
        later: u32,
    },
}

/// Collects records, then sorts and packs them into a [`KeyStore`].
#[derive(Debug, Clone, Default)]
pub struct KeyStoreBuilder {
    digests: Vec<Digest>,
    ids: String,
    id_ends: Vec<u32>,
    profile_of: Vec<u32>,
    /// Position of each record in the list it came from.
    source: Vec<u32>,
    profiles: Vec<Profile>,
    /// Hash of a profile → its index, so that a list where every key has
    /// its own settings (an expiry each) holds each profile once, not twice.
    interned: HashMap<u64, u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl KeyStoreBuilder {
    /// Adds a record; `source` is its position in the operator's list, used
    /// to name clashes. Ids must be 1-128 visible ASCII characters (checked
    /// by the caller).
    pub fn push(&mut self, d: Digest, id: &str, profile: Profile, source: u32) {
        use std::hash::BuildHasher as _;
        // Consecutive records usually share a profile: skip the hash then.
        let last = self.profile_of.last().copied();
        let p = match last.filter(|&l| self.profiles.get(l as usize) == Some(&profile)) {
            Some(l) => l,
            None => {
                let h = self.hasher.hash_one(&profile);
                match self.interned.get(&h) {
                    Some(&p) if self.profiles.get(p as usize) == Some(&profile) => p,
                    found => {
                        // A 64-bit collision only costs the sharing.
                        let p = self.profiles.len() as u32;
                        self.profiles.push(profile);
                        if found.is_none() {
                            self.interned.insert(h, p);
                        }
                        p
                    }
                }
            }
        };
        self.digests.push(d);
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len() as u32);
        self.profile_of.push(p);
        self.source.push(source);
    }

    /// Number of records added.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Appends every record of `other`, shifting its source positions by `offset`.
    pub fn append(&mut self, other: &KeyStoreBuilder, offset: u32) {
        for i in 0..other.len() {
            let (Some(d), Some(p), Some(src)) = (
                other.digests.get(i),
                other
                    .profile_of
                    .get(i)
                    .and_then(|p| other.profiles.get(*p as usize)),
                other.source.get(i),
            ) else {
                continue;
            };
            self.push(*d, other.id(i), p.clone(), src.saturating_add(offset));
        }
    }

    fn id(&self, i: usize) -> &str {
        let end = self.id_ends.get(i).copied().unwrap_or(0) as usize;
        let start = match i {
            0 => 0,
            _ => self.id_ends.get(i - 1).copied().unwrap_or(0) as usize,
        };
        self.ids.get(start..end).unwrap_or("")
    }

    /// Every record's id with its source position.
    pub fn ids(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        (0..self.len()).map(|i| (self.id(i), self.source.get(i).copied().unwrap_or(0)))
    }

    /// Sorts by digest and packs. Every duplicate id and digest is reported,
    /// each as a pair of source positions (first, later).
    pub fn build(self) -> Result<KeyStore, Vec<Clash>> {
        let n = self.len();
        let src = |i: u32| self.source.get(i as usize).copied().unwrap_or(0);
        let mut clashes = Vec::new();
        // Duplicate ids: sort by a hash of the id, compare ids only on equal hashes.
        let mut by_id: Vec<(u64, u32)> = (0..n as u32)
            .map(|i| (fnv1a(self.id(i as usize).as_bytes()), i))
            .collect();
        by_id.sort_unstable();
        for run in by_id.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() > 1) {
            for (j, a) in run.iter().enumerate() {
                for b in run.iter().skip(j + 1) {
                    if self.id(a.1 as usize) == self.id(b.1 as usize) {
                        clashes.push(Clash::Id {
                            id: self.id(b.1 as usize).to_string(),
                            first: src(a.1),
                            later: src(b.1),
                        });
                    }
                }
            }
        }
        drop(by_id);
        // Digest order: sort by the first eight bytes, then order the (rare)
        // runs of equal prefixes by the whole digest.
        const NONE: Digest = [0; 32];
        let digest_of = |i: u32| self.digests.get(i as usize).unwrap_or(&NONE);
        let prefix = |i: u32| {
            let d = digest_of(i);
            u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        };
        let mut keyed: Vec<(u64, u32)> = (0..n as u32).map(|i| (prefix(i), i)).collect();
        keyed.sort_unstable();
        let mut order: Vec<u32> = keyed.iter().map(|&(_, i)| i).collect();
        let mut at = 0;
        for run in keyed.chunk_by(|a, b| a.0 == b.0) {
            if run.len() > 1 {
                if let Some(slice) = order.get_mut(at..at + run.len()) {
                    // Insertion sort: such runs hold two or three records,
                    // and this keeps a second sort routine out of the module.
                    for j in 1..slice.len() {
                        let mut k = j;
                        while k > 0 && digest_of(slice[k - 1]) > digest_of(slice[k]) {
                            slice.swap(k - 1, k);
                            k -= 1;
                        }
                    }
                }
            }
            at += run.len();
        }
        drop(keyed);
        for w in order.windows(2) {
            if digest_of(w[0]) == digest_of(w[1]) {
                clashes.push(Clash::Digest {
                    id: self.id(w[1] as usize).to_string(),
                    first: src(w[0]),
                    later: src(w[1]),
                });
            }
        }
        if !clashes.is_empty() {
            return Err(clashes);
        }
        let table = profile_table::encode(&self.profiles);
        let mut buf = Vec::with_capacity(HEADER + 40 * n + self.ids.len() + table.len());
        buf.extend_from_slice(MAGIC);
        for v in [n, self.ids.len(), table.len()] {
            buf.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for &i in &order {
            buf.extend_from_slice(digest_of(i));
        }
        let mut end = 0u32;
        for &i in &order {
            end += self.id(i as usize).len() as u32;
            buf.extend_from_slice(&end.to_le_bytes());
        }
        for &i in &order {
            let p = self.profile_of.get(i as usize).copied().unwrap_or(0);
            buf.extend_from_slice(&p.to_le_bytes());
        }
        for &i in &order {
            buf.extend_from_slice(self.id(i as usize).as_bytes());
        }
        buf.extend_from_slice(&table);
        Ok(KeyStore {
            buf,
            n,
            profiles: self.profiles,
        })
    }
}

/// The keys a policy answers from: the static keys of its configuration and,
/// with a control plane, the current list. Positions number the static keys
/// first.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    fixed: Arc<KeyStore>,
    list: Option<Arc<KeyStore>>,
}

impl KeySet {
    /// Static keys only.
    pub fn new(fixed: Arc<KeyStore>) -> Self {
        KeySet { fixed, list: None }
    }

    /// These static keys with `list`. Returns the clashes between the two:
    /// (list key id, what it shares with a static key).
    pub fn with_list(&self, list: Arc<KeyStore>) -> Result<KeySet, Vec<(String, String)>> {
        let mut clashes = Vec::new();
        if !self.fixed.is_empty() {
            let fixed_ids: std::collections::HashSet<&str> =
                self.fixed.iter().map(|k| k.id()).collect();
            for k in list.iter() {
                if fixed_ids.contains(k.id()) {
                    clashes.push((k.id().to_string(), "same id".to_string()));
                }
            }
            for (k, d) in self.fixed.iter().zip(self.fixed.digests()) {
                let found = Digest::try_from(d).ok().and_then(|d| list.get(&d));
                if let Some((_, other)) = found {
                    clashes.push((
                        other.id().to_string(),
                        format!("same sha256 as static key {:?}", k.id()),
                    ));
                }
            }
        }
        if clashes.is_empty() {
            Ok(KeySet {
                fixed: self.fixed.clone(),
                list: Some(list),
            })
        } else {
            Err(clashes)
        }
    }

    /// The static keys.
    pub fn fixed(&self) -> &KeyStore {
        &self.fixed
    }

    /// The key whose digest equals `d`, with its position.
    pub fn get(&self, d: &Digest) -> Option<(u32, KeyRef<'_>)> {
        self.fixed.get(d).or_else(|| {
            let list = self.list.as_ref()?;
            let (i, k) = list.get(d)?;
            Some((i + self.fixed.len() as u32, k))
        })
    }

    /// The key at `pos` (as returned by [`KeySet::get`]).
    pub fn at(&self, pos: u32) -> Option<KeyRef<'_>> {
        let fixed = self.fixed.len() as u32;
        if pos < fixed {
            self.fixed.at(pos)
        } else {
            self.list.as_ref()?.at(pos - fixed)
        }
    }

    /// Hashes `key` and looks it up.
    pub fn lookup(&self, key: &[u8]) -> Option<KeyRef<'_>> {
        self.get(&digest(key)).map(|(_, k)| k)
    }

    /// Every key.
    pub fn iter(&self) -> impl Iterator<Item = KeyRef<'_>> + '_ {
        self.fixed
            .iter()
            .chain(self.list.iter().flat_map(|l| l.iter()))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.fixed.len() + self.list.as_ref().map_or(0, |l| l.len())
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
