//! The idempotency middleware: a tower [`Layer`] that makes any axum route's `POST` safe to retry.
//!
//! For an unsafe method it validates the `Idempotency-Key`, reads the body within its limit,
//! computes the request fingerprint and asks the store what to do: execute (the key is claimed
//! for this request), replay the stored response, wait for a running duplicate, or refuse. The
//! request then runs in its own task, so a client that hangs up cannot cancel it half-way: it
//! finishes and stores its outcome, and the client's retry gets that outcome.
//!
//! A handler that commits its side effects together with the outcome (as oncepay's do) marks its
//! response [`Committed`]. For any other handler the layer stores a 2xx or 402 response itself
//! after the handler returns, and releases the key for anything else, so a retry executes again.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use axum::{Router, routing::post};
//! # use oncepay::http::idempotency::{IdempotencyConfig, IdempotencyLayer};
//! # use oncepay::metrics::Metrics;
//! # fn build(store: Arc<dyn oncepay_core::store::Store>) -> Router {
//! let layer = IdempotencyLayer::new(store, IdempotencyConfig::default(), Arc::new(Metrics::default()));
//! Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .route_layer(layer)
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use oncepay_core::engine::{Begin, Lease, Scope, StoredResponse};
use oncepay_core::fingerprint::{Fingerprint, RequestShape, parse_json_strict};
use oncepay_core::key::{IdempotencyKey, KeyError};
use oncepay_core::signals::Signals;
use oncepay_core::store::{Store, StoreError};
use oncepay_core::wire::{FieldError, TenantId};
use serde_json::Value;
use tower::{Layer, Service};
use tracing::Instrument;

use super::faults::{Faults, Point};
use super::problem::{ApiError, LeaseLost};
use crate::metrics::{Metrics, Outcome};

/// The header that marks a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The request header carrying the key.
pub const KEY_HEADER: &str = "idempotency-key";
/// The tenant of requests that reach the layer without one (routers without authentication).
pub const DEFAULT_TENANT: &str = "default";
/// The default body limit: payment bodies are small; this leaves room for full metadata.
pub const MAX_BODY_BYTES_DEFAULT: usize = 64 * 1024;
/// How long a duplicate waits for a running original by default.
pub const IN_FLIGHT_WAIT_DEFAULT: Duration = Duration::from_secs(2);
/// How often a waiting duplicate looks at the store when no in-process wake-up can reach it
/// (the original runs in another process, or its owner died).
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);

/// Renewals per lease length: a renewal can fail twice and the lease still holds.
const LEASE_RENEWALS_PER_LEASE: u32 = 3;
/// How long a running request keeps renewing its lease. A handler stuck for longer is presumed
/// hung; its lease then runs out and a retry may take the key over (its own commit is fenced).
const RENEWAL_WINDOW: Duration = Duration::from_secs(600);

/// Checks a parsed body before the key is claimed; `route` is the matched route template.
pub type Validator = Arc<dyn Fn(&str, Option<&Value>) -> Result<(), ApiError> + Send + Sync>;

/// The layer's settings.
#[derive(Clone, Debug)]
pub struct IdempotencyConfig {
    /// How long a duplicate waits for the original before answering 409.
    pub in_flight_wait: Duration,
    /// How often a waiting duplicate polls the store.
    pub poll_interval: Duration,
    /// The largest body read; larger is 413 before anything is claimed.
    pub max_body_bytes: usize,
    /// Whether the `Oncepay-Fault` header is honoured.
    pub faults_enabled: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            in_flight_wait: IN_FLIGHT_WAIT_DEFAULT,
            poll_interval: POLL_INTERVAL_DEFAULT,
            max_body_bytes: MAX_BODY_BYTES_DEFAULT,
            faults_enabled: false,
        }
    }
}

/// What a handler behind the layer finds in its request extensions: the key it owns.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The lease whose fencing token the handler's commit must present.
    pub lease: Lease,
    /// The body, already parsed and checked for duplicate members.
    pub body: Option<Arc<Value>>,
    /// Faults requested for this request.
    pub faults: Faults,
}

