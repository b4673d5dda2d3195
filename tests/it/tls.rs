//! TLS and credentials, against real servers with certificates made by the
//! test: PostgreSQL with `ssl = on` (libpq's sslmodes on the query and the
//! replication connections), nats-server with a `tls` block, users, a token,
//! an nkey user and mutual TLS.

use crate::common::*;
use outbox_testkit::{alembic, Certs, NatsServer, PgServer};
use std::path::Path;
use std::time::Duration;

/// A migrated database on a PostgreSQL serving TLS with `certs`' server
/// certificate (for `localhost`).
async fn tls_postgres(certs: &Certs) -> (PgServer, String) {
    let (cert, key) = certs.server();
    let pg = PgServer::builder().tls(&cert, &key).start().unwrap();
    let url = pg.create_database(DB).await.unwrap();
    alembic(&url, &["upgrade", "head"]).unwrap();
    (pg, url)
}

/// `url` with `localhost` for the host and libpq's TLS parameters.
fn with_tls(pg: &PgServer, host: &str, params: &str) -> String {
    format!("postgresql://postgres@{host}:{}/{DB}?{params}", pg.port())
}

/// A nats-server started from a config file holding `config`.
fn nats_with(dir: &Path, config: &str) -> NatsServer {
    let file = dir.join(format!("nats-{}.conf", fastrand::u32(..)));
    std::fs::write(&file, config).unwrap();
    NatsServer::start_with(&["-c", file.to_str().unwrap()]).unwrap()
}

