//! Control-plane polling: one fetcher per Envoy (elected with a lease in
//! shared data), publication of the validated list in shared data, and each
//! worker switching to the published version. The decisions (lease, what a
//! response means, merging) are in `keygate_core::control` and `Policy`.

use std::time::Duration;

use keygate_core::control::{classify, ControlPlane, FetchOutcome, Lease, Published};
use keygate_core::headers::HeaderMap;
use keygate_core::keylist::{CompiledKeyList, KeyListPages};
use keygate_core::keys::KeyStore;
use keygate_core::Policy;

use crate::abi::{self, Level};

/// Shared-data keys of one control-plane list: keygate filters in the same VM
/// polling other lists have their own (see [`ControlPlane::shared_name`]).
#[derive(Debug, PartialEq, Eq)]
struct SharedKeys {
    lease: String,
    meta: String,
    list: String,
}

impl SharedKeys {
    fn of(cp: &ControlPlane) -> Self {
        let name = cp.shared_name();
        SharedKeys {
            lease: format!("keygate/cp/{name}/lease"),
            meta: format!("keygate/cp/{name}/meta"),
            list: format!("keygate/cp/{name}/list"),
        }
    }
}

/// Per-VM polling state, owned by the root context.
#[derive(Debug)]
pub struct Poller {
    /// Where this control plane's lease, state and list live in shared data.
    keys: SharedKeys,
    /// Random id of this VM in the lease.
    me: u64,
    /// Generation of the published list this VM is using.
    seen_generation: Option<u64>,
    /// Monotonic time of the next fetch, when holding the lease.
    next_fetch_ns: u64,
    /// Callout in flight.
    in_flight: Option<u32>,
    /// Pages of a paged list received so far, with the first page's ETag.
    pending: Option<(KeyListPages, Option<String>)>,
}

/// Counters and gauges of the control plane.
#[derive(Debug, Default, Clone)]
pub struct PollMetrics {
    ok: Option<u32>,
    not_modified: Option<u32>,
    failed: Option<u32>,
    version: Option<u32>,
    keys: Option<u32>,
    age: Option<u32>,
}

impl PollMetrics {
    /// Defines the metrics (idempotent in Envoy).
    pub fn define() -> Self {
        PollMetrics {
            ok: abi::define_counter("keygate.control_plane.fetch_ok").ok(),
            not_modified: abi::define_counter("keygate.control_plane.fetch_not_modified").ok(),
            failed: abi::define_counter("keygate.control_plane.fetch_failed").ok(),
            version: abi::define_gauge("keygate.control_plane.list_version").ok(),
            keys: abi::define_gauge("keygate.control_plane.keys_loaded").ok(),
            age: abi::define_gauge("keygate.control_plane.seconds_since_last_good_fetch").ok(),
        }
    }

    fn count(id: Option<u32>) {
        if let Some(id) = id {
            abi::increment(id, 1);
        }
    }

    fn set(id: Option<u32>, v: u64) {
        if let Some(id) = id {
            abi::record(id, v);
        }
    }
}

/// What a tick asks the root to do.
pub enum TickAction {
    /// Nothing changed.
    Nothing,
    /// Switch to this policy (a newly published list merged with static keys).
    Switch(Box<Policy>),
}

impl Poller {
    /// A poller of `cp` with a VM-unique id.
    pub fn new(cp: &ControlPlane) -> Self {
        // VMs are created at different nanoseconds; a collision would only
        // mean two fetchers for a while, never a wrong list.
        let me =
            (abi::monotonic_ns().unwrap_or(0) ^ abi::unix_ns().unwrap_or(0).rotate_left(17)) | 1;
        Poller {
            keys: SharedKeys::of(cp),
            me,
            seen_generation: None,
            next_fetch_ns: 0,
            in_flight: None,
            pending: None,
        }
    }

    /// True when this poller polls `cp` (a reload may point elsewhere).
    pub fn polls(&self, cp: &ControlPlane) -> bool {
        self.keys == SharedKeys::of(cp)
    }

    /// Tick period for a control plane: workers check for new versions a few
    /// times per poll interval, so a published list is picked up quickly.
    pub fn tick_period(cp: &ControlPlane) -> Duration {
        Duration::from_millis((cp.poll_ms / 4).clamp(50, 1000))
    }

