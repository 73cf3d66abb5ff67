//! Fakes of the host for tests: an in-memory CAS store with Envoy's shared-data
//! semantics, a [`Host`] with settable clocks and address, the header map
//! of a typical request, HTTP callouts the test answers ([`FakeCallouts`])
//! and a VM's configuration buffer ([`FakeShareHost`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::config_share::ShareHost;
use crate::headers::encode;
use crate::host::Host;
use crate::poller::{Callout, Level};
use crate::ratelimit::{CounterStore, StoreError, Versioned};

/// Shared data as Envoy keeps it: each write bumps the CAS token; a key that
/// does not exist accepts any write.
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

impl CounterStore for MemStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let m = self.map.lock().map_err(|_| StoreError)?;
        Ok(m.get(key).map(|(v, c)| (v.clone(), Some(*c))))
    }

    /// Like Envoy's shared data: a CAS only guards a key that exists.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let mut m = self.map.lock().map_err(|_| StoreError)?;
        match m.get_mut(key) {
            Some(entry) if cas.is_some_and(|c| c != entry.1) => Ok(false),
            Some(entry) => {
                entry.0 = value.to_vec();
                entry.1 += 1;
                Ok(true)
            }
            None => {
                m.insert(key.to_string(), (value.to_vec(), 1));
                Ok(true)
            }
        }
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let mut m = self.map.lock().map_err(|_| StoreError)?;
        if m.contains_key(key) {
            return Ok(false);
        }
        m.insert(key.to_string(), (value.to_vec(), 1));
        Ok(true)
    }
}

/// A host with fixed answers; build it with the `with_*` methods.
#[derive(Debug)]
pub struct FakeHost {
    /// Monotonic nanoseconds.
    pub monotonic: Cell<Option<u64>>,
    /// Unix seconds.
    pub unix: Option<i64>,
    /// Downstream address.
    pub ip: Option<IpAddr>,
    /// Buckets.
    pub store: MemStore,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            monotonic: Cell::new(Some(1_000_000_000_000)),
            unix: Some(1_800_000_000),
            ip: "127.0.0.1".parse().ok(),
            store: MemStore::default(),
        }
    }
}

impl FakeHost {
    /// Sets the wall clock.
    pub fn with_unix(mut self, secs: i64) -> Self {
        self.unix = Some(secs);
        self
    }

    /// Sets the downstream address.
    pub fn with_ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().ok();
        self
    }

    /// Moves the monotonic clock forward.
    pub fn advance_ns(&self, ns: u64) {
        self.monotonic.set(self.monotonic.get().map(|t| t + ns));
    }
}

impl Host for FakeHost {
    fn monotonic_ns(&self) -> Option<u64> {
        self.monotonic.get()
    }
    fn unix_secs(&self) -> Option<i64> {
        self.unix
    }
    fn source_ip(&self) -> Option<IpAddr> {
        self.ip
    }
    fn counters(&self) -> &dyn CounterStore {
        &self.store
    }
}

/// The serialized header map Envoy hands the filter for a plain `GET` from a
/// load generator such as `wrk`, with `key` in `x-api-key` if given.
pub fn get_request_wire(key: Option<&[u8]>) -> Vec<u8> {
    let mut pairs: Vec<(&[u8], &[u8])> = vec![
        (b":authority", b"127.0.0.1:10000"),
        (b":path", b"/direct"),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"user-agent", b"wrk"),
        (b"x-forwarded-proto", b"http"),
        (b"x-request-id", b"6f1c3b9e-8d2a-4f5e-9b7c-1a2b3c4d5e6f"),
    ];
    if let Some(k) = key {
        pairs.push((b"x-api-key", k));
    }
    encode(&pairs)
}

/// One GET the poller asked [`FakeCallouts`] to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentGet {
    /// The token handed back for it.
    pub token: u32,
    /// The Envoy cluster.
    pub cluster: String,
    /// Its headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Its timeout.
    pub timeout_ms: u64,
}

impl SentGet {
    /// The value of header `name`, if it was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// HTTP callouts that are recorded, never sent: the test answers them.
#[derive(Debug, Default)]
pub struct FakeCallouts {
    /// Every GET sent, oldest first.
    pub sent: Vec<SentGet>,
    /// While set, the host refuses to send (as for an unknown cluster),
    /// with this status.
    pub refuse: Option<String>,
    /// Body of the response being handled.
    pub body: Vec<u8>,
}

impl Callout for FakeCallouts {
    fn dispatch_get(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        if let Some(status) = &self.refuse {
            return Err(status.clone());
        }
        let token = u32::try_from(self.sent.len() + 1).unwrap_or(u32::MAX);
        self.sent.push(SentGet {
            token,
            cluster: cluster.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            timeout_ms,
        });
        Ok(token)
    }

    fn response_body(&mut self, max: usize) -> Vec<u8> {
        self.body.iter().copied().take(max).collect()
    }
}

/// The serialized header map of a callout response with `status` and,
/// if given, an `etag`.
pub fn response_headers(status: u16, etag: Option<&str>) -> Vec<u8> {
    let status = status.to_string();
    let mut pairs: Vec<(&[u8], &[u8])> = vec![
        (b":status", status.as_bytes()),
        (b"content-type", b"application/json"),
    ];
    if let Some(etag) = etag {
        pairs.push((b"etag", etag.as_bytes()));
    }
    encode(&pairs)
}

/// One VM's view of its plugin configuration, randomness, clock and log.
#[derive(Debug, Default)]
pub struct FakeShareHost {
    /// The plugin configuration.
    pub config: Vec<u8>,
    /// What the VM draws as a secret (`None`: randomness unavailable).
    pub secret: Option<[u8; 16]>,
    /// Monotonic nanoseconds (`None`: the clock is refused).
    pub monotonic: Cell<Option<u64>>,
    /// `KEYGATE_SHARE_KEEP_S` in the VM's environment.
    pub keep: Option<String>,
    /// Reading the configuration fails with this status.
    pub unreadable: Option<String>,
    /// Lines logged.
    pub logs: RefCell<Vec<(Level, String)>>,
}

impl FakeShareHost {
    /// A VM with `config`, drawing `secret`, at monotonic time `now_ns`.
    pub fn new(config: &[u8], secret: u8, now_ns: u64) -> Self {
        FakeShareHost {
            config: config.to_vec(),
            secret: Some([secret; 16]),
            monotonic: Cell::new(Some(now_ns)),
            ..FakeShareHost::default()
        }
    }

    /// Lines logged at `level`.
    pub fn logged(&self, level: Level) -> Vec<String> {
        self.logs
            .borrow()
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

impl ShareHost for FakeShareHost {
    fn config_chunk(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        if self.unreadable.is_some() {
            return None;
        }
        let end = at.saturating_add(len).min(self.config.len());
        Some(self.config.get(at..end).unwrap_or_default().to_vec())
    }

    fn config(&self) -> Result<Vec<u8>, String> {
        match &self.unreadable {
            Some(status) => Err(status.clone()),
            None => Ok(self.config.clone()),
        }
    }

    fn random_secret(&self) -> Option<[u8; 16]> {
        self.secret
    }

    fn monotonic_ns(&self) -> Option<u64> {
        self.monotonic.get()
    }

    fn keep_setting(&self) -> Option<String> {
        self.keep.clone()
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}
