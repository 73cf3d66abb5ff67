//! Per-key usage: which keys are still used, how much, and when last.
//!
//! Counting costs a request no host call: each VM counts the allowed
//! requests of each key id in its own memory ([`UsageTally`]). On every tick
//! the VM merges its counts into one shared-data entry per control plane
//! ([`Reporter::tick`], a compare-and-swap loop), stamped with the tick's
//! wall-clock second as the last-used time. The VM that holds the
//! control-plane fetch lease then, every `usage_report_interval`, takes at
//! most `usage_batch_keys` keys out of that entry and POSTs them to the
//! control plane as JSON ([`UsageReport`]). A report that fails (refused,
//! reset, timed out, any status but 2xx) is merged back into the entry and
//! sent again at the next interval, so counts wait in shared data while the
//! control plane is away: one record per key id of the list, whatever the
//! outage's length. A report whose VM goes away before its answer arrives
//! is not sent again (it was most likely delivered); losing a report loses
//! counts, never requests.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::control::ControlPlane;
use crate::poller::Level;
use crate::ratelimit::CounterStore;

mod report;
pub use report::{ReportedKey, UsageReport};

/// Most keys one report may carry (the control plane refuses more).
pub const MAX_REPORT_KEYS: usize = 100_000;

/// Compare-and-swap attempts on the shared entry before a tick gives up
/// (and tries again at the next one, nothing lost).
const CAS_ATTEMPTS: usize = 8;

/// FNV-1a over the id's bytes. Ids come from the validated key list, never
/// from the client, so nobody can pick ids that collide; this is several
/// times cheaper than the standard SipHash on a short id.
#[derive(Debug, Clone, Copy)]
pub struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> Self {
        IdHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Allowed requests per key id counted in one VM since its last drain.
/// Single-threaded, like a VM; shared by the root and the requests via `Rc`.
#[derive(Debug, Default)]
pub struct UsageTally {
    counts: RefCell<HashMap<Box<str>, u64, BuildHasherDefault<IdHasher>>>,
}

impl UsageTally {
    /// Counts one allowed request of key `id`. Allocates only the first
    /// time an id is seen after an idle drain.
    pub fn record(&self, id: &str) {
        let Ok(mut counts) = self.counts.try_borrow_mut() else {
            return;
        };
        match counts.get_mut(id) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                counts.insert(id.into(), 1);
            }
        }
    }

    /// The counts made since the last drain, each stamped `last_used`, and
    /// resets them. Ids idle since the previous drain are forgotten, so the
    /// tally holds only keys in recent use.
    pub fn drain(&self, last_used: i64) -> UsageMap {
        let mut out = UsageMap::default();
        let Ok(mut counts) = self.counts.try_borrow_mut() else {
            return out;
        };
        counts.retain(|id, n| {
            if *n == 0 {
                return false;
            }
            out.add(id, *n, last_used);
            *n = 0;
            true
        });
        out
    }

    /// Puts back counts a drain took but could not hand on; their
    /// last-used time becomes that of the next drain.
    pub fn restore(&self, usage: &UsageMap) {
        let Ok(mut counts) = self.counts.try_borrow_mut() else {
            return;
        };
        for (id, u) in usage.iter() {
            let n = counts.entry(id.into()).or_insert(0);
            *n = n.saturating_add(u.requests);
        }
    }
}

/// A key's usage: requests and the last time one was seen (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Allowed requests.
    pub requests: u64,
    /// Unix seconds of the latest of them (to the tick).
    pub last_used: i64,
}

/// Usage of several keys, by id (ordered, so batches are reproducible).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageMap(BTreeMap<String, Usage>);

impl UsageMap {
    /// Adds `requests` for `id`, keeping the later last-used time.
    pub fn add(&mut self, id: &str, requests: u64, last_used: i64) {
        match self.0.get_mut(id) {
            Some(u) => {
                u.requests = u.requests.saturating_add(requests);
                u.last_used = u.last_used.max(last_used);
            }
            None => {
                self.0.insert(
                    id.to_string(),
                    Usage {
                        requests,
                        last_used,
                    },
                );
            }
        }
    }

