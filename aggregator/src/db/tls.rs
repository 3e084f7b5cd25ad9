//! TLS to PostgreSQL: the ONE way the service opens a PostgreSQL session (the pool, the
//! migrations, `verify`) and cancels a statement, over rustls.
//!
//! It owns libpq's TLS parameters in `DATABASE_URL`, which tokio-postgres only partly
//! knows (it accepts `sslmode=disable|prefer|require` and rejects every other parameter
//! named here):
//!
//! | parameter | meaning (as libpq) |
//! | --- | --- |
//! | `sslmode` | `disable`, `prefer` (default), `require`, `verify-ca`, `verify-full` |
//! | `sslrootcert` | PEM file of the CA(s) the server's certificate must chain to |
//! | `sslcert`, `sslkey` | client certificate and its private key (PEM), both or neither |
//! | `sslpassword` | accepted and ignored: an encrypted key is refused at start-up |
//!
//! [`PgConnector::from_url`] reads them (and the files they name), removes them from
//! the URL and hands the rest to tokio-postgres; a bad setting is a start-up error.
//!
//! Invariants:
//! - the server's certificate is checked exactly as libpq does: not at all for
//!   `prefer`/`require` without `sslrootcert`; its chain against `sslrootcert` for
//!   `verify-ca` (and `prefer`/`require` with `sslrootcert`); chain and host name for
//!   `verify-full`. Handshake signatures are always checked;
//! - `prefer` falls back to a plain session when the server offers no TLS or the TLS
//!   handshake fails (as libpq); no other mode ever sends a byte unencrypted;
//! - the crypto provider is chosen here (aws-lc-rs), never rustls's process default:
//!   builds that compile in both aws-lc-rs and ring have none.

use std::str::FromStr;

use diesel_async::AsyncPgConnection;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::redact_url;
use crate::config::variables::DATABASE_URL;
use crate::error::{ConfigError, DbError};

mod errors;
mod files;
mod verifier;

use self::files::{read_certs, read_key, read_roots};
use self::verifier::client_config;

/// URL parameter: how much TLS to demand (libpq's name).
pub const SSLMODE: &str = "sslmode";
/// URL parameter: PEM file of the trusted CA certificates.
pub const SSLROOTCERT: &str = "sslrootcert";
/// URL parameter: PEM file of the client certificate (chain).
pub const SSLCERT: &str = "sslcert";
/// URL parameter: PEM file of the client certificate's private key.
pub const SSLKEY: &str = "sslkey";
/// URL parameter: passphrase of an encrypted `sslkey` (accepted, never used: such keys
/// are refused).
pub const SSLPASSWORD: &str = "sslpassword";

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, else plain text (libpq's default).
    Prefer,
    /// TLS always; the certificate is checked only against `sslrootcert`, when given.
    Require,
    /// TLS; the certificate must chain to `sslrootcert` (any host name).
    VerifyCa,
    /// TLS; the certificate must chain to `sslrootcert` and name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// Every mode, in libpq's order (for messages).
    pub const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The URL value.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it knows no `verify-*` (the checks live in the
    /// certificate verifier here), for which TLS is required.
    fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as D;
        match self {
            SslMode::Disable => D::Disable,
            SslMode::Prefer => D::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => D::Require,
        }
    }
}

impl FromStr for SslMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == s).ok_or(())
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not at all (only the handshake signatures): `prefer`/`require` without a CA.
    Nothing,
    /// Chain to `sslrootcert`, any host name.
    Chain,
    /// Chain and host name.
    ChainAndName,
}

/// Everything needed to open (and cancel on) PostgreSQL sessions for one URL: the
/// driver's configuration without the TLS parameters, the TLS connector and the mode.
/// Cheap to clone.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mode: SslMode,
    check: Check,
    client_cert: bool,
    /// The `sslkey` file, when given (its permissions are checked at start-up).
    key_file: Option<String>,
    /// The URL as logs show it.
    shown: String,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnector")
            .field("url", &self.shown)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The TLS parameters taken out of a URL.
