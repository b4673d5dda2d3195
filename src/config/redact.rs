//! Secrets out of anything printed: URLs with credentials, libpq
//! `password=` values. Config keeps only redacted URL text, so its derived
//! `Debug` cannot show a password.

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`, and
/// `password=secret` → `password=***`, for anything that gets printed. Each
/// of several comma-separated servers is redacted on its own; credentials run
/// to the last `@` (a password may hold `/`, `?` or `:`); a quoted
/// `password='a b'` is redacted whole.
pub fn redact_url(url: &str) -> String {
    let mut out: String = url
        .split(',')
        .map(redact_userinfo)
        .collect::<Vec<_>>()
        .join(",");
    let mut from = 0;
    while let Some(found) = out[from..].find("password=") {
        let value_start = from + found + "password=".len();
        let rest = &out[value_start..];
        let value_len = match rest.strip_prefix('\'') {
            Some(quoted) => quoted.find('\'').map_or(rest.len(), |end| end + 2),
            None => rest.find(['&', ' ']).unwrap_or(rest.len()),
        };
        out.replace_range(value_start..value_start + value_len, "***");
        from = value_start + 3;
    }
    out
}

/// The userinfo of one `scheme://userinfo@host…`, redacted.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let Some(at) = url[start..].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &url[start..start + at];
    let redacted = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        // A lone token (nats://token@host) is a secret too.
        None if url.starts_with("nats") || url.starts_with("tls") => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    format!("{}{redacted}{}", &url[..start], &url[start + at..])
}