    /// Adds every record of `other`.
    pub fn merge(&mut self, other: &UsageMap) {
        for (id, u) in other.iter() {
            self.add(id, u.requests, u.last_used);
        }
    }

    /// The records, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Usage)> + '_ {
        self.0.iter().map(|(id, u)| (id.as_str(), u))
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Option<&Usage> {
        self.0.get(id)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No key at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes and returns the first `max` records (by id); the rest stay.
    pub fn take_first(&mut self, max: usize) -> UsageMap {
        let rest = match self.0.keys().nth(max).cloned() {
            Some(first_left) => self.0.split_off(&first_left),
            None => BTreeMap::new(),
        };
        UsageMap(std::mem::replace(&mut self.0, rest))
    }

    /// The shared-data form: per record, the id's length (u16 LE), the id,
    /// requests (u64 LE) and last-used (i64 LE). Empty for no record.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.0.keys().map(|id| 18 + id.len()).sum();
        let mut b = Vec::with_capacity(size);
        for (id, u) in &self.0 {
            let Ok(len) = u16::try_from(id.len()) else {
                continue;
            };
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(id.as_bytes());
            b.extend_from_slice(&u.requests.to_le_bytes());
            b.extend_from_slice(&u.last_used.to_le_bytes());
        }
        b
    }

    /// Parses [`UsageMap::encode`]'s form; `None` if it is malformed.
    pub fn decode(mut b: &[u8]) -> Option<UsageMap> {
        let mut map = UsageMap::default();
        while !b.is_empty() {
            let len = usize::from(u16::from_le_bytes(b.get(..2)?.try_into().ok()?));
            let id = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
            let rest = b.get(2 + len..)?;
            let requests = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let last_used = i64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
            map.add(id, requests, last_used);
            b = rest.get(16..)?;
        }
        Some(map)
    }

    /// The report's JSON body.
    pub fn to_report(&self) -> Vec<u8> {
        let report = UsageReport {
            keys: self
                .iter()
                .map(|(id, u)| ReportedKey {
                    id: id.to_string(),
                    requests: u.requests,
                    last_used: u.last_used,
                })
                .collect(),
        };
        serde_json::to_vec(&report).unwrap_or_default()
    }
}

/// Usage reporting of a control plane, validated (see `ControlPlane::usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReporting {
    /// Time between reports.
    pub interval_ms: u64,
    /// Path the reports are POSTed to.
    pub path: String,
    /// Most keys per report.
    pub batch_keys: usize,
}

/// The host's HTTP callouts, as the reporter needs them.
pub trait Poster {
    /// Sends `POST` with `headers` (`:method`, `:path` and `:authority`
    /// included) and `body` to `cluster`. Returns the callout's token, or
    /// why the host refused to send it.
    fn dispatch_post(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String>;
}

/// The host as the reporter reaches it.
pub struct UsageIo<'a> {
    /// Shared data.
    pub store: &'a dyn CounterStore,
    /// HTTP callouts.
    pub poster: &'a mut dyn Poster,
    /// The monotonic clock in nanoseconds.
    pub monotonic_ns: &'a dyn Fn() -> Option<u64>,
    /// The wall clock in Unix seconds.
    pub unix_secs: &'a dyn Fn() -> Option<i64>,
}

/// What one reporter step asks the glue to count and log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsageStep {
    /// Reports the control plane accepted (`keygate.usage.reports_ok`).
    pub reports_ok: u64,
    /// Reports not delivered (`keygate.usage.reports_failed`).
    pub reports_failed: u64,
    /// Lines to log.
    pub logs: Vec<(Level, String)>,
}

/// What became of an attempt to change the shared entry.
enum Shared {
    Done,
    /// The store failed or stayed contended; nothing was changed.
    Busy,
}

