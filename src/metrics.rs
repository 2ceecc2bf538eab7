//! Prometheus metrics: idempotency outcomes and request latency, with bounded label sets.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What the idempotency layer did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First execution, outcome stored.
    Executed,
    /// A stored response was replayed.
    Replayed,
    /// 409: the original was still running after the wait.
    Conflict,
    /// 422: the key was reused with another payload.
    Mismatch,
    /// 422: the key was past its retention.
    Expired,
    /// An expired lease was taken over.
    Takeover,
    /// A commit was refused because the lease had been taken over.
    Fenced,
    /// The key was released after a non-final answer.
    Released,
    /// The store could not be reached.
    StoreUnavailable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Expired => "expired",
            Self::Takeover => "takeover",
            Self::Fenced => "fenced",
            Self::Released => "released",
            Self::StoreUnavailable => "store_unavailable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The matched route template, never the raw path, so ids cannot explode the label set.
    route: String,
    status: u16,
}

type LatencyFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The service's metrics and their registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    outcomes: Family<OutcomeLabels, Counter>,
    latency: LatencyFamily,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. about 8 s, doubling.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("oncepay");
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "idempotency_outcomes",
            "Requests by what the idempotency layer did with them",
            outcomes.clone(),
        );
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Request latency by method, route template and status",
            latency.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            outcomes,
            latency,
        }
    }
}

impl Metrics {
    /// Counts one idempotency outcome.
    pub fn idempotency(&self, outcome: Outcome) {
        let labels = OutcomeLabels {
            outcome: outcome.label(),
        };
        self.outcomes.get_or_create(&labels).inc();
    }

    /// Records one request's latency.
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels = RequestLabels {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        };
        self.latency.get_or_create(&labels).observe(seconds);
    }

    /// How many times `outcome` was counted (for tests).
    pub fn outcome_count(&self, outcome: Outcome) -> u64 {
        let labels = OutcomeLabels {
            outcome: outcome.label(),
        };
        self.outcomes.get_or_create(&labels).get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}