    /// Once per tick: pick up a newly published list, report staleness,
    /// and, if this VM holds the lease and it is time, fetch.
    /// Returns the policy to switch to and whether the list is stale.
    pub fn tick(
        &mut self,
        base: &Policy,
        cp: &ControlPlane,
        metrics: &PollMetrics,
    ) -> (TickAction, bool) {
        let Some(now) = abi::monotonic_ns() else {
            return (TickAction::Nothing, false);
        };
        let published = read_meta(&self.keys.meta);
        let stale = match &published {
            Some((p, _)) => {
                let age_ns = now.saturating_sub(p.confirmed_ns);
                PollMetrics::set(metrics.age, age_ns / 1_000_000_000);
                age_ns / 1_000_000 > cp.max_staleness_ms
            }
            None => false,
        };
        let action = match published {
            Some((p, _)) => self.load_if_new(base, &p, metrics),
            None => TickAction::Nothing,
        };
        if self.in_flight.is_none() && self.hold_lease(now, cp) && now >= self.next_fetch_ns {
            self.next_fetch_ns = now.saturating_add(cp.poll_ms * 1_000_000);
            self.pending = None;
            let etag = read_meta(&self.keys.meta)
                .map(|(p, _)| p.etag)
                .unwrap_or_default();
            self.dispatch(cp, &cp.path, ("if-none-match", &etag), metrics);
        }
        (action, stale)
    }

    /// Loads the published list now if there is one this VM has not applied
    /// (used right after a configuration update).
    pub fn sync(&mut self, base: &Policy, metrics: &PollMetrics) -> TickAction {
        self.seen_generation = None;
        match read_meta(&self.keys.meta) {
            Some((p, _)) => self.load_if_new(base, &p, metrics),
            None => TickAction::Nothing,
        }
    }

    fn load_if_new(&mut self, base: &Policy, p: &Published, metrics: &PollMetrics) -> TickAction {
        if self.seen_generation == Some(p.generation) {
            return TickAction::Nothing;
        }
        let Ok(Some((bytes, _))) = abi::get_shared_data(&self.keys.list) else {
            return TickAction::Nothing;
        };
        self.seen_generation = Some(p.generation);
        // The fetcher published the compiled list: adopt it, no JSON parse.
        let Some(store) = KeyStore::from_bytes(bytes) else {
            abi::log(Level::Error, "published key list is corrupt; not applied");
            return TickAction::Nothing;
        };
        let merged = base.with_key_list(CompiledKeyList {
            version: p.version,
            store: std::sync::Arc::new(store),
        });
        match merged {
            Ok(policy) => {
                PollMetrics::set(metrics.version, p.version);
                PollMetrics::set(metrics.keys, policy.keys().len() as u64);
                TickAction::Switch(Box::new(policy))
            }
            Err(errors) => {
                // The fetcher validated it; this only happens if static keys clash.
                for e in &errors {
                    abi::log(
                        Level::Error,
                        &format!("control-plane key list not applied: {e}"),
                    );
                }
                TickAction::Nothing
            }
        }
    }

    fn hold_lease(&self, now: u64, cp: &ControlPlane) -> bool {
        let (current, cas) = match abi::get_shared_data(&self.keys.lease) {
            Ok(Some((bytes, cas))) => (Lease::decode(&bytes), cas),
            Ok(None) => (None, 0),
            Err(_) => return false,
        };
        let ttl = (cp.poll_ms * 3 + cp.timeout_ms) * 1_000_000;
        match Lease::claim(current, self.me, now, ttl) {
            Some(lease) => matches!(
                abi::set_shared_data(&self.keys.lease, &lease.encode(), cas),
                Ok(true)
            ),
            None => false,
        }
    }

