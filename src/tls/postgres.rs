//! TLS to PostgreSQL with libpq's meaning, for the query connections
//! (tokio-postgres) and the replication stream alike.
//!
//! libpq's URL parameters `sslmode`, `sslrootcert`, `sslcert` and `sslkey`
//! are taken out of `--database-url` ([`split_tls_params`]); tokio-postgres
//! gets the rest, with `sslmode` reduced to what it knows, and a rustls
//! connector that verifies as libpq would:
//!
//! | sslmode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | always | no; the chain when `sslrootcert` is given (libpq's rule) |
//! | `verify-ca` | always | the chain, against `sslrootcert` |
//! | `verify-full` | always | the chain and the host name (or IP) |
//!
//! `sslrootcert=system` trusts the operating system's CAs. Without
//! `sslrootcert`, verify modes use `~/.postgresql/root.crt`, as libpq does.
//!
//! The replication stream negotiates TLS through the same configuration
//! (`replication::bridge`).

use super::{roots_from, system_roots, verifier, TlsError, Verify};
use rustls::ClientConfig;
use std::path::PathBuf;
use std::sync::Arc;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plaintext first; TLS-if-offered is the
            // closest safe reading.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether to
    /// insist; the connector does the verifying.
    pub(crate) fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// Where trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's store.
    System,
}

/// The TLS half of `--database-url`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PgTls {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

/// Takes libpq's TLS parameters out of a connection string (URL query or
/// `key=value` form). Returns the string for tokio-postgres, which knows
/// only `sslmode=disable|prefer|require` and no certificate files, and the
/// TLS settings. The error names the bad parameter.
pub(crate) fn split_tls_params(url: &str) -> Result<(String, PgTls), String> {
    let mut tls = PgTls::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => {
                tls.mode = SslMode::parse(&value).ok_or_else(|| {
                    format!("sslmode={value} is not one of disable, prefer, require, verify-ca, verify-full")
                })?;
            }
            "sslrootcert" if value == "system" => tls.root_cert = Some(RootCert::System),
            "sslrootcert" => tls.root_cert = Some(RootCert::File(value.into())),
            "sslcert" => tls.cert = Some(value.into()),
            "sslkey" => tls.key = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key, decode(value))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let value = value.trim_matches('\'').to_owned();
            if !take(key.trim(), value)? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("sslcert and sslkey go together: give both, or neither".into());
    }
    Ok((rest, tls))
}

/// `%2F` → `/`; a malformed escape is kept as it is.
fn decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

impl PgTls {
    fn verify(&self) -> Verify {
        match self.mode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::Require if self.root_cert.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        }
    }

    /// The rustls config for this mode: its verifier, its CAs and client
    /// certificate. Files are read here, so a missing one fails at start.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_in(std::env::var_os("HOME").map(PathBuf::from))
    }

    /// As [`PgTls::client_config`], with the home directory given.
    fn client_config_in(&self, home: Option<PathBuf>) -> Result<Arc<ClientConfig>, TlsError> {
        let verify = self.verify();
        let roots = match (verify, &self.root_cert) {
            (Verify::Nothing, _) => None,
            (_, Some(RootCert::File(path))) => Some(roots_from(path, "sslrootcert")?),
            (_, Some(RootCert::System)) => Some(system_roots()?),
            (_, None) => Some(default_root_cert(self.mode, home)?),
        };
        let builder = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier(verify, roots)?);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    super::load_certs(cert, "sslcert")?,
                    super::load_key(key, "sslkey")?,
                )
                .map_err(|e| TlsError::Config(format!("sslcert and sslkey do not fit: {e}")))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The connector for tokio-postgres.
    pub(crate) fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, TlsError> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            (*self.client_config()?).clone(),
        ))
    }
}

/// libpq's default CA file, `~/.postgresql/root.crt`.
fn default_root_cert(
    mode: SslMode,
    home: Option<PathBuf>,
) -> Result<rustls::RootCertStore, TlsError> {
    let path = home
        .map(|home| home.join(".postgresql/root.crt"))
        .filter(|path| path.exists())
        .ok_or_else(|| {
            TlsError::Config(format!(
                "sslmode={} needs the CA that signed the server's certificate: add sslrootcert=<file> (or sslrootcert=system) to --database-url",
                mode.name()
            ))
        })?;
    roots_from(&path, "sslrootcert")
}

/// Why TLS to PostgreSQL could not be set up. `Io` is the network's (retry);
/// the others need the operator.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error(transparent)]
    Config(#[from] TlsError),
    #[error("the server does not accept TLS, and sslmode={0} requires it")]
    NotOffered(&'static str),
    #[error("{0}")]
    Handshake(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_a_url() {
        let (rest, tls) = split_tls_params(
            "postgresql://u:p@db:5432/chat?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://u:p@db:5432/chat?connect_timeout=5");
        assert_eq!(
            tls,
            PgTls {
                mode: SslMode::VerifyFull,
                root_cert: Some(RootCert::File("/etc/ca.pem".into())),
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
            }
        );
        let (rest, tls) = split_tls_params("postgresql://u@db/chat").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            ("postgresql://u@db/chat", PgTls::default())
        );
        let (_, tls) =
            split_tls_params("postgresql://u@db/chat?sslrootcert=system&sslmode=verify-ca")
                .unwrap();
        assert_eq!(tls.root_cert, Some(RootCert::System));
    }

    #[test]
    fn and_out_of_key_value_strings() {
        let (rest, tls) =
            split_tls_params("host=db user=u sslmode=require sslrootcert='/ca.pem' dbname=chat")
                .unwrap();
        assert_eq!(rest, "host=db user=u dbname=chat");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(
            tls.verify(),
            Verify::Chain,
            "require with a CA verifies it, as libpq does"
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        let error = split_tls_params("postgresql://u@db/chat?sslmode=verify").unwrap_err();
        assert!(error.contains("sslmode=verify is not one of"), "{error}");
        let error = split_tls_params("postgresql://u@db/chat?sslcert=/c.pem").unwrap_err();
        assert!(error.contains("sslcert and sslkey"), "{error}");
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_and_the_verifier_do() {
        use tokio_postgres::config::SslMode as Tp;
        let cases = [
            (SslMode::Disable, Tp::Disable, Verify::Nothing),
            (SslMode::Prefer, Tp::Prefer, Verify::Nothing),
            (SslMode::Require, Tp::Require, Verify::Nothing),
            (SslMode::VerifyCa, Tp::Require, Verify::Chain),
            (SslMode::VerifyFull, Tp::Require, Verify::Full),
        ];
        for (mode, tokio_postgres, verify) in cases {
            let tls = PgTls {
                mode,
                ..PgTls::default()
            };
            assert_eq!(mode.for_tokio_postgres(), tokio_postgres, "{mode:?}");
            assert_eq!(tls.verify(), verify, "{mode:?}");
        }
    }

    #[test]
    fn a_verify_mode_without_a_ca_says_how_to_give_one() {
        let tls = PgTls {
            mode: SslMode::VerifyFull,
            ..PgTls::default()
        };
        let error = tls
            .client_config_in(Some("/nonexistent".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("add sslrootcert=<file>"), "{error}");
    }
}
