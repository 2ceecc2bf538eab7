//! The client's errors: each variant says how much is known about what the server did.
//!
//! A variant's message leaves out its cause; walk [`std::error::Error::source`] for the chain.

use oncepay_core::wire::Problem;
use thiserror::Error;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The API answered with a definitive error; retrying the same request gets the same answer.
    #[error("the API answered {status} {}: {}", problem.code, problem.detail)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The problem document, whose `code` is stable; boxed to keep `Result`s small.
        problem: Box<Problem>,
    },

    /// A mutating call gave up after an attempt that may have reached the server: it may or may
    /// not have executed. Retry with the same key, or ask [`crate::Client::resolve_payment`].
    #[error("the outcome is unknown; the idempotency key {idempotency_key} finds it")]
    OutcomeUnknown {
        /// The key every attempt was sent with.
        idempotency_key: String,
        /// What the last attempt ran into.
        #[source]
        last_error: Box<Error>,
    },

    /// No answer came: the connection failed or timed out.
    #[error("no answer from the server")]
    Transport(#[source] reqwest::Error),

    /// The server answered with something that is not part of the contract.
    #[error("unexpected response with status {status}: {message}")]
    UnexpectedResponse {
        /// The HTTP status.
        status: u16,
        /// What could not be understood.
        message: String,
    },

    /// An argument cannot be sent, such as a malformed idempotency key or base URL.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The problem's stable code, for an [`Error::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { problem, .. } => Some(&problem.code),
            _ => None,
        }
    }
}
