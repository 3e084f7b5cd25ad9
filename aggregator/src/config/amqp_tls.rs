//! The TLS settings of `amqps://` connections to RabbitMQ: which extra CAs to trust
//! (`AMQP_CA_FILE`) and which client certificate to present (`AMQP_CLIENT_CERT_FILE` +
//! `AMQP_CLIENT_KEY_FILE`), read and checked once at start-up.
//!
//! Invariants:
//! - the files are read here, once, and their contents kept: what was checked is what
//!   every later connection uses (a file changed or removed afterwards changes nothing
//!   until a restart);
//! - each file holds what its variable promises (at least one PEM certificate; one
//!   unencrypted PEM private key), the certificate and the key come together or not at
//!   all, and none is set while `AMQP_URL` is a plain `amqp://` URL (where it would
//!   silently do nothing);
//! - there is no setting that turns peer verification off: an `amqps://` connection
//!   always checks the broker's chain and host name (see `broker::tls`).

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretString;

use super::Env;
use super::variables::{AMQP_CA_FILE, AMQP_CLIENT_CERT_FILE, AMQP_CLIENT_KEY_FILE, AMQP_URL};
use crate::error::ConfigError;

/// TLS material for `amqps://` connections; empty (the default) for plain `amqp://` or
/// when the system's CAs suffice and the broker asks for no client certificate.
#[derive(Debug, Clone, Default)]
pub struct AmqpTls {
    /// PEM certificates trusted besides the system's CAs (`AMQP_CA_FILE`).
    pub ca_pem: Option<String>,
    /// Client certificate presented to the broker.
    pub client: Option<ClientIdentity>,
}

/// A client certificate (chain, PEM) and its private key (PEM, secret).
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The certificate, leaf first, then intermediates (`AMQP_CLIENT_CERT_FILE`).
    pub cert_pem: String,
    /// Its unencrypted private key (`AMQP_CLIENT_KEY_FILE`).
    pub key_pem: SecretString,
    /// The file the key was read from (for the start-up check of its permissions).
    pub key_file: String,
}

/// Reads and checks the three TLS variables for the broker URL `amqp_url` (already
/// validated as `amqp://` or `amqps://`; the first node's when `AMQP_URL` lists several).
///
/// # Errors
/// [`ConfigError`] naming the variable when a file cannot be read, is not what it should
/// hold, the certificate or the key comes without the other, or a file is set while
/// `amqp_url` is plain `amqp://`.
pub(super) fn from_env(env: &Env<'_>, amqp_url: &str) -> Result<AmqpTls, ConfigError> {
    let ca_path = env.get(AMQP_CA_FILE);
    let cert_path = env.get(AMQP_CLIENT_CERT_FILE);
    let key_path = env.get(AMQP_CLIENT_KEY_FILE);
    let first_set = [
        (AMQP_CA_FILE, &ca_path),
        (AMQP_CLIENT_CERT_FILE, &cert_path),
        (AMQP_CLIENT_KEY_FILE, &key_path),
    ]
    .into_iter()
    .find_map(|(key, path)| path.as_ref().map(|_| key));
    if let Some(key) = first_set
        && !is_tls_url(amqp_url)
    {
        return Err(ConfigError::Conflict {
            key: key.to_string(),
            problem: format!(
                "is set but {AMQP_URL} is a plain amqp:// URL, so it would do nothing"
            ),
            fix: format!("use amqps:// with the broker's TLS port (usually 5671), or unset {key}"),
        });
    }
    let ca_pem = ca_path
        .map(|path| read_trust_anchors(AMQP_CA_FILE, &path))
        .transpose()?;
    let client = match (cert_path, key_path) {
        (None, None) => None,
        (Some(_), None) => return Err(missing_pair(AMQP_CLIENT_CERT_FILE, AMQP_CLIENT_KEY_FILE)),
        (None, Some(_)) => return Err(missing_pair(AMQP_CLIENT_KEY_FILE, AMQP_CLIENT_CERT_FILE)),
        (Some(cert), Some(key)) => Some(ClientIdentity {
            cert_pem: read_certificates(AMQP_CLIENT_CERT_FILE, &cert)?,
            key_pem: read_private_key(AMQP_CLIENT_KEY_FILE, &key)?,
            key_file: key,
        }),
    };
    Ok(AmqpTls { ca_pem, client })
}

/// Whether the broker URL asks for TLS. For a list of nodes the caller passes the first
/// one: every node has its scheme, and the TLS files apply to each of them.
fn is_tls_url(amqp_url: &str) -> bool {
    url::Url::parse(amqp_url).is_ok_and(|u| u.scheme() == "amqps")
}

fn missing_pair(set: &str, unset: &str) -> ConfigError {
    ConfigError::Conflict {
        key: set.to_string(),
        problem: format!("is set without {unset}"),
        fix: format!(
            "a client certificate needs its private key: set both {AMQP_CLIENT_CERT_FILE} and {AMQP_CLIENT_KEY_FILE}, or neither"
        ),
    }
}

/// The text of the file `path` names (variable `key`).
fn read(key: &str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(Path::new(path)).map_err(|e| ConfigError::File {
        key: key.to_string(),
        path: path.to_string(),
        reason: format!("{e}; it must be a PEM file readable by the service's user"),
    })
}

/// The file's text, once it holds at least one well-formed PEM certificate.
fn read_certificates(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = read(key, path)?;
    certificates(key, path, &text)?;
    Ok(text)
}

/// The file's text, once every certificate in it can serve as a trusted CA (the verifier
/// refuses the whole set at every connection otherwise).
fn read_trust_anchors(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = read(key, path)?;
    for (n, cert) in certificates(key, path, &text)?.into_iter().enumerate() {
        rustls::RootCertStore::empty().add(cert).map_err(|e| {
            ConfigError::invalid(
                key,
                path,
                &format!(
                    "X.509 CA certificates (certificate {} does not parse: {e})",
                    n + 1
                ),
            )
        })?;
    }
    Ok(text)
}

/// The PEM certificates in `text`: at least one, all well-formed PEM.
fn certificates(
    key: &str,
    path: &str,
    text: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    match CertificateDer::pem_slice_iter(text.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(ConfigError::invalid(
            key,
            path,
            "a PEM file with at least one certificate (-----BEGIN CERTIFICATE-----)",
        )),
        Err(e) => Err(ConfigError::invalid(
            key,
            path,
            &format!("a well-formed PEM certificate file ({e})"),
        )),
    }
}

/// The file's text, once it holds an unencrypted PEM private key.
fn read_private_key(key: &str, path: &str) -> Result<SecretString, ConfigError> {
    let text = read(key, path)?;
    if PrivateKeyDer::from_pem_slice(text.as_bytes()).is_ok() {
        return Ok(SecretString::from(text));
    }
    let allowed = if text.contains("ENCRYPTED PRIVATE KEY") {
        "an UNENCRYPTED PEM private key: this one is encrypted (decrypt it with `openssl pkey -in KEY -out KEY.pem` and protect the file instead)"
    } else {
        "an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
    };
    Err(ConfigError::invalid(key, path, allowed))
}

#[cfg(test)]
mod tests;
