//! The control-plane key list, as far as it is pure logic: configuration,
//! classification of a fetch, the fetcher lease, and the published state.
//!
//! The filter polls one URL per Envoy (not per worker): workers elect a
//! fetcher with a lease in shared data, the fetcher validates what it gets and
//! publishes it, and every worker switches to the published version.

use sha2::{Digest as _, Sha256};

use crate::config::{ControlPlaneConfig, StalePolicy};
use crate::duration::parse_duration_ms;
use crate::error::ConfigError;
use crate::keylist::{CompiledKeyList, KeyListPages};
use crate::usage::{UsageReporting, MAX_REPORT_KEYS};

/// A validated control-plane configuration, durations in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    /// Envoy cluster.
    pub cluster: String,
    /// `:authority`.
    pub authority: String,
    /// `:path`.
    pub path: String,
    /// Poll period.
    pub poll_ms: u64,
    /// Callout timeout.
    pub timeout_ms: u64,
    /// Staleness limit.
    pub max_staleness_ms: u64,
    /// Policy once stale.
    pub stale_policy: StalePolicy,
    /// Body cap.
    pub max_list_bytes: usize,
    /// Usage reporting, when `usage_report_interval` is set.
    pub usage: Option<UsageReporting>,
}

impl ControlPlane {
    /// A name for this control plane's shared-data entries (lease, list,
    /// published state), from what says which list it is: cluster, authority
    /// and path. Keygate filters in one VM polling the same list share one
    /// fetcher (the lease holder's timings apply), filters polling other
    /// lists keep their own, and a reload that only changes timings keeps
    /// serving the published list instead of starting cold.
    pub fn shared_name(&self) -> String {
        let mut hasher = Sha256::new();
        for part in [
            self.cluster.as_bytes(),
            self.authority.as_bytes(),
            self.path.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hex::encode(&hasher.finalize()[..16])
    }

    /// Validates `c`, pushing problems under `control_plane.*`.
    pub fn compile(c: &ControlPlaneConfig, errors: &mut Vec<ConfigError>) -> Option<ControlPlane> {
        let before = errors.len();
        let mut dur = |name: &str, v: &str, min: u64, max: u64| match parse_duration_ms(v) {
            Some(ms) if (min..=max).contains(&ms) => ms,
            _ => {
                errors.push(ConfigError {
                    field: format!("control_plane.{name}"),
                    message: format!("{v:?} is not a duration from {min} ms to {max} ms (e.g. \"1s\", \"500ms\")"),
                });
                0
            }
        };
        let poll_ms = dur("poll_interval", &c.poll_interval, 100, 3_600_000);
        let timeout_ms = dur("timeout", &c.timeout, 10, 600_000);
        let max_staleness_ms = dur("max_staleness", &c.max_staleness, 1_000, 30 * 86_400_000);
        // Shorter than one poll cycle, the list would go stale between every
        // two polls (and with fail_closed, answer 503 most of the time). A 0
        // is a duration refused above, already reported.
        if poll_ms > 0 && timeout_ms > 0 && max_staleness_ms > 0 {
            let cycle = poll_ms + timeout_ms;
            if max_staleness_ms <= cycle {
                errors.push(ConfigError {
                    field: "control_plane.max_staleness".into(),
                    message: format!(
                        "{:?} is not longer than poll_interval + timeout ({cycle} ms): \
                         the list would go stale between two polls",
                        c.max_staleness
                    ),
                });
            }
        }
        let mut need = |name: &str, ok: bool, msg: &str| {
            if !ok {
                errors.push(ConfigError {
                    field: format!("control_plane.{name}"),
                    message: msg.into(),
                });
            }
        };
        need(
            "cluster",
            !c.cluster.is_empty(),
            "must name an Envoy cluster",
        );
        need(
            "authority",
            !c.authority.is_empty() && c.authority.bytes().all(|b| b.is_ascii_graphic()),
            "must be a host[:port]",
        );
        need(
            "path",
            c.path.starts_with('/') && c.path.bytes().all(|b| b.is_ascii_graphic()),
            "must start with '/'",
        );
        need(
            "max_list_bytes",
            c.max_list_bytes >= 1024,
            "must be at least 1024",
        );
        let usage = compile_usage(c, errors);
        (errors.len() == before).then(|| ControlPlane {
            cluster: c.cluster.clone(),
            authority: c.authority.clone(),
            path: c.path.clone(),
            poll_ms,
            timeout_ms,
            max_staleness_ms,
            stale_policy: c.stale_policy,
            max_list_bytes: c.max_list_bytes,
            usage,
        })
    }
}

/// Validates the `usage_*` fields; `None` when reporting is off.
fn compile_usage(c: &ControlPlaneConfig, errors: &mut Vec<ConfigError>) -> Option<UsageReporting> {
    let mut fail = |name: &str, message: String| {
        errors.push(ConfigError {
            field: format!("control_plane.{name}"),
            message,
        });
    };
    let path_ok =
        c.usage_path.starts_with('/') && c.usage_path.bytes().all(|b| b.is_ascii_graphic());
    if !path_ok {
        fail("usage_path", "must start with '/'".into());
    }
    if !(1..=MAX_REPORT_KEYS).contains(&c.usage_batch_keys) {
        fail(
            "usage_batch_keys",
            format!("{} is not from 1 to {MAX_REPORT_KEYS}", c.usage_batch_keys),
        );
    }
    let interval = c.usage_report_interval.as_deref()?;
    let Some(interval_ms) =
        parse_duration_ms(interval).filter(|ms| (1_000..=3_600_000).contains(ms))
    else {
        fail(
            "usage_report_interval",
            format!("{interval:?} is not a duration from 1s to 1h (e.g. \"10s\")"),
        );
        return None;
    };
    Some(UsageReporting {
        interval_ms,
        path: c.usage_path.clone(),
        batch_keys: c.usage_batch_keys,
    })
}

/// What one fetch produced.
#[derive(Debug, Clone)]
pub enum FetchOutcome {
    /// 304: the list is unchanged.
    NotModified,
    /// A valid, newer list with its ETag.
    Updated {
        /// The list.
        list: CompiledKeyList,
        /// Its ETag, for `If-None-Match`.
        etag: Option<String>,
    },
    /// A page of a longer list: fetch `pages.next` with `If-Match: etag`
    /// and classify that response with these pages.
    MorePages {
        /// The pages so far.
        pages: Box<KeyListPages>,
        /// The first page's ETag.
        etag: Option<String>,
    },
    /// Anything else; the last good list stays.
    Failed(String),
}

/// Classifies a callout response. `status` is `None` when the callout was
/// reset (no headers at all). `body_truncated` means the body was larger
/// than `max_list_bytes`. `pending` holds the earlier pages when this
/// response is a later page, with the first page's ETag.
pub fn classify(
    status: Option<u16>,
    etag: Option<&str>,
    body: &[u8],
    body_truncated: bool,
    current_version: Option<u64>,
    pending: Option<(KeyListPages, Option<String>)>,
) -> FetchOutcome {
    let paging = pending.is_some();
    match status {
        None => FetchOutcome::Failed("callout reset (no response headers)".into()),
        Some(304) if !paging => FetchOutcome::NotModified,
        Some(412) if paging => FetchOutcome::Failed(
            "the key list changed while its pages were fetched (HTTP 412); the next poll starts over"
                .into(),
        ),
        Some(200) if body_truncated => {
            FetchOutcome::Failed("key list larger than max_list_bytes".into())
        }
        Some(200) => {
            let (mut pages, etag) = match pending {
                Some((pages, first_etag)) => (pages, first_etag),
                None => (KeyListPages::default(), etag.map(str::to_string)),
            };
            if let Err(errors) = pages.add(body) {
                return FetchOutcome::Failed(format!(
                    "invalid key list: {}",
                    errors.first().map(ToString::to_string).unwrap_or_default()
                ));
            }
            if let Some(v) = current_version.filter(|v| pages.version < *v) {
                return FetchOutcome::Failed(format!(
                    "key list version {} is older than the current {v}",
                    pages.version
                ));
            }
            if pages.next.is_some() {
                return FetchOutcome::MorePages {
                    pages: Box::new(pages),
                    etag,
                };
            }
            match pages.finish() {
                Ok(list) => FetchOutcome::Updated { list, etag },
                Err(errors) => FetchOutcome::Failed(format!(
                    "invalid key list: {}",
                    errors.first().map(ToString::to_string).unwrap_or_default()
                )),
            }
        }
        Some(s) => FetchOutcome::Failed(format!("control plane answered HTTP {s}")),
    }
}

/// The fetcher lease: who fetches, until when (monotonic ns). 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Holder's id (random per VM).
    pub holder: u64,
    /// Monotonic nanoseconds when it lapses.
    pub until_ns: u64,
}

