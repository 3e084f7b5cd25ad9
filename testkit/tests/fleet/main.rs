//! The replica fleet against real servers and the real `vote-aggregator` binary: two
//! replicas count together, then are paused, killed, restarted and stopped with real
//! signals.
//!
//! Build the binary first, then (offline images on a machine without registry access):
//! `cargo build -p vote-aggregator &&
//!  VOTES_POSTGRES_IMAGE=vote-aggregator/postgres:17-offline
//!  VOTES_RABBITMQ_IMAGE=vote-aggregator/rabbitmq:4.0-offline cargo test -p vote-testkit --test fleet`

use std::path::PathBuf;
use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_aggregator::http::paths;
use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra;
use vote_testkit::inspect::{eventually, http_get};
use vote_testkit::procinfo::state as proc_state;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

const WAIT: Duration = Duration::from_secs(30);

fn log_dir(tag: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fleet-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

async fn counted_total(fleet: &Fleet) -> anyhow::Result<u64> {
    let mut total = 0;
    for scrape in fleet.scrape_all().await {
        total += scrape?.counted();
    }
    Ok(total)
}

#[tokio::test]
async fn two_replicas_count_together_and_survive_pause_kill_restart_and_stop() -> anyhow::Result<()>
{
    let started = std::time::Instant::now();
    let bed = TestBed::new(infra::shared().await?).await?;
    let mut base = bed.env("unused");
    base.retain(|(k, _)| k != var::REPLICA_ID && k != var::METRICS_ADDR);
    base.push((var::SHUTDOWN_GRACE_SECONDS.into(), "5".into()));
    let specs = vec![
        ReplicaSpec::new("fleet-a").with_env(var::BATCH_SIZE, "50"),
        ReplicaSpec::new("fleet-b").with_env(var::BATCH_SIZE, "100"),
    ];
    let opts = FleetOptions::new(log_dir("main"), base)?;
    let mut fleet = Fleet::start(opts, specs).await?;
    eprintln!("fleet ready after {:?}", started.elapsed());

    assert_eq!(fleet.len(), 2);
    assert_eq!((fleet.name(0), fleet.name(1)), ("fleet-a", "fleet-b"));
    let (pid_a, pid_b) = (fleet.pid(0).expect("a runs"), fleet.pid(1).expect("b runs"));
    assert_ne!(pid_a, pid_b);
    assert_ne!(fleet.metrics_addr(0), fleet.metrics_addr(1));
    for i in 0..2 {
        assert!(fleet.is_running(i));
        let (status, _) = http_get(fleet.metrics_addr(i), paths::READYZ).await?;
        assert_eq!(status, 200);
        let scrape = fleet.scrape(i).await?;
        assert_eq!(
            scrape.get(&vote_testkit::prometheus::up_series(
                vote_aggregator::metrics::DEP_POSTGRES
            )),
            Some(1.0)
        );
    }

    // Both replicas consume before anything is published, so both get a share.
    let broker = bed.broker().await?;
    eventually("2 consumers on the queue", WAIT, async || {
        Ok(broker.queue_state(&bed.queue).await?.1 == 2)
    })
    .await?;
    let publisher = bed.publisher().await?;
    publisher
        .publish_votes(&votes::spread(2000, &["e"], &["a", "b"]))
        .await?;
    let mut db = bed.db().await?;
    eventually("2000 votes in the database", WAIT, async || {
        Ok(db.vote_count().await? == 2000)
    })
    .await?;
    eventually("counted metrics adding up to 2000", WAIT, async || {
        Ok(counted_total(&fleet).await? == 2000)
    })
    .await?;
    let scrapes: Vec<_> = fleet
        .scrape_all()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    for (i, s) in scrapes.iter().enumerate() {
        assert!(
            s.counted() > 0,
            "replica {i} counted nothing: competing consumers"
        );
        assert!(s.received() >= s.counted());
        assert_eq!((s.rejected(), s.conflicting()), (0, 0));
    }
    eprintln!(
        "counted {} + {} = 2000 after {:?}",
        scrapes[0].counted(),
        scrapes[1].counted(),
        started.elapsed()
    );

    // Pause: the kernel says 'T', the endpoint stops answering; resume undoes both.
    fleet.pause(1)?;
    assert_eq!(proc_state(pid_b), Some('T'));
    assert!(fleet.is_paused(1) && fleet.is_running(1));
    assert!(
        fleet
            .scrape_within(1, Duration::from_millis(500))
            .await
            .is_err(),
        "a paused replica cannot answer"
    );
    fleet.resume(1)?;
    assert_ne!(proc_state(pid_b), Some('T'));
    assert!(!fleet.is_paused(1));
    fleet.wait_ready(1, WAIT).await?;
    assert_eq!(fleet.scrape(1).await?.counted(), scrapes[1].counted());

    // Kill: the pid is gone; restart brings a new process on the same address.
    let addr_a = fleet.metrics_addr(0);
    fleet.kill(0).await?;
    assert!(
        proc_state(pid_a).is_none(),
        "pid {pid_a} still present after kill"
    );
    assert!(!fleet.is_running(0));
    assert_eq!(fleet.pid(0), None);
    assert!(fleet.scrape(0).await.is_err());
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(fleet.exit_status(0).and_then(|s| s.signal()), Some(9));
    }
    fleet.restart(0).await?;
    let new_pid_a = fleet.pid(0).expect("a runs again");
    assert_ne!(new_pid_a, pid_a);
    assert_eq!(fleet.metrics_addr(0), addr_a);
    assert_eq!(fleet.starts(0), 2);
    assert_eq!(
        fleet.scrape(0).await?.counted(),
        0,
        "a fresh process starts from zero"
    );
    assert!(
        fleet.start_replica(0).await.is_err(),
        "start_replica refuses a running replica"
    );

    // The restarted fleet still counts.
    publisher
        .publish_votes(&votes::spread(100, &["e"], &["a", "b"]))
        .await?;
    eventually("2100 votes in the database", WAIT, async || {
        Ok(db.vote_count().await? == 2100)
    })
    .await?;
    // The killed process's count went with it: the live counters plus its last figure
    // add up to what the database holds.
    let lost_with_kill = scrapes[0].counted();
    eventually("counted metrics adding up to 2100", WAIT, async || {
        Ok(counted_total(&fleet).await? + lost_with_kill == 2100)
    })
    .await?;

    // Stop: SIGTERM, clean exit 0.
    let status = fleet.stop(1).await?;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(!fleet.is_running(1));
    assert!(proc_state(pid_b).is_none());

    // Logs: one per replica, non-empty, one marker per start.
    for i in 0..2 {
        let text = std::fs::read_to_string(fleet.log_path(i))?;
        assert!(!text.trim().is_empty(), "log of {} is empty", fleet.name(i));
        let starts = text.matches(vote_testkit::fleet::START_MARKER).count();
        assert_eq!(starts, if i == 0 { 2 } else { 1 }, "{text}");
    }
    let log_a = fleet.log_path(0);

    let statuses = fleet.shutdown().await?;
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].and_then(|s| s.code()), Some(0));
    assert!(statuses[1].is_none(), "b was already stopped");
    assert!(proc_state(new_pid_a).is_none());
    assert!(std::fs::metadata(log_a)?.len() > 0);
    eprintln!("fleet test done in {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_replica_that_exits_at_start_fails_fast_with_its_log() -> anyhow::Result<()> {
    let base = vec![
        (
            var::DATABASE_URL.to_string(),
            "postgres://u:p@127.0.0.1:1/x".to_string(),
        ),
        (
            var::AMQP_URL.to_string(),
            "amqp://u:p@127.0.0.1:1/%2f".to_string(),
        ),
    ];
    let opts = FleetOptions::new(log_dir("bad"), base)?;
    let started = std::time::Instant::now();
    let err = Fleet::start(
        opts,
        vec![ReplicaSpec::new("bad-0").with_env(var::BATCH_SIZE, "lots")],
    )
    .await
    .expect_err("a config error must fail the start");
    let msg = format!("{err:#}");
    assert!(msg.contains("bad-0") && msg.contains("exited"), "{msg}");
    assert!(msg.contains("invalid BATCH_SIZE"), "log tail quoted: {msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails fast, not after the ready timeout"
    );
    Ok(())
}

#[tokio::test]
async fn specs_with_bad_or_duplicate_names_are_refused() -> anyhow::Result<()> {
    let opts = FleetOptions::new(log_dir("names"), Vec::new())?;
    let dup = Fleet::start(
        opts.clone(),
        vec![ReplicaSpec::new("r-0"), ReplicaSpec::new("r-0")],
    )
    .await;
    assert!(format!("{:#}", dup.expect_err("duplicate")).contains("used twice"));
    let bad = Fleet::start(opts, vec![ReplicaSpec::new("has space")]).await;
    assert!(format!("{:#}", bad.expect_err("bad name")).contains("invalid replica name"));
    Ok(())
}
