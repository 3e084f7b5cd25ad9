//! Judging duplicates from memory against the real database: a copy of a vote this
//! process stored is a duplicate without a judging statement; a conflict, a vote another
//! process stored and a vote missing from the database are still the database's to decide.

use std::time::Duration;

use secrecy::ExposeSecret as _;

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

/// The race a replica's commit pipeline runs: a batch committed, and the next batch's
/// write (which waited for that COMMIT) comes back before the first is remembered. The
/// copy then waits for the first batch to be remembered instead of being judged by
/// statement.
#[tokio::test]
async fn a_copy_of_a_vote_committed_but_not_yet_remembered_is_judged_from_memory()
-> anyhow::Result<()> {
    let (_bed, url, pool) = migrated_bed_with_one_session().await?;
    let recent = std::sync::Arc::new(RecentlyStored::new(100));
    let limit = Duration::from_secs(10);
    let original = votes::vote("e", "a");
    let first = columns(&[&original]);
    let written = db::write_batch_attempt(&pool, &url, &first, 0, limit, Some(&recent)).await;
    let committed = written.map_err(|f| f.error)?;
    assert_eq!(committed.counted, vec![0]);

    let copy = tokio::spawn({
        let (pool, url, recent) = (pool.clone(), url.clone(), recent.clone());
        async move {
            let batch = columns(&[&original]);
            let judged = db::write_batch_attempt(&pool, &url, &batch, 1, limit, Some(&recent));
            judged.await.map_err(|f| f.error)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    recent.remember(first, &committed);
    let judged = copy.await??;
    assert_eq!(judged.counted, Vec::<i32>::new());
    assert_eq!(
        judged.known_duplicates, 1,
        "judged from memory once the first batch was remembered"
    );
    Ok(())
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
    recent.remember(first, &outcome);

    // Stored by someone else (this process never remembered it).
    let theirs = votes::vote("e", "c");
    db::write_batch(&pool, &url, &columns(&[&theirs]), 1).await?;
    // Remembered, but not in the database (as after a restore from an older backup).
    let lost = votes::vote("e", "a");
    let lost_outcome = db::BatchOutcome {
        counted: vec![0],
        ..outcome.clone()
    };
    recent.remember(columns(&[&lost]), &lost_outcome);

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

/// A database made from a copy of another (`CREATE DATABASE … TEMPLATE`, as when a
/// restored copy is swapped in under the old name) has the same `votes` table OID on the
/// same server run: memory filled from the original is not used for the copy, so a copy
/// of a remembered vote whose UUID the copy stored with another payload is a conflict.
#[tokio::test]
async fn memory_of_one_database_is_not_used_for_a_copy_of_it() -> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let servers = infra::shared().await?;
    let copy_url = secrecy::SecretString::from(servers.copy_database(&bed.database_url).await?);
    let copy_pool = db::pool(&copy_url, 1, &Default::default());
    let checked = async {
        let limit = Duration::from_secs(10);
        let recent = RecentlyStored::new(100);
        let ours = votes::vote("e", "a");
        let stored =
            db::write_batch_attempt(&pool, &url, &columns(&[&ours]), 0, limit, Some(&recent))
                .await
                .map_err(|f| f.error)?;
        recent.remember(columns(&[&ours]), &stored);

        let mut other = ours.clone();
        other.candidate_id = "b".into();
        db::write_batch(&copy_pool, &copy_url, &columns(&[&other]), 0).await?;
        let copy = columns(&[&ours]);
        let judged = db::write_batch_attempt(&copy_pool, &copy_url, &copy, 1, limit, Some(&recent))
            .await
            .map_err(|f| f.error)?;
        assert_ne!(
            judged.store, stored.store,
            "another database, another identity"
        );
        assert_eq!(
            (judged.conflicting, judged.known_duplicates),
            (vec![0], 0),
            "the copy's own payload of the UUID decides: a conflict"
        );
        anyhow::Ok(())
    }
    .await;
    drop(copy_pool);
    servers.drop_database(copy_url.expose_secret()).await?;
    checked
}

/// A replica remembers what it commits: copies of its own votes, published again, are
/// duplicates judged from memory (and counted as such), while a conflicting copy is still
/// recorded by the database.
#[tokio::test]
async fn a_replica_judges_republished_copies_of_its_own_votes_from_memory() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.batch_size = 50;
    config.prefetch_count = 100;
    let replica = Replica::start(config).await?;
    let publisher = eventually_publisher(&bed).await?;
    let originals = votes::spread(120, &["e"], &["a", "b"]);
    publisher.publish_votes(&originals).await?;
    wait_stored(&bed, originals.len() as i64).await?;

    let conflict = votes::conflicting(&originals[7], "z");
    publisher.publish_votes(&originals).await?;
    publisher
        .publish_votes(std::slice::from_ref(&conflict))
        .await?;
    let m = replica.running.metrics().clone();
    let duplicates = || {
        ["true", "false"]
            .iter()
            .map(|f| m.votes_duplicate.with_label_values(&[f]).get())
            .sum::<u64>()
    };
    eventually("every copy judged", WAIT, async || {
        Ok(duplicates() == originals.len() as u64 && m.votes_conflicting.get() == 1)
    })
    .await?;
    assert_eq!(
        m.votes_duplicate_from_memory.get(),
        originals.len() as u64,
        "all 120 copies are of votes it stored, within its memory of 8 × 50 votes"
    );
    assert_eq!(m.votes_counted.get(), originals.len() as u64);
    let mut db = bed.db().await?;
    assert_eq!(db.conflicting_ids().await?, vec![conflict.vote_id]);
    assert_eq!(db.tallies().await?, expected(&originals));
    replica.stop().await
}
