//! Progress reports for long steps (tokenizing a corpus, evaluating a length): a bar redrawn in
//! place when stderr is a terminal, a few plain lines otherwise (logs, CI, scripts).

use crate::util::say_err;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress report over `total` units of work, written to stderr.
pub struct ProgressBar {
    label: String,
    total: usize,
    done: usize,
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    last_quarter: usize,
}

impl ProgressBar {
    /// Starts a report; `label` says what is being done.
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Self {
            label: label.into(),
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last_draw: None,
            last_quarter: 0,
        }
    }

    /// Records `n` more units of work.
    pub fn inc(&mut self, n: usize) {
        self.done += n;
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || self.done >= self.total {
                self.draw();
            }
        } else if let Some(quarter) = (4 * self.done).checked_div(self.total) {
            // Without a terminal: one line per quarter of the work.
            if quarter > self.last_quarter && quarter < 4 {
                self.last_quarter = quarter;
                say_err!(
                    "{}: {}/{} ({:.0}s)",
                    self.label,
                    self.done,
                    self.total,
                    self.start.elapsed().as_secs_f64()
                );
            }
        }
    }

    fn draw(&mut self) {
        const WIDTH: usize = 30;
        let filled = (WIDTH * self.done)
            .checked_div(self.total)
            .unwrap_or(WIDTH)
            .min(WIDTH);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {}/{} {:.1}s",
            self.label,
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
    }

    /// Ends the report with a final line.
    pub fn finish(mut self) {
        if self.tty {
            self.draw();
            say_err!();
        } else {
            say_err!(
                "{}: {}/{} done in {:.1}s",
                self.label,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
