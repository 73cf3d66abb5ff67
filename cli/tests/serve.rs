//! `keygate serve`: the reference control plane.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create, read_list};

/// `serve --keys KEYS --listen 127.0.0.1:0` and `extra`.
fn serve_args<'a>(keys: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--keys",
        keys.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    args
}

/// A running `keygate serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(keys: &Path) -> Server {
        Server::start_with(keys, &[])
    }

    fn start_with(keys: &Path, extra: &[&str]) -> Server {
        let mut child = common::keygate(&serve_args(keys, extra))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    log.lock().unwrap().push(line.unwrap());
                }
            });
        }
        let mut server = Server {
            child,
            addr: String::new(),
            log,
        };
        // `listening on http://ADDR`, or `https://` with TLS.
        let line = server.wait_for_log("listening on ", Duration::from_secs(10));
        server.addr = line.rsplit("://").next().unwrap().to_string();
        server
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, path: &str, extra_headers: &str) -> Reply {
        self.send("GET", path, extra_headers, "")
    }

    fn post(&self, path: &str, body: &str) -> Reply {
        let headers = format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        self.send("POST", path, &headers, body)
    }

    fn send(&self, method: &str, path: &str, extra_headers: &str, body: &str) -> Reply {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n{extra_headers}\r\n{body}"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn version(&self) -> u64 {
        let r = self.get("/v1/keys", "");
        assert_eq!(r.status, 200);
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["version"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[test]
fn serves_the_list_with_an_etag_and_304() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &["--scopes", "read"]);
    let server = Server::start(&file);
    server.wait_for_log("loaded", Duration::from_secs(1));

    let r = server.get("/v1/keys", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let list = read_list(&file);
    assert_eq!(r.body, serde_json::to_string(&list).unwrap());
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(
        etag,
        format!("\"{}\"", common::sha256_hex(r.body.as_bytes()))
    );
    // What the filter accepts.
    keygate_core::keylist::validate_key_list(r.body.as_bytes()).unwrap();

    let r = server.get("/v1/keys", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    assert_eq!(r.body, "");
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let r = server.get("/v1/keys", "If-None-Match: \"something-else\"\r\n");
    assert_eq!(r.status, 200);

    assert_eq!(server.get("/healthz", "").status, 200);
    assert_eq!(server.get("/nope", "").status, 404);
}

#[test]
fn reloads_changes_and_keeps_serving_through_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let server = Server::start(&file);
    assert_eq!(server.version(), 1);
    let old_etag = server
        .get("/v1/keys", "")
        .header("etag")
        .unwrap()
        .to_string();

    // A change is served within about a second.
    create(&file, "b", &[]);
    let changed = Instant::now();
    while server.version() != 2 {
        assert!(
            changed.elapsed() < Duration::from_millis(1500),
            "reload too slow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_for_log("reloaded", Duration::from_secs(1));
    assert!(server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("version 2, 2 keys")));
    let r = server.get("/v1/keys", &format!("If-None-Match: {old_etag}\r\n"));
    assert_eq!(r.status, 200, "old ETag still matched after a change");
    let served = r.body.clone();

    // A broken file: the old list stays, the reason names the field.
    std::fs::write(
        &file,
        r#"{"version":3,"keys":[{"id":"a","sha256":"oops"}]}"#,
    )
    .unwrap();
    let line = server.wait_for_log("not reloaded", Duration::from_secs(3));
    assert!(line.contains("keys[0].sha256"), "{line}");
    assert!(line.contains("still serving version 2"), "{line}");
    let r = server.get("/v1/keys", "");
    assert_eq!((r.status, r.body.as_str()), (200, served.as_str()));

    // An older version is not served either.
    std::fs::write(&file, r#"{"version":1,"keys":[]}"#).unwrap();
    server.wait_for_log("version 1 is older", Duration::from_secs(3));
    assert_eq!(server.version(), 2);

    // Fixed: served again.
    std::fs::write(&file, r#"{"version":3,"keys":[]}"#).unwrap();
    let fixed = Instant::now();
    while server.version() != 3 {
        assert!(
            fixed.elapsed() < Duration::from_secs(3),
            "not reloaded after a fix"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn refuses_to_start_on_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    std::fs::write(&file, r#"{"version":1,"keys":[{"id":"a"}]}"#).unwrap();
    let r = common::run(&serve_args(&file, &[]));
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("missing field `sha256`"), "{}", r.stderr);
}

#[test]
fn serves_long_lists_in_pages_that_the_filter_assembles() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    for id in ["a", "b", "c", "d", "e"] {
        create(&file, id, &[]);
    }
    let server = Server::start_with(&file, &["--page-size", "2"]);
    server.wait_for_log("5 keys in 3 page(s)", Duration::from_secs(2));

    let first = server.get("/v1/keys", "");
    assert_eq!(first.status, 200);
    let etag = first.header("etag").unwrap().to_string();
    let mut pages = keygate_core::keylist::KeyListPages::default();
    pages.add(first.body.as_bytes()).unwrap();
    let mut paths = Vec::new();
    while let Some(next) = pages.next.clone() {
        let r = server.get(&next, &format!("If-Match: {etag}\r\n"));
        assert_eq!(r.status, 200, "{next}");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        pages.add(r.body.as_bytes()).unwrap();
        paths.push(next);
    }
    assert_eq!(paths, ["/v1/keys?page=2", "/v1/keys?page=3"]);
    assert_eq!(pages.finish().unwrap().store.len(), 5);

    // The first page answers 304 to its ETag; later pages do not.
    let r = server.get("/v1/keys", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    // A page of a list that changed since the first page: 412.
    let r = server.get("/v1/keys?page=2", "If-Match: \"stale\"\r\n");
    assert_eq!(r.status, 412);
    assert_eq!(server.get("/v1/keys?page=4", "").status, 404);
    assert_eq!(server.get("/v1/keys?page=0", "").status, 404);
    assert_eq!(server.get("/v1/keys?page=x", "").status, 404);
}

/// Certificates made for one test with the openssl CLI (never committed):
/// a CA, a server certificate for `localhost` and a client certificate, both
/// from that CA, as `<name>.pem` and `<name>.key` in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl CLI makes the test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for name in ["ca", "server", "client"] {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]);
    }
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keygate test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

/// `GET /v1/keys` over TLS to `localhost`, trusting `dir/ca.pem` and showing
/// `dir/client.pem` if `with_client_cert`. The raw response, or why none came.
fn tls_get(addr: &str, dir: &Path, with_client_cert: bool) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    #[allow(deprecated)] // the provider keygate serve uses
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_client_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join("client.pem")).unwrap()],
                PrivateKeyDer::from_pem_file(dir.join("client.key")).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    tls.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    Ok(raw)
}

/// `keygate serve` with TLS on a one-key list, with `--client-ca` if `client_ca`.
fn start_tls(client_ca: bool) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let mut args = vec![
        "--tls-cert".to_string(),
        p("server.pem"),
        "--tls-key".into(),
        p("server.key"),
    ];
    if client_ca {
        args.extend(["--client-ca".into(), p("ca.pem")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(&file, &args);
    (dir, file, server)
}

#[test]
fn serves_over_tls_only() {
    let (dir, file, server) = start_tls(false);
    server.wait_for_log("listening on https://", Duration::from_secs(1));

    let raw = tls_get(&server.addr, dir.path(), false).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body, serde_json::to_string(&read_list(&file)).unwrap());

    // Plain HTTP on the TLS port gets no list: the handshake fails and the
    // connection closes.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /v1/keys HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(!raw.starts_with(b"HTTP/"), "{raw:?}");
    assert!(!String::from_utf8_lossy(&raw).contains("\"keys\""));
    server.wait_for_log("TLS handshake with", Duration::from_secs(2));
}

#[test]
fn client_ca_refuses_a_client_without_a_certificate() {
    let (dir, _file, server) = start_tls(true);

    let raw = tls_get(&server.addr, dir.path(), true).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");

    // With TLS 1.3 the client finishes its handshake first, then reads the
    // server's alert instead of a response.
    let refused = tls_get(&server.addr, dir.path(), false);
    assert!(
        refused.as_ref().map_or(true, |raw| raw.is_empty()),
        "{refused:?}"
    );
    let line = server.wait_for_log("TLS handshake with", Duration::from_secs(2));
    assert!(line.contains("no certificates"), "{line}");
}

#[test]
fn bad_tls_files_stop_the_start_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let cases: [(&[String], &str); 5] = [
        (
            &[
                "--tls-cert".into(),
                p("missing.pem"),
                "--tls-key".into(),
                p("server.key"),
            ],
            "--tls-cert",
        ),
        (
            &[
                "--tls-cert".into(),
                p("keys.json"),
                "--tls-key".into(),
                p("server.key"),
            ],
            "--tls-cert",
        ),
        (
            &[
                "--tls-cert".into(),
                p("server.pem"),
                "--tls-key".into(),
                p("server.pem"),
            ],
            "--tls-key",
        ),
        // The client's key with the server's certificate.
        (
            &[
                "--tls-cert".into(),
                p("server.pem"),
                "--tls-key".into(),
                p("client.key"),
            ],
            "does not go with --tls-cert",
        ),
        (
            &[
                "--tls-cert".into(),
                p("server.pem"),
                "--tls-key".into(),
                p("server.key"),
                "--client-ca".into(),
                p("keys.json"),
            ],
            "--client-ca",
        ),
    ];
    for (extra, named) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = common::run(&serve_args(&file, &extra));
        assert_eq!(r.code, 1, "{extra:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
        assert!(r.stderr.contains(named), "{extra:?}: {}", r.stderr);
    }
    // One half of the pair is a usage error.
    let cert = p("server.pem");
    let r = common::run(&serve_args(&file, &["--tls-cert", &cert]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--tls-key"), "{}", r.stderr);
}

/// `keys list --json` of `file`, as JSON.
fn listing(file: &Path) -> serde_json::Value {
    let r = common::run(&["keys", "list", "--json", "--file", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn usage_reports_add_up_in_a_file_that_keys_list_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    create(&file, "b", &[]);
    create(&file, "idle", &[]);
    let server = Server::start(&file);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Two Envoys report, one of them twice.
    for body in [
        format!(
            r#"{{"keys":[{{"id":"a","requests":3,"last_used":{}}}]}}"#,
            now - 60
        ),
        format!(
            r#"{{"keys":[{{"id":"a","requests":4,"last_used":{now}}},{{"id":"b","requests":1,"last_used":{}}}]}}"#,
            now - 30
        ),
    ] {
        let r = server.post("/v1/usage", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let usage_file = dir.path().join("keys.usage.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v = listing(&file);
        if v["keys"][0]["requests_24h"] == 7 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(usage_file.exists());
    let row = |id: &str| {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(row("a")["requests_24h"], 7, "{v}");
    assert_eq!(row("b")["requests_24h"], 1, "{v}");
    assert_eq!(row("idle")["requests_24h"], 0, "{v}");
    assert_eq!(row("idle")["last_used"], serde_json::Value::Null, "{v}");
    let a_last = row("a")["last_used"].as_str().unwrap().to_string();
    let parsed =
        time::OffsetDateTime::parse(&a_last, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(
        parsed.unix_timestamp(),
        now as i64,
        "the later of the two reports"
    );

    // The table says the same.
    let r = common::run(&["keys", "list", "--file", file.to_str().unwrap()]);
    let line = |id: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap()
            .to_string()
    };
    assert!(
        r.stdout
            .lines()
            .next()
            .unwrap()
            .contains("STATUS  LAST USED             24H  LABEL"),
        "{}",
        r.stdout
    );
    assert!(line("a").contains(&format!("{a_last}  7 ")), "{}", r.stdout);
    assert!(line("idle").contains("never"), "{}", r.stdout);

    // A restarted server keeps what it recorded.
    drop(server);
    let server = Server::start(&file);
    let body = format!(r#"{{"keys":[{{"id":"idle","requests":2,"last_used":{now}}}]}}"#);
    assert_eq!(server.post("/v1/usage", &body).status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listing(&file)["keys"][2]["requests_24h"] != 2 {
        assert!(Instant::now() < deadline, "{}", listing(&file));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(listing(&file)["keys"][0]["requests_24h"], 7);
}

#[test]
fn a_malformed_usage_report_gets_a_json_error_and_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    let server = Server::start(&file);
    for (body, status, code, message) in [
        ("{", 400, "invalid_usage_report", "EOF while parsing"),
        (
            r#"{"keys":[{"id":"a","requests":0,"last_used":1}]}"#,
            400,
            "invalid_usage_report",
            "keys[0].requests: must be at least 1",
        ),
        (
            r#"{"keys":[{"id":"a","requests":1,"last_used":1,"key":"sk_x"}]}"#,
            400,
            "invalid_usage_report",
            "keys[0].key: unknown field `key`",
        ),
    ] {
        let r = server.post("/v1/usage", body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], code, "{}", r.body);
        assert!(
            v["message"].as_str().unwrap().contains(message),
            "{}",
            r.body
        );
        server.wait_for_log(
            &format!(
                "usage report refused ({status}): {}",
                v["message"].as_str().unwrap()
            ),
            Duration::from_secs(5),
        );
    }
    // A body announced over the limit is refused before it is read.
    let r = server.send("POST", "/v1/usage", "Content-Length: 30000000\r\n", "");
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("report_too_large"), "{}", r.body);
    let r = server.get("/v1/usage", "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    // Nothing was recorded.
    assert!(!dir.path().join("keys.usage.json").exists());
    assert_eq!(listing(&file)["keys"][0]["requests_24h"], 0);
}

#[test]
fn refuses_to_start_on_a_broken_usage_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    create(&file, "a", &[]);
    std::fs::write(dir.path().join("keys.usage.json"), b"not json").unwrap();
    let r = common::run(&serve_args(&file, &[]));
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("keys.usage.json: not a usage file"),
        "{}",
        r.stderr
    );
    let r = common::run(&["keys", "list", "--file", file.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("keys.usage.json: not a usage file"),
        "{}",
        r.stderr
    );
}
