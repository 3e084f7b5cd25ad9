//! Reading the Prometheus text exposition format (what a replica's `/metrics` serves):
//! the one parser of the kit, used by fleet scrapes ([`crate::fleet::Fleet::scrape`]),
//! the integration tests ([`crate::inspect::metric_value`]) and the tools.
//!
//! It reads samples only (`name{labels} value [timestamp]`); `# HELP` / `# TYPE`
//! comments and blank lines are skipped. Metric names come from the service's
//! `vote_aggregator::metrics::names`, declared there once.

use anyhow::{Context, bail};

use vote_aggregator::metrics::labels::DEPENDENCY;
use vote_aggregator::metrics::names::{
    BATCHES_COMMITTED_TOTAL, UP, VOTES_CONFLICTING_TOTAL, VOTES_COUNTED_TOTAL,
    VOTES_DUPLICATE_FROM_MEMORY_TOTAL, VOTES_DUPLICATE_TOTAL, VOTES_RECEIVED_TOTAL,
    VOTES_REJECTED_TOTAL,
};

/// The series of the service's `up` gauge for one dependency
/// ([`vote_aggregator::metrics::DEP_POSTGRES`] or [`vote_aggregator::metrics::DEP_RABBITMQ`]),
/// as [`Scrape::get`] and [`metric_value`] take it.
pub fn up_series(dependency: &str) -> String {
    format!("{UP}{{{DEPENDENCY}=\"{dependency}\"}}")
}

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (for histograms including `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Labels in page order.
    pub labels: Labels,
    /// Value.
    pub value: f64,
}

impl Sample {
    fn has_labels(&self, labels: &[(String, String)]) -> bool {
        self.labels.len() == labels.len() && labels.iter().all(|l| self.labels.contains(l))
    }
}

/// A parsed Prometheus text page (e.g. `/metrics` of one replica).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses a Prometheus text-format page (comments and blank lines are skipped, an
    /// optional timestamp after the value is ignored).
    ///
    /// # Errors
    /// On a line that is not a sample, naming it.
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).with_context(|| format!("bad metrics line: {l:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Scrape { samples })
    }

    /// Every sample, in page order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The value of one sample, named as on the page with its labels if any, e.g.
    /// `vote_aggregator_up{dependency="postgres"}`; label order does not matter. `None`
    /// when absent (or when `name_with_labels` does not parse).
    pub fn get(&self, name_with_labels: &str) -> Option<f64> {
        let (name, labels, rest) = parse_key(name_with_labels.trim()).ok()?;
        if !rest.trim().is_empty() {
            return None;
        }
        self.samples
            .iter()
            .find(|s| s.name == name && s.has_labels(&labels))
            .map(|s| s.value)
    }

    /// Sum of every sample called `name`, whatever its labels (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// `vote_aggregator_votes_counted_total` (0 when absent).
    pub fn counted(&self) -> u64 {
        whole(self.sum(VOTES_COUNTED_TOTAL))
    }

    /// `vote_aggregator_batches_committed_total` (0 when absent): a batch is acked right
    /// after it counts here.
    pub fn batches_committed(&self) -> u64 {
        whole(self.sum(BATCHES_COMMITTED_TOTAL))
    }

    /// `vote_aggregator_votes_received_total` (0 when absent).
    pub fn received(&self) -> u64 {
        whole(self.sum(VOTES_RECEIVED_TOTAL))
    }

    /// `vote_aggregator_votes_duplicate_total`, summed over `redelivered="true"` and
    /// `"false"` (0 when absent).
    pub fn duplicates(&self) -> u64 {
        whole(self.sum(VOTES_DUPLICATE_TOTAL))
    }

    /// `vote_aggregator_votes_duplicate_from_memory_total` (0 when absent).
    pub fn duplicates_from_memory(&self) -> u64 {
        whole(self.sum(VOTES_DUPLICATE_FROM_MEMORY_TOTAL))
    }

    /// `vote_aggregator_votes_conflicting_total` (0 when absent).
    pub fn conflicting(&self) -> u64 {
        whole(self.sum(VOTES_CONFLICTING_TOTAL))
    }

    /// `vote_aggregator_votes_rejected_total`, summed over every `reason` (0 when absent).
    pub fn rejected(&self) -> u64 {
        whole(self.sum(VOTES_REJECTED_TOTAL))
    }
}

fn whole(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Label pairs of a sample, in page order.
type Labels = Vec<(String, String)>;

/// Parses `name{labels}` at the start of `s`; returns the rest.
fn parse_key(s: &str) -> anyhow::Result<(String, Labels, &str)> {
    let end = s
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(s.len());
    let name = &s[..end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &s[end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            while chars
                .next_if(|(_, c)| c.is_whitespace() || *c == ',')
                .is_some()
            {}
            let Some(&(start, c)) = chars.peek() else {
                bail!("unclosed label set");
            };
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            let key = key.trim().to_string();
            if key.is_empty() || chars.next().is_none() || chars.next().map(|(_, c)| c) != Some('"')
            {
                bail!("bad label near {:?}", &inner[start..]);
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => bail!("unterminated label value"),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value"),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            labels.push((key, value));
        }
    }
    Ok((name.to_string(), labels, rest))
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let (name, labels, rest) = parse_key(line)?;
    let mut fields = rest.split_whitespace();
    let raw = fields.next().context("no value")?;
    let value = raw
        .parse::<f64>()
        .with_context(|| format!("bad value {raw:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        bail!("trailing fields");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Reads one value from a Prometheus text page (`name` may include labels, e.g.
/// `vote_aggregator_up{dependency="postgres"}`, in any order). Lines that are not samples
/// are skipped, so a partly broken page still answers for its good lines. Absent → `None`.
pub fn metric_value(page: &str, name: &str) -> Option<f64> {
    let (name, labels, rest) = parse_key(name.trim()).ok()?;
    if !rest.trim().is_empty() {
        return None;
    }
    page.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| parse_sample(l).ok())
        .find(|s| s.name == name && s.has_labels(&labels))
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vote_aggregator::metrics::{DEP_POSTGRES, DEP_RABBITMQ};

    const PAGE: &str = r#"# HELP vote_aggregator_votes_counted_total Votes inserted.
# TYPE vote_aggregator_votes_counted_total counter
vote_aggregator_votes_counted_total 1234
vote_aggregator_votes_received_total 1300
vote_aggregator_votes_duplicate_total{redelivered="false"} 3
vote_aggregator_votes_duplicate_total{redelivered="true"} 60
vote_aggregator_votes_conflicting_total 2
vote_aggregator_votes_rejected_total{reason="malformed_json"} 1
vote_aggregator_votes_rejected_total{reason="too_large"} 4
vote_aggregator_up{dependency="postgres"} 1
vote_aggregator_up{dependency="rabbitmq"} 0
vote_aggregator_batch_size_bucket{le="+Inf"} 7
weird{a="x\"y\\z",b="1"} 2.5 1700000000000

"#;

    #[test]
    fn scrape_reads_counters_sums_and_labelled_values() {
        let s = Scrape::parse(PAGE).expect("valid page");
        assert_eq!(s.counted(), 1234);
        assert_eq!(s.received(), 1300);
        assert_eq!(s.duplicates(), 63);
        assert_eq!(s.conflicting(), 2);
        assert_eq!(s.rejected(), 5);
        assert_eq!(s.get(&up_series(DEP_POSTGRES)), Some(1.0));
        assert_eq!(s.get(&up_series(DEP_RABBITMQ)), Some(0.0));
        assert_eq!(s.get("vote_aggregator_up"), None, "labels must match");
        assert_eq!(
            s.get(r#"vote_aggregator_batch_size_bucket{le="+Inf"}"#),
            Some(7.0)
        );
        assert_eq!(s.get(r#"weird{b="1", a="x\"y\\z"}"#), Some(2.5));
        assert_eq!(s.get("absent_total"), None);
        assert_eq!(s.get("not a {key"), None);
    }

    #[test]
    fn absent_counters_read_as_zero_and_bad_lines_are_named() {
        let s = Scrape::parse("vote_aggregator_votes_counted_total 0\n").expect("valid");
        assert_eq!((s.duplicates(), s.rejected()), (0, 0));
        let e = Scrape::parse("ok 1\nbroken{x=\"1\" 2\n").expect_err("invalid");
        assert!(format!("{e:#}").contains("broken"), "{e:#}");
        assert!(Scrape::parse("x notanumber\n").is_err());
    }

    #[test]
    fn metric_value_reads_one_sample_of_a_page() {
        assert_eq!(metric_value(PAGE, VOTES_COUNTED_TOTAL), Some(1234.0));
        assert_eq!(
            metric_value(PAGE, r#"vote_aggregator_up{dependency="rabbitmq"}"#),
            Some(0.0)
        );
        assert_eq!(metric_value(PAGE, "absent_total"), None);
        assert_eq!(
            metric_value("broken{ 1\nok 2\n", "ok"),
            Some(2.0),
            "bad lines skipped"
        );
    }
}