/// Marks a response whose outcome the handler committed in the store itself.
#[derive(Clone, Copy, Debug)]
pub struct Committed;

/// Adds idempotency to every unsafe request of the routes it wraps.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    signals: Arc<Signals<Scope>>,
    config: IdempotencyConfig,
    validator: Option<Validator>,
    metrics: Arc<Metrics>,
}

impl IdempotencyLayer {
    /// A layer over `store`.
    pub fn new(store: Arc<dyn Store>, config: IdempotencyConfig, metrics: Arc<Metrics>) -> Self {
        let shared = Shared {
            store,
            signals: Arc::default(),
            config,
            validator: None,
            metrics,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Validates bodies with `validator` before claiming, so invalid requests leave no trace.
    pub fn with_validator(mut self, validator: Validator) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.validator = Some(validator);
        }
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service the layer wraps around a route.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for Idempotency<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone may not be ready; the instance that was polled ready serves this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move { Ok(handle(shared, inner, request).await) })
    }
}

async fn handle<S>(shared: Arc<Shared>, mut inner: S, request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return match inner.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    let prepared = match prepare(&shared, request).await {
        Ok(prepared) => prepared,
        Err(err) => return err.into_response(),
    };
    // Run in a task of its own: a client that disconnects must not cancel the request between
    // its claim and its commit.
    let span = tracing::Span::current();
    let task = tokio::spawn(execute(shared, inner, prepared).instrument(span));
    match task.await {
        Ok(response) => response,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => ApiError::Internal(format!("request task failed: {err}")).into_response(),
    }
}

/// A request that passed every check and is ready to meet the store.
struct Prepared {
    parts: Parts,
    bytes: Bytes,
    body: Option<Arc<Value>>,
    scope: Scope,
    fingerprint: Fingerprint,
    faults: Faults,
}

async fn prepare(shared: &Shared, request: Request) -> Result<Prepared, ApiError> {
    let (mut parts, body) = request.into_parts();
    let key_values = parts
        .headers
        .get_all(KEY_HEADER)
        .iter()
        .map(|v| v.as_bytes());
    let key = IdempotencyKey::from_header_values(key_values).map_err(|err| match err {
        KeyError::Missing => ApiError::KeyMissing,
        KeyError::Invalid(why) => ApiError::KeyInvalid(format!("Idempotency-Key: {why}")),
    })?;
    let has_content_type = check_content_type(&parts.headers)?;
    let bytes = read_body(&parts.headers, body, shared.config.max_body_bytes).await?;
    if !bytes.is_empty() && !has_content_type {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = match bytes.is_empty() {
        true => None,
        false => Some(
            parse_json_strict(&bytes).map_err(|err| ApiError::InvalidRequest {
                detail: err.message.clone(),
                errors: vec![FieldError {
                    field: err.field.unwrap_or_else(|| "body".to_owned()),
                    message: err.message,
                }],
            })?,
        ),
    };
    let route = match parts.extensions.get::<MatchedPath>() {
        Some(matched) => matched.as_str().to_owned(),
        None => parts.uri.path().to_owned(),
    };
    if let Some(validator) = &shared.validator {
        validator(&route, body.as_ref())?;
    }
    let faults = Faults::from_headers(&parts.headers, shared.config.faults_enabled)?;
    let params = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params
            .iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect(),
        Err(_) => Vec::new(),
    };
    let param_refs: Vec<(&str, &str)> = params.iter().map(|(n, v)| (&n[..], &v[..])).collect();
    let fingerprint = RequestShape {
        method: parts.method.as_str(),
        route: &route,
        path_params: &param_refs,
        query: parts.uri.query().unwrap_or(""),
        body: body.as_ref(),
    }
    .fingerprint();
    let tenant = match parts.extensions.get::<TenantId>() {
        Some(tenant) if !cfg!(feature = "mutant-tenant-not-in-scope") => tenant.clone(),
        _ => TenantId::from(DEFAULT_TENANT),
    };
    Ok(Prepared {
        parts,
        bytes,
        body: body.map(Arc::new),
        scope: Scope { tenant, key },
        fingerprint,
        faults,
    })
}

