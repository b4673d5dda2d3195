//! An event's own message headers (docs/contract.md section 3), and their
//! rules: the one implementation, used by the producer before the insert
//! and by the tailer before the publish.
//!
//! A name is 1 to 128 printable ASCII characters without `:` or white space,
//! and does not begin with `Nats-` or `Outbox-` in any case (those are the
//! server's and the tailer's); a value is a string without CR or LF; one
//! event's names and values together take at most [`MAX_BYTES`] bytes.
//! Stored as a JSON object of strings in `event_outbox.headers`.

use std::fmt;

/// The most bytes one event's header names and values may take together.
pub const MAX_BYTES: usize = 16_384;
/// The longest header name.
pub const MAX_NAME: usize = 128;

/// A header that breaks the rules; the text names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Empty, too long, or holding a character a name cannot have.
    Name(String),
    /// Begins with `Nats-` or `Outbox-`.
    Reserved(String),
    /// The value holds a CR or LF (it would end the header line).
    Value(String),
    /// A value that is not a JSON string (in the stored object).
    NotAString(String),
    /// The stored headers are not a JSON object.
    NotAnObject,
    /// Names and values take more than [`MAX_BYTES`] together.
    TooLarge(usize),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Name(name) => write!(
                f,
                "header name {name:?} is not 1 to {MAX_NAME} printable ASCII characters without ':' or white space"
            ),
            HeaderError::Reserved(name) => write!(
                f,
                "header name {name:?} begins with Nats- or Outbox-, which are reserved"
            ),
            HeaderError::Value(name) => {
                write!(f, "header {name:?} has a CR or LF in its value")
            }
            HeaderError::NotAString(name) => write!(f, "header {name:?} is not a string"),
            HeaderError::NotAnObject => write!(f, "headers are not a JSON object of strings"),
            HeaderError::TooLarge(bytes) => write!(
                f,
                "headers take {bytes} bytes, over the {MAX_BYTES} one event may carry"
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Checks one header by the rules above (all but the total size).
pub fn check(name: &str, value: &str) -> Result<(), HeaderError> {
    let printable = |b: u8| b.is_ascii_graphic() && b != b':';
    if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(printable) {
        return Err(HeaderError::Name(name.to_owned()));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("nats-") || lower.starts_with("outbox-") {
        return Err(HeaderError::Reserved(name.to_owned()));
    }
    if value.contains(['\r', '\n']) {
        return Err(HeaderError::Value(name.to_owned()));
    }
    Ok(())
}

/// Checks every header, and their total size.
pub fn check_all<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), HeaderError> {
    let mut bytes = 0;
    for (name, value) in headers {
        check(name, value)?;
        bytes += name.len() + value.len();
    }
    if bytes > MAX_BYTES {
        return Err(HeaderError::TooLarge(bytes));
    }
    Ok(())
}

/// The stored `headers` (a JSON object of strings, as PostgreSQL renders the
/// jsonb), checked: the pairs in the object's order. `null` and `{}` are none.
pub fn parse(json: &str) -> Result<Vec<(String, String)>, HeaderError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|_| HeaderError::NotAnObject)?;
    let object = match value {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Object(object) => object,
        _ => return Err(HeaderError::NotAnObject),
    };
    let mut pairs = Vec::with_capacity(object.len());
    for (name, value) in object {
        match value {
            serde_json::Value::String(value) => pairs.push((name, value)),
            _ => return Err(HeaderError::NotAString(name)),
        }
    }
    check_all(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_values_and_sizes_follow_the_contract() {
        for ok in [
            "tenant",
            "traceparent",
            "x-schema-version",
            "Content-Type",
            "a",
        ] {
            assert_eq!(check(ok, "v"), Ok(()), "{ok}");
        }
        let long = "n".repeat(MAX_NAME + 1);
        for bad in ["", "with space", "colon:", "tab\t", "é", long.as_str()] {
            assert_eq!(
                check(bad, "v"),
                Err(HeaderError::Name(bad.into())),
                "{bad:?}"
            );
        }
        assert!(check(&"n".repeat(MAX_NAME), "v").is_ok());
        for reserved in [
            "Nats-Msg-Id",
            "nats-anything",
            "OUTBOX-Event-Id",
            "outbox-x",
        ] {
            assert_eq!(
                check(reserved, "v"),
                Err(HeaderError::Reserved(reserved.into()))
            );
        }
        assert_eq!(
            check("a", "line\nbreak"),
            Err(HeaderError::Value("a".into()))
        );
        assert_eq!(check("a", "cr\r"), Err(HeaderError::Value("a".into())));
        assert!(check("a", "tabs\tand ünïcode are fine").is_ok());
        let value = "v".repeat(MAX_BYTES);
        assert_eq!(
            check_all([("a", value.as_str())]),
            Err(HeaderError::TooLarge(MAX_BYTES + 1))
        );
        assert!(check_all([("a", &value[1..])]).is_ok());
    }

    #[test]
    fn the_stored_object_is_read_and_checked() {
        assert_eq!(
            parse(r#"{"tenant": "acme", "traceparent": "00-ab-cd-01"}"#).unwrap(),
            [
                ("tenant".into(), "acme".into()),
                ("traceparent".into(), "00-ab-cd-01".into())
            ]
        );
        assert_eq!(parse("null").unwrap(), []);
        assert_eq!(parse("{}").unwrap(), []);
        assert_eq!(parse(r#"["a"]"#), Err(HeaderError::NotAnObject));
        assert_eq!(
            parse(r#"{"n": 1}"#),
            Err(HeaderError::NotAString("n".into()))
        );
        assert_eq!(
            parse(r#"{"Nats-Msg-Id": "x"}"#),
            Err(HeaderError::Reserved("Nats-Msg-Id".into()))
        );
        let error = parse(r#"{"bad name": "x"}"#).unwrap_err().to_string();
        assert!(error.contains("\"bad name\""), "{error}");
    }
}
