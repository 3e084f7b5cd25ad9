//! The PEM files `sslrootcert`, `sslcert` and `sslkey` name, read and checked once at
//! start-up: a file that cannot be read or holds nothing usable is a one-line
//! configuration error naming the parameter, the path and the fix.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{SSLKEY, SSLROOTCERT, invalid};
use crate::error::ConfigError;

fn read_file(param: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    if param == SSLROOTCERT && path == "system" {
        return Err(invalid(
            format!("{SSLROOTCERT}=system (the operating system's CAs) is not supported"),
            &format!(
                "set {SSLROOTCERT} to the PEM file of the CA that signed the server's certificate"
            ),
        ));
    }
    std::fs::read(Path::new(path)).map_err(|e| {
        invalid(
            format!("{param}=\"{path}\" cannot be read ({e})"),
            "give the path of a PEM file this process may read",
        )
    })
}

pub(super) fn read_certs(
    param: &str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_file(param, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            invalid(
                format!("{param}=\"{path}\" is not valid PEM ({e})"),
                "give a PEM file of certificates (-----BEGIN CERTIFICATE-----)",
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            format!("{param}=\"{path}\" holds no certificate"),
            "give a PEM file of certificates (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

pub(super) fn read_roots(path: &str) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(SSLROOTCERT, path)? {
        roots.add(cert).map_err(|e| {
            invalid(
                format!(
                    "{SSLROOTCERT}=\"{path}\" holds a certificate rustls cannot use as a CA ({e})"
                ),
                "give the PEM file of the CA that signed the server's certificate",
            )
        })?;
    }
    Ok(roots)
}

pub(super) fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_file(SSLKEY, path)?;
    let hint = "give an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1; decrypt an encrypted one with `openssl pkey -in KEY -out PLAIN`)";
    if String::from_utf8_lossy(&pem).contains("ENCRYPTED") {
        return Err(invalid(
            format!("{SSLKEY}=\"{path}\" is encrypted, which is not supported"),
            hint,
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            format!("{SSLKEY}=\"{path}\" holds no private key ({e})"),
            hint,
        )
    })
}
