use vote_testkit::tls::{LOCAL_SERVER_NAMES, TestPki};

use super::*;

fn pki() -> TestPki {
    TestPki::generate(LOCAL_SERVER_NAMES, "votes").expect("test PKI")
}

fn error_of(url: &str) -> String {
    let e = PgConnector::from_url(url).expect_err("refused");
    let line = e.to_string();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    assert!(line.starts_with("invalid DATABASE_URL: "), "{line}");
    line
}

#[test]
fn the_default_is_prefer_and_tls_parameters_never_reach_tokio_postgres() {
    let pki = pki();
    let c = PgConnector::from_url("postgres://u:pw@db:5432/votes?application_name=x")
        .expect("plain URL");
    assert_eq!(c.mode(), SslMode::Prefer);
    assert_eq!(c.config.get_application_name(), Some("x"));
    let url = format!(
        "postgres://u:pw@db/votes?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&sslpassword=s3cret&connect_timeout=5",
        pki.ca.display(),
        pki.client.cert.display(),
        pki.client.key.display()
    );
    let c = PgConnector::from_url(&url).expect("complete TLS settings");
    assert_eq!(c.mode(), SslMode::VerifyFull);
    assert_eq!(c.check, Check::ChainAndName);
    assert!(c.client_cert);
    assert_eq!(
        c.config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    assert_eq!(
        c.config.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(5))
    );
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn require_with_a_root_certificate_checks_the_chain_as_libpq_does() {
    let pki = pki();
    let with_ca = |mode: &str| {
        PgConnector::from_url(&format!(
            "postgres://db/v?sslmode={mode}&sslrootcert={}",
            pki.ca.display()
        ))
        .expect("valid")
        .check
    };
    assert_eq!(with_ca("require"), Check::Chain);
    assert_eq!(with_ca("verify-ca"), Check::Chain);
    assert_eq!(with_ca("prefer"), Check::Chain);
    let bare = PgConnector::from_url("postgres://db/v?sslmode=require").expect("valid");
    assert_eq!(bare.check, Check::Nothing);
    assert_eq!(
        PgConnector::from_url("postgres://db/v?sslmode=disable")
            .expect("valid")
            .config
            .get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable
    );
}

#[test]
fn bad_settings_are_one_line_naming_the_parameter_and_the_fix() {
    let pki = pki();
    let line = error_of("postgres://db/v?sslmode=verify-everything");
    assert!(
        line.contains("sslmode=\"verify-everything\"") && line.contains("verify-full"),
        "{line}"
    );
    let line = error_of("postgres://db/v?sslmode=verify-full");
    assert!(
        line.contains("sslmode=verify-full without sslrootcert"),
        "{line}"
    );
    let line = error_of("postgres://db/v?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
    assert!(
        line.contains("sslrootcert=\"/nonexistent/ca.pem\" cannot be read"),
        "{line}"
    );
    let line = error_of(&format!(
        "postgres://db/v?sslmode=verify-ca&sslrootcert={}",
        pki.client.key.display()
    ));
    assert!(line.contains("holds no certificate"), "{line}");
    let line = error_of(&format!(
        "postgres://db/v?sslcert={}",
        pki.client.cert.display()
    ));
    assert!(line.contains("only one of sslcert and sslkey"), "{line}");
    let line = error_of(&format!(
        "postgres://db/v?sslcert={}&sslkey={}",
        pki.client.cert.display(),
        pki.ca.display()
    ));
    assert!(line.contains("holds no private key"), "{line}");
    // A key that is not the certificate's own.
    let line = error_of(&format!(
        "postgres://db/v?sslcert={}&sslkey={}",
        pki.client.cert.display(),
        pki.server.key.display()
    ));
    assert!(line.contains("do not make a usable pair"), "{line}");
    let line = error_of("postgres://db/v?sslcrl=/etc/crl.pem");
    assert!(line.contains("unknown option `sslcrl`"), "{line}");
    let line = error_of("postgres://db/v?sslmode=verify-full&sslrootcert=system");
    assert!(line.contains("not supported"), "{line}");
}

#[test]
fn the_start_up_line_never_calls_prefer_or_require_authenticated() {
    let pki = pki();
    for (url, says) in [
        ("postgres://db/v", "NOT authenticated"),
        ("postgres://db/v?sslmode=require", "NOT authenticated"),
        ("postgres://db/v?sslmode=disable", "plain text"),
    ] {
        let line = PgConnector::from_url(url).expect("valid").protection();
        assert!(
            line.contains(says) && line.contains("verify-full"),
            "{line}"
        );
    }
    let full = PgConnector::from_url(&format!(
        "postgres://db/v?sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    ))
    .expect("valid")
    .protection();
    assert!(full.contains("impersonation"), "{full}");
}

/// The provider is chosen explicitly: building works whatever rustls's process default
/// is. This test build compiles in both aws-lc-rs and ring (testcontainers enables ring),
/// so it has none unless something installed one, and `ClientConfig::builder()` would
/// panic here.
#[test]
fn no_process_default_crypto_provider_is_needed() {
    let pki = pki();
    PgConnector::from_url(&format!(
        "postgres://db/v?sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    ))
    .expect("built with the explicit provider");
}

#[test]
fn the_database_url_is_checked_at_start_up() {
    let lookup = |k: &str| match k {
        "DATABASE_URL" => Some("postgres://u:hunter2@db/v?sslmode=verify-full".to_string()),
        "AMQP_URL" => Some("amqp://u:p@mq/%2f".to_string()),
        _ => None,
    };
    let e = crate::Config::from_lookup(lookup).expect_err("refused");
    let line = e.to_string();
    assert!(
        line.contains("sslrootcert") && !line.contains("hunter2"),
        "{line}"
    );
}
