//! The road past one slot (docs/design.md), its PostgreSQL half: N
//! publications whose row filters hash `aggregate_id` split one outbox
//! between N slots. On PostgreSQL 15 every insert reaches exactly one slot,
//! every event of an aggregate the same one, in commit order.

use crate::common::*;
use outbox_testkit::PgServer;
use std::collections::{HashMap, HashSet};

/// Partitions, a power of two (the filter masks the hash).
const N: i32 = 2;
const AGGREGATES: i32 = 200;
const ROUNDS: i64 = 5;

/// One decoded pgoutput v1 Insert: its columns as text (`None`: null).
fn insert_columns(data: &[u8]) -> Option<Vec<Option<String>>> {
    // 'I', relation oid (4), 'N', column count (2), then per column a kind
    // byte: 'n' null, 'u' unchanged TOAST, 't' text with a 4-byte length.
    if data.first() != Some(&b'I') || data.get(5) != Some(&b'N') {
        return None;
    }
    let count = u16::from_be_bytes(data.get(6..8)?.try_into().ok()?);
    let mut at = 8;
    let mut columns = Vec::new();
    for _ in 0..count {
        let kind = *data.get(at)?;
        at += 1;
        columns.push(match kind {
            b't' => {
                let len = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
                at += 4;
                let text = String::from_utf8(data.get(at..at + len)?.to_vec()).ok()?;
                at += len;
                Some(text)
            }
            _ => None,
        });
    }
    Some(columns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_row_filter_splits_the_outbox_between_slots() {
    let pg = PgServer::start().unwrap();
    migrate(&pg).await;
    let db = pg.connect(DB).await.unwrap();

    // A row filter may call only immutable built-in functions.
    let volatility: i8 = db
        .query_one(
            "SELECT provolatile FROM pg_proc WHERE oid = 'hashtext(text)'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(volatility as u8, b'i', "hashtext is not immutable");

    for k in 0..N {
        db.batch_execute(&format!(
            "CREATE PUBLICATION outbox_part_{k} FOR TABLE event_outbox \
                 WHERE ((hashtext(aggregate_id) & {mask}) = {k}) \
                 WITH (publish = 'insert', publish_via_partition_root = true)",
            mask = N - 1
        ))
        .await
        .unwrap();
        // Its own statement: a slot cannot be created in a transaction that wrote.
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("outbox_part_{k}")],
        )
        .await
        .unwrap();
    }
    // Each round is one transaction holding an event of every aggregate, so
    // every transaction is split between the slots.
    for round in 0..ROUNDS {
        db.execute(
            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'chat', 'chat-' || a, 'message.created', jsonb_build_object('n', $1::bigint) \
             FROM generate_series(1, $2::int) a",
            &[&round, &AGGREGATES],
        )
        .await
        .unwrap();
    }

    let all: HashMap<String, String> = db
        .query("SELECT id::text, aggregate_id FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(all.len() as i64, i64::from(AGGREGATES) * ROUNDS);
    let expected_slot: HashMap<String, i32> = db
        .query(
            &format!(
                "SELECT DISTINCT aggregate_id, hashtext(aggregate_id) & {} FROM event_outbox",
                N - 1
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let mut delivered: HashMap<String, i32> = HashMap::new();
    for k in 0..N {
        let changes = db
            .query(
                &format!(
                    "SELECT data FROM pg_logical_slot_get_binary_changes('outbox_part_{k}', NULL, NULL, \
                     'proto_version', '1', 'publication_names', 'outbox_part_{k}')"
                ),
                &[],
            )
            .await
            .unwrap();
        // Per aggregate, the rounds in the order the slot hands them over.
        let mut rounds: HashMap<String, Vec<i64>> = HashMap::new();
        let mut count = 0;
        for change in &changes {
            let data: Vec<u8> = change.get(0);
            let Some(columns) = insert_columns(&data) else {
                continue;
            };
            // Columns by position (the migrated layout): id, aggregate_type,
            // aggregate_id, user_id, project_id, event_type, payload, ...
            let id = columns[0].clone().expect("id");
            let aggregate = columns[2].clone().expect("aggregate_id");
            let payload: serde_json::Value =
                serde_json::from_str(columns[6].as_deref().expect("payload")).unwrap();
            assert_eq!(
                all.get(&id),
                Some(&aggregate),
                "slot {k} delivered an event that is not in the outbox"
            );
            assert_eq!(
                expected_slot[&aggregate], k,
                "{aggregate} reached slot {k}, not the one its hash names"
            );
            assert!(
                delivered.insert(id.clone(), k).is_none(),
                "event {id} reached more than one slot"
            );
            rounds
                .entry(aggregate)
                .or_default()
                .push(payload["n"].as_i64().unwrap());
            count += 1;
        }
        // An even split is not promised, but a filter that passes (almost)
        // nothing or everything is not splitting.
        let share = f64::from(count) / all.len() as f64;
        assert!(
            (0.3..0.7).contains(&share),
            "slot {k} got {count} of {} events",
            all.len()
        );
        for (aggregate, got) in rounds {
            assert_eq!(
                got,
                (0..ROUNDS).collect::<Vec<_>>(),
                "{aggregate}'s events out of commit order in slot {k}"
            );
        }
    }
    let missing: HashSet<&String> = all
        .keys()
        .filter(|id| !delivered.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events reached no slot",
        missing.len()
    );
}
