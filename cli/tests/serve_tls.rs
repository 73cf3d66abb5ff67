//! `keygate serve` over TLS and mutual TLS, and its refusals of bad TLS files.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::server::{serve_args, Server};
use common::{create, read_list};

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
