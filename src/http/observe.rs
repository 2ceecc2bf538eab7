//! Request ids, the per-request tracing span, the request log line and latency metrics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::AppState;
use super::problem::InternalCause;
use crate::ids::new_id;

/// The header carrying the request id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest client-sent request id echoed back.
pub const REQUEST_ID_CHARS_MAX: usize = 128;

/// Whether a client-sent request id is safe to echo and log.
fn is_sane_request_id(id: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    (1..=REQUEST_ID_CHARS_MAX).contains(&id.len()) && id.chars().all(allowed)
}

/// Middleware: assigns the request id, opens the request span, logs and measures the request.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_sane_request_id(id))
        .map_or_else(|| new_id("req"), str::to_owned);
    let method = request.method().clone();
    let span = tracing::debug_span!(
        "request",
        request_id = %request_id,
        method = %method,
        matched_path = tracing::field::Empty,
        tenant = tracing::field::Empty,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let route = match response.extensions().get::<MatchedRoute>() {
        Some(MatchedRoute(route)) => route.as_str(),
        None => "unmatched",
    };
    span.record("matched_path", route);
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .request(method.as_str(), route, status, seconds);
    span.in_scope(|| match response.extensions().get::<InternalCause>() {
        Some(InternalCause(cause)) => tracing::error!(status, cause = %cause, "request failed"),
        None => tracing::debug!(status, latency_ms = seconds * 1000.0, "request done"),
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The route template a response was produced by, for the request log and metrics.
#[derive(Clone, Debug)]
pub struct MatchedRoute(pub String);

/// Route middleware: tags the response with the matched route template, which the outer
/// [`observe`] cannot see because it runs before routing.
pub async fn tag_route(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        let route = MatchedRoute(matched.as_str().to_owned());
        response.extensions_mut().insert(route);
    }
    response
}
