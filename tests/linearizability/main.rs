//! Linearizability: many real clients race the real binary on a SQLite file, every request is
//! recorded, and each key's history must be explainable by one key's sequential specification.
//!
//! The specification, stated here independently of the service's code, is a key that is `Free`,
//! `Held` by a running request, or `Bound` to one body and one response. A request that executes
//! takes the key when it is free and later binds it to its body and its new payment; a replay
//! needs the key bound to its own body and answers exactly the bound response; a 422 needs the
//! key held or bound with another body; a 409 needs it held by a request with the same body, and
//! changes nothing. A request that failed with a 5xx or lost its connection may never have taken
//! the key, or taken it and then given it back or committed an outcome nobody saw; later replays
//! reveal which.
//!
//! The checker is a Wing & Gong search: it looks for one order of the key's requests that keeps
//! real time (a request that returned before another was sent comes first) and that the
//! specification accepts. A failure prints the key's history, one request a line, with its
//! send and return times in milliseconds, so the impossible order can be read off directly.
//! `LIN_ROUNDS=<n>` sets the rounds of fresh keys (default 20); `LIN_SEED` replays a choice of
//! keys, bodies and faults (the interleaving itself is the machine's).

mod binary;
mod checker;
#[path = "../common/mod.rs"]
mod common;
mod history;
