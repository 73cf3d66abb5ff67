//! Usage counting, merging and reporting over fake VMs sharing one store.

use std::cell::Cell;

use super::*;
use crate::config::ControlPlaneConfig;
use crate::ratelimit::{StoreError, Versioned};
use crate::testing::MemStore;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

const S: u64 = 1_000_000_000;

/// A control plane with the fields of `extra` added to cluster `cp`,
/// authority `cp.local`, path `/v1/keys`.
fn compile(extra: serde_json::Value) -> (Option<ControlPlane>, Vec<String>) {
    let mut v = serde_json::json!({"cluster": "cp", "authority": "cp.local"});
    if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    let c: ControlPlaneConfig = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
    let mut errors = Vec::new();
    let plane = ControlPlane::compile(&c, &mut errors);
    (plane, errors.iter().map(ToString::to_string).collect())
}

fn plane(batch: usize) -> ControlPlane {
    match compile(serde_json::json!({"usage_report_interval": "5s", "usage_batch_keys": batch})) {
        (Some(p), _) => p,
        (None, e) => panic!("{e:?}"),
    }
}

/// What a fake host did with the POSTs it was asked to send.
#[derive(Default)]
struct FakePoster {
    sent: Vec<(Vec<(String, String)>, UsageReport)>,
    refuse: bool,
    next_token: u32,
}

impl Poster for FakePoster {
    fn dispatch_post(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        assert_eq!((cluster, timeout_ms), ("cp", 2000));
        if self.refuse {
            return Err("BadArgument".into());
        }
        let report = UsageReport::parse(body).unwrap_or_else(|e| panic!("{e}"));
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self.sent.push((headers, report));
        self.next_token += 1;
        Ok(self.next_token)
    }
}

/// One VM: its tally and reporter.
struct Vm {
    tally: UsageTally,
    reporter: Reporter,
}

/// One Envoy: shared data, clocks, a host that sends POSTs, and its VMs.
struct Envoy {
    store: MemStore,
    mono: Cell<u64>,
    unix: Cell<i64>,
    poster: FakePoster,
    cp: ControlPlane,
    vms: Vec<Vm>,
}

impl Envoy {
    fn new(vms: usize, cp: ControlPlane) -> Self {
        Envoy {
            store: MemStore::default(),
            mono: Cell::new(1_000 * S),
            unix: Cell::new(1_800_000_000),
            poster: FakePoster::default(),
            vms: (0..vms)
                .map(|_| Vm {
                    tally: UsageTally::default(),
                    reporter: Reporter::new(&cp),
                })
                .collect(),
            cp,
        }
    }

    fn advance(&self, secs: u64) {
        self.mono.set(self.mono.get() + secs * S);
        self.unix.set(self.unix.get() + secs as i64);
    }

    fn record(&self, vm: usize, id: &str, times: usize) {
        for _ in 0..times {
            self.vms[vm].tally.record(id);
        }
    }

    /// Ticks every VM; VM 0 holds the lease.
    fn tick(&mut self) -> UsageStep {
        let mut all = UsageStep::default();
        let mono = || Some(self.mono.get());
        let unix = || Some(self.unix.get());
        for (i, vm) in self.vms.iter_mut().enumerate() {
            let mut io = UsageIo {
                store: &self.store,
                poster: &mut self.poster,
                monotonic_ns: &mono,
                unix_secs: &unix,
            };
            let step = vm.reporter.tick(&vm.tally, &self.cp, i == 0, &mut io);
            all.reports_ok += step.reports_ok;
            all.reports_failed += step.reports_failed;
            all.logs.extend(step.logs);
        }
        all
    }

    /// The control plane answers the last report with `status`.
    fn answer(&mut self, status: Option<u16>) -> UsageStep {
        let token = self.poster.next_token;
        let mono = || Some(self.mono.get());
        let unix = || Some(self.unix.get());
        let mut io = UsageIo {
            store: &self.store,
            poster: &mut self.poster,
            monotonic_ns: &mono,
            unix_secs: &unix,
        };
        self.vms[0]
            .reporter
            .on_response(token, status, &self.cp, &mut io)
    }

    /// The last report, as `(id, requests, last_used)`.
    fn last_report(&self) -> Vec<(String, u64, i64)> {
        let (_, report) = self
            .poster
            .sent
            .last()
            .unwrap_or_else(|| panic!("nothing sent"));
        report
            .keys
            .iter()
            .map(|k| (k.id.clone(), k.requests, k.last_used))
            .collect()
    }

    /// What waits in shared data.
    fn waiting(&self) -> UsageMap {
        match self.store.get(&Reporter::shared_key(&self.cp)) {
            Ok(Some((bytes, _))) => UsageMap::decode(&bytes).unwrap_or_else(|| panic!("corrupt")),
            _ => UsageMap::default(),
        }
    }
}

