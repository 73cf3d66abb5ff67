//! The control-plane poller, natively: VMs sharing one in-memory store and
//! clock, a fake control plane answering their callouts, and what each VM
//! ends up serving and counting.
#![allow(clippy::unwrap_used)]

mod faults;
mod lease;
mod paging;

use std::cell::{Cell, RefCell};

use keygate_core::control::ControlPlane;
use keygate_core::headers::encode;
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::poller::{Counts, Io, Level, Poller, Response, Step};
use keygate_core::ratelimit::{CounterStore, StoreError, Versioned};
use keygate_core::testing::{response_headers, FakeCallouts, FakeHost, MemStore, SentGet};
use keygate_core::Policy;

/// One second in nanoseconds.
pub const S: u64 = 1_000_000_000;

/// The counts of one failed fetch, and nothing else.
pub const ONE_FAILURE: Counts = Counts {
    ok: 0,
    not_modified: 0,
    failed: 1,
};

/// The digest of key `k`'s secret, as a key list names it.
pub fn h(k: &str) -> String {
    hex::encode(digest(format!("secret-{k}").as_bytes()))
}

/// A key list (or one page of it) of `version` with keys `ids`.
pub fn list(version: u64, ids: &[&str], next: Option<&str>) -> Vec<u8> {
    let keys: Vec<_> = ids
        .iter()
        .map(|id| serde_json::json!({"id": id, "sha256": h(id)}))
        .collect();
    let mut doc = serde_json::json!({"version": version, "keys": keys});
    if let Some(next) = next {
        doc["next"] = next.into();
    }
    doc.to_string().into_bytes()
}

/// One Envoy: the shared store, the monotonic clock and the configuration
/// every VM loaded (a static key `static` and a control plane polled every
/// second, 2 s timeout, stale after 10 s, lists up to 4 KiB).
pub struct Envoy {
    pub store: MemStore,
    pub now: Cell<u64>,
    pub base: Policy,
    /// Shared-data keys ending with this fail to read and write.
    pub broken: RefCell<Option<&'static str>>,
}

impl CounterStore for Envoy {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.check(key)?;
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        self.check(key)?;
        self.store.set(key, value, cas)
    }
    fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.check(key)?;
        self.store.create(key, value)
    }
}

impl Default for Envoy {
    fn default() -> Self {
        Self::with_config(serde_json::json!({}))
    }
}

impl Envoy {
    pub fn new() -> Self {
        Self::default()
    }

    /// With `control_plane` fields replaced by `cp`.
    pub fn with_config(cp: serde_json::Value) -> Self {
        let mut control_plane = serde_json::json!({
            "cluster": "keygate_cp", "authority": "keys.internal", "path": "/v1/keys",
            "poll_interval": "1s", "timeout": "2s", "max_staleness": "10s",
            "max_list_bytes": 4096
        });
        if let (Some(o), Some(x)) = (control_plane.as_object_mut(), cp.as_object()) {
            o.extend(x.clone());
        }
        let cfg = serde_json::json!({
            "credential_sources": [{"type": "header", "name": "x-api-key"}],
            "keys": [{"id": "static", "sha256": h("static")}],
            "control_plane": control_plane,
        });
        Envoy {
            store: MemStore::default(),
            now: Cell::new(1_000 * S),
            base: Policy::from_json(cfg.to_string().as_bytes()).unwrap(),
            broken: RefCell::new(None),
        }
    }

    fn check(&self, key: &str) -> Result<(), StoreError> {
        match *self.broken.borrow() {
            Some(suffix) if key.ends_with(suffix) => Err(StoreError),
            _ => Ok(()),
        }
    }

    pub fn cp(&self) -> &ControlPlane {
        self.base.control_plane().unwrap()
    }

    pub fn advance(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }
}

/// What the fake control plane answers to one GET.
pub enum Reply {
    /// The callout is reset: no headers at all.
    Reset,
    /// A response; `announced` is the body size the host reports (larger
    /// than `body` for a body cut short).
    Http {
        status: u16,
        etag: Option<String>,
        body: Vec<u8>,
        announced: usize,
    },
}

impl Reply {
    pub fn status(status: u16, body: &[u8]) -> Reply {
        Reply::Http {
            status,
            etag: None,
            body: body.to_vec(),
            announced: body.len(),
        }
    }

    pub fn ok(etag: &str, body: Vec<u8>) -> Reply {
        Reply::Http {
            status: 200,
            etag: Some(etag.to_string()),
            announced: body.len(),
            body,
        }
    }
}

/// A control plane serving `keys` at `version`, with ETag `"v<version>"`,
/// in pages of `page_size` keys if set (`/v1/keys`, `/v1/keys?page=2`, ...).
pub struct Server {
    pub version: u64,
    pub keys: Vec<String>,
    pub page_size: Option<usize>,
    pub hits: usize,
}

impl Server {
    pub fn new(version: u64, keys: &[&str]) -> Self {
        Server {
            version,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            page_size: None,
            hits: 0,
        }
    }

    /// Serves `keys` as `version` from now on.
    pub fn set(&mut self, version: u64, keys: &[&str]) {
        *self = Server {
            page_size: self.page_size,
            hits: self.hits,
            ..Server::new(version, keys)
        };
    }

    pub fn etag(&self) -> String {
        format!("\"v{}\"", self.version)
    }

