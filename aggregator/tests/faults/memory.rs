//! What a replica remembers of the votes it stored is forgotten when the database it
//! stored them in is no longer the one it writes to (here: a restarted server that lost
//! a committed vote, as after a restore from an older backup or a failover to a standby
//! that was behind): a copy of the remembered vote is judged by the database again, so
//! another payload stored since is seen as a conflict, not a duplicate.

use std::time::Duration;

use vote_aggregator::db::{self, BatchColumns, RecentlyStored};
use vote_testkit::infra::{self, InfraOptions};
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

fn one_row(vote: &vote_aggregator::vote::Vote) -> BatchColumns {
    let mut columns = BatchColumns::default();
    columns.push(vote, true);
    columns
}

#[tokio::test]
async fn a_remembered_vote_the_database_lost_is_judged_by_the_database_again() -> anyhow::Result<()>
{
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    let url = secrecy::SecretString::from(bed.database_url.clone());
    db::run_migrations(&url).await?;
    let limit = Duration::from_secs(10);
    let recent = RecentlyStored::new(100);

    let ours = votes::vote("e", "a");
    let pool = db::pool(&url, 1, &Default::default());
    let outcome = db::write_batch_attempt(&pool, &url, &one_row(&ours), 0, limit, Some(&recent))
        .await
        .map_err(|f| f.error)?;
    assert_eq!(outcome.counted, vec![0]);
    recent.remember(one_row(&ours), &outcome);
    drop(pool);

    // The server comes back without our committed vote (a trigger keeps `votes`
    // append-only; the superuser lifts it to stand in for an older backup), and another
    // payload of its UUID is stored.
    servers.restart_postgres().await?;
    let mut admin = bed.db().await?;
    admin
        .batch_execute(&format!(
            "ALTER TABLE votes DISABLE TRIGGER USER; \
             DELETE FROM votes WHERE vote_id = '{}'; \
             ALTER TABLE votes ENABLE TRIGGER USER;",
            ours.vote_id
        ))
        .await?;
    let mut other = ours.clone();
    other.candidate_id = "b".into();
    let pool = db::pool(&url, 1, &Default::default());
    assert_eq!(
        db::write_batch(&pool, &url, &one_row(&other), 1)
            .await?
            .counted,
        vec![0]
    );

    let copy = db::write_batch_attempt(&pool, &url, &one_row(&ours), 2, limit, Some(&recent))
        .await
        .map_err(|f| f.error)?;
    assert_eq!(
        (copy.conflicting, copy.known_duplicates),
        (vec![0], 0),
        "the copy of the lost vote conflicts with the payload stored since"
    );
    assert_eq!(admin.conflicting_ids().await?, vec![ours.vote_id]);
    Ok(())
}
