//! The Jepsen-style report of one scenario: the faults injected (by kind, with relative
//! timestamps and their evidence), what was published and confirmed, what the
//! exactly-once checker found, the dead letters, how long the system took to drain after
//! the last fault, whether every replica recovered, and whether the results stream rebuilds
//! `vote_statistics` exactly.
//!
//! [`ChaosReport::violations`] is the verdict: a scenario passes only when the checker's
//! invariants hold, every dead letter is accounted for, the results consumer's
//! reconstruction equals `vote_statistics`, every fault verifiably happened
//! (and there was at least one), and every replica recovered by itself.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use vote_testkit::checker;
use vote_testkit::results::ResultsCheck;

use crate::nemesis::{Fault, FaultKind};
use crate::scenario::Broken;

/// The dead-letter queue, read after the checker.
#[derive(Debug, Clone, Default)]
pub struct DeadLetters {
    /// Messages in the dead-letter queue.
    pub total: usize,
    /// Distinct bodies among them (a malformed message can be dead-lettered twice when a
    /// replica dies between the dead-letter publish and its ack: at-least-once).
    pub distinct: usize,
    /// Confirmed malformed messages.
    pub malformed_confirmed: usize,
    /// Confirmed malformed bodies missing from the dead-letter queue.
    pub missing: usize,
    /// Dead-lettered bodies that were not malformed messages of this run.
    pub foreign: usize,
}

impl DeadLetters {
    /// Every way the dead-letter queue disagrees with what was published.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.missing > 0 {
            v.push(format!(
                "{} confirmed malformed message(s) missing from the dead-letter queue",
                self.missing
            ));
        }
        if self.foreign > 0 {
            v.push(format!(
                "{} dead-lettered message(s) that were not malformed messages of this run",
                self.foreign
            ));
        }
        v
    }
}

/// How one replica ended the scenario.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Replica name.
    pub replica: String,
    /// `Ok(time from the end of the faults until /readyz 200)`, or why it did not recover.
    pub ready: Result<Duration, String>,
}

/// Everything one scenario run found.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// Scenario name.
    pub scenario: String,
    /// Seed of the workload and the fault schedule.
    pub seed: u64,
    /// Length of the fault period asked for.
    pub duration: Duration,
    /// The deliberately broken build the replicas ran, if any.
    pub broken: Option<Broken>,
    /// Replicas.
    pub replicas: usize,
    /// Publish rate asked for (messages per second).
    pub rate: f64,
    /// Faults, in order.
    pub faults: Vec<Fault>,
    /// When the last fault was healed, since the start.
    pub last_fault_healed: Duration,
    /// Messages taken from the workload stream.
    pub attempted: usize,
    /// Publishes retried because they were not confirmed.
    pub retried: u64,
    /// Messages never confirmed (not in the ledger).
    pub unconfirmed: usize,
    /// Publisher connections opened.
    pub publisher_connections: u64,
    /// The exactly-once checker's findings.
    pub check: checker::Report,
    /// The dead-letter queue.
    pub dead_letters: DeadLetters,
    /// The results consumer's reconstruction against `vote_statistics`.
    pub results: ResultsCheck,
    /// From the last fault healed until the queue drained.
    pub drain_after_last_fault: Duration,
    /// Per replica.
    pub recovery: Vec<Recovery>,
    /// Other problems (test kit errors after the faults, unclean shutdown, ...).
    pub problems: Vec<String>,
    /// Where logs, ledger and this report are kept (removed after a pass unless kept).
    pub dir: PathBuf,
    /// Whether `dir` was kept.
    pub kept: bool,
}

impl ChaosReport {
    /// Verified faults by kind.
    pub fn verified_by_kind(&self) -> BTreeMap<FaultKind, usize> {
        let mut by = BTreeMap::new();
        for f in self.faults.iter().filter(|f| f.verified()) {
            *by.entry(f.kind).or_default() += 1;
        }
        by
    }

    /// Number of verified faults.
    pub fn verified(&self) -> usize {
        self.faults.iter().filter(|f| f.verified()).count()
    }

    /// Replicas that recovered.
    pub fn recovered(&self) -> usize {
        self.recovery.iter().filter(|r| r.ready.is_ok()).count()
    }

