//! Fault injection: the `Oncepay-Fault` header, honoured only when the server was started with
//! `--enable-fault-injection`.
//!
//! Tests use it to stop a request at a precise point: after its key is claimed, before its
//! outcome commits, or after it committed but before the response leaves.

use std::time::Duration;

use axum::http::HeaderMap;

use super::problem::ApiError;

/// The request header that carries fault instructions.
pub const FAULT_HEADER: &str = "oncepay-fault";

/// The longest delay a fault may ask for: long enough for any lease test, short enough that a
/// typo cannot park a request for hours.
pub const DELAY_MAX: Duration = Duration::from_secs(120);

/// Where in a request a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The key is claimed; nothing has executed.
    AfterClaim,
    /// The side effect is prepared but not committed.
    BeforeCommit,
    /// The outcome committed; the response is not sent yet.
    AfterCommit,
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Sleep, then carry on.
    Delay(Duration),
    /// Answer 500 at that point.
    Fail,
    /// Abort the whole process at once.
    Crash,
    /// Close the connection without a response (after commit only).
    Drop,
}

/// The faults requested for one request.
#[derive(Clone, Debug, Default)]
pub struct Faults(Vec<(Point, Action)>);

impl Faults {
    /// Reads the fault header; unknown points or actions are a 400 so tests fail loudly.
    ///
    /// # Errors
    ///
    /// [`ApiError::InvalidRequest`] naming the header when it cannot be parsed.
    pub fn from_headers(headers: &HeaderMap, enabled: bool) -> Result<Self, ApiError> {
        let Some(value) = headers.get(FAULT_HEADER).filter(|_| enabled) else {
            return Ok(Self::default());
        };
        let bad = |what: &str| ApiError::invalid_field("Oncepay-Fault", what.to_owned());
        let text = value.to_str().map_err(|_| bad("the header is not ASCII"))?;
        let mut faults = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (point, action) = item
                .split_once('=')
                .ok_or_else(|| bad("expected point=action"))?;
            let point = match point.trim() {
                "after_claim" => Point::AfterClaim,
                "before_commit" => Point::BeforeCommit,
                "after_commit" => Point::AfterCommit,
                _ => return Err(bad("unknown fault point")),
            };
            let action = parse_action(action.trim()).ok_or_else(|| bad("unknown fault action"))?;
            if action == Action::Drop && point != Point::AfterCommit {
                return Err(bad("drop is only possible after_commit"));
            }
            faults.push((point, action));
        }
        Ok(Self(faults))
    }

    /// Fires the fault set for `point`, if any.
    ///
    /// # Errors
    ///
    /// [`ApiError::Internal`] for `fail`. `crash` and `drop` never return.
    pub async fn fire(&self, point: Point) -> Result<(), ApiError> {
        for (at, action) in &self.0 {
            if *at != point {
                continue;
            }
            match action {
                Action::Delay(duration) => tokio::time::sleep(*duration).await,
                Action::Fail => {
                    return Err(ApiError::Internal(format!("injected failure at {point:?}")));
                }
                Action::Crash => {
                    tracing::warn!(?point, "injected crash: aborting the process");
                    std::process::abort();
                }
                Action::Drop => {
                    // Unwinding out of the connection task closes the connection with no
                    // response; `resume_unwind` skips the panic hook, so nothing is printed.
                    std::panic::resume_unwind(Box::new("injected connection drop"));
                }
            }
        }
        Ok(())
    }
}

fn parse_action(text: &str) -> Option<Action> {
    match text {
        "fail" => Some(Action::Fail),
        "crash" => Some(Action::Crash),
        "drop" => Some(Action::Drop),
        _ => {
            let ms: u64 = text.strip_prefix("delay:")?.parse().ok()?;
            Some(Action::Delay(Duration::from_millis(ms).min(DELAY_MAX)))
        }
    }
}
