//! The I/O-free heart of oncepay: everything that decides whether a request may execute.
//!
//! # Layout
//!
//! - [`key`]: the `Idempotency-Key` header value, validated.
//! - [`fingerprint`]: strict JSON parsing, RFC 8785 canonical form, the request digest.
//! - [`engine`]: the state machine over absent / in flight / completed / tombstone, as a total
//!   decision function and the transitions every store applies.
//! - [`store`]: the interface of a store of records and payments, and the refund arithmetic.
//! - [`memory`]: the in-memory store, built on [`sync`] so loom can check it.
//! - [`signals`]: in-process wake-ups for duplicates waiting on an in-flight key.
//! - [`validate`] and [`wire`]: request validation and the JSON shapes shared with the client.
//! - [`model`]: the reference model that property tests hold every store to, and `conformance`
//!   (feature `conformance`): the model as a proptest state machine over any set of stores.
//! - [`time`]: timestamps and the injected clock.
//!
//! The crate has no networking or runtime dependency, so `RUSTFLAGS="--cfg loom"` builds it
//! with loom's primitives swapped in.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod engine;
pub mod fingerprint;
pub mod key;
pub mod memory;
pub mod model;
pub mod signals;
pub mod store;
mod sync;
pub mod time;
pub mod validate;
pub mod wire;

pub use engine::{Begin, Decision, Lease, Policy, Record, RecordState, Scope, StoredResponse};
pub use fingerprint::Fingerprint;
pub use key::IdempotencyKey;
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
