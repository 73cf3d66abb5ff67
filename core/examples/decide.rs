//! keygate's own computation per request, without Envoy: decoding the header
//! map, the decision (SHA-256 of the key, lookup, GCRA against an in-memory
//! bucket) and the forwarding edits, timed natively.
//!
//! ```text
//! cargo run --release -p keygate-core --example decide
//! ```
//!
//! Prints nanoseconds per request for the allowed path (a key without and
//! with a rate limit, and with its use counted for usage reports) and the
//! 401 path. In Envoy the same work runs as wasm
//! in V8, and each host call keygate makes costs more than all of it; the
//! figures say how much of keygate's cost per request is its own code.

use std::hint::black_box;
use std::time::Instant;

use keygate_core::headers::HeaderMap;
use keygate_core::keys::digest;
use keygate_core::policy::Decision;
use keygate_core::testing::{get_request_wire, FakeHost};
use keygate_core::usage::UsageTally;
use keygate_core::Policy;

const ROUNDS: u32 = 1_000_000;
const UNLIMITED: &str = "kg_unlimited_0123456789abcdefghij";
const LIMITED: &str = "kg_limited_0123456789abcdefghijkl";

fn main() -> Result<(), String> {
    let mut keys = vec![
        format!(r#"{{"id":"unlimited","sha256":"{}"}}"#, sha(UNLIMITED)),
        format!(
            r#"{{"id":"limited","sha256":"{}","rate_limit":{{"requests_per_second":1000000,"burst":1000000}}}}"#,
            sha(LIMITED)
        ),
    ];
    keys.extend(
        (0..8).map(|i| format!(r#"{{"id":"other-{i}","sha256":"{}"}}"#, sha(&i.to_string()))),
    );
    let config = format!(r#"{{"keys":[{}]}}"#, keys.join(","));
    let policy = Policy::from_json(config.as_bytes()).map_err(|e| format!("{e:?}"))?;
    let host = FakeHost::default();
    let tally = UsageTally::default();
    println!("keygate decision per request, native, {ROUNDS} requests each (10 keys, a request as wrk sends it through Envoy):");
    for (name, key, usage) in [
        ("allowed, no limit", Some(UNLIMITED), None),
        ("allowed, limited", Some(LIMITED), None),
        ("allowed, usage on", Some(UNLIMITED), Some(&tally)),
        ("401, no key", None, None),
    ] {
        let wire = get_request_wire(key.map(str::as_bytes));
        let started = Instant::now();
        let mut allowed = 0u32;
        for _ in 0..ROUNDS {
            allowed += u32::from(decide(&policy, black_box(&wire), &host, usage)?);
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
        println!("  {name:18} {ns:7.0} ns   ({allowed} allowed)");
    }
    let counted: u64 = tally.drain(0).iter().map(|(_, u)| u.requests).sum();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        tally.record(black_box("unlimited"));
    }
    let ns = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    println!("  usage count alone  {ns:7.1} ns   ({counted} counted above)");
    Ok(())
}

fn sha(key: &str) -> String {
    hex::encode(digest(key.as_bytes()))
}

/// Decodes, decides and walks the edits as the filter does, counting the
/// key's use in `usage` if given; true if allowed.
fn decide(
    policy: &Policy,
    wire: &[u8],
    host: &FakeHost,
    usage: Option<&UsageTally>,
) -> Result<bool, String> {
    let map = HeaderMap::decode(wire).ok_or("undecodable header map")?;
    match policy.decide(&map, host) {
        Decision::Allow(allowed) => {
            if let (Some(usage), Some(key)) = (usage, allowed.key) {
                usage.record(key.id());
            }
            let edits = &allowed.edits;
            black_box(edits.remove.iter().copied().chain(edits.strip()).count());
            black_box(edits.identity);
            Ok(true)
        }
        Decision::Deny(denial) => {
            black_box(denial);
            Ok(false)
        }
    }
}
