//! The exactly-once checker: holds the system to the publisher's [`Ledger`] (what was
//! attempted and what was confirmed), after the queue has drained.
//!
//! It checks the service's four invariants:
//! 1. per (election, candidate): sum of tally shards = rows in `votes` (tally drift 0);
//! 2. every confirmed vote is in `votes` exactly once, for the candidate it was published
//!    with (lost 0, double-counted 0), and nothing is counted that was never published;
//! 3. every confirmed malformed message is in the dead-letter queue;
//! 4. every confirmed conflicting copy is recorded in `vote_conflicts` and not counted.
//!
//! Like Jepsen's set-full checker it classifies every vote id:
//!
//! | ledger | in `votes` | class | verdict |
//! | --- | --- | --- | --- |
//! | confirmed | once, its candidate | ok (`counted`) | pass |
//! | confirmed | absent | `lost` | violation |
//! | attempted, never confirmed | counted | `indeterminate_counted` | pass, reported |
//! | attempted, never confirmed | absent | `indeterminate_absent` | pass, reported |
//! | either | another candidate (not a copy's) | `miscounted` | violation |
//! | never attempted | counted | `unexpected` (a phantom) | violation |
//!
//! and double counting shows as tally increments beyond the stored rows (the primary key
//! keeps a row from being stored twice). It never reports success on an empty or partial
//! run: nothing published, or a queue that never drains, is a failure with its reason.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::inspect::{Broker, Db};
use crate::ledger::{Ledger, LedgerVote};

/// How long to wait for the queue to drain.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Give up waiting for the drain after this long (then fail).
    pub drain_timeout: Duration,
    /// The queue is "drained" once empty and the database unchanged for this long.
    pub settle: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            drain_timeout: Duration::from_secs(120),
            // Longer than the service's 5 s retry backoff cap: a replica may hold deliveries
            // unacked that long while it waits to retry a commit.
            settle: Duration::from_secs(6),
        }
    }
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Confirmed original votes.
    pub published: usize,
    /// Confirmed exact duplicates.
    pub duplicates_sent: u64,
    /// Confirmed votes found in `votes` with the right candidate (class "ok").
    pub counted: usize,
    /// Confirmed votes missing from `votes` (first few kept in `lost_ids`).
    pub lost: usize,
    /// Some lost ids.
    pub lost_ids: Vec<Uuid>,
    /// Votes (confirmed or not) stored under a candidate none of their payloads had.
    pub miscounted: usize,
    /// Some miscounted ids.
    pub miscounted_ids: Vec<Uuid>,
    /// Tally increments beyond the stored votes, summed over candidates.
    pub double_counted: i64,
    /// Rows in `votes` whose id was never attempted by the publisher: phantoms, counted
    /// votes nobody cast (a violation).
    pub unexpected: usize,
    /// Some unexpected ids.
    pub unexpected_ids: Vec<Uuid>,
    /// Distinct votes whose publish was attempted (confirmed or not).
    pub attempted: usize,
    /// Attempted votes whose original was never confirmed: each may or may not have
    /// reached the queue.
    pub indeterminate: usize,
    /// ... of which counted (acceptable).
    pub indeterminate_counted: usize,
    /// ... of which absent (acceptable).
    pub indeterminate_absent: usize,
    /// Confirmed conflicting copies that must be recorded (their original was confirmed,
    /// or the other payload was counted), by distinct vote id.
    pub conflicts_expected: usize,
    /// ... of which recorded in `vote_conflicts`.
    pub conflicts_recorded: usize,
    /// Confirmed malformed messages.
    pub malformed: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages the broker dead-lettered on its own (the unexplained queue): always a
    /// violation, they may be valid votes that were never counted.
    pub dead_lettered_unexplained: u64,
    /// Sum over candidates of |tally − counted|.
    pub tally_drift: i64,
    /// Candidates whose tally differs, first few: (election, candidate, tally, counted).
    pub drift_examples: Vec<(String, String, i64, i64)>,
    /// Why the run could not be judged (nothing published, never drained), if so.
    pub incomplete: Option<String>,
    /// Time from the start of the check until the queue drained.
    pub drain_time: Duration,
}

