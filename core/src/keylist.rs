//! Key-list compilation: key records (from a plugin configuration, a
//! `keys.json` or control-plane pages) validated and indexed into a
//! [`KeyStore`], every problem named by its field.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{KeyConfig, KeyList};
use crate::error::{err, parse_json, ConfigError};
use crate::keys::{
    parse_digest, Clash, Digest, KeyMeta, KeyStore, KeyStoreBuilder, Profile, MAX_ID_LEN,
};
use crate::ratelimit::compile_limits;

/// with the same rules as the `keys` of a plugin configuration.
pub fn validate_key_list(bytes: &[u8]) -> Result<KeyList, Vec<ConfigError>> {
    let list: KeyList = parse_json(bytes, "key list")?;
    let mut errors = Vec::new();
    let mut keys = KeyStoreBuilder::default();
    let mut failed = Vec::new();
    for (i, k) in list.keys.iter().enumerate() {
        match compile_key(k, i as u32, &mut errors) {
            Some((d, profile)) => keys.push(d, &k.id, profile, i as u32),
            None => failed.push((k.id.clone(), i as u32)),
        }
    }
    errors.extend(failed_duplicate_ids(&keys, &failed));
    let _ = build_store(keys, &mut errors);
    if errors.is_empty() {
        Ok(list)
    } else {
        Err(errors)
    }
}

/// Key records compiled one by one as they are parsed (each `KeyConfig` is
/// dropped right away), with the problems found in them. Duplicates are
/// checked when the records are indexed.
#[derive(Debug, Clone, Default)]
pub struct CompiledKeys {
    keys: KeyStoreBuilder,
    errors: Vec<ConfigError>,
    /// Ids of records that failed, still checked for duplicates.
    failed_ids: Vec<(String, u32)>,
}

impl CompiledKeys {
    /// Indexes the records: the store when every record compiled and none
    /// clash, and every problem found.
    pub(crate) fn index(self) -> (Option<KeyStore>, Vec<ConfigError>) {
        let mut errors = self.errors;
        errors.extend(failed_duplicate_ids(&self.keys, &self.failed_ids));
        let store = build_store(self.keys, &mut errors);
        (store, errors)
    }

    /// Number of records that compiled.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no record compiled.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<'de> serde::Deserialize<'de> for CompiledKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Records;
        impl<'de> serde::de::Visitor<'de> for Records {
            type Value = CompiledKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key records")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CompiledKeys, A::Error> {
                let mut out = CompiledKeys::default();
                let mut i = 0u32;
                while let Some(k) = seq.next_element::<KeyConfig>()? {
                    match compile_key(&k, i, &mut out.errors) {
                        Some((d, profile)) => out.keys.push(d, &k.id, profile, i),
                        None => out.failed_ids.push((k.id, i)),
                    }
                    i += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Records)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyListDocument {
    #[serde(default)]
    version: u64,
    #[serde(default)]
    keys: CompiledKeys,
    #[serde(default)]
    next: Option<String>,
}

/// A control-plane key list compiled and indexed for the filter.
#[derive(Debug, Clone, Default)]
pub struct CompiledKeyList {
    /// The list's version.
    pub version: u64,
    /// Its records.
    pub store: Arc<KeyStore>,
}

/// A key list received so far: one page or several, not yet indexed. A
/// control plane may split a long list into pages (Envoy refuses callout
/// responses of a few tens of megabytes); each page names the path of the
/// next in `next`, and the last page has none.
#[derive(Debug, Clone, Default)]
pub struct KeyListPages {
    /// Version, the same on every page.
    pub version: u64,
    /// Path of the next page, if any.
    pub next: Option<String>,
    /// Pages received.
    pub pages: u32,
    keys: KeyStoreBuilder,
    bytes: usize,
}

/// Most pages one list may have: a control plane that keeps naming a next
/// page is cut off here (and by `max_list_bytes`, counted over all pages).
pub const MAX_PAGES: u32 = 10_000;

impl KeyListPages {
    /// Bytes of all pages received so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Parses and compiles one page and adds it. The first page starts a
    /// list; a later page must carry the same version. Problems name the
    /// page and its record (`page 2: keys[7].sha256`).
    pub fn add(&mut self, bytes: &[u8]) -> Result<(), Vec<ConfigError>> {
        let label = |e: ConfigError| {
            if self.pages == 0 {
                e
            } else {
                err(format!("page {}: {}", self.pages + 1, e.field), e.message)
            }
        };
        let doc: KeyListDocument = parse_json(bytes, "key list")
            .map_err(|e| e.into_iter().map(label).collect::<Vec<_>>())?;
        if !doc.keys.errors.is_empty() {
            return Err(doc.keys.errors.into_iter().map(label).collect());
        }
        if self.pages > 0 && doc.version != self.version {
            return Err(vec![err(
                "version",
                format!(
                    "page {} has version {}, the first page {}: the list changed while paging",
                    self.pages + 1,
                    doc.version,
                    self.version
                ),
            )]);
        }
        if doc.next.is_some() && self.pages + 1 >= MAX_PAGES {
            return Err(vec![err(
                "next",
                format!("the list goes on past {MAX_PAGES} pages"),
            )]);
        }
        if let Some(next) = &doc.next {
            if !next.starts_with('/')
                || next.len() > 2048
                || !next.bytes().all(|b| (0x21..=0x7e).contains(&b))
            {
                return Err(vec![label(err(
                    "next",
                    "must be a path starting with '/' (visible ASCII, at most 2048 bytes)",
                ))]);
            }
        }
        // Source positions continue across pages, so duplicates name both records.
        let offset = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        self.keys.append(&doc.keys.keys, offset);
        self.version = doc.version;
        self.next = doc.next;
        self.pages += 1;
        self.bytes = self.bytes.saturating_add(bytes.len());
        Ok(())
    }

