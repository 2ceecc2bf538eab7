//! Human-readable renderings of answers and errors for the client subcommands.

use std::fmt::Write;

use oncepay_client::Error;
use oncepay_client::wire::{
    KeyState, KeyStatus, List, Payment, PaymentStatus, Problem, Refund, RewardSource, Rewards,
};

/// A payment as a headline and one indented line per field.
pub fn payment(payment: &Payment) -> String {
    let mut text = format!("{}  {}\n", payment.id, payment_status(payment.status));
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(text, "  {name:<16} {value}");
    };
    let amount = format!("{} {} (minor units)", payment.amount.0, payment.currency);
    field("amount", &amount);
    field("refunded", &payment.amount_refunded.0.to_string());
    field("reward points", &payment.reward_points.to_string());
    field("customer", payment.customer_id.as_str());
    if let Some(description) = &payment.description {
        field("description", description);
    }
    if !payment.metadata.is_empty() {
        let pairs: Vec<String> = payment
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        field("metadata", &pairs.join(", "));
    }
    field("idempotency key", &payment.idempotency_key);
    field("created", &payment.created_at.to_string());
    text.trim_end().to_owned()
}

/// One line per payment, and how to fetch the next page.
pub fn payment_list(page: &List<Payment>) -> String {
    if page.data.is_empty() {
        return "no payments".to_owned();
    }
    let mut text = String::new();
    for payment in &page.data {
        let _ = writeln!(
            text,
            "{}  {:<9}  {:>12} {}  {}  {}",
            payment.id,
            payment_status(payment.status),
            payment.amount.0,
            payment.currency,
            payment.customer_id,
            payment.created_at,
        );
    }
    if let (true, Some(last)) = (page.has_more, page.data.last()) {
        let _ = writeln!(text, "more: --starting-after {}", last.id);
    }
    text.trim_end().to_owned()
}

/// A refund as a headline and its fields.
pub fn refund(refund: &Refund) -> String {
    format!(
        "{}  refund of {}\n  amount   {} (minor units)\n  created  {}",
        refund.id, refund.payment_id, refund.amount.0, refund.created_at
    )
}

/// The balance, then the ledger newest first.
pub fn rewards(rewards: &Rewards) -> String {
    let mut text = format!(
        "{}  {} points\n",
        rewards.customer_id, rewards.points_balance
    );
    for entry in &rewards.entries {
        let source = match entry.source {
            RewardSource::Payment => "payment",
            RewardSource::Refund => "refund",
        };
        let refund_id = entry.refund_id.as_ref().map_or("", |id| id.as_str());
        let _ = writeln!(
            text,
            "  {:>+6}  {source:<7}  {} {refund_id}  {}",
            entry.points, entry.payment_id, entry.created_at
        );
    }
    text.trim_end().to_owned()
}

/// Where a key stands.
pub fn key_status(status: &KeyStatus) -> String {
    let state = match status.state {
        KeyState::InProgress => "in progress",
        KeyState::Completed => "completed",
        KeyState::Expired => "expired",
    };
    let mut text = format!("{}  {state}\n", status.key);
    if let Some(response_status) = status.response_status {
        let _ = writeln!(text, "  response     {response_status}");
    }
    if let Some(resource_id) = &status.resource_id {
        let _ = writeln!(text, "  resource     {resource_id}");
    }
    let _ = writeln!(text, "  created      {}", status.created_at);
    let _ = writeln!(text, "  expires      {}", status.expires_at);
    let _ = writeln!(text, "  fingerprint  {}", status.fingerprint);
    text.trim_end().to_owned()
}

/// An API error: the stable code first, then what happened and the fields at fault.
pub fn problem(status: u16, problem: &Problem) -> String {
    let mut text = format!("oncepay: {} ({status}): {}", problem.code, problem.detail);
    for error in &problem.errors {
        let _ = write!(text, "\n  {}: {}", error.field, error.message);
    }
    if let Some(payment_id) = &problem.payment_id {
        let _ = write!(text, "\n  payment: {payment_id}");
    }
    text
}

/// An unknown outcome, with the key that resolves it and how.
pub fn outcome_unknown(idempotency_key: &str, last_error: &Error) -> String {
    format!(
        "oncepay: the outcome is unknown: {}\n\
         oncepay: idempotency key: {idempotency_key}\n\
         oncepay: re-run the same command with --idempotency-key {idempotency_key} to finish \
         it safely, or run `oncepay key {idempotency_key}` to see where it stands",
        causes(last_error)
    )
}

/// An error and its chain of causes on one line.
pub fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn payment_status(status: PaymentStatus) -> &'static str {
    match status {
        PaymentStatus::Succeeded => "succeeded",
        PaymentStatus::Failed => "failed",
    }
}
