//! The deployment test: the operator's checklist run against the real Docker Compose
//! stack (`docker-compose.yml`, through `deploy/compose.sh`) while a steady confirmed
//! publisher sends votes with duplicates and malformed messages:
//!
//! 1. `up -d`: the compose file's 3 replicas;
//! 2. `docker kill` one replica, compose starts it again; SIGKILL another's process,
//!    its restart policy brings it back;
//! 3. scale 3 → 5 → 2 → 3 (replicas scaled away exit 0);
//! 4. rolling upgrade to a second image (its migration first), one replica at a time,
//!    then the rollback the same way;
//! 5. the checklist's plain `docker run --env-file … -p … --restart unless-stopped`;
//! 6. restart RabbitMQ, then PostgreSQL;
//! 7. publish a while longer on the final 3 replicas, stop the publisher, let the queue
//!    drain; then the exactly-once checker, the dead letters, `SELECT * FROM
//!    vote_statistics` (adds up to the counted votes), `vote-aggregator verify`, and
//!    Prometheus: `up == 1` for every running replica and each counted votes;
//! 8. `make backup`, drop the database, `make restore`: `verify` exits 0,
//!    `vote_statistics` is identical byte for byte, and the replicas count again.
//!
//! A failed step stops the sequence (the rest is skipped, the publisher is still
//! stopped and checked); the stack's logs are saved under the output folder either way,
//! and the report names the step. The stack is torn down unless kept. The stack sees
//! only the settings the test gives it (an empty settings file, the compose file alone),
//! not a developer's `.env` or override file.

mod prometheus;
mod restore;
pub mod stack;
mod steps;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use vote_aggregator::config::DEFAULT_QUEUE_NAME;
use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::publish::{Published, SteadyLoad};

use crate::drain::{DRAIN_SETTLE, Endpoints, read_dead_letters, wait_drained};
use crate::load::{message_stream, steady_workload};
use crate::report::DeadLetters;
use prometheus::Seen;
use stack::Stack;

/// Replicas the stack runs between the steps (the compose file's default).
const REPLICAS: usize = 3;
/// Longest run the workload is generated for (the publisher stops earlier).
const MAX_PUBLISH: Duration = Duration::from_secs(1200);
/// Publishing on the final replicas before the publisher stops, so each counts votes.
const FINAL_PUBLISH: Duration = Duration::from_secs(20);

/// What the deployment test runs on.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// The repository (its `docker-compose.yml` and `deploy/`).
    pub repo: PathBuf,
    /// Where logs, secrets and the report go (e.g. `target/deploy`).
    pub out_dir: PathBuf,
    /// The aggregator image the stack starts with and rolls back to.
    pub image: String,
    /// Messages per second of the publisher.
    pub rate: f64,
    /// Seed of the workload.
    pub seed: u64,
    /// Leave the stack running at the end.
    pub keep: bool,
}

/// One step: its name, how long it took, and its evidence or why it failed.
#[derive(Debug, Clone)]
pub struct Step {
    /// Name, as the report and the failure message say it.
    pub name: String,
    /// How long it took.
    pub took: Duration,
    /// Evidence, or why it failed.
    pub outcome: Result<String, String>,
}

/// The deployment test's result.
#[derive(Debug)]
pub struct DeployReport {
    /// The stack's project name.
    pub project: String,
    /// Steps in order (stops at the first failure).
    pub steps: Vec<Step>,
    /// What the publisher did.
    pub published: Published,
    /// The exactly-once checker, when it ran.
    pub check: Option<checker::Report>,
    /// The dead letters, when read.
    pub dead_letters: Option<DeadLetters>,
    /// What Prometheus showed, when it was asked.
    pub seen: Option<Seen>,
    /// Problems outside the steps (publisher, drain, teardown).
    pub problems: Vec<String>,
    /// Where the logs are.
    pub dir: PathBuf,
    /// Whole run.
    pub took: Duration,
}

