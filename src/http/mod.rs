//! The HTTP service: the router, shared state and the middleware stack.
//!
//! Requests pass, outermost first: request id and logging ([`observe`]), authentication
//! ([`auth`], `/v1` only), routing, then the idempotency layer ([`idempotency`]) on `/v1`
//! routes, then the handler.

pub mod auth;
pub mod faults;
pub mod idempotency;
pub mod observe;
mod ops;
mod payments;
pub mod problem;
mod refunds;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};
use oncepay_core::store::Store;
use oncepay_core::time::Clock;
use serde_json::Value;

use crate::metrics::Metrics;
use auth::ApiKeys;
use idempotency::{IdempotencyConfig, IdempotencyLayer};
use problem::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Records and payments.
    pub store: Arc<dyn Store>,
    /// The source of `created_at` timestamps.
    pub clock: Arc<dyn Clock>,
    /// Counters and latency histograms.
    pub metrics: Arc<Metrics>,
    /// The tenants' API key digests.
    pub api_keys: Arc<ApiKeys>,
}

/// The whole service as a router, ready to serve or to drive with `oneshot` in tests.
pub fn app(state: AppState, config: IdempotencyConfig) -> Router {
    let idempotency = IdempotencyLayer::new(state.store.clone(), config, state.metrics.clone())
        .with_validator(Arc::new(validate_body));
    let v1 = Router::new()
        .route("/v1/payments", post(payments::create).get(payments::list))
        .route("/v1/payments/{id}", get(payments::get))
        .route("/v1/payments/{id}/refunds", post(refunds::create))
        .route(
            "/v1/customers/{customer_id}/rewards",
            get(payments::rewards),
        )
        .route("/v1/idempotency-keys/{key}", get(ops::key_status))
        .route_layer(idempotency)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/problems/{code}", get(ops::problem_page))
        .merge(v1)
        .route_layer(middleware::from_fn(observe::tag_route))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// Checks a POST body against its route's schema before the key is claimed.
fn validate_body(route: &str, body: Option<&Value>) -> Result<(), ApiError> {
    let errors = match route {
        "/v1/payments" => match body {
            Some(body) => oncepay_core::validate::create_payment(body).err(),
            None => return Err(ApiError::invalid_field("body", "a JSON body is required")),
        },
        "/v1/payments/{id}/refunds" => oncepay_core::validate::create_refund(body).err(),
        _ => None,
    };
    match errors {
        None => Ok(()),
        Some(errors) => Err(ApiError::InvalidRequest {
            detail: "the request body failed validation".to_owned(),
            errors,
        }),
    }
}
