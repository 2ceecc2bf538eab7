//! `oncepay-load`: a load test of oncepay's create-payment path that is also a correctness check.
//!
//! It creates payments from `--concurrency` connections for `--duration`; a `--retry-ratio` of
//! the requests re-send an earlier key with the same body, as a client does after a timeout, and a
//! `--mismatch-ratio` re-send one with another amount. Every answer is checked (`check`): each
//! key's 201s are byte-identical, exactly one of them is an execution and the rest are replays,
//! and a reused key gets 422. Then (`verify`) the server must hold exactly one payment per created
//! key and balances that match the ledger and the points the 201s promised. The report
//! (`report`) gives throughput, latency, statuses and the verdict; the exit code is 1 on any
//! violation.
//!
//! ```sh
//! oncepay-load --url http://127.0.0.1:8080 --api-key sk_test_demo \
//!     --concurrency 32 --duration 10s --retry-ratio 0.2 --mismatch-ratio 0.02 --report run.md
//! ```
//!
//! Layout: `drive` (the workers and the request mix), `check` (the verdict from the answers),
//! `verify` (the verdict from the server's state), `violation` (what they find), `report`
//! (statistics and markdown).

mod check;
mod drive;
mod report;
mod verify;
mod violation;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use reqwest::{Client, Url};

use crate::report::Report;

/// How long one request may take before the client gives up on it; well past the server's
/// default in-flight wait (2 s), so a waiting duplicate is never cut off.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on the flags, so that a typo cannot start a run that never ends or opens thousands of
/// connections.
const CONCURRENCY_MAX: usize = 1024;
const DURATION_MAX: Duration = Duration::from_secs(3600);
const CUSTOMERS_MAX: usize = 100;

/// Exit code when the run could not be made or checked at all, as opposed to a violation (1).
const EXIT_SETUP_FAILED: u8 = 2;

/// Load oncepay's create-payment path and check that no retry charged twice.
#[derive(Debug, Parser)]
#[command(name = "oncepay-load", version)]
struct Args {
    /// Base URL of the server; only loopback hosts are accepted.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: Url,

    /// API key of the tenant the payments are made for.
    #[arg(
        long,
        env = "ONCEPAY_LOAD_API_KEY",
        default_value = "sk_test_demo",
        hide_env_values = true
    )]
    api_key: String,

    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=CONCURRENCY_MAX as u64))]
    concurrency: u64,

    /// How long to send requests, e.g. `500ms`, `10s`, `2m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Fraction of requests that re-send an earlier key with the same body.
    #[arg(long, default_value_t = 0.1, value_parser = parse_ratio)]
    retry_ratio: f64,

    /// Fraction of requests that re-send an earlier key with another amount (expects 422).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    mismatch_ratio: f64,

    /// How many customers the payments are spread over (their rewards are checked).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=CUSTOMERS_MAX as u64))]
    customers: u64,

    /// Look up at most this many created keys on the server (a random sample beyond it); each
    /// lookup is a list query, which some stores answer by scanning the tenant's payments.
    #[arg(long, default_value_t = 5_000)]
    verify_keys_max: usize,

    /// Skip the checks against the server's state after the run.
    #[arg(long)]
    no_verify: bool,

    /// Also write the report to this markdown file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("oncepay-load: {message}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}

/// Runs the load, the checks and the report; `Ok(passed)` unless something could not be done.
async fn run(args: Args) -> Result<bool, String> {
    if args.retry_ratio + args.mismatch_ratio > 1.0 {
        return Err("--retry-ratio plus --mismatch-ratio must be at most 1".into());
    }
    let base_url = loopback_base(&args.url)?;
    let client = http_client(args.concurrency as usize)?;
    let plan = plan(&args, &base_url)?;
    let customer_ids = plan.customer_ids.clone();

    let outcome = drive::run(client.clone(), plan).await;
    let verdict = outcome.ledger.finish();
    let mut findings = verdict.findings;
    let verified = if args.no_verify {
        None
    } else {
        let api_key = args.api_key.as_str().into();
        let server = verify::Server {
            client,
            base_url: base_url.clone(),
            api_key,
        };
        let checked = verify::verify(
            &server,
            &verdict.payments,
            verdict.uncertain_keys,
            &customer_ids,
            args.verify_keys_max,
            &mut findings,
        );
        Some(checked.await?)
    };

    let report = Report {
        target: base_url.as_str(),
        concurrency: args.concurrency as usize,
        elapsed: outcome.elapsed,
        stats: outcome.stats,
        keys: verdict.keys,
        uncertain_keys: verdict.uncertain_keys,
        verified,
        findings: &findings,
    };
    let passed = report.passed();
    let text = report.render();
    print!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text).map_err(|err| format!("{}: {err}", path.display()))?;
    }
    Ok(passed)
}

/// What to send, with a key prefix and customer ids that no earlier run used, so that runs
/// against one database never share keys or balances.
fn plan(args: &Args, base_url: &Url) -> Result<drive::Plan, String> {
    let run_id = format!("{:016x}", rand::random::<u64>());
    Ok(drive::Plan {
        payments_url: base_url
            .join("v1/payments")
            .map_err(|err| err.to_string())?,
        api_key: args.api_key.clone(),
        concurrency: args.concurrency as usize,
        duration: args.duration,
        retry_ratio: args.retry_ratio,
        mismatch_ratio: args.mismatch_ratio,
        customer_ids: (0..args.customers)
            .map(|i| format!("cus_load_{run_id}_{i}"))
            .collect(),
        key_prefix: format!("load-{run_id}"),
    })
}

/// The base URL with a trailing slash (so paths join under it), if its host is this machine.
///
/// A load generator aimed at a shared server by mistake would create thousands of payments
/// there, so only loopback hosts are accepted.
fn loopback_base(url: &Url) -> Result<Url, String> {
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback || url.scheme() != "http" {
        return Err(format!(
            "{url}: only http:// on localhost or a loopback address"
        ));
    }
    let mut base = url.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    Ok(base)
}

/// One client for the whole run; its pool keeps a connection per worker alive between requests.
fn http_client(concurrency: usize) -> Result<Client, String> {
    Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(concurrency)
        .build()
        .map_err(|err| err.to_string())
}

/// Parses `250ms`, `10s`, `2m` or `1h` into a duration of at most [`DURATION_MAX`].
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: expected e.g. 10s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(count),
        "s" => Duration::from_secs(count),
        "m" => Duration::from_secs(count.saturating_mul(60)),
        "h" => Duration::from_secs(count.saturating_mul(3600)),
        _ => return Err(format!("`{text}`: the unit must be ms, s, m or h")),
    };
    if duration.is_zero() || duration > DURATION_MAX {
        return Err(format!("`{text}`: must be more than 0 and at most 1h"));
    }
    Ok(duration)
}

/// Parses a fraction from 0 to 1.
fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("`{text}`: expected a number from 0 to 1")),
    }
}
