//! Redaction of connection URLs for logs and error messages: passwords and
//! secret-bearing query values never leave the process in clear.

/// Query-string keys whose values are secrets (libpq's `password`, `sslpassword`, and
/// anything naming a password, key, token or secret, compared case-insensitively).
fn is_secret_query_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Whether `raw` has user info that `parsed` did not see as such: an unescaped '/', '?'
/// or '#' in a password ends the authority early for a WHATWG parser (the password then
/// lands in the path), while PostgreSQL's and AMQP's parsers still read it as a password.
pub(super) fn hides_credentials(raw: &str, parsed: &url::Url) -> bool {
    let after_scheme = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let authority_end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let userinfo_seen = !parsed.username().is_empty() || parsed.password().is_some();
    let rest = after_scheme[authority_end..]
        .split('#')
        .next()
        .unwrap_or_default();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // '@' in a query VALUE is fine (`?user=me@corp`); in the path or a query key it is the
    // end of misread user info.
    let misread = path.contains('@')
        || query
            .split('&')
            .any(|pair| pair.split('=').next().unwrap_or_default().contains('@'));
    !userinfo_seen && misread
}

/// Shows a URL with its password and every secret-bearing query value (see
/// `is_secret_query_key`) replaced by `***`, and without a fragment, for logs and error
/// messages. Input that does not parse as a URL, or whose user info does not parse as such
/// (see `hides_credentials`), is hidden entirely.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) if hides_credentials(raw, &u) => {
            "<URL with unescaped credentials hidden>".to_string()
        }
        Ok(mut u) => {
            u.set_fragment(None);
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let shown = if is_secret_query_key(&k) {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), shown)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL hidden>".to_string(),
    }
}
