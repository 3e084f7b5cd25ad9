//! What a replica's in-memory work on a batch costs per vote, on an idle core: filling a
//! batch with the in-batch dedupe ([`DistinctRows`]), and remembering it once committed
//! ([`RecentlyStored`]), against only moving each vote's fields into columns (what the
//! load runner's bare floor does). Its own CPU, without a broker or a database; and the
//! resident memory that remembering `VOTES_REMEMBERED` votes takes:
//!
//! ```text
//! cargo run --release --example batch_memory_cost -p vote-aggregator
//! ```
//!
//! Capacity figures come from `make load`; this isolates one part of them.

use std::time::Instant;

use vote_aggregator::db::recent::VOTES_REMEMBERED;
use vote_aggregator::db::{BatchColumns, BatchOutcome, DistinctRows, RecentlyStored};
use vote_aggregator::vote::Vote;

const BATCH: usize = 500;
const BATCHES: usize = 2_000;

/// `n` batches of distinct votes shaped like `make load`'s (3 elections, 6 candidates, 50
/// precincts).
fn batches_of(n: usize) -> Vec<Vec<Vote>> {
    (0..n)
        .map(|_| {
            (0..BATCH)
                .map(|i| Vote {
                    vote_id: uuid::Uuid::new_v4(),
                    election_id: format!("election-{}", i % 3),
                    candidate_id: format!("candidate-{}", i % 6),
                    precinct_id: Some(format!("precinct-{}", i % 50)),
                    cast_at: chrono::Utc::now(),
                })
                .collect()
        })
        .collect()
}

/// This process's resident memory, in MiB (Linux).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Nanoseconds per vote of `work` over every batch.
fn per_vote(mut work: impl FnMut(Vec<Vote>)) -> f64 {
    let input = batches_of(BATCHES);
    let started = Instant::now();
    for batch in input {
        work(batch);
    }
    started.elapsed().as_secs_f64() * 1e9 / (BATCHES * BATCH) as f64
}

/// Fills a batch from `batch` as a replica does.
fn fill(batch: Vec<Vote>) -> BatchColumns {
    let mut rows = DistinctRows::with_capacity(BATCH);
    for v in batch {
        rows.add(v);
    }
    rows.take_columns()
}

/// Remembers `batch` as committed with every row counted.
fn remember(recent: &RecentlyStored, batch: Vec<Vote>) {
    let columns = fill(batch);
    let outcome = BatchOutcome {
        counted: (0..columns.len() as i32).collect(),
        ..BatchOutcome::default()
    };
    recent.remember(columns, &outcome);
}

fn main() {
    // Memory first, before the timing input exists: batches generated one at a time.
    let before = rss_mib();
    let full = RecentlyStored::new(VOTES_REMEMBERED);
    for _ in 0..(2 * VOTES_REMEMBERED / BATCH) {
        let mut one = batches_of(1);
        remember(&full, one.remove(0));
    }
    let memory = rss_mib() - before;
    let moved = per_vote(|batch| {
        let (mut ids, mut elections, mut candidates, mut precincts, mut cast) =
            (vec![], vec![], vec![], vec![], vec![]);
        for v in batch {
            ids.push(v.vote_id);
            elections.push(v.election_id);
            candidates.push(v.candidate_id);
            precincts.push(v.precinct_id);
            cast.push(v.cast_at);
        }
        std::hint::black_box((ids, elections, candidates, precincts, cast));
    });
    let filled = per_vote(|batch| {
        std::hint::black_box(fill(batch));
    });
    let recent = RecentlyStored::new(VOTES_REMEMBERED);
    let remembered = per_vote(|batch| remember(&recent, batch));
    println!(
        "ns per vote: fields moved into columns {moved:.0}, batch filled with the in-batch \
         dedupe {filled:.0}, filled and remembered {remembered:.0}; memory of \
         {VOTES_REMEMBERED} votes: {memory:.1} MiB resident"
    );
    drop(full);
}
