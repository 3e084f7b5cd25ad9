//! `amqps://` against a real RabbitMQ 4.0 with a TLS listener (the test kit's
//! [`start_tls_rabbitmq`], serving a throwaway [`TestPki`]), with real `vote-aggregator`
//! processes: counting over TLS with the test CA, and each refusal as exit code 1 and ONE
//! line on stderr naming the redacted URL, that TLS failed, why, and what to set: a CA
//! that signed nothing the broker presents, no CA at all, a host name the certificate
//! does not name, a plain listener behind an `amqps://` URL, a client certificate the
//! broker requires but does not get, a client key that is not the certificate's.
//!
//! Votes are published (and the topology declared) through the same broker's plain
//! listener; only the replicas go through TLS.

use std::process::Stdio;
use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra::{self, TlsBrokerOptions, TlsRabbitMq, start_tls_rabbitmq};
use vote_testkit::inspect::eventually;
use vote_testkit::testbed::TestBed;
use vote_testkit::tls::TestPki;
use vote_testkit::votes;

const BIN: &str = env!("CARGO_BIN_EXE_vote-aggregator");
const WAIT: Duration = Duration::from_secs(90);
/// The only name the test server certificate carries: the same listener reached as
/// `127.0.0.1` is then reached by a name NOT in the certificate.
const CERT_HOST: &str = "localhost";
/// The broker's password in every URL (the test kit's user): it must never be printed.
const PASSWORD_IN_URL: &str = "votes:votes@";

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// `vote-aggregator run` for `bed` with `extra` on top (later entries win), logs off:
/// waits until it exits on its own and returns its exit code and stderr.
async fn run_to_exit(bed: &TestBed, extra: &[(&str, String)]) -> anyhow::Result<(i32, String)> {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(var::RUST_LOG, "off")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd.envs(bed.env("tls-refused"));
    cmd.envs(extra.iter().map(|(k, v)| (*k, v.as_str())));
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("vote-aggregator did not stop within {WAIT:?}"))??;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok((out.status.code().unwrap_or(-1), stderr))
}

/// Asserts that `run` with `extra` stops with exit code 1 and exactly one line on stderr,
/// about TLS to this broker, without the password, containing every one of `words`.
async fn refused(bed: &TestBed, extra: &[(&str, String)], words: &[&str]) -> anyhow::Result<()> {
    let (code, stderr) = run_to_exit(bed, extra).await?;
    eprintln!("refused: {}", stderr.trim_end());
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(
        stderr.starts_with("error: RabbitMQ at amqps://votes:***@"),
        "{stderr}"
    );
    assert!(stderr.contains("TLS failed: "), "{stderr}");
    assert!(
        !stderr.contains(PASSWORD_IN_URL),
        "password leaked: {stderr}"
    );
    for word in words {
        assert!(stderr.contains(word), "{word:?} missing: {stderr}");
    }
    Ok(())
}

/// A test bed on the shared PostgreSQL whose broker is `broker` (its plain listener).
async fn bed_on(broker: &TlsRabbitMq) -> anyhow::Result<TestBed> {
    let mut bed = TestBed::new(infra::shared().await?).await?;
    bed.amqp_url = broker.amqp_url();
    bed.declare().await?;
    Ok(bed)
}

/// Publishes `n` votes (plus a duplicate of each of the first ten) through the plain
/// listener and waits until the replicas counted exactly the `n`, tallies included.
async fn publish_and_count(bed: &TestBed, n: usize) -> anyhow::Result<()> {
    let votes = votes::spread(n, &["tls-2026"], &["cand-a", "cand-b", "cand-c"]);
    let publisher = bed.publisher().await?;
    publisher.publish_votes(&votes).await?;
    publisher.publish_votes(&votes[..10]).await?;
    publisher.close().await;
    let mut db = bed.db().await?;
    eventually("every vote counted over amqps://", WAIT, async || {
        Ok(db.vote_count().await? == n as i64)
    })
    .await?;
    let counted = db.counted_per_candidate().await?;
    assert_eq!(db.tallies().await?, counted, "tallies differ from the rows");
    assert_eq!(counted.values().sum::<i64>(), n as i64);
    Ok(())
}

