//! TLS on the cluster links (issue 16: "TLS available by flag"), mutual: every node presents
//! its certificate (`--cluster-tls-cert`, `--cluster-tls-key`) on the links it accepts and on
//! those it dials, and accepts a peer only with a certificate that chains to
//! `--cluster-tls-ca`. TLS 1.3 only, with rustls' aws-lc-rs provider (the one
//! `ractor_cluster`'s tokio-rustls already builds; chosen explicitly, since `ring` is in the
//! tree too and rustls would not pick between them by itself).
//!
//! The files are read and checked once, at start: unreadable, not PEM, no key, a key that
//! is not the certificate's, or a certificate the CA does not accept (another CA, expired,
//! not for client authentication) is a [`TlsError`] naming the flag.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, AlertDescription, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The three PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This node's certificate chain, its own certificate first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) a peer's certificate must chain to.
    pub ca: PathBuf,
}

/// Why TLS could not be configured; each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read it: {reason}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag} {}: not PEM: {reason}", path.display())]
    NotPem {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag} {}: no PEM CERTIFICATE in it", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("--cluster-tls-key {}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) in it", path.display())]
    NoKey { path: PathBuf },
    #[error("--cluster-tls-ca {}: not a usable CA certificate: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("--cluster-tls-key does not belong to --cluster-tls-cert: {reason}")]
    KeyMismatch { reason: String },
    #[error("--cluster-tls-cert {} is not accepted under --cluster-tls-ca {}: {reason}", cert.display(), ca.display())]
    NotTrusted {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("--cluster-tls-server-name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
}

/// The rustls acceptor and connector of this node's links.
#[derive(Clone)]
pub struct ClusterTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// The name every peer's certificate is checked against; `None`: the host dialled.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        flag,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            flag,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

impl ClusterTls {
    /// Reads and checks the files; `server_name` overrides the name peers' certificates are
    /// checked against (default: the host part of the peer address dialled).
    pub fn from_files(files: &TlsFiles, server_name: Option<&str>) -> Result<Self, TlsError> {
        let chain = certificates("--cluster-tls-cert", &files.cert)?;
        let key_pem = read("--cluster-tls-key", &files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: files.key.clone(),
            },
            e => TlsError::NotPem {
                flag: "--cluster-tls-key",
                path: files.key.clone(),
                reason: e.to_string(),
            },
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("--cluster-tls-ca", &files.ca)? {
            roots.add(ca).map_err(|e| TlsError::BadCa {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_owned()).map_err(|_| TlsError::ServerName(n.to_owned()))
            })
            .transpose()?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Mandatory client authentication: a peer without a certificate from the CA is
        // refused in the handshake.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        // This node's own certificate must pass what its peers will check, or every link
        // would fail later, one refusal at a time.
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| TlsError::NotTrusted {
                cert: files.cert.clone(),
                ca: files.ca.clone(),
                reason: e.to_string(),
            })?;
        let mismatch = |e: rustls::Error| TlsError::KeyMismatch {
            reason: e.to_string(),
        };
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(mismatch)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(mismatch)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    pub(crate) fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// The name `peer` (`host:port`, `[v6]:port`) must carry in its certificate.
    pub(crate) fn server_name_for(&self, peer: &str) -> Option<ServerName<'static>> {
        match &self.server_name {
            Some(n) => Some(n.clone()),
            None => dialled_name(peer),
        }
    }
}

/// The host part of `host:port` or `[v6]:port` as a TLS server name.
fn dialled_name(peer: &str) -> Option<ServerName<'static>> {
    let (host, _) = peer.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

/// Why a TLS handshake failed, as the `reason` label of
/// `dispatch_cluster_tls_refusals_total`: `not_tls` (the peer does not speak TLS: a plain
/// ractor_cluster node, or garbage), `certificate` (no certificate, or one the CA does not
/// accept, either side), or `handshake` (anything else: closed mid-way, no common
/// parameters).
pub(crate) fn refusal_reason(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => "not_tls",
        Some(
            E::InvalidCertificate(_)
            | E::NoCertificatesPresented
            | E::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied,
            ),
        ) => "certificate",
        _ => "handshake",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn unreadable_and_non_pem_files_are_refused_naming_the_flag() {
        let dir = std::env::temp_dir().join(format!("dispatch-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = files(&dir);
        let e = ClusterTls::from_files(&f, None).unwrap_err().to_string();
        assert!(
            e.starts_with("--cluster-tls-cert") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(&f.cert, "not a certificate\n").unwrap();
        let e = ClusterTls::from_files(&f, None).unwrap_err().to_string();
        assert!(
            e.contains("--cluster-tls-cert") && e.contains("no PEM CERTIFICATE"),
            "{e}"
        );
        std::fs::write(
            &f.cert,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = ClusterTls::from_files(&f, None).unwrap_err().to_string();
        assert!(
            e.contains("--cluster-tls-cert") && e.contains("not PEM"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_server_name_is_the_dialled_host() {
        let name = |s: &str| Some(ServerName::try_from(s.to_owned()).unwrap());
        assert_eq!(
            dialled_name("dispatchd-0.dispatchd:7070"),
            name("dispatchd-0.dispatchd")
        );
        assert_eq!(dialled_name("127.0.0.1:7070"), name("127.0.0.1"));
        assert_eq!(dialled_name("[::1]:7070"), name("::1"));
        assert_eq!(dialled_name("no-port"), None);
    }
}
