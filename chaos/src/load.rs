//! The scenario workload: a seeded stream of votes (with exact duplicates, late duplicates,
//! conflicting copies and ~1 % malformed bodies) in publish order, for the steady-rate
//! publisher of the test kit ([`vote_testkit::publish::SteadyLoad`]) to send for as long
//! as the faults last.

use std::collections::HashMap;

use vote_testkit::workload::{Message, Workload, WorkloadSpec};

/// The workload of a run under faults: enough votes for about `messages` messages, with
/// 15 % duplicates (40 % of them late), 10 % of those conflicting copies and 1 % malformed
/// bodies, over 2 elections × 5 candidates × 20 precincts.
pub fn steady_workload(messages: f64, seed: u64) -> WorkloadSpec {
    let (duplicates, malformed) = (0.15, 0.01);
    WorkloadSpec {
        votes: (messages / (1.0 + duplicates + malformed)).ceil() as usize,
        elections: 2,
        candidates: 5,
        precincts: 20,
        duplicates,
        conflict_share: 0.1,
        late_share: 0.4,
        malformed,
        seed,
    }
}

/// The message stream of a scenario: `votes` originals and everything derived from them,
/// in publish order. Late duplicates are woven in `late_lag` messages after their
/// original (so they usually arrive after it committed, possibly on another replica).
pub fn message_stream(spec: &WorkloadSpec, late_lag: usize) -> Vec<Message> {
    let workload = Workload::generate(spec);
    let position: HashMap<uuid::Uuid, usize> = workload
        .main
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m {
            Message::Original(v) => Some((v.vote_id, i)),
            _ => None,
        })
        .collect();
    let mut keyed: Vec<(usize, usize, Message)> = workload
        .main
        .into_iter()
        .enumerate()
        .map(|(i, m)| (i, 0, m))
        .collect();
    for m in workload.late {
        let at = match &m {
            Message::Duplicate(v) => position.get(&v.vote_id).copied().unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        keyed.push((at.saturating_add(late_lag), 1, m));
    }
    keyed.sort_by_key(|(at, order, _)| (*at, *order));
    keyed.into_iter().map(|(_, _, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_duplicates_follow_their_original_and_nothing_is_lost() {
        let spec = WorkloadSpec {
            votes: 2_000,
            duplicates: 0.2,
            late_share: 0.5,
            malformed: 0.01,
            seed: 7,
            ..WorkloadSpec::default()
        };
        let workload = Workload::generate(&spec);
        let stream = message_stream(&spec, 100);
        assert_eq!(stream.len(), workload.main.len() + workload.late.len());
        let mut first_seen = HashMap::new();
        for (i, m) in stream.iter().enumerate() {
            match m {
                Message::Original(v) => {
                    first_seen.insert(v.vote_id, i);
                }
                Message::Duplicate(v) => {
                    assert!(
                        first_seen.contains_key(&v.vote_id),
                        "duplicate before original"
                    );
                }
                _ => {}
            }
        }
        assert_eq!(stream, message_stream(&spec, 100), "seeded");
    }
}