    pub fn answer(&mut self, req: &SentGet) -> Reply {
        self.hits += 1;
        let path = req.header(":path").unwrap_or_default();
        let page: usize = path
            .strip_prefix("/v1/keys?page=")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        if page > 1 && req.header("if-match") != Some(self.etag().as_str()) {
            return Reply::status(412, b"");
        }
        if page == 1 && req.header("if-none-match") == Some(self.etag().as_str()) {
            return Reply::Http {
                status: 304,
                etag: Some(self.etag()),
                body: Vec::new(),
                announced: 0,
            };
        }
        let size = self.page_size.unwrap_or(self.keys.len().max(1));
        let chunk: Vec<&str> = self
            .keys
            .chunks(size)
            .nth(page - 1)
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .collect();
        let next = (page * size < self.keys.len()).then(|| format!("/v1/keys?page={}", page + 1));
        Reply::ok(&self.etag(), list(self.version, &chunk, next.as_deref()))
    }
}

/// One worker's VM: its poller, the policy its requests use, and the sum
/// of what its steps reported.
pub struct Vm {
    pub poller: Poller,
    pub in_use: Policy,
    pub net: FakeCallouts,
    /// Callouts answered so far (the rest of `net.sent` is in flight).
    pub answered: usize,
    pub counts: Counts,
    pub switches: usize,
    pub stale: bool,
    pub age_s: Option<u64>,
    pub list_version: Option<u64>,
    pub keys_loaded: Option<u64>,
    pub logs: Vec<(Level, String)>,
}

impl Vm {
    pub fn new(envoy: &Envoy, me: u64) -> Self {
        Vm {
            poller: Poller::new(envoy.cp(), me),
            in_use: envoy.base.clone(),
            net: FakeCallouts::default(),
            answered: 0,
            counts: Counts::default(),
            switches: 0,
            stale: false,
            age_s: None,
            list_version: None,
            keys_loaded: None,
            logs: Vec::new(),
        }
    }

    fn record(&mut self, step: Step, from_tick: bool) {
        if let Some(p) = step.switch {
            self.in_use = *p;
            self.switches += 1;
        }
        if from_tick {
            self.stale = step.stale;
        }
        self.counts.ok += step.counts.ok;
        self.counts.not_modified += step.counts.not_modified;
        self.counts.failed += step.counts.failed;
        self.age_s = step.seconds_since_last_good_fetch.or(self.age_s);
        self.list_version = step.list_version.or(self.list_version);
        self.keys_loaded = step.keys_loaded.or(self.keys_loaded);
        self.logs.extend(step.logs);
    }

    pub fn tick(&mut self, envoy: &Envoy) {
        let clock = || Some(envoy.now.get());
        let mut io = Io {
            store: envoy,
            callout: &mut self.net,
            clock: &clock,
        };
        let step = self.poller.tick(&envoy.base, envoy.cp(), &mut io);
        self.record(step, true);
    }

    /// A configuration reload: a new root keeps the poller and syncs.
    pub fn sync(&mut self, envoy: &Envoy) {
        self.in_use = envoy.base.clone();
        let step = self.poller.sync(&envoy.base, envoy);
        self.record(step, false);
    }

    /// The oldest callout not answered yet.
    pub fn in_flight(&self) -> Option<&SentGet> {
        self.net.sent.get(self.answered)
    }

    /// Answers the oldest callout in flight with `reply`.
    pub fn deliver(&mut self, envoy: &Envoy, reply: Reply) {
        let token = self.in_flight().unwrap().token;
        self.answered += 1;
        self.deliver_token(envoy, token, reply);
    }

    /// Hands the poller `reply` as the response to callout `token`.
    pub fn deliver_token(&mut self, envoy: &Envoy, token: u32, reply: Reply) {
        let (headers, body_size) = match reply {
            Reply::Reset => (None, 0),
            Reply::Http {
                status,
                etag,
                body,
                announced,
            } => {
                self.net.body = body;
                (Some(response_headers(status, etag.as_deref())), announced)
            }
        };
        let response = Response {
            token,
            headers: headers.as_deref(),
            body_size,
        };
        let clock = || Some(envoy.now.get());
        let mut io = Io {
            store: envoy,
            callout: &mut self.net,
            clock: &clock,
        };
        let step = self
            .poller
            .on_response(response, &envoy.base, envoy.cp(), &mut io);
        self.record(step, false);
    }

    /// Answers every callout in flight from `server`, pages included.
    pub fn serve(&mut self, envoy: &Envoy, server: &mut Server) {
        for _ in 0..100 {
            let Some(req) = self.in_flight().cloned() else {
                return;
            };
            let reply = server.answer(&req);
            self.deliver(envoy, reply);
        }
        assert!(
            self.in_flight().is_none(),
            "more than 100 callouts in one poll"
        );
    }

    /// A tick, then every callout it sent answered by `server`.
    pub fn poll(&mut self, envoy: &Envoy, server: &mut Server) {
        self.tick(envoy);
        self.serve(envoy, server);
    }

    /// What a request with key `k` gets: `"allowed"` or the denial code.
    pub fn verdict(&self, k: &str) -> String {
        let secret = format!("secret-{k}");
        let wire = encode(&[
            (b":method", b"GET"),
            (b":path", b"/anything"),
            (b":authority", b"api.example.com"),
            (b"x-api-key", secret.as_bytes()),
        ]);
        let map = keygate_core::headers::HeaderMap::decode(&wire).unwrap();
        match self.in_use.decide(&map, &FakeHost::default()) {
            Decision::Allow(_) => "allowed".into(),
            Decision::Deny(d) => d.denial.code.as_str().into(),
        }
    }

    /// The control-plane list version requests use.
    pub fn version(&self) -> Option<u64> {
        self.in_use.list_version()
    }

    /// How many lines at `level` contain `text`.
    pub fn logged(&self, level: Level, text: &str) -> usize {
        self.logs
            .iter()
            .filter(|(l, m)| *l == level && m.contains(text))
            .count()
    }
}
