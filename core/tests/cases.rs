//! Replays every case file in `tests/cases/` (one plugin configuration each;
//! the format is in `tests/cases/README.md`) against the core, with the fake
//! host of `keygate_core::testing`. The e2e suite replays the same files in
//! Envoy (`tests/e2e/test_cases.py`).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;

use keygate_core::headers::HeaderMap;
use keygate_core::policy::Decision;
use keygate_core::testing::FakeHost;
use keygate_core::{reply, Policy};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod embedded;
use embedded::CASE_FILES;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test;

/// One request as the filter would see it.
struct Request {
    /// Pseudo-headers first, then the case's headers, names as written.
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    /// Envoy's client address.
    source: String,
    /// Wall clock, Unix seconds (the fake host's default when `None`).
    now: Option<i64>,
}

/// What came of it: the reply for a denial, what the backend gets otherwise.
#[derive(Default)]
struct Outcome {
    status: u16,
    code: Option<String>,
    /// `code (reason)`, as the access log shows it.
    log: Option<String>,
    reply_headers: Vec<(String, String)>,
    reply_body: String,
    /// Headers the backend receives (allowed requests), after the edits.
    forwarded: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The one place this runner calls into keygate-core: compiles `config`,
/// decides `req` as the filter does (headers, then the held body, then the
/// header edits or the local reply).
fn run(config: &[u8], req: &Request) -> Result<Outcome, String> {
    let policy = Policy::from_json(config).map_err(|e| format!("configuration: {e:?}"))?;
    let mut host = FakeHost::default().with_ip(&req.source);
    if let Some(now) = req.now {
        host = host.with_unix(now);
    }
    let pairs = req.headers.iter();
    let map = HeaderMap::from_pairs(pairs.map(|(n, v)| (&n[..], &v[..])).collect());
    let denial = match policy.decide(&map, &host) {
        Decision::Allow(allowed) => match allowed
            .body_check
            .map(|hold| policy.decide_body(hold, &req.body, false))
        {
            Some(Err(denied)) => denied.denial,
            _ => {
                let edits = &allowed.edits;
                let gone: Vec<&[u8]> = edits.remove.iter().copied().chain(edits.strip()).collect();
                let mut forwarded: Vec<(Vec<u8>, Vec<u8>)> = map
                    .iter()
                    .filter(|(n, _)| !n.starts_with(b":"))
                    .filter(|(n, _)| !gone.iter().any(|g| g.eq_ignore_ascii_case(n)))
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect();
                // Set as the filter does: replacing any copy of the same name.
                let identity = edits.identity.map(|(n, v)| (n, std::borrow::Cow::from(v)));
                for (name, value) in identity.into_iter().chain(edits.metadata()) {
                    forwarded.retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_bytes()));
                    forwarded.push((name.into(), value.as_bytes().to_vec()));
                }
                return Ok(Outcome {
                    status: 200,
                    forwarded,
                    ..Outcome::default()
                });
            }
        },
        Decision::Deny(denied) => denied.denial,
    };
    let r = reply::render(&denial, &policy.challenge(&denial));
    Ok(Outcome {
        status: r.status,
        code: Some(denial.code.as_str().to_string()),
        log: Some(format!("{} ({})", denial.code.as_str(), denial.reason)),
        reply_headers: r.headers.into_iter().map(|(n, v)| (n.into(), v)).collect(),
        reply_body: r.body,
        forwarded: Vec::new(),
    })
}

/// `{key:NAME}` replaced by that test key, then `\xNN` by the raw byte.
fn expand(s: &str, keys: &HashMap<String, String>) -> Vec<u8> {
    let mut text = s.to_string();
    for (name, key) in keys {
        text = text.replace(&format!("{{key:{name}}}"), key);
    }
    assert!(!text.contains("{key:"), "unknown key in {s:?}");
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = text
            .get(i + 2..i + 4)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) if b[i] == b'\\' && b[i + 1] == b'x' => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// One file of `tests/cases/`.
struct CaseFile {
    name: String,
    doc: Value,
    keys: HashMap<String, String>,
    config: Vec<u8>,
    identity_header: String,
}

