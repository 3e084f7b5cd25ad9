//! Seeded workloads: what a publisher sends, decided up front so a run can be replayed.
//!
//! A workload is `n` original votes over elections × candidates × precincts (candidates
//! skewed like a real race: candidate `k` gets weight `1/(k+1)`), plus:
//! - exact duplicates of a share of the votes, some sent right after the original
//!   ("immediate"), some after everything else ("late", when the original has long
//!   committed);
//! - conflicting copies: same UUID, another candidate (recorded, never counted);
//! - malformed bodies of every kind the decoder refuses.
//!
//! The same seed gives the same votes (ids included): UUIDv7 ids are built from a fixed
//! timestamp base and seeded random bits.

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use rand::distr::weighted::WeightedIndex;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;
use vote_aggregator::vote::Vote;

/// What to generate.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Original (distinct) votes.
    pub votes: usize,
    /// Elections the votes are spread over.
    pub elections: usize,
    /// Candidates per election.
    pub candidates: usize,
    /// Precincts per election.
    pub precincts: usize,
    /// Share of votes republished (0..=1).
    pub duplicates: f64,
    /// Share of the republished votes sent with another candidate (a conflict).
    pub conflict_share: f64,
    /// Share of the exact duplicates held back until after all originals.
    pub late_share: f64,
    /// Malformed messages, as a share of `votes` (0..=1).
    pub malformed: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            votes: 10,
            elections: 1,
            candidates: 4,
            precincts: 10,
            duplicates: 0.0,
            conflict_share: 0.1,
            late_share: 0.5,
            malformed: 0.0,
            seed: 1,
        }
    }
}

impl WorkloadSpec {
    /// Checks the knobs, with one clear line per mistake.
    ///
    /// # Errors
    /// When a count is zero or a fraction is outside 0..=1.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("--duplicates", self.duplicates),
            ("--conflict-share", self.conflict_share),
            ("--late-share", self.late_share),
            ("--malformed", self.malformed),
        ] {
            if !(0.0..=1.0).contains(&v) || v.is_nan() {
                anyhow::bail!("{name} must be a fraction from 0 to 1, got {v}");
            }
        }
        for (name, v) in [
            ("--elections", self.elections),
            ("--candidates", self.candidates),
            ("--precincts", self.precincts),
        ] {
            if v == 0 || v > 10_000 {
                anyhow::bail!("{name} must be from 1 to 10000, got {v}");
            }
        }
        Ok(())
    }
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A vote, first time.
    Original(Vote),
    /// The same vote again (same payload).
    Duplicate(Vote),
    /// Same UUID as a vote, another payload.
    Conflict(Vote),
    /// A body the aggregator must dead-letter.
    Malformed(Vec<u8>),
}

/// A generated workload: messages in publish order, split in two phases.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Sent first: originals with immediate duplicates, conflicts and malformed bodies
    /// interleaved.
    pub main: Vec<Message>,
    /// Sent after `main` has been counted: late duplicates.
    pub late: Vec<Message>,
}

impl Workload {
    /// Generates the workload of `spec`.
    pub fn generate(spec: &WorkloadSpec) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let weights: Vec<f64> = (0..spec.candidates)
            .map(|k| 1.0 / (k as f64 + 1.0))
            .collect();
        // Weights are positive and finite, so the index always builds.
        let pick_candidate = WeightedIndex::new(&weights).ok();
        let base: DateTime<Utc> = Utc
            .timestamp_opt(1_790_000_000 + (spec.seed % 1_000_000) as i64, 0)
            .single()
            .unwrap_or_else(Utc::now);
        let mut main = Vec::with_capacity(spec.votes * 2);
        let mut late = Vec::new();
        let malformed_total = (spec.votes as f64 * spec.malformed).round() as usize;
        let mut malformed_left = malformed_total;
        for i in 0..spec.votes {
            let election = format!("election-{}", rng.random_range(0..spec.elections));
            let candidate_idx = pick_candidate
                .as_ref()
                .map(|d| d.sample(&mut rng))
                .unwrap_or(0);
            let cast_at = (base + chrono::Duration::milliseconds(i as i64 * 7)).trunc_subsecs(6);
            let mut random = [0u8; 10];
            rng.fill(&mut random);
            let vote_id = uuid::Builder::from_unix_timestamp_millis(
                cast_at.timestamp_millis() as u64,
                &random,
            )
            .into_uuid();
            let vote = Vote {
                vote_id,
                election_id: election,
                candidate_id: format!("candidate-{candidate_idx}"),
                precinct_id: Some(format!("precinct-{}", rng.random_range(0..spec.precincts))),
                cast_at,
            };
            main.push(Message::Original(vote.clone()));
            if rng.random_bool(spec.duplicates) {
                if rng.random_bool(spec.conflict_share) {
                    let other = (candidate_idx + 1) % spec.candidates.max(2);
                    main.push(Message::Conflict(Vote {
                        candidate_id: format!("candidate-{other}"),
                        ..vote
                    }));
                } else if rng.random_bool(spec.late_share) {
                    late.push(Message::Duplicate(vote));
                } else {
                    main.push(Message::Duplicate(vote));
                }
            }
            if malformed_left > 0
                && (spec.votes - i) as f64 * rng.random::<f64>() < malformed_left as f64
            {
                main.push(Message::Malformed(malformed_body(&mut rng, malformed_left)));
                malformed_left -= 1;
            }
        }
        Workload { main, late }
    }

    /// Every message, main phase then late phase.
    pub fn all(&self) -> impl Iterator<Item = &Message> {
        self.main.iter().chain(self.late.iter())
    }
}