/// Refuses a body declared as anything but JSON; answers whether a content type was declared.
fn check_content_type(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(false);
    };
    let media_type = value.to_str().unwrap_or("").split(';').next().unwrap_or("");
    let media_type = media_type.trim().to_ascii_lowercase();
    if media_type == "application/json"
        || (media_type.starts_with("application/") && media_type.ends_with("+json"))
    {
        Ok(true)
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Reads the body, refusing it as soon as it passes `limit` so memory stays bounded.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit_bytes: limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Err(err) => Err(ApiError::invalid_field(
            "body",
            format!("the body could not be read: {err}"),
        )),
    }
}

async fn execute<S>(shared: Arc<Shared>, mut inner: S, prepared: Prepared) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let lease = match wait_for_turn(&shared, &prepared.scope, &prepared.fingerprint).await {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    if lease.took_over {
        tracing::warn!(key = %lease.scope.key, tenant = %lease.scope.tenant, "took over an expired lease");
        shared.metrics.idempotency(Outcome::Takeover);
    }
    let faults = prepared.faults.clone();
    let work = async {
        prepared.faults.fire(Point::AfterClaim).await?;
        let mut request = Request::from_parts(prepared.parts, Body::from(prepared.bytes));
        request.extensions_mut().insert(Claim {
            lease: lease.clone(),
            body: prepared.body,
            faults: prepared.faults,
        });
        match inner.call(request).await {
            Ok(response) => Ok::<Response, ApiError>(response),
            Err(never) => match never {},
        }
    };
    let outcome = tokio::select! {
        outcome = work => outcome,
        never = heartbeat(&shared, &lease) => match never {},
    };
    let response = match outcome {
        Ok(response) => response,
        Err(err) => {
            release(&shared, &lease).await;
            return err.into_response();
        }
    };
    finish(&shared, &lease, &faults, response).await
}

/// Renews the lease every third of its length while the handler runs, so a slow but live owner
/// keeps its key; only a dead or stuck one loses it. Never returns.
async fn heartbeat(shared: &Shared, lease: &Lease) -> Infallible {
    let period = shared.store.policy().lease / LEASE_RENEWALS_PER_LEASE;
    let give_up_at = tokio::time::Instant::now() + RENEWAL_WINDOW;
    loop {
        tokio::time::sleep(period).await;
        if tokio::time::Instant::now() >= give_up_at {
            tracing::warn!(key = %lease.scope.key, "request still running; no longer renewing its lease");
            return std::future::pending().await;
        }
        match shared.store.renew(lease).await {
            Ok(_) => {}
            // Someone took over: stop renewing; the commit will be fenced.
            Err(StoreError::Fenced(_)) => return std::future::pending().await,
            Err(err) => {
                tracing::warn!(error = %err, key = %lease.scope.key, "lease renewal failed")
            }
        }
    }
}

/// Meets the store, waiting while a duplicate runs: answers the lease to execute under, or the
/// response to send instead.
async fn wait_for_turn(
    shared: &Arc<Shared>,
    scope: &Scope,
    fingerprint: &Fingerprint,
) -> Result<Lease, Response> {
    let deadline = tokio::time::Instant::now() + shared.config.in_flight_wait;
    loop {
        // Subscribe before looking, so a completion between the look and the wait still wakes us.
        let completion = Signals::subscribe(&shared.signals, scope);
        let begin = shared.store.begin(scope, fingerprint).await;
        let retry_after_secs = match begin {
            Ok(Begin::Execute(lease)) => return Ok(lease),
            Ok(Begin::InFlight { retry_after_secs }) => retry_after_secs,
            Ok(other) => return Err(answer_without_executing(shared, other)),
            Err(err) => return Err(store_failure(shared, &err)),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            shared.metrics.idempotency(Outcome::Conflict);
            return Err(ApiError::KeyInUse { retry_after_secs }.into_response());
        }
        let nap = shared.config.poll_interval.min(deadline - now);
        tokio::select! {
            () = completion => {}
            () = tokio::time::sleep(nap) => {}
        }
    }
}