impl Lease {
    /// Serialized form.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.holder.to_le_bytes());
        b[8..].copy_from_slice(&self.until_ns.to_le_bytes());
        b
    }

    /// Parses a stored lease; anything malformed reads as no lease.
    pub fn decode(b: &[u8]) -> Option<Lease> {
        let holder = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let until_ns = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
        Some(Lease { holder, until_ns })
    }

    /// The lease `me` should write to hold it until `now + ttl`, or `None` if
    /// another live holder has it.
    pub fn claim(current: Option<Lease>, me: u64, now_ns: u64, ttl_ns: u64) -> Option<Lease> {
        match current {
            Some(l) if l.holder != me && l.until_ns > now_ns => None,
            _ => Some(Lease {
                holder: me,
                until_ns: now_ns.saturating_add(ttl_ns),
            }),
        }
    }
}

/// What the fetcher publishes for all workers: version, when the list was
/// last confirmed good (monotonic ns), and its ETag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Key list version (`KeyList::version`), plus a generation counter so
    /// that a republished list of the same version is still picked up.
    pub version: u64,
    /// Increments on every publication.
    pub generation: u64,
    /// Last time a fetch confirmed the list (200 or 304).
    pub confirmed_ns: u64,
    /// ETag for `If-None-Match`.
    pub etag: String,
}

