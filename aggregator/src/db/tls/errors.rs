//! Turns a failed PostgreSQL connection into ONE line naming the server, the `sslmode`
//! and what to do, instead of tokio-postgres's chain of nested causes (and the
//! multi-line DETAIL/HINT of a server error).

use std::error::Error as _;

use super::{PgConnector, SSLCERT, SSLKEY, SSLROOTCERT};
use crate::config::variables::DATABASE_URL;
use crate::error::DbError;

/// tokio-postgres's text for a failed TLS handshake (its error kinds are private).
const TLS_HANDSHAKE: &str = "error performing TLS handshake";
/// tokio-postgres's text when `require` meets a server that answered 'N' to SSLRequest.
const NO_TLS_ON_SERVER: &str = "server does not support TLS";

/// Whether `e` is a TLS handshake that rustls failed (what `prefer` retries in plain
/// text). Not tokio-postgres's own refusals of the same kind (no TLS on the server,
/// `prefer` with `sslnegotiation=direct`).
pub(super) fn is_tls_handshake(e: &tokio_postgres::Error) -> bool {
    e.to_string().starts_with(TLS_HANDSHAKE) && rustls_error(e).is_some()
}

/// `text` on one line (server errors carry DETAIL and HINT lines).
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rustls error inside a failed handshake, if any.
fn rustls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cause = c.source();
    }
    None
}

/// The one-line error for a connection attempt that failed with `e`.
pub(super) fn connect_error(connector: &PgConnector, e: &tokio_postgres::Error) -> DbError {
    let tls = |reason: String, fix: String| DbError::ConnectTls {
        url: connector.shown.clone(),
        mode: connector.mode.as_str(),
        reason,
        fix,
    };
    let text = e.to_string();
    // Both are tokio-postgres's TLS error kind; the cause tells them apart.
    let cause = e.source().map(ToString::to_string).unwrap_or_default();
    if cause.contains(NO_TLS_ON_SERVER) {
        return tls(
            "the server does not offer TLS (ssl=off)".into(),
            "turn ssl on in the server's postgresql.conf, or accept an unencrypted link with sslmode=prefer or disable".into(),
        );
    }
    if text.starts_with(TLS_HANDSHAKE) {
        let (reason, fix) = handshake_failure(connector, rustls_error(e));
        return tls(reason, fix);
    }
    if let Some(db) = e.as_db_error() {
        let message = one_line(db.message());
        let mentions = |word: &str| message.to_ascii_lowercase().contains(word);
        if mentions("certificate") {
            let fix = if connector.client_cert {
                format!(
                    "the server did not accept the client certificate in {SSLCERT}: its common name must be the user name and it must be signed by a CA in the server's ssl_ca_file"
                )
            } else {
                format!(
                    "the server demands a client certificate: set {SSLCERT} and {SSLKEY} (PEM) in {DATABASE_URL}"
                )
            };
            return tls(format!("the server refused the session: {message}"), fix);
        }
        if mentions("no encryption") || mentions("ssl off") {
            return tls(
                format!("the server refused the session: {message}"),
                "the server accepts this user only over TLS: set sslmode=verify-full (or require) with sslrootcert".into(),
            );
        }
    }
    DbError::Connect {
        url: connector.shown.clone(),
        reason: one_line(&with_causes(e)),
    }
}

/// `e` and every cause under it, joined by ": ". tokio-postgres's own message names only
/// the kind ("db error", "error connecting to server"); the server's words ("password
/// authentication failed for user …") or the I/O error are in the causes.
pub(super) fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// (reason, fix) for a TLS handshake that failed with `cause`.
fn handshake_failure(connector: &PgConnector, cause: Option<&rustls::Error>) -> (String, String) {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let host = connector
        .config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[allow(unreachable_patterns)]
            _ => "the socket".to_string(),
        })
        .unwrap_or_default();
    match cause {
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => (
            format!("the server's certificate is not signed by a CA in {SSLROOTCERT}"),
            format!("set {SSLROOTCERT} to the PEM file of the CA that signed the server's certificate"),
        ),
        Some(E::InvalidCertificate(C::NotValidForNameContext { presented, .. })) if presented.is_empty() => (
            "the server's certificate has no subjectAltName (libpq would fall back to its common name; this client does not)".into(),
            format!("reissue the server's certificate with subjectAltName DNS:{host} (or IP:{host})"),
        ),
        Some(E::InvalidCertificate(other)) if format!("{other:?}").contains("CaUsedAsEndEntity") => (
            "the server presents a CA certificate (basicConstraints CA:TRUE) as its own, e.g. a self-signed one made with `openssl req -x509`; libpq accepts that, this client does not".into(),
            format!("give the server a certificate signed by a CA (in {SSLROOTCERT}) with CA:FALSE"),
        ),
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => (
            format!("the server's certificate is not valid for the host name '{host}'"),
            "connect with a host name the certificate lists (subjectAltName), or use sslmode=verify-ca to check only the CA".into(),
        ),
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => (
            "the server's certificate has expired".into(),
            "renew the server's certificate".into(),
        ),
        Some(E::InvalidCertificate(other)) => (
            format!("the server's certificate was rejected ({other:?})"),
            format!("give the server a certificate signed by the CA in {SSLROOTCERT} for host '{host}'"),
        ),
        Some(E::AlertReceived(alert @ (A::UnknownCA | A::BadCertificate | A::CertificateRequired | A::CertificateUnknown | A::AccessDenied | A::DecryptError))) => {
            let fix = if connector.client_cert {
                format!("the server rejected the client certificate: give a {SSLCERT}/{SSLKEY} pair signed by a CA in the server's ssl_ca_file")
            } else {
                format!("the server demands a client certificate: set {SSLCERT} and {SSLKEY} in {DATABASE_URL}")
            };
            (format!("the server aborted the handshake ({alert:?})"), fix)
        }
        Some(other) => (
            format!("TLS handshake failed ({other})"),
            "check the server's TLS settings (ssl_min_protocol_version, its certificate and key)".into(),
        ),
        None => (
            "TLS handshake failed (the connection broke during it)".into(),
            "check that the address is a PostgreSQL server with ssl on".into(),
        ),
    }
}
