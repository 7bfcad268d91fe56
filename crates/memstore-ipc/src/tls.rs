//! TLS on the daemon's TCP connections (rustls on ring): how the token and
//! the memories cross a network that is not this machine's.
//!
//! The daemon presents a certificate chain and key from PEM files
//! (`memstored --tls-cert --tls-key`); a client (`tls:HOST:PORT`) checks
//! that chain against the CA certificates of a PEM file it is given (a
//! private CA, or the daemon's self-signed certificate) or, without one,
//! against the public web roots (`webpki-roots`), and checks that the
//! certificate names HOST. The protocol inside is the same as on plain TCP,
//! token included. TLS 1.2 and 1.3 with rustls's safe defaults.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::IpcError;

/// The environment variable naming the PEM file of CA certificates a
/// `tls:` client trusts.
pub const TLS_CA_ENV: &str = "MEMSTORED_TLS_CA";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, IpcError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| IpcError::Tls(format!("reading certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(IpcError::Tls(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// The daemon's TLS side: its certificate chain (`cert`, PEM, leaf first)
/// and private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, IpcError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| IpcError::Tls(format!("reading the private key from {}: {e}", key.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| IpcError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| IpcError::Tls(format!("the certificate and key do not form an identity: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client's TLS side: trusting the CA certificates in `ca` (PEM), or the
/// public web roots without one.
pub fn connector(ca: Option<&Path>) -> Result<TlsConnector, IpcError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in certificates(path)? {
                roots
                    .add(c)
                    .map_err(|e| IpcError::Tls(format!("CA certificate in {}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| IpcError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a `HOST:PORT` address's certificate must carry: HOST (a DNS
/// name or an IP address; `[v6]` brackets removed).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, IpcError> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| IpcError::Tls(format!("{host:?} is not a server name: {e}")))
}