fn answer_without_executing(shared: &Shared, begin: Begin) -> Response {
    match begin {
        Begin::Replay(stored) => {
            shared.metrics.idempotency(Outcome::Replayed);
            stored_response(&stored, true)
        }
        Begin::Reused => {
            shared.metrics.idempotency(Outcome::Mismatch);
            ApiError::KeyReused.into_response()
        }
        Begin::Expired { resource_id } => {
            shared.metrics.idempotency(Outcome::Expired);
            let payment_id = resource_id.filter(|id| id.starts_with("pay_"));
            ApiError::KeyExpired { payment_id }.into_response()
        }
        Begin::Execute(_) | Begin::InFlight { .. } => {
            ApiError::Internal("unexpected begin outcome".into()).into_response()
        }
    }
}

fn store_failure(shared: &Shared, err: &StoreError) -> Response {
    tracing::error!(error = %err, "store failed before execution");
    shared.metrics.idempotency(Outcome::StoreUnavailable);
    ApiError::StoreUnavailable.into_response()
}

/// Stores or releases the outcome of an executed request, then wakes waiting duplicates.
async fn finish(shared: &Shared, lease: &Lease, faults: &Faults, response: Response) -> Response {
    if response.extensions().get::<Committed>().is_some() {
        shared.signals.notify(&lease.scope);
        shared.metrics.idempotency(Outcome::Executed);
        return after_commit(faults, response).await;
    }
    if response.extensions().get::<LeaseLost>().is_some() {
        // Another owner took over; its outcome, not ours, is the key's.
        tracing::warn!(key = %lease.scope.key, "commit refused: the lease was taken over");
        shared.metrics.idempotency(Outcome::Fenced);
        return response;
    }
    let status = response.status();
    let stores_failures = cfg!(feature = "mutant-store-transient-5xx") && status.is_server_error();
    if !(status.is_success() || status == StatusCode::PAYMENT_REQUIRED || stores_failures) {
        // Not a final outcome (validation, a 5xx, a lost lease): a retry must execute again.
        release(shared, lease).await;
        shared.metrics.idempotency(Outcome::Released);
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        release(shared, lease).await;
        return ApiError::Internal("the handler's body failed".into()).into_response();
    };
    let bytes = collected.to_bytes();
    let header_text = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let stored = StoredResponse {
        status: parts.status.as_u16(),
        content_type: header_text(header::CONTENT_TYPE).unwrap_or("").to_owned(),
        location: header_text(header::LOCATION).map(str::to_owned),
        body: bytes.to_vec(),
        resource_id: None,
    };
    let completed = shared.store.complete(lease, stored).await;
    shared.signals.notify(&lease.scope);
    match completed {
        Ok(()) => {
            shared.metrics.idempotency(Outcome::Executed);
            after_commit(faults, Response::from_parts(parts, Body::from(bytes))).await
        }
        Err(StoreError::Fenced(_)) => {
            shared.metrics.idempotency(Outcome::Fenced);
            ApiError::LeaseLost.into_response()
        }
        Err(err) => store_failure(shared, &err),
    }
}

async fn after_commit(faults: &Faults, response: Response) -> Response {
    match faults.fire(Point::AfterCommit).await {
        Ok(()) => response,
        Err(err) => err.into_response(),
    }
}

async fn release(shared: &Shared, lease: &Lease) {
    if let Err(err) = shared.store.release(lease).await {
        // The lease still runs out on its own; until then retries get 409.
        tracing::warn!(error = %err, key = %lease.scope.key, "could not release a key");
    }
    shared.signals.notify(&lease.scope);
}

/// Builds the HTTP response for a stored outcome; `replayed` adds `Idempotent-Replayed: true`.
pub fn stored_response(stored: &StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body.clone()).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&stored.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Some(value) = stored
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        headers.insert(header::LOCATION, value);
    }
    if replayed {
        headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}
