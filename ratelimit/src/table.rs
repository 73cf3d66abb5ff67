//! keygate's limits mapped onto limitador's, indexed by identity at load time.
//!
//! A keygate limit is a token bucket (GCRA): `burst` requests at once, then
//! one every `interval`. limitador counts fixed windows: at most `max`
//! requests in a window of `seconds` that starts with the window's first
//! request. A limit becomes the window that refills its bucket, rounded up
//! to whole seconds, with the requests its rate allows in that time:
//!
//! - `seconds = max(1, ceil(burst × interval))`
//! - `max = max(1, floor(seconds / interval))`
//!
//! `requests` per `per` with the default burst (`requests`) maps exactly:
//! 10,000 per `1d` is 10,000 per 86,400 s window. A burst smaller than one
//! second's worth of requests widens to a second (100/s with burst 10 admits
//! 100 at once), and a burst that is not a whole number of seconds rounds its
//! window up (100/s with burst 1,010: 1,100 per 11 s).
//!
//! Limits are grouped by *limit set*: the list of limits a key has (its own,
//! else the top-level default). Each distinct set is one limitador
//! namespace, named after its content (so every replica of this service, and
//! a reload with the same limits, count under the same Redis keys); its
//! limits count per *subject*, a limitador variable: `k:<key id>`, or
//! `c:<consumer>` for a key with a consumer (whose keys then share their
//! counters, as they share keygate's local buckets). A request looks up its
//! identity in a hash map and checks only its own set's limits (at most 8).

use std::collections::HashMap;

use keygate_core::denial::{Denial, DenyCode, LimitName, RateInfo};
use keygate_core::ratelimit::NamedLimit;
use keygate_core::reply::{render, Reply};
use keygate_core::Policy;

const NANOS: u128 = 1_000_000_000;

/// One limit as limitador counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetLimit {
    /// The limit's name (`default` for a lone `rate_limit`), shown in a 429.
    pub name: LimitName,
    /// Requests admitted per window.
    pub max: u64,
    /// Window length in seconds.
    pub seconds: u64,
}

impl FleetLimit {
    /// The fixed window for a keygate limit (see the module documentation).
    pub fn of(l: &NamedLimit) -> FleetLimit {
        let interval = u128::from(l.limit.interval_ns.max(1));
        let refill_ns = interval.saturating_mul(u128::from(l.limit.burst.max(1)));
        let seconds = refill_ns.div_ceil(NANOS).max(1);
        let max = (seconds * NANOS / interval).max(1);
        FleetLimit {
            name: l.name,
            max: u64::try_from(max).unwrap_or(u64::MAX),
            seconds: u64::try_from(seconds).unwrap_or(u64::MAX),
        }
    }
}

/// The limits of one limit set, in the order the configuration gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSet {
    /// The limitador namespace: `keygate:` and the limits, e.g.
    /// `keygate:sustained=1100/11s,peak=200/1s`.
    pub namespace: String,
    /// Its limits.
    pub limits: Vec<FleetLimit>,
}

impl LimitSet {
    fn of(limits: &[NamedLimit]) -> LimitSet {
        let limits: Vec<FleetLimit> = limits.iter().map(FleetLimit::of).collect();
        let spec: Vec<String> = limits
            .iter()
            .map(|l| format!("{}={}/{}s", l.name.as_str(), l.max, l.seconds))
            .collect();
        LimitSet {
            namespace: format!("keygate:{}", spec.join(",")),
            limits,
        }
    }

    /// The limit named `name`.
    pub fn limit(&self, name: &str) -> Option<&FleetLimit> {
        self.limits.iter().find(|l| l.name.as_str() == name)
    }
}

/// What one request is counted against: a limit set and the subject whose
/// counters it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted<'t> {
    /// The limits.
    pub set: &'t LimitSet,
    /// `k:<key id>` or `c:<consumer>`.
    pub subject: String,
}

/// Every identity's limit set, built once per configuration or key list.
#[derive(Debug, Clone, Default)]
pub struct FleetTable {
    sets: Vec<LimitSet>,
    /// Key id → index of its set (`None`: the key has no limit at all).
    by_key: HashMap<Box<str>, Option<u32>>,
    /// The set of keys without limits of their own, and of ids not in the list.
    default: Option<u32>,
}

