//! `keygate serve`: the reference control plane. Serves a key list file at
//! `GET /v1/keys` with a strong ETag, and reloads it when the file changes.
//!
//! A long list is served in pages of `--page-size` keys: each page carries
//! the path of the next in `next`, and a later page requested with an
//! `If-Match` that is no longer the list's ETag gets 412, so that the filter
//! never assembles pages of two versions.
//!
//! With `--tls-cert` and `--tls-key` the listener speaks only TLS (rustls);
//! `--client-ca` also requires a client certificate chaining to that CA.
//!
//! `POST /v1/usage` takes Envoys' usage reports (see `crate::usage`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use clap::Args;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keygate_core::keylist::validate_key_list;

use crate::error::{Failure, Result};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The key list file to serve (as written by `keygate keys`).
    #[arg(long, value_name = "KEYS.json")]
    keys: PathBuf,
    /// Address to listen on; port 0 picks a free port (the `listening on` line names it).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// How often the file is checked for changes (size, mtime, inode), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_ms: u64,
    /// Keys per page (0: the whole list in one response). Envoy refuses
    /// callout responses of a few tens of megabytes; 50,000 keys are about 5 MB.
    #[arg(long, value_name = "KEYS", default_value_t = 50_000)]
    page_size: usize,
    /// Serve TLS only, with this certificate chain (PEM, server certificate first).
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve only clients whose certificate chains to a CA in this file (PEM); needs --tls-cert.
    #[arg(long, value_name = "CA.pem", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Where usage reports POSTed to /v1/usage are kept [default: beside
    /// --keys, `keys.json` → `keys.usage.json`].
    #[arg(long, value_name = "USAGE.json")]
    usage: Option<PathBuf>,
}

/// A TLS handshake not done by then is dropped, so that idle sockets do not pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One loaded version of the list, ready to serve.
#[derive(Debug)]
struct Snapshot {
    /// Compact JSON pages `{"version":N,"keys":[...],"next":"/v1/keys?page=2"}`;
    /// the last page has no `next`.
    pages: Vec<Bytes>,
    /// `"` + hex SHA-256 of `body` + `"`.
    etag: HeaderValue,
    version: u64,
    keys: usize,
}

/// The snapshot being served, swapped by the watcher.
type Shared = Arc<RwLock<Arc<Snapshot>>>;

/// What is compared to notice a change of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

/// Runs the server until the process is killed.
pub fn run(args: ServeArgs) -> Result<()> {
    // TLS files are checked first: a bad certificate stops the start-up.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(&crate::tls::TlsFiles {
                cert,
                key,
                client_ca: args.client_ca.as_deref(),
            })?,
        )),
        _ => None,
    };
    let name = args.keys.display().to_string();
    let first_print = fingerprint(&args.keys).map_err(|e| e.to_string());
    let first =
        load(&args.keys, args.page_size).map_err(|why| Failure::new(format!("{name}: {why}")))?;
    log(&format!(
        "loaded {name}: version {}, {} keys in {} page(s)",
        first.version,
        first.keys,
        first.pages.len()
    ));
    let shared: Shared = Arc::new(RwLock::new(Arc::new(first)));
    let usage_file = args
        .usage
        .clone()
        .unwrap_or_else(|| crate::usage::file_for(&args.keys));
    let usage = Arc::new(crate::usage::Recorder::start(usage_file)?);

    let listener = std::net::TcpListener::bind(args.listen)
        .map_err(|e| Failure::because(format!("cannot listen on {}", args.listen), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::because("cannot read the listening address", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Failure::because("cannot configure the listening socket", e))?;

    {
        let shared = Arc::clone(&shared);
        let path = args.keys.clone();
        let interval = Duration::from_millis(args.poll_ms);
        let page_size = args.page_size;
        std::thread::Builder::new()
            .name("keygate-watch".into())
            .spawn(move || watch(&path, &shared, first_print, interval, page_size))
            .map_err(|e| Failure::because("cannot start the file watcher", e))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::because("cannot start the runtime", e))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Failure::because("cannot use the listening socket", e))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        log(&format!("listening on {scheme}://{local}"));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // E.g. out of file descriptors: wait a little instead of spinning.
                    log(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = Arc::clone(&shared);
            let usage = Arc::clone(&usage);
            let tls = tls.clone();
            tokio::spawn(async move {
                let Some(tls) = tls else {
                    return serve_connection(stream, shared, usage).await;
                };
                // A failed handshake (plain HTTP, no or untrusted client
                // certificate) closes the connection before any request is read.
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, shared, usage).await,
                    Ok(Err(e)) => log(&format!("TLS handshake with {peer} failed: {e}")),
                    Err(_) => log(&format!("TLS handshake with {peer} timed out")),
                }
            });
        }
    })
}

