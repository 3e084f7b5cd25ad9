//! The two ceilings every configuration is quoted against, measured in the same run with
//! the same data: the broker alone (a consumer that only receives and acks) and the
//! database alone (the service's own batch statement fed from memory).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use secrecy::SecretString;
use vote_aggregator::config::QueueType;
use vote_aggregator::db::{self, BatchColumns};

use vote_testkit::workload::{Message, Workload};

use super::{LoadOptions, Servers, consume, fresh_bed, prefill};

/// Receive-and-ack only: the fastest any consumer of this queue can go on this machine.
pub(super) async fn broker_ceiling(
    servers: &Servers,
    workload: &Workload,
    queue_type: QueueType,
    batch: usize,
    opts: &LoadOptions,
) -> anyhow::Result<f64> {
    let bed = fresh_bed(servers, queue_type).await?;
    prefill(servers, &bed, workload, opts).await?;
    let expected = workload.main.len();
    let (conn, ch, mut consumer) = consume(&bed, batch, opts, "broker-ceiling").await?;
    let mut received = 0usize;
    let mut first: Option<Instant> = None;
    let mut pending = 0usize;
    while received < expected {
        let next = tokio::time::timeout(Duration::from_millis(50), consumer.next()).await;
        match next {
            Ok(Some(d)) => {
                let d = d?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                pending += 1;
                if pending >= batch || received == expected {
                    ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                        .await?;
                    pending = 0;
                }
            }
            Ok(None) => anyhow::bail!("broker ceiling consumer was cancelled"),
            Err(_) if first.is_some_and(|f| f.elapsed() > Duration::from_secs(300)) => {
                anyhow::bail!("broker ceiling consumer stalled at {received}/{expected}")
            }
            Err(_) => {}
        }
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1.0);
    let _ = conn.close(200, "done".into()).await;
    Ok(received as f64 / secs.max(0.001))
}

/// The batch statement fed from memory, one transaction at a time.
pub(super) async fn db_ceiling(
    servers: &Servers,
    workload: &Workload,
    batch: usize,
) -> anyhow::Result<f64> {
    let bed = fresh_bed(servers, QueueType::Classic).await?;
    let url = SecretString::from(bed.database_url.clone());
    let pool = db::pool(&url, 1, &Default::default());
    let votes: Vec<_> = workload
        .main
        .iter()
        .filter_map(|m| match m {
            Message::Original(v) | Message::Duplicate(v) => Some(v),
            _ => None,
        })
        .collect();
    let batches: Vec<BatchColumns> = votes
        .chunks(batch)
        .map(|chunk| {
            let mut c = BatchColumns::default();
            let mut seen = std::collections::HashSet::new();
            for v in chunk {
                // The aggregator drops in-batch exact duplicates before the round trip.
                if seen.insert(v.vote_id) {
                    c.push(v, true);
                }
            }
            c
        })
        .collect();
    let started = Instant::now();
    let mut counted = 0usize;
    for (i, b) in batches.iter().enumerate() {
        let outcome = db::write_batch(&pool, &url, b, (i % 16) as i16).await?;
        counted += outcome.counted.len();
    }
    Ok(counted as f64 / started.elapsed().as_secs_f64().max(0.001))
}
