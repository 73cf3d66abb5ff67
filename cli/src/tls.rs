//! TLS for `keygate serve`: the server certificate and key, and optionally
//! the CA that client certificates must chain to. Every error names the flag
//! and the file, so that a bad deployment says what to fix.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Failure, Result};

/// Where the PEM files are, as given on the command line.
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: Option<&'a Path>,
}

/// The rustls server configuration for `files`: TLS 1.2 and 1.3 with ring,
/// HTTP/1.1 offered by ALPN, and client certificates required when
/// `client_ca` is set.
pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>> {
    // ring rather than aws-lc-rs: no cmake or C++ toolchain to build. rustls
    // 0.23.48 deprecates it because it has no post-quantum key exchange; what
    // is served is SHA-256 digests of high-entropy keys, so that is accepted.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("--tls-cert", files.cert)?;
    let key = PrivateKeyDer::from_pem_file(files.key).map_err(|e| {
        Failure::new(format!(
            "--tls-key {}: {}",
            files.key.display(),
            pem_error(&e, "PRIVATE KEY")
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::because("cannot set up TLS", e))?;
    let builder = match files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        Failure::new(format!(
            "--tls-key {} does not go with --tls-cert {}: {e}",
            files.key.display(),
            files.cert.display()
        ))
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Requires a client certificate that chains to a CA in the file `ca`.
fn client_verifier(
    ca: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("--client-ca", ca)? {
        roots.add(cert).map_err(|e| {
            Failure::new(format!(
                "--client-ca {}: not a usable CA certificate: {e}",
                ca.display()
            ))
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| Failure::new(format!("--client-ca {}: {e}", ca.display())))
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certificates(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |why: String| Failure::new(format!("{flag} {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_error(&e, "CERTIFICATE")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_error(&e, "CERTIFICATE")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in the file (PEM expected)".into()));
    }
    Ok(certs)
}

fn pem_error(e: &rustls_pki_types::pem::Error, what: &str) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => format!("no {what} in the file (PEM expected)"),
        other => format!("not valid PEM: {other}"),
    }
}