    /// Every reason this run failed (empty when it passed).
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.check.violations();
        v.extend(self.dead_letters.violations());
        if !self.results.passed() {
            v.push(self.results.to_string());
        }
        if self.faults.is_empty() || self.verified() == 0 {
            v.push("no fault verifiably happened: the scenario proved nothing".into());
        }
        for f in &self.faults {
            if let Err(why) = &f.outcome {
                v.push(format!(
                    "fault {} on {} at +{:.1}s NOT verified: {why}",
                    f.kind,
                    f.target,
                    f.at.as_secs_f64()
                ));
            }
            if let Some(e) = &f.heal_error {
                v.push(format!(
                    "no recovery from {} on {} at +{:.1}s: {e}",
                    f.kind,
                    f.target,
                    f.at.as_secs_f64()
                ));
            }
        }
        for r in &self.recovery {
            if let Err(e) = &r.ready {
                v.push(format!("replica {} did not recover: {e}", r.replica));
            }
        }
        v.extend(self.problems.iter().cloned());
        v
    }

    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    /// The one-line summary (uses the words `lost N` and `double-counted N`).
    pub fn summary(&self) -> String {
        format!(
            "{}{} seed {}: {} · {} faults verified · lost {} · double-counted {} · tally drift {} · results {} ({} repeats deduped) · drained {:.1}s after the last fault · replicas recovered {}/{}",
            self.scenario,
            self.broken
                .map(|b| format!(" (BROKEN build: {b})"))
                .unwrap_or_default(),
            self.seed,
            if self.passed() { "PASS" } else { "FAIL" },
            self.verified(),
            self.check.lost,
            self.check.double_counted,
            self.check.tally_drift,
            if self.results.passed() {
                "match"
            } else {
                "DIFFER"
            },
            self.results.repeats,
            self.drain_after_last_fault.as_secs_f64(),
            self.recovered(),
            self.recovery.len()
        )
    }
}

/// Shortens a long line for the fault table.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        writeln!(
            f,
            "=== chaos scenario {} · seed {} · {:.0}s of faults · {} replicas · {:.0} msg/s{} · {verdict} ===",
            self.scenario,
            self.seed,
            self.duration.as_secs_f64(),
            self.replicas,
            self.rate,
            self.broken
                .map(|b| format!(" · BROKEN build ({b})"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "faults: {} injected, {} verified; last healed at +{:.1}s",
            self.faults.len(),
            self.verified(),
            self.last_fault_healed.as_secs_f64()
        )?;
        for fault in &self.faults {
            let (mark, text) = match &fault.outcome {
                Ok(evidence) => ("ok ", evidence.as_str()),
                Err(why) => ("NOT", why.as_str()),
            };
            writeln!(
                f,
                "  +{:>6.1}s → +{:>6.1}s  {mark} {:<17} {:<16} {}",
                fault.at.as_secs_f64(),
                fault.healed.as_secs_f64(),
                fault.kind.name(),
                fault.target,
                clip(text, 220)
            )?;
            if let Some(e) = &fault.heal_error {
                writeln!(f, "{:>30}NO RECOVERY: {}", "", clip(e, 400))?;
            }
        }
        let by_kind: Vec<String> = self
            .verified_by_kind()
            .into_iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(f, "verified by kind: {}", by_kind.join(" · "))?;
        writeln!(
            f,
            "publisher: {} messages sent · {} publishes retried · {} never confirmed · {} connection(s)",
            self.attempted, self.retried, self.unconfirmed, self.publisher_connections
        )?;
        writeln!(f, "checker: {}", self.check)?;
        let dl = &self.dead_letters;
        writeln!(
            f,
            "dead letters: {} message(s), {} distinct · {} malformed confirmed · {} missing · {} foreign",
            dl.total, dl.distinct, dl.malformed_confirmed, dl.missing, dl.foreign
        )?;
        writeln!(
            f,
            "conflicts: {} of {} recorded · indeterminate (attempted, never confirmed): {} counted, {} absent · phantoms (counted, never attempted): {}",
            self.check.conflicts_recorded,
            self.check.conflicts_expected,
            self.check.indeterminate_counted,
            self.check.indeterminate_absent,
            self.check.unexpected
        )?;
        writeln!(f, "{}", self.results)?;
        writeln!(
            f,
            "drain: queue empty and counts settled {:.1}s after the last fault",
            self.drain_after_last_fault.as_secs_f64()
        )?;
        let rec: Vec<String> = self
            .recovery
            .iter()
            .map(|r| match &r.ready {
                Ok(t) => format!("{} ready +{:.1}s", r.replica, t.as_secs_f64()),
                Err(_) => format!("{} NOT RECOVERED", r.replica),
            })
            .collect();
        writeln!(
            f,
            "recovery: {}/{} replicas /readyz 200 without intervention (time after the faults ended): {}",
            self.recovered(),
            self.recovery.len(),
            rec.join(" · ")
        )?;
        for v in self.violations() {
            writeln!(f, "VIOLATION: {}", clip(&v, 600))?;
        }
        if self.kept {
            writeln!(f, "logs, ledger and report kept in {}", self.dir.display())?;
        }
        write!(f, "summary: {}", self.summary())
    }
}