/// Per-VM reporting state, owned by the root context.
#[derive(Debug)]
pub struct Reporter {
    /// The shared-data entry every VM of this Envoy merges into.
    key: String,
    /// The report awaiting its answer: callout token, what it carries, and
    /// by when (monotonic ns) its answer is due at the latest.
    in_flight: Option<(u32, UsageMap, u64)>,
    /// Monotonic time of the next report, when holding the lease.
    next_report_ns: u64,
}

impl Reporter {
    /// A reporter for `cp`'s control plane.
    pub fn new(cp: &ControlPlane) -> Self {
        Reporter {
            key: Self::shared_key(cp),
            in_flight: None,
            next_report_ns: 0,
        }
    }

    /// The shared-data entry of `cp`'s usage counts (one per control plane,
    /// as its lease and list are).
    pub fn shared_key(cp: &ControlPlane) -> String {
        format!("keygate/cp/{}/usage", cp.shared_name())
    }

    /// True when this reporter merges into `cp`'s entry.
    pub fn reports_to(&self, cp: &ControlPlane) -> bool {
        self.key == Self::shared_key(cp)
    }

    /// Moves this VM's counts into the shared entry. Counts that cannot be
    /// merged now go back into the tally for the next tick.
    pub fn flush(&self, tally: &UsageTally, io: &UsageIo<'_>, step: &mut UsageStep) {
        let now = (io.unix_secs)().unwrap_or(0);
        let drained = tally.drain(now);
        if drained.is_empty() {
            return;
        }
        if let Shared::Busy = merge_into(io.store, &self.key, &drained, step) {
            tally.restore(&drained);
        }
    }

