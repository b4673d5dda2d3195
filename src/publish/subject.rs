//! Subjects: `<prefix>.<aggregate_type>.<event_type>` (docs/contract.md section 3).
//! Pure code.
//!
//! `aggregate_type` is one token; dots in `event_type` stay subject hierarchy.
//! In every token each character other than ASCII letters, digits, `-` and `_`
//! becomes `_` (so a dot in `aggregate_type`, whitespace, `*`, `>` and
//! non-ASCII all do), and an empty token becomes `_`. Whatever the row holds,
//! the result is a valid, wildcard-free subject under `<prefix>.>`.

/// The subject for an event. `prefix` is validated by the configuration.
pub fn subject(prefix: &str, aggregate_type: &str, event_type: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + aggregate_type.len() + event_type.len() + 2);
    out.push_str(prefix);
    out.push('.');
    push_token(&mut out, aggregate_type);
    for token in event_type.split('.') {
        out.push('.');
        push_token(&mut out, token);
    }
    out
}

fn push_token(out: &mut String, token: &str) {
    if token.is_empty() {
        out.push('_');
        return;
    }
    out.extend(token.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::subject;

    #[test]
    fn maps_the_contract_cases() {
        let cases = [
            ("chat", "message.created", "events.chat.message.created"),
            (
                "chat.v2",
                "message.created",
                "events.chat_v2.message.created",
            ),
            (
                "chat room",
                "message created",
                "events.chat_room.message_created",
            ),
            ("*", ">", "events._._"),
            ("", "", "events._._"),
            ("chat", "a..b.", "events.chat.a._.b._"),
            ("чат", "créé", "events.___.cr__"),
            ("order-1_x", "Paid", "events.order-1_x.Paid"),
            ("tab\there", "line\nbreak", "events.tab_here.line_break"),
        ];
        for (aggregate_type, event_type, want) in cases {
            assert_eq!(
                subject("events", aggregate_type, event_type),
                want,
                "{aggregate_type:?} {event_type:?}"
            );
        }
    }

    #[test]
    fn every_result_is_a_valid_literal_subject() {
        let odd = [
            "",
            ".",
            "..",
            " ",
            "*",
            ">",
            "a.*.>",
            "é",
            "\u{0}",
            "x y.z",
            "🙂.🙂",
        ];
        for a in odd {
            for e in odd {
                let s = subject("app.events", a, e);
                assert!(s.starts_with("app.events."), "{s}");
                for token in s.split('.') {
                    assert!(!token.is_empty(), "empty token in {s:?}");
                    assert!(
                        token
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                        "{s:?}"
                    );
                }
            }
        }
    }
}
