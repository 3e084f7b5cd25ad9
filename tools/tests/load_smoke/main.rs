//! A few-second run of the load runner, so `make load` keeps working. It asserts that
//! every output is produced and every figure is present, never how fast anything is
//! (timings are benchmarks, not tests).

use std::time::Duration;

use vote_aggregator::config::QueueType;
use vote_tools::load::{self, DrainOrder, LoadOptions};
use vote_tools::load_report;

#[tokio::test]
async fn a_tiny_load_run_writes_every_output_with_every_figure() -> anyhow::Result<()> {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("load-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let opts = LoadOptions {
        votes: 2_000,
        duplicates: 0.1,
        replicas: vec![1, 2],
        batch_sizes: vec![100],
        queue_types: vec![QueueType::Classic],
        steady: Duration::from_secs(1),
        prefetch_factor: 2,
        out_dir: out.clone(),
        seed: 3,
        progress: false,
        broker_cluster: false,
        via_port_proxy: false,
        floor_with_aggregator_write: true,
        rounds: 2,
        // A setting passed to every replica (the periodic tally scan off).
        replica_env: vec![("TALLY_CHECK_INTERVAL_SECONDS".into(), "0".into())],
    };
    let report = load::run(&opts, "load smoke test".into()).await?;
    // In `--replicas` order, whichever order the round drained them in.
    let replicas: Vec<usize> = report.configs.iter().map(|c| c.replicas).collect();
    assert_eq!(replicas, [1, 2]);
    assert_eq!(report.replica_env, opts.replica_env);
    for c in &report.configs {
        assert!(c.votes_per_second > 0.0, "{c:?}");
        assert!(c.broker_ceiling_votes_per_second > 0.0);
        assert!(c.db_ceiling_votes_per_second > 0.0);
        assert!(c.ratio_to_broker_ceiling > 0.0);
        assert!(c.floor_votes_per_second > 0.0, "{c:?}");
        assert!(c.ratio_to_floor > 0.0, "{c:?}");
        assert!(c.latency_samples > 0);
        assert!(c.latency_p99_ms >= c.latency_p50_ms);
        assert!(c.peak_rss_mib > 0.0);
        assert!(c.cpu_seconds_per_1000_votes > 0.0);
        assert!(!c.limited_by.is_empty());
        assert_eq!(c.rounds, 2, "{c:?}");
        // Both rounds kept, in order; the median round is one of them.
        assert_eq!(c.every_round.len(), 2, "{c:?}");
        assert!(
            c.every_round
                .iter()
                .any(|r| r.ratio_to_floor == c.ratio_to_floor),
            "{c:?}"
        );
        assert!(
            c.every_round
                .iter()
                .all(|r| r.cpu_seconds_per_1000_votes.iter().all(Option::is_some)),
            "{c:?}"
        );
        // The first round drained the floors first, the second the configurations.
        let orders: Vec<_> = c.every_round.iter().map(|r| r.drain_order).collect();
        assert_eq!(
            orders,
            [DrainOrder::FloorsFirst, DrainOrder::AggregatorFirst],
            "{c:?}"
        );
        // The pre-fill's duplicates were counted, and how they were recognised read.
        assert!(
            c.every_round.iter().all(|r| r
                .duplicates_from_memory_share
                .is_some_and(|s| (0.0..=1.0).contains(&s))),
            "{c:?}"
        );
        let floor_consumer = c.floor_consumer_cpu_seconds_per_1000_votes;
        assert!(floor_consumer.is_some_and(|x| x > 0.0), "{c:?}");
        let (lo, hi) = c.ratio_to_floor_range;
        assert!(lo <= c.ratio_to_floor && c.ratio_to_floor <= hi, "{c:?}");
        // The second floor drained every vote through the aggregator's own batch write.
        let with_write = c.floor_with_aggregator_write.as_ref();
        assert!(
            with_write.is_some_and(
                |w| w.votes_per_second > 0.0 && w.database_cpu_seconds_per_1000_votes.is_some()
            ),
            "{c:?}"
        );
    }
    assert_eq!(
        report.machine.postgres_fsync, "on",
        "baselines pay for durability"
    );
    assert_eq!(report.machine.data_path, "host network (loopback)");
    let written = load_report::write_all(&report, &out)?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&written.json)?)?;
    for key in [
        "replicas",
        "batch_size",
        "queue_type",
        "votes_per_second",
        "broker_ceiling_votes_per_second",
        "db_ceiling_votes_per_second",
        "ratio_to_broker_ceiling",
        "floor_votes_per_second",
        "ratio_to_floor",
        "rounds",
        "ratio_to_floor_range",
        "floor_consumer_cpu_seconds_per_1000_votes",
        "floor_broker_cpu_seconds_per_1000_votes",
        "floor_database_cpu_seconds_per_1000_votes",
        "floor_with_aggregator_write",
        "every_round",
        "drain_order",
        "duplicates_from_memory_share",
        "latency_p50_ms",
        "latency_p99_ms",
        "cpu_seconds_per_1000_votes",
        "peak_rss_mib",
    ] {
        assert!(json["configs"][0].get(key).is_some(), "JSON lacks {key}");
    }
    let md = std::fs::read_to_string(&written.markdown)?;
    assert!(md.contains("| classic | 1 | 100 |"), "{md}");
    assert!(md.contains("### Targets"));
    assert!(md.contains("aggregator against floor"), "{md}");
    assert!(md.contains("(median of 2 rounds: "), "{md}");
    assert!(md.contains("The gap split"), "{md}");
    assert!(md.contains("### Every round"), "{md}");
    assert!(
        md.contains("| classic | 1 | 100 | 2 | aggregator first |"),
        "{md}"
    );
    let chart = written
        .chart
        .expect("chart drawn (fonts-dejavu-core is installed)");
    assert!(std::fs::read(chart)?.starts_with(b"\x89PNG"));
    Ok(())
}