impl FleetTable {
    /// Indexes every key of `policy` (static keys and a control-plane list
    /// merged into it) with its effective limits.
    pub fn from_policy(policy: &Policy) -> FleetTable {
        let mut table = FleetTable::default();
        let mut index: HashMap<Vec<NamedLimit>, u32> = HashMap::new();
        let mut intern = |limits: &[NamedLimit], sets: &mut Vec<LimitSet>| -> Option<u32> {
            if limits.is_empty() {
                return None;
            }
            if let Some(i) = index.get(limits) {
                return Some(*i);
            }
            let i = u32::try_from(sets.len()).ok()?;
            sets.push(LimitSet::of(limits));
            index.insert(limits.to_vec(), i);
            Some(i)
        };
        table.default = intern(policy.default_limits(), &mut table.sets);
        table.by_key.reserve(policy.keys().len());
        for key in policy.keys().iter() {
            let set = intern(policy.limit_of(&key), &mut table.sets);
            table.by_key.insert(key.id().into(), set);
        }
        table
    }

    /// What a request with this identity (the identity header's value) and,
    /// for a key with a consumer, this key id (the key id header's value) is
    /// counted against; `None` when it has no limit. An id not in the list
    /// (a key this service has not loaded yet) gets the default limits.
    pub fn lookup(&self, identity: &str, key_id: Option<&str>) -> Option<Counted<'_>> {
        let (key, subject) = match key_id {
            Some(id) => (id, format!("c:{identity}")),
            None => (identity, format!("k:{identity}")),
        };
        let set = match self.by_key.get(key) {
            Some(set) => *set,
            None => self.default,
        }?;
        let set = self.sets.get(usize::try_from(set).ok()?)?;
        Some(Counted { set, subject })
    }

    /// Every limit set.
    pub fn sets(&self) -> &[LimitSet] {
        &self.sets
    }

    /// Number of keys indexed.
    pub fn keys(&self) -> usize {
        self.by_key.len()
    }
}

