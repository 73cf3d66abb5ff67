//! The profile table of a [`KeyStore`](super::KeyStore) buffer: every
//! distinct [`Profile`] in a compact binary form, written by the VM that
//! compiles a key list and read by every VM that adopts it.
//!
//! Written by hand rather than through serde: the table is keygate's own
//! format, read only by the module that wrote it, and a JSON round trip put
//! 27 KB of serializer and deserializer code in the module for it.
//!
//! Layout, little-endian: the profile count (u32), then per profile its
//! limits (u8 count; each: name as a u8-length string, interval ns u64,
//! burst u64), scopes (u32 count of strings), expiry (u8 flag, i64),
//! revocation (u8), allowed networks (u32 count; each: family 4 or 6, the
//! address's 4 or 16 bytes, the prefix length), attachments (u32 count;
//! each: name, u32 count of values), environment (u8 flag, string), mode
//! (0 none, 1 enforce, 2 shadow) and consumer (u8 flag, string). A string
//! is a u32 length and UTF-8 bytes unless said otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{KeyMeta, Profile};
use crate::config::Mode;
use crate::denial::LimitName;
use crate::ratelimit::{Limit, NamedLimit};

/// Encodes `profiles` (none can fail: counts over `u32` are cut, which the
/// list's own limits make impossible).
pub(crate) fn encode(profiles: &[Profile]) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.count(profiles.len());
    for p in profiles {
        w.u8(p.limits.len().min(usize::from(u8::MAX)) as u8);
        for l in p.limits.iter().take(usize::from(u8::MAX)) {
            let name = l.name.as_str().as_bytes();
            w.u8(name.len() as u8);
            w.0.extend_from_slice(name);
            w.u64(l.limit.interval_ns);
            w.u64(l.limit.burst);
        }
        let m = &p.meta;
        w.strings(&m.scopes);
        w.flag(m.expires_at.is_some());
        w.u64(m.expires_at.unwrap_or(0) as u64);
        w.flag(m.disabled);
        w.count(m.allowed_cidrs.len());
        for net in &m.allowed_cidrs {
            match net.addr() {
                IpAddr::V4(a) => {
                    w.u8(4);
                    w.0.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    w.u8(6);
                    w.0.extend_from_slice(&a.octets());
                }
            }
            w.u8(net.prefix_len());
        }
        w.count(m.attachments.len());
        for (name, values) in &m.attachments {
            w.string(name);
            w.strings(values);
        }
        w.optional(m.environment.as_deref());
        w.u8(match m.mode {
            None => 0,
            Some(Mode::Enforce) => 1,
            Some(Mode::Shadow) => 2,
        });
        w.optional(m.consumer.as_deref());
    }
    w.0
}

