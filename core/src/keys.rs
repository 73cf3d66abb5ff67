//! The key list: SHA-256 digests indexed for lookup, and per-key records.

use sha2::{Digest as _, Sha256};

use crate::ratelimit::Limit;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of a presented key.
pub fn digest(key: &[u8]) -> Digest {
    Sha256::digest(key).into()
}

/// Parses 64 hex characters (either case) into a digest.
pub fn parse_digest(hex_str: &str) -> Option<Digest> {
    let mut out = [0u8; 32];
    if hex_str.len() != 64 {
        return None;
    }
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
}

/// Prefix of every bucket key in shared data.
pub const BUCKET_PREFIX: &str = "keygate/rl/";

/// One compiled key record. Small on purpose: most keys carry no metadata,
/// and a list may hold a million of them.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// `BUCKET_PREFIX` + id: the shared-data key of this key's bucket, which
    /// also stores the id (see [`KeyRecord::id`]).
    bucket_key: Box<str>,
    /// Effective rate limit (the key's own, else the default), if any.
    pub limit: Option<Limit>,
    /// Scopes, expiry, revocation, CIDRs, attachments; `None` when all empty.
    pub meta: Option<Box<KeyMeta>>,
}

/// Optional per-key metadata.
#[derive(Debug, Clone, Default, PartialEq)]
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
}

impl KeyMeta {
    /// True when `value` is in the attachment set `set`.
    pub fn attached(&self, set: &str, value: &str) -> bool {
        self.attachments
            .iter()
            .find(|(name, _)| name == set)
            .is_some_and(|(_, values)| values.binary_search_by(|v| v.as_str().cmp(value)).is_ok())
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == KeyMeta::default()
    }
}

impl KeyRecord {
    /// A record for `id`.
    pub fn new(id: &str, limit: Option<Limit>, meta: KeyMeta) -> Self {
        KeyRecord {
            bucket_key: format!("{BUCKET_PREFIX}{id}").into_boxed_str(),
            limit,
            meta: (!meta.is_empty()).then(|| Box::new(meta)),
        }
    }

    /// The operator-chosen id, sent to the backend and written in logs.
    pub fn id(&self) -> &str {
        self.bucket_key.get(BUCKET_PREFIX.len()..).unwrap_or("")
    }

    /// The shared-data key of this key's default bucket.
    pub fn bucket_key(&self) -> &str {
        &self.bucket_key
    }

    /// The metadata, or an empty default.
    pub fn meta(&self) -> &KeyMeta {
        static EMPTY: KeyMeta = KeyMeta {
            scopes: Vec::new(),
            expires_at: None,
            disabled: false,
            allowed_cidrs: Vec::new(),
            attachments: Vec::new(),
            environment: None,
        };
        self.meta.as_deref().unwrap_or(&EMPTY)
    }
}

/// Digest → record index, as a sorted array searched by bisection: compact
/// for large lists and independent of request input for its cost.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    index: Vec<(Digest, u32)>,
    records: Vec<KeyRecord>,
}

impl KeyStore {
    /// Builds the index. Returns the ids of digests that appear twice, if any.
    pub fn build(entries: Vec<(Digest, KeyRecord)>) -> Result<Self, Vec<String>> {
        let mut index = Vec::with_capacity(entries.len());
        let mut records = Vec::with_capacity(entries.len());
        for (i, (d, r)) in entries.into_iter().enumerate() {
            index.push((d, i as u32));
            records.push(r);
        }
        index.sort_unstable_by_key(|e| e.0);
        let dups: Vec<String> = index
            .windows(2)
            .filter(|w| w[0].0 == w[1].0)
            .filter_map(|w| records.get(w[1].1 as usize).map(|r| r.id().to_string()))
            .collect();
        if dups.is_empty() {
            Ok(KeyStore { index, records })
        } else {
            Err(dups)
        }
    }

    /// The record whose digest equals `d`, with its position in [`KeyStore::records`].
    pub fn get(&self, d: &Digest) -> Option<(u32, &KeyRecord)> {
        let i = self.index.binary_search_by(|(k, _)| k.cmp(d)).ok()?;
        let at = self.index[i].1;
        self.records.get(at as usize).map(|r| (at, r))
    }

    /// Hashes `key` and looks it up.
    pub fn lookup(&self, key: &[u8]) -> Option<&KeyRecord> {
        self.get(&digest(key)).map(|(_, r)| r)
    }

    /// All records, in configuration order.
    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> KeyRecord {
        KeyRecord::new(id, None, KeyMeta::default())
    }

    #[test]
    fn lookup_finds_exact_key_only() {
        let store = KeyStore::build(vec![
            (digest(b"alpha"), rec("a")),
            (digest(b"beta"), rec("b")),
        ])
        .unwrap();
        assert_eq!(store.lookup(b"alpha").unwrap().id(), "a");
        assert_eq!(store.lookup(b"beta").unwrap().id(), "b");
        assert!(store.lookup(b"Alpha").is_none());
        assert!(store.lookup(b"alpha ").is_none());
    }

    #[test]
    fn duplicate_digests_are_reported() {
        let err =
            KeyStore::build(vec![(digest(b"x"), rec("a")), (digest(b"x"), rec("b"))]).unwrap_err();
        assert_eq!(err.len(), 1);
    }

    #[test]
    fn parses_hex_digests() {
        let h = hex::encode(digest(b"k"));
        assert_eq!(parse_digest(&h), Some(digest(b"k")));
        assert_eq!(parse_digest(&h.to_uppercase()), Some(digest(b"k")));
        assert_eq!(parse_digest(&h[..63]), None);
        assert_eq!(parse_digest(&format!("{}zz", &h[..62])), None);
    }
}
