//! The operations endpoints on `--metrics-addr`: `GET /metrics` (Prometheus
//! text), `GET /healthz` (200 while the process runs), `GET /readyz` (200
//! `active` or `standby` while the instance can do its part, else 503).

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

/// Binds `addr` (failing at once if it cannot) and serves in the background.
pub(crate) async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(metrics)).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    readiness(&Readiness {
        active: metrics.tailer_active.get() == 1,
        standby: metrics.tailer_standby.get() == 1 && answered_lately(&metrics),
        nats: metrics.nats_connected.get() == 1,
        limited: metrics.stream_limit_reached.get() == 1,
    })
}

/// A standby's last "slot in use" answer counts this long: a few of its
/// attempts (one every 2 s, each bounded by the connect timeout), so a
/// standby whose PostgreSQL stops answering is not ready for long.
const STANDBY_ANSWER_FRESH: Duration = Duration::from_secs(20);

fn answered_lately(metrics: &Metrics) -> bool {
    metrics
        .standby_answered
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|at| at.elapsed() < STANDBY_ANSWER_FRESH)
}

/// What /readyz reads: the instance's role and the state of its servers.
#[derive(Debug, Clone, Copy, Default)]
struct Readiness {
    /// Streams from the slot.
    active: bool,
    /// Another instance holds the slot, and PostgreSQL answered this one.
    standby: bool,
    nats: bool,
    /// Publishing stalls on a stream limit.
    limited: bool,
}

/// The answer to /readyz (contract section 4): 200 `active` or `standby`
/// while the instance can do its part, 503 with the reasons otherwise. A
/// standby is ready, so two replicas are both Ready and a rolling update
/// proceeds; an active instance that cannot publish is not.
fn readiness(state: &Readiness) -> (StatusCode, String) {
    let Readiness {
        active,
        standby,
        nats,
        limited,
    } = *state;
    if active && nats && !limited {
        return (StatusCode::OK, "active\n".to_owned());
    }
    if standby && !active && nats {
        return (StatusCode::OK, "standby\n".to_owned());
    }
    let mut body = String::from("not ready\n");
    if !active && !standby {
        body.push_str("replication: not streaming, and not standing by (PostgreSQL unreachable, or the session is starting)\n");
    }
    if !nats {
        body.push_str("nats: disconnected\n");
    }
    if active && limited {
        body.push_str("stream at a limit (full, or storage exhausted): publishing stalls until it is lifted\n");
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// `outbox-tailer healthcheck`: `GET /healthz` on `metrics_addr` (a wildcard
/// address is asked on loopback) answers 200 within 3 s. Plain std, no
/// runtime: it runs every few seconds in the container.
pub fn healthcheck(metrics_addr: &str) -> Result<(), String> {
    let addr: SocketAddr = metrics_addr
        .parse()
        .map_err(|_| format!("--metrics-addr {metrics_addr:?} is not a socket address"))?;
    let target = SocketAddr::new(loopback_for(addr.ip()), addr.port());
    let timeout = Duration::from_secs(3);
    let fail = |e: std::io::Error| format!("no answer from http://{target}/healthz: {e}");
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(fail)?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).map_err(fail)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => Err(format!(
            "http://{target}/healthz answered {}",
            other.unwrap_or("nothing")
        )),
    }
}

/// Where to reach a server that listens on `ip`: the wildcard is reached on loopback.
fn loopback_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wildcard_is_asked_on_loopback() {
        assert_eq!(
            loopback_for("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            loopback_for("::".parse().unwrap()),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(
            loopback_for("10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn readiness_is_by_role() {
        let ok = |state| {
            let (status, body) = readiness(&state);
            (status == StatusCode::OK).then_some(body)
        };
        let all = Readiness {
            active: true,
            standby: false,
            nats: true,
            limited: false,
        };
        assert_eq!(ok(all).as_deref(), Some("active\n"));
        let standby = Readiness {
            active: false,
            standby: true,
            ..all
        };
        assert_eq!(ok(standby).as_deref(), Some("standby\n"));
        // Each missing part makes it not ready, and the body says which.
        for (state, says) in [
            (Readiness { nats: false, ..all }, "nats: disconnected"),
            (
                Readiness {
                    nats: false,
                    ..standby
                },
                "nats: disconnected",
            ),
            (
                Readiness {
                    limited: true,
                    ..all
                },
                "stream at a limit",
            ),
            (Readiness::default(), "not streaming, and not standing by"),
        ] {
            let (status, body) = readiness(&state);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{state:?}");
            assert!(body.contains(says), "{state:?}: {body}");
        }
        // A standby whose stream is at a limit stays ready: the limit is
        // the active instance's to report.
        assert_eq!(
            ok(Readiness {
                limited: true,
                ..standby
            })
            .as_deref(),
            Some("standby\n")
        );
    }

    #[test]
    fn nothing_listening_is_one_line() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = healthcheck(&format!("127.0.0.1:{port}")).unwrap_err();
        assert!(
            error.starts_with(&format!("no answer from http://127.0.0.1:{port}/healthz")),
            "{error}"
        );
        assert!(healthcheck("nowhere")
            .unwrap_err()
            .contains("not a socket address"));
    }
}
