//! `vote-tools results --check` as a user runs it: the real binary follows the results
//! stream while a replica counts votes, then compares its reconstruction with
//! `vote_statistics` (exit 0 and the "matches" line); without a mode it says what to do.

use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vote_aggregator::config::variables as var;
use vote_testkit::infra;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

const BIN: &str = env!("CARGO_BIN_EXE_vote-tools");

#[tokio::test]
async fn results_check_follows_the_stream_and_matches_the_statistics() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let stop = CancellationToken::new();
    let replica = vote_aggregator::spawn(bed.config("r1"), stop.clone()).await?;
    bed.declare().await?;
    vote_aggregator::db::run_migrations(&secrecy::SecretString::from(bed.database_url.clone()))
        .await?;
    // This test's elections only (the broker is shared): `<prefix>.e1`, read as `<prefix>.*`.
    let prefix = bed.queue.replace('.', "-");
    let election = format!("{prefix}.e1");
    let mut tool = tokio::process::Command::new(BIN)
        .args(["results", "--check", "--seconds", "6", "--name", &prefix])
        .args(["--elections", &format!("{prefix}.*")])
        .env(var::AMQP_URL, &bed.amqp_url)
        .env(var::DATABASE_URL, &bed.database_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Published while the tool follows: its snapshot holds none of them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = votes::spread(300, &[&election], &["a", "b", "c"]);
    bed.publisher().await?.publish_votes(&sent).await?;
    let out = tokio::time::timeout(Duration::from_secs(120), async {
        tool.wait().await?;
        let mut stdout = String::new();
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt as _;
        if let Some(mut s) = tool.stdout.take() {
            s.read_to_string(&mut stdout).await?;
        }
        if let Some(mut s) = tool.stderr.take() {
            s.read_to_string(&mut stderr).await?;
        }
        anyhow::Ok((tool.wait().await?, stdout, stderr))
    })
    .await??;
    let (status, stdout, stderr) = out;
    eprintln!("{stdout}{stderr}");
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("reconstruction matches vote_statistics (3 candidates)"),
        "{stdout}"
    );
    assert!(!stdout.contains("results: 0 events"), "{stdout}");
    stop.cancel();
    replica.join().await?;

    // No mode: one line saying what to do.
    let bare = std::process::Command::new(BIN)
        .args(["results"])
        .env(var::AMQP_URL, &bed.amqp_url)
        .env(var::DATABASE_URL, &bed.database_url)
        .output()?;
    let line = String::from_utf8_lossy(&bare.stderr);
    assert!(
        !bare.status.success() && line.contains("--follow"),
        "{line}"
    );
    bed.finish().await
}
