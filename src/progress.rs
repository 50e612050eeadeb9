//! Delivery progress per definition: done / total, rate and ETA, logged every few seconds and, on a
//! terminal, drawn as one progress bar per definition.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use tracing::info;

/// How often progress is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

struct Counts {
    started: Instant,
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
}

pub struct Progress {
    definitions: Mutex<BTreeMap<String, Counts>>,
    /// Bars replace the periodic log lines on a terminal.
    drawing: bool,
    _bars: Option<MultiProgress>,
}

impl Progress {
    /// Counts what the outbox holds for the drained definitions (all when `None`).
    pub async fn load(pool: &PgPool, only: Option<&[String]>) -> Result<Self, sqlx::Error> {
        let totals: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT {}, count(*) FROM outbox \
             WHERE ($1::text[] IS NULL OR definition_key = ANY($1)) GROUP BY 1 ORDER BY 1",
            crate::outbox::FAMILY_SQL
        ))
        .bind(only)
        .fetch_all(pool)
        .await?;
        Ok(Self::new(totals, std::io::stderr().is_terminal()))
    }

    pub fn new(totals: Vec<(String, i64)>, draw_bars: bool) -> Self {
        let bars = draw_bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let style = ProgressStyle::with_template(
            "{prefix:30} [{bar:30}] {human_pos}/{human_len}, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let definitions = totals
            .into_iter()
            .map(|(key, total)| {
                let bar = bars.as_ref().map(|bars| {
                    let bar = bars.add(ProgressBar::new(total as u64));
                    bar.set_style(style.clone());
                    bar.set_prefix(key.clone());
                    bar
                });
                (
                    key,
                    Counts {
                        started: Instant::now(),
                        total: total as u64,
                        done: 0,
                        bar,
                    },
                )
            })
            .collect();
        Self {
            definitions: Mutex::new(definitions),
            drawing: bars.is_some(),
            _bars: bars,
        }
    }

    /// Starts (or restarts) following a definition with `total` changes to deliver.
    pub fn track(&self, key: &str, total: u64) {
        self.definitions.lock().expect("not poisoned").insert(
            key.to_owned(),
            Counts {
                started: Instant::now(),
                total,
                done: 0,
                bar: None,
            },
        );
    }

    /// Stops following a definition.
    pub fn forget(&self, key: &str) {
        self.definitions.lock().expect("not poisoned").remove(key);
    }

    /// Counts changes settled (acknowledged or rejected) for a definition.
    pub fn record(&self, key: &str, settled: u64) {
        let mut definitions = self.definitions.lock().expect("not poisoned");
        if let Some(counts) = definitions.get_mut(key) {
            counts.done = (counts.done + settled).min(counts.total);
            if let Some(bar) = &counts.bar {
                bar.set_position(counts.done);
            }
        }
    }

    /// (key, done, total) for each definition.
    pub fn snapshot(&self) -> Vec<(String, u64, u64)> {
        self.definitions
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(key, counts)| (key.clone(), counts.done, counts.total))
            .collect()
    }

    /// Seconds each definition has been followed, for rates.
    fn elapsed(&self, key: &str) -> f64 {
        self.definitions
            .lock()
            .expect("not poisoned")
            .get(key)
            .map(|counts| counts.started.elapsed().as_secs_f64())
            .unwrap_or(0.0)
            .max(0.001)
    }

    /// Logs one line per definition still in progress (not when bars are drawn).
    pub fn log(&self) {
        if self.drawing {
            return;
        }
        for (key, done, total) in self.snapshot() {
            if done >= total {
                continue;
            }
            let rate = done as f64 / self.elapsed(&key);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (total - done) as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            info!(
                definition = %key,
                done,
                total,
                rate_per_second = rate.round() as u64,
                eta = %eta,
                "Delivery progress."
            );
        }
    }

    /// Removes the bars from the terminal.
    pub fn finish(&self) {
        for counts in self.definitions.lock().expect("not poisoned").values() {
            if let Some(bar) = &counts.bar {
                bar.finish_and_clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_changes_add_up_per_definition_and_never_pass_the_total() {
        let progress = Progress::new(vec![("a".into(), 10), ("b".into(), 3)], false);
        progress.record("a", 4);
        progress.record("b", 5);
        progress.record("unknown", 1);
        assert_eq!(
            progress.snapshot(),
            vec![("a".into(), 4, 10), ("b".into(), 3, 3)]
        );
    }
}
