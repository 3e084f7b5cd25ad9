//! Secrets never leak: a replica is driven through its failure paths (servers down, wrong
//! passwords, TLS refused, untrusted certificates, malformed URLs, URLs from `*_FILE`
//! files, text and JSON logs) with distinctive passwords in each URL's user info and
//! query string, and every byte it shows anyone — each log line, each error, `/metrics`,
//! `/healthz`, `/readyz`, `--help` of every subcommand, `migrate` and `verify` — is
//! searched for them: zero hits.
//!
//! Each scenario also asserts the failure it exists for really happened (the redacted URL
//! or the server's refusal is in the output), so a path that silently stopped being taken
//! fails the test instead of passing it vacuously.

use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_aggregator::http::paths;
use vote_testkit::infra::{self, CERT_USER, TlsBrokerOptions};
use vote_testkit::inspect::http_get;
use vote_testkit::signal::{self, Signal};
use vote_testkit::tls::{LOCAL_SERVER_NAMES, TestPki};

use super::{BIN, free_port, run_with, spawn_run};

/// The distinctive secrets, each used in one place only.
const PG_USERINFO: &str = "Pg7userinfoZx41";
const PG_QUERY: &str = "Pg8queryWq52";
const PG_SSLPASSWORD: &str = "Pg9sslpassRt74";
const MQ_USERINFO: &str = "Mq5userinfoHb63";
const MQ_QUERY: &str = "Mq6queryJk85";
const SECRETS: [&str; 5] = [PG_USERINFO, PG_QUERY, PG_SSLPASSWORD, MQ_USERINFO, MQ_QUERY];

/// How long each replica runs through its retries before it is stopped.
const RUN_FOR: Duration = Duration::from_secs(6);

/// One way to fail: the environment, and a fragment the output must contain to prove the
/// failure path was taken.
struct Scenario {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    expect: &'static [&'static str],
}

/// Everything a scenario's replica showed: its output and the HTTP pages it served.
struct Shown {
    name: &'static str,
    text: String,
}

fn with_password(url: &str, password: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url)?;
    u.set_password(Some(password))
        .map_err(|()| anyhow::anyhow!("cannot set a password on {}", u.scheme()))?;
    Ok(u.to_string())
}

/// Where the TLS servers of the "untrusted certificate" scenarios listen, and the CA that
/// did NOT sign their certificates.
struct TlsServers<'a> {
    postgres_port: u16,
    rabbitmq_port: u16,
    wrong_ca: &'a std::path::Path,
    /// A client certificate and its key: the key's body must never be shown either.
    client: &'a vote_testkit::tls::CertFiles,
}

fn scenarios(
    pg: &str,
    amqp: &str,
    tls: &TlsServers<'_>,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Scenario>> {
    let pg_wrong = with_password(pg, PG_USERINFO)?;
    let mut pg_query_wrong = url::Url::parse(pg)?;
    let _ = pg_query_wrong.set_password(None);
    pg_query_wrong.set_query(Some(&format!("password={PG_QUERY}")));
    let mq_wrong = with_password(amqp, MQ_USERINFO)?;
    let mq_tls = mq_wrong.replacen("amqp://", "amqps://", 1);
    let pg_tls = format!("{pg_wrong}?sslmode=require");
    let down_pg = format!(
        "postgres://votes:{PG_USERINFO}@127.0.0.1:1/votes?password={PG_QUERY}&sslpassword={PG_SSLPASSWORD}"
    );
    let down_mq = format!("amqp://votes:{MQ_USERINFO}@127.0.0.1:1/%2f?token={MQ_QUERY}");
    let pg_file = dir.join("database_url");
    let mq_file = dir.join("amqp_url");
    std::fs::write(&pg_file, format!("{pg_query_wrong}\n"))?;
    std::fs::write(&mq_file, format!("{down_mq}\n"))?;
    Ok(vec![
        Scenario {
            name: "PostgreSQL down",
            env: vec![
                (var::DATABASE_URL, down_pg),
                (var::AMQP_URL, amqp.to_string()),
            ],
            expect: &["postgres://votes:***@127.0.0.1:1/votes?password=***&sslpassword=***"],
        },
        Scenario {
            name: "RabbitMQ down",
            env: vec![
                (var::DATABASE_URL, pg.to_string()),
                (var::AMQP_URL, down_mq.clone()),
            ],
            expect: &["amqp://votes:***@127.0.0.1:1/%2f?token=***"],
        },
        Scenario {
            name: "wrong PostgreSQL password in the query string",
            env: vec![
                (var::DATABASE_URL, pg_query_wrong.to_string()),
                (var::AMQP_URL, amqp.to_string()),
            ],
            expect: &["password=***", "password authentication failed"],
        },
        Scenario {
            name: "wrong PostgreSQL password in the user info",
            env: vec![
                (var::DATABASE_URL, pg_wrong),
                (var::AMQP_URL, amqp.to_string()),
            ],
            expect: &[":***@", "password authentication failed"],
        },
        Scenario {
            name: "wrong RabbitMQ password",
            env: vec![
                (var::DATABASE_URL, pg.to_string()),
                (var::AMQP_URL, mq_wrong),
            ],
            expect: &["refused the credentials"],
        },
        Scenario {
            name: "TLS required but PostgreSQL offers none",
            env: vec![
                (var::DATABASE_URL, pg_tls),
                (var::AMQP_URL, amqp.to_string()),
            ],
            expect: &["with sslmode=require: the server does not offer TLS"],
        },
        Scenario {
            name: "amqps:// but RabbitMQ offers no TLS there",
            env: vec![(var::DATABASE_URL, pg.to_string()), (var::AMQP_URL, mq_tls)],
            expect: &["amqps://votes:***@", "TLS failed"],
        },
        Scenario {
            name: "PostgreSQL's certificate signed by a CA not trusted",
            env: vec![
                (
                    var::DATABASE_URL,
                    format!(
                        "postgres://votes:{PG_USERINFO}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&sslpassword={PG_SSLPASSWORD}",
                        tls.postgres_port,
                        tls.wrong_ca.display(),
                        tls.client.cert.display(),
                        tls.client.key.display(),
                    ),
                ),
                (var::AMQP_URL, amqp.to_string()),
            ],
            expect: &["with sslmode=verify-full", "sslrootcert"],
        },
        Scenario {
            name: "RabbitMQ's certificate signed by a CA not trusted",
            env: vec![
                (var::DATABASE_URL, pg.to_string()),
                (
                    var::AMQP_URL,
                    format!(
                        "amqps://votes:{MQ_USERINFO}@localhost:{}/%2f",
                        tls.rabbitmq_port
                    ),
                ),
                (var::AMQP_CA_FILE, tls.wrong_ca.display().to_string()),
                (
                    var::AMQP_CLIENT_CERT_FILE,
                    tls.client.cert.display().to_string(),
                ),
                (
                    var::AMQP_CLIENT_KEY_FILE,
                    tls.client.key.display().to_string(),
                ),
            ],
            expect: &["TLS failed", "UnknownIssuer"],
        },
        Scenario {
            name: "malformed URLs",
            env: vec![
                (
                    var::DATABASE_URL,
                    format!(
                        "postgres://votes:{PG_USERINFO}@db:notaport/votes?sslpassword={PG_SSLPASSWORD}"
                    ),
                ),
                (
                    var::AMQP_URL,
                    format!("amqp://votes:{MQ_USERINFO}@mq:99999999/%2f"),
                ),
            ],
            expect: &["invalid DATABASE_URL"],
        },
        Scenario {
            name: "URLs from *_FILE files, JSON logs",
            env: vec![
                (var::DATABASE_URL_FILE, pg_file.display().to_string()),
                (var::AMQP_URL_FILE, mq_file.display().to_string()),
                (var::LOG_FORMAT, "json".to_string()),
            ],
            expect: &[
                "password=***",
                "password authentication failed",
                "\"level\":\"WARN\"",
            ],
        },
    ])
}

