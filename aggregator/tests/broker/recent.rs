//! Judging duplicates from memory against the real database: a copy of a vote this
//! process stored is a duplicate without a judging statement; a conflict, a vote another
//! process stored and a vote missing from the database are still the database's to decide.

use std::time::Duration;

use vote_aggregator::db::RecentlyStored;

use super::hardening::migrated_bed_with_one_session;
use super::*;

fn columns(votes: &[&Vote]) -> BatchColumns {
    let mut c = BatchColumns::default();
    for v in votes {
        c.push(v, true);
    }
    c
}

#[tokio::test]
async fn copies_of_votes_this_process_stored_are_duplicates_without_asking_and_the_rest_is_asked()
-> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let recent = RecentlyStored::new(100);
    let limit = Duration::from_secs(10);
    let ours = [
        votes::vote("e", "a"),
        votes::vote("e", "b"),
        votes::vote("e", "a"),
    ];
    let first = columns(&[&ours[0], &ours[1], &ours[2]]);
    let outcome = db::write_batch_attempt(&pool, &url, &first, 0, limit, Some(&recent)).await;
    let outcome = outcome.map_err(|f| f.error)?;
    assert_eq!(outcome.counted, vec![0, 1, 2]);
    recent.remember(first, &outcome.counted);

    // Stored by someone else (this process never remembered it).
    let theirs = votes::vote("e", "c");
    db::write_batch(&pool, &url, &columns(&[&theirs]), 1).await?;
    // Remembered, but not in the database (as after a restore from an older backup).
    let lost = votes::vote("e", "a");
    recent.remember(columns(&[&lost]), &[0]);

    let mut conflict = ours[1].clone();
    conflict.candidate_id = "z".into();
    let fresh = votes::vote("e", "b");
    let later = columns(&[&ours[0], &conflict, &theirs, &lost, &fresh, &ours[2]]);
    let outcome = db::write_batch_attempt(&pool, &url, &later, 2, limit, Some(&recent)).await;
    let outcome = outcome.map_err(|f| f.error)?;
    assert_eq!(
        outcome.counted,
        vec![3, 4],
        "the vote memory wrongly believed stored is inserted, and so is the new one"
    );
    assert_eq!(
        outcome.conflicting,
        vec![1],
        "the other payload is a conflict"
    );
    assert_eq!(
        outcome.known_duplicates, 2,
        "the two copies of our own votes are judged from memory; the copy of theirs is not"
    );

    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 6);
    assert_eq!(db.conflicting_ids().await?, vec![ours[1].vote_id]);
    let report = db::verify(&url).await?;
    assert_eq!((report.votes, report.tallied), (6, 6), "{report:?}");
    assert!(report.drift.is_empty(), "{report:?}");
    Ok(())
}
