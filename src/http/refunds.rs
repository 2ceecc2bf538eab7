//! Refunds: decided and committed inside the store's atomic step, never above the payment.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::Response;
use oncepay_core::engine::StoredResponse;
use oncepay_core::store::{NewRefund, RefundOutcome, RefundResult};
use oncepay_core::validate;
use oncepay_core::wire::{PaymentId, RefundId, RewardEntryId};

use super::AppState;
use super::faults::Point;
use super::idempotency::Claim;
use super::payments::{commit_error, committed};
use super::problem::{ApiError, PROBLEM_JSON, problem_body};
use crate::ids::new_id;

pub async fn create(
    State(state): State<AppState>,
    Extension(claim): Extension<Claim>,
    Path(payment_id): Path<String>,
) -> Result<Response, ApiError> {
    let request = validate::create_refund(claim.body.as_deref()).map_err(|errors| {
        ApiError::InvalidRequest {
            detail: "the request body failed validation".into(),
            errors,
        }
    })?;
    claim.faults.fire(Point::BeforeCommit).await?;

    let new = NewRefund {
        payment_id: PaymentId(payment_id),
        amount: request.amount,
        refund_id: RefundId(new_id("re")),
        reward_entry_id: RewardEntryId(new_id("rwd")),
        created_at: state.clock.now(),
    };
    let result = state
        .store
        .create_refund(&claim.lease, new, Arc::new(render_refund))
        .await
        .map_err(commit_error)?;
    match result {
        RefundResult::Committed(stored) => Ok(committed(&stored)),
        RefundResult::PaymentNotFound => Err(ApiError::NotFound("no such payment".into())),
    }
}

/// The response a refund attempt answers with, and stores for replay.
fn render_refund(outcome: &RefundOutcome) -> StoredResponse {
    let problem = |code: &str, detail: String, payment_id: &PaymentId| StoredResponse {
        status: 400,
        content_type: PROBLEM_JSON.into(),
        location: None,
        body: problem_body(code, &detail, Vec::new(), Some(payment_id.to_string())),
        resource_id: Some(payment_id.to_string()),
    };
    match outcome {
        RefundOutcome::Created { refund, .. } => StoredResponse {
            status: 201,
            content_type: "application/json".into(),
            location: None,
            body: serde_json::to_vec(refund).expect("a refund always serialises"),
            resource_id: Some(refund.id.to_string()),
        },
        RefundOutcome::NotRefundable { payment } => problem(
            "payment_not_refundable",
            "only succeeded payments can be refunded".into(),
            &payment.id,
        ),
        RefundOutcome::Exceeds { payment, remaining } => problem(
            "refund_exceeds_payment",
            format!(
                "the refund asks for more than the {} left to refund",
                remaining.0
            ),
            &payment.id,
        ),
    }
}
