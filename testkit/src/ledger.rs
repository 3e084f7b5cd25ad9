//! The ledger: the history of one publisher run, in the style of Jepsen's set-full
//! checker. Every publish of a vote is recorded as ATTEMPTED before it is sent, and again
//! as CONFIRMED once the broker confirmed it. The checker holds the system to it:
//!
//! - a confirmed original must be counted exactly once (else: lost / double-counted);
//! - an attempted but unconfirmed one is indeterminate (the confirm timed out or the
//!   connection died: it may or may not be in the queue), so counted and absent are both
//!   acceptable;
//! - a counted vote that was never attempted is a phantom: a violation.
//!
//! Invariant: every confirmed message is also attempted ([`Ledger::record`] records the
//! attempt too, so a producer cannot forget it), and each vote id appears at most once in
//! [`Ledger::attempted`] however often its publish was retried.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vote_aggregator::vote::Vote;

use crate::workload::Message;

/// A vote as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerVote {
    /// Its id.
    pub vote_id: Uuid,
    /// Election.
    pub election_id: String,
    /// Candidate it must be counted for.
    pub candidate_id: String,
}

impl From<&Vote> for LedgerVote {
    fn from(v: &Vote) -> Self {
        LedgerVote {
            vote_id: v.vote_id,
            election_id: v.election_id.clone(),
            candidate_id: v.candidate_id.clone(),
        }
    }
}

/// Everything attempted and confirmed during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Queue published to.
    pub queue: String,
    /// Seed of the workload.
    pub seed: u64,
    /// Confirmed originals (each must be counted exactly once).
    pub votes: Vec<LedgerVote>,
    /// Every vote whose publish was attempted (as an original or an exact duplicate),
    /// confirmed or not, once per vote id, in order of first attempt. The ones missing from
    /// `votes` are indeterminate.
    #[serde(default)]
    pub attempted: Vec<LedgerVote>,
    /// Confirmed exact duplicates (must not be counted again).
    pub duplicates_sent: u64,
    /// Confirmed conflicting copies: same id as a vote, another candidate. Whichever of
    /// the two payloads commits first is counted (a second replica may well commit the
    /// copy first); the other must be recorded in `vote_conflicts`.
    pub conflicts: Vec<LedgerVote>,
    /// Conflicting copies whose publish was attempted, confirmed or not, once per
    /// (vote id, candidate).
    #[serde(default)]
    pub conflicts_attempted: Vec<LedgerVote>,
    /// Confirmed malformed messages (each must be dead-lettered).
    pub malformed: u64,
    /// Publishes retried because their confirm did not arrive (each may have created a
    /// duplicate the system must absorb).
    pub retried: u64,
    /// Ids in `attempted` (rebuilt on load).
    #[serde(skip)]
    attempted_ids: HashSet<Uuid>,
    /// (id, candidate) pairs in `conflicts_attempted` (rebuilt on load).
    #[serde(skip)]
    conflict_keys: HashSet<(Uuid, String)>,
}

impl Ledger {
    /// An empty ledger for `queue`.
    pub fn new(queue: &str, seed: u64) -> Self {
        Ledger {
            queue: queue.to_string(),
            seed,
            ..Ledger::default()
        }
    }

    /// Records that `message` is about to be published: call it BEFORE the publish is
    /// sent, so a vote that reaches the queue is always known to the ledger. Retries of
    /// the same message add nothing. Malformed bodies are not votes: nothing to record.
    pub fn attempt(&mut self, message: &Message) {
        match message {
            Message::Original(v) | Message::Duplicate(v) => {
                if self.attempted_ids.insert(v.vote_id) {
                    self.attempted.push(v.into());
                }
            }
            Message::Conflict(v) => {
                if self
                    .conflict_keys
                    .insert((v.vote_id, v.candidate_id.clone()))
                {
                    self.conflicts_attempted.push(v.into());
                }
            }
            Message::Malformed(_) => {}
        }
    }

