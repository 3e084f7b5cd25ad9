//! The outputs of a load run: a terminal table, `report.json` (every figure, the settings
//! and the machine), `report.md` (for the README and release notes) and `throughput.png`
//! (throughput vs replicas and batch size with both ceilings, and latency percentiles),
//! all under the run's output folder (`target/load/` by default).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use plotters::prelude::*;

use crate::load::{ConfigResult, LoadReport, WriteFloor, lower_middle};

/// One replica at batch 500 must reach this share of the floor measured in the same run.
pub const FLOOR_TARGET: f64 = 0.90;

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct Written {
    /// JSON with every figure.
    pub json: PathBuf,
    /// Markdown report.
    pub markdown: PathBuf,
    /// Chart, when a font was found to label it.
    pub chart: Option<PathBuf>,
}

/// The terminal table.
pub fn table(report: &LoadReport) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "queue",
        "replicas",
        "batch",
        "votes/s",
        "floor",
        "of floor",
        "broker ceiling",
        "% of broker",
        "db ceiling",
        "% of db",
        "p50 ms",
        "p99 ms",
        "CPU s/1k votes",
        "peak RSS MiB",
    ]);
    for c in &report.configs {
        t.add_row([
            c.queue_type.clone(),
            c.replicas.to_string(),
            c.batch_size.to_string(),
            format!("{:.0}", c.votes_per_second),
            format!("{:.0}", c.floor_votes_per_second),
            of_floor(c),
            format!("{:.0}", c.broker_ceiling_votes_per_second),
            format!("{:.0} %", c.ratio_to_broker_ceiling * 100.0),
            format!("{:.0}", c.db_ceiling_votes_per_second),
            format!("{:.0} %", c.ratio_to_db_ceiling * 100.0),
            format!("{:.1}", c.latency_p50_ms),
            format!("{:.1}", c.latency_p99_ms),
            format!("{:.3}", c.cpu_seconds_per_1000_votes),
            format!("{:.1}", c.peak_rss_mib),
        ]);
    }
    t
}

/// Writes the JSON, Markdown and PNG outputs into `dir`.
///
/// # Errors
/// When a file cannot be written.
pub fn write_all(report: &LoadReport, dir: &Path) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let chart_path = dir.join("throughput.png");
    let chart = match chart(report, &chart_path) {
        Ok(()) => Some(chart_path),
        Err(e) => {
            eprintln!("load: chart not drawn: {e:#}");
            None
        }
    };
    let markdown = dir.join("report.md");
    std::fs::write(&markdown, markdown_text(report, chart.as_deref()))
        .with_context(|| format!("writing {}", markdown.display()))?;
    Ok(Written {
        json,
        markdown,
        chart,
    })
}