impl DeployReport {
    /// The first failed step, if any.
    pub fn failed_step(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.outcome.is_err())
    }

    /// Every reason the run failed (empty when it passed).
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(step) = self.failed_step() {
            v.push(format!(
                "step {} failed: {}",
                step.name,
                step.outcome.as_ref().err().map_or("", String::as_str)
            ));
        }
        match &self.check {
            Some(check) => v.extend(check.violations()),
            None => v.push("the exactly-once checker did not run".into()),
        }
        if let Some(dl) = &self.dead_letters {
            v.extend(dl.violations());
        }
        v.extend(self.problems.iter().cloned());
        v
    }

    /// Whether everything held.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    /// The one summary line.
    pub fn summary(&self) -> String {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let ok = self.steps.iter().filter(|s| s.outcome.is_ok()).count();
        let check = self.check.as_ref().map_or_else(
            || "checker did not run".to_owned(),
            |c| {
                format!(
                    "published {} (+{} duplicates, {} malformed) · counted {} · lost {} · double-counted {} · tally drift {}",
                    c.published,
                    c.duplicates_sent,
                    c.malformed,
                    c.counted,
                    c.lost,
                    c.double_counted,
                    c.tally_drift
                )
            },
        );
        let seen = self.seen.as_ref().map_or_else(
            || "prometheus not checked".to_owned(),
            |s| {
                format!(
                    "prometheus up {}/{} · counted by {}/{}",
                    s.up, s.replicas, s.counted, s.replicas
                )
            },
        );
        format!(
            "deploy-test {verdict} · {ok}/{} steps · {check} · {seen} · {:.0}s",
            self.steps.len(),
            self.took.as_secs_f64()
        )
    }
}

impl fmt::Display for DeployReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "=== deploy-test on compose project {} ===", self.project)?;
        for step in &self.steps {
            let (mark, text) = match &step.outcome {
                Ok(evidence) => ("ok  ", evidence.as_str()),
                Err(why) => ("FAIL", why.as_str()),
            };
            writeln!(
                f,
                "  {mark} {:<18} {:>6.1}s  {text}",
                step.name,
                step.took.as_secs_f64()
            )?;
        }
        if let Some(check) = &self.check {
            writeln!(f, "checker: {check}")?;
        }
        if let Some(dl) = &self.dead_letters {
            writeln!(
                f,
                "dead letters: {} ({} distinct) for {} confirmed malformed · missing {} · foreign {}",
                dl.total, dl.distinct, dl.malformed_confirmed, dl.missing, dl.foreign
            )?;
        }
        for v in self.violations() {
            writeln!(f, "VIOLATION: {v}")?;
        }
        writeln!(f, "logs: {}", self.dir.display())?;
        write!(f, "{}", self.summary())
    }
}

/// The image the rolling upgrade moves to: `image` with one more label, so it is a
/// different image (its own id), built locally in seconds.
///
/// # Errors
/// When `docker build` fails.
async fn next_image(image: &str, project: &str) -> anyhow::Result<String> {
    let next = format!("vote-aggregator-deploy-test:{project}-next");
    let dockerfile = format!("FROM {image}\nLABEL vote-aggregator.deploy-test=next\n");
    let mut child = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", &next, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run docker build")?;
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().context("no stdin for docker build")?;
        stdin.write_all(dockerfile.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "docker build of {next} from {image} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(next)
}

/// This process's compose project name: `vote-deploy-test-<pid>`.
pub fn project_name() -> String {
    format!("vote-deploy-test-{}", std::process::id())
}

/// Removes this process's stack (after an interrupted run), whatever state it is in.
///
/// # Errors
/// When compose fails.
pub async fn tear_down(opts: &DeployOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.out_dir)?;
    Stack::new(&opts.repo, &project_name(), &opts.out_dir, &opts.image)?
        .down()
        .await
}