/// A malformed body, cycling through the kinds the decoder refuses. Each is unique (so
/// the checker can match dead letters to what was sent).
fn malformed_body(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    let id = Uuid::from_u128(rng.random());
    match n % 5 {
        0 => format!("{{not json {id}").into_bytes(),
        1 => format!(r#"{{"vote_id":"{id}","election_id":"e","cast_at":"2026-11-03T10:00:00Z"}}"#)
            .into_bytes(),
        2 => format!(
            r#"{{"vote_id":"not-a-uuid-{id}","election_id":"e","candidate_id":"c","cast_at":"2026-11-03T10:00:00Z"}}"#
        )
        .into_bytes(),
        3 => {
            let mut b = format!(r#"{{"pad":"{id}","x":""#).into_bytes();
            b.resize(5000, b'x');
            b
        }
        _ => {
            let mut b = vec![0xff, 0xfe];
            b.extend_from_slice(id.as_bytes());
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload_and_shares_are_respected() {
        let spec = WorkloadSpec {
            votes: 10_000,
            duplicates: 0.2,
            conflict_share: 0.25,
            malformed: 0.01,
            seed: 42,
            ..WorkloadSpec::default()
        };
        let a = Workload::generate(&spec);
        let b = Workload::generate(&spec);
        assert_eq!(a.main, b.main);
        let count = |f: fn(&Message) -> bool| a.all().filter(|m| f(m)).count();
        assert_eq!(count(|m| matches!(m, Message::Original(_))), 10_000);
        assert_eq!(count(|m| matches!(m, Message::Malformed(_))), 100);
        let dups = count(|m| matches!(m, Message::Duplicate(_)));
        let conflicts = count(|m| matches!(m, Message::Conflict(_)));
        assert!(
            (1_700..2_300).contains(&(dups + conflicts)),
            "{dups}+{conflicts}"
        );
        assert!((300..700).contains(&conflicts), "{conflicts}");
        assert!(!a.late.is_empty());
        for m in a.all() {
            if let Message::Malformed(body) = m {
                assert!(vote_aggregator::vote::decode(body).is_err());
            }
        }
    }

    #[test]
    fn candidates_are_skewed() {
        let w = Workload::generate(&WorkloadSpec {
            votes: 5_000,
            candidates: 4,
            ..WorkloadSpec::default()
        });
        let first = w
            .all()
            .filter(|m| matches!(m, Message::Original(v) if v.candidate_id == "candidate-0"))
            .count();
        let last = w
            .all()
            .filter(|m| matches!(m, Message::Original(v) if v.candidate_id == "candidate-3"))
            .count();
        assert!(first > 3 * last, "{first} vs {last}");
    }

    #[test]
    fn bad_knobs_are_refused_by_name() {
        let spec = WorkloadSpec {
            duplicates: 1.5,
            ..WorkloadSpec::default()
        };
        assert_eq!(
            spec.validate().expect_err("invalid").to_string(),
            "--duplicates must be a fraction from 0 to 1, got 1.5"
        );
    }
}
