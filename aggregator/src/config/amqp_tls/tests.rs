//! The TLS variables through the whole parser: every file check and its one-line error.
use std::collections::HashMap;

use secrecy::ExposeSecret as _;
use vote_testkit::tls::{LOCAL_SERVER_NAMES, TestPki};

use crate::config::Config;
use crate::error::ConfigError;

const TLS_URL: &str = "amqps://u:secretpw@mq:5671/%2f";

fn parse(amqp_url: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut map: HashMap<String, String> = HashMap::from([
        ("DATABASE_URL".into(), "postgres://u:pw@db/votes".into()),
        ("AMQP_URL".into(), amqp_url.into()),
    ]);
    map.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_lookup(|k| map.get(k).cloned())
}

fn err(amqp_url: &str, pairs: &[(&str, &str)]) -> String {
    let e = parse(amqp_url, pairs)
        .expect_err("config should be rejected")
        .to_string();
    assert!(!e.contains('\n'), "not one line: {e}");
    assert!(!e.contains("secretpw"), "password leaked: {e}");
    e
}

fn pki() -> TestPki {
    TestPki::generate(LOCAL_SERVER_NAMES, "votes").expect("test PKI")
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[test]
fn no_tls_variables_means_system_cas_and_no_client_certificate() {
    let c = parse(TLS_URL, &[]).expect("valid");
    assert!(c.amqp_tls.ca_pem.is_none() && c.amqp_tls.client.is_none());
}

#[test]
fn the_files_are_read_once_into_the_config() {
    let pki = pki();
    let c = parse(
        TLS_URL,
        &[
            ("AMQP_CA_FILE", path(&pki.ca)),
            ("AMQP_CLIENT_CERT_FILE", path(&pki.client.cert)),
            ("AMQP_CLIENT_KEY_FILE", path(&pki.client.key)),
        ],
    )
    .expect("valid");
    assert_eq!(c.amqp_tls.ca_pem.as_deref(), Some(pki.ca_pem.as_str()));
    let client = c.amqp_tls.client.expect("client identity");
    assert_eq!(client.cert_pem, pki.client.cert_pem);
    assert_eq!(client.key_pem.expose_secret(), pki.client.key_pem);
    assert!(
        !format!("{client:?}").contains("PRIVATE KEY"),
        "the key shows in Debug"
    );
}

#[test]
fn tls_files_for_a_plain_url_are_refused() {
    let pki = pki();
    let e = err(
        "amqp://u:secretpw@mq:5672/%2f",
        &[("AMQP_CA_FILE", path(&pki.ca))],
    );
    assert_eq!(
        e,
        "AMQP_CA_FILE is set but AMQP_URL is a plain amqp:// URL, so it would do nothing: use amqps:// with the broker's TLS port (usually 5671), or unset AMQP_CA_FILE"
    );
}

#[test]
fn a_certificate_without_its_key_and_a_key_without_its_certificate_are_refused() {
    let pki = pki();
    let e = err(
        TLS_URL,
        &[("AMQP_CLIENT_CERT_FILE", path(&pki.client.cert))],
    );
    assert!(
        e.starts_with("AMQP_CLIENT_CERT_FILE is set without AMQP_CLIENT_KEY_FILE: "),
        "{e}"
    );
    let e = err(TLS_URL, &[("AMQP_CLIENT_KEY_FILE", path(&pki.client.key))]);
    assert!(
        e.starts_with("AMQP_CLIENT_KEY_FILE is set without AMQP_CLIENT_CERT_FILE: "),
        "{e}"
    );
}

#[test]
fn unreadable_and_non_pem_files_name_the_variable() {
    let pki = pki();
    let e = err(TLS_URL, &[("AMQP_CA_FILE", "/nonexistent/ca.pem")]);
    assert!(
        e.starts_with("cannot read AMQP_CA_FILE=\"/nonexistent/ca.pem\": "),
        "{e}"
    );
    let not_pem = pki.dir().join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let e = err(TLS_URL, &[("AMQP_CA_FILE", path(&not_pem))]);
    assert!(e.starts_with("invalid AMQP_CA_FILE=\""), "{e}");
    assert!(e.contains("at least one certificate"), "{e}");
    // A key where the certificate belongs holds no certificate.
    let e = err(
        TLS_URL,
        &[
            ("AMQP_CLIENT_CERT_FILE", path(&pki.client.key)),
            ("AMQP_CLIENT_KEY_FILE", path(&pki.client.key)),
        ],
    );
    assert!(e.starts_with("invalid AMQP_CLIENT_CERT_FILE=\""), "{e}");
    // And a certificate where the key belongs holds no key.
    let e = err(
        TLS_URL,
        &[
            ("AMQP_CLIENT_CERT_FILE", path(&pki.client.cert)),
            ("AMQP_CLIENT_KEY_FILE", path(&pki.client.cert)),
        ],
    );
    assert!(e.starts_with("invalid AMQP_CLIENT_KEY_FILE=\""), "{e}");
    assert!(e.contains("unencrypted PEM private key"), "{e}");
}

#[test]
fn a_ca_file_whose_certificate_does_not_parse_is_refused() {
    let pki = pki();
    let garbage = pki.dir().join("garbage-ca.pem");
    let text = format!(
        "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        pki.ca_pem
    );
    std::fs::write(&garbage, text).expect("write");
    let e = err(TLS_URL, &[("AMQP_CA_FILE", path(&garbage))]);
    assert!(e.starts_with("invalid AMQP_CA_FILE=\""), "{e}");
    assert!(e.contains("certificate 2 does not parse"), "{e}");
}

#[test]
fn an_encrypted_key_is_named_as_such() {
    let pki = pki();
    let encrypted = pki.dir().join("encrypted.key");
    std::fs::write(
        &encrypted,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .expect("write");
    let e = err(
        TLS_URL,
        &[
            ("AMQP_CLIENT_CERT_FILE", path(&pki.client.cert)),
            ("AMQP_CLIENT_KEY_FILE", path(&encrypted)),
        ],
    );
    assert!(e.contains("this one is encrypted"), "{e}");
    assert!(!e.contains("AAAA"), "key material in the error: {e}");
}
