//! The real `vote-aggregator` binary: signals, exit codes, subcommands, one-line errors.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_aggregator::http::paths;
use vote_aggregator::metrics::names;
use vote_testkit::infra;
use vote_testkit::inspect::{eventually, http_get, metric_value};
use vote_testkit::signal::{self, Signal};
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

mod secrets;

const BIN: &str = env!("CARGO_BIN_EXE_vote-aggregator");
const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the binary with only `env` set (no inherited configuration) and waits.
fn run_with(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// Starts `vote-aggregator run` with only `env` set, its output captured.
fn spawn_run(env: &[(&str, &str)]) -> anyhow::Result<std::process::Child> {
    Ok(Command::new(BIN)
        .args(["run"])
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[test]
fn config_errors_are_one_line_naming_the_variable() -> anyhow::Result<()> {
    let base = [
        (var::DATABASE_URL, "postgres://u:topsecret@127.0.0.1:1/x"),
        (var::AMQP_URL, "amqp://u:topsecret@127.0.0.1:1/%2f"),
    ];
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[(var::BATCH_SIZE, "lots")],
            "error: invalid BATCH_SIZE=\"lots\": expected a whole number from 1 to 10000",
        ),
        (
            &[(var::QUEUE_TYPE, "stream")],
            "error: invalid QUEUE_TYPE=\"stream\": expected 'quorum' or 'classic'",
        ),
        (
            &[("AMQP_URL_FILE", "/run/secrets/x")],
            "error: both AMQP_URL and AMQP_URL_FILE are set: set only one",
        ),
    ];
    for (extra, want) in cases {
        let env: Vec<(&str, &str)> = base.iter().chain(extra.iter()).copied().collect();
        let out = run_with(&["run"], &env)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim_end(), *want);
    }
    let out = run_with(&["run"], &[(var::AMQP_URL, "amqp://u:topsecret@h/%2f")])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: DATABASE_URL is not set: set DATABASE_URL or DATABASE_URL_FILE"
    );
    let out = run_with(
        &["verify"],
        &[(var::DATABASE_URL, "postgres://u:topsecret@127.0.0.1:1/x")],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: cannot connect to PostgreSQL at postgres://u:***@127.0.0.1:1/x"),
        "{stderr}"
    );
    assert!(!stderr.contains("topsecret"), "credential leaked: {stderr}");
    Ok(())
}

