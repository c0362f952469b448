//! TLS (rustls) for the two listeners, configured separately, with certificates and client CAs
//! reloaded without a restart.
//!
//! Each TLS listener holds its current `rustls::ServerConfig` behind an `ArcSwap`. The accept loop
//! hands every new connection to the config current at that moment, so a reload (a changed file,
//! or SIGHUP) affects new handshakes only: established connections keep the session they have.
//! A reload that fails (a half-written file, a key that does not match) keeps the last good
//! config and logs why. Handshakes run on their own tasks with a deadline, so a slow or hostile
//! client never holds up the accept loop. With a client CA configured (mTLS), a client without a
//! certificate that chains to it is refused in the handshake.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, wrappers::ReceiverStream};

use crate::reload::Trigger;

/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of one listener's TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates a client certificate must chain to: mTLS when set.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("tls configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a server configuration from the files as they are now.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_error(&files.cert, format!("does not match the key: {e}")))?;
    // gRPC is HTTP/2; clients that negotiate insist on it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// One listener's TLS: the files and the configuration last loaded from them.
pub struct ReloadingTls {
    name: &'static str,
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
}

impl ReloadingTls {
    /// Loads the files; an error here refuses the start.
    pub fn load(name: &'static str, files: TlsFiles) -> Result<Arc<ReloadingTls>, TlsError> {
        let config = server_config(&files)?;
        Ok(Arc::new(ReloadingTls {
            name,
            files,
            current: ArcSwap::new(config),
        }))
    }

    /// Reads the files again; on failure the last good configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.current.store(config);
        tracing::info!(listener = self.name, "tls certificates reloaded");
        Ok(())
    }

    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        paths
    }

    /// Reloads whenever `trigger` fires (SIGHUP, or a file changed), until `stop` resolves.
    pub async fn follow(self: Arc<Self>, mut trigger: Trigger, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                fired = trigger.changed() => {
                    if !fired {
                        return;
                    }
                    if let Err(error) = self.reload() {
                        tracing::error!(listener = self.name, %error, "tls reload failed; keeping the previous certificates");
                    }
                }
            }
        }
    }

    /// The connections of `listener` after their TLS handshake.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(listener = self.name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = TlsAcceptor::from(self.current.load_full());
                let tx = tx.clone();
                let name = self.name;
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::info!(listener = name, %peer, %error, "tls handshake refused");
                        }
                        Err(_) => {
                            tracing::info!(listener = name, %peer, "tls handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// The name a verified client certificate authenticates as: its subject CN, else its first DNS
/// or e-mail SAN.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    common_name.filter(|cn| !cn.is_empty()).or_else(|| {
        let san = parsed.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            x509_parser::extensions::GeneralName::RFC822Name(mail) => Some((*mail).to_owned()),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, params: rcgen::CertificateParams) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            client_ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn configs_load_and_bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(
            dir.path(),
            "server",
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap(),
        );
        let config = server_config(&files).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let other = write_pair(
            dir.path(),
            "other",
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap(),
        );
        let mismatched = TlsFiles {
            key: other.key.clone(),
            ..files.clone()
        };
        let error = server_config(&mismatched).err().unwrap().to_string();
        assert!(
            error.contains("server.crt") && error.contains("does not match"),
            "{error}"
        );

        std::fs::write(&files.cert, "not pem").unwrap();
        let error = server_config(&files).err().unwrap().to_string();
        assert!(error.contains("server.crt"), "{error}");
    }

    #[test]
    fn a_failed_reload_keeps_the_previous_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(
            dir.path(),
            "server",
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap(),
        );
        let tls = ReloadingTls::load("data", files.clone()).unwrap();
        let before = tls.current.load_full();
        std::fs::write(&files.key, "truncated").unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.current.load_full()));
    }

    #[test]
    fn identity_is_the_common_name_else_a_san() {
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let with_cn = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(with_cn.der()).as_deref(),
            Some("alice")
        );

        let mut params = rcgen::CertificateParams::new(vec!["svc.example".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let san_only = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_identity(san_only.der()).as_deref(),
            Some("svc.example")
        );
    }
}