#[derive(Debug, Default)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl PgConnector {
    /// Reads the TLS parameters of `url` and the files they name, and checks the rest
    /// of the URL the way tokio-postgres will read it.
    ///
    /// # Errors
    /// [`ConfigError::UrlParameter`] naming the parameter, its value and the fix: an
    /// unknown `sslmode`, `verify-*` without `sslrootcert`, a file that cannot be read or
    /// holds no usable PEM, `sslcert` without `sslkey` (or the reverse), a parameter
    /// tokio-postgres does not know.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let (rest, params) = split_tls_params(url)?;
        let mode = match params.mode.as_deref() {
            None => SslMode::Prefer,
            Some(v) => v.parse().map_err(|()| {
                invalid(
                    format!("{SSLMODE}=\"{v}\" is not an sslmode"),
                    "use disable, prefer, require, verify-ca or verify-full (verify-full authenticates the server)",
                )
            })?,
        };
        let check = match (mode, &params.root_cert) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(invalid(
                    format!("{SSLMODE}={mode} without {SSLROOTCERT}"),
                    &format!(
                        "add {SSLROOTCERT}=/path/to/ca.pem (the CA that signed the server's certificate)"
                    ),
                ));
            }
            (SslMode::VerifyFull, Some(_)) => Check::ChainAndName,
            (_, Some(_)) => Check::Chain,
            (_, None) => Check::Nothing,
        };
        let roots = params.root_cert.as_deref().map(read_roots).transpose()?;
        let client = match (&params.cert, &params.key) {
            (Some(cert), Some(key)) => Some((read_certs(SSLCERT, cert)?, read_key(key)?)),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(invalid(
                    format!("only one of {SSLCERT} and {SSLKEY} is set"),
                    "set both (the client certificate and its private key, PEM) or neither",
                ));
            }
        };
        let client_cert = client.is_some();
        let tls = client_config(check, roots, client)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
            invalid(
                format!("the URL does not parse ({e}{cause})"),
                "remove or correct that parameter (libpq parameters other than sslmode, sslrootcert, sslcert, sslkey and sslpassword are not supported)",
            )
        })?;
        config.ssl_mode(mode.driver_mode());
        Ok(PgConnector {
            config,
            tls: MakeRustlsConnect::new(tls),
            mode,
            check,
            client_cert,
            key_file: params.key.clone(),
            shown: redact_url(url),
        })
    }

    /// Shows the server as `operator_url` (redacted) in errors: the URL the operator
    /// wrote, not the session URL derived from it.
    pub fn shown_as(mut self, operator_url: &str) -> Self {
        self.shown = redact_url(operator_url);
        self
    }

    /// The `sslmode` in force.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The TLS connector, for a cancel request (which opens its own session).
    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// One sentence: what the mode protects against and what it does not (logged at
    /// start-up, so `prefer` never passes for secure).
    pub fn protection(&self) -> String {
        let what = match (self.mode, self.check) {
            (SslMode::Disable, _) => {
                "no encryption: votes, queries and the password cross the network in plain text; use sslmode=verify-full"
            }
            (SslMode::Prefer, Check::Nothing) => {
                "encrypted only if the server offers TLS (else plain text, silently), and the server is NOT authenticated: an active attacker can read and change the session; use sslmode=verify-full with sslrootcert"
            }
            (SslMode::Prefer, _) => {
                "encrypted only if the server offers TLS (else plain text, silently; a failed certificate check also falls back to plain text): an active attacker can force plain text; use sslmode=verify-full"
            }
            (SslMode::Require, Check::Nothing) => {
                "always encrypted, but the server is NOT authenticated: protects against eavesdropping, not against an attacker who impersonates the server; use sslmode=verify-full with sslrootcert"
            }
            (SslMode::Require | SslMode::VerifyCa, _) => {
                "always encrypted; the server's certificate must be signed by the CA in sslrootcert, but its host name is not checked: any server holding a certificate from that CA is accepted; use sslmode=verify-full to check the name too"
            }
            (SslMode::VerifyFull, _) => {
                "always encrypted; the server's certificate must be signed by the CA in sslrootcert and name the host connected to: protects against eavesdropping and impersonation"
            }
        };
        let client = if self.client_cert {
            "; a client certificate is presented"
        } else {
            ""
        };
        format!("PostgreSQL TLS sslmode={}: {what}{client}", self.mode)
    }

    /// Opens one session.
    ///
    /// # Errors
    /// [`DbError::ConnectTls`] (one line naming the server, the mode and the fix) when
    /// TLS failed or the server refused the session for a reason TLS settings can fix;
    /// [`DbError::Connect`] for anything else (server down, wrong password).
    pub async fn connect(&self) -> Result<AsyncPgConnection, DbError> {
        let first = self.config.connect(self.tls.clone()).await;
        let (client, connection) = match first {
            // libpq's `prefer`: a failed TLS handshake is retried in plain text.
            Err(e) if self.mode == SslMode::Prefer && errors::is_tls_handshake(&e) => {
                // Never silent: with sslrootcert, this is a certificate that failed its
                // check, and the session goes on unencrypted.
                tracing::warn!(
                    server = %self.shown,
                    "PostgreSQL TLS handshake failed under sslmode=prefer ({}); connecting in plain text, as libpq does (sslmode=verify-full refuses instead)",
                    errors::one_line(&errors::with_causes(&e))
                );
                let mut plain = self.config.clone();
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                plain.connect(self.tls.clone()).await
            }
            other => other,
        }
        .map_err(|e| errors::connect_error(self, &e))?;
        AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| DbError::Connect {
                url: self.shown.clone(),
                reason: errors::one_line(&e.to_string()),
            })
    }
}