#[test]
fn help_describes_every_subcommand() -> anyhow::Result<()> {
    let out = run_with(&["--help"], &[])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["run", "migrate", "verify"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    for var in vote_aggregator::config::VARIABLES {
        assert!(text.contains(var.name), "--help lacks {}: {text}", var.name);
    }
    assert!(
        !text.contains("config-table"),
        "the hidden subcommand shows: {text}"
    );
    for (sub, word) in [
        ("run", "SIGTERM"),
        ("migrate", "advisory lock"),
        ("verify", "Exits 0"),
    ] {
        let out = run_with(&[sub, "--help"], &[])?;
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(word));
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_commits_and_acks_the_batch_in_hand_then_exits_zero() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let port = free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut env = bed.env("sigterm");
    env.retain(|(k, _)| k != var::METRICS_ADDR);
    env.push((var::METRICS_ADDR.into(), addr.to_string()));
    // A batch that would wait a minute to fill: only SIGTERM can flush it.
    env.push((var::BATCH_SIZE.into(), "1000".into()));
    env.push((var::BATCH_TIMEOUT_MS.into(), "60000".into()));
    let mut child = tokio::process::Command::new(BIN)
        .args(["run"])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var("TEST_LOG").as_deref() == Ok("1") {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()?;
    eventually("replica ready", WAIT, async || {
        Ok(matches!(http_get(addr, paths::READYZ).await, Ok((200, _))))
    })
    .await?;
    let votes = votes::spread(50, &["e"], &["a", "b"]);
    bed.publisher().await?.publish_votes(&votes).await?;
    eventually("50 deliveries in hand", WAIT, async || {
        let (_, page) = http_get(addr, paths::METRICS).await?;
        Ok(metric_value(&page, names::VOTES_RECEIVED_TOTAL) == Some(50.0))
    })
    .await?;
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 0, "batch still in hand");

    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    signal::send(pid, Signal::TERM)?;
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    assert_eq!(exit.code(), Some(0), "clean exit");
    assert_eq!(db.vote_count().await?, 50, "batch committed on SIGTERM");
    // Acked: nothing comes back to the queue once the consumer is gone.
    let (ready, consumers) = bed.broker().await?.queue_state(&bed.queue).await?;
    assert_eq!((ready, consumers), (0, 0));
    Ok(())
}

#[tokio::test]
async fn verify_passes_on_a_consistent_database_and_shows_a_diff_on_a_tampered_one()
-> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let url = bed.database_url.as_str();
    // Two migrate processes at once: the advisory lock serialises them.
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking({
            let url = url.to_string();
            move || run_with(&["migrate"], &[(var::DATABASE_URL, &url)])
        }),
        tokio::task::spawn_blocking({
            let url = url.to_string();
            move || run_with(&["migrate"], &[(var::DATABASE_URL, &url)])
        }),
    );
    let (a, b) = (a??, b??);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    assert!(printed.contains("applied migration") && printed.contains("up to date"));

    let mut db = bed.db().await?;
    db.execute(
        "INSERT INTO votes (vote_id, election_id, candidate_id, cast_at) VALUES \
         (gen_random_uuid(), 'e', 'alice', now()), (gen_random_uuid(), 'e', 'alice', now()), \
         (gen_random_uuid(), 'e', 'bob', now())",
    )
    .await?;
    db.execute(
        "INSERT INTO tally_shards (election_id, candidate_id, shard, votes) VALUES \
         ('e', 'alice', 0, 1), ('e', 'alice', 3, 1), ('e', 'bob', 1, 1)",
    )
    .await?;
    let ok = run_with(&["verify"], &[(var::DATABASE_URL, url)])?;
    assert_eq!(ok.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("consistent: 3 votes"));

    db.execute("UPDATE tally_shards SET votes = votes + 5 WHERE candidate_id = 'bob'")
        .await?;
    let bad = run_with(&["verify"], &[(var::DATABASE_URL, url)])?;
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(2), "{out}");
    assert!(out.contains("bob") && out.contains("+5"), "{out}");
    assert!(!out.contains("alice"), "only the drifting candidate: {out}");
    assert!(out.contains("INCONSISTENT: 1 of 2 candidates"), "{out}");

    // votes is append-only.
    let err = db
        .execute("DELETE FROM votes WHERE candidate_id = 'bob'")
        .await
        .expect_err("append-only");
    assert!(err.to_string().contains("append-only"), "{err}");
    Ok(())
}

#[tokio::test]
async fn the_psql_script_builds_the_same_schema_that_migrate_recognises() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let script = std::env::temp_dir().join(format!("init_db_{}.sql", std::process::id()));
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = Command::new(format!("{root}/scripts/init-db-sql.sh"))
        .arg(&script)
        .stdout(Stdio::null())
        .status()?;
    assert!(status.success());
    let sql = std::fs::read_to_string(&script)?;
    let mut db = bed.db().await?;
    db.batch_execute(&sql).await?;
    let out = run_with(&["migrate"], &[(var::DATABASE_URL, &bed.database_url)])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "schema is up to date"
    );
    let out = run_with(&["verify"], &[(var::DATABASE_URL, &bed.database_url)])?;
    assert_eq!(out.status.code(), Some(0));
    Ok(())
}

/// The strings only a fault-injection build contains: its switches' names and its lines.
fn fault_hook_strings() -> [&'static str; 3] {
    use vote_aggregator::fault;
    [fault::ENV_PREFIX, fault::CRASH_LINE, fault::BUILD_MARKER]
}

fn hooks_in(path: &std::path::Path) -> anyhow::Result<Vec<&'static str>> {
    let bytes = std::fs::read(path)?;
    Ok(fault_hook_strings()
        .into_iter()
        .filter(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()))
        .collect())
}

