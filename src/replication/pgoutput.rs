//! pgoutput (protocol version 1) decoding of the messages pgwire-replication
//! hands over raw: Relation ('R') and Insert ('I'). Pure code, no I/O.
//!
//! Columns are found by name from each Relation message, so a column added to
//! `event_outbox` later, or a changed column order, does not break decoding; a
//! missing required column is a [`DecodeError::MissingColumn`]. Updates,
//! deletes, truncates, types, origins and inserts into other relations decode
//! to nothing: only committed `event_outbox` inserts are events.
//!
//! Values arrive in text format (`'t'`, length, bytes). The payload keeps its
//! bytes exactly as PostgreSQL rendered the jsonb, as a zero-copy slice.

use crate::event::{OutboxRow, OUTBOX_TABLE};
use bytes::Bytes;
use std::collections::HashMap;
use uuid::Uuid;

/// A pgoutput message that cannot be decoded. Each one means the stream and
/// this decoder disagree, so the caller stops rather than skip an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput {message} message is truncated")]
    Truncated { message: &'static str },
    #[error("pgoutput insert for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error(
        "{OUTBOX_TABLE} has no column {0:?} in the replication stream: run `alembic upgrade head`"
    )]
    MissingColumn(&'static str),
    #[error("{OUTBOX_TABLE}.{0} is NULL in an insert, but the schema makes it NOT NULL")]
    NullColumn(&'static str),
    #[error("{OUTBOX_TABLE}.{column} arrived as {kind:?}, expected text format")]
    UnexpectedFormat { column: &'static str, kind: char },
    #[error("{OUTBOX_TABLE}.{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("{OUTBOX_TABLE}.id {0:?} is not a UUID")]
    BadId(String),
    #[error("insert has {got} columns, its Relation message announced {announced}")]
    ColumnCount { got: usize, announced: usize },
    /// One event's row cannot become a message (a NULL where the contract
    /// has none, after a schema change); its id is known, so it can fail
    /// alone while the stream goes on.
    #[error("event {id}: {cause}")]
    Event { id: Uuid, cause: Box<DecodeError> },
}

/// Where each needed column sits in an `event_outbox` tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OutboxColumns {
    count: usize,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    user_id: Option<usize>,
    project_id: Option<usize>,
    event_type: usize,
    payload: usize,
    created_at: usize,
    /// None before the `headers` revision (both schemas stream).
    headers: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Relation {
    Outbox(OutboxColumns),
    /// Another table in the publication: its inserts are skipped.
    Other,
}

/// Decodes the raw pgoutput messages of one replication session. The relation
/// cache lives as long as the session: the server sends a Relation message
/// before the first change of each relation, and again after it changes.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    relations: HashMap<u32, Relation>,
}

impl Decoder {
    pub(crate) fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes one message: `Some(row)` for an `event_outbox` insert, `None`
    /// for everything else (which is skipped).
    pub(crate) fn decode(&mut self, data: &Bytes) -> Result<Option<OutboxRow>, DecodeError> {
        match data.first() {
            Some(b'R') => {
                let (oid, relation) = parse_relation(data)?;
                self.relations.insert(oid, relation);
                Ok(None)
            }
            Some(b'I') => self.decode_insert(data),
            // Update, Delete, Truncate, Type, Origin, logical Message, and the
            // Begin/Commit the crate already turned into events.
            _ => Ok(None),
        }
    }

    fn decode_insert(&self, data: &Bytes) -> Result<Option<OutboxRow>, DecodeError> {
        let mut reader = Reader::new(data, "Insert");
        reader.skip(1)?;
        let oid = reader.u32()?;
        let columns = match self.relations.get(&oid) {
            None => return Err(DecodeError::UnknownRelation(oid)),
            Some(Relation::Other) => return Ok(None),
            Some(Relation::Outbox(columns)) => columns,
        };
        if reader.u8()? != b'N' {
            return Err(DecodeError::Truncated { message: "Insert" });
        }
        let values = parse_tuple(&mut reader)?;
        if values.len() != columns.count {
            return Err(DecodeError::ColumnCount {
                got: values.len(),
                announced: columns.count,
            });
        }
        let text = |index: usize, name: &'static str| -> Result<String, DecodeError> {
            let bytes = value(&values, index, name)?.ok_or(DecodeError::NullColumn(name))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8(name))
        };
        let optional = |index: Option<usize>,
                        name: &'static str|
         -> Result<Option<String>, DecodeError> {
            match index {
                None => Ok(None),
                Some(index) => value(&values, index, name)?
                    .map(|b| {
                        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidUtf8(name))
                    })
                    .transpose(),
            }
        };
        let id_text = text(columns.id, "id")?;
        let id = Uuid::try_parse(&id_text).map_err(|_| DecodeError::BadId(id_text))?;
        let row = || -> Result<OutboxRow, DecodeError> {
            let payload = value(&values, columns.payload, "payload")?
                .ok_or(DecodeError::NullColumn("payload"))?;
            Ok(OutboxRow {
                id,
                aggregate_type: text(columns.aggregate_type, "aggregate_type")?,
                aggregate_id: text(columns.aggregate_id, "aggregate_id")?,
                user_id: optional(columns.user_id, "user_id")?,
                project_id: optional(columns.project_id, "project_id")?,
                event_type: text(columns.event_type, "event_type")?,
                payload,
                created_at: text(columns.created_at, "created_at")?,
                headers: optional(columns.headers, "headers")?,
            })
        };
        row().map(Some).map_err(|cause| DecodeError::Event {
            id,
            cause: Box::new(cause),
        })
    }
}

