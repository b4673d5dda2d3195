//! The servers of a multi-host `--database-url` (libpq's
//! `postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write`), one at a
//! time.
//!
//! tokio-postgres accepts such a URL and connects to the first server that
//! suits `target_session_attrs`, but it does not say which one it picked, and
//! the replication stream (pgwire-replication) takes one host. The stream
//! must reach the server whose slot the query connection checked, so the
//! tailer tries the servers itself, in the URL's order, each with a config
//! naming that server alone, and opens the stream to the one that accepted.

use std::fmt;
use std::net::IpAddr;
use tokio_postgres::config::Host;

/// One server of the URL: where to connect, and the name TLS verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) host: Host,
    /// libpq's `hostaddr`: the address to dial instead of resolving `host`.
    pub(crate) hostaddr: Option<IpAddr>,
    pub(crate) port: u16,
}

impl Endpoint {
    /// The TCP host to dial: `hostaddr` when given, else the host name.
    /// None for a Unix socket directory.
    pub(crate) fn dial(&self) -> Option<String> {
        match (&self.hostaddr, &self.host) {
            (Some(addr), _) => Some(addr.to_string()),
            (None, Host::Tcp(host)) => Some(host.clone()),
            (None, Host::Unix(_)) => None,
        }
    }

    /// The host name TLS verifies (libpq's rule: `host`, not `hostaddr`).
    pub(crate) fn tls_name(&self) -> Option<&str> {
        match &self.host {
            Host::Tcp(host) => Some(host),
            Host::Unix(_) => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Tcp(host) if host.contains(':') => write!(f, "[{host}]:{}", self.port),
            Host::Tcp(host) => write!(f, "{host}:{}", self.port),
            Host::Unix(dir) => write!(f, "{}:{}", dir.display(), self.port),
        }
    }
}

/// The URL's servers in its order, paired as libpq pairs them: one port for
/// all, or one per host; `hostaddr`, when given, one per host.
pub(crate) fn endpoints(config: &tokio_postgres::Config) -> Vec<Endpoint> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    (0..count)
        .map(|i| {
            let hostaddr = addrs.get(i).copied();
            let host = match (hosts.get(i), hostaddr) {
                (Some(host), _) => host.clone(),
                (None, Some(addr)) => Host::Tcp(addr.to_string()),
                (None, None) => Host::Tcp("localhost".into()),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            Endpoint {
                host,
                hostaddr,
                port,
            }
        })
        .collect()
}

/// `config` with `endpoint` as its only server; every other setting kept
/// (`target_session_attrs` included: tokio-postgres still refuses a
/// read-only server).
pub(crate) fn only(config: &tokio_postgres::Config, endpoint: &Endpoint) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    match &endpoint.host {
        Host::Tcp(host) => one.host(host),
        Host::Unix(dir) => one.host_path(dir),
    };
    if let Some(addr) = endpoint.hostaddr {
        one.hostaddr(addr);
    }
    one.port(endpoint.port)
        .ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle())
        .target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    if let Some(timeout) = config.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*timeout);
    }
    if let Some(interval) = config.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one
}

/// `h1:p1,h2:p2`, for messages.
pub(crate) fn list(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(Endpoint::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn parse(url: &str) -> tokio_postgres::Config {
        tokio_postgres::Config::from_str(url).unwrap()
    }

    #[test]
    fn one_port_serves_every_host_or_each_has_its_own() {
        let shared = endpoints(&parse("host=a,b port=6000 user=u"));
        let names: Vec<String> = shared.iter().map(Endpoint::to_string).collect();
        assert_eq!(names, ["a:6000", "b:6000"]);
        let url = endpoints(&parse("postgresql://u@a,b:6000/db"));
        assert_eq!(
            list(&url),
            "a:5432,b:6000",
            "in a URL a host without a port has 5432"
        );
        let each = endpoints(&parse("postgresql://u@a:5433,b:5434/db"));
        assert_eq!(list(&each), "a:5433,b:5434");
        let default = endpoints(&parse("postgresql://u@db/chat"));
        assert_eq!(list(&default), "db:5432");
    }

    #[test]
    fn hostaddr_is_dialled_and_host_is_verified() {
        let config = parse("host=db1,db2 hostaddr=10.0.0.1,10.0.0.2 port=5432 user=u");
        let both = endpoints(&config);
        assert_eq!(both[1].dial().as_deref(), Some("10.0.0.2"));
        assert_eq!(both[1].tls_name(), Some("db2"));
        let unix = endpoints(&parse("host=/run/postgresql user=u"));
        assert_eq!(unix[0].dial(), None);
        assert_eq!(unix[0].tls_name(), None);
    }

    #[test]
    fn one_server_keeps_every_other_setting() {
        let url = "postgresql://u:secret@a:5433,b:5434/chat?target_session_attrs=read-write\
                   &connect_timeout=7&keepalives_idle=30&application_name=x&options=-c%20a%3Db\
                   &tcp_user_timeout=9&sslmode=require&channel_binding=disable";
        let config = parse(url);
        let second = &endpoints(&config)[1];
        let one = only(&config, second);
        assert_eq!(
            one,
            parse(
                "postgresql://u:secret@b:5434/chat?target_session_attrs=read-write\
                 &connect_timeout=7&keepalives_idle=30&application_name=x&options=-c%20a%3Db\
                 &tcp_user_timeout=9&sslmode=require&channel_binding=disable"
            ),
            "only the servers differ"
        );
        assert_eq!(endpoints(&one), std::slice::from_ref(second));
    }
}
