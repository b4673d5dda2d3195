//! The reference chat endpoint over real HTTP against a real PostgreSQL:
//! a message and its event commit together, roll back together, and bad
//! requests get a clear 4xx and write nothing.

use outbox_chat::{self as chat, ChatStore, MAX_BODY_BYTES};
use outbox_testkit::{alembic, PgServer};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

struct Env {
    _pg: PgServer,
    db: Client,
    addr: SocketAddr,
    http: reqwest::Client,
}

async fn env(configure: impl FnOnce(ChatStore) -> ChatStore) -> Env {
    let pg = PgServer::start().unwrap();
    let url = pg.create_database("chat").await.unwrap();
    alembic(&url, &["upgrade", "head"]).unwrap();
    let store = configure(ChatStore::new(url.parse().unwrap(), 8).unwrap());
    let addr = chat::spawn("127.0.0.1:0".parse().unwrap(), Arc::new(store))
        .await
        .unwrap();
    let db = pg.connect("chat").await.unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Env {
        _pg: pg,
        db,
        addr,
        http,
    }
}

impl Env {
    async fn post(&self, chat_id: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("http://{}/chats/{chat_id}/messages", self.addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn count(&self, table: &str) -> i64 {
        self.db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Rows ever inserted into `table`, committed or not. An idle backend may
    /// hold its statistics for 10 s; one that exits flushes them, so the chat
    /// endpoint's connections are ended first (its pool reconnects).
    async fn inserted_ever(&self, table: &str, at_least: i64) -> i64 {
        self.db
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.db
                .batch_execute("SELECT pg_stat_clear_snapshot()")
                .await
                .unwrap();
            let n: i64 = self
                .db
                .query_one(
                    "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn message(project: Uuid, user: Uuid, content: &str) -> String {
    json!({"project_id": project, "user_id": user, "role": "user", "content": content}).to_string()
}

#[tokio::test]
async fn a_post_commits_the_message_and_its_event_together() {
    let env = env(|s| s).await;
    let (chat_id, project, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (status, body) = env
        .post(
            &chat_id.to_string(),
            message(project, user, "hello, {\"world\"} ✓"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let message_id: Uuid = body["message_id"].as_str().unwrap().parse().unwrap();
    let event_id: Uuid = body["event_id"].as_str().unwrap().parse().unwrap();

    let m = env
        .db
        .query_one(
            "SELECT project_id, user_id, role, content, created_at FROM messages WHERE id = $1",
            &[&message_id],
        )
        .await
        .unwrap();
    assert_eq!((m.get::<_, Uuid>(0), m.get::<_, Uuid>(1)), (project, user));
    assert_eq!(
        (
            m.get::<_, String>(2).as_str(),
            m.get::<_, String>(3).as_str()
        ),
        ("user", "hello, {\"world\"} ✓")
    );

    let e = env
        .db
        .query_one(
            "SELECT aggregate_type, aggregate_id, event_type, user_id, project_id, payload, status, retry_count, \
                    published_at IS NULL, last_error IS NULL, created_at \
             FROM event_outbox WHERE id = $1",
            &[&event_id],
        )
        .await
        .unwrap();
    assert_eq!(e.get::<_, &str>(0), "chat");
    assert_eq!(e.get::<_, String>(1), chat_id.to_string());
    assert_eq!(e.get::<_, &str>(2), "message.created");
    assert_eq!(e.get::<_, Option<Uuid>>(3), Some(user));
    assert_eq!(e.get::<_, Option<Uuid>>(4), Some(project));
    assert_eq!(
        e.get::<_, Value>(5),
        json!({"message_id": message_id, "chat_id": chat_id, "project_id": project, "user_id": user,
               "role": "user", "content": "hello, {\"world\"} ✓"})
    );
    assert_eq!(
        (
            e.get::<_, &str>(6),
            e.get::<_, i32>(7),
            e.get::<_, bool>(8),
            e.get::<_, bool>(9)
        ),
        ("pending", 0, true, true)
    );
    // One transaction: both rows carry its start time.
    assert_eq!(
        e.get::<_, time::OffsetDateTime>(10),
        m.get::<_, time::OffsetDateTime>(4)
    );
    assert_eq!(
        (env.count("messages").await, env.count("event_outbox").await),
        (1, 1)
    );
}

#[tokio::test]
async fn a_failure_after_the_event_insert_rolls_back_both() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let env = env(move |store| {
        store.with_before_commit(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            Err("injected failure before commit".into())
        }))
    })
    .await;
    let (status, body) = env
        .post(
            &Uuid::new_v4().to_string(),
            message(Uuid::new_v4(), Uuid::new_v4(), "lost"),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was written"),
        "{body}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the failure was injected after both inserts"
    );
    // Both rows were really inserted, then rolled back together.
    assert_eq!(env.inserted_ever("messages", 1).await, 1);
    assert_eq!(env.inserted_ever("event_outbox", 1).await, 1);
    assert_eq!(
        (env.count("messages").await, env.count("event_outbox").await),
        (0, 0)
    );
}

#[tokio::test]
async fn bad_requests_get_a_clear_4xx_and_write_nothing() {
    let env = env(|s| s).await;
    let chat = Uuid::new_v4().to_string();
    let (p, u) = (Uuid::new_v4(), Uuid::new_v4());
    let oversized = message(p, u, &"x".repeat(MAX_BODY_BYTES + 1));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "not-a-uuid",
            message(p, u, "x"),
            400,
            "chat_id must be a UUID",
        ),
        (
            &chat,
            json!({"project_id": "p-1", "user_id": u, "content": "x"}).to_string(),
            400,
            "project_id must be a UUID",
        ),
        (
            &chat,
            json!({"project_id": p, "user_id": "", "content": "x"}).to_string(),
            400,
            "user_id must be a UUID",
        ),
        (&chat, message(p, u, ""), 400, "content must not be empty"),
        (
            &chat,
            message(p, u, " \n\t "),
            400,
            "content must not be empty",
        ),
        (&chat, message(p, u, "nul\u{0}byte"), 400, "NUL"),
        (
            &chat,
            json!({"project_id": p, "user_id": u, "role": "root", "content": "x"}).to_string(),
            400,
            "role",
        ),
        (&chat, "{\"project_id\":".to_owned(), 400, "invalid JSON"),
        (
            &chat,
            json!({"project_id": p, "user_id": u}).to_string(),
            400,
            "missing field `content`",
        ),
        (&chat, message(p, u, &"y".repeat(70 * 1024)), 413, "limit"),
        (&chat, oversized, 413, "length limit"),
    ];
    for (chat_id, body, want_status, want_text) in cases {
        let (status, response) = env.post(chat_id, body).await;
        assert_eq!(status, want_status, "{want_text}: {response}");
        let error = response["error"]
            .as_str()
            .unwrap_or_else(|| panic!("JSON error body expected: {response}"));
        assert!(error.contains(want_text), "{want_text}: {error}");
    }
    // A good request afterwards proves the counts below are live, not stale.
    let (status, body) = env.post(&chat, message(p, u, "fine")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (env.count("messages").await, env.count("event_outbox").await),
        (1, 1)
    );
    assert_eq!(
        env.inserted_ever("messages", 1).await,
        1,
        "no bad request reached an insert"
    );
    assert_eq!(env.inserted_ever("event_outbox", 1).await, 1);
}

#[tokio::test]
async fn concurrent_posts_each_commit_one_message_and_one_matching_event() {
    let env = Arc::new(env(|s| s).await);
    let chats: Vec<String> = (0..10).map(|_| Uuid::new_v4().to_string()).collect();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let env = env.clone();
        let chat = chats[i % chats.len()].clone();
        tasks.push(tokio::spawn(async move {
            let (status, body) = env
                .post(
                    &chat,
                    message(Uuid::new_v4(), Uuid::new_v4(), &format!("m{i}")),
                )
                .await;
            assert_eq!(status, 201, "{body}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let unmatched: i64 = env
        .db
        .query_one(
            "SELECT count(*) FROM messages m FULL JOIN event_outbox e ON (e.payload->>'message_id')::uuid = m.id \
             WHERE m.id IS NULL OR e.id IS NULL OR e.payload->>'content' <> m.content",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (
            env.count("messages").await,
            env.count("event_outbox").await,
            unmatched
        ),
        (300, 300, 0)
    );
}
