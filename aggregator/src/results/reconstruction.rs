//! A consumer's own tallies rebuilt from the results stream: a starting snapshot of
//! `vote_statistics` plus every event its snapshot does not hold, each event once.
//!
//! Correct whatever the order and the repeats: increments commute, a repeated event id
//! is dropped, and an event is either in the snapshot (its transaction is one the
//! [`Snapshot`] sees: skipped) or not (applied). For a live comparison
//! ([`Reconstruction::tallies_as_of`]) it keeps each applied event's transaction id.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::{Event, Snapshot};

/// Votes per (election, candidate).
pub type Tallies = BTreeMap<(String, String), i64>;

/// What [`Reconstruction::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Its increments were added.
    New,
    /// Its id was seen before: dropped.
    Repeat,
    /// The starting snapshot already holds it: dropped.
    InSnapshot,
}

/// Tallies rebuilt from a snapshot and the events after it.
#[derive(Debug, Clone, Default)]
pub struct Reconstruction {
    start: Snapshot,
    base: Tallies,
    seen: HashSet<uuid::Uuid>,
    /// (xid, election, increments) of every applied event.
    applied: Vec<(u64, String, BTreeMap<String, i64>)>,
    /// Distinct events received (applied or in the snapshot).
    pub events: u64,
    /// Repeated deliveries dropped by event id.
    pub repeats: u64,
    /// Events the starting snapshot already held.
    pub in_snapshot: u64,
}

impl Reconstruction {
    /// Starts from `base` (`vote_statistics` read in the same transaction as `start`).
    pub fn new(start: Snapshot, base: Tallies) -> Self {
        Reconstruction {
            start,
            base,
            ..Reconstruction::default()
        }
    }

    /// Takes one event into account (at most once per event id).
    pub fn apply(&mut self, event: Event) -> Applied {
        if !self.seen.insert(event.event_id) {
            self.repeats += 1;
            return Applied::Repeat;
        }
        self.events += 1;
        if self.start.sees(event.xid) {
            self.in_snapshot += 1;
            return Applied::InSnapshot;
        }
        self.applied
            .push((event.xid, event.election_id, event.increments));
        Applied::New
    }

    /// The tallies from every event received.
    pub fn tallies(&self) -> Tallies {
        self.sum(|_| true)
    }

    /// The tallies as a later snapshot `at` shows them: the events its transactions
    /// committed, none after. Equal to `vote_statistics` read with `at` once every event
    /// `at` sees has been received.
    pub fn tallies_as_of(&self, at: &Snapshot) -> Tallies {
        self.sum(|xid| at.sees(xid))
    }

    fn sum(&self, keep: impl Fn(u64) -> bool) -> Tallies {
        let mut out = self.base.clone();
        for (xid, election, increments) in &self.applied {
            if !keep(*xid) {
                continue;
            }
            for (candidate, n) in increments {
                *out.entry((election.clone(), candidate.clone()))
                    .or_insert(0) += n;
            }
        }
        out.retain(|_, n| *n != 0);
        out
    }
}

/// The first (election, candidate) whose reconstructed tally differs from the
/// database's, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Election.
    pub election_id: String,
    /// Candidate.
    pub candidate_id: String,
    /// Rebuilt from the stream.
    pub reconstructed: i64,
    /// In `vote_statistics`.
    pub database: i64,
}

impl Difference {
    /// The first difference between `reconstructed` and `database`, if any.
    pub fn first(reconstructed: &Tallies, database: &Tallies) -> Option<Difference> {
        let keys: std::collections::BTreeSet<_> =
            reconstructed.keys().chain(database.keys()).collect();
        keys.into_iter().find_map(|key| {
            let r = reconstructed.get(key).copied().unwrap_or(0);
            let d = database.get(key).copied().unwrap_or(0);
            (r != d).then(|| Difference {
                election_id: key.0.clone(),
                candidate_id: key.1.clone(),
                reconstructed: r,
                database: d,
            })
        })
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: reconstructed {} vs vote_statistics {}",
            self.election_id, self.candidate_id, self.reconstructed, self.database
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u128, xid: u64, pairs: &[(&str, i64)]) -> Event {
        Event::new(
            uuid::Uuid::from_u128(id),
            "e".into(),
            pairs.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
            xid,
            chrono::DateTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn repeats_and_snapshot_events_are_dropped_and_order_does_not_matter() {
        let start: Snapshot = "100:103:101".parse().expect("snapshot");
        let base = Tallies::from([(("e".into(), "a".into()), 10)]);
        let mut r = Reconstruction::new(start, base);
        // xid 99 and 102 are in the snapshot; 101 was running; 104 came after.
        assert_eq!(r.apply(event(4, 104, &[("b", 2)])), Applied::New);
        assert_eq!(r.apply(event(1, 99, &[("a", 4)])), Applied::InSnapshot);
        assert_eq!(r.apply(event(2, 101, &[("a", 1), ("b", 1)])), Applied::New);
        assert_eq!(r.apply(event(4, 104, &[("b", 2)])), Applied::Repeat);
        assert_eq!(r.apply(event(3, 102, &[("a", 5)])), Applied::InSnapshot);
        assert_eq!((r.events, r.repeats, r.in_snapshot), (4, 1, 2));
        let all = r.tallies();
        assert_eq!(all[&("e".into(), "a".into())], 11);
        assert_eq!(all[&("e".into(), "b".into())], 3);
        // As of a snapshot that saw 101 but not 104 yet.
        let later: Snapshot = "102:104:".parse().expect("snapshot");
        let then = r.tallies_as_of(&later);
        assert_eq!(then[&("e".into(), "b".into())], 1);
        let d = Difference::first(&then, &all).expect("differs");
        assert_eq!(d.to_string(), "e/b: reconstructed 1 vs vote_statistics 3");
        assert_eq!(Difference::first(&all, &all), None);
    }
}