impl CaseFile {
    fn load(name: &str, text: &[u8]) -> CaseFile {
        let name = name.to_string();
        let doc: Value = serde_json::from_slice(text).unwrap();
        let keys: HashMap<String, String> =
            serde_json::from_value(doc.get("keys").cloned().unwrap_or(Value::Null))
                .unwrap_or_default();
        let config = match (doc["profile"].as_str(), doc.get("config")) {
            // The profile's bytes, unchanged.
            (Some(p), None) => embedded::profile(p)
                .unwrap_or_else(|| panic!("{name}: profile {p:?} not in core/tests/embedded"))
                .to_vec(),
            (None, Some(cfg)) => {
                let mut text = cfg.to_string();
                for (n, k) in &keys {
                    let digest = hex::encode(Sha256::digest(k.as_bytes()));
                    text = text.replace(&format!("{{sha256:{n}}}"), &digest);
                }
                assert!(!text.contains("{sha256:"), "{name}: unknown key");
                text.into_bytes()
            }
            _ => panic!("{name}: one of profile or config"),
        };
        let parsed: Value = serde_json::from_slice(&config).unwrap();
        let identity_header = parsed["identity_header"]
            .as_str()
            .unwrap_or("x-api-key-id")
            .to_string();
        CaseFile {
            name,
            doc,
            keys,
            config,
            identity_header,
        }
    }

    /// The case's request, with the file's `defaults` and the runner's.
    fn request(&self, case: &Value) -> Request {
        let mut spec = serde_json::json!({"method": "GET", "path": "/", "host": "localhost", "source": "127.0.0.1"});
        for layer in [&self.doc["defaults"], &case["request"]] {
            for (k, v) in layer.as_object().into_iter().flatten() {
                spec[k] = v.clone();
            }
        }
        let s = |k: &str| spec[k].as_str().unwrap().to_string();
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = [
            (":method", s("method")),
            (":path", s("path")),
            (":authority", s("host")),
            (":scheme", "http".into()),
        ]
        .into_iter()
        .map(|(n, v)| (n.into(), v.into_bytes()))
        .collect();
        for pair in spec["headers"].as_array().into_iter().flatten() {
            let (n, v) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            headers.push((n.into(), self.expand(v)));
        }
        Request {
            headers,
            body: self.body(&spec),
            source: s("source"),
            now: spec["now"].as_i64(),
        }
    }

    /// `json` is written compactly; `body` is a string or a list of pieces,
    /// each a string or `[string, count]`.
    fn body(&self, spec: &Value) -> Vec<u8> {
        if let Some(json) = spec.get("json") {
            return self.expand(&json.to_string());
        }
        match &spec["body"] {
            Value::Null => Vec::new(),
            Value::String(s) => self.expand(s),
            Value::Array(pieces) => pieces
                .iter()
                .flat_map(|p| match p {
                    Value::String(s) => self.expand(s),
                    _ => self
                        .expand(p[0].as_str().unwrap())
                        .repeat(p[1].as_u64().unwrap() as usize),
                })
                .collect(),
            other => panic!("{}: body {other}", self.name),
        }
    }

    fn expand(&self, s: &str) -> Vec<u8> {
        expand(s, &self.keys)
    }

    /// Every way `outcome` differs from what `case` expects.
    fn check(&self, case: &Value, req: &Request, out: &Outcome) -> Vec<String> {
        let exp = &case["expect"];
        let mut bad = Vec::new();
        if exp["status"].as_u64() != Some(u64::from(out.status)) {
            bad.push(format!("status {}, expected {}", out.status, exp["status"]));
        }
        if exp["code"].as_str() != out.code.as_deref() {
            bad.push(format!("code {:?}, expected {}", out.code, exp["code"]));
        }
        if let Some(log) = exp["log"].as_str() {
            if out.log.as_deref() != Some(log) {
                bad.push(format!("log {:?}, expected {log:?}", out.log));
            }
        }
        match &out.code {
            Some(code) => self.check_reply(exp, code, out, &mut bad),
            None => self.check_forwarded(exp, req, out, &mut bad),
        }
        bad
    }

    /// A denial: its body names `code`, the reply headers asked for, no key in it.
    fn check_reply(&self, exp: &Value, code: &str, out: &Outcome, bad: &mut Vec<String>) {
        let body: Value = serde_json::from_str(&out.reply_body).unwrap();
        if body["error"] != code {
            bad.push(format!("reply body {body}"));
        }
        if let Some(part) = exp["message_contains"].as_str() {
            if !body["message"].as_str().unwrap_or("").contains(part) {
                bad.push(format!(
                    "message {}, expected {part:?} in it",
                    body["message"]
                ));
            }
        }
        for (name, want) in exp["headers"].as_object().into_iter().flatten() {
            let got: Vec<&str> = out
                .reply_headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            let want: Vec<&str> = want.as_str().into_iter().collect();
            if got != want {
                bad.push(format!("reply header {name}: {got:?}, expected {want:?}"));
            }
        }
        let reply = format!("{:?}{}", out.reply_headers, out.reply_body);
        if self.keys.values().any(|k| reply.contains(k.as_str())) {
            bad.push("a key in the reply".into());
        }
    }