    /// Records a CONFIRMED message (and its attempt, if not recorded yet).
    pub fn record(&mut self, message: &Message) {
        self.attempt(message);
        match message {
            Message::Original(v) => self.votes.push(v.into()),
            Message::Duplicate(_) => self.duplicates_sent += 1,
            Message::Conflict(v) => self.conflicts.push(v.into()),
            Message::Malformed(_) => self.malformed += 1,
        }
    }

    /// Attempted votes whose original was never confirmed: each may or may not have
    /// reached the queue.
    pub fn indeterminate(&self) -> impl Iterator<Item = &LedgerVote> {
        let confirmed: HashSet<Uuid> = self.votes.iter().map(|v| v.vote_id).collect();
        self.attempted
            .iter()
            .filter(move |v| !confirmed.contains(&v.vote_id))
    }

    /// Writes the ledger as JSON.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot write ledger {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), self)
            .with_context(|| format!("cannot write ledger {}", path.display()))
    }

    /// Reads a ledger written by [`Ledger::save`]. A ledger written before attempts were
    /// recorded counts its confirmed messages as its only attempts.
    ///
    /// # Errors
    /// When the file is missing or not a ledger.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot read ledger {}", path.display()))?;
        let mut ledger: Ledger = serde_json::from_reader(std::io::BufReader::new(file))
            .with_context(|| format!("{} is not a ledger written by vote-tools", path.display()))?;
        ledger.reindex();
        Ok(ledger)
    }

    /// Rebuilds the attempt indexes after deserialising, and makes every confirmed vote
    /// and conflicting copy an attempt too (the invariant of the module).
    fn reindex(&mut self) {
        self.attempted_ids = self.attempted.iter().map(|v| v.vote_id).collect();
        self.conflict_keys = self
            .conflicts_attempted
            .iter()
            .map(|v| (v.vote_id, v.candidate_id.clone()))
            .collect();
        for v in self.votes.clone() {
            if self.attempted_ids.insert(v.vote_id) {
                self.attempted.push(v);
            }
        }
        for c in self.conflicts.clone() {
            if self
                .conflict_keys
                .insert((c.vote_id, c.candidate_id.clone()))
            {
                self.conflicts_attempted.push(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Workload, WorkloadSpec};

    #[test]
    fn attempts_are_recorded_once_and_confirmed_ones_are_not_indeterminate() {
        let w = Workload::generate(&WorkloadSpec {
            votes: 3,
            duplicates: 0.0,
            ..WorkloadSpec::default()
        });
        let mut ledger = Ledger::new("q", 1);
        for m in &w.main {
            ledger.attempt(m);
            ledger.attempt(m);
        }
        ledger.record(&w.main[0]);
        assert_eq!(ledger.attempted.len(), 3);
        assert_eq!(ledger.votes.len(), 1);
        let open: Vec<Uuid> = ledger.indeterminate().map(|v| v.vote_id).collect();
        assert_eq!(open.len(), 2);
        assert!(!open.contains(&ledger.votes[0].vote_id));
    }

    #[test]
    fn a_saved_ledger_loads_equal_and_an_old_one_gets_its_attempts() {
        let w = Workload::generate(&WorkloadSpec {
            votes: 20,
            duplicates: 0.5,
            conflict_share: 0.5,
            ..WorkloadSpec::default()
        });
        let mut ledger = Ledger::new("q", 1);
        for m in w.all() {
            ledger.record(m);
        }
        let dir = std::env::temp_dir().join(format!("ledger-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ledger.json");
        ledger.save(&path).expect("save");
        assert_eq!(Ledger::load(&path).expect("load"), ledger);

        // Without the attempt fields (an older ledger): confirmed = attempted.
        let mut old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        if let Some(o) = old.as_object_mut() {
            o.remove("attempted");
            o.remove("conflicts_attempted");
        }
        std::fs::write(&path, old.to_string()).expect("write");
        let loaded = Ledger::load(&path).expect("load old");
        assert_eq!(loaded.attempted, ledger.attempted);
        assert_eq!(loaded.conflicts_attempted, ledger.conflicts_attempted);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
