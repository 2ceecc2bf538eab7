//! oncepay: a payments API where a retried request never charges twice.
//!
//! # Layout
//!
//! - `oncepay-core` (the `core/` crate): keys, fingerprints, the idempotency state machine, the
//!   store interface, the in-memory store and the reference model; no I/O, checked by loom.
//! - [`http`]: the axum service, the idempotency tower layer, authentication, errors, faults.
//! - [`store`]: the durable stores (SQLite, PostgreSQL) and opening one from a URL.
//! - [`server`]: wiring a configuration into a running server with its sweeper.
//! - [`config`]: command-line flags and environment variables.
//! - [`metrics`]: Prometheus counters and latency histograms.

pub mod config;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod store;