fn row(id: &str, requests: u64, last_used: i64) -> (String, u64, i64) {
    (id.to_string(), requests, last_used)
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn tally_counts_per_id_and_forgets_idle_ids() {
    let t = UsageTally::default();
    for id in ["a", "b", "a", "a"] {
        t.record(id);
    }
    let got = t.drain(100);
    assert_eq!(
        got.get("a"),
        Some(&Usage {
            requests: 3,
            last_used: 100
        })
    );
    assert_eq!(
        got.get("b"),
        Some(&Usage {
            requests: 1,
            last_used: 100
        })
    );
    assert_eq!(got.len(), 2);
    assert!(t.drain(101).is_empty(), "a second drain has nothing new");
    t.record("a");
    let got = t.drain(102);
    assert_eq!(got.len(), 1);
    assert_eq!(got.get("a").map(|u| u.requests), Some(1));
    // Counts handed back come out at the next drain, with its time.
    t.restore(&got);
    t.record("c");
    let got = t.drain(103);
    assert_eq!(
        got.get("a"),
        Some(&Usage {
            requests: 1,
            last_used: 103
        })
    );
    assert_eq!(
        got.get("c"),
        Some(&Usage {
            requests: 1,
            last_used: 103
        })
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn shared_form_round_trips_and_refuses_damage() {
    let mut m = UsageMap::default();
    m.add("acme", 5, 1_800_000_000);
    m.add("b", u64::MAX, 7);
    m.add("b", 3, 2);
    assert_eq!(
        m.get("b"),
        Some(&Usage {
            requests: u64::MAX,
            last_used: 7
        }),
        "saturates, keeps the later time"
    );
    let bytes = m.encode();
    assert_eq!(UsageMap::decode(&bytes), Some(m.clone()));
    assert_eq!(UsageMap::decode(&[]), Some(UsageMap::default()));
    // Cut anywhere but between records (after "acme"'s 22 bytes), it is damaged.
    for cut in (1..bytes.len()).filter(|c| *c != 22) {
        assert_eq!(UsageMap::decode(&bytes[..cut]), None, "cut at {cut}");
    }
    assert_eq!(UsageMap::decode(&bytes[..22]).map(|m| m.len()), Some(1));
    // take_first splits by id, leaving the rest.
    let mut all = UsageMap::default();
    for id in ["d", "a", "c", "b"] {
        all.add(id, 1, 0);
    }
    let first = all.take_first(3);
    assert_eq!(
        first.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(all.iter().map(|(id, _)| id).collect::<Vec<_>>(), ["d"]);
    assert_eq!(all.take_first(5).len(), 1);
    assert!(all.is_empty());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_report_is_checked_field_by_field() {
    let ok = br#"{"keys":[{"id":"a","requests":2,"last_used":1800000000}]}"#;
    let report = UsageReport::parse(ok).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.keys[0].requests, 2);
    let err = |body: &str| {
        UsageReport::parse(body.as_bytes())
            .err()
            .unwrap_or_default()
    };
    assert!(err("").contains("EOF"), "{}", err(""));
    assert!(err(r#"{"keys":[{"id":"a","requests":"2","last_used":1}]}"#)
        .starts_with("keys[0].requests: invalid type"));
    assert!(err(r#"{"keys":[],"extra":1}"#).contains("unknown field `extra`"));
    assert_eq!(
        err(r#"{"keys":[{"id":"a","requests":0,"last_used":1}]}"#),
        "keys[0].requests: must be at least 1"
    );
    assert_eq!(
        err(r#"{"keys":[{"id":"a b","requests":1,"last_used":1}]}"#),
        "keys[0].id: must be 1-128 visible ASCII characters"
    );
    assert_eq!(
        err(
            r#"{"keys":[{"id":"a","requests":1,"last_used":1},{"id":"a","requests":1,"last_used":1}]}"#
        ),
        "keys[1].id: \"a\" is given twice"
    );
    assert_eq!(
        err(r#"{"keys":[{"id":"a","requests":1,"last_used":-1}]}"#),
        "keys[0].last_used: must be Unix seconds (0 or more)"
    );
    assert!(err(r#"{"keys":[]} {}"#).starts_with("report: trailing characters"));
    assert!(err(r#"{"keys":[{"id":"a","requests":"1","last_used":1}]}"#)
        .starts_with("keys[0].requests: "));
    assert!(err(r#"{"keys":[{"id":"a","requests":1}]}"#).contains("missing field `last_used`"));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn configuration_is_off_by_default_and_errors_name_the_field() {
    let (cp, e) = compile(serde_json::json!({}));
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(
        cp.and_then(|c| c.usage),
        None,
        "no reports unless asked for"
    );
    let (cp, _) = compile(serde_json::json!({"usage_report_interval": "10s"}));
    assert_eq!(
        cp.and_then(|c| c.usage),
        Some(UsageReporting {
            interval_ms: 10_000,
            path: "/v1/usage".into(),
            batch_keys: 1000
        })
    );
    let e = |extra| compile(extra).1;
    assert_eq!(
        e(serde_json::json!({"usage_report_interval": "100ms"})),
        ["control_plane.usage_report_interval: \"100ms\" is not a duration from 1s to 1h (e.g. \"10s\")"]
    );
    assert_eq!(
        e(serde_json::json!({"usage_report_interval": "often"})).len(),
        1
    );
    assert_eq!(
        e(serde_json::json!({"usage_report_interval": "5s", "usage_path": "v1/usage"})),
        ["control_plane.usage_path: must start with '/'"]
    );
    assert_eq!(
        e(serde_json::json!({"usage_batch_keys": 0})),
        ["control_plane.usage_batch_keys: 0 is not from 1 to 100000"]
    );
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn the_lease_holder_reports_what_every_vm_counted() {
    let mut envoy = Envoy::new(3, plane(1000));
    envoy.record(0, "a", 2);
    envoy.record(1, "a", 3);
    envoy.record(2, "b", 1);
    let step = envoy.tick();
    assert!(step.logs.is_empty(), "{:?}", step.logs);
    // VM 0 ticked first and reported its own counts; the others merged after.
    assert_eq!(envoy.poster.sent.len(), 1);
    assert_eq!(envoy.last_report(), [row("a", 2, 1_800_000_000)]);
    let (headers, _) = &envoy.poster.sent[0];
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(h(":method"), Some("POST"));
    assert_eq!(h(":path"), Some("/v1/usage"));
    assert_eq!(h(":authority"), Some("cp.local"));
    assert_eq!(h("content-type"), Some("application/json"));
    assert_eq!(envoy.answer(Some(200)).reports_ok, 1);
    // Not before the interval.
    envoy.advance(4);
    envoy.tick();
    assert_eq!(envoy.poster.sent.len(), 1);
    envoy.advance(1);
    envoy.tick();
    assert_eq!(envoy.poster.sent.len(), 2);
    assert_eq!(
        envoy.last_report(),
        [row("a", 3, 1_800_000_000), row("b", 1, 1_800_000_000)]
    );
    envoy.answer(Some(204));
    assert!(
        envoy.waiting().is_empty(),
        "delivered counts leave shared data"
    );
    // Nothing counted, nothing sent.
    envoy.advance(5);
    envoy.tick();
    assert_eq!(envoy.poster.sent.len(), 2);
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_failed_report_keeps_its_counts_for_the_next_one() {
    let mut envoy = Envoy::new(2, plane(1000));
    envoy.tick(); // the first report is due at once: nothing yet
    envoy.record(1, "a", 4);
    envoy.tick();
    envoy.advance(5);
    envoy.tick();
    assert_eq!(envoy.last_report(), [row("a", 4, 1_800_000_000)]);
    let step = envoy.answer(Some(503));
    assert_eq!((step.reports_ok, step.reports_failed), (0, 1));
    assert!(
        step.logs[0].1.contains("control plane answered HTTP 503"),
        "{:?}",
        step.logs
    );
    assert_eq!(envoy.waiting().get("a").map(|u| u.requests), Some(4));
    // More traffic meanwhile; a reset callout fails too.
    envoy.advance(5);
    envoy.record(0, "a", 1);
    envoy.tick();
    assert_eq!(envoy.last_report(), [row("a", 5, 1_800_000_010)]);
    assert_eq!(envoy.answer(None).reports_failed, 1);
    // A host that will not send: counted as failed, counts kept.
    envoy.poster.refuse = true;
    envoy.advance(5);
    let step = envoy.tick();
    assert_eq!(step.reports_failed, 1);
    assert!(
        step.logs[0].1.starts_with("usage report not sent"),
        "{:?}",
        step.logs
    );
    envoy.poster.refuse = false;
    envoy.advance(5);
    envoy.tick();
    assert_eq!(envoy.last_report(), [row("a", 5, 1_800_000_010)]);
    envoy.answer(Some(200));
    assert!(envoy.waiting().is_empty());
    // An answer to another callout changes nothing.
    envoy.record(0, "b", 1);
    envoy.advance(5);
    envoy.tick();
    let token = envoy.poster.next_token;
    let mono = || Some(0);
    let unix = || Some(0);
    let mut io = UsageIo {
        store: &envoy.store,
        poster: &mut envoy.poster,
        monotonic_ns: &mono,
        unix_secs: &unix,
    };
    let step = envoy.vms[0]
        .reporter
        .on_response(token + 7, Some(500), &envoy.cp, &mut io);
    assert_eq!(step, UsageStep::default());
    assert!(envoy.vms[0].reporter.in_flight());
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn only_the_lease_holder_reports_and_batches_are_bounded() {
    let mut envoy = Envoy::new(2, plane(2));
    envoy.tick();
    for id in ["k1", "k2", "k3", "k4", "k5"] {
        envoy.record(1, id, 1);
    }
    // VM 1 merges but never sends.
    let mono = || Some(envoy.mono.get());
    let unix = || Some(envoy.unix.get());
    let mut io = UsageIo {
        store: &envoy.store,
        poster: &mut envoy.poster,
        monotonic_ns: &mono,
        unix_secs: &unix,
    };
    let vm = &mut envoy.vms[1];
    vm.reporter.tick(&vm.tally, &envoy.cp, false, &mut io);
    assert!(envoy.poster.sent.is_empty());
    assert_eq!(envoy.waiting().len(), 5);
    envoy.advance(5);
    envoy.tick();
    assert_eq!(envoy.last_report().len(), 2);
    envoy.answer(Some(200));
    // A full batch: the rest goes at the next tick, not an interval later.
    envoy.tick();
    assert_eq!(envoy.last_report().len(), 2);
    envoy.answer(Some(200));
    envoy.tick();
    assert_eq!(envoy.last_report(), [row("k5", 1, 1_800_000_000)]);
    envoy.answer(Some(200));
    let sent: usize = envoy.poster.sent.iter().map(|(_, r)| r.keys.len()).sum();
    assert_eq!(sent, 5);
    assert!(envoy.waiting().is_empty());
}

/// A store whose writes of one entry always lose the race.
struct Contended<'a>(&'a MemStore);

impl CounterStore for Contended<'_> {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.0.get(key)
    }
    fn set(&self, _key: &str, _value: &[u8], _cas: Option<u32>) -> Result<bool, StoreError> {
        Ok(false)
    }
    fn create(&self, _key: &str, _value: &[u8]) -> Result<bool, StoreError> {
        Ok(false)
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn contention_or_damage_in_shared_data_loses_no_count() {
    let envoy = Envoy::new(1, plane(1000));
    let tally = UsageTally::default();
    tally.record("a");
    let reporter = Reporter::new(&envoy.cp);
    let mut poster = FakePoster::default();
    let mono = || Some(0);
    let unix = || Some(5);
    let contended = Contended(&envoy.store);
    let io = UsageIo {
        store: &contended,
        poster: &mut poster,
        monotonic_ns: &mono,
        unix_secs: &unix,
    };
    let mut step = UsageStep::default();
    reporter.flush(&tally, &io, &mut step);
    assert!(envoy.waiting().is_empty());
    // The count went back to the tally, and the next flush delivers it.
    tally.record("a");
    let io = UsageIo {
        store: &envoy.store,
        poster: &mut poster,
        monotonic_ns: &mono,
        unix_secs: &unix,
    };
    reporter.flush(&tally, &io, &mut step);
    assert_eq!(envoy.waiting().get("a").map(|u| u.requests), Some(2));
    // A damaged entry is started over, and says so.
    let key = Reporter::shared_key(&envoy.cp);
    assert!(matches!(
        envoy.store.set(&key, b"\x05\x00ab", None),
        Ok(true)
    ));
    tally.record("b");
    reporter.flush(&tally, &io, &mut step);
    assert_eq!(envoy.waiting().get("b").map(|u| u.requests), Some(1));
    assert!(step
        .logs
        .iter()
        .any(|(l, m)| *l == Level::Error && m.contains("corrupt")));
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn a_report_never_answered_does_not_stop_reporting() {
    let mut envoy = Envoy::new(1, plane(1000));
    envoy.record(0, "a", 2);
    envoy.tick();
    assert_eq!(envoy.last_report(), [row("a", 2, 1_800_000_000)]);
    // No answer (its context went away). Until the timeout has passed, wait.
    envoy.record(0, "b", 1);
    envoy.advance(2);
    let step = envoy.tick();
    assert!(step.logs.is_empty(), "{:?}", step.logs);
    assert_eq!(envoy.poster.sent.len(), 1);
    // Past timeout (2 s) + 1 s: given up, with a warning, and the next report goes.
    envoy.advance(3);
    let step = envoy.tick();
    assert!(
        step.logs[0]
            .1
            .contains("usage report of 1 keys never answered"),
        "{:?}",
        step.logs
    );
    assert_eq!(envoy.poster.sent.len(), 2);
    assert_eq!(envoy.last_report(), [row("b", 1, 1_800_000_002)]);
    assert!(envoy.vms[0].reporter.in_flight());
}
