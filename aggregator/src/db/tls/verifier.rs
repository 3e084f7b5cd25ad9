//! The rustls side of a PostgreSQL session: the crypto provider (chosen here, never
//! rustls's process default) and the server certificate check of each [`Check`] level,
//! as libpq makes it.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{Check, SSLCERT, SSLKEY, SSLROOTCERT, invalid};
use crate::error::ConfigError;

/// The crypto provider of every PostgreSQL TLS session.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub(super) fn client_config(
    check: Check,
    roots: Option<RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let provider = provider();
    let verifier = PgVerifier::new(check, roots, &provider)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            invalid(
                format!("rustls refused its own defaults ({e})"),
                "report a bug",
            )
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
            invalid(
                format!("{SSLCERT} and {SSLKEY} do not make a usable pair ({e})"),
                "give the client certificate and the private key it was issued for",
            )
        })?,
    };
    // libpq 17 always offers ALPN "postgresql"; PostgreSQL 17 requires it of a direct TLS
    // connection (`sslnegotiation=direct`) and ignores it otherwise.
    config.alpn_protocols = vec![POSTGRES_ALPN.to_vec()];
    Ok(config)
}

/// The ALPN protocol name PostgreSQL registered.
const POSTGRES_ALPN: &[u8] = b"postgresql";

/// The server certificate check of one [`Check`] level (see the module invariants).
#[derive(Debug)]
struct PgVerifier {
    check: Check,
    /// Chain (and name) verification against `sslrootcert`; `None` for [`Check::Nothing`].
    webpki: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PgVerifier {
    fn new(
        check: Check,
        roots: Option<RootCertStore>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ConfigError> {
        let webpki = roots
            .map(|roots| {
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        invalid(
                            format!("{SSLROOTCERT} cannot be used ({e})"),
                            "give the PEM file of the CA that signed the server's certificate",
                        )
                    })
            })
            .transpose()?;
        Ok(PgVerifier {
            check,
            webpki,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the chain before the name: a name error means the chain held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
