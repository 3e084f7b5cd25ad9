//! A throwaway public-key infrastructure for TLS tests: a certificate authority, a server
//! certificate for the names a test connects with, a client certificate, and a second,
//! unrelated CA that signed nothing the servers present (the "wrong CA").
//!
//! Everything is generated in memory with `rcgen` (no `openssl` binary needed) and
//! written as PEM files into a private directory that is removed when the [`TestPki`] is
//! dropped. Private keys are written `0600`, as PostgreSQL and RabbitMQ require.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Host names (and IP addresses, as IP SANs) every test server certificate is valid for
/// unless a test asks otherwise: what tests on this machine connect to.
pub const LOCAL_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// One certificate and its key, as PEM text and as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// File holding [`CertFiles::cert_pem`].
    pub cert: PathBuf,
    /// File holding [`CertFiles::key_pem`] (mode `0600`).
    pub key: PathBuf,
}

/// A CA, a server and a client certificate it signed, and an unrelated CA.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    /// The CA that signed [`TestPki::server`] and [`TestPki::client`] (PEM text).
    pub ca_pem: String,
    /// File holding [`TestPki::ca_pem`].
    pub ca: PathBuf,
    /// A CA that signed nothing the servers present: trusting only it must fail.
    pub other_ca_pem: String,
    /// File holding [`TestPki::other_ca_pem`].
    pub other_ca: PathBuf,
    /// Server certificate valid for the names given to [`TestPki::generate`].
    pub server: CertFiles,
    /// Client certificate whose common name is the client name given to
    /// [`TestPki::generate`] (PostgreSQL `cert` authentication maps it to the user).
    pub client: CertFiles,
}

impl TestPki {
    /// Generates the CA, the server certificate for `server_names` (DNS names or IP
    /// addresses) and the client certificate with common name `client_name`, and writes
    /// them into a new private directory under the system's temporary directory.
    ///
    /// # Errors
    /// When a key or certificate cannot be generated or a file cannot be written.
    pub fn generate(server_names: &[&str], client_name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("vote-pki-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;

        let (ca_pem, ca_issuer) = certificate_authority("vote-aggregator test CA")?;
        let (other_ca_pem, _) = certificate_authority("unrelated test CA")?;

        let server_names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
        let mut server = CertificateParams::new(server_names)
            .context("server certificate names (DNS names or IP addresses)")?;
        server
            .distinguished_name
            .push(DnType::CommonName, "vote-aggregator test server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = leaf(server, &ca_issuer)?;

        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, client_name);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = leaf(client, &ca_issuer)?;

        Ok(TestPki {
            ca: write(&dir, "ca.pem", &ca_pem, 0o644)?,
            other_ca: write(&dir, "other-ca.pem", &other_ca_pem, 0o644)?,
            server: write_pair(&dir, "server", server)?,
            client: write_pair(&dir, "client", client)?,
            ca_pem,
            other_ca_pem,
            dir,
        })
    }

    /// The directory holding every file (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA: its certificate (PEM) and the issuer that signs with its key.
fn certificate_authority(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A leaf certificate signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    mut params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_pair(
    dir: &Path,
    stem: &str,
    (cert_pem, key_pem): (String, String),
) -> anyhow::Result<CertFiles> {
    Ok(CertFiles {
        cert: write(dir, &format!("{stem}.crt"), &cert_pem, 0o644)?,
        key: write(dir, &format!("{stem}.key"), &key_pem, 0o600)?,
        cert_pem,
        key_pem,
    })
}

fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_with_private_keys_0600_and_removes_them_on_drop() {
        let pki = TestPki::generate(LOCAL_SERVER_NAMES, "votes_user").expect("pki");
        for file in [&pki.ca, &pki.other_ca, &pki.server.cert, &pki.client.cert] {
            let text = fs::read_to_string(file).expect("read");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{file:?}");
        }
        for key in [&pki.server.key, &pki.client.key] {
            let mode = fs::metadata(key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key:?}");
        }
        assert_ne!(pki.ca_pem, pki.other_ca_pem);
        let dir = pki.dir().to_path_buf();
        drop(pki);
        assert!(!dir.exists());
    }
}