/// The Markdown report.
pub fn markdown_text(report: &LoadReport, chart: Option<&Path>) -> String {
    let m = &report.machine;
    let mut s = String::new();
    let _ = writeln!(s, "## Load baseline\n");
    let _ = writeln!(
        s,
        "Command: `{}` · started {} · {:.0} s wall · seed {}\n",
        report.command, report.started_at, report.wall_seconds, report.seed
    );
    let _ = writeln!(
        s,
        "Machine: {} cores, {:.1} GiB, Linux {} · {} (fsync={}) · RabbitMQ image `{}` · vote-aggregator {} (release build) · clients reach the servers over: {}\n",
        m.cores,
        m.memory_gib,
        m.kernel,
        short_pg(&m.postgres),
        m.postgres_fsync,
        m.rabbitmq,
        m.aggregator_version,
        m.data_path
    );
    let _ = writeln!(
        s,
        "Each configuration drains a queue pre-filled with {} votes + {:.0} % duplicates (counted votes/s, first to last counted vote), then publishes at 50 % of that rate for {:.0} s and measures publish-to-commit latency of every vote (HDR histogram). **floor** = the least any correct exactly-once consumer must do, measured in the same run with the same queue type, batch size, prefetch and commit pipeline depth: decode each vote, one `INSERT … ON CONFLICT (vote_id) DO NOTHING` of the batch's full rows per transaction, COMMIT (fsync on), one `multiple` ack — no tally, no conflict judging, no dead-lettering, no metrics; `of floor` = votes/s ÷ floor. Ceilings are measured in the same run too: **broker** = a receive-and-ack-only consumer (same queue type and prefetch, no database), **database** = the aggregator's batch statement fed from memory at the same batch size (no broker). `% of broker` compares deliveries/s (votes + duplicates) with the broker ceiling. `CPU s / 1000 votes` is the replicas' own CPU over the whole run; `machine CPU used` is the share of all cores that replicas, RabbitMQ and PostgreSQL used together during the drain (from /proc and the containers' cgroups), and `CPU-bound ceiling` is what those measured per-vote CPU costs would allow if the cores were the only limit.\n",
        report.votes,
        report.duplicates * 100.0,
        report.steady_seconds
    );
    let _ = writeln!(
        s,
        "| queue | replicas | batch | votes/s | floor | of floor | broker ceiling | % of broker | db ceiling | % of db | p50 ms | p95 ms | p99 ms | max ms | CPU s / 1000 votes | peak RSS MiB | machine CPU used | CPU-bound ceiling | limited by |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for c in &report.configs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} % | {:.0} | {:.0} % | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.1} | {} | {} | {} |",
            c.queue_type,
            c.replicas,
            c.batch_size,
            c.votes_per_second,
            c.floor_votes_per_second,
            of_floor(c),
            c.broker_ceiling_votes_per_second,
            c.ratio_to_broker_ceiling * 100.0,
            c.db_ceiling_votes_per_second,
            c.ratio_to_db_ceiling * 100.0,
            c.latency_p50_ms,
            c.latency_p95_ms,
            c.latency_p99_ms,
            c.latency_max_ms,
            c.cpu_seconds_per_1000_votes,
            c.peak_rss_mib,
            match (c.drain_machine_cpu_share, c.drain_machine_busy_share) {
                (Some(ours), Some(all)) =>
                    format!("{:.0} % (all work: {:.0} %)", ours * 100.0, all * 100.0),
                (Some(ours), None) => format!("{:.0} %", ours * 100.0),
                _ => "n/a".into(),
            },
            c.cpu_bound_votes_per_second
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            c.limited_by
        );
    }
    if let Some(chart) = chart {
        let _ = writeln!(s, "\nChart: `{}`", chart.display());
    }
    s.push_str(&cost_against_floor(report));
    s.push_str(&gap_split(report));
    s.push_str(&every_round(report));
    let _ = writeln!(s, "\n### Targets\n");
    for line in targets(report) {
        let _ = writeln!(s, "- {line}");
    }
    s
}

fn short_pg(version: &str) -> String {
    version.split(" on ").next().unwrap_or(version).to_string()
}

/// The capacity targets (share of the floor measured in the same run; 3 replicas against
/// 1; latency; memory), each judged from this run's own figures.
pub fn targets(report: &LoadReport) -> Vec<String> {
    let find = |q: &str, r: usize, b: usize| {
        report
            .configs
            .iter()
            .find(|c| c.queue_type == q && c.replicas == r && c.batch_size == b)
    };
    let mut out = Vec::new();
    for q in ["classic", "quorum"] {
        if let Some(c) = find(q, 1, 500) {
            out.push(format!(
                "1 replica, batch 500, {q}: {} of the floor ({:.0} of {:.0} votes/s; target ≥ {FLOOR_TARGET:.2}): {}{}",
                of_floor(c),
                c.votes_per_second,
                c.floor_votes_per_second,
                verdict(c.ratio_to_floor >= FLOOR_TARGET),
                cpu_ratio_note(c)
            ));
        }
    }
    let mut groups: Vec<(&str, usize)> = report
        .configs
        .iter()
        .map(|c| (c.queue_type.as_str(), c.batch_size))
        .collect();
    groups.sort();
    groups.dedup();
    for (q, b) in groups {
        if let (Some(one), Some(three)) = (find(q, 1, b), find(q, 3, b)) {
            out.push(scaling_line(q, b, one, three));
        }
    }
    let worst_p99 = report
        .configs
        .iter()
        .map(|c| c.latency_p99_ms)
        .fold(0.0, f64::max);
    out.push(format!(
        "p99 publish-to-commit at 50 % load ≤ 2 × BATCH_TIMEOUT_MS + 25 ms = 125 ms: worst {worst_p99:.1} ms: {}",
        verdict(worst_p99 <= 125.0)
    ));
    let rss = report
        .configs
        .iter()
        .map(|c| c.peak_rss_mib)
        .fold(0.0, f64::max);
    if rss > 0.0 {
        out.push(format!(
            "peak RSS per replica < 64 MiB (largest of every configuration): {rss:.1} MiB: {}",
            verdict(rss < 64.0)
        ));
    }
    out
}

