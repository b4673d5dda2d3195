//! How far a republish is: a bar redrawn in place when stderr is a
//! terminal, a log line every few seconds otherwise. The total comes from a
//! count that runs beside the republish; until it is known (or if it fails)
//! the bar shows what was sent without a share.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(250);
/// How often a progress line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Width of the bar, in characters.
const WIDTH: usize = 30;

/// Whether a bar line is on the terminal now (a log line clears it first).
static DRAWN: AtomicBool = AtomicBool::new(false);

/// Clears the bar's line, if one is drawn, so that what is written next
/// (a log line) starts on a clean line; the next redraw puts the bar back.
/// The binary's log writer calls it before every line.
pub fn clear() {
    if DRAWN.swap(false, Ordering::Relaxed) {
        let _ = std::io::stderr().write_all(b"\r\x1b[2K");
    }
}

pub(super) struct Progress {
    terminal: bool,
    started: Instant,
    shown: Instant,
    total: Option<u64>,
    counting: Option<oneshot::Receiver<u64>>,
}

impl Progress {
    /// `total` answers with the selection's size when counted.
    pub(super) fn new(total: oneshot::Receiver<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            started: now,
            shown: now,
            total: None,
            counting: Some(total),
        }
    }

    /// Shows `sent` when it is time to; `reached`: the `created_at` of the
    /// event stored last.
    pub(super) fn tick(&mut self, sent: u64, duplicates: u64, reached: &str) {
        let every = if self.terminal { DRAW_EVERY } else { LOG_EVERY };
        if self.shown.elapsed() < every {
            return;
        }
        self.shown = Instant::now();
        if let Some(counting) = &mut self.counting {
            match counting.try_recv() {
                Ok(total) => {
                    self.total = Some(total);
                    self.counting = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => self.counting = None,
            }
        }
        let rate = sent as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        if self.terminal {
            let line = bar(sent, self.total, rate);
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K{line}");
            let _ = stderr.flush();
            DRAWN.store(true, Ordering::Relaxed);
        } else {
            tracing::info!(
                sent,
                total = self.total,
                duplicates,
                rate = rate.round(),
                reached,
                "republishing"
            );
        }
    }

    /// Takes the bar off the terminal: the summary follows.
    pub(super) fn finish(&self) {
        clear();
    }
}

/// `[#########.....................]  30%  30,000 of 100,000 events, 12,000/s, 6 s left`
fn bar(sent: u64, total: Option<u64>, rate: f64) -> String {
    let rate_text = format!("{}/s", thousands(rate.round() as u64));
    match total {
        Some(total) if total > 0 => {
            let share = (sent as f64 / total as f64).min(1.0);
            let filled = (share * WIDTH as f64).round() as usize;
            let left = total.saturating_sub(sent) as f64 / rate.max(1.0);
            format!(
                "[{}{}] {:>3}%  {} of {} events, {rate_text}, {:.0} s left",
                "#".repeat(filled),
                ".".repeat(WIDTH - filled),
                (share * 100.0).floor(),
                thousands(sent),
                thousands(total),
                left.ceil()
            )
        }
        _ => format!("{} events, {rate_text}", thousands(sent)),
    }
}

/// 1234567 → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn the_bar_fills_with_the_share_sent() {
        assert_eq!(
            bar(30_000, Some(100_000), 12_000.0),
            "[#########.....................]  30%  30,000 of 100,000 events, 12,000/s, 6 s left"
        );
        assert_eq!(
            bar(100_000, Some(100_000), 5_000.0),
            "[##############################] 100%  100,000 of 100,000 events, 5,000/s, 0 s left"
        );
        // Copies counted again (a rerun) never draw past the end.
        assert!(bar(120, Some(100), 10.0).starts_with("[##############################] 100%"));
    }

    #[test]
    fn without_a_total_the_bar_shows_what_was_sent() {
        assert_eq!(bar(4_200, None, 1_050.4), "4,200 events, 1,050/s");
        assert_eq!(bar(0, Some(0), 0.0), "0 events, 0/s");
    }
}
