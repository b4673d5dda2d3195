//! NATS settings: the seed servers of `--nats-url`, one credential (from
//! the flags, a file, or the URL's userinfo, which the client would ignore)
//! and TLS.

use super::flags::Options;
use super::redact::redact_url;
use super::{secret, ConfigError};
use std::fmt;
use std::path::PathBuf;

/// How the tailer authenticates to NATS. Its `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum NatsAuth {
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file: the user's JWT and nkey seed.
    Creds(PathBuf),
    /// A file holding an nkey seed.
    Nkey(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::Creds(path) => write!(f, "Creds({})", path.display()),
            NatsAuth::Nkey(path) => write!(f, "Nkey({})", path.display()),
        }
    }
}

/// TLS to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NatsTls {
    /// A `tls://` URL or any TLS flag: plaintext is refused.
    pub(crate) required: bool,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

/// Servers and credentials from `--nats-url` and the `--nats-*` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatsConfig {
    /// Seed URLs without credentials (the client ignores embedded ones).
    pub(crate) servers: Vec<String>,
    pub(crate) auth: NatsAuth,
    pub(crate) tls: NatsTls,
}

/// Servers and credentials from `--nats-url` and the `--nats-*` flags,
/// reading the URL once: each of its comma-separated servers must be
/// `[nats|tls|ws|wss://][credentials@]host:port`.
pub(super) fn nats_config(
    options: &Options,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<NatsConfig, ConfigError> {
    let password = secret(options.nats_password.clone(), "NATS_PASSWORD_FILE", env)?;
    let token = secret(options.nats_token.clone(), "NATS_TOKEN_FILE", env)?;
    let mut given = Vec::new();
    let mut auth = NatsAuth::None;
    if options.nats_user.is_some() || password.is_some() {
        given.push("user/password");
        auth = NatsAuth::UserPassword {
            user: options.nats_user.clone().unwrap_or_default(),
            password: password.unwrap_or_default(),
        };
    }
    if let Some(token) = token {
        given.push("token");
        auth = NatsAuth::Token(token);
    }
    if let Some(path) = &options.nats_creds {
        given.push("creds");
        auth = NatsAuth::Creds(path.clone());
    }
    if let Some(path) = &options.nats_nkey {
        given.push("nkey");
        auth = NatsAuth::Nkey(path.clone());
    }
    if given.len() > 1 {
        return Err(ConfigError::NatsCredentials(given.join(", ")));
    }
    let malformed = || ConfigError::MalformedNatsUrl {
        url: redact_url(&options.nats_url),
    };
    let mut servers = Vec::new();
    let mut tls_url = false;
    for server in options.nats_url.split(',').map(str::trim) {
        let (scheme, rest) = server.split_once("://").unwrap_or(("nats", server));
        if !["nats", "tls", "ws", "wss"].contains(&scheme) {
            return Err(malformed());
        }
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, rest),
        };
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(malformed());
        }
        if given.is_empty() {
            match userinfo.map(|u| u.split_once(':')) {
                Some(Some((user, password))) => {
                    auth = NatsAuth::UserPassword {
                        user: user.to_owned(),
                        password: password.to_owned(),
                    }
                }
                Some(None) => auth = NatsAuth::Token(userinfo.unwrap_or_default().to_owned()),
                None => {}
            }
        }
        tls_url |= scheme == "tls";
        servers.push(format!("{scheme}://{host}"));
    }
    let client_cert = match (&options.nats_tls_cert, &options.nats_tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => return Err(ConfigError::NatsClientCert),
    };
    let tls = NatsTls {
        required: tls_url || options.nats_tls_ca.is_some() || client_cert.is_some(),
        ca: options.nats_tls_ca.clone(),
        client_cert,
    };
    Ok(NatsConfig { servers, auth, tls })
}
