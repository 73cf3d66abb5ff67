//! Key usage as `keygate serve` records it and `keygate keys list` shows it.
//!
//! Envoys POST usage reports (see `keygate_core::usage`) to `/v1/usage` on
//! the listener that serves the key list, so they get the same trust: TLS
//! and client certificates when serve has them. Each report adds to a JSON
//! file beside the key list (`keys.json` → `keys.usage.json`), written
//! atomically by a thread of its own so that a slow disk never holds up a
//! poll: per key id, the last time it was used, its requests in all, and
//! its requests per hour for the last 25 hours.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use keygate_core::usage::{UsageReport, MAX_REPORT_KEYS};
use serde::{Deserialize, Serialize};

use crate::error::{Failure, Result};

/// Where Envoys POST their reports (the filter's default `usage_path`).
pub const PATH: &str = "/v1/usage";

/// Largest report body: the most keys a report may carry, with long ids.
const MAX_BODY: usize = MAX_REPORT_KEYS * 200;

/// Most key ids the file records; ids reported beyond that are ignored
/// (and logged), so no reporter can grow the file without bound.
const MAX_IDS: usize = 1_000_000;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
/// Hourly buckets kept: enough for any 24-hour window ending now.
const KEEP_HOURS: i64 = 25;

/// The usage file: usage per key id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageFile {
    /// Usage by key id.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyUsage>,
}

/// One key's usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUsage {
    /// Unix seconds of the last request seen (to the reporting Envoy's tick).
    pub last_used: i64,
    /// Requests reported in all.
    pub requests: u64,
    /// `[hour start (Unix seconds), requests]`, oldest first, the last 25 hours.
    #[serde(default)]
    pub hours: Vec<(i64, u64)>,
}

impl KeyUsage {
    /// Adds `requests` received at `now`, the last of them at `last_used`
    /// (never later than `now`: an Envoy's clock may run ahead).
    fn add(&mut self, requests: u64, last_used: i64, now: i64) {
        self.requests = self.requests.saturating_add(requests);
        self.last_used = self.last_used.max(last_used.min(now));
        let hour = now - now.rem_euclid(HOUR);
        match self.hours.last_mut() {
            Some((h, n)) if *h == hour => *n = n.saturating_add(requests),
            _ => self.hours.push((hour, requests)),
        }
        self.hours.retain(|(h, _)| *h > hour - KEEP_HOURS * HOUR);
    }

    /// Requests in the last 24 hours at `now`, counted by whole hours: every
    /// hour that overlaps the 24 hours before `now` counts in full.
    pub fn last_24h(&self, now: i64) -> u64 {
        self.hours
            .iter()
            .filter(|(h, _)| *h + HOUR > now - DAY && *h <= now)
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }
}

impl UsageFile {
    /// Reads the file at `path`; no file is no usage yet.
    pub fn load(path: &Path) -> Result<UsageFile> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UsageFile::default()),
            Err(e) => {
                return Err(Failure::because(
                    format!("cannot read {}", path.display()),
                    e,
                ))
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            Failure::new(format!(
                "{}: not a usage file ({e}); move it away to start over",
                path.display()
            ))
        })
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec(self)
            .map_err(|e| Failure::because("cannot serialize the usage", e))?;
        bytes.push(b'\n');
        crate::keyfile::write_atomic(path, &bytes)
    }

    /// Adds a report received at `now`; returns how many of its ids were
    /// ignored because the file is full.
    pub fn add_report(&mut self, report: &UsageReport, now: i64) -> usize {
        let mut ignored = 0;
        for k in &report.keys {
            if let Some(u) = self.keys.get_mut(&k.id) {
                u.add(k.requests, k.last_used, now);
            } else if self.keys.len() < MAX_IDS {
                let mut u = KeyUsage::default();
                u.add(k.requests, k.last_used, now);
                self.keys.insert(k.id.clone(), u);
            } else {
                ignored += 1;
            }
        }
        ignored
    }
}

/// The usage file of a key list: `keys.json` → `keys.usage.json`, any
/// other name gets `.usage.json` appended.
pub fn file_for(keys: &Path) -> PathBuf {
    let name = keys.file_name().map(OsString::from).unwrap_or_default();
    let text = name.to_string_lossy();
    let usage = match text.strip_suffix(".json") {
        Some(stem) => format!("{stem}.usage.json"),
        None => format!("{text}.usage.json"),
    };
    keys.with_file_name(usage)
}

/// Records reports for `keygate serve`.
#[derive(Debug)]
pub struct Recorder {
    state: Arc<Mutex<UsageFile>>,
    /// Wakes the writer thread.
    wake: Sender<()>,
}

