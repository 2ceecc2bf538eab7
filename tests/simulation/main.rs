//! Deterministic simulation: the real router over turmoil's simulated network, on a SQLite file
//! that outlives the simulated process.
//!
//! Each test runs many seeds. A seed fixes the network's latencies and losses and the moments
//! at which the test crashes the server or cuts a link, so a failure names its seed and
//! `SIM_SEED=<seed>` replays that run alone; `SIM_SEEDS=<n>` runs more. The server host opens
//! its store inside the host's start-up closure, so `Sim::crash` loses everything the process
//! held in memory while the database file stays, and `Sim::bounce` starts a fresh process on it.
//! Every scenario then checks the one promise of the service twice, in the database itself and
//! through the API: one payment per key, and every success for a key byte-identical.
//!
//! Time: leases are judged by the store's clock, which the driver moves forward by exactly one
//! tick per simulation step, so it agrees with the hosts' simulated tokio time. The disk takes
//! no simulated time (see [`host::InstantDisk`]).
//!
//! What this layer cannot see: races inside the store, because each store call finishes before
//! simulated time moves on and claims made in one tick share a claim time; and an owner that
//! outlives its lease, because one live process on an embedded store always renews it. The
//! linearizability tests and the loom models look for those.

mod chaos;
mod client;
mod driver;
mod host;
mod scenarios;

use std::time::Duration;

use oncepay_core::time::Timestamp;

const SERVER: &str = "server";
const PORT: u16 = 8080;
const API_KEY: &str = "sk_test_acme";
const P1: &str = r#"{"amount": 1250, "currency": "EUR", "customer_id": "cus_001"}"#;
const P2: &str = r#"{"amount": 1251, "currency": "EUR", "customer_id": "cus_001"}"#;
/// 2026-12-04T10:00:00Z: a fixed start, so timestamps do not depend on the host's clock.
const EPOCH: Timestamp = Timestamp(1_796_378_400_000);
/// One simulation step; also the resolution of the store's clock.
const TICK: Duration = Duration::from_millis(1);
/// Short, so a crashed owner's key frees up after a couple of simulated seconds.
const LEASE: Duration = Duration::from_secs(2);
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(1);
/// How long a client waits for one answer before it gives up on the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Enough attempts to outlast a lease, a restart and a few lost connections.
const ATTEMPTS_MAX: usize = 60;
/// A hard stop for one run in simulated time; every scenario settles far sooner.
const SIM_DURATION_MAX: Duration = Duration::from_secs(900);
const SEEDS_DEFAULT: u64 = 30;

/// The seeds to run: `SIM_SEED` alone when set, else `0..SIM_SEEDS`.
fn seeds() -> Vec<u64> {
    let number = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    match number("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..number("SIM_SEEDS").unwrap_or(SEEDS_DEFAULT)).collect(),
    }
}

fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::new("debug,turmoil=info");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}