/// A column value in a tuple: text bytes, NULL, or a kind we cannot use.
#[derive(Debug)]
enum Value {
    Text(Bytes),
    Null,
    Other(char),
}

fn value(
    values: &[Value],
    index: usize,
    column: &'static str,
) -> Result<Option<Bytes>, DecodeError> {
    match &values[index] {
        Value::Text(bytes) => Ok(Some(bytes.clone())),
        Value::Null => Ok(None),
        Value::Other(kind) => Err(DecodeError::UnexpectedFormat {
            column,
            kind: *kind,
        }),
    }
}

fn parse_relation(data: &Bytes) -> Result<(u32, Relation), DecodeError> {
    let mut reader = Reader::new(data, "Relation");
    reader.skip(1)?;
    let oid = reader.u32()?;
    let _namespace = reader.cstring()?;
    let name = reader.cstring()?;
    let _replica_identity = reader.u8()?;
    let count = usize::from(reader.u16()?);
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let _flags = reader.u8()?;
        names.push(reader.cstring()?);
        let _type_oid = reader.u32()?;
        let _type_modifier = reader.u32()?;
    }
    if name != OUTBOX_TABLE.as_bytes() {
        return Ok((oid, Relation::Other));
    }
    let find = |column: &'static str| names.iter().position(|n| *n == column.as_bytes());
    let require = |column: &'static str| find(column).ok_or(DecodeError::MissingColumn(column));
    Ok((
        oid,
        Relation::Outbox(OutboxColumns {
            count,
            id: require("id")?,
            aggregate_type: require("aggregate_type")?,
            aggregate_id: require("aggregate_id")?,
            user_id: find("user_id"),
            project_id: find("project_id"),
            event_type: require("event_type")?,
            payload: require("payload")?,
            created_at: require("created_at")?,
            headers: find("headers"),
        }),
    ))
}

fn parse_tuple(reader: &mut Reader<'_>) -> Result<Vec<Value>, DecodeError> {
    let count = usize::from(reader.u16()?);
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        values.push(match reader.u8()? {
            b't' => {
                let len = reader.u32()? as usize;
                Value::Text(reader.bytes(len)?)
            }
            b'n' => Value::Null,
            b'b' => {
                // Binary format is never requested; skip it to report it.
                let len = reader.u32()? as usize;
                reader.skip(len)?;
                Value::Other('b')
            }
            other => Value::Other(char::from(other)),
        });
    }
    Ok(values)
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn new(data: &'a Bytes, message: &'static str) -> Self {
        Reader {
            data,
            at: 0,
            message,
        }
    }

    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.data.len());
        let end = end.ok_or(DecodeError::Truncated {
            message: self.message,
        })?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let range = self.take(1)?;
        Ok(self.data[range.start])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let range = self.take(2)?;
        Ok(u16::from_be_bytes([
            self.data[range.start],
            self.data[range.start + 1],
        ]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let range = self.take(4)?;
        let b = &self.data[range];
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let range = self.take(n)?;
        Ok(self.data.slice(range))
    }

    fn cstring(&mut self) -> Result<&'a [u8], DecodeError> {
        let data: &'a Bytes = self.data;
        let rest = &data[self.at..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated {
                message: self.message,
            })?;
        self.at += len + 1;
        Ok(&rest[..len])
    }
}