/// Decodes a table [`encode`] wrote; `None` if any byte is off or left over.
pub(crate) fn decode(bytes: &[u8]) -> Option<Vec<Profile>> {
    let mut r = Reader(bytes);
    let n = r.count()?;
    let mut profiles = Vec::with_capacity(n.min(bytes.len()));
    for _ in 0..n {
        let mut limits = Vec::new();
        for _ in 0..r.u8()? {
            let len = usize::from(r.u8()?);
            let name = LimitName::new(std::str::from_utf8(r.take(len)?).ok()?)?;
            let interval_ns = r.u64()?;
            let burst = r.u64()?;
            limits.push(NamedLimit {
                name,
                limit: Limit { interval_ns, burst },
            });
        }
        let scopes = r.strings()?;
        let has_expiry = r.flag()?;
        let expiry = r.u64()? as i64;
        let disabled = r.flag()?;
        let mut allowed_cidrs = Vec::new();
        for _ in 0..r.count()? {
            let addr = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
                6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
                _ => return None,
            };
            allowed_cidrs.push(ipnet::IpNet::new(addr, r.u8()?).ok()?);
        }
        let mut attachments = Vec::new();
        for _ in 0..r.count()? {
            attachments.push((r.string()?, r.strings()?));
        }
        let environment = r.optional()?;
        let mode = match r.u8()? {
            0 => None,
            1 => Some(Mode::Enforce),
            2 => Some(Mode::Shadow),
            _ => return None,
        };
        let consumer = r.optional()?;
        profiles.push(Profile {
            limits,
            meta: KeyMeta {
                scopes,
                expires_at: has_expiry.then_some(expiry),
                disabled,
                allowed_cidrs,
                attachments,
                environment,
                mode,
                consumer,
            },
        });
    }
    r.0.is_empty().then_some(profiles)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn count(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    }

    fn string(&mut self, s: &str) {
        self.count(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn strings(&mut self, list: &[String]) {
        self.count(list.len());
        for s in list {
            self.string(s);
        }
    }

    fn optional(&mut self, s: Option<&str>) {
        self.flag(s.is_some());
        self.string(s.unwrap_or(""));
    }
}

struct Reader<'b>(&'b [u8]);

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A u32 count, which cannot exceed the bytes left (every item takes
    /// at least one), so a corrupt count cannot reserve huge memory.
    fn count(&mut self) -> Option<usize> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        (n <= self.0.len()).then_some(n)
    }

    fn string(&mut self) -> Option<String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        Some(std::str::from_utf8(self.take(len)?).ok()?.to_string())
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.string()?);
        }
        Some(out)
    }

    fn optional(&mut self) -> Option<Option<String>> {
        let present = self.flag()?;
        let s = self.string()?;
        Some(present.then_some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    fn full_profile() -> Profile {
        Profile {
            limits: vec![
                NamedLimit {
                    name: LimitName::new("per-second").unwrap(),
                    limit: Limit {
                        interval_ns: 1_000_000,
                        burst: 7,
                    },
                },
                NamedLimit {
                    name: LimitName::DEFAULT,
                    limit: Limit {
                        interval_ns: u64::MAX,
                        burst: 1,
                    },
                },
            ],
            meta: KeyMeta {
                scopes: vec!["read".into(), "write:all".into()],
                expires_at: Some(-5),
                disabled: true,
                allowed_cidrs: vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "2001:db8::/32".parse().unwrap(),
                    "192.0.2.7/32".parse().unwrap(),
                ],
                attachments: vec![
                    ("org".into(), vec!["a".into(), "é".into()]),
                    ("empty".into(), vec![]),
                ],
                environment: Some("live".into()),
                mode: Some(Mode::Shadow),
                consumer: Some("acme".into()),
            },
        }
    }

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn every_field_survives_the_round_trip() {
        let mut enforce = full_profile();
        enforce.meta.mode = Some(Mode::Enforce);
        enforce.meta.environment = Some(String::new());
        let profiles = vec![Profile::default(), full_profile(), enforce];
        assert_eq!(decode(&encode(&profiles)), Some(profiles));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn an_empty_string_is_not_an_absent_one() {
        let mut p = Profile::default();
        p.meta.consumer = Some(String::new());
        let back = decode(&encode(std::slice::from_ref(&p))).unwrap();
        assert_eq!(back[0].meta.consumer, Some(String::new()));
        assert_eq!(back[0].meta.environment, None);
        assert_eq!(back[0].meta.expires_at, None);
    }

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn every_cut_and_every_trailing_byte_is_refused() {
        let good = encode(&[full_profile()]);
        for cut in 0..good.len() {
            assert_eq!(decode(&good[..cut]), None, "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn out_of_range_bytes_are_refused() {
        let good = encode(&[full_profile()]);
        // Flip each byte to 0xff in turn: a change the format can notice
        // (a flag, a family, a prefix, a mode, a count, a name) is refused;
        // one it cannot (inside a figure or a string) decodes to a profile
        // that differs from the original.
        let original = decode(&good).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            if bad[at] == 0xff {
                continue;
            }
            bad[at] = 0xff;
            assert_ne!(decode(&bad), Some(original.clone()), "byte {at}");
        }
    }

    #[test]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_huge_count_reserves_nothing() {
        assert_eq!(decode(&u32::MAX.to_le_bytes()), None);
        let mut p = encode(&[Profile::default()]);
        p[4] = 0xff; // the first profile's limit count: 255 limits, no bytes
        assert_eq!(decode(&p), None);
    }
}