/// Runs `vote-aggregator run` for [`RUN_FOR`] with `env`, reading `/metrics`, `/healthz`
/// and `/readyz` meanwhile, then `migrate`, `verify` and every `--help` with the same
/// environment: everything shown, as one text.
async fn drive(scenario: &Scenario) -> anyhow::Result<Shown> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = scenario.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([
        (var::METRICS_ADDR, listen.as_str()),
        (var::RUST_LOG, "debug"),
    ]);
    let mut text = String::new();
    let child = spawn_run(&env)?;
    tokio::time::sleep(RUN_FOR / 2).await;
    let addr = listen.parse()?;
    for path in [paths::METRICS, paths::HEALTHZ, paths::READYZ] {
        // A replica that exited already (a fatal configuration or credential error) serves
        // nothing; its output below is what it showed.
        if let Ok((_, body)) = http_get(addr, path).await {
            text.push_str(&body);
        }
    }
    tokio::time::sleep(RUN_FOR / 2).await;
    let _ = signal::send(child.id(), Signal::TERM);
    let run = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    let mut outputs = vec![run];
    for args in [
        &["migrate"][..],
        &["verify"],
        &["--help"],
        &["run", "--help"],
        &["migrate", "--help"],
        &["verify", "--help"],
        &["healthcheck", "--help"],
    ] {
        outputs.push(run_with(args, &env)?);
    }
    for out in outputs {
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    Ok(Shown {
        name: scenario.name,
        text,
    })
}

#[tokio::test]
async fn no_password_reaches_a_log_line_an_error_metrics_or_help() -> anyhow::Result<()> {
    assert!(std::path::Path::new(BIN).exists());
    let infra = infra::shared().await?;
    let pg = infra.admin_database_url();
    let amqp = infra.amqp_url();
    let dir = std::env::temp_dir().join(format!("vote-secrets-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let pki = TestPki::generate(LOCAL_SERVER_NAMES, CERT_USER)?;
    let (tls_pg, tls_mq) = tokio::try_join!(
        infra::start_tls_postgres(&pki, infra),
        infra::start_tls_rabbitmq(&pki, TlsBrokerOptions::default()),
    )?;
    let tls = TlsServers {
        postgres_port: tls_pg.addr().port(),
        rabbitmq_port: tls_mq.tls_port(),
        wrong_ca: &pki.other_ca,
        client: &pki.client,
    };
    // The base64 lines of the client key (not its BEGIN/END lines).
    let key_body: Vec<&str> = pki
        .client
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_body.is_empty());
    let scenarios = scenarios(&pg, &amqp, &tls, &dir)?;
    let shown = futures_util::future::try_join_all(scenarios.iter().map(drive)).await;
    let _ = std::fs::remove_dir_all(&dir);
    for (scenario, shown) in scenarios.iter().zip(shown?) {
        let text = &shown.text;
        for line in &key_body {
            assert!(
                !text.contains(line),
                "{}: the client key leaked:\n{text}",
                shown.name
            );
        }
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{}: {secret} leaked:\n{text}",
                shown.name
            );
        }
        for fragment in scenario.expect {
            assert!(
                text.contains(fragment),
                "{}: expected the failure path's line containing {fragment:?}:\n{text}",
                shown.name,
            );
        }
    }
    Ok(())
}