#[cfg(test)]
mod tests {
    //! The byte sequences below are built the way pgoutput writes them (see
    //! PostgreSQL's src/backend/replication/logical/proto.c); `captured_*`
    //! are copies of messages a PostgreSQL 15 walsender sent for the
    //! contract's schema.
    use super::*;

    /// A Relation message for `table` with `columns`.
    pub(super) fn relation(oid: u32, table: &str, columns: &[&str]) -> Bytes {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(b"public\0");
        m.extend(table.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as u16).to_be_bytes());
        for (i, c) in columns.iter().enumerate() {
            m.push(u8::from(i == 0));
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        Bytes::from(m)
    }

    /// An Insert message with text values (`None` = NULL).
    pub(super) fn insert(oid: u32, values: &[Option<&str>]) -> Bytes {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                Some(text) => {
                    m.push(b't');
                    m.extend((text.len() as u32).to_be_bytes());
                    m.extend(text.as_bytes());
                }
                None => m.push(b'n'),
            }
        }
        Bytes::from(m)
    }

    const COLUMNS: [&str; 13] = [
        "id",
        "aggregate_type",
        "aggregate_id",
        "user_id",
        "project_id",
        "event_type",
        "payload",
        "status",
        "retry_count",
        "next_retry_at",
        "created_at",
        "published_at",
        "last_error",
    ];
    const ID: &str = "0b0d2c8e-29f4-4b7e-8d2e-6e0f7d7d2a01";

    fn row_values<'a>(payload: &'a str, user: Option<&'a str>) -> Vec<Option<&'a str>> {
        vec![
            Some(ID),
            Some("chat"),
            Some("chat-1"),
            user,
            None,
            Some("message.created"),
            Some(payload),
            Some("pending"),
            Some("0"),
            Some("2026-11-26 18:28:37.123456+00"),
            Some("2026-11-26 18:28:37.123456+00"),
            None,
            None,
        ]
    }

    #[test]
    fn decodes_an_outbox_insert_by_column_name() {
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder
                .decode(&relation(16400, "event_outbox", &COLUMNS))
                .unwrap(),
            None
        );
        let payload = r#"{"n": 12345678901234567890123, "x": 1.000000000000000000001}"#;
        let row = decoder
            .decode(&insert(16400, &row_values(payload, Some("u-1"))))
            .unwrap()
            .unwrap();
        assert_eq!(row.id.to_string(), ID);
        assert_eq!(
            (row.aggregate_type.as_str(), row.aggregate_id.as_str()),
            ("chat", "chat-1")
        );
        assert_eq!(
            (row.user_id.as_deref(), row.project_id.as_deref()),
            (Some("u-1"), None)
        );
        assert_eq!(row.event_type, "message.created");
        assert_eq!(
            &row.payload[..],
            payload.as_bytes(),
            "payload bytes are kept exactly"
        );
        assert_eq!(row.created_at, "2026-11-26 18:28:37.123456+00");
    }

    #[test]
    fn survives_a_new_column_and_a_changed_order() {
        let mut columns: Vec<&str> = COLUMNS.iter().rev().copied().collect();
        columns.insert(3, "tenant");
        let mut values: Vec<Option<&str>> = row_values("{}", None).into_iter().rev().collect();
        values.insert(3, Some("acme"));
        let mut decoder = Decoder::new();
        decoder
            .decode(&relation(7, "event_outbox", &columns))
            .unwrap();
        let row = decoder.decode(&insert(7, &values)).unwrap().unwrap();
        assert_eq!(row.id.to_string(), ID);
        assert_eq!(row.event_type, "message.created");
        assert_eq!(&row.payload[..], b"{}");
    }

    #[test]
    fn a_missing_required_column_is_a_clear_error() {
        let columns: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .filter(|c| *c != "payload")
            .collect();
        let error = Decoder::new()
            .decode(&relation(7, "event_outbox", &columns))
            .unwrap_err();
        assert_eq!(error, DecodeError::MissingColumn("payload"));
        assert!(error.to_string().contains("alembic upgrade head"));
    }

    #[test]
    fn other_relations_and_other_changes_are_skipped() {
        let mut decoder = Decoder::new();
        decoder
            .decode(&relation(8, "messages", &["id", "content"]))
            .unwrap();
        assert_eq!(
            decoder
                .decode(&insert(8, &[Some("1"), Some("hi")]))
                .unwrap(),
            None
        );
        decoder
            .decode(&relation(7, "event_outbox", &COLUMNS))
            .unwrap();
        for tag in [b'U', b'D', b'T', b'Y', b'O', b'M'] {
            let mut other = insert(7, &row_values("{}", None)).to_vec();
            other[0] = tag;
            assert_eq!(
                decoder.decode(&Bytes::from(other)).unwrap(),
                None,
                "{}",
                char::from(tag)
            );
        }
    }

    #[test]
    fn the_relation_cache_follows_a_relation_change() {
        let mut decoder = Decoder::new();
        decoder
            .decode(&relation(7, "event_outbox", &COLUMNS))
            .unwrap();
        let mut reordered = COLUMNS.to_vec();
        reordered.swap(0, 12);
        decoder
            .decode(&relation(7, "event_outbox", &reordered))
            .unwrap();
        let mut values = row_values("{}", None);
        values.swap(0, 12);
        assert_eq!(
            decoder
                .decode(&insert(7, &values))
                .unwrap()
                .unwrap()
                .id
                .to_string(),
            ID
        );
    }

    #[test]
    fn broken_messages_are_errors_not_panics() {
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder
                .decode(&insert(9, &row_values("{}", None)))
                .unwrap_err(),
            DecodeError::UnknownRelation(9)
        );
        let full = relation(7, "event_outbox", &COLUMNS);
        for cut in 1..full.len() {
            assert!(
                Decoder::new().decode(&full.slice(..cut)).is_err(),
                "relation cut at {cut}"
            );
        }
        decoder.decode(&full).unwrap();
        let row = insert(7, &row_values("{}", None));
        for cut in 1..row.len() {
            assert!(
                decoder.decode(&row.slice(..cut)).is_err(),
                "insert cut at {cut}"
            );
        }
        let mut null_payload = row_values("{}", None);
        null_payload[6] = None;
        // The id is known: the event can fail alone.
        assert!(matches!(
            decoder.decode(&insert(7, &null_payload)).unwrap_err(),
            DecodeError::Event { cause, .. } if *cause == DecodeError::NullColumn("payload")
        ));
        let mut bad_id = row_values("{}", None);
        bad_id[0] = Some("42");
        assert!(matches!(
            decoder.decode(&insert(7, &bad_id)).unwrap_err(),
            DecodeError::BadId(_)
        ));
        let short = &row_values("{}", None)[..12];
        assert!(matches!(
            decoder.decode(&insert(7, short)).unwrap_err(),
            DecodeError::ColumnCount { .. }
        ));
    }

    /// A Relation and an Insert exactly as a PostgreSQL 15 walsender sent them
    /// for `alembic upgrade head`'s event_outbox.
    #[test]
    fn decodes_captured_bytes() {
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder
                .decode(&Bytes::from_static(CAPTURED_RELATION))
                .unwrap(),
            None
        );
        let row = decoder
            .decode(&Bytes::from_static(CAPTURED_INSERT))
            .unwrap()
            .unwrap();
        assert_eq!(row.id.to_string(), CAPTURED_ID);
        assert_eq!(row.aggregate_type, "chat");
        assert_eq!(row.event_type, "message.created");
        assert_eq!(&row.payload[..], CAPTURED_PAYLOAD.as_bytes());
        assert_eq!(row.user_id, None);
    }

    include!("pgoutput_captured.rs");
}