impl Report {
    /// Every violation, one line each (empty when the run passed).
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(why) = &self.incomplete {
            v.push(why.clone());
        }
        if self.lost > 0 {
            v.push(format!(
                "{} confirmed votes lost, e.g. {}",
                self.lost,
                ids(&self.lost_ids)
            ));
        }
        if self.miscounted > 0 {
            v.push(format!(
                "{} votes counted for the wrong candidate, e.g. {}",
                self.miscounted,
                ids(&self.miscounted_ids)
            ));
        }
        if self.double_counted > 0 {
            v.push(format!("{} votes double-counted", self.double_counted));
        }
        if self.unexpected > 0 {
            v.push(format!(
                "{} counted vote(s) never published (phantoms), e.g. {}",
                self.unexpected,
                ids(&self.unexpected_ids)
            ));
        }
        if self.tally_drift != 0 {
            let ex: Vec<String> = self
                .drift_examples
                .iter()
                .map(|(e, c, t, n)| format!("{e}/{c} tally {t} vs {n} votes"))
                .collect();
            v.push(format!(
                "tally drift {} ({})",
                self.tally_drift,
                ex.join(", ")
            ));
        }
        if self.conflicts_recorded < self.conflicts_expected {
            v.push(format!(
                "{} of {} conflicting copies not recorded in vote_conflicts",
                self.conflicts_expected - self.conflicts_recorded,
                self.conflicts_expected
            ));
        }
        if self.dead_lettered_unexplained > 0 {
            v.push(format!(
                "{} message(s) dead-lettered by the broker without a reason (may be uncounted votes)",
                self.dead_lettered_unexplained
            ));
        }
        if self.dead_lettered < self.malformed {
            v.push(format!(
                "{} of {} malformed messages missing from the dead-letter queue",
                self.malformed - self.dead_lettered,
                self.malformed
            ));
        }
        v
    }

    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    fn miscount(&mut self, id: Uuid) {
        self.miscounted += 1;
        if self.miscounted_ids.len() < 10 {
            self.miscounted_ids.push(id);
        }
    }
}

fn ids(ids: &[Uuid]) -> String {
    ids.iter()
        .take(5)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published {} (confirmed) · duplicates sent {} · counted {} · lost {} · double-counted {} · conflicts {}/{} · dead-lettered {}/{} (unexplained {}) · tally drift {} · attempted {} · indeterminate {} (counted {}, absent {}) · unexpected {}",
            self.published,
            self.duplicates_sent,
            self.counted,
            self.lost,
            self.double_counted,
            self.conflicts_recorded,
            self.conflicts_expected,
            self.dead_lettered,
            self.malformed,
            self.dead_lettered_unexplained,
            self.tally_drift,
            self.attempted,
            self.indeterminate,
            self.indeterminate_counted,
            self.indeterminate_absent,
            self.unexpected
        )
    }
}

#[derive(QueryableByName)]
struct StoredVote {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    vote_id: Uuid,
    #[diesel(sql_type = Text)]
    candidate_id: String,
}