/// Registers a system font for chart labels (plotters' pure-Rust text rendering needs
/// one). Debian's fonts-dejavu-core provides it.
fn register_font() -> anyhow::Result<()> {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    let path = CANDIDATES
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf found (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn chart(report: &LoadReport, path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(560);
    let mut queues: Vec<&str> = report
        .configs
        .iter()
        .map(|c| c.queue_type.as_str())
        .collect();
    queues.sort();
    queues.dedup();
    let panels = top.split_evenly((1, queues.len().max(1)));
    let max_y = report
        .configs
        .iter()
        .flat_map(|c| {
            [
                c.votes_per_second,
                c.floor_votes_per_second,
                c.broker_ceiling_votes_per_second,
                c.db_ceiling_votes_per_second,
            ]
        })
        .fold(1.0, f64::max)
        * 1.1;
    let max_r = report.configs.iter().map(|c| c.replicas).max().unwrap_or(1) as f64;
    for (panel, q) in panels.iter().zip(&queues) {
        let configs: Vec<&ConfigResult> = report
            .configs
            .iter()
            .filter(|c| c.queue_type == *q)
            .collect();
        let mut batches: Vec<usize> = configs.iter().map(|c| c.batch_size).collect();
        batches.sort_unstable();
        batches.dedup();
        let mut ch = ChartBuilder::on(panel)
            .caption(
                format!("{q}: votes/s (solid), floor (thin), broker ceiling (dashed), db ceiling (dotted)"),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.8f64..max_r + 0.2, 0f64..max_y)?;
        ch.configure_mesh()
            .x_desc("replicas")
            .y_desc("votes/s")
            .x_labels(max_r as usize)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (i, b) in batches.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = configs
                .iter()
                .filter(|c| c.batch_size == *b)
                .map(|c| (c.replicas as f64, c.votes_per_second))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            ch.draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
                .label(format!("batch {b}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            ch.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
            if let Some(c) = configs.iter().find(|c| c.batch_size == *b) {
                ch.draw_series(LineSeries::new(
                    vec![
                        (0.8, c.floor_votes_per_second),
                        (max_r + 0.2, c.floor_votes_per_second),
                    ],
                    color.stroke_width(1),
                ))?;
                ch.draw_series(DashedLineSeries::new(
                    vec![
                        (0.8, c.broker_ceiling_votes_per_second),
                        (max_r + 0.2, c.broker_ceiling_votes_per_second),
                    ],
                    10,
                    6,
                    color.stroke_width(2),
                ))?;
                ch.draw_series(DashedLineSeries::new(
                    vec![
                        (0.8, c.db_ceiling_votes_per_second),
                        (max_r + 0.2, c.db_ceiling_votes_per_second),
                    ],
                    2,
                    5,
                    color.stroke_width(2),
                ))?;
            }
        }
        ch.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }

    // Latency percentiles per configuration.
    let n = report.configs.len().max(1);
    let max_ms = report
        .configs
        .iter()
        .map(|c| c.latency_p99_ms.max(c.latency_p95_ms))
        .fold(1.0, f64::max)
        .max(125.0)
        * 1.15;
    let mut ch = ChartBuilder::on(&bottom)
        .caption(
            "publish-to-commit latency at 50 % of capacity: p50 / p95 / p99 (line: 125 ms target)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..max_ms)?;
    let labels: Vec<String> = report
        .configs
        .iter()
        .map(|c| format!("{} r{} b{}", &c.queue_type[..1], c.replicas, c.batch_size))
        .collect();
    ch.configure_mesh()
        .y_desc("ms")
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            labels.get(i).cloned().unwrap_or_default()
        })
        .draw()?;
    for (k, (name, pick)) in [
        (
            "p50",
            (|c: &ConfigResult| c.latency_p50_ms) as fn(&ConfigResult) -> f64,
        ),
        ("p95", |c: &ConfigResult| c.latency_p95_ms),
        ("p99", |c: &ConfigResult| c.latency_p99_ms),
    ]
    .into_iter()
    .enumerate()
    {
        let color = COLORS[k];
        let offset = (k as f64 - 1.0) * 0.2;
        ch.draw_series(report.configs.iter().enumerate().map(|(i, c)| {
            let x = i as f64 + offset;
            Rectangle::new([(x - 0.09, 0.0), (x + 0.09, pick(c))], color.filled())
        }))?
        .label(name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    ch.draw_series(LineSeries::new(
        vec![(-0.5, 125.0), (n as f64 - 0.5, 125.0)],
        RED.stroke_width(2),
    ))?;
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Where the aggregator's extra cost over the floor goes: each component's CPU per 1000
/// votes during the aggregator's drain and during the floor's, and the ratio the totals
/// alone would give (consistent with `of floor` when the cores bound both drains).
fn cost_against_floor(report: &LoadReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n### CPU per 1000 votes: aggregator against floor\n");
    let _ = writeln!(
        s,
        "CPU seconds per 1000 counted votes during each drain, aggregator / floor: the \
         consumer process (the replicas, or the load runner while only the floor consumer \
         runs in it), the RabbitMQ and the PostgreSQL containers. `ratio of totals` = floor \
         total ÷ aggregator total: the share of the floor a run bound by the cores can reach \
         with these costs. `floor busy` = share of the machine busy during the floor's \
         drain. `switches` = context switches per 1000 votes of the threads of the consumer \
         processes (all replicas together), aggregator / floor: how often they waited and \
         were woken.\n"
    );
    let _ = writeln!(
        s,
        "| queue | replicas | batch | consumer | RabbitMQ | PostgreSQL | total | ratio of totals | floor busy | switches |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in &report.configs {
        if let Some(row) = cost_row(c) {
            let _ = writeln!(s, "{row}");
        }
    }
    s
}

/// One configuration's row of [`cost_against_floor`]; `None` when the servers' CPU could
/// not be read.
fn cost_row(c: &ConfigResult) -> Option<String> {
    let [consumer, broker, database] = c.cpu_parts();
    let [floor_consumer, floor_broker, floor_database] = c.floor_cpu_parts();
    let aggregator_total = c.cpu_total()?;
    let aggregator_vs_floor = |aggregator: f64, floor: Option<f64>| {
        format!("{aggregator:.4} / {}", or_na(floor, |f| format!("{f:.4}")))
    };
    Some(format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.queue_type,
        c.replicas,
        c.batch_size,
        aggregator_vs_floor(consumer?, floor_consumer),
        aggregator_vs_floor(broker?, floor_broker),
        aggregator_vs_floor(database?, floor_database),
        aggregator_vs_floor(aggregator_total, c.floor_cpu_total()),
        ratio(c.cpu_ratio_of_totals()),
        pct(c.floor_machine_busy_share),
        switches([
            c.drain_aggregator_context_switches_per_1000_votes,
            c.floor_consumer_context_switches_per_1000_votes,
        ]),
    ))
}

/// With `--floor-with-aggregator-write`: the gap to the floor split into what the
/// aggregator's batch write costs (bare floor against the floor that uses that write) and
/// what the replica's process costs beyond it (that floor against the aggregator), with
/// each drain's CPU per 1000 votes. Empty without that floor.
fn gap_split(report: &LoadReport) -> String {
    let rows: Vec<String> = report
        .configs
        .iter()
        .filter_map(|c| Some(split_row(c, c.floor_with_aggregator_write.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### The gap split: the aggregator's batch write, then the replica's process\n"
    );
    let _ = writeln!(
        s,
        "`with write` = a second floor, measured in the same round: the floor consumer \
         writing each batch with the aggregator's own batch write (tally, results outbox, \
         conflict judging, memory of recent votes) instead of the bare INSERT. `write` = \
         its votes/s ÷ the floor's (what that write costs), `process` = the aggregator's \
         ÷ its (what the replica's process costs beyond the write: consume loop, metrics, \
         results relay, one thread); their product is `of floor`. CPU ms per 1000 votes \
         during each drain, floor / with write / aggregator.\n"
    );
    let _ = writeln!(
        s,
        "| queue | replicas | batch | floor | with write | aggregator | write | process | consumer CPU | RabbitMQ CPU | PostgreSQL CPU |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let _ = writeln!(s, "{row}");
    }
    s
}

/// One configuration's row of [`gap_split`].
fn split_row(c: &ConfigResult, w: &WriteFloor) -> String {
    let three = |floor: Option<f64>, with_write: Option<f64>, aggregator: Option<f64>| {
        ms_each([floor, with_write, aggregator])
    };
    format!(
        "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
        c.queue_type,
        c.replicas,
        c.batch_size,
        c.floor_votes_per_second,
        w.votes_per_second,
        c.votes_per_second,
        w.votes_per_second / c.floor_votes_per_second.max(1.0),
        c.votes_per_second / w.votes_per_second.max(1.0),
        three(
            c.floor_consumer_cpu_seconds_per_1000_votes,
            w.consumer_cpu_seconds_per_1000_votes,
            Some(c.drain_aggregator_cpu_seconds_per_1000_votes)
        ),
        three(
            c.floor_broker_cpu_seconds_per_1000_votes,
            w.broker_cpu_seconds_per_1000_votes,
            c.drain_broker_cpu_seconds_per_1000_votes
        ),
        three(
            c.floor_database_cpu_seconds_per_1000_votes,
            w.database_cpu_seconds_per_1000_votes,
            c.drain_database_cpu_seconds_per_1000_votes
        ),
    )
}

/// `ratio_to_floor`, with its range over the rounds when there were several: "0.91 (median
/// of 3 rounds: 0.86–0.95)".
fn of_floor(c: &ConfigResult) -> String {
    if c.rounds > 1 {
        let (lo, hi) = c.ratio_to_floor_range;
        format!(
            "{:.2} (median of {} rounds: {lo:.2}–{hi:.2})",
            c.ratio_to_floor, c.rounds
        )
    } else {
        format!("{:.2}", c.ratio_to_floor)
    }
}

/// Context switches per 1000 votes, aggregator / floor ("n/a" for one not measured).
fn switches([aggregator, floor]: [Option<f64>; 2]) -> String {
    let count = |x: Option<f64>| or_na(x, |n| format!("{n:.0}"));
    format!("{} / {}", count(aggregator), count(floor))
}

/// `f(x)`, or "n/a" for a figure that could not be measured.
fn or_na(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "n/a".into(), f)
}

/// CPU seconds per 1000 votes shown as ms: "14.3".
fn ms(x: Option<f64>) -> String {
    or_na(x, |v| format!("{:.1}", v * 1000.0))
}

/// Several CPU figures as ms, in order: "14.3 / 15.7 / n/a".
fn ms_each(figures: [Option<f64>; 3]) -> String {
    figures.map(ms).join(" / ")
}

/// A share as a percentage: "81 %".
fn pct(x: Option<f64>) -> String {
    or_na(x, |v| format!("{:.0} %", v * 100.0))
}

/// A ratio: "0.95".
fn ratio(x: Option<f64>) -> String {
    or_na(x, |v| format!("{v:.2}"))
}

/// With `--rounds` above 1: every round of every configuration, the rate ratio beside the
/// ratio of CPU totals and the machine's busy share, so a reader can tell rounds whose
/// drains differed in CPU per vote from rounds where one drain waited. Empty with one
/// round.
fn every_round(report: &LoadReport) -> String {
    if report.configs.iter().all(|c| c.every_round.len() < 2) {
        return String::new();
    }
    let mut s = String::new();
    let _ = writeln!(s, "\n### Every round\n");
    let _ = writeln!(
        s,
        "In the order measured. `CPU ratio` = floor CPU total ÷ aggregator CPU total per \
         1000 votes (consumer, RabbitMQ, PostgreSQL) in that round; `busy` = share of the \
         machine busy during the aggregator's / the floor's drain. When both drains kept the \
         machine equally busy and `of floor` follows `CPU ratio`, the drains differed in CPU \
         per vote (more work, or the same work run slower on a shared machine), not in \
         waiting; the last two columns say whose CPU per vote it was, in ms per 1000 votes: \
         the consumer (the replicas, or the floor's), RabbitMQ, PostgreSQL. `order`: which \
         drain went first in that round (odd rounds the floors, even rounds the aggregator); \
         `dups from memory`: of every duplicate the replicas counted, the share \
         recognised by the replica that had stored the original itself, from its memory \
         (the rest were copies within one batch or judged by the database); `switches`: \
         context switches per 1000 votes of the consumer processes' threads, aggregator / \
         floor.\n"
    );
    let _ = writeln!(
        s,
        "| queue | replicas | batch | round | order | votes/s | floor | of floor | CPU ratio | busy | aggregator CPU | floor CPU | dups from memory | switches |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |"
    );
    for c in &report.configs {
        for (i, r) in c.every_round.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {} / {} | {} | {} | {} | {} |",
                c.queue_type,
                c.replicas,
                c.batch_size,
                i + 1,
                r.drain_order.shown(),
                r.votes_per_second,
                r.floor_votes_per_second,
                r.ratio_to_floor,
                ratio(r.cpu_ratio_of_totals),
                pct(r.machine_busy_share),
                pct(r.floor_machine_busy_share),
                ms_each(r.cpu_seconds_per_1000_votes),
                ms_each(r.floor_cpu_seconds_per_1000_votes),
                pct(r.duplicates_from_memory_share),
                switches(r.context_switches_per_1000_votes),
            );
        }
    }
    s
}

/// The target line of three replicas against one (queue type `q`, batch `b`): with
/// several rounds judged on the median of same-round pairs ([`same_round_ratios`]), the
/// quotient of the two reported rounds given beside it.
fn scaling_line(q: &str, b: usize, one: &ConfigResult, three: &ConfigResult) -> String {
    let reported = three.votes_per_second / one.votes_per_second.max(1.0);
    let (ratio, how) = match same_round_ratios(one, three) {
        Some(p) => (
            p.median,
            format!(
                " (median of {} same-round pairs, range {:.0}–{:.0} %; the reported rounds: {:.0} %)",
                p.pairs,
                p.min * 100.0,
                p.max * 100.0,
                reported * 100.0
            ),
        ),
        None => (reported, String::new()),
    };
    format!(
        "{q}, batch {b}: 3 replicas at {:.1} % of 1 replica{how} (target ≥ 90 %): {}",
        ratio * 100.0,
        verdict(ratio >= 0.9)
    )
}

/// How a target line ends.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Three replicas' rate over one replica's, paired round by round.
#[derive(Debug, PartialEq)]
struct SameRoundRatios {
    /// The lower middle one for an even count, as for every median of rounds here.
    median: f64,
    min: f64,
    max: f64,
    pairs: usize,
}

/// With several rounds, `three`'s rate over `one`'s in each round, where the two were
/// drained back to back beside the same floor: the reported rounds of the two
/// configurations are each one's own median round, often different rounds, so their
/// quotient mixes two rounds' conditions. `None` with one round, or when the two did
/// not keep the same rounds.
fn same_round_ratios(one: &ConfigResult, three: &ConfigResult) -> Option<SameRoundRatios> {
    if one.every_round.len() < 2 || one.every_round.len() != three.every_round.len() {
        return None;
    }
    let mut ratios: Vec<f64> = one
        .every_round
        .iter()
        .zip(&three.every_round)
        .map(|(o, t)| t.votes_per_second / o.votes_per_second.max(1.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    Some(SameRoundRatios {
        median: ratios[lower_middle(ratios.len())],
        min: ratios[0],
        max: ratios[ratios.len() - 1],
        pairs: ratios.len(),
    })
}

/// The ratio of CPU totals for the floor target's line: with several rounds, the median
/// over the rounds that have one (the lower middle one for an even count) and how many
/// those were; empty when no round has one.
fn cpu_ratio_note(c: &ConfigResult) -> String {
    if c.every_round.len() < 2 {
        return c.cpu_ratio_of_totals().map_or_else(String::new, |r| {
            format!(" (CPU per vote, floor ÷ aggregator: {r:.2})")
        });
    }
    let mut ratios: Vec<f64> = c
        .every_round
        .iter()
        .filter_map(|r| r.cpu_ratio_of_totals)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let Some(median) = ratios.get(lower_middle(ratios.len())) else {
        return String::new();
    };
    format!(
        " (CPU per vote, floor ÷ aggregator, median of {} of {} rounds: {median:.2})",
        ratios.len(),
        c.every_round.len()
    )
}

#[cfg(test)]
mod tests {
    use super::{SameRoundRatios, same_round_ratios};
    use crate::load::{ConfigResult, RoundFigures};

    /// A configuration whose rounds counted `rates` votes/s, reported as its round
    /// `reported`.
    fn rounds(rates: &[f64], reported: usize) -> ConfigResult {
        let every_round = rates
            .iter()
            .map(|&v| {
                serde_json::from_value::<RoundFigures>(serde_json::json!({
                    "votes_per_second": v, "floor_votes_per_second": 100.0,
                    "ratio_to_floor": v / 100.0, "cpu_ratio_of_totals": null,
                    "machine_busy_share": null, "floor_machine_busy_share": null,
                }))
                .unwrap()
            })
            .collect();
        ConfigResult {
            votes_per_second: rates[reported],
            every_round,
            ..ConfigResult::default()
        }
    }

    #[test]
    fn three_replicas_against_one_are_paired_round_by_round() {
        // Each configuration's reported round is its own median one: 100 against 80 reads
        // as 80 %, while in every round three replicas did 90–110 % of one.
        let one = rounds(&[100.0, 80.0, 120.0, 90.0], 0);
        let three = rounds(&[99.0, 80.0, 108.0, 99.0], 1);
        assert_eq!(
            same_round_ratios(&one, &three),
            Some(SameRoundRatios {
                median: 0.99,
                min: 0.9,
                max: 1.1,
                pairs: 4
            })
        );
        let line = super::scaling_line("classic", 500, &one, &three);
        assert!(
            line == "classic, batch 500: 3 replicas at 99.0 % of 1 replica (median of 4 \
                     same-round pairs, range 90–110 %; the reported rounds: 80 %) (target ≥ 90 %): met",
            "{line}"
        );
    }

    #[test]
    fn the_cost_row_ends_with_context_switches_of_aggregator_and_floor() {
        let c = ConfigResult {
            queue_type: "classic".into(),
            replicas: 3,
            batch_size: 500,
            drain_broker_cpu_seconds_per_1000_votes: Some(0.02),
            drain_database_cpu_seconds_per_1000_votes: Some(0.01),
            drain_aggregator_context_switches_per_1000_votes: Some(412.4),
            ..ConfigResult::default()
        };
        let row = super::cost_row(&c).unwrap();
        assert!(row.ends_with("| 412 / n/a |"), "{row}");
        // A report written before switches were counted reads them as not measured.
        let old: RoundFigures = serde_json::from_str(
            r#"{"votes_per_second":1.0,"floor_votes_per_second":1.0,"ratio_to_floor":1.0,
                "cpu_ratio_of_totals":null,"machine_busy_share":null,"floor_machine_busy_share":null}"#,
        )
        .unwrap();
        assert_eq!(
            super::switches(old.context_switches_per_1000_votes),
            "n/a / n/a"
        );
    }

    #[test]
    fn one_round_has_no_pairs_to_take() {
        assert_eq!(
            same_round_ratios(&rounds(&[100.0], 0), &rounds(&[90.0], 0)),
            None
        );
    }
}
