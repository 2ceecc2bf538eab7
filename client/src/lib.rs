//! The Rust client of the oncepay API: typed calls whose retries never charge twice.
//!
//! Every mutating call carries an idempotency key, generated per operation unless the caller
//! brings one, and every retry of that operation reuses it, so the server executes it at most
//! once. Retries follow exponential backoff with full jitter inside a per-call deadline, honour
//! `Retry-After`, and draw on a retry budget shared by the whole client. When a payment call
//! gives up without knowing whether it executed, it says so ([`Error::OutcomeUnknown`], with
//! the key) and [`Client::resolve_payment`] finds the truth later.
//!
//! ```no_run
//! use oncepay_client::Client;
//! use oncepay_client::wire::{CreatePayment, MinorUnits};
//!
//! # async fn demo() -> Result<(), oncepay_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8080", "sk_test_demo").build()?;
//! let request = CreatePayment {
//!     amount: MinorUnits(1250),
//!     currency: "EUR".into(),
//!     customer_id: "cus_001".into(),
//!     description: None,
//!     metadata: Default::default(),
//! };
//! let payment = client.create_payment(&request, None).await?;
//! println!("{} {:?}", payment.id, payment.status);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`client`]: the endpoints and the resolution of unknown outcomes.
//! - [`builder`]: base URL, API key and every retry setting.
//! - [`policy`]: what is retried, and the backoff between attempts.
//! - [`budget`]: the retry token bucket shared by all calls of a client.
//! - `retry`: the loop that runs attempts under the policy, the budget and the deadline.
//! - `attempt`: one HTTP request and the classification of its answer.
//! - [`clock`] and [`random`]: time and randomness as inputs, so tests never sleep.
//! - [`error`]: what a failed call knows about the server's side.

mod attempt;
pub mod budget;
pub mod builder;
pub mod client;
pub mod clock;
pub mod error;
pub mod policy;
pub mod random;
mod retry;

pub use builder::ClientBuilder;
pub use client::{Client, ListPayments, Resolution};
pub use error::Error;
pub use policy::RetryPolicy;

/// The wire types the client sends and receives.
pub use oncepay_core::wire;
