//! The control-plane poller's state machine: lease, fetch, pages, publish, adopt, staleness.
//!
//! One VM per Envoy fetches (it holds a lease in shared data), validates what
//! it gets and publishes the compiled list, switching to it at once; every
//! other VM adopts the published generation on its next tick. Shared data
//! comes in through [`CounterStore`], the HTTP callout through [`Callout`],
//! the monotonic clock through a closure (the three bundled in [`Io`]), and
//! each step hands back a [`Step`]: the policy to switch to, what to count
//! and what to log. The glue only makes the host calls.

use crate::control::{classify, ControlPlane, FetchOutcome, Lease, Published};
use crate::headers::HeaderMap;
use crate::keylist::{CompiledKeyList, KeyListPages};
use crate::keys::KeyStore;
use crate::ratelimit::CounterStore;
use crate::Policy;

/// The host's HTTP callouts, as the poller needs them.
pub trait Callout {
    /// Sends `GET` to `cluster` with `headers` (`:method`, `:path` and
    /// `:authority` included) and a timeout. Returns the callout's token, or
    /// why the host refused to send it.
    fn dispatch_get(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout_ms: u64,
    ) -> Result<u32, String>;

    /// Up to `max` bytes of the body of the response being handled (empty if
    /// the host will not give it). Only read when the poller will use it.
    fn response_body(&mut self, max: usize) -> Vec<u8>;
}

/// The response to a callout, as the host announces it.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The callout's token.
    pub token: u32,
    /// The serialized response header map, or `None` when the callout was
    /// reset (it arrived with no headers at all).
    pub headers: Option<&'a [u8]>,
    /// Size of the body the host holds.
    pub body_size: usize,
}

/// Severity of a line the glue logs for the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warning.
    Warn,
    /// Error.
    Error,
}

/// Counter increments of one step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `keygate.control_plane.fetch_ok`.
    pub ok: u64,
    /// `keygate.control_plane.fetch_not_modified`.
    pub not_modified: u64,
    /// `keygate.control_plane.fetch_failed`.
    pub failed: u64,
}

/// What one poller step asks the glue to do.
#[derive(Debug, Default)]
pub struct Step {
    /// Switch requests to this policy (the static keys merged with the list).
    pub switch: Option<Box<Policy>>,
    /// The list is older than `max_staleness` (only a tick says).
    pub stale: bool,
    /// Counters to add to.
    pub counts: Counts,
    /// Gauge `keygate.control_plane.list_version`, when it changes.
    pub list_version: Option<u64>,
    /// Gauge `keygate.control_plane.keys_loaded`, when it changes.
    pub keys_loaded: Option<u64>,
    /// Gauge `keygate.control_plane.seconds_since_last_good_fetch`.
    pub seconds_since_last_good_fetch: Option<u64>,
    /// Lines to log.
    pub logs: Vec<(Level, String)>,
}

impl Step {
    fn log(&mut self, level: Level, message: String) {
        self.logs.push((level, message));
    }

    /// Switches to `policy`, a list of `version`, with its gauges.
    fn switch_to(&mut self, policy: Policy, version: u64) {
        self.list_version = Some(version);
        self.keys_loaded = Some(policy.keys().len() as u64);
        self.switch = Some(Box::new(policy));
    }
}

/// Shared-data keys of one control-plane list: keygate filters in the same VM
/// polling other lists have their own (see [`ControlPlane::shared_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKeys {
    /// The fetcher lease.
    pub lease: String,
    /// The published state ([`Published`]).
    pub meta: String,
    /// The published list (the key store's wire form).
    pub list: String,
}

impl SharedKeys {
    /// The keys of `cp`'s list.
    pub fn of(cp: &ControlPlane) -> Self {
        let name = cp.shared_name();
        SharedKeys {
            lease: format!("keygate/cp/{name}/lease"),
            meta: format!("keygate/cp/{name}/meta"),
            list: format!("keygate/cp/{name}/list"),
        }
    }
}

/// The host as the poller reaches it.
pub struct Io<'a> {
    /// Shared data.
    pub store: &'a dyn CounterStore,
    /// HTTP callouts.
    pub callout: &'a mut dyn Callout,
    /// The monotonic clock in nanoseconds (`None` if the host refuses).
    pub clock: &'a dyn Fn() -> Option<u64>,
}

