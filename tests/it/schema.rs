//! The schema: `alembic upgrade head` creates exactly the contract (section 1),
//! every downgrade does what it says and spares `messages`, `sql/schema.sql`
//! is the same schema, `sql/roles.sql` is least privilege, and the contract's
//! queries use their indexes.

use outbox_testkit::{alembic, repo_root, PgServer};
use std::process::Command;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

const HEAD: &[&str] = &["upgrade", "head"];

/// (column, type, nullable, default) for each column of `table`, in order.
async fn columns(db: &Client, table: &str) -> Vec<(String, String, bool, Option<String>)> {
    db.query(
        "SELECT column_name::text, data_type::text, is_nullable = 'YES', column_default::text \
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 \
         ORDER BY ordinal_position",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn col(
    name: &str,
    ty: &str,
    nullable: bool,
    default: Option<&str>,
) -> (String, String, bool, Option<String>) {
    (name.into(), ty.into(), nullable, default.map(Into::into))
}

async fn strings(db: &Client, sql: &str) -> Vec<String> {
    strings_with(db, sql, &[]).await
}

async fn strings_with(db: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<String> {
    db.query(sql, params)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn tables(db: &Client) -> Vec<String> {
    strings(
        db,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .await
}

async fn indexes(db: &Client, table: &str) -> Vec<String> {
    db.query(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1 ORDER BY indexname",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn publications(db: &Client) -> Vec<String> {
    strings(
        db,
        "SELECT format('%s ins=%s upd=%s del=%s trunc=%s tables=%s', p.pubname, p.pubinsert, p.pubupdate, \
         p.pubdelete, p.pubtruncate, (SELECT string_agg(tablename, ',') FROM pg_publication_tables t \
         WHERE t.pubname = p.pubname)) FROM pg_publication p ORDER BY 1",
    )
    .await
}

/// Asserts the whole contract schema is there, exactly.
async fn assert_contract_schema(db: &Client) {
    assert_eq!(
        tables(db).await,
        ["alembic_version", "event_logs", "event_outbox", "messages"]
    );

    let ts = "timestamp with time zone";
    assert_eq!(
        columns(db, "messages").await,
        vec![
            col("id", "uuid", false, Some("gen_random_uuid()")),
            col("project_id", "uuid", false, None),
            col("user_id", "uuid", false, None),
            col("role", "text", false, None),
            col("content", "text", false, None),
            col("created_at", ts, false, Some("now()")),
        ]
    );
    assert_eq!(
        columns(db, "event_outbox").await,
        vec![
            col("id", "uuid", false, Some("gen_random_uuid()")),
            col("aggregate_type", "text", false, None),
            col("aggregate_id", "text", false, None),
            col("user_id", "uuid", true, None),
            col("project_id", "uuid", true, None),
            col("event_type", "text", false, None),
            col("payload", "jsonb", false, None),
            col("status", "text", false, Some("'pending'::text")),
            col("retry_count", "integer", false, Some("0")),
            col("next_retry_at", ts, false, Some("now()")),
            col("created_at", ts, false, Some("now()")),
            col("published_at", ts, true, None),
            col("last_error", "text", true, None),
            col("headers", "jsonb", true, None),
        ]
    );
    assert_eq!(
        columns(db, "event_logs").await,
        vec![
            col("event_id", "uuid", false, None),
            col("aggregate_type", "text", false, None),
            col("aggregate_id", "text", false, None),
            col("user_id", "uuid", true, None),
            col("project_id", "uuid", true, None),
            col("event_type", "text", false, None),
            col("payload", "jsonb", false, None),
            col("created_at", ts, false, None),
            col("published_at", ts, false, None),
        ]
    );

    assert_eq!(
        indexes(db, "event_outbox").await,
        [
            "CREATE UNIQUE INDEX event_outbox_pkey ON public.event_outbox USING btree (id)",
            "CREATE INDEX ix_event_outbox_aggregate_id_created_at ON public.event_outbox USING btree (aggregate_id, created_at)",
            "CREATE INDEX ix_event_outbox_created_at_id ON public.event_outbox USING btree (created_at, id) WHERE (status = 'published'::text)",
            "CREATE INDEX ix_event_outbox_project_id_created_at ON public.event_outbox USING btree (project_id, created_at)",
            "CREATE INDEX ix_event_outbox_published_at ON public.event_outbox USING btree (published_at) WHERE (status = 'published'::text)",
            "CREATE INDEX ix_event_outbox_status_next_retry_at_created_at ON public.event_outbox USING btree (status, next_retry_at, created_at)",
            "CREATE INDEX ix_event_outbox_user_id_created_at ON public.event_outbox USING btree (user_id, created_at)",
        ]
    );
    assert_eq!(
        indexes(db, "event_logs").await,
        [
            "CREATE UNIQUE INDEX event_logs_pkey ON public.event_logs USING btree (event_id)",
            "CREATE INDEX ix_event_logs_aggregate_id_created_at ON public.event_logs USING btree (aggregate_id, created_at)",
            "CREATE INDEX ix_event_logs_project_id_created_at ON public.event_logs USING btree (project_id, created_at)",
            "CREATE INDEX ix_event_logs_user_id_created_at ON public.event_logs USING btree (user_id, created_at)",
        ]
    );
    assert_eq!(
        indexes(db, "messages").await,
        ["CREATE UNIQUE INDEX messages_pkey ON public.messages USING btree (id)"]
    );

    let checks = strings(
        db,
        "SELECT conname || ': ' || pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = 'event_outbox'::regclass AND contype = 'c' AND convalidated ORDER BY conname",
    )
    .await;
    assert_eq!(
        checks,
        [
            "ck_event_outbox_headers: CHECK (((headers IS NULL) OR ((jsonb_typeof(headers) = 'object'::text) AND (NOT jsonb_path_exists(headers, '$.*?(@.type() != \"string\")'::jsonpath)))))",
            "ck_event_outbox_status: CHECK ((status = ANY (ARRAY['pending'::text, 'published'::text, 'failed'::text])))",
        ]
    );
    // The headers' shape bites too: an object of strings, or nothing.
    for (headers, ok) in [
        ("NULL", true),
        ("'{}'", true),
        (r#"'{"tenant": "acme"}'"#, true),
        (r#"'{"n": 1}'"#, false),
        (r#"'["a"]'"#, false),
        ("'\"a\"'", false),
    ] {
        let inserted = db
            .execute(
                &format!(
                    "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
                     VALUES ('chat', 'c', 'x', '{{}}', {headers})"
                ),
                &[],
            )
            .await;
        assert_eq!(inserted.is_ok(), ok, "headers {headers}: {inserted:?}");
    }
    db.batch_execute("DELETE FROM event_outbox").await.unwrap();
    // The check really bites.
    let bad = db
        .execute(
            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status) \
             VALUES ('chat', 'c', 'x', '{}', 'sent')",
            &[],
        )
        .await;
    assert_eq!(
        bad.unwrap_err().code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );

    assert_eq!(
        publications(db).await,
        ["event_outbox_pub ins=t upd=f del=f trunc=f tables=event_outbox"]
    );
}

/// A fresh database on a fresh server.
async fn fresh(name: &str) -> (PgServer, String, Client) {
    let pg = PgServer::start().expect("start postgres");
    let url = pg.create_database(name).await.unwrap();
    let db = pg.connect(name).await.unwrap();
    (pg, url, db)
}

/// Every column of every message, in a fixed order, as text.
async fn message_rows(db: &Client) -> Vec<String> {
    strings(db, "SELECT m::text FROM messages m ORDER BY id").await
}

#[tokio::test]
async fn upgrade_head_creates_exactly_the_contract() {
    let (_pg, url, db) = fresh("chat").await;
    alembic(&url, HEAD).unwrap();
    assert_contract_schema(&db).await;
    let version = strings(&db, "SELECT version_num::text FROM alembic_version").await;
    assert_eq!(version, ["0006_outbox_republish_index"]);
}

#[tokio::test]
async fn downgrades_drop_only_their_own_objects_and_keep_messages() {
    let (_pg, url, db) = fresh("chat").await;
    alembic(&url, HEAD).unwrap();
    db.batch_execute(
        "INSERT INTO messages (project_id, user_id, role, content) \
           SELECT gen_random_uuid(), gen_random_uuid(), 'user', 'message ' || i FROM generate_series(1, 500) i; \
         INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
           SELECT 'chat', id::text, 'message.created', jsonb_build_object('id', id) FROM messages; \
         INSERT INTO event_logs (event_id, aggregate_type, aggregate_id, event_type, payload, created_at, published_at) \
           SELECT id, aggregate_type, aggregate_id, event_type, payload, created_at, now() FROM event_outbox",
    )
    .await
    .unwrap();
    let before = message_rows(&db).await;
    assert_eq!(before.len(), 500);

    // -1 from head: only republish's index goes.
    alembic(&url, &["downgrade", "-1"]).unwrap();
    assert_eq!(indexes(&db, "event_outbox").await.len(), 6);
    assert!(!indexes(&db, "event_outbox")
        .await
        .iter()
        .any(|index| index.contains("ix_event_outbox_created_at_id")));

    // Then only the headers column goes (its data with it).
    alembic(&url, &["downgrade", "-1"]).unwrap();
    assert!(!columns(&db, "event_outbox")
        .await
        .iter()
        .any(|(name, ..)| name == "headers"));
    assert_eq!(message_rows(&db).await, before);

    // Then only the retention index goes.
    alembic(&url, &["downgrade", "-1"]).unwrap();
    assert_eq!(indexes(&db, "event_outbox").await.len(), 5);
    assert_eq!(indexes(&db, "event_logs").await.len(), 4);

    // Then event_logs: only it and its indexes go.
    alembic(&url, &["downgrade", "-1"]).unwrap();
    assert_eq!(
        tables(&db).await,
        ["alembic_version", "event_outbox", "messages"]
    );
    assert_eq!(indexes(&db, "event_logs").await, Vec::<String>::new());
    assert_eq!(indexes(&db, "event_outbox").await.len(), 5);
    assert_eq!(publications(&db).await.len(), 1);
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 500, "dropping event_logs leaves the outbox alone");
    assert_eq!(message_rows(&db).await, before);

    // To the base revision: the outbox, its indexes and the publication go.
    alembic(&url, &["downgrade", "0001_messages"]).unwrap();
    assert_eq!(tables(&db).await, ["alembic_version", "messages"]);
    assert_eq!(indexes(&db, "event_outbox").await, Vec::<String>::new());
    assert_eq!(publications(&db).await, Vec::<String>::new());
    assert_eq!(
        message_rows(&db).await,
        before,
        "every messages row is as it was"
    );

    // And back up: the full contract again, the messages untouched.
    alembic(&url, HEAD).unwrap();
    assert_contract_schema(&db).await;
    assert_eq!(message_rows(&db).await, before);

    // Only the base revision's own downgrade drops messages.
    alembic(&url, &["downgrade", "base"]).unwrap();
    assert_eq!(tables(&db).await, ["alembic_version"]);
}

/// `pg_dump --schema-only` of a database, without Alembic's bookkeeping.
fn dump(pg: &PgServer, url: &str) -> String {
    let output = Command::new(pg.bin("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--exclude-table=alembic_version",
            url,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // pg_dump brackets its output with a random \restrict key: not schema.
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("\\restrict") && !line.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn psql_file(pg: &PgServer, url: &str, file: &str) {
    let output = Command::new(pg.bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
        .arg(repo_root().join(file))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn sql_schema_is_the_same_schema_as_alembic_head() {
    let pg = PgServer::start().unwrap();
    let by_alembic = pg.create_database("by_alembic").await.unwrap();
    let by_sql = pg.create_database("by_sql").await.unwrap();
    alembic(&by_alembic, HEAD).unwrap();
    psql_file(&pg, &by_sql, "sql/schema.sql");

    let (a, b) = (dump(&pg, &by_alembic), dump(&pg, &by_sql));
    assert!(
        a.contains("CREATE TABLE public.event_outbox"),
        "the dump must hold the schema:\n{a}"
    );
    assert!(
        a.contains("CREATE PUBLICATION event_outbox_pub"),
        "the dump must hold the publication:\n{a}"
    );
    if a != b {
        let diff: Vec<String> = a
            .lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .take(10)
            .map(|(x, y)| format!("alembic: {x}\n    sql: {y}"))
            .collect();
        panic!(
            "sql/schema.sql differs from alembic head:\n{}",
            diff.join("\n")
        );
    }
}

#[tokio::test]
async fn roles_sql_grants_the_tailer_only_what_it_needs() {
    let (pg, url, admin) = fresh("chat").await;
    psql_file(&pg, &url, "sql/schema.sql");
    psql_file(&pg, &url, "sql/roles.sql");
    psql_file(&pg, &url, "sql/roles.sql"); // idempotent

    let attrs = strings(&admin, "SELECT format('%s %s %s', rolcanlogin, rolreplication, rolsuper) FROM pg_roles WHERE rolname = 'outbox_tailer'").await;
    assert_eq!(attrs, ["t t f"]);
    admin
        .batch_execute("INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('chat', 'c1', 'message.created', '{}')")
        .await
        .unwrap();

    let (tailer, connection) =
        tokio_postgres::connect(&pg.url_as("outbox_tailer", "chat"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let allowed = [
        "SELECT id, payload, status FROM event_outbox",
        "UPDATE event_outbox SET status = 'published', published_at = now(), retry_count = retry_count + 1, \
         next_retry_at = now(), last_error = 'x' WHERE aggregate_id = 'c1'",
        "INSERT INTO event_logs (event_id, aggregate_type, aggregate_id, event_type, payload, created_at, published_at) \
         SELECT id, aggregate_type, aggregate_id, event_type, payload, created_at, published_at FROM event_outbox \
         ON CONFLICT DO NOTHING",
        "SELECT count(*) FROM event_logs",
        "SELECT pg_current_wal_lsn()",
        "SELECT outbox_prune(interval '1 day', 100)",
    ];
    for sql in allowed {
        tailer
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let denied = [
        "SELECT * FROM messages",
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', 'b', 'c', '{}')",
        "UPDATE event_outbox SET payload = '{}'",
        "DELETE FROM event_outbox",
        "DELETE FROM event_logs",
        "UPDATE event_logs SET payload = '{}'",
        "TRUNCATE event_outbox",
    ];
    for sql in denied {
        let error = tailer.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {error}"
        );
    }
}

/// The plan of `sql`, as text.
async fn plan(db: &Client, sql: &str) -> String {
    plan_with(db, "EXPLAIN", sql, &[]).await
}

/// The plan of `sql` with `params`, as text; `explain` is `EXPLAIN`, or
/// `EXPLAIN ANALYZE` (which runs it and says what each node read).
async fn plan_with(
    db: &Client,
    explain: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> String {
    strings_with(db, &format!("{explain} {sql}"), params)
        .await
        .join("\n")
}

#[tokio::test]
async fn contract_queries_use_their_indexes_on_a_realistic_table() {
    let (_pg, url, db) = fresh("chat").await;
    alembic(&url, HEAD).unwrap();
    // 60,000 events over 200 chats, 100 projects, 500 users, spread over a
    // day; 98% published, the rest pending (some due, some backing off).
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, user_id, project_id, event_type, payload, \
                                   status, published_at, created_at, next_retry_at) \
         SELECT 'chat', 'chat-' || (i % 200), \
                md5('u' || (i % 500))::uuid, md5('p' || (i % 100))::uuid, 'message.created', \
                jsonb_build_object('n', i, 'content', repeat('x', 200)), \
                CASE WHEN i % 50 = 0 THEN 'pending' ELSE 'published' END, \
                CASE WHEN i % 50 = 0 THEN NULL ELSE now() END, \
                now() - make_interval(secs => 86400 - i), \
                now() - make_interval(secs => 86400 - i) + CASE WHEN i % 100 = 0 THEN interval '1 hour' ELSE interval '0' END \
         FROM generate_series(1, 60000) i; \
         ANALYZE event_outbox",
    )
    .await
    .unwrap();

    let cases = [
        (
            "SELECT id FROM event_outbox WHERE status = 'pending' AND next_retry_at <= now() \
             ORDER BY next_retry_at, created_at LIMIT 100",
            "ix_event_outbox_status_next_retry_at_created_at",
        ),
        (
            // outbox_prune()'s selection (retention).
            "SELECT id FROM event_outbox WHERE status = 'published' AND published_at < now() - interval '7 days' \
             ORDER BY published_at LIMIT 1000",
            "ix_event_outbox_published_at",
        ),
        (
            "SELECT * FROM event_outbox WHERE aggregate_id = 'chat-7' ORDER BY created_at DESC LIMIT 50",
            "ix_event_outbox_aggregate_id_created_at",
        ),
        (
            "SELECT * FROM event_outbox WHERE project_id = md5('p7')::uuid ORDER BY created_at DESC LIMIT 50",
            "ix_event_outbox_project_id_created_at",
        ),
        (
            "SELECT * FROM event_outbox WHERE user_id = md5('u7')::uuid ORDER BY created_at DESC LIMIT 50",
            "ix_event_outbox_user_id_created_at",
        ),
    ];
    for (sql, index) in cases {
        let plan = plan(&db, sql).await;
        assert!(plan.contains(index), "{sql}\nshould use {index}:\n{plan}");
        assert!(
            !plan.contains("Seq Scan"),
            "{sql}\nmust not scan the table:\n{plan}"
        );
        // The index delivers the order: no sort of the matching rows.
        assert!(!plan.contains("Sort"), "{sql}\nmust not sort:\n{plan}");
    }
}

/// A million published rows, 1,000 aggregates, one a second back from now
/// (about 11.6 days), but for 20,000 written by one bulk transaction (one
/// created_at, about 28 hours back), as `event_outbox` holds them at
/// `revision`.
async fn big_outbox(url: &str, db: &Client, revision: &str) {
    alembic(url, &["upgrade", revision]).unwrap();
    fill_a_million(db).await;
}

/// Inserts [`big_outbox`]'s million rows into the outbox as it is.
async fn fill_a_million(db: &Client) {
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at, published_at) \
         SELECT 'chat', 'c' || (i % 1000), CASE WHEN i % 10 = 0 THEN 'chat.renamed' ELSE 'message.created' END, \
                jsonb_build_object('n', i), 'published', \
                now() - make_interval(secs => back), now() - make_interval(secs => back) \
         FROM generate_series(1, 1000000) i, \
              LATERAL (SELECT CASE WHEN i BETWEEN 880001 AND 900000 THEN 100000 ELSE 1000000 - i END AS back) b; \
         ANALYZE event_outbox",
    )
    .await
    .unwrap();
}

/// Upgrades to head with a writer inserting beside it, which must never
/// wait long on the migration's locks; prints how long the upgrade took
/// (`what`) and the writer's slowest insert.
async fn upgrade_beside_a_writer(url: &str, what: &str) {
    let writer_url = url.to_owned();
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&writer_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let mut slowest = std::time::Duration::ZERO;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                client
                    .execute(
                        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
                         VALUES ('chat', 'live', 'x', '{}')",
                        &[],
                    )
                    .await
                    .unwrap();
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            slowest
        })
    };
    let started = std::time::Instant::now();
    let migrate_url = url.to_owned();
    tokio::task::spawn_blocking(move || alembic(&migrate_url, HEAD).unwrap())
        .await
        .unwrap();
    let took = started.elapsed();
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let slowest_insert = writer.await.unwrap();
    eprintln!(
        "[{what}] 1,000,000 rows: alembic upgrade took {took:.2?}; the slowest insert beside it {slowest_insert:.2?}"
    );
    assert!(
        slowest_insert < std::time::Duration::from_secs(2),
        "a writer waited {slowest_insert:?}"
    );
}

async fn relfilenode(db: &Client) -> i64 {
    db.query_one("SELECT pg_relation_filenode('event_outbox')::int8", &[])
        .await
        .unwrap()
        .get(0)
}

/// The headers revision on a big outbox: no rewrite (the table keeps its
/// file), no long lock (a writer goes on while the constraint is validated),
/// and quick; timed and printed. (Head adds the republish index after it,
/// built concurrently: timed with it.)
#[tokio::test]
async fn the_headers_revision_neither_rewrites_nor_blocks_a_big_outbox() {
    let (_pg, url, db) = fresh("chat").await;
    big_outbox(&url, &db, "0004_outbox_retention").await;
    let before = relfilenode(&db).await;
    upgrade_beside_a_writer(&url, "headers and republish index revisions").await;
    assert_eq!(relfilenode(&db).await, before, "the table was rewritten");
    let validated: bool = db
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'ck_event_outbox_headers'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(validated);
}

/// A selection of `outbox-tailer republish`, as its flags give it.
fn republish_args(
    since: Option<&str>,
    until: Option<&str>,
    event_type: Option<&str>,
) -> outbox_tailer::config::RepublishArgs {
    outbox_tailer::config::RepublishArgs {
        since: since.map(str::to_owned),
        until: until.map(str::to_owned),
        aggregate_type: None,
        aggregate_id: None,
        event_type: event_type.map(str::to_owned),
        ids: Vec::new(),
        dry_run: false,
        rate: 0,
    }
}

/// Selections by time (and event type), which read the republish index.
fn republish_selections() -> Vec<(&'static str, outbox_tailer::config::RepublishArgs)> {
    let args = republish_args;
    let days_ago = |days: u64| {
        let at = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86400);
        humantime::format_rfc3339_seconds(at).to_string()
    };
    let (from, to) = (days_ago(4), days_ago(3));
    vec![
        ("the last 2 hours", args(Some("2h"), None, None)),
        (
            "a day, by RFC 3339",
            args(Some(from.as_str()), Some(to.as_str()), None),
        ),
        ("everything before a day ago", args(None, Some("1d"), None)),
        (
            "one event type of the last 6 hours",
            args(Some("6h"), None, Some("chat.renamed")),
        ),
    ]
}

/// The plans of each selection's first and next page (after a cursor from
/// the selection's own first page, and after one at the same time with the
/// highest id, for which the planner thinks the fewest rows are left), in
/// the session republish reads them in; and one page from the middle of the
/// bulk transaction's rows, run (`EXPLAIN ANALYZE`).
async fn republish_plans(db: &Client) -> Vec<(String, String)> {
    let columns = outbox_tailer::internals::ROW_COLUMNS_WITH_HEADERS;
    let mut plans = Vec::new();
    for (name, args) in republish_selections() {
        let pages = outbox_tailer::republish::Pages::new(&args, columns, 32 << 20);
        db.batch_execute(pages.session).await.unwrap();
        let limit = 100i64;
        let rows = db
            .query(&pages.first, &pages.first_params(&limit))
            .await
            .unwrap();
        let first = plan_with(db, "EXPLAIN", &pages.first, &pages.first_params(&limit)).await;
        plans.push((format!("{name}: first page"), first));
        if let Some(last) = rows.last() {
            let at: String = last.get("cursor_at");
            for (cursor, id) in [("", last.get(0)), (", highest id", uuid::Uuid::max())] {
                let params = pages.next_params(&at, &id, &limit);
                let next = plan_with(db, "EXPLAIN", &pages.next, &params).await;
                plans.push((format!("{name}: next page{cursor}"), next));
            }
        }
    }
    // The bulk transaction's 10,001st row, by the index's order.
    let bulk = db
        .query_one(
            "SELECT created_at::text, id FROM event_outbox WHERE status = 'published' \
             ORDER BY created_at, id OFFSET 890000 LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (at, id): (String, uuid::Uuid) = (bulk.get(0), bulk.get(1));
    let before: i64 = db
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE status = 'published' \
             AND created_at = $1::text::timestamptz AND id <= $2",
            &[&at, &id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        before, 10_001,
        "the cursor is not inside the bulk transaction's rows"
    );
    let (_, args) = &republish_selections()[2];
    let pages = outbox_tailer::republish::Pages::new(args, columns, 32 << 20);
    db.batch_execute(pages.session).await.unwrap();
    let run = plan_with(
        db,
        "EXPLAIN ANALYZE",
        &pages.next,
        &pages.next_params(&at, &id, &100),
    )
    .await;
    plans.push((
        "a page from the middle of one transaction's 20,000 rows".to_owned(),
        run,
    ));
    plans
}

async fn republish_index_is_valid(db: &Client) -> bool {
    db.query_one(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_event_outbox_created_at_id'::regclass",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every page plan reads `index` in order (no sort), and nothing scans a
/// table whole but the `empty` ones (an empty partition has no pages: the
/// planner rightly reads it without an index); a page that was run read
/// from its cursor on (no row before it read and filtered out).
fn assert_index_ranges(plans: &[(String, String)], index: &str, empty: &[&str]) {
    assert!(plans.len() >= 13, "{plans:?}");
    for (name, plan) in plans {
        let scans = plan
            .lines()
            .filter_map(|line| line.split("Seq Scan on ").nth(1))
            .filter_map(|rest| rest.split(' ').next());
        for table in scans {
            assert!(empty.contains(&table), "{name} scans {table}:\n{plan}");
        }
        assert!(plan.contains(index), "{name} should read {index}:\n{plan}");
        // A Sort node (a Merge Append's "Sort Key" only merges ordered inputs).
        let sorts = plan.lines().any(|line| {
            let node = line.trim_start().trim_start_matches("->").trim_start();
            node.starts_with("Sort") && !node.starts_with("Sort Key")
                || node.starts_with("Incremental Sort")
        });
        assert!(!sorts, "{name} must not sort:\n{plan}");
        assert!(
            !plan.contains("Rows Removed by Filter"),
            "{name} read rows before its cursor:\n{plan}"
        );
    }
}

/// The republish index, built on a big outbox: concurrently (a writer goes
/// on), and each page of every selection then reads a range of it in
/// order: no sequential scan, no sort.
#[tokio::test]
async fn republish_reads_pages_of_its_index_on_a_million_rows() {
    let (_pg, url, db) = fresh("chat").await;
    big_outbox(&url, &db, "0005_outbox_headers").await;
    upgrade_beside_a_writer(&url, "republish index").await;
    db.batch_execute("ANALYZE event_outbox").await.unwrap();
    let plans = republish_plans(&db).await;
    assert_index_ranges(&plans, "ix_event_outbox_created_at_id", &[]);
    // Selections with an index of their own keep to it: one aggregate's
    // rows are read by its index in time order (ids sorted within a time,
    // incrementally), named ids by primary key (the few found, sorted).
    let columns = outbox_tailer::internals::ROW_COLUMNS_WITH_HEADERS;
    let ids = strings(
        &db,
        "SELECT id::text FROM event_outbox WHERE status = 'published' ORDER BY id LIMIT 3",
    )
    .await
    .iter()
    .map(|id| id.parse().unwrap())
    .collect();
    let own = [
        (
            outbox_tailer::config::RepublishArgs {
                aggregate_id: Some("c7".to_owned()),
                ..republish_args(Some("7d"), None, None)
            },
            "Index Scan using ix_event_outbox_aggregate_id_created_at",
        ),
        (
            outbox_tailer::config::RepublishArgs {
                ids,
                ..republish_args(None, None, None)
            },
            "Index Scan using event_outbox_pkey",
        ),
    ];
    for (args, scan) in own {
        let pages = outbox_tailer::republish::Pages::new(&args, columns, 32 << 20);
        db.batch_execute(pages.session).await.unwrap();
        let plan = plan_with(
            &db,
            "EXPLAIN ANALYZE",
            &pages.first,
            &pages.first_params(&100),
        )
        .await;
        assert!(plan.contains(scan), "{args:?} should read {scan}:\n{plan}");
        assert!(
            !plan.contains("Rows Removed by Filter"),
            "{args:?} read rows it did not select:\n{plan}"
        );
    }
    // An interrupted build left an invalid index: the upgrade builds it again.
    alembic(&url, &["downgrade", "-1"]).unwrap();
    db.batch_execute(
        "CREATE INDEX ix_event_outbox_created_at_id ON event_outbox (created_at, id) WHERE status = 'published'; \
         UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_event_outbox_created_at_id'::regclass",
    )
    .await
    .unwrap();
    alembic(&url, HEAD).unwrap();
    let valid = republish_index_is_valid(&db).await;
    assert!(valid, "the invalid index was kept");
}

/// A partitioned outbox (the layout of docs/producing.md, monthly
/// partitions): the revision indexes each partition concurrently and
/// attaches them, and each page reads only the partitions its range
/// reaches, in order, through their indexes.
#[tokio::test]
async fn republish_reads_pages_of_a_partitioned_outbox_by_its_indexes() {
    let (_pg, url, db) = fresh("chat").await;
    alembic(&url, &["upgrade", "0005_outbox_headers"]).unwrap();
    crate::partitioned::partitioned_root(&db, true).await;
    db.batch_execute(
        "DO $$ BEGIN \
             EXECUTE format('CREATE TABLE event_outbox_p0 PARTITION OF event_outbox FOR VALUES FROM (%L) TO (%L)', \
                 now() - interval '14 days', now() - interval '7 days'); \
             EXECUTE format('CREATE TABLE event_outbox_p1 PARTITION OF event_outbox FOR VALUES FROM (%L) TO (%L)', \
                 now() - interval '7 days', now() + interval '7 days'); \
             EXECUTE format('CREATE TABLE event_outbox_p2 PARTITION OF event_outbox FOR VALUES FROM (%L) TO (%L)', \
                 now() + interval '7 days', now() + interval '14 days'); \
         END $$; \
         CREATE TABLE event_outbox_default PARTITION OF event_outbox DEFAULT",
    )
    .await
    .unwrap();
    fill_a_million(&db).await;
    upgrade_beside_a_writer(&url, "republish index, partitioned").await;
    // One valid index on the root, one attached to it per partition.
    let children = strings(
        &db,
        "SELECT c.relname || ' ' || i.indisvalid FROM pg_inherits h \
         JOIN pg_class c ON c.oid = h.inhrelid JOIN pg_index i ON i.indexrelid = c.oid \
         WHERE h.inhparent = 'ix_event_outbox_created_at_id'::regclass ORDER BY 1",
    )
    .await;
    assert_eq!(
        children,
        [
            "event_outbox_default_created_at_id true",
            "event_outbox_p0_created_at_id true",
            "event_outbox_p1_created_at_id true",
            "event_outbox_p2_created_at_id true",
        ]
    );
    let valid = republish_index_is_valid(&db).await;
    assert!(valid);
    // A partition created later gets its index with it.
    db.batch_execute(
        "CREATE TABLE event_outbox_later PARTITION OF event_outbox \
         FOR VALUES FROM ('2100-01-01') TO ('2100-02-01')",
    )
    .await
    .unwrap();
    assert_eq!(
        strings(
            &db,
            "SELECT count(*)::text FROM pg_inherits WHERE inhparent = 'ix_event_outbox_created_at_id'::regclass"
        )
        .await,
        ["5"]
    );
    db.batch_execute("ANALYZE event_outbox").await.unwrap();
    let plans = republish_plans(&db).await;
    assert_index_ranges(
        &plans,
        "_created_at_id",
        &[
            "event_outbox_p2",
            "event_outbox_later",
            "event_outbox_default",
        ],
    );
    // The last 2 hours never reach the partition of two weeks ago.
    let (_, recent) = &plans[0];
    assert!(
        recent.contains("event_outbox_p1") && !recent.contains("event_outbox_p0"),
        "the last 2 hours read old partitions:\n{recent}"
    );
    // Downgrade and upgrade again: the partitioned index goes, and comes back.
    alembic(&url, &["downgrade", "-1"]).unwrap();
    assert_eq!(
        strings(
            &db,
            "SELECT count(*)::text FROM pg_class WHERE relname LIKE '%created_at_id'"
        )
        .await,
        ["0"]
    );
    alembic(&url, HEAD).unwrap();
}