    /// What the backend gets. That the body reaches it unchanged
    /// (`backend.body`) needs no check here: the filter never edits a body.
    fn check_forwarded(&self, exp: &Value, req: &Request, out: &Outcome, bad: &mut Vec<String>) {
        let values = |name: &str| -> Vec<&[u8]> {
            let forwarded = out.forwarded.iter();
            forwarded
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| &v[..])
                .collect()
        };
        let ident = self.identity_header.as_str();
        let variant = |n: &[u8]| {
            let n = String::from_utf8_lossy(n)
                .to_ascii_lowercase()
                .replace('_', "-");
            n == ident
        };
        if out
            .forwarded
            .iter()
            .any(|(n, _)| variant(n) && n != ident.as_bytes())
        {
            bad.push("a client copy of the identity header is forwarded".into());
        }
        if let Some(want) = exp.get("identity") {
            let want: Vec<&[u8]> = want.as_str().map(str::as_bytes).into_iter().collect();
            if values(ident) != want {
                bad.push(format!("identity {:?}, expected {want:?}", values(ident)));
            }
        }
        for name in exp["stripped"].as_array().into_iter().flatten() {
            if !values(name.as_str().unwrap()).is_empty() {
                bad.push(format!("{name} not stripped"));
            }
        }
        for (name, want) in exp["backend"]["headers"].as_object().into_iter().flatten() {
            let want: Vec<Vec<u8>> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| self.expand(v.as_str().unwrap()))
                .collect();
            if values(name) != want {
                bad.push(format!("backend header {name}: {:?}", values(name)));
            }
        }
        // The filter never rewrites the request line: the backend gets the request's.
        for (i, field) in [(0, "method"), (1, "path")] {
            if let Some(want) = exp["backend"][field].as_str() {
                if req.headers[i].1 != want.as_bytes() {
                    bad.push(format!(
                        "backend {field} {want}, but the request's is another"
                    ));
                }
            }
        }
        if exp["identity"].is_string()
            && out.forwarded.iter().any(|(_, v)| {
                self.keys
                    .values()
                    .any(|k| v.windows(k.len()).any(|w| w == k.as_bytes()))
            })
        {
            bad.push("a key reaches the backend".into());
        }
    }
}

#[cfg_attr(not(all(target_arch = "wasm32", target_os = "unknown")), test)]
#[cfg_attr(all(target_arch = "wasm32", target_os = "unknown"), wasm_bindgen_test)]
fn every_case_file() {
    assert!(!CASE_FILES.is_empty(), "no case files");
    let (mut ran, mut skipped, mut failures) = (0, 0, Vec::new());
    for (name, text) in CASE_FILES {
        let file = CaseFile::load(name, text);
        let cases = file.doc["cases"].as_array().unwrap();
        assert!(!cases.is_empty(), "{}: no cases", file.name);
        for case in cases {
            let id = format!("{}::{}", file.name, case["name"].as_str().unwrap());
            if case["only"] == "e2e" {
                assert!(case["why"].is_string(), "{id}: e2e-only without a reason");
                skipped += 1;
                continue;
            }
            let known = [
                "status",
                "code",
                "headers",
                "message_contains",
                "log",
                "identity",
                "stripped",
                "backend",
            ];
            let fields = case["expect"].as_object().unwrap().keys();
            assert!(
                fields.into_iter().all(|f| known.contains(&f.as_str())),
                "{id}: expect"
            );
            let req = file.request(case);
            match run(&file.config, &req) {
                Ok(out) => failures.extend(
                    file.check(case, &req, &out)
                        .into_iter()
                        .map(|f| format!("{id}: {f}")),
                ),
                Err(e) => failures.push(format!("{id}: {e}")),
            }
            ran += 1;
        }
    }
    println!(
        "case files: {} files, {ran} cases run, {skipped} e2e-only",
        CASE_FILES.len()
    );
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// Reads the folders at run time: Wasm has no file system.
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
#[test]
fn every_file_is_embedded() {
    for (dir, files) in [
        ("tests/cases", embedded::CASE_FILES),
        ("envoy/profiles", embedded::PROFILES),
    ] {
        let path = format!("{}/../{dir}", env!("CARGO_MANIFEST_DIR"));
        let mut on_disk: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            on_disk, listed,
            "core/tests/embedded must list every {dir}/*.json"
        );
    }
}