    /// Once per tick, in every VM: merge this VM's counts; then, in the VM
    /// holding the fetch lease (`leader`), send a report when one is due.
    pub fn tick(
        &mut self,
        tally: &UsageTally,
        cp: &ControlPlane,
        leader: bool,
        io: &mut UsageIo<'_>,
    ) -> UsageStep {
        let mut step = UsageStep::default();
        let Some(usage) = &cp.usage else {
            return step;
        };
        self.flush(tally, io, &mut step);
        let Some(now) = (io.monotonic_ns)() else {
            return step;
        };
        // Envoy answers every callout by its timeout, unless the context
        // that sent it went away (a reload): then the answer never comes.
        if let Some((_, batch, due)) = &self.in_flight {
            if now <= *due {
                return step;
            }
            step.logs.push((
                Level::Warn,
                format!(
                    "usage report of {} keys never answered; not sent again",
                    batch.len()
                ),
            ));
            self.in_flight = None;
        }
        if !leader || now < self.next_report_ns {
            return step;
        }
        self.next_report_ns = now.saturating_add(usage.interval_ms.saturating_mul(1_000_000));
        let Some(batch) = take_from(io.store, &self.key, usage.batch_keys, &mut step) else {
            return step;
        };
        if batch.is_empty() {
            return step;
        }
        let body = batch.to_report();
        let headers = [
            (":method", "POST"),
            (":path", usage.path.as_str()),
            (":authority", cp.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match io
            .poster
            .dispatch_post(&cp.cluster, &headers, &body, cp.timeout_ms)
        {
            Ok(token) => {
                let due = now.saturating_add(
                    cp.timeout_ms
                        .saturating_add(1_000)
                        .saturating_mul(1_000_000),
                );
                self.in_flight = Some((token, batch, due));
            }
            Err(why) => {
                step.logs.push((
                    Level::Warn,
                    format!(
                        "usage report not sent (cluster {:?}, status {why}); its counts wait for the next one",
                        cp.cluster
                    ),
                ));
                self.give_back(batch, io, &mut step);
            }
        }
        step
    }

    /// Handles a callout's answer: `status` is `None` for a reset callout.
    /// An answer to another callout changes nothing.
    pub fn on_response(
        &mut self,
        token: u32,
        status: Option<u16>,
        cp: &ControlPlane,
        io: &mut UsageIo<'_>,
    ) -> UsageStep {
        let mut step = UsageStep::default();
        let batch = match self.in_flight.take() {
            Some((t, batch, _)) if t == token => batch,
            other => {
                self.in_flight = other;
                return step;
            }
        };
        match status {
            Some(s) if (200..300).contains(&s) => {
                step.reports_ok += 1;
                // A full batch may have left keys behind: send them at the next tick.
                if cp
                    .usage
                    .as_ref()
                    .is_some_and(|u| batch.len() >= u.batch_keys)
                {
                    self.next_report_ns = 0;
                }
            }
            _ => {
                let why = status.map_or_else(
                    || "callout reset".to_string(),
                    |s| format!("control plane answered HTTP {s}"),
                );
                step.logs.push((
                    Level::Warn,
                    format!(
                        "usage report of {} keys failed ({why}); its counts wait for the next one",
                        batch.len()
                    ),
                ));
                self.give_back(batch, io, &mut step);
            }
        }
        step
    }

    /// True while a report awaits its answer.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Puts an undelivered batch back into the shared entry.
    fn give_back(&self, batch: UsageMap, io: &UsageIo<'_>, step: &mut UsageStep) {
        step.reports_failed += 1;
        if let Shared::Busy = merge_into(io.store, &self.key, &batch, step) {
            step.logs.push((
                Level::Error,
                format!(
                    "usage counts of {} keys lost: shared data refused them",
                    batch.len()
                ),
            ));
        }
    }
}

/// Reads the shared entry: the map and its CAS token (`None`: absent).
/// A malformed entry reads as empty and is replaced at the next write.
fn read(
    store: &dyn CounterStore,
    key: &str,
    step: &mut UsageStep,
) -> Option<(UsageMap, Option<u32>, bool)> {
    match store.get(key) {
        Ok(Some((bytes, cas))) => match UsageMap::decode(&bytes) {
            Some(map) => Some((map, cas, true)),
            None => {
                step.logs.push((
                    Level::Error,
                    "shared usage counts are corrupt; starting them over".into(),
                ));
                Some((UsageMap::default(), cas, true))
            }
        },
        Ok(None) => Some((UsageMap::default(), None, false)),
        Err(_) => None,
    }
}

/// Writes `value` over the entry read with `cas` (`existed`: it was there).
fn write(
    store: &dyn CounterStore,
    key: &str,
    value: &[u8],
    cas: Option<u32>,
    existed: bool,
) -> Option<bool> {
    let written = if existed {
        store.set(key, value, cas)
    } else {
        // Two VMs creating the entry at once: only one may win.
        store.create(key, value)
    };
    written.ok()
}

/// Adds `add` to the shared entry with a bounded CAS loop.
fn merge_into(store: &dyn CounterStore, key: &str, add: &UsageMap, step: &mut UsageStep) -> Shared {
    for _ in 0..CAS_ATTEMPTS {
        let Some((mut current, cas, existed)) = read(store, key, step) else {
            return Shared::Busy;
        };
        current.merge(add);
        match write(store, key, &current.encode(), cas, existed) {
            Some(true) => return Shared::Done,
            Some(false) => continue,
            None => return Shared::Busy,
        }
    }
    Shared::Busy
}

/// Takes up to `max` records out of the shared entry (`None`: the store
/// failed or stayed contended, and nothing was taken).
fn take_from(
    store: &dyn CounterStore,
    key: &str,
    max: usize,
    step: &mut UsageStep,
) -> Option<UsageMap> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut current, cas, existed) = read(store, key, step)?;
        if current.is_empty() {
            return Some(current);
        }
        let batch = current.take_first(max);
        match write(store, key, &current.encode(), cas, existed) {
            Some(true) => return Some(batch),
            Some(false) => continue,
            None => return None,
        }
    }
    None
}

/// The `:status` of a callout response from its serialized header map
/// (`None` for a reset callout, which has no headers).
pub fn response_status(headers: Option<&[u8]>) -> Option<u16> {
    let map = crate::headers::HeaderMap::decode(headers?)?;
    std::str::from_utf8(map.get(b":status")?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
