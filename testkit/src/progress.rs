//! Progress reporting for long runs: a bar (indicatif) on a terminal, a plain line every
//! few seconds elsewhere (CI logs), nothing when disabled.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A shareable progress reporter.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

enum Inner {
    Off,
    Bar(ProgressBar),
    Lines {
        label: String,
        total: u64,
        started: Instant,
        last: Mutex<Instant>,
    },
}

const LINE_EVERY: Duration = Duration::from_secs(3);

impl Progress {
    /// A reporter for `total` items, labelled `label`.
    pub fn new(label: &str, total: u64, enabled: bool) -> Self {
        let inner = if !enabled {
            Inner::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.to_string());
            Inner::Bar(bar)
        } else {
            Inner::Lines {
                label: label.to_string(),
                total,
                started: Instant::now(),
                last: Mutex::new(Instant::now()),
            }
        };
        Progress {
            inner: Arc::new(inner),
        }
    }

    /// Reports `done` items finished.
    pub fn set(&self, done: u64) {
        match &*self.inner {
            Inner::Off => {}
            Inner::Bar(bar) => bar.set_position(done),
            Inner::Lines {
                label,
                total,
                started,
                last,
            } => {
                let Ok(mut last) = last.lock() else { return };
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                    eprintln!("{label}: {done}/{total} ({rate:.0}/s)");
                }
            }
        }
    }

    /// Ends the report at `done`.
    pub fn finish(&self, done: u64) {
        match &*self.inner {
            Inner::Off => {}
            Inner::Bar(bar) => {
                bar.set_position(done);
                bar.finish();
            }
            Inner::Lines {
                label,
                total,
                started,
                ..
            } => {
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "{label}: {done}/{total} in {secs:.1}s ({:.0}/s)",
                    done as f64 / secs.max(0.001)
                );
            }
        }
    }
}