/// Serves HTTP/1.1 requests on one connection, plain or TLS, until it closes.
async fn serve_connection<S>(stream: S, shared: Shared, usage: Arc<crate::usage::Recorder>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let snapshot = current(&shared);
        let usage = Arc::clone(&usage);
        async move {
            if req.uri().path() == crate::usage::PATH {
                return Ok::<_, Infallible>(usage.handle(req).await);
            }
            Ok::<_, Infallible>(respond(&req, &snapshot))
        }
    });
    // Errors here are the client's (reset, malformed request, header timeout).
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, snapshot: &Snapshot) -> Response<Full<Bytes>> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/v1/keys" if readable => {
            let page = page_number(req.uri().query());
            let not_modified = page == Some(1)
                && req
                    .headers()
                    .get_all(header::IF_NONE_MATCH)
                    .iter()
                    .any(|v| etag_matches(v.as_bytes(), snapshot.etag.as_bytes()));
            let changed = req
                .headers()
                .get_all(header::IF_MATCH)
                .iter()
                .any(|v| !etag_matches(v.as_bytes(), snapshot.etag.as_bytes()));
            let body = page
                .and_then(|p| p.checked_sub(1))
                .and_then(|i| snapshot.pages.get(i));
            let mut res = if changed {
                reply(StatusCode::PRECONDITION_FAILED, Bytes::new())
            } else if not_modified {
                reply(StatusCode::NOT_MODIFIED, Bytes::new())
            } else if let Some(body) = body {
                let mut res = reply(StatusCode::OK, body.clone());
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res
            } else {
                reply(StatusCode::NOT_FOUND, Bytes::new())
            };
            let h = res.headers_mut();
            h.insert(header::ETAG, snapshot.etag.clone());
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            res
        }
        "/healthz" if readable => {
            let mut res = reply(StatusCode::OK, Bytes::from_static(b"ok\n"));
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            res
        }
        "/v1/keys" | "/healthz" => {
            let mut res = reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            res
        }
        _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
    }
}

/// The page a query asks for: `page=N` (1-based), 1 without one, `None` if malformed.
fn page_number(query: Option<&str>) -> Option<usize> {
    let Some(query) = query else {
        return Some(1);
    };
    let mut page = 1;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "page" {
            page = value.parse().ok().filter(|p| *p >= 1)?;
        }
    }
    Some(page)
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res
}

/// `If-None-Match` (a comma-separated list, or `*`) against our ETag, with
/// the weak comparison RFC 9110 prescribes for it.
fn etag_matches(if_none_match: &[u8], etag: &[u8]) -> bool {
    if_none_match
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .any(|t| t == b"*" || t.strip_prefix(b"W/").unwrap_or(t) == etag)
}

fn current(shared: &Shared) -> Arc<Snapshot> {
    Arc::clone(
        &shared
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

/// One page of the list as served.
#[derive(serde::Serialize)]
struct Page<'a> {
    version: u64,
    keys: &'a [keygate_core::config::KeyConfig],
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// Reads and validates the list; the error is one line naming the field(s).
fn load(path: &Path, page_size: usize) -> std::result::Result<Snapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let list = validate_key_list(&bytes).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let whole = serde_json::to_vec(&list).map_err(|e| format!("cannot serialize: {e}"))?;
    let etag = format!("\"{}\"", hex::encode(keygate_core::keys::digest(&whole)));
    let chunks: Vec<&[keygate_core::config::KeyConfig]> = if page_size == 0 || list.keys.is_empty()
    {
        vec![&list.keys]
    } else {
        list.keys.chunks(page_size).collect()
    };
    let last = chunks.len();
    let pages = chunks
        .into_iter()
        .enumerate()
        .map(|(i, keys)| {
            let next = (i + 1 < last).then(|| format!("/v1/keys?page={}", i + 2));
            serde_json::to_vec(&Page {
                version: list.version,
                keys,
                next,
            })
            .map(Bytes::from)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot serialize: {e}"))?;
    Ok(Snapshot {
        etag: HeaderValue::from_str(&etag).map_err(|e| format!("bad ETag: {e}"))?,
        pages,
        version: list.version,
        keys: list.keys.len(),
    })
}

fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let (dev, ino) = {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    #[cfg(not(unix))]
    let (dev, ino) = (0, 0);
    Ok(Fingerprint {
        len: m.len(),
        modified: m.modified().ok(),
        dev,
        ino,
    })
}

/// Polls the file and swaps in each new valid version. A broken file, or an
/// older version, leaves the served list as it is; the reason is logged once
/// per change of the file.
fn watch(
    path: &Path,
    shared: &Shared,
    mut last: std::result::Result<Fingerprint, String>,
    interval: Duration,
    page_size: usize,
) {
    let name = path.display().to_string();
    loop {
        std::thread::sleep(interval);
        let now = fingerprint(path).map_err(|e| e.to_string());
        if now == last {
            continue;
        }
        last = now;
        let served = current(shared);
        let candidate = match &last {
            Err(e) => Err(format!("cannot read: {e}")),
            Ok(_) => load(path, page_size),
        };
        match candidate {
            Err(why) => log(&format!(
                "{name} not reloaded, still serving version {}: {why}",
                served.version
            )),
            Ok(next) if next.etag == served.etag => {}
            Ok(next) if next.version < served.version => log(&format!(
                "{name} not reloaded, still serving version {}: version {} is older",
                served.version, next.version
            )),
            Ok(next) => {
                log(&format!(
                    "reloaded {name}: version {}, {} keys{}",
                    next.version,
                    next.keys,
                    if next.version == served.version {
                        " (content changed but the version did not)"
                    } else {
                        ""
                    }
                ));
                *shared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
            }
        }
    }
}

fn log(line: &str) {
    eprintln!("keygate serve: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let etag = br#""abc""#;
        assert!(etag_matches(br#""abc""#, etag));
        assert!(etag_matches(br#"W/"abc""#, etag));
        assert!(etag_matches(br#""x", "abc""#, etag));
        assert!(etag_matches(b"*", etag));
        assert!(!etag_matches(br#""abd""#, etag));
        assert!(!etag_matches(b"abc", etag));
        assert!(!etag_matches(b"", etag));
    }
}
