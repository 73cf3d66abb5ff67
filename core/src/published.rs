//! The index of compiled configurations published in shared data.
//!
//! The first VM to load a configuration publishes its compiled form so that
//! the other VMs adopt it instead of parsing it again. An entry is only
//! needed while VMs are still loading that configuration, seconds after it
//! was published, but nothing tells a VM when the last one has: a VM that
//! Envoy destroys never says goodbye. So the index records when each entry
//! was published, and every publication frees the entries older than the
//! keep period. A VM that loads a configuration after its entry was freed
//! compiles it on its own: slower, never wrong.
//!
//! Stored form: one line per entry, `<id> <published at, ns>\n`.

/// One published entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The configuration id the entry is stored under.
    pub id: String,
    /// When it was published (host monotonic clock, ns).
    pub at_ns: u64,
}

/// The result of [`register`]: the index to store and the entries to free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The new stored form of the index.
    pub index: Vec<u8>,
    /// Ids of the entries now older than the keep period.
    pub stale: Vec<String>,
}

/// Parses the stored index; lines that do not parse are dropped.
pub fn parse(stored: &[u8]) -> Vec<Entry> {
    stored
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let (id, at) = line.split_once(' ')?;
            let at_ns = at.parse().ok()?;
            (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Entry {
                id: id.to_owned(),
                at_ns,
            })
        })
        .collect()
}

/// Adds (or refreshes) `id`, published at `now_ns`, to the stored index, and
/// splits off the entries published more than `keep_ns` before `now_ns`.
pub fn register(stored: &[u8], id: &str, now_ns: u64, keep_ns: u64) -> Registered {
    let mut index = Vec::new();
    let mut stale = Vec::new();
    for entry in parse(stored) {
        if entry.id == id {
            continue;
        }
        if now_ns.saturating_sub(entry.at_ns) > keep_ns {
            stale.push(entry.id);
        } else {
            index.extend_from_slice(format!("{} {}\n", entry.id, entry.at_ns).as_bytes());
        }
    }
    index.extend_from_slice(format!("{id} {now_ns}\n").as_bytes());
    Registered { index, stale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    const S: u64 = 1_000_000_000;

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn first_entry_on_an_empty_index() {
        let r = register(b"", "aa", 5 * S, 60 * S);
        assert_eq!(r.index, b"aa 5000000000\n");
        assert!(r.stale.is_empty());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn recent_entries_stay_and_old_ones_are_split_off() {
        let (old, recent, new) = ("0a", "1b", "2c");
        let stored = register(b"", old, S, 60 * S).index;
        let stored = register(&stored, recent, 50 * S, 60 * S).index;
        let r = register(&stored, new, 70 * S, 60 * S);
        assert_eq!(r.stale, [old]);
        let ids: Vec<String> = parse(&r.index).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, [recent, new]);
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn publishing_again_refreshes_instead_of_duplicating() {
        let stored = register(b"", "aa", S, 60 * S).index;
        let r = register(&stored, "aa", 100 * S, 60 * S);
        assert!(r.stale.is_empty(), "its own entry is never freed");
        assert_eq!(
            parse(&r.index),
            [Entry {
                id: "aa".into(),
                at_ns: 100 * S
            }]
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn garbage_lines_are_dropped() {
        let entries = parse(b"zz-not-hex 1\nab 12\nab\n\xff\xfe 3\ncd notanumber\n");
        assert_eq!(
            entries,
            [Entry {
                id: "ab".into(),
                at_ns: 12
            }]
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_clock_that_went_backwards_frees_nothing() {
        let stored = register(b"", "aa", 100 * S, 60 * S).index;
        assert!(register(&stored, "bb", 10 * S, 60 * S).stale.is_empty());
    }
}
