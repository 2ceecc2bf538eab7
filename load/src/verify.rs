//! The server-side checks after a run: the server must hold exactly the payments the client was
//! told about, and every customer's balance must be the sum of their ledger and of the points
//! their payments earned.

use std::collections::HashMap;
use std::sync::Arc;

use rand::seq::index;
use reqwest::{Client, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use crate::check::PaymentSeen;
use crate::report::Verified;
use crate::violation::{Findings, Rule, Violation};

/// How many lookups run at once: enough to finish a large sample in seconds, few enough not to
/// turn the check into a second load test.
const LOOKUP_CONCURRENCY: usize = 8;

/// The server as the checks address it.
#[derive(Clone)]
pub struct Server {
    pub client: Client,
    pub base_url: Url,
    pub api_key: Arc<str>,
}

/// What `GET /v1/payments` answers; only the ids matter here.
#[derive(Deserialize)]
struct PaymentList {
    data: Vec<StoredPayment>,
}

#[derive(Deserialize)]
struct StoredPayment {
    id: String,
}

/// What `GET /v1/customers/{id}/rewards` answers.
#[derive(Deserialize)]
struct Rewards {
    points_balance: i64,
    entries: Vec<RewardEntry>,
}

#[derive(Deserialize)]
struct RewardEntry {
    points: i64,
}

/// Checks up to `keys_max` keys (all of them when there are fewer) and every customer.
///
/// # Errors
///
/// When a lookup fails or answers something other than 200 JSON: a check that cannot run must
/// not pass.
pub async fn verify(
    server: &Server,
    payments: &[PaymentSeen],
    uncertain_keys: usize,
    customer_ids: &[String],
    keys_max: usize,
    findings: &mut Findings,
) -> Result<Verified, String> {
    let sample = sample(payments, keys_max);
    let keys_checked = sample.len();
    check_payments(server, sample, findings).await?;

    // A key whose answer was lost may hold a payment the client never saw.
    let balance_check_skipped =
        (uncertain_keys > 0).then(|| format!("{uncertain_keys} keys have an unknown outcome"));
    let mut expected_points: HashMap<&str, i64> = HashMap::new();
    for payment in payments {
        *expected_points
            .entry(payment.customer_id.as_str())
            .or_default() += payment.reward_points;
    }
    for customer_id in customer_ids {
        let rewards: Rewards = get(server, &format!("v1/customers/{customer_id}/rewards")).await?;
        let ledger_sum: i64 = rewards.entries.iter().map(|entry| entry.points).sum();
        let balance = rewards.points_balance;
        if balance != ledger_sum {
            let detail = format!("balance {balance}, ledger entries sum to {ledger_sum}");
            findings.add(Violation::new(
                Rule::BalanceNotLedgerSum,
                customer_id,
                detail,
            ));
        } else if balance_check_skipped.is_none() {
            let expected = expected_points
                .get(customer_id.as_str())
                .copied()
                .unwrap_or(0);
            if balance != expected {
                let detail = format!("balance {balance}, the 201s earned {expected}");
                findings.add(Violation::new(
                    Rule::BalanceNotPayments,
                    customer_id,
                    detail,
                ));
            }
        }
    }

    let customers_checked = customer_ids.len();
    Ok(Verified {
        keys_created: payments.len(),
        keys_checked,
        customers_checked,
        balance_check_skipped,
    })
}

/// All payments, or `keys_max` of them chosen at random.
fn sample(payments: &[PaymentSeen], keys_max: usize) -> Vec<PaymentSeen> {
    if payments.len() <= keys_max {
        return payments.to_vec();
    }
    let mut rng = rand::rng();
    let chosen = index::sample(&mut rng, payments.len(), keys_max);
    chosen.into_iter().map(|i| payments[i].clone()).collect()
}

/// Looks every sampled key up, [`LOOKUP_CONCURRENCY`] at a time.
async fn check_payments(
    server: &Server,
    sample: Vec<PaymentSeen>,
    findings: &mut Findings,
) -> Result<(), String> {
    let chunk_len = sample.len().div_ceil(LOOKUP_CONCURRENCY).max(1);
    let mut lookups = JoinSet::new();
    for chunk in sample.chunks(chunk_len) {
        let (server, chunk) = (server.clone(), chunk.to_vec());
        lookups.spawn(async move {
            let mut found = Vec::with_capacity(chunk.len());
            for payment in chunk {
                // Keys are made of letters, digits and `-`: nothing to escape in a query.
                let path = format!("v1/payments?idempotency_key={}", payment.idempotency_key);
                let list: PaymentList = get(&server, &path).await?;
                found.push((payment, list.data));
            }
            Ok::<_, String>(found)
        });
    }

    while let Some(joined) = lookups.join_next().await {
        for (payment, stored) in joined.map_err(|err| err.to_string())?? {
            let key = &payment.idempotency_key;
            match stored.as_slice() {
                [only] if only.id == payment.id => {}
                [only] => {
                    let detail = format!("answered {}, stored {}", payment.id, only.id);
                    findings.add(Violation::new(Rule::StoredPaymentDiffers, key, detail));
                }
                _ => {
                    let detail = format!("{} payments stored, not 1", stored.len());
                    findings.add(Violation::new(Rule::PaymentsPerKey, key, detail));
                }
            }
        }
    }
    Ok(())
}

/// `GET` a path under the base URL and read its JSON.
async fn get<T: DeserializeOwned>(server: &Server, path: &str) -> Result<T, String> {
    let url = server
        .base_url
        .join(path)
        .map_err(|err| format!("{path}: {err}"))?;
    let response = server
        .client
        .get(url)
        .bearer_auth(&*server.api_key)
        .send()
        .await
        .map_err(|err| format!("GET {path}: {err}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {path}: status {status}"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|err| format!("GET {path}: {err}"))?;
    serde_json::from_slice(&body).map_err(|err| format!("GET {path}: {err}"))
}