fn tls_block(certs: &Certs, verify: bool) -> String {
    let (cert, key) = certs.server();
    format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: {verify} }}\n",
        cert.display(),
        key.display(),
        certs.ca().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_publishes_with_tls_on_every_postgres_connection_and_mutual_tls_to_nats() {
    let certs = Certs::generate().unwrap();
    let (pg, _) = tls_postgres(&certs).await;
    let nats = nats_with(certs.dir(), &tls_block(&certs, true));
    let url = with_tls(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca().display()),
    );
    let (cert, key) = certs.client();
    let nats_url = format!("tls://localhost:{}", nats.port());
    let dir = tempfile::tempdir().unwrap();
    let ca = certs.ca();
    let args = [
        "run",
        "--nats-tls-ca",
        ca.to_str().unwrap(),
        "--nats-tls-cert",
        cert.to_str().unwrap(),
        "--nats-tls-key",
        key.to_str().unwrap(),
    ];
    let tailer = Tailer::spawn(&url, &nats_url, &args, dir.path());
    let db = pg.connect(DB).await.unwrap();
    wait_streaming(&db, SLOT, &tailer).await;
    insert_events(&db, "tls", 0, 50).await;
    wait_for(
        "50 events published over TLS",
        Duration::from_secs(60),
        || async {
            let (pending, published, _) = status_counts(&db).await;
            (pending == 0 && published == 50).then_some(())
        },
    )
    .await;

    // Every connection the tailer holds is TLS: the walsender and the query sessions.
    let rows = db
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'outbox-tailer'",
            &[],
        )
        .await
        .unwrap();
    let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        sessions.iter().any(|(kind, _)| kind == "walsender"),
        "{sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .filter(|(kind, _)| kind != "walsender")
            .count()
            >= 1,
        "{sessions:?}"
    );
    assert!(
        sessions.iter().all(|(_, ssl)| *ssl),
        "a plaintext session: {sessions:?}"
    );
    let output = tailer.output();
    assert!(output.contains("NATS connected"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_failures_are_one_clear_line() {
    let certs = Certs::generate().unwrap();
    let (pg, _) = tls_postgres(&certs).await;
    let cases = [
        (
            with_tls(
                &pg,
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    certs.other_ca().display()
                ),
            ),
            "not signed by a trusted CA",
        ),
        (
            with_tls(
                &pg,
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={}", certs.ca().display()),
            ),
            "does not name the host",
        ),
        (
            with_tls(&pg, "localhost", "sslmode=verify-ca"),
            "add sslrootcert=<file>",
        ),
        (
            with_tls(
                &pg,
                "localhost",
                "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            ),
            "cannot read sslrootcert /nonexistent/ca.pem",
        ),
    ];
    for (url, cause) in cases {
        let (code, output) = run_to_exit_env(
            &url,
            "nats://127.0.0.1:1",
            &["run"],
            &[("HOME", "/nonexistent")],
        );
        assert_eq!(code, 1, "{url}: {output}");
        let line = last_line(&output);
        assert!(
            line.contains(cause),
            "{url}: expected {cause:?} in {line:?}"
        );
    }
    // verify-ca does not check the name, so 127.0.0.1 is fine: `setup` completes.
    let nats = NatsServer::start().unwrap();
    let url = with_tls(
        &pg,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", certs.ca().display()),
    );
    let (code, output) = run_to_exit(&url, &nats.url(), &["setup"]);
    assert_eq!(code, 0, "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_refuses_a_plaintext_server_and_prefer_falls_back() {
    let env = Env::start().await;
    let plain = format!("postgresql://postgres@127.0.0.1:{}/{DB}", env.pg.port());
    let (code, output) = run_to_exit(
        &format!("{plain}?sslmode=require"),
        &env.nats.url(),
        &["run"],
    );
    assert_eq!(code, 1, "{output}");
    let line = last_line(&output);
    assert!(
        line.contains("does not accept TLS") && line.contains("sslmode=require"),
        "{line}"
    );
    // prefer (the default) streams in plaintext from a server without TLS.
    let db = env.db().await;
    let dir = tempfile::tempdir().unwrap();
    let tailer = Tailer::spawn(
        &format!("{plain}?sslmode=prefer"),
        &env.nats.url(),
        &["run"],
        dir.path(),
    );
    wait_streaming(&db, SLOT, &tailer).await;
    insert_events(&db, "plain", 0, 5).await;
    wait_all_published(&db, &env.js().await, STREAM, 5, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nats_credential_connects_and_wrong_ones_are_refused() {
    let certs = Certs::generate().unwrap();
    let env = Env::start().await;
    let nkey = nkeys::KeyPair::new_user();
    let seed_file = certs.dir().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", nkey.seed().unwrap())).unwrap();
    let password_file = certs.dir().join("password");
    std::fs::write(&password_file, "pa55word\n").unwrap();
    let users = format!(
        "authorization {{ users: [ {{ user: alice, password: pa55word }}, {{ nkey: {} }} ] }}\n",
        nkey.public_key()
    );
    let nats = nats_with(certs.dir(), &format!("{}{users}", tls_block(&certs, false)));
    let tls_url = format!("tls://localhost:{}", nats.port());
    let ca = certs.ca().display().to_string();
    let seed = seed_file.display().to_string();
    let password = password_file.display().to_string();
    let token_nats = nats_with(certs.dir(), "authorization { token: \"t0ken-s3cret\" }\n");
    let token_url = token_nats.url();
    let token_file = certs.dir().join("token");
    std::fs::write(&token_file, "t0ken-s3cret\n").unwrap();
    let token_file = token_file.display().to_string();
    // A well-formed .creds file (a user JWT and an nkey seed): the client
    // reads and sends it, but this server has no operator to vouch for the
    // JWT, so it refuses it. (End to end needs an operator/account JWT setup.)
    let creds_file = certs.dir().join("user.creds");
    std::fs::write(
        &creds_file,
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl",
            nkeys::KeyPair::new_user().seed().unwrap()
        ),
    )
    .unwrap();
    let creds = creds_file.display().to_string();

    // Each connects, authenticates and creates the stream (`setup` exits 0).
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let good: Vec<Case> = vec![
        (
            &tls_url,
            vec![
                "--nats-tls-ca",
                &ca,
                "--nats-user",
                "alice",
                "--nats-password",
                "pa55word",
            ],
            vec![],
        ),
        (
            &tls_url,
            vec!["--nats-tls-ca", &ca, "--nats-user", "alice"],
            vec![("NATS_PASSWORD_FILE", &password)],
        ),
        (
            &tls_url,
            vec![],
            vec![("NATS_CA", &ca), ("NATS_NKEY", &seed)],
        ),
        (&token_url, vec!["--nats-token", "t0ken-s3cret"], vec![]),
        (&token_url, vec![], vec![("NATS_TOKEN_FILE", &token_file)]),
    ];
    for (url, flags, vars) in &good {
        let args: Vec<&str> = std::iter::once("setup")
            .chain(flags.iter().copied())
            .collect();
        let (code, output) = run_to_exit_env(&env.tailer_url, url, &args, vars);
        assert_eq!(code, 0, "{flags:?} {vars:?}: {output}");
    }
    let alice_in_url = format!("tls://alice:pa55word@localhost:{}", nats.port());
    let (code, output) = run_to_exit(
        &env.tailer_url,
        &alice_in_url,
        &["setup", "--nats-tls-ca", &ca],
    );
    assert_eq!(code, 0, "credentials in the URL: {output}");

    // Refused: one line naming the cause, exit 1, no secret printed.
    let bad: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            &tls_url,
            vec![
                "--nats-tls-ca",
                &ca,
                "--nats-user",
                "alice",
                "--nats-password",
                "wr0ng-s3cret",
            ],
            "refused the credentials",
        ),
        (
            &token_url,
            vec!["--nats-token", "wr0ng-s3cret"],
            "refused the credentials",
        ),
        (
            &tls_url,
            vec!["--nats-user", "alice", "--nats-password", "pa55word"],
            "not signed by a trusted CA",
        ),
        (
            &tls_url,
            vec![
                "--nats-tls-ca",
                &ca,
                "--nats-creds",
                "/nonexistent/user.creds",
            ],
            "cannot read --nats-creds",
        ),
        (
            &tls_url,
            vec!["--nats-tls-ca", &ca, "--nats-creds", &creds],
            "refused the credentials",
        ),
    ];
    for (url, flags, cause) in &bad {
        for command in ["run", "setup"] {
            let args: Vec<&str> = std::iter::once(command)
                .chain(flags.iter().copied())
                .collect();
            let (code, output) = run_to_exit(&env.tailer_url, url, &args);
            assert_eq!(code, 1, "{flags:?}: {output}");
            let line = last_line(&output);
            assert!(
                line.contains(cause),
                "{flags:?}: expected {cause:?} in {line:?}"
            );
            assert!(!output.contains("s3cret"), "a secret was printed: {output}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let certs = Certs::generate().unwrap();
    let env = Env::start().await;
    let nats = nats_with(certs.dir(), &tls_block(&certs, true));
    let url = format!("tls://localhost:{}", nats.port());
    let ca = certs.ca().display().to_string();
    let (code, output) = run_to_exit(&env.tailer_url, &url, &["setup", "--nats-tls-ca", &ca]);
    assert_eq!(code, 1, "{output}");
    let line = last_line(&output);
    assert!(line.starts_with("outbox-tailer: NATS: TLS:"), "{line}");
    let (cert, key) = certs.client();
    let (code, output) = run_to_exit_env(
        &env.tailer_url,
        &url,
        &["setup"],
        &[
            ("NATS_CA", &ca),
            ("NATS_CERT", cert.to_str().unwrap()),
            ("NATS_KEY", key.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0, "{output}");
}

#[tokio::test]
async fn a_database_url_from_a_file_connects_and_is_never_printed() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_url = format!(
        "postgresql://postgres:db-s3cret@127.0.0.1:{}/{DB}\n",
        env.pg.port()
    );
    let file = dir.path().join("database-url");
    std::fs::write(&file, &secret_url).unwrap();
    let file = file.display().to_string();
    let (code, output) = run_to_exit_env(
        "",
        &env.nats.url(),
        &["setup"],
        &[("DATABASE_URL_FILE", &file)],
    );
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("db-s3cret"), "{output}");
    let (code, output) = run_to_exit_env(
        "",
        &env.nats.url(),
        &["setup"],
        &[("DATABASE_URL_FILE", "/nonexistent/url")],
    );
    assert_eq!(code, 2, "{output}");
    assert!(
        last_line(&output).contains("cannot read DATABASE_URL_FILE /nonexistent/url"),
        "{output}"
    );
}