impl Recorder {
    /// Loads `path` (a broken file stops the start-up, naming it) and starts
    /// the thread that writes it after each report.
    pub fn start(path: PathBuf) -> Result<Recorder> {
        let state = Arc::new(Mutex::new(UsageFile::load(&path)?));
        let (wake, woken) = mpsc::channel();
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name("keygate-usage".into())
            .spawn(move || write_on_wake(&path, &shared, &woken))
            .map_err(|e| Failure::because("cannot start the usage writer", e))?;
        Ok(Recorder { state, wake })
    }

    /// Answers a request to [`PATH`].
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            let mut res = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "usage reports are POSTed",
            );
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return res;
        }
        let too_large = || {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "report_too_large",
                &format!("the body is over {MAX_BODY} bytes"),
            )
        };
        // An announced length over the limit is refused before any reading.
        if req.body().size_hint().lower() > MAX_BODY as u64 {
            return too_large();
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_usage_report",
                    &format!("the body could not be read: {e}"),
                )
            }
        };
        let report = match UsageReport::parse(&body) {
            Ok(r) => r,
            Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_usage_report", &why),
        };
        let ignored = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.add_report(&report, now_unix())
        };
        if ignored > 0 {
            log(&format!(
                "usage of {ignored} new key ids ignored: the usage file holds {MAX_IDS} ids already"
            ));
        }
        let _ = self.wake.send(());
        let body = serde_json::json!({"accepted": report.keys.len() - ignored}).to_string();
        json(StatusCode::OK, body)
    }
}

/// Writes the file each time a report arrived, once for several reports
/// that arrived while it was writing.
fn write_on_wake(path: &Path, state: &Mutex<UsageFile>, woken: &Receiver<()>) {
    while woken.recv().is_ok() {
        while woken.try_recv().is_ok() {}
        let snapshot = state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(failure) = snapshot.save(path) {
            log(&format!("usage not saved: {}", failure.lines.join("; ")));
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"error": code, "message": message}).to_string(),
    )
}

/// A refused report: the JSON error, and a log line saying why.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    log(&format!(
        "usage report refused ({}): {message}",
        status.as_u16()
    ));
    error(status, code, message)
}

fn log(line: &str) {
    eprintln!("keygate serve: {line}");
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::usage::ReportedKey;

    fn report(keys: &[(&str, u64, i64)]) -> UsageReport {
        UsageReport {
            keys: keys
                .iter()
                .map(|(id, requests, last_used)| ReportedKey {
                    id: id.to_string(),
                    requests: *requests,
                    last_used: *last_used,
                })
                .collect(),
        }
    }

    #[test]
    fn reports_add_up_by_hour_and_age_out_of_the_day() {
        let t0 = 1_800_000_000 - 1_800_000_000 % HOUR;
        let mut f = UsageFile::default();
        assert_eq!(f.add_report(&report(&[("a", 3, t0 + 10)]), t0 + 12), 0);
        f.add_report(&report(&[("a", 2, t0 + 20), ("b", 1, t0 + 5)]), t0 + 30);
        // A clock ahead of the server's is held to the server's time.
        f.add_report(&report(&[("a", 1, t0 + 9_999)]), t0 + HOUR + 1);
        let a = &f.keys["a"];
        assert_eq!((a.requests, a.last_used), (6, t0 + HOUR + 1));
        assert_eq!(a.hours, vec![(t0, 5), (t0 + HOUR, 1)]);
        assert_eq!(a.last_24h(t0 + HOUR + 1), 6);
        // The first hour stops counting once it is wholly 24 h old.
        assert_eq!(a.last_24h(t0 + DAY + HOUR - 1), 6);
        assert_eq!(a.last_24h(t0 + DAY + HOUR), 1);
        assert_eq!(a.last_24h(t0 + 2 * DAY + HOUR), 0);
        // Old buckets are dropped as new ones come.
        f.add_report(&report(&[("a", 1, t0 + 30 * HOUR)]), t0 + 30 * HOUR);
        assert_eq!(f.keys["a"].hours, vec![(t0 + 30 * HOUR, 1)]);
        assert_eq!(f.keys["a"].requests, 7);
    }

    #[test]
    fn the_file_round_trips_and_sits_beside_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.json");
        let path = file_for(&keys);
        assert_eq!(path, dir.path().join("keys.usage.json"));
        assert_eq!(
            file_for(Path::new("/x/list")),
            Path::new("/x/list.usage.json")
        );
        assert_eq!(UsageFile::load(&path).unwrap(), UsageFile::default());
        let mut f = UsageFile::default();
        f.add_report(&report(&[("a", 3, 100)]), 200);
        f.save(&path).unwrap();
        assert_eq!(UsageFile::load(&path).unwrap(), f);
        std::fs::write(&path, b"{\"keys\": 3}").unwrap();
        let e = UsageFile::load(&path).unwrap_err();
        assert!(
            e.lines[0].contains("keys.usage.json: not a usage file"),
            "{e:?}"
        );
    }
}
