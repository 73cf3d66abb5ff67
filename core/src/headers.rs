//! A read-only view of a request's header map, decoded from the proxy-wasm
//! serialized form without copying values.
//!
//! Names and values stay raw bytes: a client can send any byte in a value,
//! and nothing here assumes UTF-8 (the SDK's `String` getters panic on it).

/// Request headers as `(name, value)` byte slices, in the order Envoy holds them.
///
/// A decoded map reads the entries straight from the host's buffer each time
/// it is walked, so a request allocates nothing for it: a walk costs a few
/// additions per header, less than an allocation.
#[derive(Debug, Clone)]
pub struct HeaderMap<'a> {
    entries: Entries<'a>,
}

#[derive(Debug, Clone)]
enum Entries<'a> {
    /// The proxy-wasm serialization, checked by [`HeaderMap::decode`].
    Wire { buf: &'a [u8], count: usize },
    /// Pairs given as slices.
    Pairs(Vec<(&'a [u8], &'a [u8])>),
}

impl Default for HeaderMap<'_> {
    fn default() -> Self {
        HeaderMap {
            entries: Entries::Pairs(Vec::new()),
        }
    }
}

impl<'a> HeaderMap<'a> {
    /// Builds a map from pairs (tests and callers that already hold slices).
    pub fn from_pairs(entries: Vec<(&'a [u8], &'a [u8])>) -> Self {
        HeaderMap {
            entries: Entries::Pairs(entries),
        }
    }

    /// Checks the proxy-wasm header map serialization: a little-endian `u32`
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
        let mut walk = WireIter::new(buf, count);
        for _ in walk.by_ref() {}
        if walk.broken {
            return None;
        }
        Some(HeaderMap {
            entries: Entries::Wire { buf, count },
        })
    }

    /// All entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        let (wire, pairs) = match &self.entries {
            Entries::Wire { buf, count } => (Some(WireIter::new(buf, *count)), None),
            Entries::Pairs(p) => (None, Some(p.iter().copied())),
        };
        wire.into_iter()
            .flatten()
            .chain(pairs.into_iter().flatten())
    }

    /// Every value of `name` (ASCII case-insensitive), in order.
    pub fn get_all<'s>(&'s self, name: &'s [u8]) -> impl Iterator<Item = &'a [u8]> + 's {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Wire { count, .. } => *count,
            Entries::Pairs(p) => p.len(),
        }
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Walks the serialized entries; stops (and sets `broken`) at the first
/// length that does not fit the buffer.
struct WireIter<'a> {
    buf: &'a [u8],
    count: usize,
    n: usize,
    pos: usize,
    broken: bool,
}

impl<'a> Iterator for WireIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.n >= self.count || self.broken {
            return None;
        }
        let entry = self.entry();
        if entry.is_none() {
            self.broken = true;
        }
        self.n += 1;
        entry
    }
}

impl<'a> WireIter<'a> {
    /// A walk from the first entry; `count` must fit `buf`'s size table
    /// (checked by [`HeaderMap::decode`]).
    fn new(buf: &'a [u8], count: usize) -> Self {
        WireIter {
            buf,
            count,
            n: 0,
            pos: 4 + count * 8,
            broken: false,
        }
    }

    fn entry(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let sizes = 4 + self.n * 8;
        let name_len = read_u32(self.buf, sizes)? as usize;
        let value_len = read_u32(self.buf, sizes + 4)? as usize;
        let name = self.buf.get(self.pos..self.pos.checked_add(name_len)?)?;
        let value_at = self.pos.checked_add(name_len)?.checked_add(1)?;
        let value = self.buf.get(value_at..value_at.checked_add(value_len)?)?;
        self.pos = value_at.checked_add(value_len)?.checked_add(1)?;
        Some((name, value))
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Header names equal after lowercasing and mapping `_` to `-`: the names
/// that CGI-style servers (`HTTP_X_API_KEY`) cannot tell apart.
pub fn same_header(a: &[u8], b: &[u8]) -> bool {
    let fold = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| fold(*x) == fold(*y))
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

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    /// An empty map as Envoy serializes it (a zero count and nothing else)
    /// is a map, and one byte short of the sizes it announces is not
    /// (found by mutation testing: `>` against `>=` on the sizes' end).
    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_zero_count_is_an_empty_map_and_a_short_buffer_is_refused() {
        let empty = encode(&[]);
        assert_eq!(empty, [0, 0, 0, 0]);
        let map = HeaderMap::decode(&empty).unwrap();
        assert_eq!(map.iter().count(), 0);
        let one = encode(&[(b"a".as_slice(), b"b".as_slice())]);
        assert!(HeaderMap::decode(&one).is_some());
        assert!(HeaderMap::decode(&one[..11]).is_none());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_decoded_map_walks_like_the_pairs_it_came_from() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"x-api-key", b"one"),
            (b"accept", b"*/*"),
            (b"X-Api-Key", b"two"),
        ];
        let buf = encode(&pairs);
        let wire = HeaderMap::decode(&buf).unwrap();
        let given = HeaderMap::from_pairs(pairs.clone());
        for map in [&wire, &given] {
            assert_eq!(map.len(), 3);
            assert_eq!(map.iter().collect::<Vec<_>>(), pairs);
            let keys: Vec<&[u8]> = map.get_all(b"x-api-key").collect();
            assert_eq!(keys, [&b"one"[..], &b"two"[..]]);
            assert_eq!(map.get(b"missing"), None);
        }
        // Walking twice gives the same entries (nothing is consumed).
        assert_eq!(wire.iter().count(), wire.iter().count());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn lengths_past_the_buffer_are_rejected() {
        let mut buf = encode(&[(b"a", b"b")]);
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::decode(&buf).is_none());
        let mut buf = encode(&[(b"a", b"b")]);
        buf[8..12].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert!(HeaderMap::decode(&buf).is_none());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
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
