//! TLS of `amqps://` connections: the client configuration handed to lapin, and the
//! reading of a failed handshake into one line that says what to do.
//!
//! What lapin 4.12 (default features: rustls with the platform verifier) does with it,
//! checked against a real RabbitMQ 4.0 (tests/amqp_tls):
//! - the broker's chain is verified against the system's CAs PLUS the certificates of
//!   `AMQP_CA_FILE` (added to, not replacing, the system's); on Linux the system's are the
//!   ones `SSL_CERT_FILE` / `SSL_CERT_DIR` or the distribution's bundle name. A system with
//!   none (the service image) and no `AMQP_CA_FILE` cannot verify any broker;
//! - the host name of `AMQP_URL` must be one the certificate names (a DNS name, or an IP
//!   address as an IP SAN);
//! - the client certificate goes in as `OwnedIdentity::PKCS8`, which despite its name
//!   takes any unencrypted PEM key (PKCS#8, PKCS#1, SEC1);
//! - nothing here can switch verification off.
//!
//! A handshake failure reaches us as a lapin I/O error whose inner error is a
//! `rustls::Error`; [`failure`] maps the ones retrying cannot fix to a reason and a fix.
//! Anything else (a reset, a refused connection) stays an ordinary, retried broker error.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::{AlertDescription, CertificateError};
use secrecy::ExposeSecret as _;

use crate::config::AmqpTls;
use crate::config::variables::{AMQP_CA_FILE, AMQP_CLIENT_CERT_FILE, AMQP_CLIENT_KEY_FILE};

/// The TLS configuration lapin uses for `amqps://` (ignored for `amqp://`).
pub(super) fn client_config(tls: &AmqpTls) -> OwnedTLSConfig {
    OwnedTLSConfig {
        identity: tls.client.as_ref().map(|c| OwnedIdentity::PKCS8 {
            pem: c.cert_pem.as_bytes().to_vec(),
            key: c.key_pem.expose_secret().as_bytes().to_vec(),
        }),
        cert_chain: tls.ca_pem.clone(),
    }
}

/// Why a TLS handshake failed and what the operator should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    /// What went wrong (no secret: certificate names at most).
    pub reason: String,
    /// What to change.
    pub fix: String,
}

/// The TLS failure inside a connection error, when it is one retrying cannot fix (a
/// certificate, a name, a missing client certificate, a server that does not speak TLS).
pub(super) fn failure(err: &lapin::Error, tls: &AmqpTls) -> Option<Failure> {
    let lapin::ErrorKind::IOError(io) = err.kind() else {
        return None;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(e) = cause {
        if let Some(tls_error) = e.downcast_ref::<rustls::Error>() {
            return explain(tls_error, tls);
        }
        cause = e.source();
    }
    None
}

fn explain(e: &rustls::Error, tls: &AmqpTls) -> Option<Failure> {
    let failure = |reason: String, fix: &str| {
        Some(Failure {
            reason,
            fix: fix.to_string(),
        })
    };
    match e {
        rustls::Error::InvalidCertificate(cert) => {
            let fix = match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    if tls.ca_pem.is_some() {
                        format!(
                            "{AMQP_CA_FILE} must hold the CA that signed the broker's certificate"
                        )
                    } else {
                        format!("set {AMQP_CA_FILE} to the CA that signed the broker's certificate")
                    }
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "put a host name the broker's certificate names into AMQP_URL, or reissue the certificate for this name".to_string()
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    "renew the broker's certificate (or correct this host's clock)".to_string()
                }
                _ => format!(
                    "check the broker's certificate (ssl_options.certfile) and {AMQP_CA_FILE}"
                ),
            };
            failure(format!("cannot verify the broker's certificate: {e}"), &fix)
        }
        rustls::Error::InvalidMessage(_) => failure(
            format!("the server does not speak TLS on this port ({e})"),
            "point the amqps:// URL at the broker's TLS listener (usually port 5671), or use amqp:// for a plain listener",
        ),
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired)
            if tls.client.is_none() =>
        {
            failure(
                "the broker requires a client certificate and none is configured".to_string(),
                &format!("set {AMQP_CLIENT_CERT_FILE} and {AMQP_CLIENT_KEY_FILE}"),
            )
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied),
        ) => failure(
            format!("the broker refused the client certificate (TLS alert {alert:?})"),
            &format!(
                "set {AMQP_CLIENT_CERT_FILE} to a valid certificate signed by a CA the broker trusts (its ssl_options.cacertfile)"
            ),
        ),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::HandshakeFailure
            | AlertDescription::ProtocolVersion
            | AlertDescription::InsufficientSecurity
            | AlertDescription::NoApplicationProtocol),
        ) => failure(
            format!("the broker ended the TLS handshake (TLS alert {alert:?})"),
            "check that the broker's ssl_options (versions, ciphers, verify) accept this client",
        ),
        // Any other alert (an internal error, a close during a broker restart) may pass:
        // retried like any connection failure.
        rustls::Error::InconsistentKeys(_) => failure(
            format!("{AMQP_CLIENT_KEY_FILE} is not the private key of {AMQP_CLIENT_CERT_FILE}"),
            "give the certificate's own key",
        ),
        rustls::Error::General(message) if message.contains("CA certificates") => failure(
            format!("there is no CA to verify the broker with ({message})"),
            &format!(
                "set {AMQP_CA_FILE} to the CA that signed the broker's certificate (the service image has no system CA bundle)"
            ),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(e: rustls::Error) -> lapin::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e).into()
    }

    #[test]
    fn certificate_failures_say_what_to_set() {
        let none = AmqpTls::default();
        let f = failure(
            &io_error(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            &none,
        )
        .expect("a TLS failure");
        assert!(f.fix.starts_with("set AMQP_CA_FILE"), "{f:?}");
        let f = failure(
            &io_error(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired,
            )),
            &none,
        )
        .expect("a TLS failure");
        assert!(f.fix.contains(AMQP_CLIENT_CERT_FILE), "{f:?}");
    }

    #[test]
    fn other_io_errors_stay_retryable() {
        let refused: lapin::Error =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert_eq!(failure(&refused, &AmqpTls::default()), None);
        let decrypt = io_error(rustls::Error::DecryptError);
        assert_eq!(failure(&decrypt, &AmqpTls::default()), None);
    }
}