/// Runs the deployment test (see the module docs).
///
/// # Errors
/// Only when the run could not start at all (output folder, ports); everything after
/// the stack is asked to start ends in the report.
pub async fn run(opts: &DeployOptions) -> anyhow::Result<DeployReport> {
    let started = Instant::now();
    let project = project_name();
    let dir = opts.out_dir.clone();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut stack = Stack::new(&opts.repo, &project, &dir, &opts.image)?;
    let mut run = Run {
        steps: Vec::new(),
        failed: false,
    };
    eprintln!(
        "deploy-test: compose project {project} · image {} · logs in {}",
        opts.image,
        dir.display()
    );

    run.step("up", async {
        stack.up_default().await?;
        let ready = stack.wait_ready(REPLICAS, steps::READY_TIMEOUT).await?;
        Ok(format!(
            "`up -d` started the compose file's {} replicas, all ready",
            ready.len()
        ))
    })
    .await;
    let endpoints = match (run.failed, stack.database_url(), stack.amqp_url()) {
        (true, _, _) => None,
        (false, Ok(database_url), Ok(amqp_url)) => Some(Endpoints {
            database_url,
            amqp_url,
            queue: DEFAULT_QUEUE_NAME.to_owned(),
        }),
        (false, Err(e), _) | (false, _, Err(e)) => {
            run.fail("secrets", format!("{e:#}"));
            None
        }
    };
    let load = match (&endpoints, stack.publisher_amqp_url()) {
        (Some(at), Ok(url)) => Some(start_load(&url, &at.queue, opts)),
        (Some(_), Err(e)) => {
            run.fail("secrets", format!("{e:#}"));
            None
        }
        (None, _) => None,
    };

    run.step("kill", steps::kill_and_bring_back(&stack, REPLICAS))
        .await;
    run.step("crash", steps::crash_and_self_restart(&stack, REPLICAS))
        .await;
    for to in [5, 2, REPLICAS] {
        run.step(&format!("scale-{to}"), steps::scale(&stack, to, &dir))
            .await;
    }
    let next = if run.failed {
        None
    } else {
        match next_image(&opts.image, &project).await {
            Ok(next) => Some(next),
            Err(e) => {
                run.fail("next-image", format!("{e:#}"));
                None
            }
        }
    };
    if let Some(next) = &next {
        run.step(
            "rolling-upgrade",
            steps::rolling_replace(&mut stack, next, &dir),
        )
        .await;
        run.step(
            "rollback",
            steps::rolling_replace(&mut stack, &opts.image, &dir),
        )
        .await;
    }
    run.step("docker-run", steps::plain_docker_run(&stack, &dir))
        .await;
    run.step(
        "restart-rabbitmq",
        steps::restart_server(&stack, "rabbitmq", REPLICAS),
    )
    .await;
    run.step(
        "restart-postgres",
        steps::restart_server(&stack, "postgres", REPLICAS),
    )
    .await;
    run.step("publish-on", async {
        tokio::time::sleep(FINAL_PUBLISH).await;
        Ok(format!(
            "published {:.0}s more on the final replicas",
            FINAL_PUBLISH.as_secs_f64()
        ))
    })
    .await;

    let mut report = DeployReport {
        project: project.clone(),
        steps: Vec::new(),
        published: Published::default(),
        check: None,
        dead_letters: None,
        seen: None,
        problems: Vec::new(),
        dir: dir.clone(),
        took: Duration::ZERO,
    };
    if let (Some(load), Some(at)) = (load, &endpoints) {
        finish_and_check(load, at, &mut report).await;
    }
    if let Some(counted) = report.check.as_ref().map(|c| c.counted) {
        run.step("stats", steps::stats(&stack, counted)).await;
    }
    if !run.failed {
        run.step("verify", steps::verify(&stack)).await;
        run.step("least-privilege", steps::least_privilege_logins(&stack))
            .await;
        run.step(
            "dlq-retention",
            steps::dead_letter_retention(&stack, DEFAULT_QUEUE_NAME),
        )
        .await;
        let mut seen = None;
        run.step("prometheus", async {
            let running = stack.running().await?;
            let found =
                prometheus::wait_all_seen(stack.prometheus(), &running, Duration::from_secs(90))
                    .await?;
            let evidence = format!(
                "up == 1 for {}/{} replicas, each counted votes; RabbitMQ scraped",
                found.up, found.replicas
            );
            seen = Some(found);
            Ok(evidence)
        })
        .await;
        report.seen = seen;
        // Last: the restart of every replica resets the counters Prometheus checked.
        run.step(
            "backup-restore",
            restore::backup_and_restore(&stack, &dir, REPLICAS, DEFAULT_QUEUE_NAME),
        )
        .await;
    }

    if let Err(e) = stack.save_logs(&dir.join("compose.log")).await {
        report.problems.push(format!("cannot save the logs: {e:#}"));
    }
    if !opts.keep
        && let Err(e) = stack.down().await
    {
        report.problems.push(format!("teardown failed: {e:#}"));
    }
    if let Some(next) = &next
        && !opts.keep
    {
        let _ = stack::docker(&["image", "rm", next]).await;
    }
    report.steps = run.steps;
    report.took = started.elapsed();
    if !report.passed()
        && let Err(e) = report.published.ledger.save(&dir.join("ledger.json"))
    {
        report
            .problems
            .push(format!("cannot save the ledger: {e:#}"));
    }
    let text = format!("{report}\n");
    if let Err(e) = std::fs::write(dir.join("report.txt"), &text) {
        report
            .problems
            .push(format!("cannot write report.txt: {e}"));
    }
    Ok(report)
}