impl Published {
    /// Serialized form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.etag.len());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.confirmed_ns.to_le_bytes());
        b.extend_from_slice(self.etag.as_bytes());
        b
    }

    /// Parses the serialized form.
    pub fn decode(b: &[u8]) -> Option<Published> {
        let word = |i: usize| {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(Published {
            version: word(0)?,
            generation: word(1)?,
            confirmed_ns: word(2)?,
            etag: String::from_utf8(b.get(24..)?.to_vec()).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test;

    /// Compiles a control plane on cluster `cp`, authority `cp.local` and
    /// path `/v1/keys`, with the fields of `extra` added or replaced.
    fn compile(extra: serde_json::Value) -> (Option<ControlPlane>, Vec<String>) {
        let mut v =
            serde_json::json!({"cluster": "cp", "authority": "cp.local", "path": "/v1/keys"});
        if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        let c: ControlPlaneConfig = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        let mut errors = Vec::new();
        let plane = ControlPlane::compile(&c, &mut errors);
        (plane, errors.iter().map(|e| e.to_string()).collect())
    }

    fn plane(path: &str, poll: &str) -> ControlPlane {
        match compile(serde_json::json!({"path": path, "poll_interval": poll})) {
            (Some(plane), _) => plane,
            (None, errors) => panic!("{errors:?}"),
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn max_staleness_must_outlast_one_poll_cycle() {
        let compile = |extra| compile(extra).1;
        // One hour between polls against the default 5 minutes.
        let e = compile(serde_json::json!({"poll_interval": "1h", "stale_policy": "fail_closed"}));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("control_plane.max_staleness: \"5m\" is not longer than poll_interval + timeout (3602000 ms)"), "{e:?}");
        let e = compile(
            serde_json::json!({"poll_interval": "1s", "timeout": "1s", "max_staleness": "2s"}),
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            compile(serde_json::json!({"poll_interval": "1h", "max_staleness": "2h"})).is_empty()
        );
        assert!(compile(
            serde_json::json!({"poll_interval": "250ms", "timeout": "500ms", "max_staleness": "1s"})
        )
        .is_empty());
        // A bad duration is reported once, not again as a short staleness.
        assert_eq!(
            compile(serde_json::json!({"poll_interval": "soon"})).len(),
            1
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn shared_name_names_the_list_not_the_timings() {
        let a = plane("/v1/keys", "1s").shared_name();
        assert_eq!(a, plane("/v1/keys", "1s").shared_name());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, plane("/v1/other", "1s").shared_name());
        // Timings do not make it another list.
        assert_eq!(a, plane("/v1/keys", "2s").shared_name());
        // Parts are length-prefixed: moving a byte between them changes the name.
        let mut moved = plane("/v1/keys", "1s");
        moved.cluster.push('c');
        moved.authority.remove(0);
        assert_ne!(a, moved.shared_name());
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn classify_every_fault() {
        // First-page responses: nothing pending.
        let fetch = |status, etag, body: &[u8], truncated, current| {
            classify(status, etag, body, truncated, current, None)
        };
        let good = br#"{"version":5,"keys":[{"id":"a","sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#;
        assert!(matches!(
            fetch(Some(200), Some("\"e\""), good, false, Some(4)),
            FetchOutcome::Updated { .. }
        ));
        assert!(matches!(
            fetch(Some(200), None, good, false, Some(5)),
            FetchOutcome::Updated { .. }
        ));
        assert!(matches!(
            fetch(Some(304), None, b"", false, Some(5)),
            FetchOutcome::NotModified
        ));
        let failed = |o: FetchOutcome| matches!(o, FetchOutcome::Failed(_));
        assert!(failed(fetch(None, None, b"", false, Some(5))));
        assert!(failed(fetch(Some(500), None, good, false, None)));
        assert!(failed(fetch(
            Some(503),
            None,
            b"no healthy upstream",
            false,
            None
        )));
        assert!(failed(fetch(
            Some(504),
            None,
            b"upstream request timeout",
            false,
            None
        )));
        assert!(failed(fetch(Some(200), None, b"garbage", false, None)));
        assert!(failed(fetch(
            Some(200),
            None,
            &good[..good.len() - 10],
            false,
            None
        )));
        assert!(failed(fetch(
            Some(200),
            None,
            br#"{"version":1,"keyz":[]}"#,
            false,
            None
        )));
        assert!(failed(fetch(Some(200), None, good, true, None)));
        assert!(failed(fetch(Some(200), None, good, false, Some(6))));
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn paged_lists_are_assembled_and_checked() {
        let h = |c: char| c.to_string().repeat(64);
        let page = |version: u64, ids: &[(&str, char)], next: Option<&str>| {
            let keys: Vec<String> = ids
                .iter()
                .map(|(id, c)| format!(r#"{{"id":"{id}","sha256":"{}"}}"#, h(*c)))
                .collect();
            let next = next.map_or(String::new(), |n| format!(r#","next":"{n}""#));
            format!(
                r#"{{"version":{version},"keys":[{}]{next}}}"#,
                keys.join(",")
            )
        };
        let first = page(7, &[("a", 'a'), ("b", 'b')], Some("/v1/keys?page=2"));
        let FetchOutcome::MorePages { pages, etag } = classify(
            Some(200),
            Some("\"e7\""),
            first.as_bytes(),
            false,
            Some(6),
            None,
        ) else {
            panic!("expected more pages");
        };
        assert_eq!(pages.next.as_deref(), Some("/v1/keys?page=2"));
        assert_eq!(etag.as_deref(), Some("\"e7\""));
        let last = page(7, &[("c", 'c')], None);
        let pending = Some((*pages.clone(), etag.clone()));
        match classify(Some(200), None, last.as_bytes(), false, Some(6), pending) {
            FetchOutcome::Updated { list, etag } => {
                assert_eq!(list.version, 7);
                assert_eq!(list.store.len(), 3);
                assert_eq!(etag.as_deref(), Some("\"e7\""));
            }
            other => panic!("{other:?}"),
        }
        let failed = |o: FetchOutcome| matches!(o, FetchOutcome::Failed(_));
        // A later page of another version, a 412, a 304 mid-list, a
        // duplicate across pages, a next that is not a path: all refused.
        let pending = || Some((*pages.clone(), etag.clone()));
        let newer = page(8, &[("c", 'c')], None);
        assert!(failed(classify(
            Some(200),
            None,
            newer.as_bytes(),
            false,
            None,
            pending()
        )));
        assert!(failed(classify(
            Some(412),
            None,
            b"",
            false,
            None,
            pending()
        )));
        assert!(failed(classify(
            Some(304),
            None,
            b"",
            false,
            None,
            pending()
        )));
        let dup = page(7, &[("c", 'a')], None);
        match classify(Some(200), None, dup.as_bytes(), false, None, pending()) {
            FetchOutcome::Failed(why) => assert!(why.contains("same sha256"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A control plane that never stops naming a next page is cut off.
        let endless = page(7, &[], Some("/v1/keys?again"));
        let mut pending: Option<(KeyListPages, Option<String>)> = None;
        let mut outcome = None;
        for _ in 0..crate::keylist::MAX_PAGES + 1 {
            match classify(
                Some(200),
                None,
                endless.as_bytes(),
                false,
                None,
                pending.take(),
            ) {
                FetchOutcome::MorePages { pages, etag } => pending = Some((*pages, etag)),
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        match outcome {
            Some(FetchOutcome::Failed(why)) => assert!(why.contains("pages"), "{why}"),
            other => panic!("{other:?}"),
        }
        let bad_next = page(7, &[("c", 'c')], Some("http://elsewhere/"));
        assert!(failed(classify(
            Some(200),
            None,
            bad_next.as_bytes(),
            false,
            None,
            None
        )));
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn lease_is_exclusive_until_it_lapses() {
        let a = Lease::claim(None, 1, 100, 50).unwrap();
        assert_eq!(
            a,
            Lease {
                holder: 1,
                until_ns: 150
            }
        );
        assert_eq!(Lease::claim(Some(a), 2, 120, 50), None);
        assert_eq!(Lease::claim(Some(a), 1, 120, 50).unwrap().until_ns, 170);
        assert_eq!(Lease::claim(Some(a), 2, 150, 50).unwrap().holder, 2);
        assert_eq!(Lease::decode(&a.encode()), Some(a));
        assert_eq!(Lease::decode(b"short"), None);
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn published_round_trips() {
        let p = Published {
            version: 3,
            generation: 9,
            confirmed_ns: 77,
            etag: "\"abc\"".into(),
        };
        assert_eq!(Published::decode(&p.encode()), Some(p));
        assert_eq!(Published::decode(b"x"), None);
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn control_plane_fields_default_as_the_readme_says() {
        // Only the two required fields: everything else takes its default.
        let c: ControlPlaneConfig =
            serde_json::from_value(serde_json::json!({"cluster": "cp", "authority": "cp.local"}))
                .unwrap_or_else(|e| panic!("{e}"));
        let mut errors = Vec::new();
        let plane = ControlPlane::compile(&c, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let plane = plane.unwrap_or_else(|| panic!("refused"));
        assert_eq!(
            (
                plane.path.as_str(),
                plane.poll_ms,
                plane.timeout_ms,
                plane.max_staleness_ms,
                plane.stale_policy,
                plane.max_list_bytes,
            ),
            (
                "/v1/keys",
                1_000,
                2_000,
                5 * 60_000,
                StalePolicy::Serve,
                256 << 20
            )
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn control_plane_durations_are_refused_outside_their_ranges() {
        // (field, others that keep max_staleness longer than a poll cycle,
        // lowest accepted, highest accepted, range in the error message)
        let cases = [
            (
                "poll_interval",
                serde_json::json!({"max_staleness": "2h"}),
                "100ms",
                "1h",
                (100u64, 3_600_000u64),
            ),
            (
                "timeout",
                serde_json::json!({"max_staleness": "1h"}),
                "10ms",
                "10m",
                (10, 600_000),
            ),
            (
                "max_staleness",
                serde_json::json!({"poll_interval": "100ms", "timeout": "10ms"}),
                "1s",
                "30d",
                (1_000, 2_592_000_000),
            ),
        ];
        for (field, others, lowest, highest, (min, max)) in cases {
            let with = |v: &str| {
                let mut extra = others.clone();
                if let Some(o) = extra.as_object_mut() {
                    o.insert(field.into(), v.into());
                }
                compile(extra)
            };
            for v in [lowest, highest] {
                match with(v) {
                    (Some(_), e) if e.is_empty() => {}
                    other => panic!("{field} {v}: {other:?}"),
                }
            }
            for v in [format!("{}ms", min - 1), format!("{}ms", max + 1)] {
                let (plane, e) = with(&v);
                assert!(plane.is_none(), "{field} {v}");
                assert_eq!(
                    e,
                    [format!(
                        "control_plane.{field}: {v:?} is not a duration from {min} ms to {max} ms (e.g. \"1s\", \"500ms\")"
                    )],
                    "{field} {v}"
                );
            }
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_bad_duration_is_not_reported_again_as_a_short_staleness() {
        // Each time, had the bad duration counted (as 0), max_staleness
        // would not outlast poll_interval + timeout.
        for (extra, field) in [
            (
                serde_json::json!({"poll_interval": "soon", "max_staleness": "1s"}),
                "poll_interval",
            ),
            (
                serde_json::json!({"timeout": "never", "poll_interval": "2s", "max_staleness": "1s"}),
                "timeout",
            ),
            (
                serde_json::json!({"max_staleness": "later"}),
                "max_staleness",
            ),
            (
                serde_json::json!({"max_staleness": "999ms"}),
                "max_staleness",
            ),
        ] {
            let (plane, e) = compile(extra.clone());
            assert!(plane.is_none(), "{extra}");
            assert_eq!(e.len(), 1, "{extra}: {e:?}");
            assert!(
                e[0].starts_with(&format!("control_plane.{field}: "))
                    && e[0].contains("is not a duration"),
                "{extra}: {e:?}"
            );
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn control_plane_names_and_size_are_checked() {
        let refused = |extra: serde_json::Value, error: &str| {
            let (plane, e) = compile(extra.clone());
            assert!(plane.is_none(), "{extra}");
            assert_eq!(e, [error], "{extra}");
        };
        refused(
            serde_json::json!({"cluster": ""}),
            "control_plane.cluster: must name an Envoy cluster",
        );
        for authority in ["", "cp local", "cp.local\n"] {
            refused(
                serde_json::json!({"authority": authority}),
                "control_plane.authority: must be a host[:port]",
            );
        }
        for path in ["", "v1/keys", "/v1 keys", "/v1/keys\t"] {
            refused(
                serde_json::json!({"path": path}),
                "control_plane.path: must start with '/'",
            );
        }
        refused(
            serde_json::json!({"max_list_bytes": 1023}),
            "control_plane.max_list_bytes: must be at least 1024",
        );
        let (plane, e) =
            compile(serde_json::json!({"authority": "cp.local:8443", "max_list_bytes": 1024}));
        assert!(e.is_empty(), "{e:?}");
        let plane = plane.unwrap_or_else(|| panic!("refused"));
        assert_eq!(
            (plane.authority.as_str(), plane.max_list_bytes),
            ("cp.local:8443", 1024)
        );
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_412_is_a_changed_list_only_while_paging() {
        // The log line says why a fetch failed: on a first page, a 412 is
        // just an unexpected status.
        match classify(Some(412), None, b"", false, None, None) {
            FetchOutcome::Failed(why) => assert_eq!(why, "control plane answered HTTP 412"),
            other => panic!("{other:?}"),
        }
    }

    #[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
    #[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
    fn a_next_page_must_be_a_visible_path_of_at_most_2048_bytes() {
        let first_page = |next: &str| {
            let doc = serde_json::json!({"version": 1, "keys": [], "next": next});
            classify(
                Some(200),
                None,
                doc.to_string().as_bytes(),
                false,
                None,
                None,
            )
        };
        let longest = format!("/{}", "p".repeat(2047));
        for next in ["/v1/keys?page=2", "/", longest.as_str()] {
            match first_page(next) {
                FetchOutcome::MorePages { pages, .. } => {
                    assert_eq!(pages.next.as_deref(), Some(next));
                }
                other => panic!("{next:?}: {other:?}"),
            }
        }
        let too_long = format!("/{}", "p".repeat(2048));
        for next in [
            "v1/keys?page=2",
            "/v1/keys?page 2",
            "/v1/keys?page=\t2",
            "/v1/ké",
            too_long.as_str(),
        ] {
            match first_page(next) {
                FetchOutcome::Failed(why) => assert_eq!(
                    why,
                    "invalid key list: next: must be a path starting with '/' (visible ASCII, at most 2048 bytes)",
                    "{next:?}"
                ),
                other => panic!("{next:?}: {other:?}"),
            }
        }
    }
}
