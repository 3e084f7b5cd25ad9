//! The deployment test's backup-and-restore step: `make backup`, the database destroyed,
//! `make restore`, run through the same scripts (`deploy/backup.sh`, `deploy/restore.sh`)
//! on the test's stack. It owns the proof that a backup brings the counted votes back
//! exactly: `vote_statistics` identical byte for byte, `verify` clean, and the replicas
//! counting again afterwards.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;
use vote_testkit::publish::Publisher;
use vote_testkit::votes::vote;

use super::stack::Stack;
use super::steps::{READY_TIMEOUT, verify};

/// The statistics compared before and after, as an operator would print them.
const STATISTICS: &str = "SELECT * FROM vote_statistics ORDER BY election_id, candidate_id";
/// Votes published after the restore; each must be counted.
const AFTER_RESTORE: usize = 20;
/// How long those may take to be counted.
const COUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// Backup (with a stale older backup beside it that `BACKUP_KEEP=1` must remove), a
/// restore of a file that is no backup refused, drop the stack's database, restore, then: `verify` exits 0, `vote_statistics` is what it
/// was byte for byte, `replicas` replicas are ready and count `AFTER_RESTORE` new votes
/// published to `queue`. Backups go to `dir/backups`.
///
/// # Errors
/// When any of that does not happen.
pub async fn backup_and_restore(
    stack: &Stack,
    dir: &Path,
    replicas: usize,
    queue: &str,
) -> anyhow::Result<String> {
    let before = stack.psql(STATISTICS).await?;
    let file = backup(stack, &dir.join("backups")).await?;
    refuses_garbage(stack, dir, &before).await?;
    stack
        .compose(&[
            "exec",
            "-T",
            "postgres",
            "sh",
            "-c",
            "dropdb -U \"$POSTGRES_USER\" --force \"$POSTGRES_DB\"",
        ])
        .await?;
    match stack.psql(STATISTICS).await {
        Err(e) if format!("{e:#}").contains("does not exist") => {}
        other => bail!("the database still answers after dropdb: {other:?}"),
    }
    let file_arg = file.display().to_string();
    let restored = stack.script("restore.sh", &[&file_arg], &[]).await?;
    verify(stack).await?;
    let after = stack.psql(STATISTICS).await?;
    if after != before {
        bail!("vote_statistics differs after the restore:\nbefore:\n{before}\nafter:\n{after}");
    }
    stack.wait_ready(replicas, READY_TIMEOUT).await?;
    count_more(stack, queue).await?;
    Ok(format!(
        "backup {} ({} bytes, 0600; the stale one removed), a file that is no backup refused, \
         database dropped, restored: \
         verify exit 0, vote_statistics identical ({} bytes), {replicas} replicas ready and \
         counted {AFTER_RESTORE} new votes; {}",
        file.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::fs::metadata(&file)?.len(),
        before.len(),
        restored.lines().last().unwrap_or("").trim()
    ))
}

/// `deploy/backup.sh` with `BACKUP_KEEP=1` into `folder`, where an older backup of the
/// stack waits: afterwards the folder must hold exactly one new backup, mode 0600.
async fn backup(stack: &Stack, folder: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(folder)?;
    let stale = folder.join(format!("{}-votes-20000101T000000Z.dump", stack.project()));
    std::fs::write(&stale, b"an older backup")?;
    let folder_arg = folder.display().to_string();
    stack
        .script(
            "backup.sh",
            &[],
            &[("BACKUP_DIR", &folder_arg), ("BACKUP_KEEP", "1")],
        )
        .await?;
    let files = std::fs::read_dir(folder)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let [file] = &files[..] else {
        bail!("{folder_arg} holds {files:?}, not one backup (BACKUP_KEEP=1)");
    };
    if *file == stale {
        bail!("backup.sh kept the older backup and wrote none");
    }
    let mode = std::fs::metadata(file)?.permissions().mode() & 0o777;
    if mode != 0o600 {
        bail!("{} has mode {mode:o}, not 600", file.display());
    }
    Ok(file.clone())
}

/// `deploy/restore.sh` of a file that is no backup must fail with one line saying the
/// database is unchanged, and leave it so (`before` is its statistics).
async fn refuses_garbage(stack: &Stack, dir: &Path, before: &str) -> anyhow::Result<()> {
    let garbage = dir.join("not-a-backup.dump");
    std::fs::write(&garbage, b"not a dump")?;
    let garbage_arg = garbage.display().to_string();
    match stack.script("restore.sh", &[&garbage_arg], &[]).await {
        Ok(out) => bail!("restore.sh accepted a file that is no backup: {out}"),
        Err(e) if format!("{e:#}").contains("the database is unchanged") => {}
        Err(e) => bail!(
            "restore.sh refused a file that is no backup without saying the database is unchanged: {e:#}"
        ),
    }
    if stack.psql(STATISTICS).await? != before {
        bail!("vote_statistics changed after restore.sh refused a file that is no backup");
    }
    Ok(())
}

/// Publishes `AFTER_RESTORE` new votes and waits until `votes` holds that many more rows.
async fn count_more(stack: &Stack, queue: &str) -> anyhow::Result<()> {
    let count = async || -> anyhow::Result<usize> {
        let out = stack.psql("SELECT count(*) FROM votes").await?;
        out.trim()
            .parse()
            .with_context(|| format!("unexpected count {out:?}"))
    };
    let start = count().await?;
    let votes: Vec<_> = (0..AFTER_RESTORE)
        .map(|i| vote("after-restore", &format!("candidate-{}", i % 2)))
        .collect();
    let publisher = Publisher::connect(&stack.publisher_amqp_url()?, queue).await?;
    let published = publisher.publish_votes(&votes).await;
    publisher.close().await;
    published?;
    let started = Instant::now();
    loop {
        let now = count().await?;
        if now == start + AFTER_RESTORE {
            return Ok(());
        }
        if started.elapsed() > COUNT_TIMEOUT {
            bail!("after the restore, votes holds {now} rows: {start} + {AFTER_RESTORE} expected");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