/// The steps so far; once one failed, the rest are skipped.
struct Run {
    steps: Vec<Step>,
    failed: bool,
}

impl Run {
    async fn step(&mut self, name: &str, work: impl Future<Output = anyhow::Result<String>>) {
        if self.failed {
            return;
        }
        let started = Instant::now();
        let outcome = work
            .await
            .map_err(|e| format!("{e:#}").replace('\n', " | "));
        let took = started.elapsed();
        match &outcome {
            Ok(evidence) => eprintln!("  ok   {name:<18} {:>6.1}s  {evidence}", took.as_secs_f64()),
            Err(why) => eprintln!("  FAIL {name:<18} {:>6.1}s  {why}", took.as_secs_f64()),
        }
        self.failed = outcome.is_err();
        self.steps.push(Step {
            name: name.to_owned(),
            took,
            outcome,
        });
    }

    fn fail(&mut self, name: &str, why: String) {
        eprintln!("  FAIL {name:<18}         {why}");
        self.failed = true;
        self.steps.push(Step {
            name: name.to_owned(),
            took: Duration::ZERO,
            outcome: Err(why),
        });
    }
}

/// The steady confirmed publisher, as the stack's publisher user (it may only publish):
/// duplicates (some late), conflicting copies and ~1 % malformed messages, at
/// `opts.rate`.
fn start_load(amqp_url: &str, queue: &str, opts: &DeployOptions) -> SteadyLoad {
    let spec = steady_workload(opts.rate * MAX_PUBLISH.as_secs_f64(), opts.seed);
    let stream = message_stream(&spec, (opts.rate * 2.0) as usize);
    SteadyLoad::start(amqp_url, queue, opts.seed, stream, opts.rate)
}

/// Stops the publisher, waits for the drain, runs the checker and reads the dead letters.
async fn finish_and_check(load: SteadyLoad, at: &Endpoints, report: &mut DeployReport) {
    match load.finish(Duration::from_secs(30)).await {
        Ok(p) => report.published = p,
        Err(e) => report.problems.push(format!("publisher failed: {e:#}")),
    }
    match wait_drained(at, DRAIN_SETTLE, Duration::from_secs(180)).await {
        Ok(Some(_)) => {}
        Ok(None) => report
            .problems
            .push("the queue did not drain within 180 s".into()),
        Err(e) => report
            .problems
            .push(format!("cannot watch the drain: {e:#}")),
    }
    let options = CheckOptions {
        drain_timeout: Duration::from_secs(10),
        settle: Duration::from_secs(1),
    };
    match checker::check(
        &report.published.ledger,
        &at.database_url,
        &at.amqp_url,
        &options,
    )
    .await
    {
        Ok(check) => report.check = Some(check),
        Err(e) => report.problems.push(format!("checker failed: {e:#}")),
    }
    match read_dead_letters(at, &report.published).await {
        Ok(dl) => report.dead_letters = Some(dl),
        Err(e) => report
            .problems
            .push(format!("cannot read the dead letters: {e:#}")),
    }
}

#[cfg(test)]
mod tests;