/// Splits `url` into the URL without libpq's TLS parameters and those parameters.
/// Every other query pair is kept byte for byte.
fn split_tls_params(url: &str) -> Result<(String, TlsParams), ConfigError> {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return Err(invalid(
            "it does not parse as a URL".to_string(),
            "write it as postgres://user:password@host:port/database?parameters",
        ));
    };
    let query = parsed.query().unwrap_or_default().to_string();
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        let slot = match key {
            SSLMODE => &mut params.mode,
            SSLROOTCERT => &mut params.root_cert,
            SSLCERT => &mut params.cert,
            SSLKEY => &mut params.key,
            SSLPASSWORD => continue,
            _ => {
                kept.push(piece);
                continue;
            }
        };
        // libpq: the last occurrence wins; an empty value means "not set".
        *slot = Some(value).filter(|v| !v.is_empty());
    }
    parsed.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
    Ok((parsed.to_string(), params))
}

/// A bad TLS setting in `DATABASE_URL`.
fn invalid(detail: String, fix: &str) -> ConfigError {
    ConfigError::UrlParameter {
        key: DATABASE_URL.to_string(),
        detail,
        fix: fix.to_string(),
    }
}

/// Logs, once at start-up, what the `sslmode` of `url` protects against and what it
/// does not (a warning unless it authenticates the server, `verify-full`), and a warning
/// when the `sslkey` file can be read by others than its owner.
pub fn log_protection(url: &secrecy::SecretString) {
    use secrecy::ExposeSecret as _;
    match PgConnector::from_url(url.expose_secret()) {
        Ok(c) => {
            if c.mode == SslMode::VerifyFull {
                tracing::info!("{}", c.protection());
            } else {
                tracing::warn!("{}", c.protection());
            }
            let exposed = c.key_file.as_deref();
            if let Some(w) = exposed.and_then(|k| crate::config::exposure_warning(SSLKEY, k)) {
                tracing::warn!("{w}");
            }
        }
        // Refused by the configuration check already; each checkout reports it too.
        Err(e) => tracing::warn!("{e}"),
    }
}

/// Best-effort cancel of the statement running on the session `token` came from, over
/// the same TLS settings as the session (a cancel request opens its own connection). The
/// certificate files are read off the runtime's thread; a cancel that cannot be sent is
/// logged (the server's `statement_timeout` ends the statement anyway).
pub(crate) async fn cancel(token: tokio_postgres::CancelToken, url: &str) {
    // The session's options do not matter to a cancel request: the operator's URL will do.
    let url = url.to_string();
    let connector = tokio::task::spawn_blocking(move || PgConnector::from_url(&url)).await;
    let sent = match connector {
        Ok(Ok(c)) => token.cancel_query(c.tls()).await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(reason) = sent {
        tracing::debug!(%reason, "cannot send a cancel request to PostgreSQL");
    }
}

#[cfg(test)]
mod tests;
