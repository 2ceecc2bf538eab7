//! Throughput and latency of a run, and the markdown report that carries them with the verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::check::{Answer, Intent};
use crate::violation::Findings;

/// The latency quantiles the report shows.
const QUANTILES: [(&str, f64); 3] = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)];

/// Counts and latencies of the requests one worker (or, merged, a whole run) sent.
#[derive(Debug, Default)]
pub struct Stats {
    /// One entry per answered request; microseconds in a `u32` reach 71 minutes, far beyond any
    /// request timeout, and keep a long run's samples small.
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, u64>,
    failed: u64,
    first: u64,
    retries: u64,
    mismatches: u64,
}

impl Stats {
    /// Counts one request.
    pub fn record(&mut self, intent: Intent, latency: Duration, answer: &Answer) {
        match intent {
            Intent::First => self.first += 1,
            Intent::Retry => self.retries += 1,
            Intent::Mismatch => self.mismatches += 1,
        }
        match answer {
            Answer::Response { status, .. } => {
                *self.statuses.entry(*status).or_default() += 1;
                let latency_us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                self.latencies_us.push(latency_us);
            }
            Answer::Failed => self.failed += 1,
        }
    }

    /// Adds another worker's counts to these.
    pub fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.failed += other.failed;
        self.first += other.first;
        self.retries += other.retries;
        self.mismatches += other.mismatches;
    }

    /// Every request sent, answered or not.
    pub fn requests(&self) -> u64 {
        self.first + self.retries + self.mismatches
    }
}

/// What the server-side checks looked at.
#[derive(Debug, Default)]
pub struct Verified {
    pub keys_created: usize,
    /// All created keys, or a random sample of them.
    pub keys_checked: usize,
    pub customers_checked: usize,
    /// Why the balance-against-201s check was skipped, if it was.
    pub balance_check_skipped: Option<String>,
}

/// Everything the report shows.
pub struct Report<'a> {
    pub target: &'a str,
    pub concurrency: usize,
    pub elapsed: Duration,
    pub stats: Stats,
    pub keys: usize,
    pub uncertain_keys: usize,
    /// `None` when `--no-verify` skipped the server-side checks.
    pub verified: Option<Verified>,
    pub findings: &'a Findings,
}

impl Report<'_> {
    /// Whether the run showed no violation and created at least one payment.
    pub fn passed(&self) -> bool {
        self.findings.count == 0 && self.stats.statuses.contains_key(&201)
    }

    /// The report as markdown.
    pub fn render(mut self) -> String {
        self.stats.latencies_us.sort_unstable();
        let mut out = String::new();
        self.write_load(&mut out);
        self.write_verdict(&mut out);
        out
    }

    fn write_load(&self, out: &mut String) {
        let stats = &self.stats;
        let elapsed_secs = self.elapsed.as_secs_f64();
        let rate = stats.requests() as f64 / elapsed_secs.max(f64::EPSILON);
        let max_us = stats.latencies_us.last().copied().unwrap_or(0);
        let latencies_us = QUANTILES.map(|(_, q)| quantile_us(stats, q));
        let latencies_ms = latencies_us
            .iter()
            .chain([&max_us])
            .map(|us| f64::from(*us) / 1000.0);
        let latency_cells: Vec<String> = latencies_ms.map(|ms| format!("{ms:.2}")).collect();

        let _ = writeln!(out, "## oncepay-load against {}\n", self.target);
        out.push_str("| requests | first | retries | mismatches | seconds | req/s |");
        for (name, _) in QUANTILES {
            let _ = write!(out, " {name} ms |");
        }
        out.push_str(" max ms |\n|---|---|---|---|---|---|---|---|---|---|\n");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {elapsed_secs:.1} | {rate:.0} | {} |\n",
            stats.requests(),
            stats.first,
            stats.retries,
            stats.mismatches,
            latency_cells.join(" | "),
        );

        let statuses: Vec<String> = stats
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "Concurrency {}, {} keys. Statuses: {}; no answer: {}.",
            self.concurrency,
            self.keys,
            statuses.join(", "),
            stats.failed
        );
    }

    fn write_verdict(&self, out: &mut String) {
        match &self.verified {
            Some(verified) => {
                let _ = writeln!(
                    out,
                    "Server checked: {} of {} created keys, {} customers' rewards{}.",
                    verified.keys_checked,
                    verified.keys_created,
                    verified.customers_checked,
                    match &verified.balance_check_skipped {
                        Some(why) => format!(" (balance against 201s skipped: {why})"),
                        None => String::new(),
                    }
                );
            }
            None => out.push_str("Server not checked (--no-verify).\n"),
        }
        if self.uncertain_keys > 0 {
            let _ = writeln!(
                out,
                "Keys with an unknown outcome: {}.",
                self.uncertain_keys
            );
        }
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "\n**Verdict: {verdict}**, {} violations.",
            self.findings.count
        );
        for violation in &self.findings.kept {
            let _ = writeln!(out, "- {violation}");
        }
        let unlisted = self.findings.count - self.findings.kept.len() as u64;
        if unlisted > 0 {
            let _ = writeln!(out, "- ... and {unlisted} more");
        }
        if !self.stats.statuses.contains_key(&201) {
            out.push_str("- no request got a 201: nothing was checked\n");
        }
    }
}

/// The latency below which a fraction `q` of the answered requests fell; the samples must be
/// sorted.
fn quantile_us(stats: &Stats, q: f64) -> u32 {
    let samples = &stats.latencies_us;
    if samples.is_empty() {
        return 0;
    }
    let rank = ((samples.len() as f64) * q).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}
