//! Start-up: what an operator must fix fails fast, with one clear line and a
//! non-zero exit, never a panic.

use crate::common::*;
use outbox_testkit::{free_port, PgServer};
use std::time::Duration;

#[tokio::test]
async fn wal_level_not_logical_is_one_clear_line() {
    let pg = PgServer::builder()
        .setting("wal_level", "replica")
        .start()
        .unwrap();
    let url = pg.create_database("chat").await.unwrap();
    let (code, output) = run_to_exit(&url, "nats://127.0.0.1:1", &["run"]);
    assert_eq!(code, 1, "{output}");
    assert!(
        last_line(&output).contains("wal_level is \"replica\""),
        "{output}"
    );
    assert!(
        last_line(&output).contains("wal_level = logical"),
        "the fix is named: {output}"
    );
}

#[tokio::test]
async fn a_malformed_database_url_is_a_usage_error() {
    for url in ["not a url", "mysql://u@h/db", "postgresql://u@h:port/db"] {
        let (code, output) = run_to_exit(url, "nats://127.0.0.1:1", &["run"]);
        assert_eq!(code, 2, "{url}: {output}");
        assert!(
            last_line(&output).contains("--database-url"),
            "{url}: {output}"
        );
        assert_eq!(output.lines().count(), 1, "one line: {output}");
    }
}

#[tokio::test]
async fn an_unreachable_database_fails_fast() {
    let port = free_port().unwrap();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/chat");
    let started = std::time::Instant::now();
    let (code, output) = run_to_exit(&url, "nats://127.0.0.1:1", &["run"]);
    assert_eq!(code, 1, "{output}");
    assert!(
        last_line(&output).contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{port}/chat"
        )),
        "{output}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn a_role_without_replication_is_named_with_the_fix() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("CREATE ROLE plain LOGIN; GRANT SELECT, UPDATE ON event_outbox TO plain")
        .await
        .unwrap();
    let url = env.pg.url_as("plain", DB);
    let (code, output) = run_to_exit(&url, &env.nats.url(), &["run"]);
    assert_eq!(code, 1, "{output}");
    assert!(
        last_line(&output).contains("role \"plain\" lacks the REPLICATION attribute"),
        "{output}"
    );
    assert!(
        last_line(&output).contains("ALTER ROLE plain REPLICATION"),
        "{output}"
    );
}

#[tokio::test]
async fn setup_creates_publication_slot_and_stream_then_exits() {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute("DROP PUBLICATION event_outbox_pub")
        .await
        .unwrap();
    let (code, output) = run_to_exit(
        &env.url,
        &env.nats.url(),
        &[
            "setup",
            "--stream",
            "CHAT",
            "--subject-prefix",
            "app.events",
        ],
    );
    assert_eq!(code, 0, "{output}");
    let publication: String = db
        .query_one("SELECT format('%s %s %s', pubinsert, pubupdate, pubdelete) FROM pg_publication WHERE pubname = 'event_outbox_pub'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publication, "t f f");
    let slot: String = db
        .query_one(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = 'event_outbox_tailer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slot, "pgoutput");
    let mut stream = env.js().await.get_stream("CHAT").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, ["app.events.>"]);
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert!(info.config.duplicate_window >= Duration::from_secs(120));
    // Setup again is a no-op, not an error.
    let (code, output) = run_to_exit(
        &env.url,
        &env.nats.url(),
        &[
            "setup",
            "--stream",
            "CHAT",
            "--subject-prefix",
            "app.events",
        ],
    );
    assert_eq!(code, 0, "{output}");
}

#[tokio::test]
async fn passwords_and_tokens_are_never_printed() {
    let port = free_port().unwrap();
    let url = format!("postgresql://app:s3cret-pw@127.0.0.1:{port}/chat");
    for format in ["text", "json"] {
        let (code, output) = run_to_exit(
            &url,
            "nats://t0ken-secret@127.0.0.1:1",
            &["run", "--log-format", format],
        );
        assert_eq!(code, 1, "{output}");
        assert!(
            !output.contains("s3cret-pw") && !output.contains("t0ken-secret"),
            "{output}"
        );
    }
    // A malformed URL is echoed redacted.
    let (code, output) = run_to_exit(
        "postgresql://app:s3cret-pw@h:notaport/db",
        "nats://127.0.0.1:1",
        &["run"],
    );
    assert_eq!(code, 2);
    assert!(
        output.contains("app:***@") && !output.contains("s3cret-pw"),
        "{output}"
    );
}
