//! Command-line flags and environment variables of `oncepay serve` and `oncepay migrate`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use oncepay_core::engine::{self, Policy};

use crate::http::idempotency::{IdempotencyConfig, MAX_BODY_BYTES_DEFAULT, POLL_INTERVAL_DEFAULT};
use crate::store::postgres::POOL_SIZE_DEFAULT;

/// The database used when none is given: a SQLite file in the working directory.
pub const DATABASE_DEFAULT: &str = "sqlite://oncepay.db";

/// Settings of `oncepay serve`; each flag is also `ONCEPAY_<NAME>` in the environment.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "ONCEPAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// API keys as comma-separated tenant:key pairs; without it one demo tenant is served.
    #[arg(long, env = "ONCEPAY_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// How long an in-flight request owns its key before a retry may take over (at least 1s).
    #[arg(long, env = "ONCEPAY_LEASE", default_value = "30s", value_parser = parse_lease)]
    pub lease: Duration,

    /// How long a duplicate waits for the running original before answering 409.
    #[arg(long, env = "ONCEPAY_IN_FLIGHT_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub in_flight_wait: Duration,

    /// How long completed responses are replayed.
    #[arg(long, env = "ONCEPAY_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// How long a tombstone refuses late retries after retention (30 days by default).
    #[arg(long, env = "ONCEPAY_TOMBSTONE_RETENTION", default_value = "720h", value_parser = parse_duration)]
    pub tombstone_retention: Duration,

    /// The largest request body in bytes.
    #[arg(long, env = "ONCEPAY_MAX_BODY", default_value_t = MAX_BODY_BYTES_DEFAULT)]
    pub max_body: usize,

    /// How often the retention sweeper runs.
    #[arg(long, env = "ONCEPAY_SWEEP_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Honour the Oncepay-Fault request header (for tests; never in production).
    #[arg(long, env = "ONCEPAY_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,

    /// Log format: text or json.
    #[arg(long, env = "ONCEPAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Where the data lives.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// `sqlite://PATH` (created if missing), `postgres://...` or `memory://`.
    #[arg(long, env = "ONCEPAY_DATABASE", default_value = DATABASE_DEFAULT)]
    pub database: String,

    /// PostgreSQL only: do not create or upgrade the schema at start-up, refuse to start unless
    /// it is current (run `oncepay migrate` first). Ignored by `oncepay migrate`.
    #[arg(long, env = "ONCEPAY_NO_MIGRATE")]
    pub no_migrate: bool,

    /// PostgreSQL only: the most connections this process holds open at once.
    #[arg(long, env = "ONCEPAY_DB_POOL_SIZE", default_value_t = POOL_SIZE_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
}

impl ServeArgs {
    /// The state machine's time limits.
    pub fn policy(&self) -> Policy {
        Policy {
            lease: self.lease,
            retention: self.retention,
            tombstone_retention: self.tombstone_retention,
        }
    }

    /// The idempotency layer's settings.
    pub fn idempotency(&self) -> IdempotencyConfig {
        IdempotencyConfig {
            in_flight_wait: self.in_flight_wait,
            poll_interval: POLL_INTERVAL_DEFAULT,
            max_body_bytes: self.max_body,
            faults_enabled: self.enable_fault_injection,
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `24h` or `30d`.
///
/// # Errors
///
/// A message for a missing unit or number.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 30s, 5m or 24h"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}` needs a unit: ms, s, m, h or d")),
    };
    Ok(Duration::from_millis(
        number.saturating_mul(millis_per_unit),
    ))
}

fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < engine::LEASE_MIN {
        return Err("the lease must be at least 1s".into());
    }
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_ms_s_m_h_and_d() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_lease("500ms").is_err());
    }
}
