//! TLS to PostgreSQL, against a real PostgreSQL 17 with `ssl=on` (started from a
//! throwaway CA by the test kit) and the ordinary test server (no TLS), through the real
//! `vote-aggregator` binary: counting, `migrate` and `verify` over `verify-full` with a
//! client certificate; a wrong CA, a wrong host name, a missing client certificate and a
//! server without TLS refused with one line; `verify-ca` and `prefer` accepted where
//! libpq accepts them.

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_aggregator::http::paths;
use vote_aggregator::metrics::names;
use vote_testkit::infra::{self, CERT_USER, TlsPostgres, start_tls_postgres};
use vote_testkit::inspect::{eventually, http_get, metric_value};
use vote_testkit::signal::{self, Signal};
use vote_testkit::testbed::TestBed;
use vote_testkit::tls::{LOCAL_SERVER_NAMES, TestPki};
use vote_testkit::votes;

const BIN: &str = env!("CARGO_BIN_EXE_vote-aggregator");
const WAIT: Duration = Duration::from_secs(60);

/// A TLS server and the PKI it was made from (the client certificate is `CERT_USER`'s).
async fn tls_server() -> anyhow::Result<(TestPki, TlsPostgres)> {
    let pki = TestPki::generate(LOCAL_SERVER_NAMES, CERT_USER)?;
    let server = start_tls_postgres(&pki, infra::shared().await?).await?;
    Ok((pki, server))
}

/// `base` (a test bed's URL) with `user` (no password when `None`) and `params` added.
fn url_with(base: &str, user: Option<&str>, params: &[(&str, String)]) -> String {
    let mut url = url::Url::parse(base).expect("test bed URL");
    if let Some(user) = user {
        url.set_username(user).expect("user");
        url.set_password(None).expect("no password");
    }
    {
        let mut query = url.query_pairs_mut();
        for (k, v) in params {
            query.append_pair(k, v);
        }
    }
    url.to_string()
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Runs a subcommand with only `DATABASE_URL` (and PATH) set.
async fn run_sub(sub: &str, database_url: &str) -> anyhow::Result<Output> {
    Ok(tokio::process::Command::new(BIN)
        .arg(sub)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(var::DATABASE_URL, database_url)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .await?)
}

/// The one error line of a failed subcommand.
fn refusal(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stderr}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Starts `vote-aggregator run` for `bed` with `database_url`; its log goes to `log`.
fn spawn_replica(
    bed: &TestBed,
    database_url: &str,
    addr: SocketAddr,
    log: &std::path::Path,
    extra: &[(&str, &str)],
) -> anyhow::Result<tokio::process::Child> {
    let mut env = bed.env("tls-replica");
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.retain(|(k, _)| k != var::METRICS_ADDR && k != var::DATABASE_URL);
    env.push((var::METRICS_ADDR.into(), addr.to_string()));
    env.push((var::DATABASE_URL.into(), database_url.into()));
    Ok(tokio::process::Command::new(BIN)
        .arg("run")
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
        .spawn()?)
}

#[tokio::test]
async fn a_replica_counts_over_verify_full_with_a_client_certificate_and_the_session_is_encrypted()
-> anyhow::Result<()> {
    let (pki, server) = tls_server().await?;
    let bed = TestBed::new(&server).await?;
    let tls_url = url_with(
        &bed.database_url,
        Some(CERT_USER),
        &[
            ("sslmode", "verify-full".into()),
            ("sslrootcert", path(&pki.ca)),
            ("sslcert", path(&pki.client.cert)),
            ("sslkey", path(&pki.client.key)),
        ],
    );
    // `migrate` over TLS, with cert authentication (no password in the URL).
    let out = succeeded(&run_sub("migrate", &tls_url).await?);
    assert!(out.contains("applied migration"), "{out}");

    let addr = free_addr()?;
    let log = pki.dir().join("replica.log");
    let mut replica = spawn_replica(&bed, &tls_url, addr, &log, &[])?;
    eventually("replica ready", WAIT, async || {
        Ok(matches!(http_get(addr, paths::READYZ).await, Ok((200, _))))
    })
    .await?;
    let published = votes::spread(300, &["e1", "e2"], &["a", "b", "c"]);
    bed.publisher().await?.publish_votes(&published).await?;
    eventually("300 votes counted", WAIT, async || {
        let (_, page) = http_get(addr, paths::METRICS).await?;
        Ok(metric_value(&page, names::VOTES_COUNTED_TOTAL) == Some(300.0))
    })
    .await?;

    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 300);
    let tallied = db
        .scalar("SELECT coalesce(sum(votes), 0)::bigint AS n FROM tally_shards")
        .await?;
    assert_eq!(tallied, 300, "tallies match the counted votes");
    // Every session the replica holds is encrypted, and authenticated by certificate.
    let sessions = "SELECT count(*)::bigint AS n FROM pg_stat_activity a JOIN pg_stat_ssl s \
                    USING (pid) WHERE a.application_name = 'vote-aggregator' AND a.usename = $1";
    let all = db.scalar_with(sessions, &[CERT_USER]).await?;
    let encrypted = db
        .scalar_with(&format!("{sessions} AND s.ssl"), &[CERT_USER])
        .await?;
    assert!(all >= 1, "the replica holds sessions");
    assert_eq!(encrypted, all, "every replica session is TLS");
    let with_cert = db
        .scalar_with(
            &format!("{sessions} AND s.client_dn = '/CN=' || $1"),
            &[CERT_USER],
        )
        .await?;
    assert_eq!(
        with_cert, all,
        "every session presented the client certificate"
    );

    signal::send(replica.id().unwrap_or_default(), Signal::TERM)?;
    let exit = tokio::time::timeout(Duration::from_secs(20), replica.wait()).await??;
    assert_eq!(exit.code(), Some(0));
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        logged.contains("PostgreSQL TLS sslmode=verify-full")
            && logged.contains("a client certificate is presented"),
        "the start-up line says what the mode protects:\n{logged}"
    );
    let out = succeeded(&run_sub("verify", &tls_url).await?);
    assert!(out.contains("consistent: 300 votes"), "{out}");
    Ok(())
}

