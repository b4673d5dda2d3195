//! The test harness itself: throwaway servers start on free loopback ports
//! (never the machine's own 5432/4222), survive a restart with their data, and
//! are gone after drop.

use outbox_testkit::{NatsServer, PgServer, StopMode};
use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

#[tokio::test]
async fn postgres_is_logical_restartable_and_gone_after_drop() {
    let mut pg = PgServer::start().expect("start postgres");
    let port = pg.port();
    assert_ne!(port, 5432, "must never be the machine's own PostgreSQL");

    let client = pg.connect("postgres").await.unwrap();
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "logical");
    let server_port: String = client.query_one("SHOW port", &[]).await.unwrap().get(0);
    assert_eq!(server_port, port.to_string());
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();
    drop(client);

    for mode in [StopMode::Fast, StopMode::Immediate] {
        pg.stop(mode);
        assert!(!pg.is_running());
        assert!(
            pg.connect("postgres").await.is_err(),
            "stopped server must refuse connections"
        );
        pg.start_again().expect("start again");
        assert_eq!(pg.port(), port, "a restart keeps the port");
        let client = pg.connect("postgres").await.unwrap();
        let v: i32 = client
            .query_one("SELECT v FROM kept", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 42, "a restart keeps the data ({mode:?})");
    }

    drop(pg);
    assert!(!listening(port), "the server must be gone after drop");
}

#[test]
fn nats_has_jetstream_restarts_on_its_port_and_is_gone_after_drop() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let port = nats.port();
    assert_ne!(port, 4222, "must never be the machine's own NATS");

    let info = |port: u16| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let greeting = info(port);
    assert!(greeting.starts_with("INFO "), "{greeting}");
    assert!(
        greeting.contains(r#""jetstream":true"#),
        "JetStream must be on: {greeting}"
    );

    nats.stop(true);
    assert!(!listening(port));
    nats.start_again().expect("start again");
    assert_eq!(nats.port(), port);
    assert!(info(port).contains(r#""jetstream":true"#));

    drop(nats);
    assert!(!listening(port), "the server must be gone after drop");
}

#[test]
fn a_panicking_test_still_stops_its_servers() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let pg = PgServer::start().expect("start postgres");
        let nats = NatsServer::start().expect("start nats");
        tx.send((pg.port(), nats.port())).unwrap();
        panic!("a test fails with servers up");
    });
    assert!(result.is_err());
    let (pg_port, nats_port) = rx.recv().unwrap();
    assert!(!listening(pg_port) && !listening(nats_port));
}