/// Waits for the queue to drain, then checks the invariants against `ledger`.
///
/// # Errors
/// Only when the database or broker cannot be read; a violated invariant is a
/// [`Report`] that did not pass.
pub async fn check(
    ledger: &Ledger,
    database_url: &str,
    amqp_url: &str,
    options: &CheckOptions,
) -> anyhow::Result<Report> {
    let confirmed: HashSet<Uuid> = ledger.votes.iter().map(|v| v.vote_id).collect();
    let indeterminate: Vec<&LedgerVote> = ledger.indeterminate().collect();
    // Every id the publisher may have put in the queue (a confirmed vote was attempted,
    // whether or not its producer said so).
    let attempted: HashSet<Uuid> = ledger
        .attempted
        .iter()
        .chain(&ledger.conflicts_attempted)
        .chain(&ledger.conflicts)
        .map(|v| v.vote_id)
        .chain(confirmed.iter().copied())
        .collect();
    let mut report = Report {
        published: ledger.votes.len(),
        duplicates_sent: ledger.duplicates_sent,
        malformed: ledger.malformed,
        attempted: confirmed.len() + indeterminate.len(),
        indeterminate: indeterminate.len(),
        ..Report::default()
    };
    if ledger.votes.is_empty() {
        report.incomplete =
            Some("nothing was published (0 confirmed votes): nothing to check".into());
        return Ok(report);
    }
    let mut db = Db::connect(database_url).await?;
    let broker = Broker::connect(amqp_url).await?;
    let dlq = vote_aggregator::broker::dead_letter_queue(&ledger.queue);
    // Confirmed conflicting copies, by id (distinct ids: the drain waits for as many
    // recorded conflicts at most).
    let confirmed_conflicts: HashMap<Uuid, HashSet<&str>> = by_id(ledger.conflicts.iter());
    let awaited_conflicts = confirmed_conflicts
        .keys()
        .filter(|id| confirmed.contains(id))
        .count();

    // Drain: the queue is empty and the database stopped changing (or every confirmed
    // vote, conflict and dead letter is already there).
    let started = Instant::now();
    let mut last = (-1i64, -1i64);
    let mut stable_since = Instant::now();
    loop {
        let (ready, _) = broker.queue_state(&ledger.queue).await?;
        // Before the first replica has migrated, the tables do not exist yet: count 0.
        let now = (
            db.vote_count().await.unwrap_or(0),
            db.conflict_count().await.unwrap_or(0),
        );
        let (dead, _) = broker.queue_state(&dlq).await.unwrap_or((0, 0));
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        let complete = now.0 >= report.published as i64
            && now.1 >= awaited_conflicts as i64
            && u64::from(dead) >= ledger.malformed;
        if ready == 0 && (complete || stable_since.elapsed() >= options.settle) {
            // One more settle period when complete, to catch late double counting.
            if complete && stable_since.elapsed() < Duration::from_millis(500) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            break;
        }
        if started.elapsed() >= options.drain_timeout {
            report.incomplete = Some(format!(
                "queue '{}' did not drain within {:?} ({ready} messages still ready, {} votes stored)",
                ledger.queue, options.drain_timeout, now.0
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.drain_time = started.elapsed();
    let unexplained = vote_aggregator::broker::unexplained_queue(&ledger.queue);
    report.dead_lettered_unexplained =
        u64::from(broker.queue_state(&unexplained).await.unwrap_or((0, 0)).0);

    // 2. every vote id classified: confirmed ones exactly once, for their candidate (or,
    // for a vote with a conflicting copy, for whichever of the payloads committed first);
    // unconfirmed ones counted or not; nothing counted that was never attempted.
    let alternatives: HashMap<Uuid, HashSet<&str>> =
        by_id(ledger.conflicts_attempted.iter().chain(&ledger.conflicts));
    let stored: Vec<StoredVote> = diesel::sql_query("SELECT vote_id, candidate_id FROM votes")
        .load(db.connection())
        .await?;
    let stored: HashMap<Uuid, String> = stored
        .into_iter()
        .map(|s| (s.vote_id, s.candidate_id))
        .collect();
    let right_candidate = |v: &LedgerVote, c: &str| {
        c == v.candidate_id
            || alternatives
                .get(&v.vote_id)
                .is_some_and(|alt| alt.contains(c))
    };
    for v in &ledger.votes {
        match stored.get(&v.vote_id) {
            None => {
                report.lost += 1;
                if report.lost_ids.len() < 10 {
                    report.lost_ids.push(v.vote_id);
                }
            }
            Some(c) if !right_candidate(v, c) => report.miscount(v.vote_id),
            Some(_) => report.counted += 1,
        }
    }
    for v in &indeterminate {
        match stored.get(&v.vote_id) {
            None => report.indeterminate_absent += 1,
            Some(c) if !right_candidate(v, c) => report.miscount(v.vote_id),
            Some(_) => report.indeterminate_counted += 1,
        }
    }
    let mut phantoms: Vec<Uuid> = stored
        .keys()
        .filter(|id| !attempted.contains(id))
        .copied()
        .collect();
    phantoms.sort_unstable();
    report.unexpected = phantoms.len();
    report.unexpected_ids = phantoms.into_iter().take(10).collect();

    // 1. tally = count per candidate; tally beyond the count is double counting.
    let counted = db.counted_per_candidate().await?;
    let tallies = db.tallies().await?;
    let keys: std::collections::BTreeSet<_> = counted.keys().chain(tallies.keys()).collect();
    for key in keys {
        let n = counted.get(key).copied().unwrap_or(0);
        let t = tallies.get(key).copied().unwrap_or(0);
        if t != n {
            report.tally_drift += (t - n).abs();
            report.double_counted += (t - n).max(0);
            if report.drift_examples.len() < 5 {
                report
                    .drift_examples
                    .push((key.0.clone(), key.1.clone(), t, n));
            }
        }
    }

    // 4. conflicts recorded. A confirmed copy must have lost to the other payload (and
    // been recorded) when its original was confirmed too, or when the stored row shows
    // another payload; a copy of an unconfirmed original that never arrived is simply
    // the vote.
    let recorded: HashSet<Uuid> = db.conflicting_ids().await?.into_iter().collect();
    for (id, copies) in &confirmed_conflicts {
        let expected =
            confirmed.contains(id) || stored.get(id).is_some_and(|c| !copies.contains(c.as_str()));
        if expected {
            report.conflicts_expected += 1;
            if recorded.contains(id) {
                report.conflicts_recorded += 1;
            }
        }
    }

    // 3. dead letters (counted without consuming them).
    report.dead_lettered = u64::from(broker.queue_state(&dlq).await.map(|s| s.0).unwrap_or(0));
    Ok(report)
}

/// Candidates by vote id.
fn by_id<'a>(votes: impl Iterator<Item = &'a LedgerVote>) -> HashMap<Uuid, HashSet<&'a str>> {
    let mut out: HashMap<Uuid, HashSet<&str>> = HashMap::new();
    for v in votes {
        out.entry(v.vote_id)
            .or_default()
            .insert(v.candidate_id.as_str());
    }
    out
}