/// keygate's 429 for a fleet limit: the same body and headers as a local
/// refusal (`keygate_core::reply`), with the window's figures: `q` the
/// requests per window, `w` its length, `t` and `Retry-After` the seconds
/// until the refusing window ends.
pub fn refusal(limit: &FleetLimit, retry_after_secs: u64) -> Reply {
    let denial = Denial {
        rate: Some(RateInfo {
            policy: limit.name,
            burst: limit.max,
            window_secs: limit.seconds,
            remaining: 0,
            retry_after_secs: retry_after_secs.max(1),
        }),
        ..Denial::new(DenyCode::RateLimited, "fleet limit")
    };
    render(&denial, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Policy {
        match Policy::from_json(json.as_bytes()) {
            Ok(p) => p,
            Err(e) => unreachable!("bad test configuration: {e:?}"),
        }
    }

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const SHA_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    const SHA_D: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

    fn windows(t: &FleetTable, identity: &str, key_id: Option<&str>) -> Vec<(String, u64, u64)> {
        t.lookup(identity, key_id)
            .map(|c| {
                c.set
                    .limits
                    .iter()
                    .map(|l| (l.name.as_str().to_string(), l.max, l.seconds))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn quotas_map_exactly_and_rates_round_their_window_up_to_whole_seconds() {
        let p = policy(&format!(
            r#"{{"rate_limit": {{"requests_per_second": 100, "burst": 100}},
                "keys": [
                  {{"id": "day", "sha256": "{SHA_A}", "rate_limit": {{"requests": 10000, "per": "1d"}}}},
                  {{"id": "two", "sha256": "{SHA_B}", "rate_limits": [
                    {{"name": "sustained", "requests_per_second": 100, "burst": 1010}},
                    {{"name": "peak", "requests_per_second": 200, "burst": 60}}]}},
                  {{"id": "slow", "sha256": "{SHA_C}", "rate_limit": {{"requests_per_second": 0.5, "burst": 1}}}},
                  {{"id": "plain", "sha256": "{SHA_D}"}}]}}"#
        ));
        let t = FleetTable::from_policy(&p);
        assert_eq!(t.keys(), 4);
        assert_eq!(
            windows(&t, "day", None),
            [("default".into(), 10_000, 86_400)]
        );
        assert_eq!(
            windows(&t, "two", None),
            [("sustained".into(), 1_100, 11), ("peak".into(), 200, 1)]
        );
        assert_eq!(windows(&t, "slow", None), [("default".into(), 1, 2)]);
        // No limit of its own: the default, 100 per 1 s window.
        assert_eq!(windows(&t, "plain", None), [("default".into(), 100, 1)]);
        // Not in the list (yet): the default too.
        assert_eq!(windows(&t, "newer", None), [("default".into(), 100, 1)]);
    }

    #[test]
    fn keys_with_the_same_limits_share_one_namespace_and_count_apart() {
        let p = policy(&format!(
            r#"{{"keys": [
                  {{"id": "a", "sha256": "{SHA_A}", "rate_limit": {{"requests": 5, "per": "1m"}}}},
                  {{"id": "b", "sha256": "{SHA_B}", "rate_limit": {{"requests": 5, "per": "1m"}}}},
                  {{"id": "c", "sha256": "{SHA_C}", "rate_limit": {{"requests": 6, "per": "1m"}}}}]}}"#
        ));
        let t = FleetTable::from_policy(&p);
        assert_eq!(t.sets().len(), 2);
        let (a, b, c) = match (
            t.lookup("a", None),
            t.lookup("b", None),
            t.lookup("c", None),
        ) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            other => unreachable!("every key has a limit: {other:?}"),
        };
        assert_eq!(a.set.namespace, "keygate:default=5/60s");
        assert_eq!(a.set, b.set);
        assert_ne!(a.subject, b.subject);
        assert_eq!(c.set.namespace, "keygate:default=6/60s");
    }

    #[test]
    fn a_consumer_is_counted_as_one_subject_with_the_limits_of_the_key_used() {
        let p = policy(&format!(
            r#"{{"keys": [
                  {{"id": "k1", "sha256": "{SHA_A}", "consumer": "acme", "rate_limit": {{"requests": 5, "per": "1s"}}}},
                  {{"id": "k2", "sha256": "{SHA_B}", "consumer": "acme", "rate_limit": {{"requests": 5, "per": "1s"}}}},
                  {{"id": "acme", "sha256": "{SHA_C}", "rate_limit": {{"requests": 9, "per": "1s"}}}}]}}"#
        ));
        let t = FleetTable::from_policy(&p);
        let via = |id| t.lookup("acme", Some(id));
        let (k1, k2) = match (via("k1"), via("k2")) {
            (Some(k1), Some(k2)) => (k1, k2),
            other => unreachable!("both keys are limited: {other:?}"),
        };
        assert_eq!(k1, k2);
        assert_eq!(k1.subject, "c:acme");
        // A key whose id equals the consumer's name counts apart from it.
        let own = t
            .lookup("acme", None)
            .map(|c| (c.subject, c.set.limits[0].max));
        assert_eq!(own, Some(("k:acme".to_string(), 9)));
    }

    #[test]
    fn no_limit_anywhere_means_no_check() {
        let p = policy(&format!(
            r#"{{"keys": [{{"id": "a", "sha256": "{SHA_A}"}}]}}"#
        ));
        let t = FleetTable::from_policy(&p);
        assert_eq!(t.lookup("a", None), None);
        assert_eq!(t.lookup("unknown", None), None);
        assert!(t.sets().is_empty());
    }

    #[test]
    fn the_refusal_is_keygates_local_429_with_the_window_figures() {
        let limit = FleetLimit {
            name: LimitName::DEFAULT,
            max: 100,
            seconds: 1,
        };
        let r = refusal(&limit, 0);
        assert_eq!(r.status, 429);
        assert_eq!(
            r.body,
            keygate_core::reply::body(DenyCode::RateLimited),
            "same body as the local 429"
        );
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("cache-control"), Some("no-store"));
        assert_eq!(header("retry-after"), Some("1"));
        assert_eq!(header("ratelimit-policy"), Some("\"default\";q=100;w=1"));
        assert_eq!(header("ratelimit"), Some("\"default\";r=0;t=1"));
    }
}
