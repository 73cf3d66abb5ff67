//! A read-only view of a request's header map, decoded from the proxy-wasm
//! serialized form without copying values.
//!
//! Names and values stay raw bytes: a client can send any byte in a value,
//! and nothing here assumes UTF-8 (the SDK's `String` getters panic on it).

/// Request headers as `(name, value)` byte slices, in the order Envoy holds them.
#[derive(Debug, Default, Clone)]
pub struct HeaderMap<'a> {
    entries: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> HeaderMap<'a> {
    /// Builds a map from pairs (tests and callers that already hold slices).
    pub fn from_pairs(entries: Vec<(&'a [u8], &'a [u8])>) -> Self {
        HeaderMap { entries }
    }

    /// Decodes the proxy-wasm header map serialization: a little-endian `u32`
    /// count, then `count` pairs of `u32` (name length, value length), then
    /// each name and value followed by a NUL byte. Returns `None` when the
    /// buffer is inconsistent, never panics.
    pub fn decode(buf: &'a [u8]) -> Option<Self> {
        if buf.is_empty() {
            return Some(HeaderMap::default());
        }
        let count = read_u32(buf, 0)? as usize;
        let sizes_end = 4usize.checked_add(count.checked_mul(8)?)?;
        if sizes_end > buf.len() {
            return None;
        }
        let mut entries = Vec::with_capacity(count);
        let mut pos = sizes_end;
        for n in 0..count {
            let name_len = read_u32(buf, 4 + n * 8)? as usize;
            let value_len = read_u32(buf, 8 + n * 8)? as usize;
            let name = buf.get(pos..pos.checked_add(name_len)?)?;
            pos = pos.checked_add(name_len + 1)?;
            let value = buf.get(pos..pos.checked_add(value_len)?)?;
            pos = pos.checked_add(value_len + 1)?;
            entries.push((name, value));
        }
        Some(HeaderMap { entries })
    }

    /// All entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        self.entries.iter().copied()
    }

    /// Every value of `name` (ASCII case-insensitive), in order.
    pub fn get_all<'s>(&'s self, name: &'s [u8]) -> impl Iterator<Item = &'a [u8]> + 's {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Encodes pairs in the proxy-wasm serialization (the inverse of [`HeaderMap::decode`]).
pub fn encode(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_non_utf8_values() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/x"),
            (b"x-bin", b"\xff\xfe"),
            (b"x-api-key", b"k1"),
        ];
        let buf = encode(&pairs);
        let map = HeaderMap::decode(&buf).unwrap();
        assert_eq!(map.iter().collect::<Vec<_>>(), pairs);
        assert_eq!(map.get(b"X-API-KEY"), Some(&b"k1"[..]));
    }

    #[test]
    fn truncated_buffers_are_rejected_not_panicking() {
        let buf = encode(&[(b"a", b"b"), (b"cc", b"dd")]);
        for cut in 1..buf.len() {
            let _ = HeaderMap::decode(&buf[..cut]);
        }
        assert!(HeaderMap::decode(&buf[..buf.len() - 2]).is_none());
        assert!(HeaderMap::decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(HeaderMap::decode(&[]).unwrap().is_empty());
    }
}