async fn start_fleet(bed: &TestBed, name: &str, specs: Vec<ReplicaSpec>) -> anyhow::Result<Fleet> {
    let log_dir = std::env::temp_dir().join(format!("vote-amqp-tls-{name}-{}", std::process::id()));
    Fleet::start(FleetOptions::new(log_dir, bed.replica_base_env())?, specs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_over_amqps_and_refuses_what_it_cannot_verify() -> anyhow::Result<()> {
    let pki = TestPki::generate(&[CERT_HOST], "votes")?;
    let broker = start_tls_rabbitmq(&pki, TlsBrokerOptions::default()).await?;
    let bed = bed_on(&broker).await?;
    let tls_url = broker.amqps_url(CERT_HOST);

    // Trusting only a CA that signed nothing the broker presents.
    refused(
        &bed,
        &[
            (var::AMQP_URL, tls_url.clone()),
            (var::AMQP_CA_FILE, path(&pki.other_ca)),
        ],
        &["UnknownIssuer", "AMQP_CA_FILE must hold the CA"],
    )
    .await?;
    // No AMQP_CA_FILE: the system's CAs do not know the test CA either.
    refused(
        &bed,
        &[(var::AMQP_URL, tls_url.clone())],
        &["set AMQP_CA_FILE"],
    )
    .await?;
    // A system without CAs (like the service image) and no AMQP_CA_FILE: nothing to
    // verify with. (rustls-native-certs reads only these two when they are set.)
    refused(
        &bed,
        &[
            (var::AMQP_URL, tls_url.clone()),
            ("SSL_CERT_FILE", "/nonexistent/ca-bundle.crt".to_owned()),
            ("SSL_CERT_DIR", "/nonexistent/certs".to_owned()),
        ],
        &[
            "there is no CA to verify the broker with",
            "set AMQP_CA_FILE",
        ],
    )
    .await?;
    // The right CA, but a host name the certificate does not name.
    refused(
        &bed,
        &[
            (var::AMQP_URL, broker.amqps_url("127.0.0.1")),
            (var::AMQP_CA_FILE, path(&pki.ca)),
        ],
        &["not valid for name", "host name"],
    )
    .await?;
    // An amqps:// URL pointed at the plain listener.
    refused(
        &bed,
        &[
            (
                var::AMQP_URL,
                format!(
                    "amqps://votes:votes@{CERT_HOST}:{}/%2f",
                    broker.plain_port()
                ),
            ),
            (var::AMQP_CA_FILE, path(&pki.ca)),
        ],
        &["does not speak TLS", "5671"],
    )
    .await?;

    // The test CA: a replica counts over TLS.
    let spec = ReplicaSpec::new("tls-0")
        .with_env(var::AMQP_URL, &tls_url)
        .with_env(var::AMQP_CA_FILE, path(&pki.ca));
    let fleet = start_fleet(&bed, "verify", vec![spec]).await?;
    publish_and_count(&bed, 300).await?;
    let exits = fleet.shutdown().await?;
    assert!(
        exits.iter().all(|e| e.is_some_and(|s| s.success())),
        "{exits:?}"
    );
    bed.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_a_client_certificate_gets_one() -> anyhow::Result<()> {
    let pki = TestPki::generate(&[CERT_HOST], "votes")?;
    let opts = TlsBrokerOptions {
        require_client_certificate: true,
        external_auth: true,
    };
    let broker = start_tls_rabbitmq(&pki, opts).await?;
    let bed = bed_on(&broker).await?;
    let tls_url = broker.amqps_url(CERT_HOST);
    let ca = (var::AMQP_CA_FILE, path(&pki.ca));

    refused(
        &bed,
        &[(var::AMQP_URL, tls_url.clone()), ca.clone()],
        &[
            "requires a client certificate",
            "set AMQP_CLIENT_CERT_FILE and AMQP_CLIENT_KEY_FILE",
        ],
    )
    .await?;

    // A key that is not the certificate's (the server's): refused before the handshake.
    refused(
        &bed,
        &[
            (var::AMQP_URL, tls_url.clone()),
            ca.clone(),
            (var::AMQP_CLIENT_CERT_FILE, path(&pki.client.cert)),
            (var::AMQP_CLIENT_KEY_FILE, path(&pki.server.key)),
        ],
        &["AMQP_CLIENT_KEY_FILE is not the private key of AMQP_CLIENT_CERT_FILE"],
    )
    .await?;

    // With the certificate: one replica logs in with the password, one with EXTERNAL
    // (user = the certificate's common name, no password in the URL).
    let with_cert = |spec: ReplicaSpec, url: String| {
        spec.with_env(var::AMQP_URL, url)
            .with_env(ca.0, &ca.1)
            .with_env(var::AMQP_CLIENT_CERT_FILE, path(&pki.client.cert))
            .with_env(var::AMQP_CLIENT_KEY_FILE, path(&pki.client.key))
    };
    let external = format!(
        "amqps://{CERT_HOST}:{}/%2f?auth_mechanism=external",
        broker.tls_port()
    );
    let specs = vec![
        with_cert(ReplicaSpec::new("cert-password"), tls_url),
        with_cert(ReplicaSpec::new("cert-external"), external),
    ];
    let fleet = start_fleet(&bed, "client-cert", specs).await?;
    publish_and_count(&bed, 200).await?;
    let exits = fleet.shutdown().await?;
    assert!(
        exits.iter().all(|e| e.is_some_and(|s| s.success())),
        "{exits:?}"
    );
    bed.finish().await
}

/// The TLS files are checked at start-up, before any server is contacted (the URLs point
/// at closed ports): one line naming the variable and the fix.
#[tokio::test]
async fn tls_settings_are_checked_before_anything_connects() -> anyhow::Result<()> {
    let pki = TestPki::generate(&[CERT_HOST], "votes")?;
    let database = (
        var::DATABASE_URL,
        "postgres://votes:votes@127.0.0.1:1/votes".to_owned(),
    );
    let cases = [
        (
            vec![
                (
                    var::AMQP_URL,
                    "amqp://votes:votes@127.0.0.1:1/%2f".to_owned(),
                ),
                (var::AMQP_CA_FILE, path(&pki.ca)),
            ],
            "error: AMQP_CA_FILE is set but AMQP_URL is a plain amqp:// URL, so it would do nothing: use amqps:// with the broker's TLS port (usually 5671), or unset AMQP_CA_FILE",
        ),
        (
            vec![
                (
                    var::AMQP_URL,
                    "amqps://votes:votes@127.0.0.1:1/%2f".to_owned(),
                ),
                (var::AMQP_CLIENT_CERT_FILE, path(&pki.client.cert)),
            ],
            "error: AMQP_CLIENT_CERT_FILE is set without AMQP_CLIENT_KEY_FILE: a client certificate needs its private key: set both AMQP_CLIENT_CERT_FILE and AMQP_CLIENT_KEY_FILE, or neither",
        ),
        (
            vec![
                (
                    var::AMQP_URL,
                    "amqps://votes:votes@127.0.0.1:1/%2f".to_owned(),
                ),
                (var::AMQP_CA_FILE, path(&pki.client.key)),
            ],
            "error: invalid AMQP_CA_FILE=\"",
        ),
    ];
    for (env, want) in cases {
        let out = tokio::process::Command::new(BIN)
            .arg("run")
            .env_clear()
            .envs(std::iter::once(&database).chain(&env).map(|(k, v)| (*k, v)))
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(want), "{stderr}");
        assert!(!stderr.contains(PASSWORD_IN_URL), "{stderr}");
    }
    Ok(())
}
