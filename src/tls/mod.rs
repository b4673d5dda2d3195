//! TLS for both servers on one rustls crypto provider (ring) for the whole
//! process: PEM files, certificate verifiers, and readable handshake errors.
//! PostgreSQL's libpq modes live in [`postgres`]; NATS's TLS is async-nats's,
//! configured in `publish::jetstream` on the same provider.

pub(crate) mod postgres;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Installs ring as the process's rustls provider. Call once at the top of
/// `main`, before any TLS config is built; later calls change nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The provider every config of the process is built on.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A TLS setting that cannot work; the message names the file or flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {kind}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{0}")]
    Config(String),
}

/// Every PEM certificate in `path` (a CA bundle or a client certificate chain).
pub(crate) fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// The first PEM private key in `path` (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn load_key(
    path: &Path,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|_| TlsError::Empty {
        what,
        path: path.to_owned(),
        kind: "private key",
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// A root store of the CAs in `path`.
pub(crate) fn roots_from(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_certs(path, what)?);
    if added == 0 {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            kind: "CA certificate rustls can use",
        });
    }
    Ok(roots)
}

/// The operating system's trusted CAs.
pub(crate) fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsError::Config(
            "no system CA certificates found (install ca-certificates, or name a CA file)".into(),
        ));
    }
    Ok(roots)
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing (libpq's `prefer` and `require`): encryption without
    /// authentication. The handshake's signatures are still checked.
    Nothing,
    /// The chain up to a trusted CA, any host name (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    Full,
}

/// The verifier for `verify`, trusting `roots` (unused for `Nothing`).
pub(crate) fn verifier(
    verify: Verify,
    roots: Option<RootCertStore>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let provider = provider();
    let webpki = |roots: Option<RootCertStore>| {
        let roots = roots.ok_or_else(|| TlsError::Config("no CA to verify against".into()))?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("cannot build a certificate verifier: {e}")))
    };
    Ok(match verify {
        Verify::Nothing => Arc::new(AnyCertificate(provider.clone())),
        Verify::Chain => Arc::new(ChainOnly(webpki(roots)?)),
        Verify::Full => webpki(roots)?,
    })
}

/// Accepts any certificate (and so any server): what libpq's `require` does.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks the chain, not the host name: libpq's `verify-ca`.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A handshake failure in words an operator can act on, when `error` (or
/// one of its sources) is a rustls error; `None` otherwise.
pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        // io::Error's source() skips the error it wraps: look inside.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(tls) = wrapped.and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            return Some(describe_rustls(tls));
        }
        current = e.source();
    }
    None
}

fn describe_rustls(error: &rustls::Error) -> String {
    use CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer | C::BadSignature => format!(
                "the server's certificate is not signed by a trusted CA ({error}): check the CA file"
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the server's certificate does not name the host connected to ({error}): connect by a name the certificate lists, or verify the CA only"
            ),
            C::Expired | C::ExpiredContext { .. } => {
                format!("the server's certificate has expired ({error})")
            }
            _ => format!("the server's certificate was refused ({error})"),
        },
        rustls::Error::AlertReceived(alert) => format!(
            "the server refused the handshake ({alert:?}): it may require a client certificate, or not trust ours"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_name_the_fix() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let text = describe(&io).unwrap();
        assert!(text.contains("not signed by a trusted CA"), "{text}");
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert!(describe(&name).unwrap().contains("does not name the host"));
        let plain = std::io::Error::other("connection refused");
        assert_eq!(describe(&plain), None);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let missing = load_certs(Path::new("/nonexistent/ca.pem"), "--nats-tls-ca").unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("--nats-tls-ca /nonexistent/ca.pem"),
            "{missing}"
        );
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        assert!(matches!(
            load_certs(&empty, "sslrootcert"),
            Err(TlsError::Empty { .. })
        ));
        assert!(matches!(
            load_key(&empty, "sslkey"),
            Err(TlsError::Empty { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