/// No ordinary build carries the fault hooks: this test's binary, and the release and
/// fault-injection builds next to it when they were built. The fault-injection build is
/// the check's own control: it must contain every string the others must not.
#[test]
fn only_the_fault_injection_build_carries_fault_hooks() -> anyhow::Result<()> {
    let bin = std::path::Path::new(BIN);
    assert_eq!(hooks_in(bin)?, Vec::<&str>::new(), "{}", bin.display());
    let profile_dir = bin.parent().expect("the binary lives in target/<profile>/");
    let release = profile_dir
        .with_file_name("release")
        .join("vote-aggregator");
    if release.is_file() {
        assert_eq!(
            hooks_in(&release)?,
            Vec::<&str>::new(),
            "{}",
            release.display()
        );
    }
    let faulty = profile_dir
        .join(vote_testkit::fleet::FAULT_BINARY_DIR)
        .join("vote-aggregator");
    if faulty.is_file() {
        assert_eq!(
            hooks_in(&faulty)?,
            fault_hook_strings(),
            "{}",
            faulty.display()
        );
    }
    Ok(())
}

/// JSON log lines carry the replica's span fields, so the logs of several replicas (in
/// one process or one log stream) can be told apart.
#[tokio::test]
async fn json_logs_carry_the_replica_span() -> anyhow::Result<()> {
    use vote_aggregator::config::variables as var;
    let port = free_port()?;
    let metrics_addr = format!("127.0.0.1:{port}");
    let env = [
        (var::DATABASE_URL, "postgres://votes:pw@127.0.0.1:1/votes"),
        (var::AMQP_URL, "amqp://votes:pw@127.0.0.1:1/%2f"),
        (var::METRICS_ADDR, metrics_addr.as_str()),
        (var::LOG_FORMAT, "json"),
        (var::REPLICA_ID, "json-span-test"),
    ];
    // The unreachable database is retried, logging each attempt inside the replica span.
    let child = spawn_run(&env)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal::send(child.id(), Signal::TERM)?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let in_span = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["span"]["replica"] == "json-span-test")
        .count();
    assert!(
        in_span >= 2,
        "no JSON line carries the replica span:\n{stderr}"
    );
    Ok(())
}

/// `vote-aggregator healthcheck` (what a container runtime calls): exit 0 while the
/// replica at METRICS_ADDR serves `/healthz` (even with its servers unreachable: it is
/// alive, just not ready: `--ready` says so), exit 1 with one line once it is gone.
#[tokio::test]
async fn healthcheck_follows_the_replica_it_asks() -> anyhow::Result<()> {
    use vote_aggregator::config::variables as var;
    let metrics_addr = format!("0.0.0.0:{}", free_port()?);
    let env = [
        (var::DATABASE_URL, "postgres://votes:pw@127.0.0.1:1/votes"),
        (var::AMQP_URL, "amqp://votes:pw@127.0.0.1:1/%2f"),
        (var::METRICS_ADDR, metrics_addr.as_str()),
    ];
    let check = |env: &[(&str, &str)]| run_with(&["healthcheck", "--timeout-seconds", "2"], env);
    let only_addr = [(var::METRICS_ADDR, metrics_addr.as_str())];
    let before = check(&only_addr)?;
    assert_eq!(before.status.code(), Some(1), "nothing listens yet");

    let child = spawn_run(&env)?;
    let healthy = eventually("healthcheck exits 0", WAIT, async || {
        Ok(check(&only_addr)?.status.success())
    })
    .await;
    let not_ready = run_with(
        &["healthcheck", "--ready", "--timeout-seconds", "2"],
        &only_addr,
    );
    signal::send(child.id(), Signal::TERM)?;
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    healthy?;
    let not_ready = not_ready?;
    let stderr = String::from_utf8_lossy(&not_ready.stderr);
    assert_eq!(not_ready.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/readyz answered 503"), "{stderr}");

    let after = check(&only_addr)?;
    let stderr = String::from_utf8_lossy(&after.stderr);
    assert_eq!(after.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("unhealthy: GET /healthz at 127.0.0.1:"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    Ok(())
}