#[tokio::test]
async fn a_wrong_ca_a_wrong_host_name_and_a_missing_client_certificate_are_refused_in_one_line()
-> anyhow::Result<()> {
    let (pki, server) = tls_server().await?;
    let bed = TestBed::new(&server).await?;
    let port = server.addr().port();
    let verify_full = |ca: &std::path::Path| {
        url_with(
            &bed.database_url,
            None,
            &[("sslmode", "verify-full".into()), ("sslrootcert", path(ca))],
        )
    };
    succeeded(&run_sub("migrate", &verify_full(&pki.ca)).await?);

    // A CA that did not sign the server's certificate.
    let line = refusal(&run_sub("verify", &verify_full(&pki.other_ca)).await?);
    assert!(
        line.starts_with(&format!(
            "error: cannot connect to PostgreSQL at postgres://votes:***@127.0.0.1:{port}/"
        )) && line.contains("with sslmode=verify-full: the server's certificate is not signed by a CA in sslrootcert; set sslrootcert"),
        "{line}"
    );

    // A host name the certificate does not list (the TCP connection goes to the same
    // server through `hostaddr`): verify-full refuses, verify-ca accepts.
    let renamed = |mode: &str, ca: &std::path::Path| -> anyhow::Result<String> {
        let mut url = url::Url::parse(&url_with(
            &bed.database_url,
            None,
            &[
                ("sslmode", mode.into()),
                ("sslrootcert", path(ca)),
                ("hostaddr", "127.0.0.1".into()),
            ],
        ))?;
        url.set_host(Some("pg.invalid"))?;
        Ok(url.to_string())
    };
    let line = refusal(&run_sub("verify", &renamed("verify-full", &pki.ca)?).await?);
    assert!(
        line.contains("with sslmode=verify-full: the server's certificate is not valid for the host name 'pg.invalid'; connect with a host name the certificate lists"),
        "{line}"
    );
    let out = succeeded(&run_sub("verify", &renamed("verify-ca", &pki.ca)?).await?);
    assert!(out.contains("consistent: 0 votes"), "{out}");
    // verify-ca still checks the CA.
    let line = refusal(&run_sub("verify", &renamed("verify-ca", &pki.other_ca)?).await?);
    assert!(
        line.contains(
            "with sslmode=verify-ca: the server's certificate is not signed by a CA in sslrootcert"
        ),
        "{line}"
    );

    // prefer, as libpq: a failed certificate check falls back to a plain session.
    let prefer = url_with(
        &bed.database_url,
        None,
        &[
            ("sslmode", "prefer".into()),
            ("sslrootcert", path(&pki.other_ca)),
        ],
    );
    let fell_back = run_sub("verify", &prefer).await?;
    succeeded(&fell_back);
    let logged = String::from_utf8_lossy(&fell_back.stdout).to_string()
        + &String::from_utf8_lossy(&fell_back.stderr);
    assert!(
        logged.contains("connecting in plain text"),
        "the fall-back to plain text is never silent: {logged}"
    );

    // pg_hba.conf demands a certificate from CERT_USER: refused without one.
    let no_cert = url_with(
        &bed.database_url,
        Some(CERT_USER),
        &[
            ("sslmode", "verify-full".into()),
            ("sslrootcert", path(&pki.ca)),
        ],
    );
    let line = refusal(&run_sub("verify", &no_cert).await?);
    assert!(
        line.contains("with sslmode=verify-full: the server refused the session")
            && line.contains("set sslcert and sslkey"),
        "{line}"
    );

    // A replica with the wrong CA never gets ready and logs the same line, whether its
    // migrations or (RUN_MIGRATIONS=false, the production setting) its pool connect.
    for run_migrations in ["true", "false"] {
        let addr = free_addr()?;
        let log = pki.dir().join(format!("refused-{run_migrations}.log"));
        let mut replica = spawn_replica(
            &bed,
            &verify_full(&pki.other_ca),
            addr,
            &log,
            &[(var::RUN_MIGRATIONS, run_migrations)],
        )?;
        eventually("the refusal logged", WAIT, async || {
            Ok(std::fs::read_to_string(&log)?.contains(
                "with sslmode=verify-full: the server's certificate is not signed by a CA in sslrootcert; set sslrootcert",
            ))
        })
        .await?;
        let (status, body) = http_get(addr, paths::READYZ).await?;
        assert_eq!(status, 503, "{body}");
        signal::send(replica.id().unwrap_or_default(), Signal::TERM)?;
        tokio::time::timeout(Duration::from_secs(20), replica.wait()).await??;
    }
    Ok(())
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required_and_prefer_falls_back()
-> anyhow::Result<()> {
    let pki = TestPki::generate(LOCAL_SERVER_NAMES, CERT_USER)?;
    let bed = TestBed::new(infra::shared().await?).await?;
    for params in [
        vec![("sslmode", "require".to_string())],
        vec![
            ("sslmode", "verify-full".to_string()),
            ("sslrootcert", path(&pki.ca)),
        ],
    ] {
        let url = url_with(&bed.database_url, None, &params);
        let line = refusal(&run_sub("migrate", &url).await?);
        assert!(
            line.contains(&format!(
                "with sslmode={}: the server does not offer TLS (ssl=off); turn ssl on",
                params[0].1
            )),
            "{line}"
        );
    }
    // prefer (the default, and said explicitly) connects in plain text, as before.
    let out = succeeded(&run_sub("migrate", &bed.database_url).await?);
    assert!(out.contains("applied migration"), "{out}");
    let prefer = url_with(&bed.database_url, None, &[("sslmode", "prefer".into())]);
    let out = succeeded(&run_sub("verify", &prefer).await?);
    assert!(out.contains("consistent"), "{out}");
    Ok(())
}

#[tokio::test]
async fn bad_tls_settings_stop_start_up_with_one_line() -> anyhow::Result<()> {
    let pki = TestPki::generate(LOCAL_SERVER_NAMES, CERT_USER)?;
    let base = "postgres://votes:Xs3cr3t@127.0.0.1:1/votes";
    let cases = [
        (
            format!("{base}?sslmode=verify-all"),
            "error: invalid DATABASE_URL: sslmode=\"verify-all\" is not an sslmode; use disable, prefer, require, verify-ca or verify-full",
        ),
        (
            format!("{base}?sslmode=verify-full"),
            "error: invalid DATABASE_URL: sslmode=verify-full without sslrootcert; add sslrootcert=",
        ),
        (
            format!("{base}?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem"),
            "error: invalid DATABASE_URL: sslrootcert=\"/nonexistent/ca.pem\" cannot be read",
        ),
        (
            format!("{base}?sslcert={}", path(&pki.client.cert)),
            "error: invalid DATABASE_URL: only one of sslcert and sslkey is set",
        ),
        (
            format!(
                "{base}?sslcert={}&sslkey={}",
                path(&pki.client.cert),
                path(&pki.ca)
            ),
            "error: invalid DATABASE_URL: sslkey=",
        ),
    ];
    for (url, want) in cases {
        for sub in ["run", "migrate"] {
            let out = tokio::process::Command::new(BIN)
                .arg(sub)
                .env_clear()
                .env(var::DATABASE_URL, &url)
                .env(var::AMQP_URL, "amqp://u:p@127.0.0.1:1/%2f")
                .stdin(Stdio::null())
                .output()
                .await?;
            let line = refusal(&out);
            assert!(line.starts_with(want), "{sub}: {line}");
            assert!(!line.contains("Xs3cr3t"), "{line}");
        }
    }
    Ok(())
}

/// The cancel request of a batch attempt that ran out of time goes over the same TLS
/// settings as the session (the server would otherwise keep the statement waiting on a
/// lock until its own lock timeout, here five minutes).
#[tokio::test]
async fn a_timed_out_batch_is_cancelled_on_the_server_over_tls() -> anyhow::Result<()> {
    use vote_aggregator::config::SessionTimeouts;
    use vote_aggregator::db;
    let (pki, server) = tls_server().await?;
    let bed = TestBed::new(&server).await?;
    let url = secrecy::SecretString::from(url_with(
        &bed.database_url,
        None,
        &[
            ("sslmode", "verify-full".into()),
            ("sslrootcert", path(&pki.ca)),
        ],
    ));
    db::run_migrations(&url).await?;
    let long = Duration::from_secs(300);
    let timeouts = SessionTimeouts {
        statement: long,
        lock: long,
        idle_in_transaction: long,
    };
    let pool = db::pool(&url, 1, &timeouts);
    let mut holder = bed.db().await?;
    holder
        .batch_execute("BEGIN; LOCK TABLE tally_shards IN EXCLUSIVE MODE")
        .await?;
    let mut batch = db::BatchColumns::default();
    for vote in votes::spread(5, &["e"], &["a"]) {
        batch.push(&vote, true);
    }
    let attempt =
        db::write_batch_attempt(&pool, &url, &batch, 0, Duration::from_secs(1), None).await;
    let failure = attempt.expect_err("the lock is held");
    assert!(
        matches!(
            failure.error,
            vote_aggregator::error::DbError::Timeout { .. }
        ),
        "{}",
        failure.error
    );
    let mut watcher = bed.db().await?;
    let waiting = "SELECT count(*)::bigint AS n FROM pg_stat_activity \
                   WHERE datname = $1 AND application_name = $2 AND wait_event_type = 'Lock'";
    let name = bed.database_name();
    eventually("the waiting statement cancelled", WAIT, async || {
        Ok(watcher
            .scalar_with(waiting, &[&name, db::APPLICATION_NAME])
            .await?
            == 0)
    })
    .await?;
    holder.batch_execute("ROLLBACK").await?;
    Ok(())
}