/// Per-VM polling state, owned by the root context.
#[derive(Debug)]
pub struct Poller {
    /// Where this control plane's lease, state and list live in shared data.
    keys: SharedKeys,
    /// This VM's id in the lease.
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

impl Poller {
    /// A poller of `cp` for the VM `me` (an id unique to the VM: two VMs with
    /// one id would only both fetch for a while, never use a wrong list).
    pub fn new(cp: &ControlPlane, me: u64) -> Self {
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

    /// Tick period for a control plane, in milliseconds: workers check for
    /// new versions a few times per poll interval, so a published list is
    /// picked up quickly.
    pub fn tick_period_ms(cp: &ControlPlane) -> u64 {
        (cp.poll_ms / 4).clamp(50, 1000)
    }

    /// Once per tick: pick up a newly published list, report staleness,
    /// and, if this VM holds the lease and it is time, fetch.
    pub fn tick(&mut self, base: &Policy, cp: &ControlPlane, io: &mut Io<'_>) -> Step {
        let mut step = Step::default();
        let store = io.store;
        let Some(now) = (io.clock)() else {
            return step;
        };
        let published = read_meta(store, &self.keys.meta);
        if let Some((p, _)) = &published {
            let age_ns = now.saturating_sub(p.confirmed_ns);
            step.seconds_since_last_good_fetch = Some(age_ns / 1_000_000_000);
            step.stale = age_ns / 1_000_000 > cp.max_staleness_ms;
            self.load_if_new(base, p, store, &mut step);
        }
        if self.in_flight.is_none() && self.hold_lease(store, now, cp) && now >= self.next_fetch_ns
        {
            self.next_fetch_ns = now.saturating_add(cp.poll_ms * 1_000_000);
            self.pending = None;
            let etag = read_meta(store, &self.keys.meta)
                .map(|(p, _)| p.etag)
                .unwrap_or_default();
            self.dispatch(cp, &cp.path, ("if-none-match", &etag), io, &mut step);
        }
        step
    }

    /// Loads the published list now if there is one (used right after a
    /// configuration update, whose base policy has no list yet).
    pub fn sync(&mut self, base: &Policy, store: &dyn CounterStore) -> Step {
        let mut step = Step::default();
        self.seen_generation = None;
        if let Some((p, _)) = read_meta(store, &self.keys.meta) {
            self.load_if_new(base, &p, store, &mut step);
        }
        step
    }

    /// Adopts the published list if this VM has not applied its generation.
    fn load_if_new(
        &mut self,
        base: &Policy,
        p: &Published,
        store: &dyn CounterStore,
        step: &mut Step,
    ) {
        if self.seen_generation == Some(p.generation) {
            return;
        }
        let Ok(Some((bytes, _))) = store.get(&self.keys.list) else {
            return;
        };
        self.seen_generation = Some(p.generation);
        // The fetcher published the compiled list: adopt it, no JSON parse.
        let Some(store) = KeyStore::from_bytes(bytes) else {
            step.log(
                Level::Error,
                "published key list is corrupt; not applied".into(),
            );
            return;
        };
        let merged = base.with_key_list(CompiledKeyList {
            version: p.version,
            store: std::sync::Arc::new(store),
        });
        match merged {
            Ok(policy) => step.switch_to(policy, p.version),
            Err(errors) => {
                // The fetcher validated it; this only happens if static keys clash.
                for e in &errors {
                    step.log(
                        Level::Error,
                        format!("control-plane key list not applied: {e}"),
                    );
                }
            }
        }
    }

    /// True when this VM holds the fetch lease at `now` (read only; the
    /// tick takes and renews it). The usage reporter sends from this VM only.
    pub fn holds_lease(&self, store: &dyn CounterStore, now: u64) -> bool {
        matches!(
            store.get(&self.keys.lease),
            Ok(Some((bytes, _))) if Lease::decode(&bytes).is_some_and(|l| l.holder == self.me && l.until_ns > now)
        )
    }

    /// Takes or renews the lease; true if this VM holds it now.
    fn hold_lease(&self, store: &dyn CounterStore, now: u64, cp: &ControlPlane) -> bool {
        let (current, cas) = match store.get(&self.keys.lease) {
            Ok(Some((bytes, cas))) => (Lease::decode(&bytes), cas),
            Ok(None) => (None, None),
            Err(_) => return false,
        };
        let ttl = (cp.poll_ms * 3 + cp.timeout_ms) * 1_000_000;
        match Lease::claim(current, self.me, now, ttl) {
            Some(lease) => matches!(store.set(&self.keys.lease, &lease.encode(), cas), Ok(true)),
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
        io: &mut Io<'_>,
        step: &mut Step,
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
        match io
            .callout
            .dispatch_get(&cp.cluster, &headers, cp.timeout_ms)
        {
            Ok(token) => self.in_flight = Some(token),
            Err(why) => {
                step.counts.failed += 1;
                step.log(
                    Level::Warn,
                    format!(
                        "control-plane fetch not sent (cluster {:?}, status {why})",
                        cp.cluster
                    ),
                );
            }
        }
    }

    /// Handles a callout response: validate, publish, count. A response to
    /// a callout this poller is not waiting for changes nothing.
    pub fn on_response(
        &mut self,
        response: Response<'_>,
        base: &Policy,
        cp: &ControlPlane,
        io: &mut Io<'_>,
    ) -> Step {
        let mut step = Step::default();
        let (store, clock) = (io.store, io.clock);
        if self.in_flight != Some(response.token) {
            return step;
        }
        self.in_flight = None;
        let map = response
            .headers
            .and_then(HeaderMap::decode)
            .unwrap_or_default();
        let status = response.headers.and_then(|_| {
            map.get(b":status")
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u16>().ok())
        });
        let etag = map.get(b"etag").and_then(|e| std::str::from_utf8(e).ok());
        // max_list_bytes bounds the whole list, all pages together.
        let so_far = self.pending.as_ref().map_or(0, |(pages, _)| pages.bytes());
        let body_size = response.body_size;
        let truncated = so_far.saturating_add(body_size) > cp.max_list_bytes;
        let published = read_meta(store, &self.keys.meta);
        let current_version = published.as_ref().map(|(p, _)| p.version);
        let outcome = {
            // Dropped before the list is merged: a large body is not kept
            // alongside its compiled form.
            let body = if status == Some(200) && !truncated {
                io.callout.response_body(body_size)
            } else {
                Vec::new()
            };
            classify(
                status,
                etag,
                &body,
                truncated || body.len() < body_size,
                current_version,
                self.pending.take(),
            )
        };
        match outcome {
            FetchOutcome::MorePages { pages, etag } => {
                let next = pages.next.clone().unwrap_or_default();
                let if_match = etag.clone().unwrap_or_default();
                // Keep the lease while the pages come in.
                if let Some(now) = clock() {
                    self.hold_lease(store, now, cp);
                }
                self.pending = Some((*pages, etag));
                self.dispatch(cp, &next, ("if-match", &if_match), io, &mut step);
                if self.in_flight.is_none() {
                    self.pending = None;
                }
            }
            FetchOutcome::NotModified => {
                step.counts.not_modified += 1;
                if let Some((mut p, cas)) = published {
                    p.confirmed_ns = clock().unwrap_or(p.confirmed_ns);
                    let _ = store.set(&self.keys.meta, &p.encode(), cas);
                }
            }
            FetchOutcome::Updated { list, etag } => {
                self.publish(list, etag, published, base, io, &mut step);
            }
            FetchOutcome::Failed(reason) => {
                step.counts.failed += 1;
                step.log(
                    Level::Warn,
                    format!("control-plane fetch failed, keeping the last good list: {reason}"),
                );
            }
        }
        step
    }

    /// Merges a newly fetched list with the static keys and publishes it
    /// for every VM; this VM switches at once.
    fn publish(
        &mut self,
        list: CompiledKeyList,
        etag: Option<String>,
        published: Option<(Published, Option<u32>)>,
        base: &Policy,
        io: &Io<'_>,
        step: &mut Step,
    ) {
        let (store, clock) = (io.store, io.clock);
        let (version, listed) = (list.version, list.store.len());
        let list_store = list.store.clone();
        let policy = match base.with_key_list(list) {
            Ok(p) => p,
            Err(errors) => {
                step.counts.failed += 1;
                for e in &errors {
                    step.log(Level::Error, format!("control-plane key list refused: {e}"));
                }
                return;
            }
        };
        step.counts.ok += 1;
        // The same list again (same version and ETag) is not published anew:
        // only the time it was last confirmed moves.
        let unchanged = published
            .as_ref()
            .is_some_and(|(p, _)| p.version == version && etag.as_deref() == Some(p.etag.as_str()));
        let next = Published {
            version,
            generation: published
                .as_ref()
                .map_or(1, |(p, _)| p.generation + u64::from(!unchanged)),
            confirmed_ns: clock().unwrap_or(0),
            etag: etag.unwrap_or_default(),
        };
        if !unchanged
            && store
                .set(&self.keys.list, list_store.as_bytes(), None)
                .is_err()
        {
            step.counts.failed += 1;
            step.log(
                Level::Error,
                "could not publish the key list in shared data".into(),
            );
            return;
        }
        let cas = published.and_then(|(_, cas)| cas);
        let published_now = matches!(store.set(&self.keys.meta, &next.encode(), cas), Ok(true));
        if !unchanged {
            step.log(
                Level::Info,
                format!(
                    "control-plane key list version {} published ({} keys)",
                    next.version, listed
                ),
            );
        }
        if published_now && !unchanged {
            // This VM built the policy already: switch now, skip the re-parse.
            self.seen_generation = Some(next.generation);
            step.switch_to(policy, next.version);
        }
    }
}

/// The published state and its CAS token, if there is a readable one.
fn read_meta(store: &dyn CounterStore, key: &str) -> Option<(Published, Option<u32>)> {
    let (bytes, cas) = store.get(key).ok()??;
    Published::decode(&bytes).map(|p| (p, cas))
}
