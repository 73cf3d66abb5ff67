//! Where the limits come from: the plugin configuration file (its keys and
//! default limits, parsed by keygate-core) and, optionally, a control plane
//! polled with `If-None-Match` like keygate's filter does (pages followed
//! with `If-Match`). Both are re-read every poll; a bad configuration or list
//! is logged with its field paths and the last good one stays in use.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use keygate_core::keylist::{CompiledKeyList, KeyListPages};
use keygate_core::{ConfigError, Policy};

use crate::table::FleetTable;

/// Largest key list accepted (all pages together).
const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;
/// Timeout of one control-plane request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration file and the control plane, with what was last read.
pub struct Source {
    config: Option<PathBuf>,
    control_plane: Option<Uri>,
    config_stamp: Option<SystemTime>,
    /// The configuration last read without error (`Policy` is not `Send`,
    /// so the polling task keeps the bytes and compiles them when needed).
    base: Option<Vec<u8>>,
    etag: Option<String>,
    list: Option<CompiledKeyList>,
}

fn errors(what: &str, errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    format!("{what}: {}", lines.join("; "))
}

impl Source {
    /// A source reading `config` (plugin configuration JSON) and/or polling
    /// `control_plane` (an `http://` URL of a key list).
    pub fn new(config: Option<PathBuf>, control_plane: Option<Uri>) -> Result<Source, String> {
        if let Some(uri) = &control_plane {
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(format!(
                    "--control-plane {uri}: expected an http:// URL with a host"
                ));
            }
        }
        Ok(Source {
            config,
            control_plane,
            config_stamp: None,
            base: None,
            etag: None,
            list: None,
        })
    }

    /// Re-reads what changed. `Ok(Some(table))` when the limits may have
    /// changed, `Ok(None)` when nothing did; `Err` says what failed (the
    /// last good limits stay).
    pub async fn refresh(&mut self) -> Result<Option<FleetTable>, String> {
        let mut changed = false;
        let mut problems = Vec::new();
        match self.read_config() {
            Ok(c) => changed |= c,
            Err(e) => problems.push(e),
        }
        if self.control_plane.is_some() {
            match self.fetch_list().await {
                Ok(c) => changed |= c,
                Err(e) => problems.push(e),
            }
        }
        // A configuration file that never read well is fatal; a control
        // plane that does not answer yet is retried at the next poll.
        if !problems.is_empty() && self.config.is_some() && self.base.is_none() {
            return Err(problems.join("; "));
        }
        if !problems.is_empty() {
            eprintln!(
                "keygate-ratelimit: keeping the last good limits: {}",
                problems.join("; ")
            );
        }
        if !changed {
            return Ok(None);
        }
        self.table().map(Some)
    }

    /// The configuration with the control plane's list merged in, indexed.
    fn table(&self) -> Result<FleetTable, String> {
        let base = self.base.as_deref().unwrap_or(b"{}");
        let policy = Policy::from_json(base).map_err(|e| errors("configuration", &e))?;
        let policy = match &self.list {
            Some(list) => policy
                .with_key_list(list.clone())
                .map_err(|e| errors("key list", &e))?,
            None => policy,
        };
        Ok(FleetTable::from_policy(&policy))
    }

    /// Reads the configuration file if it changed since the last read.
    fn read_config(&mut self) -> Result<bool, String> {
        let Some(path) = &self.config else {
            // No file: no default limits, the control plane's keys only.
            return Ok(false);
        };
        let shown = path.display();
        let stamp = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("{shown}: {e}"))?;
        if self.config_stamp == Some(stamp) {
            return Ok(false);
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
        self.config_stamp = Some(stamp);
        Policy::from_json(&bytes).map_err(|e| errors(&shown.to_string(), &e))?;
        self.base = Some(bytes);
        Ok(true)
    }

    /// Polls the control plane; `true` when a new list was loaded.
    async fn fetch_list(&mut self) -> Result<bool, String> {
        let Some(uri) = &self.control_plane else {
            return Ok(false);
        };
        let first = uri.path_and_query().map_or("/", |p| p.as_str());
        let (status, etag, body) = get(
            uri,
            first,
            self.etag.as_deref().map(|e| ("if-none-match", e)),
        )
        .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(false);
        }
        if status != StatusCode::OK {
            return Err(format!("GET {uri}: status {status}"));
        }
        let mut pages = KeyListPages::default();
        pages.add(&body).map_err(|e| errors("key list", &e))?;
        while let Some(next) = pages.next.clone() {
            if pages.bytes() > MAX_LIST_BYTES {
                return Err(format!("key list over {MAX_LIST_BYTES} bytes"));
            }
            let (status, _, body) =
                get(uri, &next, etag.as_deref().map(|e| ("if-match", e))).await?;
            if status != StatusCode::OK {
                return Err(format!("GET {next}: status {status}"));
            }
            pages.add(&body).map_err(|e| errors("key list", &e))?;
        }
        let list = pages.finish().map_err(|e| errors("key list", &e))?;
        eprintln!(
            "keygate-ratelimit: key list version {} loaded ({} keys)",
            list.version,
            list.store.len()
        );
        self.list = Some(list);
        self.etag = etag;
        Ok(true)
    }
}

/// One `GET path` to `uri`'s authority over HTTP/1.1; the status, the ETag
/// and the body (at most [`MAX_LIST_BYTES`]).
async fn get(
    uri: &Uri,
    path: &str,
    condition: Option<(&str, &str)>,
) -> Result<(StatusCode, Option<String>, Bytes), String> {
    let fail = |e: &dyn std::fmt::Display| format!("GET {uri}: {e}");
    let host = uri.host().unwrap_or("127.0.0.1");
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let port = uri.port_u16().unwrap_or(80);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| fail(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(&e))?;
        tokio::spawn(conn);
        let mut request = Request::get(path).header(header::HOST, authority);
        if let Some((name, value)) = condition {
            request = request.header(name, value);
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| fail(&e))?;
        let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(response.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|e| fail(&e))?
            .to_bytes();
        Ok((status, etag, body))
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| fail(&"timed out"))?
}
