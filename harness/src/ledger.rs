//! The ledger: what a publisher got CONFIRMED by the broker, which is what the checker
//! holds the system to. A vote that was never confirmed may be absent; a confirmed one
//! must be counted exactly once.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::workload::Message;

/// A confirmed original vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerVote {
    /// Its id.
    pub vote_id: Uuid,
    /// Election.
    pub election_id: String,
    /// Candidate it must be counted for.
    pub candidate_id: String,
}

/// Everything confirmed during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Queue published to.
    pub queue: String,
    /// Seed of the workload.
    pub seed: u64,
    /// Confirmed originals (each must be counted exactly once).
    pub votes: Vec<LedgerVote>,
    /// Confirmed exact duplicates (must not be counted again).
    pub duplicates_sent: u64,
    /// Confirmed conflicting copies: same id as a vote, another candidate. Whichever of
    /// the two payloads commits first is counted (a second replica may well commit the
    /// copy first); the other must be recorded in `vote_conflicts`.
    pub conflicts: Vec<LedgerVote>,
    /// Confirmed malformed messages (each must be dead-lettered).
    pub malformed: u64,
    /// Publishes retried because their confirm did not arrive (each may have created a
    /// duplicate the system must absorb).
    pub retried: u64,
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

    /// Records a confirmed message.
    pub fn record(&mut self, message: &Message) {
        match message {
            Message::Original(v) => self.votes.push(LedgerVote {
                vote_id: v.vote_id,
                election_id: v.election_id.clone(),
                candidate_id: v.candidate_id.clone(),
            }),
            Message::Duplicate(_) => self.duplicates_sent += 1,
            Message::Conflict(v) => self.conflicts.push(LedgerVote {
                vote_id: v.vote_id,
                election_id: v.election_id.clone(),
                candidate_id: v.candidate_id.clone(),
            }),
            Message::Malformed(_) => self.malformed += 1,
        }
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

    /// Reads a ledger written by [`Ledger::save`].
    ///
    /// # Errors
    /// When the file is missing or not a ledger.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot read ledger {}", path.display()))?;
        serde_json::from_reader(std::io::BufReader::new(file))
            .with_context(|| format!("{} is not a ledger written by vote-harness", path.display()))
    }
}