    /// Indexes the whole list, reporting duplicate ids and digests.
    pub fn finish(self) -> Result<CompiledKeyList, Vec<ConfigError>> {
        let mut errors = Vec::new();
        match build_store(self.keys, &mut errors) {
            Some(store) if errors.is_empty() => Ok(CompiledKeyList {
                version: self.version,
                store: Arc::new(store),
            }),
            _ => Err(errors),
        }
    }
}

/// Parses and compiles a control-plane key list (same JSON as
/// [`KeyList`]), reporting every problem. Clashes with
/// static keys are found when the list is merged: `Policy::with_key_list`.
pub fn compile_key_list(bytes: &[u8]) -> Result<CompiledKeyList, Vec<ConfigError>> {
    let mut list = KeyListPages::default();
    list.add(bytes)?;
    list.finish()
}

/// One record, without the list-wide checks (duplicates). `index` is its
/// position in `keys`; the field name is only formatted for an error, since
/// a list may hold a million records.
fn compile_key(
    k: &KeyConfig,
    index: u32,
    errors: &mut Vec<ConfigError>,
) -> Option<(Digest, Profile)> {
    let field = || format!("keys[{index}]");
    let before = errors.len();
    if k.id.is_empty()
        || k.id.len() > MAX_ID_LEN
        || !k.id.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        errors.push(err(
            format!("{}.id", field()),
            "must be 1-128 visible ASCII characters",
        ));
    }
    let digest = parse_digest(&k.sha256);
    if digest.is_none() {
        errors.push(err(
            format!("{}.sha256", field()),
            "must be 64 hex characters (the SHA-256 of the key, never the key)",
        ));
    }
    let limits = if k.rate_limit.is_some() || !k.rate_limits.is_empty() {
        compile_limits(k.rate_limit.as_ref(), &k.rate_limits, &field(), errors)
    } else {
        Vec::new()
    };
    let meta = if has_meta(k) {
        compile_meta(k, &field(), errors)
    } else {
        KeyMeta::default()
    };
    match digest {
        Some(d) if errors.len() == before => Some((d, Profile { limits, meta })),
        _ => None,
    }
}

/// True when a record sets any of the fields of [`KeyMeta`].
fn has_meta(k: &KeyConfig) -> bool {
    !k.scopes.is_empty()
        || k.expires_at.is_some()
        || k.disabled
        || k.revoked_at.is_some()
        || !k.allowed_cidrs.is_empty()
        || !k.attachments.is_empty()
        || k.environment.is_some()
        || k.mode.is_some()
        || k.consumer.is_some()
}

/// Duplicate ids involving a record that failed to compile (duplicates among
/// compiled records are reported by `build_store`).
fn failed_duplicate_ids(keys: &KeyStoreBuilder, failed: &[(String, u32)]) -> Vec<ConfigError> {
    if failed.is_empty() {
        return Vec::new();
    }
    // A map of the failed records' ids rather than a sort of every id: one
    // sort routine fewer in the module, and this runs only on failure.
    let mut first: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut errors = Vec::new();
    let mut clash = |id: &str, a: u32, b: u32| {
        errors.push(err(
            format!("keys[{}].id", a.max(b)),
            format!("duplicate id {id:?}"),
        ));
    };
    for (id, i) in failed.iter().filter(|(id, _)| !id.is_empty()) {
        match first.get(id.as_str()) {
            Some(&j) => clash(id, *i, j),
            None => {
                first.insert(id.as_str(), *i);
            }
        }
    }
    for (id, i) in keys.ids() {
        if let Some(&j) = first.get(id) {
            clash(id, i, j);
        }
    }
    errors
}

/// Indexes compiled records, reporting duplicate ids and digests.
fn build_store(keys: KeyStoreBuilder, errors: &mut Vec<ConfigError>) -> Option<KeyStore> {
    match keys.build() {
        Ok(store) => Some(store),
        Err(clashes) => {
            for c in clashes {
                errors.push(match c {
                    Clash::Id { id, later, .. } => {
                        err(format!("keys[{later}].id"), format!("duplicate id {id:?}"))
                    }
                    Clash::Digest { id, .. } => err(
                        "keys",
                        format!("key {id:?} has the same sha256 as another key"),
                    ),
                });
            }
            None
        }
    }
}

fn compile_meta(k: &KeyConfig, field: &str, errors: &mut Vec<ConfigError>) -> KeyMeta {
    let expires_at = k.expires_at.as_ref().and_then(|t| {
        match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
            Ok(dt) => Some(dt.unix_timestamp()),
            Err(e) => {
                errors.push(err(
                    format!("{field}.expires_at"),
                    format!("not an RFC 3339 timestamp: {e}"),
                ));
                None
            }
        }
    });
    if let Some(c) = &k.consumer {
        if c.is_empty() || c.len() > MAX_ID_LEN || !c.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            errors.push(err(
                format!("{field}.consumer"),
                "must be 1-128 visible ASCII characters",
            ));
        }
    }
    if let Some(t) = &k.revoked_at {
        if let Err(e) =
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        {
            errors.push(err(
                format!("{field}.revoked_at"),
                format!("not an RFC 3339 timestamp: {e}"),
            ));
        }
    }
    let mut allowed_cidrs = Vec::new();
    for (j, c) in k.allowed_cidrs.iter().enumerate() {
        match parse_cidr(c) {
            Some(net) => allowed_cidrs.push(net),
            None => errors.push(err(
                format!("{field}.allowed_cidrs[{j}]"),
                format!("{c:?} is not an IP address or CIDR"),
            )),
        }
    }
    for (j, s) in k.scopes.iter().enumerate() {
        if !is_word(s) {
            errors.push(err(
                format!("{field}.scopes[{j}]"),
                "must be 1-64 visible ASCII characters",
            ));
        }
    }
    if let Some(env) = &k.environment {
        if !is_word(env) {
            errors.push(err(
                format!("{field}.environment"),
                "must be 1-64 visible ASCII characters",
            ));
        }
    }
    let attachments = k
        .attachments
        .iter()
        .map(|(name, values)| {
            let mut v = values.clone();
            v.sort_unstable();
            v.dedup();
            (name.clone(), v)
        })
        .collect();
    KeyMeta {
        scopes: k.scopes.clone(),
        expires_at,
        // A revocation is for good: `disabled: false` cannot undo it.
        disabled: k.disabled || k.revoked_at.is_some(),
        allowed_cidrs,
        attachments,
        environment: k.environment.clone(),
        mode: k.mode,
        consumer: k.consumer.clone(),
    }
}

/// An address (`10.0.0.1`) or a network (`10.0.0.0/8`): the address by the
/// standard library's parser (the one that reads the peer's address), the
/// prefix as 1-3 decimal digits no longer than the address.
fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return s.parse::<IpAddr>().ok().map(ipnet::IpNet::from);
    };
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ipnet::IpNet::new(addr.parse::<IpAddr>().ok()?, prefix.parse().ok()?).ok()
}

pub(crate) fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::parse_cidr;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn networks_and_addresses_parse_and_nothing_else() {
        for (text, network) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.1.2.3/8"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("2001:db8::/128", "2001:db8::/128"),
        ] {
            assert_eq!(
                parse_cidr(text).map(|n| n.to_string()).as_deref(),
                Some(network),
                "{text}"
            );
        }
        for text in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0.0/0008",
            "10.0.0/8",
            "/8",
            "",
            "10.0.0.0 /8",
            "010.0.0.1",
            "example.org/8",
            "10.0.0.0/８",
        ] {
            assert_eq!(parse_cidr(text), None, "{text}");
        }
    }
}
