//! Making votes for tests and workloads.
//!
//! Ids are UUIDv7 (time-ordered, as a real publisher would mint them); `cast_at` is
//! truncated to microseconds, the precision PostgreSQL stores, so a vote read back
//! compares equal to the one published.

use chrono::{SubsecRound, Utc};
use uuid::Uuid;
use vote_aggregator::vote::Vote;

/// One valid vote for `candidate` in `election`, cast now, in precinct `p-1`.
pub fn vote(election: &str, candidate: &str) -> Vote {
    Vote {
        vote_id: Uuid::now_v7(),
        election_id: election.to_string(),
        candidate_id: candidate.to_string(),
        precinct_id: Some("p-1".to_string()),
        cast_at: Utc::now().trunc_subsecs(6),
    }
}

/// `n` votes spread round-robin over `elections` × `candidates` (deterministic
/// per-candidate counts: tests can compute the expected tally).
pub fn spread(n: usize, elections: &[&str], candidates: &[&str]) -> Vec<Vote> {
    let pairs: Vec<(&str, &str)> = elections
        .iter()
        .flat_map(|e| candidates.iter().map(move |c| (*e, *c)))
        .collect();
    (0..n)
        .map(|i| {
            let (e, c) = pairs[i % pairs.len()];
            vote(e, c)
        })
        .collect()
}

/// The same vote id with another candidate: a conflicting duplicate.
pub fn conflicting(original: &Vote, other_candidate: &str) -> Vote {
    Vote {
        candidate_id: other_candidate.to_string(),
        ..original.clone()
    }
}
