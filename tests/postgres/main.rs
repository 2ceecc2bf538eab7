//! The PostgreSQL store, alone and under several real `oncepay serve` processes.
//!
//! Each test creates its own database on the server named by `ONCEPAY_TEST_PG_URL` (by default
//! `postgres://postgres@127.0.0.1:5432/test`, trust authentication) and drops it at the end. A
//! server that cannot be reached fails the tests: they never skip.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod outage;
mod processes;
mod store;
