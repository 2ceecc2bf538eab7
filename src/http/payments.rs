//! Payments: create (behind the idempotency layer), get, list; and customers' reward points.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use oncepay_core::engine::StoredResponse;
use oncepay_core::key::IdempotencyKey;
use oncepay_core::store::{ListQuery, NewPayment, StoreError, reward_points};
use oncepay_core::time::Timestamp;
use oncepay_core::validate;
use oncepay_core::wire::{
    CreatePayment, CustomerId, List, MinorUnits, ObjectKind, Payment, PaymentId, PaymentStatus,
    RewardEntryId, Rewards, TenantId,
};

use super::AppState;
use super::faults::Point;
use super::idempotency::{Claim, Committed, stored_response};
use super::problem::{ApiError, PROBLEM_JSON, problem_body};
use crate::ids::new_id;

/// Customers whose id starts with this are declined by the simulated processor.
pub const DECLINED_CUSTOMER_PREFIX: &str = "cus_decline";
/// The default page size of the payments list.
pub const LIST_LIMIT_DEFAULT: usize = 10;
/// The largest page size of the payments list.
pub const LIST_LIMIT_MAX: usize = 100;

pub async fn create(
    State(state): State<AppState>,
    Extension(claim): Extension<Claim>,
) -> Result<Response, ApiError> {
    let body = claim
        .body
        .as_deref()
        .ok_or_else(|| ApiError::invalid_field("body", "a JSON body is required"))?;
    let request = validate::create_payment(body).map_err(|errors| ApiError::InvalidRequest {
        detail: "the request body failed validation".into(),
        errors,
    })?;
    let payment = charge(request, claim.lease.scope.key.as_str(), state.clock.now());
    let stored = render_payment(&payment);
    claim.faults.fire(Point::BeforeCommit).await?;

    let new = NewPayment {
        payment,
        reward_entry_id: RewardEntryId(new_id("rwd")),
    };
    state
        .store
        .create_payment(&claim.lease, new, stored.clone())
        .await
        .map_err(commit_error)?;
    Ok(committed(&stored))
}

/// The simulated processor: declines customers whose id starts with `cus_decline`.
fn charge(request: CreatePayment, idempotency_key: &str, now: Timestamp) -> Payment {
    let declined = request
        .customer_id
        .as_str()
        .starts_with(DECLINED_CUSTOMER_PREFIX);
    let status = if declined {
        PaymentStatus::Failed
    } else {
        PaymentStatus::Succeeded
    };
    Payment {
        id: PaymentId(new_id("pay")),
        object: ObjectKind,
        amount: request.amount,
        currency: request.currency,
        customer_id: request.customer_id,
        description: request.description,
        metadata: request.metadata,
        status,
        amount_refunded: MinorUnits(0),
        reward_points: if declined {
            0
        } else {
            reward_points(request.amount)
        },
        idempotency_key: idempotency_key.to_owned(),
        created_at: now,
    }
}

/// The response a payment's creation answers with, and stores for replay.
fn render_payment(payment: &Payment) -> StoredResponse {
    let resource_id = Some(payment.id.to_string());
    match payment.status {
        PaymentStatus::Succeeded => StoredResponse {
            status: 201,
            content_type: "application/json".into(),
            location: Some(format!("/v1/payments/{}", payment.id)),
            body: serde_json::to_vec(payment).expect("a payment always serialises"),
            resource_id,
        },
        PaymentStatus::Failed => StoredResponse {
            status: 402,
            content_type: PROBLEM_JSON.into(),
            location: None,
            body: problem_body(
                "card_declined",
                "the processor declined the payment",
                Vec::new(),
                resource_id.clone(),
            ),
            resource_id,
        },
    }
}

/// A first response whose outcome is already committed.
pub(super) fn committed(stored: &StoredResponse) -> Response {
    let mut response = stored_response(stored, false);
    response.extensions_mut().insert(Committed);
    response
}

/// Maps a failed commit to what the client sees; nothing was committed in any case.
pub(super) fn commit_error(err: StoreError) -> ApiError {
    match err {
        // Another owner took the key over and will answer; the retry gets its outcome.
        StoreError::Fenced(_) | StoreError::DuplicateSideEffect => ApiError::LeaseLost,
        StoreError::Unavailable(_) => ApiError::StoreUnavailable,
        StoreError::Corrupt(cause) => ApiError::Internal(cause),
    }
}

fn read_error(err: StoreError) -> ApiError {
    tracing::warn!(error = %err, "read failed");
    match err {
        StoreError::Corrupt(cause) => ApiError::Internal(cause),
        _ => ApiError::StoreUnavailable,
    }
}

pub async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<TenantId>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    let payment = state
        .store
        .payment(&tenant, &PaymentId(id))
        .await
        .map_err(read_error)?;
    payment
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no such payment".into()))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<TenantId>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<List<Payment>>, ApiError> {
    let query = list_query(&params)?;
    let page = state
        .store
        .list_payments(&tenant, &query)
        .await
        .map_err(read_error)?;
    let page = page.ok_or_else(|| {
        ApiError::invalid_field(
            "starting_after",
            "starting_after is not one of your payments",
        )
    })?;
    Ok(Json(List {
        object: ObjectKind,
        data: page.payments,
        has_more: page.has_more,
    }))
}

fn list_query(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
    let limit = match params.get("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=LIST_LIMIT_MAX).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid_field("limit", "limit must be an integer from 1 to 100")
            })?,
    };
    // A malformed filter is an error, not a silent "no payments".
    if params
        .get("customer_id")
        .is_some_and(|c| !validate::is_customer_id(c))
    {
        return Err(ApiError::invalid_field(
            "customer_id",
            "customer_id must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
        ));
    }
    if let Some(key) = params.get("idempotency_key")
        && IdempotencyKey::parse(key.as_bytes()).is_err()
    {
        return Err(ApiError::invalid_field(
            "idempotency_key",
            "idempotency_key must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(ListQuery {
        customer_id: params.get("customer_id").map(|c| CustomerId(c.clone())),
        idempotency_key: params.get("idempotency_key").cloned(),
        limit,
        starting_after: params.get("starting_after").map(|id| PaymentId(id.clone())),
    })
}

pub async fn rewards(
    State(state): State<AppState>,
    Extension(tenant): Extension<TenantId>,
    Path(customer_id): Path<String>,
) -> Result<Json<Rewards>, ApiError> {
    if !validate::is_customer_id(&customer_id) {
        return Err(ApiError::invalid_field(
            "customer_id",
            "customer_id must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
        ));
    }
    let rewards = state
        .store
        .rewards(&tenant, &CustomerId(customer_id))
        .await
        .map_err(read_error)?;
    Ok(Json(rewards))
}