    /// Sends `GET path`, with the conditional header `condition` when its
    /// value is not empty (`If-None-Match` for a poll, `If-Match` for a later page).
    fn dispatch(
        &mut self,
        cp: &ControlPlane,
        path: &str,
        condition: (&str, &str),
        metrics: &PollMetrics,
    ) {
        let mut headers = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", cp.authority.as_str()),
            ("accept", "application/json"),
        ];
        if !condition.1.is_empty() {
            headers.push(condition);
        }
        let timeout = Duration::from_millis(cp.timeout_ms);
        match proxy_wasm::hostcalls::dispatch_http_call(&cp.cluster, headers, None, vec![], timeout)
        {
            Ok(token) => self.in_flight = Some(token),
            Err(s) => {
                PollMetrics::count(metrics.failed);
                abi::log(
                    Level::Warn,
                    &format!(
                        "control-plane fetch not sent (cluster {:?}, status {s:?})",
                        cp.cluster
                    ),
                );
            }
        }
    }

    /// Handles the callout response: validate, publish, count.
    pub fn on_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        base: &Policy,
        cp: &ControlPlane,
        metrics: &PollMetrics,
    ) -> TickAction {
        if self.in_flight != Some(token) {
            return TickAction::Nothing;
        }
        self.in_flight = None;
        let raw = if num_headers == 0 {
            Vec::new()
        } else {
            abi::header_pairs(abi::CALLOUT_RESPONSE_HEADERS).unwrap_or_default()
        };
        let map = HeaderMap::decode(&raw).unwrap_or_default();
        let status = if num_headers == 0 {
            None
        } else {
            map.get(b":status")
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u16>().ok())
        };
        let etag = map.get(b"etag").and_then(|e| std::str::from_utf8(e).ok());
        // max_list_bytes bounds the whole list, all pages together.
        let so_far = self.pending.as_ref().map_or(0, |(pages, _)| pages.bytes());
        let truncated = so_far.saturating_add(body_size) > cp.max_list_bytes;
        let body = if status == Some(200) && !truncated {
            abi::callout_body(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let published = read_meta(&self.keys.meta);
        let current_version = published.as_ref().map(|(p, _)| p.version);
        match classify(
            status,
            etag,
            &body,
            truncated || body.len() < body_size,
            current_version,
            self.pending.take(),
        ) {
            FetchOutcome::MorePages { pages, etag } => {
                let next = pages.next.clone().unwrap_or_default();
                let if_match = etag.clone().unwrap_or_default();
                // Keep the lease while the pages come in.
                if let Some(now) = abi::monotonic_ns() {
                    self.hold_lease(now, cp);
                }
                self.pending = Some((*pages, etag));
                self.dispatch(cp, &next, ("if-match", &if_match), metrics);
                if self.in_flight.is_none() {
                    self.pending = None;
                }
                TickAction::Nothing
            }
            FetchOutcome::NotModified => {
                PollMetrics::count(metrics.not_modified);
                if let Some((mut p, cas)) = published {
                    p.confirmed_ns = abi::monotonic_ns().unwrap_or(p.confirmed_ns);
                    let _ = abi::set_shared_data(&self.keys.meta, &p.encode(), cas);
                }
                TickAction::Nothing
            }
            FetchOutcome::Updated { list, etag } => {
                let (version, listed) = (list.version, list.store.len());
                let store = list.store.clone();
                drop(body);
                let policy = match base.with_key_list(list) {
                    Ok(p) => p,
                    Err(errors) => {
                        PollMetrics::count(metrics.failed);
                        for e in &errors {
                            abi::log(
                                Level::Error,
                                &format!("control-plane key list refused: {e}"),
                            );
                        }
                        return TickAction::Nothing;
                    }
                };
                PollMetrics::count(metrics.ok);
                let unchanged = published.as_ref().is_some_and(|(p, _)| {
                    p.version == version && etag.as_deref() == Some(p.etag.as_str())
                });
                let next = Published {
                    version,
                    generation: published
                        .as_ref()
                        .map_or(1, |(p, _)| p.generation + u64::from(!unchanged)),
                    confirmed_ns: abi::monotonic_ns().unwrap_or(0),
                    etag: etag.unwrap_or_default(),
                };
                if !unchanged && abi::set_shared_data(&self.keys.list, store.as_bytes(), 0).is_err()
                {
                    PollMetrics::count(metrics.failed);
                    abi::log(
                        Level::Error,
                        "could not publish the key list in shared data",
                    );
                    return TickAction::Nothing;
                }
                let cas = published.map_or(0, |(_, cas)| cas);
                let published_now = matches!(
                    abi::set_shared_data(&self.keys.meta, &next.encode(), cas),
                    Ok(true)
                );
                if !unchanged {
                    abi::log(
                        Level::Info,
                        &format!(
                            "control-plane key list version {} published ({} keys)",
                            next.version, listed
                        ),
                    );
                }
                if published_now && !unchanged {
                    // This VM built the policy already: switch now, skip the re-parse.
                    self.seen_generation = Some(next.generation);
                    PollMetrics::set(metrics.version, next.version);
                    PollMetrics::set(metrics.keys, policy.keys().len() as u64);
                    return TickAction::Switch(Box::new(policy));
                }
                TickAction::Nothing
            }
            FetchOutcome::Failed(reason) => {
                PollMetrics::count(metrics.failed);
                abi::log(
                    Level::Warn,
                    &format!("control-plane fetch failed, keeping the last good list: {reason}"),
                );
                TickAction::Nothing
            }
        }
    }
}

fn read_meta(key: &str) -> Option<(Published, u32)> {
    let (bytes, cas) = abi::get_shared_data(key).ok()??;
    Published::decode(&bytes).map(|p| (p, cas))
}
